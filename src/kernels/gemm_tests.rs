//! One test suite, instantiated for every declared int8 GEMM micro-kernel (the main
//! kernels and their edge tiles, each run as the driver's only kernel): a property test
//! against [`reference::qgemm_naive`] with a fixed seed, pinned edge shapes and values,
//! and empty shapes.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};

use super::gemm::{gemm_loop, GemmKernel, MatrixRows};
use super::portable::Portable;
use super::reference;
use super::{KernelPath, OutputQuant, PackedWeights, RequantParams};

/// One GEMM problem.
#[derive(Debug, Clone)]
struct Case {
    m: usize,
    k: usize,
    n: usize,
    a: Vec<u8>,
    a_zp: i32,
    w: Vec<i8>,
    w_zp: Vec<i32>,
    bias: Option<Vec<f32>>,
    out_zp: i32,
    relu: bool,
    ldc_pad: usize,
}

/// Runs `case` through `gemm_loop::<K>` and the reference; asserts bit equality and that
/// the bytes between rows (`ldc` padding) are untouched. Returns the path reported.
fn check<K: GemmKernel>(kern: K, c: &Case) -> KernelPath {
    let per_channel = c.w_zp.len() == c.n && c.n != 1;
    let w_scales: Vec<f32> = (0..c.w_zp.len())
        .map(|j| 0.003 + 0.0007 * j as f32)
        .collect();
    let out_q = OutputQuant {
        scale: 0.05,
        zero_point: c.out_zp,
        relu: c.relu,
    };
    let rq = RequantParams::new(c.n, 0.02, &w_scales, per_channel, c.bias.as_deref(), out_q)
        .expect("valid requantization");
    let packed = PackedWeights::new(&c.w, c.n, c.k, &c.w_zp).expect("valid weights");
    let ldc = c.n + c.ldc_pad;
    let len = if c.m == 0 { 7 } else { (c.m - 1) * ldc + c.n };
    let mut got = vec![0xA5u8; len];
    let mut want = vec![0xA5u8; len];
    let src = MatrixRows { data: &c.a, k: c.k };
    let path = gemm_loop(kern, &src, c.m, c.a_zp, &packed, &rq, &mut got, ldc);
    reference::qgemm_naive(&c.a, c.m, c.k, c.a_zp, &c.w, &c.w_zp, &rq, &mut want, ldc);
    assert_eq!(got, want, "m={} k={} n={} ldc={ldc}", c.m, c.k, c.n);
    path
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(0usize), Just(1), Just(4), Just(8), Just(9), 0usize..21],
        prop_oneof![Just(0usize), Just(1), Just(3), Just(4), 0usize..80],
        prop_oneof![
            Just(1usize),
            Just(16),
            Just(17),
            Just(32),
            Just(48),
            1usize..70
        ],
        any::<bool>(),
        0u8..4,
    )
        .prop_flat_map(|(m, k, n, per_channel, range)| {
            let amax: u8 = if range % 2 == 0 { 127 } else { 255 };
            let (wmin, wmax): (i8, i8) = if range < 2 { (-64, 63) } else { (-128, 127) };
            let nw = if per_channel { n } else { 1 };
            (
                proptest::collection::vec(0..=amax, m * k),
                prop_oneof![Just(0), Just(255), 0..=255i32],
                proptest::collection::vec(wmin..=wmax, n * k),
                // Symmetric weights (all zero points 0: no row sums) or any zero points.
                prop_oneof![
                    Just(vec![0i32; nw]),
                    proptest::collection::vec(-128i32..=127, nw)
                ],
                proptest::option::of(proptest::collection::vec(-5.0f32..5.0, n)),
                (0..=255i32, any::<bool>(), 0usize..3),
            )
                .prop_map(move |(a, a_zp, w, w_zp, bias, (out_zp, relu, ldc_pad))| {
                    Case {
                        m,
                        k,
                        n,
                        a,
                        a_zp,
                        w,
                        w_zp,
                        bias,
                        out_zp,
                        relu,
                        ldc_pad,
                    }
                })
        })
}

