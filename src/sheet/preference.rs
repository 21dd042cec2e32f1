//! Preference and policy losses for RLHF (seed question 6), built on log-sum-exp.
//!
//! RLHF runs in three stages: supervised fine-tuning (token cross-entropy), a reward model
//! trained on human preferences, and policy optimisation against it. The losses below are
//! the scalar cores of the last two, and of DPO, which skips the reward model:
//!
//! ```text
//! ln σ(x)      = −lse(0, −x)                                     stable for any finite x
//! reward model  L = −ln σ(r_chosen − r_rejected)                 (Bradley-Terry)
//! DPO           L = −ln σ(β [(π_c − π_ref,c) − (π_r − π_ref,r)])  π = sequence log-probability
//! PPO           L = −mean_t min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t),  ρ_t = exp(ln π_t − ln π_old,t)
//! ```
//!
//! Sequence log-probabilities are sums of per-token log-softmax values of the targets.

use crate::Float;
use crate::error::{Error, Result, check_positive};
use crate::softmax::logsumexp;

/// `ln σ(x) = −ln(1 + e^{−x})`, computed as `−lse(0, −x)`: exact for large |x| where the
/// direct formula overflows or rounds to 0.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::preference::log_sigmoid;
///
/// assert!((log_sigmoid(0.0_f64) + 2.0_f64.ln()).abs() < 1e-15);
/// assert_eq!(log_sigmoid(-1000.0_f64), -1000.0);
/// assert_eq!(log_sigmoid(1000.0_f32), 0.0);
/// ```
pub fn log_sigmoid<T: Float>(x: T) -> T {
    -logsumexp(&[T::zero(), -x])
}

/// Bradley-Terry reward-model loss `−ln σ(r_chosen − r_rejected)`: small when the chosen
/// answer out-scores the rejected one, `ln 2` when they tie.
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
    Ok(-log_sigmoid(beta * margin))
}

/// PPO's clipped surrogate loss over tokens: `−mean_t min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)`
/// with `ρ_t = exp(ln π_t − ln π_old,t)`.
///
/// # Errors
///
/// - [`Error::LengthMismatch`] if the three slices differ in length;
/// - [`Error::Empty`] if they are empty;
/// - [`Error::InvalidParameter`] unless `epsilon` is finite and > 0.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::preference::ppo_clipped_loss;
///
/// // The ratio e^1 ≈ 2.72 is clipped to 1.2 for a positive advantage.
/// let loss = ppo_clipped_loss(&[0.0_f64], &[-1.0], &[2.0], 0.2)?;
/// assert!((loss + 1.2 * 2.0).abs() < 1e-15);
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
    let (lo, hi) = (T::one() - epsilon, T::one() + epsilon);
    let total = (0..logp.len()).fold(T::zero(), |acc, t| {
        let ratio = (logp[t] - logp_old[t]).exp();
        let clipped = ratio.max(lo).min(hi);
        acc + (ratio * advantages[t]).min(clipped * advantages[t])
    });
    Ok(-total / T::of_usize(logp.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
