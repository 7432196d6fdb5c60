//! x86-64 kernels: the only `unsafe` code in the crate.
//!
//! [`Avx2`] is a token that exists only once AVX2 and FMA were detected at run time; its
//! methods check every slice length and then call the `#[target_feature]` bodies in
//! [`avx2`] and [`avx512_vnni`]. The GEMM micro-kernels ([`Avx2Kernel`] and the AVX-512
//! VNNI [`Vnni8x32`] with its edge tiles) implement `kernels::gemm::GemmKernel`, each in
//! the file of its instruction set.
#![deny(clippy::undocumented_unsafe_blocks)]

mod avx2;
mod avx512_vnni;
mod depthwise_avx2;
mod depthwise_avx512;
mod gemv_avx512;
mod layout;

pub(crate) use avx2::Avx2Kernel;
#[cfg(test)]
pub(crate) use avx2::Avx2TwoPass;
#[cfg(test)]
pub(crate) use avx512_vnni::{Vnni12x16, Vnni4x16, Vnni4x32, Vnni8x16};
pub(crate) use avx512_vnni::{Vnni12x32, Vnni8x32};

use crate::kernels::pack::{PackedWeights, NR};
use crate::kernels::requant::RequantParams;
pub(crate) use avx2::ColParams;

/// Proof that the running CPU has AVX2 and FMA; `vnni` is set only when it also has
/// AVX-512F/BW and AVX-512 VNNI and the caller asked for them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2 {
    vnni: bool,
}

impl Avx2 {
    /// Detects AVX2 and FMA; with `want_vnni`, also AVX-512 VNNI.
    pub(crate) fn detect(want_vnni: bool) -> Option<Self> {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Some(Avx2 {
                vnni: want_vnni && Self::vnni_available(),
            })
        } else {
            None
        }
    }

    /// Whether the CPU has AVX-512F/BW and AVX-512 VNNI.
    pub(crate) fn vnni_available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// Whether tiles use the AVX-512 VNNI kernel.
    pub(crate) fn vnni(self) -> bool {
        self.vnni
    }

    /// Requantizes `rows x cols` of one panel's slice of a tile (`acc` is `[row][NR]`)
    /// starting at global column `j0` into `out[r * ldc + c]`; `rowsum` holds the `rows`
    /// row sums, or is empty when every weight zero point is 0. AVX-512 (sixteen lanes)
    /// where the token enables it, else AVX2 + FMA (eight).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn requant_tile(
        self,
        acc: &[i32],
        rows: usize,
        cols: usize,
        rowsum: &[i32],
        a_zp: i32,
        w: &PackedWeights,
        rq: &RequantParams,
        j0: usize,
        out: &mut [u8],
        ldc: usize,
    ) {
        assert!(cols <= NR && acc.len() >= rows * NR);
        assert!(rowsum.is_empty() || rowsum.len() >= rows);
        assert!(rowsum.is_empty() || w.w_zp.len() >= j0 + NR);
        assert!(
            j0.is_multiple_of(NR) && j0 + NR <= w.col_offsets.len() && j0 + NR <= rq.mult.len()
        );
        assert!(rq.bias_b.len() >= j0 + NR && rq.bias_s.len() >= j0 + NR);
        assert!(rows == 0 || out.len() >= (rows - 1) * ldc + cols);
        let p = ColParams {
            col_off: w.col_offsets.as_ptr(),
            w_zp: w.w_zp.as_ptr(),
            bias_b: rq.bias_b.as_ptr(),
            bias_s: rq.bias_s.as_ptr(),
            mult: rq.mult.as_ptr(),
            a_zp,
            out_zp: rq.out_zp,
            lo: rq.lo,
        };
        let rs = if rowsum.is_empty() {
            std::ptr::null()
        } else {
            rowsum.as_ptr()
        };
        if self.vnni {
            // SAFETY: `vnni` is only set after detecting AVX-512F/BW/VNNI; the asserts
            // cover every read (columns j0..j0 + NR of the padded parameter vectors, `rows`
            // row sums unless null, `rows * NR` accumulators) and every write
            // (`out[r * ldc + c]`, r < rows, c < cols).
            unsafe {
                avx512_vnni::requant_tile(
                    acc.as_ptr(),
                    rows,
                    cols,
                    rs,
                    &p,
                    j0,
                    out.as_mut_ptr(),
                    ldc,
                )
            }
        } else {
            // SAFETY: the token proves AVX2 + FMA; the asserts cover every read (columns
            // j0..j0 + NR of the padded parameter vectors, `rows` row sums unless null,
            // `rows * NR` accumulators) and every write (`out[r * ldc + c]`, r < rows,
            // c < cols).
            unsafe {
                avx2::requant_tile(acc.as_ptr(), rows, cols, rs, &p, j0, out.as_mut_ptr(), ldc)
            }
        }
    }
}

