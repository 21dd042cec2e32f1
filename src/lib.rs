#![doc = include_str!("../README.md")]
#![cfg_attr(not(feature = "std"), no_std)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

// Without the `std` feature the crate is `no_std` and needs `alloc` (see the feature list).
extern crate alloc;
// The unit tests use std (threads, std's float functions) with or without the feature.
#[cfg(all(test, not(feature = "std")))]
extern crate std;

// The attention library: private modules, every public item re-exported below (one path
// per item). Dependencies run one way, bottom to top:
//   simd -> float, error -> softmax, entropy, mask -> spec (options, plan, problem)
//   -> kernel (pack, forward, backward, threads) -> attention, multihead, grad (the public
//   entry points);
//   grad (slice VJPs) sits beside softmax; sheet builds on all of it.
mod attention;
mod cache;
mod entropy;
mod error;
mod float;
mod grad;
mod kernel;
mod mask;
mod multihead;
mod prelude;
mod rope;
mod simd;
mod softmax;
mod spec;

pub mod guide;
#[cfg(feature = "ndarray")]
#[cfg_attr(docsrs, doc(cfg(feature = "ndarray")))]
pub mod ndarray;
pub mod sheet;

pub use attention::{
    merge_attention, scaled_attention, scaled_attention_reference, scaled_attention_with,
    scaled_attention_with_stats,
};
pub use cache::{CacheElement, KvCache};
pub use entropy::{
    entropy, entropy_bits, entropy_from_logits, entropy_from_logits_rows, entropy_rows,
    kl_divergence,
};
pub use error::{Axis, Error, Result};
pub use float::Float;
pub use grad::{
    AttentionGrads, attention_backward, attention_backward_reference, entropy_from_logits_grad,
    log_softmax_vjp, multi_head_attention_backward, softmax_jacobian, softmax_jvp, softmax_vjp,
};
pub use mask::{Block, Mask, MaskGrid};
pub use multihead::{Heads, multi_head_attention, multi_head_attention_with};
pub use rope::{Rope, RopeLayout};
pub use simd::{InstructionSet, instruction_set};
pub use softmax::{
    exp_in_place, log_softmax, log_softmax_in_place, log_softmax_rows, logsumexp, logsumexp_rows,
    softmax, softmax_in_place, softmax_rows, softmax_with_temperature,
};
pub use spec::{AttentionOptions, AttentionOutput, AttentionStats, MultiHeadOutput, alibi_slopes};
