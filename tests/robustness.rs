//! Robustness (issue 12): hostile inputs give the right number or a documented `Err`, never
//! a panic, a wrap, a stack overflow or a finite answer made from NaN. Values come from the
//! adversarial strategies in `tests/common/mod.rs`; references are f64 oracles, with
//! tolerances that account for each function's conditioning.

mod common;

use attention_math::sheet::diagnostics::{rms_normalize_rows, softcap};
use attention_math::sheet::lm::{Objective, cross_entropy};
use attention_math::sheet::lora::{BottleneckAdapter, LoraLinear};
use attention_math::sheet::moe::{load_balancing_loss, route_top_k, router_z_loss};
use attention_math::sheet::preference::{
    PairLogProbs, dpo_loss, log_sigmoid, ppo_clipped_loss, reward_model_loss,
};
use attention_math::sheet::scaling::{ScalingStudy, softmax_jacobian_fro};
use attention_math::{
    AttentionOptions, Block, Error, Mask, entropy, entropy_from_logits, kl_divergence, log_softmax,
    logsumexp, scaled_attention, scaled_attention_reference, softmax, softmax_with_temperature,
};
use common::*;
use nalgebra::DMatrix;
use proptest::prelude::*;

const EPS32: f64 = f32::EPSILON as f64;

