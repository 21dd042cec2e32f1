//! Why does attention divide by √d_k? The seed's simulation (question 2), in Rust.
//!
//! ```text
//! cargo run --release --example scaling_study -- [--out DIR] [--dk 4,64,256] [--keys 64]
//!                                                [--trials 2000] [--seed 42]
//! ```
//!
//! Prints the seed's table (plus the mean softmax Jacobian norm), and writes into DIR
//! (default: the current folder):
//!
//! - `attention_scaling_simulation_summary.csv`: the seed's 12 columns, then 2 Jacobian columns;
//! - the seed's four histograms for the largest d_k: `unscaled_logits_hist.svg`,
//!   `scaled_logits_hist.svg`, `unscaled_maxprob_hist.svg`, `scaled_maxprob_hist.svg`;
//! - `scaling_sweep.svg` and `attention_scaling_sweep.csv`: the same study over
//!   d_k = 1, 2, 4, ..., 1024 (logit variance, mean max probability, Jacobian norm and
//!   median query-gradient norm).
//!
//! See `docs/scaling.md` for the derivation and the results.

use attention_math::sheet::scaling::{ScalingReport, ScalingStudy};
use plotters::prelude::*;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Instant;

const USAGE: &str =
    "usage: scaling_study [--out DIR] [--dk 4,64,256] [--keys 64] [--trials 2000] [--seed 42]";

/// The d_k of the sweep figure: 1, 2, 4, ..., 1024.
const SWEEP: [usize; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

struct Args {
    out: PathBuf,
    d_k: Vec<usize>,
    keys: usize,
    trials: usize,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let defaults = ScalingStudy::new();
    let mut args = Args {
        out: PathBuf::from("."),
        d_k: defaults.d_k_list().to_vec(),
        keys: 64,
        trials: 2000,
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
        if !["--out", "--dk", "--keys", "--trials", "--seed"].contains(&flag.as_str()) {
            return Err(format!("unknown argument {arg}\n{USAGE}"));
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?,
        };
        let bad = |what: &str| format!("{flag}: {value:?} is not {what}\n{USAGE}");
        match flag.as_str() {
            "--out" => args.out = PathBuf::from(&value),
            "--dk" => {
                args.d_k = value
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad("a comma-separated list of positive integers"))?
            }
            "--keys" => args.keys = value.parse().map_err(|_| bad("a positive integer"))?,
            "--trials" => args.trials = value.parse().map_err(|_| bad("a positive integer"))?,
            "--seed" => args.seed = value.parse().map_err(|_| bad("an unsigned integer"))?,
            _ => unreachable!("flags are checked above"),
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

fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    std::fs::create_dir_all(&args.out)?;
    let study = ScalingStudy::new()
        .d_k(args.d_k.clone())
        .keys(args.keys)
        .trials(args.trials)
        .seed(args.seed);

    let start = Instant::now();
    let report = study.run()?;
    let study_time = start.elapsed();

    println!("缩放前后注意力数值对比（模拟）");
    print!("{report}");
    println!();
    print_gradient_summary(&report);

    let csv_path = args.out.join("attention_scaling_simulation_summary.csv");
    std::fs::write(&csv_path, report.to_csv())?;
    let mut written = vec![csv_path];
    written.extend(draw_histograms(&report, &args.out)?);

    let sweep_study = study.clone().d_k(SWEEP);
    let start = Instant::now();
    let sweep = sweep_study.run()?;
    let sweep_time = start.elapsed();
    let sweep_csv = args.out.join("attention_scaling_sweep.csv");
    std::fs::write(&sweep_csv, sweep.to_csv())?;
    written.push(sweep_csv);
    written.push(draw_sweep(&sweep, args.keys, args.trials, &args.out)?);

    println!(
        "study: d_k = {:?}, {} trials x {} keys: {:.3} s",
        args.d_k,
        args.trials,
        args.keys,
        study_time.as_secs_f64()
    );
    println!(
        "sweep: d_k = 1, 2, 4, ..., 1024 ({} values), {} trials x {} keys: {:.3} s",
        SWEEP.len(),
        args.trials,
        args.keys,
        sweep_time.as_secs_f64()
    );
    println!("wrote:");
    for p in written {
        println!("  {}", p.display());
    }
    Ok(())
}

/// What the mean Jacobian norm hides: how many rows of the last d_k pass almost no gradient.
fn print_gradient_summary(report: &ScalingReport) {
    let s = &report.samples;
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let dead = |v: &[f64]| 100.0 * v.iter().filter(|&&j| j < 0.01).count() as f64 / v.len() as f64;
    let (u, c) = (&s.unscaled.jacobian_fro, &s.scaled.jacobian_fro);
    println!(
        "softmax Jacobian ‖∂p/∂s‖_F at d_k = {}, m = {}: median {:.4} unscaled vs {:.4} scaled; \
         rows below 0.01 (almost no gradient): {:.1}% unscaled vs {:.1}% scaled",
        s.d_k,
        s.keys,
        median(u),
        median(c),
        dead(u),
        dead(c)
    );
}

/// numpy's `histogram(x, bins)`: `bins` equal bins spanning `[min, max]`, the last one closed.
/// Returns the left edge, the bin width and the counts.
fn histogram(values: impl Iterator<Item = f64> + Clone, bins: usize) -> (f64, f64, Vec<usize>) {
    let (lo, hi) = values
        .clone()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    };
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0; bins];
    for v in values {
        let b = (((v - lo) / width) as usize).min(bins - 1);
        counts[b] += 1;
    }
    (lo, width, counts)
}

