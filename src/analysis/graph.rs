//! The accuracy tools on graphs: every tool of [`crate::analysis`] for a float
//! [`Graph`], its [`PreparedGraph`](crate::quant::PreparedGraph) configuration
//! ([`QConfigMap`] by node name or op kind) and its [`QuantizedGraph`], with the same
//! semantics and the same report types as the `Sequential` versions. Rows are keyed by
//! node name (PyTorch's module path), so the reports read like the `Sequential` ones and
//! like PyTorch's.
//!
//! * [`activation_sqnr`] / [`weight_sqnr`]: per-node error of the int8 graph against the
//!   float one (every node the float graph has: convolutions, adds inside residual
//!   blocks, pools, float islands).
//! * [`sensitivity`] and [`auto_mixed_precision`]: over [`quantizable_nodes`] (every node
//!   that computes new int8 values: convolutions, linear layers, adds, concatenations,
//!   ...), keeping nodes in float through the [`QConfigMap`].
//! * [`equalize`], [`absorb_high_bias`], [`correct_bias`]: on chains
//!   `conv/linear -> (ReLU, pooling, Flatten) -> conv/linear` wherever they are in the
//!   graph, residual branches included (a basic block's `conv1 -> relu -> conv2`, an
//!   inverted residual's expand -> depthwise -> project). A chain never crosses a node
//!   with several readers (fan-out) or several inputs (add, concat, mul): scaling there
//!   would change what the other branch sees.
//!
//! Graphs may have several inputs and outputs. Data-driven tools take batches as
//! [`GraphBatch`]es: an array per batch for a one-input graph, a `Vec` of arrays (one per
//! graph input, in [`Graph::inputs`] order) otherwise. [`activation_sqnr`] reports every
//! node, so every output gets its own row; the metric of [`sensitivity`] and
//! [`auto_mixed_precision`] sees all outputs of all evaluation batches, batch-major
//! (batch 0's outputs in [`Graph::outputs`] order, then batch 1's, ...: with `k` outputs,
//! `outs.chunks(k)` gives one batch's).
//!
//! # Examples
//! The whole flow on a reduced torchvision ResNet-18 (the residual blocks' convolutions
//! are equalized, the biases corrected, and the int8 graph compared node by node):
//! ```
//! use ndarray::{ArrayD, IxDyn};
//! use ptq::analysis::graph as ga;
//! use ptq::graph::{find_fusable, fuse, zoo};
//! use ptq::qconfig::{QConfig, QConfigMap};
//! use ptq::quant::{calibrate, convert, prepare};
//!
//! let mut g = zoo::resnet18(4, 10, (16, 16))?;
//! // Real weights would come from `g.load_state_dict(..)`; here, deterministic ones.
//! let sd = g.state_dict().into_iter().enumerate().map(|(k, (name, mut w))| {
//!     for (j, v) in w.iter_mut().enumerate() {
//!         *v = if name.ends_with("running_var") { 1.0 } else {
//!             (((j * 7 + k * 13) as f32 * 0.618).fract() - 0.5) * 0.5
//!         };
//!     }
//!     (name, w)
//! }).collect();
//! g.load_state_dict(&sd, true)?;
//! let groups = find_fusable(&g);
//! let groups: Vec<Vec<&str>> = groups.iter().map(|v| v.iter().map(|s| s.as_str()).collect()).collect();
//! let groups: Vec<&[&str]> = groups.iter().map(|v| v.as_slice()).collect();
//! let g = fuse(&g, &groups)?;
//! let data: Vec<ArrayD<f32>> = (0..2)
//!     .map(|b| ArrayD::from_shape_fn(IxDyn(&[2, 3, 16, 16]), |i| ((i[1] * 7 + i[2] * 3 + i[3] + b) as f32 * 0.37).sin()))
//!     .collect();
//!
//! // Cross-layer equalization reaches inside the residual branches.
//! let (eq, report) = ga::equalize(&g, 20)?;
//! assert!(report.pairs.iter().any(|p| p.first == "layer1.0.conv1" && p.second == "layer1.0.conv2"));
//! let (a, b) = (g.forward(&data[..1])?, eq.forward(&data[..1])?);
//! assert!(a[0].iter().zip(b[0].iter()).all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + x.abs())));
//!
//! // Bias correction for the config we will use, then the usual flow.
//! let map = QConfigMap::new(QConfig::minmax_per_tensor());
//! let (eq, _) = ga::correct_bias(&eq, &map, &data)?;
//! let mut prepared = prepare(eq.clone(), &map)?;
//! calibrate(&mut prepared, &data)?;
//! let int8 = convert(prepared)?;
//!
//! // Per-node SQNR, adds of the residual blocks included.
//! let sqnr = ga::activation_sqnr(&eq, &int8, &data)?;
//! assert!(sqnr.get("layer1.0.add_relu").is_some());
//! println!("{sqnr}");
//! # Ok::<(), ptq::QuantError>(())
//! ```

