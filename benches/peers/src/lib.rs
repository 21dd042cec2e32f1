//! Shared helpers of the peer binaries: the root benches' inputs and hand-written nalgebra
//! attention (one definition, included from `benches/common`), a median timer, and
//! `/proc/self/status` readings.

#[path = "../../common/mod.rs"]
pub mod common;

use std::time::Instant;

/// Median wall time in seconds of `f` over at least `min_samples` calls and at least
/// `min_secs` seconds in total, after one untimed warm-up call.
pub fn median_secs(mut f: impl FnMut(), min_samples: usize, min_secs: f64) -> f64 {
    f();
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min_samples || start.elapsed().as_secs_f64() < min_secs {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// A `Key:  value kB` line of `/proc/self/status` (Linux), in bytes; `None` elsewhere.
pub fn proc_status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rest = status.lines().find_map(|l| l.strip_prefix(key))?;
    let kb: u64 = rest
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The value of `--name VALUE` on the command line, if given.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}
