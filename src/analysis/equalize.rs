//! Steps before `prepare` that make a float model easier to quantize without changing
//! what it computes: cross-layer equalization ([`equalize`]) and empirical bias
//! correction ([`correct_bias`]).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;

use ndarray::ArrayD;

use super::graph::One;
use super::sensitivity::lower_for;
use super::weighted::{equalizing_scales, Weighted, WeightedMut};
use crate::error::{QuantError, Result};
use crate::graph::{Graph, Op};
use crate::nn::{Layer, Sequential};
use crate::qconfig::QConfigMap;

/// One equalized pair of layers `first -> (ReLU, pooling, Flatten) -> second`.
#[derive(Debug, Clone, PartialEq)]
pub struct EqualizedPair {
    /// Dotted path of the first layer (whose output channels are scaled down by `scales`).
    pub first: String,
    /// Dotted path of the second layer (whose matching inputs are scaled up).
    pub second: String,
    /// Per channel, the total factor `s_i` (product over all sweeps): `first`'s output
    /// channel `i` was divided by it and `second`'s input channel `i` multiplied by it.
    pub scales: Vec<f32>,
    /// Per channel, `max |w|` of `first`'s output channel before equalization.
    pub first_ranges_before: Vec<f32>,
    /// The same after equalization.
    pub first_ranges_after: Vec<f32>,
    /// Per channel, `max |w|` of `second`'s input channel before equalization.
    pub second_ranges_before: Vec<f32>,
    /// The same after equalization.
    pub second_ranges_after: Vec<f32>,
}

/// Ratio of the largest to the smallest non-zero range (1 = perfectly equal channels).
pub fn range_spread(ranges: &[f32]) -> f32 {
    let nz = ranges.iter().copied().filter(|r| *r > 0.0);
    let hi = nz.clone().fold(0.0f32, f32::max);
    let lo = nz.fold(f32::INFINITY, f32::min);
    if hi > 0.0 {
        hi / lo
    } else {
        1.0
    }
}

/// What [`equalize`] did: the pairs it equalized and the pairs it skipped, with why.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EqualizationReport {
    /// Equalized pairs, in model order.
    pub pairs: Vec<EqualizedPair>,
    /// `(first, node where the chain stopped, reason)` for every convolution / linear
    /// layer whose chain to the next one stopped at a layer that does not commute with
    /// per-channel scaling (ReLU6, an unfused batch norm, an add, ...) or at a fan-out.
    pub skipped: Vec<(String, String, String)>,
    /// Sweeps over the chain that were run.
    pub sweeps: usize,
}

impl fmt::Display for EqualizationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<22} {:>8} {:>12} {:>12} {:>14} {:>14} {:>14} {:>14}",
            "pair",
            "channels",
            "min scale",
            "max scale",
            "1st spread bef",
            "1st spread aft",
            "2nd spread bef",
            "2nd spread aft"
        )?;
        for p in &self.pairs {
            let mn = p.scales.iter().copied().fold(f32::INFINITY, f32::min);
            let mx = p.scales.iter().copied().fold(0.0f32, f32::max);
            writeln!(
                f,
                "{:<22} {:>8} {:>12.4e} {:>12.4e} {:>14.1} {:>14.1} {:>14.1} {:>14.1}",
                format!("{} -> {}", p.first, p.second),
                p.scales.len(),
                mn,
                mx,
                range_spread(&p.first_ranges_before),
                range_spread(&p.first_ranges_after),
                range_spread(&p.second_ranges_before),
                range_spread(&p.second_ranges_after),
            )?;
        }
        for (a, b, why) in &self.skipped {
            writeln!(f, "skipped {a} -> {b}: {why}")?;
        }
        writeln!(f, "({} sweeps)", self.sweeps)
    }
}

/// Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight
/// Equalization and Bias Correction", ICCV 2019).
///
/// For every chain `W1 -> (ReLU, max/avg pooling, Dropout, Identity, Flatten(1)) -> W2`
/// in the model, nested `Sequential` children and residual bodies included, with `W1`,
/// `W2` a Conv2d / Linear (fused ReLU variants included), output channel `i` of `W1` is divided by
/// `s_i = sqrt(r1_i * r2_i) / r2_i` and input channel `i` of `W2` multiplied by it, where
/// `r1_i` is `max |W1[i, ..]|` and `r2_i` is `max |W2[:, i, ..]|`. Afterwards both ranges
/// are `sqrt(r1_i * r2_i)`: per-tensor weight scales no longer starve the small channels.
/// Positive per-channel scales commute with ReLU and pooling, so the float function is
/// unchanged (up to float rounding). Through `Flatten`, channel `i` of a convolution owns
/// the contiguous block of `in_features / channels` Linear inputs. Chains (`conv1 ->
/// conv2 -> conv3`) are swept up to `max_sweeps` times, until no scale moves more than
/// `1e-4` relative. A channel whose range is 0 on either side keeps scale 1.
///
/// Grouped and depthwise convolutions are handled (a grouped second layer's input channel
/// `i` lives in group `i / (in / groups)`). A chain stops at any other layer between
/// them (e.g. a BatchNorm2d not fused yet, or ReLU6, whose clipping does not commute with
/// scaling) and at a residual block's input or add (its skip connection would see the
/// scales); those are listed in [`EqualizationReport::skipped`]. Run it after
/// [`fuse`](crate::nn::fuse).
///
/// The model is lowered into a graph (names preserved) and equalized by
/// [`graph::equalize`](super::graph::equalize); the new weights are written back into a
/// copy of the model by layer path.
///
/// # Errors
/// [`QuantError::UnsupportedConfig`] if `max_sweeps` is 0.
///
/// # Examples
/// ```
/// use ndarray::{array, Array1, ArrayD, IxDyn};
/// use ptq::analysis::equalize;
/// use ptq::nn::{Layer, Linear, Sequential};
/// // Output channel 1 of fc1 is 100x larger than channel 0; fc2 compensates.
/// let fc1 = Linear::new(array![[0.01f32, 0.02], [1.0, -2.0]], Some(Array1::zeros(2)))?;
/// let fc2 = Linear::new(array![[1.0f32, 0.01], [-1.0, 0.02]], None)?;
/// let model = Sequential::new()
///     .push("fc1", Layer::LinearReLU(fc1))
///     .push("fc2", Layer::Linear(fc2));
/// let (eq, report) = equalize(&model, 10)?;
/// let x = ArrayD::from_shape_fn(IxDyn(&[4, 2]), |i| i[0] as f32 - i[1] as f32 * 0.5);
/// let (a, b) = (model.forward(&x)?, eq.forward(&x)?);
/// assert!(a.iter().zip(b.iter()).all(|(u, v)| (u - v).abs() < 1e-5));
/// // Each channel now has the same range on both sides: sqrt(r1_i * r2_i).
/// let p = &report.pairs[0];
/// for (a, b) in p.first_ranges_after.iter().zip(&p.second_ranges_after) {
///     assert!((a / b - 1.0).abs() < 1e-4);
/// }
/// assert!(ptq::analysis::range_spread(&p.first_ranges_before) > 50.0);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn equalize(model: &Sequential, max_sweeps: usize) -> Result<(Sequential, EqualizationReport)> {
    let graph = Graph::structure_of_sequential(model)?;
    let (eq, report) = super::graph::equalize(&graph, max_sweeps)?;
    Ok((with_weights_of(model, &eq), report))
}

/// `model` with the weights and biases of every convolution / linear layer replaced by
/// those of the graph node of the same name (the transforms' results written back).
fn with_weights_of(model: &Sequential, graph: &Graph) -> Sequential {
    fn walk(seq: &mut Sequential, prefix: &str, ops: &HashMap<&str, &Op>) {
        for (name, layer) in seq.children_mut() {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            match (layer, ops.get(path.as_str())) {
                (Layer::Sequential(s) | Layer::Residual(s), _) => walk(s, &path, ops),
                (
                    Layer::Conv2d(c) | Layer::ConvReLU2d(c),
                    Some(Op::Conv2d(g) | Op::ConvReLU2d(g)),
                ) => *c = g.clone(),
                (
                    Layer::Linear(l) | Layer::LinearReLU(l),
                    Some(Op::Linear(g) | Op::LinearReLU(g)),
                ) => *l = g.clone(),
                _ => {}
            }
        }
    }
    let ops: HashMap<&str, &Op> = graph
        .nodes()
        .iter()
        .map(|n| (n.name.as_str(), &n.op))
        .collect();
    let mut out = model.clone();
    walk(&mut out, "", &ops);
    out
}

/// The name and weighted layer of node `i` (`None` if it has no weights).
pub(crate) fn weighted(graph: &Graph, i: usize) -> Option<(&str, Weighted<'_>)> {
    let n = graph.nodes().get(i)?;
    Weighted::of_op(&n.op).map(|w| (n.name.as_str(), w))
}

/// The weighted layer of node `i`, mutably.
pub(crate) fn weighted_mut(graph: &mut Graph, i: usize) -> Option<WeightedMut<'_>> {
    WeightedMut::of_op(&mut graph.nodes_mut().get_mut(i)?.op)
}