use std::borrow::Borrow;
use std::collections::HashMap;

use ndarray::{ArrayD, Axis};

use super::equalize::{equalize_pairs, weighted, weighted_mut};
use super::mixed::search;
use super::sensitivity::{check_data, sensitivity_of, Subject};
use super::weighted::{pair_block, DeltaLayer, Weighted};
use super::{
    weight_error, AbsorbedBias, BiasCorrection, Energy, EqualizationReport, LayerError,
    LayerReport, MixedPrecisionOptions, MixedPrecisionResult, SensitivityReport,
};
use crate::error::{QuantError, Result};
use crate::graph::{Graph, NodeId, Op};
use crate::qconfig::{QConfig, QConfigMap};
use crate::quant::{role, QuantizedGraph, Role};

/// One batch for a graph: one tensor per graph input, in the order of
/// [`Graph::inputs`]. A single [`ArrayD`] is a batch for a one-input graph; a `Vec` (or an
/// array) of them holds a batch for a graph with several inputs. References to either
/// are batches too, so `&data` with `data: Vec<ArrayD<f32>>` (one-input graph) or
/// `data: Vec<Vec<ArrayD<f32>>>` (several inputs) works wherever a tool takes batches.
pub trait GraphBatch {
    /// The tensors, one per graph input.
    fn inputs(&self) -> &[ArrayD<f32>];
}

impl GraphBatch for ArrayD<f32> {
    fn inputs(&self) -> &[ArrayD<f32>] {
        std::slice::from_ref(self)
    }
}

impl GraphBatch for Vec<ArrayD<f32>> {
    fn inputs(&self) -> &[ArrayD<f32>] {
        self
    }
}

impl GraphBatch for [ArrayD<f32>] {
    fn inputs(&self) -> &[ArrayD<f32>] {
        self
    }
}

impl<const N: usize> GraphBatch for [ArrayD<f32>; N] {
    fn inputs(&self) -> &[ArrayD<f32>] {
        self
    }
}

impl<T: GraphBatch + ?Sized> GraphBatch for &T {
    fn inputs(&self) -> &[ArrayD<f32>] {
        (**self).inputs()
    }
}

/// A batch for a one-input graph held as anything that borrows an array (the batches of
/// the `Sequential` tools).
pub(crate) struct One<B>(pub(crate) B);

impl<B: Borrow<ArrayD<f32>>> GraphBatch for One<B> {
    fn inputs(&self) -> &[ArrayD<f32>] {
        std::slice::from_ref(self.0.borrow())
    }
}

/// `batch`'s tensors if it holds one per input of `graph`, else an error naming the tool.
pub(crate) fn batch_inputs<'b>(
    graph: &Graph,
    batch: &'b impl GraphBatch,
    tool: &str,
) -> Result<&'b [ArrayD<f32>]> {
    let xs = batch.inputs();
    if xs.len() != graph.inputs().len() {
        return Err(QuantError::ShapeMismatch {
            context: tool.into(),
            expected: format!(
                "a batch of {} tensor(s), one per graph input (the graph has {} inputs)",
                graph.inputs().len(),
                graph.inputs().len()
            ),
            actual: format!("{} tensor(s)", xs.len()),
        });
    }
    Ok(xs)
}

/// The nodes that compute new int8 values when quantized (convolutions, linear layers,
/// adds, muls, concatenations, Hardswish, batch norms: the ops that requantize with their
/// own observer), in graph order: the candidates of [`sensitivity`] and
/// [`auto_mixed_precision`]. Nodes that only pass int8 values on (ReLU, pooling,
/// flatten) follow their input and are not listed; nor are ops that run in float anyway.
///
/// # Examples
/// ```
/// let g = ptq::graph::zoo::resnet18(4, 10, (16, 16))?;
/// let nodes = ptq::analysis::graph::quantizable_nodes(&g);
/// assert!(nodes.iter().any(|n| n == "layer1.0.conv2"));
/// assert!(nodes.iter().any(|n| n == "layer1.0.add_relu"));
/// assert!(!nodes.iter().any(|n| n == "maxpool"));
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn quantizable_nodes(graph: &Graph) -> Vec<String> {
    graph
        .nodes()
        .iter()
        .filter(|n| role(graph, n) == Role::Requantizes)
        .map(|n| n.name.clone())
        .collect()
}

