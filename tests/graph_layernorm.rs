//! int8 LayerNorm in the graph flow against PyTorch eager mode (torch 2.15.0, fbgemm):
//! `nn.LayerNorm` converts to `torch.ao.nn.quantized.LayerNorm` with its own output qparams
//! (fixture: `tools/gen_layernorm_fixture.py`). One LayerNorm normalizes a convolution's
//! output over `[C, H, W]` (held NHWC by ptq, made contiguous by PyTorch), one a linear's
//! output with a random affine. Also: the saved file round trip, and ONNX Runtime's
//! arithmetic keeping LayerNorm in float (ORT has no int8 LayerNorm).

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, Array4, ArrayD, Axis};
use ptq::graph::{Dim, Graph, GraphBuilder, LayerNorm};
use ptq::nn::{Conv2d, Linear};
use ptq::qconfig::{ObserverSpec, QConfig, QConfigMap};
use ptq::quant::{calibrate, convert, prepare, QuantizedGraph};
use ptq::DType;

fn fixture() -> BTreeMap<String, ArrayD<f32>> {
    ptq::io::read_safetensors(format!(
        "{}/tests/fixtures/graph_layernorm.safetensors",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn graph(sd: &BTreeMap<String, ArrayD<f32>>) -> Graph {
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 3.into(), 6.into(), 6.into()])
        .unwrap();
    let conv = Conv2d::new(Array4::zeros((4, 3, 3, 3)), Some(Array1::zeros(4)))
        .unwrap()
        .with_padding(1, 1);
    let y = g.conv2d("conv", x, conv).unwrap();
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

#[test]
fn int8_layer_norm_matches_pytorch_bit_for_bit() {
    let sd = fixture();
    let g = graph(&sd);
    let x = &sd["__input__"];
    let y_float = g.forward(std::slice::from_ref(x)).unwrap().remove(0);
    let want = &sd["__float__"];
    let tol = 1e-5 * want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in y_float.iter().zip(want) {
        assert!((a - b).abs() <= tol, "float {a} vs PyTorch {b}");
    }

    // Every activation pinned to PyTorch's scale / zero point (fixed observers): the int8
    // arithmetic is compared, not the last ulp of the float conv that calibration ran.
    let mut map = QConfigMap::new(QConfig::minmax_per_channel());
    for (node, module) in [
        ("x", "quant"),
        ("conv", "conv"),
        ("ln1", "ln1"),
        ("fc1", "fc1"),
        ("ln2", "ln2"),
        ("fc2", "fc2"),
    ] {
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
    let q = quantized(&g, map, &sd["__calib__"]);
    // ptq's own calibration lands within float rounding of PyTorch's qparams
    let own = quantized(
        &g,
        QConfigMap::new(QConfig::minmax_per_channel()),
        &sd["__calib__"],
    );
    for name in ["conv", "ln1", "fc1", "ln2", "fc2"] {
        let (a, b) = (
            own.output_qparams(name).unwrap().unwrap(),
            q.output_qparams(name).unwrap().unwrap(),
        );
        assert!(
            (a.scale() - b.scale()).abs() <= 1e-5 * b.scale()
                && (a.zero_point() - b.zero_point()).abs() <= 1,
            "{name}: calibrated {a:?} vs PyTorch {b:?}"
        );
    }
    for name in ["ln1", "ln2"] {
        assert_eq!(kind(&q, name), "LayerNorm", "{name}");
    }
    for name in ["conv", "ln1", "fc1", "ln2", "fc2"] {
        let qp = q.output_qparams(name).unwrap().unwrap();
        let want = &sd[&format!("__qparams__.{name}")];
        assert_eq!(
            (qp.scale(), qp.zero_point() as f32),
            (want[[0]], want[[1]]),
            "{name}"
        );
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

    // saved and reloaded: the same op, the same outputs
    let bytes = q.to_bytes().unwrap();
    let back = QuantizedGraph::from_bytes(&bytes).unwrap();
    assert_eq!(kind(&back, "ln2"), "LayerNorm");
    assert_eq!(back.forward(std::slice::from_ref(x)).unwrap()[0], y);
}

#[test]
fn onnxruntime_arithmetic_keeps_layer_norm_float() {
    let sd = fixture();
    let g = graph(&sd);
    let q = quantized(
        &g,
        QConfigMap::new(QConfig::onnxruntime()),
        &sd["__calib__"],
    );
    for name in ["ln1", "ln2"] {
        assert_eq!(kind(&q, name), "Float", "{name}");
        assert!(q.output_qparams(name).unwrap().is_none(), "{name}");
    }
    assert_eq!(kind(&q, "fc2"), "Linear");
    let y = q
        .forward(std::slice::from_ref(&sd["__input__"]))
        .unwrap()
        .remove(0);
    let f = g
        .forward(std::slice::from_ref(&sd["__input__"]))
        .unwrap()
        .remove(0);
    let err = (&y - &f).mapv(|v| v * v).sum().sqrt() / f.mapv(|v| v * v).sum().sqrt();
    println!("ORT arithmetic, float LayerNorm: relative L2 error {err:.4}");
    assert!(err < 0.1, "relative L2 {err}");
}
