//! Float forward of every graph op against PyTorch (tests/fixtures/graph_ops.safetensors,
//! made by tools/gen_graph_fixtures.py): each case runs as a one-node graph and must
//! match within `1e-5 * max(|torch|, 1)`, with NaN exactly where PyTorch has NaN.

use std::collections::{BTreeMap, HashMap};

use ndarray::{Array1, Array2, Array4, ArrayD, Ix1, Ix2, Ix4};
use ptq::graph::{
    BatchNorm, Dim, GraphBuilder, LayerNorm, NearestRule, Op, Pool2dSpec, UpsampleMode,
    UpsampleSpec,
};
use ptq::nn::{Conv2d, Linear};

struct Case<'a> {
    params: HashMap<&'a str, &'a str>,
}

impl Case<'_> {
    fn s(&self, k: &str) -> &str {
        self.params.get(k).unwrap_or_else(|| panic!("missing {k}"))
    }
    fn nums<T: std::str::FromStr>(&self, k: &str) -> Vec<T>
    where
        T::Err: std::fmt::Debug,
    {
        self.s(k).split(',').map(|v| v.parse().unwrap()).collect()
    }
    fn u(&self, k: &str) -> usize {
        self.nums::<usize>(k)[0]
    }
    fn pair(&self, k: &str) -> (usize, usize) {
        let v = self.nums::<usize>(k);
        (v[0], v[1])
    }
    fn f(&self, k: &str) -> f32 {
        self.s(k).parse().unwrap()
    }
    fn b(&self, k: &str) -> bool {
        self.s(k) == "1"
    }
}

fn vec1(a: &ArrayD<f32>) -> Array1<f32> {
    a.clone().into_dimensionality::<Ix1>().unwrap()
}

/// The op of a case and how many of its `in` tensors are data inputs (the rest are
/// parameters).
fn op_of(c: &Case, ins: &[&ArrayD<f32>]) -> (Op, usize) {
    match c.s("op") {
        "relu" => (Op::ReLU, 1),
        "clamp" => (
            Op::Clamp {
                min: c.f("min"),
                max: c.f("max"),
            },
            1,
        ),
        "hardswish" => (Op::Hardswish, 1),
        "hardsigmoid" => (Op::Hardsigmoid, 1),
        "sigmoid" => (Op::Sigmoid, 1),
        "silu" => (Op::SiLU, 1),
        "gelu" => (Op::Gelu { tanh: c.b("tanh") }, 1),
        "softmax" => (Op::Softmax { axis: c.u("axis") }, 1),
        "layer_norm" => (
            Op::LayerNorm(LayerNorm {
                normalized_shape: c.nums("shape"),
                weight: Some(ins[1].clone()),
                bias: Some(ins[2].clone()),
                eps: c.f("eps"),
            }),
            1,
        ),
        "batch_norm" => {
            let bn = BatchNorm {
                weight: vec1(ins[1]),
                bias: vec1(ins[2]),
                running_mean: vec1(ins[3]),
                running_var: vec1(ins[4]),
                eps: c.f("eps"),
            };
            if ins[0].ndim() == 4 {
                (Op::BatchNorm2d(bn), 1)
            } else {
                (Op::BatchNorm1d(bn), 1)
            }
        }
        "add" => (Op::Add, 2),
        "mul" => (Op::Mul, 2),
        "concat" => (Op::Concat { axis: c.u("axis") }, ins.len()),
        "max_pool2d" | "avg_pool2d" => {
            let (kh, kw) = c.pair("k");
            let (ph, pw) = c.pair("p");
            let mut spec = Pool2dSpec::new(kh, kw)
                .with_stride(c.pair("s").0, c.pair("s").1)
                .with_padding(ph, pw)
                .with_ceil_mode(c.b("ceil"));
            if c.s("op") == "max_pool2d" {
                spec = spec.with_dilation(c.pair("d").0, c.pair("d").1);
                (Op::MaxPool2d(spec), 1)
            } else {
                let div = c.u("div");
                spec = spec
                    .with_count_include_pad(c.b("cip"))
                    .with_divisor_override((div > 0).then_some(div));
                (Op::AvgPool2d(spec), 1)
            }
        }
        "adaptive_avg_pool2d" => (Op::AdaptiveAvgPool2d(c.pair("out")), 1),
        "mean" => (
            Op::Mean {
                dims: c.nums("dims"),
                keepdim: c.b("keepdim"),
            },
            1,
        ),
        "upsample" => {
            let mode = match c.s("mode") {
                "nearest" => UpsampleMode::Nearest(NearestRule::Floor),
                "nearest-exact" => UpsampleMode::Nearest(NearestRule::Exact),
                "bilinear" => UpsampleMode::Bilinear {
                    align_corners: c.b("align"),
                },
                m => panic!("mode {m}"),
            };
            let spec = if c.params.contains_key("size") {
                let (h, w) = c.pair("size");
                UpsampleSpec::size(h, w, mode)
            } else {
                let v = c.nums::<f32>("scale");
                UpsampleSpec::scale(v[0], v[1], mode)
            };
            (Op::Upsample(spec), 1)
        }
        "conv2d" => {
            let w: Array4<f32> = ins[1].clone().into_dimensionality::<Ix4>().unwrap();
            let b = ins.get(2).map(|b| vec1(b));
            let p = c.nums::<usize>("pad");
            let (sh, sw) = c.pair("stride");
            let (dh, dw) = c.pair("dilation");
            let conv = Conv2d::new(w, b)
                .unwrap()
                .with_stride(sh, sw)
                .with_dilation(dh, dw)
                .with_groups(c.u("groups"))
                .with_padding_tlbr(p[0], p[1], p[2], p[3]);
            (Op::Conv2d(conv), 1)
        }
        "linear" => {
            let w: Array2<f32> = ins[1].clone().into_dimensionality::<Ix2>().unwrap();
            (Op::Linear(Linear::new(w, Some(vec1(ins[2]))).unwrap()), 1)
        }
        "flatten" => (
            Op::Flatten {
                start_dim: c.u("start"),
                end_dim: c.s("end").parse().unwrap(),
            },
            1,
        ),
        "reshape" => (
            Op::Reshape {
                shape: c.nums("shape"),
            },
            1,
        ),
        "permute" => (
            Op::Permute {
                dims: c.nums("dims"),
            },
            1,
        ),
        "slice" => (
            Op::Slice {
                axis: c.u("axis"),
                start: c.u("start"),
                end: c.u("end"),
            },
            1,
        ),
        other => panic!("unknown op {other}"),
    }
}

