//! The int8 ops of `ptq::nn::quantized` added for real model graphs (mul, cat, activations,
//! upsample, batch norm): bit-exact parity with PyTorch 2.15.0 (engine fbgemm, one thread)
//! on fixtures written by `tools/gen_op_fixtures.py`, properties against a naive
//! dequantize -> float op -> quantize reference, and bad input.

use std::collections::HashMap;

use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use ptq::nn::quantized::{
    ActTables, QBatchNorm2d, QCat, QClamp, QHardsigmoid, QHardswish, QLayerNorm, QLeakyReLU, QMul,
    QSigmoid, QTensor, QUpsampleBilinear2d, QUpsampleNearest2d, TorchLayout, UpsampleSize,
};
use ptq::QuantError;
use safetensors::{Dtype, SafeTensors};

struct Fx<'a> {
    st: SafeTensors<'a>,
    meta: HashMap<String, String>,
}

impl<'a> Fx<'a> {
    fn load(bytes: &'a [u8]) -> Self {
        let (_, md) = SafeTensors::read_metadata(bytes).unwrap();
        let meta = md.metadata().clone().unwrap_or_default();
        Fx {
            st: SafeTensors::deserialize(bytes).unwrap(),
            meta,
        }
    }
    fn cases(&self) -> Vec<(String, HashMap<String, String>)> {
        let mut keys: Vec<_> = self.meta.keys().cloned().collect();
        keys.sort();
        keys.into_iter()
            .map(|k| {
                let m = meta_map(&self.meta[&k]);
                (k, m)
            })
            .collect()
    }
    fn raw(&self, name: &str, dt: Dtype) -> (Vec<usize>, &[u8]) {
        let t = self
            .st
            .tensor(name)
            .unwrap_or_else(|_| panic!("missing {name}"));
        assert_eq!(t.dtype(), dt, "{name}");
        (t.shape().to_vec(), t.data())
    }
    fn has(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }
    fn u8(&self, name: &str) -> ArrayD<u8> {
        let (s, d) = self.raw(name, Dtype::U8);
        ArrayD::from_shape_vec(IxDyn(&s), d.to_vec()).unwrap()
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        let (_, d) = self.raw(name, Dtype::F32);
        d.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
    fn f32(&self, name: &str) -> f32 {
        self.f32s(name)[0]
    }
    fn i64(&self, name: &str) -> i64 {
        let (_, d) = self.raw(name, Dtype::I64);
        i64::from_le_bytes(d[..8].try_into().unwrap())
    }
    fn qt(&self, k: &str, x: &str) -> QTensor {
        QTensor::new(
            self.u8(&format!("{k}.{x}")),
            self.f32(&format!("{k}.{x}_scale")),
            self.i64(&format!("{k}.{x}_zp")) as i32,
        )
        .unwrap()
    }
}

fn meta_map(s: &str) -> HashMap<String, String> {
    s.split(';')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (a, b) = p.split_once('=').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect()
}

fn layout(m: &HashMap<String, String>) -> TorchLayout {
    match m.get("layout").map(String::as_str) {
        Some("cl") => TorchLayout::ChannelsLast,
        _ => TorchLayout::Contiguous,
    }
}

/// Asserts `got` equals the fixture's `y` (values and qparams); returns the element count.
fn assert_same(fx: &Fx, k: &str, got: &QTensor, what: &str) -> usize {
    let want = fx.qt(k, "y");
    assert_eq!(got.data().shape(), want.data().shape(), "{k} {what}: shape");
    assert_eq!(got.scale(), want.scale(), "{k} {what}: scale");
    assert_eq!(
        got.zero_point(),
        want.zero_point(),
        "{k} {what}: zero point"
    );
    let diff: Vec<_> = got
        .data()
        .iter()
        .zip(want.data().iter())
        .enumerate()
        .filter(|(_, (g, w))| g != w)
        .take(5)
        .collect();
    assert!(
        diff.is_empty(),
        "{k} {what}: (index, (ours, torch)) {diff:?}"
    );
    got.data().len()
}

fn prop_config() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(20261129),
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------------------------------------ mul

const MUL: &[u8] = include_bytes!("fixtures/ops_mul.safetensors");

#[test]
fn mul_matches_pytorch_bit_for_bit() {
    let fx = Fx::load(MUL);
    let (mut cases, mut values) = (0, 0);
    for (k, m) in fx.cases() {
        let (a, b) = (fx.qt(&k, "a"), fx.qt(&k, "b"));
        let y = fx.qt(&k, "y");
        let mut op = QMul::new(y.scale(), y.zero_point())
            .unwrap()
            .with_layout(layout(&m));
        if m["relu"] == "1" {
            op = op.with_relu();
        }
        values += assert_same(&fx, &k, &op.forward(&a, &b).unwrap(), "mul");
        cases += 1;
    }
    assert_eq!(cases, 28);
    println!("mul: {cases} cases, {values} values identical");
}

fn qtensor(shape: Vec<usize>, seed: u64, scale: f32, zp: i32) -> QTensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 56) as u8
        })
        .collect();
    QTensor::new(ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap(), scale, zp).unwrap()
}

