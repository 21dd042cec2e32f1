//! The KV cache: appends (token by token = one chunk), zero-copy views, truncate and clear,
//! growth, the sliding window against a plain `Vec` model, attention through the views, a
//! decoder step by step against the full causal forward, and the errors.

mod common;

use attention_math::{
    AttentionOptions, Error, Heads, KvCache, Mask, Rope, RopeLayout, multi_head_attention,
    scaled_attention,
};
use common::*;
use nalgebra::DMatrix;
use proptest::prelude::*;

/// Deterministic test data: entry (i, j) of an n x cols matrix, different per seed.
fn data(n: usize, cols: usize, seed: f64) -> DMatrix<f64> {
    DMatrix::from_fn(n, cols, |i, j| ((i * cols + j) as f64 * 0.37 + seed).sin())
}

macro_rules! cache_tests {
    ($modname:ident, $t:ty, $tol:expr) => {
        mod $modname {
            use super::*;

            fn cast(x: &DMatrix<f64>) -> DMatrix<$t> {
                x.map(|v| v as $t)
            }

            #[test]
            fn token_by_token_equals_one_chunk_and_views_equal_the_data() {
                let (g, d, dv, n) = (3, 4, 5, 40);
                let k = cast(&data(n, g * d, 0.1));
                let v = cast(&data(n, g * dv, 0.2));
                let mut chunk = KvCache::<$t>::new(g, d, dv).unwrap();
                chunk.append(&k, &v).unwrap();
                let mut tokens = KvCache::<$t>::new(g, d, dv).unwrap();
                for i in 0..n {
                    tokens.append(k.rows(i, 1), v.rows(i, 1)).unwrap();
                    assert_eq!(tokens.len(), i + 1);
                    assert_eq!(tokens.all_keys(), k.rows(0, i + 1));
                }
                let mut mixed = KvCache::<$t>::new(g, d, dv).unwrap();
                for (from, len) in [(0, 7), (7, 0), (7, 1), (8, 20), (28, 12)] {
                    mixed.append(k.rows(from, len), v.rows(from, len)).unwrap();
                }
                for cache in [&chunk, &tokens, &mixed] {
                    assert_eq!(
                        (cache.len(), cache.start_position(), cache.end_position()),
                        (n, 0, n)
                    );
                    assert_eq!(cache.all_keys(), k);
                    assert_eq!(cache.all_values(), v);
                    for h in 0..g {
                        assert_eq!(cache.keys(h).unwrap(), k.columns(h * d, d));
                        assert_eq!(cache.values(h).unwrap(), v.columns(h * dv, dv));
                        // Zero-copy: the column stride is the capacity.
                        assert_eq!(cache.keys(h).unwrap().strides(), (1, cache.capacity()));
                    }
                }
            }

            #[test]
            fn truncate_then_reappend_equals_never_appending_the_rejected_tokens() {
                let (g, d, dv) = (2, 3, 2);
                let k = cast(&data(30, g * d, 0.3));
                let v = cast(&data(30, g * dv, 0.4));
                let drafts_k = cast(&data(5, g * d, 9.0));
                let drafts_v = cast(&data(5, g * dv, 9.5));
                let mut spec = KvCache::<$t>::new(g, d, dv).unwrap();
                spec.append(k.rows(0, 20), v.rows(0, 20)).unwrap();
                // Five drafts, of which the first two are accepted (they equal rows 20, 21).
                let mut drafted_k = drafts_k.clone();
                let mut drafted_v = drafts_v.clone();
                drafted_k.rows_mut(0, 2).copy_from(&k.rows(20, 2));
                drafted_v.rows_mut(0, 2).copy_from(&v.rows(20, 2));
                spec.append(&drafted_k, &drafted_v).unwrap();
                assert_eq!(spec.end_position(), 25);
                spec.truncate(22).unwrap();
                assert_eq!(spec.end_position(), 22);
                spec.truncate(100).unwrap(); // past the end: nothing happens
                assert_eq!(spec.end_position(), 22);
                spec.append(k.rows(22, 8), v.rows(22, 8)).unwrap();
                let mut plain = KvCache::<$t>::new(g, d, dv).unwrap();
                plain.append(&k, &v).unwrap();
                assert_eq!(spec.all_keys(), plain.all_keys());
                assert_eq!(spec.all_values(), plain.all_values());
                assert_eq!(spec.positions(), plain.positions());
                spec.truncate(0).unwrap();
                assert!(spec.is_empty());
                spec.append(&k, &v).unwrap();
                assert_eq!(spec.all_keys(), k);
                spec.clear();
                assert_eq!((spec.len(), spec.end_position()), (0, 0));
                assert_eq!(spec.all_keys().shape(), (0, g * d));
            }

            #[test]
            fn growth_doubles_and_keeps_the_data() {
                let (g, d, dv, n) = (2, 3, 1, 1000);
                let k = cast(&data(n, g * d, 0.5));
                let v = cast(&data(n, g * dv, 0.6));
                let mut cache = KvCache::<$t>::new(g, d, dv).unwrap();
                let mut capacities = vec![cache.capacity()];
                for i in 0..n {
                    cache.append(k.rows(i, 1), v.rows(i, 1)).unwrap();
                    if cache.capacity() != *capacities.last().unwrap() {
                        capacities.push(cache.capacity());
                        // After every reallocation the cached rows are intact.
                        assert_eq!(cache.all_keys(), k.rows(0, i + 1));
                        assert_eq!(cache.all_values(), v.rows(0, i + 1));
                    }
                }
                assert_eq!(capacities, vec![0, 16, 32, 64, 128, 256, 512, 1024]);
                assert_eq!(cache.all_keys(), k);
                // A big chunk grows to what it needs at once.
                let mut big = KvCache::<$t>::new(g, d, dv).unwrap();
                big.append(&k, &v).unwrap();
                assert_eq!(big.capacity(), n);
                // Preallocated: no reallocation up to the capacity.
                let mut pre = KvCache::<$t>::with_capacity(g, d, dv, n).unwrap();
                for i in 0..n {
                    pre.append(k.rows(i, 1), v.rows(i, 1)).unwrap();
                    assert_eq!(pre.capacity(), n);
                }
                assert_eq!(pre.all_values(), v);
            }

            #[test]
            fn a_window_keeps_the_last_positions_across_many_evictions() {
                let (g, d, dv, n) = (2, 2, 3, 500);
                let k = cast(&data(n, g * d, 0.7));
                let v = cast(&data(n, g * dv, 0.8));
                for w in [1, 2, 5, 16, 33] {
                    let mut cache = KvCache::<$t>::with_window(g, d, dv, w).unwrap();
                    for i in 0..n {
                        cache.append(k.rows(i, 1), v.rows(i, 1)).unwrap();
                        let start = (i + 1).saturating_sub(w);
                        assert_eq!(cache.positions(), start..i + 1);
                        assert_eq!(cache.all_keys(), k.rows(start, i + 1 - start));
                        assert_eq!(
                            cache.values(g - 1).unwrap(),
                            v.view((start, (g - 1) * dv), (i + 1 - start, dv))
                        );
                        assert!(cache.capacity() <= 2 * w);
                    }
                    // A chunk longer than the window keeps its last w rows.
                    cache.append(k.rows(0, 3 * w), v.rows(0, 3 * w)).unwrap();
                    assert_eq!(cache.positions(), n + 2 * w..n + 3 * w);
                    assert_eq!(cache.all_keys(), k.rows(2 * w, w));
                    assert_eq!(cache.all_values(), v.rows(2 * w, w));
                }
            }

            #[test]
            fn attention_through_the_views_equals_attention_on_owned_copies() {
                let (g, d, dv) = (2, 8, 4);
                let mut cache = KvCache::<$t>::new(g, d, dv).unwrap();
                let (k, v) = (cast(&data(37, g * d, 1.0)), cast(&data(37, g * dv, 1.1)));
                cache.append(k.rows(0, 30), v.rows(0, 30)).unwrap();
                cache.append(k.rows(30, 7), v.rows(30, 7)).unwrap();
                assert!(cache.capacity() > cache.len()); // the views are strided
                let mask = Mask::causal_bottom_right();
                for n in [1, 3] {
                    let q = cast(&data(n, d, 1.2));
                    for h in 0..g {
                        let through = scaled_attention(
                            &q,
                            cache.keys(h).unwrap(),
                            cache.values(h).unwrap(),
                            &mask,
                        )
                        .unwrap();
                        let owned = scaled_attention(
                            &q,
                            &cache.keys(h).unwrap().clone_owned(),
                            &cache.values(h).unwrap().clone_owned(),
                            &mask,
                        )
                        .unwrap();
                        assert_eq!(through, owned);
                        // The last query sees every cached key; with top-left causal it
                        // would see only the first one.
                        let naive = naive_attention(
                            &q.map(|x| x as f64),
                            &cache.keys(h).unwrap().map(|x| x as f64),
                            &cache.values(h).unwrap().map(|x| x as f64),
                            &mask,
                            1.0 / (d as f64).sqrt(),
                        );
                        assert!(max_abs_diff(&through.map(|x| x as f64), &naive) < $tol);
                        let top_left = scaled_attention(
                            &q,
                            cache.keys(h).unwrap(),
                            cache.values(h).unwrap(),
                            &Mask::causal(),
                        )
                        .unwrap();
                        assert!(max_abs_diff(&top_left.map(|x| x as f64), &naive) > 1e-3);
                    }
                }
            }

            #[test]
            fn decoding_through_the_cache_equals_the_full_causal_forward() {
                // 4 query heads over 2 key-value heads of width 8, RoPE rotate-half, GQA:
                // a 9-token prompt, then 11 tokens one at a time and a chunk of 4.
                let (heads, d, total) = (Heads::grouped(4, 2), 8, 24);
                let rope = Rope::new(d, RopeLayout::RotateHalf);
                let opts = AttentionOptions::new();
                let q = cast(&data(total, 4 * d, 2.0));
                let k = cast(&data(total, 2 * d, 2.1));
                let v = cast(&data(total, 2 * d, 2.2));
                let (mut qr, mut kr) = (q.clone(), k.clone());
                rope.apply(&mut qr, 0).unwrap();
                rope.apply(&mut kr, 0).unwrap();
                let full =
                    multi_head_attention(&qr, &kr, &v, heads, &Mask::causal(), &opts).unwrap();

                let mut cache = KvCache::<$t>::new(2, d, d).unwrap();
                let mut steps = vec![(0, 9)];
                steps.extend((9..20).map(|i| (i, 1)));
                steps.push((20, 4));
                for (from, n) in steps {
                    let (mut qs, mut ks) =
                        (q.rows(from, n).clone_owned(), k.rows(from, n).clone_owned());
                    assert_eq!(cache.end_position(), from);
                    rope.apply(&mut qs, cache.end_position()).unwrap();
                    rope.apply(&mut ks, cache.end_position()).unwrap();
                    cache.append(&ks, v.rows(from, n)).unwrap();
                    let out = multi_head_attention(
                        &qs,
                        cache.all_keys(),
                        cache.all_values(),
                        heads,
                        &Mask::causal_bottom_right(),
                        &opts,
                    )
                    .unwrap();
                    let err = max_abs_diff(
                        &out.map(|x| x as f64),
                        &full.rows(from, n).map(|x| x as f64),
                    );
                    assert!(err < $tol, "step at {from}: {err}");
                }
            }

            #[test]
            fn decoding_through_a_window_equals_the_sliding_window_forward() {
                // Mask::sliding_window(w) lets query p see keys p − w ..= p: a cache window of
                // w + 1 holds exactly those keys after each single-token append.
                let (d, total, w) = (4, 40, 6);
                let q = cast(&data(total, d, 3.0));
                let k = cast(&data(total, d, 3.1));
                let v = cast(&data(total, 2, 3.2));
                let full = scaled_attention(&q, &k, &v, &Mask::sliding_window(w)).unwrap();
                let mut cache = KvCache::<$t>::with_window(1, d, 2, w + 1).unwrap();
                for i in 0..total {
                    cache.append(k.rows(i, 1), v.rows(i, 1)).unwrap();
                    let out = scaled_attention(
                        q.rows(i, 1),
                        cache.keys(0).unwrap(),
                        cache.values(0).unwrap(),
                        &Mask::none(),
                    )
                    .unwrap();
                    let err =
                        max_abs_diff(&out.map(|x| x as f64), &full.rows(i, 1).map(|x| x as f64));
                    assert!(err < $tol, "token {i}: {err}");
                }
                // Chunks of up to c = 3 tokens need a window of w + c: the closure mask maps
                // cache rows to absolute positions.
                let c = 3;
                let mut cache = KvCache::<$t>::with_window(1, d, 2, w + c).unwrap();
                let mut from = 0;
                for n in [3, 1, 2, 3, 3, 1, 3, 2, 3, 3, 3, 2, 3, 3, 3, 2] {
                    cache.append(k.rows(from, n), v.rows(from, n)).unwrap();
                    let (start, end) = (cache.start_position(), cache.end_position());
                    let mask = Mask::from_fn(move |i, j| {
                        let (p, key) = (end - n + i, start + j);
                        key <= p && p - key <= w
                    });
                    let out = scaled_attention(
                        q.rows(from, n),
                        cache.keys(0).unwrap(),
                        cache.values(0).unwrap(),
                        &mask,
                    )
                    .unwrap();
                    let err = max_abs_diff(
                        &out.map(|x| x as f64),
                        &full.rows(from, n).map(|x| x as f64),
                    );
                    assert!(err < $tol, "chunk at {from}: {err}");
                    from += n;
                }
                assert_eq!(from, total);
            }
        }
    };
}

