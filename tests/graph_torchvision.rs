//! Float parity of `ptq::graph::zoo` with torchvision's quantizable models (reduced width,
//! random float16-exact weights; fixtures from tools/gen_torchvision_fixtures.py): the
//! state_dict loads strictly by node name and the outputs agree within 1e-5 relative.

use ndarray::ArrayD;
use ptq::graph::{zoo, Graph};

fn fixture(name: &str) -> std::collections::BTreeMap<String, ArrayD<f32>> {
    let path = format!(
        "{}/tests/fixtures/tv_{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    ptq::io::read_safetensors(path).unwrap()
}

/// Loads the fixture's weights into `graph`, runs its input, and returns the largest
/// difference relative to the largest output magnitude.
fn check(name: &str, mut graph: Graph) -> f32 {
    let mut sd = fixture(name);
    let x = sd.remove("__input__").unwrap();
    let expect = sd.remove("__output__").unwrap();
    let report = graph.load_state_dict(&sd, true).unwrap();
    assert_eq!(report.loaded.len(), sd.len(), "{name}: every tensor loads");
    let y = graph.forward(&[x]).unwrap().remove(0);
    assert_eq!(y.shape(), expect.shape());
    let scale = expect.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    let mut worst = 0.0f32;
    for (a, b) in y.iter().zip(expect.iter()) {
        let rel = (a - b).abs() / scale;
        worst = worst.max(rel);
        assert!(rel <= 1e-5, "{name}: ptq {a} vs torch {b} (scale {scale})");
    }
    eprintln!(
        "{name}: {} outputs, worst difference {worst:.2e} of the output range",
        y.len()
    );
    worst
}

#[test]
fn resnet18_matches_torchvision() {
    check("resnet18", zoo::resnet18(4, 10, (48, 48)).unwrap());
}

#[test]
fn mobilenet_v2_matches_torchvision() {
    check(
        "mobilenet_v2",
        zoo::mobilenet_v2(0.1, 10, (48, 48)).unwrap(),
    );
}

#[test]
fn mobilenet_v3_large_matches_torchvision() {
    check(
        "mobilenet_v3_large",
        zoo::mobilenet_v3_large(0.25, true, 10, (48, 48)).unwrap(),
    );
}

#[test]
fn shufflenet_v2_matches_torchvision() {
    check(
        "shufflenet_v2",
        zoo::shufflenet_v2([4, 8, 4], [8, 16, 32, 64, 128], 10, (48, 48)).unwrap(),
    );
}

#[test]
fn zoo_graphs_have_the_torchvision_fusion_groups() {
    let g = zoo::resnet18(4, 10, (48, 48)).unwrap();
    for n in [
        "layer2.0.downsample.0",
        "layer2.0.downsample.1",
        "layer4.1.add_relu",
        "fc",
    ] {
        assert!(g.find(n).is_some(), "{n}");
    }
    let g = zoo::mobilenet_v3_large(0.25, true, 10, (48, 48)).unwrap();
    assert!(g.find("features.4.block.2.skip_mul").is_some());
}

#[test]
fn strict_file_load_lists_the_extra_tensors() {
    let mut g = zoo::shufflenet_v2([4, 8, 4], [8, 16, 32, 64, 128], 10, (48, 48)).unwrap();
    let path = format!(
        "{}/tests/fixtures/tv_shufflenet_v2.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    match ptq::io::load_safetensors_graph(&mut g, &path).unwrap_err() {
        ptq::QuantError::StateDictMismatch {
            missing,
            unexpected,
            mismatched,
        } => {
            assert!(missing.is_empty() && mismatched.is_empty());
            assert_eq!(unexpected, ["__input__", "__output__"]);
        }
        e => panic!("{e}"),
    }
    // A graph of another width: every weight is listed as mis-shaped.
    let mut g = zoo::shufflenet_v2([4, 8, 4], [8, 16, 32, 64, 64], 10, (48, 48)).unwrap();
    let err = ptq::io::load_safetensors_graph(&mut g, &path).unwrap_err();
    assert!(
        err.to_string()
            .contains("conv5.0.weight: model [64, 64, 1, 1], file [128, 64, 1, 1]"),
        "{err}"
    );
}
