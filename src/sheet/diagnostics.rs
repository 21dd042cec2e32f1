//! Stability diagnostics for attention (seed question 7, loss spikes).
//!
//! Loss spikes in large-model training often start in attention: logits grow until the
//! softmax saturates onto one key ("attention entropy collapse", Zhai et al. 2023), and the
//! gradient through it vanishes or explodes. Two numbers per query row watch for it:
//!
//! ```text
//! max logit   max_j S_ij                      (grows before a spike)
//! entropy     H_i = −Σ_j P_ij ln P_ij          (collapses toward 0 before a spike)
//! ```
//!
//! and two standard remedies are provided: logit soft-capping ([`softcap`], also
//! [`AttentionOptions::softcap`](crate::AttentionOptions::softcap)) and QK-norm
//! ([`rms_normalize_rows`], applied to Q and K per head before the dot product, as in
//! ViT-22B and OLMo 2), which bounds every logit by `scale · d`.

use crate::AttentionOptions;
use crate::Float;
use crate::attention::scaled_attention_with;
use crate::entropy::entropy_rows;
use crate::error::{Result, check_positive};
use crate::mask::Mask;
use nalgebra::{DMatrix, DMatrixView, DVector};

/// Per-query-row health of an attention: see the [module docs](self); made by [`diagnose`],
/// see there for an example.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionDiagnostics<T: Float> {
    /// `max_j S_ij` over the allowed keys (final scores: scaled, capped, biased); `-inf` for
    /// a fully masked row. Length n.
    pub max_logit: DVector<T>,
    /// Entropy of each row's weights in nats, `0 <= H_i <= ln(allowed keys)`; 0 for a fully
    /// masked row. Length n.
    pub entropy: DVector<T>,
    /// Each row's entropy divided by the log of its number of allowed keys: 1 is uniform
    /// attention, 0 is one-hot. Rows with fewer than two allowed keys get 0. Length n.
    pub normalized_entropy: DVector<T>,
}

/// Computes [`AttentionDiagnostics`] for the attention of `q` over `k` under `mask` and `opts`.
///
/// The max logit comes from the identity `S_ij = lse_i + ln P_ij` at the heaviest key, which
/// cannot underflow (that weight is at least 1/m). This materialises the n x m weights, so
/// use it on a probe batch, not inside a training step.
///
/// # Errors
///
/// Those of [`scaled_attention_with`] (V is not needed; its shape is not checked).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::diagnostics::diagnose;
/// use attention_math::{AttentionOptions, Mask};
/// use nalgebra::DMatrix;
///
/// // Large, aligned vectors: the unscaled logits saturate the softmax.
/// let x = DMatrix::<f64>::from_fn(4, 16, |i, j| if j % 4 == i { 8.0 } else { 0.0 });
/// let scaled = diagnose(&x, &x, &Mask::none(), &AttentionOptions::new())?;
/// let unscaled = diagnose(&x, &x, &Mask::none(), &AttentionOptions::new().scale(1.0))?;
/// assert_eq!(unscaled.max_logit[0], 4.0 * 64.0);
/// assert!((scaled.max_logit[0] - 64.0).abs() < 1e-12);
/// assert!(unscaled.entropy[0] < 1e-12 && scaled.entropy[0] < 1e-12);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn diagnose<'q, 'k, T: Float>(
    q: impl Into<DMatrixView<'q, T>>,
    k: impl Into<DMatrixView<'k, T>>,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
) -> Result<AttentionDiagnostics<T>> {
    let (q, k) = (q.into(), k.into());
    let (n, m) = (q.nrows(), k.nrows());
    let no_values = DMatrix::<T>::zeros(m, 0);
    let out = scaled_attention_with(q, k, &no_values, mask, &opts.clone().return_weights(true))?;
    let weights = out.weights.expect("weights were requested");
    let entropy = entropy_rows(&weights);
    let max_logit = DVector::from_fn(n, |i, _| {
        let heaviest = weights.row(i).max();
        if heaviest > T::zero() {
            out.lse[i] + heaviest.ln()
        } else {
            T::NEG_INFINITY
        }
    });
    let normalized_entropy = DVector::from_fn(n, |i, _| {
        let allowed = (0..m).filter(|&j| mask.allows_in(n, m, i, j)).count();
        if allowed < 2 {
            T::zero()
        } else {
            entropy[i] / T::of_usize(allowed).ln()
        }
    });
    Ok(AttentionDiagnostics {
        max_logit,
        entropy,
        normalized_entropy,
    })
}

