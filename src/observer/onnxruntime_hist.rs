//! [`OnnxRuntimeHistogramObserver`]: ONNX Runtime `quantize_static`'s Entropy and
//! Percentile calibration (`CalibrationMethod.Entropy` / `.Percentile`).
//!
//! This reproduces `HistogramCollector` of `onnxruntime/quantization/calibrate.py`
//! (onnxruntime 1.32.0, numpy 2.4) step by step, each `observe` call being one
//! `collect()`:
//! * **Entropy** and asymmetric **Percentile** (`collect_value`): the first batch is binned
//!   into `num_bins` equal bins over `[-t, t]`, `t = max(|min|, |max|)` (numpy's
//!   `histogram` with `range`: `linspace` edges in `f32`, bin index estimated in `f32` and
//!   corrected against the edges). A later batch with a smaller `t` is binned on the old
//!   range and added; a larger one widens the histogram by whole old bins on both sides
//!   (`merge_histogram`, numpy's `f32` floor division included).
//! * Symmetric **Percentile** (`collect_absolute_value`, ORT's default): the histogram of
//!   `|x|`, first over `[min |x|, max |x|]`, later extended by bins of the first width
//!   (`np.arange`) up to a new maximum.
//! * The threshold: Percentile takes the first bin edge where the `f64` cumulative
//!   distribution reaches `percentile / 100` (`(-e, e)` when symmetric; both tails of
//!   `(100 - percentile) / 200` otherwise); Entropy takes the bin range of least KL
//!   divergence (TensorRT's search over `num_quantized_bins / 2 ..= num_bins / 2` half
//!   widths, ORT's integer bin merging and `smooth_distribution`). Both are clamped to the
//!   observed `[min, max]` and mapped to scale and zero point by
//!   [`onnxruntime_scale_zp`](super::onnxruntime_scale_zp).
//!
//! `quantize_static` collects **all** calibration batches in one histogram by default; so
//! ptq's parameters equal it when ptq calibrates with one batch, and equal
//! `quantize_static(..., extra_options={"CalibStridedMinMax": 1})` with a data reader that
//! yields ptq's batches, when ptq calibrates batch by batch (each `observe` is one
//! `collect`). The KL divergences are computed in `f64` (ORT: `f32` numpy sums and logs);
//! only their order matters, so a different choice would need two candidates within
//! about 1e-7 of each other.

use std::any::Any;

use ndarray::ArrayViewD;

use super::minmax::per_tensor_only;
use super::{onnxruntime_scale_zp, peer, uncalibrated, Observer};
use crate::error::{QuantError, Result};
use crate::qparams::{QParams, RangeConfig};

const KIND: &str = "OnnxRuntimeHistogramObserver";

/// Which of ONNX Runtime's histogram calibrations, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OnnxRuntimeHistMethod {
    /// `CalibrationMethod.Entropy`: ORT's defaults are 128 bins and 128 quantized bins.
    Entropy {
        /// Bins of the first histogram (`num_bins`).
        num_bins: usize,
        /// Bins of the quantized distribution (`num_quantized_bins`).
        num_quantized_bins: usize,
    },
    /// `CalibrationMethod.Percentile`: ORT's defaults are 2048 bins, 99.999, symmetric.
    Percentile {
        /// Bins of the first histogram (`num_bins`).
        num_bins: usize,
        /// Percent of the values kept, in `[0, 100]`.
        percentile: f64,
        /// Histogram of `|x|` and a symmetric threshold (ORT's `symmetric=True`).
        symmetric: bool,
    },
}

impl OnnxRuntimeHistMethod {
    /// ORT's default Entropy calibration (128 bins, 128 quantized bins).
    pub const ENTROPY: Self = OnnxRuntimeHistMethod::Entropy {
        num_bins: 128,
        num_quantized_bins: 128,
    };
    /// ORT's default Percentile calibration (2048 bins, 99.999, symmetric).
    pub const PERCENTILE: Self = OnnxRuntimeHistMethod::Percentile {
        num_bins: 2048,
        percentile: 99.999,
        symmetric: true,
    };

