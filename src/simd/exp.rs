//! `eˣ` and `2ˣ` on vectors, written once for every instruction set and both precisions.
//!
//! Algorithm: range reduction `x = n·ln 2 + r` with `n = round(x·log₂e)` and
//! `|r| <= ln 2 / 2` (for `2ˣ`: `x = n + r`, `|r| <= 1/2`), ln 2 split Cody–Waite style
//! ([`Element::LN2_HI`] + [`Element::LN2_LO`]) so that `n·LN2_HI` is exact; then
//! `eʳ ≈ 1 + r·q(r)` with `q` a Chebyshev-interpolated polynomial (f32: degree 5, Horner;
//! f64: degree 10, Estrin-split), and `2ⁿ` built directly in the exponent field. The rounding
//! to an integer is the "magic number" trick: `k = x·log₂e + 1.5·2²³` holds `n` in its low
//! mantissa bits, so no float-to-int conversion is needed.
//!
//! Accuracy (4M-point sweeps when the kernels were written, and the tests below): f32 within
//! 1 ulp of the correctly rounded result (`exp` 0.98 ulp, `exp2` 0.84 ulp), f64 within
//! 2.2e-16 relative of `std`. Every instruction set does the same operations lane for lane
//! (the portable path's fused multiply-add is `mul_add`), so every path gives the same bits.
//!
//! Special values:
//! - inputs below the threshold where the result would be subnormal (`ln 2⁻¹²⁶` ≈ −87.34 for
//!   f32 `exp`, −126 for f32 `exp2`, `ln 2⁻¹⁰²²` ≈ −708.40 and −1022 for f64), and `-inf`,
//!   give `+0` (subnormal results are flushed to zero);
//! - NaN gives NaN;
//! - the vector kernels are valid up to 88 / 127 (f32) and 709 / 1023 (f64); the slice
//!   functions recompute lanes above those bounds with `std` (a rare slow path), so large
//!   inputs overflow to `+inf` as usual. The attention kernel only ever feeds `s − max <= 0`.

use super::{Element, Isa, Kernel, Lanes, MAX_LANES, dispatch};

/// Coefficients of `q(r) = (eʳ − 1) / r` on `[−ln2/2, ln2/2]`, lowest degree first
/// (interpolation error 5.1e-9 relative).
pub const EXP_F32_Q: [f32; 6] = [
    1.0,
    0.5,
    0.166_665_05,
    0.041_666_467,
    0.008_369_149,
    0.001_393_364_2,
];
/// `q(r) = (2ʳ − 1) / r` on `[−1/2, 1/2]` (5.1e-9 relative).
pub const EXP2_F32_Q: [f32; 6] = [
    core::f32::consts::LN_2,
    0.240_226_5,
    0.055_503_57,
    0.009_618_083,
    0.001_339_086_3,
    0.000_154_531_63,
];
/// `q(r) = (eʳ − 1) / r`, degree 10 (8.5e-18 relative).
pub const EXP_F64_Q: [f64; 11] = [
    1.0,
    0.500_000_000_000_000_6,
    0.166_666_666_666_666_7,
    0.041_666_666_666_573_14,
    0.008_333_333_333_326_141,
    0.001_388_888_893_248_859_9,
    0.000_198_412_698_748_004_93,
    2.480_150_434_699_768_6e-5,
    2.755_725_542_574_643_5e-6,
    2.762_635_724_144_722_3e-7,
    2.510_520_637_395_701e-8,
];
/// `q(r) = (2ʳ − 1) / r`, degree 10 (8.5e-18 relative).
pub const EXP2_F64_Q: [f64; 11] = [
    core::f64::consts::LN_2,
    0.240_226_506_959_100_97,
    0.055_504_108_664_821_6,
    0.009_618_129_107_606_888,
    0.001_333_355_814_641_693_6,
    0.000_154_035_304_417_360_5,
    1.525_273_382_983_612e-5,
    1.321_544_258_792_169e-6,
    1.017_806_244_584_577_4e-7,
    7.072_585_949_269_223e-9,
    4.454_960_598_186_518_6e-10,
];

/// `1 + r·q(r)` by Horner's rule (f32, degree 5).
#[inline(always)]
pub fn horner<S: Lanes<f32>>(s: S, r: S::V, c: &[f32; 6]) -> S::V {
    let mut q = s.splat(c[5]);
    for &ci in c[..5].iter().rev() {
        q = s.mul_add(q, r, s.splat(ci));
    }
    s.mul_add(q, r, s.splat(1.0))
}

