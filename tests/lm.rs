//! Tests of the `lm` module: objectives, packed rows and the masked cross-entropy.

use attention_math::sheet::lm::{
    CrossEntropy, Objective, Packed, Reduction, cross_entropy, cross_entropy_grad,
};
use attention_math::{Block, Error, Float, Mask, scaled_attention};
use nalgebra::DMatrix;
use proptest::prelude::*;

/// A deterministic pseudo-random stream (SplitMix64) so that proptest drives only a seed.
struct Stream(u64);

impl Stream {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }
    fn matrix(&mut self, rows: usize, cols: usize, scale: f64) -> DMatrix<f64> {
        DMatrix::from_fn(rows, cols, |_, _| scale * self.unit())
    }
    fn tokens(&mut self, n: usize, vocab: usize) -> Vec<usize> {
        (0..n).map(|_| self.below(vocab)).collect()
    }
}

fn cast<T: Float>(m: &DMatrix<f64>) -> DMatrix<T> {
    m.map(T::of_f64)
}

fn objective(max_p: usize) -> impl Strategy<Value = Objective> {
    prop_oneof![
        Just(Objective::Causal),
        (0..=max_p).prop_map(|p| Objective::PrefixLm { prefix_len: p }),
        (0..=max_p).prop_map(|p| Objective::PromptMasked { prompt_len: p }),
    ]
}

fn assert_close(a: f64, b: f64, tol: f64, what: &str) {
    assert!(
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs())),
        "{what}: {a} vs {b}"
    );
}

// ---------------------------------------------------------------------------------------
// Exact values on the seed's example.

#[test]
fn seed_example_grids_and_loss_rows() {
    let n = 8;
    assert_eq!(
        Objective::PrefixLm { prefix_len: 4 }
            .attention_mask()
            .grid(n, n)
            .to_string(),
        "x x x x . . . .\n\
         x x x x . . . .\n\
         x x x x . . . .\n\
         x x x x . . . .\n\
         x x x x x . . .\n\
         x x x x x x . .\n\
         x x x x x x x .\n\
         x x x x x x x x\n"
    );
    let causal_grid = Mask::causal().grid(n, n).to_string();
    assert_eq!(
        Objective::PromptMasked { prompt_len: 4 }
            .attention_mask()
            .grid(n, n)
            .to_string(),
        causal_grid
    );
    assert_eq!(Objective::Causal.scored_positions(n), 0..7);
    assert_eq!(
        Objective::PrefixLm { prefix_len: 4 }.scored_positions(n),
        3..7
    );
    assert_eq!(
        Objective::PromptMasked { prompt_len: 4 }.scored_positions(n),
        3..7
    );
}

#[test]
fn degenerate_lengths() {
    for o in [
        Objective::Causal,
        Objective::PrefixLm { prefix_len: 3 },
        Objective::PromptMasked { prompt_len: 0 },
    ] {
        assert!(o.loss_mask(0).unwrap().is_empty());
        assert_eq!(o.loss_mask(1).unwrap(), [false]);
        assert_eq!(o.scored_count(0), 0);
    }
    // p >= n: nothing scored, and the prefix LM attends everywhere.
    let o = Objective::PrefixLm { prefix_len: 6 };
    assert_eq!(o.loss_mask(5).unwrap(), [false; 5]);
    assert_eq!(
        o.attention_mask().to_dense(5, 5).unwrap(),
        Mask::none().to_dense(5, 5).unwrap()
    );
    // p = n - 1: exactly the last token is a target.
    assert_eq!(
        Objective::PrefixLm { prefix_len: 4 }.loss_mask(5).unwrap(),
        [false, false, false, true, false]
    );
}

// ---------------------------------------------------------------------------------------
// Closed forms and stability.

#[test]
fn closed_forms() {
    // Uniform logits: ln V at every scored position.
    let logits = DMatrix::<f64>::zeros(5, 7);
    let ce = Objective::Causal.loss(&logits, &[1, 2, 3, 4, 5]).unwrap();
    assert_eq!(ce.count, 4);
    assert_close(ce.mean().unwrap(), 7.0_f64.ln(), 1e-15, "uniform");
    assert_eq!(ce.per_position[4], 0.0);

    // Two classes: -log sigmoid(a) = ln(1 + e^{-a}).
    for a in [-3.0_f64, 0.5, 2.0] {
        let logits = nalgebra::dmatrix![a, 0.0; 0.0, 0.0];
        let ce = cross_entropy(&logits, &[1, 0], &[true, false]).unwrap();
        assert_close(ce.sum, (1.0 + (-a).exp()).ln(), 1e-15, "softplus");
    }
}

