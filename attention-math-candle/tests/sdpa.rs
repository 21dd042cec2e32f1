//! The fused op against candle's own unfused path (`q.matmul(&k.t())` · scale, the mask as
//! an additive 0/−inf bias, `candle_nn::ops::softmax_last_dim`, `.matmul(&v)`, `repeat_kv`
//! for GQA), forward and backward, in f32 and f64, over shapes, masks, options and layouts;
//! and the errors.

use attention_math::Float;
use attention_math_candle::{Mask, Options, scaled_dot_product_attention};
use candle_core::{DType, Device, Tensor, Var, WithDType};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// A (B, H, n, d) shape of one call: batch, query heads, key-value heads, queries, keys,
/// head width, value width.
#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    h: usize,
    g: usize,
    n: usize,
    m: usize,
    d: usize,
    dv: usize,
}

const fn case(b: usize, h: usize, g: usize, n: usize, m: usize, d: usize, dv: usize) -> Case {
    Case {
        b,
        h,
        g,
        n,
        m,
        d,
        dv,
    }
}

/// Shapes with MHA, GQA and MQA, n = m, n < m (a cache), n = 1 (decoding), d ≠ d_v.
const CASES: [Case; 7] = [
    case(1, 1, 1, 1, 1, 1, 1),
    case(2, 4, 2, 7, 7, 16, 16),
    case(1, 8, 8, 33, 33, 64, 64),
    case(2, 6, 2, 5, 19, 32, 8),
    case(1, 4, 1, 1, 64, 128, 128),
    case(3, 2, 1, 17, 40, 8, 24),
    case(1, 2, 2, 70, 70, 16, 4),
];

fn tensor<T: WithDType>(rng: &mut StdRng, shape: (usize, usize, usize, usize)) -> Tensor {
    let len = shape.0 * shape.1 * shape.2 * shape.3;
    let data: Vec<T> = (0..len)
        .map(|_| T::from_f64(rng.random_range(-2.0..2.0)))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn qkv<T: WithDType>(c: Case, seed: u64) -> (Tensor, Tensor, Tensor) {
    let mut rng = StdRng::seed_from_u64(seed);
    (
        tensor::<T>(&mut rng, (c.b, c.h, c.n, c.d)),
        tensor::<T>(&mut rng, (c.b, c.g, c.m, c.d)),
        tensor::<T>(&mut rng, (c.b, c.g, c.m, c.dv)),
    )
}

/// candle's `repeat_kv`: every key-value head repeated for the query heads of its group.
fn repeat_kv(x: &Tensor, rep: usize) -> Tensor {
    if rep == 1 {
        return x.clone();
    }
    let (b, g, m, d) = x.dims4().unwrap();
    x.unsqueeze(2)
        .unwrap()
        .expand((b, g, rep, m, d))
        .unwrap()
        .reshape((b, g * rep, m, d))
        .unwrap()
}

/// The reference's extra score terms.
#[derive(Clone, Copy, Default)]
struct Extra {
    scale: Option<f64>,
    softcap: Option<f64>,
    /// ALiBi: `None`, one slope, or (with `by_head`) the paper's slopes.
    alibi_slope: Option<f64>,
    alibi_by_head: bool,
}

impl Extra {
    fn options(&self) -> Options {
        let mut o = Options::new();
        if let Some(s) = self.scale {
            o = o.scale(s);
        }
        if let Some(c) = self.softcap {
            o = o.softcap(c);
        }
        if let Some(s) = self.alibi_slope {
            o = o.alibi_slope(s);
        }
        if self.alibi_by_head {
            o = o.alibi();
        }
        o
    }
}

/// candle's unfused attention: scores, softcap, mask (and ALiBi) as an additive bias,
/// `softmax_last_dim`, times V.
fn unfused(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, extra: Extra) -> Tensor {
    unfused_with(q, k, v, mask, extra, |s| {
        candle_nn::ops::softmax_last_dim(s).unwrap()
    })
}

/// The same with `candle_nn::ops::softmax`, built of primitive ops that candle's autograd
/// differentiates (`softmax_last_dim` has no backward).
fn unfused_differentiable(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, extra: Extra) -> Tensor {
    unfused_with(q, k, v, mask, extra, |s| {
        candle_nn::ops::softmax(s, candle_core::D::Minus1).unwrap()
    })
}

fn unfused_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    extra: Extra,
    softmax: impl Fn(&Tensor) -> Tensor,
) -> Tensor {
    let (_, h, n, d) = q.dims4().unwrap();
    let (_, g, m, _) = k.dims4().unwrap();
    let (k, v) = (repeat_kv(k, h / g), repeat_kv(v, h / g));
    let scale = extra.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let mut s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    if let Some(c) = extra.softcap {
        s = ((s / c).unwrap().tanh().unwrap() * c).unwrap();
    }
    let slopes: Vec<f64> = if extra.alibi_by_head {
        attention_math::alibi_slopes(h)
    } else {
        vec![extra.alibi_slope.unwrap_or(0.0); h]
    };
    let mut bias = Vec::with_capacity(h * n * m);
    for slope in slopes {
        for i in 0..n {
            for j in 0..m {
                let p = (i + m) as f64 - n as f64;
                bias.push(if mask.allows_in(n, m, i, j) {
                    -slope * (p - j as f64).abs()
                } else {
                    f64::NEG_INFINITY
                });
            }
        }
    }
    let bias = Tensor::from_vec(bias, (1, h, n, m), &Device::Cpu)
        .unwrap()
        .to_dtype(q.dtype())
        .unwrap();
    let s = s.broadcast_add(&bias).unwrap();
    softmax(&s).matmul(&v.contiguous().unwrap()).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |ours − reference| / max(1, max |reference|); a NaN in the reference (candle's
/// softmax of a fully masked row) stands for the op's defined 0.
fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims());
    let (a, b) = (values(ours), values(reference));
    let scale = b
        .iter()
        .filter(|x| x.is_finite())
        .fold(1f64, |s, x| s.max(x.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            let y = if y.is_nan() { 0.0 } else { *y };
            (x - y).abs()
        })
        .fold(0.0, f64::max)
        / scale
}

