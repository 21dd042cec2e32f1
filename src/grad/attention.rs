//! The backward pass of scaled dot-product attention: a reference version from the
//! materialised weights and a tiled FlashAttention-2 style version that recomputes them.

use super::softmax::softmax_vjp_from_probs;
use crate::Float;
use crate::attention::scaled_attention_reference;
use crate::error::{Error, Result, check_finite, checked_len};
use crate::kernel::{self, backward::backward, backward::row_corrections, backward::tiles};
use crate::mask::Mask;
use crate::multihead::{Heads, head_problems};
use crate::prelude::*;
use crate::simd::Isa;
use crate::spec::MultiHeadOutput;
use crate::spec::{AttentionOptions, AttentionOutput, Inputs, plan, problem, raw_dots};
use nalgebra::{DMatrix, DMatrixView};

/// The gradients of a scalar loss `L` with respect to the inputs of an attention call,
/// given the upstream gradient `dO = ∂L/∂O`; returned by [`attention_backward`] and
/// [`attention_backward_reference`]. Each has the shape of the input it belongs to.
///
/// # Examples
///
/// ```
/// use attention_math::{attention_backward_reference, AttentionOptions, Mask};
/// use nalgebra::{dmatrix, DMatrix};
///
/// // One query, one key: the weight is 1 whatever the scores, so O = v and only V learns.
/// let (q, k, v) = (dmatrix![0.5_f64, -1.0], dmatrix![2.0_f64, 1.0], dmatrix![3.0_f64]);
/// let g = attention_backward_reference(&q, &k, &v, &Mask::none(), &AttentionOptions::new(), &dmatrix![1.5])?;
/// assert_eq!(g.dv, dmatrix![1.5]);
/// assert_eq!(g.dq, DMatrix::zeros(1, 2));
/// assert_eq!(g.dk, DMatrix::zeros(1, 2));
/// assert!(g.dbias.is_none()); // no bias was given
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionGrads<T: Float> {
    /// `∂L/∂Q`, n x d.
    pub dq: DMatrix<T>,
    /// `∂L/∂K`, m x d.
    pub dk: DMatrix<T>,
    /// `∂L/∂V`, m x d_v.
    pub dv: DMatrix<T>,
    /// `∂L/∂B`, n x m, if an additive bias `B` was given in the options; it equals `dS`
    /// (0 wherever the mask or the bias forbids).
    pub dbias: Option<DMatrix<T>>,
}

/// Checks the upstream gradient: n x d_v and finite.
fn check_d_out<T: Float>(d_out: &DMatrixView<'_, T>, n: usize, dv: usize) -> Result<()> {
    if d_out.shape() != (n, dv) {
        return Err(Error::ShapeMismatch {
            arg: "d_out",
            found: d_out.shape(),
            expected: (n, dv),
        });
    }
    check_finite("d_out", d_out)
}

