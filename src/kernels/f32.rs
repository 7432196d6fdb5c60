//! `f32` kernels for the float layers (`nn::Conv2d`, `nn::Linear`), used by calibration
//! and float islands: a direct depthwise convolution, a slice-based im2col, and a
//! matrix-vector product for the few-row `Linear` (where a packed GEMM spends its time
//! packing). Larger products stay with `matrixmultiply` (through ndarray), which already
//! selects AVX2 + FMA at run time.
//!
//! Summation orders differ from PyTorch's (as any two float libraries do); results agree
//! to float rounding (the float parity tests allow 1e-5 relative).

use rayon::prelude::*;

/// Geometry of a float convolution on NCHW data.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    /// Input `(h, w)`.
    pub in_hw: (usize, usize),
    /// Output `(h, w)`.
    pub out_hw: (usize, usize),
    /// Kernel `(h, w)`.
    pub kernel: (usize, usize),
    /// Stride `(h, w)`.
    pub stride: (usize, usize),
    /// Zero padding `(h, w)`.
    pub padding: (usize, usize),
    /// Dilation `(h, w)`.
    pub dilation: (usize, usize),
}

impl Geom {
    /// Output columns `lo..hi` whose input column at kernel column `kx` lies inside the
    /// input, and the input column of output column `lo`.
    #[inline]
    fn ox_range(&self, kx: usize) -> (usize, usize, usize) {
        let (sw, pw, dw) = (self.stride.1, self.padding.1, self.dilation.1);
        let w = self.in_hw.1;
        let off = kx * dw; // ix = ox * sw + off - pw
                           // First ox with ox * sw + off >= pw.
        let lo = if off >= pw {
            0
        } else {
            (pw - off).div_ceil(sw)
        };
        // Last ox with ox * sw + off - pw < w, i.e. ox * sw < w + pw - off.
        let hi = if w + pw <= off {
            0
        } else {
            (w + pw - off).div_ceil(sw).min(self.out_hw.1)
        };
        let lo = lo.min(hi);
        (lo, hi, (lo * sw + off).saturating_sub(pw))
    }

    /// Input row of output row `oy` at kernel row `ky`, or `None` in the padding.
    #[inline]
    fn iy(&self, oy: usize, ky: usize) -> Option<usize> {
        let iy = (oy * self.stride.0 + ky * self.dilation.0).checked_sub(self.padding.0)?;
        (iy < self.in_hw.0).then_some(iy)
    }
}

/// `out[ox] += wv * x[ix0 + (ox - lo) * sw]` for `ox` in `lo..hi`.
#[inline(always)]
fn axpy_strided(out: &mut [f32], x: &[f32], wv: f32, ix0: usize, sw: usize) {
    let len = out.len();
    if sw == 1 {
        for (o, &xv) in out.iter_mut().zip(&x[ix0..ix0 + len]) {
            *o += wv * xv;
        }
    } else {
        for (i, o) in out.iter_mut().enumerate() {
            *o += wv * x[ix0 + i * sw];
        }
    }
}

/// One output plane of a depthwise convolution: its input plane, its kernel, its bias.
pub(crate) struct DwPlane<'a> {
    x: &'a [f32],
    wk: &'a [f32],
    bias: f32,
    ranges: &'a [(usize, usize, usize)],
    g: &'a Geom,
}

/// Computes one depthwise output plane (`ho * wo` values) into `o`.
#[inline(always)]
pub(crate) fn dw_plane(p: &DwPlane<'_>, o: &mut [f32]) {
    let g = p.g;
    let w = g.in_hw.1;
    let (ho, wo) = g.out_hw;
    let (kh, kw) = g.kernel;
    o.fill(p.bias);
    for oy in 0..ho {
        let orow = &mut o[oy * wo..(oy + 1) * wo];
        for ky in 0..kh {
            let Some(iy) = g.iy(oy, ky) else { continue };
            let xrow = &p.x[iy * w..(iy + 1) * w];
            for (kx, &(lo, hi, ix0)) in p.ranges.iter().enumerate() {
                if lo < hi {
                    axpy_strided(&mut orow[lo..hi], xrow, p.wk[ky * kw + kx], ix0, g.stride.1);
                }
            }
        }
    }
}

