//! Property and value tests of the core contract: softmax family, entropy, masks and the
//! reference attention, each checked against closed forms or an independent implementation.

mod common;

use approx::assert_relative_eq;
use attention_math::{
    AttentionOptions, Error, Mask, entropy, entropy_from_logits, log_softmax, logsumexp,
    scaled_attention, scaled_attention_reference, scaled_attention_with, softmax, softmax_rows,
};
use common::*;
use nalgebra::DMatrix;
use proptest::prelude::*;

/// Softmax-family properties, instantiated once per scalar type.
macro_rules! softmax_properties {
    ($modname:ident, $t:ty, $tol:expr) => {
        mod $modname {
            use super::*;

            proptest! {
                #[test]
                fn rows_sum_to_one_and_are_shift_invariant(
                    x in proptest::collection::vec(-50.0..50.0f64, 1..40),
                    shift in -1e3..1e3f64,
                ) {
                    let x: Vec<$t> = x.iter().map(|&v| v as $t).collect();
                    let p = softmax(&x);
                    let total: f64 = p.iter().map(|&v| v as f64).sum();
                    prop_assert!((total - 1.0).abs() < $tol * x.len() as f64);
                    prop_assert!(p.iter().all(|&v| (0.0..=1.0).contains(&v)));
                    let shifted: Vec<$t> = x.iter().map(|&v| v + shift as $t).collect();
                    let ps = softmax(&shifted);
                    // The shift itself is rounded in f32; compare at the resolution of |shift|.
                    let slack = $tol * (1.0 + shift.abs()) * 50.0;
                    for (a, b) in p.iter().zip(&ps) {
                        prop_assert!(((*a - *b) as f64).abs() < slack);
                    }
                }

                #[test]
                fn log_softmax_is_log_of_softmax_and_lse_normalises(
                    x in proptest::collection::vec(-30.0..30.0f64, 1..40),
                ) {
                    let x: Vec<$t> = x.iter().map(|&v| v as $t).collect();
                    let p = softmax(&x);
                    let lp = log_softmax(&x);
                    let lse = logsumexp(&x);
                    for ((pi, lpi), xi) in p.iter().zip(&lp).zip(&x) {
                        // Both sides round x_i − lse at the magnitude of x_i and lse.
                        let slack = 4.0 * $tol * (1.0 + xi.abs() as f64 + lse.abs() as f64);
                        prop_assert!(((*xi - lse) - *lpi).abs() as f64 <= slack);
                        if *pi > (1e-6 as $t) {
                            prop_assert!(((lpi.exp() - *pi) / *pi).abs() as f64 <= $tol * 10.0);
                        }
                    }
                }

                #[test]
                fn entropy_is_between_zero_and_ln_m(
                    x in proptest::collection::vec(-20.0..20.0f64, 1..40),
                ) {
                    let x: Vec<$t> = x.iter().map(|&v| v as $t).collect();
                    let m = x.len() as f64;
                    let h = entropy(&softmax(&x)) as f64;
                    let hl = entropy_from_logits(&x) as f64;
                    prop_assert!(h >= -$tol && h <= m.ln() + $tol * m);
                    prop_assert!(hl >= 0.0 && hl <= m.ln() + $tol * m);
                    prop_assert!((h - hl).abs() <= $tol * 10.0 * m);
                }

                #[test]
                fn masked_entries_get_zero_weight(
                    x in proptest::collection::vec(-20.0..20.0f64, 2..20),
                    masked in proptest::collection::vec(any::<bool>(), 20),
                ) {
                    let x: Vec<$t> = x.iter().zip(&masked)
                        .map(|(&v, &mk)| if mk { <$t>::NEG_INFINITY } else { v as $t })
                        .collect();
                    let p = softmax(&x);
                    let all_masked = x.iter().all(|v| *v == <$t>::NEG_INFINITY);
                    for (pi, xi) in p.iter().zip(&x) {
                        prop_assert!(!pi.is_nan());
                        if *xi == <$t>::NEG_INFINITY { prop_assert_eq!(*pi, 0.0); }
                    }
                    let total: f64 = p.iter().map(|&v| v as f64).sum();
                    let normalised = if all_masked { total == 0.0 } else { (total - 1.0).abs() < $tol * 40.0 };
                    prop_assert!(normalised);
                }
            }
        }
    };
}

