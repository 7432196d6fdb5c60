//! [`QuantizedModel`]: the int8 model `convert` returns.

use std::fmt;

use ndarray::{ArrayD, IxDyn};

use super::{
    QAdaptiveAvgPool2d, QAdd, QAvgPool2d, QConv2d, QConvReLU2d, QFlatten, QLinear, QLinearReLU,
    QMaxPool2d, QTensor,
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

/// An activation between steps: float, int8 in logical (NCHW) order, or a rank-4 int8
/// tensor held `[n, h, w, c]` (what convolutions read and write, kept so between int8
/// layers and transposed only where a layer needs the logical order).
#[derive(Debug, Clone)]
pub(crate) enum Act {
    F(ArrayD<f32>),
    Q(QTensor),
    Nhwc(QTensor),
}

/// `[n, h, w, c]` <-> `[n, c, h, w]` (`to_nhwc` picks the direction).
fn transpose4(x: &QTensor, to_nhwc: bool) -> QTensor {
    let s = x.data().shape();
    let (shape, v) = if to_nhwc {
        ([s[0], s[2], s[3], s[1]], x.to_nhwc())
    } else {
        let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
        (
            [b, c, h, w],
            super::nhwc_to_nchw_u8(&x.to_vec(), b, c, h * w),
        )
    };
    let data = ArrayD::from_shape_vec(IxDyn(&shape), v)
        .unwrap_or_else(|_| unreachable!("a transpose keeps the element count"));
    QTensor::new(data, x.scale(), x.zero_point())
        .unwrap_or_else(|_| unreachable!("the qparams come from a valid QTensor"))
}

impl Act {
    fn into_f32(self) -> ArrayD<f32> {
        match self {
            Act::F(x) => x,
            Act::Q(q) => q.dequantize(),
            Act::Nhwc(q) => transpose4(&q, false).dequantize(),
        }
    }

    /// The int8 tensor in logical order.
    fn into_q(self, quant: Option<(f32, i32)>, path: &str) -> Result<QTensor> {
        match (self, quant) {
            (Act::Q(q), _) => Ok(q),
            (Act::Nhwc(q), _) => Ok(transpose4(&q, false)),
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

    /// The int8 tensor held NHWC if it is rank 4 (`Ok(Act::Nhwc)`), else in logical order
    /// (`Ok(Act::Q)`).
    fn into_layout_for_nhwc(self, quant: Option<(f32, i32)>, path: &str) -> Result<Act> {
        Ok(match self {
            Act::Nhwc(q) => Act::Nhwc(q),
            other => {
                let q = other.into_q(quant, path)?;
                if q.data().ndim() == 4 {
                    Act::Nhwc(transpose4(&q, true))
                } else {
                    Act::Q(q)
                }
            }
        })
    }

    /// Dequantized, in logical order, for hooks.
    fn to_f32(&self) -> ArrayD<f32> {
        match self {
            Act::F(x) => x.clone(),
            Act::Q(q) => q.dequantize(),
            Act::Nhwc(q) => transpose4(q, false).dequantize(),
        }
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
                q => h(&step.path, &q.to_f32()),
            }
        }
    }
    Ok(act)
}

/// Runs `f` on the int8 tensor as held (NHWC or logical order); the result keeps the
/// layout.
fn keep_layout(
    act: Act,
    path: &str,
    on_nchw: impl FnOnce(&QTensor) -> Result<QTensor>,
    on_nhwc: impl FnOnce(&QTensor) -> Result<QTensor>,
) -> Result<Act> {
    let ctx = |e: QuantError| e.in_context(path);
    Ok(match act {
        Act::Nhwc(q) => Act::Nhwc(on_nhwc(&q).map_err(ctx)?),
        other => Act::Q(on_nchw(&other.expect_q(path)?).map_err(ctx)?),
    })
}

/// A layout-agnostic map of the int8 values.
fn map_q(act: Act, path: &str, f: impl Fn(u8) -> u8) -> Result<Act> {
    let remap = |q: QTensor| -> Result<QTensor> {
        let (s, z) = (q.scale(), q.zero_point());
        QTensor::new(q.into_data().mapv_into(&f), s, z).map_err(|e| e.in_context(path))
    };
    Ok(match act {
        Act::Nhwc(q) => Act::Nhwc(remap(q)?),
        other => Act::Q(remap(other.expect_q(path)?)?),
    })
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
        QOp::Conv2d(c) => match act.into_layout_for_nhwc(None, path)? {
            Act::Nhwc(x) => Act::Nhwc(c.forward_nhwc(&x).map_err(ctx)?),
            other => Act::Q(c.forward(&other.expect_q(path)?).map_err(ctx)?),
        },
        QOp::ConvReLU2d(c) => match act.into_layout_for_nhwc(None, path)? {
            Act::Nhwc(x) => Act::Nhwc(
                c.inner()
                    .forward_nhwc(&x)
                    .map_err(|e| e.in_context("QConvReLU2d"))
                    .map_err(ctx)?,
            ),
            other => Act::Q(c.forward(&other.expect_q(path)?).map_err(ctx)?),
        },
        QOp::ReLU => {
            let zp = act_zero_point(&act, path)?;
            map_q(act, path, |q| q.max(zp))?
        }
        QOp::ReLU6 { q6 } => {
            let lo = act_zero_point(&act, path)?;
            let hi = (*q6).max(lo);
            map_q(act, path, |q| q.clamp(lo, hi))?
        }
        QOp::MaxPool2d(p) => keep_layout(act, path, |x| p.forward(x), |x| p.forward_nhwc(x))?,
        QOp::AvgPool2d(p) => keep_layout(act, path, |x| p.forward(x), |x| p.forward_nhwc(x))?,
        QOp::AdaptiveAvgPool2d(p) => {
            keep_layout(act, path, |x| p.forward(x), |x| p.forward_nhwc(x))?
        }
        QOp::Flatten { start_dim } => {
            // NHWC data of one pixel (or one channel) already are in logical order.
            let x = match act {
                Act::Nhwc(q) => {
                    let s = q.data().shape();
                    if s[3] == 1 || s[1] * s[2] == 1 {
                        let shape = [s[0], s[3], s[1], s[2]];
                        let (sc, z) = (q.scale(), q.zero_point());
                        let data =
                            q.into_data()
                                .into_shape_with_order(IxDyn(&shape))
                                .map_err(|e| QuantError::ShapeMismatch {
                                    context: path.into(),
                                    expected: format!("{shape:?}"),
                                    actual: e.to_string(),
                                })?;
                        QTensor::new(data, sc, z).map_err(ctx)?
                    } else {
                        transpose4(&q, false)
                    }
                }
                other => other.expect_q(path)?,
            };
            Act::Q(flatten_q(x, *start_dim, path)?)
        }
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
                    let nhwc = matches!(act, Act::Nhwc(_)) || matches!(y, Act::Nhwc(_));
                    if nhwc {
                        let a = act.into_layout_for_nhwc(*skip_quant, path)?;
                        let b = y.into_layout_for_nhwc(*body_quant, path)?;
                        match (a, b) {
                            (Act::Nhwc(a), Act::Nhwc(b)) => {
                                Act::Nhwc(add.forward_nhwc(&a, &b).map_err(ctx)?)
                            }
                            (a, b) => Act::Q(
                                add.forward(&a.expect_q(path)?, &b.expect_q(path)?)
                                    .map_err(ctx)?,
                            ),
                        }
                    } else {
                        let a = act.into_q(*skip_quant, path)?;
                        let b = y.into_q(*body_quant, path)?;
                        Act::Q(add.forward(&a, &b).map_err(ctx)?)
                    }
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

/// The zero point of an int8 activation (for ReLU and ReLU6).
fn act_zero_point(act: &Act, path: &str) -> Result<u8> {
    match act {
        Act::Q(q) | Act::Nhwc(q) => Ok(q.zero_point().clamp(0, 255) as u8),
        Act::F(_) => Err(QuantError::UnsupportedConfig {
            context: path.into(),
            reason: "an int8 operation received a float activation it has no parameters for".into(),
        }),
    }
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
