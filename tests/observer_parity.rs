//! Replays `tests/fixtures/observers.safetensors` (written by
//! `tools/gen_observer_fixtures.py` with torch 2.15.0) and asserts that `ptq` computes
//! bit-identical observer state, scales, zero points, quantized integers, dequantized and
//! fake-quantized floats.

mod common;

use common::{assert_bits_eq, parse_desc, Fixture};
use ndarray::ArrayD;
use ptq::observer::{MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver};
use ptq::qconfig::{ObserverKind, ObserverSpec};
use ptq::{dequantize, fake_quantize, quantize, DType, QParams, QScheme};

fn dtype(s: &str) -> DType {
    match s {
        "quint8" => DType::QUInt8,
        "qint8" => DType::QInt8,
        "qint32" => DType::QInt32,
        other => panic!("dtype {other}"),
    }
}

fn scheme(s: &str, axis: usize) -> QScheme {
    match s {
        "per_tensor_affine" => QScheme::PerTensorAffine,
        "per_tensor_symmetric" => QScheme::PerTensorSymmetric,
        "per_channel_affine" => QScheme::PerChannelAffine { axis },
        "per_channel_symmetric" => QScheme::PerChannelSymmetric { axis },
        other => panic!("qscheme {other}"),
    }
}

fn spec_from(d: &std::collections::HashMap<String, String>) -> ObserverSpec {
    let axis = d.get("ch_axis").map_or(0, |a| a.parse().unwrap());
    let dt = dtype(&d["dtype"]);
    let qs = scheme(&d["qscheme"], axis);
    let mut spec = match d["observer"].as_str() {
        "MinMaxObserver" | "PerChannelMinMaxObserver" => ObserverSpec::min_max(dt, qs),
        "MovingAverageMinMaxObserver" | "MovingAveragePerChannelMinMaxObserver" => ObserverSpec {
            kind: ObserverKind::MovingAverageMinMax {
                averaging_constant: d["averaging_constant"].parse::<f64>().unwrap() as f32,
            },
            ..ObserverSpec::min_max(dt, qs)
        },
        other => panic!("observer {other}"),
    };
    spec = spec.with_reduce_range(d["reduce_range"] == "1");
    if let (Some(lo), Some(hi)) = (d.get("quant_min"), d.get("quant_max")) {
        spec = spec.with_range(lo.parse().unwrap(), hi.parse().unwrap());
    }
    if let Some(eps) = d.get("eps") {
        spec = spec.with_eps(eps.parse::<f64>().unwrap() as f32);
    }
    spec
}

/// The parameters with the dtype's full range: PyTorch's `quantize_per_tensor` /
/// `quantize_per_channel` clamp to the storage range, not to the observer's (possibly
/// reduced) `quant_min`/`quant_max`.
fn storage_range(qp: &QParams) -> QParams {
    QParams::new(
        qp.scheme(),
        qp.dtype(),
        qp.dtype().default_range(false),
        qp.scales().to_vec(),
        qp.zero_points().to_vec(),
    )
    .unwrap()
}

