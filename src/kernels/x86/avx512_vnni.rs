//! AVX-512 VNNI kernels: the int8 GEMM micro-kernels (`vpdpbusd` adds four `u8 x i8`
//! products straight into `i32` lanes: exact, no `i16` intermediate) and the depthwise
//! convolution with `vpdpwssd` (pairs of `i16` products accumulated in `i32`, exact here).
//!
//! The GEMM kernel is [`Vnni8x32`]: eight rows times two packed panels, sixteen
//! accumulator chains ([`Vnni12x32`], twelve rows, for deep products). Its edges (four rows left: [`Vnni4x32`]; one panel left:
//! [`Vnni8x16`], then [`Vnni4x16`]) are smaller tiles over the same packed data, chosen by
//! the generic driver (`kernels::gemm::gemm_loop`).

use std::arch::x86_64::*;

use super::{Avx2, ColParams};
use crate::kernels::gemm::{Epilogue, GemmKernel};
use crate::kernels::pack::{PackedWeights, NR};
use crate::kernels::requant::RequantParams;
use crate::kernels::KernelPath;

macro_rules! vnni_kernel {
    ($(#[$doc:meta])* $name:ident, $mr:expr, $pn:expr, $row:ident, $col:ident) => {
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
            const NR: usize = $pn * NR;
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
            unsafe fn kernel(
                self,
                a: &[*const u8],
                deltas: &[usize],
                seg: usize,
                b: &[i8],
                acc: &mut [i32],
            ) {
                debug_assert!(seg.is_multiple_of(4) && a.len() >= $mr);
                debug_assert!(b.len() >= $pn * NR * deltas.len() * seg);
                debug_assert!(acc.len() >= $mr * $pn * NR);
                // SAFETY: `self` holds a token made only after detecting AVX-512F/BW/VNNI;
                // the caller guarantees the ranges the body reads and writes (MR row
                // starts whose segments at `deltas` hold `seg` bytes, the panels,
                // MR * NR i32).
                unsafe {
                    vnni_acc::<$mr, $pn>(a.as_ptr(), deltas, seg, b.as_ptr(), acc.as_mut_ptr())
                }
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

            /// # Safety
            /// As [`GemmKernel::kernel_requant`]; the token proves AVX-512F/BW/VNNI.
            unsafe fn kernel_requant(
                self,
                a: &[*const u8],
                deltas: &[usize],
                seg: usize,
                b: &[i8],
                ep: &Epilogue<'_>,
                rows: usize,
                cols: usize,
                out: &mut [u8],
                ldc: usize,
                _acc: &mut [i32],
            ) {
                debug_assert!(seg.is_multiple_of(4) && a.len() >= $mr);
                debug_assert!(b.len() >= $pn * NR * deltas.len() * seg);
                let (w, rq, j0) = (ep.w, ep.rq, ep.j0);
                let jn = j0 + $pn * NR;
                assert!(rows <= $mr && cols <= $pn * NR);
                assert!(ep.rowsum.is_empty() || (ep.rowsum.len() >= rows && w.w_zp.len() >= jn));
                assert!(w.col_offsets.len() >= jn && rq.mult.len() >= jn);
                assert!(rq.bias_b.len() >= jn && rq.bias_s.len() >= jn);
                assert!(rows == 0 || out.len() >= (rows - 1) * ldc + cols);
                let p = ColParams {
                    col_off: w.col_offsets.as_ptr(),
                    w_zp: w.w_zp.as_ptr(),
                    bias_b: rq.bias_b.as_ptr(),
                    bias_s: rq.bias_s.as_ptr(),
                    mult: rq.mult.as_ptr(),
                    a_zp: ep.a_zp,
                    out_zp: rq.out_zp,
                    lo: rq.lo,
                };
                let rs = if ep.rowsum.is_empty() {
                    std::ptr::null()
                } else {
                    ep.rowsum.as_ptr()
                };
                // SAFETY: `self` holds a token made only after detecting AVX-512F/BW/VNNI;
                // the caller guarantees the operand ranges (as `kernel`); the asserts
                // cover the column parameters (j0..j0 + NR), the `rows` row sums unless
                // null, and every write (`out[r * ldc + c]`, r < rows, c < cols).
                unsafe {
                    vnni_rq::<$mr, $pn>(
                        a.as_ptr(),
                        deltas,
                        seg,
                        b.as_ptr(),
                        ep.prefetch,
                        &p,
                        j0,
                        rs,
                        rows,
                        cols,
                        out.as_mut_ptr(),
                        ldc,
                    )
                }
            }
        }
    };
}

vnni_kernel!(
    /// Eight rows times two panels (`MR = 8`, `NR = 32`): the AVX-512 VNNI GEMM kernel.
    Vnni8x32, 8, 2, Vnni4x32, Vnni8x16
);
vnni_kernel!(
    /// Twelve rows times two panels (24 accumulators): the kernel for deep products
    /// (each weight load serves 12 rows instead of 8; its edges are [`Vnni8x32`] and
    /// [`Vnni12x16`]).
    Vnni12x32, 12, 2, Vnni8x32, Vnni12x16
);
vnni_kernel!(
    /// Twelve rows times one panel: [`Vnni12x32`]'s column edge.
    Vnni12x16, 12, 1, Vnni8x16, Vnni12x16
);
vnni_kernel!(
    /// Four rows times two panels: [`Vnni8x32`]'s row edge.
    Vnni4x32, 4, 2, Vnni4x32, Vnni4x16
);
vnni_kernel!(
    /// Eight rows times one panel: [`Vnni8x32`]'s column edge.
    Vnni8x16, 8, 1, Vnni4x16, Vnni8x16
);
vnni_kernel!(
    /// Four rows times one panel: the smallest AVX-512 VNNI tile.
    Vnni4x16, 4, 1, Vnni4x16, Vnni4x16
);

/// The dot products of an `R x (P * NR)` tile: `R` activation rows (segment `s` of row
/// `r` at `a[r] + deltas[s]`) times `P` adjacent packed panels (at `b + h * kp * NR`), one
/// `vpdpbusd` per row, panel and `k` group of 4 (`u8 x i8` products straight into `i32`
/// lanes: exact, nothing saturates). Each row's broadcast serves every panel and each panel
/// load every row; the `R * P` accumulators are independent chains. Expands to the
/// accumulator array `[[__m512i; P]; R]`.
macro_rules! vnni_dot {
    ($r:ident, $p:ident, $a:ident, $deltas:ident, $seg:ident, $b:ident, $pf:ident, $init:expr) => {{
        let kp = $deltas.len() * $seg;
        let mut c: [[__m512i; $p]; $r] = $init;
        let mut bp = $b;
        let ap: [*const u8; $r] = std::array::from_fn(|r| *$a.add(r));
        // Prefetch `$pf` into L2 in whole lines spread over the `kp / 4` steps.
        let (mut pfp, pf_end) = ($pf.as_ptr(), $pf.as_ptr().wrapping_add($pf.len()));
        let pf_step = 64 * ($pf.len().div_ceil(64)).div_ceil((kp / 4).max(1));
        for &d in $deltas {
            let mut q = d;
            let end = d + $seg;
            while q < end {
                if pfp < pf_end {
                    let stop = pfp.wrapping_add(pf_step);
                    while pfp < stop {
                        _mm_prefetch::<_MM_HINT_T1>(pfp as *const i8);
                        pfp = pfp.wrapping_add(64);
                    }
                }
                let bv: [__m512i; $p] =
                    std::array::from_fn(|h| _mm512_loadu_si512(bp.add(h * kp * NR) as *const _));
                for r in 0..$r {
                    let av = _mm512_set1_epi32((ap[r].add(q) as *const i32).read_unaligned());
                    for h in 0..$p {
                        c[r][h] = _mm512_dpbusd_epi32(c[r][h], av, bv[h]);
                    }
                }
                bp = bp.add(4 * NR);
                q += 4;
            }
        }
        c
    }};
}

/// `acc = A * B` for an `R x (P * NR)` tile (see `vnni_dot!`), stored
/// `[panel][row][NR]`.
///
/// # Safety
/// AVX-512F/BW and AVX-512 VNNI must be available; `a` readable for `R` pointers,
/// `a[r] + deltas[s]` readable for `seg` bytes inside one allocation for every row and
/// segment; `b` readable for `P * deltas.len() * seg * NR` bytes; `acc` writable for
/// `R * P * NR` `i32`; `seg % 4 == 0`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni_acc<const R: usize, const P: usize>(
    a: *const *const u8,
    deltas: &[usize],
    seg: usize,
    b: *const i8,
    acc: *mut i32,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let none: &[i8] = &[];
        let c = vnni_dot!(
            R,
            P,
            a,
            deltas,
            seg,
            b,
            none,
            [[_mm512_setzero_si512(); P]; R]
        );
        for (r, row) in c.iter().enumerate() {
            for (h, v) in row.iter().enumerate() {
                _mm512_storeu_si512(acc.add((h * R + r) * NR) as *mut _, *v);
            }
        }
    }
}

