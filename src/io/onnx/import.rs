//! From a decoded [`OnnxModel`] to a [`Graph`]: constant folding (initializers, `Constant`,
//! `Identity`, and the `Shape`/`Gather`/`Unsqueeze`/`Concat`/`Cast`/`Slice` chains the
//! TorchScript exporter writes for `x.view(x.size(0), -1)`, with the dynamic batch carried
//! symbolically), batch-norm folding into a preceding convolution, `MatMul` + `Add` into a
//! linear layer, and static shapes from the graph builder.

use std::collections::{BTreeMap, HashMap};

use ndarray::{Array1, Array2, Array4};

use super::decode::{AttrValue, OnnxDim, OnnxModel, OnnxNode, OnnxTensor, TensorData};
use crate::error::{QuantError, Result};
use crate::graph::{
    Dim, Graph, GraphBuilder, NearestRule, NodeId, Op, Pool2dSpec, UpsampleMode, UpsampleSpec,
};
use crate::nn::{BatchNorm2d, Conv2d, Linear};

/// The result of [`OnnxModel::to_graph`]: the graph and where each ONNX tensor went.
#[derive(Debug, Clone)]
pub struct OnnxImport {
    /// The float graph.
    pub graph: Graph,
    /// Each ONNX value tensor (node outputs and graph inputs) by name, with the graph node
    /// that computes it (folded batch norms and aliases such as `Identity` / `Dropout` map to
    /// the node whose output they equal).
    pub tensor_nodes: BTreeMap<String, NodeId>,
    /// Each constant weight or bias tensor (an initializer, or a folded constant such as an
    /// `Identity` of one) of a `Conv`, `Gemm` or `MatMul` by name, with the graph node whose
    /// parameter it became.
    pub param_nodes: BTreeMap<String, NodeId>,
    /// How many ONNX nodes were folded into constants.
    pub folded_constants: usize,
    /// How many `BatchNormalization` nodes were folded into a preceding `Conv`.
    pub folded_batch_norms: usize,
}

/// ONNX operator types the importer maps (in the default domain).
pub const SUPPORTED_OPS: &[&str] = &[
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "Concat",
    "Relu",
    "Clip",
    "HardSwish",
    "HardSigmoid",
    "Sigmoid",
    "BatchNormalization",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Flatten",
    "Reshape",
    "Resize",
    "Softmax",
    "Identity",
    "Dropout",
    "Constant",
    "Transpose",
    "Gelu",
    // folded when their inputs are constant (shape arithmetic)
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Cast",
    "Slice",
    "Sub",
    "Div",
];

/// `Slice`'s starts, ends, axes and steps.
type SliceArgs = (Vec<i64>, Vec<i64>, Vec<usize>, Vec<i64>);

/// A constant integer: `None` stands for the dynamic batch size.
type SymInt = Option<i64>;

#[derive(Debug, Clone)]
enum Konst {
    F { dims: Vec<usize>, v: Vec<f32> },
    I { dims: Vec<usize>, v: Vec<SymInt> },
}

impl Konst {
    fn from_tensor(t: &OnnxTensor) -> Self {
        match &t.data {
            TensorData::Float(v) => Konst::F {
                dims: t.dims.clone(),
                v: v.clone(),
            },
            TensorData::Int(v) => Konst::I {
                dims: t.dims.clone(),
                v: v.iter().map(|&x| Some(x)).collect(),
            },
        }
    }
    fn dims(&self) -> &[usize] {
        match self {
            Konst::F { dims, .. } | Konst::I { dims, .. } => dims,
        }
    }
    fn len(&self) -> usize {
        match self {
            Konst::F { v, .. } => v.len(),
            Konst::I { v, .. } => v.len(),
        }
    }
    fn with_dims(self, d: Vec<usize>) -> Self {
        match self {
            Konst::F { v, .. } => Konst::F { dims: d, v },
            Konst::I { v, .. } => Konst::I { dims: d, v },
        }
    }
    fn floats(&self, ctx: &str) -> Result<Vec<f32>> {
        match self {
            Konst::F { v, .. } => Ok(v.clone()),
            Konst::I { v, .. } => v
                .iter()
                .map(|x| {
                    x.map(|x| x as f32)
                        .ok_or_else(|| unsupported(ctx, "a value that depends on the batch size"))
                })
                .collect(),
        }
    }
    fn ints(&self, ctx: &str) -> Result<Vec<SymInt>> {
        match self {
            Konst::I { v, .. } => Ok(v.clone()),
            Konst::F { .. } => Err(unsupported(ctx, "expected an integer tensor")),
        }
    }
    fn known_ints(&self, ctx: &str) -> Result<Vec<i64>> {
        self.ints(ctx)?
            .into_iter()
            .map(|x| x.ok_or_else(|| unsupported(ctx, "a value that depends on the batch size")))
            .collect()
    }
}

#[derive(Debug, Clone)]
enum Val {
    Node(NodeId),
    Const(Konst),
}

fn unsupported(ctx: &str, reason: impl Into<String>) -> QuantError {
    QuantError::UnsupportedConfig {
        context: ctx.to_string(),
        reason: reason.into(),
    }
}

fn shape_err(ctx: &str, expected: impl Into<String>, actual: impl Into<String>) -> QuantError {
    QuantError::ShapeMismatch {
        context: ctx.to_string(),
        expected: expected.into(),
        actual: actual.into(),
    }
}

fn attr_i(n: &OnnxNode, k: &str, default: i64) -> i64 {
    match n.attrs.get(k) {
        Some(AttrValue::Int(i)) => *i,
        _ => default,
    }
}
fn attr_f(n: &OnnxNode, k: &str, default: f32) -> f32 {
    match n.attrs.get(k) {
        Some(AttrValue::Float(f)) => *f,
        _ => default,
    }
}
fn attr_ints(n: &OnnxNode, k: &str) -> Option<Vec<i64>> {
    match n.attrs.get(k) {
        Some(AttrValue::Ints(v)) => Some(v.clone()),
        _ => None,
    }
}
fn attr_s(n: &OnnxNode, k: &str, default: &str) -> String {
    match n.attrs.get(k) {
        Some(AttrValue::Str(s)) => s.clone(),
        _ => default.to_string(),
    }
}

fn usize_of(x: i64, ctx: &str, what: &str) -> Result<usize> {
    usize::try_from(x).map_err(|_| unsupported(ctx, format!("{what} {x} is negative")))
}

fn norm_axis(axis: i64, rank: usize, ctx: &str) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(unsupported(
            ctx,
            format!("axis {axis} out of range for rank {rank}"),
        ));
    }
    Ok(a as usize)
}

