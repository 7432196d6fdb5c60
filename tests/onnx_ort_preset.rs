//! `QConfig::onnxruntime()` against onnxruntime 1.32.0's `quantize_static` (MinMax, QDQ,
//! QUInt8 activations, QInt8 per-channel weights) on the ONNX fixtures
//! (`tools/gen_onnx_fixtures.py` logs every `compute_scale_zp` call and every scale / zero
//! point of the quantized models).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use ndarray::{ArrayD, Axis};
use ptq::graph::{NodeId, Op};
use ptq::io::onnx::OnnxModel;
use ptq::io::read_safetensors;
use ptq::observer::{onnxruntime_scale_zp, Observer};
use ptq::qconfig::QConfig;

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

fn tensors(name: &str) -> BTreeMap<String, ArrayD<f32>> {
    read_safetensors(fixture(name)).expect("fixture")
}

const MODELS: &[&str] = &["resnet18", "mobilenet_v2", "mobilenet_v3_small", "concat"];

/// Every (rmin, rmax, qmin, qmax, symmetric) that quantize_static passed to its
/// compute_scale_zp gives ORT's (scale, zero point) bit for bit.
#[test]
fn scale_zero_point_arithmetic_is_bit_exact_with_compute_scale_zp() {
    let mut total = 0;
    let mut symmetric = 0;
    for m in MODELS {
        let t = tensors(&format!("{m}_ort_qparams.safetensors"));
        let col = |k: &str| {
            t[&format!("calls/{k}")]
                .iter()
                .copied()
                .collect::<Vec<f32>>()
        };
        let (rmin, rmax, qmin, qmax, sym, scale, zp) = (
            col("rmin"),
            col("rmax"),
            col("qmin"),
            col("qmax"),
            col("symmetric"),
            col("scale"),
            col("zero_point"),
        );
        assert!(!rmin.is_empty());
        for i in 0..rmin.len() {
            let (s, z) = onnxruntime_scale_zp(
                rmin[i],
                rmax[i],
                qmin[i] as i64,
                qmax[i] as i64,
                sym[i] != 0.0,
            );
            assert_eq!(
                (s.to_bits(), z),
                (scale[i].to_bits(), zp[i] as i64),
                "{m} call {i}: range [{}, {}] q [{}, {}] sym {}: ours ({s:e}, {z}), ORT ({:e}, {})",
                rmin[i],
                rmax[i],
                qmin[i],
                qmax[i],
                sym[i],
                scale[i],
                zp[i]
            );
            symmetric += (sym[i] != 0.0) as usize;
            total += 1;
        }
    }
    println!(
        "{total} compute_scale_zp calls identical ({symmetric} symmetric int8 weight channels)"
    );
    assert!(total > 4000 && symmetric > 3000, "{total} {symmetric}");
}

/// The weight observer of the preset gives quantize_static's per-channel weight scales.
#[test]
fn weight_qparams_equal_quantize_static() {
    let mut channels = 0;
    for m in MODELS {
        let imp = OnnxModel::load(fixture(&format!("{m}_ts13.onnx")))
            .unwrap()
            .to_graph()
            .unwrap();
        let t = tensors(&format!("{m}_ort_qparams.safetensors"));
        let mut weights = 0;
        for (init, &id) in &imp.param_nodes {
            let Some(ort_scale) = t.get(&format!("scale/{init}")) else {
                continue; // biases are int32 with scale in_scale * w_scale, not observed
            };
            let ort_zp = &t[&format!("zero_point/{init}")];
            let node = imp.graph.node(id);
            let w: ArrayD<f32> = match &node.op {
                Op::Conv2d(c) => c.weight.clone().into_dyn(),
                Op::Linear(l) => l.weight.clone().into_dyn(),
                other => panic!("{init}: {:?}", other.kind()),
            };
            let mut obs = QConfig::onnxruntime().weight.build().unwrap();
            obs.observe(w.view()).unwrap();
            let qp = obs.qparams().unwrap();
            assert_eq!(qp.scales().len(), ort_scale.len(), "{m} {init}");
            for (c, (a, b)) in qp.scales().iter().zip(ort_scale.iter()).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{m} {init} channel {c}: {a:e} vs {b:e}"
                );
            }
            assert!(qp.zero_points().iter().all(|&z| z == 0));
            assert!(ort_zp.iter().all(|&z| z == 0.0));
            channels += ort_scale.len();
            weights += 1;
        }
        assert!(weights >= 3, "{m}: {weights} weights compared");
    }
    println!("{channels} weight channels identical");
    assert!(channels > 500);
}

