//! Language-model objectives: the attention mask and the loss mask from one spec, and the
//! masked next-token cross-entropy.
//!
//! # One spec, two masks
//!
//! An [`Objective`] says how a sequence of n tokens `t_0 .. t_{n-1}` is trained. From it come
//! both the attention [`Mask`] (which keys each position may read) and the loss mask (which
//! positions' predictions count), so the two cannot disagree:
//!
//! | objective | attention: query `i` sees key `j` iff | loss: position `i` is scored iff |
//! |---|---|---|
//! | [`Objective::Causal`] | `j <= i` ([`Mask::causal`]) | `0 <= i <= n − 2` |
//! | [`Objective::PrefixLm`]` { prefix_len: p }` | `j < p` or `j <= i` ([`Mask::prefix_lm`]) | `max(p, 1) − 1 <= i <= n − 2` |
//! | [`Objective::PromptMasked`]` { prompt_len: p }` | `j <= i` ([`Mask::causal`]) | `max(p, 1) − 1 <= i <= n − 2` |
//!
//! **The off-by-one rule.** Position `i` predicts token `t_{i+1}` (its logits row is scored
//! against the *next* token). So the last position `n − 1` is never scored (it has no next
//! token), and with a prefix of `p >= 1` tokens the first scored position is `p − 1`: the
//! last prefix token predicts the first target `t_p`. Exactly the targets `t_p .. t_{n-1}`
//! count, `n − max(p, 1)` of them (0 if `p >= n`). `p = 0` is the causal objective.
//!
//! The prefix LM (T5's prefix LM, UniLM, GLM) lets the prefix attend bidirectionally; the
//! prompt-masked objective (instruction fine-tuning with the prompt's labels set to `-100`,
//! which is what the seed's question 5 actually describes) keeps causal attention and only
//! drops the prompt from the loss. Both score the same positions for the same `p`.
//!
//! # Packed rows
//!
//! [`Packed`] puts several examples, each with its own objective, into one row. Its attention
//! mask is block-diagonal (a position sees only its own document,
//! [`Mask::documents`]), and no position predicts across a document boundary: the last
//! token of every document is unscored. Running a packed row gives the same attention
//! outputs and the same losses as running its examples one by one.
//!
//! # Cross-entropy
//!
//! [`cross_entropy`] takes the logits (n x vocab), the **raw token sequence** (the same ids
//! the model read, length n; this is Hugging Face's `labels = input_ids` with the shift done
//! inside) and a loss mask, and computes for each scored position
//!
//! ```text
//! loss_i = −log_softmax(logits_i)[t_{i+1}] = lse(logits_i) − logits_i[t_{i+1}]
//! mean   = Σ_{i scored} loss_i / count,      sum = Σ_{i scored} loss_i
//! ∂mean / ∂logits_i = (softmax(logits_i) − onehot(t_{i+1})) / count   (0 for unscored rows)
//! ```
//!
//! through the crate's [`log_softmax`], so logits of ±1e4 (or 1e30) are fine.

use crate::Float;
use crate::error::{Error, Result, check_finite, try_matrix, try_vec};
use crate::mask::Mask;
use crate::prelude::*;
use crate::softmax::{log_softmax, softmax};
use core::fmt;
use core::ops::Range;
use nalgebra::{DMatrix, DMatrixView};