#[test]
fn observers_match_pytorch_bit_for_bit() {
    let fx = Fixture::load("observers.safetensors");
    let cases = fx.cases("o");
    assert!(cases.len() >= 300, "only {} observer cases", cases.len());
    let mut ints = 0usize;
    let mut floats = 0usize;
    for key in &cases {
        let d = parse_desc(&fx.meta[key]);
        let ctx = format!("{key} ({})", fx.meta[key]);
        let spec = spec_from(&d);
        let mut obs = spec.build().unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(obs.kind(), d["observer"], "{ctx}");
        let batches: usize = d["batches"].parse().unwrap();
        let xs: Vec<ArrayD<f32>> = (0..batches)
            .map(|b| fx.f32(&format!("in.{}.{b}", d["input"])))
            .collect();
        for x in &xs {
            obs.observe(x.view())
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        }

        // The observer's state.
        let stats = fx.f32(&format!("{key}.stats"));
        let (mins, maxs): (Vec<f32>, Vec<f32>) = if spec.qscheme.is_per_channel() {
            let any = obs.as_any();
            let (a, b) = if let Some(o) = any.downcast_ref::<PerChannelMinMaxObserver>() {
                o.channel_ranges().unwrap()
            } else {
                any.downcast_ref::<MovingAveragePerChannelMinMaxObserver>()
                    .unwrap()
                    .channel_ranges()
                    .unwrap()
            };
            (a.to_vec(), b.to_vec())
        } else {
            let (a, b) = obs.observed_range().unwrap();
            (vec![a], vec![b])
        };
        let row = |r: usize| stats.index_axis(ndarray::Axis(0), r).to_owned();
        assert_bits_eq(
            &ndarray::Array1::from(mins).into_dyn(),
            &row(0),
            &format!("{ctx}: min_val"),
        );
        assert_bits_eq(
            &ndarray::Array1::from(maxs).into_dyn(),
            &row(1),
            &format!("{ctx}: max_val"),
        );

        // Scales and zero points.
        let qp = obs.qparams().unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let scales = ndarray::Array1::from(qp.scales().to_vec()).into_dyn();
        assert_bits_eq(&scales, &row(2), &format!("{ctx}: scale"));
        let zps: Vec<i64> = qp.zero_points().iter().map(|&z| z as i64).collect();
        assert_eq!(
            zps,
            fx.int(&format!("{key}.zero_point"))
                .into_raw_vec_and_offset()
                .0,
            "{ctx}: zero point"
        );
        let (lo, hi) = qp.dtype().default_range(false);
        if let (Some(a), Some(b)) = (d.get("resolved_min"), d.get("resolved_max")) {
            assert_eq!(
                (qp.quant_min().to_string(), qp.quant_max().to_string()),
                (a.clone(), b.clone()),
                "{ctx}"
            );
        }
        assert!(lo <= qp.quant_min() && qp.quant_max() <= hi);

        // Every quantized integer of every batch.
        let q_all = fx.int(&format!("{key}.q"));
        let full = storage_range(&qp);
        for (b, x) in xs.iter().enumerate() {
            let ours = quantize(x, &full).unwrap().mapv(|v| v as i64);
            let theirs = q_all.index_axis(ndarray::Axis(0), b).to_owned();
            assert_eq!(ours, theirs, "{ctx}: quantized batch {b}");
            ints += ours.len();
        }
        // Fake quantization with the observer's own (possibly reduced) range.
        let fq = fake_quantize(&xs[0], &qp).unwrap();
        assert_bits_eq(
            &fq,
            &fx.f32(&format!("{key}.fq0")),
            &format!("{ctx}: fake_quantize"),
        );
        floats += fq.len();
    }
    eprintln!(
        "observer parity: {} cases, {ints} quantized integers and {floats} fake-quantized floats identical",
        cases.len()
    );
}

