//! ONNX import: models exported by torch 2.15.0 (TorchScript exporter at opsets 13 and 17,
//! dynamo exporter at opset 18; fixtures from `tools/gen_onnx_fixtures.py`) are imported into
//! the graph IR and their float outputs compared with ONNX Runtime's and PyTorch's.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ndarray::{ArrayD, Axis};
use ptq::graph::{Dim, Op};
use ptq::io::onnx::{load_onnx, OnnxModel};
use ptq::io::read_safetensors;
use ptq::QuantError;

fn fixture(name: &str) -> PathBuf {
    [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "fixtures",
        "onnx",
        name,
    ]
    .iter()
    .collect()
}

fn tensors(name: &str) -> BTreeMap<String, ArrayD<f32>> {
    read_safetensors(fixture(name)).expect("fixture")
}

/// max |a - b| / max |b|
fn rel_err(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = a
        .iter()
        .zip(b.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    d / scale
}

const MODELS: &[(&str, &[&str])] = &[
    ("resnet18", &["ts13", "dynamo18"]),
    ("mobilenet_v2", &["ts13", "dynamo18"]),
    ("mobilenet_v3_small", &["ts13", "ts17", "dynamo18"]),
    ("concat", &["ts13", "ts17", "dynamo18"]),
];

#[test]
fn imported_models_match_onnxruntime_and_pytorch() {
    let x = tensors("inputs.safetensors").remove("x").unwrap();
    let mut checked = 0;
    for (model, variants) in MODELS {
        let outs = tensors(&format!("{model}_outputs.safetensors"));
        let torch = &outs["torch"];
        for v in *variants {
            let file = format!("{model}_{v}.onnx");
            let imp = load_onnx(fixture(&file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            let g = &imp.graph;
            // the batch stays dynamic
            assert_eq!(g.node(g.inputs()[0]).shape.0[0], Dim::Batch, "{file}");
            let y = g
                .forward(std::slice::from_ref(&x))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            let ort = &outs[&format!("ort_{v}")];
            let e_ort = rel_err(&y[0], ort);
            let e_torch = rel_err(&y[0], torch);
            println!(
                "{file}: {} nodes, vs ORT {e_ort:.2e}, vs PyTorch {e_torch:.2e}",
                g.nodes().len()
            );
            assert!(e_ort <= 1e-5, "{file}: relative error vs ORT {e_ort}");
            assert!(
                e_torch <= 1e-5,
                "{file}: relative error vs PyTorch {e_torch}"
            );
            // another batch size runs too (dynamic batch): row 1 alone equals row 1 of the pair
            let x1 = x.index_axis(Axis(0), 1).insert_axis(Axis(0)).to_owned();
            let y1 = g.forward(&[x1]).unwrap();
            let row = y[0].index_axis(Axis(0), 1).insert_axis(Axis(0)).to_owned();
            assert!(rel_err(&y1[0], &row) <= 1e-6, "{file}: batch 1 vs batch 2");
            checked += 1;
        }
    }
    assert_eq!(checked, 10);
}

#[test]
fn node_names_follow_pytorch_module_paths() {
    for file in ["resnet18_ts13.onnx", "resnet18_dynamo18.onnx"] {
        let imp = load_onnx(fixture(file)).unwrap();
        let g = &imp.graph;
        for name in [
            "conv1",
            "layer1.0.conv1",
            "layer1.0.conv2",
            "layer2.0.downsample.0",
            "layer4.1.conv2",
            "fc",
        ] {
            let id = g
                .find(name)
                .unwrap_or_else(|| panic!("{file}: no node {name:?}"));
            assert!(
                matches!(g.node(id).op, Op::Conv2d(_) | Op::Linear(_)),
                "{file}: {name} is {:?}",
                g.node(id).op.kind()
            );
        }
        // the residual add of the first block lives in its module
        let add = g
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, Op::Add))
            .map(|n| n.name.clone())
            .next()
            .unwrap();
        assert!(add.starts_with("layer1.0."), "{file}: {add}");
        // parameters are named like a PyTorch state_dict
        let keys: Vec<String> = g.state_dict_keys().into_iter().map(|(k, _)| k).collect();
        assert!(
            keys.contains(&"layer1.0.conv1.weight".to_string()),
            "{file}"
        );
        assert!(keys.contains(&"fc.bias".to_string()), "{file}");
    }
}

#[test]
fn shape_chains_and_batch_norms_are_folded() {
    // concat (TorchScript) flattens with x.view(x.size(0), -1): Shape/Gather/Unsqueeze/Concat
    let m = OnnxModel::load(fixture("concat_ts13.onnx")).unwrap();
    let n_shape = m.nodes.iter().filter(|n| n.op_type == "Shape").count();
    assert!(n_shape >= 1);
    let imp = m.to_graph().unwrap();
    assert!(imp.folded_constants >= 4, "{}", imp.folded_constants);
    let reshape = imp
        .graph
        .nodes()
        .iter()
        .find_map(|n| match &n.op {
            Op::Reshape { shape } => Some(shape.clone()),
            _ => None,
        })
        .expect("a reshape");
    // the batch size became "copy dimension 0"
    assert_eq!(reshape, vec![0, -1]);
    // no op of the shape chain survives as a node
    assert!(imp
        .graph
        .nodes()
        .iter()
        .all(|n| !matches!(n.op, Op::Identity | Op::Dropout)));
}

#[test]
fn unsupported_model_lists_every_op_with_its_nodes() {
    // rename ops of a real model: every unsupported op type and node is listed in one error
    let mut m = OnnxModel::load(fixture("concat_ts13.onnx")).unwrap();
    let mut renamed = Vec::new();
    for n in m.nodes.iter_mut() {
        if n.op_type == "Sigmoid" || n.op_type == "Softmax" || n.op_type == "MaxPool" {
            n.op_type = format!("Fancy{}", n.op_type);
            renamed.push((n.op_type.clone(), n.name.clone()));
        }
    }
    assert!(renamed.len() >= 3);
    let err = m.to_graph().unwrap_err();
    let QuantError::UnsupportedConfig { reason, .. } = &err else {
        panic!("{err:?}")
    };
    for (op, node) in &renamed {
        assert!(reason.contains(op.as_str()), "{reason}");
        assert!(reason.contains(node.as_str()), "{reason}");
    }
}
