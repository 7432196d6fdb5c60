//! Saving and loading quantized models: the `ptq-qmodel/1` format.
//!
//! A saved [`QuantizedModel`] is a safetensors file. Its tensors hold each int8 layer's
//! `i8` weights with their `f32` scales and `i32` zero points, float biases, and the `f32`
//! parameters of layers kept in float; its string metadata holds the format version
//! (`format = ptq-qmodel/1`) and the architecture as flat `key = value` pairs, one family
//! of keys per step (`3:op = Conv2d`, `3:stride = 1,1`, `3:out_scale = 0.0123`, ...;
//! residual bodies are steps `3.0`, `3.1`, ...). Floats are written in Rust's shortest
//! round-trip notation, so a loaded model gives bit-identical outputs.
//!
//! Loading trusts nothing in the file: the safetensors layer checks the header and that
//! every tensor's offsets and byte size match its shape (with checked arithmetic) inside
//! the file; this module then checks every tensor's dtype and rank, every shape against the
//! others and the metadata, every count against the file's size, nesting depth, scales
//! (finite, positive, normal), zero points (in range), hyperparameters (positive, at most
//! [`MAX_HYPERPARAMETER`]), and that no tensor is left unused. Every failure is a
//! [`QuantError`] naming the step and key; nothing is allocated beyond what the file's own
//! bytes account for (plus the layers' packed forms).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use ndarray::{Array1, Array2, Array4};
use safetensors::tensor::{Metadata, TensorView};
use safetensors::{Dtype, SafeTensors};

use crate::error::{QuantError, Result};
use crate::nn::quantized::{
    Conv2dParams, QAdaptiveAvgPool2d, QAdd, QAvgPool2d, QConv2d, QConvReLU2d, QLinear, QLinearReLU,
    QMaxPool2d, QOp, QStep, QuantizedModel, TorchLayout,
};
use crate::nn::{BatchNorm2d, Conv2d, Layer, Linear, Pool2d, PoolKind, Sequential};
use crate::qparams::{DType, QParams, QScheme};

/// The format version written in the `format` metadata key.
pub const FORMAT: &str = "ptq-qmodel/1";

/// The deepest nesting of residual bodies and float containers a file may hold.
pub const MAX_DEPTH: usize = 32;

/// The largest kernel size, stride, padding, dilation, adaptive-pool output size or
/// flatten dimension a file may hold; larger values are refused as implausible (they
/// would only serve to make a forward pass allocate without bound).
pub const MAX_HYPERPARAMETER: usize = 1024;

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

