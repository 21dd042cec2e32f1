//! The mathematics behind the library, one page per topic: the formulas each function
//! computes, their edge cases, and how the fast path computes them. The items themselves live
//! at the crate root; these pages are documentation only (like ndarray's `doc` module).

/// Scaled dot-product attention: the entry points and the reference oracle.
pub mod attention {
    #![doc = include_str!("attention.md")]
}

/// The backward pass: gradients of softmax, log-softmax, entropy and attention.
pub mod gradients {
    #![doc = include_str!("gradients.md")]
}

/// Attention masks.
pub mod masks {
    #![doc = include_str!("masks.md")]
}

/// Multi-head, grouped-query and multi-query attention.
pub mod multi_head {
    #![doc = include_str!("multi_head.md")]
}

/// The fast path: a tiled, online-softmax attention kernel for the CPU.
pub mod kernel {
    #![doc = include_str!("kernel.md")]
}

/// Softmax, log-softmax and log-sum-exp.
pub mod softmax {
    #![doc = include_str!("softmax.md")]
}

/// Entropy and KL divergence.
pub mod entropy {
    #![doc = include_str!("entropy.md")]
}

/// Decoding: the KV cache, aligned masks, RoPE, ALiBi, and what a step costs
/// (`docs/decoding.md`).
pub mod decoding {
    #![doc = include_str!("../../docs/decoding.md")]
}
