//! The AVX-512 VNNI depthwise row kernel (see `kernels::depthwise`): four kernel rows
//! interleaved per 32-bit lane so that one `vpdpbusd` adds four `u8 x i8` products per
//! channel, exact in `i32`; 64 channels (four registers) per block, the requantization in
//! registers.

use std::arch::x86_64::*;

use super::Avx2;
use crate::kernels::depthwise::{DwParams, RowGeom, VNNI_BLOCK};

/// Bytes of one channel block of one interleaved column (64 channels x 4 rows).
const BLOCK_BYTES: usize = VNNI_BLOCK * 4;

impl Avx2 {
    /// One depthwise output row with AVX-512 VNNI: `rows` holds the input rows of the
    /// kernel rows (a multiple of 4, the last ones any row when their weights are 0), each
    /// `g.w * g.c` bytes at least; `wq` the weights as `DwWeights::vnni_packed` lays them
    /// out; `p` the parameters in VNNI accumulator order; `buf` the interleaving scratch;
    /// `out` receives `g.ow * g.c` bytes.
    ///
    /// # Panics
    /// When the token lacks VNNI or a slice is shorter than the geometry says.
    pub(crate) fn dw_row_vnni(
        self,
        rows: &[&[u8]],
        g: &RowGeom,
        wq: &[i8],
        p: &DwParams,
        buf: &mut [u8],
        out: &mut [u8],
    ) {
        assert!(self.vnni, "the VNNI depthwise kernel needs AVX-512 VNNI");
        let nb = g.c.div_ceil(VNNI_BLOCK);
        let groups = rows.len() / 4;
        let cp = nb * VNNI_BLOCK;
        assert!(g.c > 0 && g.ow > 0 && g.kw > 0 && rows.len().is_multiple_of(4));
        assert!(rows.iter().all(|r| r.len() >= g.w * g.c));
        assert_eq!(g.wn, (g.ow - 1) * g.sx + (g.kw - 1) * g.dx + 1);
        assert!(wq.len() >= groups * g.kw * nb * BLOCK_BYTES);
        assert!(p.corr.len() >= cp && p.bias_b.len() >= cp);
        assert!(p.bias_s.len() >= cp && p.mult.len() >= cp);
        assert!(buf.len() >= groups * g.wn * nb * BLOCK_BYTES);
        assert!(out.len() >= g.ow * g.c);
        // SAFETY: `vnni` is only set after detecting AVX-512F/BW/VNNI; the asserts cover
        // every access `dw_row` makes (its `# Safety` list).
        unsafe { dw_row(rows, g, wq, p, buf, out) }
    }
}

