//! Quantization over the graph: int8 operations as values of one trait, and the int8
//! graph that runs them.
//!
//! * [`QuantOp`]: what every int8 (or float-island) operation of a [`QuantizedGraph`]
//!   is: it runs on [`Value`]s, says its output parameters, and writes itself into the
//!   saved file. Each op type also has an associated `from_observed` constructor (used by
//!   `convert`) and a reader registered in ONE table ([`record::READERS`]); adding an op
//!   is one type, one `impl QuantOp` and one table entry.
//! * [`Value`]: an activation between two ops: `f32` (float islands, the model's inputs and
//!   outputs) or int8 ([`QAct`]: a [`QTensor`] plus the memory layout it is held in, so
//!   activations stay NHWC between convolutions and are transposed only where an op needs
//!   NCHW, plus PyTorch's memory format, which decides the rounding of a few kernels).
//! * [`QuantizedGraph`]: nodes in topological order, each with its name, its inputs and
//!   its op; `forward` (float in and out), `forward_quantized` (the int8 outputs with their
//!   qparams), `profile` (per-node timings), and accessors for any node's int8 weights,
//!   weight qparams and output qparams.
//!
//! # Examples
//! ```
//! use ndarray::{Array1, Array4, ArrayD, IxDyn};
//! use ptq::graph::{Dim, GraphBuilder, Op};
//! use ptq::nn::Conv2d;
//! use ptq::qconfig::{QConfig, QConfigMap};
//! use ptq::quant::{calibrate, convert, prepare, QuantizedGraph};
//!
//! let mut g = GraphBuilder::new();
//! let x = g.input("x", &[Dim::Batch, 3.into(), 8.into(), 8.into()])?;
//! let q = g.quant_stub("quant", x)?;
//! let conv = Conv2d::new(Array4::from_elem((4, 3, 3, 3), 0.1), Some(Array1::zeros(4)))?;
//! let y = g.node("conv", Op::ConvReLU2d(conv.with_padding(1, 1)), &[q])?;
//! let skip = g.conv2d("skip", q, Conv2d::new(Array4::from_elem((4, 3, 1, 1), 0.2), None)?)?;
//! let z = g.add_relu("add", y, skip)?;
//! let out = g.dequant_stub("dequant", z)?;
//! g.output(out)?;
//!
//! let mut prepared = prepare(g.build()?, &QConfigMap::new(QConfig::fbgemm()))?;
//! let batches = (0..4).map(|i| ArrayD::from_elem(IxDyn(&[2, 3, 8, 8]), i as f32 * 0.25));
//! let report = calibrate(&mut prepared, batches)?; // any iterator, no callback
//! assert_eq!(report.batches, 4);
//! let int8 = convert(prepared)?;
//! let x = ArrayD::from_elem(IxDyn(&[1, 3, 8, 8]), 0.5f32);
//! let y = int8.forward(std::slice::from_ref(&x))?;
//! assert_eq!(y[0].shape(), &[1, 4, 8, 8]);
//! // int8 weights and qparams of any node; per-node timings; saving
//! let (w, wq) = int8.weight("conv")?.unwrap();
//! assert_eq!((w.shape(), wq.num_channels()), (&[4, 3, 3, 3][..], 4));
//! assert!(int8.output_qparams("add")?.is_some());
//! assert_eq!(int8.profile(std::slice::from_ref(&x))?.len(), int8.nodes().len());
//! let loaded = QuantizedGraph::from_bytes(&int8.to_bytes()?)?;
//! assert_eq!(loaded.forward(std::slice::from_ref(&x))?, y);
//! # Ok::<(), ptq::QuantError>(())
//! ```
//!
//! Differences from the sketch in the shared interface notes, on purpose: `forward` takes
//! `&[&Value]` rather than `&[&QTensor]` (borders and float islands are ops too, so one
//! executor walks the whole graph), and `output_qparams` returns `Option<ActQParams>`
//! (`None` for ops whose output is float).

mod convert;
mod exec;
mod float_record;
pub mod ops;
mod prepare;
pub mod record;

pub use convert::{convert, FloatOp, FromObserved, Observed};
pub use exec::{NodeProfile, QNode, QuantizedGraph};
pub use prepare::{
    calibrate, calibrate_inputs, prepare, role, Domain, GraphCalibrationReport, NodePlan,
    NodeRange, PreparedGraph, Role,
};
pub use record::{OpRecordReader, OpRecordWriter};

