//! Property tests of every graph op's float forward against naive references written
//! here (f64 where it matters), with random shapes, parameters and NaN inputs. Fixed seeds,
//! no persistence files.

use ndarray::{Array1, Array2, Array4, ArrayD, Dimension, IxDyn};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use ptq::graph::{
    BatchNorm, Dim, GraphBuilder, LayerNorm, NearestRule, Op, Pool2dSpec, UpsampleMode,
    UpsampleSpec,
};
use ptq::nn::{Conv2d, Linear};

fn cfg(cases: u32, seed: u64) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..ProptestConfig::default()
    }
}

/// Values in [-4, 4] with occasional NaN.
fn values(n: usize, nan: bool) -> impl Strategy<Value = Vec<f32>> {
    let v = if nan {
        prop_oneof![12 => -4.0f32..4.0, 1 => Just(f32::NAN)].boxed()
    } else {
        (-4.0f32..4.0).boxed()
    };
    prop::collection::vec(v, n)
}

fn tensor(shape: Vec<usize>, nan: bool) -> impl Strategy<Value = ArrayD<f32>> {
    let n = shape.iter().product();
    values(n, nan).prop_map(move |v| ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap())
}

fn shape(rank: std::ops::RangeInclusive<usize>, max: usize) -> impl Strategy<Value = Vec<usize>> {
    rank.prop_flat_map(move |r| prop::collection::vec(1..=max, r))
}

/// Runs one op on fixed-shape inputs through a graph.
fn run(op: Op, xs: &[&ArrayD<f32>]) -> Result<ArrayD<f32>, TestCaseError> {
    let mut g = GraphBuilder::new();
    let ids: Vec<_> = xs
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let d: Vec<Dim> = x.shape().iter().map(|&n| n.into()).collect();
            g.input(&format!("x{i}"), &d).unwrap()
        })
        .collect();
    let y = g
        .node("op", op, &ids)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let expect_shape = g.shape(y).unwrap().to_concrete(0);
    g.output(y).unwrap();
    let data: Vec<ArrayD<f32>> = xs.iter().map(|x| (*x).clone()).collect();
    let out = g
        .build()
        .unwrap()
        .forward(&data)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(out[0].shape(), expect_shape.as_slice(), "inferred shape");
    Ok(out.into_iter().next().unwrap())
}

/// `got` equals `want` (NaN where NaN) within `1e-5 * max(scale, 1)`, `scale` per element
/// (the magnitude of the terms that were summed) or `|want|`.
fn close(
    got: &ArrayD<f32>,
    want: &ArrayD<f64>,
    scale: Option<&ArrayD<f64>>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.shape(), want.shape());
    for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
        if (*a as f64) == *b {
            continue; // includes equal infinities (a max-pool window entirely in padding)
        }
        if b.is_nan() || a.is_nan() {
            prop_assert!(
                a.is_nan() && b.is_nan(),
                "element {}: got {} want {}",
                i,
                a,
                b
            );
            continue;
        }
        let s = scale
            .map_or(b.abs(), |s| s.as_slice_memory_order().unwrap()[i])
            .max(1.0);
        prop_assert!(
            ((*a as f64) - b).abs() <= 1e-5 * s,
            "element {}: got {} want {}",
            i,
            a,
            b
        );
    }
    Ok(())
}

fn to64(x: &ArrayD<f32>) -> ArrayD<f64> {
    x.mapv(|v| v as f64)
}

