//! Criterion benches of the softmax family on one row: `softmax`, `log_softmax`, `logsumexp`
//! for rows of 64, 256, 1024 and 8192 standard normal logits, f32 and f64.
//!
//! Throughput is in elements (logits per second). Ids are `{f32|f64}/{len}/{function}`, so
//! `cargo bench --bench softmax -- 'f32/1024'` runs one row length.

use attention_math::{Float, log_softmax, logsumexp, softmax};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;

mod common;

const LENS: [usize; 4] = [64, 256, 1024, 8192];

fn bench_type<T: Float>(c: &mut Criterion) {
    for len in LENS {
        let row: Vec<T> = common::normal::<T>(len, 1, 7).as_slice().to_vec();
        let mut group = c.benchmark_group(format!("{}/{len}", T::NAME));
        group.throughput(Throughput::Elements(len as u64));
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(1));
        group.bench_function("softmax", |b| b.iter(|| softmax(black_box(&row))));
        group.bench_function("log_softmax", |b| b.iter(|| log_softmax(black_box(&row))));
        group.bench_function("logsumexp", |b| b.iter(|| logsumexp(black_box(&row))));
        group.finish();
    }
}

fn benches(c: &mut Criterion) {
    bench_type::<f32>(c);
    bench_type::<f64>(c);
}

criterion_group!(softmax_benches, benches);
criterion_main!(softmax_benches);
