//! The x86-64 tokens and their vector types: AVX2 + FMA on ymm registers (8 f32, 4 f64) and
//! AVX-512F on zmm registers (16 f32, 8 f64).
//!
//! A token's field is private to this module and its only constructor runs the CPU's feature
//! detection, so holding one proves the features; that proof is what every `unsafe` block
//! below relies on. Without the `std` feature the detection is the build's compile-time
//! target features (a binary built with them enabled requires them of every CPU it runs on).

use super::{Element, Kernel, Lanes};
use core::arch::x86_64::*;

/// Whether this CPU has every one of the target features named: detected at run time with the
/// `std` feature; without it (core has no detection) whether the build enables them all at
/// compile time (`-C target-cpu=...` or `-C target-feature=...`), which every CPU the build
/// runs on then has.
macro_rules! has {
    ($($f:tt),+) => {{
        #[cfg(feature = "std")]
        let on = $(std::arch::is_x86_feature_detected!($f))&&+;
        #[cfg(not(feature = "std"))]
        let on = cfg!(all($(target_feature = $f),+));
        on
    }};
}

/// Proof that this CPU has AVX2, FMA and F16C (every AVX2 CPU has F16C; all three are
/// checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Avx2 {
    _proof: (),
}

/// Proof that this CPU has AVX-512F, AVX2, FMA and F16C.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Avx512 {
    _proof: (),
}

impl Avx2 {
    /// The token, if the CPU has AVX2, FMA and F16C.
    pub fn detect() -> Option<Self> {
        has!("avx2", "fma", "f16c").then_some(Avx2 { _proof: () })
    }

    /// Runs `k` compiled for AVX2 + FMA + F16C.
    #[inline]
    pub fn vectorize<E: Element, K: Kernel<E>>(self, k: K) -> K::Output
    where
        Self: Lanes<E>,
    {
        #[target_feature(enable = "avx2,fma,f16c")]
        fn entry<E: Element, K: Kernel<E>>(t: Avx2, k: K) -> K::Output
        where
            Avx2: Lanes<E>,
        {
            k.run(t)
        }
        // SAFETY: `self` exists, so detection saw AVX2, FMA and F16C on this CPU (without std:
        // the build enables them, so every CPU it runs on has them).
        unsafe { entry(self, k) }
    }
}

impl Avx512 {
    /// The token, if the CPU has AVX-512F (with AVX2, FMA and F16C, which every such CPU has;
    /// all four are checked).
    pub fn detect() -> Option<Self> {
        has!("avx512f", "avx2", "fma", "f16c").then_some(Avx512 { _proof: () })
    }

    /// The AVX2 token: every AVX-512 CPU has AVX2, FMA and F16C (checked in
    /// [`Avx512::detect`]).
    pub fn avx2(self) -> Avx2 {
        Avx2 { _proof: () }
    }

    /// Runs `k` compiled for AVX-512F.
    #[inline]
    pub fn vectorize<E: Element, K: Kernel<E>>(self, k: K) -> K::Output
    where
        Self: Lanes<E>,
    {
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        fn entry<E: Element, K: Kernel<E>>(t: Avx512, k: K) -> K::Output
        where
            Avx512: Lanes<E>,
        {
            k.run(t)
        }
        // SAFETY: `self` exists, so detection saw AVX-512F, AVX2, FMA and F16C on this CPU
        // (without std: the build enables them, so every CPU it runs on has them).
        unsafe { entry(self, k) }
    }
}

