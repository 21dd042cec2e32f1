//! Scaled dot-product attention: the entry points and the reference oracle.
//!
//! The math and the design are in `src/guide/attention.md`, rendered as
//! [`crate::guide::attention`].

use crate::Float;
use crate::error::{Error, Result, check_finite, checked_len};
use crate::kernel;
use crate::mask::Mask;
use crate::prelude::*;

use crate::spec::{
    AttentionOptions, AttentionOutput, AttentionStats, Inputs, add_bias, check_inputs,
    convex_combination, input_error, plan, problem, problem_inputs, raw_dots, row_stats,
    softmax_exact_row,
};
use nalgebra::{DMatrix, DMatrixView, DVector};

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
    // The tiled pass scans Q, K and V as it packs them (one read of each, not two).
    let inputs = if kernel::scans_inputs(q.nrows(), k.nrows()) {
        Inputs::Deferred
    } else {
        Inputs::Check
    };
    let problem = problem_inputs(q, k, v, mask, opts, inputs)?;
    let (layer, finite) = kernel::attend(core::slice::from_ref(&problem), 1, opts.threads);
    if !finite {
        return Err(input_error(|| check_inputs(&q, &k, &v)));
    }
    let (output, lse) = layer.into_head();
    Ok(AttentionOutput {
        output,
        lse,
        weights: None,
    })
}

/// [`scaled_attention_with`] that also returns per-row statistics of the attention weights
/// ([`AttentionStats`]: max logit, entropy, max probability), computed by the tiled kernel in
/// the same pass without materialising the n x m weights.
///
/// The statistics cost one extra pass over each score tile (a copy and a multiply-add per
/// score) and are a compile-time variant of the kernel: [`scaled_attention_with`] runs the
/// kernel without them, unchanged, and its output and log-sum-exp are bit for bit those
/// returned here, except for few-query calls (n <= 8 queries against m >= 2n keys), which
/// [`scaled_attention_with`] sends down the decode path and this function does not (the
/// statistics live in the tiled pass only): there the two agree to rounding. With
/// [`AttentionOptions::return_weights`] the call runs [`scaled_attention_reference`] and
/// computes the statistics from its weights (the oracle the kernel is tested against).
///
/// Shapes: `q` n x d, `k` m x d, `v` m x d_v (d_v may be 0 if only the statistics are
/// wanted); the output is n x d_v and each statistic has length n.
///
/// # Errors
///
/// Those of [`scaled_attention_with`].
///
/// # Examples
///
/// ```
/// use attention_math::{scaled_attention_with_stats, scaled_attention_with, AttentionOptions, Mask};
/// use nalgebra::DMatrix;
///
/// let x = DMatrix::<f32>::from_fn(5, 4, |i, j| ((i * 4 + j) as f32).sin() * 3.0);
/// let opts = AttentionOptions::new();
/// let (out, stats) = scaled_attention_with_stats(&x, &x, &x, &Mask::causal(), &opts)?;
/// // The same output as without the statistics, bit for bit.
/// assert_eq!(out, scaled_attention_with(&x, &x, &x, &Mask::causal(), &opts)?);
/// // Query 0 sees one key: weight 1, entropy 0.
/// assert_eq!((stats.max_prob[0], stats.entropy[0]), (1.0, 0.0));
/// assert!(stats.entropy.iter().all(|&h| h >= 0.0 && h <= 5f32.ln()));
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn scaled_attention_with_stats<'q, 'k, 'v, T: Float>(
    q: impl Into<DMatrixView<'q, T>>,
    k: impl Into<DMatrixView<'k, T>>,
    v: impl Into<DMatrixView<'v, T>>,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
) -> Result<(AttentionOutput<T>, AttentionStats<T>)> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    if opts.weights {
        return reference(q, k, v, mask, opts);
    }
    let problem = problem(q, k, v, mask, opts)?;
    Ok(kernel::attend_stats(&problem, opts.threads))
}

