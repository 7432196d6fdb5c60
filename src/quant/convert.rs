//! `convert`: a walk over the prepared graph; each int8 op builds itself from its node,
//! its inputs' and output's observed parameters and its config (`from_observed`).

use std::collections::BTreeMap;

use ndarray::ArrayD;

use super::exec::{QNode, QuantizedGraph};
use super::ops::{
    AdaptiveAvgPoolOp, AddOp, AvgPoolOp, BatchNormOp, BilinearUpsampleOp, CatOp, ClampOp, ConvOp,
    DequantizeOp, FlattenOp, HardswishOp, IdentityOp, InputOp, LayerNormOp, LinearOp, MaxPoolOp,
    MeanOp, MulOp, PermuteOp, QuantizeOp, ReluOp, ReshapeOp, SigmoidOp, SliceOp, UpsampleOp,
};
use super::prepare::{Domain, PreparedGraph};
use super::{ExecCtx, OpRecordWriter, QuantOp, Value};
use crate::error::{QuantError, Result};
use crate::graph::{NearestRule, Node, NodeId, Op, UpsampleMode};
use crate::nn::quantized::{Conv2dParams, QBatchNorm2d, QUpsampleNearest2d, UpsampleSize};
use crate::observer::Observer;
use crate::qconfig::{Arithmetic, QConfig};
use crate::qparams::{ActQParams, QParams};

/// What every int8 op gets from `convert`: its float node, its inputs' parameters, its own
/// output parameters (requantizing ops) and its config.
pub struct Observed<'a> {
    /// The float node.
    pub node: &'a Node,
    /// The parameters of each (int8) input.
    pub inputs: &'a [ActQParams],
    /// The parameters of its own output observer, for ops that requantize.
    pub out: Option<ActQParams>,
    /// The node's config.
    pub qconfig: &'a QConfig,
}

impl Observed<'_> {
    fn out(&self) -> Result<ActQParams> {
        self.out
            .ok_or_else(|| internal(self.node, "no output observer"))
    }
    fn input(&self, k: usize) -> Result<ActQParams> {
        self.inputs
            .get(k)
            .copied()
            .ok_or_else(|| internal(self.node, "missing int8 input"))
    }
    /// The weight qparams `qconfig.weight` chooses for `w`.
    fn weight_qparams(&self, w: ndarray::ArrayViewD<'_, f32>) -> Result<QParams> {
        let name = &self.node.name;
        let mut obs = self
            .qconfig
            .weight
            .build()
            .map_err(|e| e.in_context(name))?;
        obs.observe(w).map_err(|e| e.in_context(name))?;
        obs.qparams().map_err(|e| e.in_context(name))
    }
}

fn internal(node: &Node, what: &str) -> QuantError {
    QuantError::UnsupportedConfig {
        context: node.name.clone(),
        reason: format!("convert: {what} (the plan and the op disagree; a bug)"),
    }
}

/// Builds an op from what `convert` observed.
pub trait FromObserved: Sized {
    /// Builds the int8 op for `o.node`.
    ///
    /// # Errors
    /// Kernel constructor errors (bad weights, shapes), named with the node.
    fn from_observed(o: &Observed<'_>) -> Result<Self>;
}

impl FromObserved for ConvOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        let (c, relu) = match &o.node.op {
            Op::Conv2d(c) => (c, false),
            Op::ConvReLU2d(c) => (c, true),
            _ => return Err(internal(o.node, "ConvOp from a non-convolution")),
        };
        let wqp = o.weight_qparams(c.weight.view().into_dyn())?;
        let params = Conv2dParams {
            stride: c.stride,
            padding: c.padding,
            dilation: c.dilation,
            groups: c.groups,
        };
        ConvOp::from_float(
            c.weight.view(),
            c.bias.as_ref().map(|b| b.view()),
            &wqp,
            params,
            o.out()?,
            relu,
        )
        .map(|op| op.with_bias_mode(o.qconfig.arithmetic.bias_mode()))
    }
}

impl FromObserved for LinearOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        let (l, relu) = match &o.node.op {
            Op::Linear(l) => (l, false),
            Op::LinearReLU(l) => (l, true),
            _ => return Err(internal(o.node, "LinearOp from a non-linear node")),
        };
        let wqp = o.weight_qparams(l.weight.view().into_dyn())?;
        LinearOp::from_float(
            l.weight.view(),
            l.bias.as_ref().map(|b| b.view()),
            &wqp,
            o.out()?,
            relu,
        )
        .map(|op| op.with_bias_mode(o.qconfig.arithmetic.bias_mode()))
    }
}

