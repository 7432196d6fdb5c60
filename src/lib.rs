//! # ptq: post-training int8 quantization, numerically compatible with PyTorch
//!
//! `ptq` quantizes float neural networks to int8 the way PyTorch's eager-mode
//! post-training quantization does, bit for bit, and refuses the usual mistakes loudly
//! instead of silently losing accuracy.
//!
//! Observers watch calibration data and turn it into scales and zero points; a
//! [`QConfig`] says which observer watches activations and which watches
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
//! ## The flow over a graph, from the crate root
//! ```
//! use ndarray::{Array1, Array4, ArrayD, IxDyn};
//! use ptq::graph::Dim;
//! use ptq::nn::Conv2d;
//! use ptq::{calibrate, convert, prepare, GraphBuilder, QConfig, QConfigMap, QuantizedGraph};
//!
//! let mut g = GraphBuilder::new();
//! let x = g.input("x", &[Dim::Batch, 3.into(), 8.into(), 8.into()])?;
//! let q = g.quant_stub("quant", x)?;
//! let w = Array4::from_shape_fn((4, 3, 3, 3), |(o, i, h, w)| ((o + i + h + w) as f32 * 0.3).sin());
//! let y = g.conv2d("conv", q, Conv2d::new(w, Some(Array1::zeros(4)))?.with_padding(1, 1))?;
//! let y = g.relu("relu", y)?;
//! let out = g.dequant_stub("dequant", y)?;
//! g.output(out)?;
//!
//! let mut prepared = prepare(g.build()?, &QConfigMap::new(QConfig::fbgemm()))?;
//! let batches = (0..4).map(|i| ArrayD::from_elem(IxDyn(&[2, 3, 8, 8]), i as f32 * 0.25 - 0.5));
//! calibrate(&mut prepared, batches)?;
//! let int8: QuantizedGraph = convert(prepared)?;
//! let y = ptq::with_threads(1, || int8.forward(&[ArrayD::from_elem(IxDyn(&[1, 3, 8, 8]), 0.5)]))??;
//! assert_eq!(y[0].shape(), &[1, 4, 8, 8]);
//! # Ok::<(), ptq::QuantError>(())
//! ```
//! Graphs also come from ONNX ([`load_onnx`]) or from a PyTorch `state_dict` loaded into a
//! built graph ([`load_safetensors_graph`]). A [`Sequential`](nn::Sequential) model lowers
//! into a graph ([`Graph::from_sequential`]); [`workflow`] runs this same flow on it, layer
//! paths as node names, and wraps the result in a
//! [`QuantizedModel`](nn::quantized::QuantizedModel).
//!
//! ## Threads
//! Large convolutions and matrix products run on rayon's thread pool. By default it has
//! one thread per CPU (or `RAYON_NUM_THREADS`). [`set_num_threads`] fixes the process-wide
//! count once, before the first parallel work; [`with_threads`] runs one closure (a
//! `forward`, a calibration) on a pool of its own; [`current_num_threads`] says how many
//! threads the calling context would use. Results do not depend on the thread count.
//!
//! ## Stability
//! The modules listed below are the public API. `ptq::kernels` (the int8 micro-kernels,
//! kernel sets and the scalar reference oracles) is public only so that the crate's own
//! benches and tests can reach it: it is hidden from the documentation and is not covered
//! by semantic versioning. Its environment variables are part of the API:
//! `PTQ_FORCE_PORTABLE=1` forces the portable Rust kernels, `PTQ_NO_AVX512=1` keeps the
//! AVX2 kernels on AVX-512 VNNI machines, `PTQ_DEBUG=1` prints which kernel ran.
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
//! * [`workflow`]: `prepare` -> `calibrate` -> `convert` for [`Sequential`](nn::Sequential)
//!   models, a convenience over [`quant`] (the model is lowered into a graph).
//! * [`analysis`]: per-layer error (SQNR) of an int8 model against its float twin,
//!   sensitivity analysis, automatic mixed precision, cross-layer equalization, high-bias
//!   absorption and bias correction.
//! * [`io`]: PyTorch `state_dict` loading from safetensors (integer tensors too), ONNX
//!   import and QDQ export.
//! * [`error`]: [`QuantError`], the one error type.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod analysis;
pub mod error;
pub mod graph;
pub mod io;
// Not part of the public API: the int8 micro-kernels, kernel sets and reference oracles,
// public for the crate's benches and tests only, outside semantic versioning.
#[doc(hidden)]
pub mod kernels;
pub mod nn;
pub mod observer;
pub mod qconfig;
pub mod qparams;
pub mod quant;
pub mod workflow;

