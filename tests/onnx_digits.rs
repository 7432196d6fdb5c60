//! The ONNX flow on real data: a digits CNN with a residual add and a concat, trained on
//! the UCI digits upscaled to 32x32 and exported by `torch.onnx.export`
//! (`tools/gen_digits_onnx.py`), imported, calibrated with `QConfig::onnxruntime()` and run
//! in int8 by ptq; compared with ONNX Runtime running ptq's QDQ export of the same
//! calibration (ORT's predictions and int8 output values are in the fixture).
//!
//! Every activation is pinned to the scale / zero point the QDQ file gave ORT (fixed
//! observers, `act.<node>` in the fixture), so the test compares int8 arithmetic and cannot
//! break when the float kernels change the last ulp of the calibration forward. The preset's
//! own calibration is checked against the same qparams (within one scale step).

use std::path::PathBuf;

use ndarray::{Array4, ArrayD, Axis, IxDyn};
use ptq::graph::{find_fusable, fuse};
use ptq::io::onnx::load_onnx;
use ptq::io::read_safetensors;
use ptq::qconfig::{ObserverSpec, QConfig, QConfigMap};
use ptq::quant::{calibrate, convert, prepare};
use ptq::DType;

fn root(parts: &[&str]) -> PathBuf {
    std::iter::once(env!("CARGO_MANIFEST_DIR"))
        .chain(parts.iter().copied())
        .collect()
}

/// `[N, 8, 8]` u8 pixels (0..16) -> `[N, 1, 32, 32]`: each pixel repeated 4x4, over 16.
fn upscale(x: &[u8], n: usize) -> ArrayD<f32> {
    Array4::from_shape_fn((n, 1, 32, 32), |(i, _, h, w)| {
        x[i * 64 + (h / 4) * 8 + w / 4] as f32 / 16.0
    })
    .into_dyn()
}

fn argmax(logits: &ArrayD<f32>) -> Vec<usize> {
    logits
        .outer_iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0
        })
        .collect()
}

