//! Multi-head, grouped-query and multi-query attention.
//!
//! The math and the design are in `src/guide/multi_head.md`, rendered as
//! [`crate::guide::multi_head`].

use crate::Float;
use crate::error::check_finite;
use crate::error::{Error, Result};
use crate::kernel;
use crate::mask::Mask;
use crate::prelude::*;
use crate::spec::{
    Alibi, AttentionOptions, Inputs, MultiHeadOutput, Problem, alibi_slopes, check_inputs,
    input_error, problem_inputs,
};
use nalgebra::{DMatrix, DMatrixView};
#[cfg(feature = "half")]
use nalgebra::{Dyn, U1};

/// How many query heads and key-value heads an attention layer has.
///
/// # Examples
///
/// ```
/// use attention_math::Heads;
///
/// let gqa = Heads::grouped(8, 2); // 4 query heads share each key-value head
/// assert_eq!(gqa.group_size(), 4);
/// assert_eq!(Heads::multi_head(8), Heads::grouped(8, 8));
/// assert_eq!(Heads::multi_query(8), Heads::grouped(8, 1));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    /// Number of query heads H.
    pub query: usize,
    /// Number of key-value heads G; must divide H.
    pub kv: usize,
}

impl Heads {
    /// Multi-head attention: H query heads, each with its own key-value head.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attention_math::Heads::multi_head(4).kv, 4);
    /// ```
    pub fn multi_head(heads: usize) -> Self {
        Heads {
            query: heads,
            kv: heads,
        }
    }

    /// Multi-query attention: H query heads sharing one key-value head.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attention_math::Heads::multi_query(4).kv, 1);
    /// ```
    pub fn multi_query(heads: usize) -> Self {
        Heads {
            query: heads,
            kv: 1,
        }
    }

    /// Grouped-query attention: `query` heads in `kv` groups.
    ///
    /// # Examples
    ///
    /// ```
    /// let h = attention_math::Heads::grouped(6, 3);
    /// assert_eq!((h.query, h.kv), (6, 3));
    /// ```
    pub fn grouped(query: usize, kv: usize) -> Self {
        Heads { query, kv }
    }

    /// Query heads per key-value head, H / G (0 if G is 0).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attention_math::Heads::grouped(6, 3).group_size(), 2);
    /// ```
    pub fn group_size(&self) -> usize {
        self.query.checked_div(self.kv).unwrap_or(0)
    }

    /// The key-value head that query head `h` reads: `h / (H/G)`.
    ///
    /// # Examples
    ///
    /// ```
    /// let h = attention_math::Heads::grouped(8, 2);
    /// assert_eq!((h.kv_head(3), h.kv_head(4)), (0, 1));
    /// ```
    pub fn kv_head(&self, h: usize) -> usize {
        h / self.group_size().max(1)
    }

    fn validate(&self) -> Result<()> {
        if self.query == 0 {
            return Err(Error::InvalidParameter {
                name: "query heads",
                value: 0.0,
                requirement: "must be >= 1",
            });
        }
        if self.kv == 0 || !self.query.is_multiple_of(self.kv) {
            return Err(Error::InvalidParameter {
                name: "kv heads",
                value: self.kv as f64,
                requirement: "must be >= 1 and divide the number of query heads",
            });
        }
        Ok(())
    }
}

/// Width of one head: `cols / heads`, or an error naming the argument.
fn head_width(arg: &'static str, cols: usize, heads: usize) -> Result<usize> {
    if cols.is_multiple_of(heads) {
        Ok(cols / heads)
    } else {
        Err(Error::HeadSplit {
            arg,
            len: cols,
            heads,
        })
    }
}