/// How a sequence is trained: which keys each position attends to and which positions'
/// next-token predictions count in the loss. See the [module docs](self) for the table.
///
/// # Examples
///
/// The seed's `[A, B, C, D | a, b, c, d]`, n = 8 with a prefix of 4:
///
/// ```
/// use attention_math::sheet::lm::Objective;
///
/// let causal = Objective::Causal;
/// let prefix = Objective::PrefixLm { prefix_len: 4 };
/// let prompt = Objective::PromptMasked { prompt_len: 4 };
/// // Causal scores positions 0..=6 (P(B|A) .. P(d|A..c)); the prefix objectives 3..=6:
/// // D predicts a, a predicts b, b predicts c, c predicts d.
/// assert_eq!(causal.scored_positions(8), 0..7);
/// assert_eq!(prefix.scored_positions(8), 3..7);
/// assert_eq!(prompt.loss_mask(8), prefix.loss_mask(8));
/// // They differ in attention: the prefix LM's prefix sees itself bidirectionally.
/// assert!(prefix.attention_mask().allows(0, 3));
/// assert!(!prompt.attention_mask().allows(0, 3));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Objective {
    /// Causal LM: causal attention, every position predicts the next token.
    Causal,
    /// Prefix LM: the first `prefix_len` tokens attend to each other bidirectionally (and
    /// never to what follows); the rest is causal. Only the targets after the prefix count.
    PrefixLm {
        /// Number of prefix (condition) tokens, `p`.
        prefix_len: usize,
    },
    /// Prompt-masked causal LM (instruction fine-tuning, "loss on the answer only"): causal
    /// attention everywhere, and only the targets after the prompt count.
    PromptMasked {
        /// Number of prompt (condition) tokens, `p`.
        prompt_len: usize,
    },
}

impl Objective {
    /// The number of conditioning tokens `p` whose own predictions do not count: 0 for
    /// [`Objective::Causal`], `prefix_len` or `prompt_len` otherwise.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lm::Objective;
    ///
    /// assert_eq!(Objective::Causal.condition_len(), 0);
    /// assert_eq!(Objective::PromptMasked { prompt_len: 3 }.condition_len(), 3);
    /// ```
    pub fn condition_len(&self) -> usize {
        match *self {
            Objective::Causal => 0,
            Objective::PrefixLm { prefix_len } => prefix_len,
            Objective::PromptMasked { prompt_len } => prompt_len,
        }
    }

    /// The attention mask: [`Mask::causal`] for the causal and prompt-masked objectives,
    /// [`Mask::prefix_lm`]`(p)` (query `i` sees key `j` iff `j < p` or `j <= i`) for the
    /// prefix LM. It does not depend on n.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lm::Objective;
    ///
    /// let m = Objective::PrefixLm { prefix_len: 2 }.attention_mask();
    /// assert_eq!(m.grid(4, 4).to_string(), "x x . .\nx x . .\nx x x .\nx x x x\n");
    /// ```
    pub fn attention_mask(&self) -> Mask {
        match *self {
            Objective::Causal | Objective::PromptMasked { .. } => Mask::causal(),
            Objective::PrefixLm { prefix_len } => Mask::prefix_lm(prefix_len),
        }
    }

    /// The contiguous range of scored positions for n tokens: `max(p, 1) − 1 .. n − 1`
    /// (empty when `p >= n` or `n <= 1`). Position `i` in it predicts token `i + 1`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lm::Objective;
    ///
    /// assert_eq!(Objective::Causal.scored_positions(5), 0..4);
    /// assert_eq!(Objective::PrefixLm { prefix_len: 2 }.scored_positions(5), 1..4);
    /// assert!(Objective::PrefixLm { prefix_len: 5 }.scored_positions(5).is_empty());
    /// ```
    pub fn scored_positions(&self, n: usize) -> Range<usize> {
        let end = n.saturating_sub(1);
        let start = (self.condition_len().max(1) - 1).min(end);
        start..end
    }

    /// The number of scored positions for n tokens: `n − max(p, 1)`, clamped at 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lm::Objective;
    ///
    /// assert_eq!(Objective::Causal.scored_count(8), 7);
    /// assert_eq!(Objective::PrefixLm { prefix_len: 4 }.scored_count(8), 4);
    /// assert_eq!(Objective::PromptMasked { prompt_len: 9 }.scored_count(8), 0);
    /// ```
    pub fn scored_count(&self, n: usize) -> usize {
        self.scored_positions(n).len()
    }