impl FromObserved for AddOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        Ok(AddOp::new(o.out()?, matches!(o.node.op, Op::AddReLU))
            .with_onnxruntime_arithmetic(o.qconfig.arithmetic == Arithmetic::OnnxRuntime))
    }
}

impl FromObserved for ReluOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        Ok(ReluOp::new(o.input(0)?))
    }
}

impl FromObserved for ClampOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        match o.node.op {
            Op::Clamp { min, max } => ClampOp::new(min, max, o.input(0)?),
            _ => Err(internal(o.node, "ClampOp from a non-clamp")),
        }
    }
}

impl FromObserved for MaxPoolOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        match &o.node.op {
            Op::MaxPool2d(p) => MaxPoolOp::new(
                p.kernel,
                p.stride,
                (p.padding.0, p.padding.1),
                p.dilation,
                o.input(0)?,
            ),
            _ => Err(internal(o.node, "MaxPoolOp from a non-max-pool")),
        }
    }
}

impl FromObserved for AvgPoolOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        match &o.node.op {
            Op::AvgPool2d(p) => AvgPoolOp::new(
                p.kernel,
                p.stride,
                (p.padding.0, p.padding.1),
                p.count_include_pad,
                o.input(0)?,
            ),
            _ => Err(internal(o.node, "AvgPoolOp from a non-avg-pool")),
        }
    }
}

impl FromObserved for AdaptiveAvgPoolOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        match &o.node.op {
            Op::AdaptiveAvgPool2d(s) => Ok(AdaptiveAvgPoolOp::new(*s, o.input(0)?)?
                .with_onnxruntime_arithmetic(o.qconfig.arithmetic == Arithmetic::OnnxRuntime)),
            _ => Err(internal(o.node, "AdaptiveAvgPoolOp from another op")),
        }
    }
}

impl FromObserved for FlattenOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        match &o.node.op {
            Op::Flatten { start_dim, end_dim } => {
                Ok(FlattenOp::new(*start_dim, *end_dim, o.input(0)?))
            }
            _ => Err(internal(o.node, "FlattenOp from another op")),
        }
    }
}

impl FromObserved for ReshapeOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        match &o.node.op {
            Op::Reshape { shape } => Ok(ReshapeOp::new(shape.clone(), o.input(0)?)),
            _ => Err(internal(o.node, "ReshapeOp from another op")),
        }
    }
}

impl FromObserved for IdentityOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        Ok(IdentityOp::new(Some(o.input(0)?)))
    }
}

impl FromObserved for MulOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        Ok(MulOp::new(o.out()?, false))
    }
}

impl FromObserved for CatOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        match o.node.op {
            Op::Concat { axis } => CatOp::new(axis, o.node.inputs.len(), o.out()?),
            _ => Err(internal(o.node, "CatOp from a non-concat")),
        }
    }
}

impl FromObserved for HardswishOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        Ok(HardswishOp::new(o.out()?))
    }
}

impl FromObserved for SigmoidOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        let hard = matches!(o.node.op, Op::Hardsigmoid);
        Ok(SigmoidOp::new(hard)
            .with_onnxruntime_arithmetic(hard && o.qconfig.arithmetic == Arithmetic::OnnxRuntime))
    }
}

/// The upsampling node's size or scale factors.
fn upsample_size(o: &Observed<'_>) -> Result<(UpsampleSize, UpsampleMode)> {
    let Op::Upsample(u) = &o.node.op else {
        return Err(internal(o.node, "upsample op from another op"));
    };
    let size = match (u.size, u.scale_factor) {
        (Some((h, w)), _) => UpsampleSize::Size(h, w),
        (None, Some((h, w))) => UpsampleSize::Scale(h as f64, w as f64),
        (None, None) => return Err(internal(o.node, "upsample without size or scale")),
    };
    Ok((size, u.mode))
}

impl FromObserved for BilinearUpsampleOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        match upsample_size(o)? {
            (size, UpsampleMode::Bilinear { align_corners }) => {
                BilinearUpsampleOp::new(size, align_corners, o.input(0)?)
            }
            _ => Err(internal(o.node, "bilinear upsample of another mode")),
        }
    }
}

