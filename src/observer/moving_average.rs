//! Moving-average min/max observers, per tensor and per channel.

use std::any::Any;

use ndarray::ArrayViewD;

use super::minmax::{per_tensor_only, per_tensor_qparams};
use super::per_channel::{check_channels, overall, per_channel_axis, per_channel_qparams};
use super::{channel_min_max, config_mismatch, peer, tensor_min_max, uncalibrated, Observer};
use crate::error::{QuantError, Result};
use crate::qparams::{QParams, RangeConfig};

/// PyTorch's default averaging constant.
pub const DEFAULT_AVERAGING_CONSTANT: f32 = 0.01;

fn check_constant(c: f32, kind: &'static str) -> Result<()> {
    if !(c > 0.0 && c <= 1.0) {
        return Err(QuantError::UnsupportedConfig {
            context: kind.into(),
            reason: format!("averaging_constant must be in (0, 1], got {c}"),
        });
    }
    Ok(())
}

/// One moving-average step in PyTorch's `f32` order: `old + c * (new - old)`.
#[inline]
fn step(old: f32, new: f32, c: f32) -> f32 {
    old + c * (new - old)
}

/// Combines two moving averages weighted by the number of batches behind each.
#[inline]
fn weighted(a: f32, na: u64, b: f32, nb: u64) -> f32 {
    ((a as f64 * na as f64 + b as f64 * nb as f64) / (na + nb) as f64) as f32
}

/// Exponential moving average of each batch's min and max (PyTorch's
/// `MovingAverageMinMaxObserver`): the first batch sets the range, each later batch moves
/// it by `averaging_constant` towards that batch's range, computed in `f32` as
/// `min + c * (batch_min - min)` exactly as PyTorch does.
///
/// # Merging
/// A moving average depends on the order of the batches, so no merge can reproduce a
/// single sequential pass. [`Observer::merge`] averages the two observers' ranges weighted
/// by how many batches each saw, which is the sequential result when all batches have the
/// same range and a stable estimate otherwise.
///
/// # Examples
/// ```
/// use ndarray::array;
/// use ptq::observer::{MovingAverageMinMaxObserver, Observer};
/// let mut obs = MovingAverageMinMaxObserver::default();
/// obs.observe(array![0.0f32, 1.0].into_dyn().view())?;
/// obs.observe(array![0.0f32, 2.0].into_dyn().view())?;
/// assert_eq!(obs.observed_range(), Some((0.0, 1.0 + 0.01 * (2.0 - 1.0))));
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MovingAverageMinMaxObserver {
    cfg: RangeConfig,
    averaging_constant: f32,
    range: Option<(f32, f32)>,
    batches: u64,
}

const KIND: &str = "MovingAverageMinMaxObserver";

impl Default for MovingAverageMinMaxObserver {
    /// PyTorch's defaults: `quint8`, `per_tensor_affine`, averaging constant 0.01.
    fn default() -> Self {
        let base = super::MinMaxObserver::default();
        MovingAverageMinMaxObserver {
            cfg: *base.config(),
            averaging_constant: DEFAULT_AVERAGING_CONSTANT,
            range: None,
            batches: 0,
        }
    }
}

