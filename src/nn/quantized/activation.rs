//! Quantized activations whose output is a function of the `u8` input alone: each runs as a
//! 256-entry table built from PyTorch's exact float arithmetic.
//!
//! PyTorch's kernels (`aten/src/ATen/native/quantized/cpu/kernels/QuantizedOpKernels.cpp`,
//! AVX2 build) have a vector lambda and a scalar lambda that round differently (see
//! `elementwise.rs`), so each op builds two tables: the vector one for the elements PyTorch
//! runs in blocks of 64, the scalar one for each row's tail.

use super::elementwise::{dequant_fma, dequant_sub, scalar_quantize, vec_quantize, vector_mask_in};
use super::tensor::check_qparams;
use super::tensor::dims4;
use super::{QTensor, TorchLayout};
use crate::error::{QuantError, Result};

/// The two 256-entry tables of an activation: `vector[q]` for elements on PyTorch's
/// vectorized path, `scalar[q]` for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActTables {
    /// The output for each input value on the vectorized path.
    pub vector: [u8; 256],
    /// The output for each input value on the scalar path.
    pub scalar: [u8; 256],
}

impl ActTables {
    fn build(mut f: impl FnMut(u8, bool) -> u8) -> Self {
        let mut t = ActTables {
            vector: [0; 256],
            scalar: [0; 256],
        };
        for q in 0..=255u8 {
            t.vector[q as usize] = f(q, true);
            t.scalar[q as usize] = f(q, false);
        }
        t
    }

    /// Applies the tables to `x` held in `layout`, giving a tensor with the output qparams.
    ///
    /// With `nhwc`, `x` is a rank-4 tensor held `[n, h, w, c]` (and so is the result);
    /// `layout` is still the memory format PyTorch holds the logical NCHW tensor in.
    fn apply(
        &self,
        x: &QTensor,
        layout: TorchLayout,
        scale: f32,
        zp: i32,
        nhwc: bool,
    ) -> Result<QTensor> {
        let held = x.data().shape();
        let logical;
        let shape = if nhwc {
            let (b, h, w, c) = dims4(x, "activation")?;
            logical = [b, c, h, w];
            &logical[..]
        } else {
            held
        };
        let data = if self.vector == self.scalar {
            x.data().mapv(|q| self.vector[q as usize])
        } else {
            let mask = vector_mask_in((shape, layout), &[(shape, layout)], nhwc);
            let mut out = x.data().as_standard_layout().into_owned();
            for (q, &v) in out.iter_mut().zip(mask.iter()) {
                *q = if v {
                    self.vector[*q as usize]
                } else {
                    self.scalar[*q as usize]
                };
            }
            out
        };
        QTensor::new(data, scale, zp)
    }
}

/// Sleef's `expf` with 1-ulp accuracy (`Sleef_expf8_u10`, what `Vectorized<float>::exp`
/// calls on AVX2): Cody-Waite reduction by ln 2, a degree-6 polynomial evaluated with FMAs,
/// and a scaling by 2^q in two steps.
fn sleef_expf_u10(d: f32) -> f32 {
    const R_LN2: f32 = std::f32::consts::LOG2_E;
    // Sleef's constants, as the f32 values its source literals round to.
    const L2U: f32 = f32::from_bits(0x3f31_7200); // 0.693145751953125

    const L2L: f32 = f32::from_bits(0x35bf_be8e); // 1.428606765330187045e-06
    let q = crate::kernels::requant::cvt_round(d * R_LN2);
    let qf = q as f32;
    let mut s = qf.mul_add(-L2U, d);
    s = qf.mul_add(-L2L, s);
    let mut u = f32::from_bits(0x3950_2bda); // 0.000198527617612853646278381
    u = u.mul_add(s, f32::from_bits(0x3ab6_96c9)); // 0.00139304355252534151077271
    u = u.mul_add(s, f32::from_bits(0x3c08_88a6)); // 0.00833336077630519866943359
    u = u.mul_add(s, f32::from_bits(0x3d2a_aa7a)); // 0.0416664853692054748535156
    u = u.mul_add(s, f32::from_bits(0x3e2a_aaab)); // 0.166666671633720397949219
    u = u.mul_add(s, 0.5);
    u = 1.0 + (s * s).mul_add(u, s);
    // vldexp2: u * 2^(q >> 1) * 2^(q - (q >> 1)), each power built from its exponent bits
    let pow2i = |e: i32| f32::from_bits(((e.wrapping_add(0x7f)) as u32) << 23);
    u = u * pow2i(q >> 1) * pow2i(q - (q >> 1));
    if d < -104.0 {
        u = 0.0;
    }
    if d > 100.0 {
        u = f32::INFINITY;
    }
    u
}

