//! Scaled dot-product attention: the entry points and the reference oracle.
//!
//! The math and the design are in `src/guide/attention.md`, rendered as
//! [`crate::guide::attention`].

use crate::Float;
use crate::error::{Axis, Error, Result, check_finite, check_positive};
use crate::kernel::forward::{Problem, forward};
use crate::kernel::{self, Exec, Isa};
use crate::mask::Mask;
use crate::softmax::{logsumexp, softmax_in_place};
use nalgebra::{DMatrix, DMatrixView, DVector};

/// Everything about an attention call beyond Q, K, V and the mask.
///
/// Built with chained setters from [`AttentionOptions::new`] (or `Default`); passed to
/// [`scaled_attention_with`] and [`scaled_attention_reference`].
///
/// # Examples
///
/// ```
/// use attention_math::{scaled_attention_with, AttentionOptions, Mask};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::from_fn(3, 4, |i, j| (i + j) as f64 * 0.1);
/// let alibi = DMatrix::<f64>::from_fn(3, 3, |i, j| -0.5 * (i as f64 - j as f64).abs());
/// let opts = AttentionOptions::new().softcap(30.0).bias(&alibi).return_weights(true);
/// let out = scaled_attention_with(&q, &q, &q, &Mask::causal(), &opts)?;
/// assert_eq!(out.weights.unwrap()[(0, 0)], 1.0);
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct AttentionOptions<'a, T: Float> {
    scale: Option<T>,
    softcap: Option<T>,
    bias: Option<DMatrixView<'a, T>>,
    weights: bool,
    threads: Option<usize>,
}

impl<'a, T: Float> AttentionOptions<'a, T> {
    /// The defaults: scale `1/√d`, no softcap, no bias, weights not returned.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::AttentionOptions;
    ///
    /// let opts = AttentionOptions::<f32>::new();
    /// # let _ = opts;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Overrides the score scale (default `1/√d`); any finite value is accepted.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{scaled_attention_with, AttentionOptions, Mask};
    /// use nalgebra::dmatrix;
    ///
    /// // With scale 0 every key gets the same weight.
    /// let q = dmatrix![1.0_f64, 2.0];
    /// let k = dmatrix![1.0_f64, 0.0; 0.0, 5.0];
    /// let v = dmatrix![2.0_f64; 4.0];
    /// let out = scaled_attention_with(&q, &k, &v, &Mask::none(), &AttentionOptions::new().scale(0.0))?;
    /// assert_eq!(out.output[(0, 0)], 3.0);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn scale(mut self, scale: T) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Caps the scaled scores smoothly: `S ← c · tanh(S / c)` (Gemma 2, Grok), applied
    /// before the bias and the mask. `c` must be finite and > 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{scaled_attention_with, AttentionOptions, Mask};
    /// use nalgebra::dmatrix;
    ///
    /// let q = dmatrix![100.0_f64];
    /// let k = dmatrix![100.0_f64; 0.0];
    /// let v = dmatrix![1.0_f64; 0.0];
    /// let out = scaled_attention_with(&q, &k, &v, &Mask::none(), &AttentionOptions::new().softcap(1.0))?;
    /// // Scores are capped at tanh(10000) ≈ 1 and 0, so the weight is e/(e+1), not ≈ 1.
    /// let e = 1.0_f64.exp();
    /// assert!((out.output[(0, 0)] - e / (e + 1.0)).abs() < 1e-12);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn softcap(mut self, cap: T) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// Adds an n x m bias to the scores (ALiBi, relative positions, or an arbitrary
    /// additive mask: `-inf` entries forbid; NaN and `+inf` are errors).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{scaled_attention_with, AttentionOptions, Mask};
    /// use nalgebra::{dmatrix, DMatrix};
    ///
    /// let q = DMatrix::<f64>::zeros(1, 2);
    /// let v = dmatrix![1.0_f64; 3.0];
    /// let bias = dmatrix![f64::NEG_INFINITY, 0.0];
    /// let out = scaled_attention_with(&q, &q.clone().resize(2, 2, 0.0), &v, &Mask::none(),
    ///     &AttentionOptions::new().bias(&bias))?;
    /// assert_eq!(out.output[(0, 0)], 3.0);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn bias(mut self, bias: impl Into<DMatrixView<'a, T>>) -> Self {
        self.bias = Some(bias.into());
        self
    }

    /// Asks for the n x m attention weights P in [`AttentionOutput::weights`]. This
    /// materialises the full matrix, which the fast path otherwise never does: with it,
    /// [`scaled_attention_with`] runs [`scaled_attention_reference`] instead of the tiled
    /// kernel (same results to rounding, O(n·m) memory, one thread).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{scaled_attention_with, AttentionOptions, Mask};
    /// use nalgebra::DMatrix;
    ///
    /// let x = DMatrix::<f32>::identity(3, 3);
    /// let out = scaled_attention_with(&x, &x, &x, &Mask::causal(), &AttentionOptions::new().return_weights(true))?;
    /// let w = out.weights.unwrap();
    /// assert_eq!(w[(0, 0)], 1.0);
    /// assert_eq!(w[(0, 1)], 0.0);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn return_weights(mut self, yes: bool) -> Self {
        self.weights = yes;
        self
    }

    /// Runs the call on a private pool of `threads` worker threads (1 = on the calling
    /// thread), without touching rayon's global pool. The crate builds one such pool per
    /// thread count, on first use, and reuses it. By default the call uses the current rayon
    /// pool. The result is bit-identical for every thread count; 0 is treated as 1. The
    /// reference implementation is always single-threaded.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{scaled_attention_with, AttentionOptions, Mask};
    /// use nalgebra::DMatrix;
    ///
    /// let x = DMatrix::<f32>::from_fn(300, 16, |i, j| ((i * 16 + j) as f32 * 0.01).sin());
    /// let one = scaled_attention_with(&x, &x, &x, &Mask::causal(), &AttentionOptions::new().threads(1))?;
    /// let two = scaled_attention_with(&x, &x, &x, &Mask::causal(), &AttentionOptions::new().threads(2))?;
    /// assert_eq!(one, two);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads.max(1));
        self
    }

    /// The additive bias, if one was given (for the backward pass).
    pub(crate) fn bias_view(&self) -> Option<&DMatrixView<'a, T>> {
        self.bias.as_ref()
    }

    /// The thread count set with [`AttentionOptions::threads`], if any (for the backward pass).
    pub(crate) fn thread_count(&self) -> Option<usize> {
        self.threads
    }
}

