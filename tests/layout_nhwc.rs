//! Int8 activations held NHWC between ops: every op that runs on NHWC data gives, element
//! for element, what its NCHW path gives (which the parity tests pin to PyTorch), for both
//! PyTorch memory formats and for shapes whose elementwise tails (`numel % 64`) and
//! channel tails (`C % 32`, `C % 8`) fall differently in the two orders.
//!
//! * kernels: `forward_nhwc` of each `nn::quantized` layer against `forward`;
//! * graphs: a converted `QuantizedGraph` run as usual (activations stay NHWC after a
//!   convolution) against the same nodes each fed NCHW inputs, node by node, on a
//!   hand-built graph mixing NCHW and NHWC inputs and on the torchvision zoo graphs;
//! * the Sequential `QuantizedModel` against its layers run one by one on NCHW data.

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use ptq::graph::{
    zoo, BatchNorm, Dim, Graph, GraphBuilder, NearestRule, Op, Pool2dSpec, UpsampleMode,
    UpsampleSpec,
};
use ptq::nn::quantized::{
    QAdaptiveAvgPool2d, QAdd, QAvgPool2d, QBatchNorm2d, QCat, QHardsigmoid, QHardswish, QLeakyReLU,
    QMaxPool2d, QMul, QSigmoid, QTensor, QUpsampleNearest2d, TorchLayout, UpsampleSize,
};
use ptq::nn::{Conv2d, Linear};
use ptq::qconfig::{QConfig, QConfigMap};
use ptq::quant::{calibrate, convert, prepare, ExecCtx, Layout, QAct, QuantizedGraph, Value};

const LAYOUTS: [TorchLayout; 2] = [TorchLayout::ChannelsLast, TorchLayout::Contiguous];

