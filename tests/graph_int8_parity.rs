//! Int8 parity of the graph flow (prepare -> calibrate -> convert -> QuantizedGraph) with
//! PyTorch's eager-mode quantization (torch 2.15.0, fbgemm) of torchvision's quantizable
//! architectures at reduced width (tools/gen_torchvision_int8_fixtures.py on the models of
//! tools/gen_torchvision_fixtures.py).
//!
//! Two ways in:
//! * ResNet-18 built as PyTorch's *fused* model loading PyTorch's fused float weights
//!   (quantization isolated from fusion);
//! * the user's flow: `graph::zoo` builder, the torchvision `state_dict`
//!   (tests/fixtures/tv_<arch>.safetensors), `find_fusable` + `fuse`, then quantization
//!   (ResNet-18, MobileNetV2, MobileNetV3-Large, ShuffleNetV2).
//!
//! For each, three checks:
//! * with PyTorch's activation qparams (fixed observers) every int8 output of every
//!   quantized module, and every int8 weight, must be PyTorch's bit for bit;
//! * with our own MinMax observers the observed ranges are within a few ulps of PyTorch's
//!   (float summation order) and >= 99.9% of the int8 values are identical;
//! * with the fbgemm default (histogram observers) the fraction of identical int8 logits
//!   and the top-1 agreement are reported and bounded.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::Fixture;
use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use ptq::graph::{find_fusable, fuse, zoo, Dim, Graph, GraphBuilder, Op, Pool2dSpec};
use ptq::nn::{Conv2d, Linear};
use ptq::qconfig::{ObserverSpec, QConfig, QConfigMap};
use ptq::quant::{calibrate, convert, prepare, QuantizedGraph, Value};
use ptq::DType;

/// The calibration batches of the fixture script: 3 LCG batches [4, 3, 48, 48].
fn batches() -> Vec<ArrayD<f32>> {
    (100..103u64)
        .map(|seed| {
            let shape = [4, 3, 48, 48];
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
        })
        .collect()
}

