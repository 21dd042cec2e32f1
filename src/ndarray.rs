//! The crate's entry points for [`ndarray`](https://docs.rs/ndarray) arrays (feature
//! `ndarray`).
//!
//! Each function takes `ArrayView2`s, runs the nalgebra entry point of the same name on the
//! same numbers and returns `Array2` / `Array1`, so the two agree bit for bit. Shapes,
//! options, masks and errors are those of the nalgebra functions (rows are tokens: Q is
//! n x d, K is m x d, V is m x d_v).
//!
//! **Copies.** nalgebra's views are column-major with unit row stride. A column-major
//! (Fortran-order, `.f()`) contiguous input is used in place; any other layout (ndarray's
//! default row-major order, or a strided slice) is copied once into a column-major matrix,
//! O(rows · cols), next to attention's O(n · m · d). Results are column-major arrays that take
//! over nalgebra's buffers (no copy); `.as_standard_layout()` gives row-major if needed.
//!
//! # Examples
//!
//! ```
//! use attention_math::{ndarray as nd, AttentionOptions, Mask};
//! use ndarray::Array2;
//!
//! let q = Array2::<f32>::from_shape_fn((4, 8), |(i, j)| ((i * 8 + j) as f32 * 0.1).sin());
//! let k = Array2::<f32>::from_shape_fn((6, 8), |(i, j)| ((i * 8 + j) as f32 * 0.2).cos());
//! let v = Array2::<f32>::from_shape_fn((6, 2), |(i, j)| (i + j) as f32);
//! let out = nd::scaled_attention(q.view(), k.view(), v.view(), &Mask::causal())?;
//! assert_eq!(out.dim(), (4, 2));
//! // The same bits as the nalgebra path.
//! let (qn, kn, vn) = (nd::to_dmatrix(q.view()), nd::to_dmatrix(k.view()), nd::to_dmatrix(v.view()));
//! let want = attention_math::scaled_attention(&qn, &kn, &vn, &Mask::causal())?;
//! assert_eq!(out, nd::to_array(want));
//! # Ok::<(), attention_math::Error>(())
//! ```

use crate::Float;
use crate::error::Result;
use crate::grad::AttentionGrads;
use crate::mask::Mask;
use crate::multihead::Heads;
use crate::prelude::*;
use crate::spec::{AttentionOptions, AttentionOutput};
use ::ndarray::{Array1, Array2, ArrayView2, ShapeBuilder};
use nalgebra::{DMatrix, DMatrixView, DVector};

/// An input as nalgebra sees it: borrowed where the layout allows, else a column-major copy.
enum Input<'a, T: Float> {
    Borrowed(DMatrixView<'a, T>),
    Owned(DMatrix<T>),
}

impl<'a, T: Float> Input<'a, T> {
    fn of(a: ArrayView2<'a, T>) -> Self {
        let (rows, cols) = a.dim();
        // Fortran-order contiguous: the transpose is a standard-layout (C-order) slice.
        match a.reversed_axes().to_slice() {
            Some(data) => Input::Borrowed(DMatrixView::from_slice(data, rows, cols)),
            None => Input::Owned(to_dmatrix(a)),
        }
    }

    fn view(&self) -> DMatrixView<'_, T> {
        match self {
            Input::Borrowed(v) => *v,
            Input::Owned(m) => m.as_view(),
        }
    }
}

/// A copy of `a` as a column-major nalgebra matrix (for the options' bias, or to mix the two
/// libraries).
///
/// # Examples
///
/// ```
/// use attention_math::ndarray::to_dmatrix;
/// use ndarray::array;
///
/// let m = to_dmatrix(array![[1.0_f64, 2.0], [3.0, 4.0]].view());
/// assert_eq!(m[(0, 1)], 2.0);
/// ```
pub fn to_dmatrix<T: Float>(a: ArrayView2<'_, T>) -> DMatrix<T> {
    DMatrix::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)])
}

/// `m` as an `Array2` of the same shape, taking over its column-major buffer (no copy).
///
/// # Examples
///
/// ```
/// use attention_math::ndarray::to_array;
/// use nalgebra::dmatrix;
///
/// let a = to_array(dmatrix![1.0_f32, 2.0; 3.0, 4.0]);
/// assert_eq!(a[(1, 0)], 3.0);
/// ```
pub fn to_array<T: Float>(m: DMatrix<T>) -> Array2<T> {
    let (rows, cols) = m.shape();
    let data: Vec<T> = m.data.into();
    Array2::from_shape_vec((rows, cols).f(), data).expect("a column-major buffer of rows x cols")
}