/// Runs the float graph and its int8 twin side by side on `batches` and reports, for every
/// node of the float graph (matched by name), the SQNR of the int8 graph's output of that
/// node (dequantized; float islands as they are) against the float one, accumulated over
/// all batches, in graph order. Nodes that only pass values through (inputs, stubs,
/// identities, dropout) are skipped, as are the int8 graph's borders (`*.quantize`,
/// `*.dequantize`), which the float graph does not have. Give the float graph that was
/// prepared (after fusion and any equalization), so that the names match.
///
/// # Errors
/// [`QuantError::EmptyCalibration`] for no batches; [`QuantError::ShapeMismatch`] for a
/// batch without one tensor per graph input; either graph's forward errors.
///
/// # Examples
/// See the [module](self) example.
pub fn activation_sqnr<I>(float: &Graph, int8: &QuantizedGraph, batches: I) -> Result<LayerReport>
where
    I: IntoIterator,
    I::Item: GraphBatch,
{
    let mut energy: HashMap<String, Energy> = HashMap::new();
    let mut any = false;
    for batch in batches {
        let x = batch_inputs(float, &batch, "activation_sqnr")?;
        any = true;
        let mut reference: HashMap<String, ArrayD<f32>> = HashMap::new();
        float.forward_with(x, &mut |node, y| {
            if !matches!(
                node.op,
                Op::Input | Op::QuantStub | Op::DeQuantStub | Op::Identity | Op::Dropout
            ) {
                reference.insert(node.name.clone(), y.clone());
            }
            Ok(())
        })?;
        int8.forward_with(x, &mut |name, v| {
            if let Some(r) = reference.get(name) {
                let y = v.to_f32();
                if r.shape() == y.shape() {
                    energy.entry(name.to_string()).or_default().add(r, &y);
                }
            }
        })?;
    }
    if !any {
        return Err(QuantError::EmptyCalibration {
            reason: "activation_sqnr needs at least one batch".into(),
        });
    }
    let layers = float
        .nodes()
        .iter()
        .filter_map(|n| {
            energy.get(&n.name).map(|e| LayerError {
                path: n.name.clone(),
                layer: n.op.type_name(),
                sqnr_db: e.sqnr_db(),
                max_abs_error: e.max_abs,
                elements: e.elements,
                worst_channel_sqnr_db: None,
            })
        })
        .collect();
    Ok(LayerReport {
        what: "activations",
        layers,
    })
}

/// For every convolution / linear node (fused variants included) that `map` quantizes (and
/// that has an int8 version), the SQNR of its weights after quantizing them with the
/// config's weight observer (what `convert` stores) against the float weights, for the
/// whole tensor and for its worst output channel.
///
/// # Errors
/// The weight specs' errors, named with the node.
///
/// # Examples
/// ```
/// use ptq::qconfig::{QConfig, QConfigMap};
/// let mut g = ptq::graph::zoo::resnet18(4, 10, (16, 16))?;
/// // Output channels of very different ranges: per-channel scales help.
/// let w = ndarray::Array4::from_shape_fn((4, 3, 7, 7), |(o, i, y, x)| ((i + y + x) as f32 - 9.0) * 10f32.powi(o as i32 - 2));
/// let sd = [("conv1.weight".to_string(), w.into_dyn())].into_iter().collect();
/// g.load_state_dict(&sd, false)?;
/// let pt = ptq::analysis::graph::weight_sqnr(&g, &QConfigMap::new(QConfig::minmax_per_tensor()))?;
/// let pc = ptq::analysis::graph::weight_sqnr(&g, &QConfigMap::new(QConfig::minmax_per_channel()))?;
/// let worst = |r: &ptq::analysis::LayerReport| r.get("conv1").unwrap().worst_channel_sqnr_db.unwrap();
/// assert!(worst(&pc) > worst(&pt) + 20.0);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn weight_sqnr(graph: &Graph, map: &QConfigMap) -> Result<LayerReport> {
    let mut layers = Vec::new();
    for n in graph.nodes() {
        let Some(w) = Weighted::of_op(&n.op) else {
            continue;
        };
        if role(graph, n) != Role::Requantizes {
            continue;
        }
        let Some(qc) = map.qconfig_for(&n.name, n.op.type_name()) else {
            continue;
        };
        layers.push(weight_error(
            n.name.clone(),
            n.op.type_name(),
            w.weight(),
            &qc,
        )?);
    }
    Ok(LayerReport {
        what: "weights",
        layers,
    })
}

