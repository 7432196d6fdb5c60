//! AVX-512 VNNI kernels: the int8 GEMM micro-kernels (`vpdpbusd` adds four `u8 x i8`
//! products straight into `i32` lanes: exact, no `i16` intermediate) and the depthwise
//! convolution with `vpdpwssd` (pairs of `i16` products accumulated in `i32`, exact here).
//!
//! The GEMM kernel is [`Vnni8x32`]: eight rows times two packed panels, sixteen
//! accumulator chains. Its edges (four rows left: [`Vnni4x32`]; one panel left:
//! [`Vnni8x16`], then [`Vnni4x16`]) are smaller tiles over the same packed data, chosen by
//! the generic driver (`kernels::gemm::gemm_loop`).

use std::arch::x86_64::*;

use super::{Avx2, ColParams};
use crate::kernels::gemm::GemmKernel;
use crate::kernels::pack::{PackedWeights, NR};
use crate::kernels::requant::RequantParams;
use crate::kernels::{KernelPath, MR};

macro_rules! vnni_kernel {
    ($(#[$doc:meta])* $name:ident, $mr:expr, $nr:expr, $row:ident, $col:ident,
     |$a:ident, $kp:ident, $b:ident, $acc:ident| $call:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub(crate) struct $name(Avx2);

        impl $name {
            /// The kernel, if `s` has AVX-512 VNNI enabled.
            #[cfg_attr(not(test), allow(dead_code))]
            pub(crate) fn new(s: Avx2) -> Option<Self> {
                s.vnni().then_some($name(s))
            }
        }

        impl GemmKernel for $name {
            const MR: usize = $mr;
            const NR: usize = $nr;
            type RowEdge = $row;
            type ColEdge = $col;

            fn row_edge(self) -> $row {
                $row(self.0)
            }

            fn col_edge(self) -> $col {
                $col(self.0)
            }

            fn path(self, _split: bool) -> KernelPath {
                KernelPath::Avx512Vnni
            }

            /// # Safety
            /// As [`GemmKernel::kernel`]; the token proves AVX-512F/BW/VNNI.
            unsafe fn kernel(self, $a: &[u8], $kp: usize, $b: &[i8], $acc: &mut [i32]) {
                debug_assert!($kp.is_multiple_of(4) && $a.len() >= $mr * $kp && $b.len() >= $nr * $kp);
                debug_assert!($acc.len() >= $mr * $nr);
                // SAFETY: `self` holds a token made only after detecting AVX-512F/BW/VNNI;
                // the caller guarantees the slice lengths the body reads and writes
                // (MR rows of `kp` bytes, NR / 16 panels of `kp * 16` bytes, MR * NR i32).
                unsafe { $call }
            }

            fn requant_tile(
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
                self.0
                    .requant_tile(acc, rows, cols, rowsum, a_zp, w, rq, j0, out, ldc)
            }
        }
    };
}

vnni_kernel!(
    /// Eight rows times two panels (`MR = 8`, `NR = 32`): the AVX-512 VNNI GEMM kernel.
    Vnni8x32, 2 * MR, 2 * NR, Vnni4x32, Vnni8x16,
    |a, kp, b, acc| tile8x2_vnni(a.as_ptr(), kp, b.as_ptr(), b.as_ptr().add(kp * NR), acc.as_mut_ptr())
);
vnni_kernel!(
    /// Four rows times two panels: [`Vnni8x32`]'s row edge.
    Vnni4x32, MR, 2 * NR, Vnni4x32, Vnni4x16,
    |a, kp, b, acc| tile4x2_vnni(a.as_ptr(), kp, b.as_ptr(), b.as_ptr().add(kp * NR), acc.as_mut_ptr())
);
vnni_kernel!(
    /// Eight rows times one panel: [`Vnni8x32`]'s column edge.
    Vnni8x16, 2 * MR, NR, Vnni4x16, Vnni8x16,
    |a, kp, b, acc| tile8_vnni(a.as_ptr(), kp, b.as_ptr(), acc.as_mut_ptr())
);
vnni_kernel!(
    /// Four rows times one panel: the smallest AVX-512 VNNI tile.
    Vnni4x16, MR, NR, Vnni4x16, Vnni4x16,
    |a, kp, b, acc| tile_vnni(a.as_ptr(), kp, b.as_ptr(), acc.as_mut_ptr())
);

/// The same tile with AVX-512 VNNI: one `vpdpbusd` per row and `k` group adds
/// `u8 x i8` products straight into `i32` lanes (no `i16` intermediate, so it cannot
/// saturate). A 512-bit register holds exactly one `k` group of a 16-column panel.
///
/// # Safety
/// AVX-512F/BW and AVX-512 VNNI must be available; `a` readable for `MR * kp` bytes (rows at
/// stride `kp`), `b` for `kp * NR`, `acc` writable for `MR * NR` `i32`; `kp % 4 == 0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni(a: *const u8, kp: usize, b: *const i8, acc: *mut i32) {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let mut c0 = _mm512_setzero_si512();
        let mut c1 = _mm512_setzero_si512();
        let mut c2 = _mm512_setzero_si512();
        let mut c3 = _mm512_setzero_si512();
        let a1 = a.add(kp);
        let a2 = a.add(2 * kp);
        let a3 = a.add(3 * kp);
        let mut bp = b;
        let mut q = 0;
        while q < kp {
            let bv = _mm512_loadu_si512(bp as *const _);
            let b0 = _mm512_set1_epi32((a.add(q) as *const i32).read_unaligned());
            let b1 = _mm512_set1_epi32((a1.add(q) as *const i32).read_unaligned());
            let b2 = _mm512_set1_epi32((a2.add(q) as *const i32).read_unaligned());
            let b3 = _mm512_set1_epi32((a3.add(q) as *const i32).read_unaligned());
            c0 = _mm512_dpbusd_epi32(c0, b0, bv);
            c1 = _mm512_dpbusd_epi32(c1, b1, bv);
            c2 = _mm512_dpbusd_epi32(c2, b2, bv);
            c3 = _mm512_dpbusd_epi32(c3, b3, bv);
            bp = bp.add(4 * NR);
            q += 4;
        }
        _mm512_storeu_si512(acc as *mut _, c0);
        _mm512_storeu_si512(acc.add(NR) as *mut _, c1);
        _mm512_storeu_si512(acc.add(2 * NR) as *mut _, c2);
        _mm512_storeu_si512(acc.add(3 * NR) as *mut _, c3);
    }
}

