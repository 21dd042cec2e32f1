//! Attention entropy collapse, watched and prevented (study sheet Q7, loss spikes).
//!
//! ```text
//! cargo run --release --example entropy_collapse -- [--out DIR]
//! ```
//!
//! A toy layer: 128 random tokens (64 features), 4 causal heads of width 16, query and key
//! weights that grow 4% per step (`W ← 1.04 W`, what an unchecked weight norm does), so the
//! logits grow as `1.04^(2t)`. Each step runs `diagnose_heads` (the kernel's statistics, no
//! n x m weights) and feeds a `StabilityMonitor`. The same run with QK-norm (RMS-normalised
//! Q and K per head, times a fixed gain 2) and with soft-capping (`AttentionOptions::softcap`
//! at 50, Gemma 2's value, and at 5) shows what holds the entropy. Prints the table and writes
//! `DIR/entropy_collapse.svg` (default `docs/figures`). See `docs/stability.md`.

use attention_math::sheet::diagnostics::{
    HeadDiagnostics, MonitorConfig, StabilityMonitor, diagnose_heads, rms_normalize_rows,
};
use attention_math::{AttentionOptions, Heads, Mask};
use nalgebra::DMatrix;
use plotters::prelude::*;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::PathBuf;

const TOKENS: usize = 128;
const MODEL: usize = 64;
const HEADS: usize = 4;
const WIDTH: usize = MODEL / HEADS;
const STEPS: usize = 60;
const GROWTH: f64 = 0.04;
const GAIN: f64 = 2.0;

/// How a run keeps (or does not keep) its logits in check.
#[derive(Clone, Copy)]
enum Remedy {
    None,
    QkNorm,
    Softcap(f64),
}

impl Remedy {
    fn name(self) -> String {
        match self {
            Remedy::None => "no remedy".into(),
            Remedy::QkNorm => format!("QK-norm (gain {GAIN})"),
            Remedy::Softcap(c) => format!("softcap {c}"),
        }
    }
}

/// One step of one run, reduced over heads.
struct Row {
    step: usize,
    max_logit: f64,
    min_entropy: f64,
    mean_entropy: f64,
    max_prob: f64,
    flags: Vec<&'static str>,
}

fn gaussian(rows: usize, cols: usize, sd: f64, rng: &mut rand::rngs::StdRng) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |_, _| {
        let z: f64 = StandardNormal.sample(rng);
        z * sd
    })
}

/// Q or K with every head's columns RMS-normalised, times the gain.
fn qk_norm(x: &DMatrix<f64>) -> DMatrix<f64> {
    let mut y = x.clone();
    for h in 0..HEADS {
        let normed = rms_normalize_rows(x.columns(h * WIDTH, WIDTH), 1e-6).expect("eps > 0");
        y.columns_mut(h * WIDTH, WIDTH).copy_from(&(normed * GAIN));
    }
    y
}

fn run(remedy: Remedy) -> Vec<Row> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let x = gaussian(TOKENS, MODEL, 1.0, &mut rng);
    let mut wq = gaussian(MODEL, MODEL, 1.0 / (MODEL as f64).sqrt(), &mut rng);
    let mut wk = gaussian(MODEL, MODEL, 1.0 / (MODEL as f64).sqrt(), &mut rng);
    let mut monitor = StabilityMonitor::new(MonitorConfig::default()).expect("valid defaults");
    let opts = match remedy {
        Remedy::Softcap(c) => AttentionOptions::new().softcap(c),
        _ => AttentionOptions::new(),
    };
    let mut rows = Vec::new();
    for step in 0..STEPS {
        let (mut q, mut k) = (&x * &wq, &x * &wk);
        if let Remedy::QkNorm = remedy {
            (q, k) = (qk_norm(&q), qk_norm(&k));
        }
        let heads: Vec<HeadDiagnostics<f64>> =
            diagnose_heads(&q, &k, Heads::multi_head(HEADS), &Mask::causal(), &opts)
                .expect("valid inputs");
        let obs: Vec<_> = heads.iter().map(|h| h.summary.observation()).collect();
        let mut flags: Vec<&'static str> = monitor
            .observe(&obs)
            .expect("finite statistics")
            .iter()
            .map(|a| a.kind())
            .collect();
        flags.sort();
        flags.dedup();
        let fold = |f: fn(&HeadDiagnostics<f64>) -> f64, init: f64, pick: fn(f64, f64) -> f64| {
            heads.iter().map(f).fold(init, pick)
        };
        rows.push(Row {
            step,
            max_logit: fold(|h| h.summary.max_logit, f64::NEG_INFINITY, f64::max),
            min_entropy: fold(
                |h| h.summary.min_normalized_entropy,
                f64::INFINITY,
                f64::min,
            ),
            mean_entropy: heads
                .iter()
                .map(|h| h.summary.mean_normalized_entropy)
                .sum::<f64>()
                / HEADS as f64,
            max_prob: fold(
                |h| {
                    // The mean over rows of the largest weight: 1 when every row is one-hot.
                    let p = &h.max_prob;
                    p.iter().skip(1).sum::<f64>() / (p.len() - 1) as f64
                },
                0.0,
                f64::max,
            ),
            flags,
        });
        wq *= 1.0 + GROWTH;
        wk *= 1.0 + GROWTH;
    }
    rows
}