/// erf by Simpson integration of 2/sqrt(pi) exp(-t^2) (independent of the crate's erf).
fn erf_ref(x: f64) -> f64 {
    let n = 2000;
    let h = x / n as f64;
    let f = |t: f64| (-t * t).exp();
    let mut s = f(0.0) + f(x);
    for i in 1..n {
        s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
}

/// A naive scalar reference.
type RefFn = Box<dyn Fn(f64) -> f64>;

fn nan_or(v: f64, f: impl Fn(f64) -> f64) -> f64 {
    if v.is_nan() {
        v
    } else {
        f(v)
    }
}

proptest! {
    #![proptest_config(cfg(48, 0x5eed_0001))]

    #[test]
    fn elementwise_activations(x in shape(1..=4, 5).prop_flat_map(|s| tensor(s, true)), lo in -3.0f32..0.0, span in 0.0f32..5.0) {
        let x64 = to64(&x);
        let hi = lo + span;
        let relu6 = |v: f64| v.clamp(0.0, 6.0);
        let cases: Vec<(Op, RefFn)> = vec![
            (Op::ReLU, Box::new(|v: f64| v.max(0.0))),
            (Op::Clamp { min: lo, max: hi }, Box::new(move |v: f64| v.clamp(lo as f64, hi as f64))),
            (Op::Hardswish, Box::new(move |v: f64| v * relu6(v + 3.0) / 6.0)),
            (Op::Hardsigmoid, Box::new(move |v: f64| relu6(v + 3.0) / 6.0)),
            (Op::Sigmoid, Box::new(|v: f64| 1.0 / (1.0 + (-v).exp()))),
            (Op::SiLU, Box::new(|v: f64| v / (1.0 + (-v).exp()))),
            (Op::Gelu { tanh: false }, Box::new(|v: f64| 0.5 * v * (1.0 + erf_ref(v / 2f64.sqrt())))),
            (Op::Gelu { tanh: true }, Box::new(|v: f64| {
                0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
            })),
        ];
        for (op, f) in cases {
            let name = op.type_name();
            let got = run(op, &[&x])?;
            let want = x64.mapv(|v| nan_or(v, &f));
            close(&got, &want, None).map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
        }
    }

    #[test]
    fn broadcasting_add_and_mul(base in shape(1..=4, 4), mask_a in prop::collection::vec(any::<bool>(), 4), mask_b in prop::collection::vec(any::<bool>(), 4), drop_b in 0usize..3, seed in values(512, true)) {
        // Each operand: base with some dims set to 1; b may also drop leading dims.
        let r = base.len();
        let sa: Vec<usize> = base.iter().enumerate().map(|(i, &d)| if mask_a[i] { 1 } else { d }).collect();
        let sb: Vec<usize> = base.iter().enumerate().map(|(i, &d)| if mask_b[i] && !mask_a[i] { 1 } else { d }).collect();
        let sb = sb[drop_b.min(r - 1)..].to_vec();
        let mk = |s: &[usize], off: usize| {
            let n: usize = s.iter().product();
            ArrayD::from_shape_vec(IxDyn(s), (0..n).map(|i| seed[(i + off) % seed.len()]).collect()).unwrap()
        };
        let (a, b) = (mk(&sa, 0), mk(&sb, 101));
        let out_shape: Vec<usize> = (0..r).map(|i| {
            let db = (i + sb.len()).checked_sub(r).map_or(1, |j| sb[j]);
            sa[i].max(db)
        }).collect();
        let at = |x: &ArrayD<f32>, idx: &[usize]| {
            let off = r - x.ndim();
            let j: Vec<usize> = (0..x.ndim()).map(|k| if x.shape()[k] == 1 { 0 } else { idx[k + off] }).collect();
            x[IxDyn(&j)] as f64
        };
        let want_add = ArrayD::from_shape_fn(IxDyn(&out_shape), |i| at(&a, i.slice()) + at(&b, i.slice()));
        let want_mul = ArrayD::from_shape_fn(IxDyn(&out_shape), |i| at(&a, i.slice()) * at(&b, i.slice()));
        close(&run(Op::Add, &[&a, &b])?, &want_add, None)?;
        close(&run(Op::Mul, &[&a, &b])?, &want_mul, None)?;
        let relu = want_add.mapv(|v| nan_or(v, |v| v.max(0.0)));
        close(&run(Op::AddReLU, &[&a, &b])?, &relu, None)?;
    }

    #[test]
    fn concat_slice_and_shape_ops(base in shape(2..=4, 4), axis_pick in 0usize..4, sizes in prop::collection::vec(1usize..4, 1..4), seed in values(1024, true), perm_seed in any::<u64>()) {
        let r = base.len();
        let axis = axis_pick % r;
        let parts: Vec<ArrayD<f32>> = sizes.iter().enumerate().map(|(p, &k)| {
            let mut s = base.clone();
            s[axis] = k;
            let n: usize = s.iter().product();
            ArrayD::from_shape_vec(IxDyn(&s), (0..n).map(|i| seed[(i * 7 + p * 31) % seed.len()]).collect()).unwrap()
        }).collect();
        let refs: Vec<&ArrayD<f32>> = parts.iter().collect();
        let got = run(Op::Concat { axis }, &refs)?;
        let total: usize = sizes.iter().sum();
        let mut out_shape = base.clone();
        out_shape[axis] = total;
        let want = ArrayD::from_shape_fn(IxDyn(&out_shape), |i| {
            let mut k = i[axis];
            let mut p = 0;
            while k >= sizes[p] { k -= sizes[p]; p += 1; }
            let mut j = i.slice().to_vec();
            j[axis] = k;
            parts[p][IxDyn(&j)] as f64
        });
        close(&got, &want, None)?;
        // Slice back every part.
        let mut start = 0;
        for (p, &k) in sizes.iter().enumerate() {
            let s = run(Op::Slice { axis, start, end: start + k }, &[&got])?;
            close(&s, &to64(&parts[p]), None)?;
            start += k;
        }
        // Permute: output axis i is input axis dims[i].
        let mut dims: Vec<usize> = (0..out_shape.len()).collect();
        let mut st = perm_seed;
        for i in (1..dims.len()).rev() { st = st.wrapping_mul(6364136223846793005).wrapping_add(1); dims.swap(i, (st >> 33) as usize % (i + 1)); }
        let p = run(Op::Permute { dims: dims.clone() }, &[&got])?;
        let pshape: Vec<usize> = dims.iter().map(|&d| out_shape[d]).collect();
        let want = ArrayD::from_shape_fn(IxDyn(&pshape), |i| {
            let mut j = vec![0; dims.len()];
            for (k, &d) in dims.iter().enumerate() { j[d] = i[k]; }
            got[IxDyn(&j)] as f64
        });
        close(&p, &want, None)?;
        // Flatten / reshape keep the row-major order.
        let flat: Vec<f64> = got.iter().map(|&v| v as f64).collect();
        let f = run(Op::Flatten { start_dim: 0, end_dim: -1 }, &[&got])?;
        close(&f, &ArrayD::from_shape_vec(IxDyn(&[flat.len()]), flat.clone()).unwrap(), None)?;
        let rs = run(Op::Reshape { shape: vec![0, -1] }, &[&got])?;
        prop_assert_eq!(rs.shape(), &[out_shape[0], flat.len() / out_shape[0]]);
        close(&rs, &ArrayD::from_shape_vec(IxDyn(rs.shape()), flat).unwrap(), None)?;
    }
}

/// PyTorch's pooling output size, written from the formula.
fn out_size(n: usize, k: usize, s: usize, p: usize, d: usize, ceil: bool) -> usize {
    let num = (n + 2 * p) as f64 - (d * (k - 1)) as f64 - 1.0;
    let mut o = if ceil {
        (num / s as f64).ceil()
    } else {
        (num / s as f64).floor()
    } as usize
        + 1;
    if ceil && (o - 1) * s >= n + p {
        o -= 1;
    }
    o
}

#[derive(Debug, Clone)]
struct PoolCase {
    x: ArrayD<f32>,
    k: (usize, usize),
    s: (usize, usize),
    p: (usize, usize),
    d: (usize, usize),
    ceil: bool,
    cip: bool,
    div: Option<usize>,
}

fn pool_case() -> impl Strategy<Value = PoolCase> {
    (
        1usize..=4,
        1usize..=4,
        1usize..=3,
        1usize..=3,
        0usize..=2,
        0usize..=2,
        1usize..=2,
        1usize..=2,
        any::<bool>(),
        any::<bool>(),
        prop::option::of(1usize..6),
    )
        .prop_flat_map(|(kh, kw, sh, sw, ph, pw, dh, dw, ceil, cip, div)| {
            let (ph, pw) = (ph.min(kh / 2), pw.min(kw / 2));
            let min_h = (dh * (kh - 1) + 1).saturating_sub(2 * ph).max(1);
            let min_w = (dw * (kw - 1) + 1).saturating_sub(2 * pw).max(1);
            (min_h..min_h + 6, min_w..min_w + 6, 1usize..=2, 1usize..=2).prop_flat_map(
                move |(h, w, n, c)| {
                    tensor(vec![n, c, h, w], true).prop_map(move |x| PoolCase {
                        x,
                        k: (kh, kw),
                        s: (sh, sw),
                        p: (ph, pw),
                        d: (dh, dw),
                        ceil,
                        cip,
                        div,
                    })
                },
            )
        })
}

fn adaptive_ref(x: &Array4<f64>, oh: usize, ow: usize) -> Array4<f64> {
    let (n, c, h, w) = x.dim();
    Array4::from_shape_fn((n, c, oh, ow), |(b, ch, i, j)| {
        let y0 = ((i * h) as f64 / oh as f64).floor() as usize;
        let y1 = (((i + 1) * h) as f64 / oh as f64).ceil() as usize;
        let x0 = ((j * w) as f64 / ow as f64).floor() as usize;
        let x1 = (((j + 1) * w) as f64 / ow as f64).ceil() as usize;
        let mut s = 0.0;
        for yy in y0..y1 {
            for xx in x0..x1 {
                s += x[[b, ch, yy, xx]];
            }
        }
        s / ((y1 - y0) * (x1 - x0)) as f64
    })
}

proptest! {
    #![proptest_config(cfg(128, 0x5eed_0002))]

    #[test]
    fn max_and_avg_pool_follow_pytorch_rules(c in pool_case()) {
        let x4: Array4<f32> = c.x.clone().into_dimensionality().unwrap();
        let (n, ch, h, w) = x4.dim();
        let oh = out_size(h, c.k.0, c.s.0, c.p.0, c.d.0, c.ceil);
        let ow = out_size(w, c.k.1, c.s.1, c.p.1, c.d.1, c.ceil);
        // Max: explicit -inf padding; NaN anywhere in the window wins.
        let spec = Pool2dSpec::new(c.k.0, c.k.1).with_stride(c.s.0, c.s.1).with_padding(c.p.0, c.p.1).with_dilation(c.d.0, c.d.1).with_ceil_mode(c.ceil);
        let want = Array4::from_shape_fn((n, ch, oh, ow), |(b, cc, i, j)| {
            let mut m = f64::NEG_INFINITY;
            let mut nan = false;
            for ky in 0..c.k.0 { for kx in 0..c.k.1 {
                let yy = (i * c.s.0 + ky * c.d.0) as isize - c.p.0 as isize;
                let xx = (j * c.s.1 + kx * c.d.1) as isize - c.p.1 as isize;
                if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
                    let v = x4[[b, cc, yy as usize, xx as usize]] as f64;
                    nan |= v.is_nan();
                    m = m.max(v);
                }
            }}
            if nan { f64::NAN } else { m }
        }).into_dyn();
        close(&run(Op::MaxPool2d(spec), &[&c.x])?, &want, None)?;
        // Avg (no dilation): window clipped to the padded extent for the divisor.
        let spec = Pool2dSpec::new(c.k.0, c.k.1).with_stride(c.s.0, c.s.1).with_padding(c.p.0, c.p.1).with_ceil_mode(c.ceil).with_count_include_pad(c.cip).with_divisor_override(c.div);
        let oh = out_size(h, c.k.0, c.s.0, c.p.0, 1, c.ceil);
        let ow = out_size(w, c.k.1, c.s.1, c.p.1, 1, c.ceil);
        let mut scale = Array4::<f64>::zeros((n, ch, oh, ow));
        let want = Array4::from_shape_fn((n, ch, oh, ow), |(b, cc, i, j)| {
            let (mut sum, mut abs, mut in_padded, mut in_input) = (0.0, 0.0, 0usize, 0usize);
            for ky in 0..c.k.0 { for kx in 0..c.k.1 {
                let yy = (i * c.s.0 + ky) as isize - c.p.0 as isize;
                let xx = (j * c.s.1 + kx) as isize - c.p.1 as isize;
                let padded = yy < (h + c.p.0) as isize && xx < (w + c.p.1) as isize;
                in_padded += padded as usize;
                if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
                    let v = x4[[b, cc, yy as usize, xx as usize]] as f64;
                    sum += v;
                    abs += v.abs();
                    in_input += 1;
                }
            }}
            let div = c.div.unwrap_or(if c.cip { in_padded } else { in_input }) as f64;
            scale[[b, cc, i, j]] = abs / div;
            sum / div
        }).into_dyn();
        close(&run(Op::AvgPool2d(spec), &[&c.x])?, &want, Some(&scale.into_dyn()))?;
    }

    #[test]
    fn adaptive_pool_mean_and_upsample(x in (1usize..=2, 1usize..=3, 1usize..=7, 1usize..=7).prop_flat_map(|(n, c, h, w)| tensor(vec![n, c, h, w], false)), oh in 1usize..=8, ow in 1usize..=8, sf in 1usize..=3, align in any::<bool>()) {
        let x4: Array4<f64> = to64(&x).into_dimensionality().unwrap();
        let (n, c, h, w) = x4.dim();
        let got = run(Op::AdaptiveAvgPool2d((oh, ow)), &[&x])?;
        let scale = adaptive_ref(&x4.mapv(f64::abs), oh, ow).into_dyn();
        close(&got, &adaptive_ref(&x4, oh, ow).into_dyn(), Some(&scale))?;
        let m = run(Op::Mean { dims: vec![2, 3], keepdim: true }, &[&x])?;
        close(&m, &adaptive_ref(&x4, 1, 1).into_dyn(), Some(&adaptive_ref(&x4.mapv(f64::abs), 1, 1).into_dyn()))?;
        // Nearest to a size: src = min(floor(dst * (in / out)), in - 1) with a float scale.
        let near = |d: usize, i: usize, o: usize| (((d as f32) * (i as f32 / o as f32)).floor() as usize).min(i - 1);
        let got = run(Op::Upsample(UpsampleSpec::size(oh, ow, UpsampleMode::Nearest(NearestRule::Floor))), &[&x])?;
        let want = Array4::from_shape_fn((n, c, oh, ow), |(b, cc, i, j)| x4[[b, cc, near(i, h, oh), near(j, w, ow)]]).into_dyn();
        close(&got, &want, None)?;
        // Nearest by an integer factor: every output pixel copies src = dst / factor.
        let got = run(Op::Upsample(UpsampleSpec::scale(sf as f32, sf as f32, UpsampleMode::Nearest(NearestRule::Floor))), &[&x])?;
        let want = Array4::from_shape_fn((n, c, h * sf, w * sf), |(b, cc, i, j)| x4[[b, cc, i / sf, j / sf]]).into_dyn();
        close(&got, &want, None)?;
        // Bilinear to a size, both align_corners.
        let src = |d: usize, i: usize, o: usize| -> f64 {
            if align { if o > 1 { d as f64 * (i as f64 - 1.0) / (o as f64 - 1.0) } else { 0.0 } }
            else { ((d as f64 + 0.5) * i as f64 / o as f64 - 0.5).max(0.0) }
        };
        let want = Array4::from_shape_fn((n, c, oh, ow), |(b, cc, i, j)| {
            let (sy, sx) = (src(i, h, oh), src(j, w, ow));
            let (y0, x0) = ((sy.floor() as usize).min(h - 1), (sx.floor() as usize).min(w - 1));
            let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
            let (ly, lx) = (sy - y0 as f64, sx - x0 as f64);
            (1.0 - ly) * ((1.0 - lx) * x4[[b, cc, y0, x0]] + lx * x4[[b, cc, y0, x1]])
                + ly * ((1.0 - lx) * x4[[b, cc, y1, x0]] + lx * x4[[b, cc, y1, x1]])
        }).into_dyn();
        let got = run(Op::Upsample(UpsampleSpec::size(oh, ow, UpsampleMode::Bilinear { align_corners: align })), &[&x])?;
        close(&got, &want, None)?;
    }
}

