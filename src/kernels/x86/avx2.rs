//! AVX2 + FMA bodies. Every function here is `unsafe`: the caller (the safe wrappers in
//! [`super`]) guarantees that the CPU supports AVX2 and FMA and that the pointers cover
//! the documented ranges.

use std::arch::x86_64::*;

use crate::kernels::gemm::{Epilogue, GemmKernel};
use crate::kernels::pack::{PackedWeights, NR};
use crate::kernels::requant::RequantParams;
use crate::kernels::{KernelPath, MR};

/// The dot products of an `R x NR` tile: `R` activation rows (segment `s` of row `r` at
/// `a[r] + deltas[s]`) times one packed panel, per `k` group of 4 one `vpmaddubsw` per row
/// and half panel (`u8 x i8` pairs summed in `i16`), widened by `vpmaddwd` with ones and
/// added in `i32`. Exact when no pair sum leaves `i16`: activations at most 127 or weights
/// in `[-64, 63]`. `[row][half]`, half `h` holding columns `8h..8h + 8`.
///
/// # Safety
/// AVX2 must be available (the caller is a `#[target_feature(enable = "avx2")]` function);
/// `a` readable for `R` pointers, `a[r] + deltas[s]` readable for `seg` bytes inside one
/// allocation for every row and segment; `b` readable for `deltas.len() * seg * NR` bytes;
/// `seg % 4 == 0`.
#[inline(always)]
unsafe fn dot<const R: usize>(
    a: *const *const u8,
    deltas: &[usize],
    seg: usize,
    b: *const i8,
) -> [[__m256i; 2]; R] {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut c = [[_mm256_setzero_si256(); 2]; R];
        let ap: [*const u8; R] = std::array::from_fn(|r| *a.add(r));
        let mut bp = b;
        for &d in deltas {
            let mut q = d;
            let end = d + seg;
            while q < end {
                let b0 = _mm256_loadu_si256(bp as *const __m256i);
                let b1 = _mm256_loadu_si256(bp.add(32) as *const __m256i);
                for r in 0..R {
                    let av = _mm256_set1_epi32((ap[r].add(q) as *const i32).read_unaligned());
                    let t0 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones);
                    let t1 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones);
                    c[r][0] = _mm256_add_epi32(c[r][0], t0);
                    c[r][1] = _mm256_add_epi32(c[r][1], t1);
                }
                bp = bp.add(4 * NR);
                q += 4;
            }
        }
        c
    }
}

/// `k` groups of 4 after which [`dot_split`]'s `i16` sums of the high bits must be
/// flushed: each group adds a pair sum in `[-256, 254]` (bits `0..=1` times weights in
/// `[-128, 127]`), so 128 groups stay inside `[-32768, 32512]`.
const HI_GROUPS: usize = 128;

/// The dot products of an `R x NR` tile of a split block in one pass: `lo[r]` reads the
/// low seven bits (`a & 127`) and `hi[r]` the top bit (`a >> 7`) of row `r` (same segment
/// layout as [`dot`]). The low part goes through [`dot`]'s exact sequence (pairs of at most
/// `127 * 128` cannot saturate); the high part's `vpmaddubsw` pair sums (in `[-256, 254]`)
/// are added in `i16` with `vpaddw` for up to [`HI_GROUPS`] groups (no overflow: exact),
/// then widened and scaled by `vpmaddwd` with 128 into the same `i32` sums:
/// `sum (a & 127) * w + 128 * sum (a >> 7) * w = sum a * w` for any activations.
///
/// # Safety
/// As [`dot`], for `hi` as for `lo`; every byte `hi` reads is 0 or 1 and every byte `lo`
/// reads at most 127.
#[inline(always)]
unsafe fn dot_split<const R: usize>(
    lo: *const *const u8,
    hi: *const *const u8,
    deltas: &[usize],
    seg: usize,
    b: *const i8,
) -> [[__m256i; 2]; R] {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let w128 = _mm256_set1_epi16(128);
        let zero = _mm256_setzero_si256();
        let mut c = [[zero; 2]; R];
        let mut h = [[zero; 2]; R];
        let lp: [*const u8; R] = std::array::from_fn(|r| *lo.add(r));
        let hp: [*const u8; R] = std::array::from_fn(|r| *hi.add(r));
        let mut bp = b;
        let mut groups = 0;
        for &d in deltas {
            let mut q = d;
            let end = d + seg;
            while q < end {
                let b0 = _mm256_loadu_si256(bp as *const __m256i);
                let b1 = _mm256_loadu_si256(bp.add(32) as *const __m256i);
                for r in 0..R {
                    let av = _mm256_set1_epi32((lp[r].add(q) as *const i32).read_unaligned());
                    let t0 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones);
                    let t1 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones);
                    c[r][0] = _mm256_add_epi32(c[r][0], t0);
                    c[r][1] = _mm256_add_epi32(c[r][1], t1);
                    let hv = _mm256_set1_epi32((hp[r].add(q) as *const i32).read_unaligned());
                    h[r][0] = _mm256_add_epi16(h[r][0], _mm256_maddubs_epi16(hv, b0));
                    h[r][1] = _mm256_add_epi16(h[r][1], _mm256_maddubs_epi16(hv, b1));
                }
                bp = bp.add(4 * NR);
                q += 4;
                groups += 1;
                if groups == HI_GROUPS {
                    groups = 0;
                    for r in 0..R {
                        for x in 0..2 {
                            c[r][x] = _mm256_add_epi32(c[r][x], _mm256_madd_epi16(h[r][x], w128));
                            h[r][x] = zero;
                        }
                    }
                }
            }
        }
        for r in 0..R {
            for x in 0..2 {
                c[r][x] = _mm256_add_epi32(c[r][x], _mm256_madd_epi16(h[r][x], w128));
            }
        }
        c
    }
}

