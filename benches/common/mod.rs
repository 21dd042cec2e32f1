//! Shared by the criterion benches (and, through `#[path]`, by the peer crate in
//! `benches/peers`): reproducible inputs, the benchmarked masks, FLOP counts, and the
//! hand-written nalgebra attention the kernel is compared with.
#![allow(dead_code)]

use attention_math::{Float, Mask, softmax_in_place, softmax_rows};
use nalgebra::DMatrix;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use rand_distr::StandardNormal;

/// Head dimension of every attention bench (d = d_v = 64, as in most LLMs).
pub const HEAD_DIM: usize = 64;

/// A `rows x cols` matrix of standard normal entries, reproducible from `seed`.
pub fn normal<T: Float>(rows: usize, cols: usize, seed: u64) -> DMatrix<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    DMatrix::from_fn(rows, cols, |_, _| T::of_f64(rng.sample(StandardNormal)))
}

/// Q, K, V for self-attention over `n` tokens with head dimension `d` (seeds 1, 2, 3).
pub fn qkv<T: Float>(n: usize, d: usize) -> (DMatrix<T>, DMatrix<T>, DMatrix<T>) {
    (normal(n, d, 1), normal(n, d, 2), normal(n, d, 3))
}

/// The masks of the attention benches, by the name used in bench ids, for `n` tokens.
pub fn masks(n: usize) -> [(&'static str, Mask); 4] {
    [
        ("none", Mask::none()),
        ("causal", Mask::causal()),
        ("window256", Mask::sliding_window(256)),
        ("prefix", Mask::prefix_lm(n / 2)),
    ]
}

/// Dense-equivalent FLOPs of one attention forward: `2·n·m·d` for Q Kᵀ plus `2·n·m·d_v`
/// for P V, whatever the mask (a masked pair counts as if it were computed).
pub fn attention_flops(n: usize, m: usize, d: usize, dv: usize) -> u64 {
    2 * (n * m * (d + dv)) as u64
}

/// The number of (query, key) pairs `mask` allows for n queries and m keys: the useful
/// fraction of the dense work is `allowed_pairs / (n·m)`.
pub fn allowed_pairs(mask: &Mask, n: usize, m: usize) -> u64 {
    (0..n)
        .map(|i| (0..m).filter(|&j| mask.allows_in(n, m, i, j)).count() as u64)
        .sum()
}

/// Attention written the obvious way with nalgebra, as a user would without this crate's
/// kernel: `S = (Q Kᵀ)·scale + bias`, row softmax, `S V`. The full n x m score matrix is
/// built and every masked-out pair is computed. `bias` is the mask as an additive n x m
/// matrix (0 / -inf, from [`Mask::to_bias`]), built once outside the timed region as model
/// code does, or `None` for no mask. Uses `&q * k.transpose()` (which reaches
/// matrixmultiply's gemm) rather than `q.tr_mul`-style products (which do not).
pub fn nalgebra_attention<T: Float>(
    q: &DMatrix<T>,
    k: &DMatrix<T>,
    v: &DMatrix<T>,
    bias: Option<&DMatrix<T>>,
) -> DMatrix<T> {
    let scale = T::one() / T::of_usize(q.ncols()).sqrt();
    let mut s = q * k.transpose();
    s *= scale;
    if let Some(b) = bias {
        s += b;
    }
    softmax_rows(&s) * v
}

/// The same attention written layout-aware, as a careful nalgebra user would: nalgebra is
/// column-major, so it builds `Sᵀ = K Qᵀ` (m x n), where each query's scores are one
/// contiguous column, takes the softmax of each column in place, and returns
/// `(Vᵀ Sᵀ)ᵀ = S V`. Still materialised and still computing every masked-out pair, but it
/// avoids the strided row access of [`nalgebra_attention`] (about 5x faster softmax at
/// n = 2048). `bias_t` is the transposed mask bias, `mask.to_bias(n, m).transpose()`.
pub fn nalgebra_attention_t<T: Float>(
    q: &DMatrix<T>,
    k: &DMatrix<T>,
    v: &DMatrix<T>,
    bias_t: Option<&DMatrix<T>>,
) -> DMatrix<T> {
    let scale = T::one() / T::of_usize(q.ncols()).sqrt();
    let m = k.nrows();
    let mut st = k * q.transpose();
    st *= scale;
    if let Some(b) = bias_t {
        st += b;
    }
    if m > 0 {
        for column in st.as_mut_slice().chunks_exact_mut(m) {
            softmax_in_place(column);
        }
    }
    (v.transpose() * st).transpose()
}

/// Largest absolute difference between two matrices of the same shape, in f64.
pub fn max_abs_diff<T: Float>(a: &DMatrix<T>, b: &DMatrix<T>) -> f64 {
    assert_eq!(a.shape(), b.shape(), "max_abs_diff: shapes differ");
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x.as_f64() - y.as_f64()).abs())
        .fold(0.0, f64::max)
}
