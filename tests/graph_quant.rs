//! The graph quantization flow: per-node int8/float decisions, automatic borders, float
//! islands, errors naming nodes, calibration reports, save/load with float islands.

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use ptq::graph::{BatchNorm, Dim, Graph, GraphBuilder, OpKind};
use ptq::nn::{Conv2d, Linear};
use ptq::qconfig::{ObserverSpec, QConfig, QConfigMap};
use ptq::quant::{calibrate, convert, prepare, QuantizedGraph};
use ptq::{DType, QScheme, QuantError};

fn det(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ArrayD::from_shape_vec(
        IxDyn(shape),
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect(),
    )
    .unwrap()
}

fn conv(cin: usize, cout: usize, k: usize, seed: u64) -> Conv2d {
    let w: Array4<f32> = det(&[cout, cin, k, k], seed)
        .mapv(|v| v * 0.3)
        .into_dimensionality()
        .unwrap();
    Conv2d::new(w, Some(Array1::from(vec![0.05; cout])))
        .unwrap()
        .with_padding(k / 2, k / 2)
}

/// quant -> conv1 -> relu -> conv2 -> silu -> add(conv1-relu) -> bn -> pool -> flatten -> fc -> dequant
fn model(with_stub: bool) -> Graph {
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 3.into(), 8.into(), 8.into()])
        .unwrap();
    let mut y = if with_stub {
        g.quant_stub("quant", x).unwrap()
    } else {
        x
    };
    y = g.conv2d("conv1", y, conv(3, 4, 3, 1)).unwrap();
    let r = g.relu("relu", y).unwrap();
    let c2 = g.conv2d("conv2", r, conv(4, 4, 1, 2)).unwrap();
    let s = g.silu("sig", c2).unwrap();
    let a = g.add("add", s, r).unwrap();
    let mut bn = BatchNorm::identity(4);
    bn.running_mean = Array1::from(vec![0.1, 0.2, -0.1, 0.0]);
    let b = g.batch_norm2d("bn", a, bn).unwrap();
    let p = g.adaptive_avg_pool2d("pool", b, (1, 1)).unwrap();
    let f = g.flatten("flatten", p, 1, -1).unwrap();
    let w: Array2<f32> = det(&[5, 4], 3).into_dimensionality().unwrap();
    let fc = g.linear("fc", f, Linear::new(w, None).unwrap()).unwrap();
    let out = if with_stub {
        g.dequant_stub("dequant", fc).unwrap()
    } else {
        fc
    };
    g.output(out).unwrap();
    g.build().unwrap()
}

fn batches() -> Vec<ArrayD<f32>> {
    (0..4).map(|i| det(&[2, 3, 8, 8], 10 + i)).collect()
}

#[test]
fn float_islands_and_borders_are_planned_per_node() {
    let g = model(true);
    let float = g.forward(&[det(&[2, 3, 8, 8], 99)]).unwrap();
    let mut p = prepare(g, &QConfigMap::new(QConfig::minmax_per_channel())).unwrap();
    // SiLU has no int8 kernel: a float island. The unfused batch norm runs as PyTorch's
    // quantized BatchNorm2d, and is reported (it should have been fused).
    assert_eq!(p.float_nodes(), vec!["sig", "dequant"]);
    assert_eq!(p.unfused_batch_norms(), vec!["bn"]);
    let report = calibrate(&mut p, batches()).unwrap();
    assert_eq!((report.batches, report.samples), (4, 8));
    assert_eq!(report.unfused_batch_norms, vec!["bn".to_string()]);
    assert!(report
        .to_string()
        .contains("warning: 1 batch norm(s) not fused into a convolution"));
    // observers: quant stub, conv1, conv2, add, bn, fc, and the float producer feeding an
    // int8 consumer: sig (for the add); pool and flatten keep the bn's qparams
    let observed: Vec<&str> = report.ranges.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(
        observed,
        ["quant", "conv1", "conv2", "sig", "add", "bn", "fc"]
    );
    let q = convert(p).unwrap();
    let kinds: Vec<(&str, &str)> = q
        .nodes()
        .iter()
        .map(|n| (n.name(), n.op().kind()))
        .collect();
    for want in [
        ("conv2.dequantize", "Dequantize"),
        ("sig", "Float"),
        ("sig.quantize", "Quantize"),
        ("add", "Add"),
        ("bn", "BatchNorm2d"),
        ("pool", "AdaptiveAvgPool2d"),
        ("flatten", "Flatten"),
        ("fc", "Linear"),
        ("relu", "ReLU"),
    ] {
        assert!(kinds.contains(&want), "{want:?} not in {kinds:?}");
    }
    let y = q.forward(&[det(&[2, 3, 8, 8], 99)]).unwrap();
    let err = (&y[0] - &float[0])
        .mapv(f32::abs)
        .fold(0.0f32, |a, &b| a.max(b));
    assert!(err < 0.1, "int8 vs float: {err}");
    // profile: one entry per node
    assert_eq!(
        q.profile(&[det(&[1, 3, 8, 8], 5)]).unwrap().len(),
        q.nodes().len()
    );
}

