//! The int8 ops of a [`QuantizedGraph`](super::QuantizedGraph): one type per op, each
//! with its `QuantOp` impl (run, output qparams, write) and its reader (registered in
//! [`super::record::READERS`]). Their `from_observed` constructors live in
//! [`crate::quant::convert`](super) next to the graph's op set.
//!
//! Each op wraps the kernels of [`crate::nn::quantized`] (bit-exact with PyTorch's
//! `torch.ao.nn.quantized` modules on fbgemm) and decides the layout it reads and writes:
//! convolutions read and write NHWC; pools, add, mul, concat, the table activations,
//! ReLU / clamp, nearest upsampling and batch norm run on the layout their input is held
//! in (NHWC after a convolution) and keep it, rounding as PyTorch does for its memory
//! format; flatten, reshape, permute, slice and linear read the logical NCHW order (a
//! flatten of a 1x1 or one-channel NHWC tensor moves no bytes). So an activation is
//! transposed only at the float borders, where an NCHW input meets NHWC work, and at the
//! flatten of a spatial tensor ([`NodeProfile::transposes`](super::NodeProfile) counts
//! them).

use std::borrow::Cow;

use ndarray::{ArrayD, IxDyn};

use super::{ExecCtx, Layout, OpRecordReader, OpRecordWriter, QAct, QuantOp, Value};
use crate::error::{QuantError, Result};
use crate::kernels::BiasMode;
use crate::nn::quantized::{
    Conv2dParams, QAdaptiveAvgPool2d, QAdd, QAvgPool2d, QBatchNorm2d, QCat, QConv2d, QConvReLU2d,
    QHardsigmoid, QHardswish, QLayerNorm, QLinear, QLinearReLU, QMaxPool2d, QMean, QMul, QReLU,
    QSigmoid, QTensor, QUpsampleBilinear2d, QUpsampleNearest2d, TorchLayout, UpsampleSize,
};
use crate::qparams::{ActQParams, QParams};

fn one<'a>(inputs: &[&'a Value], kind: &str) -> Result<&'a Value> {
    match inputs {
        [x] => Ok(x),
        _ => Err(QuantError::UnsupportedConfig {
            context: kind.into(),
            reason: format!("takes one input, got {}", inputs.len()),
        }),
    }
}

/// The tensor in logical (NCHW) order, counting a transpose that moves bytes.
fn nchw<'a>(x: &'a QAct, ctx: &mut ExecCtx) -> Cow<'a, QTensor> {
    if x.needs_transpose(Layout::Nchw) {
        ctx.transposes += 1;
    }
    x.nchw()
}

/// The rank-4 tensor held NHWC, counting a transpose that moves bytes.
fn nhwc<'a>(x: &'a QAct, ctx: &mut ExecCtx, kind: &str) -> Result<Cow<'a, QTensor>> {
    if x.needs_transpose(Layout::Nhwc) {
        ctx.transposes += 1;
    }
    x.nhwc(kind)
}

/// Runs a one-input op in the layout its input is held in: `on_nhwc` on `[n, h, w, c]`
/// data for an NHWC input, `on_nchw` on logical-order data otherwise; the output keeps
/// the input's layout and PyTorch memory format.
fn same_layout(
    x: &QAct,
    on_nchw: impl FnOnce(&QTensor) -> Result<QTensor>,
    on_nhwc: impl FnOnce(&QTensor) -> Result<QTensor>,
) -> Result<Value> {
    let y = match x.layout() {
        Layout::Nhwc => on_nhwc(x.raw())?,
        Layout::Nchw => on_nchw(x.raw())?,
    };
    Ok(Value::Int8(QAct::new(y, x.layout(), x.torch_layout())?))
}

/// Quantizes a float tensor with `q`: into NHWC in one pass (counted as a transpose when
/// it moves bytes) when the executor says every reader wants NHWC and `x` is a rank-4
/// contiguous tensor, else in logical order. The activation keeps PyTorch's memory format
/// of a fresh `quantize_per_tensor` (contiguous) either way.
///
/// # Errors
/// [`QuantError::NonFinite`] for NaN or infinite input.
pub(crate) fn quantize_act(x: &ArrayD<f32>, q: ActQParams, ctx: &mut ExecCtx) -> Result<QAct> {
    if let (true, &[b, c, h, w], Some(src)) = (ctx.want_nhwc, x.shape(), x.as_slice()) {
        let ks = crate::kernels::KernelSet::current();
        let zp = q.zero_point() as u8;
        let v = crate::kernels::elementwise::quantize_nchw_to_nhwc_vec(
            ks,
            src,
            b,
            c,
            h * w,
            q.scale(),
            zp,
        );
        // (non-finite input: `from_f32` below reports it)
        if let Some(v) = v {
            if c > 1 && h * w > 1 {
                ctx.transposes += 1;
            }
            let data = ArrayD::from_shape_vec(IxDyn(&[b, h, w, c]), v)
                .unwrap_or_else(|_| unreachable!("a transpose keeps the element count"));
            let t = QTensor::new(data, q.scale(), q.zero_point())?;
            return QAct::new(t, Layout::Nhwc, TorchLayout::Contiguous);
        }
    }
    Ok(QAct::contiguous(QTensor::from_f32(
        x,
        q.scale(),
        q.zero_point(),
    )?))
}

/// A graph input (float); the executor fills it, it never runs.
#[derive(Debug, Clone, Default)]
pub struct InputOp;

impl InputOp {
    /// Reader for the file table.
    ///
    /// # Errors
    /// None.
    pub fn read(_: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        Ok(Box::new(InputOp))
    }
}

impl QuantOp for InputOp {
    fn kind(&self) -> &'static str {
        super::exec::INPUT_KIND
    }
    fn forward(&self, _: &[&Value], _: &mut ExecCtx) -> Result<Value> {
        Err(QuantError::UnsupportedConfig {
            context: "Input".into(),
            reason: "an input node does not run".into(),
        })
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        None
    }
    fn write(&self, _: &mut OpRecordWriter<'_>) -> Result<()> {
        Ok(())
    }
    fn arity(&self) -> usize {
        0
    }
}

/// float -> int8 (`quantize_per_tensor`): a `QuantStub`, or the border after a float
/// island.
#[derive(Debug, Clone)]
pub struct QuantizeOp {
    q: ActQParams,
}

impl QuantizeOp {
    /// Quantizes with `q`.
    pub fn new(q: ActQParams) -> Self {
        QuantizeOp { q }
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed or invalid qparams.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        Ok(Box::new(QuantizeOp::new(r.act("out")?)))
    }
}

impl QuantOp for QuantizeOp {
    fn kind(&self) -> &'static str {
        "Quantize"
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        match one(inputs, "Quantize")? {
            Value::Float(x) => Ok(Value::Int8(quantize_act(x, self.q, ctx)?)),
            Value::Int8(_) => Err(QuantError::UnsupportedConfig {
                context: "Quantize".into(),
                reason: "the input is already int8".into(),
            }),
        }
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.q)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.act("out", self.q);
        Ok(())
    }
}

/// int8 -> float: a `DeQuantStub`, or the border before a float island.
#[derive(Debug, Clone, Default)]
pub struct DequantizeOp;

impl DequantizeOp {
    /// Reader for the file table.
    ///
    /// # Errors
    /// None.
    pub fn read(_: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        Ok(Box::new(DequantizeOp))
    }
}

impl QuantOp for DequantizeOp {
    fn kind(&self) -> &'static str {
        "Dequantize"
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        match one(inputs, "Dequantize")? {
            Value::Int8(q) => {
                // An NHWC tensor is transposed in the same pass.
                if q.needs_transpose(Layout::Nchw) {
                    ctx.transposes += 1;
                }
                Ok(Value::Float(q.dequantize()))
            }
            Value::Float(x) => Ok(Value::Float(x.clone())),
        }
    }
    fn forward_owned(&self, mut inputs: Vec<Cow<'_, Value>>, ctx: &mut ExecCtx) -> Result<Value> {
        match inputs.as_slice() {
            [Cow::Owned(Value::Float(_))] => Ok(inputs.swap_remove(0).into_owned()),
            _ => self.forward(&inputs.iter().map(|v| v.as_ref()).collect::<Vec<_>>(), ctx),
        }
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        None
    }
    fn write(&self, _: &mut OpRecordWriter<'_>) -> Result<()> {
        Ok(())
    }
}

