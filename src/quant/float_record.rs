//! The file record of a float island node ([`FloatOp`]): its op tag, output shape,
//! hyperparameters and `f32` parameters. Every op of the graph's set has a record except
//! `Custom` (user code has no file form; saving names the node).

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};

use super::convert::FloatOp;
use super::{OpRecordReader, OpRecordWriter, QuantOp};
use crate::error::{QuantError, Result};
use crate::graph::{
    Dim, LayerNorm, NearestRule, Node, NodeId, Op, OpKind, Pool2dSpec, Shape, UpsampleMode,
    UpsampleSpec,
};
use crate::io::qmodel::MAX_HYPERPARAMETER;
use crate::nn::{BatchNorm2d, Conv2d, Linear};

fn list<T: ToString>(v: &[T]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn pool_write(rec: &mut OpRecordWriter<'_>, p: &Pool2dSpec) {
    rec.pair("kernel", p.kernel);
    rec.pair("stride", p.stride);
    let (t, l, b, r) = p.padding;
    rec.set("padding", list(&[t, l, b, r]));
    rec.pair("dilation", p.dilation);
    rec.set("ceil_mode", p.ceil_mode as u8);
    rec.set("count_include_pad", p.count_include_pad as u8);
    rec.set(
        "divisor_override",
        p.divisor_override
            .map_or("none".to_string(), |d| d.to_string()),
    );
}

/// Writes a float node.
///
/// # Errors
/// [`QuantError::UnsupportedConfig`] for a `Custom` node.
pub(crate) fn write(node: &Node, rec: &mut OpRecordWriter<'_>) -> Result<()> {
    rec.set("op", node.op.kind().name());
    let shape: Vec<String> = node
        .shape
        .dims()
        .iter()
        .map(|d| match d {
            Dim::Batch => "N".to_string(),
            Dim::Fixed(n) => n.to_string(),
        })
        .collect();
    rec.set("shape", shape.join(","));
    for (k, a) in node.op.params() {
        let v: Vec<f32> = a.iter().copied().collect();
        rec.f32s(&format!("p.{k}"), a.shape(), &v);
    }
    match &node.op {
        Op::Conv2d(c) | Op::ConvReLU2d(c) => {
            rec.pair("stride", c.stride);
            let (t, l, b, r) = c.padding_tlbr();
            rec.set("padding", list(&[t, l, b, r]));
            rec.pair("dilation", c.dilation);
            rec.set("groups", c.groups);
        }
        Op::BatchNorm1d(b) | Op::BatchNorm2d(b) => rec.set("eps", b.eps),
        Op::Clamp { min, max } => {
            rec.set("min", min);
            rec.set("max", max);
        }
        Op::Gelu { tanh } => rec.set("tanh", *tanh as u8),
        Op::Concat { axis } | Op::Softmax { axis } => rec.set("axis", axis),
        Op::MaxPool2d(p) | Op::AvgPool2d(p) => pool_write(rec, p),
        Op::AdaptiveAvgPool2d(o) => rec.pair("output", *o),
        Op::Mean { dims, keepdim } => {
            rec.set("dims", list(dims));
            rec.set("keepdim", *keepdim as u8);
        }
        Op::Flatten { start_dim, end_dim } => {
            rec.set("start_dim", start_dim);
            rec.set("end_dim", end_dim);
        }
        Op::Reshape { shape } => rec.set("target", list(shape)),
        Op::Permute { dims } => rec.set("dims", list(dims)),
        Op::Slice { axis, start, end } => rec.set("slice", list(&[axis, start, end])),
        Op::Upsample(u) => {
            rec.set("size", u.size.map_or("none".into(), |(h, w)| format!("{h},{w}")));
            rec.set(
                "scale_factor",
                u.scale_factor
                    .map_or("none".into(), |(h, w)| format!("{h},{w}")),
            );
            let mode = match u.mode {
                UpsampleMode::Nearest(NearestRule::Floor) => "nearest",
                UpsampleMode::Nearest(NearestRule::Exact) => "nearest-exact",
                UpsampleMode::Nearest(NearestRule::HalfPixelRoundPreferFloor) => {
                    "nearest-half-pixel"
                }
                UpsampleMode::Bilinear {
                    align_corners: false,
                } => "bilinear",
                UpsampleMode::Bilinear {
                    align_corners: true,
                } => "bilinear-align-corners",
            };
            rec.set("mode", mode);
        }
        Op::LayerNorm(l) => {
            rec.set("normalized_shape", list(&l.normalized_shape));
            rec.set("eps", l.eps);
        }
        Op::Custom(_) => {
            return Err(QuantError::UnsupportedConfig {
                context: node.name.clone(),
                reason: format!(
                    "the custom float module {} has no file form; replace it with graph ops to save the model",
                    node.op.type_name()
                ),
            })
        }
        Op::Input
        | Op::Linear(_)
        | Op::LinearReLU(_)
        | Op::ReLU
        | Op::Hardswish
        | Op::Hardsigmoid
        | Op::Sigmoid
        | Op::SiLU
        | Op::Add
        | Op::AddReLU
        | Op::Mul
        | Op::Dropout
        | Op::Identity
        | Op::QuantStub
        | Op::DeQuantStub => {}
    }
    Ok(())
}

struct R<'x, 'r, 'a> {
    r: &'x mut OpRecordReader<'r, 'a>,
}