#[derive(Debug, Clone)]
struct ConvCase {
    x: ArrayD<f32>,
    w: Array4<f32>,
    b: Option<Array1<f32>>,
    stride: (usize, usize),
    dil: (usize, usize),
    pad: (usize, usize, usize, usize),
    groups: usize,
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    (
        1usize..=3,
        1usize..=2,
        1usize..=3,
        1usize..=3,
        1usize..=3,
        1usize..=2,
        1usize..=2,
        1usize..=2,
        (0usize..=2, 0usize..=2, 0usize..=2, 0usize..=2),
        any::<bool>(),
    )
        .prop_flat_map(|(g, cg, og, kh, kw, sh, sw, dh, pad, bias)| {
            let (cin, cout) = (g * cg, g * og);
            let min_h = (dh * (kh - 1) + 1).saturating_sub(pad.0 + pad.2).max(1);
            let min_w = (kw).saturating_sub(pad.1 + pad.3).max(1);
            (min_h..min_h + 5, min_w..min_w + 5).prop_flat_map(move |(h, w)| {
                (
                    tensor(vec![2, cin, h, w], true),
                    values(cout * cg * kh * kw, false),
                    values(cout, false),
                )
                    .prop_map(move |(x, wv, bv)| ConvCase {
                        x,
                        w: Array4::from_shape_vec((cout, cg, kh, kw), wv).unwrap(),
                        b: bias.then(|| Array1::from(bv.clone())),
                        stride: (sh, sw),
                        dil: (dh, 1),
                        pad,
                        groups: g,
                    })
            })
        })
}

