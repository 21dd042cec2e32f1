//! Preference and policy losses for RLHF (seed question 6), built on log-sum-exp, with
//! their gradients.
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
//! KL penalty    mean_t k(r_t),  r_t = ln π_ref,t − ln π_t,  k ∈ {−r, r²/2, (e^r − 1) − r}
//! ```
//!
//! Sequence log-probabilities are sums of per-token log-softmax values of the targets
//! ([`token_log_probs`], [`sequence_log_prob`]). Every loss has a gradient with respect to
//! its inputs, checked against finite differences in the tests:
//!
//! ```text
//! reward model  ∂L/∂r_chosen = −σ(r_rejected − r_chosen) = −∂L/∂r_rejected
//! DPO           ∂L/∂π_c = −β σ(−z) = −∂L/∂π_r = −∂L/∂π_ref,c = ∂L/∂π_ref,r,   z = β · margin
//! PPO           ∂L/∂ln π_t = −ρ_t A_t / n where the unclipped term is the minimum, else 0
//! KL (k1/k2/k3) ∂mean/∂ln π_t = 1/n,  −r_t/n,  (1 − e^{r_t})/n
//! ```
//!
//! The formulas, their sources and the derivations of the gradients are collected in
//! `docs/rlhf-and-lora.md`.

use crate::Float;
use crate::error::{Error, Result, check_finite, check_positive, try_with_capacity};
use crate::prelude::*;
use crate::sheet::lm::Objective;
use crate::softmax::log_softmax_in_place;
use nalgebra::DMatrixView;

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

/// `σ(x) = 1 / (1 + e^{−x})`, evaluated as `1 / (1 + e^{−x})` for `x >= 0` and as
/// `e^{x} / (1 + e^{x})` for `x < 0`: the exponential's argument is never positive, so
/// nothing overflows and the left tail keeps its relative accuracy (`σ(−800) ≈ e^{−800}`
/// underflows only where the value itself does). `σ(±inf)` is 1 or 0; NaN gives NaN.
fn sigmoid<T: Float>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        // Also the NaN branch: NaN / anything is NaN.
        let e = x.exp();
        e / (T::one() + e)
    }
}

/// Per-token log-probabilities of chosen tokens: entry `i` is
/// `log_softmax(logits_i)[tokens[i]] = logits_i[tokens[i]] − lse(logits_i)`.
///
/// Shapes: `logits` is n x V (row `i` is one distribution over the vocabulary), `tokens` has
/// length n, and the result has length n. There is no shift here: row `i` is scored against
/// `tokens[i]`. For a language model, whose row `i` predicts token `i + 1`, pass the rows
/// and the *next* tokens, `token_log_probs(logits.rows(0, n − 1), &tokens[1..])`, or use
/// [`sequence_log_prob`], which does the shift and the prompt mask.
///
/// Each row goes through the crate's [`log_softmax`](crate::log_softmax) (the row maximum
/// subtracted first, `ln_1p` of the rest), so huge logits are fine (`1e30` in f32) and the
/// absolute error is at most about `(|s_t − max| + ln V + V) · ε`.
///
/// # Errors
///
/// Following [`cross_entropy`](crate::sheet::lm::cross_entropy)'s conventions:
///
/// - [`Error::LengthMismatch`] if `tokens` does not have length n;
/// - [`Error::NonFinite`] if `logits` holds NaN or an infinity;
/// - [`Error::IndexOutOfRange`] if a token is >= V.
///
/// # Examples
///
/// ```
/// use attention_math::{Error, sheet::preference::token_log_probs};
/// use nalgebra::dmatrix;
///
/// let logits = dmatrix![0.0_f64, 0.0; 1e30, 0.0];
/// let lp = token_log_probs(&logits, &[1, 0])?;
/// assert_eq!(lp, vec![-(2.0_f64.ln()), 0.0]); // a fair coin; a certain token
/// assert_eq!(token_log_probs(&logits, &[1, 1])?[1], -1e30); // finite, not -inf
/// let err = token_log_probs(&logits, &[0, 2]).unwrap_err();
/// assert_eq!(err, Error::IndexOutOfRange { arg: "tokens", position: 1, index: 2, bound: 2 });
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn token_log_probs<'a, T: Float>(
    logits: impl Into<DMatrixView<'a, T>>,
    tokens: &[usize],
) -> Result<Vec<T>> {
    let logits = logits.into();
    let (n, vocab) = logits.shape();
    if tokens.len() != n {
        return Err(Error::LengthMismatch {
            arg: "tokens",
            found: tokens.len(),
            expected: n,
        });
    }
    if n == 0 {
        // A 0 x V view may have any V: scan no columns and allocate no row for it.
        return Ok(Vec::new());
    }
    check_finite("logits", &logits)?;
    if let Some((position, &index)) = tokens.iter().enumerate().find(|(_, t)| **t >= vocab) {
        return Err(Error::IndexOutOfRange {
            arg: "tokens",
            position,
            index,
            bound: vocab,
        });
    }
    let mut out = try_with_capacity("the n token log-probabilities", n, 1)?;
    // n >= 1 rows of V entries exist, so one row fits in memory.
    let mut row = try_with_capacity("one row of logits", vocab, 1)?;
    for (i, &t) in tokens.iter().enumerate() {
        row.clear();
        row.extend(logits.row(i).iter().copied());
        log_softmax_in_place(&mut row);
        out.push(row[t]);
    }
    Ok(out)
}

