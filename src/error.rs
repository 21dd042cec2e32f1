//! The crate's one error type.

use crate::prelude::*;
use core::fmt;

/// Which dimension of a matrix an error message talks about.
///
/// # Examples
///
/// ```
/// use attention_math::{scaled_attention, Axis, Error, Mask};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f32>::zeros(2, 4);
/// let v = DMatrix::<f32>::zeros(3, 1);
/// let err = scaled_attention(&q, &q, &v, &Mask::none()).unwrap_err();
/// assert!(matches!(err, Error::DimensionMismatch { axis: Axis::Rows, .. }));
/// assert_eq!(Axis::Cols.to_string(), "columns");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// The number of rows (tokens, for Q, K and V).
    Rows,
    /// The number of columns (features).
    Cols,
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Axis::Rows => "rows",
            Axis::Cols => "columns",
        })
    }
}

/// Everything that can go wrong at the crate's boundary.
///
/// Each variant names the argument at fault and, where it applies, the shapes involved, so
/// that the message alone says what to fix. Bad input is always reported as an `Err`, never
/// as a panic.
///
/// # Examples
///
/// ```
/// use attention_math::{scaled_attention, Error, Mask};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::zeros(3, 8);
/// let k = DMatrix::<f64>::zeros(4, 7);
/// let v = DMatrix::<f64>::zeros(4, 2);
/// let err = scaled_attention(&q, &k, &v, &Mask::none()).unwrap_err();
/// assert!(matches!(err, Error::DimensionMismatch { .. }));
/// assert_eq!(err.to_string(), "k has 7 columns but q has 8");
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// One dimension of `arg` disagrees with a dimension of `other`
    /// (for example, K must have as many columns as Q).
    DimensionMismatch {
        /// The argument at fault.
        arg: &'static str,
        /// Which of its dimensions.
        axis: Axis,
        /// Its size along that dimension.
        found: usize,
        /// The argument it must agree with.
        other: &'static str,
        /// Which dimension of `other`.
        other_axis: Axis,
        /// The size it must have.
        expected: usize,
    },
    /// A matrix argument has the wrong shape altogether (for example an additive bias that
    /// is not n x m).
    ShapeMismatch {
        /// The argument at fault.
        arg: &'static str,
        /// Its shape, (rows, columns).
        found: (usize, usize),
        /// The shape it must have.
        expected: (usize, usize),
    },
    /// A slice argument has the wrong length.
    LengthMismatch {
        /// The argument at fault.
        arg: &'static str,
        /// Its length.
        found: usize,
        /// The length it must have.
        expected: usize,
    },
    /// An input holds NaN or an infinity where only finite values make sense.
    NonFinite {
        /// The argument at fault.
        arg: &'static str,
        /// Row of the first offending entry (0 for slices).
        row: usize,
        /// Column of the first offending entry (the index, for slices).
        col: usize,
    },
    /// A scalar parameter is outside its domain (a softcap or temperature <= 0, a NaN scale).
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// The value given, as `f64`.
        value: f64,
        /// What the parameter must satisfy, e.g. `"must be finite and > 0"`.
        requirement: &'static str,
    },
    /// An index argument is out of range (for example a target token id >= the vocabulary size).
    IndexOutOfRange {
        /// The argument at fault.
        arg: &'static str,
        /// Position of the offending entry within the argument.
        position: usize,
        /// The offending index.
        index: usize,
        /// The exclusive upper bound it must respect.
        bound: usize,
    },
    /// A matrix's columns do not split evenly into attention heads.
    HeadSplit {
        /// The argument at fault (`"q"`, `"k"` or `"v"`).
        arg: &'static str,
        /// How many columns it has.
        len: usize,
        /// Into how many heads it must split.
        heads: usize,
    },
    /// A matrix's columns do not split evenly into heads of a given width (the number of
    /// heads being whatever the columns give, as in [`Rope::apply`](crate::Rope::apply)).
    HeadWidth {
        /// The argument at fault.
        arg: &'static str,
        /// How many columns it has.
        len: usize,
        /// The width of one head.
        width: usize,
    },
    /// A reduction has nothing to reduce over (for example a mean loss with no scored position).
    Empty {
        /// What was empty.
        what: &'static str,
    },
    /// A buffer sized by the caller cannot be allocated: its number of entries overflows
    /// `usize`, its size in bytes exceeds `isize::MAX` (Rust's limit for one allocation), or
    /// the allocator refused it. Nothing was allocated or computed.
    TooLarge {
        /// What was to be allocated, naming the arguments that size it
        /// (for example `"the n x m dense mask"`).
        what: &'static str,
        /// Its shape, (rows, columns); a vector has one column.
        shape: (usize, usize),
    },
    /// The saved forward result given to a backward pass does not come from a forward call
    /// with this call's mask, options, Q and K: the weights of row `row` of head `head`,
    /// recomputed from the saved log-sum-exp, sum to `sum` instead of 1 (beyond every
    /// rounding the two passes can differ by). Nothing is returned rather than gradients of
    /// another function.
    ForwardMismatch {
        /// The query head (0 for a single-head call).
        head: usize,
        /// The query row.
        row: usize,
        /// What its recomputed weights sum to.
        sum: f64,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::DimensionMismatch {
                arg,
                axis,
                found,
                other,
                other_axis,
                expected,
            } => write!(
                f,
                "{arg} has {found} {axis} but {other} has {expected}{}",
                if axis == other_axis {
                    String::new()
                } else {
                    format!(" {other_axis}")
                }
            ),
            Error::ShapeMismatch {
                arg,
                found,
                expected,
            } => write!(
                f,
                "{arg} is {} x {} but must be {} x {}",
                found.0, found.1, expected.0, expected.1
            ),
            Error::LengthMismatch {
                arg,
                found,
                expected,
            } => write!(
                f,
                "{arg} has length {found} but must have length {expected}"
            ),
            Error::NonFinite { arg, row, col } => {
                write!(f, "{arg} has a non-finite entry at ({row}, {col})")
            }
            Error::InvalidParameter {
                name,
                value,
                requirement,
            } => write!(f, "{name} = {value} is invalid: it {requirement}"),
            Error::IndexOutOfRange {
                arg,
                position,
                index,
                bound,
            } => write!(
                f,
                "{arg}[{position}] = {index} is out of range: it must be < {bound}"
            ),
            Error::HeadSplit { arg, len, heads } => write!(
                f,
                "{arg} has {len} columns, which do not split evenly into {heads} heads"
            ),
            Error::HeadWidth { arg, len, width } => write!(
                f,
                "{arg} has {len} columns, which do not split into heads of width {width}"
            ),
            Error::Empty { what } => write!(f, "{what} is empty"),
            Error::TooLarge { what, shape } => write!(
                f,
                "{what} ({} x {} entries) is too large to allocate",
                shape.0, shape.1
            ),
            Error::ForwardMismatch { head, row, sum } => write!(
                f,
                "forward does not match this call: the weights of head {head}, row {row}, \
                 recomputed from forward.lse, sum to {sum} instead of 1 (was the forward run \
                 with another mask, options, Q or K?)"
            ),
        }
    }
}

