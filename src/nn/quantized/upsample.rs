//! Quantized nearest-neighbour upsampling.

use ndarray::{ArrayD, IxDyn};

use super::elementwise::{scalar_quantize, vec_quantize};
use super::tensor::{check_nonempty, dims4};
use super::{QTensor, TorchLayout};
use crate::error::{QuantError, Result};

const NAME: &str = "QUpsampleNearest2d";

/// How the output size is given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpsampleSize {
    /// A fixed `(height, width)`.
    Size(usize, usize),
    /// Scale factors `(height, width)`; the output size is `floor(input * factor)`.
    Scale(f64, f64),
}

/// `torch.ao.nn.quantized.functional.interpolate(mode="nearest")` /
/// `upsample_nearest2d` on a quint8 tensor: a pure gather, output qparams are the input's.
///
/// PyTorch (`aten/src/ATen/native/quantized/cpu/UpSampleNearest2d.cpp`, both layouts):
/// `src = min(floor(dst * scale), in - 1)` in `f32`, where `scale = (float)(1.0 / factor)`
/// when a scale factor was given and `(float)in / out` otherwise (`compute_scales_value`);
/// `nearest-exact` (`_upsample_nearest_exact2d`) uses `floor((dst + 0.5) * scale)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QUpsampleNearest2d {
    size: UpsampleSize,
    exact: bool,
}

impl QUpsampleNearest2d {
    /// Upsampling to `size`.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for a zero size or a scale factor that is not
    /// finite and positive.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QTensor, QUpsampleNearest2d, UpsampleSize};
    /// let up = QUpsampleNearest2d::new(UpsampleSize::Scale(2.0, 2.0))?;
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 1, 1, 2], vec![3u8, 9])?, 0.1, 0)?;
    /// let y = up.forward(&x)?;
    /// assert_eq!(y.data().as_slice().unwrap(), &[3, 3, 9, 9, 3, 3, 9, 9]);
    /// assert!(QUpsampleNearest2d::new(UpsampleSize::Size(0, 4)).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(size: UpsampleSize) -> Result<Self> {
        match size {
            UpsampleSize::Size(h, w) if h == 0 || w == 0 => Err(QuantError::UnsupportedConfig {
                context: NAME.into(),
                reason: format!("output size ({h}, {w}) must be positive"),
            }),
            UpsampleSize::Scale(h, w)
                if !(h.is_finite() && h > 0.0 && w.is_finite() && w > 0.0) =>
            {
                Err(QuantError::UnsupportedConfig {
                    context: NAME.into(),
                    reason: format!("scale factors ({h}, {w}) must be finite and positive"),
                })
            }
            _ => Ok(QUpsampleNearest2d { size, exact: false }),
        }
    }

    /// Uses `mode="nearest-exact"` (pixel centres) instead of PyTorch's legacy `nearest`.
    pub fn with_exact(mut self) -> Self {
        self.exact = true;
        self
    }

    /// The requested size or scale factors.
    pub fn size(&self) -> UpsampleSize {
        self.size
    }

    /// Whether the mode is `nearest-exact`.
    pub fn is_exact(&self) -> bool {
        self.exact
    }

    /// The output `(height, width)` for an input of `(h, w)`.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] when a scale factor gives an empty output.
    pub fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (oh, ow) = match self.size {
            UpsampleSize::Size(oh, ow) => (oh, ow),
            UpsampleSize::Scale(sh, sw) => ((h as f64 * sh) as usize, (w as f64 * sw) as usize),
        };
        if oh == 0 || ow == 0 {
            return Err(QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: "a non-empty output".into(),
                actual: format!("input ({h}, {w}) gives output ({oh}, {ow})"),
            });
        }
        Ok((oh, ow))
    }

    /// Source index for each output index along one axis.
    fn indices(&self, input: usize, output: usize, factor: Option<f64>) -> Vec<usize> {
        let scale = match factor {
            Some(f) if f > 0.0 => (1.0 / f) as f32,
            _ => input as f32 / output as f32,
        };
        (0..output)
            .map(|d| {
                let src = if self.exact {
                    ((d as f32 + 0.5) * scale).floor()
                } else {
                    (d as f32 * scale).floor()
                };
                (src as usize).min(input - 1)
            })
            .collect()
    }

    /// The output size and, for each output row and column, its source row and column.
    fn source_rows_cols(
        &self,
        h: usize,
        w: usize,
    ) -> Result<(usize, usize, Vec<usize>, Vec<usize>)> {
        let (oh, ow) = self.output_size(h, w)?;
        let (fh, fw) = match self.size {
            UpsampleSize::Scale(sh, sw) => (Some(sh), Some(sw)),
            UpsampleSize::Size(..) => (None, None),
        };
        Ok((oh, ow, self.indices(h, oh, fh), self.indices(w, ow, fw)))
    }

    /// Upsamples an NCHW tensor; the output keeps the input's qparams.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for an input that is not rank 4 or has an empty
    /// spatial size, or an empty output.
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        let (b, c, h, w) = dims4(x, NAME)?;
        check_nonempty(h, w, x.data().shape(), NAME)?;
        let (oh, ow, hi, wi) = self.source_rows_cols(h, w)?;
        let src = x.data().as_standard_layout();
        let src = src.as_slice().unwrap_or(&[]);
        let mut out = Vec::with_capacity(b * c * oh * ow);
        for plane in 0..b * c {
            let p = &src[plane * h * w..(plane + 1) * h * w];
            for &sy in &hi {
                let row = &p[sy * w..(sy + 1) * w];
                out.extend(wi.iter().map(|&sx| row[sx]));
            }
        }
        let shape = [b, c, oh, ow];
        let data =
            ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: format!("{shape:?}"),
                actual: e.to_string(),
            })?;
        QTensor::new(data, x.scale(), x.zero_point())
    }

    /// As [`forward`](Self::forward) on a tensor held `[n, h, w, c]` (the result too): the
    /// same values, each output pixel a copy of its source pixel's channels.
    ///
    /// # Errors
    /// As [`forward`](Self::forward), for the NHWC shape.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QTensor, QUpsampleNearest2d, UpsampleSize};
    /// let up = QUpsampleNearest2d::new(UpsampleSize::Scale(2.0, 2.0))?;
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 1, 1, 2], vec![3u8, 7])?, 0.1, 0)?;
    /// let y = up.forward_nhwc(&x)?;
    /// assert_eq!(y.data().shape(), &[1, 2, 2, 2]);
    /// assert_eq!(y.data().as_slice().unwrap(), &[3, 7, 3, 7, 3, 7, 3, 7]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_nhwc(&self, x: &QTensor) -> Result<QTensor> {
        let (b, h, w, c) = dims4(x, NAME)?;
        check_nonempty(h, w, x.data().shape(), NAME)?;
        let (oh, ow, hi, wi) = self.source_rows_cols(h, w)?;
        let src = x.data().as_standard_layout();
        let src = src.as_slice().unwrap_or(&[]);
        let mut out = Vec::with_capacity(b * oh * ow * c);
        for img in 0..b {
            let p = &src[img * h * w * c..(img + 1) * h * w * c];
            for &sy in &hi {
                for &sx in &wi {
                    out.extend_from_slice(&p[(sy * w + sx) * c..][..c]);
                }
            }
        }
        let shape = [b, oh, ow, c];
        let data =
            ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: format!("{shape:?}"),
                actual: e.to_string(),
            })?;
        QTensor::new(data, x.scale(), x.zero_point())
    }
}

