//! ONNX import: float models exported by `torch.onnx.export` (the TorchScript-based and the
//! dynamo-based exporters, opsets 11 to 23) become a [`Graph`](crate::graph::Graph).
//!
//! ```no_run
//! use ptq::io::onnx::load_onnx;
//! let import = load_onnx("model.onnx")?;
//! let graph = &import.graph;
//! println!("{} nodes", graph.nodes().len());
//! # Ok::<(), ptq::QuantError>(())
//! ```
//!
//! * **Decoding** ([`OnnxModel::load`]): the ONNX protobuf schema (`onnx.proto` from ONNX
//!   1.23.2, Apache-2.0, vendored in `src/io/onnx/proto/`) is compiled to Rust by prost; the
//!   generated code is committed (`tools/regen_onnx_proto.sh` regenerates it), so building
//!   needs no `protoc`. Hostile files are refused with [`QuantError::InvalidFile`](crate::QuantError::InvalidFile), never a
//!   panic: the file size is limited, prost limits message nesting to 100 levels, each
//!   tensor's element count is computed with checked arithmetic and compared with the limit
//!   and with the bytes present before anything of that size is allocated, and external data
//!   is read only from relative paths inside the model's directory, within the file's length.
//! * **Import** ([`OnnxModel::to_graph`]): initializers and `Constant` nodes become
//!   parameters; shape arithmetic (`Shape`, `Gather`, `Unsqueeze`, `Concat`, `Cast`, `Slice`,
//!   integer `Add`/`Sub`/`Mul`/`Div`) is folded with the dynamic batch kept symbolic; a
//!   `BatchNormalization` right after a `Conv` is folded into it; `MatMul` with a constant
//!   weight (plus a constant `Add`) and `Gemm` become linear layers; every other supported
//!   op maps to one graph node whose output shape the builder infers statically. A model
//!   with unsupported ops is refused with **one** error listing every unsupported op type
//!   with its node names.
//! * **Names** follow PyTorch module paths (see [`OnnxModel::to_graph`]), so
//!   [`QConfigMap::set_name`](crate::qconfig::QConfigMap::set_name) and the per-layer
//!   reports work on imported models.

mod decode;
mod export;
mod import;

#[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
pub(crate) mod proto {
    include!("proto/onnx.rs");
}

use std::path::Path;

pub use decode::{
    AttrValue, OnnxDim, OnnxLimits, OnnxModel, OnnxNode, OnnxTensor, TensorData, ValueInfo,
    OPSET_RANGE,
};
pub use export::EXPORT_OPSET;
pub use import::{OnnxImport, SUPPORTED_OPS};

use crate::error::Result;

/// Loads an ONNX file and maps it onto a graph: [`OnnxModel::load`] then
/// [`OnnxModel::to_graph`].
///
/// # Errors
/// As those two functions.
pub fn load_onnx(path: impl AsRef<Path>) -> Result<OnnxImport> {
    OnnxModel::load(path)?.to_graph()
}
