//! Int8 kernels beside this crate's f32 path (ndarray's matrixmultiply-backed `dot`).
//!
//! Throughput is in multiply-accumulates (`m * k * n`); weights are packed outside the timed
//! loop. `PTQ_BENCH_THREADS` (default 1) sets the rayon pool size.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{Array2, Array4, ArrayD, IxDyn};
use ptq::kernels::{qgemm, Activations, OutputQuant, PackedWeights, RequantParams};
use ptq::nn::quantized::{Conv2dParams, QConv2d, QTensor};
use ptq::{DType, QParams, QScheme};

fn pool() -> rayon::ThreadPool {
    let t = std::env::var("PTQ_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(t)
        .build()
        .unwrap()
}

fn lcg(seed: &mut u64) -> u32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 33) as u32
}

fn linear(c: &mut Criterion, name: &str, m: usize, k: usize, n: usize) {
    let pool = pool();
    let mut s = 1u64;
    let a: Vec<u8> = (0..m * k).map(|_| (lcg(&mut s) % 128) as u8).collect();
    let w: Vec<i8> = (0..n * k)
        .map(|_| (lcg(&mut s) % 256) as u8 as i8)
        .collect();
    let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01).collect();
    let packed = PackedWeights::new(&w, n, k, &[0]).unwrap();
    let rq = RequantParams::new(
        n,
        0.02,
        &[0.003],
        false,
        Some(&bias),
        OutputQuant {
            scale: 0.05,
            zero_point: 128,
            relu: false,
        },
    )
    .unwrap();
    let mut out = vec![0u8; m * n];
    let af = Array2::from_shape_fn((m, k), |(i, j)| a[i * k + j] as f32);
    let wf = Array2::from_shape_fn((k, n), |(i, j)| w[j * k + i] as f32);
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements((m * k * n) as u64));
    g.bench_function(BenchmarkId::new("int8", format!("{m}x{k}x{n}")), |b| {
        pool.install(|| {
            b.iter(|| {
                qgemm(
                    Activations {
                        data: &a,
                        rows: m,
                        zero_point: 10,
                    },
                    &packed,
                    &rq,
                    &mut out,
                    n,
                )
                .unwrap()
            })
        })
    });
    g.bench_function(BenchmarkId::new("f32", format!("{m}x{k}x{n}")), |b| {
        pool.install(|| b.iter(|| af.dot(&wf)))
    });
    g.finish();
}

/// f32 im2col of an NCHW input (rows (b, oy, ox), columns (c, ky, kx)), stride 1.
fn im2col_f32(x: &Array4<f32>, k: usize, pad: usize) -> Array2<f32> {
    let (b, c, h, w) = x.dim();
    let (oh, ow) = (h + 2 * pad - k + 1, w + 2 * pad - k + 1);
    let mut a = Array2::<f32>::zeros((b * oh * ow, c * k * k));
    for bi in 0..b {
        for ci in 0..c {
            for ky in 0..k {
                for kx in 0..k {
                    let col = (ci * k + ky) * k + kx;
                    for oy in 0..oh {
                        let iy = oy as isize + ky as isize - pad as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for ox in 0..ow {
                            let ix = ox as isize + kx as isize - pad as isize;
                            if ix >= 0 && ix < w as isize {
                                a[[(bi * oh + oy) * ow + ox, col]] =
                                    x[[bi, ci, iy as usize, ix as usize]];
                            }
                        }
                    }
                }
            }
        }
    }
    a
}

