//! Softmax, log-softmax and log-sum-exp.
//!
//! The math and the design are in `src/guide/softmax.md`, rendered as
//! [`crate::guide::softmax`].

use crate::Float;
use crate::error::{Result, check_positive};
use crate::prelude::*;
use crate::simd::{self, Isa};
use nalgebra::{DMatrix, DMatrixView, DVector};

/// `x ← eˣ` for every entry, vectorised: the exponential the softmax family and the attention
/// kernel run on.
///
/// The instruction set is chosen at run time (AVX-512F, else AVX2 + FMA, else portable code;
/// see [`instruction_set`](crate::instruction_set)), and every one gives the same bits. The
/// result is within 1 ulp of the correctly rounded value in f32 and within 2.2e-16 relative of
/// `std` in f64, several times faster than `std`'s `exp`. Special values: `-inf` gives 0,
/// NaN gives NaN, overflow gives `+inf`, and results below the smallest normal float
/// (x < −87.34 in f32, x < −708.40 in f64) are flushed to `+0`.
///
/// # Examples
///
/// ```
/// use attention_math::exp_in_place;
///
/// let mut x = [0.0_f32, 1.0, -1.0, f32::NEG_INFINITY, -100.0, 100.0];
/// exp_in_place(&mut x);
/// assert_eq!(x[0], 1.0);
/// assert!((x[1] - std::f32::consts::E).abs() <= f32::EPSILON * 3.0);
/// assert!((x[2] - (-1.0_f32).exp()).abs() <= f32::EPSILON);
/// assert_eq!(&x[3..], &[0.0, 0.0, f32::INFINITY]);
/// ```
pub fn exp_in_place<T: Float>(x: &mut [T]) {
    simd::exp_in_place(Isa::get(), x);
}

/// What a row reduces to before normalising.
pub(crate) enum Peak<T> {
    /// A NaN entry: the result is NaN everywhere.
    Nan,
    /// Empty, or every entry is `-inf`: no mass anywhere.
    Nothing,
    /// `count` entries are `+inf` and share the mass.
    Infinite { count: usize },
    /// The maximum is finite.
    Finite(T),
}

pub(crate) fn peak<T: Float>(x: &[T]) -> Peak<T> {
    let mut max = T::NEG_INFINITY;
    for &xi in x {
        if xi.is_nan_value() {
            return Peak::Nan;
        }
        if xi > max {
            max = xi;
        }
    }
    if max == T::NEG_INFINITY {
        Peak::Nothing
    } else if max == T::INFINITY {
        Peak::Infinite {
            count: x.iter().filter(|&&xi| xi == T::INFINITY).count(),
        }
    } else {
        Peak::Finite(max)
    }
}

/// `Σ_j exp(x_j − max)` over every entry but the first maximum (which contributes exactly
/// `exp(0) = 1`), so that `ln Σ_j exp(x_j − max) = ln_1p(rest)` keeps full relative accuracy
/// when the other entries are small (a nearly one-hot row), where `ln(1 + rest)` would lose
/// `rest`'s low bits to the rounding of `1 + rest`.
///
/// Exponentiates through a small stack buffer with the kernel's vectorised exp.
pub(crate) fn shifted_rest<T: Float>(x: &[T], max: T) -> T {
    let skip = x.iter().position(|&v| v == max);
    let mut buf = [T::zero(); 256];
    let mut acc = T::zero();
    for (c, chunk) in x.chunks(buf.len()).enumerate() {
        let buf = &mut buf[..chunk.len()];
        for (b, &xi) in buf.iter_mut().zip(chunk) {
            *b = xi - max;
        }
        if let Some(k) = skip
            .and_then(|k| k.checked_sub(c * 256))
            .filter(|&k| k < chunk.len())
        {
            buf[k] = T::NEG_INFINITY;
        }
        exp_in_place(buf);
        acc = buf.iter().fold(acc, |acc, &e| acc + e);
    }
    acc
}

