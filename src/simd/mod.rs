//! The bottom layer for vector code: instruction-set detection, a small vector trait, and the
//! few algorithms the library vectorises, each written once.
//!
//! ```text
//! isa.rs       Isa: the instruction set in use, detected once and cached, capped by the
//!              ATTENTION_MATH_ISA environment variable; InstructionSet, its public name
//! x86.rs       the tokens Avx2 and Avx512 (zero-sized, minted only by detection) and their
//!              vector types (ymm / zmm, f32 and f64)
//! portable.rs  the token Portable: the same operations on arrays, for any target
//! exp.rs       exp and 2^x (range reduction, polynomial, 2^n from the exponent field)
//! gemm.rs      the register-blocked micro-kernel C (+)= A·B on packed panels
//! rows.rs      the online-softmax row step and the row rescale
//! transpose.rs column slices to row slices, a register block at a time (packing)
//! ```
//!
//! **Tokens make target-feature safety a property of the types.** A value of type
//! [`x86::Avx2`] exists only if detection saw AVX2 and FMA on this CPU (its field is private
//! to its module, and the only constructor runs `is_x86_feature_detected!`, or without the
//! `std` feature checks the build's compile-time target features); [`Isa`] holds one
//! token or none. The vector operations are methods of the token, so code that has no token
//! cannot call them, and the one `unsafe` step, entering a `#[target_feature]` function, is
//! taken in [`dispatch`] with the token in hand.
//!
//! **Written once.** Every algorithm here is a generic `#[inline(always)]` function over
//! [`Lanes<E>`], the vector trait (splat, load, store, add, fma, max, horizontal max and sum,
//! a masked flush, 2ⁿ, a block transpose), for an element `E` = `f32` or `f64`. [`dispatch`]
//! runs such a body (a [`Kernel`]) inside a thin `#[target_feature]` entry point per
//! instruction set, so that the whole body, inlined there, is compiled for that instruction
//! set. Six implementations
//! of [`Lanes`] exist: AVX2 + FMA (8 f32 / 4 f64 lanes), AVX-512F (16 / 8) and portable
//! arrays (8 / 4, with `mul_add` as the fused multiply-add, so the portable path rounds like
//! the vector paths lane for lane).
//!
//! Nothing here imports the rest of the crate: the scalar trait [`Float`](crate::Float)
//! builds on [`Element`], and everything above reaches vector code through it.

mod exp;
mod gemm;
mod isa;
mod portable;
mod rows;
mod transpose;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use exp::exp_in_place;
pub use gemm::{Out, Panels, Rows, Shape, block_rows, gemm};
pub use isa::{InstructionSet, Isa, instruction_set};
pub use portable::Portable;
pub use rows::{
    GradRows, ScoreRows, add_products, affine_row, all_finite, all_finite_parts, finite_max,
    max_abs_into, online_rows, online_step, scale_parts_into, scale_row, softmax_grad_row,
    softmax_grad_rows,
};
pub use transpose::transpose;
use transpose::transpose_by_blocks;
#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

use core::fmt::Debug;
use core::ops::{Add, AddAssign, Mul, MulAssign, Sub, SubAssign};

/// The most lanes of any [`Lanes`] implementation (AVX-512's 16 f32 lanes): the size of the
/// buffers on the stack that tails and blocks go through.
const MAX_LANES: usize = 16;

