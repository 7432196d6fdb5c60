//! Quantized modules against the scalar oracle (`kernels::reference`), over random
//! geometries, plus error handling. (PyTorch parity is in `kernel_parity.rs`.)

mod common;

use ndarray::{Array2, Array4, ArrayD, IxDyn};
use proptest::prelude::*;
use ptq::kernels::reference::{qconv2d_naive, qgemm_naive, ConvGeom};
use ptq::kernels::{KernelSet, OutputQuant, RequantParams};
use ptq::nn::quantized::{
    Conv2dParams, QAdd, QConv2d, QConvReLU2d, QFlatten, QLinear, QLinearReLU, QMaxPool2d, QTensor,
};
use ptq::{DType, QParams, QScheme, QuantError};

#[derive(Debug, Clone)]
struct ConvCase {
    geom: ConvGeom,
    x: Vec<u8>,
    a_zp: i32,
    w: Vec<i8>,
    w_zp: Vec<i32>,
    w_scales: Vec<f32>,
    per_channel: bool,
    bias: Option<Vec<f32>>,
    relu: bool,
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    (
        1usize..3,
        prop_oneof![Just(1usize), Just(2), Just(3), Just(4)],
        1usize..4,
        1usize..4,
        (1usize..4, 1usize..4),
        (1usize..3, 1usize..3),
        (0usize..3, 0usize..3),
        (1usize..3, 1usize..3),
        (4usize..10, 4usize..10),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(127u8), Just(255u8)],
    )
        .prop_flat_map(
            |(
                batch,
                groups,
                cig,
                cog,
                kernel,
                stride,
                padding,
                dilation,
                in_hw,
                pc,
                relu,
                amax,
            )| {
                let c_in = cig * groups;
                let c_out = cog * groups;
                let geom = ConvGeom {
                    batch,
                    c_in,
                    in_hw: (
                        in_hw.0 + dilation.0 * kernel.0,
                        in_hw.1 + dilation.1 * kernel.1,
                    ),
                    c_out,
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                };
                let nx = batch * c_in * geom.in_hw.0 * geom.in_hw.1;
                let nw = c_out * cig * kernel.0 * kernel.1;
                let nq = if pc { c_out } else { 1 };
                (
                    Just(geom),
                    proptest::collection::vec(0..=amax, nx),
                    0..=255i32,
                    proptest::collection::vec(any::<i8>(), nw),
                    proptest::collection::vec(-20i32..=20, nq),
                    proptest::collection::vec(1e-3f32..0.02, nq),
                    Just(pc),
                    proptest::option::of(proptest::collection::vec(-3.0f32..3.0, c_out)),
                    Just(relu),
                )
            },
        )
        .prop_map(
            |(geom, x, a_zp, w, w_zp, w_scales, per_channel, bias, relu)| ConvCase {
                geom,
                x,
                a_zp,
                w,
                w_zp,
                w_scales,
                per_channel,
                bias,
                relu,
            },
        )
}

/// [`check_conv_on_current_set`] on every kernel set this CPU can run.
fn check_conv(c: &ConvCase) {
    for ks in KernelSet::all_available() {
        ks.install(|| check_conv_on_current_set(c));
    }
}

