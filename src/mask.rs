//! Attention masks.
//!
//! The math and the design are in `src/guide/masks.md`, rendered as
//! [`crate::guide::masks`].

use crate::Float;
use nalgebra::DMatrix;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// A rule deciding which keys each query may attend to; see the [guide](crate::guide::masks) for the
/// rules and each constructor for an example.
///
/// Cloning is cheap: closures and document ids are shared, not copied.
#[derive(Clone)]
pub struct Mask(Rule);

#[derive(Clone)]
enum Rule {
    All,
    /// `j <= i + offset`, where `offset` is 0 (top-left) or `m − n` (bottom-right).
    Causal {
        bottom_right: bool,
    },
    PrefixLm(usize),
    SlidingWindow(usize),
    KeyPadding(usize),
    Documents(Arc<[usize]>),
    Fn(Arc<dyn Fn(usize, usize) -> bool + Send + Sync>),
    And(Box<Mask>, Box<Mask>),
    Or(Box<Mask>, Box<Mask>),
    Not(Box<Mask>),
}

/// How a rectangular block of (query, key) pairs relates to a mask; see [`Mask::classify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// No pair in the block is allowed: a kernel may skip it.
    Empty,
    /// Every pair in the block is allowed: a kernel may skip the mask checks.
    Full,
    /// Some pairs may be allowed and some not (or the mask cannot tell cheaply).
    Partial,
}

impl Block {
    fn and(self, other: Block) -> Block {
        match (self, other) {
            (Block::Empty, _) | (_, Block::Empty) => Block::Empty,
            (Block::Full, Block::Full) => Block::Full,
            _ => Block::Partial,
        }
    }
    fn not(self) -> Block {
        match self {
            Block::Empty => Block::Full,
            Block::Full => Block::Empty,
            Block::Partial => Block::Partial,
        }
    }
    fn or(self, other: Block) -> Block {
        self.not().and(other.not()).not()
    }
}

/// Signed `a − b` for positions, which are far below `isize::MAX` for any real sequence.
fn diff(a: usize, b: usize) -> isize {
    a as isize - b as isize
}

impl Mask {
    /// No mask: every query attends to every key.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// assert!(Mask::none().allows(0, 99));
    /// ```
    pub fn none() -> Self {
        Mask(Rule::All)
    }

    /// Causal, top-left aligned: query `i` sees keys `j <= i`.
    ///
    /// This is PyTorch SDPA's `is_causal=True` and JAX's causal mask. When there are more
    /// keys than queries (decoding with a KV cache), the queries are usually the *last*
    /// positions; use [`Mask::causal_bottom_right`] for that.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// let causal = Mask::causal();
    /// assert!(causal.allows(3, 3) && causal.allows(3, 0));
    /// assert!(!causal.allows(3, 4));
    /// assert_eq!(causal.grid(3, 3).to_string(), "x . .\nx x .\nx x x\n");
    /// ```
    pub fn causal() -> Self {
        Mask(Rule::Causal {
            bottom_right: false,
        })
    }

    /// Causal, bottom-right aligned: with n queries and m keys, query `i` sees keys
    /// `j <= i + (m − n)`, so the last query sees every key.
    ///
    /// This is FlashAttention's convention, right for decoding the last n tokens against a
    /// KV cache of m. For n = m it equals [`Mask::causal`]; for n > m the first n − m queries
    /// see no key and get zero output. Because it depends on n and m, evaluate it with
    /// [`Mask::allows_in`]; [`Mask::allows`] treats the shape as square.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// let m = Mask::causal_bottom_right();
    /// // 2 new queries against 4 cached keys: they are positions 2 and 3.
    /// assert!(m.allows_in(2, 4, 0, 2) && !m.allows_in(2, 4, 0, 3));
    /// assert_eq!(m.grid(2, 4).to_string(), "x x x .\nx x x x\n");
    /// ```
    pub fn causal_bottom_right() -> Self {
        Mask(Rule::Causal { bottom_right: true })
    }

