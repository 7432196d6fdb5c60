//! Quantization configurations: which observer watches activations and which watches
//! weights, as *specs* (small `Copy` values) rather than observer instances, so every
//! tensor gets a fresh observer of its own (PyTorch's `qconfig.py` refuses instances for
//! the same reason).
//!
//! The presets mirror `torch.ao.quantization` in torch 2.15.0, checked against its
//! `qconfig.py` and `observer.py`:
//!
//! | preset | activation | weight |
//! |---|---|---|
//! | [`QConfig::fbgemm`], [`QConfig::x86`] (`get_default_qconfig("fbgemm" / "x86")`) | `HistogramObserver(reduce_range=True)`: quint8 affine 0..=127 | `PerChannelMinMaxObserver(qint8, per_channel_symmetric)` |
//! | [`QConfig::qnnpack`] (`get_default_qconfig("qnnpack")`) | `HistogramObserver(reduce_range=False)`: quint8 affine 0..=255 | `MinMaxObserver(qint8, per_tensor_symmetric)` |
//! | [`QConfig::default_qconfig`] (`default_qconfig`) | `MinMaxObserver(quant_min=0, quant_max=127)` | `MinMaxObserver(qint8, per_tensor_symmetric)` |
//! | [`QConfig::default_per_channel`] (`default_per_channel_qconfig`) | `MinMaxObserver(quant_min=0, quant_max=127)` | `PerChannelMinMaxObserver(qint8, per_channel_symmetric)` |
//!
//! plus [`QConfig::minmax_per_tensor`] and [`QConfig::minmax_per_channel`], which use
//! min/max observers on both sides with fbgemm's ranges, and [`QConfig::onnxruntime`],
//! which reproduces ONNX Runtime's `quantize_static` MinMax calibration (quint8 `0..=255`
//! activations, per-channel symmetric qint8 `-127..=127` weights, ORT's float64 arithmetic).

use crate::error::Result;
use crate::observer::{
    EntropyObserver, FixedQParamsObserver, HistogramObserver, MinMaxObserver,
    MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver, MseObserver, Observer,
    OnnxRuntimeHistMethod, OnnxRuntimeHistogramObserver, OnnxRuntimeMinMaxObserver,
    PerChannelMinMaxObserver, PercentileObserver,
};
use crate::qparams::{DType, QParams, QScheme, RangeConfig};

/// Which observer algorithm, with its own parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum ObserverKind {
    /// [`MinMaxObserver`] (or [`PerChannelMinMaxObserver`] with a per-channel scheme).
    MinMax,
    /// [`MovingAverageMinMaxObserver`] (or its per-channel twin with a per-channel scheme).
    MovingAverageMinMax {
        /// Weight of each new batch, PyTorch's default 0.01.
        averaging_constant: f32,
    },
    /// [`HistogramObserver`].
    Histogram {
        /// Number of histogram bins, PyTorch's default 2048.
        bins: usize,
    },
    /// [`PercentileObserver`]: clip to the range holding `percentile` percent of values.
    Percentile {
        /// Percent of the values kept inside the range, in `(50, 100]`, e.g. 99.99.
        percentile: f64,
        /// Number of histogram bins (2048 is usual).
        bins: usize,
    },
    /// [`EntropyObserver`]: the range of least KL divergence (TensorRT's entropy
    /// calibration).
    Entropy {
        /// Number of histogram bins (2048 is usual).
        bins: usize,
    },
    /// [`MseObserver`]: the range of least expected squared error.
    Mse {
        /// Number of histogram bins (2048 is usual).
        bins: usize,
    },
    /// [`OnnxRuntimeMinMaxObserver`]: ONNX Runtime `quantize_static`'s MinMax calibration
    /// (per tensor, or per channel with a per-channel scheme).
    OnnxRuntimeMinMax,
    /// [`OnnxRuntimeHistogramObserver`]: ONNX Runtime `quantize_static`'s Entropy or
    /// Percentile calibration (per-tensor schemes only).
    OnnxRuntimeHistogram(OnnxRuntimeHistMethod),
    /// [`FixedQParamsObserver`] with this scale and zero point.
    FixedQParams {
        /// The fixed scale.
        scale: f32,
        /// The fixed zero point.
        zero_point: i32,
    },
}

