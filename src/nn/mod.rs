//! Float models: layers with PyTorch's semantics in a [`Sequential`] of named children,
//! quantization stubs, and fusion; and in [`quantized`], their int8 twins.
//!
//! Names follow PyTorch's dotted paths: a child `"0"` of a child `"layer1"` is
//! `"layer1.0"`, and its parameters are `"layer1.0.weight"`, as in a `state_dict`.

mod fuse;
mod layers;
pub mod quantized;

use std::fmt::Debug;

use ndarray::ArrayD;

pub use fuse::{find_fusable, fold_batch_norm, fuse, FusionPattern};
pub use layers::{adaptive_avg_pool2d, flatten, BatchNorm2d, Conv2d, Linear, Pool2d, PoolKind};

use crate::error::{QuantError, Result};
use crate::graph::ops::{clamp_scalar, relu_scalar};

/// A user's own float layer: runs in float inside any model (quantized models dequantize
/// before it and quantize after it).
pub trait Module: Debug + Send + Sync {
    /// PyTorch-style type name for reports, e.g. `"GELU"`.
    fn type_name(&self) -> &'static str;
    /// Forward pass.
    ///
    /// # Errors
    /// Whatever the layer finds wrong with its input.
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>>;
    /// A boxed copy.
    fn box_clone(&self) -> Box<dyn Module>;
}

/// Every layer `ptq` knows, plus one escape hatch ([`Layer::Custom`]).
///
/// The enum is closed on purpose: preparing and converting a model are exhaustive matches
/// that the compiler checks whenever a layer kind is added.
#[derive(Debug)]
#[non_exhaustive]
pub enum Layer {
    /// `torch.nn.Conv2d`.
    Conv2d(Conv2d),
    /// `torch.ao.nn.intrinsic.ConvReLU2d`: a convolution followed by ReLU, fused.
    ConvReLU2d(Conv2d),
    /// `torch.nn.Linear`.
    Linear(Linear),
    /// `torch.ao.nn.intrinsic.LinearReLU`.
    LinearReLU(Linear),
    /// `torch.nn.BatchNorm2d` in eval mode.
    BatchNorm2d(BatchNorm2d),
    /// `torch.nn.ReLU`.
    ReLU,
    /// `torch.nn.ReLU6`.
    ReLU6,
    /// `torch.nn.MaxPool2d` / `AvgPool2d`.
    Pool2d(Pool2d),
    /// `torch.nn.AdaptiveAvgPool2d` to `(h, w)`.
    AdaptiveAvgPool2d((usize, usize)),
    /// `torch.nn.Flatten(start_dim)`.
    Flatten {
        /// First dimension flattened (PyTorch's default 1).
        start_dim: usize,
    },
    /// `torch.nn.Dropout`: identity at inference.
    Dropout,
    /// `torch.nn.Identity` (also what fusion leaves in a fused layer's old slots).
    Identity,
    /// `torch.ao.quantization.QuantStub`: where the int8 region starts (identity in float).
    QuantStub,
    /// `torch.ao.quantization.DeQuantStub`: where it ends (identity in float).
    DeQuantStub,
    /// Nested named children.
    Sequential(Sequential),
    /// `x + body(x)`: a residual block; its add is quantized in int8 models.
    Residual(Sequential),
    /// A user's own layer, always run in float.
    Custom(Box<dyn Module>),
}

impl Clone for Layer {
    fn clone(&self) -> Self {
        match self {
            Layer::Conv2d(c) => Layer::Conv2d(c.clone()),
            Layer::ConvReLU2d(c) => Layer::ConvReLU2d(c.clone()),
            Layer::Linear(l) => Layer::Linear(l.clone()),
            Layer::LinearReLU(l) => Layer::LinearReLU(l.clone()),
            Layer::BatchNorm2d(b) => Layer::BatchNorm2d(b.clone()),
            Layer::ReLU => Layer::ReLU,
            Layer::ReLU6 => Layer::ReLU6,
            Layer::Pool2d(p) => Layer::Pool2d(*p),
            Layer::AdaptiveAvgPool2d(o) => Layer::AdaptiveAvgPool2d(*o),
            Layer::Flatten { start_dim } => Layer::Flatten {
                start_dim: *start_dim,
            },
            Layer::Dropout => Layer::Dropout,
            Layer::Identity => Layer::Identity,
            Layer::QuantStub => Layer::QuantStub,
            Layer::DeQuantStub => Layer::DeQuantStub,
            Layer::Sequential(s) => Layer::Sequential(s.clone()),
            Layer::Residual(s) => Layer::Residual(s.clone()),
            Layer::Custom(m) => Layer::Custom(m.box_clone()),
        }
    }
}

