//! The digits CNN end to end: float32 forward vs int8 forward (same run, same data), and
//! sequential vs 2-thread calibration. Forwards run on `PTQ_BENCH_THREADS` threads (default
//! 1, printed); `calibrate_parallel` starts its own 2 threads, as its name says.

mod common;

#[path = "../examples/common/digits.rs"]
mod digits;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ptq::qconfig::{QConfig, QConfigMap};
use ptq::workflow::{calibrate, calibrate_parallel, prepare, quantize_model};
use std::hint::black_box;

fn model(c: &mut Criterion) {
    common::pin_threads("model");
    let (train, test) = digits::load_data().unwrap();
    let float = digits::trained_fused().unwrap();
    let batches = digits::calibration_batches(&train, 8, 64);
    let int8 =
        quantize_model(float.clone(), &QConfigMap::new(QConfig::fbgemm()), &batches).unwrap();

    let mut g = c.benchmark_group("digits_forward_500");
    g.throughput(Throughput::Elements(test.labels.len() as u64));
    g.bench_function("f32", |b| {
        b.iter(|| float.forward(black_box(&test.images)).unwrap())
    });
    g.bench_function("int8", |b| {
        b.iter(|| int8.forward(black_box(&test.images)).unwrap())
    });
    g.finish();

    let calib = digits::calibration_batches(&train, 16, 64);
    let map = QConfigMap::new(QConfig::minmax_per_channel());
    let mut g = c.benchmark_group("digits_calibrate_1024");
    g.throughput(Throughput::Elements(1024));
    g.bench_function("sequential", |b| {
        b.iter(|| {
            let mut p = prepare(float.clone(), &map).unwrap();
            calibrate(&mut p, &calib, |_| {}).unwrap()
        })
    });
    g.bench_function("parallel_2_threads", |b| {
        b.iter(|| {
            let mut p = prepare(float.clone(), &map).unwrap();
            calibrate_parallel(&mut p, &calib, 2).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, model);
criterion_main!(benches);
