//! The bad-input matrix: every public entry point family against NaN/Inf, empty tensors,
//! zero sizes, mismatched shapes and dtypes, extreme scales (subnormal, huge, infinite),
//! zero points outside the range and qconfigs PyTorch rejects. Each row names the exact
//! error variant it expects (or `Ok` where the input is legal, e.g. an empty batch through
//! a layer); no row may panic. Negative sizes cannot be expressed (`usize`); negative
//! values are tested where the API takes signed numbers (ranges, zero points).

use std::panic::{catch_unwind, AssertUnwindSafe};

use ndarray::{array, Array1, Array2, Array4, ArrayD, IxDyn};
use ptq::kernels::PackedWeights;
use ptq::nn::quantized::{
    Conv2dParams, QAdaptiveAvgPool2d, QAdd, QAvgPool2d, QConv2d, QLinear, QMaxPool2d, QTensor,
    QuantizedModel,
};
use ptq::nn::{
    adaptive_avg_pool2d, flatten, BatchNorm2d, Conv2d, Layer, Linear, Pool2d, PoolKind, Sequential,
};
use ptq::qconfig::{ObserverSpec, QConfig, QConfigMap};
use ptq::workflow::{calibrate, calibrate_parallel, convert, prepare, quantize_model};
use ptq::{
    dequantize, fake_quantize, qparams_from_min_max, quantize, resolve_quant_range, DType, QParams,
    QScheme, RangeConfig,
};

type Case<'a> = (&'a str, Box<dyn Fn() -> ptq::Result<()> + 'a>, &'a str);

