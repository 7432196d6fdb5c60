//! Int8 kernels beside this crate's f32 path (ndarray's matrixmultiply-backed `dot`).
//!
//! Throughput is in multiply-accumulates (`m * k * n`); weights are packed outside the timed
//! loop. `PTQ_BENCH_THREADS` (default 1) sets the rayon pool size.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::Array2;
use ptq::kernels::{qgemm, Activations, OutputQuant, PackedWeights, RequantParams};

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

fn benches(c: &mut Criterion) {
    linear(c, "linear_b64_1024x1024", 64, 1024, 1024);
    linear(c, "linear_b4_1024x1024", 4, 1024, 1024);
}

criterion_group!(int8, benches);
criterion_main!(int8);
