//! int8 ops PyTorch eager mode runs besides conv / linear / add, in the graph flow, against
//! PyTorch (torch 2.15.0, fbgemm; fixtures from `tools/gen_graph_int8_ops_fixtures.py`):
//! - `nn.LayerNorm` converts to `torch.ao.nn.quantized.LayerNorm` with its own output
//!   qparams: one normalizes a convolution's output over `[C, H, W]` (held NHWC by ptq,
//!   made contiguous by PyTorch), one a linear's output with a random affine;
//! - `nn.Upsample(mode="bilinear")` runs `quantized::upsample_bilinear2d` on the input's
//!   qparams (by scale factor, and by size with `align_corners`), channels-last after a
//!   convolution.
//!
//! Every activation is pinned to PyTorch's scale / zero point (fixed observers) so the int8
//! arithmetic is compared, not the last ulp of the float forward calibration ran; ptq's own
//! calibration is checked to land within float rounding of the same qparams. Also: the
//! saved file round trip, and ONNX Runtime's arithmetic keeping both ops in float.

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, Array4, ArrayD, Axis};
use ptq::graph::{Dim, Graph, GraphBuilder, LayerNorm, UpsampleMode, UpsampleSpec};
use ptq::nn::{Conv2d, Linear};
use ptq::qconfig::{ObserverSpec, QConfig, QConfigMap};
use ptq::quant::{calibrate, convert, prepare, QuantizedGraph};
use ptq::DType;

fn fixture(name: &str) -> BTreeMap<String, ArrayD<f32>> {
    ptq::io::read_safetensors(format!(
        "{}/tests/fixtures/{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn conv(cin: usize, cout: usize, k: usize) -> Conv2d {
    Conv2d::new(Array4::zeros((cout, cin, k, k)), Some(Array1::zeros(cout)))
        .unwrap()
        .with_padding(k / 2, k / 2)
}

fn loaded(g: GraphBuilder, sd: &BTreeMap<String, ArrayD<f32>>) -> Graph {
    let mut g = g.build().unwrap();
    let weights: BTreeMap<String, ArrayD<f32>> = sd
        .iter()
        .filter(|(k, _)| !k.starts_with("__"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let report = g.load_state_dict(&weights, true).unwrap();
    assert!(report.missing.is_empty(), "{report:?}");
    g
}

/// conv -> LayerNorm([4, 6, 6], no affine) -> flatten -> fc1 -> LayerNorm(32) -> fc2
fn layer_norms(sd: &BTreeMap<String, ArrayD<f32>>) -> Graph {
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 3.into(), 6.into(), 6.into()])
        .unwrap();
    let y = g.conv2d("conv", x, conv(3, 4, 3)).unwrap();
    let ln1 = LayerNorm {
        weight: None,
        bias: None,
        ..LayerNorm::new(&[4, 6, 6])
    };
    let y = g.layer_norm("ln1", y, ln1).unwrap();
    let y = g.flatten("flatten", y, 1, -1).unwrap();
    let fc1 = Linear::new(Array2::zeros((32, 144)), Some(Array1::zeros(32))).unwrap();
    let y = g.linear("fc1", y, fc1).unwrap();
    let y = g.layer_norm("ln2", y, LayerNorm::new(&[32])).unwrap();
    let fc2 = Linear::new(Array2::zeros((10, 32)), Some(Array1::zeros(10))).unwrap();
    let y = g.linear("fc2", y, fc2).unwrap();
    g.output(y).unwrap();
    loaded(g, sd)
}

/// conv1 -> bilinear x2 -> conv2 -> bilinear to 13x9 (align_corners) -> conv3 (1x1)
fn bilinear(sd: &BTreeMap<String, ArrayD<f32>>) -> Graph {
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 3.into(), 5.into(), 7.into()])
        .unwrap();
    let y = g.conv2d("conv1", x, conv(3, 4, 3)).unwrap();
    let mode = |align_corners| UpsampleMode::Bilinear { align_corners };
    let y = g
        .upsample("up1", y, UpsampleSpec::scale(2.0, 2.0, mode(false)))
        .unwrap();
    let y = g.conv2d("conv2", y, conv(4, 4, 3)).unwrap();
    let up2 = UpsampleSpec {
        size: Some((13, 9)),
        scale_factor: None,
        mode: mode(true),
    };
    let y = g.upsample("up2", y, up2).unwrap();
    let y = g.conv2d("conv3", y, conv(4, 2, 1)).unwrap();
    g.output(y).unwrap();
    loaded(g, sd)
}

fn kind<'a>(q: &'a QuantizedGraph, name: &str) -> &'a str {
    let n = q.nodes().iter().find(|n| n.name() == name).unwrap();
    n.op().kind()
}

fn quantized(g: &Graph, map: QConfigMap, calib: &ArrayD<f32>) -> QuantizedGraph {
    let mut p = prepare(g.clone(), &map).unwrap();
    let batches: Vec<ArrayD<f32>> = calib
        .axis_chunks_iter(Axis(0), 8)
        .map(|b| b.to_owned())
        .collect();
    calibrate(&mut p, batches).unwrap();
    convert(p).unwrap()
}

