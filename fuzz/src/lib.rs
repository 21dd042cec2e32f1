//! The fuzz crate of `attention-math`: the property checks live in [`checks`] (a plain
//! module depending only on `attention_math`, `nalgebra` and `std`, so that
//! `tests/fuzz_corpus.rs` in the main crate can include the same file with `#[path]`).
pub mod checks;
