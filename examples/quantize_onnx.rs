//! Quantizes a float ONNX model with calibration data, from the command line.
//!
//! ```text
//! cargo run --release --example quantize_onnx -- model.onnx calib.safetensors|calib.npy \
//!     [--key NAME] [--batch 32] [--out model.qmodel] [--qdq model.qdq.onnx] \
//!     [--qconfig fbgemm|x86|qnnpack|onnxruntime|onnxruntime_entropy|onnxruntime_percentile] \
//!     [--qdq-weights-only model.w8.onnx]
//! ```
//!
//! With `--qdq`, the calibrated model is also written as QDQ ONNX (what ONNX Runtime runs
//! in int8), with the first calibration batch and ptq's int8 output on it beside it
//! (`<qdq>.x.npy`, `<qdq>.ptq.npy`) for `tools/check_qdq_ort.py`. With `--dump DIR`, every
//! int8 node's output on that batch is written to `DIR/<k>.npy` (dequantized, float32) and
//! listed in `DIR/index.tsv` (`k`, node name, scale, zero point) for
//! `tools/qdq_layerwise.py`, which compares them layer by layer with ONNX Runtime.
//!
//! Loads the model (`ptq::io::onnx::load_onnx`), fuses conv/linear + relu and add + relu,
//! prepares it with the chosen preset (default `onnxruntime`, which reproduces
//! `onnxruntime.quantization.quantize_static`'s MinMax parameters), calibrates on the
//! calibration tensor in batches (streaming: memory is bounded by the observers, not by the
//! data set), converts to int8, prints the calibration report and a per-layer table (SQNR of
//! each node's int8 output against the float model's on the first batch), and saves the int8
//! model. The calibration file is a `.npy` (float32, C order) or a `.safetensors` file
//! (`--key` picks the tensor; by default the only one, or the first of `calib`, `x`, `input`).

use std::collections::HashMap;
use std::path::Path;

use ndarray::{ArrayD, Axis, IxDyn};
use ptq::graph::{find_fusable, fuse, Op};
use ptq::io::onnx::load_onnx;
use ptq::io::read_safetensors;
use ptq::qconfig::{QConfig, QConfigMap};
use ptq::quant::{calibrate, convert, prepare};
use ptq::{QuantError, Result};

fn usage() -> ! {
    eprintln!(
        "usage: quantize_onnx MODEL.onnx CALIB.(safetensors|npy) [--key NAME] [--batch N] \
         [--qconfig fbgemm|x86|qnnpack|onnxruntime|onnxruntime_entropy|onnxruntime_percentile] [--out OUT.qmodel] [--qdq OUT.onnx] [--qdq-weights-only OUT.onnx] [--dump DIR]"
    );
    std::process::exit(2)
}

fn bad(path: &str, reason: impl Into<String>) -> QuantError {
    QuantError::InvalidFile {
        context: path.into(),
        reason: reason.into(),
    }
}

/// A minimal `.npy` reader: little-endian float32, C order, format versions 1 to 3.
fn read_npy(path: &str) -> Result<ArrayD<f32>> {
    let b = std::fs::read(path).map_err(|e| bad(path, e.to_string()))?;
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(bad(path, "not a .npy file"));
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(bad(path, format!("unsupported .npy version {v}"))),
    };
    let header = b
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad(path, "truncated header"))?;
    if !header.contains("'descr': '<f4'") {
        return Err(bad(
            path,
            format!("only little-endian float32 ('<f4') is read: {header}"),
        ));
    }
    if header.contains("'fortran_order': True") {
        return Err(bad(path, "Fortran order is not supported"));
    }
    let shape_str = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad(path, "no shape in header"))?;
    let shape: Vec<usize> = shape_str
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| bad(path, format!("bad shape {shape_str:?}")))
        })
        .collect::<Result<_>>()?;
    let data = &b[start + hlen..];
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(path, "shape overflows"))?;
    if data.len() != n * 4 {
        return Err(bad(
            path,
            format!("{} data bytes for shape {shape:?}", data.len()),
        ));
    }
    let v = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| bad(path, e.to_string()))
}

