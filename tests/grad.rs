//! The backward pass against finite differences, the reference against the tiled version,
//! fully masked rows, and the gradient that explains the 1/√d scale.

use attention_math::{
    AttentionGrads, AttentionOptions, Error, Float, Heads, Mask, MultiHeadOutput,
    attention_backward, attention_backward_reference, entropy, entropy_from_logits_grad,
    log_softmax, log_softmax_vjp, multi_head_attention_backward, multi_head_attention_with,
    scaled_attention_with, softmax, softmax_jacobian, softmax_jvp, softmax_vjp,
};
use nalgebra::{DMatrix, DVector};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

fn randn(rng: &mut StdRng, rows: usize, cols: usize, sd: f64) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |_, _| sd * rng.sample::<f64, _>(StandardNormal))
}

/// The masks every test runs through, for n queries and m keys.
fn masks(n: usize, m: usize) -> Vec<Mask> {
    let ids: Vec<usize> = (0..n.max(m)).map(|i| i * 3 / n.max(m).max(1)).collect();
    vec![
        Mask::none(),
        Mask::causal(),
        Mask::causal_bottom_right(),
        Mask::prefix_lm(2),
        Mask::sliding_window(1),
        Mask::key_padding(m.div_ceil(2)),
        Mask::documents(ids.clone()),
        Mask::documents(ids)
            .and(Mask::causal())
            .or(Mask::key_padding(1)),
    ]
}

/// `max |a − b|` over `max |b|` (at least `floor`, so that an all-zero gradient compares by
/// absolute error).
fn rel_err<T: Float>(a: &DMatrix<T>, b: &DMatrix<T>, floor: f64) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let diff = a
        .iter()
        .zip(b.iter())
        .map(|(x, y)| (x.as_f64() - y.as_f64()).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.as_f64().abs()).fold(floor, f64::max);
    diff / scale
}

/// The loss `L = ⟨G, O⟩` of one forward pass with a bias (possibly all zeros).
fn loss(
    q: &DMatrix<f64>,
    k: &DMatrix<f64>,
    v: &DMatrix<f64>,
    bias: Option<&DMatrix<f64>>,
    softcap: Option<f64>,
    mask: &Mask,
    g: &DMatrix<f64>,
) -> f64 {
    let mut opts = AttentionOptions::new();
    if let Some(b) = bias {
        opts = opts.bias(b);
    }
    if let Some(c) = softcap {
        opts = opts.softcap(c);
    }
    let out = scaled_attention_with(q, k, v, mask, &opts).unwrap();
    out.output.component_mul(g).sum()
}

/// Central differences of `f` with respect to every entry of `x` (entries equal to `-inf`
/// are constants and get 0).
fn numeric(x: &DMatrix<f64>, f: impl Fn(&DMatrix<f64>) -> f64) -> DMatrix<f64> {
    let h = 1e-6;
    DMatrix::from_fn(x.nrows(), x.ncols(), |i, j| {
        if x[(i, j)] == f64::NEG_INFINITY {
            return 0.0;
        }
        let (mut a, mut b) = (x.clone(), x.clone());
        a[(i, j)] += h;
        b[(i, j)] -= h;
        (f(&a) - f(&b)) / (2.0 * h)
    })
}

fn both_backwards(
    q: &DMatrix<f64>,
    k: &DMatrix<f64>,
    v: &DMatrix<f64>,
    mask: &Mask,
    opts: &AttentionOptions<'_, f64>,
    g: &DMatrix<f64>,
) -> (AttentionGrads<f64>, AttentionGrads<f64>) {
    let reference = attention_backward_reference(q, k, v, mask, opts, g).unwrap();
    let fwd = scaled_attention_with(q, k, v, mask, opts).unwrap();
    let tiled = attention_backward(q, k, v, mask, opts, &fwd, g).unwrap();
    (reference, tiled)
}

