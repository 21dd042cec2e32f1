//! The spec of one attention call: its options, what it returns, and the validated plan
//! (shapes, scale, softcap) that every path (reference, kernel, backward) computes from.
//!
//! The formulas are in [`crate::guide::attention`].

use crate::Float;
use crate::error::{Axis, Error, Result, check_finite, check_positive, checked_len};
use crate::float::pow2;
use crate::mask::Mask;
use crate::prelude::*;
use crate::softmax::{logsumexp, softmax_in_place};
use nalgebra::{DMatrix, DMatrixView, DVector};

#[cfg(doc)]
use crate::{scaled_attention_reference, scaled_attention_with};

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
    pub(crate) scale: Option<T>,
    pub(crate) softcap: Option<T>,
    pub(crate) bias: Option<DMatrixView<'a, T>>,
    pub(crate) weights: bool,
    pub(crate) threads: Option<usize>,
    pub(crate) alibi: Option<Alibi<T>>,
}

/// How ALiBi's slopes are chosen; see [`AttentionOptions::alibi`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Alibi<T> {
    /// One slope for every head.
    Slope(T),
    /// The paper's geometric slopes by head count ([`alibi_slopes`]).
    ByHead,
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

    /// Adds ALiBi's linear position bias (Press et al., 2022) with the paper's slopes: head
    /// h of H gets slope [`alibi_slopes`]`(H)[h]` in
    /// [`multi_head_attention`](crate::multi_head_attention) (a single-head call is H = 1,
    /// slope 1/256), and the score of query i and key j gains
    ///
    /// ```text
    /// B_ij = −slope · |p_i − j|,     p_i = i + m − n
    /// ```
    ///
    /// with `p_i` the query's position when the n queries are the last n of the m positions
    /// (for self-attention, n = m, `p_i = i`; in a decode step the new token sits at the end
    /// of the cache). It is computed inside the kernel, never as an n x m matrix, and added
    /// after the softcap like [`AttentionOptions::bias`] (with which it combines). Under a
    /// causal mask `j <= p_i` and the term is `slope · (j − p_i)`, which differs from the
    /// `slope · j` form of some implementations by a constant per row: the same weights and
    /// output, a log-sum-exp shifted by `slope · p_i`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{scaled_attention_with, AttentionOptions, Mask};
    /// use nalgebra::DMatrix;
    ///
    /// let x = DMatrix::<f64>::from_fn(5, 4, |i, j| ((i * 4 + j) as f64).sin());
    /// let alibi = scaled_attention_with(&x, &x, &x, &Mask::causal(), &AttentionOptions::new().alibi())?;
    /// // The same as the explicit bias matrix with slope 1/256.
    /// let b = DMatrix::from_fn(5, 5, |i, j| -(i as f64 - j as f64).abs() / 256.0);
    /// let explicit = scaled_attention_with(&x, &x, &x, &Mask::causal(), &AttentionOptions::new().bias(&b))?;
    /// assert!((alibi.output - explicit.output).amax() < 1e-14);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn alibi(mut self) -> Self {
        self.alibi = Some(Alibi::ByHead);
        self
    }

    /// ALiBi with one given slope for every head (see [`AttentionOptions::alibi`]); it must be
    /// finite (it is checked when the call runs).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{scaled_attention_with, AttentionOptions, Mask};
    /// use nalgebra::DMatrix;
    ///
    /// // With a steep slope, each query attends almost only to itself.
    /// let q = DMatrix::<f64>::zeros(3, 2);
    /// let v = DMatrix::<f64>::from_fn(3, 1, |i, _| i as f64);
    /// let out = scaled_attention_with(&q, &q, &v, &Mask::none(), &AttentionOptions::new().alibi_slope(50.0))?;
    /// assert!((out.output[(2, 0)] - 2.0).abs() < 1e-15);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn alibi_slope(mut self, slope: T) -> Self {
        self.alibi = Some(Alibi::Slope(slope));
        self
    }

    /// Runs the call on `threads` threads: the calling thread and `threads − 1` workers of a
    /// private rayon pool (1 = the calling thread alone), without touching rayon's global
    /// pool. The crate builds one such pool per thread count, on first use, and reuses it. By
    /// default the call uses as many threads as the current rayon pool has (the global one
    /// outside any pool), the calling thread among them. The calling thread always works: a
    /// worker that is slow to wake up finds less left to do, and the call never waits for it
    /// to start. The result is bit-identical for every thread count; 0 is treated as 1, and a count
    /// above four threads per logical CPU is capped there (a larger pool only adds OS threads
    /// that wait: `threads(usize::MAX)` must not try to spawn them). The reference
    /// implementation is always single-threaded, and so is everything when the crate is
    /// built without its `rayon` feature (the count is then accepted and has no effect).
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
}

