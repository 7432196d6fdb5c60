//! The accuracy tools on graphs (`ptq::analysis::graph`), on torchvision's ResNet-18 and
//! MobileNetV2 from `graph::zoo` at reduced width with the weights of
//! tests/fixtures/tv_<arch>.safetensors (tools/gen_torchvision_fixtures.py), fused as
//! `find_fusable` proposes, on small inputs: equalization inside residual branches,
//! bias correction, sensitivity, automatic mixed precision and SQNR reports.

use std::collections::BTreeMap;

use ndarray::{ArrayD, Axis, IxDyn};
use ptq::analysis::graph as ga;
use ptq::analysis::{range_spread, sqnr, MixedPrecisionOptions};
use ptq::graph::{find_fusable, fuse, zoo, Dim, Graph, GraphBuilder, Op};
use ptq::qconfig::{QConfig, QConfigMap};
use ptq::quant::{calibrate, convert, prepare, QuantizedGraph};
use ptq::QuantError;

const HW: usize = 32;

fn lcg_batch(seed: u64, batch: usize) -> ArrayD<f32> {
    let shape = [batch, 3, HW, HW];
    let n: usize = shape.iter().product();
    let step = |s: u64| {
        s.wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
    };
    let mut s = step(seed);
    let v = (0..n)
        .map(|_| {
            s = step(s);
            ((s >> 40) as f32 / 16777216.0) * 2.0 - 1.0
        })
        .collect();
    ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap()
}

fn batches(n: u64) -> Vec<ArrayD<f32>> {
    (0..n).map(|i| lcg_batch(100 + i, 4)).collect()
}

