//! The instruction-set override: a run that asks for an instruction set through
//! `ATTENTION_MATH_ISA` must get exactly that one, or fail saying the machine lacks it (so a
//! CI job meant to test the AVX-512 path cannot pass silently on the AVX2 path).

use attention_math::{InstructionSet, instruction_set};

#[test]
#[cfg(feature = "std")]
fn the_requested_instruction_set_is_the_one_in_use() {
    let Ok(value) = std::env::var("ATTENTION_MATH_ISA") else {
        return; // no request: detection picks the best the CPU has
    };
    if value.trim().is_empty() {
        return;
    }
    let wanted: InstructionSet = value
        .parse()
        .unwrap_or_else(|e| panic!("ATTENTION_MATH_ISA: {e}"));
    let running = instruction_set();
    assert_eq!(
        running, wanted,
        "ATTENTION_MATH_ISA={wanted} was asked for, but this CPU cannot run it: the tests \
         ran on {running} instead"
    );
}

/// Without std there is no detection and no variable: the instruction set is the best one the
/// build's compile-time target features enable.
#[test]
#[cfg(not(feature = "std"))]
fn without_std_the_build_target_features_decide() {
    let expected = if cfg!(all(
        target_arch = "x86_64",
        target_feature = "avx512f",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )) {
        InstructionSet::Avx512
    } else if cfg!(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )) {
        InstructionSet::Avx2
    } else {
        InstructionSet::Portable
    };
    assert_eq!(instruction_set(), expected);
}

#[test]
fn every_path_computes_the_same_attention() {
    // Whatever the instruction set in use, the public functions agree with the reference.
    use attention_math::{
        AttentionOptions, Mask, scaled_attention_reference, scaled_attention_with,
    };
    use nalgebra::DMatrix;
    let x = DMatrix::<f32>::from_fn(130, 24, |i, j| ((i * 24 + j) as f32 * 0.37).sin());
    let opts = AttentionOptions::new();
    let fast = scaled_attention_with(&x, &x, &x, &Mask::causal(), &opts).unwrap();
    let slow = scaled_attention_reference(&x, &x, &x, &Mask::causal(), &opts).unwrap();
    assert!(
        (fast.output - slow.output).amax() < 1e-5,
        "{}",
        instruction_set()
    );
}