/// The log-probability of a sequence's scored tokens under a language model:
///
/// ```text
/// ln π(t_p .. t_{n−1} | t_0 .. t_{p−1}) = Σ_{i scored} log_softmax(logits_i)[t_{i+1}]
/// ```
///
/// with the scored positions `i` those of `objective`, `max(p, 1) − 1 <= i <= n − 2`
/// ([`Objective::scored_positions`]). It is exactly minus the `sum` of
/// [`Objective::loss`], so the alignment is `lm`'s: `logits` is n x V and row `i` is the
/// model's prediction after reading `t_0 .. t_i`; `tokens` is the raw sequence of length n
/// (the ids the model read), and row `i` is scored against the *next* token `tokens[i + 1]`.
/// The last row predicts nothing, and with a prompt of `p >= 1` tokens the first scored row
/// is `p − 1` (the last prompt token predicts the first answer token `t_p`).
///
/// For DPO, run the policy and the reference on `prompt ++ chosen` and `prompt ++ rejected`
/// and take this with [`Objective::PromptMasked`]`{ prompt_len }` for the four values of a
/// [`PairLogProbs`]. Nothing scored (`p >= n`) gives 0, the log-probability of an empty
/// answer.
///
/// Accuracy: that of [`cross_entropy`](crate::sheet::lm::cross_entropy)'s sum.
///
/// # Errors
///
/// Those of [`Objective::loss`]: [`Error::LengthMismatch`] if `tokens` does not have length
/// n, [`Error::NonFinite`] if `logits` holds NaN or an infinity, [`Error::IndexOutOfRange`]
/// if a scored position's target `tokens[i + 1]` is >= V, [`Error::TooLarge`] if the loss
/// mask cannot be allocated.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::lm::Objective;
/// use attention_math::sheet::preference::{sequence_log_prob, token_log_probs};
/// use nalgebra::DMatrix;
///
/// // Prompt [0, 1], answer [2, 0]; a vocabulary of 3.
/// let logits = DMatrix::<f64>::from_fn(4, 3, |i, j| ((3 * i + j) as f64).sin());
/// let tokens = [0, 1, 2, 0];
/// let objective = Objective::PromptMasked { prompt_len: 2 };
/// let lp = sequence_log_prob(&logits, &tokens, &objective)?;
/// // Rows 1 and 2 (the last prompt token and the first answer token) predict tokens 2 and 3.
/// let per_token = token_log_probs(logits.rows(1, 2), &tokens[2..])?;
/// assert_eq!(lp, per_token[0] + per_token[1]);
/// assert_eq!(sequence_log_prob(&logits, &tokens, &Objective::PromptMasked { prompt_len: 4 })?, 0.0);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn sequence_log_prob<'a, T: Float>(
    logits: impl Into<DMatrixView<'a, T>>,
    tokens: &[usize],
    objective: &Objective,
) -> Result<T> {
    // 0 − sum: minus the sum, and +0 (not −0) when nothing is scored.
    Ok(T::zero() - objective.loss(logits, tokens)?.sum)
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

/// The gradient of [`reward_model_loss`] with respect to its two rewards,
/// `(∂L/∂r_chosen, ∂L/∂r_rejected)`:
///
/// ```text
/// L = −ln σ(d),  d = r_chosen − r_rejected
/// ∂L/∂r_chosen = −σ(−d),   ∂L/∂r_rejected = +σ(−d)
/// ```
///
/// `σ(−d) = σ(r_rejected − r_chosen)` is evaluated in the form that never overflows
/// (`1 / (1 + e^{−x})` for `x >= 0`, `e^{x} / (1 + e^{x})` otherwise), so both entries lie in
/// `[−1, 1]` with a relative error of a few ε. A difference that overflows gives the limit
/// (`(−0, 0)` or `(−1, 1)`); NaN inputs, or two infinities of the same sign, give NaN (as in
/// [`reward_model_loss`]).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::preference::reward_model_loss_grad;
///
/// // A tie: σ(0) = 1/2.
/// assert_eq!(reward_model_loss_grad(1.0_f64, 1.0), (-0.5, 0.5));
/// // Far ahead: the gradient vanishes like e^{−d}.
/// let (gc, gr) = reward_model_loss_grad(30.0_f64, 0.0);
/// assert!((gc / -(-30.0_f64).exp() - 1.0).abs() < 1e-12 && gr == -gc);
/// assert!(reward_model_loss_grad(f64::NAN, 0.0).0.is_nan());
/// ```
pub fn reward_model_loss_grad<T: Float>(r_chosen: T, r_rejected: T) -> (T, T) {
    let g = sigmoid(r_rejected - r_chosen);
    (-g, g)
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
    Ok(-log_sigmoid(dpo_logit(pair, beta)?))
}

/// The argument `z = β · margin` of DPO's log-sigmoid, with the arguments checked; shared by
/// [`dpo_loss`] and [`dpo_loss_grad`] so that the two see the same `z`.
fn dpo_logit<T: Float>(pair: &PairLogProbs<T>, beta: T) -> Result<T> {
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
    Ok(if margin.is_finite() {
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
    })
}

/// The gradient of [`dpo_loss`] with respect to each of the four log-probabilities, returned
/// in a [`PairLogProbs`] (each field holds `∂L/∂` that field):
///
/// ```text
/// z = β [(π_c − π_ref,c) − (π_r − π_ref,r)],   L = −ln σ(z),   g = β σ(−z)
/// ∂L/∂π_c = −g    ∂L/∂π_r = +g    ∂L/∂π_ref,c = +g    ∂L/∂π_ref,r = −g
/// ```
///
/// `z` is computed exactly as [`dpo_loss`] computes it (including the recomputation of an
/// overflowing margin from quarters), and `σ(−z)` in the form that never overflows
/// (`1 / (1 + e^{z})` for `z >= 0`, `e^{−z} / (1 + e^{−z})` otherwise), so every entry is
/// finite, of magnitude at most β, with a relative error of a few ε. The reference model is
/// frozen in training; its two entries are given for completeness (and for the tests).
///
/// # Errors
///
/// Those of [`dpo_loss`]: [`Error::InvalidParameter`] unless `beta` is finite and > 0;
/// [`Error::NonFinite`] if a log-probability is NaN or infinite.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::preference::{dpo_loss_grad, PairLogProbs};
///
/// // At z = 0, σ(−z) = 1/2: each entry is ±β/2.
/// let same = PairLogProbs { policy_chosen: -3.0_f64, policy_rejected: -4.0,
///                           reference_chosen: -3.0, reference_rejected: -4.0 };
/// let g = dpo_loss_grad(&same, 0.1)?;
/// assert_eq!(g, PairLogProbs { policy_chosen: -0.05, policy_rejected: 0.05,
///                              reference_chosen: 0.05, reference_rejected: -0.05 });
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn dpo_loss_grad<T: Float>(pair: &PairLogProbs<T>, beta: T) -> Result<PairLogProbs<T>> {
    let g = beta * sigmoid(-dpo_logit(pair, beta)?);
    Ok(PairLogProbs {
        policy_chosen: -g,
        policy_rejected: g,
        reference_chosen: g,
        reference_rejected: -g,
    })
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
    check_ppo(logp, logp_old, advantages, epsilon)?;
    let (lo, hi) = (T::one() - epsilon, T::one() + epsilon);
    // min(ρA, clip(ρ, lo, hi) A) is min(ρ, hi) A for A > 0 and max(ρ, lo) A for A < 0.
    // `scale` is 1, or 1/(2n) when the plain sum overflows.
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
    // Scaled by 1/(2n), the positive terms are at most (1 + ε) |A| / (2n) with ε < 1: they sum
    // below MAX and cannot meet a legitimately -inf term as inf − inf.
    Ok(-mean_with_fallback(logp.len(), |t| term(t, T::one()), term))
}

/// The gradient of [`ppo_clipped_loss`] with respect to `logp` (the policy's log-probability
/// of each sampled token; `logp_old` and the advantages are constants), length n:
///
/// ```text
/// ∂L/∂ln π_t = −ρ_t A_t / n   if A_t > 0 and ρ_t <= 1+ε,  or A_t < 0 and ρ_t >= 1−ε
///            = 0              otherwise (the clipped term is the minimum: no gradient)
/// ```
///
/// since `∂ρ_t/∂ln π_t = ρ_t`. At the kinks `ρ_t = 1 ± ε` the two branches of the minimum
/// are equal; the value there is the one PyTorch's autograd gives for
/// `-torch.min(ratio * A, torch.clamp(ratio, 1 - eps, 1 + eps) * A).mean()`:
/// `torch.minimum` splits the gradient of a tie evenly between its arguments and `clamp`
/// passes the gradient at its bounds (subgradient 1), so both halves carry `ρ_t A_t` and the
/// gradient is the unclipped one. A token with `A_t = 0` has gradient 0, even when `ρ_t`
/// overflows (as its loss term is 0). The branch is chosen by comparing `ρ_t` with the
/// bounds, as [`ppo_clipped_loss`] does; PyTorch compares the rounded products
/// `ρ_t A_t` and `clip(ρ_t) A_t`, which can tie (and halve the gradient) where `ρ_t` is
/// within rounding of a bound.
///
/// Overflow is handled as in the loss: `ρ_t A_t / n` is evaluated as `(ρ_t A_t) / n`, or as
/// `ρ_t (A_t / n)` if the product overflows, or as `e^{ln π_t − ln π_old,t + ln|A_t| − ln n}`
/// if `ρ_t` itself overflows (a negative advantage), so an entry is finite whenever its exact
/// value is. Accuracy: a relative error of about `(|ln π_t − ln π_old,t| + 3) · ε` per entry.
///
/// # Errors
///
/// Those of [`ppo_clipped_loss`]: [`Error::LengthMismatch`], [`Error::Empty`],
/// [`Error::InvalidParameter`] (`epsilon` not finite and > 0) and [`Error::NonFinite`].
///
/// # Examples
///
/// ```
/// use attention_math::sheet::preference::ppo_clipped_loss_grad;
///
/// // Token 0: ρ = e^1 > 1.2 with A > 0, clipped: no gradient. Token 1: ρ = 1, inside the
/// // trust region: −ρ A / n = −(1 · −3) / 2 = 1.5.
/// let g = ppo_clipped_loss_grad(&[0.0_f64, 0.0], &[-1.0, 0.0], &[2.0, -3.0], 0.2)?;
/// assert_eq!(g, vec![0.0, 1.5]);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn ppo_clipped_loss_grad<T: Float>(
    logp: &[T],
    logp_old: &[T],
    advantages: &[T],
    epsilon: T,
) -> Result<Vec<T>> {
    check_ppo(logp, logp_old, advantages, epsilon)?;
    let (lo, hi) = (T::one() - epsilon, T::one() + epsilon);
    let n = T::of_usize(logp.len());
    let grad = |t: usize| {
        let a = advantages[t];
        if a == T::zero() {
            return T::zero(); // even when ρ overflows (inf · 0), as in the loss
        }
        let d = logp[t] - logp_old[t];
        let ratio = d.exp();
        // The unclipped term ρA is the minimum, or ties with the clipped one at the bound.
        let unclipped = if a > T::zero() {
            ratio <= hi
        } else {
            ratio >= lo
        };
        if !unclipped {
            return T::zero();
        }
        let product = ratio * a;
        if product.is_finite() {
            -(product / n)
        } else if ratio.is_finite() {
            // |ρ A| > MAX needs |A| >= 1, so A / n is a normal number.
            -(ratio * (a / n))
        } else {
            // ρ overflowed, which only a negative advantage leaves unclipped:
            // −ρ A / n = e^{d + ln|A| − ln n}.
            (d + (-a).ln() - n.ln()).exp()
        }
    };
    Ok((0..logp.len()).map(grad).collect())
}

