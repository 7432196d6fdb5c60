//! Peak memory of the digits CNN in float32 and in int8, for the README's "Memory"
//! section. Measure each mode in its own process with GNU time:
//!
//! ```text
//! cargo build --release --example memory
//! target/release/examples/memory save /tmp/digits.qmodel   # quantize once, save
//! /usr/bin/time -v target/release/examples/memory none            # binary + data only
//! /usr/bin/time -v target/release/examples/memory float           # + float model, 20 runs
//! /usr/bin/time -v target/release/examples/memory int8 /tmp/digits.qmodel  # + int8 model
//! ```
//!
//! `Maximum resident set size` is the peak RSS. Every mode loads the data set first (the
//! 500 test images, and the training split that `load_data` reads with them), so `none`
//! is the baseline the two models add to. The float model is loaded from its PyTorch
//! state_dict; the int8 one from the file `save` wrote, with no float weights and no
//! calibration in that process.

#[path = "common/digits.rs"]
mod digits;

use ptq::nn::quantized::QuantizedModel;
use ptq::QuantError;

fn main() -> Result<(), QuantError> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("none");
    let path = args.get(2).cloned().unwrap_or("/tmp/digits.qmodel".into());
    let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(20);
    let (train, test) = digits::load_data()?;
    match mode {
        "save" => {
            let int8 = ptq::workflow::quantize_model(
                digits::trained_fused()?,
                &ptq::qconfig::QConfigMap::new(ptq::qconfig::QConfig::fbgemm()),
                digits::calibration_batches(&train, 8, 64),
            )?;
            int8.save(&path)?;
            println!(
                "saved {path}: {} bytes on disk; weights {} bytes int8, {} bytes float",
                std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
                int8.weight_bytes(),
                int8.float_weight_bytes()
            );
        }
        "float" => {
            let model = digits::trained_fused()?;
            let bytes: usize = model
                .children()
                .iter()
                .map(|(_, l)| ptq::nn::param_count(l) * 4)
                .sum();
            let mut acc = 0.0;
            for _ in 0..reps {
                acc = digits::accuracy(&model.forward(&test.images)?, &test.labels);
            }
            println!(
                "float: weights {bytes} bytes, accuracy {:.2}%, {reps} runs of {} images",
                100.0 * acc,
                test.labels.len()
            );
        }
        "int8" => {
            let model = QuantizedModel::load(&path)?;
            let mut acc = 0.0;
            for _ in 0..reps {
                acc = digits::accuracy(&model.forward(&test.images)?, &test.labels);
            }
            println!(
                "int8: weights {} bytes, accuracy {:.2}%, {reps} runs of {} images",
                model.weight_bytes(),
                100.0 * acc,
                test.labels.len()
            );
        }
        _ => println!(
            "none: data only ({} + {} images)",
            train.labels.len(),
            test.labels.len()
        ),
    }
    Ok(())
}
