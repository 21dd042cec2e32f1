//! The backward pass: gradients of softmax, log-softmax, entropy and attention.
//!
//! # Softmax family (slices, with respect to the logits `s`)
//!
//! With `p = softmax(s)` and an upstream gradient `g`:
//!
//! ```text
//! Jacobian          J = ∂p/∂s = diag(p) − p pᵀ          J_ij = p_i (δ_ij − p_j)
//! softmax VJP       ∂L/∂s = Jᵀ g = p ⊙ (g − ⟨g, p⟩)
//! softmax JVP       dp = J t = p ⊙ (t − ⟨t, p⟩)            (J is symmetric)
//! log-softmax VJP   ∂L/∂s = g − p · Σ_j g_j
//! entropy           H = −Σ_i p_i ln p_i
//!                   ∂H/∂s_i = −p_i (ln p_i + H)           ln p_i = log_softmax(s)_i
//! ```
//!
//! A `-inf` logit is a masked entry, not a variable: its gradient is exactly 0 in all four,
//! and a fully masked (all `-inf`) row gives all zeros. See [`softmax_vjp`],
//! [`softmax_jvp`], [`softmax_jacobian`], [`log_softmax_vjp`], [`entropy_from_logits_grad`].
//!
//! # Attention
//!
//! The forward pass (see [`crate::attention`]), with Q (n x d), K (m x d), V (m x d_v):
//!
//! ```text
//! X = Q Kᵀ                                     raw dot products, n x m
//! Z = scale · X
//! S = c · tanh(Z / c) + B                      (softcap c and bias B optional)
//! S_ij = −inf where the mask forbids (i, j)
//! P = softmax(S) row by row,  lse_i = ln Σ_j exp(S_ij)
//! O = P V
//! ```
//!
//! Given `dO = ∂L/∂O` (n x d_v), the chain rule gives, for [`attention_backward`] and
//! [`attention_backward_reference`]:
//!
//! ```text
//! dV = Pᵀ dO                                   m x d_v
//! dP = dO Vᵀ                                   n x m
//! D_i = Σ_j P_ij dP_ij = ⟨dO_i, O_i⟩           the softmax VJP's row correction
//! dS = P ⊙ (dP − D 1ᵀ)                         = d bias, when a bias was given
//! dX = dS ⊙ scale · (1 − tanh²(Z / c))         (just scale · dS without a softcap)
//! dQ = dX K                                    n x d
//! dK = dXᵀ Q                                   m x d
//! ```
//!
//! Masked pairs have `P_ij = 0` and so `dS_ij = 0`: no gradient flows through them, to Q, K
//! or the bias. A fully masked row (`lse_i = −inf`, `O_i = 0`) gets zero gradients, never
//! NaN: the tiled pass never forms `S_ij − lse_i` there.
//!
//! The reference version materialises P (n x m) by re-running
//! [`scaled_attention_reference`](crate::scaled_attention_reference) and takes `dS` row by
//! row with the softmax VJP. The tiled version follows FlashAttention-2 (Dao, 2023): it
//! recomputes `P_ij = exp(S_ij − lse_i)` block by block from Q, K and the saved log-sum-exp,
//! uses `D_i = ⟨dO_i, O_i⟩` (O(n·d_v), no n x m product), skips blocks the mask rules out
//! and evaluates the mask only in blocks it cuts; its extra memory is O(tile), never n x m.
//!
//! # Examples
//!
//! ```
//! use attention_math::{attention_backward, scaled_attention_with, AttentionOptions, Mask};
//! use nalgebra::DMatrix;
//!
//! let x = DMatrix::<f64>::from_fn(4, 3, |i, j| ((i * 3 + j) as f64).sin());
//! let opts = AttentionOptions::new();
//! let fwd = scaled_attention_with(&x, &x, &x, &Mask::causal(), &opts)?;
//! let d_out = DMatrix::<f64>::from_element(4, 3, 1.0);
//! let g = attention_backward(&x, &x, &x, &Mask::causal(), &opts, &fwd, &d_out)?;
//! // Every row of weights sums to 1, so each column of dV sums to the n rows of dO.
//! assert!((g.dv.column(0).sum() - 4.0).abs() < 1e-12);
//! // The first query sees one key only: it gets no gradient.
//! assert_eq!(g.dq.row(0).amax(), 0.0);
//! # Ok::<(), attention_math::Error>(())
//! ```

mod attention;
mod gemm;
mod softmax;

pub use attention::{AttentionGrads, attention_backward, attention_backward_reference};
pub use softmax::{
    entropy_from_logits_grad, log_softmax_vjp, softmax_jacobian, softmax_jvp, softmax_vjp,
};
