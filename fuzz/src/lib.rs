//! The fuzzed entry points, shared by the cargo-fuzz targets and the stable `mutate`
//! driver. Each takes arbitrary bytes; any panic is a bug.

use ndarray::{Array1, Array2, Array4, ArrayD, Dimension, IxDyn};
use ptq::nn::quantized::QuantizedModel;
use ptq::nn::{BatchNorm2d, Conv2d, Layer, Linear, Sequential};

/// The model the `state_dict` target loads into: `conv` (3 -> 4, 3x3, padding 1, bias),
/// `bn`, `relu`, `flatten`, `fc` (64 -> 5, bias), for `[N, 3, 4, 4]` inputs.
pub fn small_model() -> Sequential {
    Sequential::new()
        .push(
            "conv",
            Layer::Conv2d(
                Conv2d::new(Array4::zeros((4, 3, 3, 3)), Some(Array1::zeros(4)))
                    .expect("consistent")
                    .with_padding(1, 1),
            ),
        )
        .push("bn", Layer::BatchNorm2d(BatchNorm2d::identity(4)))
        .push("relu", Layer::ReLU)
        .push("flatten", Layer::Flatten { start_dim: 1 })
        .push(
            "fc",
            Layer::Linear(
                Linear::new(Array2::zeros((5, 64)), Some(Array1::zeros(5))).expect("consistent"),
            ),
        )
}

/// `parse_safetensors`, then strict and lenient `load_state_dict` into [`small_model`] and a
/// forward pass of whatever loaded. Returns whether the bytes parsed.
pub fn state_dict(data: &[u8]) -> bool {
    let Ok(sd) = ptq::io::parse_safetensors(data, "fuzz") else {
        return false;
    };
    for strict in [true, false] {
        let mut model = small_model();
        if ptq::io::load_state_dict(&mut model, &sd, strict).is_ok() {
            let _ = model.forward(&ArrayD::from_elem(IxDyn(&[2, 3, 4, 4]), 0.5f32));
        }
    }
    true
}

/// `QuantizedModel::from_bytes`, then forward passes on image and vector inputs and a
/// save of whatever loaded. Returns whether the bytes loaded.
pub fn qmodel(data: &[u8]) -> bool {
    let Ok(model) = QuantizedModel::from_bytes(data) else {
        return false;
    };
    for shape in [
        &[1usize, 3, 9, 9][..],
        &[2, 1, 8, 8],
        &[2, 64],
        &[1, 3, 5, 4],
    ] {
        let x = ArrayD::from_shape_fn(IxDyn(shape), |i| {
            (i.slice().iter().sum::<usize>() as f32 * 0.37).sin()
        });
        let _ = model.forward(&x);
    }
    let _ = model.to_bytes();
    true
}

/// `OnnxModel::from_bytes` (no directory, so no external data), then the import into a
/// graph and, when every node's shape is small, a float forward pass at batch 1 and 2.
/// Returns whether the bytes imported into a graph.
pub fn onnx(data: &[u8]) -> bool {
    let Ok(model) = ptq::io::onnx::OnnxModel::from_bytes(data, "fuzz", None) else {
        return false;
    };
    let Ok(imp) = model.to_graph() else {
        return false;
    };
    let g = &imp.graph;
    let small = g.nodes().iter().all(|n| {
        n.shape
            .0
            .iter()
            .try_fold(2usize, |a, d| a.checked_mul(d.fixed().unwrap_or(2)))
            .is_some_and(|e| e <= 1 << 20)
    });
    if small {
        for batch in [1, 2] {
            let xs: Vec<ArrayD<f32>> = g
                .inputs()
                .iter()
                .map(|&i| {
                    let shape = g.node(i).shape.to_concrete(batch);
                    ArrayD::from_shape_fn(IxDyn(&shape), |ix| {
                        (ix.slice().iter().sum::<usize>() as f32 * 0.37).sin()
                    })
                })
                .collect();
            let _ = g.forward(&xs);
        }
    }
    true
}

/// Reads fuzz bytes as a stream of small numbers (zeros once exhausted).
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn small(&mut self, m: u8) -> usize {
        (self.u8() % m) as usize
    }
    /// A dimension: mostly 1..=7, sometimes 0 or huge.
    fn dim(&mut self) -> usize {
        match self.u8() {
            0xFF => 1 << 40,
            0xFE => usize::MAX / 2,
            0xFD => 0,
            b => 1 + (b % 7) as usize,
        }
    }
    fn f32(&mut self) -> f32 {
        match self.u8() {
            0xFF => f32::NAN,
            0xFE => f32::INFINITY,
            0xFD => f32::NEG_INFINITY,
            0xFC => 1e30,
            b => (b as f32 - 100.0) / 25.0,
        }
    }
}