    /// Prefix LM with a prefix of `prefix_len` tokens: query `i` sees key `j` iff
    /// `j < prefix_len` or `j <= i`.
    ///
    /// The prefix attends bidirectionally within itself (and never to the continuation);
    /// the rest is causal. `prefix_lm(0)` equals [`Mask::causal`]; `prefix_lm(p)` with
    /// `p >= n` equals [`Mask::none`] on n tokens.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// let m = Mask::prefix_lm(2);
    /// assert!(m.allows(0, 1)); // inside the prefix: bidirectional
    /// assert!(!m.allows(1, 2)); // the prefix never sees the continuation
    /// assert!(m.allows(3, 3) && !m.allows(2, 3));
    /// ```
    pub fn prefix_lm(prefix_len: usize) -> Self {
        Mask(Rule::PrefixLm(prefix_len))
    }

    /// Causal sliding window of width `w`: query `i` sees keys `i − w ..= i`, at most
    /// `w + 1` of them (`w = 0` sees only itself).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// let m = Mask::sliding_window(1);
    /// assert_eq!(m.grid(4, 4).to_string(), "x . . .\nx x . .\n. x x .\n. . x x\n");
    /// ```
    pub fn sliding_window(w: usize) -> Self {
        Mask(Rule::SlidingWindow(w))
    }

    /// Key padding: only the first `valid_len` keys are real; key `j` is visible iff
    /// `j < valid_len`, to every query.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// let m = Mask::key_padding(2);
    /// assert!(m.allows(5, 1) && !m.allows(0, 2));
    /// ```
    pub fn key_padding(valid_len: usize) -> Self {
        Mask(Rule::KeyPadding(valid_len))
    }

    /// Packed sequences: position `i` belongs to document `ids[i]`, and a query sees a key
    /// iff both belong to the same document. Positions past the end of `ids` belong to no
    /// document and see nothing.
    ///
    /// Combine with [`Mask::causal`] for packed causal training:
    /// `Mask::documents(ids).and(Mask::causal())`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// let m = Mask::documents(vec![0, 0, 1, 1, 1]).and(Mask::causal());
    /// assert_eq!(
    ///     m.grid(5, 5).to_string(),
    ///     "x . . . .\nx x . . .\n. . x . .\n. . x x .\n. . x x x\n"
    /// );
    /// ```
    pub fn documents(ids: impl Into<Vec<usize>>) -> Self {
        Mask(Rule::Documents(ids.into().into()))
    }

    /// Any rule: query `i` sees key `j` iff `f(i, j)`.
    ///
    /// Kernels cannot skip blocks of a closure mask, so prefer the named constructors
    /// where one fits.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// let even_keys = Mask::from_fn(|_, j| j % 2 == 0);
    /// assert!(even_keys.allows(1, 4) && !even_keys.allows(1, 3));
    /// ```
    pub fn from_fn(f: impl Fn(usize, usize) -> bool + Send + Sync + 'static) -> Self {
        Mask(Rule::Fn(Arc::new(f)))
    }

    /// Intersection: allowed iff both masks allow.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// let m = Mask::causal().and(Mask::key_padding(2));
    /// assert!(m.allows(3, 1) && !m.allows(3, 2) && !m.allows(0, 1));
    /// ```
    pub fn and(self, other: Mask) -> Self {
        Mask(Rule::And(Box::new(self), Box::new(other)))
    }

    /// Union: allowed iff either mask allows.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// // A global first token (attention sink) plus a local window.
    /// let m = Mask::sliding_window(1).or(Mask::causal().and(Mask::key_padding(1)));
    /// assert!(m.allows(9, 0) && m.allows(9, 8) && !m.allows(9, 5));
    /// ```
    pub fn or(self, other: Mask) -> Self {
        Mask(Rule::Or(Box::new(self), Box::new(other)))
    }

