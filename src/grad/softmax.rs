//! Gradients of softmax, log-softmax and entropy with respect to the logits.

use crate::Float;
use crate::entropy::entropy_from_logits;
use crate::error::{Error, Result};
use crate::prelude::*;
use crate::softmax::{log_softmax, softmax};
use nalgebra::DMatrix;

/// Checks that the upstream vector `g` (named `arg`) matches the logits in length and is finite.
fn check_upstream<T: Float>(arg: &'static str, g: &[T], len: usize) -> Result<()> {
    if g.len() != len {
        return Err(Error::LengthMismatch {
            arg,
            found: g.len(),
            expected: len,
        });
    }
    match g.iter().position(|x| !x.is_finite()) {
        Some(col) => Err(Error::NonFinite { arg, row: 0, col }),
        None => Ok(()),
    }
}

/// `out_i = p_i (g_i − ⟨g, p⟩)`: the softmax VJP (and JVP) from the probabilities `p`.
///
/// Entries with `p_i = 0` (masked keys, rows with no allowed key) get exactly 0.
pub(crate) fn softmax_vjp_from_probs<T: Float>(p: &[T], g: &[T], out: &mut [T]) {
    let dot = p.iter().zip(g).fold(
        T::zero(),
        |acc, (&pi, &gi)| if pi == T::zero() { acc } else { acc + pi * gi },
    );
    for ((o, &pi), &gi) in out.iter_mut().zip(p).zip(g) {
        *o = if pi == T::zero() {
            T::zero()
        } else {
            pi * (gi - dot)
        };
    }
}

/// Vector-Jacobian product of softmax: the gradient `∂L/∂s` of a loss `L` through
/// `p = softmax(s)`, given the upstream gradient `g = ∂L/∂p`:
///
/// ```text
/// ∂L/∂s_i = Σ_j g_j ∂p_j/∂s_i = p_i (g_i − ⟨g, p⟩)
/// ```
///
/// `p` is computed from the logits `s` with [`softmax`](crate::softmax()). A `-inf` logit (a
/// masked entry) has `p_i = 0` and gets gradient exactly 0, and so does every entry of a
/// fully masked (all `-inf`) or empty row. The gradient sums to 0 (softmax is invariant to
/// adding a constant to every logit). A NaN logit gives NaN.
///
/// # Errors
///
/// - [`Error::LengthMismatch`] if `g` is not as long as `s`;
/// - [`Error::NonFinite`] if `g` holds NaN or an infinity.
///
/// # Examples
///
/// ```
/// use attention_math::softmax_vjp;
///
/// // Uniform p = (1/2, 1/2): ∂L/∂s = p ⊙ (g − ⟨g, p⟩) = (1/2)(1 − 1/2, 0 − 1/2).
/// let ds = softmax_vjp(&[0.0_f64, 0.0], &[1.0, 0.0])?;
/// assert_eq!(ds, vec![0.25, -0.25]);
/// // A masked logit gets no gradient.
/// let ds = softmax_vjp(&[0.0_f64, f64::NEG_INFINITY], &[1.0, 5.0])?;
/// assert_eq!(ds, vec![0.0, 0.0]);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn softmax_vjp<T: Float>(s: &[T], g: &[T]) -> Result<Vec<T>> {
    check_upstream("g", g, s.len())?;
    let p = softmax(s);
    let mut out = vec![T::zero(); s.len()];
    softmax_vjp_from_probs(&p, g, &mut out);
    Ok(out)
}

