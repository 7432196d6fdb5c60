//! Every kernel set this CPU can run (portable everywhere; AVX2 and AVX-512 VNNI where
//! present) against the scalar oracle `kernels::reference`, through the public layers:
//! pinned regressions for past wrong results and panics, exhaustive sweeps of small
//! geometries, and PyTorch's `ceil_mode` pooling (fixture from `tools/gen_pool_fixtures.py`).

use std::collections::HashMap;

use ndarray::{Array2, Array4, ArrayD, IxDyn};
use ptq::kernels::reference::{qconv2d_naive, ConvGeom};
use ptq::kernels::{Backend, KernelSet, OutputQuant, RequantParams};
use ptq::nn::quantized::{
    Conv2dParams, QAdaptiveAvgPool2d, QAvgPool2d, QConv2d, QLinear, QMaxPool2d, QTensor,
    TorchLayout,
};
use ptq::{DType, QParams, QScheme, QuantError};
use safetensors::{Dtype, SafeTensors};

/// The sets under test; the portable one is always first.
fn sets() -> Vec<KernelSet> {
    let s = KernelSet::all_available();
    assert_eq!(s[0].backend(), Backend::Portable);
    s
}

/// A deterministic byte stream (xorshift).
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

struct Conv {
    geom: ConvGeom,
    x: Vec<u8>,
    a_zp: i32,
    w: Vec<i8>,
    w_zp: Vec<i32>,
    w_scales: Vec<f32>,
}

const ACT_SCALE: f32 = 0.05;
const OUT: OutputQuant = OutputQuant {
    scale: 0.3,
    zero_point: 120,
    relu: false,
};

impl Conv {
    fn layer(&self) -> QConv2d {
        let g = &self.geom;
        let qp = QParams::new(
            QScheme::PerChannelAffine { axis: 0 },
            DType::QInt8,
            (-128, 127),
            self.w_scales.clone(),
            self.w_zp.clone(),
        )
        .unwrap();
        let w = Array4::from_shape_vec(
            (g.c_out, g.c_in / g.groups, g.kernel.0, g.kernel.1),
            self.w.clone(),
        )
        .unwrap();
        let params = Conv2dParams {
            stride: g.stride,
            padding: g.padding,
            dilation: g.dilation,
            groups: g.groups,
        };
        QConv2d::from_quantized(w.view(), &qp, None, params, OUT.scale, OUT.zero_point).unwrap()
    }

    fn input(&self) -> QTensor {
        let g = &self.geom;
        let shape = [g.batch, g.c_in, g.in_hw.0, g.in_hw.1];
        QTensor::new(
            ArrayD::from_shape_vec(IxDyn(&shape), self.x.clone()).unwrap(),
            ACT_SCALE,
            self.a_zp,
        )
        .unwrap()
    }

    fn expected(&self) -> Vec<u8> {
        let rq = RequantParams::new(self.geom.c_out, ACT_SCALE, &self.w_scales, true, None, OUT)
            .unwrap();
        qconv2d_naive(&self.x, &self.geom, self.a_zp, &self.w, &self.w_zp, &rq)
    }

    /// Runs the layer on every kernel set and compares with the oracle.
    fn check(&self) {
        let want = self.expected();
        let layer = self.layer();
        let x = self.input();
        for ks in sets() {
            let got = ks.install(|| layer.forward(&x)).unwrap();
            let got: Vec<u8> = got.data().iter().copied().collect();
            assert_eq!(got, want, "{:?} on {:?}", self.geom, ks.backend());
        }
    }
}

fn geom(
    c: usize,
    mult: usize,
    hw: (usize, usize),
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
) -> ConvGeom {
    ConvGeom {
        batch: 1,
        c_in: c,
        in_hw: hw,
        c_out: c * mult,
        kernel,
        stride,
        padding,
        dilation,
        groups: c,
    }
}

fn random_conv(g: ConvGeom, seed: u64) -> Conv {
    let cig = g.c_in / g.groups;
    let nx = g.batch * g.c_in * g.in_hw.0 * g.in_hw.1;
    let nw = g.c_out * cig * g.kernel.0 * g.kernel.1;
    Conv {
        geom: g,
        x: bytes(nx, seed),
        a_zp: 77,
        w: bytes(nw, seed ^ 0x5555)
            .into_iter()
            .map(|b| b as i8)
            .collect(),
        w_zp: (0..g.c_out).map(|j| j as i32 % 3 - 1).collect(),
        w_scales: (0..g.c_out).map(|j| 0.004 + j as f32 * 1e-4).collect(),
    }
}

