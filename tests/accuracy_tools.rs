//! Accuracy tools: SQNR figures against hand-computed values, the clipping observers,
//! cross-layer equalization and bias correction, sensitivity analysis and the automatic
//! mixed-precision search, on small built-in models and the digits CNN.

#[path = "../examples/common/digits.rs"]
mod digits;

use ndarray::{array, Array, Array1, Array2, Array4, ArrayD, IxDyn};
use ptq::analysis::{
    auto_mixed_precision, correct_bias, equalize, range_spread, sensitivity, sqnr, weight_sqnr,
    MixedPrecisionOptions,
};
use ptq::nn::{Conv2d, Layer, Linear, Pool2d, PoolKind, Sequential};
use ptq::observer::{EntropyObserver, MseObserver, Observer, PercentileObserver};
use ptq::qconfig::{ObserverSpec, QConfig, QConfigMap};
use ptq::workflow::quantize_model;
use ptq::{DType, QScheme, QuantError, RangeConfig};

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    a.iter()
        .zip(b.iter())
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn sqnr_matches_hand_computed_values() {
    let x = array![1.0f32, 2.0, 3.0].into_dyn();
    let y = array![1.0f32, 2.0, 2.5].into_dyn();
    // signal 1 + 4 + 9 = 14, noise 0.5^2 = 0.25: 10 log10(56).
    assert!((sqnr(&x, &y).unwrap() - 10.0 * 56f64.log10()).abs() < 1e-9);
    assert_eq!(sqnr(&x, &x).unwrap(), f64::INFINITY);
    assert!(matches!(
        sqnr(&x, &array![1.0f32].into_dyn()),
        Err(QuantError::ShapeMismatch { .. })
    ));
}

#[test]
fn weight_sqnr_matches_hand_computed_quantization() {
    // Per-tensor symmetric qint8: scale = 1.0 / 127.5. w / scale = 127.5, 63.75, -31.875,
    // 38.25 -> round half even and clamp to [-128, 127]: 127, 64, -32, 38.
    let w = array![[1.0f32, 0.5], [-0.25, 0.3]];
    let model = Sequential::new().push("fc", Layer::Linear(Linear::new(w.clone(), None).unwrap()));
    let map = QConfigMap::new(QConfig::minmax_per_tensor());
    let report = weight_sqnr(&model, &map).unwrap();
    let row = report.get("fc").unwrap();
    let s = 1.0f64 / 127.5;
    let q = [127.0, 64.0, -32.0, 38.0];
    let wf: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let signal: f64 = wf.iter().map(|v| v * v).sum();
    let noise: f64 = wf.iter().zip(q).map(|(v, q)| (v - q * s).powi(2)).sum();
    let want = 10.0 * (signal / noise).log10();
    assert!(
        (row.sqnr_db - want).abs() < 1e-3,
        "{} vs {want}",
        row.sqnr_db
    );
    // Worst channel: row 1, [-0.25, 0.3] against [-32, 38] * s.
    let (s1, n1) = (
        0.25f64.powi(2) + 0.3f64.powi(2),
        (0.25 - 32.0 * s).powi(2) + (0.3 - 38.0 * s).powi(2),
    );
    let want1 = 10.0 * (s1 / n1).log10();
    let worst = row.worst_channel_sqnr_db.unwrap();
    assert!((worst - want1).abs() < 1e-3, "{worst} vs {want1}");
}

fn u8_cfg() -> RangeConfig {
    RangeConfig::new(
        DType::QUInt8,
        QScheme::PerTensorAffine,
        false,
        None,
        f32::EPSILON,
    )
    .unwrap()
}

fn clip_observers() -> Vec<Box<dyn Observer>> {
    vec![
        Box::new(PercentileObserver::new(u8_cfg(), 99.9, 2048).unwrap()),
        Box::new(EntropyObserver::new(u8_cfg(), 2048).unwrap()),
        Box::new(MseObserver::new(u8_cfg(), 2048).unwrap()),
    ]
}