use std::borrow::Cow;
use std::fmt::Debug;

use ndarray::{ArrayD, IxDyn};

use crate::error::{QuantError, Result};
use crate::nn::quantized::{QTensor, TorchLayout};
use crate::qparams::{ActQParams, QParams};

/// How an int8 activation is held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Logical order: NCHW for images, `[batch, features]` for vectors.
    Nchw,
    /// A rank-4 tensor held as `[n, h, w, c]` (what the convolutions read and write).
    Nhwc,
}

/// An int8 activation: values, qparams, and how they are laid out.
#[derive(Debug, Clone, PartialEq)]
pub struct QAct {
    tensor: QTensor,
    layout: Layout,
    torch: TorchLayout,
}

impl QAct {
    /// Wraps a tensor whose data is in `layout` (rank 4 for [`Layout::Nhwc`]); `torch` is
    /// the memory format PyTorch would hold it in.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for an NHWC tensor that is not rank 4.
    pub fn new(tensor: QTensor, layout: Layout, torch: TorchLayout) -> Result<Self> {
        if layout == Layout::Nhwc && tensor.data().ndim() != 4 {
            return Err(QuantError::ShapeMismatch {
                context: "QAct".into(),
                expected: "a rank-4 tensor for the NHWC layout".into(),
                actual: format!("shape {:?}", tensor.data().shape()),
            });
        }
        Ok(QAct {
            tensor,
            layout,
            torch,
        })
    }

    /// An NCHW (logical order) activation as a fresh `quantize_per_tensor` gives it.
    pub fn contiguous(tensor: QTensor) -> Self {
        QAct {
            tensor,
            layout: Layout::Nchw,
            torch: TorchLayout::Contiguous,
        }
    }

    /// The parameters.
    pub fn qparams(&self) -> ActQParams {
        // A QTensor always holds valid quint8 parameters.
        ActQParams::new(self.tensor.scale(), self.tensor.zero_point())
            .unwrap_or_else(|_| unreachable!("QTensor validates its qparams"))
    }

    /// The raw tensor, in [`QAct::layout`].
    pub fn raw(&self) -> &QTensor {
        &self.tensor
    }

    /// The layout of [`QAct::raw`].
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// PyTorch's memory format for this activation.
    pub fn torch_layout(&self) -> TorchLayout {
        self.torch
    }

    /// The tensor in logical (NCHW) order, transposing if it is held NHWC (a copy without
    /// transpose when the two orders agree: one channel or a 1x1 image).
    pub fn nchw(&self) -> Cow<'_, QTensor> {
        match self.layout {
            Layout::Nchw => Cow::Borrowed(&self.tensor),
            Layout::Nhwc => Cow::Owned(transpose(&self.tensor, false)),
        }
    }

    /// Whether converting to `layout` moves bytes: the tensor is held in the other
    /// layout, with more than one channel and more than one pixel (otherwise NCHW and
    /// NHWC hold the same bytes).
    pub fn needs_transpose(&self, layout: Layout) -> bool {
        let s = self.tensor.data().shape();
        self.layout != layout && s.len() == 4 && !orders_agree(s, self.layout)
    }

    /// The rank-4 tensor as `[n, h, w, c]`, transposing if it is held NCHW.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for a tensor that is not rank 4.
    pub fn nhwc(&self, context: &str) -> Result<Cow<'_, QTensor>> {
        if self.tensor.data().ndim() != 4 {
            return Err(QuantError::ShapeMismatch {
                context: context.into(),
                expected: "a rank-4 NCHW tensor".into(),
                actual: format!("shape {:?}", self.tensor.data().shape()),
            });
        }
        Ok(match self.layout {
            Layout::Nhwc => Cow::Borrowed(&self.tensor),
            Layout::Nchw => Cow::Owned(transpose(&self.tensor, true)),
        })
    }

    /// The logical (NCHW) shape.
    pub fn shape(&self) -> Vec<usize> {
        let s = self.tensor.data().shape();
        match self.layout {
            Layout::Nchw => s.to_vec(),
            Layout::Nhwc => vec![s[0], s[3], s[1], s[2]],
        }
    }

    /// The values as floats in logical (NCHW) order: PyTorch's `dequantize`, with the
    /// transpose of an NHWC tensor folded into the same pass.
    pub fn dequantize(&self) -> ArrayD<f32> {
        let s = self.tensor.data().shape();
        match (
            self.needs_transpose(Layout::Nchw),
            self.tensor.data().as_slice(),
        ) {
            (true, Some(src)) => {
                let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
                let ks = crate::kernels::KernelSet::current();
                let zp = self.tensor.zero_point() as u8;
                let f = crate::kernels::elementwise::dequantize_nhwc_to_nchw_vec(
                    ks,
                    src,
                    b,
                    c,
                    h * w,
                    self.tensor.scale(),
                    zp,
                );
                ArrayD::from_shape_vec(IxDyn(&[b, c, h, w]), f)
                    .unwrap_or_else(|_| unreachable!("a transpose keeps the element count"))
            }
            (false, _) => {
                let y = self.tensor.dequantize();
                match self.layout {
                    // One channel or one pixel: the same values, in the logical shape.
                    Layout::Nhwc => y
                        .into_shape_with_order(IxDyn(&self.shape()))
                        .unwrap_or_else(|_| unreachable!("a reshape keeps the element count")),
                    Layout::Nchw => y,
                }
            }
            (true, None) => self.nchw().dequantize(),
        }
    }

    /// Consumes the activation; returns the tensor, its layout and PyTorch's memory
    /// format.
    pub(crate) fn into_parts(self) -> (QTensor, Layout, TorchLayout) {
        (self.tensor, self.layout, self.torch)
    }

    /// Consumes the activation; returns the tensor in logical (NCHW) order.
    pub fn into_nchw(self) -> QTensor {
        match self.layout {
            Layout::Nchw => self.tensor,
            Layout::Nhwc => transpose(&self.tensor, false),
        }
    }
}

