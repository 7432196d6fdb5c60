//! Quickstart: calibrate observers the way PyTorch does, see why calibration matters, and
//! compare observers and weight schemes by the error they leave (SQNR, in dB: higher is
//! better).
//!
//! Run with `cargo run --release --example quickstart`. No arguments, no network.

use ndarray::{Array1, Array2, ArrayD, Axis};
use ptq::qconfig::{ObserverSpec, QConfig};
use ptq::{fake_quantize, DType, QScheme, QuantError};

/// A small deterministic generator (xorshift64* and Box-Muller), so the demo needs no
/// extra dependency and prints the same figures every run.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// Post-ReLU activations with rare large outliers, as real conv outputs look.
fn activations(rng: &mut Rng, n: usize) -> ArrayD<f32> {
    Array1::from_iter((0..n).map(|_| {
        let x = rng.normal().max(0.0);
        if rng.uniform() < 0.001 {
            x * 20.0
        } else {
            x
        }
    }))
    .into_dyn()
}

/// Signal-to-quantization-noise ratio in dB.
fn sqnr(x: &ArrayD<f32>, xq: &ArrayD<f32>) -> f64 {
    let signal: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
    let noise: f64 = x
        .iter()
        .zip(xq)
        .map(|(&a, &b)| ((a - b) as f64).powi(2))
        .sum();
    10.0 * (signal / noise.max(f64::MIN_POSITIVE)).log10()
}

fn main() -> Result<(), QuantError> {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let calibration: Vec<ArrayD<f32>> = (0..8).map(|_| activations(&mut rng, 4096)).collect();
    let held_out = activations(&mut rng, 16384);

    println!("ptq quickstart: observers, calibration and weight schemes\n");

    // 1. The classic mistake: computing parameters before any calibration.
    let fbgemm = QConfig::fbgemm();
    let act = fbgemm.activation.build()?;
    match act.qparams() {
        Err(e) => println!("without calibration -> error: {e}\n"),
        Ok(_) => unreachable!("an uncalibrated observer never answers"),
    }

    // 2. Activation observers, calibrated on the same batches, judged on held-out data.
    println!(
        "{:<44} {:>10} {:>6} {:>10}",
        "activation observer", "scale", "zp", "SQNR dB"
    );
    let candidates = [
        (
            "MinMax, quint8 0..255",
            ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine),
        ),
        (
            "MinMax, quint8 0..127 (reduce_range)",
            ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine).with_reduce_range(true),
        ),
        (
            "MovingAverageMinMax, quint8 0..255",
            ObserverSpec::moving_average(DType::QUInt8, QScheme::PerTensorAffine),
        ),
        (
            "Histogram, quint8 0..255 (qnnpack)",
            QConfig::qnnpack().activation,
        ),
        ("Histogram, quint8 0..127 (fbgemm / x86)", fbgemm.activation),
    ];
    for (name, spec) in candidates {
        let mut obs = spec.build()?;
        for batch in &calibration {
            obs.observe(batch.view())?;
        }
        let qp = obs.qparams()?;
        let err = sqnr(&held_out, &fake_quantize(&held_out, &qp)?);
        println!(
            "{name:<44} {:>10.6} {:>6} {err:>10.2}",
            qp.scale(),
            qp.zero_point()
        );
    }

    // 3. Weights whose output channels have very different ranges (common after
    //    BatchNorm folding): per-tensor scales waste most levels on the small channels.
    let (out_ch, in_ch) = (64, 256);
    let w = Array2::from_shape_fn((out_ch, in_ch), |(o, _)| {
        rng.normal() * 10f32.powf(-2.0 + 3.0 * o as f32 / out_ch as f32)
    })
    .into_dyn();
    println!(
        "\n{:<44} {:>10}",
        "weight observer (64 x 256, unequal channels)", "SQNR dB"
    );
    for (name, spec) in [
        (
            "per-tensor symmetric qint8 (qnnpack)",
            QConfig::qnnpack().weight,
        ),
        ("per-channel symmetric qint8 (fbgemm / x86)", fbgemm.weight),
    ] {
        let mut obs = spec.build()?;
        obs.observe(w.view())?;
        let qp = obs.qparams()?;
        let wq = fake_quantize(&w, &qp)?;
        // Mean of per-channel SQNR: every output channel matters to the next layer.
        let per_channel: f64 = w
            .axis_iter(Axis(0))
            .zip(wq.axis_iter(Axis(0)))
            .map(|(a, b)| sqnr(&a.to_owned(), &b.to_owned()))
            .sum::<f64>()
            / out_ch as f64;
        println!("{name:<44} {per_channel:>10.2}");
    }
    Ok(())
}
