//! [`EntropyObserver`]: the clipping range that minimizes the KL divergence between the
//! observed distribution and its quantized version (TensorRT's and ONNX Runtime's
//! "entropy" calibration).

use super::clip_hist::{check_bins, impl_clip_observer, ClipHistogram};
use super::minmax::per_tensor_only;
use crate::error::Result;
use crate::qparams::RangeConfig;

const KIND: &str = "EntropyObserver";

/// Chooses the clipping range whose quantized distribution loses the least information:
/// the KL-divergence ("entropy") calibration of TensorRT (Migacz, "8-bit Inference with
/// TensorRT", GTC 2017) and ONNX Runtime's `CalibrationMethod.Entropy`.
///
/// A running histogram (`bins` equal bins over a range that contains 0, re-binned
/// proportionally when the range grows) records every value. Candidate ranges shrink the
/// histogram toward the bin that holds 0, keeping the proportion of the negative and
/// positive sides, down to as many bins as there are quantized levels
/// (`quant_max - quant_min + 1`). For each candidate `[l, r)`:
///
/// * `P` is the histogram restricted to `[l, r)` with the mass outside added to its first
///   and last bins (clipped values land on the range's ends);
/// * `Q` merges the bins of `[l, r)` (without the outliers) into as many groups as there
///   are quantized levels and spreads each group's mass evenly over its bins where `P` is
///   not zero;
/// * the bin that holds 0 counts as much as its neighbour (the spike of values a ReLU
///   zeroed would otherwise dominate the divergence; NVIDIA's pytorch-quantization does
///   the same);
/// * the divergence is `KL(P || Q)` after normalizing both (empty `Q` bins get a tiny
///   floor, so a range that drops mass is penalized, never infinite).
///
/// The candidate with the least divergence wins (the widest on ties within `1e-9`); its edges become the range, mapped to
/// scale and zero point like [`super::MinMaxObserver`]. The search costs
/// `O(bins^2)` (about 4 million steps for 2048 bins), paid once per `qparams` call.
///
/// **Merge**: as [`super::PercentileObserver`]'s: the two histograms are re-binned onto
/// the union of their ranges and added, which is exactly one observer's histogram when
/// both ended on the same range.
///
/// # Examples
/// ```
/// use ndarray::Array;
/// use ptq::observer::{EntropyObserver, Observer};
/// let mut obs = EntropyObserver::default();
/// // A long-tailed (exponential-like) distribution: most mass near 0.
/// let x = Array::from_shape_fn(20_000, |i| -((1.0 - (i as f32 + 0.5) / 20_000.0).ln()));
/// obs.observe(x.view().into_dyn())?;
/// let (_, hi) = obs.clip_range().unwrap();
/// let max = obs.observed_range().unwrap().1;
/// assert!(hi < max, "the tail is clipped: {hi} < {max}");
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct EntropyObserver {
    cfg: RangeConfig,
    hist: ClipHistogram,
}

impl EntropyObserver {
    /// An entropy observer with `bins` histogram bins (2048 is usual).
    ///
    /// # Errors
    /// [`crate::QuantError::UnsupportedConfig`] for a per-channel scheme or a bin count
    /// outside `16..=2^24`.
    ///
    /// # Examples
    /// ```
    /// use ptq::observer::EntropyObserver;
    /// use ptq::{DType, QScheme, RangeConfig};
    /// let cfg = RangeConfig::new(DType::QUInt8, QScheme::PerTensorAffine, false, None, f32::EPSILON)?;
    /// assert!(EntropyObserver::new(cfg, 2048).is_ok());
    /// assert!(EntropyObserver::new(cfg, 3).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(cfg: RangeConfig, bins: usize) -> Result<Self> {
        per_tensor_only(&cfg, KIND)?;
        check_bins(bins, KIND)?;
        Ok(EntropyObserver {
            cfg,
            hist: ClipHistogram::new(bins),
        })
    }

    /// The histogram: counts and the `(lo, hi)` range its equal bins cover.
    pub fn histogram(&self) -> (&[f64], f32, f32) {
        (&self.hist.counts, self.hist.lo, self.hist.hi)
    }

    /// The clipping range of least KL divergence, or `None` before any data.
    pub fn clip_range(&self) -> Option<(f32, f32)> {
        self.hist.seen?;
        let (qmin, qmax) = self.cfg.quant_range();
        let levels = (qmax as i64 - qmin as i64 + 1).max(2) as usize;
        // The bin of 0 holds every value a ReLU zeroed: a spike that would make the
        // divergence favour ranges narrow enough to give it a level of its own. As in
        // NVIDIA's pytorch-quantization, its count is replaced by its neighbour's.
        let mut h = self.hist.counts.clone();
        let z = self.hist.zero_bin();
        let neighbour = if z + 1 < h.len() {
            z + 1
        } else {
            z.saturating_sub(1)
        };
        h[z] = h[neighbour];
        let mut best = (f64::INFINITY, 0, h.len());
        let mut p = Vec::with_capacity(h.len());
        let mut q = Vec::with_capacity(h.len());
        for (l, r) in self.hist.candidates(levels) {
            let below: f64 = h[..l].iter().sum();
            let above: f64 = h[r..].iter().sum();
            p.clear();
            p.extend_from_slice(&h[l..r]);
            p[0] += below;
            let last = p.len() - 1;
            p[last] += above;
            let len = r - l;
            let groups = levels.min(len);
            q.clear();
            q.resize(len, 0.0);
            for g in 0..groups {
                let (a, b) = (g * len / groups, (g + 1) * len / groups);
                let mass: f64 = h[l + a..l + b].iter().sum();
                let support = p[a..b].iter().filter(|&&v| v > 0.0).count();
                if support > 0 {
                    let each = mass / support as f64;
                    for k in a..b {
                        if p[k] > 0.0 {
                            q[k] = each;
                        }
                    }
                }
            }
            let ps: f64 = p.iter().sum();
            let qs: f64 = q.iter().sum();
            if ps <= 0.0 {
                continue;
            }
            let floor = 1e-12;
            let kl: f64 = p
                .iter()
                .zip(q.iter())
                .filter(|(pk, _)| **pk > 0.0)
                .map(|(pk, qk)| {
                    let pn = pk / ps;
                    let qn = if qs > 0.0 {
                        (qk / qs).max(floor)
                    } else {
                        floor
                    };
                    pn * (pn / qn).ln()
                })
                .sum();
            // Candidates come narrowest first: on (near) ties the wider range wins, so
            // data of a few discrete values (pixels), which every range shows without
            // loss, is not clipped.
            if kl <= best.0 + 1e-9 {
                best = (kl, l, r);
            }
        }
        let (_, l, r) = best;
        let lo = self.hist.edge(l) as f32;
        let hi = self.hist.edge(r) as f32;
        Some((lo.min(0.0), hi.max(0.0)))
    }
}

impl Default for EntropyObserver {
    /// quint8 affine with `reduce_range` (fbgemm's activations), 2048 bins.
    fn default() -> Self {
        let cfg = crate::qconfig::ObserverSpec::entropy(
            crate::DType::QUInt8,
            crate::QScheme::PerTensorAffine,
        )
        .with_reduce_range(true)
        .range_config()
        .unwrap_or_else(|_| unreachable!("a valid preset"));
        EntropyObserver {
            cfg,
            hist: ClipHistogram::new(2048),
        }
    }
}

impl_clip_observer!(EntropyObserver, KIND, |_, _| true);
