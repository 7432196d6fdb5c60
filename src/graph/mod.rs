//! Models as graphs: a DAG of named nodes from a closed op set ([`Op`]), with statically
//! inferred shapes, built by a [`GraphBuilder`] that reads like a PyTorch `forward`.
//!
//! * Every node has a stable [`NodeId`], a name (PyTorch's module path, e.g.
//!   `"layer1.0.conv1"`; its parameters are `name + ".weight"` as in a `state_dict`), an
//!   [`Op`], its input ids and its output [`Shape`]. Dimension 0 may be the dynamic batch
//!   ([`Dim::Batch`]); every other dimension is fixed.
//! * Nodes are stored in topological order: a node can only reference nodes added before
//!   it, so cycles are impossible by construction and a forward pass is one loop.
//! * Several inputs and outputs are allowed.
//! * [`Graph::forward`] runs the float model; [`Graph::forward_with`] taps every node's
//!   output (calibration, SQNR); [`Graph::visit`] is the one traversal the rest of the crate
//!   uses.
//!
//! Fused forms (`ConvReLU2d`, `LinearReLU`, `AddReLU`) are separate [`Op`] variants made by
//! [`fuse`]; a batch norm folded into a convolution disappears into its weights.
//!
//! # Notes on the shared interface (issue 10)
//! Where this module differs from the agreed sketch, on purpose:
//! * [`Graph::from_sequential`] takes the input shape (shapes are static).
//! * Fused forms are the variants [`Op::ConvReLU2d`], [`Op::LinearReLU`], [`Op::AddReLU`]
//!   (mirroring `torch.ao.nn.intrinsic` and `FloatFunctional.add_relu`); conv + bn and
//!   linear + bn1d fold into plain [`Op::Conv2d`] / [`Op::Linear`]. [`fuse`] returns a new
//!   graph in which the group's later nodes are gone (ids are renumbered; names are kept).
//! * Asymmetric convolution padding is `nn::Conv2d::padding_end` (see
//!   [`Conv2d::with_padding_tlbr`](crate::nn::Conv2d::with_padding_tlbr)); int8
//!   convolution kernels that only read `padding` must refuse `padding_end.is_some()`.
//! * Beyond the sketch: [`Op::Mean`], [`Op::Permute`], [`Op::Slice`] (ShuffleNet's
//!   `chunk` and channel shuffle, ONNX `ReduceMean` / `Transpose` / `Slice`), and
//!   [`Op::Dropout`] separate from [`Op::Identity`]. [`Op::Upsample`] takes an
//!   [`UpsampleSpec`] (size or scale factor; nearest with PyTorch's `nearest`,
//!   `nearest-exact` or ONNX's default index rule; bilinear with `align_corners`).
//! * [`OpKind`] names each variant without parameters (for `QConfigMap::set_type`).
//! * Weights load with [`Graph::load_state_dict`] /
//!   [`io::load_safetensors_graph`](crate::io::load_safetensors_graph), strict by name.
//! * [`zoo`] builds torchvision's quantizable ResNet-18, MobileNetV2, MobileNetV3-Large
//!   and ShuffleNetV2 with PyTorch's module names.
//!
//! # Examples
//! ```
//! use ndarray::{Array1, Array4, ArrayD, IxDyn};
//! use ptq::graph::{Dim, GraphBuilder};
//! use ptq::nn::{BatchNorm2d, Conv2d};
//!
//! let mut g = GraphBuilder::new();
//! let x = g.input("x", &[Dim::Batch, 3.into(), 8.into(), 8.into()])?;
//! let y = g.conv2d("conv1", x, Conv2d::new(Array4::ones((4, 3, 3, 3)), None)?.with_padding(1, 1))?;
//! let y = g.batch_norm2d("bn1", y, BatchNorm2d::identity(4))?;
//! let y = g.relu("relu", y)?;
//! let skip = g.conv2d("downsample.0", x, Conv2d::new(Array4::ones((4, 3, 1, 1)), None)?)?;
//! let z = g.add("add", y, skip)?;
//! g.output(z)?;
//! let graph = g.build()?;
//! assert_eq!(graph.node(z).shape.to_string(), "[N, 4, 8, 8]");
//! let out = graph.forward(&[ArrayD::from_elem(IxDyn(&[2, 3, 8, 8]), 1.0)])?;
//! assert_eq!(out[0].shape(), &[2, 4, 8, 8]);
//! // 27 from the 3x3x3 ones kernel (through BN with eps), 3 from the 1x1 skip
//! assert!((out[0][[0, 0, 4, 4]] - 30.0).abs() < 1e-3);
//! # Ok::<(), ptq::QuantError>(())
//! ```