/// Writes `bias_mode = int32` for ONNX Runtime's integer bias; nothing for fbgemm's float
/// bias, so fbgemm files are unchanged and files written before the key existed load as
/// fbgemm's.
/// The record's `arithmetic` (absent or `fbgemm`: PyTorch's; `onnxruntime`: ORT's).
fn read_onnxruntime_arithmetic(r: &OpRecordReader<'_, '_>) -> Result<bool> {
    match r.opt("arithmetic") {
        None | Some("fbgemm") => Ok(false),
        Some("onnxruntime") => Ok(true),
        Some(v) => Err(r.bad(format!(
            "metadata `arithmetic` = {v:?} is not \"fbgemm\" or \"onnxruntime\""
        ))),
    }
}

/// Writes `arithmetic = onnxruntime` when `on` (PyTorch's arithmetic writes nothing, so
/// older files read as fbgemm); read back by [`read_onnxruntime_arithmetic`].
fn write_onnxruntime_arithmetic(rec: &mut OpRecordWriter<'_>, on: bool) {
    if on {
        rec.set("arithmetic", "onnxruntime");
    }
}

fn write_bias_mode(rec: &mut OpRecordWriter<'_>, mode: BiasMode) {
    if mode == BiasMode::Int32 {
        rec.set("bias_mode", "int32");
    }
}

fn read_bias_mode(r: &OpRecordReader<'_, '_>) -> Result<BiasMode> {
    match r.opt("bias_mode") {
        None | Some("float") => Ok(BiasMode::Float),
        Some("int32") => Ok(BiasMode::Int32),
        Some(v) => Err(r.bad(format!(
            "metadata `bias_mode` = {v:?} is not \"float\" or \"int32\""
        ))),
    }
}

/// `quantized.Conv2d` / `intrinsic.quantized.ConvReLU2d`: reads and writes NHWC.
#[derive(Debug, Clone)]
pub struct ConvOp {
    conv: QConv2d,
    out: ActQParams,
}

impl ConvOp {
    /// Wraps a convolution (its `is_relu` says which of the two it is).
    pub fn new(conv: QConv2d) -> Result<Self> {
        let (s, z) = conv.output_qparams();
        let out = ActQParams::new(s, z)?;
        Ok(ConvOp { conv, out })
    }

    /// Quantizes and packs float weights.
    ///
    /// # Errors
    /// As [`QConv2d::new`].
    pub fn from_float(
        weight: ndarray::ArrayView4<'_, f32>,
        bias: Option<ndarray::ArrayView1<'_, f32>>,
        w_qparams: &QParams,
        params: Conv2dParams,
        out: ActQParams,
        relu: bool,
    ) -> Result<Self> {
        let (s, z) = (out.scale(), out.zero_point());
        let conv = if relu {
            QConvReLU2d::new(weight, bias, w_qparams, params, s, z)?
                .inner()
                .clone()
        } else {
            QConv2d::new(weight, bias, w_qparams, params, s, z)?
        };
        Ok(ConvOp { conv, out })
    }

    /// The kernel.
    pub fn conv(&self) -> &QConv2d {
        &self.conv
    }

    /// The same op with its bias entering the requantization as `mode` says (saved in the
    /// `.qmodel` file as `bias_mode = int32` when not the default).
    pub fn with_bias_mode(mut self, mode: BiasMode) -> Self {
        self.conv = self.conv.with_bias_mode(mode);
        self
    }

    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records; the kernel's constructor errors.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let relu = r.flag("relu")?;
        let (w, qp, b, p, out) = r.conv()?;
        let (s, z) = (out.scale(), out.zero_point());
        let conv = if relu {
            QConvReLU2d::from_quantized(w.view(), &qp, b.as_ref().map(|b| b.view()), p, s, z)?
                .inner()
                .clone()
        } else {
            QConv2d::from_quantized(w.view(), &qp, b.as_ref().map(|b| b.view()), p, s, z)?
        };
        let conv = conv.with_bias_mode(read_bias_mode(r)?);
        Ok(Box::new(ConvOp { conv, out }))
    }
}

impl QuantOp for ConvOp {
    fn kind(&self) -> &'static str {
        if self.conv.is_relu() {
            "ConvReLU2d"
        } else {
            "Conv2d"
        }
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, self.kind())?.int8(self.kind())?;
        let xn = nhwc(x, ctx, self.kind())?;
        let y = self.conv.forward_nhwc(&xn)?;
        Ok(Value::Int8(QAct::new(
            y,
            Layout::Nhwc,
            TorchLayout::ChannelsLast,
        )?))
    }
    fn forward_owned(&self, inputs: Vec<Cow<'_, Value>>, ctx: &mut ExecCtx) -> Result<Value> {
        let y = self.forward(&inputs.iter().map(|v| v.as_ref()).collect::<Vec<_>>(), ctx)?;
        // The input, read for the last time, leaves its bytes to a later output.
        for v in inputs {
            if let Cow::Owned(Value::Int8(x)) = v {
                crate::nn::quantized::recycle_tensor(x.into_parts().0);
            }
        }
        Ok(y)
    }
    fn wants_nhwc(&self) -> bool {
        true
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.out)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.set("relu", self.conv.is_relu() as u8);
        write_bias_mode(rec, self.conv.bias_mode());
        rec.conv(&self.conv);
        Ok(())
    }
    fn weight(&self) -> Option<(ArrayD<i8>, QParams)> {
        let (w, qp) = self.conv.quantized_weight();
        Some((w.into_dyn(), qp))
    }
    fn bias(&self) -> Option<&[f32]> {
        self.conv.bias()
    }
    fn weight_bytes(&self) -> usize {
        self.conv.weight_bytes()
    }
}

/// `quantized.Linear` / `intrinsic.quantized.LinearReLU` on `[N, features]`.
#[derive(Debug, Clone)]
pub struct LinearOp {
    lin: QLinear,
    out: ActQParams,
}

impl LinearOp {
    /// Wraps a linear layer.
    ///
    /// # Errors
    /// None in practice (the layer's qparams are valid).
    pub fn new(lin: QLinear) -> Result<Self> {
        let (s, z) = lin.output_qparams();
        let out = ActQParams::new(s, z)?;
        Ok(LinearOp { lin, out })
    }

    /// Quantizes and packs float weights.
    ///
    /// # Errors
    /// As [`QLinear::new`].
    pub fn from_float(
        weight: ndarray::ArrayView2<'_, f32>,
        bias: Option<ndarray::ArrayView1<'_, f32>>,
        w_qparams: &QParams,
        out: ActQParams,
        relu: bool,
    ) -> Result<Self> {
        let (s, z) = (out.scale(), out.zero_point());
        let lin = if relu {
            QLinearReLU::new(weight, bias, w_qparams, s, z)?
                .inner()
                .clone()
        } else {
            QLinear::new(weight, bias, w_qparams, s, z)?
        };
        Ok(LinearOp { lin, out })
    }

    /// The same op with its bias entering the requantization as `mode` says (saved in the
    /// `.qmodel` file as `bias_mode = int32` when not the default).
    pub fn with_bias_mode(mut self, mode: BiasMode) -> Self {
        self.lin = self.lin.with_bias_mode(mode);
        self
    }

    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records; the kernel's constructor errors.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let relu = r.flag("relu")?;
        let (w, qp, b, out) = r.linear()?;
        let (s, z) = (out.scale(), out.zero_point());
        let lin = if relu {
            QLinearReLU::from_quantized(w.view(), &qp, b.as_ref().map(|b| b.view()), s, z)?
                .inner()
                .clone()
        } else {
            QLinear::from_quantized(w.view(), &qp, b.as_ref().map(|b| b.view()), s, z)?
        };
        let lin = lin.with_bias_mode(read_bias_mode(r)?);
        Ok(Box::new(LinearOp { lin, out }))
    }
}