/// Module-path names for the ONNX nodes (see [`OnnxModel::to_graph`]).
fn scope_of(n: &OnnxNode) -> Option<Vec<String>> {
    if let Some(ns) = &n.namespace {
        // dynamo: ": pkg.Model/layer1: Sequential/layer1.0: BasicBlock/add_20: aten.add.Tensor"
        let parts: Vec<&str> = ns.split('/').collect();
        let mods: Vec<String> = parts[..parts.len().saturating_sub(1)]
            .iter()
            .filter_map(|p| p.split(':').next())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        return Some(match mods.last() {
            Some(last) => last.split('.').map(String::from).collect(),
            None => Vec::new(),
        });
    }
    if n.name.starts_with('/') {
        // TorchScript: "/layer1/layer1.0/conv1/Conv"; the last part is the op
        let comps: Vec<&str> = n.name[1..].split('/').collect();
        let mut segs: Vec<String> = Vec::new();
        let mut prev: Option<&str> = None;
        for c in &comps[..comps.len().saturating_sub(1)] {
            match prev {
                Some(p) if c.starts_with(&format!("{p}.")) => {
                    segs.pop();
                    segs.push(c.to_string());
                }
                _ => segs.push(c.to_string()),
            }
            prev = Some(c);
        }
        let path = segs.join(".");
        return Some(if path.is_empty() {
            Vec::new()
        } else {
            path.split('.').map(String::from).collect()
        });
    }
    None
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_matches('_')
        .to_string()
}

struct Namer {
    used: HashMap<String, usize>,
}

impl Namer {
    fn unique(&mut self, base: &str) -> String {
        let base = if base.is_empty() { "node" } else { base };
        let c = self.used.entry(base.to_string()).or_insert(0);
        *c += 1;
        if *c == 1 {
            base.to_string()
        } else {
            let mut k = *c - 1;
            loop {
                let cand = format!("{base}_{k}");
                if !self.used.contains_key(&cand) {
                    self.used.insert(cand.clone(), 1);
                    return cand;
                }
                k += 1;
            }
        }
    }
}

impl OnnxModel {
    /// Maps the model onto a [`Graph`].
    ///
    /// Node names follow PyTorch's module paths so that [`QConfigMap::set_name`] and the
    /// accuracy reports speak the user's language: a node with a weight initializer named
    /// `"layer1.0.conv1.weight"` becomes node `"layer1.0.conv1"`; otherwise the module path
    /// comes from the TorchScript exporter's scoped node name (`/layer1/layer1.0/conv1/Conv`)
    /// or the dynamo exporter's `namespace` metadata, with the lower-cased op type appended for
    /// functional ops inside a container (`"layer1.0.add"`); repeats get `_1`, `_2`.
    ///
    /// [`QConfigMap::set_name`]: crate::qconfig::QConfigMap::set_name
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] listing **every** unsupported op type with the names
    /// of its nodes; an attribute or input form the importer does not handle (naming the
    /// node); a non-batch dynamic input dimension; shape errors from the graph builder.
    pub fn to_graph(&self) -> Result<OnnxImport> {
        self.check_ops()?;
        Importer::new(self).run()
    }

    fn check_ops(&self) -> Result<()> {
        let mut bad: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let std_domain = n.domain.is_empty() || n.domain == "ai.onnx";
            if !std_domain || !SUPPORTED_OPS.contains(&n.op_type.as_str()) {
                let key = if std_domain {
                    n.op_type.clone()
                } else {
                    format!("{}::{}", n.domain, n.op_type)
                };
                let name = if n.name.is_empty() {
                    format!("#{i}")
                } else {
                    n.name.clone()
                };
                bad.entry(key).or_default().push(name);
            }
        }
        if bad.is_empty() {
            return Ok(());
        }
        let list = bad
            .iter()
            .map(|(op, names)| format!("{op} ({} node(s): {})", names.len(), names.join(", ")))
            .collect::<Vec<_>>()
            .join("; ");
        Err(QuantError::UnsupportedConfig {
            context: "ONNX model".into(),
            reason: format!(
                "unsupported operators: {list}. Supported: {}",
                SUPPORTED_OPS.join(", ")
            ),
        })
    }
}

struct Importer<'a> {
    m: &'a OnnxModel,
    g: GraphBuilder,
    vals: HashMap<String, Val>,
    consumers: HashMap<String, usize>,
    names: Vec<String>,
    tensor_nodes: BTreeMap<String, NodeId>,
    param_nodes: BTreeMap<String, NodeId>,
    folded: usize,
    folded_bn: usize,
    /// BN / Add nodes already absorbed into their producer, by node index
    absorbed: Vec<bool>,
}

impl<'a> Importer<'a> {
    fn new(m: &'a OnnxModel) -> Self {
        let mut consumers: HashMap<String, usize> = HashMap::new();
        for n in &m.nodes {
            for i in &n.inputs {
                *consumers.entry(i.clone()).or_insert(0) += 1;
            }
        }
        for o in &m.outputs {
            *consumers.entry(o.name.clone()).or_insert(0) += 1;
        }
        let names = Self::node_names(m);
        Importer {
            m,
            g: GraphBuilder::new(),
            vals: HashMap::new(),
            consumers,
            names,
            tensor_nodes: BTreeMap::new(),
            param_nodes: BTreeMap::new(),
            folded: 0,
            folded_bn: 0,
            absorbed: vec![false; m.nodes.len()],
        }
    }

    fn node_names(m: &OnnxModel) -> Vec<String> {
        let scopes: Vec<Option<Vec<String>>> = m.nodes.iter().map(scope_of).collect();
        // a scope path is a container when some node's scope strictly extends it
        let mut containers = std::collections::HashSet::new();
        for s in scopes.iter().flatten() {
            for k in 0..s.len() {
                containers.insert(s[..k].join("."));
            }
        }
        let mut namer = Namer {
            used: HashMap::new(),
        };
        for i in &m.inputs {
            namer.unique(&sanitize(&i.name));
        }
        m.nodes
            .iter()
            .zip(&scopes)
            .map(|(n, scope)| {
                let op = n.op_type.to_ascii_lowercase();
                let weight = n.inputs.get(1).filter(|w| {
                    matches!(n.op_type.as_str(), "Conv" | "Gemm" | "MatMul")
                        && m.initializers.contains_key(*w)
                        && w.ends_with(".weight")
                        && !w.starts_with("onnx::")
                });
                let base = if let Some(w) = weight {
                    w.trim_end_matches(".weight").to_string()
                } else if let Some(s) = scope {
                    let path = s.join(".");
                    if path.is_empty() {
                        op
                    } else if containers.contains(&path) {
                        format!("{path}.{op}")
                    } else {
                        path
                    }
                } else if !n.name.is_empty() {
                    sanitize(&n.name)
                } else {
                    op
                };
                namer.unique(&sanitize(&base))
            })
            .collect()
    }