mod builder;
mod exec;
pub(crate) use exec::eval_op;
mod fuse;
mod load;
mod lower;
mod op;
pub mod ops;
mod shape;
pub mod zoo;

use std::fmt;

pub use builder::GraphBuilder;
pub use fuse::{find_fusable, fold_linear_batch_norm, fuse, unfused_batch_norms};
pub use op::{
    BatchNorm, LayerNorm, NearestRule, Op, OpKind, Pool2dSpec, UpsampleMode, UpsampleSpec,
};

use crate::error::{QuantError, Result};

/// Index of a node in its [`Graph`]; ids grow in topological order.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) u32);

impl NodeId {
    /// Position of the node in [`Graph::nodes`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// One dimension of a static shape.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    /// The dynamic batch dimension (only ever dimension 0).
    Batch,
    /// A fixed size.
    Fixed(usize),
}

impl From<usize> for Dim {
    fn from(n: usize) -> Self {
        Dim::Fixed(n)
    }
}

impl Dim {
    /// The fixed size, `None` for the batch.
    pub fn fixed(self) -> Option<usize> {
        match self {
            Dim::Fixed(n) => Some(n),
            Dim::Batch => None,
        }
    }
    /// Whether a concrete size fits (the batch fits any size).
    pub fn admits(self, n: usize) -> bool {
        match self {
            Dim::Fixed(m) => m == n,
            Dim::Batch => true,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Batch => f.write_str("N"),
            Dim::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// A statically inferred shape; `Dim::Batch` may only appear first.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// A shape with every dimension fixed.
    pub fn fixed(dims: &[usize]) -> Self {
        Shape(dims.iter().map(|&d| Dim::Fixed(d)).collect())
    }
    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    /// The dimensions.
    pub fn dims(&self) -> &[Dim] {
        &self.0
    }
    /// Whether dimension 0 is the dynamic batch.
    pub fn has_batch(&self) -> bool {
        self.0.first() == Some(&Dim::Batch)
    }
    /// The concrete shape for a given batch size.
    pub fn to_concrete(&self, batch: usize) -> Vec<usize> {
        self.0
            .iter()
            .map(|d| match d {
                Dim::Batch => batch,
                Dim::Fixed(n) => *n,
            })
            .collect()
    }
    /// Whether a concrete shape fits this one (same rank, fixed dims equal).
    pub fn admits(&self, shape: &[usize]) -> bool {
        self.0.len() == shape.len() && self.0.iter().zip(shape).all(|(d, &n)| d.admits(n))
    }
    /// Elements per batch item when the batch is dynamic, or in total when all fixed.
    pub fn fixed_numel(&self) -> usize {
        self.0.iter().filter_map(|d| d.fixed()).product()
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// A node: one op applied to earlier nodes' outputs.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its id (its index in [`Graph::nodes`]).
    pub id: NodeId,
    /// PyTorch module path (unique in the graph); parameters are `name + ".weight"` etc.
    pub name: String,
    /// The operation and its parameters.
    pub op: Op,
    /// Input node ids, all smaller than `id`.
    pub inputs: Vec<NodeId>,
    /// Statically inferred output shape.
    pub shape: Shape,
}

/// A traversal of a graph in topological order ([`Graph::visit`]): the one walk that
/// preparation, conversion, saving and analysis share.
pub trait Visitor {
    /// Called for every node, inputs first.
    ///
    /// # Errors
    /// Whatever the visitor reports; the traversal stops at the first error.
    fn node(&mut self, graph: &Graph, node: &Node) -> Result<()>;
    /// Called once after the last node.
    ///
    /// # Errors
    /// Whatever the visitor reports.
    fn finish(&mut self, _graph: &Graph) -> Result<()> {
        Ok(())
    }
}

impl<F: FnMut(&Graph, &Node) -> Result<()>> Visitor for F {
    fn node(&mut self, graph: &Graph, node: &Node) -> Result<()> {
        self(graph, node)
    }
}

/// A float model as a DAG of [`Node`]s in topological order, with its input and output
/// nodes. Built by [`GraphBuilder`] (or [`Graph::from_sequential`]).
#[derive(Debug, Clone)]
pub struct Graph {
    nodes: Vec<Node>,
    inputs: Vec<NodeId>,
    outputs: Vec<NodeId>,
}

impl Graph {
    /// All nodes in topological order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
    /// The node with this id.
    ///
    /// # Panics
    /// If `id` comes from another graph and is out of range.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }
    /// The node with this id, or `None` when out of range.
    pub fn get(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id.index())
    }
    /// The id of the node named `name`.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.nodes.iter().find(|n| n.name == name).map(|n| n.id)
    }
    /// The graph's input nodes, in the order [`Graph::forward`] takes them.
    pub fn inputs(&self) -> &[NodeId] {
        &self.inputs
    }
    /// The graph's outputs, in the order [`Graph::forward`] returns them.
    pub fn outputs(&self) -> &[NodeId] {
        &self.outputs
    }
    /// Nodes that read `id`'s output, in order (a node reading it twice appears twice).
    pub fn consumers(&self, id: NodeId) -> Vec<NodeId> {
        let mut out = Vec::new();
        for n in &self.nodes[id.index() + 1..] {
            for &i in &n.inputs {
                if i == id {
                    out.push(n.id);
                }
            }
        }
        out
    }
    /// Whether `id` is one of the graph's outputs.
    pub fn is_output(&self, id: NodeId) -> bool {
        self.outputs.contains(&id)
    }

    /// Runs `visitor` over every node in topological order, then its `finish`.
    ///
    /// # Errors
    /// The visitor's first error.
    pub fn visit(&self, visitor: &mut impl Visitor) -> Result<()> {
        for n in &self.nodes {
            visitor.node(self, n)?;
        }
        visitor.finish(self)
    }

    /// Every parameter (`state_dict` key) with its shape, in node order.
    pub fn state_dict_keys(&self) -> Vec<(String, Vec<usize>)> {
        self.nodes
            .iter()
            .flat_map(|n| {
                n.op.params()
                    .into_iter()
                    .map(move |(s, a)| (format!("{}.{s}", n.name), a.shape().to_vec()))
            })
            .collect()
    }

    /// Every parameter under its `state_dict` key.
    pub fn state_dict(&self) -> Vec<(String, ndarray::ArrayD<f32>)> {
        self.nodes
            .iter()
            .flat_map(|n| {
                n.op.params()
                    .into_iter()
                    .map(move |(s, a)| (format!("{}.{s}", n.name), a))
            })
            .collect()
    }

    /// Mutable access to the nodes' ops (for weight loading); shapes must not change.
    pub(crate) fn nodes_mut(&mut self) -> &mut [Node] {
        &mut self.nodes
    }

    /// Assembles a graph from parts, checking the invariants (ids equal positions, inputs
    /// earlier than their node, unique names, inputs/outputs in range, input nodes are
    /// [`Op::Input`]).
    pub(crate) fn from_parts(
        nodes: Vec<Node>,
        inputs: Vec<NodeId>,
        outputs: Vec<NodeId>,
    ) -> Result<Self> {
        let bad = |reason: String| QuantError::UnsupportedConfig {
            context: "graph".into(),
            reason,
        };
        let mut names = std::collections::HashSet::new();
        for (i, n) in nodes.iter().enumerate() {
            if n.id.index() != i {
                return Err(bad(format!(
                    "node {:?} has id {} at position {i}",
                    n.name, n.id
                )));
            }
            if let Some(j) = n.inputs.iter().find(|j| j.index() >= i) {
                return Err(bad(format!(
                    "node {:?} reads {j}, which is not an earlier node",
                    n.name
                )));
            }
            if !names.insert(n.name.as_str()) {
                return Err(bad(format!("duplicate node name {:?}", n.name)));
            }
        }
        for id in &inputs {
            match nodes.get(id.index()) {
                Some(n) if matches!(n.op, Op::Input) => {}
                _ => return Err(bad(format!("graph input {id} is not an input node"))),
            }
        }
        if outputs.is_empty() {
            return Err(bad(
                "the graph has no outputs; call GraphBuilder::output".into()
            ));
        }
        if let Some(id) = outputs.iter().find(|o| o.index() >= nodes.len()) {
            return Err(bad(format!("graph output {id} does not exist")));
        }
        Ok(Graph {
            nodes,
            inputs,
            outputs,
        })
    }
}

impl fmt::Display for Graph {
    /// One line per node: `%id name = Kind(inputs) -> shape`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for n in &self.nodes {
            let ins: Vec<String> = n.inputs.iter().map(|i| i.to_string()).collect();
            writeln!(
                f,
                "{} {} = {}({}) -> {}",
                n.id,
                n.name,
                n.op.type_name(),
                ins.join(", "),
                n.shape
            )?;
        }
        let outs: Vec<String> = self.outputs.iter().map(|i| i.to_string()).collect();
        write!(f, "outputs: {}", outs.join(", "))
    }
}
