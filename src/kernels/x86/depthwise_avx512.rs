//! The AVX-512 VNNI depthwise row kernel (see `kernels::depthwise`): four kernel rows
//! interleaved per 32-bit lane so that one `vpdpbusd` adds four `u8 x i8` products per
//! channel, exact in `i32`; 64 channels (four registers) per block, the last channels in
//! one block of 32 (two registers) or 16 (one register), the requantization in registers.
//! The common windows (3 x 3 and 5 x 5) run a product loop unrolled at compile time with
//! the block's weights held in registers.

use std::arch::x86_64::*;

use super::Avx2;
use crate::kernels::depthwise::{vnni_layout, Aligned64, DwParams, RowGeom, VNNI_BLOCK};

impl Avx2 {
    /// One depthwise output row with AVX-512 VNNI: `rows` holds the input rows of the
    /// kernel rows (a multiple of 4, the last ones any row when their weights are 0), each
    /// `g.w * g.c` bytes at least; `wq` the weights as `DwWeights::vnni_packed` lays them
    /// out; `p` the parameters in VNNI accumulator order (`vnni_channel`); `buf` the
    /// interleaving scratch; `out` receives `g.ow * g.c` bytes. The first two rows of
    /// `next` (the rows the next output row reads that this one does not) are prefetched.
    ///
    /// # Panics
    /// When the token lacks VNNI or a slice is shorter than the geometry says.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dw_row_vnni(
        self,
        rows: &[&[u8]],
        next: &[&[u8]],
        g: &RowGeom,
        wq: &[Aligned64],
        p: &DwParams,
        buf: &mut [Aligned64],
        out: &mut [u8],
    ) {
        assert!(self.vnni, "the VNNI depthwise kernel needs AVX-512 VNNI");
        let groups = rows.len() / 4;
        let cp = vnni_layout(g.c).1;
        assert!(g.c > 0 && g.ow > 0 && g.kw > 0 && rows.len().is_multiple_of(4));
        assert!(rows.iter().chain(next).all(|r| r.len() >= g.w * g.c));
        assert_eq!(g.wn, (g.ow - 1) * g.sx + (g.kw - 1) * g.dx + 1);
        assert!(wq.len() * 64 >= groups * g.kw * cp * 4);
        assert!(p.corr.len() >= cp && p.bias_b.len() >= cp);
        assert!(p.bias_s.len() >= cp && p.mult.len() >= cp);
        assert!(buf.len() * 64 >= groups * g.wn * cp * 4);
        assert!(out.len() >= g.ow * g.c);
        // SAFETY: `vnni` is only set after detecting AVX-512F/BW/VNNI; the asserts cover
        // every access `dw_row` makes (its `# Safety` list).
        unsafe {
            dw_row(
                rows,
                next,
                g,
                wq.as_ptr() as *const i8,
                p,
                buf.as_mut_ptr() as *mut u8,
                out,
            )
        }
    }
}

/// The mask of the first `n` (at most 64) bytes.
#[inline(always)]
fn mask_n(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// See [`Avx2::dw_row_vnni`]. With `(full, cp) = vnni_layout(c)`, channels `0..full` go
/// in blocks of 64 (four registers, interleaved in-lane; the last may be partial), the
/// rest in one block of `cp - full` (32: two registers; 16: one, in order). Each block is
/// interleaved and then multiplied before the next (its columns stay in L1), and the rows
/// of `next` (those the next output row reads) are prefetched into L2 on the way.
///
/// # Safety
/// AVX-512F/BW/VNNI must be available; with `cp = vnni_layout(c).1` and
/// `groups = rows.len() / 4`: every row of `rows` and `next` readable for `g.w * g.c`
/// bytes (loads past the channels are masked), `wq` for `groups * kw * cp * 4` bytes, the
/// four parameter vectors for `cp` values, `buf` writable for `groups * wn * cp * 4`
/// bytes, `out` for `ow * c` bytes (stores past the channels are masked), and
/// `wn == (ow - 1) * sx + (kw - 1) * dx + 1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dw_row(
    rows: &[&[u8]],
    next: &[&[u8]],
    g: &RowGeom,
    wq: *const i8,
    p: &DwParams,
    buf: *mut u8,
    out: &mut [u8],
) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which `interleave`
    // and `products` share.
    unsafe {
        let groups = rows.len() / 4;
        let (full, cp) = vnni_layout(g.c);
        let mut base = 0;
        while base < full {
            interleave::<4>(rows, next, g, base, buf);
            products::<4>(g, groups, wq, p, buf, base, out);
            base += VNNI_BLOCK;
        }
        match cp - full {
            32 => {
                interleave::<2>(rows, next, g, base, buf);
                products::<2>(g, groups, wq, p, buf, base, out);
            }
            16 => {
                interleave::<1>(rows, next, g, base, buf);
                products::<1>(g, groups, wq, p, buf, base, out);
            }
            _ => {}
        }
    }
}

