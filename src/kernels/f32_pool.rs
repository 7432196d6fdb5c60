//! `f32` pooling on NCHW planes (the float layers' and graph ops' max, average and adaptive
//! average pools): one output row at a time, each kernel tap a branch-free pass over the
//! output columns it reaches (the columns whose input lies inside the plane), so the
//! stride-1 and stride-2 passes vectorize. Per output value the taps are visited in the
//! window's row-major order, as a direct loop visits them: average pools sum in that order
//! and max pools keep the first maximum (NaN wins, as ATen's `val > max || isnan(val)`).

/// Geometry of a pool on one plane.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolGeom {
    /// Input `(h, w)`.
    pub in_hw: (usize, usize),
    /// Output `(h, w)`.
    pub out_hw: (usize, usize),
    /// Window `(h, w)`.
    pub kernel: (usize, usize),
    /// Stride `(h, w)` (positive).
    pub stride: (usize, usize),
    /// Padding `(top, left)`.
    pub pad: (usize, usize),
    /// Padding `(bottom, right)` (average pools' window clipping and divisor).
    pub pad_end: (usize, usize),
    /// Dilation `(h, w)` (positive; max pools).
    pub dilation: (usize, usize),
}

/// What an average pool divides its sum by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AvgDivisor {
    /// A fixed divisor (`divisor_override`).
    Fixed(usize),
    /// The window clipped to the padded input, padding included (`count_include_pad`).
    IncludePad,
    /// The input cells in the window.
    ExcludePad,
}

/// The output columns `lo..hi` whose tap at input column offset `o` (`ox * s + o`) lies in
/// `0..w`.
#[inline]
fn col_range(o: isize, s: usize, w: usize, ow: usize) -> (usize, usize) {
    let s = s as isize;
    let lo = if o >= 0 { 0 } else { (-o + s - 1) / s };
    let last = w as isize - 1 - o;
    let hi = if last < 0 { 0 } else { last / s + 1 };
    let hi = (hi as usize).min(ow);
    ((lo as usize).min(hi), hi)
}

/// `acc[ox] = f(acc[ox], row[ox * S + o])` for `ox` in `lo..hi` (`S` the stride; 0 means
/// `s`, read at run time).
#[inline(always)]
fn tap_pass<const S: usize>(
    acc: &mut [f32],
    row: &[f32],
    (lo, hi): (usize, usize),
    o: isize,
    s: usize,
    f: impl Fn(f32, f32) -> f32,
) {
    if lo >= hi {
        return;
    }
    let s = if S == 0 { s } else { S };
    let start = (lo * s) as isize + o;
    debug_assert!(start >= 0);
    let src = &row[start as usize..];
    let dst = &mut acc[lo..hi];
    let n = dst.len();
    let src = &src[..(n - 1) * s + 1];
    for (i, a) in dst.iter_mut().enumerate() {
        *a = f(*a, src[i * s]);
    }
}

/// One row pass for any stride, specialized for strides 1 and 2.
#[inline(always)]
fn pass(
    acc: &mut [f32],
    row: &[f32],
    range: (usize, usize),
    o: isize,
    s: usize,
    f: impl Fn(f32, f32) -> f32,
) {
    match s {
        1 => tap_pass::<1>(acc, row, range, o, s, f),
        2 => tap_pass::<2>(acc, row, range, o, s, f),
        _ => tap_pass::<0>(acc, row, range, o, s, f),
    }
}

/// `max(m, v)` with NaN winning and ties keeping `m` (ATen's `val > max || isnan(val)`).
#[inline(always)]
fn max_nan(m: f32, v: f32) -> f32 {
    if v > m || v.is_nan() {
        v
    } else {
        m
    }
}

/// The input rows `iy = oy * sh + ky * dh - pt` of output row `oy` that lie in `0..h`, as
/// `(ky, iy)`.
fn rows_of(g: &PoolGeom, oy: usize) -> impl Iterator<Item = usize> + '_ {
    let (h, _) = g.in_hw;
    (0..g.kernel.0).filter_map(move |ky| {
        let iy = (oy * g.stride.0 + ky * g.dilation.0) as isize - g.pad.0 as isize;
        (iy >= 0 && (iy as usize) < h).then_some(iy as usize)
    })
}

