//! What the std prelude would give every module, from `alloc` (the crate is `#![no_std]`
//! without the `std` feature): `use crate::prelude::*;` where a module needs it.

pub(crate) use alloc::format;
pub(crate) use alloc::string::{String, ToString};
pub(crate) use alloc::vec;
pub(crate) use alloc::vec::Vec;

// Without std, `f32` and `f64` have no inherent `exp`, `ln`, `sqrt`, `powi`, ...: nalgebra's
// `ComplexField` supplies them (from libm). With std the trait is not imported, so those calls
// stay std's own (inherent methods would win anyway): the std build's bits do not change.
// Wherever std is in the build even without the feature (the test harness, or a dependency
// with its std feature on, as the dev-dependencies turn on in `cargo test`), std's inherent
// methods win too and the import goes unused: hence the `allow`.
#[cfg(not(feature = "std"))]
#[allow(unused_imports)]
pub(crate) use nalgebra::ComplexField as _;
