//! Int8 pooling kernels on channels-last (`NHWC`) bytes, on a [`KernelSet`]: max pooling
//! and average pooling with PyTorch's quantized arithmetic. The channels of one pixel are
//! contiguous, so every window step is a vector operation across channels (`pmaxub`, or
//! widening adds into `i32` sums); the SIMD sets compile the same bodies with AVX2
//! enabled (32 bytes per step).
//!
//! Average pooling, per output element (PyTorch `qavg_pool2d`): `size` valid inputs of the
//! window, `div = count_include_pad ? window area clipped to the padded input : size`,
//! `m = (1 / div) as f32`, `acc = (sum - size * zp) as f32`; channels-last kernel:
//! `clamp(cvtps2dq(acc * m) + zp, 0, 255)`, contiguous kernel:
//! `clamp(cvtps2dq(acc * m + zp), 0, 255)`.

use super::requant::cvt_round;
use super::KernelSet;

/// Geometry of a 2-D pooling window over an NHWC tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolGeom {
    /// Batch size.
    pub batch: usize,
    /// Channels.
    pub channels: usize,
    /// Input height and width.
    pub in_hw: (usize, usize),
    /// Output height and width (the caller computes them, `ceil_mode` included).
    pub out_hw: (usize, usize),
    /// Window height and width.
    pub kernel: (usize, usize),
    /// Stride (height, width).
    pub stride: (usize, usize),
    /// Padding (height, width).
    pub padding: (usize, usize),
    /// Dilation (height, width); average pooling takes 1.
    pub dilation: (usize, usize),
}

impl PoolGeom {
    fn check(&self, x: &[u8], out: &[u8]) {
        let (h, w) = self.in_hw;
        let (oh, ow) = self.out_hw;
        let c = self.channels;
        assert_eq!(x.len(), self.batch * h * w * c, "pool input size");
        assert_eq!(out.len(), self.batch * oh * ow * c, "pool output size");
    }

    /// Input index along one axis of output `o` at window tap `k`, or `None` in padding.
    #[inline(always)]
    fn at(o: usize, k: usize, s: usize, d: usize, p: usize, n: usize) -> Option<usize> {
        let i = (o * s + k * d).checked_sub(p)?;
        (i < n).then_some(i)
    }
}

/// Max pooling of NHWC `x` into NHWC `out` (padding never wins: PyTorch pads with
/// `-inf`); a window wholly in the padding gives 0.
///
/// # Panics
/// When `x` or `out` does not match `g`.
///
/// # Examples
/// ```
/// use ptq::kernels::pool::{max_pool_nhwc, PoolGeom};
/// use ptq::kernels::KernelSet;
/// let g = PoolGeom { batch: 1, channels: 2, in_hw: (2, 2), out_hw: (1, 1), kernel: (2, 2),
///     stride: (2, 2), padding: (0, 0), dilation: (1, 1) };
/// let mut y = [0u8; 2];
/// max_pool_nhwc(KernelSet::best(), &[1, 9, 2, 8, 3, 7, 4, 6], &g, &mut y);
/// assert_eq!(y, [4, 9]);
/// ```
pub fn max_pool_nhwc(ks: KernelSet, x: &[u8], g: &PoolGeom, out: &mut [u8]) {
    g.check(x, out);
    match ks.simd {
        #[cfg(target_arch = "x86_64")]
        Some(s) => s.max_pool_nhwc(x, g, out),
        _ => max_pool_body(x, g, out),
    }
}

/// Average pooling of NHWC `x` (zero point `zp`) into NHWC `out` with PyTorch's
/// arithmetic (see the module documentation); `channels_last_rounding` picks the
/// channels-last kernel's rounding, else the contiguous one's.
///
/// # Panics
/// When `x` or `out` does not match `g`.
///
/// # Examples
/// ```
/// use ptq::kernels::pool::{avg_pool_nhwc, PoolGeom};
/// use ptq::kernels::KernelSet;
/// let g = PoolGeom { batch: 1, channels: 1, in_hw: (2, 2), out_hw: (1, 1), kernel: (2, 2),
///     stride: (2, 2), padding: (0, 0), dilation: (1, 1) };
/// let mut y = [0u8; 1];
/// avg_pool_nhwc(KernelSet::best(), &[1, 2, 3, 5], 0, &g, true, true, &mut y);
/// assert_eq!(y, [3]); // 2.75
/// ```
pub fn avg_pool_nhwc(
    ks: KernelSet,
    x: &[u8],
    zp: i32,
    g: &PoolGeom,
    count_include_pad: bool,
    channels_last_rounding: bool,
    out: &mut [u8],
) {
    g.check(x, out);
    let p = AvgParams {
        zp,
        count_include_pad,
        channels_last_rounding,
    };
    match ks.simd {
        #[cfg(target_arch = "x86_64")]
        Some(s) => s.avg_pool_nhwc(x, g, &p, out),
        _ => avg_pool_body(x, g, &p, out),
    }
}