/// Jacobian-vector product of softmax: the directional derivative of `p = softmax(s)` along
/// a tangent `t` of the logits:
///
/// ```text
/// dp_i = Σ_j (∂p_i/∂s_j) t_j = p_i (t_i − ⟨t, p⟩)
/// ```
///
/// The Jacobian `diag(p) − p pᵀ` is symmetric, so this is the same formula as
/// [`softmax_vjp`]; it is offered under its own name for forward-mode code. Entries with a
/// `-inf` logit, and fully masked rows, give 0.
///
/// # Errors
///
/// - [`Error::LengthMismatch`] if `t` is not as long as `s`;
/// - [`Error::NonFinite`] if `t` holds NaN or an infinity.
///
/// # Examples
///
/// ```
/// use attention_math::{softmax, softmax_jvp};
///
/// // Moving every logit by the same amount does not change softmax.
/// let s = [0.3_f64, -1.0, 2.0];
/// let dp = softmax_jvp(&s, &[1.0, 1.0, 1.0])?;
/// assert!(dp.iter().all(|x| x.abs() < 1e-16));
/// // Compare with a finite difference along t.
/// let t = [1.0, 0.0, -1.0];
/// let dp = softmax_jvp(&s, &t)?;
/// let h = 1e-6;
/// let plus = softmax(&[s[0] + h, s[1], s[2] - h]);
/// let minus = softmax(&[s[0] - h, s[1], s[2] + h]);
/// for i in 0..3 {
///     assert!((dp[i] - (plus[i] - minus[i]) / (2.0 * h)).abs() < 1e-9);
/// }
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn softmax_jvp<T: Float>(s: &[T], t: &[T]) -> Result<Vec<T>> {
    check_upstream("t", t, s.len())?;
    let p = softmax(s);
    let mut out = vec![T::zero(); s.len()];
    softmax_vjp_from_probs(&p, t, &mut out);
    Ok(out)
}

/// The full Jacobian of softmax at the logits `s`: the m x m matrix
///
/// ```text
/// J_ij = ∂p_i/∂s_j = p_i (δ_ij − p_j),   J = diag(p) − p pᵀ
/// ```
///
/// It is symmetric, positive semi-definite, and its rows and columns sum to 0. Rows and
/// columns of `-inf` logits are 0; a fully masked row gives the zero matrix. This costs
/// O(m²): meant for small rows, teaching and tests; use [`softmax_vjp`] for products.
///
/// # Examples
///
/// ```
/// use attention_math::softmax_jacobian;
/// use nalgebra::dmatrix;
///
/// let j = softmax_jacobian(&[0.0_f64, 0.0]);
/// assert_eq!(j, dmatrix![0.25, -0.25; -0.25, 0.25]);
/// assert_eq!(softmax_jacobian(&[f64::NEG_INFINITY; 2]), dmatrix![0.0, 0.0; 0.0, 0.0]);
/// ```
pub fn softmax_jacobian<T: Float>(s: &[T]) -> DMatrix<T> {
    let p = softmax(s);
    DMatrix::from_fn(p.len(), p.len(), |i, j| {
        if i == j {
            p[i] - p[i] * p[i]
        } else {
            -(p[i] * p[j])
        }
    })
}

/// Vector-Jacobian product of log-softmax: the gradient `∂L/∂s` through
/// `y = log_softmax(s)`, given `g = ∂L/∂y`:
///
/// ```text
/// ∂L/∂s_i = g_i − p_i Σ_j g_j,      p = softmax(s)
/// ```
///
/// A `-inf` logit is a masked entry, not a variable: its gradient is exactly 0, and every
/// entry of a fully masked row is 0. The sum `Σ_j g_j` runs over all entries, including
/// masked ones (the limit of the formula as a logit tends to `-inf`). This equals PyTorch's
/// `masked_fill(-inf)` followed by `log_softmax`, differentiated together.
///
/// # Errors
///
/// - [`Error::LengthMismatch`] if `g` is not as long as `s`;
/// - [`Error::NonFinite`] if `g` holds NaN or an infinity.
///
/// # Examples
///
/// ```
/// use attention_math::log_softmax_vjp;
///
/// // Cross-entropy with target 0: L = −y_0, so g = (−1, 0) and ∂L/∂s = p − onehot(0).
/// let ds = log_softmax_vjp(&[0.0_f64, 0.0], &[-1.0, 0.0])?;
/// assert_eq!(ds, vec![-0.5, 0.5]);
/// let ds = log_softmax_vjp(&[0.0_f64, f64::NEG_INFINITY], &[-1.0, 0.0])?;
/// assert_eq!(ds, vec![0.0, 0.0]);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn log_softmax_vjp<T: Float>(s: &[T], g: &[T]) -> Result<Vec<T>> {
    check_upstream("g", g, s.len())?;
    let p = softmax(s);
    let total = g.iter().fold(T::zero(), |acc, &gi| acc + gi);
    Ok(s.iter()
        .zip(&p)
        .zip(g)
        .map(|((&si, &pi), &gi)| {
            if si == T::NEG_INFINITY {
                T::zero()
            } else {
                gi - pi * total
            }
        })
        .collect())
}

