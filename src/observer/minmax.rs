//! [`MinMaxObserver`]: the running minimum and maximum.

use std::any::Any;

use ndarray::ArrayViewD;

use super::{config_mismatch, peer, tensor_min_max, uncalibrated, Observer};
use crate::error::{QuantError, Result};
use crate::qparams::{qparams_from_min_max, DType, QParams, QScheme, RangeConfig};

/// Records the running minimum and maximum of everything observed (PyTorch's
/// `MinMaxObserver`) and maps that range, widened to contain 0, onto the quantized range.
///
/// # Examples
/// ```
/// use ndarray::array;
/// use ptq::observer::{MinMaxObserver, Observer};
/// let mut obs = MinMaxObserver::default();
/// obs.observe(array![-1.0f32, 3.0].into_dyn().view())?;
/// let qp = obs.qparams()?;
/// assert_eq!((qp.scale(), qp.zero_point()), (4.0 / 255.0, 64));
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MinMaxObserver {
    cfg: RangeConfig,
    range: Option<(f32, f32)>,
}

const KIND: &str = "MinMaxObserver";

impl Default for MinMaxObserver {
    /// PyTorch's defaults: `quint8`, `per_tensor_affine`, no `reduce_range`.
    fn default() -> Self {
        MinMaxObserver {
            cfg: RangeConfig::new(
                DType::QUInt8,
                QScheme::PerTensorAffine,
                false,
                None,
                f32::EPSILON,
            )
            .expect("the default configuration is valid"),
            range: None,
        }
    }
}

impl MinMaxObserver {
    /// An observer with this configuration.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for a per-channel scheme (use
    /// [`super::PerChannelMinMaxObserver`]).
    pub fn new(cfg: RangeConfig) -> Result<Self> {
        per_tensor_only(&cfg, KIND)?;
        Ok(MinMaxObserver { cfg, range: None })
    }

    /// The configuration.
    pub fn config(&self) -> &RangeConfig {
        &self.cfg
    }
}

/// Refuses per-channel schemes for per-tensor observers, as PyTorch does.
pub(crate) fn per_tensor_only(cfg: &RangeConfig, kind: &'static str) -> Result<()> {
    if cfg.scheme().is_per_channel() {
        return Err(QuantError::UnsupportedConfig {
            context: kind.into(),
            reason: format!(
                "{} is a per-channel scheme; this observer is per-tensor",
                cfg.scheme().name()
            ),
        });
    }
    Ok(())
}

/// Per-tensor parameters from a range, as every per-tensor observer computes them.
pub(crate) fn per_tensor_qparams(cfg: &RangeConfig, min: f32, max: f32) -> Result<QParams> {
    let (scale, zp) = qparams_from_min_max(min, max, cfg)?;
    QParams::new(
        cfg.scheme(),
        cfg.dtype(),
        cfg.quant_range(),
        vec![scale],
        vec![zp],
    )
}

impl Observer for MinMaxObserver {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        if let Some((lo, hi)) = tensor_min_max(&x, KIND)? {
            self.range = Some(match self.range {
                None => (lo, hi),
                Some((a, b)) => (a.min(lo), b.max(hi)),
            });
        }
        Ok(())
    }

    fn qparams(&self) -> Result<QParams> {
        let (lo, hi) = self.range.ok_or_else(|| uncalibrated(KIND))?;
        per_tensor_qparams(&self.cfg, lo, hi)
    }

    fn reset(&mut self) {
        self.range = None;
    }

    fn is_calibrated(&self) -> bool {
        self.range.is_some()
    }

    fn observed_range(&self) -> Option<(f32, f32)> {
        self.range
    }

    /// Exact: the merged range is the range of all data both observers saw.
    fn merge(&mut self, other: &dyn Observer) -> Result<()> {
        let other = peer(self, other)?;
        if other.cfg != self.cfg {
            return Err(config_mismatch(KIND, "dtype, scheme, range or eps"));
        }
        self.range = match (self.range, other.range) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (r, None) | (None, r) => r,
        };
        Ok(())
    }

    fn fresh(&self) -> Box<dyn Observer> {
        Box::new(MinMaxObserver {
            cfg: self.cfg,
            range: None,
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
