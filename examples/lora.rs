//! Seed question 3 (LoRA and adapters), measured: what LoRA trains against full fine-tuning
//! for a real model's layer shapes, and a LoRA adapter trained with the crate's gradients.
//!
//! 1. The trainable-parameter ratio `r (d_in + d_out) / (d_in d_out)` for every projection
//!    of a Llama-2-7B block (Touvron et al. 2023: d_model 4096, MLP 11008, 32 layers), at
//!    ranks 4 to 64, and for the usual recipe (q_proj and v_proj in every layer, Hu et al.
//!    2021).
//! 2. A frozen 64 x 64 weight W and a target `W + ΔW` whose update has rank 4: a rank-4 LoRA
//!    layer (B = 0 at the start, as initialised) fitted by plain gradient descent on the
//!    mean squared error, with `LoraLinear::backward` giving ∂L/∂A and ∂L/∂B. The loss falls
//!    by orders of magnitude and `merged()` recovers the target weight; a rank-1 adapter
//!    cannot (its loss stalls at the part of ΔW it cannot represent).
//!
//! Run: `cargo run --release --example lora`

use attention_math::sheet::lora::{LoraLinear, lora_parameter_ratio};
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

fn normal(rows: usize, cols: usize, sd: f64, rng: &mut StdRng) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |_, _| {
        sd * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, rng)
    })
}

fn main() -> attention_math::Result<()> {
    // 1. Parameter counts, Llama-2-7B.
    let (d, ff, layers) = (4096usize, 11008usize, 32usize);
    let projections = [
        ("q_proj / k_proj / v_proj / o_proj", d, d),
        ("gate_proj / up_proj", d, ff),
        ("down_proj", ff, d),
    ];
    println!("LoRA against full fine-tuning, Llama-2-7B projections (d_in x d_out):\n");
    println!(
        "| projection | shape | full | r = 4 | r = 8 | r = 16 | r = 64 |\n|---|---|---|---|---|---|---|"
    );
    for (name, din, dout) in projections {
        let ratios: Vec<String> = [4, 8, 16, 64]
            .iter()
            .map(|&r| {
                lora_parameter_ratio(din, dout, r)
                    .map(|x| format!("{} ({:.2}%)", r * (din + dout), 100.0 * x))
            })
            .collect::<attention_math::Result<_>>()?;
        println!(
            "| {name} | {din} x {dout} | {} | {} |",
            din * dout,
            ratios.join(" | ")
        );
    }
    let block = 4 * d * d + 3 * d * ff;
    let recipe = layers * 2 * 8 * (d + d);
    println!(
        "\nThe usual recipe (rank 8 on q_proj and v_proj of all {layers} layers) trains {recipe} \
         parameters; full fine-tuning of the {layers} blocks' projections trains {} ({:.4}% of it).\n",
        layers * block,
        100.0 * recipe as f64 / (layers * block) as f64
    );

    // 2. Training a rank-4 adapter with the crate's gradients.
    let mut rng = StdRng::seed_from_u64(3);
    let (din, dout, n, true_rank) = (64, 64, 256, 4);
    let w = normal(din, dout, 1.0 / (din as f64).sqrt(), &mut rng);
    let delta = normal(din, true_rank, 0.25, &mut rng) * normal(true_rank, dout, 0.25, &mut rng);
    let target = &w + &delta;
    let x = normal(n, din, 1.0, &mut rng);
    let y_star = &x * &target;
    println!(
        "Fitting W + ΔW (64 x 64, ΔW of rank {true_rank}, |ΔW|_F = {:.2}) from x W, plain gradient descent on L = |y − y*|² / 2n:\n",
        delta.norm()
    );
    println!("| step | loss, rank 4 | loss, rank 1 |\n|---|---|---|");
    let mut fits = Vec::new();
    for rank in [4, 1] {
        let mut layer = LoraLinear::new(w.clone(), rank, rank as f64)?; // α = r: s = 1
        // B = 0 (as initialised) makes ∂L/∂A = 0 at the first step; A is random.
        let mut losses = Vec::new();
        let lr = 0.02;
        for step in 0..=1500 {
            let y = layer.forward(&x)?;
            let err = &y - &y_star;
            let loss = err.norm_squared() / (2.0 * n as f64);
            if step % 250 == 0 {
                losses.push((step, loss));
            }
            let g = layer.backward(&x, &(err / n as f64))?;
            let a = layer.a() - g.d_a * lr;
            let b = layer.b() - g.d_b * lr;
            layer.set_a(a)?;
            layer.set_b(b)?;
        }
        fits.push((
            rank,
            losses,
            (layer.merged() - &target).norm() / delta.norm(),
        ));
    }
    for i in 0..fits[0].1.len() {
        println!(
            "| {} | {:.3e} | {:.3e} |",
            fits[0].1[i].0, fits[0].1[i].1, fits[1].1[i].1
        );
    }
    for (rank, _, rel) in &fits {
        println!("rank {rank}: |merged() − (W + ΔW)|_F / |ΔW|_F = {rel:.2e}");
    }
    println!(
        "\nrank {true_rank} trains {} parameters against {} for full fine-tuning of the layer ({:.1}%).",
        true_rank * (din + dout),
        din * dout,
        100.0 * lora_parameter_ratio(din, dout, true_rank)?
    );
    Ok(())
}
