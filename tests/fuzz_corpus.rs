//! Replays the fuzzers' seed corpus (`fuzz/corpus/`) and every input a fuzzer ever
//! crashed on (`tests/fuzz_regressions/<target>/`) through the same entry points as
//! `fuzz/src/lib.rs`, in the normal test run. Seeds must load; regressions must not panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, Array4, ArrayD, Dimension, IxDyn};
use ptq::nn::quantized::QuantizedModel;
use ptq::nn::{BatchNorm2d, Conv2d, Layer, Linear, Sequential};

fn files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut v: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd.filter_map(|e| Some(e.ok()?.path())).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// As `ptq_fuzz::small_model`.
fn small_model() -> Sequential {
    Sequential::new()
        .push(
            "conv",
            Layer::Conv2d(
                Conv2d::new(Array4::zeros((4, 3, 3, 3)), Some(Array1::zeros(4)))
                    .unwrap()
                    .with_padding(1, 1),
            ),
        )
        .push("bn", Layer::BatchNorm2d(BatchNorm2d::identity(4)))
        .push("relu", Layer::ReLU)
        .push("flatten", Layer::Flatten { start_dim: 1 })
        .push(
            "fc",
            Layer::Linear(Linear::new(Array2::zeros((5, 64)), Some(Array1::zeros(5))).unwrap()),
        )
}

/// As `ptq_fuzz::state_dict`; returns whether the file parsed.
fn state_dict(data: &[u8]) -> bool {
    let Ok(sd) = ptq::io::parse_safetensors(data, "fuzz") else {
        return false;
    };
    for strict in [true, false] {
        let mut model = small_model();
        if ptq::io::load_state_dict(&mut model, &sd, strict).is_ok() {
            let _ = model.forward(&ArrayD::from_elem(IxDyn(&[2, 3, 4, 4]), 0.5f32));
        }
    }
    true
}

/// As `ptq_fuzz::qmodel`; returns whether the file loaded.
fn qmodel(data: &[u8]) -> bool {
    let Ok(model) = QuantizedModel::from_bytes(data) else {
        return false;
    };
    for shape in [
        &[1usize, 3, 9, 9][..],
        &[2, 1, 8, 8],
        &[2, 64],
        &[1, 3, 5, 4],
    ] {
        let x = ArrayD::from_shape_fn(IxDyn(shape), |i| {
            (i.slice().iter().sum::<usize>() as f32 * 0.37).sin()
        });
        let _ = model.forward(&x);
    }
    let _ = model.to_bytes();
    true
}

#[test]
fn seed_corpus_loads() {
    let q = files("fuzz/corpus/qmodel");
    assert!(q.len() >= 3, "{q:?}");
    for f in q {
        assert!(qmodel(&std::fs::read(&f).unwrap()), "{}", f.display());
    }
    let s = files("fuzz/corpus/state_dict");
    assert!(s.len() >= 3, "{s:?}");
    for f in s {
        assert!(state_dict(&std::fs::read(&f).unwrap()), "{}", f.display());
    }
}

#[test]
fn fuzzer_crashes_stay_fixed() {
    for (dir, target) in [
        ("tests/fuzz_regressions/qmodel", qmodel as fn(&[u8]) -> bool),
        ("tests/fuzz_regressions/state_dict", state_dict),
    ] {
        for f in files(dir) {
            let data = std::fs::read(&f).unwrap();
            assert!(
                catch_unwind(AssertUnwindSafe(|| target(&data))).is_ok(),
                "{} panics",
                f.display()
            );
        }
    }
}