/// Sensitivity analysis on a graph: for every node of [`quantizable_nodes`], the metric
/// when only that node is quantized with `qconfig` and when only that node is kept in
/// float (through [`QConfigMap`] entries by name, which leave any node under a prefix
/// name such as a residual add's body untouched), ranked, exactly as
/// [`analysis::sensitivity`](super::sensitivity) does for `Sequential` models. A node
/// quantized alone gets automatic quantize / dequantize borders around it.
///
/// `metric` receives the outputs of every evaluation batch, batch-major (see the
/// [module](self) docs: one array per batch for a one-output graph).
///
/// # Errors
/// [`QuantError::EmptyCalibration`] for no calibration or no evaluation batch,
/// [`QuantError::NothingToQuantize`] if the graph has no candidate node,
/// [`QuantError::ShapeMismatch`] for a batch without one tensor per graph input, and the
/// flow's own errors.
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2, ArrayD, IxDyn};
/// use ptq::graph::{Dim, GraphBuilder, Op};
/// use ptq::nn::Linear;
/// use ptq::qconfig::QConfig;
/// let fc = |s: f32| Linear::new(Array2::from_shape_fn((4, 4), |(o, i)| s * (o as f32 - i as f32)), Some(Array1::zeros(4)));
/// let mut b = GraphBuilder::new();
/// let x = b.input("x", &[Dim::Batch, 4.into()])?;
/// let y = b.quant_stub("quant", x)?;
/// let y = b.node("fc1", Op::LinearReLU(fc(0.5)?), &[y])?;
/// let y = b.linear("fc2", y, fc(1.0)?)?;
/// let y = b.dequant_stub("dequant", y)?;
/// b.output(y)?;
/// let g = b.build()?;
/// let data = vec![ArrayD::from_shape_fn(IxDyn(&[16, 4]), |i| (i[0] as f32 * 0.3 + i[1] as f32).sin())];
/// let reference = g.forward(&data)?.remove(0);
/// let metric = |outs: &[ArrayD<f32>]| ptq::analysis::sqnr(&reference, &outs[0]).unwrap_or(f64::NAN).min(100.0);
/// let report = ptq::analysis::graph::sensitivity(&g, QConfig::minmax_per_tensor(), &data, &data, metric)?;
/// assert_eq!(report.layers.len(), 2);
/// println!("{report}");
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn sensitivity<B, M>(
    graph: &Graph,
    qconfig: QConfig,
    calibration: &[B],
    eval: &[B],
    mut metric: M,
) -> Result<SensitivityReport>
where
    B: GraphBatch,
    M: FnMut(&[ArrayD<f32>]) -> f64,
{
    check_batches(graph, calibration, eval, "sensitivity")?;
    sensitivity_of(
        &graph_subject(graph),
        qconfig,
        calibration,
        eval,
        &mut metric,
    )
}

