//! A small grouped-query decoder layer (random weights, RoPE) run the way an inference engine
//! runs it: prefill a prompt into a KV cache, then decode token by token through the cache,
//! printing each step's latency and checking every step against the full causal forward of
//! the whole sequence.
//!
//! `cargo run --release --example decode -- [--heads 32] [--kv-heads 8] [--dim 128]
//! [--prompt 512] [--steps 32] [--threads 1]`

use attention_math::{
    AttentionOptions, Heads, KvCache, Mask, Rope, RopeLayout, multi_head_attention,
};
use nalgebra::DMatrix;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::time::Instant;

struct Args {
    heads: usize,
    kv_heads: usize,
    dim: usize,
    prompt: usize,
    steps: usize,
    threads: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        heads: 32,
        kv_heads: 8,
        dim: 128,
        prompt: 512,
        steps: 32,
        threads: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--heads" => &mut a.heads,
            "--kv-heads" => &mut a.kv_heads,
            "--dim" => &mut a.dim,
            "--prompt" => &mut a.prompt,
            "--steps" => &mut a.steps,
            "--threads" => &mut a.threads,
            _ => return Err(format!("unknown argument `{flag}`")),
        };
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        *slot = value
            .parse()
            .map_err(|_| format!("{flag}: `{value}` is not a count"))?;
    }
    Ok(a)
}

fn random(rows: usize, cols: usize, scale: f32, rng: &mut StdRng) -> DMatrix<f32> {
    DMatrix::from_fn(rows, cols, |_, _| rng.random_range(-scale..scale))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse()?;
    let (h, g, d) = (a.heads, a.kv_heads, a.dim);
    let model = h * d; // the residual width
    let total = a.prompt + a.steps;
    let mut rng = StdRng::seed_from_u64(7);
    // Projections of a decoder layer: x (1 x model) -> q (H·d), k and v (G·d).
    let w = 1.0 / (model as f32).sqrt();
    let (wq, wk, wv) = (
        random(model, h * d, w, &mut rng),
        random(model, g * d, w, &mut rng),
        random(model, g * d, w, &mut rng),
    );
    let x = random(total, model, 1.0, &mut rng); // the token embeddings of the whole sequence
    let rope = Rope::new(d, RopeLayout::RotateHalf);
    let opts = AttentionOptions::new().threads(a.threads);
    let heads = Heads::grouped(h, g);

    // The oracle: the whole sequence at once, causal, RoPE at positions 0..total.
    let (mut q_all, mut k_all) = (&x * &wq, &x * &wk);
    let v_all = &x * &wv;
    rope.apply(&mut q_all, 0)?;
    rope.apply(&mut k_all, 0)?;
    let full = multi_head_attention(&q_all, &k_all, &v_all, heads, &Mask::causal(), &opts)?;

    // Prefill: the prompt as one chunk into the cache.
    let mut cache = KvCache::<f32>::with_capacity(g, d, d, total)?;
    let started = Instant::now();
    let prompt = x.rows(0, a.prompt);
    let (mut q, mut k) = (prompt * &wq, prompt * &wk);
    rope.apply(&mut q, 0)?;
    rope.apply(&mut k, 0)?;
    cache.append(&k, &(prompt * &wv))?;
    let out = cache.attention(&q, h, &Mask::causal(), &opts)?;
    let prefill = started.elapsed();
    let mut worst = (out - full.rows(0, a.prompt)).amax();

    println!(
        "{h} query heads over {g} KV heads, d = {d}, f32, {} thread(s); prompt {} tokens: \
         prefill {:.2} ms",
        a.threads,
        a.prompt,
        prefill.as_secs_f64() * 1e3
    );
    println!(
        "{:>6} {:>8} {:>12} {:>12}",
        "step", "cached", "attention ms", "max |diff|"
    );
    let mut times = Vec::new();
    for t in a.prompt..total {
        let token = x.rows(t, 1);
        let (mut q, mut k) = (token * &wq, token * &wk);
        let pos = cache.end_position(); // RoPE offset = positions seen so far
        rope.apply(&mut q, pos)?;
        rope.apply(&mut k, pos)?;
        cache.append(&k, &(token * &wv))?;
        let started = Instant::now();
        let out = cache.attention(&q, h, &Mask::causal(), &opts)?;
        let elapsed = started.elapsed().as_secs_f64() * 1e3;
        times.push(elapsed);
        let diff = (out - full.rows(t, 1)).amax();
        worst = worst.max(diff);
        if t < a.prompt + 4 || t + 1 == total {
            println!(
                "{:>6} {:>8} {:>12.3} {:>12.2e}",
                t - a.prompt,
                cache.len(),
                elapsed,
                diff
            );
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(0.0);
    let bytes = 2.0 * (cache.len() * g * d * 4) as f64;
    println!(
        "median step {median:.3} ms at ~{} cached positions ({:.1} MiB of K and V: {:.2} GB/s); \
         largest difference from the full forward {worst:.2e}",
        cache.len(),
        bytes / (1 << 20) as f64,
        bytes / median / 1e6
    );
    if worst > 1e-4 {
        return Err(format!("decoding drifted from the full forward: {worst:.2e}").into());
    }
    Ok(())
}
