//! Rescuing a model that static int8 quantization breaks: the digits CNN rescaled so its
//! per-channel ranges span four orders of magnitude (the same float function; such ranges
//! are common after batch-norm folding).
//!
//! Shows the default per-tensor flow's accuracy, the sensitivity table, the accuracy after
//! cross-layer equalization and after automatic mixed precision, and writes two SVG
//! pictures (per-layer weight SQNR before/after equalization; an activation histogram with
//! the clipping ranges observers choose) to the system's temporary directory.
//!
//! Run with `cargo run --release --example rescue` (no arguments, no network).

#[path = "common/digits.rs"]
mod digits;

use std::fmt::Write as _;

use ndarray::ArrayD;
use ptq::analysis::{
    absorb_high_bias, activation_sqnr, auto_mixed_precision, correct_bias, equalize, sensitivity,
    weight_sqnr, LayerReport, MixedPrecisionOptions,
};
use ptq::nn::Sequential;
use ptq::observer::{
    EntropyObserver, HistogramObserver, MseObserver, Observer, PercentileObserver,
};
use ptq::qconfig::{QConfig, QConfigMap};
use ptq::workflow::quantize_model;
use ptq::QuantError;

fn main() -> Result<(), QuantError> {
    let (train, test) = digits::load_data()?;
    let calib = digits::calibration_batches(&train, 8, 64);
    let eval = vec![test.images.clone()];
    let labels = test.labels.clone();
    let metric = |outs: &[ArrayD<f32>]| digits::accuracy(&outs[0], &labels);
    let acc = |m: &ptq::nn::quantized::QuantizedModel| -> Result<f64, QuantError> {
        Ok(digits::accuracy(&m.forward(&test.images)?, &test.labels))
    };

    let original = digits::trained_fused()?;
    let model = digits::unequal_ranges(&original);
    let float_acc = digits::accuracy(&model.forward(&test.images)?, &test.labels);
    let orig_acc = digits::accuracy(&original.forward(&test.images)?, &test.labels);
    // Per-tensor weights (PyTorch's qnnpack default: histogram activations, per-tensor
    // symmetric qint8 weights).
    let qconfig = QConfig::qnnpack();
    let map = QConfigMap::new(qconfig);

    println!(
        "digits CNN with per-channel ranges rescaled over 1e-2..1e2 ({} test images)",
        labels.len()
    );
    println!(
        "float accuracy: {:.2}% (the original model: {:.2}%)\n",
        100.0 * float_acc,
        100.0 * orig_acc
    );

    let default = quantize_model(model.clone(), &map, &calib)?;
    let default_acc = acc(&default)?;
    let fbgemm_acc = acc(&quantize_model(
        model.clone(),
        &QConfigMap::new(QConfig::fbgemm()),
        &calib,
    )?)?;

    // 1. Where it hurts.
    println!("Per-layer weight SQNR, per-tensor weights:");
    let w_before = weight_sqnr(&model, &map)?;
    println!("{w_before}");
    println!("Sensitivity (metric: top-1 accuracy):");
    let sens = sensitivity(&model, qconfig, &calib, &eval, metric)?;
    println!("{sens}");

    // 2. Cross-layer equalization.
    let (equalized, report) = equalize(&model, 20)?;
    println!("Cross-layer equalization:");
    println!("{report}");
    let max_diff = model
        .forward(&test.images)?
        .iter()
        .zip(equalized.forward(&test.images)?.iter())
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("float function unchanged: max |logit difference| = {max_diff:.2e}");
    let w_after = weight_sqnr(&equalized, &map)?;
    let eq_int8 = quantize_model(equalized.clone(), &map, &calib)?;
    let eq_acc = acc(&eq_int8)?;
    println!("\nPer-layer activation SQNR on the test set, default flow:");
    println!("{}", activation_sqnr(&model, &default, &eval)?);
    println!("... and after equalization:");
    println!("{}", activation_sqnr(&equalized, &eq_int8, &eval)?);
    let (absorbed, moved) = absorb_high_bias(&equalized, &calib)?;
    let moved_total: usize = moved
        .iter()
        .map(|a| a.absorbed.iter().filter(|&&c| c > 0.0).count())
        .sum();
    println!("high-bias absorption: {moved_total} channel(s) had a floor above 0 to move");
    let abs_acc = acc(&quantize_model(absorbed.clone(), &map, &calib)?)?;
    let (corrected, _) = correct_bias(&absorbed, &map, &calib)?;
    let bc_acc = acc(&quantize_model(corrected, &map, &calib)?)?;

    // 3. Automatic mixed precision, without and with equalization allowed.
    let plain_opts = MixedPrecisionOptions {
        allowed_drop: 0.01,
        try_equalization: false,
        try_bias_correction: false,
        ..Default::default()
    };
    let amp_plain = auto_mixed_precision(&model, qconfig, &calib, &eval, metric, &plain_opts)?;
    println!("\nAutomatic mixed precision, no pre-processing (target: float - 1 point):");
    println!("{amp_plain}");
    let amp = auto_mixed_precision(
        &model,
        qconfig,
        &calib,
        &eval,
        metric,
        &MixedPrecisionOptions::default(),
    )?;
    println!("Automatic mixed precision, equalization and bias correction allowed:");
    println!("{amp}");

    println!("{:<62} {:>9}", "model", "accuracy");
    println!("{:<62} {:>8.2}%", "float", 100.0 * float_acc);
    println!(
        "{:<62} {:>8.2}%",
        "int8, default per-tensor flow (qnnpack qconfig)",
        100.0 * default_acc
    );
    println!(
        "{:<62} {:>8.2}%",
        "int8, fbgemm qconfig (per-channel weights)",
        100.0 * fbgemm_acc
    );
    println!(
        "{:<62} {:>8.2}%",
        "int8 after cross-layer equalization",
        100.0 * eq_acc
    );
    println!(
        "{:<62} {:>8.2}%",
        "  + high-bias absorption",
        100.0 * abs_acc
    );
    println!("{:<62} {:>8.2}%", "  + bias correction", 100.0 * bc_acc);
    println!(
        "{:<62} {:>8.2}%",
        format!(
            "int8 mixed precision, float: [{}]",
            amp_plain.float_layers.join(", ")
        ),
        100.0 * amp_plain.metric
    );
    println!(
        "{:<62} {:>8.2}%",
        format!(
            "int8 mixed precision ({}), float: [{}]",
            amp.variant,
            amp.float_layers.join(", ")
        ),
        100.0 * amp.metric
    );

    // Pictures.
    let dir = std::env::temp_dir();
    let bars = dir.join("ptq_rescue_weight_sqnr.svg");
    std::fs::write(&bars, sqnr_bars(&w_before, &w_after)).map_err(|e| io_err(&bars, e))?;
    let hist = dir.join("ptq_rescue_histogram.svg");
    std::fs::write(&hist, histogram_svg(&original, &calib)?).map_err(|e| io_err(&hist, e))?;
    println!("\nwrote {} and {}", bars.display(), hist.display());
    Ok(())
}