fn check_finite_param(v: f32, what: &str, layer: &str) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(QuantError::UnsupportedConfig {
            context: layer.into(),
            reason: format!("{what} must be finite, got {v}"),
        })
    }
}

/// `torch.ao.nn.quantized.Hardswish` (`torch.ops.quantized.hardswish`) with its own output
/// qparams. PyTorch (`qhardswish_kernel`):
/// ```text
/// vector: x = fma(s, q, s * -zp);  y = x * min(max(x + 3, 0), 6) / 6;  vec_quantize(y, 1 / out_scale)
/// scalar: x = (q - zp) * s;        y = x * clamp(x + 3, 0, 6) / 6;     quantize_val(y)
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QHardswish {
    out_scale: f32,
    out_zp: i32,
    layout: TorchLayout,
}

impl QHardswish {
    /// A hardswish quantized with `out_scale` and `out_zp`, for channels-last inputs.
    ///
    /// # Errors
    /// [`QuantError::InvalidScale`] / [`QuantError::InvalidZeroPoint`] for bad qparams.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QHardswish, QTensor};
    /// let hs = QHardswish::new(0.05, 10)?;
    /// let x = QTensor::new(ArrayD::from_elem(vec![1, 2, 2, 2], 140u8), 0.1, 100)?; // 4.0
    /// assert_eq!(hs.forward(&x)?.data()[[0, 1, 1, 1]], 90); // 4.0 / 0.05 + 10
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(out_scale: f32, out_zp: i32) -> Result<Self> {
        check_qparams(out_scale, out_zp, "QHardswish")?;
        Ok(QHardswish {
            out_scale,
            out_zp,
            layout: TorchLayout::ChannelsLast,
        })
    }

    /// Sets the memory layout PyTorch holds the input in (rank-4 tensors only).
    pub fn with_layout(mut self, layout: TorchLayout) -> Self {
        self.layout = layout;
        self
    }

    /// The output scale and zero point.
    pub fn output_qparams(&self) -> (f32, i32) {
        (self.out_scale, self.out_zp)
    }

    /// PyTorch's memory layout of the input.
    pub fn layout(&self) -> TorchLayout {
        self.layout
    }

    /// The tables for an input quantized with `scale` and `zp`.
    pub fn tables(&self, scale: f32, zp: i32) -> ActTables {
        let premul = scale * -(zp as f32);
        let inv = 1.0f32 / self.out_scale;
        let (so, zo) = (self.out_scale, self.out_zp);
        ActTables::build(|q, vector| {
            if vector {
                let x = dequant_fma(q, scale, premul);
                let y = x * (x + 3.0).clamp(0.0, 6.0) / 6.0;
                vec_quantize(y, inv, zo)
            } else {
                let x = dequant_sub(q, scale, zp);
                let y = x * (x + 3.0).clamp(0.0, 6.0) / 6.0;
                scalar_quantize(y, so, zo)
            }
        })
    }

    /// Applies the activation.
    ///
    /// # Errors
    /// None in practice (the output qparams were validated); `Result` like every layer.
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        self.tables(x.scale(), x.zero_point()).apply(
            x,
            self.layout,
            self.out_scale,
            self.out_zp,
            false,
        )
    }

    /// As [`forward`](Self::forward) on a rank-4 tensor held `[n, h, w, c]` (the result
    /// too): the same values, element for element, without transposes.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for a tensor that is not rank 4.
    pub fn forward_nhwc(&self, x: &QTensor) -> Result<QTensor> {
        self.tables(x.scale(), x.zero_point()).apply(
            x,
            self.layout,
            self.out_scale,
            self.out_zp,
            true,
        )
    }
}

