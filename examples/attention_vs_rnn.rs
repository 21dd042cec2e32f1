//! Self-attention vs an RNN (seed question 1), measured.
//!
//! ```text
//! cargo run --release --example attention_vs_rnn -- [--out DIR] [--seed 42]
//! ```
//!
//! For width d = 64 it prints
//!
//! - for n = 16, 64, 256, 1024, the exact gradient norms `‖∂y_{n−1}/∂x_0‖` through one causal
//!   attention layer and one tanh RNN ([`PathStudy`]: `G_F = ‖J‖_F / √d` and `G_u = ‖uᵀ J‖`
//!   for a random unit u, geometric means over 8 draws);
//! - for n = 16 ... 4096,
//!   the sequential steps and FLOPs of one layer over the sequence, and the wall time of one
//!   layer (f32, fastest of several runs) for attention on one and two threads
//!   (`AttentionOptions::threads`) and for the RNN's loop (one thread: step t needs step t − 1);
//! - the sheet's question-1 table in English, each row with the measured numbers beside it and
//!   where the claim holds or needs care;
//!
//! and writes `attention_vs_rnn_gradient.svg` and `attention_vs_rnn_time.svg` into DIR
//! (default `docs/figures`). See `docs/attention-vs-rnn.md`.

use attention_math::sheet::rnn::{CausalAttention, PathRow, PathStudy, TanhRnn};
use attention_math::{AttentionOptions, Mask, scaled_attention_with};
use nalgebra::DMatrix;
use plotters::prelude::*;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: attention_vs_rnn [--out DIR] [--seed 42]";
/// The lengths of the gradient study.
const STUDY: [usize; 4] = [16, 64, 256, 1024];
/// Draws averaged in the gradient study (the weight P_0 varies from draw to draw).
const TRIALS: usize = 8;
/// The lengths timed (the study's and one more: the FLOP gap grows with n).
const LENGTHS: [usize; 5] = [16, 64, 256, 1024, 4096];
const WIDTH: usize = 64;

struct Args {
    out: PathBuf,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        out: PathBuf::from("docs/figures"),
        seed: 42,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        if flag != "--out" && flag != "--seed" {
            return Err(format!("unknown argument {arg}\n{USAGE}"));
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?,
        };
        match flag.as_str() {
            "--out" => args.out = PathBuf::from(value),
            _ => {
                args.seed = value
                    .parse()
                    .map_err(|_| format!("--seed: {value:?} is not an unsigned integer\n{USAGE}"))?
            }
        }
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Wall times of one layer over the whole sequence, in seconds (fastest of several runs).
struct Timing {
    n: usize,
    attention_1: f64,
    attention_2: f64,
    rnn: f64,
}

/// The fastest time of `f` over enough runs to fill about 60 ms (at least 3, at most 101):
/// on a shared machine the minimum is the run least disturbed by other processes.
fn median_time(mut f: impl FnMut()) -> f64 {
    f(); // warm-up: caches, the thread pool
    let start = Instant::now();
    f();
    let once = start.elapsed().max(Duration::from_nanos(1));
    let runs =
        (Duration::from_millis(60).as_secs_f64() / once.as_secs_f64()).clamp(3.0, 101.0) as usize;
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[0]
}

fn time_layers(seed: u64) -> Result<Vec<Timing>, Box<dyn Error>> {
    let n_max = *LENGTHS.iter().max().unwrap_or(&1);
    let layer = CausalAttention::<f32>::glorot(WIDTH, WIDTH, seed)?;
    let rnn = TanhRnn::<f32>::orthogonal_glorot(WIDTH, WIDTH, seed)?;
    let x_all = DMatrix::<f32>::from_fn(n_max, WIDTH, |i, j| {
        (((i * WIDTH + j) as f32) * 0.618_034).fract() * 3.4 - 1.7
    });
    let mut out = Vec::new();
    for &n in &LENGTHS {
        let x = x_all.rows(0, n).into_owned();
        // The projections are matrix products for both layers (and parallel in both); the
        // times below are of the part that differs: attention's kernel vs the recurrence.
        let (q, k, v) = (&x * layer.wq(), &x * layer.wk(), &x * layer.wv());
        let attend = |threads: usize| {
            let opts = AttentionOptions::new().threads(threads);
            median_time(|| {
                let o = scaled_attention_with(&q, &k, &v, &Mask::causal(), &opts).unwrap();
                std::hint::black_box(o);
            })
        };
        let (attention_1, attention_2) = (attend(1), attend(2));
        let rnn_time = median_time(|| {
            std::hint::black_box(rnn.forward(&x).unwrap());
        });
        out.push(Timing {
            n,
            attention_1,
            attention_2,
            rnn: rnn_time,
        });
    }
    Ok(out)
}

fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    std::fs::create_dir_all(&args.out)?;
    let start = Instant::now();
    let rows = PathStudy::new()
        .lengths(STUDY)
        .width(WIDTH)
        .trials(TRIALS)
        .seed(args.seed)
        .run()?;
    let study_time = start.elapsed();
    let start = Instant::now();
    let timings = time_layers(args.seed)?;
    let timing_time = start.elapsed();