cache_tests!(f64_cache, f64, TOL_F64);
cache_tests!(f32_cache, f32, TOL_F32);

/// One operation on a cache.
#[derive(Clone, Debug)]
enum Op {
    Append(usize),
    Truncate(usize),
    Clear,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..9usize).prop_map(Op::Append),
        2 => (0..60usize).prop_map(Op::Truncate),
        1 => Just(Op::Clear),
    ]
}

proptest! {
    /// A windowed (or unbounded) cache against a `Vec` of (position, key row, value row).
    #[test]
    fn the_cache_matches_a_vec_model(
        window in prop_oneof![Just(None), (1..8usize).prop_map(Some)],
        g in 1..3usize,
        d in 0..3usize,
        dv in 1..3usize,
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let mut cache = match window {
            Some(w) => KvCache::<f64>::with_window(g, d, dv, w).unwrap(),
            None => KvCache::<f64>::new(g, d, dv).unwrap(),
        };
        let mut model: Vec<(usize, Vec<f64>, Vec<f64>)> = Vec::new();
        let mut end = 0usize;
        let mut counter = 0.0;
        for op in ops {
            match op {
                Op::Append(n) => {
                    let k = DMatrix::from_fn(n, g * d, |i, j| counter + (i * 100 + j) as f64);
                    let v = DMatrix::from_fn(n, g * dv, |i, j| -counter - (i * 100 + j) as f64);
                    counter += 1000.0;
                    cache.append(&k, &v).unwrap();
                    for i in 0..n {
                        model.push((end + i, k.row(i).iter().cloned().collect(), v.row(i).iter().cloned().collect()));
                    }
                    end += n;
                    if let Some(w) = window {
                        let excess = model.len().saturating_sub(w);
                        model.drain(..excess);
                    }
                }
                Op::Truncate(p) => {
                    let start = model.first().map_or(end, |m| m.0);
                    let result = cache.truncate(p);
                    if p < start && p < end {
                        let is_invalid = matches!(result, Err(Error::InvalidParameter { name: "positions", .. }));
                        prop_assert!(is_invalid);
                    } else {
                        prop_assert!(result.is_ok());
                        model.retain(|m| m.0 < p);
                        end = end.min(p);
                    }
                }
                Op::Clear => {
                    cache.clear();
                    model.clear();
                    end = 0;
                }
            }
            let start = model.first().map_or(end, |m| m.0);
            prop_assert_eq!(cache.positions(), start..end);
            prop_assert_eq!(cache.len(), model.len());
            let keys = cache.all_keys();
            let values = cache.all_values();
            prop_assert_eq!(keys.shape(), (model.len(), g * d));
            for (row, (_, k, v)) in model.iter().enumerate() {
                prop_assert_eq!(&keys.row(row).iter().cloned().collect::<Vec<_>>(), k);
                prop_assert_eq!(&values.row(row).iter().cloned().collect::<Vec<_>>(), v);
            }
            if let Some(w) = window {
                prop_assert!(cache.len() <= w);
                prop_assert!(cache.capacity() <= 2 * w);
            }
        }
    }
}

