//! Saving and loading quantized models (`QuantizedModel`, the Sequential flow's int8 model,
//! saved as its graph's `ptq-qmodel/2` file): round trips give bit-identical outputs for
//! every layer kind; damaged and hostile files give errors, never panics; the
//! `ptq-qmodel/1` files of earlier versions are refused with an error naming the version.

#[path = "../examples/common/digits.rs"]
mod digits;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use ptq::nn::quantized::{Conv2dParams, QConv2d, QLinear, QuantizedModel};
use ptq::nn::{BatchNorm2d, Conv2d, Layer, Linear, Module, Pool2d, PoolKind, Sequential};
use ptq::qconfig::{QConfig, QConfigMap};
use ptq::workflow::quantize_model;
use ptq::{DType, QParams, QScheme, QuantError};

fn wave(n: usize, seed: usize) -> impl Fn(usize) -> f32 {
    move |i| (((i * 31 + seed * 17 + n) as f32) * 0.37).sin()
}

fn fw4(o: usize, i: usize, kh: usize, kw: usize, seed: usize) -> Array4<f32> {
    let f = wave(o, seed);
    Array4::from_shape_fn((o, i, kh, kw), |(a, b, c, d)| {
        f(((a * i + b) * kh + c) * kw + d) * 0.3
    })
}

fn fw2(o: usize, i: usize, seed: usize) -> Array2<f32> {
    let f = wave(o, seed);
    Array2::from_shape_fn((o, i), |(a, b)| f(a * i + b) * 0.3)
}

fn bias(n: usize, seed: usize) -> Array1<f32> {
    let f = wave(n, seed + 100);
    Array1::from_shape_fn(n, |i| f(i) * 0.1)
}

fn per_channel(n: usize, seed: usize) -> QParams {
    let scales = (0..n)
        .map(|i| 0.002 + 0.0005 * ((i + seed) % 5) as f32)
        .collect();
    QParams::new(
        QScheme::PerChannelSymmetric { axis: 0 },
        DType::QInt8,
        (-128, 127),
        scales,
        vec![0; n],
    )
    .unwrap()
}

fn per_tensor(scale: f32, zp: i32) -> QParams {
    QParams::per_tensor(scale, zp, DType::QInt8).unwrap()
}

fn cp(groups: usize, padding: usize, dilation: usize, stride: usize) -> Conv2dParams {
    Conv2dParams {
        stride: (stride, stride),
        padding: (padding, padding),
        dilation: (dilation, dilation),
        groups,
    }
}

fn conv(o: usize, i: usize, k: usize, seed: usize) -> Conv2d {
    Conv2d::new(fw4(o, i, k, k, seed), Some(bias(o, seed))).unwrap()
}

