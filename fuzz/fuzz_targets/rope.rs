#![no_main]
//! Fuzz target `rope`: the property checks are in `fuzz/src/checks.rs` (shared with the
//! stable replay test `tests/fuzz_corpus.rs`).
libfuzzer_sys::fuzz_target!(|data: &[u8]| attention_math_fuzz::checks::rope(data));