/// Log-sum-exp, `ln Σ_j exp(x_j)`, computed as `max + ln Σ_j exp(x_j − max)`.
///
/// Returns `-inf` for an empty slice or one whose entries are all `-inf`, `+inf` if any
/// entry is `+inf`, NaN if any entry is NaN.
///
/// It is evaluated as `max + ln_1p(Σ_{j ≠ k} exp(x_j − max))` with `k` the first maximum:
/// the sum lies in `[0, m − 1]`, so nothing overflows or underflows that matters, and
/// `ln_1p` keeps `lse − max` relatively accurate when the row is nearly one-hot.
///
/// Accuracy: the absolute error is at most about `(|max| + ln m + m + 2) · ε` (ε the type's
/// epsilon), which is the function's own conditioning for large `|max|`. Terms more than
/// about 87 (f32) or 708 (f64) below the maximum are flushed to 0 by the exponential, which
/// changes the sum by less than one ulp.
///
/// # Examples
///
/// ```
/// use attention_math::logsumexp;
///
/// let x = [1.0_f64, 2.0, 3.0];
/// let direct = (1.0_f64.exp() + 2.0_f64.exp() + 3.0_f64.exp()).ln();
/// assert!((logsumexp(&x) - direct).abs() < 1e-14);
/// // Stable where the direct formula overflows:
/// assert_eq!(logsumexp(&[1e30_f32, 1e30]), 1e30);
/// assert_eq!(logsumexp::<f64>(&[]), f64::NEG_INFINITY);
/// ```
pub fn logsumexp<T: Float>(x: &[T]) -> T {
    match peak(x) {
        Peak::Nan => T::NAN,
        Peak::Nothing => T::NEG_INFINITY,
        Peak::Infinite { .. } => T::INFINITY,
        Peak::Finite(max) => max + shifted_rest(x, max).ln_1p(),
    }
}

/// Softmax in place: `x_i <- exp(x_i − lse(x))`.
///
/// See [`softmax`] for the formula and the edge cases.
///
/// # Examples
///
/// ```
/// use attention_math::softmax_in_place;
///
/// let mut x = [0.0_f32, f32::NEG_INFINITY, 0.0];
/// softmax_in_place(&mut x);
/// assert_eq!(x, [0.5, 0.0, 0.5]);
/// ```
pub fn softmax_in_place<T: Float>(x: &mut [T]) {
    match peak(x) {
        Peak::Nan => x.fill(T::NAN),
        Peak::Nothing => x.fill(T::zero()),
        Peak::Infinite { count } => {
            let share = T::one() / T::of_usize(count);
            for xi in x.iter_mut() {
                *xi = if *xi == T::INFINITY { share } else { T::zero() };
            }
        }
        Peak::Finite(max) => {
            for xi in x.iter_mut() {
                *xi -= max;
            }
            exp_in_place(x);
            let sum = x.iter().fold(T::zero(), |acc, &e| acc + e);
            let inv = T::one() / sum;
            for xi in x.iter_mut() {
                *xi *= inv;
            }
        }
    }
}

/// Softmax: `softmax(x)_i = exp(x_i − max) / Σ_j exp(x_j − max)`.
///
/// The result sums to 1 unless the input is empty or all `-inf` (then it is all zeros,
/// the convention for a fully masked attention row). Subtracting the maximum makes it
/// exact for huge finite logits and invariant to adding a constant to every entry.
///
/// Accuracy: each weight has a relative error of at most about `(|x_i − max| + m + 2) · ε`:
/// the rounding of `x_i − max` (amplified by the exponential: the conditioning of softmax
/// itself), 1 ulp from the exponential and `m` roundings in the sum. Weights below the
/// smallest normal float (`exp(x_i − max)` under about `1e-38` in f32, `1e-308` in f64) are
/// flushed to 0; [`log_softmax`] keeps them.
///
/// # Examples
///
/// ```
/// use attention_math::softmax;
///
/// // softmax(ln x) = x / Σx exactly (up to rounding).
/// let x = [1.0_f64, 2.0, 3.0, 4.0];
/// let logits: Vec<f64> = x.iter().map(|v| v.ln()).collect();
/// let p = softmax(&logits);
/// for (pi, xi) in p.iter().zip(x) {
///     assert!((pi - xi / 10.0).abs() < 1e-15);
/// }
/// // A fully masked row gives zeros, not NaN.
/// assert_eq!(softmax(&[f32::NEG_INFINITY; 3]), vec![0.0; 3]);
/// // Huge logits are fine.
/// assert_eq!(softmax(&[1e30_f32, 0.0]), vec![1.0, 0.0]);
/// ```
pub fn softmax<T: Float>(x: &[T]) -> Vec<T> {
    let mut out = x.to_vec();
    softmax_in_place(&mut out);
    out
}