/// An `R x (P * NR)` tile (see `vnni_dot!`, `P` is 1 or 2; `prefetch` is brought into L2
/// meanwhile, a line per `k` step or more) requantized straight from the
/// accumulator registers into `out[r * ldc + c]` for `r < rows`, `c < cols`: the
/// zero-point corrections and `requant::requant_one`'s `f32` arithmetic on sixteen lanes
/// (`cvtdq2ps`, FMA, multiply, `cvtps2dq`: the same instructions as `requant_tile`, so
/// the same bits), then the clamp through saturating packs (`i32 -> i16` signed, add the
/// output zero point with `i16` saturation, `i16 -> u8` unsigned, `max` with the ReLU
/// bound): `clamp(v + out_zp, lo, 255)` for every `i32` `v`, as `requant_one`.
///
/// # Safety
/// As [`vnni_acc`] for `a` and `b`; `p`'s column parameters readable for columns
/// `j0..j0 + P * NR` (and `p.w_zp` unless `rowsum` is null); `rowsum` null or readable for
/// `rows` `i32`; `rows <= R`, `cols <= P * NR`; `out` writable at `r * ldc + c` for
/// `r < rows`, `c < cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn vnni_rq<const R: usize, const P: usize>(
    a: *const *const u8,
    deltas: &[usize],
    seg: usize,
    b: *const i8,
    prefetch: &[i8],
    p: &ColParams,
    j0: usize,
    rowsum: *const i32,
    rows: usize,
    cols: usize,
    out: *mut u8,
    ldc: usize,
) {
    const { assert!(P == 1 || P == 2) };
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges); stores are masked to the `cols` valid columns of the
    // `rows` valid rows.
    unsafe {
        let azp = _mm512_set1_epi32(p.a_zp);
        let ld = |ptr: *const i32, h: usize| _mm512_loadu_si512(ptr.add(j0 + h * NR) as *const _);
        let ldf = |ptr: *const f32, h: usize| _mm512_loadu_ps(ptr.add(j0 + h * NR));
        // The zero-point corrections start the sums (`-a_zp * col_offset[j]`, and
        // `-w_zp[j] * rowsum[r]` for the valid rows): wrapping `i32` additions, so the
        // same bits as subtracting them after.
        let ncoff: [__m512i; P] = std::array::from_fn(|h| {
            _mm512_sub_epi32(
                _mm512_setzero_si512(),
                _mm512_mullo_epi32(azp, ld(p.col_off, h)),
            )
        });
        let mut init = [ncoff; R];
        if !rowsum.is_null() {
            let wzp: [__m512i; P] = std::array::from_fn(|h| ld(p.w_zp, h));
            for (r, row) in init.iter_mut().enumerate().take(rows) {
                let rs = _mm512_set1_epi32(*rowsum.add(r));
                for (x, w) in row.iter_mut().zip(&wzp) {
                    *x = _mm512_sub_epi32(*x, _mm512_mullo_epi32(*w, rs));
                }
            }
        }
        let c = vnni_dot!(R, P, a, deltas, seg, b, prefetch, init);
        let bb: [__m512; P] = std::array::from_fn(|h| ldf(p.bias_b, h));
        let bs: [__m512; P] = std::array::from_fn(|h| ldf(p.bias_s, h));
        let mult: [__m512; P] = std::array::from_fn(|h| ldf(p.mult, h));
        let zp16 = _mm512_set1_epi16(p.out_zp as i16);
        let lo8 = _mm512_set1_epi8(p.lo as u8 as i8);
        // After the packs, dword 4L + h of the register holds columns 4L..4L + 4 of
        // panel h (128-bit lane L): gather them in column order.
        let idx = if P == 2 {
            _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0)
        } else {
            _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        };
        let mask: __mmask64 = (1u64 << cols) - 1;
        for (r, row) in c.iter().enumerate().take(rows) {
            let v: [__m512i; P] = std::array::from_fn(|h| rq16(row[h], bb[h], bs[h], mult[h]));
            let t = _mm512_adds_epi16(_mm512_packs_epi32(v[0], v[P - 1]), zp16);
            let u = _mm512_max_epu8(_mm512_packus_epi16(t, t), lo8);
            let u = _mm512_permutexvar_epi32(idx, u);
            _mm512_mask_storeu_epi8(out.add(r * ldc) as *mut _, mask, u);
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