    let d = WIDTH as f64;
    println!("One layer of width d = {WIDTH}: causal self-attention (1 head) vs tanh RNN");
    println!(
        "(gradients: f64, {TRIALS} draws, geometric means; times: f32, fastest of >= 3 runs, this machine)"
    );
    if let Some(load) = load_note() {
        println!("{load}");
    }
    println!();
    println!(
        "{:>5} | {:>13} {:>13} | {:>13} {:>13} | {:>10} | {:>9} {:>9} {:>9} | {:>9} {:>9}",
        "n",
        "attn G_F",
        "RNN G_F",
        "attn G_u",
        "RNN G_u",
        "seq. steps",
        "attn 1T",
        "attn 2T",
        "RNN 1T",
        "attn FLOP",
        "RNN FLOP"
    );
    println!("{}", "-".repeat(140));
    for t in &timings {
        let n = t.n as f64;
        let row = rows.iter().find(|r| r.n == t.n);
        let g = |f: fn(&PathRow) -> f64| row.map_or("—".to_string(), |r| sci(f(r)));
        println!(
            "{:>5} | {:>13} {:>13} | {:>13} {:>13} | {:>4} / {:<4} | {:>7.3}ms {:>7.3}ms {:>7.3}ms | {:>9} {:>9}",
            t.n,
            g(|r| r.attention.log10_jacobian_rms),
            g(|r| r.rnn.log10_jacobian_rms),
            g(|r| r.attention.log10_vjp),
            g(|r| r.rnn.log10_vjp),
            1,
            t.n,
            t.attention_1 * 1e3,
            t.attention_2 * 1e3,
            t.rnn * 1e3,
            eng(2.0 * n * (n + 1.0) * d),
            eng(4.0 * n * d * d),
        );
    }
    println!();
    println!(
        "G_F = ‖∂y_{{n−1}}/∂x_0‖_F / √d, G_u = ‖uᵀ ∂y_{{n−1}}/∂x_0‖ (y = h for the RNN). seq. steps: \
         attention / RNN. FLOP: attention's causal scores and weighted sum, 2 n (n + 1) d; the \
         RNN's input projection and recurrence, 4 n d²."
    );
    println!();
    print_sheet_table(&rows, &timings);
    println!();

    let g = draw_gradients(&rows, &args.out.join("attention_vs_rnn_gradient.svg"))?;
    let t = draw_times(&timings, &args.out.join("attention_vs_rnn_time.svg"))?;
    println!("wrote {} and {}", g.display(), t.display());
    println!(
        "study {:.2} s, timings {:.2} s",
        study_time.as_secs_f64(),
        timing_time.as_secs_f64()
    );
    Ok(())
}

/// The 1-minute load average against the logical CPUs (Linux), since other processes on the
/// machine take cores from the timings.
fn load_note() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let load: f64 = text.split_whitespace().next()?.parse().ok()?;
    let cpus = std::thread::available_parallelism().ok()?.get();
    Some(format!(
        "(load average {load:.1} on {cpus} logical CPUs while timing: other processes share the cores)"
    ))
}

/// `10^x` printed as `m.mme±k`, for exponents far outside f64's range.
fn sci(log10: f64) -> String {
    if !log10.is_finite() {
        return "0".to_string();
    }
    let e = log10.floor();
    format!("{:.2}e{}", 10f64.powf(log10 - e), e as i64)
}

/// A count with an SI suffix.
fn eng(x: f64) -> String {
    for (scale, suffix) in [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")] {
        if x >= scale {
            return format!("{:.1}{suffix}", x / scale);
        }
    }
    format!("{x:.0}")
}

