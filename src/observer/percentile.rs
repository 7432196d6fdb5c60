//! [`PercentileObserver`]: clip the range to a percentile of the observed values.

use super::clip_hist::{check_bins, impl_clip_observer, ClipHistogram};
use super::minmax::per_tensor_only;
use crate::error::{QuantError, Result};
use crate::qparams::RangeConfig;

const KIND: &str = "PercentileObserver";

/// Clips the quantization range so that a given percentile of the observed values lies
/// inside it (ONNX Runtime's and TensorRT's "percentile" calibration), ignoring rare
/// outliers.
///
/// A running histogram (`bins` equal bins over a range that contains 0 and grows with the
/// data; old counts are re-binned proportionally when it grows) records every value. The
/// clipping range drops `(100 - percentile) / 2` percent of the mass in each tail:
/// `lo` is the `(100 - p) / 200` quantile and `hi` the `1 - (100 - p) / 200` quantile,
/// interpolated linearly inside a bin; the range is then widened to include 0 and mapped
/// to scale and zero point like [`super::MinMaxObserver`] (a symmetric scheme uses
/// `max(|lo|, |hi|)`). With `percentile = 100` it equals the min/max range up to rounding.
///
/// **Merge**: both histograms are re-binned onto the union of their ranges and added.
/// When both observers ended on the same histogram range this is exactly the histogram of
/// all data observed by one observer; otherwise it equals it up to where mass lies inside
/// a bin (total mass and per-region mass to one bin's width are preserved).
///
/// # Examples
/// ```
/// use ndarray::Array;
/// use ptq::observer::{Observer, PercentileObserver};
/// let mut obs = PercentileObserver::default();
/// let mut x = Array::linspace(0.0f32, 1.0, 100_000);
/// x[99_999] = 1000.0; // one outlier in 100 000; 99.99% keeps all but 5 in each tail
/// obs.observe(x.view().into_dyn())?;
/// let (_, hi) = obs.clip_range().unwrap();
/// assert!(hi < 2.0, "the outlier is clipped: {hi}");
/// assert!(obs.qparams()?.scale() < 2.0 / 127.0);
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PercentileObserver {
    cfg: RangeConfig,
    percentile: f64,
    hist: ClipHistogram,
}

impl PercentileObserver {
    /// A percentile observer, e.g. `percentile = 99.99` with 2048 bins.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for a per-channel scheme, a percentile outside
    /// `(50, 100]`, or a bin count outside `16..=2^24`.
    ///
    /// # Examples
    /// ```
    /// use ptq::observer::PercentileObserver;
    /// use ptq::{DType, QScheme, RangeConfig};
    /// let cfg = RangeConfig::new(DType::QUInt8, QScheme::PerTensorAffine, true, None, f32::EPSILON)?;
    /// let obs = PercentileObserver::new(cfg, 99.9, 2048)?;
    /// assert!(PercentileObserver::new(cfg, 20.0, 2048).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(cfg: RangeConfig, percentile: f64, bins: usize) -> Result<Self> {
        per_tensor_only(&cfg, KIND)?;
        check_bins(bins, KIND)?;
        if !(percentile > 50.0 && percentile <= 100.0) {
            return Err(QuantError::UnsupportedConfig {
                context: KIND.into(),
                reason: format!("percentile {percentile} is not in (50, 100]"),
            });
        }
        Ok(PercentileObserver {
            cfg,
            percentile,
            hist: ClipHistogram::new(bins),
        })
    }

    /// The percentile kept.
    pub fn percentile(&self) -> f64 {
        self.percentile
    }

    /// The histogram: counts and the `(lo, hi)` range its equal bins cover.
    pub fn histogram(&self) -> (&[f64], f32, f32) {
        (&self.hist.counts, self.hist.lo, self.hist.hi)
    }

    /// The clipping range `(lo, hi)` chosen from what was observed, or `None` before any
    /// data.
    pub fn clip_range(&self) -> Option<(f32, f32)> {
        self.hist.seen?;
        let tail = (100.0 - self.percentile) / 200.0;
        let lo = self.hist.quantile(tail) as f32;
        let hi = self.hist.quantile(1.0 - tail) as f32;
        Some((lo.min(0.0), hi.max(0.0)))
    }
}

impl Default for PercentileObserver {
    /// quint8 affine with `reduce_range` (fbgemm's activations), 99.99th percentile, 2048
    /// bins.
    fn default() -> Self {
        let cfg = crate::qconfig::ObserverSpec::percentile(
            crate::DType::QUInt8,
            crate::QScheme::PerTensorAffine,
            99.99,
        )
        .with_reduce_range(true)
        .range_config()
        .unwrap_or_else(|_| unreachable!("a valid preset"));
        PercentileObserver {
            cfg,
            percentile: 99.99,
            hist: ClipHistogram::new(2048),
        }
    }
}

impl_clip_observer!(PercentileObserver, KIND, |a, b| a.percentile
    == b.percentile);
