//! The KV cache: the keys and values of the positions seen so far, stored so that the
//! attention functions read them in place.
//!
//! The module is private; everything is documented on [`KvCache`].

use crate::Float;
use crate::error::{Axis, Error, Result, check_finite};
use crate::mask::Mask;
use crate::multihead::{Heads, multi_head};
use crate::prelude::*;
use crate::spec::{AttentionOptions, Inputs};
use core::fmt;
use core::marker::PhantomData;
use core::ops::Range;
use nalgebra::{DMatrix, DMatrixView, Dyn, U1};

#[cfg(doc)]
use crate::{Rope, multi_head_attention, scaled_attention};

/// Rows a growing cache allocates at least, so that token-by-token appends do not reallocate
/// at 1, 2, 4, 8 rows.
const MIN_ROWS: usize = 16;

/// The keys and values of G key-value heads for the positions seen so far, with spare rows to
/// append into and an optional sliding window.
///
/// # Shapes and positions
///
/// Keys are d wide and values d_v wide per head. An append takes n rows (tokens) of keys,
/// n x (G·d), and values, n x (G·d_v), the heads side by side in the columns as
/// [`multi_head_attention`] takes them. The cache holds [`len`](KvCache::len) rows: the
/// consecutive absolute positions [`start_position`](KvCache::start_position) ..
/// [`end_position`](KvCache::end_position). Without a window the start is 0 and the end is
/// the number of positions appended so far; with a window the start advances as old
/// positions are evicted, so a row's absolute position is always `start_position() + row`.
///
/// # Storage
///
/// Keys and values are each one column-major buffer of `capacity x (G·d)` (resp. G·d_v)
/// entries with column stride `capacity`: the cached rows of a column are contiguous and
/// followed by spare rows. So [`keys(g)`](KvCache::keys) (len x d) and
/// [`all_keys`](KvCache::all_keys) (len x G·d) are zero-copy [`DMatrixView`]s with column
/// stride `capacity`, which [`scaled_attention`] and [`multi_head_attention`] take directly.
/// When the spare rows run out the capacity doubles (at least 16 rows) and the cached rows
/// are copied once, so n appends cost O(n) copies in total, never a copy of the whole cache
/// per append. Every size is checked: a capacity whose buffer would overflow `usize` or
/// exceed `isize::MAX` bytes, or that the allocator refuses, is an [`Error::TooLarge`].
///
/// # Half-precision storage
///
/// `KvCache<f32>` (the same as `KvCache<f32, f32>`) stores what it is given. With the `half`
/// feature, `KvCache<f32, half::f16>` and `KvCache<f32, half::bf16>` store keys and values
/// rounded to 16 bits (to nearest, ties to even) and compute in f32: a decode step reads half
/// the bytes, and the decode kernel widens them as it reads (exactly, with F16C on x86). The
/// result is bit for bit that of an f32 cache holding the rounded values; against the f32
/// cache of the unrounded values, a key's rounding moves score `s_ij` by at most
/// `δ_i = scale · Σ_c |q_ic| |k_jc| · u` and a value's by `u · |v|`, so
/// `|Δo| <= max|v| · (u + e^{2δ} − 1)` with `u = 2^−11` (f16) or `2^−8` (bf16). An appended
/// value that would round to infinity (|x| >= 65520 in f16) is an
/// [`Error::InvalidParameter`], and the cache is left unchanged. Calls with more query rows
/// per GQA group than the decode path takes (more than 8: e.g. a prefill chunk) widen the
/// cached K and V into f32 matrices first, a copy of the cache per call. See
/// [`CacheElement`].
///
/// ```
/// # #[cfg(feature = "half")] {
/// use attention_math::{AttentionOptions, KvCache, Mask};
/// use nalgebra::DMatrix;
///
/// let mut cache = KvCache::<f32, half::f16>::new(1, 4, 4)?;
/// let kv = DMatrix::<f32>::from_fn(6, 4, |i, j| (i + j) as f32 / 7.0);
/// cache.append(&kv, &kv)?;
/// let q = DMatrix::<f32>::from_element(1, 8, 0.5); // 2 query heads over the 1 KV head
/// let out = cache.attention(&q, 2, &Mask::causal(), &AttentionOptions::new())?;
/// assert_eq!(out.shape(), (1, 8));
/// assert!(cache.append(&DMatrix::from_element(1, 4, 1e5), &kv.rows(0, 1)).is_err());
/// # }
/// # Ok::<(), attention_math::Error>(())
/// ```
///
/// # Sliding window
///
/// [`with_window(.., w)`](KvCache::with_window) keeps only the last w positions: after every
/// append the cache holds positions `max(0, end − w) .. end`. It is a ring buffer that keeps
/// its views contiguous: the buffer grows up to 2w rows; when an append would run past the
/// end, the rows still in the window (at most w − 1 of them) move to the front once, which
/// leaves room for at least w more rows, so the copying is amortised O(1) per appended row.
///
/// To attend with `Mask::sliding_window(w')` (query p sees keys `p − w' ..= p`), decoding
/// chunks of up to c tokens, use a window of `w' + c` positions: it still holds the oldest
/// key the first token of a chunk needs after the chunk is appended. To roll back up to s
/// speculative tokens with [`truncate`](KvCache::truncate), add s more: evicted positions
/// never come back.
///
/// # Masks: the queries are the last n positions
///
/// After appending the keys and values of n new tokens, their queries (n rows) attend to
/// the m = `len()` cached keys, and query i is at position `end_position() − n + i`: the
/// queries are the *last* n of the m positions. That is [`Mask::causal_bottom_right`]
/// (`j <= i + m − n`). [`Mask::causal`] is top-left aligned (`j <= i`, PyTorch's rule for
/// n != m): in a decode step it would let the new token see only the first cached key.
/// Rotary embeddings go on before the append, with the position offset the cache had:
/// `rope.apply(&mut k, cache.end_position())` (see [`Rope::apply`]).
///
/// # Examples
///
/// ```
/// use attention_math::{multi_head_attention, AttentionOptions, Heads, KvCache, Mask, Rope, RopeLayout};
/// use nalgebra::DMatrix;
///
/// // 4 query heads over 2 key-value heads of width 8.
/// let (heads, d) = (Heads::grouped(4, 2), 8);
/// let rope = Rope::new(d, RopeLayout::RotateHalf);
/// let x = |n: usize, cols: usize, seed: f64| {
///     DMatrix::<f32>::from_fn(n, cols, |i, j| ((i * cols + j) as f64 * seed).sin() as f32)
/// };
/// let mut cache = KvCache::<f32>::new(2, d, d)?;
/// let opts = AttentionOptions::new();
///
/// // Prefill a 5-token prompt, then decode one token.
/// for (n, seed) in [(5, 0.1), (1, 0.2)] {
///     let (mut q, mut k, v) = (x(n, 4 * d, seed), x(n, 2 * d, seed + 0.3), x(n, 2 * d, seed + 0.7));
///     let offset = cache.end_position();
///     rope.apply(&mut q, offset)?;
///     rope.apply(&mut k, offset)?;
///     cache.append(&k, &v)?;
///     let out = multi_head_attention(&q, cache.all_keys(), cache.all_values(), heads,
///         &Mask::causal_bottom_right(), &opts)?;
///     assert_eq!(out.shape(), (n, 4 * d));
/// }
/// assert_eq!((cache.len(), cache.end_position()), (6, 6));
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone)]
pub struct KvCache<T: Float, S: CacheElement<T> = T> {
    heads: usize,
    key_dim: usize,
    value_dim: usize,
    window: Option<usize>,
    /// `cap x (heads · key_dim)`, column-major, column stride `cap`.
    keys: Vec<S>,
    /// `cap x (heads · value_dim)`, column-major, column stride `cap`.
    values: Vec<S>,
    cap: usize,
    /// Buffer row of the first cached position.
    head: usize,
    len: usize,
    /// Absolute position of the first cached row.
    start: usize,
    /// The compute type.
    compute: PhantomData<fn() -> T>,
}

