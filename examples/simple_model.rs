//! The seed's SimpleModel, `Conv2d(3, 64, 3) -> ReLU -> flatten -> Linear(64, 10)`, built
//! in Rust, and its per-layer error (SQNR) when quantized the wrong way and the right way.
//!
//! Run with `cargo run --release --example simple_model`.

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use ptq::analysis::activation_sqnr;
use ptq::nn::{Conv2d, Layer, Linear, Sequential};
use ptq::qconfig::{ObserverSpec, QConfig, QConfigMap};
use ptq::workflow::{calibrate, convert, prepare};
use ptq::{DType, QuantError};

/// Deterministic uniform values in [-1, 1) (a tiny LCG, so no extra dependency).
fn uniform(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
fn simple_model(seed: &mut u64) -> Result<Sequential, QuantError> {
    let b1 = 1.0 / (27.0f32).sqrt();
    let b2 = 1.0 / (64.0f32).sqrt();
    let conv = Conv2d::new(
        Array4::from_shape_fn((64, 3, 3, 3), |_| uniform(seed) * b1),
        Some(Array1::from_shape_fn(64, |_| uniform(seed) * b1)),
    )?;
    let fc = Linear::new(
        Array2::from_shape_fn((10, 64), |_| uniform(seed) * b2),
        Some(Array1::from_shape_fn(10, |_| uniform(seed) * b2)),
    )?;
    Ok(Sequential::new()
        .push("quant", Layer::QuantStub)
        .push("conv", Layer::Conv2d(conv))
        .push("relu", Layer::ReLU)
        .push("flatten", Layer::Flatten { start_dim: 1 })
        .push("fc", Layer::Linear(fc))
        .push("dequant", Layer::DeQuantStub))
}

fn main() -> Result<(), QuantError> {
    let mut seed = 42;
    let model = simple_model(&mut seed)?;
    // Inputs: 3x3 RGB patches, 16 batches of 32.
    let batches: Vec<ArrayD<f32>> = (0..16)
        .map(|_| ArrayD::from_shape_fn(IxDyn(&[32, 3, 3, 3]), |_| uniform(&mut seed) * 2.0))
        .collect();
    let (calib, held_out) = batches.split_at(12);

    println!("SimpleModel: Conv2d(3, 64, 3) -> ReLU -> flatten -> Linear(64, 10)\n");

    // 1. prepare -> convert with no calibration: ptq refuses.
    let prepared = prepare(model.clone(), &QConfigMap::new(QConfig::fbgemm()))?;
    if let Err(e) = convert(prepared) {
        println!("1. convert without calibration -> {e}\n");
    }

    // 2. What PyTorch does instead: it warns and uses scale 1.0, zero point 0 for every
    //    activation. Reproduced here with fixed parameters, to show the damage.
    let pytorch_default = QConfig {
        activation: ObserverSpec::fixed(1.0, 0, DType::QUInt8),
        weight: QConfig::fbgemm().weight,
        ..QConfig::fbgemm()
    };
    let mut prepared = prepare(model.clone(), &QConfigMap::new(pytorch_default))?;
    calibrate(&mut prepared, calib, |_| {})?;
    let blind = convert(prepared)?;
    println!("2. what an uncalibrated PyTorch model computes (scale 1.0 everywhere):");
    println!("{}", activation_sqnr(&model, &blind, held_out)?);

    // 3. Calibrated: fbgemm's defaults (histogram activations, per-channel weights).
    let mut prepared = prepare(model.clone(), &QConfigMap::new(QConfig::fbgemm()))?;
    let report = calibrate(&mut prepared, calib, |_| {})?;
    let int8 = convert(prepared)?;
    println!(
        "3. calibrated on {} batches ({} samples), fbgemm defaults:",
        report.batches, report.samples
    );
    println!("{}", activation_sqnr(&model, &int8, held_out)?);
    Ok(())
}