/// Eight rows (two `MR` tiles) of [`tile_vnni`]: eight independent accumulator chains
/// hide `vpdpbusd`'s latency, and each panel load serves eight rows.
///
/// # Safety
/// AVX-512F/BW and AVX-512 VNNI must be available; `a` readable for `2 * MR * kp` bytes,
/// `b` for `kp * NR`, `acc` writable for `2 * MR * NR` `i32`; `kp % 4 == 0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile8_vnni(a: *const u8, kp: usize, b: *const i8, acc: *mut i32) {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let mut c = [_mm512_setzero_si512(); 8];
        let mut bp = b;
        let mut q = 0;
        while q < kp {
            let bv = _mm512_loadu_si512(bp as *const _);
            macro_rules! row {
                ($r:literal) => {
                    c[$r] = _mm512_dpbusd_epi32(
                        c[$r],
                        _mm512_set1_epi32((a.add($r * kp + q) as *const i32).read_unaligned()),
                        bv,
                    );
                };
            }
            row!(0);
            row!(1);
            row!(2);
            row!(3);
            row!(4);
            row!(5);
            row!(6);
            row!(7);
            bp = bp.add(4 * NR);
            q += 4;
        }
        for (r, v) in c.iter().enumerate() {
            _mm512_storeu_si512(acc.add(r * NR) as *mut _, *v);
        }
    }
}

/// Eight rows times two panels with AVX-512 VNNI: sixteen accumulator chains, each row's
/// broadcast serving both panels. `acc` is `[panel][row][NR]`.
///
/// # Safety
/// AVX-512F/BW and AVX-512 VNNI must be available; `a` readable for `2 * MR * kp` bytes,
/// `b0` and `b1` for `kp * NR`, `acc` writable for `4 * MR * NR` `i32`; `kp % 4 == 0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile8x2_vnni(a: *const u8, kp: usize, b0: *const i8, b1: *const i8, acc: *mut i32) {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let mut c = [_mm512_setzero_si512(); 8];
        let mut d = [_mm512_setzero_si512(); 8];
        let mut q = 0;
        while q < kp {
            let v0 = _mm512_loadu_si512(b0.add(q * NR) as *const _);
            let v1 = _mm512_loadu_si512(b1.add(q * NR) as *const _);
            macro_rules! row {
                ($r:literal) => {
                    let av = _mm512_set1_epi32((a.add($r * kp + q) as *const i32).read_unaligned());
                    c[$r] = _mm512_dpbusd_epi32(c[$r], av, v0);
                    d[$r] = _mm512_dpbusd_epi32(d[$r], av, v1);
                };
            }
            row!(0);
            row!(1);
            row!(2);
            row!(3);
            row!(4);
            row!(5);
            row!(6);
            row!(7);
            q += 4;
        }
        for r in 0..8 {
            _mm512_storeu_si512(acc.add(r * NR) as *mut _, c[r]);
            _mm512_storeu_si512(acc.add((8 + r) * NR) as *mut _, d[r]);
        }
    }
}

