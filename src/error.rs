//! The crate's one error type.
//!
//! Every fallible function in `ptq` returns [`Result<T>`](crate::Result), whose error is
//! [`QuantError`]. Each variant says what was wrong and where (the observer or layer, the
//! shape, the offending value) and its documentation says how to fix it.

use thiserror::Error;

/// Shorthand for `std::result::Result<T, QuantError>`.
pub type Result<T> = std::result::Result<T, QuantError>;

/// Everything that can go wrong in `ptq`.
///
/// The enum is `#[non_exhaustive]`: later versions add variants, so match with a `_` arm.
/// Variants that carry a `context` name the place the error happened: an observer kind
/// (`"MinMaxObserver"`) when raised by a bare observer, or a layer's dotted name
/// (`"layer1.0.conv1"`) once the model workflow re-labels it with
/// [`QuantError::in_context`].
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum QuantError {
    /// The quantization range `quant_min..=quant_max` is invalid for its dtype.
    ///
    /// Cause: a custom range that does not contain 0, is empty, or does not fit in the
    /// dtype's storage (PyTorch only checks the length for `qint8`; `ptq` also refuses
    /// e.g. `quint8` with `quant_max = 300`). Fix: pick a range inside the dtype, with
    /// `quant_min <= 0 <= quant_max` and `quant_min < quant_max`.
    #[error("invalid quantization range [{quant_min}, {quant_max}] for {dtype}: {reason}")]
    InvalidQuantRange {
        /// The requested lower bound.
        quant_min: i64,
        /// The requested upper bound.
        quant_max: i64,
        /// The dtype the range was meant for, e.g. `"quint8"`.
        dtype: &'static str,
        /// Which rule the range broke.
        reason: &'static str,
    },

    /// A configuration PyTorch rejects too (or that cannot be computed correctly).
    ///
    /// Cause: for example `reduce_range` with a symmetric `quint8` scheme, a per-channel
    /// scheme given to a per-tensor observer, zero bins. Fix: follow the message; the
    /// presets in [`crate::qconfig`] are always valid.
    #[error("unsupported configuration for {context}: {reason}")]
    UnsupportedConfig {
        /// The observer or layer being configured.
        context: String,
        /// What is not supported.
        reason: String,
    },

    /// An observer saw no data, so it has no range to derive quantization parameters from.
    ///
    /// Cause: `convert`/`qparams` before any calibration batch reached this observer (the
    /// classic "prepare then convert" mistake, or a calibration set that is empty or only
    /// holds empty tensors). PyTorch warns and uses scale 1.0, which silently ruins
    /// accuracy; `ptq` refuses. Fix: run calibration data through the model first.
    #[error("{context}: observer saw no data; run calibration batches through it before computing quantization parameters")]
    Uncalibrated {
        /// The observer or layer that saw nothing.
        context: String,
    },

    /// The input contained NaN or infinite values.
    ///
    /// Cause: a diverged model, uninitialised data, a division by zero upstream. A single
    /// NaN would poison a min/max range, so nothing is recorded from the offending tensor.
    /// Fix: clean the data (or the model) that produced it.
    #[error("{context}: input holds {nan} NaN and {inf} infinite values out of {total}; nothing was recorded")]
    NonFinite {
        /// Where the values were seen.
        context: String,
        /// How many NaN values.
        nan: usize,
        /// How many +/- infinity values.
        inf: usize,
        /// How many values the tensor holds in all.
        total: usize,
    },

    /// A tensor's shape does not fit what was expected.
    ///
    /// Cause: a per-channel observer fed a different number of channels than before,
    /// per-channel parameters whose length does not match the tensor, a channel axis past
    /// the tensor's rank. Fix: check the shapes named in the message.
    #[error("{context}: shape mismatch: expected {expected}, got {actual}")]
    ShapeMismatch {
        /// Where the mismatch was found.
        context: String,
        /// What was expected, e.g. `"64 channels on axis 0"`.
        expected: String,
        /// What was given, e.g. `"shape [32, 3, 3, 3]"`.
        actual: String,
    },

    /// A scale that cannot be used: zero, negative, subnormal, NaN or infinite.
    ///
    /// Fix: scales come from observers, which never produce such values; hand-made
    /// [`QParams`](crate::QParams) must use finite positive normal scales.
    #[error("{context}: invalid scale {value:e} at channel {channel}: scales must be finite, positive and normal")]
    InvalidScale {
        /// Where the scale was given.
        context: String,
        /// The channel (0 for per-tensor parameters).
        channel: usize,
        /// The offending value.
        value: f32,
    },

    /// A zero point outside `quant_min..=quant_max`.
    ///
    /// Fix: zero points must be representable in the quantized range.
    #[error("{context}: zero point {zero_point} at channel {channel} is outside [{quant_min}, {quant_max}]")]
    InvalidZeroPoint {
        /// Where the zero point was given.
        context: String,
        /// The channel (0 for per-tensor parameters).
        channel: usize,
        /// The offending value.
        zero_point: i64,
        /// The range's lower bound.
        quant_min: i64,
        /// The range's upper bound.
        quant_max: i64,
    },

    /// A quantized value outside `quant_min..=quant_max` of the parameters it is used with.
    ///
    /// Cause: integers that did not come from these parameters (another dtype, another
    /// layer). Fix: dequantize with the parameters the values were quantized with.
    #[error("{context}: quantized value {value} is outside [{quant_min}, {quant_max}]")]
    QuantizedOutOfRange {
        /// Where the value was seen.
        context: String,
        /// The offending value.
        value: i64,
        /// The range's lower bound.
        quant_min: i64,
        /// The range's upper bound.
        quant_max: i64,
    },

    /// Several observers saw no data; `convert` lists every one of them.
    ///
    /// Cause: no calibration pass (the classic "prepare then convert"), or calibration
    /// data that never reached these layers. Fix: run `calibrate` with representative
    /// batches before `convert`.
    #[error("{} layer(s) saw no calibration data: {}; run calibrate() with representative batches before convert()", layers.len(), layers.join(", "))]
    UncalibratedLayers {
        /// Dotted names of the layers whose observers saw nothing.
        layers: Vec<String>,
    },

    /// A quantization configuration that quantizes nothing.
    ///
    /// Cause: an empty `QConfigMap` (no global config and no entry that matches a
    /// quantizable layer). Fix: give a global `QConfig`, or entries for the layers to
    /// quantize.
    #[error("nothing to quantize: {reason}")]
    NothingToQuantize {
        /// Why nothing matched.
        reason: String,
    },

    /// Calibration received no batch (or only empty ones).
    ///
    /// Fix: pass a non-empty iterator of representative input batches.
    #[error("calibration received no data: {reason}")]
    EmptyCalibration {
        /// What was received.
        reason: String,
    },

    /// A file that cannot be used: unreadable, truncated, corrupt, or holding data of an
    /// unsupported type.
    ///
    /// Fix: re-export the file (for weights: `safetensors.torch.save_file` of the
    /// `state_dict`, float tensors only).
    #[error("{context}: invalid file: {reason}")]
    InvalidFile {
        /// The file (path or caller-given name).
        context: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A `state_dict` that does not fit the model.
    ///
    /// Cause: the Rust model's architecture differs from the one that was saved (a layer
    /// renamed, missing, or with other sizes). Fix: make the names and shapes listed here
    /// agree, or load non-strictly to accept missing/unexpected keys.
    #[error("state_dict does not fit the model: missing {missing:?}, unexpected {unexpected:?}, shape mismatches {mismatched:?}")]
    StateDictMismatch {
        /// Model parameters the state_dict lacks.
        missing: Vec<String>,
        /// Keys of the state_dict the model has no parameter for.
        unexpected: Vec<String>,
        /// `name: model [shape], file [shape]` for every shape that differs.
        mismatched: Vec<String>,
    },

    /// Two observers that cannot be merged (different kinds or configurations).
    ///
    /// Fix: merge only observers built from the same spec, e.g. the per-thread copies of
    /// one layer's observer.
    #[error("cannot merge {theirs} into {ours}: {reason}")]
    ObserverMismatch {
        /// The observer being merged into.
        ours: String,
        /// The observer being merged from.
        theirs: String,
        /// What differs.
        reason: String,
    },
}

impl QuantError {
    /// Re-labels the place the error happened, e.g. with the dotted layer name that owns
    /// an observer. Variants without a place are returned unchanged.
    ///
    /// # Examples
    /// ```
    /// use ptq::QuantError;
    /// let e = QuantError::Uncalibrated { context: "MinMaxObserver".into() };
    /// let e = e.in_context("features.0");
    /// assert_eq!(e, QuantError::Uncalibrated { context: "features.0".into() });
    /// ```
    pub fn in_context(mut self, place: &str) -> Self {
        match &mut self {
            QuantError::UnsupportedConfig { context, .. }
            | QuantError::Uncalibrated { context }
            | QuantError::NonFinite { context, .. }
            | QuantError::ShapeMismatch { context, .. }
            | QuantError::InvalidScale { context, .. }
            | QuantError::InvalidZeroPoint { context, .. }
            | QuantError::QuantizedOutOfRange { context, .. }
            | QuantError::InvalidFile { context, .. } => *context = place.to_string(),
            QuantError::InvalidQuantRange { .. }
            | QuantError::ObserverMismatch { .. }
            | QuantError::StateDictMismatch { .. }
            | QuantError::UncalibratedLayers { .. }
            | QuantError::NothingToQuantize { .. }
            | QuantError::EmptyCalibration { .. } => {}
        }
        self
    }
}
