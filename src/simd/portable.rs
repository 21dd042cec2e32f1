//! The portable token: the vector operations on plain arrays, for any target. Eight f32 or
//! four f64 lanes (as AVX2), with `mul_add` as the fused multiply-add, so this path rounds
//! exactly as the vector paths do, lane for lane; compilers vectorise the loops for the
//! baseline target. (On an x86-64 CPU without FMA, `mul_add` is computed in software: correct,
//! but slow.)

use super::{Element, Lanes};

/// The portable instruction set: available everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Portable;

macro_rules! portable_lanes {
    ($t:ident, $n:literal, $bits:ident, $ibits:ident, $mant:literal, $bias:literal) => {
        impl Lanes<$t> for Portable {
            type V = [$t; $n];
            const LANES: usize = $n;

            #[inline(always)]
            fn splat(self, x: $t) -> Self::V {
                [x; $n]
            }
            #[inline(always)]
            unsafe fn load_ptr(self, p: *const $t) -> Self::V {
                // SAFETY: the caller guarantees $n readable elements at `p`.
                unsafe { core::ptr::read_unaligned(p.cast::<[$t; $n]>()) }
            }
            #[inline(always)]
            unsafe fn store_ptr(self, p: *mut $t, v: Self::V) {
                // SAFETY: the caller guarantees $n writable elements at `p`.
                unsafe { core::ptr::write_unaligned(p.cast::<[$t; $n]>(), v) }
            }
            #[inline(always)]
            fn add(self, a: Self::V, b: Self::V) -> Self::V {
                core::array::from_fn(|i| a[i] + b[i])
            }
            #[inline(always)]
            fn sub(self, a: Self::V, b: Self::V) -> Self::V {
                core::array::from_fn(|i| a[i] - b[i])
            }
            #[inline(always)]
            fn mul(self, a: Self::V, b: Self::V) -> Self::V {
                core::array::from_fn(|i| a[i] * b[i])
            }
            #[inline(always)]
            fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
                core::array::from_fn(|i| Element::mul_add(a[i], b[i], c[i]))
            }
            #[inline(always)]
            fn neg_mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
                core::array::from_fn(|i| Element::mul_add(-a[i], b[i], c[i]))
            }
            #[inline(always)]
            fn max(self, a: Self::V, b: Self::V) -> Self::V {
                core::array::from_fn(|i| if a[i] > b[i] { a[i] } else { b[i] })
            }
            #[inline(always)]
            fn reduce_max(self, v: Self::V) -> $t {
                v[1..].iter().fold(v[0], |m, &x| if x > m { x } else { m })
            }
            #[inline(always)]
            fn reduce_sum(self, v: Self::V) -> $t {
                // Pairwise, as the AVX2 reductions: halves, then quarters, then the last two.
                let mut w = v;
                let mut len = $n;
                while len > 1 {
                    len /= 2;
                    for i in 0..len {
                        w[i] += w[i + len];
                    }
                }
                w[0]
            }
            #[inline(always)]
            fn pow2_magic(self, k: Self::V) -> Self::V {
                let magic = <$t as Element>::MAGIC.to_bits() as $ibits;
                core::array::from_fn(|i| {
                    let n = (k[i].to_bits() as $ibits).wrapping_sub(magic);
                    $t::from_bits((n.wrapping_add($bias) << $mant) as $bits)
                })
            }
            #[inline(always)]
            fn zero_below(self, x: Self::V, lo: $t, y: Self::V) -> Self::V {
                core::array::from_fn(|i| if x[i] < lo { 0.0 } else { y[i] })
            }
            #[inline(always)]
            fn any_above(self, x: Self::V, hi: $t) -> bool {
                x.iter().any(|&v| v > hi)
            }
        }
    };
}

portable_lanes!(f32, 8, u32, i32, 23, 127);
portable_lanes!(f64, 4, u64, i64, 52, 1023);
