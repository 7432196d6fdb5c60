//! Saving and loading quantized models: round trips give bit-identical outputs for every
//! operation; damaged and hostile files give errors, never panics.

#[path = "../examples/common/digits.rs"]
mod digits;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use ptq::nn::quantized::{
    Conv2dParams, QAdaptiveAvgPool2d, QAdd, QAvgPool2d, QConv2d, QConvReLU2d, QLinear, QLinearReLU,
    QMaxPool2d, QOp, QStep, QuantizedModel, TorchLayout,
};
use ptq::nn::{BatchNorm2d, Conv2d, Layer, Linear, Module, Pool2d, PoolKind, Sequential};
use ptq::qconfig::{QConfig, QConfigMap};
use ptq::workflow::quantize_model;
use ptq::{DType, QParams, QScheme, QuantError};

fn step(path: &str, op: QOp) -> QStep {
    QStep {
        path: path.into(),
        op,
    }
}

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

/// A model holding every operation: int8 convolutions (dense, grouped + dilated, depthwise
/// symmetric and affine with a channel multiplier), fused ReLUs, ReLU, ReLU6, the pools,
/// residuals with int8 adds (int8 and float bodies) and a float add, float islands
/// (BatchNorm2d, convolutions, pools, linear layers, nested containers), flatten, identity
/// and the borders.
fn every_op_model() -> QuantizedModel {
    let conv_dense = QConv2d::new(
        fw4(8, 3, 3, 3, 1).view(),
        Some(bias(8, 1).view()),
        &per_channel(8, 1),
        cp(1, 1, 1, 1),
        0.05,
        7,
    )
    .unwrap();
    let conv_grouped = QConvReLU2d::new(
        fw4(8, 4, 3, 3, 2).view(),
        None,
        &per_tensor(0.003, 5),
        cp(2, 2, 2, 1),
        0.04,
        3,
    )
    .unwrap();
    let dw_sym = QConv2d::new(
        fw4(8, 1, 3, 3, 3).view(),
        Some(bias(8, 3).view()),
        &per_channel(8, 3),
        cp(8, 1, 1, 1),
        0.03,
        128,
    )
    .unwrap();
    let dw_affine = QConvReLU2d::new(
        fw4(16, 1, 3, 3, 4).view(),
        Some(bias(16, 4).view()),
        &per_tensor(0.004, -9),
        cp(8, 1, 1, 2),
        0.05,
        0,
    )
    .unwrap();
    let conv_1x1 = QConv2d::new(
        fw4(16, 16, 1, 1, 5).view(),
        Some(bias(16, 5).view()),
        &per_channel(16, 5),
        cp(1, 0, 1, 1),
        0.05,
        100,
    )
    .unwrap();
    let add_relu = QAdd::new(0.06, 20)
        .unwrap()
        .with_relu()
        .with_layout(TorchLayout::Contiguous);
    let add_plain = QAdd::new(0.07, 90).unwrap();
    let float_conv = Conv2d::new(fw4(16, 16, 1, 1, 6), Some(bias(16, 6))).unwrap();
    let float_grouped = Conv2d::new(fw4(16, 4, 3, 3, 7), None)
        .unwrap()
        .with_groups(4)
        .with_padding(1, 1);
    let mut bn = BatchNorm2d::identity(16);
    bn.running_mean = bias(16, 8);
    bn.running_var = bias(16, 9).mapv(|v| v.abs() + 0.5);
    bn.weight = bias(16, 10).mapv(|v| v + 1.0);
    bn.eps = 1e-3;
    let mut avg = Pool2d::new(PoolKind::Avg, 3, 3);
    avg.stride = (1, 1);
    avg.padding = (1, 1);
    let float_tail = Sequential::new()
        .push(
            "fc",
            Layer::Linear(Linear::new(fw2(6, 5, 11), Some(bias(6, 11))).unwrap()),
        )
        .push("relu6", Layer::ReLU6)
        .push("drop", Layer::Dropout)
        .push(
            "res",
            Layer::Residual(
                Sequential::new()
                    .push(
                        "fc",
                        Layer::LinearReLU(Linear::new(fw2(6, 6, 12), None).unwrap()),
                    )
                    .push("id", Layer::Identity),
            ),
        )
        .push("q", Layer::QuantStub)
        .push("dq", Layer::DeQuantStub)
        .push("relu", Layer::ReLU);
    let steps = vec![
        step(
            "quant",
            QOp::Quantize {
                scale: 0.02,
                zero_point: 10,
            },
        ),
        step("conv1", QOp::Conv2d(conv_dense)),
        step("conv2", QOp::ConvReLU2d(conv_grouped)),
        step("dw1", QOp::Conv2d(dw_sym)),
        step("dw2", QOp::ConvReLU2d(dw_affine)),
        step("relu", QOp::ReLU),
        step("relu6", QOp::ReLU6 { q6: 120 }),
        step(
            "max",
            QOp::MaxPool2d(QMaxPool2d::new((3, 3), (1, 1), (1, 1), (1, 1)).unwrap()),
        ),
        step(
            "block1",
            QOp::Residual {
                body: vec![
                    step("block1.conv", QOp::Conv2d(conv_1x1)),
                    step("block1.relu", QOp::ReLU),
                ],
                skip_quant: None,
                body_quant: None,
                add: Some(add_relu),
            },
        ),
        step(
            "block2",
            QOp::Residual {
                body: vec![
                    step("block2.bn", QOp::Dequantize),
                    step("block2.bn", QOp::Float(Layer::BatchNorm2d(bn))),
                    step("block2.conv", QOp::Float(Layer::Conv2d(float_conv))),
                    step("block2.gconv", QOp::Float(Layer::ConvReLU2d(float_grouped))),
                    step("block2.pool", QOp::Float(Layer::Pool2d(avg))),
                ],
                skip_quant: None,
                body_quant: None,
                add: None,
            },
        ),
        step(
            "block3",
            QOp::Residual {
                body: vec![
                    step("block3.relu", QOp::Float(Layer::ReLU)),
                    step(
                        "block3.max",
                        QOp::Float(Layer::Pool2d(Pool2d {
                            kind: PoolKind::Max,
                            kernel: (3, 3),
                            stride: (1, 1),
                            padding: (1, 1),
                        })),
                    ),
                ],
                skip_quant: Some((0.08, 60)),
                body_quant: Some((0.05, 30)),
                add: Some(add_plain),
            },
        ),
        step(
            "avg",
            QOp::AvgPool2d(
                QAvgPool2d::new((2, 2), (1, 1), (1, 1), false)
                    .unwrap()
                    .with_layout(TorchLayout::Contiguous),
            ),
        ),
        step(
            "adaptive",
            QOp::AdaptiveAvgPool2d(QAdaptiveAvgPool2d::new((2, 2)).unwrap()),
        ),
        step("flatten", QOp::Flatten { start_dim: 1 }),
        step("drop", QOp::Identity),
        step(
            "fc1",
            QOp::LinearReLU(
                QLinearReLU::new(
                    fw2(10, 64, 13).view(),
                    Some(bias(10, 13).view()),
                    &per_channel(10, 13),
                    0.05,
                    0,
                )
                .unwrap(),
            ),
        ),
        step(
            "fc2",
            QOp::Linear(
                QLinear::new(
                    fw2(5, 10, 14).view(),
                    None,
                    &per_tensor(0.003, -3),
                    0.04,
                    128,
                )
                .unwrap(),
            ),
        ),
        step("tail", QOp::Dequantize),
        step("tail", QOp::Float(Layer::Sequential(float_tail))),
        step("tail.flat", QOp::Float(Layer::Flatten { start_dim: 1 })),
    ];
    QuantizedModel::from_steps(steps, 12345)
}