    /// Complement: allowed iff `self` does not allow.
    ///
    /// (Named like [`std::ops::Not::not`], which `Mask` also implements as `!mask`.)
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// let strictly_future = Mask::causal().not();
    /// assert!(strictly_future.allows(0, 1) && !strictly_future.allows(1, 1));
    /// ```
    #[allow(clippy::should_implement_trait)]
    pub fn not(self) -> Self {
        Mask(Rule::Not(Box::new(self)))
    }

    /// May query `query` attend to key `key`? Evaluated as for a square shape (n = m);
    /// see [`Mask::allows_in`] for the bottom-right causal mask with n != m.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// assert!(Mask::causal().allows(2, 1));
    /// assert!(!Mask::causal().allows(1, 2));
    /// ```
    pub fn allows(&self, query: usize, key: usize) -> bool {
        self.eval(query, key, 0)
    }

    /// May query `query` attend to key `key` when there are `n` queries and `m` keys?
    ///
    /// Equal to [`Mask::allows`] for every mask but [`Mask::causal_bottom_right`] (alone
    /// or inside a combination), whose diagonal is shifted by `m − n`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// let m = Mask::causal_bottom_right();
    /// assert!(m.allows_in(1, 5, 0, 4)); // one query, five keys: it sees them all
    /// assert!(!Mask::causal().allows_in(1, 5, 0, 4));
    /// ```
    pub fn allows_in(&self, n: usize, m: usize, query: usize, key: usize) -> bool {
        self.eval(query, key, diff(m, n))
    }