#[test]
fn the_qconfig_map_keeps_nodes_in_float_by_name_and_by_kind() {
    let map = QConfigMap::new(QConfig::minmax_per_tensor())
        .set_name("conv2", None)
        .set_kind(OpKind::Linear, None);
    let mut p = prepare(model(true), &map).unwrap();
    let floats = p.float_nodes();
    assert!(
        floats.contains(&"conv2") && floats.contains(&"fc"),
        "{floats:?}"
    );
    calibrate(&mut p, batches()).unwrap();
    let q = convert(p).unwrap();
    assert_eq!(q.nodes()[q.find("fc").unwrap()].op().kind(), "Float");
    assert_eq!(q.weight("fc").unwrap(), None);
    assert!(q.weight("conv1").unwrap().is_some());
    assert!(q.forward(&[det(&[1, 3, 8, 8], 7)]).is_ok());
}

#[test]
fn per_channel_activations_are_refused_at_prepare_naming_the_node() {
    let bad = QConfig {
        activation: ObserverSpec::min_max(DType::QUInt8, QScheme::PerChannelAffine { axis: 1 }),
        ..QConfig::minmax_per_channel()
    };
    let map = QConfigMap::new(QConfig::minmax_per_channel()).set_name("conv2", Some(bad));
    let err = prepare(model(true), &map).unwrap_err();
    assert!(
        matches!(&err, QuantError::UnsupportedConfig { context, reason } if context == "conv2" && reason.contains("quint8 per-tensor")),
        "{err}"
    );
    let qint8_act = QConfig {
        activation: ObserverSpec::min_max(DType::QInt8, QScheme::PerTensorAffine),
        ..QConfig::minmax_per_channel()
    };
    let err = prepare(model(true), &QConfigMap::new(qint8_act)).unwrap_err();
    assert!(err.to_string().contains("quint8"), "{err}");
    assert!(matches!(
        prepare(model(true), &QConfigMap::empty()),
        Err(QuantError::NothingToQuantize { .. })
    ));
}

#[test]
fn convert_refuses_every_unobserved_node_by_name_and_calibrate_names_bad_batches() {
    let map = QConfigMap::new(QConfig::fbgemm());
    let err = convert(prepare(model(true), &map).unwrap()).unwrap_err();
    assert_eq!(
        err,
        QuantError::UncalibratedLayers {
            layers: ["quant", "conv1", "conv2", "sig", "add", "bn", "fc"]
                .map(String::from)
                .to_vec()
        }
    );
    let mut p = prepare(model(true), &map).unwrap();
    let mut bs = batches();
    bs[2][[1, 2, 3, 4]] = f32::NAN;
    let err = calibrate(&mut p, bs).unwrap_err();
    assert!(
        matches!(&err, QuantError::NonFinite { context, nan: 1, .. } if context == "calibration batch 2"),
        "{err}"
    );
    assert!(matches!(
        calibrate(&mut p, Vec::<ArrayD<f32>>::new()),
        Err(QuantError::EmptyCalibration { .. })
    ));
}

