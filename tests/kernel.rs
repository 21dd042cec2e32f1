//! The tiled kernel behind `scaled_attention_with` against the reference implementation:
//! random shapes (including tile edges and empty dimensions), every mask kind and
//! combination, softcap, scale and bias; fully masked rows; bit-identical results for any
//! thread count; the public exp.
//!
//! CI runs this in the debug profile: the random cases stay small, and the shapes larger
//! than a tile (f32 96 x 256, f64 48 x 128) are a handful of seeded cases.

mod common;

use attention_math::{
    AttentionOptions, AttentionOutput, Error, Float, Heads, Mask, exp_in_place,
    multi_head_attention, scaled_attention, scaled_attention_reference, scaled_attention_with,
};
use common::*;
use nalgebra::DMatrix;
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};

/// One attention call's inputs: q, k, v, an optional bias (with some `-inf` entries), an
/// optional softcap and an optional scale.
#[derive(Clone, Debug)]
struct Case {
    q: DMatrix<f64>,
    k: DMatrix<f64>,
    v: DMatrix<f64>,
    bias: Option<DMatrix<f64>>,
    softcap: Option<f64>,
    scale: Option<f64>,
}

/// A bias entry: mostly in [-3, 3], sometimes `-inf` (an additive mask).
fn bias_entry() -> impl Strategy<Value = f64> {
    prop_oneof![9 => -3.0..3.0f64, 1 => Just(f64::NEG_INFINITY)]
}

