//! Quantized ReLU, pooling and flatten. Output qparams are the input's.

use ndarray::{ArrayD, IxDyn};

use super::tensor::{check_nonempty, dims4};
use super::{QTensor, TorchLayout};
use crate::error::{QuantError, Result};
use crate::kernels::conv::out_len as out_len_k;
use crate::kernels::requant::cvt_round;

/// `torch.ao.nn.quantized.ReLU`: `max(q, zero_point)`, same qparams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QReLU;

impl QReLU {
    /// Applies the ReLU. Never fails; returns `Result` like every layer.
    ///
    /// # Errors
    /// None.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QReLU, QTensor};
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![3], vec![1u8, 5, 9])?, 0.1, 5)?;
    /// assert_eq!(QReLU.forward(&x)?.data().as_slice().unwrap(), &[5, 5, 9]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        let zp = x.zero_point() as u8;
        QTensor::new(x.data().mapv(|q| q.max(zp)), x.scale(), x.zero_point())
    }
}

/// PyTorch's pooling output length (checked arithmetic, `ceil_mode` as PyTorch).
fn out_len(
    i: usize,
    k: usize,
    s: usize,
    p: usize,
    d: usize,
    ceil_mode: bool,
    layer: &str,
) -> Result<usize> {
    out_len_k(i, k, s, p, d, ceil_mode).ok_or_else(|| QuantError::ShapeMismatch {
        context: layer.into(),
        expected: format!(
            "spatial size + 2 * padding >= dilation * (kernel - 1) + 1 (kernel {k}, dilation {d})"
        ),
        actual: format!("size {i}, padding {p}"),
    })
}

/// `b * c * oh * ow`, checked.
fn out_numel(dims: [usize; 4], shape: &[usize], layer: &str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| QuantError::ShapeMismatch {
            context: layer.into(),
            expected: "an output whose size fits in memory".into(),
            actual: format!("input shape {shape:?} gives output {dims:?}"),
        })
}

fn check_pool(
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    layer: &str,
) -> Result<()> {
    if kernel.0 == 0 || kernel.1 == 0 || stride.0 == 0 || stride.1 == 0 {
        return Err(QuantError::UnsupportedConfig {
            context: layer.into(),
            reason: format!("kernel {kernel:?} and stride {stride:?} must be positive"),
        });
    }
    if padding.0.saturating_mul(2) > kernel.0 || padding.1.saturating_mul(2) > kernel.1 {
        return Err(QuantError::UnsupportedConfig {
            context: layer.into(),
            reason: format!("padding {padding:?} must be at most half the kernel {kernel:?}"),
        });
    }
    Ok(())
}

fn to4(v: Vec<u8>, shape: [usize; 4], layer: &str) -> Result<ArrayD<u8>> {
    ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| QuantError::ShapeMismatch {
        context: layer.into(),
        expected: format!("{shape:?}"),
        actual: e.to_string(),
    })
}

/// `torch.ao.nn.quantized.MaxPool2d`: exact, padding never wins; `ceil_mode` through
/// [`with_ceil_mode`](Self::with_ceil_mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QMaxPool2d {
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    ceil_mode: bool,
}