/// Merges attention results over disjoint sets of keys into the result over their union:
/// what split-KV decoding, a cache kept in chunks, or ring attention need.
///
/// If part k attended the same n queries to its own keys with output `O_k` and log-sum-exp
/// `lse_k` (as [`scaled_attention_with`] returns them), then over all the keys
///
/// ```text
/// lse_i = ln Σ_k exp(lse_k,i)            O_i = Σ_k exp(lse_k,i − lse_i) · O_k,i
/// ```
///
/// computed with the largest `lse_k,i` factored out, so huge and tiny log-sum-exps are fine.
/// A part in which row i saw no key (`lse = −inf`, output 0) contributes nothing; a row that
/// no part saw stays 0 with `lse = −inf`. A part with `lse = +inf` (scores that overflowed)
/// takes all the weight, shared equally with any other such part, as the softmax shares it
/// among infinite scores. The weights of the parts are not merged (`weights` is `None`).
///
/// # Errors
///
/// - [`Error::InvalidParameter`] naming `parts` if there are none;
/// - [`Error::ShapeMismatch`] naming `parts.output` if the outputs' shapes differ;
/// - [`Error::LengthMismatch`] naming `parts.lse` if an lse's length is not the outputs' row
///   count;
/// - [`Error::NonFinite`] naming `parts.lse` (row i, column = the part) for a NaN
///   log-sum-exp, or `parts.output` for a non-finite output.
///
/// # Examples
///
/// ```
/// use attention_math::{merge_attention, scaled_attention_with, AttentionOptions, Mask};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::from_fn(2, 4, |i, j| ((i * 4 + j) as f64).sin());
/// let k = DMatrix::<f64>::from_fn(10, 4, |i, j| ((i * 4 + j) as f64 * 0.3).cos());
/// let v = DMatrix::<f64>::from_fn(10, 3, |i, j| (i + j) as f64);
/// let opts = AttentionOptions::new().scale(0.5);
/// let all = scaled_attention_with(&q, &k, &v, &Mask::none(), &opts)?;
/// // Keys 0..6 and 6..10 separately, then merged.
/// let a = scaled_attention_with(&q, k.rows(0, 6), v.rows(0, 6), &Mask::none(), &opts)?;
/// let b = scaled_attention_with(&q, k.rows(6, 4), v.rows(6, 4), &Mask::none(), &opts)?;
/// let merged = merge_attention(&[a, b])?;
/// assert!((&merged.output - &all.output).amax() < 1e-12);
/// assert!((&merged.lse - &all.lse).amax() < 1e-12);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn merge_attention<T: Float>(parts: &[AttentionOutput<T>]) -> Result<AttentionOutput<T>> {
    let Some(first) = parts.first() else {
        return Err(Error::InvalidParameter {
            name: "parts",
            value: 0.0,
            requirement: "must hold at least one attention result",
        });
    };
    let (n, dv) = first.output.shape();
    for p in parts {
        if p.output.shape() != (n, dv) {
            return Err(Error::ShapeMismatch {
                arg: "parts.output",
                found: p.output.shape(),
                expected: (n, dv),
            });
        }
        if p.lse.len() != n {
            return Err(Error::LengthMismatch {
                arg: "parts.lse",
                found: p.lse.len(),
                expected: n,
            });
        }
        check_finite("parts.output", &p.output.as_view())?;
    }
    for (k, p) in parts.iter().enumerate() {
        if let Some(i) = p.lse.iter().position(|l| l.is_nan_value()) {
            return Err(Error::NonFinite {
                arg: "parts.lse",
                row: i,
                col: k,
            });
        }
    }
    let mut output = DMatrix::<T>::zeros(n, dv);
    let mut lse = DVector::<T>::from_element(n, T::NEG_INFINITY);
    for i in 0..n {
        let top = parts
            .iter()
            .map(|p| p.lse[i])
            .fold(T::NEG_INFINITY, |a, b| if b > a { b } else { a });
        if top == T::NEG_INFINITY {
            continue; // no part saw a key: zeros, −inf
        }
        // Each part's weight exp(lse_k − top) (equal shares among +inf parts).
        let weight = |l: T| {
            if top == T::INFINITY {
                if l == T::INFINITY {
                    T::one()
                } else {
                    T::zero()
                }
            } else {
                (l - top).exp()
            }
        };
        let total = parts
            .iter()
            .fold(T::zero(), |acc, p| acc + weight(p.lse[i]));
        for p in parts {
            let w = weight(p.lse[i]) / total;
            if w > T::zero() {
                for c in 0..dv {
                    output[(i, c)] += w * p.output[(i, c)];
                }
            }
        }
        lse[i] = if top == T::INFINITY {
            T::INFINITY
        } else {
            top + total.ln()
        };
    }
    Ok(AttentionOutput {
        output,
        lse,
        weights: None,
    })
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
    reference(q.into(), k.into(), v.into(), mask, opts).map(|(out, _)| out)
}