proptest! {
    #![proptest_config(prop_config())]

    /// Against dequantize -> multiply in f64 -> round: the integer product is exact, so the
    /// only difference can be the f32 rounding of the multiplier near a tie (one step).
    #[test]
    fn mul_is_within_one_step_of_the_real_product(
        c in 1usize..90, h in 1usize..6, w in 1usize..6, se in any::<bool>(), cl in any::<bool>(),
        relu in any::<bool>(), seed in any::<u64>(),
        sa in 0.001f32..0.1, sb in 0.001f32..0.1, so in 0.0005f32..0.05,
        za in 0i32..256, zb in 0i32..256, zo in 0i32..256,
    ) {
        let a = qtensor(vec![2, c, h, w], seed, sa, za);
        let b = qtensor(if se { vec![2, c, 1, 1] } else { vec![2, c, h, w] }, seed ^ 1, sb, zb);
        let lay = if cl { TorchLayout::ChannelsLast } else { TorchLayout::Contiguous };
        let mut op = QMul::new(so, zo).unwrap().with_layout(lay);
        if relu { op = op.with_relu(); }
        let y = op.forward(&a, &b).unwrap();
        let (da, db) = (a.dequantize(), b.dequantize());
        for ((idx, &q), &x) in y.data().indexed_iter().zip(da.iter()) {
            let bi = if se { [idx[0], idx[1], 0, 0] } else { [idx[0], idx[1], idx[2], idx[3]] };
            let p = x as f64 * db[IxDyn(&bi)] as f64;
            let mut r = ((p / so as f64).round() + zo as f64).clamp(0.0, 255.0);
            if relu { r = r.max(zo as f64); }
            prop_assert!((q as f64 - r).abs() <= 1.0, "{q} vs {r}");
        }
    }
}

#[test]
fn mul_rejects_shapes_that_do_not_broadcast_and_handles_empty() {
    let op = QMul::new(0.1, 0).unwrap();
    let a = qtensor(vec![1, 4, 3, 3], 1, 0.1, 0);
    let b = qtensor(vec![1, 3, 1, 1], 2, 0.1, 0);
    match op.forward(&a, &b) {
        Err(QuantError::ShapeMismatch { actual, .. }) => assert!(actual.contains("[1, 3, 1, 1]")),
        other => panic!("{other:?}"),
    }
    assert!(QMul::new(0.0, 0).is_err());
    assert!(QMul::new(0.1, 256).is_err());
    let e = qtensor(vec![0, 4, 3, 3], 3, 0.1, 0);
    assert_eq!(
        op.forward(&e, &qtensor(vec![1, 4, 1, 1], 4, 0.1, 0))
            .unwrap()
            .data()
            .shape(),
        &[0, 4, 3, 3]
    );
    assert!(QMul::mul_scalar(&a, f64::NAN, false).is_err());
}