#[test]
fn clipping_observers_clip_outliers_refuse_misuse_and_merge() {
    // With 2048 bins and 256 levels, the histogram observers clip to at least 1/8 of the
    // observed range: an outlier at 20 leaves room to clip to about 1.
    let mut x = Array::linspace(0.0f32, 1.0, 20_000);
    x[5] = 20.0;
    for mut obs in clip_observers() {
        assert!(matches!(
            obs.qparams(),
            Err(QuantError::Uncalibrated { .. })
        ));
        obs.observe(x.view().into_dyn()).unwrap();
        let qp = obs.qparams().unwrap();
        let clip = (qp.quant_max() - qp.zero_point()) as f32 * qp.scale();
        if obs.kind() == "MseObserver" {
            // One value at 20 among 20 000 in [0, 1]: clipping it costs 19^2 = 361, more
            // than the coarser steps of the full range (20 000 * (20 / 255)^2 / 12 = 10):
            // the MSE observer keeps it, as it should.
            assert!(clip > 19.0, "{}: clip {clip}", obs.kind());
        } else {
            assert!(clip < 5.0, "{}: clip {clip}", obs.kind());
            assert!(clip > 0.5, "{}: clip {clip}", obs.kind());
        }
        assert_eq!(obs.observed_range(), Some((0.0, 20.0)));
        // Merging two halves on the same final range equals one stream.
        let (a, b) = (
            x.slice(ndarray::s![..10_000]),
            x.slice(ndarray::s![10_000..]),
        );
        let mut left = obs.fresh();
        let mut right = obs.fresh();
        left.observe(x.view().into_dyn()).unwrap();
        right.observe(x.view().into_dyn()).unwrap();
        left.merge(right.as_ref()).unwrap();
        let mut one = obs.fresh();
        one.observe(x.view().into_dyn()).unwrap();
        one.observe(x.view().into_dyn()).unwrap();
        assert_eq!(
            left.qparams().unwrap(),
            one.qparams().unwrap(),
            "{}",
            obs.kind()
        );
        // Halves with different ranges: mass is kept, the result stays close.
        let mut l2 = obs.fresh();
        let mut r2 = obs.fresh();
        l2.observe(a.into_dyn()).unwrap();
        r2.observe(b.into_dyn()).unwrap();
        l2.merge(r2.as_ref()).unwrap();
        assert_eq!(l2.observed_range(), Some((0.0, 20.0)));
        let q2 = l2.qparams().unwrap();
        assert!(
            (q2.scale() / qp.scale() - 1.0).abs() < 0.25,
            "{}",
            obs.kind()
        );
        // Another kind refuses to merge.
        let other = ptq::observer::MinMaxObserver::default();
        assert!(matches!(
            obs.merge(&other),
            Err(QuantError::ObserverMismatch { .. })
        ));
        // NaN is refused.
        let bad = array![1.0f32, f32::NAN].into_dyn();
        assert!(matches!(
            obs.observe(bad.view()),
            Err(QuantError::NonFinite { .. })
        ));
        obs.reset();
        assert!(!obs.is_calibrated());
    }
    let per_channel = ObserverSpec::entropy(DType::QInt8, QScheme::PerChannelSymmetric { axis: 0 });
    assert!(per_channel.build().is_err());
    assert!(
        ObserverSpec::percentile(DType::QUInt8, QScheme::PerTensorAffine, 10.0)
            .build()
            .is_err()
    );
}

#[test]
fn the_mse_observer_has_the_least_real_squared_error_on_a_long_tail() {
    let x = Array::from_shape_fn(50_000, |i| {
        let u = (i as f32 + 0.5) / 50_000.0;
        -(1.0 - u).ln() * if i % 2 == 0 { 1.0 } else { -1.0 }
    })
    .into_dyn();
    let mse_of = |mut obs: Box<dyn Observer>| {
        obs.observe(x.view()).unwrap();
        let qp = obs.qparams().unwrap();
        let y = ptq::fake_quantize(&x, &qp).unwrap();
        x.iter()
            .zip(y.iter())
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / x.len() as f64
    };
    let cfg = u8_cfg();
    let mse = mse_of(Box::new(MseObserver::new(cfg, 2048).unwrap()));
    let minmax = mse_of(Box::new(ptq::observer::MinMaxObserver::new(cfg).unwrap()));
    let pct = mse_of(Box::new(PercentileObserver::new(cfg, 99.99, 2048).unwrap()));
    let ent = mse_of(Box::new(EntropyObserver::new(cfg, 2048).unwrap()));
    assert!(mse < 0.95 * minmax, "mse {mse} vs min/max {minmax}");
    assert!(
        mse <= 1.02 * pct.min(ent),
        "mse {mse} vs percentile {pct}, entropy {ent}"
    );
}

#[test]
fn percentile_100_is_the_min_max_range() {
    let x = Array::linspace(-2.0f32, 6.0, 4001).into_dyn();
    let mut p = PercentileObserver::new(u8_cfg(), 100.0, 2048).unwrap();
    p.observe(x.view()).unwrap();
    let (lo, hi) = p.clip_range().unwrap();
    assert!(
        (lo + 2.0).abs() < 1e-4 && (hi - 6.0).abs() < 1e-4,
        "{lo} {hi}"
    );
}

