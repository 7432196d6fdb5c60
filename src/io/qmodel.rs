//! Saving and loading quantized models.
//!
//! A [`QuantizedModel`] is saved as the `ptq-qmodel/2` file of its
//! [`QuantizedGraph`](crate::quant::QuantizedGraph) (see [`crate::quant::record`]): a
//! safetensors file whose tensors hold each int8 op's `i8` weights with their `f32` scales
//! and `i32` zero points, float biases and the `f32` parameters of nodes kept in float, and
//! whose string metadata holds the format version and every node as flat `key = value`
//! pairs. Floats are written in Rust's shortest round-trip notation, so a loaded model
//! gives bit-identical outputs.
//!
//! The `ptq-qmodel/1` files that earlier versions wrote for `Sequential` models (a list of
//! steps) are not read any more: loading one is an error naming that version; convert the
//! float model again and save it.
//!
//! This module also holds the container layer both use. Loading trusts nothing in the
//! file: the safetensors layer checks the header and that every tensor's offsets and byte
//! size match its shape (with checked arithmetic) inside the file; the readers then check
//! every tensor's dtype and rank, every shape against the others and the metadata, every
//! count against the file's size, scales (finite, positive, normal), zero points (in
//! range), hyperparameters (positive, at most [`MAX_HYPERPARAMETER`]), and that no tensor
//! is left unused. Every failure is a [`QuantError`] naming the node and key; nothing is
//! allocated beyond what the file's own bytes account for (plus the ops' packed forms).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use ndarray::{Array1, Array2, Array4};
use safetensors::tensor::{Metadata, TensorView};
use safetensors::{Dtype, SafeTensors};

use crate::error::{QuantError, Result};
use crate::nn::quantized::{Conv2dParams, QConv2d, QLinear, QuantizedModel};
use crate::qparams::{DType, QParams, QScheme};

/// The format version [`QuantizedModel::save`] writes (that of
/// [`QuantizedGraph::save`](crate::quant::QuantizedGraph::save)).
pub const FORMAT: &str = crate::quant::record::FORMAT;

/// The format of the `Sequential` model files earlier versions wrote; refused on load
/// with an error naming it.
pub const LEGACY_FORMAT: &str = "ptq-qmodel/1";

/// The largest kernel size, stride, padding, dilation, adaptive-pool output size or
/// flatten dimension a file may hold; larger values are refused as implausible (they
/// would only serve to make a forward pass allocate without bound).
pub const MAX_HYPERPARAMETER: usize = 1024;

