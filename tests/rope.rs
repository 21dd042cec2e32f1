//! Rotary position embeddings: against an independent f64 reference (complex multiplication
//! for the interleaved layout, Hugging Face's `x·cos + rotate_half(x)·sin` for the other),
//! the properties RoPE exists for (norms kept, scores depend on relative positions only),
//! the backward as the exact transpose, offsets, partial rotary, the checkpoint permutation
//! between the two layouts, and the errors.

mod common;

use attention_math::{Error, Rope, RopeLayout};
use common::*;
use nalgebra::DMatrix;
use proptest::prelude::*;

const LAYOUTS: [RopeLayout; 2] = [RopeLayout::Interleaved, RopeLayout::RotateHalf];

/// An independent RoPE in f64. Interleaved: pair (2k, 2k+1) as the complex number
/// `a + ib` times `e^{iφ}`. Rotate-half: `x·cos + rotate_half(x)·sin` on the first r dims,
/// with `cos = [cos φ_0 .. cos φ_{r/2-1}, cos φ_0 .. cos φ_{r/2-1}]` and
/// `rotate_half(x) = [-x_{r/2..r}, x_{0..r/2}]`, as `transformers` writes it.
/// Frequencies as Hugging Face computes them: `1 / θ^(2k/r)`.
#[allow(clippy::too_many_arguments)]
fn reference(
    x: &DMatrix<f64>,
    d: usize,
    r: usize,
    layout: RopeLayout,
    theta: f64,
    scale: f64,
    offset: usize,
    inverse: bool,
) -> DMatrix<f64> {
    let mut out = x.clone();
    let half = r / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    for i in 0..x.nrows() {
        let p = (offset + i) as f64 / scale;
        let angles: Vec<f64> = (0..half)
            .map(|k| sign * p / theta.powf((2 * k) as f64 / r as f64))
            .collect();
        for h in 0..x.ncols() / d {
            let head: Vec<f64> = (0..d).map(|j| x[(i, h * d + j)]).collect();
            match layout {
                RopeLayout::Interleaved => {
                    for (k, &phi) in angles.iter().enumerate() {
                        let (a, b) = (head[2 * k], head[2 * k + 1]);
                        let (c, s) = (phi.cos(), phi.sin());
                        // (a + ib)(c + is) = (ac − bs) + i(as + bc)
                        out[(i, h * d + 2 * k)] = a * c - b * s;
                        out[(i, h * d + 2 * k + 1)] = a * s + b * c;
                    }
                }
                RopeLayout::RotateHalf => {
                    let cos: Vec<f64> = angles.iter().chain(&angles).map(|a| a.cos()).collect();
                    let sin: Vec<f64> = angles.iter().chain(&angles).map(|a| a.sin()).collect();
                    let rot: Vec<f64> = (0..r)
                        .map(|j| {
                            if j < half {
                                -head[j + half]
                            } else {
                                head[j - half]
                            }
                        })
                        .collect();
                    for j in 0..r {
                        out[(i, h * d + j)] = head[j] * cos[j] + rot[j] * sin[j];
                    }
                }
            }
        }
    }
    out
}

fn rope(d: usize, r: usize, layout: RopeLayout, theta: f64, scale: f64) -> Rope {
    Rope::new(d, layout)
        .rotary_dim(r)
        .theta(theta)
        .linear_scaling(scale)
}

/// (n, heads, d, r): n in 0..=max_n, 1..=3 heads, d in 1..=10, r even <= d.
fn shape(max_n: usize) -> impl Strategy<Value = (usize, usize, usize, usize)> {
    (0..=max_n, 1..=3usize, 1..=10usize)
        .prop_flat_map(|(n, h, d)| (Just(n), Just(h), Just(d), 0..=d / 2))
        .prop_map(|(n, h, d, half)| (n, h, d, 2 * half))
}

