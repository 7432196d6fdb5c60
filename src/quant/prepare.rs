//! `prepare` and `calibrate` over a [`Graph`].

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

use ndarray::ArrayD;

use crate::error::{QuantError, Result};
use crate::graph::{Graph, NearestRule, Node, NodeId, Op, UpsampleMode};
use crate::observer::Observer;
use crate::qconfig::{Arithmetic, QConfig, QConfigMap};
use crate::qparams::ActQParams;

/// What an op does with quantization parameters when it runs in int8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A graph input (float).
    Input,
    /// `QuantStub`: quantizes float with its own observer.
    QuantStub,
    /// `DeQuantStub`: back to float.
    DeQuantStub,
    /// Computes new values and requantizes them with its own output observer (conv,
    /// linear, add, ...); reads int8 inputs.
    Requantizes,
    /// Keeps its input's qparams (ReLU, clamp, pools, flatten, reshape, identity): runs in
    /// int8 when its input is int8.
    Preserves,
    /// Runs in int8 when its input is int8, with output qparams fixed by the kernel
    /// (sigmoid, hardsigmoid: scale 1/256, zero point 0), no observer.
    FixedOutput,
    /// No int8 version (or not for these parameters): runs in float.
    FloatOnly,
}

/// The role of `node` in `graph`: PyTorch's eager-mode rules for which ops have int8
/// versions and which scale they use. One exhaustive match: a new [`Op`] must be placed
/// here to compile.
pub fn role(graph: &Graph, node: &Node) -> Role {
    let same_shapes = || {
        let s: Vec<_> = node.inputs.iter().map(|&i| &graph.node(i).shape).collect();
        s.windows(2).all(|w| w[0] == w[1]) && s.first().is_some_and(|&s0| *s0 == node.shape)
    };
    match &node.op {
        Op::Input => Role::Input,
        Op::QuantStub => Role::QuantStub,
        Op::DeQuantStub => Role::DeQuantStub,
        Op::Conv2d(c) | Op::ConvReLU2d(c) => {
            if c.padding_end.is_none() {
                Role::Requantizes
            } else {
                // fbgemm's convolution pads symmetrically.
                Role::FloatOnly
            }
        }
        Op::Linear(_) | Op::LinearReLU(_) => {
            if node.shape.rank() == 2 {
                Role::Requantizes
            } else {
                Role::FloatOnly
            }
        }
        // quantized.LayerNorm has its own output qparams (PyTorch's default module mapping
        // converts nn.LayerNorm); with ONNX Runtime's arithmetic it stays float (see
        // `planned_role`).
        Op::Mul | Op::Concat { .. } | Op::Hardswish | Op::LayerNorm(_) => Role::Requantizes,
        Op::BatchNorm2d(_) => {
            if node.shape.rank() == 4 {
                Role::Requantizes
            } else {
                Role::FloatOnly
            }
        }
        Op::Hardsigmoid | Op::Sigmoid => Role::FixedOutput,
        Op::Upsample(u) => match u.mode {
            UpsampleMode::Nearest(NearestRule::Floor | NearestRule::Exact) => Role::Preserves,
            _ => Role::FloatOnly,
        },
        // quantized::add has no broadcasting.
        Op::Add | Op::AddReLU => {
            if same_shapes() {
                Role::Requantizes
            } else {
                Role::FloatOnly
            }
        }
        Op::ReLU | Op::Clamp { .. } | Op::Dropout | Op::Identity => Role::Preserves,
        Op::Flatten { .. } | Op::Reshape { .. } | Op::Permute { .. } | Op::Slice { .. } => {
            Role::Preserves
        }
        Op::MaxPool2d(p) => {
            let (t, l, b, r) = p.padding;
            if !p.ceil_mode && t == b && l == r {
                Role::Preserves
            } else {
                Role::FloatOnly
            }
        }
        Op::AvgPool2d(p) => {
            let (t, l, b, r) = p.padding;
            if !p.ceil_mode
                && t == b
                && l == r
                && p.divisor_override.is_none()
                && p.dilation == (1, 1)
            {
                Role::Preserves
            } else {
                Role::FloatOnly
            }
        }
        Op::AdaptiveAvgPool2d(_) => Role::Preserves,
        // quantized::mean keeps the input's scale and zero point; int8 where ptq matches
        // PyTorch bit for bit: the innermost dimensions (`x.mean([2, 3])`). Over other
        // dimensions ATen's float sum adds in an order not modelled: float island.
        Op::Mean { dims, .. } => {
            let r = graph.node(node.inputs[0]).shape.rank();
            if dims.iter().rev().enumerate().all(|(i, &d)| d + i + 1 == r) {
                Role::Preserves
            } else {
                Role::FloatOnly
            }
        }
        // No int8 kernel: float islands with automatic borders.
        Op::BatchNorm1d(_) | Op::SiLU | Op::Gelu { .. } | Op::Softmax { .. } | Op::Custom(_) => {
            Role::FloatOnly
        }
    }
}