/// Four rows times two panels with AVX-512 VNNI (eight chains), for row blocks of four.
/// `acc` is `[panel][row][NR]`.
///
/// # Safety
/// As [`tile8x2_vnni`], with `a` readable for `MR * kp` bytes and `acc` writable for
/// `2 * MR * NR` `i32`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile4x2_vnni(a: *const u8, kp: usize, b0: *const i8, b1: *const i8, acc: *mut i32) {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let mut c = [_mm512_setzero_si512(); 4];
        let mut d = [_mm512_setzero_si512(); 4];
        let mut q = 0;
        while q < kp {
            let v0 = _mm512_loadu_si512(b0.add(q * NR) as *const _);
            let v1 = _mm512_loadu_si512(b1.add(q * NR) as *const _);
            macro_rules! row {
                ($r:literal) => {
                    let av = _mm512_set1_epi32((a.add($r * kp + q) as *const i32).read_unaligned());
                    c[$r] = _mm512_dpbusd_epi32(c[$r], av, v0);
                    d[$r] = _mm512_dpbusd_epi32(d[$r], av, v1);
                };
            }
            row!(0);
            row!(1);
            row!(2);
            row!(3);
            q += 4;
        }
        for r in 0..4 {
            _mm512_storeu_si512(acc.add(r * NR) as *mut _, c[r]);
            _mm512_storeu_si512(acc.add((4 + r) * NR) as *mut _, d[r]);
        }
    }
}

/// Requantizes the first `rows x cols` of one panel's slice of a tile (`acc` is
/// `[row][NR]`, global columns `j0..j0 + NR`) into `out[r * ldc + c]`: sixteen lanes, the
/// column parameters loaded once for all rows. Bit-identical to
/// `requant::requant_one` after the zero-point corrections: the same `cvtdq2ps`, FMA,
/// multiply and `cvtps2dq` (MXCSR rounding, NaN and overflow to `i32::MIN`); clamping to
/// `[-512, 512]` before adding the output zero point changes no clamped result and keeps
/// the sum inside `i32`.
///
/// # Safety
/// AVX-512F/BW must be available; `acc` readable for `rows * NR` `i32`; `rowsum` null (no
/// row correction) or readable for `rows` `i32` (and then `p.w_zp` for columns
/// `j0..j0 + NR`); `p.col_off`, `p.bias_b`, `p.bias_s`, `p.mult` readable for columns
/// `j0..j0 + NR`; `out` writable at `r * ldc + c` for `r < rows`, `c < cols <= NR`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn requant_tile(
    acc: *const i32,
    rows: usize,
    cols: usize,
    rowsum: *const i32,
    p: &ColParams,
    j0: usize,
    out: *mut u8,
    ldc: usize,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges); stores are masked to the `cols` valid columns.
    unsafe {
        let j = j0;
        let coff = _mm512_mullo_epi32(
            _mm512_set1_epi32(p.a_zp),
            _mm512_loadu_si512(p.col_off.add(j) as *const _),
        );
        let bb = _mm512_loadu_ps(p.bias_b.add(j));
        let bs = _mm512_loadu_ps(p.bias_s.add(j));
        let mult = _mm512_loadu_ps(p.mult.add(j));
        let c = Clamp::new(p);
        let mask: __mmask16 = if cols >= 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as u16
        };
        if rowsum.is_null() {
            for r in 0..rows {
                let x = _mm512_sub_epi32(_mm512_loadu_si512(acc.add(r * NR) as *const _), coff);
                let v = c.apply(rq16(x, bb, bs, mult));
                _mm512_mask_cvtepi32_storeu_epi8(out.add(r * ldc) as *mut _, mask, v);
            }
        } else {
            let wzp = _mm512_loadu_si512(p.w_zp.add(j) as *const _);
            for r in 0..rows {
                let x = _mm512_sub_epi32(_mm512_loadu_si512(acc.add(r * NR) as *const _), coff);
                let roff = _mm512_mullo_epi32(wzp, _mm512_set1_epi32(*rowsum.add(r)));
                let v = c.apply(rq16(_mm512_sub_epi32(x, roff), bb, bs, mult));
                _mm512_mask_cvtepi32_storeu_epi8(out.add(r * ldc) as *mut _, mask, v);
            }
        }
    }
}

