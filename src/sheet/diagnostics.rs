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
use crate::error::{Result, check_positive, checked_len};
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
/// Accuracy: the entropy is that of [`entropy_rows`] on the weights
/// (relative `(m + 2) · ε`); the max logit has an absolute error of about
/// `ε · (|lse_i| + ln m + 2)`.
///
/// # Errors
///
/// Those of [`scaled_attention_with`] (V is not needed; its shape is not checked), and
/// [`Error::TooLarge`](crate::Error::TooLarge) if the n x m weights cannot be allocated,
/// checked before the attention runs.
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
    checked_len::<T>("the n x m attention weights", n, m)?;
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
/// For `|x / c| < √ε` the result is `x` itself (`tanh u = u (1 − u²/3 + ...)` there, so this is
/// exact to rounding), which keeps tiny logits whose quotient `x / c` would underflow.
/// `x = ±inf` gives `±c`; NaN gives NaN. Accuracy: a relative error of a few ε.
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
/// // x / c underflows to 0 in f32, the capped value is still x.
/// assert_eq!(softcap(1e-30_f32, 1e20)?, 1e-30);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn softcap<T: Float>(x: T, c: T) -> Result<T> {
    check_positive("softcap", c)?;
    let u = x / c;
    Ok(if u.abs() < T::EPSILON.sqrt() {
        x
    } else {
        c * u.tanh()
    })
}

/// RMS-normalises every row: `x_i ← x_i / sqrt(mean_j x_ij² + eps)`, the parameter-free
/// part of QK-norm. Apply it to each head's Q and K before attention: then
/// `|q_i · k_j| <= d` and the default scale bounds every logit by `√d`.
///
/// Each row is scaled by its largest magnitude `a` before squaring:
/// `x_i / sqrt(mean x² + eps) = (x_i / a) / sqrt(mean (x / a)² + eps / a²)`, so rows of
/// huge entries (1e20 in f32, whose squares overflow) and of tiny ones (whose squares
/// underflow) are normalised correctly. When `eps / a²` overflows, `a² · mean (x/a)²` is
/// below `eps · ε` and the row is `x / √eps`. A row holding NaN becomes all NaN and a row
/// holding an infinity gets NaN there and 0 elsewhere, as the direct formula gives.
///
/// Accuracy: a relative error of about `(d + 4) · ε` per entry (the mean of squares adds
/// terms of one sign).
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
/// // Squares that would overflow: the RMS of (3e20, 4e20) is 3.54e20, not inf.
/// let big = rms_normalize_rows(&dmatrix![3e20_f32, 4e20], 1e-6)?;
/// assert!((big[(0, 0)] - 3.0 / 12.5_f32.sqrt()).abs() < 1e-6);
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
        let mut a = T::zero();
        let mut nan = false;
        for &v in row.iter() {
            nan |= v.is_nan_value();
            if v.abs() > a {
                a = v.abs();
            }
        }
        if nan {
            row.fill(T::NAN);
            continue;
        }
        if !a.is_finite() || a == T::zero() {
            // Infinite entries (the direct formula: inf / inf = NaN, finite / inf = 0), or
            // an all-zero row, which stays zero.
            let mean_sq = row.iter().fold(T::zero(), |acc, &v| acc + v * v) / d;
            row /= (mean_sq + eps).sqrt();
            continue;
        }
        let t = eps / a / a;
        if t.is_finite() {
            let s = row.iter().fold(T::zero(), |acc, &v| {
                let r = v / a;
                acc + r * r
            }) / d;
            let inv = T::one() / ((s + t).sqrt() * a);
            if inv.is_finite() {
                row *= inv;
            } else {
                // (s + t)·a underflowed: divide in two steps instead.
                let root = (s + t).sqrt();
                row.apply(|v| *v = (*v / a) / root);
            }
        } else {
            row /= eps.sqrt();
        }
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

    /// Before: the squares of 1e20 overflowed (the row became 0) and those of 1e-23
    /// underflowed in f32 (the row came out 40% too large).
    #[test]
    fn rms_scales_before_squaring() {
        let x = nalgebra::dmatrix![3e20_f32, -4e20; 3e-23, 4e-23; 0.0, 0.0];
        let eps = 1e-45_f32; // subnormal: 1.4e-45
        let y = rms_normalize_rows(&x, eps).unwrap();
        for i in 0..2 {
            let row = [x[(i, 0)] as f64, x[(i, 1)] as f64];
            let ms = (row[0] * row[0] + row[1] * row[1]) / 2.0;
            for j in 0..2 {
                let want = row[j] / (ms + eps as f64).sqrt();
                let got = y[(i, j)] as f64;
                assert!(
                    (got - want).abs() < 1e-6 * want.abs(),
                    "({i}, {j}): {got} vs {want}"
                );
            }
        }
        assert_eq!((y[(2, 0)], y[(2, 1)]), (0.0, 0.0));
        // eps dominates a tiny row: x / sqrt(eps + tiny) ≈ x / √eps.
        let y = rms_normalize_rows(&nalgebra::dmatrix![1e-40_f64, 0.0], 1.0).unwrap();
        assert_eq!(y[(0, 0)], 1e-40);
        let y = rms_normalize_rows(&nalgebra::dmatrix![f64::NAN, 1.0; f64::INFINITY, 1.0], 1e-6)
            .unwrap();
        assert!(y[(0, 0)].is_nan() && y[(0, 1)].is_nan());
        assert!(y[(1, 0)].is_nan() && y[(1, 1)] == 0.0);
        // Against f64 on random-ish rows.
        let x = DMatrix::<f64>::from_fn(5, 7, |i, j| {
            ((i * 7 + j) as f64 * 0.61).sin() * 10f64.powi(i as i32 * 3 - 6)
        });
        let y = rms_normalize_rows(&x, 1e-12).unwrap();
        for i in 0..5 {
            let ms = x.row(i).iter().map(|v| v * v).sum::<f64>() / 7.0;
            for j in 0..7 {
                let want = x[(i, j)] / (ms + 1e-12).sqrt();
                assert!(
                    (y[(i, j)] - want).abs() <= 1e-14 * want.abs().max(1e-300),
                    "{i} {j}"
                );
            }
        }
    }

    #[test]
    fn softcap_keeps_tiny_logits_and_caps_infinities() {
        assert_eq!(softcap(1e-30_f32, 1e20).unwrap(), 1e-30);
        assert_eq!(softcap(f64::INFINITY, 30.0).unwrap(), 30.0);
        assert_eq!(softcap(f64::NEG_INFINITY, 30.0).unwrap(), -30.0);
        assert!(softcap(f64::NAN, 30.0).unwrap().is_nan());
        let (x, c) = (0.5_f64, 30.0);
        assert!((softcap(x, c).unwrap() - c * (x / c).tanh()).abs() < 1e-16);
    }

    #[test]
    fn diagnose_checks_the_weights_size_first() {
        let q = DMatrix::<f32>::zeros(1 << 32, 0);
        assert!(matches!(
            diagnose(&q, &q, &Mask::none(), &AttentionOptions::new()),
            Err(crate::Error::TooLarge { .. })
        ));
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