impl R<'_, '_, '_> {
    fn usizes(&self, k: &str, n: Option<usize>) -> Result<Vec<usize>> {
        let v: String = self.r.parse(k)?;
        let out: Vec<usize> = if v.is_empty() {
            Vec::new()
        } else {
            v.split(',')
                .map(|s| s.parse::<usize>().ok().filter(|&x| x <= MAX_HYPERPARAMETER))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    self.r
                        .bad(format!("`{k}` = {v:?} is not a list of small integers"))
                })?
        };
        if n.is_some_and(|n| n != out.len()) || out.len() > 16 {
            return Err(self.r.bad(format!("`{k}` = {v:?} has the wrong length")));
        }
        Ok(out)
    }
    fn opt_pair<T: std::str::FromStr + Copy>(&self, k: &str) -> Result<Option<(T, T)>> {
        let v: String = self.r.parse(k)?;
        if v == "none" {
            return Ok(None);
        }
        v.split_once(',')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .map(Some)
            .ok_or_else(|| self.r.bad(format!("`{k}` = {v:?} is not `a,b` or none")))
    }
    fn param(&mut self, k: &str) -> Result<ArrayD<f32>> {
        let name = format!("p.{k}");
        // rank is checked by the caller through the array conversion below
        for rank in 1..=4 {
            if let Ok((shape, v)) = self.r.f32s(&name, rank) {
                return ArrayD::from_shape_vec(IxDyn(&shape), v)
                    .map_err(|e| self.r.bad(format!("tensor `{name}`: {e}")));
            }
        }
        Err(self.r.bad(format!("missing or malformed tensor `{name}`")))
    }
    fn opt_param(&mut self, k: &str) -> Result<Option<ArrayD<f32>>> {
        if self.r.has_tensor(&format!("p.{k}")) {
            self.param(k).map(Some)
        } else {
            Ok(None)
        }
    }
    fn pool(&self) -> Result<Pool2dSpec> {
        let p = self.usizes("padding", Some(4))?;
        let d: String = self.r.parse("divisor_override")?;
        let divisor_override = if d == "none" {
            None
        } else {
            Some(
                d.parse::<usize>()
                    .ok()
                    .filter(|&x| (1..=MAX_HYPERPARAMETER).contains(&x))
                    .ok_or_else(|| self.r.bad(format!("divisor_override {d:?}")))?,
            )
        };
        Ok(Pool2dSpec {
            kernel: self.r.pair("kernel", 1)?,
            stride: self.r.pair("stride", 1)?,
            padding: (p[0], p[1], p[2], p[3]),
            dilation: self.r.pair("dilation", 1)?,
            ceil_mode: self.r.flag("ceil_mode")?,
            count_include_pad: self.r.flag("count_include_pad")?,
            divisor_override,
        })
    }
}

fn dim1(a: ArrayD<f32>, r: &OpRecordReader<'_, '_>) -> Result<Array1<f32>> {
    a.into_dimensionality()
        .map_err(|_| r.bad("a parameter is not rank 1"))
}