/// How to draw one histogram.
struct Hist<'a> {
    /// The seed's Chinese title and its English translation, drawn as two lines.
    titles: (&'a str, &'a str),
    x_desc: &'a str,
    bins: usize,
    x_decimals: usize,
}

/// One histogram as an SVG bar chart.
fn draw_histogram(
    path: &Path,
    hist: &Hist<'_>,
    values: impl Iterator<Item = f64> + Clone,
) -> Result<(), Box<dyn Error>> {
    let bins = hist.bins;
    let (lo, width, counts) = histogram(values, bins);
    let hi = lo + width * bins as f64;
    let top = counts.iter().copied().max().unwrap_or(1) as f64 * 1.05;
    let root = SVGBackend::new(path, (960, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root
        .titled(hist.titles.0, ("sans-serif", 22))?
        .titled(hist.titles.1, ("sans-serif", 20))?;
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(lo..hi, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc(hist.x_desc)
        .y_desc("频数 / count")
        .x_label_formatter(&|x| format!("{x:.*}", hist.x_decimals))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .draw()?;
    let fill = RGBColor(31, 119, 180).mix(0.7).filled(); // matplotlib's default blue, alpha 0.7
    chart.draw_series(counts.iter().enumerate().map(|(i, &c)| {
        let x0 = lo + width * i as f64;
        Rectangle::new([(x0, 0.0), (x0 + width, c as f64)], fill)
    }))?;
    root.present()?;
    Ok(())
}

/// The seed's four histograms, for the last (largest) d_k of the study.
fn draw_histograms(report: &ScalingReport, out: &Path) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let s = &report.samples;
    let (d, m) = (s.d_k, s.keys);
    let logits = || s.logits().iter().copied();
    type Values<'a> = Box<dyn Fn() -> Vec<f64> + 'a>;
    // (file, Chinese title as the seed's, English title, x label, values, bins, x decimals)
    let figures: [(&str, String, String, &str, Values, usize, usize); 4] = [
        (
            "unscaled_logits_hist.svg",
            format!("未缩放 logits 分布（示例 d_k={d}, m={m}）"),
            format!("Unscaled logits (d_k={d}, m={m})"),
            "logit 值 / logit value",
            Box::new(|| logits().collect()),
            80,
            0,
        ),
        (
            "scaled_logits_hist.svg",
            format!("缩放后 logits 分布（/√d_k，示例 d_k={d}, m={m}）"),
            format!("Scaled logits (/√d_k, d_k={d}, m={m})"),
            "logit 值 / logit value",
            Box::new(|| s.scaled_logits().collect()),
            80,
            1,
        ),
        (
            "unscaled_maxprob_hist.svg",
            format!("未缩放：最大注意力权重分布（d_k={d}, m={m}）"),
            format!("Unscaled: max attention weight (d_k={d}, m={m})"),
            "max softmax prob",
            Box::new(|| s.unscaled.max_prob.clone()),
            50,
            2,
        ),
        (
            "scaled_maxprob_hist.svg",
            format!("缩放后：最大注意力权重分布（/√d_k，d_k={d}, m={m}）"),
            format!("Scaled: max attention weight (/√d_k, d_k={d}, m={m})"),
            "max softmax prob",
            Box::new(|| s.scaled.max_prob.clone()),
            50,
            2,
        ),
    ];
    let mut paths = Vec::new();
    for (file, zh, en, x_desc, values, bins, x_decimals) in figures {
        let path = out.join(file);
        let hist = Hist {
            titles: (&zh, &en),
            x_desc,
            bins,
            x_decimals,
        };
        draw_histogram(&path, &hist, values().into_iter())?;
        paths.push(path);
    }
    Ok(paths)
}

/// Draws the mesh of a sweep panel (log-scale d_k on x).
macro_rules! mesh {
    ($chart:expr, $y_desc:expr) => {
        $chart
            .configure_mesh()
            .x_desc("d_k (log scale)")
            .y_desc($y_desc)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y: &f64| format!("{}", (y * 100.0).round() / 100.0))
            .axis_desc_style(("sans-serif", 16))
            .label_style(("sans-serif", 13))
            .draw()?
    };
}

/// Draws the unscaled (red) and scaled (blue) curves of a sweep panel, and its legend.
macro_rules! two_series {
    ($chart:expr, $unscaled:expr, $scaled:expr, $legend:expr) => {{
        let red = RGBColor(214, 39, 40);
        let blue = RGBColor(31, 119, 180);
        for (points, color, label) in [
            ($unscaled, red, "unscaled (q·k)"),
            ($scaled, blue, "scaled (q·k/√d_k)"),
        ] {
            $chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
            $chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        $chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 14))
            .position($legend)
            .draw()?;
    }};
}

