//! Int8 parity of the graph flow (prepare -> calibrate -> convert -> QuantizedGraph) with
//! PyTorch's eager-mode quantization (torch 2.15.0, fbgemm) of torchvision's quantizable
//! architectures at reduced width (tools/gen_torchvision_int8_fixtures.py).
//!
//! The graph is built as PyTorch's fused model (ConvReLU2d, Conv2d with folded BN, add_relu)
//! and loads PyTorch's fused float weights, so the comparison is about quantization alone.
//!
//! * With PyTorch's observed activation qparams (fixed observers), every int8 output of
//!   every quantized module must be PyTorch's, bit for bit.
//! * With our own MinMax observers, the observed ranges are within a few ulps of PyTorch's
//!   (float summation order), and int8 outputs are identical for >= 99.9% of the values.
//! * With the fbgemm default (histogram), the fraction of identical logits and the top-1
//!   agreement are reported and bounded.

mod common;

use std::collections::HashMap;

use common::Fixture;
use ndarray::{Array1, Array2, Array4, ArrayD};
use ptq::graph::{Dim, Graph, GraphBuilder, Pool2dSpec};
use ptq::nn::{Conv2d, Linear};
use ptq::qconfig::{ObserverSpec, QConfig, QConfigMap};
use ptq::quant::{calibrate, convert, prepare, QuantizedGraph, Value};
use ptq::DType;

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

/// torchvision's QuantizableResNet-18 after `fuse_model()`, names as PyTorch's modules.
fn resnet18_fused(fx: &Fixture) -> Graph {
    use ptq::graph::Op;
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 3.into(), 32.into(), 32.into()])
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