impl Avx2 {
    /// `kernels::pool::max_pool_nhwc`'s loops compiled for AVX2 (32 channels a step).
    pub(crate) fn max_pool_nhwc(
        self,
        x: &[u8],
        g: &crate::kernels::pool::PoolGeom,
        out: &mut [u8],
    ) {
        // SAFETY: the token proves AVX2; the body is safe code (slices).
        unsafe { avx2::max_pool_nhwc(x, g, out) }
    }

    /// `kernels::pool::avg_pool_nhwc`'s loops compiled for AVX2.
    pub(crate) fn avg_pool_nhwc(
        self,
        x: &[u8],
        g: &crate::kernels::pool::PoolGeom,
        p: &crate::kernels::pool::AvgParams,
        out: &mut [u8],
    ) {
        // SAFETY: the token proves AVX2; the body is safe code (slices).
        unsafe { avx2::avg_pool_nhwc(x, g, p, out) }
    }

    /// The vectorized quantized add (see `kernels::elementwise`), eight lanes at a time
    /// with FMA; the last `len % 8` elements through the scalar definition.
    pub(crate) fn add_u8(
        self,
        a: &[u8],
        b: &[u8],
        p: &crate::kernels::elementwise::AddParams,
        out: &mut [u8],
    ) {
        let n = out.len();
        assert!(a.len() == n && b.len() == n);
        let n8 = n / 8 * 8;
        // SAFETY: the token proves AVX2 + FMA; `a`, `b` and `out` hold `n >= n8` bytes
        // (asserted) and the body reads and writes bytes `0..n8` only.
        unsafe { avx2::add_u8(a.as_ptr(), b.as_ptr(), n8, p, out.as_mut_ptr()) }
        for i in n8..n {
            out[i] = p.one(a[i], b[i]);
        }
    }
}

impl Avx2 {
    /// The SIMD part of `elementwise::quantize_u8`: quantizes the longest prefix that
    /// fills whole registers (16 lanes with AVX-512, else 8); returns its length and
    /// whether its inputs were all finite.
    pub(crate) fn quantize_u8(
        self,
        src: &[f32],
        inv: f32,
        zpf: f32,
        dst: &mut [u8],
    ) -> (usize, bool) {
        let n = src.len().min(dst.len());
        if self.vnni {
            let n16 = n / 16 * 16;
            // SAFETY: `vnni` is only set after detecting AVX-512F/BW; the body reads
            // `src[..n16]` and writes `dst[..n16]`, both within the slices.
            let ok =
                unsafe { avx512_vnni::quantize_u8(src.as_ptr(), n16, inv, zpf, dst.as_mut_ptr()) };
            (n16, ok)
        } else {
            let n8 = n / 8 * 8;
            // SAFETY: the token proves AVX2; the body reads `src[..n8]` and writes
            // `dst[..n8]`, both within the slices.
            let ok = unsafe { avx2::quantize_u8(src.as_ptr(), n8, inv, zpf, dst.as_mut_ptr()) };
            (n8, ok)
        }
    }

    /// The SIMD part of `elementwise::dequantize_u8`: the longest prefix of whole
    /// registers; returns its length.
    pub(crate) fn dequantize_u8(self, src: &[u8], scale: f32, zp: u8, dst: &mut [f32]) -> usize {
        let n = src.len().min(dst.len());
        if self.vnni {
            let n16 = n / 16 * 16;
            // SAFETY: `vnni` is only set after detecting AVX-512F/BW; the body reads
            // `src[..n16]` and writes `dst[..n16]`, both within the slices.
            unsafe { avx512_vnni::dequantize_u8(src.as_ptr(), n16, scale, zp, dst.as_mut_ptr()) };
            n16
        } else {
            let n8 = n / 8 * 8;
            // SAFETY: the token proves AVX2; the body reads `src[..n8]` and writes
            // `dst[..n8]`, both within the slices.
            unsafe { avx2::dequantize_u8(src.as_ptr(), n8, scale, zp, dst.as_mut_ptr()) };
            n8
        }
    }
}

