//! The int8 graph and its executor.

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, Instant};

use ndarray::ArrayD;

use super::{ExecCtx, QuantOp, Value};
use crate::error::{QuantError, Result};
use crate::nn::quantized::QTensor;
use crate::qparams::{ActQParams, QParams};

/// One node of a [`QuantizedGraph`].
#[derive(Debug)]
pub struct QNode {
    pub(crate) name: String,
    pub(crate) inputs: Vec<usize>,
    pub(crate) op: Box<dyn QuantOp>,
}

impl QNode {
    /// The node's name (the float graph's node name; borders get `<consumer>.quant` /
    /// `<producer>.dequant` style names).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The indices of the nodes it reads (all earlier).
    pub fn inputs(&self) -> &[usize] {
        &self.inputs
    }
    /// The op.
    pub fn op(&self) -> &dyn QuantOp {
        self.op.as_ref()
    }
}

/// Time spent in one node over one [`QuantizedGraph::profile`] run.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeProfile {
    /// Node name.
    pub name: String,
    /// Op kind.
    pub kind: &'static str,
    /// Wall time of the node's `forward`.
    pub time: Duration,
    /// How many int8 activations the node transposed between NCHW and NHWC (activations
    /// stay NHWC between ops; a transpose happens where an op needs the logical order of
    /// a spatial NHWC tensor, e.g. a flatten before a linear layer, or NHWC data of an
    /// NCHW one, e.g. the first convolution after the quantize border).
    pub transposes: usize,
}

/// An int8 model over a graph: float in, float out, int8 inside, with float islands where
/// the configuration or the op set asked for them. Built by `convert` or loaded from a
/// `ptq-qmodel/2` file.
///
/// `forward` takes `&self` and the graph is `Send + Sync`.
#[derive(Debug)]
pub struct QuantizedGraph {
    pub(crate) nodes: Vec<QNode>,
    pub(crate) inputs: Vec<usize>,
    pub(crate) outputs: Vec<usize>,
    pub(crate) float_weight_bytes: usize,
    /// `moves[i][k]`: node `i` is the last reader of its input `k` (read there once, by no
    /// later node, and not a graph output), so the executor hands the value over.
    moves: Vec<Vec<bool>>,
    /// `nhwc_out[i]`: every reader of node `i` wants NHWC ([`QuantOp::wants_nhwc`]) and
    /// the node is not a graph output.
    nhwc_out: Vec<bool>,
}

/// The executor's plan, fixed when the graph is built: which inputs each node may
/// consume (its last read of them) and which nodes should write NHWC.
fn plan(nodes: &[QNode], outputs: &[usize]) -> (Vec<Vec<bool>>, Vec<bool>) {
    let mut last = vec![usize::MAX; nodes.len()];
    let mut nhwc_out = vec![true; nodes.len()];
    let mut read = vec![false; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        for &j in &n.inputs {
            last[j] = i;
            read[j] = true;
            nhwc_out[j] &= n.op.wants_nhwc();
        }
    }
    for &o in outputs {
        last[o] = usize::MAX;
        nhwc_out[o] = false;
    }
    for (j, r) in read.iter().enumerate() {
        nhwc_out[j] &= *r;
    }
    let moves = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            n.inputs
                .iter()
                .map(|&j| last[j] == i && n.inputs.iter().filter(|&&k| k == j).count() == 1)
                .collect()
        })
        .collect();
    (moves, nhwc_out)
}

/// The kind tag of graph input nodes.
pub(crate) const INPUT_KIND: &str = "Input";

/// [`QuantOp::kind`] of the quantize border (`ops::QuantizeOp`).
const QUANTIZE_KIND: &str = "Quantize";