#[test]
fn mul_scalar_follows_pytorch_qparam_rules() {
    let x = qtensor(vec![3, 5], 9, 0.05, 100);
    let y = QMul::mul_scalar(&x, 2.0, false).unwrap();
    assert_eq!((y.scale(), y.zero_point()), (0.1, 100));
    assert_eq!(y.data(), x.data());
    let y = QMul::mul_scalar(&x, -2.0, true).unwrap();
    assert_eq!(y.zero_point(), 155);
    for (a, b) in x.data().iter().zip(y.data().iter()) {
        assert_eq!(*b, (255 - a).max(155));
    }
    let y = QMul::mul_scalar(&x, 0.0, false).unwrap();
    assert!(y.data().iter().all(|&v| v == 0) && y.scale() == 1.0);
}

// ------------------------------------------------------------------------------------ cat

const CAT: &[u8] = include_bytes!("fixtures/ops_cat.safetensors");

#[test]
fn cat_matches_pytorch_bit_for_bit() {
    let fx = Fx::load(CAT);
    let (mut cases, mut values) = (0, 0);
    for (k, m) in fx.cases() {
        let n: usize = m["n"].parse().unwrap();
        let xs: Vec<QTensor> = (0..n).map(|i| fx.qt(&k, &format!("x{i}"))).collect();
        let refs: Vec<&QTensor> = xs.iter().collect();
        let y = fx.qt(&k, "y");
        let mut op = QCat::new(m["dim"].parse().unwrap(), y.scale(), y.zero_point())
            .unwrap()
            .with_layout(layout(&m));
        if m["relu"] == "1" {
            op = op.with_relu();
        }
        values += assert_same(&fx, &k, &op.forward(&refs).unwrap(), "cat");
        cases += 1;
    }
    assert_eq!(cases, 18);
    println!("cat: {cases} cases, {values} values identical");
}

proptest! {
    #![proptest_config(prop_config())]

    /// Against the naive reference dequantize -> concatenate -> quantize (PyTorch's own
    /// definition for non-channels-last inputs): identical there, within one step on the
    /// channels-last fast path (which dequantizes with an FMA).
    #[test]
    fn cat_matches_dequantize_cat_quantize(
        c1 in 1usize..70, c2 in 1usize..70, hw in 1usize..5, cl in any::<bool>(), relu in any::<bool>(),
        seed in any::<u64>(), s1 in 0.001f32..0.1, s2 in 0.001f32..0.1, so in 0.001f32..0.1,
        z1 in 0i32..256, z2 in 0i32..256, zo in 0i32..256,
    ) {
        let a = qtensor(vec![2, c1, hw, hw + 1], seed, s1, z1);
        let b = qtensor(vec![2, c2, hw, hw + 1], seed ^ 7, s2, z2);
        let lay = if cl { TorchLayout::ChannelsLast } else { TorchLayout::Contiguous };
        let mut op = QCat::new(1, so, zo).unwrap().with_layout(lay);
        if relu { op = op.with_relu(); }
        let y = op.forward(&[&a, &b]).unwrap();
        let f = ndarray::concatenate(ndarray::Axis(1), &[a.dequantize().view(), b.dequantize().view()]).unwrap();
        let naive = QTensor::from_f32(&f, so, zo).unwrap();
        let tol = if cl && hw * (hw + 1) > 1 { 1 } else { 0 };
        for (&q, &r) in y.data().iter().zip(naive.data().iter()) {
            let r = if relu { r.max(zo as u8) } else { r };
            prop_assert!((q as i32 - r as i32).abs() <= tol, "{q} vs {r}");
        }
    }
}

