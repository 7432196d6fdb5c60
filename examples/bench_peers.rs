//! The ptq side of `tools/bench_peers.py`: builds a model from a description, quantizes it,
//! and times its forward passes on one thread when the script asks.
//!
//! `cargo run --release --example bench_peers -- DIR` reads from `DIR` (written by the
//! script, which also documents the format):
//! - `spec.txt`: one layer a line (`quant`, `dequant`, `conv NAME CIN COUT KH KW SH SW PH PW
//!   GROUPS RELU`, `linear NAME IN OUT RELU`, `relu`, `maxpool K S`, `avgpool H W` (adaptive
//!   average pooling to `H x W`), `flatten`, `res NAME` ... `end` (a residual block
//!   `x + body(x)`), and `calib N` (how many calibration batches `data.safetensors` holds);
//!   or, instead of layers, `zoo ARCH H W CLASSES` (`resnet18` or `mobilenet_v2` of
//!   [`ptq::graph::zoo`] at full width, torchvision's names) with `calib N`;
//! - `weights.safetensors`: `NAME.weight` / `NAME.bias` as f32 (for `zoo`, the torchvision
//!   model's float `state_dict`, loaded strictly by name, then fused as `find_fusable`
//!   proposes);
//! - `data.safetensors`: `calib0` .. `calib{N-1}` and `input`, f32.
//!
//! It quantizes with [`QConfig::minmax_per_channel`] (quint8 min/max activations with
//! `reduce_range`, per-channel symmetric qint8 weights: PyTorch's fbgemm ranges) through the
//! graph flow (`prepare` -> `calibrate` -> `convert` -> [`QuantizedGraph`]; a layer list is
//! lowered with [`Graph::from_sequential`]); with `PTQ_BENCH_INT8=sequential` a layer list
//! runs through the `Sequential` flow ([`quantize_model`]) instead. It writes the outputs of
//! one forward pass to `DIR/ptq_int8.f32` and `DIR/ptq_f32.f32` (raw little-endian f32),
//! prints `ready THREADS`, then answers stdin lines `int8 N` / `f32 N` with one line of N
//! per-call times in seconds, and `profile N` with one line `NAME KIND MICROSECONDS` per
//! node of the int8 graph (the median of N [`QuantizedGraph::profile`] runs) followed by
//! `end`, until `quit` or end of input. Everything runs inside a rayon pool of
//! `PTQ_BENCH_THREADS` threads (default 1), the count printed with `ready`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{ArrayD, Ix1, Ix2, Ix4};
use ptq::graph::{find_fusable, fuse, zoo, Dim, Graph};
use ptq::nn::quantized::QuantizedModel;
use ptq::nn::{Conv2d, Layer, Linear, Pool2d, PoolKind, Sequential};
use ptq::qconfig::{QConfig, QConfigMap};
use ptq::quant::QuantizedGraph;
use ptq::workflow::quantize_model;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn err(msg: String) -> Box<dyn std::error::Error> {
    msg.into()
}

/// Parameters by name, taken out as they are used.
struct Params(std::collections::BTreeMap<String, ArrayD<f32>>);

impl Params {
    fn take(&mut self, name: &str) -> Res<ArrayD<f32>> {
        self.0
            .remove(name)
            .ok_or_else(|| err(format!("weights.safetensors has no `{name}`")))
    }
}

fn num<T: std::str::FromStr>(t: &[&str], i: usize, line: usize) -> Res<T> {
    t.get(i)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| err(format!("spec.txt line {line}: bad or missing field {i}")))
}