fn batches(fx: &Fixture) -> Vec<ArrayD<f32>> {
    (0..)
        .map_while(|i| fx.get_f32(&format!("calib.{i}")))
        .collect()
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

/// Compares our int8 outputs with PyTorch's for every quantized module; returns
/// (values compared, values equal, values off by one, largest difference).
fn compare(
    fx: &Fixture,
    cfg: &str,
    ours: &HashMap<String, ArrayD<i64>>,
) -> (usize, usize, usize, i64, Vec<String>) {
    let (mut n, mut eq, mut one, mut worst) = (0, 0, 0, 0);
    let mut seen = Vec::new();
    for name in modules(fx, cfg) {
        let theirs = fx.int(&format!("{cfg}.int.{name}"));
        let mine = ours
            .get(&name)
            .unwrap_or_else(|| panic!("{cfg}: no int8 output for PyTorch's module {name}"));
        assert_eq!(mine.shape(), theirs.shape(), "{cfg} {name}");
        for (a, b) in mine.iter().zip(theirs.iter()) {
            n += 1;
            let d = (a - b).abs();
            eq += (d == 0) as usize;
            one += (d == 1) as usize;
            worst = worst.max(d);
        }
        seen.push(name);
    }
    (n, eq, one, worst, seen)
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

#[test]
fn resnet18_with_pytorchs_qparams_is_bit_exact_everywhere() {
    let fx = Fixture::load("tv_int8_resnet18.safetensors");
    let base = QConfig::minmax_per_channel();
    let mut map = QConfigMap::new(base);
    let qps = pytorch_qparams(&fx, "minmax");
    assert_eq!(
        qps.len(),
        30,
        "quant + 17 convs + 3 downsample convs + 8 adds + fc"
    );
    for (name, s, z) in &qps {
        map = map.set_name(
            name,
            Some(QConfig {
                activation: ObserverSpec::fixed(*s, *z, DType::QUInt8),
                ..base
            }),
        );
    }
    let mut p = prepare(resnet18_fused(&fx), &map).unwrap();
    calibrate(&mut p, batches(&fx)).unwrap();
    let q = convert(p).unwrap();
    for (name, s, z) in &qps {
        let a = q.output_qparams(name).unwrap().unwrap();
        assert_eq!((a.scale(), a.zero_point()), (*s, *z), "{name}");
    }
    let x = fx.f32("test_x");
    let (n, eq, _, worst, modules) = compare(&fx, "minmax", &int8_outputs(&q, &x));
    assert_eq!(modules.len(), 30);
    assert_eq!(
        eq,
        n,
        "{} of {n} int8 values differ (largest by {worst})",
        n - eq
    );
    // and the float output is the dequantized int8 logits
    let y = q.forward(std::slice::from_ref(&x)).unwrap();
    common::assert_bits_eq(&y[0], &fx.f32("minmax.logits"), "logits");
    eprintln!(
        "resnet18, PyTorch's qparams: {eq}/{n} int8 values identical over {} modules",
        modules.len()
    );
}

#[test]
fn resnet18_with_our_minmax_observers_matches_pytorch() {
    let fx = Fixture::load("tv_int8_resnet18.safetensors");
    let mut p = prepare(
        resnet18_fused(&fx),
        &QConfigMap::new(QConfig::minmax_per_channel()),
    )
    .unwrap();
    let report = calibrate(&mut p, batches(&fx)).unwrap();
    assert_eq!((report.batches, report.samples), (3, 12));
    assert!(report.unfused_batch_norms.is_empty());
    // Observed ranges: within a few ulps of PyTorch's (float summation order differs).
    let mut exact = 0;
    for r in &report.ranges {
        let name = if r.node == "x" {
            "quant"
        } else {
            r.node.as_str()
        };
        let theirs = fx.f32(&format!("minmax.range.{name}"));
        let (lo, hi) = r.range.unwrap();
        let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        let (dl, dh) = (ulps(lo, theirs[[0]]), ulps(hi, theirs[[1]]));
        assert!(dl <= 64 && dh <= 64, "{name}: ({lo}, {hi}) vs {theirs}");
        exact += (dl == 0 && dh == 0) as usize;
    }
    let q = convert(p).unwrap();
    let x = fx.f32("test_x");
    let (n, eq, one, worst, _) = compare(&fx, "minmax", &int8_outputs(&q, &x));
    let frac = eq as f64 / n as f64;
    eprintln!(
        "resnet18, our MinMax observers: {exact}/{} ranges bit-identical; {eq}/{n} int8 values identical ({:.4}%), {one} off by one, largest difference {worst}",
        report.ranges.len(),
        100.0 * frac
    );
    assert!(frac >= 0.999, "{frac}");
    // every difference is one step of a scale that differs in its last bits
    assert_eq!(eq + one, n);
}

#[test]
fn resnet18_fbgemm_default_agrees_with_pytorch() {
    let fx = Fixture::load("tv_int8_resnet18.safetensors");
    let mut p = prepare(resnet18_fused(&fx), &QConfigMap::new(QConfig::fbgemm())).unwrap();
    calibrate(&mut p, batches(&fx)).unwrap();
    let q = convert(p).unwrap();
    let x = fx.f32("test_x");
    let ours = &q.forward(std::slice::from_ref(&x)).unwrap()[0];
    let theirs = fx.f32("fbgemm.logits");
    let (n, eq, _, worst, _) = compare(&fx, "fbgemm", &int8_outputs(&q, &x));
    let argmax = |a: ndarray::ArrayViewD<f32>| {
        a.iter()
            .enumerate()
            .fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
            .0
    };
    let top1 = (0..ours.shape()[0])
        .filter(|&i| {
            argmax(ours.index_axis(ndarray::Axis(0), i))
                == argmax(theirs.index_axis(ndarray::Axis(0), i))
        })
        .count();
    let frac = eq as f64 / n as f64;
    eprintln!(
        "resnet18, fbgemm default: {eq}/{n} int8 values identical ({:.3}%), largest difference {worst}; top-1 agreement {top1}/{}",
        100.0 * frac,
        ours.shape()[0]
    );
    assert!(frac >= 0.99, "{frac}");
}

#[test]
fn resnet18_quantized_graph_saves_and_loads_bit_identically() {
    let fx = Fixture::load("tv_int8_resnet18.safetensors");
    let mut p = prepare(
        resnet18_fused(&fx),
        &QConfigMap::new(QConfig::minmax_per_channel()),
    )
    .unwrap();
    calibrate(&mut p, batches(&fx)).unwrap();
    let q = convert(p).unwrap();
    let path = std::env::temp_dir().join(format!("ptq_resnet18_{}.qmodel", std::process::id()));
    q.save(&path).unwrap();
    let r = QuantizedGraph::load(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let x = fx.f32("test_x");
    assert_eq!(
        r.forward(std::slice::from_ref(&x)).unwrap(),
        q.forward(std::slice::from_ref(&x)).unwrap()
    );
    let conv = r.weight("layer2.0.downsample.0").unwrap().unwrap();
    assert_eq!(conv.0.shape(), &[8, 4, 1, 1]);
}