/// The deterministic sample values fed to fuzzed graphs.
fn sample(shape: &[usize]) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(shape), |i| {
        (i.slice()
            .iter()
            .enumerate()
            .map(|(k, &v)| (k + 1) * v)
            .sum::<usize>() as f32
            * 0.37)
            .sin()
    })
}

/// One op decoded from fuzz bytes, for an input of shape `x` (fixed dims or 1).
fn graph_op(sel: u8, r: &mut Bytes<'_>, x: &[ptq::graph::Dim]) -> Option<ptq::graph::Op> {
    use ptq::graph::{
        BatchNorm, LayerNorm, NearestRule, Op, Pool2dSpec, UpsampleMode, UpsampleSpec,
    };
    let d = |i: usize| x.get(i).and_then(|d| d.fixed()).unwrap_or(1).clamp(1, 64);
    let last = x.len().saturating_sub(1);
    Some(match sel % 26 {
        0 | 1 => {
            let groups = if r.small(3) == 0 { d(1) } else { 1 };
            let cin = if r.small(9) == 0 { d(1) + 1 } else { d(1) };
            let (kh, kw) = (1 + r.small(3), 1 + r.small(3));
            let cout = groups * (1 + r.small(4));
            let w = Array4::from_shape_fn((cout, (cin / groups).max(1), kh, kw), |(a, b, c, e)| {
                ((a * 7 + b * 5 + c * 3 + e) as f32 * 0.3).sin()
            });
            let bias = (r.small(4) != 0).then(|| Array1::from_shape_fn(cout, |i| i as f32 * 0.1));
            let conv = Conv2d::new(w, bias)
                .ok()?
                .with_groups(groups)
                .with_stride(1 + r.small(3), 1 + r.small(3))
                .with_dilation(1 + r.small(2), 1 + r.small(2));
            let conv = if r.small(5) == 0 {
                conv.with_padding_tlbr(r.small(3), r.small(3), r.small(3), r.small(3))
            } else {
                conv.with_padding(r.small(3), r.small(3))
            };
            if sel.is_multiple_of(26) {
                Op::Conv2d(conv)
            } else {
                Op::ConvReLU2d(conv)
            }
        }
        2 | 3 => {
            let inf = if r.small(9) == 0 {
                d(last) + 1
            } else {
                d(last)
            };
            let out = 1 + r.small(5);
            let l = Linear::new(
                Array2::from_shape_fn((out, inf), |(a, b)| ((a * 3 + b) as f32 * 0.7).cos()),
                (r.small(4) != 0).then(|| Array1::zeros(out)),
            )
            .ok()?;
            if sel % 26 == 2 {
                Op::Linear(l)
            } else {
                Op::LinearReLU(l)
            }
        }
        4 => {
            let mut bn = BatchNorm::identity(d(1));
            bn.eps = if r.small(7) == 0 { -1.0 } else { 1e-5 };
            Op::BatchNorm2d(bn)
        }
        5 => Op::BatchNorm1d(BatchNorm::identity(d(1))),
        6 => Op::ReLU,
        7 => Op::Clamp {
            min: r.f32(),
            max: r.f32(),
        },
        8 => [Op::Hardswish, Op::Hardsigmoid, Op::Sigmoid, Op::SiLU][r.small(4)].clone(),
        9 => Op::Gelu {
            tanh: r.small(2) == 0,
        },
        10 => Op::Add,
        11 => Op::Mul,
        12 => Op::AddReLU,
        13 => Op::Concat { axis: r.small(5) },
        14 | 15 => {
            let (kh, kw) = (1 + r.small(4), 1 + r.small(4));
            let spec = Pool2dSpec::new(kh, kw)
                .with_stride(r.small(4), 1 + r.small(3))
                .with_padding_tlbr(r.small(3), r.small(3), r.small(3), r.small(3))
                .with_ceil_mode(r.small(2) == 0)
                .with_count_include_pad(r.small(2) == 0);
            if sel % 26 == 14 {
                Op::MaxPool2d(spec.with_dilation(1 + r.small(2), r.small(3)))
            } else {
                Op::AvgPool2d(spec.with_divisor_override(match r.small(5) {
                    0 => Some(0),
                    1 => Some(3),
                    _ => None,
                }))
            }
        }
        16 => Op::AdaptiveAvgPool2d((r.small(6), r.small(6))),
        17 => Op::Mean {
            dims: (0..1 + r.small(3)).map(|_| r.small(5)).collect(),
            keepdim: r.small(2) == 0,
        },
        18 => Op::Flatten {
            start_dim: r.small(5),
            end_dim: r.small(6) as isize - 3,
        },
        19 => Op::Reshape {
            shape: (0..1 + r.small(4))
                .map(|_| match r.u8() % 8 {
                    0 => -1,
                    1 => 0,
                    2 => -2,
                    b => b as isize,
                })
                .collect(),
        },
        20 => {
            let mut dims: Vec<usize> = (0..x.len()).collect();
            if !dims.is_empty() {
                let (i, j) = (r.small(x.len() as u8 + 1), r.small(x.len() as u8));
                if i < dims.len() {
                    dims.swap(i, j);
                } else {
                    dims.pop();
                }
            }
            Op::Permute { dims }
        }
        21 => {
            let axis = r.small(5);
            let start = r.small(4);
            Op::Slice {
                axis,
                start,
                end: start + r.small(4),
            }
        }
        22 => {
            let mode = match r.small(4) {
                0 => UpsampleMode::Nearest(NearestRule::Floor),
                1 => UpsampleMode::Nearest(NearestRule::Exact),
                2 => UpsampleMode::Nearest(NearestRule::HalfPixelRoundPreferFloor),
                _ => UpsampleMode::Bilinear {
                    align_corners: r.small(2) == 0,
                },
            };
            Op::Upsample(if r.small(2) == 0 {
                UpsampleSpec::size(r.small(9), r.small(9), mode)
            } else {
                let mut f = || match r.u8() {
                    0xFF => f32::NAN,
                    0xFE => 1e30,
                    0xFD => -1.0,
                    b => 0.25 + b as f32 / 64.0,
                };
                UpsampleSpec::scale(f(), f(), mode)
            })
        }
        23 => Op::Softmax { axis: r.small(5) },
        24 => {
            let mut ln = LayerNorm::new(&[d(last)]);
            if r.small(5) == 0 {
                ln = LayerNorm::new(&[d(1), d(last) + r.small(2)]);
            }
            Op::LayerNorm(ln)
        }
        _ => [Op::Identity, Op::Dropout, Op::QuantStub, Op::DeQuantStub][r.small(4)].clone(),
    })
}

