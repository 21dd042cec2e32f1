//! Attention masks.
//!
//! The math and the design are in `src/guide/masks.md`, rendered as
//! [`crate::guide::masks`].
//!
//! # Representation
//!
//! A mask is stored flattened, as a postfix program over its leaves (the named rules,
//! document ids and closures) and the combinators `and`, `or` and `not`. Every evaluation
//! ([`Mask::allows_in`], [`Mask::classify`], [`Mask::row_run`]), `Display`, `Clone` and
//! `Drop` is one loop over that program with an explicit value stack, never a recursion, so a
//! mask of any depth (say 100,000 chained `and`s) works on a thread with a small stack, such as
//! a rayon worker. Position arithmetic is done in `u128`, where `i + m`, `j + n` and `j + w`
//! cannot overflow for any `usize` inputs.

use crate::Float;
use crate::error::{Result, try_matrix};
use crate::prelude::*;
use alloc::sync::Arc;
use core::fmt;
use core::ops::Range;
use nalgebra::DMatrix;

/// A rule deciding which keys each query may attend to; see the [guide](crate::guide::masks) for the
/// rules and each constructor for an example.
///
/// Cloning is cheap: the rule is shared, not copied. Masks of any depth are safe: every
/// evaluation is iterative (see the module's source for the representation).
#[derive(Clone)]
pub struct Mask(Arc<Program>);

/// A mask as a postfix program: leaves push a value, `And` / `Or` pop two and push one,
/// `Not` replaces the top. `height` is the most values on the stack at once.
#[derive(Clone)]
struct Program {
    ops: Vec<Op>,
    height: usize,
}

#[derive(Clone)]
enum Op {
    Leaf(Leaf),
    /// `swapped`: the operands were stored in the opposite order of the call
    /// (`a.and(b)` stored as `b a And`), which only `Display` needs to know since the
    /// operation is commutative.
    And {
        swapped: bool,
    },
    Or {
        swapped: bool,
    },
    Not,
}

#[derive(Clone)]
enum Leaf {
    All,
    /// `j <= i` (top-left) or `j + n <= i + m` (bottom-right).
    Causal {
        bottom_right: bool,
    },
    PrefixLm(usize),
    SlidingWindow(usize),
    KeyPadding(usize),
    Documents(Arc<[usize]>),
    Fn(Arc<dyn Fn(usize, usize) -> bool + Send + Sync>),
    /// The inner rule in absolute positions when the n queries are the last n of the m
    /// positions: query `i` is position `p = i + m − n` (it sees nothing if `p < 0`).
    BottomRight(Arc<Leaf>),
}