/// One of John Schulman's estimators of `KL(π ‖ π_ref)` from a token sampled from the
/// policy π ([Approximating KL Divergence](http://joschu.net/blog/kl-approx.html), 2020),
/// written in the token's log-ratio `r = ln π_ref(x) − ln π(x)`:
///
/// | estimator | value `k(r)` | `E_{x∼π}[k]` | sign | variance |
/// |---|---|---|---|---|
/// | [`K1`](KlEstimator::K1) | `−r` | `KL(π ‖ π_ref)`: unbiased | may be negative | high |
/// | [`K2`](KlEstimator::K2) | `r² / 2` | `KL` to second order in `π_ref − π`: biased | `>= 0` | low |
/// | [`K3`](KlEstimator::K3) | `(e^r − 1) − r` | `KL(π ‖ π_ref)`: unbiased | `>= 0` | low |
///
/// `k1` is the textbook estimator `ln π(x)/π_ref(x)`; its average is right but single
/// samples are negative half the time when π ≈ π_ref, so its variance is large relative to
/// the KL. `k2` is `f(e^r)` for the f-divergence with `f(u) = (ln u)²/2`, which agrees with
/// the KL to second order as π → π_ref: low variance, a bias of order `r³`. `k3` adds to
/// `k1` the control variate `e^r − 1`, of mean `Σ_x π_ref(x) − 1 = 0`; since `e^r >= 1 + r`
/// every sample is `>= 0` (the gap of the convex `e^r` above its tangent at 0). Both means
/// need π_ref's support inside π's; if π_ref gives mass where π gives none, `E[k3]` is below
/// the KL by that mass. This is the penalty `β · KL` of RLHF's reward (Ouyang et al. 2022
/// subtract `β ln(π/π_ref)`: `k1` summed over the answer's tokens) and of GRPO's loss (Shao
/// et al. 2024, with `k3`).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::preference::KlEstimator;
///
/// // A sample the reference likes more than the policy does (r = ln 2 > 0): k1 is
/// // negative, k2 and k3 are not.
/// let r = 2.0_f64.ln();
/// assert!(KlEstimator::K1.estimate(r) < 0.0);
/// assert!((KlEstimator::K2.estimate(r) - r * r / 2.0).abs() < 1e-16);
/// assert!((KlEstimator::K3.estimate(r) - (1.0 - r)).abs() < 1e-15);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KlEstimator {
    /// `k1 = −r = ln π − ln π_ref`: unbiased, may be negative, high variance.
    K1,
    /// `k2 = r² / 2`: biased (exact to second order in r), never negative, low variance.
    K2,
    /// `k3 = (e^r − 1) − r`: unbiased, never negative, low variance.
    K3,
}

impl KlEstimator {
    /// The estimator's value for one sampled token, from its log-ratio
    /// `r = ln π_ref − ln π`: `−r`, `r²/2` or `(e^r − 1) − r`.
    ///
    /// `k3` is summed as its Taylor series `Σ_{k>=2} r^k / k!` for `|r| <= 1/2` (where
    /// `expm1(r) − r` would lose `log2(2/|r|)` bits to cancellation: all of them below
    /// `|r| ≈ 1e-16`) and as `expm1(r) − r` beyond, so it has a relative error of at most
    /// about 10 ε everywhere (2 ε inside). `k2` is `(r/2) · r`, one rounding. Infinities
    /// give the limits (`k3(−inf) = k3(+inf) = +inf`, `k1(±inf) = ∓inf`, `k2 = +inf`); NaN
    /// gives NaN.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::preference::KlEstimator;
    ///
    /// // Near r = 0, k3 ≈ r²/2 + r³/6 with full relative accuracy.
    /// let r = 1e-9_f64;
    /// let k3 = KlEstimator::K3.estimate(r);
    /// assert!((k3 / (r * r / 2.0 * (1.0 + r / 3.0)) - 1.0).abs() < 1e-15);
    /// assert_eq!(KlEstimator::K3.estimate(f64::INFINITY), f64::INFINITY);
    /// assert_eq!(KlEstimator::K1.estimate(0.25_f32), -0.25);
    /// assert!(KlEstimator::K2.estimate(f64::NAN).is_nan());
    /// ```
    pub fn estimate<T: Float>(self, log_ratio: T) -> T {
        let r = log_ratio;
        match self {
            KlEstimator::K1 => -r,
            KlEstimator::K2 => (r * T::of_f64(0.5)) * r,
            KlEstimator::K3 => k3(r),
        }
    }

    /// `k(r) · s` for a scale `0 < s <= 1/2`, with `r = logp_ref − logp`, computed without
    /// overflowing where the product is finite: the terms of [`kl_penalty`]'s mean when
    /// their plain sum overflows.
    fn scaled<T: Float>(self, logp: T, logp_ref: T, s: T) -> T {
        let half = T::of_f64(0.5);
        let r = logp_ref - logp;
        // r / 2, finite even when r overflowed.
        let r_half = logp_ref * half - logp * half;
        match self {
            KlEstimator::K1 => -(r_half * (s + s)),
            // r² s / 2 = (r/2)² · 2s.
            KlEstimator::K2 => {
                let rc = r_half * (s + s).sqrt();
                rc * rc
            }
            KlEstimator::K3 => {
                let k = k3(r);
                if k.is_finite() {
                    k * s
                } else if r == T::INFINITY {
                    T::INFINITY // e^r · s with r > MAX
                } else if r > T::zero() {
                    // e^r overflowed: (e^r − 1 − r) s = e^{r + ln s} − (1 + r) s.
                    (r + s.ln()).exp() - (T::one() + r) * s
                } else {
                    // r = −inf from an overflowing difference: e^r = 0, k3 = −1 − r.
                    -s - r_half * (s + s)
                }
            }
        }
    }
}

/// `(e^r − 1) − r`, by its series near 0 and by `expm1` elsewhere; see
/// [`KlEstimator::estimate`].
fn k3<T: Float>(r: T) -> T {
    let half = T::of_f64(0.5);
    if r.abs() <= half {
        // Σ_{k>=2} r^k / k!: each term at most |r|/(k+1) <= 1/6 of the one before.
        let mut term = (r * r) * half;
        let mut sum = term;
        for k in 3..40 {
            term = term * r / T::of_usize(k);
            let next = sum + term;
            if next == sum {
                break;
            }
            sum = next;
        }
        sum
    } else if r == T::INFINITY {
        T::INFINITY // expm1(inf) − inf would be NaN
    } else {
        // Also NaN (NaN − NaN) and −inf (−1 + inf).
        r.exp_m1() - r
    }
}

/// Checks the arguments of the KL penalties: `logp_ref` as long as `logp`, both finite.
fn check_kl<T: Float>(logp: &[T], logp_ref: &[T]) -> Result<()> {
    if logp_ref.len() != logp.len() {
        return Err(Error::LengthMismatch {
            arg: "logp_ref",
            found: logp_ref.len(),
            expected: logp.len(),
        });
    }
    check_finite_slices(&[("logp", logp), ("logp_ref", logp_ref)])
}