/// ALiBi's slopes for `heads` heads (Press et al., 2022, and their reference code): for a
/// power of two H, head h (from 0) has slope `2^(−8(h+1)/H)`, a geometric sequence from
/// `2^(−8/H)` down to `2^(−8)`; for other H, with `P` the largest power of two below H, the
/// P slopes of `P` heads followed by every other slope of `2P` heads (`2^(−4(2k+1)/P)`) for
/// the remaining H − P heads.
///
/// # Examples
///
/// ```
/// use attention_math::alibi_slopes;
///
/// assert_eq!(alibi_slopes(8), [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]);
/// // 12 heads: the 8 slopes of 8 heads, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
/// let s = alibi_slopes(12);
/// assert_eq!(s[..8], alibi_slopes(8)[..]);
/// assert!((s[8] - 0.5f64.sqrt()).abs() < 1e-15 && (s[11] - 2f64.powf(-3.5)).abs() < 1e-15);
/// assert!(alibi_slopes(0).is_empty());
/// ```
pub fn alibi_slopes(heads: usize) -> Vec<f64> {
    let geometric = |count: usize| -> Vec<f64> {
        let start = 2f64.powf(-8.0 / count as f64);
        (1..=count).map(|h| start.powi(h as i32)).collect()
    };
    if heads == 0 {
        return Vec::new();
    }
    let p = 1usize << heads.ilog2();
    let mut slopes = geometric(p);
    if p < heads {
        slopes.extend(geometric(2 * p).into_iter().step_by(2).take(heads - p));
    }
    slopes
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

/// Per-query-row statistics of the attention weights, computed by the tiled kernel alongside
/// the output without materialising the n x m weights (see
/// [`scaled_attention_with_stats`](crate::scaled_attention_with_stats)).
///
/// For row i with final scores `S_ij` (scaled, capped, biased) over its allowed keys,
/// weights `P_ij = exp(S_ij − lse_i)` and `M_i = max_j S_ij`:
///
/// ```text
/// max_logit_i = M_i
/// entropy_i   = −Σ_j P_ij ln P_ij = lse_i − Σ_j P_ij S_ij
///             = ln ℓ_i − Σ_j P_ij (S_ij − M_i)          ℓ_i = Σ_j exp(S_ij − M_i) ≥ 1
/// max_prob_i  = max_j P_ij = exp(M_i − lse_i) = 1 / ℓ_i
/// ```
///
/// The kernel keeps `u_i = Σ_j exp(S_ij − M_i)(S_ij − M_i)` and `ℓ_i − 1` next to its running
/// maximum and sum, rescaled by the same factor `α = exp(M_old − M_new)` when the maximum
/// moves (`u ← α (u + (M_old − M_new) ℓ)`); then `entropy = ln_1p(ℓ − 1) − u / ℓ`. Both terms
/// are `>= 0`, so nothing cancels (the textbook `lse − Σ P S` loses `ε · |lse|` absolutely
/// when the logits are large), and a nearly one-hot row keeps its tiny entropy to a relative
/// error of about `(m + 4) · ε` plus what the rounding of the scores themselves contributes
/// (to first order `Σ_j P_ij |ln P_ij + H_i| · δ`, δ the absolute error of a score, about
/// `ε · |S_ij|`). The entropy is clamped to `[0, ln k_i]`, `k_i` the number of keys with a
/// score above −inf (at most the allowed keys). The max logit has a relative error of a few ε
/// (the kernel scores in log₂ units and converts back).
///
/// A fully masked row has `max_logit = −inf`, `entropy = 0`, `max_prob = 0`. Rows whose scores
/// leave the float range are recomputed exactly, as [`scaled_attention_reference`] does, and so
/// are their statistics (from the weights: `max_logit = lse + ln max_j P_ij` where the largest
/// score itself is not finite, so ±inf when the true one is out of range, while the entropy and
/// max probability are those of the weights).
///
/// All three vectors have length n. The struct is `#[non_exhaustive]`: more statistics may be
/// added.
///
/// # Examples
///
/// ```
/// use attention_math::{scaled_attention_with_stats, AttentionOptions, Mask};
/// use nalgebra::dmatrix;
///
/// // One query, keys with scores 0 and ln 3 (scale 1): weights 1/4 and 3/4.
/// let q = dmatrix![1.0_f64];
/// let k = dmatrix![0.0_f64; 3.0_f64.ln()];
/// let (_, stats) = scaled_attention_with_stats(&q, &k, &k, &Mask::none(), &AttentionOptions::new().scale(1.0))?;
/// let h = -(0.25_f64 * 0.25_f64.ln() + 0.75 * 0.75_f64.ln());
/// assert!((stats.entropy[0] - h).abs() < 1e-15);
/// assert!((stats.max_logit[0] - 3.0_f64.ln()).abs() < 1e-15);
/// assert!((stats.max_prob[0] - 0.75).abs() < 1e-15);
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AttentionStats<T: Float> {
    /// `max_j S_ij` over the allowed keys (final scores); `-inf` for a fully masked row.
    pub max_logit: DVector<T>,
    /// The entropy of row i's weights in nats, in `[0, ln(allowed keys)]`; 0 if fully masked.
    pub entropy: DVector<T>,
    /// `max_j P_ij = exp(max_logit_i − lse_i)`, in `(0, 1]`; 0 for a fully masked row.
    pub max_prob: DVector<T>,
}

impl<T: Float> AttentionStats<T> {
    /// n rows of a fully masked attention.
    pub(crate) fn masked(n: usize) -> Self {
        AttentionStats {
            max_logit: DVector::from_element(n, T::NEG_INFINITY),
            entropy: DVector::zeros(n),
            max_prob: DVector::zeros(n),
        }
    }
}

/// One row's statistics from its materialised weights (the oracle's formula, shared by the
/// reference and the kernel's exact rows): `max_score` is the largest final score as computed
/// (`±inf` or `−inf` where the row left the range), `weights` the row's weights, `lse` its
/// log-sum-exp and `support` the number of keys allowed with a bias above −inf. Returns
/// `(max_logit, entropy, max_prob)`.
pub(crate) fn row_stats<T: Float>(max_score: T, weights: &[T], lse: T, support: usize) -> [T; 3] {
    let max_prob = weights
        .iter()
        .fold(T::zero(), |a, &w| if w > a { w } else { a });
    if max_prob == T::zero() {
        // No weight at all: a fully masked row. (A row whose true log-sum-exp is below the
        // range has lse = −inf but weights, and gets their statistics.)
        return [T::NEG_INFINITY, T::zero(), T::zero()];
    }
    let max_logit = if max_score.is_finite() {
        max_score
    } else {
        lse + max_prob.ln()
    };
    let h = crate::entropy::entropy(weights);
    [max_logit, clamp_entropy(h, support), max_prob]
}

/// `h` clamped to `[0, ln support]` (0 for fewer than two keys); NaN stays NaN.
#[inline]
pub(crate) fn clamp_entropy<T: Float>(h: T, support: usize) -> T {
    let top = if support < 2 {
        T::zero()
    } else {
        T::of_usize(support).ln()
    };
    if h < T::zero() {
        T::zero()
    } else if h > top {
        top
    } else {
        h
    }
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
    /// ALiBi's slope for this head, if any.
    pub alibi: Option<T>,
}

/// Checks shapes, finiteness and parameters; the one gate every attention path goes through.
pub(crate) fn plan<T: Float>(
    q: &DMatrixView<'_, T>,
    k: &DMatrixView<'_, T>,
    v: &DMatrixView<'_, T>,
    opts: &AttentionOptions<'_, T>,
) -> Result<Plan<T>> {
    plan_inputs(q, k, v, opts, Inputs::Check)
}

/// Whether [`plan_inputs`] scans Q, K and V for non-finite entries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inputs {
    /// Scan them (the default).
    Check,
    /// The caller has scanned them already (multi-head attention scans each shared K and V
    /// once, not once per query head; a cache scans its rows on append).
    Checked,
    /// The kernel scans them as it reads them (the tiled forward pass, see
    /// [`kernel::scans_inputs`](crate::kernel::scans_inputs)): one read of each input, not
    /// two. The errors keep the order of `Check`: a check after the scan that fails runs the
    /// scan first, and a kernel that finds a non-finite entry has the caller run it
    /// ([`check_inputs`]) to name the first one.
    Deferred,
}

