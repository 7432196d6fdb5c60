//! The closed op set of a [`Graph`](super::Graph) and the parameters of each op.

use std::fmt;

use ndarray::ArrayD;

use crate::nn::{BatchNorm2d, Conv2d, Linear, Module};

/// Batch normalization in eval mode over axis 1 (`BatchNorm1d` on `[N, C]` / `[N, C, L]`,
/// `BatchNorm2d` on `[N, C, H, W]`); the same parameters as [`nn::BatchNorm2d`](BatchNorm2d).
pub type BatchNorm = BatchNorm2d;

/// Window of a 2-D max or average pool (`torch.nn.MaxPool2d` / `AvgPool2d`, ONNX
/// `MaxPool` / `AveragePool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2dSpec {
    /// Window `(h, w)`.
    pub kernel: (usize, usize),
    /// Stride `(h, w)` (PyTorch's default is the kernel).
    pub stride: (usize, usize),
    /// Implicit padding `(top, left, bottom, right)`; PyTorch pads symmetrically
    /// (`top == bottom`, `left == right`), ONNX may not. Max pools pad with `-inf`,
    /// average pools with zeros.
    pub padding: (usize, usize, usize, usize),
    /// Dilation `(h, w)` (max pool only; must be `(1, 1)` for average pools).
    pub dilation: (usize, usize),
    /// PyTorch's `ceil_mode`: the output size rounds up, but the last window must start
    /// inside the input or the top/left padding.
    pub ceil_mode: bool,
    /// Average pools only: whether padded cells count in the divisor
    /// (`count_include_pad`, PyTorch's default `true`). Ignored by max pools.
    pub count_include_pad: bool,
    /// Average pools only: PyTorch's `divisor_override`.
    pub divisor_override: Option<usize>,
}

impl Pool2dSpec {
    /// A `kh x kw` window with stride equal to the kernel, no padding, no dilation,
    /// floor mode, `count_include_pad = true` (PyTorch's defaults).
    pub fn new(kh: usize, kw: usize) -> Self {
        Pool2dSpec {
            kernel: (kh, kw),
            stride: (kh, kw),
            padding: (0, 0, 0, 0),
            dilation: (1, 1),
            ceil_mode: false,
            count_include_pad: true,
            divisor_override: None,
        }
    }
    /// Sets the stride.
    pub fn with_stride(mut self, h: usize, w: usize) -> Self {
        self.stride = (h, w);
        self
    }
    /// Sets symmetric padding (PyTorch's `padding=(h, w)`).
    pub fn with_padding(mut self, h: usize, w: usize) -> Self {
        self.padding = (h, w, h, w);
        self
    }
    /// Sets `(top, left, bottom, right)` padding (ONNX `pads`).
    pub fn with_padding_tlbr(
        mut self,
        top: usize,
        left: usize,
        bottom: usize,
        right: usize,
    ) -> Self {
        self.padding = (top, left, bottom, right);
        self
    }
    /// Sets the dilation (max pool).
    pub fn with_dilation(mut self, h: usize, w: usize) -> Self {
        self.dilation = (h, w);
        self
    }
    /// Sets `ceil_mode`.
    pub fn with_ceil_mode(mut self, ceil_mode: bool) -> Self {
        self.ceil_mode = ceil_mode;
        self
    }
    /// Sets `count_include_pad` (average pool).
    pub fn with_count_include_pad(mut self, count_include_pad: bool) -> Self {
        self.count_include_pad = count_include_pad;
        self
    }
    /// Sets `divisor_override` (average pool).
    pub fn with_divisor_override(mut self, divisor: Option<usize>) -> Self {
        self.divisor_override = divisor;
        self
    }
}

