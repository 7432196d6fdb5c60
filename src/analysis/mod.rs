//! Finding accuracy loss and repairing it: per-layer error between a float model and its
//! int8 twin ([`activation_sqnr`], [`weight_sqnr`]), per-layer [`sensitivity`], automatic
//! mixed precision ([`auto_mixed_precision`]), and two steps before `prepare` that make a
//! float model easier to quantize: cross-layer equalization ([`equalize`]) with high-bias
//! absorption ([`absorb_high_bias`]), and bias correction ([`correct_bias`]).
//!
//! Every tool is implemented once, on graphs ([`graph`]:
//! `ptq::analysis::graph::{equalize, correct_bias, sensitivity, ...}`, graphs with several
//! inputs and outputs included); the functions here take a [`Sequential`], lower it into a
//! graph (layer paths become node names; for the data-driven tools, for inputs shaped like
//! the first batch) and map the results back: the same reports keyed by layer path, and
//! the transforms' new weights written into a copy of the model by path.
//!
//! The measuring tools run beside the flow and never change it. Errors are reported as SQNR
//! (signal-to-quantization-noise ratio, `10 log10(sum x^2 / sum (x - x')^2)` in dB: higher
//! is better; every 6 dB is about one bit) and as the largest absolute error.

mod equalize;
pub mod graph;
mod mixed;
mod sensitivity;
mod weighted;

pub use equalize::{
    absorb_high_bias, correct_bias, equalize, range_spread, AbsorbedBias, BiasCorrection,
    EqualizationReport, EqualizedPair,
};
pub use mixed::{auto_mixed_precision, MixedPrecisionOptions, MixedPrecisionResult, SearchStep};
pub use sensitivity::{quantizable_layers, sensitivity, LayerSensitivity, SensitivityReport};

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

use ndarray::ArrayD;

use crate::error::{QuantError, Result};
use crate::graph::Graph;
use crate::nn::quantized::QuantizedModel;
use crate::nn::{Layer, Sequential};
use crate::qconfig::QConfigMap;
use crate::qparams::fake_quantize;

/// Running energy of a signal and of its error.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Energy {
    signal: f64,
    noise: f64,
    max_abs: f32,
    elements: usize,
}

impl Energy {
    fn add(&mut self, reference: &ArrayD<f32>, test: &ArrayD<f32>) {
        for (&a, &b) in reference.iter().zip(test.iter()) {
            self.signal += (a as f64) * (a as f64);
            let d = (a - b) as f64;
            self.noise += d * d;
            self.max_abs = self.max_abs.max((a - b).abs());
        }
        self.elements += reference.len();
    }

    fn sqnr_db(&self) -> f64 {
        if self.noise == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (self.signal / self.noise).log10()
        }
    }
}

/// SQNR in dB of `test` against `reference` (`+inf` when identical).
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if the shapes differ.
///
/// # Examples
/// ```
/// use ndarray::array;
/// let x = array![1.0f32, -2.0, 3.0].into_dyn();
/// let y = array![1.0f32, -2.0, 3.1].into_dyn();
/// let db = ptq::analysis::sqnr(&x, &y)?;
/// assert!((db - 10.0 * (14.0f64 / 0.01).log10()).abs() < 1e-3);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn sqnr(reference: &ArrayD<f32>, test: &ArrayD<f32>) -> Result<f64> {
    if reference.shape() != test.shape() {
        return Err(QuantError::ShapeMismatch {
            context: "sqnr".into(),
            expected: format!("{:?}", reference.shape()),
            actual: format!("{:?}", test.shape()),
        });
    }
    let mut e = Energy::default();
    e.add(reference, test);
    Ok(e.sqnr_db())
}

/// The error of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerError {
    /// Dotted path.
    pub path: String,
    /// Layer type, e.g. `"ConvReLU2d"`.
    pub layer: &'static str,
    /// SQNR in dB (`+inf`: identical).
    pub sqnr_db: f64,
    /// Largest absolute difference.
    pub max_abs_error: f32,
    /// Elements compared.
    pub elements: usize,
    /// For weights: the lowest SQNR of any output channel (per-tensor scales starve the
    /// small channels, which the whole-tensor figure hides). `None` for activations.
    pub worst_channel_sqnr_db: Option<f64>,
}

/// Per-layer errors, in model order; prints as a table.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerReport {
    /// What was compared (`"activations"` or `"weights"`).
    pub what: &'static str,
    /// One row per layer.
    pub layers: Vec<LayerError>,
}

impl LayerReport {
    /// The row of a layer.
    pub fn get(&self, path: &str) -> Option<&LayerError> {
        self.layers.iter().find(|l| l.path == path)
    }

    /// The layer with the lowest SQNR.
    pub fn worst(&self) -> Option<&LayerError> {
        self.layers
            .iter()
            .min_by(|a, b| a.sqnr_db.total_cmp(&b.sqnr_db))
    }
}

impl fmt::Display for LayerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let channels = self
            .layers
            .iter()
            .any(|l| l.worst_channel_sqnr_db.is_some());
        write!(
            f,
            "{:<28} {:<14} {:>10} {:>14} {:>10}",
            format!("layer ({})", self.what),
            "type",
            "SQNR dB",
            "max |error|",
            "elements"
        )?;
        writeln!(f, "{}", if channels { "  worst channel dB" } else { "" })?;
        for l in &self.layers {
            write!(
                f,
                "{:<28} {:<14} {:>10.2} {:>14.6} {:>10}",
                l.path, l.layer, l.sqnr_db, l.max_abs_error, l.elements
            )?;
            match l.worst_channel_sqnr_db {
                Some(v) if channels => writeln!(f, "  {v:>16.2}")?,
                _ => writeln!(f)?,
            }
        }
        Ok(())
    }
}

