//! Quantized fully connected layers.

use ndarray::{ArrayD, ArrayView1, ArrayView2, IxDyn};

use super::tensor::check_qparams;
use super::{
    check_accumulator, check_bias, quantize_weights, quantized_weights, QTensor, QWeights,
};
use crate::error::{QuantError, Result};
use crate::kernels::requant::RequantCache;
use crate::kernels::{
    self, Activations, BiasMode, KernelPath, OutputQuant, PackedWeights, RequantParams,
};
use crate::qparams::QParams;

/// `torch.ao.nn.quantized.Linear` on fbgemm: `y = requant(x_q @ W_q^T + bias)`.
///
/// Input `[..., in_features]`, output `[..., out_features]`, both `quint8`.
#[derive(Debug, Clone)]
pub struct QLinear {
    in_features: usize,
    out_features: usize,
    packed: PackedWeights,
    w_scales: Vec<f32>,
    per_channel: bool,
    bias: Option<Vec<f32>>,
    out_scale: f32,
    out_zp: i32,
    relu: bool,
    rq_cache: RequantCache,
    bias_mode: BiasMode,
}

const NAME: &str = "QLinear";

impl QLinear {
    /// Quantizes the float `[out_features, in_features]` weight with `w_qparams` (`qint8`,
    /// per-tensor or per-channel on axis 0) and packs it; the output is quantized with
    /// `out_scale` and `out_zp`.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for weight qparams that are not `qint8`,
    /// [`QuantError::ShapeMismatch`] for a per-channel axis other than 0, a channel count or
    /// bias length that does not match, [`QuantError::NonFinite`] for NaN/infinite weights
    /// or bias, [`QuantError::InvalidScale`] / [`QuantError::InvalidZeroPoint`] for bad
    /// output qparams.
    ///
    /// # Examples
    /// ```
    /// use ndarray::{array, Array2};
    /// use ptq::nn::quantized::QLinear;
    /// use ptq::{DType, QParams};
    /// let w = Array2::<f32>::zeros((4, 3));
    /// let l = QLinear::new(w.view(), Some(array![0.1f32, 0.2, 0.3, 0.4].view()),
    ///     &QParams::per_tensor(0.01, 0, DType::QInt8)?, 0.1, 0)?;
    /// assert_eq!((l.in_features(), l.out_features()), (3, 4));
    /// assert!(QLinear::new(w.view(), None, &QParams::per_tensor(0.01, 0, DType::QUInt8)?, 0.1, 0).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(
        weight: ArrayView2<'_, f32>,
        bias: Option<ArrayView1<'_, f32>>,
        w_qparams: &QParams,
        out_scale: f32,
        out_zp: i32,
    ) -> Result<Self> {
        let qw = quantize_weights(weight.into_dyn(), w_qparams, NAME)?;
        Self::build(qw, weight.dim(), bias, out_scale, out_zp, false)
    }

    /// Like [`QLinear::new`] from weights already quantized with `w_qparams` (e.g. a
    /// PyTorch `int_repr()`).
    ///
    /// # Errors
    /// As [`QLinear::new`], and [`QuantError::QuantizedOutOfRange`] for values outside the
    /// qparams' range.
    ///
    /// # Examples
    /// ```
    /// use ndarray::array;
    /// use ptq::nn::quantized::QLinear;
    /// use ptq::{DType, QParams};
    /// let wq = array![[1i8, -1], [2, 3]];
    /// let l = QLinear::from_quantized(wq.view(), &QParams::per_tensor(0.1, 0, DType::QInt8)?, None, 0.1, 0)?;
    /// assert_eq!(l.out_features(), 2);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn from_quantized(
        weight: ArrayView2<'_, i8>,
        w_qparams: &QParams,
        bias: Option<ArrayView1<'_, f32>>,
        out_scale: f32,
        out_zp: i32,
    ) -> Result<Self> {
        let qw = quantized_weights(weight.into_dyn(), w_qparams, NAME)?;
        Self::build(qw, weight.dim(), bias, out_scale, out_zp, false)
    }

    fn build(
        qw: QWeights,
        (out_features, in_features): (usize, usize),
        bias: Option<ArrayView1<'_, f32>>,
        out_scale: f32,
        out_zp: i32,
        relu: bool,
    ) -> Result<Self> {
        check_qparams(out_scale, out_zp, NAME)?;
        let bias = check_bias(bias, out_features, NAME)?;
        check_accumulator(
            &qw.values,
            &qw.zero_points,
            in_features,
            NAME,
            &format!("weight [{out_features}, {in_features}]"),
        )?;
        let packed = PackedWeights::new(&qw.values, out_features, in_features, &qw.zero_points)
            .map_err(|e| e.in_context(NAME))?;
        Ok(QLinear {
            in_features,
            out_features,
            packed,
            w_scales: qw.scales,
            per_channel: qw.per_channel,
            bias,
            out_scale,
            out_zp,
            relu,
            rq_cache: RequantCache::default(),
            bias_mode: BiasMode::Float,
        })
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Bytes of packed weights, zero points, offsets and bias held by the layer.
    pub fn weight_bytes(&self) -> usize {
        self.packed.bytes()
            + 4 * self.w_scales.len()
            + 4 * self.bias.as_ref().map_or(0, |b| b.len())
    }

    /// Runs the layer on `[..., in_features]` activations.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] when the last dimension is not `in_features`.
    ///
    /// # Examples
    /// ```
    /// use ndarray::{array, ArrayD};
    /// use ptq::nn::quantized::{QLinear, QTensor};
    /// use ptq::{DType, QParams};
    /// let l = QLinear::from_quantized(array![[1i8, 1]].view(), &QParams::per_tensor(1.0, 0, DType::QInt8)?, None, 1.0, 0)?;
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 2], vec![3u8, 4])?, 1.0, 0)?;
    /// assert_eq!(l.forward(&x)?.data()[[0, 0]], 7);
    /// assert!(l.forward(&QTensor::new(ArrayD::zeros(vec![1, 3]), 1.0, 0)?).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        self.forward_with_path(x).map(|(y, _)| y)
    }

    /// [`forward`](Self::forward), also returning which GEMM kernel ran.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    ///
    /// # Examples
    /// ```
    /// use ndarray::{array, ArrayD};
    /// use ptq::nn::quantized::{QLinear, QTensor};
    /// use ptq::{DType, QParams};
    /// let l = QLinear::from_quantized(array![[1i8, 1]].view(), &QParams::per_tensor(1.0, 0, DType::QInt8)?, None, 1.0, 0)?;
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 2], vec![3u8, 4])?, 1.0, 0)?;
    /// let (_, path) = l.forward_with_path(&x)?;
    /// println!("{path:?}");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_with_path(&self, x: &QTensor) -> Result<(QTensor, KernelPath)> {
        let shape = x.data().shape();
        if shape.last() != Some(&self.in_features) {
            return Err(QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: format!("input [..., {}]", self.in_features),
                actual: format!("shape {shape:?}"),
            });
        }
        let rows: usize = shape[..shape.len() - 1].iter().product();
        let rqs = self.rq_cache.get(x.scale(), || {
            RequantParams::with_bias_mode(
                self.out_features,
                x.scale(),
                &self.w_scales,
                self.per_channel,
                self.bias.as_deref(),
                OutputQuant {
                    scale: self.out_scale,
                    zero_point: self.out_zp,
                    relu: self.relu,
                },
                self.bias_mode,
            )
            .map(|rq| vec![rq])
            .map_err(|e| e.in_context(NAME))
        })?;
        let rq = &rqs[0];
        let a = x.to_vec();
        let mut out = vec![0u8; rows * self.out_features];
        let path = kernels::qgemm(
            Activations {
                data: &a,
                rows,
                zero_point: x.zero_point(),
            },
            &self.packed,
            rq,
            &mut out,
            self.out_features,
        )
        .map_err(|e| e.in_context(NAME))?;
        let mut oshape = shape.to_vec();
        if let Some(l) = oshape.last_mut() {
            *l = self.out_features;
        }
        let data =
            ArrayD::from_shape_vec(IxDyn(&oshape), out).map_err(|e| QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: format!("output {oshape:?}"),
                actual: e.to_string(),
            })?;
        Ok((QTensor::new(data, self.out_scale, self.out_zp)?, path))
    }
}