impl QuantizedGraph {
    /// Assembles a graph from nodes in topological order, checking that every input index
    /// points to an earlier node, that every op gets as many inputs as it takes, and that
    /// inputs and outputs name existing nodes.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] naming the node for a broken structure.
    pub(crate) fn new(
        nodes: Vec<QNode>,
        inputs: Vec<usize>,
        outputs: Vec<usize>,
        float_weight_bytes: usize,
    ) -> Result<Self> {
        for (i, n) in nodes.iter().enumerate() {
            if let Some(&bad) = n.inputs.iter().find(|&&j| j >= i) {
                return Err(QuantError::UnsupportedConfig {
                    context: n.name.clone(),
                    reason: format!("input {bad} is not an earlier node (node {i})"),
                });
            }
            if n.op.kind() != INPUT_KIND && n.inputs.len() != n.op.arity() {
                return Err(QuantError::UnsupportedConfig {
                    context: n.name.clone(),
                    reason: format!(
                        "{} takes {} inputs, the node has {}",
                        n.op.kind(),
                        n.op.arity(),
                        n.inputs.len()
                    ),
                });
            }
        }
        for &i in inputs.iter().chain(&outputs) {
            if i >= nodes.len() {
                return Err(QuantError::UnsupportedConfig {
                    context: "QuantizedGraph".into(),
                    reason: format!("input/output index {i} is out of {} nodes", nodes.len()),
                });
            }
        }
        for &i in &inputs {
            if nodes[i].op.kind() != INPUT_KIND {
                return Err(QuantError::UnsupportedConfig {
                    context: nodes[i].name.clone(),
                    reason: "a graph input must be an Input node".into(),
                });
            }
        }
        if outputs.is_empty() {
            return Err(QuantError::UnsupportedConfig {
                context: "QuantizedGraph".into(),
                reason: "the graph has no output".into(),
            });
        }
        let (moves, nhwc_out) = plan(&nodes, &outputs);
        Ok(QuantizedGraph {
            nodes,
            inputs,
            outputs,
            float_weight_bytes,
            moves,
            nhwc_out,
        })
    }

    /// The nodes, in topological order.
    pub fn nodes(&self) -> &[QNode] {
        &self.nodes
    }