const BILINEAR: &str = "QUpsampleBilinear2d";

/// Per output index along one axis: source index, offset to the second source (0 or 1),
/// and the two weights.
struct Tap {
    i0: usize,
    step: usize,
    l0: f32,
    l1: f32,
}

/// `torch.ao.nn.quantized.functional.interpolate(mode="bilinear")` /
/// `upsample_bilinear2d` on a quint8 tensor; output qparams are the input's.
///
/// PyTorch interpolates the raw `u8` values and subtracts the zero point once
/// (`aten/src/ATen/native/quantized/cpu/UpSampleBilinear2d.cpp` for NCHW, compiled without
/// FMA; `qupsample_bilinear2d_nhwc_kernel` in `QuantizedOpKernels.cpp` for channels-last,
/// whose AVX2 build the compiler contracts into FMAs):
/// ```text
/// scale  = align_corners ? (in - 1) / (out - 1) : (factor ? (float)(1 / factor) : in / out)
/// src    = align_corners ? scale * dst : max(scale * (dst + 0.5) - 0.5, 0)
/// i0 = (int)src, l1 = src - i0, l0 = 1 - l1, i1 = i0 + (i0 < in - 1)
/// NCHW:  r = h0 * (w0 * p00 + w1 * p01) + h1 * (w0 * p10 + w1 * p11) - zp
/// NHWC:  r = fma(h0, fma(w0, p00, w1 * p01), h1 * fma(w0, p10, w1 * p11)) - zp,
///        src = fma(scale, dst + 0.5, -0.5)
/// q      = clamp(nearbyint(r) + zp, 0, 255)
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QUpsampleBilinear2d {
    size: UpsampleSize,
    align_corners: bool,
    layout: TorchLayout,
}