    fn abs(&self) -> bool {
        matches!(
            self,
            OnnxRuntimeHistMethod::Percentile {
                symmetric: true,
                ..
            }
        )
    }
    fn num_bins(&self) -> usize {
        match *self {
            OnnxRuntimeHistMethod::Entropy { num_bins, .. }
            | OnnxRuntimeHistMethod::Percentile { num_bins, .. } => num_bins,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Hist {
    hist: Vec<i64>,
    edges: Vec<f32>,
    min: f32,
    max: f32,
    /// `collect_value`'s threshold (unused for the absolute-value histogram).
    threshold: f32,
}

/// ONNX Runtime's Entropy / Percentile calibration of one activation tensor; see the
/// module documentation for the exact correspondence. Built by
/// [`QConfig::onnxruntime_entropy`](crate::qconfig::QConfig::onnxruntime_entropy) and
/// [`QConfig::onnxruntime_percentile`](crate::qconfig::QConfig::onnxruntime_percentile).
///
/// Memory: the histogram, which grows only when a batch exceeds the range seen so far
/// (by whole bins), as ORT's does.
///
/// # Examples
/// ```
/// use ndarray::Array;
/// use ptq::observer::{Observer, OnnxRuntimeHistMethod, OnnxRuntimeHistogramObserver};
/// use ptq::{DType, QScheme, RangeConfig};
/// let cfg = RangeConfig::new(DType::QUInt8, QScheme::PerTensorAffine, false, None, f32::EPSILON)?;
/// let mut obs = OnnxRuntimeHistogramObserver::new(cfg, OnnxRuntimeHistMethod::Percentile {
///     num_bins: 2048, percentile: 99.0, symmetric: true })?;
/// let mut x = Array::linspace(-1.0f32, 1.0, 1000);
/// x[999] = 50.0; // one outlier: 99% of |x| lies below 1
/// obs.observe(x.view().into_dyn())?;
/// let (lo, hi) = obs.threshold().unwrap();
/// assert!(hi > 0.9 && hi < 1.0 && lo == -hi, "{lo} {hi}"); // symmetric: (-e, e)
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxRuntimeHistogramObserver {
    cfg: RangeConfig,
    method: OnnxRuntimeHistMethod,
    state: Option<Hist>,
}

impl OnnxRuntimeHistogramObserver {
    /// An observer with this configuration (per-tensor schemes only) and method.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for a per-channel scheme, fewer than 2 or more
    /// than 2^20 bins, a percentile outside `[0, 100]`, or (Entropy) `num_quantized_bins`
    /// of 0 or above `num_bins`.
    pub fn new(cfg: RangeConfig, method: OnnxRuntimeHistMethod) -> Result<Self> {
        per_tensor_only(&cfg, KIND)?;
        let bad = |reason: String| QuantError::UnsupportedConfig {
            context: KIND.into(),
            reason,
        };
        let n = method.num_bins();
        if !(2..=1 << 20).contains(&n) {
            return Err(bad(format!("num_bins = {n} is not in 2..=2^20")));
        }
        match method {
            OnnxRuntimeHistMethod::Percentile { percentile, .. } => {
                if !(0.0..=100.0).contains(&percentile) {
                    return Err(bad(format!("percentile = {percentile} is not in [0, 100]")));
                }
            }
            OnnxRuntimeHistMethod::Entropy {
                num_quantized_bins, ..
            } => {
                if num_quantized_bins == 0 || num_quantized_bins > n {
                    return Err(bad(format!(
                        "num_quantized_bins = {num_quantized_bins} is not in 1..={n}"
                    )));
                }
            }
        }
        Ok(OnnxRuntimeHistogramObserver {
            cfg,
            method,
            state: None,
        })
    }

    /// The method and its parameters.
    pub fn method(&self) -> OnnxRuntimeHistMethod {
        self.method
    }

    /// The `(lowest, highest)` threshold ORT's `compute_collection_result` gives for the
    /// data observed so far, or `None` before any data.
    pub fn threshold(&self) -> Option<(f32, f32)> {
        let h = self.state.as_ref()?;
        let (lo, hi) = match self.method {
            OnnxRuntimeHistMethod::Percentile {
                percentile,
                symmetric,
                ..
            } => percentile_threshold(h, percentile, symmetric),
            OnnxRuntimeHistMethod::Entropy {
                num_quantized_bins, ..
            } => entropy_threshold(h, num_quantized_bins),
        };
        // clamped to the observed range
        Some((
            if lo < h.min { h.min } else { lo },
            if hi > h.max { h.max } else { hi },
        ))
    }
}

/// numpy `linspace(start, stop, num)` for `f32` endpoints (computed in `f32`).
fn linspace_f32(start: f32, stop: f32, num: usize) -> Vec<f32> {
    let div = (num - 1) as f32;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f32> = if step == 0.0 {
        (0..num).map(|i| i as f32 / div * delta).collect()
    } else {
        (0..num).map(|i| i as f32 * step).collect()
    };
    for v in &mut y {
        *v += start;
    }
    y[num - 1] = stop;
    y
}

/// numpy `histogram(x, bins=n, range=(first, last))` (equal bins) for `f32` data:
/// `(counts, edges)`.
fn uniform_hist(x: &[f32], n: usize, first: f32, last: f32) -> (Vec<i64>, Vec<f32>) {
    let (first, last) = if first == last {
        (first - 0.5, last + 0.5)
    } else {
        (first, last)
    };
    let edges = linspace_f32(first, last, n + 1);
    let denom = last - first;
    let nf = n as f32;
    let mut hist = vec![0i64; n];
    for &v in x {
        if !(v >= first && v <= last) {
            continue;
        }
        let f = ((v - first) / denom) * nf;
        let mut i = (f as i64).clamp(0, n as i64 - 1) as usize;
        if v < edges[i] {
            i = i.saturating_sub(1);
        }
        if i != n - 1 && v >= edges[i + 1] {
            i += 1;
        }
        hist[i] += 1;
    }
    (hist, edges)
}

/// numpy `histogram(x, bins=edges)` (arbitrary edges): bin `i` holds
/// `edges[i] <= v < edges[i + 1]`, the last bin also `v == edges[last]`.
fn edges_hist(x: &[f32], edges: &[f32]) -> Vec<i64> {
    let n = edges.len() - 1;
    let mut hist = vec![0i64; n];
    let last = edges[n];
    for &v in x {
        if !(v >= edges[0] && v <= last) {
            continue;
        }
        // the last edge e with e <= v
        let i = edges
            .partition_point(|&e| e <= v)
            .saturating_sub(1)
            .min(n - 1);
        hist[i] += 1;
    }
    hist
}

/// numpy's `f32` floor division (`npy_divmodf`).
fn floor_div_f32(a: f32, b: f32) -> f32 {
    let m = a % b;
    let mut div = (a - m) / b;
    if m != 0.0 && ((b < 0.0) != (m < 0.0)) {
        div -= 1.0;
    }
    if div != 0.0 {
        let mut fl = div.floor();
        if div - fl > 0.5 {
            fl += 1.0;
        }
        fl
    } else {
        (0.0f32).copysign(a / b)
    }
}

/// numpy `arange(start, stop, step)` for `f32` scalars.
fn arange_f32(start: f32, stop: f32, step: f32) -> Vec<f32> {
    let len = (((stop - start) / step) as f64).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len > 1 {
        let next = start + step;
        let delta = next - start;
        out.push(next);
        for i in 2..len {
            out.push(start + i as f32 * delta);
        }
    }
    out
}

fn collect_value(state: &mut Option<Hist>, x: &[f32], num_bins: usize) {
    let (mn, mx) = min_max(x);
    let t = mn.abs().max(mx.abs());
    let Some(old) = state.as_mut() else {
        let (hist, edges) = uniform_hist(x, num_bins, -t, t);
        *state = Some(Hist {
            hist,
            edges,
            min: mn,
            max: mx,
            threshold: t,
        });
        return;
    };
    let (lo, hi) = (old.min.min(mn), old.max.max(mx));
    let ot = old.threshold;
    if t <= ot {
        let (h, _) = uniform_hist(x, old.hist.len(), -ot, ot);
        for (a, b) in old.hist.iter_mut().zip(h) {
            *a += b;
        }
    } else if ot == 0.0 {
        let (mut h, e) = uniform_hist(x, old.hist.len(), -t, t);
        for (a, b) in h.iter_mut().zip(&old.hist) {
            *a += b;
        }
        old.hist = h;
        old.edges = e;
        old.threshold = t;
    } else {
        let old_n = old.hist.len();
        let stride = 2.0 * ot / old_n as f32;
        let half = (floor_div_f32(t - ot, stride) + 1.0) as usize;
        let new_n = old_n + 2 * half;
        let nt = half as f32 * stride + ot;
        let (mut h, e) = uniform_hist(x, new_n, -nt, nt);
        for (a, b) in h[half..new_n - half].iter_mut().zip(&old.hist) {
            *a += b;
        }
        old.hist = h;
        old.edges = e;
        old.threshold = nt;
    }
    old.min = lo;
    old.max = hi;
}

fn collect_absolute_value(state: &mut Option<Hist>, x: &[f32], num_bins: usize) {
    let (mn, mx) = min_max(x);
    let a: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let (amin, amax) = min_max(&a);
    let Some(old) = state.as_mut() else {
        let (hist, edges) = uniform_hist(&a, num_bins, amin, amax);
        *state = Some(Hist {
            hist,
            edges,
            min: mn,
            max: mx,
            threshold: 0.0,
        });
        return;
    };
    let mut edges = old.edges.clone();
    let last = edges[edges.len() - 1];
    if amax > last {
        let width = edges[1] - edges[0];
        edges.extend(arange_f32(last + width, amax + width, width));
    }
    let mut h = edges_hist(&a, &edges);
    for (x, y) in h.iter_mut().zip(&old.hist) {
        *x += y;
    }
    old.hist = h;
    old.edges = edges;
    old.min = old.min.min(mn);
    old.max = old.max.max(mx);
}

fn min_max(x: &[f32]) -> (f32, f32) {
    if x.is_empty() {
        return (0.0, 0.0);
    }
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        })
}

/// numpy `searchsorted(cdf, v)` (side left): the first index with `cdf[i] >= v`.
fn search_left(cdf: &[f64], v: f64) -> usize {
    cdf.partition_point(|&c| c < v)
}

fn percentile_threshold(h: &Hist, percentile: f64, symmetric: bool) -> (f32, f32) {
    let total: i64 = h.hist.iter().sum();
    let mut acc = 0.0f64;
    let cdf: Vec<f64> = h
        .hist
        .iter()
        .map(|&c| {
            acc += c as f64 / total as f64;
            acc
        })
        .collect();
    let edge = |i: usize| h.edges[i.min(h.edges.len() - 1)];
    if symmetric {
        let e = edge(search_left(&cdf, percentile / 100.0));
        (-e, e)
    } else {
        let cut = (100.0 - percentile) / 200.0;
        (
            edge(search_left(&cdf, cut)),
            edge(search_left(&cdf, 1.0 - cut)),
        )
    }
}

/// ORT's `smooth_distribution` (eps 0.0001) in `f64`; `None` when all entries are 0.
fn smooth(p: &[i64]) -> Option<Vec<f64>> {
    let zeros = p.iter().filter(|&&v| v == 0).count();
    let nonzeros = p.len() - zeros;
    if nonzeros == 0 {
        return None;
    }
    let eps = 0.0001f64;
    let eps1 = eps * zeros as f64 / nonzeros as f64;
    Some(
        p.iter()
            .map(|&v| if v == 0 { eps } else { v as f64 - eps1 })
            .collect(),
    )
}

/// `scipy.stats.entropy(p, q)` as ORT's copy computes it (normalized, natural log).
fn kl(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let (a, b) = (a / sp, b / sq);
            if a == 0.0 {
                0.0
            } else if b > 0.0 {
                a * (a / b).ln()
            } else {
                f64::INFINITY
            }
        })
        .sum()
}

