//! Dense vs mixture of experts (seed question 4), counted and routed.
//!
//! ```text
//! cargo run --release --example moe
//! ```
//!
//! Prints
//!
//! - total and active parameters of published models, computed from their configurations with
//!   `sheet::moe::ModelShape`, beside the published counts (sources in `docs/moe.md`);
//! - per layer, the feed-forward block's parameters and FLOPs per token, dense vs MoE;
//! - expert capacity at work: 4096 tokens routed top-2 over 8 experts by a skewed router, and
//!   how many assignments each capacity factor drops.

use attention_math::sheet::moe::{
    Ffn, ModelShape, MoeFfn, apply_capacity, attention_params, expert_capacity,
    load_balancing_loss, mla_attention_params, route_top_k,
};
use nalgebra::DMatrix;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;
use std::error::Error;

/// One published model: its shape, the published counts (total, active) and where they are
/// from, and its feed-forward blocks for the per-layer comparison.
struct Model {
    name: &'static str,
    shape: ModelShape,
    published: (f64, Option<f64>),
    source: &'static str,
    dense: Ffn,
    moe: Option<MoeFfn>,
}

/// Mistral 7B (Jiang et al. 2023, Table 1) and Mixtral 8x7B (Jiang et al. 2024, Table 1):
/// the same decoder, with the FFN of every layer replaced by 8 experts, top-2.
fn mistral_and_mixtral() -> Result<[Model; 2], Box<dyn Error>> {
    let (d, vocab, layers) = (4096, 32000, 32);
    let mixer = attention_params(d, 32, 8, 128)? + 2 * d as u64; // + two RMSNorms
    let ffn = Ffn::new(d, 14336, true)?;
    let moe = MoeFfn::new(ffn, 8, 2, 0)?;
    Ok([
        Model {
            name: "Mistral 7B (dense)",
            shape: ModelShape::new(vocab, d, false)?.layers(layers, mixer, ffn)?,
            published: (7.3e9, None),
            source: "Mistral AI, 'Mistral 7B' (2023): 7.3B",
            dense: ffn,
            moe: None,
        },
        Model {
            name: "Mixtral 8x7B",
            shape: ModelShape::new(vocab, d, false)?.layers(layers, mixer, moe)?,
            published: (46.7e9, Some(12.9e9)),
            source: "Mistral AI, 'Mixtral of experts' (2023): 46.7B / 12.9B",
            dense: ffn,
            moe: Some(moe),
        },
    ])
}

/// A Switch Transformer (Fedus et al. 2022): T5 encoder-decoder, ReLU FFNs, top-1 routing,
/// `sparse_every`-th FFN of each stack an MoE layer, embeddings tied.
#[allow(clippy::too_many_arguments)]
fn switch(
    name: &'static str,
    d: usize,
    d_ff: usize,
    heads: usize,
    layers: usize,
    experts: usize,
    sparse_every: usize,
    published: f64,
    source: &'static str,
) -> Result<Model, Box<dyn Error>> {
    let attn = attention_params(d, heads, heads, 64)?;
    let ffn = Ffn::new(d, d_ff, false)?;
    let moe = MoeFfn::new(ffn, experts, 1, 0)?;
    let (sparse, dense) = (layers / sparse_every, layers - layers / sparse_every);
    let (enc, dec) = (attn + 2 * d as u64, 2 * attn + 3 * d as u64); // self (+ cross) attention, norms
    let shape = ModelShape::new(32128, d, true)?
        .layers(dense, enc, ffn)?
        .layers(sparse, enc, moe)?
        .layers(dense, dec, ffn)?
        .layers(sparse, dec, moe)?
        // The second stack's final norm and the two stacks' relative position biases.
        .extra(d as u64 + 2 * 32 * heads as u64)?;
    Ok(Model {
        name,
        shape,
        published: (published, None),
        source,
        dense: ffn,
        moe: Some(moe),
    })
}