    /// `offset` shifts the bottom-right causal diagonal (m − n).
    fn eval(&self, i: usize, j: usize, offset: isize) -> bool {
        match &self.0 {
            Rule::All => true,
            Rule::Causal { bottom_right } => diff(j, i) <= if *bottom_right { offset } else { 0 },
            Rule::PrefixLm(p) => j < *p || j <= i,
            Rule::SlidingWindow(w) => j <= i && i - j <= *w,
            Rule::KeyPadding(len) => j < *len,
            Rule::Documents(ids) => match (ids.get(i), ids.get(j)) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            },
            Rule::Fn(f) => f(i, j),
            Rule::And(a, b) => a.eval(i, j, offset) && b.eval(i, j, offset),
            Rule::Or(a, b) => a.eval(i, j, offset) || b.eval(i, j, offset),
            Rule::Not(a) => !a.eval(i, j, offset),
        }
    }

    /// Classifies the block of queries `rows` x keys `cols` of an n x m attention as
    /// [`Block::Empty`] (nothing allowed), [`Block::Full`] (everything allowed) or
    /// [`Block::Partial`].
    ///
    /// This is what lets a tiled kernel skip the masked-out half of a causal attention and
    /// evaluate the mask only on diagonal tiles. The answer is exact for the named masks
    /// and their combinations except that a combination may answer `Partial` for a block
    /// that is in fact empty or full (never the reverse); closures always give `Partial`.
    /// Empty ranges give `Empty`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Block, Mask};
    ///
    /// let c = Mask::causal();
    /// assert_eq!(c.classify(0..4, 4..8, 8, 8), Block::Empty);
    /// assert_eq!(c.classify(4..8, 0..4, 8, 8), Block::Full);
    /// assert_eq!(c.classify(0..4, 0..4, 8, 8), Block::Partial);
    /// ```
    pub fn classify(&self, rows: Range<usize>, cols: Range<usize>, n: usize, m: usize) -> Block {
        if rows.is_empty() || cols.is_empty() {
            return Block::Empty;
        }
        self.classify_nonempty(&rows, &cols, diff(m, n))
    }

    fn classify_nonempty(&self, rows: &Range<usize>, cols: &Range<usize>, offset: isize) -> Block {
        let (r0, r1) = (rows.start, rows.end - 1);
        let (c0, c1) = (cols.start, cols.end - 1);
        let decide = |full: bool, empty: bool| {
            if full {
                Block::Full
            } else if empty {
                Block::Empty
            } else {
                Block::Partial
            }
        };
        match &self.0 {
            Rule::All => Block::Full,
            Rule::Causal { bottom_right } => {
                let o = if *bottom_right { offset } else { 0 };
                decide(diff(c1, r0) <= o, diff(c0, r1) > o)
            }
            Rule::PrefixLm(p) => decide(c1 < *p || c1 <= r0, c0 >= *p && c0 > r1),
            Rule::SlidingWindow(w) => decide(
                c1 <= r0 && diff(r1, c0) <= *w as isize,
                c0 > r1 || diff(r0, c1) > *w as isize,
            ),
            Rule::KeyPadding(len) => decide(c1 < *len, c0 >= *len),
            Rule::Documents(ids) => {
                let span = |r: &Range<usize>| {
                    let inside = &ids[r.start.min(ids.len())..r.end.min(ids.len())];
                    let lo = inside.iter().min().copied();
                    let hi = inside.iter().max().copied();
                    (lo.zip(hi), r.end <= ids.len())
                };
                match (span(rows), span(cols)) {
                    ((Some((qa, qb)), q_all), (Some((ka, kb)), k_all)) => decide(
                        q_all && k_all && qa == qb && ka == kb && qa == ka,
                        qb < ka || kb < qa,
                    ),
                    // Every query or every key lies past the ids: no document.
                    _ => Block::Empty,
                }
            }
            Rule::Fn(_) => Block::Partial,
            Rule::And(a, b) => a
                .classify_nonempty(rows, cols, offset)
                .and(b.classify_nonempty(rows, cols, offset)),
            Rule::Or(a, b) => a
                .classify_nonempty(rows, cols, offset)
                .or(b.classify_nonempty(rows, cols, offset)),
            Rule::Not(a) => a.classify_nonempty(rows, cols, offset).not(),
        }
    }

    /// The keys of `cols` that query `i` of an n x m attention may attend to, if they form
    /// one contiguous run: `Some(a..b)` (possibly empty, `a == b`) means exactly the keys
    /// `a..b` are allowed; `None` means the rule cannot say cheaply (closures, documents, and
    /// unions or complements that split the run). Lets a kernel mask a partial tile a row at
    /// a time instead of one [`Mask::allows_in`] call per entry.
    pub(crate) fn row_run(
        &self,
        i: usize,
        cols: Range<usize>,
        n: usize,
        m: usize,
    ) -> Option<Range<usize>> {
        self.run_in(i, &cols, diff(m, n))
    }

    fn run_in(&self, i: usize, cols: &Range<usize>, offset: isize) -> Option<Range<usize>> {
        // The allowed keys j in lo..hi (signed, hi exclusive), clipped to `cols`.
        let clip = |lo: isize, hi: isize| {
            let (c0, c1) = (cols.start as isize, cols.end as isize);
            let a = lo.clamp(c0, c1);
            Some(a as usize..hi.clamp(a, c1) as usize)
        };
        let i_ = i as isize;
        match &self.0 {
            Rule::All => clip(0, isize::MAX),
            Rule::Causal { bottom_right } => {
                let o = if *bottom_right { offset } else { 0 };
                clip(0, i_ + o + 1)
            }
            Rule::PrefixLm(p) => clip(0, (*p as isize).max(i_ + 1)),
            Rule::SlidingWindow(w) => clip(i_ - *w as isize, i_ + 1),
            Rule::KeyPadding(len) => clip(0, *len as isize),
            Rule::Documents(_) | Rule::Fn(_) => None,
            Rule::And(a, b) => {
                let (ra, rb) = (a.run_in(i, cols, offset)?, b.run_in(i, cols, offset)?);
                let start = ra.start.max(rb.start);
                Some(start..ra.end.min(rb.end).max(start))
            }
            Rule::Or(a, b) => {
                let (ra, rb) = (a.run_in(i, cols, offset)?, b.run_in(i, cols, offset)?);
                if ra.is_empty() {
                    Some(rb)
                } else if rb.is_empty() {
                    Some(ra)
                } else if ra.start <= rb.end && rb.start <= ra.end {
                    Some(ra.start.min(rb.start)..ra.end.max(rb.end))
                } else {
                    None
                }
            }
            Rule::Not(a) => {
                let r = a.run_in(i, cols, offset)?;
                if r.is_empty() {
                    Some(cols.clone())
                } else if r.start == cols.start {
                    Some(r.end..cols.end)
                } else if r.end == cols.end {
                    Some(cols.start..r.start)
                } else {
                    None
                }
            }
        }
    }

    /// The mask as an n x m boolean matrix: entry (i, j) is [`Mask::allows_in`]`(n, m, i, j)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    /// use nalgebra::dmatrix;
    ///
    /// assert_eq!(Mask::causal().to_dense(2, 2), dmatrix![true, false; true, true]);
    /// ```
    pub fn to_dense(&self, n: usize, m: usize) -> DMatrix<bool> {
        DMatrix::from_fn(n, m, |i, j| self.allows_in(n, m, i, j))
    }

    /// The mask as an additive n x m bias: 0 where allowed, `-inf` where not. Adding it to
    /// the scores before the softmax is the same as masking.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    /// use nalgebra::dmatrix;
    ///
    /// let b = Mask::causal().to_bias::<f32>(2, 2);
    /// assert_eq!(b, dmatrix![0.0, f32::NEG_INFINITY; 0.0, 0.0]);
    /// ```
    pub fn to_bias<T: Float>(&self, n: usize, m: usize) -> DMatrix<T> {
        DMatrix::from_fn(n, m, |i, j| {
            if self.allows_in(n, m, i, j) {
                T::zero()
            } else {
                T::NEG_INFINITY
            }
        })
    }

    /// A printable n x m picture of the mask: `x` where a query (row) may attend to a key
    /// (column), `.` where it may not, one line per query.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// println!("{}", Mask::sliding_window(2).grid(6, 6));
    /// assert_eq!(Mask::none().grid(1, 3).to_string(), "x x x\n");
    /// ```
    pub fn grid(&self, n: usize, m: usize) -> MaskGrid<'_> {
        MaskGrid { mask: self, n, m }
    }
}