#[test]
fn errors_name_the_argument_and_leave_the_cache_unchanged() {
    assert_eq!(
        KvCache::<f32>::new(0, 4, 4).unwrap_err().to_string(),
        "heads = 0 is invalid: it must be >= 1"
    );
    assert_eq!(
        KvCache::<f32>::with_window(2, 4, 4, 0)
            .unwrap_err()
            .to_string(),
        "window = 0 is invalid: it must be >= 1"
    );
    let e = KvCache::<f64>::with_capacity(2, 4, 4, usize::MAX / 4).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }));
    assert!(e.to_string().ends_with("is too large to allocate"), "{e}");

    let mut cache = KvCache::<f64>::new(2, 3, 1).unwrap();
    let k = data(4, 6, 0.0);
    let v = data(4, 2, 0.5);
    cache.append(&k, &v).unwrap();
    let check = |cache: &mut KvCache<f64>, kk: &DMatrix<f64>, vv: &DMatrix<f64>, msg: &str| {
        assert_eq!(cache.append(kk, vv).unwrap_err().to_string(), msg);
        assert_eq!(cache.all_keys(), k);
        assert_eq!(cache.all_values(), v);
    };
    check(
        &mut cache,
        &data(2, 6, 0.0),
        &data(3, 2, 0.0),
        "values has 3 rows but keys has 2",
    );
    check(
        &mut cache,
        &data(2, 5, 0.0),
        &data(2, 2, 0.0),
        "keys is 2 x 5 but must be 2 x 6",
    );
    check(
        &mut cache,
        &data(2, 6, 0.0),
        &data(2, 3, 0.0),
        "values is 2 x 3 but must be 2 x 2",
    );
    let mut bad = data(2, 6, 0.0);
    bad[(1, 4)] = f64::NAN;
    check(
        &mut cache,
        &bad,
        &data(2, 2, 0.0),
        "keys has a non-finite entry at (1, 4)",
    );
    let mut bad = data(2, 2, 0.0);
    bad[(0, 1)] = f64::NEG_INFINITY;
    check(
        &mut cache,
        &data(2, 6, 0.0),
        &bad,
        "values has a non-finite entry at (0, 1)",
    );
    assert_eq!(
        cache.keys(2).unwrap_err().to_string(),
        "group = 2 is invalid: it must be < the number of key-value heads"
    );
    assert!(cache.values(usize::MAX).is_err());

    // Truncating into what a window evicted.
    let mut window = KvCache::<f64>::with_window(2, 3, 1, 3).unwrap();
    window.append(&k, &v).unwrap(); // positions 1, 2, 3
    assert_eq!(
        window.truncate(0).unwrap_err().to_string(),
        "positions = 0 is invalid: it must be >= start_position(): the window evicted the positions before it"
    );
    assert_eq!(window.positions(), 1..4);
    assert_eq!(window.all_keys(), k.rows(1, 3));
    // Exactly the start empties it and keeps the positions; the next append continues there.
    window.truncate(1).unwrap();
    assert_eq!(window.positions(), 1..1);
    window.append(k.rows(0, 1), v.rows(0, 1)).unwrap();
    assert_eq!(window.positions(), 1..2);
    assert_eq!(window.all_keys(), k.rows(0, 1));
}