/// A deterministic LCG stream.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn u8(&mut self) -> u8 {
        (self.next() % 256) as u8
    }
    fn f32(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn qtensor(shape: &[usize], scale: f32, zp: i32, rng: &mut Lcg) -> QTensor {
    let n = shape.iter().product();
    let v = (0..n).map(|_| rng.u8()).collect();
    QTensor::new(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap(), scale, zp).unwrap()
}

/// `[n, c, h, w]` -> `[n, h, w, c]` (`to_nhwc`) or back, by plain indexing.
fn transpose(t: &QTensor, to_nhwc: bool) -> QTensor {
    let perm = if to_nhwc { [0, 2, 3, 1] } else { [0, 3, 1, 2] };
    let d = t
        .data()
        .view()
        .permuted_axes(IxDyn(&perm))
        .as_standard_layout()
        .into_owned();
    QTensor::new(d, t.scale(), t.zero_point()).unwrap()
}

/// Shapes whose element counts and channel counts leave different tails in the two orders.
const SHAPES: [[usize; 4]; 8] = [
    [1, 3, 5, 7],
    [2, 8, 4, 4],
    [1, 40, 3, 3],
    [2, 33, 5, 2],
    [1, 70, 1, 1],
    [3, 1, 9, 9],
    [1, 64, 2, 3],
    [2, 13, 6, 5],
];

fn check_unary(
    what: &str,
    nchw: impl Fn(&QTensor) -> ptq::Result<QTensor>,
    nhwc: impl Fn(&QTensor) -> ptq::Result<QTensor>,
    rng: &mut Lcg,
) {
    for s in SHAPES {
        let x = qtensor(&s, 0.03, rng.below(256) as i32, rng);
        match (nchw(&x), nhwc(&transpose(&x, true))) {
            (Ok(want), Ok(got)) => assert_eq!(transpose(&got, false), want, "{what} on {s:?}"),
            (Err(_), Err(_)) => {} // too small for the window either way
            (a, b) => panic!("{what} on {s:?}: {a:?} vs {b:?}"),
        }
    }
}

#[test]
fn pools_on_nhwc_match_nchw() {
    let mut rng = Lcg(1);
    for (k, st, p, d) in [
        ((2, 2), (2, 2), (0, 0), (1, 1)),
        ((3, 3), (2, 2), (1, 1), (1, 1)),
        ((3, 2), (1, 2), (1, 0), (2, 1)),
        ((1, 1), (1, 1), (0, 0), (1, 1)),
    ] {
        for ceil in [false, true] {
            let mp = QMaxPool2d::new(k, st, p, d).unwrap().with_ceil_mode(ceil);
            check_unary(
                "max pool",
                |x| mp.forward(x),
                |x| mp.forward_nhwc(x),
                &mut rng,
            );
            for cip in [false, true] {
                for l in LAYOUTS {
                    let ap = QAvgPool2d::new(k, st, p, cip)
                        .unwrap()
                        .with_ceil_mode(ceil)
                        .with_layout(l);
                    check_unary(
                        "avg pool",
                        |x| ap.forward(x),
                        |x| ap.forward_nhwc(x),
                        &mut rng,
                    );
                }
            }
        }
    }
    for out in [(1, 1), (2, 3), (3, 3), (5, 1)] {
        for l in LAYOUTS {
            let p = QAdaptiveAvgPool2d::new(out).unwrap().with_layout(l);
            check_unary(
                "adaptive avg pool",
                |x| p.forward(x),
                |x| p.forward_nhwc(x),
                &mut rng,
            );
        }
    }
    // errors on NHWC shapes name the layer, never panic
    let mp = QMaxPool2d::new((3, 3), (1, 1), (1, 1), (1, 1)).unwrap();
    let empty = QTensor::new(ArrayD::zeros(IxDyn(&[1, 0, 0, 4])), 0.1, 0).unwrap();
    assert!(mp.forward_nhwc(&empty).is_err());
    let ap = QAvgPool2d::new((2, 2), (2, 2), (0, 0), true).unwrap();
    let flat = QTensor::new(ArrayD::zeros(IxDyn(&[2, 4])), 0.1, 0).unwrap();
    assert!(ap.forward_nhwc(&flat).is_err());
}

#[test]
fn lut_activations_batch_norm_and_upsample_on_nhwc_match_nchw() {
    let mut rng = Lcg(2);
    for l in LAYOUTS {
        let hs = QHardswish::new(0.02, 100).unwrap().with_layout(l);
        check_unary(
            "hardswish",
            |x| hs.forward(x),
            |x| hs.forward_nhwc(x),
            &mut rng,
        );
        let hsig = QHardsigmoid::new().with_layout(l);
        check_unary(
            "hardsigmoid",
            |x| hsig.forward(x),
            |x| hsig.forward_nhwc(x),
            &mut rng,
        );
        let sig = QSigmoid::new().with_layout(l);
        check_unary(
            "sigmoid",
            |x| sig.forward(x),
            |x| sig.forward_nhwc(x),
            &mut rng,
        );
        let lr = QLeakyReLU::new(0.1, 0.02, 30).unwrap().with_layout(l);
        check_unary(
            "leaky relu",
            |x| lr.forward(x),
            |x| lr.forward_nhwc(x),
            &mut rng,
        );
    }
    for s in SHAPES {
        let c = s[1];
        let v = |rng: &mut Lcg, lo: f32| -> Array1<f32> {
            (0..c).map(|_| rng.f32().abs() + lo).collect()
        };
        let (w, b, m, var) = (
            v(&mut rng, 0.1),
            v(&mut rng, -0.5),
            v(&mut rng, -0.5),
            v(&mut rng, 0.2),
        );
        for relu in [false, true] {
            let mut bn = QBatchNorm2d::new(
                Some(w.view()),
                Some(b.view()),
                m.view(),
                var.view(),
                1e-5,
                0.04,
                90,
            )
            .unwrap();
            if relu {
                bn = bn.with_relu();
            }
            let x = qtensor(&s, 0.05, 77, &mut rng);
            let want = bn.forward(&x).unwrap();
            let got = bn.forward_nhwc(&transpose(&x, true)).unwrap();
            assert_eq!(transpose(&got, false), want, "batch norm {s:?}");
        }
    }
    for size in [
        UpsampleSize::Scale(2.0, 2.0),
        UpsampleSize::Scale(1.5, 3.0),
        UpsampleSize::Size(7, 4),
    ] {
        for exact in [false, true] {
            let mut up = QUpsampleNearest2d::new(size).unwrap();
            if exact {
                up = up.with_exact();
            }
            check_unary(
                "upsample",
                |x| up.forward(x),
                |x| up.forward_nhwc(x),
                &mut rng,
            );
        }
    }
}

#[test]
fn add_mul_cat_on_nhwc_match_nchw() {
    let mut rng = Lcg(3);
    for s in SHAPES {
        for l in LAYOUTS {
            for relu in [false, true] {
                let a = qtensor(&s, 0.04, 120, &mut rng);
                let b = qtensor(&s, 0.07, 3, &mut rng);
                let mut add = QAdd::new(0.09, 64).unwrap().with_layout(l);
                let mut mul = QMul::new(0.5, 10).unwrap().with_layout(l);
                if relu {
                    add = add.with_relu();
                    mul = mul.with_relu();
                }
                let (ta, tb) = (transpose(&a, true), transpose(&b, true));
                let want = add.forward(&a, &b).unwrap();
                let got = add.forward_nhwc(&ta, &tb).unwrap();
                assert_eq!(transpose(&got, false), want, "add {s:?} {l:?}");
                let want = mul.forward(&a, &b).unwrap();
                let got = mul.forward_nhwc(&ta, &tb).unwrap();
                assert_eq!(transpose(&got, false), want, "mul {s:?} {l:?}");
                // squeeze-excite gate [n, c, 1, 1], either side
                let g = qtensor(&[s[0], s[1], 1, 1], 1.0 / 256.0, 0, &mut rng);
                let tg = transpose(&g, true);
                let want = mul.forward(&a, &g).unwrap();
                let got = mul.forward_nhwc(&ta, &tg).unwrap();
                assert_eq!(transpose(&got, false), want, "mul gate {s:?} {l:?}");
                let want = mul.forward(&g, &a).unwrap();
                let got = mul.forward_nhwc(&tg, &ta).unwrap();
                assert_eq!(transpose(&got, false), want, "gate mul {s:?} {l:?}");
            }
        }
    }
    // concatenation along each dimension, with inputs of the output's qparams and not
    for dim in 0..4 {
        for l in LAYOUTS {
            for relu in [false, true] {
                let base = [2usize, 5, 3, 4];
                let parts: Vec<QTensor> = [3usize, 1, 40]
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        let mut sh = base;
                        sh[dim] = n;
                        if i == 1 {
                            qtensor(&sh, 0.05, 20, &mut rng)
                        } else {
                            qtensor(&sh, 0.03 + i as f32 * 0.01, 7 * i as i32, &mut rng)
                        }
                    })
                    .collect();
                let mut cat = QCat::new(dim, 0.05, 20).unwrap().with_layout(l);
                if relu {
                    cat = cat.with_relu();
                }
                let refs: Vec<&QTensor> = parts.iter().collect();
                let want = cat.forward(&refs).unwrap();
                let held: Vec<QTensor> = parts.iter().map(|p| transpose(p, true)).collect();
                let refs: Vec<&QTensor> = held.iter().collect();
                let got = cat.forward_nhwc(&refs).unwrap();
                assert_eq!(
                    transpose(&got, false),
                    want,
                    "cat dim {dim} {l:?} relu {relu}"
                );
            }
        }
    }
    // shape errors on NHWC inputs
    let a = qtensor(&[1, 2, 2, 3], 0.1, 0, &mut rng);
    let b = qtensor(&[1, 2, 3, 3], 0.1, 0, &mut rng);
    assert!(QAdd::new(0.1, 0).unwrap().forward_nhwc(&a, &b).is_err());
    assert!(QMul::new(0.1, 0).unwrap().forward_nhwc(&a, &b).is_err());
    assert!(QCat::new(2, 0.1, 0)
        .unwrap()
        .forward_nhwc(&[&a, &b])
        .is_err());
}