/// The absolute position `i + m − n` of query `i` when the queries are the last n of m
/// positions, or `None` if it is negative (saturated at `usize::MAX`, never wrapped).
fn end_aligned(n: usize, m: usize, i: usize) -> Option<usize> {
    let p = (wide(i) + wide(m)).checked_sub(wide(n))?;
    Some(p.min(wide(usize::MAX)) as usize)
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

/// Widens a position for arithmetic that cannot overflow (`u128` holds any sum of two `usize`).
fn wide(x: usize) -> u128 {
    x as u128
}

/// A run of keys `start..end`, as a `Copy` pair for the evaluation stack.
type Run = Option<(usize, usize)>;

impl Leaf {
    /// May query `i` attend to key `j` in an n x m attention?
    fn allows(&self, n: usize, m: usize, i: usize, j: usize) -> bool {
        match self {
            Leaf::All => true,
            Leaf::Causal {
                bottom_right: false,
            } => j <= i,
            Leaf::Causal { bottom_right: true } => wide(j) + wide(n) <= wide(i) + wide(m),
            Leaf::PrefixLm(p) => j < *p || j <= i,
            // `i - j` cannot underflow once `j <= i`.
            Leaf::SlidingWindow(w) => j <= i && i - j <= *w,
            Leaf::KeyPadding(len) => j < *len,
            Leaf::Documents(ids) => match (ids.get(i), ids.get(j)) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            },
            Leaf::Fn(f) => f(i, j),
            Leaf::BottomRight(inner) => {
                end_aligned(n, m, i).is_some_and(|p| inner.allows(n, m, p, j))
            }
        }
    }

    /// The class of the non-empty block of queries `r0 ..= r1` x keys `c0 ..= c1`.
    fn classify(
        &self,
        n: usize,
        m: usize,
        (r0, r1): (usize, usize),
        (c0, c1): (usize, usize),
    ) -> Block {
        let decide = |full: bool, empty: bool| {
            if full {
                Block::Full
            } else if empty {
                Block::Empty
            } else {
                Block::Partial
            }
        };
        match self {
            Leaf::All => Block::Full,
            Leaf::Causal {
                bottom_right: false,
            } => decide(c1 <= r0, c0 > r1),
            Leaf::Causal { bottom_right: true } => decide(
                wide(c1) + wide(n) <= wide(r0) + wide(m),
                wide(c0) + wide(n) > wide(r1) + wide(m),
            ),
            Leaf::PrefixLm(p) => decide(c1 < *p || c1 <= r0, c0 >= *p && c0 > r1),
            Leaf::SlidingWindow(w) => decide(
                c1 <= r0 && wide(r1) <= wide(c0) + wide(*w),
                c0 > r1 || wide(r0) > wide(c1) + wide(*w),
            ),
            Leaf::KeyPadding(len) => decide(c1 < *len, c0 >= *len),
            Leaf::Documents(ids) => {
                // The documents of positions a ..= b, and whether all of them have one.
                let span = |a: usize, b: usize| {
                    let inside = &ids[a.min(ids.len())..b.saturating_add(1).min(ids.len())];
                    let lo = inside.iter().min().copied();
                    let hi = inside.iter().max().copied();
                    (lo.zip(hi), b < ids.len())
                };
                match (span(r0, r1), span(c0, c1)) {
                    ((Some((qa, qb)), q_all), (Some((ka, kb)), k_all)) => decide(
                        q_all && k_all && qa == qb && ka == kb && qa == ka,
                        qb < ka || kb < qa,
                    ),
                    // Every query or every key lies past the ids: no document.
                    _ => Block::Empty,
                }
            }
            Leaf::Fn(_) => Block::Partial,
            Leaf::BottomRight(inner) => match (end_aligned(n, m, r0), end_aligned(n, m, r1)) {
                (_, None) => Block::Empty,
                (Some(p0), Some(p1)) => inner.classify(n, m, (p0, p1), (c0, c1)),
                // The first rows see nothing: at best the block is partly allowed.
                (None, Some(p1)) => match inner.classify(n, m, (0, p1), (c0, c1)) {
                    Block::Empty => Block::Empty,
                    _ => Block::Partial,
                },
            },
        }
    }

    /// The allowed keys of query `i` within `c0..c1`, if they form one run.
    fn run(&self, n: usize, m: usize, i: usize, (c0, c1): (usize, usize)) -> Run {
        // The allowed keys are lo..hi (hi exclusive), clipped to c0..c1.
        let clip = |lo: u128, hi: u128| {
            let a = lo.clamp(wide(c0), wide(c1));
            let b = hi.clamp(a, wide(c1));
            // Both lie in c0..=c1, so they fit in usize.
            Some((a as usize, b as usize))
        };
        match self {
            Leaf::All => clip(0, u128::MAX),
            Leaf::Causal {
                bottom_right: false,
            } => clip(0, wide(i) + 1),
            // j <= i + m − n  <=>  j < i + m + 1 − n.
            Leaf::Causal { bottom_right: true } => {
                clip(0, (wide(i) + wide(m) + 1).saturating_sub(wide(n)))
            }
            Leaf::PrefixLm(p) => clip(0, wide(*p).max(wide(i) + 1)),
            Leaf::SlidingWindow(w) => clip(wide(i.saturating_sub(*w)), wide(i) + 1),
            Leaf::KeyPadding(len) => clip(0, wide(*len)),
            Leaf::Documents(_) | Leaf::Fn(_) => None,
            Leaf::BottomRight(inner) => match end_aligned(n, m, i) {
                None => Some((c0, c0)),
                Some(p) => inner.run(n, m, p, (c0, c1)),
            },
        }
    }

    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leaf::All => f.write_str("none"),
            Leaf::Causal { bottom_right } => f.write_str(if *bottom_right {
                "causal_bottom_right"
            } else {
                "causal"
            }),
            Leaf::PrefixLm(p) => write!(f, "prefix_lm({p})"),
            Leaf::SlidingWindow(w) => write!(f, "sliding_window({w})"),
            Leaf::KeyPadding(len) => write!(f, "key_padding({len})"),
            Leaf::Documents(ids) => write!(f, "documents({} positions)", ids.len()),
            Leaf::Fn(_) => f.write_str("from_fn(..)"),
            Leaf::BottomRight(inner) => {
                inner.fmt(f)?;
                f.write_str(".bottom_right()")
            }
        }
    }
}

