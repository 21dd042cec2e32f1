//! Entropy and KL divergence.
//!
//! The math and the design are in `src/guide/entropy.md`, rendered as
//! [`crate::guide::entropy`].

use crate::Float;
use crate::error::{Error, Result};
use crate::softmax::{Peak, peak, reduce_rows, shifted_rest};
use nalgebra::{DMatrixView, DVector};

/// `p ln p` with the limit `0 ln 0 = 0`.
fn plogp<T: Float>(p: T) -> T {
    if p == T::zero() {
        T::zero()
    } else {
        p * p.ln()
    }
}

/// Shannon entropy in nats: `H(p) = −Σ_i p_i ln p_i`, with `0 ln 0 = 0`.
///
/// `p` is used as given (not renormalised); entries should be non-negative, and a negative
/// or NaN entry yields NaN. An empty or all-zero `p` has entropy 0.
///
/// Accuracy: every term `−p_i ln p_i` of a probability vector is non-negative, so the sum
/// cannot cancel: the relative error is at most about `(m + 2) · ε`.
///
/// # Examples
///
/// ```
/// use attention_math::entropy;
///
/// assert_eq!(entropy(&[1.0_f64, 0.0, 0.0]), 0.0);
/// let uniform = [0.25_f64; 4];
/// assert!((entropy(&uniform) - 4.0_f64.ln()).abs() < 1e-15);
/// ```
pub fn entropy<T: Float>(p: &[T]) -> T {
    -p.iter().fold(T::zero(), |acc, &pi| acc + plogp(pi))
}

/// Shannon entropy in bits: `H(p) / ln 2`.
///
/// # Examples
///
/// ```
/// use attention_math::entropy_bits;
///
/// assert!((entropy_bits(&[0.5_f32, 0.5]) - 1.0).abs() < 1e-6);
/// ```
pub fn entropy_bits<T: Float>(p: &[T]) -> T {
    entropy(p) / T::ln_2()
}

/// Entropy in nats of `softmax(s)`, computed from the logits as `lse(s) − Σ_i p_i s_i`.
///
/// This never takes the logarithm of a probability, so it stays accurate where
/// probabilities underflow. Entries of `-inf` carry no mass and contribute nothing; an
/// empty or all-`-inf` row (fully masked) has entropy 0, matching [`entropy`] of its
/// all-zero weights. `c` entries of `+inf` give `ln c`; a NaN gives NaN.
///
/// It is evaluated on the shifted logits `z_i = s_i − max`, as `Σ_i p_i (L − z_i)` with
/// `L = ln Σ_j exp(z_j)` in `[0, ln m]` (as `ln_1p` of the sum without the maximum's 1, accurate
/// for nearly one-hot rows) and `p_i = exp(z_i − L)`: every term is
/// non-negative and no large number is subtracted from another, so huge logits keep their
/// entropy (`[1e8, 1e8]` in f32 gives `ln 2`, where `lse(s) − s_i` would round to 0).
///
/// Accuracy: beyond the rounding of the shifted logits (the input's own conditioning,
/// `ε · |s_i|` absolute per logit), the relative error is at most about `(m + 4) · ε`.
///
/// # Examples
///
/// ```
/// use attention_math::{entropy, entropy_from_logits, softmax};
///
/// let s = [0.3_f64, -1.2, 2.0, 0.0];
/// assert!((entropy_from_logits(&s) - entropy(&softmax(&s))).abs() < 1e-15);
/// assert_eq!(entropy_from_logits(&[f64::NEG_INFINITY; 3]), 0.0);
/// // Huge logit gaps: the winner takes all, entropy 0.
/// assert_eq!(entropy_from_logits(&[1e30_f32, 0.0]), 0.0);
/// // Huge equal logits: still two equally likely outcomes.
/// assert!((entropy_from_logits(&[1e8_f32, 1e8]) - 2.0_f32.ln()).abs() < 1e-7);
/// ```
pub fn entropy_from_logits<T: Float>(s: &[T]) -> T {
    match peak(s) {
        Peak::Nan => T::NAN,
        Peak::Nothing => T::zero(),
        Peak::Infinite { count } => T::of_usize(count).ln(),
        Peak::Finite(max) => {
            let lse = shifted_rest(s, max).ln_1p();
            // Σ p_i (L − z_i): each term is >= 0, so the sum cannot cancel below zero.
            s.iter().fold(T::zero(), |acc, &si| {
                let gap = lse - (si - max);
                let p = (-gap).exp();
                if p == T::zero() { acc } else { acc + p * gap }
            })
        }
    }
}