/// Interleaves the block of `16 * R` channels from `base`: column `j` of row group `gi`
/// holds, at `(gi * wn + j) * cp * 4 + base * 4`, the four rows' bytes of each channel
/// side by side (channel order: `vnni_channel`); columns in the horizontal padding hold
/// the zero point. Prefetches the block's bytes of the rows of `next` into L2.
///
/// # Safety
/// As [`dw_row`], with `base` a block start of `vnni_layout(g.c)` of `R` registers.
#[inline(always)]
unsafe fn interleave<const R: usize>(
    rows: &[&[u8]],
    next: &[&[u8]],
    g: &RowGeom,
    base: usize,
    buf: *mut u8,
) {
    // SAFETY: input bytes `ix * c + ch` for channels ch < c (the loads masked to them),
    // interleaved bytes inside column j < wn of group gi (`cp * 4` bytes from
    // `(gi * wn + j) * cp * 4`, of which this block owns `64 R` from `base * 4`);
    // prefetches never fault.
    unsafe {
        let c = g.c;
        let col = vnni_layout(c).1 * 4;
        let m = mask_n(c - base);
        let zpv = _mm512_set1_epi8(g.a_zp as i8);
        for (gi, r4) in rows.chunks_exact(4).enumerate() {
            let r: [*const u8; 4] = std::array::from_fn(|i| r4[i].as_ptr().add(base));
            // The rows to prefetch (while interleaving the first group only).
            let mut pf = [std::ptr::null::<u8>(); 2];
            let npf = if gi == 0 { next.len().min(2) } else { 0 };
            for (p, n) in pf.iter_mut().zip(next).take(npf) {
                *p = n.as_ptr().add(base);
            }
            let gbuf = buf.add(gi * g.wn * col + base * 4);
            // Columns in the horizontal padding: the zero point.
            let (lo, hi) = (g.pw.min(g.wn), (g.pw + g.w).min(g.wn));
            for j in (0..lo).chain(hi..g.wn) {
                for q in 0..R {
                    _mm512_storeu_si512(gbuf.add(j * col + 64 * q) as *mut _, zpv);
                }
            }
            for j in lo..hi {
                let dst = gbuf.add(j * col);
                let src = (j - g.pw) * c;
                for &n in &pf[..npf] {
                    _mm_prefetch::<_MM_HINT_T1>(n.add(src) as *const i8);
                }
                match R {
                    4 => {
                        let x: [__m512i; 4] = std::array::from_fn(|i| {
                            _mm512_maskz_loadu_epi8(m, r[i].add(src) as *const i8)
                        });
                        let l01 = _mm512_unpacklo_epi8(x[0], x[1]);
                        let h01 = _mm512_unpackhi_epi8(x[0], x[1]);
                        let l23 = _mm512_unpacklo_epi8(x[2], x[3]);
                        let h23 = _mm512_unpackhi_epi8(x[2], x[3]);
                        let d = dst as *mut __m512i;
                        _mm512_storeu_si512(d as *mut _, _mm512_unpacklo_epi16(l01, l23));
                        _mm512_storeu_si512(d.add(1) as *mut _, _mm512_unpackhi_epi16(l01, l23));
                        _mm512_storeu_si512(d.add(2) as *mut _, _mm512_unpacklo_epi16(h01, h23));
                        _mm512_storeu_si512(d.add(3) as *mut _, _mm512_unpackhi_epi16(h01, h23));
                    }
                    2 => {
                        // 32 channels in 256 bits: the four results hold channels
                        // (0-3 | 16-19), (4-7 | 20-23), (8-11 | 24-27), (12-15 | 28-31)
                        // and are stored as [q0 | q2], [q1 | q3] (see `vnni_channel`).
                        let x: [__m256i; 4] = std::array::from_fn(|i| {
                            _mm512_castsi512_si256(_mm512_maskz_loadu_epi8(
                                m,
                                r[i].add(src) as *const i8,
                            ))
                        });
                        let l01 = _mm256_unpacklo_epi8(x[0], x[1]);
                        let h01 = _mm256_unpackhi_epi8(x[0], x[1]);
                        let l23 = _mm256_unpacklo_epi8(x[2], x[3]);
                        let h23 = _mm256_unpackhi_epi8(x[2], x[3]);
                        let d = dst as *mut __m256i;
                        _mm256_storeu_si256(d, _mm256_unpacklo_epi16(l01, l23));
                        _mm256_storeu_si256(d.add(2), _mm256_unpackhi_epi16(l01, l23));
                        _mm256_storeu_si256(d.add(1), _mm256_unpacklo_epi16(h01, h23));
                        _mm256_storeu_si256(d.add(3), _mm256_unpackhi_epi16(h01, h23));
                    }
                    _ => {
                        // 16 channels in 128 bits: the four results hold channels 0-3,
                        // 4-7, 8-11, 12-15 (in order).
                        let x: [__m128i; 4] = std::array::from_fn(|i| {
                            _mm512_castsi512_si128(_mm512_maskz_loadu_epi8(
                                m,
                                r[i].add(src) as *const i8,
                            ))
                        });
                        let l01 = _mm_unpacklo_epi8(x[0], x[1]);
                        let h01 = _mm_unpackhi_epi8(x[0], x[1]);
                        let l23 = _mm_unpacklo_epi8(x[2], x[3]);
                        let h23 = _mm_unpackhi_epi8(x[2], x[3]);
                        let d = dst as *mut __m128i;
                        _mm_storeu_si128(d, _mm_unpacklo_epi16(l01, l23));
                        _mm_storeu_si128(d.add(1), _mm_unpackhi_epi16(l01, l23));
                        _mm_storeu_si128(d.add(2), _mm_unpacklo_epi16(h01, h23));
                        _mm_storeu_si128(d.add(3), _mm_unpackhi_epi16(h01, h23));
                    }
                }
            }
        }
    }
}