impl QuantOp for LinearOp {
    fn kind(&self) -> &'static str {
        if self.lin.is_relu() {
            "LinearReLU"
        } else {
            "Linear"
        }
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, self.kind())?.int8(self.kind())?;
        let y = self.lin.forward(&nchw(x, ctx))?;
        Ok(Value::Int8(QAct::contiguous(y)))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.out)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.set("relu", self.lin.is_relu() as u8);
        write_bias_mode(rec, self.lin.bias_mode());
        rec.linear(&self.lin);
        Ok(())
    }
    fn weight(&self) -> Option<(ArrayD<i8>, QParams)> {
        let (w, qp) = self.lin.quantized_weight();
        Some((w.into_dyn(), qp))
    }
    fn bias(&self) -> Option<&[f32]> {
        self.lin.bias()
    }
    fn weight_bytes(&self) -> usize {
        self.lin.weight_bytes()
    }
}

/// `QFunctional.add` / `add_relu` (`quantized::add`, `quantized::add_relu`). PyTorch's
/// kernel runs over the elements in the first input's memory order (channels-last after
/// a convolution), which decides its rounding; the op keeps NHWC activations NHWC.
#[derive(Debug, Clone)]
pub struct AddOp {
    out: ActQParams,
    relu: bool,
    onnxruntime: bool,
}

impl AddOp {
    /// An add (with a fused ReLU if `relu`) quantizing its result with `out`.
    pub fn new(out: ActQParams, relu: bool) -> Self {
        AddOp {
            out,
            relu,
            onnxruntime: false,
        }
    }
    /// The same add with ONNX Runtime's `QLinearAdd` arithmetic when `on`
    /// ([`QAdd::with_onnxruntime_arithmetic`]; saved as `arithmetic = onnxruntime`).
    pub fn with_onnxruntime_arithmetic(mut self, on: bool) -> Self {
        self.onnxruntime = on;
        self
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let ort = read_onnxruntime_arithmetic(r)?;
        Ok(Box::new(
            AddOp::new(r.act("out")?, r.flag("relu")?).with_onnxruntime_arithmetic(ort),
        ))
    }
}

impl QuantOp for AddOp {
    fn kind(&self) -> &'static str {
        if self.relu {
            "AddReLU"
        } else {
            "Add"
        }
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        let [a, b] = inputs else {
            return Err(QuantError::UnsupportedConfig {
                context: self.kind().into(),
                reason: format!("takes two inputs, got {}", inputs.len()),
            });
        };
        let (a, b) = (a.int8(self.kind())?, b.int8(self.kind())?);
        if a.shape() != b.shape() {
            return Err(QuantError::ShapeMismatch {
                context: self.kind().into(),
                expected: format!("both inputs of shape {:?}", a.shape()),
                actual: format!("{:?}", b.shape()),
            });
        }
        // The rounding follows PyTorch's memory format of the first input; the data are
        // processed in the layout they are held in (NHWC if either input is).
        let mut add =
            QAdd::new(self.out.scale(), self.out.zero_point())?.with_layout(a.torch_layout());
        if self.relu {
            add = add.with_relu();
        }
        if self.onnxruntime {
            add = add.with_onnxruntime_arithmetic();
        }
        let held_nhwc =
            a.shape().len() == 4 && (a.layout() == Layout::Nhwc || b.layout() == Layout::Nhwc);
        if held_nhwc {
            let xa = nhwc(a, ctx, self.kind())?;
            let xb = nhwc(b, ctx, self.kind())?;
            let y = add.forward_nhwc(&xa, &xb)?;
            Ok(Value::Int8(QAct::new(y, Layout::Nhwc, a.torch_layout())?))
        } else {
            let y = add.forward(&nchw(a, ctx), &nchw(b, ctx))?;
            Ok(Value::Int8(QAct::new(y, Layout::Nchw, a.torch_layout())?))
        }
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.out)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.act("out", self.out);
        rec.set("relu", self.relu as u8);
        write_onnxruntime_arithmetic(rec, self.onnxruntime);
        Ok(())
    }
    fn arity(&self) -> usize {
        2
    }
}

/// `quantized.ReLU`: `max(q, zero_point)`; keeps the input's qparams and layout.
#[derive(Debug, Clone)]
pub struct ReluOp {
    q: ActQParams,
}

impl ReluOp {
    /// A ReLU on an input quantized with `q` (its output has the same parameters).
    pub fn new(q: ActQParams) -> Self {
        ReluOp { q }
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        Ok(Box::new(ReluOp::new(r.act("q")?)))
    }
}

impl QuantOp for ReluOp {
    fn kind(&self) -> &'static str {
        "ReLU"
    }
    fn forward(&self, inputs: &[&Value], _: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "ReLU")?.int8("ReLU")?;
        let y = QReLU.forward(x.raw())?;
        Ok(Value::Int8(QAct::new(y, x.layout(), x.torch_layout())?))
    }
    fn forward_owned(&self, inputs: Vec<Cow<'_, Value>>, _: &mut ExecCtx) -> Result<Value> {
        let x = one_owned(inputs, "ReLU")?;
        // QReLU's `max(q, zero_point)`, in place when the input dies here.
        let zp = x.as_ref().int8("ReLU")?.raw().zero_point() as u8;
        map_in_place(x, "ReLU", |q| q.max(zp))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.q)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.act("q", self.q);
        Ok(())
    }
}

/// `quantized.hardtanh` (ReLU6 = `Clamp { 0, 6 }`): `clamp(q, quantize(min),
/// quantize(max))` with the input's qparams, which the output keeps.
#[derive(Debug, Clone)]
pub struct ClampOp {
    min: f32,
    max: f32,
    q: ActQParams,
}

impl ClampOp {
    /// A clamp to `[min, max]` on an input quantized with `q`.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] unless `min <= max`, both finite.
    pub fn new(min: f32, max: f32, q: ActQParams) -> Result<Self> {
        if !(min.is_finite() && max.is_finite() && min <= max) {
            return Err(QuantError::UnsupportedConfig {
                context: "Clamp".into(),
                reason: format!("bounds [{min}, {max}] must be finite with min <= max"),
            });
        }
        Ok(ClampOp { min, max, q })
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records; bad bounds.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        Ok(Box::new(ClampOp::new(
            r.parse("min")?,
            r.parse("max")?,
            r.act("q")?,
        )?))
    }
}

impl QuantOp for ClampOp {
    fn kind(&self) -> &'static str {
        "Clamp"
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "Clamp")?;
        self.forward_owned(vec![Cow::Borrowed(x)], ctx)
    }
    fn forward_owned(&self, inputs: Vec<Cow<'_, Value>>, _: &mut ExecCtx) -> Result<Value> {
        let x = one_owned(inputs, "Clamp")?;
        let q = x.as_ref().int8("Clamp")?.qparams();
        let (lo, hi) = (q.quantize(self.min), q.quantize(self.max));
        map_in_place(x, "Clamp", |v| v.clamp(lo, hi.max(lo)))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.q)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.set("min", self.min);
        rec.set("max", self.max);
        rec.act("q", self.q);
        Ok(())
    }
}

/// `quantized max_pool2d`: keeps qparams, PyTorch's memory format and the layout it is
/// held in.
#[derive(Debug, Clone)]
pub struct MaxPoolOp {
    pool: QMaxPool2d,
    q: ActQParams,
}

impl MaxPoolOp {
    /// A max pool.
    ///
    /// # Errors
    /// As [`QMaxPool2d::new`].
    pub fn new(
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        q: ActQParams,
    ) -> Result<Self> {
        Ok(MaxPoolOp {
            pool: QMaxPool2d::new(kernel, stride, padding, dilation)?,
            q,
        })
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records; the kernel's constructor errors.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        Ok(Box::new(MaxPoolOp::new(
            r.pair("kernel", 1)?,
            r.pair("stride", 1)?,
            r.pair("padding", 0)?,
            r.pair("dilation", 1)?,
            r.act("q")?,
        )?))
    }
}

impl QuantOp for MaxPoolOp {
    fn kind(&self) -> &'static str {
        "MaxPool2d"
    }
    fn forward(&self, inputs: &[&Value], _: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "MaxPool2d")?.int8("MaxPool2d")?;
        same_layout(x, |t| self.pool.forward(t), |t| self.pool.forward_nhwc(t))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.q)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.pair("kernel", self.pool.kernel());
        rec.pair("stride", self.pool.stride());
        rec.pair("padding", self.pool.padding());
        rec.pair("dilation", self.pool.dilation());
        rec.act("q", self.q);
        Ok(())
    }
}