/// The float model and the number of calibration batches.
fn build(spec: &str, params: &mut Params) -> Res<(Sequential, usize)> {
    // A stack of open blocks: (name, children so far, is residual).
    let mut stack: Vec<(String, Sequential)> = vec![(String::new(), Sequential::new())];
    let mut calib = 0;
    let mut unnamed = 0;
    for (ln, raw) in spec.lines().enumerate() {
        let t: Vec<&str> = raw.split_whitespace().collect();
        let Some(&kind) = t.first() else { continue };
        let line = ln + 1;
        let mut auto = |p: &str| {
            unnamed += 1;
            format!("{p}{unnamed}")
        };
        let (name, layer) = match kind {
            "calib" => {
                calib = num(&t, 1, line)?;
                continue;
            }
            "quant" => (auto("quant"), Layer::QuantStub),
            "dequant" => (auto("dequant"), Layer::DeQuantStub),
            "relu" => (auto("relu"), Layer::ReLU),
            "flatten" => (auto("flatten"), Layer::Flatten { start_dim: 1 }),
            "maxpool" => {
                let (k, s): (usize, usize) = (num(&t, 1, line)?, num(&t, 2, line)?);
                let mut p = Pool2d::new(PoolKind::Max, k, k);
                p.stride = (s, s);
                (auto("maxpool"), Layer::Pool2d(p))
            }
            "avgpool" => (
                auto("avgpool"),
                Layer::AdaptiveAvgPool2d((num(&t, 1, line)?, num(&t, 2, line)?)),
            ),
            "conv" => {
                let name = t
                    .get(1)
                    .ok_or_else(|| err(format!("line {line}: no name")))?;
                let f: Vec<usize> = (2..12).map(|i| num(&t, i, line)).collect::<Res<_>>()?;
                let w = params
                    .take(&format!("{name}.weight"))?
                    .into_dimensionality::<Ix4>()?;
                let b = params
                    .take(&format!("{name}.bias"))?
                    .into_dimensionality::<Ix1>()?;
                let want = [f[1], f[0] / f[8], f[2], f[3]];
                if w.shape() != want {
                    return Err(err(format!(
                        "{name}.weight is {:?}, spec says {want:?}",
                        w.shape()
                    )));
                }
                let conv = Conv2d::new(w, Some(b))?
                    .with_stride(f[4], f[5])
                    .with_padding(f[6], f[7])
                    .with_groups(f[8]);
                let layer = if f[9] == 1 {
                    Layer::ConvReLU2d(conv)
                } else {
                    Layer::Conv2d(conv)
                };
                (name.to_string(), layer)
            }
            "linear" => {
                let name = t
                    .get(1)
                    .ok_or_else(|| err(format!("line {line}: no name")))?;
                let w = params
                    .take(&format!("{name}.weight"))?
                    .into_dimensionality::<Ix2>()?;
                let b = params
                    .take(&format!("{name}.bias"))?
                    .into_dimensionality::<Ix1>()?;
                let (i, o, r): (usize, usize, usize) =
                    (num(&t, 2, line)?, num(&t, 3, line)?, num(&t, 4, line)?);
                if w.shape() != [o, i] {
                    return Err(err(format!("{name}.weight is {:?}", w.shape())));
                }
                let lin = Linear::new(w, Some(b))?;
                let layer = if r == 1 {
                    Layer::LinearReLU(lin)
                } else {
                    Layer::Linear(lin)
                };
                (name.to_string(), layer)
            }
            "res" => {
                let name = t
                    .get(1)
                    .ok_or_else(|| err(format!("line {line}: no name")))?;
                stack.push((name.to_string(), Sequential::new()));
                continue;
            }
            "end" => {
                let (name, body) = stack
                    .pop()
                    .filter(|_| !stack.is_empty())
                    .ok_or_else(|| err(format!("line {line}: `end` without `res`")))?;
                (name, Layer::Residual(body))
            }
            other => return Err(err(format!("spec.txt line {line}: unknown `{other}`"))),
        };
        let (block, top) = stack.last_mut().expect("the root block is never popped");
        // Inside `res B`, a layer `B.conv1` is the block's child `conv1`; other dots in a
        // child's name become `_` (ptq's paths use `.` between levels).
        let local = name
            .strip_prefix(block.as_str())
            .and_then(|n| n.strip_prefix('.'))
            .filter(|_| !block.is_empty())
            .unwrap_or(&name)
            .replace('.', "_");
        *top = std::mem::take(top).push(&local, layer);
    }
    if stack.len() != 1 {
        return Err(err("spec.txt: a `res` block is not closed".into()));
    }
    if let Some(left) = params.0.keys().next() {
        return Err(err(format!("weights.safetensors: `{left}` is not used")));
    }
    Ok((stack.pop().expect("root").1, calib))
}

fn write_f32(path: &Path, x: &ArrayD<f32>) -> Res<()> {
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).map_err(|e| err(format!("{}: {e}", path.display())))
}

/// The float model: a layer list or a zoo graph.
enum Float {
    Seq(Sequential),
    Graph(Graph),
}

impl Float {
    fn forward(&self, x: &ArrayD<f32>) -> Res<ArrayD<f32>> {
        Ok(match self {
            Float::Seq(m) => m.forward(x)?,
            Float::Graph(g) => g.forward(std::slice::from_ref(x))?.remove(0),
        })
    }
}

/// The int8 model.
enum Int8 {
    Seq(QuantizedModel),
    Graph(QuantizedGraph),
}

impl Int8 {
    fn forward(&self, x: &ArrayD<f32>) -> Res<ArrayD<f32>> {
        Ok(match self {
            Int8::Seq(m) => m.forward(x)?,
            Int8::Graph(g) => g.forward(std::slice::from_ref(x))?.remove(0),
        })
    }
}

/// A zoo graph (`zoo ARCH H W CLASSES`) with the torchvision weights loaded and fused.
fn zoo_graph(t: &[&str], params: &mut Params) -> Res<Graph> {
    let arch = t.get(1).copied().unwrap_or("");
    let (h, w, classes): (usize, usize, usize) = (num(t, 2, 1)?, num(t, 3, 1)?, num(t, 4, 1)?);
    let mut g = match arch {
        "resnet18" => zoo::resnet18(64, classes, (h, w))?,
        "mobilenet_v2" => zoo::mobilenet_v2(1.0, classes, (h, w))?,
        other => return Err(err(format!("spec.txt: unknown zoo model `{other}`"))),
    };
    g.load_state_dict(&std::mem::take(&mut params.0), true)?;
    let groups = find_fusable(&g);
    let refs: Vec<Vec<&str>> = groups
        .iter()
        .map(|grp| grp.iter().map(String::as_str).collect())
        .collect();
    let slices: Vec<&[&str]> = refs.iter().map(|v| v.as_slice()).collect();
    Ok(fuse(&g, &slices)?)
}

