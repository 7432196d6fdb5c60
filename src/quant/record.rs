//! The `ptq-qmodel/2` file: a [`QuantizedGraph`] as a safetensors file.
//!
//! Metadata: `format = ptq-qmodel/2`, `float_weight_bytes`, `nodes = N`, `inputs` and
//! `outputs` (comma-separated node indices), and per node `i`: `i:name`, `i:kind` (the op's
//! [`QuantOp::kind`] tag), `i:inputs` (comma-separated earlier indices) and the op's own
//! keys `i:<key>`; the op's tensors are named `i:<name>`. Each op writes its record with
//! [`QuantOp::write`] through an [`OpRecordWriter`] and is read back by the one function
//! registered for its tag in [`READERS`].
//!
//! Loading trusts nothing: the container checks of `ptq-qmodel/1` (offsets, sizes, dtypes,
//! ranks, counts bounded by the file's own size, no unused tensor), plus: node inputs must
//! be earlier nodes and as many as the op takes, graph inputs must be `Input` nodes, kind
//! tags must be in the table, and every op's constructor validates its parameters. Every
//! failure is a [`QuantError::InvalidFile`] (or the op's own error) naming the node.
//! A `ptq-qmodel/1` file (a `Sequential` model saved by an earlier ptq) is refused with an
//! error naming its version.

use std::path::Path;

use ndarray::{Array1, Array2, Array4};

use super::exec::{QNode, QuantizedGraph, INPUT_KIND};
use super::ops;
use super::QuantOp;
use crate::error::{QuantError, Result};
use crate::io::qmodel::{open_reader, Reader, Writer};
use crate::nn::quantized::{Conv2dParams, QConv2d, QLinear};
use crate::qparams::{ActQParams, QParams};

/// The format version written in the `format` metadata key.
pub const FORMAT: &str = "ptq-qmodel/2";

/// Where one op writes its parameters.
pub struct OpRecordWriter<'w> {
    w: &'w mut Writer,
    id: String,
}

impl OpRecordWriter<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}:{k}", self.id)
    }
    /// Sets metadata key `k` (prefixed with the node) to `v`.
    pub fn set(&mut self, k: &str, v: impl ToString) {
        let key = self.key(k);
        self.w.set(key, v);
    }
    /// Writes a pair as `a,b`.
    pub fn pair(&mut self, k: &str, (a, b): (usize, usize)) {
        self.set(k, format!("{a},{b}"));
    }
    /// Writes activation parameters under `k` as `scale,zero_point`.
    pub fn act(&mut self, k: &str, q: ActQParams) {
        self.set(k, format!("{},{}", q.scale(), q.zero_point()));
    }
    /// Writes an `f32` tensor.
    pub fn f32s(&mut self, name: &str, shape: &[usize], v: &[f32]) {
        let key = self.key(name);
        self.w.f32s(key, shape, v);
    }
    /// Writes a quantized linear layer (weights, weight qparams, bias, output qparams).
    pub fn linear(&mut self, l: &QLinear) {
        self.w.linear(&self.id, l);
    }
    /// Writes a quantized convolution (as [`OpRecordWriter::linear`], plus geometry).
    pub fn conv(&mut self, c: &QConv2d) {
        self.w.conv(&self.id, c);
    }
}

/// Where one op reads its parameters from (validating everything).
pub struct OpRecordReader<'r, 'a> {
    r: &'r mut Reader<'a>,
    id: String,
    name: String,
    inputs: usize,
}

