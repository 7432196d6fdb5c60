//! [`PerChannelMinMaxObserver`]: running minimum and maximum per channel.

use std::any::Any;

use ndarray::ArrayViewD;

use super::{channel_min_max, config_mismatch, peer, uncalibrated, Observer};
use crate::error::{QuantError, Result};
use crate::qparams::{qparams_from_min_max, QParams, RangeConfig};

/// Per-channel running min and max (PyTorch's `PerChannelMinMaxObserver`), the usual
/// weight observer of the fbgemm/x86 backends: one scale (and zero point) per output
/// channel.
///
/// # Examples
/// ```
/// use ndarray::array;
/// use ptq::observer::{Observer, PerChannelMinMaxObserver};
/// use ptq::{DType, QScheme, RangeConfig};
/// let cfg = RangeConfig::new(DType::QInt8, QScheme::PerChannelSymmetric { axis: 0 }, false, None, f32::EPSILON)?;
/// let mut obs = PerChannelMinMaxObserver::new(cfg)?;
/// obs.observe(array![[1.0f32, -2.0], [0.5, 0.25]].into_dyn().view())?;
/// let qp = obs.qparams()?;
/// assert_eq!(qp.scales(), &[2.0 / 127.5, 0.5 / 127.5]);
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PerChannelMinMaxObserver {
    cfg: RangeConfig,
    axis: usize,
    ranges: Option<(Vec<f32>, Vec<f32>)>,
}

const KIND: &str = "PerChannelMinMaxObserver";

impl PerChannelMinMaxObserver {
    /// An observer with this configuration; the channel axis is the scheme's.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for a per-tensor scheme.
    pub fn new(cfg: RangeConfig) -> Result<Self> {
        let axis = per_channel_axis(&cfg, KIND)?;
        Ok(PerChannelMinMaxObserver {
            cfg,
            axis,
            ranges: None,
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

/// The channel axis of a per-channel configuration, or the error PyTorch raises.
pub(crate) fn per_channel_axis(cfg: &RangeConfig, kind: &'static str) -> Result<usize> {
    cfg.scheme().axis().ok_or_else(|| QuantError::UnsupportedConfig {
        context: kind.into(),
        reason: format!(
            "{} is a per-tensor scheme; this observer needs per_channel_affine or per_channel_symmetric",
            cfg.scheme().name()
        ),
    })
}

/// Checks that a new batch has as many channels as the recorded state.
pub(crate) fn check_channels(
    kind: &'static str,
    axis: usize,
    have: usize,
    got: usize,
) -> Result<()> {
    if have != got {
        return Err(QuantError::ShapeMismatch {
            context: kind.into(),
            expected: format!("{have} channels on axis {axis}, as in earlier batches"),
            actual: format!("{got} channels"),
        });
    }
    Ok(())
}

/// Per-channel parameters from per-channel ranges.
pub(crate) fn per_channel_qparams(
    cfg: &RangeConfig,
    mins: &[f32],
    maxs: &[f32],
) -> Result<QParams> {
    let mut scales = Vec::with_capacity(mins.len());
    let mut zps = Vec::with_capacity(mins.len());
    for (&lo, &hi) in mins.iter().zip(maxs) {
        let (s, z) = qparams_from_min_max(lo, hi, cfg)?;
        scales.push(s);
        zps.push(z);
    }
    QParams::new(cfg.scheme(), cfg.dtype(), cfg.quant_range(), scales, zps)
}

/// Overall `(min, max)` of per-channel ranges.
pub(crate) fn overall(mins: &[f32], maxs: &[f32]) -> (f32, f32) {
    (
        mins.iter().copied().fold(f32::INFINITY, f32::min),
        maxs.iter().copied().fold(f32::NEG_INFINITY, f32::max),
    )
}

impl Observer for PerChannelMinMaxObserver {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        let Some((lo, hi)) = channel_min_max(&x, self.axis, KIND)? else {
            return Ok(());
        };
        match &mut self.ranges {
            None => self.ranges = Some((lo, hi)),
            Some((mins, maxs)) => {
                check_channels(KIND, self.axis, mins.len(), lo.len())?;
                for (m, v) in mins.iter_mut().zip(&lo) {
                    *m = m.min(*v);
                }
                for (m, v) in maxs.iter_mut().zip(&hi) {
                    *m = m.max(*v);
                }
            }
        }
        Ok(())
    }

    fn qparams(&self) -> Result<QParams> {
        let (mins, maxs) = self.ranges.as_ref().ok_or_else(|| uncalibrated(KIND))?;
        per_channel_qparams(&self.cfg, mins, maxs)
    }

    fn reset(&mut self) {
        self.ranges = None;
    }

    fn is_calibrated(&self) -> bool {
        self.ranges.is_some()
    }

    fn observed_range(&self) -> Option<(f32, f32)> {
        self.ranges.as_ref().map(|(a, b)| overall(a, b))
    }

    /// Exact: channel by channel, the merged range is the range of all data seen.
    fn merge(&mut self, other: &dyn Observer) -> Result<()> {
        let other = peer(self, other)?;
        if other.cfg != self.cfg {
            return Err(config_mismatch(KIND, "dtype, scheme, axis, range or eps"));
        }
        match (&mut self.ranges, &other.ranges) {
            (_, None) => {}
            (None, Some(r)) => self.ranges = Some(r.clone()),
            (Some((mins, maxs)), Some((omins, omaxs))) => {
                check_channels(KIND, self.axis, mins.len(), omins.len())?;
                for (m, v) in mins.iter_mut().zip(omins) {
                    *m = m.min(*v);
                }
                for (m, v) in maxs.iter_mut().zip(omaxs) {
                    *m = m.max(*v);
                }
            }
        }
        Ok(())
    }

    fn fresh(&self) -> Box<dyn Observer> {
        Box::new(PerChannelMinMaxObserver {
            cfg: self.cfg,
            axis: self.axis,
            ranges: None,
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