#[test]
fn an_empty_cache_gives_empty_views_and_attention_gives_zeros() {
    let cache = KvCache::<f32>::new(2, 4, 3).unwrap();
    assert_eq!(cache.keys(1).unwrap().shape(), (0, 4));
    assert_eq!(cache.all_values().shape(), (0, 6));
    let q = DMatrix::<f32>::from_element(1, 4, 1.0);
    let out = scaled_attention(
        &q,
        cache.keys(0).unwrap(),
        cache.values(0).unwrap(),
        &Mask::causal_bottom_right(),
    )
    .unwrap();
    assert_eq!(out, DMatrix::<f32>::zeros(1, 3));
    assert_eq!(
        format!("{cache:?}").split_whitespace().next(),
        Some("KvCache")
    );
}

/// `KvCache::attention` aligns the mask to the end of the cache itself: a prompt of 4 tokens
/// as one chunk, then decoding token by token (or in chunks of 3) with the whole-sequence
/// masks `causal`, `sliding_window(3)`, `prefix_lm(4)` (whose prefix, bidirectional, must
/// arrive as one chunk) and a closure gives the rows of the full top-left forward.
#[test]
fn the_cache_call_aligns_whole_sequence_masks() {
    let (len, g, h, d) = (13, 2, 4, 3);
    let heads = Heads::grouped(h, g);
    let (q, k, v) = (
        data(len, h * d, 0.1),
        data(len, g * d, 0.2),
        data(len, g * d, 0.3),
    );
    let masks = [
        Mask::causal(),
        Mask::sliding_window(3),
        Mask::prefix_lm(4),
        Mask::from_fn(|i, j| j <= i && (i + j) % 4 != 1),
    ];
    let opts = AttentionOptions::new();
    for mask in &masks {
        let full = multi_head_attention(&q, &k, &v, heads, mask, &opts).unwrap();
        for chunk in [1, 3] {
            let mut cache = KvCache::<f64>::new(g, d, d).unwrap();
            let mut t = 0;
            while t < len {
                let c = if t == 0 { 4 } else { chunk.min(len - t) };
                cache.append(k.rows(t, c), v.rows(t, c)).unwrap();
                let out = cache.attention(q.rows(t, c), h, mask, &opts).unwrap();
                let want = full.rows(t, c);
                assert!((out - want).amax() < 1e-13, "{mask} chunk {chunk} at {t}");
                t += c;
            }
        }
    }
}