impl Layer {
    /// PyTorch's class name of the layer (`"Conv2d"`, `"ConvReLU2d"`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Layer::Conv2d(_) => "Conv2d",
            Layer::ConvReLU2d(_) => "ConvReLU2d",
            Layer::Linear(_) => "Linear",
            Layer::LinearReLU(_) => "LinearReLU",
            Layer::BatchNorm2d(_) => "BatchNorm2d",
            Layer::ReLU => "ReLU",
            Layer::ReLU6 => "ReLU6",
            Layer::Pool2d(p) => match p.kind {
                PoolKind::Max => "MaxPool2d",
                PoolKind::Avg => "AvgPool2d",
            },
            Layer::AdaptiveAvgPool2d(_) => "AdaptiveAvgPool2d",
            Layer::Flatten { .. } => "Flatten",
            Layer::Dropout => "Dropout",
            Layer::Identity => "Identity",
            Layer::QuantStub => "QuantStub",
            Layer::DeQuantStub => "DeQuantStub",
            Layer::Sequential(_) => "Sequential",
            Layer::Residual(_) => "Residual",
            Layer::Custom(m) => m.type_name(),
        }
    }

    /// Float forward pass.
    ///
    /// # Errors
    /// The layer's shape or configuration errors (see each layer's `forward`).
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        match self {
            Layer::Conv2d(c) => c.forward(x),
            Layer::ConvReLU2d(c) => c.forward_act(x, true),
            Layer::Linear(l) => l.forward(x),
            Layer::LinearReLU(l) => l.forward_act(x, true),
            Layer::BatchNorm2d(b) => b.forward(x),
            Layer::ReLU => Ok(x.mapv(relu_scalar)),
            Layer::ReLU6 => Ok(x.mapv(|v| clamp_scalar(v, 0.0, 6.0))),
            Layer::Pool2d(p) => p.forward(x),
            Layer::AdaptiveAvgPool2d(o) => adaptive_avg_pool2d(x, *o),
            Layer::Flatten { start_dim } => flatten(x, *start_dim),
            Layer::Dropout | Layer::Identity | Layer::QuantStub | Layer::DeQuantStub => {
                Ok(x.clone())
            }
            Layer::Sequential(s) => s.forward(x),
            Layer::Residual(body) => residual(body, "Residual", x, &mut |_, _| Ok(())),
            Layer::Custom(m) => m.forward(x),
        }
    }
}

/// Number of float parameters of a layer (and everything inside it), as in its
/// `state_dict` (batch-norm running statistics included).
pub fn param_count(layer: &Layer) -> usize {
    match layer {
        Layer::Conv2d(c) | Layer::ConvReLU2d(c) => {
            c.weight.len() + c.bias.as_ref().map_or(0, |b| b.len())
        }
        Layer::Linear(l) | Layer::LinearReLU(l) => {
            l.weight.len() + l.bias.as_ref().map_or(0, |b| b.len())
        }
        Layer::BatchNorm2d(b) => 4 * b.channels(),
        Layer::Sequential(s) | Layer::Residual(s) => {
            s.children().iter().map(|(_, l)| param_count(l)).sum()
        }
        _ => 0,
    }
}

/// `x + body(x)`, with the body's errors labelled under `path`.
fn residual(
    body: &Sequential,
    path: &str,
    x: &ArrayD<f32>,
    hook: &mut Hook<'_>,
) -> Result<ArrayD<f32>> {
    let y = body.run(path, x, hook)?;
    if y.shape() != x.shape() {
        return Err(QuantError::ShapeMismatch {
            context: path.into(),
            expected: format!("the residual body to keep the input shape {:?}", x.shape()),
            actual: format!("output of shape {:?}", y.shape()),
        });
    }
    Ok(y + x)
}

/// A callback that sees every leaf layer's output (and every residual add's) with its
/// dotted path, during a float forward pass.
pub type Hook<'a> = dyn FnMut(&str, &ArrayD<f32>) -> Result<()> + 'a;

/// An ordered list of named children (`torch.nn.Sequential` with names, as built by an
/// `OrderedDict` or by attribute assignment in a module).
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2, ArrayD, IxDyn};
/// use ptq::nn::{Layer, Linear, Sequential};
/// let model = Sequential::new()
///     .push("quant", Layer::QuantStub)
///     .push("fc", Layer::Linear(Linear::new(Array2::eye(3), Some(Array1::zeros(3)))?))
///     .push("relu", Layer::ReLU)
///     .push("dequant", Layer::DeQuantStub);
/// let y = model.forward(&ArrayD::from_elem(IxDyn(&[2, 3]), -1.0f32))?;
/// assert!(y.iter().all(|&v| v == 0.0));
/// assert_eq!(model.get("fc").unwrap().type_name(), "Linear");
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Sequential {
    children: Vec<(String, Layer)>,
}

impl Sequential {
    /// An empty model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a named child (builder style).
    pub fn push(mut self, name: impl Into<String>, layer: Layer) -> Self {
        self.children.push((name.into(), layer));
        self
    }

