//! # ptq: post-training int8 quantization, numerically compatible with PyTorch
//!
//! `ptq` quantizes float neural networks to int8 the way PyTorch's eager-mode
//! post-training quantization does, bit for bit, and refuses the usual mistakes loudly
//! instead of silently losing accuracy.
//!
//! Observers watch calibration data and turn it into scales and zero points; a
//! [`QConfig`](qconfig::QConfig) says which observer watches activations and which watches
//! weights:
//!
//! ```
//! use ndarray::Array;
//! use ptq::qconfig::QConfig;
//! use ptq::{quantize, dequantize, QuantError};
//!
//! // fbgemm's defaults: histogram observer (reduce_range) on activations,
//! // per-channel symmetric qint8 on weights.
//! let qconfig = QConfig::fbgemm();
//! let mut act = qconfig.activation.build()?;
//!
//! // Asking before calibration is an error, not a silent scale of 1.0.
//! assert!(matches!(act.qparams(), Err(QuantError::Uncalibrated { .. })));
//!
//! // Calibrate on a few batches.
//! for b in 0..4 {
//!     let batch = Array::linspace(-1.0f32, 2.0 + b as f32, 1000).into_dyn();
//!     act.observe(batch.view())?;
//! }
//! let qp = act.qparams()?;
//! assert_eq!((qp.quant_min(), qp.quant_max()), (0, 127)); // reduce_range
//!
//! // Quantize and dequantize with PyTorch's arithmetic.
//! let x = Array::linspace(-1.0f32, 5.0, 7);
//! let q = quantize(&x, &qp)?;
//! let back = dequantize(&q, &qp)?;
//! for (a, b) in x.iter().zip(back.iter()) {
//!     assert!((a - b).abs() <= qp.scale() / 2.0 + 1e-6);
//! }
//! # Ok::<(), QuantError>(())
//! ```
//!
//! ## Modules
//! * [`qparams`]: dtypes, schemes, [`QParams`], `quantize` / `dequantize` /
//!   `fake_quantize` and the min/max to scale/zero-point arithmetic.
//! * [`observer`]: the [`Observer`](observer::Observer) trait, PyTorch's observers, and
//!   percentile, entropy (KL) and MSE clipping observers.
//! * [`qconfig`]: observer specs and the fbgemm / x86 / qnnpack presets.
//! * [`graph`]: models as graphs ([`Graph`], [`GraphBuilder`]): ops, shapes, float
//!   forward, fusion.
//! * [`quant`]: quantization over the graph: `prepare` -> `calibrate` -> `convert` into a
//!   [`QuantizedGraph`] of int8 ops ([`quant::QuantOp`]), saved as `ptq-qmodel/2`.
//! * [`nn`]: float layers, [`Sequential`](nn::Sequential) models of named children, fusion.
//! * [`workflow`]: `prepare` -> `calibrate` -> `convert`.
//! * [`analysis`]: per-layer error (SQNR) of an int8 model against its float twin,
//!   sensitivity analysis, automatic mixed precision, cross-layer equalization, high-bias
//!   absorption and bias correction.
//! * [`io`]: PyTorch `state_dict` loading from safetensors.
//! * [`error`]: [`QuantError`], the one error type.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod analysis;
pub mod error;
pub mod graph;
pub mod io;
pub mod kernels;
pub mod nn;
pub mod observer;
pub mod qconfig;
pub mod qparams;
pub mod quant;
pub mod workflow;

pub use error::{QuantError, Result};
pub use graph::{Graph, GraphBuilder, NodeId};
pub use qparams::{
    dequantize, dequantize_val, fake_quantize, qparams_from_min_max, quantize, quantize_val,
    resolve_quant_range, ActQParams, DType, QParams, QScheme, RangeConfig,
};
pub use quant::{PreparedGraph, QuantizedGraph};

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
