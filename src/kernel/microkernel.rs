//! The vector kernels: the register-blocked matrix product on packed panels, and the two
//! per-row steps of the online softmax (exponentiate a score row against its running
//! maximum; rescale an accumulator row).
//!
//! Product layout (row-major everywhere, see [`pack`](super::pack)):
//!
//! ```text
//! C[rows × ncols] (+)= A[rows × k] · B[k × ncols]
//! A: a[i·a.stride + t]                       broadcast one element at a time
//! B: panels of NR columns; panel p is the k × NR row-major block at b[p·b.stride ..]
//! C: c[i·c.stride + j]
//! ```
//!
//! Panels are NR = 32 (f32) or 8 (f64) columns wide. The AVX-512F micro-kernel (f32) computes
//! a 6 x 32 block of C in 12 zmm accumulators: per step t it loads the two vectors of the
//! panel row `B[t, ..]` (two cache lines), broadcasts `A[i, t]` for the six rows and issues
//! 12 FMAs. The AVX2 micro-kernel computes a 6 x 16 (f32) or 6 x 8 (f64) block the same way
//! in 12 ymm registers, once per 16-column half of an f32 panel. A's six rows stream through
//! L1, so the loops are bound by the loads and broadcasts, not by memory. The portable
//! fallback is the same register blocking written with arrays, which compilers vectorise for
//! the baseline target.

use crate::Float;

/// A row-major matrix operand: element (i, t) at `data[i·stride + t]`.
#[derive(Clone, Copy)]
pub struct Rows<'a, T> {
    pub data: &'a [T],
    pub stride: usize,
}

/// A packed right-hand operand: panel `p` (columns `p·NR .. p·NR + NR`) is a k x NR
/// row-major block starting at `data[p·stride]`.
#[derive(Clone, Copy)]
pub struct Panels<'a, T> {
    pub data: &'a [T],
    pub stride: usize,
}

/// A row-major output: element (i, j) at `data[i·stride + j]`.
pub struct Out<'a, T> {
    pub data: &'a mut [T],
    pub stride: usize,
}

/// The shape of one product: `rows` (a multiple of MR) x `ncols` (a multiple of NR), inner
/// dimension `k`; `accumulate` adds to C instead of overwriting it.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub rows: usize,
    pub ncols: usize,
    pub k: usize,
    pub accumulate: bool,
}

/// Checks that every access of the product stays inside the operands; the vector kernel's
/// raw-pointer loop relies on it.
fn check_bounds<T>(
    mr: usize,
    nr: usize,
    s: Shape,
    a: &Rows<'_, T>,
    b: &Panels<'_, T>,
    c: &Out<'_, T>,
) {
    assert!(
        s.rows.is_multiple_of(mr) && s.ncols.is_multiple_of(nr),
        "tile not padded: {s:?}"
    );
    if s.rows == 0 || s.ncols == 0 {
        return;
    }
    assert!(a.data.len() >= (s.rows - 1) * a.stride + s.k, "A too short");
    assert!(
        b.data.len() >= (s.ncols / nr - 1) * b.stride + s.k * nr,
        "B too short"
    );
    assert!(
        c.stride >= s.ncols && c.data.len() >= (s.rows - 1) * c.stride + s.ncols,
        "C too short"
    );
}

/// The portable product, any float, same blocking as the vector kernel.
pub(crate) fn gemm_portable<T: Float, const MR: usize, const NR: usize>(
    s: Shape,
    a: Rows<'_, T>,
    b: Panels<'_, T>,
    c: Out<'_, T>,
) {
    check_bounds(MR, NR, s, &a, &b, &c);
    for p in 0..s.ncols / NR {
        let panel = &b.data[p * b.stride..p * b.stride + s.k * NR];
        for i0 in (0..s.rows).step_by(MR) {
            let mut acc = [[T::zero(); NR]; MR];
            let arows: [&[T]; MR] =
                std::array::from_fn(|i| &a.data[(i0 + i) * a.stride..(i0 + i) * a.stride + s.k]);
            for (t, bt) in panel.chunks_exact(NR).enumerate() {
                for (acc_i, ai) in acc.iter_mut().zip(&arows) {
                    let x = ai[t];
                    for (cij, &btj) in acc_i.iter_mut().zip(bt) {
                        *cij += x * btj;
                    }
                }
            }
            for (i, acc_i) in acc.iter().enumerate() {
                let start = (i0 + i) * c.stride + p * NR;
                for (cij, &v) in c.data[start..start + NR].iter_mut().zip(acc_i) {
                    *cij = if s.accumulate { *cij + v } else { v };
                }
            }
        }
    }
}

