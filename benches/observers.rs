//! Observer and quantize throughput on 1M-element batches (elements per second).

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::{Array1, Array4};
use ptq::qconfig::ObserverSpec;
use ptq::{quantize, DType, QParams, QScheme};
use std::hint::black_box;

const N: usize = 1 << 20;

fn data() -> Array1<f32> {
    Array1::from_iter((0..N).map(|i| ((i as f32 * 0.618_034).fract() - 0.3) * 7.0))
}

fn observers(c: &mut Criterion) {
    common::pin_threads("observers");
    let x = data().into_dyn();
    let w = Array4::from_shape_fn((256, 64, 8, 8), |(o, i, h, k)| {
        ((o * 31 + i * 7 + h * 3 + k) as f32 * 0.37).sin() * (1.0 + o as f32)
    })
    .into_dyn();
    let mut g = c.benchmark_group("observe_1M");
    g.throughput(Throughput::Elements(N as u64));
    for (name, spec) in [
        (
            "minmax",
            ObserverSpec::min_max(DType::QUInt8, QScheme::PerTensorAffine),
        ),
        (
            "moving_average",
            ObserverSpec::moving_average(DType::QUInt8, QScheme::PerTensorAffine),
        ),
        (
            "per_channel_axis0",
            ObserverSpec::min_max(DType::QInt8, QScheme::PerChannelSymmetric { axis: 0 }),
        ),
    ] {
        let input = if name.starts_with("per_channel") {
            &w
        } else {
            &x
        };
        g.bench_function(name, |b| {
            let mut obs = spec.build().unwrap();
            b.iter(|| obs.observe(black_box(input.view())).unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("quantize_1M");
    g.throughput(Throughput::Elements(N as u64));
    let qp = QParams::per_tensor(0.03, 100, DType::QUInt8).unwrap();
    g.bench_function("per_tensor_quint8", |b| {
        b.iter(|| quantize(black_box(&x), &qp).unwrap())
    });
    g.finish();
}

criterion_group!(benches, observers);
criterion_main!(benches);