/// `true` for the variants the crate documents (all of them: the enum is the contract), as
/// opposed to something a future change might add without documenting it here.
fn documented(e: &Error) -> bool {
    matches!(
        e,
        Error::DimensionMismatch { .. }
            | Error::ShapeMismatch { .. }
            | Error::LengthMismatch { .. }
            | Error::NonFinite { .. }
            | Error::InvalidParameter { .. }
            | Error::IndexOutOfRange { .. }
            | Error::HeadSplit { .. }
            | Error::Empty { .. }
            | Error::TooLarge { .. }
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// softmax of finite f32 logits: finite, sums to 1, and each weight matches the f64
    /// oracle to `(|x_i − max| + m + 4) ε` relative (the conditioning of exp(x_i − max)),
    /// except weights below the smallest normal float, which may be flushed to 0.
    #[test]
    fn softmax_matches_the_f64_oracle(x in edge_row_f32(24)) {
        let p = softmax(&x);
        let want = softmax_oracle(&x);
        let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let total: f64 = p.iter().map(|&v| v as f64).sum();
        prop_assert!((total - 1.0).abs() <= (x.len() as f64 + 2.0) * EPS32, "{total}");
        for ((&pi, &wi), &xi) in p.iter().zip(&want).zip(&x) {
            prop_assert!(pi.is_finite() && (0.0..=1.0).contains(&pi));
            let tol = (((xi as f64) - max).abs() + x.len() as f64 + 4.0) * EPS32 * wi
                + 2.0 * f32::MIN_POSITIVE as f64;
            prop_assert!(((pi as f64) - wi).abs() <= tol, "{pi} vs {wi} at {xi}");
        }
    }

    /// log-softmax and log-sum-exp: finite for finite input, within
    /// `(|x_i − max| + |max| + ln m + m) ε` absolute of the f64 oracle.
    #[test]
    fn log_softmax_and_lse_match_the_oracle(x in edge_row_f32(24)) {
        let want = softmax_oracle(&x);
        let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let m = x.len() as f64;
        let lse = logsumexp(&x) as f64;
        let log_sum = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        let lse_want = max + log_sum;
        prop_assert!(lse.is_finite());
        prop_assert!((lse - lse_want).abs() <= (max.abs() + m.ln() + m + 2.0) * EPS32);
        for ((&lp, &w), &xi) in log_softmax(&x).iter().zip(&want).zip(&x) {
            let lp_want = (xi as f64 - max) - log_sum;
            if lp_want < -(f32::MAX as f64) {
                // Beyond f32's range: -inf is the correctly rounded value.
                prop_assert_eq!(lp, f32::NEG_INFINITY);
                continue;
            }
            prop_assert!(lp.is_finite() && lp <= 0.0);
            let tol = ((xi as f64 - max).abs() + m.ln() + m + 2.0) * EPS32;
            prop_assert!((lp as f64 - lp_want).abs() <= tol, "{lp} vs {lp_want} (p = {w})");
        }
    }

    /// All `-inf` but one: all the mass on the one, whatever its value.
    #[test]
    fn all_neg_inf_but_one_puts_the_mass_there((x, at) in all_neg_inf_but_one(16)) {
        let p = softmax(&x);
        for (j, &pj) in p.iter().enumerate() {
            prop_assert_eq!(pj, if j == at { 1.0 } else { 0.0 });
        }
        prop_assert_eq!(logsumexp(&x), x[at]);
        prop_assert_eq!(entropy_from_logits(&x), 0.0);
        prop_assert_eq!(log_softmax(&x)[at], 0.0);
    }

    /// Entropy from logits: finite, in `[0, ln m]`, and within the error its conditioning
    /// allows of the f64 oracle: `ΔH <= ε Σ p_i |z_i| (|z_i − z̄| + 1) + (m + 4) ε H` for the
    /// shifted logits z (rounded once each in f32).
    #[test]
    fn entropy_from_logits_matches_the_oracle(x in edge_row_f32(24)) {
        let h = entropy_from_logits(&x) as f64;
        let p = softmax_oracle(&x);
        let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: Vec<f64> = x.iter().map(|&v| v as f64 - max).collect();
        let h_want: f64 = p.iter().filter(|&&pi| pi > 0.0).map(|&pi| -pi * pi.ln()).sum();
        let zbar: f64 = p.iter().zip(&z).map(|(pi, zi)| pi * zi).sum();
        let cond: f64 = p.iter().zip(&z).map(|(pi, zi)| pi * zi.abs() * ((zi - zbar).abs() + 1.0)).sum();
        let m = x.len() as f64;
        prop_assert!(h.is_finite() && h >= 0.0 && h <= m.ln() * (1.0 + 4.0 * EPS32) + 1e-6);
        let tol = 4.0 * EPS32 * (cond + (m + 4.0) * h_want) + 64.0 * f32::MIN_POSITIVE as f64 * m;
        prop_assert!((h - h_want).abs() <= tol, "{h} vs {h_want} (tol {tol})");
        // entropy of the weights agrees where no weight is flushed.
        let hp = entropy(&softmax(&x)) as f64;
        if p.iter().all(|&pi| pi == 0.0 || pi > 1e-30) {
            prop_assert!((hp - h_want).abs() <= tol + 8.0 * EPS32 * (m + 1.0), "{hp} vs {h_want}");
        }
    }

    /// Temperature anywhere in (0, f32::MAX]: finite weights summing to 1, equal to the f64
    /// oracle of softmax(x / t) (computed from the shifted logits in f64).
    #[test]
    fn temperature_never_overflows(x in edge_row_f32(12), log_t in -44.0f64..38.0) {
        let t = 10f64.powf(log_t) as f32;
        prop_assume!(t > 0.0 && t.is_finite());
        let p = softmax_with_temperature(&x, t).unwrap();
        let total: f64 = p.iter().map(|&v| v as f64).sum();
        prop_assert!((total - 1.0).abs() <= (x.len() as f64 + 2.0) * EPS32);
        let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let shifted: Vec<f64> = x.iter().map(|&v| (v as f64 - max) / t as f64).collect();
        let e: Vec<f64> = shifted.iter().map(|s| s.exp()).collect();
        let sum: f64 = e.iter().sum();
        for ((&pi, &ei), &si) in p.iter().zip(&e).zip(&shifted) {
            let want = ei / sum;
            let tol = (si.abs() + x.len() as f64 + 6.0) * EPS32 * want + 2.0 * f32::MIN_POSITIVE as f64;
            prop_assert!(((pi as f64) - want).abs() <= tol, "{pi} vs {want}");
        }
    }

    /// log σ against the f64 oracle `−ln_1p(e^{−x})` / `x − ln_1p(e^x)`: relative accuracy
    /// everywhere, including both tails and subnormal inputs.
    #[test]
    fn log_sigmoid_is_relatively_accurate(x in edge_f32()) {
        let xf = x as f64;
        let want = if xf >= 0.0 { -(-xf).exp().ln_1p() } else { xf - xf.exp().ln_1p() };
        let got = log_sigmoid(x) as f64;
        // Results below f32's smallest subnormal round to 0 (or the nearest subnormal).
        let tol = 4.0 * EPS32 * want.abs() + f32::from_bits(1) as f64;
        prop_assert!((got - want).abs() <= tol, "ln σ({x}) = {got} vs {want}");
        let r = reward_model_loss(x, 0.0) as f64;
        prop_assert!((r + want).abs() <= tol);
    }

    /// Masks with parameters at the top of usize: `allows_in`, `classify` and `row_run`
    /// never panic and agree with each other, at small positions and near usize::MAX.
    #[test]
    fn masks_with_edge_parameters_are_consistent(
        mask in edge_mask(),
        n in edge_usize(),
        m in edge_usize(),
        near_top in any::<bool>(),
        r0 in 0usize..8,
        c0 in 0usize..8,
    ) {
        let base = if near_top { usize::MAX - 16 } else { 0 };
        let (rows, cols) = (base + r0..base + r0 + 4, base + c0..base + c0 + 5);
        let vals: Vec<bool> = rows
            .clone()
            .flat_map(|i| cols.clone().map(move |j| (i, j)))
            .map(|(i, j)| mask.allows_in(n, m, i, j))
            .collect();
        match mask.classify(rows.clone(), cols.clone(), n, m) {
            Block::Empty => prop_assert!(vals.iter().all(|v| !v), "{mask}"),
            Block::Full => prop_assert!(vals.iter().all(|v| *v), "{mask}"),
            Block::Partial => {}
        }
        // Named masks classify exactly even with edge parameters.
        let text = mask.to_string();
        if !text.contains(['&', '|', '!']) {
            let exact = if vals.iter().all(|v| *v) {
                Block::Full
            } else if vals.iter().all(|v| !v) {
                Block::Empty
            } else {
                Block::Partial
            };
            prop_assert_eq!(mask.classify(rows, cols, n, m), exact, "{}", text);
        }
    }

    /// Sliding windows at least as wide as the sequence, and padding beyond it, are causal
    /// in the fast kernel too (before: `w as isize` went negative and the kernel returned
    /// zeros while the reference was right).
    #[test]
    fn wide_windows_equal_causal_in_attention(
        (q, k, v) in qkv_square(12),
        w in edge_usize(),
        len in edge_usize(),
    ) {
        let n = q.nrows();
        prop_assume!(w >= n && len >= n);
        let want = naive_attention(&q, &k, &v, &Mask::causal(), 1.0 / (q.ncols() as f64).sqrt());
        for mask in [Mask::sliding_window(w), Mask::key_padding(len).and(Mask::causal())] {
            let got = scaled_attention(&q, &k, &v, &mask).unwrap();
            prop_assert!(max_abs_diff(&got, &want) < TOL_F64, "{mask}");
            let r = scaled_attention_reference(&q, &k, &v, &mask, &AttentionOptions::new()).unwrap();
            prop_assert!(max_abs_diff(&r.output, &want) < TOL_F64, "{mask}");
        }
    }

    /// Cross-entropy of adversarial finite logits: finite, non-negative, equal to the f64
    /// oracle `lse − s_t` within `(|s_t − max| + |max| + ln V + V) ε`.
    #[test]
    fn cross_entropy_of_edge_logits(row in edge_row_f32(10), target in 0usize..10) {
        let vocab = row.len();
        let target = target % vocab;
        let logits = DMatrix::from_fn(2, vocab, |i, j| if i == 0 { row[j] } else { 0.0 });
        let ce = cross_entropy(&logits, &[0, target], &[true, false]).unwrap();
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let log_sum = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        let want = (max - row[target] as f64) + log_sum;
        let got = ce.per_position[0] as f64;
        if want > f32::MAX as f64 {
            prop_assert_eq!(got, f64::INFINITY); // the loss is beyond f32's range
            return Ok(());
        }
        prop_assert!(got.is_finite() && got >= 0.0);
        let tol = ((row[target] as f64 - max).abs() + (vocab as f64).ln() + vocab as f64 + 2.0) * EPS32;
        prop_assert!((got - want).abs() <= tol, "{got} vs {want}");
    }

    /// Routing adversarial logits: gates finite and summing to 1, experts distinct, the
    /// losses finite (or a documented Err).
    #[test]
    fn routing_of_edge_logits(rows in proptest::collection::vec(edge_row_f32(6), 1..5), k in 1usize..4) {
        let e = rows.iter().map(Vec::len).min().unwrap();
        let logits = DMatrix::from_fn(rows.len(), e, |i, j| rows[i][j]);
        match route_top_k(&logits, k, true) {
            Ok(r) => {
                for (g, x) in r.gates().iter().zip(r.experts()) {
                    let total: f64 = g.iter().map(|&v| v as f64).sum();
                    prop_assert!((total - 1.0).abs() < 8.0 * EPS32, "{g:?}");
                    let mut sorted = x.clone();
                    sorted.sort();
                    sorted.dedup();
                    prop_assert_eq!(sorted.len(), x.len());
                }
                let l = load_balancing_loss(&r).unwrap();
                prop_assert!(l.is_finite() && l >= 0.0 && l <= e as f32 * (1.0 + 1e-5));
            }
            Err(err) => {
                let expected = k > e && matches!(err, Error::InvalidParameter { .. });
                prop_assert!(expected, "{:?}", err);
            }
        }
        let z = router_z_loss(&logits).unwrap();
        prop_assert!(!z.is_nan() && z >= 0.0);
    }

    /// QK-norm of adversarial rows: finite, unit RMS when eps is negligible, and equal to the
    /// f64 formula.
    #[test]
    fn rms_normalize_edge_rows(row in edge_row_f32(8)) {
        let x = DMatrix::from_row_slice(1, row.len(), &row);
        let eps = f32::from_bits(1); // the smallest subnormal
        let y = rms_normalize_rows(&x, eps).unwrap();
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / row.len() as f64;
        for (j, &v) in row.iter().enumerate() {
            let want = v as f64 / (ms + eps as f64).sqrt();
            let got = y[(0, j)] as f64;
            prop_assert!(got.is_finite());
            prop_assert!((got - want).abs() <= (row.len() as f64 + 6.0) * EPS32 * want.abs() + 1e-38,
                "{got} vs {want}");
        }
        for &v in &row {
            let c = softcap(v, 30.0).unwrap();
            prop_assert!(c.is_finite() && c.abs() <= 30.0);
        }
    }

    /// PPO and DPO on finite edge values: no NaN, and the documented errors only.
    #[test]
    fn policy_losses_of_edge_values(a in edge_f32(), b in edge_f32(), c in edge_f32(), d in edge_f32()) {
        let pair = PairLogProbs { policy_chosen: a, policy_rejected: b, reference_chosen: c, reference_rejected: d };
        let l = dpo_loss(&pair, 0.1).unwrap();
        prop_assert!(!l.is_nan() && l >= 0.0);
        let l = ppo_clipped_loss(&[a, b], &[c, d], &[a, c], 0.2).unwrap();
        prop_assert!(!l.is_nan());
    }

    /// Absurd sizes are Errs naming a documented variant, never panics.
    #[test]
    fn absurd_sizes_are_errors(n in edge_usize(), m in edge_usize()) {
        prop_assume!(n.checked_mul(m).is_none_or(|nm| nm > 1 << 40));
        let mask = Mask::causal();
        let dense = matches!(mask.to_dense(n, m), Err(Error::TooLarge { .. }));
        let bias = matches!(mask.to_bias::<f32>(n, m), Err(Error::TooLarge { .. }));
        prop_assert!(dense && bias, "{} x {}", n, m);
        let r = ScalingStudy::new().trials(n).keys(m).d_k([1]).run();
        prop_assert!(matches!(r, Err(ref e) if documented(e)), "{r:?}");
        if n > 1 << 40 {
            prop_assert!(Objective::Causal.loss_mask(n).is_err());
        }
    }
}

/// The issue's cases, one by one, with the values they must give now.
#[test]
fn the_issues_cases() {
    assert!(matches!(
        Mask::causal().to_dense(1 << 32, 1 << 32),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        Mask::causal().to_bias::<f32>(1 << 33, 1 << 31),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        LoraLinear::new(DMatrix::<f32>::zeros(1 << 32, 0), 1 << 32, 1.0),
        Err(Error::TooLarge { .. })
    ));
    assert_eq!(
        softmax_with_temperature(&[1.0_f32, 2.0], 1e-40).unwrap(),
        vec![0.0, 1.0]
    );
    let h = entropy_from_logits(&[1e8_f32, 1e8]);
    assert!((h - 2.0_f32.ln()).abs() <= 2.0 * f32::EPSILON);
    assert!(matches!(
        ScalingStudy::new().trials(usize::MAX / 2).run(),
        Err(Error::TooLarge { .. })
    ));
    assert_eq!(
        ppo_clipped_loss(&[f64::NAN], &[0.0], &[-1.0], 0.2),
        Err(Error::NonFinite {
            arg: "logp",
            row: 0,
            col: 0
        })
    );
    // The window and the padding of the issue, in the fast kernel and the reference.
    let q = DMatrix::<f32>::from_fn(70, 8, |i, j| ((i * 8 + j) as f32 * 0.37).sin());
    let v = DMatrix::<f32>::from_fn(70, 3, |i, j| (i as f32 * 0.1) - j as f32);
    let causal = scaled_attention(&q, &q, &v, &Mask::causal()).unwrap();
    for mask in [
        Mask::sliding_window(usize::MAX),
        Mask::key_padding(1 << 63).and(Mask::causal()),
    ] {
        let out = scaled_attention(&q, &q, &v, &mask).unwrap();
        assert!((out - &causal).amax() < 1e-6, "{mask}");
    }
}

/// A 20,000-deep chain of combinators used in attention on a rayon worker thread (before:
/// a stack overflow that aborted the process), in the fast kernel and the reference.
#[test]
fn deep_masks_in_attention_on_a_rayon_worker() {
    let mut mask = Mask::none();
    for t in 0..20_000 {
        mask = match t % 3 {
            0 => mask.and(Mask::causal()),
            1 => mask.or(Mask::key_padding(0)),
            _ => mask.not().not(),
        };
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .stack_size(256 * 1024)
        .build()
        .unwrap();
    let q = DMatrix::<f64>::from_fn(40, 4, |i, j| ((i * 4 + j) as f64 * 0.7).cos());
    let v = DMatrix::<f64>::from_fn(40, 2, |i, j| (i + j) as f64);
    let (got, reference) = pool.install(|| {
        let got = scaled_attention(&q, &q, &v, &mask).unwrap();
        let r = scaled_attention_reference(&q, &q, &v, &mask, &AttentionOptions::new()).unwrap();
        (got, r.output)
    });
    let want = naive_attention(&q, &q, &v, &Mask::causal(), 0.5);
    assert!(max_abs_diff(&got, &want) < TOL_F64);
    assert!(max_abs_diff(&reference, &want) < TOL_F64);
    pool.install(move || drop(mask));
}

/// NaN is never turned into a finite answer: every function either returns a documented
/// Err or a NaN.
#[test]
fn nan_is_rejected_or_propagated() {
    let nan = f64::NAN;
    let row = [0.5, nan, -1.0];
    assert!(softmax(&row).iter().all(|p| p.is_nan()));
    assert!(log_softmax(&row).iter().all(|p| p.is_nan()));
    assert!(logsumexp(&row).is_nan());
    assert!(entropy(&row).is_nan());
    assert!(entropy_from_logits(&row).is_nan());
    assert!(kl_divergence(&[0.5, 0.5], &[nan, 0.0]).unwrap().is_nan());
    assert!(kl_divergence(&[nan, 0.5], &[0.5, 0.0]).unwrap().is_nan());
    assert!(
        softmax_with_temperature(&row, 0.5)
            .unwrap()
            .iter()
            .all(|p| p.is_nan())
    );
    assert!(matches!(
        softmax_with_temperature(&[0.0], nan),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(log_sigmoid(nan).is_nan());
    assert!(reward_model_loss(nan, 1.0).is_nan());
    let pair = PairLogProbs {
        policy_chosen: nan,
        policy_rejected: 0.0,
        reference_chosen: 0.0,
        reference_rejected: 0.0,
    };
    assert!(matches!(dpo_loss(&pair, 0.1), Err(Error::NonFinite { .. })));
    assert!(matches!(
        ppo_clipped_loss(&[0.0], &[0.0], &[nan], 0.2),
        Err(Error::NonFinite { .. })
    ));
    let logits = nalgebra::dmatrix![0.0, nan; 1.0, 2.0];
    assert!(matches!(
        route_top_k(&logits, 1, true),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        router_z_loss(&logits),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        cross_entropy(&logits, &[0, 1], &[true, false]),
        Err(Error::NonFinite { .. })
    ));
    let y = rms_normalize_rows(&logits, 1e-6).unwrap();
    assert!(y.row(0).iter().all(|v| v.is_nan()));
    assert!(softcap(nan, 5.0).unwrap().is_nan());
    assert!(softmax_jacobian_fro(&[0.5, nan]).is_nan());
    let layer = LoraLinear::new(DMatrix::<f64>::identity(2, 2), 1, 1.0).unwrap();
    let out = layer.forward(&logits).unwrap();
    assert!(out.row(0).iter().any(|v| v.is_nan()));
    let adapter = BottleneckAdapter::new(
        DMatrix::from_element(2, 1, 1.0),
        DMatrix::from_element(1, 2, 1.0),
    )
    .unwrap();
    assert!(
        adapter
            .forward(&logits)
            .unwrap()
            .row(0)
            .iter()
            .all(|v| v.is_nan())
    );
    let err = scaled_attention(&logits, &logits, &logits, &Mask::none()).unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }) && documented(&err));
}

/// Sizes the caller picks are checked before anything is allocated: inputs with zero columns
/// hold no data but ask for a 2^32 x 2^32 output (or weights).
#[test]
fn attention_sizes_are_checked() {
    use attention_math::{AttentionOptions, scaled_attention, scaled_attention_with};
    let q = DMatrix::<f32>::zeros(1 << 32, 0);
    let k = DMatrix::<f32>::zeros(0, 0);
    let v = DMatrix::<f32>::zeros(0, 1 << 32);
    assert!(matches!(
        scaled_attention(&q, &k, &v, &Mask::none()),
        Err(Error::TooLarge { .. })
    ));
    let kk = DMatrix::<f32>::zeros(1 << 32, 0);
    let vv = DMatrix::<f32>::zeros(1 << 32, 0);
    let opts = AttentionOptions::new().return_weights(true);
    assert!(matches!(
        scaled_attention_with(&q, &kk, &vv, &Mask::none(), &opts),
        Err(Error::TooLarge { .. })
    ));
}

/// Huge finite scores cannot fool the kernel's "fully masked row" test: a bias of −3e38 on
/// every key leaves the weights uniform (the reference's answer: the mean of V), on the tiled
/// path and the decode path alike.
#[test]
fn huge_negative_biases_are_not_masks() {
    use attention_math::{AttentionOptions, scaled_attention_reference, scaled_attention_with};
    for n in [1, 100] {
        let m = 7;
        let q = DMatrix::<f32>::from_fn(n, 4, |i, j| ((i + j) as f32).sin());
        let k = DMatrix::<f32>::from_fn(m, 4, |i, j| ((i * 4 + j) as f32).cos());
        let v = DMatrix::<f32>::from_fn(m, 2, |i, j| (i + 3 * j) as f32);
        let bias = DMatrix::<f32>::from_element(n, m, -3e38);
        let opts = AttentionOptions::new().bias(&bias);
        let fast = scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap();
        let want = scaled_attention_reference(&q, &k, &v, &Mask::none(), &opts).unwrap();
        assert_eq!(fast.output, want.output, "n = {n}");
        assert!((fast.output[(0, 0)] - 3.0).abs() < 1e-6); // the mean of 0..7
        assert_eq!(fast.lse, want.lse);
    }
}

/// The tiled backward pass recomputes `P = exp(S − lse)`; where the saved lse is too coarse
/// for that (huge scores or a huge constant bias), the row takes an exact pass instead, so the
/// gradients stay finite and equal the reference's.
#[test]
fn backward_survives_huge_scores_and_biases() {
    use attention_math::{
        AttentionOptions, attention_backward, attention_backward_reference, scaled_attention_with,
    };
    let (n, m) = (3, 4);
    let q = DMatrix::<f32>::from_fn(n, 2, |i, j| ((i * 2 + j) as f32).sin());
    let k = DMatrix::<f32>::from_fn(m, 2, |i, j| ((i * 2 + j) as f32).cos());
    let v = DMatrix::<f32>::from_fn(m, 2, |i, j| (i + j) as f32 * 0.5);
    let d_out = DMatrix::<f32>::from_fn(n, 2, |i, j| 1.0 + (i * j) as f32);
    // A constant bias cannot change the softmax: dV's columns still sum to dO's.
    let bias = DMatrix::<f32>::from_element(n, m, 1e8);
    let opts = AttentionOptions::new().bias(&bias);
    let fwd = scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap();
    let g = attention_backward(&q, &k, &v, &Mask::none(), &opts, &fwd, &d_out).unwrap();
    let r = attention_backward_reference(&q, &k, &v, &Mask::none(), &opts, &d_out).unwrap();
    for c in 0..2 {
        let want: f32 = d_out.column(c).sum();
        assert!(
            (g.dv.column(c).sum() - want).abs() < 1e-4 * want,
            "{}",
            g.dv
        );
    }
    assert!((&g.dv - &r.dv).amax() < 1e-5 && (&g.dq - &r.dq).amax() < 1e-5);
    // Scores around 1e11 (q·k with entries of 3e5).
    let big_q = q.map(|x| x * 3e5);
    let big_k = k.map(|x| x * 3e5);
    let opts = AttentionOptions::new();
    let fwd = scaled_attention_with(&big_q, &big_k, &v, &Mask::causal(), &opts).unwrap();
    let g = attention_backward(&big_q, &big_k, &v, &Mask::causal(), &opts, &fwd, &d_out).unwrap();
    let r =
        attention_backward_reference(&big_q, &big_k, &v, &Mask::causal(), &opts, &d_out).unwrap();
    assert!(
        g.dq.iter()
            .chain(g.dk.iter())
            .chain(g.dv.iter())
            .all(|x| x.is_finite())
    );
    assert!((&g.dv - &r.dv).amax() < 1e-4, "{} vs {}", g.dv, r.dv);
    assert!((&g.dq - &r.dq).amax() <= 1e-4 * r.dq.amax().max(1.0));
}

/// Found by the fuzzer: negative entries in both arguments made a finite log ratio.
#[test]
fn kl_divergence_with_negative_entries_is_nan() {
    assert!(
        attention_math::kl_divergence(&[-7.0_f64], &[-5.0])
            .unwrap()
            .is_nan()
    );
    assert!(
        attention_math::kl_divergence(&[0.5_f32, -0.5], &[0.5, 0.5])
            .unwrap()
            .is_nan()
    );
    assert!(
        attention_math::kl_divergence(&[0.5_f32, 0.5], &[-0.5, 1.5])
            .unwrap()
            .is_nan()
    );
    assert_eq!(
        attention_math::kl_divergence(&[0.5_f64, 0.5], &[0.5, 0.5]).unwrap(),
        0.0
    );
}

/// Found by the fuzzer: with d = 0 every score is 0 and the output is the mean of V; values
/// near the float's maximum overflowed the kernel's unnormalised accumulator (inf), though
/// the mean itself is finite. Such rows are recomputed with normalised weights.
#[test]
fn values_near_the_maximum_do_not_overflow_the_accumulator() {
    use attention_math::{AttentionOptions, scaled_attention_reference, scaled_attention_with};
    for n in [1, 14] {
        let q = DMatrix::<f64>::zeros(n, 0);
        let k = DMatrix::<f64>::zeros(9, 0);
        let v = DMatrix::<f64>::from_fn(9, 3, |i, j| if i < 5 { f64::MAX } else { -(j as f64) });
        let opts = AttentionOptions::new();
        let fast = scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap();
        let want = scaled_attention_reference(&q, &k, &v, &Mask::none(), &opts).unwrap();
        assert!(
            fast.output.iter().all(|x| x.is_finite()),
            "n = {n}: {}",
            fast.output
        );
        assert!((&fast.output - &want.output).amax() <= 1e-15 * f64::MAX);
    }
}

/// Found by the fuzzer: finite Q whose dot products overflow part-way (`+inf − inf = NaN`)
/// gave NaN weights on the reference path and in the diagnostics, and on the kernel path a −inf
/// that passed for a mask. The reference scales dot products by powers of two first, and the
/// kernel recomputes such rows that way: the true scores, never NaN.
#[test]
fn overflowing_dot_products_are_not_nan() {
    use attention_math::{AttentionOptions, scaled_attention_reference, scaled_attention_with};
    let q = DMatrix::<f32>::from_row_slice(2, 3, &[3e38, -3e38, 1.0, 3e38, -3e38, 3e38]);
    let k = DMatrix::<f32>::from_row_slice(3, 3, &[-7.0, -7.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
    let v = DMatrix::<f32>::from_row_slice(3, 1, &[1.0, 2.0, 3.0]);
    let opts = AttentionOptions::new();
    let r = scaled_attention_reference(
        &q,
        &k,
        &v,
        &Mask::none(),
        &opts.clone().return_weights(true),
    )
    .unwrap();
    let f = scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap();
    // Row 0: q·k₀ = −21e38 + 21e38 + 1 = 1 exactly in real arithmetic; q·k₁ = 0; q·k₂ = 1.
    let w = r.weights.unwrap();
    assert!(w.iter().all(|x| x.is_finite()), "{w}");
    let e = (1.0_f32 / 3f32.sqrt()).exp();
    let want0 = (e * 1.0 + 2.0 + e * 3.0) / (2.0 * e + 1.0);
    assert!((r.output[(0, 0)] - want0).abs() < 1e-5, "{}", r.output);
    assert_eq!(f.output, r.output);
    // Row 1: q·k₀ = q·k₂ = 3e38 (finite, the plain products overflow part-way), q·k₁ = 0:
    // half the weight on keys 0 and 2 each.
    assert_eq!(r.output[(1, 0)], 2.0);
}

/// A −inf bias masks its pair even where the dot product overflows to +inf (inf − inf was
/// NaN on every path: found by the `multihead` fuzz target), and a scale of 0 gives score 0
/// even for a dot product past the type's range (0 · inf was NaN: the `diagnostics` target).
#[test]
fn masking_bias_and_zero_scale_survive_overflowing_dots() {
    use attention_math::{Heads, multi_head_attention, scaled_attention_with};
    let x = 1e154_f64; // x · x · 2 = 2e308 overflows
    let (q, k) = (
        DMatrix::from_element(1, 2, x),
        DMatrix::from_element(3, 2, x),
    );
    let v = DMatrix::from_row_slice(3, 1, &[1.0, 2.0, 6.0]);
    let bias = DMatrix::from_row_slice(1, 3, &[f64::NEG_INFINITY, 0.0, f64::NEG_INFINITY]);
    let opts = AttentionOptions::new().bias(&bias);
    for out in [
        scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap(),
        scaled_attention_reference(&q, &k, &v, &Mask::none(), &opts).unwrap(),
    ] {
        // Only key 1 is left: its value, whatever its (infinite) score.
        assert_eq!(out.output[(0, 0)], 2.0);
    }
    let all = DMatrix::from_element(1, 3, f64::NEG_INFINITY);
    let masked = AttentionOptions::new().bias(&all);
    let mha = multi_head_attention(&q, &k, &v, Heads::grouped(1, 1), &Mask::none(), &masked);
    assert_eq!(mha.unwrap()[(0, 0)], 0.0);
    // scale 0: every score is 0, the output the mean of V.
    let zero = AttentionOptions::new().scale(0.0);
    for out in [
        scaled_attention_with(&q, &k, &v, &Mask::none(), &zero).unwrap(),
        scaled_attention_reference(&q, &k, &v, &Mask::none(), &zero).unwrap(),
    ] {
        assert!((out.output[(0, 0)] - 3.0).abs() < 1e-15, "{}", out.output);
        assert!((out.lse[0] - 3f64.ln()).abs() < 1e-15);
    }
}

/// Scores past the type's range on allowed keys are not a mask: one key gets all the weight
/// (its score −7e38 rounds to −inf in f32: found by the `attention` fuzz target), and of two
/// huge scores the larger wins, where rounding both to +inf would split the weight.
#[test]
fn scores_past_the_range_keep_their_order() {
    use attention_math::scaled_attention_with;
    let q = DMatrix::<f32>::from_row_slice(1, 2, &[-3.4028235e38, -1.4375]);
    let k = DMatrix::<f32>::from_row_slice(1, 2, &[-1.4375, -1.4375]);
    let v = DMatrix::<f32>::from_row_slice(1, 1, &[5.0]);
    let opts = AttentionOptions::new().scale(-1.4375).return_weights(true);
    let r = scaled_attention_reference(&q, &k, &v, &Mask::none(), &opts).unwrap();
    assert_eq!(r.weights.unwrap()[(0, 0)], 1.0);
    assert_eq!(r.output[(0, 0)], 5.0);
    assert_eq!(r.lse[0], f32::NEG_INFINITY); // the true lse, −7e38, is out of range
    let f = scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap();
    assert_eq!(f.output[(0, 0)], 5.0);
    // q · k₀ = 2e38 · 3 = 6e38 and q · k₁ = 2e38 · 2 = 4e38 (d = 1, scale 1): key 0 wins.
    let q = DMatrix::<f32>::from_element(1, 1, 2e38);
    let k = DMatrix::<f32>::from_row_slice(2, 1, &[3.0, 2.0]);
    let v = DMatrix::<f32>::from_row_slice(2, 1, &[1.0, -1.0]);
    let opts = AttentionOptions::new();
    let r = scaled_attention_reference(&q, &k, &v, &Mask::none(), &opts).unwrap();
    let f = scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap();
    assert_eq!(r.output[(0, 0)], 1.0);
    assert_eq!(f.output[(0, 0)], 1.0);
    assert_eq!(f.lse[0], f32::INFINITY);
}

/// A subnormal scale times a dot product past the range: the score is in range (713.8) and
/// must keep its bits. The scaled fallback multiplied the subnormal scale by the dot of the
/// rows brought into [−2, 2], which rounded to 2 bits: 704 on every path (found by the
/// `diagnostics` fuzz target); the kernel packed Q times `scale · log₂e`, itself subnormal
/// and rounded to 2 bits: 660.
#[test]
fn a_subnormal_scale_keeps_the_bits_of_an_overflowing_dot() {
    use attention_math::scaled_attention_with;
    use attention_math::sheet::diagnostics::diagnose;
    let q = DMatrix::<f32>::from_row_slice(1, 3, &[-6.375, -4.5625, -9.204457e27]);
    let k = DMatrix::<f32>::from_row_slice(2, 3, &[-1.8446743e19; 6]);
    let v = DMatrix::<f32>::from_row_slice(2, 1, &[1.0, 3.0]);
    let scale = 4e-45_f32; // 3 · 2^−149
    let exact: f64 = (0..3)
        .map(|c| f64::from(q[(0, c)]) * f64::from(k[(0, c)]))
        .sum::<f64>()
        * f64::from(scale);
    let lse = exact + 2f64.ln(); // two equal scores
    let opts = AttentionOptions::new().scale(scale);
    for out in [
        scaled_attention_reference(&q, &k, &v, &Mask::none(), &opts).unwrap(),
        scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap(),
    ] {
        assert!(
            (f64::from(out.lse[0]) - lse).abs() < 1e-6 * lse,
            "{} vs {lse}",
            out.lse[0]
        );
        assert_eq!(out.output[(0, 0)], 2.0);
    }
    // The decode path packs Q with the same factor.
    let heads = attention_math::Heads::grouped(1, 1);
    let mha = attention_math::multi_head_attention(&q, &k, &v, heads, &Mask::none(), &opts);
    assert_eq!(mha.unwrap()[(0, 0)], 2.0);
    let dg = diagnose(&q, &k, &Mask::none(), &opts).unwrap();
    assert!((f64::from(dg.max_logit[0]) - exact).abs() < 1e-4 * exact);
}

/// Weights that sum to 1 + ε times values at −f64::MAX: the output stays −MAX, not −inf, on
/// the reference and on the kernel's exact rows (found by the `attention` fuzz target).
#[test]
fn convex_combinations_of_extreme_values_do_not_overflow() {
    use attention_math::scaled_attention_with;
    let m = f64::MAX;
    // Row 0: scores 1.75, 9.5 and −2·MAX (past the range, so the row takes the exact path).
    let q = DMatrix::from_element(1, 1, 2.0);
    let k = DMatrix::from_row_slice(3, 1, &[0.875, 4.75, -m]);
    let v = DMatrix::from_row_slice(3, 1, &[-m, -m, 6.3125]);
    let opts = AttentionOptions::new();
    let r = scaled_attention_reference(&q, &k, &v, &Mask::none(), &opts).unwrap();
    let f = scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap();
    assert_eq!(r.output[(0, 0)], -m);
    assert_eq!(f.output[(0, 0)], -m);
}

/// A scale near f64::MAX makes every score past the range although each dot product is
/// moderate: three equal scores still share the weight (it was NaN: the `attention` target).
#[test]
fn a_huge_scale_keeps_equal_scores_equal() {
    use attention_math::scaled_attention_with;
    let q = DMatrix::from_element(1, 1, -6.625);
    let k = DMatrix::from_element(3, 1, 4.8125);
    let v = DMatrix::from_row_slice(3, 1, &[-7.0, 389120.0, -7.0]);
    let opts = AttentionOptions::new().scale(-f64::MAX);
    let want = (389120.0 - 14.0) / 3.0;
    for out in [
        scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap(),
        scaled_attention_reference(&q, &k, &v, &Mask::none(), &opts).unwrap(),
    ] {
        assert!(
            (out.output[(0, 0)] - want).abs() < 1e-9 * want,
            "{}",
            out.output
        );
        assert_eq!(out.lse[0], f64::INFINITY);
    }
}

/// `x A` past f32's range with B = 0: the LoRA update is exactly 0, so the output is `x W`
/// (it was NaN, inf · 0: the `lora` target).
#[test]
fn lora_forward_survives_an_overflowing_x_a() {
    let w = DMatrix::<f32>::from_fn(3, 2, |i, j| (i + 2 * j) as f32 - 2.0);
    let mut layer = LoraLinear::new(w.clone(), 2, -6.9375).unwrap();
    layer.a_mut()[(0, 0)] = -2.5654098e38;
    let x = DMatrix::<f32>::from_element(2, 3, -5.5625);
    let y = layer.forward(&x).unwrap();
    assert_eq!(y, &x * &w);
}

/// A huge entry in both q and k must not flush the small products to zero: the score is the
/// plain dot product wherever that is finite (the power-of-two scaled one gave 0 here: found
/// by the `diagnostics` target).
#[test]
fn tiny_products_beside_huge_entries_are_kept() {
    let q = DMatrix::from_row_slice(
        1,
        4,
        &[
            2.567347490188928e-289,
            -1.7044745290527055e289,
            2.567347490188928e-289,
            -6.75,
        ],
    );
    let k = DMatrix::from_row_slice(
        2,
        4,
        &[
            -1.7044745290527055e289,
            3.8153151459466e-311,
            -7.0,
            -7.0,
            0.0,
            0.0,
            0.0,
            0.0,
        ],
    );
    let v = DMatrix::from_row_slice(2, 1, &[1.0, 0.0]);
    let opts = AttentionOptions::new().return_weights(true);
    let r = scaled_attention_reference(&q, &k, &v, &Mask::none(), &opts).unwrap();
    // q · k₀ = −4.3758... + 47.25 (+ negligible terms) = 42.874, / √4.
    let s0: f64 = (2.567347490188928e-289 * -1.7044745290527055e289 + 47.25) / 2.0;
    let w0 = 1.0 / (1.0 + (-s0).exp());
    assert!((r.output[(0, 0)] - w0).abs() < 1e-15, "{}", r.output);
}

/// Scale 0 with q · k past the range: every score is 0, the weights uniform, and the tiled
/// backward's gradients finite (dQ was NaN, 0 · inf: found by the `backward` fuzz target).
#[test]
fn the_backward_survives_overflowing_dots_at_scale_zero() {
    use attention_math::{attention_backward, attention_backward_reference, scaled_attention_with};
    let q = DMatrix::from_row_slice(1, 2, &[-4.0, 1.3407807929942596e154]);
    let k = DMatrix::from_row_slice(2, 2, &[-1.25, 0.0, -5.375, f64::MAX]);
    let v = DMatrix::from_row_slice(2, 1, &[1.0, 3.0]);
    let opts = AttentionOptions::new().scale(0.0);
    let fwd = scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap();
    assert_eq!(fwd.output[(0, 0)], 2.0);
    let d_out = DMatrix::from_element(1, 1, 1.0);
    let g = attention_backward(&q, &k, &v, &Mask::none(), &opts, &fwd, &d_out).unwrap();
    let r = attention_backward_reference(&q, &k, &v, &Mask::none(), &opts, &d_out).unwrap();
    assert!(g.dq.iter().all(|x| x.is_finite()), "{}", g.dq);
    assert_eq!(g.dq, r.dq);
    assert_eq!(g.dv, r.dv);
}

/// The tiled forward pass scans Q, K and V as it packs them instead of before: the error is
/// still the one the up-front scan gives (the reference's), naming the first non-finite
/// entry of the first of q, k, v that has one, and a non-finite input still wins over a
/// later check that fails (a NaN scale, a bias of the wrong shape), while a shape error
/// found before the scan still wins over it. Single head and multi-head (positions in the
/// whole matrices), one and two threads, queries spanning several tiles.
#[test]
fn the_tiled_pass_reports_the_first_non_finite_input() {
    use attention_math::{Heads, multi_head_attention};
    let (n, m, d) = (131, 70, 8);
    let base = |rows: usize, cols: usize, s: usize| {
        DMatrix::<f32>::from_fn(rows, cols, |i, j| ((i * 31 + j * 7 + s) % 13) as f32 / 13.0)
    };
    let (q0, k0, v0) = (base(n, d, 1), base(m, d, 2), base(m, d, 3));
    let nonfinite = |e: &Error| match e {
        Error::NonFinite { arg, row, col } => Some((*arg, *row, *col)),
        _ => None,
    };
    for threads in [1, 2] {
        let opts = AttentionOptions::new().threads(threads);
        // (which input, row, col, value), then a second fault after it.
        let faults: [(usize, usize, usize, f32); 6] = [
            (0, 0, 0, f32::NAN),
            (0, n - 1, d - 1, f32::INFINITY),
            (0, 100, 3, f32::NEG_INFINITY),
            (1, m - 1, 0, f32::NAN),
            (2, 0, d - 1, f32::INFINITY),
            (2, 37, 5, f32::NAN),
        ];
        for &(which, i, j, x) in &faults {
            let (mut q, mut k, mut v) = (q0.clone(), k0.clone(), v0.clone());
            [&mut q, &mut k, &mut v][which][(i, j)] = x;
            // A later fault in a later input (or later in the same one) does not change it.
            if which < 2 {
                v[(m - 1, d - 1)] = f32::NAN;
            }
            let want = scaled_attention_reference(&q, &k, &v, &Mask::causal(), &opts).unwrap_err();
            let arg = ["q", "k", "v"][which];
            assert_eq!(nonfinite(&want), Some((arg, i, j)));
            let got = scaled_attention(&q, &k, &v, &Mask::causal()).unwrap_err();
            assert_eq!(nonfinite(&got), Some((arg, i, j)), "{arg} ({i}, {j})");
            let with = attention_math::scaled_attention_with(&q, &k, &v, &Mask::none(), &opts);
            assert_eq!(nonfinite(&with.unwrap_err()), Some((arg, i, j)));
            // Before a failing option check.
            let bad = opts.clone().scale(f32::NAN);
            let e = attention_math::scaled_attention_with(&q, &k, &v, &Mask::none(), &bad);
            assert_eq!(nonfinite(&e.unwrap_err()), Some((arg, i, j)));
            let bias = DMatrix::<f32>::zeros(n, m + 1);
            let e = attention_math::scaled_attention_with(
                &q,
                &k,
                &v,
                &Mask::none(),
                &opts.clone().bias(&bias),
            );
            assert_eq!(nonfinite(&e.unwrap_err()), Some((arg, i, j)));
            // After a shape error.
            let short = v.rows(0, m - 1).into_owned();
            let e = attention_math::scaled_attention_with(&q, &k, &short, &Mask::none(), &opts);
            assert!(matches!(e, Err(Error::DimensionMismatch { arg: "v", .. })));
        }
        // Multi-head, 4 query heads over 2 KV heads: positions in the whole matrices.
        let heads = Heads::grouped(4, 2);
        let (q0, k0, v0) = (base(n, 4 * d, 4), base(m, 2 * d, 5), base(m, 2 * d, 6));
        for &(which, i, j) in &[(0, 120, 3 * d + 2), (1, 5, d + 1), (2, m - 1, 2 * d - 1)] {
            let (mut q, mut k, mut v) = (q0.clone(), k0.clone(), v0.clone());
            [&mut q, &mut k, &mut v][which][(i, j)] = f32::NAN;
            let arg = ["q", "k", "v"][which];
            let e = multi_head_attention(&q, &k, &v, heads, &Mask::causal(), &opts).unwrap_err();
            assert_eq!(nonfinite(&e), Some((arg, i, j)), "{arg} ({i}, {j})");
            let bias = DMatrix::<f32>::zeros(1, 1);
            let bad = opts.clone().bias(&bias);
            let e = multi_head_attention(&q, &k, &v, heads, &Mask::causal(), &bad).unwrap_err();
            assert_eq!(
                nonfinite(&e),
                Some((arg, i, j)),
                "{arg} ({i}, {j}) with a bad bias"
            );
        }
        // All finite: the same answer as the reference.
        let out = multi_head_attention(&q0, &k0, &v0, heads, &Mask::causal(), &opts).unwrap();
        assert_eq!(out.shape(), (n, 4 * d));
        assert!(out.iter().all(|x| x.is_finite()));
    }
}