/// `1 + r·q(r)` with `q = lo(r) + r⁶·hi(r)` to shorten the dependency chain (f64, degree 10).
#[inline(always)]
pub fn estrin<S: Lanes<f64>>(s: S, r: S::V, c: &[f64; 11]) -> S::V {
    let k = |a: f64| s.splat(a);
    let r2 = s.mul(r, r);
    let r4 = s.mul(r2, r2);
    let r6 = s.mul(r4, r2);
    let l01 = s.mul_add(k(c[1]), r, k(c[0]));
    let l23 = s.mul_add(k(c[3]), r, k(c[2]));
    let l45 = s.mul_add(k(c[5]), r, k(c[4]));
    let lo = s.mul_add(s.mul_add(l45, r2, l23), r2, l01);
    let h67 = s.mul_add(k(c[7]), r, k(c[6]));
    let h89 = s.mul_add(k(c[9]), r, k(c[8]));
    let hi = s.mul_add(s.mul_add(k(c[10]), r2, h89), r2, h67);
    let q = s.mul_add(hi, r6, lo);
    s.mul_add(q, r, k(1.0))
}

/// `eˣ` on one vector, valid for `x <= E::EXP_HI`.
#[inline(always)]
pub fn exp<E: Element, S: Lanes<E>>(s: S, x: S::V) -> S::V {
    let magic = s.splat(E::MAGIC);
    let k = s.mul_add(x, s.splat(E::LOG2E), magic);
    let n = s.sub(k, magic);
    let r = s.neg_mul_add(n, s.splat(E::LN2_HI), x);
    let r = s.neg_mul_add(n, s.splat(E::LN2_LO), r);
    let y = s.mul(E::exp_poly(s, r), s.pow2_magic(k));
    s.zero_below(x, E::EXP_LO, y)
}

/// `2ˣ` on one vector, valid for `x <= E::EXP2_HI`.
#[inline(always)]
pub fn exp2<E: Element, S: Lanes<E>>(s: S, x: S::V) -> S::V {
    let magic = s.splat(E::MAGIC);
    let k = s.add(x, magic);
    let r = s.sub(x, s.sub(k, magic));
    let y = s.mul(E::exp2_poly(s, r), s.pow2_magic(k));
    s.zero_below(x, E::EXP2_LO, y)
}

/// `x ← eˣ` (`2ˣ` if `TWO`) over a slice; lanes above the vector range are recomputed with
/// `std`.
struct Slice<'a, E, const TWO: bool> {
    xs: &'a mut [E],
}

/// `eˣ` or `2ˣ`, chosen at compile time (a function pointer would stop the inlining).
#[inline(always)]
fn kern<E: Element, S: Lanes<E>, const TWO: bool>(s: S, x: S::V) -> S::V {
    if TWO { exp2(s, x) } else { exp(s, x) }
}

/// `eˣ` (`2ˣ` if `TWO`) of the first `LANES` elements of `x` as a vector: the vector kernel,
/// and `std` for the rare lanes above its range.
#[inline(always)]
pub(super) fn exp_lanes<E: Element, S: Lanes<E>, const TWO: bool>(s: S, x: &[E]) -> S::V {
    exp_vector::<E, S, TWO>(s, s.load(x))
}

/// [`exp_lanes`] of a vector already in registers.
#[inline(always)]
pub(super) fn exp_vector<E: Element, S: Lanes<E>, const TWO: bool>(s: S, v: S::V) -> S::V {
    let (hi, exact): (E, fn(E) -> E) = if TWO {
        (E::EXP2_HI, E::std_exp2)
    } else {
        (E::EXP_HI, E::std_exp)
    };
    let y = kern::<E, S, TWO>(s, v);
    if !s.any_above(v, hi) {
        return y;
    }
    let (mut out, mut x) = ([E::ZERO; MAX_LANES], [E::ZERO; MAX_LANES]);
    s.store(&mut out, y);
    s.store(&mut x, v);
    for (o, &xi) in out.iter_mut().zip(&x[..S::LANES]) {
        if xi > hi {
            *o = exact(xi);
        }
    }
    s.load(&out)
}

