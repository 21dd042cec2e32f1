//! Criterion benches of one attention forward (d = d_v = 64, self-attention n = m):
//!
//! - `reference`: [`scaled_attention_reference`], the materialised oracle;
//! - `nalgebra`: attention written by hand with nalgebra the obvious way (`&q * k.transpose()`,
//!   row softmax with the crate's `softmax_rows`, `* v`, mask as a precomputed additive
//!   bias), see `common::nalgebra_attention`;
//! - `nalgebra-t`: the same, layout-aware (`Sᵀ = K Qᵀ`, softmax of contiguous columns,
//!   `(Vᵀ Sᵀ)ᵀ`), see `common::nalgebra_attention_t`;
//! - `tiled-t1`, `tiled-t2`: [`scaled_attention_with`] (the tiled online-softmax kernel) on
//!   one and on two threads ([`AttentionOptions::threads`]).
//!
//! Masks: `none`, `causal`, `window256` (`Mask::sliding_window(256)`) and `prefix`
//! (`Mask::prefix_lm(n / 2)`); n in 256, 1024, 2048, 4096, plus 16384 for the tiled path
//! only; f32 and f64.
//!
//! Throughput is `Elements(4·n·m·d)`, the dense FLOP count of Q Kᵀ and P V, so criterion's
//! "elem/s" reads as FLOP/s. Masked pairs are counted too (dense-equivalent), for every
//! mask: a causal run at "200 Gelem/s" does 100 GFLOP/s of useful work. Ids are
//! `{f32|f64}/{mask}/{n}/{path}`, so e.g.
//! `cargo bench --bench attention -- 'f32/none/2048'` runs one shape.

use attention_math::{AttentionOptions, Float, scaled_attention_reference, scaled_attention_with};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;

mod common;
use common::{HEAD_DIM, attention_flops, masks, nalgebra_attention, nalgebra_attention_t, qkv};

/// Sequence lengths of all paths; the tiled path also runs [`TILED_ONLY`].
const SIZES: [usize; 4] = [256, 1024, 2048, 4096];
/// Too large for the materialised paths (the n x n scores alone would take 1 GiB in f32).
const TILED_ONLY: usize = 16384;

fn bench_type<T: Float>(c: &mut Criterion) {
    for n in SIZES.into_iter().chain([TILED_ONLY]) {
        let d = HEAD_DIM;
        let (q, k, v) = qkv::<T>(n, d);
        let materialised = n < TILED_ONLY;
        for (name, mask) in masks(n) {
            let mut group = c.benchmark_group(format!("{}/{name}/{n}", T::NAME));
            group.throughput(Throughput::Elements(attention_flops(n, n, d, d)));
            group.warm_up_time(Duration::from_millis(500));
            if n <= 256 {
                group.measurement_time(Duration::from_secs(1));
            } else {
                group.sample_size(10);
                group.sampling_mode(SamplingMode::Flat);
                let secs = if n <= 1024 {
                    1
                } else if n <= 4096 {
                    2
                } else {
                    4
                };
                group.measurement_time(Duration::from_secs(secs));
            }
            if materialised {
                let opts = AttentionOptions::new();
                group.bench_function("reference", |b| {
                    b.iter(|| scaled_attention_reference(&q, &k, &v, black_box(&mask), &opts))
                });
                let bias = (name != "none").then(|| {
                    mask.to_bias::<T>(n, n)
                        .expect("the bench sizes fit in memory")
                });
                group.bench_function("nalgebra", |b| {
                    b.iter(|| nalgebra_attention(&q, &k, &v, black_box(bias.as_ref())))
                });
                let bias_t = bias.map(|b| b.transpose());
                group.bench_function("nalgebra-t", |b| {
                    b.iter(|| nalgebra_attention_t(&q, &k, &v, black_box(bias_t.as_ref())))
                });
            }
            for threads in [1, 2] {
                let opts = AttentionOptions::new().threads(threads);
                group.bench_function(format!("tiled-t{threads}"), |b| {
                    b.iter(|| scaled_attention_with(&q, &k, &v, black_box(&mask), &opts))
                });
            }
            group.finish();
        }
    }
}

fn benches(c: &mut Criterion) {
    bench_type::<f32>(c);
    bench_type::<f64>(c);
}

criterion_group!(attention_benches, benches);
criterion_main!(attention_benches);