/// A recipe for an observer: its kind and its `dtype`, `qscheme`, `reduce_range`,
/// `quant_min`/`quant_max` and `eps` arguments, with PyTorch's meanings.
///
/// # Examples
/// ```
/// use ptq::qconfig::ObserverSpec;
/// use ptq::{DType, QScheme};
/// let spec = ObserverSpec::min_max(DType::QInt8, QScheme::PerTensorSymmetric).with_range(-127, 127);
/// let obs = spec.build()?;
/// assert_eq!(obs.kind(), "MinMaxObserver");
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObserverSpec {
    /// The algorithm.
    pub kind: ObserverKind,
    /// The quantized dtype.
    pub dtype: DType,
    /// The scheme; a per-channel scheme selects the per-channel observer of the kind.
    pub qscheme: QScheme,
    /// Use one bit less of range (PyTorch's `reduce_range`).
    pub reduce_range: bool,
    /// A custom `(quant_min, quant_max)`, or `None` for the dtype's default.
    pub quant_range: Option<(i64, i64)>,
    /// The smallest scale, PyTorch's default `f32::EPSILON`.
    pub eps: f32,
}

impl ObserverSpec {
    fn with_kind(kind: ObserverKind, dtype: DType, qscheme: QScheme) -> Self {
        ObserverSpec {
            kind,
            dtype,
            qscheme,
            reduce_range: false,
            quant_range: None,
            eps: f32::EPSILON,
        }
    }

    /// A min/max observer spec (per tensor or per channel, following `qscheme`).
    pub fn min_max(dtype: DType, qscheme: QScheme) -> Self {
        Self::with_kind(ObserverKind::MinMax, dtype, qscheme)
    }

    /// A moving-average min/max observer spec with PyTorch's averaging constant 0.01.
    pub fn moving_average(dtype: DType, qscheme: QScheme) -> Self {
        Self::with_kind(
            ObserverKind::MovingAverageMinMax {
                averaging_constant: crate::observer::DEFAULT_AVERAGING_CONSTANT,
            },
            dtype,
            qscheme,
        )
    }

    /// A histogram observer spec with PyTorch's 2048 bins.
    pub fn histogram(dtype: DType, qscheme: QScheme) -> Self {
        Self::with_kind(ObserverKind::Histogram { bins: 2048 }, dtype, qscheme)
    }

    /// A [`PercentileObserver`] spec with 2048 bins keeping `percentile` percent of the
    /// values (per-tensor schemes only).
    pub fn percentile(dtype: DType, qscheme: QScheme, percentile: f64) -> Self {
        Self::with_kind(
            ObserverKind::Percentile {
                percentile,
                bins: 2048,
            },
            dtype,
            qscheme,
        )
    }

    /// An [`EntropyObserver`] (KL-divergence) spec with 2048 bins (per-tensor schemes
    /// only).
    pub fn entropy(dtype: DType, qscheme: QScheme) -> Self {
        Self::with_kind(ObserverKind::Entropy { bins: 2048 }, dtype, qscheme)
    }

    /// An [`MseObserver`] spec with 2048 bins (per-tensor schemes only).
    pub fn mse(dtype: DType, qscheme: QScheme) -> Self {
        Self::with_kind(ObserverKind::Mse { bins: 2048 }, dtype, qscheme)
    }

    /// An [`OnnxRuntimeMinMaxObserver`] spec (per tensor or per channel following
    /// `qscheme`).
    pub fn onnxruntime_min_max(dtype: DType, qscheme: QScheme) -> Self {
        Self::with_kind(ObserverKind::OnnxRuntimeMinMax, dtype, qscheme)
    }

    /// A fixed-parameters spec (per-tensor affine, full range of `dtype`).
    pub fn fixed(scale: f32, zero_point: i32, dtype: DType) -> Self {
        Self::with_kind(
            ObserverKind::FixedQParams { scale, zero_point },
            dtype,
            QScheme::PerTensorAffine,
        )
    }