/// `quantized avg_pool2d`: keeps qparams; rounds as PyTorch's kernel for the input's
/// memory format.
#[derive(Debug, Clone)]
pub struct AvgPoolOp {
    pool: QAvgPool2d,
    q: ActQParams,
}

impl AvgPoolOp {
    /// An average pool.
    ///
    /// # Errors
    /// As [`QAvgPool2d::new`].
    pub fn new(
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        count_include_pad: bool,
        q: ActQParams,
    ) -> Result<Self> {
        Ok(AvgPoolOp {
            pool: QAvgPool2d::new(kernel, stride, padding, count_include_pad)?,
            q,
        })
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records; the kernel's constructor errors.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        Ok(Box::new(AvgPoolOp::new(
            r.pair("kernel", 1)?,
            r.pair("stride", 1)?,
            r.pair("padding", 0)?,
            r.flag("count_include_pad")?,
            r.act("q")?,
        )?))
    }
}

impl QuantOp for AvgPoolOp {
    fn kind(&self) -> &'static str {
        "AvgPool2d"
    }
    fn forward(&self, inputs: &[&Value], _: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "AvgPool2d")?.int8("AvgPool2d")?;
        let pool = self.pool.with_layout(x.torch_layout());
        same_layout(x, |t| pool.forward(t), |t| pool.forward_nhwc(t))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.q)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.pair("kernel", self.pool.kernel());
        rec.pair("stride", self.pool.stride());
        rec.pair("padding", self.pool.padding());
        rec.set("count_include_pad", self.pool.count_include_pad() as u8);
        rec.act("q", self.q);
        Ok(())
    }
}

/// `quantized adaptive_avg_pool2d`: keeps qparams; rounds as PyTorch for the input's
/// memory format.
#[derive(Debug, Clone)]
pub struct AdaptiveAvgPoolOp {
    pool: QAdaptiveAvgPool2d,
    q: ActQParams,
    onnxruntime: bool,
}

impl AdaptiveAvgPoolOp {
    /// An adaptive average pool to `output` (height, width).
    ///
    /// # Errors
    /// As [`QAdaptiveAvgPool2d::new`].
    pub fn new(output: (usize, usize), q: ActQParams) -> Result<Self> {
        Ok(AdaptiveAvgPoolOp {
            pool: QAdaptiveAvgPool2d::new(output)?,
            q,
            onnxruntime: false,
        })
    }
    /// With `on`, a global pool (output 1x1) computes as ONNX Runtime's
    /// `QLinearGlobalAveragePool` (MLAS): `acc = sum(q) - zp * N` in integers, then
    /// `round_half_even(acc as f32 * (scale / (scale * N as f32))) + zp`, clamped (saved as
    /// `arithmetic = onnxruntime`). Other output sizes keep PyTorch's arithmetic.
    pub fn with_onnxruntime_arithmetic(mut self, on: bool) -> Self {
        self.onnxruntime = on;
        self
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records; the kernel's constructor errors.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let ort = read_onnxruntime_arithmetic(r)?;
        Ok(Box::new(
            AdaptiveAvgPoolOp::new(r.pair("output", 1)?, r.act("q")?)?
                .with_onnxruntime_arithmetic(ort),
        ))
    }

    /// ORT's global average pool over `[n, h, w, c]` (NHWC) or `[n, c, h, w]` data.
    fn global_onnxruntime(&self, x: &QAct) -> Result<Value> {
        let t = x.raw();
        let d = t.data().shape();
        let (n, c, hw) = match x.layout() {
            Layout::Nhwc => (d[0], d[3], d[1] * d[2]),
            Layout::Nchw => (d[0], d[1], d[2] * d[3]),
        };
        if hw == 0 || hw >= 1 << 24 {
            return Err(QuantError::ShapeMismatch {
                context: "AdaptiveAvgPool2d".into(),
                expected: "1 to 2^24 - 1 input pixels (ONNX Runtime's limit)".into(),
                actual: format!("shape {d:?}"),
            });
        }
        let (s, zp) = (self.q.scale(), self.q.zero_point());
        let scale = s / (s * hw as f32);
        let data = t.data().as_standard_layout();
        let v = data.as_slice().unwrap_or(&[]);
        let mut sums = vec![0i64; n * c];
        match x.layout() {
            // one pass over each image's pixels, every channel's sum in its lane
            Layout::Nhwc => {
                for (b, s) in sums.chunks_mut(c.max(1)).enumerate().take(n) {
                    for px in v[b * hw * c..(b + 1) * hw * c].chunks(c.max(1)) {
                        for (a, &q) in s.iter_mut().zip(px) {
                            *a += q as i64;
                        }
                    }
                }
            }
            Layout::Nchw => {
                for (a, plane) in sums.iter_mut().zip(v.chunks(hw)) {
                    *a = plane.iter().map(|&q| q as i64).sum();
                }
            }
        }
        let out: Vec<u8> = sums
            .iter()
            .map(|&sum| {
                let acc = (sum - zp as i64 * hw as i64) as i32;
                let r = (acc as f32 * scale).round_ties_even() + zp as f32;
                r.clamp(0.0, 255.0) as u8
            })
            .collect();
        let y = ArrayD::from_shape_vec(IxDyn(&[n, c, 1, 1]), out).map_err(|e| {
            QuantError::ShapeMismatch {
                context: "AdaptiveAvgPool2d".into(),
                expected: format!("{n} x {c} outputs"),
                actual: e.to_string(),
            }
        })?;
        Ok(Value::Int8(QAct::new(
            QTensor::new(y, s, zp)?,
            Layout::Nchw,
            x.torch_layout(),
        )?))
    }
}

impl QuantOp for AdaptiveAvgPoolOp {
    fn kind(&self) -> &'static str {
        "AdaptiveAvgPool2d"
    }
    fn forward(&self, inputs: &[&Value], _: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "AdaptiveAvgPool2d")?.int8("AdaptiveAvgPool2d")?;
        if self.onnxruntime && self.pool.output_size() == (1, 1) && x.shape().len() == 4 {
            return self.global_onnxruntime(x);
        }
        let pool = self.pool.with_layout(x.torch_layout());
        same_layout(x, |t| pool.forward(t), |t| pool.forward_nhwc(t))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.q)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.pair("output", self.pool.output_size());
        rec.act("q", self.q);
        write_onnxruntime_arithmetic(rec, self.onnxruntime);
        Ok(())
    }
}

fn reshaped(x: &QTensor, shape: &[usize], kind: &str) -> Result<QAct> {
    let data = x
        .data()
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(shape))
        .map_err(|_| QuantError::ShapeMismatch {
            context: kind.into(),
            expected: format!("{} elements for shape {shape:?}", x.data().len()),
            actual: format!("shape {:?}", x.data().shape()),
        })?;
    Ok(QAct::contiguous(QTensor::new(
        data,
        x.scale(),
        x.zero_point(),
    )?))
}

/// A reshape of the logical (NCHW) values of `input` to the shape `to` computes from the
/// logical shape: without a copy when the executor handed the value over and its bytes
/// are already in logical order (held NCHW, or NHWC with one channel or one pixel),
/// else through [`reshaped`] (transposing an NHWC tensor first).
fn reshape_value(
    input: Cow<'_, Value>,
    kind: &str,
    ctx: &mut ExecCtx,
    to: impl FnOnce(&[usize]) -> Result<Vec<usize>>,
) -> Result<Value> {
    let x = input.as_ref().int8(kind)?;
    let shape = to(&x.shape())?;
    match input {
        Cow::Owned(Value::Int8(x)) if !x.needs_transpose(Layout::Nchw) => {
            let (t, _, _) = x.into_parts();
            let (scale, zp) = (t.scale(), t.zero_point());
            let data = t.into_data();
            let data = if data.is_standard_layout() {
                data.into_shape_with_order(IxDyn(&shape)).map_err(|_| {
                    QuantError::ShapeMismatch {
                        context: kind.into(),
                        expected: format!("a shape with as many elements as {shape:?}"),
                        actual: "another element count".into(),
                    }
                })?
            } else {
                let t = QTensor::new(data, scale, zp)?;
                return Ok(Value::Int8(reshaped(&t, &shape, kind)?));
            };
            Ok(Value::Int8(QAct::contiguous(QTensor::new(
                data, scale, zp,
            )?)))
        }
        other => {
            let x = other.as_ref().int8(kind)?;
            Ok(Value::Int8(reshaped(&nchw(x, ctx), &shape, kind)?))
        }
    }
}

