//! Automatic mixed precision: the fewest layers to keep in float so the int8 model meets
//! an accuracy target.

use std::fmt;

use ndarray::ArrayD;

#[cfg(doc)]
use super::equalize::{absorb_high_bias, correct_bias, equalize};
use super::graph::GraphBatch;
use super::sensitivity::{
    check_data, eval_float, eval_int8, lower_for, sequential_subject, set_exact, Subject,
};
use crate::error::{QuantError, Result};
use crate::graph::Graph;
use crate::nn::quantized::QuantizedModel;
use crate::nn::Sequential;
use crate::qconfig::{QConfig, QConfigMap};
use crate::quant::QuantizedGraph;

/// Options of [`auto_mixed_precision`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixedPrecisionOptions {
    /// The largest acceptable drop of the metric below the float model's (e.g. `0.01`
    /// for one point of accuracy expressed as a fraction).
    pub allowed_drop: f64,
    /// Also search on the cross-layer-equalized model ([`equalize`], then
    /// [`absorb_high_bias`] on the calibration data).
    pub try_equalization: bool,
    /// Also search with empirical bias correction ([`correct_bias`]) applied.
    pub try_bias_correction: bool,
    /// Sweeps for [`equalize`].
    pub equalization_sweeps: usize,
}

impl Default for MixedPrecisionOptions {
    /// One point (`0.01`) of allowed drop; equalization and bias correction tried;
    /// 20 equalization sweeps.
    fn default() -> Self {
        MixedPrecisionOptions {
            allowed_drop: 0.01,
            try_equalization: true,
            try_bias_correction: true,
            equalization_sweeps: 20,
        }
    }
}

/// One measured configuration of the search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchStep {
    /// The pre-processing (`"plain"`, `"equalized"`, `"bias-corrected"`,
    /// `"equalized+bias-corrected"`).
    pub variant: &'static str,
    /// The phase (`"all int8"`, `"sensitivity"`, `"greedy"`, `"prune"`).
    pub phase: &'static str,
    /// The layers kept in float in this configuration.
    pub float_layers: Vec<String>,
    /// The metric measured.
    pub metric: f64,
    /// Whether it met the target.
    pub meets_target: bool,
}

/// What [`auto_mixed_precision`] (or
/// [`graph::auto_mixed_precision`](super::graph::auto_mixed_precision), with
/// `M = QuantizedGraph`) found: the model and every decision behind it.
#[derive(Debug)]
pub struct MixedPrecisionResult<M = QuantizedModel> {
    /// The chosen int8 model (with its float islands).
    pub model: M,
    /// The layers kept in float, in model order.
    pub float_layers: Vec<String>,
    /// The pre-processing of the chosen model (see [`SearchStep::variant`]).
    pub variant: &'static str,
    /// The float model's metric.
    pub float_metric: f64,
    /// The target: `float_metric - allowed_drop`.
    pub target: f64,
    /// The chosen model's metric.
    pub metric: f64,
    /// Whether the target was met (when it cannot be, the best model found is returned
    /// with every quantizable layer that helped kept in float).
    pub target_met: bool,
    /// Every configuration measured, in order; `steps.len()` is the number of convert +
    /// eval runs the search made.
    pub steps: Vec<SearchStep>,
}

impl<M> fmt::Display for MixedPrecisionResult<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "float {:.4}, target {:.4}: chose {} with {} layer(s) in float [{}] -> {:.4} ({}; {} runs)",
            self.float_metric,
            self.target,
            self.variant,
            self.float_layers.len(),
            self.float_layers.join(", "),
            self.metric,
            if self.target_met { "target met" } else { "target NOT met" },
            self.steps.len()
        )?;
        writeln!(
            f,
            "{:<26} {:<12} {:>10} {:>5}  float layers",
            "variant", "phase", "metric", "ok"
        )?;
        for s in &self.steps {
            writeln!(
                f,
                "{:<26} {:<12} {:>10.4} {:>5}  [{}]",
                s.variant,
                s.phase,
                s.metric,
                if s.meets_target { "yes" } else { "no" },
                s.float_layers.join(", ")
            )?;
        }
        Ok(())
    }
}

struct Candidate {
    variant: &'static str,
    float_layers: Vec<String>,
    metric: f64,
    met: bool,
}

