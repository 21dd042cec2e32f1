//! ALiBi computed inside the kernel: equal to the explicit n x m bias matrix
//! `−slope · |i + m − n − j|` on every path (tiled prefill, decode, multi-head with the
//! paper's per-head slopes, the backward pass), for self-attention and cache-aligned decoding.

use attention_math::{
    AttentionOptions, Heads, KvCache, Mask, alibi_slopes, attention_backward,
    attention_backward_reference, multi_head_attention, scaled_attention_reference,
    scaled_attention_with,
};
use nalgebra::DMatrix;

fn data(rows: usize, cols: usize, seed: f64) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |i, j| {
        ((i * cols + j) as f64 * 0.41 + seed).sin() * 1.5
    })
}

/// The explicit bias of ALiBi with `slope` for n queries that are the last n of m positions.
fn alibi_matrix(n: usize, m: usize, slope: f64) -> DMatrix<f64> {
    DMatrix::from_fn(n, m, |i, j| {
        -slope * ((i + m) as f64 - n as f64 - j as f64).abs()
    })
}

#[test]
fn kernel_alibi_equals_the_explicit_bias() {
    // Tiled prefill (n = m), a chunk against a longer cache, and decode rows (n small).
    for (n, m) in [(130, 130), (40, 300), (1, 5000), (3, 700)] {
        let (q, k, v) = (data(n, 8, 0.1), data(m, 8, 0.2), data(m, 5, 0.3));
        for mask in [
            Mask::causal_bottom_right(),
            Mask::none(),
            Mask::sliding_window(50).bottom_right(),
        ] {
            for slope in [0.5, 1.0 / 256.0] {
                let b = alibi_matrix(n, m, slope);
                let want = scaled_attention_reference(
                    &q,
                    &k,
                    &v,
                    &mask,
                    &AttentionOptions::new().bias(&b),
                )
                .unwrap();
                let opts = AttentionOptions::new().alibi_slope(slope);
                let got = scaled_attention_with(&q, &k, &v, &mask, &opts).unwrap();
                let reference = scaled_attention_reference(&q, &k, &v, &mask, &opts).unwrap();
                assert!(
                    (&got.output - &want.output).amax() < 1e-12,
                    "{n}x{m} {mask} {slope}"
                );
                assert!((&reference.output - &want.output).amax() < 1e-13);
                for (a, b) in got.lse.iter().zip(want.lse.iter()) {
                    assert!(
                        a == b || (a - b).abs() < 1e-10 * b.abs().max(1.0),
                        "{a} vs {b}"
                    );
                }
            }
        }
    }
    // With a softcap too: the bias is added after the cap.
    let (q, k, v) = (data(20, 4, 0.4), data(20, 4, 0.5), data(20, 2, 0.6));
    let b = alibi_matrix(20, 20, 0.25);
    let want = scaled_attention_reference(
        &q,
        &k,
        &v,
        &Mask::causal(),
        &AttentionOptions::new().softcap(2.0).bias(&b),
    )
    .unwrap();
    let got = scaled_attention_with(
        &q,
        &k,
        &v,
        &Mask::causal(),
        &AttentionOptions::new().softcap(2.0).alibi_slope(0.25),
    )
    .unwrap();
    assert!((got.output - want.output).amax() < 1e-13);
}

#[test]
fn multi_head_alibi_uses_the_papers_slopes_per_head() {
    let (h, g, d) = (6, 3, 4); // 6 heads: not a power of two
    let slopes = alibi_slopes(h);
    for (n, m) in [(9, 9), (1, 3000), (2, 40)] {
        let (q, k, v) = (
            data(n, h * d, 0.7),
            data(m, g * d, 0.8),
            data(m, g * d, 0.9),
        );
        let heads = Heads::grouped(h, g);
        let out = multi_head_attention(
            &q,
            &k,
            &v,
            heads,
            &Mask::causal_bottom_right(),
            &AttentionOptions::new().alibi(),
        )
        .unwrap();
        for (head, &slope) in slopes.iter().enumerate() {
            let kv = heads.kv_head(head);
            let b = alibi_matrix(n, m, slope);
            let want = scaled_attention_reference(
                q.columns(head * d, d),
                k.columns(kv * d, d),
                v.columns(kv * d, d),
                &Mask::causal_bottom_right(),
                &AttentionOptions::new().bias(&b),
            )
            .unwrap();
            let got = out.columns(head * d, d);
            assert!((got - want.output).amax() < 1e-12, "{n}x{m} head {head}");
        }
    }
}

#[test]
fn decoding_with_alibi_through_the_cache_equals_the_full_forward() {
    let (len, h, g, d) = (12, 4, 2, 3);
    let heads = Heads::grouped(h, g);
    let (q, k, v) = (
        data(len, h * d, 0.1),
        data(len, g * d, 0.2),
        data(len, g * d, 0.3),
    );
    let opts = AttentionOptions::new().alibi();
    let full = multi_head_attention(&q, &k, &v, heads, &Mask::causal(), &opts).unwrap();
    let mut cache = KvCache::<f64>::new(g, d, d).unwrap();
    for t in 0..len {
        cache.append(k.rows(t, 1), v.rows(t, 1)).unwrap();
        let step = cache
            .attention(q.rows(t, 1), h, &Mask::causal(), &opts)
            .unwrap();
        assert!((step - full.rows(t, 1)).amax() < 1e-13, "step {t}");
    }
}

#[test]
fn backward_with_alibi_matches_the_reference_and_the_explicit_bias() {
    let (n, m) = (50, 70);
    let (q, k, v) = (data(n, 6, 0.3), data(m, 6, 0.4), data(m, 4, 0.5));
    let d_out = data(n, 4, 0.6);
    let mask = Mask::causal_bottom_right();
    let opts = AttentionOptions::new().alibi_slope(0.1);
    let fwd = scaled_attention_with(&q, &k, &v, &mask, &opts).unwrap();
    let g = attention_backward(&q, &k, &v, &mask, &opts, &fwd, &d_out).unwrap();
    let r = attention_backward_reference(&q, &k, &v, &mask, &opts, &d_out).unwrap();
    let b = alibi_matrix(n, m, 0.1);
    let e =
        attention_backward_reference(&q, &k, &v, &mask, &AttentionOptions::new().bias(&b), &d_out)
            .unwrap();
    for (x, y) in [
        (&g.dq, &r.dq),
        (&g.dk, &r.dk),
        (&g.dv, &r.dv),
        (&r.dq, &e.dq),
        (&r.dk, &e.dk),
    ] {
        assert!((x - y).amax() < 1e-12);
    }
    assert!(g.dbias.is_none()); // ALiBi has no parameters: no d bias
}

#[test]
fn bad_slopes_are_errors() {
    let x = data(3, 2, 0.0);
    for s in [f64::NAN, f64::INFINITY] {
        let e = scaled_attention_with(
            &x,
            &x,
            &x,
            &Mask::none(),
            &AttentionOptions::new().alibi_slope(s),
        );
        assert!(matches!(
            e,
            Err(attention_math::Error::InvalidParameter {
                name: "alibi slope",
                ..
            })
        ));
    }
}