/// Soft-capping of one logit: `c · tanh(x / c)`, smooth, odd, ≈ x for |x| ≪ c, bounded by c.
///
/// # Errors
///
/// [`Error::InvalidParameter`](crate::Error::InvalidParameter) unless `c` is finite and > 0.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::diagnostics::softcap;
///
/// assert!((softcap(0.1_f64, 50.0)? - 0.1).abs() < 1e-6);
/// assert!((softcap(1e6_f64, 50.0)? - 50.0).abs() < 1e-12);
/// assert!(softcap(1.0_f32, 0.0).is_err());
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn softcap<T: Float>(x: T, c: T) -> Result<T> {
    check_positive("softcap", c)?;
    Ok(c * (x / c).tanh())
}

/// RMS-normalises every row: `x_i ← x_i / sqrt(mean_j x_ij² + eps)`, the parameter-free
/// part of QK-norm. Apply it to each head's Q and K before attention: then
/// `|q_i · k_j| <= d` and the default scale bounds every logit by `√d`.
///
/// # Errors
///
/// [`Error::InvalidParameter`](crate::Error::InvalidParameter) unless `eps` is finite and > 0.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::diagnostics::rms_normalize_rows;
/// use nalgebra::dmatrix;
///
/// let x = dmatrix![3.0_f64, 4.0; 0.0, 0.0];
/// let y = rms_normalize_rows(&x, 1e-12)?;
/// let rms = (12.5_f64 + 1e-12).sqrt();
/// assert!((y[(0, 0)] - 3.0 / rms).abs() < 1e-15);
/// assert_eq!(y[(1, 1)], 0.0); // a zero row stays zero
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn rms_normalize_rows<'a, T: Float>(
    x: impl Into<DMatrixView<'a, T>>,
    eps: T,
) -> Result<DMatrix<T>> {
    check_positive("eps", eps)?;
    let mut y = x.into().into_owned();
    let d = T::of_usize(y.ncols().max(1));
    for mut row in y.row_iter_mut() {
        let mean_sq = row.iter().fold(T::zero(), |acc, &v| acc + v * v) / d;
        row /= (mean_sq + eps).sqrt();
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::softmax::softmax;

    #[test]
    fn diagnostics_match_direct_computation() {
        let q = DMatrix::<f64>::from_fn(5, 3, |i, j| ((i * 3 + j) as f64 * 0.9).sin() * 2.0);
        let k = DMatrix::<f64>::from_fn(6, 3, |i, j| ((i + 7 * j) as f64 * 0.4).cos() * 2.0);
        let mask = Mask::causal_bottom_right().and(Mask::sliding_window(3).not().not());
        let diag = diagnose(&q, &k, &mask, &AttentionOptions::new()).unwrap();
        let (n, m) = (5, 6);
        for i in 0..n {
            let s: Vec<f64> = (0..m)
                .map(|j| {
                    if mask.allows_in(n, m, i, j) {
                        q.row(i).dot(&k.row(j)) / 3.0_f64.sqrt()
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(
                diag.max_logit[i] == f64::NEG_INFINITY,
                max == f64::NEG_INFINITY
            );
            if max.is_finite() {
                assert!((diag.max_logit[i] - max).abs() < 1e-12);
            }
            let h = crate::entropy::entropy(&softmax(&s));
            assert!((diag.entropy[i] - h).abs() < 1e-12);
            let allowed = s.iter().filter(|v| v.is_finite()).count();
            if allowed >= 2 {
                assert!((diag.normalized_entropy[i] - h / (allowed as f64).ln()).abs() < 1e-12);
            } else {
                assert_eq!(diag.normalized_entropy[i], 0.0);
            }
        }
    }

    #[test]
    fn qk_norm_bounds_the_logits() {
        let q = DMatrix::<f64>::from_fn(4, 8, |i, j| ((i * 8 + j) as f64).sin() * 1e3);
        let qn = rms_normalize_rows(&q, 1e-6).unwrap();
        for row in qn.row_iter() {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / 8.0;
            assert!((ms - 1.0).abs() < 1e-9);
        }
        let diag = diagnose(&qn, &qn, &Mask::none(), &AttentionOptions::new()).unwrap();
        assert!(diag.max_logit.iter().all(|&l| l <= 8.0_f64.sqrt() + 1e-9));
    }
}