fn check_conv_on_current_set(c: &ConvCase) {
    let g = &c.geom;
    let scheme = if c.per_channel {
        QScheme::PerChannelAffine { axis: 0 }
    } else {
        QScheme::PerTensorAffine
    };
    let qp = QParams::new(
        scheme,
        DType::QInt8,
        (-128, 127),
        c.w_scales.clone(),
        c.w_zp.clone(),
    )
    .unwrap();
    let (ys, yz) = (0.07f32, 100);
    let act_scale = 0.05f32;
    let rq = RequantParams::new(
        g.c_out,
        act_scale,
        &c.w_scales,
        c.per_channel,
        c.bias.as_deref(),
        OutputQuant {
            scale: ys,
            zero_point: yz,
            relu: c.relu,
        },
    )
    .unwrap();
    let want = qconv2d_naive(&c.x, g, c.a_zp, &c.w, &c.w_zp, &rq);
    let w4 = Array4::from_shape_vec(
        (g.c_out, g.c_in / g.groups, g.kernel.0, g.kernel.1),
        c.w.clone(),
    )
    .unwrap();
    let params = Conv2dParams {
        stride: g.stride,
        padding: g.padding,
        dilation: g.dilation,
        groups: g.groups,
    };
    let bias = c
        .bias
        .as_ref()
        .map(|b| ndarray::ArrayView1::from(b.as_slice()));
    let x = QTensor::new(
        ArrayD::from_shape_vec(IxDyn(&[g.batch, g.c_in, g.in_hw.0, g.in_hw.1]), c.x.clone())
            .unwrap(),
        act_scale,
        c.a_zp,
    )
    .unwrap();
    let y = if c.relu {
        QConvReLU2d::from_quantized(w4.view(), &qp, bias, params, ys, yz)
            .unwrap()
            .forward(&x)
            .unwrap()
    } else {
        QConv2d::from_quantized(w4.view(), &qp, bias, params, ys, yz)
            .unwrap()
            .forward(&x)
            .unwrap()
    };
    let got: Vec<u8> = y.data().iter().copied().collect();
    assert_eq!(got, want, "{g:?} on {:?}", KernelSet::current().backend());
    // The channels-last entry point gives the same integers, transposed.
    let x_nhwc = QTensor::new(
        x.data()
            .view()
            .permuted_axes(IxDyn(&[0, 2, 3, 1]))
            .to_owned(),
        act_scale,
        c.a_zp,
    )
    .unwrap();
    let conv = QConv2d::from_quantized(w4.view(), &qp, bias, params, ys, yz).unwrap();
    if !c.relu {
        let yn = conv.forward_nhwc(&x_nhwc).unwrap();
        let back: Vec<u8> = yn
            .data()
            .view()
            .permuted_axes(IxDyn(&[0, 3, 1, 2]))
            .iter()
            .copied()
            .collect();
        assert_eq!(back, want, "nhwc {g:?}");
    }
}

proptest! {
    #![proptest_config(common::proptest_config(150))]
    #[test]
    fn conv_matches_naive(c in conv_case()) {
        check_conv(&c);
    }
}

/// A GEMM large enough to be split into row blocks across threads, with full-range
/// activations and weights (the split path) and per-channel zero points.
#[test]
fn linear_parallel_blocks_match_naive() {
    let (m, k, n) = (203, 301, 77);
    let mut s = 7u64;
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
        (s >> 40) as u32
    };
    let a: Vec<u8> = (0..m * k).map(|_| next() as u8).collect();
    let w: Vec<i8> = (0..n * k).map(|_| next() as u8 as i8).collect();
    let zps: Vec<i32> = (0..n as i32).map(|j| j % 7 - 3).collect();
    let scales: Vec<f32> = (0..n).map(|j| 0.001 + j as f32 * 1e-5).collect();
    let bias: Vec<f32> = (0..n).map(|j| (j as f32 - 30.0) * 0.1).collect();
    let qp = QParams::new(
        QScheme::PerChannelAffine { axis: 0 },
        DType::QInt8,
        (-128, 127),
        scales.clone(),
        zps.clone(),
    )
    .unwrap();
    let wq = Array2::from_shape_vec((n, k), w.clone()).unwrap();
    let (ys, yz) = (0.5, 77);
    let layer = QLinearReLU::from_quantized(
        wq.view(),
        &qp,
        Some(ndarray::ArrayView1::from(bias.as_slice())),
        ys,
        yz,
    )
    .unwrap();
    let x = QTensor::new(
        ArrayD::from_shape_vec(IxDyn(&[m, k]), a.clone()).unwrap(),
        0.01,
        131,
    )
    .unwrap();
    let y = layer.forward(&x).unwrap();
    let rq = RequantParams::new(
        n,
        0.01,
        &scales,
        true,
        Some(&bias),
        OutputQuant {
            scale: ys,
            zero_point: yz,
            relu: true,
        },
    )
    .unwrap();
    let mut want = vec![0u8; m * n];
    qgemm_naive(&a, m, k, 131, &w, &zps, &rq, &mut want, n);
    assert_eq!(y.data().iter().copied().collect::<Vec<_>>(), want);
    assert!(layer.weight_bytes() >= n * k);
}

