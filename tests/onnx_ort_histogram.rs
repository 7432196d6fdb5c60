//! `OnnxRuntimeHistogramObserver` (presets `QConfig::onnxruntime_entropy()` /
//! `onnxruntime_percentile()`) against onnxruntime 1.32.0's own `HistogramCollector`
//! (`tools/gen_ort_histogram_fixtures.py`): thresholds, scales and zero points bit for bit
//! on the same data, all batches in one collect (quantize_static's default) or one collect
//! per batch (`CalibStridedMinMax=1`).

use std::path::PathBuf;

use ndarray::Axis;
use ptq::io::read_safetensors;
use ptq::observer::{Observer, OnnxRuntimeHistMethod, OnnxRuntimeHistogramObserver};
use ptq::qconfig::QConfig;
use ptq::{DType, QScheme, RangeConfig};

fn fixture() -> PathBuf {
    [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "fixtures",
        "onnx",
        "ort_histogram.safetensors",
    ]
    .iter()
    .collect()
}

fn configs() -> Vec<(&'static str, OnnxRuntimeHistMethod)> {
    use OnnxRuntimeHistMethod::*;
    vec![
        ("entropy_128_128", OnnxRuntimeHistMethod::ENTROPY),
        (
            "entropy_512_128",
            Entropy {
                num_bins: 512,
                num_quantized_bins: 128,
            },
        ),
        (
            "percentile_2048_99.999_sym",
            OnnxRuntimeHistMethod::PERCENTILE,
        ),
        (
            "percentile_2048_99.9_sym",
            Percentile {
                num_bins: 2048,
                percentile: 99.9,
                symmetric: true,
            },
        ),
        (
            "percentile_2048_99.9_asym",
            Percentile {
                num_bins: 2048,
                percentile: 99.9,
                symmetric: false,
            },
        ),
    ]
}

#[test]
fn thresholds_scales_and_zero_points_equal_onnxruntimes_collector() {
    let fx = read_safetensors(fixture()).unwrap();
    let cfg = RangeConfig::new(
        DType::QUInt8,
        QScheme::PerTensorAffine,
        false,
        None,
        f32::EPSILON,
    )
    .unwrap();
    let (mut checked, mut mismatches) = (0, Vec::new());
    for name in ["normal", "relu", "heavy", "shifted", "tiny"] {
        let data = &fx[&format!("data/{name}")];
        for (cname, method) in configs() {
            for one in [true, false] {
                let mut obs = OnnxRuntimeHistogramObserver::new(cfg, method).unwrap();
                if one {
                    obs.observe(data.view()).unwrap();
                } else {
                    for b in data.axis_iter(Axis(0)) {
                        obs.observe(b.into_dyn()).unwrap();
                    }
                }
                let key = format!("{name}/{cname}/{}", if one { "one" } else { "per_batch" });
                let want = &fx[&key];
                let (lo, hi) = obs.threshold().unwrap();
                let qp = obs.qparams().unwrap();
                let got = [lo, hi, qp.scale(), qp.zero_point() as f32];
                checked += 1;
                if got
                    .iter()
                    .zip(want.iter())
                    .any(|(a, b)| a.to_bits() != b.to_bits())
                {
                    mismatches.push(format!("{key}: ours {got:?}, ORT {want}"));
                }
            }
        }
    }
    assert_eq!(checked, 50);
    assert!(mismatches.is_empty(), "{mismatches:#?}");
}

#[test]
fn presets_build_the_histogram_observers() {
    for (q, m) in [
        (
            QConfig::onnxruntime_entropy(),
            OnnxRuntimeHistMethod::ENTROPY,
        ),
        (
            QConfig::onnxruntime_percentile(),
            OnnxRuntimeHistMethod::PERCENTILE,
        ),
    ] {
        let o = q.activation.build().unwrap();
        let h = o
            .as_any()
            .downcast_ref::<OnnxRuntimeHistogramObserver>()
            .unwrap();
        assert_eq!(h.method(), m);
        assert!(!o.is_calibrated());
        assert!(o.qparams().is_err());
    }
    let cfg = RangeConfig::new(
        DType::QUInt8,
        QScheme::PerTensorAffine,
        false,
        None,
        f32::EPSILON,
    )
    .unwrap();
    let bad = |m| OnnxRuntimeHistogramObserver::new(cfg, m).is_err();
    assert!(bad(OnnxRuntimeHistMethod::Percentile {
        num_bins: 2048,
        percentile: 101.0,
        symmetric: true
    }));
    assert!(bad(OnnxRuntimeHistMethod::Entropy {
        num_bins: 64,
        num_quantized_bins: 128
    }));
    let mut o = OnnxRuntimeHistogramObserver::new(cfg, OnnxRuntimeHistMethod::ENTROPY).unwrap();
    let nan = ndarray::arr1(&[1.0f32, f32::NAN]).into_dyn();
    assert!(o.observe(nan.view()).is_err());
}