/// The error for inputs a kernel found not finite: the one `scan` (the caller's finiteness
/// scan, such as [`check_inputs`]) returns. The kernel and the scan test the same entries
/// with the same test, so the scan always finds one.
pub(crate) fn input_error(scan: impl FnOnce() -> Result<()>) -> Error {
    match scan() {
        Err(e) => e,
        Ok(()) => {
            debug_assert!(false, "the kernel and the scan disagree");
            Error::NonFinite {
                arg: "q",
                row: 0,
                col: 0,
            }
        }
    }
}

/// The finiteness scan of Q, K and V, in that order: the error names the first non-finite
/// entry of the first matrix that has one.
pub(crate) fn check_inputs<T: Float>(
    q: &DMatrixView<'_, T>,
    k: &DMatrixView<'_, T>,
    v: &DMatrixView<'_, T>,
) -> Result<()> {
    check_finite("q", q)?;
    check_finite("k", k)?;
    check_finite("v", v)
}

/// Room the kernel may add to any dimension when it pads and packs (a tile at most).
const MARGIN: usize = 512;

/// [`plan`], with the finiteness scan of the inputs as `inputs` says.
pub(crate) fn plan_inputs<T: Float>(
    q: &DMatrixView<'_, T>,
    k: &DMatrixView<'_, T>,
    v: &DMatrixView<'_, T>,
    opts: &AttentionOptions<'_, T>,
    inputs: Inputs,
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
    // Every buffer a call allocates is at most a tile larger than an input or the output in
    // each dimension: with that margin checked here, no size computed downstream can wrap.
    for (what, rows, cols) in [
        ("the n x d_v output", n, dv),
        ("the packed queries", n, d),
        ("the packed keys", m, d),
        ("the packed values", m, dv),
    ] {
        checked_len::<T>(
            what,
            rows.saturating_add(MARGIN),
            cols.saturating_add(MARGIN),
        )?;
    }
    if inputs == Inputs::Check {
        check_inputs(q, k, v)?;
    }
    let plan = plan_options(n, m, d, dv, opts);
    if plan.is_err() && inputs == Inputs::Deferred {
        check_inputs(q, k, v)?;
    }
    plan
}