fn io_err(path: &std::path::Path, e: std::io::Error) -> QuantError {
    QuantError::InvalidFile {
        context: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Grouped bars: worst-channel weight SQNR per layer, before and after equalization.
fn sqnr_bars(before: &LayerReport, after: &LayerReport) -> String {
    let (w, h, left, bottom) = (640.0, 320.0, 50.0, 40.0);
    let n = before.layers.len().max(1) as f64;
    let top = 60.0f64;
    let y =
        |db: f64| h - bottom - (db.clamp(-10.0, top) + 10.0) / (top + 10.0) * (h - bottom - 30.0);
    let mut s = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='11'>\n");
    let _ = writeln!(s, "<text x='{}' y='16' text-anchor='middle' font-size='13'>Worst-channel weight SQNR (dB), per-tensor int8: before (red) / after (green) equalization</text>", w / 2.0);
    for db in [0.0, 20.0, 40.0, 60.0] {
        let _ = writeln!(s, "<line x1='{left}' x2='{}' y1='{:.1}' y2='{:.1}' stroke='#ddd'/><text x='{}' y='{:.1}' text-anchor='end'>{db}</text>", w - 10.0, y(db), y(db), left - 4.0, y(db) + 4.0);
    }
    let slot = (w - left - 10.0) / n;
    for (i, l) in before.layers.iter().enumerate() {
        let x0 = left + slot * i as f64 + slot * 0.15;
        let bw = slot * 0.33;
        let a = l.worst_channel_sqnr_db.unwrap_or(l.sqnr_db);
        let b = after
            .get(&l.path)
            .map_or(a, |r| r.worst_channel_sqnr_db.unwrap_or(r.sqnr_db));
        for (k, (v, color)) in [(a, "#d62728"), (b, "#2ca02c")].iter().enumerate() {
            let yt = y(*v);
            let _ = writeln!(s, "<rect x='{:.1}' y='{:.1}' width='{:.1}' height='{:.1}' fill='{color}'><title>{}: {:.1} dB</title></rect>", x0 + bw * k as f64, yt.min(y(-10.0)), bw, (y(-10.0) - yt).max(0.0), l.path, v);
        }
        let _ = writeln!(
            s,
            "<text x='{:.1}' y='{}' text-anchor='middle'>{}</text>",
            x0 + bw,
            h - bottom + 16.0,
            l.path
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The histogram of conv2's output on the calibration data, with the clipping range each
/// observer chooses.
fn histogram_svg(model: &Sequential, calib: &[ArrayD<f32>]) -> Result<String, QuantError> {
    let mut obs: Vec<(&str, &str, Box<dyn Observer>)> = vec![
        (
            "min/max",
            "#000",
            Box::new(PercentileObserver::new(
                QConfig::qnnpack().activation.range_config()?,
                100.0,
                2048,
            )?),
        ),
        (
            "histogram (PyTorch L2)",
            "#1f77b4",
            Box::new(HistogramObserver::default()),
        ),
        (
            "percentile 99.9",
            "#ff7f0e",
            Box::new(PercentileObserver::new(
                QConfig::qnnpack().activation.range_config()?,
                99.9,
                2048,
            )?),
        ),
        (
            "entropy (KL)",
            "#2ca02c",
            Box::new(EntropyObserver::default()),
        ),
        ("MSE", "#d62728", Box::new(MseObserver::default())),
    ];
    let mut counts = vec![0.0f64; 64];
    let mut values = Vec::new();
    for x in calib {
        model.forward_with_hook(x, &mut |path, y| {
            if path == "conv2" {
                values.push(y.clone());
            }
            Ok(())
        })?;
    }
    for v in &values {
        for (_, _, o) in obs.iter_mut() {
            o.observe(v.view())?;
        }
    }
    let hi = values
        .iter()
        .flat_map(|v| v.iter())
        .fold(0.0f32, |m, &x| m.max(x))
        .max(1e-6);
    for v in &values {
        for &x in v.iter() {
            let i = ((x / hi * 64.0) as usize).min(63);
            counts[i] += 1.0;
        }
    }
    let (w, h, left, bottom) = (640.0, 300.0, 40.0, 30.0);
    let peak = counts.iter().copied().fold(1.0f64, f64::max).ln();
    let mut s = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='11'>\n");
    let _ = writeln!(s, "<text x='{}' y='16' text-anchor='middle' font-size='13'>conv2 output on the calibration data (log counts) and each observer's clipping range</text>", w / 2.0);
    let bw = (w - left - 10.0) / 64.0;
    for (i, c) in counts.iter().enumerate() {
        let bh = if *c > 0.0 {
            (c.ln() + 1.0) / (peak + 1.0) * (h - bottom - 40.0)
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "<rect x='{:.1}' y='{:.1}' width='{:.1}' height='{:.1}' fill='#bbb'/>",
            left + bw * i as f64,
            h - bottom - bh,
            bw * 0.9,
            bh
        );
    }
    for (k, (name, color, o)) in obs.iter().enumerate() {
        let qp = o.qparams()?;
        let clip = (qp.quant_max() - qp.zero_point()) as f32 * qp.scale();
        let x = left + (clip / hi).min(1.0) as f64 * (w - left - 10.0);
        let _ = writeln!(s, "<line x1='{x:.1}' x2='{x:.1}' y1='30' y2='{}' stroke='{color}' stroke-width='2'/><text x='{:.1}' y='{}' fill='{color}' text-anchor='end'>{name}: {clip:.2}</text>", h - bottom, w - 12.0, 40 + 14 * k);
    }
    let _ = writeln!(
        s,
        "<text x='{left}' y='{}'>0</text><text x='{}' y='{}' text-anchor='end'>{hi:.2}</text>",
        h - 10.0,
        w - 10.0,
        h - 10.0
    );
    s.push_str("</svg>\n");
    Ok(s)
}