#[test]
fn cat_rejects_bad_inputs() {
    let a = qtensor(vec![1, 4, 3, 3], 1, 0.1, 0);
    let b = qtensor(vec![1, 4, 3, 2], 2, 0.1, 0);
    let op = QCat::new(1, 0.1, 0).unwrap();
    match op.forward(&[&a, &b]) {
        Err(QuantError::ShapeMismatch { actual, .. }) => assert!(actual.contains("[1, 4, 3, 2]")),
        other => panic!("{other:?}"),
    }
    assert!(QCat::new(4, 0.1, 0).unwrap().forward(&[&a]).is_err());
    assert!(op.forward(&[]).is_err());
    assert!(op.forward(&[&a, &qtensor(vec![4, 9], 3, 0.1, 0)]).is_err());
    assert!(QCat::new(1, f32::NAN, 0).is_err());
    // same qparams, no relu: the fast path copies
    let y = op.forward(&[&a, &a]).unwrap();
    assert_eq!(y.data().shape(), &[1, 8, 3, 3]);
}

// ---------------------------------------------------------------------------- activations

const ACT: &[u8] = include_bytes!("fixtures/ops_act.safetensors");

enum Act {
    Hardswish(QHardswish),
    Hardsigmoid(QHardsigmoid),
    Sigmoid(QSigmoid),
    Leaky(QLeakyReLU),
    Clamp(QClamp),
}

impl Act {
    fn from_meta(m: &HashMap<String, String>, out: (f32, i32)) -> Act {
        let lay = layout(m);
        let f = |k: &str| m[k].parse::<f32>().unwrap();
        match m["op"].as_str() {
            "hardswish" => Act::Hardswish(QHardswish::new(out.0, out.1).unwrap().with_layout(lay)),
            "hardsigmoid" => Act::Hardsigmoid(QHardsigmoid::new().with_layout(lay)),
            "sigmoid" => Act::Sigmoid(QSigmoid::new().with_layout(lay)),
            "leaky_relu" => Act::Leaky(
                QLeakyReLU::new(f("slope"), out.0, out.1)
                    .unwrap()
                    .with_layout(lay),
            ),
            "relu6" => Act::Clamp(QClamp::relu6()),
            "hardtanh" | "clamp" => Act::Clamp(QClamp::new(f("min"), f("max")).unwrap()),
            other => panic!("unknown op {other}"),
        }
    }
    fn tables(&self, s: f32, z: i32) -> ActTables {
        match self {
            Act::Hardswish(a) => a.tables(s, z),
            Act::Hardsigmoid(a) => a.tables(s, z),
            Act::Sigmoid(a) => a.tables(s, z),
            Act::Leaky(a) => a.tables(s, z),
            Act::Clamp(a) => a.tables(s, z),
        }
    }
    fn forward(&self, x: &QTensor) -> QTensor {
        match self {
            Act::Hardswish(a) => a.forward(x),
            Act::Hardsigmoid(a) => a.forward(x),
            Act::Sigmoid(a) => a.forward(x),
            Act::Leaky(a) => a.forward(x),
            Act::Clamp(a) => a.forward(x),
        }
        .unwrap()
    }
}