/// Gradient of the entropy of `softmax(s)` with respect to the logits `s`:
///
/// ```text
/// H = −Σ_i p_i ln p_i,   p = softmax(s)
/// ∂H/∂s_i = −p_i (ln p_i + H)
/// ```
///
/// Computed stably from the logits: `ln p_i` is [`log_softmax`](crate::log_softmax()) (never
/// the logarithm of an underflowed probability) and `H` is
/// [`entropy_from_logits`](crate::entropy_from_logits). Entries with `p_i = 0` (`-inf`
/// logits, or logits so far below the maximum that their probability underflows) get 0;
/// a fully masked or empty row gives all zeros. The gradient sums to 0. A NaN logit gives NaN.
///
/// Descending this gradient sharpens the distribution; it is what an entropy regulariser on
/// attention (seed question 7) back-propagates.
///
/// # Examples
///
/// ```
/// use attention_math::entropy_from_logits_grad;
///
/// // Uniform logits maximise the entropy: the gradient is 0.
/// let g = entropy_from_logits_grad(&[0.5_f64, 0.5, 0.5]);
/// assert!(g.iter().all(|x| x.abs() < 1e-15));
/// // Two logits: H(σ(x)) with x = s_0 − s_1 has derivative −x σ(x) σ(−x).
/// let g = entropy_from_logits_grad(&[1.0_f64, 0.0]);
/// let (a, b) = (1.0 / (1.0 + (-1.0_f64).exp()), 1.0 / (1.0 + 1.0_f64.exp()));
/// assert!((g[0] - (-a * b)).abs() < 1e-15);
/// assert!((g[1] - a * b).abs() < 1e-15);
/// ```
pub fn entropy_from_logits_grad<T: Float>(s: &[T]) -> Vec<T> {
    let p = softmax(s);
    let log_p = log_softmax(s);
    let h = entropy_from_logits(s);
    p.iter()
        .zip(&log_p)
        .map(|(&pi, &lpi)| {
            if pi == T::zero() {
                T::zero()
            } else {
                -pi * (lpi + h)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entropy::entropy;
    use crate::softmax::log_softmax;

    /// Central differences of a scalar function of a vector.
    fn numeric_grad(f: impl Fn(&[f64]) -> f64, x: &[f64]) -> Vec<f64> {
        let h = 1e-6;
        (0..x.len())
            .map(|i| {
                let mut a = x.to_vec();
                let mut b = x.to_vec();
                a[i] += h;
                b[i] -= h;
                (f(&a) - f(&b)) / (2.0 * h)
            })
            .collect()
    }

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    const S: [f64; 5] = [0.3, -1.2, 2.0, 0.0, 0.7];
    const G: [f64; 5] = [1.0, -0.5, 0.25, 2.0, -1.5];

    #[test]
    fn vjp_jvp_match_jacobian_and_finite_differences() {
        let j = softmax_jacobian(&S);
        let g = nalgebra::DVector::from_column_slice(&G);
        let vjp = softmax_vjp(&S, &G).unwrap();
        close(&vjp, (j.transpose() * &g).as_slice(), 1e-15);
        let jvp = softmax_jvp(&S, &G).unwrap();
        close(&jvp, (&j * &g).as_slice(), 1e-15);
        let fd = numeric_grad(|s| softmax(s).iter().zip(&G).map(|(p, g)| p * g).sum(), &S);
        close(&vjp, &fd, 1e-9);
        assert!(vjp.iter().sum::<f64>().abs() < 1e-15);
        // Jacobian rows sum to 0 and it is symmetric.
        for i in 0..5 {
            assert!(j.row(i).sum().abs() < 1e-16);
            for k in 0..5 {
                assert_eq!(j[(i, k)], j[(k, i)]);
            }
        }
    }

    #[test]
    fn log_softmax_vjp_matches_finite_differences() {
        let ds = log_softmax_vjp(&S, &G).unwrap();
        let fd = numeric_grad(
            |s| log_softmax(s).iter().zip(&G).map(|(y, g)| y * g).sum(),
            &S,
        );
        close(&ds, &fd, 1e-8);
        // With a masked entry: the others see the limit formula, including g at the mask.
        let mut s = S;
        s[1] = f64::NEG_INFINITY;
        let ds = log_softmax_vjp(&s, &G).unwrap();
        assert_eq!(ds[1], 0.0);
        let mut far = S;
        far[1] = -40.0; // p_1 ≈ 1e-18: −inf for the others, but still differentiable
        let fd = numeric_grad(
            |s| log_softmax(s).iter().zip(&G).map(|(y, g)| y * g).sum(),
            &far,
        );
        for i in [0, 2, 3, 4] {
            assert!((ds[i] - fd[i]).abs() < 1e-8);
        }
    }

    #[test]
    fn entropy_grad_matches_finite_differences() {
        let g = entropy_from_logits_grad(&S);
        let fd = numeric_grad(|s| entropy(&softmax(s)), &S);
        close(&g, &fd, 1e-9);
        assert!(g.iter().sum::<f64>().abs() < 1e-15);
        // Masked entries: 0 there, the rest as without them.
        let s = [0.3, f64::NEG_INFINITY, 2.0];
        let g = entropy_from_logits_grad(&s);
        let g2 = entropy_from_logits_grad(&[0.3, 2.0]);
        assert_eq!(g[1], 0.0);
        close(&[g[0], g[2]], &g2, 1e-16);
    }

    #[test]
    fn masked_and_degenerate_rows_give_zero_never_nan() {
        let ninf = f64::NEG_INFINITY;
        let all = [ninf; 3];
        assert_eq!(softmax_vjp(&all, &[1.0, 2.0, 3.0]).unwrap(), vec![0.0; 3]);
        assert_eq!(softmax_jvp(&all, &[1.0, 2.0, 3.0]).unwrap(), vec![0.0; 3]);
        assert_eq!(
            log_softmax_vjp(&all, &[1.0, 2.0, 3.0]).unwrap(),
            vec![0.0; 3]
        );
        assert_eq!(entropy_from_logits_grad(&all), vec![0.0; 3]);
        assert!(softmax_vjp::<f64>(&[], &[]).unwrap().is_empty());
        assert!(entropy_from_logits_grad::<f32>(&[]).is_empty());
        // Huge gaps: one-hot, zero gradients, finite.
        assert_eq!(entropy_from_logits_grad(&[1e30_f32, 0.0]), vec![0.0, 0.0]);
        assert_eq!(
            softmax_vjp(&[1e30_f32, 0.0], &[1.0, 0.0]).unwrap(),
            vec![0.0, 0.0]
        );
        // +inf logits share the mass; entropy ln 2 is stationary there.
        let inf = f64::INFINITY;
        assert_eq!(entropy_from_logits_grad(&[inf, 0.0, inf]), vec![0.0; 3]);
        // NaN propagates.
        assert!(entropy_from_logits_grad(&[f64::NAN, 0.0])[0].is_nan());
    }

    #[test]
    fn bad_upstream_is_an_error() {
        assert_eq!(
            softmax_vjp(&[0.0_f64, 1.0], &[1.0]),
            Err(Error::LengthMismatch {
                arg: "g",
                found: 1,
                expected: 2
            })
        );
        assert_eq!(
            softmax_jvp(&[0.0_f32, 1.0], &[1.0, f32::NAN]),
            Err(Error::NonFinite {
                arg: "t",
                row: 0,
                col: 1
            })
        );
        assert!(matches!(
            log_softmax_vjp(&[0.0_f64], &[f64::INFINITY]),
            Err(Error::NonFinite { arg: "g", .. })
        ));
    }

    #[test]
    fn f32_agrees_with_f64() {
        let s32: Vec<f32> = S.iter().map(|&x| x as f32).collect();
        let g32: Vec<f32> = G.iter().map(|&x| x as f32).collect();
        let a = softmax_vjp(&s32, &g32).unwrap();
        let b = softmax_vjp(&S, &G).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((*x as f64 - y).abs() < 1e-6);
        }
        let a = entropy_from_logits_grad(&s32);
        let b = entropy_from_logits_grad(&S);
        for (x, y) in a.iter().zip(&b) {
            assert!((*x as f64 - y).abs() < 1e-6);
        }
    }
}