/// A model holding every layer kind of a `Sequential`, quantized by the Sequential flow:
/// int8 convolutions (dense, grouped + dilated, depthwise with a channel multiplier,
/// strided), fused ReLUs, ReLU, ReLU6, the pools, a residual with an int8 add and one with
/// a float add, an unfused batch norm, dropout, identity, flatten, linear layers, a float
/// island (a nested container kept in float by the map) and the borders.
fn every_op_model() -> QuantizedModel {
    let body = Sequential::new()
        .push(
            "conv1",
            Layer::ConvReLU2d(conv(8, 8, 3, 3).with_padding(1, 1)),
        )
        .push("conv2", Layer::Conv2d(conv(8, 8, 3, 4).with_padding(1, 1)));
    let float_body = Sequential::new().push("conv", Layer::Conv2d(conv(8, 8, 1, 5)));
    let mut mp = Pool2d::new(PoolKind::Max, 3, 3);
    mp.padding = (1, 1);
    let mut ap = Pool2d::new(PoolKind::Avg, 2, 2);
    ap.stride = (1, 1);
    ap.padding = (1, 1);
    let island = Sequential::new()
        .push(
            "fc",
            Layer::Linear(Linear::new(fw2(12, 16, 6), None).unwrap()),
        )
        .push("relu", Layer::ReLU);
    let model = Sequential::new()
        .push("quant", Layer::QuantStub)
        .push(
            "conv_dense",
            Layer::Conv2d(conv(8, 3, 3, 1).with_padding(1, 1)),
        )
        .push(
            "conv_grouped",
            Layer::ConvReLU2d(
                conv(8, 4, 3, 2)
                    .with_groups(2)
                    .with_padding(2, 2)
                    .with_dilation(2, 2),
            ),
        )
        .push("res", Layer::Residual(body))
        .push("bn", Layer::BatchNorm2d(BatchNorm2d::identity(8)))
        .push("relu", Layer::ReLU)
        .push("pool", Layer::Pool2d(mp))
        .push("float_res", Layer::Residual(float_body))
        .push(
            "dw",
            Layer::ConvReLU2d(
                conv(16, 1, 3, 7)
                    .with_groups(8)
                    .with_padding(1, 1)
                    .with_stride(2, 2),
            ),
        )
        .push("relu6", Layer::ReLU6)
        .push("avg", Layer::Pool2d(ap))
        .push("adapt", Layer::AdaptiveAvgPool2d((1, 1)))
        .push("drop", Layer::Dropout)
        .push("id", Layer::Identity)
        .push("flatten", Layer::Flatten { start_dim: 1 })
        .push(
            "fc1",
            Layer::LinearReLU(Linear::new(fw2(16, 16, 8), Some(bias(16, 8))).unwrap()),
        )
        .push("island", Layer::Sequential(island))
        .push(
            "fc2",
            Layer::Linear(Linear::new(fw2(6, 12, 9), Some(bias(6, 9))).unwrap()),
        )
        .push("dequant", Layer::DeQuantStub);
    let map = QConfigMap::new(QConfig::fbgemm())
        .set_name("float_res", None)
        .set_name("island", None);
    let batches: Vec<ArrayD<f32>> = (0..3).map(|i| image_input(2, 3, 9, 9, 10 + i)).collect();
    quantize_model(model, &map, &batches).unwrap()
}

/// A small model that is mostly float: int8 only between the stub and a flatten.
fn second_model() -> QuantizedModel {
    let model = Sequential::new()
        .push("quant", Layer::QuantStub)
        .push("pool", Layer::AdaptiveAvgPool2d((2, 3)))
        .push("flat", Layer::Flatten { start_dim: 1 })
        .push(
            "fc",
            Layer::Linear(Linear::new(fw2(4, 18, 20), None).unwrap()),
        )
        .push("nothing", Layer::Identity);
    let map = QConfigMap::new(QConfig::minmax_per_tensor()).set_name("fc", None);
    let batches = [image_input(2, 3, 5, 4, 3)];
    quantize_model(model, &map, &batches).unwrap()
}

fn image_input(n: usize, c: usize, h: usize, w: usize, seed: usize) -> ArrayD<f32> {
    let f = wave(c, seed);
    ArrayD::from_shape_fn(IxDyn(&[n, c, h, w]), |i| {
        f(((i[0] * c + i[1]) * h + i[2]) * w + i[3]) * 2.0 + 0.5
    })
}

fn assert_round_trip(model: &QuantizedModel, inputs: &[ArrayD<f32>]) -> Vec<u8> {
    let bytes = model.to_bytes().unwrap();
    let loaded = QuantizedModel::from_bytes(&bytes).unwrap();
    assert_eq!(loaded.to_string(), model.to_string());
    assert_eq!(loaded.weight_bytes(), model.weight_bytes());
    assert_eq!(loaded.float_weight_bytes(), model.float_weight_bytes());
    for x in inputs {
        assert_eq!(loaded.forward(x).unwrap(), model.forward(x).unwrap());
    }
    // Saving the loaded model gives the same file.
    let again = loaded.to_bytes().unwrap();
    assert_eq!(
        QuantizedModel::from_bytes(&again)
            .unwrap()
            .forward(&inputs[0])
            .unwrap(),
        model.forward(&inputs[0]).unwrap()
    );
    bytes
}