#[test]
fn activations_match_pytorch_on_all_256_inputs_and_on_real_tensors() {
    let fx = Fx::load(ACT);
    let mut per_op: HashMap<String, (usize, usize)> = HashMap::new();
    let mut paths_differ = 0;
    for (k, m) in fx.cases() {
        let out = (
            fx.f32(&format!("{k}.y_scale")),
            fx.i64(&format!("{k}.y_zp")) as i32,
        );
        let act = Act::from_meta(&m, out);
        let e = per_op.entry(m["op"].clone()).or_default();
        if fx.has(&format!("{k}.y_vec")) {
            let (s, z) = (
                fx.f32(&format!("{k}.x_scale")),
                fx.i64(&format!("{k}.x_zp")) as i32,
            );
            let t = act.tables(s, z);
            let yv = fx.u8(&format!("{k}.y_vec"));
            let ys = fx.u8(&format!("{k}.y_scalar"));
            for q in 0..256 {
                assert_eq!(t.vector[q], yv[[q]], "{k} {m:?} vector path, q = {q}");
                assert_eq!(t.scalar[q], ys[[q]], "{k} {m:?} scalar path, q = {q}");
            }
            paths_differ += (0..256).filter(|&q| yv[[q]] != ys[[q]]).count();
            // and forward on one 256-element tensor (all vector) reproduces y_vec
            let x = QTensor::new(
                ArrayD::from_shape_vec(IxDyn(&[256]), (0..=255u8).collect()).unwrap(),
                s,
                z,
            )
            .unwrap();
            let y = act.forward(&x);
            assert_eq!((y.scale(), y.zero_point()), out, "{k}");
            assert_eq!(y.data(), &yv, "{k}");
            e.0 += 1;
            e.1 += 512;
        } else {
            let x = fx.qt(&k, "x");
            e.0 += 1;
            e.1 += assert_same(&fx, &k, &act.forward(&x), &m["op"]);
        }
    }
    let total: usize = per_op.values().map(|v| v.0).sum();
    assert_eq!(total, 128);
    let mut ops: Vec<_> = per_op.into_iter().collect();
    ops.sort();
    for (op, (c, v)) in ops {
        println!("{op}: {c} cases, {v} values identical");
    }
    println!("entries where PyTorch's vector and scalar paths differ: {paths_differ}");
    assert!(paths_differ > 0, "the fixture should exercise both paths");
}

/// A float activation, the naive reference.
type RealFn = Box<dyn Fn(f64) -> f64>;

proptest! {
    #![proptest_config(prop_config())]

    /// Against the naive reference dequantize -> f64 activation -> quantize: every table
    /// entry is within one quantization step.
    #[test]
    fn activation_tables_are_within_one_step_of_the_real_function(
        s in 0.002f32..0.2, z in 0i32..256, so in 0.005f32..0.1, zo in 0i32..256,
        slope in -0.5f32..0.5, lo in -3.0f32..0.0, hi in 0.0f32..3.0,
    ) {
        let f_hs = |x: f64| x * (x + 3.0).clamp(0.0, 6.0) / 6.0;
        let f_hsig = |x: f64| (x + 3.0).clamp(0.0, 6.0) / 6.0;
        let f_sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let f_lr = move |x: f64| if x > 0.0 { x } else { x * slope as f64 };
        let q = |y: f64, sc: f32, zp: i32| ((y / sc as f64).round() + zp as f64).clamp(0.0, 255.0);
        let checks: Vec<(ActTables, RealFn, f32, i32)> = vec![
            (QHardswish::new(so, zo).unwrap().tables(s, z), Box::new(f_hs), so, zo),
            (QHardsigmoid::new().tables(s, z), Box::new(f_hsig), 1.0 / 256.0, 0),
            (QSigmoid::new().tables(s, z), Box::new(f_sig), 1.0 / 256.0, 0),
            (QLeakyReLU::new(slope, so, zo).unwrap().tables(s, z), Box::new(f_lr), so, zo),
        ];
        for (t, f, sc, zp) in checks {
            for qi in 0..256usize {
                let x = (qi as f64 - z as f64) * s as f64;
                let r = q(f(x), sc, zp);
                prop_assert!((t.vector[qi] as f64 - r).abs() <= 1.0);
                prop_assert!((t.scalar[qi] as f64 - r).abs() <= 1.0);
            }
        }
        // clamp is exact: the naive reference in float, then quantized with the input's qparams
        let t = QClamp::new(lo, hi).unwrap().tables(s, z);
        for qi in 0..256usize {
            let x = (qi as i32 - z) as f32 * s;
            let lo_q = ptq::quantize_val(lo, s, z, 0, 255);
            let hi_q = ptq::quantize_val(hi, s, z, 0, 255);
            let want = (qi as i32).max(lo_q).min(hi_q);
            prop_assert_eq!(t.vector[qi] as i32, want, "x = {}", x);
            prop_assert_eq!(t.scalar[qi], t.vector[qi]);
        }
    }
}