#[test]
fn the_new_observers_quantize_the_digits_cnn() {
    let (train, test) = digits::load_data().unwrap();
    let batches = digits::calibration_batches(&train, 4, 64);
    let float = digits::trained_fused().unwrap();
    let float_acc = digits::accuracy(&float.forward(&test.images).unwrap(), &test.labels);
    for act in [
        ObserverSpec::percentile(DType::QUInt8, QScheme::PerTensorAffine, 99.99),
        ObserverSpec::entropy(DType::QUInt8, QScheme::PerTensorAffine),
        ObserverSpec::mse(DType::QUInt8, QScheme::PerTensorAffine),
    ] {
        let qc = QConfig {
            activation: act.with_reduce_range(true),
            ..QConfig::fbgemm()
        };
        let int8 = quantize_model(float.clone(), &QConfigMap::new(qc), &batches).unwrap();
        let acc = digits::accuracy(&int8.forward(&test.images).unwrap(), &test.labels);
        assert!(
            acc >= float_acc - 0.02,
            "{:?}: {acc} vs {float_acc}",
            act.kind
        );
    }
}

#[test]
fn equalization_keeps_the_function_and_equalizes_ranges() {
    let original = digits::trained_fused().unwrap();
    let model = digits::unequal_ranges(&original);
    let (_, test) = digits::load_data().unwrap();
    let y = model.forward(&test.images).unwrap();
    let y0 = original.forward(&test.images).unwrap();
    let scale = y0.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(max_abs_diff(&y, &y0) < 1e-4 * scale);
    let (eq, report) = equalize(&model, 50).unwrap();
    assert!(max_abs_diff(&eq.forward(&test.images).unwrap(), &y0) < 1e-4 * scale);
    let names: Vec<(&str, &str)> = report
        .pairs
        .iter()
        .map(|p| (p.first.as_str(), p.second.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("conv1", "conv2"),
            ("conv2", "conv3"),
            ("conv3", "fc1"),
            ("fc1", "fc2")
        ]
    );
    for p in &report.pairs {
        assert!(range_spread(&p.first_ranges_before) > 1000.0);
        // After: both sides of every channel agree (the last sweep's pair exactly, the
        // others up to the convergence tolerance).
        for (a, b) in p.first_ranges_after.iter().zip(&p.second_ranges_after) {
            assert!((a / b - 1.0).abs() < 1e-2, "{}: {a} vs {b}", p.first);
        }
        assert!(range_spread(&p.first_ranges_after) < 10.0, "{}", p.first);
    }
    // Equalization is blind to the rescaling: it gives the same model from both.
    let (eq0, _) = equalize(&original, 50).unwrap();
    let (w_a, w_b) = match (eq.get("conv2").unwrap(), eq0.get("conv2").unwrap()) {
        (Layer::ConvReLU2d(a), Layer::ConvReLU2d(b)) => (a.weight.clone(), b.weight.clone()),
        _ => unreachable!(),
    };
    let rel = max_abs_diff(&w_a.into_dyn(), &w_b.clone().into_dyn())
        / w_b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(rel < 1e-3, "{rel}");
    println!("{report}");
}

#[test]
fn equalization_handles_flatten_pools_and_depthwise_and_skips_what_does_not_commute() {
    let mut seed = 7;
    let conv = |o: usize, i: usize, g: usize, seed: &mut u64| {
        Conv2d::new(
            Array4::from_shape_fn((o, i / g, 3, 3), |(oc, _, _, _)| {
                lcg(seed) * 10f32.powi(oc as i32 % 3 - 1)
            }),
            Some(Array1::from_shape_fn(o, |_| lcg(seed))),
        )
        .unwrap()
    };
    let mut dw = conv(6, 6, 6, &mut seed).with_padding(1, 1);
    dw.groups = 6;
    let model = Sequential::new()
        .push(
            "c1",
            Layer::ConvReLU2d(conv(6, 3, 1, &mut seed).with_padding(1, 1)),
        )
        .push("dw", Layer::ConvReLU2d(dw))
        .push("pool", Layer::Pool2d(Pool2d::new(PoolKind::Max, 2, 2)))
        .push("c2", Layer::Conv2d(conv(4, 6, 1, &mut seed)))
        .push("relu", Layer::ReLU)
        .push("flat", Layer::Flatten { start_dim: 1 })
        .push(
            "fc",
            Layer::Linear(
                Linear::new(
                    Array2::from_shape_fn((5, 4), |_| lcg(&mut seed)),
                    Some(Array1::zeros(5)),
                )
                .unwrap(),
            ),
        )
        .push("relu6", Layer::ReLU6)
        .push(
            "fc2",
            Layer::Linear(
                Linear::new(Array2::from_shape_fn((2, 5), |_| lcg(&mut seed)), None).unwrap(),
            ),
        );
    let x = ArrayD::from_shape_fn(IxDyn(&[3, 3, 6, 6]), |_| lcg(&mut seed));
    let (eq, report) = equalize(&model, 30).unwrap();
    let (a, b) = (model.forward(&x).unwrap(), eq.forward(&x).unwrap());
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(
        max_abs_diff(&a, &b) < 1e-4 * scale,
        "{}",
        max_abs_diff(&a, &b)
    );
    assert_eq!(report.pairs.len(), 3); // c1 -> dw, dw -> c2, c2 -> fc (through flatten)
    assert_eq!(report.skipped.len(), 1);
    // (first, the node where the chain stopped, why): the ReLU6 (a clamp) stops fc's chain.
    assert_eq!(
        (report.skipped[0].0.as_str(), report.skipped[0].1.as_str()),
        ("fc", "relu6")
    );
    assert!(report.skipped[0].2.contains("ReLU6"));
    assert!(matches!(
        equalize(&model, 0),
        Err(QuantError::UnsupportedConfig { .. })
    ));
}

