//! One attention workload of attention-math, timed: the crate's side of
//! `torch_compare.py` (which runs this binary alternately with PyTorch's
//! `scaled_dot_product_attention` on bit-identical inputs).
//!
//! ```text
//! sdpa --n 2048 [--m 2048] --d 64 [--dv 64] [--heads 1] [--kv-heads 1]
//!      [--mask none|causal|causal_br|window:W] [--dtype f32|f64] [--threads 1]
//!      [--backward | --cache | --read-kv] [--reps 5] [--min-secs 0] [--dump out.bin]
//! sdpa --info
//! ```
//!
//! One head and one KV head: `scaled_attention_with`; otherwise `multi_head_attention` with
//! `Heads::grouped(heads, kv_heads)` (Q is n x heads·d, head h in columns h·d..(h+1)·d;
//! K, V are m x kv_heads·d, m x kv_heads·dv). `--backward` times forward and
//! `attention_backward` together (one head only). `--cache` appends K and V to a `KvCache`
//! once, outside the timing, and times `KvCache::attention` (the decode step's real path: the
//! cache's keys were checked when appended, so they are not rescanned), with the mask
//! bottom-right aligned. `--read-kv` times no attention at all but one read of K and V (a sum
//! of every element with independent accumulators): the memory-bandwidth bound of a decode
//! step, measured in the same run; with `--cache`, of the cache's own memory (which asks for
//! huge pages), else of the input matrices.
//! Threads: `AttentionOptions::threads`. After one untimed warm-up call, runs at least
//! `--reps` calls and for at least `--min-secs` seconds, and prints one JSON line with the
//! per-call wall times in ms and their median.
//!
//! Inputs: element `(h, i, j)` of tensor `t` (0 = Q, 1 = K, 2 = V, 3 = dO), in the logical
//! (heads, rows, cols) layout, is `input_value(t, (h·rows + i)·cols + j)` below: integer
//! hashing and exact IEEE steps only, so `torch_compare.py` builds the same bits with numpy.
//! `--dump PATH` writes the warm-up call's results as raw little-endian values of the
//! dtype, each in (heads, rows, cols) row-major order: O, and for `--backward` also dQ, dK, dV.

use attention_math::{
    AttentionOptions, Float, Heads, KvCache, Mask, attention_backward, instruction_set,
    multi_head_attention, scaled_attention_with,
};
use nalgebra::DMatrix;
use std::hint::black_box;
use std::io::Write;
use std::time::Instant;

/// splitmix64's finaliser of `x + golden`: a well-mixed 64-bit hash.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform on [-√3, √3) (unit variance), in f64, for flat index `idx` of tensor `t`.
fn input_value(t: u64, idx: u64) -> f64 {
    let u = (splitmix64((t << 40) | idx) >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0);
    (2.0 * u - 1.0) * 3.0_f64.sqrt()
}

/// Tensor `t` of `heads` heads of `rows x cols`, as one `rows x heads·cols` matrix.
fn tensor<T: Float>(t: u64, heads: usize, rows: usize, cols: usize) -> DMatrix<T> {
    DMatrix::from_fn(rows, heads * cols, |i, c| {
        let (h, j) = (c / cols, c % cols);
        T::of_f64(input_value(t, ((h * rows + i) * cols + j) as u64))
    })
}

/// Appends `m` (rows x heads·cols) in (heads, rows, cols) row-major order.
fn push_heads<T: Float + ToLe>(buf: &mut Vec<u8>, m: &DMatrix<T>, heads: usize) {
    let cols = m.ncols() / heads;
    for h in 0..heads {
        for i in 0..m.nrows() {
            for j in 0..cols {
                m[(i, h * cols + j)].push_le(buf);
            }
        }
    }
}

trait ToLe {
    fn push_le(self, buf: &mut Vec<u8>);
}
impl ToLe for f32 {
    fn push_le(self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&self.to_le_bytes());
    }
}
impl ToLe for f64 {
    fn push_le(self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&self.to_le_bytes());
    }
}