/// Four panels against d_k (log scale): logit variance, mean max probability, mean Jacobian
/// norm and median query-gradient norm, unscaled vs scaled.
fn draw_sweep(
    sweep: &ScalingReport,
    keys: usize,
    trials: usize,
    out: &Path,
) -> Result<PathBuf, Box<dyn Error>> {
    let path = out.join("scaling_sweep.svg");
    draw_sweep_to(sweep, keys, trials, &path)?;
    Ok(path)
}

fn draw_sweep_to(
    sweep: &ScalingReport,
    keys: usize,
    trials: usize,
    path: &Path,
) -> Result<(), Box<dyn Error>> {
    let root = SVGBackend::new(path, (1500, 1040)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root
        .titled(
            &format!("缩放前后随 d_k 的变化（m={keys}，{trials} 次试验）"),
            ("sans-serif", 24),
        )?
        .titled(
            &format!("Unscaled vs scaled logits across d_k (m={keys}, {trials} trials)"),
            ("sans-serif", 20),
        )?;
    let panels = root.split_evenly((2, 2));
    let d_max = sweep.rows.iter().map(|r| r.d_k).max().unwrap_or(1) as f64;
    let x_range = || (0.8..d_max * 1.25).log_scale();
    let pts = |f: &dyn Fn(&attention_math::sheet::scaling::ScalingRow) -> (f64, f64)| {
        let unscaled: Vec<(f64, f64)> = sweep.rows.iter().map(|r| (r.d_k as f64, f(r).0)).collect();
        let scaled: Vec<(f64, f64)> = sweep.rows.iter().map(|r| (r.d_k as f64, f(r).1)).collect();
        (unscaled, scaled)
    };

    // Panel 1: variance, log-log; the reference line Var = d_k.
    let (u, s) = pts(&|r| (r.unscaled.logit_var, r.scaled.logit_var));
    let y_max = u.iter().chain(&s).map(|p| p.1).fold(1.0, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(&panels[0])
        .caption("logit 方差 / logit variance", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range(), (0.4..y_max).log_scale())?;
    mesh!(chart, "logit variance (log scale)");
    chart
        .draw_series(LineSeries::new(
            SWEEP.iter().map(|&d| (d as f64, d as f64)),
            BLACK.mix(0.35).stroke_width(1),
        ))?
        .label("Var = d_k")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.35)));
    two_series!(chart, &u, &s, SeriesLabelPosition::UpperLeft);

    // Panel 2: mean max probability, with the uniform 1/m as reference.
    let (u, s) = pts(&|r| (r.unscaled.mean_max_prob, r.scaled.mean_max_prob));
    let mut chart = ChartBuilder::on(&panels[1])
        .caption(
            "平均最大注意力权重 / mean max softmax prob",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range(), 0.0..1.0)?;
    mesh!(chart, "mean max prob");
    let uniform = 1.0 / keys as f64;
    chart
        .draw_series(LineSeries::new(
            [(0.8, uniform), (d_max * 1.25, uniform)],
            BLACK.mix(0.35).stroke_width(1),
        ))?
        .label(format!("uniform 1/m = {uniform:.3}"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.35)));
    two_series!(chart, &u, &s, SeriesLabelPosition::UpperLeft);

    // Panel 3: mean Frobenius norm of the softmax Jacobian.
    let (u, s) = pts(&|r| (r.unscaled.mean_jacobian_fro, r.scaled.mean_jacobian_fro));
    let y_max = u.iter().chain(&s).map(|p| p.1).fold(0.0, f64::max) * 1.25;
    let mut chart = ChartBuilder::on(&panels[2])
        .caption("softmax 雅可比范数 / mean ‖∂p/∂s‖_F", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range(), 0.0..y_max)?;
    mesh!(chart, "mean Jacobian Frobenius norm");
    two_series!(chart, &u, &s, SeriesLabelPosition::UpperLeft);

    // Panel 4: median ‖∂L/∂q‖ through the backward pass, log scale (it falls by orders of
    // magnitude unscaled).
    let (u, s) = pts(&|r| (r.unscaled.median_grad_q_norm, r.scaled.median_grad_q_norm));
    let values = || u.iter().chain(&s).map(|p| p.1);
    let y_min = values().fold(f64::INFINITY, f64::min).max(1e-6) * 0.5;
    let y_max = values().fold(0.0, f64::max) * 3.0;
    let mut chart = ChartBuilder::on(&panels[3])
        .caption("query 梯度中位数 / median ‖∂L/∂q‖", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range(), (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("d_k (log scale)")
        .y_desc("median query gradient norm (log scale)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y: &f64| format!("{y:.0e}"))
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 13))
        .draw()?;
    two_series!(chart, &u, &s, SeriesLabelPosition::LowerLeft);

    root.present()?;
    Ok(())
}