// ---------------------------------------------------------------------------------------
// Graphs
// ---------------------------------------------------------------------------------------

fn data(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut rng = Lcg(seed);
    let n = shape.iter().product();
    ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|_| rng.f32()).collect()).unwrap()
}

fn conv(cin: usize, cout: usize, k: usize, seed: u64) -> Conv2d {
    let w = data(&[cout, cin, k, k], seed)
        .into_dimensionality()
        .unwrap()
        .mapv(|v: f32| v * 0.5);
    let b = data(&[cout], seed + 1).into_dimensionality().unwrap();
    Conv2d::new(w, Some(b)).unwrap().with_padding(k / 2, k / 2)
}

/// Every int8 op kind that has an NHWC path, with inputs held both ways: a quantized NCHW
/// input (PyTorch: contiguous) meets convolution outputs (NHWC, channels-last) in add,
/// mul and concat, and a spatial NHWC tensor is flattened into a linear layer.
fn mixed_graph() -> Graph {
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 3.into(), 12.into(), 12.into()])
        .unwrap();
    let q = g.quant_stub("quant", x).unwrap();
    let c1 = g
        .node("conv1", Op::ConvReLU2d(conv(3, 40, 3, 10)), &[q])
        .unwrap();
    let mp = g
        .max_pool2d(
            "maxpool",
            c1,
            Pool2dSpec::new(3, 3).with_stride(2, 2).with_padding(1, 1),
        )
        .unwrap();
    let ap = g
        .avg_pool2d(
            "avgpool",
            mp,
            Pool2dSpec::new(3, 3)
                .with_stride(1, 1)
                .with_padding(1, 1)
                .with_count_include_pad(false),
        )
        .unwrap();
    let hs = g.hardswish("hswish", ap).unwrap();
    // squeeze-excite
    let se = g.adaptive_avg_pool2d("se.pool", hs, (1, 1)).unwrap();
    let se = g.conv2d("se.fc", se, conv(40, 40, 1, 20)).unwrap();
    let se = g.hardsigmoid("se.gate", se).unwrap();
    let m = g.mul("se.mul", hs, se).unwrap();
    // an NCHW branch straight from the quant stub, 6x6
    let qp = g.avg_pool2d("qpool", q, Pool2dSpec::new(2, 2)).unwrap();
    let qc = g.conv2d("qconv", qp, conv(3, 3, 1, 30)).unwrap();
    let qa = g.add("qadd", qp, qc).unwrap(); // NCHW first input, NHWC second
    let cat = g.concat("cat", &[m, qa], 1).unwrap(); // NHWC and NCHW inputs
    let up = g
        .upsample(
            "up",
            cat,
            UpsampleSpec::scale(2.0, 2.0, UpsampleMode::Nearest(NearestRule::Floor)),
        )
        .unwrap();
    let bn = g
        .batch_norm2d("bn", up, {
            let mut b = BatchNorm::identity(43);
            b.weight = data(&[43], 40)
                .into_dimensionality::<ndarray::Ix1>()
                .unwrap()
                .mapv(|v| 1.0 + 0.5 * v);
            b.bias = data(&[43], 41).into_dimensionality().unwrap();
            b.running_mean = data(&[43], 42)
                .into_dimensionality::<ndarray::Ix1>()
                .unwrap()
                .mapv(|v| 0.3 * v);
            b
        })
        .unwrap();
    let r = g.relu("relu", bn).unwrap();
    let c6 = g.relu6("relu6", r).unwrap();
    let c2 = g.conv2d("conv2", c6, conv(43, 8, 3, 50)).unwrap();
    let sg = g.sigmoid("sigmoid", c2).unwrap();
    let sum = g.add_relu("add", sg, c2).unwrap();
    let ad = g.adaptive_avg_pool2d("pool23", sum, (2, 3)).unwrap();
    let f = g.flatten("flatten", ad, 1, -1).unwrap(); // spatial NHWC -> NCHW order
    let lw: Array2<f32> = data(&[5, 48], 60).into_dimensionality().unwrap();
    let l = g
        .linear("fc", f, Linear::new(lw, Some(Array1::zeros(5))).unwrap())
        .unwrap();
    let gp = g.adaptive_avg_pool2d("gpool", sum, (1, 1)).unwrap();
    let f2 = g.flatten("flatten1x1", gp, 1, -1).unwrap(); // free on NHWC
    let out = g.dequant_stub("dequant", l).unwrap();
    let out2 = g.dequant_stub("dequant2", f2).unwrap();
    g.output(out).unwrap();
    g.output(out2).unwrap();
    g.build().unwrap()
}

