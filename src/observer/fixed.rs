//! [`FixedQParamsObserver`]: parameters known in advance.

use std::any::Any;

use ndarray::ArrayViewD;

use super::{config_mismatch, peer, tensor_min_max, Observer};
use crate::error::{QuantError, Result};
use crate::qparams::QParams;

/// An observer whose parameters are fixed in advance (PyTorch's `FixedQParamsObserver`),
/// for outputs whose range is known from the function alone: sigmoid (scale 1/256, zero
/// point 0 on `quint8`), tanh (scale 2/256, zero point 128), hardsigmoid.
///
/// It still checks the data it is shown, so NaN or infinity is reported; it is always
/// calibrated.
///
/// # Examples
/// ```
/// use ptq::observer::{FixedQParamsObserver, Observer};
/// use ptq::{DType, QParams};
/// let obs = FixedQParamsObserver::new(QParams::per_tensor(1.0 / 256.0, 0, DType::QUInt8)?)?;
/// assert_eq!(obs.qparams()?.scale(), 1.0 / 256.0);
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FixedQParamsObserver {
    qparams: QParams,
    range: Option<(f32, f32)>,
}

const KIND: &str = "FixedQParamsObserver";

impl FixedQParamsObserver {
    /// An observer that always answers `qparams`.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for per-channel parameters (PyTorch supports
    /// only per-tensor ones here).
    pub fn new(qparams: QParams) -> Result<Self> {
        if qparams.scheme().is_per_channel() {
            return Err(QuantError::UnsupportedConfig {
                context: KIND.into(),
                reason: "only per-tensor parameters can be fixed".into(),
            });
        }
        Ok(FixedQParamsObserver {
            qparams,
            range: None,
        })
    }
}

impl Observer for FixedQParamsObserver {
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
        Ok(self.qparams.clone())
    }

    fn reset(&mut self) {
        self.range = None;
    }

    fn is_calibrated(&self) -> bool {
        true
    }

    fn observed_range(&self) -> Option<(f32, f32)> {
        self.range
    }

    fn merge(&mut self, other: &dyn Observer) -> Result<()> {
        let other = peer(self, other)?;
        if other.qparams != self.qparams {
            return Err(config_mismatch(KIND, "fixed parameters"));
        }
        self.range = match (self.range, other.range) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (r, None) | (None, r) => r,
        };
        Ok(())
    }

    fn fresh(&self) -> Box<dyn Observer> {
        Box::new(FixedQParamsObserver {
            qparams: self.qparams.clone(),
            range: None,
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