/// The scalar settings of [`avg_pool_nhwc`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct AvgParams {
    zp: i32,
    count_include_pad: bool,
    channels_last_rounding: bool,
}

/// The max pooling loops (compiled once plainly and once with AVX2 enabled).
#[inline(always)]
pub(crate) fn max_pool_body(x: &[u8], g: &PoolGeom, out: &mut [u8]) {
    let (h, w) = g.in_hw;
    let (oh, ow) = g.out_hw;
    let c = g.channels;
    if c == 0 {
        return;
    }
    for (bi, yb) in out.chunks_exact_mut(oh * ow * c).enumerate() {
        let xb = &x[bi * h * w * c..(bi + 1) * h * w * c];
        for oy in 0..oh {
            for ox in 0..ow {
                let o = &mut yb[(oy * ow + ox) * c..][..c];
                o.fill(0);
                for ky in 0..g.kernel.0 {
                    let Some(iy) = PoolGeom::at(oy, ky, g.stride.0, g.dilation.0, g.padding.0, h)
                    else {
                        continue;
                    };
                    for kx in 0..g.kernel.1 {
                        let ix = PoolGeom::at(ox, kx, g.stride.1, g.dilation.1, g.padding.1, w);
                        if let Some(ix) = ix {
                            let s = &xb[(iy * w + ix) * c..][..c];
                            for (v, &q) in o.iter_mut().zip(s) {
                                *v = (*v).max(q);
                            }
                        }
                    }
                }
            }
        }
    }
}

thread_local! {
    static SUMS: std::cell::RefCell<Vec<i32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The average pooling loops (compiled once plainly and once with AVX2 enabled). Sums
/// are `i32`: a window of at most `2^23` bytes of 255 fits; larger windows are summed in
/// `i64` per element.
#[inline(always)]
pub(crate) fn avg_pool_body(x: &[u8], g: &PoolGeom, p: &AvgParams, out: &mut [u8]) {
    let (h, w) = g.in_hw;
    let (oh, ow) = g.out_hw;
    let (kh, kw) = g.kernel;
    let (sh, sw) = g.stride;
    let (ph, pw) = g.padding;
    let c = g.channels;
    if c == 0 {
        return;
    }
    let zp = p.zp as i64;
    let mut sums = SUMS.with(|s| s.take());
    sums.resize(c, 0);
    for (bi, yb) in out.chunks_exact_mut(oh * ow * c).enumerate() {
        let xb = &x[bi * h * w * c..(bi + 1) * h * w * c];
        for oy in 0..oh {
            let hs = (oy * sh) as isize - ph as isize;
            let he = (hs + kh as isize).min((h + ph) as isize);
            let (h0, h1) = (hs.max(0) as usize, he.min(h as isize).max(0) as usize);
            for ox in 0..ow {
                let ws = (ox * sw) as isize - pw as isize;
                let we = (ws + kw as isize).min((w + pw) as isize);
                let (w0, w1) = (ws.max(0) as usize, we.min(w as isize).max(0) as usize);
                let pool = (he - hs) as i64 * (we - ws) as i64;
                let size = h1.saturating_sub(h0) as i64 * w1.saturating_sub(w0) as i64;
                let div = if p.count_include_pad { pool } else { size };
                let mult = (1.0f64 / div.max(1) as f64) as f32;
                let o = &mut yb[(oy * ow + ox) * c..][..c];
                let narrow = size <= 1 << 23;
                let finish = |o: &mut u8, s: i64| {
                    let acc = (s - size * zp) as f32;
                    let v = if p.channels_last_rounding {
                        cvt_round(acc * mult) as i64 + zp
                    } else {
                        cvt_round(acc * mult + zp as f32) as i64
                    };
                    *o = v.clamp(0, 255) as u8;
                };
                if narrow {
                    sums.fill(0);
                    for iy in h0..h1 {
                        for ix in w0..w1 {
                            let s = &xb[(iy * w + ix) * c..][..c];
                            for (a, &q) in sums.iter_mut().zip(s) {
                                *a += q as i32;
                            }
                        }
                    }
                    for (v, &s) in o.iter_mut().zip(sums.iter()) {
                        finish(v, s as i64);
                    }
                } else {
                    for (ch, v) in o.iter_mut().enumerate() {
                        let mut s = 0i64;
                        for iy in h0..h1 {
                            for ix in w0..w1 {
                                s += xb[(iy * w + ix) * c + ch] as i64;
                            }
                        }
                        finish(v, s);
                    }
                }
            }
        }
    }
    SUMS.with(|s| s.replace(sums));
}
