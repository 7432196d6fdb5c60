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

// ---------------------------------------------------------------------------------------
// Graphs: Graph / GraphBuilder, PreparedGraph (prepare, calibrate), QuantizedGraph
// (forward, ptq-qmodel/2 files). Each row names the variant AND words its message must
// hold (the node, the shape or the value), so an error that names nothing fails.

type NamedCase<'a> = (
    &'a str,
    Box<dyn Fn() -> ptq::Result<()> + 'a>,
    &'a str,
    Vec<&'a str>,
);

fn ncase<'a>(
    name: &'a str,
    want: &'a str,
    says: &[&'a str],
    f: impl Fn() -> ptq::Result<()> + 'a,
) -> NamedCase<'a> {
    (name, Box::new(f), want, says.to_vec())
}

fn run_named(family: &str, cases: Vec<NamedCase<'_>>) {
    let mut failures = Vec::new();
    for (name, f, want, says) in &cases {
        match catch_unwind(AssertUnwindSafe(f)) {
            Err(_) => failures.push(format!("{family}/{name}: PANICKED")),
            Ok(Ok(())) if *want == "Ok" => {}
            Ok(Ok(())) => failures.push(format!("{family}/{name}: expected {want}, got Ok")),
            Ok(Err(e)) => {
                let got = outcome(Err(e.clone()));
                let msg = e.to_string();
                if got != *want {
                    failures.push(format!(
                        "{family}/{name}: expected {want}, got {got}: {msg}"
                    ));
                } else if let Some(w) = says.iter().find(|w| !msg.contains(**w)) {
                    failures.push(format!("{family}/{name}: message lacks {w:?}: {msg}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// quant -> conv 3x3 (p1) -> relu -> adaptive pool -> flatten -> fc -> dequant, on
/// `[N, 3, 6, 6]`.
fn small_graph() -> ptq::Graph {
    use ptq::graph::{Dim, GraphBuilder};
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 3.into(), 6.into(), 6.into()])
        .unwrap();
    let q = g.quant_stub("quant", x).unwrap();
    let w = Array4::from_shape_fn((4, 3, 3, 3), |(a, b, c, d)| {
        ((a * 27 + b * 9 + c * 3 + d) as f32 * 0.37).sin()
    });
    let conv = Conv2d::new(w, Some(Array1::zeros(4)))
        .unwrap()
        .with_padding(1, 1);
    let c = g.conv2d("conv", q, conv).unwrap();
    let r = g.relu("relu", c).unwrap();
    let p = g.adaptive_avg_pool2d("pool", r, (1, 1)).unwrap();
    let f = g.flatten("flat", p, 1, -1).unwrap();
    let fc = Linear::new(Array2::from_elem((2, 4), 0.3), None).unwrap();
    let l = g.linear("fc", f, fc).unwrap();
    let d = g.dequant_stub("dequant", l).unwrap();
    g.output(d).unwrap();
    g.build().unwrap()
}

fn img(shape: &[usize]) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(shape), |i| {
        (ndarray::Dimension::slice(&i).iter().sum::<usize>() as f32 * 0.37).sin()
    })
}

fn with_value(shape: &[usize], v: f32) -> ArrayD<f32> {
    let mut x = img(shape);
    let at: Vec<usize> = shape.iter().map(|d| d / 2).collect();
    x[IxDyn(&at)] = v;
    x
}

fn calibrated_graph() -> ptq::QuantizedGraph {
    let mut p = ptq::quant::prepare(small_graph(), &QConfigMap::new(QConfig::fbgemm())).unwrap();
    ptq::quant::calibrate(
        &mut p,
        [img(&[2, 3, 6, 6]), img(&[2, 3, 6, 6]).mapv(|v| -v)],
    )
    .unwrap();
    ptq::quant::convert(p).unwrap()
}

#[test]
fn graph_builder_shapes() {
    use ptq::graph::{Dim, GraphBuilder, NearestRule, Pool2dSpec, UpsampleMode, UpsampleSpec};
    const BIG: usize = 1 << 20; // 2^60 elements per item: legal, never allocated
    let big = || {
        let mut g = GraphBuilder::new();
        let x = g
            .input("x", &[Dim::Batch, BIG.into(), BIG.into(), BIG.into()])
            .unwrap();
        (g, x)
    };
    let zero = || {
        let mut g = GraphBuilder::new();
        let x = g
            .input("x", &[Dim::Batch, 3.into(), 0.into(), 0.into()])
            .unwrap();
        (g, x)
    };
    let nearest = UpsampleMode::Nearest(NearestRule::Floor);
    run_named(
        "GraphBuilder",
        vec![
            // Shape arithmetic overflow: refused where the shape is made, naming it.
            ncase(
                "input over isize::MAX elements",
                "ShapeMismatch",
                &["x", "1099511627776"],
                || {
                    GraphBuilder::new()
                        .input(
                            "x",
                            &[Dim::Batch, (1usize << 40).into(), (1usize << 40).into()],
                        )
                        .map(drop)
                },
            ),
            ncase(
                "broadcast product overflows",
                "ShapeMismatch",
                &["mul", "[N, 1099511627776, 1099511627776]"],
                || {
                    let mut g = GraphBuilder::new();
                    let a = g.input("a", &[Dim::Batch, (1usize << 40).into(), 1.into()])?;
                    let b = g.input("b", &[Dim::Batch, 1.into(), (1usize << 40).into()])?;
                    g.mul("mul", a, b).map(drop)
                },
            ),
            ncase(
                "concat sum overflows",
                "ShapeMismatch",
                &["cat", "16777216"],
                || {
                    let (mut g, x) = big();
                    g.concat("cat", &[x; 16], 1).map(drop)
                },
            ),
            ncase(
                "reshape target product overflows",
                "ShapeMismatch",
                &["r", "4611686018427387904"],
                || {
                    let (mut g, x) = big();
                    g.reshape("r", x, &[0, 1 << 62, 1 << 62]).map(drop)
                },
            ),
            ncase("flatten of a big (legal) shape", "Ok", &[], || {
                let (mut g, x) = big();
                let f = g.flatten("f", x, 1, -1)?;
                assert_eq!(g.shape(f)?.0[1], Dim::Fixed(1 << 60));
                Ok(())
            }),
            ncase(
                "upsample to a huge size",
                "UnsupportedConfig",
                &["up", "2^28"],
                || {
                    let (mut g, x) = big();
                    g.upsample("up", x, UpsampleSpec::scale(1e30, 1e30, nearest))
                        .map(drop)
                },
            ),
            ncase(
                "upsample NaN scale",
                "UnsupportedConfig",
                &["up", "NaN"],
                || {
                    let (mut g, x) = zero();
                    g.upsample("up", x, UpsampleSpec::scale(f32::NAN, 2.0, nearest))
                        .map(drop)
                },
            ),
            ncase(
                "pool window usize::MAX",
                "ShapeMismatch",
                &["mp", "18446744073709551615"],
                || {
                    let (mut g, x) = big();
                    g.max_pool2d("mp", x, Pool2dSpec::new(usize::MAX, 3))
                        .map(drop)
                },
            ),
            ncase(
                "pool stride 0",
                "UnsupportedConfig",
                &["mp", "stride (0, 1)"],
                || {
                    let (mut g, x) = big();
                    g.max_pool2d("mp", x, Pool2dSpec::new(2, 3).with_stride(0, 1))
                        .map(drop)
                },
            ),
            ncase(
                "slice end usize::MAX",
                "ShapeMismatch",
                &["s", "18446744073709551615"],
                || {
                    let (mut g, x) = big();
                    g.slice("s", x, 1, 5, usize::MAX).map(drop)
                },
            ),
            ncase(
                "conv channels differ",
                "ShapeMismatch",
                &["c", "[N, 1048576, 1048576, 1048576]"],
                || {
                    let (mut g, x) = big();
                    g.conv2d("c", x, Conv2d::new(Array4::zeros((1, 1, 1, 1)), None)?)
                        .map(drop)
                },
            ),
            // Empty spatial sizes: PyTorch's float conv/pool refuse them ("Kernel size can't be
            // greater than actual input size"), so do we; mean / adaptive pool over an empty
            // window are legal (NaN in PyTorch; see graph_forward_and_calibration).
            ncase(
                "conv on 0x0",
                "ShapeMismatch",
                &["c", "[N, 3, 0, 0]"],
                || {
                    let (mut g, x) = zero();
                    g.conv2d("c", x, Conv2d::new(Array4::zeros((1, 3, 1, 1)), None)?)
                        .map(drop)
                },
            ),
            ncase("max pool on 0x0", "ShapeMismatch", &["p", "0x0"], || {
                let (mut g, x) = zero();
                g.max_pool2d("p", x, Pool2dSpec::new(1, 1)).map(drop)
            }),
            ncase("mean on 0x0", "Ok", &[], || {
                let (mut g, x) = zero();
                g.mean("m", x, &[2, 3], false).map(drop)
            }),
            ncase(
                "mean repeated dims",
                "UnsupportedConfig",
                &["m", "[2, 2]"],
                || {
                    let (mut g, x) = zero();
                    g.mean("m", x, &[2, 2], false).map(drop)
                },
            ),
            ncase("duplicate name", "UnsupportedConfig", &["\"x\""], || {
                let (mut g, x) = zero();
                g.relu("x", x).map(drop)
            }),
            ncase("no output", "UnsupportedConfig", &["output"], || {
                let (g, _) = zero();
                g.build().map(drop)
            }),
        ],
    );
}

#[test]
fn graph_forward_and_calibration() {
    use ptq::graph::{Dim, GraphBuilder};
    let g = small_graph();
    let nan_out = |r: ptq::Result<Vec<ArrayD<f32>>>| -> ptq::Result<()> {
        let y = r?;
        assert!(y[0].iter().all(|v| v.is_nan()), "{y:?}");
        Ok(())
    };
    run_named(
        "Graph::forward",
        vec![
            ncase("empty batch", "Ok", &[], || {
                let y = g.forward(&[img(&[0, 3, 6, 6])])?;
                assert_eq!(y[0].shape(), &[0, 2]);
                Ok(())
            }),
            ncase("no input", "ShapeMismatch", &["1 input", "0"], || {
                g.forward(&[]).map(drop)
            }),
            ncase("two inputs", "ShapeMismatch", &["1 input", "2"], || {
                g.forward(&[img(&[1, 3, 6, 6]), img(&[1, 3, 6, 6])])
                    .map(drop)
            }),
            ncase(
                "wrong channels",
                "ShapeMismatch",
                &["x", "[N, 3, 6, 6]", "[1, 2, 6, 6]"],
                || g.forward(&[img(&[1, 2, 6, 6])]).map(drop),
            ),
            ncase("wrong rank", "ShapeMismatch", &["x", "[1, 3, 6]"], || {
                g.forward(&[img(&[1, 3, 6])]).map(drop)
            }),
            ncase(
                "empty spatial",
                "ShapeMismatch",
                &["x", "[1, 3, 0, 0]"],
                || g.forward(&[img(&[1, 3, 0, 0])]).map(drop),
            ),
            // PyTorch propagates NaN through conv, ReLU, pooling and linear: so do we.
            ncase("NaN propagates", "Ok", &[], || {
                nan_out(g.forward(&[with_value(&[1, 3, 6, 6], f32::NAN)]))
            }),
            // torch.mean over an empty window is NaN.
            ncase("mean over 0x0 is NaN", "Ok", &[], || {
                let mut b = GraphBuilder::new();
                let x = b.input("x", &[Dim::Batch, 3.into(), 0.into(), 0.into()])?;
                let m = b.mean("m", x, &[2, 3], false)?;
                b.output(m)?;
                let y = b.build()?.forward(&[img(&[2, 3, 0, 0])])?;
                assert_eq!(y[0].shape(), &[2, 3]);
                assert!(y[0].iter().all(|v| v.is_nan()), "{y:?}");
                Ok(())
            }),
        ],
    );
    let prepared = || ptq::quant::prepare(small_graph(), &QConfigMap::new(QConfig::fbgemm()));
    run_named(
        "PreparedGraph",
        vec![
            // PyTorch's MinMaxObserver turns NaN into a NaN scale, its HistogramObserver
            // raises "torch.histc: range of [-nan, -nan] is not finite": we refuse any
            // NaN/Inf batch, naming it, and record nothing of it.
            ncase(
                "NaN calibration batch",
                "NonFinite",
                &["calibration batch 1", "1 NaN"],
                || {
                    let mut p = prepared()?;
                    ptq::quant::calibrate(
                        &mut p,
                        [img(&[1, 3, 6, 6]), with_value(&[1, 3, 6, 6], f32::NAN)],
                    )
                    .map(drop)
                },
            ),
            ncase(
                "Inf calibration batch",
                "NonFinite",
                &["calibration batch 0", "1 infinite"],
                || {
                    let mut p = prepared()?;
                    ptq::quant::calibrate(&mut p, [with_value(&[1, 3, 6, 6], f32::INFINITY)])
                        .map(drop)
                },
            ),
            ncase(
                "NaN batch records nothing",
                "UncalibratedLayers",
                &["quant", "conv", "fc"],
                || {
                    let mut p = prepared()?;
                    assert!(
                        ptq::quant::calibrate(&mut p, [with_value(&[1, 3, 6, 6], f32::NAN)])
                            .is_err()
                    );
                    ptq::quant::convert(p).map(drop)
                },
            ),
            ncase(
                "only empty batches",
                "EmptyCalibration",
                &["no non-empty batch"],
                || {
                    let mut p = prepared()?;
                    ptq::quant::calibrate(&mut p, [img(&[0, 3, 6, 6])]).map(drop)
                },
            ),
            ncase(
                "no batches",
                "EmptyCalibration",
                &["no non-empty batch"],
                || {
                    let mut p = prepared()?;
                    ptq::quant::calibrate(&mut p, Vec::<ArrayD<f32>>::new()).map(drop)
                },
            ),
            ncase(
                "wrong batch shape",
                "ShapeMismatch",
                &["x", "[1, 3, 5, 6]"],
                || {
                    let mut p = prepared()?;
                    ptq::quant::calibrate(&mut p, [img(&[1, 3, 5, 6])]).map(drop)
                },
            ),
            ncase(
                "wrong input count",
                "ShapeMismatch",
                &["1 input", "2"],
                || {
                    let mut p = prepared()?;
                    ptq::quant::calibrate_inputs(
                        &mut p,
                        [vec![img(&[1, 3, 6, 6]), img(&[1, 3, 6, 6])]],
                    )
                    .map(drop)
                },
            ),
            ncase(
                "convert uncalibrated",
                "UncalibratedLayers",
                &["quant", "conv", "fc"],
                || ptq::quant::convert(prepared()?).map(drop),
            ),
            ncase("empty batch among real ones", "Ok", &[], || {
                let mut p = prepared()?;
                let r = ptq::quant::calibrate(&mut p, [img(&[0, 3, 6, 6]), img(&[2, 3, 6, 6])])?;
                assert_eq!((r.batches, r.samples), (1, 2));
                Ok(())
            }),
        ],
    );
}

#[test]
fn quantized_graph_forward() {
    let q = calibrated_graph();
    run_named(
        "QuantizedGraph::forward",
        vec![
            ncase("empty batch", "Ok", &[], || {
                let y = q.forward(&[img(&[0, 3, 6, 6])])?;
                assert_eq!(y[0].shape(), &[0, 2]);
                Ok(())
            }),
            // quantize_per_tensor turns NaN into quant_max and +-inf into the range ends in
            // PyTorch (a finite, wrong answer): we refuse, naming the input and the count.
            ncase("NaN input", "NonFinite", &["x", "1 NaN"], || {
                q.forward(&[with_value(&[1, 3, 6, 6], f32::NAN)]).map(drop)
            }),
            ncase("Inf input", "NonFinite", &["x", "1 infinite"], || {
                q.forward(&[with_value(&[1, 3, 6, 6], f32::NEG_INFINITY)])
                    .map(drop)
            }),
            ncase("huge finite values saturate", "Ok", &[], || {
                let y = q.forward(&[img(&[1, 3, 6, 6]).mapv(|v| v * f32::MAX)])?;
                assert!(y[0].iter().all(|v| v.is_finite()));
                Ok(())
            }),
            ncase("no input", "ShapeMismatch", &["1 input", "0"], || {
                q.forward(&[]).map(drop)
            }),
            ncase("two inputs", "ShapeMismatch", &["1 input", "2"], || {
                q.forward(&[img(&[1, 3, 6, 6]), img(&[1, 3, 6, 6])])
                    .map(drop)
            }),
            ncase(
                "wrong channels",
                "ShapeMismatch",
                &["conv", "3 input channels"],
                || q.forward(&[img(&[1, 2, 6, 6])]).map(drop),
            ),
            ncase(
                "wrong rank",
                "ShapeMismatch",
                &["conv", "rank-4", "[1, 3, 6]"],
                || q.forward(&[img(&[1, 3, 6])]).map(drop),
            ),
            ncase(
                "empty spatial",
                "ShapeMismatch",
                &["conv", "kernel (3, 3)"],
                || q.forward(&[img(&[1, 3, 0, 0])]).map(drop),
            ),
            // Like PyTorch's quantized modules, the int8 graph takes any spatial size its
            // ops accept (the adaptive pool makes the head size-independent).
            ncase("other spatial size", "Ok", &[], || {
                let y = q.forward(&[img(&[1, 3, 9, 7])])?;
                assert_eq!(y[0].shape(), &[1, 2]);
                Ok(())
            }),
            ncase("forward_quantized NaN", "NonFinite", &["x"], || {
                q.forward_quantized(&[with_value(&[1, 3, 6, 6], f32::NAN)])
                    .map(drop)
            }),
            ncase("profile wrong count", "ShapeMismatch", &["1 input"], || {
                q.profile(&[]).map(drop)
            }),
            ncase("unknown node", "UnsupportedConfig", &["nope"], || {
                q.weight("nope").map(drop)
            }),
        ],
    );
}

/// Re-serializes a `ptq-qmodel/2` file with its metadata edited by `f`.
fn edit_meta(
    bytes: &[u8],
    f: impl FnOnce(&mut std::collections::HashMap<String, String>),
) -> Vec<u8> {
    use safetensors::SafeTensors;
    let st = SafeTensors::deserialize(bytes).unwrap();
    let (_, md) = SafeTensors::read_metadata(bytes).unwrap();
    let mut meta = md.metadata().clone().unwrap_or_default();
    f(&mut meta);
    let mut t = st.tensors();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize(t, Some(meta)).unwrap()
}

/// A raw safetensors file: `header` JSON after its length, then `data`.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn quantized_graph_files() {
    use ptq::QuantizedGraph;
    let q = calibrated_graph();
    let bytes = q.to_bytes().unwrap();
    // a Sequential model saved by an earlier ptq (the step-list format)
    let seq = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/legacy_v1_second.qmodel"
    ))
    .unwrap();
    // a Sequential model saved now: its graph's file
    let model = quantize_model(
        tiny_model(),
        &QConfigMap::new(QConfig::fbgemm()),
        [ArrayD::from_elem(IxDyn(&[2, 3]), 0.5f32)],
    )
    .unwrap()
    .to_bytes()
    .unwrap();
    let meta = |k: &'static str, v: &'static str| {
        let b = edit_meta(&bytes, |m| {
            m.insert(k.into(), v.into());
        });
        move || QuantizedGraph::from_bytes(&b).map(drop)
    };
    run_named(
        "QuantizedGraph files",
        vec![
            ncase("round trip", "Ok", &[], || {
                QuantizedGraph::from_bytes(&bytes).map(drop)
            }),
            ncase("empty", "InvalidFile", &["bytes"], || {
                QuantizedGraph::from_bytes(b"").map(drop)
            }),
            ncase(
                "garbage",
                "InvalidFile",
                &["not a valid safetensors"],
                || QuantizedGraph::from_bytes(b"garbage!garbage").map(drop),
            ),
            ncase(
                "missing file",
                "InvalidFile",
                &["/nonexistent/g.qmodel"],
                || QuantizedGraph::load("/nonexistent/g.qmodel").map(drop),
            ),
            ncase(
                "a ptq-qmodel/1 file",
                "InvalidFile",
                &["ptq-qmodel/1", "QuantizedModel::load"],
                || QuantizedGraph::from_bytes(&seq).map(drop),
            ),
            ncase("a QuantizedModel file", "Ok", &[], || {
                QuantizedGraph::from_bytes(&model).map(drop)
            }),
            ncase(
                "a newer format",
                "InvalidFile",
                &["ptq-qmodel/3"],
                meta("format", "ptq-qmodel/3"),
            ),
            ncase(
                "header length u64::MAX",
                "InvalidFile",
                &["safetensors"],
                || {
                    let mut b = bytes.clone();
                    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                    QuantizedGraph::from_bytes(&b).map(drop)
                },
            ),
            ncase(
                "header length past the end",
                "InvalidFile",
                &["safetensors"],
                || {
                    let mut b = bytes.clone();
                    b[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
                    QuantizedGraph::from_bytes(&b).map(drop)
                },
            ),
            // Huge declared lengths are checked against the bytes present before anything
            // is allocated.
            ncase(
                "tensor declares 2^80 bytes",
                "InvalidFile",
                &["safetensors"],
                || {
                    let h = r#"{"0:w":{"dtype":"I8","shape":[1099511627776,1099511627776],"data_offsets":[0,4]}}"#;
                    QuantizedGraph::from_bytes(&raw_file(h, &[0; 4])).map(drop)
                },
            ),
            ncase(
                "tensor offsets past the data",
                "InvalidFile",
                &["safetensors"],
                || {
                    let h = r#"{"0:w":{"dtype":"I8","shape":[4],"data_offsets":[0,4000000000]}}"#;
                    QuantizedGraph::from_bytes(&raw_file(h, &[0; 4])).map(drop)
                },
            ),
            ncase(
                "node count 10^18",
                "InvalidFile",
                &["nodes", "1000000000000000000"],
                meta("nodes", "1000000000000000000"),
            ),
            ncase(
                "node count not a number",
                "InvalidFile",
                &["nodes"],
                meta("nodes", "many"),
            ),
            ncase(
                "output past the nodes",
                "InvalidFile",
                &["outputs", "99"],
                meta("outputs", "99"),
            ),
            ncase(
                "no output",
                "InvalidFile",
                &["no output"],
                meta("outputs", ""),
            ),
            ncase(
                "input is not an Input node",
                "InvalidFile",
                &["quant", "Input"],
                meta("inputs", "1"),
            ),
            ncase(
                "node reads a later node",
                "InvalidFile",
                &["2:inputs", "5"],
                meta("2:inputs", "5"),
            ),
            ncase(
                "node reads itself",
                "InvalidFile",
                &["2:inputs"],
                meta("2:inputs", "2"),
            ),
            ncase(
                "wrong input count",
                "InvalidFile",
                &["relu", "the node has 2"],
                {
                    let i = q.find("relu").unwrap();
                    let b = edit_meta(&bytes, |m| {
                        m.insert(format!("{i}:inputs"), format!("{},{}", i - 1, i - 1));
                    });
                    move || QuantizedGraph::from_bytes(&b).map(drop)
                },
            ),
            ncase("unknown op kind", "InvalidFile", &["conv", "\"Bogus\""], {
                let i = q.find("conv").unwrap();
                let b = edit_meta(&bytes, |m| {
                    m.insert(format!("{i}:kind"), "Bogus".into());
                });
                move || QuantizedGraph::from_bytes(&b).map(drop)
            }),
            ncase("stray tensor", "InvalidFile", &["zz"], || {
                use safetensors::SafeTensors;
                let st = SafeTensors::deserialize(&bytes).unwrap();
                let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
                let mut t = st.tensors();
                let extra = [1u8; 4];
                t.push((
                    "zz".into(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::I8, vec![4], &extra)
                        .unwrap(),
                ));
                let b = safetensors::serialize(t, md.metadata().clone()).unwrap();
                QuantizedGraph::from_bytes(&b).map(drop)
            }),
        ],
    );

    // Every truncation of the file is an error, never a panic or a partial model.
    let mut loaded = 0;
    for n in 0..bytes.len() {
        match catch_unwind(AssertUnwindSafe(|| QuantizedGraph::from_bytes(&bytes[..n]))) {
            Err(_) => panic!("truncation to {n} bytes panics"),
            Ok(Ok(_)) => loaded += 1,
            Ok(Err(e)) => assert_eq!(outcome(Err(e)), "InvalidFile", "truncation to {n}"),
        }
    }
    assert_eq!(loaded, 0, "a truncated file loaded");

    // Every metadata value replaced by hostile text: an error that names the node (index or
    // name) or the key, or a model that still runs without panicking.
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta_map = md.metadata().clone().unwrap();
    let mut keys: Vec<&String> = meta_map.keys().collect();
    keys.sort();
    let (mut errors, mut ok) = (0, 0);
    for k in keys {
        for v in [
            "",
            "-1",
            "18446744073709551615",
            "1099511627776",
            "NaN",
            "inf",
            "0",
            "x",
            "0,0",
            "1e30",
        ] {
            let b = edit_meta(&bytes, |m| {
                m.insert(k.clone(), v.into());
            });
            let r = catch_unwind(AssertUnwindSafe(|| QuantizedGraph::from_bytes(&b)))
                .unwrap_or_else(|_| panic!("{k} = {v:?} panics the loader"));
            match r {
                Err(e) => {
                    errors += 1;
                    let msg = e.to_string();
                    let names = match k.split_once(':') {
                        Some((i, _)) => {
                            let name = &meta_map[&format!("{i}:name")];
                            msg.contains(&format!("node {i}"))
                                || msg.contains(name.as_str())
                                || msg.contains(k.as_str())
                        }
                        // A global key may contradict another one, which is then named.
                        None => {
                            msg.contains(k.as_str())
                                || msg.contains("output")
                                || msg.contains("metadata `")
                        }
                    };
                    assert!(
                        names,
                        "{k} = {v:?}: the error names neither node nor key: {msg}"
                    );
                }
                Ok(g) => {
                    // Any text is a valid node name.
                    ok += usize::from(!k.ends_with(":name"));
                    let x = img(&[1, 3, 6, 6]);
                    let _ = catch_unwind(AssertUnwindSafe(|| g.forward(std::slice::from_ref(&x))))
                        .unwrap_or_else(|_| panic!("{k} = {v:?} loads, then panics in forward"));
                }
            }
        }
    }
    // 398 errors; 32 hostile values that still make sense load (an index list "0,0",
    // out_scale "1e30", a flag "0", ...) and ran above without panicking.
    assert!(errors > 10 * ok, "{errors} errors, {ok} loads");
}