/// Automatic mixed precision on a graph: the fewest nodes of [`quantizable_nodes`] to keep
/// in float so that the int8 graph's metric is at least `float_metric -
/// options.allowed_drop`. The search (all int8; rank by the metric with one node in float;
/// greedy; prune; on the plain, [`equalize`]d + [`absorb_high_bias`]ed and
/// [`correct_bias`]ed variants) is the one of
/// [`analysis::auto_mixed_precision`](super::auto_mixed_precision); the result holds the
/// chosen [`QuantizedGraph`] and the float nodes by name. Exactly those nodes are kept in
/// float, even where a name is a prefix of others (a residual add `"block"` lowered from
/// a `Sequential` and its body `"block.fc"`): the search's [`QConfigMap`] restores the
/// covered nodes' config by name.
///
/// # Errors
/// As [`sensitivity`], and [`QuantError::UnsupportedConfig`] for a negative or NaN
/// `allowed_drop`.
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2, ArrayD, IxDyn};
/// use ptq::analysis::MixedPrecisionOptions;
/// use ptq::graph::{Dim, GraphBuilder};
/// use ptq::nn::Linear;
/// use ptq::qconfig::QConfig;
/// let fc = |s: f32| Linear::new(Array2::from_shape_fn((4, 4), |(o, i)| s * (o as f32 - i as f32)), Some(Array1::zeros(4)));
/// let mut b = GraphBuilder::new();
/// let x = b.input("x", &[Dim::Batch, 4.into()])?;
/// let y = b.quant_stub("quant", x)?;
/// let y = b.linear("fc1", y, fc(0.5)?)?;
/// let y = b.linear("fc2", y, fc(1.0)?)?;
/// let y = b.dequant_stub("dequant", y)?;
/// b.output(y)?;
/// let g = b.build()?;
/// let data = vec![ArrayD::from_shape_fn(IxDyn(&[16, 4]), |i| (i[0] as f32 * 0.3 + i[1] as f32).sin())];
/// let reference = g.forward(&data)?.remove(0);
/// let metric = |outs: &[ArrayD<f32>]| -(&reference - &outs[0]).mapv(|d| (d * d) as f64).mean().unwrap_or(0.0);
/// let options = MixedPrecisionOptions { allowed_drop: 1.0, ..Default::default() };
/// let found = ptq::analysis::graph::auto_mixed_precision(&g, QConfig::minmax_per_tensor(), &data, &data, metric, &options)?;
/// assert!(found.target_met && found.float_layers.is_empty());
/// assert!(found.model.weight("fc1")?.is_some());
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn auto_mixed_precision<B, M>(
    graph: &Graph,
    qconfig: QConfig,
    calibration: &[B],
    eval: &[B],
    mut metric: M,
    options: &MixedPrecisionOptions,
) -> Result<MixedPrecisionResult<QuantizedGraph>>
where
    B: GraphBatch,
    M: FnMut(&[ArrayD<f32>]) -> f64,
{
    check_batches(graph, calibration, eval, "auto_mixed_precision")?;
    search(
        &graph_subject(graph),
        qconfig,
        calibration,
        eval,
        &mut metric,
        options,
    )
}

/// The graph's [`Subject`]: its [`quantizable_nodes`].
fn graph_subject(graph: &Graph) -> Subject<'_> {
    Subject {
        graph,
        candidates: graph
            .nodes()
            .iter()
            .filter(|n| role(graph, n) == Role::Requantizes)
            .map(|n| (n.name.clone(), n.op.type_name()))
            .collect(),
        no_candidates: "the graph has no node with an int8 version that computes new values (conv, linear, add, ...)",
    }
}

/// The data checks of the metric tools: some calibration and evaluation batches, each
/// with one tensor per graph input.
fn check_batches<B: GraphBatch>(
    graph: &Graph,
    calibration: &[B],
    eval: &[B],
    tool: &str,
) -> Result<()> {
    check_data(calibration, eval)?;
    for b in calibration.iter().chain(eval) {
        batch_inputs(graph, b, tool)?;
    }
    Ok(())
}

/// An equalizable chain `a -> between.. -> b` of a graph.
struct GraphPair {
    a: NodeId,
    b: NodeId,
    block: usize,
    between: Vec<NodeId>,
}

/// Finds every chain `weighted -> (ReLU, Identity, Dropout, pools, Flatten(1)) ->
/// weighted` whose nodes each have one reader and are not graph outputs; explains each
/// weighted node whose chain stops at something else (`(first, where it stopped, why)`).
fn find_graph_pairs(graph: &Graph, skipped: &mut Vec<(String, String, String)>) -> Vec<GraphPair> {
    let mut pairs = Vec::new();
    for n in graph.nodes() {
        let Some(wa) = Weighted::of_op(&n.op) else {
            continue;
        };
        let mut cur = n.id;
        let mut between = Vec::new();
        let mut flatten = false;
        loop {
            let readers = graph.consumers(cur);
            let here = &graph.node(cur).name;
            if graph.is_output(cur) || readers.is_empty() {
                break;
            }
            if readers.len() > 1 {
                skipped.push((
                    n.name.clone(),
                    here.clone(),
                    format!(
                        "{here} has {} readers: scaling its channels would change what the other branches see",
                        readers.len()
                    ),
                ));
                break;
            }
            let r = graph.node(readers[0]);
            if r.inputs.len() != 1 {
                skipped.push((
                    n.name.clone(),
                    r.name.clone(),
                    format!(
                        "{} {} has {} inputs: per-channel scales cannot cross it",
                        r.op.type_name(),
                        r.name,
                        r.inputs.len()
                    ),
                ));
                break;
            }
            if let Some(wb) = Weighted::of_op(&r.op) {
                match pair_block(wa, wb, flatten) {
                    Ok(block) => pairs.push(GraphPair {
                        a: n.id,
                        b: r.id,
                        block,
                        between,
                    }),
                    Err(why) => skipped.push((n.name.clone(), r.name.clone(), why)),
                }
                break;
            }
            let rank = graph.node(cur).shape.rank() as isize;
            let passes = match &r.op {
                Op::ReLU
                | Op::Identity
                | Op::Dropout
                | Op::QuantStub
                | Op::DeQuantStub
                | Op::MaxPool2d(_)
                | Op::AvgPool2d(_)
                | Op::AdaptiveAvgPool2d(_) => {
                    !flatten || matches!(r.op, Op::ReLU | Op::Identity | Op::Dropout)
                }
                Op::Flatten { start_dim, end_dim } => {
                    let to_end = *end_dim == -1 || *end_dim == rank - 1;
                    if *start_dim == 1 && to_end {
                        flatten = true;
                        true
                    } else {
                        false
                    }
                }
                _ => false,
            };
            if !passes {
                let what = match r.op {
                    Op::Clamp { .. } => format!(
                        "{} {} clips at a fixed bound, which does not commute with per-channel scaling (torchvision's quantizable models replace ReLU6 by ReLU)",
                        r.op.type_name(),
                        r.name
                    ),
                    _ => format!(
                        "{} {} between them does not commute with per-channel scaling",
                        r.op.type_name(),
                        r.name
                    ),
                };
                skipped.push((n.name.clone(), r.name.clone(), what));
                break;
            }
            between.push(r.id);
            cur = r.id;
        }
    }
    pairs
}

