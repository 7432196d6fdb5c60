//! `calibrate`: float forward passes through the lowered graph that let the observers
//! record ranges.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

use ndarray::ArrayD;

use super::prepare::Prepared;
use crate::error::{QuantError, Result};
use crate::graph::{Graph, NodeId};
use crate::observer::Observer;
use crate::quant::PreparedGraph;

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

/// Runs every batch through the float model (its lowered graph); each activation
/// observer records the output it watches. Can be called several times (observers
/// accumulate). The first non-empty batch fixes the input shape if [`prepare`](super::prepare)
/// could not (see [`Prepared`]); every later batch must have that shape, except for the
/// batch dimension.
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
        let PreparedGraph {
            graph, observers, ..
        } = prepared.ensure_graph(x.shape())?;
        run_batch(graph, observers, x)?;
        seen.batches += 1;
        seen.samples += x.shape().first().copied().unwrap_or(1);
        progress(&seen);
    }
    report(seen, prepared)
}

/// Activation observers by the node whose output they watch.
type Observers = BTreeMap<NodeId, Box<dyn Observer>>;

/// Runs one (finite, non-empty) batch through `graph`, feeding `observers`.
fn run_batch(graph: &Graph, observers: &mut Observers, x: &ArrayD<f32>) -> Result<()> {
    graph.forward_with(
        std::slice::from_ref(x),
        &mut |node, y| match observers.get_mut(&node.id) {
            Some(obs) => obs.observe(y.view()).map_err(|e| e.in_context(&node.name)),
            None => Ok(()),
        },
    )?;
    Ok(())
}

fn report(seen: CalibrationProgress, prepared: &Prepared) -> Result<CalibrationReport> {
    if seen.batches == 0 {
        return Err(QuantError::EmptyCalibration {
            reason: "the batch iterator yielded no non-empty batch".into(),
        });
    }
    Ok(CalibrationReport {
        batches: seen.batches,
        samples: seen.samples,
        ranges: prepared
            .observers()
            .map(|(path, obs)| ObservedRange {
                path: path.to_string(),
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
    // The first non-empty batch fixes the input shape before the shards start.
    if let Some(x) = batches.iter().map(|b| b.borrow()).find(|x| !x.is_empty()) {
        prepared.ensure_graph(x.shape())?;
    }
    let Some(pg) = prepared.graph.as_mut() else {
        return report(
            CalibrationProgress {
                batches: 0,
                samples: 0,
            },
            prepared,
        );
    };
    let graph = &pg.graph;
    let template = &pg.observers;
    let shards: Vec<Result<(CalibrationProgress, Observers)>> = std::thread::scope(|s| {
        let handles: Vec<_> = batches
            .chunks(per)
            .enumerate()
            .map(|(k, chunk)| {
                s.spawn(move || {
                    let mut observers: Observers =
                        template.iter().map(|(k, o)| (*k, o.fresh())).collect();
                    let mut seen = CalibrationProgress {
                        batches: 0,
                        samples: 0,
                    };
                    for (j, b) in chunk.iter().enumerate() {
                        let x = b.borrow();
                        if x.is_empty() {
                            continue;
                        }
                        let i = k * per + j;
                        crate::qparams::check_finite(x, &format!("calibration batch {i}"))?;
                        run_batch(graph, &mut observers, x)?;
                        seen.batches += 1;
                        seen.samples += x.shape().first().copied().unwrap_or(1);
                    }
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
        for (id, obs) in observers {
            if let Some(mine) = pg.observers.get_mut(&id) {
                let name = &pg.graph.node(id).name;
                mine.merge(obs.as_ref()).map_err(|e| e.in_context(name))?;
            }
        }
    }
    report(seen, prepared)
}
