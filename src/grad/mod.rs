//! The backward pass: gradients of softmax, log-softmax, entropy and attention.
//!
//! The math and the design are in `src/guide/gradients.md`, rendered as
//! [`crate::guide::gradients`].

mod attention;
mod softmax;

pub use attention::{
    AttentionGrads, attention_backward, attention_backward_reference, multi_head_attention_backward,
};
pub use softmax::{
    entropy_from_logits_grad, log_softmax_vjp, softmax_jacobian, softmax_jvp, softmax_vjp,
};