#[test]
fn every_operation_round_trips_bit_identically() {
    let model = every_op_model();
    let inputs = [image_input(2, 3, 9, 9, 1), image_input(1, 3, 8, 8, 2)];
    // The model runs (and its outputs are not trivial).
    let y = model.forward(&inputs[0]).unwrap();
    assert_eq!(y.shape(), &[2, 6]);
    // every kind of node is there: int8 ops, float islands and borders
    let kinds: std::collections::BTreeSet<&str> = model
        .graph()
        .nodes()
        .iter()
        .map(|n| n.op().kind())
        .collect();
    for k in [
        "Quantize",
        "Conv2d",
        "ConvReLU2d",
        "Add",
        "BatchNorm2d",
        "ReLU",
        "MaxPool2d",
        "Float",
        "Dequantize",
        "Clamp",
        "AvgPool2d",
        "AdaptiveAvgPool2d",
        "Identity",
        "Flatten",
        "LinearReLU",
        "Linear",
    ] {
        assert!(kinds.contains(k), "{k} missing from {kinds:?}");
    }
    assert!(y.iter().any(|&v| v != 0.0));
    assert_round_trip(&model, &inputs);
    let second = second_model();
    assert_round_trip(&second, &[image_input(2, 3, 5, 4, 3)]);
}