/// Per-token KL penalties `k(r_t)`, `r_t = logp_ref[t] − logp[t]`, for tokens sampled from
/// the policy: `logp[t] = ln π(x_t | x_<t)` and `logp_ref[t] = ln π_ref(x_t | x_<t)` (from
/// [`token_log_probs`], say). See [`KlEstimator`] for the estimators and their properties,
/// and [`KlEstimator::estimate`] for the accuracy. Length n; empty in, empty out.
///
/// # Errors
///
/// - [`Error::LengthMismatch`] if `logp_ref` is not as long as `logp`;
/// - [`Error::NonFinite`] if an entry of `logp` or `logp_ref` is NaN or infinite (the error
///   names the slice and the index, as `(0, t)`).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::preference::{kl_penalty_per_token, KlEstimator};
///
/// let logp = [-1.0_f64, -2.0];
/// let logp_ref = [-1.5, -1.0];
/// assert_eq!(kl_penalty_per_token(&logp, &logp_ref, KlEstimator::K1)?, vec![0.5, -1.0]);
/// let k3 = kl_penalty_per_token(&logp, &logp_ref, KlEstimator::K3)?;
/// assert!(k3.iter().all(|k| *k >= 0.0));
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn kl_penalty_per_token<T: Float>(
    logp: &[T],
    logp_ref: &[T],
    estimator: KlEstimator,
) -> Result<Vec<T>> {
    check_kl(logp, logp_ref)?;
    Ok(logp
        .iter()
        .zip(logp_ref)
        .map(|(&lp, &lr)| estimator.estimate(lr - lp))
        .collect())
}

/// The mean KL penalty over n sampled tokens, `(1/n) Σ_t k(r_t)` with
/// `r_t = logp_ref[t] − logp[t]`: an estimate of the per-token `KL(π ‖ π_ref)` (unbiased
/// for [`K1`](KlEstimator::K1) and [`K3`](KlEstimator::K3)). Arguments as in
/// [`kl_penalty_per_token`].
///
/// If the sum of the terms overflows, the mean is recomputed from terms scaled by `1/(2n)`
/// (each evaluated so that it overflows only if it exceeds the range itself: `r/2` from the
/// halves of the inputs, `e^{r + ln s}` for `k3`), so the result is finite whenever the mean
/// is, and never NaN for finite inputs. Accuracy: that of each term, plus `n · ε` relative to
/// `Σ_t |k(r_t)|` for the sum.
///
/// # Errors
///
/// Those of [`kl_penalty_per_token`], and [`Error::Empty`] if the slices are empty.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::preference::{kl_penalty, KlEstimator};
///
/// // π = (0.3, 0.7) and π_ref = (0.6, 0.4): weighting the two tokens 3 : 7 (ten samples),
/// // the k1 and k3 means are exactly KL(π ‖ π_ref).
/// let (p, q) = ([0.3_f64, 0.7], [0.6_f64, 0.4]);
/// let kl = p[0] * (p[0] / q[0]).ln() + p[1] * (p[1] / q[1]).ln();
/// let token = |t: usize| usize::from(t >= 3);
/// let logp: Vec<f64> = (0..10).map(|t| p[token(t)].ln()).collect();
/// let logp_ref: Vec<f64> = (0..10).map(|t| q[token(t)].ln()).collect();
/// for estimator in [KlEstimator::K1, KlEstimator::K3] {
///     assert!((kl_penalty(&logp, &logp_ref, estimator)? - kl).abs() < 1e-14);
/// }
/// assert!(kl_penalty::<f64>(&[], &[], KlEstimator::K3).is_err());
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn kl_penalty<T: Float>(logp: &[T], logp_ref: &[T], estimator: KlEstimator) -> Result<T> {
    check_kl(logp, logp_ref)?;
    if logp.is_empty() {
        return Err(Error::Empty { what: "logp" });
    }
    Ok(mean_with_fallback(
        logp.len(),
        |t| estimator.estimate(logp_ref[t] - logp[t]),
        |t, scale| estimator.scaled(logp[t], logp_ref[t], scale),
    ))
}

/// The mean `(1/n) Σ_t plain(t)` of `n > 0` terms; if their sum overflows, `2 Σ_t scaled(t,
/// 1/(2n))` instead, from terms that `scaled` multiplies by the given scale before anything
/// can overflow (so a sum of terms near MAX is not lost, nor turned into inf − inf = NaN).
fn mean_with_fallback<T: Float>(
    n: usize,
    plain: impl Fn(usize) -> T,
    scaled: impl Fn(usize, T) -> T,
) -> T {
    let count = T::of_usize(n);
    let total = (0..n).fold(T::zero(), |acc, t| acc + plain(t));
    if total.is_finite() {
        return total / count;
    }
    let half = T::of_f64(0.5);
    let scale = half / count;
    (0..n).fold(T::zero(), |acc, t| acc + scaled(t, scale)) / half
}

/// The gradient of [`kl_penalty`] with respect to `logp` (the samples, and `logp_ref`, held
/// fixed: what autograd gives for the mean penalty as a loss term), length n:
///
/// ```text
/// ∂/∂ln π_t (1/n) Σ_s k(r_s) = −k'(r_t) / n,   r_t = ln π_ref,t − ln π_t
/// k1: 1/n      k2: −r_t / n      k3: (1 − e^{r_t}) / n = −expm1(r_t) / n
/// ```
///
/// In expectation over tokens sampled from π (with `∇ ln π` the score), these gradients are
/// those of different objectives: `E[∇ ln π] = 0`, so `k1` as a loss pushes nothing on
/// average; `E[−r ∇ ln π] = ∇ KL(π ‖ π_ref)`, so `k2`'s gradient is the reverse KL's; and
/// `E[(1 − e^r) ∇ ln π] = −Σ_x π_ref ∇ ln π = ∇ KL(π_ref ‖ π)`, so `k3`'s is the forward
/// KL's. (A test checks all three on a categorical distribution.)
///
/// Entries are finite whenever their exact values are: `r_t / n` from the halves of the
/// inputs when `r_t` overflows, and `e^{r_t − ln n}` when `expm1(r_t)` does. Accuracy: a
/// relative error of a few ε (`k3`: about `(|r_t| + ln n) · ε` past the overflow of `e^r`).
///
/// # Errors
///
/// Those of [`kl_penalty`].
///
/// # Examples
///
/// ```
/// use attention_math::sheet::preference::{kl_penalty_grad, KlEstimator};
///
/// let (logp, logp_ref) = ([-1.0_f64, -2.0], [-1.5, -1.0]); // r = (−0.5, 1)
/// assert_eq!(kl_penalty_grad(&logp, &logp_ref, KlEstimator::K1)?, vec![0.5, 0.5]);
/// assert_eq!(kl_penalty_grad(&logp, &logp_ref, KlEstimator::K2)?, vec![0.25, -0.5]);
/// let g = kl_penalty_grad(&logp, &logp_ref, KlEstimator::K3)?;
/// assert!((g[1] - (1.0 - 1.0_f64.exp()) / 2.0).abs() < 1e-15);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn kl_penalty_grad<T: Float>(
    logp: &[T],
    logp_ref: &[T],
    estimator: KlEstimator,
) -> Result<Vec<T>> {
    check_kl(logp, logp_ref)?;
    if logp.is_empty() {
        return Err(Error::Empty { what: "logp" });
    }
    let n = T::of_usize(logp.len());
    let half = T::of_f64(0.5);
    let grad = |(&lp, &lr): (&T, &T)| {
        let r = lr - lp;
        match estimator {
            KlEstimator::K1 => T::one() / n,
            KlEstimator::K2 if r.is_finite() => -(r / n),
            // r overflowed: r / n = 2 (r/2) / n.
            KlEstimator::K2 => -((lr * half - lp * half) / n) * T::of_f64(2.0),
            KlEstimator::K3 => {
                let e = r.exp_m1();
                if e.is_finite() {
                    -(e / n)
                } else {
                    // e^r > MAX: (e^r − 1) / n rounds to e^{r − ln n}.
                    -(r - n.ln()).exp()
                }
            }
        }
    };
    Ok(logp.iter().zip(logp_ref).map(grad).collect())
}

