//! Per-layer sensitivity: the metric with only one layer quantized, and with only one
//! layer left in float. One implementation on graphs; the `Sequential` entry point lowers
//! the model ([`Graph::from_sequential`]) and runs it.

use std::fmt;

use ndarray::ArrayD;

use super::graph::GraphBatch;
use crate::error::{QuantError, Result};
use crate::graph::Graph;
use crate::nn::{Layer, Sequential};
use crate::qconfig::{QConfig, QConfigMap};
use crate::quant::{calibrate_inputs, convert, prepare, QuantizedGraph};

/// What the sensitivity analysis and the mixed-precision search run on: a float graph and
/// the nodes they may keep in float or quantize alone, `(name, type)` in graph order.
pub(crate) struct Subject<'a> {
    pub(crate) graph: &'a Graph,
    pub(crate) candidates: Vec<(String, &'static str)>,
    /// Why there is no candidate.
    pub(crate) no_candidates: &'static str,
}

impl Subject<'_> {
    /// The float graph's outputs on every batch, batch-major (batch 0's outputs in graph
    /// order, then batch 1's, ...).
    pub(crate) fn forward_float<B: GraphBatch>(
        graph: &Graph,
        eval: &[B],
    ) -> Result<Vec<ArrayD<f32>>> {
        let mut outs = Vec::new();
        for b in eval {
            outs.extend(graph.forward(b.inputs())?);
        }
        Ok(outs)
    }

    /// `prepare` -> `calibrate` -> `convert` of `graph` with `map`; `None` when `map`
    /// quantizes nothing.
    pub(crate) fn quantize<B: GraphBatch>(
        graph: &Graph,
        map: &QConfigMap,
        calibration: &[B],
    ) -> Result<Option<QuantizedGraph>> {
        let mut prepared = match prepare(graph.clone(), map) {
            Ok(p) => p,
            Err(QuantError::NothingToQuantize { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        calibrate_inputs(
            &mut prepared,
            calibration.iter().map(|b| b.inputs().to_vec()),
        )?;
        convert(prepared).map(Some)
    }

    /// Names of the nodes a [`QConfigMap::set_name`] entry for `name` also covers
    /// (`"block"` covers `"block.fc"`).
    fn names_under(&self, name: &str) -> Vec<String> {
        self.graph
            .nodes()
            .iter()
            .filter(|n| {
                n.name.len() > name.len()
                    && n.name.starts_with(name)
                    && n.name.as_bytes()[name.len()] == b'.'
            })
            .map(|n| n.name.clone())
            .collect()
    }
}

/// `map` with exactly the nodes `names` set to `q`: every other node that an entry for
/// one of them would also cover (a residual add `"block"` covers its body `"block.fc"`)
/// keeps `other`.
pub(crate) fn set_exact(
    model: &Subject<'_>,
    mut map: QConfigMap,
    names: &[String],
    q: Option<QConfig>,
    other: Option<QConfig>,
) -> QConfigMap {
    for n in names {
        for c in model.names_under(n) {
            if !names.contains(&c) {
                map = map.set_name(&c, other);
            }
        }
    }
    for n in names {
        map = map.set_name(n, q);
    }
    map
}

/// Runs the int8 graph on every evaluation batch and hands the outputs (batch-major) to
/// `metric`.
pub(crate) fn eval_int8<B: GraphBatch, M>(
    model: &QuantizedGraph,
    eval: &[B],
    metric: &mut M,
) -> Result<f64>
where
    M: FnMut(&[ArrayD<f32>]) -> f64,
{
    let mut outs = Vec::new();
    for b in eval {
        outs.extend(model.forward(b.inputs())?);
    }
    Ok(metric(&outs))
}

/// The float graph's metric.
pub(crate) fn eval_float<B: GraphBatch, M>(graph: &Graph, eval: &[B], metric: &mut M) -> Result<f64>
where
    M: FnMut(&[ArrayD<f32>]) -> f64,
{
    Ok(metric(&Subject::forward_float(graph, eval)?))
}

/// The graph a `Sequential` tool runs on: the model lowered for inputs shaped like
/// `first` (dimension 0: the batch), its input named [`crate::workflow::INPUT`] as in the
/// `Sequential` flow.
pub(crate) fn lower_for(model: &Sequential, first: &ArrayD<f32>) -> Result<Graph> {
    if first.ndim() == 0 {
        return Err(QuantError::ShapeMismatch {
            context: crate::workflow::INPUT.into(),
            expected: "a batch dimension first".into(),
            actual: "a scalar".into(),
        });
    }
    let mut dims = vec![crate::graph::Dim::Batch];
    dims.extend(
        first.shape()[1..]
            .iter()
            .map(|&d| crate::graph::Dim::Fixed(d)),
    );
    Graph::from_sequential_named(model, crate::workflow::INPUT, &dims)
}

/// The `Sequential` model's [`Subject`]: its [`quantizable_layers`], typed by the graph.
pub(crate) fn sequential_subject<'a>(model: &Sequential, graph: &'a Graph) -> Subject<'a> {
    let candidates = quantizable_layers(model)
        .into_iter()
        .map(|p| {
            let t = graph
                .find(&p)
                .map_or("?", |id| graph.node(id).op.type_name());
            (p, t)
        })
        .collect();
    Subject {
        graph,
        candidates,
        no_candidates: "the model has no Conv2d or Linear layer",
    }
}

