//! The scalar trait: what the crate needs of a float, implemented for `f32` and `f64` only.

use crate::simd::Element;
use core::fmt::{Debug, Display};
use nalgebra::RealField;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A floating-point scalar the crate computes in: `f32` or `f64`.
///
/// It extends [`nalgebra::RealField`] (which supplies `exp`, `ln`, `sqrt`, `tanh`, `max`, ...)
/// with the few constants and conversions attention needs, and with the crate's private
/// vector capabilities (the SIMD layer's element trait, which users cannot name). The trait is sealed: like
/// ndarray's `NdFloat`, it exists to write code once for both precisions, not to be
/// implemented for other types.
///
/// # Examples
///
/// ```
/// use attention_math::Float;
///
/// fn half<T: Float>(x: T) -> T {
///     x * T::of_f64(0.5)
/// }
/// assert_eq!(half(3.0_f32), 1.5);
/// assert_eq!(half(3.0_f64), 1.5);
/// assert_eq!(f32::NEG_INFINITY, <f32 as Float>::NEG_INFINITY);
/// ```
pub trait Float:
    RealField + Copy + Default + Debug + Display + Send + Sync + sealed::Sealed + Element + 'static
{
    /// Negative infinity: the score of a masked-out key.
    const NEG_INFINITY: Self;
    /// Positive infinity.
    const INFINITY: Self;
    /// Machine epsilon: the gap between 1 and the next representable value.
    const EPSILON: Self;
    /// Not a number.
    const NAN: Self;
    /// Name of the type, `"f32"` or `"f64"`, for messages and reports.
    const NAME: &'static str;
    /// The largest finite value is just below `2^MAX_EXP` (128 for f32, 1024 for f64).
    const MAX_EXP: i32;

    /// Converts from `f64`, rounding to nearest for `f32`.
    fn of_f64(x: f64) -> Self;
    /// Converts to `f64` exactly.
    fn as_f64(self) -> f64;
    /// Converts a count (a dimension, a length) to this type.
    fn of_usize(n: usize) -> Self {
        Self::of_f64(n as f64)
    }
    /// `true` if the value is NaN.
    fn is_nan_value(self) -> bool;
}

macro_rules! impl_float {
    ($t:ty) => {
        impl Float for $t {
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            const INFINITY: Self = <$t>::INFINITY;
            const EPSILON: Self = <$t>::EPSILON;
            const NAN: Self = <$t>::NAN;
            const NAME: &'static str = stringify!($t);
            const MAX_EXP: i32 = <$t>::MAX_EXP;

            #[inline(always)]
            fn of_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn as_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn is_nan_value(self) -> bool {
                self.is_nan()
            }
        }
    };
}

impl_float!(f32);
impl_float!(f64);

/// `2^k` in `T`, exactly, for `k` within the normal exponents of `T` (`|k| < MAX_EXP − 1`).
pub(crate) fn pow2<T: Float>(k: i32) -> T {
    #[cfg(feature = "std")]
    let p = 2f64.powi(k);
    // Without std (no `powi`): the same exact power, written into the exponent field; `k` is
    // saturated to f64's normal exponents, which hold every `k` this is called with.
    #[cfg(not(feature = "std"))]
    let p = f64::from_bits((k.saturating_add(1023).clamp(1, 2046) as u64) << 52);
    T::of_f64(p)
}