/// The float model's state_dict and test input (tests/fixtures/tv_<arch>.safetensors).
fn torchvision(arch: &str) -> (BTreeMap<String, ArrayD<f32>>, ArrayD<f32>) {
    let path = format!(
        "{}/tests/fixtures/tv_{arch}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut sd = ptq::io::read_safetensors(path).unwrap();
    let x = sd.remove("__input__").unwrap();
    sd.remove("__output__");
    (sd, x)
}

/// The user's flow: zoo graph, torchvision weights, the fusions `find_fusable` proposes.
fn zoo_fused(arch: &str) -> Graph {
    let mut g = match arch {
        "resnet18" => zoo::resnet18(4, 10, (48, 48)),
        "mobilenet_v2" => zoo::mobilenet_v2(0.1, 10, (48, 48)),
        "mobilenet_v3_large" => zoo::mobilenet_v3_large(0.25, true, 10, (48, 48)),
        "shufflenet_v2" => zoo::shufflenet_v2([4, 8, 4], [8, 16, 32, 64, 128], 10, (48, 48)),
        other => panic!("{other}"),
    }
    .unwrap();
    let (sd, _) = torchvision(arch);
    g.load_state_dict(&sd, true).unwrap();
    let groups = find_fusable(&g);
    let refs: Vec<Vec<&str>> = groups
        .iter()
        .map(|grp| grp.iter().map(String::as_str).collect())
        .collect();
    let slices: Vec<&[&str]> = refs.iter().map(|v| v.as_slice()).collect();
    let fused = fuse(&g, &slices).unwrap();
    assert!(ptq::graph::unfused_batch_norms(&fused).is_empty(), "{arch}");
    fused
}

fn conv(fx: &Fixture, key: &str, stride: usize, pad: usize) -> Conv2d {
    let w: Array4<f32> = fx
        .f32(&format!("fused.{key}.weight"))
        .into_dimensionality()
        .unwrap();
    let b: Array1<f32> = fx
        .f32(&format!("fused.{key}.bias"))
        .into_dimensionality()
        .unwrap();
    Conv2d::new(w, Some(b))
        .unwrap()
        .with_stride(stride, stride)
        .with_padding(pad, pad)
}

/// torchvision's QuantizableResNet-18 as PyTorch's fused model, with PyTorch's fused
/// weights, names as PyTorch's modules.
fn resnet18_pytorch_fused(fx: &Fixture) -> Graph {
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 3.into(), 48.into(), 48.into()])
        .unwrap();
    let mut y = g.quant_stub("quant", x).unwrap();
    y = g
        .node("conv1", Op::ConvReLU2d(conv(fx, "conv1.0", 2, 3)), &[y])
        .unwrap();
    y = g
        .max_pool2d(
            "maxpool",
            y,
            Pool2dSpec::new(3, 3).with_stride(2, 2).with_padding(1, 1),
        )
        .unwrap();
    for layer in 1..=4 {
        for block in 0..2 {
            let p = format!("layer{layer}.{block}");
            let stride = if layer > 1 && block == 0 { 2 } else { 1 };
            let a = g
                .node(
                    &format!("{p}.conv1"),
                    Op::ConvReLU2d(conv(fx, &format!("{p}.conv1.0"), stride, 1)),
                    &[y],
                )
                .unwrap();
            let b = g
                .conv2d(
                    &format!("{p}.conv2"),
                    a,
                    conv(fx, &format!("{p}.conv2"), 1, 1),
                )
                .unwrap();
            let skip = if fx.has(&format!("fused.{p}.downsample.0.weight")) {
                g.conv2d(
                    &format!("{p}.downsample.0"),
                    y,
                    conv(fx, &format!("{p}.downsample.0"), stride, 0),
                )
                .unwrap()
            } else {
                y
            };
            y = g.add_relu(&format!("{p}.add_relu"), b, skip).unwrap();
        }
    }
    y = g.adaptive_avg_pool2d("avgpool", y, (1, 1)).unwrap();
    y = g.flatten("flatten", y, 1, -1).unwrap();
    let w: Array2<f32> = fx.f32("fused.fc.weight").into_dimensionality().unwrap();
    let b: Array1<f32> = fx.f32("fused.fc.bias").into_dimensionality().unwrap();
    y = g.linear("fc", y, Linear::new(w, Some(b)).unwrap()).unwrap();
    y = g.dequant_stub("dequant", y).unwrap();
    g.output(y).unwrap();
    g.build().unwrap()
}

/// Every int8 value our graph computes, by node name (logical NCHW order).
fn int8_outputs(q: &QuantizedGraph, x: &ArrayD<f32>) -> HashMap<String, ArrayD<i64>> {
    let mut out = HashMap::new();
    q.forward_with(std::slice::from_ref(x), &mut |name, v| {
        if let Value::Int8(a) = v {
            out.insert(name.to_string(), a.nchw().data().mapv(|b| b as i64));
        }
    })
    .unwrap();
    out
}

/// PyTorch's quantized module names (the fixture's metadata `{cfg}` =
/// `{"quantized_modules": [...]}`).
fn modules(fx: &Fixture, cfg: &str) -> Vec<String> {
    let m = &fx.meta[cfg];
    let list = m
        .split('[')
        .nth(1)
        .and_then(|r| r.split(']').next())
        .unwrap();
    list.split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .collect()
}

#[derive(Debug, Default)]
struct Diff {
    modules: usize,
    n: usize,
    eq: usize,
    one: usize,
    worst: i64,
    /// (module, differing values) for modules that differ
    where_: Vec<(String, usize)>,
}