/// The variant's name from its `Debug` form, or `"Ok"`.
fn outcome(r: ptq::Result<()>) -> String {
    match r {
        Ok(()) => "Ok".into(),
        Err(e) => format!("{e:?}")
            .split([' ', '{', '('])
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

fn run(family: &str, cases: Vec<Case<'_>>) {
    let mut failures = Vec::new();
    for (name, f, want) in &cases {
        match catch_unwind(AssertUnwindSafe(f)) {
            Err(_) => failures.push(format!("{family}/{name}: PANICKED")),
            Ok(r) => {
                let got = outcome(r);
                if got != *want {
                    failures.push(format!("{family}/{name}: expected {want}, got {got}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn case<'a>(name: &'a str, want: &'a str, f: impl Fn() -> ptq::Result<()> + 'a) -> Case<'a> {
    (name, Box::new(f), want)
}

fn nan4() -> ArrayD<f32> {
    let mut x = ArrayD::from_elem(IxDyn(&[1, 2, 3, 3]), 0.5f32);
    x[[0, 1, 1, 1]] = f32::NAN;
    x
}

fn inf2() -> ArrayD<f32> {
    let mut x = ArrayD::from_elem(IxDyn(&[2, 3]), 0.5f32);
    x[[1, 2]] = f32::NEG_INFINITY;
    x
}

const SUBNORMAL: f32 = 1e-40;

fn w8() -> QParams {
    QParams::per_tensor(0.01, 0, DType::QInt8).unwrap()
}

#[test]
fn qparams_functions() {
    let qp = QParams::per_tensor(0.1, 3, DType::QUInt8).unwrap();
    let x = array![1.0f32, 2.0].into_dyn();
    run(
        "qparams",
        vec![
            case("zero scale", "InvalidScale", || {
                QParams::per_tensor(0.0, 0, DType::QUInt8).map(drop)
            }),
            case("negative scale", "InvalidScale", || {
                QParams::per_tensor(-0.1, 0, DType::QUInt8).map(drop)
            }),
            case("subnormal scale", "InvalidScale", || {
                QParams::per_tensor(SUBNORMAL, 0, DType::QUInt8).map(drop)
            }),
            case("NaN scale", "InvalidScale", || {
                QParams::per_tensor(f32::NAN, 0, DType::QUInt8).map(drop)
            }),
            case("infinite scale", "InvalidScale", || {
                QParams::per_tensor(f32::INFINITY, 0, DType::QUInt8).map(drop)
            }),
            case("huge finite scale is legal", "Ok", || {
                QParams::per_tensor(f32::MAX, 0, DType::QUInt8).map(drop)
            }),
            case("zero point above range", "InvalidZeroPoint", || {
                QParams::per_tensor(0.1, 256, DType::QUInt8).map(drop)
            }),
            case("negative zero point for quint8", "InvalidZeroPoint", || {
                QParams::per_tensor(0.1, -1, DType::QUInt8).map(drop)
            }),
            case("zero point below qint8", "InvalidZeroPoint", || {
                QParams::per_tensor(0.1, -129, DType::QInt8).map(drop)
            }),
            case("empty per-channel", "ShapeMismatch", || {
                QParams::new(
                    QScheme::PerChannelAffine { axis: 0 },
                    DType::QInt8,
                    (-128, 127),
                    vec![],
                    vec![],
                )
                .map(drop)
            }),
            case(
                "scales and zero points differ in length",
                "ShapeMismatch",
                || {
                    QParams::new(
                        QScheme::PerChannelAffine { axis: 0 },
                        DType::QInt8,
                        (-128, 127),
                        vec![0.1, 0.2],
                        vec![0],
                    )
                    .map(drop)
                },
            ),
            case("range outside the dtype", "InvalidQuantRange", || {
                resolve_quant_range(DType::QUInt8, false, Some((0, 300))).map(drop)
            }),
            case("range without zero", "InvalidQuantRange", || {
                resolve_quant_range(DType::QUInt8, false, Some((1, 255))).map(drop)
            }),
            case("inverted range", "InvalidQuantRange", || {
                resolve_quant_range(DType::QInt8, false, Some((5, -5))).map(drop)
            }),
            case(
                "symmetric quint8 with reduce_range",
                "UnsupportedConfig",
                || {
                    RangeConfig::new(
                        DType::QUInt8,
                        QScheme::PerTensorSymmetric,
                        true,
                        None,
                        f32::EPSILON,
                    )
                    .map(drop)
                },
            ),
            case("min/max NaN", "NonFinite", || {
                let cfg = RangeConfig::new(
                    DType::QUInt8,
                    QScheme::PerTensorAffine,
                    false,
                    None,
                    f32::EPSILON,
                )?;
                qparams_from_min_max(f32::NAN, 1.0, &cfg).map(drop)
            }),
            case("quantize NaN", "NonFinite", || {
                quantize(&array![1.0f32, f32::NAN], &qp).map(drop)
            }),
            // Documented: infinities saturate, as in PyTorch.
            case("quantize infinity saturates", "Ok", || {
                quantize(&array![f32::INFINITY], &qp).map(drop)
            }),
            case("quantize empty", "Ok", || {
                quantize(&Array1::<f32>::zeros(0), &qp).map(drop)
            }),
            case("fake_quantize NaN", "NonFinite", || {
                fake_quantize(&array![f32::NAN], &qp).map(drop)
            }),
            case("dequantize out of range", "QuantizedOutOfRange", || {
                dequantize(&array![0i32, 300], &qp).map(drop)
            }),
            case("per-channel axis past the rank", "ShapeMismatch", || {
                let pc = QParams::new(
                    QScheme::PerChannelAffine { axis: 3 },
                    DType::QInt8,
                    (-128, 127),
                    vec![0.1, 0.1],
                    vec![0, 0],
                )?;
                quantize(&x, &pc).map(drop)
            }),
        ],
    );
}

#[test]
fn observers_built_from_specs() {
    let specs = [
        ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine),
        ObserverSpec::moving_average(DType::QUInt8, QScheme::PerTensorAffine),
        ObserverSpec::histogram(DType::QUInt8, QScheme::PerTensorAffine),
        ObserverSpec::percentile(DType::QUInt8, QScheme::PerTensorAffine, 99.9),
        ObserverSpec::entropy(DType::QUInt8, QScheme::PerTensorAffine),
        ObserverSpec::mse(DType::QUInt8, QScheme::PerTensorAffine),
        ObserverSpec::min_max(DType::QInt8, QScheme::PerChannelSymmetric { axis: 0 }),
    ];
    for spec in specs {
        let label = format!("{:?}", spec.kind);
        run(
            &label,
            vec![
                case("qparams before data", "Uncalibrated", || {
                    spec.build()?.qparams().map(drop)
                }),
                case("NaN batch", "NonFinite", || {
                    spec.build()?.observe(nan4().view())
                }),
                case("infinite batch", "NonFinite", || {
                    spec.build()?.observe(inf2().view())
                }),
                case("empty batch then qparams", "Uncalibrated", || {
                    let mut o = spec.build()?;
                    o.observe(ArrayD::<f32>::zeros(IxDyn(&[0, 3])).view())?;
                    o.qparams().map(drop)
                }),
                case("huge values", "Ok", || {
                    let mut o = spec.build()?;
                    o.observe(array![-1e30f32, 1e30].into_dyn().view())?;
                    o.qparams().map(drop)
                }),
            ],
        );
    }
    run(
        "per-channel observer",
        vec![
            case("channel count changes", "ShapeMismatch", || {
                let mut o =
                    ObserverSpec::min_max(DType::QInt8, QScheme::PerChannelSymmetric { axis: 0 })
                        .build()?;
                o.observe(ArrayD::zeros(IxDyn(&[2, 3])).view())?;
                o.observe(ArrayD::zeros(IxDyn(&[3, 3])).view())
            }),
            case("axis past the rank", "ShapeMismatch", || {
                let mut o =
                    ObserverSpec::min_max(DType::QInt8, QScheme::PerChannelSymmetric { axis: 2 })
                        .build()?;
                o.observe(ArrayD::zeros(IxDyn(&[2, 3])).view())
            }),
            case("a range too wide for f32", "InvalidScale", || {
                let mut o =
                    ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine).build()?;
                o.observe(array![-f32::MAX, f32::MAX].into_dyn().view())?;
                o.qparams().map(drop)
            }),
        ],
    );
}

#[test]
fn qconfigs_pytorch_rejects() {
    let base = ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine);
    let with = |activation: ObserverSpec| QConfig {
        activation,
        ..QConfig::fbgemm()
    };
    run(
        "qconfig",
        vec![
            case("unknown backend", "UnsupportedConfig", || {
                QConfig::for_backend("tensorrt").map(drop)
            }),
            case(
                "symmetric quint8 with reduce_range",
                "UnsupportedConfig",
                || {
                    with(
                        ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorSymmetric)
                            .with_reduce_range(true),
                    )
                    .validate()
                },
            ),
            case("histogram per channel", "UnsupportedConfig", || {
                with(ObserverSpec::histogram(
                    DType::QUInt8,
                    QScheme::PerChannelAffine { axis: 0 },
                ))
                .validate()
            }),
            case("custom range without zero", "InvalidQuantRange", || {
                with(base.with_range(1, 10)).validate()
            }),
            case("custom range beyond the dtype", "InvalidQuantRange", || {
                with(base.with_range(-1, 255)).validate()
            }),
            // PyTorch's observers accept qint32 too; convert refuses it for activations.
            case("qint32 observer is legal", "Ok", || {
                with(ObserverSpec::min_max(
                    DType::QInt32,
                    QScheme::PerTensorAffine,
                ))
                .validate()
            }),
            case("percentile above 100", "UnsupportedConfig", || {
                with(ObserverSpec::percentile(
                    DType::QUInt8,
                    QScheme::PerTensorAffine,
                    101.0,
                ))
                .validate()
            }),
            case("NaN eps", "UnsupportedConfig", || {
                with(base.with_eps(f32::NAN)).validate()
            }),
            case("fixed qparams with a zero scale", "InvalidScale", || {
                with(ObserverSpec::fixed(0.0, 0, DType::QUInt8)).validate()
            }),
            case(
                "fixed qparams with a zero point out of range",
                "InvalidZeroPoint",
                || with(ObserverSpec::fixed(0.1, 300, DType::QUInt8)).validate(),
            ),
        ],
    );
}

#[test]
fn float_layers() {
    let conv = Conv2d::new(Array4::zeros((4, 2, 3, 3)), None).unwrap();
    let fc = Linear::new(Array2::zeros((3, 4)), None).unwrap();
    run(
        "nn",
        vec![
            case("conv bias length", "ShapeMismatch", || {
                Conv2d::new(Array4::zeros((4, 2, 3, 3)), Some(Array1::zeros(3))).map(drop)
            }),
            case("linear bias length", "ShapeMismatch", || {
                Linear::new(Array2::zeros((3, 4)), Some(Array1::zeros(4))).map(drop)
            }),
            case("conv rank 2 input", "ShapeMismatch", || {
                conv.forward(&ArrayD::zeros(IxDyn(&[2, 2]))).map(drop)
            }),
            case("conv wrong channels", "ShapeMismatch", || {
                conv.forward(&ArrayD::zeros(IxDyn(&[1, 3, 5, 5]))).map(drop)
            }),
            case(
                "conv input smaller than the kernel",
                "ShapeMismatch",
                || conv.forward(&ArrayD::zeros(IxDyn(&[1, 2, 2, 2]))).map(drop),
            ),
            case("conv zero groups", "UnsupportedConfig", || {
                conv.clone()
                    .with_groups(0)
                    .forward(&ArrayD::zeros(IxDyn(&[1, 2, 5, 5])))
                    .map(drop)
            }),
            case("conv zero stride", "UnsupportedConfig", || {
                conv.clone()
                    .with_stride(0, 1)
                    .forward(&ArrayD::zeros(IxDyn(&[1, 2, 5, 5])))
                    .map(drop)
            }),
            case("conv empty batch", "Ok", || {
                conv.forward(&ArrayD::zeros(IxDyn(&[0, 2, 5, 5]))).map(drop)
            }),
            case("linear wrong features", "ShapeMismatch", || {
                fc.forward(&ArrayD::zeros(IxDyn(&[2, 5]))).map(drop)
            }),
            case("linear scalar", "ShapeMismatch", || {
                fc.forward(&ArrayD::zeros(IxDyn(&[]))).map(drop)
            }),
            case("linear empty batch", "Ok", || {
                fc.forward(&ArrayD::zeros(IxDyn(&[0, 4]))).map(drop)
            }),
            case("batchnorm wrong channels", "ShapeMismatch", || {
                BatchNorm2d::identity(3)
                    .forward(&ArrayD::zeros(IxDyn(&[1, 2, 2, 2])))
                    .map(drop)
            }),
            case("pool zero kernel", "UnsupportedConfig", || {
                Pool2d::new(PoolKind::Max, 0, 2)
                    .forward(&ArrayD::zeros(IxDyn(&[1, 1, 4, 4])))
                    .map(drop)
            }),
            case("pool window larger than input", "ShapeMismatch", || {
                Pool2d::new(PoolKind::Avg, 5, 5)
                    .forward(&ArrayD::zeros(IxDyn(&[1, 1, 4, 4])))
                    .map(drop)
            }),
            case("adaptive pool to zero size", "UnsupportedConfig", || {
                adaptive_avg_pool2d(&ArrayD::zeros(IxDyn(&[1, 1, 4, 4])), (0, 2)).map(drop)
            }),
            case("flatten past the rank", "ShapeMismatch", || {
                flatten(&ArrayD::zeros(IxDyn(&[2, 3])), 5).map(drop)
            }),
            case("sequential NaN passes through float layers", "Ok", || {
                Sequential::new()
                    .push("fc", Layer::Linear(fc.clone()))
                    .forward(&ArrayD::from_elem(IxDyn(&[1, 4]), f32::NAN))
                    .map(drop)
            }),
        ],
    );
}

#[test]
fn quantized_modules() {
    let fc = QLinear::new(Array2::zeros((3, 4)).view(), None, &w8(), 0.1, 0).unwrap();
    let conv = QConv2d::new(
        Array4::zeros((4, 2, 3, 3)).view(),
        None,
        &w8(),
        Conv2dParams::default(),
        0.1,
        0,
    )
    .unwrap();
    let qt = |shape: &[usize]| QTensor::new(ArrayD::zeros(IxDyn(shape)), 0.1, 0);
    let w = Array2::<f32>::zeros((3, 4));
    run(
        "quantized",
        vec![
            case("linear NaN weight", "NonFinite", || {
                let mut w = w.clone();
                w[[1, 1]] = f32::NAN;
                QLinear::new(w.view(), None, &w8(), 0.1, 0).map(drop)
            }),
            case("linear infinite bias", "NonFinite", || {
                let b = array![0.0f32, f32::INFINITY, 0.0];
                QLinear::new(w.view(), Some(b.view()), &w8(), 0.1, 0).map(drop)
            }),
            case("linear quint8 weights", "UnsupportedConfig", || {
                let qp = QParams::per_tensor(0.1, 0, DType::QUInt8)?;
                QLinear::new(w.view(), None, &qp, 0.1, 0).map(drop)
            }),
            case("linear per-channel count", "ShapeMismatch", || {
                let qp = QParams::new(
                    QScheme::PerChannelSymmetric { axis: 0 },
                    DType::QInt8,
                    (-128, 127),
                    vec![0.1; 2],
                    vec![0; 2],
                )?;
                QLinear::new(w.view(), None, &qp, 0.1, 0).map(drop)
            }),
            case("linear bias length", "ShapeMismatch", || {
                QLinear::new(w.view(), Some(array![0.0f32].view()), &w8(), 0.1, 0).map(drop)
            }),
            case("linear zero output scale", "InvalidScale", || {
                QLinear::new(w.view(), None, &w8(), 0.0, 0).map(drop)
            }),
            case("linear subnormal output scale", "InvalidScale", || {
                QLinear::new(w.view(), None, &w8(), SUBNORMAL, 0).map(drop)
            }),
            case("linear infinite output scale", "InvalidScale", || {
                QLinear::new(w.view(), None, &w8(), f32::INFINITY, 0).map(drop)
            }),
            case("linear huge output scale", "Ok", || {
                QLinear::new(w.view(), None, &w8(), 1e38, 0).map(drop)
            }),
            case("linear output zero point 256", "InvalidZeroPoint", || {
                QLinear::new(w.view(), None, &w8(), 0.1, 256).map(drop)
            }),
            case("linear output zero point -1", "InvalidZeroPoint", || {
                QLinear::new(w.view(), None, &w8(), 0.1, -1).map(drop)
            }),
            case(
                "linear int8 weights outside a narrow range",
                "QuantizedOutOfRange",
                || {
                    let qp = QParams::new(
                        QScheme::PerTensorAffine,
                        DType::QInt8,
                        (-64, 63),
                        vec![0.1],
                        vec![0],
                    )?;
                    QLinear::from_quantized(array![[100i8]].view(), &qp, None, 0.1, 0).map(drop)
                },
            ),
            case("linear forward wrong features", "ShapeMismatch", || {
                fc.forward(&qt(&[2, 5])?).map(drop)
            }),
            case("linear forward empty batch", "Ok", || {
                fc.forward(&qt(&[0, 4])?).map(drop)
            }),
            case("conv zero stride", "UnsupportedConfig", || {
                let p = Conv2dParams {
                    stride: (0, 1),
                    ..Default::default()
                };
                QConv2d::new(Array4::zeros((4, 2, 3, 3)).view(), None, &w8(), p, 0.1, 0).map(drop)
            }),
            case("conv zero kernel", "UnsupportedConfig", || {
                QConv2d::new(
                    Array4::zeros((4, 2, 0, 3)).view(),
                    None,
                    &w8(),
                    Conv2dParams::default(),
                    0.1,
                    0,
                )
                .map(drop)
            }),
            case("conv groups not dividing", "UnsupportedConfig", || {
                let p = Conv2dParams {
                    groups: 3,
                    ..Default::default()
                };
                QConv2d::new(Array4::zeros((4, 2, 3, 3)).view(), None, &w8(), p, 0.1, 0).map(drop)
            }),
            case("conv forward rank 3", "ShapeMismatch", || {
                conv.forward(&qt(&[2, 5, 5])?).map(drop)
            }),
            case("conv forward wrong channels", "ShapeMismatch", || {
                conv.forward(&qt(&[1, 3, 5, 5])?).map(drop)
            }),
            case("conv forward too small", "ShapeMismatch", || {
                conv.forward(&qt(&[1, 2, 2, 2])?).map(drop)
            }),
            case("conv forward empty batch", "Ok", || {
                conv.forward(&qt(&[0, 2, 5, 5])?).map(drop)
            }),
            case("QTensor NaN scale", "InvalidScale", || {
                QTensor::new(ArrayD::zeros(IxDyn(&[1])), f32::NAN, 0).map(drop)
            }),
            case("QTensor zero point 300", "InvalidZeroPoint", || {
                QTensor::new(ArrayD::zeros(IxDyn(&[1])), 0.1, 300).map(drop)
            }),
            case("QTensor from NaN", "NonFinite", || {
                QTensor::from_f32(&nan4(), 0.1, 0).map(drop)
            }),
            case("add shape mismatch", "ShapeMismatch", || {
                QAdd::new(0.1, 0)?
                    .forward(&qt(&[1, 2])?, &qt(&[2, 1])?)
                    .map(drop)
            }),
            case("add subnormal scale", "InvalidScale", || {
                QAdd::new(SUBNORMAL, 0).map(drop)
            }),
            case("max pool zero kernel", "UnsupportedConfig", || {
                QMaxPool2d::new((0, 1), (1, 1), (0, 0), (1, 1)).map(drop)
            }),
            case("max pool zero dilation", "UnsupportedConfig", || {
                QMaxPool2d::new((2, 2), (1, 1), (0, 0), (0, 1)).map(drop)
            }),
            case(
                "avg pool padding over half the kernel",
                "UnsupportedConfig",
                || QAvgPool2d::new((2, 2), (1, 1), (2, 0), true).map(drop),
            ),
            case("avg pool forward rank 2", "ShapeMismatch", || {
                QAvgPool2d::new((2, 2), (1, 1), (0, 0), true)?
                    .forward(&qt(&[2, 2])?)
                    .map(drop)
            }),
            case("adaptive pool zero output", "UnsupportedConfig", || {
                QAdaptiveAvgPool2d::new((0, 1)).map(drop)
            }),
            case("adaptive pool empty plane", "ShapeMismatch", || {
                QAdaptiveAvgPool2d::new((1, 1))?
                    .forward(&qt(&[1, 1, 0, 3])?)
                    .map(drop)
            }),
            case("packed weights wrong count", "ShapeMismatch", || {
                PackedWeights::new(&[1, 2, 3], 2, 2, &[0]).map(drop)
            }),
            case("packed weights zero points", "ShapeMismatch", || {
                PackedWeights::new(&[1, 2, 3, 4], 2, 2, &[0, 0, 0]).map(drop)
            }),
        ],
    );
}

fn tiny_model() -> Sequential {
    Sequential::new()
        .push("quant", Layer::QuantStub)
        .push(
            "fc",
            Layer::Linear(Linear::new(Array2::eye(3), Some(Array1::zeros(3))).unwrap()),
        )
        .push("dequant", Layer::DeQuantStub)
}

#[test]
fn workflow_functions() {
    let map = QConfigMap::new(QConfig::fbgemm());
    let good = vec![ArrayD::from_elem(IxDyn(&[2, 3]), 0.5f32)];
    let no_batches: Vec<ArrayD<f32>> = vec![];
    let empty = vec![ArrayD::<f32>::zeros(IxDyn(&[0, 3]))];
    run(
        "workflow",
        vec![
            case("empty qconfig map", "NothingToQuantize", || {
                prepare(tiny_model(), &QConfigMap::empty()).map(drop)
            }),
            case("a qconfig PyTorch rejects", "UnsupportedConfig", || {
                let bad = QConfig {
                    activation: ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorSymmetric)
                        .with_reduce_range(true),
                    ..QConfig::fbgemm()
                };
                prepare(tiny_model(), &QConfigMap::new(bad)).map(drop)
            }),
            case("convert without calibration", "UncalibratedLayers", || {
                convert(prepare(tiny_model(), &map)?).map(drop)
            }),
            case("calibrate without batches", "EmptyCalibration", || {
                calibrate(&mut prepare(tiny_model(), &map)?, &no_batches, |_| {}).map(drop)
            }),
            case(
                "calibrate with only empty batches",
                "EmptyCalibration",
                || calibrate(&mut prepare(tiny_model(), &map)?, &empty, |_| {}).map(drop),
            ),
            case("calibrate with NaN", "NonFinite", || {
                let b = vec![ArrayD::from_elem(IxDyn(&[2, 3]), f32::NAN)];
                calibrate(&mut prepare(tiny_model(), &map)?, &b, |_| {}).map(drop)
            }),
            case("calibrate with infinity", "NonFinite", || {
                calibrate(&mut prepare(tiny_model(), &map)?, [inf2()], |_| {}).map(drop)
            }),
            case("calibrate with the wrong shape", "ShapeMismatch", || {
                let b = vec![ArrayD::from_elem(IxDyn(&[2, 5]), 0.5f32)];
                calibrate(&mut prepare(tiny_model(), &map)?, &b, |_| {}).map(drop)
            }),
            case(
                "calibrate_parallel without batches",
                "EmptyCalibration",
                || calibrate_parallel(&mut prepare(tiny_model(), &map)?, &no_batches, 4).map(drop),
            ),
            case("calibrate_parallel with NaN", "NonFinite", || {
                let b = vec![good[0].clone(), ArrayD::from_elem(IxDyn(&[2, 3]), f32::NAN)];
                calibrate_parallel(&mut prepare(tiny_model(), &map)?, &b, 2).map(drop)
            }),
            case("calibrate_parallel zero threads", "Ok", || {
                calibrate_parallel(&mut prepare(tiny_model(), &map)?, &good, 0).map(drop)
            }),
            case("quantize_model without batches", "EmptyCalibration", || {
                quantize_model(tiny_model(), &map, &no_batches).map(drop)
            }),
            case(
                "quantize_model with per-channel activations",
                "UnsupportedConfig",
                || {
                    let bad = QConfig {
                        activation: ObserverSpec::min_max(
                            DType::QUInt8,
                            QScheme::PerChannelAffine { axis: 1 },
                        ),
                        ..QConfig::fbgemm()
                    };
                    quantize_model(tiny_model(), &QConfigMap::new(bad), &good).map(drop)
                },
            ),
            case(
                "quantize_model with qint8 activations",
                "UnsupportedConfig",
                || {
                    let bad = QConfig {
                        activation: ObserverSpec::min_max(DType::QInt8, QScheme::PerTensorAffine),
                        ..QConfig::fbgemm()
                    };
                    quantize_model(tiny_model(), &QConfigMap::new(bad), &good).map(drop)
                },
            ),
            case(
                "quantize_model with qint32 activations",
                "UnsupportedConfig",
                || {
                    let bad = QConfig {
                        activation: ObserverSpec::min_max(DType::QInt32, QScheme::PerTensorAffine),
                        ..QConfig::fbgemm()
                    };
                    quantize_model(tiny_model(), &QConfigMap::new(bad), &good).map(drop)
                },
            ),
            case(
                "quantize_model with quint8 weights",
                "UnsupportedConfig",
                || {
                    let bad = QConfig {
                        weight: ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine),
                        ..QConfig::fbgemm()
                    };
                    quantize_model(tiny_model(), &QConfigMap::new(bad), &good).map(drop)
                },
            ),
        ],
    );
}

#[test]
fn quantized_model_forward() {
    let model = quantize_model(
        tiny_model(),
        &QConfigMap::new(QConfig::fbgemm()),
        [ArrayD::from_elem(IxDyn(&[2, 3]), 0.5f32)],
    )
    .unwrap();
    run(
        "QuantizedModel::forward",
        vec![
            case("NaN", "NonFinite", || {
                model
                    .forward(&ArrayD::from_elem(IxDyn(&[1, 3]), f32::NAN))
                    .map(drop)
            }),
            case("infinity", "NonFinite", || model.forward(&inf2()).map(drop)),
            case("wrong features", "ShapeMismatch", || {
                model.forward(&ArrayD::zeros(IxDyn(&[1, 4]))).map(drop)
            }),
            case("scalar", "ShapeMismatch", || {
                model.forward(&ArrayD::zeros(IxDyn(&[]))).map(drop)
            }),
            case("empty batch", "Ok", || {
                model.forward(&ArrayD::zeros(IxDyn(&[0, 3]))).map(drop)
            }),
            case("huge values saturate", "Ok", || {
                model
                    .forward(&ArrayD::from_elem(IxDyn(&[1, 3]), f32::MAX))
                    .map(drop)
            }),
        ],
    );
}

#[test]
fn io_loaders() {
    let model = quantize_model(
        tiny_model(),
        &QConfigMap::new(QConfig::fbgemm()),
        [ArrayD::from_elem(IxDyn(&[2, 3]), 0.5f32)],
    )
    .unwrap();
    let bytes = model.to_bytes().unwrap();
    let sd_bytes = {
        let w: Vec<u8> = (0..9).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3, 3], &w).unwrap();
        safetensors::serialize([("fc.weight", view)], None).unwrap()
    };
    run(
        "io",
        vec![
            case("state_dict: not safetensors", "InvalidFile", || {
                ptq::io::parse_safetensors(b"garbage", "t").map(drop)
            }),
            case("state_dict: empty", "InvalidFile", || {
                ptq::io::parse_safetensors(b"", "t").map(drop)
            }),
            case("state_dict: truncated", "InvalidFile", || {
                ptq::io::parse_safetensors(&sd_bytes[..sd_bytes.len() - 1], "t").map(drop)
            }),
            case("state_dict: integer weights", "InvalidFile", || {
                let w = [0u8; 4];
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![1], &w)
                        .unwrap();
                let b = safetensors::serialize([("fc.weight", view)], None).unwrap();
                ptq::io::parse_safetensors(&b, "t").map(drop)
            }),
            case("state_dict: missing file", "InvalidFile", || {
                ptq::io::read_safetensors("/nonexistent/ptq.safetensors").map(drop)
            }),
            case(
                "state_dict: missing bias (strict)",
                "StateDictMismatch",
                || {
                    let sd = ptq::io::parse_safetensors(&sd_bytes, "t")?;
                    ptq::io::load_state_dict(&mut tiny_model(), &sd, true).map(drop)
                },
            ),
            case(
                "state_dict: wrong shape (lenient)",
                "StateDictMismatch",
                || {
                    let mut sd = ptq::io::parse_safetensors(&sd_bytes, "t")?;
                    sd.insert("fc.bias".into(), ArrayD::zeros(IxDyn(&[4])));
                    ptq::io::load_state_dict(&mut tiny_model(), &sd, false).map(drop)
                },
            ),
            case("qmodel: not safetensors", "InvalidFile", || {
                QuantizedModel::from_bytes(b"garbage").map(drop)
            }),
            case("qmodel: empty", "InvalidFile", || {
                QuantizedModel::from_bytes(b"").map(drop)
            }),
            case("qmodel: a state_dict", "InvalidFile", || {
                QuantizedModel::from_bytes(&sd_bytes).map(drop)
            }),
            case("qmodel: truncated", "InvalidFile", || {
                QuantizedModel::from_bytes(&bytes[..bytes.len() / 2]).map(drop)
            }),
            case("qmodel: missing file", "InvalidFile", || {
                QuantizedModel::load("/nonexistent/ptq.qmodel").map(drop)
            }),
            case("qmodel: huge header length", "InvalidFile", || {
                let mut b = bytes.clone();
                b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                QuantizedModel::from_bytes(&b).map(drop)
            }),
            case("qmodel: round trip", "Ok", || {
                QuantizedModel::from_bytes(&bytes).map(drop)
            }),
        ],
    );
}