impl QMaxPool2d {
    /// A max pool; PyTorch's default stride is the kernel size.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for zero sizes or padding over half the kernel.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QMaxPool2d, QTensor};
    /// let p = QMaxPool2d::new((2, 2), (2, 2), (0, 0), (1, 1))?;
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 1, 2, 2], vec![1u8, 7, 3, 2])?, 0.1, 0)?;
    /// assert_eq!(p.forward(&x)?.data()[[0, 0, 0, 0]], 7);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
    ) -> Result<Self> {
        check_pool(kernel, stride, padding, "QMaxPool2d")?;
        if dilation.0 == 0 || dilation.1 == 0 {
            return Err(QuantError::UnsupportedConfig {
                context: "QMaxPool2d".into(),
                reason: format!("dilation {dilation:?} must be positive"),
            });
        }
        Ok(QMaxPool2d {
            kernel,
            stride,
            padding,
            dilation,
            ceil_mode: false,
        })
    }

    /// PyTorch's `ceil_mode`: output sizes rounded up, the last window starting inside
    /// the input or the left padding.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QMaxPool2d, QTensor};
    /// let p = QMaxPool2d::new((2, 2), (2, 2), (0, 0), (1, 1))?.with_ceil_mode(true);
    /// let x = QTensor::new(ArrayD::from_shape_fn(vec![1, 1, 3, 3], |d| (d[2] * 3 + d[3]) as u8), 0.1, 0)?;
    /// let y = p.forward(&x)?;
    /// assert_eq!(y.data().shape(), &[1, 1, 2, 2]);
    /// assert_eq!(y.data()[[0, 0, 1, 1]], 8);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn with_ceil_mode(mut self, ceil_mode: bool) -> Self {
        self.ceil_mode = ceil_mode;
        self
    }

    /// Pools an NCHW tensor.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for a tensor that is not rank 4, has an empty
    /// spatial size or is too small.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QMaxPool2d, QTensor};
    /// let p = QMaxPool2d::new((3, 3), (1, 1), (1, 1), (1, 1))?;
    /// let x = QTensor::new(ArrayD::from_shape_fn(vec![1, 2, 4, 4], |d| d[3] as u8), 0.1, 0)?;
    /// let y = p.forward(&x)?;
    /// assert_eq!(y.data().shape(), &[1, 2, 4, 4]);
    /// assert_eq!(y.data()[[0, 1, 0, 0]], 1);
    /// assert!(p.forward(&QTensor::new(ArrayD::zeros(vec![4, 4]), 0.1, 0)?).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        const L: &str = "QMaxPool2d";
        let (b, c, h, w) = dims4(x, L)?;
        check_nonempty(h, w, x.data().shape(), L)?;
        let (kh, kw) = self.kernel;
        let cm = self.ceil_mode;
        let oh = out_len(h, kh, self.stride.0, self.padding.0, self.dilation.0, cm, L)?;
        let ow = out_len(w, kw, self.stride.1, self.padding.1, self.dilation.1, cm, L)?;
        let n = out_numel([b, c, oh, ow], x.data().shape(), L)?;
        let xv = x.to_vec();
        let mut y = vec![0u8; n];
        for (yp, xp) in y.chunks_mut(oh * ow).zip(xv.chunks(h * w)) {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut m = 0u8;
                    for ky in 0..kh {
                        let iy = (oy * self.stride.0 + ky * self.dilation.0) as isize
                            - self.padding.0 as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kx in 0..kw {
                            let ix = (ox * self.stride.1 + kx * self.dilation.1) as isize
                                - self.padding.1 as isize;
                            if ix >= 0 && ix < w as isize {
                                m = m.max(xp[iy as usize * w + ix as usize]);
                            }
                        }
                    }
                    yp[oy * ow + ox] = m;
                }
            }
        }
        QTensor::new(to4(y, [b, c, oh, ow], L)?, x.scale(), x.zero_point())
    }

    /// As [`forward`](Self::forward) on a tensor held `[n, h, w, c]`; the result is held
    /// `[n, oh, ow, c]`. The same values, element for element; the channels of a pixel
    /// are pooled together.
    ///
    /// # Errors
    /// As [`forward`](Self::forward), for the NHWC shape.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QMaxPool2d, QTensor};
    /// let p = QMaxPool2d::new((2, 2), (2, 2), (0, 0), (1, 1))?;
    /// // NHWC [1, 2, 2, 2]: channel 0 holds 1, 2, 3, 4; channel 1 holds 9, 8, 7, 6
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 2, 2, 2], vec![1u8, 9, 2, 8, 3, 7, 4, 6])?, 0.1, 0)?;
    /// assert_eq!(p.forward_nhwc(&x)?.data().as_slice().unwrap(), &[4, 9]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_nhwc(&self, x: &QTensor) -> Result<QTensor> {
        const L: &str = "QMaxPool2d";
        let (b, h, w, c) = dims4(x, L)?;
        check_nonempty(h, w, x.data().shape(), L)?;
        let (kh, kw) = self.kernel;
        let cm = self.ceil_mode;
        let oh = out_len(h, kh, self.stride.0, self.padding.0, self.dilation.0, cm, L)?;
        let ow = out_len(w, kw, self.stride.1, self.padding.1, self.dilation.1, cm, L)?;
        let n = out_numel([b, oh, ow, c], x.data().shape(), L)?;
        let std = x.data().as_standard_layout();
        let xv = std.as_slice().unwrap_or(&[]);
        let mut y = vec![0u8; n];
        if c > 0 {
            for (yb, xb) in y.chunks_mut(oh * ow * c).zip(xv.chunks(h * w * c)) {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let out = &mut yb[(oy * ow + ox) * c..][..c];
                        for ky in 0..kh {
                            let iy = (oy * self.stride.0 + ky * self.dilation.0) as isize
                                - self.padding.0 as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * self.stride.1 + kx * self.dilation.1) as isize
                                    - self.padding.1 as isize;
                                if ix >= 0 && ix < w as isize {
                                    let src = &xb[(iy as usize * w + ix as usize) * c..][..c];
                                    out.iter_mut().zip(src).for_each(|(o, &v)| *o = (*o).max(v));
                                }
                            }
                        }
                    }
                }
            }
        }
        QTensor::new(to4(y, [b, oh, ow, c], L)?, x.scale(), x.zero_point())
    }
}

