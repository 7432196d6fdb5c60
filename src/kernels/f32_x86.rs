//! x86 bodies of the `f32` depthwise and matrix-vector kernels (see [`super`]): AVX2 + FMA
//! (eight lanes) and AVX-512F (sixteen lanes), written with `std::arch` because LLVM's
//! autovectorizer scalarizes the portable bodies' accumulators once they span several
//! registers. Callers reach them through the safe wrappers here, which check the CPU
//! features and the slice bounds the bodies rely on.
//!
//! The depthwise and GEMM bodies sum in the same order as the portable ones with the same
//! fused multiply-adds (the portable bodies call `f32::mul_add`), so convolutions agree bit
//! for bit on every kernel set; the matrix-vector bodies sum in vector lanes and differ from
//! the portable body in the last bits. The tests compare every path against a float64
//! reference.

use std::arch::x86_64::*;

use super::DwArgs;

/// Which vector width a wrapper may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512F.
    Avx512,
}

impl Isa {
    /// The ISA the kernel set `ks` selects, if this CPU has it.
    pub(crate) fn of(ks: crate::kernels::KernelSet) -> Option<Isa> {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        match ks.backend() {
            crate::kernels::Backend::Portable => None,
            crate::kernels::Backend::Avx512Vnni if is_x86_feature_detected!("avx512f") => {
                Some(Isa::Avx512)
            }
            _ => avx2.then_some(Isa::Avx2),
        }
    }
}

/// Columns a depthwise kernel may read past an output row's last column (the padded
/// plane must provide them).
pub(crate) const DW_OVERREAD: usize = 32;

/// One depthwise output plane (`ho * wo` values of `o`) with `isa`.
///
/// # Panics
/// If `o` holds fewer than `ho * wo` values, `wk` fewer than `offs`, or a read could fall
/// outside `pad` (the padded plane must hold [`DW_OVERREAD`] columns past every output
/// row's last tap).
pub(crate) fn dw_plane(isa: Isa, a: &DwArgs<'_>, o: &mut [f32]) {
    if a.ho == 0 || a.wo == 0 || a.offs.is_empty() {
        return;
    }
    assert!(o.len() >= a.ho * a.wo && a.wk.len() >= a.offs.len());
    let max_off = a.offs.iter().copied().max().unwrap_or(0);
    // Every load reads 8 or 16 lanes at `oy * step + off + c` with `c < wo`.
    let last = (a.ho - 1) * a.step + max_off + a.wo - 1 + DW_OVERREAD;
    assert!(last <= a.pad.len(), "depthwise pad too short");
    match isa {
        // SAFETY: `Isa::Avx512` is only produced after detecting AVX-512F; the bounds
        // were asserted above.
        Isa::Avx512 => unsafe { dw_plane_avx512(a, o) },
        // SAFETY: `Isa::Avx2` is only produced after detecting AVX2 and FMA; the bounds
        // were asserted above.
        Isa::Avx2 => unsafe { dw_plane_avx2(a, o) },
    }
}

/// # Safety
/// AVX2 and FMA available; `o.len() >= ho * wo`; `wk.len() >= offs.len()`; for every
/// `oy < ho`, tap offset `off` and `c < wo`, `pad[oy * step + off + c + 0..32]` in bounds.
#[target_feature(enable = "avx2,fma")]
unsafe fn dw_plane_avx2(a: &DwArgs<'_>, o: &mut [f32]) {
    // Two rows of 32 columns (eight sums in flight), the last odd row alone.
    let mut oy = 0;
    // SAFETY (both calls): the contract of this function, rows `oy..oy + R` below `ho`.
    unsafe {
        while oy + 2 <= a.ho {
            dw_rows_avx2::<2>(a, o, oy);
            oy += 2;
        }
        if oy < a.ho {
            dw_rows_avx2::<1>(a, o, oy);
        }
    }
}