/// A scalar the vector code works on: `f32` or `f64`. Implemented for those two only, in this
/// private module, so the trait is sealed.
pub trait Element:
    Copy
    + Default
    + Debug
    + PartialOrd
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// Columns of a packed right-hand panel of the micro-kernel: 32 f32 (two zmm, or two
    /// pairs of ymm), 16 f64. The same on every instruction set, so packing never depends
    /// on the CPU.
    const NR: usize;
    /// Rows of the micro-kernel's register block.
    const MR: usize = 6;
    /// 0, 1 and −∞.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Negative infinity.
    const NEG_INF: Self;
    /// `1.5 · 2^(mantissa bits)`: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: Self;
    /// log₂ e.
    const LOG2E: Self;
    /// ln 2 split so that `n · LN2_HI` is exact for the `n` that occur (Cody–Waite).
    const LN2_HI: Self;
    /// The rest of ln 2: `LN2_HI + LN2_LO ≈ ln 2` to twice the working precision.
    const LN2_LO: Self;
    /// Below these `eˣ` and `2ˣ` would be subnormal: they are flushed to `+0`.
    const EXP_LO: Self;
    /// See [`Element::EXP_LO`].
    const EXP2_LO: Self;
    /// Above these the vector kernels are not valid; the slice functions use `std` there.
    const EXP_HI: Self;
    /// See [`Element::EXP_HI`].
    const EXP2_HI: Self;

    /// `1 + r·q(r)` with `q(r) ≈ (eʳ − 1)/r` on `[−ln2/2, ln2/2]`.
    fn exp_poly<S: Lanes<Self>>(s: S, r: S::V) -> S::V;
    /// `1 + r·q(r)` with `q(r) ≈ (2ʳ − 1)/r` on `[−1/2, 1/2]`.
    fn exp2_poly<S: Lanes<Self>>(s: S, r: S::V) -> S::V;
    /// `std`'s `exp`, for the lanes above the vector kernel's range.
    fn std_exp(self) -> Self;
    /// `std`'s `exp2`.
    fn std_exp2(self) -> Self;
    /// `a · b + c` rounded once.
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// Runs `k` on the instruction set `isa` (see [`dispatch`]).
    fn dispatch<K: Kernel<Self>>(isa: Isa, k: K) -> K::Output;
}