/// Stores an `R x NR` tile of sums (`[row][half]`) as `[row][NR]` `i32`.
///
/// # Safety
/// AVX2 must be available; `acc` writable for `R * NR` `i32`.
#[inline(always)]
unsafe fn store_acc<const R: usize>(c: &[[__m256i; 2]; R], acc: *mut i32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let o = acc as *mut __m256i;
        for (r, row) in c.iter().enumerate() {
            _mm256_storeu_si256(o.add(2 * r), row[0]);
            _mm256_storeu_si256(o.add(2 * r + 1), row[1]);
        }
    }
}

/// `MR x NR` tile of `i32` dot products of activation rows (segment pointers) and one
/// packed panel ([`dot`]), stored `[row][NR]`.
///
/// # Safety
/// AVX2 must be available; `a` readable for `MR` pointers, `a[r] + deltas[s]` readable
/// for `seg` bytes inside one allocation for every row and segment; `b` readable for
/// `deltas.len() * seg * NR` bytes; `acc` writable for `MR * NR` `i32`; `seg % 4 == 0`.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile(a: *const *const u8, deltas: &[usize], seg: usize, b: *const i8, acc: *mut i32) {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe { store_acc(&dot::<MR>(a, deltas, seg, b), acc) }
}

/// [`tile`] requantized straight from the registers ([`requant_rows`]) into
/// `out[r * ldc + c]` for `r < rows`, `c < cols`.
///
/// # Safety
/// As [`tile`] for `a`, `deltas`, `seg`, `b`; as [`requant_rows`] for the rest.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rq(
    a: *const *const u8,
    deltas: &[usize],
    seg: usize,
    b: *const i8,
    p: &ColParams,
    j0: usize,
    rowsum: *const i32,
    rows: usize,
    cols: usize,
    out: *mut u8,
    ldc: usize,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let c = dot::<MR>(a, deltas, seg, b);
        requant_rows(&c, p, j0, rowsum, rows, cols, out, ldc);
    }
}

/// The split tile ([`dot_split`], two rows at a time to keep its sixteen sums in
/// registers) requantized from the registers into `out[r * ldc + c]` for `r < rows`,
/// `c < cols`.
///
/// # Safety
/// As [`dot_split`] for `lo` and `hi` (each `MR` row pointers), `deltas`, `seg`, `b`; as
/// [`requant_rows`] for the rest.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_split_rq(
    lo: *const *const u8,
    hi: *const *const u8,
    deltas: &[usize],
    seg: usize,
    b: *const i8,
    p: &ColParams,
    j0: usize,
    rowsum: *const i32,
    rows: usize,
    cols: usize,
    out: *mut u8,
    ldc: usize,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract; each pass covers
    // rows `r0..r0 + 2` of the `MR` pointers and writes only its valid rows.
    unsafe {
        let mut r0 = 0;
        while r0 < rows {
            let c = dot_split::<2>(lo.add(r0), hi.add(r0), deltas, seg, b);
            let rs = if rowsum.is_null() {
                rowsum
            } else {
                rowsum.add(r0)
            };
            let n = (rows - r0).min(2);
            requant_rows(&c, p, j0, rs, n, cols, out.add(r0 * ldc), ldc);
            r0 += 2;
        }
    }
}

