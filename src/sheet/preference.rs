//! Preference and policy losses for RLHF (seed question 6), built on log-sum-exp.
//!
//! RLHF runs in three stages: supervised fine-tuning (token cross-entropy), a reward model
//! trained on human preferences, and policy optimisation against it. The losses below are
//! the scalar cores of the last two, and of DPO, which skips the reward model:
//!
//! ```text
//! ln σ(x)      = −ln(1 + e^{−x})                                 log1p forms, any x
//! reward model  L = −ln σ(r_chosen − r_rejected)                 (Bradley-Terry)
//! DPO           L = −ln σ(β [(π_c − π_ref,c) − (π_r − π_ref,r)])  π = sequence log-probability
//! PPO           L = −mean_t min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t),  ρ_t = exp(ln π_t − ln π_old,t)
//! ```
//!
//! Sequence log-probabilities are sums of per-token log-softmax values of the targets.

use crate::Float;
use crate::error::{Error, Result, check_positive};

/// `ln σ(x) = −ln(1 + e^{−x})`, with full relative accuracy for every `x`.
///
/// Evaluated as `−ln_1p(e^{−x})` for `x >= 0` and as `x − ln_1p(e^{x})` for `x < 0`: the
/// exponential's argument is never positive, so nothing overflows, and `ln_1p` keeps the
/// far right tail (`ln σ(40) = −4.25e-18`, where `−ln(1 + e^{−40})` rounds to 0). Limits:
/// `ln σ(+inf) = 0`, `ln σ(−inf) = −inf`; NaN gives NaN.
///
/// Accuracy: a relative error of a few ε everywhere (`ln_1p` and `exp` are each within about
/// 1 ulp, and the one addition in the left tail adds terms of the same sign).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::preference::log_sigmoid;
///
/// assert!((log_sigmoid(0.0_f64) + 2.0_f64.ln()).abs() < 1e-15);
/// assert_eq!(log_sigmoid(-1000.0_f64), -1000.0);
/// assert_eq!(log_sigmoid(1000.0_f32), 0.0);
/// // The right tail keeps its relative accuracy: ln σ(x) ≈ −e^{−x}.
/// let x = 40.0_f64;
/// assert!((log_sigmoid(x) / -(-x).exp() - 1.0).abs() < 1e-15);
/// assert!(log_sigmoid(f64::NAN).is_nan());
/// ```
pub fn log_sigmoid<T: Float>(x: T) -> T {
    if x >= T::zero() {
        -(-x).exp().ln_1p()
    } else {
        // Also the NaN branch: NaN − anything is NaN.
        x - x.exp().ln_1p()
    }
}

/// Bradley-Terry reward-model loss `−ln σ(r_chosen − r_rejected)`: small when the chosen
/// answer out-scores the rejected one, `ln 2` when they tie.
///
/// Accuracy: that of [`log_sigmoid`] on the rounded difference. A difference that
/// overflows gives the limit (0 or `+inf`), which is the correctly rounded loss; NaN inputs,
/// or two infinities of the same sign, give NaN.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::preference::reward_model_loss;
///
/// assert!((reward_model_loss(1.0_f64, 1.0) - 2.0_f64.ln()).abs() < 1e-15);
/// assert!(reward_model_loss(5.0_f64, -5.0) < 1e-4);
/// ```
pub fn reward_model_loss<T: Float>(r_chosen: T, r_rejected: T) -> T {
    -log_sigmoid(r_chosen - r_rejected)
}

/// Sequence log-probabilities of one preference pair under the policy and the frozen
/// reference model, for [`dpo_loss`] (see there for an example).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairLogProbs<T: Float> {
    /// ln π(chosen | prompt) under the policy.
    pub policy_chosen: T,
    /// ln π(rejected | prompt) under the policy.
    pub policy_rejected: T,
    /// ln π_ref(chosen | prompt).
    pub reference_chosen: T,
    /// ln π_ref(rejected | prompt).
    pub reference_rejected: T,
}