/// Equalizes `pairs` `(first, second, block)` of `model` in place: up to `max_sweeps`
/// sweeps over all pairs (in order), stopping once no scale moves more than `1e-4`;
/// appends one [`EqualizedPair`] per pair to `report` and sets its sweep count.
pub(crate) fn equalize_pairs(
    model: &mut Graph,
    pairs: &[(usize, usize, usize)],
    max_sweeps: usize,
    report: &mut EqualizationReport,
) {
    let ranges = |m: &Graph, a: usize, b: usize, block: usize| -> Option<(Vec<f32>, Vec<f32>)> {
        let (_, wa) = weighted(m, a)?;
        let (_, wb) = weighted(m, b)?;
        Some((wa.out_ranges(), wb.in_ranges(wa.out_channels(), block)))
    };
    let pairs: Vec<(usize, usize, usize)> = pairs
        .iter()
        .copied()
        .filter(|&(a, b, _)| weighted(model, a).is_some() && weighted(model, b).is_some())
        .collect();
    let first = report.pairs.len();
    let mut totals: Vec<Vec<f32>> = Vec::new();
    for &(a, b, block) in &pairs {
        let (Some((na, _)), Some((nb, _)), Some((r1, r2))) = (
            weighted(model, a),
            weighted(model, b),
            ranges(model, a, b, block),
        ) else {
            continue;
        };
        totals.push(vec![1.0; r1.len()]);
        report.pairs.push(EqualizedPair {
            first: na.to_string(),
            second: nb.to_string(),
            scales: Vec::new(),
            first_ranges_before: r1,
            first_ranges_after: Vec::new(),
            second_ranges_before: r2,
            second_ranges_after: Vec::new(),
        });
    }
    for sweep in 0..max_sweeps {
        report.sweeps = sweep + 1;
        let mut moved = 0.0f32;
        for (k, &(a, b, block)) in pairs.iter().enumerate() {
            let Some((r1, r2)) = ranges(model, a, b, block) else {
                continue;
            };
            let s = equalizing_scales(&r1, &r2);
            for (t, &si) in totals[k].iter_mut().zip(&s) {
                *t *= si;
                moved = moved.max((si - 1.0).abs());
            }
            if let Some(mut w) = weighted_mut(model, a) {
                w.scale_out(&s);
            }
            if let Some(mut w) = weighted_mut(model, b) {
                w.scale_in(&s, block);
            }
        }
        if moved < 1e-4 {
            break;
        }
    }
    for ((&(a, b, block), rep), t) in pairs
        .iter()
        .zip(report.pairs[first..].iter_mut())
        .zip(totals)
    {
        rep.scales = t;
        if let Some((r1, r2)) = ranges(model, a, b, block) {
            rep.first_ranges_after = r1;
            rep.second_ranges_after = r2;
        }
    }
}

/// One layer's bias correction.
#[derive(Debug, Clone, PartialEq)]
pub struct BiasCorrection {
    /// Dotted path.
    pub path: String,
    /// Per output channel, the mean output shift `E[(W_q - W) x]` that was subtracted
    /// from the bias.
    pub shift: Vec<f32>,
}

/// Empirical bias correction (Nagel et al. 2019, section 4.2, with the expectation taken
/// over calibration data instead of batch-norm statistics).
///
/// Quantizing a layer's weights to `W_q` shifts the mean of its output by
/// `E[(W_q - W) x]`, which biases every later layer. For every Conv2d / Linear
/// (and fused variant) that `map` quantizes, this computes that shift on the batches
/// (running the layer with weights `W_q - W` and no bias on the float model's own inputs
/// to the layer, and averaging per output channel over the batch and all positions, so
/// padding is accounted for) and subtracts it from the bias (a missing bias is created).
/// `W_q` comes from the layer's weight observer, exactly as `convert` will compute it.
/// Apply it as the last step before `prepare`, after [`equalize`].
///
/// Nested `Sequential` children and residual bodies are corrected too. The model is
/// lowered into a graph for inputs shaped like the first batch and corrected by
/// [`graph::correct_bias`](super::graph::correct_bias); the new biases are written back
/// into a copy of the model by layer path. Layers that `prepare` would keep in float
/// (an asymmetrically padded convolution, a Linear on more than two dimensions) are not
/// corrected.
///
/// # Errors
/// [`QuantError::EmptyCalibration`] for no batches; shape errors naming the layer when
/// the model does not take the first batch's shape (or a later batch differs from it);
/// the model's forward errors and the weight specs' errors, named with the layer.
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2, ArrayD, IxDyn};
/// use ptq::analysis::correct_bias;
/// use ptq::nn::{Layer, Linear, Sequential};
/// use ptq::qconfig::{QConfig, QConfigMap};
/// let w = Array2::from_shape_fn((4, 8), |(o, i)| ((o * 8 + i) as f32 * 0.37).sin());
/// let model = Sequential::new().push("fc", Layer::Linear(Linear::new(w, Some(Array1::zeros(4)))?));
/// let data = vec![ArrayD::from_elem(IxDyn(&[16, 8]), 1.0f32)];
/// let (corrected, shifts) = correct_bias(&model, &QConfigMap::new(QConfig::minmax_per_tensor()), &data)?;
/// assert_eq!(shifts[0].path, "fc");
/// assert!(corrected.get("fc").is_some());
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn correct_bias<I, B>(
    model: &Sequential,
    map: &QConfigMap,
    batches: I,
) -> Result<(Sequential, Vec<BiasCorrection>)>
where
    I: IntoIterator<Item = B>,
    B: Borrow<ArrayD<f32>>,
{
    let mut batches = batches.into_iter().peekable();
    let Some(first) = batches.peek() else {
        return Err(QuantError::EmptyCalibration {
            reason: "correct_bias needs at least one batch".into(),
        });
    };
    let graph = lower_for(model, first.borrow())?;
    let (corrected, report) = super::graph::correct_bias(&graph, map, batches.map(One))?;
    Ok((with_weights_of(model, &corrected), report))
}

