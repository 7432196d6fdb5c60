//! [`OnnxRuntimeMinMaxObserver`]: ONNX Runtime's `quantize_static` MinMax calibration.
//!
//! The statistics are the global minimum and maximum (per tensor, or per channel for
//! weights), as `MinMaxCalibrater` (`moving_average=False`) and `quantize_data` record them;
//! the range -> (scale, zero point) step is `compute_scale_zp` from
//! `onnxruntime/quantization/quant_utils.py` (onnxruntime 1.32.0), whose float arithmetic
//! differs from PyTorch's in three ways this module reproduces bit for bit:
//! * the range `rmax - rmin` and the division by `qmax - qmin` are done in **float64**, and
//!   only the final scale is rounded to float32;
//! * the zero point is `round_half_even(qmin - rmin / scale)` with the float64 scale;
//! * symmetric int8 uses the restricted range `[-127, 127]` (divisor 254, zero point
//!   `round((qmin + qmax) / 2)` = 0), and a float64 scale below `f32::MIN_POSITIVE` becomes
//!   scale 1.0 with zero point 0 (PyTorch clamps to `eps` instead).
//!
//! ONNX Runtime ignores NaN (`np.nanmin`); `ptq` refuses NaN or infinite input with
//! [`QuantError::NonFinite`](crate::QuantError::NonFinite), as its other observers do.

use std::any::Any;

use ndarray::ArrayViewD;

use super::{
    config_mismatch, peer, uncalibrated, MinMaxObserver, Observer, PerChannelMinMaxObserver,
};
use crate::error::Result;
use crate::qparams::{QParams, RangeConfig};

/// ONNX Runtime's `compute_scale_zp(rmin, rmax, qmin, qmax, symmetric)` for float32 ranges:
/// returns `(scale, zero_point)` exactly as `quantize_static` stores them.
///
/// # Examples
/// ```
/// use ptq::observer::onnxruntime_scale_zp;
/// // uint8 activations over [-1, 3]: scale (4 / 255 in float64, rounded to f32), zp 64
/// let (s, z) = onnxruntime_scale_zp(-1.0, 3.0, 0, 255, false);
/// assert_eq!((s, z), ((4.0f64 / 255.0) as f32, 64));
/// // symmetric int8 weights: absmax / 127
/// let (s, z) = onnxruntime_scale_zp(-0.5, 0.25, -127, 127, true);
/// assert_eq!((s, z), ((1.0f64 / 254.0) as f32, 0));
/// ```
pub fn onnxruntime_scale_zp(
    rmin: f32,
    rmax: f32,
    qmin: i64,
    qmax: i64,
    symmetric: bool,
) -> (f32, i64) {
    // numpy.minimum / maximum with 0 (float32)
    let mut lo = rmin.min(0.0);
    let mut hi = rmax.max(0.0);
    if symmetric {
        let a = lo.abs().max(hi.abs());
        lo = -a;
        hi = a;
    }
    let dr = hi as f64 - lo as f64;
    let dq = qmax as f64 - qmin as f64;
    let scale = dr / dq;
    if scale < f32::MIN_POSITIVE as f64 {
        return (1.0, 0);
    }
    let zp = if symmetric {
        ((qmin + qmax) as f64 / 2.0).round_ties_even()
    } else {
        (qmin as f64 - lo as f64 / scale).round_ties_even()
    };
    (scale as f32, zp as i64)
}

#[derive(Debug, Clone, PartialEq)]
enum Stats {
    Tensor(MinMaxObserver),
    Channel(PerChannelMinMaxObserver),
}