fn layout() -> impl Strategy<Value = RopeLayout> {
    prop_oneof![Just(RopeLayout::Interleaved), Just(RopeLayout::RotateHalf)]
}

fn pair_norms(x: &DMatrix<f64>, d: usize, r: usize, layout: RopeLayout) -> Vec<f64> {
    let mut out = Vec::new();
    for i in 0..x.nrows() {
        for h in 0..x.ncols() / d {
            for k in 0..r / 2 {
                let (a, b) = match layout {
                    RopeLayout::Interleaved => (2 * k, 2 * k + 1),
                    RopeLayout::RotateHalf => (k, k + r / 2),
                };
                out.push(x[(i, h * d + a)].hypot(x[(i, h * d + b)]));
            }
        }
    }
    out
}

macro_rules! rope_properties {
    ($modname:ident, $t:ty, $tol:expr) => {
        mod $modname {
            use super::*;

            fn cast(x: &DMatrix<f64>) -> DMatrix<$t> {
                x.map(|v| v as $t)
            }

            fn back(x: &DMatrix<$t>) -> DMatrix<f64> {
                x.map(|v| v as f64)
            }

            proptest! {
                #[test]
                fn apply_and_backward_match_the_reference(
                    (x, d, r) in shape(9).prop_flat_map(|(n, h, d, r)| (matrix(n, h * d), Just(d), Just(r))),
                    layout in layout(),
                    theta in prop_oneof![Just(10_000.0), Just(500_000.0), 1.5..100.0f64],
                    scale in prop_oneof![Just(1.0), Just(4.0), 0.25..8.0f64],
                    offset in prop_oneof![0..8usize, 0..20_000usize],
                ) {
                    let rope = rope(d, r, layout, theta, scale);
                    let mut y = cast(&x);
                    rope.apply(&mut y, offset).unwrap();
                    let want = reference(&x, d, r, layout, theta, scale, offset, false);
                    // Rounding the input to T is part of the f32 error; the two f64 angles
                    // differ by a few ulp of the largest angle, p_max / scale (θ_k <= 1 here).
                    let angle_slack = 16.0 * f64::EPSILON * ((offset + x.nrows()) as f64 / scale);
                    let tol = 4.0 * $tol + 2.0 * angle_slack;
                    let err = max_abs_diff(&back(&y), &want);
                    prop_assert!(err < tol, "{err} >= {tol}");
                    let mut g = cast(&x);
                    rope.backward(&mut g, offset).unwrap();
                    let want = reference(&x, d, r, layout, theta, scale, offset, true);
                    let err = max_abs_diff(&back(&g), &want);
                    prop_assert!(err < tol, "{err} >= {tol}");
                }

                #[test]
                fn norms_of_every_pair_and_head_row_are_kept(
                    (x, d, r) in shape(9).prop_flat_map(|(n, h, d, r)| (matrix(n, h * d), Just(d), Just(r))),
                    layout in layout(),
                    offset in 0..100_000usize,
                ) {
                    let x = back(&cast(&x)); // exactly representable in T
                    let mut y = cast(&x);
                    rope(d, r, layout, 10_000.0, 1.0).apply(&mut y, offset).unwrap();
                    let y = back(&y);
                    for (a, b) in pair_norms(&x, d, r, layout).iter().zip(pair_norms(&y, d, r, layout)) {
                        prop_assert!((a - b).abs() <= 4.0 * $tol * (1.0 + a));
                    }
                    for i in 0..x.nrows() {
                        for h in 0..x.ncols() / d {
                            let a = x.view((i, h * d), (1, d)).norm();
                            let b = y.view((i, h * d), (1, d)).norm();
                            prop_assert!((a - b).abs() <= 4.0 * $tol * (1.0 + a));
                        }
                    }
                }

                #[test]
                fn backward_is_the_exact_transpose(
                    (x, g, d, r) in shape(9).prop_flat_map(|(n, h, d, r)| (matrix(n, h * d), matrix(n, h * d), Just(d), Just(r))),
                    layout in layout(),
                    offset in 0..100_000usize,
                ) {
                    let rope = rope(d, r, layout, 10_000.0, 1.0);
                    let (x, g) = (back(&cast(&x)), back(&cast(&g)));
                    let mut rx = cast(&x);
                    rope.apply(&mut rx, offset).unwrap();
                    let mut rtg = cast(&g);
                    rope.backward(&mut rtg, offset).unwrap();
                    // ⟨R x, g⟩ = ⟨x, Rᵀ g⟩
                    let lhs = back(&rx).dot(&g);
                    let rhs = x.dot(&back(&rtg));
                    let size = (x.len() as f64).max(1.0);
                    prop_assert!((lhs - rhs).abs() <= 16.0 * $tol * size, "{lhs} vs {rhs}");
                    // Rᵀ R x = x
                    let mut rtrx = rx.clone();
                    rope.backward(&mut rtrx, offset).unwrap();
                    prop_assert!(max_abs_diff(&back(&rtrx), &x) <= 8.0 * $tol);
                }

                #[test]
                fn rotate_half_on_permuted_inputs_is_interleaved_permuted(
                    (x, d, r) in shape(7).prop_flat_map(|(n, h, d, r)| (matrix(n, h * d), Just(d), Just(r))),
                    offset in 0..10_000usize,
                ) {
                    let x = cast(&x);
                    let inter = rope(d, r, RopeLayout::Interleaved, 10_000.0, 1.0);
                    let half = rope(d, r, RopeLayout::RotateHalf, 10_000.0, 1.0);
                    let mut a = half.interleaved_to_rotate_half(&x).unwrap();
                    half.apply(&mut a, offset).unwrap();
                    let mut b = x.clone();
                    inter.apply(&mut b, offset).unwrap();
                    let b = half.interleaved_to_rotate_half(&b).unwrap();
                    // The same angles on the same pairs: the same bits.
                    prop_assert_eq!(&a, &b);
                    // And back: interleaved on the un-permuted rotate-half features.
                    let mut c = x.clone();
                    half.apply(&mut c, offset).unwrap();
                    let mut e = half.rotate_half_to_interleaved(&x).unwrap();
                    inter.apply(&mut e, offset).unwrap();
                    prop_assert_eq!(half.rotate_half_to_interleaved(&c).unwrap(), e);
                    // The two permutations are inverse to each other.
                    prop_assert_eq!(half.rotate_half_to_interleaved(&half.interleaved_to_rotate_half(&x).unwrap()).unwrap(), x);
                }
            }

            #[test]
            fn scores_depend_only_on_the_relative_position() {
                let d = 16;
                let q = cast(&DMatrix::from_fn(1, d, |_, j| ((j * 7 + 1) as f64 * 0.37).sin()));
                let k = cast(&DMatrix::from_fn(1, d, |_, j| ((j * 5 + 2) as f64 * 0.53).cos()));
                for layout in LAYOUTS {
                    let rope = Rope::new(d, layout);
                    let score = |i: usize, j: usize| {
                        let (mut qi, mut kj) = (q.clone(), k.clone());
                        rope.apply(&mut qi, i).unwrap();
                        rope.apply(&mut kj, j).unwrap();
                        qi.dot(&kj) as f64
                    };
                    for delta in [-37i64, -3, 0, 1, 5, 100] {
                        let base = score(200, (200 + delta) as usize);
                        for i in [40usize, 1000, 4095, 70_000] {
                            let j = (i as i64 + delta) as usize;
                            let s = score(i, j);
                            // Angles up to 7e4 rad carry ~3e-11 of f64 rounding.
                            assert!((s - base).abs() < 20.0 * $tol + 1e-8, "{layout:?} δ={delta} i={i}: {s} vs {base}");
                        }
                    }
                    // And it does depend on the offset: the rotation is not the identity.
                    assert!((score(10, 10) - score(10, 13)).abs() > 1e-3);
                }
            }

            #[test]
            fn offset_rows_equal_the_rows_of_the_whole_sequence_bit_for_bit() {
                // 150 rows cross the 64-row cos/sin blocks at different places.
                let x = cast(&DMatrix::from_fn(150, 12, |i, j| ((i * 12 + j) as f64 * 0.01).sin()));
                for layout in LAYOUTS {
                    let rope = Rope::new(6, layout).linear_scaling(2.0);
                    let mut whole = x.clone();
                    rope.apply(&mut whole, 0).unwrap();
                    for from in [0, 1, 63, 64, 100, 149] {
                        let mut tail = x.rows(from, 150 - from).clone_owned();
                        rope.apply(&mut tail, from).unwrap();
                        assert_eq!(tail, whole.rows(from, 150 - from), "{layout:?} from {from}");
                    }
                    // Backward likewise.
                    let mut whole = x.clone();
                    rope.backward(&mut whole, 0).unwrap();
                    let mut tail = x.rows(70, 80).clone_owned();
                    rope.backward(&mut tail, 70).unwrap();
                    assert_eq!(tail, whole.rows(70, 80));
                }
            }

            #[test]
            fn partial_rotary_leaves_the_tail_bit_for_bit() {
                let (d, r) = (10, 4);
                let mut x = cast(&DMatrix::from_fn(5, 3 * d, |i, j| ((i * 30 + j) as f64 * 0.7).sin()));
                // Values whose bits would show any arithmetic: a NaN, -0, a subnormal.
                x[(0, d - 1)] = <$t>::NAN;
                x[(1, d + 5)] = -0.0;
                x[(2, 2 * d + 9)] = <$t>::MIN_POSITIVE / 4.0;
                for layout in LAYOUTS {
                    let rope = Rope::new(d, layout).rotary_dim(r);
                    for backward in [false, true] {
                        let mut y = x.clone();
                        if backward {
                            rope.backward(&mut y, 9).unwrap();
                        } else {
                            rope.apply(&mut y, 9).unwrap();
                        }
                        for h in 0..3 {
                            for j in r..d {
                                for i in 0..5 {
                                    assert_eq!(y[(i, h * d + j)].to_bits(), x[(i, h * d + j)].to_bits());
                                }
                            }
                            // The rotated part did change.
                            assert!(y.view((0, h * d), (5, r)) != x.view((0, h * d), (5, r)));
                        }
                    }
                }
            }

            #[test]
            fn position_zero_is_the_identity_and_views_work_in_place() {
                let x = cast(&DMatrix::from_fn(1, 8, |_, j| j as f64 - 3.5));
                for layout in LAYOUTS {
                    let mut y = x.clone();
                    Rope::new(4, layout).apply(&mut y, 0).unwrap();
                    assert_eq!(y, x);
                }
                // The query columns of a fused QKV matrix, rotated through a view.
                let qkv = cast(&DMatrix::from_fn(4, 24, |i, j| ((i * 24 + j) as f64 * 0.2).cos()));
                let rope = Rope::new(4, RopeLayout::RotateHalf);
                let mut fused = qkv.clone();
                rope.apply(fused.columns_mut(0, 8), 3).unwrap();
                let mut q = qkv.columns(0, 8).clone_owned();
                rope.apply(&mut q, 3).unwrap();
                assert_eq!(fused.columns(0, 8), q);
                assert_eq!(fused.columns(8, 16), qkv.columns(8, 16));
            }
        }
    };
}

