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

// ---------------------------------------------------------------------------------------
// Adversarial strategies (issue 12): values and parameters at the edges of their types.
// ---------------------------------------------------------------------------------------

/// One f32 value from the places where formulas break: subnormals, the smallest normal,
/// values near `f32::MAX` of both signs, exact small integers (ties), ordinary values, and
/// huge magnitudes that overflow when squared or exponentiated. Always finite.
pub fn edge_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => -4.0f32..4.0,
        1 => (1u32..0x007f_ffff).prop_map(f32::from_bits), // positive subnormals
        1 => (1u32..0x007f_ffff).prop_map(|b| -f32::from_bits(b)),
        1 => Just(f32::MIN_POSITIVE),
        1 => (0.5f32..1.0).prop_map(|s| s * f32::MAX),
        1 => (0.5f32..1.0).prop_map(|s| -s * f32::MAX),
        1 => (-3i32..=3).prop_map(|k| k as f32),
        1 => (20.0f32..38.0).prop_map(|e| 10f32.powf(e)),
        1 => (20.0f32..38.0).prop_map(|e| -(10f32.powf(e))),
    ]
}

/// A row of finite f32 logits (1 to `max_len` entries) of one of the hard kinds: arbitrary
/// edge values (huge dynamic range within the row), exact ties, one huge value among tiny
/// ones, and a constant near the maximum.
pub fn edge_row_f32(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![
        proptest::collection::vec(edge_f32(), 1..=max_len),
        (edge_f32(), 1..=max_len).prop_map(|(v, n)| vec![v; n]),
        (
            edge_f32(),
            proptest::collection::vec(-1e-30f32..1e-30, 1..max_len.max(2))
        )
            .prop_map(|(v, mut rest)| {
                rest.push(v);
                rest
            }),
        (0.9f32..1.0, 1..=max_len).prop_map(|(s, n)| vec![s * f32::MAX; n]),
    ]
}

/// A row of f32 logits in which every entry is `-inf` but one (at a random place), whose
/// value is an edge value: softmax must put all the mass there.
pub fn all_neg_inf_but_one(max_len: usize) -> impl Strategy<Value = (Vec<f32>, usize)> {
    (1..=max_len, edge_f32()).prop_flat_map(|(n, v)| {
        (0..n).prop_map(move |at| {
            let mut row = vec![f32::NEG_INFINITY; n];
            row[at] = v;
            (row, at)
        })
    })
}

/// A `usize` parameter at or near the top of its range, or small.
pub fn edge_usize() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(usize::MAX),
        Just(usize::MAX - 1),
        Just(usize::MAX / 2),
        Just(1usize << 63),
        Just((1usize << 63) - 1),
        Just(1usize << 32),
        0usize..16,
    ]
}

/// Named masks with parameters from [`edge_usize`], and combinations of them.
pub fn edge_mask() -> impl Strategy<Value = Mask> {
    let leaf = prop_oneof![
        Just(Mask::none()),
        Just(Mask::causal()),
        Just(Mask::causal_bottom_right()),
        edge_usize().prop_map(Mask::prefix_lm),
        edge_usize().prop_map(Mask::sliding_window),
        edge_usize().prop_map(Mask::key_padding),
    ];
    leaf.prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| a.and(b)),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| a.or(b)),
            inner.prop_map(|a| a.not()),
        ]
    })
}

/// The f64 softmax of f32 logits, as the oracle for the f32 path: exact inputs, 29 more bits.
pub fn softmax_oracle(x: &[f32]) -> Vec<f64> {
    let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return vec![0.0; x.len()];
    }
    let e: Vec<f64> = x.iter().map(|&v| (v - max).exp()).collect();
    let total: f64 = e.iter().sum();
    e.iter().map(|v| v / total).collect()
}