/// Kullback-Leibler divergence in nats: `KL(p ‖ q) = Σ_i p_i ln(p_i / q_i)`.
///
/// Terms with `p_i = 0` are 0; a term with `p_i > 0` and `q_i = 0` makes the result `+inf`.
/// Neither argument is renormalised. A NaN or negative entry makes the result NaN.
///
/// Each logarithm is taken in its most accurate form: `ln_1p((p_i − q_i) / q_i)` when
/// `p_i / q_i` is within `[1/2, 2]` (the subtraction is then exact, so nearly equal
/// distributions give a tiny, accurate, non-cancelled term), `ln(p_i / q_i)` when the ratio is
/// a normal float, and `ln p_i − ln q_i` when the ratio would overflow or underflow
/// (`p = 1`, `q = 1e-310` gives `ln 1e310 ≈ 713.8`, not `+inf`).
///
/// Accuracy: each term has a relative error of a few ε; the sum of terms of mixed signs can
/// cancel (KL is a difference of cross-entropy and entropy), so the result's error is a few
/// ε times `Σ_i |p_i ln(p_i / q_i)|`.
///
/// # Errors
///
/// [`Error::LengthMismatch`] if `p` and `q` differ in length.
///
/// # Examples
///
/// ```
/// use attention_math::kl_divergence;
///
/// let p = [0.5_f64, 0.5];
/// assert_eq!(kl_divergence(&p, &p).unwrap(), 0.0);
/// let q = [0.25_f64, 0.75];
/// let expected = 0.5 * (2.0_f64).ln() + 0.5 * (0.5_f64 / 0.75).ln();
/// assert!((kl_divergence(&p, &q).unwrap() - expected).abs() < 1e-15);
/// assert_eq!(kl_divergence(&[1.0_f64, 0.0], &[0.0, 1.0]).unwrap(), f64::INFINITY);
/// assert!(kl_divergence(&p, &[1.0]).is_err());
/// assert!(kl_divergence(&[f64::NAN, 1.0], &[0.0, 1.0]).unwrap().is_nan());
/// // A NaN in q is not skipped where p is 0.
/// assert!(kl_divergence(&[0.0_f64, 1.0], &[f64::NAN, 1.0]).unwrap().is_nan());
/// ```
pub fn kl_divergence<T: Float>(p: &[T], q: &[T]) -> Result<T> {
    if p.len() != q.len() {
        return Err(Error::LengthMismatch {
            arg: "q",
            found: q.len(),
            expected: p.len(),
        });
    }
    Ok(p.iter().zip(q).fold(T::zero(), |acc, (&pi, &qi)| {
        if !(pi >= T::zero() && qi >= T::zero()) {
            // Not a distribution: the documented NaN (a ratio of two negatives would
            // otherwise give a finite log; a NaN q where p = 0 would be skipped).
            T::NAN
        } else if pi == T::zero() {
            acc
        } else if qi == T::zero() {
            // Adding keeps a NaN seen earlier (or later) in the result.
            acc + if pi > T::zero() { T::INFINITY } else { T::NAN }
        } else {
            acc + pi * log_ratio(pi, qi)
        }
    }))
}

/// `ln(p / q)` for `p, q > 0`, in the most accurate of three forms (see [`kl_divergence`]);
/// NaN for a negative or NaN argument.
fn log_ratio<T: Float>(p: T, q: T) -> T {
    let r = p / q;
    let half = T::of_f64(0.5);
    if r >= half && r <= T::of_f64(2.0) {
        // Sterbenz: p − q is exact when q/2 <= p <= 2q.
        ((p - q) / q).ln_1p()
    } else if r.is_finite() && r >= min_normal::<T>() {
        r.ln()
    } else {
        p.ln() - q.ln()
    }
}

/// The smallest positive normal value of `T`.
fn min_normal<T: Float>() -> T {
    if T::NAME == "f32" {
        T::of_f64(f32::MIN_POSITIVE as f64)
    } else {
        T::of_f64(f64::MIN_POSITIVE)
    }
}

/// Entropy in nats of every row of a weight matrix (for example attention weights, n x m):
/// element `i` is [`entropy`] of row `i`.
///
/// # Examples
///
/// ```
/// use attention_math::entropy_rows;
/// use nalgebra::dmatrix;
///
/// let w = dmatrix![0.5_f64, 0.5; 1.0, 0.0; 0.0, 0.0];
/// let h = entropy_rows(&w);
/// assert!((h[0] - 2.0_f64.ln()).abs() < 1e-15);
/// assert_eq!(h[1], 0.0);
/// assert_eq!(h[2], 0.0); // a fully masked row
/// ```
pub fn entropy_rows<'a, T: Float>(p: impl Into<DMatrixView<'a, T>>) -> DVector<T> {
    let p = p.into();
    DVector::from_fn(p.nrows(), |i, _| {
        -p.row(i).iter().fold(T::zero(), |acc, &pi| acc + plogp(pi))
    })
}