/// Whether PyTorch runs its channels-last kernel: the layout says so, or an NCHW tensor
/// that is channels-last contiguous too (one channel, or 1x1 spatial).
fn channels_last_kernel(layout: TorchLayout, c: usize, h: usize, w: usize) -> bool {
    layout == TorchLayout::ChannelsLast || c == 1 || h * w == 1
}

/// `torch.ao.nn.quantized.AvgPool2d` / `F.avg_pool2d` on a quantized tensor (no
/// `divisor_override`; `ceil_mode` through [`with_ceil_mode`](Self::with_ceil_mode)).
///
/// PyTorch's two kernels round differently: channels-last
/// `clamp(cvtps2dq((sum - size * zp) * (1 / div)) + zp)`, NCHW-contiguous
/// `clamp(nearbyint((sum - size * zp) * (1 / div) + zp))` (the zero point added before
/// rounding changes ties), both in `f32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QAvgPool2d {
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    count_include_pad: bool,
    layout: TorchLayout,
    ceil_mode: bool,
}

impl QAvgPool2d {
    /// An average pool over channels-last input (what fbgemm convolutions return);
    /// PyTorch's defaults are `stride = kernel`, `count_include_pad = true`.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for zero sizes or padding over half the kernel.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QAvgPool2d, QTensor};
    /// let p = QAvgPool2d::new((2, 2), (2, 2), (0, 0), true)?;
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 1, 2, 2], vec![1u8, 2, 3, 4])?, 0.1, 0)?;
    /// assert_eq!(p.forward(&x)?.data()[[0, 0, 0, 0]], 2); // 2.5 rounds to even
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        count_include_pad: bool,
    ) -> Result<Self> {
        check_pool(kernel, stride, padding, "QAvgPool2d")?;
        Ok(QAvgPool2d {
            kernel,
            stride,
            padding,
            count_include_pad,
            layout: TorchLayout::ChannelsLast,
            ceil_mode: false,
        })
    }

    /// PyTorch's `ceil_mode`: output sizes rounded up, the last window starting inside
    /// the input or the left padding; windows are clipped at the padded input's end and,
    /// with `count_include_pad`, divide by the clipped window's size (as PyTorch).
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QAvgPool2d, QTensor};
    /// let p = QAvgPool2d::new((2, 2), (2, 2), (0, 0), true)?.with_ceil_mode(true);
    /// let x = QTensor::new(ArrayD::from_shape_fn(vec![1, 1, 3, 3], |d| (d[2] * 3 + d[3]) as u8), 0.1, 0)?;
    /// let y = p.forward(&x)?;
    /// assert_eq!(y.data().shape(), &[1, 1, 2, 2]);
    /// assert_eq!(y.data()[[0, 0, 1, 1]], 8); // the 1x1 window at the corner
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn with_ceil_mode(mut self, ceil_mode: bool) -> Self {
        self.ceil_mode = ceil_mode;
        self
    }

    /// Sets the memory layout PyTorch holds the input in.
    pub fn with_layout(mut self, layout: TorchLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Pools an NCHW tensor.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for a tensor that is not rank 4 or is too small.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QAvgPool2d, QTensor, TorchLayout};
    /// // (1 + 2) / 2 = 1.5: channels-last rounds 1.5 to 2; NCHW adds the zero point (5)
    /// // first and rounds 6.5 to 6.
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 2, 1, 2], vec![6u8, 7, 6, 7])?, 0.1, 5)?;
    /// let p = QAvgPool2d::new((1, 2), (1, 2), (0, 0), true)?;
    /// assert_eq!(p.forward(&x)?.data()[[0, 0, 0, 0]], 7);
    /// assert_eq!(p.with_layout(TorchLayout::Contiguous).forward(&x)?.data()[[0, 0, 0, 0]], 6);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        const L: &str = "QAvgPool2d";
        let (b, c, h, w) = dims4(x, L)?;
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (ph, pw) = self.padding;
        let oh = out_len(h, kh, sh, ph, 1, self.ceil_mode, L)?;
        let ow = out_len(w, kw, sw, pw, 1, self.ceil_mode, L)?;
        let n = out_numel([b, c, oh, ow], x.data().shape(), L)?;
        let nhwc = channels_last_kernel(self.layout, c, h, w);
        let zp = x.zero_point();
        let xv = x.to_vec();
        let mut y = vec![0u8; n];
        // An empty spatial input (PyTorch accepts it with padding) pools nothing: every
        // window is padding.
        for (pi, yp) in y.chunks_mut(oh * ow).enumerate() {
            let xp = &xv[pi * h * w..(pi + 1) * h * w];
            for oy in 0..oh {
                let hs = (oy * sh) as isize - ph as isize;
                let he = (hs + kh as isize).min((h + ph) as isize);
                for ox in 0..ow {
                    let ws = (ox * sw) as isize - pw as isize;
                    let we = (ws + kw as isize).min((w + pw) as isize);
                    let pool = (he - hs) as i64 * (we - ws) as i64;
                    let (h0, h1) = (hs.max(0) as usize, he.min(h as isize) as usize);
                    let (w0, w1) = (ws.max(0) as usize, we.min(w as isize) as usize);
                    let size = h1.saturating_sub(h0) as i64 * w1.saturating_sub(w0) as i64;
                    let div = if self.count_include_pad { pool } else { size };
                    let mut sum = 0i64;
                    for iy in h0..h1 {
                        for ix in w0..w1 {
                            sum += xp[iy * w + ix] as i64;
                        }
                    }
                    let acc = (sum - size * zp as i64) as f32;
                    let mult = (1.0f64 / div.max(1) as f64) as f32;
                    let v = if nhwc {
                        cvt_round(acc * mult) as i64 + zp as i64
                    } else {
                        cvt_round(acc * mult + zp as f32) as i64
                    };
                    yp[oy * ow + ox] = v.clamp(0, 255) as u8;
                }
            }
        }
        QTensor::new(to4(y, [b, c, oh, ow], L)?, x.scale(), zp)
    }

    /// As [`forward`](Self::forward) on a tensor held `[n, h, w, c]`; the result is held
    /// `[n, oh, ow, c]`. The same values (the rounding still follows
    /// [`with_layout`](Self::with_layout), PyTorch's memory format), without transposes.
    ///
    /// # Errors
    /// As [`forward`](Self::forward), for the NHWC shape.
    pub fn forward_nhwc(&self, x: &QTensor) -> Result<QTensor> {
        const L: &str = "QAvgPool2d";
        let (b, h, w, c) = dims4(x, L)?;
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (ph, pw) = self.padding;
        let oh = out_len(h, kh, sh, ph, 1, self.ceil_mode, L)?;
        let ow = out_len(w, kw, sw, pw, 1, self.ceil_mode, L)?;
        let n = out_numel([b, oh, ow, c], x.data().shape(), L)?;
        let nhwc = channels_last_kernel(self.layout, c, h, w);
        let zp = x.zero_point();
        let std = x.data().as_standard_layout();
        let xv = std.as_slice().unwrap_or(&[]);
        let mut y = vec![0u8; n];
        let mut sum = vec![0i64; c];
        let mut s32 = vec![0i32; c];
        if c > 0 {
            for (bi, yb) in y.chunks_mut(oh * ow * c).enumerate() {
                let xb = &xv[bi * h * w * c..(bi + 1) * h * w * c];
                for oy in 0..oh {
                    let hs = (oy * sh) as isize - ph as isize;
                    let he = (hs + kh as isize).min((h + ph) as isize);
                    for ox in 0..ow {
                        let ws = (ox * sw) as isize - pw as isize;
                        let we = (ws + kw as isize).min((w + pw) as isize);
                        let pool = (he - hs) as i64 * (we - ws) as i64;
                        let (h0, h1) = (hs.max(0) as usize, he.min(h as isize) as usize);
                        let (w0, w1) = (ws.max(0) as usize, we.min(w as isize) as usize);
                        let size = h1.saturating_sub(h0) as i64 * w1.saturating_sub(w0) as i64;
                        let div = if self.count_include_pad { pool } else { size };
                        window_sums(xb, w, c, (h0, h1), (w0, w1), &mut s32, &mut sum);
                        let mult = (1.0f64 / div.max(1) as f64) as f32;
                        let out = &mut yb[(oy * ow + ox) * c..][..c];
                        for (o, &s) in out.iter_mut().zip(&sum) {
                            let acc = (s - size * zp as i64) as f32;
                            let v = if nhwc {
                                cvt_round(acc * mult) as i64 + zp as i64
                            } else {
                                cvt_round(acc * mult + zp as f32) as i64
                            };
                            *o = v.clamp(0, 255) as u8;
                        }
                    }
                }
            }
        }
        QTensor::new(to4(y, [b, oh, ow, c], L)?, x.scale(), zp)
    }
}