/// Float outputs within 1e-5 of PyTorch's; with activations pinned to PyTorch's qparams
/// (`nodes`: ptq node -> PyTorch module), every int8 output identical; the op kinds
/// `int8_ops` present; the saved file reproduces the outputs. Returns the int8 model.
fn check_against_pytorch(
    g: &Graph,
    sd: &BTreeMap<String, ArrayD<f32>>,
    nodes: &[(&str, &str)],
    int8_ops: &[(&str, &str)],
) -> QuantizedGraph {
    let x = &sd["__input__"];
    let y_float = g.forward(std::slice::from_ref(x)).unwrap().remove(0);
    let want = &sd["__float__"];
    let tol = 1e-5 * want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in y_float.iter().zip(want) {
        assert!((a - b).abs() <= tol, "float {a} vs PyTorch {b}");
    }
    let mut map = QConfigMap::new(QConfig::minmax_per_channel());
    for &(node, module) in nodes {
        let v = &sd[&format!("__qparams__.{module}")];
        let activation = ObserverSpec::fixed(v[[0]], v[[1]] as i32, DType::QUInt8);
        map = map.set_name(
            node,
            Some(QConfig {
                activation,
                ..QConfig::minmax_per_channel()
            }),
        );
    }
    let q = quantized(g, map, &sd["__calib__"]);
    let own = quantized(
        g,
        QConfigMap::new(QConfig::minmax_per_channel()),
        &sd["__calib__"],
    );
    for &(node, _) in &nodes[1..] {
        let (a, b) = (
            own.output_qparams(node).unwrap().unwrap(),
            q.output_qparams(node).unwrap().unwrap(),
        );
        assert!(
            (a.scale() - b.scale()).abs() <= 1e-5 * b.scale()
                && (a.zero_point() - b.zero_point()).abs() <= 1,
            "{node}: calibrated {a:?} vs PyTorch {b:?}"
        );
    }
    for &(node, k) in int8_ops {
        assert_eq!(kind(&q, node), k, "{node}");
    }
    let y = q.forward(std::slice::from_ref(x)).unwrap().remove(0);
    let want = &sd["__output__"];
    assert_eq!(y.shape(), want.shape());
    let same = y
        .iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() == b.to_bits())
        .count();
    println!("int8 outputs identical to PyTorch: {same} of {}", y.len());
    assert_eq!(same, y.len());

    let back = QuantizedGraph::from_bytes(&q.to_bytes().unwrap()).unwrap();
    for &(node, k) in int8_ops {
        assert_eq!(kind(&back, node), k, "{node} reloaded");
    }
    assert_eq!(back.forward(std::slice::from_ref(x)).unwrap()[0], y);
    q
}

/// With ONNX Runtime's arithmetic the ops stay float; the int8 model stays near the float.
fn check_onnxruntime_float(g: &Graph, sd: &BTreeMap<String, ArrayD<f32>>, float_ops: &[&str]) {
    let q = quantized(g, QConfigMap::new(QConfig::onnxruntime()), &sd["__calib__"]);
    for &name in float_ops {
        assert_eq!(kind(&q, name), "Float", "{name}");
        assert!(q.output_qparams(name).unwrap().is_none(), "{name}");
    }
    let x = std::slice::from_ref(&sd["__input__"]);
    let (y, f) = (
        q.forward(x).unwrap().remove(0),
        g.forward(x).unwrap().remove(0),
    );
    let err = (&y - &f).mapv(|v| v * v).sum().sqrt() / f.mapv(|v| v * v).sum().sqrt();
    println!("ORT arithmetic, float {float_ops:?}: relative L2 error {err:.4}");
    assert!(err < 0.1, "relative L2 {err}");
}

#[test]
fn int8_layer_norm_matches_pytorch_bit_for_bit() {
    let sd = fixture("graph_layernorm");
    let g = layer_norms(&sd);
    let nodes = [
        ("x", "quant"),
        ("conv", "conv"),
        ("ln1", "ln1"),
        ("fc1", "fc1"),
        ("ln2", "ln2"),
        ("fc2", "fc2"),
    ];
    let q = check_against_pytorch(
        &g,
        &sd,
        &nodes,
        &[("ln1", "LayerNorm"), ("ln2", "LayerNorm")],
    );
    assert!(q.weight_bytes() > 0);
}

#[test]
fn onnxruntime_arithmetic_keeps_layer_norm_float() {
    let sd = fixture("graph_layernorm");
    check_onnxruntime_float(&layer_norms(&sd), &sd, &["ln1", "ln2"]);
}

#[test]
fn int8_bilinear_upsample_matches_pytorch_bit_for_bit() {
    let sd = fixture("graph_upsample_bilinear");
    let g = bilinear(&sd);
    let nodes = [
        ("x", "quant"),
        ("conv1", "conv1"),
        ("conv2", "conv2"),
        ("conv3", "conv3"),
    ];
    let q = check_against_pytorch(
        &g,
        &sd,
        &nodes,
        &[("up1", "UpsampleBilinear"), ("up2", "UpsampleBilinear")],
    );
    // the input's qparams pass through
    for (up, src) in [("up1", "conv1"), ("up2", "conv2")] {
        assert_eq!(
            q.output_qparams(up).unwrap(),
            q.output_qparams(src).unwrap()
        );
    }
}

#[test]
fn onnxruntime_arithmetic_keeps_bilinear_upsample_float() {
    let sd = fixture("graph_upsample_bilinear");
    check_onnxruntime_float(&bilinear(&sd), &sd, &["up1", "up2"]);
}
