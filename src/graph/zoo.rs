//! Graphs of torchvision's quantizable classification models
//! (`torchvision.models.quantization`), node for node and name for name, so a PyTorch
//! `state_dict` loads into them with [`Graph::load_state_dict`] and `fuse_model`'s groups
//! exist under the same names.
//!
//! Every builder returns a graph with zero weights and identity batch norms of the right
//! shapes (load real weights afterwards), input `"x"` of shape `[N, 3, H, W]`, a
//! `QuantStub` named `"quant"` first and a `DeQuantStub` named `"dequant"` last, as
//! torchvision's quantizable classes have. Widths are parameters so tests can use reduced
//! models with the same topology. Functional calls that have no module in PyTorch get
//! descriptive names (`"flatten"`, `"mean"`, `"stage2.1.chunk.0"`, ...).
//!
//! ReLU6 is ReLU here as in torchvision's quantizable builders (`_replace_relu`).

use ndarray::{Array1, Array2, Array4};

use super::{BatchNorm, Dim, Graph, GraphBuilder, NodeId, Pool2dSpec};
use crate::error::{QuantError, Result};
use crate::nn::{Conv2d, Linear};

/// torchvision's `_make_divisible(v, divisor)`: rounds to a multiple of `divisor`, at
/// least `divisor`, never more than 10% below `v`.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut new_v = (((v + d / 2.0) as usize) / divisor * divisor).max(divisor);
    if (new_v as f64) < 0.9 * v {
        new_v += divisor;
    }
    new_v
}

#[derive(Clone, Copy, PartialEq)]
enum Act {
    None,
    ReLU,
    Hardswish,
}

/// Convolution `[cout, cin / groups, k, k]` with zero weights, padding `(k - 1) / 2 *
/// dilation` unless given.
struct ConvSpec {
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    groups: usize,
    dilation: usize,
    bias: bool,
}

impl ConvSpec {
    fn new(cin: usize, cout: usize, k: usize, stride: usize) -> Self {
        ConvSpec {
            cin,
            cout,
            k,
            stride,
            pad: (k - 1) / 2,
            groups: 1,
            dilation: 1,
            bias: false,
        }
    }
    fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
    fn pad(mut self, p: usize) -> Self {
        self.pad = p;
        self
    }
    fn dilation(mut self, d: usize) -> Self {
        self.dilation = d;
        self.pad = (self.k - 1) / 2 * d;
        self
    }
    fn bias(mut self) -> Self {
        self.bias = true;
        self
    }
    fn build(&self) -> Result<Conv2d> {
        if self.groups == 0 || !self.cin.is_multiple_of(self.groups) {
            return Err(QuantError::UnsupportedConfig {
                context: "zoo".into(),
                reason: format!("groups {} must divide {} channels", self.groups, self.cin),
            });
        }
        Ok(Conv2d::new(
            Array4::zeros((self.cout, self.cin / self.groups, self.k, self.k)),
            self.bias.then(|| Array1::zeros(self.cout)),
        )?
        .with_stride(self.stride, self.stride)
        .with_padding(self.pad, self.pad)
        .with_dilation(self.dilation, self.dilation)
        .with_groups(self.groups))
    }
}

fn bn(c: usize, eps: f32) -> BatchNorm {
    let mut b = BatchNorm::identity(c);
    b.eps = eps;
    b
}

/// torchvision's `Conv2dNormActivation`: `name.0` conv, `name.1` batch norm, `name.2`
/// activation (if any).
fn conv_norm_act(
    g: &mut GraphBuilder,
    name: &str,
    x: NodeId,
    conv: ConvSpec,
    eps: f32,
    act: Act,
) -> Result<NodeId> {
    let cout = conv.cout;
    let y = g.conv2d(&format!("{name}.0"), x, conv.build()?)?;
    let y = g.batch_norm2d(&format!("{name}.1"), y, bn(cout, eps))?;
    match act {
        Act::None => Ok(y),
        Act::ReLU => g.relu(&format!("{name}.2"), y),
        Act::Hardswish => g.hardswish(&format!("{name}.2"), y),
    }
}

fn linear(cin: usize, cout: usize) -> Result<Linear> {
    Linear::new(Array2::zeros((cout, cin)), Some(Array1::zeros(cout)))
}