/// Whether a rank-4 tensor of shape `s`, held in `held`, has the same bytes in NCHW and
/// NHWC order: one channel, or one pixel.
fn orders_agree(s: &[usize], held: Layout) -> bool {
    match held {
        Layout::Nchw => s[1] == 1 || s[2] * s[3] == 1,
        Layout::Nhwc => s[3] == 1 || s[1] * s[2] == 1,
    }
}

/// NCHW -> NHWC (`to_nhwc`) or back.
fn transpose(t: &QTensor, to_nhwc: bool) -> QTensor {
    let s = t.data().shape();
    let (sh, agree) = if to_nhwc {
        ([s[0], s[2], s[3], s[1]], orders_agree(s, Layout::Nchw))
    } else {
        ([s[0], s[3], s[1], s[2]], orders_agree(s, Layout::Nhwc))
    };
    if agree {
        // The same bytes in both orders: a reshape.
        let data = ArrayD::from_shape_vec(IxDyn(&sh), t.to_vec())
            .unwrap_or_else(|_| unreachable!("a reshape keeps the element count"));
        return QTensor::new(data, t.scale(), t.zero_point())
            .unwrap_or_else(|_| unreachable!("the qparams come from a valid QTensor"));
    }
    let (shape, data) = if to_nhwc {
        let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
        (vec![b, h, w, c], t.to_nhwc())
    } else {
        let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
        let v = t.to_vec();
        (
            vec![b, c, h, w],
            crate::nn::quantized::nhwc_to_nchw_u8(&v, b, c, h * w),
        )
    };
    let data = ArrayD::from_shape_vec(IxDyn(&shape), data)
        .unwrap_or_else(|_| unreachable!("a transpose keeps the element count"));
    QTensor::new(data, t.scale(), t.zero_point())
        .unwrap_or_else(|_| unreachable!("the qparams come from a valid QTensor"))
}

/// An activation flowing between two ops.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A float tensor (logical order).
    Float(ArrayD<f32>),
    /// An int8 tensor.
    Int8(QAct),
}

impl Value {
    /// The int8 activation, or an error naming `context` if the value is float.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] when an int8 op
    /// receives a float value (convert inserts borders, so this means a hand-built or
    /// corrupted graph).
    pub fn int8(&self, context: &str) -> Result<&QAct> {
        match self {
            Value::Int8(q) => Ok(q),
            Value::Float(_) => Err(QuantError::UnsupportedConfig {
                context: context.into(),
                reason: "an int8 operation received a float activation (a missing quantize border)"
                    .into(),
            }),
        }
    }