/// The zoo graph with the fixture's torchvision weights, fused.
fn zoo_fused(arch: &str) -> Graph {
    let mut g = match arch {
        "resnet18" => zoo::resnet18(4, 10, (HW, HW)),
        "mobilenet_v2" => zoo::mobilenet_v2(0.1, 10, (HW, HW)),
        "mobilenet_v3_large" => zoo::mobilenet_v3_large(0.25, true, 10, (HW, HW)),
        "shufflenet_v2" => zoo::shufflenet_v2([4, 8, 4], [8, 16, 32, 64, 128], 10, (HW, HW)),
        other => panic!("{other}"),
    }
    .unwrap();
    let path = format!(
        "{}/tests/fixtures/tv_{arch}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut sd = ptq::io::read_safetensors(path).unwrap();
    sd.remove("__input__");
    sd.remove("__output__");
    g.load_state_dict(&sd, true).unwrap();
    let groups = find_fusable(&g);
    let refs: Vec<Vec<&str>> = groups
        .iter()
        .map(|grp| grp.iter().map(String::as_str).collect())
        .collect();
    let slices: Vec<&[&str]> = refs.iter().map(|v| v.as_slice()).collect();
    fuse(&g, &slices).unwrap()
}

/// Replaces parameters of `g` by name.
fn set(g: &mut Graph, params: Vec<(String, ArrayD<f32>)>) {
    let sd: BTreeMap<String, ArrayD<f32>> = params.into_iter().collect();
    g.load_state_dict(&sd, false).unwrap();
}

fn param(g: &Graph, key: &str) -> ArrayD<f32> {
    g.state_dict()
        .into_iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no parameter {key}"))
        .1
}

/// Scales output channel `c` of `first` (weights and bias) by `k` and input channel `c` of
/// `second` by `1 / k`: the float function is unchanged (ReLU between them is positively
/// homogeneous), the weight ranges are skewed.
fn skew(g: &mut Graph, first: &str, second: &str, c: usize, k: f32) {
    let mut w1 = param(g, &format!("{first}.weight"));
    w1.index_axis_mut(Axis(0), c).mapv_inplace(|v| v * k);
    let mut b1 = param(g, &format!("{first}.bias"));
    b1[[c]] *= k;
    let mut w2 = param(g, &format!("{second}.weight"));
    let groups_in = w2.shape()[1];
    if groups_in == 1 && w2.shape()[0] != 1 {
        // depthwise: input channel c is output channel c's only input
        w2.index_axis_mut(Axis(0), c).mapv_inplace(|v| v / k);
    } else {
        w2.index_axis_mut(Axis(1), c).mapv_inplace(|v| v / k);
    }
    set(
        g,
        vec![
            (format!("{first}.weight"), w1),
            (format!("{first}.bias"), b1),
            (format!("{second}.weight"), w2),
        ],
    );
}

fn max_abs(a: &ArrayD<f32>) -> f32 {
    a.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    a.iter()
        .zip(b.iter())
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn quantize(g: &Graph, map: &QConfigMap, data: &[ArrayD<f32>]) -> QuantizedGraph {
    let mut p = prepare(g.clone(), map).unwrap();
    calibrate(&mut p, data).unwrap();
    convert(p).unwrap()
}

fn out(g: &Graph, x: &ArrayD<f32>) -> ArrayD<f32> {
    g.forward(std::slice::from_ref(x)).unwrap().remove(0)
}

#[test]
fn equalization_reaches_inside_basic_blocks_and_keeps_the_float_output() {
    let mut g = zoo_fused("resnet18");
    // A 40x skew between conv1 and conv2 of the first block of layer2 (a block with a
    // downsample branch) and of layer3's second block (identity skip).
    skew(&mut g, "layer2.0.conv1", "layer2.0.conv2", 0, 40.0);
    skew(&mut g, "layer3.1.conv1", "layer3.1.conv2", 3, 40.0);
    let x = lcg_batch(7, 2);
    let before = out(&g, &x);
    let (eq, report) = ga::equalize(&g, 30).unwrap();
    let after = out(&eq, &x);
    let rel = max_abs_diff(&before, &after) / max_abs(&before);
    println!("resnet18 equalized: float output moved by {rel:e} relative");
    assert!(rel < 1e-5, "float output moved by {rel} relative");

    // Exactly the body conv1 -> conv2 of every basic block is a pair.
    let mut pairs: Vec<(String, String)> = report
        .pairs
        .iter()
        .map(|p| (p.first.clone(), p.second.clone()))
        .collect();
    pairs.sort();
    let mut want = Vec::new();
    for l in 1..=4 {
        for b in 0..2 {
            want.push((format!("layer{l}.{b}.conv1"), format!("layer{l}.{b}.conv2")));
        }
    }
    want.sort();
    assert_eq!(pairs, want);
    // Never across the add or the skip's fan-out.
    let skipped = |first: &str| {
        report
            .skipped
            .iter()
            .find(|(a, _, _)| a == first)
            .unwrap_or_else(|| panic!("{first} not in {:?}", report.skipped))
            .clone()
    };
    let (_, at, why) = skipped("layer1.0.conv2");
    assert_eq!(at, "layer1.0.add_relu");
    assert!(why.contains("2 inputs"), "{why}");
    let (_, at, why) = skipped("conv1");
    assert_eq!(at, "maxpool");
    assert!(why.contains("readers"), "{why}");
    let (_, at, _) = skipped("layer2.0.downsample.0");
    assert_eq!(at, "layer2.0.add_relu");

    // The skewed pairs: the spread came from the skew, equalization removes it.
    for first in ["layer2.0.conv1", "layer3.1.conv1"] {
        let p = report.pairs.iter().find(|p| p.first == first).unwrap();
        let (b1, a1) = (
            range_spread(&p.first_ranges_before),
            range_spread(&p.first_ranges_after),
        );
        let (b2, a2) = (
            range_spread(&p.second_ranges_before),
            range_spread(&p.second_ranges_after),
        );
        assert!(b1 > 20.0 && a1 < b1 / 10.0, "{first}: {b1} -> {a1}");
        assert!(b2 > 20.0 && a2 < b2 / 10.0, "{first}: {b2} -> {a2}");
        for (r1, r2) in p.first_ranges_after.iter().zip(&p.second_ranges_after) {
            assert!((r1 / r2 - 1.0).abs() < 1e-3, "{first}: {r1} vs {r2}");
        }
    }
    // Every pair: the larger of the two spreads never grows.
    for p in &report.pairs {
        let before =
            range_spread(&p.first_ranges_before).max(range_spread(&p.second_ranges_before));
        let after = range_spread(&p.first_ranges_after).max(range_spread(&p.second_ranges_after));
        assert!(after <= before * 1.001, "{}: {before} -> {after}", p.first);
    }

    // And it pays off under a per-tensor weight config.
    let data = batches(2);
    let map = QConfigMap::new(QConfig::minmax_per_tensor());
    let reference: Vec<ArrayD<f32>> = data.iter().map(|x| out(&g, x)).collect();
    let db = |q: &QuantizedGraph| {
        let mut s = 0.0;
        for (x, r) in data.iter().zip(&reference) {
            s += sqnr(r, &q.forward(std::slice::from_ref(x)).unwrap()[0]).unwrap();
        }
        s / data.len() as f64
    };
    let (plain, equalized) = (
        db(&quantize(&g, &map, &data)),
        db(&quantize(&eq, &map, &data)),
    );
    println!("resnet18 per-tensor int8 SQNR: plain {plain:.2} dB, equalized {equalized:.2} dB");
    assert!(equalized > plain, "SQNR {plain} dB -> {equalized} dB");
}

#[test]
fn equalization_chains_through_inverted_residuals() {
    let mut g = zoo_fused("mobilenet_v2");
    // features.3 has a skip add (stride 1, 24 -> 24 at this width? see below); skew its
    // depthwise -> project pair.
    assert!(g.find("features.3.skip_add").is_some());
    skew(&mut g, "features.3.conv.1.0", "features.3.conv.2", 1, 30.0);
    let x = lcg_batch(8, 2);
    let before = out(&g, &x);
    let (eq, report) = ga::equalize(&g, 40).unwrap();
    let rel = max_abs_diff(&before, &out(&eq, &x)) / max_abs(&before);
    println!("mobilenet_v2 equalized: float output moved by {rel:e} relative");
    assert!(rel < 1e-5, "float output moved by {rel} relative");
    let has = |a: &str, b: &str| report.pairs.iter().any(|p| p.first == a && p.second == b);
    // expand -> depthwise -> project inside the residual branch of features.3
    assert!(
        has("features.3.conv.0.0", "features.3.conv.1.0"),
        "{report}"
    );
    assert!(has("features.3.conv.1.0", "features.3.conv.2"), "{report}");
    // the project conv feeds the add: never paired with the next block
    assert!(!report.pairs.iter().any(|p| p.first == "features.3.conv.2"));
    let (_, at, _) = report
        .skipped
        .iter()
        .find(|(a, _, _)| a == "features.3.conv.2")
        .unwrap();
    assert_eq!(at, "features.3.skip_add");
    // features.2's project output feeds both features.3's expand and the skip add
    let (_, at, why) = report
        .skipped
        .iter()
        .find(|(a, _, _)| a == "features.2.conv.2")
        .unwrap();
    assert_eq!(at, "features.2.conv.2");
    assert!(why.contains("readers"), "{why}");
    let p = report
        .pairs
        .iter()
        .find(|p| p.first == "features.3.conv.1.0")
        .unwrap();
    let (b, a) = (
        range_spread(&p.second_ranges_before),
        range_spread(&p.second_ranges_after),
    );
    assert!(b > 15.0 && a < b / 5.0, "{b} -> {a}");
    assert!(report.sweeps >= 2, "a chain needs more than one sweep");
}

/// Mean over output channels of |mean over batch and positions of (int8 - float)|.
fn mean_bias_error(q: &QuantizedGraph, float: &Graph, data: &[ArrayD<f32>]) -> f64 {
    let mut sums: Vec<f64> = Vec::new();
    let mut count = 0usize;
    for x in data {
        let r = out(float, x);
        let y = q.forward(std::slice::from_ref(x)).unwrap().remove(0);
        let d = &y - &r;
        sums.resize(d.shape()[1], 0.0);
        for (c, lane) in d.axis_iter(Axis(1)).enumerate() {
            sums[c] += lane.iter().map(|&v| v as f64).sum::<f64>();
        }
        count += d.shape()[0];
    }
    sums.iter().map(|s| (s / count as f64).abs()).sum::<f64>() / sums.len() as f64
}

#[test]
fn bias_correction_lowers_the_mean_output_error_of_resnet18() {
    let g = zoo_fused("resnet18");
    let data = batches(4);
    // Per-tensor weights with a coarse 4-bit range: the weight error shifts every output
    // channel's mean, which bias correction estimates and removes.
    let mut qc = QConfig::minmax_per_tensor();
    qc.weight = qc.weight.with_range(-8, 7);
    let map = QConfigMap::new(qc);
    let (corrected, shifts) = ga::correct_bias(&g, &map, &data).unwrap();
    // Every quantized conv / linear node is corrected, residual branches included.
    let names: Vec<&str> = shifts.iter().map(|s| s.path.as_str()).collect();
    for want in [
        "conv1",
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer2.0.downsample.0",
        "layer4.1.conv2",
        "fc",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    assert_eq!(names.len(), 21);
    assert!(shifts
        .iter()
        .all(|s| s.shift.iter().any(|v| *v != 0.0) && s.shift.iter().all(|v| v.is_finite())));
    let plain = mean_bias_error(&quantize(&g, &map, &data), &g, &data);
    let fixed = mean_bias_error(&quantize(&corrected, &map, &data), &g, &data);
    println!("mean per-channel output bias: plain {plain:.5}, corrected {fixed:.5}");
    assert!(fixed < 0.7 * plain, "mean output error {plain} -> {fixed}");
    // Held-out batches too.
    let held: Vec<ArrayD<f32>> = (0..3).map(|i| lcg_batch(500 + i, 4)).collect();
    let plain = mean_bias_error(&quantize(&g, &map, &data), &g, &held);
    let fixed = mean_bias_error(&quantize(&corrected, &map, &data), &g, &held);
    println!("held out: plain {plain:.5}, corrected {fixed:.5}");
    assert!(
        fixed < plain,
        "held-out mean output error {plain} -> {fixed}"
    );
}

/// ResNet-18 with one broken node inside a residual branch: output channel 0 of
/// `layer2.0.conv1` (a ConvReLU2d after fusion) has weights of 200 and a bias of -1e6, so
/// it is always 0 after the ReLU (the float function is untouched), but under per-tensor
/// weight scales every other channel's weights round to zero.
fn broken_resnet() -> Graph {
    let mut g = zoo_fused("resnet18");
    let mut w = param(&g, "layer2.0.conv1.weight");
    w.index_axis_mut(Axis(0), 0).fill(200.0);
    let mut b = param(&g, "layer2.0.conv1.bias");
    b[[0]] = -1e6;
    set(
        &mut g,
        vec![
            ("layer2.0.conv1.weight".into(), w),
            ("layer2.0.conv1.bias".into(), b),
        ],
    );
    g
}

fn sqnr_metric(reference: &[ArrayD<f32>]) -> impl FnMut(&[ArrayD<f32>]) -> f64 + '_ {
    move |outs: &[ArrayD<f32>]| {
        let total: f64 = reference
            .iter()
            .zip(outs)
            .map(|(r, y)| sqnr(r, y).unwrap().min(60.0))
            .sum();
        total / outs.len() as f64
    }
}

#[test]
fn sensitivity_ranks_the_broken_node_in_a_residual_branch_first() {
    let g = broken_resnet();
    let data = batches(2);
    let reference: Vec<ArrayD<f32>> = data.iter().map(|x| out(&g, x)).collect();
    let qc = QConfig::minmax_per_tensor();
    let report = ga::sensitivity(&g, qc, &data, &data, sqnr_metric(&reference)).unwrap();
    println!("{report}");
    assert_eq!(report.float_metric, 60.0);
    assert_eq!(report.ranking()[0], "layer2.0.conv1");
    let row = report.get("layer2.0.conv1").unwrap();
    assert_eq!(row.layer, "ConvReLU2d");
    // Keeping it in float recovers a lot; quantizing it alone is the worst single node.
    assert!(
        row.only_float > report.int8_metric + 10.0,
        "{} vs all-int8 {}",
        row.only_float,
        report.int8_metric
    );
    let worst_alone = report
        .layers
        .iter()
        .min_by(|a, b| a.only_int8.total_cmp(&b.only_int8))
        .unwrap();
    assert_eq!(worst_alone.path, "layer2.0.conv1");
    // Every conv, the fc and the residual adds are candidates.
    assert_eq!(report.layers.len(), 20 + 1 + 8);
    assert!(report.get("layer3.1.add_relu").is_some());
    assert_eq!(report.evaluations, 1 + 2 * report.layers.len());
}

#[test]
fn auto_mixed_precision_keeps_exactly_the_broken_node_in_float() {
    let g = broken_resnet();
    let data = batches(2);
    let reference: Vec<ArrayD<f32>> = data.iter().map(|x| out(&g, x)).collect();
    let qc = QConfig::minmax_per_tensor();
    let options = MixedPrecisionOptions {
        allowed_drop: 40.0, // target: 20 dB SQNR against the float outputs
        try_equalization: false,
        try_bias_correction: false,
        ..Default::default()
    };
    let found =
        ga::auto_mixed_precision(&g, qc, &data, &data, sqnr_metric(&reference), &options).unwrap();
    println!("{found}");
    assert!(found.target_met);
    assert_eq!(found.float_layers, vec!["layer2.0.conv1".to_string()]);
    assert_eq!(found.target, 20.0);
    // The returned graph: that node in float (no int8 weight, float output), the rest int8.
    let m = &found.model;
    assert!(m.weight("layer2.0.conv1").unwrap().is_none());
    assert!(m.output_qparams("layer2.0.conv1").unwrap().is_none());
    assert!(m.weight("layer2.0.conv2").unwrap().is_some());
    assert!(m.output_qparams("layer2.0.add_relu").unwrap().is_some());
    let outs: Vec<ArrayD<f32>> = data
        .iter()
        .map(|x| m.forward(std::slice::from_ref(x)).unwrap().remove(0))
        .collect();
    let achieved = sqnr_metric(&reference)(&outs);
    assert!(achieved >= 20.0, "{achieved}");
    assert_eq!(achieved, found.metric);
    // All-int8 was measured first and failed.
    assert_eq!(found.steps[0].phase, "all int8");
    assert!(!found.steps[0].meets_target);

    // With equalization allowed, the equalized variant is searched too: equalizing the
    // broken conv1 against conv2 inside the residual branch lifts the all-int8 model by
    // more than 8 dB (from about 7 to about 19 dB), and keeping the node in float still
    // meets the target.
    let options = MixedPrecisionOptions {
        allowed_drop: 40.0,
        try_equalization: true,
        try_bias_correction: false,
        ..Default::default()
    };
    let found =
        ga::auto_mixed_precision(&g, qc, &data, &data, sqnr_metric(&reference), &options).unwrap();
    let all = |variant: &str| {
        found
            .steps
            .iter()
            .find(|s| s.variant == variant && s.phase == "all int8")
            .unwrap()
            .metric
    };
    assert!(
        all("equalized") > all("plain") + 8.0,
        "{} vs {}",
        all("equalized"),
        all("plain")
    );
    assert!(found.target_met);
    assert_eq!(found.float_layers, vec!["layer2.0.conv1".to_string()]);
}

#[test]
fn sqnr_reports_cover_every_int8_node_including_residual_adds() {
    for arch in ["resnet18", "mobilenet_v2"] {
        let g = zoo_fused(arch);
        let data = batches(2);
        let map = QConfigMap::new(QConfig::minmax_per_channel());
        let q = quantize(&g, &map, &data);
        let report = ga::activation_sqnr(&g, &q, &data).unwrap();
        let mut int8_nodes = 0;
        for n in q.nodes() {
            let int8 = q.output_qparams(n.name()).unwrap().is_some();
            let Some(id) = g.find(n.name()) else {
                continue; // a border the float graph does not have
            };
            let passes = matches!(
                g.node(id).op,
                Op::QuantStub | Op::DeQuantStub | Op::Identity | Op::Dropout
            );
            if !int8 || passes {
                continue;
            }
            int8_nodes += 1;
            let row = report
                .get(n.name())
                .unwrap_or_else(|| panic!("{arch}: no row for int8 node {}", n.name()));
            assert!(
                row.sqnr_db.is_finite() && row.sqnr_db > 8.0,
                "{arch} {}: {} dB",
                n.name(),
                row.sqnr_db
            );
            assert!(row.elements > 0);
        }
        let adds = report
            .layers
            .iter()
            .filter(|l| l.layer == "Add" || l.layer == "AddReLU")
            .count();
        match arch {
            "resnet18" => {
                assert_eq!(adds, 8);
                assert_eq!(report.get("layer1.0.add_relu").unwrap().layer, "AddReLU");
            }
            _ => {
                assert!(adds >= 5, "{adds}");
                assert_eq!(report.get("features.3.skip_add").unwrap().layer, "Add");
            }
        }
        assert!(int8_nodes >= 20, "{arch}: {int8_nodes}");
        // The error accumulates: the last conv is worse than the first.
        let first_conv = report
            .layers
            .iter()
            .find(|l| l.layer.starts_with("Conv"))
            .unwrap();
        let worst = report.worst().unwrap();
        assert!(worst.sqnr_db < first_conv.sqnr_db, "{arch}");
        assert!(report.to_string().lines().count() > int8_nodes);

        // Weight SQNR: exactly what convert stored.
        let w = ga::weight_sqnr(&g, &map).unwrap();
        assert_eq!(
            w.layers.len(),
            q.nodes()
                .iter()
                .filter(|n| q.weight(n.name()).unwrap().is_some())
                .count()
        );
        for row in &w.layers {
            let (wq, qp) = q.weight(&row.path).unwrap().unwrap();
            let node = g.node(g.find(&row.path).unwrap());
            let float = node.op.params()[0].1.clone();
            let scales = qp.scales();
            let deq = ArrayD::from_shape_fn(wq.raw_dim(), |i| {
                let s = if scales.len() == 1 {
                    scales[0]
                } else {
                    scales[i[0]]
                };
                wq[&i] as f32 * s
            });
            let want = sqnr(&float, &deq).unwrap();
            assert!(
                (row.sqnr_db - want).abs() < 1e-6 * want.abs().max(1.0),
                "{arch} {}: {} vs stored {want}",
                row.path,
                row.sqnr_db
            );
            assert!(row.worst_channel_sqnr_db.unwrap() <= row.sqnr_db + 1e-9);
        }
    }
}

#[test]
fn bad_input_is_refused_with_typed_errors() {
    let g = zoo_fused("resnet18");
    let data = batches(1);
    let metric = |_: &[ArrayD<f32>]| 0.0;
    assert!(matches!(
        ga::equalize(&g, 0),
        Err(QuantError::UnsupportedConfig { .. })
    ));
    assert!(matches!(
        ga::correct_bias(
            &g,
            &QConfigMap::new(QConfig::fbgemm()),
            Vec::<ArrayD<f32>>::new()
        ),
        Err(QuantError::EmptyCalibration { .. })
    ));
    assert!(matches!(
        ga::sensitivity(&g, QConfig::fbgemm(), &[], &data, metric),
        Err(QuantError::EmptyCalibration { .. })
    ));
    assert!(matches!(
        ga::absorb_high_bias(&g, Vec::<ArrayD<f32>>::new()),
        Err(QuantError::EmptyCalibration { .. })
    ));
    // a wrong input shape names the input node
    let err = ga::activation_sqnr(
        &g,
        &quantize(&g, &QConfigMap::new(QConfig::fbgemm()), &data),
        [ArrayD::<f32>::zeros(IxDyn(&[1, 3, 8, 8]))],
    )
    .unwrap_err();
    assert!(
        matches!(&err, QuantError::ShapeMismatch { context, .. } if context == "x"),
        "{err}"
    );
    // two inputs: the metric tools say so
    let mut b = GraphBuilder::new();
    let x = b.input("a", &[Dim::Batch, 4.into()]).unwrap();
    let y = b.input("b", &[Dim::Batch, 4.into()]).unwrap();
    let z = b.add("add", x, y).unwrap();
    b.output(z).unwrap();
    let two = b.build().unwrap();
    let e = ga::sensitivity(&two, QConfig::fbgemm(), &data, &data, metric).unwrap_err();
    assert!(e.to_string().contains("2 inputs"), "{e}");
    // nothing to quantize
    let mut b = GraphBuilder::new();
    let x = b.input("x", &[Dim::Batch, 4.into()]).unwrap();
    let y = b.node("relu", Op::ReLU, &[x]).unwrap();
    b.output(y).unwrap();
    let relu_only = b.build().unwrap();
    let d4 = vec![ArrayD::<f32>::zeros(IxDyn(&[2, 4]))];
    assert!(matches!(
        ga::sensitivity(&relu_only, QConfig::fbgemm(), &d4, &d4, metric),
        Err(QuantError::NothingToQuantize { .. })
    ));
}

/// Per-channel minimum of a node's output over the batches.
fn channel_min(g: &Graph, node: &str, data: &[ArrayD<f32>]) -> Vec<f32> {
    let mut mins: Vec<f32> = Vec::new();
    for x in data {
        g.forward_with(std::slice::from_ref(x), &mut |n, y| {
            if n.name == node {
                mins.resize(y.shape()[1], f32::INFINITY);
                for (c, lane) in y.axis_iter(Axis(1)).enumerate() {
                    mins[c] = lane.iter().copied().fold(mins[c], f32::min);
                }
            }
            Ok(())
        })
        .unwrap();
    }
    mins
}

#[test]
fn high_bias_absorption_moves_a_floor_across_an_inverted_residual() {
    let mut g = zoo_fused("mobilenet_v2");
    // Channel 2 of features.3's depthwise conv never drops below about 5.
    let dw = "features.3.conv.1.0";
    let mut b = param(&g, &format!("{dw}.bias"));
    b[[2]] += 5.0 + max_abs(&param(&g, &format!("{dw}.weight"))) * 9.0 * 20.0;
    set(&mut g, vec![(format!("{dw}.bias"), b)]);
    let data = batches(2);
    let floor = channel_min(&g, dw, &data)[2];
    assert!(floor > 4.0, "{floor}");
    let (absorbed, report) = ga::absorb_high_bias(&g, &data).unwrap();
    let row = report
        .iter()
        .find(|r| r.first == dw)
        .unwrap_or_else(|| panic!("{report:?}"));
    assert_eq!(row.second, "features.3.conv.2");
    assert_eq!(row.absorbed[2], floor);
    // The expand -> depthwise pair has a padded 3x3 second conv: nothing moves there.
    assert!(!report.iter().any(|r| r.first == "features.3.conv.0.0"));
    // The function is unchanged on the data; the channel's floor is now 0.
    for x in &data {
        let (a, b) = (out(&g, x), out(&absorbed, x));
        let rel = max_abs_diff(&a, &b) / max_abs(&a);
        assert!(rel < 1e-5, "{rel}");
    }
    let after = channel_min(&absorbed, dw, &data)[2];
    assert!(after.abs() < 1e-3 * floor, "{floor} -> {after}");
}

#[test]
fn equalization_keeps_squeeze_excite_and_shufflenet_graphs_float_exact() {
    for arch in ["mobilenet_v3_large", "shufflenet_v2"] {
        let g = zoo_fused(arch);
        let x = lcg_batch(9, 2);
        let before = out(&g, &x);
        let (eq, report) = ga::equalize(&g, 20).unwrap();
        let rel = max_abs_diff(&before, &out(&eq, &x)) / max_abs(&before);
        println!(
            "{arch}: {} pairs, float output moved by {rel:e} relative",
            report.pairs.len()
        );
        assert!(rel < 1e-5, "{arch}: {rel}");
        assert!(!report.pairs.is_empty(), "{arch}");
        for p in &report.pairs {
            for (a, b) in p.first_ranges_after.iter().zip(&p.second_ranges_after) {
                assert!(
                    a.is_finite() && b.is_finite() && *a >= 0.0,
                    "{arch} {}",
                    p.first
                );
            }
        }
        if arch == "mobilenet_v3_large" {
            // squeeze-excite: fc1 -> relu -> fc2 is a pair; Hardswish blocks the others
            assert!(
                report
                    .pairs
                    .iter()
                    .any(|p| p.first.ends_with(".fc1") && p.second.ends_with(".fc2")),
                "{report}"
            );
            assert!(report
                .skipped
                .iter()
                .any(|(_, _, why)| why.contains("Hardswish")));
        } else {
            // never across the concat of the two branches
            let (_, at, why) = report
                .skipped
                .iter()
                .find(|(a, _, _)| a == "stage2.0.branch2.5")
                .unwrap_or_else(|| panic!("{report}"));
            assert_eq!(at, "stage2.0.cat");
            assert!(why.contains("Concat"), "{why}");
            assert!(report
                .pairs
                .iter()
                .all(|p| !p.first.ends_with(".cat") && p.second != "stage2.1.branch2.0"));
        }
    }
}

/// A graph with two inputs and two outputs:
/// `a -> quant_a -> fc_a (LinearReLU) -> fc_a2 -> add <- fc_b (LinearReLU) <- quant_b <- b`,
/// `add -> fc_out1 -> dequant1` (output 0) and `fc_b -> fc_out2 -> dequant2` (output 1).
/// `fc_b`'s channel 0 is always 0 and `fc_out2` has a huge weight on it, so per-tensor
/// weights break `fc_out2` alone (its other weights round to 0).
fn two_in_two_out() -> Graph {
    use ndarray::{Array1, Array2};
    use ptq::nn::Linear;
    let mut seed = 5u64;
    let mut r = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / 16777216.0) * 2.0 - 1.0
    };
    let fc_a = Linear::new(
        Array2::from_shape_fn((8, 4), |_| r()),
        Some(Array1::from_shape_fn(8, |i| 2.0 + i as f32 * 0.5)),
    )
    .unwrap();
    let fc_a2 = Linear::new(
        Array2::from_shape_fn((8, 8), |(o, _)| r() * 10f32.powi(o as i32 % 3 - 1)),
        Some(Array1::from_shape_fn(8, |_| r())),
    )
    .unwrap();
    let mut wb = Array2::from_shape_fn((8, 6), |_| r());
    wb.row_mut(0).fill(0.0);
    let mut bb = Array1::from_shape_fn(8, |_| r().abs());
    bb[0] = 0.0;
    let fc_b = Linear::new(wb, Some(bb)).unwrap();
    let fc_out1 = Linear::new(Array2::from_shape_fn((3, 8), |_| r()), None).unwrap();
    let mut w2 = Array2::from_shape_fn((2, 8), |_| r());
    w2.column_mut(0).fill(1000.0);
    let fc_out2 = Linear::new(w2, Some(Array1::zeros(2))).unwrap();
    let mut g = GraphBuilder::new();
    let a = g.input("a", &[Dim::Batch, 4.into()]).unwrap();
    let b = g.input("b", &[Dim::Batch, 6.into()]).unwrap();
    let qa = g.quant_stub("quant_a", a).unwrap();
    let qb = g.quant_stub("quant_b", b).unwrap();
    let ya = g.node("fc_a", Op::LinearReLU(fc_a), &[qa]).unwrap();
    let ya = g.linear("fc_a2", ya, fc_a2).unwrap();
    let yb = g.node("fc_b", Op::LinearReLU(fc_b), &[qb]).unwrap();
    let s = g.add("add", ya, yb).unwrap();
    let o1 = g.linear("fc_out1", s, fc_out1).unwrap();
    let o1 = g.dequant_stub("dequant1", o1).unwrap();
    let o2 = g.linear("fc_out2", yb, fc_out2).unwrap();
    let o2 = g.dequant_stub("dequant2", o2).unwrap();
    g.output(o1).unwrap();
    g.output(o2).unwrap();
    g.build().unwrap()
}

