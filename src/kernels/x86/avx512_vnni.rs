//! AVX-512 VNNI bodies beyond the GEMM tiles (which live beside the AVX2 ones in
//! `avx2.rs`): the depthwise convolution with `vpdpwssd` (pairs of `i16` products
//! accumulated in `i32`, exact here).

use std::arch::x86_64::*;

/// Four adjacent depthwise pixels (see `kernels::dw_pixels4`), 32 channels at a time:
/// `(x - a_zp)` and `w` widened to `i16` (both within `[-255, 255]`), taps in pairs
/// interleaved so that one `vpdpwssd` adds `x0 * w0 + x1 * w1` per channel. Returns the
/// first channel not computed (a multiple of 32); the caller finishes the rest.
///
/// # Safety
/// AVX-512F/BW/VNNI must be available; `acc.len() == 4 * oc`; for every tap `(off, t)`:
/// `off + 3 * pstride + oc <= x.len()` and `(t + 1) * oc <= w.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn dw_pixels4(
    x: &[u8],
    taps: &[(usize, usize)],
    pstride: usize,
    w: &[i16],
    a_zp: i32,
    acc: &mut [i32],
) -> usize {
    // SAFETY: the caller upholds this function's `# Safety` contract: the CPU features, and
    // every load below reads channels c..c + 32 <= oc of a tap's pixel (x) or weights (w).
    unsafe {
        let oc = acc.len() / 4;
        let zp = _mm512_set1_epi16(a_zp as i16);
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let ld_x = |off: usize, c: usize| {
            _mm512_sub_epi16(
                _mm512_cvtepu8_epi16(_mm256_loadu_si256(xp.add(off + c) as *const __m256i)),
                zp,
            )
        };
        let ld_w = |t: usize, c: usize| _mm512_loadu_si512(wp.add(t * oc + c) as *const _);
        let z = _mm512_setzero_si512();
        // lo holds channels {0-3, 8-11, 16-19, 24-27}, hi {4-7, 12-15, 20-23, 28-31}
        // (128-bit lanes); these put them back in order.
        let idx0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
        let idx1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
        let mut c = 0;
        while c + 32 <= oc {
            let mut lo = [z; 4];
            let mut hi = [z; 4];
            let mut k = 0;
            while k < taps.len() {
                let (o0, t0) = taps[k];
                let (w1, o1) = if k + 1 < taps.len() {
                    let (o1, t1) = taps[k + 1];
                    (ld_w(t1, c), Some(o1))
                } else {
                    (z, None)
                };
                let w0 = ld_w(t0, c);
                let wl = _mm512_unpacklo_epi16(w0, w1);
                let wh = _mm512_unpackhi_epi16(w0, w1);
                for p in 0..4 {
                    let x0 = ld_x(o0 + p * pstride, c);
                    let x1 = match o1 {
                        Some(o1) => ld_x(o1 + p * pstride, c),
                        None => z,
                    };
                    lo[p] = _mm512_dpwssd_epi32(lo[p], _mm512_unpacklo_epi16(x0, x1), wl);
                    hi[p] = _mm512_dpwssd_epi32(hi[p], _mm512_unpackhi_epi16(x0, x1), wh);
                }
                k += 2;
            }
            for p in 0..4 {
                let o = acc.as_mut_ptr().add(p * oc + c);
                _mm512_storeu_si512(o as *mut _, _mm512_permutex2var_epi32(lo[p], idx0, hi[p]));
                _mm512_storeu_si512(
                    o.add(16) as *mut _,
                    _mm512_permutex2var_epi32(lo[p], idx1, hi[p]),
                );
            }
            c += 32;
        }
        c
    }
}