/// The reference backward pass: recomputes the forward pass with
/// [`scaled_attention_reference`](crate::scaled_attention_reference), materialising the
/// n x m weights P, and applies the formulas of the [guide](crate::guide::gradients) matrix by
/// matrix (`dS` row by row with the softmax VJP, `⟨dP_i, P_i⟩` as the row correction).
///
/// O(n·m) memory; deliberately plain, the oracle [`attention_backward`] is tested against.
/// Arguments as for [`scaled_attention_with`](crate::scaled_attention_with), plus the
/// upstream gradient `d_out = ∂L/∂O` (n x d_v).
///
/// # Errors
///
/// Those of [`scaled_attention_with`](crate::scaled_attention_with), and:
/// - [`Error::ShapeMismatch`] naming `d_out` if it is not n x d_v;
/// - [`Error::NonFinite`] naming `d_out` if it holds NaN or an infinity.
///
/// # Examples
///
/// ```
/// use attention_math::{attention_backward_reference, scaled_attention_with, AttentionOptions, Mask};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::from_fn(3, 2, |i, j| (i as f64 + 2.0 * j as f64).sin());
/// let k = DMatrix::<f64>::from_fn(4, 2, |i, j| (i as f64 - j as f64).cos());
/// let v = DMatrix::<f64>::from_fn(4, 2, |i, j| (i * j) as f64);
/// let d_out = DMatrix::<f64>::from_element(3, 2, 1.0); // L = sum of all outputs
/// let opts = AttentionOptions::new();
/// let g = attention_backward_reference(&q, &k, &v, &Mask::none(), &opts, &d_out)?;
/// // Check ∂L/∂q_00 by a central difference.
/// let loss = |q: &DMatrix<f64>| scaled_attention_with(q, &k, &v, &Mask::none(), &opts).unwrap().output.sum();
/// let h = 1e-6;
/// let (mut qp, mut qm) = (q.clone(), q.clone());
/// qp[(0, 0)] += h;
/// qm[(0, 0)] -= h;
/// assert!((g.dq[(0, 0)] - (loss(&qp) - loss(&qm)) / (2.0 * h)).abs() < 1e-8);
/// // Each row of weights sums to 1, so dV's column sums equal dO's.
/// assert!((g.dv.column(0).sum() - 3.0).abs() < 1e-12);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn attention_backward_reference<'q, 'k, 'v, 'g, T: Float>(
    q: impl Into<DMatrixView<'q, T>>,
    k: impl Into<DMatrixView<'k, T>>,
    v: impl Into<DMatrixView<'v, T>>,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
    d_out: impl Into<DMatrixView<'g, T>>,
) -> Result<AttentionGrads<T>> {
    let (q, k, v, d_out) = (q.into(), k.into(), v.into(), d_out.into());
    let plan = plan(&q, &k, &v, opts)?;
    check_d_out(&d_out, plan.n, plan.dv)?;
    checked_len::<T>("the n x m weights", plan.n, plan.m)?;
    let forward = scaled_attention_reference(q, k, v, mask, &opts.clone().return_weights(true))?;
    let Some(p) = forward.weights else {
        unreachable!("return_weights(true) returns the weights")
    };
    let (n, m) = (plan.n, plan.m);
    let grad_v = p.transpose() * d_out;
    let dp = d_out * v.transpose();
    // dS_i = P_i ⊙ (dP_i − ⟨dP_i, P_i⟩), the softmax VJP of each row.
    let mut ds = DMatrix::<T>::zeros(n, m);
    let (mut p_row, mut g_row, mut out) =
        (vec![T::zero(); m], vec![T::zero(); m], vec![T::zero(); m]);
    for i in 0..n {
        for j in 0..m {
            p_row[j] = p[(i, j)];
            g_row[j] = dp[(i, j)];
        }
        softmax_vjp_from_probs(&p_row, &g_row, &mut out);
        for (j, o) in out.iter().enumerate() {
            ds[(i, j)] = *o;
        }
    }
    let dots = raw_dots(&q, &k, plan.scale);
    let d_dot = ds.zip_map(&dots, |g, x| g * plan.score_grad_scaled(x));
    Ok(AttentionGrads {
        dq: &d_dot * k,
        dk: d_dot.transpose() * q,
        dv: grad_v,
        dbias: opts.bias.map(|_| ds),
    })
}