#[test]
fn save_and_load_through_a_file() {
    let model = every_op_model();
    let dir = std::env::temp_dir().join(format!("ptq-qmodel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("every_op.safetensors");
    model.save(&path).unwrap();
    let loaded = QuantizedModel::load(&path).unwrap();
    let x = image_input(3, 3, 7, 7, 4);
    assert_eq!(loaded.forward(&x).unwrap(), model.forward(&x).unwrap());
    let missing = QuantizedModel::load(dir.join("nope.safetensors")).unwrap_err();
    assert!(matches!(missing, QuantError::InvalidFile { .. }));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_digits_model_round_trips_with_every_preset() {
    let (train, test) = digits::load_data().unwrap();
    let batches = digits::calibration_batches(&train, 4, 64);
    for qc in [
        QConfig::fbgemm(),
        QConfig::qnnpack(),
        QConfig::minmax_per_channel(),
    ] {
        let int8 = quantize_model(
            digits::trained_fused().unwrap(),
            &QConfigMap::new(qc),
            &batches,
        )
        .unwrap();
        let bytes = assert_round_trip(&int8, std::slice::from_ref(&test.images));
        // The file is about the size of the int8 weights, far below the float weights.
        assert!(
            bytes.len() < int8.float_weight_bytes() / 2,
            "{}",
            bytes.len()
        );
    }
    // With a float island (conv2 kept in float).
    let map = QConfigMap::new(QConfig::fbgemm()).set_name("conv2", None);
    let int8 = quantize_model(digits::trained_fused().unwrap(), &map, &batches).unwrap();
    assert_round_trip(&int8, std::slice::from_ref(&test.images));
}

#[test]
fn accessors_return_the_weights_layers_were_built_from() {
    // Linear, per-channel affine with non-zero zero points.
    let w = Array2::from_shape_fn((5, 7), |(a, b)| ((a * 7 + b) as i32 * 37 % 255 - 128) as i8);
    let qp = QParams::new(
        QScheme::PerChannelAffine { axis: 0 },
        DType::QInt8,
        (-128, 127),
        vec![0.1, 0.2, 0.3, 0.4, 0.5],
        vec![-3, 0, 4, 127, -128],
    )
    .unwrap();
    let l = QLinear::from_quantized(w.view(), &qp, None, 0.1, 3).unwrap();
    assert_eq!(l.quantized_weight(), (w.clone(), qp.clone()));
    // Grouped convolution, more than one panel of outputs.
    let w4 = Array4::from_shape_fn((34, 3, 2, 3), |(a, b, c, d)| {
        ((a * 18 + b * 6 + c * 3 + d) as i32 * 53 % 255 - 128) as i8
    });
    let c = QConv2d::from_quantized(
        w4.view(),
        &per_tensor(0.01, 2),
        None,
        cp(2, 0, 1, 1),
        0.1,
        0,
    )
    .unwrap();
    assert_eq!(c.quantized_weight(), (w4, per_tensor(0.01, 2)));
    // Depthwise, symmetric: the original values.
    let wd = Array4::from_shape_fn((6, 1, 3, 3), |(a, _, c, d)| {
        (a as i8 - 3) * 10 + (c * 3 + d) as i8
    });
    let pc = per_channel(6, 0);
    let c = QConv2d::from_quantized(wd.view(), &pc, None, cp(6, 1, 1, 1), 0.1, 0).unwrap();
    let (got, gqp) = c.quantized_weight();
    assert_eq!(got, wd);
    assert_eq!(gqp.zero_points(), pc.zero_points());
    assert_eq!(gqp.scales(), pc.scales());
    // Depthwise, affine with extreme values: the same `w - zp`.
    let wd = Array4::from_shape_fn((4, 1, 2, 2), |(a, _, c, d)| {
        [-128i8, 127, 0, -5][(a + c * 2 + d) % 4]
    });
    let c = QConv2d::from_quantized(wd.view(), &per_tensor(0.1, 7), None, cp(4, 0, 1, 1), 0.1, 0)
        .unwrap();
    let (got, gqp) = c.quantized_weight();
    for (g, o) in got.iter().zip(wd.iter()) {
        assert_eq!(*g as i32 - gqp.zero_point(), *o as i32 - 7);
    }
}

#[derive(Debug, Clone)]
struct Doubler;

impl Module for Doubler {
    fn type_name(&self) -> &'static str {
        "Doubler"
    }
    fn forward(&self, x: &ArrayD<f32>) -> ptq::Result<ArrayD<f32>> {
        Ok(x * 2.0)
    }
    fn box_clone(&self) -> Box<dyn Module> {
        Box::new(self.clone())
    }
}

#[test]
fn a_custom_layer_cannot_be_saved_and_the_error_names_it() {
    let model = Sequential::new()
        .push("quant", Layer::QuantStub)
        .push(
            "fc",
            Layer::Linear(Linear::new(fw2(3, 3, 1), None).unwrap()),
        )
        .push(
            "head",
            Layer::Sequential(Sequential::new().push("double", Layer::Custom(Box::new(Doubler)))),
        );
    let batches = [ArrayD::from_elem(IxDyn(&[2, 3]), 0.5f32)];
    let int8 = quantize_model(model, &QConfigMap::new(QConfig::fbgemm()), &batches).unwrap();
    // the custom layer runs as a float island
    assert_eq!(
        int8.forward(&batches[0]).unwrap(),
        int8.graph().forward(&batches).unwrap()[0]
    );
    match int8.to_bytes().unwrap_err() {
        QuantError::UnsupportedConfig { context, reason } => {
            assert!(context.contains("head.double"), "{context}");
            assert!(reason.contains("Doubler"), "{reason}");
        }
        e => panic!("{e:?}"),
    }
}

/// A `ptq-qmodel/1` file (a step list, written by earlier versions for `Sequential`
/// models) is refused with an error naming the version, by both loaders.
#[test]
fn legacy_files_are_refused_naming_their_version() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/legacy_v1_second.qmodel");
    let bytes = std::fs::read(&path).unwrap();
    for err in [
        QuantizedModel::load(&path).unwrap_err(),
        QuantizedModel::from_bytes(&bytes).unwrap_err(),
        ptq::QuantizedGraph::from_bytes(&bytes).unwrap_err(),
    ] {
        assert!(matches!(err, QuantError::InvalidFile { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("ptq-qmodel/1"), "{msg}");
        assert!(msg.contains("convert the float model again"), "{msg}");
    }
    // A graph with two outputs is a QuantizedGraph, not a QuantizedModel.
    let err = QuantizedModel::from_graph(two_output_graph()).unwrap_err();
    assert!(err.to_string().contains("2 output(s)"), "{err}");
}

fn two_output_graph() -> ptq::QuantizedGraph {
    use ptq::graph::{Dim, GraphBuilder};
    let mut g = GraphBuilder::new();
    let x = g.input("x", &[Dim::Batch, 3.into()]).unwrap();
    let q = g.quant_stub("quant", x).unwrap();
    let a = g
        .linear("a", q, Linear::new(fw2(2, 3, 1), None).unwrap())
        .unwrap();
    let b = g
        .linear("b", q, Linear::new(fw2(2, 3, 2), None).unwrap())
        .unwrap();
    g.output(a).unwrap();
    g.output(b).unwrap();
    let mut p = ptq::prepare(g.build().unwrap(), &QConfigMap::new(QConfig::fbgemm())).unwrap();
    ptq::calibrate(&mut p, [ArrayD::from_elem(IxDyn(&[2, 3]), 0.5f32)]).unwrap();
    ptq::convert(p).unwrap()
}

/// Re-writes a saved model with its metadata changed by `edit` and its tensors kept.
fn rewrite(bytes: &[u8], edit: impl FnOnce(&mut HashMap<String, String>)) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let mut meta = md.metadata().clone().unwrap();
    edit(&mut meta);
    safetensors::serialize(st.tensors(), Some(meta)).unwrap()
}

fn load_err(bytes: &[u8]) -> String {
    match QuantizedModel::from_bytes(bytes) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    }
}

/// The index of node `name` in the saved file (its position in the graph).
fn node(model: &QuantizedModel, name: &str) -> usize {
    model.graph().find(name).unwrap()
}

#[test]
fn hostile_metadata_is_refused_with_a_named_error() {
    let model = every_op_model();
    let bytes = model.to_bytes().unwrap();
    let set = |k: &str, v: &str| {
        let (k, v) = (k.to_string(), v.to_string());
        rewrite(&bytes, move |m| {
            assert!(m.contains_key(&k), "{k} not in the file");
            m.insert(k, v);
        })
    };
    let conv = node(&model, "conv_grouped");
    let quant = node(&model, "quant");
    let fc1 = node(&model, "fc1");
    let n = model.graph().nodes().len();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (set("format", "ptq-qmodel/1"), "ptq-qmodel/1"),
        (set("format", "ptq-qmodel/3"), "ptq-qmodel/3"),
        (set("nodes", "18446744073709551615"), "more than the file"),
        (set("nodes", "-1"), "does not parse"),
        (set(&format!("{conv}:kind"), "Conv3d"), "unknown op kind"),
        (set(&format!("{conv}:stride"), "0,1"), "outside [1, 1024]"),
        (
            set(&format!("{conv}:padding"), "1,100000"),
            "outside [0, 1024]",
        ),
        (set(&format!("{conv}:groups"), "0"), "groups"),
        (set(&format!("{conv}:groups"), "3"), "groups"),
        (set(&format!("{conv}:per_channel"), "yes"), "not 0 or 1"),
        (set(&format!("{quant}:out"), "NaN,0"), "scale"),
        (set(&format!("{quant}:out"), "0.1,256"), "zero point"),
        (
            set(&format!("{fc1}:inputs"), &format!("{n}")),
            "node index below",
        ),
        (
            rewrite(&bytes, move |m| {
                m.remove(&format!("{conv}:stride"));
            }),
            "missing metadata key",
        ),
    ];
    for (i, (file, want)) in cases.iter().enumerate() {
        let msg = load_err(file);
        assert!(msg.contains(want), "case {i}: {msg:?} lacks {want:?}");
    }
    // Errors name the node.
    let msg = load_err(&set(&format!("{conv}:stride"), "0,1"));
    assert!(msg.contains("conv_grouped"), "{msg}");
}