/// The portable online-softmax row step (see `KernelFloat::softmax_row`), with `exp2` the
/// portable in-place `2ˣ` of [`exp`](super::exp).
pub(crate) fn softmax_row_portable<T: Float>(
    row: &mut [T],
    m_old: T,
    exp2: fn(&mut [T]),
) -> (T, T) {
    let m_new = row.iter().fold(m_old, |m, &x| if x > m { x } else { m });
    if m_new == T::NEG_INFINITY {
        row.fill(T::zero());
        return (m_new, T::zero());
    }
    row.iter_mut().for_each(|x| *x -= m_new);
    exp2(row);
    (m_new, row.iter().fold(T::zero(), |s, &x| s + x))
}

/// The AVX2 + FMA kernels for f32 (6 x 16 micro-tiles) and f64 (6 x 8).
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{Out, Panels, Rows, Shape, check_bounds};
    use crate::kernel::exp::avx2::{exp2_pd, exp2_ps, load_pd, load_ps, store_pd, store_ps};
    use core::arch::x86_64::*;

    macro_rules! gemm_impl {
        ($gemm:ident, $ukr:ident, $t:ty, $lanes:literal, $panel:literal, $zero:ident,
         $loadu:ident, $storeu:ident, $bcast:ident, $fma:ident, $add:ident) => {
            /// One MR x (NV·LANES) block of C from a row block of A and NV·LANES adjacent
            /// columns of a panel of B (whose rows are a whole panel width apart).
            ///
            /// # Safety
            ///
            /// `a` must point at MR rows of at least `k` readable elements, `a_rs` apart; `b`
            /// at `k` rows of `NV · LANES` readable elements, one panel width apart; `c` at MR rows of
            /// `NV · LANES` writable elements, `c_rs` apart. The CPU must support AVX2 and FMA.
            #[inline]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $ukr<const MR: usize, const NV: usize>(
                k: usize,
                a: *const $t,
                a_rs: usize,
                b: *const $t,
                c: *mut $t,
                c_rs: usize,
                accumulate: bool,
            ) {
                let mut acc = [[$zero(); NV]; MR];
                // SAFETY: every pointer offset stays within the extents the caller guarantees:
                // rows i < MR of A at columns t < k, rows t < k of B (NV·LANES elements each, a panel
                // width apart), C's MR x NV·LANES.
                unsafe {
                    for t in 0..k {
                        let bp = b.add(t * $panel);
                        let mut bv = [$zero(); NV];
                        for (v, bvv) in bv.iter_mut().enumerate() {
                            *bvv = $loadu(bp.add(v * $lanes));
                        }
                        for (i, acc_i) in acc.iter_mut().enumerate() {
                            let ai = $bcast(&*a.add(i * a_rs + t));
                            for (acc_iv, &bvv) in acc_i.iter_mut().zip(&bv) {
                                *acc_iv = $fma(ai, bvv, *acc_iv);
                            }
                        }
                    }
                    for (i, acc_i) in acc.iter().enumerate() {
                        for (v, &x) in acc_i.iter().enumerate() {
                            let cp = c.add(i * c_rs + v * $lanes);
                            let r = if accumulate { $add($loadu(cp), x) } else { x };
                            $storeu(cp, r);
                        }
                    }
                }
            }

            /// C (+)= A · B over a whole padded tile (see the module docs).
            #[target_feature(enable = "avx2,fma")]
            pub(crate) fn $gemm(s: Shape, a: Rows<'_, $t>, b: Panels<'_, $t>, c: Out<'_, $t>) {
                const MR: usize = 6;
                const NV: usize = 2;
                // A panel is `$panel` columns wide; the 6 x (NV·LANES) register block covers
                // `$panel / (NV·LANES)` slices of it side by side.
                let (nr, w) = ($panel, NV * $lanes);
                check_bounds(MR, nr, s, &a, &b, &c);
                for p in 0..s.ncols / nr {
                    for h in (0..nr).step_by(w) {
                        for i0 in (0..s.rows).step_by(MR) {
                            // SAFETY: `check_bounds` proved that rows i0..i0 + MR of A hold k
                            // elements each, that panel p holds k rows of nr elements, and
                            // that C's rows i0..i0 + MR hold columns p·nr..(p + 1)·nr; the
                            // slice h..h + w lies inside both; AVX2 and FMA are enabled on
                            // this function, so on the CPU running it.
                            unsafe {
                                $ukr::<MR, NV>(
                                    s.k,
                                    a.data.as_ptr().add(i0 * a.stride),
                                    a.stride,
                                    b.data.as_ptr().add(p * b.stride + h),
                                    c.data.as_mut_ptr().add(i0 * c.stride + p * nr + h),
                                    c.stride,
                                    s.accumulate,
                                )
                            };
                        }
                    }
                }
            }
        };
    }
    gemm_impl!(
        gemm_f32,
        ukr_f32,
        f32,
        8,
        32,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_broadcast_ss,
        _mm256_fmadd_ps,
        _mm256_add_ps
    );
    gemm_impl!(
        gemm_f64,
        ukr_f64,
        f64,
        4,
        8,
        _mm256_setzero_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd,
        _mm256_broadcast_sd,
        _mm256_fmadd_pd,
        _mm256_add_pd
    );

    /// Horizontal maximum and sum of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hmax_ps(x: __m256) -> f32 {
        let m4 = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum_ps(x: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
    }

    /// The online-softmax row step for f32 (row length a multiple of 8).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn softmax_row_f32(row: &mut [f32], m_old: f32) -> (f32, f32) {
        let (chunks, rest) = row.as_chunks_mut::<8>();
        assert!(rest.is_empty(), "score row not padded to 8");
        let (mut mx0, mut mx1) = (_mm256_set1_ps(m_old), _mm256_set1_ps(m_old));
        let mut pairs = chunks.chunks_exact(2);
        for pair in &mut pairs {
            mx0 = _mm256_max_ps(mx0, load_ps(&pair[0]));
            mx1 = _mm256_max_ps(mx1, load_ps(&pair[1]));
        }
        for c in pairs.remainder() {
            mx0 = _mm256_max_ps(mx0, load_ps(c));
        }
        let m_new = hmax_ps(_mm256_max_ps(mx0, mx1));
        if m_new == f32::NEG_INFINITY {
            row.fill(0.0);
            return (m_new, 0.0);
        }
        let mv = _mm256_set1_ps(m_new);
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut pairs = chunks.chunks_exact_mut(2);
        for pair in &mut pairs {
            let p0 = exp2_ps(_mm256_sub_ps(load_ps(&pair[0]), mv));
            let p1 = exp2_ps(_mm256_sub_ps(load_ps(&pair[1]), mv));
            store_ps(&mut pair[0], p0);
            store_ps(&mut pair[1], p1);
            s0 = _mm256_add_ps(s0, p0);
            s1 = _mm256_add_ps(s1, p1);
        }
        for c in pairs.into_remainder() {
            let p0 = exp2_ps(_mm256_sub_ps(load_ps(c), mv));
            store_ps(c, p0);
            s0 = _mm256_add_ps(s0, p0);
        }
        (m_new, hsum_ps(_mm256_add_ps(s0, s1)))
    }

    /// The online-softmax row step for f64 (row length a multiple of 4).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn softmax_row_f64(row: &mut [f64], m_old: f64) -> (f64, f64) {
        let (chunks, rest) = row.as_chunks_mut::<4>();
        assert!(rest.is_empty(), "score row not padded to 4");
        let mut mx = _mm256_set1_pd(m_old);
        for c in chunks.iter() {
            mx = _mm256_max_pd(mx, load_pd(c));
        }
        let m2 = _mm_max_pd(_mm256_castpd256_pd128(mx), _mm256_extractf128_pd::<1>(mx));
        let m_new = _mm_cvtsd_f64(_mm_max_sd(m2, _mm_unpackhi_pd(m2, m2)));
        if m_new == f64::NEG_INFINITY {
            row.fill(0.0);
            return (m_new, 0.0);
        }
        let mv = _mm256_set1_pd(m_new);
        let mut s = _mm256_setzero_pd();
        for c in chunks.iter_mut() {
            let p = exp2_pd(_mm256_sub_pd(load_pd(c), mv));
            store_pd(c, p);
            s = _mm256_add_pd(s, p);
        }
        let s2 = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd::<1>(s));
        (
            m_new,
            _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2))),
        )
    }

    /// `row *= alpha` for f32 (any length).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn scale_row_f32(row: &mut [f32], alpha: f32) {
        let av = _mm256_set1_ps(alpha);
        let (chunks, rest) = row.as_chunks_mut::<8>();
        for c in chunks {
            store_ps(c, _mm256_mul_ps(load_ps(c), av));
        }
        rest.iter_mut().for_each(|x| *x *= alpha);
    }

    /// `row *= alpha` for f64 (any length).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn scale_row_f64(row: &mut [f64], alpha: f64) {
        let av = _mm256_set1_pd(alpha);
        let (chunks, rest) = row.as_chunks_mut::<4>();
        for c in chunks {
            store_pd(c, _mm256_mul_pd(load_pd(c), av));
        }
        rest.iter_mut().for_each(|x| *x *= alpha);
    }
}