fn print_run(remedy: Remedy, rows: &[Row]) {
    println!("\n## {}\n", remedy.name());
    println!("| step | max logit | min H/ln a | mean H/ln a | mean max p | monitor |");
    println!("|---:|---:|---:|---:|---:|---|");
    for r in rows
        .iter()
        .filter(|r| r.step % 5 == 0 || r.step == STEPS - 1)
    {
        println!(
            "| {} | {:.2} | {:.3} | {:.3} | {:.3} | {} |",
            r.step,
            r.max_logit,
            r.min_entropy,
            r.mean_entropy,
            r.max_prob,
            r.flags.join(", ")
        );
    }
    let first = rows.iter().find(|r| !r.flags.is_empty());
    let saturated = rows.iter().find(|r| r.max_prob > 0.9);
    match first {
        Some(f) => println!(
            "\nfirst alert: step {} ({}); mean max p there {:.3}",
            f.step,
            f.flags.join(", "),
            f.max_prob
        ),
        None => println!("\nno alert"),
    }
    match saturated {
        Some(s) => println!("softmax saturated (mean max p > 0.9) at step {}", s.step),
        None => println!("softmax never saturated (mean max p <= 0.9)"),
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn plot(path: &std::path::Path, runs: &[(Remedy, Vec<Row>)]) -> Res<()> {
    let root = SVGBackend::new(path, (1500, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let colors = [
        RGBColor(214, 39, 40),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
    ];
    type Get = fn(&Row) -> f64;
    let specs: [(&str, Get, bool); 3] = [
        ("max logit (log scale)", |r| r.max_logit, true),
        ("mean normalised entropy", |r| r.mean_entropy, false),
        ("mean max probability", |r| r.max_prob, false),
    ];
    let fired = runs[0]
        .1
        .iter()
        .find(|r| !r.flags.is_empty())
        .map(|r| r.step);
    for (panel, (title, get, log)) in panels.iter().zip(specs) {
        let mut builder = ChartBuilder::on(panel);
        builder
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56);
        let xs = 0f64..(STEPS - 1) as f64;
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc("step")
                    .axis_desc_style(("sans-serif", 16))
                    .label_style(("sans-serif", 13))
                    .draw()?;
                for ((remedy, rows), &color) in runs.iter().zip(&colors) {
                    chart
                        .draw_series(LineSeries::new(
                            rows.iter().map(|r| (r.step as f64, get(r))),
                            color.stroke_width(2),
                        ))?
                        .label(remedy.name())
                        .legend(move |(x, y)| {
                            PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                        });
                }
                if let Some(t) = fired {
                    let (lo, hi) = if log { (0.5, 2000.0) } else { (0.0, 1.0) };
                    chart
                        .draw_series(LineSeries::new(
                            [(t as f64, lo), (t as f64, hi)],
                            BLACK.mix(0.4).stroke_width(1),
                        ))?
                        .label("first monitor alert (no remedy)")
                        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.4)));
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.3))
                    .label_font(("sans-serif", 13))
                    .position(SeriesLabelPosition::UpperLeft)
                    .draw()?;
            }};
        }
        if log {
            draw!(builder.build_cartesian_2d(xs, (0.5f64..2000.0).log_scale())?);
        } else {
            draw!(builder.build_cartesian_2d(xs, 0f64..1.05)?);
        }
    }
    root.present()?;
    Ok(())
}

fn main() -> Res<()> {
    let mut out = PathBuf::from("docs/figures");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--out", Some(dir)) => out = PathBuf::from(dir),
            _ => return Err("usage: entropy_collapse [--out DIR]".into()),
        }
    }
    std::fs::create_dir_all(&out)?;
    println!(
        "{TOKENS} tokens, {HEADS} causal heads of width {WIDTH}, W_q and W_k grow {}% per step",
        GROWTH * 100.0
    );
    let runs: Vec<(Remedy, Vec<Row>)> = [
        Remedy::None,
        Remedy::QkNorm,
        Remedy::Softcap(50.0),
        Remedy::Softcap(5.0),
    ]
    .into_iter()
    .map(|r| (r, run(r)))
    .collect();
    for (remedy, rows) in &runs {
        print_run(*remedy, rows);
    }
    let path = out.join("entropy_collapse.svg");
    plot(&path, &runs)?;
    println!("\nwrote {}", path.display());
    Ok(())
}