struct Args {
    n: usize,
    m: usize,
    d: usize,
    dv: usize,
    heads: usize,
    kv_heads: usize,
    mask: String,
    dtype: String,
    threads: usize,
    backward: bool,
    cache: bool,
    read_kv: bool,
    reps: usize,
    min_secs: f64,
    dump: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut kv = std::collections::HashMap::new();
    let (mut backward, mut cache, mut read_kv) = (false, false, false);
    let mut it = argv.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--backward" => backward = true,
            "--cache" => cache = true,
            "--read-kv" => read_kv = true,
            s if s.starts_with("--") => {
                let v = it.next().ok_or(format!("{s} needs a value"))?;
                kv.insert(s[2..].to_string(), v);
            }
            s => return Err(format!("unexpected argument {s}")),
        }
    }
    let num = |k: &str, default: Option<usize>| -> Result<usize, String> {
        match kv.get(k) {
            Some(v) => v.parse().map_err(|e| format!("--{k} {v}: {e}")),
            None => default.ok_or(format!("--{k} is required")),
        }
    };
    let n = num("n", None)?;
    let d = num("d", Some(64))?;
    let heads = num("heads", Some(1))?;
    let args = Args {
        n,
        m: num("m", Some(n))?,
        d,
        dv: num("dv", Some(d))?,
        heads,
        kv_heads: num("kv-heads", Some(heads))?,
        mask: kv.get("mask").cloned().unwrap_or_else(|| "none".into()),
        dtype: kv.get("dtype").cloned().unwrap_or_else(|| "f32".into()),
        threads: num("threads", Some(1))?,
        backward,
        cache,
        read_kv,
        reps: num("reps", Some(5))?.max(1),
        min_secs: match kv.get("min-secs") {
            Some(v) => v.parse().map_err(|e| format!("--min-secs {v}: {e}"))?,
            None => 0.0,
        },
        dump: kv.get("dump").cloned(),
    };
    if let Some(k) = kv.keys().find(|k| {
        ![
            "n", "m", "d", "dv", "heads", "kv-heads", "mask", "dtype", "threads", "reps",
            "min-secs", "dump",
        ]
        .contains(&k.as_str())
    }) {
        return Err(format!("unknown option --{k}"));
    }
    if args.backward && (args.heads != 1 || args.kv_heads != 1) {
        return Err("--backward needs --heads 1 --kv-heads 1".into());
    }
    if args.backward && (args.cache || args.read_kv) {
        return Err("--backward excludes --cache and --read-kv".into());
    }
    Ok(args)
}

fn mask_of(name: &str) -> Result<Mask, String> {
    Ok(match name {
        "none" => Mask::none(),
        "causal" => Mask::causal(),
        "causal_br" => Mask::causal_bottom_right(),
        w if w.starts_with("window:") => Mask::sliding_window(
            w["window:".len()..]
                .parse()
                .map_err(|e| format!("mask {w}: {e}"))?,
        ),
        other => {
            return Err(format!(
                "unknown mask {other}: none, causal, causal_br or window:W"
            ));
        }
    })
}

/// The sum of `x` with 32 independent accumulators: one streaming read of `x`.
fn read_all<T: Float>(x: &[T]) -> T {
    let mut acc = [T::zero(); 32];
    let mut chunks = x.chunks_exact(32);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().copied().fold(T::zero(), |s, a| s + a)
        + chunks
            .remainder()
            .iter()
            .copied()
            .fold(T::zero(), |s, a| s + a)
}