/// How nearest-neighbour upsampling picks its source index `src` for output index `dst`,
/// with `scale = in / out` (or `1 / scale_factor` when a scale factor was given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NearestRule {
    /// PyTorch's `mode="nearest"`: `src = min(floor(dst * scale), in - 1)`; equal to ONNX
    /// `Resize` with `coordinate_transformation_mode="asymmetric"`, `nearest_mode="floor"`.
    Floor,
    /// PyTorch's `mode="nearest-exact"`: `src = min(floor((dst + 0.5) * scale), in - 1)`;
    /// equal to ONNX `half_pixel` with `round_prefer_ceil`.
    Exact,
    /// ONNX `Resize`'s default, `half_pixel` with `round_prefer_floor`:
    /// `src = clamp(ceil((dst + 0.5) * scale - 1), 0, in - 1)`.
    HalfPixelRoundPreferFloor,
}

/// Interpolation of [`Op::Upsample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsampleMode {
    /// Nearest neighbour with the given index rule.
    Nearest(NearestRule),
    /// Bilinear (`mode="bilinear"`), with PyTorch's `align_corners`.
    Bilinear {
        /// `align_corners=True`: corners of input and output grids coincide.
        align_corners: bool,
    },
}

/// Parameters of [`Op::Upsample`] (`torch.nn.Upsample` / `F.interpolate` on NCHW).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpsampleSpec {
    /// Output `(h, w)`; when `None`, `floor(in * scale_factor)`.
    pub size: Option<(usize, usize)>,
    /// Scale factors `(h, w)`; when given (and `size` is `None`), PyTorch uses
    /// `1 / scale_factor` as the source scale (not `in / out`).
    pub scale_factor: Option<(f32, f32)>,
    /// Interpolation.
    pub mode: UpsampleMode,
}

impl UpsampleSpec {
    /// Upsampling by scale factors.
    pub fn scale(h: f32, w: f32, mode: UpsampleMode) -> Self {
        UpsampleSpec {
            size: None,
            scale_factor: Some((h, w)),
            mode,
        }
    }
    /// Upsampling to a fixed size.
    pub fn size(h: usize, w: usize, mode: UpsampleMode) -> Self {
        UpsampleSpec {
            size: Some((h, w)),
            scale_factor: None,
            mode,
        }
    }
}

/// `torch.nn.LayerNorm` over the last `normalized_shape.len()` dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNorm {
    /// Shape of the normalized trailing dimensions.
    pub normalized_shape: Vec<usize>,
    /// Elementwise scale (`elementwise_affine=True`), shaped `normalized_shape`.
    pub weight: Option<ArrayD<f32>>,
    /// Elementwise shift, shaped `normalized_shape`.
    pub bias: Option<ArrayD<f32>>,
    /// Added to the variance (PyTorch's default `1e-5`).
    pub eps: f32,
}

impl LayerNorm {
    /// A layer norm with unit weight and zero bias (PyTorch's initialization).
    pub fn new(normalized_shape: &[usize]) -> Self {
        LayerNorm {
            normalized_shape: normalized_shape.to_vec(),
            weight: Some(ArrayD::ones(normalized_shape)),
            bias: Some(ArrayD::zeros(normalized_shape)),
            eps: 1e-5,
        }
    }
}

