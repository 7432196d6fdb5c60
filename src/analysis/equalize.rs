//! Steps before `prepare` that make a float model easier to quantize without changing
//! what it computes: cross-layer equalization ([`equalize`]) and empirical bias
//! correction ([`correct_bias`]).

use std::borrow::Borrow;
use std::fmt;

use ndarray::{ArrayD, Axis};

use super::weighted::{equalizing_scales, pair_block, DeltaLayer, Weighted, WeightedMut};
use crate::error::{QuantError, Result};
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
    /// `(first, second, reason)` for every adjacent pair that was left alone.
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

/// A pair found in the model: child indices and how `second`'s inputs map to channels.
struct Pair {
    a: usize,
    b: usize,
    /// Inputs of `second` per channel of `first` (1, or H*W through Flatten).
    block: usize,
}

fn is_weighted(l: &Layer) -> bool {
    Weighted::of_layer(l).is_some()
}

/// Output channels of a weighted layer.
fn out_channels(l: &Layer) -> usize {
    Weighted::of_layer(l).map_or(0, |w| w.out_channels())
}

/// Finds the equalizable pairs among the top-level children and explains the others.
fn find_pairs(model: &Sequential, skipped: &mut Vec<(String, String, String)>) -> Vec<Pair> {
    let ch = model.children();
    let mut pairs = Vec::new();
    for a in 0..ch.len() {
        if !is_weighted(&ch[a].1) {
            continue;
        }
        let mut flatten = false;
        let mut b = a + 1;
        let mut blocked = None;
        while b < ch.len() {
            match &ch[b].1 {
                l if is_weighted(l) => break,
                Layer::ReLU
                | Layer::Identity
                | Layer::Dropout
                | Layer::Pool2d(_)
                | Layer::AdaptiveAvgPool2d(_) => {}
                Layer::Flatten { start_dim: 1 } => flatten = true,
                other => {
                    blocked = Some(format!(
                        "{} between them does not commute with per-channel scaling",
                        other.type_name()
                    ));
                    break;
                }
            }
            b += 1;
        }
        if b >= ch.len() {
            continue;
        }
        if let Some(why) = blocked {
            // Report it only when a weighted layer follows at all.
            if let Some((nb, _)) = ch[b..].iter().find(|(_, l)| is_weighted(l)) {
                skipped.push((ch[a].0.clone(), nb.clone(), why));
            }
            continue;
        }
        let (Some(wa), Some(wb)) = (Weighted::of_layer(&ch[a].1), Weighted::of_layer(&ch[b].1))
        else {
            continue;
        };
        let block = match pair_block(wa, wb, flatten) {
            Ok(block) => block,
            Err(why) => {
                skipped.push((ch[a].0.clone(), ch[b].0.clone(), why));
                continue;
            }
        };
        pairs.push(Pair { a, b, block });
    }
    pairs
}

/// Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight
/// Equalization and Bias Correction", ICCV 2019).
///
/// For every pair `W1 -> (ReLU, max/avg pooling, Dropout, Identity, Flatten(1)) -> W2`
/// among the model's top-level children, with `W1`, `W2` a Conv2d / Linear (fused ReLU
/// variants included), output channel `i` of `W1` is divided by
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
/// `i` lives in group `i / (in / groups)`). Layers nested in `Sequential` or `Residual`
/// children are left alone, as is any pair with another layer between them (e.g. a
/// BatchNorm2d not fused yet, or ReLU6, whose clipping does not commute with scaling);
/// such pairs are listed in [`EqualizationReport::skipped`]. Run it after
/// [`fuse`](crate::nn::fuse). To equalize inside residual blocks, lower the model with
/// [`Graph::from_sequential`](crate::graph::Graph::from_sequential) and use
/// [`graph::equalize`](super::graph::equalize).
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
    if max_sweeps == 0 {
        return Err(QuantError::UnsupportedConfig {
            context: "equalize".into(),
            reason: "max_sweeps must be at least 1".into(),
        });
    }
    let mut out = model.clone();
    let mut report = EqualizationReport::default();
    let pairs: Vec<(usize, usize, usize)> = find_pairs(&out, &mut report.skipped)
        .into_iter()
        .map(|p| (p.a, p.b, p.block))
        .collect();
    equalize_pairs(&mut out, &pairs, max_sweeps, &mut report);
    Ok((out, report))
}

