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
        self.run(x, false)
    }

    /// As [`forward`](Self::forward) on a tensor held `[n, h, w, c]` (the result too): the
    /// same values, element for element, without transposes.
    ///
    /// # Errors
    /// As [`forward`](Self::forward), for the NHWC shape.
    pub fn forward_nhwc(&self, x: &QTensor) -> Result<QTensor> {
        self.run(x, true)
    }

    fn run(&self, x: &QTensor, held_nhwc: bool) -> Result<QTensor> {
        let (_, c1, _, c3) = dims4(x, NAME)?;
        let (c, ch_axis) = if held_nhwc { (c3, 3) } else { (c1, 1) };
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
            let ch = idx[ch_axis];
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

const LN: &str = "QLayerNorm";

/// `torch.ao.nn.quantized.LayerNorm` (`torch.ops.quantized.layer_norm`) over the last
/// dimensions, with its own output qparams.
///
/// PyTorch (`quantized_normalize_kernel` in `QuantizedOpKernels.cpp`, AVX2 build) works on
/// the integers of each row of `N` elements (in contiguous order):
/// ```text
/// m   = (float)sum(q) / N;  mean = m - zp                                 (f32)
/// var = max(fma(-m, m, (float)sum(q^2) / N), 0)                           (f32, contracted)
/// k   = (float)(s / sqrt((double)(var * s * s) + eps))
/// y   = fma((q - zp - mean) * k, gamma, beta)                              (f32, contracted)
/// q'  = first N / 32 * 32 elements: vec_quantize(y, 1 / out_scale); the rest quantize_val(y)
/// ```
/// Whether the compiler contracts the two marked expressions into FMAs is not pinned by
/// the fixtures: with and without contraction the outputs agreed with PyTorch on 300
/// random cases (46 k values).
#[derive(Debug, Clone, PartialEq)]
pub struct QLayerNorm {
    normalized_shape: Vec<usize>,
    weight: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    eps: f64,
    out_scale: f32,
    out_zp: i32,
}

impl QLayerNorm {
    /// A layer norm over the trailing `normalized_shape`, with optional elementwise `weight`
    /// and `bias` (flattened, `prod(normalized_shape)` elements each).
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for an empty normalized shape or affine parameters of
    /// the wrong length; [`QuantError::NonFinite`] for NaN or infinite parameters;
    /// [`QuantError::UnsupportedConfig`] for a negative or non-finite `eps`;
    /// [`QuantError::InvalidScale`] / [`QuantError::InvalidZeroPoint`] for bad qparams.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QLayerNorm, QTensor};
    /// let ln = QLayerNorm::new(&[4], None, None, 1e-5, 0.02, 128)?;
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 4], vec![10u8, 20, 30, 40])?, 0.1, 0)?;
    /// let y = ln.forward(&x)?.dequantize();
    /// assert!((y[[0, 0]] + 1.34).abs() < 0.02 && (y[[0, 3]] - 1.34).abs() < 0.02);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(
        normalized_shape: &[usize],
        weight: Option<ArrayView1<'_, f32>>,
        bias: Option<ArrayView1<'_, f32>>,
        eps: f64,
        out_scale: f32,
        out_zp: i32,
    ) -> Result<Self> {
        check_qparams(out_scale, out_zp, LN)?;
        let n: usize = normalized_shape.iter().product();
        if normalized_shape.is_empty() || n == 0 {
            return Err(QuantError::ShapeMismatch {
                context: LN.into(),
                expected: "a non-empty normalized shape".into(),
                actual: format!("{normalized_shape:?}"),
            });
        }
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(QuantError::UnsupportedConfig {
                context: LN.into(),
                reason: format!("eps must be finite and non-negative, got {eps}"),
            });
        }
        let weight = check_vec(weight, n, "weight").map_err(|e| e.in_context(LN))?;
        let bias = check_vec(bias, n, "bias").map_err(|e| e.in_context(LN))?;
        Ok(QLayerNorm {
            normalized_shape: normalized_shape.to_vec(),
            weight,
            bias,
            eps,
            out_scale,
            out_zp,
        })
    }

    /// The normalized (trailing) shape.
    pub fn normalized_shape(&self) -> &[usize] {
        &self.normalized_shape
    }

    /// The elementwise weight and bias, if any.
    pub fn affine(&self) -> (Option<&[f32]>, Option<&[f32]>) {
        (self.weight.as_deref(), self.bias.as_deref())
    }

    /// The epsilon.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The output scale and zero point.
    pub fn output_qparams(&self) -> (f32, i32) {
        (self.out_scale, self.out_zp)
    }

    /// Normalizes each row of the trailing `normalized_shape` elements.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] when the input's trailing dimensions differ from the
    /// normalized shape.
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        let shape = x.data().shape();
        let k = self.normalized_shape.len();
        if shape.len() < k || shape[shape.len() - k..] != self.normalized_shape[..] {
            return Err(QuantError::ShapeMismatch {
                context: LN.into(),
                expected: format!("trailing dimensions {:?}", self.normalized_shape),
                actual: format!("shape {shape:?}"),
            });
        }
        let n: usize = self.normalized_shape.iter().product();
        let (s, zp) = (x.scale(), x.zero_point());
        let zpf = zp as f32;
        let (so, zo) = (self.out_scale, self.out_zp);
        let inv = 1.0f32 / so;
        let nv = n / 32 * 32;
        let mut out = x.data().as_standard_layout().into_owned();
        let Some(data) = out.as_slice_mut() else {
            return Err(QuantError::ShapeMismatch {
                context: LN.into(),
                expected: "a standard-layout tensor".into(),
                actual: format!("shape {shape:?}"),
            });
        };
        for row in data.chunks_mut(n) {
            let sum: i64 = row.iter().map(|&q| q as i64).sum();
            let sum_sq: i64 = row.iter().map(|&q| (q as i64) * (q as i64)).sum();
            let m = sum as f32 / n as f32;
            let mean = m - zpf;
            let var = (-m).mul_add(m, sum_sq as f32 / n as f32).max(0.0);
            let k = (s as f64 / ((var * s * s) as f64 + self.eps).sqrt()) as f32;
            for (i, q) in row.iter_mut().enumerate() {
                let g = self.weight.as_ref().map_or(1.0, |w| w[i]);
                let b = self.bias.as_ref().map_or(0.0, |b| b[i]);
                let y = ((*q as f32 - zpf - mean) * k).mul_add(g, b);
                *q = if i < nv {
                    vec_quantize(y, inv, zo)
                } else {
                    super::elementwise::scalar_quantize(y, so, zo)
                };
            }
        }
        QTensor::new(out, so, zo)
    }
}