    /// The value as floats in logical order (int8 values dequantized).
    pub fn to_f32(&self) -> Cow<'_, ArrayD<f32>> {
        match self {
            Value::Float(x) => Cow::Borrowed(x),
            Value::Int8(q) => Cow::Owned(q.dequantize()),
        }
    }

    /// The value as floats in logical order, moved out when it is float already.
    pub fn into_f32(self) -> ArrayD<f32> {
        match self {
            Value::Float(x) => x,
            Value::Int8(q) => q.dequantize(),
        }
    }

    /// The logical shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Value::Float(x) => x.shape().to_vec(),
            Value::Int8(q) => q.shape(),
        }
    }
}

/// Per-run state handed to every op: counts the layout transposes the executor and the
/// ops made, and carries the executor's hints for the node it runs.
#[derive(Debug, Default)]
pub struct ExecCtx {
    /// Number of NCHW <-> NHWC transposes of int8 activations made so far.
    pub transposes: usize,
    /// Every reader of the running node's output wants a rank-4 int8 activation held
    /// NHWC ([`QuantOp::wants_nhwc`]): an op that can write either layout at the same
    /// cost (the quantize border) writes NHWC. Only a hint: an op may ignore it.
    pub want_nhwc: bool,
}

/// An operation of a [`QuantizedGraph`]: int8 kernels, quantize / dequantize borders, and
/// float islands.
pub trait QuantOp: Debug + Send + Sync {
    /// The record tag in the saved file (also the name in summaries), e.g. `"Conv2d"`.
    fn kind(&self) -> &'static str;

    /// Runs the op.
    ///
    /// # Errors
    /// Shape errors naming the op, and int8/float mismatches of the inputs.
    fn forward(&self, inputs: &[&Value], ctx: &mut ExecCtx) -> Result<Value>;

    /// Runs the op on inputs some of which it may consume: the executor hands an input
    /// over as [`Cow::Owned`] at its last use (no other node and no graph output reads it
    /// later), so a pass-through op (identity, a flatten that moves no bytes) returns it
    /// without a copy and an elementwise op may write its output over it. Every other
    /// input comes [`Cow::Borrowed`]. The result must equal [`QuantOp::forward`]'s on the
    /// same values, which is what the default does.
    ///
    /// # Errors
    /// As [`QuantOp::forward`].
    fn forward_owned(&self, inputs: Vec<Cow<'_, Value>>, ctx: &mut ExecCtx) -> Result<Value> {
        let refs: Vec<&Value> = inputs.iter().map(|v| v.as_ref()).collect();
        self.forward(&refs, ctx)
    }

    /// Whether the op reads rank-4 int8 inputs held NHWC without transposing them (the
    /// convolutions); an op whose every reader says so writes NHWC where it can choose
    /// ([`ExecCtx::want_nhwc`]).
    fn wants_nhwc(&self) -> bool {
        false
    }

    /// The parameters of the int8 output (`None` if the output is float).
    fn output_qparams(&self) -> Option<ActQParams>;