/// The checks of [`plan_inputs`] after the finiteness scan (bias, softcap, ALiBi, scale), and
/// the plan.
fn plan_options<T: Float>(
    n: usize,
    m: usize,
    d: usize,
    dv: usize,
    opts: &AttentionOptions<'_, T>,
) -> Result<Plan<T>> {
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
    let alibi = match opts.alibi {
        None => None,
        Some(Alibi::ByHead) => Some(T::of_f64(alibi_slopes(1)[0])),
        Some(Alibi::Slope(slope)) if slope.is_finite() => Some(slope),
        Some(Alibi::Slope(slope)) => {
            return Err(Error::InvalidParameter {
                name: "alibi slope",
                value: slope.as_f64(),
                requirement: "must be finite",
            });
        }
    };
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
        alibi,
    })
}

impl<T: Float> Plan<T> {
    /// ALiBi's term for query `i` and key `j`: `−slope · |p_i − j|` with `p_i = i + m − n`.
    #[inline]
    pub(crate) fn alibi_at(&self, i: usize, j: usize) -> Option<T> {
        let slope = self.alibi?;
        let p = i as i128 + self.m as i128 - self.n as i128;
        Some(-slope * T::of_f64((p - j as i128).unsigned_abs() as f64))
    }

    /// The final score of one pair from its raw dot product `q_i · k_j`, before masking.
    #[inline]
    pub(crate) fn score(&self, dot: T, bias: Option<T>) -> T {
        self.finish(self.scale * dot, bias)
    }