/// The methods shared by the four implementations, from the intrinsics' names. Each body is
/// one intrinsic call in an `unsafe` block whose safety is the token (`self`).
macro_rules! lanes {
    (
        $tok:ident, $t:ident, $v:ident, $n:literal, $feat:literal,
        set1: $set1:ident, loadu: $loadu:ident, storeu: $storeu:ident,
        add: $add:ident, sub: $sub:ident, mul: $mul:ident, fmadd: $fmadd:ident,
        fnmadd: $fnmadd:ident, max: $max:ident,
        { $($rest:tt)* }
    ) => {
        impl Lanes<$t> for $tok {
            type V = $v;
            const LANES: usize = $n;

            #[inline(always)]
            fn splat(self, x: $t) -> $v {
                // SAFETY: the token proves the CPU has the instruction set.
                unsafe { $set1(x) }
            }
            #[inline(always)]
            unsafe fn load_ptr(self, p: *const $t) -> $v {
                // SAFETY: the caller guarantees LANES readable elements at `p`; the token
                // proves the instruction set.
                unsafe { $loadu(p) }
            }
            #[inline(always)]
            unsafe fn store_ptr(self, p: *mut $t, v: $v) {
                // SAFETY: as in `load_ptr`, for writing.
                unsafe { $storeu(p, v) }
            }
            #[inline(always)]
            fn add(self, a: $v, b: $v) -> $v {
                // SAFETY: the token proves the instruction set.
                unsafe { $add(a, b) }
            }
            #[inline(always)]
            fn sub(self, a: $v, b: $v) -> $v {
                // SAFETY: the token proves the instruction set.
                unsafe { $sub(a, b) }
            }
            #[inline(always)]
            fn mul(self, a: $v, b: $v) -> $v {
                // SAFETY: the token proves the instruction set.
                unsafe { $mul(a, b) }
            }
            #[inline(always)]
            fn mul_add(self, a: $v, b: $v, c: $v) -> $v {
                // SAFETY: the token proves the instruction set.
                unsafe { $fmadd(a, b, c) }
            }
            #[inline(always)]
            fn neg_mul_add(self, a: $v, b: $v, c: $v) -> $v {
                // SAFETY: the token proves the instruction set.
                unsafe { $fnmadd(a, b, c) }
            }
            #[inline(always)]
            fn max(self, a: $v, b: $v) -> $v {
                // SAFETY: the token proves the instruction set.
                unsafe { $max(a, b) }
            }
            #[inline(always)]
            fn prefetch<X>(self, x: &[X]) {
                if let Some(first) = x.first() {
                    // SAFETY: a prefetch reads nothing architecturally and never faults; the
                    // pointer comes from a live slice.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>((first as *const X).cast::<i8>()) }
                }
            }
            $($rest)*
        }
    };
}

