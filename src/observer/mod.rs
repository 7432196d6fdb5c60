//! Observers: they watch float tensors during calibration and turn what they saw into
//! quantization parameters, with PyTorch's semantics and names.
//!
//! | observer | PyTorch | state |
//! |---|---|---|
//! | [`MinMaxObserver`] | `MinMaxObserver` | running min and max |
//! | [`MovingAverageMinMaxObserver`] | `MovingAverageMinMaxObserver` | exponential moving average of each batch's min and max |
//! | [`PerChannelMinMaxObserver`] | `PerChannelMinMaxObserver` | running min and max per channel |
//! | [`MovingAveragePerChannelMinMaxObserver`] | `MovingAveragePerChannelMinMaxObserver` | moving averages per channel |
//! | [`HistogramObserver`] | `HistogramObserver` | 2048-bin histogram; L2-optimal clipping range |
//! | [`FixedQParamsObserver`] | `FixedQParamsObserver` | nothing: the parameters are given |
//! | [`PercentileObserver`] | (ONNX Runtime / TensorRT percentile calibration) | histogram; range holding a percentile of the values |
//! | [`EntropyObserver`] | (TensorRT / ONNX Runtime entropy calibration) | histogram; range of least KL divergence |
//! | [`MseObserver`] | (MSE-optimal clipping) | histogram; range of least expected squared error |
//! | [`OnnxRuntimeMinMaxObserver`] | (ONNX Runtime `quantize_static`, MinMax) | running min and max (per tensor or channel); ORT's float64 scale arithmetic |
//!
//! Where `ptq` differs from PyTorch, it is louder: an observer that saw nothing returns
//! [`QuantError::Uncalibrated`] instead of scale 1.0, and NaN or infinite input is a
//! [`QuantError::NonFinite`] error instead of a poisoned (or, for the histogram, silently
//! filtered) range. Empty tensors are ignored, as in PyTorch.
//!
//! # Sharded calibration
//! Every observer can [`merge`](Observer::merge) another observer built from the same
//! configuration, so calibration can run on several threads or machines, each with its own
//! observers, and be combined at the end. For the min/max observers the result equals
//! observing all the data on one observer exactly; the moving-average and histogram
//! observers document what their merge computes.

use std::any::Any;
use std::fmt::Debug;

use ndarray::ArrayViewD;

use crate::error::{QuantError, Result};
use crate::qparams::QParams;

mod clip_hist;
mod entropy;
mod fixed;
mod histogram;
mod minmax;
mod moving_average;
mod mse;
mod onnxruntime;
mod onnxruntime_hist;
mod per_channel;
mod percentile;

pub use entropy::EntropyObserver;
pub use fixed::FixedQParamsObserver;
pub use histogram::HistogramObserver;
pub use minmax::MinMaxObserver;
pub use moving_average::DEFAULT_AVERAGING_CONSTANT;
pub use moving_average::{MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver};
pub use mse::MseObserver;
pub use onnxruntime::{onnxruntime_scale_zp, OnnxRuntimeMinMaxObserver};
pub use onnxruntime_hist::{OnnxRuntimeHistMethod, OnnxRuntimeHistogramObserver};
pub use per_channel::PerChannelMinMaxObserver;
pub use percentile::PercentileObserver;

/// Something that records statistics of float tensors and derives quantization
/// parameters from them.
///
/// Observers are built fresh for every tensor they watch (see
/// [`crate::qconfig::ObserverSpec::build`]); they are `Send + Sync` so calibration can be
/// sharded over threads.
pub trait Observer: Debug + Send + Sync {
    /// PyTorch's name of the observer kind, e.g. `"MinMaxObserver"`; used in errors.
    fn kind(&self) -> &'static str;

    /// Records one batch.
    ///
    /// Empty tensors are ignored (as in PyTorch).
    ///
    /// # Errors
    /// [`QuantError::NonFinite`] if `x` holds NaN or infinity (nothing is recorded), and
    /// [`QuantError::ShapeMismatch`] for per-channel observers when `x` lacks the channel
    /// axis or has a different channel count than earlier batches.
    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()>;

    /// The quantization parameters for what was observed so far.
    ///
    /// # Errors
    /// [`QuantError::Uncalibrated`] if the observer has seen no data.
    fn qparams(&self) -> Result<QParams>;

    /// Forgets everything observed.
    fn reset(&mut self);

    /// Whether the observer has seen data (so [`Observer::qparams`] can succeed).
    fn is_calibrated(&self) -> bool;

    /// The overall `(min, max)` recorded so far (over all channels for per-channel
    /// observers), or `None` before any data. For reports; the quantization parameters
    /// may use a narrower range (the histogram observer clips outliers).
    fn observed_range(&self) -> Option<(f32, f32)>;

    /// Folds another observer of the same kind and configuration into this one.
    ///
    /// # Errors
    /// [`QuantError::ObserverMismatch`] if `other` is of another kind or configuration.
    fn merge(&mut self, other: &dyn Observer) -> Result<()>;

