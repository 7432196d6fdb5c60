//! Graph IR core: builder shape checks, names, forward / taps / visitor, lowering from
//! `Sequential`, loading a state_dict by node name, NaN propagation.

use std::collections::BTreeMap;

use ndarray::{Array, Array1, Array2, Array4, ArrayD, IxDyn};
use ptq::graph::{Dim, Graph, GraphBuilder, Node, Op, OpKind, Pool2dSpec, Shape};
use ptq::nn::{BatchNorm2d, Conv2d, Layer, Linear, Pool2d, PoolKind, Sequential};
use ptq::QuantError;

fn ramp(shape: &[usize], k: f32) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    ArrayD::from_shape_vec(
        IxDyn(shape),
        (0..n).map(|i| ((i as f32) * k).sin()).collect(),
    )
    .unwrap()
}

fn conv(o: usize, i: usize, k: usize) -> Conv2d {
    let w = Array::from_shape_fn((o, i, k, k), |(a, b, c, d)| {
        ((a * 7 + b * 3 + c * 2 + d) as f32 * 0.3).cos() * 0.2
    });
    Conv2d::new(w, Some(Array1::linspace(-0.1, 0.1, o))).unwrap()
}

/// A ResNet basic block with a downsample branch: the topology `Residual` cannot express.
fn downsample_block() -> (Graph, Vec<ptq::NodeId>) {
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 4.into(), 8.into(), 8.into()])
        .unwrap();
    let q = g.quant_stub("quant", x).unwrap();
    let y = g
        .conv2d(
            "layer.0.conv1",
            q,
            conv(8, 4, 3).with_stride(2, 2).with_padding(1, 1),
        )
        .unwrap();
    let y = g
        .batch_norm2d("layer.0.bn1", y, BatchNorm2d::identity(8))
        .unwrap();
    let y = g.relu("layer.0.relu", y).unwrap();
    let y = g
        .conv2d("layer.0.conv2", y, conv(8, 8, 3).with_padding(1, 1))
        .unwrap();
    let d = g
        .conv2d("layer.0.downsample.0", q, conv(8, 4, 1).with_stride(2, 2))
        .unwrap();
    let z = g.add_relu("layer.0.add_relu", y, d).unwrap();
    let out = g.dequant_stub("dequant", z).unwrap();
    g.output(out).unwrap();
    (g.build().unwrap(), vec![x, y, d, z])
}

#[test]
fn builder_infers_shapes_and_names_the_node_on_errors() {
    let (graph, ids) = downsample_block();
    assert_eq!(graph.node(ids[3]).shape.to_string(), "[N, 8, 4, 4]");
    assert_eq!(graph.node(ids[3]).op.kind(), OpKind::AddReLU);
    assert_eq!(graph.find("layer.0.downsample.0"), Some(ids[2]));
    assert_eq!(graph.consumers(graph.find("quant").unwrap()).len(), 2);

    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 4.into(), 8.into(), 8.into()])
        .unwrap();
    let a = g.conv2d("a", x, conv(8, 4, 3)).unwrap();
    let err = g.add("add", a, x).unwrap_err();
    assert_eq!(
        err.to_string(),
        "add: shape mismatch: expected shapes that broadcast (numpy rules: equal dims or one of them 1), got inputs of shapes [N, 8, 6, 6], [N, 4, 8, 8]"
    );
    let err = g.conv2d("c", a, conv(8, 4, 3)).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("c: shape mismatch: expected [N, 4, H, W]"),
        "{err}"
    );
    let err = g.relu("a", x).unwrap_err();
    assert!(
        err.to_string().contains("duplicate node name \"a\""),
        "{err}"
    );
    let err = g.concat("cat", &[a, x], 1).unwrap_err();
    assert!(
        err.to_string().contains("equal except along axis 1"),
        "{err}"
    );
    assert!(g.input("y", &[3.into(), Dim::Batch]).is_err());
    assert!(g.flatten("f0", x, 0, -1).is_err()); // would merge the dynamic batch
    assert!(g.clamp("cl", x, 1.0, 0.0).is_err());
    // No outputs: build refuses.
    assert!(GraphBuilder::new().build().is_err());
}