/// Stack slots kept inline by [`Mask::fold`]; deeper programs use a heap buffer.
const INLINE_STACK: usize = 16;

impl Mask {
    fn leaf(leaf: Leaf) -> Self {
        Mask(Arc::new(Program {
            ops: vec![Op::Leaf(leaf)],
            height: 1,
        }))
    }

    /// `self op other` as one program. The longer operand's program is extended in place
    /// when this mask holds its only reference, so chaining n combinators costs O(n) in
    /// total, whichever side the chain grows on.
    fn combine(self, other: Mask, op: fn(bool) -> Op) -> Self {
        let swapped = other.0.ops.len() > self.0.ops.len();
        let (first, second) = if swapped {
            (other, self)
        } else {
            (self, other)
        };
        let mut program = Arc::unwrap_or_clone(first.0);
        program.height = program.height.max(second.0.height + 1);
        program.ops.extend_from_slice(&second.0.ops);
        program.ops.push(op(swapped));
        Mask(Arc::new(program))
    }

    /// Evaluates the program bottom-up with an explicit stack: `leaf` gives each leaf's
    /// value, the other functions combine them. `init` only fills unused stack slots.
    fn fold<V: Copy>(
        &self,
        init: V,
        leaf: impl Fn(&Leaf) -> V,
        and: impl Fn(V, V) -> V,
        or: impl Fn(V, V) -> V,
        not: impl Fn(V) -> V,
    ) -> V {
        let Program { ops, height } = &*self.0;
        if let [Op::Leaf(l)] = ops.as_slice() {
            return leaf(l);
        }
        let mut inline = [init; INLINE_STACK];
        let mut heap = Vec::new();
        let stack: &mut [V] = if *height <= INLINE_STACK {
            &mut inline
        } else {
            heap.resize(*height, init);
            &mut heap
        };
        // A well-formed postfix program (the only kind `Mask` builds) never under- or
        // overflows this stack: `height` was computed along with `ops`.
        let mut top = 0;
        for op in ops {
            match op {
                Op::Leaf(l) => {
                    stack[top] = leaf(l);
                    top += 1;
                }
                Op::And { .. } => {
                    top -= 1;
                    stack[top - 1] = and(stack[top - 1], stack[top]);
                }
                Op::Or { .. } => {
                    top -= 1;
                    stack[top - 1] = or(stack[top - 1], stack[top]);
                }
                Op::Not => stack[top - 1] = not(stack[top - 1]),
            }
        }
        stack[0]
    }

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
        Mask::leaf(Leaf::All)
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
        Mask::leaf(Leaf::Causal {
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
        Mask::leaf(Leaf::Causal { bottom_right: true })
    }

    /// This mask aligned to the end: when n queries meet m keys, the queries are the last n of
    /// the m positions (a decode step, or a chunk of new tokens against a KV cache), so query
    /// `i` is evaluated at its absolute position `p = i + m − n`; a query with `p < 0` (more
    /// queries than keys) sees nothing, whatever the rules. Keys keep their positions `0 .. m`.
    ///
    /// Every rule of the mask is shifted this way except those that do not depend on the
    /// query ([`Mask::none`], [`Mask::key_padding`]) and [`Mask::causal_bottom_right`], which
    /// is already aligned: so `Mask::causal().bottom_right()` is
    /// `Mask::causal_bottom_right()`, and applying it twice changes nothing. With n = m it
    /// changes nothing at all. Tiles are still classified exactly for the named masks, so a
    /// kernel skips the same blocks.
    ///
    /// Top-left alignment (the default, PyTorch's and JAX's) is right for a whole sequence;
    /// in a decode step it silently attends to the wrong keys.
    /// [`KvCache::attention`](crate::KvCache::attention) applies this alignment itself.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// // Two new tokens against six positions: they are positions 4 and 5.
    /// let w = Mask::sliding_window(2).bottom_right();
    /// assert_eq!(w.grid(2, 6).to_string(), ". . x x x .\n. . . x x x\n");
    /// let p = Mask::prefix_lm(3).bottom_right();
    /// assert_eq!(p.grid(2, 6).to_string(), "x x x x x .\nx x x x x x\n");
    /// assert_eq!(
    ///     Mask::causal().bottom_right().grid(2, 6).to_string(),
    ///     Mask::causal_bottom_right().grid(2, 6).to_string()
    /// );
    /// ```
    pub fn bottom_right(self) -> Self {
        let Program { ops, height } = Arc::unwrap_or_clone(self.0);
        let ops = ops
            .into_iter()
            .map(|op| match op {
                Op::Leaf(
                    leaf @ (Leaf::All
                    | Leaf::KeyPadding(_)
                    | Leaf::Causal { bottom_right: true }
                    | Leaf::BottomRight(_)),
                ) => Op::Leaf(leaf),
                Op::Leaf(Leaf::Causal {
                    bottom_right: false,
                }) => Op::Leaf(Leaf::Causal { bottom_right: true }),
                Op::Leaf(leaf) => Op::Leaf(Leaf::BottomRight(Arc::new(leaf))),
                other => other,
            })
            .collect::<Vec<_>>();
        // A query before position 0 sees nothing, whatever the rules say (a complement or a
        // key-only rule would otherwise let it see keys): `and` the guard "p >= 0", itself
        // the bottom-right form of `none`. Aligning again adds nothing.
        let guarded = matches!(
            ops.as_slice(),
            [.., Op::Leaf(Leaf::BottomRight(g)), Op::And { .. }] if matches!(**g, Leaf::All)
        );
        // (A single shifted rule already sees nothing there.)
        let single_shifted = matches!(
            ops.as_slice(),
            [Op::Leaf(
                Leaf::BottomRight(_) | Leaf::Causal { bottom_right: true }
            )]
        );
        let mut program = Program { ops, height };
        if !guarded && !single_shifted {
            program
                .ops
                .push(Op::Leaf(Leaf::BottomRight(Arc::new(Leaf::All))));
            program.ops.push(Op::And { swapped: false });
            program.height = program.height.max(2);
        }
        Mask(Arc::new(program))
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
        Mask::leaf(Leaf::PrefixLm(prefix_len))
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
        Mask::leaf(Leaf::SlidingWindow(w))
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
        Mask::leaf(Leaf::KeyPadding(valid_len))
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
        Mask::leaf(Leaf::Documents(ids.into().into()))
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
        Mask::leaf(Leaf::Fn(Arc::new(f)))
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
        self.combine(other, |swapped| Op::And { swapped })
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
        self.combine(other, |swapped| Op::Or { swapped })
    }

    /// Complement: allowed iff `self` does not allow.
    ///
    /// (Named like [`core::ops::Not::not`], which `Mask` also implements as `!mask`.)
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
        let mut program = Arc::unwrap_or_clone(self.0);
        program.ops.push(Op::Not);
        Mask(Arc::new(program))
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
        self.allows_in(0, 0, query, key)
    }