    /// The loss mask for n tokens: entry `i` is `true` iff position `i`'s prediction of
    /// token `i + 1` counts, i.e. `i` is in [`Objective::scored_positions`]. Length n; the
    /// last entry is always `false`.
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`] if n entries cannot be allocated (n near `usize::MAX`).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Error, sheet::lm::Objective};
    ///
    /// let m = Objective::PrefixLm { prefix_len: 2 }.loss_mask(5)?;
    /// assert_eq!(m, [false, true, true, true, false]);
    /// assert!(matches!(Objective::Causal.loss_mask(usize::MAX), Err(Error::TooLarge { .. })));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn loss_mask(&self, n: usize) -> Result<Vec<bool>> {
        let mut mask = try_vec("the loss mask of n positions", n, 1, false)?;
        mask[self.scored_positions(n)].fill(true);
        Ok(mask)
    }

    /// The objective's cross-entropy: [`cross_entropy`] with n = `logits.nrows()` and this
    /// objective's [`loss_mask`](Objective::loss_mask).
    ///
    /// # Errors
    ///
    /// Those of [`cross_entropy`] (the loss mask is always well formed here); the length of
    /// `tokens` is checked before the loss mask is built.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lm::Objective;
    /// use nalgebra::DMatrix;
    ///
    /// // Uniform logits over a vocabulary of 3: every scored position costs ln 3.
    /// let logits = DMatrix::<f64>::zeros(4, 3);
    /// let tokens = [0, 1, 2, 0];
    /// let ce = Objective::PrefixLm { prefix_len: 2 }.loss(&logits, &tokens)?;
    /// assert_eq!(ce.count, 2);
    /// assert!((ce.mean()? - 3.0_f64.ln()).abs() < 1e-15);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn loss<'a, T: Float>(
        &self,
        logits: impl Into<DMatrixView<'a, T>>,
        tokens: &[usize],
    ) -> Result<CrossEntropy<T>> {
        let logits = logits.into();
        check_tokens(&logits, tokens)?;
        cross_entropy(logits, tokens, &self.loss_mask(logits.nrows())?)
    }
}

/// `tokens` must have one entry per row of `logits`.
fn check_tokens<T: Float>(logits: &DMatrixView<'_, T>, tokens: &[usize]) -> Result<()> {
    if tokens.len() == logits.nrows() {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            arg: "tokens",
            found: tokens.len(),
            expected: logits.nrows(),
        })
    }
}

impl fmt::Display for Objective {
    /// `causal`, `prefix_lm(p)` or `prompt_masked(p)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Objective::Causal => f.write_str("causal"),
            Objective::PrefixLm { prefix_len } => write!(f, "prefix_lm({prefix_len})"),
            Objective::PromptMasked { prompt_len } => write!(f, "prompt_masked({prompt_len})"),
        }
    }
}

/// Several examples packed into one row, each with its own [`Objective`].
///
/// Example `k` of length `len_k` occupies positions `start_k .. start_k + len_k` and has
/// document id `k`. Within a document the objective's rules apply in document-local
/// positions; across documents nothing is visible and nothing is predicted:
///
/// - attention: `documents(ids) ∧ (causal ∨ key is in its document's prefix)`, built from
///   named masks so a tiled kernel can skip whole blocks (see [`Packed::attention_mask`]);
/// - loss: the objectives' loss masks placed side by side, so the last token of each
///   document is never scored (it would otherwise predict the next document's first token).
///
/// A row may be longer than the packed examples (padding): positions from [`Packed::len`]
/// on belong to no document, see nothing (attention output 0) and are never scored.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::lm::{Objective, Packed};
///
/// let row = Packed::new([
///     (3, Objective::PrefixLm { prefix_len: 2 }),
///     (3, Objective::Causal),
/// ])?;
/// assert_eq!(row.document_ids(), &[0, 0, 0, 1, 1, 1]);
/// assert_eq!(row.loss_mask(6)?, [false, true, false, true, true, false]);
/// assert_eq!(
///     row.attention_mask().grid(6, 6).to_string(),
///     "x x . . . .\n\
///      x x . . . .\n\
///      x x x . . .\n\
///      . . . x . .\n\
///      . . . x x .\n\
///      . . . x x x\n"
/// );
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packed {
    documents: Vec<(Range<usize>, Objective)>,
    ids: Vec<usize>,
}