pub use error::{QuantError, Result};
pub use graph::{Graph, GraphBuilder, NodeId};
pub use io::load_safetensors_graph;
pub use io::onnx::load_onnx;
pub use qconfig::{ObserverSpec, QConfig, QConfigMap};
pub use qparams::{
    dequantize, dequantize_val, fake_quantize, qparams_from_min_max, quantize, quantize_val,
    resolve_quant_range, ActQParams, DType, QParams, QScheme, RangeConfig,
};
pub use quant::{
    calibrate, calibrate_inputs, convert, prepare, GraphCalibrationReport, PreparedGraph,
    QuantizedGraph,
};

/// Sets the number of threads of rayon's global pool, which ptq's parallel kernels use,
/// for the whole process. Call it once, before any parallel work (the pool is built on
/// first use); calling it again with the same count is fine.
///
/// # Errors
/// [`QuantError::UnsupportedConfig`] for `n == 0`, or when the global pool already exists
/// with another thread count (built by an earlier call, by ptq's first parallel work or by
/// another library): the error says how many threads it has. Use [`with_threads`] then.
///
/// # Examples
/// ```
/// ptq::set_num_threads(2)?;
/// assert_eq!(ptq::current_num_threads(), 2);
/// assert!(ptq::set_num_threads(3).is_err()); // the global pool exists now
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn set_num_threads(n: usize) -> Result<()> {
    let refuse = |reason: String| QuantError::UnsupportedConfig {
        context: "set_num_threads".into(),
        reason,
    };
    if n == 0 {
        return Err(refuse("the thread count must be at least 1".into()));
    }
    match rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
    {
        Ok(()) => Ok(()),
        Err(_) if rayon::current_num_threads() == n && rayon::current_thread_index().is_none() => {
            Ok(())
        }
        Err(e) => Err(refuse(format!(
            "cannot make the global pool {n} threads: {e} (it has {}); call set_num_threads \
             before any parallel work, or use with_threads",
            rayon::current_num_threads()
        ))),
    }
}

/// Runs `f` on a thread pool of `n` threads of its own (built for this call), so that the
/// ptq work inside it (a `forward`, a calibration, a conversion) uses `n` threads, whatever
/// the global pool has. For many calls, build a `rayon::ThreadPool` once and call
/// `pool.install(|| ...)` yourself: that is all this does.
///
/// # Errors
/// [`QuantError::UnsupportedConfig`] for `n == 0` or if the pool cannot be built.
///
/// # Examples
/// ```
/// let n = ptq::with_threads(3, ptq::current_num_threads)?;
/// assert_eq!(n, 3);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn with_threads<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    let refuse = |reason: String| QuantError::UnsupportedConfig {
        context: "with_threads".into(),
        reason,
    };
    if n == 0 {
        return Err(refuse("the thread count must be at least 1".into()));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| refuse(format!("cannot build a pool of {n} threads: {e}")))?;
    Ok(pool.install(f))
}

/// The number of threads ptq's parallel work would use here: the enclosing
/// [`with_threads`] pool's, or the global pool's.
pub fn current_num_threads() -> usize {
    rayon::current_num_threads()
}

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
