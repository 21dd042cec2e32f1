//! Transposition: `dst[i][k] = src[k][i]`, whole `LANES x LANES` blocks in registers.
//!
//! What packing (nalgebra's column-major Q and V into the micro-kernel's row-major layouts)
//! and the end of a query tile (the row-major accumulator into the output's columns) do.
//! Element by element a transposition costs a load, a store and the address arithmetic of
//! two strided streams for every entry; a block held in `LANES` vector registers and
//! shuffled costs `2·LANES` vector memory operations and about `LANES · log₂ LANES`
//! shuffles for `LANES²` entries. Bits are moved, never computed on.

use super::{Element, Kernel, Lanes, MAX_LANES, dispatch};
use crate::simd::Isa;

/// See [`transpose`].
struct Transpose<'a, 'b, 'c, 'd, E> {
    src: &'a [&'b [E]],
    dst: &'c mut [&'d mut [E]],
}

impl<E: Element> Kernel<E> for Transpose<'_, '_, '_, '_, E> {
    type Output = ();

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) {
        let Transpose { src, dst } = self;
        let (rows, cols) = (dst.len(), src.len());
        assert!(src.iter().all(|x| x.len() >= rows) && dst.iter().all(|x| x.len() >= cols));
        let l = S::LANES;
        assert!(l <= MAX_LANES);
        let (rows_full, cols_full) = (rows - rows % l, cols - cols % l);
        let mut sp = [core::ptr::null::<E>(); MAX_LANES];
        let mut dp = [core::ptr::null_mut::<E>(); MAX_LANES];
        for k0 in (0..cols_full).step_by(l) {
            for i0 in (0..rows_full).step_by(l) {
                for (p, x) in sp.iter_mut().zip(&src[k0..k0 + l]) {
                    *p = x[i0..].as_ptr();
                }
                for (p, x) in dp.iter_mut().zip(&mut dst[i0..i0 + l]) {
                    *p = x[k0..].as_mut_ptr();
                }
                // SAFETY: `l` pointers each; src[k0 + k] holds `rows >= i0 + l` elements and
                // dst[i0 + i] holds `cols >= k0 + l` (asserted above), so every pointer is
                // valid for `l` elements; the `dst` slices are distinct `&mut` borrows, so
                // they overlap neither each other nor any `src` slice.
                unsafe { s.transpose_ptr(&sp[..l], &dp[..l]) };
            }
        }
        // The edge blocks (rows or columns short of a whole block) through two blocks on the
        // stack: the short columns copied in (zeros around them), the block transposed in
        // registers, its short rows copied out.
        let edges = (0..rows_full)
            .step_by(l)
            .map(move |i0| (i0, cols_full))
            .chain((0..cols).step_by(l).map(move |k0| (rows_full, k0)));
        for (i0, k0) in edges {
            let (ri, rk) = ((rows - i0).min(l), (cols - k0).min(l));
            if ri == 0 || rk == 0 {
                continue;
            }
            let mut from = [E::ZERO; MAX_LANES * MAX_LANES];
            let mut to = [E::ZERO; MAX_LANES * MAX_LANES];
            for (k, column) in src[k0..k0 + rk].iter().enumerate() {
                from[k * l..k * l + ri].copy_from_slice(&column[i0..i0 + ri]);
            }
            for (k, p) in sp[..l].iter_mut().enumerate() {
                *p = from[k * l..].as_ptr();
            }
            for (i, p) in dp[..l].iter_mut().enumerate() {
                *p = to[i * l..].as_mut_ptr();
            }
            // SAFETY: `from` and `to` hold l·l <= MAX_LANES² elements, so each of the `l`
            // pointers of either is valid for `l` elements (its row of the block); they are
            // distinct arrays, and the rows of `to` do not overlap.
            unsafe { s.transpose_ptr(&sp[..l], &dp[..l]) };
            for (i, row) in dst[i0..i0 + ri].iter_mut().enumerate() {
                row[k0..k0 + rk].copy_from_slice(&to[i * l..i * l + rk]);
            }
        }
    }
}

/// `dst[i][k] = src[k][i]` for every `i < dst.len()` and `k < src.len()`: `src` are the
/// columns of a matrix, `dst` receives its rows (or the other way round). Panics if a
/// `src` slice is shorter than `dst.len()` or a `dst` slice shorter than `src.len()`.
pub fn transpose<E: Element>(isa: Isa, src: &[&[E]], dst: &mut [&mut [E]]) {
    dispatch(isa, Transpose { src, dst });
}