lanes!(Avx2, f32, __m256, 8, "avx2,fma",
    set1: _mm256_set1_ps, loadu: _mm256_loadu_ps, storeu: _mm256_storeu_ps,
    add: _mm256_add_ps, sub: _mm256_sub_ps, mul: _mm256_mul_ps, fmadd: _mm256_fmadd_ps,
    fnmadd: _mm256_fnmadd_ps, max: _mm256_max_ps,
    {
        #[inline(always)]
        unsafe fn transpose_ptr(self, src: &[*const f32], dst: &[*mut f32]) {
            assert!(src.len() == 8 && dst.len() == 8);
            // SAFETY: the caller guarantees 8 readable floats at every src[k] and 8 writable
            // at every dst[i], not overlapping; the token proves AVX2.
            unsafe {
                let a0 = _mm256_loadu_ps(src[0]);
                let a1 = _mm256_loadu_ps(src[1]);
                let a2 = _mm256_loadu_ps(src[2]);
                let a3 = _mm256_loadu_ps(src[3]);
                let a4 = _mm256_loadu_ps(src[4]);
                let a5 = _mm256_loadu_ps(src[5]);
                let a6 = _mm256_loadu_ps(src[6]);
                let a7 = _mm256_loadu_ps(src[7]);
                // Pairs: t0 = a0[0] a1[0] a0[1] a1[1] | a0[4] a1[4] a0[5] a1[5], t1 the
                // same for lanes 2, 3 | 6, 7; and so on for (a2, a3), (a4, a5), (a6, a7).
                let t0 = _mm256_unpacklo_ps(a0, a1);
                let t1 = _mm256_unpackhi_ps(a0, a1);
                let t2 = _mm256_unpacklo_ps(a2, a3);
                let t3 = _mm256_unpackhi_ps(a2, a3);
                let t4 = _mm256_unpacklo_ps(a4, a5);
                let t5 = _mm256_unpackhi_ps(a4, a5);
                let t6 = _mm256_unpacklo_ps(a6, a7);
                let t7 = _mm256_unpackhi_ps(a6, a7);
                // Quads: u0 = a0..a3 of lane 0 | of lane 4, u1 of lanes 1 | 5, u2 of 2 | 6,
                // u3 of 3 | 7; u4..u7 the same for a4..a7.
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                // Rows: the low halves give lanes 0..3, the high halves lanes 4..7.
                _mm256_storeu_ps(dst[0], _mm256_permute2f128_ps::<0x20>(u0, u4));
                _mm256_storeu_ps(dst[1], _mm256_permute2f128_ps::<0x20>(u1, u5));
                _mm256_storeu_ps(dst[2], _mm256_permute2f128_ps::<0x20>(u2, u6));
                _mm256_storeu_ps(dst[3], _mm256_permute2f128_ps::<0x20>(u3, u7));
                _mm256_storeu_ps(dst[4], _mm256_permute2f128_ps::<0x31>(u0, u4));
                _mm256_storeu_ps(dst[5], _mm256_permute2f128_ps::<0x31>(u1, u5));
                _mm256_storeu_ps(dst[6], _mm256_permute2f128_ps::<0x31>(u2, u6));
                _mm256_storeu_ps(dst[7], _mm256_permute2f128_ps::<0x31>(u3, u7));
            }
        }
        #[inline(always)]
        unsafe fn load_f16_ptr(self, p: *const u16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable u16s; the token proves F16C.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
        #[inline(always)]
        unsafe fn load_bf16_ptr(self, p: *const u16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable u16s; the token proves AVX2.
            unsafe {
                let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
            }
        }
        #[inline(always)]
        fn reduce_max(self, x: __m256) -> f32 {
            // SAFETY: the token proves AVX2.
            unsafe {
                let m4 = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
                let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)))
            }
        }
        #[inline(always)]
        fn reduce_sum(self, x: __m256) -> f32 {
            // SAFETY: the token proves AVX2.
            unsafe {
                let s4 = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
            }
        }
        #[inline(always)]
        fn pow2_magic(self, k: __m256) -> __m256 {
            let bias = 127 - <f32 as Element>::MAGIC.to_bits() as i32;
            // SAFETY: the token proves AVX2.
            unsafe {
                let e = _mm256_add_epi32(_mm256_castps_si256(k), _mm256_set1_epi32(bias));
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e))
            }
        }
        #[inline(always)]
        fn zero_below(self, x: __m256, lo: f32, y: __m256) -> __m256 {
            // SAFETY: the token proves AVX2.
            unsafe { _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(lo)), y) }
        }
        #[inline(always)]
        fn any_above(self, x: __m256, hi: f32) -> bool {
            // SAFETY: the token proves AVX2.
            unsafe { _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(hi))) != 0 }
        }
        #[inline(always)]
        fn load_part(self, x: &[f32], fill: f32) -> __m256 {
            assert!(x.len() <= 8);
            // SAFETY: the token proves AVX2. The mask enables lanes i < x.len() only, and a
            // masked load reads (and can fault on) no disabled lane.
            unsafe {
                let on = avx2_mask32(self, x.len());
                let v = _mm256_maskload_ps(x.as_ptr(), on);
                _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(on))
            }
        }
        #[inline(always)]
        fn store_part(self, x: &mut [f32], v: __m256) {
            assert!(x.len() <= 8);
            // SAFETY: as in `load_part`, for writing: no disabled lane is written.
            unsafe { _mm256_maskstore_ps(x.as_mut_ptr(), avx2_mask32(self, x.len()), v) }
        }
    }
);