    /// The final score from the scaled dot product `scale · q_i · k_j` (as [`raw_dots`]
    /// gives it): softcap, then the bias.
    #[inline]
    pub(crate) fn finish(&self, scaled: T, bias: Option<T>) -> T {
        let mut s = scaled;
        if let Some(c) = self.softcap {
            s = c * (s / c).tanh();
        }
        match bias {
            // A −inf bias masks the pair whatever the dot product, even one that overflowed
            // to +inf (inf − inf would be NaN).
            Some(b) if b == T::NEG_INFINITY => T::NEG_INFINITY,
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
        self.score_grad_scaled(self.scale * dot)
    }

    /// [`Plan::score_grad`] from the scaled dot product `scale · q_i · k_j`.
    #[inline]
    pub(crate) fn score_grad_scaled(&self, scaled: T) -> T {
        match self.softcap {
            None => self.scale,
            Some(c) => {
                let ch = (scaled / c).cosh();
                self.scale / (ch * ch)
            }
        }
    }
}

/// One validated attention call: inputs, mask, bias and the plan from [`plan`].
pub(crate) struct Problem<'a, T: Float> {
    pub q: DMatrixView<'a, T>,
    pub k: DMatrixView<'a, T>,
    pub v: DMatrixView<'a, T>,
    pub mask: &'a Mask,
    pub bias: Option<DMatrixView<'a, T>>,
    pub plan: Plan<T>,
}

impl<T: Float> Problem<'_, T> {
    /// Whether an additive bias enters the scores: a bias matrix or ALiBi's per-pair term.
    #[inline]
    pub(crate) fn biased(&self) -> bool {
        self.bias.is_some() || self.plan.alibi.is_some()
    }

    /// The additive bias of pair (i, j): the bias matrix's entry plus ALiBi's term, if either
    /// is given.
    #[inline]
    pub(crate) fn bias_at(&self, i: usize, j: usize) -> Option<T> {
        add_bias(
            self.bias.as_ref().map(|b| b[(i, j)]),
            self.plan.alibi_at(i, j),
        )
    }
}

/// `floor(log₂ |x|)` for a finite nonzero `x` (subnormals included), else 0: then
/// `x · 2^−e` lies in [1, 2) in magnitude, exactly.
pub(crate) fn exponent<T: Float>(x: T) -> i32 {
    let v = x.as_f64().abs();
    if v == 0.0 || !v.is_finite() {
        0
    } else if v < f64::MIN_POSITIVE {
        // An f64 subnormal: 2^64 times it is normal (and exact).
        exponent(v * 2f64.powi(64)) - 64
    } else {
        // The exponent field, exactly (log2 rounds up to 1024 at f64::MAX).
        ((v.to_bits() >> 52) & 0x7ff) as i32 - 1023
    }
}

/// `floor(log₂ max |x|)` if that is above 0, else 0: dividing a row by `2^e` is exact and
/// brings every entry into [−2, 2], so no product or partial sum of a dot product over it can
/// overflow.
fn pow2_exponent<T: Float>(x: impl Iterator<Item = T>) -> i32 {
    let top = x.fold(0.0_f64, |m, v| m.max(v.as_f64().abs()));
    if top <= 1.0 { 0 } else { exponent(top) }
}

/// `x · 2^e` for any `e`, in steps that stay within the normal powers of two of `T` (so the
/// result overflows or underflows only if the exact product does).
pub(crate) fn mul_pow2<T: Float>(mut x: T, mut e: i32) -> T {
    if x == T::zero() || !x.is_finite() {
        return x;
    }
    let step = T::MAX_EXP - 2;
    while e.abs() > step {
        let s = step * e.signum();
        x *= pow2::<T>(s);
        e -= s;
    }
    x * pow2::<T>(e)
}