fn input(g: &mut GraphBuilder, hw: (usize, usize)) -> Result<NodeId> {
    let x = g.input("x", &[Dim::Batch, 3.into(), hw.0.into(), hw.1.into()])?;
    g.quant_stub("quant", x)
}

fn finish(mut g: GraphBuilder, y: NodeId) -> Result<Graph> {
    let y = g.dequant_stub("dequant", y)?;
    g.output(y)?;
    g.build()
}

/// `torchvision.models.quantization.resnet18` (`QuantizableResNet` with
/// `QuantizableBasicBlock`s): planes `width, 2 width, 4 width, 8 width` (torchvision:
/// `width = 64`), each block ending in `FloatFunctional.add_relu` named `layerI.J.add_relu`,
/// downsample branches `layerI.0.downsample.{0,1}`.
///
/// # Errors
/// An input too small for the network.
pub fn resnet18(width: usize, num_classes: usize, hw: (usize, usize)) -> Result<Graph> {
    let mut g = GraphBuilder::new();
    let x = input(&mut g, hw)?;
    let y = g.conv2d("conv1", x, ConvSpec::new(3, width, 7, 2).pad(3).build()?)?;
    let y = g.batch_norm2d("bn1", y, bn(width, 1e-5))?;
    let y = g.relu("relu", y)?;
    let mut y = g.max_pool2d(
        "maxpool",
        y,
        Pool2dSpec::new(3, 3).with_stride(2, 2).with_padding(1, 1),
    )?;
    let mut inplanes = width;
    for (li, (mult, stride)) in [(1, 1), (2, 2), (4, 2), (8, 2)].into_iter().enumerate() {
        let planes = width * mult;
        for bi in 0..2 {
            let s = if bi == 0 { stride } else { 1 };
            let p = format!("layer{}.{bi}", li + 1);
            let b = g.conv2d(
                &format!("{p}.conv1"),
                y,
                ConvSpec::new(inplanes, planes, 3, s).build()?,
            )?;
            let b = g.batch_norm2d(&format!("{p}.bn1"), b, bn(planes, 1e-5))?;
            let b = g.relu(&format!("{p}.relu"), b)?;
            let b = g.conv2d(
                &format!("{p}.conv2"),
                b,
                ConvSpec::new(planes, planes, 3, 1).build()?,
            )?;
            let b = g.batch_norm2d(&format!("{p}.bn2"), b, bn(planes, 1e-5))?;
            let identity = if s != 1 || inplanes != planes {
                let d = g.conv2d(
                    &format!("{p}.downsample.0"),
                    y,
                    ConvSpec::new(inplanes, planes, 1, s).build()?,
                )?;
                g.batch_norm2d(&format!("{p}.downsample.1"), d, bn(planes, 1e-5))?
            } else {
                y
            };
            y = g.add_relu(&format!("{p}.add_relu"), b, identity)?;
            inplanes = planes;
        }
    }
    let y = g.adaptive_avg_pool2d("avgpool", y, (1, 1))?;
    let y = g.flatten("flatten", y, 1, -1)?;
    let y = g.linear("fc", y, linear(inplanes, num_classes)?)?;
    finish(g, y)
}