fn quantize(graph: Graph, shape: &[usize]) -> QuantizedGraph {
    let mut p = prepare(graph, &QConfigMap::new(QConfig::fbgemm())).unwrap();
    let batches: Vec<ArrayD<f32>> = (0..3).map(|i| data(shape, 100 + i)).collect();
    calibrate(&mut p, batches).unwrap();
    convert(p).unwrap()
}

fn nchw_value(v: &Value) -> Value {
    match v {
        Value::Int8(q) => {
            Value::Int8(QAct::new(q.nchw().into_owned(), Layout::Nchw, q.torch_layout()).unwrap())
        }
        f => f.clone(),
    }
}

/// Runs every node on NCHW inputs (the layout every op accepted before activations were
/// kept NHWC) and returns every node's output.
fn run_nchw(q: &QuantizedGraph, x: &ArrayD<f32>) -> Vec<Value> {
    let mut vals: Vec<Value> = Vec::new();
    for node in q.nodes() {
        if node.op().kind() == "Input" {
            vals.push(Value::Float(x.clone()));
            continue;
        }
        let args: Vec<Value> = node
            .inputs()
            .iter()
            .map(|&j| nchw_value(&vals[j]))
            .collect();
        let refs: Vec<&Value> = args.iter().collect();
        let y = node.op().forward(&refs, &mut ExecCtx::default()).unwrap();
        vals.push(y);
    }
    vals
}

