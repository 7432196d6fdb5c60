//! The quantization flow: [`prepare`] -> [`calibrate`] -> `convert`.
//!
//! * [`prepare`] consumes a float model and returns a [`Prepared`] model: one fresh
//!   activation observer wherever an int8 activation gets new quantization parameters
//!   (quant stubs, conv / linear outputs, residual adds, and the borders where a float
//!   island hands its output back to int8 layers), built from each layer's
//!   [`QConfig`](crate::qconfig::QConfig).
//! * [`calibrate`] runs batches through the float model and lets the observers record
//!   ranges; it reports what it saw.
//! * [`convert`] consumes the calibrated model and returns the int8 model, or an error that
//!   lists every observer that saw nothing.
//!
//! The states are types: a [`Prepared`] model can only be made by `prepare`, and only a
//! `Prepared` model can be calibrated or converted.

mod calibrate;
mod convert;
mod prepare;

use std::borrow::Borrow;

use ndarray::ArrayD;

pub use calibrate::{
    calibrate, calibrate_parallel, CalibrationProgress, CalibrationReport, ObservedRange,
};
pub use convert::convert;
pub use prepare::{prepare, Domain, PlanNode, Prepared, INPUT};

use crate::error::Result;
use crate::nn::quantized::QuantizedModel;
use crate::nn::Sequential;
use crate::qconfig::QConfigMap;

/// `prepare`, `calibrate` and `convert` in one call.
///
/// # Errors
/// As [`prepare`], [`calibrate`] and [`convert`].
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2, ArrayD, IxDyn};
/// use ptq::nn::{Layer, Linear, Sequential};
/// use ptq::qconfig::{QConfig, QConfigMap};
/// let model = Sequential::new()
///     .push("fc", Layer::Linear(Linear::new(Array2::eye(3), Some(Array1::zeros(3)))?));
/// let batches = vec![ArrayD::from_elem(IxDyn(&[4, 3]), 1.0f32)];
/// let int8 = ptq::workflow::quantize_model(model, &QConfigMap::new(QConfig::fbgemm()), &batches)?;
/// assert_eq!(int8.forward(&batches[0])?.shape(), &[4, 3]);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn quantize_model<I, B>(
    model: Sequential,
    map: &QConfigMap,
    batches: I,
) -> Result<QuantizedModel>
where
    I: IntoIterator<Item = B>,
    B: Borrow<ArrayD<f32>>,
{
    let mut prepared = prepare(model, map)?;
    calibrate(&mut prepared, batches, |_| {})?;
    convert(prepared)
}