/// `torch.ao.nn.intrinsic.quantized.LinearReLU`: [`QLinear`] with the ReLU fused into the
/// requantization (outputs clamped at the output zero point).
#[derive(Debug, Clone)]
pub struct QLinearReLU(QLinear);

impl QLinearReLU {
    /// As [`QLinear::new`], with a fused ReLU.
    ///
    /// # Errors
    /// As [`QLinear::new`].
    ///
    /// # Examples
    /// ```
    /// use ndarray::{array, ArrayD};
    /// use ptq::nn::quantized::{QLinearReLU, QTensor};
    /// use ptq::{DType, QParams};
    /// let l = QLinearReLU::new(array![[-1.0f32]].view(), None, &QParams::per_tensor(1.0, 0, DType::QInt8)?, 1.0, 10)?;
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 1], vec![5u8])?, 1.0, 0)?;
    /// assert_eq!(l.forward(&x)?.data()[[0, 0]], 10); // -5 clamped at the zero point
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(
        weight: ArrayView2<'_, f32>,
        bias: Option<ArrayView1<'_, f32>>,
        w_qparams: &QParams,
        out_scale: f32,
        out_zp: i32,
    ) -> Result<Self> {
        let mut l = QLinear::new(weight, bias, w_qparams, out_scale, out_zp)
            .map_err(|e| e.in_context("QLinearReLU"))?;
        l.relu = true;
        Ok(QLinearReLU(l))
    }

    /// As [`QLinear::from_quantized`], with a fused ReLU.
    ///
    /// # Errors
    /// As [`QLinear::from_quantized`].
    ///
    /// # Examples
    /// ```
    /// use ndarray::array;
    /// use ptq::nn::quantized::QLinearReLU;
    /// use ptq::{DType, QParams};
    /// let l = QLinearReLU::from_quantized(array![[1i8]].view(), &QParams::per_tensor(1.0, 0, DType::QInt8)?, None, 1.0, 0)?;
    /// assert_eq!(l.inner().out_features(), 1);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn from_quantized(
        weight: ArrayView2<'_, i8>,
        w_qparams: &QParams,
        bias: Option<ArrayView1<'_, f32>>,
        out_scale: f32,
        out_zp: i32,
    ) -> Result<Self> {
        let mut l = QLinear::from_quantized(weight, w_qparams, bias, out_scale, out_zp)
            .map_err(|e| e.in_context("QLinearReLU"))?;
        l.relu = true;
        Ok(QLinearReLU(l))
    }

    /// The underlying layer (with `relu` set).
    pub fn inner(&self) -> &QLinear {
        &self.0
    }

    /// Bytes of weights held by the layer.
    pub fn weight_bytes(&self) -> usize {
        self.0.weight_bytes()
    }

    /// Runs the layer.
    ///
    /// # Errors
    /// As [`QLinear::forward`].
    ///
    /// # Examples
    /// ```
    /// use ndarray::{array, ArrayD};
    /// use ptq::nn::quantized::{QLinearReLU, QTensor};
    /// use ptq::{DType, QParams};
    /// let l = QLinearReLU::from_quantized(array![[2i8, -1]].view(), &QParams::per_tensor(1.0, 0, DType::QInt8)?, None, 1.0, 3)?;
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![2, 2], vec![1u8, 0, 0, 4])?, 1.0, 0)?;
    /// assert_eq!(l.forward(&x)?.data().as_slice().unwrap(), &[5, 3]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        self.0.forward(x).map_err(|e| e.in_context("QLinearReLU"))
    }
}