impl Avx2 {
    /// `elementwise::quantize_u8` into a new vector, without zero-filling it first;
    /// `None` when an input is not finite.
    pub(crate) fn quantize_u8_vec(self, src: &[f32], inv: f32, zpf: f32) -> Option<Vec<u8>> {
        let n = src.len();
        let mut v: Vec<u8> = Vec::with_capacity(n);
        let dst = v.spare_capacity_mut().as_mut_ptr() as *mut u8;
        let (done, ok) = if self.vnni {
            let n16 = n / 16 * 16;
            // SAFETY: `vnni` is only set after detecting AVX-512F/BW; the body reads
            // `src[..n16]` and writes the first n16 <= n bytes of `v`'s capacity.
            let ok = unsafe { avx512_vnni::quantize_u8(src.as_ptr(), n16, inv, zpf, dst) };
            (n16, ok)
        } else {
            let n8 = n / 8 * 8;
            // SAFETY: the token proves AVX2; the body reads `src[..n8]` and writes the
            // first n8 <= n bytes of `v`'s capacity.
            let ok = unsafe { avx2::quantize_u8(src.as_ptr(), n8, inv, zpf, dst) };
            (n8, ok)
        };
        let mut finite = ok;
        for (i, &x) in src.iter().enumerate().skip(done) {
            finite &= x.is_finite();
            let q = crate::qparams::quantize_val_8bit(x, inv, zpf, 0.0, 255.0) as u8;
            // SAFETY: i < n, within `v`'s capacity.
            unsafe { dst.add(i).write(q) };
        }
        // SAFETY: the SIMD body wrote bytes 0..done and the loop done..n: all n are
        // initialized, and n is the capacity reserved above.
        unsafe { v.set_len(n) };
        finite.then_some(v)
    }

    /// `elementwise::dequantize_u8` into a new vector, without zero-filling it first.
    pub(crate) fn dequantize_u8_vec(self, src: &[u8], scale: f32, zp: u8) -> Vec<f32> {
        let n = src.len();
        let mut v: Vec<f32> = Vec::with_capacity(n);
        let dst = v.spare_capacity_mut().as_mut_ptr() as *mut f32;
        let done = if self.vnni {
            let n16 = n / 16 * 16;
            // SAFETY: `vnni` is only set after detecting AVX-512F/BW; the body reads
            // `src[..n16]` and writes the first n16 <= n values of `v`'s capacity.
            unsafe { avx512_vnni::dequantize_u8(src.as_ptr(), n16, scale, zp, dst) };
            n16
        } else {
            let n8 = n / 8 * 8;
            // SAFETY: the token proves AVX2; the body reads `src[..n8]` and writes the
            // first n8 <= n values of `v`'s capacity.
            unsafe { avx2::dequantize_u8(src.as_ptr(), n8, scale, zp, dst) };
            n8
        };
        for (i, &q) in src.iter().enumerate().skip(done) {
            let f = (q as i32 - zp as i32) as f32 * scale;
            // SAFETY: i < n, within `v`'s capacity.
            unsafe { dst.add(i).write(f) };
        }
        // SAFETY: the SIMD body wrote values 0..done and the loop done..n: all n are
        // initialized, and n is the capacity reserved above.
        unsafe { v.set_len(n) };
        v
    }
}

/// Sum of a byte slice, 16 bytes at a time through SSE2 `psadbw` (exact: the partial sums
/// are `u64`); the result wraps to `i32` as a `u32` sum would.
pub(crate) fn row_sum_u8(row: &[u8]) -> i32 {
    use std::arch::x86_64::*;
    let chunks = row.chunks_exact(16);
    let rest: u32 = chunks.remainder().iter().map(|&v| v as u32).sum();
    // SAFETY: SSE2 is part of x86-64; each load reads one 16-byte chunk of `row`.
    let total = unsafe {
        let zero = _mm_setzero_si128();
        let mut acc = _mm_setzero_si128();
        for c in chunks {
            let v = _mm_loadu_si128(c.as_ptr() as *const __m128i);
            acc = _mm_add_epi64(acc, _mm_sad_epu8(v, zero));
        }
        let hi = _mm_unpackhi_epi64(acc, acc);
        _mm_cvtsi128_si64(_mm_add_epi64(acc, hi)) as u64
    };
    (total as u32).wrapping_add(rest) as i32
}