/// What an attention call returns beyond the output: the per-row log-sum-exp (what a
/// backward pass or a split-KV merge needs) and, if asked for, the weights.
///
/// # Examples
///
/// ```
/// use attention_math::{scaled_attention_with, AttentionOptions, Mask};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::zeros(2, 3);
/// let k = DMatrix::<f64>::zeros(4, 3);
/// let out = scaled_attention_with(&q, &k, &k, &Mask::none(), &AttentionOptions::new())?;
/// assert_eq!(out.output.shape(), (2, 3));
/// assert!((out.lse[0] - 4.0_f64.ln()).abs() < 1e-15); // four scores of 0
/// assert!(out.weights.is_none());
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionOutput<T: Float> {
    /// The output O, n x d_v.
    pub output: DMatrix<T>,
    /// `lse_i = ln Σ_j exp(S_ij)` over the allowed keys of row i (final scores, after
    /// scale, softcap and bias); `-inf` for a fully masked row. Length n.
    pub lse: DVector<T>,
    /// The weights P (n x m), only if [`AttentionOptions::return_weights`] was set.
    pub weights: Option<DMatrix<T>>,
}

/// The validated shape and parameters of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan<T> {
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub dv: usize,
    pub scale: T,
    pub softcap: Option<T>,
}

