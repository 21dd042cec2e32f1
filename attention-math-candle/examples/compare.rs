//! The fused op against candle's unfused CPU attention, in one process on the same f32
//! inputs: `q.matmul(&k.t()?)? * scale`, a precomputed 0/−inf bias for a mask (built once,
//! outside the timing), `candle_nn::ops::softmax_last_dim`, `.matmul(&v)`, and `repeat_kv`
//! (timed: model code repeats the KV heads on every call) for GQA.
//!
//! The two are timed alternately, one call each per round, and the medians are printed with
//! the ratio candle / fused (how many times faster the fused op is) and the max abs difference
//! of the outputs. `in-place ms` is the fused op again with K and V already laid out
//! column-major per head (`x.transpose(2, 3)?.contiguous()?.transpose(2, 3)?`), which it reads
//! without the copy it makes of candle's row-major layout: the difference is that copy.
//!
//! Threads: candle's matmuls and softmax and the fused op (its default, the current rayon
//! pool) all follow `RAYON_NUM_THREADS`, which this example sets to `--threads` (default 1)
//! before any pool starts.
//!
//! ```text
//! cargo run --release -p attention-math-candle --example compare -- [--threads 1] [--rounds 11]
//! ```

use attention_math_candle::{Mask, Options, scaled_dot_product_attention};
use candle_core::{DType, Device, Tensor};
use std::hint::black_box;
use std::time::Instant;

/// One workload: (B, H, G, n, m, d) and the mask.
struct Shape {
    name: &'static str,
    b: usize,
    h: usize,
    g: usize,
    n: usize,
    m: usize,
    d: usize,
    mask: Mask,
}

fn repeat_kv(x: &Tensor, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, g, m, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, g, rep, m, d))?
        .reshape((b, g * rep, m, d))
}

fn unfused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (_, h, _, d) = q.dims4()?;
    let g = k.dim(1)?;
    let (k, v) = (repeat_kv(k, h / g)?, repeat_kv(v, h / g)?);
    let mut s = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
    if let Some(b) = bias {
        s = s.broadcast_add(b)?;
    }
    candle_nn::ops::softmax_last_dim(&s)?.matmul(&v)
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn secs(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads: usize = arg("--threads").map_or(Ok(1), |s| s.parse())?;
    let rounds: usize = arg("--rounds").map_or(Ok(11), |s| s.parse())?;
    // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    let shapes = [
        Shape {
            name: "prefill causal",
            b: 1,
            h: 8,
            g: 8,
            n: 1024,
            m: 1024,
            d: 64,
            mask: Mask::causal(),
        },
        Shape {
            name: "decode 32q/8kv",
            b: 1,
            h: 32,
            g: 8,
            n: 1,
            m: 4096,
            d: 128,
            mask: Mask::causal_bottom_right(),
        },
    ];
    let dev = Device::Cpu;
    let opts = Options::new();
    println!(
        "f32, {threads} thread(s), {rounds} alternating rounds; medians; ratio = candle / fused"
    );
    println!(
        "{:<15} {:>26} | {:>9} {:>9} {:>7} | {:>9} | {:>12}",
        "workload", "(B, H/G, n, m, d)", "fused ms", "candle ms", "ratio", "max |d|", "in-place ms"
    );
    for s in &shapes {
        let q = Tensor::randn(0f32, 1.0, (s.b, s.h, s.n, s.d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (s.b, s.g, s.m, s.d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (s.b, s.g, s.m, s.d), &dev)?;
        // The mask as candle code passes it: a 0/-inf (n, m) tensor, built once (none when it
        // allows every key, as for a one-token decode step).
        let bias: Vec<f32> = (0..s.n * s.m)
            .map(|x| {
                if s.mask.allows_in(s.n, s.m, x / s.m, x % s.m) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let bias = match bias.iter().any(|b| b.is_infinite()) {
            true => Some(Tensor::from_vec(bias, (s.n, s.m), &dev)?),
            false => None,
        };
        let ours = scaled_dot_product_attention(&q, &k, &v, &s.mask, &opts)?;
        let theirs = unfused(&q, &k, &v, bias.as_ref())?;
        let diff = (&ours - &theirs)?
            .abs()?
            .to_dtype(DType::F64)?
            .max_all()?
            .to_scalar::<f64>()?;
        // K and V laid out column-major per head, which the op reads in place (no copy).
        let col_major = |x: &Tensor| -> candle_core::Result<Tensor> {
            x.transpose(2, 3)?.contiguous()?.transpose(2, 3)
        };
        let (kc, vc) = (col_major(&k)?, col_major(&v)?);
        let (mut t_ours, mut t_theirs, mut t_in_place) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            t_ours.push(secs(|| {
                black_box(scaled_dot_product_attention(&q, &k, &v, &s.mask, &opts).unwrap());
            }));
            t_in_place.push(secs(|| {
                black_box(scaled_dot_product_attention(&q, &kc, &vc, &s.mask, &opts).unwrap());
            }));
            t_theirs.push(secs(|| {
                black_box(unfused(&q, &k, &v, bias.as_ref()).unwrap());
            }));
        }
        let (a, b, c) = (median(t_ours), median(t_theirs), median(t_in_place));
        println!(
            "{:<15} {:>26} | {:>9.3} {:>9.3} {:>6.2}x | {:>9.1e} | {:>12.3}",
            s.name,
            format!("({}, {}/{}, {}, {}, {})", s.b, s.h, s.g, s.n, s.m, s.d),
            a * 1e3,
            b * 1e3,
            b / a,
            diff,
            c * 1e3
        );
    }
    Ok(())
}