impl Packed {
    /// Packs examples given as `(length, objective)` pairs, in order. Example `k` gets
    /// document id `k`; an example of length 0 takes no position.
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`] if the total length overflows `usize` or its document ids (one
    /// `usize` per position) cannot be allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Error, sheet::lm::{Objective, Packed}};
    ///
    /// let row = Packed::new([(2, Objective::Causal), (0, Objective::Causal), (1, Objective::Causal)])?;
    /// assert_eq!(row.len(), 3);
    /// assert_eq!(row.document_ids(), &[0, 0, 2]);
    /// let huge = Packed::new([(1, Objective::Causal), (usize::MAX, Objective::Causal)]);
    /// assert!(matches!(huge, Err(Error::TooLarge { .. })));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn new(examples: impl IntoIterator<Item = (usize, Objective)>) -> Result<Self> {
        const WHAT: &str = "the packed row's document ids";
        let mut documents = Vec::new();
        let mut ids = Vec::new();
        for (k, (len, objective)) in examples.into_iter().enumerate() {
            let start = ids.len();
            let too_large = Error::TooLarge {
                what: WHAT,
                shape: (start.saturating_add(len), 1),
            };
            let end = start.checked_add(len).ok_or(too_large.clone())?;
            crate::error::checked_len::<usize>(WHAT, end, 1)?;
            ids.try_reserve(len).map_err(|_| too_large)?;
            ids.resize(end, k);
            documents.push((start..end, objective));
        }
        Ok(Packed { documents, ids })
    }

    /// Total number of packed positions, `Σ len_k`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lm::{Objective, Packed};
    ///
    /// assert_eq!(Packed::new([(4, Objective::Causal), (3, Objective::Causal)])?.len(), 7);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// `true` if no position is packed.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lm::Packed;
    ///
    /// assert!(Packed::new([])?.is_empty());
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The document id of every packed position (length [`Packed::len`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lm::{Objective, Packed};
    ///
    /// let row = Packed::new([(1, Objective::Causal), (2, Objective::Causal)])?;
    /// assert_eq!(row.document_ids(), &[0, 1, 1]);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn document_ids(&self) -> &[usize] {
        &self.ids
    }

    /// The examples as `(positions, objective)`, in order, one per example given to
    /// [`Packed::new`] (empty ranges included).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lm::{Objective, Packed};
    ///
    /// let row = Packed::new([(2, Objective::Causal), (3, Objective::PrefixLm { prefix_len: 1 })])?;
    /// assert_eq!(row.documents()[1], (2..5, Objective::PrefixLm { prefix_len: 1 }));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn documents(&self) -> &[(Range<usize>, Objective)] {
        &self.documents
    }

    /// The block-diagonal attention mask: query `i` sees key `j` iff both are in the same
    /// document `k` (starting at `s`) and `j <= i` or, for a prefix-LM document,
    /// `j − s < prefix_len`.
    ///
    /// It is `Mask::documents(ids).and(Mask::causal().or(prefix keys))`, where the prefix
    /// keys are the union of the ranges `s .. s + min(p, len)` of the prefix-LM documents
    /// with `p >= 2` (a one-token prefix is already visible causally), each range written
    /// as `key_padding(end) ∧ ¬key_padding(start)` and the union as a balanced tree, so the
    /// mask costs O(log documents) to evaluate and [`Mask::classify`] can still report
    /// empty and full blocks.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lm::{Objective, Packed};
    /// use attention_math::Block;
    ///
    /// let row = Packed::new([(4, Objective::Causal), (4, Objective::PrefixLm { prefix_len: 3 })])?;
    /// let m = row.attention_mask();
    /// assert!(m.allows(4, 6) && !m.allows(4, 7) && !m.allows(5, 3));
    /// // A kernel can skip the off-diagonal blocks.
    /// assert_eq!(m.classify(4..8, 0..4, 8, 8), Block::Empty);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn attention_mask(&self) -> Mask {
        let prefixes: Vec<Range<usize>> = self
            .documents
            .iter()
            .filter_map(|(range, objective)| match *objective {
                Objective::PrefixLm { prefix_len } if prefix_len.min(range.len()) >= 2 => {
                    Some(range.start..range.start + prefix_len.min(range.len()))
                }
                _ => None,
            })
            .collect();
        let within = if prefixes.is_empty() {
            Mask::causal()
        } else {
            Mask::causal().or(keys_in(&prefixes))
        };
        Mask::documents(self.ids.clone()).and(within)
    }

    /// The loss mask for a row of n positions: position `i` is scored iff it lies in a
    /// document whose objective scores it (in document-local positions) and `i + 1 < n`.
    /// Padding positions (`i >= len`) are never scored; n < [`Packed::len`] cuts the row.
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`] if n entries cannot be allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lm::{Objective, Packed};
    ///
    /// let row = Packed::new([(3, Objective::Causal), (2, Objective::Causal)])?;
    /// // Position 2 ends document 0: it does not predict position 3.
    /// assert_eq!(row.loss_mask(6)?, [true, true, false, true, false, false]);
    /// assert!(row.loss_mask(usize::MAX).is_err());
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn loss_mask(&self, n: usize) -> Result<Vec<bool>> {
        let mut mask = try_vec("the loss mask of n positions", n, 1, false)?;
        for (range, objective) in &self.documents {
            let local = objective.scored_positions(range.len());
            for i in local {
                let at = range.start + i;
                if at + 1 < n {
                    mask[at] = true;
                }
            }
        }
        Ok(mask)
    }

    /// The packed row's cross-entropy: [`cross_entropy`] with n = `logits.nrows()` and
    /// [`Packed::loss_mask`]`(n)`. Its sum is the sum of the examples' sums.
    ///
    /// # Errors
    ///
    /// Those of [`cross_entropy`]; the length of `tokens` is checked before the loss mask is
    /// built.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lm::{Objective, Packed};
    /// use nalgebra::DMatrix;
    ///
    /// let row = Packed::new([(3, Objective::Causal), (3, Objective::PromptMasked { prompt_len: 2 })])?;
    /// let logits = DMatrix::<f64>::zeros(6, 4);
    /// let ce = row.loss(&logits, &[0, 1, 2, 3, 0, 1])?;
    /// assert_eq!(ce.count, 3); // positions 0, 1 and 4
    /// assert!((ce.sum - 3.0 * 4.0_f64.ln()).abs() < 1e-14);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn loss<'a, T: Float>(
        &self,
        logits: impl Into<DMatrixView<'a, T>>,
        tokens: &[usize],
    ) -> Result<CrossEntropy<T>> {
        let logits = logits.into();
        check_tokens(&logits, tokens)?;
        cross_entropy(logits, tokens, &self.loss_mask(logits.nrows())?)
    }
}

