//! [`GraphBuilder`]: builds a [`Graph`] the way a PyTorch `forward` reads, checking every
//! node's input shapes as it is added.

use std::collections::HashMap;

use super::op::{LayerNorm, Op, Pool2dSpec, UpsampleSpec};
use super::shape::{check_numel, infer};
use super::{BatchNorm, Dim, Graph, Node, NodeId, Shape};
use crate::error::{QuantError, Result};
use crate::nn::{Conv2d, Linear, Module};

/// Builds a [`Graph`] node by node. Every method checks its inputs' shapes at once and
/// returns a [`QuantError`] naming the node and the shapes; names must be unique.
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2};
/// use ptq::graph::{Dim, GraphBuilder};
/// use ptq::nn::Linear;
/// let mut g = GraphBuilder::new();
/// let x = g.input("x", &[Dim::Batch, 4.into()])?;
/// let err = g.linear("fc", x, Linear::new(Array2::zeros((2, 3)), None)?).unwrap_err();
/// assert_eq!(err.to_string(), "fc: shape mismatch: expected [..., 3], got input of shape [N, 4]");
/// let y = g.linear("fc", x, Linear::new(Array2::zeros((2, 4)), Some(Array1::ones(2)))?)?;
/// g.output(y)?;
/// let graph = g.build()?;
/// assert_eq!(graph.find("fc"), Some(y));
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Default, Clone)]
pub struct GraphBuilder {
    nodes: Vec<Node>,
    inputs: Vec<NodeId>,
    outputs: Vec<NodeId>,
    names: HashMap<String, NodeId>,
}

