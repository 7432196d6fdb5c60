//! Bad input never panics and never yields silently wrong parameters: each case gets its
//! own typed error that says what and where.

use ndarray::{array, Array1, ArrayD, IxDyn};
use ptq::observer::{MinMaxObserver, Observer};
use ptq::qconfig::{ObserverKind, ObserverSpec, QConfig};
use ptq::{dequantize, quantize, DType, QParams, QScheme, QuantError};

fn all_specs() -> Vec<ObserverSpec> {
    vec![
        ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine),
        ObserverSpec::min_max(DType::QInt8, QScheme::PerChannelSymmetric { axis: 0 }),
        ObserverSpec::moving_average(DType::QUInt8, QScheme::PerTensorAffine),
        ObserverSpec::moving_average(DType::QInt8, QScheme::PerChannelAffine { axis: 1 }),
        QConfig::fbgemm().activation,
    ]
}

#[test]
fn every_observer_refuses_qparams_before_calibration_and_names_itself() {
    for spec in all_specs() {
        let obs = spec.build().unwrap();
        match obs.qparams() {
            Err(QuantError::Uncalibrated { context }) => assert_eq!(context, obs.kind()),
            other => panic!("{}: expected Uncalibrated, got {other:?}", obs.kind()),
        }
        assert!(!obs.is_calibrated());
    }
}

#[test]
fn empty_batches_are_ignored_and_leave_the_observer_uncalibrated() {
    for spec in all_specs() {
        let mut obs = spec.build().unwrap();
        let empty = ArrayD::<f32>::zeros(IxDyn(&[0, 3]));
        obs.observe(empty.view()).unwrap();
        assert!(
            matches!(obs.qparams(), Err(QuantError::Uncalibrated { .. })),
            "{}",
            obs.kind()
        );
    }
}

#[test]
fn nan_and_infinity_are_errors_with_counts_and_record_nothing() {
    for spec in all_specs() {
        let mut obs = spec.build().unwrap();
        let x = array![[1.0f32, f32::NAN, 2.0], [f32::INFINITY, 0.5, f32::NAN]].into_dyn();
        let err = obs.observe(x.view()).unwrap_err();
        assert_eq!(
            err,
            QuantError::NonFinite {
                context: obs.kind().into(),
                nan: 2,
                inf: 1,
                total: 6
            },
            "{}",
            obs.kind()
        );
        assert!(
            !obs.is_calibrated(),
            "{}: the poisoned batch must not be recorded",
            obs.kind()
        );
        assert!(err
            .to_string()
            .contains("2 NaN and 1 infinite values out of 6"));
    }
}

#[test]
fn per_channel_shape_errors_name_both_shapes() {
    let spec = ObserverSpec::min_max(DType::QInt8, QScheme::PerChannelSymmetric { axis: 1 });
    let mut obs = spec.build().unwrap();
    obs.observe(ArrayD::<f32>::ones(IxDyn(&[2, 4])).view())
        .unwrap();
    let err = obs
        .observe(ArrayD::<f32>::ones(IxDyn(&[2, 5])).view())
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("4 channels on axis 1") && msg.contains("5 channels"),
        "{msg}"
    );
    let err = obs
        .observe(Array1::<f32>::ones(3).into_dyn().view())
        .unwrap_err();
    assert!(matches!(err, QuantError::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("[3]"));
}

#[test]
fn merging_different_kinds_or_configurations_is_refused() {
    let mut a = ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine)
        .build()
        .unwrap();
    let b = ObserverSpec::moving_average(DType::QUInt8, QScheme::PerTensorAffine)
        .build()
        .unwrap();
    assert!(matches!(
        a.merge(b.as_ref()),
        Err(QuantError::ObserverMismatch { .. })
    ));
    let c = ObserverSpec::min_max(DType::QInt8, QScheme::PerTensorAffine)
        .build()
        .unwrap();
    let err = a.merge(c.as_ref()).unwrap_err();
    assert!(err.to_string().contains("configurations differ"), "{err}");
    let avg = |c| ObserverSpec {
        kind: ObserverKind::MovingAverageMinMax {
            averaging_constant: c,
        },
        ..ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine)
    };
    let mut m = avg(0.01).build().unwrap();
    assert!(m.merge(avg(0.5).build().unwrap().as_ref()).is_err());
}

#[test]
fn invalid_parameters_and_ranges_are_refused() {
    // Custom ranges PyTorch refuses, and one it accepts but cannot store.
    for (dt, lo, hi) in [
        (DType::QUInt8, 1, 255),
        (DType::QUInt8, 0, 0),
        (DType::QInt8, -200, 100),
        (DType::QUInt8, 0, 300),
        (DType::QInt8, 10, -10),
    ] {
        let spec = ObserverSpec::min_max(dt, QScheme::PerTensorAffine).with_range(lo, hi);
        assert!(
            matches!(spec.build(), Err(QuantError::InvalidQuantRange { .. })),
            "{dt} [{lo}, {hi}]"
        );
    }
    for eps in [0.0, -1.0, f32::NAN, 1e-45] {
        let spec = ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine).with_eps(eps);
        assert!(
            matches!(spec.build(), Err(QuantError::UnsupportedConfig { .. })),
            "eps {eps}"
        );
    }
    // Per-channel parameters that do not fit the tensor.
    let qp = QParams::new(
        QScheme::PerChannelAffine { axis: 2 },
        DType::QUInt8,
        (0, 255),
        vec![0.1, 0.2],
        vec![0, 0],
    )
    .unwrap();
    let err = quantize(&array![[1.0f32, 2.0]], &qp).unwrap_err();
    assert!(err.to_string().contains("2 channels on axis 2"), "{err}");
    // Integers that cannot have come from these parameters.
    let qp = QParams::new(
        QScheme::PerTensorAffine,
        DType::QUInt8,
        (0, 127),
        vec![0.1],
        vec![0],
    )
    .unwrap();
    let err = dequantize(&array![5, 200], &qp).unwrap_err();
    assert_eq!(
        err,
        QuantError::QuantizedOutOfRange {
            context: "dequantize".into(),
            value: 200,
            quant_min: 0,
            quant_max: 127
        }
    );
    // Mismatched lengths.
    assert!(matches!(
        QParams::new(
            QScheme::PerTensorAffine,
            DType::QInt8,
            (-128, 127),
            vec![0.1, 0.2],
            vec![0, 0]
        ),
        Err(QuantError::ShapeMismatch { .. })
    ));
}

#[test]
fn a_range_too_wide_for_f32_is_an_error_not_an_infinite_scale() {
    let mut obs = MinMaxObserver::default();
    obs.observe(array![-3.0e38f32, 3.0e38].into_dyn().view())
        .unwrap();
    assert!(matches!(
        obs.qparams(),
        Err(QuantError::InvalidScale { .. })
    ));
}

#[test]
fn errors_can_be_relabelled_with_the_layer_name() {
    let obs = MinMaxObserver::default();
    let err = obs.qparams().unwrap_err().in_context("features.3.conv");
    assert_eq!(
        err.to_string(),
        "features.3.conv: observer saw no data; run calibration batches through it before computing quantization parameters"
    );
}
