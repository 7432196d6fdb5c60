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