#[test]
fn activations_reject_bad_parameters() {
    assert!(QHardswish::new(0.0, 0).is_err());
    assert!(QHardswish::new(0.1, -1).is_err());
    assert!(QLeakyReLU::new(f32::INFINITY, 0.1, 0).is_err());
    assert!(QLeakyReLU::new(0.1, f32::NAN, 0).is_err());
    assert!(QClamp::new(0.0, f32::NAN).is_err());
    // an empty tensor passes through with the output qparams
    let e = QTensor::new(ArrayD::zeros(IxDyn(&[0, 3, 2, 2])), 0.1, 3).unwrap();
    let y = QSigmoid::new().forward(&e).unwrap();
    assert_eq!(
        (y.data().shape(), y.scale()),
        (&[0usize, 3, 2, 2][..], 1.0 / 256.0)
    );
}

// ------------------------------------------------------------------------------- upsample

const UPSAMPLE: &[u8] = include_bytes!("fixtures/ops_upsample.safetensors");

fn pair_f(m: &HashMap<String, String>, k: &str) -> Option<(f64, f64)> {
    m.get(k).map(|v| {
        let p: Vec<f64> = v.split(',').map(|x| x.parse().unwrap()).collect();
        (p[0], p[1])
    })
}

#[test]
fn upsample_nearest_matches_pytorch_bit_for_bit() {
    let fx = Fx::load(UPSAMPLE);
    let (mut cases, mut values) = (0, 0);
    for (k, m) in fx.cases() {
        let size = match (pair_f(&m, "size"), pair_f(&m, "scale")) {
            (Some((h, w)), _) => UpsampleSize::Size(h as usize, w as usize),
            (_, Some((h, w))) => UpsampleSize::Scale(h, w),
            _ => panic!("{k}: no size"),
        };
        let x = fx.qt(&k, "x");
        let y = if m["op"] == "upsample_bilinear" {
            QUpsampleBilinear2d::new(size, m["align_corners"] == "1")
                .unwrap()
                .with_layout(layout(&m))
                .forward(&x)
        } else {
            let mut op = QUpsampleNearest2d::new(size).unwrap();
            if m["mode"] == "nearest-exact" {
                op = op.with_exact();
            }
            op.forward(&x)
        };
        values += assert_same(&fx, &k, &y.unwrap(), &m["op"]);
        cases += 1;
    }
    assert_eq!(cases, 20);
    println!("upsample (nearest, bilinear): {cases} cases, {values} values identical");
}

proptest! {
    #![proptest_config(prop_config())]

    /// Integer factors replicate each pixel into a factor x factor block.
    #[test]
    fn upsample_by_integer_factors_replicates_pixels(
        h in 1usize..6, w in 1usize..6, fh in 1usize..4, fw in 1usize..4, seed in any::<u64>(),
        by_size in any::<bool>(),
    ) {
        let x = qtensor(vec![2, 3, h, w], seed, 0.1, 7);
        let size = if by_size { UpsampleSize::Size(h * fh, w * fw) } else { UpsampleSize::Scale(fh as f64, fw as f64) };
        let y = QUpsampleNearest2d::new(size).unwrap().forward(&x).unwrap();
        prop_assert_eq!(y.data().shape(), &[2, 3, h * fh, w * fw]);
        prop_assert_eq!((y.scale(), y.zero_point()), (0.1, 7));
        for ((b, c, i, j), &v) in y.data().view().into_dimensionality::<ndarray::Ix4>().unwrap().indexed_iter() {
            prop_assert_eq!(v, x.data()[[b, c, i / fh, j / fw]]);
        }
    }
}

