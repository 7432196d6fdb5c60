//! Loading PyTorch weights: a `state_dict` saved with `safetensors.torch.save_file` (or
//! `save_model`) loads into a [`Sequential`] by PyTorch's dotted parameter names.
//!
//! ```python
//! # in Python, once:
//! from safetensors.torch import save_file
//! save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "model.safetensors")
//! ```
//!
//! The load is strict by default: a key the model does not have, a parameter the file does
//! not have, or a shape that differs is an error that lists every such key. `f32`, `f16`,
//! `bf16` and `f64` tensors are accepted (converted to `f32`); `num_batches_tracked`
//! buffers are ignored. A truncated or corrupt file is an error, never a panic: sizes and
//! offsets in the header are validated against the file before any tensor is read.
//!
//! [`read_safetensors_tensors`] reads every tensor in its own element type ([`Tensor`]:
//! integer tensors such as int8 weights, `i32` biases or `i64` indices stay integers).
//!
//! Quantized models are saved and loaded with [`QuantizedModel::save`] /
//! [`QuantizedModel::load`] in the [`qmodel`] format.
//!
//! [`QuantizedModel::save`]: crate::nn::quantized::QuantizedModel::save
//! [`QuantizedModel::load`]: crate::nn::quantized::QuantizedModel::load

pub mod onnx;
pub mod qmodel;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use half::{bf16, f16};
use ndarray::{Array, ArrayD, Dimension, IxDyn};
use safetensors::{Dtype, SafeTensors};

use crate::error::{QuantError, Result};
use crate::graph::Graph;
use crate::nn::{Layer, Sequential};

/// What a load did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadReport {
    /// Parameters copied into the model, by dotted name.
    pub loaded: Vec<String>,
    /// Keys in the file that were ignored (`num_batches_tracked`, and with a non-strict
    /// load every unexpected key).
    pub ignored: Vec<String>,
    /// Model parameters the file lacked (empty for a strict load, which fails instead).
    pub missing: Vec<String>,
}

/// Reads a safetensors file into named `f32` tensors.
///
/// # Errors
/// [`QuantError::InvalidFile`] if the file cannot be read, is not a valid safetensors file
/// (bad header, offsets past the end, sizes that do not match shapes), or holds a tensor
/// of a dtype other than f32/f16/bf16/f64.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<BTreeMap<String, ArrayD<f32>>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| QuantError::InvalidFile {
        context: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse_safetensors(&bytes, &path.display().to_string())
}

/// As [`read_safetensors`], from bytes in memory; `context` names the source in errors.
///
/// # Errors
/// As [`read_safetensors`].
///
/// # Examples
/// ```
/// let err = ptq::io::parse_safetensors(b"not a safetensors file", "upload").unwrap_err();
/// assert!(err.to_string().starts_with("upload: invalid file"));
/// ```
pub fn parse_safetensors(bytes: &[u8], context: &str) -> Result<BTreeMap<String, ArrayD<f32>>> {
    let bad = |reason: String| QuantError::InvalidFile {
        context: context.into(),
        reason,
    };
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let values: Vec<f32> = match float_values(view.dtype(), view.data()) {
            Some(v) => v,
            // Integer buffers (num_batches_tracked) carry no weights.
            None if matches!(view.dtype(), Dtype::I64 | Dtype::I32)
                && name.ends_with("num_batches_tracked") =>
            {
                continue
            }
            None => {
                return Err(bad(format!(
                    "tensor {name:?} has dtype {:?}; expected F32, F16, BF16 or F64 \
                     (read integer tensors with read_safetensors_tensors)",
                    view.dtype()
                )))
            }
        };
        let arr = ArrayD::from_shape_vec(IxDyn(view.shape()), values)
            .map_err(|e| bad(format!("tensor {name:?}: {e}")))?;
        out.insert(name, arr);
    }
    Ok(out)
}

/// The little-endian values of a floating-point tensor as `f32`; `None` for other dtypes.
fn float_values(dtype: Dtype, d: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        _ => return None,
    })
}