/// The vector operations of one instruction set on one element type: implemented by the
/// zero-sized tokens ([`Portable`], and on x86-64 `Avx2` and `Avx512`). Holding a token is
/// the proof that its instruction set may run, so the methods are safe except for the raw
/// pointer loads and stores.
///
/// Every method is `#[inline(always)]` in every implementation: inlined into the
/// `#[target_feature]` entry point of [`dispatch`], the intrinsics compile for that
/// instruction set.
pub trait Lanes<E: Element>: Copy + Send + Sync + 'static {
    /// A vector of [`Lanes::LANES`] elements.
    type V: Copy;
    /// Elements per vector.
    const LANES: usize;

    /// Every lane `x`.
    fn splat(self, x: E) -> Self::V;
    /// `LANES` elements from `p`.
    ///
    /// # Safety
    ///
    /// `p` must be valid for reading `LANES` elements (no alignment needed).
    unsafe fn load_ptr(self, p: *const E) -> Self::V;
    /// `LANES` elements to `p`.
    ///
    /// # Safety
    ///
    /// `p` must be valid for writing `LANES` elements (no alignment needed).
    unsafe fn store_ptr(self, p: *mut E, v: Self::V);
    /// `a + b` lane by lane.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a − b`.
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a · b`.
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a · b + c`, rounded once.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `c − a · b`, rounded once.
    fn neg_mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a` where `a > b`, else `b` (so `b` where either is NaN, as x86's `max`).
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// The largest lane.
    fn reduce_max(self, v: Self::V) -> E;
    /// The sum of the lanes (in a fixed order per instruction set).
    fn reduce_sum(self, v: Self::V) -> E;
    /// `2ⁿ` for `k = n + MAGIC` (n an integer held in the low mantissa bits of `k`), built
    /// directly in the exponent field; valid for the normal range of `n`.
    fn pow2_magic(self, k: Self::V) -> Self::V;
    /// `y`, with 0 in the lanes where `x < lo` (NaN lanes keep `y`).
    fn zero_below(self, x: Self::V, lo: E, y: Self::V) -> Self::V;
    /// Whether any lane of `x` is `> hi`.
    fn any_above(self, x: Self::V, hi: E) -> bool;

    /// `LANES` IEEE binary16 values, given by their bits, widened to `E` (exactly: every
    /// binary16 value is an f32).
    ///
    /// # Safety
    ///
    /// `p` must be valid for reading `LANES` `u16`s (no alignment needed).
    unsafe fn load_f16_ptr(self, p: *const u16) -> Self::V;
    /// `LANES` bfloat16 values (the top 16 bits of an f32), given by their bits, widened to
    /// `E` (exactly).
    ///
    /// # Safety
    ///
    /// As for [`Lanes::load_f16_ptr`].
    unsafe fn load_bf16_ptr(self, p: *const u16) -> Self::V;

    /// Hints that the cache line holding `x[0]` will be read soon (a no-op where the
    /// instruction set has no prefetch; never faults).
    #[inline(always)]
    fn prefetch<X>(self, x: &[X]) {
        let _ = x;
    }

    /// The transpose of a `LANES x LANES` block, `dst[i][k] = src[k][i]` for `i, k <
    /// LANES`: `src[k]` points at column k of the block (`LANES` elements), `dst[i]` at row
    /// i. Bits are moved, not computed on. This default moves one element at a time; the
    /// x86 tokens shuffle registers.
    ///
    /// # Safety
    ///
    /// `src` and `dst` hold `LANES` pointers each (checked); every `src[k]` is valid for
    /// reading and every `dst[i]` for writing `LANES` elements; no `dst[i]` range overlaps
    /// another one or any `src[k]` range.
    #[inline(always)]
    unsafe fn transpose_ptr(self, src: &[*const E], dst: &[*mut E]) {
        assert!(src.len() == Self::LANES && dst.len() == Self::LANES);
        for (i, &d) in dst.iter().enumerate() {
            for (k, &x) in src.iter().enumerate() {
                // SAFETY: i, k < LANES, within the ranges the caller guarantees.
                unsafe { *d.add(k) = *x.add(i) };
            }
        }
    }

    /// The first `LANES` elements of `x` (panics if it is shorter: a bug in the caller).
    #[inline(always)]
    fn load(self, x: &[E]) -> Self::V {
        assert!(x.len() >= Self::LANES);
        // SAFETY: `x` holds at least LANES readable elements.
        unsafe { self.load_ptr(x.as_ptr()) }
    }
    /// The first `LANES` elements of `x`, read as `X` is stored (see [`Stored`]).
    #[inline(always)]
    fn load_stored<X: Stored<E>>(self, x: &[X]) -> Self::V {
        X::load(self, x)
    }
    /// Stores into the first `LANES` elements of `x` (panics if it is shorter).
    #[inline(always)]
    fn store(self, x: &mut [E], v: Self::V) {
        assert!(x.len() >= Self::LANES);
        // SAFETY: `x` holds at least LANES writable elements.
        unsafe { self.store_ptr(x.as_mut_ptr(), v) }
    }
    /// The elements of `x` (at most `LANES`, else a panic) in the first lanes, `fill` in the
    /// others: a vector loop's tail, loaded without reading past `x`. This default goes
    /// through a buffer on the stack; AVX-512 uses a masked load.
    #[inline(always)]
    fn load_part(self, x: &[E], fill: E) -> Self::V {
        assert!(x.len() <= Self::LANES && Self::LANES <= MAX_LANES);
        let mut buf = [fill; MAX_LANES];
        buf[..x.len()].copy_from_slice(x);
        self.load(&buf)
    }
    /// The first `x.len()` lanes of `v` (at most `LANES`, else a panic) into `x`, nothing
    /// past it: the store of a vector loop's tail (see [`Lanes::load_part`]).
    #[inline(always)]
    fn store_part(self, x: &mut [E], v: Self::V) {
        assert!(x.len() <= Self::LANES && Self::LANES <= MAX_LANES);
        let mut buf = [E::ZERO; MAX_LANES];
        self.store(&mut buf, v);
        x.copy_from_slice(&buf[..x.len()]);
    }
}

/// How an element stored in memory is read into vectors of `E`: `E` itself, or (with the
/// `half` feature) the half-precision formats `half::f16` and `half::bf16` widened to f32,
/// exactly. What the kernels read K and V through, so that a half-precision cache is read at
/// half the bytes and computed in f32.
pub trait Stored<E: Element>: Copy + Send + Sync + 'static {
    /// The first `LANES` elements of `x`, widened (panics if `x` is shorter).
    fn load<S: Lanes<E>>(s: S, x: &[Self]) -> S::V;
    /// One element, widened.
    fn widen(self) -> E;
}

