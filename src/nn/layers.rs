//! Float layers with PyTorch's semantics, forward on NCHW `f32` tensors.

use ndarray::{
    linalg::general_mat_mul, Array1, Array2, Array4, ArrayD, ArrayView2, ArrayViewMut2, Axis, Ix4,
    IxDyn,
};

use crate::error::{QuantError, Result};
use crate::kernels::f32 as f32k;

fn shape_err(layer: &str, expected: String, x: &ArrayD<f32>) -> QuantError {
    QuantError::ShapeMismatch {
        context: layer.into(),
        expected,
        actual: format!("input of shape {:?}", x.shape()),
    }
}

/// A 2-D convolution (`torch.nn.Conv2d`): weight `[out, in / groups, kh, kw]`, optional bias
/// `[out]`, stride, zero padding, dilation and groups (depthwise when
/// `groups == in == out`).
#[derive(Debug, Clone, PartialEq)]
pub struct Conv2d {
    /// Weight, `[out_channels, in_channels / groups, kernel_h, kernel_w]`.
    pub weight: Array4<f32>,
    /// Bias, `[out_channels]`.
    pub bias: Option<Array1<f32>>,
    /// Stride `(h, w)`.
    pub stride: (usize, usize),
    /// Zero padding `(top, left)`; also `(bottom, right)` unless `padding_end` is set.
    pub padding: (usize, usize),
    /// Zero padding `(bottom, right)` when it differs from `padding` (ONNX's asymmetric
    /// `pads`, TensorFlow's `SAME`); `None` means symmetric. See
    /// [`Conv2d::with_padding_tlbr`].
    pub padding_end: Option<(usize, usize)>,
    /// Dilation `(h, w)`.
    pub dilation: (usize, usize),
    /// Number of groups.
    pub groups: usize,
}

