//! The kernel's attention statistics (`scaled_attention_with_stats`: max logit, entropy, max
//! probability, accumulated in the tiled pass) against the statistics of the reference's
//! materialised weights; the output with statistics bit for bit the output without; the
//! multi-head diagnostics; the stability monitor.

mod common;

use attention_math::sheet::diagnostics::{
    Alert, HeadObservation, MonitorConfig, StabilityMonitor, diagnose, diagnose_heads,
};
use attention_math::{
    AttentionOptions, AttentionStats, Float, Heads, Mask, scaled_attention_with,
    scaled_attention_with_stats,
};
use common::*;
use nalgebra::DMatrix;
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};

/// Inputs of one call, in f64 (converted per test).
#[derive(Clone, Debug)]
struct Case {
    q: DMatrix<f64>,
    k: DMatrix<f64>,
    v: DMatrix<f64>,
    bias: Option<DMatrix<f64>>,
    softcap: Option<f64>,
    scale: Option<f64>,
}

fn case(max_n: usize, max_m: usize, max_d: usize) -> impl Strategy<Value = Case> {
    (0..=max_n, 0..=max_m, 0..=max_d, 0..=3usize)
        .prop_flat_map(|(n, m, d, dv)| {
            (
                matrix(n, d),
                matrix(m, d),
                matrix(m, dv),
                proptest::option::weighted(
                    0.4,
                    proptest::collection::vec(
                        prop_oneof![9 => -3.0..3.0f64, 1 => Just(f64::NEG_INFINITY)],
                        n * m,
                    )
                    .prop_map(move |b| DMatrix::from_vec(n, m, b)),
                ),
                proptest::option::weighted(0.3, 0.2..10.0f64),
                proptest::option::weighted(0.3, -8.0..8.0f64),
            )
        })
        .prop_map(|(q, k, v, bias, softcap, scale)| Case {
            q,
            k,
            v,
            bias,
            softcap,
            scale,
        })
}

/// Runs the case in T with statistics on the kernel and on the reference (weights
/// requested), and checks them against each other, and the kernel's output and lse bit for
/// bit against the call without statistics.
fn check<T: Float>(c: &Case, mask: &Mask, threads: usize, tol: f64) {
    let conv = |x: &DMatrix<f64>| x.map(T::of_f64);
    let (q, k, v) = (conv(&c.q), conv(&c.k), conv(&c.v));
    let bias = c.bias.as_ref().map(conv);
    let mut opts = AttentionOptions::new().threads(threads);
    if let Some(s) = c.softcap {
        opts = opts.softcap(T::of_f64(s));
    }
    if let Some(s) = c.scale {
        opts = opts.scale(T::of_f64(s));
    }
    if let Some(b) = &bias {
        opts = opts.bias(b);
    }
    let plain = scaled_attention_with(&q, &k, &v, mask, &opts).unwrap();
    let (out, stats) = scaled_attention_with_stats(&q, &k, &v, mask, &opts).unwrap();
    let (n, m) = (q.nrows(), k.nrows());
    if (1..=8).contains(&n) && m >= 2 * n {
        // `scaled_attention_with` takes the decode path here, the statistics the tiled one:
        // the same results to rounding.
        let close = |a: T, b: T| {
            let (a, b) = (a.as_f64(), b.as_f64());
            a == b || (a - b).abs() <= tol * b.abs().max(1.0)
        };
        assert!(
            out.output
                .iter()
                .zip(plain.output.iter())
                .all(|(&a, &b)| close(a, b))
        );
        assert!(
            out.lse
                .iter()
                .zip(plain.lse.iter())
                .all(|(&a, &b)| close(a, b))
        );
    } else {
        // Bit for bit: the statistics do not touch the output or the lse.
        let bits = |x: &[T]| x.iter().map(|v| v.as_f64().to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(out.output.as_slice()), bits(plain.output.as_slice()));
        assert_eq!(bits(out.lse.as_slice()), bits(plain.lse.as_slice()));
    }
    let (_, want) =
        scaled_attention_with_stats(&q, &k, &v, mask, &opts.clone().return_weights(true)).unwrap();
    assert_stats_close(&stats, &want, tol);
}

