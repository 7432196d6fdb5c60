//! Graph fusion: conv+bn(+relu), conv+relu, linear+bn1d, linear+relu, add+relu; the
//! proposals of `find_fusable`, the refusals of `fuse`, numerics preserved.

use ndarray::{Array, Array1, Array2, ArrayD, IxDyn};
use ptq::graph::{
    find_fusable, fuse, unfused_batch_norms, zoo, BatchNorm, Dim, Graph, GraphBuilder, OpKind,
};
use ptq::nn::{Conv2d, Linear};

fn ramp(shape: &[usize], k: f32) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    ArrayD::from_shape_vec(
        IxDyn(shape),
        (0..n).map(|i| ((i as f32) * k).sin()).collect(),
    )
    .unwrap()
}

fn bn(c: usize, seed: f32) -> BatchNorm {
    BatchNorm {
        weight: Array1::from_shape_fn(c, |i| 0.5 + ((i as f32 + seed) * 0.7).sin().abs()),
        bias: Array1::from_shape_fn(c, |i| ((i as f32 + seed) * 1.3).cos() * 0.2),
        running_mean: Array1::from_shape_fn(c, |i| ((i as f32 + seed) * 0.9).sin() * 0.3),
        running_var: Array1::from_shape_fn(c, |i| 0.5 + ((i as f32 + seed) * 0.4).cos().abs()),
        eps: 1e-5,
    }
}

fn close(a: &ArrayD<f32>, b: &ArrayD<f32>, what: &str) {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (x, y) in a.iter().zip(b.iter()) {
        assert!((x - y).abs() <= 1e-5 * scale, "{what}: {x} vs {y}");
    }
}

fn as_refs(groups: &[Vec<String>]) -> Vec<Vec<&str>> {
    groups
        .iter()
        .map(|g| g.iter().map(|s| s.as_str()).collect())
        .collect()
}

fn fuse_all(g: &Graph) -> Graph {
    let groups = find_fusable(g);
    let refs = as_refs(&groups);
    let refs: Vec<&[&str]> = refs.iter().map(|g| g.as_slice()).collect();
    fuse(g, &refs).unwrap()
}