impl Conv2d {
    /// A convolution with stride 1, no padding, dilation 1, one group.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] if the bias length differs from the weight's output
    /// channels.
    ///
    /// # Examples
    /// ```
    /// use ndarray::{Array1, Array4};
    /// use ptq::nn::Conv2d;
    /// let conv = Conv2d::new(Array4::zeros((8, 3, 3, 3)), Some(Array1::zeros(8)))?
    ///     .with_stride(2, 2)
    ///     .with_padding(1, 1);
    /// assert_eq!(conv.out_channels(), 8);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(weight: Array4<f32>, bias: Option<Array1<f32>>) -> Result<Self> {
        if let Some(b) = &bias {
            if b.len() != weight.shape()[0] {
                return Err(QuantError::ShapeMismatch {
                    context: "Conv2d".into(),
                    expected: format!(
                        "a bias of {} elements (one per output channel)",
                        weight.shape()[0]
                    ),
                    actual: format!("a bias of {} elements", b.len()),
                });
            }
        }
        Ok(Conv2d {
            weight,
            bias,
            stride: (1, 1),
            padding: (0, 0),
            padding_end: None,
            dilation: (1, 1),
            groups: 1,
        })
    }

    /// Sets the stride.
    pub fn with_stride(mut self, h: usize, w: usize) -> Self {
        self.stride = (h, w);
        self
    }
    /// Sets the zero padding.
    pub fn with_padding(mut self, h: usize, w: usize) -> Self {
        self.padding = (h, w);
        self.padding_end = None;
        self
    }

    /// Sets asymmetric zero padding `(top, left, bottom, right)` (ONNX `pads` order is
    /// `(top, left, bottom, right)` too).
    pub fn with_padding_tlbr(
        mut self,
        top: usize,
        left: usize,
        bottom: usize,
        right: usize,
    ) -> Self {
        self.padding = (top, left);
        self.padding_end = ((bottom, right) != (top, left)).then_some((bottom, right));
        self
    }

    /// Padding as `(top, left, bottom, right)`.
    pub fn padding_tlbr(&self) -> (usize, usize, usize, usize) {
        let (b, r) = self.padding_end.unwrap_or(self.padding);
        (self.padding.0, self.padding.1, b, r)
    }
    /// Sets the dilation.
    pub fn with_dilation(mut self, h: usize, w: usize) -> Self {
        self.dilation = (h, w);
        self
    }
    /// Sets the number of groups.
    pub fn with_groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.shape()[0]
    }
    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.weight.shape()[1] * self.groups
    }

    /// Output spatial size for an input of `h x w`, or `None` if the kernel does not fit.
    pub fn output_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let (kh, kw) = (self.weight.shape()[2], self.weight.shape()[3]);
        let (pt, pl, pb, pr) = self.padding_tlbr();
        let span = |n: usize, p: usize, q: usize, d: usize, k: usize, s: usize| {
            let padded = n + p + q;
            let reach = d * (k.checked_sub(1)?) + 1;
            (padded >= reach && s > 0).then(|| (padded - reach) / s + 1)
        };
        Some((
            span(h, pt, pb, self.dilation.0, kh, self.stride.0)?,
            span(w, pl, pr, self.dilation.1, kw, self.stride.1)?,
        ))
    }

    /// Forward pass on `[N, C, H, W]`: im2col per group, then a matrix product.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] if the input is not 4-D with `in_channels` channels or
    /// is smaller than the (dilated) kernel; [`QuantError::UnsupportedConfig`] if the
    /// groups do not divide the channels or a stride / dilation is zero.
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.forward_act(x, false)
    }

    /// [`forward`](Self::forward), then ReLU when `relu` (`ConvReLU2d`), applied while
    /// each output block is still in cache.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub(crate) fn forward_act(&self, x: &ArrayD<f32>, relu: bool) -> Result<ArrayD<f32>> {
        let g = self.groups;
        let (o, cg, kh, kw) = self.weight.dim();
        if g == 0
            || o % g != 0
            || self.dilation.0 == 0
            || self.dilation.1 == 0
            || self.stride.0 == 0
            || self.stride.1 == 0
        {
            return Err(QuantError::UnsupportedConfig {
                context: "Conv2d".into(),
                reason: format!(
                    "groups {g} must divide out_channels {o}; stride and dilation must be positive"
                ),
            });
        }
        let x4 = x
            .view()
            .into_dimensionality::<Ix4>()
            .map_err(|_| shape_err("Conv2d", format!("[N, {}, H, W]", cg * g), x))?;
        let (n, c, h, w) = x4.dim();
        if c != cg * g {
            return Err(shape_err("Conv2d", format!("[N, {}, H, W]", cg * g), x));
        }
        let (ho, wo) = self.output_size(h, w).ok_or_else(|| {
            shape_err(
                "Conv2d",
                format!("spatial size of at least the dilated {kh}x{kw} kernel"),
                x,
            )
        })?;
        let geom = f32k::Geom {
            in_hw: (h, w),
            out_hw: (ho, wo),
            kernel: (kh, kw),
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
        };
        let xs = x4.as_standard_layout();
        let xv = xs.as_slice().expect("standard layout");
        let wstd = self.weight.as_standard_layout();
        let wv = wstd.as_slice().expect("standard layout");
        let bias = self.bias.as_ref().map(|b| b.to_vec());
        let mut out = vec![0f32; n * o * ho * wo];
        f32k::conv_nchw(
            xv,
            (n, c),
            wv,
            (o, g),
            bias.as_deref(),
            relu,
            &geom,
            &mut out,
        );
        Ok(Array4::from_shape_vec((n, o, ho, wo), out)
            .expect("n * o * ho * wo values")
            .into_dyn())
    }
}

/// A fully connected layer (`torch.nn.Linear`): `y = x W^T + b`, weight `[out, in]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// Weight, `[out_features, in_features]`.
    pub weight: Array2<f32>,
    /// Bias, `[out_features]`.
    pub bias: Option<Array1<f32>>,
}