/// Automatic mixed precision: finds the fewest layers to keep in float so that the int8
/// model's metric is at least `float_metric - options.allowed_drop`.
///
/// `metric` is as in [`super::sensitivity`]: it sees the outputs on the `eval` batches and
/// returns a number where higher is better. For each pre-processing variant (the model
/// as given; then, if enabled, [`equalize`]d with [`absorb_high_bias`]; bias-corrected
/// with [`correct_bias`]; both), the search:
///
/// 1. quantizes everything (`all int8`); if that meets the target, no layer is kept in
///    float;
/// 2. measures, for each quantizable layer, the metric with only that layer in float
///    (`sensitivity`), and ranks layers by it;
/// 3. greedily keeps layers in float in that order until the target is met (`greedy`);
/// 4. tries to put each float layer back to int8, most recently added first, keeping the
///    change whenever the target still holds (`prune`).
///
/// The variant with the fewest float layers wins (ties: the higher metric, then the
/// earlier variant); the search stops early once a variant needs none. With bias
/// correction, each run re-corrects the biases of exactly the layers it quantizes.
///
/// **Cost**, per variant, in `prepare` + `calibrate` + `convert` + evaluation runs (each
/// listed in [`MixedPrecisionResult::steps`]): `1` when all-int8 meets the target, else at
/// most `1 + L + L + k` for `L` quantizable layers and `k <= L` layers added greedily; so
/// at most `4 * (1 + 3L)` for all four variants. Greedy ranking plus pruning is a
/// heuristic: it is exact when layers' effects are independent (the case of one bad
/// layer among good ones), not in general.
///
/// # Errors
/// [`QuantError::EmptyCalibration`] for no calibration or evaluation data,
/// [`QuantError::NothingToQuantize`] if the model has no quantizable layer or nothing at
/// all would remain in int8, [`QuantError::UnsupportedConfig`] for a negative or NaN
/// `allowed_drop`; and the flow's own errors.
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2, ArrayD, IxDyn};
/// use ptq::analysis::{auto_mixed_precision, MixedPrecisionOptions};
/// use ptq::nn::{Layer, Linear, Sequential};
/// use ptq::qconfig::QConfig;
/// let fc = |s: f32| Linear::new(Array2::from_shape_fn((4, 4), |(o, i)| s * (o as f32 - i as f32)), Some(Array1::zeros(4)));
/// let model = Sequential::new()
///     .push("fc1", Layer::LinearReLU(fc(0.5)?))
///     .push("fc2", Layer::Linear(fc(1.0)?));
/// let data = vec![ArrayD::from_shape_fn(IxDyn(&[16, 4]), |i| (i[0] as f32 * 0.3 + i[1] as f32).sin())];
/// let reference = model.forward(&data[0])?;
/// let metric = |outs: &[ArrayD<f32>]| -> f64 {
///     // Negated mean squared error against the float outputs (higher is better).
///     -(&reference - &outs[0]).mapv(|d| (d * d) as f64).mean().unwrap_or(0.0)
/// };
/// let options = MixedPrecisionOptions { allowed_drop: 1.0, ..Default::default() };
/// let found = auto_mixed_precision(&model, QConfig::minmax_per_tensor(), &data, &data, metric, &options)?;
/// assert!(found.target_met && found.float_layers.is_empty());
/// println!("{found}");
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn auto_mixed_precision<M>(
    model: &Sequential,
    qconfig: QConfig,
    calibration: &[ArrayD<f32>],
    eval: &[ArrayD<f32>],
    mut metric: M,
    options: &MixedPrecisionOptions,
) -> Result<MixedPrecisionResult>
where
    M: FnMut(&[ArrayD<f32>]) -> f64,
{
    check_data(calibration, eval)?;
    let graph = lower_for(model, &calibration[0])?;
    let subject = sequential_subject(model, &graph);
    let found = search(&subject, qconfig, calibration, eval, &mut metric, options)?;
    Ok(MixedPrecisionResult {
        model: QuantizedModel::from_graph(found.model)?,
        float_layers: found.float_layers,
        variant: found.variant,
        float_metric: found.float_metric,
        target: found.target,
        metric: found.metric,
        target_met: found.target_met,
        steps: found.steps,
    })
}

