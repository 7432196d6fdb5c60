//! The float forward pass of a [`Graph`].

use ndarray::ArrayD;

use super::op::Op;
use super::{ops, Graph, Node};
use crate::error::{QuantError, Result};

/// Runs one node's op on its inputs' values.
///
/// # Errors
/// The op's own shape or configuration errors (unlabelled; the caller adds the name).
pub(crate) fn eval_op(node: &Node, xs: &[&ArrayD<f32>]) -> Result<ArrayD<f32>> {
    let x = || xs[0];
    Ok(match &node.op {
        Op::Input => x().clone(),
        Op::Conv2d(c) => c.forward(x())?,
        Op::ConvReLU2d(c) => c.forward_act(x(), true)?,
        Op::Linear(l) => l.forward(x())?,
        Op::LinearReLU(l) => l.forward_act(x(), true)?,
        Op::BatchNorm1d(b) | Op::BatchNorm2d(b) => ops::batch_norm(x(), b)?,
        Op::ReLU => ops::relu(x()),
        Op::Clamp { min, max } => ops::clamp(x(), *min, *max),
        Op::Hardswish => ops::hardswish(x()),
        Op::Hardsigmoid => ops::hardsigmoid(x()),
        Op::Sigmoid => ops::sigmoid(x()),
        Op::SiLU => ops::silu(x()),
        Op::Gelu { tanh } => ops::gelu(x(), *tanh),
        Op::Add => ops::add(xs[0], xs[1])?,
        Op::AddReLU => ops::add(xs[0], xs[1])?.mapv_into(ops::relu_scalar),
        Op::Mul => ops::mul(xs[0], xs[1])?,
        Op::Concat { axis } => ops::concat(xs, *axis)?,
        Op::MaxPool2d(p) => ops::max_pool2d(x(), p)?,
        Op::AvgPool2d(p) => ops::avg_pool2d(x(), p)?,
        Op::AdaptiveAvgPool2d(o) => ops::adaptive_avg_pool2d(x(), *o)?,
        Op::Mean { dims, keepdim } => ops::mean(x(), dims, *keepdim)?,
        Op::Flatten { start_dim, end_dim } => ops::flatten(x(), *start_dim, *end_dim)?,
        Op::Reshape { shape } => ops::reshape(x(), shape)?,
        Op::Permute { dims } => ops::permute(x(), dims)?,
        Op::Slice { axis, start, end } => ops::slice(x(), *axis, *start, *end)?,
        Op::Upsample(u) => ops::upsample(x(), u)?,
        Op::Softmax { axis } => ops::softmax(x(), *axis)?,
        Op::LayerNorm(l) => ops::layer_norm(x(), l)?,
        Op::Dropout | Op::Identity | Op::QuantStub | Op::DeQuantStub => x().clone(),
        Op::Custom(m) => {
            let y = m.forward(x())?;
            if !node.shape.admits(y.shape()) {
                return Err(QuantError::ShapeMismatch {
                    context: node.name.clone(),
                    expected: format!("the declared output shape {}", node.shape),
                    actual: format!("output of shape {:?}", y.shape()),
                });
            }
            y
        }
    })
}

impl Graph {
    /// Float forward pass: one array per graph input (in [`Graph::inputs`] order), one per
    /// output (in [`Graph::outputs`] order).
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] naming the input whose shape does not fit its declared
    /// shape (or inputs that disagree on the batch size); a node's own error labelled with
    /// its name.
    pub fn forward(&self, inputs: &[ArrayD<f32>]) -> Result<Vec<ArrayD<f32>>> {
        self.forward_with(inputs, &mut |_, _| Ok(()))
    }

    /// As [`Graph::forward`], calling `tap(node, output)` after every node (inputs
    /// included), in topological order: the hook for calibration and per-node error
    /// reports.
    ///
    /// # Errors
    /// As [`Graph::forward`], and the tap's own errors.
    pub fn forward_with(
        &self,
        inputs: &[ArrayD<f32>],
        tap: &mut dyn FnMut(&Node, &ArrayD<f32>) -> Result<()>,
    ) -> Result<Vec<ArrayD<f32>>> {
        if inputs.len() != self.inputs.len() {
            return Err(QuantError::ShapeMismatch {
                context: "graph".into(),
                expected: format!("{} input tensor(s)", self.inputs.len()),
                actual: format!("{} tensor(s)", inputs.len()),
            });
        }
        let mut batch: Option<usize> = None;
        for (&id, x) in self.inputs.iter().zip(inputs) {
            let node = self.node(id);
            let ok = node.shape.admits(x.shape())
                && (!node.shape.has_batch() || *batch.get_or_insert(x.shape()[0]) == x.shape()[0]);
            if !ok {
                return Err(QuantError::ShapeMismatch {
                    context: node.name.clone(),
                    expected: format!("{} (one batch size for all inputs)", node.shape),
                    actual: format!("input of shape {:?}", x.shape()),
                });
            }
        }
        // Free each value after its last reader (outputs are kept).
        let n = self.nodes.len();
        let mut last_use = vec![0usize; n];
        for node in &self.nodes {
            for &i in &node.inputs {
                last_use[i.index()] = node.id.index();
            }
        }
        for &o in &self.outputs {
            last_use[o.index()] = usize::MAX;
        }
        let mut values: Vec<Option<ArrayD<f32>>> = vec![None; n];
        let mut next_input = 0;
        for node in &self.nodes {
            let y = if matches!(node.op, Op::Input) {
                let pos = self.inputs.iter().position(|&i| i == node.id);
                match pos {
                    Some(p) => {
                        next_input += 1;
                        inputs[p].clone()
                    }
                    None => {
                        return Err(QuantError::UnsupportedConfig {
                            context: node.name.clone(),
                            reason: "input node is not among the graph's inputs".into(),
                        })
                    }
                }
            } else {
                let xs: Vec<&ArrayD<f32>> = node
                    .inputs
                    .iter()
                    .map(|i| {
                        values[i.index()]
                            .as_ref()
                            .expect("inputs computed before use")
                    })
                    .collect();
                eval_op(node, &xs).map_err(|e| e.in_context(&node.name))?
            };
            tap(node, &y)?;
            for &i in &node.inputs {
                if last_use[i.index()] == node.id.index() {
                    values[i.index()] = None;
                }
            }
            if last_use[node.id.index()] != 0 || self.is_output(node.id) {
                values[node.id.index()] = Some(y);
            }
        }
        debug_assert_eq!(next_input, self.inputs.len());
        Ok(self
            .outputs
            .iter()
            .map(|o| values[o.index()].clone().expect("outputs are kept"))
            .collect())
    }
}