/// Requantizes the first `rows x cols` of an `R x NR` tile of sums held in registers
/// (`[row][half]`, global columns `j0..j0 + NR`) into `out[r * ldc + c]`: the zero-point
/// corrections, then [`rq8`]'s arithmetic on both halves (the same instructions as
/// [`requant_tile`], so the same bytes) and one 16-byte store per row.
///
/// # Safety
/// AVX2 and FMA must be available; `p`'s column parameters readable for columns
/// `j0..j0 + NR` (`p.w_zp` only when `rowsum` is not null); `rowsum` null (no row
/// correction) or readable for `rows` `i32`; `rows <= R`, `cols <= NR`; `out` writable at
/// `r * ldc + c` for `r < rows`, `c < cols`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn requant_rows<const R: usize>(
    c: &[[__m256i; 2]; R],
    p: &ColParams,
    j0: usize,
    rowsum: *const i32,
    rows: usize,
    cols: usize,
    out: *mut u8,
    ldc: usize,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract; partial rows are
    // stored through a stack buffer.
    unsafe {
        // No closures here: they would not inherit this function's target features.
        let azp = _mm256_set1_epi32(p.a_zp);
        let (c0, c1) = (p.col_off.add(j0), p.col_off.add(j0 + 8));
        let coff0 = _mm256_mullo_epi32(azp, _mm256_loadu_si256(c0 as *const __m256i));
        let coff1 = _mm256_mullo_epi32(azp, _mm256_loadu_si256(c1 as *const __m256i));
        let (bb0, bb1) = (
            _mm256_loadu_ps(p.bias_b.add(j0)),
            _mm256_loadu_ps(p.bias_b.add(j0 + 8)),
        );
        let (bs0, bs1) = (
            _mm256_loadu_ps(p.bias_s.add(j0)),
            _mm256_loadu_ps(p.bias_s.add(j0 + 8)),
        );
        let (m0, m1) = (
            _mm256_loadu_ps(p.mult.add(j0)),
            _mm256_loadu_ps(p.mult.add(j0 + 8)),
        );
        let zp16 = _mm256_set1_epi16(p.out_zp as i16);
        let lo8 = _mm256_set1_epi8(p.lo as u8 as i8);
        // After the packs, dword 4L + h holds columns 8h + 4L..8h + 4L + 4 (128-bit lane
        // L, half h): gather them in column order.
        let idx = _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0);
        let has_rs = !rowsum.is_null();
        let (wzp0, wzp1) = if has_rs {
            (
                _mm256_loadu_si256(p.w_zp.add(j0) as *const __m256i),
                _mm256_loadu_si256(p.w_zp.add(j0 + 8) as *const __m256i),
            )
        } else {
            (_mm256_setzero_si256(), _mm256_setzero_si256())
        };
        for (r, row) in c.iter().enumerate().take(rows) {
            let mut x0 = _mm256_sub_epi32(row[0], coff0);
            let mut x1 = _mm256_sub_epi32(row[1], coff1);
            if has_rs {
                let rs = _mm256_set1_epi32(*rowsum.add(r));
                x0 = _mm256_sub_epi32(x0, _mm256_mullo_epi32(wzp0, rs));
                x1 = _mm256_sub_epi32(x1, _mm256_mullo_epi32(wzp1, rs));
            }
            let f0 = _mm256_fmadd_ps(bb0, bs0, _mm256_cvtepi32_ps(x0));
            let f1 = _mm256_fmadd_ps(bb1, bs1, _mm256_cvtepi32_ps(x1));
            let v0 = _mm256_cvtps_epi32(_mm256_mul_ps(f0, m0));
            let v1 = _mm256_cvtps_epi32(_mm256_mul_ps(f1, m1));
            let t = _mm256_adds_epi16(_mm256_packs_epi32(v0, v1), zp16);
            let u = _mm256_max_epu8(_mm256_packus_epi16(t, t), lo8);
            let u = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(u, idx));
            let dst = out.add(r * ldc);
            if cols >= NR {
                _mm_storeu_si128(dst as *mut __m128i, u);
            } else {
                let mut buf = [0u8; 16];
                _mm_storeu_si128(buf.as_mut_ptr() as *mut __m128i, u);
                std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, cols);
            }
        }
    }
}