impl<T: Float, S: CacheElement<T>> fmt::Debug for KvCache<T, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvCache")
            .field("storage", &S::NAME)
            .field("heads", &self.heads)
            .field("key_dim", &self.key_dim)
            .field("value_dim", &self.value_dim)
            .field("window", &self.window)
            .field("positions", &self.positions())
            .field("capacity", &self.cap)
            .finish_non_exhaustive()
    }
}

/// `rows · cols` entries of `T`, zeroed, allocated fallibly: [`Error::TooLarge`] if the count
/// overflows `usize`, the bytes exceed `isize::MAX`, or the allocator refuses.
fn alloc<T: Copy + Default>(what: &'static str, rows: usize, cols: usize) -> Result<Vec<T>> {
    let too_large = || Error::TooLarge {
        what,
        shape: (rows, cols),
    };
    let len = rows.checked_mul(cols).ok_or_else(too_large)?;
    match len.checked_mul(core::mem::size_of::<T>()) {
        Some(bytes) if bytes <= isize::MAX as usize => {}
        _ => return Err(too_large()),
    }
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| too_large())?;
    // Before the first write, so that the pages are faulted in at their final size.
    huge_pages(v.as_mut_ptr(), len * core::mem::size_of::<T>());
    v.resize(len, T::default());
    Ok(v)
}