    /// The same spec with `reduce_range` set.
    pub fn with_reduce_range(mut self, reduce_range: bool) -> Self {
        self.reduce_range = reduce_range;
        self
    }

    /// The same spec with a custom quantized range.
    pub fn with_range(mut self, quant_min: i64, quant_max: i64) -> Self {
        self.quant_range = Some((quant_min, quant_max));
        self
    }

    /// The same spec with another `eps`.
    pub fn with_eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// The validated range configuration this spec describes.
    ///
    /// # Errors
    /// As [`RangeConfig::new`].
    pub fn range_config(&self) -> Result<RangeConfig> {
        RangeConfig::new(
            self.dtype,
            self.qscheme,
            self.reduce_range,
            self.quant_range,
            self.eps,
        )
    }

    /// Builds a fresh observer.
    ///
    /// # Errors
    /// Whatever PyTorch refuses for the same arguments: an invalid custom range,
    /// `reduce_range` with symmetric `quint8`, a per-channel scheme for the histogram
    /// observer, an averaging constant outside `(0, 1]`, zero bins, an invalid fixed scale.
    pub fn build(&self) -> Result<Box<dyn Observer>> {
        let per_channel = self.qscheme.is_per_channel();
        Ok(match self.kind {
            ObserverKind::MinMax if per_channel => {
                Box::new(PerChannelMinMaxObserver::new(self.range_config()?)?)
            }
            ObserverKind::MinMax => Box::new(MinMaxObserver::new(self.range_config()?)?),
            ObserverKind::MovingAverageMinMax { averaging_constant } if per_channel => {
                Box::new(MovingAveragePerChannelMinMaxObserver::new(
                    self.range_config()?,
                    averaging_constant,
                )?)
            }
            ObserverKind::MovingAverageMinMax { averaging_constant } => Box::new(
                MovingAverageMinMaxObserver::new(self.range_config()?, averaging_constant)?,
            ),
            ObserverKind::Histogram { bins } => {
                Box::new(HistogramObserver::new(self.range_config()?, bins)?)
            }
            ObserverKind::Percentile { percentile, bins } => Box::new(PercentileObserver::new(
                self.range_config()?,
                percentile,
                bins,
            )?),
            ObserverKind::Entropy { bins } => {
                Box::new(EntropyObserver::new(self.range_config()?, bins)?)
            }
            ObserverKind::Mse { bins } => Box::new(MseObserver::new(self.range_config()?, bins)?),
            ObserverKind::OnnxRuntimeMinMax => {
                Box::new(OnnxRuntimeMinMaxObserver::new(self.range_config()?)?)
            }
            ObserverKind::OnnxRuntimeHistogram(method) => Box::new(
                OnnxRuntimeHistogramObserver::new(self.range_config()?, method)?,
            ),
            ObserverKind::FixedQParams { scale, zero_point } => {
                let range = self.range_config()?.quant_range();
                let qp = QParams::new(
                    self.qscheme,
                    self.dtype,
                    range,
                    vec![scale],
                    vec![zero_point],
                )?;
                Box::new(FixedQParamsObserver::new(qp)?)
            }
        })
    }
}

/// What observes a layer's output activations and what observes its weights.
///
/// # Examples
/// ```
/// use ptq::qconfig::QConfig;
/// use ptq::{DType, QScheme};
/// let q = QConfig::fbgemm();
/// assert_eq!(q.weight.qscheme, QScheme::PerChannelSymmetric { axis: 0 });
/// assert!(q.activation.reduce_range);
/// q.validate()?;
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QConfig {
    /// The activation observer spec.
    pub activation: ObserverSpec,
    /// The weight observer spec.
    pub weight: ObserverSpec,
    /// Whose integer arithmetic the converted int8 ops reproduce: PyTorch's fbgemm (every
    /// preset but the ONNX Runtime ones) or ONNX Runtime's QDQ kernels.
    pub arithmetic: Arithmetic,
}