fn to_array1<T: Float>(v: DVector<T>) -> Array1<T> {
    let data: Vec<T> = v.data.into();
    Array1::from_vec(data)
}

/// [`AttentionOutput`] as arrays: the output O (n x d_v), the log-sum-exp per row (length n)
/// and, if asked for, the weights P (n x m).
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionArrays<T: Float> {
    /// O, n x d_v.
    pub output: Array2<T>,
    /// `lse_i = ln Σ_j exp(S_ij)`, `-inf` for a fully masked row.
    pub lse: Array1<T>,
    /// P (n x m), only with [`AttentionOptions::return_weights`].
    pub weights: Option<Array2<T>>,
}

impl<T: Float> From<AttentionOutput<T>> for AttentionArrays<T> {
    fn from(o: AttentionOutput<T>) -> Self {
        AttentionArrays {
            output: to_array(o.output),
            lse: to_array1(o.lse),
            weights: o.weights.map(to_array),
        }
    }
}

/// [`AttentionGrads`] as arrays: dQ (n x d), dK (m x d), dV (m x d_v), and d bias (n x m) if
/// the options held a bias.
#[derive(Clone, Debug, PartialEq)]
pub struct GradArrays<T: Float> {
    /// `∂L/∂Q`, n x d.
    pub dq: Array2<T>,
    /// `∂L/∂K`, m x d.
    pub dk: Array2<T>,
    /// `∂L/∂V`, m x d_v.
    pub dv: Array2<T>,
    /// `∂L/∂B`, n x m, if a bias was given.
    pub dbias: Option<Array2<T>>,
}

/// [`crate::scaled_attention`] on arrays: `softmax(Q Kᵀ / √d + mask) V`, n x d_v.
///
/// # Errors
///
/// Those of [`crate::scaled_attention`].
///
/// # Examples
///
/// See [the module](self).
pub fn scaled_attention<T: Float>(
    q: ArrayView2<'_, T>,
    k: ArrayView2<'_, T>,
    v: ArrayView2<'_, T>,
    mask: &Mask,
) -> Result<Array2<T>> {
    let (q, k, v) = (Input::of(q), Input::of(k), Input::of(v));
    crate::scaled_attention(q.view(), k.view(), v.view(), mask).map(to_array)
}

/// [`crate::scaled_attention_with`] on arrays: the output, the log-sum-exp and (if asked for)
/// the weights.
///
/// # Errors
///
/// Those of [`crate::scaled_attention_with`].
///
/// # Examples
///
/// ```
/// use attention_math::{ndarray as nd, AttentionOptions, Mask};
/// use ndarray::Array2;
///
/// let x = Array2::<f64>::from_shape_fn((3, 2), |(i, j)| (i as f64 - j as f64).sin());
/// let out = nd::scaled_attention_with(x.view(), x.view(), x.view(), &Mask::causal(),
///     &AttentionOptions::new().return_weights(true))?;
/// // The first query sees only the first key.
/// assert_eq!(out.weights.unwrap()[(0, 0)], 1.0);
/// assert_eq!(out.lse.len(), 3);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn scaled_attention_with<T: Float>(
    q: ArrayView2<'_, T>,
    k: ArrayView2<'_, T>,
    v: ArrayView2<'_, T>,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
) -> Result<AttentionArrays<T>> {
    let (q, k, v) = (Input::of(q), Input::of(k), Input::of(v));
    crate::scaled_attention_with(q.view(), k.view(), v.view(), mask, opts).map(Into::into)
}