#[test]
fn unequal_ranges_break_the_default_flow_and_equalization_restores_it() {
    let (train, test) = digits::load_data().unwrap();
    let calib = digits::calibration_batches(&train, 8, 64);
    let model = digits::unequal_ranges(&digits::trained_fused().unwrap());
    let float_acc = digits::accuracy(&model.forward(&test.images).unwrap(), &test.labels);
    let map = QConfigMap::new(QConfig::qnnpack());
    let default = quantize_model(model.clone(), &map, &calib).unwrap();
    let default_acc = digits::accuracy(&default.forward(&test.images).unwrap(), &test.labels);
    assert!(float_acc > 0.98);
    assert!(default_acc < 0.5 * float_acc, "default flow {default_acc}");
    let (eq, _) = equalize(&model, 20).unwrap();
    let int8 = quantize_model(eq, &map, &calib).unwrap();
    let eq_acc = digits::accuracy(&int8.forward(&test.images).unwrap(), &test.labels);
    assert!(
        eq_acc >= float_acc - 0.01,
        "equalized {eq_acc} vs float {float_acc}"
    );
}

/// A model where exactly one layer breaks under per-tensor weights: `fc_b` has a huge
/// weight on an input that is always 0 (so the float function does not see it), which
/// makes its per-tensor scale round every other weight to 0.
fn one_bad_layer() -> (Sequential, Vec<ArrayD<f32>>) {
    let mut seed = 11;
    let mut wa = Array2::from_shape_fn((8, 8), |_| lcg(&mut seed));
    wa.row_mut(0).fill(0.0);
    let mut ba = Array1::from_shape_fn(8, |_| lcg(&mut seed).abs());
    ba[0] = 0.0;
    let mut wb = Array2::from_shape_fn((8, 8), |_| lcg(&mut seed));
    wb.column_mut(0).fill(1000.0);
    let wc = Array2::from_shape_fn((6, 8), |_| lcg(&mut seed));
    let model = Sequential::new()
        .push("quant", Layer::QuantStub)
        .push(
            "fc_a",
            Layer::LinearReLU(Linear::new(wa, Some(ba)).unwrap()),
        )
        .push(
            "fc_b",
            Layer::LinearReLU(Linear::new(wb, Some(Array1::zeros(8))).unwrap()),
        )
        .push("fc_c", Layer::Linear(Linear::new(wc, None).unwrap()))
        .push("dequant", Layer::DeQuantStub);
    let data = (0..4)
        .map(|_| ArrayD::from_shape_fn(IxDyn(&[64, 8]), |_| lcg(&mut seed)))
        .collect();
    (model, data)
}

/// Fraction of rows whose argmax agrees with the float model's.
fn agreement(reference: &[ArrayD<f32>]) -> impl FnMut(&[ArrayD<f32>]) -> f64 + '_ {
    move |outs: &[ArrayD<f32>]| {
        let argmax = |r: ndarray::ArrayView1<'_, f32>| {
            r.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0
        };
        let (mut same, mut n) = (0usize, 0usize);
        for (o, r) in outs.iter().zip(reference) {
            let o2 = o.view().into_dimensionality::<ndarray::Ix2>().unwrap();
            let r2 = r.view().into_dimensionality::<ndarray::Ix2>().unwrap();
            for (a, b) in o2.outer_iter().zip(r2.outer_iter()) {
                same += usize::from(argmax(a) == argmax(b));
                n += 1;
            }
        }
        same as f64 / n as f64
    }
}