/// [`role`] under the node's config, for ops whose int8 arithmetic is PyTorch's own:
/// `quantized::layer_norm` stays float when the config asks for ONNX Runtime's arithmetic,
/// as ORT runs it (DequantizeLinear -> float op -> QuantizeLinear); bilinear upsampling
/// runs in int8 on the input's qparams under PyTorch's arithmetic (eager mode runs
/// `quantized::upsample_bilinear2d` on a quantized input) and in float otherwise.
fn planned_role(graph: &Graph, node: &Node, qc: Option<&QConfig>) -> Role {
    let r = role(graph, node);
    let fbgemm = qc.is_some_and(|q| q.arithmetic == Arithmetic::Fbgemm);
    match &node.op {
        Op::LayerNorm(_) if !fbgemm => Role::FloatOnly,
        Op::Upsample(u) if fbgemm && matches!(u.mode, UpsampleMode::Bilinear { .. }) => {
            Role::Preserves
        }
        _ => r,
    }
}

/// Where a node's output lives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Domain {
    /// Float.
    Float,
    /// int8, with the parameters of the observer on this node's float output.
    Quant(NodeId),
    /// int8, with parameters the kernel fixes.
    Fixed(ActQParams),
}

/// `prepare`'s decision for one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodePlan {
    /// Runs in int8 (else float).
    pub int8: bool,
    /// Its config (`None`: kept in float by the map, or no global config).
    pub qconfig: Option<QConfig>,
    /// The domain of its output.
    pub output: Domain,
}

/// A graph ready for calibration: the float graph, the per-node plan and the activation
/// observers, keyed by the id of the node whose float output they watch.
#[derive(Debug)]
pub struct PreparedGraph {
    pub(crate) graph: Graph,
    pub(crate) plan: Vec<NodePlan>,
    pub(crate) observers: BTreeMap<NodeId, Box<dyn Observer>>,
}

impl PreparedGraph {
    /// The float graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }
    /// The plan of node `id`.
    pub fn plan(&self, id: NodeId) -> &NodePlan {
        &self.plan[id.index()]
    }
    /// The observers, by the node whose output they watch.
    pub fn observers(&self) -> impl Iterator<Item = (NodeId, &dyn Observer)> {
        self.observers.iter().map(|(k, v)| (*k, v.as_ref()))
    }
    /// Names of the batch norms not fused into a convolution or linear layer: each runs
    /// as a separate int8 batch norm (2-D) or in float (1-D), costing time and accuracy.
    pub fn unfused_batch_norms(&self) -> Vec<&str> {
        self.graph
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, Op::BatchNorm1d(_) | Op::BatchNorm2d(_)))
            .map(|n| n.name.as_str())
            .collect()
    }
    /// Names of the nodes planned in float.
    pub fn float_nodes(&self) -> Vec<&str> {
        self.graph
            .nodes()
            .iter()
            .zip(&self.plan)
            .filter(|(n, p)| !p.int8 && !matches!(n.op, Op::Input))
            .map(|(n, _)| n.name.as_str())
            .collect()
    }
}