impl<E: Element> Stored<E> for E {
    #[inline(always)]
    fn load<S: Lanes<E>>(s: S, x: &[E]) -> S::V {
        s.load(x)
    }
    #[inline(always)]
    fn widen(self) -> E {
        self
    }
}

/// The bits of a slice of 16-bit floats (both `half` types are `repr(transparent)` over
/// `u16`), checked to hold `lanes` elements.
#[cfg(feature = "half")]
#[inline(always)]
fn half_bits<H>(x: &[H], lanes: usize) -> *const u16 {
    const { assert!(size_of::<H>() == 2 && align_of::<H>() == 2) };
    assert!(x.len() >= lanes);
    x.as_ptr().cast::<u16>()
}

#[cfg(feature = "half")]
impl Stored<f32> for half::f16 {
    #[inline(always)]
    fn load<S: Lanes<f32>>(s: S, x: &[Self]) -> S::V {
        // SAFETY: `half_bits` checked LANES elements of 2 bytes each; f16 is a transparent
        // u16, so they are LANES readable u16s.
        unsafe { s.load_f16_ptr(half_bits(x, S::LANES)) }
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        portable::f16_to_f32(self.to_bits())
    }
}

#[cfg(feature = "half")]
impl Stored<f32> for half::bf16 {
    #[inline(always)]
    fn load<S: Lanes<f32>>(s: S, x: &[Self]) -> S::V {
        // SAFETY: as for f16.
        unsafe { s.load_bf16_ptr(half_bits(x, S::LANES)) }
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        portable::bf16_to_f32(self.to_bits())
    }
}

/// A vectorised algorithm: a body generic over the instruction set, run by [`dispatch`].
///
/// `run` must be `#[inline(always)]` (and so must everything it calls that uses [`Lanes`]),
/// so that it compiles inside the `#[target_feature]` entry point.
pub trait Kernel<E: Element> {
    /// What the algorithm returns.
    type Output;
    /// The algorithm on the instruction set of `s`.
    fn run<S: Lanes<E>>(self, s: S) -> Self::Output;
}

/// Runs `k` on `isa`: the one place where the instruction set is matched on. The AVX2 and
/// AVX-512 arms enter a `#[target_feature]` function, allowed by the token the arm holds.
#[inline]
pub fn dispatch<E: Element, K: Kernel<E>>(isa: Isa, k: K) -> K::Output {
    E::dispatch(isa, k)
}