impl core::error::Error for Error {}

/// Shorthand for `std::result::Result<T, attention_math::Error>`.
///
/// # Examples
///
/// ```
/// fn normalised(x: &[f64]) -> attention_math::Result<Vec<f64>> {
///     attention_math::softmax_with_temperature(x, 1.0)
/// }
/// assert_eq!(normalised(&[0.0, 0.0])?, vec![0.5, 0.5]);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub type Result<T> = core::result::Result<T, Error>;

/// The number of entries of a `rows x cols` buffer of `T`, checked: an [`Error::TooLarge`]
/// naming `what` if `rows · cols` overflows `usize` or `rows · cols · size_of::<T>()` exceeds
/// `isize::MAX` bytes (the most one Rust allocation may hold).
///
/// Every buffer whose size comes from the caller goes through this (or through [`try_vec`]
/// and [`try_matrix`], which use it), so a size never wraps and never reaches nalgebra or
/// `Vec` as a "capacity overflow" panic.
pub(crate) fn checked_len<T>(what: &'static str, rows: usize, cols: usize) -> Result<usize> {
    let too_large = || Error::TooLarge {
        what,
        shape: (rows, cols),
    };
    let len = rows.checked_mul(cols).ok_or_else(too_large)?;
    match len.checked_mul(core::mem::size_of::<T>()) {
        Some(bytes) if bytes <= isize::MAX as usize => Ok(len),
        _ => Err(too_large()),
    }
}