/// Transposes one 16x16 byte block with SSE2 (part of x86-64's baseline): four rounds of
/// `out[2i + h] = unpack{lo,hi}_epi8(in[i], in[i + 8])`, each of which rotates the 8-bit
/// (row, byte) index left by one; four rotations swap row and byte.
///
/// # Safety
/// `src + r * sstride + 0..16` readable and `dst + c * dstride + 0..16` writable for
/// `r, c < 16`.
#[inline(always)]
unsafe fn transpose16x16(src: *const u8, sstride: usize, dst: *mut u8, dstride: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller upholds this function's `# Safety` contract (the pointer
    // ranges); SSE2 is part of x86-64.
    unsafe {
        let mut a = [_mm_setzero_si128(); 16];
        for (r, v) in a.iter_mut().enumerate() {
            *v = _mm_loadu_si128(src.add(r * sstride) as *const __m128i);
        }
        for _ in 0..4 {
            let mut b = [_mm_setzero_si128(); 16];
            for i in 0..8 {
                b[2 * i] = _mm_unpacklo_epi8(a[i], a[i + 8]);
                b[2 * i + 1] = _mm_unpackhi_epi8(a[i], a[i + 8]);
            }
            a = b;
        }
        for (c, v) in a.iter().enumerate() {
            _mm_storeu_si128(dst.add(c * dstride) as *mut __m128i, *v);
        }
    }
}

/// Transposes the `r8 x c8` top-left part (multiples of 8) of a `rows x cols` byte matrix
/// (row stride `cols`) into `dst` (row stride `rows`): 16x16 SSE2 blocks, then 8x8 blocks
/// for the stripes left over.
pub(crate) fn transpose_blocks_u8(src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) {
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
    let (r16, c16) = (rows / 16 * 16, cols / 16 * 16);
    for r0 in (0..r16).step_by(16) {
        for c0 in (0..c16).step_by(16) {
            // SAFETY: the block reads rows r0..r0 + 16 at columns c0..c0 + 16 (< rows *
            // cols, asserted) and writes rows c0..c0 + 16 of `dst` at columns r0..r0 + 16
            // (< cols * rows).
            unsafe {
                transpose16x16(
                    src.as_ptr().add(r0 * cols + c0),
                    cols,
                    dst.as_mut_ptr().add(c0 * rows + r0),
                    rows,
                )
            }
        }
    }
    for r0 in (0..r8).step_by(8) {
        // Within the 16x16 rows, only the columns past c16 are left.
        let c_start = if r0 < r16 { c16 } else { 0 };
        for c0 in (c_start..c8).step_by(8) {
            // SAFETY: SSE2 is part of x86-64; the block reads rows r0..r0 + 8 at columns
            // c0..c0 + 8 (< rows * cols, asserted) and writes rows c0..c0 + 8 of `dst` at
            // columns r0..r0 + 8 (< cols * rows).
            unsafe {
                avx2::transpose8x8(
                    src.as_ptr().add(r0 * cols + c0),
                    cols,
                    dst.as_mut_ptr().add(c0 * rows + r0),
                    rows,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn row_sum_u8_matches_scalar_sum() {
        for len in [0, 1, 15, 16, 17, 31, 64, 100, 576, 1153] {
            let row: Vec<u8> = (0..len).map(|i| (i * 97 % 256) as u8).collect();
            let want: u32 = row.iter().map(|&v| v as u32).sum();
            assert_eq!(super::row_sum_u8(&row), want as i32, "len {len}");
            let full = vec![255u8; len];
            assert_eq!(super::row_sum_u8(&full), 255 * len as i32, "len {len}");
        }
    }

    #[test]
    fn transpose_blocks_match_naive() {
        for &(rows, cols) in &[
            (8, 8),
            (16, 16),
            (24, 40),
            (33, 17),
            (48, 16),
            (16, 72),
            (64, 9),
        ] {
            let src: Vec<u8> = (0..rows * cols).map(|i| (i * 37 % 251) as u8).collect();
            let mut dst = vec![0u8; rows * cols];
            super::transpose_blocks_u8(&src, rows, cols, &mut dst);
            for r in 0..rows / 8 * 8 {
                for c in 0..cols / 8 * 8 {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }
}