impl FromObserved for UpsampleOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        let (size, mode) = upsample_size(o)?;
        let mut up = QUpsampleNearest2d::new(size)?;
        match mode {
            UpsampleMode::Nearest(NearestRule::Floor) => {}
            UpsampleMode::Nearest(NearestRule::Exact) => up = up.with_exact(),
            _ => return Err(internal(o.node, "int8 upsample of a mode without a kernel")),
        }
        Ok(UpsampleOp::new(up, o.input(0)?))
    }
}

impl FromObserved for BatchNormOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        let Op::BatchNorm2d(b) = &o.node.op else {
            return Err(internal(o.node, "BatchNormOp from another op"));
        };
        let out = o.out()?;
        BatchNormOp::new(QBatchNorm2d::new(
            Some(b.weight.view()),
            Some(b.bias.view()),
            b.running_mean.view(),
            b.running_var.view(),
            b.eps as f64,
            out.scale(),
            out.zero_point(),
        )?)
    }
}

impl FromObserved for LayerNormOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        let Op::LayerNorm(l) = &o.node.op else {
            return Err(internal(o.node, "LayerNormOp from another op"));
        };
        let out = o.out()?;
        let flat =
            |a: &Option<ndarray::ArrayD<f32>>| a.as_ref().map(|a| a.iter().copied().collect());
        let (w, b): (Option<Vec<f32>>, Option<Vec<f32>>) = (flat(&l.weight), flat(&l.bias));
        // PyTorch keeps eps as a Python float (f64); the graph holds it as f32, so take the
        // f64 that prints as the f32 does (1e-5f32 -> 1e-5, not 1.0000000000000000818e-5).
        let eps = l.eps.to_string().parse::<f64>().unwrap_or(l.eps as f64);
        let ln = crate::nn::quantized::QLayerNorm::new(
            &l.normalized_shape,
            w.as_deref().map(ndarray::ArrayView1::from),
            b.as_deref().map(ndarray::ArrayView1::from),
            eps,
            out.scale(),
            out.zero_point(),
        )
        .map_err(|e| e.in_context(&o.node.name))?;
        LayerNormOp::new(ln)
    }
}

impl FromObserved for PermuteOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        match &o.node.op {
            Op::Permute { dims } => Ok(PermuteOp::new(dims.clone(), o.input(0)?)),
            _ => Err(internal(o.node, "PermuteOp from another op")),
        }
    }
}

impl FromObserved for MeanOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        match &o.node.op {
            Op::Mean { dims, keepdim } => MeanOp::new(dims, *keepdim, o.input(0)?),
            _ => Err(internal(o.node, "MeanOp from another op")),
        }
    }
}

impl FromObserved for SliceOp {
    fn from_observed(o: &Observed<'_>) -> Result<Self> {
        match o.node.op {
            Op::Slice { axis, start, end } => Ok(SliceOp::new(axis, start, end, o.input(0)?)),
            _ => Err(internal(o.node, "SliceOp from another op")),
        }
    }
}