/// Entropy in nats of the softmax of every row of a score matrix (n x m), via
/// [`entropy_from_logits`].
///
/// # Examples
///
/// ```
/// use attention_math::entropy_from_logits_rows;
/// use nalgebra::dmatrix;
///
/// let h = entropy_from_logits_rows(&dmatrix![0.0_f64, 0.0, 0.0, 0.0]);
/// assert!((h[0] - 4.0_f64.ln()).abs() < 1e-15);
/// ```
pub fn entropy_from_logits_rows<'a, T: Float>(s: impl Into<DMatrixView<'a, T>>) -> DVector<T> {
    reduce_rows(s.into(), entropy_from_logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;
    use crate::softmax::softmax;

    #[test]
    fn closed_forms() {
        let p = [0.5_f64, 0.25, 0.25];
        assert!((entropy(&p) - 1.5 * 2.0_f64.ln()).abs() < 1e-15);
        assert!((entropy_bits(&p) - 1.5).abs() < 1e-15);
        assert_eq!(entropy::<f64>(&[]), 0.0);
        assert_eq!(entropy(&[0.0_f64, 0.0]), 0.0);
        assert!(entropy(&[-0.5_f64, 1.5]).is_nan());
    }

    #[test]
    fn from_logits_matches_definition_and_edges() {
        let s = [1.0_f64, 2.0, f64::NEG_INFINITY, -3.0];
        assert!((entropy_from_logits(&s) - entropy(&softmax(&s))).abs() < 1e-15);
        assert_eq!(entropy_from_logits::<f64>(&[]), 0.0);
        let inf = f64::INFINITY;
        assert!((entropy_from_logits(&[inf, 0.0, inf]) - 2.0_f64.ln()).abs() < 1e-15);
        assert!(entropy_from_logits(&[f64::NAN]).is_nan());
    }

    #[test]
    fn from_logits_keeps_huge_equal_logits() {
        // Before: lse(s) − s_i rounded to 0 at 1e8 in f32 and the entropy came out 0.
        let h = entropy_from_logits(&[1e8_f32, 1e8]);
        assert!((h - 2.0_f32.ln()).abs() <= 2.0 * f32::EPSILON, "{h}");
        let h = entropy_from_logits(&[1e300_f64, 1e300, 1e300, f64::NEG_INFINITY]);
        assert!((h - 3.0_f64.ln()).abs() <= 4.0 * f64::EPSILON, "{h}");
        // A shift of 1e7 in f32 is exact on these logits and cannot change the entropy.
        let s = [0.0_f32, -1.0, -2.0, -3.0];
        let shifted: Vec<f32> = s.iter().map(|x| x + 1e7).collect();
        let h0 = entropy_from_logits(&s);
        assert!((entropy_from_logits(&shifted) - h0).abs() < 1e-6);
        // Opposite signs near the maximum: the difference overflows to -inf, p = 0.
        assert_eq!(entropy_from_logits(&[-3e38_f32, 3e38]), 0.0);
    }

    #[test]
    fn kl_uses_the_accurate_logarithm() {
        // Nearly equal distributions: p = q ± d exactly. The rounded ratio p / q near 1
        // carries an absolute error of up to ε/2, as large as the result once the ±d terms
        // cancel (ln(p / q) gives -4.2e-17 here); ln_1p of the exact p − q does not.
        let d = 2.0_f64.powi(-30);
        let (p, q) = ([0.3 + d, 0.7 - d], [0.3, 0.7]);
        let kl = kl_divergence(&p, &q).unwrap();
        let want = 2.06514699398933e-18; // 50-digit decimal evaluation, rounded
        assert!((kl / want - 1.0).abs() < 1e-6, "{kl} vs {want}");
        // The ratio overflows: ln p − ln q instead of ln(inf).
        let kl = kl_divergence(&[1.0_f64], &[1e-310]).unwrap();
        assert!((kl - 310.0 * 10.0_f64.ln()).abs() < 1e-12 * 713.8, "{kl}");
        let kl = kl_divergence(&[1e-30_f32], &[1e30]).unwrap();
        assert!(((kl as f64) - 1e-30 * (1e-60_f64).ln()).abs() < 1e-34);
        // NaN is never swallowed, even next to a q = 0 term.
        assert!(
            kl_divergence(&[f64::NAN, 1.0], &[0.5, 0.0])
                .unwrap()
                .is_nan()
        );
        assert!(
            kl_divergence(&[-0.5_f64, 1.0], &[0.0, 1.0])
                .unwrap()
                .is_nan()
        );
    }
}