/// Times the workload; returns the per-call times in seconds.
fn run<T: Float + ToLe>(a: &Args) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let q = tensor::<T>(0, a.heads, a.n, a.d);
    let k = tensor::<T>(1, a.kv_heads, a.m, a.d);
    let v = tensor::<T>(2, a.kv_heads, a.m, a.dv);
    let d_out = tensor::<T>(3, a.heads, a.n, a.dv);
    let mask = mask_of(&a.mask)?;
    let opts = AttentionOptions::<T>::new().threads(a.threads);
    let heads = Heads::grouped(a.heads, a.kv_heads);
    let single = a.heads == 1 && a.kv_heads == 1;
    let cache = if a.cache {
        let mut c = KvCache::<T>::with_capacity(a.kv_heads, a.d, a.dv, a.m)?;
        c.append(&k, &v)?;
        Some(c)
    } else {
        None
    };

    // One call of the timed work; returns what --dump writes.
    let call = |dump: bool| -> attention_math::Result<Vec<u8>> {
        let mut buf = Vec::new();
        if a.read_kv {
            // The cache's own memory (else the input matrices), column by column (each
            // column is contiguous), the columns split over `--threads` scoped threads.
            let (ck, cv) = match &cache {
                Some(c) => (c.all_keys(), c.all_values()),
                None => (k.as_view(), v.as_view()),
            };
            let cols: Vec<&[T]> = [&ck, &cv]
                .iter()
                .flat_map(|x| {
                    (0..x.ncols()).map(|j| {
                        let col = x.column(j);
                        // SAFETY: a column of a view with unit row stride is `nrows` consecutive
                        // elements, borrowed from `ck` / `cv`, which outlive `cols`.
                        unsafe { std::slice::from_raw_parts(col.as_ptr(), col.nrows()) }
                    })
                })
                .collect();
            let per = cols.len().div_ceil(a.threads.max(1));
            let sum = std::thread::scope(|s| {
                let parts: Vec<_> = cols
                    .chunks(per.max(1))
                    .map(|part| {
                        s.spawn(move || part.iter().fold(T::zero(), |acc, c| acc + read_all(c)))
                    })
                    .collect();
                parts
                    .into_iter()
                    .fold(T::zero(), |acc, h| acc + h.join().unwrap())
            });
            black_box(sum);
        } else if let Some(c) = &cache {
            let o = c.attention(&q, a.heads, &mask, &opts)?;
            if dump {
                push_heads(&mut buf, &o, a.heads);
            }
            black_box(o);
        } else if a.backward {
            let fwd = scaled_attention_with(&q, &k, &v, &mask, &opts)?;
            let g = attention_backward(&q, &k, &v, &mask, &opts, &fwd, &d_out)?;
            if dump {
                for m in [&fwd.output, &g.dq, &g.dk, &g.dv] {
                    push_heads(&mut buf, m, 1);
                }
            }
            black_box((fwd, g));
        } else if single {
            let fwd = scaled_attention_with(&q, &k, &v, &mask, &opts)?;
            if dump {
                push_heads(&mut buf, &fwd.output, 1);
            }
            black_box(fwd);
        } else {
            let o = multi_head_attention(&q, &k, &v, heads, &mask, &opts)?;
            if dump {
                push_heads(&mut buf, &o, a.heads);
            }
            black_box(o);
        }
        Ok(buf)
    };

    timed(a, call)
}

/// `--dtype f16|bf16 --cache`: the decode step through a half-precision `KvCache` (keys and
/// values stored in 16 bits, computed in f32, on the same f32 inputs rounded); `--read-kv`
/// reads the cache's own 16-bit memory.
fn run_half<S: attention_math::CacheElement<f32>>(
    a: &Args,
) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    if !a.cache || a.backward {
        return Err("--dtype f16 / bf16 needs --cache (and no --backward)".into());
    }
    let q = tensor::<f32>(0, a.heads, a.n, a.d);
    let k = tensor::<f32>(1, a.kv_heads, a.m, a.d);
    let v = tensor::<f32>(2, a.kv_heads, a.m, a.dv);
    let mask = mask_of(&a.mask)?;
    let opts = AttentionOptions::<f32>::new().threads(a.threads);
    let mut c = KvCache::<f32, S>::with_capacity(a.kv_heads, a.d, a.dv, a.m)?;
    c.append(&k, &v)?;
    let call = |dump: bool| -> attention_math::Result<Vec<u8>> {
        let mut buf = Vec::new();
        if a.read_kv {
            let bytes: Vec<&[u8]> = [c.all_keys(), c.all_values()]
                .iter()
                .flat_map(|x| {
                    (0..x.ncols()).map(|j| {
                        let col = x.column(j);
                        // SAFETY: a column of a view with unit row stride is `nrows`
                        // consecutive 2-byte elements, borrowed from the cache, which
                        // outlives `bytes`.
                        unsafe {
                            std::slice::from_raw_parts(col.as_ptr().cast::<u8>(), 2 * col.nrows())
                        }
                    })
                })
                .collect();
            let per = bytes.len().div_ceil(a.threads.max(1));
            let sum = std::thread::scope(|s| {
                let parts: Vec<_> = bytes
                    .chunks(per.max(1))
                    .map(|part| s.spawn(move || part.iter().map(|c| read_bytes(c)).sum::<u64>()))
                    .collect();
                parts.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
            });
            black_box(sum);
        } else {
            let o = c.attention(&q, a.heads, &mask, &opts)?;
            if dump {
                push_heads(&mut buf, &o, a.heads);
            }
            black_box(o);
        }
        Ok(buf)
    };
    timed(a, call)
}

