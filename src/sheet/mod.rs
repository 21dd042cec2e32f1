//! The study sheet's questions, as code: each module answers one question of the LLM study
//! sheet this crate grew from, on top of the attention library at the crate root.
//!
//! | question | module |
//! |---|---|
//! | Q1 self-attention vs RNN | [`rnn`]: a causal attention layer and a tanh RNN side by side, the exact gradient of the last output with respect to the first input through each, and the study over sequence lengths |
//! | Q2 why attention divides by √d_k | [`scaling`]: the sheet's simulation, its table and histograms, the softmax Jacobian and the query gradient |
//! | Q3 LoRA and adapters | [`lora`]: LoRA-adapted linear layers (forward, backward, merge, unmerge, parameter ratio) and bottleneck adapters (forward, backward); `examples/lora.rs` trains one |
//! | Q4 dense vs mixture of experts | [`moe`]: softmax top-k routing, the load-balancing loss and the router z-loss, expert capacity with dropped-token reports, and dense-vs-MoE parameter and FLOP counts |
//! | Q5 prefix LM vs causal LM | [`lm`]: attention and loss masks from one spec, packed rows, masked cross-entropy |
//! | Q6 RLHF | [`preference`]: token and sequence log-probabilities, reward-model (Bradley-Terry), DPO and PPO-clip losses, the k1/k2/k3 KL penalties, and all their gradients |
//! | Q7 loss spikes | [`diagnostics`]: max logit, entropy and max probability from the kernel (no n x m weights), per-head summaries, a stability monitor for entropy collapse and logit growth, softcap, QK-norm |

pub mod diagnostics;
pub mod lm;
pub mod lora;
pub mod moe;
pub mod preference;
pub mod rnn;
pub mod scaling;
