//! Shared test helpers: tolerances (in one place), an independent naive attention, and
//! proptest strategies for matrices and masks.
#![allow(dead_code)]

use attention_math::Mask;
use nalgebra::DMatrix;
use proptest::prelude::*;

/// Agreement expected between two f64 computations of the same quantity (different order
/// of floating-point operations, O(n·d) terms).
pub const TOL_F64: f64 = 1e-10;
/// Agreement expected between an f32 computation and its f64 counterpart, relative to the
/// magnitude of the values (entries of order 1).
pub const TOL_F32: f64 = 1e-5;

/// An independent attention: f64, plain loops, its own softmax; no crate code but the mask.
pub fn naive_attention(
    q: &DMatrix<f64>,
    k: &DMatrix<f64>,
    v: &DMatrix<f64>,
    mask: &Mask,
    scale: f64,
) -> DMatrix<f64> {
    let (n, d) = q.shape();
    let (m, dv) = (k.nrows(), v.ncols());
    let mut out = DMatrix::zeros(n, dv);
    for i in 0..n {
        let scores: Vec<Option<f64>> = (0..m)
            .map(|j| {
                mask.allows_in(n, m, i, j)
                    .then(|| scale * (0..d).map(|t| q[(i, t)] * k[(j, t)]).sum::<f64>())
            })
            .collect();
        let max = scores
            .iter()
            .flatten()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            continue; // fully masked: zeros
        }
        let w: Vec<f64> = scores
            .iter()
            .map(|s| s.map_or(0.0, |s| (s - max).exp()))
            .collect();
        let total: f64 = w.iter().sum();
        for j in 0..m {
            for c in 0..dv {
                out[(i, c)] += w[j] / total * v[(j, c)];
            }
        }
    }
    out
}

/// Largest absolute difference between two matrices of the same shape.
pub fn max_abs_diff(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A rows x cols matrix with entries in [-2, 2].
pub fn matrix(rows: usize, cols: usize) -> impl Strategy<Value = DMatrix<f64>> {
    proptest::collection::vec(-2.0..2.0f64, rows * cols)
        .prop_map(move |data| DMatrix::from_vec(rows, cols, data))
}

/// (q, k, v) with n in 0..=max_n, m in 0..=max_m, d in 1..=8, d_v in 1..=5.
pub fn qkv(
    max_n: usize,
    max_m: usize,
) -> impl Strategy<Value = (DMatrix<f64>, DMatrix<f64>, DMatrix<f64>)> {
    (0..=max_n, 0..=max_m, 1..=8usize, 1..=5usize)
        .prop_flat_map(|(n, m, d, dv)| (matrix(n, d), matrix(m, d), matrix(m, dv)))
}

/// (q, k, v) for self-attention shapes: n = m in 1..=max_n.
pub fn qkv_square(
    max_n: usize,
) -> impl Strategy<Value = (DMatrix<f64>, DMatrix<f64>, DMatrix<f64>)> {
    (1..=max_n, 1..=8usize, 1..=5usize)
        .prop_flat_map(|(n, d, dv)| (matrix(n, d), matrix(n, d), matrix(n, dv)))
}

/// Every kind of mask, with random parameters, and some combinations.
pub fn any_mask() -> impl Strategy<Value = Mask> {
    let leaf = prop_oneof![
        Just(Mask::none()),
        Just(Mask::causal()),
        Just(Mask::causal_bottom_right()),
        (0..12usize).prop_map(Mask::prefix_lm),
        (0..6usize).prop_map(Mask::sliding_window),
        (0..12usize).prop_map(Mask::key_padding),
        proptest::collection::vec(0..3usize, 0..16).prop_map(|mut ids| {
            ids.sort();
            Mask::documents(ids)
        }),
        (2..5usize).prop_map(|r| Mask::from_fn(move |i, j| (i + 2 * j) % r != 0)),
    ];
    leaf.prop_recursive(2, 6, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| a.and(b)),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| a.or(b)),
            inner.prop_map(|a| a.not()),
        ]
    })
}

/// The f32 copy of an f64 matrix.
pub fn to_f32(x: &DMatrix<f64>) -> DMatrix<f32> {
    x.map(|v| v as f32)
}

/// The f64 copy of an f32 matrix.
pub fn to_f64(x: &DMatrix<f32>) -> DMatrix<f64> {
    x.map(|v| v as f64)
}