/// One operation of the graph. Float semantics follow PyTorch (NaN propagates through
/// ReLU, clamps and max pooling). The set is closed: code that handles ops matches on this
/// enum (with a `_` arm, it is `#[non_exhaustive]`), and [`Op::kind`] names each variant
/// for reports and per-type configuration.
///
/// Fused forms (what `torch.ao.nn.intrinsic` has) are separate variants made by
/// [`fuse`](super::fuse): [`Op::ConvReLU2d`], [`Op::LinearReLU`], [`Op::AddReLU`]; a
/// batch norm fused into a convolution or linear layer disappears into its weights.
#[derive(Debug)]
#[non_exhaustive]
pub enum Op {
    /// A graph input; its shape comes from the builder.
    Input,
    /// `torch.nn.Conv2d` (asymmetric padding through [`Conv2d::with_padding_tlbr`]).
    Conv2d(Conv2d),
    /// `torch.ao.nn.intrinsic.ConvReLU2d`: convolution then ReLU.
    ConvReLU2d(Conv2d),
    /// `torch.nn.Linear` on `[..., in_features]`.
    Linear(Linear),
    /// `torch.ao.nn.intrinsic.LinearReLU`.
    LinearReLU(Linear),
    /// `torch.nn.BatchNorm1d` (eval) on `[N, C]` or `[N, C, L]`.
    BatchNorm1d(BatchNorm),
    /// `torch.nn.BatchNorm2d` (eval) on `[N, C, H, W]`.
    BatchNorm2d(BatchNorm),
    /// `torch.nn.ReLU`.
    ReLU,
    /// `torch.clamp` / `Hardtanh` / `ReLU6` (`min 0, max 6`) / ONNX `Clip`.
    Clamp {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// `torch.nn.Hardswish`: `x * relu6(x + 3) / 6`.
    Hardswish,
    /// `torch.nn.Hardsigmoid`: `relu6(x + 3) / 6`.
    Hardsigmoid,
    /// `torch.nn.Sigmoid`.
    Sigmoid,
    /// `torch.nn.SiLU`: `x * sigmoid(x)`.
    SiLU,
    /// `torch.nn.GELU`: `approximate="tanh"` when `tanh`, else the exact erf form.
    Gelu {
        /// Use the tanh approximation.
        tanh: bool,
    },
    /// Elementwise sum of two inputs with numpy broadcasting (`FloatFunctional.add`).
    Add,
    /// `FloatFunctional.add_relu`: `relu(a + b)`.
    AddReLU,
    /// Elementwise product with numpy broadcasting (`FloatFunctional.mul`, squeeze-excite).
    Mul,
    /// Concatenation of all inputs along `axis` (`FloatFunctional.cat`, `torch.cat`).
    Concat {
        /// The axis.
        axis: usize,
    },
    /// `torch.nn.MaxPool2d`.
    MaxPool2d(Pool2dSpec),
    /// `torch.nn.AvgPool2d`.
    AvgPool2d(Pool2dSpec),
    /// `torch.nn.AdaptiveAvgPool2d` to `(h, w)`.
    AdaptiveAvgPool2d((usize, usize)),
    /// `torch.mean(x, dims, keepdim)`.
    Mean {
        /// Reduced axes, ascending.
        dims: Vec<usize>,
        /// Keep reduced axes with size 1.
        keepdim: bool,
    },
    /// `torch.flatten(x, start_dim, end_dim)` / `torch.nn.Flatten`.
    Flatten {
        /// First flattened axis.
        start_dim: usize,
        /// Last flattened axis; negative counts from the end (`-1` is the last).
        end_dim: isize,
    },
    /// `reshape` / `view` / ONNX `Reshape`: `-1` is inferred (at most one), `0` copies the
    /// input's dimension at that position (ONNX `allowzero=0`).
    Reshape {
        /// Target shape.
        shape: Vec<isize>,
    },
    /// `torch.permute` / `transpose` / ONNX `Transpose`: output axis `i` is input axis
    /// `dims[i]`.
    Permute {
        /// A permutation of the axes.
        dims: Vec<usize>,
    },
    /// `x.narrow(axis, start, end - start)`: one part of `torch.chunk` / `split` / ONNX
    /// `Slice` with step 1.
    Slice {
        /// Sliced axis.
        axis: usize,
        /// First index kept.
        start: usize,
        /// One past the last index kept.
        end: usize,
    },
    /// `torch.nn.Upsample` / `F.interpolate` on NCHW.
    Upsample(UpsampleSpec),
    /// `torch.softmax(x, axis)`.
    Softmax {
        /// The axis.
        axis: usize,
    },
    /// `torch.nn.LayerNorm`.
    LayerNorm(LayerNorm),
    /// `torch.nn.Dropout` (identity at inference).
    Dropout,
    /// `torch.nn.Identity`.
    Identity,
    /// `torch.ao.quantization.QuantStub`: start of an int8 region (identity in float).
    QuantStub,
    /// `torch.ao.quantization.DeQuantStub`: end of an int8 region (identity in float).
    DeQuantStub,
    /// A user's own float module (a float island when quantized); its output shape is
    /// declared to the builder and checked at run time.
    Custom(Box<dyn Module>),
}

impl Clone for Op {
    fn clone(&self) -> Self {
        match self {
            Op::Input => Op::Input,
            Op::Conv2d(c) => Op::Conv2d(c.clone()),
            Op::ConvReLU2d(c) => Op::ConvReLU2d(c.clone()),
            Op::Linear(l) => Op::Linear(l.clone()),
            Op::LinearReLU(l) => Op::LinearReLU(l.clone()),
            Op::BatchNorm1d(b) => Op::BatchNorm1d(b.clone()),
            Op::BatchNorm2d(b) => Op::BatchNorm2d(b.clone()),
            Op::ReLU => Op::ReLU,
            Op::Clamp { min, max } => Op::Clamp {
                min: *min,
                max: *max,
            },
            Op::Hardswish => Op::Hardswish,
            Op::Hardsigmoid => Op::Hardsigmoid,
            Op::Sigmoid => Op::Sigmoid,
            Op::SiLU => Op::SiLU,
            Op::Gelu { tanh } => Op::Gelu { tanh: *tanh },
            Op::Add => Op::Add,
            Op::AddReLU => Op::AddReLU,
            Op::Mul => Op::Mul,
            Op::Concat { axis } => Op::Concat { axis: *axis },
            Op::MaxPool2d(p) => Op::MaxPool2d(*p),
            Op::AvgPool2d(p) => Op::AvgPool2d(*p),
            Op::AdaptiveAvgPool2d(o) => Op::AdaptiveAvgPool2d(*o),
            Op::Mean { dims, keepdim } => Op::Mean {
                dims: dims.clone(),
                keepdim: *keepdim,
            },
            Op::Flatten { start_dim, end_dim } => Op::Flatten {
                start_dim: *start_dim,
                end_dim: *end_dim,
            },
            Op::Reshape { shape } => Op::Reshape {
                shape: shape.clone(),
            },
            Op::Permute { dims } => Op::Permute { dims: dims.clone() },
            Op::Slice { axis, start, end } => Op::Slice {
                axis: *axis,
                start: *start,
                end: *end,
            },
            Op::Upsample(u) => Op::Upsample(*u),
            Op::Softmax { axis } => Op::Softmax { axis: *axis },
            Op::LayerNorm(l) => Op::LayerNorm(l.clone()),
            Op::Dropout => Op::Dropout,
            Op::Identity => Op::Identity,
            Op::QuantStub => Op::QuantStub,
            Op::DeQuantStub => Op::DeQuantStub,
            Op::Custom(m) => Op::Custom(m.box_clone()),
        }
    }
}

/// The kind of an [`Op`] without its parameters: for per-type configuration
/// (`QConfigMap::set_type`), reports and saved-file tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
#[allow(missing_docs)]
pub enum OpKind {
    Input,
    Conv2d,
    ConvReLU2d,
    Linear,
    LinearReLU,
    BatchNorm1d,
    BatchNorm2d,
    ReLU,
    Clamp,
    Hardswish,
    Hardsigmoid,
    Sigmoid,
    SiLU,
    Gelu,
    Add,
    AddReLU,
    Mul,
    Concat,
    MaxPool2d,
    AvgPool2d,
    AdaptiveAvgPool2d,
    Mean,
    Flatten,
    Reshape,
    Permute,
    Slice,
    Upsample,
    Softmax,
    LayerNorm,
    Dropout,
    Identity,
    QuantStub,
    DeQuantStub,
    Custom,
}

impl OpKind {
    /// PyTorch-style name (`"Conv2d"`, `"AddReLU"`, ...); `Clamp` is `"Clamp"` whatever
    /// its bounds.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Input => "Input",
            OpKind::Conv2d => "Conv2d",
            OpKind::ConvReLU2d => "ConvReLU2d",
            OpKind::Linear => "Linear",
            OpKind::LinearReLU => "LinearReLU",
            OpKind::BatchNorm1d => "BatchNorm1d",
            OpKind::BatchNorm2d => "BatchNorm2d",
            OpKind::ReLU => "ReLU",
            OpKind::Clamp => "Clamp",
            OpKind::Hardswish => "Hardswish",
            OpKind::Hardsigmoid => "Hardsigmoid",
            OpKind::Sigmoid => "Sigmoid",
            OpKind::SiLU => "SiLU",
            OpKind::Gelu => "GELU",
            OpKind::Add => "Add",
            OpKind::AddReLU => "AddReLU",
            OpKind::Mul => "Mul",
            OpKind::Concat => "Concat",
            OpKind::MaxPool2d => "MaxPool2d",
            OpKind::AvgPool2d => "AvgPool2d",
            OpKind::AdaptiveAvgPool2d => "AdaptiveAvgPool2d",
            OpKind::Mean => "Mean",
            OpKind::Flatten => "Flatten",
            OpKind::Reshape => "Reshape",
            OpKind::Permute => "Permute",
            OpKind::Slice => "Slice",
            OpKind::Upsample => "Upsample",
            OpKind::Softmax => "Softmax",
            OpKind::LayerNorm => "LayerNorm",
            OpKind::Dropout => "Dropout",
            OpKind::Identity => "Identity",
            OpKind::QuantStub => "QuantStub",
            OpKind::DeQuantStub => "DeQuantStub",
            OpKind::Custom => "Custom",
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Op {
    /// The op's kind.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Input => OpKind::Input,
            Op::Conv2d(_) => OpKind::Conv2d,
            Op::ConvReLU2d(_) => OpKind::ConvReLU2d,
            Op::Linear(_) => OpKind::Linear,
            Op::LinearReLU(_) => OpKind::LinearReLU,
            Op::BatchNorm1d(_) => OpKind::BatchNorm1d,
            Op::BatchNorm2d(_) => OpKind::BatchNorm2d,
            Op::ReLU => OpKind::ReLU,
            Op::Clamp { .. } => OpKind::Clamp,
            Op::Hardswish => OpKind::Hardswish,
            Op::Hardsigmoid => OpKind::Hardsigmoid,
            Op::Sigmoid => OpKind::Sigmoid,
            Op::SiLU => OpKind::SiLU,
            Op::Gelu { .. } => OpKind::Gelu,
            Op::Add => OpKind::Add,
            Op::AddReLU => OpKind::AddReLU,
            Op::Mul => OpKind::Mul,
            Op::Concat { .. } => OpKind::Concat,
            Op::MaxPool2d(_) => OpKind::MaxPool2d,
            Op::AvgPool2d(_) => OpKind::AvgPool2d,
            Op::AdaptiveAvgPool2d(_) => OpKind::AdaptiveAvgPool2d,
            Op::Mean { .. } => OpKind::Mean,
            Op::Flatten { .. } => OpKind::Flatten,
            Op::Reshape { .. } => OpKind::Reshape,
            Op::Permute { .. } => OpKind::Permute,
            Op::Slice { .. } => OpKind::Slice,
            Op::Upsample(_) => OpKind::Upsample,
            Op::Softmax { .. } => OpKind::Softmax,
            Op::LayerNorm(_) => OpKind::LayerNorm,
            Op::Dropout => OpKind::Dropout,
            Op::Identity => OpKind::Identity,
            Op::QuantStub => OpKind::QuantStub,
            Op::DeQuantStub => OpKind::DeQuantStub,
            Op::Custom(_) => OpKind::Custom,
        }
    }