#[test]
fn logits_of_1e4_are_fine_in_f32_and_f64() {
    fn check<T: Float>() {
        let big = T::of_f64(1e4);
        let logits = DMatrix::from_row_slice(
            2,
            3,
            &[big, T::zero(), -big, T::zero(), T::zero(), T::zero()],
        );
        // Row 0 = [1e4, 0, -1e4]; predicting class 0 costs ~0, class 1 costs 1e4 nats.
        let right = cross_entropy(&logits, &[0, 0], &[true, false]).unwrap();
        let wrong = cross_entropy(&logits, &[0, 1], &[true, false]).unwrap();
        assert_eq!(right.sum, T::zero());
        assert_eq!(wrong.sum, big);
        let (loss, grad) =
            cross_entropy_grad(&logits, &[0, 2], &[true, false], Reduction::Mean).unwrap();
        assert_eq!(loss, big + big);
        assert!(grad.iter().all(|g| g.is_finite()));
        assert_eq!(grad[(0, 0)], T::one());
        assert_eq!(grad[(0, 2)], -T::one());
    }
    check::<f32>();
    check::<f64>();
}

// ---------------------------------------------------------------------------------------
// Errors.

#[test]
fn errors_name_the_argument() {
    let logits = DMatrix::<f64>::zeros(3, 4);
    assert_eq!(
        cross_entropy(&logits, &[0, 4, 1], &[true, false, false]).unwrap_err(),
        Error::IndexOutOfRange {
            arg: "tokens",
            position: 1,
            index: 4,
            bound: 4
        }
    );
    // The same out-of-range id is fine where nothing reads it (an unscored target).
    assert!(cross_entropy(&logits, &[9, 4, 1], &[false, true, false]).is_ok());
    assert_eq!(
        cross_entropy(&logits, &[0, 1], &[true, false, false]).unwrap_err(),
        Error::LengthMismatch {
            arg: "tokens",
            found: 2,
            expected: 3
        }
    );
    assert_eq!(
        cross_entropy(&logits, &[0, 1, 2], &[true, false]).unwrap_err(),
        Error::LengthMismatch {
            arg: "loss_mask",
            found: 2,
            expected: 3
        }
    );
    assert!(matches!(
        cross_entropy_grad(&logits, &[0, 1, 2], &[false, false, true], Reduction::Sum),
        Err(Error::InvalidParameter {
            name: "loss_mask[n - 1]",
            ..
        })
    ));
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut l = logits.clone();
        l[(2, 1)] = bad;
        assert_eq!(
            cross_entropy(&l, &[0, 1, 2], &[true, true, false]).unwrap_err(),
            Error::NonFinite {
                arg: "logits",
                row: 2,
                col: 1
            }
        );
    }
    // Nothing scored: the sum is 0, the mean an error.
    let none = [false; 3];
    let ce = cross_entropy(&logits, &[0, 1, 2], &none).unwrap();
    assert_eq!((ce.sum, ce.count), (0.0, 0));
    assert!(matches!(ce.mean(), Err(Error::Empty { .. })));
    assert!(matches!(
        cross_entropy_grad(&logits, &[0, 1, 2], &none, Reduction::Mean),
        Err(Error::Empty { .. })
    ));
    let (sum, grad) = cross_entropy_grad(&logits, &[0, 1, 2], &none, Reduction::Sum).unwrap();
    assert_eq!(sum, 0.0);
    assert_eq!(grad, DMatrix::zeros(3, 4));
    // n = 0 is fine and scores nothing.
    let empty = DMatrix::<f32>::zeros(0, 4);
    assert_eq!(
        Objective::Causal.loss(&empty, &[]).unwrap(),
        CrossEntropy {
            per_position: vec![],
            sum: 0.0,
            count: 0
        }
    );
}

// ---------------------------------------------------------------------------------------
// Packed rows: exact masks.

#[test]
fn packed_prefix_documents_grid() {
    let row = Packed::new([
        (4, Objective::PrefixLm { prefix_len: 2 }),
        (3, Objective::PromptMasked { prompt_len: 2 }),
        (3, Objective::PrefixLm { prefix_len: 5 }),
    ])
    .unwrap();
    assert_eq!(
        row.attention_mask().grid(11, 11).to_string(),
        "x x . . . . . . . . .\n\
         x x . . . . . . . . .\n\
         x x x . . . . . . . .\n\
         x x x x . . . . . . .\n\
         . . . . x . . . . . .\n\
         . . . . x x . . . . .\n\
         . . . . x x x . . . .\n\
         . . . . . . . x x x .\n\
         . . . . . . . x x x .\n\
         . . . . . . . x x x .\n\
         . . . . . . . . . . .\n"
    );
    assert_eq!(
        row.loss_mask(11).unwrap(),
        [
            false, true, true, false, false, true, false, false, false, false, false
        ]
    );
    // Cutting the row drops the prediction that would read past the cut.
    assert_eq!(row.loss_mask(3).unwrap(), [false, true, false]);
}

