//! Loading a real PyTorch `state_dict` (tools/gen_state_dict_fixture.py, torch 2.15.0)
//! and the float forward pass against PyTorch's own output; every bad file and every
//! mismatch is an error, never a panic.

mod common;

use common::Fixture;
use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use ptq::io::{load_safetensors, load_state_dict, parse_safetensors, read_safetensors};
use ptq::nn::{fuse, BatchNorm2d, Conv2d, Layer, Linear, Pool2d, PoolKind, Sequential};
use ptq::QuantError;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The Rust twin of the Python model, with zero weights to be loaded.
fn tiny_cnn() -> Sequential {
    let conv = |o, i, k| Conv2d::new(Array4::zeros((o, i, k, k)), Some(Array1::zeros(o))).unwrap();
    let body = Sequential::new()
        .push(
            "0",
            Layer::Conv2d(
                Conv2d::new(Array4::zeros((8, 8, 3, 3)), None)
                    .unwrap()
                    .with_padding(1, 1),
            ),
        )
        .push("1", Layer::BatchNorm2d(BatchNorm2d::identity(8)))
        .push("2", Layer::ReLU)
        .push("3", Layer::Conv2d(conv(8, 8, 1)));
    Sequential::new()
        .push("conv1", Layer::Conv2d(conv(8, 3, 3).with_padding(1, 1)))
        .push("bn1", Layer::BatchNorm2d(BatchNorm2d::identity(8)))
        .push("relu1", Layer::ReLU)
        .push("pool", Layer::Pool2d(Pool2d::new(PoolKind::Max, 2, 2)))
        .push(
            "conv2",
            Layer::Conv2d(
                conv(8, 4, 3)
                    .with_stride(2, 2)
                    .with_padding(2, 2)
                    .with_dilation(2, 2)
                    .with_groups(2),
            ),
        )
        .push("relu2", Layer::ReLU6)
        .push(
            "res",
            Layer::Residual(Sequential::new().push("body", Layer::Sequential(body))),
        )
        .push("avg", Layer::AdaptiveAvgPool2d((1, 1)))
        .push("flatten", Layer::Flatten { start_dim: 1 })
        .push(
            "fc",
            Layer::Linear(Linear::new(Array2::zeros((10, 8)), Some(Array1::zeros(10))).unwrap()),
        )
}

fn max_rel_err(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn a_pytorch_state_dict_loads_and_the_float_model_matches_pytorch() {
    let io = Fixture::load("tiny_cnn.io.safetensors");
    let (x, y) = (io.f32("x"), io.f32("y"));
    let mut model = tiny_cnn();
    let report = load_safetensors(&mut model, fixture("tiny_cnn.f32.safetensors")).unwrap();
    assert_eq!(report.loaded.len(), 17);
    // The integer num_batches_tracked buffers are dropped while reading.
    assert!(report.ignored.is_empty() && report.missing.is_empty());
    let sd = read_safetensors(fixture("tiny_cnn.f32.safetensors")).unwrap();
    assert_eq!(sd.len(), 17);
    assert!(sd.keys().all(|k| !k.ends_with("num_batches_tracked")));
    let ours = model.forward(&x).unwrap();
    assert_eq!(ours.shape(), &[2, 10]);
    let err = max_rel_err(&ours, &y);
    assert!(
        err < 1e-5,
        "float forward differs from PyTorch by {err:e} (relative)"
    );

    // Fusing conv+bn+relu keeps the function.
    let fused = fuse(
        model,
        &[
            &["conv1", "bn1", "relu1"],
            &["res.body.0", "res.body.1", "res.body.2"],
        ],
    )
    .unwrap();
    let err = max_rel_err(&fused.forward(&x).unwrap(), &y);
    assert!(err < 1e-5, "fused model differs from PyTorch by {err:e}");
}

#[test]
fn half_precision_state_dicts_load_with_their_precision() {
    let io = Fixture::load("tiny_cnn.io.safetensors");
    let (x, y) = (io.f32("x"), io.f32("y"));
    for (file, tol) in [
        ("tiny_cnn.f16.safetensors", 5e-3),
        ("tiny_cnn.bf16.safetensors", 4e-2),
    ] {
        let mut model = tiny_cnn();
        load_safetensors(&mut model, fixture(file)).unwrap();
        let err = max_rel_err(&model.forward(&x).unwrap(), &y);
        assert!(err < tol && err > 0.0, "{file}: relative error {err:e}");
    }
}

#[test]
fn strict_loading_lists_every_missing_unexpected_and_misshaped_key() {
    let mut sd = read_safetensors(fixture("tiny_cnn.f32.safetensors")).unwrap();
    sd.remove("fc.bias");
    sd.remove("conv1.weight");
    sd.insert("fc2.weight".into(), ArrayD::zeros(IxDyn(&[3])));
    sd.insert("conv2.bias".into(), ArrayD::zeros(IxDyn(&[9])));
    let mut model = tiny_cnn();
    let err = load_state_dict(&mut model, &sd, true).unwrap_err();
    assert_eq!(
        err,
        QuantError::StateDictMismatch {
            missing: vec!["conv1.weight".into(), "fc.bias".into()],
            unexpected: vec!["fc2.weight".into()],
            mismatched: vec!["conv2.bias: model [8], file [9]".into()],
        }
    );
    // Nothing was written by the failed load.
    if let Some(Layer::Linear(fc)) = model.get("fc") {
        assert!(fc.weight.iter().all(|&v| v == 0.0));
    }
    // Non-strict: missing and unexpected keys are reported, shapes still must match.
    assert!(load_state_dict(&mut model, &sd, false).is_err());
    sd.insert("conv2.bias".into(), ArrayD::zeros(IxDyn(&[8])));
    let report = load_state_dict(&mut model, &sd, false).unwrap();
    assert_eq!(report.missing, vec!["conv1.weight", "fc.bias"]);
    assert!(report.ignored.contains(&"fc2.weight".to_string()));
}

#[test]
fn truncated_corrupt_and_foreign_files_are_errors_not_panics() {
    let bytes = std::fs::read(fixture("tiny_cnn.f32.safetensors")).unwrap();
    let mut errors = 0;
    // Every truncation.
    for len in (0..bytes.len()).step_by(7) {
        assert!(
            parse_safetensors(&bytes[..len], "t").is_err(),
            "truncated at {len}"
        );
        errors += 1;
    }
    // Flipped bytes all over the header and data: either an error or a parse whose
    // tensors all have the declared sizes; never a panic.
    for pos in (0..bytes.len()).step_by(3) {
        let mut b = bytes.clone();
        b[pos] ^= 0x5A;
        if parse_safetensors(&b, "t").is_err() {
            errors += 1;
        }
    }
    // A header that claims a huge length, and an integer weight.
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(parse_safetensors(&huge, "t").is_err());
    let ints = safetensors::serialize(
        [(
            "w",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![2], &[0u8; 8])
                .unwrap(),
        )],
        None,
    )
    .unwrap();
    let err = parse_safetensors(&ints, "ints").unwrap_err();
    assert!(err.to_string().contains("dtype I32"), "{err}");
    assert!(matches!(
        read_safetensors(fixture("does_not_exist.safetensors")),
        Err(QuantError::InvalidFile { .. })
    ));
    assert!(errors > bytes.len() / 7);
}
