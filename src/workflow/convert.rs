//! `convert`: observers' ranges become quantization parameters, weights become packed
//! int8, and the plan becomes a [`QuantizedModel`].

use std::collections::BTreeMap;

use super::prepare::{Domain, PlanNode, Prepared};
use crate::error::{QuantError, Result};
use crate::nn::quantized::{
    Conv2dParams, QAdaptiveAvgPool2d, QAdd, QAvgPool2d, QConv2d, QConvReLU2d, QLinear, QLinearReLU,
    QMaxPool2d, QOp, QStep, QuantizedModel, TorchLayout,
};
use crate::nn::{param_count, Conv2d, Layer, Linear, PoolKind, Sequential};
use crate::observer::Observer;
use crate::qconfig::QConfig;
use crate::qparams::{quantize_val, DType, QParams};

struct Converter<'p> {
    model: &'p Sequential,
    observers: &'p BTreeMap<String, Box<dyn Observer>>,
}

/// The activation parameters observed at `path`, which must suit the int8 kernels
/// (`quint8`, per tensor).
fn act_qparams(observers: &BTreeMap<String, Box<dyn Observer>>, path: &str) -> Result<(f32, i32)> {
    let obs = observers
        .get(path)
        .ok_or_else(|| QuantError::UnsupportedConfig {
            context: path.into(),
            reason: "no activation observer was planned here".into(),
        })?;
    let qp = obs.qparams().map_err(|e| e.in_context(path))?;
    if qp.dtype() != DType::QUInt8 || qp.scheme().is_per_channel() {
        return Err(QuantError::UnsupportedConfig {
            context: path.into(),
            reason: format!(
                "the int8 kernels take quint8 per-tensor activations; the activation observer gives {} {}",
                qp.dtype(),
                qp.scheme().name()
            ),
        });
    }
    Ok((qp.scale(), qp.zero_point()))
}

/// The weight parameters `qconfig.weight` chooses for `weight`.
fn weight_qparams(
    qc: &QConfig,
    weight: ndarray::ArrayViewD<'_, f32>,
    path: &str,
) -> Result<QParams> {
    let mut obs = qc.weight.build().map_err(|e| e.in_context(path))?;
    obs.observe(weight).map_err(|e| e.in_context(path))?;
    obs.qparams().map_err(|e| e.in_context(path))
}

fn conv_params(c: &Conv2d) -> Conv2dParams {
    Conv2dParams {
        stride: c.stride,
        padding: c.padding,
        dilation: c.dilation,
        groups: c.groups,
    }
}

fn build_conv(c: &Conv2d, qc: &QConfig, out: (f32, i32), relu: bool, path: &str) -> Result<QOp> {
    let wqp = weight_qparams(qc, c.weight.view().into_dyn(), path)?;
    let bias = c.bias.as_ref().map(|b| b.view());
    let ctx = |e: QuantError| e.in_context(path);
    Ok(if relu {
        QOp::ConvReLU2d(
            QConvReLU2d::new(c.weight.view(), bias, &wqp, conv_params(c), out.0, out.1)
                .map_err(ctx)?,
        )
    } else {
        QOp::Conv2d(
            QConv2d::new(c.weight.view(), bias, &wqp, conv_params(c), out.0, out.1).map_err(ctx)?,
        )
    })
}

fn build_linear(l: &Linear, qc: &QConfig, out: (f32, i32), relu: bool, path: &str) -> Result<QOp> {
    let wqp = weight_qparams(qc, l.weight.view().into_dyn(), path)?;
    let bias = l.bias.as_ref().map(|b| b.view());
    let ctx = |e: QuantError| e.in_context(path);
    Ok(if relu {
        QOp::LinearReLU(QLinearReLU::new(l.weight.view(), bias, &wqp, out.0, out.1).map_err(ctx)?)
    } else {
        QOp::Linear(QLinear::new(l.weight.view(), bias, &wqp, out.0, out.1).map_err(ctx)?)
    })
}

/// The running state of the conversion: which domain the activation is in, and (for
/// int8) PyTorch's memory layout, which decides the rounding of average pools and adds.
#[derive(Clone)]
struct State {
    domain: Domain,
    layout: TorchLayout,
}