/// Whose int8 arithmetic a converted layer reproduces where the two runtimes differ.
///
/// They differ in one place that matters for convolutions and linear layers: fbgemm adds
/// the float bias term `bias / (act_scale * w_scale)` to the accumulator in `f32`, while a
/// QDQ model can only hold an `int32` bias (scale `act_scale * w_scale`, zero point 0), so
/// ONNX Runtime's `QLinearConv` / `QGemm` add `round_half_even(bias / (act_scale *
/// w_scale))` to the integer accumulator. With [`Arithmetic::OnnxRuntime`] ptq does the
/// same ([`crate::kernels::BiasMode::Int32`]), so its int8 outputs equal what ONNX Runtime
/// computes on ptq's QDQ export; the choice is saved in the `.qmodel` file.
///
/// # Examples
/// ```
/// use ptq::qconfig::{Arithmetic, QConfig};
/// assert_eq!(QConfig::fbgemm().arithmetic, Arithmetic::Fbgemm);
/// assert_eq!(QConfig::onnxruntime().arithmetic, Arithmetic::OnnxRuntime);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Arithmetic {
    /// fbgemm's (PyTorch's `torch.ao.nn.quantized` on x86): float bias term.
    #[default]
    Fbgemm,
    /// ONNX Runtime's CPU QDQ kernels (MLAS): `int32` bias added to the accumulator.
    OnnxRuntime,
}

impl Arithmetic {
    /// How convolutions and linear layers add their bias under this arithmetic.
    pub fn bias_mode(self) -> crate::kernels::BiasMode {
        match self {
            Arithmetic::Fbgemm => crate::kernels::BiasMode::Float,
            Arithmetic::OnnxRuntime => crate::kernels::BiasMode::Int32,
        }
    }
}

impl QConfig {
    /// `get_default_qconfig("fbgemm")`: histogram activations (quint8, `reduce_range`, so
    /// the u8 x s8 kernels cannot saturate), per-channel symmetric qint8 weights.
    pub fn fbgemm() -> Self {
        QConfig {
            activation: ObserverSpec::histogram(DType::QUInt8, QScheme::PerTensorAffine)
                .with_reduce_range(true),
            weight: ObserverSpec::min_max(DType::QInt8, QScheme::PerChannelSymmetric { axis: 0 }),
            arithmetic: Arithmetic::Fbgemm,
        }
    }

    /// `get_default_qconfig("x86")`, PyTorch's default backend: identical to
    /// [`QConfig::fbgemm`] in torch 2.15.0.
    pub fn x86() -> Self {
        Self::fbgemm()
    }

    /// `get_default_qconfig("qnnpack")`: histogram activations over the full quint8
    /// range, per-tensor symmetric qint8 weights.
    pub fn qnnpack() -> Self {
        QConfig {
            activation: ObserverSpec::histogram(DType::QUInt8, QScheme::PerTensorAffine),
            weight: ObserverSpec::min_max(DType::QInt8, QScheme::PerTensorSymmetric),
            arithmetic: Arithmetic::Fbgemm,
        }
    }

