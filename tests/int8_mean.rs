//! int8 `torch.mean` (`QMean`, the graph's `MeanOp`): bit-exact parity with PyTorch 2.15.0
//! (engine fbgemm) on fixtures written by `tools/gen_op_fixtures.py` (both of PyTorch's
//! paths: the integer one for contiguous tensors reduced over innermost dimensions, the
//! dequantize-average-quantize one for channels_last tensors and other dimensions), a
//! property against the real mean, the graph op (int8 in a converted graph, save/load) and
//! bad input.

use std::collections::HashMap;

use ndarray::{Array1, Array4, ArrayD, IxDyn};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use ptq::graph::{Dim, GraphBuilder};
use ptq::nn::quantized::{QMean, QTensor, TorchLayout};
use ptq::nn::Conv2d;
use ptq::{QConfig, QConfigMap, QuantError, QuantizedGraph};
use safetensors::{Dtype, SafeTensors};

const MEAN: &[u8] = include_bytes!("fixtures/ops_mean.safetensors");

fn tensor<'a>(st: &'a SafeTensors<'a>, name: &str, dt: Dtype) -> (Vec<usize>, &'a [u8]) {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("missing {name}"));
    assert_eq!(t.dtype(), dt, "{name}");
    (t.shape().to_vec(), t.data())
}

fn qt(st: &SafeTensors<'_>, k: &str, x: &str) -> QTensor {
    let (shape, d) = tensor(st, &format!("{k}.{x}"), Dtype::U8);
    let (_, s) = tensor(st, &format!("{k}.{x}_scale"), Dtype::F32);
    let (_, z) = tensor(st, &format!("{k}.{x}_zp"), Dtype::I64);
    QTensor::new(
        ArrayD::from_shape_vec(IxDyn(&shape), d.to_vec()).unwrap(),
        f32::from_le_bytes(s[..4].try_into().unwrap()),
        i64::from_le_bytes(z[..8].try_into().unwrap()) as i32,
    )
    .unwrap()
}

#[test]
fn mean_matches_pytorch_bit_for_bit() {
    let (_, md) = SafeTensors::read_metadata(MEAN).unwrap();
    let meta: HashMap<String, String> = md.metadata().clone().unwrap();
    let st = SafeTensors::deserialize(MEAN).unwrap();
    let mut keys: Vec<&String> = meta.keys().collect();
    keys.sort();
    let (mut cases, mut values, mut by_path) = (0, 0, [0usize; 2]);
    let (mut off_by_one, mut other_values) = (0, 0);
    for k in keys {
        let m: HashMap<&str, &str> = meta[k]
            .split(';')
            .map(|p| p.split_once('=').unwrap())
            .collect();
        let dims: Vec<usize> = m["dims"].split(',').map(|d| d.parse().unwrap()).collect();
        let keepdim = m["keepdim"] == "1";
        let layout = if m["layout"] == "cl" {
            TorchLayout::ChannelsLast
        } else {
            TorchLayout::Contiguous
        };
        let x = qt(&st, k, "x");
        let want = qt(&st, k, "y");
        let got = QMean::new(&dims, keepdim)
            .unwrap()
            .forward(&x, layout)
            .unwrap();
        assert_eq!(got.data().shape(), want.data().shape(), "{k} {m:?}");
        assert_eq!(
            (got.scale(), got.zero_point()),
            (want.scale(), want.zero_point())
        );
        let trailing = dims
            .iter()
            .rev()
            .enumerate()
            .all(|(i, &d)| d + i + 1 == x.data().ndim());
        let diff: Vec<_> = got
            .data()
            .iter()
            .zip(want.data())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .collect();
        if trailing {
            // What graphs run in int8 (ShuffleNet's `x.mean([2, 3])`): identical.
            assert!(
                diff.is_empty(),
                "{k} {m:?}: (index, (ours, torch)) {diff:?}"
            );
        } else {
            // Averages over other dimensions: ATen's float sum adds in another order
            // (graphs keep these in float); at most one step apart.
            assert!(
                diff.iter().all(|(_, (a, b))| a.abs_diff(**b) <= 1),
                "{k} {m:?}: {diff:?}"
            );
            off_by_one += diff.len();
            other_values += got.data().len();
        }
        cases += 1;
        values += got.data().len();
        by_path[usize::from(layout == TorchLayout::ChannelsLast)] += 1;
    }
    assert_eq!(cases, 53);
    assert_eq!(by_path, [28, 25]);
    assert!(values > 1000, "{values}");
    // Non-trailing dimensions ([1] and [2] of NCHW / channels_last, [1] of a rank-3
    // tensor): 7 of 370 values one step off, all in the averages over channels.
    assert_eq!((off_by_one, other_values), (7, 370));
}