softmax_properties!(softmax_f64, f64, 1e-12);
softmax_properties!(softmax_f32, f32, 1e-6);

#[test]
fn softmax_of_log_x_is_x_over_sum() {
    for x in [
        vec![1.0, 2.0, 3.0, 4.0],
        vec![0.1, 0.1],
        vec![7.0],
        vec![1e-3, 5.0, 2.5],
    ] {
        let total: f64 = x.iter().sum();
        let logits: Vec<f64> = x.iter().map(|v: &f64| v.ln()).collect();
        let expected: Vec<f64> = x.iter().map(|xi| xi / total).collect();
        assert_relative_eq!(
            softmax(&logits).as_slice(),
            expected.as_slice(),
            max_relative = 4.0 * f64::EPSILON
        );
        let logits32: Vec<f32> = logits.iter().map(|&v| v as f32).collect();
        let expected32: Vec<f32> = expected.iter().map(|&e| e as f32).collect();
        assert_relative_eq!(
            softmax(&logits32).as_slice(),
            expected32.as_slice(),
            max_relative = 8.0 * f32::EPSILON
        );
    }
}

#[test]
fn huge_and_infinite_logits() {
    assert_eq!(softmax(&[1e30_f32, -1e30, 1e30]), vec![0.5, 0.0, 0.5]);
    assert_eq!(softmax(&[1e300_f64, 0.0]), vec![1.0, 0.0]);
    assert_eq!(logsumexp(&[1e30_f32, 1e30]), 1e30);
    assert_eq!(softmax(&[f64::NEG_INFINITY; 4]), vec![0.0; 4]);
    assert_eq!(logsumexp(&[f64::NEG_INFINITY; 4]), f64::NEG_INFINITY);
    let rows = softmax_rows(&DMatrix::from_row_slice(
        2,
        2,
        &[f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, 0.0],
    ));
    assert_eq!(rows, DMatrix::from_row_slice(2, 2, &[0.0, 0.0, 0.5, 0.5]));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn prefix_lm_zero_is_causal_and_full_prefix_is_none(n in 0..20usize, extra in 0..5usize) {
        prop_assert_eq!(Mask::prefix_lm(0).to_dense(n, n).unwrap(), Mask::causal().to_dense(n, n).unwrap());
        prop_assert_eq!(Mask::prefix_lm(n + extra).to_dense(n, n).unwrap(), Mask::none().to_dense(n, n).unwrap());
    }

    #[test]
    fn prefix_rows_see_exactly_the_prefix(n in 1..20usize, p in 1..20usize) {
        let mask = Mask::prefix_lm(p);
        for i in 0..p.min(n) {
            for j in 0..n {
                prop_assert_eq!(mask.allows(i, j), j < p);
            }
        }
        for i in p..n {
            for j in 0..n {
                prop_assert_eq!(mask.allows(i, j), j <= i);
            }
        }
    }

    #[test]
    fn sliding_window_sees_w_plus_one_keys(n in 1..30usize, w in 0..8usize) {
        let dense = Mask::sliding_window(w).to_dense(n, n).unwrap();
        for i in 0..n {
            let count = dense.row(i).iter().filter(|b| **b).count();
            prop_assert_eq!(count, (i + 1).min(w + 1));
        }
    }

    #[test]
    fn combinators_are_boolean_algebra(a in any_mask(), b in any_mask(), n in 0..10usize, m in 0..10usize) {
        let (da, db) = (a.to_dense(n, m).unwrap(), b.to_dense(n, m).unwrap());
        let and = a.clone().and(b.clone()).to_dense(n, m).unwrap();
        let or = a.clone().or(b.clone()).to_dense(n, m).unwrap();
        let not = a.clone().not().to_dense(n, m).unwrap();
        for i in 0..n {
            for j in 0..m {
                prop_assert_eq!(and[(i, j)], da[(i, j)] && db[(i, j)]);
                prop_assert_eq!(or[(i, j)], da[(i, j)] || db[(i, j)]);
                prop_assert_eq!(not[(i, j)], !da[(i, j)]);
            }
        }
    }

    /// The reference agrees with an independent naive implementation for every mask.
    #[test]
    fn reference_matches_independent_naive((q, k, v) in qkv(9, 9), mask in any_mask()) {
        let scale = 1.0 / (q.ncols() as f64).sqrt();
        let ours = scaled_attention(&q, &k, &v, &mask).unwrap();
        let naive = naive_attention(&q, &k, &v, &mask, scale);
        assert_relative_eq!(ours, naive, epsilon = TOL_F64);
    }

    /// A mask and its additive bias give the same attention.
    #[test]
    fn mask_equals_its_bias((q, k, v) in qkv(9, 9), mask in any_mask()) {
        let (n, m) = (q.nrows(), k.nrows());
        let bias = mask.to_bias::<f64>(n, m).unwrap();
        let masked = scaled_attention_with(&q, &k, &v, &mask, &AttentionOptions::new()).unwrap();
        let biased = scaled_attention_with(&q, &k, &v, &Mask::none(), &AttentionOptions::new().bias(&bias)).unwrap();
        prop_assert!(max_abs_diff(&masked.output, &biased.output) < TOL_F64);
        for i in 0..n {
            let (a, b) = (masked.lse[i], biased.lse[i]);
            prop_assert!(a == b || (a - b).abs() < TOL_F64);
        }
    }

    /// Causal output row i depends on nothing after i: changing later K and V rows leaves it.
    #[test]
    fn causal_rows_ignore_the_future((q, k, v) in qkv_square(9), i in 0..9usize, noise in -3.0..3.0f64) {
        let n = q.nrows();
        let i = i % n;
        let before = scaled_attention(&q, &k, &v, &Mask::causal()).unwrap();
        let (mut k2, mut v2) = (k.clone(), v.clone());
        for j in i + 1..n {
            k2.row_mut(j).add_scalar_mut(noise);
            v2.row_mut(j).add_scalar_mut(-noise);
        }
        let after = scaled_attention(&q, &k2, &v2, &Mask::causal()).unwrap();
        for r in 0..=i {
            prop_assert_eq!(before.row(r), after.row(r));
        }
    }

    /// Prefix rows ignore nothing inside the prefix: changing any prefix value row moves them.
    #[test]
    fn prefix_rows_use_every_prefix_key((q, k, v) in qkv_square(9), p in 1..9usize, j in 0..9usize) {
        let n = q.nrows();
        let p = 1 + p % n;
        let j = j % p;
        let mask = Mask::prefix_lm(p);
        let before = scaled_attention(&q, &k, &v, &mask).unwrap();
        let mut v2 = v.clone();
        v2.row_mut(j).add_scalar_mut(1.0);
        let after = scaled_attention(&q, &k, &v2, &mask).unwrap();
        for r in 0..p {
            // Weight of key j is > e^-8 / p here, so output moves by at least that.
            let moved = (0..v.ncols()).map(|c| (after[(r, c)] - before[(r, c)]).abs()).fold(0.0, f64::max);
            prop_assert!(moved > 1e-6);
        }
        // ...and changing a value after the prefix leaves prefix rows alone.
        if p < n {
            let mut v3 = v.clone();
            v3.row_mut(n - 1).add_scalar_mut(1.0);
            let after = scaled_attention(&q, &k, &v3, &mask).unwrap();
            for r in 0..p {
                prop_assert_eq!(before.row(r), after.row(r));
            }
        }
    }

    /// f32 and f64 agree to TOL_F32 on entries of order 1.
    #[test]
    fn f32_agrees_with_f64((q, k, v) in qkv(9, 9), mask in any_mask()) {
        let o64 = scaled_attention(&q, &k, &v, &mask).unwrap();
        let o32 = scaled_attention(&to_f32(&q), &to_f32(&k), &to_f32(&v), &mask).unwrap();
        prop_assert!(max_abs_diff(&to_f64(&o32), &o64) < TOL_F32);
    }

    /// Softcap and bias: the reference follows the documented formula.
    #[test]
    fn softcap_and_bias_follow_the_formula((q, k, v) in qkv(7, 7), cap in 0.1..5.0f64, seed in 0..1000u64) {
        let (n, m) = (q.nrows(), k.nrows());
        let bias = DMatrix::from_fn(n, m, |i, j| ((i * 31 + j * 17) as f64 + seed as f64).sin());
        let opts = AttentionOptions::new().softcap(cap).bias(&bias).return_weights(true);
        let out = scaled_attention_reference(&q, &k, &v, &Mask::causal(), &opts).unwrap();
        let scale = 1.0 / (q.ncols() as f64).sqrt();
        for i in 0..n {
            let scores: Vec<f64> = (0..m).map(|j| {
                if j > i { return f64::NEG_INFINITY; }
                let s = scale * q.row(i).dot(&k.row(j));
                cap * (s / cap).tanh() + bias[(i, j)]
            }).collect();
            let p = softmax(&scores);
            let w = out.weights.as_ref().unwrap();
            for j in 0..m {
                prop_assert!((w[(i, j)] - p[j]).abs() < TOL_F64);
            }
            let lse = logsumexp(&scores);
            prop_assert!(lse == out.lse[i] || (lse - out.lse[i]).abs() < TOL_F64);
        }
    }
}