/// The softmax of one row of final scores, in place, and its log-sum-exp: `row` holds the
/// scores (`−inf` where masked, as [`Plan::finish`] of [`raw_dot_row`] gives them) and
/// becomes the weights.
///
/// Without a softcap, a score can be out of the type's range although every input is finite
/// (`q · k` or `scale · q · k + bias` past MAX rounds to ±inf): then a masked key and an allowed
/// key with a hugely negative score would both read −inf, and two huge scores of different
/// true value would tie. Such a row is recomputed exactly at a power-of-two scale: every score
/// as `2^E · t_j` with `t_j` in range (`E` the largest exponent of the row's dot products and
/// the scale, at least 1), the weights `exp(2^E (t_j − max t))` and `lse = 2^E max t + ln Σ`: the true
/// softmax (to rounding, which in this range picks the winners), and `lse = ±inf` only if
/// the true value is out of range. `allowed` and `bias` describe the row's keys (mask and the
/// additive bias with ALiBi, as for [`Plan::finish`]).
pub(crate) fn softmax_exact_row<T: Float>(
    plan: &Plan<T>,
    q: &DMatrixView<'_, T>,
    i: usize,
    k: &DMatrixView<'_, T>,
    row: &mut [T],
    allowed: impl Fn(usize) -> bool,
    bias: impl Fn(usize) -> Option<T>,
) -> T {
    let out_of_range = plan.softcap.is_none()
        && row
            .iter()
            .enumerate()
            .any(|(j, s)| !s.is_finite() && allowed(j) && bias(j) != Some(T::NEG_INFINITY));
    if !out_of_range {
        let lse = logsumexp(row);
        softmax_in_place(row);
        return lse;
    }
    let ea = pow2_exponent(q.row(i).iter().copied());
    let qs: Vec<T> = q.row(i).iter().map(|&x| mul_pow2(x, -ea)).collect();
    let eb: Vec<i32> = (0..k.nrows())
        .map(|j| pow2_exponent(k.row(j).iter().copied()))
        .collect();
    let top = (0..k.nrows())
        .filter(|&j| allowed(j))
        .map(|j| eb[j])
        .max()
        .unwrap_or(0);
    // The scale's own exponent too: a scale near MAX overflows a moderate dot product, and a
    // subnormal scale times the scaled dot would round to a few bits.
    let es = exponent(plan.scale);
    let scale = mul_pow2(plan.scale, -es);
    let e = (ea + top + es).max(1);
    for (j, s) in row.iter_mut().enumerate() {
        let b = bias(j);
        *s = if !allowed(j) || b == Some(T::NEG_INFINITY) {
            T::NEG_INFINITY
        } else {
            let dot = qs.iter().enumerate().fold(T::zero(), |acc, (c, &qc)| {
                acc + qc * mul_pow2(k[(j, c)], -eb[j])
            });
            let t = mul_pow2(scale * dot, ea + eb[j] + es - e);
            match b {
                Some(b) => t + mul_pow2(b, -e),
                None => t,
            }
        };
    }
    let max = row
        .iter()
        .fold(T::NEG_INFINITY, |a, &s| if s > a { s } else { a });
    let mut sum = T::zero();
    for s in row.iter_mut() {
        *s = if *s == T::NEG_INFINITY {
            T::zero()
        } else {
            mul_pow2(*s - max, e).exp()
        };
        sum += *s;
    }
    for s in row.iter_mut() {
        *s /= sum;
    }
    mul_pow2(max, e) + sum.ln()
}