impl QUpsampleBilinear2d {
    /// Bilinear upsampling to `size`, for channels-last inputs.
    ///
    /// # Errors
    /// As [`QUpsampleNearest2d::new`].
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QTensor, QUpsampleBilinear2d, UpsampleSize};
    /// let up = QUpsampleBilinear2d::new(UpsampleSize::Size(1, 3), true)?;
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 1, 1, 2], vec![10u8, 20])?, 0.1, 0)?;
    /// assert_eq!(up.forward(&x)?.data().as_slice().unwrap(), &[10, 15, 20]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(size: UpsampleSize, align_corners: bool) -> Result<Self> {
        QUpsampleNearest2d::new(size).map_err(|e| e.in_context(BILINEAR))?;
        Ok(QUpsampleBilinear2d {
            size,
            align_corners,
            layout: TorchLayout::ChannelsLast,
        })
    }

    /// Sets the memory layout PyTorch holds the input in, which picks its kernel.
    pub fn with_layout(mut self, layout: TorchLayout) -> Self {
        self.layout = layout;
        self
    }

    /// The requested size or scale factors.
    pub fn size(&self) -> UpsampleSize {
        self.size
    }

    /// Whether corners are aligned.
    pub fn align_corners(&self) -> bool {
        self.align_corners
    }

    /// PyTorch's memory layout of the input.
    pub fn layout(&self) -> TorchLayout {
        self.layout
    }

    fn taps(&self, input: usize, output: usize, factor: Option<f64>, fused: bool) -> Vec<Tap> {
        let scale = if self.align_corners {
            if output > 1 {
                (input - 1) as f32 / (output - 1) as f32
            } else {
                0.0
            }
        } else {
            match factor {
                Some(f) if f > 0.0 => (1.0 / f) as f32,
                _ => input as f32 / output as f32,
            }
        };
        (0..output)
            .map(|d| {
                let src = if self.align_corners {
                    scale * d as f32
                } else {
                    let s = if fused {
                        scale.mul_add(d as f32 + 0.5, -0.5)
                    } else {
                        scale * (d as f32 + 0.5) - 0.5
                    };
                    if s < 0.0 {
                        0.0
                    } else {
                        s
                    }
                };
                let i0 = src as usize;
                let l1 = src - i0 as f32;
                Tap {
                    i0,
                    step: usize::from(i0 + 1 < input),
                    l0: 1.0 - l1,
                    l1,
                }
            })
            .collect()
    }

    /// Upsamples an NCHW tensor; the output keeps the input's qparams.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for an input that is not rank 4 or has an empty
    /// spatial size, or an empty output.
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        let (b, c, h, w) = dims4(x, BILINEAR)?;
        check_nonempty(h, w, x.data().shape(), BILINEAR)?;
        let nearest = QUpsampleNearest2d {
            size: self.size,
            exact: false,
        };
        let (oh, ow) = nearest
            .output_size(h, w)
            .map_err(|e| e.in_context(BILINEAR))?;
        let (fh, fw) = match self.size {
            UpsampleSize::Scale(sh, sw) => (Some(sh), Some(sw)),
            UpsampleSize::Size(..) => (None, None),
        };
        let nhwc = self.layout == TorchLayout::ChannelsLast || c == 1 || (h == 1 && w == 1);
        let th = self.taps(h, oh, fh, nhwc);
        let tw = self.taps(w, ow, fw, nhwc);
        let zp = x.zero_point();
        let zpf = zp as f32;
        let vec_c = c / 8 * 8;
        let src = x.data().as_standard_layout();
        let src = src.as_slice().unwrap_or(&[]);
        let copy = !nhwc && oh == h && ow == w;
        let mut out = Vec::with_capacity(b * c * oh * ow);
        for plane in 0..b * c {
            let ch = plane % c;
            let p = &src[plane * h * w..(plane + 1) * h * w];
            if copy {
                out.extend_from_slice(p);
                continue;
            }
            for ty in &th {
                let r0 = &p[ty.i0 * w..(ty.i0 + 1) * w];
                let r1 = &p[(ty.i0 + ty.step) * w..(ty.i0 + ty.step + 1) * w];
                for tx in &tw {
                    let (p00, p01) = (r0[tx.i0] as f32, r0[tx.i0 + tx.step] as f32);
                    let (p10, p11) = (r1[tx.i0] as f32, r1[tx.i0 + tx.step] as f32);
                    let q = if nhwc && ch < vec_c {
                        // Vectorized<float> operators: arguments evaluated right to left
                        let a = tx.l1.mul_add(p01, tx.l0 * p00);
                        let bb = tx.l1.mul_add(p11, tx.l0 * p10);
                        vec_quantize(ty.l1.mul_add(bb, ty.l0 * a) - zpf, 1.0, zp)
                    } else if nhwc {
                        let a = tx.l0.mul_add(p00, tx.l1 * p01);
                        let bb = tx.l0.mul_add(p10, tx.l1 * p11);
                        scalar_quantize(ty.l0.mul_add(a, ty.l1 * bb) - zpf, 1.0, zp)
                    } else {
                        let r = ty.l0 * (tx.l0 * p00 + tx.l1 * p01)
                            + ty.l1 * (tx.l0 * p10 + tx.l1 * p11)
                            - zpf;
                        scalar_quantize(r, 1.0, zp)
                    };
                    out.push(q);
                }
            }
        }
        let shape = [b, c, oh, ow];
        let data =
            ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| QuantError::ShapeMismatch {
                context: BILINEAR.into(),
                expected: format!("{shape:?}"),
                actual: e.to_string(),
            })?;
        QTensor::new(data, x.scale(), x.zero_point())
    }
}