    /// `default_qconfig`: min/max activations with the custom range 0..=127, per-tensor
    /// symmetric qint8 weights.
    pub fn default_qconfig() -> Self {
        QConfig {
            activation: ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine)
                .with_range(0, 127),
            weight: ObserverSpec::min_max(DType::QInt8, QScheme::PerTensorSymmetric),
            arithmetic: Arithmetic::Fbgemm,
        }
    }

    /// `default_per_channel_qconfig`: as [`QConfig::default_qconfig`] with per-channel
    /// symmetric weights.
    pub fn default_per_channel() -> Self {
        QConfig {
            weight: ObserverSpec::min_max(DType::QInt8, QScheme::PerChannelSymmetric { axis: 0 }),
            ..Self::default_qconfig()
        }
    }

    /// Min/max observers with fbgemm's ranges and per-tensor weights: quint8 affine
    /// activations with `reduce_range`, per-tensor symmetric qint8 weights.
    pub fn minmax_per_tensor() -> Self {
        QConfig {
            activation: ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine)
                .with_reduce_range(true),
            weight: ObserverSpec::min_max(DType::QInt8, QScheme::PerTensorSymmetric),
            arithmetic: Arithmetic::Fbgemm,
        }
    }

    /// As [`QConfig::minmax_per_tensor`] with per-channel symmetric weights.
    pub fn minmax_per_channel() -> Self {
        QConfig {
            weight: ObserverSpec::min_max(DType::QInt8, QScheme::PerChannelSymmetric { axis: 0 }),
            ..Self::minmax_per_tensor()
        }
    }

    /// ONNX Runtime's `quantize_static` defaults with `per_channel=True` (MinMax
    /// calibration, `QuantFormat.QDQ`): quint8 asymmetric activations over `0..=255`,
    /// qint8 symmetric per-channel weights over ORT's restricted `-127..=127`, both with ORT's
    /// float64 scale arithmetic ([`OnnxRuntimeMinMaxObserver`]), so scales and zero points
    /// equal `quantize_static`'s bit for bit given the same ranges.
    ///
    /// # Examples
    /// ```
    /// use ptq::qconfig::QConfig;
    /// let q = QConfig::onnxruntime();
    /// assert_eq!(q.weight.range_config()?.quant_range(), (-127, 127));
    /// assert_eq!(q.activation.range_config()?.quant_range(), (0, 255));
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn onnxruntime() -> Self {
        QConfig {
            activation: ObserverSpec::onnxruntime_min_max(DType::QUInt8, QScheme::PerTensorAffine),
            weight: ObserverSpec::onnxruntime_min_max(
                DType::QInt8,
                QScheme::PerChannelSymmetric { axis: 0 },
            )
            .with_range(-127, 127),
            arithmetic: Arithmetic::OnnxRuntime,
        }
    }

    /// [`QConfig::onnxruntime`] with `quantize_static`'s
    /// `calibrate_method=CalibrationMethod.Entropy` (its defaults: 128 bins, 128 quantized
    /// bins) for activations ([`OnnxRuntimeHistogramObserver`]); weights and arithmetic as
    /// in [`QConfig::onnxruntime`].
    ///
    /// # Examples
    /// ```
    /// use ptq::qconfig::{Arithmetic, QConfig};
    /// let q = QConfig::onnxruntime_entropy();
    /// assert_eq!(q.weight, QConfig::onnxruntime().weight);
    /// assert_eq!(q.arithmetic, Arithmetic::OnnxRuntime);
    /// assert_eq!(q.activation.build()?.kind(), "OnnxRuntimeHistogramObserver");
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn onnxruntime_entropy() -> Self {
        QConfig {
            activation: ObserverSpec::with_kind(
                ObserverKind::OnnxRuntimeHistogram(OnnxRuntimeHistMethod::ENTROPY),
                DType::QUInt8,
                QScheme::PerTensorAffine,
            ),
            ..Self::onnxruntime()
        }
    }

    /// [`QConfig::onnxruntime`] with `quantize_static`'s
    /// `calibrate_method=CalibrationMethod.Percentile` (its defaults: 2048 bins, percentile
    /// 99.999, symmetric histogram of `|x|`) for activations
    /// ([`OnnxRuntimeHistogramObserver`]); weights and arithmetic as in
    /// [`QConfig::onnxruntime`].
    pub fn onnxruntime_percentile() -> Self {
        QConfig {
            activation: ObserverSpec::with_kind(
                ObserverKind::OnnxRuntimeHistogram(OnnxRuntimeHistMethod::PERCENTILE),
                DType::QUInt8,
                QScheme::PerTensorAffine,
            ),
            ..Self::onnxruntime()
        }
    }

    /// The preset for a backend name: `"fbgemm"`, `"x86"`, `"qnnpack"`, `"onednn"`,
    /// `"onnxruntime"`.
    ///
    /// `"onednn"` is histogram activations without `reduce_range` and per-channel weights,
    /// as in PyTorch.
    ///
    /// # Errors
    /// [`crate::QuantError::UnsupportedConfig`] for any other name.
    pub fn for_backend(backend: &str) -> Result<Self> {
        match backend {
            "fbgemm" => Ok(Self::fbgemm()),
            "x86" => Ok(Self::x86()),
            "qnnpack" => Ok(Self::qnnpack()),
            "onnxruntime" => Ok(Self::onnxruntime()),
            "onednn" => Ok(QConfig {
                activation: ObserverSpec::histogram(DType::QUInt8, QScheme::PerTensorAffine),
                ..Self::fbgemm()
            }),
            other => Err(crate::QuantError::UnsupportedConfig {
                context: "QConfig::for_backend".into(),
                reason: format!(
                    "backend {other:?} is not one of \"fbgemm\", \"x86\", \"qnnpack\", \"onednn\", \"onnxruntime\""
                ),
            }),
        }
    }

    /// Checks both specs by building an observer from each.
    ///
    /// # Errors
    /// As [`ObserverSpec::build`].
    pub fn validate(&self) -> Result<()> {
        self.activation.build()?;
        self.weight.build()?;
        Ok(())
    }

    /// Checks that the int8 kernels take this config (`quint8` per-tensor activations,
    /// `qint8` weights) and that both specs build; errors name `context`.
    pub(crate) fn check_int8(&self, context: &str) -> Result<()> {
        let refuse = |reason: String| crate::error::QuantError::UnsupportedConfig {
            context: context.into(),
            reason,
        };
        let a = self.activation;
        if a.dtype != DType::QUInt8 || a.qscheme.is_per_channel() {
            return Err(refuse(format!(
                "int8 activations must be quint8 per-tensor; the qconfig's activation spec is {} {}",
                a.dtype,
                a.qscheme.name()
            )));
        }
        if self.weight.dtype != DType::QInt8 {
            return Err(refuse(format!(
                "int8 weights must be qint8; the qconfig's weight spec is {}",
                self.weight.dtype
            )));
        }
        self.validate().map_err(|e| e.in_context(context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_builds_and_has_the_documented_ranges() {
        for (q, act_range, w_range) in [
            (QConfig::fbgemm(), (0, 127), (-128, 127)),
            (QConfig::x86(), (0, 127), (-128, 127)),
            (QConfig::qnnpack(), (0, 255), (-128, 127)),
            (QConfig::default_qconfig(), (0, 127), (-128, 127)),
            (QConfig::default_per_channel(), (0, 127), (-128, 127)),
            (QConfig::minmax_per_tensor(), (0, 127), (-128, 127)),
            (QConfig::minmax_per_channel(), (0, 127), (-128, 127)),
            (QConfig::onnxruntime(), (0, 255), (-127, 127)),
            (QConfig::onnxruntime_entropy(), (0, 255), (-127, 127)),
            (QConfig::onnxruntime_percentile(), (0, 255), (-127, 127)),
        ] {
            q.validate().unwrap();
            assert_eq!(
                q.activation.range_config().unwrap().quant_range(),
                act_range
            );
            assert_eq!(q.weight.range_config().unwrap().quant_range(), w_range);
        }
        assert!(QConfig::for_backend("tensorrt").is_err());
        assert_eq!(QConfig::for_backend("x86").unwrap(), QConfig::fbgemm());
    }

    #[test]
    fn specs_pytorch_rejects_fail_to_build() {
        let sym_u8 = ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorSymmetric)
            .with_reduce_range(true);
        assert!(sym_u8.build().is_err());
        let hist_pc = ObserverSpec::histogram(DType::QUInt8, QScheme::PerChannelAffine { axis: 0 });
        assert!(hist_pc.build().is_err());
        let no_zero =
            ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine).with_range(1, 10);
        assert!(no_zero.build().is_err());
        let ma = ObserverSpec {
            kind: ObserverKind::MovingAverageMinMax {
                averaging_constant: 0.0,
            },
            ..ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine)
        };
        assert!(ma.build().is_err());
    }
}