/// Compares the usual run with the all-NCHW run node by node; returns the kinds of the
/// nodes whose int8 output stayed NHWC in the usual run.
fn compare(q: &QuantizedGraph, x: &ArrayD<f32>) -> Vec<&'static str> {
    let want = run_nchw(q, x);
    let mut got: Vec<(String, Value)> = Vec::new();
    let out = q
        .forward_with(std::slice::from_ref(x), &mut |name, v| {
            got.push((name.to_string(), v.clone()))
        })
        .unwrap();
    assert_eq!(got.len(), q.nodes().len());
    let mut nhwc = Vec::new();
    for ((node, (name, g)), w) in q.nodes().iter().zip(&got).zip(&want) {
        assert_eq!(node.name(), name);
        match (g, w) {
            (Value::Int8(a), Value::Int8(b)) => {
                assert_eq!(a.nchw().as_ref(), b.nchw().as_ref(), "node {name}");
                assert_eq!(a.torch_layout(), b.torch_layout(), "node {name}");
                if a.layout() == Layout::Nhwc {
                    nhwc.push(node.op().kind());
                }
            }
            (Value::Float(a), Value::Float(b)) => assert_eq!(a, b, "node {name}"),
            _ => panic!("node {name}: int8 vs float"),
        }
    }
    for (o, &i) in out.iter().zip(q.output_nodes()) {
        assert_eq!(o, want[i].to_f32().as_ref());
    }
    nhwc
}