/// Per-channel sums of the window rows `hr` x columns `wr` of one image held `[h, w, c]`
/// (`w` columns, `c` channels) into `sum`: through the `i32` lanes of `s32` (which the
/// compiler vectorizes) for windows that cannot overflow them, in `i64` otherwise.
fn window_sums(
    xb: &[u8],
    w: usize,
    c: usize,
    hr: (usize, usize),
    wr: (usize, usize),
    s32: &mut [i32],
    sum: &mut [i64],
) {
    let count = hr.1.saturating_sub(hr.0) * wr.1.saturating_sub(wr.0);
    if count <= (i32::MAX / 255) as usize {
        s32.iter_mut().for_each(|a| *a = 0);
        for iy in hr.0..hr.1 {
            for ix in wr.0..wr.1 {
                let src = &xb[(iy * w + ix) * c..][..c];
                s32.iter_mut().zip(src).for_each(|(a, &v)| *a += v as i32);
            }
        }
        sum.iter_mut()
            .zip(s32.iter())
            .for_each(|(a, &v)| *a = v as i64);
    } else {
        sum.iter_mut().for_each(|a| *a = 0);
        for iy in hr.0..hr.1 {
            for ix in wr.0..wr.1 {
                let src = &xb[(iy * w + ix) * c..][..c];
                sum.iter_mut().zip(src).for_each(|(a, &v)| *a += v as i64);
            }
        }
    }
}

