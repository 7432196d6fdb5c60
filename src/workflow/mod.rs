//! The quantization flow for [`Sequential`] models: [`prepare`] -> [`calibrate`] ->
//! [`convert`], a convenience over the graph flow of [`crate::quant`].
//!
//! * [`prepare`] consumes a float model, lowers it into a [`Graph`](crate::graph::Graph)
//!   with [`Graph::from_sequential`](crate::graph::Graph::from_sequential) (every layer
//!   keeps its dotted path as node name) and prepares that graph: one fresh activation
//!   observer wherever an int8 activation gets new quantization parameters (quant stubs,
//!   conv / linear outputs, residual adds, and the borders where a float island hands its
//!   output back to int8 layers), built from each layer's
//!   [`QConfig`](crate::qconfig::QConfig).
//! * [`calibrate`] runs batches through the float graph and lets the observers record
//!   ranges; it reports what it saw.
//! * [`convert`] consumes the calibrated model and returns the int8 model, a
//!   [`QuantizedModel`] over a [`QuantizedGraph`](crate::quant::QuantizedGraph), or an
//!   error that lists every observer that saw nothing.
//!
//! Everything numerical happens in the graph flow, so a `Sequential` model and the same
//! model built as a graph quantize to the same bits, and an op added to the graph's op set
//! needs nothing here.
//!
//! The states are types: a [`Prepared`] model can only be made by `prepare`, and only a
//! `Prepared` model can be calibrated or converted.

mod calibrate;
mod prepare;

use std::borrow::Borrow;

use ndarray::ArrayD;

pub use calibrate::{
    calibrate, calibrate_parallel, CalibrationProgress, CalibrationReport, ObservedRange,
};
pub use prepare::{prepare, Prepared, INPUT};

use crate::error::{QuantError, Result};
use crate::nn::quantized::QuantizedModel;
use crate::nn::{Layer, Sequential};
use crate::qconfig::QConfigMap;

/// Converts a calibrated model to int8 with the graph flow's
/// [`crate::quant::convert`]: every activation observer's range becomes a scale and zero
/// point, every weight is observed with its layer's weight spec, quantized and packed, and
/// layers planned in float stay float behind automatic dequantize / quantize borders.
///
/// # Errors
/// [`QuantError::UncalibratedLayers`] listing every observer that saw no data, sorted by
/// path (nothing is converted; a model whose graph waits for its input shape lists the
/// layers whose own output would be observed); [`QuantError::UnsupportedConfig`] naming the layer if a spec is not one the
/// kernels take; the kernels' own errors, named with the layer.
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2, ArrayD, IxDyn};
/// use ptq::nn::{Layer, Linear, Sequential};
/// use ptq::qconfig::{QConfig, QConfigMap};
/// use ptq::workflow::{calibrate, convert, prepare};
/// use ptq::QuantError;
/// let model = || Sequential::new()
///     .push("quant", Layer::QuantStub)
///     .push("fc", Layer::Linear(Linear::new(Array2::eye(4), Some(Array1::zeros(4))).unwrap()))
///     .push("dequant", Layer::DeQuantStub);
/// let map = QConfigMap::new(QConfig::fbgemm());
///
/// // The classic mistake is an error naming every layer that saw nothing.
/// let err = convert(prepare(model(), &map)?).unwrap_err();
/// assert_eq!(err, QuantError::UncalibratedLayers { layers: vec!["fc".into(), "quant".into()] });
///
/// let mut prepared = prepare(model(), &map)?;
/// calibrate(&mut prepared, (0..4).map(|i| ArrayD::from_elem(IxDyn(&[2, 4]), i as f32 * 0.25)), |_| {})?;
/// let int8 = convert(prepared)?;
/// let y = int8.forward(&ArrayD::from_elem(IxDyn(&[1, 4]), 0.5))?;
/// assert!((y[[0, 2]] - 0.5).abs() < 0.01);
/// # Ok::<(), QuantError>(())
/// ```
pub fn convert(prepared: Prepared) -> Result<QuantizedModel> {
    match prepared.graph {
        Some(graph) => match crate::quant::convert(graph) {
            Ok(g) => QuantizedModel::from_graph(g),
            Err(QuantError::UncalibratedLayers { mut layers }) => {
                layers.sort();
                Err(QuantError::UncalibratedLayers { layers })
            }
            Err(e) => Err(e),
        },
        None => {
            let mut layers = observed_paths(&prepared.model, "", &prepared.map);
            layers.sort();
            Err(QuantError::UncalibratedLayers { layers })
        }
    }
}

/// The paths of the layers whose own output a calibrated model would observe (for a model
/// that never saw a batch).
fn observed_paths(seq: &Sequential, prefix: &str, map: &QConfigMap) -> Vec<String> {
    let mut out = Vec::new();
    for (name, layer) in seq.children() {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match layer {
            Layer::Sequential(s) => out.extend(observed_paths(s, &path, map)),
            Layer::Residual(s) => {
                out.extend(observed_paths(s, &path, map));
                if map.qconfig_for(&path, "Residual").is_some() {
                    out.push(path);
                }
            }
            Layer::QuantStub
            | Layer::Conv2d(_)
            | Layer::ConvReLU2d(_)
            | Layer::Linear(_)
            | Layer::LinearReLU(_)
            | Layer::BatchNorm2d(_)
                if map.qconfig_for(&path, layer.type_name()).is_some() =>
            {
                out.push(path)
            }
            _ => {}
        }
    }
    out
}

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