/// A graph built from fuzz bytes through [`ptq::GraphBuilder`]: a header (input rank and
/// dimensions, whether a `QuantStub` follows the input), then up to 24 builder calls, each
/// an op selector, two input picks and the op's parameters. Every builder call must return
/// `Ok` or an error; the last accepted node (and one more) are the outputs. Also returns
/// the header byte that picks the qconfig.
pub fn build_graph(data: &[u8]) -> Option<(ptq::Graph, u8)> {
    use ptq::graph::{Dim, GraphBuilder, NodeId};
    let mut r = Bytes(data);
    let rank = 1 + r.small(5);
    let mut dims = vec![Dim::Batch];
    for _ in 1..rank {
        dims.push(Dim::Fixed(r.dim()));
    }
    let flags = r.u8();
    let mut g = GraphBuilder::new();
    let x = g.input("x", &dims).ok()?;
    let mut ids: Vec<NodeId> = vec![x];
    if flags & 1 == 0 {
        ids.push(g.quant_stub("quant", x).expect("a stub takes any shape"));
    }
    for k in 0..24 {
        if r.0.is_empty() {
            break;
        }
        let sel = r.u8();
        let ia = ids[r.small(255) % ids.len()];
        let ib = ids[r.small(255) % ids.len()];
        let shape = g.shape(ia).expect("an id of this builder").0.clone();
        let Some(op) = graph_op(sel, &mut r, &shape) else {
            continue;
        };
        let inputs = match op.arity() {
            Some(2) => vec![ia, ib],
            None => (0..1 + r.small(3)).map(|j| [ia, ib][j % 2]).collect(),
            _ => vec![ia],
        };
        if let Ok(id) = g.node(&format!("n{k}"), op, &inputs) {
            ids.push(id);
        }
    }
    let last = *ids.last().expect("the input");
    let out = if flags & 2 == 0 {
        g.dequant_stub("dequant", last)
            .expect("a stub takes any shape")
    } else {
        last
    };
    g.output(out).ok()?;
    if ids.len() > 3 && flags & 4 == 0 {
        g.output(ids[ids.len() / 2]).ok()?;
    }
    Some((
        g.build().expect("a graph with an output builds"),
        flags >> 3,
    ))
}