#[test]
fn sensitivity_ranks_the_one_bad_layer_first() {
    let (model, data) = one_bad_layer();
    let reference: Vec<ArrayD<f32>> = data.iter().map(|x| model.forward(x).unwrap()).collect();
    let report = sensitivity(
        &model,
        QConfig::minmax_per_tensor(),
        &data,
        &data,
        agreement(&reference),
    )
    .unwrap();
    println!("{report}");
    assert_eq!(report.float_metric, 1.0);
    assert!(report.int8_metric < 0.8, "{}", report.int8_metric);
    assert_eq!(report.ranking()[0], "fc_b");
    let b = report.get("fc_b").unwrap();
    assert!(b.only_float >= 0.95 && b.only_int8 < 0.8, "{b:?}");
    for other in ["fc_a", "fc_c"] {
        assert!(report.get(other).unwrap().only_int8 >= 0.95);
    }
    assert_eq!(report.evaluations, 7);
    let table = report.to_string();
    assert!(table.contains("only float") && table.contains("fc_b"));
    // Bad input is a typed error.
    let none: Vec<ArrayD<f32>> = Vec::new();
    assert!(matches!(
        sensitivity(&model, QConfig::minmax_per_tensor(), &data, &none, |_| 0.0),
        Err(QuantError::EmptyCalibration { .. })
    ));
}

#[test]
fn the_automatic_search_keeps_exactly_the_bad_layer_in_float() {
    let (model, data) = one_bad_layer();
    let reference: Vec<ArrayD<f32>> = data.iter().map(|x| model.forward(x).unwrap()).collect();
    let options = MixedPrecisionOptions {
        allowed_drop: 0.05,
        try_equalization: false,
        try_bias_correction: false,
        ..Default::default()
    };
    let found = auto_mixed_precision(
        &model,
        QConfig::minmax_per_tensor(),
        &data,
        &data,
        agreement(&reference),
        &options,
    )
    .unwrap();
    println!("{found}");
    assert!(found.target_met);
    assert_eq!(found.float_layers, ["fc_b"]);
    assert!(found.metric >= 0.95);
    // all int8, three single-layer sensitivities; the first ranked layer meets the target.
    assert_eq!(found.steps.len(), 4);
    // The returned model is the one measured.
    let outs: Vec<ArrayD<f32>> = data
        .iter()
        .map(|x| found.model.forward(x).unwrap())
        .collect();
    assert_eq!(agreement(&reference)(&outs), found.metric);
    assert!(matches!(
        auto_mixed_precision(
            &model,
            QConfig::minmax_per_tensor(),
            &data,
            &data,
            |_| 0.0,
            &MixedPrecisionOptions {
                allowed_drop: -1.0,
                ..Default::default()
            }
        ),
        Err(QuantError::UnsupportedConfig { .. })
    ));
}

#[test]
fn the_automatic_search_uses_equalization_when_it_helps() {
    let (train, test) = digits::load_data().unwrap();
    let calib = digits::calibration_batches(&train, 4, 64);
    let model = digits::unequal_ranges(&digits::trained_fused().unwrap());
    let eval = vec![test.images.clone()];
    let labels = test.labels.clone();
    let found = auto_mixed_precision(
        &model,
        QConfig::qnnpack(),
        &calib,
        &eval,
        |outs: &[ArrayD<f32>]| digits::accuracy(&outs[0], &labels),
        &MixedPrecisionOptions::default(),
    )
    .unwrap();
    assert!(found.target_met);
    assert!(found.float_layers.is_empty());
    assert_eq!(found.variant, "equalized");
}