/// The output scale PyTorch fixes for quint8 sigmoid and hardsigmoid: `1 / 256`.
pub const SIGMOID_SCALE: f32 = 0.003_906_25;

/// `hardsigmoid` on a quantized tensor (`nn.Hardsigmoid` left in a converted model):
/// output qparams fixed at scale 1/256, zero point 0. PyTorch (`qhardsigmoid_kernel`):
/// ```text
/// vector: x = fma(s, q, s * -zp);  y = min(max(x + 3, 0), 6) / 6;  vec_quantize(y, 256)
/// scalar: x = (q - zp) * s;        y = clamp(x + 3, 0, 6) / 6;     quantize_val(y, 1/256, 0)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QHardsigmoid {
    layout: TorchLayout,
}

impl QHardsigmoid {
    /// A hardsigmoid for channels-last inputs.
    pub fn new() -> Self {
        QHardsigmoid::default()
    }

    /// Sets the memory layout PyTorch holds the input in (rank-4 tensors only).
    pub fn with_layout(mut self, layout: TorchLayout) -> Self {
        self.layout = layout;
        self
    }

    /// The output scale and zero point: `(1 / 256, 0)`.
    pub fn output_qparams(&self) -> (f32, i32) {
        (SIGMOID_SCALE, 0)
    }

    /// PyTorch's memory layout of the input.
    pub fn layout(&self) -> TorchLayout {
        self.layout
    }

    /// The tables for an input quantized with `scale` and `zp`.
    pub fn tables(&self, scale: f32, zp: i32) -> ActTables {
        let premul = scale * -(zp as f32);
        ActTables::build(|q, vector| {
            if vector {
                let x = dequant_fma(q, scale, premul);
                vec_quantize((x + 3.0).clamp(0.0, 6.0) / 6.0, 256.0, 0)
            } else {
                let x = dequant_sub(q, scale, zp);
                scalar_quantize((x + 3.0).clamp(0.0, 6.0) / 6.0, SIGMOID_SCALE, 0)
            }
        })
    }

    /// Applies the activation.
    ///
    /// # Errors
    /// None in practice; `Result` like every layer.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QHardsigmoid, QTensor};
    /// let x = QTensor::new(ArrayD::from_elem(vec![4], 100u8), 0.1, 100)?; // 0.0
    /// let y = QHardsigmoid::new().forward(&x)?;
    /// assert_eq!((y.data()[[0]], y.scale()), (128, 1.0 / 256.0));
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        self.tables(x.scale(), x.zero_point())
            .apply(x, self.layout, SIGMOID_SCALE, 0, false)
    }

    /// As [`forward`](Self::forward) on a rank-4 tensor held `[n, h, w, c]` (the result
    /// too): the same values, element for element, without transposes.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for a tensor that is not rank 4.
    pub fn forward_nhwc(&self, x: &QTensor) -> Result<QTensor> {
        self.tables(x.scale(), x.zero_point())
            .apply(x, self.layout, SIGMOID_SCALE, 0, true)
    }
}

/// `torch.sigmoid` on a quantized tensor (`nn.Sigmoid` left in a converted model): output
/// qparams fixed at scale 1/256, zero point 0. PyTorch (`qsigmoid_kernel`):
/// ```text
/// vector: x = (q - zp) * s;  y = 1 / (1 + sleef_expf_u10(-x))          (f32);  vec_quantize(y, 256)
/// scalar: x = (q - zp) * s;  y = (float)(1.0 / (1.0 + (double)expf(-x)));       quantize_val(y)
/// ```
/// The scalar path uses the C library's `expf` (glibc's, correctly rounded in practice),
/// which Rust's `f32::exp` also calls on Linux.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QSigmoid {
    layout: TorchLayout,
}

impl QSigmoid {
    /// A sigmoid for channels-last inputs.
    pub fn new() -> Self {
        QSigmoid::default()
    }

    /// Sets the memory layout PyTorch holds the input in (rank-4 tensors only).
    pub fn with_layout(mut self, layout: TorchLayout) -> Self {
        self.layout = layout;
        self
    }