/// The backward pass of attention, tiled in the FlashAttention-2 style: gradients of a loss
/// `L` with respect to Q, K, V (and the bias, if one was given), from the upstream gradient
/// `d_out = ∂L/∂O` (n x d_v) and the saved forward result `forward` (its output O and
/// log-sum-exp; the weights are not needed).
///
/// The weights are recomputed block by block as `P_ij = exp(S_ij − lse_i)` from Q, K and the
/// saved log-sum-exp, so the extra memory is O(tile) (plus O(n) for the row corrections
/// `D_i = ⟨dO_i, O_i⟩`), never n x m. Blocks that the mask rules out entirely (see
/// [`Mask::classify`]) are skipped, and the mask is evaluated only in blocks it cuts. The
/// formulas are in the [guide](crate::guide::gradients). Fully masked rows get zero gradients,
/// never NaN.
///
/// One pass over the key blocks (FlashAttention-2's loop) spread over rayon's thread pool:
/// each key block owns its rows of dK and dV (and its columns of d bias); dQ, which every
/// key block adds to, is accumulated in a fixed number of partial sums (up to 8, chosen
/// from the shape alone: key block J goes to partial J mod L) that are added in order at
/// the end. Every entry of the result is therefore computed in the same order whatever the
/// number of threads, and the result is bit-identical for any thread count. The partial
/// sums cost up to `L − 1` extra n x d buffers (at most 64 MiB in all, and at least one
/// where there are two key blocks). [`AttentionOptions::threads`] runs the call on a pool
/// of its own, as for the forward pass.
///
/// `forward` must come from a forward call with the same Q, K, V, mask and options
/// ([`scaled_attention_with`](crate::scaled_attention_with) or the reference). That is
/// checked on the way, at no extra pass: every row's weights, recomputed from the saved
/// log-sum-exp with this call's mask and options, must sum to 1 within the rounding the two
/// passes can differ by (`2⁻⁶ + m·ε` plus the scores' conditioning), else the call returns
/// [`Error::ForwardMismatch`] instead of the gradients of another function. A forward with
/// `Mask::causal()` given to a backward with `Mask::prefix_lm(p)` fails it in its first
/// rows; a mismatch that moves less than about 2% of a row's weight (a slightly different
/// scale) is not caught, nor is a different V (the saved output only enters through
/// `D = ⟨dO, O⟩`).
///
/// # Errors
///
/// Those of [`scaled_attention_with`](crate::scaled_attention_with), and:
/// - [`Error::ShapeMismatch`] naming `d_out` (or `forward.output`) if it is not n x d_v;
/// - [`Error::NonFinite`] naming `d_out` if it holds NaN or an infinity (likewise
///   `forward.output`, and `forward.lse` if it holds NaN; `+inf`, from scores that overflowed, is accepted);
/// - [`Error::LengthMismatch`] naming `forward.lse` if its length is not n;
/// - [`Error::ForwardMismatch`] if `forward` came from a call with another mask, options,
///   Q or K (see above).
///
/// # Examples
///
/// ```
/// use attention_math::{attention_backward, attention_backward_reference, scaled_attention_with,
///     AttentionOptions, Mask};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f32>::from_fn(5, 4, |i, j| ((i * 4 + j) as f32 * 0.37).sin());
/// let k = DMatrix::<f32>::from_fn(5, 4, |i, j| ((i * 4 + j) as f32 * 0.11).cos());
/// let v = DMatrix::<f32>::from_fn(5, 3, |i, j| (i as f32) - (j as f32));
/// let d_out = DMatrix::<f32>::from_fn(5, 3, |i, j| 0.1 * (i + j) as f32);
/// let opts = AttentionOptions::new().softcap(5.0);
/// let forward = scaled_attention_with(&q, &k, &v, &Mask::causal(), &opts)?;
/// let g = attention_backward(&q, &k, &v, &Mask::causal(), &opts, &forward, &d_out)?;
/// let r = attention_backward_reference(&q, &k, &v, &Mask::causal(), &opts, &d_out)?;
/// assert!((&g.dq - &r.dq).amax() < 1e-5 && (&g.dk - &r.dk).amax() < 1e-5);
/// assert!((&g.dv - &r.dv).amax() < 1e-5);
/// // The first query sees only the first key: its weight is 1 and its dQ row is 0.
/// assert_eq!(g.dq.row(0).amax(), 0.0);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn attention_backward<'q, 'k, 'v, 'g, T: Float>(
    q: impl Into<DMatrixView<'q, T>>,
    k: impl Into<DMatrixView<'k, T>>,
    v: impl Into<DMatrixView<'v, T>>,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
    forward: &AttentionOutput<T>,
    d_out: impl Into<DMatrixView<'g, T>>,
) -> Result<AttentionGrads<T>> {
    backward_tiled(
        q.into(),
        k.into(),
        v.into(),
        mask,
        opts,
        forward,
        d_out.into(),
        tiles::<T>(),
    )
}

/// Checks the saved forward result against the shapes of the call.
fn check_forward<T: Float>(forward: &AttentionOutput<T>, n: usize, dv: usize) -> Result<()> {
    check_saved_output(&forward.output, (n, dv))?;
    if forward.lse.len() != n {
        return Err(Error::LengthMismatch {
            arg: "forward.lse",
            found: forward.lse.len(),
            expected: n,
        });
    }
    check_saved_lse(forward.lse.as_slice(), n)
}

/// The saved forward output: of the call's shape and finite.
fn check_saved_output<T: Float>(o: &DMatrix<T>, shape: (usize, usize)) -> Result<()> {
    if o.shape() != shape {
        return Err(Error::ShapeMismatch {
            arg: "forward.output",
            found: o.shape(),
            expected: shape,
        });
    }
    check_finite("forward.output", &o.as_view())
}

/// The saved log-sum-exps (column-major, `n` rows, one column per head): no NaN (`−inf`
/// from fully masked rows and `+inf` from overflowing scores are results, not errors).
fn check_saved_lse<T: Float>(lse: &[T], n: usize) -> Result<()> {
    match lse.iter().position(|l| l.is_nan_value()) {
        Some(at) => Err(Error::NonFinite {
            arg: "forward.lse",
            row: at % n.max(1),
            col: at / n.max(1),
        }),
        None => Ok(()),
    }
}