impl MovingAverageMinMaxObserver {
    /// An observer with this configuration and averaging constant.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for a per-channel scheme or a constant outside
    /// `(0, 1]`.
    pub fn new(cfg: RangeConfig, averaging_constant: f32) -> Result<Self> {
        per_tensor_only(&cfg, KIND)?;
        check_constant(averaging_constant, KIND)?;
        Ok(MovingAverageMinMaxObserver {
            cfg,
            averaging_constant,
            range: None,
            batches: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RangeConfig {
        &self.cfg
    }
}

impl Observer for MovingAverageMinMaxObserver {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        let Some((lo, hi)) = tensor_min_max(&x, KIND)? else {
            return Ok(());
        };
        let c = self.averaging_constant;
        self.range = Some(match self.range {
            None => (lo, hi),
            Some((a, b)) => (step(a, lo, c), step(b, hi, c)),
        });
        self.batches += 1;
        Ok(())
    }

    fn qparams(&self) -> Result<QParams> {
        let (lo, hi) = self.range.ok_or_else(|| uncalibrated(KIND))?;
        per_tensor_qparams(&self.cfg, lo, hi)
    }

    fn reset(&mut self) {
        self.range = None;
        self.batches = 0;
    }

    fn is_calibrated(&self) -> bool {
        self.range.is_some()
    }

    fn observed_range(&self) -> Option<(f32, f32)> {
        self.range
    }

    /// Batch-count weighted average of the two ranges (see the type's docs).
    fn merge(&mut self, other: &dyn Observer) -> Result<()> {
        let other = peer(self, other)?;
        if other.cfg != self.cfg || other.averaging_constant != self.averaging_constant {
            return Err(config_mismatch(
                KIND,
                "dtype, scheme, range, eps or averaging constant",
            ));
        }
        self.range = match (self.range, other.range) {
            (Some((a, b)), Some((c, d))) => {
                let (n, m) = (self.batches, other.batches);
                Some((weighted(a, n, c, m), weighted(b, n, d, m)))
            }
            (r, None) | (None, r) => r,
        };
        self.batches += other.batches;
        Ok(())
    }

    fn fresh(&self) -> Box<dyn Observer> {
        let mut f = self.clone();
        f.reset();
        Box::new(f)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Per-channel moving averages of each batch's channel min and max (PyTorch's
/// `MovingAveragePerChannelMinMaxObserver`), with the same `f32` arithmetic and the same
/// merge rule as [`MovingAverageMinMaxObserver`], channel by channel.
///
/// # Examples
/// ```
/// use ndarray::array;
/// use ptq::observer::{MovingAveragePerChannelMinMaxObserver, Observer};
/// use ptq::{DType, QScheme, RangeConfig};
/// let cfg = RangeConfig::new(DType::QInt8, QScheme::PerChannelSymmetric { axis: 1 }, false, None, f32::EPSILON)?;
/// let mut obs = MovingAveragePerChannelMinMaxObserver::new(cfg, 0.5)?;
/// obs.observe(array![[1.0f32, -1.0]].into_dyn().view())?;
/// obs.observe(array![[3.0f32, -1.0]].into_dyn().view())?;
/// assert_eq!(obs.channel_ranges(), Some((&[1.0f32, -1.0][..], &[2.0f32, -1.0][..])));
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MovingAveragePerChannelMinMaxObserver {
    cfg: RangeConfig,
    axis: usize,
    averaging_constant: f32,
    ranges: Option<(Vec<f32>, Vec<f32>)>,
    batches: u64,
}

const PC_KIND: &str = "MovingAveragePerChannelMinMaxObserver";

impl MovingAveragePerChannelMinMaxObserver {
    /// An observer with this configuration and averaging constant.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for a per-tensor scheme or a constant outside
    /// `(0, 1]`.
    pub fn new(cfg: RangeConfig, averaging_constant: f32) -> Result<Self> {
        let axis = per_channel_axis(&cfg, PC_KIND)?;
        check_constant(averaging_constant, PC_KIND)?;
        Ok(MovingAveragePerChannelMinMaxObserver {
            cfg,
            axis,
            averaging_constant,
            ranges: None,
            batches: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RangeConfig {
        &self.cfg
    }

    /// Per-channel `(mins, maxs)` recorded so far.
    pub fn channel_ranges(&self) -> Option<(&[f32], &[f32])> {
        self.ranges
            .as_ref()
            .map(|(a, b)| (a.as_slice(), b.as_slice()))
    }
}

impl Observer for MovingAveragePerChannelMinMaxObserver {
    fn kind(&self) -> &'static str {
        PC_KIND
    }

    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        let Some((lo, hi)) = channel_min_max(&x, self.axis, PC_KIND)? else {
            return Ok(());
        };
        let c = self.averaging_constant;
        match &mut self.ranges {
            None => self.ranges = Some((lo, hi)),
            Some((mins, maxs)) => {
                check_channels(PC_KIND, self.axis, mins.len(), lo.len())?;
                for (m, v) in mins.iter_mut().zip(&lo) {
                    *m = step(*m, *v, c);
                }
                for (m, v) in maxs.iter_mut().zip(&hi) {
                    *m = step(*m, *v, c);
                }
            }
        }
        self.batches += 1;
        Ok(())
    }

    fn qparams(&self) -> Result<QParams> {
        let (mins, maxs) = self.ranges.as_ref().ok_or_else(|| uncalibrated(PC_KIND))?;
        per_channel_qparams(&self.cfg, mins, maxs)
    }

    fn reset(&mut self) {
        self.ranges = None;
        self.batches = 0;
    }

    fn is_calibrated(&self) -> bool {
        self.ranges.is_some()
    }

    fn observed_range(&self) -> Option<(f32, f32)> {
        self.ranges.as_ref().map(|(a, b)| overall(a, b))
    }

    /// Batch-count weighted average, channel by channel.
    fn merge(&mut self, other: &dyn Observer) -> Result<()> {
        let other = peer(self, other)?;
        if other.cfg != self.cfg || other.averaging_constant != self.averaging_constant {
            return Err(config_mismatch(
                PC_KIND,
                "dtype, scheme, axis, range, eps or averaging constant",
            ));
        }
        let (n, m) = (self.batches, other.batches);
        match (&mut self.ranges, &other.ranges) {
            (_, None) => {}
            (None, Some(r)) => self.ranges = Some(r.clone()),
            (Some((mins, maxs)), Some((omins, omaxs))) => {
                check_channels(PC_KIND, self.axis, mins.len(), omins.len())?;
                for (a, b) in mins.iter_mut().zip(omins) {
                    *a = weighted(*a, n, *b, m);
                }
                for (a, b) in maxs.iter_mut().zip(omaxs) {
                    *a = weighted(*a, n, *b, m);
                }
            }
        }
        self.batches += m;
        Ok(())
    }

    fn fresh(&self) -> Box<dyn Observer> {
        let mut f = self.clone();
        f.reset();
        Box::new(f)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
