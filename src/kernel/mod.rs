//! The fast path: a tiled, online-softmax attention kernel for the CPU.
//!
//! [`scaled_attention`](crate::scaled_attention), [`scaled_attention_with`](crate::scaled_attention_with)
//! and [`multi_head_attention`](crate::multi_head_attention) run on this kernel; it computes
//! exactly what [`scaled_attention_reference`](crate::scaled_attention_reference) computes
//! (scale, softcap, bias, every [`Mask`](crate::Mask), fully masked rows, the log-sum-exp), to
//! rounding, without ever building the n x m score matrix. Only when the caller asks for the
//! weights ([`AttentionOptions::return_weights`](crate::AttentionOptions::return_weights))
//! does `scaled_attention_with` take the reference path, which has to materialise them.
//!
//! This module's public items are small helpers around it: [`matmul_abt`] and [`matmul_ab`]
//! (the kernel's own tile products, for benchmarks and curious readers) and
//! [`exp_in_place`] (its vectorised exponential).
//!
//! # Design
//!
//! **Tiles.** Queries are cut into tiles of BR rows, keys into tiles of BC keys (f32: 96 x
//! 256, f64: 48 x 128). One query tile is the unit of work; it walks over the key tiles from
//! left to right, keeping three things per query row: the running maximum `mᵢ`, the running
//! sum `ℓᵢ` and an unnormalised output row `oᵢ`.
//!
//! ```text
//!                      keys -->
//!               k0=0      k0=BC     k0=2BC    k0=3BC
//!             +---------+---------+---------+---------+
//!   q0=0      | Partial |  Empty  |  Empty  |  Empty  |   Empty tiles are skipped
//!   (BR rows) |  \      |         |         |         |   (no product, no exp);
//!             +---------+---------+---------+---------+   Full tiles skip the mask;
//!   q0=BR     |  Full   | Partial |  Empty  |  Empty  |   Partial tiles evaluate it
//!             |         |  \      |         |         |   per entry.
//!             +---------+---------+---------+---------+
//!   q0=2BR    |  Full   |  Full   | Partial |  Empty  |   (a causal mask: about half
//!             |         |         |  \      |         |   the tiles are skipped)
//!             +---------+---------+---------+---------+
//!
//!   one (query tile, key tile) step:
//!     S = Q_tile · K_tileᵀ               BR x BC scores   (micro-kernel on packed panels)
//!     S ← softcap, + bias, mask          only if present / only in Partial tiles
//!     m' = max(m, rowmax S)              per row
//!     P = 2^(S − m'),  α = 2^(m − m')    vectorised exp2
//!     ℓ ← α·ℓ + rowsum P
//!     O ← α·O + P · V_tile               BR x d_v         (micro-kernel)
//!   at the end of the row of tiles:
//!     output = O / ℓ,   lse = (m + log₂ ℓ) · ln 2
//! ```
//!
//! **Online softmax** (Milakov & Gimelshein 2018; FlashAttention). When a new key tile raises
//! a row's maximum from `m` to `m'`, every term summed so far was computed relative to `m`;
//! multiplying the sum and the output accumulator by `α = 2^(m − m')` re-expresses them
//! relative to `m'`, so after the last tile `ℓ = Σⱼ 2^(sⱼ − m)` and `O = Σⱼ 2^(sⱼ − m) vⱼ`
//! over all keys, and `O / ℓ` is the softmax-weighted sum. When the maximum does not move,
//! `α = 1` and the rescaling is skipped. A row that has seen no allowed key keeps `m = −inf`
//! and `ℓ = 0`: it ends as an output row of zeros with `lse = −inf`, never NaN.
//!
//! **exp2 with the scale folded in.** Scores are kept in base-2 units: without a softcap,
//! `scale · log₂e` is multiplied into Q once, when packing, so the product yields
//! `s = scale · q·k · log₂e` and `2^(s − m)` is the softmax numerator `e^(scale·q·k − …)`
//! with no per-score multiplication. With a softcap `c` the scores leave the product in
//! natural units and are turned into `log₂e · (c·tanh(S/c) + bias)`; a bias alone is added as
//! `log₂e · bias`. The exponential itself is a vectorised polynomial (chosen at run time:
//! AVX-512F on 16 lanes for f32 where the CPU has it, else AVX2 + FMA, else a portable
//! fallback; f32 within 1 ulp, f64 within 2.2e-16 relative).
//!
//! **Packing.** Q, K and V are copied once, at the start of a call, from the (column-major,
//! possibly strided) nalgebra views into the row-major, zero-padded layouts the micro-kernel
//! streams: Q·factor as rows, Kᵀ in panels of NR = 32 (f32) / 8 (f64) keys, V in panels of
//! NR columns. That is O((n + m)·d) memory; the per-thread working set is one score tile and
//! one accumulator tile, O(BR·(BC + d_v)), independent of n and m. The n x m score matrix is
//! never built.
//!
//! **Micro-kernels**, picked at run time by `Isa::detect` (AVX-512F, else AVX2 +
//! FMA, else portable Rust):
//!
//! ```text
//!   f32, AVX-512F   6 x 32 block: 12 zmm accumulators, per step 2 zmm loads of the panel row,
//!                   6 broadcasts, 12 FMAs; softmax row step and rescale on 16 lanes
//!   f32, AVX2+FMA   6 x 16 block: 12 ymm accumulators, run twice per 32-column panel
//!   f64, either     6 x 8 block on ymm (AVX2 + FMA; f64 has no AVX-512 kernels yet)
//! ```
//!
//! The f32 panel width is 32 on every instruction set, so packing does not depend on the
//! CPU. On the Zen 5 development machine the AVX-512 path runs an n = m = 2048, d = 64
//! attention in about 5.1-5.3 ms on one thread (about 200 GFLOP/s, 78% of the AVX-512 FMA
//! peak), against 9.4-9.7 ms (about 113 GFLOP/s) for the AVX2 path; see
//! `docs/performance.md`.
//!
//! **Threads.** Query tiles are independent: they share the packed inputs read-only and each
//! writes its own rows of the output. They run in parallel on rayon (the current pool, or a
//! private pool sized by [`AttentionOptions::threads`](crate::AttentionOptions::threads)), and
//! since every tile does the same arithmetic in the same order whichever thread runs it, the
//! result is bit-identical for any thread count.
//!
//! A score that overflows (finite inputs whose product exceeds the float range) sends its
//! row to a scalar recomputation with the reference's formula, so even that case matches.