    /// May query `query` attend to key `key` when there are `n` queries and `m` keys?
    ///
    /// Equal to [`Mask::allows`] for every mask but [`Mask::causal_bottom_right`] (alone
    /// or inside a combination), whose diagonal is shifted by `m − n`. Any `usize` values
    /// are valid (no arithmetic can overflow); positions past `n` or `m` follow the same rules.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::Mask;
    ///
    /// let m = Mask::causal_bottom_right();
    /// assert!(m.allows_in(1, 5, 0, 4)); // one query, five keys: it sees them all
    /// assert!(!Mask::causal().allows_in(1, 5, 0, 4));
    /// // More queries than keys, at the largest sizes: the first n − m queries see nothing.
    /// assert!(!m.allows_in(usize::MAX, 1, 0, 0));
    /// assert!(m.allows_in(usize::MAX, 1, usize::MAX - 1, 0));
    /// ```
    pub fn allows_in(&self, n: usize, m: usize, query: usize, key: usize) -> bool {
        self.fold(
            false,
            |leaf| leaf.allows(n, m, query, key),
            |a, b| a && b,
            |a, b| a || b,
            |a| !a,
        )
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
        let (r, c) = ((rows.start, rows.end - 1), (cols.start, cols.end - 1));
        self.fold(
            Block::Empty,
            |leaf| leaf.classify(n, m, r, c),
            Block::and,
            Block::or,
            Block::not,
        )
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
        let (c0, c1) = (cols.start, cols.end.max(cols.start));
        let run = self.fold(
            None,
            |leaf| leaf.run(n, m, i, (c0, c1)),
            |a: Run, b: Run| {
                let ((a0, a1), (b0, b1)) = (a?, b?);
                let start = a0.max(b0);
                Some((start, a1.min(b1).max(start)))
            },
            |a: Run, b: Run| {
                let ((a0, a1), (b0, b1)) = (a?, b?);
                if a0 == a1 {
                    Some((b0, b1))
                } else if b0 == b1 {
                    Some((a0, a1))
                } else if a0 <= b1 && b0 <= a1 {
                    Some((a0.min(b0), a1.max(b1)))
                } else {
                    None
                }
            },
            |a: Run| {
                let (a0, a1) = a?;
                if a0 == a1 {
                    Some((c0, c1))
                } else if a0 == c0 {
                    Some((a1, c1))
                } else if a1 == c1 {
                    Some((c0, a0))
                } else {
                    None
                }
            },
        )?;
        Some(run.0..run.1)
    }