/// Issue 9: a (3, 1) depthwise kernel, padding (0, 1), stride (1, 2) on 5x5: output
/// columns 0 and 3 both lie wholly in the padding (one left, one right) and were taken to
/// share column 0's taps with columns 1 and 2, whose windows are inside the input.
#[test]
fn depthwise_bug_1_padded_columns_do_not_share_taps() {
    for c in [1usize, 4, 16, 17, 40, 64, 97] {
        let g = geom(c, 1, (5, 5), (3, 1), (1, 2), (0, 1), (1, 1));
        random_conv(g, 11).check();
    }
}

/// Issue 9: a 1x1 depthwise kernel with padding 2 on a 1x1 input: the centre output is
/// `x * w` (20 here), everything else is padding (the zero point); it used to be 0.
#[test]
fn depthwise_bug_2_one_by_one_kernel_padding_two() {
    for c in [1usize, 3, 16, 33] {
        let conv = Conv {
            geom: geom(c, 1, (1, 1), (1, 1), (1, 1), (2, 2), (1, 1)),
            x: vec![20; c],
            a_zp: 0,
            w: vec![1; c],
            w_zp: vec![0; c],
            w_scales: vec![1.0; c],
        };
        let layer = QConv2d::from_quantized(
            Array4::from_elem((c, 1, 1, 1), 1i8).view(),
            &QParams::per_tensor(1.0, 0, DType::QInt8).unwrap(),
            None,
            Conv2dParams {
                padding: (2, 2),
                groups: c,
                ..Default::default()
            },
            1.0,
            0,
        )
        .unwrap();
        let x = QTensor::new(ArrayD::from_elem(IxDyn(&[1, c, 1, 1]), 20u8), 1.0, 0).unwrap();
        for ks in sets() {
            let y = ks.install(|| layer.forward(&x)).unwrap();
            assert_eq!(y.data().shape(), &[1, c, 5, 5]);
            for ch in 0..c {
                for oy in 0..5 {
                    for ox in 0..5 {
                        let want = if (oy, ox) == (2, 2) { 20 } else { 0 };
                        assert_eq!(
                            y.data()[[0, ch, oy, ox]],
                            want,
                            "channel {ch} ({oy}, {ox}) on {:?}",
                            ks.backend()
                        );
                    }
                }
            }
        }
        conv.check();
    }
}