#[test]
fn tensors_of_the_wrong_dtype_or_shape_are_refused() {
    let model = Sequential::new().push("q", Layer::QuantStub).push(
        "fc",
        Layer::Linear(Linear::new(fw2(3, 4, 1), Some(bias(3, 1))).unwrap()),
    );
    let batches = [ArrayD::from_elem(IxDyn(&[2, 4]), 0.5f32)];
    let model = quantize_model(
        model,
        &QConfigMap::new(QConfig::minmax_per_tensor()),
        &batches,
    )
    .unwrap();
    let fc = node(&model, "fc");
    let bytes = model.to_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = md.metadata().clone().unwrap();
    let with = |name: &str, dtype: safetensors::Dtype, shape: Vec<usize>, data: Vec<u8>| {
        let name = name.replace("FC", &fc.to_string());
        let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
            .tensors()
            .into_iter()
            .filter(|(n, _)| *n != name)
            .collect();
        let view = safetensors::tensor::TensorView::new(dtype, shape, &data).unwrap();
        tensors.push((name.to_string(), view));
        safetensors::serialize(tensors, Some(meta.clone())).unwrap()
    };
    use safetensors::Dtype;
    let cases = [
        (
            with("FC:weight", Dtype::U8, vec![3, 4], vec![0; 12]),
            "expected I8",
        ),
        (
            with("FC:weight", Dtype::I8, vec![12], vec![0; 12]),
            "rank 2",
        ),
        (
            with("FC:bias", Dtype::F32, vec![4], vec![0; 16]),
            "4 elements for 3",
        ),
        (
            with(
                "FC:bias",
                Dtype::F32,
                vec![3],
                [0f32, f32::NAN, 1.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            "NaN",
        ),
        (
            with("FC:weight_scales", Dtype::F32, vec![3], vec![0; 12]),
            "weight scales",
        ),
        (
            with(
                "FC:weight_zero_points",
                Dtype::I32,
                vec![1],
                200i32.to_le_bytes().to_vec(),
            ),
            "zero point",
        ),
        (
            with(
                "FC:weight_scales",
                Dtype::F32,
                vec![1],
                0f32.to_le_bytes().to_vec(),
            ),
            "invalid scale",
        ),
        (
            with("extra", Dtype::F32, vec![1], vec![0; 4]),
            "no step uses",
        ),
    ];
    for (i, (file, want)) in cases.iter().enumerate() {
        let msg = load_err(file);
        assert!(msg.contains(want), "case {i}: {msg:?} lacks {want:?}");
    }
}

/// Loads `bytes` and, when it loads, runs the model; a panic anywhere fails.
fn survives(bytes: &[u8], x: &ArrayD<f32>) -> Result<(), ()> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        match QuantizedModel::from_bytes(bytes) {
            Ok(m) => {
                let _ = m.forward(x);
                true
            }
            Err(_) => false,
        }
    }));
    match outcome {
        Ok(true) => Ok(()),
        Ok(false) => Err(()),
        Err(_) => panic!("panicked on a damaged file"),
    }
}

