//! Packing: nalgebra's column-major views copied once into the row-major layouts the
//! micro-kernel streams (see [`microkernel`](super::microkernel)).
//!
//! ```text
//! rows(X, f, pad)           X (r x c)  →  r_pad x c row-major, times f, zero rows r..r_pad
//! panels_of_transpose(K)    K (m x d)  →  Kᵀ (d x m) in panels of NR keys:
//!                                         panel p, row t, lane j  =  K[p·NR + j, t]
//! panels(V, pad)            V (m x e)  →  V in panels of NR columns, pad rows each:
//!                                         panel p, row j, lane c  =  V[j, p·NR + c]
//! ```
//!
//! Every buffer is zero-padded (rows to a multiple of MR, keys and columns to a multiple of
//! NR), so the micro-kernel never needs an edge case: padded keys are masked with `−inf`
//! before the softmax, padded value columns and query rows are dropped at the end.

use crate::Float;
use crate::prelude::*;
use nalgebra::DMatrixView;

/// `x` rounded up to a multiple of `to` (`to > 0`).
pub(crate) fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// Column `c` of `x` as a slice of its `nrows` elements, borrowed for the view's lifetime.
#[inline(always)]
pub(crate) fn column<'a, E: nalgebra::Scalar>(x: &DMatrixView<'a, E>, c: usize) -> &'a [E] {
    assert!(c < x.ncols());
    // SAFETY: a `DMatrixView` has unit row stride, so column c < ncols is the `nrows`
    // consecutive elements starting `c · column stride` after the view's first element, all
    // borrowed for 'a.
    unsafe { core::slice::from_raw_parts(x.as_ptr().add(c * x.strides().1), x.nrows()) }
}

/// X (r x c) as a row-major `rows_pad x c` buffer, `factor` applied to every entry;
/// rows `r..rows_pad` are zero.
pub(crate) fn rows<T: Float>(
    x: &DMatrixView<'_, T>,
    factor: impl Fn(T) -> T,
    rows_pad: usize,
) -> Vec<T> {
    let (r, c) = x.shape();
    debug_assert!(rows_pad >= r);
    let mut out = vec![T::zero(); rows_pad * c];
    transpose_into(x, 0..c, &mut out, c, factor);
    out
}

/// `out[i·stride + (t − cols.start)] = factor(x[(i, t)])` for every row i of `x` and column
/// t of `cols`: column-major to row-major, eight columns at a time, so that each output row
/// gets a run of adjacent entries from eight sequential column streams.
fn transpose_into<T: Float>(
    x: &DMatrixView<'_, T>,
    cols: core::ops::Range<usize>,
    out: &mut [T],
    stride: usize,
    factor: impl Fn(T) -> T,
) {
    const W: usize = 8;
    let r = x.nrows();
    for t0 in cols.clone().step_by(W) {
        let w = (cols.end - t0).min(W);
        let columns: [&[T]; W] =
            core::array::from_fn(|u| if u < w { column(x, t0 + u) } else { &[] });
        let at = t0 - cols.start;
        for (i, row) in out.chunks_mut(stride).take(r).enumerate() {
            for (o, col) in row[at..at + w].iter_mut().zip(&columns) {
                *o = factor(col[i]);
            }
        }
    }
}

/// Kᵀ for K (m x d), in `⌈m / nr⌉` panels of `d x nr` (panel stride `d·nr`); keys past m
/// are zero.
pub(crate) fn panels_of_transpose<T: Float>(k: &DMatrixView<'_, T>, nr: usize) -> Vec<T> {
    let (m, d) = k.shape();
    let mut out = vec![T::zero(); round_up(m, nr) * d];
    for t in 0..d {
        for (p, keys) in column(k, t).chunks(nr).enumerate() {
            let at = p * d * nr + t * nr;
            out[at..at + keys.len()].copy_from_slice(keys);
        }
    }
    out
}

/// V (m x e) in `⌈e / nr⌉` panels of `rows_pad x nr` (panel stride `rows_pad·nr`); rows past
/// m and columns past e are zero.
pub(crate) fn panels<T: Float>(v: &DMatrixView<'_, T>, nr: usize, rows_pad: usize) -> Vec<T> {
    let e = v.ncols();
    debug_assert!(rows_pad >= v.nrows());
    let mut out = vec![T::zero(); round_up(e, nr) * rows_pad];
    if out.is_empty() {
        return out;
    }
    for (p, panel) in out.chunks_mut(rows_pad * nr).enumerate() {
        transpose_into(v, p * nr..((p + 1) * nr).min(e), panel, nr, |x| x);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::DMatrix;

    #[test]
    fn layouts_match_the_module_docs() {
        let x = DMatrix::<f64>::from_fn(5, 3, |i, j| (10 * i + j) as f64);
        let v = x.as_view();
        let r = rows(&v, |x| 2.0 * x, 6);
        assert_eq!(r.len(), 18);
        assert_eq!(&r[3..6], &[20.0, 22.0, 24.0]);
        assert_eq!(&r[15..], &[0.0; 3]);
        // Kᵀ panels of 4 keys: panel 1 holds key 4 in lane 0, zeros in lanes 1..4.
        let k = panels_of_transpose(&v, 4);
        assert_eq!(k.len(), 2 * 3 * 4);
        assert_eq!(&k[4..8], &[1.0, 11.0, 21.0, 31.0]); // row t = 1 of panel 0
        assert_eq!(&k[12 + 8..12 + 12], &[42.0, 0.0, 0.0, 0.0]); // row t = 2 of panel 1
        // V panels of 2 columns, 8 rows each.
        let p = panels(&v, 2, 8);
        assert_eq!(p.len(), 2 * 8 * 2);
        assert_eq!(&p[2 * 3..2 * 3 + 2], &[30.0, 31.0]); // row 3 of panel 0
        assert_eq!(&p[16 + 2 * 4..16 + 2 * 4 + 2], &[42.0, 0.0]); // row 4 of panel 1
        assert_eq!(&p[16 + 2 * 5..], &[0.0; 6]); // padded rows
    }
}
