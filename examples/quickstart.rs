//! Quickstart: quantize a small CNN trained on handwritten digits to int8 with the
//! PyTorch flow, prepare -> calibrate -> convert, and compare it with the float model.
//!
//! Run with `cargo run --release --example quickstart`. No arguments, no network: the
//! data (UCI digits, CC BY 4.0) and the trained weights are in `examples/data/`.

#[path = "common/digits.rs"]
mod digits;

use std::time::Instant;

use ptq::qconfig::{QConfig, QConfigMap};
use ptq::workflow::{calibrate, convert, prepare};
use ptq::QuantError;

fn main() -> Result<(), QuantError> {
    let (train, test) = digits::load_data()?;
    let float_model = digits::trained_fused()?;
    let n = test.labels.len();
    let float_acc = digits::accuracy(&float_model.forward(&test.images)?, &test.labels);
    println!("digits CNN (PyTorch state_dict, conv+bn+relu fused), {n} test images");
    println!("float32 accuracy: {:.2}%\n", 100.0 * float_acc);

    // The classic mistake: convert right after prepare. PyTorch warns and uses scale 1.0;
    // ptq refuses and names every layer that saw no data.
    let prepared = prepare(float_model.clone(), &QConfigMap::new(QConfig::fbgemm()))?;
    match convert(prepared) {
        Err(e) => println!("convert without calibration -> error:\n  {e}\n"),
        Ok(_) => unreachable!("an uncalibrated model never converts"),
    }

    // The right way: calibrate on 8 batches of 64 training images, then convert.
    let batches = digits::calibration_batches(&train, 8, 64);
    println!(
        "{:<36} {:>9} {:>12} {:>12}",
        "model", "accuracy", "weights", "time/batch"
    );
    let t = Instant::now();
    let reps = 20;
    for _ in 0..reps {
        float_model.forward(&test.images)?;
    }
    let float_time = t.elapsed().as_secs_f64() / reps as f64;
    let float_bytes = float_model
        .children()
        .iter()
        .map(|(_, l)| ptq::nn::param_count(l) * 4)
        .sum::<usize>();
    println!(
        "{:<36} {:>8.2}% {:>10} B {:>9.3} ms",
        "float32",
        100.0 * float_acc,
        float_bytes,
        1e3 * float_time
    );
    for (name, qconfig) in [
        (
            "int8, per-tensor weights (MinMax)",
            QConfig::minmax_per_tensor(),
        ),
        (
            "int8, per-channel weights (MinMax)",
            QConfig::minmax_per_channel(),
        ),
        ("int8, fbgemm default (Histogram)", QConfig::fbgemm()),
    ] {
        let mut prepared = prepare(float_model.clone(), &QConfigMap::new(qconfig))?;
        calibrate(&mut prepared, &batches, |_| {})?;
        let int8 = convert(prepared)?;
        let acc = digits::accuracy(&int8.forward(&test.images)?, &test.labels);
        let t = Instant::now();
        for _ in 0..reps {
            int8.forward(&test.images)?;
        }
        let time = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{name:<36} {:>8.2}% {:>10} B {:>9.3} ms  ({:.2}x faster, {:.0}% less weight memory)",
            100.0 * acc,
            int8.weight_bytes(),
            1e3 * time,
            float_time / time,
            100.0 * (1.0 - int8.weight_bytes() as f64 / float_bytes as f64)
        );
    }
    println!("\n(times: one forward pass over the {n} test images, mean of {reps}; see `cargo bench` for careful figures)");
    Ok(())
}