/// The single input of a one-input op given to [`QuantOp::forward_owned`].
fn one_owned<'a>(mut inputs: Vec<Cow<'a, Value>>, kind: &str) -> Result<Cow<'a, Value>> {
    match inputs.len() {
        1 => Ok(inputs.swap_remove(0)),
        n => Err(QuantError::UnsupportedConfig {
            context: kind.into(),
            reason: format!("takes one input, got {n}"),
        }),
    }
}

/// Applies `f` to every byte of an int8 input in place when the executor handed it over
/// (else to a copy); the result keeps the qparams, layout and PyTorch memory format.
fn map_in_place(input: Cow<'_, Value>, kind: &str, f: impl Fn(u8) -> u8) -> Result<Value> {
    match input {
        Cow::Owned(Value::Int8(x)) => {
            let (t, layout, torch) = x.into_parts();
            let (scale, zp) = (t.scale(), t.zero_point());
            let mut data = t.into_data();
            data.mapv_inplace(f);
            Ok(Value::Int8(QAct::new(
                QTensor::new(data, scale, zp)?,
                layout,
                torch,
            )?))
        }
        other => {
            let x = other.as_ref().int8(kind)?;
            let t = x.raw();
            let y = QTensor::new(t.data().mapv(f), t.scale(), t.zero_point())?;
            Ok(Value::Int8(QAct::new(y, x.layout(), x.torch_layout())?))
        }
    }
}

/// The shape `torch.flatten(start_dim, end_dim)` gives a tensor of shape `s`.
fn flatten_shape(s: &[usize], start_dim: usize, end_dim: isize) -> Result<Vec<usize>> {
    let r = s.len() as isize;
    let end = if end_dim < 0 { r + end_dim } else { end_dim };
    if start_dim as isize >= r.max(1) || end < start_dim as isize || end >= r {
        return Err(QuantError::ShapeMismatch {
            context: "Flatten".into(),
            expected: format!("a tensor with dimensions {start_dim}..={end_dim} to flatten"),
            actual: format!("shape {s:?}"),
        });
    }
    let end = end as usize;
    let mut shape = s[..start_dim].to_vec();
    shape.push(s[start_dim..=end].iter().product());
    shape.extend_from_slice(&s[end + 1..]);
    Ok(shape)
}

/// `torch.flatten(x, start_dim, end_dim)` on int8 values (logical order).
#[derive(Debug, Clone)]
pub struct FlattenOp {
    start_dim: usize,
    end_dim: isize,
    q: ActQParams,
}

impl FlattenOp {
    /// A flatten of dimensions `start_dim..=end_dim` (`end_dim` may be negative).
    pub fn new(start_dim: usize, end_dim: isize, q: ActQParams) -> Self {
        FlattenOp {
            start_dim,
            end_dim,
            q,
        }
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let start = r.hyper("start_dim", 0)?;
        let end: isize = r.parse("end_dim")?;
        if end.unsigned_abs() > crate::io::qmodel::MAX_HYPERPARAMETER {
            return Err(r.bad(format!("end_dim {end} is implausible")));
        }
        Ok(Box::new(FlattenOp::new(start, end, r.act("q")?)))
    }
}

impl QuantOp for FlattenOp {
    fn kind(&self) -> &'static str {
        "Flatten"
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "Flatten")?;
        self.forward_owned(vec![Cow::Borrowed(x)], ctx)
    }
    fn forward_owned(&self, inputs: Vec<Cow<'_, Value>>, ctx: &mut ExecCtx) -> Result<Value> {
        let x = one_owned(inputs, "Flatten")?;
        reshape_value(x, "Flatten", ctx, |s| {
            flatten_shape(s, self.start_dim, self.end_dim)
        })
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.q)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.set("start_dim", self.start_dim);
        rec.set("end_dim", self.end_dim);
        rec.act("q", self.q);
        Ok(())
    }
}

/// `reshape` on int8 values: `-1` infers one dimension, `0` copies the input's.
#[derive(Debug, Clone)]
pub struct ReshapeOp {
    shape: Vec<isize>,
    q: ActQParams,
}

/// Resolves a reshape target (`-1` inferred, `0` copied) for an input shape.
pub(crate) fn resolve_shape(input: &[usize], target: &[isize], ctx: &str) -> Result<Vec<usize>> {
    let bad = || QuantError::ShapeMismatch {
        context: ctx.into(),
        expected: format!("a shape {target:?} compatible with the input"),
        actual: format!("shape {input:?}"),
    };
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 => out.push(*input.get(i).ok_or_else(bad)?),
            d if d > 0 => out.push(d as usize),
            _ => return Err(bad()),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(bad());
        }
        out[i] = total / known;
    } else if known != total {
        return Err(bad());
    }
    Ok(out)
}

impl ReshapeOp {
    /// A reshape to `shape`.
    pub fn new(shape: Vec<isize>, q: ActQParams) -> Self {
        ReshapeOp { shape, q }
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let v: String = r.parse("shape")?;
        let shape = if v.is_empty() {
            Vec::new()
        } else {
            v.split(',')
                .map(|s| s.parse::<isize>().ok().filter(|d| *d >= -1))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| r.bad(format!("shape {v:?} is not a list of dims >= -1")))?
        };
        Ok(Box::new(ReshapeOp::new(shape, r.act("q")?)))
    }
}

impl QuantOp for ReshapeOp {
    fn kind(&self) -> &'static str {
        "Reshape"
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "Reshape")?;
        self.forward_owned(vec![Cow::Borrowed(x)], ctx)
    }
    fn forward_owned(&self, inputs: Vec<Cow<'_, Value>>, ctx: &mut ExecCtx) -> Result<Value> {
        let x = one_owned(inputs, "Reshape")?;
        reshape_value(x, "Reshape", ctx, |s| {
            resolve_shape(s, &self.shape, "Reshape")
        })
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.q)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        let s: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        rec.set("shape", s.join(","));
        rec.act("q", self.q);
        Ok(())
    }
}

/// Identity / Dropout: passes its input through (int8 or float).
#[derive(Debug, Clone)]
pub struct IdentityOp {
    q: Option<ActQParams>,
}

impl IdentityOp {
    /// An identity whose input has qparams `q` (`None`: float).
    pub fn new(q: Option<ActQParams>) -> Self {
        IdentityOp { q }
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let q = if r.flag("int8")? {
            Some(r.act("q")?)
        } else {
            None
        };
        Ok(Box::new(IdentityOp::new(q)))
    }
}

impl QuantOp for IdentityOp {
    fn kind(&self) -> &'static str {
        "Identity"
    }
    fn forward(&self, inputs: &[&Value], _: &mut ExecCtx) -> Result<Value> {
        Ok(one(inputs, "Identity")?.clone())
    }
    fn forward_owned(&self, mut inputs: Vec<Cow<'_, Value>>, _: &mut ExecCtx) -> Result<Value> {
        match inputs.len() {
            // moved when the executor handed it over, copied otherwise
            1 => Ok(inputs.swap_remove(0).into_owned()),
            n => Err(QuantError::UnsupportedConfig {
                context: "Identity".into(),
                reason: format!("takes one input, got {n}"),
            }),
        }
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        self.q
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.set("int8", self.q.is_some() as u8);
        if let Some(q) = self.q {
            rec.act("q", q);
        }
        Ok(())
    }
}

fn torch_of_full(xs: &[&QAct], shape: &[usize]) -> TorchLayout {
    xs.iter()
        .find(|x| x.shape() == shape)
        .map_or(TorchLayout::Contiguous, |x| x.torch_layout())
}