#[test]
fn bias_correction_removes_the_mean_output_shift_of_quantized_weights() {
    let mut seed = 3;
    // Coarse per-tensor weights: one large weight per row makes the others round hard.
    let mut w = Array2::from_shape_fn((6, 32), |_| lcg(&mut seed) * 0.1);
    w[[0, 0]] = 3.0;
    let model = Sequential::new()
        .push("quant", Layer::QuantStub)
        .push(
            "fc",
            Layer::Linear(Linear::new(w, Some(Array1::zeros(6))).unwrap()),
        )
        .push("dequant", Layer::DeQuantStub);
    // Positive inputs with a non-zero mean, so weight errors shift the output mean.
    let data: Vec<ArrayD<f32>> = (0..4)
        .map(|_| ArrayD::from_shape_fn(IxDyn(&[128, 32]), |_| 1.0 + lcg(&mut seed) * 0.5))
        .collect();
    let map = QConfigMap::new(QConfig::minmax_per_tensor());
    let mean_shift = |m: &Sequential| -> f64 {
        let int8 = quantize_model(m.clone(), &map, &data).unwrap();
        let mut per = [0.0f64; 6];
        let mut n = 0.0;
        for x in &data {
            let (a, b) = (model.forward(x).unwrap(), int8.forward(x).unwrap());
            for (r, (ra, rb)) in a.outer_iter().zip(b.outer_iter()).enumerate() {
                let _ = r;
                for c in 0..6 {
                    per[c] += (rb[c] - ra[c]) as f64;
                }
                n += 1.0;
            }
        }
        per.iter().map(|p| (p / n).abs()).sum::<f64>()
    };
    let (corrected, shifts) = correct_bias(&model, &map, &data).unwrap();
    assert_eq!(shifts.len(), 1);
    let (before, after) = (mean_shift(&model), mean_shift(&corrected));
    assert!(after < 0.5 * before, "mean |shift| {before} -> {after}");
    let none: Vec<ArrayD<f32>> = Vec::new();
    assert!(matches!(
        correct_bias(&model, &map, &none),
        Err(QuantError::EmptyCalibration { .. })
    ));
}

#[test]
fn high_bias_absorption_keeps_the_function_on_the_data_and_shrinks_ranges() {
    let (train, test) = digits::load_data().unwrap();
    let calib = digits::calibration_batches(&train, 8, 64);
    let model = digits::unequal_ranges(&digits::trained_fused().unwrap());
    let (eq, _) = equalize(&model, 20).unwrap();
    let (abs, report) = ptq::analysis::absorb_high_bias(&eq, &calib).unwrap();
    assert!(!report.is_empty());
    let y = eq.forward(&calib[0]).unwrap();
    let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(max_abs_diff(&y, &abs.forward(&calib[0]).unwrap()) < 1e-4 * scale);
    // The first layer's outputs lose their floor: every channel's minimum on the data is 0.
    let mut mins_before = f32::INFINITY;
    let mut mins_after = f32::INFINITY;
    for (m, target) in [(&eq, &mut mins_before), (&abs, &mut mins_after)] {
        m.forward_with_hook(&calib[0], &mut |p, y| {
            if p == "fc1" {
                *target = y.iter().copied().fold(f32::INFINITY, f32::min);
            }
            Ok(())
        })
        .unwrap();
    }
    assert!(mins_after <= mins_before);
    // On the digits CNN every channel reaches 0 somewhere (blank image borders), so
    // nothing moves there; the synthetic test below has channels that never do.
    // Accuracy on the test set stays that of the float model, within a point.
    let float_acc = digits::accuracy(&model.forward(&test.images).unwrap(), &test.labels);
    let int8 = quantize_model(abs, &QConfigMap::new(QConfig::qnnpack()), &calib).unwrap();
    let acc = digits::accuracy(&int8.forward(&test.images).unwrap(), &test.labels);
    assert!(acc >= float_acc - 0.01, "{acc} vs {float_acc}");
    let none: Vec<ArrayD<f32>> = Vec::new();
    assert!(ptq::analysis::absorb_high_bias(&eq, &none).is_err());
}

#[test]
fn high_bias_absorption_moves_a_channel_floor_into_the_next_layer() {
    let mut seed = 5;
    let mut b1 = Array1::from_shape_fn(4, |_| lcg(&mut seed) * 0.1);
    b1[2] = 50.0; // channel 2 never drops below about 48
    let fc1 = Linear::new(Array2::from_shape_fn((4, 3), |_| lcg(&mut seed)), Some(b1)).unwrap();
    let fc2 = Linear::new(Array2::from_shape_fn((2, 4), |_| lcg(&mut seed)), None).unwrap();
    let model = Sequential::new()
        .push("fc1", Layer::Linear(fc1))
        .push("relu", Layer::ReLU)
        .push("fc2", Layer::Linear(fc2));
    let data = vec![ArrayD::from_shape_fn(IxDyn(&[64, 3]), |_| lcg(&mut seed))];
    let (abs, report) = ptq::analysis::absorb_high_bias(&model, &data).unwrap();
    assert_eq!(report.len(), 1);
    let c = &report[0].absorbed;
    assert!(c[2] > 45.0 && c[2] < 50.0, "{c:?}");
    let y = model.forward(&data[0]).unwrap();
    assert!(max_abs_diff(&y, &abs.forward(&data[0]).unwrap()) < 1e-3);
    // fc1's output range shrinks by the floor.
    let out = |m: &Sequential| {
        let mut hi = 0.0f32;
        m.forward_with_hook(&data[0], &mut |p, y| {
            if p == "relu" {
                hi = y.iter().copied().fold(0.0, f32::max);
            }
            Ok(())
        })
        .unwrap();
        hi
    };
    assert!(out(&abs) < out(&model) - 40.0);
}