/// The dotted paths of the layers whose weights are quantized (Conv2d, Linear and their
/// ReLU fusions), in model order.
pub fn quantizable_layers(model: &Sequential) -> Vec<String> {
    model
        .named_layers()
        .into_iter()
        .filter(|(_, l)| {
            matches!(
                l,
                Layer::Conv2d(_) | Layer::ConvReLU2d(_) | Layer::Linear(_) | Layer::LinearReLU(_)
            )
        })
        .map(|(p, _)| p)
        .collect()
}

/// One layer's row of a [`SensitivityReport`].
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSensitivity {
    /// Dotted path.
    pub path: String,
    /// Layer type, e.g. `"ConvReLU2d"`.
    pub layer: &'static str,
    /// The metric when only this layer runs in int8 (everything else float).
    pub only_int8: f64,
    /// The metric when every layer but this one runs in int8.
    pub only_float: f64,
}

/// The metric per layer, ranked: the layer whose return to float recovers the most comes
/// first. Prints as a table; every field can be read directly.
#[derive(Debug, Clone, PartialEq)]
pub struct SensitivityReport {
    /// The float model's metric.
    pub float_metric: f64,
    /// The metric with every layer in int8.
    pub int8_metric: f64,
    /// One row per quantizable layer, ranked by `only_float` (highest first), ties by
    /// `only_int8` (lowest first).
    pub layers: Vec<LayerSensitivity>,
    /// Number of `convert` + evaluation runs made (`1 + 2 * layers`).
    pub evaluations: usize,
}

impl SensitivityReport {
    /// The row of a layer.
    pub fn get(&self, path: &str) -> Option<&LayerSensitivity> {
        self.layers.iter().find(|l| l.path == path)
    }

    /// The layers in rank order (most sensitive first).
    pub fn ranking(&self) -> Vec<&str> {
        self.layers.iter().map(|l| l.path.as_str()).collect()
    }
}

impl fmt::Display for SensitivityReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "float metric {:.4}, all int8 {:.4}",
            self.float_metric, self.int8_metric
        )?;
        writeln!(
            f,
            "{:<5} {:<20} {:<12} {:>12} {:>12} {:>12} {:>12}",
            "rank", "layer", "type", "only int8", "drop", "only float", "recovers"
        )?;
        for (i, l) in self.layers.iter().enumerate() {
            writeln!(
                f,
                "{:<5} {:<20} {:<12} {:>12.4} {:>12.4} {:>12.4} {:>12.4}",
                i + 1,
                l.path,
                l.layer,
                l.only_int8,
                self.float_metric - l.only_int8,
                l.only_float,
                l.only_float - self.int8_metric
            )?;
        }
        Ok(())
    }
}