fn leaf_types(model: &Sequential) -> BTreeMap<String, &'static str> {
    let mut types: BTreeMap<String, &'static str> = model
        .named_layers()
        .into_iter()
        .map(|(p, l)| (p, l.type_name()))
        .collect();
    fn residuals(seq: &Sequential, prefix: &str, out: &mut BTreeMap<String, &'static str>) {
        for (name, layer) in seq.children() {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            if let Layer::Sequential(s) | Layer::Residual(s) = layer {
                if matches!(layer, Layer::Residual(_)) {
                    out.insert(path.clone(), "Residual");
                }
                residuals(s, &path, out);
            }
        }
    }
    residuals(model, "", &mut types);
    types
}

/// Runs the float model and its int8 twin side by side on `batches` and reports, for
/// every layer (matched by dotted path), the SQNR of the int8 output against the float
/// one, accumulated over all batches. Layers that only pass values through (stubs,
/// identities left by fusion) are skipped.
///
/// # Errors
/// [`QuantError::EmptyCalibration`] for no batches; either model's forward errors.
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2, ArrayD, IxDyn};
/// use ptq::nn::{Layer, Linear, Sequential};
/// use ptq::qconfig::{QConfig, QConfigMap};
/// let model = Sequential::new()
///     .push("fc", Layer::Linear(Linear::new(Array2::eye(3), Some(Array1::zeros(3)))?));
/// let data = vec![ArrayD::from_shape_fn(IxDyn(&[8, 3]), |i| (i[0] * 3 + i[1]) as f32 * 0.1)];
/// let int8 = ptq::workflow::quantize_model(model.clone(), &QConfigMap::new(QConfig::minmax_per_tensor()), &data)?;
/// let report = ptq::analysis::activation_sqnr(&model, &int8, &data)?;
/// assert!(report.get("fc").unwrap().sqnr_db > 30.0);
/// println!("{report}");
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn activation_sqnr<I, B>(
    float: &Sequential,
    int8: &QuantizedModel,
    batches: I,
) -> Result<LayerReport>
where
    I: IntoIterator<Item = B>,
    B: Borrow<ArrayD<f32>>,
{
    let mut batches = batches.into_iter().peekable();
    let Some(first) = batches.peek() else {
        return Err(QuantError::EmptyCalibration {
            reason: "activation_sqnr needs at least one batch".into(),
        });
    };
    let lowered = sensitivity::lower_for(float, first.borrow())?;
    let mut report = graph::activation_sqnr(&lowered, int8.graph(), batches.map(graph::One))?;
    // The rows typed as the model names its layers ("ReLU6", "Residual").
    let types = leaf_types(float);
    for row in &mut report.layers {
        if let Some(t) = types.get(&row.path) {
            row.layer = t;
        }
    }
    Ok(report)
}

/// For every Conv2d / Linear (and fused variant) that `map` quantizes, the SQNR of its
/// weights after quantizing them with the config's weight observer (what `convert` will
/// store) against the float weights, for the whole tensor and for its worst output
/// channel.
///
/// # Errors
/// The weight specs' errors, named with the layer.
///
/// # Examples
/// ```
/// use ndarray::{Array2, Array4};
/// use ptq::nn::{Conv2d, Layer, Sequential};
/// use ptq::qconfig::{QConfig, QConfigMap};
/// // Output channels of very different ranges: per-channel scales help.
/// let w = Array4::from_shape_fn((4, 2, 3, 3), |(o, i, y, x)| ((i + y + x) as f32 - 2.0) * 10f32.powi(o as i32 - 2));
/// let model = Sequential::new().push("conv", Layer::Conv2d(Conv2d::new(w, None)?));
/// let pt = ptq::analysis::weight_sqnr(&model, &QConfigMap::new(QConfig::minmax_per_tensor()))?;
/// let pc = ptq::analysis::weight_sqnr(&model, &QConfigMap::new(QConfig::minmax_per_channel()))?;
/// let worst = |r: &ptq::analysis::LayerReport| r.get("conv").unwrap().worst_channel_sqnr_db.unwrap();
/// assert!(worst(&pc) > worst(&pt) + 20.0);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn weight_sqnr(model: &Sequential, map: &QConfigMap) -> Result<LayerReport> {
    graph::weight_sqnr(&Graph::structure_of_sequential(model)?, map)
}

/// The error of quantizing one weight with `qc`'s weight observer (as `convert` does):
/// whole tensor and worst output channel.
fn weight_error(
    path: String,
    layer: &'static str,
    w: ndarray::ArrayViewD<'_, f32>,
    qc: &crate::qconfig::QConfig,
) -> Result<LayerError> {
    let mut obs = qc.weight.build().map_err(|e| e.in_context(&path))?;
    obs.observe(w.view()).map_err(|e| e.in_context(&path))?;
    let qp = obs.qparams().map_err(|e| e.in_context(&path))?;
    let wq = fake_quantize(&w, &qp).map_err(|e| e.in_context(&path))?;
    let mut e = Energy::default();
    e.add(&w.to_owned(), &wq);
    let worst = w
        .outer_iter()
        .zip(wq.outer_iter())
        .map(|(a, b)| {
            let mut c = Energy::default();
            c.add(&a.to_owned(), &b.to_owned());
            c.sqnr_db()
        })
        .fold(f64::INFINITY, f64::min);
    Ok(LayerError {
        path,
        layer,
        sqnr_db: e.sqnr_db(),
        max_abs_error: e.max_abs,
        elements: e.elements,
        worst_channel_sqnr_db: Some(worst),
    })
}