/// `torch.ao.nn.quantized` adaptive average pooling (`F.adaptive_avg_pool2d`).
///
/// Window `i` of `O` over `I` spans `floor(i * I / O)..ceil((i + 1) * I / O)`. With
/// `m = (1 / kh) / kw` in `f32`: channels-last `clamp(cvtps2dq((sum - kh * kw * zp) * m) + zp)`,
/// NCHW-contiguous `clamp(nearbyint(sum * m))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QAdaptiveAvgPool2d {
    output: (usize, usize),
    layout: TorchLayout,
}

impl QAdaptiveAvgPool2d {
    /// Pools to `output` = (height, width), for channels-last input.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for a zero output size.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QAdaptiveAvgPool2d, QTensor};
    /// let p = QAdaptiveAvgPool2d::new((1, 1))?;
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 1, 2, 2], vec![1u8, 2, 3, 5])?, 0.1, 0)?;
    /// assert_eq!(p.forward(&x)?.data()[[0, 0, 0, 0]], 3); // 2.75
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(output: (usize, usize)) -> Result<Self> {
        if output.0 == 0 || output.1 == 0 {
            return Err(QuantError::UnsupportedConfig {
                context: "QAdaptiveAvgPool2d".into(),
                reason: format!("output size {output:?} must be positive"),
            });
        }
        Ok(QAdaptiveAvgPool2d {
            output,
            layout: TorchLayout::ChannelsLast,
        })
    }

    /// Sets the memory layout PyTorch holds the input in.
    pub fn with_layout(mut self, layout: TorchLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Pools an NCHW tensor.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for a tensor that is not rank 4 or has an empty
    /// spatial size.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QAdaptiveAvgPool2d, QTensor};
    /// let p = QAdaptiveAvgPool2d::new((2, 1))?;
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 1, 3, 1], vec![0u8, 3, 9])?, 0.1, 0)?;
    /// // windows rows 0..2 and 1..3: 1.5 -> 2, 6
    /// assert_eq!(p.forward(&x)?.data().as_slice().unwrap(), &[2, 6]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        const L: &str = "QAdaptiveAvgPool2d";
        let (b, c, h, w) = dims4(x, L)?;
        check_nonempty(h, w, x.data().shape(), L)?;
        let (oh, ow) = self.output;
        let n = out_numel([b, c, oh, ow], x.data().shape(), L)?;
        let nhwc = channels_last_kernel(self.layout, c, h, w);
        let zp = x.zero_point();
        let xv = x.to_vec();
        let mut y = vec![0u8; n];
        for (yp, xp) in y.chunks_mut(oh * ow).zip(xv.chunks(h * w)) {
            for oy in 0..oh {
                let (h0, h1) = adaptive_window(oy, oh, h);
                for ox in 0..ow {
                    let (w0, w1) = adaptive_window(ox, ow, w);
                    // i64: a window of 255s wraps i32 beyond 8.4 million elements.
                    let mut sum = 0i64;
                    for iy in h0..h1 {
                        for ix in w0..w1 {
                            sum += xp[iy * w + ix] as i64;
                        }
                    }
                    yp[oy * ow + ox] = window_average(sum, (h1 - h0, w1 - w0), zp, nhwc);
                }
            }
        }
        QTensor::new(to4(y, [b, c, oh, ow], L)?, x.scale(), zp)
    }

    /// As [`forward`](Self::forward) on a tensor held `[n, h, w, c]`; the result is held
    /// `[n, oh, ow, c]`. The same values (the rounding still follows
    /// [`with_layout`](Self::with_layout)), without transposes; the global average pool
    /// (output 1x1) of a channels-last activation is one pass over the input.
    ///
    /// # Errors
    /// As [`forward`](Self::forward), for the NHWC shape.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QAdaptiveAvgPool2d, QTensor};
    /// let p = QAdaptiveAvgPool2d::new((1, 1))?;
    /// // NHWC [1, 2, 1, 2]: channel 0 holds 1, 3; channel 1 holds 10, 20
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 2, 1, 2], vec![1u8, 10, 3, 20])?, 0.1, 0)?;
    /// assert_eq!(p.forward_nhwc(&x)?.data().as_slice().unwrap(), &[2, 15]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_nhwc(&self, x: &QTensor) -> Result<QTensor> {
        const L: &str = "QAdaptiveAvgPool2d";
        let (b, h, w, c) = dims4(x, L)?;
        check_nonempty(h, w, x.data().shape(), L)?;
        let (oh, ow) = self.output;
        let n = out_numel([b, oh, ow, c], x.data().shape(), L)?;
        let nhwc = channels_last_kernel(self.layout, c, h, w);
        let zp = x.zero_point();
        let std = x.data().as_standard_layout();
        let xv = std.as_slice().unwrap_or(&[]);
        let mut y = vec![0u8; n];
        let mut sum = vec![0i64; c];
        let mut s32 = vec![0i32; c];
        if c > 0 {
            for (yb, xb) in y.chunks_mut(oh * ow * c).zip(xv.chunks(h * w * c)) {
                for oy in 0..oh {
                    let (h0, h1) = adaptive_window(oy, oh, h);
                    for ox in 0..ow {
                        let (w0, w1) = adaptive_window(ox, ow, w);
                        window_sums(xb, w, c, (h0, h1), (w0, w1), &mut s32, &mut sum);
                        let k = (h1 - h0, w1 - w0);
                        let out = &mut yb[(oy * ow + ox) * c..][..c];
                        for (o, &s) in out.iter_mut().zip(&sum) {
                            *o = window_average(s, k, zp, nhwc);
                        }
                    }
                }
            }
        }
        QTensor::new(to4(y, [b, oh, ow, c], L)?, x.scale(), zp)
    }
}