#[test]
fn every_op_matches_pytorch_including_nan() {
    let path = format!(
        "{}/tests/fixtures/graph_ops.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let tensors = ptq::io::parse_safetensors(&bytes, "graph_ops").unwrap();
    let mut per_op: BTreeMap<String, (usize, usize, f32)> = BTreeMap::new();
    let mut cases: Vec<(usize, &String)> =
        meta.iter().map(|(k, v)| (k.parse().unwrap(), v)).collect();
    cases.sort();
    assert_eq!(cases.len(), 76, "fixture case count");
    for (i, spec) in cases {
        let params: HashMap<&str, &str> = spec
            .split(' ')
            .map(|kv| kv.split_once('=').unwrap())
            .collect();
        let c = Case { params };
        let ins: Vec<&ArrayD<f32>> = c.s("in").split(',').map(|k| &tensors[k]).collect();
        let expect = &tensors[&format!("{i}.y")];
        let (op, n_data) = op_of(&c, &ins);
        let mut g = GraphBuilder::new();
        let ids: Vec<_> = ins[..n_data]
            .iter()
            .enumerate()
            .map(|(j, x)| {
                let dims: Vec<Dim> = x.shape().iter().map(|&d| d.into()).collect();
                g.input(&format!("x{j}"), &dims).unwrap()
            })
            .collect();
        let y = g
            .node("op", op, &ids)
            .unwrap_or_else(|e| panic!("case {i} ({spec}): {e}"));
        assert_eq!(
            g.shape(y).unwrap().to_concrete(0),
            expect.shape(),
            "case {i} ({spec}): inferred shape"
        );
        g.output(y).unwrap();
        let graph = g.build().unwrap();
        let data: Vec<ArrayD<f32>> = ins[..n_data].iter().map(|x| (*x).clone()).collect();
        let out = graph
            .forward(&data)
            .unwrap_or_else(|e| panic!("case {i} ({spec}): {e}"))
            .remove(0);
        assert_eq!(out.shape(), expect.shape(), "case {i} ({spec})");
        let entry = per_op.entry(c.s("op").to_string()).or_default();
        entry.0 += 1;
        for (a, b) in out.iter().zip(expect.iter()) {
            entry.1 += b.is_nan() as usize;
            if b.is_nan() || a.is_nan() {
                assert!(
                    a.is_nan() && b.is_nan(),
                    "case {i} ({spec}): ptq {a} vs torch {b}"
                );
                continue;
            }
            let err = (a - b).abs() / b.abs().max(1.0);
            entry.2 = entry.2.max(err);
            assert!(err <= 1e-5, "case {i} ({spec}): ptq {a} vs torch {b}");
        }
    }
    for (op, (n, nans, worst)) in &per_op {
        eprintln!("{op:>20}: {n:2} case(s), {nans:3} NaN outputs, worst error {worst:.1e}");
    }
    for op in [
        "relu",
        "clamp",
        "hardswish",
        "hardsigmoid",
        "sigmoid",
        "silu",
        "gelu",
        "softmax",
        "layer_norm",
        "batch_norm",
        "add",
        "mul",
        "concat",
        "max_pool2d",
        "avg_pool2d",
        "adaptive_avg_pool2d",
        "mean",
        "upsample",
        "conv2d",
        "linear",
        "flatten",
        "reshape",
        "permute",
        "slice",
    ] {
        assert!(per_op.contains_key(op), "no case for {op}");
    }
    assert!(
        per_op["max_pool2d"].1 > 0 && per_op["relu"].1 > 0,
        "NaN cases present"
    );
}