/// Multi-head / grouped-query attention: every query head attends with its group's keys and
/// values; the head outputs are concatenated in the columns. See the [guide](crate::guide::multi_head).
///
/// Shapes: `q` n x (H·d), `k` m x (G·d), `v` m x (G·d_v); result n x (H·d_v).
///
/// # Errors
///
/// - [`Error::InvalidParameter`] if H = 0, G = 0 or G does not divide H;
/// - [`Error::HeadSplit`] if the columns of `q` (by H), `k` or `v` (by G) do not split evenly;
/// - [`Error::ShapeMismatch`] if `k`'s head width differs from `q`'s;
/// - every error of [`scaled_attention_with`](crate::scaled_attention_with).
///
/// # Examples
///
/// ```
/// use attention_math::{multi_head_attention, scaled_attention, AttentionOptions, Heads, Mask};
/// use nalgebra::DMatrix;
///
/// // 4 query heads of width 2 sharing 2 key-value heads (GQA).
/// let q = DMatrix::<f64>::from_fn(3, 8, |i, j| ((i * 8 + j) as f64).sin());
/// let k = DMatrix::<f64>::from_fn(3, 4, |i, j| ((i * 4 + j) as f64).cos());
/// let v = DMatrix::<f64>::from_fn(3, 4, |i, j| (i + j) as f64);
/// let out = multi_head_attention(&q, &k, &v, Heads::grouped(4, 2), &Mask::causal(), &AttentionOptions::new())?;
/// assert_eq!(out.shape(), (3, 8));
/// // Head 3 uses key-value group 1.
/// let head3 = scaled_attention(q.columns(6, 2), k.columns(2, 2), v.columns(2, 2), &Mask::causal())?;
/// assert_eq!(out.columns(6, 2), head3);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn multi_head_attention<'q, 'k, 'v, T: Float>(
    q: impl Into<DMatrixView<'q, T>>,
    k: impl Into<DMatrixView<'k, T>>,
    v: impl Into<DMatrixView<'v, T>>,
    heads: Heads,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
) -> Result<DMatrix<T>> {
    multi_head(
        q.into(),
        k.into(),
        v.into(),
        heads,
        mask,
        opts,
        Inputs::Check,
    )
}

/// [`multi_head_attention`] on views, scanning K and V for non-finite entries as `kv` says
/// (a [`KvCache`](crate::KvCache) scanned its rows when they were appended).
pub(crate) fn multi_head<T: Float>(
    q: DMatrixView<'_, T>,
    k: DMatrixView<'_, T>,
    v: DMatrixView<'_, T>,
    heads: Heads,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
    kv: Inputs,
) -> Result<DMatrix<T>> {
    Ok(multi_head_outputs(q, k, v, heads, mask, opts, kv)?.output)
}

/// The per-head problems of a layer: shapes and head counts checked, the shared K and V
/// scanned for non-finite entries once (as `kv` says), not once per query head (the
/// positions reported are those in the whole matrices), then every head's shapes and options
/// in order, with ALiBi's per-head slopes. Also returns (d, d_v).
///
/// With `defer` the scan is left to the kernel (see [`Inputs::Deferred`]) unless a later
/// check fails, which runs it first: the errors come in the same order either way.
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_problems<'a, T: Float>(
    q: &'a DMatrixView<'_, T>,
    k: &'a DMatrixView<'_, T>,
    v: &'a DMatrixView<'_, T>,
    heads: Heads,
    mask: &'a Mask,
    opts: &AttentionOptions<'a, T>,
    kv: Inputs,
    defer: bool,
) -> Result<(Vec<Problem<'a, T>>, usize, usize)> {
    heads.validate()?;
    let d = head_width("q", q.ncols(), heads.query)?;
    let dk = head_width("k", k.ncols(), heads.kv)?;
    let dv = head_width("v", v.ncols(), heads.kv)?;
    if dk != d {
        return Err(Error::ShapeMismatch {
            arg: "k",
            found: k.shape(),
            expected: (k.nrows(), heads.kv * d),
        });
    }
    if !defer {
        scan_layer(q, k, v, kv)?;
    }
    let problems = (0..heads.query)
        .map(|h| {
            let g = heads.kv_head(h);
            problem_inputs(
                q.columns(h * d, d),
                k.columns(g * d, d),
                v.columns(g * dv, dv),
                mask,
                opts,
                Inputs::Checked,
            )
        })
        .collect::<Result<Vec<_>>>();
    let mut problems = match problems {
        Ok(p) => p,
        Err(e) => {
            if defer {
                scan_layer(q, k, v, kv)?;
            }
            return Err(e);
        }
    };
    // ALiBi by head: head h gets the h-th of the paper's H slopes.
    if opts.alibi == Some(Alibi::ByHead) {
        for (p, slope) in problems.iter_mut().zip(alibi_slopes(heads.query)) {
            p.plan.alibi = Some(T::of_f64(slope));
        }
    }
    Ok((problems, d, dv))
}

