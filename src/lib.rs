#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

pub mod attention;
pub mod diagnostics;
pub mod entropy;
pub mod error;
pub mod float;
pub mod grad;
pub mod kernel;
pub mod lm;
pub mod lora;
pub mod mask;
pub mod moe;
pub mod multihead;
pub mod preference;
pub mod scaling;
pub mod softmax;

pub use attention::{
    AttentionOptions, AttentionOutput, scaled_attention, scaled_attention_reference,
    scaled_attention_with,
};
pub use entropy::{
    entropy, entropy_bits, entropy_from_logits, entropy_from_logits_rows, entropy_rows,
    kl_divergence,
};
pub use error::{Axis, Error, Result};
pub use float::Float;
pub use grad::{
    AttentionGrads, attention_backward, attention_backward_reference, entropy_from_logits_grad,
    log_softmax_vjp, softmax_jacobian, softmax_jvp, softmax_vjp,
};
pub use lm::{CrossEntropy, Objective, Packed, Reduction, cross_entropy, cross_entropy_grad};
pub use mask::{Block, Mask, MaskGrid};
pub use multihead::{Heads, multi_head_attention};
pub use scaling::ScalingStudy;
pub use softmax::{
    log_softmax, log_softmax_in_place, log_softmax_rows, logsumexp, logsumexp_rows, softmax,
    softmax_in_place, softmax_rows, softmax_with_temperature,
};
