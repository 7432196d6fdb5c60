//! The arithmetic the transforms share, on one convolution or linear layer wherever it
//! lives (a `Sequential` child or a graph node): per-channel weight ranges, the
//! equalization scales, the scaling itself, high-bias absorption into the next layer's
//! bias, and the "weight error" layer of bias correction.

use ndarray::{Array1, ArrayD, ArrayViewD, Axis};

use crate::error::{QuantError, Result};
use crate::graph::Op;
use crate::nn::{Conv2d, Linear};
use crate::qconfig::QConfig;
use crate::qparams::fake_quantize;

/// A convolution or linear layer, borrowed.
#[derive(Clone, Copy)]
pub(crate) enum Weighted<'a> {
    Conv(&'a Conv2d),
    Linear(&'a Linear),
}

/// A convolution or linear layer, borrowed mutably.
pub(crate) enum WeightedMut<'a> {
    Conv(&'a mut Conv2d),
    Linear(&'a mut Linear),
}

impl<'a> Weighted<'a> {
    /// The weighted layer of a graph op (fused ReLU variants included).
    pub(crate) fn of_op(op: &'a Op) -> Option<Self> {
        match op {
            Op::Conv2d(c) | Op::ConvReLU2d(c) => Some(Weighted::Conv(c)),
            Op::Linear(x) | Op::LinearReLU(x) => Some(Weighted::Linear(x)),
            _ => None,
        }
    }

    /// The weight as a dynamic view (`[out, in/groups, kh, kw]` or `[out, in]`).
    pub(crate) fn weight(self) -> ArrayViewD<'a, f32> {
        match self {
            Weighted::Conv(c) => c.weight.view().into_dyn(),
            Weighted::Linear(l) => l.weight.view().into_dyn(),
        }
    }

    /// Output channels.
    pub(crate) fn out_channels(self) -> usize {
        match self {
            Weighted::Conv(c) => c.out_channels(),
            Weighted::Linear(l) => l.weight.nrows(),
        }
    }

    /// Per output channel `max |w|`.
    pub(crate) fn out_ranges(self) -> Vec<f32> {
        self.weight()
            .outer_iter()
            .map(|r| r.iter().fold(0.0f32, |m, x| m.max(x.abs())))
            .collect()
    }

    /// Per input channel (of the previous layer's `c` channels) `max |w|`; a Linear's
    /// inputs are grouped `block` per channel (a flattened `[C, H, W]`).
    pub(crate) fn in_ranges(self, c: usize, block: usize) -> Vec<f32> {
        let mut r = vec![0.0f32; c];
        match self {
            Weighted::Conv(conv) => {
                let (o, cpg, _, _) = conv.weight.dim();
                let opg = o / conv.groups.max(1);
                for oc in 0..o {
                    let g = oc / opg.max(1);
                    for j in 0..cpg {
                        let i = g * cpg + j;
                        let m = conv
                            .weight
                            .slice(ndarray::s![oc, j, .., ..])
                            .iter()
                            .fold(0.0f32, |m, x| m.max(x.abs()));
                        if let Some(ri) = r.get_mut(i) {
                            *ri = ri.max(m);
                        }
                    }
                }
            }
            Weighted::Linear(x) => {
                for (col, w) in x.weight.axis_iter(Axis(1)).enumerate() {
                    if let Some(ri) = r.get_mut(col / block.max(1)) {
                        *ri = ri.max(w.iter().fold(0.0f32, |m, x| m.max(x.abs())));
                    }
                }
            }
        }
        r
    }

    /// The layer with weights `W_q - W` (what quantizing the weights with `qc`'s weight
    /// observer adds, exactly as `convert` computes `W_q`) and no bias; errors name `name`.
    pub(crate) fn weight_error(self, qc: &QConfig, name: &str) -> Result<DeltaLayer> {
        let w = self.weight();
        let dw = (|| -> Result<ArrayD<f32>> {
            let mut obs = qc.weight.build()?;
            obs.observe(w.view())?;
            let qp = obs.qparams()?;
            Ok(&fake_quantize(&w, &qp)? - &w)
        })()
        .map_err(|e| e.in_context(name))?;
        let bad = |expected: &str| QuantError::ShapeMismatch {
            context: name.into(),
            expected: expected.into(),
            actual: format!("{:?}", w.shape()),
        };
        Ok(match self {
            Weighted::Conv(c) => DeltaLayer::Conv(Conv2d {
                weight: dw.into_dimensionality().map_err(|_| bad("a 4-d weight"))?,
                bias: None,
                ..c.clone()
            }),
            Weighted::Linear(_) => DeltaLayer::Linear(Linear::new(
                dw.into_dimensionality().map_err(|_| bad("a 2-d weight"))?,
                None,
            )?),
        })
    }
}

impl<'a> WeightedMut<'a> {
    /// The weighted layer of a graph op, mutably.
    pub(crate) fn of_op(op: &'a mut Op) -> Option<Self> {
        match op {
            Op::Conv2d(c) | Op::ConvReLU2d(c) => Some(WeightedMut::Conv(c)),
            Op::Linear(x) | Op::LinearReLU(x) => Some(WeightedMut::Linear(x)),
            _ => None,
        }
    }

    /// The bias, created as zeros when missing.
    pub(crate) fn bias_or_zeros(&mut self) -> &mut Array1<f32> {
        match self {
            WeightedMut::Conv(c) => {
                let o = c.out_channels();
                c.bias.get_or_insert_with(|| Array1::zeros(o))
            }
            WeightedMut::Linear(l) => {
                let o = l.weight.nrows();
                l.bias.get_or_insert_with(|| Array1::zeros(o))
            }
        }
    }

    /// The bias if there is one.
    pub(crate) fn bias(&mut self) -> Option<&mut Array1<f32>> {
        match self {
            WeightedMut::Conv(c) => c.bias.as_mut(),
            WeightedMut::Linear(l) => l.bias.as_mut(),
        }
    }

    /// Divides output channel `i` (weights and bias) by `s[i]`.
    pub(crate) fn scale_out(&mut self, s: &[f32]) {
        let (mut w, b) = match self {
            WeightedMut::Conv(c) => (c.weight.view_mut().into_dyn(), c.bias.as_mut()),
            WeightedMut::Linear(x) => (x.weight.view_mut().into_dyn(), x.bias.as_mut()),
        };
        for (mut row, &si) in w.outer_iter_mut().zip(s) {
            row.mapv_inplace(|v| v / si);
        }
        if let Some(b) = b {
            for (v, &si) in b.iter_mut().zip(s) {
                *v /= si;
            }
        }
    }

    /// Multiplies input channel `i` (of the previous layer) by `s[i]`.
    pub(crate) fn scale_in(&mut self, s: &[f32], block: usize) {
        match self {
            WeightedMut::Conv(conv) => {
                let (o, cpg, _, _) = conv.weight.dim();
                let opg = o / conv.groups.max(1);
                for oc in 0..o {
                    let g = oc / opg.max(1);
                    for j in 0..cpg {
                        let si = s.get(g * cpg + j).copied().unwrap_or(1.0);
                        conv.weight
                            .slice_mut(ndarray::s![oc, j, .., ..])
                            .mapv_inplace(|v| v * si);
                    }
                }
            }
            WeightedMut::Linear(x) => {
                for (col, mut w) in x.weight.axis_iter_mut(Axis(1)).enumerate() {
                    let si = s.get(col / block.max(1)).copied().unwrap_or(1.0);
                    w.mapv_inplace(|v| v * si);
                }
            }
        }
    }

    /// Adds `W c` to the bias, `c` a constant per input channel (of the previous layer;
    /// a Linear's inputs grouped `block` per channel). Exact only when the layer's inputs
    /// are all real (no zero padding).
    pub(crate) fn absorb_input_shift(&mut self, c: &[f32], block: usize) {
        let add: Vec<f32> = match self {
            WeightedMut::Conv(conv) => {
                let (o, cpg, _, _) = conv.weight.dim();
                let opg = (o / conv.groups.max(1)).max(1);
                (0..o)
                    .map(|oc| {
                        let g = oc / opg;
                        (0..cpg)
                            .map(|j| {
                                let s: f32 = conv.weight.slice(ndarray::s![oc, j, .., ..]).sum();
                                s * c.get(g * cpg + j).copied().unwrap_or(0.0)
                            })
                            .sum()
                    })
                    .collect()
            }
            WeightedMut::Linear(l) => l
                .weight
                .outer_iter()
                .map(|row| {
                    row.iter()
                        .enumerate()
                        .map(|(col, w)| w * c.get(col / block.max(1)).copied().unwrap_or(0.0))
                        .sum()
                })
                .collect(),
        };
        let b = self.bias_or_zeros();
        b.iter_mut().zip(&add).for_each(|(v, a)| *v += a);
    }
}

/// The equalization scales of one sweep: `s_i = sqrt(r1_i * r2_i) / r2_i` (1 where either
/// range is 0).
pub(crate) fn equalizing_scales(r1: &[f32], r2: &[f32]) -> Vec<f32> {
    r1.iter()
        .zip(r2)
        .map(|(&a, &b)| {
            if a > 0.0 && b > 0.0 {
                ((a as f64 * b as f64).sqrt() / b as f64) as f32
            } else {
                1.0
            }
        })
        .collect()
}

/// A layer with weights `W_q - W` and no bias, with running per-channel output sums.
pub(crate) enum DeltaLayer {
    Conv(Conv2d),
    Linear(Linear),
}

impl DeltaLayer {
    /// Output channels.
    pub(crate) fn out_channels(&self) -> usize {
        match self {
            DeltaLayer::Conv(c) => c.out_channels(),
            DeltaLayer::Linear(l) => l.weight.nrows(),
        }
    }

    /// Runs the layer on `x` and adds its per-channel output sums to `sums`; returns the
    /// number of values per channel.
    pub(crate) fn accumulate(&self, x: &ArrayD<f32>, sums: &mut [f64]) -> Result<usize> {
        let (y, axis) = match self {
            DeltaLayer::Conv(c) => (c.forward(x)?, 1),
            DeltaLayer::Linear(l) => {
                let y = l.forward(x)?;
                let last = y.ndim().saturating_sub(1);
                (y, last)
            }
        };
        let per = y.len() / y.shape().get(axis).copied().unwrap_or(1).max(1);
        for (c, lane) in y.axis_iter(Axis(axis)).enumerate() {
            if let Some(s) = sums.get_mut(c) {
                *s += lane.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        Ok(per)
    }
}

/// How `second`'s inputs map to `first`'s output channels when the only ops between
/// them are per-channel (ReLU, pooling) and possibly a `Flatten(1)` (`flatten`): the
/// number of `second`'s inputs per channel, or why the pair cannot be equalized.
pub(crate) fn pair_block(
    first: Weighted<'_>,
    second: Weighted<'_>,
    flatten: bool,
) -> std::result::Result<usize, String> {
    let c = first.out_channels();
    match (first, second) {
        (_, Weighted::Conv(conv)) => {
            if conv.groups == 0 || conv.out_channels() % conv.groups != 0 {
                return Err("the second convolution's groups do not divide its channels".into());
            }
            if flatten || conv.in_channels() != c {
                return Err("channel counts do not match".into());
            }
            Ok(1)
        }
        (Weighted::Conv(_), Weighted::Linear(l)) => {
            let inf = l.weight.ncols();
            if !flatten || c == 0 || inf % c != 0 {
                return Err("a Linear after a convolution needs a Flatten(1) and in_features divisible by the channels".into());
            }
            Ok(inf / c)
        }
        (_, Weighted::Linear(l)) => {
            if l.weight.ncols() != c {
                return Err("feature counts do not match".into());
            }
            Ok(1)
        }
    }
}