/// Property test: random shapes and operands, fixed seed, no persistence file.
fn prop_vs_reference<K: GemmKernel>(kern: K) {
    let config = Config {
        cases: 256,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x6b39_6b65_726e_656c),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    runner
        .run(&case_strategy(), |c| {
            check(kern, &c);
            Ok(())
        })
        .unwrap();
}

/// A deterministic case with operands from a small LCG; `a_max`/`w_lo..=w_hi` bound the
/// values.
fn pinned(m: usize, k: usize, n: usize, a_max: u8, w_lo: i8, w_hi: i8, seed: u32) -> Case {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    let mut next = || {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        x >> 8
    };
    let span = (w_hi as i32 - w_lo as i32 + 1) as u32;
    let a = (0..m * k)
        .map(|_| (next() % (a_max as u32 + 1)) as u8)
        .collect();
    let w = (0..n * k)
        .map(|_| (w_lo as i32 + (next() % span) as i32) as i8)
        .collect();
    Case {
        m,
        k,
        n,
        a,
        a_zp: (next() % 256) as i32,
        w,
        w_zp: (0..n).map(|_| (next() % 256) as i32 - 128).collect(),
        bias: Some((0..n).map(|j| j as f32 * 0.25 - 2.0).collect()),
        out_zp: (next() % 256) as i32,
        relu: seed % 2 == 1,
        ldc_pad: (seed % 3) as usize,
    }
}

/// Shapes on every tile edge: rows 1..=9 and around the 256-row block, `k` not a
/// multiple of 4 (and 0), one to three panels plus partial ones, several row blocks.
fn pinned_edges<K: GemmKernel>(kern: K) {
    let shapes = [
        (1, 1, 1),
        (1, 64, 16),
        (2, 5, 17),
        (3, 4, 31),
        (4, 8, 32),
        (5, 3, 33),
        (7, 12, 48),
        (8, 16, 49),
        (9, 65, 64),
        (12, 7, 15),
        (17, 0, 20),
        (255, 9, 18),
        (257, 20, 40),
        (520, 33, 35),
    ];
    for (i, &(m, k, n)) in shapes.iter().enumerate() {
        for (a_max, w_lo, w_hi) in [(127, -128, 127), (255, -64, 63), (255, -128, 127)] {
            let mut c = pinned(m, k, n, a_max, w_lo, w_hi, i as u32);
            check(kern, &c);
            // Symmetric weights: the driver skips the row sums.
            c.w_zp.iter_mut().for_each(|z| *z = 0);
            check(kern, &c);
        }
    }
    // Extreme operands: every activation 255 and every weight -128 (the largest
    // magnitudes, where `vpmaddubsw` would saturate without the split), zero points at the
    // far ends.
    // Depths around multiples of 512 (128 groups of 4: where the AVX2 split tile flushes
    // its `i16` sums of the top bits, which reach -32768 here with weights -128) and beyond.
    for (m, k, n, wv) in [
        (5, 260, 33, -128),
        (8, 64, 16, -128),
        (1, 4, 1, -128),
        (4, 512, 16, -128),
        (6, 516, 17, -128),
        (3, 1030, 16, -128),
        (4, 1024, 20, 127),
    ] {
        let mut c = pinned(m, k, n, 255, -128, 127, 99);
        c.a.iter_mut().for_each(|v| *v = 255);
        c.w.iter_mut().for_each(|v| *v = wv);
        c.a_zp = 0;
        c.w_zp.iter_mut().for_each(|z| *z = 127);
        check(kern, &c);
        c.a_zp = 255;
        c.w_zp.iter_mut().for_each(|z| *z = -128);
        check(kern, &c);
        c.w_zp.iter_mut().for_each(|z| *z = 0);
        check(kern, &c);
    }
    // Long rows of random full-range operands (split blocks on the AVX2 kernel, flushed
    // several times per tile).
    for (i, &(m, k, n)) in [(9, 1540, 33), (4, 2052, 16)].iter().enumerate() {
        check(kern, &pinned(m, k, n, 255, -128, 127, 40 + i as u32));
    }
}