    /// The mask as an n x m boolean matrix: entry (i, j) is [`Mask::allows_in`]`(n, m, i, j)`.
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`](crate::Error::TooLarge) if n x m entries cannot be allocated
    /// (the count overflows `usize`, exceeds `isize::MAX` bytes, or the allocator refuses it).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Error, Mask};
    /// use nalgebra::dmatrix;
    ///
    /// assert_eq!(Mask::causal().to_dense(2, 2)?, dmatrix![true, false; true, true]);
    /// // 2^32 x 2^32 entries would wrap to 0 in usize arithmetic: an error, not a wrap.
    /// assert!(matches!(Mask::causal().to_dense(1 << 32, 1 << 32), Err(Error::TooLarge { .. })));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn to_dense(&self, n: usize, m: usize) -> Result<DMatrix<bool>> {
        try_matrix("the n x m dense mask", n, m, |i, j| {
            self.allows_in(n, m, i, j)
        })
    }

    /// The mask as an additive n x m bias: 0 where allowed, `-inf` where not. Adding it to
    /// the scores before the softmax is the same as masking.
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`](crate::Error::TooLarge) if n x m entries of `T` cannot be
    /// allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Error, Mask};
    /// use nalgebra::dmatrix;
    ///
    /// let b = Mask::causal().to_bias::<f32>(2, 2)?;
    /// assert_eq!(b, dmatrix![0.0, f32::NEG_INFINITY; 0.0, 0.0]);
    /// assert!(matches!(Mask::causal().to_bias::<f32>(1 << 33, 1 << 31), Err(Error::TooLarge { .. })));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn to_bias<T: Float>(&self, n: usize, m: usize) -> Result<DMatrix<T>> {
        try_matrix("the n x m mask bias", n, m, |i, j| {
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

impl core::ops::Not for Mask {
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
    /// The rule as an expression, e.g. `(documents(3 positions) & causal)`. Printed
    /// iteratively, in time linear in the size of the mask, whatever its depth.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops = &self.0.ops;
        // start[k]: the index of the first op of the subexpression that ends at op k.
        let mut start = Vec::with_capacity(ops.len());
        for (k, op) in ops.iter().enumerate() {
            let s = match op {
                Op::Leaf(_) => k,
                Op::Not => start[k - 1],
                Op::And { .. } | Op::Or { .. } => start[start[k - 1] - 1],
            };
            start.push(s);
        }
        enum Task {
            Expr(usize),
            Text(&'static str),
        }
        let mut tasks = vec![Task::Expr(ops.len() - 1)];
        while let Some(task) = tasks.pop() {
            let k = match task {
                Task::Text(t) => {
                    f.write_str(t)?;
                    continue;
                }
                Task::Expr(k) => k,
            };
            let (symbol, swapped) = match &ops[k] {
                Op::Leaf(leaf) => {
                    leaf.fmt(f)?;
                    continue;
                }
                Op::Not => {
                    f.write_str("!")?;
                    tasks.push(Task::Expr(k - 1));
                    continue;
                }
                Op::And { swapped } => (" & ", *swapped),
                Op::Or { swapped } => (" | ", *swapped),
            };
            // Stored operands: left ends just before the right one starts.
            let (left, right) = (start[k - 1] - 1, k - 1);
            let (a, b) = if swapped {
                (right, left)
            } else {
                (left, right)
            };
            f.write_str("(")?;
            tasks.extend([
                Task::Text(")"),
                Task::Expr(b),
                Task::Text(symbol),
                Task::Expr(a),
            ]);
        }
        Ok(())
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
            Mask::sliding_window(2).bottom_right(),
            Mask::prefix_lm(3).bottom_right(),
            Mask::documents(vec![0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]).bottom_right(),
            Mask::from_fn(|i, j| (i * 2 + j) % 3 != 0).bottom_right(),
            Mask::sliding_window(3)
                .and(Mask::key_padding(8))
                .not()
                .bottom_right(),
        ]
    }

    /// A bottom-right mask is the mask at the queries' absolute positions `i + m − n`, and
    /// nothing where that is negative; aligning twice, or aligning causal, changes nothing
    /// more.
    #[test]
    fn bottom_right_is_the_mask_at_absolute_positions() {
        let inner = [
            Mask::sliding_window(2),
            Mask::prefix_lm(3),
            Mask::documents(vec![0, 0, 1, 1, 1, 2, 2, 2, 2, 3]),
            Mask::from_fn(|i, j| (i + 2 * j) % 5 != 1),
            Mask::causal().or(Mask::key_padding(2)),
            Mask::key_padding(3),
            Mask::none(),
        ];
        for mask in &inner {
            let br = mask.clone().bottom_right();
            let twice = br.clone().bottom_right();
            for (n, m) in [(1usize, 9usize), (3, 9), (9, 9), (9, 4)] {
                for i in 0..n {
                    for j in 0..m {
                        let want = (i + m)
                            .checked_sub(n)
                            .is_some_and(|p| mask.allows_in(m, m, p, j));
                        assert_eq!(br.allows_in(n, m, i, j), want, "{br} {n}x{m} ({i}, {j})");
                        assert_eq!(twice.allows_in(n, m, i, j), want);
                    }
                }
            }
        }
        let c = Mask::causal().bottom_right();
        assert_eq!(c.to_string(), Mask::causal_bottom_right().to_string());
        assert_eq!(
            Mask::sliding_window(4).bottom_right().to_string(),
            "sliding_window(4).bottom_right()"
        );
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

    /// Chains far deeper than any thread's stack allows a recursion over: evaluation,
    /// classification, runs, display, clone and drop all stay iterative.
    #[test]
    fn deep_chains_do_not_recurse() {
        let depth = 20_000;
        let mut and_chain = Mask::none();
        let mut or_chain = Mask::key_padding(0);
        let mut not_chain = Mask::causal();
        let mut right_chain = Mask::none();
        for _ in 0..depth {
            and_chain = and_chain.and(Mask::causal());
            or_chain = or_chain.or(Mask::key_padding(3));
            not_chain = not_chain.not();
            right_chain = Mask::sliding_window(2).and(right_chain);
        }
        // Run everything on a thread with a deliberately small stack.
        std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                for i in 0..6 {
                    for j in 0..6 {
                        assert_eq!(and_chain.allows(i, j), j <= i);
                        assert_eq!(or_chain.allows(i, j), j < 3);
                        assert_eq!(not_chain.allows(i, j), j <= i); // an even number of nots
                        assert_eq!(right_chain.allows(i, j), j <= i && i - j <= 2);
                    }
                }
                assert_eq!(and_chain.classify(4..8, 0..4, 8, 8), Block::Full);
                assert_eq!(and_chain.classify(0..4, 4..8, 8, 8), Block::Empty);
                assert_eq!(or_chain.classify(0..8, 0..3, 8, 8), Block::Full);
                assert_eq!(and_chain.row_run(5, 0..8, 8, 8), Some(0..6));
                assert_eq!(right_chain.row_run(5, 0..8, 8, 8), Some(3..6));
                assert_eq!(not_chain.row_run(2, 0..8, 8, 8), Some(0..3));
                let text = and_chain.to_string();
                assert!(text.starts_with("((((") && text.ends_with("causal) & causal)"));
                assert_eq!(text.matches("causal").count(), depth);
                let copy = right_chain.clone();
                drop(right_chain);
                assert!(copy.allows(2, 0));
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// Window, padding and prefix parameters at the ends of `usize` never wrap.
    #[test]
    fn huge_parameters_do_not_wrap() {
        let causal = Mask::causal();
        let big = [usize::MAX, usize::MAX - 1, usize::MAX / 2, 1 << 63];
        for w in big {
            let window = Mask::sliding_window(w);
            let padded = Mask::key_padding(w).and(Mask::causal());
            let prefix = Mask::prefix_lm(w);
            for (n, m) in [(9, 9), (5, 11), (11, 4)] {
                for i in 0..n {
                    for j in 0..m {
                        assert_eq!(window.allows_in(n, m, i, j), j <= i, "w = {w}");
                        assert_eq!(padded.allows_in(n, m, i, j), j <= i, "w = {w}");
                        assert!(prefix.allows_in(n, m, i, j));
                    }
                    for c0 in 0..m {
                        for c1 in c0..=m {
                            let want = causal.row_run(i, c0..c1, n, m);
                            assert_eq!(window.row_run(i, c0..c1, n, m), want, "w = {w}");
                            assert_eq!(padded.row_run(i, c0..c1, n, m), want, "w = {w}");
                        }
                    }
                }
                for r0 in 0..n {
                    for c0 in 0..m {
                        let (rows, cols) = (r0..(r0 + 3).min(n), c0..(c0 + 4).min(m));
                        let want = causal.classify(rows.clone(), cols.clone(), n, m);
                        assert_eq!(window.classify(rows.clone(), cols.clone(), n, m), want);
                        assert_eq!(padded.classify(rows.clone(), cols.clone(), n, m), want);
                        assert_eq!(prefix.classify(rows, cols, n, m), Block::Full);
                    }
                }
            }
            // Positions near the top of usize.
            let top = usize::MAX;
            assert!(window.allows(top, 0) == (top <= w));
            assert!(window.allows(top, top) && !window.allows(top - 1, top));
            assert_eq!(
                window.row_run(top, top - 3..top, top, top),
                Some(top - 3..top)
            );
        }
    }

    /// Bottom-right alignment at extreme shapes: `j <= i + m − n` evaluated without overflow,
    /// including n > m and n, m at usize::MAX.
    #[test]
    fn bottom_right_at_extreme_shapes() {
        let br = Mask::causal_bottom_right();
        let top = usize::MAX;
        // n > m: the first n − m queries see nothing.
        assert!(!br.allows_in(top, 1, top - 2, 0));
        assert!(br.allows_in(top, 1, top - 1, 0));
        assert_eq!(br.classify(0..top - 1, 0..1, top, 1), Block::Empty);
        assert_eq!(br.classify(top - 1..top, 0..1, top, 1), Block::Full);
        assert_eq!(br.row_run(0, 0..1, top, 1), Some(0..0));
        assert_eq!(br.row_run(top - 1, 0..1, top, 1), Some(0..1));
        // m > n: one query against usize::MAX keys sees them all.
        assert!(br.allows_in(1, top, 0, top - 1));
        assert_eq!(br.classify(0..1, 0..top, 1, top), Block::Full);
        assert_eq!(br.row_run(0, 5..top, 1, top), Some(5..top));
        // n = m = usize::MAX is the square case.
        assert!(br.allows_in(top, top, 3, 3) && !br.allows_in(top, top, 3, 4));
        assert_eq!(br.classify(0..4, 4..8, top, top), Block::Empty);
        // Reversed and empty column ranges give empty runs, never a panic.
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 5..2;
        assert_eq!(br.row_run(3, reversed, 8, 8).map(|r| r.len()), Some(0));
        assert_eq!(Mask::causal().classify(0..0, 0..4, 4, 4), Block::Empty);
    }

    #[test]
    fn dense_and_bias_sizes_are_checked() {
        use crate::Error;
        let c = Mask::causal();
        assert_eq!(
            c.to_dense(1 << 32, 1 << 32).unwrap_err(),
            Error::TooLarge {
                what: "the n x m dense mask",
                shape: (1 << 32, 1 << 32)
            }
        );
        assert!(matches!(
            c.to_bias::<f32>(1 << 33, 1 << 31),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            c.to_bias::<f64>(usize::MAX, 2),
            Err(Error::TooLarge { .. })
        ));
        assert_eq!(c.to_dense(usize::MAX, 0).unwrap().shape(), (usize::MAX, 0));
        assert_eq!(
            c.to_bias::<f64>(2, 3).unwrap(),
            nalgebra::dmatrix![0.0, f64::NEG_INFINITY, f64::NEG_INFINITY; 0.0, 0.0, f64::NEG_INFINITY]
        );
    }

    #[test]
    fn bottom_right_when_more_queries_than_keys() {
        let m = Mask::causal_bottom_right();
        assert_eq!(m.grid(3, 2).to_string(), ". .\nx .\nx x\n");
    }
}