    /// A fresh, empty observer with the same configuration.
    fn fresh(&self) -> Box<dyn Observer>;

    /// The observer as [`Any`], so [`Observer::merge`] can check its peer's type.
    fn as_any(&self) -> &dyn Any;
}

/// Downcasts a merge peer to the concrete observer type, or explains the mismatch.
pub(crate) fn peer<'a, T: Observer + 'static>(ours: &T, other: &'a dyn Observer) -> Result<&'a T> {
    other
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| QuantError::ObserverMismatch {
            ours: ours.kind().into(),
            theirs: other.kind().into(),
            reason: "observers of different kinds cannot be merged".into(),
        })
}

/// The error for merging observers whose configurations differ.
pub(crate) fn config_mismatch(kind: &'static str, what: &str) -> QuantError {
    QuantError::ObserverMismatch {
        ours: kind.into(),
        theirs: kind.into(),
        reason: format!("their configurations differ ({what})"),
    }
}

/// The error for asking an observer that saw nothing for parameters.
pub(crate) fn uncalibrated(kind: &'static str) -> QuantError {
    QuantError::Uncalibrated {
        context: kind.into(),
    }
}

/// Minimum and maximum of a slice in one pass, and whether every value was finite.
///
/// Written as eight independent lanes so the compiler vectorizes it; `v * 0.0` is NaN
/// exactly for NaN and infinite `v`, so one extra accumulator detects them.
pub(crate) fn min_max_slice(xs: &[f32]) -> (f32, f32, bool) {
    const L: usize = 8;
    let mut mn = [f32::INFINITY; L];
    let mut mx = [f32::NEG_INFINITY; L];
    let mut poison = [0.0f32; L];
    let chunks = xs.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            let v = c[i];
            mn[i] = if v < mn[i] { v } else { mn[i] };
            mx[i] = if v > mx[i] { v } else { mx[i] };
            poison[i] += v * 0.0;
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        mn[i] = if v < mn[i] { v } else { mn[i] };
        mx[i] = if v > mx[i] { v } else { mx[i] };
        poison[i] += v * 0.0;
    }
    let lo = mn.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = mx.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (lo, hi, poison.iter().all(|p| *p == 0.0))
}

/// Minimum and maximum of a whole tensor; `Ok(None)` for an empty one.
///
/// # Errors
/// [`QuantError::NonFinite`] naming `context` if any value is NaN or infinite.
pub(crate) fn tensor_min_max(x: &ArrayViewD<'_, f32>, context: &str) -> Result<Option<(f32, f32)>> {
    if x.is_empty() {
        return Ok(None);
    }
    let (lo, hi, finite) = match x.as_slice_memory_order() {
        Some(s) => min_max_slice(s),
        None => min_max_slice(x.as_standard_layout().as_slice().unwrap_or(&[])),
    };
    if !finite {
        crate::qparams::check_finite(x, context)?;
    }
    Ok(Some((lo, hi)))
}

/// Per-channel minimum and maximum along `axis`; `Ok(None)` for an empty tensor.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if `axis` is past the tensor's rank,
/// [`QuantError::NonFinite`] if any value is NaN or infinite.
pub(crate) fn channel_min_max(
    x: &ArrayViewD<'_, f32>,
    axis: usize,
    context: &str,
) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    if axis >= x.ndim() {
        return Err(QuantError::ShapeMismatch {
            context: context.into(),
            expected: format!("a tensor with a channel axis {axis}"),
            actual: format!("shape {:?}", x.shape()),
        });
    }
    if x.is_empty() {
        return Ok(None);
    }
    let channels = x.shape()[axis];
    let outer: usize = x.shape()[..axis].iter().product();
    let inner: usize = x.shape()[axis + 1..].iter().product();
    let std = x.as_standard_layout();
    let data = std.as_slice().unwrap_or(&[]);
    let mut mins = vec![f32::INFINITY; channels];
    let mut maxs = vec![f32::NEG_INFINITY; channels];
    let mut all_finite = true;
    for o in 0..outer {
        for c in 0..channels {
            let start = (o * channels + c) * inner;
            let (lo, hi, finite) = min_max_slice(&data[start..start + inner]);
            all_finite &= finite;
            mins[c] = mins[c].min(lo);
            maxs[c] = maxs[c].max(hi);
        }
    }
    if !all_finite {
        crate::qparams::check_finite(x, context)?;
    }
    Ok(Some((mins, maxs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_max_slice_matches_a_plain_fold_and_flags_non_finite() {
        let xs: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
        let (lo, hi, ok) = min_max_slice(&xs);
        assert_eq!(lo, xs.iter().copied().fold(f32::INFINITY, f32::min));
        assert_eq!(hi, xs.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        assert!(ok);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut ys = xs.clone();
            ys[35] = bad;
            assert!(!min_max_slice(&ys).2);
        }
    }
}