/// `QFunctional.mul` / `mul_relu` (`quantized::mul`): numpy broadcasting (the
/// squeeze-excite gate `[N, C, H, W] * [N, C, 1, 1]`), its own output qparams.
#[derive(Debug, Clone)]
pub struct MulOp {
    out: ActQParams,
    relu: bool,
}

impl MulOp {
    /// A product quantized with `out` (ReLU fused if `relu`).
    pub fn new(out: ActQParams, relu: bool) -> Self {
        MulOp { out, relu }
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        Ok(Box::new(MulOp::new(r.act("out")?, r.flag("relu")?)))
    }
}

impl QuantOp for MulOp {
    fn kind(&self) -> &'static str {
        "Mul"
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        let [a, b] = inputs else {
            return Err(QuantError::UnsupportedConfig {
                context: "Mul".into(),
                reason: format!("takes two inputs, got {}", inputs.len()),
            });
        };
        let (a, b) = (a.int8("Mul")?, b.int8("Mul")?);
        let mut m =
            QMul::new(self.out.scale(), self.out.zero_point())?.with_layout(a.torch_layout());
        if self.relu {
            m = m.with_relu();
        }
        let held_nhwc = a.shape().len() == 4
            && b.shape().len() == 4
            && (a.layout() == Layout::Nhwc || b.layout() == Layout::Nhwc);
        if held_nhwc {
            let (xa, xb) = (nhwc(a, ctx, "Mul")?, nhwc(b, ctx, "Mul")?);
            let y = m.forward_nhwc(&xa, &xb)?;
            let s = y.data().shape();
            let torch = torch_of_full(&[a, b], &[s[0], s[3], s[1], s[2]]);
            Ok(Value::Int8(QAct::new(y, Layout::Nhwc, torch)?))
        } else {
            let y = m.forward(&nchw(a, ctx), &nchw(b, ctx))?;
            let torch = torch_of_full(&[a, b], y.data().shape());
            Ok(Value::Int8(QAct::new(y, Layout::Nchw, torch)?))
        }
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.out)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.act("out", self.out);
        rec.set("relu", self.relu as u8);
        Ok(())
    }
    fn arity(&self) -> usize {
        2
    }
}

/// `QFunctional.cat` (`quantized::cat`): every input requantized to the output's qparams.
#[derive(Debug, Clone)]
pub struct CatOp {
    dim: usize,
    n: usize,
    out: ActQParams,
}

impl CatOp {
    /// A concatenation of `n` inputs along `dim` quantized with `out`.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for no input.
    pub fn new(dim: usize, n: usize, out: ActQParams) -> Result<Self> {
        if n == 0 {
            return Err(QuantError::UnsupportedConfig {
                context: "Concat".into(),
                reason: "needs at least one input".into(),
            });
        }
        Ok(CatOp { dim, n, out })
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let n = r.num_inputs();
        Ok(Box::new(CatOp::new(r.hyper("dim", 0)?, n, r.act("out")?)?))
    }
}

impl QuantOp for CatOp {
    fn kind(&self) -> &'static str {
        "Concat"
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        let xs: Vec<&QAct> = inputs
            .iter()
            .map(|v| v.int8("Concat"))
            .collect::<Result<_>>()?;
        let cl = xs
            .iter()
            .all(|x| x.torch_layout() == TorchLayout::ChannelsLast && x.shape().len() == 4);
        let torch = if cl {
            TorchLayout::ChannelsLast
        } else {
            TorchLayout::Contiguous
        };
        let cat = QCat::new(self.dim, self.out.scale(), self.out.zero_point())?.with_layout(torch);
        let held_nhwc = self.dim < 4
            && xs.iter().all(|x| x.shape().len() == 4)
            && xs.iter().any(|x| x.layout() == Layout::Nhwc);
        if held_nhwc {
            let ts: Vec<Cow<'_, QTensor>> = xs
                .iter()
                .map(|x| nhwc(x, ctx, "Concat"))
                .collect::<Result<_>>()?;
            let refs: Vec<&QTensor> = ts.iter().map(|t| t.as_ref()).collect();
            let y = cat.forward_nhwc(&refs)?;
            Ok(Value::Int8(QAct::new(y, Layout::Nhwc, torch)?))
        } else {
            let ts: Vec<Cow<'_, QTensor>> = xs.iter().map(|x| nchw(x, ctx)).collect();
            let refs: Vec<&QTensor> = ts.iter().map(|t| t.as_ref()).collect();
            let y = cat.forward(&refs)?;
            Ok(Value::Int8(QAct::new(y, Layout::Nchw, torch)?))
        }
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.out)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.set("dim", self.dim);
        rec.act("out", self.out);
        Ok(())
    }
    fn arity(&self) -> usize {
        self.n
    }
}

/// `quantized.Hardswish`: its own output qparams.
#[derive(Debug, Clone)]
pub struct HardswishOp {
    out: ActQParams,
}

impl HardswishOp {
    /// A hardswish quantized with `out`.
    pub fn new(out: ActQParams) -> Self {
        HardswishOp { out }
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        Ok(Box::new(HardswishOp::new(r.act("out")?)))
    }
}

impl QuantOp for HardswishOp {
    fn kind(&self) -> &'static str {
        "Hardswish"
    }
    fn forward(&self, inputs: &[&Value], _: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "Hardswish")?.int8("Hardswish")?;
        let hs =
            QHardswish::new(self.out.scale(), self.out.zero_point())?.with_layout(x.torch_layout());
        same_layout(x, |t| hs.forward(t), |t| hs.forward_nhwc(t))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.out)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.act("out", self.out);
        Ok(())
    }
}

/// The output qparams PyTorch fixes for quint8 sigmoid and hardsigmoid (1/256, 0).
pub fn sigmoid_qparams() -> ActQParams {
    ActQParams::new(crate::nn::quantized::SIGMOID_SCALE, 0)
        .unwrap_or_else(|_| unreachable!("1/256 is a valid scale"))
}

/// `hardsigmoid` / `sigmoid` on quint8 (fixed output qparams 1/256, 0).
#[derive(Debug, Clone)]
pub struct SigmoidOp {
    hard: bool,
    onnxruntime: bool,
}

impl SigmoidOp {
    /// `Hardsigmoid` if `hard`, else `Sigmoid`.
    pub fn new(hard: bool) -> Self {
        SigmoidOp {
            hard,
            onnxruntime: false,
        }
    }
    /// With `on`, a hardsigmoid computes what ONNX Runtime runs for ptq's QDQ export
    /// (DequantizeLinear -> HardSigmoid(alpha = 1/6 as f32, beta = 0.5) -> QuantizeLinear to
    /// 1/256): `round_half_even(clamp(alpha * ((q - zp) * scale) + 0.5, 0, 1) * 256)` in f32,
    /// as a 256-entry table (saved as `arithmetic = onnxruntime`). Sigmoid keeps PyTorch's
    /// arithmetic.
    pub fn with_onnxruntime_arithmetic(mut self, on: bool) -> Self {
        self.onnxruntime = on;
        self
    }
    /// Reader for the file table (`Hardsigmoid`).
    ///
    /// # Errors
    /// Malformed `arithmetic`.
    pub fn read_hard(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let ort = read_onnxruntime_arithmetic(r)?;
        Ok(Box::new(
            SigmoidOp::new(true).with_onnxruntime_arithmetic(ort),
        ))
    }
    /// Reader for the file table (`Sigmoid`).
    ///
    /// # Errors
    /// None.
    pub fn read_soft(_: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        Ok(Box::new(SigmoidOp::new(false)))
    }
}

/// ORT's float hardsigmoid between a dequantize with `(scale, zp)` and a quantize to
/// `(1/256, 0)`, for every u8 input.
fn onnxruntime_hardsigmoid_table(scale: f32, zp: i32) -> [u8; 256] {
    let alpha = (1.0f64 / 6.0) as f32;
    let mut t = [0u8; 256];
    for (q, y) in t.iter_mut().enumerate() {
        let x = (q as i32 - zp) as f32 * scale;
        let h = (alpha * x + 0.5).clamp(0.0, 1.0);
        *y = (h * 256.0).round_ties_even().clamp(0.0, 255.0) as u8;
    }
    t
}