#[test]
fn forward_taps_every_node_in_order_and_checks_inputs() {
    let (graph, _) = downsample_block();
    let x = ramp(&[3, 4, 8, 8], 0.37);
    let mut seen = Vec::new();
    let out = graph
        .forward_with(
            std::slice::from_ref(&x),
            &mut |n: &Node, y: &ArrayD<f32>| {
                assert!(n.shape.admits(y.shape()), "{} {:?}", n.name, y.shape());
                seen.push(n.name.clone());
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(seen.len(), graph.nodes().len());
    assert_eq!(seen[0], "x");
    assert_eq!(out[0].shape(), &[3, 8, 4, 4]);
    // Same values as composing the layers by hand.
    let c1 = conv(8, 4, 3).with_stride(2, 2).with_padding(1, 1);
    let body = conv(8, 8, 3)
        .with_padding(1, 1)
        .forward(&c1.forward(&x).unwrap().mapv(|v| v.max(0.0)))
        .unwrap();
    let skip = conv(8, 4, 1).with_stride(2, 2).forward(&x).unwrap();
    let expect = (body + skip).mapv(|v| v.max(0.0));
    for (a, b) in out[0].iter().zip(expect.iter()) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
    // A visitor sees the same order.
    let mut names = Vec::new();
    graph
        .visit(&mut |_: &Graph, n: &Node| {
            names.push(n.name.clone());
            Ok(())
        })
        .unwrap();
    assert_eq!(names, seen);
    // Bad inputs are errors naming the input.
    let err = graph.forward(&[ramp(&[1, 3, 8, 8], 1.0)]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("x: shape mismatch: expected [N, 4, 8, 8]"),
        "{err}"
    );
    assert!(graph.forward(&[]).is_err());
    // A tap's error stops the pass.
    let err = graph
        .forward_with(&[x], &mut |n: &Node, _: &ArrayD<f32>| {
            if n.name == "layer.0.relu" {
                Err(QuantError::NothingToQuantize {
                    reason: "stop".into(),
                })
            } else {
                Ok(())
            }
        })
        .unwrap_err();
    assert!(err.to_string().contains("stop"));
}

#[test]
fn several_inputs_and_outputs() {
    let mut g = GraphBuilder::new();
    let a = g.input("a", &[Dim::Batch, 3.into()]).unwrap();
    let b = g.input("b", &[Dim::Batch, 1.into()]).unwrap();
    let m = g.mul("mul", a, b).unwrap();
    let s = g.add("add", m, a).unwrap();
    g.output(s).unwrap();
    g.output(m).unwrap();
    let graph = g.build().unwrap();
    let x = ramp(&[2, 3], 0.5);
    let y = ArrayD::from_shape_vec(IxDyn(&[2, 1]), vec![2.0, -1.0]).unwrap();
    let out = graph.forward(&[x.clone(), y]).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[1][[0, 2]], x[[0, 2]] * 2.0);
    assert_eq!(out[0][[1, 1]], -x[[1, 1]] + x[[1, 1]]);
    // Batch sizes must agree.
    assert!(graph
        .forward(&[ramp(&[2, 3], 0.5), ramp(&[3, 1], 0.5)])
        .is_err());
}

#[test]
fn nan_propagates_through_relu_clamp_and_max_pool_in_graph_and_nn() {
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 1.into(), 2.into(), 2.into()])
        .unwrap();
    let r = g.relu("relu", x).unwrap();
    let c = g.relu6("relu6", r).unwrap();
    let p = g.max_pool2d("pool", c, Pool2dSpec::new(2, 2)).unwrap();
    g.output(p).unwrap();
    let graph = g.build().unwrap();
    let x = ArrayD::from_shape_vec(IxDyn(&[1, 1, 2, 2]), vec![-1.0, f32::NAN, 7.0, 1.0]).unwrap();
    assert!(graph.forward(std::slice::from_ref(&x)).unwrap()[0][[0, 0, 0, 0]].is_nan());
    let seq = Sequential::new()
        .push("relu", Layer::ReLU)
        .push("relu6", Layer::ReLU6)
        .push("pool", Layer::Pool2d(Pool2d::new(PoolKind::Max, 2, 2)));
    assert!(seq.forward(&x).unwrap()[[0, 0, 0, 0]].is_nan());
    let relu = Layer::ReLU.forward(&x).unwrap();
    assert!(relu[[0, 0, 0, 1]].is_nan() && relu[[0, 0, 0, 0]] == 0.0);
}