/// The products, requantization and stores of the block of `16 * R` channels from
/// `base` over one row, from the interleaved buffer `bp`, with the common windows
/// unrolled at compile time.
///
/// # Safety
/// As [`dw_row`], with `bp` holding the block's interleaved columns.
#[inline(always)]
unsafe fn products<const R: usize>(
    g: &RowGeom,
    groups: usize,
    wq: *const i8,
    p: &DwParams,
    bp: *const u8,
    base: usize,
    out: &mut [u8],
) {
    // SAFETY: as `dw_row`; `block` gets the same contract.
    unsafe {
        let mask = mask_n(g.c - base);
        let op = out.as_mut_ptr();
        match (groups, g.kw) {
            (1, 3) => block::<R, 1, 3>(g, groups, wq, p, bp, base, mask, op),
            (2, 5) => block::<R, 2, 5>(g, groups, wq, p, bp, base, mask, op),
            (1, 1) => block::<R, 1, 1>(g, groups, wq, p, bp, base, mask, op),
            _ => block::<R, 0, 0>(g, groups, wq, p, bp, base, mask, op),
        }
    }
}

/// One block of `16 * R` channels from position `base` (`R` = 4, 2 or 1 registers) over
/// the whole row: accumulates, requantizes and stores the channels `mask` keeps.
///
/// # Safety
/// As [`products`], with `base` a block start of `vnni_layout(g.c)`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block<const R: usize, const G: usize, const KW: usize>(
    g: &RowGeom,
    groups: usize,
    wq: *const i8,
    p: &DwParams,
    bp: *const u8,
    base: usize,
    mask: u64,
    op: *mut u8,
) {
    // SAFETY: as `products`; the parameter vectors hold `cp >= base + 16 R` values.
    unsafe {
        let c = g.c;
        let col = vnni_layout(c).1 * 4;
        let ld_i = |v: &[i32], at: usize| _mm512_loadu_si512(v.as_ptr().add(at) as *const _);
        let ld_f = |v: &[f32], at: usize| _mm512_loadu_ps(v.as_ptr().add(at));
        let corr: [__m512i; R] = std::array::from_fn(|m| ld_i(&p.corr, base + 16 * m));
        let bb: [__m512; R] = std::array::from_fn(|m| ld_f(&p.bias_b, base + 16 * m));
        let bs: [__m512; R] = std::array::from_fn(|m| ld_f(&p.bias_s, base + 16 * m));
        let mult: [__m512; R] = std::array::from_fn(|m| ld_f(&p.mult, base + 16 * m));
        let zp16 = _mm512_set1_epi16(p.out_zp as i16);
        let lo8 = _mm512_set1_epi8(p.lo as u8 as i8);
        let (min, max) = (_mm512_set1_epi32(-512), _mm512_set1_epi32(512));
        let (zp32, lo32, hi32) = (
            _mm512_set1_epi32(p.out_zp),
            _mm512_set1_epi32(p.lo),
            _mm512_set1_epi32(255),
        );
        // qwords 0, 4, 2, 6: the order the 32-channel block's packs leave undone.
        let order32 = _mm512_setr_epi64(0, 4, 2, 6, 1, 3, 5, 7);
        let bsrc = bp.add(base * 4);
        let wsrc = wq.add(base * 4);
        let gstride = g.wn * col;
        let xstride = g.dx * col;
        let step = g.sx * col;
        let ld = |a: *const u8| _mm512_loadu_si512(a as *const _);
        // The weights in registers when the window is known.
        let wts: [[[__m512i; R]; KW]; G] = std::array::from_fn(|gi| {
            std::array::from_fn(|kx| {
                std::array::from_fn(|m| ld(wsrc.add((gi * KW + kx) * col + 64 * m) as *const u8))
            })
        });
        let mut srow = bsrc;
        let mut o = op.add(base);
        for _ in 0..g.ow {
            let mut acc = corr;
            if G > 0 {
                for (gi, wg) in wts.iter().enumerate() {
                    for (kx, wk) in wg.iter().enumerate() {
                        let s = srow.add(gi * gstride + kx * xstride);
                        for (m, (a, &w)) in acc.iter_mut().zip(wk).enumerate() {
                            *a = _mm512_dpbusd_epi32(*a, ld(s.add(64 * m)), w);
                        }
                    }
                }
            } else {
                for gi in 0..groups {
                    let wrow = wsrc.add(gi * g.kw * col);
                    for kx in 0..g.kw {
                        let s = srow.add(gi * gstride + kx * xstride);
                        let w = wrow.add(kx * col) as *const u8;
                        for (m, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_dpbusd_epi32(*a, ld(s.add(64 * m)), ld(w.add(64 * m)));
                        }
                    }
                }
            }
            let v: [__m512i; R] = std::array::from_fn(|m| {
                let xf = _mm512_fmadd_ps(bb[m], bs[m], _mm512_cvtepi32_ps(acc[m]));
                _mm512_cvtps_epi32(_mm512_mul_ps(xf, mult[m]))
            });
            match R {
                4 => {
                    // The packs undo the interleave order: 64 channels in order.
                    let a = _mm512_adds_epi16(_mm512_packs_epi32(v[0], v[1]), zp16);
                    let b = _mm512_adds_epi16(_mm512_packs_epi32(v[2], v[3]), zp16);
                    let u = _mm512_max_epu8(_mm512_packus_epi16(a, b), lo8);
                    _mm512_mask_storeu_epi8(o as *mut i8, mask, u);
                }
                2 => {
                    // Lanes of the pack: channels 0-7, 16-23, 8-15, 24-31.
                    let a = _mm512_adds_epi16(_mm512_packs_epi32(v[0], v[1]), zp16);
                    let u = _mm512_permutexvar_epi64(order32, _mm512_packus_epi16(a, a));
                    let u = _mm512_max_epu8(u, lo8);
                    _mm512_mask_storeu_epi8(o as *mut i8, mask & 0xffff_ffff, u);
                }
                _ => {
                    // clamp(clamp(v, -512, 512) + out_zp, lo, 255) as every other
                    // requantization.
                    let v =
                        _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v[0], min), max), zp32);
                    let v = _mm512_min_epi32(_mm512_max_epi32(v, lo32), hi32);
                    _mm512_mask_cvtepi32_storeu_epi8(o as *mut _, (mask & 0xffff) as __mmask16, v);
                }
            }
            srow = srow.add(step);
            o = o.add(c);
        }
    }
}