/// [`Lanes::transpose_ptr`] for a block of `n = src.len()` lanes (a multiple of
/// `S::LANES`) by `S`'s smaller blocks: how AVX-512 uses AVX2's shuffles.
///
/// # Safety
///
/// That of [`Lanes::transpose_ptr`] with `n` for `LANES`.
#[inline(always)]
pub(super) unsafe fn transpose_by_blocks<E: Element, S: Lanes<E>>(
    s: S,
    src: &[*const E],
    dst: &[*mut E],
) {
    let (n, l) = (src.len(), S::LANES);
    assert!(dst.len() == n && n % l == 0 && l <= MAX_LANES);
    let mut sp = [core::ptr::null::<E>(); MAX_LANES];
    let mut dp = [core::ptr::null_mut::<E>(); MAX_LANES];
    for k0 in (0..n).step_by(l) {
        for i0 in (0..n).step_by(l) {
            for (p, &x) in sp.iter_mut().zip(&src[k0..k0 + l]) {
                // SAFETY: `x` is valid for `n >= i0 + l` elements (the caller's contract).
                *p = unsafe { x.add(i0) };
            }
            for (p, &x) in dp.iter_mut().zip(&dst[i0..i0 + l]) {
                // SAFETY: as above, `n >= k0 + l`.
                *p = unsafe { x.add(k0) };
            }
            // SAFETY: sub-ranges of the caller's ranges, valid for `l` elements each and as
            // disjoint as they are.
            unsafe { s.transpose_ptr(&sp[..l], &dp[..l]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    fn check<E: Element + From<u16> + PartialEq>(isa: Isa) {
        for (rows, cols) in [(0, 0), (1, 1), (3, 5), (8, 8), (16, 16), (17, 9), (40, 33)] {
            // Entry (i, k) = 1000·i + k, distinct for every position.
            let src: Vec<Vec<E>> = (0..cols)
                .map(|k| {
                    (0..rows + 2)
                        .map(|i| E::from((1000 * i + k) as u16))
                        .collect()
                })
                .collect();
            let srcs: Vec<&[E]> = src.iter().map(|x| x.as_slice()).collect();
            let mut out = vec![vec![E::from(7); cols + 1]; rows];
            let mut dsts: Vec<&mut [E]> = out.iter_mut().map(|x| x.as_mut_slice()).collect();
            transpose(isa, &srcs, &mut dsts);
            for (i, row) in out.iter().enumerate() {
                for (k, &x) in row.iter().enumerate() {
                    let want = if k < cols {
                        E::from((1000 * i + k) as u16)
                    } else {
                        E::from(7)
                    };
                    assert!(x == want, "{isa:?} {rows} x {cols} at ({i}, {k})");
                }
            }
        }
    }

    /// Every entry lands where it belongs, on every instruction set, for shapes with and
    /// without partial blocks; nothing past the rows is written.
    #[test]
    fn transpose_moves_every_entry() {
        for isa in Isa::available() {
            check::<f32>(isa);
            check::<f64>(isa);
        }
    }

    /// The composition AVX-512 uses, run here with AVX2's blocks (and the portable ones) on
    /// 16 x 16 f32 and 8 x 8 f64 blocks.
    #[test]
    fn blocks_of_blocks() {
        fn run<E: Element + From<u16> + PartialEq, S: Lanes<E>>(s: S, n: usize) {
            let src: Vec<Vec<E>> = (0..n)
                .map(|k| (0..n).map(|i| E::from((100 * i + k) as u16)).collect())
                .collect();
            let mut out = vec![vec![E::from(0); n]; n];
            let sp: Vec<*const E> = src.iter().map(|x| x.as_ptr()).collect();
            let dp: Vec<*mut E> = out.iter_mut().map(|x| x.as_mut_ptr()).collect();
            // SAFETY: n pointers each, to n elements each, in distinct vectors.
            unsafe { transpose_by_blocks(s, &sp, &dp) };
            for (i, row) in out.iter().enumerate() {
                for (k, &x) in row.iter().enumerate() {
                    assert!(x == E::from((100 * i + k) as u16), "n = {n} at ({i}, {k})");
                }
            }
        }
        run::<f32, _>(super::super::Portable, 16);
        run::<f64, _>(super::super::Portable, 8);
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = super::super::Avx2::detect() {
            run::<f32, _>(t, 16);
            run::<f64, _>(t, 8);
        }
    }
}
