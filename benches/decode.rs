//! Decoding: one new token of 32 query heads over 8 KV heads (GQA, d = d_v = 128, f32)
//! against m cached keys, through `multi_head_attention` with `Mask::causal_bottom_right()`,
//! on 1 and 2 threads; beside it the time to copy K and V once (the memory-bandwidth bound of
//! a decode step: every cached key and value must be read at least once).
//!
//! `cache-t{threads}` is the same step through `KvCache::attention`, which does not rescan the
//! cached K and V (they were checked when appended).
//!
//! Ids: `decode/{m}/t{threads}`, `decode/{m}/cache-t{threads}` and `decode/{m}/copy-kv`; throughput is the bytes of K and V,
//! so criterion's "B/s" for the step reads as the effective bandwidth. Also
//! `queries/{n}/4096/t1`: n = 1 ... 96 queries of one head at m = 4096 (what one query costs
//! next to a full tile).
//!
//! Run: `cargo bench --bench decode`

use attention_math::{
    AttentionOptions, Heads, KvCache, Mask, multi_head_attention, scaled_attention_with,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nalgebra::DMatrix;
use std::hint::black_box;
use std::time::Duration;

mod common;

const HEADS: Heads = Heads { query: 32, kv: 8 };
const D: usize = 128;

fn bench(c: &mut Criterion) {
    for m in [1024, 4096, 8192, 32768] {
        let q = common::normal::<f32>(1, HEADS.query * D, 1);
        let k = common::normal::<f32>(m, HEADS.kv * D, 2);
        let v = common::normal::<f32>(m, HEADS.kv * D, 3);
        let bytes = 2 * m * HEADS.kv * D * size_of::<f32>();
        let mut group = c.benchmark_group(format!("decode/{m}"));
        group.throughput(Throughput::Bytes(bytes as u64));
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        let mask = Mask::causal_bottom_right();
        for threads in [1, 2] {
            let opts = AttentionOptions::new().threads(threads);
            group.bench_function(format!("t{threads}"), |b| {
                b.iter(|| multi_head_attention(black_box(&q), &k, &v, HEADS, &mask, &opts).unwrap())
            });
        }
        let mut cache = KvCache::<f32>::with_capacity(HEADS.kv, D, D, m).unwrap();
        cache.append(&k, &v).unwrap();
        for threads in [1, 2] {
            let opts = AttentionOptions::new().threads(threads);
            group.bench_function(format!("cache-t{threads}"), |b| {
                b.iter(|| {
                    cache
                        .attention(black_box(&q), HEADS.query, &Mask::causal(), &opts)
                        .unwrap()
                })
            });
        }
        let mut dst = (
            DMatrix::<f32>::zeros(m, HEADS.kv * D),
            DMatrix::<f32>::zeros(m, HEADS.kv * D),
        );
        group.bench_function("copy-kv", |b| {
            b.iter(|| {
                dst.0.copy_from(black_box(&k));
                dst.1.copy_from(black_box(&v));
            })
        });
        group.finish();
    }
    let m = 4096;
    let k = common::normal::<f32>(m, D, 2);
    let v = common::normal::<f32>(m, D, 3);
    let mut group = c.benchmark_group("queries");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(1));
    let opts = AttentionOptions::new().threads(1);
    for n in [1, 4, 8, 96] {
        let q = common::normal::<f32>(n, D, 1);
        group.bench_function(format!("{n}/{m}/t1"), |b| {
            b.iter(|| {
                scaled_attention_with(black_box(&q), &k, &v, &Mask::causal_bottom_right(), &opts)
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