impl fmt::Display for PreparedGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, p) in self.graph.nodes().iter().zip(&self.plan) {
            let out = match p.output {
                Domain::Float => "float".to_string(),
                Domain::Quant(src) => format!("int8 ({})", self.graph.node(src).name),
                Domain::Fixed(q) => format!("int8 ({q})"),
            };
            let obs = if self.observers.contains_key(&n.id) {
                " [observed]"
            } else {
                ""
            };
            writeln!(
                f,
                "{} {:<32} {:<18} {} -> {out}{obs}",
                n.id,
                n.name,
                n.op.type_name(),
                if p.int8 { "int8" } else { "float" }
            )?;
        }
        let bns = self.unfused_batch_norms();
        if !bns.is_empty() {
            write!(
                f,
                "warning: {} batch norm(s) not fused into a convolution (fuse them; unfused they run as a separate int8 batch norm or in float): {}",
                bns.len(),
                bns.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Prepares a float graph for calibration: decides per node whether it runs in int8
/// (under `map`, by node name or op kind, and by the op's int8 support) and adds one
/// activation observer on every float output that int8 code will need quantized (quant
/// stubs, requantizing ops, and float producers feeding int8 consumers). Weights are
/// observed at `convert`, as PyTorch does.
///
/// Fuse first ([`crate::graph::fuse`]): an unfused batch norm stays in float and is
/// listed by [`PreparedGraph::unfused_batch_norms`] and the calibration report.
///
/// # Errors
/// [`QuantError::NothingToQuantize`] if no node runs in int8;
/// [`QuantError::UnsupportedConfig`] naming the node if its config's activations are not
/// `quint8` per-tensor or its weights not `qint8`, or an observer spec does not build.
pub fn prepare(graph: Graph, map: &QConfigMap) -> Result<PreparedGraph> {
    let mut plan: Vec<NodePlan> = Vec::with_capacity(graph.nodes().len());
    let mut observers: BTreeMap<NodeId, Box<dyn Observer>> = BTreeMap::new();
    let observe = |id: NodeId, qc: &QConfig, observers: &mut BTreeMap<_, _>| -> Result<()> {
        if let std::collections::btree_map::Entry::Vacant(e) = observers.entry(id) {
            let name = &graph.node(id).name;
            e.insert(qc.activation.build().map_err(|e| e.in_context(name))?);
        }
        Ok(())
    };
    for node in graph.nodes() {
        let qc = map.qconfig_for(&node.name, node.op.type_name());
        let node_role = planned_role(&graph, node, qc.as_ref());
        if let Some(q) = &qc {
            if !matches!(node_role, Role::Input | Role::DeQuantStub | Role::FloatOnly) {
                q.check_int8(&node.name)?;
            }
        }
        let input_domain = |k: usize| plan[node.inputs[k].index()].output;
        let (int8, output) = match (node_role, &qc) {
            (Role::Input, _) => (false, Domain::Float),
            (Role::QuantStub, Some(q)) => {
                observe(node.id, q, &mut observers)?;
                (true, Domain::Quant(node.id))
            }
            (Role::Requantizes, Some(q)) => {
                for k in 0..node.inputs.len() {
                    let src = node.inputs[k];
                    if input_domain(k) == Domain::Float {
                        // The quantize border of a float producer is observed with the
                        // first int8 consumer's config, except that a graph input named
                        // in the map (`set_name`) owns its border's observer, as a
                        // PyTorch QuantStub does.
                        let src_node = graph.node(src);
                        let own = match role(&graph, src_node) {
                            Role::Input => map.by_name_for(&src_node.name).flatten(),
                            _ => None,
                        };
                        observe(src, own.as_ref().unwrap_or(q), &mut observers)?;
                    }
                }
                observe(node.id, q, &mut observers)?;
                (true, Domain::Quant(node.id))
            }
            (Role::Preserves, Some(_)) => match input_domain(0) {
                Domain::Float => (false, Domain::Float),
                d => (true, d),
            },
            (Role::FixedOutput, Some(_)) => match input_domain(0) {
                Domain::Float => (false, Domain::Float),
                _ => (true, Domain::Fixed(crate::quant::ops::sigmoid_qparams())),
            },
            _ => (false, Domain::Float),
        };
        plan.push(NodePlan {
            int8,
            qconfig: qc,
            output,
        });
    }
    // A float producer feeding an int8 consumer got an observer above; now fix the plan so
    // that the producer's int8 twin (the quantize border) is known by its observer.
    if !plan.iter().any(|p| p.int8) {
        return Err(QuantError::NothingToQuantize {
            reason: "no node of the graph runs in int8 under this QConfigMap (conv, linear, add, \
                     quant stubs need a config)"
                .into(),
        });
    }
    Ok(PreparedGraph {
        graph,
        plan,
        observers,
    })
}

/// What one observer recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRange {
    /// The node whose output the observer watches.
    pub node: String,
    /// The observer kind.
    pub observer: &'static str,
    /// The `(min, max)` seen, or `None` if nothing.
    pub range: Option<(f32, f32)>,
}

/// What a calibration run saw; prints as a table with its warnings.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphCalibrationReport {
    /// Batches run by this call.
    pub batches: usize,
    /// Samples (first dimensions of the first input) run by this call.
    pub samples: usize,
    /// Every observer's range after this call, in node order.
    pub ranges: Vec<NodeRange>,
    /// Batch norms left unfused (a warning: fuse them).
    pub unfused_batch_norms: Vec<String>,
}