#[test]
fn upsample_rejects_bad_input() {
    assert!(QUpsampleNearest2d::new(UpsampleSize::Scale(f64::NAN, 2.0)).is_err());
    assert!(QUpsampleNearest2d::new(UpsampleSize::Scale(-1.0, 2.0)).is_err());
    assert!(QUpsampleNearest2d::new(UpsampleSize::Size(3, 0)).is_err());
    let op = QUpsampleNearest2d::new(UpsampleSize::Scale(0.1, 0.1)).unwrap();
    assert!(matches!(
        op.forward(&qtensor(vec![1, 1, 3, 3], 1, 0.1, 0)),
        Err(QuantError::ShapeMismatch { .. })
    ));
    let op = QUpsampleNearest2d::new(UpsampleSize::Scale(2.0, 2.0)).unwrap();
    assert!(op.forward(&qtensor(vec![3, 3], 1, 0.1, 0)).is_err());
    assert!(op.forward(&qtensor(vec![1, 1, 0, 3], 1, 0.1, 0)).is_err());
}

// ----------------------------------------------------------------------------- batch norm

const BN: &[u8] = include_bytes!("fixtures/ops_bn.safetensors");

#[test]
fn batch_norm_matches_pytorch_bit_for_bit() {
    let fx = Fx::load(BN);
    let (mut cases, mut values) = (0, 0);
    for (k, m) in fx.cases() {
        let v = |n: &str| ndarray::Array1::from(fx.f32s(&format!("{k}.{n}")));
        if m["op"] == "layer_norm" {
            continue;
        }
        let (w, b, mean, var) = (v("weight"), v("bias"), v("mean"), v("var"));
        let y = fx.qt(&k, "y");
        let mut op = QBatchNorm2d::new(
            Some(w.view()),
            Some(b.view()),
            mean.view(),
            var.view(),
            m["eps"].parse().unwrap(),
            y.scale(),
            y.zero_point(),
        )
        .unwrap();
        if m["relu"] == "1" {
            op = op.with_relu();
        }
        values += assert_same(&fx, &k, &op.forward(&fx.qt(&k, "x")).unwrap(), "batch_norm");
        cases += 1;
    }
    assert_eq!(cases, 17);
    println!("batch_norm: {cases} cases, {values} values identical");
}

proptest! {
    #![proptest_config(prop_config())]

    /// Against dequantize -> (x - mean) / sqrt(var + eps) * w + b in f64 -> quantize.
    #[test]
    fn batch_norm_is_within_one_step_of_the_real_normalization(
        c in 1usize..50, seed in any::<u64>(), s in 0.005f32..0.1, z in 0i32..256,
        so in 0.005f32..0.1, zo in 0i32..256, relu in any::<bool>(),
    ) {
        let x = qtensor(vec![2, c, 2, 3], seed, s, z);
        let f = |i: usize, a: f32, b: f32| a + b * ((i as f32 * 0.7 + seed as f32 * 1e-19).sin());
        let w: ndarray::Array1<f32> = (0..c).map(|i| f(i, 1.0, 0.5)).collect();
        let b: ndarray::Array1<f32> = (0..c).map(|i| f(i + 3, 0.0, 0.3)).collect();
        let mean: ndarray::Array1<f32> = (0..c).map(|i| f(i + 5, 0.0, 0.4)).collect();
        let var: ndarray::Array1<f32> = (0..c).map(|i| f(i + 7, 1.0, 0.8)).collect();
        let mut op = QBatchNorm2d::new(Some(w.view()), Some(b.view()), mean.view(), var.view(), 1e-5, so, zo).unwrap();
        if relu { op = op.with_relu(); }
        let y = op.forward(&x).unwrap();
        let dx = x.dequantize();
        for (idx, &q) in y.data().indexed_iter() {
            let ch = idx[1];
            let v = (dx[&idx] as f64 - mean[ch] as f64) / (var[ch] as f64 + 1e-5).sqrt() * w[ch] as f64 + b[ch] as f64;
            let mut r = ((v / so as f64).round() + zo as f64).clamp(0.0, 255.0);
            if relu { r = r.max(zo as f64); }
            prop_assert!((q as f64 - r).abs() <= 1.0, "{} vs {}", q, r);
        }
    }
}