/// Output rows `oy0..oy0 + R` of [`dw_plane_avx2`], 32 columns per step.
///
/// # Safety
/// As [`dw_plane_avx2`], and `oy0 + R <= ho`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dw_rows_avx2<const R: usize>(a: &DwArgs<'_>, o: &mut [f32], oy0: usize) {
    let (wo, taps) = (a.wo, a.offs.len());
    let p = a.pad.as_ptr();
    let zero = _mm256_setzero_ps();
    let b = _mm256_set1_ps(a.bias);
    let mut tmp = [0f32; 32];
    let mut c = 0;
    while c < wo {
        let mut acc = [[b; 4]; R];
        for t in 0..taps {
            // SAFETY: `t < taps <= wk.len()`; the loads lie in `pad` (contract).
            unsafe {
                let wv = _mm256_set1_ps(*a.wk.get_unchecked(t));
                let off = *a.offs.get_unchecked(t) + c;
                for (r, ar) in acc.iter_mut().enumerate() {
                    let s = p.add((oy0 + r) * a.step + off);
                    for (v, av) in ar.iter_mut().enumerate() {
                        *av = _mm256_fmadd_ps(wv, _mm256_loadu_ps(s.add(8 * v)), *av);
                    }
                }
            }
        }
        let n = (wo - c).min(32);
        for (r, ar) in acc.iter().enumerate() {
            for (v, &av) in ar.iter().enumerate() {
                // `max(0, x)` returns its second operand for NaN: NaN stays.
                let y = if a.relu { _mm256_max_ps(zero, av) } else { av };
                // SAFETY: `tmp` holds 32 values.
                unsafe { _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * v), y) };
            }
            let at = (oy0 + r) * wo + c;
            o[at..at + n].copy_from_slice(&tmp[..n]);
        }
        c += 32;
    }
}

/// # Safety
/// AVX-512F available; otherwise as [`dw_plane_avx2`].
#[target_feature(enable = "avx512f")]
unsafe fn dw_plane_avx512(a: &DwArgs<'_>, o: &mut [f32]) {
    // Independent sums in flight hide the FMA latency: 4 rows of 32 columns, or 8 rows
    // of 16 for narrow planes; the rows left over one at a time.
    let ho = a.ho;
    let mut oy = 0;
    // SAFETY (all calls): the contract of this function, rows `oy..oy + R` below `ho`.
    unsafe {
        if a.wo <= 16 {
            while oy + 8 <= ho {
                dw_rows_avx512::<8, 1>(a, o, oy);
                oy += 8;
            }
        } else {
            while oy + 4 <= ho {
                dw_rows_avx512::<4, 2>(a, o, oy);
                oy += 4;
            }
        }
        while oy < ho {
            dw_rows_avx512::<1, 2>(a, o, oy);
            oy += 1;
        }
    }
}