impl OpRecordReader<'_, '_> {
    fn key(&self, k: &str) -> String {
        format!("{}:{k}", self.id)
    }
    /// How many inputs the node has in the file.
    pub fn num_inputs(&self) -> usize {
        self.inputs
    }
    /// The node's name (for error messages).
    pub fn node_name(&self) -> &str {
        &self.name
    }
    /// An [`QuantError::InvalidFile`] naming the node.
    pub fn bad(&self, reason: impl std::fmt::Display) -> QuantError {
        QuantError::InvalidFile {
            context: format!("node {} ({})", self.id, self.name),
            reason: reason.to_string(),
        }
    }
    /// Metadata key `k`, parsed.
    ///
    /// # Errors
    /// [`QuantError::InvalidFile`] if missing or unparsable.
    pub fn parse<T: std::str::FromStr>(&self, k: &str) -> Result<T> {
        self.r.parse(&self.key(k))
    }
    /// Metadata key `k` if the file has it (for keys older files lack).
    pub fn opt(&self, k: &str) -> Option<&str> {
        self.r.get(&self.key(k)).ok()
    }
    /// A `0`/`1` flag.
    ///
    /// # Errors
    /// [`QuantError::InvalidFile`] if missing or another value.
    pub fn flag(&self, k: &str) -> Result<bool> {
        self.r.flag(&self.key(k))
    }
    /// A hyperparameter pair, each in `min..=MAX_HYPERPARAMETER`.
    ///
    /// # Errors
    /// [`QuantError::InvalidFile`] if missing, unparsable or out of bounds.
    pub fn pair(&self, k: &str, min: usize) -> Result<(usize, usize)> {
        self.r.pair(&self.key(k), min)
    }
    /// A hyperparameter, in `min..=MAX_HYPERPARAMETER`.
    ///
    /// # Errors
    /// [`QuantError::InvalidFile`] if missing, unparsable or out of bounds.
    pub fn hyper(&self, k: &str, min: usize) -> Result<usize> {
        let v: usize = self.parse(k)?;
        self.r.hyper(&self.key(k), v, min)
    }
    /// Activation parameters written by [`OpRecordWriter::act`].
    ///
    /// # Errors
    /// [`QuantError::InvalidFile`] if missing or malformed; scale / zero point errors.
    pub fn act(&self, k: &str) -> Result<ActQParams> {
        let key = self.key(k);
        let v = self.r.get(&key)?;
        let (s, z) = v
            .split_once(',')
            .and_then(|(s, z)| Some((s.parse::<f32>().ok()?, z.parse::<i64>().ok()?)))
            .ok_or_else(|| self.bad(format!("metadata `{key}` = {v:?} is not `scale,zp`")))?;
        let z = i32::try_from(z).unwrap_or(i32::MAX);
        ActQParams::new_in(s, z, &key)
    }
    /// A finite `f32` tensor of the given rank.
    ///
    /// # Errors
    /// [`QuantError::InvalidFile`] if missing, of another dtype or rank, or non-finite.
    pub fn f32s(&mut self, name: &str, rank: usize) -> Result<(Vec<usize>, Vec<f32>)> {
        let key = self.key(name);
        self.r.f32s(&key, rank)
    }
    /// Whether tensor `name` is present.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.r.has_tensor(&self.key(name))
    }
    /// A quantized linear layer written by [`OpRecordWriter::linear`].
    ///
    /// # Errors
    /// As the layer's constructor, and [`QuantError::InvalidFile`] for malformed records.
    #[allow(clippy::type_complexity)]
    pub(crate) fn linear(
        &mut self,
    ) -> Result<(Array2<i8>, QParams, Option<Array1<f32>>, ActQParams)> {
        let (w, qp, b, s, z) = self.r.linear(&self.id)?;
        Ok((w, qp, b, ActQParams::new_in(s, z, &self.name)?))
    }
    /// A quantized convolution written by [`OpRecordWriter::conv`].
    ///
    /// # Errors
    /// As [`OpRecordReader::linear`].
    #[allow(clippy::type_complexity)]
    pub(crate) fn conv(
        &mut self,
    ) -> Result<(
        Array4<i8>,
        QParams,
        Option<Array1<f32>>,
        Conv2dParams,
        ActQParams,
    )> {
        let (w, qp, b, p, s, z) = self.r.conv(&self.id)?;
        Ok((w, qp, b, p, ActQParams::new_in(s, z, &self.name)?))
    }
}

/// Reads one op's record.
pub type OpReader = fn(&mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>>;

/// THE table: one entry per op kind tag.
pub static READERS: &[(&str, OpReader)] = &[
    (INPUT_KIND, ops::InputOp::read),
    ("Quantize", ops::QuantizeOp::read),
    ("Dequantize", ops::DequantizeOp::read),
    ("Conv2d", ops::ConvOp::read),
    ("ConvReLU2d", ops::ConvOp::read),
    ("Linear", ops::LinearOp::read),
    ("LinearReLU", ops::LinearOp::read),
    ("Add", ops::AddOp::read),
    ("AddReLU", ops::AddOp::read),
    ("ReLU", ops::ReluOp::read),
    ("Clamp", ops::ClampOp::read),
    ("MaxPool2d", ops::MaxPoolOp::read),
    ("AvgPool2d", ops::AvgPoolOp::read),
    ("AdaptiveAvgPool2d", ops::AdaptiveAvgPoolOp::read),
    ("Flatten", ops::FlattenOp::read),
    ("Reshape", ops::ReshapeOp::read),
    ("Identity", ops::IdentityOp::read),
    ("Mul", ops::MulOp::read),
    ("Concat", ops::CatOp::read),
    ("Hardswish", ops::HardswishOp::read),
    ("Hardsigmoid", ops::SigmoidOp::read_hard),
    ("Sigmoid", ops::SigmoidOp::read_soft),
    ("Upsample", ops::UpsampleOp::read),
    ("BatchNorm2d", ops::BatchNormOp::read),
    ("Permute", ops::PermuteOp::read),
    ("Slice", ops::SliceOp::read),
    ("Mean", ops::MeanOp::read),
    ("LayerNorm", ops::LayerNormOp::read),
    ("UpsampleBilinear", ops::BilinearUpsampleOp::read),
    ("Float", super::convert::FloatOp::read),
];

fn join(v: &[usize]) -> String {
    v.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl QuantizedGraph {
    /// Serializes the graph to the bytes of a `ptq-qmodel/2` file (see
    /// [`crate::quant::record`]).
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] naming the node if an op has no file form.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut w = Writer::default();
        w.set("format".into(), FORMAT);
        w.set("float_weight_bytes".into(), self.float_weight_bytes);
        w.set("nodes".into(), self.nodes.len());
        w.set("inputs".into(), join(&self.inputs));
        w.set("outputs".into(), join(&self.outputs));
        for (i, n) in self.nodes.iter().enumerate() {
            w.set(format!("{i}:name"), &n.name);
            w.set(format!("{i}:kind"), n.op.kind());
            w.set(format!("{i}:inputs"), join(&n.inputs));
            let mut rec = OpRecordWriter {
                w: &mut w,
                id: i.to_string(),
            };
            n.op.write(&mut rec).map_err(|e| e.in_context(&n.name))?;
        }
        w.finish()
    }

    /// Writes the graph to `path` (see [`QuantizedGraph::to_bytes`]).
    ///
    /// # Errors
    /// As [`QuantizedGraph::to_bytes`], and [`QuantError::InvalidFile`] if the file cannot
    /// be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|e| QuantError::InvalidFile {
            context: path.display().to_string(),
            reason: format!("cannot write: {e}"),
        })
    }

    /// Reads a graph saved by [`QuantizedGraph::save`]; it gives bit-identical outputs.
    ///
    /// # Errors
    /// As [`QuantizedGraph::from_bytes`], and [`QuantError::InvalidFile`] if the file
    /// cannot be read.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let (bytes, ctx) = read_file(path.as_ref())?;
        load(&bytes, &ctx)
    }

    /// Parses the bytes of a `ptq-qmodel/2` file. Nothing in the bytes is trusted.
    ///
    /// # Errors
    /// [`QuantError::InvalidFile`] for anything wrong with the container, the metadata,
    /// the structure or a tensor (naming the node), including a `ptq-qmodel/1` file, whose
    /// error names that version; the ops' own constructor errors.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        load(bytes, "bytes")
    }
}