    /// The output scale and zero point: `(1 / 256, 0)`.
    pub fn output_qparams(&self) -> (f32, i32) {
        (SIGMOID_SCALE, 0)
    }

    /// PyTorch's memory layout of the input.
    pub fn layout(&self) -> TorchLayout {
        self.layout
    }

    /// The tables for an input quantized with `scale` and `zp`.
    pub fn tables(&self, scale: f32, zp: i32) -> ActTables {
        ActTables::build(|q, vector| {
            let x = dequant_sub(q, scale, zp);
            if vector {
                let e = sleef_expf_u10(-x);
                vec_quantize(1.0 / (1.0 + e), 256.0, 0)
            } else {
                let y = (1.0f64 / (1.0 + (-x).exp() as f64)) as f32;
                scalar_quantize(y, SIGMOID_SCALE, 0)
            }
        })
    }

    /// Applies the activation.
    ///
    /// # Errors
    /// None in practice; `Result` like every layer.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QSigmoid, QTensor};
    /// let x = QTensor::new(ArrayD::from_elem(vec![4], 100u8), 0.1, 100)?; // 0.0
    /// assert_eq!(QSigmoid::new().forward(&x)?.data()[[0]], 128);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        self.tables(x.scale(), x.zero_point())
            .apply(x, self.layout, SIGMOID_SCALE, 0, false)
    }

    /// As [`forward`](Self::forward) on a rank-4 tensor held `[n, h, w, c]` (the result
    /// too): the same values, element for element, without transposes.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for a tensor that is not rank 4.
    pub fn forward_nhwc(&self, x: &QTensor) -> Result<QTensor> {
        self.tables(x.scale(), x.zero_point())
            .apply(x, self.layout, SIGMOID_SCALE, 0, true)
    }
}

/// `torch.ao.nn.quantized.LeakyReLU` (`torch.ops.quantized.leaky_relu`) with its own output
/// qparams. PyTorch (`leaky_qrelu_out_kernel`):
/// ```text
/// vector: x = fma(s, q, s * -zp);  y = x * (x > 0 ? 1 : slope);  vec_quantize(y, 1 / out_scale)
/// scalar: x = (q - zp) * s;        y = x > 0 ? x : x * slope;    quantize_val(y)
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QLeakyReLU {
    slope: f32,
    out_scale: f32,
    out_zp: i32,
    layout: TorchLayout,
}

impl QLeakyReLU {
    /// A leaky ReLU with `negative_slope`, quantized with `out_scale` and `out_zp`.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for a non-finite slope;
    /// [`QuantError::InvalidScale`] / [`QuantError::InvalidZeroPoint`] for bad qparams.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QLeakyReLU, QTensor};
    /// let lr = QLeakyReLU::new(0.1, 0.01, 128)?;
    /// let x = QTensor::new(ArrayD::from_elem(vec![3], 0u8), 0.01, 100)?; // -1.0
    /// assert_eq!(lr.forward(&x)?.data()[[0]], 118); // -0.1 / 0.01 + 128
    /// assert!(QLeakyReLU::new(f32::NAN, 0.1, 0).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(negative_slope: f32, out_scale: f32, out_zp: i32) -> Result<Self> {
        check_finite_param(negative_slope, "negative_slope", "QLeakyReLU")?;
        check_qparams(out_scale, out_zp, "QLeakyReLU")?;
        Ok(QLeakyReLU {
            slope: negative_slope,
            out_scale,
            out_zp,
            layout: TorchLayout::ChannelsLast,
        })
    }

    /// Sets the memory layout PyTorch holds the input in (rank-4 tensors only).
    pub fn with_layout(mut self, layout: TorchLayout) -> Self {
        self.layout = layout;
        self
    }

    /// The negative slope.
    pub fn negative_slope(&self) -> f32 {
        self.slope
    }

    /// The output scale and zero point.
    pub fn output_qparams(&self) -> (f32, i32) {
        (self.out_scale, self.out_zp)
    }

    /// PyTorch's memory layout of the input.
    pub fn layout(&self) -> TorchLayout {
        self.layout
    }

    /// The tables for an input quantized with `scale` and `zp`.
    pub fn tables(&self, scale: f32, zp: i32) -> ActTables {
        let premul = scale * -(zp as f32);
        let inv = 1.0f32 / self.out_scale;
        let (so, zo, slope) = (self.out_scale, self.out_zp, self.slope);
        ActTables::build(|q, vector| {
            if vector {
                let x = dequant_fma(q, scale, premul);
                vec_quantize(x * if x > 0.0 { 1.0 } else { slope }, inv, zo)
            } else {
                let x = dequant_sub(q, scale, zp);
                scalar_quantize(if x > 0.0 { x } else { x * slope }, so, zo)
            }
        })
    }

    /// Applies the activation.
    ///
    /// # Errors
    /// None in practice; `Result` like every layer.
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        self.tables(x.scale(), x.zero_point()).apply(
            x,
            self.layout,
            self.out_scale,
            self.out_zp,
            false,
        )
    }

    /// As [`forward`](Self::forward) on a rank-4 tensor held `[n, h, w, c]` (the result
    /// too): the same values, element for element, without transposes.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for a tensor that is not rank 4.
    pub fn forward_nhwc(&self, x: &QTensor) -> Result<QTensor> {
        self.tables(x.scale(), x.zero_point()).apply(
            x,
            self.layout,
            self.out_scale,
            self.out_zp,
            true,
        )
    }
}

