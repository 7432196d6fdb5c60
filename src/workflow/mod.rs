//! The quantization flow: [`prepare`] -> [`calibrate`] -> `convert`.
//!
//! * [`prepare`] consumes a float model and returns a [`Prepared`] model: one fresh
//!   activation observer wherever an int8 activation gets new quantization parameters
//!   (quant stubs, conv / linear outputs, residual adds, and the borders where a float
//!   island hands its output back to int8 layers), built from each layer's
//!   [`QConfig`](crate::qconfig::QConfig).
//! * [`calibrate`] runs batches through the float model and lets the observers record
//!   ranges; it reports what it saw.
//! * `convert` consumes the calibrated model and returns the int8 model, or an error that
//!   lists every observer that saw nothing.
//!
//! The states are types: a [`Prepared`] model can only be made by `prepare`, and only a
//! `Prepared` model can be calibrated or converted.

mod calibrate;
mod prepare;

pub use calibrate::{calibrate, CalibrationProgress, CalibrationReport, ObservedRange};
pub use prepare::{prepare, Domain, PlanNode, Prepared, INPUT};
