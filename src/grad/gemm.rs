//! A small safe front to `matrixmultiply`'s strided `sgemm` / `dgemm` for the block products of
//! the tiled backward pass.
//!
//! Operands are strided: element `(r, c)` of an operand lives at `r · rs + c · cs` from its
//! start, so a transpose is a swap of the strides and a block of a matrix is an offset. Every
//! operand is built either from a nalgebra view (which guarantees its memory for its shape and
//! strides) or from a slice whose extent is checked, so the one `unsafe` call below never
//! reads or writes outside borrowed memory.

use crate::Float;
use nalgebra::DMatrixView;
use std::any::TypeId;
use std::marker::PhantomData;

/// The offset of the last element of a `rows x cols` operand with strides `rs`, `cs`, plus 1:
/// the number of elements a slice must hold (0 for an empty operand).
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// A read-only strided matrix operand borrowed for `'a`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    ptr: *const T,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
    _borrow: PhantomData<&'a [T]>,
}

impl<'a, T: Float> Mat<'a, T> {
    /// The whole of a nalgebra view.
    pub(crate) fn view(v: &DMatrixView<'a, T>) -> Self {
        let (rs, cs) = v.strides();
        Mat {
            ptr: v.as_ptr(),
            rows: v.nrows(),
            cols: v.ncols(),
            rs,
            cs,
            _borrow: PhantomData,
        }
    }

    /// A `rows x cols` operand over `data` with strides `rs`, `cs`.
    ///
    /// Panics if `data` is too short: that is a bug in the caller, never a user error.
    pub(crate) fn slice(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            extent(rows, cols, rs, cs) <= data.len(),
            "operand out of bounds"
        );
        Mat {
            ptr: data.as_ptr(),
            rows,
            cols,
            rs,
            cs,
            _borrow: PhantomData,
        }
    }

    /// The transpose: the same memory with the strides swapped.
    pub(crate) fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// A writable strided matrix operand borrowed for `'a`.
pub(crate) struct MatMut<'a, T> {
    ptr: *mut T,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

impl<'a, T: Float> MatMut<'a, T> {
    /// A `rows x cols` operand over `data` with strides `rs`, `cs`; the strides must not make
    /// two elements alias (callers pass column-major or row-major layouts).
    ///
    /// Panics if `data` is too short: that is a bug in the caller, never a user error.
    pub(crate) fn slice(data: &'a mut [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            extent(rows, cols, rs, cs) <= data.len(),
            "operand out of bounds"
        );
        MatMut {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            rs,
            cs,
            _borrow: PhantomData,
        }
    }
}

/// `C ← α A B + β C`, with `β = 0` overwriting C whatever it held.
///
/// Panics if the inner or outer dimensions disagree (a bug in the caller).
pub(crate) fn gemm<T: Float>(alpha: T, a: Mat<'_, T>, b: Mat<'_, T>, beta: T, c: MatMut<'_, T>) {
    assert!(
        a.cols == b.rows && a.rows == c.rows && b.cols == c.cols,
        "gemm: inner or outer dimensions disagree"
    );
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let s = |x: usize| x as isize;
    // SAFETY: every operand covers memory borrowed for its shape and strides (checked in
    // `Mat::slice` / `MatMut::slice`, guaranteed by nalgebra in `Mat::view`); C is borrowed
    // mutably and cannot overlap A or B. The pointer casts are to T itself, checked by TypeId.
    unsafe {
        if TypeId::of::<T>() == TypeId::of::<f32>() {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                alpha.as_f64() as f32,
                a.ptr as *const f32,
                s(a.rs),
                s(a.cs),
                b.ptr as *const f32,
                s(b.rs),
                s(b.cs),
                beta.as_f64() as f32,
                c.ptr as *mut f32,
                s(c.rs),
                s(c.cs),
            );
        } else if TypeId::of::<T>() == TypeId::of::<f64>() {
            matrixmultiply::dgemm(
                m,
                k,
                n,
                alpha.as_f64(),
                a.ptr as *const f64,
                s(a.rs),
                s(a.cs),
                b.ptr as *const f64,
                s(b.rs),
                s(b.cs),
                beta.as_f64(),
                c.ptr as *mut f64,
                s(c.rs),
                s(c.cs),
            );
        } else {
            unreachable!("Float is sealed: only f32 and f64 implement it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::DMatrix;

    #[test]
    fn strided_products_match_nalgebra() {
        let a = DMatrix::<f64>::from_fn(5, 3, |i, j| (i as f64 - 2.0 * j as f64).sin());
        let b = DMatrix::<f64>::from_fn(4, 3, |i, j| (i as f64 + j as f64).cos());
        // C = A Bᵀ (5 x 4), written row-major into a buffer.
        let mut c = vec![f64::NAN; 20];
        gemm(
            2.0,
            Mat::view(&a.as_view()),
            Mat::view(&b.as_view()).t(),
            0.0,
            MatMut::slice(&mut c, 5, 4, 4, 1),
        );
        let expect = (&a * b.transpose()) * 2.0;
        for i in 0..5 {
            for j in 0..4 {
                assert!((c[i * 4 + j] - expect[(i, j)]).abs() < 1e-14);
            }
        }
        // Accumulate with β = 1, in f32, through a view of a block.
        let a32 = a.map(|x| x as f32);
        let block = a32.rows(1, 3);
        let mut acc = vec![1.0_f32; 9];
        gemm(
            1.0,
            Mat::view(&block),
            Mat::view(&block).t(),
            1.0,
            MatMut::slice(&mut acc, 3, 3, 1, 3),
        );
        let expect = block * block.transpose();
        for i in 0..3 {
            for j in 0..3 {
                assert!((acc[i + 3 * j] - 1.0 - expect[(i, j)]).abs() < 1e-5);
            }
        }
        // k = 0: C = β C.
        let empty = DMatrix::<f32>::zeros(2, 0);
        let mut z = vec![7.0_f32; 4];
        gemm(
            1.0,
            Mat::view(&empty.as_view()),
            Mat::view(&empty.as_view()).t(),
            0.0,
            MatMut::slice(&mut z, 2, 2, 1, 2),
        );
        assert_eq!(z, vec![0.0; 4]);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn short_slices_are_caught() {
        let data = [0.0_f64; 5];
        let _ = Mat::slice(&data, 2, 3, 1, 2);
    }
}