/// Output rows `oy0..oy0 + R` of [`dw_plane_avx512`], `16 NV` columns per step (the
/// last step of a row masked).
///
/// # Safety
/// As [`dw_plane_avx512`], and `oy0 + R <= ho`.
#[target_feature(enable = "avx512f")]
unsafe fn dw_rows_avx512<const R: usize, const NV: usize>(
    a: &DwArgs<'_>,
    o: &mut [f32],
    oy0: usize,
) {
    let (wo, taps) = (a.wo, a.offs.len());
    let p = a.pad.as_ptr();
    let zero = _mm512_setzero_ps();
    let b = _mm512_set1_ps(a.bias);
    let op = o.as_mut_ptr();
    let mut c = 0;
    while c < wo {
        let mut acc = [[b; NV]; R];
        for t in 0..taps {
            // SAFETY: `t < taps <= wk.len()`; the loads lie in `pad` (contract: every
            // load reads 16 lanes from `oy * step + off + c`, `c < wo`, within the
            // over-read the plane provides).
            unsafe {
                let wv = _mm512_set1_ps(*a.wk.get_unchecked(t));
                let off = *a.offs.get_unchecked(t) + c;
                for (r, ar) in acc.iter_mut().enumerate() {
                    let s = p.add((oy0 + r) * a.step + off);
                    for (v, av) in ar.iter_mut().enumerate() {
                        *av = _mm512_fmadd_ps(wv, _mm512_loadu_ps(s.add(16 * v)), *av);
                    }
                }
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            for (v, &av) in ar.iter().enumerate() {
                let c0 = c + 16 * v;
                if c0 >= wo {
                    break;
                }
                // `max(0, x)` returns its second operand for NaN: NaN stays.
                let y = if a.relu { _mm512_max_ps(zero, av) } else { av };
                let n = (wo - c0).min(16);
                let m: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
                // SAFETY: lanes `c0..c0 + n` of output row `oy0 + r` (`n <= wo - c0`).
                unsafe { _mm512_mask_storeu_ps(op.add((oy0 + r) * wo + c0), m, y) };
            }
        }
        c += 16 * NV;
    }
}

/// `rows` rows of `wo` values: row `i` of `dst` (at `i * wo`) from `src[off + i * step..]`,
/// with vector moves (the im2col and padding rows are a few dozen values, where a `memcpy`
/// call costs more than the copy).
///
/// # Panics
/// If `dst` holds fewer than `rows * wo` values or a row lies outside `src`.
pub(crate) fn copy_rows(
    isa: Isa,
    dst: &mut [f32],
    src: &[f32],
    (off, step): (usize, usize),
    rows: usize,
    wo: usize,
) {
    if rows == 0 || wo == 0 {
        return;
    }
    assert!(dst.len() >= rows * wo && off + (rows - 1) * step + wo <= src.len());
    match isa {
        // SAFETY: AVX-512F detected (`Isa::of`); bounds asserted above.
        Isa::Avx512 => unsafe { copy_rows_avx512(dst, src, off, step, rows, wo) },
        // SAFETY: AVX2 detected (`Isa::of`); bounds asserted above.
        Isa::Avx2 => unsafe { copy_rows_avx2(dst, src, off, step, rows, wo) },
    }
}

/// # Safety
/// AVX-512F available; `dst.len() >= rows * wo`; `off + (rows - 1) * step + wo <=
/// src.len()`.
#[target_feature(enable = "avx512f")]
unsafe fn copy_rows_avx512(
    dst: &mut [f32],
    src: &[f32],
    off: usize,
    step: usize,
    rows: usize,
    wo: usize,
) {
    let (d0, s0) = (dst.as_mut_ptr(), src.as_ptr());
    let tail = wo % 16;
    let m: __mmask16 = ((1u32 << tail) - 1) as u16;
    for r in 0..rows {
        // SAFETY: lanes `r * wo..(r + 1) * wo` of `dst` and `off + r * step + 0..wo` of
        // `src` are in bounds (contract); the masked pair touches only the tail lanes.
        unsafe {
            let (d, s) = (d0.add(r * wo), s0.add(off + r * step));
            let mut i = 0;
            while i + 16 <= wo {
                _mm512_storeu_ps(d.add(i), _mm512_loadu_ps(s.add(i)));
                i += 16;
            }
            if tail != 0 {
                _mm512_mask_storeu_ps(d.add(i), m, _mm512_maskz_loadu_ps(m, s.add(i)));
            }
        }
    }
}

/// # Safety
/// AVX2 available; as [`copy_rows_avx512`] otherwise.
#[target_feature(enable = "avx2")]
unsafe fn copy_rows_avx2(
    dst: &mut [f32],
    src: &[f32],
    off: usize,
    step: usize,
    rows: usize,
    wo: usize,
) {
    let (d0, s0) = (dst.as_mut_ptr(), src.as_ptr());
    let tail = wo % 8;
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let m = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail as i32), lanes);
    for r in 0..rows {
        // SAFETY: as in `copy_rows_avx512`; the masked pair touches only the tail lanes.
        unsafe {
            let (d, s) = (d0.add(r * wo), s0.add(off + r * step));
            let mut i = 0;
            while i + 8 <= wo {
                _mm256_storeu_ps(d.add(i), _mm256_loadu_ps(s.add(i)));
                i += 8;
            }
            if tail != 0 {
                _mm256_maskstore_ps(d.add(i), m, _mm256_maskload_ps(s.add(i), m));
            }
        }
    }
}

