//! Quantized nearest-neighbour upsampling.

use ndarray::{ArrayD, IxDyn};

use super::tensor::dims4;
use super::QTensor;
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

    /// Upsamples an NCHW tensor; the output keeps the input's qparams.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for an input that is not rank 4 or has an empty
    /// spatial size, or an empty output.
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        let (b, c, h, w) = dims4(x, NAME)?;
        if h == 0 || w == 0 {
            return Err(QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: "a non-empty spatial size".into(),
                actual: format!("shape {:?}", x.data().shape()),
            });
        }
        let (oh, ow) = self.output_size(h, w)?;
        let (fh, fw) = match self.size {
            UpsampleSize::Scale(sh, sw) => (Some(sh), Some(sw)),
            UpsampleSize::Size(..) => (None, None),
        };
        let hi = self.indices(h, oh, fh);
        let wi = self.indices(w, ow, fw);
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
}