/// The key-only mask "key `j` lies in one of `ranges`" (sorted, disjoint, non-empty), from
/// named masks: a balanced tree splitting at a range start, so that evaluation visits
/// O(log ranges) nodes and block classification stays exact per range.
fn keys_in(ranges: &[Range<usize>]) -> Mask {
    match ranges {
        [] => Mask::key_padding(0),
        [r] if r.start == 0 => Mask::key_padding(r.end),
        [r] => Mask::key_padding(r.end).and(Mask::key_padding(r.start).not()),
        _ => {
            let (left, right) = ranges.split_at(ranges.len() / 2);
            let split = right[0].start;
            let below = Mask::key_padding(split);
            below
                .clone()
                .and(keys_in(left))
                .or(below.not().and(keys_in(right)))
        }
    }
}

/// How [`cross_entropy_grad`] reduces the per-position losses.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::lm::Reduction;
///
/// assert_ne!(Reduction::Mean, Reduction::Sum);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// Mean over the scored positions (PyTorch's `reduction="mean"` with ignored labels).
    Mean,
    /// Sum over the scored positions.
    Sum,
}

/// Per-position next-token losses and their sum; made by [`cross_entropy`].
///
/// # Examples
///
/// ```
/// use attention_math::sheet::lm::cross_entropy;
/// use nalgebra::dmatrix;
///
/// let logits = dmatrix![0.0_f64, 0.0; 0.0, 0.0];
/// let ce = cross_entropy(&logits, &[0, 1], &[true, false])?;
/// assert_eq!(ce.per_position, vec![2.0_f64.ln(), 0.0]);
/// assert_eq!((ce.sum, ce.count), (2.0_f64.ln(), 1));
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct CrossEntropy<T: Float> {
    /// Length n: `−log_softmax(logits_i)[t_{i+1}]` at scored positions, `0` elsewhere
    /// (as PyTorch's `reduction="none"` gives at ignored labels).
    pub per_position: Vec<T>,
    /// The sum over scored positions; `0` when nothing is scored.
    pub sum: T,
    /// The number of scored positions.
    pub count: usize,
}

