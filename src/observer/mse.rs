//! [`MseObserver`]: the clipping range that minimizes the expected squared quantization
//! error.

use super::clip_hist::{check_bins, impl_clip_observer, ClipHistogram};
use super::minmax::{per_tensor_only, per_tensor_qparams};
use crate::error::Result;
use crate::qparams::RangeConfig;

const KIND: &str = "MseObserver";

/// Chooses the clipping range that minimizes the mean squared error between the observed
/// values and their quantized-dequantized versions (MSE-optimal clipping, as in
/// TensorFlow Model Optimization's and AIMET's "MSE"/"TF-enhanced" range setting).
///
/// A running histogram (`bins` equal bins over a range containing 0, re-binned
/// proportionally when it grows) records every value. Candidate ranges shrink the
/// histogram toward the bin of 0, keeping the proportion of both sides. For each, the
/// actual scale and zero point are computed (with the configured dtype, scheme and
/// range), and the expected squared error is modelled from the histogram: a value inside
/// the representable range costs the rounding noise `scale^2 / 12`, a value outside it
/// costs the squared distance of its bin's center to the nearest representable end. The
/// cheapest candidate wins. The search costs `O(bins^2)` once per `qparams` call.
///
/// **Merge**: as [`super::PercentileObserver`]'s: histograms are re-binned onto the union
/// of their ranges and added (exact when both ended on the same range).
///
/// # Examples
/// ```
/// use ndarray::Array;
/// use ptq::observer::{MseObserver, Observer};
/// let mut obs = MseObserver::default();
/// // A long-tailed (exponential-like) distribution: clipping the rare large values costs
/// // less than the coarser steps a full range would need.
/// let x = Array::from_shape_fn(20_000, |i| -((1.0 - (i as f32 + 0.5) / 20_000.0).ln()));
/// obs.observe(x.view().into_dyn())?;
/// let (_, hi) = obs.clip_range().unwrap();
/// let max = obs.observed_range().unwrap().1;
/// assert!(hi < max, "{hi} vs {max}");
/// // A single far outlier is kept: clipping it would cost more than the steps it widens.
/// let mut obs = MseObserver::default();
/// let mut x = Array::linspace(0.0f32, 1.0, 10_000);
/// x[0] = 50.0;
/// obs.observe(x.view().into_dyn())?;
/// assert!(obs.clip_range().unwrap().1 > 40.0);
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MseObserver {
    cfg: RangeConfig,
    hist: ClipHistogram,
}

impl MseObserver {
    /// An MSE observer with `bins` histogram bins (2048 is usual).
    ///
    /// # Errors
    /// [`crate::QuantError::UnsupportedConfig`] for a per-channel scheme or a bin count
    /// outside `16..=2^24`.
    ///
    /// # Examples
    /// ```
    /// use ptq::observer::MseObserver;
    /// use ptq::{DType, QScheme, RangeConfig};
    /// let cfg = RangeConfig::new(DType::QInt8, QScheme::PerTensorSymmetric, false, None, f32::EPSILON)?;
    /// assert!(MseObserver::new(cfg, 2048).is_ok());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(cfg: RangeConfig, bins: usize) -> Result<Self> {
        per_tensor_only(&cfg, KIND)?;
        check_bins(bins, KIND)?;
        Ok(MseObserver {
            cfg,
            hist: ClipHistogram::new(bins),
        })
    }

    /// The histogram: counts and the `(lo, hi)` range its equal bins cover.
    pub fn histogram(&self) -> (&[f64], f32, f32) {
        (&self.hist.counts, self.hist.lo, self.hist.hi)
    }

    /// The clipping range of least modelled squared error, or `None` before any data.
    pub fn clip_range(&self) -> Option<(f32, f32)> {
        self.hist.seen?;
        let h = &self.hist.counts;
        let w = self.hist.width();
        let (qmin, qmax) = self.cfg.quant_range();
        let mut best = (f64::INFINITY, 0.0f32, 0.0f32);
        for (l, r) in self.hist.candidates(1) {
            let lo = (self.hist.edge(l) as f32).min(0.0);
            let hi = (self.hist.edge(r) as f32).max(0.0);
            let Ok(qp) = per_tensor_qparams(&self.cfg, lo, hi) else {
                continue;
            };
            let s = qp.scale() as f64;
            let zp = qp.zero_point() as f64;
            let (a, b) = ((qmin as f64 - zp) * s, (qmax as f64 - zp) * s);
            let noise = s * s / 12.0;
            let mut err = 0.0;
            for (k, &c) in h.iter().enumerate() {
                if c == 0.0 {
                    continue;
                }
                let center = self.hist.lo as f64 + w * (k as f64 + 0.5);
                let d = if center < a {
                    a - center
                } else if center > b {
                    center - b
                } else {
                    0.0
                };
                err += c * (d * d + if d == 0.0 { noise } else { 0.0 });
            }
            if err < best.0 {
                best = (err, lo, hi);
            }
        }
        Some((best.1, best.2))
    }
}

impl Default for MseObserver {
    /// quint8 affine with `reduce_range` (fbgemm's activations), 2048 bins.
    fn default() -> Self {
        let cfg = crate::qconfig::ObserverSpec::mse(
            crate::DType::QUInt8,
            crate::QScheme::PerTensorAffine,
        )
        .with_reduce_range(true)
        .range_config()
        .unwrap_or_else(|_| unreachable!("a valid preset"));
        MseObserver {
            cfg,
            hist: ClipHistogram::new(2048),
        }
    }
}

impl_clip_observer!(MseObserver, KIND, |_, _| true);