/// Zero-width heads with a capacity near usize::MAX: the views are empty and valid (a column
/// stride of that size overflowed nalgebra's bounds check: found by the `kv_cache` target).
#[test]
fn zero_width_heads_with_a_huge_capacity_have_views() {
    let mut cache = attention_math::KvCache::<f32>::with_capacity(2, 0, 0, usize::MAX).unwrap();
    let z = nalgebra::DMatrix::<f32>::zeros(3, 0);
    cache.append(&z, &z).unwrap();
    assert_eq!(cache.keys(1).unwrap().shape(), (3, 0));
    assert_eq!(cache.all_values().shape(), (3, 0));
}

/// Half-precision caches (the `half` feature): K and V rounded to f16 / bf16 on append and
/// widened exactly as the kernel reads them.
#[cfg(feature = "half")]
mod half_precision {
    use super::*;
    use attention_math::CacheElement;
    use half::{bf16, f16};

    /// A cache of storage `S` and an f32 cache holding the same rounded values: every call
    /// gives the same bits (the decode path reads the stored values widened, in the same
    /// order; larger calls widen the cache first). Also the bound on the difference to the
    /// f32 cache of the unrounded values: a key's rounding moves score s_ij by at most
    /// δ_i = scale · Σ_c |q_ic| |k_jc| · u (u the unit roundoff of S), so every weight by a
    /// factor within e^{±2δ}, and the value's rounding moves it by u · |v|: together
    /// |Δo| <= max|v| · (u + e^{2δ} − 1) + f32 rounding.
    fn check<S: CacheElement<f32>>(u: f64, round: fn(f32) -> f32) {
        let (g, heads, d, dv, prompt) = (2, 8, 16, 8, 300);
        let opts = AttentionOptions::new();
        let scale = 1.0 / (d as f64).sqrt();
        let mut half = KvCache::<f32, S>::new(g, d, dv).unwrap();
        let mut rounded = KvCache::<f32>::new(g, d, dv).unwrap();
        let mut exact = KvCache::<f32>::new(g, d, dv).unwrap();
        for (step, n) in [prompt, 1, 1, 2, 1].into_iter().enumerate() {
            let seed = step as f64;
            let k = data(n, g * d, 0.3 + seed).map(|x| (3.0 * x) as f32);
            let v = data(n, g * dv, 0.6 + seed).map(|x| (2.0 * x) as f32);
            let q = data(n, heads * d, 0.9 + seed).map(|x| (3.0 * x) as f32);
            half.append(&k, &v).unwrap();
            rounded.append(&k.map(round), &v.map(round)).unwrap();
            exact.append(&k, &v).unwrap();
            for threads in [1, 2] {
                let opts = opts.clone().threads(threads);
                let got = half.attention(&q, heads, &Mask::causal(), &opts).unwrap();
                let same = rounded
                    .attention(&q, heads, &Mask::causal(), &opts)
                    .unwrap();
                assert_eq!(got, same, "{} step {step} threads {threads}", S::NAME);
                let want = exact.attention(&q, heads, &Mask::causal(), &opts).unwrap();
                let keys = exact.all_keys();
                let vmax = exact.all_values().amax() as f64;
                let delta = (0..n)
                    .flat_map(|i| (0..heads).map(move |h| (i, h)))
                    .map(|(i, h)| {
                        let kg = (h / (heads / g)) * d;
                        (0..keys.nrows())
                            .map(|j| {
                                (0..d)
                                    .map(|c| (q[(i, h * d + c)] * keys[(j, kg + c)]).abs() as f64)
                                    .sum::<f64>()
                            })
                            .fold(0.0, f64::max)
                            * scale
                            * u
                    })
                    .fold(0.0, f64::max);
                let bound = vmax * (u + (2.0 * delta).exp_m1()) + 1e-5;
                let err = (&got - &want).amax() as f64;
                assert!(err <= bound, "{}: {err:e} > {bound:e}", S::NAME);
                assert!(err > 0.0, "{}: rounding must show", S::NAME);
            }
        }
        assert_eq!(half.len(), prompt + 5);
    }

