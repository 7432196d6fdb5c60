//! QDQ ONNX export of a calibrated graph: structure checks in Rust (ONNX Runtime's own check
//! of the same files is `tools/check_qdq_ort.py`, run by hand: see the README/CHANGELOG).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use ndarray::{ArrayD, Axis};
use ptq::graph::{find_fusable, fuse};
use ptq::io::onnx::{load_onnx, OnnxModel, TensorData};
use ptq::io::read_safetensors;
use ptq::qconfig::{QConfig, QConfigMap};
use ptq::quant::{calibrate, prepare};

fn fixture(name: &str) -> PathBuf {
    [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "fixtures",
        "onnx",
        name,
    ]
    .iter()
    .collect()
}

fn exported(model: &str) -> (OnnxModel, ptq::quant::PreparedGraph) {
    let imp = load_onnx(fixture(model)).unwrap();
    let groups = find_fusable(&imp.graph);
    let refs: Vec<Vec<&str>> = groups
        .iter()
        .map(|g| g.iter().map(String::as_str).collect())
        .collect();
    let slices: Vec<&[&str]> = refs.iter().map(Vec::as_slice).collect();
    let g = fuse(&imp.graph, &slices).unwrap();
    let mut p = prepare(g, &QConfigMap::new(QConfig::onnxruntime())).unwrap();
    let calib = read_safetensors(fixture("inputs.safetensors"))
        .unwrap()
        .remove("calib")
        .unwrap();
    calibrate(
        &mut p,
        calib
            .axis_chunks_iter(Axis(0), 4)
            .map(|b| b.to_owned())
            .collect::<Vec<ArrayD<f32>>>(),
    )
    .unwrap();
    let bytes = p.to_qdq_onnx().unwrap();
    (OnnxModel::from_bytes(&bytes, "qdq", None).unwrap(), p)
}