/// [`exp_lanes`] of a vector loop's tail (`x.len() < LANES`), zeros after it: the first
/// `x.len()` lanes are its values.
#[inline(always)]
pub(super) fn exp_lanes_part<E: Element, S: Lanes<E>, const TWO: bool>(s: S, x: &[E]) -> S::V {
    let mut tmp = [E::ZERO; MAX_LANES];
    tmp[..x.len()].copy_from_slice(x);
    exp_lanes::<E, S, TWO>(s, &tmp)
}

impl<E: Element, const TWO: bool> Kernel<E> for Slice<'_, E, TWO> {
    type Output = ();

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) {
        let lanes = S::LANES;
        let mut chunks = self.xs.chunks_exact_mut(lanes);
        for c in &mut chunks {
            let y = exp_lanes::<E, S, TWO>(s, c);
            s.store(c, y);
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let y = exp_lanes_part::<E, S, TWO>(s, rest);
            s.store_part(rest, y);
        }
    }
}

/// `x ← eˣ` for every entry, on the instruction set `isa` (see the module docs for the
/// accuracy and the special values).
pub fn exp_in_place<E: Element>(isa: Isa, xs: &mut [E]) {
    dispatch(isa, Slice::<E, false> { xs });
}

/// `x ← 2ˣ` for every entry, on `isa`.
#[cfg(test)]
pub fn exp2_in_place<E: Element>(isa: Isa, xs: &mut [E]) {
    dispatch(isa, Slice::<E, true> { xs });
}

#[cfg(test)]
mod tests {
    //! Accuracy against `f64` (for f32: in ulps of the correctly rounded value) and against
    //! `std` (for f64), on every instruction set. Sized for the debug profile: a few thousand
    //! points per range, random plus a uniform grid plus the special points of the reduction.

    use super::*;
    use crate::prelude::*;
    use rand::{RngExt, SeedableRng};