/// `torchvision.models.quantization.mobilenet_v2(width_mult=..)`
/// (`QuantizableMobileNetV2`): `features.I` blocks, residual adds named
/// `features.I.skip_add`, the functional global pool `"adaptive_avg_pool2d"`, then
/// `"flatten"` and `classifier.{0 (Dropout), 1 (Linear)}`.
///
/// # Errors
/// An input too small for the network.
pub fn mobilenet_v2(width_mult: f64, num_classes: usize, hw: (usize, usize)) -> Result<Graph> {
    let setting: [(usize, usize, usize, usize); 7] = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ];
    let mut g = GraphBuilder::new();
    let x = input(&mut g, hw)?;
    let mut cin = make_divisible(32.0 * width_mult, 8);
    let last = make_divisible(1280.0 * width_mult.max(1.0), 8);
    let mut y = conv_norm_act(
        &mut g,
        "features.0",
        x,
        ConvSpec::new(3, cin, 3, 2),
        1e-5,
        Act::ReLU,
    )?;
    let mut idx = 1;
    for (t, c, n, s) in setting {
        let cout = make_divisible(c as f64 * width_mult, 8);
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            let p = format!("features.{idx}");
            let hidden = (cin as f64 * t as f64).round() as usize;
            let mut b = y;
            let mut j = 0;
            if t != 1 {
                b = conv_norm_act(
                    &mut g,
                    &format!("{p}.conv.0"),
                    b,
                    ConvSpec::new(cin, hidden, 1, 1),
                    1e-5,
                    Act::ReLU,
                )?;
                j = 1;
            }
            b = conv_norm_act(
                &mut g,
                &format!("{p}.conv.{j}"),
                b,
                ConvSpec::new(hidden, hidden, 3, stride).groups(hidden),
                1e-5,
                Act::ReLU,
            )?;
            b = g.conv2d(
                &format!("{p}.conv.{}", j + 1),
                b,
                ConvSpec::new(hidden, cout, 1, 1).build()?,
            )?;
            b = g.batch_norm2d(&format!("{p}.conv.{}", j + 2), b, bn(cout, 1e-5))?;
            y = if stride == 1 && cin == cout {
                g.add(&format!("{p}.skip_add"), y, b)?
            } else {
                b
            };
            cin = cout;
            idx += 1;
        }
    }
    let y = conv_norm_act(
        &mut g,
        &format!("features.{idx}"),
        y,
        ConvSpec::new(cin, last, 1, 1),
        1e-5,
        Act::ReLU,
    )?;
    let y = g.adaptive_avg_pool2d("adaptive_avg_pool2d", y, (1, 1))?;
    let y = g.flatten("flatten", y, 1, -1)?;
    let y = g.dropout("classifier.0", y)?;
    let y = g.linear("classifier.1", y, linear(last, num_classes)?)?;
    finish(g, y)
}

