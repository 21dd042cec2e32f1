//! The multi-head backward pass against per-head reference backward passes: dQ per head,
//! dK and dV summed over each GQA group, d bias over all heads; every mask kind, softcap,
//! bias and ALiBi; a finite-difference check; the same bits for any thread count.

use attention_math::{
    AttentionOptions, Error, Heads, Mask, alibi_slopes, attention_backward_reference,
    multi_head_attention, multi_head_attention_backward, multi_head_attention_with,
};
use nalgebra::DMatrix;

fn data(rows: usize, cols: usize, seed: f64) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |i, j| {
        ((i * cols + j) as f64 * 0.53 + seed).sin()
    })
}

#[test]
fn grouped_gradients_are_sums_of_per_head_reference_gradients() {
    let (n, m, h, g, d, dv) = (11, 13, 6, 2, 3, 2);
    let heads = Heads::grouped(h, g);
    let (q, k, v) = (
        data(n, h * d, 0.1),
        data(m, g * d, 0.2),
        data(m, g * dv, 0.3),
    );
    let d_out = data(n, h * dv, 0.4);
    let bias = data(n, m, 0.5);
    let masks = [
        Mask::causal_bottom_right(),
        Mask::sliding_window(4),
        Mask::prefix_lm(3).bottom_right(),
        Mask::none(),
    ];
    for mask in &masks {
        for opts in [
            AttentionOptions::new(),
            AttentionOptions::new().softcap(1.5).bias(&bias).scale(0.8),
        ] {
            let fwd = multi_head_attention_with(&q, &k, &v, heads, mask, &opts).unwrap();
            assert_eq!(
                fwd.output,
                multi_head_attention(&q, &k, &v, heads, mask, &opts).unwrap()
            );
            let got = multi_head_attention_backward(&q, &k, &v, heads, mask, &opts, &fwd, &d_out)
                .unwrap();
            let (mut dk, mut dvm) = (DMatrix::zeros(m, g * d), DMatrix::zeros(m, g * dv));
            let mut db = DMatrix::zeros(n, m);
            for head in 0..h {
                let kv = heads.kv_head(head);
                let r = attention_backward_reference(
                    q.columns(head * d, d),
                    k.columns(kv * d, d),
                    v.columns(kv * dv, dv),
                    mask,
                    &opts,
                    d_out.columns(head * dv, dv),
                )
                .unwrap();
                assert!(
                    (got.dq.columns(head * d, d) - &r.dq).amax() < 1e-12,
                    "{mask} dq {head}"
                );
                let mut c = dk.columns_mut(kv * d, d);
                c += &r.dk;
                let mut c = dvm.columns_mut(kv * dv, dv);
                c += &r.dv;
                if let Some(b) = r.dbias {
                    db += b;
                }
            }
            assert!((&got.dk - &dk).amax() < 1e-12, "{mask} dk");
            assert!((&got.dv - &dvm).amax() < 1e-12, "{mask} dv");
            match got.dbias {
                Some(b) => assert!((b - db).amax() < 1e-12),
                None => assert!(db.amax() == 0.0),
            }
        }
    }
}

/// ALiBi's per-head slopes: a central difference of L = Σ O ⊙ dO in one entry of K.
#[test]
fn alibi_gradients_match_finite_differences() {
    let (n, m, h, g, d) = (5, 7, 4, 2, 3);
    let heads = Heads::grouped(h, g);
    let (q, k, v) = (
        data(n, h * d, 0.7),
        data(m, g * d, 0.8),
        data(m, g * d, 0.9),
    );
    let d_out = data(n, h * d, 1.0);
    let opts = AttentionOptions::new().alibi();
    let mask = Mask::causal_bottom_right();
    let loss = |k: &DMatrix<f64>| {
        multi_head_attention(&q, k, &v, heads, &mask, &opts)
            .unwrap()
            .component_mul(&d_out)
            .sum()
    };
    let fwd = multi_head_attention_with(&q, &k, &v, heads, &mask, &opts).unwrap();
    let grads =
        multi_head_attention_backward(&q, &k, &v, heads, &mask, &opts, &fwd, &d_out).unwrap();
    let eps = 1e-6;
    for (i, j) in [(3, 1), (6, 5), (0, 2)] {
        let (mut kp, mut km) = (k.clone(), k.clone());
        kp[(i, j)] += eps;
        km[(i, j)] -= eps;
        let fd = (loss(&kp) - loss(&km)) / (2.0 * eps);
        assert!(
            (grads.dk[(i, j)] - fd).abs() < 1e-8,
            "dk[{i}, {j}]: {} vs {fd}",
            grads.dk[(i, j)]
        );
    }
    assert_eq!(alibi_slopes(4), [0.25, 0.0625, 0.015625, 0.00390625]);
}

#[test]
fn every_thread_count_gives_the_same_bits() {
    let (n, m, h, g, d) = (40, 300, 4, 1, 8);
    let heads = Heads::grouped(h, g);
    let (q, k, v) = (
        data(n, h * d, 0.2),
        data(m, g * d, 0.3),
        data(m, g * d, 0.4),
    );
    let d_out = data(n, h * d, 0.6);
    let mask = Mask::causal_bottom_right();
    let run = |t: usize| {
        let opts = AttentionOptions::new().threads(t);
        let fwd = multi_head_attention_with(&q, &k, &v, heads, &mask, &opts).unwrap();
        multi_head_attention_backward(&q, &k, &v, heads, &mask, &opts, &fwd, &d_out).unwrap()
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

#[test]
fn bad_forward_results_are_errors() {
    let heads = Heads::multi_head(2);
    let x = data(3, 4, 0.0);
    let opts = AttentionOptions::new();
    let mut fwd = multi_head_attention_with(&x, &x, &x, heads, &Mask::none(), &opts).unwrap();
    fwd.lse[(1, 1)] = f64::NAN;
    let e = multi_head_attention_backward(&x, &x, &x, heads, &Mask::none(), &opts, &fwd, &x);
    assert_eq!(
        e.unwrap_err(),
        Error::NonFinite {
            arg: "forward.lse",
            row: 1,
            col: 1
        }
    );
    let fwd = multi_head_attention_with(&x, &x, &x, heads, &Mask::none(), &opts).unwrap();
    let short = data(3, 2, 0.0);
    let e = multi_head_attention_backward(&x, &x, &x, heads, &Mask::none(), &opts, &fwd, &short);
    assert!(matches!(e, Err(Error::ShapeMismatch { arg: "d_out", .. })));
}