/// [`crate::multi_head_attention`] on arrays: H query heads over G key-value heads, head h
/// in columns `h·d .. (h+1)·d` of Q (n x H·d), K (m x G·d), V (m x G·d_v); the output is
/// n x H·d_v.
///
/// # Errors
///
/// Those of [`crate::multi_head_attention`].
///
/// # Examples
///
/// ```
/// use attention_math::{ndarray as nd, AttentionOptions, Heads, Mask};
/// use ndarray::Array2;
///
/// let q = Array2::<f32>::from_shape_fn((1, 8), |(_, j)| j as f32 * 0.1);
/// let kv = Array2::<f32>::from_shape_fn((5, 2), |(i, j)| (i * 2 + j) as f32 * 0.1);
/// let out = nd::multi_head_attention(q.view(), kv.view(), kv.view(), Heads::grouped(4, 1),
///     &Mask::none(), &AttentionOptions::new())?;
/// assert_eq!(out.dim(), (1, 8));
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn multi_head_attention<T: Float>(
    q: ArrayView2<'_, T>,
    k: ArrayView2<'_, T>,
    v: ArrayView2<'_, T>,
    heads: Heads,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
) -> Result<Array2<T>> {
    let (q, k, v) = (Input::of(q), Input::of(k), Input::of(v));
    crate::multi_head_attention(q.view(), k.view(), v.view(), heads, mask, opts).map(to_array)
}

/// [`crate::attention_backward`] on arrays: dQ, dK, dV (and d bias) from the saved forward
/// result and the upstream gradient `d_out` (n x d_v).
///
/// # Errors
///
/// Those of [`crate::attention_backward`].
///
/// # Examples
///
/// ```
/// use attention_math::{ndarray as nd, AttentionOptions, Mask};
/// use ndarray::Array2;
///
/// let x = Array2::<f64>::from_shape_fn((4, 3), |(i, j)| ((i * 3 + j) as f64).sin());
/// let opts = AttentionOptions::new();
/// let fwd = nd::scaled_attention_with(x.view(), x.view(), x.view(), &Mask::causal(), &opts)?;
/// let g = nd::attention_backward(x.view(), x.view(), x.view(), &Mask::causal(), &opts, &fwd,
///     Array2::ones((4, 3)).view())?;
/// // Every row of P sums to 1, so dV's column sums equal those of d_out: 4.
/// assert!((g.dv.column(0).sum() - 4.0).abs() < 1e-12);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn attention_backward<T: Float>(
    q: ArrayView2<'_, T>,
    k: ArrayView2<'_, T>,
    v: ArrayView2<'_, T>,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
    forward: &AttentionArrays<T>,
    d_out: ArrayView2<'_, T>,
) -> Result<GradArrays<T>> {
    let (q, k, v, g) = (Input::of(q), Input::of(k), Input::of(v), Input::of(d_out));
    let saved = AttentionOutput {
        output: to_dmatrix(forward.output.view()),
        lse: DVector::from_iterator(forward.lse.len(), forward.lse.iter().copied()),
        weights: None,
    };
    let AttentionGrads { dq, dk, dv, dbias } =
        crate::attention_backward(q.view(), k.view(), v.view(), mask, opts, &saved, g.view())?;
    Ok(GradArrays {
        dq: to_array(dq),
        dk: to_array(dk),
        dv: to_array(dv),
        dbias: dbias.map(to_array),
    })
}

/// [`crate::softmax_rows`] on an array: the softmax of every row.
///
/// # Examples
///
/// ```
/// use attention_math::ndarray::softmax_rows;
/// use ndarray::array;
///
/// let p = softmax_rows(array![[0.0_f64, 0.0], [1.0, f64::NEG_INFINITY]].view());
/// assert_eq!(p, array![[0.5, 0.5], [1.0, 0.0]]);
/// ```
pub fn softmax_rows<T: Float>(x: ArrayView2<'_, T>) -> Array2<T> {
    to_array(crate::softmax_rows(Input::of(x).view()))
}

/// [`crate::log_softmax_rows`] on an array.
///
/// # Examples
///
/// ```
/// use attention_math::ndarray::log_softmax_rows;
/// use ndarray::array;
///
/// let l = log_softmax_rows(array![[0.0_f64, 0.0]].view());
/// assert!((l[(0, 0)] + 2.0_f64.ln()).abs() < 1e-15);
/// ```
pub fn log_softmax_rows<T: Float>(x: ArrayView2<'_, T>) -> Array2<T> {
    to_array(crate::log_softmax_rows(Input::of(x).view()))
}