    /// The children, in order.
    pub fn children(&self) -> &[(String, Layer)] {
        &self.children
    }

    /// Mutable access to the children.
    pub fn children_mut(&mut self) -> &mut Vec<(String, Layer)> {
        &mut self.children
    }

    /// The layer at a dotted path, e.g. `"layer1.0.conv1"`.
    pub fn get(&self, path: &str) -> Option<&Layer> {
        let (head, rest) = path
            .split_once('.')
            .map_or((path, None), |(h, r)| (h, Some(r)));
        let layer = self
            .children
            .iter()
            .find(|(n, _)| n == head)
            .map(|(_, l)| l)?;
        match (rest, layer) {
            (None, l) => Some(l),
            (Some(r), Layer::Sequential(s) | Layer::Residual(s)) => s.get(r),
            _ => None,
        }
    }

    /// Every leaf layer with its dotted path, depth first.
    pub fn named_layers(&self) -> Vec<(String, &Layer)> {
        let mut out = Vec::new();
        self.collect("", &mut out);
        out
    }

    fn collect<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a Layer)>) {
        for (name, layer) in &self.children {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            match layer {
                Layer::Sequential(s) | Layer::Residual(s) => s.collect(&path, out),
                l => out.push((path, l)),
            }
        }
    }

    /// Float forward pass through every child in order.
    ///
    /// # Errors
    /// The first child's error, relabelled with that child's dotted name.
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.run("", x, &mut |_, _| Ok(()))
    }

    /// Float forward pass that calls `hook(path, output)` after every leaf layer and every
    /// residual add (with the residual block's path).
    ///
    /// # Errors
    /// As [`Sequential::forward`], and the hook's own errors.
    pub fn forward_with_hook(&self, x: &ArrayD<f32>, hook: &mut Hook<'_>) -> Result<ArrayD<f32>> {
        self.run("", x, hook)
    }

    fn run(&self, prefix: &str, x: &ArrayD<f32>, hook: &mut Hook<'_>) -> Result<ArrayD<f32>> {
        let mut cur: Option<ArrayD<f32>> = None;
        for (name, layer) in &self.children {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            // Identity-like layers pass their input on without a copy; ReLU / ReLU6 on an
            // intermediate (owned) value work in place.
            match layer {
                Layer::Dropout | Layer::Identity | Layer::QuantStub | Layer::DeQuantStub => {
                    hook(&path, cur.as_ref().unwrap_or(x))?;
                    continue;
                }
                Layer::ReLU | Layer::ReLU6 if cur.is_some() => {
                    let mut y = cur.take().expect("checked");
                    if matches!(layer, Layer::ReLU) {
                        y.mapv_inplace(relu_scalar);
                    } else {
                        y.mapv_inplace(|v| clamp_scalar(v, 0.0, 6.0));
                    }
                    hook(&path, &y)?;
                    cur = Some(y);
                    continue;
                }
                _ => {}
            }
            let input = cur.as_ref().unwrap_or(x);
            let y = match layer {
                Layer::Sequential(s) => s.run(&path, input, hook)?,
                Layer::Residual(s) => {
                    let y = residual(s, &path, input, hook)?;
                    hook(&path, &y)?;
                    y
                }
                l => {
                    let y = l.forward(input).map_err(|e| e.in_context(&path))?;
                    hook(&path, &y)?;
                    y
                }
            };
            cur = Some(y);
        }
        Ok(cur.unwrap_or_else(|| x.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2, Array4, IxDyn};

    #[test]
    fn errors_carry_the_dotted_path_of_the_failing_layer() {
        let inner = Sequential::new().push(
            "fc",
            Layer::Linear(Linear::new(Array2::zeros((2, 4)), None).unwrap()),
        );
        let model = Sequential::new().push("body", Layer::Sequential(inner));
        let err = model.forward(&ArrayD::zeros(IxDyn(&[1, 3]))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "body.fc: shape mismatch: expected [..., 4], got input of shape [1, 3]"
        );
        assert_eq!(model.named_layers()[0].0, "body.fc");
        assert!(model.get("body.fc").is_some() && model.get("body.nope").is_none());
    }

    #[test]
    fn residual_adds_its_input() {
        let conv =
            Conv2d::new(Array4::from_elem((2, 2, 1, 1), 0.5), Some(Array1::zeros(2))).unwrap();
        let model = Sequential::new().push(
            "res",
            Layer::Residual(Sequential::new().push("conv", Layer::Conv2d(conv))),
        );
        let x = ArrayD::from_elem(IxDyn(&[1, 2, 2, 2]), 1.0f32);
        let y = model.forward(&x).unwrap();
        assert!(y.iter().all(|&v| v == 2.0)); // 1 + (0.5 + 0.5)
    }
}
