//! Max, average and adaptive average pooling on `[N, C, H, W]` with PyTorch's window,
//! output-size and divisor rules.

use ndarray::{Array4, ArrayD, Ix4};

use crate::error::{QuantError, Result};
use crate::graph::op::Pool2dSpec;
use crate::graph::shape::pool2d_out;
use crate::kernels::f32_pool::{self, AvgDivisor, PoolGeom};

/// The kernels' geometry of `spec` on an `in_hw` input with an `out_hw` output.
fn geom(spec: &Pool2dSpec, in_hw: (usize, usize), out_hw: (usize, usize)) -> PoolGeom {
    let (pt, pl, pb, pr) = spec.padding;
    PoolGeom {
        in_hw,
        out_hw,
        kernel: spec.kernel,
        stride: spec.stride,
        pad: (pt, pl),
        pad_end: (pb, pr),
        dilation: spec.dilation,
    }
}

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
    let mut out = Array4::<f32>::zeros((n, c, oh, ow));
    let xs = x4.as_standard_layout();
    f32_pool::max_pool_nchw(
        xs.as_slice().expect("standard layout"),
        n * c,
        &geom(spec, (h, w), (oh, ow)),
        out.as_slice_mut().expect("standard layout"),
    );
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
    let mut out = Array4::<f32>::zeros((n, c, oh, ow));
    let div = match spec.divisor_override {
        Some(d) => AvgDivisor::Fixed(d),
        None if spec.count_include_pad => AvgDivisor::IncludePad,
        None => AvgDivisor::ExcludePad,
    };
    let xs = x4.as_standard_layout();
    f32_pool::avg_pool_nchw(
        xs.as_slice().expect("standard layout"),
        n * c,
        &geom(spec, (h, w), (oh, ow)),
        div,
        out.as_slice_mut().expect("standard layout"),
    );
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
