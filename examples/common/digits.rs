//! The digits CNN of `tools/train_digits.py`, in Rust, and its data. Shared by
//! `examples/quickstart.rs` and `tests/model_parity.rs` (included with `#[path]`).
#![allow(dead_code)]

use std::path::PathBuf;

use ndarray::{Array1, Array2, Array4, ArrayD, Axis, IxDyn};
use ptq::io::load_safetensors;
use ptq::nn::{fuse, BatchNorm2d, Conv2d, Layer, Linear, Pool2d, PoolKind, Sequential};
use ptq::Result;

/// `examples/data/<name>`.
pub fn data_path(name: &str) -> PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "examples", "data", name]
        .iter()
        .collect()
}

/// The architecture with zero weights, PyTorch's names.
pub fn architecture() -> Result<Sequential> {
    let conv = |o, i| Conv2d::new(Array4::zeros((o, i, 3, 3)), None).map(|c| c.with_padding(1, 1));
    Ok(Sequential::new()
        .push("quant", Layer::QuantStub)
        .push("conv1", Layer::Conv2d(conv(16, 1)?))
        .push("bn1", Layer::BatchNorm2d(BatchNorm2d::identity(16)))
        .push("relu1", Layer::ReLU)
        .push("conv2", Layer::Conv2d(conv(32, 16)?))
        .push("bn2", Layer::BatchNorm2d(BatchNorm2d::identity(32)))
        .push("relu2", Layer::ReLU)
        .push("pool", Layer::Pool2d(Pool2d::new(PoolKind::Max, 2, 2)))
        .push("conv3", Layer::Conv2d(conv(32, 32)?))
        .push("bn3", Layer::BatchNorm2d(BatchNorm2d::identity(32)))
        .push("relu3", Layer::ReLU)
        .push("avg", Layer::AdaptiveAvgPool2d((2, 2)))
        .push("flatten", Layer::Flatten { start_dim: 1 })
        .push(
            "fc1",
            Layer::Linear(Linear::new(
                Array2::zeros((64, 128)),
                Some(Array1::zeros(64)),
            )?),
        )
        .push("relu4", Layer::ReLU)
        .push(
            "fc2",
            Layer::Linear(Linear::new(
                Array2::zeros((10, 64)),
                Some(Array1::zeros(10)),
            )?),
        )
        .push("dequant", Layer::DeQuantStub))
}

/// The trained float model, with conv+bn+relu and fc1+relu4 fused as in PyTorch.
pub fn trained_fused() -> Result<Sequential> {
    let mut model = architecture()?;
    load_safetensors(&mut model, data_path("digits_cnn.safetensors"))?;
    fuse(
        model,
        &[
            &["conv1", "bn1", "relu1"],
            &["conv2", "bn2", "relu2"],
            &["conv3", "bn3", "relu3"],
            &["fc1", "relu4"],
        ],
    )
}

/// A split of the data set: images as `[N, 1, 8, 8]` floats in [0, 1], labels.
pub struct Split {
    pub images: ArrayD<f32>,
    pub labels: Vec<usize>,
}

/// `(train, test)`.
///
/// # Panics
/// If the committed data file is missing or damaged.
pub fn load_data() -> Result<(Split, Split)> {
    let bytes =
        std::fs::read(data_path("digits.safetensors")).expect("examples/data/digits.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a valid safetensors file");
    let u8s = |name: &str| {
        let t = st.tensor(name).expect("tensor present");
        ArrayD::from_shape_vec(IxDyn(t.shape()), t.data().to_vec()).expect("consistent shape")
    };
    let split = |x: &str, y: &str| Split {
        images: u8s(x).mapv(|v| v as f32 / 16.0).insert_axis(Axis(1)),
        labels: u8s(y).iter().map(|&v| v as usize).collect(),
    };
    Ok((split("train_x", "train_y"), split("test_x", "test_y")))
}

