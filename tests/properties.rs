//! Properties of the quantization arithmetic and the observers, over random data.

mod common;

use ndarray::{Array1, Array3, ArrayD, Axis};
use proptest::prelude::*;
use ptq::qconfig::ObserverSpec;
use ptq::{dequantize, quantize, DType, QParams, QScheme};

/// Unit roundoff of f32.
const U: f32 = f32::EPSILON / 2.0;

/// The per-tensor specs the properties run over (every dtype/scheme/range family).
fn specs() -> Vec<ObserverSpec> {
    vec![
        ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine),
        ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine).with_reduce_range(true),
        ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine).with_range(0, 127),
        ObserverSpec::min_max(DType::QInt8, QScheme::PerTensorAffine),
        ObserverSpec::min_max(DType::QInt8, QScheme::PerTensorSymmetric),
        ObserverSpec::min_max(DType::QInt8, QScheme::PerTensorSymmetric).with_reduce_range(true),
        ObserverSpec::min_max(DType::QInt8, QScheme::PerTensorSymmetric)
            .with_range(-127, 127)
            .with_eps(2f32.powi(-12)),
        ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorSymmetric),
        ObserverSpec::moving_average(DType::QUInt8, QScheme::PerTensorAffine),
    ]
}

/// Finite values of widely varying magnitude (1e-6 .. 1e6), or a narrow cluster.
fn values() -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![
        prop::collection::vec(-1.0e6f32..1.0e6, 1..200),
        prop::collection::vec(-1.0f32..1.0, 1..200),
        (1e-6f32..10.0, prop::collection::vec(-1.0f32..1.0, 1..100))
            .prop_map(|(s, v)| v.into_iter().map(|x| x * s).collect()),
        (
            -100.0f32..100.0,
            prop::collection::vec(0.0f32..1e-3, 1..100)
        )
            .prop_map(|(o, v)| v.into_iter().map(|x| x + o).collect()),
    ]
}

fn observed(spec: &ObserverSpec, xs: &[f32]) -> (QParams, f32, f32) {
    let mut obs = spec.build().unwrap();
    obs.observe(Array1::from(xs.to_vec()).into_dyn().view())
        .unwrap();
    let (lo, hi) = obs.observed_range().unwrap();
    (obs.qparams().unwrap(), lo, hi)
}

