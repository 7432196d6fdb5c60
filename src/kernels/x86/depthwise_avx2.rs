//! The AVX2 depthwise row kernel (see `kernels::depthwise`): two kernel rows widened to
//! `i16` and interleaved per 32-bit lane so that one `vpmaddwd` adds two products per
//! channel (`u8` input times `w - w_zp` within `[-255, 255]`: each pair fits `i32`,
//! exact); 16 channels (two registers) per block, the requantization in registers. Any
//! weights (also those that do not fit `i8`).

use std::arch::x86_64::*;

use super::Avx2;
use crate::kernels::depthwise::{Aligned64, DwParams, RowGeom, AVX2_BLOCK};

/// `i16` values of one channel block of one interleaved column (16 channels x 2 rows).
const BLOCK_WORDS: usize = AVX2_BLOCK * 2;

impl Avx2 {
    /// One depthwise output row with AVX2: `rows` holds the input rows of the kernel rows
    /// (an even count, the last any row when its weights are 0), each `g.w * g.c` bytes
    /// at least; `wq` the weights as `DwWeights::avx2_packed` lays them out; `p` the
    /// parameters in AVX2 accumulator order; `buf` the interleaving scratch; `out`
    /// receives `g.ow * g.c` bytes. The first two rows of `next` (the rows the next output
    /// row reads that this one does not) are prefetched.
    ///
    /// # Panics
    /// When a slice is shorter than the geometry says.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dw_row_avx2(
        self,
        rows: &[&[u8]],
        next: &[&[u8]],
        g: &RowGeom,
        wq: &[Aligned64],
        p: &DwParams,
        buf: &mut [Aligned64],
        out: &mut [u8],
    ) {
        let nb = g.c.div_ceil(AVX2_BLOCK);
        let groups = rows.len() / 2;
        let cp = nb * AVX2_BLOCK;
        assert!(g.c > 0 && g.ow > 0 && g.kw > 0 && rows.len().is_multiple_of(2));
        assert!(rows.iter().chain(next).all(|r| r.len() >= g.w * g.c));
        assert_eq!(g.wn, (g.ow - 1) * g.sx + (g.kw - 1) * g.dx + 1);
        assert!(wq.len() * 32 >= groups * g.kw * nb * BLOCK_WORDS);
        assert!(p.corr.len() >= cp && p.bias_b.len() >= cp);
        assert!(p.bias_s.len() >= cp && p.mult.len() >= cp);
        assert!(buf.len() * 32 >= groups * g.wn * nb * BLOCK_WORDS);
        assert!(out.len() >= g.ow * g.c);
        // SAFETY: the token proves AVX2 + FMA; the asserts cover every access `dw_row`
        // makes (its `# Safety` list).
        unsafe {
            dw_row(
                rows,
                next,
                g,
                wq.as_ptr() as *const i16,
                p,
                buf.as_mut_ptr() as *mut i16,
                out,
            )
        }
    }
}

/// Loads 16 bytes at `src`, or the `n < 16` there and zeros.
///
/// # Safety
/// AVX2 must be available; `src` readable for `min(n, 16)` bytes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load16(src: *const u8, n: usize) -> __m128i {
    // SAFETY: the caller guarantees `min(n, 16)` readable bytes at `src`.
    unsafe {
        if n >= 16 {
            _mm_loadu_si128(src as *const __m128i)
        } else {
            let mut t = [0u8; 16];
            std::ptr::copy_nonoverlapping(src, t.as_mut_ptr(), n);
            _mm_loadu_si128(t.as_ptr() as *const __m128i)
        }
    }
}

/// See [`Avx2::dw_row_avx2`].
///
/// # Safety
/// AVX2 and FMA must be available; with `nb = ceil(c / 16)` and
/// `groups = rows.len() / 2`: every row of `rows` and `next` readable for `g.w * g.c`
/// bytes, `wq` for
/// `groups * kw * nb * 32` values, the four parameter vectors for `nb * 16` values, `buf`
/// writable for `groups * wn * nb * 32` values, `out` for `ow * c` bytes, and
/// `wn == (ow - 1) * sx + (kw - 1) * dx + 1`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dw_row(
    rows: &[&[u8]],
    next: &[&[u8]],
    g: &RowGeom,
    wq: *const i16,
    p: &DwParams,
    buf: *mut i16,
    out: &mut [u8],
) {
    // SAFETY: the caller upholds this function's `# Safety` contract; every pointer below
    // stays inside the ranges it lists (interleaved column j < wn of group gi at
    // `(gi * wn + j) * nb * 32`, weights of (gi, kx) at `(gi * kw + kx) * nb * 32`, input
    // bytes `ix * c + cb * 16 + t` for t below the block's channel count, output bytes
    // `ox * c + cb * 16 + t` likewise).
    unsafe {
        let c = g.c;
        let nb = c.div_ceil(AVX2_BLOCK);
        let groups = rows.len() / 2;
        let col = nb * BLOCK_WORDS;
        let bp = buf;
        let zpw = _mm256_set1_epi16(g.a_zp as i16);
        // 1. Interleave: column j of group gi holds, per channel block, the two rows'
        //    values of each channel side by side (channel order: `avx2_channel`).
        for gi in 0..groups {
            let (r0, r1) = (rows[2 * gi].as_ptr(), rows[2 * gi + 1].as_ptr());
            for j in 0..g.wn {
                let dst = bp.add((gi * g.wn + j) * col);
                match j.checked_sub(g.pw).filter(|&ix| ix < g.w) {
                    None => {
                        for q in 0..nb * 2 {
                            _mm256_storeu_si256(dst.add(16 * q) as *mut __m256i, zpw);
                        }
                    }
                    Some(ix) => {
                        if gi == 0 {
                            for n in next.iter().take(2) {
                                for q in (0..c).step_by(64) {
                                    _mm_prefetch::<_MM_HINT_T1>(
                                        n.as_ptr().add(ix * c + q) as *const i8
                                    );
                                }
                            }
                        }
                        for cb in 0..nb {
                            let off = ix * c + cb * AVX2_BLOCK;
                            let n = c - cb * AVX2_BLOCK;
                            let x0 = _mm256_cvtepu8_epi16(load16(r0.add(off), n));
                            let x1 = _mm256_cvtepu8_epi16(load16(r1.add(off), n));
                            let d = dst.add(cb * BLOCK_WORDS) as *mut __m256i;
                            _mm256_storeu_si256(d, _mm256_unpacklo_epi16(x0, x1));
                            _mm256_storeu_si256(d.add(1), _mm256_unpackhi_epi16(x0, x1));
                        }
                    }
                }
            }
        }
        // 2. Products, requantization and store, one channel block at a time, with the
        //    common windows unrolled.
        match (groups, g.kw) {
            (2, 3) => products::<2, 3>(g, groups, wq, p, bp, out),
            (3, 5) => products::<3, 5>(g, groups, wq, p, bp, out),
            (1, 3) => products::<1, 3>(g, groups, wq, p, bp, out),
            (1, 1) => products::<1, 1>(g, groups, wq, p, bp, out),
            _ => products::<0, 0>(g, groups, wq, p, bp, out),
        }
    }
}