/// Two bad layers (`fc_b`, `fc_c`) between good ones: each has a huge weight on an input
/// that is always 0, so per-tensor weights round everything else away.
fn two_bad_layers() -> (Sequential, Vec<ArrayD<f32>>) {
    let mut seed = 23;
    let mut wa = Array2::from_shape_fn((8, 8), |_| lcg(&mut seed));
    wa.row_mut(0).fill(0.0);
    let mut ba = Array1::from_shape_fn(8, |_| lcg(&mut seed).abs());
    ba[0] = 0.0;
    let bad = |seed: &mut u64| {
        let mut w = Array2::from_shape_fn((8, 8), |_| lcg(seed));
        w.column_mut(0).fill(1000.0);
        w.row_mut(0).fill(0.0); // output 0 stays 0 for the next bad layer
        let mut b = Array1::from_shape_fn(8, |_| lcg(seed).abs());
        b[0] = 0.0;
        Linear::new(w, Some(b)).unwrap()
    };
    let fc_b = bad(&mut seed);
    let fc_c = bad(&mut seed);
    let wd = Array2::from_shape_fn((6, 8), |_| lcg(&mut seed));
    let model = Sequential::new()
        .push("quant", Layer::QuantStub)
        .push(
            "fc_a",
            Layer::LinearReLU(Linear::new(wa, Some(ba)).unwrap()),
        )
        .push("fc_b", Layer::LinearReLU(fc_b))
        .push("fc_c", Layer::LinearReLU(fc_c))
        .push("fc_d", Layer::Linear(Linear::new(wd, None).unwrap()))
        .push("dequant", Layer::DeQuantStub);
    let data = (0..4)
        .map(|_| ArrayD::from_shape_fn(IxDyn(&[64, 8]), |_| lcg(&mut seed)))
        .collect();
    (model, data)
}

#[test]
fn the_search_prunes_back_to_exactly_the_two_bad_layers() {
    let (model, data) = two_bad_layers();
    let reference: Vec<ArrayD<f32>> = data.iter().map(|x| model.forward(x).unwrap()).collect();
    let options = MixedPrecisionOptions {
        allowed_drop: 0.05,
        try_equalization: false,
        try_bias_correction: false,
        ..Default::default()
    };
    let found = auto_mixed_precision(
        &model,
        QConfig::minmax_per_tensor(),
        &data,
        &data,
        agreement(&reference),
        &options,
    )
    .unwrap();
    println!("{found}");
    assert!(found.target_met);
    assert_eq!(found.float_layers, ["fc_b", "fc_c"]);
    // No single layer kept in float (nor none) meets the target, so two is the fewest;
    // greedy overshoots to four layers and the pruning pass removes fc_a and fc_d.
    for single in ["fc_a", "fc_b", "fc_c", "fc_d"] {
        let step = found
            .steps
            .iter()
            .find(|s| s.phase == "sensitivity" && s.float_layers == [single])
            .unwrap();
        assert!(!step.meets_target, "{single}");
    }
    assert!(found.steps.len() <= 1 + 3 * 4);
}

#[test]
fn activation_sqnr_matches_a_hand_computed_requantization() {
    // quant -> fc (weight [[1.0]]) -> dequant with min/max observers: quint8 0..=127
    // (reduce_range), per-tensor symmetric qint8 weights. Inputs 0.01 k + 0.003 for
    // k = 0..=126, and 1.27: input and output ranges are [0, 1.27], so both scales are
    // 0.01 with zero point 0. Input k + 0.003 quantizes to k; the weight quantizes to 127
    // with scale 1 / 127.5, so the int8 output is round(k * 127 / 127.5) = k (the factor
    // is 1 - 1/255 and k <= 127). Every output but the last is off by exactly 0.003.
    let model = Sequential::new()
        .push("quant", Layer::QuantStub)
        .push(
            "fc",
            Layer::Linear(Linear::new(array![[1.0f32]], None).unwrap()),
        )
        .push("dequant", Layer::DeQuantStub);
    let x = ArrayD::from_shape_fn(IxDyn(&[128, 1]), |i| {
        if i[0] == 127 {
            1.27f32
        } else {
            i[0] as f32 * 0.01 + 0.003
        }
    });
    let data = vec![x];
    let int8 = quantize_model(
        model.clone(),
        &QConfigMap::new(QConfig::minmax_per_tensor()),
        &data,
    )
    .unwrap();
    let report = ptq::analysis::activation_sqnr(&model, &int8, &data).unwrap();
    let fc = report.get("fc").unwrap();
    let signal: f64 = (0..127)
        .map(|k| (0.01 * k as f64 + 0.003).powi(2))
        .sum::<f64>()
        + 1.27f64.powi(2);
    let noise = 127.0 * 0.003f64.powi(2);
    let want = 10.0 * (signal / noise).log10();
    assert!((fc.sqnr_db - want).abs() < 0.01, "{} vs {want}", fc.sqnr_db);
    assert!((fc.max_abs_error - 0.003).abs() < 1e-5);
    assert_eq!(fc.elements, 128);
}

