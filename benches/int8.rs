//! Int8 kernels beside this crate's f32 layers (`nn::Conv2d`, `nn::Linear`), on real
//! network shapes.
//!
//! Throughput is in multiply-accumulates (`m * k * n`, or the convolution's MACs); weights
//! are packed outside the timed loop. The rayon pool size is `PTQ_BENCH_THREADS`, else
//! `RAYON_NUM_THREADS`, else 1; it is printed at the start. One core of a Zen 4 peaks at
//! about 234 GMAC/s on `vpdpbusd`: a one-thread figure above that is wrong.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{Array2, Array4, ArrayD, IxDyn};
use ptq::kernels::{qgemm, Activations, OutputQuant, PackedWeights, RequantParams};
use ptq::nn::quantized::{Conv2dParams, QAdd, QConv2d, QTensor};
use ptq::{DType, QParams, QScheme};

fn threads() -> usize {
    ["PTQ_BENCH_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .find_map(|v| std::env::var(v).ok().and_then(|v| v.parse().ok()))
        .unwrap_or(1)
}

fn pool() -> rayon::ThreadPool {
    let t = threads();
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
    let af = Array2::from_shape_fn((m, k), |(i, j)| a[i * k + j] as f32).into_dyn();
    let wf = Array2::from_shape_fn((n, k), |(j, i)| w[j * k + i] as f32 * 0.003);
    let lin = ptq::nn::Linear::new(wf, Some(ndarray::Array1::from(bias.clone()))).unwrap();
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
        pool.install(|| b.iter(|| lin.forward(&af).unwrap()))
    });
    g.finish();
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
    stride: usize,
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
        stride: (stride, stride),
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
    let ohw = (hw + 2 * pad - k) / stride + 1;
    let macs = b * ohw * ohw * cout * cig * k * k;
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(macs as u64));
    let id = format!("{b}x{cin}x{hw}x{hw}_k{k}_s{stride}_g{groups}_to{cout}");
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
    // The library's float layer on the same shape (NCHW, as PyTorch).
    let xf = ArrayD::from_shape_fn(IxDyn(&[b, cin, hw, hw]), |d| {
        x[((d[0] * cin + d[1]) * hw + d[2]) * hw + d[3]] as f32 * 0.02
    });
    let wf = Array4::from_shape_fn((cout, cig, k, k), |(o, i, y, z)| {
        wq[((o * cig + i) * k + y) * k + z] as f32 * 0.003
    });
    let fconv = ptq::nn::Conv2d::new(wf, Some(bias.clone()))
        .unwrap()
        .with_padding(pad, pad)
        .with_stride(stride, stride)
        .with_groups(groups);
    g.bench_function(BenchmarkId::new("f32", &id), |bch| {
        pool.install(|| bch.iter(|| fconv.forward(&xf).unwrap()))
    });
    g.finish();
}

/// The int8 residual add (and add+ReLU) on a channels-last activation.
fn add(c: &mut Criterion, name: &str, shape: [usize; 4]) {
    let pool = pool();
    let n: usize = shape.iter().product();
    let mut s = 5u64;
    let mk = |s: &mut u64, scale: f32, zp: i32| {
        let v: Vec<u8> = (0..n).map(|_| (lcg(s) % 256) as u8).collect();
        QTensor::new(ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap(), scale, zp).unwrap()
    };
    let a = mk(&mut s, 0.02, 120);
    let bb = mk(&mut s, 0.03, 130);
    let add = QAdd::new(0.04, 128).unwrap();
    let add_relu = QAdd::new(0.04, 128).unwrap().with_relu();
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(n as u64));
    let id = format!("{shape:?}");
    g.bench_function(BenchmarkId::new("add", &id), |bch| {
        pool.install(|| bch.iter(|| add.forward(&a, &bb).unwrap()))
    });
    g.bench_function(BenchmarkId::new("add_relu", &id), |bch| {
        pool.install(|| bch.iter(|| add_relu.forward(&a, &bb).unwrap()))
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    eprintln!(
        "int8 bench: {} rayon thread(s), kernels {:?}",
        threads(),
        ptq::kernels::backend()
    );
    linear(c, "linear_b1_1024x1024", 1, 1024, 1024);
    linear(c, "linear_b4_1024x1024", 4, 1024, 1024);
    linear(c, "linear_b64_1024x1024", 64, 1024, 1024);
    conv(c, "conv3x3_b1_64to64_28x28", 1, 64, 64, 28, 3, 1, 1);
    conv(c, "conv3x3_b8_64to64_28x28", 8, 64, 64, 28, 3, 1, 1);
    conv(c, "conv1x1_b8_128to128_28x28", 8, 128, 128, 28, 1, 1, 1);
    conv(c, "depthwise3x3_b8_128_28x28", 8, 128, 128, 28, 3, 1, 128);
    conv(
        c,
        "depthwise3x3_m2_b8_64to128_28x28",
        8,
        64,
        128,
        28,
        3,
        1,
        64,
    );
    conv(c, "stem3x3s2_b1_3to32_112x112", 1, 3, 32, 112, 3, 2, 1);
    add(c, "add_1x64x56x56", [1, 64, 56, 56]);
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2))
}

criterion_group! {
    name = int8;
    config = config();
    targets = benches
}
criterion_main!(int8);
