//! Decoding an ONNX file into [`OnnxModel`]: the protobuf is parsed with prost (whose
//! nesting limit of 100 bounds recursion), then every tensor is validated (dims non-negative,
//! element count by checked arithmetic against the configured limit and against the bytes
//! actually present) before any buffer of that size is allocated. External data is read only
//! from files inside the model's directory.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use half::{bf16, f16};
use prost::Message;

use super::proto;
use crate::error::{QuantError, Result};

/// Size limits applied while loading an ONNX model. The defaults accept any model up to
/// protobuf's 2 GiB limit (plus external data) and refuse hostile sizes before allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnnxLimits {
    /// Largest model file, in bytes (default 2 GiB, protobuf's own limit).
    pub max_file_bytes: u64,
    /// Most elements in one tensor (default 2^31).
    pub max_tensor_elements: u64,
    /// Most bytes read from external-data files in all (default 16 GiB).
    pub max_external_bytes: u64,
}

impl Default for OnnxLimits {
    fn default() -> Self {
        OnnxLimits {
            max_file_bytes: 2 << 30,
            max_tensor_elements: 1 << 31,
            max_external_bytes: 16 << 30,
        }
    }
}

/// Element values of an [`OnnxTensor`]: floating-point types are converted to `f32`,
/// integer and boolean types to `i64`.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// `FLOAT`, `FLOAT16`, `BFLOAT16` or `DOUBLE` data as `f32`.
    Float(Vec<f32>),
    /// `INT8`..`INT64`, `UINT8`..`UINT32`, `BOOL` data as `i64`.
    Int(Vec<i64>),
}

/// A constant tensor of the model (an initializer or a `Constant` node's value).
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxTensor {
    /// Its dimensions.
    pub dims: Vec<usize>,
    /// Its values, row-major; as many as the product of `dims`.
    pub data: TensorData,
}

impl OnnxTensor {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            TensorData::Float(v) => v.len(),
            TensorData::Int(v) => v.len(),
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as `f32` (integers converted).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            TensorData::Float(v) => v.clone(),
            TensorData::Int(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The values as `i64`, `None` for a floating-point tensor.
    pub fn ints(&self) -> Option<&[i64]> {
        match &self.data {
            TensorData::Int(v) => Some(v),
            TensorData::Float(_) => None,
        }
    }
}

/// An attribute of an ONNX node.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// `INT`.
    Int(i64),
    /// `FLOAT`.
    Float(f32),
    /// `INTS`.
    Ints(Vec<i64>),
    /// `FLOATS`.
    Floats(Vec<f32>),
    /// `STRING` (lossy UTF-8).
    Str(String),
    /// `TENSOR`.
    Tensor(OnnxTensor),
    /// Any other kind (graphs, sparse tensors, type protos, string lists): kept by kind name
    /// so an op that needs it can say so.
    Other(&'static str),
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnnxDim {
    /// A fixed size.
    Fixed(usize),
    /// A symbolic (or unknown) size, by name (empty when unnamed).
    Dynamic(String),
}

/// A graph input or output: name, element type (ONNX `DataType` number) and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueInfo {
    /// The tensor name.
    pub name: String,
    /// ONNX element type number (1 = FLOAT), 0 when absent.
    pub elem_type: i32,
    /// The dims; `None` when the file gives no shape.
    pub dims: Option<Vec<OnnxDim>>,
}

/// One ONNX node, with its attributes decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxNode {
    /// The node's name in the file (may be empty).
    pub name: String,
    /// Operator type, e.g. `"Conv"`.
    pub op_type: String,
    /// Operator domain (`""` for the default ONNX domain).
    pub domain: String,
    /// Input tensor names (`""` marks an omitted optional input).
    pub inputs: Vec<String>,
    /// Output tensor names.
    pub outputs: Vec<String>,
    /// Attributes by name.
    pub attrs: BTreeMap<String, AttrValue>,
    /// The module path the dynamo exporter records in the `namespace` metadata, if any.
    pub namespace: Option<String>,
}

/// A decoded, validated ONNX model: the graph's nodes, initializers, inputs and outputs.
/// Turn it into a [`Graph`](crate::graph::Graph) with [`OnnxModel::to_graph`].
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxModel {
    /// Version of the default (`ai.onnx`) operator set.
    pub opset: i64,
    /// `producer_name` and `producer_version`, e.g. `"pytorch 2.15.0"`.
    pub producer: String,
    /// Graph inputs that are not initializers.
    pub inputs: Vec<ValueInfo>,
    /// Graph outputs.
    pub outputs: Vec<ValueInfo>,
    /// Initializers by name.
    pub initializers: BTreeMap<String, OnnxTensor>,
    /// Nodes in file order (ONNX requires topological order).
    pub nodes: Vec<OnnxNode>,
}

