//! Lowering a [`Sequential`] into a [`Graph`], names preserved.

use ndarray::{ArrayD, IxDyn};

use super::op::Op;
use super::{Dim, Graph, GraphBuilder, NodeId, Shape};
use crate::error::{QuantError, Result};
use crate::nn::{Layer, PoolKind, Sequential};

impl Graph {
    /// Lowers a [`Sequential`] model into a graph with one input named `"input"` of shape
    /// `input` (dimension 0 may be [`Dim::Batch`]) and one output (the last layer's).
    ///
    /// Every leaf keeps its dotted path as node name, so `state_dict` keys and name-based
    /// configuration keep working. A [`Layer::Residual`] becomes its body followed by an
    /// [`Op::Add`] node named by the residual's path, whose second input is the identity
    /// skip. `BatchNorm2d` on a 2-D or 3-D input becomes [`Op::BatchNorm1d`]. A
    /// [`Layer::Custom`] module's output shape is found by running it once on zeros (batch
    /// 1).
    ///
    /// # Errors
    /// Any layer whose input shape does not fit (named by its path), as
    /// [`GraphBuilder`] reports it.
    ///
    /// # Examples
    /// ```
    /// use ndarray::{Array2, ArrayD, IxDyn};
    /// use ptq::graph::{Dim, Graph};
    /// use ptq::nn::{Layer, Linear, Sequential};
    /// let body = Sequential::new().push("fc", Layer::Linear(Linear::new(Array2::eye(3), None)?));
    /// let model = Sequential::new()
    ///     .push("block", Layer::Residual(body))
    ///     .push("relu", Layer::ReLU);
    /// let graph = Graph::from_sequential(&model, &[Dim::Batch, 3.into()])?;
    /// let names: Vec<&str> = graph.nodes().iter().map(|n| n.name.as_str()).collect();
    /// assert_eq!(names, ["input", "block.fc", "block", "relu"]);
    /// let x = ArrayD::from_elem(IxDyn(&[2, 3]), 1.5f32);
    /// assert_eq!(graph.forward(&[x.clone()])?[0], model.forward(&x)?);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn from_sequential(seq: &Sequential, input: &[Dim]) -> Result<Graph> {
        Graph::from_sequential_named(seq, "input", input)
    }

    /// As [`Graph::from_sequential`], with the input node named `input_name` (the
    /// Sequential flow of [`crate::workflow`] names it [`crate::workflow::INPUT`], a name no
    /// layer path can have).
    pub(crate) fn from_sequential_named(
        seq: &Sequential,
        input_name: &str,
        input: &[Dim],
    ) -> Result<Graph> {
        let mut g = GraphBuilder::new();
        let x = g.input(input_name, input)?;
        let y = lower(&mut g, seq, "", x)?;
        g.output(y)?;
        g.build()
    }
}

fn lower(g: &mut GraphBuilder, seq: &Sequential, prefix: &str, mut x: NodeId) -> Result<NodeId> {
    for (name, layer) in seq.children() {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        x = lower_layer(g, layer, &path, x)?;
    }
    Ok(x)
}

fn lower_layer(g: &mut GraphBuilder, layer: &Layer, path: &str, x: NodeId) -> Result<NodeId> {
    match layer {
        Layer::Sequential(s) => return lower(g, s, path, x),
        Layer::Residual(body) => {
            let y = lower(g, body, path, x)?;
            return g.add(path, y, x);
        }
        Layer::Custom(m) => {
            let shape = g.shape(x)?.clone();
            let probe = ArrayD::<f32>::zeros(IxDyn(&shape.to_concrete(1)));
            let out = m.forward(&probe).map_err(|e| e.in_context(path))?;
            let mut dims: Vec<Dim> = out.shape().iter().map(|&d| Dim::Fixed(d)).collect();
            if shape.has_batch() {
                if dims.is_empty() || dims[0] != Dim::Fixed(1) {
                    return Err(QuantError::ShapeMismatch {
                        context: path.into(),
                        expected: "a custom layer that keeps the batch as dimension 0".into(),
                        actual: format!("output of shape {:?} for batch 1", out.shape()),
                    });
                }
                dims[0] = Dim::Batch;
            }
            return g.custom(path, x, m.box_clone(), Shape(dims));
        }
        _ => {}
    }
    let op = leaf_op(layer, g.shape(x)?.rank()).ok_or_else(|| QuantError::UnsupportedConfig {
        context: path.into(),
        reason: format!("{} is not a leaf layer", layer.type_name()),
    })?;
    g.node(path, op, &[x])
}