/// Where the weighted layers of a model are, by index (a `Sequential`'s child index, a
/// graph's node index), so one equalization loop serves both.
pub(crate) trait WeightedAt {
    /// The name and weighted layer at `i` (`None` if it has no weights).
    fn weighted(&self, i: usize) -> Option<(&str, Weighted<'_>)>;
    /// The weighted layer at `i`, mutably.
    fn weighted_mut(&mut self, i: usize) -> Option<WeightedMut<'_>>;
}

impl WeightedAt for Sequential {
    fn weighted(&self, i: usize) -> Option<(&str, Weighted<'_>)> {
        let (name, l) = self.children().get(i)?;
        Weighted::of_layer(l).map(|w| (name.as_str(), w))
    }
    fn weighted_mut(&mut self, i: usize) -> Option<WeightedMut<'_>> {
        WeightedMut::of_layer(&mut self.children_mut().get_mut(i)?.1)
    }
}

/// Equalizes `pairs` `(first, second, block)` of `model` in place: up to `max_sweeps`
/// sweeps over all pairs (in order), stopping once no scale moves more than `1e-4`;
/// appends one [`EqualizedPair`] per pair to `report` and sets its sweep count.
pub(crate) fn equalize_pairs<M: WeightedAt>(
    model: &mut M,
    pairs: &[(usize, usize, usize)],
    max_sweeps: usize,
    report: &mut EqualizationReport,
) {
    let ranges = |m: &M, a: usize, b: usize, block: usize| -> Option<(Vec<f32>, Vec<f32>)> {
        let (_, wa) = m.weighted(a)?;
        let (_, wb) = m.weighted(b)?;
        Some((wa.out_ranges(), wb.in_ranges(wa.out_channels(), block)))
    };
    let pairs: Vec<(usize, usize, usize)> = pairs
        .iter()
        .copied()
        .filter(|&(a, b, _)| model.weighted(a).is_some() && model.weighted(b).is_some())
        .collect();
    let first = report.pairs.len();
    let mut totals: Vec<Vec<f32>> = Vec::new();
    for &(a, b, block) in &pairs {
        let (Some((na, _)), Some((nb, _)), Some((r1, r2))) = (
            model.weighted(a),
            model.weighted(b),
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
            if let Some(mut w) = model.weighted_mut(a) {
                w.scale_out(&s);
            }
            if let Some(mut w) = model.weighted_mut(b) {
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
/// `E[(W_q - W) x]`, which biases every later layer. For every top-level Conv2d / Linear
/// (and fused variant) that `map` quantizes, this computes that shift on the batches
/// (running the layer with weights `W_q - W` and no bias on the float model's own inputs
/// to the layer, and averaging per output channel over the batch and all positions, so
/// padding is accounted for) and subtracts it from the bias (a missing bias is created).
/// `W_q` comes from the layer's weight observer, exactly as `convert` will compute it.
/// Apply it as the last step before `prepare`, after [`equalize`].
///
/// Layers nested in `Sequential` / `Residual` children are not corrected (on a graph,
/// [`graph::correct_bias`](super::graph::correct_bias) corrects every node).
///
/// # Errors
/// [`QuantError::EmptyCalibration`] for no batches; the model's forward errors and the
/// weight specs' errors, named with the layer.
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
    let mut out = model.clone();
    // Per child index: the delta layer (weights W_q - W, no bias) and the running sums.
    let mut deltas: Vec<Option<(DeltaLayer, Vec<f64>, f64)>> = Vec::new();
    for (name, layer) in out.children() {
        let (Some(qc), Some(w)) = (
            map.qconfig_for(name, layer.type_name()),
            Weighted::of_layer(layer),
        ) else {
            deltas.push(None);
            continue;
        };
        let d = w.weight_error(&qc, name)?;
        let c = d.out_channels();
        deltas.push(Some((d, vec![0.0; c], 0.0)));
    }
    let mut any = false;
    for batch in batches {
        any = true;
        let mut cur = batch.borrow().clone();
        for ((name, layer), d) in out.children().iter().zip(deltas.iter_mut()) {
            if let Some((dl, sums, count)) = d {
                *count += dl.accumulate(&cur, sums).map_err(|e| e.in_context(name))? as f64;
            }
            cur = layer.forward(&cur).map_err(|e| e.in_context(name))?;
        }
    }
    if !any {
        return Err(QuantError::EmptyCalibration {
            reason: "correct_bias needs at least one batch".into(),
        });
    }
    let mut report = Vec::new();
    for ((name, layer), d) in out.children_mut().iter_mut().zip(deltas) {
        let Some((_, sums, count)) = d else { continue };
        if count == 0.0 {
            continue;
        }
        let shift: Vec<f32> = sums.iter().map(|s| (s / count) as f32).collect();
        let Some(mut w) = WeightedMut::of_layer(layer) else {
            continue;
        };
        for (b, s) in w.bias_or_zeros().iter_mut().zip(&shift) {
            *b -= s;
        }
        report.push(BiasCorrection {
            path: name.clone(),
            shift,
        });
    }
    Ok((out, report))
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

/// Whether a constant per-channel shift passes through a layer between the pair.
fn shift_commutes(l: &Layer) -> bool {
    match l {
        Layer::ReLU
        | Layer::Identity
        | Layer::Dropout
        | Layer::AdaptiveAvgPool2d(_)
        | Layer::Flatten { start_dim: 1 } => true,
        Layer::Pool2d(p) => matches!(p.kind, crate::nn::PoolKind::Max) || p.padding == (0, 0),
        _ => false,
    }
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
/// # Errors
/// [`QuantError::EmptyCalibration`] for no batches, and the model's forward errors.
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
    let mut out = model.clone();
    let mut skipped = Vec::new();
    let pairs: Vec<Pair> = find_pairs(&out, &mut skipped)
        .into_iter()
        .filter(|p| {
            let ch = out.children();
            let relu = matches!(ch[p.a].1, Layer::ConvReLU2d(_) | Layer::LinearReLU(_))
                || matches!(ch.get(p.a + 1), Some((_, Layer::ReLU)));
            let between = ch[p.a + 1..p.b].iter().all(|(_, l)| shift_commutes(l));
            let second = match &ch[p.b].1 {
                Layer::Conv2d(c) | Layer::ConvReLU2d(c) => c.padding == (0, 0),
                _ => true,
            };
            relu && between && second
        })
        .collect();
    // Per pair, the running per-channel minimum of the first layer's output.
    let mut mins: Vec<Vec<f32>> = pairs
        .iter()
        .map(|p| vec![f32::INFINITY; out_channels(&out.children()[p.a].1)])
        .collect();
    let mut any = false;
    for batch in batches {
        any = true;
        let mut cur = batch.borrow().clone();
        for (idx, (name, layer)) in out.children().iter().enumerate() {
            cur = layer.forward(&cur).map_err(|e| e.in_context(name))?;
            for (k, p) in pairs.iter().enumerate() {
                if p.a == idx {
                    let axis = if cur.ndim() == 4 { 1 } else { cur.ndim() - 1 };
                    for (c, lane) in cur.axis_iter(Axis(axis)).enumerate() {
                        let m = lane.iter().copied().fold(f32::INFINITY, f32::min);
                        mins[k][c] = mins[k][c].min(m);
                    }
                }
            }
        }
    }
    if !any {
        return Err(QuantError::EmptyCalibration {
            reason: "absorb_high_bias needs at least one batch".into(),
        });
    }
    let mut report = Vec::new();
    for (p, m) in pairs.iter().zip(mins) {
        let c: Vec<f32> = m
            .iter()
            .map(|&v| if v.is_finite() { v.max(0.0) } else { 0.0 })
            .collect();
        let ch = out.children_mut();
        let (head, tail) = ch.split_at_mut(p.b);
        let first = &mut head[p.a].1;
        let second = &mut tail[0].1;
        let Some(mut w1) = WeightedMut::of_layer(first) else {
            continue;
        };
        let Some(b1) = w1.bias() else {
            continue;
        };
        b1.iter_mut().zip(&c).for_each(|(v, ci)| *v -= ci);
        // The second layer's bias takes W2 c.
        let Some(mut w2) = WeightedMut::of_layer(second) else {
            continue;
        };
        w2.absorb_input_shift(&c, p.block);
        report.push(AbsorbedBias {
            first: head[p.a].0.clone(),
            second: tail[0].0.clone(),
            absorbed: c,
        });
    }
    Ok((out, report))
}