/// One tensor of a safetensors file in its own element type, as
/// [`read_safetensors_tensors`] returns it: integer tensors (quantized weights, token ids,
/// labels, `num_batches_tracked`) keep their integers; floating-point tensors are `f32`
/// (`f16`, `bf16` and `f64` converted, as [`read_safetensors`] does).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Tensor {
    /// `F32`, `F16`, `BF16` or `F64` in the file, as `f32`.
    F32(ArrayD<f32>),
    /// `I8` (e.g. int8 weights).
    I8(ArrayD<i8>),
    /// `U8` (e.g. quint8 activations, images).
    U8(ArrayD<u8>),
    /// `I32` (e.g. int32 biases).
    I32(ArrayD<i32>),
    /// `I64` (e.g. `num_batches_tracked`, indices).
    I64(ArrayD<i64>),
}

impl Tensor {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::I8(a) => a.shape(),
            Tensor::U8(a) => a.shape(),
            Tensor::I32(a) => a.shape(),
            Tensor::I64(a) => a.shape(),
        }
    }
    /// The element type's safetensors name (`"F32"`, `"I8"`, `"U8"`, `"I32"`, `"I64"`).
    pub fn dtype(&self) -> &'static str {
        match self {
            Tensor::F32(_) => "F32",
            Tensor::I8(_) => "I8",
            Tensor::U8(_) => "U8",
            Tensor::I32(_) => "I32",
            Tensor::I64(_) => "I64",
        }
    }
    /// The `f32` values, if this is a floating-point tensor.
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            _ => None,
        }
    }
    /// The `i8` values, if this is an `I8` tensor.
    pub fn as_i8(&self) -> Option<&ArrayD<i8>> {
        match self {
            Tensor::I8(a) => Some(a),
            _ => None,
        }
    }
    /// The `u8` values, if this is a `U8` tensor.
    pub fn as_u8(&self) -> Option<&ArrayD<u8>> {
        match self {
            Tensor::U8(a) => Some(a),
            _ => None,
        }
    }
    /// The `i32` values, if this is an `I32` tensor.
    pub fn as_i32(&self) -> Option<&ArrayD<i32>> {
        match self {
            Tensor::I32(a) => Some(a),
            _ => None,
        }
    }
    /// The `i64` values, if this is an `I64` tensor.
    pub fn as_i64(&self) -> Option<&ArrayD<i64>> {
        match self {
            Tensor::I64(a) => Some(a),
            _ => None,
        }
    }
}

/// Reads every tensor of a safetensors file in its own element type (see [`Tensor`]):
/// integer tensors stay integers, floating-point ones become `f32`.
///
/// # Errors
/// [`QuantError::InvalidFile`] if the file cannot be read, is not a valid safetensors file
/// (sizes and offsets are checked against the file before anything is read), or holds a
/// tensor of another dtype (bool, u16, f8, ...), naming the tensor and its dtype.
pub fn read_safetensors_tensors(path: impl AsRef<Path>) -> Result<BTreeMap<String, Tensor>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| QuantError::InvalidFile {
        context: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse_safetensors_tensors(&bytes, &path.display().to_string())
}

/// As [`read_safetensors_tensors`], from bytes in memory; `context` names the source in
/// errors.
///
/// # Errors
/// As [`read_safetensors_tensors`].
///
/// # Examples
/// ```
/// use safetensors::{serialize, tensor::TensorView, Dtype};
/// let ids: Vec<u8> = [3i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
/// let w = [1u8, 255, 7, 128];
/// let bytes = serialize(
///     [
///         ("ids", TensorView::new(Dtype::I64, vec![2], &ids).unwrap()),
///         ("w", TensorView::new(Dtype::I8, vec![2, 2], &w).unwrap()),
///     ],
///     None,
/// )
/// .unwrap();
/// let t = ptq::io::parse_safetensors_tensors(&bytes, "mem")?;
/// assert_eq!(t["ids"].as_i64().unwrap().as_slice(), Some(&[3i64, -1][..]));
/// assert_eq!(t["w"].as_i8().unwrap().as_slice(), Some(&[1i8, -1, 7, -128][..]));
/// assert_eq!(t["w"].shape(), &[2, 2]);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn parse_safetensors_tensors(bytes: &[u8], context: &str) -> Result<BTreeMap<String, Tensor>> {
    let bad = |reason: String| QuantError::InvalidFile {
        context: context.into(),
        reason,
    };
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let shape = IxDyn(view.shape());
        let shaped = |e: ndarray::ShapeError| bad(format!("tensor {name:?}: {e}"));
        let t = match view.dtype() {
            Dtype::I8 => Tensor::I8(
                ArrayD::from_shape_vec(shape, d.iter().map(|&b| b as i8).collect())
                    .map_err(shaped)?,
            ),
            Dtype::U8 => Tensor::U8(ArrayD::from_shape_vec(shape, d.to_vec()).map_err(shaped)?),
            Dtype::I32 => Tensor::I32(
                ArrayD::from_shape_vec(
                    shape,
                    d.chunks_exact(4)
                        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                )
                .map_err(shaped)?,
            ),
            Dtype::I64 => Tensor::I64(
                ArrayD::from_shape_vec(
                    shape,
                    d.chunks_exact(8)
                        .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                        .collect(),
                )
                .map_err(shaped)?,
            ),
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => Tensor::F32(
                ArrayD::from_shape_vec(
                    shape,
                    float_values(view.dtype(), d).expect("a floating-point dtype"),
                )
                .map_err(shaped)?,
            ),
            other => {
                return Err(bad(format!(
                    "tensor {name:?} has dtype {other:?}; expected F32, F16, BF16, F64, I8, U8, I32 or I64"
                )))
            }
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// The elements of an array in standard (row-major) order, converting it first if needed.
fn std_slice<D: Dimension>(a: &mut Array<f32, D>) -> &mut [f32] {
    if !a.is_standard_layout() {
        *a = a.as_standard_layout().into_owned();
    }
    a.as_slice_mut()
        .expect("a standard-layout array is contiguous")
}

/// A model parameter: its dotted name, its shape, and where to write it.
struct Slot<'a> {
    name: String,
    target: &'a mut [f32],
    shape: Vec<usize>,
}

