//! AVX2 == portable == naive reference, bit for bit, over random shapes and parameters.

mod common;

use proptest::prelude::*;
use ptq::kernels::reference::qgemm_naive;
use ptq::kernels::{
    avx2_available, avx512_vnni_available, qgemm_on, Activations, Backend, KernelPath, OutputQuant,
    PackedWeights, RequantParams,
};

#[derive(Debug, Clone)]
struct Case {
    m: usize,
    k: usize,
    n: usize,
    a: Vec<u8>,
    a_zp: i32,
    w: Vec<i8>,
    w_zp: Vec<i32>,
    per_channel: bool,
    bias: Option<Vec<f32>>,
    act_scale: f32,
    w_scales: Vec<f32>,
    out: OutputQuant,
    ldc_pad: usize,
}

fn zp_u8() -> impl Strategy<Value = i32> {
    prop_oneof![Just(0), Just(255), Just(127), Just(128), 0..=255i32]
}

fn case() -> impl Strategy<Value = Case> {
    (
        0usize..13,
        prop_oneof![Just(0usize), Just(1), Just(2), Just(3), Just(4), 0usize..70],
        prop_oneof![Just(1usize), Just(15), Just(16), Just(17), 1usize..45],
        any::<bool>(),
        0u8..4,
    )
        .prop_flat_map(|(m, k, n, per_channel, range)| {
            let amax: u8 = if range % 2 == 0 { 127 } else { 255 };
            let (wmin, wmax): (i8, i8) = if range < 2 { (-64, 63) } else { (-128, 127) };
            let nw = if per_channel { n } else { 1 };
            (
                proptest::collection::vec(0..=amax, m * k),
                zp_u8(),
                proptest::collection::vec(wmin..=wmax, n * k),
                prop_oneof![
                    Just(vec![0i32; nw]),
                    proptest::collection::vec(-128i32..=127, nw)
                ],
                proptest::option::of(proptest::collection::vec(-50.0f32..50.0, n)),
                1e-4f32..0.1,
                proptest::collection::vec(1e-4f32..0.05, nw),
                (1e-3f32..1.0, zp_u8(), any::<bool>()),
                0usize..3,
            )
                .prop_map(
                    move |(a, a_zp, w, w_zp, bias, act_scale, w_scales, (s, z, relu), ldc_pad)| {
                        Case {
                            m,
                            k,
                            n,
                            a,
                            a_zp,
                            w,
                            w_zp,
                            per_channel,
                            bias,
                            act_scale,
                            w_scales,
                            out: OutputQuant {
                                scale: s,
                                zero_point: z,
                                relu,
                            },
                            ldc_pad,
                        }
                    },
                )
        })
}

fn first_diff(got: &[u8], want: &[u8]) -> Option<(usize, u8, u8)> {
    got.iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .map(|i| (i, got[i], want[i]))
}

fn check(c: &Case) -> Vec<KernelPath> {
    let rq = RequantParams::new(
        c.n,
        c.act_scale,
        &c.w_scales,
        c.per_channel,
        c.bias.as_deref(),
        c.out,
    )
    .unwrap();
    let packed = PackedWeights::new(&c.w, c.n, c.k, &c.w_zp).unwrap();
    let ldc = c.n + c.ldc_pad;
    let len = c.m * ldc;
    let mut want = vec![7u8; len];
    qgemm_naive(&c.a, c.m, c.k, c.a_zp, &c.w, &c.w_zp, &rq, &mut want, ldc);
    let act = Activations {
        data: &c.a,
        rows: c.m,
        zero_point: c.a_zp,
    };
    let mut paths = vec![];
    let mut got = vec![7u8; len];
    paths.push(qgemm_on(Backend::Portable, act, &packed, &rq, &mut got, ldc).unwrap());
    assert_eq!(
        first_diff(&got, &want),
        None,
        "portable != naive for m={} k={} n={}",
        c.m,
        c.k,
        c.n
    );
    if avx2_available() {
        let mut got = vec![7u8; len];
        paths.push(qgemm_on(Backend::Avx2, act, &packed, &rq, &mut got, ldc).unwrap());
        assert_eq!(
            first_diff(&got, &want),
            None,
            "avx2 != naive for m={} k={} n={}",
            c.m,
            c.k,
            c.n
        );
    }
    if avx512_vnni_available() {
        let mut got = vec![7u8; len];
        let p = qgemm_on(Backend::Avx512Vnni, act, &packed, &rq, &mut got, ldc).unwrap();
        assert_eq!(p, KernelPath::Avx512Vnni);
        assert_eq!(
            first_diff(&got, &want),
            None,
            "avx512 vnni != naive for m={} k={} n={}",
            c.m,
            c.k,
            c.n
        );
    }
    paths
}