impl Linear {
    /// A linear layer.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] if the bias length differs from `out_features`.
    ///
    /// # Examples
    /// ```
    /// use ndarray::{array, Array2};
    /// use ptq::nn::Linear;
    /// let fc = Linear::new(array![[1.0f32, 2.0], [0.0, -1.0]], Some(array![0.5, 0.0]))?;
    /// let y = fc.forward(&array![[1.0f32, 1.0]].into_dyn())?;
    /// assert_eq!(y, array![[3.5f32, -1.0]].into_dyn());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(weight: Array2<f32>, bias: Option<Array1<f32>>) -> Result<Self> {
        if let Some(b) = &bias {
            if b.len() != weight.nrows() {
                return Err(QuantError::ShapeMismatch {
                    context: "Linear".into(),
                    expected: format!(
                        "a bias of {} elements (one per output feature)",
                        weight.nrows()
                    ),
                    actual: format!("a bias of {} elements", b.len()),
                });
            }
        }
        Ok(Linear { weight, bias })
    }

    /// Forward pass on `[..., in_features]`.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] if the last dimension is not `in_features`.
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.forward_act(x, false)
    }

    /// [`forward`](Self::forward), then ReLU when `relu` (`LinearReLU`), in the same pass
    /// as the bias.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub(crate) fn forward_act(&self, x: &ArrayD<f32>, relu: bool) -> Result<ArrayD<f32>> {
        /// Up to this many rows, a blocked matrix-vector product (the weight read once
        /// per four rows) beats packing the weight for a GEMM.
        const GEMV_ROWS: usize = 8;
        let (out_f, in_f) = self.weight.dim();
        if x.ndim() == 0 || x.shape()[x.ndim() - 1] != in_f {
            return Err(shape_err("Linear", format!("[..., {in_f}]"), x));
        }
        let rows: usize = x.shape()[..x.ndim() - 1].iter().product();
        let xs = x.as_standard_layout();
        let xv = xs.as_slice().expect("standard layout");
        let bias = self.bias.as_ref().map(|b| b.to_vec());
        let mut y;
        if rows <= GEMV_ROWS {
            let wstd = self.weight.as_standard_layout();
            y = vec![0f32; rows * out_f];
            crate::kernels::f32::gemv_rows(
                xv,
                rows,
                in_f,
                wstd.as_slice().expect("standard layout"),
                &mut y,
            );
            if let Some(b) = &bias {
                for row in y.chunks_exact_mut(out_f) {
                    for (v, &bv) in row.iter_mut().zip(b) {
                        *v += bv;
                    }
                }
            }
        } else {
            // The output starts as the bias; the product accumulates onto it (beta = 1).
            y = Vec::with_capacity(rows * out_f);
            for _ in 0..rows {
                match &bias {
                    Some(b) => y.extend_from_slice(b),
                    None => y.extend(std::iter::repeat_n(0.0, out_f)),
                }
            }
            let x2 = ArrayView2::from_shape((rows, in_f), xv).expect("[rows, in_features]");
            let mut dst =
                ArrayViewMut2::from_shape((rows, out_f), &mut y[..]).expect("[rows, out]");
            general_mat_mul(1.0, &x2, &self.weight.t(), 1.0, &mut dst);
        }
        if relu {
            for v in &mut y {
                *v = crate::kernels::f32::relu(*v);
            }
        }
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("ndim > 0") = out_f;
        Ok(ArrayD::from_shape_vec(IxDyn(&shape), y).expect("rows * out_features values"))
    }
}

/// Batch normalization in inference mode (`torch.nn.BatchNorm2d.eval()`):
/// `y = (x - running_mean) / sqrt(running_var + eps) * weight + bias` per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm2d {
    /// Scale (gamma), `[C]`.
    pub weight: Array1<f32>,
    /// Shift (beta), `[C]`.
    pub bias: Array1<f32>,
    /// Running mean, `[C]`.
    pub running_mean: Array1<f32>,
    /// Running variance, `[C]`.
    pub running_var: Array1<f32>,
    /// Added to the variance, PyTorch's default 1e-5.
    pub eps: f32,
}

impl BatchNorm2d {
    /// An identity batch norm over `channels` (weight 1, bias 0, mean 0, var 1).
    pub fn identity(channels: usize) -> Self {
        BatchNorm2d {
            weight: Array1::ones(channels),
            bias: Array1::zeros(channels),
            running_mean: Array1::zeros(channels),
            running_var: Array1::ones(channels),
            eps: 1e-5,
        }
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.weight.len()
    }

    /// Per-channel `(scale, shift)` with `y = x * scale + shift`: `scale = weight /
    /// sqrt(var + eps)` (as PyTorch's `fuse_conv_bn_weights` computes it in `f32`).
    pub fn scale_shift(&self) -> (Array1<f32>, Array1<f32>) {
        let rsqrt = self.running_var.mapv(|v| 1.0 / (v + self.eps).sqrt());
        let scale = &self.weight * &rsqrt;
        let shift = &self.bias - &(&self.running_mean * &rsqrt * &self.weight);
        (scale, shift)
    }

    /// Forward pass on `[N, C, H, W]` (or `[N, C]`).
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] if axis 1 does not have `channels` entries.
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let c = self.channels();
        if x.ndim() < 2 || x.shape()[1] != c {
            return Err(shape_err("BatchNorm2d", format!("[N, {c}, ...]"), x));
        }
        let rsqrt = self.running_var.mapv(|v| 1.0 / (v + self.eps).sqrt());
        let mut y = x.clone();
        for (ci, mut plane) in y.axis_iter_mut(Axis(1)).enumerate() {
            let (m, r, g, b) = (
                self.running_mean[ci],
                rsqrt[ci],
                self.weight[ci],
                self.bias[ci],
            );
            plane.mapv_inplace(|v| (v - m) * r * g + b);
        }
        Ok(y)
    }
}