// ---------------------------------------------------------------------------------------
// Property tests.

/// Checks the cross-entropy gradient against central finite differences of the loss.
fn check_gradient(logits: &DMatrix<f64>, tokens: &[usize], mask: &[bool], reduction: Reduction) {
    let (loss, grad) = cross_entropy_grad(logits, tokens, mask, reduction).unwrap();
    let reduce = |l: &DMatrix<f64>| {
        let ce = cross_entropy(l, tokens, mask).unwrap();
        match reduction {
            Reduction::Sum => ce.sum,
            Reduction::Mean => ce.mean().unwrap(),
        }
    };
    assert_close(
        loss,
        reduce(logits),
        1e-14,
        "loss agrees with cross_entropy",
    );
    let h = 1e-5;
    for i in 0..logits.nrows() {
        for j in 0..logits.ncols() {
            let (mut up, mut down) = (logits.clone(), logits.clone());
            up[(i, j)] += h;
            down[(i, j)] -= h;
            let fd = (reduce(&up) - reduce(&down)) / (2.0 * h);
            assert!(
                (fd - grad[(i, j)]).abs() < 1e-7,
                "d/dlogits[{i},{j}]: fd {fd} vs {}",
                grad[(i, j)]
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// p = 0 is the causal objective: same masks, same losses, same gradients.
    #[test]
    fn prefix_zero_equals_causal(n in 0usize..14, vocab in 1usize..6, seed: u64) {
        let mut s = Stream(seed);
        let logits = s.matrix(n, vocab, 4.0);
        let tokens = s.tokens(n, vocab);
        let causal = Objective::Causal;
        for zero in [Objective::PrefixLm { prefix_len: 0 }, Objective::PromptMasked { prompt_len: 0 }] {
            prop_assert_eq!(zero.loss_mask(n).unwrap(), causal.loss_mask(n).unwrap());
            prop_assert_eq!(zero.attention_mask().to_dense(n, n).unwrap(), causal.attention_mask().to_dense(n, n).unwrap());
            prop_assert_eq!(zero.loss(&logits, &tokens).unwrap(), causal.loss(&logits, &tokens).unwrap());
            let mask = zero.loss_mask(n).unwrap();
            prop_assert_eq!(
                cross_entropy_grad(&logits, &tokens, &mask, Reduction::Sum).unwrap(),
                cross_entropy_grad(&logits, &tokens, &causal.loss_mask(n).unwrap(), Reduction::Sum).unwrap()
            );
        }
    }

    /// The number of scored positions is n − max(p, 1), clamped at 0, everywhere it shows.
    #[test]
    fn scored_count_is_n_minus_max_p_1(n in 0usize..20, o in objective(24), seed: u64) {
        let expected = n.saturating_sub(o.condition_len().max(1));
        prop_assert_eq!(o.scored_count(n), expected);
        let mask = o.loss_mask(n).unwrap();
        prop_assert_eq!(mask.len(), n);
        prop_assert_eq!(mask.iter().filter(|m| **m).count(), expected);
        prop_assert!(n == 0 || !mask[n - 1]);
        let mut s = Stream(seed);
        let logits = s.matrix(n, 3, 2.0);
        prop_assert_eq!(o.loss(&logits, &s.tokens(n, 3)).unwrap().count, expected);
        // The first scored position is the last condition token (or 0 without one).
        if expected > 0 {
            prop_assert_eq!(mask.iter().position(|m| *m), Some(o.condition_len().max(1) - 1));
        }
    }

    /// Changing the tokens inside the prefix (the targets of the prefix's own predictions)
    /// never changes a prefix objective's loss; changing the first target does.
    #[test]
    fn prefix_targets_do_not_count(
        n in 1usize..14, p in 0usize..16, vocab in 2usize..6, prompt in any::<bool>(), seed: u64,
    ) {
        let o = if prompt {
            Objective::PromptMasked { prompt_len: p }
        } else {
            Objective::PrefixLm { prefix_len: p }
        };
        let mut s = Stream(seed);
        let logits = s.matrix(n, vocab, 3.0);
        let tokens = s.tokens(n, vocab);
        let mut changed = tokens.clone();
        for t in changed.iter_mut().take(p) {
            // Any value, even an id outside the vocabulary: prefix tokens are never targets.
            *t = if s.below(2) == 0 { s.below(vocab) } else { usize::MAX };
        }
        let before = o.loss(&logits, &tokens).unwrap();
        let after = o.loss(&logits, &changed).unwrap();
        prop_assert_eq!(&before, &after);
        let logits32 = cast::<f32>(&logits);
        prop_assert_eq!(o.loss(&logits32, &tokens).unwrap(), o.loss(&logits32, &changed).unwrap());
        // The last prefix token's prediction of the first target does count.
        if p >= 1 && p < n {
            let mut first = tokens.clone();
            first[p] = (tokens[p] + 1) % vocab;
            let moved = o.loss(&logits, &first).unwrap();
            prop_assert!(moved.per_position[p - 1] != before.per_position[p - 1]);
            prop_assert!(before.per_position[p - 1] > 0.0);
        }
    }

    /// In a prefix LM, prefix query rows see every prefix key and nothing after the prefix;
    /// the other rows see the prefix plus their causal past.
    #[test]
    fn prefix_rows_see_the_prefix_only(n in 0usize..14, p in 0usize..16) {
        let m = Objective::PrefixLm { prefix_len: p }.attention_mask();
        for i in 0..n {
            for j in 0..n {
                let expected = if i < p { j < p } else { j < p || j <= i };
                prop_assert_eq!(m.allows(i, j), expected, "({}, {})", i, j);
            }
        }
    }

    /// The cross-entropy gradient matches central finite differences (f64), mean and sum.
    #[test]
    fn gradient_matches_finite_differences(
        n in 1usize..6, vocab in 1usize..5, seed: u64, sum in any::<bool>(),
    ) {
        let mut s = Stream(seed);
        let logits = s.matrix(n, vocab, 3.0);
        let tokens = s.tokens(n, vocab);
        let mut mask: Vec<bool> = (0..n).map(|_| s.below(3) > 0).collect();
        mask[n - 1] = false;
        let reduction = if sum { Reduction::Sum } else { Reduction::Mean };
        if reduction == Reduction::Mean && !mask.contains(&true) {
            let empty = matches!(
                cross_entropy_grad(&logits, &tokens, &mask, reduction),
                Err(Error::Empty { .. })
            );
            prop_assert!(empty);
        } else {
            check_gradient(&logits, &tokens, &mask, reduction);
        }
    }

    /// A packed row gives the same attention outputs and the same losses as its examples
    /// run one by one; padding rows get zero output and no loss.
    #[test]
    fn packed_equals_examples_one_by_one(
        examples in prop::collection::vec((0usize..7, objective(8)), 1..5),
        pad in 0usize..3,
        seed: u64,
    ) {
        let row = Packed::new(examples.clone()).unwrap();
        let n = row.len() + pad;
        let (d, vocab) = (3, 5);
        let mut s = Stream(seed);
        let (q, k, v) = (s.matrix(n, d, 1.5), s.matrix(n, d, 1.5), s.matrix(n, 2, 1.0));
        let logits = s.matrix(n, vocab, 3.0);
        let tokens = s.tokens(n, vocab);

        let packed_out = scaled_attention(&q, &k, &v, &row.attention_mask()).unwrap();
        let packed_ce = row.loss(&logits, &tokens).unwrap();
        let (_, packed_grad) =
            cross_entropy_grad(&logits, &tokens, &row.loss_mask(n).unwrap(), Reduction::Sum).unwrap();

        let (mut sum, mut count) = (0.0, 0);
        for (range, o) in row.documents() {
            let (start, len) = (range.start, range.len());
            let mask = o.attention_mask();
            let out = scaled_attention(q.rows(start, len), k.rows(start, len), v.rows(start, len), &mask)
                .unwrap();
            prop_assert!((&out - packed_out.rows(start, len)).amax() < 1e-12);
            let ce = o.loss(logits.rows(start, len), &tokens[range.clone()]).unwrap();
            prop_assert_eq!(&ce.per_position[..], &packed_ce.per_position[range.clone()]);
            let (_, grad) = cross_entropy_grad(
                logits.rows(start, len), &tokens[range.clone()], &o.loss_mask(len).unwrap(), Reduction::Sum,
            ).unwrap();
            prop_assert_eq!(&grad, &packed_grad.rows(start, len).into_owned());
            sum += ce.sum;
            count += ce.count;
        }
        prop_assert_eq!(packed_ce.count, count);
        assert_close(packed_ce.sum, sum, 1e-14, "packed sum");
        for i in row.len()..n {
            prop_assert!(packed_out.row(i).iter().all(|x| *x == 0.0));
            prop_assert_eq!(packed_ce.per_position[i], 0.0);
        }
        // The packed mask equals the per-document rule everywhere, and no position predicts
        // across a document boundary.
        let ids = row.document_ids();
        let mask = row.attention_mask();
        let lm = row.loss_mask(n).unwrap();
        for (range, o) in row.documents() {
            let local = o.attention_mask();
            for i in 0..n {
                for j in 0..n {
                    if range.contains(&i) {
                        let expected = range.contains(&j) && local.allows(i - range.start, j - range.start);
                        prop_assert_eq!(mask.allows(i, j), expected);
                    }
                }
            }
        }
        for i in 0..n {
            if lm[i] {
                prop_assert!(i + 1 < row.len() && ids[i] == ids[i + 1]);
            }
        }
    }

    /// Block classification of packed masks is sound, and a block whose queries all lie in
    /// documents before (or after) all its keys' documents is skipped (Empty).
    #[test]
    fn packed_mask_classifies_soundly(
        examples in prop::collection::vec((1usize..6, objective(6)), 1..5),
        tile in 1usize..5,
    ) {
        let row = Packed::new(examples).unwrap();
        let n = row.len();
        let mask = row.attention_mask();
        let ids = row.document_ids();
        for r0 in (0..n).step_by(tile) {
            for c0 in (0..n).step_by(tile) {
                let (r1, c1) = ((r0 + tile).min(n), (c0 + tile).min(n));
                let vals: Vec<bool> = (r0..r1)
                    .flat_map(|i| (c0..c1).map(move |j| (i, j)))
                    .map(|(i, j)| mask.allows(i, j))
                    .collect();
                let block = mask.classify(r0..r1, c0..c1, n, n);
                match block {
                    Block::Empty => prop_assert!(vals.iter().all(|v| !v)),
                    Block::Full => prop_assert!(vals.iter().all(|v| *v)),
                    Block::Partial => {}
                }
                // Queries all in documents before every key's document: skipped.
                if ids[r1 - 1] < ids[c0] || ids[c1 - 1] < ids[r0] {
                    prop_assert_eq!(block, Block::Empty);
                }
            }
        }
    }

    /// f32 and f64 agree on losses, gradients and packed attention.
    #[test]
    fn f32_agrees_with_f64(
        examples in prop::collection::vec((1usize..6, objective(6)), 1..4),
        scale in prop_oneof![Just(1.0), Just(10.0), Just(1e4)],
        seed: u64,
    ) {
        let row = Packed::new(examples).unwrap();
        let n = row.len();
        let vocab = 6;
        let mut s = Stream(seed);
        let logits = s.matrix(n, vocab, scale);
        let tokens = s.tokens(n, vocab);
        let mask = row.loss_mask(n).unwrap();
        let ce64 = cross_entropy(&logits, &tokens, &mask).unwrap();
        let ce32 = cross_entropy(&cast::<f32>(&logits), &tokens, &mask).unwrap();
        prop_assert_eq!(ce64.count, ce32.count);
        // f32 rounds logits of size `scale` by ~scale·6e-8; the loss inherits that.
        let tol = 1e-6 * scale.max(1.0);
        for (a, b) in ce64.per_position.iter().zip(&ce32.per_position) {
            prop_assert!((a - f64::from(*b)).abs() <= tol * (1.0 + a.abs()), "{} vs {}", a, b);
        }
        if ce64.count > 0 {
            let (_, g64) = cross_entropy_grad(&logits, &tokens, &mask, Reduction::Mean).unwrap();
            let (_, g32) =
                cross_entropy_grad(&cast::<f32>(&logits), &tokens, &mask, Reduction::Mean).unwrap();
            // Softmax probabilities of rounded logits: off by ~tol relative to their size.
            prop_assert!((g64 - g32.map(f64::from)).amax() <= 1e-5 * scale.max(1.0));
        }
        let (q, v) = (s.matrix(n, 4, 1.0), s.matrix(n, 2, 1.0));
        let a64 = scaled_attention(&q, &q, &v, &row.attention_mask()).unwrap();
        let a32 = scaled_attention(&cast::<f32>(&q), &cast::<f32>(&q), &cast::<f32>(&v), &row.attention_mask())
            .unwrap();
        prop_assert!((a64 - a32.map(f64::from)).amax() < 1e-5);
    }
}