/// Max pooling of `planes` planes (`x`: `planes * h * w` values) into `out`
/// (`planes * oh * ow`); padding never wins.
///
/// # Panics
/// If a slice is shorter than the geometry says.
pub(crate) fn max_pool_nchw(x: &[f32], planes: usize, g: &PoolGeom, out: &mut [f32]) {
    let (h, w) = g.in_hw;
    let (oh, ow) = g.out_hw;
    if oh * ow == 0 {
        return;
    }
    let plain_2x2 = g.kernel == (2, 2) && g.stride == (2, 2) && g.dilation == (1, 1);
    if plain_2x2 && g.pad == (0, 0) && 2 * oh <= h && 2 * ow <= w {
        return max_pool_2x2(x, planes, g, out);
    }
    let (kw, sw, dw, pl) = (g.kernel.1, g.stride.1, g.dilation.1, g.pad.1);
    let taps: Vec<(isize, (usize, usize))> = (0..kw)
        .map(|kx| {
            let o = (kx * dw) as isize - pl as isize;
            (o, col_range(o, sw, w, ow))
        })
        .collect();
    for (p, op) in out.chunks_exact_mut(oh * ow).take(planes).enumerate() {
        let xp = &x[p * h * w..(p + 1) * h * w];
        for (oy, acc) in op.chunks_exact_mut(ow).enumerate() {
            acc.fill(f32::NEG_INFINITY);
            for iy in rows_of(g, oy) {
                let row = &xp[iy * w..(iy + 1) * w];
                for &(o, range) in &taps {
                    pass(acc, row, range, o, sw, max_nan);
                }
            }
        }
    }
}

/// [`max_pool_nchw`] for the common 2x2 window with stride 2 and no padding, every window
/// inside the plane: the four taps of each output in window order, no per-row set-up
/// beyond two row slices (planes of a few pixels are common: a digits CNN's 8x8).
fn max_pool_2x2(x: &[f32], planes: usize, g: &PoolGeom, out: &mut [f32]) {
    let (h, w) = g.in_hw;
    let (oh, ow) = g.out_hw;
    for (p, op) in out.chunks_exact_mut(oh * ow).take(planes).enumerate() {
        let xp = &x[p * h * w..(p + 1) * h * w];
        for (oy, orow) in op.chunks_exact_mut(ow).enumerate() {
            let r0 = &xp[2 * oy * w..2 * oy * w + 2 * ow];
            let r1 = &xp[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * ow];
            for ((o, a), b) in orow
                .iter_mut()
                .zip(r0.chunks_exact(2))
                .zip(r1.chunks_exact(2))
            {
                let m = max_nan(max_nan(f32::NEG_INFINITY, a[0]), a[1]);
                *o = max_nan(max_nan(m, b[0]), b[1]);
            }
        }
    }
}

/// Average pooling (dilation 1) of `planes` planes into `out`: each window clipped to the
/// padded input (`min(start + k, size + pad_end)`), summed over its input cells in
/// row-major order, then divided by `div`.
///
/// # Panics
/// If a slice is shorter than the geometry says.
pub(crate) fn avg_pool_nchw(
    x: &[f32],
    planes: usize,
    g: &PoolGeom,
    div: AvgDivisor,
    out: &mut [f32],
) {
    let (h, w) = g.in_hw;
    let (oh, ow) = g.out_hw;
    if oh * ow == 0 {
        return;
    }
    let (kw, sw, pl) = (g.kernel.1, g.stride.1, g.pad.1);
    let taps: Vec<(isize, (usize, usize))> = (0..kw)
        .map(|kx| {
            let o = kx as isize - pl as isize;
            (o, col_range(o, sw, w, ow))
        })
        .collect();
    // Divisor per output row and column: (clipped-to-padded extent, input extent).
    let extent = |o: usize, k: usize, s: usize, p: usize, pe: usize, n: usize| {
        let st = (o * s) as isize - p as isize;
        let en = (st + k as isize).min((n + pe) as isize);
        let with_pad = (en - st).max(0) as usize;
        let real = (en.min(n as isize) - st.max(0)).max(0) as usize;
        (with_pad, real)
    };
    let col_div: Vec<(usize, usize)> = (0..ow)
        .map(|ox| extent(ox, kw, sw, pl, g.pad_end.1, w))
        .collect();
    let mut divs = vec![0f32; ow];
    for oy in 0..oh {
        let (ry, ry_real) = extent(oy, g.kernel.0, g.stride.0, g.pad.0, g.pad_end.0, h);
        for (d, &(cx, cx_real)) in divs.iter_mut().zip(&col_div) {
            *d = match div {
                AvgDivisor::Fixed(v) => v as f32,
                AvgDivisor::IncludePad => (ry * cx) as f32,
                AvgDivisor::ExcludePad => (ry_real * cx_real) as f32,
            };
        }
        for p in 0..planes {
            let xp = &x[p * h * w..(p + 1) * h * w];
            let acc = &mut out[(p * oh + oy) * ow..(p * oh + oy + 1) * ow];
            acc.fill(0.0);
            for iy in rows_of(g, oy) {
                let row = &xp[iy * w..(iy + 1) * w];
                for &(o, range) in &taps {
                    pass(acc, row, range, o, sw, |a, v| a + v);
                }
            }
            for (a, &d) in acc.iter_mut().zip(&divs) {
                *a /= d;
            }
        }
    }
}

