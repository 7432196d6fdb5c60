//! Quantized batch normalization (for batch norms left unfused).

use ndarray::ArrayView1;

use super::elementwise::vec_quantize;
use super::tensor::{check_qparams, dims4};
use super::QTensor;
use crate::error::{QuantError, Result};

const NAME: &str = "QBatchNorm2d";

/// `torch.ao.nn.quantized.BatchNorm2d` (`torch.ops.quantized.batch_norm2d`, and
/// `batch_norm2d_relu` for `BNReLU2d`) with its own output qparams.
///
/// PyTorch (`aten/src/ATen/native/quantized/cpu/qbatch_norm.cpp` and `q_batch_norm_kernel`
/// in `QuantizedOpKernels.cpp`, AVX2 build) folds the statistics per channel once:
/// ```text
/// inv_sigma = 1 / sqrtf(var + (float)eps)                                    (f32)
/// alpha     = (float)((double)(inv_sigma * weight) * ((double)in_scale / (double)out_scale))
/// beta      = (float)((double)(bias - mean * inv_sigma * weight) / (double)out_scale)
/// ```
/// then, per pixel over the channels (channels-last order whatever the input layout), runs
/// the first `C / 32 * 32` and then `(C % 32) / 8 * 8` channels on the vector path
/// `clamp(cvtps2dq(fma(alpha, q - in_zp, beta)) + out_zp, 0, 255)` and the last `C % 8`
/// on the scalar path `clamp(out_zp + lrintf(alpha * (q - in_zp) + beta))` (contracted to
/// the same FMA by the compiler); ReLU clamps at `out_zp`.
#[derive(Debug, Clone, PartialEq)]
pub struct QBatchNorm2d {
    weight: Vec<f32>,
    bias: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
    eps: f64,
    out_scale: f32,
    out_zp: i32,
    relu: bool,
}

fn check_vec(v: Option<ArrayView1<'_, f32>>, c: usize, what: &str) -> Result<Option<Vec<f32>>> {
    let Some(v) = v else { return Ok(None) };
    if v.len() != c {
        return Err(QuantError::ShapeMismatch {
            context: NAME.into(),
            expected: format!("{what} of {c} elements"),
            actual: format!("{what} of {} elements", v.len()),
        });
    }
    let nan = v.iter().filter(|x| x.is_nan()).count();
    let inf = v.iter().filter(|x| x.is_infinite()).count();
    if nan + inf > 0 {
        return Err(QuantError::NonFinite {
            context: format!("{NAME}.{what}"),
            nan,
            inf,
            total: c,
        });
    }
    Ok(Some(v.to_vec()))
}