/// Flips and truncations at hundreds of positions: truncated files are always errors;
/// a flipped byte is an error or (when it lands in tensor data and leaves every value
/// valid, e.g. an `i8` weight or a bias) a model that loads and runs. Nothing panics.
#[test]
fn damaged_files_give_errors_never_panics() {
    let bytes = every_op_model().to_bytes().unwrap();
    let x = image_input(1, 3, 9, 9, 5);
    let n = bytes.len();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut positions: Vec<usize> = (0..64).collect();
    positions.extend((0..n).step_by((n / 700).max(1)));
    positions.sort_unstable();
    positions.dedup();
    let (mut ok_in_data, mut ok_in_header, mut errors) = (0, 0, 0);
    for &p in &positions {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[p] ^= mask;
            match survives(&bad, &x) {
                Ok(()) if p >= header_end => ok_in_data += 1,
                Ok(()) => ok_in_header += 1,
                Err(()) => errors += 1,
            }
        }
    }
    let mut truncations = 0;
    for len in (0..n)
        .step_by((n / 300).max(1))
        .chain(n.saturating_sub(16)..n)
    {
        assert!(
            survives(&bytes[..len], &x).is_err(),
            "truncated at {len} loaded"
        );
        truncations += 1;
    }
    // Appended garbage is an error too.
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"junk");
    assert!(survives(&longer, &x).is_err());
    eprintln!(
        "{} flips: {errors} errors, {ok_in_data} loads (data), {ok_in_header} loads (header); {truncations} truncations",
        positions.len() * 3
    );
    assert!(positions.len() > 600, "{}", positions.len());
    assert!(truncations > 300, "{truncations}");
    assert!(
        errors > 0 && ok_in_data > 0,
        "{errors} errors, {ok_in_data} loads"
    );
    // A flip in the JSON header that still loads changed, e.g., a digit of a float
    // parameter's text or the order of a hex digit; it is rare.
    assert!(ok_in_header < errors, "{ok_in_header} header flips loaded");
}