/// Sensitivity analysis: for every quantizable layer (see [`quantizable_layers`]), the
/// metric when only that layer is quantized with `qconfig` and when only that layer is
/// kept in float, ranked.
///
/// `metric` receives the model's outputs on the `eval` batches (one array per batch, in
/// order) and returns a number where **higher is better** (top-1 accuracy, SQNR against
/// the float outputs, a negated loss, ...). Every measurement quantizes the model afresh
/// from `calibration` through the public flow (`prepare` with a [`QConfigMap`] that keeps
/// layers in float, `calibrate`, `convert`). A layer quantized alone gets automatic
/// quantize / dequantize borders around it. Cost: `1 + 2 * layers` convert + eval runs
/// plus one float evaluation. The model is lowered into a graph for inputs shaped like
/// the first calibration batch and measured by
/// [`graph::sensitivity`](super::graph::sensitivity)'s implementation, over the layers of
/// [`quantizable_layers`].
///
/// # Errors
/// [`QuantError::EmptyCalibration`] for no calibration or no evaluation batch,
/// [`QuantError::NothingToQuantize`] if the model has no quantizable layer, and the
/// flow's own errors.
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2, ArrayD, IxDyn};
/// use ptq::analysis::sensitivity;
/// use ptq::nn::{Layer, Linear, Sequential};
/// use ptq::qconfig::QConfig;
/// let fc = |s: f32| Linear::new(Array2::from_shape_fn((4, 4), |(o, i)| s * (o as f32 - i as f32)), Some(Array1::zeros(4)));
/// let model = Sequential::new()
///     .push("fc1", Layer::LinearReLU(fc(0.5)?))
///     .push("fc2", Layer::Linear(fc(1.0)?));
/// let data = vec![ArrayD::from_shape_fn(IxDyn(&[16, 4]), |i| (i[0] as f32 * 0.3 + i[1] as f32).sin())];
/// let reference = model.forward(&data[0])?;
/// // Metric: SQNR (dB) of the outputs against the float outputs.
/// let metric = |outs: &[ArrayD<f32>]| ptq::analysis::sqnr(&reference, &outs[0]).unwrap_or(f64::NAN).min(100.0);
/// let report = sensitivity(&model, QConfig::minmax_per_tensor(), &data, &data, metric)?;
/// assert_eq!(report.layers.len(), 2);
/// println!("{report}");
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn sensitivity<M>(
    model: &Sequential,
    qconfig: QConfig,
    calibration: &[ArrayD<f32>],
    eval: &[ArrayD<f32>],
    mut metric: M,
) -> Result<SensitivityReport>
where
    M: FnMut(&[ArrayD<f32>]) -> f64,
{
    check_data(calibration, eval)?;
    let graph = lower_for(model, &calibration[0])?;
    let subject = sequential_subject(model, &graph);
    sensitivity_of(&subject, qconfig, calibration, eval, &mut metric)
}

/// [`sensitivity`] over a [`Subject`]'s candidates.
pub(crate) fn sensitivity_of<B: GraphBatch, M>(
    model: &Subject<'_>,
    qconfig: QConfig,
    calibration: &[B],
    eval: &[B],
    metric: &mut M,
) -> Result<SensitivityReport>
where
    M: FnMut(&[ArrayD<f32>]) -> f64,
{
    check_data(calibration, eval)?;
    let layers = model.candidates.clone();
    if layers.is_empty() {
        return Err(QuantError::NothingToQuantize {
            reason: model.no_candidates.into(),
        });
    }
    let float_metric = eval_float(model.graph, eval, metric)?;
    let all = Subject::quantize(model.graph, &QConfigMap::new(qconfig), calibration)?;
    let int8_metric = match &all {
        Some(m) => eval_int8(m, eval, metric)?,
        None => float_metric,
    };
    let mut rows = Vec::new();
    for (path, layer) in layers {
        let one = std::slice::from_ref(&path);
        let only = set_exact(model, QConfigMap::empty(), one, Some(qconfig), None);
        let only_int8 = match Subject::quantize(model.graph, &only, calibration)? {
            Some(m) => eval_int8(&m, eval, metric)?,
            None => float_metric,
        };
        let but = set_exact(model, QConfigMap::new(qconfig), one, None, Some(qconfig));
        let only_float = match Subject::quantize(model.graph, &but, calibration)? {
            Some(m) => eval_int8(&m, eval, metric)?,
            None => float_metric,
        };
        rows.push(LayerSensitivity {
            path,
            layer,
            only_int8,
            only_float,
        });
    }
    rows.sort_by(|a, b| {
        b.only_float
            .total_cmp(&a.only_float)
            .then(a.only_int8.total_cmp(&b.only_int8))
    });
    Ok(SensitivityReport {
        float_metric,
        int8_metric,
        evaluations: 1 + 2 * rows.len(),
        layers: rows,
    })
}

pub(crate) fn check_data<B>(calibration: &[B], eval: &[B]) -> Result<()> {
    if calibration.is_empty() {
        return Err(QuantError::EmptyCalibration {
            reason: "no calibration batch".into(),
        });
    }
    if eval.is_empty() {
        return Err(QuantError::EmptyCalibration {
            reason: "no evaluation batch for the metric".into(),
        });
    }
    Ok(())
}
