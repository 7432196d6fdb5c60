//! The running histogram shared by the clipping observers ([`super::PercentileObserver`],
//! [`super::EntropyObserver`], [`super::MseObserver`]).
//!
//! The histogram always covers a range `[lo, hi]` that contains 0 (quantized ranges do
//! too, so no candidate clipping range is lost). A batch that widens the range re-bins the
//! old counts onto the new range, each old bin's count spread over the new bins in
//! proportion to their overlap (mass is conserved exactly; only its position within an old
//! bin is approximated as uniform). Counts are `f64`.

use ndarray::ArrayViewD;

use super::tensor_min_max;
use crate::error::{QuantError, Result};

/// A fixed number of equal-width bins over a range that grows with the data.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ClipHistogram {
    pub(crate) counts: Vec<f64>,
    pub(crate) lo: f32,
    pub(crate) hi: f32,
    /// The exact data range seen (for `observed_range`).
    pub(crate) seen: Option<(f32, f32)>,
}

/// Bins must be at least this many (and at most `1 << 24`).
pub(crate) const MIN_BINS: usize = 16;

pub(crate) fn check_bins(bins: usize, kind: &'static str) -> Result<()> {
    if !(MIN_BINS..=1 << 24).contains(&bins) {
        return Err(QuantError::UnsupportedConfig {
            context: kind.into(),
            reason: format!("{bins} bins; use between {MIN_BINS} and 2^24 (2048 is usual)"),
        });
    }
    Ok(())
}

impl ClipHistogram {
    pub(crate) fn new(bins: usize) -> Self {
        ClipHistogram {
            counts: vec![0.0; bins],
            lo: 0.0,
            hi: 0.0,
            seen: None,
        }
    }

    pub(crate) fn bins(&self) -> usize {
        self.counts.len()
    }

    pub(crate) fn total(&self) -> f64 {
        self.counts.iter().sum()
    }

    pub(crate) fn reset(&mut self) {
        let n = self.bins();
        *self = Self::new(n);
    }

    pub(crate) fn width(&self) -> f64 {
        (self.hi as f64 - self.lo as f64) / self.bins() as f64
    }

    /// The left edge of bin `i` (`i == bins` gives `hi`).
    pub(crate) fn edge(&self, i: usize) -> f64 {
        self.lo as f64 + self.width() * i as f64
    }

    /// The bin index of a value inside `[lo, hi]`.
    fn index(&self, v: f32) -> usize {
        let w = self.width();
        if w <= 0.0 {
            return 0;
        }
        let i = ((v as f64 - self.lo as f64) / w).floor();
        (i.max(0.0) as usize).min(self.bins() - 1)
    }

    /// Re-bins the counts onto `[lo, hi]` (which contains the current range).
    fn grow(&mut self, lo: f32, hi: f32) {
        if lo == self.lo && hi == self.hi {
            return;
        }
        let n = self.bins();
        let old = std::mem::replace(&mut self.counts, vec![0.0; n]);
        let (olo, ow) = (self.lo as f64, self.width());
        self.lo = lo;
        self.hi = hi;
        let nw = self.width();
        for (i, &c) in old.iter().enumerate() {
            if c == 0.0 {
                continue;
            }
            let a = olo + ow * i as f64;
            let b = a + ow;
            if ow <= 0.0 || nw <= 0.0 {
                let j = self.index(a as f32);
                self.counts[j] += c;
                continue;
            }
            // Spread c over the new bins [a, b) overlaps.
            let first = (((a - lo as f64) / nw).floor().max(0.0) as usize).min(n - 1);
            let last = ((((b - lo as f64) / nw).ceil().max(1.0) as usize) - 1).min(n - 1);
            for j in first..=last {
                let l = (lo as f64 + nw * j as f64).max(a);
                let r = (lo as f64 + nw * (j + 1) as f64).min(b);
                if r > l {
                    self.counts[j] += c * (r - l) / ow;
                }
            }
        }
    }

    /// Adds a batch.
    pub(crate) fn observe(&mut self, x: &ArrayViewD<'_, f32>, kind: &'static str) -> Result<()> {
        let Some((mn, mx)) = tensor_min_max(x, kind)? else {
            return Ok(());
        };
        self.widen(mn, mx);
        for &v in x.iter() {
            let i = self.index(v);
            self.counts[i] += 1.0;
        }
        Ok(())
    }

    fn widen(&mut self, mn: f32, mx: f32) {
        let (lo, hi) = match self.seen {
            None => (mn.min(0.0), mx.max(0.0)),
            Some(_) => (self.lo.min(mn), self.hi.max(mx)),
        };
        self.seen = Some(match self.seen {
            None => (mn, mx),
            Some((a, b)) => (a.min(mn), b.max(mx)),
        });
        if self.total() == 0.0 {
            self.lo = lo;
            self.hi = hi;
        } else {
            self.grow(lo, hi);
        }
    }