    /// The op's type name for reports (a custom module's own `type_name`).
    pub fn type_name(&self) -> &'static str {
        match self {
            Op::Custom(m) => m.type_name(),
            op => op.kind().name(),
        }
    }

    /// How many inputs the op takes: `Some(n)` exactly, `None` for variadic
    /// ([`Op::Concat`], at least one).
    pub fn arity(&self) -> Option<usize> {
        match self {
            Op::Input => Some(0),
            Op::Add | Op::AddReLU | Op::Mul => Some(2),
            Op::Concat { .. } => None,
            _ => Some(1),
        }
    }

    /// Parameters under their `state_dict` suffixes (`"weight"`, `"bias"`,
    /// `"running_mean"`, `"running_var"`), in PyTorch's order.
    pub fn params(&self) -> Vec<(&'static str, ArrayD<f32>)> {
        let mut out = Vec::new();
        match self {
            Op::Conv2d(c) | Op::ConvReLU2d(c) => {
                out.push(("weight", c.weight.clone().into_dyn()));
                if let Some(b) = &c.bias {
                    out.push(("bias", b.clone().into_dyn()));
                }
            }
            Op::Linear(l) | Op::LinearReLU(l) => {
                out.push(("weight", l.weight.clone().into_dyn()));
                if let Some(b) = &l.bias {
                    out.push(("bias", b.clone().into_dyn()));
                }
            }
            Op::BatchNorm1d(b) | Op::BatchNorm2d(b) => {
                out.push(("weight", b.weight.clone().into_dyn()));
                out.push(("bias", b.bias.clone().into_dyn()));
                out.push(("running_mean", b.running_mean.clone().into_dyn()));
                out.push(("running_var", b.running_var.clone().into_dyn()));
            }
            Op::LayerNorm(l) => {
                if let Some(w) = &l.weight {
                    out.push(("weight", w.clone()));
                }
                if let Some(b) = &l.bias {
                    out.push(("bias", b.clone()));
                }
            }
            _ => {}
        }
        out
    }

    /// Mutable flat views of the parameters with their `state_dict` suffixes and shapes
    /// (same order as [`Op::params`]); used by weight loading.
    pub(crate) fn params_mut(&mut self) -> Vec<(&'static str, Vec<usize>, &mut [f32])> {
        fn flat<D: ndarray::Dimension>(a: &mut ndarray::Array<f32, D>) -> &mut [f32] {
            if !a.is_standard_layout() {
                *a = a.as_standard_layout().into_owned();
            }
            a.as_slice_mut().expect("standard layout is contiguous")
        }
        let mut out = Vec::new();
        match self {
            Op::Conv2d(c) | Op::ConvReLU2d(c) => {
                out.push(("weight", c.weight.shape().to_vec(), flat(&mut c.weight)));
                if let Some(b) = &mut c.bias {
                    out.push(("bias", vec![b.len()], flat(b)));
                }
            }
            Op::Linear(l) | Op::LinearReLU(l) => {
                out.push(("weight", l.weight.shape().to_vec(), flat(&mut l.weight)));
                if let Some(b) = &mut l.bias {
                    out.push(("bias", vec![b.len()], flat(b)));
                }
            }
            Op::BatchNorm1d(b) | Op::BatchNorm2d(b) => {
                let c = b.channels();
                out.push(("weight", vec![c], flat(&mut b.weight)));
                out.push(("bias", vec![c], flat(&mut b.bias)));
                out.push(("running_mean", vec![c], flat(&mut b.running_mean)));
                out.push(("running_var", vec![c], flat(&mut b.running_var)));
            }
            Op::LayerNorm(l) => {
                let s = l.normalized_shape.clone();
                if let Some(w) = &mut l.weight {
                    out.push(("weight", s.clone(), flat(w)));
                }
                if let Some(b) = &mut l.bias {
                    out.push(("bias", s, flat(b)));
                }
            }
            _ => {}
        }
        out
    }
}
