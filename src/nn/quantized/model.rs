//! [`QuantizedModel`]: the int8 model `convert` returns.

use std::fmt;

use ndarray::{ArrayD, IxDyn};

use super::{
    QAdaptiveAvgPool2d, QAdd, QAvgPool2d, QConv2d, QConvReLU2d, QFlatten, QLinear, QLinearReLU,
    QMaxPool2d, QReLU, QTensor,
};
use crate::error::{QuantError, Result};
use crate::nn::Layer;

/// One operation of a quantized model.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum QOp {
    /// float -> int8 with these parameters (a `QuantStub`, or the border after a float
    /// island).
    Quantize {
        /// Scale.
        scale: f32,
        /// Zero point.
        zero_point: i32,
    },
    /// int8 -> float (a `DeQuantStub`, or the border before a float island).
    Dequantize,
    /// A layer kept in float.
    Float(Layer),
    /// `QLinear`.
    Linear(QLinear),
    /// `QLinearReLU`.
    LinearReLU(QLinearReLU),
    /// `QConv2d`.
    Conv2d(QConv2d),
    /// `QConvReLU2d`.
    ConvReLU2d(QConvReLU2d),
    /// `max(q, zero_point)`.
    ReLU,
    /// `clamp(q, zero_point, q6)` with `q6` the quantized 6.0 (PyTorch's quantized
    /// `relu6`, a `hardtanh` on quantized values).
    ReLU6 {
        /// The quantized value of 6.0 under the input's parameters.
        q6: u8,
    },
    /// Quantized max pooling.
    MaxPool2d(QMaxPool2d),
    /// Quantized average pooling.
    AvgPool2d(QAvgPool2d),
    /// Quantized adaptive average pooling.
    AdaptiveAvgPool2d(QAdaptiveAvgPool2d),
    /// Flattens from `start_dim` on.
    Flatten {
        /// First flattened dimension.
        start_dim: usize,
    },
    /// Passes int8 values through (Dropout and Identity).
    Identity,
    /// `x + body(x)`.
    Residual {
        /// The body.
        body: Vec<QStep>,
        /// Parameters to quantize a float skip input with (`None` if it arrives in int8
        /// or the add runs in float).
        skip_quant: Option<(f32, i32)>,
        /// Parameters to quantize a float body output with.
        body_quant: Option<(f32, i32)>,
        /// The int8 add, or `None` for a float add.
        add: Option<QAdd>,
    },
}

/// A named operation.
#[derive(Debug, Clone)]
pub struct QStep {
    /// The dotted path of the float layer it came from (border steps carry the path of
    /// the layer they serve).
    pub path: String,
    /// The operation.
    pub op: QOp,
}

/// An activation between steps.
#[derive(Debug, Clone)]
pub(crate) enum Act {
    F(ArrayD<f32>),
    Q(QTensor),
}

impl Act {
    fn into_f32(self) -> ArrayD<f32> {
        match self {
            Act::F(x) => x,
            Act::Q(q) => q.dequantize(),
        }
    }

    fn into_q(self, quant: Option<(f32, i32)>, path: &str) -> Result<QTensor> {
        match (self, quant) {
            (Act::Q(q), _) => Ok(q),
            (Act::F(x), Some((s, z))) => {
                QTensor::from_f32(&x, s, z).map_err(|e| e.in_context(path))
            }
            (Act::F(_), None) => Err(QuantError::UnsupportedConfig {
                context: path.into(),
                reason: "an int8 operation received a float activation it has no parameters for"
                    .into(),
            }),
        }
    }

    fn expect_q(self, path: &str) -> Result<QTensor> {
        self.into_q(None, path)
    }
}

fn flatten_q(x: QTensor, start_dim: usize, path: &str) -> Result<QTensor> {
    if start_dim == 1 {
        return QFlatten.forward(&x).map_err(|e| e.in_context(path));
    }
    let shape = x.data().shape().to_vec();
    if start_dim >= shape.len() {
        return Err(QuantError::ShapeMismatch {
            context: path.into(),
            expected: format!("at least {} dimensions", start_dim + 1),
            actual: format!("shape {shape:?}"),
        });
    }
    let mut out = shape[..start_dim].to_vec();
    out.push(shape[start_dim..].iter().product());
    let (s, z) = (x.scale(), x.zero_point());
    let data = x
        .into_data()
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(&out))
        .expect("same element count");
    QTensor::new(data, s, z)
}

/// Called after every step with its path and output (dequantized when int8).
pub type StepHook<'a> = dyn FnMut(&str, &ArrayD<f32>) + 'a;