#[test]
fn explicit_quantize_dequantize_fake_quantize_match_pytorch() {
    let fx = Fixture::load("observers.safetensors");
    let cases = fx.cases("z");
    assert!(cases.len() >= 20, "only {} quantize cases", cases.len());
    let mut n = 0;
    let mut wraps = 0;
    for key in &cases {
        let d = parse_desc(&fx.meta[key]);
        let ctx = format!("{key} ({})", fx.meta[key]);
        let dt = dtype(&d["dtype"]);
        let scales = fx.f32(&format!("{key}.scale")).into_raw_vec_and_offset().0;
        let zps: Vec<i32> = fx
            .int(&format!("{key}.zero_point"))
            .iter()
            .map(|&z| z as i32)
            .collect();
        let scheme = match d.get("axis") {
            Some(a) => QScheme::PerChannelAffine {
                axis: a.parse().unwrap(),
            },
            None => QScheme::PerTensorAffine,
        };
        let qp = QParams::new(scheme, dt, dt.default_range(false), scales, zps).unwrap();
        let x = fx.f32(&format!("{key}.x"));
        let q = quantize(&x, &qp).unwrap();
        let theirs = fx.int(&format!("{key}.q"));
        if qp.scheme().is_per_channel() {
            assert_eq!(q.mapv(|v| v as i64), theirs, "{ctx}: quantize");
        } else {
            // PyTorch's vectorized per-tensor quantize converts x/scale to int32 before it
            // adds the zero point and clamps: where |x/scale| >= 2^31 the conversion (or the
            // addition) wraps, and e.g. -1e10 becomes 127 in qint8 with a negative zero
            // point. ptq saturates instead. Every element must either match, or be such a
            // wrap that the emulation below predicts exactly, with ptq's value saturated.
            let (qmin, qmax) = (qp.quant_min(), qp.quant_max());
            let (s, z) = (qp.scale(), qp.zero_point());
            for ((&xv, &ours), &t) in x.iter().zip(q.iter()).zip(theirs.iter()) {
                let wrapped = pytorch_avx2_quantize(xv, s, z, qmin, qmax) as i64;
                assert_eq!(
                    wrapped, t,
                    "{ctx}: the int32-wrap emulation must predict PyTorch at x={xv:e}"
                );
                if ours as i64 != t {
                    wraps += 1;
                    let saturated = if xv > 0.0 { qmax } else { qmin };
                    assert_eq!(ours, saturated, "{ctx}: x={xv:e} must saturate");
                    assert!(
                        (xv * (1.0 / s)).abs() >= 2_147_483_000.0,
                        "{ctx}: x={xv:e} is no int32 overflow"
                    );
                }
            }
        }
        let dq = dequantize(&theirs.mapv(|v| v as i32), &qp).unwrap();
        assert_bits_eq(
            &dq,
            &fx.f32(&format!("{key}.dq")),
            &format!("{ctx}: dequantize"),
        );
        if fx.has(&format!("{key}.fq")) {
            let fq = fake_quantize(&x, &qp).unwrap();
            assert_bits_eq(
                &fq,
                &fx.f32(&format!("{key}.fq")),
                &format!("{ctx}: fake_quantize"),
            );
        }
        n += x.len();
    }
    // The saturation cases hold exactly three wraps: x = -1e10, -1e38 and -inf with the
    // qint8 zero point -17 (INT32_MIN - 17 wraps to a large positive value, clamped to 127
    // by PyTorch, -128 by ptq); everything else is identical.
    assert_eq!(wraps, 3, "PyTorch int32 wraps found");
    eprintln!(
        "quantize parity: {} cases, {} values identical, {wraps} PyTorch int32 wraps where ptq saturates",
        cases.len(),
        n - wraps
    );
}

/// PyTorch's (fbgemm's `QuantizeAvx2`) per-tensor quantize, overflow included:
/// `cvtps_epi32(min(x * inv_scale, 2147483520.0))` (NaN and values below -2^31 give
/// `i32::MIN`), then a wrapping int32 add of the zero point, then the clamp.
fn pytorch_avx2_quantize(x: f32, scale: f32, zp: i32, qmin: i32, qmax: i32) -> i32 {
    let t = x * (1.0f32 / scale);
    let r = if t.is_nan() || t < -2_147_483_648.0 {
        i32::MIN
    } else {
        t.min(2_147_483_520.0).round_ties_even() as i32
    };
    r.wrapping_add(zp).clamp(qmin, qmax)
}

#[test]
fn configurations_pytorch_rejects_are_rejected() {
    let fx = Fixture::load("observers.safetensors");
    let rejected: Vec<&str> = fx.meta["rejected"].lines().collect();
    assert_eq!(rejected.len(), 8);
    for line in rejected {
        let mut parts = line.split(';');
        let observer = parts.next().unwrap();
        let d = parse_desc(&parts.collect::<Vec<_>>().join(";"));
        let dt = dtype(&d["dtype"]);
        let qs = scheme(&d["qscheme"], 0);
        let mut spec = if observer == "HistogramObserver" {
            ObserverSpec::histogram(dt, qs)
        } else {
            ObserverSpec::min_max(dt, qs)
        };
        spec = spec.with_reduce_range(d.get("reduce_range").is_some_and(|v| v == "1"));
        if let (Some(lo), Some(hi)) = (d.get("quant_min"), d.get("quant_max")) {
            spec = spec.with_range(lo.parse().unwrap(), hi.parse().unwrap());
        }
        // A per-tensor observer asked for a per-channel scheme (or the reverse) is built
        // through the concrete constructors, since specs pick the matching observer.
        let err = match observer {
            "MinMaxObserver" if qs.is_per_channel() => {
                ptq::observer::MinMaxObserver::new(spec.range_config().unwrap()).map(|_| ())
            }
            "PerChannelMinMaxObserver" if !qs.is_per_channel() => {
                PerChannelMinMaxObserver::new(spec.range_config().unwrap()).map(|_| ())
            }
            _ => spec.build().map(|_| ()),
        };
        assert!(err.is_err(), "ptq accepted what PyTorch rejects: {line}");
    }
}