/// Kind of 2-D pooling window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// Maximum over the window (padding never wins).
    Max,
    /// Average over the window, padding counted as zeros (`count_include_pad=True`).
    Avg,
}

/// Max or average pooling over `kernel` windows (`torch.nn.MaxPool2d` / `AvgPool2d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2d {
    /// Max or average.
    pub kind: PoolKind,
    /// Window `(h, w)`.
    pub kernel: (usize, usize),
    /// Stride `(h, w)`; PyTorch's default is the kernel size.
    pub stride: (usize, usize),
    /// Padding `(h, w)`.
    pub padding: (usize, usize),
}

impl Pool2d {
    /// Pooling with stride equal to the kernel and no padding, as PyTorch's default.
    pub fn new(kind: PoolKind, kh: usize, kw: usize) -> Self {
        Pool2d {
            kind,
            kernel: (kh, kw),
            stride: (kh, kw),
            padding: (0, 0),
        }
    }

    /// Forward pass on `[N, C, H, W]`.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for a non-4-D input or one smaller than the window;
    /// [`QuantError::UnsupportedConfig`] for a zero kernel or stride, or padding larger
    /// than half the kernel (PyTorch refuses it too).
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let name = match self.kind {
            PoolKind::Max => "MaxPool2d",
            PoolKind::Avg => "AvgPool2d",
        };
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (ph, pw) = self.padding;
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 || 2 * ph > kh || 2 * pw > kw {
            return Err(QuantError::UnsupportedConfig {
                context: name.into(),
                reason: format!(
                    "kernel {:?} and stride {:?} must be positive and padding {:?} at most half the kernel",
                    self.kernel, self.stride, self.padding
                ),
            });
        }
        let x4 = x
            .view()
            .into_dimensionality::<Ix4>()
            .map_err(|_| shape_err(name, "[N, C, H, W]".into(), x))?;
        let (_, _, h, w) = x4.dim();
        if h + 2 * ph < kh || w + 2 * pw < kw {
            return Err(shape_err(
                name,
                format!("spatial size of at least the {kh}x{kw} window"),
                x,
            ));
        }
        // One float implementation per op: the graph's (same window walk and sums).
        let spec = self.spec();
        match self.kind {
            PoolKind::Max => crate::graph::ops::max_pool2d(x, &spec),
            PoolKind::Avg => crate::graph::ops::avg_pool2d(x, &spec),
        }
    }

    /// The graph op this layer is (`Op::MaxPool2d` / `Op::AvgPool2d` spec).
    pub(crate) fn spec(&self) -> crate::graph::Pool2dSpec {
        crate::graph::Pool2dSpec::new(self.kernel.0, self.kernel.1)
            .with_stride(self.stride.0, self.stride.1)
            .with_padding(self.padding.0, self.padding.1)
    }
}

/// Adaptive average pooling to a fixed output size (`torch.nn.AdaptiveAvgPool2d`): output
/// cell `i` averages input rows `floor(i * H / out) .. ceil((i + 1) * H / out)`.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] for a non-4-D input; [`QuantError::UnsupportedConfig`] for
/// a zero output size.
pub fn adaptive_avg_pool2d(x: &ArrayD<f32>, out: (usize, usize)) -> Result<ArrayD<f32>> {
    if out.0 == 0 || out.1 == 0 {
        return Err(QuantError::UnsupportedConfig {
            context: "AdaptiveAvgPool2d".into(),
            reason: format!("output size {out:?} must be positive"),
        });
    }
    let x4 = x
        .view()
        .into_dimensionality::<Ix4>()
        .map_err(|_| shape_err("AdaptiveAvgPool2d", "[N, C, H, W]".into(), x))?;
    let (n, c, h, w) = x4.dim();
    let mut y = Array4::<f32>::zeros((n, c, out.0, out.1));
    let xs = x4.as_standard_layout();
    crate::kernels::f32_pool::adaptive_avg_nchw(
        xs.as_slice().expect("standard layout"),
        n * c,
        (h, w),
        out,
        y.as_slice_mut().expect("standard layout"),
    );
    Ok(y.into_dyn())
}