/// `out[r * n + j] = dot(x[r], w[j])` for `rows` rows of `x` (`[rows, k]`) and the `n`
/// rows of `w` (`[n, k]`), with `isa`: four weight rows at a time against one or two input
/// rows (AVX2) or up to four (AVX-512), so each weight row is streamed once per block.
///
/// # Panics
/// If `x`, `w` or `out` are shorter than `rows * k`, `n * k`, `rows * n`.
pub(crate) fn gemv(isa: Isa, x: &[f32], rows: usize, k: usize, w: &[f32], out: &mut [f32]) {
    let n = w.len().checked_div(k).unwrap_or(0);
    assert!(x.len() >= rows * k && out.len() >= rows * n);
    let rb = match isa {
        Isa::Avx2 => 2,
        Isa::Avx512 => 4,
    };
    // Weight blocks outside, input rows inside: each block of four weight rows is read
    // from memory once and stays in cache while every input row passes over it.
    let mut j = 0;
    while j + 4 <= n {
        let ws = &w[j * k..(j + 4) * k];
        let mut r = 0;
        while r < rows {
            let take = (rows - r).min(rb);
            let xs = &x[r * k..(r + take) * k];
            let mut res = [[0f32; 4]; 4];
            // SAFETY: the ISA was detected (see `Isa::of`); `xs` holds `take * k` values
            // and `ws` `4 * k`, as the bodies read.
            unsafe {
                match (isa, take) {
                    (Isa::Avx2, 1) => dots_avx2::<1>(xs, ws, k, &mut res),
                    (Isa::Avx2, _) => dots_avx2::<2>(xs, ws, k, &mut res),
                    (Isa::Avx512, 1) => dots_avx512::<1>(xs, ws, k, &mut res),
                    (Isa::Avx512, 2) => dots_avx512::<2>(xs, ws, k, &mut res),
                    (Isa::Avx512, 3) => dots_avx512::<3>(xs, ws, k, &mut res),
                    (Isa::Avx512, _) => dots_avx512::<4>(xs, ws, k, &mut res),
                }
            }
            for (i, rr) in res.iter().enumerate().take(take) {
                out[(r + i) * n + j..(r + i) * n + j + 4].copy_from_slice(rr);
            }
            r += take;
        }
        j += 4;
    }
    // The last `n % 4` weight rows.
    for jj in j..n {
        let wr = &w[jj * k..(jj + 1) * k];
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            out[r * n + jj] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
        }
    }
}

/// `res[i][q] = dot(x row i, w row q)` for `R` input rows and 4 weight rows of length `k`.
///
/// # Safety
/// AVX2 and FMA available; `xs.len() >= R * k`, `ws.len() >= 4 * k`; `R <= 2`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const R: usize>(xs: &[f32], ws: &[f32], k: usize, res: &mut [[f32; 4]; 4]) {
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    let full = k / 8 * 8;
    let (xp, wp) = (xs.as_ptr(), ws.as_ptr());
    let mut i = 0;
    while i < full {
        // SAFETY: `i + 8 <= k`; rows `q < 4` of `ws` and `r < R` of `xs` hold `k` values.
        unsafe {
            let wv = [
                _mm256_loadu_ps(wp.add(i)),
                _mm256_loadu_ps(wp.add(k + i)),
                _mm256_loadu_ps(wp.add(2 * k + i)),
                _mm256_loadu_ps(wp.add(3 * k + i)),
            ];
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(r * k + i));
                for q in 0..4 {
                    a[q] = _mm256_fmadd_ps(xv, wv[q], a[q]);
                }
            }
        }
        i += 8;
    }
    for (r, a) in acc.iter().enumerate() {
        for q in 0..4 {
            let mut v = [0f32; 8];
            // SAFETY: `v` holds 8 values.
            unsafe { _mm256_storeu_ps(v.as_mut_ptr(), a[q]) };
            let mut s = ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
            for t in full..k {
                s += xs[r * k + t] * ws[q * k + t];
            }
            res[r][q] = s;
        }
    }
}