    fn points(lo: f64, hi: f64, count: usize) -> Vec<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut v: Vec<f64> = (0..count).map(|_| rng.random_range(lo..hi)).collect();
        v.extend((0..count).map(|i| lo + (hi - lo) * i as f64 / count as f64));
        v.extend([
            0.0,
            -0.0,
            -1e-30,
            1e-30,
            -0.5,
            -0.346_573_59,
            0.346_573_59,
            -1.0,
        ]);
        v.retain(|x| (lo..=hi).contains(x));
        v
    }

    /// Error of `y` against the exact value, in ulps of the f32 nearest to it.
    fn ulps_f32(y: f32, exact: f64) -> f64 {
        let e = exact as f32;
        let ulp = (f32::from_bits(e.to_bits() + 1) - e) as f64;
        (y as f64 - exact).abs() / ulp
    }

    type Exp<E> = fn(Isa, &mut [E]);

    /// Points per accuracy sweep: fewer under Miri, which interprets every operation.
    const SWEEP: usize = if cfg!(miri) { 64 } else { 3000 };

    fn worst_f32(f: Exp<f32>, exact: fn(f64) -> f64, lo: f64, hi: f64, flush: f32) {
        for isa in Isa::available() {
            let xs: Vec<f32> = points(lo, hi, SWEEP).iter().map(|&x| x as f32).collect();
            let mut ys = xs.clone();
            f(isa, &mut ys);
            for (&x, &y) in xs.iter().zip(&ys) {
                if x < flush {
                    assert_eq!(y, 0.0, "flush at {x}");
                } else {
                    let e = ulps_f32(y, exact(x as f64));
                    assert!(e <= 1.0, "{isa:?} x={x}: {e} ulp");
                }
            }
        }
    }

    fn worst_f64(f: Exp<f64>, exact: fn(f64) -> f64, lo: f64, hi: f64, flush: f64) {
        for isa in Isa::available() {
            let xs = points(lo, hi, SWEEP);
            let mut ys = xs.clone();
            f(isa, &mut ys);
            for (&x, &y) in xs.iter().zip(&ys) {
                if x < flush {
                    assert_eq!(y, 0.0, "flush at {x}");
                } else {
                    let r = exact(x);
                    assert!(((y - r) / r).abs() <= 4.5e-16, "{isa:?} x={x}: {y} vs {r}");
                }
            }
        }
    }

    #[test]
    fn exp_f32_within_one_ulp() {
        for (lo, hi) in [(-87.0, 0.0), (-700.0, 0.0), (-1.0, 1.0), (0.0, 88.7)] {
            worst_f32(exp_in_place, f64::exp, lo, hi, f32::EXP_LO);
        }
    }

    #[test]
    fn exp2_f32_within_one_ulp() {
        for (lo, hi) in [(-126.0, 0.0), (-1000.0, 0.0), (-1.0, 1.0), (0.0, 127.9)] {
            worst_f32(exp2_in_place, f64::exp2, lo, hi, f32::EXP2_LO);
        }
    }

    #[test]
    fn exp_f64_matches_std() {
        for (lo, hi) in [(-700.0, 0.0), (-1.0, 1.0), (-750.0, 709.7)] {
            worst_f64(exp_in_place, f64::exp, lo, hi, f64::EXP_LO);
        }
    }

    #[test]
    fn exp2_f64_matches_std() {
        for (lo, hi) in [(-1022.0, 0.0), (-1.0, 1.0), (-1100.0, 1023.9)] {
            worst_f64(exp2_in_place, f64::exp2, lo, hi, f64::EXP2_LO);
        }
    }

    /// Every instruction set does the same operations lane for lane, so every one gives the
    /// portable path's bits, for every length (the tails take another code path) and for the
    /// special values.
    fn same_bits<E: Element + Into<f64>>(of: fn(f64) -> E, bits: fn(E) -> u64) {
        let all = Isa::available();
        for len in [0, 1, 3, 7, 15, 16, 17, 33, 400] {
            let x: Vec<E> = points(-1100.0, 1100.0, 200)
                .into_iter()
                .chain([f64::NAN, f64::NEG_INFINITY, f64::INFINITY, -87.5, 88.5])
                .map(of)
                .cycle()
                .take(len)
                .collect();
            for f in [exp_in_place as Exp<E>, exp2_in_place] {
                let mut want = x.clone();
                f(Isa::Portable, &mut want);
                for &isa in &all {
                    let mut y = x.clone();
                    f(isa, &mut y);
                    for ((a, b), xi) in y.iter().zip(&want).zip(&x) {
                        let xi: f64 = (*xi).into();
                        assert_eq!(bits(*a), bits(*b), "{isa:?} x = {xi}: {a:?} vs {b:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        same_bits::<f32>(|x| x as f32, |y| y.to_bits() as u64);
        same_bits::<f64>(|x| x, f64::to_bits);
    }

    #[test]
    fn special_values() {
        for isa in Isa::available() {
            let mut a = [
                f32::NEG_INFINITY,
                -1e30,
                -88.0,
                -87.0,
                0.0,
                f32::NAN,
                100.0,
                f32::INFINITY,
                88.5,
            ];
            exp_in_place(isa, &mut a);
            assert_eq!(&a[..3], &[0.0, 0.0, 0.0]);
            assert!(a[3] > 0.0 && a[4] == 1.0 && a[5].is_nan());
            assert_eq!(a[6], f32::INFINITY);
            assert_eq!(a[7], f32::INFINITY);
            assert_eq!(a[8], 88.5f32.exp());
            let mut b = [
                f64::NEG_INFINITY,
                -1e300,
                -709.0,
                -700.0,
                0.0,
                f64::NAN,
                800.0,
            ];
            exp_in_place(isa, &mut b);
            assert_eq!(&b[..3], &[0.0, 0.0, 0.0]);
            assert!(b[3] > 0.0 && b[4] == 1.0 && b[5].is_nan() && b[6] == f64::INFINITY);
            // Exact powers of two, in the chunked part and in the tail.
            let mut c = [
                f32::NEG_INFINITY,
                -127.0,
                -3.0,
                0.0,
                5.0,
                1.0,
                -1.0,
                2.0,
                3.0,
                -2.0,
            ];
            exp2_in_place(isa, &mut c);
            assert_eq!(c, [0.0, 0.0, 0.125, 1.0, 32.0, 2.0, 0.5, 4.0, 8.0, 0.25]);
            let mut d = [f64::NEG_INFINITY, -1023.0, -3.0, 0.0, 5.0, 1.0, -1.0];
            exp2_in_place(isa, &mut d);
            assert_eq!(d, [0.0, 0.0, 0.125, 1.0, 32.0, 2.0, 0.5]);
        }
    }
}