/// The AVX-512F kernels for f32: 32-column panels as two zmm vectors, register blocks of
/// 6 x 32 (12 zmm accumulators; a 12 x 32 block with 24 accumulators measured no faster
/// at n = 2048 on Zen 5), and the online-softmax steps on 16 lanes.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{Out, Panels, Rows, Shape, check_bounds};
    use crate::kernel::exp::avx512::{exp2_16, load16, store16};
    use core::arch::x86_64::*;

    /// Columns of a packed f32 panel: two zmm vectors.
    const NR: usize = 32;

    /// One MR x 32 block of C from a row block of A and one panel of B.
    ///
    /// # Safety
    ///
    /// `a` must point at MR rows of at least `k` readable f32, `a_rs` apart; `b` at `k · 32`
    /// readable f32; `c` at MR rows of 32 writable f32, `c_rs` apart. The CPU must support
    /// AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn ukr<const MR: usize>(
        k: usize,
        a: *const f32,
        a_rs: usize,
        b: *const f32,
        c: *mut f32,
        c_rs: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        // SAFETY: every pointer offset stays within the extents the caller guarantees: rows
        // i < MR of A at columns t < k, panel rows t < k of 32 f32, C's MR x 32.
        unsafe {
            for t in 0..k {
                let bp = b.add(t * NR);
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(16));
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*a.add(i * a_rs + t));
                    acc_i[0] = _mm512_fmadd_ps(ai, b0, acc_i[0]);
                    acc_i[1] = _mm512_fmadd_ps(ai, b1, acc_i[1]);
                }
            }
            for (i, acc_i) in acc.iter().enumerate() {
                for (v, &x) in acc_i.iter().enumerate() {
                    let cp = c.add(i * c_rs + v * 16);
                    let r = if accumulate {
                        _mm512_add_ps(_mm512_loadu_ps(cp), x)
                    } else {
                        x
                    };
                    _mm512_storeu_ps(cp, r);
                }
            }
        }
    }

    /// C (+)= A · B over a whole padded tile (see the module docs).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) fn gemm_f32(s: Shape, a: Rows<'_, f32>, b: Panels<'_, f32>, c: Out<'_, f32>) {
        const MR: usize = 6;
        check_bounds(MR, NR, s, &a, &b, &c);
        for p in 0..s.ncols / NR {
            for i0 in (0..s.rows).step_by(MR) {
                // SAFETY: `check_bounds` proved that rows i0..i0 + MR of A hold k elements
                // each, that panel p holds k·32 elements, and that C's rows i0..i0 + MR hold
                // columns p·32..(p + 1)·32; AVX-512F is enabled on this function, so on the
                // CPU running it.
                unsafe {
                    ukr::<MR>(
                        s.k,
                        a.data.as_ptr().add(i0 * a.stride),
                        a.stride,
                        b.data.as_ptr().add(p * b.stride),
                        c.data.as_mut_ptr().add(i0 * c.stride + p * NR),
                        c.stride,
                        s.accumulate,
                    )
                };
            }
        }
    }

    /// The online-softmax row step for f32 (row length a multiple of 16).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) fn softmax_row_f32(row: &mut [f32], m_old: f32) -> (f32, f32) {
        let (chunks, rest) = row.as_chunks_mut::<16>();
        assert!(rest.is_empty(), "score row not padded to 16");
        let (mut mx0, mut mx1) = (_mm512_set1_ps(m_old), _mm512_set1_ps(m_old));
        let mut pairs = chunks.chunks_exact(2);
        for pair in &mut pairs {
            mx0 = _mm512_max_ps(mx0, load16(&pair[0]));
            mx1 = _mm512_max_ps(mx1, load16(&pair[1]));
        }
        for c in pairs.remainder() {
            mx0 = _mm512_max_ps(mx0, load16(c));
        }
        let m_new = _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1));
        if m_new == f32::NEG_INFINITY {
            row.fill(0.0);
            return (m_new, 0.0);
        }
        let mv = _mm512_set1_ps(m_new);
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut pairs = chunks.chunks_exact_mut(2);
        for pair in &mut pairs {
            let p0 = exp2_16(_mm512_sub_ps(load16(&pair[0]), mv));
            let p1 = exp2_16(_mm512_sub_ps(load16(&pair[1]), mv));
            store16(&mut pair[0], p0);
            store16(&mut pair[1], p1);
            s0 = _mm512_add_ps(s0, p0);
            s1 = _mm512_add_ps(s1, p1);
        }
        for c in pairs.into_remainder() {
            let p0 = exp2_16(_mm512_sub_ps(load16(c), mv));
            store16(c, p0);
            s0 = _mm512_add_ps(s0, p0);
        }
        (m_new, _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)))
    }

    /// `row *= alpha` for f32 (any length).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) fn scale_row_f32(row: &mut [f32], alpha: f32) {
        let av = _mm512_set1_ps(alpha);
        let (chunks, rest) = row.as_chunks_mut::<16>();
        for c in chunks {
            store16(c, _mm512_mul_ps(load16(c), av));
        }
        rest.iter_mut().for_each(|x| *x *= alpha);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::Isa;
    use crate::kernel::elem::KernelFloat;

    /// Both paths against a plain triple loop, overwriting and accumulating, with row and
    /// panel strides larger than the product needs.
    fn check<T: Float>() {
        let (mr, nr) = (T::MR, T::NR);
        let (rows, ncols, k) = (3 * mr, 3 * nr, 37);
        let (a_rs, p_stride, c_rs) = (k + 3, k * nr + 5, ncols + 7);
        let val = |x: usize| T::of_f64(((x * 7919) % 23) as f64 - 11.0);
        let a: Vec<T> = (0..rows * a_rs).map(val).collect();
        let b: Vec<T> = (0..(ncols / nr) * p_stride).map(|x| val(x + 5)).collect();
        let c0: Vec<T> = (0..rows * c_rs).map(|x| val(x + 9)).collect();
        for isa in Isa::available() {
            for accumulate in [false, true] {
                let mut c = c0.clone();
                let s = Shape {
                    rows,
                    ncols,
                    k,
                    accumulate,
                };
                T::gemm(
                    isa,
                    s,
                    Rows {
                        data: &a,
                        stride: a_rs,
                    },
                    Panels {
                        data: &b,
                        stride: p_stride,
                    },
                    Out {
                        data: &mut c,
                        stride: c_rs,
                    },
                );
                for i in 0..rows {
                    for j in 0..c_rs {
                        let want = if j < ncols {
                            let (p, lane) = (j / nr, j % nr);
                            let dot = (0..k).fold(T::zero(), |acc, t| {
                                acc + a[i * a_rs + t] * b[p * p_stride + t * nr + lane]
                            });
                            if accumulate {
                                c0[i * c_rs + j] + dot
                            } else {
                                dot
                            }
                        } else {
                            c0[i * c_rs + j] // outside the product: untouched
                        };
                        // Small integers: every sum is exact, whatever the order.
                        assert_eq!(c[i * c_rs + j], want, "{isa:?} ({i}, {j})");
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_matches_a_triple_loop() {
        check::<f32>();
        check::<f64>();
    }

    #[test]
    #[should_panic(expected = "B too short")]
    fn gemm_checks_bounds() {
        // One panel of k = 4 rows needs 4 · NR = 128 elements; B has 96.
        let a = [0.0_f32; 6 * 4];
        let b = [0.0_f32; 32 * 3];
        let mut c = [0.0_f32; 6 * 32];
        let s = Shape {
            rows: 6,
            ncols: 32,
            k: 4,
            accumulate: false,
        };
        f32::gemm(
            Isa::detect(),
            s,
            Rows {
                data: &a,
                stride: 4,
            },
            Panels {
                data: &b,
                stride: 128,
            },
            Out {
                data: &mut c,
                stride: 32,
            },
        );
    }
}