/// Cross-layer equalization on a graph (Nagel et al. 2019), with the arithmetic of
/// [`analysis::equalize`](super::equalize): for every chain `W1 -> (ReLU, max/avg
/// pooling, Dropout, Identity, Flatten(1)) -> W2` (convolutions or linear layers, fused
/// ReLU variants included) anywhere in the graph, output channel `i` of `W1` is divided by
/// `s_i = sqrt(r1_i * r2_i) / r2_i` and input channel `i` of `W2` multiplied by it; chains
/// are swept up to `max_sweeps` times. The float function is unchanged up to rounding.
///
/// Chains are found inside residual branches (a basic block's `conv1 -> conv2`, an
/// inverted residual's expand -> depthwise -> project) but never cross a node with
/// several readers or several inputs (the skip connection's fan-out, add, concat, mul):
/// those, and any op between that does not commute with positive per-channel scales
/// (ReLU6 / clamps, Hardswish, batch norms not fused yet), are listed in
/// [`EqualizationReport::skipped`] as `(first, node where the chain stopped, why)`. Fuse
/// batch norms first ([`crate::graph::fuse`]).
///
/// # Errors
/// [`QuantError::UnsupportedConfig`] if `max_sweeps` is 0.
///
/// # Examples
/// See the [module](self) example.
pub fn equalize(graph: &Graph, max_sweeps: usize) -> Result<(Graph, EqualizationReport)> {
    if max_sweeps == 0 {
        return Err(QuantError::UnsupportedConfig {
            context: "equalize".into(),
            reason: "max_sweeps must be at least 1".into(),
        });
    }
    let mut out = graph.clone();
    let mut report = EqualizationReport::default();
    let pairs: Vec<(usize, usize, usize)> = find_graph_pairs(&out, &mut report.skipped)
        .into_iter()
        .map(|p| (p.a.index(), p.b.index(), p.block))
        .collect();
    equalize_pairs(&mut out, &pairs, max_sweeps, &mut report);
    Ok((out, report))
}