/// The output clamp as registers: `clamp(clamp(v, -512, 512) + out_zp, lo, 255)`.
#[derive(Clone, Copy)]
struct Clamp {
    min: __m512i,
    max: __m512i,
    zp: __m512i,
    lo: __m512i,
    hi: __m512i,
}

impl Clamp {
    /// # Safety
    /// AVX-512F must be available.
    #[inline(always)]
    unsafe fn new(p: &ColParams) -> Self {
        // SAFETY: the caller guarantees AVX-512F; no memory is touched.
        unsafe {
            Clamp {
                min: _mm512_set1_epi32(-512),
                max: _mm512_set1_epi32(512),
                zp: _mm512_set1_epi32(p.out_zp),
                lo: _mm512_set1_epi32(p.lo),
                hi: _mm512_set1_epi32(255),
            }
        }
    }

    /// # Safety
    /// AVX-512F must be available.
    #[inline(always)]
    unsafe fn apply(self, v: __m512i) -> __m512i {
        // SAFETY: the caller guarantees AVX-512F; no memory is touched.
        unsafe {
            let v = _mm512_min_epi32(_mm512_max_epi32(v, self.min), self.max);
            let v = _mm512_add_epi32(v, self.zp);
            _mm512_min_epi32(_mm512_max_epi32(v, self.lo), self.hi)
        }
    }
}

/// `cvtps2dq(fma(bias_b, bias_s, x as f32) * mult)` on sixteen lanes (before the clamp).
///
/// # Safety
/// AVX-512F must be available.
#[inline(always)]
unsafe fn rq16(x: __m512i, bb: __m512, bs: __m512, mult: __m512) -> __m512i {
    // SAFETY: the caller guarantees AVX-512F; no memory is touched.
    unsafe {
        let xf = _mm512_fmadd_ps(bb, bs, _mm512_cvtepi32_ps(x));
        _mm512_cvtps_epi32(_mm512_mul_ps(xf, mult))
    }
}

/// Quantizes `n` floats (a multiple of 16) to `u8`: sixteen lanes of the AVX2 body's
/// formula (`x86::avx2::quantize_u8`); returns whether every input was finite.
///
/// # Safety
/// AVX-512F/BW must be available; `src` readable for `n` `f32`, `dst` writable for `n`
/// bytes; `n % 16 == 0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn quantize_u8(
    src: *const f32,
    n: usize,
    inv: f32,
    zpf: f32,
    dst: *mut u8,
) -> bool {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let inv = _mm512_set1_ps(inv);
        let zp = _mm512_set1_ps(zpf);
        let (lim_lo, lim_hi) = (_mm512_set1_ps(-4_194_304.0), _mm512_set1_ps(4_194_304.0));
        let magic = _mm512_set1_ps(12_582_912.0);
        let (lo, hi) = (_mm512_setzero_ps(), _mm512_set1_ps(255.0));
        let exp = _mm512_set1_epi32(0x7f80_0000);
        let mut bad: __mmask16 = 0;
        let mut i = 0;
        while i < n {
            let x = _mm512_loadu_ps(src.add(i));
            let e = _mm512_and_si512(_mm512_castps_si512(x), exp);
            bad |= _mm512_cmpeq_epi32_mask(e, exp);
            let t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, inv), lim_lo), lim_hi);
            let v = _mm512_add_ps(_mm512_sub_ps(_mm512_add_ps(t, magic), magic), zp);
            let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
            _mm_storeu_si128(
                dst.add(i) as *mut __m128i,
                _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v)),
            );
            i += 16;
        }
        bad == 0
    }
}

/// `dst[i] = (src[i] - zp) as f32 * scale` for `n` bytes (a multiple of 16).
///
/// # Safety
/// AVX-512F/BW must be available; `src` readable for `n` bytes, `dst` writable for `n`
/// `f32`; `n % 16 == 0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn dequantize_u8(src: *const u8, n: usize, scale: f32, zp: u8, dst: *mut f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let s = _mm512_set1_ps(scale);
        let z = _mm512_set1_epi32(zp as i32);
        let mut i = 0;
        while i < n {
            let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(src.add(i) as *const __m128i));
            let f = _mm512_cvtepi32_ps(_mm512_sub_epi32(q, z));
            _mm512_storeu_ps(dst.add(i), _mm512_mul_ps(f, s));
            i += 16;
        }
    }
}