#[test]
fn batch_norm_rejects_bad_parameters() {
    let ones = ndarray::Array1::from(vec![1.0f32; 4]);
    let three = ndarray::Array1::from(vec![1.0f32; 3]);
    let neg = ndarray::Array1::from(vec![1.0f32, -1.0, 1.0, 1.0]);
    let nan = ndarray::Array1::from(vec![1.0f32, f32::NAN, 1.0, 1.0]);
    let new = |w: &ndarray::Array1<f32>, var: &ndarray::Array1<f32>, eps: f64| {
        QBatchNorm2d::new(Some(w.view()), None, ones.view(), var.view(), eps, 0.1, 0)
    };
    assert!(matches!(
        new(&three, &ones, 1e-5),
        Err(QuantError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        new(&ones, &neg, 1e-5),
        Err(QuantError::UnsupportedConfig { .. })
    ));
    assert!(matches!(
        new(&nan, &ones, 1e-5),
        Err(QuantError::NonFinite { .. })
    ));
    assert!(new(&ones, &ones, f64::NAN).is_err());
    let zero = ndarray::Array1::from(vec![0.0f32; 4]);
    assert!(new(&ones, &zero, 0.0).is_err());
    let bn = new(&ones, &ones, 1e-5).unwrap();
    assert!(bn.forward(&qtensor(vec![1, 3, 2, 2], 1, 0.1, 0)).is_err());
    assert!(bn.forward(&qtensor(vec![4, 4], 1, 0.1, 0)).is_err());
}

#[test]
fn layer_norm_matches_pytorch_bit_for_bit() {
    let fx = Fx::load(BN);
    let (mut cases, mut values) = (0, 0);
    for (k, m) in fx.cases() {
        if m["op"] != "layer_norm" {
            continue;
        }
        let nshape: Vec<usize> = m["nshape"].split(',').map(|v| v.parse().unwrap()).collect();
        let (w, b) = if m["affine"] == "1" {
            (
                Some(ndarray::Array1::from(fx.f32s(&format!("{k}.weight")))),
                Some(ndarray::Array1::from(fx.f32s(&format!("{k}.bias")))),
            )
        } else {
            (None, None)
        };
        let y = fx.qt(&k, "y");
        let op = QLayerNorm::new(
            &nshape,
            w.as_ref().map(|a| a.view()),
            b.as_ref().map(|a| a.view()),
            m["eps"].parse().unwrap(),
            y.scale(),
            y.zero_point(),
        )
        .unwrap();
        values += assert_same(&fx, &k, &op.forward(&fx.qt(&k, "x")).unwrap(), "layer_norm");
        cases += 1;
    }
    assert_eq!(cases, 4);
    println!("layer_norm: {cases} cases, {values} values identical");
}

#[test]
fn layer_norm_rejects_bad_input() {
    assert!(QLayerNorm::new(&[], None, None, 1e-5, 0.1, 0).is_err());
    let w = ndarray::Array1::from(vec![1.0f32; 3]);
    assert!(matches!(
        QLayerNorm::new(&[4], Some(w.view()), None, 1e-5, 0.1, 0),
        Err(QuantError::ShapeMismatch { .. })
    ));
    assert!(QLayerNorm::new(&[4], None, None, -1.0, 0.1, 0).is_err());
    let ln = QLayerNorm::new(&[4], None, None, 1e-5, 0.1, 0).unwrap();
    assert!(ln.forward(&qtensor(vec![2, 5], 1, 0.1, 0)).is_err());
    // a constant row normalizes to zero (variance 0, eps keeps it finite)
    let y = ln
        .forward(&QTensor::new(ArrayD::from_elem(IxDyn(&[2, 4]), 9u8), 0.1, 3).unwrap())
        .unwrap();
    assert!(y.data().iter().all(|&q| q == 0));
}