/// `torchvision.models.quantization.mobilenet_v3_large(width_mult=.., reduced_tail=..)`
/// (`QuantizableMobileNetV3`): Hardswish, squeeze-excite blocks
/// (`features.I.block.J.{avgpool, fc1, activation, fc2, scale_activation}` and the
/// `FloatFunctional.mul` named `features.I.block.J.skip_mul`), residual adds
/// `features.I.skip_add`, batch norms with `eps = 0.001`.
///
/// # Errors
/// An input too small for the network.
pub fn mobilenet_v3_large(
    width_mult: f64,
    reduced_tail: bool,
    num_classes: usize,
    hw: (usize, usize),
) -> Result<Graph> {
    let rd = if reduced_tail { 2 } else { 1 };
    // (in, kernel, expanded, out, use_se, hardswish, stride)
    let setting: [(usize, usize, usize, usize, bool, bool, usize); 15] = [
        (16, 3, 16, 16, false, false, 1),
        (16, 3, 64, 24, false, false, 2),
        (24, 3, 72, 24, false, false, 1),
        (24, 5, 72, 40, true, false, 2),
        (40, 5, 120, 40, true, false, 1),
        (40, 5, 120, 40, true, false, 1),
        (40, 3, 240, 80, false, true, 2),
        (80, 3, 200, 80, false, true, 1),
        (80, 3, 184, 80, false, true, 1),
        (80, 3, 184, 80, false, true, 1),
        (80, 3, 480, 112, true, true, 1),
        (112, 3, 672, 112, true, true, 1),
        (112, 5, 672, 160 / rd, true, true, 2),
        (160 / rd, 5, 960 / rd, 160 / rd, true, true, 1),
        (160 / rd, 5, 960 / rd, 160 / rd, true, true, 1),
    ];
    let adj = |c: usize| make_divisible(c as f64 * width_mult, 8);
    let eps = 1e-3;
    let mut g = GraphBuilder::new();
    let x = input(&mut g, hw)?;
    let first = adj(setting[0].0);
    let mut y = conv_norm_act(
        &mut g,
        "features.0",
        x,
        ConvSpec::new(3, first, 3, 2),
        eps,
        Act::Hardswish,
    )?;
    for (i, &(cin, k, exp, cout, se, hs, stride)) in setting.iter().enumerate() {
        let (cin, exp, cout) = (adj(cin), adj(exp), adj(cout));
        let act = if hs { Act::Hardswish } else { Act::ReLU };
        let p = format!("features.{}", i + 1);
        let mut b = y;
        let mut j = 0;
        if exp != cin {
            b = conv_norm_act(
                &mut g,
                &format!("{p}.block.0"),
                b,
                ConvSpec::new(cin, exp, 1, 1),
                eps,
                act,
            )?;
            j = 1;
        }
        b = conv_norm_act(
            &mut g,
            &format!("{p}.block.{j}"),
            b,
            ConvSpec::new(exp, exp, k, stride).groups(exp).dilation(1),
            eps,
            act,
        )?;
        j += 1;
        if se {
            let sq = make_divisible((exp / 4) as f64, 8);
            let s = format!("{p}.block.{j}");
            let a = g.adaptive_avg_pool2d(&format!("{s}.avgpool"), b, (1, 1))?;
            let a = g.conv2d(
                &format!("{s}.fc1"),
                a,
                ConvSpec::new(exp, sq, 1, 1).bias().build()?,
            )?;
            let a = g.relu(&format!("{s}.activation"), a)?;
            let a = g.conv2d(
                &format!("{s}.fc2"),
                a,
                ConvSpec::new(sq, exp, 1, 1).bias().build()?,
            )?;
            let a = g.hardsigmoid(&format!("{s}.scale_activation"), a)?;
            b = g.mul(&format!("{s}.skip_mul"), a, b)?;
            j += 1;
        }
        b = conv_norm_act(
            &mut g,
            &format!("{p}.block.{j}"),
            b,
            ConvSpec::new(exp, cout, 1, 1),
            eps,
            Act::None,
        )?;
        y = if stride == 1 && cin == cout {
            g.add(&format!("{p}.skip_add"), y, b)?
        } else {
            b
        };
    }
    let last_in = adj(setting[14].3);
    let last_out = 6 * last_in;
    let last_channel = adj(1280 / rd);
    let y = conv_norm_act(
        &mut g,
        "features.16",
        y,
        ConvSpec::new(last_in, last_out, 1, 1),
        eps,
        Act::Hardswish,
    )?;
    let y = g.adaptive_avg_pool2d("avgpool", y, (1, 1))?;
    let y = g.flatten("flatten", y, 1, -1)?;
    let y = g.linear("classifier.0", y, linear(last_out, last_channel)?)?;
    let y = g.hardswish("classifier.1", y)?;
    let y = g.dropout("classifier.2", y)?;
    let y = g.linear("classifier.3", y, linear(last_channel, num_classes)?)?;
    finish(g, y)
}

/// torchvision's `channel_shuffle(x, groups)`: `view(N, groups, C / groups, H, W)`,
/// `transpose(1, 2)`, `view(N, C, H, W)`, as nodes `{name}.view`, `{name}.transpose`,
/// `{name}.flatten`.
fn channel_shuffle(g: &mut GraphBuilder, name: &str, x: NodeId, groups: usize) -> Result<NodeId> {
    let s = g.shape(x)?.clone();
    let d = |i: usize| s.0[i].fixed().unwrap_or(0) as isize;
    let c = d(1);
    let (h, w) = (d(2), d(3));
    let y = g.reshape(
        &format!("{name}.view"),
        x,
        &[0, groups as isize, c / groups as isize, h, w],
    )?;
    let y = g.permute(&format!("{name}.transpose"), y, &[0, 2, 1, 3, 4])?;
    g.reshape(&format!("{name}.flatten"), y, &[0, c, h, w])
}