impl std::ops::Not for Mask {
    type Output = Mask;
    fn not(self) -> Mask {
        Mask::not(self)
    }
}

impl Default for Mask {
    /// [`Mask::none`].
    fn default() -> Self {
        Mask::none()
    }
}

impl fmt::Display for Mask {
    /// The rule as an expression, e.g. `documents(3) & causal`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Rule::All => f.write_str("none"),
            Rule::Causal { bottom_right } => f.write_str(if *bottom_right {
                "causal_bottom_right"
            } else {
                "causal"
            }),
            Rule::PrefixLm(p) => write!(f, "prefix_lm({p})"),
            Rule::SlidingWindow(w) => write!(f, "sliding_window({w})"),
            Rule::KeyPadding(len) => write!(f, "key_padding({len})"),
            Rule::Documents(ids) => write!(f, "documents({} positions)", ids.len()),
            Rule::Fn(_) => f.write_str("from_fn(..)"),
            Rule::And(a, b) => write!(f, "({a} & {b})"),
            Rule::Or(a, b) => write!(f, "({a} | {b})"),
            Rule::Not(a) => write!(f, "!{a}"),
        }
    }
}

impl fmt::Debug for Mask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mask({self})")
    }
}

/// A mask drawn for n queries and m keys; made by [`Mask::grid`] (see there for an example),
/// printed with `Display`.
#[derive(Clone, Copy, Debug)]
pub struct MaskGrid<'a> {
    mask: &'a Mask,
    n: usize,
    m: usize,
}

