//! Peak resident memory of one attention forward: n = m tokens (default 16384), d = 64,
//! f32, through `scaled_attention`, read from `VmHWM` in `/proc/self/status` (Linux) after
//! the call. The whole process counts: the inputs (3 x n x 64 f32), the output, the
//! kernel's scratch and the program itself.
//!
//! ```text
//! cargo run --release --example peak_memory -- [--n 16384] [--mask none|causal] [--limit-mib 160]
//! ```
//!
//! Exits with status 1 if the peak exceeds the limit (160 MiB by default, the budget of
//! docs/performance.md); prints a note and exits 0 where `/proc` is not available.

use attention_math::{Mask, scaled_attention};
use nalgebra::DMatrix;
use std::process::ExitCode;

/// A `Key:  value kB` line of `/proc/self/status`, in MiB.
fn status_mib(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rest = status.lines().find_map(|l| l.strip_prefix(key))?;
    let kb: f64 = rest
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1).cloned()
}

fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let n: usize = arg("--n").map_or(Ok(16384), |s| s.parse())?;
    let limit: f64 = arg("--limit-mib").map_or(Ok(160.0), |s| s.parse())?;
    let mask = match arg("--mask").as_deref() {
        None | Some("none") => Mask::none(),
        Some("causal") => Mask::causal(),
        Some(other) => return Err(format!("--mask {other}: use none or causal").into()),
    };
    let d = 64;
    // Deterministic inputs of order 1, no RNG needed.
    let q = DMatrix::<f32>::from_fn(n, d, |i, j| ((i * d + j) as f32 * 0.618).sin());
    let k = DMatrix::<f32>::from_fn(n, d, |i, j| ((i * d + j) as f32 * 0.414).cos());
    let v = DMatrix::<f32>::from_fn(n, d, |i, j| ((i + 3 * j) as f32 * 0.1).sin());
    let Some(before) = status_mib("VmHWM") else {
        println!("/proc/self/status is not available: cannot read the peak resident memory");
        return Ok(ExitCode::SUCCESS);
    };
    let start = std::time::Instant::now();
    let out = scaled_attention(&q, &k, &v, &mask)?;
    let secs = start.elapsed().as_secs_f64();
    let peak = status_mib("VmHWM").unwrap_or(f64::NAN);
    let inputs = (3 * n * d * 4) as f64 / (1 << 20) as f64;
    let dense = (n * n * 4) as f64 / (1 << 20) as f64;
    println!(
        "n = m = {n}, d = {d}, f32: forward {secs:.3} s, output[0][0] = {:.6}",
        out[(0, 0)]
    );
    println!(
        "inputs (Q, K, V): {inputs:.1} MiB; one n x n f32 score matrix would be {dense:.0} MiB"
    );
    println!("peak resident memory (VmHWM): before the call {before:.1} MiB, after {peak:.1} MiB");
    println!(
        "the call added {:.1} MiB at its peak; limit {limit} MiB: {}",
        peak - before,
        if peak <= limit { "ok" } else { "EXCEEDED" }
    );
    Ok(if peak <= limit {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