/// A vector of `rows · cols` copies of `value`, allocated fallibly: [`Error::TooLarge`] if the
/// size is not representable (see [`checked_len`]) or the allocator refuses it, instead of a
/// panic or an abort.
pub(crate) fn try_vec<T: Clone>(
    what: &'static str,
    rows: usize,
    cols: usize,
    value: T,
) -> Result<Vec<T>> {
    let mut v = try_with_capacity(what, rows, cols)?;
    v.resize(rows * cols, value); // checked by try_with_capacity
    Ok(v)
}

/// An empty vector with room for `rows · cols` entries, allocated fallibly as [`try_vec`].
pub(crate) fn try_with_capacity<T>(what: &'static str, rows: usize, cols: usize) -> Result<Vec<T>> {
    let len = checked_len::<T>(what, rows, cols)?;
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::TooLarge {
        what,
        shape: (rows, cols),
    })?;
    Ok(v)
}

/// A `rows x cols` matrix with entry `(i, j) = f(i, j)`, allocated through [`try_vec`].
pub(crate) fn try_matrix<T: nalgebra::Scalar>(
    what: &'static str,
    rows: usize,
    cols: usize,
    mut f: impl FnMut(usize, usize) -> T,
) -> Result<nalgebra::DMatrix<T>> {
    let mut v = try_with_capacity(what, rows, cols)?;
    let len = rows * cols; // checked by try_with_capacity
    // Column-major, nalgebra's storage order. (An empty matrix may still have 2^64 − 1
    // columns: do not loop over them.)
    for j in (0..cols).take(if len == 0 { 0 } else { cols }) {
        for i in 0..rows {
            v.push(f(i, j));
        }
    }
    Ok(nalgebra::DMatrix::from_vec(rows, cols, v))
}

/// Checks that a scalar parameter is finite and strictly positive.
pub(crate) fn check_positive<T: crate::Float>(name: &'static str, value: T) -> Result<()> {
    if value.is_finite() && value > T::zero() {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            name,
            value: value.as_f64(),
            requirement: "must be finite and > 0",
        })
    }
}