proptest! {
    #![proptest_config(common::proptest_config(400))]
    #[test]
    fn avx2_eq_portable_eq_naive(c in case()) {
        check(&c);
    }
}

/// Large accumulators and extreme zero points: all paths exact, and the split path runs
/// when full-range activations meet full-range weights.
#[test]
fn extremes_and_split_path() {
    let (m, k, n) = (9, 301, 35);
    let a: Vec<u8> = (0..m * k)
        .map(|i| if i % 3 == 0 { 255 } else { (i * 7) as u8 })
        .collect();
    let w: Vec<i8> = (0..n * k)
        .map(|i| {
            if i % 2 == 0 {
                -128
            } else {
                127 - (i % 5) as i8
            }
        })
        .collect();
    for (a_zp, w_zp, pc) in [
        (0, vec![0], false),
        (255, vec![-128], false),
        (128, (0..n as i32).map(|j| j - 17).collect(), true),
    ] {
        let nw = w_zp.len();
        let c = Case {
            m,
            k,
            n,
            a: a.clone(),
            a_zp,
            w: w.clone(),
            w_zp,
            per_channel: pc,
            bias: Some((0..n).map(|j| j as f32 * 0.37 - 5.0).collect()),
            act_scale: 0.02,
            w_scales: vec![0.003; nw],
            out: OutputQuant {
                scale: 0.5,
                zero_point: 3,
                relu: a_zp == 255,
            },
            ldc_pad: 1,
        };
        let paths = check(&c);
        if avx2_available() {
            assert_eq!(paths[1], KernelPath::Avx2Split);
        }
    }
}

/// k = 0: the output is the requantized bias alone.
#[test]
fn k_zero() {
    let c = Case {
        m: 3,
        k: 0,
        n: 5,
        a: vec![],
        a_zp: 9,
        w: vec![],
        w_zp: vec![0],
        per_channel: false,
        bias: Some(vec![1.0, -1.0, 0.5, 0.0, 100.0]),
        act_scale: 0.1,
        w_scales: vec![0.1],
        out: OutputQuant {
            scale: 0.1,
            zero_point: 50,
            relu: false,
        },
        ldc_pad: 0,
    };
    check(&c);
}

/// Regression: the tile of the second column panel was written at columns 0.. instead of
/// 16.. (the output slice lacked the panel's column offset).
#[test]
fn regression_second_panel_columns() {
    let c = Case {
        m: 1,
        k: 1,
        n: 17,
        a: vec![3],
        a_zp: 0,
        w: (0..17).map(|i| i as i8).collect(),
        w_zp: vec![0],
        per_channel: false,
        bias: None,
        act_scale: 1.0,
        w_scales: vec![1.0],
        out: OutputQuant {
            scale: 1.0,
            zero_point: 0,
            relu: false,
        },
        ldc_pad: 0,
    };
    let rq = RequantParams::new(
        c.n,
        c.act_scale,
        &c.w_scales,
        c.per_channel,
        c.bias.as_deref(),
        c.out,
    )
    .unwrap();
    let packed = PackedWeights::new(&c.w, c.n, c.k, &c.w_zp).unwrap();
    let mut got = vec![7u8; 17];
    qgemm_on(
        Backend::Portable,
        Activations {
            data: &c.a,
            rows: 1,
            zero_point: 0,
        },
        &packed,
        &rq,
        &mut got,
        17,
    )
    .unwrap();
    assert_eq!(got[0], 0);
    assert_eq!(got[16], 48);
    check(&c);
}