/// Oldest and newest default-domain opsets the importer accepts.
pub const OPSET_RANGE: (i64, i64) = (11, 23);

pub(crate) fn bad(context: &str, reason: impl Into<String>) -> QuantError {
    QuantError::InvalidFile {
        context: context.to_string(),
        reason: reason.into(),
    }
}

struct Ctx<'a> {
    file: &'a str,
    dir: Option<&'a Path>,
    limits: OnnxLimits,
    external_read: u64,
}

impl OnnxModel {
    /// Loads an ONNX file with the default [`OnnxLimits`]; external data is read from the
    /// file's directory.
    ///
    /// # Errors
    /// [`QuantError::InvalidFile`] if the file cannot be read, is larger than the limit, is
    /// not a valid ONNX protobuf, has a tensor whose size disagrees with its data or exceeds
    /// the limits, or names external data outside its directory.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(path, OnnxLimits::default())
    }

    /// [`OnnxModel::load`] with explicit limits.
    ///
    /// # Errors
    /// As [`OnnxModel::load`].
    pub fn load_with(path: impl AsRef<Path>, limits: OnnxLimits) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let io = |e: std::io::Error| bad(&name, e.to_string());
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > limits.max_file_bytes {
            return Err(bad(
                &name,
                format!(
                    "file is {len} bytes, over the limit of {} bytes",
                    limits.max_file_bytes
                ),
            ));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        std::fs::File::open(path)
            .map_err(io)?
            .take(limits.max_file_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let dir = path.parent().map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        });
        Self::decode(&bytes, &name, dir.as_deref(), limits)
    }

    /// Decodes a model from bytes. Without `dir`, a model with external data is refused.
    ///
    /// # Errors
    /// As [`OnnxModel::load`]; `name` labels the errors.
    pub fn from_bytes(bytes: &[u8], name: &str, dir: Option<&Path>) -> Result<Self> {
        Self::decode(bytes, name, dir, OnnxLimits::default())
    }

    /// [`OnnxModel::from_bytes`] with explicit limits.
    ///
    /// # Errors
    /// As [`OnnxModel::load`].
    pub fn decode(
        bytes: &[u8],
        name: &str,
        dir: Option<&Path>,
        limits: OnnxLimits,
    ) -> Result<Self> {
        if bytes.len() as u64 > limits.max_file_bytes {
            return Err(bad(
                name,
                format!(
                    "{} bytes, over the limit of {} bytes",
                    bytes.len(),
                    limits.max_file_bytes
                ),
            ));
        }
        let model = proto::ModelProto::decode(bytes)
            .map_err(|e| bad(name, format!("not an ONNX model protobuf: {e}")))?;
        let mut ctx = Ctx {
            file: name,
            dir,
            limits,
            external_read: 0,
        };
        convert_model(model, &mut ctx)
    }

    /// The initializer of this name.
    pub fn initializer(&self, name: &str) -> Option<&OnnxTensor> {
        self.initializers.get(name)
    }
}

fn convert_model(m: proto::ModelProto, ctx: &mut Ctx<'_>) -> Result<OnnxModel> {
    let file = ctx.file;
    let opset = m
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .ok_or_else(|| bad(file, "no opset_import for the default ONNX domain"))?;
    if opset < OPSET_RANGE.0 || opset > OPSET_RANGE.1 {
        return Err(QuantError::UnsupportedConfig {
            context: file.to_string(),
            reason: format!(
                "ONNX opset {opset}; the importer reads opsets {} to {} (re-export with \
                 opset_version in that range)",
                OPSET_RANGE.0, OPSET_RANGE.1
            ),
        });
    }
    let producer = format!(
        "{} {}",
        m.producer_name.unwrap_or_default(),
        m.producer_version.unwrap_or_default()
    )
    .trim()
    .to_string();
    let g = m.graph.ok_or_else(|| bad(file, "the model has no graph"))?;
    if !g.sparse_initializer.is_empty() {
        return Err(QuantError::UnsupportedConfig {
            context: file.to_string(),
            reason: "sparse initializers are not supported".into(),
        });
    }
    let mut initializers = BTreeMap::new();
    for t in &g.initializer {
        let tname = t.name.clone().unwrap_or_default();
        if tname.is_empty() {
            return Err(bad(file, "an initializer has no name"));
        }
        let tensor = convert_tensor(t, &tname, ctx)?;
        if initializers.insert(tname.clone(), tensor).is_some() {
            return Err(bad(file, format!("initializer {tname:?} is defined twice")));
        }
    }
    let inputs = g
        .input
        .iter()
        .map(value_info)
        .filter(|v| !initializers.contains_key(&v.name))
        .collect();
    let outputs = g.output.iter().map(value_info).collect();
    let mut nodes = Vec::with_capacity(g.node.len());
    for (i, n) in g.node.iter().enumerate() {
        nodes.push(convert_node(n, i, ctx)?);
    }
    Ok(OnnxModel {
        opset,
        producer,
        inputs,
        outputs,
        initializers,
        nodes,
    })
}