/// Reads every byte of `x` once, 32 bytes at a time (the 16-bit cache's read bound).
fn read_bytes(x: &[u8]) -> u64 {
    let mut acc = [0u64; 4];
    let chunks = x.chunks_exact(32);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, w) in acc.iter_mut().zip(c.chunks_exact(8)) {
            *a = a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap()));
        }
    }
    acc.iter().fold(0u64, |s, &a| s.wrapping_add(a))
        + tail.iter().map(|&b| u64::from(b)).sum::<u64>()
}

/// One untimed call (its output written to `--dump` if asked), then `call` timed at least
/// `--reps` times and for at least `--min-secs`; the per-call seconds. `call(dump)` returns
/// what `--dump` writes.
fn timed(
    a: &Args,
    call: impl Fn(bool) -> attention_math::Result<Vec<u8>>,
) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let first = call(a.dump.is_some())?;
    if let Some(path) = &a.dump {
        std::fs::File::create(path)?.write_all(&first)?;
    }
    drop(first);
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < a.reps || start.elapsed().as_secs_f64() < a.min_secs {
        let t = Instant::now();
        call(false)?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
}

fn main() {
    if std::env::args().any(|a| a == "--info") {
        println!(
            "{{\"crate_version\":\"{}\",\"instruction_set\":\"{}\"}}",
            env!("CARGO_PKG_VERSION"),
            instruction_set()
        );
        return;
    }
    let result = parse_args()
        .map_err(Into::<Box<dyn std::error::Error>>::into)
        .and_then(|a| {
            let times = match a.dtype.as_str() {
                "f32" => run::<f32>(&a),
                "f64" => run::<f64>(&a),
                "f16" => run_half::<half::f16>(&a),
                "bf16" => run_half::<half::bf16>(&a),
                other => Err(format!("unknown dtype {other}: f32, f64, f16 or bf16").into()),
            }?;
            Ok((a, times))
        });
    match result {
        Ok((a, times)) => {
            let mut sorted = times.clone();
            sorted.sort_by(f64::total_cmp);
            let ms: Vec<String> = times.iter().map(|t| format!("{:.6}", t * 1e3)).collect();
            println!(
                "{{\"impl\":\"attention-math\",\"n\":{},\"m\":{},\"d\":{},\"dv\":{},\"heads\":{},\"kv_heads\":{},\"mask\":\"{}\",\"dtype\":\"{}\",\"threads\":{},\"backward\":{},\"cache\":{},\"read_kv\":{},\"median_ms\":{:.6},\"times_ms\":[{}]}}",
                a.n,
                a.m,
                a.d,
                a.dv,
                a.heads,
                a.kv_heads,
                a.mask,
                a.dtype,
                a.threads,
                a.backward,
                a.cache,
                a.read_kv,
                sorted[sorted.len() / 2] * 1e3,
                ms.join(",")
            );
        }
        Err(e) => {
            eprintln!("sdpa: {e}");
            std::process::exit(2);
        }
    }
}