/// The int8 op for a node planned in int8: THE dispatch from the graph's op set to int8
/// op types (exhaustive: a new [`Op`] must be placed here).
fn int8_op(o: &Observed<'_>) -> Result<Box<dyn QuantOp>> {
    fn b<T: QuantOp + FromObserved + 'static>(o: &Observed<'_>) -> Result<Box<dyn QuantOp>> {
        Ok(Box::new(T::from_observed(o)?))
    }
    match &o.node.op {
        Op::Conv2d(_) | Op::ConvReLU2d(_) => b::<ConvOp>(o),
        Op::Linear(_) | Op::LinearReLU(_) => b::<LinearOp>(o),
        Op::Add | Op::AddReLU => b::<AddOp>(o),
        Op::ReLU => b::<ReluOp>(o),
        Op::Clamp { .. } => b::<ClampOp>(o),
        Op::MaxPool2d(_) => b::<MaxPoolOp>(o),
        Op::AvgPool2d(_) => b::<AvgPoolOp>(o),
        Op::AdaptiveAvgPool2d(_) => b::<AdaptiveAvgPoolOp>(o),
        Op::Flatten { .. } => b::<FlattenOp>(o),
        Op::Reshape { .. } => b::<ReshapeOp>(o),
        Op::Identity | Op::Dropout => b::<IdentityOp>(o),
        Op::Mul => b::<MulOp>(o),
        Op::Concat { .. } => b::<CatOp>(o),
        Op::Hardswish => b::<HardswishOp>(o),
        Op::Hardsigmoid | Op::Sigmoid => b::<SigmoidOp>(o),
        Op::Upsample(u) => match u.mode {
            UpsampleMode::Bilinear { .. } => b::<BilinearUpsampleOp>(o),
            UpsampleMode::Nearest(_) => b::<UpsampleOp>(o),
        },
        Op::BatchNorm2d(_) => b::<BatchNormOp>(o),
        Op::Permute { .. } => b::<PermuteOp>(o),
        Op::Slice { .. } => b::<SliceOp>(o),
        Op::Mean { .. } => b::<MeanOp>(o),
        Op::LayerNorm(_) => b::<LayerNormOp>(o),
        Op::QuantStub => Ok(Box::new(QuantizeOp::new(o.out()?))),
        Op::Input
        | Op::DeQuantStub
        | Op::BatchNorm1d(_)
        | Op::SiLU
        | Op::Gelu { .. }
        | Op::Softmax { .. }
        | Op::Custom(_) => Err(QuantError::UnsupportedConfig {
            context: o.node.name.clone(),
            reason: format!("{} has no int8 version", o.node.op.type_name()),
        }),
    }
}

/// A node kept in float: runs the graph's float op.
#[derive(Debug, Clone)]
pub struct FloatOp {
    node: Node,
}

impl FloatOp {
    /// Wraps a float node.
    pub fn new(node: Node) -> Self {
        FloatOp { node }
    }
    /// The float node.
    pub fn node(&self) -> &Node {
        &self.node
    }
}

impl QuantOp for FloatOp {
    fn kind(&self) -> &'static str {
        "Float"
    }
    fn forward(&self, inputs: &[&Value], _: &mut ExecCtx) -> Result<Value> {
        let xs: Vec<std::borrow::Cow<'_, ArrayD<f32>>> =
            inputs.iter().map(|v| v.to_f32()).collect();
        let refs: Vec<&ArrayD<f32>> = xs.iter().map(|c| c.as_ref()).collect();
        Ok(Value::Float(crate::graph::eval_op(&self.node, &refs)?))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        None
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        super::float_record::write(&self.node, rec)
    }
    fn weight_bytes(&self) -> usize {
        self.node.op.params().iter().map(|(_, a)| a.len() * 4).sum()
    }
    fn arity(&self) -> usize {
        self.node.inputs.len()
    }
}

struct Builder {
    nodes: Vec<QNode>,
    /// Per float node: the index of its int8 value and of its float value, when made.
    q_of: Vec<Option<usize>>,
    f_of: Vec<Option<usize>>,
}

impl Builder {
    fn push(&mut self, name: String, inputs: Vec<usize>, op: Box<dyn QuantOp>) -> usize {
        self.nodes.push(QNode { name, inputs, op });
        self.nodes.len() - 1
    }
}

fn act_of(
    observers: &BTreeMap<NodeId, Box<dyn Observer>>,
    id: NodeId,
    name: &str,
) -> Result<ActQParams> {
    let obs = observers
        .get(&id)
        .ok_or_else(|| QuantError::UnsupportedConfig {
            context: name.into(),
            reason: "no observer was planned on this output (a bug)".into(),
        })?;
    let qp = obs.qparams().map_err(|e| e.in_context(name))?;
    ActQParams::from_qparams(&qp, name)
}