/// The products, requantization and stores of one row from the interleaved buffer `bp`:
/// `G` row groups and `KW` kernel columns known at compile time, or `G == 0` for any
/// (then `groups` and `g.kw` count).
///
/// # Safety
/// As [`dw_row`], with `bp` the interleaved buffer it filled.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn products<const G: usize, const KW: usize>(
    g: &RowGeom,
    groups: usize,
    wq: *const i16,
    p: &DwParams,
    bp: *const i16,
    out: &mut [u8],
) {
    // SAFETY: the caller upholds `dw_row`'s contract: interleaved column j < wn of group
    // gi at `(gi * wn + j) * nb * 32`, weights of (gi, kx) at `(gi * kw + kx) * nb * 32`,
    // output bytes `ox * c + cb * 16 + t` for t below the block's channel count, and
    // `ox * sx + kx * dx < wn` for ox < ow, kx < kw.
    unsafe {
        let c = g.c;
        let nb = c.div_ceil(AVX2_BLOCK);
        let col = nb * BLOCK_WORDS;
        let (groups, kw) = if G > 0 { (G, KW) } else { (groups, g.kw) };
        let gstride = g.wn * col;
        let xstride = g.dx * col;
        let step = g.sx * col;
        let zp16 = _mm256_set1_epi16(p.out_zp as i16);
        let lo8 = _mm_set1_epi8(p.lo as u8 as i8);
        let op = out.as_mut_ptr();
        for cb in 0..nb {
            let base = cb * AVX2_BLOCK;
            let n = c - base;
            let ld_i = |v: &[i32], h: usize| {
                _mm256_loadu_si256(v.as_ptr().add(base + 8 * h) as *const __m256i)
            };
            let ld_f = |v: &[f32], h: usize| _mm256_loadu_ps(v.as_ptr().add(base + 8 * h));
            let corr = [ld_i(&p.corr, 0), ld_i(&p.corr, 1)];
            let bb = [ld_f(&p.bias_b, 0), ld_f(&p.bias_b, 1)];
            let bs = [ld_f(&p.bias_s, 0), ld_f(&p.bias_s, 1)];
            let mult = [ld_f(&p.mult, 0), ld_f(&p.mult, 1)];
            let wsrc = wq.add(cb * BLOCK_WORDS);
            let mut srow = bp.add(cb * BLOCK_WORDS);
            let mut dst = op.add(base);
            for _ in 0..g.ow {
                let [mut a0, mut a1] = corr;
                for gi in 0..groups {
                    for kx in 0..kw {
                        let s = srow.add(gi * gstride + kx * xstride) as *const __m256i;
                        let w = wsrc.add((gi * kw + kx) * col) as *const __m256i;
                        a0 = _mm256_add_epi32(
                            a0,
                            _mm256_madd_epi16(_mm256_loadu_si256(s), _mm256_loadu_si256(w)),
                        );
                        a1 = _mm256_add_epi32(
                            a1,
                            _mm256_madd_epi16(
                                _mm256_loadu_si256(s.add(1)),
                                _mm256_loadu_si256(w.add(1)),
                            ),
                        );
                    }
                }
                let rq = |a: __m256i, h: usize| {
                    let xf = _mm256_fmadd_ps(bb[h], bs[h], _mm256_cvtepi32_ps(a));
                    _mm256_cvtps_epi32(_mm256_mul_ps(xf, mult[h]))
                };
                // Lanes: a0 channels {0-3 | 8-11}, a1 {4-7 | 12-15}; the pack puts them
                // in order (0-7 | 8-15).
                let w16 = _mm256_adds_epi16(_mm256_packs_epi32(rq(a0, 0), rq(a1, 1)), zp16);
                let b8 = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packus_epi16(w16, w16));
                let r = _mm_max_epu8(_mm256_castsi256_si128(b8), lo8);
                if n >= 16 {
                    _mm_storeu_si128(dst as *mut __m128i, r);
                } else {
                    let mut t = [0u8; 16];
                    _mm_storeu_si128(t.as_mut_ptr() as *mut __m128i, r);
                    std::ptr::copy_nonoverlapping(t.as_ptr(), dst, n);
                }
                srow = srow.add(step);
                dst = dst.add(c);
            }
        }
    }
}