#[test]
fn resnet18_exports_as_qdq_with_int8_weights_and_int32_biases() {
    let (m, p) = exported("resnet18_ts13.onnx");
    assert_eq!(m.opset, 13);
    let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
    for n in &m.nodes {
        *ops.entry(n.op_type.as_str()).or_default() += 1;
    }
    let producer: HashMap<&str, &str> = m
        .nodes
        .iter()
        .flat_map(|n| {
            n.outputs
                .iter()
                .map(move |o| (o.as_str(), n.op_type.as_str()))
        })
        .collect();
    assert_eq!(ops["Conv"], 20);
    assert_eq!(ops["Gemm"], 1);
    // every conv / gemm reads dequantized activations, weights and biases
    let mut checked = 0;
    for n in m
        .nodes
        .iter()
        .filter(|n| n.op_type == "Conv" || n.op_type == "Gemm")
    {
        for i in &n.inputs {
            assert_eq!(
                producer.get(i.as_str()),
                Some(&"DequantizeLinear"),
                "{} input {i}",
                n.name
            );
        }
        // weight: int8, symmetric, per channel; bias: int32 with scale s_in * s_w, zp 0
        let w = m
            .initializer(&format!("{}_quantized", n.inputs[1]))
            .unwrap();
        let ws = m.initializer(&format!("{}_scale", n.inputs[1])).unwrap();
        assert_eq!(ws.dims, vec![w.dims[0]], "{}", n.name);
        let TensorData::Int(wq) = &w.data else {
            panic!()
        };
        assert!(wq.iter().all(|&v| (-127..=127).contains(&v)));
        assert!(
            wq.iter().any(|&v| v.abs() == 127),
            "{}: absmax channel maps to 127",
            n.name
        );
        let x_scale = m
            .initializer(&format!(
                "{}_scale",
                n.inputs[0].trim_end_matches("_dequantized")
            ))
            .unwrap()
            .to_f32()[0];
        let bs = m
            .initializer(&format!("{}_scale", n.inputs[2]))
            .unwrap()
            .to_f32();
        let bz = m
            .initializer(&format!("{}_zero_point", n.inputs[2]))
            .unwrap();
        assert!(bz.ints().unwrap().iter().all(|&z| z == 0));
        for (c, s) in ws.to_f32().iter().enumerate() {
            assert_eq!(
                bs[c].to_bits(),
                (x_scale * s).to_bits(),
                "{} channel {c}",
                n.name
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 21);
    // activation Q/DQ pairs carry the calibrated observers' parameters
    let x_scale = m.initializer("x_scale").unwrap().to_f32()[0];
    let obs = p
        .observers()
        .find(|(id, _)| p.graph().node(*id).name == "x")
        .unwrap()
        .1
        .qparams()
        .unwrap();
    assert_eq!(x_scale.to_bits(), obs.scale().to_bits());
    assert_eq!(ops["QuantizeLinear"], ops["DequantizeLinear"] - 2 * 21);
    // the exported int8 weights and scales are the ones the int8 model runs with
    let names: Vec<String> = m
        .nodes
        .iter()
        .filter(|n| n.op_type == "Conv" || n.op_type == "Gemm")
        .map(|n| n.name.clone())
        .collect();
    let q = ptq::quant::convert(p).unwrap();
    for name in names {
        let (wq, qp) = q.weight(&name).unwrap().unwrap_or_else(|| panic!("{name}"));
        let exp = m.initializer(&format!("{name}.weight_quantized")).unwrap();
        let ints: Vec<i64> = wq.iter().map(|&v| v as i64).collect();
        assert_eq!(exp.ints().unwrap(), ints.as_slice(), "{name}");
        let s = m
            .initializer(&format!("{name}.weight_scale"))
            .unwrap()
            .to_f32();
        assert_eq!(s, qp.scales(), "{name}");
    }
}

/// The int32 bias of every exported conv / gemm is the nearest integer (ties to even) to
/// the bias term ptq's fbgemm arithmetic adds to the i32 accumulator, `f32(bias /
/// f32(x_scale * w_scale[c]))`: the only difference between ptq's requantization and
/// ORT's QLinearConv / QGemm (MLAS: `(acc + bias_i32) as f32 * (x_scale * w_scale / y_scale)`,
/// round half to even) is that dropped fraction, at most 0.5 accumulator units, i.e. at
/// most `0.5 * x_scale * w_scale / y_scale` LSB before the final rounding
/// (`tools/qdq_layerwise.py` measures its effect against ORT).
#[test]
fn exported_int32_bias_is_ptqs_bias_term_rounded_half_even() {
    use ptq::graph::Op;
    for model in ["resnet18_ts13.onnx", "mobilenet_v2_ts13.onnx"] {
        let (m, p) = exported(model);
        let (mut channels, mut inexact, mut max_frac) = (0usize, 0usize, 0f32);
        for n in m
            .nodes
            .iter()
            .filter(|n| n.op_type == "Conv" || n.op_type == "Gemm")
        {
            let node = p
                .graph()
                .nodes()
                .iter()
                .find(|g| g.name == n.name)
                .unwrap_or_else(|| panic!("{model}: no node {}", n.name));
            let bias = match &node.op {
                Op::Conv2d(c) | Op::ConvReLU2d(c) => c.bias.clone(),
                Op::Linear(l) | Op::LinearReLU(l) => l.bias.clone(),
                other => panic!("{}: {other:?}", n.name),
            }
            .unwrap_or_else(|| panic!("{}: no float bias", n.name));
            let x_scale = m
                .initializer(&format!(
                    "{}_scale",
                    n.inputs[0].trim_end_matches("_dequantized")
                ))
                .unwrap()
                .to_f32()[0];
            let ws = m
                .initializer(&format!("{}_scale", n.inputs[1]))
                .unwrap()
                .to_f32();
            let bq = m
                .initializer(&format!("{}_quantized", n.inputs[2]))
                .unwrap();
            let bq = bq.ints().unwrap();
            assert_eq!(bq.len(), bias.len(), "{}", n.name);
            for (c, &b) in bias.iter().enumerate() {
                let s = ws[if ws.len() == 1 { 0 } else { c }];
                let term = b / (x_scale * s); // what ptq adds to the accumulator
                assert_eq!(
                    bq[c],
                    term.round_ties_even() as i64,
                    "{model} {} channel {c}: bias {b}, term {term}",
                    n.name
                );
                let frac = (term - bq[c] as f32).abs();
                assert!(frac <= 0.5, "{} channel {c}: {frac}", n.name);
                max_frac = max_frac.max(frac);
                inexact += usize::from(frac != 0.0);
                channels += 1;
            }
        }
        // QDQ cannot carry the fraction: it is really dropped on (almost) every channel
        assert!(channels > 200, "{model}: {channels} channels");
        assert!(
            inexact * 10 > channels * 9,
            "{model}: {inexact} of {channels} channels have a fraction"
        );
        assert!(max_frac > 0.45, "{model}: largest fraction {max_frac}");
        eprintln!("{model}: {inexact} of {channels} channels drop a fraction, largest {max_frac}");
    }
}

/// The weights-only form: int8 weights behind DequantizeLinear (the same int8 values and
/// scales as the full QDQ export), float biases and activations, no QuantizeLinear.
#[test]
fn weights_only_export_has_int8_weights_and_float_activations() {
    let (full, p) = exported("resnet18_ts13.onnx");
    let bytes = p.to_qdq_onnx_weights_only().unwrap();
    let m = OnnxModel::from_bytes(&bytes, "weights_only", None).unwrap();
    let count = |m: &OnnxModel, op: &str| m.nodes.iter().filter(|n| n.op_type == op).count();
    assert_eq!(count(&m, "QuantizeLinear"), 0);
    assert_eq!(
        count(&m, "DequantizeLinear"),
        21,
        "20 conv + 1 gemm weights"
    );
    assert_eq!(count(&m, "Conv"), 20);
    for n in m
        .nodes
        .iter()
        .filter(|n| n.op_type == "Conv" || n.op_type == "Gemm")
    {
        let wq = format!("{}_quantized", n.inputs[1]);
        let (a, b) = (m.initializer(&wq).unwrap(), full.initializer(&wq).unwrap());
        assert_eq!(a.ints().unwrap(), b.ints().unwrap(), "{wq}");
        let ws = format!("{}_scale", n.inputs[1]);
        assert_eq!(
            m.initializer(&ws).unwrap().to_f32(),
            full.initializer(&ws).unwrap().to_f32()
        );
        // the bias is the float initializer itself
        if let Some(b) = n.inputs.get(2) {
            let bias = m.initializer(b).unwrap();
            assert!(matches!(bias.data, TensorData::Float(_)), "{b}");
        }
    }
    assert!(bytes.len() < p.to_qdq_onnx().unwrap().len());
    // only the weight observers matter: no calibration needed
    let g = load_onnx(fixture("resnet18_ts13.onnx")).unwrap().graph;
    let fresh = prepare(g, &QConfigMap::new(QConfig::onnxruntime())).unwrap();
    assert!(fresh.to_qdq_onnx().is_err());
    let w8 = fresh.to_qdq_onnx_weights_only().unwrap();
    let m2 = OnnxModel::from_bytes(&w8, "uncalibrated", None).unwrap();
    assert_eq!(count(&m2, "DequantizeLinear"), 21);
}