rope_properties!(f64_rope, f64, TOL_F64 * 1e-2);
rope_properties!(f32_rope, f32, TOL_F32);

#[test]
fn values_by_hand() {
    // d = 2: one pair, θ_0 = 1 for any base, so position p turns by p radians.
    let mut x = DMatrix::from_row_slice(3, 2, &[1.0_f64, 0.0, 1.0, 0.0, 0.0, 2.0]);
    Rope::new(2, RopeLayout::RotateHalf)
        .apply(&mut x, 1)
        .unwrap();
    let expected = [
        (1.0_f64.cos(), 1.0_f64.sin()),
        (2.0_f64.cos(), 2.0_f64.sin()),
        (-2.0 * 3.0_f64.sin(), 2.0 * 3.0_f64.cos()),
    ];
    for (i, (a, b)) in expected.iter().enumerate() {
        assert!((x[(i, 0)] - a).abs() < 1e-15 && (x[(i, 1)] - b).abs() < 1e-15);
    }
    // d = 4, θ = 100: θ_1 = 100^(-1/2) = 0.1; position 10 with scaling 2 is p = 5.
    let mut x = DMatrix::from_row_slice(1, 4, &[0.0_f64, 1.0, 0.0, 0.0]);
    Rope::new(4, RopeLayout::Interleaved)
        .theta(100.0)
        .linear_scaling(2.0)
        .apply(&mut x, 10)
        .unwrap();
    // Pair (0, 1) at angle 5: (0, 1) ↦ (−sin 5, cos 5); pair (2, 3) stays 0.
    assert!((x[(0, 0)] + 5.0_f64.sin()).abs() < 1e-15);
    assert!((x[(0, 1)] - 5.0_f64.cos()).abs() < 1e-15);
    assert_eq!((x[(0, 2)], x[(0, 3)]), (0.0, 0.0));
    let mut x = DMatrix::from_row_slice(1, 4, &[0.0_f64, 0.0, 1.0, 0.0]);
    Rope::new(4, RopeLayout::Interleaved)
        .theta(100.0)
        .linear_scaling(2.0)
        .apply(&mut x, 10)
        .unwrap();
    assert!((x[(0, 2)] - 0.5_f64.cos()).abs() < 1e-15);
    assert!((x[(0, 3)] - 0.5_f64.sin()).abs() < 1e-15);
}