impl fmt::Display for MaskGrid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for i in 0..self.n {
            for j in 0..self.m {
                let c = if self.mask.allows_in(self.n, self.m, i, j) {
                    'x'
                } else {
                    '.'
                };
                if j > 0 {
                    f.write_str(" ")?;
                }
                write!(f, "{c}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask's value at every pair of the block, row by row.
    fn block_values(
        mask: &Mask,
        rows: Range<usize>,
        cols: Range<usize>,
        n: usize,
        m: usize,
    ) -> Vec<bool> {
        rows.flat_map(|i| cols.clone().map(move |j| (i, j)))
            .map(|(i, j)| mask.allows_in(n, m, i, j))
            .collect()
    }

    fn all_masks() -> Vec<Mask> {
        vec![
            Mask::none(),
            Mask::causal(),
            Mask::causal_bottom_right(),
            Mask::prefix_lm(3),
            Mask::sliding_window(2),
            Mask::key_padding(5),
            Mask::documents(vec![0, 0, 0, 1, 1, 2, 2, 2, 2]),
            Mask::documents(vec![1, 0, 1]),
            Mask::from_fn(|i, j| (i + j) % 3 == 0),
            Mask::causal().and(Mask::sliding_window(1)).not(),
            Mask::prefix_lm(2).or(Mask::key_padding(7)),
        ]
    }

    /// `classify` must never claim Empty or Full wrongly, on every block of several shapes.
    #[test]
    fn classify_agrees_with_allows_on_every_block() {
        for mask in all_masks() {
            for (n, m) in [(9, 9), (5, 11), (11, 4)] {
                for r0 in 0..n {
                    for r1 in r0 + 1..=n {
                        for c0 in 0..m {
                            for c1 in c0 + 1..=m {
                                let vals = block_values(&mask, r0..r1, c0..c1, n, m);
                                match mask.classify(r0..r1, c0..c1, n, m) {
                                    Block::Empty => assert!(vals.iter().all(|v| !v), "{mask}"),
                                    Block::Full => assert!(vals.iter().all(|v| *v), "{mask}"),
                                    Block::Partial => {}
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The named masks classify exactly: Partial only when the block really is mixed.
    #[test]
    fn named_masks_classify_exactly() {
        let named = [
            Mask::none(),
            Mask::causal(),
            Mask::causal_bottom_right(),
            Mask::prefix_lm(3),
            Mask::sliding_window(2),
            Mask::key_padding(5),
        ];
        for mask in named {
            let (n, m) = (7, 9);
            for r0 in 0..n {
                for c0 in 0..m {
                    let (r1, c1) = ((r0 + 3).min(n), (c0 + 4).min(m));
                    let vals = block_values(&mask, r0..r1, c0..c1, n, m);
                    let exact = if vals.iter().all(|v| *v) {
                        Block::Full
                    } else if vals.iter().all(|v| !v) {
                        Block::Empty
                    } else {
                        Block::Partial
                    };
                    assert_eq!(mask.classify(r0..r1, c0..c1, n, m), exact, "{mask}");
                }
            }
        }
    }

    /// `row_run`, where it answers, lists exactly the allowed keys; named masks always answer.
    #[test]
    fn row_runs_agree_with_allows() {
        let mut masks = all_masks();
        masks.push(Mask::sliding_window(2).or(Mask::key_padding(1)));
        masks.push(Mask::causal().not().or(Mask::prefix_lm(2)));
        for (k, mask) in masks.iter().enumerate() {
            for (n, m) in [(9, 9), (5, 11), (11, 4)] {
                for i in 0..n {
                    for c0 in 0..m {
                        for c1 in c0..=m {
                            let Some(run) = mask.row_run(i, c0..c1, n, m) else {
                                assert!(k >= 6, "{mask} should give a run");
                                continue;
                            };
                            assert!(c0 <= run.start && run.start <= run.end && run.end <= c1);
                            for j in c0..c1 {
                                assert_eq!(
                                    run.contains(&j),
                                    mask.allows_in(n, m, i, j),
                                    "{mask} i={i} j={j}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn display_describes_the_rule() {
        let m = Mask::documents(vec![0, 1]).and(!Mask::causal());
        assert_eq!(m.to_string(), "(documents(2 positions) & !causal)");
        assert_eq!(format!("{:?}", Mask::none()), "Mask(none)");
    }

    #[test]
    fn bottom_right_when_more_queries_than_keys() {
        let m = Mask::causal_bottom_right();
        assert_eq!(m.grid(3, 2).to_string(), ". .\nx .\nx x\n");
    }
}