/// Whether every node of `g` holds at most `limit` values at this batch size.
fn graph_is_small(g: &ptq::Graph, batch: usize, limit: usize) -> bool {
    g.nodes().iter().all(|n| {
        n.shape
            .to_concrete(batch)
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .is_some_and(|e| e <= limit)
    })
}

/// [`build_graph`], then (when every node is small) the float forward, checking every
/// node's output has its inferred shape; then `prepare` -> `calibrate` -> `convert` under a
/// qconfig picked by the bytes, the int8 forward (a NaN input must be an error), and a
/// save/load round trip that must give bit-identical outputs. Returns the converted graph.
pub fn graph_quantized(data: &[u8]) -> Option<ptq::QuantizedGraph> {
    use ptq::qconfig::{QConfig, QConfigMap};
    let (graph, pick) = build_graph(data)?;
    let batch = 1 + (pick as usize & 1);
    if !graph_is_small(&graph, batch, 1 << 14) {
        return None;
    }
    let x = sample(&graph.node(graph.inputs()[0]).shape.to_concrete(batch));
    let fwd = graph.forward_with(std::slice::from_ref(&x), &mut |node, y| {
        assert_eq!(
            y.shape(),
            node.shape.to_concrete(batch).as_slice(),
            "{}: output shape differs from the inferred one",
            node.name
        );
        Ok(())
    });
    let float_out = fwd.ok()?;
    let qconfig = match (pick >> 1) % 4 {
        0 => QConfig::minmax_per_channel(),
        1 => QConfig::fbgemm(),
        2 => QConfig::qnnpack(),
        _ => QConfig::onnxruntime(),
    };
    let mut prepared = ptq::quant::prepare(graph, &QConfigMap::new(qconfig)).ok()?;
    let batches = [x.clone(), x.mapv(|v| v * -1.5 + 0.25)];
    ptq::quant::calibrate(&mut prepared, batches.iter()).ok()?;
    let int8 = ptq::quant::convert(prepared).ok()?;
    let nan = x.mapv(|_| f32::NAN);
    assert!(
        int8.forward(std::slice::from_ref(&nan)).is_err(),
        "a NaN input must be an error"
    );
    let y = int8.forward(std::slice::from_ref(&x));
    if let Ok(y) = &y {
        assert_eq!(y.len(), float_out.len());
        for (a, b) in y.iter().zip(&float_out) {
            assert_eq!(a.shape(), b.shape(), "int8 and float output shapes differ");
        }
    }
    let bytes = int8.to_bytes().expect("every converted op saves");
    let back = ptq::QuantizedGraph::from_bytes(&bytes).expect("a saved graph loads");
    let y2 = back.forward(std::slice::from_ref(&x));
    match (&y, &y2) {
        (Ok(a), Ok(b)) => {
            for (a, b) in a.iter().zip(b) {
                let bits = |t: &ArrayD<f32>| t.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(a), bits(b), "the reloaded graph computes other values");
            }
        }
        (Err(_), Err(_)) => {}
        _ => panic!("the reloaded graph fails where the original did not (or the reverse)"),
    }
    Some(int8)
}

/// The `graph` target: [`graph_quantized`]. Returns whether a graph was built and
/// converted.
pub fn graph(data: &[u8]) -> bool {
    graph_quantized(data).is_some()
}

/// The `qgraph` target: `QuantizedGraph::from_bytes` (`ptq-qmodel/2`), then forward passes
/// with one input per graph input at several shapes and a save of whatever loaded; a
/// saved graph must load again. Returns whether the bytes loaded.
pub fn qgraph(data: &[u8]) -> bool {
    let Ok(model) = ptq::QuantizedGraph::from_bytes(data) else {
        return false;
    };
    let n = model.input_nodes().len();
    for shape in [
        &[1usize, 3, 8, 8][..],
        &[2, 2, 5, 7],
        &[2, 6],
        &[1, 4, 3],
        &[0, 3, 4, 4],
    ] {
        let xs = vec![sample(shape); n];
        let _ = model.forward(&xs);
    }
    if let Ok(bytes) = model.to_bytes() {
        assert!(
            ptq::QuantizedGraph::from_bytes(&bytes).is_ok(),
            "a saved graph must load"
        );
    }
    true
}
