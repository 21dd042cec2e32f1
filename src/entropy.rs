//! Entropy and KL divergence.
//!
//! The math and the design are in `src/guide/entropy.md`, rendered as
//! [`crate::guide::entropy`].

use crate::Float;
use crate::error::{Error, Result};
use crate::softmax::{logsumexp, reduce_rows};
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
/// entry yields NaN. An empty or all-zero `p` has entropy 0.
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
/// ```
pub fn entropy_from_logits<T: Float>(s: &[T]) -> T {
    let lse = logsumexp(s);
    if lse.is_nan_value() {
        return T::NAN;
    }
    if lse == T::NEG_INFINITY {
        return T::zero();
    }
    if lse == T::INFINITY {
        let count = s.iter().filter(|&&x| x == T::INFINITY).count();
        return T::of_usize(count).ln();
    }
    // Σ p_i (lse − s_i): each term is >= 0, so the sum cannot cancel below zero.
    s.iter().fold(T::zero(), |acc, &si| {
        let gap = lse - si;
        let p = (-gap).exp();
        if p == T::zero() { acc } else { acc + p * gap }
    })
}

/// Kullback-Leibler divergence in nats: `KL(p ‖ q) = Σ_i p_i ln(p_i / q_i)`.
///
/// Terms with `p_i = 0` are 0; a term with `p_i > 0` and `q_i = 0` makes the result `+inf`.
/// Neither argument is renormalised.
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
        if pi == T::zero() {
            acc
        } else if qi == T::zero() {
            T::INFINITY
        } else {
            acc + pi * (pi / qi).ln()
        }
    }))
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
}