lanes!(Avx2, f64, __m256d, 4, "avx2,fma",
    set1: _mm256_set1_pd, loadu: _mm256_loadu_pd, storeu: _mm256_storeu_pd,
    add: _mm256_add_pd, sub: _mm256_sub_pd, mul: _mm256_mul_pd, fmadd: _mm256_fmadd_pd,
    fnmadd: _mm256_fnmadd_pd, max: _mm256_max_pd,
    {
        #[inline(always)]
        unsafe fn transpose_ptr(self, src: &[*const f64], dst: &[*mut f64]) {
            assert!(src.len() == 4 && dst.len() == 4);
            // SAFETY: the caller guarantees 4 readable doubles at every src[k] and 4 writable
            // at every dst[i], not overlapping; the token proves AVX2.
            unsafe {
                let a0 = _mm256_loadu_pd(src[0]);
                let a1 = _mm256_loadu_pd(src[1]);
                let a2 = _mm256_loadu_pd(src[2]);
                let a3 = _mm256_loadu_pd(src[3]);
                // t0 = a0[0] a1[0] | a0[2] a1[2], t1 = a0[1] a1[1] | a0[3] a1[3]; t2, t3
                // the same for (a2, a3).
                let t0 = _mm256_unpacklo_pd(a0, a1);
                let t1 = _mm256_unpackhi_pd(a0, a1);
                let t2 = _mm256_unpacklo_pd(a2, a3);
                let t3 = _mm256_unpackhi_pd(a2, a3);
                _mm256_storeu_pd(dst[0], _mm256_permute2f128_pd::<0x20>(t0, t2));
                _mm256_storeu_pd(dst[1], _mm256_permute2f128_pd::<0x20>(t1, t3));
                _mm256_storeu_pd(dst[2], _mm256_permute2f128_pd::<0x31>(t0, t2));
                _mm256_storeu_pd(dst[3], _mm256_permute2f128_pd::<0x31>(t1, t3));
            }
        }
        #[inline(always)]
        unsafe fn load_f16_ptr(self, p: *const u16) -> __m256d {
            // SAFETY: the caller guarantees 4 readable u16s (8 bytes); the token proves F16C.
            unsafe { _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(p.cast()))) }
        }
        #[inline(always)]
        unsafe fn load_bf16_ptr(self, p: *const u16) -> __m256d {
            // SAFETY: the caller guarantees 4 readable u16s (8 bytes); the token proves AVX2.
            unsafe {
                let w = _mm_cvtepu16_epi32(_mm_loadl_epi64(p.cast()));
                _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32::<16>(w)))
            }
        }
        #[inline(always)]
        fn reduce_max(self, x: __m256d) -> f64 {
            // SAFETY: the token proves AVX2.
            unsafe {
                let m2 = _mm_max_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd::<1>(x));
                _mm_cvtsd_f64(_mm_max_sd(m2, _mm_unpackhi_pd(m2, m2)))
            }
        }
        #[inline(always)]
        fn reduce_sum(self, x: __m256d) -> f64 {
            // SAFETY: the token proves AVX2.
            unsafe {
                let s2 = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd::<1>(x));
                _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)))
            }
        }
        #[inline(always)]
        fn pow2_magic(self, k: __m256d) -> __m256d {
            let bias = 1023i64.wrapping_sub(<f64 as Element>::MAGIC.to_bits() as i64);
            // SAFETY: the token proves AVX2.
            unsafe {
                let e = _mm256_add_epi64(_mm256_castpd_si256(k), _mm256_set1_epi64x(bias));
                _mm256_castsi256_pd(_mm256_slli_epi64::<52>(e))
            }
        }
        #[inline(always)]
        fn zero_below(self, x: __m256d, lo: f64, y: __m256d) -> __m256d {
            // SAFETY: the token proves AVX2.
            unsafe { _mm256_andnot_pd(_mm256_cmp_pd::<_CMP_LT_OQ>(x, _mm256_set1_pd(lo)), y) }
        }
        #[inline(always)]
        fn any_above(self, x: __m256d, hi: f64) -> bool {
            // SAFETY: the token proves AVX2.
            unsafe { _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(x, _mm256_set1_pd(hi))) != 0 }
        }
        #[inline(always)]
        fn load_part(self, x: &[f64], fill: f64) -> __m256d {
            assert!(x.len() <= 4);
            // SAFETY: the token proves AVX2. The mask enables lanes i < x.len() only, and a
            // masked load reads (and can fault on) no disabled lane.
            unsafe {
                let on = avx2_mask64(self, x.len());
                let v = _mm256_maskload_pd(x.as_ptr(), on);
                _mm256_blendv_pd(_mm256_set1_pd(fill), v, _mm256_castsi256_pd(on))
            }
        }
        #[inline(always)]
        fn store_part(self, x: &mut [f64], v: __m256d) {
            assert!(x.len() <= 4);
            // SAFETY: as in `load_part`, for writing: no disabled lane is written.
            unsafe { _mm256_maskstore_pd(x.as_mut_ptr(), avx2_mask64(self, x.len()), v) }
        }
    }
);