pub(crate) mod elem;
mod exp;
pub(crate) mod forward;
mod microkernel;
mod pack;

pub(crate) use elem::Isa;

use crate::Float;
use crate::error::{Axis, Error, Result};
use microkernel::{Out, Panels, Rows, Shape};
use nalgebra::{DMatrix, DMatrixView};
use pack::round_up;
use std::sync::{Arc, Mutex, OnceLock};

/// Where the query tiles of a call run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exec {
    /// One after another on the calling thread.
    Inline,
    /// In parallel on the current rayon pool.
    Pool,
}

/// Runs `f` as [`AttentionOptions::threads`](crate::AttentionOptions::threads) asks: `None`
/// on the current rayon pool, `Some(1)` inline, `Some(t)` on a private pool of `t` threads
/// (if the pool cannot be built, inline: the result is the same bits either way).
///
/// Private pools are built once per thread count and kept for the life of the process:
/// building one costs tens of microseconds, as much as a whole attention at n = 256.
/// rayon's global pool is never touched.
pub(crate) fn with_threads<R: Send>(threads: Option<usize>, f: impl FnOnce(Exec) -> R + Send) -> R {
    match threads {
        None => f(Exec::Pool),
        Some(0 | 1) => f(Exec::Inline),
        Some(t) => match private_pool(t) {
            Some(pool) => pool.install(|| f(Exec::Pool)),
            None => f(Exec::Inline),
        },
    }
}

/// The private pools built so far, by thread count.
type Pools = Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>>;

/// The private pool of `threads` threads, built on first use.
fn private_pool(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    static POOLS: OnceLock<Pools> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, pool)) = pools.iter().find(|(t, _)| *t == threads) {
        return Some(Arc::clone(pool));
    }
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .ok()?,
    );
    pools.push((threads, Arc::clone(&pool)));
    Some(pool)
}

/// Which packed layout the right-hand operand of a product takes.
enum Right {
    /// `B` is m x k and the product is `A Bᵀ` (the Q Kᵀ shape).
    Transposed,
    /// `B` is k x p and the product is `A B` (the P V shape).
    Plain,
}