fn share(a: &[usize], b: &[usize]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

#[test]
fn digits_top1_through_ptq_and_onnxruntime_agree() {
    let bytes = std::fs::read(root(&["examples", "data", "digits.safetensors"])).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let u8s = |k: &str| st.tensor(k).unwrap().data().to_vec();
    let (train_x, test_x) = (u8s("train_x"), u8s("test_x"));
    let labels: Vec<usize> = u8s("test_y").iter().map(|&v| v as usize).collect();
    let n_test = labels.len();
    assert_eq!(n_test, 500);
    let calib = upscale(&train_x[..128 * 64], 128);
    let test = upscale(&test_x, n_test);

    let imp = load_onnx(root(&["tests", "fixtures", "onnx", "digits_res_ts13.onnx"])).unwrap();
    let groups = find_fusable(&imp.graph);
    let refs: Vec<Vec<&str>> = groups
        .iter()
        .map(|g| g.iter().map(String::as_str).collect())
        .collect();
    let slices: Vec<&[&str]> = refs.iter().map(Vec::as_slice).collect();
    let float = fuse(&imp.graph, &slices).unwrap();
    let fx = read_safetensors(root(&[
        "tests",
        "fixtures",
        "onnx",
        "digits_res_ort.safetensors",
    ]))
    .unwrap();
    let quantize = |map: QConfigMap| {
        let mut p = prepare(float.clone(), &map).unwrap();
        calibrate(
            &mut p,
            calib
                .axis_chunks_iter(Axis(0), 32)
                .map(|b| b.to_owned())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        convert(p).unwrap()
    };
    // the QDQ file's activation qparams, by ptq node name
    let act: Vec<(&str, f32, i32)> = fx
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("act.")?, v[[0]], v[[1]] as i32)))
        .collect();
    assert!(act.len() >= 10, "{} activations in the fixture", act.len());
    let mut pinned = QConfigMap::new(QConfig::onnxruntime());
    for &(name, s, z) in &act {
        assert!(float.find(name).is_some(), "fixture names node `{name}`");
        pinned = pinned.set_name(
            name,
            Some(QConfig {
                activation: ObserverSpec::fixed(s, z, DType::QUInt8),
                ..QConfig::onnxruntime()
            }),
        );
    }
    let q = quantize(pinned);
    // the preset's own calibration lands on (nearly) the same qparams
    let calibrated = quantize(QConfigMap::new(QConfig::onnxruntime()));
    let mut checked = 0;
    for &(name, s, z) in &act {
        // a graph input stays float; its quantize border carries the qparams
        let Some(pin) = q.output_qparams(name).unwrap() else {
            println!("{name}: no int8 output");
            continue;
        };
        assert_eq!((pin.scale(), pin.zero_point()), (s, z), "{name}");
        checked += 1;
        if let Ok(Some(own)) = calibrated.output_qparams(name) {
            assert!(
                (own.scale() - s).abs() <= 1e-5 * s && (own.zero_point() - z).abs() <= 1,
                "{name}: calibrated ({}, {}) vs QDQ file ({s}, {z})",
                own.scale(),
                own.zero_point()
            );
        }
    }
    assert!(
        checked + 1 >= act.len(),
        "{checked} of {} pinned",
        act.len()
    );
    let x = std::slice::from_ref(&test);
    let y_float = float.forward(x).unwrap().remove(0);
    let y_int8 = q.forward(x).unwrap().remove(0);
    assert_eq!(y_int8.shape(), &[n_test, 10]);
    let to_usize = |a: &ArrayD<f32>| a.iter().map(|&v| v as usize).collect::<Vec<_>>();
    let (ort_float, ort_int8) = (to_usize(&fx["float_pred"]), to_usize(&fx["int8_pred"]));
    assert!(fx["int8_ops"][[0]] >= 8.0);
    assert_eq!(
        fx["float_ops"][[0]],
        0.0,
        "ORT ran every conv / gemm in int8"
    );

    let (pf, pi) = (argmax(&y_float), argmax(&y_int8));
    let acc = |p: &[usize]| share(p, &labels);
    // int8 output values against ORT's
    let (scale, zp) = (fx["scale"][[0]], fx["zero_point"][[0]]);
    let q_ort = fx["int8_q"]
        .view()
        .into_shape_with_order(IxDyn(&[n_test, 10]))
        .unwrap();
    let (mut same, mut max_lsb) = (0usize, 0f32);
    for (&v, &qo) in y_int8.iter().zip(q_ort.iter()) {
        let qv = (v / scale).round_ties_even() + zp;
        assert_eq!(
            ((qv - zp) * scale).to_bits(),
            v.to_bits(),
            "same output scale"
        );
        same += (qv == qo) as usize;
        max_lsb = max_lsb.max((qv - qo).abs());
    }
    println!(
        "top-1 on {n_test} held-out digits: float {:.4} (ORT float {:.4}), ptq int8 {:.4}, \
         ORT int8 {:.4}; ptq/ORT int8 top-1 agreement {:.4}; int8 logits identical {same} of {} \
         (max {max_lsb} LSB); float/ptq-int8 agreement {:.4}",
        acc(&pf),
        acc(&ort_float),
        acc(&pi),
        acc(&ort_int8),
        share(&pi, &ort_int8),
        y_int8.len(),
        share(&pf, &pi),
    );
    // ptq's float graph predicts as ORT's float session
    assert!(share(&pf, &ort_float) >= 0.998);
    assert!(acc(&pf) >= 0.95, "a trained model");
    assert!(acc(&pi) >= acc(&pf) - 0.01, "int8 within 1 point of float");
    // the issue asks >= 99% identical values (max 1 LSB) and top-1 agreement; with ORT's
    // arithmetic (int32 bias, QLinearAdd) every logit is identical
    assert_eq!(same, y_int8.len(), "max {max_lsb} LSB");
    assert_eq!(pi, ort_int8);
}
