//! Prefix LM vs causal LM on the seed's example `[A, B, C, D | a, b, c, d]`.
//!
//! Prints, for each objective, the attention grid (row = query, column = key, `x` = may
//! attend), the loss row (which positions' next-token predictions count), and the loss a
//! small fixed model gives, with the per-position losses and the gradient each position's
//! logits receive. Run with
//!
//! ```sh
//! cargo run --example prefix_vs_causal
//! ```

use attention_math::sheet::lm::{Objective, Packed, Reduction, cross_entropy_grad};
use attention_math::{Mask, scaled_attention};
use nalgebra::DMatrix;

const NAMES: [&str; 8] = ["A", "B", "C", "D", "a", "b", "c", "d"];
const D: usize = 8;

/// A fixed pseudo-random value in [-1, 1) for (stream, i, j) (SplitMix64 of the triple).
fn noise(stream: u64, i: usize, j: usize) -> f64 {
    let mut z = stream
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((i as u64) << 32 | j as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

fn random(stream: u64, rows: usize, cols: usize, scale: f64) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |i, j| scale * noise(stream, i, j))
}

/// One attention layer with a residual connection.
struct Layer {
    wq: DMatrix<f64>,
    wk: DMatrix<f64>,
    wv: DMatrix<f64>,
}

impl Layer {
    fn new(stream: u64) -> Self {
        let s = 1.0 / (D as f64).sqrt();
        Layer {
            wq: random(stream, D, D, 2.0 * s),
            wk: random(stream + 1, D, D, 2.0 * s),
            wv: random(stream + 2, D, D, s),
        }
    }

    fn forward(
        &self,
        x: &DMatrix<f64>,
        mask: &Mask,
    ) -> Result<DMatrix<f64>, attention_math::Error> {
        let attended = scaled_attention(&(x * &self.wq), &(x * &self.wk), &(x * &self.wv), mask)?;
        Ok(x + attended)
    }
}

/// A two-layer model with fixed weights: embeddings plus positions, two attention layers
/// under `mask`, and an output projection to vocabulary logits. (With a single layer the
/// prefix LM and the causal LM would give the same predictions at every target position:
/// a position's output depends only on the *inputs* it attends to. The bidirectional
/// prefix matters from the second layer on, through the prefix's keys and values.)
struct TinyLm {
    embed: DMatrix<f64>,
    pos: DMatrix<f64>,
    layers: [Layer; 2],
    out: DMatrix<f64>,
}

impl TinyLm {
    fn new(vocab: usize, max_len: usize) -> Self {
        TinyLm {
            embed: random(1, vocab, D, 1.0),
            pos: random(2, max_len, D, 0.5),
            layers: [Layer::new(10), Layer::new(20)],
            out: random(3, D, vocab, 2.0),
        }
    }

    /// Returns (the first layer's hidden states, logits), n x D and n x vocab.
    fn run(
        &self,
        tokens: &[usize],
        mask: &Mask,
    ) -> Result<(DMatrix<f64>, DMatrix<f64>), attention_math::Error> {
        let n = tokens.len();
        let x = DMatrix::from_fn(n, D, |i, j| self.embed[(tokens[i], j)] + self.pos[(i, j)]);
        let h1 = self.layers[0].forward(&x, mask)?;
        let h2 = self.layers[1].forward(&h1, mask)?;
        let logits = &h2 * &self.out;
        Ok((h1, logits))
    }
}

fn print_grid(mask: &Mask, n: usize) {
    println!("        keys: {}", NAMES[..n].join(" "));
    for (i, line) in mask.grid(n, n).to_string().lines().enumerate() {
        println!("  query {}:   {line}", NAMES[i]);
    }
}

fn main() -> Result<(), attention_math::Error> {
    let tokens: Vec<usize> = (0..8).collect(); // A B C D a b c d are ids 0..8
    let n = tokens.len();
    let model = TinyLm::new(NAMES.len(), n);

    let objectives = [
        Objective::Causal,
        Objective::PrefixLm { prefix_len: 4 },
        Objective::PromptMasked { prompt_len: 4 },
    ];

    println!("Sequence: [A, B, C, D | a, b, c, d]; position i predicts token i + 1.\n");
    let mut hidden = Vec::new();
    for objective in objectives {
        let mask = objective.attention_mask();
        let loss_mask = objective.loss_mask(n)?;
        let (h, logits) = model.run(&tokens, &mask)?;
        let ce = objective.loss(&logits, &tokens)?;
        let (mean, grad) = cross_entropy_grad(&logits, &tokens, &loss_mask, Reduction::Mean)?;

        println!("== {objective} ==");
        println!("attention mask ({mask}):");
        print_grid(&mask, n);
        // The model predicts at every position; the loss mask decides which predictions count.
        let every = Objective::Causal.loss(&logits, &tokens)?;
        println!("loss row (position i predicts token i + 1):");
        println!("  pos -> target  scored  prediction loss  counted  |d mean / d logits row|");
        for i in 0..n {
            let target = NAMES.get(i + 1).copied().unwrap_or("-");
            let scored = if loss_mask[i] { "yes" } else { "no" };
            println!(
                "  {}   -> {:6}  {:6}  {:15.4}  {:7.4}  {:.4}",
                NAMES[i],
                target,
                scored,
                every.per_position[i],
                ce.per_position[i],
                grad.row(i).norm()
            );
        }
        println!(
            "  scored positions: {} (= n - max(p, 1) = {} - {})",
            ce.count,
            n,
            objective.condition_len().max(1)
        );
        println!(
            "  loss: sum {:.4}, mean {:.4} (cross_entropy_grad's mean: {:.4})\n",
            ce.sum,
            ce.mean()?,
            mean
        );
        hidden.push(h);
    }

    // The prefix predictions A->B, B->C, C->D are computed by the model but do not count:
    // the prefix objectives' loss is exactly the causal per-position losses on D->a .. c->d,
    // when the attention is the same (prompt-masked vs causal).
    let (_, causal_logits) = model.run(&tokens, &Mask::causal())?;
    let causal = Objective::Causal.loss(&causal_logits, &tokens)?;
    let prompt = Objective::PromptMasked { prompt_len: 4 }.loss(&causal_logits, &tokens)?;
    let tail: f64 = causal.per_position[3..7].iter().sum();
    println!(
        "prompt-masked sum {:.6} = causal losses of D->a, a->b, b->c, c->d summed {:.6}",
        prompt.sum, tail
    );

    // At inference the sampling loop is the same; what differs is the prefix's
    // representation (and so the KV cache the continuation reads): in the prefix LM,
    // A already sees B, C and D.
    let diff_prefix = (hidden[1].rows(0, 4) - hidden[0].rows(0, 4)).amax();
    let diff_prompt = (hidden[2].rows(0, 4) - hidden[0].rows(0, 4)).amax();
    println!(
        "largest change of a prefix hidden state (layer 1) vs causal: prefix LM {diff_prefix:.4}, prompt-masked {diff_prompt:.4}"
    );

    // Packed: this example (prefix LM) and a causal one in one row of 12.
    let row = Packed::new([
        (8, Objective::PrefixLm { prefix_len: 4 }),
        (4, Objective::Causal),
    ])?;
    println!("\npacked row [A B C D a b c d][w x y z] (prefix_lm(4), causal):");
    print!("{}", row.attention_mask().grid(row.len(), row.len()));
    let lm: String = row
        .loss_mask(row.len())?
        .iter()
        .map(|&s| if s { "x " } else { ". " })
        .collect();
    println!("loss row:\n{}", lm.trim_end());
    Ok(())
}