fn value_info(v: &proto::ValueInfoProto) -> ValueInfo {
    let mut elem_type = 0;
    let mut dims = None;
    if let Some(proto::type_proto::Value::TensorType(t)) =
        v.r#type.as_ref().and_then(|t| t.value.as_ref())
    {
        elem_type = t.elem_type.unwrap_or(0);
        dims = t.shape.as_ref().map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(proto::tensor_shape_proto::dimension::Value::DimValue(n))
                        if *n >= 0 && usize::try_from(*n).is_ok() =>
                    {
                        OnnxDim::Fixed(*n as usize)
                    }
                    Some(proto::tensor_shape_proto::dimension::Value::DimParam(p)) => {
                        OnnxDim::Dynamic(p.clone())
                    }
                    _ => OnnxDim::Dynamic(String::new()),
                })
                .collect()
        });
    }
    ValueInfo {
        name: v.name.clone().unwrap_or_default(),
        elem_type,
        dims,
    }
}

fn convert_node(n: &proto::NodeProto, index: usize, ctx: &mut Ctx<'_>) -> Result<OnnxNode> {
    let name = n.name.clone().unwrap_or_default();
    let label = if name.is_empty() {
        format!("{} node #{index}", ctx.file)
    } else {
        format!("{} node {name:?}", ctx.file)
    };
    let mut attrs = BTreeMap::new();
    for a in &n.attribute {
        let aname = a.name.clone().unwrap_or_default();
        let v = convert_attr(a, &format!("{label} attribute {aname:?}"), ctx)?;
        attrs.insert(aname, v);
    }
    let namespace = n
        .metadata_props
        .iter()
        .find(|p| p.key.as_deref() == Some("namespace"))
        .and_then(|p| p.value.clone());
    Ok(OnnxNode {
        name,
        op_type: n.op_type.clone().unwrap_or_default(),
        domain: n.domain.clone().unwrap_or_default(),
        inputs: n.input.clone(),
        outputs: n.output.clone(),
        attrs,
        namespace,
    })
}

fn convert_attr(a: &proto::AttributeProto, label: &str, ctx: &mut Ctx<'_>) -> Result<AttrValue> {
    use proto::attribute_proto::AttributeType as T;
    let ty = a.r#type.and_then(|t| T::try_from(t).ok());
    // old files may omit the type: infer it from the field that is set
    let ty = ty.unwrap_or(if a.t.is_some() {
        T::Tensor
    } else if !a.ints.is_empty() {
        T::Ints
    } else if !a.floats.is_empty() {
        T::Floats
    } else if a.s.is_some() {
        T::String
    } else if a.f.is_some() {
        T::Float
    } else {
        T::Int
    });
    Ok(match ty {
        T::Int => AttrValue::Int(a.i.unwrap_or(0)),
        T::Float => AttrValue::Float(a.f.unwrap_or(0.0)),
        T::Ints => AttrValue::Ints(a.ints.clone()),
        T::Floats => AttrValue::Floats(a.floats.clone()),
        T::String => AttrValue::Str(String::from_utf8_lossy(a.s.as_deref().unwrap_or(&[])).into()),
        T::Tensor => match &a.t {
            Some(t) => AttrValue::Tensor(convert_tensor(t, label, ctx)?),
            None => {
                return Err(bad(
                    ctx.file,
                    format!("{label}: TENSOR attribute without a tensor"),
                ))
            }
        },
        T::Graph | T::Graphs => AttrValue::Other("graph"),
        T::SparseTensor | T::SparseTensors => AttrValue::Other("sparse tensor"),
        T::TypeProto | T::TypeProtos => AttrValue::Other("type proto"),
        T::Strings => AttrValue::Other("strings"),
        T::Tensors => AttrValue::Other("tensors"),
        T::Undefined => AttrValue::Other("undefined"),
    })
}

