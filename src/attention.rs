//! Scaled dot-product attention: the entry points and the reference oracle.
//!
//! The math and the design are in `src/guide/attention.md`, rendered as
//! [`crate::guide::attention`].

use crate::Float;
use crate::error::{Result, checked_len};
use crate::kernel;
use crate::mask::Mask;
use crate::softmax::{logsumexp, softmax_in_place};
use crate::spec::{AttentionOptions, AttentionOutput, plan, problem};
use nalgebra::{DMatrix, DMatrixView, DVector};

#[cfg(doc)]
use crate::error::Error;

/// Scaled dot-product attention, `softmax(Q Kᵀ / √d + mask) V`.
///
/// Shapes: `q` is n x d, `k` is m x d, `v` is m x d_v (rows are tokens); the result is
/// n x d_v. Arguments may be `&DMatrix<T>` or any [`DMatrixView`] (row or column slices of
/// a larger matrix), for `T` = `f32` or `f64`. The mask follows [`Mask`]'s polarity (`true`
/// = may attend); a query row with no allowed key gets an output row of zeros.
/// For a scale override, softcap, bias, the weights or the log-sum-exp, use
/// [`scaled_attention_with`]; the full formula is in the [guide](crate::guide::attention).
///
/// # Errors
///
/// - [`Error::DimensionMismatch`] if `k` has a different number of columns than `q`, or `v`
///   a different number of rows than `k`;
/// - [`Error::NonFinite`] if `q`, `k` or `v` holds NaN or an infinity;
/// - [`Error::TooLarge`] if the output or a packed copy of an input would not fit in memory
///   (sizes near `usize::MAX`: a wrapped size never reaches an allocation).
///
/// Empty inputs are fine: n = 0 gives a 0 x d_v result, m = 0 a zero n x d_v result.
///
/// # Examples
///
/// ```
/// use attention_math::{scaled_attention, Mask};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f32>::from_fn(4, 8, |i, j| ((i * 8 + j) as f32).sin());
/// let k = DMatrix::<f32>::from_fn(4, 8, |i, j| ((i * 8 + j) as f32).cos());
/// let v = DMatrix::<f32>::from_fn(4, 2, |i, j| (i + j) as f32);
/// let out: DMatrix<f32> = scaled_attention(&q, &k, &v, &Mask::causal())?;
/// assert_eq!(out.shape(), (4, 2));
/// // The first query sees only the first key, so it copies the first value row.
/// assert_eq!(out.row(0), v.row(0));
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn scaled_attention<'q, 'k, 'v, T: Float>(
    q: impl Into<DMatrixView<'q, T>>,
    k: impl Into<DMatrixView<'k, T>>,
    v: impl Into<DMatrixView<'v, T>>,
    mask: &Mask,
) -> Result<DMatrix<T>> {
    scaled_attention_with(q, k, v, mask, &AttentionOptions::new()).map(|o| o.output)
}