macro_rules! unary {
    ($(#[$doc:meta] $fn:ident => $op:expr;)*) => {
        $(
            #[$doc]
            ///
            /// # Errors
            /// A duplicate name or an unknown input id.
            pub fn $fn(&mut self, name: &str, x: NodeId) -> Result<NodeId> {
                self.node(name, $op, &[x])
            }
        )*
    };
}

impl GraphBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shape of an already added node.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] if `id` is not a node of this builder.
    pub fn shape(&self, id: NodeId) -> Result<&Shape> {
        self.nodes
            .get(id.index())
            .map(|n| &n.shape)
            .ok_or_else(|| QuantError::UnsupportedConfig {
                context: "GraphBuilder".into(),
                reason: format!("{id} is not a node of this graph"),
            })
    }

    /// Nodes added so far.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    fn check_name(&self, name: &str) -> Result<()> {
        if name.is_empty() {
            return Err(QuantError::UnsupportedConfig {
                context: "GraphBuilder".into(),
                reason: "node names must not be empty".into(),
            });
        }
        if self.names.contains_key(name) {
            return Err(QuantError::UnsupportedConfig {
                context: name.into(),
                reason: format!("duplicate node name {name:?}: names must be unique"),
            });
        }
        Ok(())
    }

    fn push(&mut self, name: &str, op: Op, inputs: Vec<NodeId>, shape: Shape) -> NodeId {
        let id = NodeId(self.nodes.len() as u32);
        self.nodes.push(Node {
            id,
            name: name.to_string(),
            op,
            inputs,
            shape,
        });
        self.names.insert(name.to_string(), id);
        id
    }

    /// A graph input of the given shape; only dimension 0 may be [`Dim::Batch`].
    ///
    /// # Errors
    /// A duplicate name, or `Dim::Batch` after dimension 0.
    pub fn input(&mut self, name: &str, dims: &[Dim]) -> Result<NodeId> {
        self.check_name(name)?;
        if dims.iter().skip(1).any(|d| *d == Dim::Batch) {
            return Err(QuantError::UnsupportedConfig {
                context: name.into(),
                reason: format!(
                    "only dimension 0 may be the dynamic batch, got {}",
                    Shape(dims.to_vec())
                ),
            });
        }
        let shape = Shape(dims.to_vec());
        check_numel(&shape).map_err(|e| e.in_context(name))?;
        let id = self.push(name, Op::Input, Vec::new(), shape);
        self.inputs.push(id);
        Ok(id)
    }

    /// Adds any op (except [`Op::Input`] and [`Op::Custom`], which have their own methods)
    /// on `inputs`, inferring its output shape.
    ///
    /// # Errors
    /// A duplicate name, an unknown input id, the wrong number of inputs, or input shapes
    /// the op cannot take ([`QuantError::ShapeMismatch`] naming the node and shapes).
    pub fn node(&mut self, name: &str, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        self.check_name(name)?;
        let shapes = inputs
            .iter()
            .map(|&i| self.shape(i).map_err(|e| e.in_context(name)))
            .collect::<Result<Vec<_>>>()?;
        let shape = infer(&op, &shapes).map_err(|e| e.in_context(name))?;
        check_numel(&shape).map_err(|e| e.in_context(name))?;
        Ok(self.push(name, op, inputs.to_vec(), shape))
    }

    /// A user's float module with its declared output shape (checked at run time).
    ///
    /// # Errors
    /// A duplicate name or an unknown input id.
    pub fn custom(
        &mut self,
        name: &str,
        x: NodeId,
        module: Box<dyn Module>,
        output_shape: Shape,
    ) -> Result<NodeId> {
        self.check_name(name)?;
        let xs = self.shape(x).map_err(|e| e.in_context(name))?;
        if output_shape.has_batch() != xs.has_batch()
            || output_shape.0.iter().skip(1).any(|d| *d == Dim::Batch)
        {
            return Err(QuantError::UnsupportedConfig {
                context: name.into(),
                reason: format!(
                    "declared output shape {output_shape} must keep the input's batch dimension ({xs})"
                ),
            });
        }
        check_numel(&output_shape).map_err(|e| e.in_context(name))?;
        Ok(self.push(name, Op::Custom(module), vec![x], output_shape))
    }

    /// `torch.nn.Conv2d`.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn conv2d(&mut self, name: &str, x: NodeId, conv: Conv2d) -> Result<NodeId> {
        self.node(name, Op::Conv2d(conv), &[x])
    }
    /// `torch.nn.Linear`.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn linear(&mut self, name: &str, x: NodeId, linear: Linear) -> Result<NodeId> {
        self.node(name, Op::Linear(linear), &[x])
    }
    /// `torch.nn.BatchNorm1d` (eval).
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn batch_norm1d(&mut self, name: &str, x: NodeId, bn: BatchNorm) -> Result<NodeId> {
        self.node(name, Op::BatchNorm1d(bn), &[x])
    }
    /// `torch.nn.BatchNorm2d` (eval).
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn batch_norm2d(&mut self, name: &str, x: NodeId, bn: BatchNorm) -> Result<NodeId> {
        self.node(name, Op::BatchNorm2d(bn), &[x])
    }

    unary! {
        /// `torch.nn.ReLU`.
        relu => Op::ReLU;
        /// `torch.nn.ReLU6` (a clamp to `[0, 6]`).
        relu6 => Op::Clamp { min: 0.0, max: 6.0 };
        /// `torch.nn.Hardswish`.
        hardswish => Op::Hardswish;
        /// `torch.nn.Hardsigmoid`.
        hardsigmoid => Op::Hardsigmoid;
        /// `torch.nn.Sigmoid`.
        sigmoid => Op::Sigmoid;
        /// `torch.nn.SiLU`.
        silu => Op::SiLU;
        /// `torch.nn.Dropout` (identity at inference).
        dropout => Op::Dropout;
        /// `torch.nn.Identity`.
        identity => Op::Identity;
        /// `QuantStub`.
        quant_stub => Op::QuantStub;
        /// `DeQuantStub`.
        dequant_stub => Op::DeQuantStub;
    }

    /// `torch.clamp(x, min, max)` / `Hardtanh(min, max)` / ONNX `Clip`.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`]; NaN or reversed bounds.
    pub fn clamp(&mut self, name: &str, x: NodeId, min: f32, max: f32) -> Result<NodeId> {
        self.node(name, Op::Clamp { min, max }, &[x])
    }
    /// `torch.nn.GELU` (`approximate="tanh"` when `tanh`).
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn gelu(&mut self, name: &str, x: NodeId, tanh: bool) -> Result<NodeId> {
        self.node(name, Op::Gelu { tanh }, &[x])
    }
    /// `FloatFunctional.add` with broadcasting.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`]; shapes that do not broadcast.
    pub fn add(&mut self, name: &str, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.node(name, Op::Add, &[a, b])
    }
    /// `FloatFunctional.add_relu`.
    ///
    /// # Errors
    /// As [`GraphBuilder::add`].
    pub fn add_relu(&mut self, name: &str, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.node(name, Op::AddReLU, &[a, b])
    }
    /// `FloatFunctional.mul` with broadcasting.
    ///
    /// # Errors
    /// As [`GraphBuilder::add`].
    pub fn mul(&mut self, name: &str, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.node(name, Op::Mul, &[a, b])
    }
    /// `FloatFunctional.cat(xs, axis)`.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`]; shapes that differ off the axis.
    pub fn concat(&mut self, name: &str, xs: &[NodeId], axis: usize) -> Result<NodeId> {
        self.node(name, Op::Concat { axis }, xs)
    }
    /// `torch.nn.MaxPool2d`.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`]; invalid window or padding.
    pub fn max_pool2d(&mut self, name: &str, x: NodeId, spec: Pool2dSpec) -> Result<NodeId> {
        self.node(name, Op::MaxPool2d(spec), &[x])
    }
    /// `torch.nn.AvgPool2d`.
    ///
    /// # Errors
    /// As [`GraphBuilder::max_pool2d`].
    pub fn avg_pool2d(&mut self, name: &str, x: NodeId, spec: Pool2dSpec) -> Result<NodeId> {
        self.node(name, Op::AvgPool2d(spec), &[x])
    }
    /// `torch.nn.AdaptiveAvgPool2d((h, w))`.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn adaptive_avg_pool2d(
        &mut self,
        name: &str,
        x: NodeId,
        out: (usize, usize),
    ) -> Result<NodeId> {
        self.node(name, Op::AdaptiveAvgPool2d(out), &[x])
    }
    /// `torch.mean(x, dims, keepdim)`.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn mean(&mut self, name: &str, x: NodeId, dims: &[usize], keepdim: bool) -> Result<NodeId> {
        let op = Op::Mean {
            dims: dims.to_vec(),
            keepdim,
        };
        self.node(name, op, &[x])
    }
    /// `torch.flatten(x, start_dim, end_dim)`.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn flatten(
        &mut self,
        name: &str,
        x: NodeId,
        start_dim: usize,
        end_dim: isize,
    ) -> Result<NodeId> {
        self.node(name, Op::Flatten { start_dim, end_dim }, &[x])
    }
    /// `x.reshape(shape)` (`-1` inferred, `0` copies).
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn reshape(&mut self, name: &str, x: NodeId, shape: &[isize]) -> Result<NodeId> {
        let op = Op::Reshape {
            shape: shape.to_vec(),
        };
        self.node(name, op, &[x])
    }
    /// `x.permute(dims)`.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn permute(&mut self, name: &str, x: NodeId, dims: &[usize]) -> Result<NodeId> {
        let op = Op::Permute {
            dims: dims.to_vec(),
        };
        self.node(name, op, &[x])
    }
    /// `x.narrow(axis, start, end - start)`.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn slice(
        &mut self,
        name: &str,
        x: NodeId,
        axis: usize,
        start: usize,
        end: usize,
    ) -> Result<NodeId> {
        self.node(name, Op::Slice { axis, start, end }, &[x])
    }
    /// `torch.nn.Upsample` / `F.interpolate`.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn upsample(&mut self, name: &str, x: NodeId, spec: UpsampleSpec) -> Result<NodeId> {
        self.node(name, Op::Upsample(spec), &[x])
    }
    /// `torch.softmax(x, axis)`.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn softmax(&mut self, name: &str, x: NodeId, axis: usize) -> Result<NodeId> {
        self.node(name, Op::Softmax { axis }, &[x])
    }
    /// `torch.nn.LayerNorm`.
    ///
    /// # Errors
    /// As [`GraphBuilder::node`].
    pub fn layer_norm(&mut self, name: &str, x: NodeId, ln: LayerNorm) -> Result<NodeId> {
        self.node(name, Op::LayerNorm(ln), &[x])
    }

    /// Marks a node as a graph output (in call order).
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for an unknown id.
    pub fn output(&mut self, id: NodeId) -> Result<()> {
        self.shape(id)?;
        self.outputs.push(id);
        Ok(())
    }

    /// The finished graph.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] if no output was marked.
    pub fn build(self) -> Result<Graph> {
        Graph::from_parts(self.nodes, self.inputs, self.outputs)
    }
}
