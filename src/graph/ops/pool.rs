//! Max, average and adaptive average pooling on `[N, C, H, W]` with PyTorch's window,
//! output-size and divisor rules.

use ndarray::{Array4, ArrayD, Ix4};

use crate::error::{QuantError, Result};
use crate::graph::op::Pool2dSpec;
use crate::graph::shape::pool2d_out;

fn as4<'a>(x: &'a ArrayD<f32>, what: &str) -> Result<ndarray::ArrayView4<'a, f32>> {
    x.view()
        .into_dimensionality::<Ix4>()
        .map_err(|_| QuantError::ShapeMismatch {
            context: what.into(),
            expected: "[N, C, H, W]".into(),
            actual: format!("input of shape {:?}", x.shape()),
        })
}

/// `torch.nn.functional.max_pool2d`: padding never wins, NaN wins (as ATen's
/// `val > max || isnan(val)`), `ceil_mode` as PyTorch.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] for a non-4-D or too small input;
/// [`QuantError::UnsupportedConfig`] for an invalid spec.
pub fn max_pool2d(x: &ArrayD<f32>, spec: &Pool2dSpec) -> Result<ArrayD<f32>> {
    let x4 = as4(x, "MaxPool2d")?;
    let (n, c, h, w) = x4.dim();
    let (oh, ow) = pool2d_out(spec, h, w, true).map_err(|e| e.in_context("MaxPool2d"))?;
    let (kh, kw) = spec.kernel;
    let (sh, sw) = spec.stride;
    let (dh, dw) = spec.dilation;
    let (pt, pl, _, _) = spec.padding;
    let mut out = Array4::<f32>::zeros((n, c, oh, ow));
    for ((b, ci, oy, ox), v) in out.indexed_iter_mut() {
        let mut m = f32::NEG_INFINITY;
        for ky in 0..kh {
            let iy = (oy * sh + ky * dh) as isize - pt as isize;
            if iy < 0 || iy as usize >= h {
                continue;
            }
            for kx in 0..kw {
                let ix = (ox * sw + kx * dw) as isize - pl as isize;
                if ix < 0 || ix as usize >= w {
                    continue;
                }
                let xv = x4[[b, ci, iy as usize, ix as usize]];
                if xv > m || xv.is_nan() {
                    m = xv;
                }
            }
        }
        *v = m;
    }
    Ok(out.into_dyn())
}

/// `torch.nn.functional.avg_pool2d`: the window is clipped to the padded input
/// (`min(start + k, size + pad)`); the divisor is `divisor_override`, else the clipped
/// window's size with padding (`count_include_pad`), else the number of real input cells.
///
/// # Errors
/// As [`max_pool2d`].
pub fn avg_pool2d(x: &ArrayD<f32>, spec: &Pool2dSpec) -> Result<ArrayD<f32>> {
    let x4 = as4(x, "AvgPool2d")?;
    let (n, c, h, w) = x4.dim();
    let (oh, ow) = pool2d_out(spec, h, w, false).map_err(|e| e.in_context("AvgPool2d"))?;
    let (kh, kw) = spec.kernel;
    let (sh, sw) = spec.stride;
    let (pt, pl, pb, pr) = spec.padding;
    let mut out = Array4::<f32>::zeros((n, c, oh, ow));
    for ((b, ci, oy, ox), v) in out.indexed_iter_mut() {
        let hs = (oy * sh) as isize - pt as isize;
        let ws = (ox * sw) as isize - pl as isize;
        let he = (hs + kh as isize).min((h + pb) as isize);
        let we = (ws + kw as isize).min((w + pr) as isize);
        let pool_size = (he - hs) * (we - ws);
        let (hs, ws) = (hs.max(0), ws.max(0));
        let (he, we) = (he.min(h as isize), we.min(w as isize));
        let mut acc = 0.0f32;
        for iy in hs..he {
            for ix in ws..we {
                acc += x4[[b, ci, iy as usize, ix as usize]];
            }
        }
        let div = match spec.divisor_override {
            Some(d) => d as isize,
            None if spec.count_include_pad => pool_size,
            None => (he - hs).max(0) * (we - ws).max(0),
        };
        *v = acc / div as f32;
    }
    Ok(out.into_dyn())
}

/// `torch.nn.functional.adaptive_avg_pool2d`: output cell `i` averages input indices
/// `floor(i * in / out) .. ceil((i + 1) * in / out)`.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] for a non-4-D input; [`QuantError::UnsupportedConfig`]
/// for a zero output size.
pub fn adaptive_avg_pool2d(x: &ArrayD<f32>, out: (usize, usize)) -> Result<ArrayD<f32>> {
    crate::nn::adaptive_avg_pool2d(x, out)
}