/// The tiled backward pass with blocks of `tiles` = (queries, keys), on the kernel.
#[allow(clippy::too_many_arguments)]
fn backward_tiled<T: Float>(
    q: DMatrixView<'_, T>,
    k: DMatrixView<'_, T>,
    v: DMatrixView<'_, T>,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
    forward: &AttentionOutput<T>,
    d_out: DMatrixView<'_, T>,
    tiles: (usize, usize),
) -> Result<AttentionGrads<T>> {
    let problem = problem(q, k, v, mask, opts)?;
    let (n, dv) = (problem.plan.n, problem.plan.dv);
    check_d_out(&d_out, n, dv)?;
    check_forward(forward, n, dv)?;
    let delta = row_corrections(Isa::get(), &d_out, &forward.output.as_view());
    let g = kernel::with_threads(opts.threads, |exec| {
        backward(
            &problem,
            d_out,
            forward.lse.as_slice(),
            &delta,
            Isa::get(),
            exec,
            tiles,
        )
    });
    if let Some((row, sum)) = g.mismatch {
        return Err(mismatch(0, row, sum));
    }
    Ok(AttentionGrads {
        dq: g.dq,
        dk: g.dk,
        dv: g.dv,
        dbias: g.dbias,
    })
}

/// The error of a saved forward result that another call produced (see
/// [`Error::ForwardMismatch`]).
fn mismatch<T: Float>(head: usize, row: usize, sum: T) -> Error {
    Error::ForwardMismatch {
        head,
        row,
        sum: sum.as_f64(),
    }
}