/// As [`dots_avx2`] with sixteen lanes.
///
/// # Safety
/// AVX-512F available; `xs.len() >= R * k`, `ws.len() >= 4 * k`; `R <= 4`.
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512<const R: usize>(xs: &[f32], ws: &[f32], k: usize, res: &mut [[f32; 4]; 4]) {
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    let full = k / 16 * 16;
    let (xp, wp) = (xs.as_ptr(), ws.as_ptr());
    let mut i = 0;
    while i < full {
        // SAFETY: `i + 16 <= k`; rows `q < 4` of `ws` and `r < R` of `xs` hold `k` values.
        unsafe {
            let wv = [
                _mm512_loadu_ps(wp.add(i)),
                _mm512_loadu_ps(wp.add(k + i)),
                _mm512_loadu_ps(wp.add(2 * k + i)),
                _mm512_loadu_ps(wp.add(3 * k + i)),
            ];
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(xp.add(r * k + i));
                for q in 0..4 {
                    a[q] = _mm512_fmadd_ps(xv, wv[q], a[q]);
                }
            }
        }
        i += 16;
    }
    for (r, a) in acc.iter().enumerate() {
        for q in 0..4 {
            let mut s = _mm512_reduce_add_ps(a[q]);
            for t in full..k {
                s += xs[r * k + t] * ws[q * k + t];
            }
            res[r][q] = s;
        }
    }
}

impl Isa {
    /// Rows of a packed weight strip, lanes of one vector, and the most vectors across a
    /// product tile of [`gemm_tile`] (AVX-512: 8 x 48, 24 accumulators; AVX2: 6 x 16).
    pub(crate) fn gemm_tile(self) -> (usize, usize, usize) {
        match self {
            Isa::Avx2 => (6, 8, 2),
            Isa::Avx512 => (8, 16, 3),
        }
    }
}