#[test]
fn mixed_layout_graph_matches_the_all_nchw_run() {
    let q = quantize(mixed_graph(), &[2, 3, 12, 12]);
    let x = data(&[2, 3, 12, 12], 7);
    let nhwc = compare(&q, &x);
    for kind in [
        "ConvReLU2d",
        "MaxPool2d",
        "AvgPool2d",
        "Hardswish",
        "AdaptiveAvgPool2d",
        "Hardsigmoid",
        "Mul",
        "Add",
        "Concat",
        "Upsample",
        "BatchNorm2d",
        "ReLU",
        "Clamp",
        "Sigmoid",
        "AddReLU",
    ] {
        assert!(nhwc.contains(&kind), "{kind} did not run NHWC: {nhwc:?}");
    }
    // batch 1 too (other tails)
    let x1 = data(&[1, 3, 12, 12], 8);
    compare(&q, &x1);
    // Transposes only where an NCHW input meets NHWC work (the first convolutions after
    // the quantize border, the add whose first input comes straight from it) and at the
    // flatten of a spatial NHWC tensor; the 1x1 flatten and every other op move none.
    let prof = q.profile(std::slice::from_ref(&x)).unwrap();
    let moved: Vec<(&str, usize)> = prof
        .iter()
        .filter(|p| p.transposes > 0)
        .map(|p| (p.name.as_str(), p.transposes))
        .collect();
    assert_eq!(
        moved,
        [("conv1", 1), ("qconv", 1), ("qadd", 1), ("flatten", 1)]
    );
}