/// A model with the shape-changing operations in other configurations: flatten from
/// dimension 2, float adaptive pooling, a float flatten feeding an int8 linear.
fn second_model() -> QuantizedModel {
    let steps = vec![
        step(
            "quant",
            QOp::Quantize {
                scale: 0.03,
                zero_point: 0,
            },
        ),
        step("pool", QOp::Dequantize),
        step("pool", QOp::Float(Layer::AdaptiveAvgPool2d((2, 3)))),
        step(
            "flat",
            QOp::Quantize {
                scale: 0.02,
                zero_point: 3,
            },
        ),
        step("flat", QOp::Flatten { start_dim: 2 }),
        step("fc", QOp::Dequantize),
        step(
            "fc",
            QOp::Float(Layer::Linear(Linear::new(fw2(4, 6, 20), None).unwrap())),
        ),
        step("nothing", QOp::Float(Layer::Identity)),
    ];
    QuantizedModel::from_steps(steps, 0)
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
    let model = QuantizedModel::from_steps(
        vec![step(
            "head.double",
            QOp::Float(Layer::Sequential(
                Sequential::new().push("inner", Layer::Custom(Box::new(Doubler))),
            )),
        )],
        0,
    );
    match model.to_bytes().unwrap_err() {
        QuantError::UnsupportedConfig { context, reason } => {
            assert_eq!(context, "head.double.inner");
            assert!(reason.contains("Doubler"), "{reason}");
        }
        e => panic!("{e:?}"),
    }
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

#[test]
fn hostile_metadata_is_refused_with_a_named_error() {
    let bytes = every_op_model().to_bytes().unwrap();
    let set = |k: &str, v: &str| {
        let (k, v) = (k.to_string(), v.to_string());
        rewrite(&bytes, move |m| {
            m.insert(k, v);
        })
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (set("format", "ptq-qmodel/2"), "ptq-qmodel/2"),
        (set("steps", "18446744073709551615"), "more than the file"),
        (set("steps", "-1"), "does not parse"),
        (set("1:op", "Conv3d"), "unknown operation"),
        (set("1:stride", "0,1"), "outside [1, 1024]"),
        (set("1:padding", "1,100000"), "outside [0, 1024]"),
        (set("1:groups", "0"), "groups"),
        (set("1:groups", "3"), "groups"),
        (set("1:out_scale", "NaN"), "invalid scale"),
        (set("1:out_scale", "1e-45"), "invalid scale"),
        (set("1:out_scale", "-0.5"), "invalid scale"),
        (set("0:out_zero_point", "256"), "zero point"),
        (set("0:out_zero_point", "99999999999"), "zero point"),
        (set("1:per_channel", "0"), "weight scales"),
        (set("1:per_channel", "yes"), "not 0 or 1"),
        (set("6:q6", "300"), "does not parse"),
        (set("13:start_dim", "5000"), "outside"),
        (set("11:layout", "sideways"), "no layout"),
        (set("8:skip_quant", "0.1,-1"), "zero point"),
        (set("8:body", "100000"), "more than the file"),
        (set("19:L:kind", "Custom"), "unknown float layer"),
        (set("9.1:L:eps", "-1"), "eps"),
        (
            rewrite(&bytes, |m| {
                m.remove("2:stride");
            }),
            "missing metadata key `2:stride`",
        ),
        (
            rewrite(&bytes, |m| {
                m.insert("steps".into(), "21".into());
            }),
            "missing metadata key `20:path`",
        ),
        (
            rewrite(&bytes, |m| {
                m.insert("steps".into(), "1".into());
            }),
            "tensors no step uses",
        ),
    ];
    for (i, (file, want)) in cases.iter().enumerate() {
        let msg = load_err(file);
        assert!(msg.contains(want), "case {i}: {msg:?} lacks {want:?}");
    }
    // Errors name the step and the layer path.
    let msg = load_err(&set("1:stride", "0,1"));
    assert!(msg.contains("step 1 (conv1)"), "{msg}");
}

#[test]
fn deep_nesting_is_refused_without_recursing_further() {
    let mut steps = vec![step("leaf", QOp::Identity)];
    for i in 0..40 {
        steps = vec![step(
            &format!("r{i}"),
            QOp::Residual {
                body: steps,
                skip_quant: None,
                body_quant: None,
                add: None,
            },
        )];
    }
    let model = QuantizedModel::from_steps(steps, 0);
    let msg = load_err(&model.to_bytes().unwrap());
    assert!(msg.contains("nest deeper than 32"), "{msg}");
}

#[test]
fn tensors_of_the_wrong_dtype_or_shape_are_refused() {
    let l = QLinear::new(
        fw2(3, 4, 1).view(),
        Some(bias(3, 1).view()),
        &per_tensor(0.01, 0),
        0.1,
        0,
    )
    .unwrap();
    let model = QuantizedModel::from_steps(
        vec![
            step(
                "q",
                QOp::Quantize {
                    scale: 0.1,
                    zero_point: 0,
                },
            ),
            step("fc", QOp::Linear(l)),
        ],
        0,
    );
    let bytes = model.to_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = md.metadata().clone().unwrap();
    let with = |name: &str, dtype: safetensors::Dtype, shape: Vec<usize>, data: Vec<u8>| {
        let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
            .tensors()
            .into_iter()
            .filter(|(n, _)| n != name)
            .collect();
        let view = safetensors::tensor::TensorView::new(dtype, shape, &data).unwrap();
        tensors.push((name.to_string(), view));
        safetensors::serialize(tensors, Some(meta.clone())).unwrap()
    };
    use safetensors::Dtype;
    let cases = [
        (
            with("1:weight", Dtype::U8, vec![3, 4], vec![0; 12]),
            "expected I8",
        ),
        (with("1:weight", Dtype::I8, vec![12], vec![0; 12]), "rank 2"),
        (
            with("1:bias", Dtype::F32, vec![4], vec![0; 16]),
            "4 elements for 3",
        ),
        (
            with(
                "1:bias",
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
            with("1:weight_scales", Dtype::F32, vec![3], vec![0; 12]),
            "weight scales",
        ),
        (
            with(
                "1:weight_zero_points",
                Dtype::I32,
                vec![1],
                200i32.to_le_bytes().to_vec(),
            ),
            "zero point",
        ),
        (
            with(
                "1:weight_scales",
                Dtype::F32,
                vec![1],
                0f32.to_le_bytes().to_vec(),
            ),
            "invalid scale",
        ),
        (
            with("extra", Dtype::F32, vec![1], vec![0; 4]),
            "tensors no step uses",
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
        assert_eq!(
            format!("{:?}", old.steps()),
            format!("{:?}", new.steps()),
            "{stale}"
        );
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
