//! The fast path: packing, the tiled forward pass, the tiled backward pass and their thread
//! handling, on the [`simd`](crate::simd) layer's micro-kernel, exp and softmax row step.
//!
//! The design is in `src/guide/kernel.md`, rendered as [`crate::guide::kernel`].

pub(crate) mod backward;
pub(crate) mod forward;
mod pack;
mod threads;

pub(crate) use threads::{Exec, with_threads};

use crate::Float;
use crate::spec::{AttentionOutput, Problem};
use crate::simd::Isa;

/// Query rows per tile (a multiple of MR) and keys per tile (a multiple of NR): f32 96 x 256,
/// f64 48 x 128, so that one tile's scores and accumulator stay in L2.
pub(crate) fn tile<T: Float>() -> (usize, usize) {
    if size_of::<T>() == 4 { (96, 256) } else { (48, 128) }
}

/// Runs a validated call on the forward kernel (output and log-sum-exp; no weights).
pub(crate) fn run<T: Float>(problem: &Problem<'_, T>, exec: Exec) -> AttentionOutput<T> {
    let (output, lse) = forward::forward(problem, Isa::get(), exec);
    AttentionOutput {
        output,
        lse,
        weights: None,
    }
}