/// Log-softmax in place: `x_i <- x_i − lse(x)`.
///
/// See [`log_softmax`] for the edge cases.
///
/// # Examples
///
/// ```
/// use attention_math::log_softmax_in_place;
///
/// let mut x = [0.0_f64, 0.0];
/// log_softmax_in_place(&mut x);
/// assert_eq!(x, [-(2.0_f64.ln()), -(2.0_f64.ln())]);
/// ```
pub fn log_softmax_in_place<T: Float>(x: &mut [T]) {
    match peak(x) {
        Peak::Nan => x.fill(T::NAN),
        // ln 0 = -inf everywhere (entries are already -inf).
        Peak::Nothing => x.fill(T::NEG_INFINITY),
        Peak::Infinite { count } => {
            let log_share = -T::of_usize(count).ln();
            for xi in x.iter_mut() {
                *xi = if *xi == T::INFINITY {
                    log_share
                } else {
                    T::NEG_INFINITY
                };
            }
        }
        Peak::Finite(max) => {
            // (x_i − max) − ln Σ exp(x_j − max): subtracting the large max first keeps the
            // small differences exact, and ln_1p keeps the log-probability of a nearly
            // certain entry (−ln_1p(rest) ≈ −rest) relatively accurate.
            let log_sum = shifted_rest(x, max).ln_1p();
            for xi in x.iter_mut() {
                *xi = (*xi - max) - log_sum;
            }
        }
    }
}

/// Log-softmax: `log_softmax(x)_i = x_i − lse(x)`, the logarithm of [`softmax`] computed
/// without ever forming a probability, so it stays finite where softmax underflows to 0.
///
/// Empty in, empty out; all `-inf` in, all `-inf` out (ln 0).
///
/// Accuracy: `(x_i − max) − ln_1p(Σ_{j ≠ k} exp(x_j − max))` (k the first maximum) has an
/// absolute error of at most about `(|x_i − max| + ln m + m) · ε`, and the entry at the
/// maximum of a nearly one-hot row (`≈ −Σ_{j≠k} p_j`) keeps a relative error of a few ε;
/// nothing underflows, however negative the result.
///
/// # Examples
///
/// ```
/// use attention_math::log_softmax;
///
/// let lp = log_softmax(&[0.0_f64, -1000.0]);
/// assert_eq!(lp[0], 0.0);
/// assert_eq!(lp[1], -1000.0); // softmax would give exactly 0 here
/// ```
pub fn log_softmax<T: Float>(x: &[T]) -> Vec<T> {
    let mut out = x.to_vec();
    log_softmax_in_place(&mut out);
    out
}

/// Softmax at temperature `t`: `softmax(x / t)`.
///
/// `t < 1` sharpens the distribution, `t > 1` flattens it; `t = 1` is [`softmax`].
///
/// The temperature is applied to the shifted logits, `(x_i − max) / t`, never to `x_i`
/// alone: `x_i / t` overflows for a small `t` (in f32, `[1, 2] / 1e-40` is `[inf, inf]`, which
/// would give `[0.5, 0.5]` instead of `[0, 1]`). If `x_i − max` itself overflows (logits of
/// opposite signs near the type's maximum), it is computed as `x_i / t − max / t`, which is
/// then finite or correctly `-inf`. Edge cases (`-inf`, `+inf`, NaN, empty) are those of
/// [`softmax`], which `x / t` leaves unchanged.
///
/// Accuracy: as [`softmax`] on the logits `x / t`, with one more rounding per shifted logit:
/// relative error at most about `(|x_i − max| / t + m + 3) · ε` per weight.
///
/// # Errors
///
/// [`Error::InvalidParameter`](crate::Error::InvalidParameter) unless `t` is finite and > 0.
///
/// # Examples
///
/// ```
/// use attention_math::{softmax, softmax_with_temperature};
///
/// let x = [1.0_f64, 2.0, 3.0];
/// let hot = softmax_with_temperature(&x, 2.0).unwrap();
/// let direct = softmax(&[0.5, 1.0, 1.5]);
/// for (a, b) in hot.iter().zip(&direct) {
///     assert!((a - b).abs() < 1e-15);
/// }
/// assert!(softmax_with_temperature(&x, 0.0).is_err());
/// // A tiny temperature is the argmax, not an overflow.
/// assert_eq!(softmax_with_temperature(&[1.0_f32, 2.0], 1e-40)?, vec![0.0, 1.0]);
/// // A huge one flattens logits whose difference overflows.
/// let flat = softmax_with_temperature(&[-3e38_f32, 3e38], 3e38)?;
/// assert!((flat[0] - 1.0 / (1.0 + 2.0_f32.exp())).abs() < 1e-6);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn softmax_with_temperature<T: Float>(x: &[T], t: T) -> Result<Vec<T>> {
    check_positive("temperature", t)?;
    let mut out = x.to_vec();
    if let Peak::Finite(max) = peak(x) {
        for xi in out.iter_mut() {
            let shifted = *xi - max;
            *xi = if shifted == T::NEG_INFINITY && xi.is_finite() {
                // x_i < 0 < max here, so neither quotient is NaN.
                *xi / t - max / t
            } else {
                shifted / t
            };
        }
    }
    softmax_in_place(&mut out);
    Ok(out)
}