/// Cases with n in 0..=max_n, m in 0..=max_m, d in 0..=max_d, d_v in 0..=max_dv.
fn case(max_n: usize, max_m: usize, max_d: usize, max_dv: usize) -> impl Strategy<Value = Case> {
    (0..=max_n, 0..=max_m, 0..=max_d, 0..=max_dv)
        .prop_flat_map(|(n, m, d, dv)| {
            (
                matrix(n, d),
                matrix(m, d),
                matrix(m, dv),
                proptest::option::weighted(
                    0.4,
                    proptest::collection::vec(bias_entry(), n * m)
                        .prop_map(move |b| DMatrix::from_vec(n, m, b)),
                ),
                proptest::option::weighted(0.4, 0.2..10.0f64),
                proptest::option::weighted(0.2, -2.0..2.0f64),
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

/// Runs the kernel and the reference on a case converted to T, returns both.
fn both<T: Float>(c: &Case, mask: &Mask) -> (AttentionOutput<T>, AttentionOutput<T>) {
    let conv = |x: &DMatrix<f64>| x.map(T::of_f64);
    let (q, k, v) = (conv(&c.q), conv(&c.k), conv(&c.v));
    let bias = c.bias.as_ref().map(conv);
    let mut opts = AttentionOptions::new();
    if let Some(s) = c.softcap {
        opts = opts.softcap(T::of_f64(s));
    }
    if let Some(s) = c.scale {
        opts = opts.scale(T::of_f64(s));
    }
    if let Some(b) = &bias {
        opts = opts.bias(b);
    }
    let fast = scaled_attention_with(&q, &k, &v, mask, &opts).unwrap();
    let slow = scaled_attention_reference(&q, &k, &v, mask, &opts).unwrap();
    (fast, slow)
}

/// Kernel and reference agree to `tol`, relative to max(1, |reference|); `-inf` log-sum-exps
/// and the zero rows of fully masked queries are exact.
fn assert_close<T: Float>(fast: &AttentionOutput<T>, slow: &AttentionOutput<T>, tol: f64) {
    assert_eq!(fast.output.shape(), slow.output.shape());
    assert_eq!(fast.lse.len(), slow.lse.len());
    assert!(fast.weights.is_none());
    for (i, (&a, &b)) in fast.lse.iter().zip(slow.lse.iter()).enumerate() {
        let (a, b) = (a.as_f64(), b.as_f64());
        if b == f64::NEG_INFINITY {
            assert_eq!(a, b, "row {i} is fully masked");
            assert!(
                fast.output.row(i).iter().all(|&x| x == T::zero()),
                "row {i} not zero"
            );
        } else {
            assert!(
                (a - b).abs() <= tol * b.abs().max(1.0),
                "lse[{i}]: {a} vs {b}"
            );
        }
    }
    for (&a, &b) in fast.output.iter().zip(slow.output.iter()) {
        let (a, b) = (a.as_f64(), b.as_f64());
        assert!(
            (a - b).abs() <= tol * b.abs().max(1.0),
            "output: {a} vs {b}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// f64: the kernel equals the reference to ~1e-12, any shape (empty ones too), any mask,
    /// softcap, scale and bias.
    #[test]
    fn f64_kernel_equals_reference(c in case(20, 20, 9, 5), mask in any_mask()) {
        let (fast, slow) = both::<f64>(&c, &mask);
        assert_close(&fast, &slow, 1e-12);
    }

    /// f32: the same to ~1e-5.
    #[test]
    fn f32_kernel_equals_reference(c in case(20, 20, 9, 5), mask in any_mask()) {
        let (fast, slow) = both::<f32>(&c, &mask);
        assert_close(&fast, &slow, TOL_F32);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// Shapes across tile edges (n up to 130 > 96 and 48 query rows, m up to 300 > 256 and
    /// 128 keys per tile), few cases to stay fast in debug builds.
    #[test]
    fn kernel_equals_reference_across_tiles(c in case(130, 300, 12, 4), mask in any_mask()) {
        let (fast, slow) = both::<f64>(&c, &mask);
        assert_close(&fast, &slow, 1e-12);
        let (fast, slow) = both::<f32>(&c, &mask);
        assert_close(&fast, &slow, TOL_F32);
    }
}

/// Seeded inputs of a given shape, entries in [-2, 2].
fn seeded(n: usize, m: usize, d: usize, dv: usize, seed: u64) -> Case {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut mat = |r: usize, c: usize| DMatrix::from_fn(r, c, |_, _| rng.random_range(-2.0..2.0));
    Case {
        q: mat(n, d),
        k: mat(m, d),
        v: mat(m, dv),
        bias: None,
        softcap: None,
        scale: None,
    }
}

/// Every named mask and some combinations, with parameters that cut through tiles.
fn tile_masks() -> Vec<Mask> {
    let ids: Vec<usize> = (0..400).map(|i| i / 70).collect();
    vec![
        Mask::none(),
        Mask::causal(),
        Mask::causal_bottom_right(),
        Mask::prefix_lm(100),
        Mask::sliding_window(60),
        Mask::key_padding(200),
        Mask::documents(ids.clone()),
        Mask::documents(ids).and(Mask::causal()),
        Mask::from_fn(|i, j| (i + 3 * j) % 7 != 0),
        Mask::sliding_window(30).or(Mask::key_padding(5)),
        Mask::causal().not(),
        Mask::prefix_lm(20).and(Mask::key_padding(150)).not(),
    ]
}

/// Larger shapes with d = 64 (the shape the kernel is tuned for), every mask: multiple
/// query and key tiles, partial last tiles, n != m, d_v != d.
#[test]
fn large_shapes_every_mask() {
    for (t, &(n, m, d, dv)) in [(200, 300, 64, 40), (97, 257, 64, 64), (300, 129, 20, 70)]
        .iter()
        .enumerate()
    {
        let c = seeded(n, m, d, dv, t as u64);
        for mask in tile_masks() {
            let (fast, slow) = both::<f64>(&c, &mask);
            assert_close(&fast, &slow, 1e-12);
            let (fast, slow) = both::<f32>(&c, &mask);
            assert_close(&fast, &slow, TOL_F32);
        }
    }
}

/// Softcap, scale and a bias with `-inf` entries on multi-tile shapes.
#[test]
fn large_shapes_softcap_and_bias() {
    let mut c = seeded(150, 270, 32, 16, 9);
    let bias = DMatrix::from_fn(150, 270, |i, j| match (3 * i + j) % 11 {
        0 => f64::NEG_INFINITY,
        r => (r as f64 - 5.0) * 0.4,
    });
    c.bias = Some(bias);
    c.softcap = Some(3.0);
    for mask in [Mask::none(), Mask::causal(), Mask::sliding_window(40)] {
        let (fast, slow) = both::<f64>(&c, &mask);
        assert_close(&fast, &slow, 1e-12);
        let (fast, slow) = both::<f32>(&c, &mask);
        assert_close(&fast, &slow, TOL_F32);
    }
    c.softcap = None;
    c.scale = Some(0.05);
    let (fast, slow) = both::<f64>(&c, &Mask::prefix_lm(60));
    assert_close(&fast, &slow, 1e-12);
}

/// Large logits: the running maximum moves by a lot between key tiles, so the rescaling
/// (α far from 1, exponentials that underflow) is exercised.
#[test]
fn large_logits_rescale_correctly() {
    let mut c = seeded(100, 600, 64, 8, 4);
    // Later keys get larger scores, so the maximum keeps rising from tile to tile.
    for j in 0..600 {
        let f = 1.0 + j as f64 / 60.0;
        c.k.row_mut(j).scale_mut(f);
    }
    c.q.scale_mut(2.0);
    for mask in [Mask::none(), Mask::causal_bottom_right()] {
        let (fast, slow) = both::<f64>(&c, &mask);
        assert_close(&fast, &slow, 1e-11);
        let (fast, slow) = both::<f32>(&c, &mask);
        assert_close(&fast, &slow, 1e-4);
    }
}

#[test]
fn empty_dimensions_are_defined() {
    let opts = AttentionOptions::new();
    // n = 0.
    let out = scaled_attention_with(
        &DMatrix::<f32>::zeros(0, 4),
        &DMatrix::<f32>::zeros(3, 4),
        &DMatrix::<f32>::zeros(3, 2),
        &Mask::none(),
        &opts,
    )
    .unwrap();
    assert_eq!((out.output.shape(), out.lse.len()), ((0, 2), 0));
    // m = 0: nothing to attend to.
    let out = scaled_attention_with(
        &DMatrix::<f32>::from_element(5, 4, 1.0),
        &DMatrix::<f32>::zeros(0, 4),
        &DMatrix::<f32>::zeros(0, 2),
        &Mask::none(),
        &opts,
    )
    .unwrap();
    assert_eq!(out.output, DMatrix::zeros(5, 2));
    assert!(out.lse.iter().all(|&l| l == f32::NEG_INFINITY));
    // d = 0: every score is 0, uniform weights over the allowed keys, lse = ln(count).
    let v = DMatrix::<f64>::from_fn(300, 1, |j, _| j as f64);
    let out = scaled_attention_with(
        &DMatrix::<f64>::zeros(300, 0),
        &DMatrix::<f64>::zeros(300, 0),
        &v,
        &Mask::causal(),
        &AttentionOptions::new(),
    )
    .unwrap();
    for i in [0, 1, 150, 299] {
        assert!((out.output[(i, 0)] - i as f64 / 2.0).abs() < 1e-12);
        assert!((out.lse[i] - ((i + 1) as f64).ln()).abs() < 1e-12);
    }
    // d_v = 0: no output columns, but the lse is still computed.
    let x = DMatrix::<f64>::from_fn(3, 2, |i, j| (i + j) as f64);
    let opts = AttentionOptions::new();
    let out =
        scaled_attention_with(&x, &x, &DMatrix::<f64>::zeros(3, 0), &Mask::none(), &opts).unwrap();
    let want =
        scaled_attention_reference(&x, &x, &DMatrix::<f64>::zeros(3, 0), &Mask::none(), &opts)
            .unwrap();
    assert_eq!(out.output.shape(), (3, 0));
    assert!((out.lse - want.lse).amax() < 1e-14);
}

/// Fully masked rows, whichever way they arise (mask, bias of `-inf`, n > m bottom-right):
/// exact zeros and lse = -inf, never NaN, on multi-tile shapes.
#[test]
fn fully_masked_rows_are_exact_zeros() {
    let c = seeded(260, 140, 16, 8, 5);
    let (n, m) = (260, 140);
    // Bottom-right causal with n > m: the first n - m = 120 rows see nothing; key padding
    // and documents add more empty rows (queries past the ids belong to no document).
    let masks = [
        Mask::causal_bottom_right(),
        Mask::key_padding(0),
        Mask::documents(vec![0; 100]),
        Mask::from_fn(|i, _| i % 3 == 0).and(Mask::causal()),
    ];
    let mut bias = DMatrix::<f64>::zeros(n, m);
    bias.rows_mut(10, 40).fill(f64::NEG_INFINITY);
    for mask in masks {
        for with_bias in [false, true] {
            let mut c = c.clone();
            c.bias = with_bias.then(|| bias.clone());
            let (fast, slow) = both::<f64>(&c, &mask);
            assert!(fast.lse.iter().any(|&l| l == f64::NEG_INFINITY), "{mask}");
            assert!(fast.output.iter().all(|x| !x.is_nan()));
            assert_close(&fast, &slow, 1e-12);
            let (fast, slow) = both::<f32>(&c, &mask);
            assert!(fast.output.iter().all(|x| !x.is_nan()));
            assert_close(&fast, &slow, TOL_F32);
        }
    }
}

/// The result does not depend on the number of threads, to the bit.
#[test]
fn threads_give_identical_bits() {
    // n = 333 is 4 query tiles in f32 (7 in f64): enough that the pool really is used
    // (a call of one tile runs on the calling thread alone).
    let c = seeded(333, 290, 40, 24, 6);
    let conv32 = |x: &DMatrix<f64>| x.map(|v| v as f32);
    let (q32, k32, v32) = (conv32(&c.q), conv32(&c.k), conv32(&c.v));
    for mask in [
        Mask::none(),
        Mask::causal(),
        Mask::documents((0..333).map(|i| i / 50).collect::<Vec<_>>()),
    ] {
        let run64 = |opts: AttentionOptions<'_, f64>| {
            scaled_attention_with(&c.q, &c.k, &c.v, &mask, &opts).unwrap()
        };
        let one = run64(AttentionOptions::new().threads(1));
        assert_eq!(one, run64(AttentionOptions::new().threads(2)));
        assert_eq!(one, run64(AttentionOptions::new().threads(3)));
        assert_eq!(one, run64(AttentionOptions::new()));
        let run32 = |opts: AttentionOptions<'_, f32>| {
            scaled_attention_with(&q32, &k32, &v32, &mask, &opts).unwrap()
        };
        let one = run32(AttentionOptions::new().threads(1));
        assert_eq!(one, run32(AttentionOptions::new().threads(2)));
        assert_eq!(one, run32(AttentionOptions::new()));
        // The short form is the same call.
        assert_eq!(
            one.output,
            scaled_attention(&q32, &k32, &v32, &mask).unwrap()
        );
    }
}

/// Calls made from inside a user's rayon pool, several at once (the default threads, the
/// user's pool, and private pools of 2 and 3): the same bits as on one thread, forward and
/// backward, and no call waits on a worker that is busy with another call.
#[test]
fn calls_from_inside_a_rayon_pool_give_the_same_bits() {
    use rayon::prelude::*;
    let c = seeded(300, 260, 32, 16, 9);
    let g = DMatrix::<f64>::from_fn(300, 16, |i, j| ((i * 16 + j) as f64 * 0.37).sin());
    let mask = Mask::causal();
    let run = |threads: Option<usize>| {
        let mut opts = AttentionOptions::new();
        if let Some(t) = threads {
            opts = opts.threads(t);
        }
        let fwd = scaled_attention_with(&c.q, &c.k, &c.v, &mask, &opts).unwrap();
        let grads =
            attention_math::attention_backward(&c.q, &c.k, &c.v, &mask, &opts, &fwd, &g).unwrap();
        (fwd, grads.dq, grads.dk, grads.dv)
    };
    let want = run(Some(1));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let got: Vec<_> = pool.install(|| {
        [None, Some(2), Some(3), None, Some(2), None]
            .into_par_iter()
            .map(run)
            .collect()
    });
    for (i, r) in got.iter().enumerate() {
        assert!(r == &want, "call {i}");
    }
}

/// Multi-head attention: heads in parallel give the same bits as one call per head, for
/// any thread count.
#[test]
fn multi_head_is_per_head_kernel_calls_for_any_thread_count() {
    let c = seeded(150, 150, 48, 24, 8); // 4 query heads of 12, 2 kv heads of 24 / 12
    let heads = Heads::grouped(4, 2);
    let mask = Mask::causal();
    let run = |opts: AttentionOptions<'_, f64>| {
        multi_head_attention(&c.q, c.k.columns(0, 24), &c.v, heads, &mask, &opts).unwrap()
    };
    let one = run(AttentionOptions::new().threads(1));
    assert_eq!(one, run(AttentionOptions::new().threads(2)));
    assert_eq!(one, run(AttentionOptions::new()));
    for h in 0..4 {
        let g = heads.kv_head(h);
        let head = scaled_attention(
            c.q.columns(12 * h, 12),
            c.k.columns(12 * g, 12),
            c.v.columns(12 * g, 12),
            &mask,
        )
        .unwrap();
        assert_eq!(one.columns(12 * h, 12), head);
    }
}

/// Strided views (columns and rows of larger matrices) give the same bits as owned copies.
#[test]
fn views_equal_owned_copies() {
    let big = seeded(300, 300, 80, 0, 10).q;
    let (q, k, v) = (
        big.view((5, 3), (120, 33)),
        big.view((0, 40), (200, 33)),
        big.view((100, 1), (200, 9)),
    );
    let opts = AttentionOptions::new().softcap(5.0);
    let a = scaled_attention_with(q, k, v, &Mask::sliding_window(50), &opts).unwrap();
    let b = scaled_attention_with(
        &q.into_owned(),
        &k.into_owned(),
        &v.into_owned(),
        &Mask::sliding_window(50),
        &opts,
    )
    .unwrap();
    assert_eq!(a, b);
}

/// Asking for the weights takes the reference path: the same result, to the bit.
#[test]
fn return_weights_uses_the_reference() {
    let c = seeded(60, 70, 8, 3, 11);
    let opts = AttentionOptions::new().return_weights(true);
    let a = scaled_attention_with(&c.q, &c.k, &c.v, &Mask::causal(), &opts).unwrap();
    let b = scaled_attention_reference(&c.q, &c.k, &c.v, &Mask::causal(), &opts).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.weights.unwrap().shape(), (60, 70));
}

/// Errors come from the same validation as the reference.
#[test]
fn errors_match_the_reference() {
    let q = DMatrix::<f32>::zeros(3, 4);
    let mut k = DMatrix::<f32>::zeros(5, 4);
    k[(2, 1)] = f32::NAN;
    let v = DMatrix::<f32>::zeros(5, 2);
    let opts = AttentionOptions::new();
    assert_eq!(
        scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap_err(),
        Error::NonFinite {
            arg: "k",
            row: 2,
            col: 1
        }
    );
    let k = DMatrix::<f32>::zeros(5, 3);
    assert_eq!(
        scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap_err(),
        scaled_attention_reference(&q, &k, &v, &Mask::none(), &opts).unwrap_err()
    );
}

/// A non-finite entry of K or of V, alone, fails a call large enough for the tiled pass on
/// a pool (K and V are packed and scanned side by side there), one head and GQA heads, on
/// one thread and two: the error names the entry, as the reference's validation does.
#[test]
fn non_finite_keys_or_values_fail_on_any_thread_count() {
    let c = seeded(600, 500, 16, 8, 5);
    for (arg, row, col) in [("k", 417, 3), ("v", 9, 7), ("k", 0, 0), ("v", 499, 0)] {
        let (mut k, mut v) = (c.k.clone(), c.v.clone());
        let x = if arg == "k" { &mut k } else { &mut v };
        x[(row, col)] = if row % 2 == 0 {
            f64::INFINITY
        } else {
            f64::NAN
        };
        let want = Error::NonFinite { arg, row, col };
        for threads in [1, 2] {
            let opts = AttentionOptions::new().threads(threads);
            let got = scaled_attention_with(&c.q, &k, &v, &Mask::causal(), &opts);
            assert_eq!(got.unwrap_err(), want, "threads {threads}");
            let heads = Heads::grouped(2, 1);
            let q2 = DMatrix::from_fn(600, 32, |i, j| c.q[(i, j % 16)]);
            let got = multi_head_attention(&q2, &k, &v, heads, &Mask::causal(), &opts);
            assert_eq!(got.unwrap_err(), want, "multi-head, threads {threads}");
        }
    }
}

/// The public exp: accurate, and the documented special values.
#[test]
fn exp_in_place_is_accurate() {
    let xs: Vec<f64> = (0..4000)
        .map(|i| -700.0 + 1400.0 * i as f64 / 4000.0)
        .chain([0.0, -0.0, 1e-30])
        .collect();
    let mut y = xs.clone();
    exp_in_place(&mut y);
    for (&x, &y) in xs.iter().zip(&y) {
        assert!(((y - x.exp()) / x.exp()).abs() <= 4.5e-16, "exp({x})");
    }
    let xs32: Vec<f32> = (0..4000)
        .map(|i| -87.0 + 175.0 * i as f32 / 4000.0)
        .collect();
    let mut y = xs32.clone();
    exp_in_place(&mut y);
    for (&x, &y) in xs32.iter().zip(&y) {
        let exact = (x as f64).exp();
        let e = exact as f32;
        let ulp = (f32::from_bits(e.to_bits() + 1) - e) as f64;
        assert!((y as f64 - exact).abs() <= ulp, "exp({x}) = {y}");
    }
    let mut s = [f64::NEG_INFINITY, -746.0, f64::NAN, 710.0, 1.0];
    exp_in_place(&mut s);
    assert_eq!(&s[..2], &[0.0, 0.0]);
    assert!(s[2].is_nan() && s[3] == f64::INFINITY && s[4] == 1.0_f64.exp());
}