    fn run(mut self) -> Result<OnnxImport> {
        for (name, t) in &self.m.initializers {
            self.vals
                .insert(name.clone(), Val::Const(Konst::from_tensor(t)));
        }
        for inp in &self.m.inputs {
            let ctx = format!("ONNX input {:?}", inp.name);
            if inp.elem_type != 1 && inp.elem_type != 0 {
                return Err(unsupported(
                    &ctx,
                    format!(
                        "element type {} (only FLOAT inputs are supported)",
                        inp.elem_type
                    ),
                ));
            }
            let dims = inp
                .dims
                .as_ref()
                .ok_or_else(|| unsupported(&ctx, "the file gives no shape"))?;
            let mut gd = Vec::with_capacity(dims.len());
            for (k, d) in dims.iter().enumerate() {
                gd.push(match d {
                    OnnxDim::Fixed(n) => Dim::Fixed(*n),
                    OnnxDim::Dynamic(_) if k == 0 => Dim::Batch,
                    OnnxDim::Dynamic(p) => {
                        return Err(unsupported(
                            &ctx,
                            format!(
                                "dimension {k} is dynamic ({p:?}); only dimension 0 (the batch) \
                                 may be dynamic: export with a fixed size there"
                            ),
                        ))
                    }
                });
            }
            let id = self.g.input(&sanitize(&inp.name), &gd)?;
            self.vals.insert(inp.name.clone(), Val::Node(id));
            self.tensor_nodes.insert(inp.name.clone(), id);
        }
        for i in 0..self.m.nodes.len() {
            if self.absorbed[i] {
                continue;
            }
            let n = &self.m.nodes[i];
            let label = format!("ONNX node {:?} ({})", n.name, n.op_type);
            self.import_node(i).map_err(|e| match e {
                QuantError::UnsupportedConfig { context, reason } if context != label => {
                    QuantError::UnsupportedConfig {
                        context: label.clone(),
                        reason: if context.is_empty() {
                            reason
                        } else {
                            format!("{context}: {reason}")
                        },
                    }
                }
                e => e,
            })?;
        }
        for o in &self.m.outputs {
            match self.vals.get(&o.name) {
                Some(Val::Node(id)) => self.g.output(*id)?,
                Some(Val::Const(_)) => {
                    return Err(unsupported(
                        &format!("ONNX output {:?}", o.name),
                        "the output is a constant",
                    ))
                }
                None => {
                    return Err(QuantError::InvalidFile {
                        context: "ONNX model".into(),
                        reason: format!("graph output {:?} is never computed", o.name),
                    })
                }
            }
        }
        Ok(OnnxImport {
            graph: self.g.build()?,
            tensor_nodes: self.tensor_nodes,
            param_nodes: self.param_nodes,
            folded_constants: self.folded,
            folded_batch_norms: self.folded_bn,
        })
    }

    fn input(&self, n: &OnnxNode, k: usize) -> Result<Option<&Val>> {
        match n.inputs.get(k) {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => self
                .vals
                .get(s)
                .map(Some)
                .ok_or_else(|| QuantError::InvalidFile {
                    context: format!("ONNX node {:?}", n.name),
                    reason: format!(
                    "input {s:?} is not produced by an earlier node, an initializer or a graph \
                     input (nodes must be in topological order)"
                ),
                }),
        }
    }
    fn req(&self, n: &OnnxNode, k: usize) -> Result<&Val> {
        self.input(n, k)?.ok_or_else(|| QuantError::InvalidFile {
            context: format!("ONNX node {:?}", n.name),
            reason: format!("{} needs input {k}", n.op_type),
        })
    }
    fn konst(&self, n: &OnnxNode, k: usize, what: &str) -> Result<Option<Konst>> {
        match self.input(n, k)? {
            None => Ok(None),
            Some(Val::Const(c)) => Ok(Some(c.clone())),
            Some(Val::Node(_)) => Err(unsupported(
                "",
                format!("{what} (input {k}) must be a constant (an initializer or Constant)"),
            )),
        }
    }
    fn node_in(&self, n: &OnnxNode, k: usize) -> Result<Option<NodeId>> {
        Ok(match self.input(n, k)? {
            Some(Val::Node(id)) => Some(*id),
            _ => None,
        })
    }
    fn rank_of(&self, id: NodeId) -> Result<usize> {
        Ok(self.g.shape(id)?.0.len())
    }

    fn set_out(&mut self, n: &OnnxNode, v: Val) {
        if let Some(o) = n.outputs.first() {
            if let Val::Node(id) = v {
                self.tensor_nodes.insert(o.clone(), id);
            } else {
                self.folded += 1;
            }
            self.vals.insert(o.clone(), v);
        }
    }

    /// The single consumer of `tensor`, if exactly one node (and no graph output) reads it.
    fn sole_consumer(&self, from: usize, tensor: &str) -> Option<usize> {
        if self.consumers.get(tensor).copied() != Some(1) {
            return None;
        }
        self.m.nodes[from + 1..]
            .iter()
            .position(|n| n.inputs.iter().any(|i| i == tensor))
            .map(|p| p + from + 1)
    }

    fn add(&mut self, i: usize, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        let name = self.names[i].clone();
        let has_params = matches!(op, Op::Conv2d(_) | Op::Linear(_));
        let id = self.g.node(&name, op, inputs)?;
        if has_params {
            for t in self.m.nodes[i].inputs.iter().skip(1) {
                if matches!(self.vals.get(t), Some(Val::Const(_))) {
                    self.param_nodes.insert(t.clone(), id);
                }
            }
        }
        Ok(id)
    }