fn entropy_threshold(h: &Hist, num_quantized_bins: usize) -> (f32, f32) {
    let hist = &h.hist;
    let num_bins = hist.len();
    let zero = num_bins / 2;
    let half_q = num_quantized_bins / 2;
    let mut best: Option<(f64, (f32, f32))> = None;
    for i in half_q..=zero {
        let start = zero - i;
        let end = (zero + i + 1).min(num_bins);
        let thr = (h.edges[start], h.edges[end]);
        let sliced = &hist[start..end];
        let mut p = sliced.to_vec();
        p[0] += hist[..start].iter().sum::<i64>();
        let last = p.len() - 1;
        p[last] += hist[end..].iter().sum::<i64>();
        let merged = sliced.len() / num_quantized_bins;
        let mut qb = vec![0i64; num_quantized_bins];
        for (k, b) in qb.iter_mut().enumerate() {
            *b = sliced[k * merged..(k + 1) * merged].iter().sum();
        }
        qb[num_quantized_bins - 1] += sliced[num_quantized_bins * merged..].iter().sum::<i64>();
        let mut q = vec![0i64; p.len()];
        for (k, &b) in qb.iter().enumerate() {
            let (s, e) = (k * merged, (k + 1) * merged);
            let norm = p[s..e].iter().filter(|&&v| v != 0).count() as i64;
            if norm != 0 {
                // float division stored into an int64 array: truncation
                let v = (b as f64 / norm as f64) as i64;
                q[s..e].iter_mut().for_each(|x| *x = v);
            }
        }
        let div = match (smooth(&p), smooth(&q)) {
            (Some(p), Some(q)) => kl(&p, &q),
            _ => f64::INFINITY,
        };
        // np.argmin: the first of equal minima (and inf only if all are inf)
        if best.is_none_or(|(d, _)| div < d) {
            best = Some((div, thr));
        }
    }
    best.map_or((h.edges[0], h.edges[num_bins]), |(_, t)| t)
}