/// Rounding allowed between the fused and the unfused path.
fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 { 1e-5 } else { 1e-12 }
}

/// The masks of the tests, for n queries and m keys (none fully masks a row when n <= m,
/// except as noted by the reference's NaN).
fn masks(m: usize) -> Vec<(&'static str, Mask)> {
    vec![
        ("none", Mask::none()),
        ("causal", Mask::causal()),
        ("causal_bottom_right", Mask::causal_bottom_right()),
        ("sliding_window(3)", Mask::sliding_window(3)),
        ("key_padding", Mask::key_padding(m.div_ceil(2))),
        ("prefix_lm(2)", Mask::prefix_lm(2)),
        (
            "bottom_right sliding_window(4)",
            Mask::sliding_window(4).bottom_right(),
        ),
    ]
}

fn forward_matches<T: WithDType + Float>(seed: u64) {
    for (ci, c) in CASES.iter().enumerate() {
        let (q, k, v) = qkv::<T>(*c, seed + ci as u64);
        for (name, mask) in masks(c.m) {
            let ours = scaled_dot_product_attention(&q, &k, &v, &mask, &Options::new()).unwrap();
            assert_eq!(ours.dims(), &[c.b, c.h, c.n, c.dv]);
            assert!(ours.is_contiguous());
            let want = unfused(&q, &k, &v, &mask, Extra::default());
            let e = rel_err(&ours, &want);
            assert!(e <= tol(T::DTYPE), "{c:?} {name} {:?}: {e:e}", T::DTYPE);
        }
    }
}

#[test]
fn forward_matches_candle_f32() {
    for seed in [1, 100, 10_000] {
        forward_matches::<f32>(seed);
    }
}

#[test]
fn forward_matches_candle_f64() {
    for seed in [2, 200] {
        forward_matches::<f64>(seed);
    }
}

#[test]
fn options_match_candle() {
    let c = case(2, 4, 2, 9, 13, 16, 8);
    let extras = [
        Extra {
            scale: Some(0.3),
            ..Extra::default()
        },
        Extra {
            softcap: Some(1.5),
            ..Extra::default()
        },
        Extra {
            alibi_slope: Some(0.25),
            ..Extra::default()
        },
        Extra {
            alibi_by_head: true,
            scale: Some(0.5),
            softcap: Some(4.0),
            ..Extra::default()
        },
    ];
    for (i, extra) in extras.into_iter().enumerate() {
        for dtype in [DType::F32, DType::F64] {
            let (q, k, v) = qkv::<f64>(c, 40 + i as u64);
            let (q, k, v) = (
                q.to_dtype(dtype).unwrap(),
                k.to_dtype(dtype).unwrap(),
                v.to_dtype(dtype).unwrap(),
            );
            for mask in [Mask::none(), Mask::causal_bottom_right()] {
                let ours =
                    scaled_dot_product_attention(&q, &k, &v, &mask, &extra.options()).unwrap();
                let e = rel_err(&ours, &unfused(&q, &k, &v, &mask, extra));
                assert!(e <= tol(dtype), "extra {i}, {dtype:?}: {e:e}");
            }
        }
    }
}