impl QLinear {
    /// The `[out_features, in_features]` int8 weights and the weight parameters they were
    /// quantized with (`qint8`, affine, per-tensor or per-channel on axis 0), unpacked from
    /// the packed form. `QLinear::from_quantized` of these rebuilds an identical layer.
    ///
    /// # Examples
    /// ```
    /// use ndarray::array;
    /// use ptq::nn::quantized::QLinear;
    /// use ptq::{DType, QParams};
    /// let wq = array![[1i8, -1], [2, 3]];
    /// let l = QLinear::from_quantized(wq.view(), &QParams::per_tensor(0.1, 4, DType::QInt8)?, None, 0.1, 0)?;
    /// let (w, qp) = l.quantized_weight();
    /// assert_eq!(w, wq);
    /// assert_eq!((qp.scale(), qp.zero_point()), (0.1, 4));
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn quantized_weight(&self) -> (ndarray::Array2<i8>, QParams) {
        let w = ndarray::Array2::from_shape_vec(
            (self.out_features, self.in_features),
            self.packed.unpack(),
        )
        .expect("unpack returns out * in values");
        let qp = weight_qparams_of(&self.w_scales, self.packed.zero_points(), self.per_channel);
        (w, qp)
    }

    /// Whether the weights are quantized per output channel.
    pub fn is_per_channel(&self) -> bool {
        self.per_channel
    }

    /// The float bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The same layer with its bias entering the requantization as `mode` says
    /// ([`BiasMode::Int32`]: ONNX Runtime's `QLinearConv` / `QGemm` arithmetic; the
    /// default [`BiasMode::Float`] is fbgemm's, bit-exact with PyTorch).
    pub fn with_bias_mode(mut self, mode: BiasMode) -> Self {
        self.bias_mode = mode;
        self.rq_cache = RequantCache::default();
        self
    }

    /// How the bias enters the requantization.
    pub fn bias_mode(&self) -> BiasMode {
        self.bias_mode
    }

    /// The output scale and zero point.
    pub fn output_qparams(&self) -> (f32, i32) {
        (self.out_scale, self.out_zp)
    }

    /// Whether a ReLU is fused into the output.
    pub fn is_relu(&self) -> bool {
        self.relu
    }
}

/// Weight parameters from a layer's stored scales and (per-column) zero points.
pub(crate) fn weight_qparams_of(scales: &[f32], zps: &[i32], per_channel: bool) -> QParams {
    use crate::qparams::{DType, QScheme};
    let (scheme, zps) = if per_channel {
        (QScheme::PerChannelAffine { axis: 0 }, zps.to_vec())
    } else {
        // A layer with no outputs keeps no zero point; any value describes it.
        (
            QScheme::PerTensorAffine,
            vec![zps.first().copied().unwrap_or(0)],
        )
    };
    QParams::new(
        scheme,
        DType::QInt8,
        DType::QInt8.default_range(false),
        scales.to_vec(),
        zps,
    )
    .expect("a layer's weight parameters were validated when it was built")
}
