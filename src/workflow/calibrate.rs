//! `calibrate`: float forward passes that let the observers record ranges.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

use ndarray::ArrayD;

use super::prepare::{Prepared, INPUT};
use crate::error::{QuantError, Result};
use crate::nn::Sequential;
use crate::observer::Observer;

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
    let seen = run_batches(model, observers, batches.into_iter(), &mut progress)?;
    report(seen, observers)
}

/// Activation observers by path.
type Observers = BTreeMap<String, Box<dyn Observer>>;

/// Runs batches through `model`, feeding `observers`; counts what it ran.
fn run_batches<B: Borrow<ArrayD<f32>>>(
    model: &Sequential,
    observers: &mut Observers,
    batches: impl Iterator<Item = B>,
    progress: &mut dyn FnMut(&CalibrationProgress),
) -> Result<CalibrationProgress> {
    let mut seen = CalibrationProgress {
        batches: 0,
        samples: 0,
    };
    for (i, batch) in batches.enumerate() {
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
    Ok(seen)
}

fn report(
    seen: CalibrationProgress,
    observers: &BTreeMap<String, Box<dyn Observer>>,
) -> Result<CalibrationReport> {
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

/// [`calibrate`] on several threads: the batches are cut into `threads` contiguous shards,
/// each shard is run through the float model with fresh observers of its own, and the
/// shards' observers are merged into the model's in shard order.
///
/// What the merge equals: exactly the sequential result for the min/max observers (per
/// tensor and per channel); for the histogram observer, exactly the sequential result when
/// the first shard's range already contains every later shard's, else PyTorch's combine
/// rule applied to the shards (see [`crate::observer::HistogramObserver`]); for the
/// moving-average observers, the batch-weighted mean of the shards' averages. Use
/// `threads = 1` for bit-identical sequential semantics with every observer.
///
/// # Errors
/// As [`calibrate`]; the first error of any shard (in shard order) is returned and
/// nothing is merged.
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2, ArrayD, IxDyn};
/// use ptq::nn::{Layer, Linear, Sequential};
/// use ptq::qconfig::{QConfig, QConfigMap};
/// use ptq::workflow::{calibrate, calibrate_parallel, prepare};
/// let model = || Sequential::new()
///     .push("fc", Layer::Linear(Linear::new(Array2::eye(4), Some(Array1::zeros(4))).unwrap()));
/// let batches: Vec<ArrayD<f32>> = (0..8).map(|i| ArrayD::from_elem(IxDyn(&[2, 4]), i as f32 - 3.0)).collect();
/// let map = QConfigMap::new(QConfig::minmax_per_channel());
/// let (mut a, mut b) = (prepare(model(), &map)?, prepare(model(), &map)?);
/// calibrate(&mut a, &batches, |_| {})?;
/// calibrate_parallel(&mut b, &batches, 2)?;
/// let qa: Vec<_> = a.observers().map(|(_, o)| o.qparams().unwrap()).collect();
/// let qb: Vec<_> = b.observers().map(|(_, o)| o.qparams().unwrap()).collect();
/// assert_eq!(qa, qb);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn calibrate_parallel<B>(
    prepared: &mut Prepared,
    batches: &[B],
    threads: usize,
) -> Result<CalibrationReport>
where
    B: Borrow<ArrayD<f32>> + Sync,
{
    let threads = threads.clamp(1, batches.len().max(1));
    let per = batches.len().div_ceil(threads).max(1);
    let model = &prepared.model;
    let template = &prepared.observers;
    let shards: Vec<Result<(CalibrationProgress, Observers)>> = std::thread::scope(|s| {
        let handles: Vec<_> = batches
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || {
                    let mut observers: Observers = template
                        .iter()
                        .map(|(k, o)| (k.clone(), o.fresh()))
                        .collect();
                    let seen = run_batches(
                        model,
                        &mut observers,
                        chunk.iter().map(|b| b.borrow()),
                        &mut |_| {},
                    )?;
                    Ok((seen, observers))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut seen = CalibrationProgress {
        batches: 0,
        samples: 0,
    };
    let mut merged = Vec::with_capacity(shards.len());
    for shard in shards {
        merged.push(shard?);
    }
    for (progress, observers) in merged {
        seen.batches += progress.batches;
        seen.samples += progress.samples;
        for (path, obs) in observers {
            if let Some(mine) = prepared.observers.get_mut(&path) {
                mine.merge(obs.as_ref()).map_err(|e| e.in_context(&path))?;
            }
        }
    }
    report(seen, &prepared.observers)
}