#[test]
fn asymmetric_conv_padding_equals_explicit_zero_padding() {
    let c = conv(3, 2, 3).with_padding_tlbr(0, 1, 2, 0);
    assert_eq!(c.padding_tlbr(), (0, 1, 2, 0));
    let x = ramp(&[1, 2, 5, 6], 0.21);
    let y = c.forward(&x).unwrap();
    // Pad by hand: 0 top, 1 left, 2 bottom, 0 right; then a padding-free conv.
    let mut padded = Array4::<f32>::zeros((1, 2, 7, 7));
    for ((b, ch, i, j), v) in x
        .clone()
        .into_dimensionality::<ndarray::Ix4>()
        .unwrap()
        .indexed_iter()
    {
        padded[[b, ch, i, j + 1]] = *v;
    }
    let r = conv(3, 2, 3).forward(&padded.into_dyn()).unwrap();
    assert_eq!(y.shape(), &[1, 3, 5, 5]);
    assert_eq!(y, r);
    let mut g = GraphBuilder::new();
    let xi = g
        .input("x", &[Dim::Batch, 2.into(), 5.into(), 6.into()])
        .unwrap();
    let o = g.conv2d("conv", xi, c).unwrap();
    assert_eq!(
        g.shape(o).unwrap(),
        &Shape(vec![Dim::Batch, 3.into(), 5.into(), 5.into()])
    );
}

fn small_sequential() -> Sequential {
    let body = Sequential::new()
        .push("conv", Layer::Conv2d(conv(4, 4, 3).with_padding(1, 1)))
        .push("bn", Layer::BatchNorm2d(BatchNorm2d::identity(4)))
        .push("relu", Layer::ReLU);
    Sequential::new()
        .push("quant", Layer::QuantStub)
        .push("stem", Layer::ConvReLU2d(conv(4, 3, 3)))
        .push("block", Layer::Residual(body))
        .push("pool", Layer::AdaptiveAvgPool2d((1, 1)))
        .push("flatten", Layer::Flatten { start_dim: 1 })
        .push(
            "fc",
            Layer::Linear(
                Linear::new(Array2::from_elem((2, 4), 0.25), Some(Array1::zeros(2))).unwrap(),
            ),
        )
        .push("dequant", Layer::DeQuantStub)
}

#[test]
fn sequential_lowers_with_names_and_same_outputs() {
    let seq = small_sequential();
    let graph = Graph::from_sequential(&seq, &[Dim::Batch, 3.into(), 7.into(), 7.into()]).unwrap();
    let names: Vec<&str> = graph.nodes().iter().map(|n| n.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "input",
            "quant",
            "stem",
            "block.conv",
            "block.bn",
            "block.relu",
            "block",
            "pool",
            "flatten",
            "fc",
            "dequant"
        ]
    );
    let add = graph.node(graph.find("block").unwrap());
    assert!(matches!(add.op, Op::Add));
    assert_eq!(add.inputs[1], graph.find("stem").unwrap()); // the identity skip
    let x = ramp(&[2, 3, 7, 7], 0.13);
    assert_eq!(
        graph.forward(std::slice::from_ref(&x)).unwrap()[0],
        seq.forward(&x).unwrap()
    );
    // state_dict keys follow PyTorch's names.
    let keys: Vec<String> = graph
        .state_dict_keys()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys[0], "stem.weight");
    assert!(keys.contains(&"block.bn.running_var".to_string()));
    // A shape error names the layer's path.
    let err =
        Graph::from_sequential(&seq, &[Dim::Batch, 2.into(), 7.into(), 7.into()]).unwrap_err();
    assert!(err.to_string().starts_with("stem: shape mismatch"), "{err}");
}

#[test]
fn strict_state_dict_loading_by_node_name_lists_every_problem() {
    let seq = small_sequential();
    let mut graph =
        Graph::from_sequential(&seq, &[Dim::Batch, 3.into(), 7.into(), 7.into()]).unwrap();
    let mut sd: BTreeMap<String, ArrayD<f32>> = graph
        .state_dict_keys()
        .into_iter()
        .map(|(k, s)| (k, ArrayD::from_elem(IxDyn(&s), 0.5f32)))
        .collect();
    sd.insert(
        "block.bn.num_batches_tracked".into(),
        ArrayD::zeros(IxDyn(&[])),
    );
    let report = graph.load_state_dict(&sd, true).unwrap();
    assert_eq!(report.loaded.len(), graph.state_dict_keys().len());
    let Op::Linear(fc) = &graph.node(graph.find("fc").unwrap()).op else {
        panic!("fc is linear")
    };
    assert!(fc.weight.iter().all(|&v| v == 0.5));

    sd.remove("stem.bias");
    sd.insert("block.conv.weigth".into(), ArrayD::zeros(IxDyn(&[1])));
    sd.insert("fc.weight".into(), ArrayD::zeros(IxDyn(&[4, 2])));
    match graph.load_state_dict(&sd, true).unwrap_err() {
        QuantError::StateDictMismatch {
            missing,
            unexpected,
            mismatched,
        } => {
            assert_eq!(missing, ["stem.bias"]);
            assert_eq!(unexpected, ["block.conv.weigth"]);
            assert_eq!(mismatched, ["fc.weight: model [2, 4], file [4, 2]"]);
        }
        e => panic!("unexpected error {e}"),
    }
}