/// [`auto_mixed_precision`] over a [`Subject`]'s candidates.
pub(crate) fn search<B: GraphBatch, M>(
    model: &Subject<'_>,
    qconfig: QConfig,
    calibration: &[B],
    eval: &[B],
    metric: &mut M,
    options: &MixedPrecisionOptions,
) -> Result<MixedPrecisionResult<QuantizedGraph>>
where
    M: FnMut(&[ArrayD<f32>]) -> f64,
{
    check_data(calibration, eval)?;
    if options.allowed_drop.is_nan() || options.allowed_drop < 0.0 {
        return Err(QuantError::UnsupportedConfig {
            context: "auto_mixed_precision".into(),
            reason: format!("allowed_drop {} must be 0 or more", options.allowed_drop),
        });
    }
    let layers: Vec<String> = model.candidates.iter().map(|(p, _)| p.clone()).collect();
    if layers.is_empty() {
        return Err(QuantError::NothingToQuantize {
            reason: model.no_candidates.into(),
        });
    }
    let float_metric = eval_float(model.graph, eval, metric)?;
    let target = float_metric - options.allowed_drop;

    let mut variants: Vec<(&'static str, Graph, bool)> =
        vec![("plain", model.graph.clone(), false)];
    let equalized = if options.try_equalization {
        let (eq, _) = super::graph::equalize(model.graph, options.equalization_sweeps.max(1))?;
        let (eq, _) = super::graph::absorb_high_bias(&eq, calibration)?;
        variants.push(("equalized", eq.clone(), false));
        Some(eq)
    } else {
        None
    };
    if options.try_bias_correction {
        variants.push(("bias-corrected", model.graph.clone(), true));
        if let Some(eq) = equalized {
            variants.push(("equalized+bias-corrected", eq, true));
        }
    }

    let mut steps = Vec::new();
    let mut best: Option<Candidate> = None;
    for (variant, base, bias) in &variants {
        let mut measure =
            |float: &[String], phase: &'static str, steps: &mut Vec<SearchStep>| -> Result<f64> {
                let map = map_for(model, qconfig, float);
                let m = build(base, &map, calibration, *bias)?;
                let value = match m {
                    Some(m) => eval_int8(&m, eval, metric)?,
                    None => float_metric,
                };
                steps.push(SearchStep {
                    variant,
                    phase,
                    float_layers: float.to_vec(),
                    metric: value,
                    meets_target: value >= target,
                });
                Ok(value)
            };
        let all = measure(&[], "all int8", &mut steps)?;
        let cand = if all >= target {
            Candidate {
                variant,
                float_layers: Vec::new(),
                metric: all,
                met: true,
            }
        } else {
            // Rank by the metric with only that layer in float.
            let mut ranked = Vec::new();
            for l in &layers {
                let v = measure(std::slice::from_ref(l), "sensitivity", &mut steps)?;
                ranked.push((l.clone(), v));
            }
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut float: Vec<String> = Vec::new();
            let mut value = all;
            let mut met = false;
            for (l, single) in &ranked {
                float.push(l.clone());
                value = if float.len() == 1 {
                    *single
                } else {
                    measure(&float, "greedy", &mut steps)?
                };
                if value >= target {
                    met = true;
                    break;
                }
            }
            if met {
                let mut i = float.len();
                while i > 0 {
                    i -= 1;
                    if float.len() == 1 {
                        break; // all-int8 was already measured and fails
                    }
                    let mut trial = float.clone();
                    trial.remove(i);
                    let v = measure(&trial, "prune", &mut steps)?;
                    if v >= target {
                        float = trial;
                        value = v;
                    }
                }
            }
            Candidate {
                variant,
                float_layers: float,
                metric: value,
                met,
            }
        };
        let better = match &best {
            None => true,
            Some(b) => {
                (cand.met && !b.met)
                    || (cand.met == b.met
                        && (cand.float_layers.len() < b.float_layers.len()
                            || (cand.float_layers.len() == b.float_layers.len()
                                && cand.metric > b.metric)))
            }
        };
        if better {
            best = Some(cand);
        }
        if best
            .as_ref()
            .is_some_and(|b| b.met && b.float_layers.is_empty())
        {
            break;
        }
    }
    let best = best.ok_or_else(|| QuantError::NothingToQuantize {
        reason: "no variant was searched".into(),
    })?;
    let (_, base, bias) = variants
        .iter()
        .find(|(v, _, _)| *v == best.variant)
        .ok_or_else(|| QuantError::NothingToQuantize {
            reason: "the chosen variant vanished".into(),
        })?;
    let mut float_layers = best.float_layers.clone();
    float_layers.sort_by_key(|p| layers.iter().position(|l| l == p));
    let model = build(
        base,
        &map_for(model, qconfig, &float_layers),
        calibration,
        *bias,
    )?
    .ok_or_else(|| QuantError::NothingToQuantize {
        reason: "every layer had to stay in float and the model has no QuantStub".into(),
    })?;
    Ok(MixedPrecisionResult {
        model,
        float_layers,
        variant: best.variant,
        float_metric,
        target,
        metric: best.metric,
        target_met: best.met,
        steps,
    })
}

fn map_for(model: &Subject<'_>, qconfig: QConfig, float: &[String]) -> QConfigMap {
    set_exact(model, QConfigMap::new(qconfig), float, None, Some(qconfig))
}

fn build<B: GraphBatch>(
    base: &Graph,
    map: &QConfigMap,
    calibration: &[B],
    bias: bool,
) -> Result<Option<QuantizedGraph>> {
    if bias {
        let (corrected, _) = super::graph::correct_bias(base, map, calibration)?;
        Subject::quantize(&corrected, map, calibration)
    } else {
        Subject::quantize(base, map, calibration)
    }
}