/// [`scaled_attention_reference`] with the statistics of its weights ([`row_stats`]).
fn reference<T: Float>(
    q: DMatrixView<'_, T>,
    k: DMatrixView<'_, T>,
    v: DMatrixView<'_, T>,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
) -> Result<(AttentionOutput<T>, AttentionStats<T>)> {
    let plan = plan(&q, &k, &v, opts)?;
    let (n, m) = (plan.n, plan.m);
    checked_len::<T>("the n x m weights", n, m)?;
    let dots = raw_dots(&q, &k, plan.scale);
    let mut weights = DMatrix::<T>::zeros(n, m);
    let mut lse = DVector::<T>::zeros(n);
    let mut stats = AttentionStats::masked(n);
    let mut row = vec![T::zero(); m];
    for i in 0..n {
        for (j, s) in row.iter_mut().enumerate() {
            *s = if mask.allows_in(n, m, i, j) {
                plan.finish(
                    dots[(i, j)],
                    add_bias(opts.bias.as_ref().map(|b| b[(i, j)]), plan.alibi_at(i, j)),
                )
            } else {
                T::NEG_INFINITY
            };
        }
        let bias = |j| add_bias(opts.bias.as_ref().map(|b| b[(i, j)]), plan.alibi_at(i, j));
        let allowed = |j| mask.allows_in(n, m, i, j);
        let max_score = row
            .iter()
            .fold(T::NEG_INFINITY, |a, &s| if s > a { s } else { a });
        let support = (0..m)
            .filter(|&j| allowed(j) && bias(j) != Some(T::NEG_INFINITY))
            .count();
        lse[i] = softmax_exact_row(&plan, &q, i, &k, &mut row, allowed, bias);
        [stats.max_logit[i], stats.entropy[i], stats.max_prob[i]] =
            row_stats(max_score, &row, lse[i], support);
        for (j, p) in row.iter().enumerate() {
            weights[(i, j)] = *p;
        }
    }
    let mut output = DMatrix::<T>::zeros(n, plan.dv);
    let mut w = vec![T::zero(); m];
    for i in 0..n {
        for (j, x) in w.iter_mut().enumerate() {
            *x = weights[(i, j)];
        }
        for c in 0..plan.dv {
            output[(i, c)] = convex_combination(&w, &v, c);
        }
    }
    let out = AttentionOutput {
        output,
        lse,
        weights: opts.weights.then_some(weights),
    };
    Ok((out, stats))
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

    /// Attention over all keys equals the merge of attention over any split of the keys,
    /// fully masked parts and empty parts included.
    #[test]
    fn merging_splits_equals_one_call() {
        let (n, m, d, dv) = (7, 40, 5, 3);
        let q = DMatrix::<f64>::from_fn(n, d, |i, j| ((i * d + j) as f64 * 0.7).sin() * 2.0);
        let k = DMatrix::<f64>::from_fn(m, d, |i, j| ((i * d + j) as f64 * 0.3).cos() * 2.0);
        let v = DMatrix::<f64>::from_fn(m, dv, |i, j| ((i + 3 * j) as f64 * 0.1).sin());
        let opts = AttentionOptions::new();
        // Query i sees keys j <= 5 i: early rows see nothing of the later parts.
        let rule = |i: usize, j: usize| j <= 5 * i;
        let all = scaled_attention_with(&q, &k, &v, &Mask::from_fn(rule), &opts).unwrap();
        for cuts in [vec![0, 40], vec![0, 10, 40], vec![0, 3, 3, 17, 30, 40]] {
            let parts: Vec<_> = cuts
                .windows(2)
                .map(|w| {
                    let (a, b) = (w[0], w[1]);
                    let mask = Mask::from_fn(move |i, j| rule(i, j + a));
                    scaled_attention_with(&q, k.rows(a, b - a), v.rows(a, b - a), &mask, &opts)
                        .unwrap()
                })
                .collect();
            let merged = merge_attention(&parts).unwrap();
            assert!((&merged.output - &all.output).amax() < 1e-13, "{cuts:?}");
            for (a, b) in merged.lse.iter().zip(all.lse.iter()) {
                assert!((a - b).abs() < 1e-13, "{cuts:?}: {a} vs {b}");
            }
        }
        // Row 0 sees key 0 only; a part without it gives −inf there, and merging two such
        // parts keeps the row empty.
        let empty =
            scaled_attention_with(&q, k.rows(1, 4), v.rows(1, 4), &Mask::key_padding(0), &opts)
                .unwrap();
        let both = merge_attention(&[empty.clone(), empty]).unwrap();
        assert_eq!(both.output, DMatrix::zeros(n, dv));
        assert!(both.lse.iter().all(|&l| l == f64::NEG_INFINITY));
        // Errors.
        assert!(matches!(
            merge_attention::<f64>(&[]),
            Err(Error::InvalidParameter { name: "parts", .. })
        ));
        let mut bad = all.clone();
        bad.lse[2] = f64::NAN;
        assert_eq!(
            merge_attention(&[all.clone(), bad]).unwrap_err(),
            Error::NonFinite {
                arg: "parts.lse",
                row: 2,
                col: 1
            }
        );
        let short = AttentionOutput {
            output: DMatrix::zeros(n, 2),
            lse: all.lse.clone(),
            weights: None,
        };
        assert!(matches!(
            merge_attention(&[all, short]),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