fn layout_name(l: TorchLayout) -> &'static str {
    match l {
        TorchLayout::ChannelsLast => "channels_last",
        TorchLayout::Contiguous => "contiguous",
    }
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

    pub(crate) fn quant(&mut self, key: String, q: Option<(f32, i32)>) {
        match q {
            None => self.set(key, "none"),
            Some((s, z)) => self.set(key, format!("{s},{z}")),
        }
    }

    pub(crate) fn steps(&mut self, prefix: &str, steps: &[QStep]) -> Result<()> {
        let count_key = if prefix.is_empty() {
            "steps".to_string()
        } else {
            format!("{prefix}:body")
        };
        self.set(count_key, steps.len());
        for (i, step) in steps.iter().enumerate() {
            let id = if prefix.is_empty() {
                i.to_string()
            } else {
                format!("{prefix}.{i}")
            };
            self.step(&id, step)?;
        }
        Ok(())
    }

    pub(crate) fn step(&mut self, id: &str, step: &QStep) -> Result<()> {
        self.set(format!("{id}:path"), &step.path);
        let op = |w: &mut Self, name: &str| w.set(format!("{id}:op"), name);
        match &step.op {
            QOp::Quantize { scale, zero_point } => {
                op(self, "Quantize");
                self.out_qparams(id, (*scale, *zero_point));
            }
            QOp::Dequantize => op(self, "Dequantize"),
            QOp::Float(layer) => {
                op(self, "Float");
                self.layer(&format!("{id}:L"), layer, &step.path)?;
            }
            QOp::Linear(l) => {
                op(self, "Linear");
                self.linear(id, l);
            }
            QOp::LinearReLU(l) => {
                op(self, "LinearReLU");
                self.linear(id, l.inner());
            }
            QOp::Conv2d(c) => {
                op(self, "Conv2d");
                self.conv(id, c);
            }
            QOp::ConvReLU2d(c) => {
                op(self, "ConvReLU2d");
                self.conv(id, c.inner());
            }
            QOp::ReLU => op(self, "ReLU"),
            QOp::ReLU6 { q6 } => {
                op(self, "ReLU6");
                self.set(format!("{id}:q6"), q6);
            }
            QOp::MaxPool2d(p) => {
                op(self, "MaxPool2d");
                self.set(format!("{id}:kernel"), pair(p.kernel()));
                self.set(format!("{id}:stride"), pair(p.stride()));
                self.set(format!("{id}:padding"), pair(p.padding()));
                self.set(format!("{id}:dilation"), pair(p.dilation()));
                if p.ceil_mode() {
                    self.set(format!("{id}:ceil_mode"), 1u8);
                }
            }
            QOp::AvgPool2d(p) => {
                op(self, "AvgPool2d");
                self.set(format!("{id}:kernel"), pair(p.kernel()));
                self.set(format!("{id}:stride"), pair(p.stride()));
                self.set(format!("{id}:padding"), pair(p.padding()));
                self.set(
                    format!("{id}:count_include_pad"),
                    p.count_include_pad() as u8,
                );
                self.set(format!("{id}:layout"), layout_name(p.layout()));
                if p.ceil_mode() {
                    self.set(format!("{id}:ceil_mode"), 1u8);
                }
            }
            QOp::AdaptiveAvgPool2d(p) => {
                op(self, "AdaptiveAvgPool2d");
                self.set(format!("{id}:output"), pair(p.output_size()));
                self.set(format!("{id}:layout"), layout_name(p.layout()));
            }
            QOp::Flatten { start_dim } => {
                op(self, "Flatten");
                self.set(format!("{id}:start_dim"), start_dim);
            }
            QOp::Identity => op(self, "Identity"),
            QOp::Residual {
                body,
                skip_quant,
                body_quant,
                add,
            } => {
                op(self, "Residual");
                self.quant(format!("{id}:skip_quant"), *skip_quant);
                self.quant(format!("{id}:body_quant"), *body_quant);
                match add {
                    None => self.set(format!("{id}:add"), "float"),
                    Some(a) => {
                        self.set(format!("{id}:add"), "int8");
                        self.out_qparams(id, a.output_qparams());
                        self.set(format!("{id}:add_relu"), a.is_relu() as u8);
                        self.set(format!("{id}:layout"), layout_name(a.layout()));
                    }
                }
                self.steps(id, body)?;
            }
        }
        Ok(())
    }

    pub(crate) fn layer(&mut self, lp: &str, layer: &Layer, path: &str) -> Result<()> {
        let kind = |w: &mut Self, k: &str| w.set(format!("{lp}:kind"), k);
        match layer {
            Layer::Conv2d(c) | Layer::ConvReLU2d(c) => {
                kind(self, layer.type_name());
                self.f32s(
                    format!("{lp}:weight"),
                    c.weight.shape(),
                    &c.weight.iter().copied().collect::<Vec<_>>(),
                );
                let b = c.bias.as_ref().map(|b| b.to_vec());
                self.bias(lp, b.as_deref());
                self.conv_params(
                    lp,
                    Conv2dParams {
                        stride: c.stride,
                        padding: c.padding,
                        dilation: c.dilation,
                        groups: c.groups,
                    },
                );
            }
            Layer::Linear(l) | Layer::LinearReLU(l) => {
                kind(self, layer.type_name());
                self.f32s(
                    format!("{lp}:weight"),
                    l.weight.shape(),
                    &l.weight.iter().copied().collect::<Vec<_>>(),
                );
                let b = l.bias.as_ref().map(|b| b.to_vec());
                self.bias(lp, b.as_deref());
            }
            Layer::BatchNorm2d(b) => {
                kind(self, "BatchNorm2d");
                let c = b.channels();
                for (name, v) in [
                    ("weight", &b.weight),
                    ("bias", &b.bias),
                    ("running_mean", &b.running_mean),
                    ("running_var", &b.running_var),
                ] {
                    self.f32s(format!("{lp}:{name}"), &[c], &v.to_vec());
                }
                self.set(format!("{lp}:eps"), b.eps);
            }
            Layer::Pool2d(p) => {
                kind(self, "Pool2d");
                let k = match p.kind {
                    PoolKind::Max => "max",
                    PoolKind::Avg => "avg",
                };
                self.set(format!("{lp}:pool"), k);
                self.set(format!("{lp}:kernel"), pair(p.kernel));
                self.set(format!("{lp}:stride"), pair(p.stride));
                self.set(format!("{lp}:padding"), pair(p.padding));
            }
            Layer::AdaptiveAvgPool2d(o) => {
                kind(self, "AdaptiveAvgPool2d");
                self.set(format!("{lp}:output"), pair(*o));
            }
            Layer::Flatten { start_dim } => {
                kind(self, "Flatten");
                self.set(format!("{lp}:start_dim"), start_dim);
            }
            Layer::ReLU
            | Layer::ReLU6
            | Layer::Dropout
            | Layer::Identity
            | Layer::QuantStub
            | Layer::DeQuantStub => kind(self, layer.type_name()),
            Layer::Sequential(s) | Layer::Residual(s) => {
                kind(self, layer.type_name());
                self.set(format!("{lp}:n"), s.children().len());
                for (i, (name, child)) in s.children().iter().enumerate() {
                    let cp = format!("{lp}.{i}");
                    self.set(format!("{cp}:name"), name);
                    self.layer(&cp, child, &format!("{path}.{name}"))?;
                }
            }
            Layer::Custom(m) => {
                return Err(QuantError::UnsupportedConfig {
                    context: path.to_string(),
                    reason: format!(
                        "the custom layer `{}` cannot be saved: only ptq's own layers have a file form; \
                         replace it with built-in layers or rebuild the model after loading",
                        m.type_name()
                    ),
                })
            }
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> Result<Vec<u8>> {
        let bad = |e: safetensors::SafeTensorError| QuantError::InvalidFile {
            context: "QuantizedModel::to_bytes".into(),
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

impl QuantizedModel {
    /// Serializes the model to the bytes of a `ptq-qmodel/1` safetensors file (see
    /// [`crate::io::qmodel`]).
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] naming the layer when the model holds a
    /// [`Layer::Custom`] float layer, which has no file form.
    ///
    /// # Examples
    /// ```
    /// use ndarray::{array, ArrayD, IxDyn};
    /// use ptq::nn::quantized::{QLinear, QOp, QStep, QuantizedModel};
    /// use ptq::{DType, QParams};
    /// let fc = QLinear::from_quantized(array![[1i8, -2], [3, 4]].view(),
    ///     &QParams::per_tensor(0.1, 0, DType::QInt8)?, None, 0.05, 128)?;
    /// let step = |path: &str, op| QStep { path: path.into(), op };
    /// let model = QuantizedModel::from_steps(vec![
    ///     step("quant", QOp::Quantize { scale: 0.02, zero_point: 10 }),
    ///     step("fc", QOp::Linear(fc)),
    ///     step("dequant", QOp::Dequantize),
    /// ], 24);
    /// let bytes = model.to_bytes()?;
    /// let loaded = QuantizedModel::from_bytes(&bytes)?;
    /// let x = ArrayD::from_elem(IxDyn(&[3, 2]), 0.7f32);
    /// assert_eq!(loaded.forward(&x)?, model.forward(&x)?);
    /// assert!(QuantizedModel::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut w = Writer::default();
        w.set("format".into(), FORMAT);
        w.set("float_weight_bytes".into(), self.float_weight_bytes);
        w.steps("", &self.steps)?;
        w.finish()
    }

    /// Writes the model to `path` (see [`QuantizedModel::to_bytes`]).
    ///
    /// # Errors
    /// As [`QuantizedModel::to_bytes`], and [`QuantError::InvalidFile`] if the file cannot
    /// be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|e| QuantError::InvalidFile {
            context: path.display().to_string(),
            reason: format!("cannot write: {e}"),
        })
    }

    /// Reads a model saved by [`QuantizedModel::save`]; it gives bit-identical outputs.
    ///
    /// # Errors
    /// [`QuantError::InvalidFile`] for an unreadable, truncated, corrupt or hostile file
    /// (see [`QuantizedModel::from_bytes`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let ctx = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| QuantError::InvalidFile {
            context: ctx.clone(),
            reason: e.to_string(),
        })?;
        load_qmodel(&bytes, &ctx)
    }

    /// Parses the bytes of a `ptq-qmodel/1` file. Nothing in the bytes is trusted.
    ///
    /// # Errors
    /// [`QuantError::InvalidFile`] (context: `"bytes: step <id> (<path>)"`) for anything
    /// wrong with the container, the metadata or a tensor: not safetensors, another format
    /// version, a missing or unparsable key, a tensor of the wrong dtype or shape, counts or
    /// nesting beyond what the file can hold, an unused tensor; the layers' own
    /// constructor errors ([`QuantError::InvalidScale`], [`QuantError::InvalidZeroPoint`],
    /// [`QuantError::UnsupportedConfig`], [`QuantError::NonFinite`], ...) re-labelled with
    /// the same context.
    ///
    /// # Examples
    /// ```
    /// use ptq::nn::quantized::QuantizedModel;
    /// let err = QuantizedModel::from_bytes(b"\x02\0\0\0\0\0\0\0{}").unwrap_err();
    /// assert!(err.to_string().contains("invalid file"));
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        load_qmodel(bytes, "bytes")
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