/// Depthwise convolution (groups == input channels, `mult` outputs per input channel) on
/// NCHW: `x` is `[n, c, h, w]`, `weight` `[c * mult, 1, kh, kw]`, `out` `[n, c * mult, ho,
/// wo]` (overwritten; the bias added).
pub(crate) fn depthwise_nchw(
    x: &[f32],
    (n, c): (usize, usize),
    weight: &[f32],
    mult: usize,
    bias: Option<&[f32]>,
    g: &Geom,
    out: &mut [f32],
) {
    let (h, w) = g.in_hw;
    let (ho, wo) = g.out_hw;
    let (kh, kw) = g.kernel;
    let oc = c * mult;
    let plane_out = ho * wo;
    if plane_out == 0 || n * oc == 0 {
        return;
    }
    let ranges: Vec<(usize, usize, usize)> = (0..kw).map(|kx| g.ox_range(kx)).collect();
    let simd = super::KernelSet::current().simd;
    let one = |(p, o): (usize, &mut [f32])| {
        let (b, och) = (p / oc, p % oc);
        let ci = och / mult;
        let plane = DwPlane {
            x: &x[(b * c + ci) * h * w..(b * c + ci + 1) * h * w],
            wk: &weight[och * kh * kw..(och + 1) * kh * kw],
            bias: bias.map_or(0.0, |bv| bv[och]),
            ranges: &ranges,
            g,
        };
        match simd {
            #[cfg(target_arch = "x86_64")]
            Some(s) => s.dw_plane_f32(&plane, o),
            _ => dw_plane(&plane, o),
        }
    };
    if n * oc * plane_out * kh * kw >= 1 << 18 {
        out.par_chunks_mut(plane_out).enumerate().for_each(one);
    } else {
        out.chunks_mut(plane_out).enumerate().for_each(one);
    }
}

/// Unfolds one image's group of channels (`x`: `[cg, h, w]`) into `cols`
/// `[cg * kh * kw, ho * wo]` (row-major); taps in the padding read 0.
pub(crate) fn im2col_nchw(x: &[f32], cg: usize, g: &Geom, cols: &mut [f32]) {
    let (h, w) = g.in_hw;
    let (ho, wo) = g.out_hw;
    let (kh, kw) = g.kernel;
    let ranges: Vec<(usize, usize, usize)> = (0..kw).map(|kx| g.ox_range(kx)).collect();
    for ci in 0..cg {
        let xp = &x[ci * h * w..(ci + 1) * h * w];
        for ky in 0..kh {
            for (kx, &(lo, hi, ix0)) in ranges.iter().enumerate() {
                let row = (ci * kh + ky) * kw + kx;
                let dst = &mut cols[row * ho * wo..(row + 1) * ho * wo];
                for oy in 0..ho {
                    let d = &mut dst[oy * wo..(oy + 1) * wo];
                    match g.iy(oy, ky) {
                        Some(iy) if lo < hi => {
                            d[..lo].fill(0.0);
                            d[hi..].fill(0.0);
                            let xrow = &xp[iy * w..(iy + 1) * w];
                            let span = &mut d[lo..hi];
                            if g.stride.1 == 1 {
                                span.copy_from_slice(&xrow[ix0..ix0 + span.len()]);
                            } else {
                                for (i, v) in span.iter_mut().enumerate() {
                                    *v = xrow[ix0 + i * g.stride.1];
                                }
                            }
                        }
                        _ => d.fill(0.0),
                    }
                }
            }
        }
    }
}

/// Dot product with 16 independent partial sums (vectorizes without reassociation
/// flags).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0.0;
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    // Pairwise reduction of the partial sums.
    let mut width = L;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0] + s
}

#[inline(always)]
fn gemv_body(x: &[f32], rows: usize, k: usize, w: &[f32], out: &mut [f32]) {
    let n = w.len() / k.max(1);
    for r in 0..rows {
        let xr = &x[r * k..(r + 1) * k];
        for (j, o) in out[r * n..(r + 1) * n].iter_mut().enumerate() {
            *o = dot(xr, &w[j * k..(j + 1) * k]);
        }
    }
}

/// `out[r][j] = dot(x[r], w[j])` for `x` `[rows, k]` and `w` `[n, k]` (PyTorch's Linear
/// weight layout), output `[rows, n]`; for few rows, where the weight is read once per
/// row anyway. Output columns are split across rayon's pool when large.
pub(crate) fn gemv_rows(x: &[f32], rows: usize, k: usize, w: &[f32], out: &mut [f32]) {
    let Some(n) = w.len().checked_div(k) else {
        out.fill(0.0);
        return;
    };
    const COLS: usize = 64;
    let simd = super::KernelSet::current().simd;
    let run = |x: &[f32], w: &[f32], out: &mut [f32], rows: usize| match simd {
        #[cfg(target_arch = "x86_64")]
        Some(s) => s.gemv_f32(x, rows, k, w, out),
        _ => gemv_body(x, rows, k, w, out),
    };
    if rows == 1 && n * k >= 1 << 18 && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(COLS)
            .zip(w.par_chunks(COLS * k))
            .for_each(|(o, wc)| run(x, wc, o, 1));
    } else {
        run(x, w, out, rows);
    }
}