impl QBatchNorm2d {
    /// A batch norm over `mean.len()` channels with the running statistics, optional affine
    /// `weight` / `bias` (PyTorch's defaults 1 and 0), `eps`, and the output qparams.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] when the lengths differ; [`QuantError::NonFinite`] for
    /// NaN or infinite parameters; [`QuantError::UnsupportedConfig`] for a negative
    /// variance or a non-positive `var + eps`; [`QuantError::InvalidScale`] /
    /// [`QuantError::InvalidZeroPoint`] for bad output qparams.
    ///
    /// # Examples
    /// ```
    /// use ndarray::{array, ArrayD};
    /// use ptq::nn::quantized::{QBatchNorm2d, QTensor};
    /// let (mean, var) = (array![1.0f32, 0.0], array![4.0f32, 1.0]);
    /// let bn = QBatchNorm2d::new(None, None, mean.view(), var.view(), 0.0, 0.1, 128)?;
    /// let x = QTensor::new(ArrayD::from_elem(vec![1, 2, 1, 1], 30u8), 0.1, 0)?; // 3.0
    /// let y = bn.forward(&x)?;
    /// assert_eq!(y.data().as_slice().unwrap(), &[138, 158]); // 1.0 and 3.0
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(
        weight: Option<ArrayView1<'_, f32>>,
        bias: Option<ArrayView1<'_, f32>>,
        mean: ArrayView1<'_, f32>,
        var: ArrayView1<'_, f32>,
        eps: f64,
        out_scale: f32,
        out_zp: i32,
    ) -> Result<Self> {
        check_qparams(out_scale, out_zp, NAME)?;
        let c = mean.len();
        let mean = check_vec(Some(mean), c, "running_mean")?.unwrap_or_default();
        let var = check_vec(Some(var), c, "running_var")?.unwrap_or_default();
        let weight = check_vec(weight, c, "weight")?.unwrap_or_else(|| vec![1.0; c]);
        let bias = check_vec(bias, c, "bias")?.unwrap_or_else(|| vec![0.0; c]);
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(QuantError::UnsupportedConfig {
                context: NAME.into(),
                reason: format!("eps must be finite and non-negative, got {eps}"),
            });
        }
        if let Some((i, v)) = var
            .iter()
            .enumerate()
            .find(|(_, &v)| v < 0.0 || v + eps as f32 <= 0.0)
        {
            return Err(QuantError::UnsupportedConfig {
                context: NAME.into(),
                reason: format!(
                    "running_var[{i}] = {v} with eps {eps}: var + eps must be positive"
                ),
            });
        }
        Ok(QBatchNorm2d {
            weight,
            bias,
            mean,
            var,
            eps,
            out_scale,
            out_zp,
            relu: false,
        })
    }

    /// Fuses a ReLU (`quantized::batch_norm2d_relu`, `BNReLU2d`).
    pub fn with_relu(mut self) -> Self {
        self.relu = true;
        self
    }

    /// The number of channels.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// `(weight, bias, running_mean, running_var)`.
    pub fn params(&self) -> (&[f32], &[f32], &[f32], &[f32]) {
        (&self.weight, &self.bias, &self.mean, &self.var)
    }

    /// The epsilon.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The output scale and zero point.
    pub fn output_qparams(&self) -> (f32, i32) {
        (self.out_scale, self.out_zp)
    }

    /// Whether a ReLU is fused.
    pub fn is_relu(&self) -> bool {
        self.relu
    }

    /// PyTorch's folded `(alpha, beta)` per channel for an input scale.
    pub fn folded(&self, in_scale: f32) -> (Vec<f32>, Vec<f32>) {
        let ratio = in_scale as f64 / self.out_scale as f64;
        let eps = self.eps as f32;
        (0..self.channels())
            .map(|c| {
                let inv_sigma = (1.0f64 / (self.var[c] + eps).sqrt() as f64) as f32;
                let w = self.weight[c];
                let alpha = ((inv_sigma * w) as f64 * ratio) as f32;
                let beta = ((self.bias[c] - self.mean[c] * inv_sigma * w) as f64
                    / self.out_scale as f64) as f32;
                (alpha, beta)
            })
            .unzip()
    }

    /// Normalizes an NCHW tensor.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for an input that is not rank 4 or whose channel count
    /// differs.
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        let (_, c, _, _) = dims4(x, NAME)?;
        if c != self.channels() {
            return Err(QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: format!("{} channels", self.channels()),
                actual: format!("shape {:?}", x.data().shape()),
            });
        }
        let (alpha, beta) = self.folded(x.scale());
        let v32 = c / 32 * 32;
        let rem = c - v32;
        let vec_end = if rem >= 8 { v32 + rem / 8 * 8 } else { v32 };
        let (zi, zo) = (x.zero_point(), self.out_zp);
        let lo = if self.relu { zo.clamp(0, 255) as u8 } else { 0 };
        let mut out = x.data().as_standard_layout().into_owned();
        for (idx, q) in out.indexed_iter_mut() {
            let ch = idx[1];
            let d = (*q as i32 - zi) as f32;
            let y = alpha[ch].mul_add(d, beta[ch]);
            let v = if ch < vec_end {
                vec_quantize(y, 1.0, zo)
            } else {
                let r = if y.is_nan() || !(-9.223372e18f32..9.223372e18f32).contains(&y) {
                    i64::MIN
                } else {
                    y.round_ties_even() as i64
                };
                r.saturating_add(zo as i64).clamp(0, 255) as u8
            };
            *q = v.max(lo);
        }
        QTensor::new(out, self.out_scale, self.out_zp)
    }
}