fn slots<'a>(seq: &'a mut Sequential, prefix: &str, out: &mut Vec<Slot<'a>>) {
    for (name, layer) in seq.children_mut().iter_mut() {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let mut push = |suffix: &str, shape: Vec<usize>, target: &'a mut [f32]| {
            out.push(Slot {
                name: format!("{path}.{suffix}"),
                target,
                shape,
            });
        };
        match layer {
            Layer::Conv2d(c) | Layer::ConvReLU2d(c) => {
                push(
                    "weight",
                    c.weight.shape().to_vec(),
                    std_slice(&mut c.weight),
                );
                if let Some(b) = &mut c.bias {
                    push("bias", vec![b.len()], std_slice(b));
                }
            }
            Layer::Linear(l) | Layer::LinearReLU(l) => {
                push(
                    "weight",
                    l.weight.shape().to_vec(),
                    std_slice(&mut l.weight),
                );
                if let Some(b) = &mut l.bias {
                    push("bias", vec![b.len()], std_slice(b));
                }
            }
            Layer::BatchNorm2d(b) => {
                let c = b.channels();
                push("weight", vec![c], std_slice(&mut b.weight));
                push("bias", vec![c], std_slice(&mut b.bias));
                push("running_mean", vec![c], std_slice(&mut b.running_mean));
                push("running_var", vec![c], std_slice(&mut b.running_var));
            }
            Layer::Sequential(s) | Layer::Residual(s) => slots(s, &path, out),
            _ => {}
        }
    }
}

/// Copies named tensors into the model's parameters.
///
/// With `strict`, every model parameter must be present, every key (other than
/// `num_batches_tracked`) must name a parameter, and every shape must match; otherwise
/// nothing is written and the error lists all the offending keys.
///
/// # Errors
/// [`QuantError::StateDictMismatch`] listing missing, unexpected and mis-shaped keys
/// (mis-shaped keys are errors even when not strict).
///
/// # Examples
/// ```
/// use std::collections::BTreeMap;
/// use ndarray::{Array2, ArrayD, IxDyn};
/// use ptq::nn::{Layer, Linear, Sequential};
/// let mut model = Sequential::new().push("fc", Layer::Linear(Linear::new(Array2::zeros((2, 3)), None)?));
/// let mut sd = BTreeMap::new();
/// sd.insert("fc.weight".to_string(), ArrayD::from_elem(IxDyn(&[2, 3]), 0.5f32));
/// let report = ptq::io::load_state_dict(&mut model, &sd, true)?;
/// assert_eq!(report.loaded, vec!["fc.weight"]);
/// sd.insert("fc.bias".to_string(), ArrayD::zeros(IxDyn(&[2])));
/// assert!(ptq::io::load_state_dict(&mut model, &sd, true).is_err()); // unexpected key
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn load_state_dict(
    model: &mut Sequential,
    state_dict: &BTreeMap<String, ArrayD<f32>>,
    strict: bool,
) -> Result<LoadReport> {
    let mut targets = Vec::new();
    slots(model, "", &mut targets);
    load_slots(targets, state_dict, strict)
}