/// `A Bᵀ` (n x m) from `A` (n x d) and `B` (m x d), computed the way the attention kernel
/// computes its score tiles `Q Kᵀ`: both operands packed once, then BR x BC output tiles by
/// the register-blocked micro-kernel (AVX2 + FMA when the CPU has them).
///
/// `C_ij = Σ_t A_it · B_jt`. Single-threaded; the result equals nalgebra's `a * b.transpose()`
/// up to rounding (the kernel sums in a different order, with fused multiply-adds). Extra
/// memory: the packed copies of A and B and a padded copy of C.
///
/// # Errors
///
/// [`Error::DimensionMismatch`] if `b` has a different number of columns than `a`.
///
/// # Examples
///
/// ```
/// use attention_math::kernel::matmul_abt;
/// use nalgebra::dmatrix;
///
/// let a = dmatrix![1.0_f64, 2.0; 3.0, 4.0; 5.0, 6.0];
/// let b = dmatrix![1.0_f64, 0.0; 0.0, 1.0; 1.0, 1.0; 2.0, -1.0];
/// let c = matmul_abt(&a, &b)?;
/// assert_eq!(c, a * b.transpose());
/// assert_eq!(c[(2, 2)], 11.0);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn matmul_abt<'a, 'b, T: Float>(
    a: impl Into<DMatrixView<'a, T>>,
    b: impl Into<DMatrixView<'b, T>>,
) -> Result<DMatrix<T>> {
    let (a, b) = (a.into(), b.into());
    if b.ncols() != a.ncols() {
        return Err(Error::DimensionMismatch {
            arg: "b",
            axis: Axis::Cols,
            found: b.ncols(),
            other: "a",
            other_axis: Axis::Cols,
            expected: a.ncols(),
        });
    }
    Ok(product(&a, &b, Right::Transposed))
}

/// `A B` (n x p) from `A` (n x k) and `B` (k x p), computed the way the attention kernel
/// accumulates `P V`: A packed as rows, B packed in column panels, then for each BR-row
/// block of the output the micro-kernel accumulates over blocks of BC along k.
///
/// `C_ij = Σ_t A_it · B_tj`. Single-threaded; equal to nalgebra's `a * b` up to rounding.
///
/// # Errors
///
/// [`Error::DimensionMismatch`] if `b` has a different number of rows than `a` has columns.
///
/// # Examples
///
/// ```
/// use attention_math::kernel::matmul_ab;
/// use nalgebra::DMatrix;
///
/// let p = DMatrix::<f32>::from_fn(5, 300, |i, j| ((i + j) % 7) as f32);
/// let v = DMatrix::<f32>::from_fn(300, 3, |i, j| ((i * j) % 5) as f32);
/// let c = matmul_ab(&p, &v)?;
/// // Small integers: every partial sum is exact in f32, so the results agree exactly.
/// assert_eq!(c, &p * &v);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn matmul_ab<'a, 'b, T: Float>(
    a: impl Into<DMatrixView<'a, T>>,
    b: impl Into<DMatrixView<'b, T>>,
) -> Result<DMatrix<T>> {
    let (a, b) = (a.into(), b.into());
    if b.nrows() != a.ncols() {
        return Err(Error::DimensionMismatch {
            arg: "b",
            axis: Axis::Rows,
            found: b.nrows(),
            other: "a",
            other_axis: Axis::Cols,
            expected: a.ncols(),
        });
    }
    Ok(product(&a, &b, Right::Plain))
}