/// Asks the kernel for 2 MiB pages for the 2 MiB-aligned part of `bytes` bytes at `p`: a
/// decode step reads every column of a large cache side by side, and with 4 KiB pages each
/// column segment is its own TLB entry (measured on a Zen 3: one read of a 64 MiB cache
/// 30-40% faster with transparent huge pages). A hint only: where transparent huge pages
/// are off or unsupported it does nothing.
#[cfg(all(target_os = "linux", not(miri)))]
fn huge_pages<T>(p: *mut T, bytes: usize) {
    const HUGE: usize = 2 << 20;
    const MADV_HUGEPAGE: core::ffi::c_int = 14;
    unsafe extern "C" {
        fn madvise(
            addr: *mut core::ffi::c_void,
            len: usize,
            advice: core::ffi::c_int,
        ) -> core::ffi::c_int;
    }
    let (lo, hi) = (
        (p as usize).next_multiple_of(HUGE),
        (p as usize + bytes) / HUGE * HUGE,
    );
    if hi > lo {
        // SAFETY: [lo, hi) lies inside the allocation of `bytes` bytes at `p` that the caller
        // owns; MADV_HUGEPAGE changes only how the kernel backs those pages, never their
        // contents or validity. A failure (EINVAL where THP is off) is harmless and ignored.
        unsafe {
            madvise(lo as *mut core::ffi::c_void, hi - lo, MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(all(target_os = "linux", not(miri))))]
fn huge_pages<T>(_p: *mut T, _bytes: usize) {}

/// The `rows x cols` view of a column-major buffer with column stride `cap`, starting at
/// buffer row `head` of column `col0`.
fn view<T: nalgebra::Scalar>(
    buf: &[T],
    cap: usize,
    head: usize,
    rows: usize,
    col0: usize,
    cols: usize,
) -> DMatrixView<'_, T> {
    if cols == 0 {
        // SAFETY: a view with no columns has no elements, so nothing is ever read through
        // it, whatever its row count (possibly huge for zero-width heads) and strides.
        return unsafe {
            DMatrixView::from_slice_with_strides_generic_unchecked(
                &[],
                0,
                Dyn(rows),
                Dyn(0),
                U1,
                Dyn(1),
            )
        };
    }
    // col0 · cap <= buf.len(), and the buffer holds every column: cap · cols elements.
    let data = buf.get(col0 * cap + head..).unwrap_or(&[]);
    DMatrixView::from_slice_with_strides_generic(data, Dyn(rows), Dyn(cols), U1, Dyn(cap))
}

impl<T: Float, S: CacheElement<T>> KvCache<T, S> {
    /// An empty cache for `heads` (G) key-value heads with keys `key_dim` (d) and values
    /// `value_dim` (d_v) wide. Nothing is allocated until the first append.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidParameter`] naming `heads` if it is 0;
    /// - [`Error::TooLarge`] if G·d or G·d_v overflows `usize`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::KvCache;
    ///
    /// let cache = KvCache::<f64>::new(8, 128, 128)?;
    /// assert!(cache.is_empty());
    /// assert_eq!((cache.heads(), cache.key_dim(), cache.value_dim()), (8, 128, 128));
    /// assert_eq!(cache.capacity(), 0);
    /// assert!(KvCache::<f64>::new(0, 128, 128).is_err());
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn new(heads: usize, key_dim: usize, value_dim: usize) -> Result<Self> {
        if heads == 0 {
            return Err(Error::InvalidParameter {
                name: "heads",
                value: 0.0,
                requirement: "must be >= 1",
            });
        }
        for (what, dim) in [
            ("the cache's key columns (heads x key_dim)", key_dim),
            ("the cache's value columns (heads x value_dim)", value_dim),
        ] {
            if heads.checked_mul(dim).is_none() {
                return Err(Error::TooLarge {
                    what,
                    shape: (heads, dim),
                });
            }
        }
        Ok(KvCache {
            heads,
            key_dim,
            value_dim,
            window: None,
            keys: Vec::new(),
            values: Vec::new(),
            cap: 0,
            head: 0,
            len: 0,
            start: 0,
            compute: PhantomData,
        })
    }

    /// An empty cache, as [`new`](KvCache::new), with room for `capacity` positions
    /// allocated up front (a prompt plus the tokens to generate): appends up to that many
    /// positions never reallocate.
    ///
    /// # Errors
    ///
    /// Those of [`new`](KvCache::new), and [`Error::TooLarge`] if `capacity x G·d` (or
    /// `G·d_v`) entries cannot be allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Error, KvCache};
    ///
    /// let cache = KvCache::<f32>::with_capacity(2, 64, 64, 4096)?;
    /// assert_eq!(cache.capacity(), 4096);
    /// assert!(matches!(KvCache::<f32>::with_capacity(2, 64, 64, usize::MAX),
    ///     Err(Error::TooLarge { .. })));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn with_capacity(
        heads: usize,
        key_dim: usize,
        value_dim: usize,
        capacity: usize,
    ) -> Result<Self> {
        let mut cache = Self::new(heads, key_dim, value_dim)?;
        cache.grow(capacity, 0, 0)?;
        Ok(cache)
    }

    /// An empty cache, as [`new`](KvCache::new), that keeps only the last `window` positions
    /// (see the [sliding window](KvCache#sliding-window) section): the buffer grows up to
    /// 2·`window` rows and then recycles its rows, so memory stays O(window).
    ///
    /// # Errors
    ///
    /// Those of [`new`](KvCache::new), and [`Error::InvalidParameter`] naming `window` if it
    /// is 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::KvCache;
    /// use nalgebra::DMatrix;
    ///
    /// let mut cache = KvCache::<f64>::with_window(1, 2, 1, 3)?;
    /// for t in 0..10 {
    ///     let k = DMatrix::from_element(1, 2, t as f64);
    ///     cache.append(&k, &DMatrix::from_element(1, 1, -(t as f64)))?;
    /// }
    /// // Positions 7, 8, 9 remain, in order.
    /// assert_eq!(cache.positions(), 7..10);
    /// assert_eq!(cache.keys(0)?.column(0).as_slice(), &[7.0, 8.0, 9.0]);
    /// assert_eq!(cache.values(0)?.column(0).as_slice(), &[-7.0, -8.0, -9.0]);
    /// assert!(cache.capacity() <= 6);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn with_window(
        heads: usize,
        key_dim: usize,
        value_dim: usize,
        window: usize,
    ) -> Result<Self> {
        if window == 0 {
            return Err(Error::InvalidParameter {
                name: "window",
                value: 0.0,
                requirement: "must be >= 1",
            });
        }
        let mut cache = Self::new(heads, key_dim, value_dim)?;
        cache.window = Some(window);
        Ok(cache)
    }

    /// Appends the keys and values of n tokens (one token: n = 1; a prompt or a chunk:
    /// n > 1): `keys` is n x (G·d) and `values` n x (G·d_v), rows are consecutive positions
    /// starting at [`end_position`](KvCache::end_position), heads side by side in the
    /// columns. Either may be a `&DMatrix<T>` or a view. n = 0 is a no-op.
    ///
    /// With a window of w, the oldest positions are evicted so that the last w remain (of a
    /// chunk longer than w only its last w rows are kept). Amortised cost O(n·G·(d + d_v)).
    ///
    /// On an `Err` the cache is unchanged.
    ///
    /// # Errors
    ///
    /// - [`Error::DimensionMismatch`] if `values` has a different number of rows than `keys`;
    /// - [`Error::ShapeMismatch`] naming `keys` (or `values`) if it does not have G·d (G·d_v)
    ///   columns;
    /// - [`Error::NonFinite`] naming `keys` or `values` and the first non-finite entry;
    /// - [`Error::InvalidParameter`] naming `keys` if `end_position() + n` overflows `usize`;
    /// - [`Error::TooLarge`] if the grown buffer cannot be allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::KvCache;
    /// use nalgebra::DMatrix;
    ///
    /// let mut cache = KvCache::<f32>::new(2, 3, 1)?;
    /// let k = DMatrix::from_fn(4, 6, |i, j| (10 * i + j) as f32);
    /// let v = DMatrix::from_fn(4, 2, |i, j| (i + j) as f32);
    /// cache.append(k.rows(0, 3), v.rows(0, 3))?; // a chunk of 3
    /// cache.append(k.rows(3, 1), v.rows(3, 1))?; // one token
    /// assert_eq!(cache.all_keys(), k);
    /// assert_eq!(cache.keys(1)?, k.columns(3, 3));
    ///
    /// let err = cache.append(&k, &DMatrix::<f32>::zeros(4, 3)).unwrap_err();
    /// assert_eq!(err.to_string(), "values is 4 x 3 but must be 4 x 2");
    /// assert_eq!(cache.len(), 4); // unchanged
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn append<'k, 'v>(
        &mut self,
        keys: impl Into<DMatrixView<'k, T>>,
        values: impl Into<DMatrixView<'v, T>>,
    ) -> Result<()> {
        let (keys, values) = (keys.into(), values.into());
        let n = keys.nrows();
        let (kc, vc) = (self.key_cols(), self.value_cols());
        if values.nrows() != n {
            return Err(Error::DimensionMismatch {
                arg: "values",
                axis: Axis::Rows,
                found: values.nrows(),
                other: "keys",
                other_axis: Axis::Rows,
                expected: n,
            });
        }
        if keys.ncols() != kc {
            return Err(Error::ShapeMismatch {
                arg: "keys",
                found: keys.shape(),
                expected: (n, kc),
            });
        }
        if values.ncols() != vc {
            return Err(Error::ShapeMismatch {
                arg: "values",
                found: values.shape(),
                expected: (n, vc),
            });
        }
        check_finite("keys", &keys)?;
        check_finite("values", &values)?;
        representable::<T, S>("keys", &keys)?;
        representable::<T, S>("values", &values)?;
        let end = self
            .end_position()
            .checked_add(n)
            .ok_or(Error::InvalidParameter {
                name: "keys",
                value: n as f64,
                requirement: "must not take the cache's end position past usize::MAX",
            })?;
        // Which cached rows survive and which incoming rows are kept.
        let (dropped, skipped) = match self.window {
            None => (0, 0),
            Some(w) => {
                let incoming = n.min(w);
                (self.len - self.len.min(w - incoming), n - incoming)
            }
        };
        let (live_start, live_len) = (self.head + dropped, self.len - dropped);
        // live_len + n - skipped <= len + n <= end: no overflow.
        let new_len = live_len + (n - skipped);
        let mut base = live_start;
        if live_start.saturating_add(new_len) > self.cap {
            let max_cap = self.window.map_or(usize::MAX, |w| w.saturating_mul(2));
            if self.cap >= max_cap {
                // A full windowed buffer: move the surviving rows (< w) to the front; new_len
                // <= w <= cap / 2.
                self.move_to_front(live_start, live_len);
            } else {
                let cap = new_len
                    .max(self.cap.saturating_mul(2))
                    .max(MIN_ROWS)
                    .min(max_cap);
                self.grow(cap, live_start, live_len)?;
            }
            base = 0;
        }
        let cap = self.cap;
        let dst = base + live_len..base + new_len;
        for (buf, src, cols) in [(&mut self.keys, &keys, kc), (&mut self.values, &values, vc)] {
            for c in 0..cols {
                let col = src.column(c);
                S::store(
                    &col.as_slice()[skipped..],
                    &mut buf[c * cap + dst.start..c * cap + dst.end],
                );
            }
        }
        self.head = base;
        self.len = new_len;
        self.start = end - new_len;
        Ok(())
    }

    /// Reallocates to `cap` rows, moving `len` rows from buffer row `from` to row 0.
    fn grow(&mut self, cap: usize, from: usize, len: usize) -> Result<()> {
        let mut keys = alloc::<S>(
            "the KV cache's keys (capacity x heads·key_dim)",
            cap,
            self.key_cols(),
        )?;
        let mut values = alloc::<S>(
            "the KV cache's values (capacity x heads·value_dim)",
            cap,
            self.value_cols(),
        )?;
        let old = self.cap;
        for (new, buf, cols) in [
            (&mut keys, &self.keys, self.key_cols()),
            (&mut values, &self.values, self.value_cols()),
        ] {
            for c in 0..cols {
                new[c * cap..c * cap + len]
                    .copy_from_slice(&buf[c * old + from..c * old + from + len]);
            }
        }
        self.keys = keys;
        self.values = values;
        self.cap = cap;
        self.head = 0;
        Ok(())
    }

    /// Moves `len` rows from buffer row `from` to row 0 in every column.
    fn move_to_front(&mut self, from: usize, len: usize) {
        let (cap, kc, vc) = (self.cap, self.key_cols(), self.value_cols());
        for (buf, cols) in [(&mut self.keys, kc), (&mut self.values, vc)] {
            for c in 0..cols {
                buf.copy_within(c * cap + from..c * cap + from + len, c * cap);
            }
        }
        self.head = 0;
    }

    /// Drops every position from `positions` on, keeping the absolute positions
    /// `start_position() .. positions` — as [`Vec::truncate`], counting positions from the
    /// start of the sequence. This is how rejected speculative tokens are rolled back: after
    /// verifying up to position p, `truncate(p + 1)`. A `positions` at or past
    /// [`end_position`](KvCache::end_position) does nothing. The capacity is kept.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] naming `positions` if a window has already evicted some of
    /// the positions to keep (`positions < start_position()`, which only a windowed cache
    /// can have); the cache is then unchanged. Truncating to exactly `start_position()`
    /// empties the cache and keeps its positions: the next append is at `start_position()`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::KvCache;
    /// use nalgebra::DMatrix;
    ///
    /// let mut cache = KvCache::<f64>::new(1, 1, 1)?;
    /// let x = DMatrix::from_fn(6, 1, |i, _| i as f64);
    /// cache.append(&x, &x)?;
    /// cache.truncate(4)?; // reject the drafts at positions 4 and 5
    /// assert_eq!(cache.end_position(), 4);
    /// assert_eq!(cache.keys(0)?.column(0).as_slice(), &[0.0, 1.0, 2.0, 3.0]);
    ///
    /// let mut window = KvCache::<f64>::with_window(1, 1, 1, 2)?;
    /// window.append(&x, &x)?; // keeps positions 4, 5
    /// assert!(window.truncate(3).is_err());
    /// window.truncate(5)?;
    /// assert_eq!(window.positions(), 4..5);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn truncate(&mut self, positions: usize) -> Result<()> {
        if positions >= self.end_position() {
            return Ok(());
        }
        if positions < self.start {
            return Err(Error::InvalidParameter {
                name: "positions",
                value: positions as f64,
                requirement: "must be >= start_position(): the window evicted the positions before it",
            });
        }
        self.len = positions - self.start;
        Ok(())
    }

    /// Empties the cache for a new sequence: no positions, the next append is at position 0
    /// (also for a windowed cache). The capacity is kept.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::KvCache;
    /// use nalgebra::DMatrix;
    ///
    /// let mut cache = KvCache::<f32>::with_window(1, 2, 2, 4)?;
    /// cache.append(&DMatrix::zeros(9, 2), &DMatrix::zeros(9, 2))?;
    /// cache.clear();
    /// assert!(cache.is_empty());
    /// assert_eq!(cache.positions(), 0..0);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn clear(&mut self) {
        self.len = 0;
        self.head = 0;
        self.start = 0;
    }

    /// The number of cached positions (rows of every view), m.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::KvCache;
    /// # use nalgebra::DMatrix;
    /// let mut cache = KvCache::<f32>::new(1, 2, 2)?;
    /// cache.append(&DMatrix::zeros(3, 2), &DMatrix::zeros(3, 2))?;
    /// assert_eq!(cache.len(), 3);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` if no position is cached.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(attention_math::KvCache::<f32>::new(1, 2, 2)?.is_empty());
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of rows allocated (cached plus spare); the column stride of every view.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::KvCache;
    /// # use nalgebra::DMatrix;
    /// let mut cache = KvCache::<f32>::new(1, 2, 2)?;
    /// cache.append(&DMatrix::zeros(20, 2), &DMatrix::zeros(20, 2))?;
    /// assert!(cache.capacity() >= 20);
    /// assert_eq!(cache.keys(0)?.strides(), (1, cache.capacity()));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The number of key-value heads G.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attention_math::KvCache::<f32>::new(4, 2, 2)?.heads(), 4);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// The width d of one key head.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attention_math::KvCache::<f32>::new(4, 2, 3)?.key_dim(), 2);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn key_dim(&self) -> usize {
        self.key_dim
    }

    /// The width d_v of one value head.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attention_math::KvCache::<f32>::new(4, 2, 3)?.value_dim(), 3);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn value_dim(&self) -> usize {
        self.value_dim
    }

    /// The sliding window, if the cache was built with [`with_window`](KvCache::with_window).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::KvCache;
    /// assert_eq!(KvCache::<f32>::with_window(1, 2, 2, 64)?.window(), Some(64));
    /// assert_eq!(KvCache::<f32>::new(1, 2, 2)?.window(), None);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// The absolute position of the first cached row: 0 unless a window has evicted
    /// positions (or [`truncate`](KvCache::truncate) emptied a windowed cache).
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::KvCache;
    /// # use nalgebra::DMatrix;
    /// let mut cache = KvCache::<f32>::with_window(1, 2, 2, 4)?;
    /// cache.append(&DMatrix::zeros(10, 2), &DMatrix::zeros(10, 2))?;
    /// assert_eq!(cache.start_position(), 6);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn start_position(&self) -> usize {
        self.start
    }

    /// The number of positions seen so far, `start_position() + len()`: the absolute position
    /// of the next token, hence the offset to rotate its query and key with
    /// ([`Rope::apply`]).
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::KvCache;
    /// # use nalgebra::DMatrix;
    /// let mut cache = KvCache::<f32>::with_window(1, 2, 2, 4)?;
    /// cache.append(&DMatrix::zeros(10, 2), &DMatrix::zeros(10, 2))?;
    /// assert_eq!(cache.end_position(), 10);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn end_position(&self) -> usize {
        // start + len <= the end an append checked.
        self.start + self.len
    }

    /// The absolute positions of the cached rows, `start_position() .. end_position()`: row
    /// j of every view is position `start_position() + j`.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::KvCache;
    /// # use nalgebra::DMatrix;
    /// let mut cache = KvCache::<f32>::with_window(1, 2, 2, 4)?;
    /// cache.append(&DMatrix::zeros(10, 2), &DMatrix::zeros(10, 2))?;
    /// assert_eq!(cache.positions(), 6..10);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn positions(&self) -> Range<usize> {
        self.start..self.end_position()
    }

    fn key_cols(&self) -> usize {
        self.heads * self.key_dim // checked in new
    }

    fn value_cols(&self) -> usize {
        self.heads * self.value_dim // checked in new
    }

    fn check_group(&self, group: usize) -> Result<()> {
        if group < self.heads {
            Ok(())
        } else {
            Err(Error::InvalidParameter {
                name: "group",
                value: group as f64,
                requirement: "must be < the number of key-value heads",
            })
        }
    }

    /// The cached keys of key-value head `group`, a zero-copy len x d view (row j is
    /// position `start_position() + j`; column stride [`capacity`](KvCache::capacity)), for
    /// [`scaled_attention`] and friends.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] naming `group` if `group >= heads()`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{scaled_attention, KvCache, Mask};
    /// use nalgebra::DMatrix;
    ///
    /// let mut cache = KvCache::<f64>::new(2, 4, 3)?;
    /// let k = DMatrix::from_fn(6, 8, |i, j| ((i * 8 + j) as f64).sin());
    /// let v = DMatrix::from_fn(6, 6, |i, j| ((i * 6 + j) as f64).cos());
    /// cache.append(&k, &v)?;
    /// // Two new queries for group 1: the last two positions.
    /// let q = DMatrix::from_fn(2, 4, |i, j| (i + j) as f64 * 0.1);
    /// let mask = Mask::causal_bottom_right();
    /// let out = scaled_attention(&q, cache.keys(1)?, cache.values(1)?, &mask)?;
    /// let owned = scaled_attention(&q, &k.columns(4, 4).clone_owned(), &v.columns(3, 3).clone_owned(), &mask)?;
    /// assert_eq!(out, owned);
    /// assert!(cache.keys(2).is_err());
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn keys(&self, group: usize) -> Result<DMatrixView<'_, S>> {
        self.check_group(group)?;
        let d = self.key_dim;
        Ok(view(
            &self.keys,
            self.cap,
            self.head,
            self.len,
            group * d,
            d,
        ))
    }

    /// The cached values of key-value head `group`, a zero-copy len x d_v view; see
    /// [`keys`](KvCache::keys).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] naming `group` if `group >= heads()`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::KvCache;
    /// use nalgebra::DMatrix;
    ///
    /// let mut cache = KvCache::<f32>::new(2, 1, 2)?;
    /// let v = DMatrix::from_fn(3, 4, |i, j| (10 * i + j) as f32);
    /// cache.append(&DMatrix::zeros(3, 2), &v)?;
    /// assert_eq!(cache.values(1)?, v.columns(2, 2));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn values(&self, group: usize) -> Result<DMatrixView<'_, S>> {
        self.check_group(group)?;
        let dv = self.value_dim;
        Ok(view(
            &self.values,
            self.cap,
            self.head,
            self.len,
            group * dv,
            dv,
        ))
    }

    /// All cached keys, a zero-copy len x (G·d) view with the heads side by side, as
    /// [`multi_head_attention`] takes `k`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::KvCache;
    /// use nalgebra::DMatrix;
    ///
    /// let mut cache = KvCache::<f32>::new(3, 2, 1)?;
    /// let k = DMatrix::from_fn(2, 6, |i, j| (10 * i + j) as f32);
    /// cache.append(&k, &DMatrix::zeros(2, 3))?;
    /// assert_eq!(cache.all_keys(), k);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn all_keys(&self) -> DMatrixView<'_, S> {
        view(
            &self.keys,
            self.cap,
            self.head,
            self.len,
            0,
            self.key_cols(),
        )
    }

    /// All cached values, a zero-copy len x (G·d_v) view, as [`multi_head_attention`] takes
    /// `v`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::KvCache;
    /// use nalgebra::DMatrix;
    ///
    /// let mut cache = KvCache::<f64>::new(2, 1, 2)?;
    /// let v = DMatrix::from_fn(2, 4, |i, j| (10 * i + j) as f64);
    /// cache.append(&DMatrix::zeros(2, 2), &v)?;
    /// assert_eq!(cache.all_values(), v);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn all_values(&self) -> DMatrixView<'_, S> {
        view(
            &self.values,
            self.cap,
            self.head,
            self.len,
            0,
            self.value_cols(),
        )
    }

    /// Attention of the newest `n` positions against the whole cache, every query head
    /// with its group's cached keys and values: what a decode step (n = 1) or a chunked
    /// prefill computes after [`append`](KvCache::append)ing the new tokens' keys and values.
    ///
    /// `q` is n x (H·d), one row per new token, the H query heads side by side (H a
    /// multiple of the cache's G key-value heads: GQA; H = G is multi-head attention);
    /// the result is n x (H·d_v), as [`multi_head_attention`] returns it. The queries are
    /// the last n cached positions, so `mask` is applied
    /// [bottom-right](Mask::bottom_right): query `i` is at position `len − n + i` of the
    /// cache, and `Mask::causal()`, `sliding_window(w)` or `prefix_lm(p)` mean what they mean
    /// for the whole sequence (positions count from [`start_position`](KvCache::start_position),
    /// the oldest position still cached). That is this call's guard against the silent
    /// top-left mistake of passing `Mask::causal()` to a decode step.
    ///
    /// The cached keys and values were checked for non-finite entries when they were
    /// appended, so a step reads them once, in the attention itself (only `q` is scanned).
    ///
    /// # Errors
    ///
    /// Those of [`multi_head_attention`] (H not a multiple of G, `q`'s columns not H heads of
    /// the cache's key width, non-finite `q`, bad options).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{multi_head_attention, AttentionOptions, Heads, KvCache, Mask};
    /// use nalgebra::DMatrix;
    ///
    /// // 4 query heads over 2 key-value heads of width 3; a prompt of 5 tokens, then one more.
    /// let x = |r: usize, c: usize, s: f64| DMatrix::from_fn(r, c, |i, j| ((i * c + j) as f64 + s).sin());
    /// let mut cache = KvCache::<f64>::new(2, 3, 3)?;
    /// cache.append(&x(5, 6, 0.1), &x(5, 6, 0.2))?;
    /// cache.append(&x(1, 6, 0.3), &x(1, 6, 0.4))?;
    /// let q = x(1, 12, 0.5);
    /// let opts = AttentionOptions::new();
    /// let step = cache.attention(&q, 4, &Mask::causal(), &opts)?;
    /// // The same as the bottom-right causal mask on the cached views: the new token sees all 6.
    /// let heads = Heads::grouped(4, 2);
    /// let want = multi_head_attention(&q, cache.all_keys(), cache.all_values(), heads,
    ///     &Mask::causal_bottom_right(), &opts)?;
    /// assert_eq!(step, want);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn attention<'q>(
        &self,
        q: impl Into<DMatrixView<'q, T>>,
        query_heads: usize,
        mask: &Mask,
        opts: &AttentionOptions<'_, T>,
    ) -> Result<DMatrix<T>> {
        let heads = Heads::grouped(query_heads, self.heads);
        S::attend(
            q.into(),
            self.all_keys(),
            self.all_values(),
            heads,
            &mask.clone().bottom_right(),
            opts,
        )
    }
}