/// `torchvision.models.quantization.ShuffleNetV2` (`QuantizableShuffleNetV2`) with the
/// given `stages_repeats` and `stages_out_channels` (torchvision's x1.0: `[4, 8, 4]`,
/// `[24, 116, 232, 464, 1024]`): `x.chunk(2, dim=1)` as two [`Op::Slice`](super::Op::Slice)
/// nodes `stageS.I.chunk.{0,1}`, `FloatFunctional.cat` named `stageS.I.cat`, the channel
/// shuffle as reshape / permute / reshape (`stageS.I.shuffle.*`), `x.mean([2, 3])` as
/// `"mean"`.
///
/// # Errors
/// An input too small for the network, or channels that do not split in two.
pub fn shufflenet_v2(
    stages_repeats: [usize; 3],
    stages_out_channels: [usize; 5],
    num_classes: usize,
    hw: (usize, usize),
) -> Result<Graph> {
    let mut g = GraphBuilder::new();
    let x = input(&mut g, hw)?;
    let mut cin = stages_out_channels[0];
    let y = conv_norm_act(
        &mut g,
        "conv1",
        x,
        ConvSpec::new(3, cin, 3, 2),
        1e-5,
        Act::ReLU,
    )?;
    let mut y = g.max_pool2d(
        "maxpool",
        y,
        Pool2dSpec::new(3, 3).with_stride(2, 2).with_padding(1, 1),
    )?;
    for (si, (&repeats, &cout)) in stages_repeats
        .iter()
        .zip(&stages_out_channels[1..4])
        .enumerate()
    {
        for i in 0..repeats {
            let p = format!("stage{}.{i}", si + 2);
            let stride = if i == 0 { 2 } else { 1 };
            let bf = cout / 2;
            if stride == 1 && cin != bf * 2 {
                return Err(QuantError::UnsupportedConfig {
                    context: p,
                    reason: format!(
                        "input channels {cin} must equal output channels {cout} (even)"
                    ),
                });
            }
            let branch2 = |g: &mut GraphBuilder, x: NodeId, cin2: usize| -> Result<NodeId> {
                let b = format!("{p}.branch2");
                let y = g.conv2d(&format!("{b}.0"), x, ConvSpec::new(cin2, bf, 1, 1).build()?)?;
                let y = g.batch_norm2d(&format!("{b}.1"), y, bn(bf, 1e-5))?;
                let y = g.relu(&format!("{b}.2"), y)?;
                let y = g.conv2d(
                    &format!("{b}.3"),
                    y,
                    ConvSpec::new(bf, bf, 3, stride).groups(bf).build()?,
                )?;
                let y = g.batch_norm2d(&format!("{b}.4"), y, bn(bf, 1e-5))?;
                let y = g.conv2d(&format!("{b}.5"), y, ConvSpec::new(bf, bf, 1, 1).build()?)?;
                let y = g.batch_norm2d(&format!("{b}.6"), y, bn(bf, 1e-5))?;
                g.relu(&format!("{b}.7"), y)
            };
            let out = if stride == 1 {
                let x1 = g.slice(&format!("{p}.chunk.0"), y, 1, 0, cin / 2)?;
                let x2 = g.slice(&format!("{p}.chunk.1"), y, 1, cin / 2, cin)?;
                let b2 = branch2(&mut g, x2, bf)?;
                g.concat(&format!("{p}.cat"), &[x1, b2], 1)?
            } else {
                let b = format!("{p}.branch1");
                let b1 = g.conv2d(
                    &format!("{b}.0"),
                    y,
                    ConvSpec::new(cin, cin, 3, stride).groups(cin).build()?,
                )?;
                let b1 = g.batch_norm2d(&format!("{b}.1"), b1, bn(cin, 1e-5))?;
                let b1 = g.conv2d(&format!("{b}.2"), b1, ConvSpec::new(cin, bf, 1, 1).build()?)?;
                let b1 = g.batch_norm2d(&format!("{b}.3"), b1, bn(bf, 1e-5))?;
                let b1 = g.relu(&format!("{b}.4"), b1)?;
                let b2 = branch2(&mut g, y, cin)?;
                g.concat(&format!("{p}.cat"), &[b1, b2], 1)?
            };
            y = channel_shuffle(&mut g, &format!("{p}.shuffle"), out, 2)?;
            cin = cout;
        }
    }
    let last = stages_out_channels[4];
    let y = conv_norm_act(
        &mut g,
        "conv5",
        y,
        ConvSpec::new(cin, last, 1, 1),
        1e-5,
        Act::ReLU,
    )?;
    let y = g.mean("mean", y, &[2, 3], false)?;
    let y = g.linear("fc", y, linear(last, num_classes)?)?;
    finish(g, y)
}