/// Compares our int8 outputs with PyTorch's for every quantized module PyTorch recorded.
fn compare(fx: &Fixture, cfg: &str, ours: &HashMap<String, ArrayD<i64>>) -> Diff {
    let mut d = Diff::default();
    for name in modules(fx, cfg) {
        let theirs = fx.int(&format!("{cfg}.int.{name}"));
        let mine = ours
            .get(&name)
            .unwrap_or_else(|| panic!("{cfg}: no int8 output for PyTorch's module {name}"));
        assert_eq!(mine.shape(), theirs.shape(), "{cfg} {name}");
        let mut here = 0;
        for (a, b) in mine.iter().zip(theirs.iter()) {
            d.n += 1;
            let e = (a - b).abs();
            d.eq += (e == 0) as usize;
            d.one += (e == 1) as usize;
            here += (e != 0) as usize;
            d.worst = d.worst.max(e);
        }
        if here > 0 {
            d.where_.push((name, here));
        }
        d.modules += 1;
    }
    d
}

fn pytorch_qparams(fx: &Fixture, cfg: &str) -> Vec<(String, f32, i32)> {
    modules(fx, cfg)
        .into_iter()
        .map(|name| {
            let s = fx.f32(&format!("{cfg}.scale.{name}"))[[0]];
            let z = fx.int(&format!("{cfg}.zero_point.{name}"))[[0]] as i32;
            (name, s, z)
        })
        .collect()
}

/// With PyTorch's activation qparams: every int8 weight and every int8 output identical.
fn check_with_pytorch_qparams(arch: &str, graph: Graph) -> Diff {
    let fx = Fixture::load(&format!("tv_int8_{arch}.safetensors"));
    let base = QConfig::minmax_per_channel();
    let mut map = QConfigMap::new(base);
    let qps = pytorch_qparams(&fx, "minmax");
    for (name, s, z) in &qps {
        map = map.set_name(
            name,
            Some(QConfig {
                activation: ObserverSpec::fixed(*s, *z, DType::QUInt8),
                ..base
            }),
        );
    }
    let mut p = prepare(graph, &map).unwrap();
    calibrate(&mut p, batches()).unwrap();
    let q = convert(p).unwrap();
    let mut weights = 0;
    for (name, s, z) in &qps {
        let a = q
            .output_qparams(name)
            .unwrap_or_else(|e| panic!("{arch}: {e}"))
            .unwrap();
        assert_eq!((a.scale(), a.zero_point()), (*s, *z), "{arch} {name}");
        if let Some(wq) = fx.get_int(&format!("minmax.wq.{name}")) {
            let (w, _) = q.weight(name).unwrap().unwrap();
            assert_eq!(w.mapv(|v| v as i64), wq, "{arch} {name}: int8 weights");
            weights += 1;
        }
    }
    let (_, x) = torchvision(arch);
    let d = compare(&fx, "minmax", &int8_outputs(&q, &x));
    eprintln!(
        "{arch}, PyTorch's qparams: {} int8 weight tensors identical; {}/{} int8 values identical over {} modules",
        weights, d.eq, d.n, d.modules
    );
    assert!(weights > 0);
    d
}