/// Every entry of `x` within the range of the storage `S` (finite after rounding to it), or
/// an [`Error::InvalidParameter`] naming `what` with the first entry that is not.
fn representable<T: Float, S: CacheElement<T>>(
    what: &'static str,
    x: &DMatrixView<'_, T>,
) -> Result<()> {
    let Some(max) = S::max_value() else {
        return Ok(());
    };
    match x.iter().find(|&&v| v.abs() > max) {
        None => Ok(()),
        Some(&v) => Err(Error::InvalidParameter {
            name: what,
            value: v.as_f64(),
            requirement: S::RANGE,
        }),
    }
}

mod sealed {
    pub trait Sealed {}
    impl<T: crate::Float> Sealed for T {}
    #[cfg(feature = "half")]
    impl Sealed for half::f16 {}
    #[cfg(feature = "half")]
    impl Sealed for half::bf16 {}
}

/// How a [`KvCache`] stores its keys and values: in the compute type `T` itself (`f32`,
/// `f64`, the default), or, with the `half` feature, in `half::f16` or `half::bf16` for
/// `T = f32`, which halves the bytes a decode step reads. Sealed: implemented for these four
/// only.
///
/// A half-precision cache rounds every appended value to nearest (ties to even) and
/// computes in f32: the decode kernel widens K and V as it reads them (exactly), and calls
/// with more query rows per GQA group than the decode path takes (see
/// [`KvCache::attention`]) widen the cache into f32 matrices first, a copy.
///
/// # Examples
///
/// ```
/// use attention_math::{CacheElement, KvCache};
///
/// fn describe<S: CacheElement<f32>>(cache: &KvCache<f32, S>) -> String {
///     format!("{} positions of {}", cache.len(), S::NAME)
/// }
/// assert_eq!(describe(&KvCache::<f32>::new(1, 4, 4)?), "0 positions of f32");
/// # Ok::<(), attention_math::Error>(())
/// ```
pub trait CacheElement<T: Float>:
    sealed::Sealed + nalgebra::Scalar + Copy + Default + Send + Sync
{
    /// The storage's name: `"f32"`, `"f64"`, `"f16"` or `"bf16"`.
    const NAME: &'static str;
    /// What an appended value must satisfy (the message of the error when it does not).
    #[doc(hidden)]
    const RANGE: &'static str;
    /// The largest magnitude that stays finite when stored: `None` for `T` itself (every
    /// finite value is kept), just below 65520 for f16 (which rounds to 65504), just below
    /// 3.3961776e38 for bf16.
    fn max_value() -> Option<T>;
    /// `src` rounded to the storage, into `dst` (of the same length).
    #[doc(hidden)]
    fn store(src: &[T], dst: &mut [Self]);
    /// The attention of `q` over the cached `k` and `v` (see [`KvCache::attention`]).
    #[doc(hidden)]
    fn attend(
        q: DMatrixView<'_, T>,
        k: DMatrixView<'_, Self>,
        v: DMatrixView<'_, Self>,
        heads: Heads,
        mask: &Mask,
        opts: &AttentionOptions<'_, T>,
    ) -> Result<DMatrix<T>>;
}