/// The finiteness scan of a layer's inputs: Q, then K and V if `kv` asks for it.
fn scan_layer<T: Float>(
    q: &DMatrixView<'_, T>,
    k: &DMatrixView<'_, T>,
    v: &DMatrixView<'_, T>,
    kv: Inputs,
) -> Result<()> {
    match kv {
        Inputs::Check => check_inputs(q, k, v),
        _ => check_finite("q", q),
    }
}

/// Output and per-head log-sum-exp of a layer (see [`multi_head_attention_with`]).
fn multi_head_outputs<T: Float>(
    q: DMatrixView<'_, T>,
    k: DMatrixView<'_, T>,
    v: DMatrixView<'_, T>,
    heads: Heads,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
    kv: Inputs,
) -> Result<MultiHeadOutput<T>> {
    // The tiled pass scans the inputs as it packs them (one read of each, not two).
    let defer = kernel::scans_inputs(heads.group_size() * q.nrows(), k.nrows());
    let (problems, _, _) = head_problems(&q, &k, &v, heads, mask, opts, kv, defer)?;
    // Heads (or, decoding, GQA groups) run in parallel; every head is computed by the same
    // arithmetic whatever thread runs it, so the result does not depend on the thread count.
    let (layer, finite) = kernel::attend(&problems, heads.group_size(), opts.threads);
    if !finite {
        return Err(input_error(|| scan_layer(&q, &k, &v, kv)));
    }
    Ok(layer)
}

/// [`multi_head`] over keys and values stored as `X` (a half-precision [`KvCache`](crate::KvCache),
/// whose rows were scanned on append), computed in `T`. Few query rows per group go the decode
/// path, which reads `k` and `v` where they are, widening as it goes; otherwise K and V are
/// widened into `T` matrices first (a copy of the cache) and take the tiled path.
#[cfg(feature = "half")]
pub(crate) fn multi_head_stored<T: Float, X: crate::simd::Stored<T> + nalgebra::Scalar>(
    q: DMatrixView<'_, T>,
    k: DMatrixView<'_, X>,
    v: DMatrixView<'_, X>,
    heads: Heads,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
) -> Result<DMatrix<T>> {
    let m = k.nrows();
    if !kernel::decodes(heads.group_size() * q.nrows(), m) {
        let widen = |x: &DMatrixView<'_, X>| x.map(|e| e.widen());
        let (kw, vw) = (widen(&k), widen(&v));
        return multi_head(
            q,
            kw.as_view(),
            vw.as_view(),
            heads,
            mask,
            opts,
            Inputs::Checked,
        );
    }
    // The problems need K and V only for their shapes (the decode kernel reads `k` and `v`,
    // and the rows it recomputes exactly widen them): m x cols views of one zero column,
    // column stride 0.
    let zeros = vec![T::zero(); m];
    let proxy = |cols: usize| {
        DMatrixView::from_slice_with_strides_generic(&zeros, Dyn(m), Dyn(cols), U1, Dyn(0))
    };
    let (kp, vp) = (proxy(k.ncols()), proxy(v.ncols()));
    let (problems, d, dv) = head_problems(&q, &kp, &vp, heads, mask, opts, Inputs::Checked, false)?;
    Ok(kernel::attend_stored(&problems, heads.group_size(), (k, v), (d, dv), opts.threads).output)
}