proptest! {
    #![proptest_config(cfg(96, 0x5eed_0003))]

    #[test]
    fn conv2d_with_asymmetric_padding_matches_direct_loops(c in conv_case()) {
        let conv = Conv2d::new(c.w.clone(), c.b.clone()).unwrap()
            .with_stride(c.stride.0, c.stride.1).with_dilation(c.dil.0, c.dil.1).with_groups(c.groups)
            .with_padding_tlbr(c.pad.0, c.pad.1, c.pad.2, c.pad.3);
        let got = run(Op::Conv2d(conv.clone()), &[&c.x])?;
        // ConvReLU2d is exactly the convolution followed by a NaN-propagating ReLU.
        let fused = run(Op::ConvReLU2d(conv), &[&c.x])?;
        for (a, b) in fused.iter().zip(got.iter()) {
            let r = if b.is_nan() || *b > 0.0 { *b } else { 0.0 };
            prop_assert!(a.to_bits() == r.to_bits() || (a.is_nan() && r.is_nan()), "ConvReLU2d {} vs relu({})", a, b);
        }
        let x4: Array4<f32> = c.x.clone().into_dimensionality().unwrap();
        let (n, _, h, w) = x4.dim();
        let (o, cg, kh, kw) = c.w.dim();
        let (pt, pl, pb, pr) = c.pad;
        let oh = (h + pt + pb - c.dil.0 * (kh - 1) - 1) / c.stride.0 + 1;
        let ow = (w + pl + pr - c.dil.1 * (kw - 1) - 1) / c.stride.1 + 1;
        let og = o / c.groups;
        let mut scale = Array4::<f64>::zeros((n, o, oh, ow));
        let want = Array4::from_shape_fn((n, o, oh, ow), |(b, oc, i, j)| {
            let gi = oc / og;
            let bias = c.b.as_ref().map_or(0.0, |bb| bb[oc] as f64);
            let (mut acc, mut abs) = (bias, bias.abs());
            for ci in 0..cg { for ky in 0..kh { for kx in 0..kw {
                let yy = (i * c.stride.0 + ky * c.dil.0) as isize - pt as isize;
                let xx = (j * c.stride.1 + kx * c.dil.1) as isize - pl as isize;
                if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
                    let t = x4[[b, gi * cg + ci, yy as usize, xx as usize]] as f64 * c.w[[oc, ci, ky, kx]] as f64;
                    acc += t;
                    abs += t.abs();
                }
            }}}
            scale[[b, oc, i, j]] = abs;
            acc
        }).into_dyn();
        close(&got, &want, Some(&scale.into_dyn()))?;
    }

    #[test]
    fn linear_norms_and_softmax(rows in 1usize..=4, inner in 1usize..=6, out in 1usize..=5, seed in values(256, true), eps in 1e-6f32..1e-2) {
        let x = ArrayD::from_shape_vec(IxDyn(&[rows, 2, inner]), (0..rows * 2 * inner).map(|i| seed[i % 256]).collect()).unwrap();
        let wv: Vec<f32> = (0..out * inner).map(|i| seed[(i * 13 + 5) % 256]).map(|v| if v.is_nan() { 0.5 } else { v / 4.0 }).collect();
        let w = Array2::from_shape_vec((out, inner), wv).unwrap();
        let b = Array1::from_shape_fn(out, |i| i as f32 * 0.1 - 0.2);
        let got = run(Op::Linear(Linear::new(w.clone(), Some(b.clone())).unwrap()), &[&x])?;
        let mut scale = ArrayD::<f64>::zeros(IxDyn(&[rows, 2, out]));
        let want = ArrayD::from_shape_fn(IxDyn(&[rows, 2, out]), |i| {
            let (mut acc, mut abs) = (b[i[2]] as f64, (b[i[2]] as f64).abs());
            for k in 0..inner { let t = x[[i[0], i[1], k]] as f64 * w[[i[2], k]] as f64; acc += t; abs += t.abs(); }
            scale[&i] = abs;
            acc
        });
        close(&got, &want, Some(&scale))?;
        // Softmax over the last axis (NaN spreads over its lane).
        let got = run(Op::Softmax { axis: 2 }, &[&x])?;
        let want = ArrayD::from_shape_fn(IxDyn(x.shape()), |i| {
            let lane: Vec<f64> = (0..inner).map(|k| x[[i[0], i[1], k]] as f64).collect();
            let m = lane.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = lane.iter().map(|v| (v - m).exp()).sum();
            if lane.iter().any(|v| v.is_nan()) { f64::NAN } else { (lane[i[2]] - m).exp() / s }
        });
        close(&got, &want, None)?;
        // LayerNorm over the last axis with weight and bias.
        let ln = LayerNorm { normalized_shape: vec![inner], weight: Some(ArrayD::from_shape_fn(IxDyn(&[inner]), |i| 0.5 + i[0] as f32 * 0.25)), bias: Some(ArrayD::from_shape_fn(IxDyn(&[inner]), |i| i[0] as f32 * -0.1)), eps };
        let got = run(Op::LayerNorm(ln.clone()), &[&x])?;
        let want = ArrayD::from_shape_fn(IxDyn(x.shape()), |i| {
            let lane: Vec<f64> = (0..inner).map(|k| x[[i[0], i[1], k]] as f64).collect();
            let mean = lane.iter().sum::<f64>() / inner as f64;
            let var = lane.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / inner as f64;
            let wv = ln.weight.as_ref().unwrap()[[i[2]]] as f64;
            let bv = ln.bias.as_ref().unwrap()[[i[2]]] as f64;
            (lane[i[2]] - mean) / (var + eps as f64).sqrt() * wv + bv
        });
        // Normalized values can reach sqrt(inner) / sqrt(eps)-sized quotients: compare
        // relative to the output scale of the lane.
        close(&got, &want, None)?;
        // BatchNorm1d on [N, C, L] (C = 2) and on [N, C].
        let bn = BatchNorm { weight: Array1::from(vec![0.7, 1.3]), bias: Array1::from(vec![0.1, -0.4]), running_mean: Array1::from(vec![0.2, -0.5]), running_var: Array1::from(vec![0.6, 1.9]), eps };
        let got = run(Op::BatchNorm1d(bn.clone()), &[&x])?;
        let want = ArrayD::from_shape_fn(IxDyn(x.shape()), |i| {
            let c = i[1];
            (x[&i] as f64 - bn.running_mean[c] as f64) / (bn.running_var[c] as f64 + eps as f64).sqrt() * bn.weight[c] as f64 + bn.bias[c] as f64
        });
        close(&got, &want, None)?;
    }
}