/// Converts a calibrated graph to int8: every observer's range becomes an [`ActQParams`],
/// every int8 node builds its op from its float node (`from_observed`), and quantize /
/// dequantize borders go wherever int8 and float meet.
///
/// # Errors
/// [`QuantError::UncalibratedLayers`] naming every node whose observer saw nothing
/// (nothing is converted); kernel errors named with the node.
pub fn convert(prepared: PreparedGraph) -> Result<QuantizedGraph> {
    let PreparedGraph {
        graph,
        plan,
        observers,
    } = prepared;
    let uncalibrated: Vec<String> = observers
        .iter()
        .filter(|(_, o)| !o.is_calibrated())
        .map(|(id, _)| graph.node(*id).name.clone())
        .collect();
    if !uncalibrated.is_empty() {
        return Err(QuantError::UncalibratedLayers {
            layers: uncalibrated,
        });
    }
    let n = graph.nodes().len();
    let mut b = Builder {
        nodes: Vec::with_capacity(n + 8),
        q_of: vec![None; n],
        f_of: vec![None; n],
    };
    // The int8 value of float node `src`, inserting a quantize border if needed.
    let int8_input = |b: &mut Builder, src: NodeId| -> Result<(usize, ActQParams)> {
        let name = &graph.node(src).name;
        let q = match plan[src.index()].output {
            Domain::Quant(obs) => act_of(&observers, obs, &graph.node(obs).name)?,
            Domain::Fixed(q) => q,
            Domain::Float => act_of(&observers, src, name)?,
        };
        if let Some(i) = b.q_of[src.index()] {
            return Ok((i, q));
        }
        let f = b.f_of[src.index()].ok_or_else(|| internal(graph.node(src), "no value"))?;
        let i = b.push(
            format!("{name}.quantize"),
            vec![f],
            Box::new(QuantizeOp::new(q)),
        );
        b.q_of[src.index()] = Some(i);
        Ok((i, q))
    };
    let float_input = |b: &mut Builder, src: NodeId| -> Result<usize> {
        if let Some(i) = b.f_of[src.index()] {
            return Ok(i);
        }
        let q = b.q_of[src.index()].ok_or_else(|| internal(graph.node(src), "no value"))?;
        let name = &graph.node(src).name;
        let i = b.push(
            format!("{name}.dequantize"),
            vec![q],
            Box::new(DequantizeOp),
        );
        b.f_of[src.index()] = Some(i);
        Ok(i)
    };
    let mut inputs = Vec::new();
    for node in graph.nodes() {
        let p = &plan[node.id.index()];
        let k = node.id.index();
        if matches!(node.op, Op::Input) {
            let i = b.push(node.name.clone(), vec![], Box::new(InputOp));
            b.f_of[k] = Some(i);
            inputs.push(i);
            continue;
        }
        if p.int8 {
            let qc = p
                .qconfig
                .as_ref()
                .ok_or_else(|| internal(node, "int8 without config"))?;
            let (idx, qs): (Vec<usize>, Vec<ActQParams>) = if matches!(node.op, Op::QuantStub) {
                (vec![float_input(&mut b, node.inputs[0])?], vec![])
            } else {
                node.inputs
                    .iter()
                    .map(|&s| int8_input(&mut b, s))
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .unzip()
            };
            let out = match p.output {
                Domain::Quant(obs) if obs == node.id => Some(act_of(&observers, obs, &node.name)?),
                _ => None,
            };
            let op = int8_op(&Observed {
                node,
                inputs: &qs,
                out,
                qconfig: qc,
            })
            .map_err(|e| e.in_context(&node.name))?;
            let i = b.push(node.name.clone(), idx, op);
            b.q_of[k] = Some(i);
        } else {
            let idx = node
                .inputs
                .iter()
                .map(|&s| float_input(&mut b, s))
                .collect::<Result<Vec<_>>>()?;
            let op: Box<dyn QuantOp> = match node.op {
                // Stubs and identities are plain pass-throughs in float.
                Op::DeQuantStub | Op::QuantStub | Op::Identity | Op::Dropout => {
                    Box::new(IdentityOp::new(None))
                }
                _ => Box::new(FloatOp::new(node.clone())),
            };
            let i = b.push(node.name.clone(), idx, op);
            b.f_of[k] = Some(i);
        }
    }
    // Outputs in float (as PyTorch's models end in a DeQuantStub), except graphs whose
    // output is int8, which stay int8 for `forward_quantized`.
    let outputs = graph
        .outputs()
        .iter()
        .map(|&o| {
            let (mine, other) = if plan[o.index()].int8 {
                (b.q_of[o.index()], b.f_of[o.index()])
            } else {
                (b.f_of[o.index()], b.q_of[o.index()])
            };
            mine.or(other)
                .ok_or_else(|| internal(graph.node(o), "output without value"))
        })
        .collect::<Result<Vec<_>>>()?;
    let float_bytes = graph
        .nodes()
        .iter()
        .map(|n| {
            n.op.params()
                .iter()
                .map(|(_, a)| a.len() * 4)
                .sum::<usize>()
        })
        .sum();
    QuantizedGraph::new(b.nodes, inputs, outputs, float_bytes)
}