    #[test]
    fn f16_cache_equals_the_f32_cache_of_its_rounded_values() {
        check::<f16>(2f64.powi(-11), |x| f16::from_f32(x).to_f32());
    }

    #[test]
    fn bf16_cache_equals_the_f32_cache_of_its_rounded_values() {
        check::<bf16>(2f64.powi(-8), |x| bf16::from_f32(x).to_f32());
    }

    /// Values that would round to inf are an error naming the argument, and the cache is
    /// unchanged; 65504 (f16's largest) and just below 65520 are kept.
    #[test]
    fn values_past_the_storage_range_are_errors() {
        let mut cache = KvCache::<f32, f16>::new(1, 2, 1).unwrap();
        let ok = DMatrix::from_row_slice(1, 2, &[65504.0_f32, -65519.99]);
        cache
            .append(&ok, &DMatrix::from_element(1, 1, 1.0))
            .unwrap();
        assert_eq!(cache.all_keys()[(0, 1)], f16::from_f32(-65504.0));
        let bad = DMatrix::from_row_slice(1, 2, &[1.0_f32, 65520.0]);
        let e = cache
            .append(&bad, &DMatrix::from_element(1, 1, 1.0))
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidParameter { name: "keys", .. }),
            "{e}"
        );
        let e = cache
            .append(&ok, &DMatrix::from_element(1, 1, -1e6_f32))
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidParameter { name: "values", .. }),
            "{e}"
        );
        assert_eq!(cache.len(), 1);
        let mut b = KvCache::<f32, bf16>::new(1, 1, 1).unwrap();
        let big = DMatrix::from_element(1, 1, 3.38e38_f32);
        b.append(&big, &big).unwrap();
        assert!(
            b.append(&DMatrix::from_element(1, 1, f32::MAX), &big)
                .is_err()
        );
        assert!(format!("{b:?}").contains("bf16"));
    }

    /// Scores past f32's range (q ~ 1e36 times stored keys ~ 1e4) take the exact rows, on the
    /// keys and values widened: the same bits as the f32 cache of the rounded values.
    #[test]
    fn overflowing_rows_are_exact_on_the_widened_cache() {
        let (d, heads) = (4, 2);
        let k = data(40, d, 0.1).map(|x| (2e4 * x) as f32);
        let v = data(40, d, 0.2).map(|x| x as f32);
        let q = data(1, heads * d, 0.3).map(|x| (1e36 * x) as f32);
        let mut half = KvCache::<f32, f16>::new(1, d, d).unwrap();
        half.append(&k, &v).unwrap();
        let mut rounded = KvCache::<f32>::new(1, d, d).unwrap();
        let r = |x: &f32| f16::from_f32(*x).to_f32();
        rounded
            .append(&k.map(|x| r(&x)), &v.map(|x| r(&x)))
            .unwrap();
        let opts = AttentionOptions::new();
        let got = half.attention(&q, heads, &Mask::none(), &opts).unwrap();
        assert!(got.iter().all(|x| x.is_finite()));
        assert_eq!(
            got,
            rounded.attention(&q, heads, &Mask::none(), &opts).unwrap()
        );
    }

    /// A windowed f16 cache slides as the f32 one does.
    #[test]
    fn windowed_half_cache_keeps_the_last_positions() {
        let mut cache = KvCache::<f32, f16>::with_window(1, 2, 2, 4).unwrap();
        for t in 0..10 {
            let x = DMatrix::from_element(1, 2, t as f32);
            cache.append(&x, &x).unwrap();
        }
        assert_eq!(cache.positions(), 6..10);
        let col: Vec<f32> = cache
            .all_keys()
            .column(0)
            .iter()
            .map(|h| h.to_f32())
            .collect();
        assert_eq!(col, [6.0, 7.0, 8.0, 9.0]);
    }
}