/// The backward pass of [`multi_head_attention`](crate::multi_head_attention): gradients of
/// a loss with respect to Q (n x H·d), K (m x G·d), V (m x G·d_v) and the bias (shared by
/// every head), from `d_out = ∂L/∂O` (n x H·d_v) and the saved forward result of
/// [`multi_head_attention_with`](crate::multi_head_attention_with).
///
/// Each query head's gradients are those of [`attention_backward`] on its columns; a GQA
/// group's key-value head collects the sum of its query heads' dK and dV (summed in head
/// order, so the result is the same bits for any thread count), and d bias is the sum over
/// all heads. Every mask and option of the forward pass is honoured, ALiBi's per-head slopes
/// included.
///
/// # Errors
///
/// Those of [`multi_head_attention`](crate::multi_head_attention), and:
/// - [`Error::ShapeMismatch`] naming `d_out` or `forward.output` if not n x (H·d_v), or
///   `forward.lse` if not n x H;
/// - [`Error::NonFinite`] naming `d_out` or `forward.output` for NaN or an infinity, or
///   `forward.lse` for NaN (`+inf`, from overflowing scores, is accepted);
/// - [`Error::ForwardMismatch`] naming the head and row, if `forward` came from a call with
///   another mask, options, Q or K (checked as in [`attention_backward`]).
///
/// # Examples
///
/// ```
/// use attention_math::{attention_backward, multi_head_attention_backward, multi_head_attention_with,
///     scaled_attention_with, AttentionOptions, Heads, Mask};
/// use nalgebra::DMatrix;
///
/// let m = |r: usize, c: usize, s: f64| DMatrix::from_fn(r, c, |i, j| ((i * c + j) as f64 * 0.3 + s).sin());
/// let (q, k, v, d_out) = (m(5, 8, 0.1), m(5, 4, 0.2), m(5, 4, 0.3), m(5, 8, 0.4));
/// let heads = Heads::grouped(4, 2); // heads 0, 1 share KV head 0; heads 2, 3 share KV head 1
/// let opts = AttentionOptions::new();
/// let fwd = multi_head_attention_with(&q, &k, &v, heads, &Mask::causal(), &opts)?;
/// let g = multi_head_attention_backward(&q, &k, &v, heads, &Mask::causal(), &opts, &fwd, &d_out)?;
/// // KV head 0's dV is the sum of the dV of query heads 0 and 1, each a single-head backward.
/// let one = |h: usize| {
///     let (qh, kh, vh, gh) = (q.columns(2 * h, 2), k.columns(0, 2), v.columns(0, 2), d_out.columns(2 * h, 2));
///     let f = scaled_attention_with(qh, kh, vh, &Mask::causal(), &opts).unwrap();
///     attention_backward(qh, kh, vh, &Mask::causal(), &opts, &f, gh).unwrap()
/// };
/// let sum = one(0).dv + one(1).dv;
/// assert!((g.dv.columns(0, 2) - sum).amax() < 1e-14);
/// # Ok::<(), attention_math::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn multi_head_attention_backward<'q, 'k, 'v, 'g, T: Float>(
    q: impl Into<DMatrixView<'q, T>>,
    k: impl Into<DMatrixView<'k, T>>,
    v: impl Into<DMatrixView<'v, T>>,
    heads: Heads,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
    forward: &MultiHeadOutput<T>,
    d_out: impl Into<DMatrixView<'g, T>>,
) -> Result<AttentionGrads<T>> {
    let (q, k, v, d_out) = (q.into(), k.into(), v.into(), d_out.into());
    let (problems, d, dv) = head_problems(&q, &k, &v, heads, mask, opts, Inputs::Check, false)?;
    let (n, m, h) = (q.nrows(), k.nrows(), heads.query);
    check_d_out(&d_out, n, h * dv)?;
    let fo = &forward.output;
    check_saved_output(fo, (n, h * dv))?;
    if forward.lse.shape() != (n, h) {
        return Err(Error::ShapeMismatch {
            arg: "forward.lse",
            found: forward.lse.shape(),
            expected: (n, h),
        });
    }
    check_saved_lse(forward.lse.as_slice(), n)?;
    let isa = Isa::get();
    let one_head = |hd: usize, exec| {
        let g = d_out.columns(hd * dv, dv);
        let o = fo.columns(hd * dv, dv);
        let delta = row_corrections(isa, &g, &o);
        let lse: Vec<T> = forward.lse.column(hd).iter().copied().collect();
        backward(&problems[hd], g, &lse, &delta, isa, exec, tiles::<T>())
    };
    let per_head: Vec<_> = kernel::with_threads(opts.threads, |exec| {
        kernel::map(exec, (0..h).collect(), |hd| one_head(hd, exec))
    });
    if let Some((hd, (row, sum))) = per_head
        .iter()
        .enumerate()
        .find_map(|(hd, g)| g.mismatch.map(|x| (hd, x)))
    {
        return Err(mismatch(hd, row, sum));
    }
    let mut dq = DMatrix::zeros(n, h * d);
    let mut dk = DMatrix::zeros(m, heads.kv * d);
    let mut dvm = DMatrix::zeros(m, heads.kv * dv);
    let mut dbias = opts.bias.map(|_| DMatrix::zeros(n, m));
    for (hd, g) in per_head.into_iter().enumerate() {
        let kv = heads.kv_head(hd);
        dq.columns_mut(hd * d, d).copy_from(&g.dq);
        let mut dkc = dk.columns_mut(kv * d, d);
        dkc += &g.dk;
        let mut dvc = dvm.columns_mut(kv * dv, dv);
        dvc += &g.dv;
        if let (Some(total), Some(part)) = (dbias.as_mut(), g.dbias) {
            *total += part;
        }
    }
    Ok(AttentionGrads {
        dq,
        dk,
        dv: dvm,
        dbias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::scaled_attention_with;
    use crate::mask::Mask;

    fn matrix(rows: usize, cols: usize, seed: f64) -> DMatrix<f64> {
        DMatrix::from_fn(rows, cols, |i, j| {
            ((i * cols + j) as f64 * 0.731 + seed).sin() * 1.5
        })
    }

    fn max_rel(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
        (a - b).amax() / b.amax().max(1.0)
    }

    /// Small tiles (the smallest the micro-kernel allows: 6 queries, 48 keys in f64) so that
    /// every test shape spans several blocks, ragged at the edges.
    #[test]
    fn small_tiles_agree_with_the_reference_for_every_mask() {
        let (n, m, d, dv) = (29, 101, 3, 2);
        let (q, k, v) = (matrix(n, d, 0.1), matrix(m, d, 0.7), matrix(m, dv, 1.3));
        let g = matrix(n, dv, 2.9);
        let mut bias = matrix(n, m, 4.2);
        bias[(2, 5)] = f64::NEG_INFINITY;
        let masks = [
            Mask::none(),
            Mask::causal(),
            Mask::causal_bottom_right(),
            Mask::prefix_lm(4),
            Mask::sliding_window(3),
            Mask::key_padding(6),
            Mask::documents((0..101).map(|i| i / 9).collect::<Vec<_>>()),
            Mask::from_fn(|i, j| (i * 7 + j) % 3 != 0),
            Mask::documents(vec![0, 0, 1, 1, 1, 1, 2, 2]).and(Mask::causal()),
        ];
        for mask in &masks {
            for opts in [
                AttentionOptions::new(),
                AttentionOptions::new().softcap(2.0).bias(&bias).scale(0.8),
            ] {
                let fwd = scaled_attention_with(&q, &k, &v, mask, &opts).unwrap();
                let r = attention_backward_reference(&q, &k, &v, mask, &opts, &g).unwrap();
                for tile in [(6, 48), (12, 96), (48, 48)] {
                    let t = backward_tiled(
                        q.as_view(),
                        k.as_view(),
                        v.as_view(),
                        mask,
                        &opts,
                        &fwd,
                        g.as_view(),
                        tile,
                    )
                    .unwrap();
                    assert!(max_rel(&t.dq, &r.dq) < 1e-13, "{mask} {tile:?}");
                    assert!(max_rel(&t.dk, &r.dk) < 1e-13, "{mask} {tile:?}");
                    assert!(max_rel(&t.dv, &r.dv) < 1e-13, "{mask} {tile:?}");
                    match (&t.dbias, &r.dbias) {
                        (Some(a), Some(b)) => assert!(max_rel(a, b) < 1e-13, "{mask}"),
                        (None, None) => {}
                        _ => panic!("d bias present in one version only"),
                    }
                }
            }
        }
    }

    #[test]
    fn any_thread_count_gives_identical_bits() {
        // 3 key blocks of 48 (3 dQ lanes), then 11 (8 lanes, three of them with two blocks).
        for (n, m) in [(37, 110), (20, 500)] {
            thread_count_invariance(n, m);
        }
    }

    fn thread_count_invariance(n: usize, m: usize) {
        let d = 4;
        let (q, k, v) = (matrix(n, d, 0.3), matrix(m, d, 0.2), matrix(m, 3, 0.9));
        let g = matrix(n, 3, 1.1);
        let mask = Mask::causal_bottom_right().or(Mask::key_padding(3));
        let opts = AttentionOptions::new().softcap(3.0);
        let fwd = scaled_attention_with(&q, &k, &v, &mask, &opts).unwrap();
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    backward_tiled(
                        q.as_view(),
                        k.as_view(),
                        v.as_view(),
                        &mask,
                        &opts,
                        &fwd,
                        g.as_view(),
                        (6, 48),
                    )
                    .unwrap()
                })
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
        // The same through the option, with the default tiles.
        let with = |threads: usize| {
            let opts = opts.clone().threads(threads);
            attention_backward(&q, &k, &v, &mask, &opts, &fwd, &g).unwrap()
        };
        let default = attention_backward(&q, &k, &v, &mask, &opts, &fwd, &g).unwrap();
        assert_eq!(default, with(1));
        assert_eq!(default, with(2));
        assert_eq!(default, with(3));
    }

    #[test]
    fn bad_forward_results_are_errors() {
        let x = matrix(3, 2, 0.0);
        let opts = AttentionOptions::new();
        let mut fwd = scaled_attention_with(&x, &x, &x, &Mask::none(), &opts).unwrap();
        let ok = attention_backward(&x, &x, &x, &Mask::none(), &opts, &fwd, &x);
        assert!(ok.is_ok());
        fwd.lse[1] = f64::NAN;
        let e = attention_backward(&x, &x, &x, &Mask::none(), &opts, &fwd, &x).unwrap_err();
        assert_eq!(
            e,
            Error::NonFinite {
                arg: "forward.lse",
                row: 1,
                col: 0
            }
        );
        let short = AttentionOutput {
            output: fwd.output.clone(),
            lse: nalgebra::DVector::zeros(2),
            weights: None,
        };
        let e = attention_backward(&x, &x, &x, &Mask::none(), &opts, &short, &x).unwrap_err();
        assert_eq!(
            e.to_string(),
            "forward.lse has length 2 but must have length 3"
        );
        let wrong = AttentionOutput {
            output: DMatrix::zeros(3, 1),
            ..short
        };
        let e = attention_backward(&x, &x, &x, &Mask::none(), &opts, &wrong, &x).unwrap_err();
        assert_eq!(e.to_string(), "forward.output is 3 x 1 but must be 3 x 2");
    }
}