/// DeepSeekMoE 16B (Dai et al. 2024, §5.1) and DeepSeek-V3 (DeepSeek-AI 2024, §4.2 and
/// `inference/configs/config_671B.json`): fine-grained experts plus shared experts, the first
/// layers dense.
fn deepseek() -> Result<[Model; 2], Box<dyn Error>> {
    let d = 2048;
    let mixer = attention_params(d, 16, 16, 128)? + 2 * d as u64;
    let expert = Ffn::new(d, 1408, true)?;
    let moe16 = MoeFfn::new(expert, 64, 6, 2)?;
    let dense16 = Ffn::new(d, 10944, true)?;
    let v2 = ModelShape::new(102_400, d, false)?
        .layers(1, mixer, dense16)?
        .layers(27, mixer, moe16)?;
    let d = 7168;
    let mla = mla_attention_params(d, 128, 1536, 512, 128, 64, 128)? + 2 * d as u64;
    let moe = MoeFfn::new(Ffn::new(d, 2048, true)?, 256, 8, 1)?;
    let dense = Ffn::new(d, 18432, true)?;
    let v3 = ModelShape::new(129_280, d, false)?
        .layers(3, mla, dense)?
        .layers(58, mla, moe)?
        .extra(58 * 256)?; // the routers' bias terms
    Ok([
        Model {
            name: "DeepSeekMoE 16B",
            shape: v2,
            published: (16.4e9, Some(2.8e9)),
            source: "Dai et al. 2024, §5.1: 16.4B / 2.8B",
            dense: dense16,
            moe: Some(moe16),
        },
        Model {
            name: "DeepSeek-V3",
            shape: v3,
            published: (671e9, Some(36.7e9)),
            source: "DeepSeek-V3 README_WEIGHTS.md: 671B / 36.7B (paper: 37B)",
            dense,
            moe: Some(moe),
        },
    ])
}