/// Scaled dot-product attention with options: scale, softcap, bias, and the log-sum-exp
/// and weights returned alongside the output. See the [guide](crate::guide::attention) for the formula.
///
/// This runs the tiled [kernel](crate::guide::kernel): Q, K and V are packed once (O((n + m)·d)
/// memory), the n x m scores are never built, tiles the mask rules out are skipped, and the
/// work is spread over rayon threads as [`AttentionOptions::threads`] says, with the same
/// bits for any thread count. Only if [`AttentionOptions::return_weights`] is set does it run
/// [`scaled_attention_reference`] instead, since the weights are the n x m matrix. Both paths
/// compute the same function; they agree to rounding (about 1e-15 relative in f64, 1e-6 in
/// f32).
///
/// # Errors
///
/// Those of [`scaled_attention`], and:
/// - [`Error::ShapeMismatch`] if the bias is not n x m;
/// - [`Error::NonFinite`] if the bias holds NaN or `+inf` (`-inf` is allowed: it masks);
/// - [`Error::InvalidParameter`] if the softcap is not finite and > 0, or the scale is not
///   finite.
///
/// # Examples
///
/// ```
/// use attention_math::{scaled_attention_with, AttentionOptions, Mask};
/// use nalgebra::DMatrix;
///
/// let x = DMatrix::<f64>::from_fn(3, 2, |i, j| (i as f64) - (j as f64));
/// let out = scaled_attention_with(&x, &x, &x, &Mask::key_padding(0), &AttentionOptions::new())?;
/// // Every row is fully masked: zeros and lse = -inf, never NaN.
/// assert!(out.output.iter().all(|&o| o == 0.0));
/// assert!(out.lse.iter().all(|&l| l == f64::NEG_INFINITY));
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn scaled_attention_with<'q, 'k, 'v, T: Float>(
    q: impl Into<DMatrixView<'q, T>>,
    k: impl Into<DMatrixView<'k, T>>,
    v: impl Into<DMatrixView<'v, T>>,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
) -> Result<AttentionOutput<T>> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    if opts.weights {
        return scaled_attention_reference(q, k, v, mask, opts);
    }
    let problem = problem(q, k, v, mask, opts)?;
    let mut out = kernel::attend(std::slice::from_ref(&problem), 1, opts.threads);
    Ok(out.pop().expect("one problem, one result"))
}