#[test]
fn a_graph_without_stubs_observes_its_input_and_can_end_in_int8() {
    let mut p = prepare(
        model(false),
        &QConfigMap::new(QConfig::minmax_per_channel()),
    )
    .unwrap();
    calibrate(&mut p, batches()).unwrap();
    let q = convert(p).unwrap();
    assert_eq!(q.nodes()[1].name(), "x.quantize");
    let out = q.forward_quantized(&[det(&[2, 3, 8, 8], 1)]).unwrap();
    let t = out[0].as_ref().expect("fc's int8 output");
    let qp = q.output_qparams("fc").unwrap().unwrap();
    assert_eq!((t.scale(), t.zero_point()), (qp.scale(), qp.zero_point()));
    assert_eq!(t.data().shape(), &[2, 5]);
    let f = q.forward(&[det(&[2, 3, 8, 8], 1)]).unwrap();
    assert_eq!(f[0], t.dequantize());
}

#[test]
fn graphs_with_float_islands_save_and_load_bit_identically() {
    let mut p = prepare(model(true), &QConfigMap::new(QConfig::fbgemm())).unwrap();
    calibrate(&mut p, batches()).unwrap();
    let q = convert(p).unwrap();
    let bytes = q.to_bytes().unwrap();
    let r = QuantizedGraph::from_bytes(&bytes).unwrap();
    let x = det(&[3, 3, 8, 8], 42);
    assert_eq!(
        r.forward(std::slice::from_ref(&x)).unwrap(),
        q.forward(std::slice::from_ref(&x)).unwrap()
    );
    assert_eq!(r.float_weight_bytes(), q.float_weight_bytes());
    assert_eq!(r.weight_bytes(), q.weight_bytes());
    // A float island whose record is damaged is refused, naming the node.
    let i = q.find("sig").unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let from = format!("\"{i}:op\":\"SiLU\"");
    assert!(header.contains(&from), "{header}");
    let h = header.replace(&from, &format!("\"{i}:op\":\"Teleport\""));
    let mut bad = (h.len() as u64).to_le_bytes().to_vec();
    bad.extend_from_slice(h.as_bytes());
    bad.extend_from_slice(&bytes[8 + n..]);
    let err = QuantizedGraph::from_bytes(&bad).unwrap_err();
    assert!(
        err.to_string().contains("(sig)") && err.to_string().contains("Teleport"),
        "{err}"
    );
    for cut in [10, bytes.len() / 2, bytes.len() - 1] {
        assert!(QuantizedGraph::from_bytes(&bytes[..cut]).is_err());
    }
}

#[test]
fn the_int8_graph_is_send_and_sync_and_serves_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<QuantizedGraph>();
    let mut p = prepare(model(true), &QConfigMap::new(QConfig::fbgemm())).unwrap();
    calibrate(&mut p, batches()).unwrap();
    let q = convert(p).unwrap();
    let x = det(&[2, 3, 8, 8], 3);
    let want = q.forward(std::slice::from_ref(&x)).unwrap();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| assert_eq!(q.forward(std::slice::from_ref(&x)).unwrap(), want));
        }
    });
}

/// Issue 9: a graph input read only by its quantize border is quantized straight from the
/// caller's tensor; the result equals the path that keeps the input (`forward_with`), and
/// NaN or infinity is still a typed error naming the input.
#[test]
fn input_quantized_at_the_border_matches_and_names_non_finite_input() {
    let mut p = prepare(model(true), &QConfigMap::new(QConfig::minmax_per_channel())).unwrap();
    calibrate(&mut p, batches()).unwrap();
    let q = convert(p).unwrap();
    let x = det(&[2, 3, 8, 8], 77);
    let fast = q.forward(std::slice::from_ref(&x)).unwrap();
    let mut seen = Vec::new();
    let kept = q
        .forward_with(std::slice::from_ref(&x), &mut |name, _| {
            seen.push(name.to_string())
        })
        .unwrap();
    assert_eq!(fast, kept);
    assert_eq!(seen.first().map(String::as_str), Some("x"));
    assert_eq!(
        q.profile(std::slice::from_ref(&x)).unwrap().len(),
        seen.len()
    );
    for bad in [f32::NAN, f32::INFINITY] {
        let mut y = x.clone();
        y[[1, 2, 3, 4]] = bad;
        match q.forward(&[y]) {
            Err(QuantError::NonFinite { context, .. }) => assert_eq!(context, "x"),
            other => panic!("{other:?}"),
        }
    }
}
