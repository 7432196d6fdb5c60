//! Float forward functions of the graph ops, on `ArrayD<f32>` with PyTorch's semantics
//! (NaN propagates through ReLU, clamps and max pooling, as in ATen).

mod activation;
mod pool;
mod tensor;
mod upsample;

pub use activation::{
    clamp, clamp_scalar, erf, gelu, hardsigmoid, hardswish, relu, relu_scalar, sigmoid, silu,
};
pub use pool::{adaptive_avg_pool2d, avg_pool2d, max_pool2d};
pub use tensor::{
    add, batch_norm, concat, flatten, layer_norm, mean, mul, permute, reshape, slice, softmax,
};
pub use upsample::upsample;