fn assert_stats_close<T: Float>(got: &AttentionStats<T>, want: &AttentionStats<T>, tol: f64) {
    let n = want.entropy.len();
    assert_eq!(got.entropy.len(), n);
    for i in 0..n {
        let (ml, h, p) = (
            got.max_logit[i].as_f64(),
            got.entropy[i].as_f64(),
            got.max_prob[i].as_f64(),
        );
        let (wml, wh, wp) = (
            want.max_logit[i].as_f64(),
            want.entropy[i].as_f64(),
            want.max_prob[i].as_f64(),
        );
        if wml == f64::NEG_INFINITY {
            assert_eq!((ml, h, p), (wml, 0.0, 0.0), "row {i} fully masked");
            continue;
        }
        assert!(
            ml == wml || (ml - wml).abs() <= tol * wml.abs().max(1.0),
            "max_logit[{i}] {ml} vs {wml}"
        );
        assert!(
            h >= 0.0 && (h - wh).abs() <= tol * wh.max(1.0),
            "entropy[{i}] {h} vs {wh}"
        );
        assert!(
            p > 0.0 && p <= 1.0 && (p - wp).abs() <= tol,
            "max_prob[{i}] {p} vs {wp}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn f64_stats_equal_the_weights_stats(c in case(20, 20, 9), mask in any_mask()) {
        check::<f64>(&c, &mask, 1, 1e-11);
    }

    #[test]
    fn f32_stats_equal_the_weights_stats(c in case(20, 20, 9), mask in any_mask()) {
        check::<f32>(&c, &mask, 1, 2e-5);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Across tiles (f32 96 x 256, f64 48 x 128), on two threads.
    #[test]
    fn stats_across_tiles(c in case(130, 300, 8), mask in any_mask()) {
        check::<f64>(&c, &mask, 2, 1e-11);
        check::<f32>(&c, &mask, 2, 2e-5);
    }
}

fn seeded(n: usize, m: usize, d: usize, seed: u64, amp: f64) -> Case {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut mat =
        |r: usize, c: usize| DMatrix::from_fn(r, c, |_, _| rng.random_range(-1.0..1.0) * amp);
    Case {
        q: mat(n, d),
        k: mat(m, d),
        v: mat(m, 2),
        bias: None,
        softcap: None,
        scale: None,
    }
}

/// Several key tiles per row with the max moving between them, one and four threads: the
/// online rescaling of the statistics.
#[test]
fn stats_over_many_tiles_and_threads() {
    for (seed, amp) in [(1, 1.0), (2, 4.0), (3, 12.0)] {
        let c = seeded(200, 700, 16, seed, amp);
        for mask in [
            Mask::none(),
            Mask::causal_bottom_right(),
            Mask::sliding_window(300),
        ] {
            check::<f64>(&c, &mask, 1, 1e-11);
            check::<f64>(&c, &mask, 4, 1e-11);
            check::<f32>(&c, &mask, 4, 2e-5);
        }
    }
    // The same bits for any thread count.
    let c = seeded(300, 300, 8, 9, 3.0);
    let x = c.q.map(|v| v as f32);
    let run = |t| {
        scaled_attention_with_stats(
            &x,
            &x,
            &x,
            &Mask::causal(),
            &AttentionOptions::new().threads(t),
        )
        .unwrap()
        .1
    };
    assert_eq!(run(1), run(3));
}

/// Fully masked rows: max logit −inf, entropy 0, max probability 0 (mask, −inf bias, m = 0).
#[test]
fn fully_masked_rows() {
    let q = DMatrix::<f64>::from_fn(6, 3, |i, j| (i + j) as f64 * 0.3);
    let k = DMatrix::<f64>::from_fn(4, 3, |i, j| (i * j) as f64 * 0.2);
    // Causal bottom-right with n > m: the first two rows see nothing.
    let (_, s) = scaled_attention_with_stats(
        &q,
        &k,
        &k,
        &Mask::causal_bottom_right(),
        &AttentionOptions::new(),
    )
    .unwrap();
    for i in 0..2 {
        assert_eq!(
            (s.max_logit[i], s.entropy[i], s.max_prob[i]),
            (f64::NEG_INFINITY, 0.0, 0.0)
        );
    }
    assert!(s.max_logit.iter().skip(2).all(|l| l.is_finite()));
    // A −inf bias on every key of row 3.
    let bias = DMatrix::from_fn(6, 4, |i, _| if i == 3 { f64::NEG_INFINITY } else { 0.0 });
    let (_, s) = scaled_attention_with_stats(
        &q,
        &k,
        &k,
        &Mask::none(),
        &AttentionOptions::new().bias(&bias),
    )
    .unwrap();
    assert_eq!(
        (s.max_logit[3], s.entropy[3], s.max_prob[3]),
        (f64::NEG_INFINITY, 0.0, 0.0)
    );
    // No keys at all.
    let none = DMatrix::<f64>::zeros(0, 3);
    let (_, s) =
        scaled_attention_with_stats(&q, &none, &none, &Mask::none(), &AttentionOptions::new())
            .unwrap();
    assert!(s.max_logit.iter().all(|&l| l == f64::NEG_INFINITY));
    assert!(s.entropy.iter().chain(s.max_prob.iter()).all(|&x| x == 0.0));
}

/// Scores past the float range: the kernel recomputes the row exactly, statistics included,
/// and they are the reference's to the bit.
#[test]
fn exact_rows_with_huge_scores() {
    let q = DMatrix::<f32>::from_row_slice(3, 1, &[1e20, 1.0, -3e19]);
    let k = DMatrix::<f32>::from_row_slice(3, 1, &[1e20, 2e20, -1.0]);
    let opts = AttentionOptions::new();
    let (_, got) = scaled_attention_with_stats(&q, &k, &k, &Mask::none(), &opts).unwrap();
    let (_, want) = scaled_attention_with_stats(
        &q,
        &k,
        &k,
        &Mask::none(),
        &opts.clone().return_weights(true),
    )
    .unwrap();
    for i in [0, 2] {
        assert_eq!(
            got.max_logit[i].to_bits(),
            want.max_logit[i].to_bits(),
            "row {i}"
        );
        assert_eq!(got.entropy[i], want.entropy[i]);
        assert_eq!(got.max_prob[i], want.max_prob[i]);
    }
    // Row 0: scores 1e40 and 2e40, past f32's range; the larger wins with weight 1.
    assert_eq!((got.max_prob[0], got.entropy[0]), (1.0, 0.0));
    assert_eq!(got.max_logit[0], f32::INFINITY);
    assert_stats_close(&got, &want, 1e-5);
}

/// A nearly one-hot row keeps its tiny entropy to a relative error of a few ε (the textbook
/// `lse − Σ p s` would give 0 or noise of size ε · |lse|).
#[test]
fn tiny_entropy_is_relatively_accurate() {
    for gap in [5.0_f64, 20.0, 40.0, 200.0] {
        // Two keys, scores 1000 and 1000 − gap (scale 1, d = 1).
        let q = DMatrix::from_element(1, 1, 1.0_f64);
        let k = DMatrix::from_row_slice(2, 1, &[1000.0, 1000.0 - gap]);
        let (_, s) = scaled_attention_with_stats(
            &q,
            &k,
            &k,
            &Mask::none(),
            &AttentionOptions::new().scale(1.0),
        )
        .unwrap();
        // p = e^−gap / (1 + e^−gap); H = ln(1 + e^−gap) + gap · p.
        let t = (-gap).exp();
        let h = t.ln_1p() + gap * t / (1.0 + t);
        assert!(
            (s.entropy[0] - h).abs() <= 1e-13 * h,
            "gap {gap}: {} vs {h}",
            s.entropy[0]
        );
        assert!((s.max_prob[0] - 1.0 / (1.0 + t)).abs() < 1e-15);
        assert_eq!(s.max_logit[0], 1000.0);
    }
}

/// Softcap and bias (ALiBi too) enter the statistics as they enter the scores.
#[test]
fn softcap_and_bias() {
    let c = seeded(40, 60, 8, 5, 6.0);
    let bias = DMatrix::from_fn(40, 60, |i, j| {
        if (i + j) % 11 == 0 {
            f64::NEG_INFINITY
        } else {
            ((i * j) % 7) as f64 * 0.5
        }
    });
    for cap in [0.5, 5.0, 50.0] {
        let case = Case {
            softcap: Some(cap),
            bias: Some(bias.clone()),
            ..c.clone()
        };
        check::<f64>(&case, &Mask::causal(), 1, 1e-11);
        check::<f32>(&case, &Mask::causal(), 1, 2e-5);
        // Capped logits are below the cap plus the largest bias.
        let (_, s) = scaled_attention_with_stats(
            &c.q,
            &c.k,
            &c.v,
            &Mask::none(),
            &AttentionOptions::new().softcap(cap),
        )
        .unwrap();
        assert!(s.max_logit.iter().all(|&l| l <= cap));
    }
    let opts = AttentionOptions::new().alibi_slope(0.3);
    let (_, got) = scaled_attention_with_stats(&c.q, &c.k, &c.v, &Mask::causal(), &opts).unwrap();
    let (_, want) = scaled_attention_with_stats(
        &c.q,
        &c.k,
        &c.v,
        &Mask::causal(),
        &opts.clone().return_weights(true),
    )
    .unwrap();
    assert_stats_close(&got, &want, 1e-11);
}

/// `diagnose_heads` equals `diagnose` head by head, and its summary reduces the rows with at
/// least two allowed keys.
#[test]
fn heads_match_single_head_diagnostics() {
    let c = seeded(9, 9, 12, 11, 2.0);
    let opts = AttentionOptions::new();
    let heads = Heads::grouped(6, 3);
    let all = diagnose_heads(&c.q, c.k.columns(0, 6), heads, &Mask::causal(), &opts).unwrap();
    assert_eq!(all.len(), 6);
    for (h, d) in all.iter().enumerate() {
        let g = heads.kv_head(h);
        let one = diagnose(
            c.q.columns(2 * h, 2),
            c.k.columns(2 * g, 2),
            &Mask::causal(),
            &opts,
        )
        .unwrap();
        assert!((&d.rows.entropy - &one.entropy).amax() < 1e-14);
        assert!((&d.rows.max_logit - &one.max_logit).amax() < 1e-14);
        let s = d.summary;
        assert_eq!(s.rows, 8);
        let rows = 1..9;
        let mean = rows.clone().map(|i| one.normalized_entropy[i]).sum::<f64>() / 8.0;
        assert!((s.mean_normalized_entropy - mean).abs() < 1e-14);
        let min = rows
            .clone()
            .map(|i| one.normalized_entropy[i])
            .fold(f64::INFINITY, f64::min);
        assert_eq!(s.min_normalized_entropy, min);
        let max = rows
            .map(|i| one.max_logit[i])
            .fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(s.max_logit, max);
        assert!(s.max_prob > 0.0 && s.max_prob <= 1.0);
    }
    // Bad head counts are the multi-head errors.
    assert!(diagnose_heads(&c.q, &c.k, Heads::grouped(5, 2), &Mask::none(), &opts).is_err());
}

fn obs(h: f64, logit: f64) -> HeadObservation {
    HeadObservation {
        mean_normalized_entropy: h,
        min_normalized_entropy: h * 0.5,
        max_logit: logit,
    }
}

/// A synthetic collapse: logits grow 8% a step, entropy follows; the rates fire first, then
/// the levels. A healthy run (noisy, flat) stays quiet.
#[test]
fn monitor_fires_on_collapse_and_not_on_a_healthy_run() {
    let mut m = StabilityMonitor::new(MonitorConfig::default()).unwrap();
    let mut first = std::collections::BTreeMap::new();
    for t in 0..80 {
        let logit = 3.0 * 1.08_f64.powi(t);
        let h = (0.8 - 0.03 * t as f64).max(0.01);
        let alerts = m.observe(&[obs(0.7, 4.0), obs(h, logit)]).unwrap();
        for a in alerts {
            let head = match a {
                Alert::EntropyLow { head, .. }
                | Alert::EntropyFalling { head, .. }
                | Alert::LogitHigh { head, .. }
                | Alert::LogitGrowing { head, .. } => head,
                _ => unreachable!(),
            };
            assert_eq!(head, 1, "the healthy head is never flagged: {a}");
            first.entry(a.kind()).or_insert(t);
        }
    }
    assert_eq!(first["entropy-falling"], 8);
    assert_eq!(first["logit-growing"], 8);
    // 0.8 − 0.03 t < 0.1 from t = 24; 3 · 1.08^t > 50 from t = 37.
    assert_eq!(first["entropy-low"], 24);
    assert_eq!(first["logit-high"], 37);

    let mut m = StabilityMonitor::new(MonitorConfig::default()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for _ in 0..200 {
        let h = 0.6 + rng.random_range(-0.05..0.05);
        let l = 8.0 + rng.random_range(-1.0..1.0);
        assert!(
            m.observe(&[obs(h, l), obs(h * 0.5, l * 2.0)])
                .unwrap()
                .is_empty()
        );
    }
}

#[test]
fn monitor_rejects_bad_thresholds_and_observations() {
    let d = MonitorConfig::default();
    for bad in [
        MonitorConfig {
            entropy_floor: -0.1,
            ..d
        },
        MonitorConfig {
            entropy_floor: 1.0,
            ..d
        },
        MonitorConfig {
            entropy_floor: f64::NAN,
            ..d
        },
        MonitorConfig {
            entropy_fall_per_step: 0.0,
            ..d
        },
        MonitorConfig {
            logit_ceiling: f64::INFINITY,
            ..d
        },
        MonitorConfig {
            logit_growth_per_step: -1.0,
            ..d
        },
        MonitorConfig {
            growth_min_logit: 0.0,
            ..d
        },
        MonitorConfig { window: 0, ..d },
    ] {
        let e = StabilityMonitor::new(bad).unwrap_err();
        assert!(
            matches!(e, attention_math::Error::InvalidParameter { .. }),
            "{e}"
        );
    }
    let mut m = StabilityMonitor::new(d).unwrap();
    assert!(m.observe(&[]).is_err());
    let e = m.observe(&[obs(f64::NAN, 1.0)]).unwrap_err();
    assert_eq!(
        e,
        attention_math::Error::NonFinite {
            arg: "observation",
            row: 0,
            col: 0
        }
    );
    // A fully masked head (max logit −inf) is fine; +inf is a high logit.
    assert!(
        m.observe(&[obs(0.5, f64::NEG_INFINITY)])
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        m.observe(&[obs(0.5, f64::INFINITY)]).unwrap()[0].kind(),
        "logit-high"
    );
}

/// Scores of ±1e38 in one row (keys at f32's maximum, no values): a weight that underflows to
/// 0 where `s_j − max` itself overflows to −inf added `0 · −inf = NaN` to the entropy's sum
/// (found by the `diagnostics` fuzz target, through `diagnose`, which passes no values).
#[test]
fn an_overflowing_score_gap_does_not_make_the_entropy_nan() {
    use attention_math::{AttentionOptions, Mask, scaled_attention_with_stats};
    use nalgebra::DMatrix;
    let m = f32::MAX;
    let q = DMatrix::<f32>::from_row_slice(1, 2, &[0.5, -0.5]);
    // Scores (d = 2, scale 1/√2): ±MAX/(2√2), finite, in log₂ units too (±0.51 MAX); their
    // difference is not.
    let k = DMatrix::<f32>::from_row_slice(3, 2, &[m, 0.0, -m, 0.0, m, 0.0]);
    let v = DMatrix::<f32>::zeros(3, 0);
    let (_, st) =
        scaled_attention_with_stats(&q, &k, &v, &Mask::none(), &AttentionOptions::new()).unwrap();
    let (_, sr) = scaled_attention_with_stats(
        &q,
        &k,
        &v,
        &Mask::none(),
        &AttentionOptions::new().return_weights(true),
    )
    .unwrap();
    // Two equal winners: entropy ln 2.
    assert!(
        (st.entropy[0] - 2f32.ln()).abs() < 1e-6,
        "{}",
        st.entropy[0]
    );
    assert!(
        (sr.entropy[0] - 2f32.ln()).abs() < 1e-6,
        "{}",
        sr.entropy[0]
    );
}
