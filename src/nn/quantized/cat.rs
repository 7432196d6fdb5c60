//! Quantized concatenation.

use ndarray::{ArrayD, Axis};

use super::elementwise::{dequant_fma, dequant_sub, scalar_quantize, strides_of, vec_quantize};
use super::tensor::check_qparams;
use super::{QTensor, TorchLayout};
use crate::error::{QuantError, Result};

const NAME: &str = "QCat";

/// `torch.ops.quantized.cat` / `cat_relu` (what `QFunctional.cat` runs after conversion):
/// concatenates along `dim` and requantizes every input to the output's qparams.
///
/// PyTorch (`quantized_cat_impl` in `aten/src/ATen/native/quantized/cpu/qconcat.cpp`) has
/// two paths:
/// * `dim == 1` and every input a channels-last rank-4 tensor (`qcat_nhwc_kernel` in
///   `QuantizedOpKernels.cpp`, AVX2 build): per pixel and input, a plain copy when the input
///   already has the output's scale and zero point (and no ReLU); otherwise the first
///   `C / 32 * 32` channels, then `(C % 32) / 8 * 8` more, go through the vector path
///   `vec_quantize(max?(fma(s, q, s * -zp), 0))` with `inverse_scale = (float)(1.0 / out_scale)`,
///   and the last `C % 8` through the scalar path `quantize_val(max?((q - zp) * s, 0))`;
/// * anything else: `dequantize` each input (`(q - zp) * s`), `at::cat` in float, then
///   `quantize_per_tensor` with the output's qparams, and `max(q, zp)` for `cat_relu`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QCat {
    dim: usize,
    out_scale: f32,
    out_zp: i32,
    relu: bool,
    layout: TorchLayout,
}

/// Whether a rank-4 tensor of `shape` held in `layout` is channels-last contiguous in
/// PyTorch's sense (strides of size-1 dimensions do not count).
fn is_channels_last(shape: &[usize], layout: TorchLayout) -> bool {
    if shape.len() != 4 {
        return false;
    }
    let own = strides_of(shape, layout);
    let cl = strides_of(shape, TorchLayout::ChannelsLast);
    (0..4).all(|d| shape[d] == 1 || own[d] == cl[d])
}

impl QCat {
    /// A concatenation along `dim` whose result is quantized with `out_scale` and `out_zp`,
    /// for inputs in PyTorch's channels-last layout (what fbgemm convolutions return).
    ///
    /// # Errors
    /// [`QuantError::InvalidScale`] / [`QuantError::InvalidZeroPoint`] for bad qparams.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QCat, QTensor};
    /// let cat = QCat::new(1, 0.1, 0)?;
    /// let a = QTensor::new(ArrayD::from_elem(vec![1, 2, 3, 3], 10u8), 0.1, 0)?; // 1.0
    /// let b = QTensor::new(ArrayD::from_elem(vec![1, 5, 3, 3], 10u8), 0.2, 0)?; // 2.0
    /// let y = cat.forward(&[&a, &b])?;
    /// assert_eq!(y.data().shape(), &[1, 7, 3, 3]);
    /// assert_eq!((y.data()[[0, 0, 0, 0]], y.data()[[0, 6, 2, 2]]), (10, 20));
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(dim: usize, out_scale: f32, out_zp: i32) -> Result<Self> {
        check_qparams(out_scale, out_zp, NAME)?;
        Ok(QCat {
            dim,
            out_scale,
            out_zp,
            relu: false,
            layout: TorchLayout::ChannelsLast,
        })
    }

    /// Fuses a ReLU (`quantized::cat_relu`).
    pub fn with_relu(mut self) -> Self {
        self.relu = true;
        self
    }

    /// Sets the memory layout PyTorch holds the inputs in (rank-4 tensors only).
    pub fn with_layout(mut self, layout: TorchLayout) -> Self {
        self.layout = layout;
        self
    }

    /// The concatenation dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The output scale and zero point.
    pub fn output_qparams(&self) -> (f32, i32) {
        (self.out_scale, self.out_zp)
    }

    /// Whether a ReLU is fused into the concatenation.
    pub fn is_relu(&self) -> bool {
        self.relu
    }

    /// PyTorch's memory layout of the inputs.
    pub fn layout(&self) -> TorchLayout {
        self.layout
    }