fn write_npy(path: &str, x: &ArrayD<f32>) -> Result<()> {
    let shape: Vec<String> = x.shape().iter().map(|d| d.to_string()).collect();
    let shape = if shape.len() == 1 {
        format!("{},", shape[0])
    } else {
        shape.join(", ")
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({shape}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    for v in x.iter() {
        b.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, b).map_err(|e| bad(path, e.to_string()))
}

fn read_calib(path: &str, key: Option<&str>) -> Result<ArrayD<f32>> {
    if path.ends_with(".npy") {
        return read_npy(path);
    }
    let mut t = read_safetensors(path)?;
    let name = match key {
        Some(k) => k.to_string(),
        None if t.len() == 1 => t.keys().next().cloned().unwrap_or_default(),
        None => ["calib", "x", "input"]
            .iter()
            .find(|k| t.contains_key(**k))
            .map(|k| k.to_string())
            .ok_or_else(|| bad(path, "several tensors: pick one with --key"))?,
    };
    t.remove(&name)
        .ok_or_else(|| bad(path, format!("no tensor {name:?}")))
}

fn sqnr_db(reference: &ArrayD<f32>, test: &ArrayD<f32>) -> f64 {
    let (mut s, mut e) = (0f64, 0f64);
    for (a, b) in reference.iter().zip(test.iter()) {
        s += (*a as f64).powi(2);
        e += (*a as f64 - *b as f64).powi(2);
    }
    if e == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (s / e).log10()
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        usage();
    }
    let (model_path, calib_path) = (&args[0], &args[1]);
    let mut opt: HashMap<&str, &str> = HashMap::new();
    let mut i = 2;
    while i < args.len() {
        match args[i].as_str() {
            k @ ("--key" | "--batch" | "--qconfig" | "--out" | "--qdq" | "--qdq-weights-only"
            | "--dump")
                if i + 1 < args.len() =>
            {
                opt.insert(k, &args[i + 1]);
                i += 2;
            }
            _ => usage(),
        }
    }
    let batch: usize = opt
        .get("--batch")
        .map(|b| b.parse().unwrap_or_else(|_| usage()))
        .unwrap_or(32)
        .max(1);
    let qconfig = match opt.get("--qconfig").copied().unwrap_or("onnxruntime") {
        "onnxruntime" => QConfig::onnxruntime(),
        "onnxruntime_entropy" => QConfig::onnxruntime_entropy(),
        "onnxruntime_percentile" => QConfig::onnxruntime_percentile(),
        other => QConfig::for_backend(other)?,
    };
    let t0 = std::time::Instant::now();
    let imp = load_onnx(model_path)?;
    println!(
        "{model_path}: {} nodes ({} constants folded, {} batch norms folded)",
        imp.graph.nodes().len(),
        imp.folded_constants,
        imp.folded_batch_norms
    );
    let groups = find_fusable(&imp.graph);
    let refs: Vec<Vec<&str>> = groups
        .iter()
        .map(|g| g.iter().map(String::as_str).collect())
        .collect();
    let slices: Vec<&[&str]> = refs.iter().map(Vec::as_slice).collect();
    let float = fuse(&imp.graph, &slices)?;
    println!("fused {} groups", groups.len());
    let calib = read_calib(calib_path, opt.get("--key").copied())?;
    if calib.ndim() == 0 || calib.shape()[0] == 0 {
        return Err(bad(calib_path, "empty calibration tensor"));
    }
    let mut prepared = prepare(float.clone(), &QConfigMap::new(qconfig))?;
    let report = calibrate(
        &mut prepared,
        calib.axis_chunks_iter(Axis(0), batch).map(|b| b.to_owned()),
    )?;
    println!("{report}");
    let qdq = match opt.get("--qdq") {
        Some(path) => {
            let bytes = prepared.to_qdq_onnx()?;
            std::fs::write(path, &bytes).map_err(|e| bad(path, e.to_string()))?;
            println!("wrote QDQ ONNX {path} ({} bytes)", bytes.len());
            Some(*path)
        }
        None => None,
    };
    if let Some(path) = opt.get("--qdq-weights-only") {
        let bytes = prepared.to_qdq_onnx_weights_only()?;
        std::fs::write(path, &bytes).map_err(|e| bad(path, e.to_string()))?;
        println!("wrote weights-only QDQ ONNX {path} ({} bytes)", bytes.len());
    }
    let q = convert(prepared)?;
    // per-layer error on the first batch
    let first = calib
        .axis_chunks_iter(Axis(0), batch)
        .next()
        .map(|b| b.to_owned())
        .ok_or_else(|| bad(calib_path, "no batch"))?;
    let mut float_out: HashMap<String, ArrayD<f32>> = HashMap::new();
    float.forward_with(std::slice::from_ref(&first), &mut |n, y| {
        float_out.insert(n.name.clone(), y.clone());
        Ok(())
    })?;
    let dump = opt.get("--dump").copied();
    if let Some(dir) = dump {
        std::fs::create_dir_all(dir).map_err(|e| bad(dir, e.to_string()))?;
    }
    let mut index = String::new();
    let mut dump_err: Option<QuantError> = None;
    println!("{:<40} {:>14} {:>10}", "node", "int8 output", "SQNR dB");
    q.forward_with(std::slice::from_ref(&first), &mut |name, v| {
        if let (Some(dir), ptq::quant::Value::Int8(qa)) = (dump, v) {
            let t = qa.nchw();
            let k = index.lines().count();
            index.push_str(&format!(
                "{k}\t{name}\t{:e}\t{}\n",
                t.scale(),
                t.zero_point()
            ));
            if let Err(e) = write_npy(&format!("{dir}/{k}.npy"), &v.to_f32()) {
                dump_err.get_or_insert(e);
            }
        }
        if let Some(r) = float_out.get(name) {
            let y = v.to_f32();
            if y.shape() == r.shape() {
                let kind = match v {
                    ptq::quant::Value::Float(_) => "float",
                    _ => "int8",
                };
                println!("{name:<40} {kind:>14} {:>10.2}", sqnr_db(r, &y));
            }
        }
    })?;
    if let Some(e) = dump_err {
        return Err(e);
    }
    if let Some(dir) = dump {
        let p = format!("{dir}/index.tsv");
        std::fs::write(&p, &index).map_err(|e| bad(&p, e.to_string()))?;
        // the float biases (after batch-norm folding), which ptq's int8 conv / linear add
        // in float (fbgemm) and the QDQ file can only hold rounded to int32
        let mut bias_index = String::new();
        for n in float.nodes() {
            let b = match &n.op {
                Op::Conv2d(c) | Op::ConvReLU2d(c) => c.bias.as_ref(),
                Op::Linear(l) | Op::LinearReLU(l) => l.bias.as_ref(),
                _ => None,
            };
            if let Some(b) = b {
                let k = bias_index.lines().count();
                bias_index.push_str(&format!("{k}\t{}\n", n.name));
                write_npy(&format!("{dir}/bias.{k}.npy"), &b.clone().into_dyn())?;
            }
        }
        let p = format!("{dir}/bias.tsv");
        std::fs::write(&p, &bias_index).map_err(|e| bad(&p, e.to_string()))?;
        println!(
            "dumped {} int8 node outputs to {dir}",
            index.lines().count()
        );
    }
    if let Some(path) = qdq {
        let y = q.forward(std::slice::from_ref(&first))?;
        write_npy(&format!("{path}.x.npy"), &first)?;
        write_npy(&format!("{path}.ptq.npy"), &y[0])?;
    }
    if let Some(out) = opt.get("--out") {
        q.save(out)?;
        println!(
            "saved {out} ({} bytes)",
            std::fs::metadata(Path::new(out))
                .map(|m| m.len())
                .unwrap_or(0)
        );
    }
    println!("done in {:.2?}", t0.elapsed());
    Ok(())
}