/// See [`Avx2::dw_row_vnni`].
///
/// # Safety
/// AVX-512F/BW/VNNI must be available; with `nb = ceil(c / 64)` and
/// `groups = rows.len() / 4`: every row readable for `g.w * g.c` bytes (the last block's
/// loads are masked to the channels), `wq` for `groups * kw * nb * 256` bytes, the four
/// parameter vectors for `nb * 64` values, `buf` writable for `groups * wn * nb * 256`
/// bytes, `out` for `ow * c` bytes (the last block's stores are masked), and
/// `wn == (ow - 1) * sx + (kw - 1) * dx + 1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dw_row(
    rows: &[&[u8]],
    g: &RowGeom,
    wq: &[i8],
    p: &DwParams,
    buf: &mut [u8],
    out: &mut [u8],
) {
    // SAFETY: the caller upholds this function's `# Safety` contract; every pointer below
    // stays inside the ranges it lists (interleaved column j < wn of group gi at
    // `(gi * wn + j) * nb * 256`, weights of (gi, kx) at `(gi * kw + kx) * nb * 256`, input
    // channel `ix * c + cb * 64 + t` with t below the block's masked count).
    unsafe {
        let c = g.c;
        let nb = c.div_ceil(VNNI_BLOCK);
        let groups = rows.len() / 4;
        let col = nb * BLOCK_BYTES;
        let bp = buf.as_mut_ptr();
        let zpv = _mm512_set1_epi8(g.a_zp as i8);
        let block_mask = |cb: usize| -> u64 {
            let rem = c - cb * VNNI_BLOCK;
            if rem >= 64 {
                u64::MAX
            } else {
                (1u64 << rem) - 1
            }
        };
        // 1. Interleave: column j of group gi holds, per channel block, the four rows'
        //    bytes of each channel side by side (channel order: `vnni_channel`).
        for gi in 0..groups {
            let r: [*const u8; 4] = std::array::from_fn(|i| rows[4 * gi + i].as_ptr());
            for j in 0..g.wn {
                let dst = bp.add((gi * g.wn + j) * col);
                match j.checked_sub(g.pw).filter(|&ix| ix < g.w) {
                    None => {
                        for q in 0..nb * 4 {
                            _mm512_storeu_si512(dst.add(64 * q) as *mut _, zpv);
                        }
                    }
                    Some(ix) => {
                        for cb in 0..nb {
                            let off = ix * c + cb * VNNI_BLOCK;
                            let mask = block_mask(cb);
                            let x0 = _mm512_maskz_loadu_epi8(mask, r[0].add(off) as *const i8);
                            let x1 = _mm512_maskz_loadu_epi8(mask, r[1].add(off) as *const i8);
                            let x2 = _mm512_maskz_loadu_epi8(mask, r[2].add(off) as *const i8);
                            let x3 = _mm512_maskz_loadu_epi8(mask, r[3].add(off) as *const i8);
                            let l01 = _mm512_unpacklo_epi8(x0, x1);
                            let h01 = _mm512_unpackhi_epi8(x0, x1);
                            let l23 = _mm512_unpacklo_epi8(x2, x3);
                            let h23 = _mm512_unpackhi_epi8(x2, x3);
                            let d = dst.add(cb * BLOCK_BYTES);
                            _mm512_storeu_si512(d as *mut _, _mm512_unpacklo_epi16(l01, l23));
                            _mm512_storeu_si512(
                                d.add(64) as *mut _,
                                _mm512_unpackhi_epi16(l01, l23),
                            );
                            _mm512_storeu_si512(
                                d.add(128) as *mut _,
                                _mm512_unpacklo_epi16(h01, h23),
                            );
                            _mm512_storeu_si512(
                                d.add(192) as *mut _,
                                _mm512_unpackhi_epi16(h01, h23),
                            );
                        }
                    }
                }
            }
        }
        // 2. Products, requantization and store, one channel block at a time.
        let zp16 = _mm512_set1_epi16(p.out_zp as i16);
        let lo8 = _mm512_set1_epi8(p.lo as u8 as i8);
        let op = out.as_mut_ptr();
        for cb in 0..nb {
            let mask = block_mask(cb);
            let base = cb * VNNI_BLOCK;
            let corr: [__m512i; 4] = std::array::from_fn(|m| {
                _mm512_loadu_si512(p.corr.as_ptr().add(base + 16 * m) as *const _)
            });
            let bb: [__m512; 4] =
                std::array::from_fn(|m| _mm512_loadu_ps(p.bias_b.as_ptr().add(base + 16 * m)));
            let bs: [__m512; 4] =
                std::array::from_fn(|m| _mm512_loadu_ps(p.bias_s.as_ptr().add(base + 16 * m)));
            let mult: [__m512; 4] =
                std::array::from_fn(|m| _mm512_loadu_ps(p.mult.as_ptr().add(base + 16 * m)));
            let bsrc = bp.add(cb * BLOCK_BYTES) as *const u8;
            let wsrc = wq.as_ptr().add(cb * BLOCK_BYTES);
            for ox in 0..g.ow {
                let mut acc = corr;
                for gi in 0..groups {
                    let srow = bsrc.add((gi * g.wn + ox * g.sx) * col);
                    let wrow = wsrc.add(gi * g.kw * col);
                    for kx in 0..g.kw {
                        let s = srow.add(kx * g.dx * col);
                        let w = wrow.add(kx * col);
                        for (m, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_dpbusd_epi32(
                                *a,
                                _mm512_loadu_si512(s.add(64 * m) as *const _),
                                _mm512_loadu_si512(w.add(64 * m) as *const _),
                            );
                        }
                    }
                }
                let v: [__m512i; 4] = std::array::from_fn(|m| {
                    let xf = _mm512_fmadd_ps(bb[m], bs[m], _mm512_cvtepi32_ps(acc[m]));
                    _mm512_cvtps_epi32(_mm512_mul_ps(xf, mult[m]))
                });
                // The packs undo the interleave order: 64 channels in order.
                let a = _mm512_adds_epi16(_mm512_packs_epi32(v[0], v[1]), zp16);
                let b = _mm512_adds_epi16(_mm512_packs_epi32(v[2], v[3]), zp16);
                let u = _mm512_max_epu8(_mm512_packus_epi16(a, b), lo8);
                _mm512_mask_storeu_epi8(op.add(ox * c + base) as *mut i8, mask, u);
            }
        }
    }
}