    /// Concatenates `inputs` along the dimension given at construction.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for no input, a dimension past the rank, or inputs whose
    /// ranks or other dimensions differ (naming the shapes).
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QCat, QTensor};
    /// let a = QTensor::new(ArrayD::from_elem(vec![1, 2, 3, 3], 10u8), 0.1, 0)?;
    /// let b = QTensor::new(ArrayD::from_elem(vec![1, 2, 4, 3], 10u8), 0.1, 0)?;
    /// assert!(QCat::new(1, 0.1, 0)?.forward(&[&a, &b]).is_err());
    /// assert!(QCat::new(1, 0.1, 0)?.forward(&[]).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn forward(&self, inputs: &[&QTensor]) -> Result<QTensor> {
        self.run(inputs, false)
    }

    /// As [`forward`](Self::forward) on rank-4 tensors held `[n, h, w, c]` (the result
    /// too; the dimension given at construction is still the logical NCHW one): the same
    /// values, element for element, without transposes.
    ///
    /// # Errors
    /// As [`forward`](Self::forward), and [`QuantError::ShapeMismatch`] for an input that
    /// is not rank 4.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QCat, QTensor};
    /// let a = QTensor::new(ArrayD::from_elem(vec![1, 3, 3, 2], 10u8), 0.1, 0)?; // NHWC
    /// let b = QTensor::new(ArrayD::from_elem(vec![1, 3, 3, 5], 10u8), 0.2, 0)?;
    /// let y = QCat::new(1, 0.1, 0)?.forward_nhwc(&[&a, &b])?;
    /// assert_eq!(y.data().shape(), &[1, 3, 3, 7]);
    /// assert_eq!((y.data()[[0, 0, 0, 0]], y.data()[[0, 2, 2, 6]]), (10, 20));
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn forward_nhwc(&self, inputs: &[&QTensor]) -> Result<QTensor> {
        for t in inputs {
            super::tensor::dims4(t, NAME)?;
        }
        self.run(inputs, true)
    }

    fn run(&self, inputs: &[&QTensor], held_nhwc: bool) -> Result<QTensor> {
        let first = inputs.first().ok_or_else(|| QuantError::ShapeMismatch {
            context: NAME.into(),
            expected: "at least one input".into(),
            actual: "none".into(),
        })?;
        let s0 = first.data().shape();
        if self.dim >= s0.len() {
            return Err(QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: format!("a dimension below the rank of {s0:?}"),
                actual: format!("dim {}", self.dim),
            });
        }
        let axis = if held_nhwc {
            [0, 3, 1, 2][self.dim]
        } else {
            self.dim
        };
        for t in inputs {
            let s = t.data().shape();
            let ok = s.len() == s0.len() && (0..s.len()).all(|d| d == axis || s[d] == s0[d]);
            if !ok {
                return Err(QuantError::ShapeMismatch {
                    context: NAME.into(),
                    expected: format!("inputs equal to {s0:?} except in dimension {}", self.dim),
                    actual: format!("{s:?}"),
                });
            }
        }
        // The logical (NCHW) shape of an input and the axis of the held data.
        let logical = |s: &[usize]| -> Vec<usize> {
            if held_nhwc {
                vec![s[0], s[3], s[1], s[2]]
            } else {
                s.to_vec()
            }
        };
        let fast = self.dim == 1
            && inputs
                .iter()
                .all(|t| is_channels_last(&logical(t.data().shape()), self.layout));
        let parts: Vec<ArrayD<u8>> = if fast {
            inputs
                .iter()
                .map(|t| self.nhwc_part(t, if held_nhwc { 3 } else { 1 }))
                .collect()
        } else {
            let zp = self.out_zp.clamp(0, 255) as u8;
            inputs
                .iter()
                .map(|t| {
                    let q = crate::qparams::quantize_to_u8(
                        &t.dequantize(),
                        self.out_scale,
                        self.out_zp,
                    );
                    if self.relu {
                        q.mapv(|v| v.max(zp))
                    } else {
                        q
                    }
                })
                .collect()
        };
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        let data =
            ndarray::concatenate(Axis(axis), &views).map_err(|e| QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: "inputs that concatenate".into(),
                actual: e.to_string(),
            })?;
        QTensor::new(data, self.out_scale, self.out_zp)
    }

    /// One input requantized the way `qcat_nhwc_kernel` does it; `ch_axis` is the axis
    /// of the channels in the data as held.
    fn nhwc_part(&self, t: &QTensor, ch_axis: usize) -> ArrayD<u8> {
        let (s, zp) = (t.scale(), t.zero_point());
        if s == self.out_scale && zp == self.out_zp && !self.relu {
            return t.data().clone();
        }
        let c = t.data().shape()[ch_axis];
        let v32 = c / 32 * 32;
        let rem = c - v32;
        let vec_end = if rem >= 8 { v32 + rem / 8 * 8 } else { v32 };
        let premul = s * -(zp as f32);
        let inv = (1.0f64 / self.out_scale as f64) as f32;
        let (so, zo, relu) = (self.out_scale, self.out_zp, self.relu);
        let mut out = t.data().clone();
        for (idx, q) in out.indexed_iter_mut() {
            let ch = idx[ch_axis];
            *q = if ch < vec_end {
                let mut d = dequant_fma(*q, s, premul);
                if relu {
                    d = d.max(0.0);
                }
                vec_quantize(d, inv, zo)
            } else {
                let mut d = dequant_sub(*q, s, zp);
                if relu {
                    d = d.max(0.0);
                }
                scalar_quantize(d, so, zo)
            };
        }
        out
    }
}