/// The rows of `x` (n x m), each contiguous: row `i` is `out[i·m .. (i+1)·m]`.
///
/// nalgebra stores columns contiguously, and reading a row element by element strides
/// through memory (at a power-of-two stride, through the same few cache sets), so the matrix
/// is transposed once with a cache-blocked transpose instead.
fn rows_contiguous<T: Float>(x: DMatrixView<'_, T>) -> Vec<T> {
    let (n, m) = x.shape();
    let columns = x.clone_owned();
    let mut rows = vec![T::zero(); n * m];
    if n * m > 0 {
        transpose::transpose(columns.as_slice(), &mut rows, n, m);
    }
    rows
}

/// Calls `f` on each of the `n` rows of length `m` laid out by [`rows_contiguous`].
fn for_each_row<T: Float>(rows: &mut [T], n: usize, m: usize, mut f: impl FnMut(&mut [T])) {
    for i in 0..n {
        f(&mut rows[i * m..(i + 1) * m]);
    }
}

/// Applies a slice operation to every row of a matrix.
pub(crate) fn map_rows_in_place<T: Float>(x: &mut DMatrix<T>, f: impl FnMut(&mut [T])) {
    let (n, m) = x.shape();
    let mut rows = rows_contiguous(x.as_view());
    for_each_row(&mut rows, n, m, f);
    if n * m > 0 {
        transpose::transpose(&rows, x.as_mut_slice(), m, n);
    }
}

/// `f` of every row of `x` (n x m) as a contiguous slice: a vector of length n.
pub(crate) fn reduce_rows<T: Float>(
    x: DMatrixView<'_, T>,
    mut f: impl FnMut(&[T]) -> T,
) -> DVector<T> {
    let (n, m) = x.shape();
    let mut rows = rows_contiguous(x);
    let mut out = Vec::with_capacity(n);
    for_each_row(&mut rows, n, m, |row| out.push(f(row)));
    DVector::from_vec(out)
}

/// Row-wise softmax of an n x m matrix: row `i` of the result is `softmax(x.row(i))`.
///
/// Rows are the convention throughout the crate (a row of scores belongs to one query).
/// An n x 0 input gives an n x 0 output.
///
/// # Examples
///
/// ```
/// use attention_math::softmax_rows;
/// use nalgebra::dmatrix;
///
/// let s = dmatrix![0.0_f64, 0.0; 0.0, f64::NEG_INFINITY];
/// let p = softmax_rows(&s);
/// assert_eq!(p, dmatrix![0.5, 0.5; 1.0, 0.0]);
/// ```
pub fn softmax_rows<'a, T: Float>(x: impl Into<DMatrixView<'a, T>>) -> DMatrix<T> {
    let mut out = x.into().into_owned();
    map_rows_in_place(&mut out, softmax_in_place);
    out
}

/// Row-wise log-softmax of an n x m matrix.
///
/// # Examples
///
/// ```
/// use attention_math::log_softmax_rows;
/// use nalgebra::dmatrix;
///
/// let lp = log_softmax_rows(&dmatrix![1.0_f64, 1.0]);
/// assert_eq!(lp, dmatrix![-(2.0_f64.ln()), -(2.0_f64.ln())]);
/// ```
pub fn log_softmax_rows<'a, T: Float>(x: impl Into<DMatrixView<'a, T>>) -> DMatrix<T> {
    let mut out = x.into().into_owned();
    map_rows_in_place(&mut out, log_softmax_in_place);
    out
}