/// Per-column requantization parameters, as raw pointers (each readable for the columns
/// the call touches, rounded up to the register width).
pub(crate) struct ColParams {
    pub col_off: *const i32,
    pub w_zp: *const i32,
    pub bias_b: *const f32,
    pub bias_s: *const f32,
    pub mult: *const f32,
    pub a_zp: i32,
    pub out_zp: i32,
    pub lo: i32,
}

/// Requantizes 8 zero-point-corrected accumulators of columns `j..j + 8` to 8 bytes.
///
/// # Safety
/// AVX2 and FMA must be available; `p`'s float parameters readable at `j..j + 8`.
#[inline(always)]
unsafe fn rq8(x: __m256i, p: &ColParams, j: usize) -> __m128i {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let xf = _mm256_fmadd_ps(
            _mm256_loadu_ps(p.bias_b.add(j)),
            _mm256_loadu_ps(p.bias_s.add(j)),
            _mm256_cvtepi32_ps(x),
        );
        let v = _mm256_mul_ps(xf, _mm256_loadu_ps(p.mult.add(j)));
        let r = _mm256_cvtps_epi32(v);
        let w16 = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r));
        let w16 = _mm_adds_epi16(w16, _mm_set1_epi16(p.out_zp as i16));
        let b8 = _mm_packus_epi16(w16, w16);
        _mm_max_epu8(b8, _mm_set1_epi8(p.lo as u8 as i8))
    }
}

/// Stores the low `n` (at most 8) bytes of `v` at `dst`.
///
/// # Safety
/// SSE2 (x86-64 baseline); `dst` writable for `n <= 8` bytes.
#[inline(always)]
unsafe fn store_n(dst: *mut u8, v: __m128i, n: usize) {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        if n >= 8 {
            _mm_storel_epi64(dst as *mut __m128i, v);
        } else {
            let mut buf = [0u8; 16];
            _mm_storeu_si128(buf.as_mut_ptr() as *mut __m128i, v);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, n);
        }
    }
}

/// Requantizes the first `rows x cols` of an `MR x NR` accumulator tile whose first
/// column is global column `j0`, writing `out[r * ldc + c]`.
///
/// # Safety
/// AVX2 and FMA must be available; `acc` readable for `rows * NR` `i32`; `rowsum` null
/// (no row correction) or readable for `rows` `i32` (and then `p.w_zp` for columns
/// `j0..j0 + NR`); the other column parameters readable for columns `j0..j0 + NR`; `out`
/// writable at `r * ldc + c` for `r < rows`, `c < cols`; `cols <= NR`.
#[target_feature(enable = "avx2,fma")]
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
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let azp = _mm256_set1_epi32(p.a_zp);
        let mut h = 0;
        while h < NR && h < cols {
            let j = j0 + h;
            let coff =
                _mm256_mullo_epi32(azp, _mm256_loadu_si256(p.col_off.add(j) as *const __m256i));
            if rowsum.is_null() {
                for r in 0..rows {
                    let x = _mm256_loadu_si256(acc.add(r * NR + h) as *const __m256i);
                    let x = _mm256_sub_epi32(x, coff);
                    store_n(out.add(r * ldc + h), rq8(x, p, j), cols - h);
                }
            } else {
                let wzp = _mm256_loadu_si256(p.w_zp.add(j) as *const __m256i);
                for r in 0..rows {
                    let x = _mm256_loadu_si256(acc.add(r * NR + h) as *const __m256i);
                    let roff = _mm256_mullo_epi32(wzp, _mm256_set1_epi32(*rowsum.add(r)));
                    let x = _mm256_sub_epi32(_mm256_sub_epi32(x, coff), roff);
                    store_n(out.add(r * ldc + h), rq8(x, p, j), cols - h);
                }
            }
            h += 8;
        }
    }
}