impl Converter<'_> {
    fn step(path: &str, op: QOp) -> QStep {
        QStep {
            path: path.to_string(),
            op,
        }
    }

    /// Brings the activation into int8 for a consumer planned to read `wanted`.
    fn to_int8(
        &self,
        st: &mut State,
        wanted: &Domain,
        path: &str,
        out: &mut Vec<QStep>,
    ) -> Result<()> {
        if let (Domain::Float(_), Domain::Quant(src)) = (&st.domain, wanted) {
            let (scale, zero_point) = act_qparams(self.observers, src)?;
            out.push(Self::step(path, QOp::Quantize { scale, zero_point }));
            st.domain = wanted.clone();
            st.layout = TorchLayout::Contiguous;
        }
        Ok(())
    }

    fn to_float(st: &mut State, path: &str, out: &mut Vec<QStep>) {
        if let Domain::Quant(_) = st.domain {
            out.push(Self::step(path, QOp::Dequantize));
            st.domain = Domain::Float(path.to_string());
        }
    }

    fn nodes(&self, nodes: &[PlanNode], st: &mut State) -> Result<Vec<QStep>> {
        let mut out = Vec::new();
        for node in nodes {
            match node {
                PlanNode::Leaf {
                    path,
                    qconfig,
                    int8,
                    input,
                    output,
                } => {
                    let layer =
                        self.model
                            .get(path)
                            .ok_or_else(|| QuantError::UnsupportedConfig {
                                context: path.clone(),
                                reason: "the plan names a layer the model does not have".into(),
                            })?;
                    match (int8, qconfig) {
                        (true, Some(qc)) => self.int8_leaf(layer, qc, path, input, st, &mut out)?,
                        _ => {
                            Self::to_float(st, path, &mut out);
                            if !matches!(
                                layer,
                                Layer::QuantStub
                                    | Layer::DeQuantStub
                                    | Layer::Identity
                                    | Layer::Dropout
                            ) {
                                out.push(Self::step(path, QOp::Float(layer.clone())));
                            }
                        }
                    }
                    st.domain = output.clone();
                }
                PlanNode::Residual {
                    path,
                    qconfig,
                    input,
                    body,
                    body_output,
                    output,
                } => {
                    let skip = st.clone();
                    let mut inner = st.clone();
                    let body_steps = self.nodes(body, &mut inner)?;
                    let quant_for = |s: &State, wanted: &Domain| -> Result<Option<(f32, i32)>> {
                        match (&s.domain, wanted) {
                            (Domain::Float(_), Domain::Quant(src)) => {
                                Ok(Some(act_qparams(self.observers, src)?))
                            }
                            _ => Ok(None),
                        }
                    };
                    let (skip_quant, body_quant, add, layout) = match qconfig {
                        Some(_) => {
                            let (s, z) = act_qparams(self.observers, path)?;
                            // PyTorch's add writes in its first input's memory format.
                            let layout = match skip.domain {
                                Domain::Quant(_) => skip.layout,
                                Domain::Float(_) => TorchLayout::Contiguous,
                            };
                            let add = QAdd::new(s, z)
                                .map_err(|e| e.in_context(path))?
                                .with_layout(layout);
                            (
                                quant_for(&skip, input)?,
                                quant_for(&inner, body_output)?,
                                Some(add),
                                layout,
                            )
                        }
                        None => (None, None, None, TorchLayout::Contiguous),
                    };
                    st.layout = layout;
                    out.push(Self::step(
                        path,
                        QOp::Residual {
                            body: body_steps,
                            skip_quant,
                            body_quant,
                            add,
                        },
                    ));
                    st.domain = output.clone();
                }
            }
        }
        Ok(out)
    }

    fn int8_leaf(
        &self,
        layer: &Layer,
        qc: &QConfig,
        path: &str,
        input: &Domain,
        st: &mut State,
        out: &mut Vec<QStep>,
    ) -> Result<()> {
        let ctx = |e: QuantError| e.in_context(path);
        match layer {
            Layer::QuantStub => {
                Self::to_float(st, path, out);
                let (scale, zero_point) = act_qparams(self.observers, path)?;
                out.push(Self::step(path, QOp::Quantize { scale, zero_point }));
                st.layout = TorchLayout::Contiguous;
                return Ok(());
            }
            Layer::Conv2d(_) | Layer::ConvReLU2d(_) | Layer::Linear(_) | Layer::LinearReLU(_) => {
                self.to_int8(st, input, path, out)?;
            }
            _ => {}
        }
        let op = match layer {
            Layer::Conv2d(c) => build_conv(c, qc, act_qparams(self.observers, path)?, false, path)?,
            Layer::ConvReLU2d(c) => {
                build_conv(c, qc, act_qparams(self.observers, path)?, true, path)?
            }
            Layer::Linear(l) => {
                build_linear(l, qc, act_qparams(self.observers, path)?, false, path)?
            }
            Layer::LinearReLU(l) => {
                build_linear(l, qc, act_qparams(self.observers, path)?, true, path)?
            }
            Layer::ReLU => QOp::ReLU,
            Layer::ReLU6 => {
                let Domain::Quant(src) = &st.domain else {
                    return Err(QuantError::UnsupportedConfig {
                        context: path.into(),
                        reason: "an int8 ReLU6 needs an int8 input".into(),
                    });
                };
                let (s, z) = act_qparams(self.observers, src)?;
                QOp::ReLU6 {
                    q6: quantize_val(6.0, s, z, 0, 255) as u8,
                }
            }
            Layer::Pool2d(p) => match p.kind {
                PoolKind::Max => QOp::MaxPool2d(
                    QMaxPool2d::new(p.kernel, p.stride, p.padding, (1, 1)).map_err(ctx)?,
                ),
                PoolKind::Avg => QOp::AvgPool2d(
                    QAvgPool2d::new(p.kernel, p.stride, p.padding, true)
                        .map_err(ctx)?
                        .with_layout(st.layout),
                ),
            },
            Layer::AdaptiveAvgPool2d(o) => QOp::AdaptiveAvgPool2d(
                QAdaptiveAvgPool2d::new(*o)
                    .map_err(ctx)?
                    .with_layout(st.layout),
            ),
            Layer::Flatten { start_dim } => QOp::Flatten {
                start_dim: *start_dim,
            },
            Layer::Dropout | Layer::Identity => QOp::Identity,
            other => {
                return Err(QuantError::UnsupportedConfig {
                    context: path.into(),
                    reason: format!("{} has no int8 version", other.type_name()),
                })
            }
        };
        st.layout = match &op {
            QOp::Conv2d(_) | QOp::ConvReLU2d(_) => TorchLayout::ChannelsLast,
            QOp::Linear(_) | QOp::LinearReLU(_) | QOp::Flatten { .. } => TorchLayout::Contiguous,
            _ => st.layout,
        };
        out.push(Self::step(path, op));
        Ok(())
    }
}