/// Direct preference optimisation loss (Rafailov et al. 2023):
/// `−ln σ(β [(π_c − π_ref,c) − (π_r − π_ref,r)])`.
///
/// If the margin overflows although every log-probability is finite (values near the
/// type's maximum), it is recomputed from the quarters of the four values, which cannot
/// overflow, and `β · margin` from that: the result is then exact up to rounding instead of
/// NaN (`inf − inf`). Accuracy: that of [`log_sigmoid`] on the rounded `β · margin`.
///
/// # Errors
///
/// [`Error::InvalidParameter`] unless `beta` is finite and > 0; [`Error::NonFinite`] if a
/// log-probability is NaN or infinite.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::preference::{dpo_loss, PairLogProbs};
///
/// // The policy has not moved from the reference: the loss is ln 2.
/// let same = PairLogProbs { policy_chosen: -3.0_f64, policy_rejected: -4.0,
///                           reference_chosen: -3.0, reference_rejected: -4.0 };
/// assert!((dpo_loss(&same, 0.1)? - 2.0_f64.ln()).abs() < 1e-15);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn dpo_loss<T: Float>(pair: &PairLogProbs<T>, beta: T) -> Result<T> {
    check_positive("beta", beta)?;
    let values = [
        pair.policy_chosen,
        pair.policy_rejected,
        pair.reference_chosen,
        pair.reference_rejected,
    ];
    if let Some(col) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            arg: "pair",
            row: 0,
            col,
        });
    }
    let margin = (pair.policy_chosen - pair.reference_chosen)
        - (pair.policy_rejected - pair.reference_rejected);
    let z = if margin.is_finite() {
        beta * margin
    } else {
        // Each quarter difference is at most max/2 in size, their difference at most max.
        let quarter = T::of_f64(0.25);
        let m4 = (pair.policy_chosen * quarter - pair.reference_chosen * quarter)
            - (pair.policy_rejected * quarter - pair.reference_rejected * quarter);
        if m4 == T::zero() {
            T::zero()
        } else {
            (beta * m4) * T::of_f64(4.0)
        }
    };
    Ok(-log_sigmoid(z))
}

