//! The portable token: the vector operations on plain arrays, for any target. Eight f32 or
//! four f64 lanes (as AVX2), with `mul_add` as the fused multiply-add, so this path rounds
//! exactly as the vector paths do, lane for lane; compilers vectorise the loops for the
//! baseline target. (On an x86-64 CPU without FMA, `mul_add` is computed in software: correct,
//! but slow.)

use super::{Element, Lanes};

/// The portable instruction set: available everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Portable;

/// An IEEE binary16 value, given by its bits, as f32: exact (normal, subnormal, ±0, ±inf;
/// a NaN stays a NaN of the same sign, its payload shifted into the top of f32's, quieted as
/// the x86 conversion does).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    match exp {
        0 => {
            // ±0 and subnormals: man · 2^−24, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000);
            if sign != 0 { -v } else { v }
        }
        0x1f if man == 0 => f32::from_bits(sign | 0x7f80_0000),
        0x1f => f32::from_bits(sign | 0x7fc0_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// A bfloat16 value, given by its bits, as f32: the same bits in the top half, exact.
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

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
            unsafe fn load_f16_ptr(self, p: *const u16) -> Self::V {
                // SAFETY: the caller guarantees $n readable u16s at `p`.
                let h = unsafe { core::ptr::read_unaligned(p.cast::<[u16; $n]>()) };
                core::array::from_fn(|i| f16_to_f32(h[i]) as $t)
            }
            #[inline(always)]
            unsafe fn load_bf16_ptr(self, p: *const u16) -> Self::V {
                // SAFETY: the caller guarantees $n readable u16s at `p`.
                let h = unsafe { core::ptr::read_unaligned(p.cast::<[u16; $n]>()) };
                core::array::from_fn(|i| bf16_to_f32(h[i]) as $t)
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

#[cfg(test)]
mod tests {
    use super::{bf16_to_f32, f16_to_f32};
    use crate::prelude::*;
    use crate::simd::{Isa, Lanes};

    /// Every binary16 bit pattern against the format's definition, in f64:
    /// `(−1)^s · 2^(e − 15) · (1 + f/1024)`, or `2^−14 · f/1024` for e = 0.
    #[test]
    fn f16_widens_exactly() {
        for h in 0..=u16::MAX {
            let (s, e, f) = (h >> 15, (h >> 10) & 0x1f, h & 0x3ff);
            let sign: f64 = if s == 1 { -1.0 } else { 1.0 };
            let x = f16_to_f32(h);
            if e == 0x1f {
                if f == 0 {
                    assert_eq!(f64::from(x), sign * f64::INFINITY, "{h:#x}");
                } else {
                    assert!(x.is_nan() && x.is_sign_negative() == (s == 1), "{h:#x}");
                }
                continue;
            }
            let want = if e == 0 {
                sign * 2f64.powi(-14) * f64::from(f) / 1024.0
            } else {
                sign * 2f64.powi(i32::from(e) - 15) * (1.0 + f64::from(f) / 1024.0)
            };
            assert_eq!(f64::from(x), want, "{h:#x}");
            assert_eq!(x.is_sign_negative(), s == 1, "{h:#x}");
        }
    }

    #[test]
    fn bf16_is_the_top_half_of_an_f32() {
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0xc000), -2.0);
        assert_eq!(bf16_to_f32(0x7f80), f32::INFINITY);
        assert_eq!(bf16_to_f32(0x0001), f32::from_bits(0x0001_0000)); // a subnormal
    }

    /// The vector loads of every instruction set give the portable bits, for f32 and f64
    /// lanes, over every non-NaN pattern of both formats (NaNs: NaN of the same sign).
    #[test]
    fn every_instruction_set_widens_the_same() {
        fn check<E: crate::simd::Element + Into<f64>, S: Lanes<E>>(s: S, bits: &[u16]) {
            let l = S::LANES;
            for chunk in bits.chunks_exact(l) {
                for (load, scalar) in [
                    (
                        // SAFETY: `chunk` holds LANES u16s.
                        unsafe { s.load_f16_ptr(chunk.as_ptr()) },
                        f16_to_f32 as fn(u16) -> f32,
                    ),
                    (unsafe { s.load_bf16_ptr(chunk.as_ptr()) }, bf16_to_f32),
                ] {
                    let mut out = vec![E::ZERO; l];
                    s.store(&mut out, load);
                    for (&h, &y) in chunk.iter().zip(&out) {
                        let (want, got) = (f64::from(scalar(h)), y.into());
                        if want.is_nan() {
                            assert!(
                                got.is_nan() && got.is_sign_negative() == want.is_sign_negative()
                            );
                        } else {
                            assert_eq!(got.to_bits(), want.to_bits(), "{h:#x}");
                        }
                    }
                }
            }
        }
        // Under Miri (three orders of magnitude slower) a stride through the patterns plus the
        // special ones: zeros, the smallest subnormals, the largest finite values, infinities
        // and NaNs of both formats.
        let bits: Vec<u16> = if cfg!(miri) {
            (0..=u16::MAX)
                .step_by(257)
                .chain([
                    0x0001, 0x8001, 0x03ff, 0x7bff, 0x7c00, 0xfc00, 0x7e00, 0x7f7f, 0x7f80,
                ])
                .collect()
        } else {
            (0..=u16::MAX).collect()
        };
        for isa in Isa::available() {
            struct K<'a>(&'a [u16]);
            impl crate::simd::Kernel<f32> for K<'_> {
                type Output = ();
                #[inline(always)]
                fn run<S: Lanes<f32>>(self, s: S) {
                    check::<f32, S>(s, self.0)
                }
            }
            impl crate::simd::Kernel<f64> for K<'_> {
                type Output = ();
                #[inline(always)]
                fn run<S: Lanes<f64>>(self, s: S) {
                    check::<f64, S>(s, self.0)
                }
            }
            crate::simd::dispatch::<f32, _>(isa, K(&bits));
            crate::simd::dispatch::<f64, _>(isa, K(&bits));
        }
    }
}