/// Converts a calibrated model to int8: every activation observer's range becomes a scale
/// and zero point, every weight is observed with its layer's weight spec, quantized and
/// packed, and layers planned in float stay float behind automatic dequantize / quantize
/// steps.
///
/// # Errors
/// [`QuantError::UncalibratedLayers`] listing every observer that saw no data (nothing is
/// converted); [`QuantError::UnsupportedConfig`] naming the layer if an activation spec is
/// not `quint8` per-tensor or a weight spec not `qint8`; the kernels' own errors, named
/// with the layer.
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2, ArrayD, IxDyn};
/// use ptq::nn::{Layer, Linear, Sequential};
/// use ptq::qconfig::{QConfig, QConfigMap};
/// use ptq::workflow::{calibrate, convert, prepare};
/// use ptq::QuantError;
/// let model = || Sequential::new()
///     .push("quant", Layer::QuantStub)
///     .push("fc", Layer::Linear(Linear::new(Array2::eye(4), Some(Array1::zeros(4))).unwrap()))
///     .push("dequant", Layer::DeQuantStub);
/// let map = QConfigMap::new(QConfig::fbgemm());
///
/// // The classic mistake is an error naming every layer that saw nothing.
/// let err = convert(prepare(model(), &map)?).unwrap_err();
/// assert_eq!(err, QuantError::UncalibratedLayers { layers: vec!["fc".into(), "quant".into()] });
///
/// let mut prepared = prepare(model(), &map)?;
/// calibrate(&mut prepared, (0..4).map(|i| ArrayD::from_elem(IxDyn(&[2, 4]), i as f32 * 0.25)), |_| {})?;
/// let int8 = convert(prepared)?;
/// let y = int8.forward(&ArrayD::from_elem(IxDyn(&[1, 4]), 0.5))?;
/// assert!((y[[0, 2]] - 0.5).abs() < 0.01);
/// # Ok::<(), QuantError>(())
/// ```
pub fn convert(prepared: Prepared) -> Result<QuantizedModel> {
    let uncalibrated: Vec<String> = prepared
        .observers
        .iter()
        .filter(|(_, o)| !o.is_calibrated())
        .map(|(p, _)| p.clone())
        .collect();
    if !uncalibrated.is_empty() {
        return Err(QuantError::UncalibratedLayers {
            layers: uncalibrated,
        });
    }
    let conv = Converter {
        model: &prepared.model,
        observers: &prepared.observers,
    };
    let mut st = State {
        domain: Domain::Float(super::INPUT.to_string()),
        layout: TorchLayout::Contiguous,
    };
    let steps = conv.nodes(&prepared.plan, &mut st)?;
    let float_bytes = prepared
        .model
        .children()
        .iter()
        .map(|(_, l)| param_count(l) * 4)
        .sum();
    Ok(QuantizedModel::from_steps(steps, float_bytes))
}