fn parse_layout(s: &str) -> Option<TorchLayout> {
    match s {
        "channels_last" => Some(TorchLayout::ChannelsLast),
        "contiguous" => Some(TorchLayout::Contiguous),
        _ => None,
    }
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

    /// A flag that older files do not have (absent = false).
    fn opt_flag(&self, key: &str) -> Result<bool> {
        if self.meta.contains_key(key) {
            self.flag(key)
        } else {
            Ok(false)
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

    pub(crate) fn layout(&self, key: &str) -> Result<TorchLayout> {
        let v = self.get(key)?;
        parse_layout(v).ok_or_else(|| self.bad(format!("metadata `{key}` = {v:?} is no layout")))
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

    pub(crate) fn quant(&self, key: &str) -> Result<Option<(f32, i32)>> {
        let v = self.get(key)?;
        if v == "none" {
            return Ok(None);
        }
        let (s, z) = v
            .split_once(',')
            .and_then(|(s, z)| Some((s.parse::<f32>().ok()?, z.parse::<i64>().ok()?)))
            .ok_or_else(|| self.bad(format!("metadata `{key}` = {v:?} is not `scale,zp`")))?;
        self.act_qparams(key, s, z).map(Some)
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

    pub(crate) fn steps(&mut self, prefix: &str, depth: usize) -> Result<Vec<QStep>> {
        if depth > MAX_DEPTH {
            return Err(self.bad(format!(
                "residual bodies nest deeper than {MAX_DEPTH} at step {prefix}"
            )));
        }
        let n = if prefix.is_empty() {
            self.count("steps")?
        } else {
            self.count(&format!("{prefix}:body"))?
        };
        let mut steps = Vec::new();
        for i in 0..n {
            let id = if prefix.is_empty() {
                i.to_string()
            } else {
                format!("{prefix}.{i}")
            };
            let path = self.get(&format!("{id}:path"))?.to_string();
            let place = format!("{}: step {id} ({path})", self.ctx);
            let op = self
                .op(&id, &path, depth)
                .map_err(|e| e.in_context(&place))?;
            steps.push(QStep { path, op });
        }
        Ok(steps)
    }

    pub(crate) fn op(&mut self, id: &str, path: &str, depth: usize) -> Result<QOp> {
        let op = self.get(&format!("{id}:op"))?.to_string();
        Ok(match op.as_str() {
            "Quantize" => {
                let (scale, zero_point) = self.out_qparams(id)?;
                QOp::Quantize { scale, zero_point }
            }
            "Dequantize" => QOp::Dequantize,
            "Float" => QOp::Float(self.layer(&format!("{id}:L"), path, depth + 1)?),
            "Linear" | "LinearReLU" => {
                let (w, qp, b, s, z) = self.linear(id)?;
                let b = b.as_ref().map(|b| b.view());
                if op == "Linear" {
                    QOp::Linear(QLinear::from_quantized(w.view(), &qp, b, s, z)?)
                } else {
                    QOp::LinearReLU(QLinearReLU::from_quantized(w.view(), &qp, b, s, z)?)
                }
            }
            "Conv2d" | "ConvReLU2d" => {
                let (w, qp, b, p, s, z) = self.conv(id)?;
                let b = b.as_ref().map(|b| b.view());
                if op == "Conv2d" {
                    QOp::Conv2d(QConv2d::from_quantized(w.view(), &qp, b, p, s, z)?)
                } else {
                    QOp::ConvReLU2d(QConvReLU2d::from_quantized(w.view(), &qp, b, p, s, z)?)
                }
            }
            "ReLU" => QOp::ReLU,
            "ReLU6" => QOp::ReLU6 {
                q6: self.parse(&format!("{id}:q6"))?,
            },
            "MaxPool2d" => QOp::MaxPool2d(
                QMaxPool2d::new(
                    self.pair(&format!("{id}:kernel"), 1)?,
                    self.pair(&format!("{id}:stride"), 1)?,
                    self.pair(&format!("{id}:padding"), 0)?,
                    self.pair(&format!("{id}:dilation"), 1)?,
                )?
                .with_ceil_mode(self.opt_flag(&format!("{id}:ceil_mode"))?),
            ),
            "AvgPool2d" => QOp::AvgPool2d(
                QAvgPool2d::new(
                    self.pair(&format!("{id}:kernel"), 1)?,
                    self.pair(&format!("{id}:stride"), 1)?,
                    self.pair(&format!("{id}:padding"), 0)?,
                    self.flag(&format!("{id}:count_include_pad"))?,
                )?
                .with_layout(self.layout(&format!("{id}:layout"))?)
                .with_ceil_mode(self.opt_flag(&format!("{id}:ceil_mode"))?),
            ),
            "AdaptiveAvgPool2d" => QOp::AdaptiveAvgPool2d(
                QAdaptiveAvgPool2d::new(self.pair(&format!("{id}:output"), 1)?)?
                    .with_layout(self.layout(&format!("{id}:layout"))?),
            ),
            "Flatten" => {
                let key = format!("{id}:start_dim");
                QOp::Flatten {
                    start_dim: self.hyper(&key, self.parse(&key)?, 0)?,
                }
            }
            "Identity" => QOp::Identity,
            "Residual" => {
                let skip_quant = self.quant(&format!("{id}:skip_quant"))?;
                let body_quant = self.quant(&format!("{id}:body_quant"))?;
                let add = match self.get(&format!("{id}:add"))? {
                    "float" => None,
                    "int8" => {
                        let (s, z) = self.out_qparams(id)?;
                        let mut add =
                            QAdd::new(s, z)?.with_layout(self.layout(&format!("{id}:layout"))?);
                        if self.flag(&format!("{id}:add_relu"))? {
                            add = add.with_relu();
                        }
                        Some(add)
                    }
                    v => return Err(self.bad(format!("metadata `{id}:add` = {v:?}"))),
                };
                let body = self.steps(id, depth + 1)?;
                QOp::Residual {
                    body,
                    skip_quant,
                    body_quant,
                    add,
                }
            }
            other => return Err(self.bad(format!("unknown operation {other:?}"))),
        })
    }

    pub(crate) fn layer(&mut self, lp: &str, path: &str, depth: usize) -> Result<Layer> {
        if depth > MAX_DEPTH {
            return Err(self.bad(format!("layers nest deeper than {MAX_DEPTH} at {lp}")));
        }
        let kind = self.get(&format!("{lp}:kind"))?.to_string();
        Ok(match kind.as_str() {
            "Conv2d" | "ConvReLU2d" => {
                let (shape, w) = self.f32s(&format!("{lp}:weight"), 4)?;
                let (o, cg, kh, kw) = (shape[0], shape[1], shape[2], shape[3]);
                self.hyper(&format!("{lp}:weight kernel height"), kh, 1)?;
                self.hyper(&format!("{lp}:weight kernel width"), kw, 1)?;
                let bias = self.bias(lp, o)?;
                let p = self.conv_params(lp, o)?;
                let w = Array4::from_shape_vec((o, cg, kh, kw), w)
                    .map_err(|e| self.bad(format!("tensor `{lp}:weight`: {e}")))?;
                let mut c = Conv2d::new(w, bias)?;
                c.stride = p.stride;
                c.padding = p.padding;
                c.dilation = p.dilation;
                c.groups = p.groups;
                if kind == "Conv2d" {
                    Layer::Conv2d(c)
                } else {
                    Layer::ConvReLU2d(c)
                }
            }
            "Linear" | "LinearReLU" => {
                let (shape, w) = self.f32s(&format!("{lp}:weight"), 2)?;
                let bias = self.bias(lp, shape[0])?;
                let w = Array2::from_shape_vec((shape[0], shape[1]), w)
                    .map_err(|e| self.bad(format!("tensor `{lp}:weight`: {e}")))?;
                let l = Linear::new(w, bias)?;
                if kind == "Linear" {
                    Layer::Linear(l)
                } else {
                    Layer::LinearReLU(l)
                }
            }
            "BatchNorm2d" => {
                let mut vs = Vec::with_capacity(4);
                for name in ["weight", "bias", "running_mean", "running_var"] {
                    vs.push(self.f32s(&format!("{lp}:{name}"), 1)?.1);
                }
                let c = vs[0].len();
                if vs.iter().any(|v| v.len() != c) {
                    return Err(
                        self.bad(format!("the BatchNorm2d tensors of {lp} differ in length"))
                    );
                }
                let eps: f32 = self.parse(&format!("{lp}:eps"))?;
                if !(eps.is_finite() && eps >= 0.0) {
                    return Err(self.bad(format!("{lp}:eps = {eps} is not finite and >= 0")));
                }
                let mut it = vs.into_iter().map(Array1::from);
                let mut next = || it.next().unwrap_or_else(|| Array1::zeros(c));
                Layer::BatchNorm2d(BatchNorm2d {
                    weight: next(),
                    bias: next(),
                    running_mean: next(),
                    running_var: next(),
                    eps,
                })
            }
            "Pool2d" => {
                let kind = match self.get(&format!("{lp}:pool"))? {
                    "max" => PoolKind::Max,
                    "avg" => PoolKind::Avg,
                    v => return Err(self.bad(format!("metadata `{lp}:pool` = {v:?}"))),
                };
                Layer::Pool2d(Pool2d {
                    kind,
                    kernel: self.pair(&format!("{lp}:kernel"), 1)?,
                    stride: self.pair(&format!("{lp}:stride"), 1)?,
                    padding: self.pair(&format!("{lp}:padding"), 0)?,
                })
            }
            "AdaptiveAvgPool2d" => Layer::AdaptiveAvgPool2d(self.pair(&format!("{lp}:output"), 1)?),
            "Flatten" => {
                let key = format!("{lp}:start_dim");
                Layer::Flatten {
                    start_dim: self.hyper(&key, self.parse(&key)?, 0)?,
                }
            }
            "ReLU" => Layer::ReLU,
            "ReLU6" => Layer::ReLU6,
            "Dropout" => Layer::Dropout,
            "Identity" => Layer::Identity,
            "QuantStub" => Layer::QuantStub,
            "DeQuantStub" => Layer::DeQuantStub,
            "Sequential" | "Residual" => {
                let n = self.count(&format!("{lp}:n"))?;
                let mut s = Sequential::new();
                for i in 0..n {
                    let cp = format!("{lp}.{i}");
                    let name = self.get(&format!("{cp}:name"))?.to_string();
                    let child = self.layer(&cp, &format!("{path}.{name}"), depth + 1)?;
                    s = s.push(name, child);
                }
                if kind == "Sequential" {
                    Layer::Sequential(s)
                } else {
                    Layer::Residual(s)
                }
            }
            other => return Err(self.bad(format!("unknown float layer {other:?} at {lp}"))),
        })
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

/// Parses a `ptq-qmodel/1` file; `ctx` names it in errors.
fn load_qmodel(bytes: &[u8], ctx: &str) -> Result<QuantizedModel> {
    let mut r = open_reader(bytes, ctx)?;
    let format = r.get("format")?;
    if format != FORMAT {
        return Err(r.bad(format!(
            "format {format:?} is not {FORMAT:?} (a newer ptq, or not a ptq model)"
        )));
    }
    let float_weight_bytes: usize = r.parse("float_weight_bytes")?;
    let steps = r.steps("", 0)?;
    r.check_all_used()?;
    Ok(QuantizedModel::from_steps(steps, float_weight_bytes))
}