/// Quantized clamp (`torch.clamp`, `hardtanh`, `nn.ReLU6` / `torch.ops.quantized.relu6`):
/// exact in integers with the input's qparams (`qclamp_kernel`):
/// `y = min(max(q, quantize_val(min)), quantize_val(max))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QClamp {
    min: f32,
    max: f32,
}

impl QClamp {
    /// A clamp to `[min, max]` (`hardtanh(min, max)`).
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for NaN bounds.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QClamp, QTensor};
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![3], vec![0u8, 100, 250])?, 0.05, 100)?;
    /// let y = QClamp::relu6().forward(&x)?;
    /// assert_eq!(y.data().as_slice().unwrap(), &[100, 100, 220]);
    /// assert!(QClamp::new(f32::NAN, 1.0).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(min: f32, max: f32) -> Result<Self> {
        for (v, what) in [(min, "min"), (max, "max")] {
            if v.is_nan() {
                return Err(QuantError::UnsupportedConfig {
                    context: "QClamp".into(),
                    reason: format!("{what} must not be NaN"),
                });
            }
        }
        Ok(QClamp { min, max })
    }

    /// `ReLU6`: a clamp to `[0, 6]`.
    pub fn relu6() -> Self {
        QClamp { min: 0.0, max: 6.0 }
    }

    /// The bounds `(min, max)`.
    pub fn bounds(&self) -> (f32, f32) {
        (self.min, self.max)
    }

    /// The table for an input quantized with `scale` and `zp` (both paths agree).
    pub fn tables(&self, scale: f32, zp: i32) -> ActTables {
        let lo = scalar_quantize(self.min, scale, zp);
        let hi = scalar_quantize(self.max, scale, zp);
        ActTables::build(|q, _| q.max(lo).min(hi))
    }

    /// Applies the clamp; the output keeps the input's qparams.
    ///
    /// # Errors
    /// None in practice; `Result` like every layer.
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        let (s, zp) = (x.scale(), x.zero_point());
        self.tables(s, zp)
            .apply(x, TorchLayout::Contiguous, s, zp, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleef_exp_is_within_one_ulp_of_the_true_exp() {
        for i in -2000..2000 {
            let x = i as f32 * 0.0437;
            let want = (x as f64).exp();
            let got = sleef_expf_u10(x) as f64;
            let ulp = (want as f32).abs() * f32::EPSILON;
            assert!(
                (got - want).abs() <= ulp as f64 * 1.0,
                "{x}: {got} vs {want}"
            );
        }
        assert_eq!(sleef_expf_u10(0.0), 1.0);
        assert_eq!(sleef_expf_u10(-200.0), 0.0);
        assert_eq!(sleef_expf_u10(200.0), f32::INFINITY);
    }
}