/// Row-wise log-sum-exp: a vector of length n with `lse(x.row(i))`.
///
/// # Examples
///
/// ```
/// use attention_math::logsumexp_rows;
/// use nalgebra::dmatrix;
///
/// let lse = logsumexp_rows(&dmatrix![0.0_f64, 0.0; f64::NEG_INFINITY, f64::NEG_INFINITY]);
/// assert_eq!(lse[0], 2.0_f64.ln());
/// assert_eq!(lse[1], f64::NEG_INFINITY);
/// ```
pub fn logsumexp_rows<'a, T: Float>(x: impl Into<DMatrixView<'a, T>>) -> DVector<T> {
    reduce_rows(x.into(), logsumexp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_of_log_is_normalised_input() {
        let x = [0.5_f64, 1.5, 3.0, 5.0];
        let total: f64 = x.iter().sum();
        let p = softmax(&x.map(f64::ln));
        for (pi, xi) in p.iter().zip(x) {
            assert!((pi - xi / total).abs() < 1e-15);
        }
    }

    #[test]
    fn edge_cases_follow_the_table() {
        let ninf = f64::NEG_INFINITY;
        assert!(softmax::<f64>(&[]).is_empty());
        assert_eq!(logsumexp::<f64>(&[]), ninf);
        assert_eq!(softmax(&[ninf, ninf]), vec![0.0, 0.0]);
        assert_eq!(log_softmax(&[ninf, ninf]), vec![ninf, ninf]);
        assert_eq!(logsumexp(&[ninf, ninf]), ninf);
        let inf = f64::INFINITY;
        assert_eq!(softmax(&[inf, 0.0, inf]), vec![0.5, 0.0, 0.5]);
        assert_eq!(log_softmax(&[inf, 0.0]), vec![0.0, ninf]);
        assert_eq!(logsumexp(&[inf, 0.0]), inf);
        assert!(softmax(&[f64::NAN, 0.0]).iter().all(|p| p.is_nan()));
        assert!(logsumexp(&[0.0, f64::NAN]).is_nan());
        assert_eq!(softmax(&[1e30_f64, 1e30]), vec![0.5, 0.5]);
        assert_eq!(softmax(&[-1e30_f32, 0.0]), vec![0.0, 1.0]);
        assert_eq!(logsumexp(&[-1e30_f32]), -1e30);
    }

    #[test]
    fn log_softmax_keeps_precision_where_softmax_underflows() {
        let lp = log_softmax(&[0.0_f32, -200.0]);
        assert_eq!(lp, vec![0.0, -200.0]);
        assert_eq!(softmax(&[0.0_f32, -200.0])[1], 0.0);
    }

    #[test]
    fn temperature_is_applied_after_the_shift() {
        // Before: x / t overflowed to [inf, inf] in f32 and gave [0.5, 0.5].
        assert_eq!(
            softmax_with_temperature(&[1.0_f32, 2.0], 1e-40).unwrap(),
            vec![0.0, 1.0]
        );
        assert_eq!(
            softmax_with_temperature(&[1.0_f64, 2.0], 1e-300).unwrap(),
            vec![0.0, 1.0]
        );
        // The difference overflows, the quotient does not: softmax([-1, 1]) = (σ(-2), σ(2)).
        let p = softmax_with_temperature(&[-3e38_f32, 3e38], 3e38).unwrap();
        let want = 1.0 / (1.0 + 2.0_f64.exp());
        assert!((p[0] as f64 - want).abs() < 1e-6 && (p[1] as f64 - (1.0 - want)).abs() < 1e-6);
        let ninf = f64::NEG_INFINITY;
        assert_eq!(
            softmax_with_temperature(&[ninf, 0.0, ninf], 1e-300).unwrap(),
            vec![0.0, 1.0, 0.0]
        );
        assert_eq!(
            softmax_with_temperature(&[f64::INFINITY, 0.0], 5.0).unwrap(),
            vec![1.0, 0.0]
        );
        assert!(
            softmax_with_temperature(&[f64::NAN, 0.0], 5.0)
                .unwrap()
                .iter()
                .all(|p| p.is_nan())
        );
    }

    #[test]
    fn rows_of_empty_shapes() {
        let wide = DMatrix::<f32>::zeros(3, 0);
        assert_eq!(softmax_rows(&wide).shape(), (3, 0));
        assert_eq!(logsumexp_rows(&wide).as_slice(), &[f32::NEG_INFINITY; 3]);
        let tall = DMatrix::<f64>::zeros(0, 4);
        assert_eq!(log_softmax_rows(&tall).shape(), (0, 4));
        assert_eq!(logsumexp_rows(&tall).len(), 0);
    }

    #[test]
    fn rows_match_slices() {
        let m = DMatrix::from_fn(3, 5, |i, j| (i as f64 - 2.0 * j as f64).sin() * 3.0);
        let p = softmax_rows(&m);
        let lp = log_softmax_rows(&m);
        let lse = logsumexp_rows(&m);
        for i in 0..3 {
            let row: Vec<f64> = m.row(i).iter().copied().collect();
            assert_eq!(p.row(i).iter().copied().collect::<Vec<_>>(), softmax(&row));
            assert_eq!(
                lp.row(i).iter().copied().collect::<Vec<_>>(),
                log_softmax(&row)
            );
            assert_eq!(lse[i], logsumexp(&row));
        }
    }
}