/// The first `n` batches of `size` training images, in order (PyTorch's calibration).
pub fn calibration_batches(train: &Split, n: usize, size: usize) -> Vec<ArrayD<f32>> {
    (0..n)
        .map(|i| {
            train
                .images
                .slice_axis(Axis(0), (i * size..(i + 1) * size).into())
                .to_owned()
        })
        .collect()
}

/// Top-1 accuracy of logits `[N, 10]`.
pub fn accuracy(logits: &ArrayD<f32>, labels: &[usize]) -> f64 {
    let correct = logits
        .outer_iter()
        .zip(labels)
        .filter(|(row, &y)| {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                );
            best.0 == y
        })
        .count();
    correct as f64 / labels.len() as f64
}

/// An empty `[0, 1, 8, 8]` batch, for tests of the empty case.
pub fn empty_batch() -> ArrayD<f32> {
    ArrayD::zeros(IxDyn(&[0, 1, 8, 8]))
}

/// Factor of channel `i` of `n`: `10^(-2 + 4 t)` with `t` a fixed shuffle of `0..n` over
/// `[0, 1]`, so the factors span 1e-2..1e2 in no particular order.
pub fn channel_factor(i: usize, n: usize) -> f32 {
    let t = ((i * 7 + 3) % n) as f32 / (n - 1).max(1) as f32;
    10f32.powf(-2.0 + 4.0 * t)
}

/// The fused digits CNN with very unequal per-channel ranges and the same float function:
/// output channel `i` of conv1, conv2, conv3 and fc1 is multiplied by
/// [`channel_factor`] (weights and bias; ReLU commutes with positive scales) and the next
/// layer's matching inputs are divided by it (fc1's block of 4 inputs per conv3 channel,
/// through the flatten). Models like this come out of batch-norm folding.
pub fn unequal_ranges(model: &Sequential) -> Sequential {
    let mut m = model.clone();
    let names = ["conv1", "conv2", "conv3", "fc1", "fc2"];
    for k in 0..4 {
        let (a, b) = (names[k], names[k + 1]);
        let ch = m.children_mut();
        let ia = ch.iter().position(|(n, _)| n == a).expect("layer present");
        let ib = ch.iter().position(|(n, _)| n == b).expect("layer present");
        let n = match &ch[ia].1 {
            Layer::ConvReLU2d(c) | Layer::Conv2d(c) => c.out_channels(),
            Layer::LinearReLU(l) | Layer::Linear(l) => l.weight.nrows(),
            _ => unreachable!("conv or linear"),
        };
        let f: Vec<f32> = (0..n).map(|i| channel_factor(i + k, n)).collect();
        match &mut ch[ia].1 {
            Layer::ConvReLU2d(c) | Layer::Conv2d(c) => {
                for (i, mut w) in c.weight.outer_iter_mut().enumerate() {
                    w.mapv_inplace(|v| v * f[i]);
                }
                if let Some(bias) = c.bias.as_mut() {
                    bias.iter_mut().zip(&f).for_each(|(v, s)| *v *= s);
                }
            }
            Layer::LinearReLU(l) | Layer::Linear(l) => {
                for (i, mut w) in l.weight.outer_iter_mut().enumerate() {
                    w.mapv_inplace(|v| v * f[i]);
                }
                if let Some(bias) = l.bias.as_mut() {
                    bias.iter_mut().zip(&f).for_each(|(v, s)| *v *= s);
                }
            }
            _ => unreachable!("conv or linear"),
        }
        match &mut ch[ib].1 {
            Layer::ConvReLU2d(c) | Layer::Conv2d(c) => {
                for (j, mut w) in c.weight.axis_iter_mut(Axis(1)).enumerate() {
                    w.mapv_inplace(|v| v / f[j]);
                }
            }
            Layer::LinearReLU(l) | Layer::Linear(l) => {
                let block = l.weight.ncols() / n;
                for (j, mut w) in l.weight.axis_iter_mut(Axis(1)).enumerate() {
                    w.mapv_inplace(|v| v / f[j / block]);
                }
            }
            _ => unreachable!("conv or linear"),
        }
    }
    m
}