/// Top-left causal with n > m... and bottom-right causal with n > m fully mask some rows:
/// the op gives zeros there (candle's softmax gives NaN).
#[test]
fn fully_masked_rows_are_zero() {
    let c = case(1, 2, 1, 6, 3, 4, 4);
    let (q, k, v) = qkv::<f32>(c, 5);
    let out =
        scaled_dot_product_attention(&q, &k, &v, &Mask::causal_bottom_right(), &Options::new())
            .unwrap();
    // Rows 0-2 see no key (j <= i + m - n = i - 3).
    let first = out.narrow(2, 0, 3).unwrap();
    assert!(values(&first).iter().all(|x| *x == 0.0));
    let want = unfused(&q, &k, &v, &Mask::causal_bottom_right(), Extra::default());
    assert!(
        values(&want.narrow(2, 0, 3).unwrap())
            .iter()
            .all(|x| x.is_nan())
    );
    assert!(rel_err(&out, &want) <= 1e-5);
}

/// Transposed, strided and offset inputs give the contiguous inputs' result, bit for bit.
#[test]
fn non_contiguous_inputs() {
    let c = case(2, 4, 2, 11, 23, 16, 8);
    let (q, k, v) = qkv::<f32>(c, 9);
    let mask = Mask::causal_bottom_right();
    let want = scaled_dot_product_attention(&q, &k, &v, &mask, &Options::new()).unwrap();
    // q as the transpose(1, 2) of a (B, n, H, d) projection (copied by the op);
    let q_t = q
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    // k column-major per head (read in place);
    let k_t = k
        .transpose(2, 3)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(2, 3)
        .unwrap();
    // v a slice of a wider tensor (strided, offset).
    let wide = Tensor::cat(&[&v, &v, &v], 3).unwrap();
    let v_t = wide.narrow(3, c.dv, c.dv).unwrap();
    assert!(!q_t.is_contiguous() && !k_t.is_contiguous() && !v_t.is_contiguous());
    let got = scaled_dot_product_attention(&q_t, &k_t, &v_t, &mask, &Options::new()).unwrap();
    assert_eq!(values(&got), values(&want));
    // And the batch dimension broadcast (stride 0).
    let q1 = q.narrow(0, 0, 1).unwrap();
    let k1 = k.narrow(0, 0, 1).unwrap();
    let v1 = v.narrow(0, 0, 1).unwrap();
    let one = scaled_dot_product_attention(&q1, &k1, &v1, &mask, &Options::new()).unwrap();
    let kb = k1.broadcast_as((2, c.g, c.m, c.d)).unwrap();
    let vb = v1.broadcast_as((2, c.g, c.m, c.dv)).unwrap();
    let qb = q1.broadcast_as((2, c.h, c.n, c.d)).unwrap();
    let both = scaled_dot_product_attention(&qb, &kb, &vb, &mask, &Options::new()).unwrap();
    assert_eq!(values(&both.get(1).unwrap()), values(&one.get(0).unwrap()));
}