proptest! {
    #![proptest_config(common::proptest_config(256))]

    /// Round-trip error inside the observed range is at most scale/2, plus float slack.
    ///
    /// Slack, derived: `inv = fl(1/s) = (1/s)(1+d0)` and `t = fl(x*inv) = (x/s)(1+d0)(1+d1)`
    /// with |d| <= u, so |t - x/s| <= |x/s|(2u + u^2); rounding adds at most 1/2 step; the
    /// dequantizing product `fl(k*s)` adds |k|*s*u <= (|x| + s)u. Together that is
    /// s/2 + 4u(|x| + s). The scale itself is rounded (relative error u), so the range's
    /// far edge can land up to levels*u steps past quant_max and be clamped: a further
    /// 4u*s*levels. In all |x - x'| <= s/2 + 4u(|x| + s) + 4u*s*(quant_max - quant_min).
    #[test]
    fn round_trip_error_is_at_most_half_a_step(xs in values(), which in 0usize..9) {
        let spec = specs()[which];
        let (qp, lo, hi) = observed(&spec, &xs);
        let x = Array1::from(xs.clone());
        let back = dequantize(&quantize(&x, &qp).unwrap(), &qp).unwrap();
        let s = qp.scale();
        for (&a, &b) in x.iter().zip(back.iter()) {
            if a < lo || a > hi { continue; } // moving averages can lag the data
            let bound = s / 2.0 + 4.0 * U * (a.abs() + s) + 4.0 * U * s * (qp.quant_max() - qp.quant_min()) as f32;
            prop_assert!((a - b).abs() <= bound, "x={a:e} back={b:e} scale={s:e} bound={bound:e}");
        }
    }

    /// Zero is always exactly representable (the observed range is widened to contain it).
    #[test]
    fn zero_is_exact(xs in values(), which in 0usize..9) {
        let spec = specs()[which];
        let (qp, _, _) = observed(&spec, &xs);
        let z = Array1::from(vec![0.0f32, -0.0]);
        let back = dequantize(&quantize(&z, &qp).unwrap(), &qp).unwrap();
        prop_assert_eq!(back[0], 0.0);
        prop_assert_eq!(back[1], 0.0);
    }

    /// Values beyond the representable range saturate to quant_min / quant_max.
    #[test]
    fn out_of_range_saturates(xs in values(), which in 0usize..9, k in 2.0f32..1e6) {
        let spec = specs()[which];
        let (qp, lo, hi) = observed(&spec, &xs);
        let s = qp.scale();
        let far = lo.abs().max(hi.abs()) + s * 300.0;
        let x = Array1::from(vec![far * k, -far * k, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN]);
        let q = quantize(&x, &qp).unwrap();
        prop_assert_eq!(q.to_vec(), vec![qp.quant_max(), qp.quant_min(), qp.quant_max(), qp.quant_min(), qp.quant_max(), qp.quant_min()]);
    }

    /// Quantization is monotone: x <= y implies q(x) <= q(y).
    #[test]
    fn quantize_is_monotone(mut xs in values(), which in 0usize..9, probe in values()) {
        let spec = specs()[which];
        let (qp, _, _) = observed(&spec, &xs);
        xs.extend(probe);
        xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let q = quantize(&Array1::from(xs), &qp).unwrap();
        for w in q.as_slice().unwrap().windows(2) {
            prop_assert!(w[0] <= w[1]);
        }
    }

    /// Per-channel quantization (and observation) equals per-tensor quantization
    /// (and observation) applied channel by channel.
    #[test]
    fn per_channel_equals_per_tensor_channel_by_channel(
        data in prop::collection::vec(-50.0f32..50.0, 60),
        axis in 0usize..3,
        symmetric in any::<bool>(),
    ) {
        let x = Array3::from_shape_vec((3, 4, 5), data).unwrap().into_dyn();
        let (pc, pt) = if symmetric {
            (QScheme::PerChannelSymmetric { axis }, QScheme::PerTensorSymmetric)
        } else {
            (QScheme::PerChannelAffine { axis }, QScheme::PerTensorAffine)
        };
        let mut obs = ObserverSpec::min_max(DType::QInt8, pc).build().unwrap();
        obs.observe(x.view()).unwrap();
        let qp = obs.qparams().unwrap();
        let q = quantize(&x, &qp).unwrap();
        for (c, slice) in x.axis_iter(Axis(axis)).enumerate() {
            let mut one = ObserverSpec::min_max(DType::QInt8, pt).build().unwrap();
            one.observe(slice.view()).unwrap();
            let qpc = one.qparams().unwrap();
            prop_assert_eq!(qpc.scale().to_bits(), qp.scales()[c].to_bits());
            prop_assert_eq!(qpc.zero_point(), qp.zero_points()[c]);
            let qc = quantize(&slice, &qpc).unwrap();
            prop_assert_eq!(qc, q.index_axis(Axis(axis), c).to_owned());
        }
    }

    /// Merging observers that saw two halves equals one observer that saw everything,
    /// exactly, for the min/max observers (per tensor and per channel).
    #[test]
    fn merge_equals_observing_the_concatenation(
        a in prop::collection::vec(-1e3f32..1e3, 0..64),
        b in prop::collection::vec(-1e3f32..1e3, 0..64),
        per_channel in any::<bool>(),
    ) {
        let spec = if per_channel {
            ObserverSpec::min_max(DType::QInt8, QScheme::PerChannelSymmetric { axis: 1 })
        } else {
            ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine)
        };
        let shape = |v: &Vec<f32>| ArrayD::from_shape_vec(vec![v.len() / 4, 4], v[..v.len() / 4 * 4].to_vec()).unwrap();
        let (xa, xb) = (shape(&a), shape(&b));
        let mut whole = spec.build().unwrap();
        whole.observe(xa.view()).unwrap();
        whole.observe(xb.view()).unwrap();
        let mut left = spec.build().unwrap();
        let mut right = left.fresh();
        left.observe(xa.view()).unwrap();
        right.observe(xb.view()).unwrap();
        left.merge(right.as_ref()).unwrap();
        prop_assert_eq!(left.is_calibrated(), whole.is_calibrated());
        prop_assert_eq!(left.observed_range(), whole.observed_range());
        if whole.is_calibrated() {
            prop_assert_eq!(left.qparams().unwrap(), whole.qparams().unwrap());
        }
    }
}