/// Depthwise 3x3 (pad 1) in f32, NHWC, vectorizable over channels.
fn depthwise_f32(x: &[f32], w: &[f32], b: usize, h: usize, wd: usize, c: usize, out: &mut [f32]) {
    for bi in 0..b {
        for oy in 0..h {
            for ox in 0..wd {
                let o = &mut out[((bi * h + oy) * wd + ox) * c..][..c];
                o.fill(0.0);
                for ky in 0..3 {
                    let iy = oy as isize + ky as isize - 1;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..3 {
                        let ix = ox as isize + kx as isize - 1;
                        if ix < 0 || ix >= wd as isize {
                            continue;
                        }
                        let xp = &x[((bi * h + iy as usize) * wd + ix as usize) * c..][..c];
                        let wp = &w[(ky * 3 + kx) * c..][..c];
                        for ((o, &xv), &wv) in o.iter_mut().zip(xp).zip(wp) {
                            *o += xv * wv;
                        }
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn conv(
    c: &mut Criterion,
    name: &str,
    b: usize,
    cin: usize,
    cout: usize,
    hw: usize,
    k: usize,
    groups: usize,
) {
    let pool = pool();
    let pad = k / 2;
    let mut s = 3u64;
    let cig = cin / groups;
    let x: Vec<u8> = (0..b * cin * hw * hw)
        .map(|_| (lcg(&mut s) % 128) as u8)
        .collect();
    let wq: Vec<i8> = (0..cout * cig * k * k)
        .map(|_| (lcg(&mut s) % 256) as u8 as i8)
        .collect();
    let w4 = Array4::from_shape_vec((cout, cig, k, k), wq.clone()).unwrap();
    let qp = QParams::new(
        QScheme::PerChannelSymmetric { axis: 0 },
        DType::QInt8,
        (-128, 127),
        vec![0.003; cout],
        vec![0; cout],
    )
    .unwrap();
    let bias = ndarray::Array1::<f32>::from_elem(cout, 0.1);
    let params = Conv2dParams {
        padding: (pad, pad),
        groups,
        ..Default::default()
    };
    let layer =
        QConv2d::from_quantized(w4.view(), &qp, Some(bias.view()), params, 0.05, 128).unwrap();
    let xq = QTensor::new(
        ArrayD::from_shape_vec(IxDyn(&[b, cin, hw, hw]), x.clone()).unwrap(),
        0.02,
        10,
    )
    .unwrap();
    let macs = b * hw * hw * cout * cig * k * k;
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(macs as u64));
    let id = format!("{b}x{cin}x{hw}x{hw}_k{k}_g{groups}_to{cout}");
    g.bench_function(BenchmarkId::new("int8", &id), |bch| {
        pool.install(|| bch.iter(|| layer.forward(&xq).unwrap()))
    });
    // Channels-last in and out, as activations stay between layers in fbgemm.
    let xq_nhwc = QTensor::new(
        xq.data()
            .view()
            .permuted_axes(IxDyn(&[0, 2, 3, 1]))
            .as_standard_layout()
            .into_owned(),
        0.02,
        10,
    )
    .unwrap();
    g.bench_function(BenchmarkId::new("int8_nhwc", &id), |bch| {
        pool.install(|| bch.iter(|| layer.forward_nhwc(&xq_nhwc).unwrap()))
    });
    let xf = Array4::from_shape_fn((b, cin, hw, hw), |(i, j, y, z)| {
        x[((i * cin + j) * hw + y) * hw + z] as f32
    });
    if groups == 1 {
        let wf =
            Array2::from_shape_fn((cig * k * k, cout), |(r, o)| wq[o * cig * k * k + r] as f32);
        g.bench_function(BenchmarkId::new("f32", &id), |bch| {
            pool.install(|| bch.iter(|| im2col_f32(&xf, k, pad).dot(&wf)))
        });
    } else {
        assert!(groups == cin && cin == cout && k == 3);
        let xn: Vec<f32> = xf.permuted_axes([0, 2, 3, 1]).iter().copied().collect();
        let wf: Vec<f32> = (0..9 * cout)
            .map(|i| wq[(i % cout) * 9 + i / cout] as f32)
            .collect();
        let mut out = vec![0f32; b * hw * hw * cout];
        g.bench_function(BenchmarkId::new("f32", &id), |bch| {
            pool.install(|| bch.iter(|| depthwise_f32(&xn, &wf, b, hw, hw, cout, &mut out)))
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    linear(c, "linear_b64_1024x1024", 64, 1024, 1024);
    linear(c, "linear_b4_1024x1024", 4, 1024, 1024);
    linear(c, "gemm_6272x576x64", 6272, 576, 64);
    conv(c, "conv3x3_b8_64to64_28x28", 8, 64, 64, 28, 3, 1);
    conv(c, "conv1x1_b8_128to128_28x28", 8, 128, 128, 28, 1, 1);
    conv(c, "depthwise3x3_b8_128_28x28", 8, 128, 128, 28, 3, 128);
}

criterion_group!(int8, benches);
criterion_main!(int8);