/// The tiled product behind [`matmul_abt`] and [`matmul_ab`].
fn product<T: Float>(a: &DMatrixView<'_, T>, b: &DMatrixView<'_, T>, right: Right) -> DMatrix<T> {
    let isa = Isa::detect();
    let (mr, nr, br, bc) = (T::MR, T::NR, T::BR, T::BC);
    let (n, k) = a.shape();
    let p = match right {
        Right::Transposed => b.nrows(),
        Right::Plain => b.ncols(),
    };
    if n == 0 || p == 0 {
        return DMatrix::zeros(n, p);
    }
    let (p, inner_pad, packed_b) = match right {
        Right::Transposed => (b.nrows(), k, pack::panels_of_transpose(b, nr)),
        Right::Plain => {
            let k_pad = round_up(k, nr);
            (b.ncols(), k_pad, pack::panels(b, nr, k_pad))
        }
    };
    let (n_pad, p_pad) = (round_up(n, mr), round_up(p, nr));
    let packed_a = pack_rows_padded(a, n_pad, inner_pad);
    let mut c = vec![T::zero(); n_pad * p_pad];
    for i0 in (0..n_pad).step_by(br) {
        let rows = br.min(n_pad - i0);
        let a_rows = &packed_a[i0 * inner_pad..];
        match right {
            Right::Transposed => {
                // Like S = Q_tile K_tileᵀ: one BR x BC output tile at a time.
                for j0 in (0..p_pad).step_by(bc) {
                    let cols = bc.min(p_pad - j0);
                    T::gemm(
                        isa,
                        Shape {
                            rows,
                            ncols: cols,
                            k,
                            accumulate: false,
                        },
                        Rows {
                            data: a_rows,
                            stride: inner_pad,
                        },
                        Panels {
                            data: &packed_b[(j0 / nr) * k * nr..],
                            stride: k * nr,
                        },
                        Out {
                            data: &mut c[i0 * p_pad + j0..],
                            stride: p_pad,
                        },
                    );
                }
            }
            Right::Plain => {
                // Like O += P_tile V_tile: accumulate over BC-long blocks of the inner index.
                for t0 in (0..inner_pad).step_by(bc) {
                    let depth = bc.min(inner_pad - t0);
                    T::gemm(
                        isa,
                        Shape {
                            rows,
                            ncols: p_pad,
                            k: depth,
                            accumulate: t0 > 0,
                        },
                        Rows {
                            data: &a_rows[t0..],
                            stride: inner_pad,
                        },
                        Panels {
                            data: &packed_b[t0 * nr..],
                            stride: inner_pad * nr,
                        },
                        Out {
                            data: &mut c[i0 * p_pad..],
                            stride: p_pad,
                        },
                    );
                }
            }
        }
    }
    // C is row-major n_pad x p_pad; nalgebra wants column-major. A cache-blocked transpose
    // (reading C down its columns element by element would stride by p_pad).
    let mut columns = vec![T::zero(); n_pad * p_pad];
    transpose::transpose(&c, &mut columns, p_pad, n_pad);
    DMatrix::from_vec(n_pad, p_pad, columns)
        .view((0, 0), (n, p))
        .into_owned()
}

/// A (n x k) as row-major rows of length `width >= k` (zero beyond k), `rows_pad` rows.
fn pack_rows_padded<T: Float>(a: &DMatrixView<'_, T>, rows_pad: usize, width: usize) -> Vec<T> {
    let (n, k) = a.shape();
    let mut out = vec![T::zero(); rows_pad * width];
    if n * k == 0 {
        return out;
    }
    // Columns to rows with a cache-blocked transpose, then each row into its padded slot.
    let mut rows = vec![T::zero(); n * k];
    transpose::transpose(a.clone_owned().as_slice(), &mut rows, n, k);
    for (dst, src) in out.chunks_exact_mut(width).zip(rows.chunks_exact(k)) {
        dst[..k].copy_from_slice(src);
    }
    out
}

/// `x ← eˣ` for every entry, vectorised: the exponential the kernel's softmax runs on.
///
/// AVX2 + FMA kernels when the CPU has them (chosen at run time), else `std`'s `exp`. The
/// result is within 1 ulp of the correctly rounded value in f32 and within 2.2e-16 relative
/// of `std` in f64, 3.5-5x faster than `std` on a modern x86-64 core. Special values: `-inf`
/// gives 0, NaN gives NaN, overflow gives `+inf`, and results below the smallest normal float
/// (x < −87.34 in f32, x < −708.40 in f64) are flushed to `+0`.
///
/// # Examples
///
/// ```
/// use attention_math::kernel::exp_in_place;
///
/// let mut x = [0.0_f32, 1.0, -1.0, f32::NEG_INFINITY, -100.0, 100.0];
/// exp_in_place(&mut x);
/// assert_eq!(x[0], 1.0);
/// assert!((x[1] - std::f32::consts::E).abs() <= f32::EPSILON * 3.0);
/// assert!((x[2] - (-1.0_f32).exp()).abs() <= f32::EPSILON);
/// assert_eq!(&x[3..], &[0.0, 0.0, f32::INFINITY]);
/// ```
pub fn exp_in_place<T: Float>(x: &mut [T]) {
    T::exp_in_place(Isa::detect(), x);
}