/// Flattens dimensions `start_dim..` into one (`torch.nn.Flatten`, default `start_dim = 1`).
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if the input has no dimension `start_dim`.
pub fn flatten(x: &ArrayD<f32>, start_dim: usize) -> Result<ArrayD<f32>> {
    if start_dim >= x.ndim() {
        return Err(shape_err(
            "Flatten",
            format!("at least {} dimensions", start_dim + 1),
            x,
        ));
    }
    crate::graph::ops::flatten(x, start_dim, -1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array;

    /// A direct 7-loop convolution, the oracle for the im2col path.
    fn naive_conv(conv: &Conv2d, x: &Array4<f32>) -> Array4<f32> {
        let (n, _, h, w) = x.dim();
        let (o, cg, kh, kw) = conv.weight.dim();
        let (ho, wo) = conv.output_size(h, w).unwrap();
        let og = o / conv.groups;
        Array4::from_shape_fn((n, o, ho, wo), |(b, oc, oy, ox)| {
            let g = oc / og;
            let mut acc = conv.bias.as_ref().map_or(0.0, |bb| bb[oc]) as f64;
            for ci in 0..cg {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let iy = (oy * conv.stride.0 + ky * conv.dilation.0) as isize
                            - conv.padding.0 as isize;
                        let ix = (ox * conv.stride.1 + kx * conv.dilation.1) as isize
                            - conv.padding.1 as isize;
                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            acc += (x[[b, g * cg + ci, iy as usize, ix as usize]]
                                * conv.weight[[oc, ci, ky, kx]])
                                as f64;
                        }
                    }
                }
            }
            acc as f32
        })
    }

    #[test]
    fn conv_matches_a_direct_loop_for_strides_padding_dilation_groups() {
        let x = Array::from_shape_fn((2, 6, 9, 8), |(a, b, c, d)| {
            ((a * 7 + b * 5 + c * 3 + d) as f32 * 0.37).sin()
        });
        for (groups, stride, pad, dil) in [
            (1, 1, 0, 1),
            (2, 2, 1, 1),
            (3, 1, 2, 2),
            (6, 1, 1, 1),
            (1, 3, 1, 2),
        ] {
            let o = 6;
            let w = Array::from_shape_fn((o, 6 / groups, 3, 2), |(a, b, c, d)| {
                ((a + 2 * b + 3 * c + 5 * d) as f32 * 0.11).cos()
            });
            let conv = Conv2d::new(w, Some(Array1::linspace(-1.0, 1.0, o)))
                .unwrap()
                .with_groups(groups)
                .with_stride(stride, stride)
                .with_padding(pad, pad)
                .with_dilation(dil, dil);
            let y = conv.forward(&x.clone().into_dyn()).unwrap();
            let r = naive_conv(&conv, &x);
            assert_eq!(y.shape(), r.shape());
            for (a, b) in y.iter().zip(r.iter()) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b} (groups {groups})");
            }
        }
    }

    #[test]
    fn conv_batches_small_images_and_fuses_relu() {
        // 10x10 outputs: 5 images per GEMM, so 7 images make a full and a partial batch;
        // 1x1 (pointwise, read in place), depthwise, and ReLU on every path.
        let x = Array::from_shape_fn((7, 4, 10, 10), |(a, b, c, d)| {
            ((a * 11 + b * 7 + c * 3 + d) as f32 * 0.29).sin()
        });
        for (k, pad, groups, bias) in [(3, 1, 1, true), (1, 0, 1, false), (3, 1, 4, true)] {
            let w = Array::from_shape_fn((8, 4 / groups, k, k), |(a, b, c, d)| {
                ((a + 3 * b + 5 * c + 7 * d) as f32 * 0.13).cos()
            });
            let conv = Conv2d::new(w, bias.then(|| Array1::linspace(-0.5, 0.5, 8)))
                .unwrap()
                .with_padding(pad, pad)
                .with_groups(groups);
            let r = naive_conv(&conv, &x);
            let xd = x.clone().into_dyn();
            for relu in [false, true] {
                let y = conv.forward_act(&xd, relu).unwrap();
                assert_eq!(y.shape(), r.shape());
                for (a, &b) in y.iter().zip(r.iter()) {
                    let b = if relu { b.max(0.0) } else { b };
                    assert!((a - b).abs() < 1e-4, "{a} vs {b} (k {k}, relu {relu})");
                }
            }
        }
    }

    #[test]
    fn linear_matches_a_direct_loop_on_both_paths() {
        // Up to 8 rows take the matrix-vector kernels, more the GEMM.
        for rows in [1usize, 3, 4, 8, 9, 17] {
            for (bias, relu) in [(true, false), (false, true), (true, true)] {
                let (i, o) = (37, 13);
                let w = Array::from_shape_fn((o, i), |(a, b)| ((a * 5 + b) as f32 * 0.17).sin());
                let fc =
                    Linear::new(w.clone(), bias.then(|| Array1::linspace(-1.0, 1.0, o))).unwrap();
                let x = Array::from_shape_fn((rows, i), |(a, b)| ((a + 3 * b) as f32 * 0.31).cos());
                let y = fc.forward_act(&x.clone().into_dyn(), relu).unwrap();
                assert_eq!(y.shape(), &[rows, o]);
                for r in 0..rows {
                    for j in 0..o {
                        let mut want: f64 = (0..i).map(|t| (x[[r, t]] * w[[j, t]]) as f64).sum();
                        want += fc.bias.as_ref().map_or(0.0, |b| b[j] as f64);
                        if relu {
                            want = want.max(0.0);
                        }
                        let got = y[[r, j]] as f64;
                        assert!((got - want).abs() < 1e-4, "{got} vs {want} ({rows} rows)");
                    }
                }
            }
        }
    }

    #[test]
    fn shape_errors_name_the_layer_and_both_shapes() {
        let conv = Conv2d::new(Array4::zeros((4, 3, 3, 3)), None).unwrap();
        let err = conv
            .forward(&ArrayD::zeros(IxDyn(&[1, 2, 8, 8])))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Conv2d: shape mismatch: expected [N, 3, H, W], got input of shape [1, 2, 8, 8]"
        );
        assert!(conv.forward(&ArrayD::zeros(IxDyn(&[1, 3, 2, 8]))).is_err());
        let fc = Linear::new(Array2::zeros((2, 5)), None).unwrap();
        assert!(fc.forward(&ArrayD::zeros(IxDyn(&[3, 4]))).is_err());
        assert!(Linear::new(Array2::zeros((2, 5)), Some(Array1::zeros(3))).is_err());
    }

    #[test]
    fn pools_and_flatten_follow_pytorch() {
        let x = Array::from_shape_fn((1, 1, 4, 4), |(_, _, i, j)| (i * 4 + j) as f32).into_dyn();
        let mx = Pool2d::new(PoolKind::Max, 2, 2).forward(&x).unwrap();
        assert_eq!(mx.into_raw_vec_and_offset().0, vec![5.0, 7.0, 13.0, 15.0]);
        let av = Pool2d::new(PoolKind::Avg, 2, 2).forward(&x).unwrap();
        assert_eq!(av.into_raw_vec_and_offset().0, vec![2.5, 4.5, 10.5, 12.5]);
        let ad = adaptive_avg_pool2d(&x, (1, 1)).unwrap();
        assert_eq!(ad.into_raw_vec_and_offset().0, vec![7.5]);
        let ad3 = adaptive_avg_pool2d(&x, (3, 3)).unwrap();
        // rows 0..2, 1..3, 2..4 (PyTorch's floor/ceil windows)
        assert_eq!(ad3[[0, 0, 0, 0]], (0.0 + 1.0 + 4.0 + 5.0) / 4.0);
        assert_eq!(ad3[[0, 0, 2, 2]], (10.0 + 11.0 + 14.0 + 15.0) / 4.0);
        assert_eq!(flatten(&x, 1).unwrap().shape(), &[1, 16]);
    }

    #[test]
    fn batchnorm_scale_shift_equals_forward() {
        let bn = BatchNorm2d {
            weight: Array1::from(vec![0.5, 2.0]),
            bias: Array1::from(vec![0.1, -0.3]),
            running_mean: Array1::from(vec![1.0, -2.0]),
            running_var: Array1::from(vec![4.0, 0.25]),
            eps: 1e-5,
        };
        let x = Array::from_shape_fn((2, 2, 3, 3), |(a, b, c, d)| (a + b + c * d) as f32 - 2.0)
            .into_dyn();
        let y = bn.forward(&x).unwrap();
        let (sc, sh) = bn.scale_shift();
        for (idx, &v) in x.indexed_iter() {
            let c = idx[1];
            assert!((v * sc[c] + sh[c] - y[&idx]).abs() < 1e-5);
        }
    }
}