/// With our own MinMax observers: ranges within a few ulps, >= 99.9% identical.
fn check_with_our_minmax(arch: &str, graph: Graph) -> Diff {
    let fx = Fixture::load(&format!("tv_int8_{arch}.safetensors"));
    let mut p = prepare(graph, &QConfigMap::new(QConfig::minmax_per_channel())).unwrap();
    let report = calibrate(&mut p, batches()).unwrap();
    assert_eq!((report.batches, report.samples), (3, 12));
    assert!(report.unfused_batch_norms.is_empty());
    let (mut exact, mut compared, mut worst_ulps) = (0, 0, 0);
    for r in &report.ranges {
        let Some(theirs) = fx.get_f32(&format!("minmax.range.{}", r.node)) else {
            continue;
        };
        let (lo, hi) = r.range.unwrap();
        let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        let (dl, dh) = (ulps(lo, theirs[[0]]), ulps(hi, theirs[[1]]));
        assert!(
            dl <= 256 && dh <= 256,
            "{arch} {}: ({lo}, {hi}) vs {theirs}",
            r.node
        );
        worst_ulps = worst_ulps.max(dl.max(dh));
        exact += (dl == 0 && dh == 0) as usize;
        compared += 1;
    }
    assert!(
        compared >= modules(&fx, "minmax").len() - 1,
        "{arch}: {compared} ranges"
    );
    let q = convert(p).unwrap();
    let (_, x) = torchvision(arch);
    let d = compare(&fx, "minmax", &int8_outputs(&q, &x));
    eprintln!(
        "{arch}, our MinMax observers: {exact}/{compared} ranges bit-identical (worst {worst_ulps} ulps); {}/{} int8 values identical ({:.4}%), {} off by one, largest difference {}; differing modules {:?}",
        d.eq,
        d.n,
        100.0 * d.eq as f64 / d.n as f64,
        d.one,
        d.worst,
        d.where_
    );
    assert!(d.eq as f64 >= 0.999 * d.n as f64, "{arch}");
    d
}

/// With the fbgemm default: fraction of identical int8 logits and top-1 agreement.
/// The fbgemm default (histogram observers) depends on every float value seen in
/// calibration, and our float convs sum in another order than PyTorch's (the direct f32
/// depthwise kernel, FMA): observed ranges move by ulps and a logit may move by one step.
/// What must hold is top-1 agreement on every row and no logit more than one step away;
/// the fraction identical is reported.
fn check_fbgemm(arch: &str, graph: Graph) -> (f64, usize, usize) {
    let fx = Fixture::load(&format!("tv_int8_{arch}.safetensors"));
    let mut p = prepare(graph, &QConfigMap::new(QConfig::fbgemm())).unwrap();
    calibrate(&mut p, batches()).unwrap();
    let q = convert(p).unwrap();
    let (_, x) = torchvision(arch);
    let ours = &q.forward(std::slice::from_ref(&x)).unwrap()[0];
    let theirs = fx.f32("fbgemm.logits");
    let d = compare(&fx, "fbgemm", &int8_outputs(&q, &x));
    let argmax = |a: ndarray::ArrayViewD<f32>| {
        a.iter()
            .enumerate()
            .fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
            .0
    };
    let rows = ours.shape()[0];
    let top1 = (0..rows)
        .filter(|&i| {
            argmax(ours.index_axis(ndarray::Axis(0), i))
                == argmax(theirs.index_axis(ndarray::Axis(0), i))
        })
        .count();
    let frac = d.eq as f64 / d.n as f64;
    eprintln!(
        "{arch}, fbgemm default: {}/{} int8 logits identical ({:.2}%), largest difference {}; top-1 agreement {top1}/{rows}",
        d.eq,
        d.n,
        100.0 * frac,
        d.worst
    );
    assert!(
        d.worst <= 1,
        "{arch}: a logit {} steps from PyTorch's",
        d.worst
    );
    assert_eq!(top1, rows, "{arch}: top-1 disagrees with PyTorch");
    (frac, top1, rows)
}

#[test]
fn resnet18_pytorch_fused_weights() {
    let fx = Fixture::load("tv_int8_resnet18.safetensors");
    let d = check_with_pytorch_qparams("resnet18", resnet18_pytorch_fused(&fx));
    assert_eq!(
        d.modules, 30,
        "quant + 17 convs + 3 downsample convs + 8 adds + fc"
    );
    assert_eq!(d.eq, d.n, "{:?}", d.where_);
    let d = check_with_our_minmax("resnet18", resnet18_pytorch_fused(&fx));
    assert_eq!(d.eq + d.one, d.n);
    let (frac, _, _) = check_fbgemm("resnet18", resnet18_pytorch_fused(&fx));
    assert!(frac >= 0.5, "{frac}");
}