/// Which [`QConfig`] each layer gets, by dotted name and by layer type, like PyTorch's
/// `qconfig_dict` / `QConfigMapping`: the longest matching name prefix wins, then the
/// layer's type name, then the global config. `None` means "keep this layer in float";
/// the workflow inserts the dequantize / quantize steps around such float islands itself.
///
/// # Examples
/// ```
/// use ptq::qconfig::{QConfig, QConfigMap};
/// let map = QConfigMap::new(QConfig::fbgemm())
///     .set_type("Linear", Some(QConfig::minmax_per_channel()))
///     .set_name("features.0", None); // keep the first block in float
/// assert_eq!(map.qconfig_for("features.0.conv", "Conv2d"), None);
/// assert_eq!(map.qconfig_for("classifier", "Linear"), Some(QConfig::minmax_per_channel()));
/// assert_eq!(map.qconfig_for("features.1.conv", "Conv2d"), Some(QConfig::fbgemm()));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QConfigMap {
    global: Option<QConfig>,
    by_type: Vec<(String, Option<QConfig>)>,
    by_name: Vec<(String, Option<QConfig>)>,
}

impl QConfigMap {
    /// Every layer gets `global` unless an entry says otherwise.
    pub fn new(global: QConfig) -> Self {
        QConfigMap {
            global: Some(global),
            ..Self::default()
        }
    }