/// [`gemv_body`] for the x86 module's AVX2 build.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn gemv_generic(x: &[f32], rows: usize, k: usize, w: &[f32], out: &mut [f32]) {
    gemv_body(x, rows, k, w, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_conv(
        x: &[f32],
        (n, c): (usize, usize),
        wt: &[f32],
        o: usize,
        groups: usize,
        g: &Geom,
    ) -> Vec<f32> {
        let (h, w) = g.in_hw;
        let (ho, wo) = g.out_hw;
        let (kh, kw) = g.kernel;
        let (cg, og) = (c / groups, o / groups);
        let mut out = vec![0f32; n * o * ho * wo];
        for b in 0..n {
            for oc in 0..o {
                let gi = oc / og;
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = 0f64;
                        for ci in 0..cg {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * g.stride.0 + ky * g.dilation.0) as isize
                                        - g.padding.0 as isize;
                                    let ix = (ox * g.stride.1 + kx * g.dilation.1) as isize
                                        - g.padding.1 as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv = x[((b * c + gi * cg + ci) * h + iy as usize) * w
                                        + ix as usize];
                                    let wv = wt[((oc * cg + ci) * kh + ky) * kw + kx];
                                    s += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((b * o + oc) * ho + oy) * wo + ox] = s as f32;
                    }
                }
            }
        }
        out
    }

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 20) as f32 / 2048.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn depthwise_and_im2col_match_naive() {
        for &(hw, k, s, p, d, mult) in &[
            (
                (7usize, 9usize),
                (3usize, 3usize),
                (1usize, 1usize),
                (1usize, 1usize),
                (1usize, 1usize),
                1usize,
            ),
            ((8, 8), (3, 3), (2, 2), (1, 1), (1, 1), 1),
            ((5, 5), (3, 1), (1, 2), (0, 1), (1, 1), 2),
            ((1, 1), (1, 1), (1, 1), (2, 2), (1, 1), 1),
            ((9, 6), (5, 3), (2, 3), (2, 3), (1, 2), 1),
        ] {
            let out_len = |i: usize, k: usize, s: usize, p: usize, d: usize| {
                (i + 2 * p - d * (k - 1) - 1) / s + 1
            };
            let g = Geom {
                in_hw: hw,
                out_hw: (
                    out_len(hw.0, k.0, s.0, p.0, d.0),
                    out_len(hw.1, k.1, s.1, p.1, d.1),
                ),
                kernel: k,
                stride: s,
                padding: p,
                dilation: d,
            };
            let (n, c) = (2, 5);
            let x = vals(n * c * hw.0 * hw.1, 1);
            let wt = vals(c * mult * k.0 * k.1, 7);
            let want = naive_conv(&x, (n, c), &wt, c * mult, c, &g);
            for ks in super::super::KernelSet::all_available() {
                let mut got = vec![0f32; want.len()];
                ks.install(|| depthwise_nchw(&x, (n, c), &wt, mult, None, &g, &mut got));
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} {b} {g:?}");
                }
            }
            // im2col of one image times the weight matrix gives the dense conv.
            let o = 3;
            let wd = vals(o * c * k.0 * k.1, 3);
            let want = naive_conv(&x, (n, c), &wd, o, 1, &g);
            let (ho, wo) = g.out_hw;
            let kd = c * k.0 * k.1;
            let mut cols = vec![f32::NAN; kd * ho * wo];
            im2col_nchw(&x[..c * hw.0 * hw.1], c, &g, &mut cols);
            for oc in 0..o {
                for pix in 0..ho * wo {
                    let s: f32 = (0..kd)
                        .map(|r| wd[oc * kd + r] * cols[r * ho * wo + pix])
                        .sum();
                    let b = want[oc * ho * wo + pix];
                    assert!((s - b).abs() <= 1e-5 * (1.0 + b.abs()), "{s} {b}");
                }
            }
        }
    }

    #[test]
    fn gemv_matches_naive_on_every_set() {
        for &(rows, k, n) in &[
            (1usize, 1usize, 1usize),
            (1, 37, 5),
            (3, 100, 70),
            (2, 1024, 65),
        ] {
            let x = vals(rows * k, 5);
            let w = vals(n * k, 9);
            for ks in super::super::KernelSet::all_available() {
                let mut out = vec![0f32; rows * n];
                ks.install(|| gemv_rows(&x, rows, k, &w, &mut out));
                for r in 0..rows {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                            .sum();
                        let got = out[r * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{got} {want}"
                        );
                    }
                }
            }
        }
    }
}
