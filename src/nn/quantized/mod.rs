//! Quantized layers: int8 twins of the float layers, bit-exact with PyTorch's
//! `torch.ao.nn.quantized` modules on the fbgemm engine.
//!
//! Activations travel as [`QTensor`]s: `u8` values in PyTorch's logical layout (NCHW for
//! images, `[batch, features]` for vectors) with a per-tensor scale and zero point. Each
//! layer is built from float weights (`ndarray`) plus the weight [`QParams`]
//! and the output scale and zero point, quantizes and packs its weights once, and reports
//! its weight bytes.
//!
//! ```
//! use ndarray::{array, Array2};
//! use ptq::nn::quantized::{QLinear, QTensor};
//! use ptq::{DType, QParams};
//!
//! let w = array![[0.5f32, -0.25], [0.125, 1.0]];
//! let wq = QParams::per_tensor(1.0 / 64.0, 0, DType::QInt8)?;
//! let layer = QLinear::new(w.view(), None, &wq, 0.05, 128)?;
//! let x = QTensor::from_f32(&array![[1.0f32, 2.0]].into_dyn(), 0.02, 0)?;
//! let y = layer.forward(&x)?;
//! assert_eq!(y.data().shape(), &[1, 2]);
//! let yf = y.dequantize();
//! assert!((yf[[0, 1]] - 2.125).abs() < 0.05);
//! # Ok::<(), ptq::QuantError>(())
//! ```

mod activation;
mod add;
mod cat;
mod conv;
mod elementwise;
mod linear;
mod mean;
mod mul;
mod norm;
mod pool;
mod tensor;
mod upsample;

pub use activation::{
    ActTables, QClamp, QHardsigmoid, QHardswish, QLeakyReLU, QSigmoid, SIGMOID_SCALE,
};
pub use add::QAdd;
pub use cat::QCat;
pub(crate) use conv::recycle_tensor;
pub use conv::{Conv2dParams, QConv2d, QConvReLU2d};
pub use linear::{QLinear, QLinearReLU};
pub use mean::QMean;
pub use mul::QMul;
pub use norm::{QBatchNorm2d, QLayerNorm};
pub use pool::{QAdaptiveAvgPool2d, QAvgPool2d, QFlatten, QMaxPool2d, QReLU};
pub(crate) use tensor::nhwc_to_nchw as nhwc_to_nchw_u8;
pub use tensor::{QTensor, TorchLayout};
pub use upsample::{QUpsampleBilinear2d, QUpsampleNearest2d, UpsampleSize};

use crate::error::{QuantError, Result};
use crate::qparams::{DType, QParams};

/// Quantized weights of a layer: `i8` values, scales and zero points per output channel
/// (or one of each), and whether the scheme is per-channel.
pub(crate) struct QWeights {
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
    pub zero_points: Vec<i32>,
    pub per_channel: bool,
}

/// Checks weight qparams for a layer with `out` output channels (axis 0).
pub(crate) fn check_weight_qparams(qp: &QParams, out: usize, layer: &str) -> Result<()> {
    if qp.dtype() != DType::QInt8 {
        return Err(QuantError::UnsupportedConfig {
            context: layer.into(),
            reason: format!("weights must be qint8, got {}", qp.dtype()),
        });
    }
    if let Some(axis) = qp.scheme().axis() {
        if axis != 0 || qp.num_channels() != out {
            return Err(QuantError::ShapeMismatch {
                context: layer.into(),
                expected: format!("per-channel weight qparams on axis 0 with {out} channels"),
                actual: format!("axis {axis} with {} channels", qp.num_channels()),
            });
        }
    }
    Ok(())
}

/// Quantizes float weights whose axis 0 is the output channel.
pub(crate) fn quantize_weights(
    w: ndarray::ArrayViewD<'_, f32>,
    qp: &QParams,
    layer: &str,
) -> Result<QWeights> {
    let out = w.shape().first().copied().unwrap_or(0);
    check_weight_qparams(qp, out, layer)?;
    let q = crate::qparams::quantize(&w, qp).map_err(|e| e.in_context(layer))?;
    let values = q
        .as_standard_layout()
        .iter()
        .map(|&v| v.clamp(-128, 127) as i8)
        .collect();
    Ok(QWeights {
        values,
        scales: qp.scales().to_vec(),
        zero_points: qp.zero_points().to_vec(),
        per_channel: qp.scheme().is_per_channel(),
    })
}

/// Takes already quantized `i8` weights.
pub(crate) fn quantized_weights(
    w: ndarray::ArrayViewD<'_, i8>,
    qp: &QParams,
    layer: &str,
) -> Result<QWeights> {
    let out = w.shape().first().copied().unwrap_or(0);
    check_weight_qparams(qp, out, layer)?;
    for &v in w.iter() {
        if (v as i32) < qp.quant_min() || (v as i32) > qp.quant_max() {
            return Err(QuantError::QuantizedOutOfRange {
                context: layer.into(),
                value: v as i64,
                quant_min: qp.quant_min() as i64,
                quant_max: qp.quant_max() as i64,
            });
        }
    }
    Ok(QWeights {
        values: w.as_standard_layout().iter().copied().collect(),
        scales: qp.scales().to_vec(),
        zero_points: qp.zero_points().to_vec(),
        per_channel: qp.scheme().is_per_channel(),
    })
}

/// Checks a float bias of `n` elements.
/// Refuses weights whose `i32` accumulator could overflow: with `values` row-major
/// `[out][k]` (`k = per_out` values per output) and `zero_points` (one or one per output),
/// the worst case `255 * sum_k |w - zp|` over any input must fit in `i32` (the kernels and
/// fbgemm accumulate in `i32`; beyond that the result would silently wrap).
///
/// # Errors
/// [`QuantError::UnsupportedConfig`] naming the layer, the weight shape and the output
/// channel.
pub(crate) fn check_accumulator(
    values: &[i8],
    zero_points: &[i32],
    per_out: usize,
    layer: &str,
    shape: &str,
) -> Result<()> {
    if per_out == 0 {
        return Ok(());
    }
    for (o, row) in values.chunks(per_out).enumerate() {
        let zp = if zero_points.len() == 1 {
            zero_points[0]
        } else {
            zero_points.get(o).copied().unwrap_or(0)
        } as i64;
        let l1: i64 = row.iter().map(|&w| (w as i64 - zp).abs()).sum();
        if l1.saturating_mul(255) > i32::MAX as i64 {
            return Err(QuantError::UnsupportedConfig {
                context: layer.into(),
                reason: format!(
                    "{shape}: output channel {o} sums {per_out} products whose worst case \
                     255 * {l1} overflows the i32 accumulator (use a smaller kernel or \
                     fewer input channels)"
                ),
            });
        }
    }
    Ok(())
}

pub(crate) fn check_bias(
    bias: Option<ndarray::ArrayView1<'_, f32>>,
    n: usize,
    layer: &str,
) -> Result<Option<Vec<f32>>> {
    match bias {
        None => Ok(None),
        Some(b) => {
            if b.len() != n {
                return Err(QuantError::ShapeMismatch {
                    context: layer.into(),
                    expected: format!("bias of {n} elements"),
                    actual: format!("bias of {} elements", b.len()),
                });
            }
            let nan = b.iter().filter(|v| v.is_nan()).count();
            let inf = b.iter().filter(|v| v.is_infinite()).count();
            if nan + inf > 0 {
                return Err(QuantError::NonFinite {
                    context: layer.into(),
                    nan,
                    inf,
                    total: n,
                });
            }
            Ok(Some(b.to_vec()))
        }
    }
}

mod model;
pub use model::{QuantizedModel, StepHook};