fn billions(x: f64) -> String {
    if x >= 1e11 {
        format!("{:.1}B", x / 1e9)
    } else if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else {
        format!("{:.1}M", x / 1e6)
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut models = Vec::new();
    models.extend(mistral_and_mixtral()?);
    models.push(switch(
        "Switch-Base-8",
        768,
        3072,
        12,
        12,
        8,
        2,
        619e6,
        "google/switch-base-8 on Hugging Face: 619M",
    )?);
    models.push(switch(
        "Switch-C-2048",
        2080,
        6144,
        32,
        15,
        2048,
        1,
        1571e9,
        "Fedus et al. 2022, Table 9: 1571B",
    )?);
    models.extend(deepseek()?);

    println!("Parameters from the published configurations (computed) vs the published counts");
    println!();
    println!(
        "{:<20} {:>10} {:>10} {:>7} | {:>9} {:>9} | {:>7} {:>7} | source",
        "model", "total", "active", "act/tot", "pub total", "pub act", "Δ total", "Δ act"
    );
    println!("{}", "-".repeat(130));
    for m in &models {
        let (total, active) = (
            m.shape.total_params() as f64,
            m.shape.active_params() as f64,
        );
        let (pub_total, pub_active) = m.published;
        let delta = |a: f64, b: f64| format!("{:+.1}%", (a / b - 1.0) * 100.0);
        println!(
            "{:<20} {:>10} {:>10} {:>6.1}% | {:>9} {:>9} | {:>7} {:>7} | {}",
            m.name,
            billions(total),
            billions(active),
            active / total * 100.0,
            billions(pub_total),
            pub_active.map_or("—".to_string(), billions),
            delta(total, pub_total),
            pub_active.map_or("—".to_string(), |p| delta(active, p)),
            m.source
        );
    }
    println!();
    println!(
        "Active = what one token uses: attention, norms, embeddings and output head, the router, \
         k routed + the shared experts. DeepSeek-V3's 36.7B is not reproduced by this count \
         (37.55B; without the input embedding 36.63B): see docs/moe.md."
    );
    println!();

    println!("One feed-forward layer, dense vs MoE (FLOPs = 2 per weight used, forward):");
    println!();
    println!(
        "{:<20} {:>11} {:>11} {:>11} {:>11} | {:>12} {:>9}",
        "model", "dense P", "MoE P", "MoE active", "FLOP/token", "dense equiv", "P ratio"
    );
    println!("{}", "-".repeat(96));
    for m in &models {
        let Some(moe) = m.moe else {
            println!(
                "{:<20} {:>11} {:>11} {:>11} {:>11} | {:>12} {:>9}",
                m.name,
                billions(m.dense.params() as f64),
                "—",
                "—",
                billions(m.dense.flops_per_token() as f64).replace('B', "G"),
                "—",
                "—"
            );
            continue;
        };
        println!(
            "{:<20} {:>11} {:>11} {:>11} {:>11} | {:>12} {:>8.1}x",
            m.name,
            billions(m.dense.params() as f64),
            billions(moe.total_params() as f64),
            billions(moe.active_params() as f64),
            billions(moe.flops_per_token() as f64).replace('B', "G"),
            format!("d_ff {}", moe.dense_equivalent().d_ff()),
            moe.total_params() as f64 / moe.active_params() as f64
        );
    }
    println!();
    println!(
        "dense P: the model's dense FFN (Mixtral: Mistral 7B's; DeepSeek: its first layers'). \
         dense equiv: the dense FFN with the MoE's FLOPs per token, (k + shared) d_ff. \
         P ratio: total / active, the parameters an MoE holds per parameter it uses."
    );
    println!();

    capacity_demo()?;
    Ok(())
}

/// 4096 tokens, 8 experts, top-2; router logits standard normal plus a per-expert bias that
/// favours the low experts (an unbalanced router early in training).
fn capacity_demo() -> Result<(), Box<dyn Error>> {
    let (n, e, k) = (4096, 8, 2);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(4);
    let logits = DMatrix::<f64>::from_fn(n, e, |_, j| {
        rng.sample::<f64, _>(StandardNormal) + 0.8 * (1.0 - j as f64 / (e - 1) as f64)
    });
    let routing = route_top_k(&logits, k, true)?;
    println!(
        "Expert capacity: {n} tokens, {e} experts, top-{k}, a skewed router \
         (load-balancing loss {:.3}; 1 is balanced)",
        load_balancing_loss(&routing)?
    );
    println!();
    println!(
        "{:>8} {:>9} | {:>9} {:>9} | {:>32} | {:>26}",
        "factor",
        "capacity",
        "dropped",
        "of n·k",
        "busiest expert: routed/kept",
        "tokens losing every expert"
    );
    println!("{}", "-".repeat(106));
    for factor in [0.5, 1.0, 1.25, 1.5, 2.0, 4.0] {
        let d = apply_capacity(&routing, factor)?;
        assert_eq!(d.capacity(), expert_capacity(factor, n, k, e)?);
        let busiest = d
            .loads()
            .iter()
            .enumerate()
            .max_by_key(|(_, l)| l.routed)
            .map(|(j, l)| {
                format!(
                    "e{j}: {} / {} ({:.1}% dropped)",
                    l.routed,
                    l.kept,
                    l.drop_rate() * 100.0
                )
            })
            .unwrap_or_default();
        let mut lost = vec![0_usize; n];
        for &(token, _) in d.dropped() {
            lost[token] += 1;
        }
        let fully = lost.iter().filter(|&&c| c == k).count();
        println!(
            "{:>8} {:>9} | {:>9} {:>8.2}% | {:>32} | {:>26}",
            factor,
            d.capacity(),
            d.dropped().len(),
            d.drop_fraction() * 100.0,
            busiest,
            fully
        );
    }
    println!();
    println!(
        "capacity = ⌈factor · n · k / E⌉; first choices are placed before second choices, in \
         token order (GShard, Switch/Flaxformer). Dropped assignments skip their expert; a token \
         that loses both passes the layer through the residual only."
    );
    Ok(())
}
