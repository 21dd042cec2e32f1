//! The machine's FMA peak, measured: independent chains of vector FMAs on registers only
//! (`acc = a·b + acc`, no loads or stores), AVX2 (8 f32 / 4 f64 lanes) and, if the CPU has
//! it, AVX-512 (16 / 8 lanes); one thread, then two threads at once (aggregate).
//! With latency L and T FMA units, at least L·T chains are needed to saturate; the
//! best count is reported. 1 FMA = 2 FLOPs.
//!
//! ```text
//! cargo run --release --bin fma_peak
//! ```

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    macro_rules! fma_loop {
        ($name:ident, $feat:literal, $vec:ty, $set1:ident, $fma:ident, $store:ident, $elem:ty, $lanes:expr) => {
            /// Runs `iters` rounds of `C` independent FMAs; returns a value that depends on them all.
            #[target_feature(enable = $feat)]
            pub fn $name<const C: usize>(iters: usize) -> $elem {
                let a = $set1(0.999_999);
                let b = $set1(1e-7);
                let mut acc: [$vec; C] = [$set1(0.0); C];
                for _ in 0..iters {
                    for x in acc.iter_mut() {
                        *x = $fma(a, b, *x);
                    }
                }
                let mut total = 0.0;
                for x in acc {
                    let mut lanes = [0.0 as $elem; $lanes];
                    // SAFETY: `lanes` has exactly one vector's worth of elements.
                    unsafe { $store(lanes.as_mut_ptr(), x) };
                    total += lanes.iter().sum::<$elem>();
                }
                total
            }
        };
    }
    fma_loop!(
        avx2_f32,
        "avx2,fma",
        __m256,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_storeu_ps,
        f32,
        8
    );
    fma_loop!(
        avx2_f64,
        "avx2,fma",
        __m256d,
        _mm256_set1_pd,
        _mm256_fmadd_pd,
        _mm256_storeu_pd,
        f64,
        4
    );
    fma_loop!(
        avx512_f32,
        "avx512f",
        __m512,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_storeu_ps,
        f32,
        16
    );
    fma_loop!(
        avx512_f64,
        "avx512f",
        __m512d,
        _mm512_set1_pd,
        _mm512_fmadd_pd,
        _mm512_storeu_pd,
        f64,
        8
    );
}

#[cfg(target_arch = "x86_64")]
fn main() {
    use attention_math_peers::median_secs;
    use std::hint::black_box;

    const ITERS: usize = 2_000_000;
    /// GFLOP/s of `threads` threads each running `f(ITERS)` with `chains` chains of `lanes` lanes.
    fn measure(f: fn(usize) -> f64, chains: usize, lanes: usize, threads: usize) -> f64 {
        let t = median_secs(
            || {
                std::thread::scope(|s| {
                    for _ in 0..threads {
                        s.spawn(|| black_box(f(black_box(ITERS))));
                    }
                });
            },
            7,
            0.5,
        );
        (threads * ITERS * chains * lanes * 2) as f64 / t * 1e-9
    }
    macro_rules! row {
        ($label:literal, $f:ident, $lanes:expr, $ok:expr, [$($c:literal),*]) => {
            if $ok {
                for threads in [1, 2] {
                    let results: Vec<(usize, f64)> = vec![$(
                        ($c, measure(|i| unsafe { x86::$f::<$c>(i) } as f64, $c, $lanes, threads)),
                    )*];
                    let best = results.iter().map(|r| r.1).fold(0.0, f64::max);
                    let all: Vec<String> =
                        results.iter().map(|(c, g)| format!("{c} chains {g:.1}")).collect();
                    println!(
                        "{:<12} {} thread(s): peak {best:6.1} GFLOP/s   ({})",
                        $label,
                        threads,
                        all.join(", ")
                    );
                }
            } else {
                println!("{:<12} not available on this CPU", $label);
            }
        };
    }
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    let avx512 = is_x86_feature_detected!("avx512f");
    // SAFETY (every `unsafe` call below): the target feature was detected at run time.
    // AVX2 has 16 vector registers: more than 12 chains (plus a and b) would spill.
    row!("AVX2 f32", avx2_f32, 8, avx2, [8, 10, 12]);
    row!("AVX2 f64", avx2_f64, 4, avx2, [8, 10, 12]);
    // AVX-512 has 32: 24 chains would fit, but rustc spills that loop to the stack (seen in
    // the disassembly: loads and stores around the FMAs, 54-59% of the 16-chain rate), so the
    // counts stop at 16, which already covers latency 4 x 2 units twice.
    row!("AVX-512 f32", avx512_f32, 16, avx512, [8, 12, 16]);
    row!("AVX-512 f64", avx512_f64, 8, avx512, [8, 12, 16]);
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("fma_peak measures x86-64 AVX2/AVX-512 only");
}