/// The input rows (or columns) `[start, end)` that adaptive pooling output `i` of `o`
/// averages over an input of size `n`: PyTorch's `floor(i*n/o)` .. `ceil((i+1)*n/o)`.
fn adaptive_window(i: usize, o: usize, n: usize) -> (usize, usize) {
    (i * n / o, ((i + 1) * n).div_ceil(o))
}

/// PyTorch's quantized adaptive average of a `kh x kw` window summing to `sum`: its
/// channels-last kernel averages `sum - kh*kw*zp` and adds the zero point back, its
/// contiguous kernel averages the raw sum; both multiply by `1/kh/kw` in f32 (two
/// divisions, as PyTorch: not always the same bits as `1/(kh*kw)`).
fn window_average(sum: i64, (kh, kw): (usize, usize), zp: i32, channels_last_kernel: bool) -> u8 {
    let m = 1.0f32 / kh as f32 / kw as f32;
    let v = if channels_last_kernel {
        let acc = sum - (kh * kw) as i64 * zp as i64;
        cvt_round(acc as f32 * m) as i64 + zp as i64
    } else {
        cvt_round(sum as f32 * m) as i64
    };
    v.clamp(0, 255) as u8
}

/// `torch.nn.Flatten` on a quantized tensor: dimensions `1..` merged (logical order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QFlatten;