/// Empirical bias correction on a graph, as
/// [`analysis::correct_bias`](super::correct_bias) does it: for every convolution /
/// linear node that `map` quantizes (and that has an int8 version), the mean shift
/// `E[(W_q - W) x]` of its output channels over the batches, with `x` the float graph's
/// own input to the node, is subtracted from its bias (a missing bias is created). Every
/// such node is corrected, residual branches included. Apply it last before `prepare`,
/// with the map `prepare` will get.
///
/// # Errors
/// [`QuantError::EmptyCalibration`] for no batches; [`QuantError::ShapeMismatch`] for a
/// batch without one tensor per graph input; the graph's forward errors and the weight
/// specs' errors, named with the node.
///
/// # Examples
/// See the [module](self) example.
pub fn correct_bias<I>(
    graph: &Graph,
    map: &QConfigMap,
    batches: I,
) -> Result<(Graph, Vec<BiasCorrection>)>
where
    I: IntoIterator,
    I::Item: GraphBatch,
{
    let mut out = graph.clone();
    // The corrected nodes: id, delta layer, per-channel sums, values per channel.
    let mut deltas: Vec<(NodeId, DeltaLayer, Vec<f64>, f64)> = Vec::new();
    let mut by_input: HashMap<NodeId, Vec<usize>> = HashMap::new();
    for n in graph.nodes() {
        let Some(w) = Weighted::of_op(&n.op) else {
            continue;
        };
        if role(graph, n) != Role::Requantizes {
            continue;
        }
        let Some(qc) = map.qconfig_for(&n.name, n.op.type_name()) else {
            continue;
        };
        let d = w.weight_error(&qc, &n.name)?;
        let c = d.out_channels();
        by_input.entry(n.inputs[0]).or_default().push(deltas.len());
        deltas.push((n.id, d, vec![0.0; c], 0.0));
    }
    let mut any = false;
    for batch in batches {
        any = true;
        let x = batch_inputs(graph, &batch, "correct_bias")?;
        graph.forward_with(x, &mut |node, y| {
            for &k in by_input.get(&node.id).map_or(&[][..], |v| v.as_slice()) {
                let (id, d, sums, count) = &mut deltas[k];
                let name = &graph.node(*id).name;
                *count += d.accumulate(y, sums).map_err(|e| e.in_context(name))? as f64;
            }
            Ok(())
        })?;
    }
    if !any {
        return Err(QuantError::EmptyCalibration {
            reason: "correct_bias needs at least one batch".into(),
        });
    }
    let mut report = Vec::new();
    for (id, _, sums, count) in deltas {
        if count == 0.0 {
            continue;
        }
        let shift: Vec<f32> = sums.iter().map(|s| (s / count) as f32).collect();
        let Some(mut w) = weighted_mut(&mut out, id.index()) else {
            continue;
        };
        for (b, s) in w.bias_or_zeros().iter_mut().zip(&shift) {
            *b -= s;
        }
        report.push(BiasCorrection {
            path: graph.node(id).name.clone(),
            shift,
        });
    }
    Ok((out, report))
}