impl Observer for OnnxRuntimeHistogramObserver {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        crate::qparams::check_finite(&x, KIND)?;
        let v: Vec<f32> = x.iter().copied().collect();
        if v.is_empty() {
            return Ok(());
        }
        let n = self.method.num_bins();
        if self.method.abs() {
            collect_absolute_value(&mut self.state, &v, n);
        } else {
            collect_value(&mut self.state, &v, n);
        }
        Ok(())
    }

    fn qparams(&self) -> Result<QParams> {
        let (lo, hi) = self.threshold().ok_or_else(|| uncalibrated(KIND))?;
        let (qmin, qmax) = self.cfg.quant_range();
        let (s, z) = onnxruntime_scale_zp(
            lo,
            hi,
            qmin as i64,
            qmax as i64,
            self.cfg.scheme().is_symmetric(),
        );
        QParams::new(
            self.cfg.scheme(),
            self.cfg.dtype(),
            (qmin, qmax),
            vec![s],
            vec![z as i32],
        )
    }

    fn reset(&mut self) {
        self.state = None;
    }

    fn is_calibrated(&self) -> bool {
        self.state.is_some()
    }

    /// The clamped threshold (the range the parameters are computed from).
    fn observed_range(&self) -> Option<(f32, f32)> {
        self.threshold()
    }

    /// Refused: ORT's histogram depends on the order in which batches arrive (its bins
    /// are fixed by the first batch), so two histograms cannot be combined into the one
    /// ORT would have built; calibrate such layers on one thread.
    fn merge(&mut self, other: &dyn Observer) -> Result<()> {
        let _ = peer(self, other)?;
        Err(QuantError::UnsupportedConfig {
            context: KIND.into(),
            reason: "ONNX Runtime's histogram calibration depends on the batch order and \
                     cannot merge two histograms; calibrate without sharding"
                .into(),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers() {
        assert_eq!(linspace_f32(-1.0, 1.0, 5), vec![-1.0, -0.5, 0.0, 0.5, 1.0]);
        let (h, e) = uniform_hist(&[-1.0, 0.0, 0.25, 1.0, 2.0], 4, -1.0, 1.0);
        assert_eq!(h, vec![1, 0, 2, 1]);
        assert_eq!(e.len(), 5);
        assert_eq!(
            edges_hist(&[0.0, 0.5, 1.0, 1.5], &[0.0, 1.0, 1.5]),
            vec![2, 2]
        );
        assert_eq!(floor_div_f32(7.0, 2.0), 3.0);
        assert_eq!(floor_div_f32(-7.0, 2.0), -4.0);
        assert_eq!(arange_f32(1.0, 2.0, 0.25), vec![1.0, 1.25, 1.5, 1.75]);
        assert_eq!(search_left(&[0.1, 0.5, 1.0], 0.5), 1);
    }
}
