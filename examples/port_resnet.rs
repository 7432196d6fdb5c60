//! Porting a torchvision-style ResNet (basic blocks with downsample shortcuts) from its
//! PyTorch `state_dict`, written the way its PyTorch `forward` reads, to a saved, reloaded,
//! bit-identical int8 model.
//!
//! ```text
//! cargo run --release --example port_resnet [-- state_dict.safetensors width height classes]
//! ```
//!
//! Without arguments it uses `tests/fixtures/tv_resnet18.safetensors`: torchvision's
//! quantizable ResNet-18 with planes 4/8/16/32 on 48x48 inputs and random weights, saved by
//! `tools/gen_torchvision_fixtures.py` together with an input batch (`__input__`) and
//! PyTorch's float output on it (`__output__`), so the port is checked against PyTorch.
//! Your own model: in Python, `save_file({k: v.contiguous() for k, v in
//! model.state_dict().items()}, "resnet.safetensors")`, then pass its width (64 for the real
//! ResNet-18), input size and class count.

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, Array4, ArrayD, Axis};
use ptq::graph::{find_fusable, fuse, Dim, GraphBuilder, NodeId, Pool2dSpec};
use ptq::nn::{BatchNorm2d, Conv2d, Linear};
use ptq::qconfig::{QConfig, QConfigMap};
use ptq::quant::{calibrate, convert, prepare, QuantizedGraph};
use ptq::{Graph, QuantError, Result};

/// A conv of the right shape with zero weights: the state_dict fills it in.
fn conv(cin: usize, cout: usize, k: usize, stride: usize) -> Result<Conv2d> {
    let pad = (k - 1) / 2;
    Ok(Conv2d::new(Array4::zeros((cout, cin, k, k)), None)?
        .with_stride(stride, stride)
        .with_padding(pad, pad))
}

/// torchvision's `BasicBlock.forward`: conv-bn-relu-conv-bn, plus the input (through a
/// 1x1 conv + bn `downsample` when the shape changes), then ReLU.
fn basic_block(
    g: &mut GraphBuilder,
    name: &str,
    x: NodeId,
    inplanes: usize,
    planes: usize,
    stride: usize,
) -> Result<NodeId> {
    let out = g.conv2d(
        &format!("{name}.conv1"),
        x,
        conv(inplanes, planes, 3, stride)?,
    )?;
    let out = g.batch_norm2d(&format!("{name}.bn1"), out, BatchNorm2d::identity(planes))?;
    let out = g.relu(&format!("{name}.relu"), out)?;
    let out = g.conv2d(&format!("{name}.conv2"), out, conv(planes, planes, 3, 1)?)?;
    let out = g.batch_norm2d(&format!("{name}.bn2"), out, BatchNorm2d::identity(planes))?;
    let identity = if stride != 1 || inplanes != planes {
        let d = g.conv2d(
            &format!("{name}.downsample.0"),
            x,
            conv(inplanes, planes, 1, stride)?,
        )?;
        g.batch_norm2d(
            &format!("{name}.downsample.1"),
            d,
            BatchNorm2d::identity(planes),
        )?
    } else {
        x
    };
    // QuantizableBasicBlock: `self.add_relu = FloatFunctional()`, `add_relu(out, identity)`
    g.add_relu(&format!("{name}.add_relu"), out, identity)
}

/// torchvision's quantizable `ResNet.forward` with `[2, 2, 2, 2]` basic blocks.
fn resnet18(width: usize, hw: (usize, usize), classes: usize) -> Result<Graph> {
    let mut g = GraphBuilder::new();
    let x = g.input("x", &[Dim::Batch, 3.into(), hw.0.into(), hw.1.into()])?;
    let x = g.quant_stub("quant", x)?;
    let x = g.conv2d("conv1", x, conv(3, width, 7, 2)?.with_padding(3, 3))?;
    let x = g.batch_norm2d("bn1", x, BatchNorm2d::identity(width))?;
    let x = g.relu("relu", x)?;
    let pool = Pool2dSpec::new(3, 3).with_stride(2, 2).with_padding(1, 1);
    let mut x = g.max_pool2d("maxpool", x, pool)?;
    let mut inplanes = width;
    for (layer, (mult, stride)) in [(1, 1), (2, 2), (4, 2), (8, 2)].into_iter().enumerate() {
        let planes = width * mult;
        for block in 0..2 {
            let name = format!("layer{}.{block}", layer + 1);
            let s = if block == 0 { stride } else { 1 };
            x = basic_block(&mut g, &name, x, inplanes, planes, s)?;
            inplanes = planes;
        }
    }
    let x = g.adaptive_avg_pool2d("avgpool", x, (1, 1))?;
    let x = g.flatten("flatten", x, 1, -1)?;
    let fc = Linear::new(
        Array2::zeros((classes, inplanes)),
        Some(Array1::zeros(classes)),
    )?;
    let x = g.linear("fc", x, fc)?;
    let x = g.dequant_stub("dequant", x)?;
    g.output(x)?;
    g.build()
}

fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let default = "tests/fixtures/tv_resnet18.safetensors".to_string();
    let path = args.first().unwrap_or(&default);
    let num = |i: usize, d: usize| -> Result<usize> {
        args.get(i).map_or(Ok(d), |s| {
            s.parse().map_err(|_| QuantError::UnsupportedConfig {
                context: "port_resnet".into(),
                reason: format!("argument {i} `{s}` is not a number"),
            })
        })
    };
    let (width, hw, classes) = (num(1, 4)?, (num(2, 48)?, num(2, 48)?), num(3, 10)?);

    // 1. The architecture, then the weights by PyTorch's names (strict: every missing,
    //    unexpected or mis-shaped key is listed in one error).
    let mut state_dict: BTreeMap<String, ArrayD<f32>> = ptq::io::read_safetensors(path)?;
    let input = state_dict.remove("__input__");
    let torch_out = state_dict.remove("__output__");
    let mut graph = resnet18(width, hw, classes)?;
    graph.load_state_dict(&state_dict, true)?;
    println!(
        "{path}: {} nodes, {} tensors loaded",
        graph.nodes().len(),
        state_dict.len()
    );

    // A batch to check against and calibrate on: the fixture's, or a deterministic one.
    let x = input.unwrap_or_else(|| {
        ArrayD::from_shape_fn(vec![2, 3, hw.0, hw.1], |ix| {
            ((ix[1] * 7 + ix[2] * 3 + ix[3]) as f32 * 0.31).sin()
        })
    });
    let float = graph.forward(std::slice::from_ref(&x))?.remove(0);
    if let Some(t) = &torch_out {
        println!(
            "float output vs PyTorch: max |diff| {:.2e} (outputs up to {:.2})",
            max_abs_diff(&float, t),
            t.iter().fold(0f32, |m, v| m.max(v.abs()))
        );
    }

    // 2. Fuse what torchvision's fuse_model fuses: conv+bn(+relu), add+relu.
    let groups = find_fusable(&graph);
    let groups: Vec<Vec<&str>> = groups
        .iter()
        .map(|g| g.iter().map(String::as_str).collect())
        .collect();
    let groups: Vec<&[&str]> = groups.iter().map(Vec::as_slice).collect();
    let graph = fuse(&graph, &groups)?;
    println!(
        "fused {} groups: {} nodes",
        groups.len(),
        graph.nodes().len()
    );

    // 3. prepare -> calibrate -> convert with fbgemm's defaults.
    let mut prepared = prepare(graph, &QConfigMap::new(QConfig::fbgemm()))?;
    let batches = (0..8).map(|i| x.mapv(|v| v * (0.8 + 0.05 * i as f32)));
    let report = calibrate(&mut prepared, batches)?;
    println!(
        "calibrated on {} batches ({} images)",
        report.batches, report.samples
    );
    let int8 = convert(prepared)?;
    let y = int8.forward(std::slice::from_ref(&x))?.remove(0);
    let argmax = |a: ndarray::ArrayView1<f32>| {
        a.iter()
            .enumerate()
            .fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
            .0
    };
    let agree = (0..y.shape()[0])
        .filter(|&i| {
            let a = y.index_axis(Axis(0), i);
            let b = float.index_axis(Axis(0), i);
            argmax(a.into_dimensionality().unwrap()) == argmax(b.into_dimensionality().unwrap())
        })
        .count();
    println!(
        "int8 vs float: max |diff| {:.3}, top-1 agrees on {agree}/{} images",
        max_abs_diff(&y, &float),
        y.shape()[0]
    );

    // 4. Save, reload, and check the reloaded model gives the same bits.
    let file = std::env::temp_dir().join(format!("port_resnet-{}.qmodel", std::process::id()));
    int8.save(&file)?;
    let loaded = QuantizedGraph::load(&file)?;
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    std::fs::remove_file(&file).ok();
    let y2 = loaded.forward(std::slice::from_ref(&x))?.remove(0);
    let identical = y.iter().zip(&y2).all(|(a, b)| a.to_bits() == b.to_bits());
    println!(
        "saved {size} bytes ({} bytes of int8 weights), reloaded: outputs bit-identical: {identical}",
        int8.weight_bytes()
    );
    if !identical {
        eprintln!("the reloaded model's outputs differ");
        std::process::exit(1);
    }

    // 5. Where the time goes (one forward, slowest nodes first).
    let mut prof = loaded.profile(std::slice::from_ref(&x))?;
    prof.sort_by_key(|p| std::cmp::Reverse(p.time));
    println!("slowest nodes:");
    for p in prof.iter().take(5) {
        println!(
            "  {:<24} {:<14} {:>8.1} us",
            p.name,
            p.kind,
            p.time.as_secs_f64() * 1e6
        );
    }
    Ok(())
}