/// Loads the torchvision fixture weights into a zoo graph.
fn loaded(name: &str, mut g: Graph) -> (Graph, ArrayD<f32>) {
    let path = format!(
        "{}/tests/fixtures/tv_{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut sd = ptq::io::read_safetensors(path).unwrap();
    let x = sd.remove("__input__").unwrap();
    sd.remove("__output__");
    g.load_state_dict(&sd, true).unwrap();
    (g, x)
}

#[test]
fn fusing_torchvision_models_keeps_their_outputs_and_leaves_no_batch_norm() {
    for (name, g) in [
        ("resnet18", zoo::resnet18(4, 10, (48, 48)).unwrap()),
        (
            "mobilenet_v2",
            zoo::mobilenet_v2(0.1, 10, (48, 48)).unwrap(),
        ),
        (
            "mobilenet_v3_large",
            zoo::mobilenet_v3_large(0.25, true, 10, (48, 48)).unwrap(),
        ),
        (
            "shufflenet_v2",
            zoo::shufflenet_v2([4, 8, 4], [8, 16, 32, 64, 128], 10, (48, 48)).unwrap(),
        ),
    ] {
        let (g, x) = loaded(name, g);
        let before = unfused_batch_norms(&g).len();
        assert!(before > 0);
        let fused = fuse_all(&g);
        assert_eq!(unfused_batch_norms(&fused), Vec::<String>::new(), "{name}");
        assert!(fused.nodes().len() < g.nodes().len());
        let a = g.forward(std::slice::from_ref(&x)).unwrap().remove(0);
        let b = fused.forward(&[x]).unwrap().remove(0);
        close(&b, &a, name);
    }
}

#[test]
fn find_fusable_proposes_torchvisions_fuse_model_groups() {
    let g = zoo::resnet18(4, 10, (32, 32)).unwrap();
    let groups = find_fusable(&g);
    let has = |names: &[&str]| groups.iter().any(|gr| gr == names);
    // QuantizableResNet.fuse_model: [conv1, bn1, relu], per block [conv1, bn1, relu],
    // [conv2, bn2], downsample [0, 1]; add_relu is already fused.
    assert!(has(&["conv1", "bn1", "relu"]));
    assert!(has(&["layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu"]));
    assert!(has(&["layer3.1.conv2", "layer3.1.bn2"]));
    assert!(has(&["layer4.0.downsample.0", "layer4.0.downsample.1"]));
    assert_eq!(groups.len(), 1 + 8 * 2 + 3);
    let fused = fuse_all(&g);
    let kind = |n: &str| fused.node(fused.find(n).unwrap()).op.kind();
    assert_eq!(kind("layer1.0.conv1"), OpKind::ConvReLU2d);
    assert_eq!(kind("layer1.0.conv2"), OpKind::Conv2d);
    assert_eq!(kind("layer1.0.add_relu"), OpKind::AddReLU);
    assert!(fused.find("layer1.0.bn2").is_none());

    // MobileNetV3: conv+bn+relu where ReLU, conv+bn where Hardswish, SE fc1+activation.
    let g = zoo::mobilenet_v3_large(0.25, true, 10, (32, 32)).unwrap();
    let groups = find_fusable(&g);
    let has = |names: &[&str]| groups.iter().any(|gr| gr == names);
    assert!(has(&["features.0.0", "features.0.1"]));
    assert!(has(&[
        "features.2.block.0.0",
        "features.2.block.0.1",
        "features.2.block.0.2"
    ]));
    assert!(has(&[
        "features.4.block.2.fc1",
        "features.4.block.2.activation"
    ]));
}

#[test]
fn linear_bn1d_linear_relu_conv_relu_and_add_relu_fuse_exactly() {
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 2.into(), 5.into(), 5.into()])
        .unwrap();
    let w = Array::from_shape_fn((3, 2, 3, 3), |(a, b, c, d)| {
        ((a + 2 * b + 3 * c + d) as f32 * 0.4).sin()
    });
    let c = g
        .conv2d("conv", x, Conv2d::new(w, None).unwrap().with_padding(1, 1))
        .unwrap();
    let r = g.relu("relu", c).unwrap();
    let a = g.add("add", r, r).unwrap();
    let ar = g.relu("add_relu", a).unwrap();
    let f = g.flatten("flatten", ar, 1, -1).unwrap();
    let l = g
        .linear(
            "fc",
            f,
            Linear::new(
                Array2::from_shape_fn((4, 75), |(i, j)| ((i * 75 + j) as f32 * 0.01).cos() * 0.1),
                Some(Array1::from(vec![0.1, -0.2, 0.3, 0.0])),
            )
            .unwrap(),
        )
        .unwrap();
    let b = g.batch_norm1d("bn", l, bn(4, 1.0)).unwrap();
    let l2 = g
        .linear(
            "fc2",
            b,
            Linear::new(Array2::from_elem((2, 4), 0.3), None).unwrap(),
        )
        .unwrap();
    let r2 = g.relu("relu2", l2).unwrap();
    g.output(r2).unwrap();
    let graph = g.build().unwrap();
    let groups = find_fusable(&graph);
    assert_eq!(
        groups,
        [
            vec!["conv", "relu"],
            vec!["add", "add_relu"],
            vec!["fc", "bn"],
            vec!["fc2", "relu2"]
        ]
    );
    let fused = fuse_all(&graph);
    let kinds: Vec<OpKind> = fused.nodes().iter().map(|n| n.op.kind()).collect();
    assert_eq!(
        kinds,
        [
            OpKind::Input,
            OpKind::ConvReLU2d,
            OpKind::AddReLU,
            OpKind::Flatten,
            OpKind::Linear,
            OpKind::LinearReLU
        ]
    );
    let x = ramp(&[3, 2, 5, 5], 0.77).mapv(|v| v * 2.0 - 0.5);
    close(
        &fused.forward(std::slice::from_ref(&x)).unwrap()[0],
        &graph.forward(&[x]).unwrap()[0],
        "small",
    );
}

#[test]
fn fuse_refuses_misspellings_broken_chains_shared_intermediates_and_non_patterns() {
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 2.into(), 5.into(), 5.into()])
        .unwrap();
    let w = Array::from_elem((2, 2, 1, 1), 0.5f32);
    let c = g
        .conv2d("conv", x, Conv2d::new(w.clone(), None).unwrap())
        .unwrap();
    let b = g.batch_norm2d("bn", c, bn(2, 0.0)).unwrap();
    let r = g.relu("relu", b).unwrap();
    let side = g
        .conv2d("side", b, Conv2d::new(w.clone(), None).unwrap())
        .unwrap();
    let c2 = g.conv2d("conv2", r, Conv2d::new(w, None).unwrap()).unwrap();
    let s = g.add("sum", c2, side).unwrap();
    g.output(s).unwrap();
    let graph = g.build().unwrap();

    let msg = |groups: &[&[&str]]| fuse(&graph, groups).unwrap_err().to_string();
    assert!(msg(&[&["conv", "bnn"]]).contains("no layer named \"bnn\""));
    // bn is also read by "side": fusing conv+bn+relu would change what side sees.
    let m = msg(&[&["conv", "bn", "relu"]]);
    assert!(m.contains("\"bn\" is also read elsewhere"), "{m}");
    // Not in chain order.
    assert!(msg(&[&["bn", "conv"]]).contains("must form a chain"));
    // conv2 and relu are not a chain (relu feeds conv2, not the other way).
    assert!(msg(&[&["relu", "conv2"]]).contains("not a fusable pattern"));
    assert!(msg(&[&["conv"]]).contains("at least two"));
    // conv + bn alone is fine (bn keeps its two readers via the fused conv).
    let fused = fuse(&graph, &[&["conv", "bn"]]).unwrap();
    assert_eq!(fused.consumers(fused.find("conv").unwrap()).len(), 2);
    assert_eq!(unfused_batch_norms(&graph), ["bn"]);
    // find_fusable proposes only the safe group.
    assert_eq!(find_fusable(&graph), [vec!["conv", "bn"]]);
}