/// The vectorized quantized add on `n` (a multiple of 8) elements: exactly
/// `AddParams::one` per element (the same FMA, sum, ReLU and `cvtps2dq` rounding, and a
/// saturating pack that equals the clamp to `0..=255`).
///
/// # Safety
/// AVX2 and FMA must be available; `a`, `b` readable and `out` writable for `n` bytes;
/// `n % 8 == 0`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn add_u8(
    a: *const u8,
    b: *const u8,
    n: usize,
    p: &crate::kernels::elementwise::AddParams,
    out: *mut u8,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let (sa, pa) = (_mm256_set1_ps(p.sa), _mm256_set1_ps(p.pa));
        let (sb, pb) = (_mm256_set1_ps(p.sb), _mm256_set1_ps(p.pb));
        let inv = _mm256_set1_ps(p.inv);
        // Clamping to [-512, 512] before rounding gives the same bytes as PyTorch's
        // `min(x, 2147483520.0)` (beyond +-512 the final clamp decides either way) and keeps
        // `cvt(x) + zo` inside i32.
        let (lo, hi) = (_mm256_set1_ps(-512.0), _mm256_set1_ps(512.0));
        let zo = _mm256_set1_epi32(p.zo);
        let zero = _mm256_setzero_ps();
        let ld = |q: *const u8, i: usize| {
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                q.add(i) as *const __m128i
            )))
        };
        let mut i = 0;
        while i < n {
            let da = _mm256_fmadd_ps(sa, ld(a, i), pa);
            let db = _mm256_fmadd_ps(sb, ld(b, i), pb);
            let mut c = _mm256_add_ps(da, db);
            if p.relu {
                c = _mm256_max_ps(c, zero);
            }
            let x = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(c, inv), lo), hi);
            // The saturating packs clamp to 0..=255 like the scalar clamp.
            let r = _mm256_add_epi32(_mm256_cvtps_epi32(x), zo);
            let w = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r));
            _mm_storel_epi64(out.add(i) as *mut __m128i, _mm_packus_epi16(w, w));
            i += 8;
        }
    }
}

/// [`crate::kernels::pool::max_pool_body`] compiled with AVX2 enabled.
///
/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn max_pool_nhwc(x: &[u8], g: &crate::kernels::pool::PoolGeom, out: &mut [u8]) {
    crate::kernels::pool::max_pool_body(x, g, out)
}

/// [`crate::kernels::pool::avg_pool_body`] compiled with AVX2 enabled.
///
/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn avg_pool_nhwc(
    x: &[u8],
    g: &crate::kernels::pool::PoolGeom,
    p: &crate::kernels::pool::AvgParams,
    out: &mut [u8],
) {
    crate::kernels::pool::avg_pool_body(x, g, p, out)
}

/// Transposes one 8x8 byte block (SSE2, part of x86-64's baseline).
///
/// # Safety
/// `src + r * sstride + 0..8` readable and `dst + c * dstride + 0..8` writable for
/// `r, c < 8`.
#[inline(always)]
pub(super) unsafe fn transpose8x8(src: *const u8, sstride: usize, dst: *mut u8, dstride: usize) {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let ld = |r: usize| _mm_loadl_epi64(src.add(r * sstride) as *const __m128i);
        let t0 = _mm_unpacklo_epi8(ld(0), ld(1));
        let t1 = _mm_unpacklo_epi8(ld(2), ld(3));
        let t2 = _mm_unpacklo_epi8(ld(4), ld(5));
        let t3 = _mm_unpacklo_epi8(ld(6), ld(7));
        let u0 = _mm_unpacklo_epi16(t0, t1);
        let u1 = _mm_unpackhi_epi16(t0, t1);
        let u2 = _mm_unpacklo_epi16(t2, t3);
        let u3 = _mm_unpackhi_epi16(t2, t3);
        let v = [
            _mm_unpacklo_epi32(u0, u2),
            _mm_unpackhi_epi32(u0, u2),
            _mm_unpacklo_epi32(u1, u3),
            _mm_unpackhi_epi32(u1, u3),
        ];
        for (i, x) in v.iter().enumerate() {
            _mm_storel_epi64(dst.add(2 * i * dstride) as *mut __m128i, *x);
            _mm_storel_epi64(
                dst.add((2 * i + 1) * dstride) as *mut __m128i,
                _mm_srli_si128::<8>(*x),
            );
        }
    }
}

/// The AVX2 GEMM micro-kernel: [`MR`] rows x one panel ([`NR`] columns) with
/// `vpmaddubsw`. Exact when the activations are at most 127 or the weights lie in
/// `[-64, 63]`; otherwise the driver splits the activations
/// ([`GemmKernel::needs_split`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2Kernel(super::Avx2);