/// The strict/non-strict copy shared by [`load_state_dict`] and
/// [`load_state_dict_graph`].
fn load_slots(
    targets: Vec<Slot<'_>>,
    state_dict: &BTreeMap<String, ArrayD<f32>>,
    strict: bool,
) -> Result<LoadReport> {
    let known: BTreeSet<String> = targets.iter().map(|s| s.name.clone()).collect();
    let mut report = LoadReport::default();
    let mut unexpected = Vec::new();
    for key in state_dict.keys() {
        if key.ends_with("num_batches_tracked") {
            report.ignored.push(key.clone());
        } else if !known.contains(key) {
            unexpected.push(key.clone());
        }
    }
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for slot in &targets {
        match state_dict.get(&slot.name) {
            None => missing.push(slot.name.clone()),
            Some(t) if t.shape() != slot.shape.as_slice() => mismatched.push(format!(
                "{}: model {:?}, file {:?}",
                slot.name,
                slot.shape,
                t.shape()
            )),
            Some(_) => {}
        }
    }
    if !mismatched.is_empty() || (strict && (!missing.is_empty() || !unexpected.is_empty())) {
        return Err(QuantError::StateDictMismatch {
            missing,
            unexpected,
            mismatched,
        });
    }
    for slot in targets {
        if let Some(t) = state_dict.get(&slot.name) {
            for (dst, src) in slot.target.iter_mut().zip(t.iter()) {
                *dst = *src;
            }
            report.loaded.push(slot.name);
        }
    }
    report.ignored.extend(unexpected);
    report.missing = missing;
    Ok(report)
}

/// Reads a safetensors `state_dict` file and loads it strictly into `model`.
///
/// # Errors
/// As [`read_safetensors`] and [`load_state_dict`].
pub fn load_safetensors(model: &mut Sequential, path: impl AsRef<Path>) -> Result<LoadReport> {
    let sd = read_safetensors(path)?;
    load_state_dict(model, &sd, true)
}

/// Copies named tensors into a graph's parameters, by node name (`"layer1.0.conv1"` +
/// `".weight"`), with the same strictness rules as [`load_state_dict`].
///
/// # Errors
/// [`QuantError::StateDictMismatch`] listing every missing, unexpected and mis-shaped key;
/// nothing is written then.
///
/// # Examples
/// ```
/// use std::collections::BTreeMap;
/// use ndarray::{Array2, ArrayD, IxDyn};
/// use ptq::graph::{Dim, GraphBuilder};
/// use ptq::nn::Linear;
/// let mut g = GraphBuilder::new();
/// let x = g.input("x", &[Dim::Batch, 3.into()])?;
/// let y = g.linear("fc", x, Linear::new(Array2::zeros((2, 3)), None)?)?;
/// g.output(y)?;
/// let mut graph = g.build()?;
/// let mut sd = BTreeMap::new();
/// sd.insert("fc.weight".to_string(), ArrayD::from_elem(IxDyn(&[2, 4]), 0.5f32));
/// let err = ptq::io::load_state_dict_graph(&mut graph, &sd, true).unwrap_err();
/// assert!(err.to_string().contains("fc.weight: model [2, 3], file [2, 4]"));
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn load_state_dict_graph(
    graph: &mut Graph,
    state_dict: &BTreeMap<String, ArrayD<f32>>,
    strict: bool,
) -> Result<LoadReport> {
    let mut targets = Vec::new();
    for node in graph.nodes_mut() {
        let prefix = node.name.clone();
        for (suffix, shape, target) in node.op.params_mut() {
            targets.push(Slot {
                name: format!("{prefix}.{suffix}"),
                target,
                shape,
            });
        }
    }
    load_slots(targets, state_dict, strict)
}

/// Reads a safetensors `state_dict` file and loads it strictly into `graph`.
///
/// # Errors
/// As [`read_safetensors`] and [`load_state_dict_graph`].
pub fn load_safetensors_graph(graph: &mut Graph, path: impl AsRef<Path>) -> Result<LoadReport> {
    let sd = read_safetensors(path)?;
    load_state_dict_graph(graph, &sd, true)
}