impl GraphCalibrationReport {
    /// Nodes whose observers have still seen nothing (`convert` would refuse them).
    pub fn unobserved(&self) -> Vec<&str> {
        self.ranges
            .iter()
            .filter(|r| r.range.is_none())
            .map(|r| r.node.as_str())
            .collect()
    }
}

impl fmt::Display for GraphCalibrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "calibrated on {} batches ({} samples)",
            self.batches, self.samples
        )?;
        writeln!(
            f,
            "{:<32} {:<26} {:>12} {:>12}",
            "node", "observer", "min", "max"
        )?;
        for r in &self.ranges {
            match r.range {
                Some((lo, hi)) => {
                    writeln!(f, "{:<32} {:<26} {lo:>12.5} {hi:>12.5}", r.node, r.observer)?
                }
                None => writeln!(f, "{:<32} {:<26} {:>25}", r.node, r.observer, "(no data)")?,
            }
        }
        if !self.unfused_batch_norms.is_empty() {
            writeln!(
                f,
                "warning: {} batch norm(s) not fused into a convolution (fuse them; unfused they run as a separate int8 batch norm or in float): {}",
                self.unfused_batch_norms.len(),
                self.unfused_batch_norms.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Runs batches through the float graph (single-input graphs); every observer records the
/// node output it watches. Streams over any iterator; no callback needed. Can be called
/// several times (observers accumulate).
///
/// # Errors
/// [`QuantError::EmptyCalibration`] if the iterator yields no non-empty batch;
/// [`QuantError::NonFinite`] naming the batch index if a batch holds NaN or infinity
/// (nothing of it is recorded), or naming the node whose output does; shape errors.
pub fn calibrate<I, B>(prepared: &mut PreparedGraph, batches: I) -> Result<GraphCalibrationReport>
where
    I: IntoIterator<Item = B>,
    B: Borrow<ArrayD<f32>>,
{
    calibrate_inputs(
        prepared,
        batches.into_iter().map(|b| vec![b.borrow().clone()]),
    )
}

/// As [`calibrate`] for graphs with several inputs: each item holds one tensor per graph
/// input.
///
/// # Errors
/// As [`calibrate`].
pub fn calibrate_inputs<I>(
    prepared: &mut PreparedGraph,
    batches: I,
) -> Result<GraphCalibrationReport>
where
    I: IntoIterator<Item = Vec<ArrayD<f32>>>,
{
    let PreparedGraph {
        graph, observers, ..
    } = prepared;
    let (mut n_batches, mut samples) = (0usize, 0usize);
    for (i, batch) in batches.into_iter().enumerate() {
        if batch.iter().all(|x| x.is_empty()) {
            continue;
        }
        for x in &batch {
            crate::qparams::check_finite(x, &format!("calibration batch {i}"))?;
        }
        graph.forward_with(&batch, &mut |node, y| match observers.get_mut(&node.id) {
            Some(obs) => obs.observe(y.view()).map_err(|e| e.in_context(&node.name)),
            None => Ok(()),
        })?;
        n_batches += 1;
        samples += batch
            .first()
            .and_then(|x| x.shape().first().copied())
            .unwrap_or(1);
    }
    if n_batches == 0 {
        return Err(QuantError::EmptyCalibration {
            reason: "the batch iterator yielded no non-empty batch".into(),
        });
    }
    Ok(report(prepared, n_batches, samples))
}

fn report(p: &PreparedGraph, batches: usize, samples: usize) -> GraphCalibrationReport {
    GraphCalibrationReport {
        batches,
        samples,
        ranges: p
            .observers
            .iter()
            .map(|(id, o)| NodeRange {
                node: p.graph.node(*id).name.clone(),
                observer: o.kind(),
                range: o.observed_range(),
            })
            .collect(),
        unfused_batch_norms: p
            .unfused_batch_norms()
            .into_iter()
            .map(String::from)
            .collect(),
    }
}