#[test]
fn sequential_tools_reach_inside_residual_blocks_and_write_back_by_path() {
    // stem -> block(conv1 -> relu -> conv2) + skip -> relu: the lowered graph's chain
    // block.conv1 -> block.conv2 is equalized and its layers bias-corrected, and the
    // results land in the Sequential's nested layers.
    let mut seed = 21;
    let conv = |o: usize, i: usize, seed: &mut u64| {
        Conv2d::new(
            Array4::from_shape_fn((o, i, 3, 3), |(oc, _, _, _)| {
                lcg(seed) * 10f32.powi(oc as i32 % 3 - 1)
            }),
            Some(Array1::from_shape_fn(o, |_| lcg(seed) * 0.1)),
        )
        .unwrap()
        .with_padding(1, 1)
    };
    let body = Sequential::new()
        .push("conv1", Layer::ConvReLU2d(conv(4, 4, &mut seed)))
        .push("conv2", Layer::Conv2d(conv(4, 4, &mut seed)));
    let model = Sequential::new()
        .push("quant", Layer::QuantStub)
        .push("stem", Layer::ConvReLU2d(conv(4, 3, &mut seed)))
        .push("block", Layer::Residual(body))
        .push("relu", Layer::ReLU)
        .push("dequant", Layer::DeQuantStub);
    let data: Vec<ArrayD<f32>> = (0..2)
        .map(|_| ArrayD::from_shape_fn(IxDyn(&[2, 3, 6, 6]), |_| lcg(&mut seed)))
        .collect();
    let weight = |m: &Sequential, path: &str| match m.get(path).unwrap() {
        Layer::Conv2d(c) | Layer::ConvReLU2d(c) => (c.weight.clone(), c.bias.clone().unwrap()),
        _ => unreachable!(),
    };

    let (eq, report) = equalize(&model, 20).unwrap();
    let pairs: Vec<(&str, &str)> = report
        .pairs
        .iter()
        .map(|p| (p.first.as_str(), p.second.as_str()))
        .collect();
    assert_eq!(pairs, [("block.conv1", "block.conv2")]);
    // stem feeds the block's body and its skip: not equalized, and said so
    assert!(report
        .skipped
        .iter()
        .any(|(a, _, why)| a == "stem" && why.contains("2 readers")));
    let p = &report.pairs[0];
    let (w1, _) = weight(&eq, "block.conv1");
    let (w1_before, _) = weight(&model, "block.conv1");
    for (o, s) in p.scales.iter().enumerate() {
        let got = w1.index_axis(ndarray::Axis(0), o).to_owned();
        let want = w1_before.index_axis(ndarray::Axis(0), o).mapv(|v| v / s);
        assert!(
            max_abs_diff(&got.into_dyn(), &want.into_dyn())
                <= 1e-6 * w1_before.iter().fold(0.0f32, |m, v| m.max(v.abs()))
        );
    }
    assert_eq!(weight(&eq, "stem").0, weight(&model, "stem").0);
    for x in &data {
        let (a, b) = (model.forward(x).unwrap(), eq.forward(x).unwrap());
        let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(max_abs_diff(&a, &b) <= 1e-5 * scale.max(1.0));
    }

    let map = QConfigMap::new(QConfig::minmax_per_tensor());
    let (corrected, shifts) = correct_bias(&model, &map, &data).unwrap();
    let paths: Vec<&str> = shifts.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["stem", "block.conv1", "block.conv2"]);
    for s in &shifts {
        let (_, before) = weight(&model, &s.path);
        let (_, after) = weight(&corrected, &s.path);
        for ((b, a), d) in before.iter().zip(after.iter()).zip(&s.shift) {
            assert_eq!(*a, b - d, "{}", s.path);
        }
    }
}