/// The reference implementation: builds the n x m score matrix, applies scale, softcap,
/// bias and mask entry by entry, takes the row softmax with [`softmax()`](crate::softmax()), and
/// multiplies by V.
///
/// It is deliberately plain, O(n·m) in memory, and the oracle every faster path is tested
/// against; prefer [`scaled_attention_with`] in real code. Same semantics and errors.
///
/// # Examples
///
/// ```
/// use attention_math::{scaled_attention_reference, scaled_attention_with, AttentionOptions, Mask};
/// use nalgebra::DMatrix;
///
/// let x = DMatrix::<f64>::from_fn(5, 3, |i, j| ((i * 3 + j) as f64).sin());
/// let opts = AttentionOptions::new();
/// let fast = scaled_attention_with(&x, &x, &x, &Mask::causal(), &opts)?;
/// let slow = scaled_attention_reference(&x, &x, &x, &Mask::causal(), &opts)?;
/// assert!((fast.output - slow.output).amax() < 1e-12);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn scaled_attention_reference<'q, 'k, 'v, T: Float>(
    q: impl Into<DMatrixView<'q, T>>,
    k: impl Into<DMatrixView<'k, T>>,
    v: impl Into<DMatrixView<'v, T>>,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
) -> Result<AttentionOutput<T>> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    let plan = plan(&q, &k, &v, opts)?;
    let (n, m) = (plan.n, plan.m);
    checked_len::<T>("the n x m weights", n, m)?;
    let dots = q * k.transpose();
    let mut weights = DMatrix::<T>::zeros(n, m);
    let mut lse = DVector::<T>::zeros(n);
    let mut row = vec![T::zero(); m];
    for i in 0..n {
        for (j, s) in row.iter_mut().enumerate() {
            *s = if mask.allows_in(n, m, i, j) {
                plan.score(dots[(i, j)], opts.bias.as_ref().map(|b| b[(i, j)]))
            } else {
                T::NEG_INFINITY
            };
        }
        lse[i] = logsumexp(&row);
        softmax_in_place(&mut row);
        for (j, p) in row.iter().enumerate() {
            weights[(i, j)] = *p;
        }
    }
    let output = &weights * v;
    Ok(AttentionOutput {
        output,
        lse,
        weights: opts.weights.then_some(weights),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use nalgebra::dmatrix;

    #[test]
    fn two_keys_by_hand() {
        // q·k = (2, 0), scale 1/√2: weights ∝ (e^√2, 1).
        let q = dmatrix![1.0_f64, 1.0];
        let k = dmatrix![1.0_f64, 1.0; 0.0, 0.0];
        let v = dmatrix![1.0_f64, 0.0; 0.0, 1.0];
        let out = scaled_attention(&q, &k, &v, &Mask::none()).unwrap();
        let a = 2.0_f64.sqrt().exp();
        assert!((out[(0, 0)] - a / (a + 1.0)).abs() < 1e-15);
        assert!((out[(0, 1)] - 1.0 / (a + 1.0)).abs() < 1e-15);
    }

    #[test]
    fn errors_name_argument_and_shape() {
        let q = DMatrix::<f32>::zeros(2, 3);
        let k = DMatrix::<f32>::zeros(4, 3);
        let v = DMatrix::<f32>::zeros(5, 1);
        let e = scaled_attention(&q, &k, &v, &Mask::none()).unwrap_err();
        assert_eq!(e.to_string(), "v has 5 rows but k has 4");
        let mut k2 = k.clone();
        k2[(1, 2)] = f32::NAN;
        let e = scaled_attention(&q, &k2, &k, &Mask::none()).unwrap_err();
        assert_eq!(
            e,
            Error::NonFinite {
                arg: "k",
                row: 1,
                col: 2
            }
        );
        let bias = DMatrix::<f32>::zeros(2, 3);
        let e = scaled_attention_with(
            &q,
            &k,
            &k,
            &Mask::none(),
            &AttentionOptions::new().bias(&bias),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "bias is 2 x 3 but must be 2 x 4");
        for c in [0.0, -2.0, f32::NAN, f32::INFINITY] {
            let e = scaled_attention_with(
                &q,
                &k,
                &k,
                &Mask::none(),
                &AttentionOptions::new().softcap(c),
            );
            assert!(matches!(
                e,
                Err(Error::InvalidParameter {
                    name: "softcap",
                    ..
                })
            ));
        }
        let e = scaled_attention_with(
            &q,
            &k,
            &k,
            &Mask::none(),
            &AttentionOptions::new().scale(f32::NAN),
        );
        assert!(matches!(
            e,
            Err(Error::InvalidParameter { name: "scale", .. })
        ));
        let mut bias = DMatrix::<f32>::zeros(2, 4);
        bias[(0, 0)] = f32::INFINITY;
        let e = scaled_attention_with(
            &q,
            &k,
            &k,
            &Mask::none(),
            &AttentionOptions::new().bias(&bias),
        );
        assert_eq!(
            e.unwrap_err(),
            Error::NonFinite {
                arg: "bias",
                row: 0,
                col: 0
            }
        );
    }

    #[test]
    fn empty_shapes_are_defined() {
        let q = DMatrix::<f64>::zeros(0, 3);
        let k = DMatrix::<f64>::zeros(4, 3);
        let v = DMatrix::<f64>::zeros(4, 2);
        assert_eq!(
            scaled_attention(&q, &k, &v, &Mask::none()).unwrap().shape(),
            (0, 2)
        );
        let q = DMatrix::<f64>::from_element(2, 3, 1.0);
        let k = DMatrix::<f64>::zeros(0, 3);
        let v = DMatrix::<f64>::zeros(0, 2);
        let out =
            scaled_attention_with(&q, &k, &v, &Mask::none(), &AttentionOptions::new()).unwrap();
        assert_eq!(out.output, DMatrix::zeros(2, 2));
        assert!(out.lse.iter().all(|&l| l == f64::NEG_INFINITY));
        // d = 0: uniform weights over allowed keys.
        let q = DMatrix::<f64>::zeros(2, 0);
        let k = DMatrix::<f64>::zeros(2, 0);
        let v = dmatrix![1.0_f64; 3.0];
        let out = scaled_attention(&q, &k, &v, &Mask::causal()).unwrap();
        assert_eq!(out, dmatrix![1.0; 2.0]);
    }

    #[test]
    fn views_are_accepted() {
        let big = DMatrix::<f64>::from_fn(6, 4, |i, j| (i as f64 * 0.3 - j as f64 * 0.7).cos());
        let q = big.rows(0, 3);
        let k = big.rows(2, 4);
        let v = big.columns(1, 2).rows(2, 4).into_owned();
        let a = scaled_attention(q, k, &v, &Mask::none()).unwrap();
        let b = scaled_attention(&q.into_owned(), &k.into_owned(), &v, &Mask::none()).unwrap();
        assert_eq!(a, b);
    }
}