#[test]
fn frequencies_follow_the_formula() {
    let f = Rope::new(128, RopeLayout::RotateHalf)
        .frequencies()
        .unwrap();
    assert_eq!(f.len(), 64);
    for (k, fk) in f.iter().enumerate() {
        let hf = 1.0 / 10_000f64.powf((2 * k) as f64 / 128.0);
        assert!((fk - hf).abs() <= 4.0 * f64::EPSILON * hf);
    }
    // Partial rotary spreads the frequencies over r, not d.
    let f = Rope::new(128, RopeLayout::RotateHalf)
        .rotary_dim(32)
        .frequencies()
        .unwrap();
    assert_eq!(f.len(), 16);
    assert!((f[8] - 0.01).abs() < 1e-16); // 10000^(-16/32)
    assert!(
        Rope::new(8, RopeLayout::RotateHalf)
            .rotary_dim(0)
            .frequencies()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn linear_scaling_divides_the_positions() {
    let x = DMatrix::from_fn(4, 8, |i, j| ((i * 8 + j) as f64).sin());
    for layout in LAYOUTS {
        // Factor 0.5 from offset 3: positions 3..7 become 6, 8, 10, 12 (exactly, in f64).
        let mut a = x.clone();
        Rope::new(8, layout)
            .linear_scaling(0.5)
            .apply(&mut a, 3)
            .unwrap();
        for i in 0..4 {
            let mut row = x.rows(i, 1).clone_owned();
            Rope::new(8, layout).apply(&mut row, 2 * (3 + i)).unwrap();
            assert_eq!(a.rows(i, 1), row);
        }
        // Factor 3 from offset 0: position 1 is turned by 1/3 of position 1's angles.
        let mut b = x.rows(1, 1).clone_owned();
        Rope::new(8, layout)
            .linear_scaling(3.0)
            .apply(&mut b, 1)
            .unwrap();
        let mut unscaled = x.rows(1, 1).clone_owned();
        Rope::new(8, layout).apply(&mut unscaled, 1).unwrap();
        assert!((&b - &unscaled).amax() > 1e-3);
        let want = reference(
            &x.rows(1, 1).clone_owned(),
            8,
            8,
            layout,
            10_000.0,
            3.0,
            1,
            false,
        );
        assert!((b - want).amax() < 1e-15);
    }
}

#[test]
fn the_permutation_is_the_hugging_face_one() {
    // convert_llama_weights_to_hf.py: w.view(heads, d/2, 2, dim).transpose(1, 2).reshape(...)
    // sends index 2k + t of a head to t·(d/2) + k.
    let d = 8;
    let order = Rope::new(d, RopeLayout::RotateHalf)
        .rotate_half_order()
        .unwrap();
    let mut hf = vec![0; d];
    for k in 0..d / 2 {
        for t in 0..2 {
            hf[t * (d / 2) + k] = 2 * k + t;
        }
    }
    assert_eq!(order, hf);
    assert_eq!(order, vec![0, 2, 4, 6, 1, 3, 5, 7]);
    // Applied per head, columns only.
    let x = DMatrix::from_fn(2, 2 * d, |i, j| (100 * i + j) as f64);
    let p = Rope::new(d, RopeLayout::RotateHalf)
        .interleaved_to_rotate_half(&x)
        .unwrap();
    for h in 0..2 {
        for (j, &o) in order.iter().enumerate() {
            assert_eq!(p.column(h * d + j), x.column(h * d + o));
        }
    }
    // q · k within a head is unchanged by permuting both: attention is the same.
    let q = DMatrix::from_fn(1, d, |_, j| (j as f64 * 0.3).sin());
    let k = DMatrix::from_fn(1, d, |_, j| (j as f64 * 0.9).cos());
    let rope = Rope::new(d, RopeLayout::RotateHalf);
    let (pq, pk) = (
        rope.interleaved_to_rotate_half(&q).unwrap(),
        rope.interleaved_to_rotate_half(&k).unwrap(),
    );
    assert!((pq.dot(&pk) - q.dot(&k)).abs() < 1e-15);
}

#[test]
fn errors_name_the_argument_and_leave_x_unchanged() {
    let x0 = DMatrix::from_fn(2, 8, |i, j| (i + j) as f64);
    let check = |rope: Rope, offset: usize, expected: &str| {
        let mut x = x0.clone();
        let e = rope.apply(&mut x, offset).unwrap_err();
        assert_eq!(e.to_string(), expected);
        assert_eq!(x, x0);
        let e2 = rope.backward(&mut x, offset).unwrap_err();
        assert_eq!(x, x0);
        e2
    };
    let r = RopeLayout::RotateHalf;
    check(
        Rope::new(0, r),
        0,
        "head_dim = 0 is invalid: it must be >= 1",
    );
    check(
        Rope::new(4, r).rotary_dim(3),
        0,
        "rotary_dim = 3 is invalid: it must be even and at most head_dim",
    );
    check(
        Rope::new(4, r).rotary_dim(6),
        0,
        "rotary_dim = 6 is invalid: it must be even and at most head_dim",
    );
    // An odd head width rotates all its dims by default: that is an odd rotary_dim.
    let e = Rope::new(5, r)
        .apply(&mut DMatrix::<f64>::zeros(1, 5), 0)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidParameter { name: "rotary_dim", value, .. } if value == 5.0));
    assert!(
        Rope::new(5, r)
            .rotary_dim(4)
            .apply(&mut DMatrix::<f64>::zeros(1, 5), 0)
            .is_ok()
    );
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = check(
            Rope::new(4, r).theta(bad),
            0,
            &format!("theta = {bad} is invalid: it must be finite and > 0"),
        );
        assert!(matches!(e, Error::InvalidParameter { name: "theta", .. }));
        check(
            Rope::new(4, r).linear_scaling(bad),
            0,
            &format!("linear_scaling = {bad} is invalid: it must be finite and > 0"),
        );
    }
    let e = check(
        Rope::new(3, r).rotary_dim(2),
        0,
        "x has 8 columns, which do not split into heads of width 3",
    );
    assert_eq!(
        e,
        Error::HeadWidth {
            arg: "grad",
            len: 8,
            width: 3
        }
    );
    let e = check(
        Rope::new(4, r),
        usize::MAX - 1,
        "offset = 18446744073709552000 is invalid: it must leave room for the rows: offset + n must not overflow usize",
    );
    assert!(matches!(e, Error::InvalidParameter { name: "offset", .. }));
    // The last representable positions are fine.
    let mut x = x0.clone();
    Rope::new(4, r).apply(&mut x, usize::MAX - 2).unwrap();
    assert!(x.iter().all(|v| v.is_finite()));
    // Empty inputs are fine; the permutation helpers check shapes too.
    Rope::new(4, r)
        .apply(&mut DMatrix::<f32>::zeros(0, 8), 5)
        .unwrap();
    Rope::new(4, r)
        .apply(&mut DMatrix::<f32>::zeros(3, 0), 5)
        .unwrap();
    let e = Rope::new(3, r)
        .rotary_dim(2)
        .interleaved_to_rotate_half(&x0)
        .unwrap_err();
    assert_eq!(
        e,
        Error::HeadWidth {
            arg: "x",
            len: 8,
            width: 3
        }
    );
    assert!(
        Rope::new(4, r)
            .rotary_dim(5)
            .rotate_half_to_interleaved(&x0)
            .is_err()
    );
}