/// One product tile of [`super::gemm_bias`], `mr` rows by `nv` vectors of columns (see
/// [`Isa::gemm_tile`]; `1 <= nv <=` the most): `c` rows
/// (stride `ldc`) = zero, or their current values when `load`, plus `kc` steps of
/// `a[p * mr + r] * b[p * ldb + j]` (one fused multiply-add each, in step order), then
/// plus `bias` (one per row) when given, then `max(0, v)` when `relu` (NaN kept).
///
/// # Panics
/// If `kc == 0` or a slice is shorter than the tile reads or writes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_tile(
    isa: Isa,
    nv: usize,
    kc: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    load: bool,
    bias: Option<&[f32]>,
    relu: bool,
) {
    let (mr, lanes, most) = isa.gemm_tile();
    assert!((1..=most).contains(&nv));
    let nr = nv * lanes;
    assert!(kc > 0 && a.len() >= kc * mr && b.len() >= (kc - 1) * ldb + nr);
    assert!(c.len() >= (mr - 1) * ldc + nr && bias.is_none_or(|v| v.len() >= mr));
    let bp = bias.map_or(std::ptr::null(), |v| v.as_ptr());
    let (ap, bb, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    match isa {
        // SAFETY (all arms): the ISA was detected (`Isa::of`); every read and write lies
        // in the slices (asserted above for the `mr x nr` tile).
        Isa::Avx512 => unsafe {
            match nv {
                1 => tile_avx512::<1>(kc, ap, bb, ldb, cp, ldc, load, bp, relu),
                2 => tile_avx512::<2>(kc, ap, bb, ldb, cp, ldc, load, bp, relu),
                _ => tile_avx512::<3>(kc, ap, bb, ldb, cp, ldc, load, bp, relu),
            }
        },
        Isa::Avx2 => unsafe {
            match nv {
                1 => tile_avx2::<1>(kc, ap, bb, ldb, cp, ldc, load, bp, relu),
                _ => tile_avx2::<2>(kc, ap, bb, ldb, cp, ldc, load, bp, relu),
            }
        },
    }
}

/// The 8 x `16 NV` tile of [`gemm_tile`].
///
/// # Safety
/// AVX-512F available; `a` readable for `8 * kc` values, `b` for `(kc - 1) * ldb + 16 NV`,
/// `c` writable (and readable when `load`) for `7 * ldc + 16 NV`; `bias` null or
/// readable for 8.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512<const NV: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    load: bool,
    bias: *const f32,
    relu: bool,
) {
    const MR: usize = 8;
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    // SAFETY: the reads and writes below stay in the ranges of the contract.
    unsafe {
        for (r, t) in acc.iter_mut().enumerate() {
            for (v, tv) in t.iter_mut().enumerate() {
                if load {
                    *tv = _mm512_loadu_ps(c.add(r * ldc + 16 * v));
                }
            }
        }
        for p in 0..kc {
            let bp = b.add(p * ldb);
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(bp.add(16 * v));
            }
            let ap = a.add(p * MR);
            for (r, t) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(r));
                for (tv, &x) in t.iter_mut().zip(&bv) {
                    *tv = _mm512_fmadd_ps(av, x, *tv);
                }
            }
        }
        let zero = _mm512_setzero_ps();
        for (r, t) in acc.iter().enumerate() {
            let bv = if bias.is_null() {
                zero
            } else {
                _mm512_set1_ps(*bias.add(r))
            };
            for (v, &tv) in t.iter().enumerate() {
                let y = if bias.is_null() {
                    tv
                } else {
                    _mm512_add_ps(tv, bv)
                };
                // `max(0, x)` returns its second operand for NaN: NaN stays.
                let y = if relu { _mm512_max_ps(zero, y) } else { y };
                _mm512_storeu_ps(c.add(r * ldc + 16 * v), y);
            }
        }
    }
}

/// The 6 x `8 NV` tile of [`gemm_tile`].
///
/// # Safety
/// AVX2 and FMA available; `a` readable for `6 * kc` values, `b` for `(kc - 1) * ldb +
/// 8 NV`, `c` writable (and readable when `load`) for `5 * ldc + 8 NV`; `bias` null or
/// readable for 6.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx2<const NV: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    load: bool,
    bias: *const f32,
    relu: bool,
) {
    const MR: usize = 6;
    let mut acc = [[_mm256_setzero_ps(); NV]; MR];
    // SAFETY: the reads and writes below stay in the ranges of the contract.
    unsafe {
        for (r, t) in acc.iter_mut().enumerate() {
            for (v, tv) in t.iter_mut().enumerate() {
                if load {
                    *tv = _mm256_loadu_ps(c.add(r * ldc + 8 * v));
                }
            }
        }
        for p in 0..kc {
            let bp = b.add(p * ldb);
            let mut bv = [_mm256_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(bp.add(8 * v));
            }
            let ap = a.add(p * MR);
            for (r, t) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*ap.add(r));
                for (tv, &x) in t.iter_mut().zip(&bv) {
                    *tv = _mm256_fmadd_ps(av, x, *tv);
                }
            }
        }
        let zero = _mm256_setzero_ps();
        for (r, t) in acc.iter().enumerate() {
            let bv = if bias.is_null() {
                zero
            } else {
                _mm256_set1_ps(*bias.add(r))
            };
            for (v, &tv) in t.iter().enumerate() {
                let y = if bias.is_null() {
                    tv
                } else {
                    _mm256_add_ps(tv, bv)
                };
                let y = if relu { _mm256_max_ps(zero, y) } else { y };
                _mm256_storeu_ps(c.add(r * ldc + 8 * v), y);
            }
        }
    }
}