/// [`multi_head_attention`] that also returns every head's log-sum-exp (a
/// [`MultiHeadOutput`]), for the backward pass or for merging split results.
///
/// # Errors
///
/// Those of [`multi_head_attention`].
///
/// # Examples
///
/// ```
/// use attention_math::{multi_head_attention, multi_head_attention_with, AttentionOptions, Heads, Mask};
/// use nalgebra::DMatrix;
///
/// let x = DMatrix::<f32>::from_fn(6, 8, |i, j| ((i * 8 + j) as f32).sin());
/// let heads = Heads::multi_head(4);
/// let opts = AttentionOptions::new();
/// let with = multi_head_attention_with(&x, &x, &x, heads, &Mask::causal(), &opts)?;
/// assert_eq!(with.output, multi_head_attention(&x, &x, &x, heads, &Mask::causal(), &opts)?);
/// // Query 0 sees only key 0 under the causal mask: head 2's lse is that one score,
/// // (x₀₄² + x₀₅²)/√2 (head 2 is columns 4 and 5).
/// let score = (x[(0, 4)] * x[(0, 4)] + x[(0, 5)] * x[(0, 5)]) / 2f32.sqrt();
/// assert!((with.lse[(0, 2)] - score).abs() < 1e-6);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn multi_head_attention_with<'q, 'k, 'v, T: Float>(
    q: impl Into<DMatrixView<'q, T>>,
    k: impl Into<DMatrixView<'k, T>>,
    v: impl Into<DMatrixView<'v, T>>,
    heads: Heads,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
) -> Result<MultiHeadOutput<T>> {
    multi_head_outputs(
        q.into(),
        k.into(),
        v.into(),
        heads,
        mask,
        opts,
        Inputs::Check,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_head_counts_are_errors() {
        let q = DMatrix::<f32>::zeros(2, 8);
        let k = DMatrix::<f32>::zeros(3, 4);
        let opts = AttentionOptions::new();
        let m = Mask::none();
        let e = multi_head_attention(&q, &k, &k, Heads::grouped(4, 3), &m, &opts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kv heads = 3 is invalid: it must be >= 1 and divide the number of query heads"
        );
        let e = multi_head_attention(&q, &k, &k, Heads::grouped(3, 1), &m, &opts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "q has 8 columns, which do not split evenly into 3 heads"
        );
        let e = multi_head_attention(&q, &k, &k, Heads::multi_head(4), &m, &opts).unwrap_err();
        assert_eq!(e.to_string(), "k is 3 x 4 but must be 3 x 8");
        assert!(multi_head_attention(&q, &k, &k, Heads::grouped(0, 1), &m, &opts).is_err());
        assert!(multi_head_attention(&q, &k, &k, Heads::grouped(4, 0), &m, &opts).is_err());
    }

    #[test]
    fn multi_query_equals_repeating_the_kv_head() {
        let q = DMatrix::<f64>::from_fn(5, 6, |i, j| ((3 * i + j) as f64 * 0.37).sin());
        let k = DMatrix::<f64>::from_fn(4, 2, |i, j| ((i + 5 * j) as f64 * 0.21).cos());
        let v = DMatrix::<f64>::from_fn(4, 3, |i, j| (i as f64) - (j as f64));
        let opts = AttentionOptions::new();
        let mqa =
            multi_head_attention(&q, &k, &v, Heads::multi_query(3), &Mask::none(), &opts).unwrap();
        // The same layer as MHA with the one key-value head copied three times.
        let k3 = DMatrix::from_fn(4, 6, |i, j| k[(i, j % 2)]);
        let v3 = DMatrix::from_fn(4, 9, |i, j| v[(i, j % 3)]);
        let mha =
            multi_head_attention(&q, &k3, &v3, Heads::multi_head(3), &Mask::none(), &opts).unwrap();
        assert!((mqa - mha).amax() < 1e-15);
    }
}