/// Checks shapes, finiteness and parameters; the one gate every attention path goes through.
pub(crate) fn plan<T: Float>(
    q: &DMatrixView<'_, T>,
    k: &DMatrixView<'_, T>,
    v: &DMatrixView<'_, T>,
    opts: &AttentionOptions<'_, T>,
) -> Result<Plan<T>> {
    let (n, d) = q.shape();
    let (m, dv) = (k.nrows(), v.ncols());
    if k.ncols() != d {
        return Err(Error::DimensionMismatch {
            arg: "k",
            axis: Axis::Cols,
            found: k.ncols(),
            other: "q",
            other_axis: Axis::Cols,
            expected: d,
        });
    }
    if v.nrows() != m {
        return Err(Error::DimensionMismatch {
            arg: "v",
            axis: Axis::Rows,
            found: v.nrows(),
            other: "k",
            other_axis: Axis::Rows,
            expected: m,
        });
    }
    check_finite("q", q)?;
    check_finite("k", k)?;
    check_finite("v", v)?;
    if let Some(bias) = &opts.bias {
        if bias.shape() != (n, m) {
            return Err(Error::ShapeMismatch {
                arg: "bias",
                found: bias.shape(),
                expected: (n, m),
            });
        }
        for j in 0..m {
            for i in 0..n {
                let b = bias[(i, j)];
                if b.is_nan_value() || b == T::INFINITY {
                    return Err(Error::NonFinite {
                        arg: "bias",
                        row: i,
                        col: j,
                    });
                }
            }
        }
    }
    if let Some(c) = opts.softcap {
        check_positive("softcap", c)?;
    }
    let scale = match opts.scale {
        Some(s) if !s.is_finite() => {
            return Err(Error::InvalidParameter {
                name: "scale",
                value: s.as_f64(),
                requirement: "must be finite",
            });
        }
        Some(s) => s,
        None if d == 0 => T::one(),
        None => T::one() / T::of_usize(d).sqrt(),
    };
    Ok(Plan {
        n,
        m,
        d,
        dv,
        scale,
        softcap: opts.softcap,
    })
}

impl<T: Float> Plan<T> {
    /// The final score of one pair from its raw dot product `q_i · k_j`, before masking.
    #[inline]
    pub(crate) fn score(&self, dot: T, bias: Option<T>) -> T {
        let mut s = self.scale * dot;
        if let Some(c) = self.softcap {
            s = c * (s / c).tanh();
        }
        match bias {
            Some(b) => s + b,
            None => s,
        }
    }

    /// The derivative of [`Plan::score`] with respect to the raw dot product:
    /// `scale` without a softcap, `scale · (1 − tanh²(scale · dot / c))` with one (the bias
    /// is additive and does not enter). Computed as `scale / cosh²(·)`, which keeps its
    /// relative accuracy where `tanh` saturates and tends to 0, never NaN, as `|dot|` grows.
    #[inline]
    pub(crate) fn score_grad(&self, dot: T) -> T {
        match self.softcap {
            None => self.scale,
            Some(c) => {
                let ch = (self.scale * dot / c).cosh();
                self.scale / (ch * ch)
            }
        }
    }
}

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
/// - [`Error::NonFinite`] if `q`, `k` or `v` holds NaN or an infinity.
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
    // With fewer than four query tiles, handing them to a pool costs more (moving the call to
    // a worker, a scratch tile per thread) than the split saves: measured 0.89-0.91x of one
    // thread at n = 256 in f32. The calling thread computes the same bits.
    let threads = if problem.q.nrows().div_ceil(T::BR) < 4 {
        Some(1)
    } else {
        opts.threads
    };
    Ok(kernel::with_threads(threads, |exec| run(&problem, exec)))
}

/// Validates one call and bundles it for the kernel.
pub(crate) fn problem<'a, T: Float>(
    q: DMatrixView<'a, T>,
    k: DMatrixView<'a, T>,
    v: DMatrixView<'a, T>,
    mask: &'a Mask,
    opts: &AttentionOptions<'a, T>,
) -> Result<Problem<'a, T>> {
    let plan = plan(&q, &k, &v, opts)?;
    Ok(Problem {
        q,
        k,
        v,
        mask,
        bias: opts.bias,
        plan,
    })
}

/// Runs a validated call on the kernel (output and log-sum-exp; no weights).
pub(crate) fn run<T: Float>(problem: &Problem<'_, T>, exec: Exec) -> AttentionOutput<T> {
    let (output, lse) = forward(problem, Isa::detect(), exec);
    AttentionOutput {
        output,
        lse,
        weights: None,
    }
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