/// Global min/max statistics (per tensor, or per channel with a per-channel scheme) mapped
/// to quantization parameters with ONNX Runtime's arithmetic ([`onnxruntime_scale_zp`]).
/// Built by [`QConfig::onnxruntime`](crate::qconfig::QConfig::onnxruntime).
///
/// # Examples
/// ```
/// use ndarray::array;
/// use ptq::observer::{Observer, OnnxRuntimeMinMaxObserver};
/// use ptq::{DType, QScheme, RangeConfig};
/// let cfg = RangeConfig::new(DType::QUInt8, QScheme::PerTensorAffine, false, None, f32::EPSILON)?;
/// let mut obs = OnnxRuntimeMinMaxObserver::new(cfg)?;
/// obs.observe(array![-1.0f32, 3.0].into_dyn().view())?;
/// let qp = obs.qparams()?;
/// assert_eq!((qp.scale(), qp.zero_point()), ((4.0f64 / 255.0) as f32, 64));
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxRuntimeMinMaxObserver {
    cfg: RangeConfig,
    stats: Stats,
}

const KIND: &str = "OnnxRuntimeMinMaxObserver";

impl OnnxRuntimeMinMaxObserver {
    /// An observer with this configuration (per tensor or per channel following its
    /// scheme; symmetric schemes use ORT's symmetric formula).
    ///
    /// # Errors
    /// As [`MinMaxObserver::new`] / [`PerChannelMinMaxObserver::new`].
    pub fn new(cfg: RangeConfig) -> Result<Self> {
        let stats = if cfg.scheme().is_per_channel() {
            Stats::Channel(PerChannelMinMaxObserver::new(cfg)?)
        } else {
            Stats::Tensor(MinMaxObserver::new(cfg)?)
        };
        Ok(OnnxRuntimeMinMaxObserver { cfg, stats })
    }

    /// The configuration.
    pub fn config(&self) -> &RangeConfig {
        &self.cfg
    }

    fn inner(&self) -> &dyn Observer {
        match &self.stats {
            Stats::Tensor(o) => o,
            Stats::Channel(o) => o,
        }
    }
}

impl Observer for OnnxRuntimeMinMaxObserver {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        match &mut self.stats {
            Stats::Tensor(o) => o.observe(x),
            Stats::Channel(o) => o.observe(x),
        }
        .map_err(|e| e.in_context(KIND))
    }

    fn qparams(&self) -> Result<QParams> {
        let (qmin, qmax) = self.cfg.quant_range();
        let sym = self.cfg.scheme().is_symmetric();
        let (mins, maxs): (Vec<f32>, Vec<f32>) = match &self.stats {
            Stats::Tensor(o) => {
                let (a, b) = o.observed_range().ok_or_else(|| uncalibrated(KIND))?;
                (vec![a], vec![b])
            }
            Stats::Channel(o) => {
                let (a, b) = o.channel_ranges().ok_or_else(|| uncalibrated(KIND))?;
                (a.to_vec(), b.to_vec())
            }
        };
        let (scales, zps): (Vec<f32>, Vec<i32>) = mins
            .iter()
            .zip(&maxs)
            .map(|(&a, &b)| {
                let (s, z) = onnxruntime_scale_zp(a, b, qmin as i64, qmax as i64, sym);
                (s, z as i32)
            })
            .unzip();
        QParams::new(
            self.cfg.scheme(),
            self.cfg.dtype(),
            (qmin, qmax),
            scales,
            zps,
        )
    }

    fn reset(&mut self) {
        match &mut self.stats {
            Stats::Tensor(o) => o.reset(),
            Stats::Channel(o) => o.reset(),
        }
    }

    fn is_calibrated(&self) -> bool {
        self.inner().is_calibrated()
    }

    fn observed_range(&self) -> Option<(f32, f32)> {
        self.inner().observed_range()
    }

    /// Exact, as for the min/max observers.
    fn merge(&mut self, other: &dyn Observer) -> Result<()> {
        let other = peer(self, other)?;
        if other.cfg != self.cfg {
            return Err(config_mismatch(KIND, "dtype, scheme, range or eps"));
        }
        match (&mut self.stats, &other.stats) {
            (Stats::Tensor(a), Stats::Tensor(b)) => a.merge(b),
            (Stats::Channel(a), Stats::Channel(b)) => a.merge(b),
            _ => Err(config_mismatch(KIND, "scheme")),
        }
    }

    fn fresh(&self) -> Box<dyn Observer> {
        let mut o = self.clone();
        o.reset();
        Box::new(o)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