/// Lanes of [`sum_lanes`]' partial sums.
const L: usize = 16;

/// Sum of `v` in 16 interleaved partial sums, reduced pairwise (vectorizes without
/// reassociation flags; a cascade like ATen's `mean`, not a sequential fold).
fn sum_lanes(v: &[f32]) -> f32 {
    let (chunks, tail) = v.as_chunks::<L>();
    let mut acc = [0f32; L];
    for c in chunks {
        for i in 0..L {
            acc[i] += c[i];
        }
    }
    let mut width = L;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    tail.iter().fold(acc[0], |s, &t| s + t)
}

/// Adaptive average pooling (`torch.nn.AdaptiveAvgPool2d`) of `planes` planes of `(h, w)`
/// to `(oh, ow)`: cell `i` averages input indices `floor(i * in / out) .. ceil((i + 1) * in
/// / out)`. A `1 x 1` output sums the plane in 16 partial sums (as ATen reduces it to a
/// `mean`); other sizes sum each window row-major.
///
/// # Panics
/// If a slice is shorter than the shapes say.
pub(crate) fn adaptive_avg_nchw(
    x: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    out: &mut [f32],
) {
    if oh * ow == 0 {
        return;
    }
    if (oh, ow) == (1, 1) {
        let n = (h * w).max(1) as f32;
        for (p, o) in out.iter_mut().take(planes).enumerate() {
            *o = sum_lanes(&x[p * h * w..(p + 1) * h * w]) / n;
        }
        return;
    }
    let win = |i: usize, n: usize, o: usize| (i * n / o, ((i + 1) * n).div_ceil(o));
    let rows: Vec<(usize, usize)> = (0..oh).map(|oy| win(oy, h, oh)).collect();
    let cols: Vec<(usize, usize)> = (0..ow).map(|ox| win(ox, w, ow)).collect();
    for p in 0..planes {
        let xp = &x[p * h * w..(p + 1) * h * w];
        for (oy, &(y0, y1)) in rows.iter().enumerate() {
            for (ox, &(x0, x1)) in cols.iter().enumerate() {
                let mut s = 0f32;
                for iy in y0..y1 {
                    for &v in &xp[iy * w + x0..iy * w + x1] {
                        s += v;
                    }
                }
                let cnt = ((y1 - y0) * (x1 - x0)).max(1) as f32;
                out[(p * oh + oy) * ow + ox] = s / cnt;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 20) as f32 / 2048.0 - 1.0
            })
            .collect()
    }

    /// Output size of PyTorch's floor-mode pool.
    fn out_len(n: usize, k: usize, s: usize, p: usize, pe: usize, d: usize) -> usize {
        (n + p + pe - d * (k - 1) - 1) / s + 1
    }

    /// The direct loops these kernels replace.
    fn naive(x: &[f32], planes: usize, g: &PoolGeom, max: bool, div: AvgDivisor) -> Vec<f32> {
        let (h, w) = g.in_hw;
        let (oh, ow) = g.out_hw;
        let mut out = vec![0f32; planes * oh * ow];
        for p in 0..planes {
            for oy in 0..oh {
                for ox in 0..ow {
                    let hs = (oy * g.stride.0) as isize - g.pad.0 as isize;
                    let ws = (ox * g.stride.1) as isize - g.pad.1 as isize;
                    let mut acc = if max { f32::NEG_INFINITY } else { 0.0 };
                    let mut cnt = 0usize;
                    for ky in 0..g.kernel.0 {
                        for kx in 0..g.kernel.1 {
                            let iy = hs + (ky * g.dilation.0) as isize;
                            let ix = ws + (kx * g.dilation.1) as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let v = x[p * h * w + iy as usize * w + ix as usize];
                            cnt += 1;
                            acc = if max { max_nan(acc, v) } else { acc + v };
                        }
                    }
                    let he = (hs + g.kernel.0 as isize).min((h + g.pad_end.0) as isize);
                    let we = (ws + g.kernel.1 as isize).min((w + g.pad_end.1) as isize);
                    let d = match div {
                        AvgDivisor::Fixed(d) => d as f32,
                        AvgDivisor::IncludePad => ((he - hs) * (we - ws)) as f32,
                        AvgDivisor::ExcludePad => cnt as f32,
                    };
                    out[(p * oh + oy) * ow + ox] = if max { acc } else { acc / d };
                }
            }
        }
        out
    }

    #[test]
    fn pools_match_direct_loops_bit_for_bit() {
        // (in, kernel, stride, pad, pad_end, dilation)
        for &(hw, k, s, p, pe, d) in &[
            (
                (8usize, 8usize),
                (2usize, 2usize),
                (2usize, 2usize),
                (0, 0),
                (0, 0),
                (1, 1),
            ),
            ((7, 9), (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),
            ((9, 11), (3, 2), (1, 3), (1, 1), (0, 1), (1, 1)),
            ((12, 40), (3, 3), (1, 1), (1, 1), (1, 1), (2, 2)),
            ((5, 6), (5, 6), (1, 1), (2, 3), (2, 3), (1, 1)),
            ((1, 1), (1, 1), (1, 1), (0, 0), (0, 0), (1, 1)),
            ((6, 33), (4, 4), (3, 3), (2, 2), (1, 0), (1, 1)),
            ((9, 7), (2, 2), (2, 2), (0, 0), (0, 0), (1, 1)),
            ((5, 5), (2, 2), (2, 2), (0, 0), (1, 1), (1, 1)),
        ] {
            let g = PoolGeom {
                in_hw: hw,
                out_hw: (
                    out_len(hw.0, k.0, s.0, p.0, pe.0, d.0),
                    out_len(hw.1, k.1, s.1, p.1, pe.1, d.1),
                ),
                kernel: k,
                stride: s,
                pad: p,
                pad_end: pe,
                dilation: d,
            };
            let planes = 3;
            let mut x = vals(planes * hw.0 * hw.1, 5);
            x[hw.1 + 1] = f32::NAN;
            let n_out = planes * g.out_hw.0 * g.out_hw.1;
            let mut got = vec![1234.0f32; n_out];
            max_pool_nchw(&x, planes, &g, &mut got);
            let want = naive(&x, planes, &g, true, AvgDivisor::IncludePad);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "{g:?}"
                );
            }
            if d == (1, 1) {
                for div in [
                    AvgDivisor::IncludePad,
                    AvgDivisor::ExcludePad,
                    AvgDivisor::Fixed(3),
                ] {
                    let x = vals(planes * hw.0 * hw.1, 9);
                    let mut got = vec![1234.0f32; n_out];
                    avg_pool_nchw(&x, planes, &g, div, &mut got);
                    let want = naive(&x, planes, &g, false, div);
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{g:?} {div:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn adaptive_average_matches_float64_windows() {
        for &(hw, o) in &[
            ((8usize, 8usize), (2usize, 2usize)),
            ((7, 5), (3, 2)),
            ((5, 5), (1, 1)),
            ((13, 17), (1, 1)),
            ((4, 4), (4, 4)),
            ((3, 2), (5, 4)),
        ] {
            let planes = 2;
            let x = vals(planes * hw.0 * hw.1, 3);
            let mut got = vec![0f32; planes * o.0 * o.1];
            adaptive_avg_nchw(&x, planes, hw, o, &mut got);
            for p in 0..planes {
                for oy in 0..o.0 {
                    for ox in 0..o.1 {
                        let (y0, y1) = (oy * hw.0 / o.0, ((oy + 1) * hw.0).div_ceil(o.0));
                        let (x0, x1) = (ox * hw.1 / o.1, ((ox + 1) * hw.1).div_ceil(o.1));
                        let mut s = 0f64;
                        for iy in y0..y1 {
                            for ix in x0..x1 {
                                s += x[(p * hw.0 + iy) * hw.1 + ix] as f64;
                            }
                        }
                        let want = s / ((y1 - y0) * (x1 - x0)) as f64;
                        let v = got[(p * o.0 + oy) * o.1 + ox] as f64;
                        assert!((v - want).abs() <= 1e-6 * (1.0 + want.abs()), "{v} {want}");
                    }
                }
            }
        }
    }
}
