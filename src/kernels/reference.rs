//! The scalar oracle: plain loops over the unpacked operands, no blocking, no `unsafe`.
//!
//! Every kernel in [`crate::kernels`] must agree with these functions bit for bit.

use crate::kernels::requant::RequantParams;

/// `out[i][j] = requantize(sum_k (a[i][k] - a_zp) * (w[j][k] - w_zp[j]), j)` with `a`
/// row-major `m x k`, `w` row-major `n x k` (PyTorch's `[out, in]`), `w_zp` of length 1 or
/// `n`, `out` row-major with leading dimension `ldc`. Sums are exact (`i64`) and then
/// wrapped to `i32`, as the kernels' wrapping `i32` arithmetic computes them.
///
/// # Panics
/// On slices too short for the given shapes (it is a test oracle).
#[allow(clippy::too_many_arguments)]
pub fn qgemm_naive(
    a: &[u8],
    m: usize,
    k: usize,
    a_zp: i32,
    w: &[i8],
    w_zp: &[i32],
    rq: &RequantParams,
    out: &mut [u8],
    ldc: usize,
) {
    let n = rq.n();
    for i in 0..m {
        for j in 0..n {
            let zp = if w_zp.len() == 1 { w_zp[0] } else { w_zp[j] } as i64;
            let mut acc = 0i64;
            for kk in 0..k {
                acc += (a[i * k + kk] as i64 - a_zp as i64) * (w[j * k + kk] as i64 - zp);
            }
            out[i * ldc + j] = rq.requantize(acc as i32, j);
        }
    }
}

/// Raw `i32` products `sum_k a[i][k] * w[j][k]` without zero points (row-major `m x n`).
///
/// # Panics
/// On slices too short for the given shapes.
pub fn gemm_i32_naive(a: &[u8], m: usize, k: usize, w: &[i8], n: usize) -> Vec<i32> {
    let mut c = vec![0i32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0i64;
            for kk in 0..k {
                acc += a[i * k + kk] as i64 * w[j * k + kk] as i64;
            }
            c[i * n + j] = acc as i32;
        }
    }
    c
}

pub use crate::kernels::conv::ConvGeom;

/// Direct quantized convolution, NCHW in and out: the oracle for `QConv2d`.
///
/// # Panics
/// On inconsistent shapes.
pub fn qconv2d_naive(
    x: &[u8],
    g: &ConvGeom,
    a_zp: i32,
    w: &[i8],
    w_zp: &[i32],
    rq: &RequantParams,
) -> Vec<u8> {
    let (oh, ow) = g.out_hw().expect("kernel does not fit");
    let (h, wd) = g.in_hw;
    let (kh, kw) = g.kernel;
    let cig = g.c_in / g.groups;
    let cog = g.c_out / g.groups;
    let mut out = vec![0u8; g.batch * g.c_out * oh * ow];
    for b in 0..g.batch {
        for oc in 0..g.c_out {
            let grp = oc / cog;
            let zp = if w_zp.len() == 1 { w_zp[0] } else { w_zp[oc] } as i64;
            for y in 0..oh {
                for xo in 0..ow {
                    let mut acc = 0i64;
                    for ci in 0..cig {
                        let c = grp * cig + ci;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (y * g.stride.0 + ky * g.dilation.0) as isize
                                    - g.padding.0 as isize;
                                let ix = (xo * g.stride.1 + kx * g.dilation.1) as isize
                                    - g.padding.1 as isize;
                                let v = if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize
                                {
                                    a_zp as i64
                                } else {
                                    x[((b * g.c_in + c) * h + iy as usize) * wd + ix as usize]
                                        as i64
                                };
                                let wv = w[((oc * cig + ci) * kh + ky) * kw + kx] as i64;
                                acc += (v - a_zp as i64) * (wv - zp);
                            }
                        }
                    }
                    out[((b * g.c_out + oc) * oh + y) * ow + xo] = rq.requantize(acc as i32, oc);
                }
            }
        }
    }
    out
}