fn run_steps(steps: &[QStep], mut act: Act, hook: &mut Option<&mut StepHook<'_>>) -> Result<Act> {
    for step in steps {
        act = run_step(step, act, hook)?;
        if let Some(h) = hook.as_mut() {
            match &act {
                Act::F(x) => h(&step.path, x),
                Act::Q(q) => h(&step.path, &q.dequantize()),
            }
        }
    }
    Ok(act)
}

fn run_step(step: &QStep, act: Act, hook: &mut Option<&mut StepHook<'_>>) -> Result<Act> {
    let path = step.path.as_str();
    let ctx = |e: QuantError| e.in_context(path);
    Ok(match &step.op {
        QOp::Quantize { scale, zero_point } => {
            Act::Q(QTensor::from_f32(&act.into_f32(), *scale, *zero_point).map_err(ctx)?)
        }
        QOp::Dequantize => Act::F(act.into_f32()),
        QOp::Float(layer) => Act::F(layer.forward(&act.into_f32()).map_err(ctx)?),
        QOp::Linear(l) => Act::Q(l.forward(&act.expect_q(path)?).map_err(ctx)?),
        QOp::LinearReLU(l) => Act::Q(l.forward(&act.expect_q(path)?).map_err(ctx)?),
        QOp::Conv2d(c) => Act::Q(c.forward(&act.expect_q(path)?).map_err(ctx)?),
        QOp::ConvReLU2d(c) => Act::Q(c.forward(&act.expect_q(path)?).map_err(ctx)?),
        QOp::ReLU => Act::Q(QReLU.forward(&act.expect_q(path)?).map_err(ctx)?),
        QOp::ReLU6 { q6 } => {
            let x = act.expect_q(path)?;
            let (s, z) = (x.scale(), x.zero_point());
            let lo = z.clamp(0, 255) as u8;
            let data = x.into_data().mapv_into(|q| q.clamp(lo, (*q6).max(lo)));
            Act::Q(QTensor::new(data, s, z).map_err(ctx)?)
        }
        QOp::MaxPool2d(p) => Act::Q(p.forward(&act.expect_q(path)?).map_err(ctx)?),
        QOp::AvgPool2d(p) => Act::Q(p.forward(&act.expect_q(path)?).map_err(ctx)?),
        QOp::AdaptiveAvgPool2d(p) => Act::Q(p.forward(&act.expect_q(path)?).map_err(ctx)?),
        QOp::Flatten { start_dim } => Act::Q(flatten_q(act.expect_q(path)?, *start_dim, path)?),
        QOp::Identity => act,
        QOp::Residual {
            body,
            skip_quant,
            body_quant,
            add,
        } => {
            let y = run_steps(body, act.clone(), hook)?;
            match add {
                Some(add) => {
                    let a = act.into_q(*skip_quant, path)?;
                    let b = y.into_q(*body_quant, path)?;
                    Act::Q(add.forward(&a, &b).map_err(ctx)?)
                }
                None => {
                    let (a, b) = (act.into_f32(), y.into_f32());
                    if a.shape() != b.shape() {
                        return Err(QuantError::ShapeMismatch {
                            context: path.into(),
                            expected: format!(
                                "the residual body to keep the input shape {:?}",
                                a.shape()
                            ),
                            actual: format!("output of shape {:?}", b.shape()),
                        });
                    }
                    Act::F(a + b)
                }
            }
        }
    })
}

fn weight_bytes_of(steps: &[QStep]) -> usize {
    steps
        .iter()
        .map(|s| match &s.op {
            QOp::Linear(l) => l.weight_bytes(),
            QOp::LinearReLU(l) => l.weight_bytes(),
            QOp::Conv2d(c) => c.weight_bytes(),
            QOp::ConvReLU2d(c) => c.weight_bytes(),
            QOp::Float(layer) => crate::nn::param_count(layer) * 4,
            QOp::Residual { body, .. } => weight_bytes_of(body),
            _ => 0,
        })
        .sum()
}

/// An int8 model: float in, float out, int8 inside (with any float islands the
/// configuration asked for). Built by [`crate::workflow::convert`].
///
/// `forward` takes `&self` and the model is `Send + Sync`, so one model can serve many
/// threads at once.
#[derive(Debug, Clone)]
pub struct QuantizedModel {
    pub(crate) steps: Vec<QStep>,
    pub(crate) float_weight_bytes: usize,
}