/// PPO's clipped surrogate loss over tokens: `−mean_t min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)`
/// with `ρ_t = exp(ln π_t − ln π_old,t)`.
///
/// Each term is evaluated as `min(ρ_t, 1+ε) A_t` for `A_t > 0` and `max(ρ_t, 1−ε) A_t` for
/// `A_t < 0` (the same function, with no `inf · 0`): a token with `A_t = 0` contributes
/// exactly 0 even when `ρ_t` overflows, and an overflowing `ρ_t` with a small negative
/// advantage is taken as `−exp(ln π_t − ln π_old,t + ln|A_t|)`, finite when the product is.
/// If the sum of the terms overflows while the mean does not, the mean is recomputed with
/// `A_t / n`. A term beyond the type's range gives the infinite loss it rounds to. With
/// `epsilon < 1` the result is never NaN for finite inputs; with `epsilon >= 1` and
/// advantages near the type's maximum, a positive and a negative term can both overflow and
/// the mean is NaN (its true value is outside the range either way).
///
/// Accuracy: a relative error of about `(|ln π_t − ln π_old,t| + 3) · ε` per term, and
/// `n · ε` relative to `Σ_t |term_t|` for the mean.
///
/// # Errors
///
/// - [`Error::LengthMismatch`] if the three slices differ in length;
/// - [`Error::Empty`] if they are empty;
/// - [`Error::InvalidParameter`] unless `epsilon` is finite and > 0;
/// - [`Error::NonFinite`] if an entry of `logp`, `logp_old` or `advantages` is NaN or
///   infinite (the error names the slice and the index, as `(0, t)`).
///
/// # Examples
///
/// ```
/// use attention_math::{Error, sheet::preference::ppo_clipped_loss};
///
/// // The ratio e^1 ≈ 2.72 is clipped to 1.2 for a positive advantage.
/// let loss = ppo_clipped_loss(&[0.0_f64], &[-1.0], &[2.0], 0.2)?;
/// assert!((loss + 1.2 * 2.0).abs() < 1e-15);
/// // A NaN log-probability is an error, never a finite loss.
/// let err = ppo_clipped_loss(&[f64::NAN], &[0.0], &[-1.0], 0.2).unwrap_err();
/// assert_eq!(err, Error::NonFinite { arg: "logp", row: 0, col: 0 });
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn ppo_clipped_loss<T: Float>(
    logp: &[T],
    logp_old: &[T],
    advantages: &[T],
    epsilon: T,
) -> Result<T> {
    check_positive("epsilon", epsilon)?;
    for (arg, len) in [
        ("logp_old", logp_old.len()),
        ("advantages", advantages.len()),
    ] {
        if len != logp.len() {
            return Err(Error::LengthMismatch {
                arg,
                found: len,
                expected: logp.len(),
            });
        }
    }
    if logp.is_empty() {
        return Err(Error::Empty { what: "logp" });
    }
    for (arg, values) in [
        ("logp", logp),
        ("logp_old", logp_old),
        ("advantages", advantages),
    ] {
        if let Some(col) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { arg, row: 0, col });
        }
    }
    let (lo, hi) = (T::one() - epsilon, T::one() + epsilon);
    // min(ρA, clip(ρ, lo, hi) A) is min(ρ, hi) A for A > 0 and max(ρ, lo) A for A < 0.
    // `scale` is 1, or 1/n when the plain sum overflows.
    let term = |t: usize, scale: T| {
        let a = advantages[t] * scale;
        if a == T::zero() {
            return T::zero(); // even when ρ overflows (inf · 0)
        }
        let d = logp[t] - logp_old[t];
        let ratio = d.exp();
        if a > T::zero() {
            ratio.min(hi) * a
        } else if ratio > lo {
            if ratio.is_finite() {
                ratio * a
            } else {
                // ρ overflowed; ρ |A| may not: e^{d + ln|A|}.
                -(d + (-a).ln()).exp()
            }
        } else {
            lo * a
        }
    };
    let n = T::of_usize(logp.len());
    let total = (0..logp.len()).fold(T::zero(), |acc, t| acc + term(t, T::one()));
    let mean = if total.is_finite() {
        total / n
    } else {
        // Each term scaled by 1/(2n): the positive ones are at most (1 + ε) |A| / (2n) with
        // ε < 1, so they sum below MAX and cannot meet a legitimately -inf term as inf − inf.
        let half = T::of_f64(0.5);
        let scale = half / n;
        (0..logp.len()).fold(T::zero(), |acc, t| acc + term(t, scale)) / half
    };
    Ok(-mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Terms near f32::MAX whose plain sum overflows, next to a term beyond the range: the
    /// loss is +inf (the -inf term dominates), not NaN (found by the `preference` fuzz target).
    #[test]
    fn ppo_overflowing_terms_give_inf_not_nan() {
        let max = f32::MAX;
        let logp = [max, max, max, max, 3.4375, max, max, max, max, max];
        let logp_old = [
            max, max, max, -3.6875, -5.0, -6.9375, -7.0, -7.0, -7.0, -5.0,
        ];
        let mut adv = [max; 10];
        adv[9] = -6.0;
        assert_eq!(
            ppo_clipped_loss(&logp, &logp_old, &adv, 0.2).unwrap(),
            f32::INFINITY
        );
    }

    #[test]
    fn log_sigmoid_matches_direct_formula_where_it_is_safe() {
        for x in [-30.0_f64, -2.0, -0.1, 0.0, 0.5, 3.0, 30.0] {
            let direct = (1.0 / (1.0 + (-x).exp())).ln();
            assert!((log_sigmoid(x) - direct).abs() < 1e-14 * (1.0 + direct.abs()));
        }
    }

    #[test]
    fn dpo_prefers_moving_towards_chosen() {
        let base = PairLogProbs {
            policy_chosen: -5.0_f64,
            policy_rejected: -5.0,
            reference_chosen: -5.0,
            reference_rejected: -5.0,
        };
        let better = PairLogProbs {
            policy_chosen: -4.0,
            ..base
        };
        assert!(dpo_loss(&better, 0.5).unwrap() < dpo_loss(&base, 0.5).unwrap());
        assert!(dpo_loss(&base, 0.0).is_err());
        let bad = PairLogProbs {
            reference_rejected: f64::NEG_INFINITY,
            ..base
        };
        assert_eq!(
            dpo_loss(&bad, 0.1).unwrap_err(),
            Error::NonFinite {
                arg: "pair",
                row: 0,
                col: 3
            }
        );
    }

    #[test]
    fn log_sigmoid_has_full_relative_accuracy_in_both_tails() {
        // ln σ(x) = −ln(1 + e^{−x}); for x > 0, −ln1p(e^{−x}) is the exact reference form,
        // and for large x it is −e^{−x}(1 − e^{−x}/2 + ...).
        for x in [20.0_f64, 37.0, 40.0, 100.0, 700.0] {
            let e = (-x).exp();
            let want = -(e - e * e / 2.0);
            assert!(
                (log_sigmoid(x) / want - 1.0).abs() < 4.0 * f64::EPSILON,
                "x = {x}"
            );
        }
        // Before: −lse(0, −x) rounded ln(1 + e^{−40}) to ln 1 = 0.
        assert!(log_sigmoid(40.0_f64) < 0.0);
        assert!(log_sigmoid(20.0_f32) < 0.0);
        assert!((log_sigmoid(20.0_f32) as f64 / -(-20.0_f64).exp() - 1.0).abs() < 1e-6);
        // Left tail: x − e^{x} + ..., relative accuracy as well.
        for x in [-1e-3_f64, -20.0, -40.0, -1e6] {
            let want = x - x.exp().ln_1p();
            assert!(
                (log_sigmoid(x) / want - 1.0).abs() < 2.0 * f64::EPSILON,
                "x = {x}"
            );
        }
        assert_eq!(log_sigmoid(f64::INFINITY), 0.0);
        assert_eq!(log_sigmoid(f64::NEG_INFINITY), f64::NEG_INFINITY);
        assert!(log_sigmoid(f32::NAN).is_nan());
        assert!(reward_model_loss(f64::NAN, 0.0).is_nan());
        assert!(reward_model_loss(f64::INFINITY, f64::INFINITY).is_nan());
        assert_eq!(reward_model_loss(3e38_f32, -3e38), 0.0);
    }

    #[test]
    fn dpo_margin_cannot_overflow_to_nan() {
        // True margin 0: the loss is ln 2, although both differences overflow.
        let pair = PairLogProbs {
            policy_chosen: 3e38_f32,
            policy_rejected: 3e38,
            reference_chosen: -3e38,
            reference_rejected: -3e38,
        };
        assert!((dpo_loss(&pair, 1.0).unwrap() - 2.0_f32.ln()).abs() < 1e-7);
        // True margin 12e38, β = 1e-38: z = 12, loss = ln(1 + e^{−12}).
        let pair = PairLogProbs {
            reference_chosen: -3e38,
            policy_rejected: -3e38,
            policy_chosen: 3e38_f32,
            reference_rejected: 3e38,
        };
        let want = (-12.0_f64).exp().ln_1p();
        let got = dpo_loss(&pair, 1e-38).unwrap() as f64;
        assert!((got / want - 1.0).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn ppo_never_swallows_nan_and_handles_overflowing_ratios() {
        // Before: the NaN ratio was clipped by max/min (which ignore NaN) into Ok(-0.8).
        for (logp, old, adv, arg) in [
            (f64::NAN, 0.0, -1.0, "logp"),
            (-1.0, f64::NAN, -1.0, "logp_old"),
            (-1.0, 0.0, f64::NAN, "advantages"),
            (f64::NEG_INFINITY, 0.0, 1.0, "logp"),
        ] {
            assert_eq!(
                ppo_clipped_loss(&[0.0, logp], &[0.0, old], &[1.0, adv], 0.2),
                Err(Error::NonFinite {
                    arg,
                    row: 0,
                    col: 1
                })
            );
        }
        // A zero advantage contributes 0 even when the ratio overflows to inf (inf · 0).
        let loss = ppo_clipped_loss(&[100.0_f32, 0.0], &[0.0, 0.0], &[0.0, 1.0], 0.2).unwrap();
        assert_eq!(loss, -0.5);
        // Overflowing ratio, positive advantage: the clipped term (1 + ε) A.
        let loss = ppo_clipped_loss(&[100.0_f32], &[0.0], &[2.0], 0.25).unwrap();
        assert_eq!(loss, -2.5);
        // ρ = e^100 overflows f32, ρ · A = -e^100 · 1e-38 = -2.7e5 does not.
        let a = -1e-38_f32;
        let loss = ppo_clipped_loss(&[100.0_f32], &[0.0], &[a], 0.2).unwrap() as f64;
        let want = 100.0_f64.exp() * -(a as f64);
        assert!((loss / want - 1.0).abs() < 1e-4, "{loss} vs {want}");
        // The sum overflows, the mean does not: each term is 1.2 · 3e38 > max / 2.
        let loss = ppo_clipped_loss(&[1.0_f32, 1.0], &[0.0, 0.0], &[2.5e38, 2.5e38], 0.2).unwrap();
        assert!(
            ((loss as f64) / (-1.2 * 2.5e38) - 1.0).abs() < 1e-6,
            "{loss}"
        );
    }

    #[test]
    fn ppo_clips_both_sides() {
        // Negative advantage with ratio below 1 − ε: the clipped (more pessimistic) term wins.
        let loss = ppo_clipped_loss(&[-1.0_f64], &[0.0], &[-1.0], 0.2).unwrap();
        assert!((loss - 0.8).abs() < 1e-15);
        // Inside the trust region nothing is clipped.
        let loss = ppo_clipped_loss(&[0.05_f64], &[0.0], &[1.0], 0.2).unwrap();
        assert!((loss + 0.05_f64.exp()).abs() < 1e-15);
        assert!(ppo_clipped_loss::<f64>(&[], &[], &[], 0.2).is_err());
        assert!(ppo_clipped_loss(&[0.0_f64], &[0.0, 1.0], &[1.0], 0.2).is_err());
    }
}