/// Keys and values stored in the compute type itself.
impl<T: Float> CacheElement<T> for T {
    const NAME: &'static str = T::NAME;
    const RANGE: &'static str = "must be finite";
    fn max_value() -> Option<T> {
        None
    }
    #[inline]
    fn store(src: &[T], dst: &mut [T]) {
        dst.copy_from_slice(src);
    }
    fn attend(
        q: DMatrixView<'_, T>,
        k: DMatrixView<'_, T>,
        v: DMatrixView<'_, T>,
        heads: Heads,
        mask: &Mask,
        opts: &AttentionOptions<'_, T>,
    ) -> Result<DMatrix<T>> {
        multi_head(q, k, v, heads, mask, opts, Inputs::Checked)
    }
}

#[cfg(feature = "half")]
macro_rules! half_storage {
    ($h:ident, $name:literal, $range:literal, $max:expr) => {
        impl CacheElement<f32> for half::$h {
            const NAME: &'static str = $name;
            const RANGE: &'static str = $range;
            fn max_value() -> Option<f32> {
                Some($max)
            }
            #[inline]
            fn store(src: &[f32], dst: &mut [half::$h]) {
                use half::slice::HalfFloatSliceExt;
                dst.convert_from_f32_slice(src);
            }
            fn attend(
                q: DMatrixView<'_, f32>,
                k: DMatrixView<'_, half::$h>,
                v: DMatrixView<'_, half::$h>,
                heads: Heads,
                mask: &Mask,
                opts: &AttentionOptions<'_, f32>,
            ) -> Result<DMatrix<f32>> {
                crate::multihead::multi_head_stored(q, k, v, heads, mask, opts)
            }
        }
    };
}
// f16: values of magnitude 65520 and above round to inf; 65504 is the largest finite. bf16:
// f32's exponent range, only |x| >= (2 − 2^−8) · 2^127 rounds to inf.
#[cfg(feature = "half")]
half_storage!(
    f16,
    "f16",
    "must be finite and below 65520 in magnitude (f16's range)",
    f32::from_bits(0x477f_efff)
);
#[cfg(feature = "half")]
half_storage!(
    bf16,
    "bf16",
    "must be finite and below 3.3961776e38 in magnitude (bf16's range)",
    f32::from_bits(0x7f7f_7fff)
);

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::DMatrix;

    #[test]
    fn end_position_overflow_is_an_error_and_leaves_the_cache_unchanged() {
        let mut cache = KvCache::<f64>::with_window(1, 1, 1, 2).unwrap();
        let x = DMatrix::from_element(3, 1, 1.0);
        cache.append(&x, &x).unwrap();
        // Pretend usize::MAX - 1 positions were seen (a window keeps memory bounded).
        cache.start = usize::MAX - 1 - cache.len;
        assert_eq!(cache.end_position(), usize::MAX - 1);
        cache.append(x.rows(0, 1), x.rows(0, 1)).unwrap();
        assert_eq!(cache.positions(), usize::MAX - 2..usize::MAX);
        let before = cache.all_keys().clone_owned();
        let e = cache.append(x.rows(0, 1), x.rows(0, 1)).unwrap_err();
        assert!(matches!(e, Error::InvalidParameter { name: "keys", .. }));
        assert_eq!(cache.positions(), usize::MAX - 2..usize::MAX);
        assert_eq!(cache.all_keys(), before);
    }

    #[test]
    fn zero_width_heads_track_positions() {
        let mut cache = KvCache::<f32>::new(3, 0, 0).unwrap();
        let z = DMatrix::<f32>::zeros(5, 0);
        cache.append(&z, &z).unwrap();
        assert_eq!(cache.keys(2).unwrap().shape(), (5, 0));
        assert_eq!(cache.all_values().shape(), (5, 0));
        cache.truncate(2).unwrap();
        assert_eq!(cache.positions(), 0..2);
    }

    #[test]
    fn heads_times_width_overflow_is_too_large() {
        let e = KvCache::<f32>::new(usize::MAX, 2, 1).unwrap_err();
        assert!(matches!(
            e,
            Error::TooLarge {
                shape: (usize::MAX, 2),
                ..
            }
        ));
        let e = KvCache::<f64>::with_capacity(1, 1 << 40, 1, 1 << 30).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }));
    }
}