/// Writes `bytes` to a fuzz seed file when `PTQ_WRITE_FUZZ_SEEDS` is set; otherwise asserts
/// that the committed seed still describes what the current code writes (so the format
/// cannot change unnoticed and the fuzzers' seeds stay valid). Saved models are compared
/// by their loaded steps, since the safetensors header's metadata order is not fixed;
/// state_dict seeds byte for byte.
fn seed(path: &std::path::Path, bytes: Vec<u8>) {
    if std::env::var_os("PTQ_WRITE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
        return;
    }
    let committed = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let stale = format!(
        "{} is stale: rerun with PTQ_WRITE_FUZZ_SEEDS=1",
        path.display()
    );
    if path.extension().is_some_and(|e| e == "qmodel") {
        let old = QuantizedModel::from_bytes(&committed).unwrap_or_else(|e| panic!("{stale}: {e}"));
        let new = QuantizedModel::from_bytes(&bytes).unwrap();
        assert_eq!(old.to_string(), new.to_string(), "{stale}");
        for n in new.graph().nodes() {
            assert_eq!(
                old.weight(n.name()).unwrap(),
                new.weight(n.name()).unwrap(),
                "{stale}"
            );
        }
    } else {
        assert!(committed == bytes, "{stale}");
    }
}

/// The fuzzers' seed files (`fuzz/corpus/*`) are current. After a format change,
/// regenerate them: `PTQ_WRITE_FUZZ_SEEDS=1 cargo test --release --test qmodel_io fuzz_seeds`.
#[test]
fn fuzz_seeds_are_current() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let q = root.join("qmodel");
    seed(
        &q.join("every_op.qmodel"),
        every_op_model().to_bytes().unwrap(),
    );
    seed(&q.join("second.qmodel"), second_model().to_bytes().unwrap());
    let (train, _) = digits::load_data().unwrap();
    let int8 = quantize_model(
        digits::trained_fused().unwrap(),
        &QConfigMap::new(QConfig::fbgemm()),
        digits::calibration_batches(&train, 2, 64),
    )
    .unwrap();
    seed(&q.join("digits.qmodel"), int8.to_bytes().unwrap());
    // The state_dict of fuzz/src/lib.rs's small model, in f32 and f16.
    let s = root.join("state_dict");
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let params: Vec<(&str, Vec<usize>)> = vec![
        ("conv.weight", vec![4, 3, 3, 3]),
        ("conv.bias", vec![4]),
        ("bn.weight", vec![4]),
        ("bn.bias", vec![4]),
        ("bn.running_mean", vec![4]),
        ("bn.running_var", vec![4]),
        ("fc.weight", vec![5, 64]),
        ("fc.bias", vec![5]),
    ];
    for (file, dtype) in [
        ("small_f32.safetensors", Dtype::F32),
        ("small_f16.safetensors", Dtype::F16),
    ] {
        let data: Vec<Vec<u8>> = params
            .iter()
            .map(|(_, shape)| {
                let n: usize = shape.iter().product();
                let f = wave(n, 1);
                (0..n)
                    .flat_map(|i| match dtype {
                        Dtype::F32 => f(i).to_le_bytes().to_vec(),
                        _ => half::f16::from_f32(f(i)).to_le_bytes().to_vec(),
                    })
                    .collect()
            })
            .collect();
        let mut views: Vec<(String, TensorView<'_>)> = params
            .iter()
            .zip(&data)
            .map(|((name, shape), d)| {
                (
                    name.to_string(),
                    TensorView::new(dtype, shape.clone(), d).unwrap(),
                )
            })
            .collect();
        let nbt = 7i64.to_le_bytes();
        views.push((
            "bn.num_batches_tracked".into(),
            TensorView::new(Dtype::I64, vec![], &nbt).unwrap(),
        ));
        seed(&s.join(file), safetensors::serialize(views, None).unwrap());
    }
}