impl QuantizedModel {
    /// Builds a model from steps (as `convert` does). `float_weight_bytes` is the size of
    /// the float model's parameters, for [`QuantizedModel::float_weight_bytes`].
    ///
    /// Besides `convert` and [`QuantizedModel::load`], this is the way to assemble an int8
    /// model from int8 weights you already have: build each layer with its validating
    /// constructor (`QConv2d::from_quantized`, `QLinear::from_quantized`, ...) and list
    /// them in order. Nothing is skipped: each layer checked its own parameters, and
    /// `forward` checks every step's input shape.
    pub fn from_steps(steps: Vec<QStep>, float_weight_bytes: usize) -> Self {
        QuantizedModel {
            steps,
            float_weight_bytes,
        }
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[QStep] {
        &self.steps
    }

    /// Runs the model: NCHW (or `[N, features]`) `f32` in, `f32` out.
    ///
    /// # Errors
    /// [`QuantError::NonFinite`] for NaN or infinite input, and shape errors naming the
    /// layer and both shapes.
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        crate::qparams::check_finite(x, "QuantizedModel input")?;
        Ok(run_steps(&self.steps, Act::F(x.clone()), &mut None)?.into_f32())
    }

    /// As [`QuantizedModel::forward`], calling `hook(path, output)` after every step with
    /// the step's output as floats (int8 outputs dequantized). Border steps carry the path
    /// of the layer they serve and come first, so the last call for a path is that
    /// layer's own output; residual bodies report their inner steps, then the add.
    ///
    /// # Errors
    /// As [`QuantizedModel::forward`].
    pub fn forward_with_hook(
        &self,
        x: &ArrayD<f32>,
        hook: &mut StepHook<'_>,
    ) -> Result<ArrayD<f32>> {
        crate::qparams::check_finite(x, "QuantizedModel input")?;
        Ok(run_steps(&self.steps, Act::F(x.clone()), &mut Some(hook))?.into_f32())
    }

    /// Bytes of the weights as stored in this model: packed int8 weights, their scales,
    /// zero-point corrections and float biases, plus the parameters of layers kept in float.
    pub fn weight_bytes(&self) -> usize {
        weight_bytes_of(&self.steps)
    }

    /// Bytes of the float model's parameters (`f32`).
    pub fn float_weight_bytes(&self) -> usize {
        self.float_weight_bytes
    }
}

fn describe(op: &QOp) -> String {
    match op {
        QOp::Quantize { scale, zero_point } => {
            format!("Quantize(scale={scale:e}, zero_point={zero_point})")
        }
        QOp::Dequantize => "Dequantize".into(),
        QOp::Float(l) => format!("{} (float)", l.type_name()),
        QOp::Linear(l) => format!("QLinear({} -> {})", l.in_features(), l.out_features()),
        QOp::LinearReLU(l) => format!(
            "QLinearReLU({} -> {})",
            l.inner().in_features(),
            l.inner().out_features()
        ),
        QOp::Conv2d(c) => format!("QConv2d({} -> {})", c.in_channels(), c.out_channels()),
        QOp::ConvReLU2d(c) => format!(
            "QConvReLU2d({} -> {})",
            c.inner().in_channels(),
            c.inner().out_channels()
        ),
        QOp::ReLU => "QReLU".into(),
        QOp::ReLU6 { .. } => "QReLU6".into(),
        QOp::MaxPool2d(_) => "QMaxPool2d".into(),
        QOp::AvgPool2d(_) => "QAvgPool2d".into(),
        QOp::AdaptiveAvgPool2d(_) => "QAdaptiveAvgPool2d".into(),
        QOp::Flatten { .. } => "QFlatten".into(),
        QOp::Identity => "Identity".into(),
        QOp::Residual { add, .. } => match add {
            Some(_) => "Residual (int8 add)".into(),
            None => "Residual (float add)".into(),
        },
    }
}

fn write_steps(f: &mut fmt::Formatter<'_>, steps: &[QStep], indent: usize) -> fmt::Result {
    for s in steps {
        writeln!(
            f,
            "{:indent$}{:<28} {}",
            "",
            s.path,
            describe(&s.op),
            indent = indent
        )?;
        if let QOp::Residual { body, .. } = &s.op {
            write_steps(f, body, indent + 2)?;
        }
    }
    Ok(())
}

impl fmt::Display for QuantizedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_steps(f, &self.steps, 0)?;
        write!(
            f,
            "weights: {} bytes int8 model, {} bytes float model",
            self.weight_bytes(),
            self.float_weight_bytes
        )
    }
}
