//! Fusion on the graph, like `torch.ao.quantization.fuse_modules`: conv + bn (+ relu),
//! linear + bn1d, linear + relu, conv + relu, add + relu.
//!
//! A fused group becomes one node under the group's FIRST name (where PyTorch puts the
//! fused module and its observer); the other nodes of the group are removed and their
//! readers read the fused node. Batch norms are folded into the weights with PyTorch's
//! `fuse_conv_bn_weights` / `fuse_linear_bn_weights` arithmetic in `f32`.

use std::collections::HashMap;

use ndarray::{Array1, Axis};

use super::op::Op;
use super::{Graph, Node, NodeId};
use crate::error::{QuantError, Result};
use crate::nn::{fold_batch_norm, BatchNorm2d, Linear};

fn group_error(group: &[&str], reason: impl Into<String>) -> QuantError {
    QuantError::UnsupportedConfig {
        context: format!("fuse {group:?}"),
        reason: reason.into(),
    }
}

/// Folds an eval-mode `BatchNorm1d` into the preceding linear layer (PyTorch's
/// `fuse_linear_bn_weights`): `w' = w * (gamma * rsqrt(var + eps))[:, None]`,
/// `b' = (b - mean) * gamma * rsqrt(var + eps) + beta`.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if the norm's features differ from the layer's outputs.
pub fn fold_linear_batch_norm(linear: &Linear, bn: &BatchNorm2d) -> Result<Linear> {
    let o = linear.weight.nrows();
    if bn.channels() != o {
        return Err(QuantError::ShapeMismatch {
            context: "fuse Linear + BatchNorm1d".into(),
            expected: format!("BatchNorm1d over {o} features (the layer's outputs)"),
            actual: format!("{} features", bn.channels()),
        });
    }
    let scale = &bn.weight * &bn.running_var.mapv(|v| 1.0 / (v + bn.eps).sqrt());
    let mut weight = linear.weight.clone();
    for (mut row, &s) in weight.axis_iter_mut(Axis(0)).zip(scale.iter()) {
        row.mapv_inplace(|v| v * s);
    }
    let b = linear.bias.clone().unwrap_or_else(|| Array1::zeros(o));
    let bias = (&b - &bn.running_mean) * &scale + &bn.bias;
    Linear::new(weight, Some(bias))
}

/// The fused op of a group of node ops, or why they do not fuse.
fn fused_op(ops: &[&Op]) -> std::result::Result<Result<Op>, ()> {
    Ok(match ops {
        [Op::Conv2d(c), Op::BatchNorm2d(b)] => fold_batch_norm(c, b).map(Op::Conv2d),
        [Op::Conv2d(c), Op::BatchNorm2d(b), Op::ReLU] => fold_batch_norm(c, b).map(Op::ConvReLU2d),
        [Op::Conv2d(c), Op::ReLU] => Ok(Op::ConvReLU2d(c.clone())),
        [Op::Linear(l), Op::BatchNorm1d(b)] => fold_linear_batch_norm(l, b).map(Op::Linear),
        [Op::Linear(l), Op::ReLU] => Ok(Op::LinearReLU(l.clone())),
        [Op::Add, Op::ReLU] => Ok(Op::AddReLU),
        _ => return Err(()),
    })
}

const PATTERNS: &str =
    "Conv2d+BatchNorm2d[+ReLU], Conv2d+ReLU, Linear+BatchNorm1d, Linear+ReLU, Add+ReLU";

/// Fuses groups of nodes named like PyTorch's `fuse_modules` lists, e.g.
/// `&[&["conv1", "bn1", "relu"], &["layer1.0.conv2", "layer1.0.bn2"]]`.
///
/// Each group must be a chain (every node after the first reads only the previous one)
/// whose intermediate nodes have no other readers and are not graph outputs.
///
/// # Errors
/// [`QuantError::UnsupportedConfig`] naming the group: `no layer named "..."` for a
/// misspelled name, a broken chain, an intermediate read elsewhere, or kinds that form no
/// pattern; [`QuantError::ShapeMismatch`] if a batch norm does not fit its layer.
///
/// # Examples
/// ```
/// use ndarray::Array4;
/// use ptq::graph::{fuse, Dim, GraphBuilder, OpKind};
/// use ptq::nn::{BatchNorm2d, Conv2d};
/// let mut g = GraphBuilder::new();
/// let x = g.input("x", &[Dim::Batch, 3.into(), 8.into(), 8.into()])?;
/// let y = g.conv2d("conv", x, Conv2d::new(Array4::ones((4, 3, 3, 3)), None)?)?;
/// let y = g.batch_norm2d("bn", y, BatchNorm2d::identity(4))?;
/// let y = g.relu("relu", y)?;
/// g.output(y)?;
/// let graph = g.build()?;
/// let fused = fuse(&graph, &[&["conv", "bn", "relu"]])?;
/// let conv = fused.find("conv").unwrap();
/// assert_eq!(fused.node(conv).op.kind(), OpKind::ConvReLU2d);
/// assert!(fused.find("bn").is_none() && fused.outputs() == [conv]);
/// let err = fuse(&graph, &[&["conv", "bn1"]]).unwrap_err();
/// assert!(err.to_string().contains("no layer named \"bn1\""));
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn fuse(graph: &Graph, groups: &[&[&str]]) -> Result<Graph> {
    let mut g = graph.clone();
    for group in groups {
        g = fuse_group(&g, group)?;
    }
    Ok(g)
}