impl QFlatten {
    /// Flattens `[n, ...]` to `[n, rest]`.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for a rank-0 tensor.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QFlatten, QTensor};
    /// let x = QTensor::new(ArrayD::zeros(vec![2, 3, 4, 5]), 0.1, 0)?;
    /// assert_eq!(QFlatten.forward(&x)?.data().shape(), &[2, 60]);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        let shape = x.data().shape();
        if shape.is_empty() {
            return Err(QuantError::ShapeMismatch {
                context: "QFlatten".into(),
                expected: "a tensor of rank at least 1".into(),
                actual: "a scalar".into(),
            });
        }
        let n = shape[0];
        let rest: usize = shape[1..].iter().product();
        let data = ArrayD::from_shape_vec(IxDyn(&[n, rest]), x.to_vec()).map_err(|e| {
            QuantError::ShapeMismatch {
                context: "QFlatten".into(),
                expected: format!("[{n}, {rest}]"),
                actual: e.to_string(),
            }
        })?;
        QTensor::new(data, x.scale(), x.zero_point())
    }
}

impl QMaxPool2d {
    /// Window `(h, w)`.
    pub fn kernel(&self) -> (usize, usize) {
        self.kernel
    }
    /// Stride `(h, w)`.
    pub fn stride(&self) -> (usize, usize) {
        self.stride
    }
    /// Padding `(h, w)`.
    pub fn padding(&self) -> (usize, usize) {
        self.padding
    }
    /// Dilation `(h, w)`.
    pub fn dilation(&self) -> (usize, usize) {
        self.dilation
    }
    /// Whether output sizes round up (PyTorch's `ceil_mode`).
    pub fn ceil_mode(&self) -> bool {
        self.ceil_mode
    }
}

impl QAvgPool2d {
    /// Window `(h, w)`.
    pub fn kernel(&self) -> (usize, usize) {
        self.kernel
    }
    /// Stride `(h, w)`.
    pub fn stride(&self) -> (usize, usize) {
        self.stride
    }
    /// Padding `(h, w)`.
    pub fn padding(&self) -> (usize, usize) {
        self.padding
    }
    /// Whether padding counts in the divisor.
    pub fn count_include_pad(&self) -> bool {
        self.count_include_pad
    }
    /// Whether output sizes round up (PyTorch's `ceil_mode`).
    pub fn ceil_mode(&self) -> bool {
        self.ceil_mode
    }
    /// PyTorch's memory layout of the input, which decides the rounding.
    pub fn layout(&self) -> TorchLayout {
        self.layout
    }
}

impl QAdaptiveAvgPool2d {
    /// Output size `(h, w)`.
    pub fn output_size(&self) -> (usize, usize) {
        self.output
    }
    /// PyTorch's memory layout of the input, which decides the rounding.
    pub fn layout(&self) -> TorchLayout {
        self.layout
    }
}
