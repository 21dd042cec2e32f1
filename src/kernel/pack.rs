//! Packing: nalgebra's column-major views copied once into the row-major layouts the
//! micro-kernel streams (see [`microkernel`](super::microkernel)).
//!
//! ```text
//! rows(X, pad)              X (r x c)  →  r_pad x c row-major, zero rows r..r_pad
//! panels_of_transpose(K)    K (m x d)  →  Kᵀ (d x m) in panels of NR keys:
//!                                         panel p, row t, lane j  =  K[p·NR + j, t]
//! panels(V, pad)            V (m x e)  →  V in panels of NR columns, pad rows each:
//!                                         panel p, row j, lane c  =  V[j, p·NR + c]
//! ```
//!
//! Every buffer is zero-padded (rows to a multiple of MR, keys and columns to a multiple of
//! NR), so the micro-kernel never needs an edge case: padded keys are masked with `−inf`
//! before the softmax, padded value columns and query rows are dropped at the end.

use super::buffers::Buf;
use crate::Float;
use crate::prelude::*;
use crate::simd::{self, Isa};
use nalgebra::{DMatrix, DMatrixView};

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

/// X (r x c) as a row-major `rows_pad x c` buffer; rows `r..rows_pad` are zero.
pub(crate) fn rows<T: Float>(isa: Isa, x: &DMatrixView<'_, T>, rows_pad: usize) -> Buf<T> {
    let (r, c) = x.shape();
    debug_assert!(rows_pad >= r);
    let mut out = Buf::stale(rows_pad * c);
    transpose_into(isa, x, 0..c, &mut out, c);
    out[r * c..].fill(T::zero());
    out
}

/// `out[i·stride + (t − cols.start)] = x[(i, t)]` for every row i of `x` and column t of
/// `cols`: column-major to row-major, by [`simd::transpose`]'s register blocks.
fn transpose_into<T: Float>(
    isa: Isa,
    x: &DMatrixView<'_, T>,
    cols: core::ops::Range<usize>,
    out: &mut [T],
    stride: usize,
) {
    if cols.is_empty() {
        return;
    }
    let src: Vec<&[T]> = cols.map(|t| column(x, t)).collect();
    let mut dst: Vec<&mut [T]> = out.chunks_mut(stride).take(x.nrows()).collect();
    simd::transpose(isa, &src, &mut dst);
}

/// The r x `cols` column-major matrix whose row i is `rows[i][..cols]` (r = `rows.len()`):
/// a row-major result (the backward's dQ, dK, dV) back in nalgebra's layout, by
/// [`simd::transpose`].
pub(crate) fn matrix_of_rows<T: Float>(isa: Isa, rows: &[&[T]], cols: usize) -> DMatrix<T> {
    let r = rows.len();
    let mut out = zeros(r, cols);
    if r > 0 && cols > 0 {
        let mut dst: Vec<&mut [T]> = out.as_mut_slice().chunks_mut(r).collect();
        simd::transpose(isa, rows, &mut dst);
    }
    out
}

/// An `r x c` matrix of zeros from zeroed memory: a large one comes from the system already
/// cleared, so that it is not cleared a second time (nalgebra's `zeros` writes every element,
/// `vec!` of the zero bit pattern asks the allocator for zeroed memory instead).
pub(crate) fn zeros<T: Float>(r: usize, c: usize) -> DMatrix<T> {
    DMatrix::from_vec(r, c, vec![T::zero(); r * c])
}

/// Clears `*finite` unless every entry of columns `cols` of `x` is finite (nothing to do
/// without a flag): the forward pass's scan of its inputs, folded into packing a block of
/// columns at a time, so that the columns just scanned are in cache when they are copied.
#[inline]
fn scan<T: Float>(
    isa: Isa,
    x: &DMatrixView<'_, T>,
    cols: core::ops::Range<usize>,
    finite: &mut Option<&mut bool>,
) {
    if let Some(f) = finite
        && **f
        && !simd::all_finite_parts(isa, cols.map(|c| column(x, c)))
    {
        **f = false;
    }
}

/// Kᵀ for K (m x d), in `⌈m / nr⌉` panels of `d x nr` (panel stride `d·nr`); keys past m
/// are zero. With `finite`, also clears it if an entry of K is not finite.
pub(crate) fn panels_of_transpose<T: Float>(
    isa: Isa,
    k: &DMatrixView<'_, T>,
    nr: usize,
    mut finite: Option<&mut bool>,
) -> Buf<T> {
    let (m, d) = k.shape();
    let mut out = Buf::stale(round_up(m, nr) * d);
    for t in 0..d {
        if t % nr == 0 {
            scan(isa, k, t..(t + nr).min(d), &mut finite);
        }
        for (p, keys) in column(k, t).chunks(nr).enumerate() {
            let at = p * d * nr + t * nr;
            out[at..at + keys.len()].copy_from_slice(keys);
            out[at + keys.len()..at + nr].fill(T::zero());
        }
    }
    out
}