impl<T: Float> CrossEntropy<T> {
    /// The mean over scored positions, `sum / count`.
    ///
    /// # Errors
    ///
    /// [`Error::Empty`] if no position is scored (where PyTorch returns NaN).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lm::cross_entropy;
    /// use nalgebra::DMatrix;
    ///
    /// let logits = DMatrix::<f32>::zeros(2, 5);
    /// let ce = cross_entropy(&logits, &[1, 2], &[false, false])?;
    /// assert_eq!(ce.sum, 0.0);
    /// assert!(ce.mean().is_err());
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn mean(&self) -> Result<T> {
        if self.count == 0 {
            Err(no_scored_position())
        } else {
            Ok(self.sum / T::of_usize(self.count))
        }
    }
}

fn no_scored_position() -> Error {
    Error::Empty {
        what: "the set of scored positions (loss_mask has no true entry)",
    }
}

/// Checks the arguments of the cross-entropy and returns the scored positions with their
/// targets, `(i, t_{i+1})`.
fn scored_targets<T: Float>(
    logits: &DMatrixView<'_, T>,
    tokens: &[usize],
    loss_mask: &[bool],
) -> Result<Vec<(usize, usize)>> {
    let (n, vocab) = logits.shape();
    check_tokens(logits, tokens)?;
    if loss_mask.len() != n {
        return Err(Error::LengthMismatch {
            arg: "loss_mask",
            found: loss_mask.len(),
            expected: n,
        });
    }
    check_finite("logits", logits)?;
    if n > 0 && loss_mask[n - 1] {
        return Err(Error::InvalidParameter {
            name: "loss_mask[n - 1]",
            value: 1.0,
            requirement: "must be false, since the last position has no next token to predict",
        });
    }
    let mut scored = Vec::new();
    for (i, _) in loss_mask.iter().enumerate().filter(|(_, s)| **s) {
        let target = tokens[i + 1];
        if target >= vocab {
            return Err(Error::IndexOutOfRange {
                arg: "tokens",
                position: i + 1,
                index: target,
                bound: vocab,
            });
        }
        scored.push((i, target));
    }
    Ok(scored)
}

fn row_of<T: Float>(logits: &DMatrixView<'_, T>, i: usize) -> Vec<T> {
    logits.row(i).iter().copied().collect()
}