#[test]
fn finite_differences_for_every_mask_softcap_and_bias() {
    let mut rng = StdRng::seed_from_u64(6);
    let mut checked = 0;
    for trial in 0..3 {
        let n: usize = rng.random_range(1..=7);
        // Make n != m at least once, both ways round.
        let m = match trial {
            0 => n + 2,
            1 => n.div_ceil(2),
            _ => rng.random_range(1..=7),
        };
        let d = rng.random_range(1..=4);
        let dv = rng.random_range(1..=3);
        for mask in masks(n, m) {
            for (softcap, with_bias) in [(None, false), (Some(1.5), true)] {
                let q = randn(&mut rng, n, d, 1.0);
                let k = randn(&mut rng, m, d, 1.0);
                let v = randn(&mut rng, m, dv, 1.0);
                let g = randn(&mut rng, n, dv, 1.0);
                let mut bias = randn(&mut rng, n, m, 0.5);
                if n * m > 1 {
                    // A forbidden pair through the bias too.
                    bias[(n - 1, 0)] = f64::NEG_INFINITY;
                }
                let b = with_bias.then_some(&bias);
                let mut opts = AttentionOptions::new();
                if let Some(b) = b {
                    opts = opts.bias(b);
                }
                if let Some(c) = softcap {
                    opts = opts.softcap(c);
                }
                let (r, t) = both_backwards(&q, &k, &v, &mask, &opts, &g);
                let fq = numeric(&q, |x| loss(x, &k, &v, b, softcap, &mask, &g));
                let fk = numeric(&k, |x| loss(&q, x, &v, b, softcap, &mask, &g));
                let fv = numeric(&v, |x| loss(&q, &k, x, b, softcap, &mask, &g));
                let what = format!("{mask} n={n} m={m} d={d} softcap={softcap:?}");
                for grads in [&r, &t] {
                    assert!(rel_err(&grads.dq, &fq, 1e-3) < 1e-6, "dq {what}");
                    assert!(rel_err(&grads.dk, &fk, 1e-3) < 1e-6, "dk {what}");
                    assert!(rel_err(&grads.dv, &fv, 1e-3) < 1e-6, "dv {what}");
                }
                if with_bias {
                    let fb = numeric(&bias, |x| loss(&q, &k, &v, Some(x), softcap, &mask, &g));
                    for grads in [&r, &t] {
                        let db = grads.dbias.as_ref().expect("a bias was given");
                        assert!(rel_err(db, &fb, 1e-3) < 1e-6, "dbias {what}");
                        if n * m > 1 {
                            assert_eq!(db[(n - 1, 0)], 0.0);
                        }
                        // Masked pairs get no gradient.
                        for i in 0..n {
                            for j in 0..m {
                                if !mask.allows_in(n, m, i, j) {
                                    assert_eq!(db[(i, j)], 0.0, "{what}");
                                }
                            }
                        }
                    }
                } else {
                    assert!(r.dbias.is_none() && t.dbias.is_none());
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 * 8 * 2);
}

#[test]
fn finite_differences_with_a_scale_override() {
    let mut rng = StdRng::seed_from_u64(60);
    let (n, m, d) = (4, 5, 3);
    let (q, k, v, g) = (
        randn(&mut rng, n, d, 1.0),
        randn(&mut rng, m, d, 1.0),
        randn(&mut rng, m, 2, 1.0),
        randn(&mut rng, n, 2, 1.0),
    );
    let mask = Mask::sliding_window(2);
    for scale in [1.0, -0.3] {
        let opts = AttentionOptions::new().scale(scale).softcap(2.0);
        let f = |q: &DMatrix<f64>, k: &DMatrix<f64>| {
            let out = scaled_attention_with(q, k, &v, &mask, &opts).unwrap();
            out.output.component_mul(&g).sum()
        };
        let (r, t) = both_backwards(&q, &k, &v, &mask, &opts, &g);
        let fq = numeric(&q, |x| f(x, &k));
        let fk = numeric(&k, |x| f(&q, x));
        for grads in [&r, &t] {
            assert!(rel_err(&grads.dq, &fq, 1e-3) < 1e-6);
            assert!(rel_err(&grads.dk, &fk, 1e-3) < 1e-6);
        }
    }
}

/// Shapes that are not multiples of the 64 x 64 tile, spanning several tiles.
#[test]
fn reference_and_tiled_agree_past_one_tile() {
    let mut rng = StdRng::seed_from_u64(7);
    let (n, m, d, dv) = (70, 131, 5, 3);
    let q = randn(&mut rng, n, d, 1.0);
    let k = randn(&mut rng, m, d, 1.0);
    let v = randn(&mut rng, m, dv, 1.0);
    let g = randn(&mut rng, n, dv, 1.0);
    let bias = randn(&mut rng, n, m, 0.3);
    for mask in masks(n, m).into_iter().chain([Mask::sliding_window(40)]) {
        for opts in [
            AttentionOptions::new(),
            AttentionOptions::new().softcap(3.0).bias(&bias),
        ] {
            let (r, t) = both_backwards(&q, &k, &v, &mask, &opts, &g);
            assert!(rel_err(&t.dq, &r.dq, 1.0) < 1e-12, "{mask}");
            assert!(rel_err(&t.dk, &r.dk, 1.0) < 1e-12, "{mask}");
            assert!(rel_err(&t.dv, &r.dv, 1.0) < 1e-12, "{mask}");
            if let (Some(a), Some(b)) = (&t.dbias, &r.dbias) {
                assert!(rel_err(a, b, 1.0) < 1e-12, "{mask}");
            }
            // f32 against the f64 reference.
            let c = |x: &DMatrix<f64>| x.map(|e| e as f32);
            let (q32, k32, v32, g32, b32) = (c(&q), c(&k), c(&v), c(&g), c(&bias));
            let mut opts32 = AttentionOptions::new();
            if t.dbias.is_some() {
                opts32 = opts32.softcap(3.0).bias(&b32);
            }
            let fwd = scaled_attention_with(&q32, &k32, &v32, &mask, &opts32).unwrap();
            let t32 = attention_backward(&q32, &k32, &v32, &mask, &opts32, &fwd, &g32).unwrap();
            let r32 = attention_backward_reference(&q32, &k32, &v32, &mask, &opts32, &g32).unwrap();
            for (a, b, f) in [
                (&t32.dq, &r.dq, &r32.dq),
                (&t32.dk, &r.dk, &r32.dk),
                (&t32.dv, &r.dv, &r32.dv),
            ] {
                assert!(rel_err(a, f, 1.0) < 1e-5, "{mask}");
                assert!(rel_err(&a.map(f64::from), b, 1.0) < 1e-5, "{mask}");
            }
        }
    }
}

/// Rows with no allowed key: zero gradients, exactly, and dO there changes nothing.
#[test]
fn fully_masked_rows_give_exactly_zero_gradients() {
    let mut rng = StdRng::seed_from_u64(8);
    let (n, m, d, dv) = (9, 5, 3, 2);
    let q = randn(&mut rng, n, d, 1.0);
    let k = randn(&mut rng, m, d, 1.0);
    let v = randn(&mut rng, m, dv, 1.0);
    let g = randn(&mut rng, n, dv, 1.0);
    let mut bias = randn(&mut rng, n, m, 1.0);
    bias.row_mut(6).fill(f64::NEG_INFINITY); // row 6 is masked by the bias alone
    let cases: Vec<(Mask, Vec<usize>)> = vec![
        // n > m, bottom-right: the first n − m queries see nothing.
        (Mask::causal_bottom_right(), (0..4).collect()),
        (Mask::key_padding(0), (0..n).collect()),
        // Positions past the ids belong to no document.
        (Mask::documents(vec![0, 0, 1, 1, 1]), (5..n).collect()),
        (Mask::none(), vec![]),
    ];
    for (mask, dead) in cases {
        for with_bias in [false, true] {
            let mut dead = dead.clone();
            let mut opts = AttentionOptions::new().softcap(2.0);
            if with_bias {
                opts = opts.bias(&bias);
                if !dead.contains(&6) {
                    dead.push(6);
                }
            }
            // The same dO, and one with huge values on the dead rows.
            let mut loud = g.clone();
            for &i in &dead {
                loud.row_mut(i).fill(1e30);
            }
            let fwd = scaled_attention_with(&q, &k, &v, &mask, &opts).unwrap();
            for &i in &dead {
                assert_eq!(fwd.lse[i], f64::NEG_INFINITY);
            }
            let results = [
                attention_backward(&q, &k, &v, &mask, &opts, &fwd, &g).unwrap(),
                attention_backward(&q, &k, &v, &mask, &opts, &fwd, &loud).unwrap(),
                attention_backward_reference(&q, &k, &v, &mask, &opts, &g).unwrap(),
                attention_backward_reference(&q, &k, &v, &mask, &opts, &loud).unwrap(),
            ];
            for r in &results {
                for x in r.dq.iter().chain(r.dk.iter()).chain(r.dv.iter()) {
                    assert!(x.is_finite(), "{mask}");
                }
                for &i in &dead {
                    assert!(r.dq.row(i).iter().all(|&x| x == 0.0), "{mask}");
                    if let Some(db) = &r.dbias {
                        assert!(db.row(i).iter().all(|&x| x == 0.0), "{mask}");
                    }
                }
            }
            // Dead rows pass nothing back: dK and dV are bit-identical whatever dO is there.
            assert_eq!(results[0], results[1], "{mask}");
            assert_eq!(results[2].dk, results[3].dk, "{mask}");
            assert_eq!(results[2].dv, results[3].dv, "{mask}");
            if dead.len() == n {
                assert!(results[0].dk.iter().all(|&x| x == 0.0));
                assert!(results[0].dv.iter().all(|&x| x == 0.0));
            }
        }
    }
}

/// The median of a non-empty list.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The seed's question 2, measured. Without the 1/√d scale the scores grow like √d and
/// softmax saturates: the gradient it passes back to the scores, ∂L/∂S (read off as d bias
/// with a zero bias), collapses for the typical query as d grows; with the scale it stays
/// put. The mean ‖∂L/∂Q‖ does *not* shrink without the scale: ∂L/∂Q = ∂L/∂S · K carries
/// ‖k‖ ~ √d, and the rare queries whose top two scores nearly tie keep large gradients.
#[test]
fn score_gradient_vanishes_with_d_only_without_the_scale() {
    let mut rng = StdRng::seed_from_u64(2);
    let (n, m, dv, trials) = (16, 64, 16, 4);
    let dims = [4, 64, 512];
    // [unscaled, scaled] x dims: pooled per-query ‖∂L/∂S_i‖, and mean ‖∂L/∂Q‖_F.
    let mut score_rows = vec![vec![Vec::new(); dims.len()]; 2];
    let mut dq_norm = vec![vec![0.0; dims.len()]; 2];
    let zero = DMatrix::<f64>::zeros(n, m);
    for (slot, &d) in dims.iter().enumerate() {
        for _ in 0..trials {
            let q = randn(&mut rng, n, d, 1.0);
            let k = randn(&mut rng, m, d, 1.0);
            let v = randn(&mut rng, m, dv, 1.0);
            // A unit upstream gradient: ‖dO‖_F = 1.
            let g = randn(&mut rng, n, dv, 1.0);
            let g = &g / g.norm();
            for (which, scale) in [Some(1.0), None].into_iter().enumerate() {
                let mut opts = AttentionOptions::new().bias(&zero);
                if let Some(s) = scale {
                    opts = opts.scale(s);
                }
                let fwd = scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap();
                let grads = attention_backward(&q, &k, &v, &Mask::none(), &opts, &fwd, &g).unwrap();
                let ds = grads.dbias.unwrap();
                score_rows[which][slot].extend((0..n).map(|i| ds.row(i).norm()));
                dq_norm[which][slot] += grads.dq.norm() / trials as f64;
            }
        }
    }
    let typical: Vec<Vec<f64>> = score_rows
        .into_iter()
        .map(|per_d| per_d.into_iter().map(median).collect())
        .collect();
    let (unscaled, scaled) = (&typical[0], &typical[1]);
    // Unscaled: the typical score gradient falls by well over 10x from d = 4 to 512
    // (measured: about 50x), and at every step.
    assert!(
        unscaled[1] < unscaled[0] && unscaled[2] < unscaled[1],
        "{unscaled:?}"
    );
    assert!(unscaled[2] < 0.1 * unscaled[0], "{unscaled:?}");
    // Scaled: it stays within 1.5x (measured: within 5%).
    for s in scaled {
        assert!(*s > scaled[0] / 1.5 && *s < scaled[0] * 1.5, "{scaled:?}");
    }
    assert!(scaled[2] > 10.0 * unscaled[2], "{scaled:?} vs {unscaled:?}");
    // ∂L/∂Q: scaled it stays put; unscaled its mean grows with d (measured: about 5x).
    let (dq_unscaled, dq_scaled) = (&dq_norm[0], &dq_norm[1]);
    for s in dq_scaled {
        assert!(
            *s > dq_scaled[0] / 1.5 && *s < dq_scaled[0] * 1.5,
            "{dq_scaled:?}"
        );
    }
    assert!(dq_unscaled[2] > 2.0 * dq_unscaled[0], "{dq_unscaled:?}");
}

#[test]
fn bad_upstream_gradients_are_errors() {
    let q = DMatrix::<f32>::zeros(3, 4);
    let k = DMatrix::<f32>::zeros(5, 4);
    let v = DMatrix::<f32>::zeros(5, 2);
    let opts = AttentionOptions::new();
    let fwd = scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap();
    let wrong = DMatrix::<f32>::zeros(3, 3);
    let e = attention_backward(&q, &k, &v, &Mask::none(), &opts, &fwd, &wrong).unwrap_err();
    assert_eq!(e.to_string(), "d_out is 3 x 3 but must be 3 x 2");
    let e = attention_backward_reference(&q, &k, &v, &Mask::none(), &opts, &wrong).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { arg: "d_out", .. }));
    let mut nan = DMatrix::<f32>::zeros(3, 2);
    nan[(2, 1)] = f32::INFINITY;
    for e in [
        attention_backward(&q, &k, &v, &Mask::none(), &opts, &fwd, &nan).unwrap_err(),
        attention_backward_reference(&q, &k, &v, &Mask::none(), &opts, &nan).unwrap_err(),
    ] {
        assert_eq!(
            e,
            Error::NonFinite {
                arg: "d_out",
                row: 2,
                col: 1
            }
        );
    }
    // Errors of the forward contract come first, with the forward's messages.
    let k3 = DMatrix::<f32>::zeros(5, 3);
    let e = attention_backward(&q, &k3, &v, &Mask::none(), &opts, &fwd, &wrong).unwrap_err();
    assert_eq!(e.to_string(), "k has 3 columns but q has 4");
    let e =
        attention_backward_reference(&q, &k, &v, &Mask::none(), &opts.clone().softcap(-1.0), &nan);
    assert!(matches!(
        e,
        Err(Error::InvalidParameter {
            name: "softcap",
            ..
        })
    ));
}

#[test]
fn empty_shapes_and_views() {
    let opts = AttentionOptions::new();
    for (n, m, d, dv) in [(0, 3, 2, 2), (3, 0, 2, 2), (3, 4, 0, 2), (3, 4, 2, 0)] {
        let q = DMatrix::<f64>::from_element(n, d, 0.5);
        let k = DMatrix::<f64>::from_fn(m, d, |i, j| (i + j) as f64);
        let v = DMatrix::<f64>::from_fn(m, dv, |i, j| (i * j) as f64);
        let g = DMatrix::<f64>::from_element(n, dv, 1.0);
        let fwd = scaled_attention_with(&q, &k, &v, &Mask::causal(), &opts).unwrap();
        let t = attention_backward(&q, &k, &v, &Mask::causal(), &opts, &fwd, &g).unwrap();
        let r = attention_backward_reference(&q, &k, &v, &Mask::causal(), &opts, &g).unwrap();
        assert_eq!(t.dq.shape(), (n, d));
        assert_eq!(t.dk.shape(), (m, d));
        assert_eq!(t.dv.shape(), (m, dv));
        assert!(rel_err(&t.dv, &r.dv, 1.0) < 1e-15);
        assert!(t.dq.iter().chain(t.dk.iter()).all(|&x| x == 0.0) || d > 0);
    }
    // Views of a larger matrix give the same gradients as owned copies.
    let big = DMatrix::<f64>::from_fn(8, 6, |i, j| ((i * 6 + j) as f64 * 0.3).sin());
    let (q, k, v) = (
        big.view((0, 0), (5, 3)),
        big.view((2, 1), (6, 3)),
        big.view((1, 4), (6, 2)),
    );
    let g = big.view((3, 0), (5, 2));
    let fwd = scaled_attention_with(q, k, v, &Mask::none(), &opts).unwrap();
    let a = attention_backward(q, k, v, &Mask::none(), &opts, &fwd, g).unwrap();
    let (qo, ko, vo, go) = (
        q.into_owned(),
        k.into_owned(),
        v.into_owned(),
        g.into_owned(),
    );
    let b = attention_backward(&qo, &ko, &vo, &Mask::none(), &opts, &fwd, &go).unwrap();
    assert_eq!(a, b);
}

/// The scaled-free structure: dV does not depend on V, and dQ, dK, dV are linear in dO.
#[test]
fn gradients_are_linear_in_the_upstream_gradient() {
    let mut rng = StdRng::seed_from_u64(9);
    let (q, k, v) = (
        randn(&mut rng, 6, 3, 1.0),
        randn(&mut rng, 7, 3, 1.0),
        randn(&mut rng, 7, 2, 1.0),
    );
    let (g1, g2) = (randn(&mut rng, 6, 2, 1.0), randn(&mut rng, 6, 2, 1.0));
    let mask = Mask::prefix_lm(3);
    let opts = AttentionOptions::new();
    let fwd = scaled_attention_with(&q, &k, &v, &mask, &opts).unwrap();
    let run = |g: &DMatrix<f64>| attention_backward(&q, &k, &v, &mask, &opts, &fwd, g).unwrap();
    let (a, b, c) = (run(&g1), run(&g2), run(&(&g1 * 2.0 - &g2)));
    assert!(rel_err(&c.dq, &(&a.dq * 2.0 - &b.dq), 1.0) < 1e-14);
    assert!(rel_err(&c.dk, &(&a.dk * 2.0 - &b.dk), 1.0) < 1e-14);
    assert!(rel_err(&c.dv, &(&a.dv * 2.0 - &b.dv), 1.0) < 1e-14);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random shapes (often past one 64-row tile) and masks: tiled equals reference.
    #[test]
    fn tiled_matches_reference_on_random_shapes(
        n in 0usize..80, m in 0usize..80, d in 1usize..6, dv in 1usize..4,
        which in 0usize..8, softcap in prop::option::of(0.5f64..5.0), seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (q, k, v) = (randn(&mut rng, n, d, 1.0), randn(&mut rng, m, d, 1.0), randn(&mut rng, m, dv, 1.0));
        let g = randn(&mut rng, n, dv, 1.0);
        let mask = masks(n.max(1), m.max(1)).swap_remove(which);
        let mut opts = AttentionOptions::new();
        if let Some(c) = softcap {
            opts = opts.softcap(c);
        }
        let (r, t) = both_backwards(&q, &k, &v, &mask, &opts, &g);
        prop_assert!(rel_err(&t.dq, &r.dq, 1.0) < 1e-12);
        prop_assert!(rel_err(&t.dk, &r.dk, 1.0) < 1e-12);
        prop_assert!(rel_err(&t.dv, &r.dv, 1.0) < 1e-12);
        // f32 tiled against the f64 reference.
        let c = |x: &DMatrix<f64>| x.map(|e| e as f32);
        let mut opts32 = AttentionOptions::new();
        if let Some(s) = softcap {
            opts32 = opts32.softcap(s as f32);
        }
        let (q32, k32, v32, g32) = (c(&q), c(&k), c(&v), c(&g));
        let fwd = scaled_attention_with(&q32, &k32, &v32, &mask, &opts32).unwrap();
        let t32 = attention_backward(&q32, &k32, &v32, &mask, &opts32, &fwd, &g32).unwrap();
        prop_assert!(rel_err(&t32.dq.map(f64::from), &r.dq, 1.0) < 1e-5);
        prop_assert!(rel_err(&t32.dk.map(f64::from), &r.dk, 1.0) < 1e-5);
        prop_assert!(rel_err(&t32.dv.map(f64::from), &r.dv, 1.0) < 1e-5);
    }

    /// The slice VJPs equal the Jacobian products, in f64 and f32.
    #[test]
    fn slice_vjps_match_the_jacobian(
        s in prop::collection::vec(prop_oneof![4 => -8.0f64..8.0, 1 => Just(f64::NEG_INFINITY)], 0..12),
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let g: Vec<f64> = (0..s.len()).map(|_| rng.sample(StandardNormal)).collect();
        let j = softmax_jacobian(&s);
        let jg = &j * DVector::from_column_slice(&g);
        let vjp = softmax_vjp(&s, &g).unwrap();
        let jvp = softmax_jvp(&s, &g).unwrap();
        for i in 0..s.len() {
            prop_assert!((vjp[i] - jg[i]).abs() < 1e-14);
            prop_assert_eq!(vjp[i], jvp[i]);
            if s[i] == f64::NEG_INFINITY {
                prop_assert_eq!(vjp[i], 0.0);
            }
        }
        // log-softmax: the Jacobian is I − 1 pᵀ, i.e. ∂L/∂s = g − p Σg off the mask.
        let p = softmax(&s);
        let total: f64 = g.iter().sum();
        let lvjp = log_softmax_vjp(&s, &g).unwrap();
        let h = entropy_from_logits_grad(&s);
        let h_sum: f64 = h.iter().sum();
        prop_assert!(h_sum.abs() < 1e-12);
        for i in 0..s.len() {
            let expect = if s[i] == f64::NEG_INFINITY { 0.0 } else { g[i] - p[i] * total };
            prop_assert!((lvjp[i] - expect).abs() < 1e-14);
        }
        // f32 agrees with f64.
        let s32: Vec<f32> = s.iter().map(|&x| x as f32).collect();
        let g32: Vec<f32> = g.iter().map(|&x| x as f32).collect();
        let v32 = softmax_vjp(&s32, &g32).unwrap();
        let h32 = entropy_from_logits_grad(&s32);
        for i in 0..s.len() {
            prop_assert!((v32[i] as f64 - vjp[i]).abs() < 1e-5);
            prop_assert!((h32[i] as f64 - h[i]).abs() < 1e-5);
        }
    }

    /// The entropy gradient against central differences of H(softmax(s)).
    #[test]
    fn entropy_gradient_matches_finite_differences(
        s in prop::collection::vec(-6.0f64..6.0, 1..10),
    ) {
        let grad = entropy_from_logits_grad(&s);
        let h = 1e-6;
        for i in 0..s.len() {
            let (mut a, mut b) = (s.clone(), s.clone());
            a[i] += h;
            b[i] -= h;
            let fd = (entropy(&softmax(&a)) - entropy(&softmax(&b))) / (2.0 * h);
            prop_assert!((grad[i] - fd).abs() < 1e-8, "{} vs {}", grad[i], fd);
        }
        // And the log-softmax VJP against differences of ⟨g, log_softmax(s)⟩ with g = s.
        let lvjp = log_softmax_vjp(&s, &s).unwrap();
        for i in 0..s.len() {
            let (mut a, mut b) = (s.clone(), s.clone());
            a[i] += h;
            b[i] -= h;
            let f = |x: &[f64]| log_softmax(x).iter().zip(&s).map(|(y, g)| y * g).sum::<f64>();
            prop_assert!((lvjp[i] - (f(&a) - f(&b)) / (2.0 * h)).abs() < 1e-7);
        }
    }
}

/// A saved forward result from another call is an error, not the gradients of another
/// function: another mask (the case: causal forward, prefix-LM backward, dQ was off by
/// 1.76), another scale, a bias dropped, another Q; on one head and per head of a layer. The
/// matching forward passes, from the kernel or the reference, on every thread count.
#[test]
fn a_forward_from_another_call_is_an_error() {
    let mut rng = StdRng::seed_from_u64(11);
    let (n, d) = (300, 8);
    let q = randn(&mut rng, n, d, 1.0);
    let k = randn(&mut rng, n, d, 1.0);
    let v = randn(&mut rng, n, d, 1.0);
    let g = randn(&mut rng, n, d, 1.0);
    let bias = randn(&mut rng, n, n, 1.0);
    let plain = AttentionOptions::new();
    let fwd = |mask: &Mask, opts: &AttentionOptions<'_, f64>, q: &DMatrix<f64>| {
        scaled_attention_with(q, &k, &v, mask, opts).unwrap()
    };
    let is_mismatch = |r: attention_math::Result<AttentionGrads<f64>>| {
        matches!(r, Err(Error::ForwardMismatch { head: 0, .. }))
    };
    let causal = fwd(&Mask::causal(), &plain, &q);
    for threads in [1, 2] {
        let opts = plain.clone().threads(threads);
        let ok = attention_backward(&q, &k, &v, &Mask::causal(), &opts, &causal, &g);
        assert!(ok.is_ok(), "{threads}");
        let bad = attention_backward(&q, &k, &v, &Mask::prefix_lm(40), &opts, &causal, &g);
        assert!(is_mismatch(bad), "{threads}");
    }
    let e = attention_backward(&q, &k, &v, &Mask::prefix_lm(40), &plain, &causal, &g).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("forward does not match this call"),
        "{e}"
    );
    // Another scale, a bias the backward does not have, another Q: each saved forward given
    // to a plain, unmasked backward.
    let q2 = randn(&mut rng, n, d, 1.0);
    let saved = [
        fwd(&Mask::none(), &AttentionOptions::new().scale(0.7), &q),
        fwd(&Mask::none(), &AttentionOptions::new().bias(&bias), &q),
        fwd(&Mask::none(), &plain, &q2),
    ];
    for (what, f) in ["scale", "bias", "q"].iter().zip(&saved) {
        let r = attention_backward(&q, &k, &v, &Mask::none(), &plain, f, &g);
        assert!(is_mismatch(r), "{what}");
    }
    // The reference's forward is accepted by the kernel's backward.
    let reference =
        attention_math::scaled_attention_reference(&q, &k, &v, &Mask::causal(), &plain).unwrap();
    assert!(attention_backward(&q, &k, &v, &Mask::causal(), &plain, &reference, &g).is_ok());
    // Per head of a layer: head 1 of 2 saved with another mask's log-sum-exp.
    let heads = Heads::multi_head(2);
    let (q2h, k2h, v2h, g2h) = (
        randn(&mut rng, n, 2 * d, 1.0),
        randn(&mut rng, n, 2 * d, 1.0),
        randn(&mut rng, n, 2 * d, 1.0),
        randn(&mut rng, n, 2 * d, 1.0),
    );
    let layer =
        |mask: &Mask| multi_head_attention_with(&q2h, &k2h, &v2h, heads, mask, &plain).unwrap();
    let mut mixed = layer(&Mask::causal());
    let window = layer(&Mask::sliding_window(3));
    mixed.lse.set_column(1, &window.lse.column(1));
    let bwd = |f: &MultiHeadOutput<f64>| {
        multi_head_attention_backward(&q2h, &k2h, &v2h, heads, &Mask::causal(), &plain, f, &g2h)
    };
    assert!(bwd(&layer(&Mask::causal())).is_ok());
    assert!(matches!(
        bwd(&mixed),
        Err(Error::ForwardMismatch { head: 1, .. })
    ));
}