/// Checks that every entry of a matrix is finite; the error names the first offending entry
/// in column-major order (nalgebra's storage order).
pub(crate) fn check_finite<T: crate::Float>(
    arg: &'static str,
    x: &nalgebra::DMatrixView<'_, T>,
) -> Result<()> {
    if x.nrows() == 0 {
        // No entries, however many columns (a 0 x 2^40 view must not loop 2^40 times).
        return Ok(());
    }
    let isa = crate::simd::Isa::get();
    let rows = x.nrows();
    // A run of consecutive entries starting at column `col0`: the vectorised scan first, the
    // position (column-major, so row `at % rows` of column `col0 + at / rows`) only on the rare
    // failure.
    let scan = |run: &[T], col0: usize| {
        if crate::simd::all_finite(isa, run) {
            return Ok(());
        }
        match run.iter().position(|v| !v.is_finite()) {
            Some(at) => Err(Error::NonFinite {
                arg,
                row: at % rows,
                col: col0 + at / rows,
            }),
            None => Ok(()),
        }
    };
    if x.strides().1 == rows || x.ncols() == 1 {
        // One run of memory (an owned matrix, or a block of whole columns): one scan.
        // SAFETY: with unit row stride and column stride `rows` (or a single column), the
        // view's entries are exactly the `rows · ncols` consecutive elements from its first
        // one, all borrowed by the view for the duration of this function.
        let all = unsafe { core::slice::from_raw_parts(x.as_ptr(), rows * x.ncols()) };
        return scan(all, 0);
    }
    for j in 0..x.ncols() {
        scan(x.column(j).as_slice(), j)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view with no rows and 2^40 columns holds nothing: checked at once, not column by
    /// column (it would run for hours; found by the RLHF tests' empty inputs).
    #[test]
    fn empty_views_with_huge_column_counts_are_checked_at_once() {
        let data: [f64; 0] = [];
        let x = nalgebra::DMatrixView::from_slice_with_strides_generic(
            &data,
            nalgebra::Dyn(0),
            nalgebra::Dyn(1 << 40),
            nalgebra::U1,
            nalgebra::Dyn(0),
        );
        assert!(check_finite("x", &x).is_ok());
    }

    /// The whole-matrix scan and the column-by-column one report the same first non-finite
    /// entry (column-major order), for owned matrices, blocks of whole columns and strided
    /// views.
    #[test]
    fn the_first_non_finite_entry_whatever_the_layout() {
        let mut x = nalgebra::DMatrix::<f32>::from_fn(37, 9, |i, j| (i * 9 + j) as f32);
        assert!(check_finite("x", &x.as_view()).is_ok());
        x[(30, 4)] = f32::INFINITY;
        x[(2, 6)] = f32::NAN;
        x[(36, 8)] = f32::NEG_INFINITY;
        let at = |r: Result<()>| match r {
            Err(Error::NonFinite { row, col, .. }) => Some((row, col)),
            _ => None,
        };
        assert_eq!(at(check_finite("x", &x.as_view())), Some((30, 4)));
        assert_eq!(at(check_finite("x", &x.columns(5, 4))), Some((2, 1)));
        assert_eq!(at(check_finite("x", &x.columns(7, 2))), Some((36, 1)));
        assert_eq!(at(check_finite("x", &x.rows(3, 34))), Some((27, 4)));
        assert_eq!(
            at(check_finite("x", &x.view((0, 0), (30, 9)))),
            Some((2, 6))
        );
        assert_eq!(at(check_finite("x", &x.columns(4, 1))), Some((30, 0)));
        assert!(check_finite("x", &x.view((0, 0), (30, 6))).is_ok());
    }

    #[test]
    fn messages_name_argument_and_shapes() {
        let e = Error::DimensionMismatch {
            arg: "v",
            axis: Axis::Rows,
            found: 5,
            other: "k",
            other_axis: Axis::Rows,
            expected: 4,
        };
        assert_eq!(e.to_string(), "v has 5 rows but k has 4");
        let e = Error::DimensionMismatch {
            arg: "weights",
            axis: Axis::Cols,
            found: 5,
            other: "v",
            other_axis: Axis::Rows,
            expected: 4,
        };
        assert_eq!(e.to_string(), "weights has 5 columns but v has 4 rows");
        let e = Error::ShapeMismatch {
            arg: "bias",
            found: (2, 3),
            expected: (2, 4),
        };
        assert_eq!(e.to_string(), "bias is 2 x 3 but must be 2 x 4");
        let e = Error::InvalidParameter {
            name: "softcap",
            value: -1.0,
            requirement: "must be finite and > 0",
        };
        assert_eq!(
            e.to_string(),
            "softcap = -1 is invalid: it must be finite and > 0"
        );
    }

    #[test]
    fn sizes_are_checked_never_wrapped() {
        // 2^32 x 2^32 wraps to 0 in usize arithmetic.
        let e = checked_len::<bool>("the n x m dense mask", 1 << 32, 1 << 32).unwrap_err();
        assert_eq!(
            e,
            Error::TooLarge {
                what: "the n x m dense mask",
                shape: (1 << 32, 1 << 32)
            }
        );
        assert_eq!(
            e.to_string(),
            "the n x m dense mask (4294967296 x 4294967296 entries) is too large to allocate"
        );
        // Fits in usize but not in isize::MAX bytes.
        assert!(checked_len::<f32>("x", 1 << 33, 1 << 29).is_err());
        assert!(checked_len::<u8>("x", 1 << 33, 1 << 29).is_ok());
        assert_eq!(checked_len::<f64>("x", 3, 4), Ok(12));
        assert_eq!(checked_len::<f64>("x", usize::MAX, 0), Ok(0));
        // 2^62 entries of 8 bytes: an Err before any allocation is attempted.
        assert!(matches!(
            try_vec("x", 1 << 31, 1 << 31, 0.0_f64),
            Err(Error::TooLarge { .. })
        ));
        assert_eq!(try_vec("x", 2, 3, 1u8).unwrap(), vec![1; 6]);
        let m = try_matrix("x", 2, 3, |i, j| 10 * i + j).unwrap();
        assert_eq!(m, nalgebra::dmatrix![0, 1, 2; 10, 11, 12]);
    }

    #[test]
    fn check_positive_rejects_zero_negative_nan_inf() {
        assert!(check_positive("t", 1.0_f64).is_ok());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(check_positive("t", bad).is_err());
        }
    }
}