impl QuantOp for SigmoidOp {
    fn kind(&self) -> &'static str {
        if self.hard {
            "Hardsigmoid"
        } else {
            "Sigmoid"
        }
    }
    fn forward(&self, inputs: &[&Value], _: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, self.kind())?.int8(self.kind())?;
        let l = x.torch_layout();
        if self.hard && self.onnxruntime {
            let t = x.raw();
            let table = onnxruntime_hardsigmoid_table(t.scale(), t.zero_point());
            let q = sigmoid_qparams();
            let y = QTensor::new(
                t.data().mapv(|v| table[v as usize]),
                q.scale(),
                q.zero_point(),
            )?;
            Ok(Value::Int8(QAct::new(y, x.layout(), l)?))
        } else if self.hard {
            let f = QHardsigmoid::new().with_layout(l);
            same_layout(x, |t| f.forward(t), |t| f.forward_nhwc(t))
        } else {
            let f = QSigmoid::new().with_layout(l);
            same_layout(x, |t| f.forward(t), |t| f.forward_nhwc(t))
        }
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(sigmoid_qparams())
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        write_onnxruntime_arithmetic(rec, self.onnxruntime);
        Ok(())
    }
}

/// `upsample_nearest2d` on quint8 (keeps qparams).
#[derive(Debug, Clone)]
pub struct UpsampleOp {
    up: QUpsampleNearest2d,
    q: ActQParams,
}

impl UpsampleOp {
    /// Wraps the kernel.
    pub fn new(up: QUpsampleNearest2d, q: ActQParams) -> Self {
        UpsampleOp { up, q }
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records; the kernel's constructor errors.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let size = if r.flag("by_size")? {
            let (h, w) = r.pair("size", 1)?;
            UpsampleSize::Size(h, w)
        } else {
            let h: f64 = r.parse("scale_h")?;
            let w: f64 = r.parse("scale_w")?;
            if !(h > 0.0 && h <= 64.0 && w > 0.0 && w <= 64.0) {
                return Err(r.bad(format!("implausible scale factors ({h}, {w})")));
            }
            UpsampleSize::Scale(h, w)
        };
        let mut up = QUpsampleNearest2d::new(size)?;
        if r.flag("exact")? {
            up = up.with_exact();
        }
        Ok(Box::new(UpsampleOp::new(up, r.act("q")?)))
    }
}

impl QuantOp for UpsampleOp {
    fn kind(&self) -> &'static str {
        "Upsample"
    }
    fn forward(&self, inputs: &[&Value], _: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "Upsample")?.int8("Upsample")?;
        same_layout(x, |t| self.up.forward(t), |t| self.up.forward_nhwc(t))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.q)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        match self.up.size() {
            UpsampleSize::Size(h, w) => {
                rec.set("by_size", 1);
                rec.pair("size", (h, w));
            }
            UpsampleSize::Scale(h, w) => {
                rec.set("by_size", 0);
                rec.set("scale_h", h);
                rec.set("scale_w", w);
            }
        }
        rec.set("exact", self.up.is_exact() as u8);
        rec.act("q", self.q);
        Ok(())
    }
}

/// `quantized.BatchNorm2d` (an unfused batch norm in int8): its own output qparams.
#[derive(Debug, Clone)]
pub struct BatchNormOp {
    bn: QBatchNorm2d,
    out: ActQParams,
}

impl BatchNormOp {
    /// Wraps the kernel.
    ///
    /// # Errors
    /// None in practice (the kernel's qparams are valid).
    pub fn new(bn: QBatchNorm2d) -> Result<Self> {
        let (s, z) = bn.output_qparams();
        Ok(BatchNormOp {
            bn,
            out: ActQParams::new(s, z)?,
        })
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records; the kernel's constructor errors.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let (_, w) = r.f32s("weight", 1)?;
        let (_, b) = r.f32s("bias", 1)?;
        let (_, m) = r.f32s("mean", 1)?;
        let (_, v) = r.f32s("var", 1)?;
        let eps: f64 = r.parse("eps")?;
        let out = r.act("out")?;
        let mut bn = QBatchNorm2d::new(
            Some(ndarray::ArrayView1::from(&w[..])),
            Some(ndarray::ArrayView1::from(&b[..])),
            ndarray::ArrayView1::from(&m[..]),
            ndarray::ArrayView1::from(&v[..]),
            eps,
            out.scale(),
            out.zero_point(),
        )?;
        if r.flag("relu")? {
            bn = bn.with_relu();
        }
        Ok(Box::new(BatchNormOp::new(bn)?))
    }
}

impl QuantOp for BatchNormOp {
    fn kind(&self) -> &'static str {
        "BatchNorm2d"
    }
    fn forward(&self, inputs: &[&Value], _: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "BatchNorm2d")?.int8("BatchNorm2d")?;
        same_layout(x, |t| self.bn.forward(t), |t| self.bn.forward_nhwc(t))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.out)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        let (w, b, m, v) = self.bn.params();
        let c = [w.len()];
        rec.f32s("weight", &c, w);
        rec.f32s("bias", &c, b);
        rec.f32s("mean", &c, m);
        rec.f32s("var", &c, v);
        rec.set("eps", self.bn.eps());
        rec.set("relu", self.bn.is_relu() as u8);
        rec.act("out", self.out);
        Ok(())
    }
    fn weight_bytes(&self) -> usize {
        self.bn.channels() * 16
    }
}

/// `permute` / `transpose(...).contiguous()` on int8 values (keeps qparams; the result is
/// a contiguous tensor, as after PyTorch's `.contiguous()`).
#[derive(Debug, Clone)]
pub struct PermuteOp {
    dims: Vec<usize>,
    q: ActQParams,
}

impl PermuteOp {
    /// Output axis `i` is input axis `dims[i]`.
    pub fn new(dims: Vec<usize>, q: ActQParams) -> Self {
        PermuteOp { dims, q }
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let v: String = r.parse("dims")?;
        let dims = v
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>().ok().filter(|&d| d < 16))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| r.bad(format!("permutation {v:?}")))?;
        Ok(Box::new(PermuteOp::new(dims, r.act("q")?)))
    }
}

impl QuantOp for PermuteOp {
    fn kind(&self) -> &'static str {
        "Permute"
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "Permute")?.int8("Permute")?;
        let t = nchw(x, ctx);
        let n = t.data().ndim();
        let mut seen = vec![false; n];
        if self.dims.len() != n
            || self
                .dims
                .iter()
                .any(|&d| d >= n || std::mem::replace(&mut seen[d], true))
        {
            return Err(QuantError::ShapeMismatch {
                context: "Permute".into(),
                expected: format!("a rank-{} tensor for {:?}", self.dims.len(), self.dims),
                actual: format!("shape {:?}", t.data().shape()),
            });
        }
        let data = t
            .data()
            .view()
            .permuted_axes(IxDyn(&self.dims))
            .as_standard_layout()
            .into_owned();
        Ok(Value::Int8(QAct::contiguous(QTensor::new(
            data,
            t.scale(),
            t.zero_point(),
        )?)))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.q)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        let s: Vec<String> = self.dims.iter().map(|d| d.to_string()).collect();
        rec.set("dims", s.join(","));
        rec.act("q", self.q);
        Ok(())
    }
}

/// `narrow` / one part of `chunk` / `split` on int8 values (keeps qparams and PyTorch's
/// memory format: a view).
#[derive(Debug, Clone)]
pub struct SliceOp {
    axis: usize,
    start: usize,
    end: usize,
    q: ActQParams,
}

impl SliceOp {
    /// Keeps `start..end` of `axis`.
    pub fn new(axis: usize, start: usize, end: usize, q: ActQParams) -> Self {
        SliceOp {
            axis,
            start,
            end,
            q,
        }
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        Ok(Box::new(SliceOp::new(
            r.hyper("axis", 0)?,
            r.parse("start")?,
            r.parse("end")?,
            r.act("q")?,
        )))
    }
}

