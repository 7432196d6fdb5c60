//! `torch.mean(x, dims, keepdim)` on a `quint8` tensor, as PyTorch computes it: the
//! output keeps the input's scale and zero point, and the arithmetic depends on the
//! memory format (`aten/src/ATen/native/quantized/cpu/ReduceOps.cpp`):
//!
//! * a contiguous (NCHW) tensor reduced over its innermost dimensions takes the integer
//!   fast path (`qmean_inner_dim_kernel`): `y = nearbyint(float(sum of q) / n)` with the
//!   sum exact in `i64` and one `f32` division;
//! * anything else (a `channels_last` tensor, which is what fbgemm's convolutions return,
//!   or dimensions that are not innermost) is dequantized (`(q - zp) * scale` in `f32`),
//!   averaged in `f32` (summed in memory order, then divided by `n`) and quantized again
//!   with the input's scale and zero point.
//!
//! A 4-D `channels_last` tensor with one channel or a 1x1 image is also contiguous, so it
//! takes the integer path, as in PyTorch.
//!
//! Bit-exact with PyTorch 2.15.0 over the innermost dimensions (`x.mean([2, 3])`, `[3]`,
//! `[1, 2, 3]`, in either memory format; `tests/int8_mean.rs`). Over other dimensions
//! (the channels) ATen's float sum adds in another order: rarely one step off (7 of 370
//! fixture values), so graphs keep those means in float.

use ndarray::{ArrayD, Axis, IxDyn};

use super::{QTensor, TorchLayout};
use crate::error::{QuantError, Result};
use crate::qparams::{dequantize_val, quantize_val};

/// Int8 `torch.mean` over `dims`.
///
/// # Examples
/// ```
/// use ndarray::{ArrayD, IxDyn};
/// use ptq::nn::quantized::{QMean, QTensor, TorchLayout};
/// let x = QTensor::new(ArrayD::from_shape_vec(IxDyn(&[1, 2, 1, 2]), vec![1u8, 2, 10, 13]).unwrap(), 0.1, 0)?;
/// let m = QMean::new(&[2, 3], false)?;
/// let y = m.forward(&x, TorchLayout::Contiguous)?;
/// assert_eq!(y.data().as_slice().unwrap(), &[2, 12]); // 1.5 -> 2, 11.5 -> 12 (ties to even)
/// assert_eq!((y.scale(), y.zero_point()), (0.1, 0));
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QMean {
    dims: Vec<usize>,
    keepdim: bool,
}

impl QMean {
    /// A mean over `dims` (strictly ascending, non-empty), keeping them as size 1 when
    /// `keepdim`.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for empty or unsorted `dims`.
    pub fn new(dims: &[usize], keepdim: bool) -> Result<Self> {
        if dims.is_empty() || dims.windows(2).any(|w| w[0] >= w[1]) {
            return Err(QuantError::UnsupportedConfig {
                context: "QMean".into(),
                reason: format!("mean dims {dims:?} must be non-empty and strictly ascending"),
            });
        }
        Ok(QMean {
            dims: dims.to_vec(),
            keepdim,
        })
    }

    /// The reduced dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Whether reduced dimensions are kept with size 1.
    pub fn keepdim(&self) -> bool {
        self.keepdim
    }

    /// Whether PyTorch takes the integer path for `x` held in `layout`.
    fn integer_path(&self, shape: &[usize], layout: TorchLayout) -> bool {
        let r = shape.len();
        let contiguous = r != 4
            || layout == TorchLayout::Contiguous
            || shape[1] == 1
            || shape[2] * shape[3] == 1;
        let innermost = self
            .dims
            .iter()
            .rev()
            .enumerate()
            .all(|(k, &d)| d + k + 1 == r);
        contiguous && innermost
    }

    /// The memory format of the output (what the next op sees).
    pub fn output_layout(&self, shape: &[usize], layout: TorchLayout) -> TorchLayout {
        if shape.len() == 4 && self.keepdim && !self.integer_path(shape, layout) {
            layout
        } else {
            TorchLayout::Contiguous
        }
    }

    /// The mean of `x` (logical order, e.g. NCHW), held by PyTorch in `layout`.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] naming the shape if a dimension is out of range or the
    /// reduced dimensions hold no element.
    pub fn forward(&self, x: &QTensor, layout: TorchLayout) -> Result<QTensor> {
        let shape = x.data().shape().to_vec();
        let r = shape.len();
        if self.dims.last().is_some_and(|&d| d >= r) {
            return Err(QuantError::ShapeMismatch {
                context: "QMean".into(),
                expected: format!("a tensor with dimensions {:?}", self.dims),
                actual: format!("shape {shape:?}"),
            });
        }
        let n: usize = self.dims.iter().map(|&d| shape[d]).product();
        if n == 0 {
            return Err(QuantError::ShapeMismatch {
                context: "QMean".into(),
                expected: format!("non-empty dimensions {:?} to average", self.dims),
                actual: format!("shape {shape:?}"),
            });
        }
        // Kept axes first, reduced axes last (both in order): each output element's
        // inputs are then one contiguous run, in memory order for either path.
        let kept: Vec<usize> = (0..r).filter(|d| !self.dims.contains(d)).collect();
        let order: Vec<usize> = kept.iter().chain(&self.dims).copied().collect();
        let moved = x.data().view().permuted_axes(IxDyn(&order));
        let values: Vec<u8> = moved.iter().copied().collect();
        let out_kept: Vec<usize> = kept.iter().map(|&d| shape[d]).collect();
        let (scale, zp) = (x.scale(), x.zero_point());
        let means: Vec<u8> = if self.integer_path(&shape, layout) {
            values
                .chunks_exact(n)
                .map(|run| {
                    let sum: i64 = run.iter().map(|&q| i64::from(q)).sum();
                    let y = (sum as f32 / n as f32).round_ties_even();
                    y.clamp(0.0, 255.0) as u8
                })
                .collect()
        } else {
            values
                .chunks_exact(n)
                .map(|run| {
                    let sum = run
                        .iter()
                        .fold(0.0f32, |a, &q| a + dequantize_val(i32::from(q), scale, zp));
                    quantize_val(sum / n as f32, scale, zp, 0, 255) as u8
                })
                .collect()
        };
        let mut y = ArrayD::from_shape_vec(IxDyn(&out_kept), means).map_err(|e| {
            QuantError::ShapeMismatch {
                context: "QMean".into(),
                expected: format!("an output of shape {out_kept:?}"),
                actual: e.to_string(),
            }
        })?;
        if self.keepdim {
            for &d in &self.dims {
                y = y.insert_axis(Axis(d));
            }
        }
        QTensor::new(y, scale, zp)
    }
}
