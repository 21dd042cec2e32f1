//! Decoding: one new token of 32 query heads over 8 KV heads (GQA, d = d_v = 128, f32)
//! against m cached keys, through `multi_head_attention` with `Mask::causal_bottom_right()`,
//! on 1 and 2 threads; beside it the time to copy K and V once (the memory-bandwidth bound of
//! a decode step: every cached key and value must be read at least once).
//!
//! `cache-t{threads}` is the same step through `KvCache::attention`, which does not rescan the
//! cached K and V (they were checked when appended). With `--features half`, also
//! `cache-f16-t{threads}` and `cache-bf16-t{threads}`: the step through half-precision caches
//! (the throughput stays the f32 cache's bytes, so their "B/s" is f32-equivalent).
//!
//! Ids: `decode/{m}/t{threads}`, `decode/{m}/cache-t{threads}` and `decode/{m}/copy-kv`; throughput is the bytes of K and V,
//! so criterion's "B/s" for the step reads as the effective bandwidth. Also
//! `queries/{n}/4096/t1`: n = 1 ... 96 queries of one head at m = 4096 (what one query costs
//! next to a full tile).
//!
//! `chunked/{n}x{m}` is chunked prefill: n new tokens of one GQA group (4 query heads over 1
//! KV head, d = 128) against a cache of m positions through `KvCache::attention` (causal,
//! aligned bottom-right), beside `square/{N}`: a causal prefill of N tokens with the same
//! number of (query, key) pairs, through `multi_head_attention`. Throughput is in FLOPs
//! (`2 · pairs · (d + d_v)` per head), so criterion's "elem/s" reads as FLOP/s.
//!
//! Run: `cargo bench --bench decode [--features half]` (a group alone: `cargo bench --bench
//! decode -- chunked`)

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
        #[cfg(feature = "half")]
        {
            half_cache::<half::f16>(&mut group, "f16", &q, &k, &v, m);
            half_cache::<half::bf16>(&mut group, "bf16", &q, &k, &v, m);
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

/// Allowed pairs of n queries, the last n of m positions, under the causal mask.
/// `decode/{m}/cache-{name}-t{threads}`: the same step through a half-precision cache (the
/// `half` feature), which reads half the bytes of the f32 cache's step.
#[cfg(feature = "half")]
fn half_cache<S: attention_math::CacheElement<f32>>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    q: &DMatrix<f32>,
    k: &DMatrix<f32>,
    v: &DMatrix<f32>,
    m: usize,
) {
    let mut cache = KvCache::<f32, S>::with_capacity(HEADS.kv, D, D, m).unwrap();
    cache.append(k, v).unwrap();
    for threads in [1, 2] {
        let opts = AttentionOptions::new().threads(threads);
        group.bench_function(format!("cache-{name}-t{threads}"), |b| {
            b.iter(|| {
                cache
                    .attention(black_box(q), HEADS.query, &Mask::causal(), &opts)
                    .unwrap()
            })
        });
    }
}

fn chunk_pairs(n: usize, m: usize) -> usize {
    (0..n).map(|i| m - n + i + 1).sum()
}

fn chunked(c: &mut Criterion) {
    const H: Heads = Heads { query: 4, kv: 1 };
    let mut group = c.benchmark_group("chunked");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(2));
    let opts = AttentionOptions::new().threads(1);
    let flops = |pairs: usize| (2 * pairs * 2 * D * H.query) as u64;
    for m in [1024, 8192] {
        let k = common::normal::<f32>(m, D, 2);
        let v = common::normal::<f32>(m, D, 3);
        for n in [64, 256, 512] {
            let mut cache = KvCache::<f32>::with_capacity(1, D, D, m).unwrap();
            cache.append(k.rows(0, m - n), v.rows(0, m - n)).unwrap();
            let q = common::normal::<f32>(n, H.query * D, 1);
            // The step appends the chunk's own keys, then attends; rolled back after.
            let (kn, vn) = (
                k.rows(m - n, n).clone_owned(),
                v.rows(m - n, n).clone_owned(),
            );
            group.throughput(Throughput::Elements(flops(chunk_pairs(n, m))));
            group.bench_function(format!("{n}x{m}/t1"), |b| {
                b.iter(|| {
                    cache.append(&kn, &vn).unwrap();
                    let o = cache.attention(black_box(&q), H.query, &Mask::causal(), &opts);
                    cache.truncate(m - n).unwrap();
                    o.unwrap()
                })
            });
            // The square causal prefill with as many pairs: N (N + 1) / 2 = pairs.
            let pairs = chunk_pairs(n, m);
            let side = (((8 * pairs + 1) as f64).sqrt() as usize - 1) / 2;
            let qs = common::normal::<f32>(side, H.query * D, 4);
            let (ks, vs) = (k.rows(0, side.min(m)), v.rows(0, side.min(m)));
            group.throughput(Throughput::Elements(flops(side * (side + 1) / 2)));
            group.bench_function(format!("square-{side}-for-{n}x{m}/t1"), |b| {
                b.iter(|| {
                    multi_head_attention(black_box(&qs), ks, vs, H, &Mask::causal(), &opts).unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench, chunked);
criterion_main!(benches);