impl QuantizedModel {
    /// Serializes the model to the bytes of a `ptq-qmodel/2` safetensors file (see
    /// [`crate::io::qmodel`]).
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] naming the layer when the model holds a
    /// [`Layer::Custom`](crate::nn::Layer::Custom) float layer, which has no file form.
    ///
    /// # Examples
    /// ```
    /// use ndarray::{Array1, Array2, ArrayD, IxDyn};
    /// use ptq::nn::quantized::QuantizedModel;
    /// use ptq::nn::{Layer, Linear, Sequential};
    /// use ptq::qconfig::{QConfig, QConfigMap};
    /// let model = Sequential::new()
    ///     .push("quant", Layer::QuantStub)
    ///     .push("fc", Layer::Linear(Linear::new(Array2::eye(2), Some(Array1::zeros(2)))?))
    ///     .push("dequant", Layer::DeQuantStub);
    /// let batches = vec![ArrayD::from_elem(IxDyn(&[3, 2]), 0.7f32)];
    /// let model = ptq::workflow::quantize_model(model, &QConfigMap::new(QConfig::fbgemm()), &batches)?;
    /// let bytes = model.to_bytes()?;
    /// let loaded = QuantizedModel::from_bytes(&bytes)?;
    /// assert_eq!(loaded.forward(&batches[0])?, model.forward(&batches[0])?);
    /// assert!(QuantizedModel::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.graph().to_bytes()
    }

    /// Writes the model to `path` (see [`QuantizedModel::to_bytes`]).
    ///
    /// # Errors
    /// As [`QuantizedModel::to_bytes`], and [`QuantError::InvalidFile`] if the file cannot
    /// be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.graph().save(path)
    }

    /// Reads a model saved by [`QuantizedModel::save`] (or a one-input, one-output graph
    /// saved by [`QuantizedGraph::save`](crate::quant::QuantizedGraph::save)); it gives
    /// bit-identical outputs.
    ///
    /// # Errors
    /// [`QuantError::InvalidFile`] for an unreadable, truncated, corrupt or hostile file,
    /// or a `ptq-qmodel/1` file (see [`QuantizedModel::from_bytes`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let (bytes, ctx) = crate::quant::record::read_file(path.as_ref())?;
        load_model(&bytes, &ctx)
    }

    /// Parses the bytes of a `ptq-qmodel/2` file. Nothing in the bytes is trusted.
    ///
    /// # Errors
    /// As [`QuantizedGraph::from_bytes`](crate::quant::QuantizedGraph::from_bytes)
    /// ([`QuantError::InvalidFile`] naming the node for anything wrong with the container,
    /// the metadata or a tensor, the ops' own constructor errors), and
    /// [`QuantError::InvalidFile`] naming the version for a `ptq-qmodel/1` file, or
    /// [`QuantError::UnsupportedConfig`] for a graph without exactly one input and one
    /// output.
    ///
    /// # Examples
    /// ```
    /// use ptq::nn::quantized::QuantizedModel;
    /// let err = QuantizedModel::from_bytes(b"\x02\0\0\0\0\0\0\0{}").unwrap_err();
    /// assert!(err.to_string().contains("invalid file"));
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        load_model(bytes, "bytes")
    }
}

