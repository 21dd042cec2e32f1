//! The public contract of DESIGN.md, written the way outside code uses it: only the names the
//! contract promises, at the crate root, with the argument order and types it states.

use attention_math::{Mask, entropy, log_softmax, logsumexp, scaled_attention, softmax};
use nalgebra::DMatrix;

/// `scaled_attention(q, k, v, &Mask) -> Result<DMatrix<T>, E>` with `E: std::error::Error`.
fn run<E: std::error::Error>(r: Result<DMatrix<f32>, E>) -> DMatrix<f32> {
    r.expect("valid input")
}

#[test]
fn scaled_attention_contract_f32_f64_and_views() -> Result<(), Box<dyn std::error::Error>> {
    let (n, m, d, dv) = (5, 7, 8, 3);
    let q = DMatrix::<f32>::from_fn(n, d, |i, j| ((i * d + j) as f32 * 0.37).sin());
    let k = DMatrix::<f32>::from_fn(m, d, |i, j| ((i * d + j) as f32 * 0.21).cos());
    let v = DMatrix::<f32>::from_fn(m, dv, |i, j| (i as f32) - 0.5 * (j as f32));
    let out: DMatrix<f32> = run(scaled_attention(&q, &k, &v, &Mask::causal()));
    assert_eq!(out.shape(), (n, dv)); // n x d_v

    // f64, and views (row and column slices of larger matrices) are accepted too.
    let q64 = q.map(f64::from);
    let k64 = k.map(f64::from);
    let v64 = v.map(f64::from);
    let out64: DMatrix<f64> = scaled_attention(&q64, &k64, &v64, &Mask::causal())?;
    let out_view = scaled_attention(q64.rows(0, 2), k64.columns(0, d), &v64, &Mask::causal())?;
    assert_eq!(out_view.shape(), (2, dv));

    // Independent check: query 0 sees key 0 only (top-left causal), so it copies v_0;
    // query 1 mixes v_0 and v_1 with weights from scale = 1/sqrt(d).
    for c in 0..dv {
        assert!((out64[(0, c)] - v64[(0, c)]).abs() < 1e-12);
        assert!((out_view[(0, c)] - v64[(0, c)]).abs() < 1e-12);
    }
    let s: Vec<f64> = (0..2)
        .map(|j| q64.row(1).dot(&k64.row(j)) / (d as f64).sqrt())
        .collect();
    let w1 = 1.0 / (1.0 + (s[0] - s[1]).exp());
    for c in 0..dv {
        let expected = (1.0 - w1) * v64[(0, c)] + w1 * v64[(1, c)];
        assert!((out64[(1, c)] - expected).abs() < 1e-12);
        assert!(((out[(1, c)] as f64) - expected).abs() < 1e-5);
    }
    Ok(())
}

#[test]
fn mask_contract() {
    let masks = [
        Mask::none(),
        Mask::causal(),
        Mask::prefix_lm(2),
        Mask::sliding_window(1),
    ];
    let [none, causal, prefix, window] = masks;
    assert!(none.allows(0, 5));
    assert!(causal.allows(2, 2) && !causal.allows(2, 3));
    assert!(prefix.allows(0, 1) && !prefix.allows(1, 2) && prefix.allows(3, 2));
    assert!(window.allows(4, 3) && !window.allows(4, 2));
    let both = causal.clone().and(window.clone());
    let either = prefix.clone().or(window.clone());
    assert!(both.allows(4, 4) && !both.allows(4, 1));
    assert!(either.allows(0, 1) && either.allows(6, 5) && !either.allows(3, 6));
}

#[test]
fn softmax_family_contract() {
    let x = [1.0_f32, 2.0, 3.0];
    let p: Vec<f32> = softmax(&x);
    let lp: Vec<f32> = log_softmax(&x);
    let lse: f32 = logsumexp(&x);
    let h: f32 = entropy(&p);
    let total: f64 = x.iter().map(|&v| (v as f64).exp()).sum();
    for i in 0..3 {
        let exact = (x[i] as f64).exp() / total;
        assert!((p[i] as f64 - exact).abs() < 1e-7);
        assert!((lp[i] as f64 - exact.ln()).abs() < 1e-6);
    }
    assert!((lse as f64 - total.ln()).abs() < 1e-6);
    let exact_h: f64 = -(0..3)
        .map(|i| {
            let pi = (x[i] as f64).exp() / total;
            pi * pi.ln()
        })
        .sum::<f64>();
    assert!((h as f64 - exact_h).abs() < 1e-6);
    // Same names for f64.
    let p64: Vec<f64> = softmax(&[0.0_f64, 0.0]);
    assert_eq!(p64, vec![0.5, 0.5]);
    assert_eq!(entropy(&p64), 2.0_f64.ln());
}