#[test]
fn resnet18_zoo_and_our_fusion() {
    let d = check_with_pytorch_qparams("resnet18", zoo_fused("resnet18"));
    assert_eq!(d.eq, d.n, "{:?}", d.where_);
    check_with_our_minmax("resnet18", zoo_fused("resnet18"));
    let (frac, _, _) = check_fbgemm("resnet18", zoo_fused("resnet18"));
    assert!(frac >= 0.5, "{frac}");
}

#[test]
fn mobilenet_v2_zoo_and_our_fusion() {
    let d = check_with_pytorch_qparams("mobilenet_v2", zoo_fused("mobilenet_v2"));
    assert_eq!(d.eq, d.n, "{:?}", d.where_);
    check_with_our_minmax("mobilenet_v2", zoo_fused("mobilenet_v2"));
    let (frac, _, _) = check_fbgemm("mobilenet_v2", zoo_fused("mobilenet_v2"));
    assert!(frac >= 0.5, "{frac}");
}

#[test]
fn mobilenet_v3_large_zoo_and_our_fusion() {
    let d = check_with_pytorch_qparams("mobilenet_v3_large", zoo_fused("mobilenet_v3_large"));
    assert_eq!(d.eq, d.n, "{:?}", d.where_);
    check_with_our_minmax("mobilenet_v3_large", zoo_fused("mobilenet_v3_large"));
    let (frac, _, _) = check_fbgemm("mobilenet_v3_large", zoo_fused("mobilenet_v3_large"));
    assert!(frac >= 0.5, "{frac}");
}

/// ShuffleNetV2 (concat, channel shuffle, chunk, `x.mean([2, 3])`): every module
/// bit-exact, the classifier included: PyTorch runs the mean on the quantized
/// (channels_last) tensor, keeping conv5's qparams, and so does ptq's int8 `Mean`.
#[test]
fn shufflenet_v2_zoo_and_our_fusion() {
    let d = check_with_pytorch_qparams("shufflenet_v2", zoo_fused("shufflenet_v2"));
    assert_eq!(d.modules, 74);
    assert_eq!(d.eq, d.n, "{:?}", d.where_);
    let mut p = prepare(
        zoo_fused("shufflenet_v2"),
        &QConfigMap::new(QConfig::minmax_per_channel()),
    )
    .unwrap();
    assert!(!p.float_nodes().contains(&"mean"), "{:?}", p.float_nodes());
    calibrate(&mut p, batches()).unwrap();
    let q = convert(p).unwrap();
    assert_eq!(q.nodes()[q.find("mean").unwrap()].op().kind(), "Mean");
    assert_eq!(
        q.output_qparams("mean").unwrap(),
        q.output_qparams("conv5.0").unwrap()
    );
    let d = check_with_our_minmax("shufflenet_v2", zoo_fused("shufflenet_v2"));
    assert!(d.where_.iter().all(|(m, _)| m == "fc"), "{:?}", d.where_);
    let (frac, _, _) = check_fbgemm("shufflenet_v2", zoo_fused("shufflenet_v2"));
    eprintln!("shufflenet_v2: fbgemm logits identical {frac:.3} (int8 mean)");
}

#[test]
fn resnet18_quantized_graph_saves_and_loads_bit_identically() {
    let mut p = prepare(
        zoo_fused("resnet18"),
        &QConfigMap::new(QConfig::minmax_per_channel()),
    )
    .unwrap();
    calibrate(&mut p, batches()).unwrap();
    let q = convert(p).unwrap();
    let path = std::env::temp_dir().join(format!("ptq_resnet18_{}.qmodel", std::process::id()));
    q.save(&path).unwrap();
    let r = QuantizedGraph::load(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let (_, x) = torchvision("resnet18");
    assert_eq!(
        r.forward(std::slice::from_ref(&x)).unwrap(),
        q.forward(std::slice::from_ref(&x)).unwrap()
    );
    let conv = r.weight("layer2.0.downsample.0").unwrap().unwrap();
    assert_eq!(conv.0.shape(), &[8, 4, 1, 1]);
}