/// V (m x e) in `⌈e / nr⌉` panels of `rows_pad x nr` (panel stride `rows_pad·nr`); rows past
/// m and columns past e are zero. With `finite`, also clears it if an entry of V is not
/// finite.
pub(crate) fn panels<T: Float>(
    isa: Isa,
    v: &DMatrixView<'_, T>,
    nr: usize,
    rows_pad: usize,
    mut finite: Option<&mut bool>,
) -> Buf<T> {
    let (m, e) = v.shape();
    debug_assert!(rows_pad >= m);
    let mut out = Buf::stale(round_up(e, nr) * rows_pad);
    if out.is_empty() {
        return out;
    }
    for (p, panel) in out.chunks_mut(rows_pad * nr).enumerate() {
        let cols = p * nr..((p + 1) * nr).min(e);
        let width = cols.len();
        scan(isa, v, cols.clone(), &mut finite);
        transpose_into(isa, v, cols, panel, nr);
        if width < nr {
            for row in panel[..m * nr].chunks_mut(nr) {
                row[width..].fill(T::zero());
            }
        }
        panel[m * nr..].fill(T::zero());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_module_docs() {
        let x = DMatrix::<f64>::from_fn(5, 3, |i, j| (10 * i + j) as f64);
        let v = x.as_view();
        for isa in Isa::available() {
            let r = rows(isa, &v, 6);
            assert_eq!(r.len(), 18);
            assert_eq!(&r[3..6], &[10.0, 11.0, 12.0]);
            assert_eq!(&r[15..], &[0.0; 3]);
            let p = panels(isa, &v, 2, 8, None);
            assert_eq!(p.len(), 2 * 8 * 2);
            assert_eq!(&p[2 * 3..2 * 3 + 2], &[30.0, 31.0]); // row 3 of panel 0
            assert_eq!(&p[16 + 2 * 4..16 + 2 * 4 + 2], &[42.0, 0.0]); // row 4 of panel 1
            assert_eq!(&p[16 + 2 * 5..], &[0.0; 6]); // padded rows
        }
        // Kᵀ panels of 4 keys: panel 1 holds key 4 in lane 0, zeros in lanes 1..4.
        let k = panels_of_transpose(Isa::Portable, &v, 4, None);
        assert_eq!(k.len(), 2 * 3 * 4);
        assert_eq!(&k[4..8], &[1.0, 11.0, 21.0, 31.0]); // row t = 1 of panel 0
        assert_eq!(&k[12 + 8..12 + 12], &[42.0, 0.0, 0.0, 0.0]); // row t = 2 of panel 1
    }

    /// A strided view (a block inside a larger matrix) larger than the register blocks, with
    /// partial blocks at both edges: every entry of `rows` and `panels` on every instruction
    /// set, in f32 and f64.
    #[test]
    fn strided_views_pack_entry_by_entry() {
        fn check<T: Float>(isa: Isa) {
            let big = DMatrix::<T>::from_fn(41, 23, |i, j| T::of_f64((100 * i + j) as f64));
            let v = big.view((3, 2), (35, 19));
            let r = rows(isa, &v, 36);
            let p = panels(isa, &v, 8, 40, None);
            for i in 0..40 {
                for t in 0..24 {
                    let want = if i < 35 && t < 19 {
                        v[(i, t)]
                    } else {
                        T::zero()
                    };
                    if i < 36 && t < 19 {
                        assert!(r[i * 19 + t] == want, "{isa:?} rows ({i}, {t})");
                    }
                    assert!(
                        p[(t / 8) * 40 * 8 + i * 8 + t % 8] == want,
                        "{isa:?} ({i}, {t})"
                    );
                }
            }
        }
        for isa in Isa::available() {
            check::<f32>(isa);
            check::<f64>(isa);
        }
    }

    /// The packed layouts reuse the thread's kept buffers without clearing them, so their
    /// padding must be written explicitly: with every kept block full of NaN first, the
    /// padded rows, keys and columns still come out zero (sizes above the free list's
    /// 64 KiB minimum, partial panels and row blocks at every edge).
    #[test]
    fn padding_is_zero_in_reused_memory() {
        fn dirty() {
            let blocks: Vec<Buf<f64>> = (0..6)
                .map(|i| {
                    let mut b = Buf::zeroed(20_000 + 9_000 * i);
                    b.fill(f64::NAN);
                    b
                })
                .collect();
            drop(blocks);
        }
        let x = DMatrix::<f32>::from_fn(301, 70, |i, j| (i * 70 + j) as f32);
        let v = x.as_view();
        for isa in Isa::available() {
            dirty();
            let r = rows(isa, &v, 306);
            assert!(
                r[..301 * 70]
                    .iter()
                    .zip(x.transpose().iter())
                    .all(|(a, b)| a == b)
            );
            assert!(r[301 * 70..].iter().all(|&z| z.to_bits() == 0), "{isa:?}");
            dirty();
            let k = panels_of_transpose(isa, &v, 16, None);
            dirty();
            let p = panels(isa, &v, 16, 304, None);
            for i in 0..304 {
                for t in 0..80 {
                    let want = if i < 301 && t < 70 { x[(i, t)] } else { 0.0 };
                    let pv = p[(t / 16) * 304 * 16 + i * 16 + t % 16];
                    assert!(pv.to_bits() == want.to_bits(), "{isa:?} V ({i}, {t})");
                    if t < 70 {
                        let kv = k[(i / 16) * 70 * 16 + t * 16 + i % 16];
                        assert!(kv.to_bits() == want.to_bits(), "{isa:?} K ({i}, {t})");
                    }
                }
            }
        }
    }

    /// `matrix_of_rows` reads each row's first `cols` entries, whatever the rows' lengths.
    #[test]
    fn rows_back_into_a_matrix() {
        let data: Vec<Vec<f32>> = (0..19)
            .map(|i| (0..30 + i).map(|c| (100 * i + c) as f32).collect())
            .collect();
        let rows: Vec<&[f32]> = data.iter().map(|r| r.as_slice()).collect();
        for isa in Isa::available() {
            let x = matrix_of_rows(isa, &rows, 27);
            assert_eq!(
                x,
                DMatrix::from_fn(19, 27, |i, c| (100 * i + c) as f32),
                "{isa:?}"
            );
            assert_eq!(matrix_of_rows(isa, &rows, 0).shape(), (19, 0));
            assert_eq!(matrix_of_rows::<f32>(isa, &[], 5).shape(), (0, 5));
        }
    }
}