impl Avx2Kernel {
    /// The kernel for a detected AVX2 + FMA token (its requantization stays on AVX2 even
    /// where the token also enables AVX-512).
    pub(crate) fn new(s: super::Avx2) -> Self {
        let mut t = s;
        t.vnni = false;
        Avx2Kernel(t)
    }
}

impl GemmKernel for Avx2Kernel {
    const MR: usize = MR;
    const NR: usize = NR;
    type RowEdge = Self;
    type ColEdge = Self;

    fn row_edge(self) -> Self {
        self
    }

    fn col_edge(self) -> Self {
        self
    }

    fn needs_split(self, w: &PackedWeights) -> bool {
        !w.narrow
    }

    fn path(self, split: bool) -> KernelPath {
        if split {
            KernelPath::Avx2Split
        } else {
            KernelPath::Avx2Fast
        }
    }

    /// # Safety
    /// As [`GemmKernel::kernel`]; the token proves AVX2 + FMA.
    unsafe fn kernel(
        self,
        a: &[*const u8],
        deltas: &[usize],
        seg: usize,
        b: &[i8],
        acc: &mut [i32],
    ) {
        debug_assert!(seg.is_multiple_of(4) && a.len() >= MR);
        debug_assert!(b.len() >= NR * deltas.len() * seg && acc.len() >= MR * NR);
        // SAFETY: `self` holds a token made only after detecting AVX2 + FMA; the caller
        // guarantees what `tile` reads and writes (MR row starts whose segments at
        // `deltas` are readable for `seg` bytes, the panel bytes, MR * NR i32).
        unsafe { tile(a.as_ptr(), deltas, seg, b.as_ptr(), acc.as_mut_ptr()) }
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
    /// As [`GemmKernel::kernel_requant`]; the token proves AVX2 + FMA.
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
        debug_assert!(seg.is_multiple_of(4) && a.len() >= MR);
        debug_assert!(b.len() >= NR * deltas.len() * seg);
        let (p, rs) = epilogue_params(ep, rows, cols, out.len(), ldc);
        // SAFETY: `self` holds a token made only after detecting AVX2 + FMA; the caller
        // guarantees the operand ranges (as `kernel`); `epilogue_params` asserted the
        // column parameters (j0..j0 + NR), the `rows` row sums unless null, and every
        // write (`out[r * ldc + c]`, r < rows <= MR, c < cols <= NR).
        unsafe {
            tile_rq(
                a.as_ptr(),
                deltas,
                seg,
                b.as_ptr(),
                &p,
                ep.j0,
                rs,
                rows,
                cols,
                out.as_mut_ptr(),
                ldc,
            )
        }
    }

    /// # Safety
    /// As [`GemmKernel::kernel_split_requant`]; the token proves AVX2 + FMA.
    unsafe fn kernel_split_requant(
        self,
        a: &[*const u8],
        hi: &[*const u8],
        deltas: &[usize],
        seg: usize,
        b: &[i8],
        ep: &Epilogue<'_>,
        rows: usize,
        cols: usize,
        out: &mut [u8],
        ldc: usize,
        _acc: &mut [i32],
        _acc2: &mut [i32],
    ) {
        debug_assert!(seg.is_multiple_of(4) && a.len() >= MR && hi.len() >= MR);
        debug_assert!(b.len() >= NR * deltas.len() * seg);
        let (p, rs) = epilogue_params(ep, rows, cols, out.len(), ldc);
        // SAFETY: `self` holds a token made only after detecting AVX2 + FMA; the caller
        // guarantees the operand ranges for `a` and `hi` (as `kernel`) and their values
        // (`a & 127` and `a >> 7`); `epilogue_params` asserted the column parameters
        // (j0..j0 + NR), the `rows` row sums unless null, and every write
        // (`out[r * ldc + c]`, r < rows <= MR, c < cols <= NR).
        unsafe {
            tile_split_rq(
                a.as_ptr(),
                hi.as_ptr(),
                deltas,
                seg,
                b.as_ptr(),
                &p,
                ep.j0,
                rs,
                rows,
                cols,
                out.as_mut_ptr(),
                ldc,
            )
        }
    }
}

/// The AVX2 kernel with the trait's default split tile (two passes of the plain tile,
/// combined in memory, then requantized per panel): keeps that default tested.
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2TwoPass(pub(crate) Avx2Kernel);