#[test]
fn errors_name_the_layer_and_shapes() {
    let qp = QParams::per_tensor(0.1, 0, DType::QInt8).unwrap();
    let l = QLinear::new(Array2::<f32>::zeros((3, 4)).view(), None, &qp, 0.1, 0).unwrap();
    let x = QTensor::new(ArrayD::zeros(IxDyn(&[2, 5])), 0.1, 0).unwrap();
    match l.forward(&x) {
        Err(QuantError::ShapeMismatch {
            context, actual, ..
        }) => {
            assert_eq!(context, "QLinear");
            assert!(actual.contains("[2, 5]"));
        }
        other => panic!("{other:?}"),
    }
    let c = QConv2d::new(
        Array4::<f32>::zeros((4, 2, 3, 3)).view(),
        None,
        &qp,
        Conv2dParams::default(),
        0.1,
        0,
    )
    .unwrap();
    let small = QTensor::new(ArrayD::zeros(IxDyn(&[1, 2, 2, 2])), 0.1, 0).unwrap();
    assert!(matches!(
        c.forward(&small),
        Err(QuantError::ShapeMismatch { .. })
    ));
    let wrong_c = QTensor::new(ArrayD::zeros(IxDyn(&[1, 3, 5, 5])), 0.1, 0).unwrap();
    assert!(matches!(
        c.forward(&wrong_c),
        Err(QuantError::ShapeMismatch { .. })
    ));
    let mut w = Array2::<f32>::zeros((3, 4));
    w[[0, 0]] = f32::NAN;
    assert!(matches!(
        QLinear::new(w.view(), None, &qp, 0.1, 0),
        Err(QuantError::NonFinite { .. })
    ));
    assert!(QLinear::new(Array2::<f32>::zeros((3, 4)).view(), None, &qp, 0.1, 300).is_err());
    let a = QTensor::new(ArrayD::zeros(IxDyn(&[1, 2])), 0.1, 0).unwrap();
    let b = QTensor::new(ArrayD::zeros(IxDyn(&[2, 1])), 0.1, 0).unwrap();
    assert!(QAdd::new(0.1, 0).unwrap().forward(&a, &b).is_err());
    assert!(QMaxPool2d::new((0, 1), (1, 1), (0, 0), (1, 1)).is_err());
    assert!(QFlatten
        .forward(&QTensor::new(ArrayD::zeros(IxDyn(&[])), 0.1, 0).unwrap())
        .is_err());
}

/// Depthwise convolutions wide enough for the 16-channel SIMD blocks plus a tail, odd
/// tap counts (borders), strides 1 and 2, and a channel multiplier of 2.
#[test]
fn wide_depthwise_matches_naive() {
    for &(c, mult, stride, pad, k) in &[
        (40usize, 1usize, 1usize, 1usize, 3usize),
        (40, 1, 2, 1, 3),
        (33, 1, 1, 2, 5),
        (20, 2, 1, 1, 3),
    ] {
        let geom = ConvGeom {
            batch: 2,
            c_in: c,
            in_hw: (7, 9),
            c_out: c * mult,
            kernel: (k, k),
            stride: (stride, stride),
            padding: (pad, pad),
            dilation: (1, 1),
            groups: c,
        };
        let n = 2 * c * 63;
        let x: Vec<u8> = (0..n).map(|i| (i * 131 % 256) as u8).collect();
        let w: Vec<i8> = (0..c * mult * k * k)
            .map(|i| (i * 77 % 256) as u8 as i8)
            .collect();
        let w_zp: Vec<i32> = (0..c * mult).map(|j| j as i32 % 5 - 2).collect();
        let w_scales: Vec<f32> = (0..c * mult).map(|j| 0.002 + j as f32 * 1e-4).collect();
        check_conv(&ConvCase {
            geom,
            x,
            a_zp: 201,
            w,
            w_zp,
            w_scales,
            per_channel: true,
            bias: Some((0..c * mult).map(|j| j as f32 * 0.05 - 1.0).collect()),
            relu: mult == 1,
        });
    }
}