fn bn(x: &mut R<'_, '_, '_>) -> Result<BatchNorm2d> {
    let w = dim1(x.param("weight")?, x.r)?;
    let c = w.len();
    let b = BatchNorm2d {
        weight: w,
        bias: dim1(x.param("bias")?, x.r)?,
        running_mean: dim1(x.param("running_mean")?, x.r)?,
        running_var: dim1(x.param("running_var")?, x.r)?,
        eps: x.r.parse("eps")?,
    };
    if b.bias.len() != c || b.running_mean.len() != c || b.running_var.len() != c {
        return Err(x.r.bad("batch norm parameters of different lengths"));
    }
    Ok(b)
}

impl FloatOp {
    /// Reader for the file table.
    ///
    /// # Errors
    /// Malformed records; the float layers' constructor errors.
    pub fn read(r: &mut OpRecordReader<'_, '_>) -> Result<Box<dyn QuantOp>> {
        let tag: String = r.parse("op")?;
        let shape_s: String = r.parse("shape")?;
        let mut dims = Vec::new();
        for d in shape_s.split(',').filter(|s| !s.is_empty()) {
            dims.push(match d {
                "N" => Dim::Batch,
                n => Dim::Fixed(
                    n.parse()
                        .map_err(|_| r.bad(format!("shape {shape_s:?} does not parse")))?,
                ),
            });
            if dims.len() > 8 {
                return Err(r.bad(format!("shape {shape_s:?} has too many dimensions")));
            }
        }
        let n_inputs = r.num_inputs();
        let name = r.node_name().to_string();
        let mut x = R { r };
        let kind = |k: OpKind| tag == k.name();
        let op = if kind(OpKind::Conv2d) || kind(OpKind::ConvReLU2d) {
            let w: Array4<f32> = x
                .param("weight")?
                .into_dimensionality()
                .map_err(|_| x.r.bad("conv weight is not rank 4"))?;
            let b = match x.opt_param("bias")? {
                Some(b) => Some(dim1(b, x.r)?),
                None => None,
            };
            let p = x.usizes("padding", Some(4))?;
            let (sh, sw) = x.r.pair("stride", 1)?;
            let (dh, dw) = x.r.pair("dilation", 1)?;
            let groups = x.r.hyper("groups", 1)?;
            let mut c = Conv2d::new(w, b)?
                .with_stride(sh, sw)
                .with_padding_tlbr(p[0], p[1], p[2], p[3])
                .with_dilation(dh, dw);
            c.groups = groups;
            if kind(OpKind::Conv2d) {
                Op::Conv2d(c)
            } else {
                Op::ConvReLU2d(c)
            }
        } else if kind(OpKind::Linear) || kind(OpKind::LinearReLU) {
            let w: Array2<f32> = x
                .param("weight")?
                .into_dimensionality()
                .map_err(|_| x.r.bad("linear weight is not rank 2"))?;
            let b = match x.opt_param("bias")? {
                Some(b) => Some(dim1(b, x.r)?),
                None => None,
            };
            let l = Linear::new(w, b)?;
            if kind(OpKind::Linear) {
                Op::Linear(l)
            } else {
                Op::LinearReLU(l)
            }
        } else if kind(OpKind::BatchNorm1d) {
            Op::BatchNorm1d(bn(&mut x)?)
        } else if kind(OpKind::BatchNorm2d) {
            Op::BatchNorm2d(bn(&mut x)?)
        } else if kind(OpKind::ReLU) {
            Op::ReLU
        } else if kind(OpKind::Clamp) {
            Op::Clamp {
                min: x.r.parse("min")?,
                max: x.r.parse("max")?,
            }
        } else if kind(OpKind::Hardswish) {
            Op::Hardswish
        } else if kind(OpKind::Hardsigmoid) {
            Op::Hardsigmoid
        } else if kind(OpKind::Sigmoid) {
            Op::Sigmoid
        } else if kind(OpKind::SiLU) {
            Op::SiLU
        } else if kind(OpKind::Gelu) {
            Op::Gelu {
                tanh: x.r.flag("tanh")?,
            }
        } else if kind(OpKind::Add) {
            Op::Add
        } else if kind(OpKind::AddReLU) {
            Op::AddReLU
        } else if kind(OpKind::Mul) {
            Op::Mul
        } else if kind(OpKind::Concat) {
            Op::Concat {
                axis: x.r.hyper("axis", 0)?,
            }
        } else if kind(OpKind::Softmax) {
            Op::Softmax {
                axis: x.r.hyper("axis", 0)?,
            }
        } else if kind(OpKind::MaxPool2d) {
            Op::MaxPool2d(x.pool()?)
        } else if kind(OpKind::AvgPool2d) {
            Op::AvgPool2d(x.pool()?)
        } else if kind(OpKind::AdaptiveAvgPool2d) {
            Op::AdaptiveAvgPool2d(x.r.pair("output", 1)?)
        } else if kind(OpKind::Mean) {
            Op::Mean {
                dims: x.usizes("dims", None)?,
                keepdim: x.r.flag("keepdim")?,
            }
        } else if kind(OpKind::Flatten) {
            let end_dim: isize = x.r.parse("end_dim")?;
            if end_dim.unsigned_abs() > 16 {
                return Err(x.r.bad(format!("end_dim {end_dim}")));
            }
            Op::Flatten {
                start_dim: x.r.hyper("start_dim", 0)?,
                end_dim,
            }
        } else if kind(OpKind::Reshape) {
            let v: String = x.r.parse("target")?;
            let shape = v
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<isize>().ok().filter(|d| *d >= -1))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| x.r.bad(format!("reshape target {v:?}")))?;
            Op::Reshape { shape }
        } else if kind(OpKind::Permute) {
            Op::Permute {
                dims: x.usizes("dims", None)?,
            }
        } else if kind(OpKind::Slice) {
            let s = x.usizes("slice", Some(3))?;
            Op::Slice {
                axis: s[0],
                start: s[1],
                end: s[2],
            }
        } else if kind(OpKind::Upsample) {
            let mode: String = x.r.parse("mode")?;
            let mode = match mode.as_str() {
                "nearest" => UpsampleMode::Nearest(NearestRule::Floor),
                "nearest-exact" => UpsampleMode::Nearest(NearestRule::Exact),
                "nearest-half-pixel" => {
                    UpsampleMode::Nearest(NearestRule::HalfPixelRoundPreferFloor)
                }
                "bilinear" => UpsampleMode::Bilinear {
                    align_corners: false,
                },
                "bilinear-align-corners" => UpsampleMode::Bilinear {
                    align_corners: true,
                },
                m => return Err(x.r.bad(format!("upsample mode {m:?}"))),
            };
            let size: Option<(usize, usize)> = x.opt_pair("size")?;
            if size.is_some_and(|(h, w)| h > 1 << 16 || w > 1 << 16) {
                return Err(x.r.bad("upsample size is implausible"));
            }
            let scale_factor: Option<(f32, f32)> = x.opt_pair("scale_factor")?;
            if scale_factor.is_some_and(|(h, w)| !(h > 0.0 && h <= 64.0 && w > 0.0 && w <= 64.0)) {
                return Err(x.r.bad("upsample scale factor is implausible"));
            }
            Op::Upsample(UpsampleSpec {
                size,
                scale_factor,
                mode,
            })
        } else if kind(OpKind::LayerNorm) {
            let normalized_shape = x.usizes("normalized_shape", None)?;
            let weight = x.opt_param("weight")?;
            let bias = x.opt_param("bias")?;
            for p in [&weight, &bias].into_iter().flatten() {
                if p.shape() != normalized_shape.as_slice() {
                    return Err(x
                        .r
                        .bad("layer norm parameters do not match normalized_shape"));
                }
            }
            Op::LayerNorm(LayerNorm {
                normalized_shape,
                weight,
                bias,
                eps: x.r.parse("eps")?,
            })
        } else if kind(OpKind::Dropout) {
            Op::Dropout
        } else if kind(OpKind::Identity) {
            Op::Identity
        } else {
            return Err(x.r.bad(format!("float op {tag:?} has no file form")));
        };
        if op.arity().is_some_and(|a| a != n_inputs) || (op.arity().is_none() && n_inputs == 0) {
            return Err(x.r.bad(format!("{tag} does not take {n_inputs} inputs")));
        }
        Ok(Box::new(FloatOp::new(Node {
            id: NodeId(0),
            name,
            op,
            inputs: vec![NodeId(0); n_inputs],
            shape: Shape(dims),
        })))
    }
}