/// Asks the cache hierarchy for the lines of `x` ahead of their use (into L2: `prefetcht1`
/// on x86-64, a hint that never faults and changes no value; nothing elsewhere). The tiled
/// pass prefetches a query tile's output segments before its last key block: they are `n`
/// elements apart in the column-major result, a pattern the hardware prefetchers do not
/// follow, and cold by then (measured on an Intel Xeon, n = 2048, d = 128: the tile's final
/// write 0.84-0.92 ms a call without it, 0.36-0.44 with it).
#[inline]
pub fn prefetch<T>(x: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        let bytes = core::mem::size_of_val(x);
        if bytes == 0 {
            return;
        }
        let start = x.as_ptr().cast::<i8>();
        // One hint per 64-byte line, from the line holding the first byte.
        let first = start as usize % 64;
        let mut at = 0;
        while first + bytes > at {
            // SAFETY: `prefetcht1` needs SSE, part of the x86-64 baseline (every x86-64 CPU
            // has it, and the target enables it); the hint never dereferences its address
            // and cannot fault, so an address outside `x` (the start of its first line) is
            // fine, computed with wrapping arithmetic for that reason.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(start.wrapping_sub(first).wrapping_add(at)) };
            at += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// The match behind [`Element::dispatch`], written once for both element types (whose
/// implementations satisfy the bounds concretely).
#[cfg(target_arch = "x86_64")]
#[inline]
fn dispatch_on<E: Element, K: Kernel<E>>(isa: Isa, k: K) -> K::Output
where
    Portable: Lanes<E>,
    Avx2: Lanes<E>,
    Avx512: Lanes<E>,
{
    match isa {
        Isa::Portable => k.run(Portable),
        Isa::Avx2(t) => t.vectorize(k),
        Isa::Avx512(t) => t.vectorize(k),
    }
}

/// The match behind [`Element::dispatch`] where only the portable path exists.
#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn dispatch_on<E: Element, K: Kernel<E>>(isa: Isa, k: K) -> K::Output
where
    Portable: Lanes<E>,
{
    match isa {
        Isa::Portable => k.run(Portable),
    }
}

macro_rules! element {
    ($t:ident, $nr:expr, $magic:expr, $ln2_hi:expr, $ln2_lo:expr, $lo:expr, $lo2:expr,
     $hi:expr, $hi2:expr, $poly:ident, $q:ident, $q2:ident) => {
        impl Element for $t {
            const NR: usize = $nr;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = $t::NEG_INFINITY;
            const MAGIC: Self = $magic;
            const LOG2E: Self = core::$t::consts::LOG2_E;
            const LN2_HI: Self = $ln2_hi;
            const LN2_LO: Self = $ln2_lo;
            const EXP_LO: Self = $lo;
            const EXP2_LO: Self = $lo2;
            const EXP_HI: Self = $hi;
            const EXP2_HI: Self = $hi2;

            #[inline(always)]
            fn exp_poly<S: Lanes<Self>>(s: S, r: S::V) -> S::V {
                exp::$poly(s, r, &exp::$q)
            }
            #[inline(always)]
            fn exp2_poly<S: Lanes<Self>>(s: S, r: S::V) -> S::V {
                exp::$poly(s, r, &exp::$q2)
            }
            // std's functions with std; without it libm's, through nalgebra's `ComplexField`
            // (libm's `fma` is correctly rounded, so `mul_add` gives the same bits either way).
            #[cfg(feature = "std")]
            #[inline(always)]
            fn std_exp(self) -> Self {
                self.exp()
            }
            #[cfg(not(feature = "std"))]
            #[inline(always)]
            fn std_exp(self) -> Self {
                <$t as nalgebra::ComplexField>::exp(self)
            }
            #[cfg(feature = "std")]
            #[inline(always)]
            fn std_exp2(self) -> Self {
                self.exp2()
            }
            #[cfg(not(feature = "std"))]
            #[inline(always)]
            fn std_exp2(self) -> Self {
                <$t as nalgebra::ComplexField>::exp2(self)
            }
            #[cfg(feature = "std")]
            #[inline(always)]
            fn mul_add(self, b: Self, c: Self) -> Self {
                $t::mul_add(self, b, c)
            }
            #[cfg(not(feature = "std"))]
            #[inline(always)]
            fn mul_add(self, b: Self, c: Self) -> Self {
                <$t as nalgebra::ComplexField>::mul_add(self, b, c)
            }
            #[inline]
            fn dispatch<K: Kernel<Self>>(isa: Isa, k: K) -> K::Output {
                dispatch_on(isa, k)
            }
        }
    };
}

// f32: the Cephes split of ln 2 (0.693359375 has 8 trailing zero bits, so n·LN2_HI is exact);
// degree-5 Horner polynomials. f64: fdlibm's split; degree-10 Estrin polynomials.
element!(
    f32,
    32,
    12_582_912.0, // 1.5 · 2²³
    0.693_359_4,
    -2.121_944_4e-4,
    -87.336_55, // ln 2⁻¹²⁶
    -126.0,
    88.0,
    127.0,
    horner,
    EXP_F32_Q,
    EXP2_F32_Q
);
element!(
    f64,
    16,
    6_755_399_441_055_744.0, // 1.5 · 2⁵²
    6.931_471_803_691_238e-1,
    1.908_214_929_270_587_7e-10,
    -708.396_418_532_264_1, // ln 2⁻¹⁰²²
    -1022.0,
    709.0,
    1023.0,
    estrin,
    EXP_F64_Q,
    EXP2_F64_Q
);