/// Found by the fuzzer: a tiny (finite, positive) linear scaling divides the positions into
/// infinities, and the rotation became NaN. It is an error now, and x is left unchanged.
#[test]
fn a_scaling_that_overflows_the_angles_is_an_error() {
    let rope = Rope::new(8, RopeLayout::Interleaved).linear_scaling(2.2250738585072014e-308);
    let mut x = nalgebra::DMatrix::<f64>::from_element(3, 8, -7.0);
    let before = x.clone();
    let e = rope.apply(&mut x, 10).unwrap_err(); // positions 10..13: 12 / 2.2e-308 overflows
    assert!(
        matches!(
            e,
            attention_math::Error::InvalidParameter {
                name: "linear_scaling",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(x, before);
    // Position 0 alone (one row, offset 0) has angle 0: fine.
    let mut one = nalgebra::DMatrix::<f64>::from_element(1, 8, -7.0);
    rope.apply(&mut one, 0).unwrap();
    assert_eq!(one, nalgebra::DMatrix::from_element(1, 8, -7.0));
}

/// A theta far below 1 makes frequencies far above 1, and with a tiny scaling the angles
/// overflow: an `Err` naming the parameter, x unchanged (it was NaN: the `rope` fuzz target).
#[test]
fn tiny_theta_and_scaling_are_errors_not_nan() {
    use attention_math::{Error, Rope, RopeLayout};
    let mut x = nalgebra::DMatrix::<f32>::from_element(2, 12, 1.0);
    let before = x.clone();
    let rope = Rope::new(12, RopeLayout::RotateHalf)
        .theta(2.2250738585072014e-308)
        .linear_scaling(2.2250738585072014e-308);
    let e = rope.apply(&mut x, 0).unwrap_err();
    // Position 1 / 2.2e-308 is finite; the frequencies (up to θ^(-10/12) ~ 1e256) overflow it.
    assert!(
        matches!(e, Error::InvalidParameter { name: "theta", .. }),
        "{e:?}"
    );
    assert_eq!(x, before);
    // A scaling so small that the position itself overflows is to blame on its own.
    let rope = Rope::new(12, RopeLayout::RotateHalf).linear_scaling(5e-324);
    let e = rope.apply(&mut x, 0).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidParameter {
                name: "linear_scaling",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(x, before);
}