/// Column `c` of `Σ_j w_j v_j` for one row of weights `w` (summing to 1, or all 0), clamped to
/// the range of the values it combines: a convex combination lies within them, and the clamp
/// only undoes rounding (weights that sum to 1 + ε times values near the float's maximum
/// would otherwise overflow to ±inf).
pub(crate) fn convex_combination<T: Float>(w: &[T], v: &DMatrixView<'_, T>, c: usize) -> T {
    let (mut sum, mut lo, mut hi) = (T::zero(), T::INFINITY, T::NEG_INFINITY);
    for (j, &wj) in w.iter().enumerate() {
        if wj != T::zero() {
            let x = v[(j, c)];
            sum += wj * x;
            lo = if x < lo { x } else { lo };
            hi = if x > hi { x } else { hi };
        }
    }
    if lo > hi {
        sum // no weight at all: 0
    } else if sum < lo {
        lo
    } else if sum > hi {
        hi
    } else {
        sum // also NaN, which propagates
    }
}

/// The scaled dot products `scale · Q Kᵀ` of the reference and exact paths, robust to
/// overflow: the plain product times `scale` wherever both are finite; elsewhere (a product
/// overflowing part-way, `inf − inf = NaN` for finite inputs, or a dot product past the range
/// that a scale below 1, or 0, brings back) the entry is recomputed from the rows divided by
/// powers of two that bring them into [−2, 2] (exact), multiplied by `scale` and scaled back:
/// the true value, or ±inf only if that itself is out of range.
pub(crate) fn raw_dots<T: Float>(
    q: &DMatrixView<'_, T>,
    k: &DMatrixView<'_, T>,
    scale: T,
) -> DMatrix<T> {
    let mut x = q * k.transpose();
    for i in 0..x.nrows() {
        // The query row's power of two and scaled row, found once, only for a row that needs
        // them.
        let mut row = None;
        for j in 0..x.ncols() {
            x[(i, j)] = pick(x[(i, j)], scale, || {
                let (a, qs) = row.get_or_insert_with(|| scaled_row(q, i));
                scaled_dot(qs, *a, k, j, scale)
            });
        }
    }
    x
}

/// Row `i` of `q` divided by `2^a`, `a` its [`pow2_exponent`], and `a`.
fn scaled_row<T: Float>(q: &DMatrixView<'_, T>, i: usize) -> (i32, Vec<T>) {
    let a = pow2_exponent(q.row(i).iter().copied());
    (a, q.row(i).iter().map(|&x| mul_pow2(x, -a)).collect())
}

/// `scale · q_i · k_j` from the rows divided by their powers of two (`qs = q_i / 2^a`), scaled
/// back: finite wherever the true value is, even where the plain products overflow part-way.
/// The scale enters as its mantissa (in [1, 2)) and its exponent, so that a subnormal scale
/// keeps every bit of the product.
fn scaled_dot<T: Float>(qs: &[T], a: i32, k: &DMatrixView<'_, T>, j: usize, scale: T) -> T {
    let b = pow2_exponent(k.row(j).iter().copied());
    let dot_s = qs.iter().enumerate().fold(T::zero(), |acc, (c, &qc)| {
        acc + qc * mul_pow2(k[(j, c)], -b)
    });
    let es = exponent(scale);
    mul_pow2(mul_pow2(scale, -es) * dot_s, a + b + es)
}

/// `scale · dot` from the plain dot product where it is finite, else the scaled one
/// (computed only then). The two agree to the bit wherever neither over- nor underflows (the
/// scales are powers of two); the plain one keeps tiny products that the scaled rows flush to
/// zero (a huge entry in both q and k scales the small ones into underflow), the scaled one
/// survives products past the range.
fn pick<T: Float>(dot: T, scale: T, scaled: impl FnOnce() -> T) -> T {
    let plain = scale * dot;
    if dot.is_finite() && plain.is_finite() {
        plain
    } else {
        scaled()
    }
}

/// Row `i` of [`raw_dots`]: `scale · q_i · k_j` for every row `j` of `k`, with the same
/// scaling (the query row's scale found once, and only if a key needs it).
pub(crate) fn raw_dot_row<T: Float>(
    q: &DMatrixView<'_, T>,
    i: usize,
    k: &DMatrixView<'_, T>,
    scale: T,
) -> Vec<T> {
    let mut row = None;
    (0..k.nrows())
        .map(|j| {
            let dot = q
                .row(i)
                .iter()
                .enumerate()
                .fold(T::zero(), |acc, (c, &qc)| acc + qc * k[(j, c)]);
            pick(dot, scale, || {
                let (a, qs) = row.get_or_insert_with(|| scaled_row(q, i));
                scaled_dot(qs, *a, k, j, scale)
            })
        })
        .collect()
}