    /// Folds another histogram in: both are re-binned onto the union of their ranges and
    /// added bin by bin.
    pub(crate) fn merge(&mut self, other: &ClipHistogram) {
        let Some((mn, mx)) = other.seen else {
            return;
        };
        let mut theirs = other.clone();
        self.widen(mn, mx);
        theirs.grow(self.lo, self.hi);
        for (a, b) in self.counts.iter_mut().zip(theirs.counts.iter()) {
            *a += b;
        }
    }

    /// The smallest value `v` such that a fraction `q` of the mass lies below it
    /// (interpolated linearly inside a bin).
    pub(crate) fn quantile(&self, q: f64) -> f64 {
        let total = self.total();
        let target = q.clamp(0.0, 1.0) * total;
        let mut acc = 0.0;
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0.0 && acc + c >= target {
                let frac = ((target - acc) / c).clamp(0.0, 1.0);
                return self.edge(i) + frac * self.width();
            }
            acc += c;
        }
        self.hi as f64
    }

    /// The bin that contains 0 (its left edge is at or below 0).
    pub(crate) fn zero_bin(&self) -> usize {
        self.index(0.0)
    }

    /// Candidate clipping ranges as bin intervals `[left, right)`, shrinking from the
    /// whole histogram toward the zero bin in `steps` equal steps, never narrower than
    /// `min_bins` bins (unless the histogram has fewer).
    pub(crate) fn candidates(&self, min_bins: usize) -> Vec<(usize, usize)> {
        let n = self.bins();
        let z = self.zero_bin();
        let mut out = Vec::new();
        for j in 1..=n {
            let f = j as f64 / n as f64;
            let left = z - ((z as f64) * f).round() as usize;
            let right = (z + (((n - z) as f64) * f).round() as usize).clamp(z + 1, n);
            if right - left >= min_bins.min(n) {
                out.push((left, right));
            }
        }
        out.dedup();
        out
    }
}

/// Implements [`super::Observer`] for a clipping observer with fields `cfg`, `hist` and a
/// method `clip_range(&self) -> Option<(f32, f32)>`; `$same` compares the observers'
/// own parameters for `merge`.
macro_rules! impl_clip_observer {
    ($ty:ty, $kind:expr, $same:expr) => {
        impl $crate::observer::Observer for $ty {
            fn kind(&self) -> &'static str {
                $kind
            }

            fn observe(&mut self, x: ::ndarray::ArrayViewD<'_, f32>) -> $crate::error::Result<()> {
                self.hist.observe(&x, $kind)
            }

            fn qparams(&self) -> $crate::error::Result<$crate::qparams::QParams> {
                let (lo, hi) = self
                    .clip_range()
                    .ok_or_else(|| $crate::observer::uncalibrated($kind))?;
                $crate::observer::minmax::per_tensor_qparams(&self.cfg, lo, hi)
            }

            fn reset(&mut self) {
                self.hist.reset();
            }

            fn is_calibrated(&self) -> bool {
                self.hist.seen.is_some()
            }

            fn observed_range(&self) -> Option<(f32, f32)> {
                self.hist.seen
            }

            fn merge(
                &mut self,
                other: &dyn $crate::observer::Observer,
            ) -> $crate::error::Result<()> {
                let o = $crate::observer::peer(self, other)?;
                let same: fn(&$ty, &$ty) -> bool = $same;
                if o.cfg != self.cfg || o.hist.bins() != self.hist.bins() || !same(self, o) {
                    return Err($crate::observer::config_mismatch(
                        $kind,
                        "range configuration, bins or clipping parameter",
                    ));
                }
                self.hist.merge(&o.hist);
                Ok(())
            }

            fn fresh(&self) -> Box<dyn $crate::observer::Observer> {
                let mut f = self.clone();
                f.hist.reset();
                Box::new(f)
            }

            fn as_any(&self) -> &dyn ::std::any::Any {
                self
            }
        }
    };
}
pub(crate) use impl_clip_observer;

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array;

    #[test]
    fn growing_conserves_mass_and_merge_equals_one_stream_on_a_shared_range() {
        let a = Array::linspace(-1.0f32, 1.0, 1000).into_dyn();
        let b = Array::linspace(-3.0f32, 5.0, 777).into_dyn();
        let mut one = ClipHistogram::new(64);
        one.observe(&a.view(), "t").unwrap();
        one.observe(&b.view(), "t").unwrap();
        assert!((one.total() - 1777.0).abs() < 1e-9);
        assert_eq!((one.lo, one.hi), (-3.0, b[776]));
        let mut x = ClipHistogram::new(64);
        x.observe(&b.view(), "t").unwrap();
        let mut y = ClipHistogram::new(64);
        y.observe(&b.view(), "t").unwrap();
        x.merge(&y);
        let mut both = ClipHistogram::new(64);
        both.observe(&b.view(), "t").unwrap();
        both.observe(&b.view(), "t").unwrap();
        assert_eq!(x, both);
        assert!((one.quantile(0.5) - 0.6).abs() < 0.5);
    }
}