/// No rows, no depth: nothing is written (m = 0) or the output is the requantized bias
/// (k = 0), and nothing panics.
fn empty_shapes<K: GemmKernel>(kern: K) {
    let mut c = pinned(0, 5, 3, 255, -128, 127, 1);
    c.a.clear();
    check(kern, &c);
    let c = pinned(0, 0, 1, 255, -128, 127, 2);
    check(kern, &c);
    let c = pinned(6, 0, 40, 255, -128, 127, 3);
    check(kern, &c);
}

/// Declares the suite for one kernel: `$make` is an `Option` of the kernel (`None` where
/// the CPU lacks its instruction set; the test then checks that detection agrees and says
/// so on stderr).
macro_rules! kernel_suite {
    ($name:ident, $make:expr, $available:expr) => {
        mod $name {
            use super::*;

            fn kernel() -> Option<impl GemmKernel> {
                let k = $make;
                assert_eq!(
                    k.is_some(),
                    $available,
                    "detection and constructor disagree"
                );
                if k.is_none() {
                    eprintln!(
                        "{}: this CPU lacks the instruction set; kernel not run",
                        stringify!($name)
                    );
                }
                k
            }

            #[test]
            fn prop_vs_reference() {
                if let Some(k) = kernel() {
                    super::prop_vs_reference(k);
                }
            }

            #[test]
            fn pinned_edges() {
                if let Some(k) = kernel() {
                    super::pinned_edges(k);
                }
            }

            #[test]
            fn empty_shapes() {
                if let Some(k) = kernel() {
                    super::empty_shapes(k);
                }
            }
        }
    };
}

kernel_suite!(portable, Some(Portable), true);

#[cfg(target_arch = "x86_64")]
mod x86_suites {
    use super::*;
    use crate::kernels::x86::{
        Avx2, Avx2Kernel, Avx2TwoPass, Vnni12x16, Vnni12x32, Vnni4x16, Vnni4x32, Vnni8x16, Vnni8x32,
    };

    fn vnni_token() -> Option<Avx2> {
        Avx2::detect(true).filter(|s| s.vnni())
    }

    fn vnni_available() -> bool {
        crate::kernels::avx512_vnni_available()
    }

    kernel_suite!(
        avx2,
        Avx2::detect(false).map(Avx2Kernel::new),
        crate::kernels::avx2_available()
    );
    kernel_suite!(
        avx512_vnni_12x32,
        vnni_token().and_then(Vnni12x32::new),
        vnni_available()
    );
    kernel_suite!(
        avx512_vnni_12x16,
        vnni_token().and_then(Vnni12x16::new),
        vnni_available()
    );
    kernel_suite!(
        avx512_vnni_8x32,
        vnni_token().and_then(Vnni8x32::new),
        vnni_available()
    );
    kernel_suite!(
        avx512_vnni_4x32,
        vnni_token().and_then(Vnni4x32::new),
        vnni_available()
    );
    kernel_suite!(
        avx512_vnni_8x16,
        vnni_token().and_then(Vnni8x16::new),
        vnni_available()
    );
    kernel_suite!(
        avx512_vnni_4x16,
        vnni_token().and_then(Vnni4x16::new),
        vnni_available()
    );

    kernel_suite!(
        avx2_two_pass_split,
        Avx2::detect(false).map(|s| Avx2TwoPass(Avx2Kernel::new(s))),
        crate::kernels::avx2_available()
    );

    /// The AVX2 kernel reports the split path exactly when it needed it.
    #[test]
    fn avx2_reports_split_only_when_needed() {
        let Some(k) = Avx2::detect(false).map(Avx2Kernel::new) else {
            assert!(!crate::kernels::avx2_available());
            return;
        };
        let wide = pinned(5, 9, 20, 255, -128, 127, 4);
        assert_eq!(check(k, &wide), KernelPath::Avx2Split);
        let low = pinned(5, 9, 20, 127, -128, 127, 5);
        assert_eq!(check(k, &low), KernelPath::Avx2Fast);
        let narrow = pinned(5, 9, 20, 255, -64, 63, 6);
        assert_eq!(check(k, &narrow), KernelPath::Avx2Fast);
    }
}