/// High-bias absorption on a graph, as
/// [`analysis::absorb_high_bias`](super::absorb_high_bias) does it, on the chains
/// [`equalize`] finds where the first layer's output goes through a ReLU (fused or the
/// first node after it), everything between lets a constant per-channel shift through
/// (ReLU, Identity, Dropout, max pooling, unpadded average pooling, adaptive average
/// pooling, Flatten) and the second layer is linear or an unpadded convolution: the
/// smallest value `c_i >= 0` of each channel over the batches moves from the first
/// layer's bias into the second's (`W2 c`). The function is unchanged on every input whose
/// pre-activations stay above `c` (all of the batches).
///
/// # Errors
/// [`QuantError::EmptyCalibration`] for no batches; [`QuantError::ShapeMismatch`] for a
/// batch without one tensor per graph input; the graph's forward errors.
///
/// # Examples
/// ```
/// use ndarray::{array, ArrayD, IxDyn};
/// use ptq::graph::{Dim, GraphBuilder, Op};
/// use ptq::nn::Linear;
/// let fc1 = Linear::new(array![[1.0f32, 0.0], [0.0, 1.0]], Some(array![10.0f32, 0.0]))?;
/// let fc2 = Linear::new(array![[1.0f32, 1.0]], Some(array![0.0f32]))?;
/// let mut b = GraphBuilder::new();
/// let x = b.input("x", &[Dim::Batch, 2.into()])?;
/// let y = b.node("fc1", Op::LinearReLU(fc1), &[x])?;
/// let y = b.linear("fc2", y, fc2)?;
/// b.output(y)?;
/// let g = b.build()?;
/// let data = vec![ArrayD::from_shape_fn(IxDyn(&[8, 2]), |i| i[0] as f32 * 0.1)];
/// let (absorbed, report) = ptq::analysis::graph::absorb_high_bias(&g, &data)?;
/// assert_eq!(report[0].absorbed[0], 10.0); // channel 0 never drops below 10
/// let (a, b) = (g.forward(&data)?, absorbed.forward(&data)?);
/// assert!(a[0].iter().zip(b[0].iter()).all(|(u, v)| (u - v).abs() < 1e-5));
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn absorb_high_bias<I>(graph: &Graph, batches: I) -> Result<(Graph, Vec<AbsorbedBias>)>
where
    I: IntoIterator,
    I::Item: GraphBatch,
{
    let mut out = graph.clone();
    let mut skipped = Vec::new();
    let pairs: Vec<GraphPair> = find_graph_pairs(graph, &mut skipped)
        .into_iter()
        .filter(|p| {
            let relu = matches!(graph.node(p.a).op, Op::ConvReLU2d(_) | Op::LinearReLU(_))
                || p.between
                    .first()
                    .is_some_and(|&r| matches!(graph.node(r).op, Op::ReLU));
            let between = p.between.iter().all(|&r| match &graph.node(r).op {
                Op::AvgPool2d(s) => s.padding == (0, 0, 0, 0),
                Op::MaxPool2d(_)
                | Op::ReLU
                | Op::Identity
                | Op::Dropout
                | Op::QuantStub
                | Op::DeQuantStub
                | Op::AdaptiveAvgPool2d(_)
                | Op::Flatten { .. } => true,
                _ => false,
            });
            let second = match &graph.node(p.b).op {
                Op::Conv2d(c) | Op::ConvReLU2d(c) => {
                    c.padding == (0, 0) && c.padding_end.is_none_or(|e| e == (0, 0))
                }
                _ => true,
            };
            relu && between && second
        })
        .collect();
    let mut mins: HashMap<NodeId, Vec<f32>> = pairs
        .iter()
        .map(|p| {
            let c = weighted(graph, p.a.index()).map_or(0, |(_, w)| w.out_channels());
            (p.a, vec![f32::INFINITY; c])
        })
        .collect();
    let mut any = false;
    for batch in batches {
        any = true;
        let x = batch_inputs(graph, &batch, "absorb_high_bias")?;
        graph.forward_with(x, &mut |node, y| {
            if let Some(m) = mins.get_mut(&node.id) {
                let axis = if y.ndim() == 4 {
                    1
                } else {
                    y.ndim().saturating_sub(1)
                };
                for (c, lane) in y.axis_iter(Axis(axis)).enumerate() {
                    if let Some(mc) = m.get_mut(c) {
                        *mc = lane.iter().copied().fold(*mc, f32::min);
                    }
                }
            }
            Ok(())
        })?;
    }
    if !any {
        return Err(QuantError::EmptyCalibration {
            reason: "absorb_high_bias needs at least one batch".into(),
        });
    }
    let mut report = Vec::new();
    for p in &pairs {
        let c: Vec<f32> = mins[&p.a]
            .iter()
            .map(|&v| if v.is_finite() { v.max(0.0) } else { 0.0 })
            .collect();
        {
            let Some(mut w1) = weighted_mut(&mut out, p.a.index()) else {
                continue;
            };
            let Some(b1) = w1.bias() else {
                continue;
            };
            b1.iter_mut().zip(&c).for_each(|(v, ci)| *v -= ci);
        }
        if let Some(mut w2) = weighted_mut(&mut out, p.b.index()) {
            w2.absorb_input_shift(&c, p.block);
        }
        report.push(AbsorbedBias {
            first: graph.node(p.a).name.clone(),
            second: graph.node(p.b).name.clone(),
            absorbed: c,
        });
    }
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::sensitivity::set_exact;
    use crate::graph::Dim;
    use crate::nn::{Layer, Linear, Sequential};

    #[test]
    fn a_prefix_name_keeps_exactly_that_node_in_float() {
        // A Sequential residual lowers to its body "block.fc" and an add named "block".
        let fc = Linear::new(ndarray::Array2::eye(3), None).unwrap();
        let seq = Sequential::new()
            .push("quant", Layer::QuantStub)
            .push(
                "block",
                Layer::Residual(Sequential::new().push("fc", Layer::Linear(fc))),
            )
            .push("dequant", Layer::DeQuantStub);
        let g = Graph::from_sequential(&seq, &[Dim::Batch, 3.into()]).unwrap();
        assert_eq!(quantizable_nodes(&g), ["block.fc", "block"]);
        let g = graph_subject(&g);
        let qc = QConfig::minmax_per_tensor();
        let block = ["block".to_string()];
        let but = set_exact(&g, QConfigMap::new(qc), &block, None, Some(qc));
        assert_eq!(but.qconfig_for("block", "Add"), None);
        assert_eq!(but.qconfig_for("block.fc", "Linear"), Some(qc));
        let only = set_exact(&g, QConfigMap::empty(), &block, Some(qc), None);
        assert_eq!(only.qconfig_for("block", "Add"), Some(qc));
        assert_eq!(only.qconfig_for("block.fc", "Linear"), None);
        // both in the set: both follow it
        let both = ["block".to_string(), "block.fc".to_string()];
        let m = set_exact(&g, QConfigMap::new(qc), &both, None, Some(qc));
        assert_eq!(m.qconfig_for("block.fc", "Linear"), None);
    }
}