/// [`crate::logsumexp_rows`] on an array: `ln Σ_j exp(x_ij)` per row.
///
/// # Examples
///
/// ```
/// use attention_math::ndarray::logsumexp_rows;
/// use ndarray::array;
///
/// let l = logsumexp_rows(array![[0.0_f64, 0.0]].view());
/// assert!((l[0] - 2.0_f64.ln()).abs() < 1e-15);
/// ```
pub fn logsumexp_rows<T: Float>(x: ArrayView2<'_, T>) -> Array1<T> {
    to_array1(crate::logsumexp_rows(Input::of(x).view()))
}

/// [`Mask::to_dense`] as an array: `true` where query i may attend to key j.
///
/// # Errors
///
/// [`Error::TooLarge`](crate::Error::TooLarge) if n x m entries cannot be allocated.
///
/// # Examples
///
/// ```
/// use attention_math::{ndarray::mask_to_dense, Mask};
///
/// let grid = mask_to_dense(&Mask::causal(), 2, 2)?;
/// assert_eq!(grid, ndarray::array![[true, false], [true, true]]);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn mask_to_dense(mask: &Mask, n: usize, m: usize) -> Result<Array2<bool>> {
    let dense = mask.to_dense(n, m)?;
    let data: Vec<bool> = dense.data.into();
    Ok(Array2::from_shape_vec((n, m).f(), data).expect("a column-major buffer of n x m"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AttentionOptions, Mask};
    use ::ndarray::{Array2, s};

    fn arrays(n: usize, m: usize, d: usize) -> (Array2<f64>, Array2<f64>, Array2<f64>) {
        let f = |r: usize, c: usize, t: f64| {
            Array2::from_shape_fn((r, c), move |(i, j)| ((i * c + j) as f64 * 0.37 + t).sin())
        };
        (f(n, d, 0.1), f(m, d, 0.2), f(m, 3, 0.3))
    }

    /// Row-major, column-major and strided inputs all give the nalgebra path's bits.
    #[test]
    fn every_layout_matches_nalgebra_bit_for_bit() {
        let (q, k, v) = arrays(7, 11, 5);
        let opts = AttentionOptions::new().softcap(2.0);
        let mask = Mask::causal_bottom_right();
        let (qn, kn, vn) = (
            to_dmatrix(q.view()),
            to_dmatrix(k.view()),
            to_dmatrix(v.view()),
        );
        let want = crate::scaled_attention_with(&qn, &kn, &vn, &mask, &opts).unwrap();
        let fortran = |a: &Array2<f64>| {
            let mut f = Array2::zeros(a.dim().f());
            f.assign(a);
            f
        };
        let (qf, kf, vf) = (fortran(&q), fortran(&k), fortran(&v));
        assert!(matches!(Input::of(qf.view()), Input::Borrowed(_)));
        assert!(matches!(Input::of(q.view()), Input::Owned(_)));
        let wide = Array2::from_shape_fn((7, 10), |(i, j)| q[(i, j / 2)]);
        let strided = wide.slice(s![.., ..;2]);
        for (qa, ka, va) in [
            (q.view(), k.view(), v.view()),
            (qf.view(), kf.view(), vf.view()),
            (strided, k.view(), vf.view()),
        ] {
            let got = scaled_attention_with(qa, ka, va, &mask, &opts).unwrap();
            assert_eq!(got.output, to_array(want.output.clone()));
            assert_eq!(
                got.lse.to_vec(),
                want.lse.iter().copied().collect::<Vec<_>>()
            );
            let g = attention_backward(qa, ka, va, &mask, &opts, &got, va.slice(s![..7, ..]));
            let gn = crate::attention_backward(&qn, &kn, &vn, &mask, &opts, &want, vn.rows(0, 7))
                .unwrap();
            let g = g.unwrap();
            assert_eq!(g.dq, to_array(gn.dq));
            assert_eq!(g.dk, to_array(gn.dk));
            assert_eq!(g.dv, to_array(gn.dv));
        }
        let sm = softmax_rows(q.view());
        assert_eq!(sm, to_array(crate::softmax_rows(&qn)));
    }

    #[test]
    fn errors_are_the_nalgebra_ones() {
        let (q, k, v) = arrays(3, 4, 2);
        let e = scaled_attention(q.view(), k.slice(s![.., ..1]), v.view(), &Mask::none());
        assert!(matches!(e, Err(crate::Error::DimensionMismatch { .. })));
    }
}