/// The sheet's question-1 table in English, each row with the numbers measured at the largest
/// n <= 1024 and a verdict.
fn print_sheet_table(rows: &[PathRow], timings: &[Timing]) {
    let r = rows
        .iter()
        .filter(|r| r.n <= 1024)
        .max_by_key(|r| r.n)
        .unwrap_or(&rows[0]);
    let t = timings.iter().find(|t| t.n == r.n).unwrap_or(&timings[0]);
    let (n, d) = (r.n as f64, WIDTH as f64);
    let last = timings.last().expect("lengths are not empty");
    let measured_parallel = format!(
        "steps 1 vs {}; attention {:.2} ms on 1 thread, {:.2} ms on 2 ({:.2}x); RNN {:.2} ms, one thread only",
        r.n,
        t.attention_1 * 1e3,
        t.attention_2 * 1e3,
        t.attention_1 / t.attention_2,
        t.rnn * 1e3
    );
    let measured_gradient = format!(
        "G_F: attention {}, RNN {} (at n = 16: {} vs {})",
        sci(r.attention.log10_jacobian_rms),
        sci(r.rnn.log10_jacobian_rms),
        sci(rows[0].attention.log10_jacobian_rms),
        sci(rows[0].rnn.log10_jacobian_rms)
    );
    let measured_path = format!(
        "x_0 → y_{{n−1}}: 1 softmax-weighted sum vs {} tanh steps (n − 1 products with W)",
        r.n
    );
    let measured_global = format!(
        "attention scores {} (query, key) pairs per layer; the RNN none, all through a {}-float state",
        eng(n * (n + 1.0) / 2.0),
        WIDTH
    );
    let measured_efficiency = format!(
        "FLOPs {} vs {} ({:.0}x more for attention); at n = {}: {:.1} ms vs {:.1} ms",
        eng(2.0 * n * (n + 1.0) * d),
        eng(4.0 * n * d * d),
        (2.0 * n * (n + 1.0) * d) / (4.0 * n * d * d),
        last.n,
        last.attention_1 * 1e3,
        last.rnn * 1e3
    );
    let measured_memory = format!(
        "state at inference: KV cache 2 n d = {} floats per layer vs d = {} for the RNN",
        eng(2.0 * n * d),
        WIDTH
    );
    let table: [(&str, &str, &str, String, &str); 6] = [
        (
            "Parallelism",
            "sequential dependency: steps one by one (no parallelism)",
            "all positions computed at once (fully parallel)",
            measured_parallel,
            "holds for the sequence dimension: attention has no dependent steps. The RNN still \
             parallelises its input projection and across a batch; attention's speed-up is \
             bounded by cores, and on a CPU at d = 64 the RNN's few FLOPs can still win",
        ),
        (
            "Long-range dependencies",
            "gradients vanish or explode as steps grow",
            "any two positions linked directly by attention",
            measured_gradient,
            "holds, with care: the RNN's gradient decays exponentially even with an orthogonal W \
             (the tanh derivatives); attention's does not decay with distance but is diluted \
             like P_0 ≈ 1/n for diffuse weights. Direct is not the same as strong",
        ),
        (
            "Information path length",
            "first to last word: O(n)",
            "any two positions: O(1)",
            measured_path,
            "holds per layer (a deep stack adds its depth to both)",
        ),
        (
            "Global semantics",
            "relies on recurrent propagation of the hidden state",
            "every layer models all pairwise relations directly",
            measured_global,
            "holds, at O(n²) cost: every pair is scored",
        ),
        (
            "Efficiency and scaling",
            "hard to use GPU parallelism; long sequences degrade",
            "fully matrix-shaped, efficient training, scales to large models",
            measured_efficiency,
            "needs care: attention costs O(n² d) FLOPs against the RNN's O(n d²), more as soon as \
             n > 2d; it wins on parallel hardware and in training, not in FLOPs",
        ),
        (
            "Memory",
            "the hidden state is a compressed information bottleneck",
            "multi-head attention models several dependencies explicitly",
            measured_memory,
            "holds, and the other side of it: attention keeps every key and value (O(n d) per \
             layer while decoding, O(n²) scores if materialised), the RNN's state is O(d)",
        ),
    ];
    println!(
        "The sheet's question 1, row by row (measured at n = {}):",
        r.n
    );
    for (what, rnn_claim, attention_claim, measured, verdict) in table {
        println!();
        println!("{what}");
        println!("  RNN/LSTM (sheet):     {rnn_claim}");
        println!("  self-attention (sheet): {attention_claim}");
        println!("  measured:             {measured}");
        println!("  verdict:              {verdict}");
    }
}