#[test]
fn linear_on_batched_3d_inputs_never_panics() {
    // Found by tests/graph_prop.rs: `dot` can return a column-major product, which the
    // old reshape at the end of Linear::forward refused with a panic.
    for rows in 1..=4 {
        for inner in 1..=6 {
            for out in 1..=5 {
                let x = ramp(&[rows, 2, inner], 0.3);
                let w = Array2::from_shape_fn((out, inner), |(i, j)| (i * inner + j) as f32 * 0.1);
                let y = Linear::new(w.clone(), None).unwrap().forward(&x).unwrap();
                assert_eq!(y.shape(), &[rows, 2, out]);
                for r in 0..rows {
                    for o in 0..out {
                        let want: f32 = (0..inner).map(|k| x[[r, 1, k]] * w[[o, k]]).sum();
                        assert!((y[[r, 1, o]] - want).abs() < 1e-5);
                    }
                }
            }
        }
    }
}

#[test]
fn hand_made_parameters_that_disagree_are_errors_not_panics() {
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 2.into(), 4.into(), 4.into()])
        .unwrap();
    let mut bn = BatchNorm2d::identity(2);
    bn.bias = Array1::zeros(3);
    let err = g.batch_norm2d("bn", x, bn).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("unsupported configuration for bn: weight, bias"),
        "{err}"
    );
    let mut c = conv(3, 2, 1);
    c.bias = Some(Array1::zeros(2));
    assert!(g
        .conv2d("c", x, c)
        .unwrap_err()
        .to_string()
        .contains("bias of 2 elements for 3 output channels"));
    let f = g.flatten("f", x, 1, -1).unwrap();
    let mut l = Linear::new(Array2::zeros((2, 32)), None).unwrap();
    l.bias = Some(Array1::zeros(5));
    assert!(g.linear("l", f, l).is_err());
    let empty = Linear::new(Array2::zeros((2, 0)), None).unwrap();
    assert!(g.linear("l0", f, empty).is_err());
    let huge = ptq::graph::UpsampleSpec::scale(
        1e9,
        1e9,
        ptq::graph::UpsampleMode::Bilinear {
            align_corners: false,
        },
    );
    assert!(g.upsample("up", x, huge).is_err());
    let mut ln = ptq::graph::LayerNorm::new(&[4]);
    ln.eps = f32::NAN;
    assert!(g.layer_norm("ln", x, ln).is_err());
    // Unknown ids from another builder are errors too.
    let mut other = GraphBuilder::new();
    let far = (0..5).fold(other.input("a", &[3.into()]).unwrap(), |id, i| {
        other.relu(&format!("r{i}"), id).unwrap()
    });
    assert!(g.relu("r", far).is_err());
    assert!(g.output(far).is_err());
}

#[test]
fn gelu_of_zero_and_erf_at_special_points() {
    // erf(0) once looped forever (a series stopping rule relative to a zero sum).
    assert_eq!(ptq::graph::ops::erf(0.0), 0.0);
    assert_eq!(ptq::graph::ops::erf(-0.0), 0.0);
    assert!((ptq::graph::ops::erf(1.0) - 0.842_700_792_949_714_9).abs() < 1e-13);
    assert!((ptq::graph::ops::erf(-3.5) + 0.999_999_256_901_627_7).abs() < 1e-13);
    assert_eq!(ptq::graph::ops::erf(40.0), 1.0);
    assert!(ptq::graph::ops::erf(f64::NAN).is_nan());
    let x = ArrayD::from_shape_vec(IxDyn(&[3]), vec![0.0, -0.0, 1.0]).unwrap();
    let y = ptq::graph::ops::gelu(&x, false);
    assert_eq!(y[[0]], 0.0);
    assert!((y[[2]] - 0.841_344_7).abs() < 1e-6);
}