    /// The index of the node named `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    fn node_named(&self, name: &str) -> Result<&QNode> {
        self.find(name)
            .map(|i| &self.nodes[i])
            .ok_or_else(|| QuantError::UnsupportedConfig {
                context: name.into(),
                reason: "the quantized graph has no node of this name".into(),
            })
    }

    /// The int8 weight and its qparams of node `name` (`Ok(None)` for ops without one).
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] if there is no such node.
    pub fn weight(&self, name: &str) -> Result<Option<(ArrayD<i8>, QParams)>> {
        Ok(self.node_named(name)?.op.weight())
    }

    /// The output qparams of node `name` (`Ok(None)` if its output is float).
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] if there is no such node.
    pub fn output_qparams(&self, name: &str) -> Result<Option<ActQParams>> {
        Ok(self.node_named(name)?.op.output_qparams())
    }

    /// Node indices of the graph inputs.
    pub fn input_nodes(&self) -> &[usize] {
        &self.inputs
    }

    /// Node indices of the graph outputs.
    pub fn output_nodes(&self) -> &[usize] {
        &self.outputs
    }

    /// Bytes of the parameters held (packed int8 weights, scales, biases, float islands).
    pub fn weight_bytes(&self) -> usize {
        self.nodes.iter().map(|n| n.op.weight_bytes()).sum()
    }

    /// Bytes of the float model's parameters.
    pub fn float_weight_bytes(&self) -> usize {
        self.float_weight_bytes
    }

    /// Runs every node; calls `tap(index, value, time, transposes)` after each.
    ///
    /// A graph input read only by `Quantize` nodes (and not itself an output) is
    /// quantized straight from the caller's tensor, in one pass that also checks
    /// finiteness, instead of being checked, copied into the graph's values, then
    /// quantized; unless `keep_inputs` (the tap then sees an empty placeholder for it).
    fn run(
        &self,
        inputs: &[ArrayD<f32>],
        keep_inputs: bool,
        tap: &mut dyn FnMut(usize, &Value, Duration, usize),
    ) -> Result<Vec<Value>> {
        if inputs.len() != self.inputs.len() {
            return Err(QuantError::ShapeMismatch {
                context: "QuantizedGraph::forward".into(),
                expected: format!("{} input tensors", self.inputs.len()),
                actual: format!("{}", inputs.len()),
            });
        }
        // How many more times each value will be read; freed at zero.
        let mut uses = vec![0usize; self.nodes.len()];
        for n in &self.nodes {
            for &i in &n.inputs {
                uses[i] += 1;
            }
        }
        for &o in &self.outputs {
            uses[o] += 1;
        }
        let mut values: Vec<Option<Value>> = vec![None; self.nodes.len()];
        // `direct[i]`: node `i` is graph input `direct[i] - 1` quantized where it is read.
        let mut direct = vec![0usize; self.nodes.len()];
        if !keep_inputs {
            for (k, &i) in self.inputs.iter().enumerate() {
                direct[i] = k + 1;
            }
            for &o in &self.outputs {
                direct[o] = 0;
            }
            for n in &self.nodes {
                if n.op.kind() != QUANTIZE_KIND || n.op.output_qparams().is_none() {
                    for &j in &n.inputs {
                        direct[j] = 0;
                    }
                }
            }
        }
        for (k, &i) in self.inputs.iter().enumerate() {
            if direct[i] == 0 {
                crate::qparams::check_finite(&inputs[k], &self.nodes[i].name)?;
                values[i] = Some(Value::Float(inputs[k].clone()));
            }
        }
        let placeholder = Value::Float(ArrayD::zeros(ndarray::IxDyn(&[0])));
        let mut ctx = ExecCtx::default();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.op.kind() == INPUT_KIND {
                if direct[i] > 0 {
                    tap(i, &placeholder, Duration::ZERO, 0);
                    continue;
                }
                if let Some(v) = &values[i] {
                    tap(i, v, Duration::ZERO, 0);
                    continue;
                }
                return Err(QuantError::UnsupportedConfig {
                    context: node.name.clone(),
                    reason: "an Input node that is not a graph input".into(),
                });
            }
            ctx.want_nhwc = self.nhwc_out[i];
            let before = ctx.transposes;
            if let (Some(q), [j]) = (node.op.output_qparams(), node.inputs.as_slice()) {
                if node.op.kind() == QUANTIZE_KIND && direct[*j] > 0 {
                    let x = &inputs[direct[*j] - 1];
                    let t = Instant::now();
                    let y = match super::ops::quantize_act(x, q, &mut ctx) {
                        Ok(a) => Value::Int8(a),
                        Err(e) => {
                            // NaN or infinity: the error names the graph input.
                            crate::qparams::check_finite(x, &self.nodes[*j].name)?;
                            return Err(e.in_context(&node.name));
                        }
                    };
                    tap(i, &y, t.elapsed(), ctx.transposes - before);
                    values[i] = Some(y);
                    continue;
                }
            }
            // Inputs read here for the last time are handed over; the rest are borrowed.
            let mut owned: Vec<Option<Value>> = node
                .inputs
                .iter()
                .zip(&self.moves[i])
                .map(|(&j, &last)| if last { values[j].take() } else { None })
                .collect();
            let args: Vec<Cow<'_, Value>> = node
                .inputs
                .iter()
                .zip(owned.iter_mut())
                .map(|(&j, o)| match o.take() {
                    Some(v) => Ok(Cow::Owned(v)),
                    None => values[j].as_ref().map(Cow::Borrowed).ok_or_else(|| {
                        QuantError::UnsupportedConfig {
                            context: node.name.clone(),
                            reason: format!("input node {j} has no value"),
                        }
                    }),
                })
                .collect::<Result<_>>()?;
            let t = Instant::now();
            let y = node
                .op
                .forward_owned(args, &mut ctx)
                .map_err(|e| e.in_context(&node.name))?;
            let dt = t.elapsed();
            tap(i, &y, dt, ctx.transposes - before);
            values[i] = Some(y);
            for &j in &node.inputs {
                uses[j] -= 1;
                if uses[j] == 0 {
                    values[j] = None;
                }
            }
        }
        // Each output value is moved out at its last mention (copied only when the same
        // node is listed as an output more than once).
        (0..self.outputs.len())
            .map(|j| {
                let o = self.outputs[j];
                let v = if self.outputs[j + 1..].contains(&o) {
                    values[o].clone()
                } else {
                    values[o].take()
                };
                v.ok_or_else(|| QuantError::UnsupportedConfig {
                    context: self.nodes[o].name.clone(),
                    reason: "the output node has no value".into(),
                })
            })
            .collect()
    }

    /// Runs the graph: one `f32` tensor per graph input (NCHW images, `[N, features]`
    /// vectors), one `f32` tensor per output (int8 outputs dequantized).
    ///
    /// # Errors
    /// [`QuantError::NonFinite`] for NaN or infinite input (naming the input), shape
    /// errors naming the node and both shapes.
    pub fn forward(&self, inputs: &[ArrayD<f32>]) -> Result<Vec<ArrayD<f32>>> {
        Ok(self
            .run(inputs, false, &mut |_, _, _, _| {})?
            .into_iter()
            .map(|v| match v {
                // A float output is moved out, not copied.
                Value::Float(x) => x,
                Value::Int8(q) => q.dequantize(),
            })
            .collect())
    }

    /// Runs the graph and returns the outputs as they are computed: an int8 output as its
    /// quantized values (logical NCHW order) with its qparams, a float output (a float
    /// island or a dequantize at the end) as `Err(float values)`.
    ///
    /// # Errors
    /// As [`QuantizedGraph::forward`].
    #[allow(clippy::type_complexity)]
    pub fn forward_quantized(
        &self,
        inputs: &[ArrayD<f32>],
    ) -> Result<Vec<std::result::Result<QTensor, ArrayD<f32>>>> {
        Ok(self
            .run(inputs, false, &mut |_, _, _, _| {})?
            .into_iter()
            .map(|v| match v {
                Value::Int8(q) => Ok(q.into_nchw()),
                Value::Float(x) => Err(x),
            })
            .collect())
    }

    /// Runs the graph and calls `tap(node_name, value)` after every node (for SQNR
    /// reports and debugging).
    ///
    /// # Errors
    /// As [`QuantizedGraph::forward`].
    pub fn forward_with(
        &self,
        inputs: &[ArrayD<f32>],
        tap: &mut dyn FnMut(&str, &Value),
    ) -> Result<Vec<ArrayD<f32>>> {
        Ok(self
            .run(inputs, true, &mut |i, v, _, _| tap(&self.nodes[i].name, v))?
            .into_iter()
            .map(Value::into_f32)
            .collect())
    }

    /// Runs the graph once and returns the wall time of every node, in order, with the
    /// layout transposes each made.
    ///
    /// # Errors
    /// As [`QuantizedGraph::forward`].
    pub fn profile(&self, inputs: &[ArrayD<f32>]) -> Result<Vec<NodeProfile>> {
        let mut out = Vec::with_capacity(self.nodes.len());
        self.run(inputs, false, &mut |i, _, t, transposes| {
            out.push(NodeProfile {
                name: self.nodes[i].name.clone(),
                kind: self.nodes[i].op.kind(),
                time: t,
                transposes,
            })
        })?;
        Ok(out)
    }
}

impl fmt::Display for QuantizedGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.nodes.iter().enumerate() {
            let q = match n.op.output_qparams() {
                Some(q) => q.to_string(),
                None => "float".into(),
            };
            writeln!(
                f,
                "{i:>4} {:<32} {:<20} {:?} -> {q}",
                n.name,
                n.op.kind(),
                n.inputs
            )?;
        }
        write!(
            f,
            "weights: {} bytes int8 model, {} bytes float model",
            self.weight_bytes(),
            self.float_weight_bytes
        )
    }
}