/// One series of the gradient figure: label, colour, solid (Frobenius) or thin (one u).
type Series = (&'static str, RGBColor, bool, fn(&PathRow) -> f64);

const BLUE: RGBColor = RGBColor(31, 119, 180);
const RED: RGBColor = RGBColor(214, 39, 40);

/// One panel of the gradient figure: log10 norms against n (log scale), with an optional
/// 1/n reference through the first attention point.
fn gradient_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    rows: &[PathRow],
    series: &[Series],
    reference: bool,
) -> Result<(), Box<dyn Error>> {
    let n_max = rows.iter().map(|r| r.n).max().unwrap_or(1) as f64;
    let values = || {
        rows.iter()
            .flat_map(|r| series.iter().map(move |s| (s.3)(r)))
    };
    let y_min = values().fold(0.0, f64::min);
    let y_max = values().fold(f64::NEG_INFINITY, f64::max);
    let pad = ((y_max - y_min) * 0.08).max(0.2);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((8.0..n_max * 2.0).log_scale(), (y_min - pad)..(y_max + pad))?;
    chart
        .configure_mesh()
        .max_light_lines(2)
        .x_desc("sequence length n (log scale)")
        .y_desc("log10 ‖∂y_{n−1}/∂x_0‖")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .axis_desc_style(("sans-serif", 15))
        .label_style(("sans-serif", 13))
        .draw()?;
    for &(label, color, solid, f) in series {
        let points: Vec<(f64, f64)> = rows.iter().map(|r| (r.n as f64, f(r))).collect();
        let style = if solid {
            color.stroke_width(2)
        } else {
            color.mix(0.6).stroke_width(1)
        };
        chart
            .draw_series(LineSeries::new(points.iter().copied(), style))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    if let (true, Some(first)) = (reference, rows.first()) {
        let c = first.attention.log10_jacobian_rms + (first.n as f64).log10();
        chart
            .draw_series(LineSeries::new(
                rows.iter().map(|r| (r.n as f64, c - (r.n as f64).log10())),
                BLACK.mix(0.4).stroke_width(1),
            ))?
            .label("∝ 1/n")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.4)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    Ok(())
}

/// log10 of the gradient norms against n: both layers, then attention alone against 1/n.
fn draw_gradients(rows: &[PathRow], path: &Path) -> Result<PathBuf, Box<dyn Error>> {
    let root = SVGBackend::new(path, (1400, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "最后输出对第一个输入的梯度 / gradient of the last output w.r.t. the first input (d = 64)",
        ("sans-serif", 22),
    )?;
    let panels = root.split_evenly((1, 2));
    let attention: [Series; 2] = [
        ("attention, ‖J‖_F/√d", BLUE, true, |r| {
            r.attention.log10_jacobian_rms
        }),
        ("attention, ‖uᵀJ‖", BLUE, false, |r| {
            r.attention.log10_vjp
        }),
    ];
    let both: [Series; 4] = [
        attention[0],
        attention[1],
        ("tanh RNN, ‖J‖_F/√d", RED, true, |r| {
            r.rnn.log10_jacobian_rms
        }),
        ("tanh RNN, ‖uᵀJ‖", RED, false, |r| r.rnn.log10_vjp),
    ];
    gradient_panel(&panels[0], "attention vs tanh RNN", rows, &both, false)?;
    gradient_panel(
        &panels[1],
        "attention alone, against 1/n",
        rows,
        &attention,
        true,
    )?;
    root.present()?;
    Ok(path.to_path_buf())
}

/// One series of the time figure: label, colour, the time it plots.
type TimeSeries = (&'static str, RGBColor, fn(&Timing) -> f64);

/// Wall time of one layer against n, log-log.
fn draw_times(timings: &[Timing], path: &Path) -> Result<PathBuf, Box<dyn Error>> {
    let root = SVGBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let n_max = timings.iter().map(|t| t.n).max().unwrap_or(1) as f64;
    let all = || {
        timings
            .iter()
            .flat_map(|t| [t.attention_1, t.attention_2, t.rnn])
    };
    let y_min = all().fold(f64::INFINITY, f64::min) * 1e3 * 0.5;
    let y_max = all().fold(0.0, f64::max) * 1e3 * 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "一层的耗时（f32）/ wall time of one layer over the sequence (f32, d = 64)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((8.0..n_max * 2.0).log_scale(), (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .max_light_lines(2)
        .x_desc("sequence length n (log scale)")
        .y_desc("milliseconds (log scale)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.3}"))
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 13))
        .draw()?;
    let series: [TimeSeries; 3] = [
        ("attention, 1 thread", RGBColor(31, 119, 180), |t| {
            t.attention_1
        }),
        ("attention, 2 threads", RGBColor(44, 160, 44), |t| {
            t.attention_2
        }),
        ("tanh RNN (sequential)", RED, |t| t.rnn),
    ];
    for (label, color, f) in series {
        let points: Vec<(f64, f64)> = timings.iter().map(|t| (t.n as f64, f(t) * 1e3)).collect();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(path.to_path_buf())
}