fn load_model(bytes: &[u8], ctx: &str) -> Result<QuantizedModel> {
    let r = open_reader(bytes, ctx)?;
    if r.get("format")? == LEGACY_FORMAT {
        return Err(r.bad(format!(
            "this is a {LEGACY_FORMAT} file (a Sequential model saved by an earlier ptq); this \
             version reads {FORMAT} only: convert the float model again and save it"
        )));
    }
    QuantizedModel::from_graph(crate::quant::record::load(bytes, ctx)?)
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

#[derive(Default)]
pub(crate) struct Writer {
    pub(crate) meta: HashMap<String, String>,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

fn pair((a, b): (usize, usize)) -> String {
    format!("{a},{b}")
}

impl Writer {
    pub(crate) fn set(&mut self, key: String, value: impl ToString) {
        self.meta.insert(key, value.to_string());
    }

    pub(crate) fn f32s(&mut self, name: String, shape: &[usize], v: &[f32]) {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensors.push((name, Dtype::F32, shape.to_vec(), bytes));
    }

    pub(crate) fn i32s(&mut self, name: String, v: &[i32]) {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensors.push((name, Dtype::I32, vec![v.len()], bytes));
    }

    pub(crate) fn i8s(&mut self, name: String, shape: &[usize], v: impl Iterator<Item = i8>) {
        let bytes = v.map(|x| x as u8).collect();
        self.tensors.push((name, Dtype::I8, shape.to_vec(), bytes));
    }

    pub(crate) fn weight_qparams(&mut self, id: &str, qp: &QParams) {
        self.set(
            format!("{id}:per_channel"),
            qp.scheme().is_per_channel() as u8,
        );
        self.f32s(
            format!("{id}:weight_scales"),
            &[qp.scales().len()],
            qp.scales(),
        );
        self.i32s(format!("{id}:weight_zero_points"), qp.zero_points());
    }

    pub(crate) fn bias(&mut self, id: &str, bias: Option<&[f32]>) {
        if let Some(b) = bias {
            self.f32s(format!("{id}:bias"), &[b.len()], b);
        }
    }

    pub(crate) fn out_qparams(&mut self, id: &str, (s, z): (f32, i32)) {
        self.set(format!("{id}:out_scale"), s);
        self.set(format!("{id}:out_zero_point"), z);
    }

    pub(crate) fn linear(&mut self, id: &str, l: &QLinear) {
        let (w, qp) = l.quantized_weight();
        self.i8s(format!("{id}:weight"), w.shape(), w.iter().copied());
        self.weight_qparams(id, &qp);
        self.bias(id, l.bias());
        self.out_qparams(id, l.output_qparams());
    }

    pub(crate) fn conv(&mut self, id: &str, c: &QConv2d) {
        let (w, qp) = c.quantized_weight();
        self.i8s(format!("{id}:weight"), w.shape(), w.iter().copied());
        self.weight_qparams(id, &qp);
        self.bias(id, c.bias());
        self.out_qparams(id, c.output_qparams());
        self.conv_params(id, c.params());
    }

    pub(crate) fn conv_params(&mut self, id: &str, p: Conv2dParams) {
        self.set(format!("{id}:stride"), pair(p.stride));
        self.set(format!("{id}:padding"), pair(p.padding));
        self.set(format!("{id}:dilation"), pair(p.dilation));
        self.set(format!("{id}:groups"), p.groups);
    }

    pub(crate) fn finish(self) -> Result<Vec<u8>> {
        let bad = |e: safetensors::SafeTensorError| QuantError::InvalidFile {
            context: "QuantizedGraph::to_bytes".into(),
            reason: e.to_string(),
        };
        let mut views = Vec::with_capacity(self.tensors.len());
        for (name, dtype, shape, bytes) in &self.tensors {
            views.push((
                name.clone(),
                TensorView::new(*dtype, shape.clone(), bytes).map_err(bad)?,
            ));
        }
        safetensors::serialize(views, Some(self.meta)).map_err(bad)
    }
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

pub(crate) struct Reader<'a> {
    ctx: String,
    meta: HashMap<String, String>,
    info: Metadata,
    data: &'a [u8],
    used: HashSet<String>,
}

impl<'a> Reader<'a> {
    pub(crate) fn bad(&self, reason: String) -> QuantError {
        QuantError::InvalidFile {
            context: self.ctx.clone(),
            reason,
        }
    }

    pub(crate) fn get(&self, key: &str) -> Result<&str> {
        self.meta
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| self.bad(format!("missing metadata key `{key}`")))
    }

    pub(crate) fn parse<T: std::str::FromStr>(&self, key: &str) -> Result<T> {
        let v = self.get(key)?;
        v.parse()
            .map_err(|_| self.bad(format!("metadata `{key}` = {v:?} does not parse")))
    }

    /// A count of entries, each of which needs at least one metadata key.
    pub(crate) fn count(&self, key: &str) -> Result<usize> {
        let n: usize = self.parse(key)?;
        if n > self.meta.len() {
            return Err(self.bad(format!(
                "metadata `{key}` = {n} is more than the file's {} keys can describe",
                self.meta.len()
            )));
        }
        Ok(n)
    }

    pub(crate) fn flag(&self, key: &str) -> Result<bool> {
        match self.get(key)? {
            "0" => Ok(false),
            "1" => Ok(true),
            v => Err(self.bad(format!("metadata `{key}` = {v:?} is not 0 or 1"))),
        }
    }

    pub(crate) fn hyper(&self, key: &str, v: usize, min: usize) -> Result<usize> {
        if v < min || v > MAX_HYPERPARAMETER {
            return Err(self.bad(format!(
                "`{key}` = {v} is outside [{min}, {MAX_HYPERPARAMETER}]"
            )));
        }
        Ok(v)
    }

    pub(crate) fn pair(&self, key: &str, min: usize) -> Result<(usize, usize)> {
        let v = self.get(key)?;
        let (a, b) = v
            .split_once(',')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| self.bad(format!("metadata `{key}` = {v:?} is not `a,b`")))?;
        Ok((self.hyper(key, a, min)?, self.hyper(key, b, min)?))
    }

    /// A scale and zero point for `quint8` activations.
    pub(crate) fn act_qparams(&self, key_s: &str, s: f32, z: i64) -> Result<(f32, i32)> {
        let z = i32::try_from(z).unwrap_or(i32::MAX);
        QParams::per_tensor(s, z, DType::QUInt8).map_err(|e| e.in_context(key_s))?;
        Ok((s, z))
    }

    pub(crate) fn out_qparams(&self, id: &str) -> Result<(f32, i32)> {
        let s: f32 = self.parse(&format!("{id}:out_scale"))?;
        let z: i64 = self.parse(&format!("{id}:out_zero_point"))?;
        self.act_qparams(&format!("{id}:out_scale"), s, z)
    }

    /// The raw bytes and shape of tensor `name`, which must have `dtype` and `rank`.
    pub(crate) fn tensor(
        &mut self,
        name: &str,
        dtype: Dtype,
        rank: usize,
    ) -> Result<(Vec<usize>, &'a [u8])> {
        let info = self
            .info
            .info(name)
            .ok_or_else(|| self.bad(format!("missing tensor `{name}`")))?;
        if info.dtype != dtype || info.shape.len() != rank {
            return Err(self.bad(format!(
                "tensor `{name}` is {:?} {:?}; expected {dtype:?} of rank {rank}",
                info.dtype, info.shape
            )));
        }
        let (s, e) = info.data_offsets;
        let data: &'a [u8] = self.data;
        let bytes = data
            .get(s..e)
            .ok_or_else(|| self.bad(format!("tensor `{name}` lies outside the file")))?;
        let n = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.bitsize() / 8));
        if n != Some(bytes.len()) {
            return Err(self.bad(format!(
                "tensor `{name}` holds {} bytes for shape {:?}",
                bytes.len(),
                info.shape
            )));
        }
        let shape = info.shape.clone();
        self.used.insert(name.to_string());
        Ok((shape, bytes))
    }

    pub(crate) fn f32s(&mut self, name: &str, rank: usize) -> Result<(Vec<usize>, Vec<f32>)> {
        let (shape, b) = self.tensor(name, Dtype::F32, rank)?;
        let v: Vec<f32> = b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let bad = v.iter().filter(|x| !x.is_finite()).count();
        if bad > 0 {
            return Err(self.bad(format!(
                "tensor `{name}` holds {bad} NaN or infinite values"
            )));
        }
        Ok((shape, v))
    }

    pub(crate) fn i32s(&mut self, name: &str) -> Result<Vec<i32>> {
        let (_, b) = self.tensor(name, Dtype::I32, 1)?;
        Ok(b.chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    pub(crate) fn i8s(&mut self, name: &str, rank: usize) -> Result<(Vec<usize>, Vec<i8>)> {
        let (shape, b) = self.tensor(name, Dtype::I8, rank)?;
        Ok((shape, b.iter().map(|&x| x as i8).collect()))
    }

    /// An optional `[n]` float bias.
    pub(crate) fn bias(&mut self, id: &str, n: usize) -> Result<Option<Array1<f32>>> {
        let name = format!("{id}:bias");
        if self.info.info(&name).is_none() {
            return Ok(None);
        }
        let (shape, v) = self.f32s(&name, 1)?;
        if shape[0] != n {
            return Err(self.bad(format!(
                "tensor `{name}` has {} elements for {n} output channels",
                shape[0]
            )));
        }
        Ok(Some(Array1::from(v)))
    }

    pub(crate) fn weight_qparams(&mut self, id: &str, out: usize) -> Result<QParams> {
        let per_channel = self.flag(&format!("{id}:per_channel"))?;
        let scales_name = format!("{id}:weight_scales");
        let (_, scales) = self.f32s(&scales_name, 1)?;
        let zps = self.i32s(&format!("{id}:weight_zero_points"))?;
        let want = if per_channel { out } else { 1 };
        if scales.len() != want || zps.len() != want {
            return Err(self.bad(format!(
                "{} weight scales and {} zero points; expected {want}",
                scales.len(),
                zps.len()
            )));
        }
        let scheme = if per_channel {
            QScheme::PerChannelAffine { axis: 0 }
        } else {
            QScheme::PerTensorAffine
        };
        QParams::new(
            scheme,
            DType::QInt8,
            DType::QInt8.default_range(false),
            scales,
            zps,
        )
        .map_err(|e| e.in_context(&scales_name))
    }

    pub(crate) fn conv_params(&self, id: &str, c_out: usize) -> Result<Conv2dParams> {
        let groups: usize = self.parse(&format!("{id}:groups"))?;
        if groups == 0 || !c_out.is_multiple_of(groups) {
            return Err(self.bad(format!(
                "{groups} groups do not divide {c_out} output channels"
            )));
        }
        Ok(Conv2dParams {
            stride: self.pair(&format!("{id}:stride"), 1)?,
            padding: self.pair(&format!("{id}:padding"), 0)?,
            dilation: self.pair(&format!("{id}:dilation"), 1)?,
            groups,
        })
    }

    #[allow(clippy::type_complexity)]
    pub(crate) fn linear(
        &mut self,
        id: &str,
    ) -> Result<(Array2<i8>, QParams, Option<Array1<f32>>, f32, i32)> {
        let (shape, w) = self.i8s(&format!("{id}:weight"), 2)?;
        let (out, inp) = (shape[0], shape[1]);
        let qp = self.weight_qparams(id, out)?;
        let bias = self.bias(id, out)?;
        let (s, z) = self.out_qparams(id)?;
        let w = Array2::from_shape_vec((out, inp), w)
            .map_err(|e| self.bad(format!("tensor `{id}:weight`: {e}")))?;
        Ok((w, qp, bias, s, z))
    }

    #[allow(clippy::type_complexity)]
    pub(crate) fn conv(
        &mut self,
        id: &str,
    ) -> Result<(
        Array4<i8>,
        QParams,
        Option<Array1<f32>>,
        Conv2dParams,
        f32,
        i32,
    )> {
        let (shape, w) = self.i8s(&format!("{id}:weight"), 4)?;
        let (out, cig, kh, kw) = (shape[0], shape[1], shape[2], shape[3]);
        self.hyper(&format!("{id}:weight kernel height"), kh, 1)?;
        self.hyper(&format!("{id}:weight kernel width"), kw, 1)?;
        let qp = self.weight_qparams(id, out)?;
        let bias = self.bias(id, out)?;
        let (s, z) = self.out_qparams(id)?;
        let params = self.conv_params(id, out)?;
        let w = Array4::from_shape_vec((out, cig, kh, kw), w)
            .map_err(|e| self.bad(format!("tensor `{id}:weight`: {e}")))?;
        Ok((w, qp, bias, params, s, z))
    }
}

/// Opens the safetensors container of a `.qmodel` file for reading; `ctx` names it in
/// errors. The `format` key is not checked here.
pub(crate) fn open_reader<'a>(bytes: &'a [u8], ctx: &str) -> Result<Reader<'a>> {
    let bad = |reason: String| QuantError::InvalidFile {
        context: ctx.into(),
        reason,
    };
    let (n, info) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let data = 8usize
        .checked_add(n)
        .and_then(|start| bytes.get(start..))
        .ok_or_else(|| bad("the header runs past the end of the file".into()))?;
    let meta = info.metadata().clone().unwrap_or_default();
    Ok(Reader {
        ctx: ctx.to_string(),
        meta,
        info,
        data,
        used: HashSet::new(),
    })
}

impl Reader<'_> {
    /// Refuses tensors that nothing read.
    pub(crate) fn check_all_used(&self) -> Result<()> {
        let total = self.info.tensors().len();
        if self.used.len() != total {
            let mut unused: Vec<String> = self
                .info
                .tensors()
                .into_keys()
                .filter(|k| !self.used.contains(k))
                .collect();
            unused.sort();
            return Err(self.bad(format!("tensors no step uses: {unused:?}")));
        }
        Ok(())
    }

    /// Whether the file holds a tensor of this name.
    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        self.info.info(name).is_some()
    }
}