/// `a + b` where either may be absent.
#[inline]
pub(crate) fn add_bias<T: Float>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Validates one call and bundles it for the kernel.
pub(crate) fn problem<'a, T: Float>(
    q: DMatrixView<'a, T>,
    k: DMatrixView<'a, T>,
    v: DMatrixView<'a, T>,
    mask: &'a Mask,
    opts: &AttentionOptions<'a, T>,
) -> Result<Problem<'a, T>> {
    problem_inputs(q, k, v, mask, opts, Inputs::Check)
}

/// [`problem`], with the finiteness scan of the inputs as `inputs` says.
pub(crate) fn problem_inputs<'a, T: Float>(
    q: DMatrixView<'a, T>,
    k: DMatrixView<'a, T>,
    v: DMatrixView<'a, T>,
    mask: &'a Mask,
    opts: &AttentionOptions<'a, T>,
    inputs: Inputs,
) -> Result<Problem<'a, T>> {
    let plan = plan_inputs(&q, &k, &v, opts, inputs)?;
    Ok(Problem {
        q,
        k,
        v,
        mask,
        bias: opts.bias,
        plan,
    })
}

/// What [`multi_head_attention_with`](crate::multi_head_attention_with) returns: the output
/// and every head's log-sum-exp, what the
/// [multi-head backward pass](crate::multi_head_attention_backward) needs.
///
/// # Examples
///
/// ```
/// use attention_math::{multi_head_attention_with, AttentionOptions, Heads, Mask};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::zeros(3, 8);
/// let kv = DMatrix::<f64>::zeros(5, 4);
/// let out = multi_head_attention_with(&q, &kv, &kv, Heads::grouped(4, 2), &Mask::none(), &AttentionOptions::new())?;
/// assert_eq!((out.output.shape(), out.lse.shape()), ((3, 8), (3, 4)));
/// assert!((out.lse[(0, 3)] - 5.0_f64.ln()).abs() < 1e-15); // five scores of 0
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct MultiHeadOutput<T: Float> {
    /// The output, n x (H·d_v), the heads side by side.
    pub output: DMatrix<T>,
    /// `lse[(i, h)]`: head h's log-sum-exp of query i (−inf for a fully masked row); n x H.
    pub lse: DMatrix<T>,
}

impl<T: Float> MultiHeadOutput<T> {
    /// The heads' outputs (each n x d_v) side by side and their log-sum-exps (each of length
    /// n) as the columns of `lse`, from the heads of each group in order; `n` and `dv` give
    /// the shape when there are no heads.
    pub(crate) fn from_heads(
        groups: Vec<Vec<(DMatrix<T>, DVector<T>)>>,
        n: usize,
        dv: usize,
    ) -> Self {
        // Column-major, so head h's n x d_v block is one contiguous run of the result: the
        // heads' outputs (and lse) concatenated, with nothing zeroed first.
        let h: usize = groups.iter().map(Vec::len).sum();
        let mut output = Vec::with_capacity(n * h * dv);
        let mut lse = Vec::with_capacity(n * h);
        for (o, l) in groups.into_iter().flatten() {
            debug_assert_eq!((o.shape(), l.len()), ((n, dv), n));
            output.extend_from_slice(o.as_slice());
            lse.extend_from_slice(l.as_slice());
        }
        MultiHeadOutput {
            output: DMatrix::from_vec(n, h * dv, output),
            lse: DMatrix::from_vec(n, h, lse),
        }
    }

    /// The one head of a single-head result: its output and its log-sum-exp as a vector.
    pub(crate) fn into_head(self) -> (DMatrix<T>, DVector<T>) {
        debug_assert_eq!(self.lse.ncols(), 1);
        let lse: Vec<T> = self.lse.data.into();
        (self.output, DVector::from_vec(lse))
    }
}
