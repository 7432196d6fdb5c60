//! Weight packing, done once when a layer is converted.
//!
//! The `n x k` weight matrix (row `j` = output column `j`, PyTorch's `[out, in]` layout) is
//! stored in panels of [`NR`] columns. `k` is padded with zeros to a multiple of 4. Inside
//! a panel, each group of 4 consecutive `k` holds `NR x 4` bytes: column `c`'s four weights
//! at bytes `4c..4c + 4`. That is the operand layout of `vpmaddubsw` (4 bytes per 32-bit
//! lane), and the portable kernel reads the same layout.

use crate::error::{QuantError, Result};
use crate::kernels::requant::round_up;

/// Columns per packed panel (two AVX2 registers of eight `i32` lanes).
pub const NR: usize = 16;

/// An `i8` weight matrix packed for the GEMM, with its zero points and column offsets.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeights {
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) kp: usize,
    pub(crate) data: Vec<i8>,
    /// `sum_k w[j][k] - w_zp[j] * k` (fbgemm's `col_offsets`), wrapping, padded to a panel.
    pub(crate) col_offsets: Vec<i32>,
    /// Per-column weight zero point, padded to a panel.
    pub(crate) w_zp: Vec<i32>,
    /// All weights lie in `[-64, 63]`: `vpmaddubsw` cannot saturate whatever the
    /// activations.
    pub(crate) narrow: bool,
    /// Every weight zero point is 0 (symmetric weights, fbgemm's default): the GEMM needs
    /// no activation row sums.
    pub(crate) zp_zero: bool,
}

impl PackedWeights {
    /// Packs a row-major `n x k` matrix of `i8` weights with one zero point (per-tensor)
    /// or `n` (per-channel).
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] when `w.len() != n * k` or the number of zero points
    /// is neither 1 nor `n`.
    ///
    /// # Examples
    /// ```
    /// use ptq::kernels::PackedWeights;
    /// let w: Vec<i8> = vec![1, -2, 3, 4, 5, -6];
    /// let p = PackedWeights::new(&w, 2, 3, &[0])?;
    /// assert_eq!((p.n(), p.k()), (2, 3));
    /// assert!(PackedWeights::new(&w, 4, 3, &[0]).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(w: &[i8], n: usize, k: usize, w_zp: &[i32]) -> Result<Self> {
        Self::with_real_depth(w, n, k, w_zp, k)
    }

    /// As [`PackedWeights::new`] for a matrix whose `k` includes `k - k_real` padding
    /// positions (zero weights, e.g. each kernel row of a convolution rounded up to whole
    /// 4-byte groups): the column offsets count only the `k_real` real ones, so the GEMM
    /// is exact whatever activations meet the padding, as long as the activation row sums
    /// leave them out too.
    pub(crate) fn with_real_depth(
        w: &[i8],
        n: usize,
        k: usize,
        w_zp: &[i32],
        k_real: usize,
    ) -> Result<Self> {
        const CTX: &str = "PackedWeights";
        if n.checked_mul(k) != Some(w.len()) {
            return Err(QuantError::ShapeMismatch {
                context: CTX.into(),
                expected: format!("{n} x {k} = {} weights", n.saturating_mul(k)),
                actual: format!("{} weights", w.len()),
            });
        }
        if w_zp.len() != 1 && w_zp.len() != n {
            return Err(QuantError::ShapeMismatch {
                context: CTX.into(),
                expected: format!("1 or {n} weight zero points"),
                actual: format!("{} weight zero points", w_zp.len()),
            });
        }
        let kp = round_up(k, 4);
        let np = round_up(n.max(1), NR);
        let mut data = vec![0i8; np * kp];
        let mut col_offsets = vec![0i32; np];
        let mut zps = vec![0i32; np];
        let mut narrow = true;
        for j in 0..n {
            let row = &w[j * k..(j + 1) * k];
            let zp = if w_zp.len() == 1 { w_zp[0] } else { w_zp[j] };
            let panel = j / NR;
            let c = j % NR;
            let mut sum = 0i32;
            for (kk, &v) in row.iter().enumerate() {
                sum = sum.wrapping_add(v as i32);
                narrow &= (-64..=63).contains(&v);
                data[panel * kp * NR + (kk / 4) * NR * 4 + c * 4 + kk % 4] = v;
            }
            col_offsets[j] = sum.wrapping_sub(zp.wrapping_mul(k_real as i32));
            zps[j] = zp;
        }
        Ok(PackedWeights {
            n,
            k,
            kp,
            data,
            col_offsets,
            zp_zero: zps.iter().all(|&z| z == 0),
            w_zp: zps,
            narrow,
        })
    }

    /// Number of output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Reduction depth (input features).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held by the packed weights and their per-column offsets and zero points.
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * (self.col_offsets.len() + self.w_zp.len())
    }

    /// Whether every weight lies in `[-64, 63]`, so that the fast AVX2 kernel is exact for
    /// any activations.
    pub fn is_narrow(&self) -> bool {
        self.narrow
    }

    /// The `count` adjacent packed panels from panel `p` (`count * kp * NR` bytes).
    pub(crate) fn panels(&self, p: usize, count: usize) -> &[i8] {
        &self.data[p * self.kp * NR..(p + count) * self.kp * NR]
    }
}

impl PackedWeights {
    /// The row-major `n x k` `i8` weights, unpacked from the panels (the inverse of
    /// [`PackedWeights::new`]).
    ///
    /// # Examples
    /// ```
    /// use ptq::kernels::PackedWeights;
    /// let w: Vec<i8> = vec![1, -2, 3, 4, 5, -6];
    /// assert_eq!(PackedWeights::new(&w, 2, 3, &[0])?.unpack(), w);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn unpack(&self) -> Vec<i8> {
        let mut w = vec![0i8; self.n * self.k];
        for j in 0..self.n {
            let (panel, c) = (j / NR, j % NR);
            for kk in 0..self.k {
                w[j * self.k + kk] =
                    self.data[panel * self.kp * NR + (kk / 4) * NR * 4 + c * 4 + kk % 4];
            }
        }
        w
    }

    /// The `n` per-column weight zero points (all equal for per-tensor weights).
    pub fn zero_points(&self) -> &[i32] {
        &self.w_zp[..self.n]
    }
}
