//! Attention-math vs candle's CPU attention on the same inputs.
//!
//! candle's path is what candle model code does on CPU: `q.matmul(&k.t())? * scale`, plus a
//! precomputed 0/-inf mask for causal, `candle_nn::ops::softmax_last_dim`, `.matmul(&v)`.
//! Ours is `attention_math::scaled_attention`. Also timed: the two hand-written nalgebra
//! paths of the root benches (`nalgebra`: the obvious row-wise one; `nalgebra-t`: the
//! layout-aware one). Prints median times, GFLOP/s (dense 4·n·n·d, masked pairs counted),
//! the ratios other / ours (how many times faster ours is) and the max abs difference of
//! the outputs, ours vs candle and ours vs `nalgebra-t` (f32).
//!
//! Threads: candle (its gemm calls and softmax) and our default call both follow
//! `RAYON_NUM_THREADS`; this binary sets it to `--threads` (default 1) before anything
//! starts a thread pool.
//!
//! ```text
//! cargo run --release --bin candle -- [--n 256,1024,2048,4096] [--threads 1] [--mask none,causal]
//! ```

use attention_math::{Mask, scaled_attention};
use attention_math_peers::common::{
    HEAD_DIM, max_abs_diff, nalgebra_attention, nalgebra_attention_t, qkv,
};
use attention_math_peers::{arg, median_secs};
use candle_core::{Device, Tensor};
use nalgebra::DMatrix;
use std::hint::black_box;

fn to_tensor(m: &DMatrix<f32>) -> candle_core::Result<Tensor> {
    let row_major = m.transpose();
    Tensor::from_slice(row_major.as_slice(), m.shape(), &Device::Cpu)
}

fn candle_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let mut s = (q.matmul(&k.t()?)? * scale)?;
    if let Some(b) = bias {
        s = s.broadcast_add(b)?;
    }
    candle_nn::ops::softmax_last_dim(&s)?.matmul(v)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads: usize = arg("--threads").map_or(Ok(1), |s| s.parse())?;
    // SAFETY: nothing else runs yet (no thread has been started), so no concurrent
    // reader of the environment exists.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    let sizes: Vec<usize> = arg("--n")
        .unwrap_or_else(|| "256,1024,2048,4096".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let masks = arg("--mask").unwrap_or_else(|| "none,causal".into());
    let d = HEAD_DIM;
    let scale = 1.0 / (d as f64).sqrt();
    println!("f32, d = {d}, {threads} thread(s); medians; GFLOP/s = 4·n·n·d / time");
    println!(
        "{:<7} {:>6} | {:>9} {:>7} | {:>9} {:>7} | {:>9} {:>7} | {:>9} {:>7} | {:>8} {:>8} {:>8} | {:>9} {:>9}",
        "mask",
        "n",
        "ours ms",
        "GFLOP/s",
        "nalg. ms",
        "GFLOP/s",
        "nalg-t ms",
        "GFLOP/s",
        "candle ms",
        "GFLOP/s",
        "nalg/us",
        "nalg-t/us",
        "candle/us",
        "|d|candle",
        "|d|nalg-t"
    );
    for mask_name in masks.split(',') {
        for &n in &sizes {
            let (q, k, v) = qkv::<f32>(n, d);
            let mask = match mask_name {
                "none" => Mask::none(),
                "causal" => Mask::causal(),
                other => return Err(format!("unknown mask {other}: use none or causal").into()),
            };
            let bias = (mask_name != "none")
                .then(|| mask.to_bias::<f32>(n, n))
                .transpose()?;
            let (qt, kt, vt) = (to_tensor(&q)?, to_tensor(&k)?, to_tensor(&v)?);
            let bias_tensor = bias.as_ref().map(to_tensor).transpose()?;

            let ours = scaled_attention(&q, &k, &v, &mask)?;
            let theirs = candle_attention(&qt, &kt, &vt, bias_tensor.as_ref(), scale)?;
            let theirs = DMatrix::from_row_iterator(n, d, theirs.flatten_all()?.to_vec1::<f32>()?);
            let diff = max_abs_diff(&ours, &theirs);
            let bias_t = bias.as_ref().map(|b| b.transpose());
            let diff_t = max_abs_diff(&ours, &nalgebra_attention_t(&q, &k, &v, bias_t.as_ref()));

            let samples = if n >= 4096 { 5 } else { 11 };
            let t_ours = median_secs(
                || {
                    black_box(scaled_attention(&q, &k, &v, black_box(&mask)).unwrap());
                },
                samples,
                1.0,
            );
            let t_nalgebra = median_secs(
                || {
                    black_box(nalgebra_attention(&q, &k, &v, black_box(bias.as_ref())));
                },
                samples,
                1.0,
            );
            let t_nalgebra_t = median_secs(
                || {
                    black_box(nalgebra_attention_t(&q, &k, &v, black_box(bias_t.as_ref())));
                },
                samples,
                1.0,
            );
            let t_candle = median_secs(
                || {
                    black_box(
                        candle_attention(&qt, &kt, &vt, bias_tensor.as_ref(), scale).unwrap(),
                    );
                },
                samples,
                1.0,
            );
            let gflop = 4.0 * (n * n * d) as f64 * 1e-9;
            println!(
                "{:<7} {:>6} | {:>9.2} {:>7.1} | {:>9.2} {:>7.1} | {:>9.2} {:>7.1} | {:>9.2} {:>7.1} | {:>7.2}x {:>8.2}x {:>8.2}x | {:>9.1e} {:>9.1e}",
                mask_name,
                n,
                t_ours * 1e3,
                gflop / t_ours,
                t_nalgebra * 1e3,
                gflop / t_nalgebra,
                t_nalgebra_t * 1e3,
                gflop / t_nalgebra_t,
                t_candle * 1e3,
                gflop / t_candle,
                t_nalgebra / t_ours,
                t_nalgebra_t / t_ours,
                t_candle / t_ours,
                diff,
                diff_t
            );
        }
    }
    Ok(())
}