#[test]
fn fully_masked_rows_are_zero_never_nan() {
    let q = DMatrix::<f32>::from_fn(4, 3, |i, j| (i + j) as f32);
    let k = DMatrix::<f32>::from_fn(2, 3, |i, j| (i * j) as f32);
    let v = DMatrix::<f32>::from_element(2, 2, 5.0);
    // Bottom-right causal with n > m: the first n - m queries see nothing.
    let out = scaled_attention_with(
        &q,
        &k,
        &v,
        &Mask::causal_bottom_right(),
        &AttentionOptions::new(),
    )
    .unwrap();
    assert!(out.output.iter().all(|x| !x.is_nan()));
    assert_eq!(
        out.output.row(0).iter().copied().collect::<Vec<_>>(),
        vec![0.0, 0.0]
    );
    assert_eq!(
        out.output.row(1).iter().copied().collect::<Vec<_>>(),
        vec![0.0, 0.0]
    );
    assert_eq!(out.lse[0], f32::NEG_INFINITY);
    assert!(out.output.row(3).iter().all(|x| (x - 5.0).abs() < 1e-5));
}

#[test]
fn every_bad_input_is_an_err() {
    let q = DMatrix::<f64>::zeros(3, 8);
    let k = DMatrix::<f64>::zeros(4, 7);
    let v = DMatrix::<f64>::zeros(4, 2);
    let e = scaled_attention(&q, &k, &v, &Mask::none()).unwrap_err();
    assert_eq!(e.to_string(), "k has 7 columns but q has 8");
    let k = DMatrix::<f64>::zeros(4, 8);
    let mut q_inf = q.clone();
    q_inf[(2, 5)] = f64::INFINITY;
    assert_eq!(
        scaled_attention(&q_inf, &k, &v, &Mask::none()).unwrap_err(),
        Error::NonFinite {
            arg: "q",
            row: 2,
            col: 5
        }
    );
    let mut v_nan = v.clone();
    v_nan[(3, 1)] = f64::NAN;
    assert_eq!(
        scaled_attention(&q, &k, &v_nan, &Mask::none())
            .unwrap_err()
            .to_string(),
        "v has a non-finite entry at (3, 1)"
    );
    let bias = DMatrix::<f64>::zeros(4, 3);
    let e = scaled_attention_with(
        &q,
        &k,
        &v,
        &Mask::none(),
        &AttentionOptions::new().bias(&bias),
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "bias is 4 x 3 but must be 3 x 4");
    let e = scaled_attention_with(
        &q,
        &k,
        &v,
        &Mask::none(),
        &AttentionOptions::new().softcap(0.0),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "softcap = 0 is invalid: it must be finite and > 0"
    );
    // An error is a std::error::Error.
    let boxed: Box<dyn std::error::Error> = Box::new(e);
    assert!(!boxed.to_string().is_empty());
}