#[test]
fn zoo_graphs_match_the_all_nchw_run() {
    let archs: Vec<(&str, Graph)> = vec![
        (
            "mobilenet_v3_large",
            zoo::mobilenet_v3_large(0.25, true, 10, (32, 32)).unwrap(),
        ),
        (
            "shufflenet_v2",
            zoo::shufflenet_v2([2, 2, 2], [8, 16, 32, 64, 128], 10, (32, 32)).unwrap(),
        ),
        ("resnet18", zoo::resnet18(4, 10, (32, 32)).unwrap()),
    ];
    for (arch, mut g) in archs {
        // random weights by name (the zoo's are zeros)
        let mut sd = std::collections::BTreeMap::new();
        for (i, (name, shape)) in g.state_dict_keys().into_iter().enumerate() {
            let mut t = data(&shape, 1000 + i as u64);
            if name.ends_with("running_var") {
                t.mapv_inplace(|v| v.abs() + 0.5);
            } else if name.ends_with(".weight") && shape.len() == 1 {
                t.mapv_inplace(|v| 1.0 + 0.2 * v);
            } else if name.ends_with(".weight") {
                let fan: usize = shape[1..].iter().product();
                let s = (3.0 / fan as f32).sqrt();
                t.mapv_inplace(|v| v * s);
            }
            sd.insert(name, t);
        }
        g.load_state_dict(&sd, true).unwrap();
        let q = quantize(g, &[2, 3, 32, 32]);
        let x = data(&[2, 3, 32, 32], 9);
        let nhwc = compare(&q, &x);
        assert!(nhwc.len() > 10, "{arch}: {nhwc:?}");
        let prof = q.profile(std::slice::from_ref(&x)).unwrap();
        let moved: Vec<(&str, usize)> = prof
            .iter()
            .filter(|p| p.transposes > 0)
            .map(|p| (p.name.as_str(), p.transposes))
            .collect();
        eprintln!(
            "{arch}: {} nodes ran NHWC; transposes {moved:?}",
            nhwc.len()
        );
        if arch != "shufflenet_v2" {
            // one transpose in the whole network: the stem's input
            assert_eq!(moved.len(), 1, "{arch}: {moved:?}");
            assert_eq!(moved[0].1, 1, "{arch}: {moved:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The Sequential executor
// ---------------------------------------------------------------------------------------

#[test]
fn sequential_model_keeps_nhwc_and_matches_its_layers() {
    use ptq::nn::{Layer, Pool2d, PoolKind, Sequential};
    let conv4 = |cin, cout, k, seed| -> Conv2d { conv(cin, cout, k, seed) };
    let mut body = Sequential::new();
    body = body.push("conv1", Layer::ConvReLU2d(conv4(40, 40, 3, 5)));
    body = body.push("conv2", Layer::Conv2d(conv4(40, 40, 3, 6)));
    let mut mp = Pool2d::new(PoolKind::Max, 3, 3);
    mp.stride = (2, 2);
    mp.padding = (1, 1);
    let mut ap = Pool2d::new(PoolKind::Avg, 2, 2);
    ap.stride = (1, 1);
    let lw: Array2<f32> = data(&[7, 40 * 4], 70).into_dimensionality().unwrap();
    let model = Sequential::new()
        .push("quant", Layer::QuantStub)
        .push("stem", Layer::ConvReLU2d(conv4(3, 40, 3, 4)))
        .push("pool", Layer::Pool2d(mp))
        .push("res", Layer::Residual(body))
        .push("relu", Layer::ReLU)
        .push("relu6", Layer::ReLU6)
        .push("avg", Layer::Pool2d(ap))
        .push("adapt", Layer::AdaptiveAvgPool2d((2, 2)))
        .push("flatten", Layer::Flatten { start_dim: 1 })
        .push("fc", Layer::Linear(Linear::new(lw, None).unwrap()))
        .push("dequant", Layer::DeQuantStub);
    let batches: Vec<ArrayD<f32>> = (0..3).map(|i| data(&[2, 3, 11, 11], 200 + i)).collect();
    let q =
        ptq::workflow::quantize_model(model.clone(), &QConfigMap::new(QConfig::fbgemm()), &batches)
            .unwrap();
    // The hook reports every step's output in logical order; the last is the output.
    for x in [data(&[2, 3, 11, 11], 300), data(&[1, 3, 11, 11], 301)] {
        let mut outs: Vec<(String, ArrayD<f32>)> = Vec::new();
        let y = q
            .forward_with_hook(&x, &mut |p, v| outs.push((p.to_string(), v.clone())))
            .unwrap();
        assert_eq!(&outs.last().unwrap().1, &y);
        // int8 end to end equals the NCHW reference computed with the layer types
        let want = sequential_nchw_reference(&model, &q, &x);
        assert_eq!(y, want);
    }
}

/// The Sequential model's layers run with the NCHW `forward` of the `nn::quantized` layers,
/// built from the float layers' hyperparameters and the converted model's int8 weights,
/// weight qparams and output qparams (PyTorch's memory format: channels-last after a
/// convolution, as its add and pools see it).
fn sequential_nchw_reference(
    model: &ptq::nn::Sequential,
    q: &ptq::nn::quantized::QuantizedModel,
    x: &ArrayD<f32>,
) -> ArrayD<f32> {
    use ptq::nn::quantized::{Conv2dParams, QConv2d, QConvReLU2d, QFlatten, QLinear, QReLU};
    use ptq::nn::{Layer, PoolKind, Sequential};
    enum A {
        F(ArrayD<f32>),
        Q(QTensor),
    }
    fn run(q: &ptq::nn::quantized::QuantizedModel, seq: &Sequential, prefix: &str, mut a: A) -> A {
        for (name, layer) in seq.children() {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            let qv = |a: A| match a {
                A::Q(t) => t,
                A::F(_) => panic!("{path}: float"),
            };
            let out = || q.output_qparams(&path).unwrap().unwrap();
            let weight = || q.weight(&path).unwrap().unwrap();
            let cl = TorchLayout::ChannelsLast;
            a = match layer {
                Layer::QuantStub => match a {
                    A::F(x) => {
                        A::Q(QTensor::from_f32(&x, out().scale(), out().zero_point()).unwrap())
                    }
                    A::Q(_) => panic!(),
                },
                Layer::DeQuantStub => A::F(qv(a).dequantize()),
                Layer::Linear(l) => {
                    let (w, wq) = weight();
                    let w = w.into_dimensionality().unwrap();
                    let bias = l.bias.as_ref().map(|b| b.view());
                    let (s, z) = (out().scale(), out().zero_point());
                    A::Q(
                        QLinear::from_quantized(w.view(), &wq, bias, s, z)
                            .unwrap()
                            .forward(&qv(a))
                            .unwrap(),
                    )
                }
                Layer::Conv2d(c) | Layer::ConvReLU2d(c) => {
                    let (w, wq) = weight();
                    let w = w.into_dimensionality().unwrap();
                    let bias = c.bias.as_ref().map(|b| b.view());
                    let p = Conv2dParams {
                        stride: c.stride,
                        padding: c.padding,
                        dilation: c.dilation,
                        groups: c.groups,
                    };
                    let (s, z) = (out().scale(), out().zero_point());
                    let t = qv(a);
                    A::Q(if matches!(layer, Layer::ConvReLU2d(_)) {
                        QConvReLU2d::from_quantized(w.view(), &wq, bias, p, s, z)
                            .unwrap()
                            .forward(&t)
                            .unwrap()
                    } else {
                        QConv2d::from_quantized(w.view(), &wq, bias, p, s, z)
                            .unwrap()
                            .forward(&t)
                            .unwrap()
                    })
                }
                Layer::ReLU => A::Q(QReLU.forward(&qv(a)).unwrap()),
                Layer::ReLU6 => {
                    let t = qv(a);
                    let lo = t.zero_point() as u8;
                    let q6 = ptq::quantize_val(6.0, t.scale(), t.zero_point(), 0, 255) as u8;
                    let d = t.data().mapv(|v| v.clamp(lo, q6.max(lo)));
                    A::Q(QTensor::new(d, t.scale(), t.zero_point()).unwrap())
                }
                Layer::Pool2d(p) => {
                    let t = qv(a);
                    A::Q(match p.kind {
                        PoolKind::Max => QMaxPool2d::new(p.kernel, p.stride, p.padding, (1, 1))
                            .unwrap()
                            .forward(&t)
                            .unwrap(),
                        PoolKind::Avg => QAvgPool2d::new(p.kernel, p.stride, p.padding, true)
                            .unwrap()
                            .with_layout(cl)
                            .forward(&t)
                            .unwrap(),
                    })
                }
                Layer::AdaptiveAvgPool2d(o) => A::Q(
                    QAdaptiveAvgPool2d::new(*o)
                        .unwrap()
                        .with_layout(cl)
                        .forward(&qv(a))
                        .unwrap(),
                ),
                Layer::Flatten { start_dim } => {
                    assert_eq!(*start_dim, 1);
                    A::Q(QFlatten.forward(&qv(a)).unwrap())
                }
                Layer::Residual(body) => {
                    let skip = qv(a);
                    let y = qv(run(q, body, &path, A::Q(skip.clone())));
                    let add = QAdd::new(out().scale(), out().zero_point())
                        .unwrap()
                        .with_layout(cl);
                    A::Q(add.forward(&skip, &y).unwrap())
                }
                other => panic!("{path}: {} not in this test", other.type_name()),
            };
        }
        a
    }
    match run(q, model, "", A::F(x.clone())) {
        A::F(y) => y,
        A::Q(_) => panic!("int8 output"),
    }
}

#[test]
fn trivial_layouts_convert_without_transposes() {
    // one pixel or one channel: NCHW and NHWC hold the same bytes
    let mut rng = Lcg(5);
    for s in [[2usize, 7, 1, 1], [2, 1, 3, 4], [1, 1, 1, 1]] {
        let t = qtensor(&s, 0.1, 3, &mut rng);
        let a = QAct::contiguous(t.clone());
        assert!(!a.needs_transpose(Layout::Nhwc), "{s:?}");
        let n = a.nhwc("t").unwrap().into_owned();
        assert_eq!(n.data().as_slice().unwrap(), t.data().as_slice().unwrap());
        let b = QAct::new(n, Layout::Nhwc, TorchLayout::ChannelsLast).unwrap();
        assert!(!b.needs_transpose(Layout::Nchw));
        assert_eq!(b.nchw().as_ref(), &t);
    }
    let t = qtensor(&[1, 2, 2, 2], 0.1, 3, &mut rng);
    assert!(QAct::contiguous(t).needs_transpose(Layout::Nhwc));
}