lanes!(Avx512, f32, __m512, 16, "avx512f",
    set1: _mm512_set1_ps, loadu: _mm512_loadu_ps, storeu: _mm512_storeu_ps,
    add: _mm512_add_ps, sub: _mm512_sub_ps, mul: _mm512_mul_ps, fmadd: _mm512_fmadd_ps,
    fnmadd: _mm512_fnmadd_ps, max: _mm512_max_ps,
    {
        #[inline(always)]
        unsafe fn transpose_ptr(self, src: &[*const f32], dst: &[*mut f32]) {
            assert!(src.len() == 16 && dst.len() == 16);
            // SAFETY: the caller's contract, for this block's lanes; AVX2's blocks divide it
            // (every AVX-512 CPU has AVX2, checked at detection).
            unsafe { super::transpose_by_blocks(self.avx2(), src, dst) }
        }
        #[inline(always)]
        unsafe fn load_f16_ptr(self, p: *const u16) -> __m512 {
            // SAFETY: the caller guarantees 16 readable u16s; the token proves AVX-512F.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
        }
        #[inline(always)]
        unsafe fn load_bf16_ptr(self, p: *const u16) -> __m512 {
            // SAFETY: the caller guarantees 16 readable u16s; the token proves AVX-512F.
            unsafe {
                let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
            }
        }
        #[inline(always)]
        fn reduce_max(self, x: __m512) -> f32 {
            // SAFETY: the token proves AVX-512F (and AVX2 for the 256-bit half).
            let (lo, hi) = unsafe {
                (
                    _mm512_castps512_ps256(x),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x))),
                )
            };
            let h = self.avx2();
            <Avx2 as Lanes<f32>>::reduce_max(h, Lanes::<f32>::max(h, lo, hi))
        }
        #[inline(always)]
        fn reduce_sum(self, x: __m512) -> f32 {
            // SAFETY: the token proves AVX-512F (and AVX2 for the 256-bit half).
            let (lo, hi) = unsafe {
                (
                    _mm512_castps512_ps256(x),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x))),
                )
            };
            let h = self.avx2();
            <Avx2 as Lanes<f32>>::reduce_sum(h, Lanes::<f32>::add(h, lo, hi))
        }
        #[inline(always)]
        fn pow2_magic(self, k: __m512) -> __m512 {
            let bias = 127 - <f32 as Element>::MAGIC.to_bits() as i32;
            // SAFETY: the token proves AVX-512F.
            unsafe {
                let e = _mm512_add_epi32(_mm512_castps_si512(k), _mm512_set1_epi32(bias));
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
            }
        }
        #[inline(always)]
        fn zero_below(self, x: __m512, lo: f32, y: __m512) -> __m512 {
            // SAFETY: the token proves AVX-512F. Keep lanes that are not below `lo` (the
            // unordered "not less than" keeps NaN).
            unsafe {
                let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(lo));
                _mm512_maskz_mov_ps(keep, y)
            }
        }
        #[inline(always)]
        fn any_above(self, x: __m512, hi: f32) -> bool {
            // SAFETY: the token proves AVX-512F.
            unsafe { _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(hi)) != 0 }
        }
        #[inline(always)]
        fn load_part(self, x: &[f32], fill: f32) -> __m512 {
            assert!(x.len() <= 16);
            let on = ((1u32 << x.len()) - 1) as __mmask16;
            // SAFETY: the token proves AVX-512F. The mask enables lanes i < x.len() only, and
            // a masked load reads (and can fault on) no disabled lane.
            unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(fill), on, x.as_ptr()) }
        }
        #[inline(always)]
        fn store_part(self, x: &mut [f32], v: __m512) {
            assert!(x.len() <= 16);
            let on = ((1u32 << x.len()) - 1) as __mmask16;
            // SAFETY: as in `load_part`, for writing: no disabled lane is written.
            unsafe { _mm512_mask_storeu_ps(x.as_mut_ptr(), on, v) }
        }
    }
);

