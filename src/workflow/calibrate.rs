//! `calibrate`: float forward passes that let the observers record ranges.

use std::borrow::Borrow;
use std::fmt;

use ndarray::ArrayD;

use super::prepare::{Prepared, INPUT};
use crate::error::{QuantError, Result};

/// Progress passed to the callback after each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalibrationProgress {
    /// Batches run so far.
    pub batches: usize,
    /// Samples (the batches' first dimensions) run so far.
    pub samples: usize,
}

/// What one observer recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedRange {
    /// The path whose output the observer watches.
    pub path: String,
    /// The observer kind, e.g. `"HistogramObserver"`.
    pub observer: &'static str,
    /// The overall `(min, max)` seen, or `None` if the observer saw nothing.
    pub range: Option<(f32, f32)>,
}

/// What a calibration run saw; prints as a table.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationReport {
    /// Batches run by this call.
    pub batches: usize,
    /// Samples run by this call.
    pub samples: usize,
    /// Every observer's range after this call, by path.
    pub ranges: Vec<ObservedRange>,
}

impl CalibrationReport {
    /// Paths whose observers have still seen nothing (`convert` would refuse them).
    pub fn unobserved(&self) -> Vec<&str> {
        self.ranges
            .iter()
            .filter(|r| r.range.is_none())
            .map(|r| r.path.as_str())
            .collect()
    }
}

impl fmt::Display for CalibrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "calibrated on {} batches ({} samples)",
            self.batches, self.samples
        )?;
        writeln!(
            f,
            "{:<32} {:<34} {:>12} {:>12}",
            "activation", "observer", "min", "max"
        )?;
        for r in &self.ranges {
            match r.range {
                Some((lo, hi)) => {
                    writeln!(f, "{:<32} {:<34} {lo:>12.5} {hi:>12.5}", r.path, r.observer)?
                }
                None => writeln!(f, "{:<32} {:<34} {:>25}", r.path, r.observer, "(no data)")?,
            }
        }
        Ok(())
    }
}

/// Runs every batch through the float model; each activation observer records the output
/// it watches. Can be called several times (observers accumulate).
///
/// # Errors
/// [`QuantError::EmptyCalibration`] if the iterator yields no non-empty batch;
/// [`QuantError::NonFinite`] naming the batch if a batch holds NaN or infinity (nothing
/// from that batch is recorded), or naming the layer whose output does; the model's shape
/// errors, named with the layer.
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2, ArrayD, IxDyn};
/// use ptq::nn::{Layer, Linear, Sequential};
/// use ptq::qconfig::{QConfig, QConfigMap};
/// use ptq::workflow::{calibrate, prepare};
/// let model = Sequential::new()
///     .push("quant", Layer::QuantStub)
///     .push("fc", Layer::Linear(Linear::new(Array2::eye(4), Some(Array1::zeros(4)))?));
/// let mut prepared = prepare(model, &QConfigMap::new(QConfig::fbgemm()))?;
/// let batches = (0..3).map(|i| ArrayD::from_elem(IxDyn(&[8, 4]), i as f32));
/// let report = calibrate(&mut prepared, batches, |_| {})?;
/// assert_eq!((report.batches, report.samples), (3, 24));
/// assert!(report.unobserved().is_empty());
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn calibrate<I, B>(
    prepared: &mut Prepared,
    batches: I,
    mut progress: impl FnMut(&CalibrationProgress),
) -> Result<CalibrationReport>
where
    I: IntoIterator<Item = B>,
    B: Borrow<ArrayD<f32>>,
{
    let Prepared {
        model, observers, ..
    } = prepared;
    let mut seen = CalibrationProgress {
        batches: 0,
        samples: 0,
    };
    for (i, batch) in batches.into_iter().enumerate() {
        let x = batch.borrow();
        if x.is_empty() {
            continue;
        }
        crate::qparams::check_finite(x, &format!("calibration batch {i}"))?;
        if let Some(obs) = observers.get_mut(INPUT) {
            obs.observe(x.view()).map_err(|e| e.in_context(INPUT))?;
        }
        model.forward_with_hook(x, &mut |path, y| match observers.get_mut(path) {
            Some(obs) => obs.observe(y.view()).map_err(|e| e.in_context(path)),
            None => Ok(()),
        })?;
        seen.batches += 1;
        seen.samples += x.shape().first().copied().unwrap_or(1);
        progress(&seen);
    }
    if seen.batches == 0 {
        return Err(QuantError::EmptyCalibration {
            reason: "the batch iterator yielded no non-empty batch".into(),
        });
    }
    Ok(CalibrationReport {
        batches: seen.batches,
        samples: seen.samples,
        ranges: observers
            .iter()
            .map(|(path, obs)| ObservedRange {
                path: path.clone(),
                observer: obs.kind(),
                range: obs.observed_range(),
            })
            .collect(),
    })
}