/// Batches for [`two_in_two_out`]: one `[a, b]` pair each.
fn two_input_batches(n: u64, offset: u64) -> Vec<Vec<ArrayD<f32>>> {
    (0..n)
        .map(|i| {
            let k = (i + offset) as f32;
            vec![
                ArrayD::from_shape_fn(IxDyn(&[16, 4]), |j| {
                    ((j[0] * 4 + j[1]) as f32 * 0.37 + k).sin()
                }),
                ArrayD::from_shape_fn(IxDyn(&[16, 6]), |j| {
                    ((j[0] * 6 + j[1]) as f32 * 0.61 + 2.0 * k).cos()
                }),
            ]
        })
        .collect()
}

#[test]
fn the_tools_take_graphs_with_two_inputs_and_two_outputs() {
    let g = two_in_two_out();
    let calib = two_input_batches(4, 0);
    let eval = two_input_batches(2, 10);
    let map = QConfigMap::new(QConfig::minmax_per_tensor());
    let reference: Vec<ArrayD<f32>> = eval.iter().flat_map(|b| g.forward(b).unwrap()).collect();
    assert_eq!(reference.len(), 4);

    // activation_sqnr: a row per node, both outputs' last nodes included, each equal to
    // the SQNR of that graph output over all batches.
    let mut p = prepare(g.clone(), &map).unwrap();
    ptq::quant::calibrate_inputs(&mut p, calib.iter().cloned()).unwrap();
    let int8 = convert(p).unwrap();
    let report = ga::activation_sqnr(&g, &int8, &eval).unwrap();
    for (k, node) in ["fc_out1", "fc_out2"].iter().enumerate() {
        let (mut signal, mut noise) = (0.0f64, 0.0f64);
        for b in &eval {
            let (f, q) = (g.forward(b).unwrap(), int8.forward(b).unwrap());
            for (x, y) in f[k].iter().zip(q[k].iter()) {
                signal += (*x as f64).powi(2);
                noise += ((x - y) as f64).powi(2);
            }
        }
        let want = 10.0 * (signal / noise).log10();
        let row = report.get(node).unwrap();
        assert!(
            (row.sqnr_db - want).abs() < 1e-6,
            "{node}: {} vs {want}",
            row.sqnr_db
        );
    }
    assert!(report.get("add").is_some() && report.get("fc_b").is_some());
    // the broken layer is the worst row
    assert_eq!(report.worst().unwrap().path, "fc_out2", "{report}");

    // A batch without one tensor per input is refused, naming both counts.
    let err = ga::activation_sqnr(&g, &int8, [eval[0][0].clone()]).unwrap_err();
    assert!(
        matches!(&err, QuantError::ShapeMismatch { .. }) && err.to_string().contains("2 inputs"),
        "{err}"
    );

    // Equalization: fc_a -> fc_a2 (inside input a's branch); fc_b has two readers.
    let (eq, er) = ga::equalize(&g, 20).unwrap();
    assert_eq!(er.pairs.len(), 1);
    assert_eq!(
        (er.pairs[0].first.as_str(), er.pairs[0].second.as_str()),
        ("fc_a", "fc_a2")
    );
    assert!(er
        .skipped
        .iter()
        .any(|(a, at, _)| a == "fc_b" && at == "fc_b"));
    for b in &eval {
        for (x, y) in g.forward(b).unwrap().iter().zip(eq.forward(b).unwrap()) {
            assert!(max_abs_diff(x, &y) <= 1e-4 * (1.0 + max_abs(x)));
        }
    }

    // High-bias absorption reads input a's branch: fc_a's biases (>= 2) move into fc_a2.
    let (abs, ar) = ga::absorb_high_bias(&g, &calib).unwrap();
    assert_eq!(ar.len(), 1);
    assert!(
        ar[0].absorbed.iter().any(|&c| c > 0.5),
        "{:?}",
        ar[0].absorbed
    );
    for b in &calib {
        for (x, y) in g.forward(b).unwrap().iter().zip(abs.forward(b).unwrap()) {
            assert!(max_abs_diff(x, &y) <= 1e-4 * (1.0 + max_abs(x)));
        }
    }

    // Bias correction: fc_b's shift is E[(W_q - W) b] over input b of every batch.
    let (_, shifts) = ga::correct_bias(&g, &map, &calib).unwrap();
    let names: Vec<&str> = shifts.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(names, ["fc_a", "fc_a2", "fc_b", "fc_out1", "fc_out2"]);
    let w = param(&g, "fc_b.weight");
    let mut obs = QConfig::minmax_per_tensor().weight.build().unwrap();
    obs.observe(w.view()).unwrap();
    let wq = ptq::qparams::fake_quantize(&w, &obs.qparams().unwrap()).unwrap();
    let dw = (&wq - &w).into_dimensionality::<ndarray::Ix2>().unwrap();
    let mut want = vec![0.0f64; 8];
    let mut rows = 0.0;
    for b in &calib {
        let x = b[1].view().into_dimensionality::<ndarray::Ix2>().unwrap();
        let d = x.dot(&dw.t());
        for row in d.outer_iter() {
            for (w, v) in want.iter_mut().zip(row) {
                *w += *v as f64;
            }
            rows += 1.0;
        }
    }
    let fc_b = shifts.iter().find(|s| s.path == "fc_b").unwrap();
    for (got, w) in fc_b.shift.iter().zip(&want) {
        assert!(
            (*got as f64 - w / rows).abs() < 1e-5,
            "{got} vs {}",
            w / rows
        );
    }

    // Sensitivity and the search: the metric sees both outputs of every batch
    // (batch-major), here the lower of the two outputs' SQNR.
    let mut calls = 0;
    let metric = |outs: &[ArrayD<f32>]| {
        calls += 1;
        assert_eq!(outs.len(), reference.len());
        reference
            .iter()
            .zip(outs)
            .map(|(r, y)| sqnr(r, y).unwrap().min(60.0))
            .fold(f64::INFINITY, f64::min)
    };
    let sens = ga::sensitivity(&g, QConfig::minmax_per_tensor(), &calib, &eval, metric).unwrap();
    assert_eq!(calls, 2 + 2 * sens.layers.len());
    assert_eq!(sens.ranking()[0], "fc_out2", "{sens}");
    assert_eq!(sens.layers.len(), ga::quantizable_nodes(&g).len());
    let options = MixedPrecisionOptions {
        allowed_drop: 35.0,
        try_equalization: false,
        try_bias_correction: false,
        ..Default::default()
    };
    let metric = |outs: &[ArrayD<f32>]| {
        reference
            .iter()
            .zip(outs)
            .map(|(r, y)| sqnr(r, y).unwrap().min(60.0))
            .fold(f64::INFINITY, f64::min)
    };
    let found = ga::auto_mixed_precision(
        &g,
        QConfig::minmax_per_tensor(),
        &calib,
        &eval,
        metric,
        &options,
    )
    .unwrap();
    assert!(found.target_met, "{found}");
    assert_eq!(found.float_layers, ["fc_out2"], "{found}");
    assert_eq!(found.model.forward(&eval[0]).unwrap().len(), 2);
    println!("{report}\n{sens}\n{found}");
}