fn fuse_group(graph: &Graph, group: &[&str]) -> Result<Graph> {
    if group.len() < 2 {
        return Err(group_error(group, "a group needs at least two layers"));
    }
    let ids = group
        .iter()
        .map(|n| {
            graph
                .find(n)
                .ok_or_else(|| group_error(group, format!("no layer named {n:?}")))
        })
        .collect::<Result<Vec<NodeId>>>()?;
    for w in ids.windows(2) {
        let (prev, next) = (graph.node(w[0]), graph.node(w[1]));
        let arity_ok = match next.op {
            Op::Add => false,
            _ => next.inputs == [prev.id],
        };
        if !arity_ok {
            return Err(group_error(
                group,
                format!(
                    "{:?} does not read only {:?}: the layers must form a chain, in this order",
                    next.name, prev.name
                ),
            ));
        }
        let readers = graph.consumers(prev.id);
        if readers != [next.id] || graph.is_output(prev.id) {
            return Err(group_error(
                group,
                format!(
                    "{:?} is also read elsewhere (by {} node(s){}); fusing would change what they see",
                    prev.name,
                    readers.len(),
                    if graph.is_output(prev.id) { " and as a graph output" } else { "" }
                ),
            ));
        }
    }
    let ops: Vec<&Op> = ids.iter().map(|&i| &graph.node(i).op).collect();
    let fused = fused_op(&ops).map_err(|()| {
        let kinds: Vec<&str> = ops.iter().map(|o| o.type_name()).collect();
        group_error(
            group,
            format!("{kinds:?} is not a fusable pattern ({PATTERNS})"),
        )
    })?;
    let fused = fused.map_err(|e| e.in_context(&format!("fuse {group:?}")))?;
    let head = ids[0];
    let last = *ids.last().expect("len >= 2");
    let removed: Vec<NodeId> = ids[1..].to_vec();
    // Renumber, skipping removed nodes; readers of the last node read the head.
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    let mut nodes: Vec<Node> = Vec::with_capacity(graph.nodes().len());
    for n in graph.nodes() {
        if removed.contains(&n.id) {
            continue;
        }
        let new_id = NodeId(nodes.len() as u32);
        map.insert(n.id, new_id);
        let mut node = n.clone();
        node.id = new_id;
        node.inputs = n
            .inputs
            .iter()
            .map(|i| map[&if *i == last { head } else { *i }])
            .collect();
        if n.id == head {
            node.op = fused.clone();
            node.shape = graph.node(last).shape.clone();
        }
        nodes.push(node);
    }
    let remap = |i: &NodeId| map[&if *i == last { head } else { *i }];
    let inputs = graph.inputs().iter().map(remap).collect();
    let outputs = graph.outputs().iter().map(remap).collect();
    Graph::from_parts(nodes, inputs, outputs)
}

/// Every chain that [`fuse`] accepts, longest first at each head, as name groups in node
/// order: conv + bn (+ relu), conv + relu, linear + bn1d, linear + relu, add + relu.
///
/// # Examples
/// ```
/// use ptq::graph::{find_fusable, fuse, zoo};
/// let g = zoo::resnet18(4, 10, (32, 32))?;
/// let groups = find_fusable(&g);
/// assert_eq!(groups[0], ["conv1", "bn1", "relu"]);
/// assert!(groups.contains(&vec!["layer2.0.downsample.0".to_string(), "layer2.0.downsample.1".into()]));
/// let refs: Vec<Vec<&str>> = groups.iter().map(|g| g.iter().map(|s| s.as_str()).collect()).collect();
/// let refs: Vec<&[&str]> = refs.iter().map(|g| g.as_slice()).collect();
/// let fused = fuse(&g, &refs)?;
/// assert!(ptq::graph::unfused_batch_norms(&fused).is_empty());
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn find_fusable(graph: &Graph) -> Vec<Vec<String>> {
    // The single reader of `id`, if it reads only `id` and `id` is not an output.
    let sole = |id: NodeId| -> Option<&Node> {
        let readers = graph.consumers(id);
        if readers.len() != 1 || graph.is_output(id) {
            return None;
        }
        let n = graph.node(readers[0]);
        (n.inputs == [id]).then_some(n)
    };
    let mut groups = Vec::new();
    let mut used = std::collections::HashSet::new();
    for n in graph.nodes() {
        if used.contains(&n.id) {
            continue;
        }
        let mut chain = vec![n];
        let next = sole(n.id);
        match (&n.op, next.map(|m| &m.op)) {
            (Op::Conv2d(_), Some(Op::BatchNorm2d(_))) => {
                let bn = next.expect("matched");
                chain.push(bn);
                if let Some(r) = sole(bn.id).filter(|r| matches!(r.op, Op::ReLU)) {
                    chain.push(r);
                }
            }
            (Op::Conv2d(_) | Op::Linear(_) | Op::Add, Some(Op::ReLU))
            | (Op::Linear(_), Some(Op::BatchNorm1d(_))) => chain.push(next.expect("matched")),
            _ => continue,
        }
        used.extend(chain.iter().map(|c| c.id));
        groups.push(chain.iter().map(|c| c.name.clone()).collect());
    }
    groups
}

/// Names of the batch-norm nodes left in the graph: they run in float after quantization
/// (fuse them into the preceding convolution / linear layer to avoid that).
pub fn unfused_batch_norms(graph: &Graph) -> Vec<String> {
    graph
        .nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::BatchNorm1d(_) | Op::BatchNorm2d(_)))
        .map(|n| n.name.clone())
        .collect()
}