/// One pair's high-bias absorption.
#[derive(Debug, Clone, PartialEq)]
pub struct AbsorbedBias {
    /// Dotted path of the layer whose bias was lowered.
    pub first: String,
    /// Dotted path of the layer whose bias took the difference.
    pub second: String,
    /// Per channel of `first`, the amount `c_i` moved (0 where nothing could move).
    pub absorbed: Vec<f32>,
}

/// High-bias absorption (Nagel et al. 2019, section 4.1), with the bound taken from data.
///
/// After [`equalize`], a channel scaled down keeps a large bias, which widens its
/// activation range. For every equalizable pair `W1 -> ReLU -> W2` (as in [`equalize`],
/// with a ReLU fused into `W1` or right after it, average pooling only without padding,
/// and a Linear or unpadded convolution as `W2`), let `c_i >= 0` be the smallest value of
/// `W1`'s output channel `i` over the calibration batches. Where the pre-activation never
/// drops below `c_i`, `ReLU(h - c_i) + c_i = ReLU(h)`, so `c_i` is subtracted from `W1`'s
/// bias and `W2 c` added to `W2`'s: the function is unchanged on every input whose
/// pre-activations stay above `c` (all of the calibration data), and the activation range
/// between the layers shrinks by `c`. (Nagel et al. bound `c` with batch-norm statistics,
/// `beta - 3 gamma`, which batch-norm folding has removed; the data give the bound here.)
///
/// Like [`equalize`], this runs on the lowered graph
/// ([`graph::absorb_high_bias`](super::graph::absorb_high_bias)), residual bodies
/// included, and writes the biases back by layer path.
///
/// # Errors
/// [`QuantError::EmptyCalibration`] for no batches; shape errors naming the layer when
/// the model does not take the first batch's shape (or a later batch differs from it);
/// the model's forward errors.
///
/// # Examples
/// ```
/// use ndarray::{array, ArrayD, IxDyn};
/// use ptq::analysis::absorb_high_bias;
/// use ptq::nn::{Layer, Linear, Sequential};
/// let fc1 = Linear::new(array![[1.0f32, 0.0], [0.0, 1.0]], Some(array![10.0f32, 0.0]))?;
/// let fc2 = Linear::new(array![[1.0f32, 1.0]], Some(array![0.0f32]))?;
/// let model = Sequential::new()
///     .push("fc1", Layer::LinearReLU(fc1))
///     .push("fc2", Layer::Linear(fc2));
/// let data = vec![ArrayD::from_shape_fn(IxDyn(&[8, 2]), |i| i[0] as f32 * 0.1)];
/// let (absorbed, report) = absorb_high_bias(&model, &data)?;
/// assert_eq!(report[0].absorbed[0], 10.0); // channel 0 never drops below 10
/// let (a, b) = (model.forward(&data[0])?, absorbed.forward(&data[0])?);
/// assert!(a.iter().zip(b.iter()).all(|(u, v)| (u - v).abs() < 1e-5));
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn absorb_high_bias<I, B>(
    model: &Sequential,
    batches: I,
) -> Result<(Sequential, Vec<AbsorbedBias>)>
where
    I: IntoIterator<Item = B>,
    B: Borrow<ArrayD<f32>>,
{
    let mut batches = batches.into_iter().peekable();
    let Some(first) = batches.peek() else {
        return Err(QuantError::EmptyCalibration {
            reason: "absorb_high_bias needs at least one batch".into(),
        });
    };
    let graph = lower_for(model, first.borrow())?;
    let (absorbed, report) = super::graph::absorb_high_bias(&graph, batches.map(One))?;
    Ok((with_weights_of(model, &absorbed), report))
}