/// dQ, dK, dV through candle's autograd: the op's backward against the unfused graph's.
fn backward_matches<T: WithDType + Float>(c: Case, mask: &Mask, extra: Extra, seed: u64) {
    let (q, k, v) = qkv::<T>(c, seed);
    let mut rng = StdRng::seed_from_u64(seed + 1);
    let w = tensor::<T>(&mut rng, (c.b, c.h, c.n, c.dv));
    let grads = |fused: bool| {
        let (qv, kv, vv) = (
            Var::from_tensor(&q).unwrap(),
            Var::from_tensor(&k).unwrap(),
            Var::from_tensor(&v).unwrap(),
        );
        let out = if fused {
            scaled_dot_product_attention(&qv, &kv, &vv, mask, &extra.options()).unwrap()
        } else {
            unfused_differentiable(&qv, &kv, &vv, mask, extra)
        };
        let g = (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
        [&qv, &kv, &vv].map(|x| {
            g.get(x.as_tensor())
                .unwrap_or_else(|| panic!("fused {fused}: no gradient for {:?}", x.dims()))
                .clone()
        })
    };
    let (ours, want) = (grads(true), grads(false));
    for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(ours.iter().zip(&want)) {
        let e = rel_err(a, b);
        assert!(
            e <= 10.0 * tol(T::DTYPE),
            "{c:?} {name} {:?}: {e:e}",
            T::DTYPE
        );
    }
}

#[test]
fn backward_matches_candle_autograd() {
    let cases = [
        case(2, 4, 2, 7, 7, 16, 16),
        case(1, 6, 2, 5, 19, 32, 8),
        case(1, 4, 1, 1, 40, 16, 16),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        for mask in [
            Mask::none(),
            Mask::causal(),
            Mask::causal_bottom_right(),
            Mask::sliding_window(2),
        ] {
            backward_matches::<f32>(c, &mask, Extra::default(), 70 + i as u64);
            backward_matches::<f64>(c, &mask, Extra::default(), 80 + i as u64);
        }
    }
    let extra = Extra {
        softcap: Some(2.0),
        scale: Some(0.4),
        ..Extra::default()
    };
    backward_matches::<f64>(case(2, 2, 1, 6, 9, 8, 4), &Mask::causal(), extra, 90);
}

fn err(q: &Tensor, k: &Tensor, v: &Tensor) -> String {
    scaled_dot_product_attention(q, k, v, &Mask::none(), &Options::new())
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_inputs_are_errors() {
    let (q, k, v) = qkv::<f32>(case(2, 4, 2, 3, 5, 8, 8), 3);
    let has = |e: String, text: &str| {
        assert!(e.starts_with("scaled_dot_product_attention: "), "{e}");
        assert!(e.contains(text), "{e:?} should contain {text:?}");
    };
    has(err(&q.get(0).unwrap(), &k, &v), "q must have rank 4");
    has(err(&q, &k.get(0).unwrap(), &v), "k must have rank 4");
    has(
        err(&q.narrow(0, 0, 1).unwrap(), &k, &v),
        "batch sizes differ",
    );
    has(
        err(&q, &k, &v.narrow(2, 0, 4).unwrap()),
        "same number of heads and keys",
    );
    has(err(&q, &k.narrow(3, 0, 4).unwrap(), &v), "same head width");
    has(
        err(&q.narrow(1, 0, 3).unwrap(), &k, &v),
        "positive multiple",
    );
    has(
        err(&q.narrow(1, 0, 1).unwrap(), &k, &v),
        "positive multiple",
    );
    for dtype in [DType::F16, DType::BF16, DType::U32] {
        let x = q.to_dtype(dtype).unwrap();
        has(err(&x, &x, &x), "f32 or f64 only");
    }
    has(
        err(&q, &k.to_dtype(DType::F64).unwrap(), &v),
        "k has dtype f64, but q has dtype f32",
    );
    has(
        err(
            &q.to_dtype(DType::F64).unwrap(),
            &k.to_dtype(DType::F64).unwrap(),
            &v,
        ),
        "v has dtype f32, but q has dtype f64",
    );
    // Non-finite input: the crate's error, naming the argument.
    let nan = Tensor::full(f32::NAN, (2, 2, 5, 8), &Device::Cpu).unwrap();
    has(
        err(&q, &nan, &v),
        "batch element 0: k has a non-finite entry",
    );
    // A bad option.
    let e = scaled_dot_product_attention(&q, &k, &v, &Mask::none(), &Options::new().softcap(0.0))
        .unwrap_err()
        .to_string();
    has(e, "softcap");
}

#[test]
fn empty_dimensions() {
    // No batch elements: an empty result.
    let (q, k, v) = qkv::<f32>(case(0, 4, 2, 3, 5, 8, 6), 1);
    let out = scaled_dot_product_attention(&q, &k, &v, &Mask::causal(), &Options::new()).unwrap();
    assert_eq!(out.dims(), &[0, 4, 3, 6]);
    // No queries.
    let (q, k, v) = qkv::<f64>(case(2, 2, 1, 0, 5, 8, 6), 1);
    let out = scaled_dot_product_attention(&q, &k, &v, &Mask::causal(), &Options::new()).unwrap();
    assert_eq!(out.dims(), &[2, 2, 0, 6]);
    // No keys: every row is fully masked, so the output is 0.
    let (q, k, v) = qkv::<f32>(case(2, 2, 1, 3, 0, 8, 6), 1);
    let out = scaled_dot_product_attention(&q, &k, &v, &Mask::none(), &Options::new()).unwrap();
    assert_eq!(values(&out), vec![0.0; 2 * 2 * 3 * 6]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random small shapes, masks and layouts, f64, against candle's unfused path.
    #[test]
    fn random_shapes_match_candle(
        b in 1usize..3, g in 1usize..3, rep in 1usize..4, n in 1usize..12, extra_m in 0usize..9,
        d in 1usize..20, dv in 1usize..12, which in 0usize..7, transpose in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let c = case(b, g * rep, g, n, n + extra_m, d, dv);
        let (q, k, v) = qkv::<f64>(c, seed);
        let (_, mask) = masks(c.m).swap_remove(which);
        let q_in = if transpose {
            q.transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap()
        } else {
            q.clone()
        };
        let ours = scaled_dot_product_attention(&q_in, &k, &v, &mask, &Options::new()).unwrap();
        let e = rel_err(&ours, &unfused(&q, &k, &v, &mask, Extra::default()));
        prop_assert!(e <= 1e-12, "{c:?}: {e:e}");
    }
}
