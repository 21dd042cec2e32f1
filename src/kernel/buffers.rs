//! Working buffers that outlive a call: the packed inputs and the backward's gradient
//! accumulators, megabytes per call at a few thousand rows.
//!
//! Freshly allocated memory of that size comes from the operating system page by page: every
//! 4 KiB is a page fault and a cleared page on first touch. On a Zen 2 that was 5% of a
//! forward + backward call at n = 2048 (`perf`: `exc_page_fault`, `clear_page_rep`), because
//! the allocator hands such blocks back to the system when they are freed; and many small
//! heads allocate and clear a few dozen 32 KiB buffers per call (3% of 16 heads at n = 128).
//! With the `std` feature a [`Buf`] returns its memory to a free list shared by all threads
//! (a buffer packed on a worker of the pool is usually dropped by the calling thread), and the
//! next call takes it from there, already mapped, never faulted in again: zeroed again
//! ([`Buf::zeroed`], a `memset` of memory the cache has seen) for an accumulator, or left as it
//! was ([`Buf::stale`]) for a packed layout that writes every element anyway. At most `KEEP`
//! (64 MiB) are kept, in at most `SLOTS` (64) blocks; buffers under `SMALL` (4 KiB) bypass the
//! list. Without `std` a `Buf` is a plain allocation.

use crate::Float;
use crate::prelude::*;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};

/// Bytes kept at most.
#[cfg(feature = "std")]
const KEEP: usize = 64 << 20;
/// Blocks kept at most.
#[cfg(feature = "std")]
const SLOTS: usize = 64;
/// Buffers below this many bytes are allocated and freed as usual.
#[cfg(feature = "std")]
const SMALL: usize = 4 << 10;

/// A buffer of `len` elements of `T` (f32 or f64), held as 64-bit words so that one free
/// list serves both types.
pub(crate) struct Buf<T: Float> {
    words: Vec<u64>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Float> Buf<T> {
    /// `len` zeros.
    pub(crate) fn zeroed(len: usize) -> Self {
        Self::of(len, Vec::clear)
    }

    /// `len` elements of unspecified values (whatever a buffer dropped earlier left
    /// there, else zeros): for a caller that writes every element before it reads one.
    pub(crate) fn stale(len: usize) -> Self {
        Self::of(len, |v| v.truncate(len * size_of::<T>() / 8))
    }

    /// A kept block (else a new one) after `keep` shortened it, grown with zero words to hold
    /// `len` elements.
    fn of(len: usize, keep: impl FnOnce(&mut Vec<u64>)) -> Self {
        const {
            assert!(size_of::<T>() <= 8 && 8 % size_of::<T>() == 0 && align_of::<T>() <= 8);
        }
        let words = (len * size_of::<T>()).div_ceil(8);
        let mut v = take(words).unwrap_or_default();
        keep(&mut v);
        v.resize(words, 0);
        Buf {
            words: v,
            len,
            _t: PhantomData,
        }
    }
}

impl<T: Float> Deref for Buf<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `words` holds at least `len · size_of::<T>()` initialised bytes, aligned to
        // 8 ≥ align_of::<T>() (checked at compile time in `of`); T is f32 or f64 (Float is
        // sealed), for which every bit pattern is a value.
        unsafe { core::slice::from_raw_parts(self.words.as_ptr().cast::<T>(), self.len) }
    }
}

impl<T: Float> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, borrowed mutably through `&mut self`.
        unsafe { core::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<T>(), self.len) }
    }
}

impl<T: Float> Drop for Buf<T> {
    fn drop(&mut self) {
        give(core::mem::take(&mut self.words));
    }
}

/// The kept blocks, shared by all threads: a buffer packed on a worker of the pool is
/// usually dropped by the calling thread, and taken again by a worker on the next call.
#[cfg(feature = "std")]
static FREE: std::sync::Mutex<Vec<Vec<u64>>> = std::sync::Mutex::new(Vec::new());

/// The smallest kept block of at least `words` words, if any.
#[cfg(feature = "std")]
fn take(words: usize) -> Option<Vec<u64>> {
    if words * 8 < SMALL {
        return None;
    }
    let mut free = FREE.lock().ok()?;
    let best = free
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= words)
        .min_by_key(|(_, v)| v.capacity())?
        .0;
    Some(free.swap_remove(best))
}

/// Keeps `v` for a later call if it is large enough and the list has room; else frees it.
#[cfg(feature = "std")]
fn give(v: Vec<u64>) {
    let bytes = v.capacity() * 8;
    if !(SMALL..=KEEP).contains(&bytes) {
        return;
    }
    if let Ok(mut free) = FREE.lock() {
        let kept: usize = free.iter().map(|v| v.capacity() * 8).sum();
        if free.len() < SLOTS && kept + bytes <= KEEP {
            free.push(v);
        }
    }
}

#[cfg(not(feature = "std"))]
fn take(_words: usize) -> Option<Vec<u64>> {
    None
}

#[cfg(not(feature = "std"))]
fn give(_v: Vec<u64>) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every buffer starts at zero, also one that reuses the memory of a dirty one; both
    /// element types, small and large sizes.
    #[test]
    fn reused_memory_is_zeroed() {
        for len in [0, 1, 3, 1000, 40_000, 100_000] {
            let mut a = Buf::<f32>::zeroed(len);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|&x| x == 0.0));
            a.iter_mut().for_each(|x| *x = f32::NAN);
            drop(a);
            let b = Buf::<f64>::zeroed(len / 2);
            assert_eq!(b.len(), len / 2);
            assert!(b.iter().all(|&x| x == 0.0 && x.is_sign_positive()));
            let c = Buf::<f32>::zeroed(len);
            assert!(c.iter().all(|&x| x.to_bits() == 0));
        }
    }
}