fn quantize_graph(g: Graph, calib: &[ArrayD<f32>]) -> Res<QuantizedGraph> {
    let mut p = ptq::quant::prepare(g, &QConfigMap::new(QConfig::minmax_per_channel()))?;
    ptq::quant::calibrate(&mut p, calib)?;
    Ok(ptq::quant::convert(p)?)
}

fn run(dir: &Path) -> Res<()> {
    let spec = std::fs::read_to_string(dir.join("spec.txt"))?;
    let mut params = Params(ptq::io::read_safetensors(dir.join("weights.safetensors"))?);
    let mut data = Params(ptq::io::read_safetensors(dir.join("data.safetensors"))?);
    let zoo_line: Option<Vec<&str>> = spec
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|t| t.first() == Some(&"zoo"));
    let (float, n_calib) = match &zoo_line {
        Some(t) => {
            let calib = spec
                .lines()
                .find_map(|l| l.strip_prefix("calib "))
                .and_then(|n| n.trim().parse().ok())
                .ok_or_else(|| err("spec.txt: `zoo` needs `calib N`".into()))?;
            (Float::Graph(zoo_graph(t, &mut params)?), calib)
        }
        None => {
            let (m, calib) = build(&spec, &mut params)?;
            (Float::Seq(m), calib)
        }
    };
    let calib: Vec<ArrayD<f32>> = (0..n_calib)
        .map(|i| data.take(&format!("calib{i}")))
        .collect::<Res<_>>()?;
    let input = data.take("input")?;
    let sequential = std::env::var("PTQ_BENCH_INT8").as_deref() == Ok("sequential");
    let int8 = match &float {
        Float::Seq(m) if sequential => Int8::Seq(quantize_model(
            m.clone(),
            &QConfigMap::new(QConfig::minmax_per_channel()),
            &calib,
        )?),
        Float::Seq(m) => {
            let dims: Vec<Dim> = std::iter::once(Dim::Batch)
                .chain(input.shape()[1..].iter().map(|&d| d.into()))
                .collect();
            Int8::Graph(quantize_graph(Graph::from_sequential(m, &dims)?, &calib)?)
        }
        Float::Graph(g) => Int8::Graph(quantize_graph(g.clone(), &calib)?),
    };
    write_f32(&dir.join("ptq_int8.f32"), &int8.forward(&input)?)?;
    write_f32(&dir.join("ptq_f32.f32"), &float.forward(&input)?)?;

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready {}", rayon::current_num_threads())?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let t: Vec<&str> = line.split_whitespace().collect();
        let (mode, n) = match t.as_slice() {
            ["quit"] | [] => break,
            [mode, n] => (*mode, n.parse::<usize>()?),
            _ => return Err(err(format!("bad command `{line}`"))),
        };
        if mode == "profile" {
            let Int8::Graph(g) = &int8 else {
                return Err(err("profile needs the graph executor".into()));
            };
            let mut runs: Vec<Vec<f64>> = vec![Vec::new(); g.nodes().len()];
            for _ in 0..n.max(1) {
                for (i, p) in g.profile(std::slice::from_ref(&input))?.iter().enumerate() {
                    runs[i].push(p.time.as_secs_f64() * 1e6);
                }
            }
            for (node, mut ts) in g.nodes().iter().zip(runs) {
                ts.sort_by(|a, b| a.total_cmp(b));
                writeln!(
                    out,
                    "{} {} {:.1}",
                    node.name(),
                    node.op().kind(),
                    ts[ts.len() / 2]
                )?;
            }
            writeln!(out, "end")?;
            out.flush()?;
            continue;
        }
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            let y = match mode {
                "int8" => int8.forward(&input)?,
                "f32" => float.forward(&input)?,
                _ => return Err(err(format!("bad mode `{mode}`"))),
            };
            times.push(t0.elapsed().as_secs_f64());
            std::hint::black_box(y);
        }
        let s: Vec<String> = times.iter().map(|t| format!("{t:.9}")).collect();
        writeln!(out, "{}", s.join(" "))?;
        out.flush()?;
    }
    Ok(())
}

fn main() {
    let Some(dir) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: bench_peers DIR (see tools/bench_peers.py)");
        std::process::exit(2);
    };
    let threads = std::env::var("PTQ_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench_peers: rayon pool: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = pool.install(|| run(&dir).map_err(|e| e.to_string())) {
        eprintln!("bench_peers: {e}");
        std::process::exit(1);
    }
}