    /// No global config: only layers named by entries are quantized.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Sets the config of every layer of a type (`"Conv2d"`, `"LinearReLU"`, ...; see
    /// [`crate::nn::Layer::type_name`]).
    pub fn set_type(mut self, type_name: &str, qconfig: Option<QConfig>) -> Self {
        self.by_type.retain(|(t, _)| t != type_name);
        self.by_type.push((type_name.to_string(), qconfig));
        self
    }

    /// Sets the config of every graph node of an op kind (the typed form of
    /// [`QConfigMap::set_type`]; `OpKind::Conv2d` and the `"Conv2d"` layer type are the
    /// same entry).
    ///
    /// # Examples
    /// ```
    /// use ptq::graph::OpKind;
    /// use ptq::qconfig::{QConfig, QConfigMap};
    /// let map = QConfigMap::new(QConfig::fbgemm()).set_kind(OpKind::Linear, None);
    /// assert_eq!(map.qconfig_for("fc", OpKind::Linear.name()), None);
    /// assert_eq!(map.qconfig_for("conv", OpKind::Conv2d.name()), Some(QConfig::fbgemm()));
    /// ```
    pub fn set_kind(self, kind: crate::graph::OpKind, qconfig: Option<QConfig>) -> Self {
        self.set_type(kind.name(), qconfig)
    }

    /// Sets the config of a layer and everything under it (`"layer1"` covers
    /// `"layer1.0.conv1"`).
    pub fn set_name(mut self, name: &str, qconfig: Option<QConfig>) -> Self {
        self.by_name.retain(|(n, _)| n != name);
        self.by_name.push((name.to_string(), qconfig));
        self
    }

    /// `self` with the entry for type `from` also set for type `to`, unless `to` has an
    /// entry of its own (for layer types that lower into graph ops of another name).
    pub(crate) fn with_type_alias(mut self, from: &str, to: &str) -> Self {
        if self.by_type.iter().any(|(t, _)| t == to) {
            return self;
        }
        if let Some((_, q)) = self.by_type.iter().find(|(t, _)| t == from) {
            let q = *q;
            self.by_type.push((to.to_string(), q));
        }
        self
    }

    /// The config set by name ([`set_name`](Self::set_name)) that covers `path`, if any.
    pub(crate) fn by_name_for(&self, path: &str) -> Option<Option<QConfig>> {
        let covers = |n: &str| {
            path == n
                || (path.len() > n.len() && path.starts_with(n) && path.as_bytes()[n.len()] == b'.')
        };
        self.by_name
            .iter()
            .filter(|(n, _)| covers(n))
            .max_by_key(|(n, _)| n.len())
            .map(|(_, q)| *q)
    }

    /// The config for the layer at `path` of type `type_name`.
    pub fn qconfig_for(&self, path: &str, type_name: &str) -> Option<QConfig> {
        if let Some(q) = self.by_name_for(path) {
            return q;
        }
        if let Some((_, q)) = self.by_type.iter().find(|(t, _)| t == type_name) {
            return *q;
        }
        self.global
    }

    /// Whether the map can quantize anything at all.
    pub fn is_empty(&self) -> bool {
        self.global.is_none()
            && self.by_type.iter().all(|(_, q)| q.is_none())
            && self.by_name.iter().all(|(_, q)| q.is_none())
    }
}
