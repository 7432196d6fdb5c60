//! HistogramObserver costs: observing 1M-element batches (elements/s), and computing the
//! parameters (PyTorch's L2 search) after calibration.
//!
//! Run with `cargo bench --bench histogram`.

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ndarray::{Array1, ArrayD};
use ptq::observer::{HistogramObserver, Observer};

const N: usize = 1 << 20;

/// Deterministic pseudo-normal data (sum of uniforms from an xorshift), scaled.
fn batch(seed: u64, scale: f32) -> ArrayD<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    Array1::from_iter((0..N).map(|_| (next() + next() + next() + next() - 2.0) * scale)).into_dyn()
}

fn observe(c: &mut Criterion) {
    common::pin_threads("histogram");
    let mut g = c.benchmark_group("histogram_observe");
    g.throughput(Throughput::Elements(N as u64));
    let a = batch(1, 1.0);
    let b = batch(2, 0.9); // inside a's range: histogram added
    let wider = batch(3, 1.5); // widens the range: re-binned
    let mut warm = HistogramObserver::default();
    warm.observe(a.view()).unwrap();
    g.bench_function("first_batch_1M", |bench| {
        bench.iter_batched_ref(
            HistogramObserver::default,
            |obs| obs.observe(black_box(a.view())).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("same_range_1M", |bench| {
        bench.iter_batched_ref(
            || warm.clone(),
            |obs| obs.observe(black_box(b.view())).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("wider_range_1M", |bench| {
        bench.iter_batched_ref(
            || warm.clone(),
            |obs| obs.observe(black_box(wider.view())).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn qparams(c: &mut Criterion) {
    let mut g = c.benchmark_group("histogram_qparams");
    let mut obs = HistogramObserver::default();
    for (i, s) in [1.0f32, 1.2, 0.8, 1.5].into_iter().enumerate() {
        obs.observe(batch(10 + i as u64, s).view()).unwrap();
    }
    g.bench_function("2048_bins_after_4x1M", |bench| {
        bench.iter(|| black_box(&obs).qparams().unwrap())
    });
    let mut relu = HistogramObserver::default();
    relu.observe(batch(20, 1.0).mapv(|v| v.max(0.0)).view())
        .unwrap();
    g.bench_function("2048_bins_relu_1M", |bench| {
        bench.iter(|| black_box(&relu).qparams().unwrap())
    });
    g.finish();
}

criterion_group!(benches, observe, qparams);
criterion_main!(benches);