/// Checks the arguments of [`ppo_clipped_loss`] and [`ppo_clipped_loss_grad`].
fn check_ppo<T: Float>(logp: &[T], logp_old: &[T], advantages: &[T], epsilon: T) -> Result<()> {
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
    check_finite_slices(&[
        ("logp", logp),
        ("logp_old", logp_old),
        ("advantages", advantages),
    ])
}

/// The first NaN or infinite entry of the named slices, as [`Error::NonFinite`] at `(0, t)`.
fn check_finite_slices<T: Float>(slices: &[(&'static str, &[T])]) -> Result<()> {
    for &(arg, values) in slices {
        if let Some(col) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { arg, row: 0, col });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::DMatrix;

    /// Central difference of `f` at `x`, step `h`.
    fn central(f: impl Fn(f64) -> f64, x: f64, h: f64) -> f64 {
        (f(x + h) - f(x - h)) / (2.0 * h)
    }

    /// `analytic` agrees with `numeric` to a relative 1e-6 (absolute 1e-9 near zero).
    fn assert_grad(analytic: f64, numeric: f64, what: &str) {
        let tol = 1e-6 * analytic.abs().max(numeric.abs()).max(1e-3);
        assert!(
            (analytic - numeric).abs() <= tol,
            "{what}: analytic {analytic:e} vs finite difference {numeric:e}"
        );
    }

    const H: f64 = 1e-6;

    /// Deterministic values in [-scale, scale].
    fn fill(len: usize, seed: f64, scale: f64) -> Vec<f64> {
        (0..len)
            .map(|i| scale * ((i as f64 + 1.0) * 1.618 + seed).sin())
            .collect()
    }

    /// `ln softmax(row)[t]` the long way, in f64: `x_t − max − ln Σ exp(x_j − max)`.
    fn direct_log_prob(row: &[f64], t: usize) -> f64 {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|x| (x - max).exp()).sum();
        row[t] - max - sum.ln()
    }

    #[test]
    fn token_log_probs_match_a_direct_computation() {
        let (n, v) = (6, 7);
        let values = fill(n * v, 0.3, 4.0);
        let logits = DMatrix::from_row_slice(n, v, &values);
        let tokens = [3, 0, 6, 6, 1, 2];
        let got = token_log_probs(&logits, &tokens).unwrap();
        for i in 0..n {
            let row = &values[i * v..(i + 1) * v];
            // The textbook formula, safe at these magnitudes.
            let textbook = (row[tokens[i]].exp() / row.iter().map(|x| x.exp()).sum::<f64>()).ln();
            assert!((got[i] - textbook).abs() < 1e-14, "row {i}");
            assert!(got[i] < 0.0);
        }
        // Shifted by 1e4 the textbook formula overflows; the log-probabilities do not move
        // (beyond the rounding of the shifted logits).
        let shifted = logits.map(|x| x + 1e4);
        let got_shifted = token_log_probs(&shifted, &tokens).unwrap();
        for i in 0..n {
            let row: Vec<f64> = shifted.row(i).iter().copied().collect();
            assert!((got_shifted[i] - direct_log_prob(&row, tokens[i])).abs() < 1e-12);
            assert!((got_shifted[i] - got[i]).abs() < 1e-11);
        }
        // f32 with logits of 1e30: the runner-up is 1e30 nats below.
        let huge = DMatrix::from_row_slice(1, 3, &[1e30_f32, 0.0, -1e30]);
        assert_eq!(token_log_probs(&huge, &[0]).unwrap(), vec![0.0]);
        assert_eq!(token_log_probs(&huge, &[1]).unwrap(), vec![-1e30]);
        assert_eq!(token_log_probs(&huge, &[2]).unwrap(), vec![-2e30]);
    }

    #[test]
    fn token_log_probs_errors_and_empty_input() {
        let logits = DMatrix::<f64>::zeros(3, 4);
        assert_eq!(
            token_log_probs(&logits, &[0, 1]),
            Err(Error::LengthMismatch {
                arg: "tokens",
                found: 2,
                expected: 3
            })
        );
        assert_eq!(
            token_log_probs(&logits, &[0, 4, 1]),
            Err(Error::IndexOutOfRange {
                arg: "tokens",
                position: 1,
                index: 4,
                bound: 4
            })
        );
        let mut bad = logits.clone();
        bad[(2, 1)] = f64::NAN;
        assert_eq!(
            token_log_probs(&bad, &[0, 0, 0]),
            Err(Error::NonFinite {
                arg: "logits",
                row: 2,
                col: 1
            })
        );
        bad[(2, 1)] = f64::NEG_INFINITY;
        assert!(matches!(
            token_log_probs(&bad, &[0, 0, 0]),
            Err(Error::NonFinite { .. })
        ));
        // Empty: no rows gives no log-probabilities, whatever the vocabulary (no row is
        // allocated for a 0 x 2^40 view); a vocabulary of 0 has no valid token.
        let none = DMatrix::<f32>::zeros(0, 1 << 40);
        assert_eq!(token_log_probs(&none, &[]), Ok(vec![]));
        assert!(matches!(
            token_log_probs(&DMatrix::<f64>::zeros(2, 0), &[0, 0]),
            Err(Error::IndexOutOfRange { bound: 0, .. })
        ));
    }

    #[test]
    fn sequence_log_prob_scores_the_next_tokens_after_the_prompt() {
        let (n, v) = (7, 5);
        let values = fill(n * v, 1.1, 3.0);
        let logits = DMatrix::from_row_slice(n, v, &values);
        let tokens = [4, 1, 0, 3, 3, 2, 1];
        for objective in [
            Objective::Causal,
            Objective::PromptMasked { prompt_len: 3 },
            Objective::PrefixLm { prefix_len: 5 },
            Objective::PromptMasked { prompt_len: 1 },
            Objective::PromptMasked { prompt_len: 9 },
        ] {
            // Row i predicts token i + 1, for i from max(p, 1) − 1 to n − 2.
            let p = objective.condition_len();
            let want: f64 = (p.max(1) - 1..n - 1)
                .map(|i| direct_log_prob(&values[i * v..(i + 1) * v], tokens[i + 1]))
                .sum();
            let got = sequence_log_prob(&logits, &tokens, &objective).unwrap();
            assert!((got - want).abs() < 1e-13, "{objective}: {got} vs {want}");
        }
        // The answer of the prompt-masked sequence: rows 2..=5 against tokens 3..=6.
        let objective = Objective::PromptMasked { prompt_len: 3 };
        let per_token = token_log_probs(logits.rows(2, 4), &tokens[3..]).unwrap();
        assert_eq!(
            sequence_log_prob(&logits, &tokens, &objective).unwrap(),
            per_token.iter().sum::<f64>()
        );
        // Tokens that are no scored position's target are never read (the prompt may hold
        // any id), and a bad target is reported at its own position.
        let mut padded = tokens;
        padded[1] = 999;
        assert!(sequence_log_prob(&logits, &padded, &objective).is_ok());
        padded[4] = 5;
        assert_eq!(
            sequence_log_prob(&logits, &padded, &objective),
            Err(Error::IndexOutOfRange {
                arg: "tokens",
                position: 4,
                index: 5,
                bound: 5
            })
        );
        let mut bad = logits.clone();
        bad[(0, 0)] = f64::NAN;
        assert!(matches!(
            sequence_log_prob(&bad, &tokens, &objective),
            Err(Error::NonFinite { arg: "logits", .. })
        ));
        assert!(matches!(
            sequence_log_prob(&logits, &tokens[1..], &objective),
            Err(Error::LengthMismatch { arg: "tokens", .. })
        ));
        assert_eq!(
            sequence_log_prob(&DMatrix::<f64>::zeros(0, 3), &[], &Objective::Causal),
            Ok(0.0)
        );
    }

    #[test]
    fn reward_model_grad_matches_finite_differences() {
        for (rc, rr) in [
            (0.3, -0.2),
            (-1.7, 2.4),
            (5.0, 4.9),
            (-3.0, -8.0),
            (0.0, 0.0),
        ] {
            let (gc, gr) = reward_model_loss_grad(rc, rr);
            assert_grad(gc, central(|x| reward_model_loss(x, rr), rc, H), "r_chosen");
            assert_grad(
                gr,
                central(|x| reward_model_loss(rc, x), rr, H),
                "r_rejected",
            );
            assert_eq!(gc, -gr);
        }
        // Tails: −σ(−d) ≈ −e^{−d} for large d, and −1 + e^{d} for very negative d.
        let (gc, _) = reward_model_loss_grad(700.0_f64, 0.0);
        assert!((gc / -(-700.0_f64).exp() - 1.0).abs() < 1e-15);
        // e^{−800} is below the smallest subnormal: the gradient underflows to 0 with it.
        assert_eq!(reward_model_loss_grad(800.0_f64, 0.0).0, 0.0);
        let (gc, gr) = reward_model_loss_grad(-40.0_f64, 0.0);
        assert_eq!((gc, gr), (-1.0, 1.0));
        let (gc, _) = reward_model_loss_grad(40.0_f64, 0.0);
        assert!((gc / -(-40.0_f64).exp() - 1.0).abs() < 1e-15);
        // The difference overflows: the limits, not NaN.
        assert_eq!(reward_model_loss_grad(3e38_f32, -3e38), (-0.0, 0.0));
        assert_eq!(reward_model_loss_grad(-3e38_f32, 3e38), (-1.0, 1.0));
        let (gc, gr) = reward_model_loss_grad(f64::NAN, 1.0);
        assert!(gc.is_nan() && gr.is_nan());
        assert!(
            reward_model_loss_grad(f64::INFINITY, f64::INFINITY)
                .0
                .is_nan()
        );
    }

    #[test]
    fn dpo_grad_matches_finite_differences() {
        let base = PairLogProbs {
            policy_chosen: -12.3_f64,
            policy_rejected: -15.1,
            reference_chosen: -13.0,
            reference_rejected: -14.2,
        };
        for beta in [0.1, 0.5, 2.0] {
            let g = dpo_loss_grad(&base, beta).unwrap();
            let as_array = |p: &PairLogProbs<f64>| {
                [
                    p.policy_chosen,
                    p.policy_rejected,
                    p.reference_chosen,
                    p.reference_rejected,
                ]
            };
            // The loss with entry k of the pair (in field order) set to x.
            let loss = |k: usize, x: f64| {
                let mut v = as_array(&base);
                v[k] = x;
                let p = PairLogProbs {
                    policy_chosen: v[0],
                    policy_rejected: v[1],
                    reference_chosen: v[2],
                    reference_rejected: v[3],
                };
                dpo_loss(&p, beta).unwrap()
            };
            let (analytic, at) = (as_array(&g), as_array(&base));
            for k in 0..4 {
                let numeric = central(|x| loss(k, x), at[k], H);
                assert_grad(analytic[k], numeric, &format!("entry {k}, beta {beta}"));
            }
            // Moving towards the chosen answer lowers the loss.
            assert!(g.policy_chosen < 0.0 && g.policy_rejected > 0.0);
        }
        // Both differences overflow in f32 (inf − inf) while the true margin is 0: the
        // gradient is β σ(0) = β/2, not NaN.
        let pair = PairLogProbs {
            policy_chosen: 3e38_f32,
            policy_rejected: 3e38,
            reference_chosen: -3e38,
            reference_rejected: -3e38,
        };
        let g = dpo_loss_grad(&pair, 0.5).unwrap();
        assert_eq!(
            g,
            PairLogProbs {
                policy_chosen: -0.25,
                policy_rejected: 0.25,
                reference_chosen: 0.25,
                reference_rejected: -0.25
            }
        );
        assert!(dpo_loss_grad(&base, -1.0).is_err());
        let bad = PairLogProbs {
            policy_rejected: f64::NAN,
            ..base
        };
        assert_eq!(
            dpo_loss_grad(&bad, 0.1),
            Err(Error::NonFinite {
                arg: "pair",
                row: 0,
                col: 1
            })
        );
    }

    #[test]
    fn ppo_grad_matches_finite_differences_in_every_region() {
        let eps = 0.2;
        // Ratios inside the trust region, above 1 + ε and below 1 − ε, with advantages of
        // both signs (8 tokens: every branch), none within h of a kink.
        let d = [0.05, -0.1, 0.6, 0.6, -0.7, -0.7, 0.15, -0.15];
        let adv = [1.3, -0.4, 2.0, -1.1, 0.7, -2.5, 0.9, -0.6];
        let logp_old = fill(8, 0.7, 2.0)
            .iter()
            .map(|x| x - 3.0)
            .collect::<Vec<_>>();
        let logp: Vec<f64> = logp_old.iter().zip(d).map(|(o, d)| o + d).collect();
        let g = ppo_clipped_loss_grad(&logp, &logp_old, &adv, eps).unwrap();
        for t in 0..8 {
            let numeric = central(
                |x| {
                    let mut lp = logp.clone();
                    lp[t] = x;
                    ppo_clipped_loss(&lp, &logp_old, &adv, eps).unwrap()
                },
                logp[t],
                H,
            );
            assert_grad(g[t], numeric, &format!("token {t}"));
        }
        // The clipped branches carry exactly no gradient: ρ > 1 + ε with A > 0 (token 2)
        // and ρ < 1 − ε with A < 0 (token 5); the others carry −ρ A / n.
        assert_eq!((g[2], g[5]), (0.0, 0.0));
        for t in [3, 4] {
            let rho = (logp[t] - logp_old[t]).exp();
            assert_eq!(g[t], -(rho * adv[t]) / 8.0);
        }
    }

    #[test]
    fn ppo_grad_at_the_kinks_is_the_unclipped_one() {
        // ρ exactly 1 + ε and exactly 1 − ε: ε = ρ − 1 and 1 − ρ are exact (Sterbenz), and
        // so are 1 ± ε. PyTorch: minimum splits a tie evenly, clamp passes its bounds, so
        // the gradient is −ρ A / n.
        let up = 0.5_f64.exp();
        let eps_up = up - 1.0;
        assert_eq!(1.0 + eps_up, up);
        let g = ppo_clipped_loss_grad(&[0.5], &[0.0], &[3.0], eps_up).unwrap();
        assert_eq!(g, vec![-(up * 3.0)]);
        let down = (-0.5_f64).exp();
        let eps_down = 1.0 - down;
        assert_eq!(1.0 - eps_down, down);
        let g = ppo_clipped_loss_grad(&[-0.5, 0.0], &[0.0, 0.0], &[-3.0, 1.0], eps_down).unwrap();
        assert_eq!(g[0], -(down * -3.0) / 2.0);
        // The one-sided derivatives differ there: the left one is the unclipped gradient,
        // the right one 0 (A > 0 at the upper kink).
        let f = |x: f64| ppo_clipped_loss(&[x], &[0.0], &[3.0], eps_up).unwrap();
        let left = (f(0.5) - f(0.5 - H)) / H;
        let right = (f(0.5 + H) - f(0.5)) / H;
        assert_grad(-(up * 3.0), left, "left derivative");
        assert!(right.abs() < 1e-9, "right derivative {right}");
        // A zero advantage: zero gradient, even when ρ overflows (as its loss term is 0).
        let g = ppo_clipped_loss_grad(&[100.0_f32, 0.0], &[0.0, 0.0], &[0.0, 1.0], 0.2).unwrap();
        assert_eq!(g, vec![0.0, -0.5]);
    }

    #[test]
    fn ppo_grad_handles_overflow_like_the_loss() {
        // ρ = e^100 overflows f32; −ρ A = e^100 · 1e-38 = 2.7e5 does not.
        let a = -1e-38_f32;
        let g = ppo_clipped_loss_grad(&[100.0_f32], &[0.0], &[a], 0.2).unwrap()[0] as f64;
        let want = 100.0_f64.exp() * 1e-38;
        assert!((g / want - 1.0).abs() < 1e-4, "{g} vs {want}");
        // The loss agrees: for one unclipped token the gradient is minus the loss term,
        // and the loss is minus the mean, so both are ρ|A|.
        let loss = ppo_clipped_loss(&[100.0_f32], &[0.0], &[a], 0.2).unwrap() as f64;
        assert!((g / loss - 1.0).abs() < 1e-5);
        // ρ A overflows, ρ A / n does not: 1.1 · 3.3e38 / 2.
        let (d, a) = (0.0953_f32, 3.3e38_f32);
        let g = ppo_clipped_loss_grad(&[d, 0.0], &[0.0, 0.0], &[a, 0.0], 0.2).unwrap();
        let want = -f64::from(d).exp() * f64::from(a) / 2.0;
        assert!((f64::from(g[0]) / want - 1.0).abs() < 1e-6, "{}", g[0]);
        // Huge differences: ρ = inf with A < 0 gives +inf (the exact value is beyond the
        // range), ρ = 0 with A > 0 gives 0; never NaN.
        let g = ppo_clipped_loss_grad(
            &[f32::MAX, -f32::MAX],
            &[-f32::MAX, f32::MAX],
            &[-1.0, 1.0],
            0.2,
        )
        .unwrap();
        assert_eq!(g[0], f32::INFINITY);
        assert_eq!(g[1], 0.0);
        // The loss's errors.
        assert_eq!(
            ppo_clipped_loss_grad(&[0.0, f64::NAN], &[0.0, 0.0], &[1.0, 1.0], 0.2),
            Err(Error::NonFinite {
                arg: "logp",
                row: 0,
                col: 1
            })
        );
        assert!(matches!(
            ppo_clipped_loss_grad::<f64>(&[], &[], &[], 0.2),
            Err(Error::Empty { .. })
        ));
        assert!(matches!(
            ppo_clipped_loss_grad(&[0.0_f64], &[0.0], &[1.0, 2.0], 0.2),
            Err(Error::LengthMismatch {
                arg: "advantages",
                ..
            })
        ));
        assert!(matches!(
            ppo_clipped_loss_grad(&[0.0_f64], &[0.0], &[1.0], f64::NAN),
            Err(Error::InvalidParameter { .. })
        ));
    }

    /// Two categorical distributions over 4 tokens: the policy p and the reference q.
    fn categorical_pair() -> ([f64; 4], [f64; 4]) {
        ([0.1, 0.2, 0.3, 0.4], [0.25, 0.15, 0.35, 0.25])
    }

    fn kl(p: &[f64], q: &[f64]) -> f64 {
        p.iter().zip(q).map(|(p, q)| p * (p / q).ln()).sum()
    }

    #[test]
    fn kl_estimators_match_closed_forms() {
        let estimators = [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3];
        let (p, q) = categorical_pair();
        let want = kl(&p, &q);
        assert!((want - crate::kl_divergence(&p, &q).unwrap()).abs() < 1e-15);
        // Exact expectations over x ~ p of each estimator at r = ln q(x) − ln p(x).
        let expect = |e: KlEstimator| -> f64 {
            p.iter()
                .zip(&q)
                .map(|(pi, qi)| pi * e.estimate(qi.ln() - pi.ln()))
                .sum()
        };
        assert!((expect(KlEstimator::K1) - want).abs() < 1e-15);
        assert!((expect(KlEstimator::K3) - want).abs() < 1e-14);
        // k2 is biased: here by more than 1% of the KL.
        assert!((expect(KlEstimator::K2) - want).abs() > 1e-2 * want);
        // ... but to third order: halving the distance between p and q divides the bias by
        // about 8, while the KL itself only drops by 4.
        let mix = |t: f64| -> [f64; 4] { core::array::from_fn(|i| p[i] + t * (q[i] - p[i])) };
        let bias = |t: f64| {
            let qt = mix(t);
            let e2: f64 = (0..4)
                .map(|i| p[i] * KlEstimator::K2.estimate(qt[i].ln() - p[i].ln()))
                .sum();
            (e2 - kl(&p, &qt)).abs()
        };
        let ratio = bias(0.02) / bias(0.01);
        assert!((ratio - 8.0).abs() < 0.5, "bias ratio {ratio}");
        // The same through kl_penalty: 20 samples in the proportions 2 : 4 : 6 : 8.
        let counts = [2, 4, 6, 8];
        let (mut logp, mut logp_ref) = (Vec::new(), Vec::new());
        for (i, &c) in counts.iter().enumerate() {
            logp.extend(core::iter::repeat_n(p[i].ln(), c));
            logp_ref.extend(core::iter::repeat_n(q[i].ln(), c));
        }
        for e in [KlEstimator::K1, KlEstimator::K3] {
            let mean = kl_penalty(&logp, &logp_ref, e).unwrap();
            assert!((mean - want).abs() < 1e-14, "{e:?}: {mean} vs {want}");
        }
        // Per-token values: k1 is negative where q > p, k2 and k3 never are.
        for e in estimators {
            let per = kl_penalty_per_token(&logp, &logp_ref, e).unwrap();
            assert_eq!(per.len(), 20);
            let mean = per.iter().sum::<f64>() / 20.0;
            assert!((mean - kl_penalty(&logp, &logp_ref, e).unwrap()).abs() < 1e-16);
            if e == KlEstimator::K1 {
                assert!(per[0] < 0.0);
            } else {
                assert!(per.iter().all(|k| *k >= 0.0));
            }
        }
        // Variance over x ~ p: k3 and k2 well below k1 when q is close to p.
        let qt = mix(0.1);
        let var = |e: KlEstimator| {
            let ks: Vec<f64> = (0..4).map(|i| e.estimate(qt[i].ln() - p[i].ln())).collect();
            let m: f64 = (0..4).map(|i| p[i] * ks[i]).sum();
            (0..4).map(|i| p[i] * (ks[i] - m).powi(2)).sum::<f64>()
        };
        assert!(var(KlEstimator::K3) < 0.05 * var(KlEstimator::K1));
        assert!(var(KlEstimator::K2) < 0.05 * var(KlEstimator::K1));
    }

    #[test]
    fn k3_is_accurate_near_zero_and_never_negative() {
        // Against the series to r⁷/7! (the rest is below 1e-18 relative at |r| <= 1e-3).
        for r in [1e-12_f64, -1e-12, 1e-6, -3e-5, 1e-3, -1e-3] {
            let series = r * r / 2.0
                + r.powi(3) / 6.0
                + r.powi(4) / 24.0
                + r.powi(5) / 120.0
                + r.powi(6) / 720.0
                + r.powi(7) / 5040.0;
            let got = KlEstimator::K3.estimate(r);
            assert!((got / series - 1.0).abs() < 8.0 * f64::EPSILON, "r = {r}");
        }
        // expm1(r) − r alone has lost almost every bit at r = 1e-12.
        let naive = 1e-12_f64.exp_m1() - 1e-12;
        assert!((naive / 5e-25 - 1.0).abs() > 1e-6);
        // Both sides of the switch at |r| = 1/2 agree with a long f64 series.
        for r in [0.5_f64, 0.5000001, -0.5, -0.5000001, 0.3, -0.45, 0.6, -0.6] {
            let mut term = r * r / 2.0;
            let mut series = term;
            for k in 3..60 {
                term *= r / k as f64;
                series += term;
            }
            let got = KlEstimator::K3.estimate(r);
            assert!((got / series - 1.0).abs() < 10.0 * f64::EPSILON, "r = {r}");
        }
        // Far from 0 there is little cancellation in e^r − 1 − r itself.
        for r in [2.0_f64, -3.0, 30.0, -30.0] {
            let direct = r.exp() - 1.0 - r;
            assert!((KlEstimator::K3.estimate(r) / direct - 1.0).abs() < 4.0 * f64::EPSILON);
        }
        for r in [-700.0_f64, -1.0, -1e-300, 0.0, 1e-300, 1.0, 700.0, 710.0] {
            assert!(KlEstimator::K3.estimate(r) >= 0.0, "r = {r}");
        }
        assert_eq!(KlEstimator::K3.estimate(0.0_f64), 0.0);
        assert_eq!(KlEstimator::K3.estimate(710.0_f64), f64::INFINITY);
        assert_eq!(KlEstimator::K3.estimate(f64::NEG_INFINITY), f64::INFINITY);
        assert_eq!(KlEstimator::K3.estimate(f32::INFINITY), f32::INFINITY);
        assert!(KlEstimator::K3.estimate(f64::NAN).is_nan());
        assert!(KlEstimator::K1.estimate(f32::NAN).is_nan());
        assert_eq!(KlEstimator::K2.estimate(-3.0_f64), 4.5);
    }

    #[test]
    fn kl_grads_match_finite_differences() {
        let logp: Vec<f64> = fill(6, 0.2, 1.5).iter().map(|x| x - 2.0).collect();
        let logp_ref: Vec<f64> = fill(6, 2.9, 1.5).iter().map(|x| x - 2.0).collect();
        for e in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            let g = kl_penalty_grad(&logp, &logp_ref, e).unwrap();
            for t in 0..6 {
                let numeric = central(
                    |x| {
                        let mut lp = logp.clone();
                        lp[t] = x;
                        kl_penalty(&lp, &logp_ref, e).unwrap()
                    },
                    logp[t],
                    H,
                );
                assert_grad(g[t], numeric, &format!("{e:?} token {t}"));
            }
        }
    }

    /// The documented expectations of the gradients: with π = softmax(θ) and tokens drawn
    /// from π, `E[g(x) ∇_θ ln π(x)]` is 0 for k1, `∇_θ KL(π ‖ q)` for k2 and
    /// `∇_θ KL(q ‖ π)` for k3 (g the per-token gradient with respect to ln π).
    #[test]
    fn kl_grads_in_expectation_are_those_of_the_reverse_and_forward_kl() {
        let theta = [0.3_f64, -0.8, 1.1, 0.05];
        let (_, q) = categorical_pair();
        let softmax_of = |th: &[f64; 4]| -> [f64; 4] {
            let p = crate::softmax(th);
            core::array::from_fn(|i| p[i])
        };
        let p = softmax_of(&theta);
        let expected_grad = |e: KlEstimator| -> [f64; 4] {
            let mut out = [0.0; 4];
            for x in 0..4 {
                let g = kl_penalty_grad(&[p[x].ln()], &[q[x].ln()], e).unwrap()[0];
                for (j, o) in out.iter_mut().enumerate() {
                    // ∂ ln π(x) / ∂θ_j = [x = j] − π_j.
                    let score = if j == x { 1.0 } else { 0.0 } - p[j];
                    *o += p[x] * g * score;
                }
            }
            out
        };
        let fd = |f: &dyn Fn(&[f64; 4]) -> f64, j: usize| {
            central(
                |x| {
                    let mut th = theta;
                    th[j] = x;
                    f(&th)
                },
                theta[j],
                H,
            )
        };
        let reverse = |th: &[f64; 4]| kl(&softmax_of(th), &q);
        let forward = |th: &[f64; 4]| kl(&q, &softmax_of(th));
        let (g1, g2, g3) = (
            expected_grad(KlEstimator::K1),
            expected_grad(KlEstimator::K2),
            expected_grad(KlEstimator::K3),
        );
        for j in 0..4 {
            assert!(g1[j].abs() < 1e-15, "k1: {}", g1[j]);
            assert_grad(g2[j], fd(&reverse, j), "k2 against ∇ KL(π ‖ q)");
            assert_grad(g3[j], fd(&forward, j), "k3 against ∇ KL(q ‖ π)");
        }
        // And the two differ, so the test can tell them apart.
        assert!((g2[0] - g3[0]).abs() > 1e-3);
    }

    #[test]
    fn kl_errors_and_overflow() {
        assert_eq!(
            kl_penalty(&[0.0_f64, -1.0], &[0.0], KlEstimator::K1),
            Err(Error::LengthMismatch {
                arg: "logp_ref",
                found: 1,
                expected: 2
            })
        );
        for e in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            assert_eq!(
                kl_penalty(&[0.0, -1.0], &[-1.0, f64::NAN], e),
                Err(Error::NonFinite {
                    arg: "logp_ref",
                    row: 0,
                    col: 1
                })
            );
            assert_eq!(
                kl_penalty_grad(&[f64::NEG_INFINITY], &[-1.0], e),
                Err(Error::NonFinite {
                    arg: "logp",
                    row: 0,
                    col: 0
                })
            );
            assert!(matches!(
                kl_penalty_per_token(&[f64::NAN], &[-1.0], e),
                Err(Error::NonFinite { arg: "logp", .. })
            ));
            assert_eq!(kl_penalty_per_token::<f64>(&[], &[], e), Ok(vec![]));
            assert_eq!(
                kl_penalty::<f32>(&[], &[], e),
                Err(Error::Empty { what: "logp" })
            );
            assert!(matches!(
                kl_penalty_grad::<f32>(&[], &[], e),
                Err(Error::Empty { .. })
            ));
        }
        let max = f32::MAX;
        // k1: terms of ±2·MAX (their differences overflow) average to 0, not NaN.
        let mean = kl_penalty(&[max, -max], &[-max, max], KlEstimator::K1).unwrap();
        assert_eq!(mean, 0.0);
        // k1: a plain sum past MAX whose mean is 0.75 · MAX.
        let mean = kl_penalty(&[max, max * 0.5], &[0.0, 0.0], KlEstimator::K1).unwrap();
        assert!((f64::from(mean) / (0.75 * f64::from(max)) - 1.0).abs() < 1e-6);
        // k3 with r = 90 in f32: e^90 = 1.2e39 overflows, the mean over 8 tokens
        // (e^90 − 91) / 8 = 1.5e38 does not.
        let mut logp = vec![0.0_f32; 8];
        let mut logp_ref = vec![0.0_f32; 8];
        logp[3] = -90.0;
        logp_ref[3] = 0.0;
        let mean = kl_penalty(&logp, &logp_ref, KlEstimator::K3).unwrap();
        let want = (90.0_f64.exp() - 91.0) / 8.0;
        assert!(
            (f64::from(mean) / want - 1.0).abs() < 1e-5,
            "{mean} vs {want}"
        );
        let g = kl_penalty_grad(&logp, &logp_ref, KlEstimator::K3).unwrap();
        let want = -(90.0_f64.exp() - 1.0) / 8.0;
        assert!(
            (f64::from(g[3]) / want - 1.0).abs() < 1e-5,
            "{} vs {want}",
            g[3]
        );
        assert_eq!(g[0], 0.0);
        // k3 with r = −2·MAX (k3 ≈ 2·MAX) over 4 tokens: MAX / 2.
        let mean = kl_penalty(
            &[max, 0.0, 0.0, 0.0],
            &[-max, 0.0, 0.0, 0.0],
            KlEstimator::K3,
        )
        .unwrap();
        assert!((f64::from(mean) / (0.5 * f64::from(max)) - 1.0).abs() < 1e-6);
        // k2 with r = 3e19 (r²/2 = 4.5e38 > MAX) over 2 tokens: 2.25e38.
        let mean = kl_penalty(&[0.0, 0.0], &[3e19_f32, 0.0], KlEstimator::K2).unwrap();
        assert!((f64::from(mean) / 2.25e38 - 1.0).abs() < 1e-5, "{mean}");
        let g = kl_penalty_grad(&[max, 0.0], &[-max, 0.0], KlEstimator::K2).unwrap();
        assert!((f64::from(g[0]) / f64::from(max) - 1.0).abs() < 1e-6); // −r/2 = MAX
        // Past the range: +inf, not NaN.
        let mean = kl_penalty(&[-max], &[max], KlEstimator::K3).unwrap();
        assert_eq!(mean, f32::INFINITY);
    }

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