    /// Writes the op's parameters (tensors and metadata) into the file record.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] if the op has no file form.
    fn write(&self, rec: &mut OpRecordWriter<'_>) -> Result<()>;

    /// The int8 weight (PyTorch's `[out, in/groups, kh, kw]` or `[out, in]` layout) and
    /// its qparams, for ops that have one.
    fn weight(&self) -> Option<(ArrayD<i8>, QParams)> {
        None
    }

    /// The float bias, for ops that have one.
    fn bias(&self) -> Option<&[f32]> {
        None
    }

    /// Bytes of the parameters this op holds.
    fn weight_bytes(&self) -> usize {
        0
    }

    /// How many inputs the op takes (checked on load and at run time).
    fn arity(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nhwc_round_trip_keeps_values_and_logical_shape() {
        let data: Vec<u8> = (0..2 * 3 * 4 * 5).map(|i| (i * 7 % 256) as u8).collect();
        let t = QTensor::new(
            ArrayD::from_shape_vec(IxDyn(&[2, 3, 4, 5]), data).unwrap(),
            0.1,
            3,
        )
        .unwrap();
        let a = QAct::contiguous(t.clone());
        let n = a.nhwc("t").unwrap().into_owned();
        assert_eq!(n.data().shape(), &[2, 4, 5, 3]);
        assert_eq!(n.data()[[1, 2, 3, 1]], t.data()[[1, 1, 2, 3]]);
        let b = QAct::new(n, Layout::Nhwc, TorchLayout::ChannelsLast).unwrap();
        assert_eq!(b.shape(), vec![2, 3, 4, 5]);
        assert_eq!(b.nchw().into_owned(), t);
        assert!(QAct::new(
            QTensor::new(ArrayD::zeros(IxDyn(&[2, 3])), 0.1, 0).unwrap(),
            Layout::Nhwc,
            TorchLayout::ChannelsLast
        )
        .is_err());
    }
}

#[cfg(test)]
mod graph_tests {
    //! A hand-built int8 graph using every int8 op, run and saved without the float graph.
    use super::exec::{QNode, QuantizedGraph};
    use super::ops::*;
    use super::*;
    use crate::nn::quantized::Conv2dParams;
    use crate::qparams::DType;
    use ndarray::{Array1, Array2};

    fn node(name: &str, inputs: &[usize], op: impl QuantOp + 'static) -> QNode {
        QNode {
            name: name.into(),
            inputs: inputs.to_vec(),
            op: Box::new(op),
        }
    }

    fn weights(shape: &[usize], seed: u32) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        ArrayD::from_shape_vec(
            IxDyn(shape),
            (0..n)
                .map(|i| {
                    (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0
                })
                .collect(),
        )
        .unwrap()
    }

    /// input -> quant -> conv(relu) -> conv -> add(conv_relu, conv) -> relu -> clamp ->
    /// maxpool -> avgpool -> adaptive -> identity -> flatten -> reshape -> linear_relu ->
    /// linear -> dequant
    pub(crate) fn every_op_graph() -> QuantizedGraph {
        let a = |s, z| ActQParams::new(s, z).unwrap();
        let pc = |n: usize| {
            crate::QParams::new(
                crate::QScheme::PerChannelSymmetric { axis: 0 },
                DType::QInt8,
                (-128, 127),
                (0..n).map(|i| 0.01 + i as f32 * 0.001).collect(),
                vec![0; n],
            )
            .unwrap()
        };
        let w1 = weights(&[4, 3, 3, 3], 1)
            .into_dimensionality::<ndarray::Ix4>()
            .unwrap();
        let w2 = weights(&[4, 4, 1, 1], 2)
            .into_dimensionality::<ndarray::Ix4>()
            .unwrap();
        let b1 = Array1::from(vec![0.1f32, -0.2, 0.3, 0.0]);
        let pad = Conv2dParams {
            padding: (1, 1),
            ..Default::default()
        };
        let c1 =
            ConvOp::from_float(w1.view(), Some(b1.view()), &pc(4), pad, a(0.05, 0), true).unwrap();
        let c2 = ConvOp::from_float(
            w2.view(),
            None,
            &crate::QParams::per_tensor(0.02, 0, DType::QInt8).unwrap(),
            Conv2dParams::default(),
            a(0.04, 120),
            false,
        )
        .unwrap();
        let l1w: Array2<f32> = weights(&[6, 4], 3).into_dimensionality().unwrap();
        let l2w: Array2<f32> = weights(&[3, 6], 4).into_dimensionality().unwrap();
        let l1 = LinearOp::from_float(l1w.view(), None, &pc(6), a(0.03, 0), true).unwrap();
        let l2 = LinearOp::from_float(
            l2w.view(),
            Some(Array1::from(vec![0.5f32, 0.0, -0.5]).view()),
            &pc(3),
            a(0.02, 128),
            false,
        )
        .unwrap();
        let qadd = a(0.06, 30);
        let nodes = vec![
            node("x", &[], InputOp),
            node("quant", &[0], QuantizeOp::new(a(0.02, 100))),
            node("conv1", &[1], c1),
            node("conv2", &[2], c2),
            node("add", &[2, 3], AddOp::new(qadd, false)),
            node("add_relu", &[4, 2], AddOp::new(a(0.07, 0), true)),
            node("relu", &[5], ReluOp::new(a(0.07, 0))),
            node("clamp", &[6], ClampOp::new(0.0, 0.5, a(0.07, 0)).unwrap()),
            node(
                "maxpool",
                &[7],
                MaxPoolOp::new((3, 3), (1, 1), (1, 1), (1, 1), a(0.07, 0)).unwrap(),
            ),
            node(
                "avgpool",
                &[8],
                AvgPoolOp::new((2, 2), (2, 2), (0, 0), true, a(0.07, 0)).unwrap(),
            ),
            node(
                "adaptive",
                &[9],
                AdaptiveAvgPoolOp::new((1, 1), a(0.07, 0)).unwrap(),
            ),
            node("identity", &[10], IdentityOp::new(Some(a(0.07, 0)))),
            node("flatten", &[11], FlattenOp::new(1, -1, a(0.07, 0))),
            node("reshape", &[12], ReshapeOp::new(vec![-1, 4], a(0.07, 0))),
            node("fc1", &[13], l1),
            node("fc2", &[14], l2),
            node("dequant", &[15], DequantizeOp),
            // a second output through the ops of squeeze-excite / U-Net style graphs
            node("hardswish", &[5], HardswishOp::new(a(0.05, 10))),
            node("hardsigmoid", &[17], SigmoidOp::new(true)),
            node("mul", &[17, 18], MulOp::new(a(0.04, 12), false)),
            node("cat", &[19, 17], CatOp::new(1, 2, a(0.05, 8)).unwrap()),
            node(
                "up",
                &[20],
                UpsampleOp::new(
                    crate::nn::quantized::QUpsampleNearest2d::new(
                        crate::nn::quantized::UpsampleSize::Scale(2.0, 2.0),
                    )
                    .unwrap(),
                    a(0.05, 8),
                ),
            ),
            node(
                "bn",
                &[21],
                BatchNormOp::new(
                    crate::nn::quantized::QBatchNorm2d::new(
                        Some(Array1::from(vec![1.5f32; 8]).view()),
                        Some(Array1::from(vec![0.1f32; 8]).view()),
                        Array1::from(vec![0.2f32; 8]).view(),
                        Array1::from(vec![0.9f32; 8]).view(),
                        1e-5,
                        0.06,
                        40,
                    )
                    .unwrap(),
                )
                .unwrap(),
            ),
            node("sigmoid", &[22], SigmoidOp::new(false)),
            node("dequant2", &[23], DequantizeOp),
        ];
        QuantizedGraph::new(nodes, vec![0], vec![16, 24], 1234).unwrap()
    }

    fn input() -> ArrayD<f32> {
        weights(&[2, 3, 6, 6], 9).mapv(|v| v * 2.0)
    }

    #[test]
    fn every_op_runs_and_keeps_nhwc_between_convs() {
        let g = every_op_graph();
        let mut seen = Vec::new();
        let y = g
            .forward_with(&[input()], &mut |name, v| {
                if let Value::Int8(q) = v {
                    seen.push((name.to_string(), q.layout()));
                }
            })
            .unwrap();
        assert_eq!(y[0].shape(), &[2, 3]);
        assert_eq!(y[1].shape(), &[2, 8, 12, 12]);
        // sigmoid's fixed output qparams: every value a multiple of 1/256 in [0, 1)
        assert!(y[1]
            .iter()
            .all(|v| (0.0..1.0).contains(v) && (v * 256.0).fract() == 0.0));
        let layout = |n: &str| seen.iter().find(|(k, _)| k == n).unwrap().1;
        assert_eq!(layout("conv1"), Layout::Nhwc);
        assert_eq!(layout("conv2"), Layout::Nhwc);
        assert_eq!(layout("add"), Layout::Nhwc);
        assert_eq!(layout("relu"), Layout::Nhwc);
        // pools keep NHWC too (the flatten after them converts to the logical order)
        assert_eq!(layout("maxpool"), Layout::Nhwc);
        assert_eq!(layout("avgpool"), Layout::Nhwc);
        // The output is a dequantized int8 tensor of fc2's parameters.
        for v in y[0].iter() {
            let q = (v / 0.02).round() + 128.0;
            assert!((0.0..=255.0).contains(&q) && ((q - 128.0) * 0.02 - v).abs() < 1e-6);
        }
        let prof = g.profile(&[input()]).unwrap();
        assert_eq!(prof.len(), g.nodes().len());
        assert_eq!(prof[2].kind, "ConvReLU2d");
    }

    #[test]
    fn the_executor_matches_the_nchw_kernels_step_by_step() {
        // Recompute the first steps with the plain NCHW kernels: NHWC inside the graph must
        // be bit-identical to PyTorch's logical results.
        let g = every_op_graph();
        let mut outs = std::collections::HashMap::new();
        g.forward_with(&[input()], &mut |name, v| {
            if let Value::Int8(q) = v {
                outs.insert(name.to_string(), q.nchw().into_owned());
            }
        })
        .unwrap();
        let x = QTensor::from_f32(&input(), 0.02, 100).unwrap();
        assert_eq!(outs["quant"], x);
        let (w1, q1) = g.weight("conv1").unwrap().unwrap();
        let c1 = crate::nn::quantized::QConvReLU2d::from_quantized(
            w1.view().into_dimensionality().unwrap(),
            &q1,
            Some(ndarray::ArrayView1::from(&[0.1f32, -0.2, 0.3, 0.0][..])),
            Conv2dParams {
                padding: (1, 1),
                ..Default::default()
            },
            0.05,
            0,
        )
        .unwrap();
        let y1 = c1.forward(&x).unwrap();
        assert_eq!(outs["conv1"], y1);
        let add = crate::nn::quantized::QAdd::new(0.06, 30).unwrap();
        let y2 = outs["conv2"].clone();
        assert_eq!(outs["add"], add.forward(&y1, &y2).unwrap());
    }

    /// The executor hands a value to its last reader: identity, the flatten and reshape of
    /// a one-pixel NHWC tensor return the very buffer they were given, clamp works in
    /// place; a value that a later node still reads is copied.
    #[test]
    fn last_readers_reuse_their_input_buffers() {
        let g = every_op_graph();
        let mut ptrs = std::collections::HashMap::new();
        g.forward_with(&[input()], &mut |name, v| {
            if let Value::Int8(q) = v {
                ptrs.insert(name.to_string(), q.raw().data().as_ptr() as usize);
            }
        })
        .unwrap();
        assert_eq!(ptrs["identity"], ptrs["adaptive"]);
        assert_eq!(ptrs["flatten"], ptrs["identity"]);
        assert_eq!(ptrs["reshape"], ptrs["flatten"]);
        assert_eq!(ptrs["clamp"], ptrs["relu"]);
        // add_relu is read again by hardswish after relu: relu writes a new buffer
        assert_ne!(ptrs["relu"], ptrs["add_relu"]);
    }

    /// A value read twice by one node, and a value that is also a graph output, are
    /// borrowed, never consumed: the results equal the ops run one by one on borrowed
    /// inputs.
    #[test]
    fn values_read_twice_or_returned_are_not_consumed() {
        let a = |s, z| ActQParams::new(s, z).unwrap();
        let (qin, qadd) = (a(0.02, 100), a(0.05, 10));
        let nodes = vec![
            node("x", &[], InputOp),
            node("quant", &[0], QuantizeOp::new(qin)),
            node("relu", &[1], ReluOp::new(qin)),
            node("add", &[2, 2], AddOp::new(qadd, false)),
            node("id", &[3], IdentityOp::new(Some(qadd))),
            node("dequant", &[4], DequantizeOp),
        ];
        let g = QuantizedGraph::new(nodes, vec![0], vec![5, 2, 5], 0).unwrap();
        let x = input();
        let got = g.forward(std::slice::from_ref(&x)).unwrap();
        let mut ctx = ExecCtx::default();
        let q = QuantizeOp::new(qin)
            .forward(&[&Value::Float(x.clone())], &mut ctx)
            .unwrap();
        let r = ReluOp::new(qin).forward(&[&q], &mut ctx).unwrap();
        let s = AddOp::new(qadd, false)
            .forward(&[&r, &r], &mut ctx)
            .unwrap();
        let y = DequantizeOp.forward(&[&s], &mut ctx).unwrap();
        assert_eq!(
            got,
            vec![
                y.to_f32().into_owned(),
                r.to_f32().into_owned(),
                y.into_f32()
            ]
        );
    }

    /// The quantize border writes NHWC when the executor asks (every reader a
    /// convolution): the same values as the logical-order quantization, PyTorch's
    /// contiguous memory format kept; non-finite input is still refused, naming the graph
    /// input.
    #[test]
    fn the_quantize_border_writes_nhwc_for_convolutions() {
        let q = ActQParams::new(0.02, 100).unwrap();
        let x = input();
        let mut ctx = ExecCtx {
            want_nhwc: true,
            ..Default::default()
        };
        let y = ops::quantize_act(&x, q, &mut ctx).unwrap();
        assert_eq!(
            (y.layout(), y.torch_layout()),
            (Layout::Nhwc, TorchLayout::Contiguous)
        );
        assert_eq!(ctx.transposes, 1);
        assert_eq!(
            y.nchw().into_owned(),
            QTensor::from_f32(&x, 0.02, 100).unwrap()
        );
        let g = every_op_graph();
        let prof = g.profile(std::slice::from_ref(&x)).unwrap();
        let quant = prof.iter().find(|p| p.name == "quant").unwrap();
        assert_eq!(quant.transposes, 1);
        let conv1 = prof.iter().find(|p| p.name == "conv1").unwrap();
        assert_eq!(conv1.transposes, 0);
        for at in [0, 100, x.len() - 1] {
            let mut bad = x.clone();
            bad.as_slice_mut().unwrap()[at] = f32::NAN;
            let err = g.forward(&[bad]).unwrap_err();
            assert!(
                matches!(&err, QuantError::NonFinite { context, nan: 1, .. } if context == "x"),
                "{err}"
            );
        }
    }

    #[test]
    fn save_load_round_trip_is_bit_identical_for_every_op() {
        let g = every_op_graph();
        let bytes = g.to_bytes().unwrap();
        let h = QuantizedGraph::from_bytes(&bytes).unwrap();
        assert_eq!(h.nodes().len(), g.nodes().len());
        for (a, b) in g.nodes().iter().zip(h.nodes()) {
            assert_eq!(
                (a.name(), a.inputs(), a.op().kind()),
                (b.name(), b.inputs(), b.op().kind())
            );
            assert_eq!(a.op().output_qparams(), b.op().output_qparams());
            assert_eq!(a.op().weight(), b.op().weight());
        }
        assert_eq!(
            h.forward(&[input()]).unwrap(),
            g.forward(&[input()]).unwrap()
        );
        // (the metadata's key order is not fixed, so the bytes themselves may differ)
        let again = QuantizedGraph::from_bytes(&h.to_bytes().unwrap()).unwrap();
        assert_eq!(
            again.forward(&[input()]).unwrap(),
            g.forward(&[input()]).unwrap()
        );
        assert_eq!(h.float_weight_bytes(), 1234);
    }

    #[test]
    fn hostile_files_are_refused_without_panicking() {
        let g = every_op_graph();
        let bytes = g.to_bytes().unwrap();
        // every truncation
        for cut in (0..bytes.len()).step_by(97) {
            assert!(QuantizedGraph::from_bytes(&bytes[..cut]).is_err());
        }
        // metadata edits
        let edit = |from: &str, to: &str| {
            let s = replace_in_header(&bytes, from, to);
            QuantizedGraph::from_bytes(&s)
        };
        let err = edit("\"1:inputs\":\"0\"", "\"1:inputs\":\"5\"").unwrap_err();
        assert!(err.to_string().contains("node index below 1"), "{err}");
        let err = edit("\"nodes\":\"25\"", "\"nodes\":\"99999999\"").unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        let err = edit("ptq-qmodel/2", "ptq-qmodel/1").unwrap_err();
        assert!(err.to_string().contains("QuantizedModel::load"), "{err}");
        let err = edit("\"4:kind\":\"Add\"", "\"4:kind\":\"Nope\"").unwrap_err();
        assert!(err.to_string().contains("unknown op kind"), "{err}");
        let err = edit("\"4:inputs\":\"2,3\"", "\"4:inputs\":\"2\"").unwrap_err();
        assert!(err.to_string().contains("takes 2 inputs"), "{err}");
        let err = edit("\"8:kernel\":\"3,3\"", "\"8:kernel\":\"3,99999\"").unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        let err = edit("\"1:out\":\"0.02,100\"", "\"1:out\":\"0.02,300\"").unwrap_err();
        assert!(err.to_string().contains("zero point"), "{err}");
        // a ptq-qmodel/2 file read as ptq-qmodel/1 names the version
        let err = crate::nn::quantized::QuantizedModel::from_bytes(&bytes).unwrap_err();
        assert!(err.to_string().contains("ptq-qmodel/2"), "{err}");
    }

    /// Replaces `from` by `to` in the JSON header, fixing the header length.
    fn replace_in_header(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        assert!(header.contains(from), "{from} not in {header}");
        let h = header.replace(from, to);
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&bytes[8 + n..]);
        out
    }
}
