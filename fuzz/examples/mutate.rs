//! A stable-Rust fuzzer for ptq's loaders, for machines without nightly/libFuzzer.
//!
//! ```text
//! cargo run --release --manifest-path fuzz/Cargo.toml --example mutate -- <state_dict|qmodel|onnx|qgraph|graph> <seconds> [seed]
//! ```
//!
//! Mutates the seed files of `fuzz/corpus/<target>/` with a deterministic PRNG (byte and
//! bit flips, interesting values, truncation, insertion, deletion, splicing, and
//! structure-aware edits that re-serialize a valid safetensors file with one metadata value
//! or key changed or one tensor dropped), runs the target under `catch_unwind`, and writes
//! every input that panicked to `fuzz/artifacts/<target>/crash-<n>`. Prints the number of
//! executions and crashes; exits 1 if anything crashed.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "1024",
    "1025",
    "65535",
    "4294967296",
    "18446744073709551615",
    "-9223372036854775808",
    "NaN",
    "inf",
    "-inf",
    "1e-45",
    "1e38",
    "3.4e38",
    "0.0",
    "-0.0",
    "255",
    "256",
    "-129",
    "127",
    "0,0",
    "1,1",
    "0,1",
    "1024,1024",
    "1025,1",
    "0.1,0",
    "0.1,256",
    "NaN,3",
    "none",
    "",
    "a,b",
    ",",
    "channels_last",
    "contiguous",
    "float",
    "int8",
    "max",
    "avg",
    "Conv2d",
    "Linear",
    "Residual",
    "Float",
    "Sequential",
    "BatchNorm2d",
    "ptq-qmodel/1",
    "ptq-qmodel/2",
    "Input",
    "Quantize",
    "Dequantize",
    "Mean",
    "Concat",
    "Upsample",
    "Permute",
    "Slice",
    "0,1",
    "1,0",
    "0,0,0",
    "5",
    "99",
];

/// Re-serializes a valid safetensors file with one metadata entry changed, removed or
/// added, or one tensor dropped or replaced by another dtype/shape of tensor.
fn structured(bytes: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};
    let st = SafeTensors::deserialize(bytes).ok()?;
    let (_, md) = SafeTensors::read_metadata(bytes).ok()?;
    let mut meta: HashMap<String, String> = md.metadata().clone().unwrap_or_default();
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut keys: Vec<String> = meta.keys().cloned().collect();
    keys.sort();
    let owned: Vec<u8>;
    match rng.below(6) {
        0 | 1 if !keys.is_empty() => {
            let k = keys[rng.below(keys.len())].clone();
            let v = VALUES[rng.below(VALUES.len())].to_string();
            meta.insert(k, v);
        }
        2 if !keys.is_empty() => {
            let k = keys[rng.below(keys.len())].clone();
            let mut v = meta.get(&k).cloned().unwrap_or_default().into_bytes();
            if !v.is_empty() {
                let i = rng.below(v.len());
                v[i] = b"0123456789,-.eN"[rng.below(15)];
            }
            meta.insert(k, String::from_utf8_lossy(&v).into_owned());
        }
        3 if !keys.is_empty() => {
            let k = keys[rng.below(keys.len())].clone();
            meta.remove(&k);
        }
        4 if !tensors.is_empty() => {
            let i = rng.below(tensors.len());
            tensors.remove(i);
        }
        _ if !tensors.is_empty() => {
            let i = rng.below(tensors.len());
            let dtype = [Dtype::F32, Dtype::I8, Dtype::I32, Dtype::U8, Dtype::F16][rng.below(5)];
            let dims = rng.below(5);
            let shape: Vec<usize> = (0..dims)
                .map(|_| [0, 1, 2, 3, 4, 8, 64][rng.below(7)])
                .collect();
            let n: usize = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            owned = (0..n).map(|_| rng.next() as u8).collect();
            let name = tensors[i].0.clone();
            tensors[i] = (name, TensorView::new(dtype, shape, &owned).ok()?);
        }
        _ => return None,
    }
    safetensors::serialize(tensors, Some(meta)).ok()
}