/// The real mean of the dequantized values, quantized with the input's qparams, is at most
/// one step away from either path (they differ only in rounding).
fn naive(x: &QTensor, dims: &[usize]) -> Vec<f64> {
    let d = x.data();
    let kept: Vec<usize> = (0..d.ndim()).filter(|a| !dims.contains(a)).collect();
    let mut sums: HashMap<Vec<usize>, (f64, usize)> = HashMap::new();
    for (ix, &q) in d.indexed_iter() {
        let key: Vec<usize> = kept.iter().map(|&a| ix[a]).collect();
        let e = sums.entry(key).or_default();
        e.0 += (f64::from(q) - f64::from(x.zero_point())) * f64::from(x.scale());
        e.1 += 1;
    }
    let mut keys: Vec<_> = sums.keys().cloned().collect();
    keys.sort();
    keys.iter()
        .map(|k| {
            let (s, n) = sums[k];
            (s / n as f64 / f64::from(x.scale()) + f64::from(x.zero_point())).clamp(0.0, 255.0)
        })
        .collect()
}

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x6d65_616e),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn mean_is_within_one_step_of_the_real_mean(
        n in 1usize..3, c in 1usize..6, h in 1usize..6, w in 1usize..6,
        seed in any::<u64>(), zp in 0i32..256, scale in 0.001f32..0.5,
        which in 0usize..5, keepdim in any::<bool>(), cl in any::<bool>(),
    ) {
        let dims: &[usize] = [&[2, 3][..], &[3], &[1], &[1, 2, 3], &[2]][which];
        let mut s = seed | 1;
        let data = ArrayD::from_shape_fn(IxDyn(&[n, c, h, w]), |_| {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            (s >> 56) as u8
        });
        let x = QTensor::new(data, scale, zp).unwrap();
        let layout = if cl { TorchLayout::ChannelsLast } else { TorchLayout::Contiguous };
        let y = QMean::new(dims, keepdim).unwrap().forward(&x, layout).unwrap();
        let want = naive(&x, dims);
        prop_assert_eq!(y.data().len(), want.len());
        for (got, want) in y.data().iter().zip(&want) {
            prop_assert!((f64::from(*got) - want).abs() <= 1.0, "{} vs {}", got, want);
        }
    }
}

fn mean_graph() -> ptq::Graph {
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 3.into(), 6.into(), 6.into()])
        .unwrap();
    let q = g.quant_stub("quant", x).unwrap();
    let w = Array4::from_shape_fn((8, 3, 3, 3), |(a, b, c, d)| {
        ((a * 27 + b * 9 + c * 3 + d) as f32 * 0.41).sin()
    });
    let conv = Conv2d::new(w, Some(Array1::zeros(8)))
        .unwrap()
        .with_padding(1, 1);
    let c = g
        .node("conv", ptq::graph::Op::ConvReLU2d(conv), &[q])
        .unwrap();
    let m = g.mean("mean", c, &[2, 3], false).unwrap();
    let d = g.dequant_stub("dequant", m).unwrap();
    g.output(d).unwrap();
    g.build().unwrap()
}

fn img(n: usize, phase: f32) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(&[n, 3, 6, 6]), |i| {
        (ndarray::Dimension::slice(&i).iter().sum::<usize>() as f32 * 0.3 + phase).sin()
    })
}

#[test]
fn mean_runs_int8_in_a_graph_with_its_input_qparams() {
    let mut p = ptq::prepare(mean_graph(), &QConfigMap::new(QConfig::fbgemm())).unwrap();
    ptq::calibrate(&mut p, (0..3).map(|i| img(2, i as f32))).unwrap();
    let q = ptq::convert(p).unwrap();
    let mean = &q.nodes()[q.find("mean").unwrap()];
    assert_eq!(mean.op().kind(), "Mean");
    assert_eq!(
        q.output_qparams("mean").unwrap(),
        q.output_qparams("conv").unwrap()
    );
    // The int8 output is PyTorch's channels_last path applied to the conv's int8 output.
    let x = img(3, 0.25);
    let mut taps = Vec::new();
    q.forward_with(std::slice::from_ref(&x), &mut |name, v| {
        if name == "conv" {
            let a = v.int8("conv").unwrap();
            taps.push((a.nchw().into_owned(), a.torch_layout()));
        }
    })
    .unwrap();
    let (conv_t, torch) = taps.pop().unwrap();
    assert_eq!(torch, TorchLayout::ChannelsLast);
    let want = QMean::new(&[2, 3], false)
        .unwrap()
        .forward(&conv_t, torch)
        .unwrap()
        .dequantize();
    let got = q.forward(std::slice::from_ref(&x)).unwrap();
    assert_eq!(got[0], want);
    // Saved and loaded: the same op, the same bits.
    let back = QuantizedGraph::from_bytes(&q.to_bytes().unwrap()).unwrap();
    assert_eq!(back.forward(std::slice::from_ref(&x)).unwrap(), got);
}

#[test]
fn mean_rejects_bad_input() {
    let e = QMean::new(&[], false).unwrap_err();
    assert!(matches!(e, QuantError::UnsupportedConfig { .. }), "{e}");
    let e = QMean::new(&[3, 2], false).unwrap_err();
    assert!(e.to_string().contains("[3, 2]"), "{e}");
    let m = QMean::new(&[2, 3], false).unwrap();
    let x = QTensor::new(ArrayD::zeros(IxDyn(&[1, 4, 5])), 0.1, 0).unwrap();
    let e = m.forward(&x, TorchLayout::Contiguous).unwrap_err();
    assert!(e.to_string().contains("[1, 4, 5]"), "{e}");
    let empty = QTensor::new(ArrayD::zeros(IxDyn(&[1, 4, 0, 0])), 0.1, 0).unwrap();
    let e = m.forward(&empty, TorchLayout::Contiguous).unwrap_err();
    assert!(matches!(e, QuantError::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("[1, 4, 0, 0]"), "{e}");
    // An empty batch is fine.
    let none = QTensor::new(ArrayD::zeros(IxDyn(&[0, 4, 2, 2])), 0.1, 0).unwrap();
    assert_eq!(
        m.forward(&none, TorchLayout::ChannelsLast)
            .unwrap()
            .data()
            .shape(),
        &[0, 4]
    );
}