/// Masked next-token cross-entropy: for every position `i` with `loss_mask[i]`,
/// `loss_i = −log_softmax(logits_i)[tokens[i + 1]]`, with their sum and count.
///
/// Shapes: `logits` is n x vocab (row `i` is position `i`'s prediction); `tokens` is the
/// raw token sequence of length n, the same ids the model read, so the target of position
/// `i` is `tokens[i + 1]` (Hugging Face passes `labels = input_ids` and shifts inside the
/// model the same way); `loss_mask` has length n, `true` = scored, and must be `false` at
/// the last position. Build the mask with [`Objective::loss_mask`] or
/// [`Packed::loss_mask`]. Tokens that are no scored position's target are never read, so
/// they may hold any value (a padding id, say).
///
/// The log-softmax subtracts the row maximum, so any finite logits work (±1e4 in `f32`).
/// Nothing scored gives a sum of 0; its [`mean`](CrossEntropy::mean) is an error.
///
/// Accuracy: each loss `(max − s_t) + ln Σ_j exp(s_j − max)` has an absolute error of at
/// most about `(|s_t − max| + ln V + V) · ε` (V the vocabulary size); the sum adds `n · ε`
/// relative (its terms are non-negative).
///
/// # Errors
///
/// - [`Error::LengthMismatch`] if `tokens` or `loss_mask` does not have length n;
/// - [`Error::NonFinite`] if `logits` holds NaN or an infinity;
/// - [`Error::InvalidParameter`] if `loss_mask[n − 1]` is `true` (no next token);
/// - [`Error::IndexOutOfRange`] if a scored position's target `tokens[i + 1]` is >= vocab.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::lm::cross_entropy;
/// use nalgebra::dmatrix;
///
/// // Two positions, vocabulary of 2; only position 0 is scored, and it predicts tokens[1].
/// let logits = dmatrix![1e4_f32, 0.0; 5.0, 5.0];
/// let ce = cross_entropy(&logits, &[7, 0, 9], &[true, false, false]);
/// assert!(ce.is_err()); // 3 tokens for 2 rows
/// let ce = cross_entropy(&logits, &[7, 0], &[true, false])?;
/// assert_eq!(ce.per_position, vec![0.0, 0.0]); // certain and right: no loss
/// let ce = cross_entropy(&logits, &[7, 1], &[true, false])?;
/// assert_eq!(ce.sum, 1e4); // certain and wrong by 1e4 nats, finite
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn cross_entropy<'a, T: Float>(
    logits: impl Into<DMatrixView<'a, T>>,
    tokens: &[usize],
    loss_mask: &[bool],
) -> Result<CrossEntropy<T>> {
    let logits = logits.into();
    let scored = scored_targets(&logits, tokens, loss_mask)?;
    let mut per_position = try_vec("the n per-position losses", logits.nrows(), 1, T::zero())?;
    let mut sum = T::zero();
    for &(i, target) in &scored {
        let loss = -log_softmax(&row_of(&logits, i))[target];
        per_position[i] = loss;
        sum += loss;
    }
    Ok(CrossEntropy {
        per_position,
        sum,
        count: scored.len(),
    })
}