impl QuantOp for SliceOp {
    fn kind(&self) -> &'static str {
        "Slice"
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "Slice")?.int8("Slice")?;
        let t = nchw(x, ctx);
        let s = t.data().shape();
        if self.axis >= s.len() || self.start >= self.end || self.end > s[self.axis] {
            return Err(QuantError::ShapeMismatch {
                context: "Slice".into(),
                expected: format!(
                    "a dimension {} holding {}..{}",
                    self.axis, self.start, self.end
                ),
                actual: format!("shape {s:?}"),
            });
        }
        let data = t
            .data()
            .slice_axis(
                ndarray::Axis(self.axis),
                ndarray::Slice::from(self.start..self.end),
            )
            .as_standard_layout()
            .into_owned();
        let y = QTensor::new(data, t.scale(), t.zero_point())?;
        Ok(Value::Int8(QAct::new(y, Layout::Nchw, x.torch_layout())?))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.q)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        rec.set("axis", self.axis);
        rec.set("start", self.start);
        rec.set("end", self.end);
        rec.act("q", self.q);
        Ok(())
    }
}

/// `torch.mean(x, dims, keepdim)` on int8 values: keeps the input's qparams; PyTorch's
/// integer or dequantize-average-requantize path by memory format (see [`QMean`]).
#[derive(Debug, Clone)]
pub struct MeanOp {
    mean: QMean,
    q: ActQParams,
}

impl MeanOp {
    /// A mean over `dims` (strictly ascending).
    ///
    /// # Errors
    /// As [`QMean::new`].
    pub fn new(dims: &[usize], keepdim: bool, q: ActQParams) -> Result<Self> {
        Ok(MeanOp {
            mean: QMean::new(dims, keepdim)?,
            q,
        })
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let v: String = r.parse("dims")?;
        let dims = v
            .split(',')
            .map(|s| s.parse::<usize>().ok().filter(|&d| d < 16))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| r.bad(format!("mean dims {v:?}")))?;
        let mean = MeanOp::new(&dims, r.flag("keepdim")?, r.act("q")?).map_err(|e| r.bad(e))?;
        Ok(Box::new(mean))
    }
}

impl QuantOp for MeanOp {
    fn kind(&self) -> &'static str {
        "Mean"
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "Mean")?.int8("Mean")?;
        let t = nchw(x, ctx);
        let y = self.mean.forward(&t, x.torch_layout())?;
        let torch = self.mean.output_layout(t.data().shape(), x.torch_layout());
        Ok(Value::Int8(QAct::new(y, Layout::Nchw, torch)?))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.q)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        let s: Vec<String> = self.mean.dims().iter().map(|d| d.to_string()).collect();
        rec.set("dims", s.join(","));
        rec.set("keepdim", u8::from(self.mean.keepdim()));
        rec.act("q", self.q);
        Ok(())
    }
}

/// `quantized.LayerNorm` (`torch.ops.quantized.layer_norm`): normalizes the trailing
/// dimensions of the logical (NCHW) order; its own output qparams. PyTorch makes the input
/// contiguous, so the output is contiguous too.
#[derive(Debug, Clone)]
pub struct LayerNormOp {
    ln: QLayerNorm,
    out: ActQParams,
}

impl LayerNormOp {
    /// Wraps the kernel.
    ///
    /// # Errors
    /// None in practice (the kernel's qparams are valid).
    pub fn new(ln: QLayerNorm) -> Result<Self> {
        let (s, z) = ln.output_qparams();
        Ok(LayerNormOp {
            ln,
            out: ActQParams::new(s, z)?,
        })
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records; the kernel's constructor errors.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let v: String = r.parse("normalized_shape")?;
        let shape = v
            .split(',')
            .map(|s| s.parse::<usize>().ok().filter(|&d| d > 0))
            .collect::<Option<Vec<_>>>()
            .filter(|s| {
                s.len() <= 16
                    && s.iter()
                        .try_fold(1usize, |n, &d| n.checked_mul(d))
                        .is_some_and(|n| n <= 1 << 32)
            })
            .ok_or_else(|| r.bad(format!("normalized shape {v:?}")))?;
        let affine = |r: &mut OpRecordReader<'_, '_>, k: &str| -> Result<Option<Vec<f32>>> {
            Ok(if r.flag(&format!("has_{k}"))? {
                Some(r.f32s(k, 1)?.1)
            } else {
                None
            })
        };
        let w = affine(r, "weight")?;
        let b = affine(r, "bias")?;
        let eps: f64 = r.parse("eps")?;
        let out = r.act("out")?;
        let ln = QLayerNorm::new(
            &shape,
            w.as_deref().map(ndarray::ArrayView1::from),
            b.as_deref().map(ndarray::ArrayView1::from),
            eps,
            out.scale(),
            out.zero_point(),
        )?;
        Ok(Box::new(LayerNormOp::new(ln)?))
    }
}

impl QuantOp for LayerNormOp {
    fn kind(&self) -> &'static str {
        "LayerNorm"
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "LayerNorm")?.int8("LayerNorm")?;
        let t = nchw(x, ctx);
        let y = self.ln.forward(&t)?;
        Ok(Value::Int8(QAct::new(
            y,
            Layout::Nchw,
            TorchLayout::Contiguous,
        )?))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.out)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        let s: Vec<String> = self
            .ln
            .normalized_shape()
            .iter()
            .map(|d| d.to_string())
            .collect();
        rec.set("normalized_shape", s.join(","));
        let (w, b) = self.ln.affine();
        for (k, v) in [("weight", w), ("bias", b)] {
            rec.set(&format!("has_{k}"), u8::from(v.is_some()));
            if let Some(v) = v {
                rec.f32s(k, &[v.len()], v);
            }
        }
        rec.set("eps", self.ln.eps());
        rec.act("out", self.out);
        Ok(())
    }
    fn weight_bytes(&self) -> usize {
        let (w, b) = self.ln.affine();
        4 * (w.map_or(0, <[f32]>::len) + b.map_or(0, <[f32]>::len))
    }
}

/// Bilinear upsampling on int8 values (`quantized::upsample_bilinear2d`, what
/// `nn.Upsample(mode="bilinear")` runs on a quantized tensor in PyTorch eager mode): keeps the
/// input's qparams; the PyTorch kernel (NCHW or channels-last arithmetic) follows the memory
/// format PyTorch would hold the input in.
#[derive(Debug, Clone)]
pub struct BilinearUpsampleOp {
    size: UpsampleSize,
    align_corners: bool,
    q: ActQParams,
}

impl BilinearUpsampleOp {
    /// Upsampling to `size` with PyTorch's `align_corners`; the input has qparams `q`.
    ///
    /// # Errors
    /// As [`QUpsampleBilinear2d::new`] (non-positive or non-finite sizes).
    pub fn new(size: UpsampleSize, align_corners: bool, q: ActQParams) -> Result<Self> {
        QUpsampleBilinear2d::new(size, align_corners)?;
        Ok(BilinearUpsampleOp {
            size,
            align_corners,
            q,
        })
    }
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let size = if r.flag("by_size")? {
            let (h, w) = r.pair("size", 1)?;
            UpsampleSize::Size(h, w)
        } else {
            UpsampleSize::Scale(r.parse("scale_h")?, r.parse("scale_w")?)
        };
        let op = BilinearUpsampleOp::new(size, r.flag("align_corners")?, r.act("q")?)
            .map_err(|e| r.bad(e))?;
        Ok(Box::new(op))
    }
}

impl QuantOp for BilinearUpsampleOp {
    fn kind(&self) -> &'static str {
        "UpsampleBilinear"
    }
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value> {
        let x = one(inputs, "UpsampleBilinear")?.int8("UpsampleBilinear")?;
        let up =
            QUpsampleBilinear2d::new(self.size, self.align_corners)?.with_layout(x.torch_layout());
        let t = nchw(x, ctx);
        let y = up.forward(&t)?;
        Ok(Value::Int8(QAct::new(y, Layout::Nchw, x.torch_layout())?))
    }
    fn output_qparams(&self) -> Option<ActQParams> {
        Some(self.q)
    }
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()> {
        match self.size {
            UpsampleSize::Size(h, w) => {
                rec.set("by_size", 1);
                rec.pair("size", (h, w));
            }
            UpsampleSize::Scale(h, w) => {
                rec.set("by_size", 0);
                rec.set("scale_h", h);
                rec.set("scale_w", w);
            }
        }
        rec.set("align_corners", u8::from(self.align_corners));
        rec.act("q", self.q);
        Ok(())
    }
}