lanes!(Avx512, f64, __m512d, 8, "avx512f",
    set1: _mm512_set1_pd, loadu: _mm512_loadu_pd, storeu: _mm512_storeu_pd,
    add: _mm512_add_pd, sub: _mm512_sub_pd, mul: _mm512_mul_pd, fmadd: _mm512_fmadd_pd,
    fnmadd: _mm512_fnmadd_pd, max: _mm512_max_pd,
    {
        #[inline(always)]
        unsafe fn transpose_ptr(self, src: &[*const f64], dst: &[*mut f64]) {
            assert!(src.len() == 8 && dst.len() == 8);
            // SAFETY: the caller's contract, for this block's lanes; AVX2's blocks divide it
            // (every AVX-512 CPU has AVX2, checked at detection).
            unsafe { super::transpose_by_blocks(self.avx2(), src, dst) }
        }
        #[inline(always)]
        unsafe fn load_f16_ptr(self, p: *const u16) -> __m512d {
            // SAFETY: the caller guarantees 8 readable u16s; the token proves AVX-512F and
            // F16C.
            unsafe { _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(p.cast()))) }
        }
        #[inline(always)]
        unsafe fn load_bf16_ptr(self, p: *const u16) -> __m512d {
            // SAFETY: the caller guarantees 8 readable u16s; the token proves AVX-512F.
            unsafe {
                let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
                _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(w)))
            }
        }
        #[inline(always)]
        fn reduce_max(self, x: __m512d) -> f64 {
            // SAFETY: the token proves AVX-512F (and AVX2 for the 256-bit half).
            let (lo, hi) = unsafe { (_mm512_castpd512_pd256(x), _mm512_extractf64x4_pd::<1>(x)) };
            let h = self.avx2();
            <Avx2 as Lanes<f64>>::reduce_max(h, Lanes::<f64>::max(h, lo, hi))
        }
        #[inline(always)]
        fn reduce_sum(self, x: __m512d) -> f64 {
            // SAFETY: the token proves AVX-512F (and AVX2 for the 256-bit half).
            let (lo, hi) = unsafe { (_mm512_castpd512_pd256(x), _mm512_extractf64x4_pd::<1>(x)) };
            let h = self.avx2();
            <Avx2 as Lanes<f64>>::reduce_sum(h, Lanes::<f64>::add(h, lo, hi))
        }
        #[inline(always)]
        fn pow2_magic(self, k: __m512d) -> __m512d {
            let bias = 1023i64.wrapping_sub(<f64 as Element>::MAGIC.to_bits() as i64);
            // SAFETY: the token proves AVX-512F.
            unsafe {
                let e = _mm512_add_epi64(_mm512_castpd_si512(k), _mm512_set1_epi64(bias));
                _mm512_castsi512_pd(_mm512_slli_epi64::<52>(e))
            }
        }
        #[inline(always)]
        fn zero_below(self, x: __m512d, lo: f64, y: __m512d) -> __m512d {
            // SAFETY: the token proves AVX-512F; as for f32, NaN lanes are kept.
            unsafe {
                let keep = _mm512_cmp_pd_mask::<_CMP_NLT_UQ>(x, _mm512_set1_pd(lo));
                _mm512_maskz_mov_pd(keep, y)
            }
        }
        #[inline(always)]
        fn any_above(self, x: __m512d, hi: f64) -> bool {
            // SAFETY: the token proves AVX-512F.
            unsafe { _mm512_cmp_pd_mask::<_CMP_GT_OQ>(x, _mm512_set1_pd(hi)) != 0 }
        }
        #[inline(always)]
        fn load_part(self, x: &[f64], fill: f64) -> __m512d {
            assert!(x.len() <= 8);
            let on = ((1u32 << x.len()) - 1) as __mmask8;
            // SAFETY: the token proves AVX-512F. The mask enables lanes i < x.len() only, and
            // a masked load reads (and can fault on) no disabled lane.
            unsafe { _mm512_mask_loadu_pd(_mm512_set1_pd(fill), on, x.as_ptr()) }
        }
        #[inline(always)]
        fn store_part(self, x: &mut [f64], v: __m512d) {
            assert!(x.len() <= 8);
            let on = ((1u32 << x.len()) - 1) as __mmask8;
            // SAFETY: as in `load_part`, for writing: no disabled lane is written.
            unsafe { _mm512_mask_storeu_pd(x.as_mut_ptr(), on, v) }
        }
    }
);

/// The AVX2 mask of the first `len <= 8` 32-bit lanes (all bits set in lanes i < len).
#[inline(always)]
fn avx2_mask32(_proof: Avx2, len: usize) -> __m256i {
    // SAFETY: the token proves AVX2.
    unsafe {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), lane)
    }
}

/// The AVX2 mask of the first `len <= 4` 64-bit lanes.
#[inline(always)]
fn avx2_mask64(_proof: Avx2, len: usize) -> __m256i {
    // SAFETY: the token proves AVX2.
    unsafe {
        let lane = _mm256_setr_epi64x(0, 1, 2, 3);
        _mm256_cmpgt_epi64(_mm256_set1_epi64x(len as i64), lane)
    }
}