/// ORT's range adjustments before computing activation qparams
/// (`BaseQuantizer.adjust_tensor_ranges`): a Relu/Clip input read by nothing else takes the
/// output's range.
fn effective_tensor(m: &OnnxModel, t: &str) -> String {
    let readers: Vec<_> = m
        .nodes
        .iter()
        .filter(|n| n.inputs.iter().any(|i| i == t))
        .collect();
    if readers.len() == 1 && matches!(readers[0].op_type.as_str(), "Relu" | "Clip") {
        return readers[0].outputs[0].clone();
    }
    t.to_string()
}

fn ulps(a: f32, b: f32) -> u32 {
    // distance in representable floats (same sign here: ranges are widened to contain 0)
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

/// End to end: the imported graph calibrated with the preset's activation observer on the
/// same 4 batches gives quantize_static's activation scales and zero points. ORT's scale of
/// every tensor is its recorded (adjusted) range through [`onnxruntime_scale_zp`] exactly;
/// where our float forward gives the same range bits, our parameters are identical; where
/// it differs (summation order: a few ulps), the parameters are within 1e-5 and 1 zero point.
#[test]
fn calibrated_activation_qparams_match_quantize_static() {
    let calib = tensors("inputs.safetensors").remove("calib").unwrap();
    let batches: Vec<ArrayD<f32>> = calib
        .axis_chunks_iter(Axis(0), 2)
        .map(|b| b.to_owned())
        .collect();
    assert_eq!(batches.len(), 4);
    let (mut total, mut same_range, mut same_qp, mut worst_ulps, mut worst_rel) =
        (0, 0, 0, 0u32, 0f64);
    for m in MODELS {
        let model = OnnxModel::load(fixture(&format!("{m}_ts13.onnx"))).unwrap();
        let imp = model.to_graph().unwrap();
        let g = &imp.graph;
        let mut obs: HashMap<NodeId, Box<dyn Observer>> = HashMap::new();
        for b in &batches {
            g.forward_with(std::slice::from_ref(b), &mut |node, y| {
                obs.entry(node.id)
                    .or_insert_with(|| QConfig::onnxruntime().activation.build().unwrap())
                    .observe(y.view())
            })
            .unwrap();
        }
        let t = tensors(&format!("{m}_ort_qparams.safetensors"));
        for (k, ort_scale) in &t {
            let Some(tensor) = k.strip_prefix("scale/") else {
                continue;
            };
            let Some(&id) = imp.tensor_nodes.get(tensor) else {
                continue; // weights, biases
            };
            let (os, oz) = (
                ort_scale[[0]],
                t[&format!("zero_point/{tensor}")][[0]] as i64,
            );
            let ort_range = &t[&format!("range/{tensor}")];
            let (olo, ohi) = (ort_range[[0]], ort_range[[1]]);
            // ORT's own parameters are its range through compute_scale_zp
            let (s0, z0) = onnxruntime_scale_zp(olo, ohi, 0, 255, false);
            assert_eq!((s0.to_bits(), z0), (os.to_bits(), oz), "{m} {tensor}");
            // ours: the same adjustments, our observed range
            let eff = effective_tensor(&model, tensor);
            let id = *imp.tensor_nodes.get(&eff).unwrap_or(&id);
            let (lo, hi, s, z) = if matches!(g.node(id).op, Op::Softmax { .. }) {
                let (s, z) = onnxruntime_scale_zp(0.0, 1.0, 0, 255, false);
                (0.0, 1.0, s, z)
            } else {
                let o = &obs[&id];
                let (lo, hi) = o.observed_range().unwrap();
                let qp = o.qparams().unwrap();
                (lo, hi, qp.scale(), qp.zero_point() as i64)
            };
            total += 1;
            if lo.to_bits() == olo.to_bits() && hi.to_bits() == ohi.to_bits() {
                same_range += 1;
                assert_eq!(
                    (s.to_bits(), z),
                    (os.to_bits(), oz),
                    "{m} {tensor}: same range, other qparams"
                );
            } else {
                worst_ulps = worst_ulps.max(ulps(lo, olo)).max(ulps(hi, ohi));
            }
            if s.to_bits() == os.to_bits() && z == oz {
                same_qp += 1;
            } else {
                let rel = ((s as f64 - os as f64) / os as f64).abs();
                worst_rel = worst_rel.max(rel);
                assert!(
                    rel < 1e-5 && (z - oz).abs() <= 1,
                    "{m} {tensor}: ours ({s:e}, {z}) ORT ({os:e}, {oz}), ranges [{lo:e}, {hi:e}] vs [{olo:e}, {ohi:e}]"
                );
            }
        }
    }
    println!(
        "{total} activation tensors: {same_range} observed ranges bit-identical to ORT's (all with identical qparams); \
         {same_qp} (scale, zp) pairs identical in all; other ranges differ by <= {worst_ulps} ulps, scales by <= {worst_rel:.2e} relative"
    );
    assert!(total > 200, "{total}");
    // How many ranges come out bit-identical depends on summation order: our f32 convs
    // (direct depthwise kernel, FMA) sum differently from MLAS, which moves a range by a
    // few ulps (98 of 208 identical with the current kernels). Every identical range gave
    // identical qparams above; the rest are bounded below.
    assert!(same_range * 3 >= total, "{same_range}/{total}");
    assert!(worst_ulps <= 64, "{worst_ulps}");
}

/// End to end for the histogram presets: the imported ResNet-18 calibrated with
/// `QConfig::onnxruntime_entropy()` / `onnxruntime_percentile()` on the 8 calibration images
/// in one batch (quantize_static collects its whole data set in one histogram) against
/// quantize_static with `CalibrationMethod.Entropy` / `.Percentile`
/// (`tools/gen_ort_histogram_fixtures.py`). Where our float forward gives ORT's tensor bits,
/// the thresholds are ORT's (`tests/onnx_ort_histogram.rs` checks that on shared data); our
/// summation order moves some activations by ulps, and with them the histogram edges and
/// thresholds by ulps (here at most 1.7e-7 relative in the scale; a threshold could in
/// principle also move by one histogram bin, which this bound would catch).
#[test]
fn histogram_presets_match_quantize_static_end_to_end() {
    let calib = tensors("inputs.safetensors").remove("calib").unwrap();
    let t = tensors("resnet18_ort_hist_qparams.safetensors");
    let model = OnnxModel::load(fixture("resnet18_ts13.onnx")).unwrap();
    let imp = model.to_graph().unwrap();
    let g = &imp.graph;
    for (method, qc) in [
        ("entropy", QConfig::onnxruntime_entropy()),
        ("percentile", QConfig::onnxruntime_percentile()),
    ] {
        let mut obs: HashMap<NodeId, Box<dyn Observer>> = HashMap::new();
        g.forward_with(std::slice::from_ref(&calib), &mut |node, y| {
            obs.entry(node.id)
                .or_insert_with(|| qc.activation.build().unwrap())
                .observe(y.view())
        })
        .unwrap();
        let (mut total, mut same_qp, mut worst_rel) = (0, 0, 0f64);
        for (k, ort_scale) in &t {
            let Some(tensor) = k.strip_prefix(&format!("{method}/scale/")) else {
                continue;
            };
            let Some(&id) = imp.tensor_nodes.get(tensor) else {
                continue;
            };
            let (os, oz) = (
                ort_scale[[0]],
                t[&format!("{method}/zero_point/{tensor}")][[0]] as i64,
            );
            let r = &t[&format!("{method}/range/{tensor}")];
            // ORT's parameters are its (adjusted) threshold through compute_scale_zp
            let (s0, z0) = onnxruntime_scale_zp(r[[0]], r[[1]], 0, 255, false);
            assert_eq!((s0.to_bits(), z0), (os.to_bits(), oz), "{method} {tensor}");
            let eff = effective_tensor(&model, tensor);
            let id = *imp.tensor_nodes.get(&eff).unwrap_or(&id);
            let qp = obs[&id].qparams().unwrap();
            let (s, z) = (qp.scale(), qp.zero_point() as i64);
            total += 1;
            if s.to_bits() == os.to_bits() && z == oz {
                same_qp += 1;
            } else {
                let rel = ((s as f64 - os as f64) / os as f64).abs();
                worst_rel = worst_rel.max(rel);
                assert!(
                    rel < 1e-5 && (z - oz).abs() <= 1,
                    "{method} {tensor}: ours ({s:e}, {z}) ORT ({os:e}, {oz})"
                );
            }
        }
        println!(
            "{method}: {total} activation tensors, {same_qp} (scale, zp) identical to quantize_static's, \
             the rest within {worst_rel:.2e} relative"
        );
        assert!(total >= 25, "{total}");
        assert!(same_qp * 3 >= total, "{same_qp}/{total}");
    }
}
