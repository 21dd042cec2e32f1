//! Backward vs forward attention, f32, d = 64: the tiled backward pass against the forward
//! pass at the same shapes (n = 256, 1024, 2048), without a mask and causal, on 1 and 2
//! threads. Ids are `{forward|backward}/{mask}/t{threads}/{n}`.
//!
//! Run: `cargo bench --bench backward -- --warm-up-time 1 --measurement-time 3`

use attention_math::{AttentionOptions, Mask, attention_backward, scaled_attention_with};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use nalgebra::DMatrix;
use std::hint::black_box;

fn input(rows: usize, cols: usize, seed: f32) -> DMatrix<f32> {
    DMatrix::from_fn(rows, cols, |i, j| {
        ((i * cols + j) as f32 * 0.618 + seed).sin()
    })
}

fn bench(c: &mut Criterion) {
    let d = 64;
    let mut group = c.benchmark_group("attention_f32_d64");
    group.sample_size(10);
    for n in [256, 1024, 2048] {
        let (q, k, v, d_out) = (
            input(n, d, 0.1),
            input(n, d, 0.2),
            input(n, d, 0.3),
            input(n, d, 0.4),
        );
        for threads in [1, 2] {
            let opts = AttentionOptions::new().threads(threads);
            for (name, mask) in [("none", Mask::none()), ("causal", Mask::causal())] {
                group.bench_with_input(
                    BenchmarkId::new(format!("forward/{name}/t{threads}"), n),
                    &n,
                    |b, _| {
                        b.iter(|| {
                            scaled_attention_with(black_box(&q), &k, &v, &mask, &opts).unwrap()
                        })
                    },
                );
                let forward = scaled_attention_with(&q, &k, &v, &mask, &opts).unwrap();
                group.bench_with_input(
                    BenchmarkId::new(format!("backward/{name}/t{threads}"), n),
                    &n,
                    |b, _| {
                        b.iter(|| {
                            attention_backward(
                                black_box(&q),
                                &k,
                                &v,
                                &mask,
                                &opts,
                                &forward,
                                &d_out,
                            )
                            .unwrap()
                        })
                    },
                );
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