#[cfg(test)]
impl GemmKernel for Avx2TwoPass {
    const MR: usize = Avx2Kernel::MR;
    const NR: usize = Avx2Kernel::NR;
    type RowEdge = Self;
    type ColEdge = Self;

    fn row_edge(self) -> Self {
        self
    }

    fn col_edge(self) -> Self {
        self
    }

    fn needs_split(self, w: &PackedWeights) -> bool {
        self.0.needs_split(w)
    }

    fn path(self, split: bool) -> KernelPath {
        self.0.path(split)
    }

    /// # Safety
    /// As [`GemmKernel::kernel`].
    unsafe fn kernel(
        self,
        a: &[*const u8],
        deltas: &[usize],
        seg: usize,
        b: &[i8],
        acc: &mut [i32],
    ) {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.0.kernel(a, deltas, seg, b, acc) }
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

/// The raw column parameters of a tile's epilogue (columns `ep.j0..ep.j0 + NR`) and its
/// row sums (null when there are none), after checking every range the fused tiles read
/// or write: the padded parameter vectors, `rows` row sums, and `out[r * ldc + c]` for
/// `r < rows <= MR`, `c < cols <= NR`.
fn epilogue_params(
    ep: &Epilogue<'_>,
    rows: usize,
    cols: usize,
    out_len: usize,
    ldc: usize,
) -> (ColParams, *const i32) {
    let (w, rq, j0) = (ep.w, ep.rq, ep.j0);
    let jn = j0 + NR;
    assert!(rows <= MR && cols <= NR);
    assert!(ep.rowsum.is_empty() || (ep.rowsum.len() >= rows && w.w_zp.len() >= jn));
    assert!(w.col_offsets.len() >= jn && rq.mult.len() >= jn);
    assert!(rq.bias_b.len() >= jn && rq.bias_s.len() >= jn);
    assert!(rows == 0 || out_len >= (rows - 1) * ldc + cols);
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
    (p, rs)
}

/// Quantizes `n` floats (a multiple of 8) to `u8` with the 8-bit formula of
/// `qparams::quantize_val_8bit` (multiply, clamp to +-2^22, round half to even by adding
/// and subtracting 1.5 * 2^23, add the zero point, clamp to `0..=255`); returns whether
/// every input was finite (exponent not all ones).
///
/// # Safety
/// AVX2 must be available; `src` readable for `n` `f32`, `dst` writable for `n` bytes;
/// `n % 8 == 0`.
#[target_feature(enable = "avx2,fma")]
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
        let inv = _mm256_set1_ps(inv);
        let zp = _mm256_set1_ps(zpf);
        let (lim_lo, lim_hi) = (_mm256_set1_ps(-4_194_304.0), _mm256_set1_ps(4_194_304.0));
        let magic = _mm256_set1_ps(12_582_912.0);
        let (lo, hi) = (_mm256_setzero_ps(), _mm256_set1_ps(255.0));
        let exp = _mm256_set1_epi32(0x7f80_0000);
        let mut bad = _mm256_setzero_si256();
        let mut i = 0;
        while i < n {
            let x = _mm256_loadu_ps(src.add(i));
            let e = _mm256_and_si256(_mm256_castps_si256(x), exp);
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(e, exp));
            let t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, inv), lim_lo), lim_hi);
            let v = _mm256_add_ps(_mm256_sub_ps(_mm256_add_ps(t, magic), magic), zp);
            let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
            let r = _mm256_cvttps_epi32(v);
            let w = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r));
            _mm_storel_epi64(dst.add(i) as *mut __m128i, _mm_packus_epi16(w, w));
            i += 8;
        }
        _mm256_testz_si256(bad, bad) == 1
    }
}

/// `dst[i] = (src[i] - zp) as f32 * scale` for `n` bytes (a multiple of 8).
///
/// # Safety
/// AVX2 must be available; `src` readable for `n` bytes, `dst` writable for `n` `f32`;
/// `n % 8 == 0`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dequantize_u8(src: *const u8, n: usize, scale: f32, zp: u8, dst: *mut f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract (the CPU features
    // and the pointer ranges), which is all the operations below rely on.
    unsafe {
        let s = _mm256_set1_ps(scale);
        let z = _mm256_set1_epi32(zp as i32);
        let mut i = 0;
        while i < n {
            let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(src.add(i) as *const __m128i));
            let f = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, z));
            _mm256_storeu_ps(dst.add(i), _mm256_mul_ps(f, s));
            i += 8;
        }
    }
}