/// All small depthwise geometries: widths 1..=9 (the four-column sharing needs >= 4
/// output columns), kernels up to 3, strides up to 3, paddings up to 3 (wider than the
/// kernel), dilations 1 and 2, channel multipliers 1 to 5 (2, 3 and 4 have their own
/// channel repeat), channel counts around the SIMD widths (16 x 2 fills one AVX-512
/// block); every kernel set against the oracle.
#[test]
fn depthwise_small_geometries_exhaustive() {
    let mut n = 0;
    for h in [1usize, 3] {
        for w in 1usize..=9 {
            for kh in [1usize, 3] {
                for kw in 1usize..=3 {
                    for sw in 1usize..=3 {
                        for pw in 0usize..=3 {
                            for (ph, dw) in [(0usize, 1usize), (1, 2), (2, 1)] {
                                for (c, mult) in [
                                    (3usize, 1usize),
                                    (17, 1),
                                    (2, 2),
                                    (37, 1),
                                    (16, 2),
                                    (11, 3),
                                    (9, 4),
                                    (3, 5),
                                ] {
                                    let g =
                                        geom(c, mult, (h, w), (kh, kw), (1, sw), (ph, pw), (1, dw));
                                    if g.out_hw().is_none() {
                                        continue;
                                    }
                                    random_conv(g, n as u64 + 1).check();
                                    n += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(n > 2000, "{n} geometries");
}

/// Dense and grouped convolutions through im2col + GEMM on every set: channel counts
/// whose kernel-row runs cover every im2col copy size (1 byte to past 512), 1x1 rows the
/// GEMM reads in place, strides and asymmetric padding, with symmetric (all zero: no row
/// sums) and asymmetric weight zero points.
#[test]
fn dense_conv_geometries() {
    let mut n = 0u64;
    for (c_in, c_out, groups) in [
        (1usize, 16usize, 1usize),
        (3, 32, 1),
        (11, 20, 1),
        (16, 33, 1),
        (64, 48, 1),
        (200, 17, 1),
        (8, 12, 2),
    ] {
        for (kernel, stride, padding) in [
            ((1, 1), (1, 1), (0, 0)),
            ((3, 3), (1, 1), (1, 1)),
            ((3, 3), (2, 2), (1, 1)),
            ((1, 3), (1, 2), (0, 2)),
        ] {
            for symmetric in [false, true] {
                let g = ConvGeom {
                    batch: 2,
                    c_in,
                    in_hw: (5, 7),
                    c_out,
                    kernel,
                    stride,
                    padding,
                    dilation: (1, 1),
                    groups,
                };
                let mut conv = random_conv(g, n + 1);
                if symmetric {
                    conv.w_zp.iter_mut().for_each(|z| *z = 0);
                }
                conv.check();
                n += 1;
            }
        }
    }
    assert_eq!(n, 56);
}

/// Issue 9: a grouped convolution with more than one input channel per group indexed
/// past the end of its empty output on a batch of 0; depthwise and dense too.
#[test]
fn empty_batch_gives_empty_output_on_every_path() {
    for (c_in, c_out, groups) in [(4usize, 6usize, 2usize), (4, 4, 4), (4, 8, 1), (3, 6, 3)] {
        let g = ConvGeom {
            batch: 0,
            c_in,
            in_hw: (5, 5),
            c_out,
            kernel: (3, 3),
            stride: (1, 1),
            padding: (1, 1),
            dilation: (1, 1),
            groups,
        };
        let conv = random_conv(g, 3);
        let layer = conv.layer();
        for ks in sets() {
            let y = ks.install(|| layer.forward(&conv.input())).unwrap();
            assert_eq!(y.data().shape(), &[0, c_out, 5, 5], "{:?}", ks.backend());
            let xn = QTensor::new(ArrayD::zeros(IxDyn(&[0, 5, 5, c_in])), 0.1, 0).unwrap();
            let yn = ks.install(|| layer.forward_nhwc(&xn)).unwrap();
            assert_eq!(yn.data().shape(), &[0, 5, 5, c_out]);
        }
    }
}

/// Grouped and dense convolutions on every path (small sweep beside the proptest in
/// `modules.rs`): 1..=4 input channels per group, many outputs (stems), strides.
#[test]
fn grouped_and_stem_convs_match_oracle_on_every_path() {
    let mut seed = 100;
    for (c_in, c_out, groups) in [
        (1usize, 16usize, 1usize),
        (3, 32, 1),
        (2, 8, 2),
        (4, 20, 1),
        (6, 12, 3),
        (8, 8, 2),
    ] {
        for (hw, k, s, p) in [
            (
                (9usize, 11usize),
                (3usize, 3usize),
                (2usize, 2usize),
                (1usize, 1usize),
            ),
            ((5, 5), (3, 1), (1, 2), (0, 1)),
            ((7, 6), (1, 1), (1, 1), (0, 0)),
        ] {
            let g = ConvGeom {
                batch: 2,
                c_in,
                in_hw: hw,
                c_out,
                kernel: k,
                stride: s,
                padding: p,
                dilation: (1, 1),
                groups,
            };
            seed += 1;
            random_conv(g, seed).check();
        }
    }
}

/// Issue 9: weights whose i32 accumulator can overflow are refused when the layer is
/// built (a loaded `.qmodel` may ask for a 1024x1024 depthwise kernel), naming the layer.
#[test]
fn accumulator_overflow_is_refused_at_construction() {
    let qp = QParams::per_tensor(0.01, 0, DType::QInt8).unwrap();
    let dw = Conv2dParams {
        groups: 2,
        ..Default::default()
    };
    let big = Array4::from_elem((2, 1, 1024, 1024), -128i8);
    match QConv2d::from_quantized(big.view(), &qp, None, dw, 0.1, 0) {
        Err(QuantError::UnsupportedConfig { context, reason }) => {
            assert_eq!(context, "QConv2d");
            assert!(reason.contains("[2, 1, 1024, 1024]"), "{reason}");
            assert!(reason.contains("overflows"), "{reason}");
        }
        other => panic!("expected UnsupportedConfig, got {other:?}"),
    }
    // The same size with small weights cannot overflow (255 * 1024 * 1024 < 2^31): accepted.
    let small = Array4::from_elem((2, 1, 1024, 1024), 1i8);
    assert!(QConv2d::from_quantized(small.view(), &qp, None, dw, 0.1, 0).is_ok());
    // GEMM: 70000 inputs of 127 (255 * 127 * 70000 > 2^31).
    let w = Array2::from_elem((2, 70_000), 127i8);
    match QLinear::from_quantized(w.view(), &qp, None, 0.1, 0) {
        Err(QuantError::UnsupportedConfig { context, reason }) => {
            assert_eq!(context, "QLinear");
            assert!(reason.contains("[2, 70000]"), "{reason}");
        }
        other => panic!("expected UnsupportedConfig, got {other:?}"),
    }
    // Right at the limit: 255 * 128 * 65793 < 2^31 <= 255 * 128 * 65794.
    let ok = Array2::from_elem((1, 65_793), -128i8);
    assert!(QLinear::from_quantized(ok.view(), &qp, None, 0.1, 0).is_ok());
    let bad = Array2::from_elem((1, 65_794), -128i8);
    assert!(QLinear::from_quantized(bad.view(), &qp, None, 0.1, 0).is_err());
}

/// Issue 9: pooling an empty (0x0) spatial input with padding panicked (`chunks(0)`).
/// PyTorch: max pooling refuses it ("input dimensions must be non-zero"), average pooling
/// returns the zero point (checked against PyTorch in `pooling_matches_pytorch_ceil_mode`).
#[test]
fn pooling_empty_spatial_input() {
    let x = QTensor::new(ArrayD::zeros(IxDyn(&[1, 2, 0, 0])), 0.1, 9).unwrap();
    let mp = QMaxPool2d::new((2, 2), (1, 1), (1, 1), (1, 1)).unwrap();
    assert!(matches!(
        mp.forward(&x),
        Err(QuantError::ShapeMismatch { ref context, .. }) if context == "QMaxPool2d"
    ));
    let ap = QAvgPool2d::new((2, 2), (1, 1), (1, 1), true).unwrap();
    let y = ap.forward(&x).unwrap();
    assert_eq!(y.data().shape(), &[1, 2, 1, 1]);
    assert!(y.data().iter().all(|&v| v == 9));
    assert!(QAdaptiveAvgPool2d::new((1, 1))
        .unwrap()
        .forward(&x)
        .is_err());
    // Empty batch: empty output, no error.
    let e = QTensor::new(ArrayD::zeros(IxDyn(&[0, 2, 4, 4])), 0.1, 9).unwrap();
    assert_eq!(mp.forward(&e).unwrap().data().shape(), &[0, 2, 5, 5]);
    assert_eq!(ap.forward(&e).unwrap().data().shape(), &[0, 2, 5, 5]);
}

/// Issue 9: adaptive (and plain) average pooling summed in i32: a 3000x3000 image of 255
/// averaged to 0 in release and panicked in debug. The mean is 255 (PyTorch's NCHW kernel
/// agrees; its channels-last kernel wraps, see CHANGELOG).
#[test]
fn average_pooling_large_windows_do_not_wrap() {
    let x = QTensor::new(ArrayD::from_elem(IxDyn(&[1, 1, 3000, 3000]), 255u8), 1.0, 0).unwrap();
    for layout in [TorchLayout::ChannelsLast, TorchLayout::Contiguous] {
        let p = QAdaptiveAvgPool2d::new((1, 1)).unwrap().with_layout(layout);
        assert_eq!(
            p.forward(&x).unwrap().data()[[0, 0, 0, 0]],
            255,
            "{layout:?}"
        );
        let a = QAvgPool2d::new((3000, 3000), (1, 1), (0, 0), true)
            .unwrap()
            .with_layout(layout);
        assert_eq!(
            a.forward(&x).unwrap().data()[[0, 0, 0, 0]],
            255,
            "{layout:?}"
        );
    }
}

/// Unchecked size arithmetic: huge paddings, kernels and dilations give typed errors.
#[test]
fn huge_sizes_give_typed_errors() {
    let x = QTensor::new(ArrayD::zeros(IxDyn(&[1, 1, 4, 4])), 0.1, 0).unwrap();
    let mp = QMaxPool2d::new((usize::MAX, 1), (1, 1), (usize::MAX / 2, 0), (1, 1)).unwrap();
    assert!(matches!(
        mp.forward(&x),
        Err(QuantError::ShapeMismatch { .. })
    ));
    assert!(QMaxPool2d::new((2, 2), (1, 1), (usize::MAX, 0), (1, 1)).is_err());
    let dil = QMaxPool2d::new((3, 3), (1, 1), (0, 0), (usize::MAX / 2, 1)).unwrap();
    assert!(matches!(
        dil.forward(&x),
        Err(QuantError::ShapeMismatch { .. })
    ));
    let ap = QAvgPool2d::new((usize::MAX, 1), (1, 1), (usize::MAX / 2, 0), true).unwrap();
    assert!(matches!(
        ap.forward(&x),
        Err(QuantError::ShapeMismatch { .. })
    ));
    let qp = QParams::per_tensor(0.1, 0, DType::QInt8).unwrap();
    let conv = QConv2d::from_quantized(
        Array4::from_elem((1, 1, 3, 3), 1i8).view(),
        &qp,
        None,
        Conv2dParams {
            padding: (usize::MAX / 2, 0),
            dilation: (usize::MAX / 4, 1),
            ..Default::default()
        },
        0.1,
        0,
    )
    .unwrap();
    assert!(matches!(
        conv.forward(&x),
        Err(QuantError::ShapeMismatch { ref context, .. }) if context == "QConv2d"
    ));
}

fn meta_map(s: &str) -> HashMap<&str, &str> {
    s.split(';').filter_map(|kv| kv.split_once('=')).collect()
}

fn pair(m: &HashMap<&str, &str>, key: &str) -> (usize, usize) {
    let (a, b) = m[key].split_once(',').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

/// PyTorch's quantized max and average pooling with `ceil_mode` (and floor mode beside
/// it), both memory layouts, bit for bit.
#[test]
fn pooling_matches_pytorch_ceil_mode() {
    const FIXTURE: &[u8] = include_bytes!("fixtures/pool_ceil.safetensors");
    let st = SafeTensors::deserialize(FIXTURE).unwrap();
    let (_, md) = SafeTensors::read_metadata(FIXTURE).unwrap();
    let meta = md.metadata().clone().unwrap();
    assert!(meta["torch_version"].starts_with("2.15.0"));
    let tensor = |name: String| {
        let t = st.tensor(&name).unwrap();
        assert_eq!(t.dtype(), Dtype::U8);
        ArrayD::from_shape_vec(IxDyn(t.shape()), t.data().to_vec()).unwrap()
    };
    let mut keys: Vec<&String> = meta.keys().filter(|k| k.starts_with('p')).collect();
    keys.sort();
    let (mut cases, mut ceil_cases, mut values) = (0, 0, 0);
    for k in keys {
        let m = meta_map(&meta[k]);
        let x = QTensor::new(
            tensor(format!("{k}.x")),
            m["scale"].parse().unwrap(),
            m["zp"].parse().unwrap(),
        )
        .unwrap();
        let want = tensor(format!("{k}.y"));
        let ceil = m["ceil"] == "1";
        let layout = if m["channels_last"] == "1" {
            TorchLayout::ChannelsLast
        } else {
            TorchLayout::Contiguous
        };
        let y = if m["op"] == "max" {
            QMaxPool2d::new(
                pair(&m, "kernel"),
                pair(&m, "stride"),
                pair(&m, "padding"),
                pair(&m, "dilation"),
            )
            .unwrap()
            .with_ceil_mode(ceil)
            .forward(&x)
        } else {
            QAvgPool2d::new(
                pair(&m, "kernel"),
                pair(&m, "stride"),
                pair(&m, "padding"),
                m["count_include_pad"] == "1",
            )
            .unwrap()
            .with_layout(layout)
            .with_ceil_mode(ceil)
            .forward(&x)
        }
        .unwrap();
        assert_eq!(y.data(), &want, "{k}: {}", meta[k]);
        cases += 1;
        ceil_cases += ceil as usize;
        values += want.len();
    }
    assert_eq!(cases, 37);
    assert!(ceil_cases >= 18 && values > 1000, "{ceil_cases} {values}");
}

/// PyTorch's quantized add, written plainly: memory order (NHWC for channels-last rank-4
/// tensors), the vectorized formula on whole blocks of 64, `quantize_val` on the tail.
fn add_oracle(a: &QTensor, b: &QTensor, so: f32, zo: i32, relu: bool, nhwc: bool) -> Vec<u8> {
    let order = |t: &QTensor| -> Vec<u8> {
        if nhwc {
            t.data()
                .view()
                .permuted_axes(IxDyn(&[0, 2, 3, 1]))
                .iter()
                .copied()
                .collect()
        } else {
            t.data().iter().copied().collect()
        }
    };
    let (xa, xb) = (order(a), order(b));
    let (sa, za, sb, zb) = (a.scale(), a.zero_point(), b.scale(), b.zero_point());
    let n = xa.len();
    let nv = n / 64 * 64;
    let mem: Vec<u8> = (0..n)
        .map(|i| {
            let (qa, qb) = (xa[i] as f32, xb[i] as f32);
            if i < nv {
                let mut c = sa.mul_add(qa, sa * -(za as f32)) + sb.mul_add(qb, sb * -(zb as f32));
                if relu {
                    c = c.max(0.0);
                }
                let x = (c * (1.0f32 / so)).min(2147483520.0);
                let r = if x.is_nan() || x < -2147483648.0 {
                    i32::MIN as i64
                } else {
                    x.round_ties_even() as i64
                } + zo as i64;
                r.clamp(0, 255) as u8
            } else {
                let mut c = (qa - za as f32) * sa + (qb - zb as f32) * sb;
                if relu {
                    c = c.max(0.0);
                }
                ptq::quantize_val(c, so, zo, 0, 255) as u8
            }
        })
        .collect();
    if !nhwc {
        return mem;
    }
    let s = a.data().shape();
    let (bn, c, hw) = (s[0], s[1], s[2] * s[3]);
    let mut out = vec![0u8; n];
    for bi in 0..bn {
        for p in 0..hw {
            for ch in 0..c {
                out[(bi * c + ch) * hw + p] = mem[(bi * hw + p) * c + ch];
            }
        }
    }
    out
}

/// The int8 add and add+ReLU on every kernel set, both layouts, sizes with and without a
/// scalar tail, extreme output scales, against the plain oracle above.
#[test]
fn add_matches_oracle_on_every_path() {
    use ptq::nn::quantized::QAdd;
    let mut seed = 7;
    for shape in [
        [1usize, 8, 5, 7],
        [2, 3, 6, 5],
        [1, 64, 4, 4],
        [1, 3, 1, 1],
        [3, 17, 9, 11],
        [1, 64, 130, 130],
    ] {
        let n: usize = shape.iter().product();
        for &(sa, za, sb, zb, so, zo) in &[
            (0.02f32, 120, 0.03f32, 130, 0.04f32, 128),
            (0.1, 0, 0.1, 255, 0.0123, 3),
            (1e-3, 77, 2.5, 0, 1e-6, 255),
        ] {
            seed += 1;
            let a = QTensor::new(
                ArrayD::from_shape_vec(IxDyn(&shape), bytes(n, seed)).unwrap(),
                sa,
                za,
            )
            .unwrap();
            let b = QTensor::new(
                ArrayD::from_shape_vec(IxDyn(&shape), bytes(n, seed * 31)).unwrap(),
                sb,
                zb,
            )
            .unwrap();
            for relu in [false, true] {
                for layout in [TorchLayout::ChannelsLast, TorchLayout::Contiguous] {
                    let want =
                        add_oracle(&a, &b, so, zo, relu, layout == TorchLayout::ChannelsLast);
                    let mut add = QAdd::new(so, zo).unwrap().with_layout(layout);
                    if relu {
                        add = add.with_relu();
                    }
                    for ks in sets() {
                        let y = ks.install(|| add.forward(&a, &b)).unwrap();
                        let got: Vec<u8> = y.data().iter().copied().collect();
                        assert_eq!(
                            got,
                            want,
                            "{shape:?} {layout:?} relu {relu} {:?}",
                            ks.backend()
                        );
                    }
                }
            }
        }
    }
}

/// Requantization is cached per activation scale: calls alternating between two input
/// scales each give the oracle's result for their own scale.
#[test]
fn changing_the_input_scale_rebuilds_the_requantization() {
    let g = geom(8, 1, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1));
    let dense = ConvGeom { groups: 1, ..g };
    for geom in [g, dense] {
        let conv = random_conv(geom, 9);
        let layer = conv.layer();
        let x1 = conv.input();
        let x2 = QTensor::new(x1.data().clone(), ACT_SCALE * 3.0, conv.a_zp).unwrap();
        let rq2 = RequantParams::new(geom.c_out, ACT_SCALE * 3.0, &conv.w_scales, true, None, OUT)
            .unwrap();
        let want2 = qconv2d_naive(&conv.x, &geom, conv.a_zp, &conv.w, &conv.w_zp, &rq2);
        let want1 = conv.expected();
        assert_ne!(want1, want2);
        for _ in 0..2 {
            let y1: Vec<u8> = layer.forward(&x1).unwrap().data().iter().copied().collect();
            let y2: Vec<u8> = layer.forward(&x2).unwrap().data().iter().copied().collect();
            assert_eq!(y1, want1);
            assert_eq!(y2, want2);
        }
    }
}

/// `ceil_mode` survives a `.qmodel` round trip (written only when set; with ceil_mode the
/// pools are float islands between int8 borders).
#[test]
fn ceil_mode_survives_qmodel_round_trip() {
    use ptq::graph::{Dim, GraphBuilder, Pool2dSpec};
    use ptq::nn::quantized::QuantizedModel;
    use ptq::qconfig::{QConfig, QConfigMap};
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 2.into(), 5.into(), 5.into()])
        .unwrap();
    let q = g.quant_stub("quant", x).unwrap();
    let spec = Pool2dSpec::new(2, 2).with_stride(2, 2);
    let mp = g.max_pool2d("mp", q, spec.with_ceil_mode(true)).unwrap();
    let ap = spec
        .with_padding(1, 1)
        .with_count_include_pad(false)
        .with_ceil_mode(true);
    let ap = g.avg_pool2d("ap", mp, ap).unwrap();
    let out = g.dequant_stub("dequant", ap).unwrap();
    g.output(out).unwrap();
    let x = ArrayD::from_shape_fn(IxDyn(&[1, 2, 5, 5]), |d| {
        (d[1] * 25 + d[2] * 5 + d[3]) as f32 * 0.1
    });
    let mut p =
        ptq::quant::prepare(g.build().unwrap(), &QConfigMap::new(QConfig::fbgemm())).unwrap();
    ptq::quant::calibrate(&mut p, [x.clone()]).unwrap();
    let m = QuantizedModel::from_graph(ptq::quant::convert(p).unwrap()).unwrap();
    let back = QuantizedModel::from_bytes(&m.to_bytes().unwrap()).unwrap();
    let (y1, y2) = (m.forward(&x).unwrap(), back.forward(&x).unwrap());
    // PyTorch: max pool 5 -> 3 (ceil); avg pool 3 -> 2 (ceil gives 3, but the third window
    // would start in the right padding, so it is dropped).
    assert_eq!(y1.shape(), &[1, 2, 2, 2]);
    assert_eq!(y1, y2);
}

/// NCHW bytes `[b, c, hw]` to NHWC.
fn to_nhwc(x: &[u8], b: usize, c: usize, hw: usize) -> Vec<u8> {
    let mut y = vec![0u8; x.len()];
    for bi in 0..b {
        for ci in 0..c {
            for p in 0..hw {
                y[(bi * hw + p) * c + ci] = x[(bi * c + ci) * hw + p];
            }
        }
    }
    y
}

/// The NHWC pooling kernels (`kernels::pool`) on every set against the pooling layers
/// (pinned to PyTorch by `pooling_matches_pytorch_ceil_mode`): max with dilation and
/// `ceil_mode`, average with and without `count_include_pad` in both roundings, channel
/// counts around the SIMD widths.
#[test]
fn pool_kernels_match_the_layers_on_every_set() {
    use ptq::kernels::conv::out_len;
    use ptq::kernels::pool::{avg_pool_nhwc, max_pool_nhwc, PoolGeom};
    let mut n = 0u64;
    for (b, c) in [(1usize, 1usize), (2, 3), (1, 17), (1, 40)] {
        for (h, w) in [(1usize, 1usize), (4, 5), (6, 3)] {
            for k in 1usize..=3 {
                for s in 1usize..=2 {
                    for p in 0..=k / 2 {
                        for (d, ceil) in [(1usize, false), (1, true), (2, false)] {
                            n += 1;
                            let (Some(oh), Some(ow)) =
                                (out_len(h, k, s, p, d, ceil), out_len(w, k, s, p, d, ceil))
                            else {
                                continue;
                            };
                            let x = bytes(b * c * h * w, n);
                            let zp = (n % 256) as i32;
                            let qx = QTensor::new(
                                ArrayD::from_shape_vec(IxDyn(&[b, c, h, w]), x.clone()).unwrap(),
                                0.1,
                                zp,
                            )
                            .unwrap();
                            let xn = to_nhwc(&x, b, c, h * w);
                            let g = PoolGeom {
                                batch: b,
                                channels: c,
                                in_hw: (h, w),
                                out_hw: (oh, ow),
                                kernel: (k, k),
                                stride: (s, s),
                                padding: (p, p),
                                dilation: (d, d),
                            };
                            let mp = QMaxPool2d::new((k, k), (s, s), (p, p), (d, d))
                                .unwrap()
                                .with_ceil_mode(ceil);
                            let want = mp.forward(&qx).unwrap();
                            let want = to_nhwc(want.data().as_slice().unwrap(), b, c, oh * ow);
                            for ks in sets() {
                                let mut got = vec![0xA5u8; want.len()];
                                max_pool_nhwc(ks, &xn, &g, &mut got);
                                assert_eq!(got, want, "max {g:?} on {:?}", ks.backend());
                            }
                            if d != 1 {
                                continue;
                            }
                            for include_pad in [false, true] {
                                for layout in [TorchLayout::ChannelsLast, TorchLayout::Contiguous] {
                                    let ap = QAvgPool2d::new((k, k), (s, s), (p, p), include_pad)
                                        .unwrap()
                                        .with_ceil_mode(ceil)
                                        .with_layout(layout);
                                    let want = ap.forward(&qx).unwrap();
                                    let want =
                                        to_nhwc(want.data().as_slice().unwrap(), b, c, oh * ow);
                                    let cl =
                                        layout == TorchLayout::ChannelsLast || c == 1 || h * w == 1;
                                    for ks in sets() {
                                        let mut got = vec![0xA5u8; want.len()];
                                        avg_pool_nhwc(ks, &xn, zp, &g, include_pad, cl, &mut got);
                                        assert_eq!(
                                            got,
                                            want,
                                            "avg {g:?} pad {include_pad} {layout:?} on {:?}",
                                            ks.backend()
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(n > 300, "{n} cases");
}

/// Issue 9: convolutions with few input channels (stems) go through the im2col that
/// copies whole kernel rows (`kw * c_in` contiguous NHWC bytes) in one move; every small
/// channel count, 3x3 and 7x7 kernels, strides 1 and 2 and paddings 0..=3 (the kernel
/// rows cut by the padding on either side, or wholly outside it) on every set, with
/// asymmetric and all-zero weight zero points, against the naive oracle.
#[test]
fn small_input_channel_convs_match_oracle_on_every_path() {
    let mut n = 0u64;
    for c_in in 1..=5usize {
        for k in [3usize, 7] {
            for s in [1usize, 2] {
                for p in 0..=3usize {
                    let hw = (k + 2, k + 4);
                    let g = ConvGeom {
                        batch: 2,
                        c_in,
                        in_hw: hw,
                        c_out: 8 * c_in + 3,
                        kernel: (k, k),
                        stride: (s, s),
                        padding: (p, p),
                        dilation: (1, 1),
                        groups: 1,
                    };
                    let mut conv = random_conv(g, 500 + n);
                    if n.is_multiple_of(3) {
                        conv.w_zp.iter_mut().for_each(|z| *z = 0);
                    }
                    conv.check();
                    n += 1;
                }
            }
        }
    }
    assert_eq!(n, 80);
}