/// Bytes per element of the data types we read, `None` for the others.
fn elem_size(dt: i32) -> Option<(usize, &'static str)> {
    use proto::tensor_proto::DataType as D;
    Some(match D::try_from(dt).ok()? {
        D::Float => (4, "FLOAT"),
        D::Double => (8, "DOUBLE"),
        D::Float16 => (2, "FLOAT16"),
        D::Bfloat16 => (2, "BFLOAT16"),
        D::Int8 => (1, "INT8"),
        D::Uint8 => (1, "UINT8"),
        D::Bool => (1, "BOOL"),
        D::Int16 => (2, "INT16"),
        D::Uint16 => (2, "UINT16"),
        D::Int32 => (4, "INT32"),
        D::Uint32 => (4, "UINT32"),
        D::Int64 => (8, "INT64"),
        _ => return None,
    })
}

fn convert_tensor(t: &proto::TensorProto, label: &str, ctx: &mut Ctx<'_>) -> Result<OnnxTensor> {
    use proto::tensor_proto::DataType as D;
    let file = ctx.file;
    let err = |r: String| bad(file, format!("tensor {label:?}: {r}"));
    let mut dims = Vec::with_capacity(t.dims.len().min(64));
    let mut n: u64 = 1;
    for &d in &t.dims {
        if d < 0 {
            return Err(err(format!("negative dimension {d} in dims {:?}", t.dims)));
        }
        n = n
            .checked_mul(d as u64)
            .filter(|&n| n <= ctx.limits.max_tensor_elements)
            .ok_or_else(|| {
                err(format!(
                    "dims {:?} hold more than the limit of {} elements",
                    t.dims, ctx.limits.max_tensor_elements
                ))
            })?;
        dims.push(d as usize);
    }
    let dt = t.data_type.unwrap_or(0);
    let (size, dt_name) = elem_size(dt).ok_or_else(|| {
        let name = D::try_from(dt)
            .map(|d| d.as_str_name())
            .unwrap_or("unknown");
        err(format!("unsupported data type {dt} ({name})"))
    })?;
    let n = usize::try_from(n)
        .ok()
        .filter(|n| n.checked_mul(size).is_some())
        .ok_or_else(|| err(format!("dims {:?} are too large for this machine", t.dims)))?;
    let external = t.data_location == Some(proto::tensor_proto::DataLocation::External as i32);
    let raw: Option<Vec<u8>> = if external {
        Some(read_external(t, n * size, label, ctx)?)
    } else {
        None
    };
    let raw = raw.as_deref().or(t.raw_data.as_deref());
    let data = if let Some(raw) = raw {
        if raw.len() != n * size {
            return Err(err(format!(
                "raw data holds {} bytes; dims {:?} of {dt_name} need {}",
                raw.len(),
                t.dims,
                n * size
            )));
        }
        let c = raw.chunks_exact(size);
        match D::try_from(dt).map_err(|_| err("bad data type".into()))? {
            D::Float => TensorData::Float(
                c.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            D::Double => TensorData::Float(
                c.map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                    .collect(),
            ),
            D::Float16 => TensorData::Float(
                c.map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
            ),
            D::Bfloat16 => TensorData::Float(
                c.map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
            ),
            D::Int8 => TensorData::Int(c.map(|b| b[0] as i8 as i64).collect()),
            D::Uint8 | D::Bool => TensorData::Int(c.map(|b| b[0] as i64).collect()),
            D::Int16 => {
                TensorData::Int(c.map(|b| i16::from_le_bytes([b[0], b[1]]) as i64).collect())
            }
            D::Uint16 => {
                TensorData::Int(c.map(|b| u16::from_le_bytes([b[0], b[1]]) as i64).collect())
            }
            D::Int32 => TensorData::Int(
                c.map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                    .collect(),
            ),
            D::Uint32 => TensorData::Int(
                c.map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                    .collect(),
            ),
            D::Int64 => TensorData::Int(
                c.map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect(),
            ),
            _ => return Err(err(format!("unsupported data type {dt_name}"))),
        }
    } else {
        let check = |len: usize, field: &str| {
            if len == n {
                Ok(())
            } else {
                Err(err(format!(
                    "{field} holds {len} values; dims {:?} need {n}",
                    t.dims
                )))
            }
        };
        match D::try_from(dt).map_err(|_| err("bad data type".into()))? {
            D::Float => {
                check(t.float_data.len(), "float_data")?;
                TensorData::Float(t.float_data.clone())
            }
            D::Double => {
                check(t.double_data.len(), "double_data")?;
                TensorData::Float(t.double_data.iter().map(|&x| x as f32).collect())
            }
            D::Float16 => {
                check(t.int32_data.len(), "int32_data")?;
                TensorData::Float(
                    t.int32_data
                        .iter()
                        .map(|&x| f16::from_bits(x as u16).to_f32())
                        .collect(),
                )
            }
            D::Bfloat16 => {
                check(t.int32_data.len(), "int32_data")?;
                TensorData::Float(
                    t.int32_data
                        .iter()
                        .map(|&x| bf16::from_bits(x as u16).to_f32())
                        .collect(),
                )
            }
            D::Int64 => {
                check(t.int64_data.len(), "int64_data")?;
                TensorData::Int(t.int64_data.clone())
            }
            D::Uint32 => {
                check(t.uint64_data.len(), "uint64_data")?;
                TensorData::Int(t.uint64_data.iter().map(|&x| x as i64).collect())
            }
            _ => {
                check(t.int32_data.len(), "int32_data")?;
                TensorData::Int(t.int32_data.iter().map(|&x| x as i64).collect())
            }
        }
    };
    Ok(OnnxTensor { dims, data })
}

/// Reads `expected` bytes of an external-data tensor, after checking that its `location`
/// stays inside the model's directory and that offset and length fit the file.
fn read_external(
    t: &proto::TensorProto,
    expected: usize,
    label: &str,
    ctx: &mut Ctx<'_>,
) -> Result<Vec<u8>> {
    let file = ctx.file;
    let err = |r: String| bad(file, format!("tensor {label:?} external data: {r}"));
    let get = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key.as_deref() == Some(k))
            .and_then(|e| e.value.clone())
    };
    let location = get("location").ok_or_else(|| err("no location".into()))?;
    let parse = |k: &str| -> Result<Option<u64>> {
        get(k)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| err(format!("{k} {v:?} is not a non-negative integer")))
            })
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let length = parse("length")?;
    if let Some(l) = length {
        if l != expected as u64 {
            return Err(err(format!(
                "length {l} disagrees with the dims ({expected} bytes)"
            )));
        }
    }
    let dir = ctx.dir.ok_or_else(|| {
        err("the model was given as bytes without a directory to read external data from".into())
    })?;
    let rel = Path::new(&location);
    if location.is_empty()
        || rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(err(format!(
            "location {location:?} must be a relative path inside the model's directory"
        )));
    }
    let full = dir.join(rel);
    let canon_dir = dir
        .canonicalize()
        .map_err(|e| err(format!("model directory {}: {e}", dir.display())))?;
    let canon = full
        .canonicalize()
        .map_err(|e| err(format!("{}: {e}", full.display())))?;
    if !canon.starts_with(&canon_dir) {
        return Err(err(format!(
            "location {location:?} resolves outside the model's directory"
        )));
    }
    let mut f =
        std::fs::File::open(&canon).map_err(|e| err(format!("{}: {e}", canon.display())))?;
    let flen = f.metadata().map_err(|e| err(e.to_string()))?.len();
    let end = offset
        .checked_add(expected as u64)
        .filter(|&e| e <= flen)
        .ok_or_else(|| {
            err(format!(
                "offset {offset} + {expected} bytes runs past the end of {location:?} ({flen} bytes)"
            ))
        })?;
    let total = ctx
        .external_read
        .checked_add(expected as u64)
        .filter(|&x| x <= ctx.limits.max_external_bytes)
        .ok_or_else(|| {
            err(format!(
                "external data over the limit of {} bytes",
                ctx.limits.max_external_bytes
            ))
        })?;
    ctx.external_read = total;
    let _ = end;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| err(e.to_string()))?;
    let mut buf = vec![0u8; expected];
    f.read_exact(&mut buf).map_err(|e| err(e.to_string()))?;
    Ok(buf)
}