fn parse_list(r: &Reader<'_>, key: &str, bound: usize) -> Result<Vec<usize>> {
    let v = r.get(key)?;
    if v.is_empty() {
        return Ok(Vec::new());
    }
    v.split(',')
        .map(|s| match s.parse::<usize>() {
            Ok(i) if i < bound => Ok(i),
            _ => Err(r.bad(format!(
                "metadata `{key}` = {v:?}: {s:?} is not a node index below {bound}"
            ))),
        })
        .collect()
}

/// The bytes of a saved model file and the path as error context.
pub(crate) fn read_file(path: &Path) -> Result<(Vec<u8>, String)> {
    let ctx = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| QuantError::InvalidFile {
        context: ctx.clone(),
        reason: e.to_string(),
    })?;
    Ok((bytes, ctx))
}

pub(crate) fn load(bytes: &[u8], ctx: &str) -> Result<QuantizedGraph> {
    let mut r = open_reader(bytes, ctx)?;
    let format = r.get("format")?.to_string();
    if format == crate::io::qmodel::LEGACY_FORMAT {
        return Err(r.bad(format!(
            "this is a {format} file (a Sequential model saved by an earlier ptq; neither \
             QuantizedGraph nor QuantizedModel::load reads it any more): convert the float \
             model again and save it as {FORMAT}"
        )));
    }
    if format != FORMAT {
        return Err(r.bad(format!(
            "format {format:?} is not {FORMAT:?} (a newer ptq, or not a ptq model)"
        )));
    }
    let float_weight_bytes: usize = r.parse("float_weight_bytes")?;
    let n = r.count("nodes")?;
    let inputs = parse_list(&r, "inputs", n)?;
    let outputs = parse_list(&r, "outputs", n)?;
    let mut nodes: Vec<QNode> = Vec::with_capacity(n);
    for i in 0..n {
        let name = r.get(&format!("{i}:name"))?.to_string();
        let kind = r.get(&format!("{i}:kind"))?.to_string();
        let node_inputs = parse_list(&r, &format!("{i}:inputs"), i)?;
        let reader = READERS
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                r.bad(format!(
                    "node {i} ({name}): unknown op kind {kind:?} (a newer ptq?)"
                ))
            })?;
        let mut rec = OpRecordReader {
            r: &mut r,
            id: i.to_string(),
            name: name.clone(),
            inputs: node_inputs.len(),
        };
        let here = format!("node {i} ({name})");
        let op = reader(&mut rec).map_err(|e| match e {
            // Name the node where the record reader did not.
            QuantError::InvalidFile { context, reason } if !reason.contains(&here) => {
                QuantError::InvalidFile {
                    context,
                    reason: format!("{here}: {reason}"),
                }
            }
            QuantError::InvalidFile { .. } => e,
            other => other.in_context(&format!("{ctx}: {here}")),
        })?;
        if op.kind() != kind {
            return Err(r.bad(format!(
                "node {i} ({name}): record {kind:?} read back as {:?}",
                op.kind()
            )));
        }
        nodes.push(QNode {
            name,
            inputs: node_inputs,
            op,
        });
    }
    r.check_all_used()?;
    QuantizedGraph::new(nodes, inputs, outputs, float_weight_bytes).map_err(|e| {
        QuantError::InvalidFile {
            context: ctx.into(),
            reason: e.to_string(),
        }
    })
}
