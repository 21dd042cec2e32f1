//! Criterion benches of the two products inside attention, at attention shapes:
//!
//! - `qkt`: S = Q Kᵀ with Q, K n x d (the scores, n x n);
//! - `pv`:  O = P V with P n x n, V n x d (the output, n x d);
//!
//! for n in 256, 1024, 4096 and d in 64, 128, f32 and f64, each computed by
//!
//! - `naive`: the textbook triple loop (i, j, k order, one scalar dot product per entry,
//!   no blocking) on the column-major storage; n <= 1024 only (at n = 4096 one product
//!   takes 2.6-12 s);
//! - `nalgebra`: nalgebra's `*` (`&q * k.transpose()`, `&p * &v`), which calls
//!   matrixmultiply's packed gemm;
//! - `kernel`: the attention kernel's own tile products, [`kernel::matmul_abt`] and
//!   [`kernel::matmul_ab`] (operands packed once, then the register-blocked micro-kernel over
//!   BR x BC output tiles; single-threaded).
//!
//! Throughput is `Elements(2·n·n·d)`, the FLOPs of either product, so criterion's "elem/s"
//! reads as FLOP/s. Ids are `{f32|f64}/{qkt|pv}/{n}/d{d}/{impl}`, e.g.
//! `cargo bench --bench matmul -- 'f32/qkt/1024/d64'`.

use attention_math::{Float, kernel};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use nalgebra::DMatrix;
use std::hint::black_box;
use std::time::Duration;

mod common;
use common::normal;

const SIZES: [usize; 3] = [256, 1024, 4096];
const DIMS: [usize; 2] = [64, 128];
/// The naive loop runs only up to this n.
const NAIVE_MAX: usize = 1024;

/// `C = A Bᵀ` (A n x d, B m x d) by the textbook loop: `c_ij = Σ_k a_ik b_jk`.
fn naive_abt<T: Float>(a: &DMatrix<T>, b: &DMatrix<T>) -> DMatrix<T> {
    let (n, d) = a.shape();
    let m = b.nrows();
    let (a, bs) = (a.as_slice(), b.as_slice());
    let mut c = DMatrix::<T>::zeros(n, m);
    for i in 0..n {
        for j in 0..m {
            let mut sum = T::zero();
            for k in 0..d {
                sum += a[i + k * n] * bs[j + k * m];
            }
            c[(i, j)] = sum;
        }
    }
    c
}

/// `C = A B` (A n x k, B k x m) by the textbook loop: `c_ij = Σ_k a_ik b_kj`.
fn naive_ab<T: Float>(a: &DMatrix<T>, b: &DMatrix<T>) -> DMatrix<T> {
    let (n, kk) = a.shape();
    let m = b.ncols();
    let (a, bs) = (a.as_slice(), b.as_slice());
    let mut c = DMatrix::<T>::zeros(n, m);
    for i in 0..n {
        for j in 0..m {
            let mut sum = T::zero();
            for k in 0..kk {
                sum += a[i + k * n] * bs[k + j * kk];
            }
            c[(i, j)] = sum;
        }
    }
    c
}

fn configure(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    n: usize,
) {
    group.warm_up_time(Duration::from_millis(500));
    if n <= 256 {
        group.measurement_time(Duration::from_secs(1));
    } else {
        group.sample_size(10);
        group.sampling_mode(SamplingMode::Flat);
        group.measurement_time(Duration::from_secs(if n <= 1024 { 1 } else { 3 }));
    }
}

fn bench_type<T: Float>(c: &mut Criterion) {
    for n in SIZES {
        for d in DIMS {
            let flops = 2 * (n * n * d) as u64;
            let (q, k) = (normal::<T>(n, d, 1), normal::<T>(n, d, 2));
            let (p, v) = (normal::<T>(n, n, 4), normal::<T>(n, d, 3));

            let mut group = c.benchmark_group(format!("{}/qkt/{n}/d{d}", T::NAME));
            group.throughput(Throughput::Elements(flops));
            configure(&mut group, n);
            if n <= NAIVE_MAX {
                group.bench_function("naive", |b| b.iter(|| naive_abt(black_box(&q), &k)));
            }
            group.bench_function("nalgebra", |b| b.iter(|| black_box(&q) * k.transpose()));
            group.bench_function("kernel", |b| {
                b.iter(|| kernel::matmul_abt(black_box(&q), &k).unwrap())
            });
            group.finish();

            let mut group = c.benchmark_group(format!("{}/pv/{n}/d{d}", T::NAME));
            group.throughput(Throughput::Elements(flops));
            configure(&mut group, n);
            if n <= NAIVE_MAX {
                group.bench_function("naive", |b| b.iter(|| naive_ab(black_box(&p), &v)));
            }
            group.bench_function("nalgebra", |b| b.iter(|| black_box(&p) * &v));
            group.bench_function("kernel", |b| {
                b.iter(|| kernel::matmul_ab(black_box(&p), &v).unwrap())
            });
            group.finish();
        }
    }
}

fn benches(c: &mut Criterion) {
    bench_type::<f32>(c);
    bench_type::<f64>(c);
}

criterion_group!(matmul_benches, benches);
criterion_main!(matmul_benches);