/// The masked next-token cross-entropy reduced by `reduction`, and its gradient with
/// respect to the logits (n x vocab):
///
/// ```text
/// ∂L/∂logits_i = (softmax(logits_i) − onehot(tokens[i + 1])) / c   for scored i, 0 otherwise
/// ```
///
/// with `c = count` for [`Reduction::Mean`] and `c = 1` for [`Reduction::Sum`]. Arguments
/// and conventions are those of [`cross_entropy`]; the loss returned equals its mean or sum.
///
/// # Errors
///
/// Those of [`cross_entropy`], and [`Error::Empty`] for [`Reduction::Mean`] when nothing is
/// scored ([`Reduction::Sum`] then returns loss 0 and a zero gradient).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::lm::{cross_entropy_grad, Reduction};
/// use nalgebra::dmatrix;
///
/// let logits = dmatrix![0.0_f64, 0.0; 3.0, 1.0; 0.0, 0.0];
/// let (loss, grad) = cross_entropy_grad(&logits, &[0, 1, 0], &[true, false, false], Reduction::Mean)?;
/// assert!((loss - 2.0_f64.ln()).abs() < 1e-15);
/// assert_eq!(grad, dmatrix![0.5, -0.5; 0.0, 0.0; 0.0, 0.0]);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn cross_entropy_grad<'a, T: Float>(
    logits: impl Into<DMatrixView<'a, T>>,
    tokens: &[usize],
    loss_mask: &[bool],
    reduction: Reduction,
) -> Result<(T, DMatrix<T>)> {
    let logits = logits.into();
    let scored = scored_targets(&logits, tokens, loss_mask)?;
    let scale = match reduction {
        Reduction::Sum => T::one(),
        Reduction::Mean if scored.is_empty() => return Err(no_scored_position()),
        Reduction::Mean => T::one() / T::of_usize(scored.len()),
    };
    let mut grad = try_matrix(
        "the n x vocab gradient",
        logits.nrows(),
        logits.ncols(),
        |_, _| T::zero(),
    )?;
    let mut sum = T::zero();
    for &(i, target) in &scored {
        let row = row_of(&logits, i);
        sum += -log_softmax(&row)[target];
        for (j, p) in softmax(&row).into_iter().enumerate() {
            let onehot = if j == target { T::one() } else { T::zero() };
            grad[(i, j)] = (p - onehot) * scale;
        }
    }
    Ok((sum * scale, grad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::Block;

    #[test]
    fn seed_example_loss_rows() {
        let n = 8;
        let causal = Objective::Causal.loss_mask(n).unwrap();
        assert_eq!(causal, [true, true, true, true, true, true, true, false]);
        for objective in [
            Objective::PrefixLm { prefix_len: 4 },
            Objective::PromptMasked { prompt_len: 4 },
        ] {
            assert_eq!(
                objective.loss_mask(n).unwrap(),
                [false, false, false, true, true, true, true, false]
            );
        }
    }

    #[test]
    fn prefix_of_one_scores_like_causal_but_prefix_of_two_does_not() {
        for n in 0..6 {
            let p1 = Objective::PrefixLm { prefix_len: 1 };
            assert_eq!(p1.loss_mask(n), Objective::Causal.loss_mask(n));
            assert_eq!(p1.loss_mask(n).unwrap().len(), n);
            assert_eq!(
                p1.attention_mask().to_dense(n, n).unwrap(),
                Mask::causal().to_dense(n, n).unwrap()
            );
        }
        assert_eq!(
            Objective::PrefixLm { prefix_len: 2 }.loss_mask(4).unwrap(),
            [false, true, true, false]
        );
    }

    #[test]
    fn keys_in_matches_membership_and_classifies_soundly() {
        let ranges = [1..3, 4..5, 7..10, 12..13, 14..16];
        let m = keys_in(&ranges);
        for j in 0..18 {
            let inside = ranges.iter().any(|r| r.contains(&j));
            assert_eq!(m.allows(0, j), inside, "key {j}");
        }
        for c0 in 0..18 {
            for c1 in c0 + 1..=18 {
                let vals: Vec<bool> = (c0..c1).map(|j| m.allows(0, j)).collect();
                match m.classify(0..4, c0..c1, 18, 18) {
                    Block::Empty => assert!(vals.iter().all(|v| !v)),
                    Block::Full => assert!(vals.iter().all(|v| *v)),
                    Block::Partial => {}
                }
            }
        }
        // Exact on a block inside one range and on a block between ranges.
        assert_eq!(m.classify(0..4, 7..10, 18, 18), Block::Full);
        assert_eq!(m.classify(0..4, 10..12, 18, 18), Block::Empty);
    }

    /// Before: `vec![false; n]` / `collect` of n entries panicked with "capacity overflow"
    /// (or aborted out of memory), and `start + len` wrapped in `Packed::new`.
    #[test]
    fn caller_sized_buffers_are_checked() {
        let too_large = |e: Error| matches!(e, Error::TooLarge { .. });
        assert!(too_large(
            Objective::Causal.loss_mask(usize::MAX).unwrap_err()
        ));
        assert!(too_large(
            Objective::PrefixLm { prefix_len: 3 }
                .loss_mask(1 << 62)
                .unwrap_err()
        ));
        let row = Packed::new([(2, Objective::Causal)]).unwrap();
        assert!(too_large(row.loss_mask(usize::MAX).unwrap_err()));
        let e = Packed::new([(3, Objective::Causal), (usize::MAX - 1, Objective::Causal)]);
        assert_eq!(
            e.unwrap_err(),
            Error::TooLarge {
                what: "the packed row's document ids",
                shape: (usize::MAX, 1)
            }
        );
        assert!(too_large(
            Packed::new([(1 << 62, Objective::Causal)]).unwrap_err()
        ));
        // 2^60 rows of zero logits hold no data; the tokens' length is checked first, so no
        // 2^60-entry loss mask is ever built.
        let logits = DMatrix::<f32>::zeros(1 << 60, 0);
        let e = Objective::Causal.loss(&logits, &[0, 1]).unwrap_err();
        assert_eq!(
            e,
            Error::LengthMismatch {
                arg: "tokens",
                found: 2,
                expected: 1 << 60
            }
        );
        assert!(matches!(
            row.loss(&logits, &[]),
            Err(Error::LengthMismatch { .. })
        ));
    }

    #[test]
    fn last_position_cannot_be_scored() {
        let logits = DMatrix::<f64>::zeros(3, 2);
        let err = cross_entropy(&logits, &[0, 1, 0], &[false, false, true]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "loss_mask[n - 1] = 1 is invalid: it must be false, since the last position has no next token to predict"
        );
    }
}