    fn import_node(&mut self, i: usize) -> Result<()> {
        let m = self.m;
        let n = &m.nodes[i];
        if n.outputs.first().is_none_or(|o| o.is_empty()) {
            return Err(QuantError::InvalidFile {
                context: format!("ONNX node {:?}", n.name),
                reason: format!("{} node without an output", n.op_type),
            });
        }
        let op = n.op_type.as_str();
        // constant folding of anything whose inputs are all constants
        let all_const = !n.inputs.is_empty()
            && n.inputs
                .iter()
                .all(|s| s.is_empty() || matches!(self.vals.get(s), Some(Val::Const(_))));
        if op == "Constant" {
            let k = constant_value(n)?;
            self.set_out(n, Val::Const(k));
            return Ok(());
        }
        if op == "Shape" {
            let x = self.req(n, 0)?.clone();
            let dims: Vec<SymInt> = match x {
                Val::Const(k) => k.dims().iter().map(|&d| Some(d as i64)).collect(),
                Val::Node(id) => self
                    .g
                    .shape(id)?
                    .0
                    .iter()
                    .map(|d| d.fixed().map(|x| x as i64))
                    .collect(),
            };
            let r = dims.len() as i64;
            let clampi = |v: i64| -> usize {
                let v = if v < 0 { v + r } else { v };
                v.clamp(0, r) as usize
            };
            let s = clampi(attr_i(n, "start", 0));
            let e = clampi(attr_i(n, "end", r));
            let v = if s < e {
                dims[s..e].to_vec()
            } else {
                Vec::new()
            };
            self.set_out(
                n,
                Val::Const(Konst::I {
                    dims: vec![v.len()],
                    v,
                }),
            );
            return Ok(());
        }
        if all_const && op != "Identity" && op != "Dropout" {
            if let Some(k) = self.fold(n)? {
                self.set_out(n, Val::Const(k));
                return Ok(());
            }
        }
        let x0 = self.node_in(n, 0)?;
        match op {
            "Identity" | "Dropout" => {
                let v = self.req(n, 0)?.clone();
                if let Val::Const(_) = v {
                    self.folded += 1;
                }
                if let (Val::Node(id), Some(o)) = (&v, n.outputs.first()) {
                    self.tensor_nodes.insert(o.clone(), *id);
                }
                if let Some(o) = n.outputs.first() {
                    self.vals.insert(o.clone(), v);
                }
            }
            "Conv" => {
                let x = x0.ok_or_else(|| unsupported("", "a constant convolution input"))?;
                let w = self
                    .konst(n, 1, "the weight")?
                    .ok_or_else(|| missing(n, 1))?;
                let b = self.konst(n, 2, "the bias")?;
                let mut conv = self.conv(n, x, &w, b.as_ref())?;
                let mut tensors = vec![n.outputs[0].clone()];
                // fold a following BatchNormalization that is the conv's only consumer
                if let Some(j) = self.sole_consumer(i, &n.outputs[0]) {
                    let bn = &m.nodes[j];
                    if bn.op_type == "BatchNormalization"
                        && bn.inputs.first() == Some(&n.outputs[0])
                    {
                        if let Ok(p) = self.bn_params(bn, conv.out_channels()) {
                            let (scale, shift) = p.scale_shift();
                            for (mut oc, s) in conv.weight.outer_iter_mut().zip(scale.iter()) {
                                oc.mapv_inplace(|v| v * s);
                            }
                            let b0 = conv
                                .bias
                                .take()
                                .unwrap_or_else(|| Array1::zeros(scale.len()));
                            conv.bias = Some(&b0 * &scale + &shift);
                            self.absorbed[j] = true;
                            self.folded_bn += 1;
                            tensors.push(bn.outputs[0].clone());
                        }
                    }
                }
                let id = self.add(i, Op::Conv2d(conv), &[x])?;
                for t in tensors {
                    self.tensor_nodes.insert(t.clone(), id);
                    self.vals.insert(t, Val::Node(id));
                }
            }
            "Gemm" => {
                let x = x0.ok_or_else(|| unsupported("", "a constant Gemm input A"))?;
                if attr_i(n, "transA", 0) != 0 {
                    return Err(unsupported("", "transA=1"));
                }
                let b = self
                    .konst(n, 1, "B")?
                    .ok_or_else(|| unsupported("", "Gemm without B"))?;
                let c = self.konst(n, 2, "C")?;
                let alpha = attr_f(n, "alpha", 1.0);
                let beta = attr_f(n, "beta", 1.0);
                let lin = linear_from(
                    &b,
                    attr_i(n, "transB", 0) != 0,
                    c.as_ref(),
                    alpha,
                    beta,
                    "Gemm",
                )?;
                let id = self.add(i, Op::Linear(lin), &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "MatMul" => {
                let x = x0.ok_or_else(|| unsupported("", "a constant MatMul input A"))?;
                let b = self
                    .konst(n, 1, "the weight B")?
                    .ok_or_else(|| missing(n, 1))?;
                let mut bias = None;
                let mut tensors = vec![n.outputs[0].clone()];
                if let Some(j) = self.sole_consumer(i, &n.outputs[0]) {
                    let a = &m.nodes[j];
                    if a.op_type == "Add" && a.outputs.first().is_some_and(|o| !o.is_empty()) {
                        let other = a.inputs.iter().find(|s| **s != n.outputs[0]);
                        if let Some(Val::Const(k)) = other.and_then(|s| self.vals.get(s)) {
                            let nout = b.dims().last().copied().unwrap_or(0);
                            if k.len() == nout && k.dims().iter().filter(|&&d| d != 1).count() <= 1
                            {
                                bias = Some(k.clone().with_dims(vec![nout]));
                                self.absorbed[j] = true;
                                tensors.push(a.outputs[0].clone());
                            }
                        }
                    }
                }
                let lin = linear_from(&b, false, bias.as_ref(), 1.0, 1.0, "MatMul")?;
                let id = self.add(i, Op::Linear(lin), &[x])?;
                for t in tensors {
                    self.tensor_nodes.insert(t.clone(), id);
                    self.vals.insert(t, Val::Node(id));
                }
            }
            "Add" | "Mul" => {
                let a = self.req(n, 0)?.clone();
                let b = self.req(n, 1)?.clone();
                match (a, b) {
                    (Val::Node(a), Val::Node(b)) => {
                        let o = if op == "Add" { Op::Add } else { Op::Mul };
                        let id = self.add(i, o, &[a, b])?;
                        self.set_out(n, Val::Node(id));
                    }
                    (Val::Node(a), Val::Const(k)) | (Val::Const(k), Val::Node(a)) => {
                        let neutral = if op == "Add" { 0.0 } else { 1.0 };
                        let v = k.floats("")?;
                        if v.iter().all(|&x| x == neutral) {
                            self.set_out(n, Val::Node(a));
                        } else {
                            return Err(unsupported(
                                "",
                                format!("{op} with a constant operand (dims {:?}) is not supported; only graph values", k.dims()),
                            ));
                        }
                    }
                    _ => return Err(unsupported("", format!("{op} of two constants"))),
                }
            }
            "Concat" => {
                let mut ids = Vec::new();
                for k in 0..n.inputs.len() {
                    match self.input(n, k)? {
                        Some(Val::Node(id)) => ids.push(*id),
                        Some(Val::Const(_)) => {
                            return Err(unsupported("", "Concat of a graph value with a constant"))
                        }
                        None => {}
                    }
                }
                let first = *ids.first().ok_or_else(|| missing(n, 0))?;
                let rank = self.rank_of(first)?;
                let axis = norm_axis(attr_i(n, "axis", 0), rank, "")?;
                let id = self.add(i, Op::Concat { axis }, &ids)?;
                self.set_out(n, Val::Node(id));
            }
            "Relu" | "Sigmoid" | "HardSwish" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                let o = match op {
                    "Relu" => Op::ReLU,
                    "Sigmoid" => Op::Sigmoid,
                    _ => Op::Hardswish,
                };
                let id = self.add(i, o, &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "HardSigmoid" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                let (alpha, beta) = (attr_f(n, "alpha", 0.2), attr_f(n, "beta", 0.5));
                if alpha != 1.0f32 / 6.0 || beta != 0.5 {
                    return Err(unsupported(
                        "",
                        format!(
                            "HardSigmoid alpha {alpha}, beta {beta}: only PyTorch's (1/6, 0.5)"
                        ),
                    ));
                }
                let id = self.add(i, Op::Hardsigmoid, &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "Gelu" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                let tanh = attr_s(n, "approximate", "none") == "tanh";
                let id = self.add(i, Op::Gelu { tanh }, &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "Clip" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                let scalar = |k: Option<Konst>, d: f32| -> Result<f32> {
                    match k {
                        None => Ok(d),
                        Some(k) if k.len() == 1 => Ok(k.floats("")?[0]),
                        Some(k) => Err(unsupported(
                            "",
                            format!("Clip bound with dims {:?} (a scalar is needed)", k.dims()),
                        )),
                    }
                };
                let lo = scalar(
                    self.konst(n, 1, "min")?,
                    attr_f(n, "min", f32::NEG_INFINITY),
                )?;
                let hi = scalar(self.konst(n, 2, "max")?, attr_f(n, "max", f32::INFINITY))?;
                let o = if lo == 0.0 && hi == f32::INFINITY {
                    Op::ReLU
                } else {
                    Op::Clamp { min: lo, max: hi }
                };
                let id = self.add(i, o, &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "BatchNormalization" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                let shape = self.g.shape(x)?.clone();
                let c =
                    shape.0.get(1).and_then(|d| d.fixed()).ok_or_else(|| {
                        unsupported("", "input without a fixed channel dimension")
                    })?;
                let bn = self.bn_params(n, c)?;
                let o = if shape.0.len() == 4 {
                    Op::BatchNorm2d(bn)
                } else {
                    Op::BatchNorm1d(bn)
                };
                let id = self.add(i, o, &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "MaxPool" | "AveragePool" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                if n.outputs.len() > 1 && n.outputs[1..].iter().any(|s| !s.is_empty()) {
                    return Err(unsupported("", "MaxPool's Indices output"));
                }
                if attr_i(n, "storage_order", 0) != 0 {
                    return Err(unsupported("", "storage_order=1"));
                }
                check_auto_pad(n)?;
                let k = attr_ints(n, "kernel_shape")
                    .ok_or_else(|| unsupported("", "no kernel_shape"))?;
                if k.len() != 2 {
                    return Err(unsupported("", format!("{}-D pooling (only 2-D)", k.len())));
                }
                let pair = |v: Option<Vec<i64>>, d: i64, what: &str| -> Result<(usize, usize)> {
                    let v = v.unwrap_or_else(|| vec![d, d]);
                    if v.len() != 2 {
                        return Err(unsupported("", format!("{what} {v:?}")));
                    }
                    Ok((usize_of(v[0], "", what)?, usize_of(v[1], "", what)?))
                };
                let (kh, kw) = pair(Some(k), 1, "kernel_shape")?;
                let stride = pair(attr_ints(n, "strides"), 1, "strides")?;
                let pads = attr_ints(n, "pads").unwrap_or_else(|| vec![0; 4]);
                if pads.len() != 4 {
                    return Err(unsupported("", format!("pads {pads:?}")));
                }
                let p: Vec<usize> = pads
                    .iter()
                    .map(|&p| usize_of(p, "", "pad"))
                    .collect::<Result<_>>()?;
                let mut spec = Pool2dSpec::new(kh, kw)
                    .with_stride(stride.0, stride.1)
                    .with_padding_tlbr(p[0], p[1], p[2], p[3])
                    .with_ceil_mode(attr_i(n, "ceil_mode", 0) != 0);
                let o = if op == "MaxPool" {
                    let d = pair(attr_ints(n, "dilations"), 1, "dilations")?;
                    spec = spec.with_dilation(d.0, d.1);
                    Op::MaxPool2d(spec)
                } else {
                    spec = spec.with_count_include_pad(attr_i(n, "count_include_pad", 0) != 0);
                    if let Some(d) = attr_ints(n, "dilations") {
                        if d.iter().any(|&x| x != 1) {
                            return Err(unsupported("", "dilated average pooling"));
                        }
                    }
                    Op::AvgPool2d(spec)
                };
                let id = self.add(i, o, &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "GlobalAveragePool" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                let id = self.add(i, Op::AdaptiveAvgPool2d((1, 1)), &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "ReduceMean" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                let rank = self.rank_of(x)?;
                let axes = match self.konst(n, 1, "axes")? {
                    Some(k) => k.known_ints("")?,
                    None => attr_ints(n, "axes").unwrap_or_else(|| (0..rank as i64).collect()),
                };
                let mut dims = axes
                    .iter()
                    .map(|&a| norm_axis(a, rank, ""))
                    .collect::<Result<Vec<_>>>()?;
                dims.sort_unstable();
                dims.dedup();
                let keepdim = attr_i(n, "keepdims", 1) != 0;
                let o = if rank == 4 && dims == [2, 3] && keepdim {
                    Op::AdaptiveAvgPool2d((1, 1))
                } else {
                    Op::Mean { dims, keepdim }
                };
                let id = self.add(i, o, &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "Flatten" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                let rank = self.rank_of(x)?;
                let axis = attr_i(n, "axis", 1);
                let axis = if axis < 0 { axis + rank as i64 } else { axis };
                let o = match axis {
                    1 => Op::Flatten {
                        start_dim: 1,
                        end_dim: -1,
                    },
                    a if a as usize == rank && !self.g.shape(x)?.has_batch() => {
                        Op::Reshape { shape: vec![-1, 1] }
                    }
                    0 if !self.g.shape(x)?.has_batch() => Op::Reshape { shape: vec![1, -1] },
                    a => {
                        return Err(unsupported(
                            "",
                            format!("Flatten axis {a} on rank {rank} (axis 1 is supported)"),
                        ))
                    }
                };
                let id = self.add(i, o, &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "Reshape" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                let allowzero = attr_i(n, "allowzero", 0) != 0;
                let shape = self
                    .konst(n, 1, "the target shape")?
                    .ok_or_else(|| unsupported("", "Reshape without a shape"))?;
                let in_batch = self.g.shape(x)?.has_batch();
                let s = shape.ints("")?;
                if allowzero && s.contains(&Some(0)) {
                    // with allowzero=1 a 0 is a real empty dimension, not "copy"
                    return Err(unsupported("", "allowzero=1 with a 0 in the shape"));
                }
                let mut out = Vec::with_capacity(s.len());
                for (k, d) in s.iter().enumerate() {
                    out.push(match d {
                        Some(v) => isize::try_from(*v)
                            .map_err(|_| unsupported("", format!("shape value {v}")))?,
                        // the batch size itself: copy dimension 0 of the input
                        None if k == 0 && in_batch => 0,
                        None => {
                            return Err(unsupported(
                                "",
                                "a shape that moves the batch size away from dimension 0",
                            ))
                        }
                    });
                }
                // [-1, a, b] on [N, ...] with a * b equal to the non-batch elements: the -1 is
                // the batch (the dynamo exporter writes this), i.e. "copy dimension 0"
                if in_batch && out.first() == Some(&-1) && out[1..].iter().all(|&d| d > 0) {
                    let rest = self.g.shape(x)?.0[1..]
                        .iter()
                        .try_fold(1usize, |a, d| a.checked_mul(d.fixed().unwrap_or(0)));
                    let target = out[1..]
                        .iter()
                        .try_fold(1usize, |a, &d| a.checked_mul(d as usize));
                    if rest.is_some() && rest == target {
                        out[0] = 0;
                    }
                }
                let id = self.add(i, Op::Reshape { shape: out }, &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "Transpose" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                let rank = self.rank_of(x)?;
                let perm = attr_ints(n, "perm")
                    .unwrap_or_else(|| (0..rank as i64).rev().collect())
                    .iter()
                    .map(|&p| usize_of(p, "", "perm"))
                    .collect::<Result<Vec<_>>>()?;
                let id = self.add(i, Op::Permute { dims: perm }, &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "Resize" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                let spec = self.resize(n, x)?;
                let id = self.add(i, Op::Upsample(spec), &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "Softmax" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                let rank = self.rank_of(x)?;
                let default = if m.opset >= 13 { -1 } else { 1 };
                let axis = norm_axis(attr_i(n, "axis", default), rank, "")?;
                if m.opset < 13 && axis != rank - 1 {
                    return Err(unsupported(
                        "",
                        "Softmax before opset 13 on a non-last axis (2-D coercion)",
                    ));
                }
                let id = self.add(i, Op::Softmax { axis }, &[x])?;
                self.set_out(n, Val::Node(id));
            }
            "Slice" => {
                let x = x0.ok_or_else(|| unsupported("", "constant input"))?;
                let rank = self.rank_of(x)?;
                let shape = self.g.shape(x)?.clone();
                let (starts, ends, axes, steps) = self.slice_args(n, rank)?;
                if axes.len() != 1 || steps[0] != 1 || axes[0] == 0 {
                    return Err(unsupported(
                        "",
                        "Slice of a graph value on anything but one non-batch axis with step 1",
                    ));
                }
                let dim = shape.0[axes[0]].fixed().unwrap_or(0) as i64;
                let c = |v: i64| -> usize {
                    let v = if v < 0 { v + dim } else { v };
                    v.clamp(0, dim) as usize
                };
                let (s, e) = (c(starts[0]), c(ends[0]));
                let id = self.add(
                    i,
                    Op::Slice {
                        axis: axes[0],
                        start: s,
                        end: e.max(s),
                    },
                    &[x],
                )?;
                self.set_out(n, Val::Node(id));
            }
            other => {
                return Err(unsupported(
                    "",
                    format!("{other} is only supported on constant inputs (shape arithmetic)"),
                ))
            }
        }
        Ok(())
    }

    fn slice_args(&self, n: &OnnxNode, rank: usize) -> Result<SliceArgs> {
        let get = |k: usize, a: &str| -> Result<Option<Vec<i64>>> {
            match self.konst(n, k, a)? {
                Some(c) => Ok(Some(c.known_ints("")?)),
                None => Ok(attr_ints(n, a)),
            }
        };
        let starts = get(1, "starts")?.ok_or_else(|| unsupported("", "Slice without starts"))?;
        let ends = get(2, "ends")?.ok_or_else(|| unsupported("", "Slice without ends"))?;
        let axes: Vec<usize> = get(3, "axes")?
            .unwrap_or_else(|| (0..starts.len() as i64).collect())
            .iter()
            .map(|&a| norm_axis(a, rank, ""))
            .collect::<Result<_>>()?;
        let steps = get(4, "steps")?.unwrap_or_else(|| vec![1; starts.len()]);
        if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
            return Err(unsupported("", "Slice arguments of different lengths"));
        }
        Ok((starts, ends, axes, steps))
    }

    fn conv(&self, n: &OnnxNode, _x: NodeId, w: &Konst, b: Option<&Konst>) -> Result<Conv2d> {
        check_auto_pad(n)?;
        let wd = w.dims().to_vec();
        if wd.len() != 4 {
            return Err(unsupported(
                "",
                format!("a weight of dims {wd:?} (only 2-D convolutions)"),
            ));
        }
        let wv = w.floats("")?;
        let weight = Array4::from_shape_vec((wd[0], wd[1], wd[2], wd[3]), wv)
            .map_err(|e| shape_err("", "a 4-D weight", e.to_string()))?;
        let bias = match b {
            Some(b) => Some(Array1::from(b.floats("")?)),
            None => None,
        };
        let pair = |k: &str| -> Result<(usize, usize)> {
            let v = attr_ints(n, k).unwrap_or_else(|| vec![1, 1]);
            if v.len() != 2 {
                return Err(unsupported("", format!("{k} {v:?}")));
            }
            Ok((usize_of(v[0], "", k)?, usize_of(v[1], "", k)?))
        };
        let s = pair("strides")?;
        let d = pair("dilations")?;
        if let Some(k) = attr_ints(n, "kernel_shape") {
            if k.len() != 2 || k[0] as usize != wd[2] || k[1] as usize != wd[3] {
                return Err(shape_err(
                    "",
                    format!("kernel_shape {:?}", &wd[2..]),
                    format!("{k:?}"),
                ));
            }
        }
        let pads = attr_ints(n, "pads").unwrap_or_else(|| vec![0; 4]);
        if pads.len() != 4 {
            return Err(unsupported("", format!("pads {pads:?}")));
        }
        if pads[0] != pads[2] || pads[1] != pads[3] {
            return Err(unsupported(
                "",
                format!("asymmetric convolution padding {pads:?} (top, left, bottom, right)"),
            ));
        }
        let groups = usize_of(attr_i(n, "group", 1), "", "group")?;
        if groups == 0 {
            return Err(unsupported("", "group 0"));
        }
        Ok(Conv2d::new(weight, bias)?
            .with_stride(s.0, s.1)
            .with_dilation(d.0, d.1)
            .with_padding(usize_of(pads[0], "", "pad")?, usize_of(pads[1], "", "pad")?)
            .with_groups(groups))
    }

    fn bn_params(&self, n: &OnnxNode, c: usize) -> Result<BatchNorm2d> {
        if n.outputs.iter().skip(1).any(|s| !s.is_empty()) {
            return Err(unsupported("", "BatchNormalization in training mode"));
        }
        if attr_i(n, "training_mode", 0) != 0 {
            return Err(unsupported("", "training_mode=1"));
        }
        let mut v = Vec::new();
        for (k, what) in [(1, "scale"), (2, "B"), (3, "mean"), (4, "var")] {
            let kk = self
                .konst(n, k, what)?
                .ok_or_else(|| unsupported("", format!("no {what}")))?;
            let f = kk.floats("")?;
            if f.len() != c {
                return Err(shape_err(
                    "",
                    format!("{what} of {c} elements"),
                    format!("{} elements", f.len()),
                ));
            }
            v.push(Array1::from(f));
        }
        let mut bn = BatchNorm2d::identity(c);
        bn.running_var = v.pop().expect("4");
        bn.running_mean = v.pop().expect("3");
        bn.bias = v.pop().expect("2");
        bn.weight = v.pop().expect("1");
        bn.eps = attr_f(n, "epsilon", 1e-5);
        Ok(bn)
    }

    fn resize(&self, n: &OnnxNode, x: NodeId) -> Result<UpsampleSpec> {
        let mode = attr_s(n, "mode", "nearest");
        if mode != "nearest" {
            return Err(unsupported(
                "",
                format!("Resize mode {mode:?} (nearest only)"),
            ));
        }
        let ct = attr_s(n, "coordinate_transformation_mode", "half_pixel");
        let nm = attr_s(n, "nearest_mode", "round_prefer_floor");
        let rule = match (ct.as_str(), nm.as_str()) {
            ("asymmetric", "floor") => NearestRule::Floor,
            ("half_pixel", "round_prefer_ceil") => NearestRule::Exact,
            ("half_pixel", "round_prefer_floor") => NearestRule::HalfPixelRoundPreferFloor,
            _ => {
                return Err(unsupported(
                    "",
                    format!("Resize nearest with {ct:?} / {nm:?}"),
                ))
            }
        };
        let shape = self.g.shape(x)?.clone();
        if shape.0.len() != 4 {
            return Err(unsupported("", "Resize of a non-4-D tensor"));
        }
        let scales = self.konst(n, 2, "scales")?.filter(|k| k.len() > 0);
        let sizes = self.konst(n, 3, "sizes")?.filter(|k| k.len() > 0);
        let spec = if let Some(s) = scales {
            let s = s.floats("")?;
            if s.len() != 4 || s[0] != 1.0 || s[1] != 1.0 {
                return Err(unsupported(
                    "",
                    format!("Resize scales {s:?} (only H and W)"),
                ));
            }
            UpsampleSpec::scale(s[2], s[3], UpsampleMode::Nearest(rule))
        } else if let Some(s) = sizes {
            let s = s.known_ints("")?;
            if s.len() != 4 || shape.0[1].fixed() != Some(s[1] as usize) {
                return Err(unsupported(
                    "",
                    format!("Resize sizes {s:?} (only H and W)"),
                ));
            }
            UpsampleSpec::size(
                usize_of(s[2], "", "size")?,
                usize_of(s[3], "", "size")?,
                UpsampleMode::Nearest(rule),
            )
        } else {
            return Err(unsupported("", "Resize without scales or sizes"));
        };
        Ok(spec)
    }

    /// Constant folding; `None` when the op is not foldable (then it is mapped to a node).
    fn fold(&self, n: &OnnxNode) -> Result<Option<Konst>> {
        let op = n.op_type.as_str();
        let c = |k: usize| -> Result<Option<Konst>> { self.konst(n, k, "input") };
        let need = |k: usize| -> Result<Konst> { c(k)?.ok_or_else(|| missing(n, k)) };
        Ok(Some(match op {
            "Cast" => {
                let x = need(0)?;
                let to = attr_i(n, "to", 1);
                match to {
                    1 | 10 | 11 | 16 => Konst::F {
                        dims: x.dims().to_vec(),
                        v: x.floats("")?,
                    },
                    2..=7 | 9 | 12 | 13 => match x {
                        Konst::I { .. } => x,
                        Konst::F { dims, v } => Konst::I {
                            dims,
                            v: v.iter().map(|&f| Some(f.trunc() as i64)).collect(),
                        },
                    },
                    _ => return Err(unsupported("", format!("Cast to type {to}"))),
                }
            }
            "Unsqueeze" | "Squeeze" => {
                let x = need(0)?;
                let axes = match c(1)? {
                    Some(a) => Some(a.known_ints("")?),
                    None => attr_ints(n, "axes"),
                };
                let mut d = x.dims().to_vec();
                if op == "Unsqueeze" {
                    let axes = axes.ok_or_else(|| unsupported("", "Unsqueeze without axes"))?;
                    let out_rank = d.len() + axes.len();
                    let mut ax = axes
                        .iter()
                        .map(|&a| norm_axis(a, out_rank, ""))
                        .collect::<Result<Vec<_>>>()?;
                    ax.sort_unstable();
                    for a in ax {
                        if a > d.len() {
                            return Err(unsupported("", "Unsqueeze axis"));
                        }
                        d.insert(a, 1);
                    }
                } else {
                    match axes {
                        Some(axes) => {
                            let rank = d.len();
                            let mut ax = axes
                                .iter()
                                .map(|&a| norm_axis(a, rank, ""))
                                .collect::<Result<Vec<_>>>()?;
                            ax.sort_unstable();
                            for a in ax.into_iter().rev() {
                                if d[a] != 1 {
                                    return Err(unsupported("", "Squeeze of a dimension != 1"));
                                }
                                d.remove(a);
                            }
                        }
                        None => d.retain(|&x| x != 1),
                    }
                }
                x.with_dims(d)
            }
            "Gather" => {
                let x = need(0)?;
                let idx = need(1)?;
                let rank = x.dims().len();
                let axis = norm_axis(attr_i(n, "axis", 0), rank, "")?;
                if axis != 0 || rank != 1 {
                    return Err(unsupported(
                        "",
                        "Gather of constants other than 1-D on axis 0",
                    ));
                }
                let len = x.dims()[0] as i64;
                let ids = idx
                    .known_ints("")?
                    .into_iter()
                    .map(|i| {
                        let j = if i < 0 { i + len } else { i };
                        if (0..len).contains(&j) {
                            Ok(j as usize)
                        } else {
                            Err(unsupported(
                                "",
                                format!("Gather index {i} out of range {len}"),
                            ))
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                let dims = idx.dims().to_vec();
                match x {
                    Konst::F { v, .. } => Konst::F {
                        dims,
                        v: ids.iter().map(|&i| v[i]).collect(),
                    },
                    Konst::I { v, .. } => Konst::I {
                        dims,
                        v: ids.iter().map(|&i| v[i]).collect(),
                    },
                }
            }
            "Concat" => {
                let parts: Vec<Konst> = (0..n.inputs.len())
                    .filter_map(|k| c(k).transpose())
                    .collect::<Result<_>>()?;
                if parts.iter().any(|p| p.dims().len() != 1) {
                    return Err(unsupported("", "Concat of constants other than 1-D"));
                }
                if parts.iter().all(|p| matches!(p, Konst::I { .. })) {
                    let v: Vec<SymInt> = parts
                        .iter()
                        .flat_map(|p| p.ints("").unwrap_or_default())
                        .collect();
                    Konst::I {
                        dims: vec![v.len()],
                        v,
                    }
                } else {
                    let mut v = Vec::new();
                    for p in &parts {
                        v.extend(p.floats("")?);
                    }
                    Konst::F {
                        dims: vec![v.len()],
                        v,
                    }
                }
            }
            "Slice" => {
                let x = need(0)?;
                if x.dims().len() != 1 {
                    return Err(unsupported("", "Slice of constants other than 1-D"));
                }
                let (st, en, _axes, steps) = self.slice_args(n, 1)?;
                if steps[0] != 1 {
                    return Err(unsupported("", "Slice step != 1 on constants"));
                }
                let len = x.dims()[0] as i64;
                let cl = |v: i64| -> usize {
                    let v = if v < 0 { v + len } else { v };
                    v.clamp(0, len) as usize
                };
                let (s, e) = (cl(st[0]), cl(en[0]).max(cl(st[0])));
                match x {
                    Konst::F { v, .. } => Konst::F {
                        dims: vec![e - s],
                        v: v[s..e].to_vec(),
                    },
                    Konst::I { v, .. } => Konst::I {
                        dims: vec![e - s],
                        v: v[s..e].to_vec(),
                    },
                }
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                let a = need(0)?;
                let b = need(1)?;
                let (la, lb) = (a.len(), b.len());
                if la == 0 || lb == 0 || !(la == lb || la == 1 || lb == 1) {
                    return Err(unsupported("", "broadcasting constant arithmetic"));
                }
                let dims = if la >= lb {
                    a.dims().to_vec()
                } else {
                    b.dims().to_vec()
                };
                let len = la.max(lb);
                match (&a, &b) {
                    (Konst::I { v: x, .. }, Konst::I { v: y, .. }) => {
                        let f = |p: i64, q: i64| -> Option<i64> {
                            match op {
                                "Add" => p.checked_add(q),
                                "Sub" => p.checked_sub(q),
                                "Mul" => p.checked_mul(q),
                                _ => {
                                    if q == 0 {
                                        None
                                    } else {
                                        p.checked_div_euclid(q)
                                    }
                                }
                            }
                        };
                        let v = (0..len)
                            .map(|k| {
                                let (p, q) = (
                                    x[if la == 1 { 0 } else { k }],
                                    y[if lb == 1 { 0 } else { k }],
                                );
                                match (p, q) {
                                    (Some(p), Some(q)) => f(p, q),
                                    _ => None,
                                }
                            })
                            .collect();
                        Konst::I { dims, v }
                    }
                    _ => {
                        let (x, y) = (a.floats("")?, b.floats("")?);
                        let v = (0..len)
                            .map(|k| {
                                let (p, q) = (
                                    x[if la == 1 { 0 } else { k }],
                                    y[if lb == 1 { 0 } else { k }],
                                );
                                match op {
                                    "Add" => p + q,
                                    "Sub" => p - q,
                                    "Mul" => p * q,
                                    _ => p / q,
                                }
                            })
                            .collect();
                        Konst::F { dims, v }
                    }
                }
            }
            _ => return Ok(None),
        }))
    }
}

fn missing(n: &OnnxNode, k: usize) -> QuantError {
    QuantError::InvalidFile {
        context: format!("ONNX node {:?}", n.name),
        reason: format!("{} lacks its input {k}", n.op_type),
    }
}

fn check_auto_pad(n: &OnnxNode) -> Result<()> {
    let a = attr_s(n, "auto_pad", "NOTSET");
    if a != "NOTSET" && a != "VALID" {
        return Err(unsupported(
            "",
            format!("auto_pad={a} (export with explicit pads)"),
        ));
    }
    Ok(())
}

fn constant_value(n: &OnnxNode) -> Result<Konst> {
    if let Some((k, v)) = n.attrs.iter().next() {
        return Ok(match (k.as_str(), v) {
            ("value", AttrValue::Tensor(t)) => Konst::from_tensor(t),
            ("value_float", AttrValue::Float(f)) => Konst::F {
                dims: vec![],
                v: vec![*f],
            },
            ("value_floats", AttrValue::Floats(f)) => Konst::F {
                dims: vec![f.len()],
                v: f.clone(),
            },
            ("value_int", AttrValue::Int(i)) => Konst::I {
                dims: vec![],
                v: vec![Some(*i)],
            },
            ("value_ints", AttrValue::Ints(i)) => Konst::I {
                dims: vec![i.len()],
                v: i.iter().map(|&x| Some(x)).collect(),
            },
            _ => return Err(unsupported("", format!("Constant with attribute {k:?}"))),
        });
    }
    Err(QuantError::InvalidFile {
        context: format!("ONNX node {:?}", n.name),
        reason: "Constant without a value".into(),
    })
}

/// A linear layer from a constant `B` (`[K, N]`, or `[N, K]` when `trans_b`) and bias `C`.
fn linear_from(
    b: &Konst,
    trans_b: bool,
    c: Option<&Konst>,
    alpha: f32,
    beta: f32,
    what: &str,
) -> Result<Linear> {
    let d = b.dims();
    if d.len() != 2 {
        return Err(unsupported(
            "",
            format!("{what} weight of dims {d:?} (a 2-D constant is needed)"),
        ));
    }
    let v = b.floats("")?;
    let m = Array2::from_shape_vec((d[0], d[1]), v)
        .map_err(|e| shape_err("", "a 2-D weight", e.to_string()))?;
    let mut w = if trans_b {
        m
    } else {
        m.t().as_standard_layout().to_owned()
    };
    if alpha != 1.0 {
        w.mapv_inplace(|x| x * alpha);
    }
    let out = w.shape()[0];
    let bias = match c {
        None => None,
        Some(c) => {
            let f = c.floats("")?;
            let f = if f.len() == 1 && out != 1 {
                vec![f[0]; out]
            } else {
                f
            };
            if f.len() != out || c.dims().iter().filter(|&&x| x != 1).count() > 1 {
                return Err(shape_err(
                    "",
                    format!("a bias of {out} elements"),
                    format!("dims {:?}", c.dims()),
                ));
            }
            Some(Array1::from(f).mapv(|x| x * beta))
        }
    };
    Linear::new(w, bias)
}