/// The op a leaf layer lowers into, on an input of rank `rank` (`None` for containers
/// and custom modules, which the callers lower themselves).
fn leaf_op(layer: &Layer, rank: usize) -> Option<Op> {
    Some(match layer {
        Layer::Sequential(_) | Layer::Residual(_) | Layer::Custom(_) => return None,
        Layer::Conv2d(c) => Op::Conv2d(c.clone()),
        Layer::ConvReLU2d(c) => Op::ConvReLU2d(c.clone()),
        Layer::Linear(l) => Op::Linear(l.clone()),
        Layer::LinearReLU(l) => Op::LinearReLU(l.clone()),
        Layer::BatchNorm2d(b) => {
            if rank == 4 {
                Op::BatchNorm2d(b.clone())
            } else {
                Op::BatchNorm1d(b.clone())
            }
        }
        Layer::ReLU => Op::ReLU,
        Layer::ReLU6 => Op::Clamp { min: 0.0, max: 6.0 },
        Layer::Pool2d(p) => match p.kind {
            PoolKind::Max => Op::MaxPool2d(p.spec()),
            PoolKind::Avg => Op::AvgPool2d(p.spec()),
        },
        Layer::AdaptiveAvgPool2d(o) => Op::AdaptiveAvgPool2d(*o),
        Layer::Flatten { start_dim } => Op::Flatten {
            start_dim: *start_dim,
            end_dim: -1,
        },
        Layer::Dropout => Op::Dropout,
        Layer::Identity => Op::Identity,
        Layer::QuantStub => Op::QuantStub,
        Layer::DeQuantStub => Op::DeQuantStub,
    })
}

impl Graph {
    /// The topology of a [`Sequential`] as a graph, for the data-free analysis tools that
    /// need no shapes (equalization reads weights and which node reads which): the nodes
    /// and names of [`Graph::from_sequential`], with placeholder shapes that carry only
    /// the rank each layer gives (the input's rank from the first layer that fixes it:
    /// 2 before a `Linear`, else 4; sizes 1). The graph is never run and never leaves the
    /// crate.
    pub(crate) fn structure_of_sequential(seq: &Sequential) -> Result<Graph> {
        let mut nodes = Vec::new();
        let rank = input_rank(seq).unwrap_or(4);
        let x = push(&mut nodes, "<input>".into(), Op::Input, Vec::new(), rank);
        let (y, _) = structure(&mut nodes, seq, "", x, rank);
        Graph::from_parts(nodes, vec![x], vec![y])
    }
}

/// The rank of a model's input, from the first layer that fixes it.
fn input_rank(seq: &Sequential) -> Option<usize> {
    for (_, layer) in seq.children() {
        match layer {
            Layer::Linear(_) | Layer::LinearReLU(_) => return Some(2),
            Layer::Conv2d(_)
            | Layer::ConvReLU2d(_)
            | Layer::Pool2d(_)
            | Layer::AdaptiveAvgPool2d(_)
            | Layer::BatchNorm2d(_) => return Some(4),
            Layer::Sequential(s) | Layer::Residual(s) => {
                if let Some(r) = input_rank(s) {
                    return Some(r);
                }
            }
            Layer::Flatten { .. } | Layer::Custom(_) => return None,
            _ => {}
        }
    }
    None
}

fn push(
    nodes: &mut Vec<super::Node>,
    name: String,
    op: Op,
    inputs: Vec<NodeId>,
    rank: usize,
) -> NodeId {
    let id = NodeId(nodes.len() as u32);
    let mut dims = vec![Dim::Fixed(1); rank.max(1)];
    dims[0] = Dim::Batch;
    nodes.push(super::Node {
        id,
        name,
        op,
        inputs,
        shape: Shape(dims),
    });
    id
}

/// [`lower`] without shapes: returns the last node and its rank.
fn structure(
    nodes: &mut Vec<super::Node>,
    seq: &Sequential,
    prefix: &str,
    mut x: NodeId,
    mut rank: usize,
) -> (NodeId, usize) {
    for (name, layer) in seq.children() {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let op = match layer {
            Layer::Sequential(s) => {
                (x, rank) = structure(nodes, s, &path, x, rank);
                continue;
            }
            Layer::Residual(body) => {
                let (y, r) = structure(nodes, body, &path, x, rank);
                x = push(nodes, path, Op::Add, vec![y, x], r);
                rank = r;
                continue;
            }
            Layer::Custom(m) => Op::Custom(m.box_clone()),
            leaf => leaf_op(leaf, rank).unwrap_or(Op::Identity),
        };
        rank = match layer {
            Layer::Conv2d(_)
            | Layer::ConvReLU2d(_)
            | Layer::Pool2d(_)
            | Layer::AdaptiveAvgPool2d(_) => 4,
            Layer::Flatten { start_dim } => (start_dim + 1).min(rank),
            _ => rank,
        };
        x = push(nodes, path, op, vec![x], rank);
    }
    (x, rank)
}