fn mutate(seed: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    if rng.below(3) == 0 {
        if let Some(b) = structured(seed, rng) {
            return b;
        }
    }
    let mut b = seed.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        if b.is_empty() {
            b.push(rng.next() as u8);
        }
        let n = b.len();
        // Half of the edits land in the header, where the structure is.
        let header =
            8 + u64::from_le_bytes(b.get(..8).and_then(|s| s.try_into().ok()).unwrap_or([0; 8]))
                .min(n as u64) as usize;
        let pos = if rng.below(2) == 0 {
            rng.below(header.min(n))
        } else {
            rng.below(n)
        };
        match rng.below(8) {
            0 => b[pos] ^= 1 << rng.below(8),
            1 => b[pos] = rng.next() as u8,
            2 => b[pos] = [0u8, 0xff, 0x7f, 0x80, b'0', b'9', b',', b'"'][rng.below(8)],
            3 => b.truncate(pos),
            4 => {
                let len = rng.below(16).min(n - pos);
                b.drain(pos..pos + len);
            }
            5 => {
                let ins: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
                b.splice(pos..pos, ins);
            }
            6 if !other.is_empty() => {
                let start = rng.below(other.len());
                let len = rng.below(64).min(other.len() - start);
                let end = (pos + len).min(n);
                b.splice(pos..end, other[start..start + len].iter().copied());
            }
            _ => {
                // The header length itself.
                let v = [
                    0u64,
                    1,
                    2,
                    (n as u64).saturating_sub(8),
                    n as u64,
                    u64::MAX,
                    100_000_001,
                ][rng.below(7)];
                if n >= 8 {
                    b[..8].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    b
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let target = args.get(1).map(String::as_str).unwrap_or("qmodel");
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let seed: u64 = args
        .get(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    let run: fn(&[u8]) -> bool = match target {
        "state_dict" => ptq_fuzz::state_dict,
        "qmodel" => ptq_fuzz::qmodel,
        "onnx" => ptq_fuzz::onnx,
        "qgraph" => ptq_fuzz::qgraph,
        "graph" => ptq_fuzz::graph,
        t => {
            eprintln!("unknown target {t:?}; use state_dict, qmodel, onnx, qgraph or graph");
            std::process::exit(2);
        }
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(root.join("corpus").join(target))
        .expect("fuzz/corpus/<target> exists")
        .filter_map(|e| {
            let p = e.ok()?.path();
            Some((p.display().to_string(), std::fs::read(&p).ok()?))
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in fuzz/corpus/{target}");
    std::panic::set_hook(Box::new(|_| {}));
    // Every seed runs as is first.
    for (name, s) in &seeds {
        if catch_unwind(AssertUnwindSafe(|| run(s))).is_err() {
            eprintln!("seed {name} panics");
        }
    }
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut execs, mut crashes, mut valid) = (0u64, 0u64, 0u64);
    let artifacts = root.join("artifacts").join(target);
    while Instant::now() < deadline {
        for _ in 0..64 {
            let a = rng.below(seeds.len());
            let b = rng.below(seeds.len());
            let input = mutate(&seeds[a].1, &seeds[b].1, &mut rng);
            execs += 1;
            let outcome = catch_unwind(AssertUnwindSafe(|| run(&input)));
            if let Ok(true) = outcome {
                valid += 1;
            }
            if let Err(payload) = outcome {
                crashes += 1;
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                std::fs::create_dir_all(&artifacts).ok();
                let path = artifacts.join(format!("crash-{crashes}"));
                std::fs::write(&path, &input).ok();
                eprintln!("crash {crashes}: {msg} -> {}", path.display());
            }
        }
    }
    println!(
        "{target}: {execs} executions in {secs} s ({valid} loaded and ran), {crashes} crashes (seed {seed})"
    );
    if crashes > 0 {
        std::process::exit(1);
    }
}
