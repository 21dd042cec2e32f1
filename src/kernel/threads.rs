//! Where the work of one call runs: inline on the calling thread, or on a rayon pool (the
//! current one, or a private pool per thread count, built once and reused).
//!
//! Without the `rayon` feature every call runs inline, and [`par`] stands in for rayon's
//! prelude with the same method names on plain sequential iterators, so the kernels are
//! written once.

use crate::prelude::*;
#[cfg(feature = "rayon")]
use std::sync::{Arc, Mutex, OnceLock};

/// Where the independent pieces of a call (query tiles, key blocks, heads) run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exec {
    /// One after another on the calling thread.
    Inline,
    /// In parallel on the current rayon pool.
    #[cfg_attr(not(feature = "rayon"), allow(dead_code))]
    Pool,
}

impl Exec {
    /// Whether work handed to rayon here can actually run in parallel.
    #[cfg(feature = "rayon")]
    pub(crate) fn parallel(self) -> bool {
        self == Exec::Pool && rayon::current_num_threads() > 1
    }

    /// Whether work can run in parallel: never without the `rayon` feature.
    #[cfg(not(feature = "rayon"))]
    pub(crate) fn parallel(self) -> bool {
        false
    }

    /// How many threads work handed to rayon here runs on (1 inline).
    pub(crate) fn threads(self) -> usize {
        #[cfg(feature = "rayon")]
        if self.parallel() {
            return rayon::current_num_threads();
        }
        1
    }
}

/// rayon's prelude, or (without the `rayon` feature) sequential stand-ins with its names.
#[cfg(feature = "rayon")]
pub(crate) mod par {
    pub(crate) use rayon::prelude::*;
}

/// Sequential stand-ins for the parts of rayon's prelude the kernels use.
#[cfg(not(feature = "rayon"))]
pub(crate) mod par {
    /// `into_par_iter`: the plain iterator.
    pub(crate) trait IntoParallelIterator: IntoIterator + Sized {
        fn into_par_iter(self) -> Self::IntoIter {
            self.into_iter()
        }
    }
    impl<I: IntoIterator> IntoParallelIterator for I {}

    /// `par_iter` and `par_chunks` on slices: the plain ones.
    pub(crate) trait ParallelSlice<T> {
        fn par_iter(&self) -> core::slice::Iter<'_, T>;
        fn par_chunks(&self, size: usize) -> core::slice::Chunks<'_, T>;
    }
    impl<T> ParallelSlice<T> for [T] {
        fn par_iter(&self) -> core::slice::Iter<'_, T> {
            self.iter()
        }
        fn par_chunks(&self, size: usize) -> core::slice::Chunks<'_, T> {
            self.chunks(size)
        }
    }

    /// `par_chunks_mut` on slices: the plain one.
    pub(crate) trait ParallelSliceMut<T> {
        fn par_chunks_mut(&mut self, size: usize) -> core::slice::ChunksMut<'_, T>;
    }
    impl<T> ParallelSliceMut<T> for [T] {
        fn par_chunks_mut(&mut self, size: usize) -> core::slice::ChunksMut<'_, T> {
            self.chunks_mut(size)
        }
    }
}

/// The results of `jobs`, in order: run side by side on a pool, else one after another.
pub(crate) fn all<R: Send>(exec: Exec, jobs: &[&(dyn Fn() -> R + Sync)]) -> Vec<R> {
    use par::*;
    if exec.parallel() {
        jobs.par_iter().map(|f| f()).collect()
    } else {
        jobs.iter().map(|f| f()).collect()
    }
}

/// Runs `op` on every job, with one state per thread made by `init` (only by threads that
/// get a job). On a pool: the jobs sorted by `order`, each thread taking the next one off one
/// shared queue as it finishes its last. With the largest jobs first ("longest processing
/// time first") the threads finish within about one of the smallest jobs of each other;
/// rayon's halving of a list in order instead can leave one of the largest jobs to one
/// thread at the end (a causal attention's last query tile is 1/6 of the work at n = 1024
/// in 12 tiles). Inline: the jobs in the order given. The order changes only when each job
/// runs, never what it computes.
pub(crate) fn queued<J: Send, K: Ord, S>(
    exec: Exec,
    jobs: Vec<J>,
    order: impl Fn(&J) -> K,
    init: impl Fn() -> S + Sync,
    op: impl Fn(&mut S, J) + Sync,
) {
    #[cfg(feature = "rayon")]
    if exec.parallel() && jobs.len() > 1 {
        use rayon::prelude::*;
        let mut jobs = jobs;
        jobs.sort_by_cached_key(order);
        // One slot per job, each taken once: the shared counter is the only contended word.
        let slots: Vec<Mutex<Option<J>>> = jobs.into_iter().map(|j| Mutex::new(Some(j))).collect();
        let taken = core::sync::atomic::AtomicUsize::new(0);
        // A job panicking never holds a lock: a poisoned slot still holds a valid `Option`.
        let next = || {
            let slot = slots.get(taken.fetch_add(1, core::sync::atomic::Ordering::Relaxed))?;
            slot.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take()
        };
        (0..exec.threads())
            .into_par_iter()
            .for_each(|_| drain(next, &init, &op));
        return;
    }
    let _ = (exec, &order);
    let mut jobs = jobs.into_iter();
    drain(|| jobs.next(), &init, &op);
}

/// `op` on every job `next` gives until it gives none, with one state from `init`, made only
/// if there is a job.
fn drain<J, S>(mut next: impl FnMut() -> Option<J>, init: impl Fn() -> S, op: impl Fn(&mut S, J)) {
    if let Some(first) = next() {
        let mut state = init();
        op(&mut state, first);
        while let Some(job) = next() {
            op(&mut state, job);
        }
    }
}

/// The largest private pool: four threads per logical CPU. More only adds OS threads that
/// wait, and `threads(usize::MAX)` must not try to spawn them.
/// Computed once: `available_parallelism` reads the affinity mask and cgroup files, tens of
/// microseconds that a small call cannot afford.
#[cfg(feature = "rayon")]
pub(crate) fn max_threads() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()) * 4)
}

/// Runs `f` as [`AttentionOptions::threads`](crate::AttentionOptions::threads) asks: `None`
/// on the current rayon pool, `Some(1)` inline, `Some(t)` on a private pool of
/// `min(t, max_threads())` threads (if the pool cannot be built, inline: the result is the
/// same bits either way).
///
/// Private pools are built once per thread count and kept for the life of the process:
/// building one costs tens of microseconds, as much as a whole attention at n = 256.
/// rayon's global pool is never touched.
#[cfg(feature = "rayon")]
pub(crate) fn with_threads<R: Send>(threads: Option<usize>, f: impl FnOnce(Exec) -> R + Send) -> R {
    match threads.map(|t| t.min(max_threads())) {
        None => f(Exec::Pool),
        Some(0 | 1) => f(Exec::Inline),
        Some(t) => match private_pool(t) {
            Some(pool) => pool.install(|| f(Exec::Pool)),
            None => f(Exec::Inline),
        },
    }
}

/// The private pools built so far, by thread count.
#[cfg(feature = "rayon")]
type Pools = Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>>;

/// The private pool of `threads` threads, built on first use.
#[cfg(feature = "rayon")]
fn private_pool(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    static POOLS: OnceLock<Pools> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, pool)) = pools.iter().find(|(t, _)| *t == threads) {
        return Some(Arc::clone(pool));
    }
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .ok()?,
    );
    pools.push((threads, Arc::clone(&pool)));
    Some(pool)
}

/// Without the `rayon` feature: always inline (the same bits as any pool would give).
#[cfg(not(feature = "rayon"))]
pub(crate) fn with_threads<R: Send>(threads: Option<usize>, f: impl FnOnce(Exec) -> R + Send) -> R {
    let _ = threads;
    f(Exec::Inline)
}

#[cfg(all(test, feature = "rayon"))]
mod tests {
    use super::*;

    #[test]
    fn absurd_thread_counts_are_capped() {
        let cap = max_threads();
        assert!(cap >= 4);
        let seen = with_threads(Some(usize::MAX), |exec| {
            (exec, rayon::current_num_threads())
        });
        assert_eq!(seen, (Exec::Pool, cap));
        assert_eq!(with_threads(Some(1), |exec| exec), Exec::Inline);
        assert_eq!(with_threads(Some(2), |_| rayon::current_num_threads()), 2);
    }

    #[test]
    fn a_queue_runs_every_job_once_on_any_thread_count() {
        for threads in [1, 2, 3, 8] {
            let seen = Mutex::new(Vec::new());
            let states = core::sync::atomic::AtomicUsize::new(0);
            with_threads(Some(threads), |exec| {
                let init = || states.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
                let op = |_: &mut usize, j: usize| seen.lock().unwrap().push(j);
                queued(exec, (0..50).collect(), |&j| j % 7, init, op);
            });
            let mut seen = seen.into_inner().unwrap();
            if threads == 1 {
                // Inline: in the order given, with one state.
                assert_eq!(seen, (0..50).collect::<Vec<_>>());
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..50).collect::<Vec<_>>(), "{threads} threads");
            let states = states.into_inner();
            assert!(
                (1..=threads).contains(&states),
                "{states} states on {threads} threads"
            );
            // No job, no state.
            let made = core::sync::atomic::AtomicUsize::new(0);
            with_threads(Some(threads), |exec| {
                let init = || made.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
                queued(exec, Vec::<usize>::new(), |&j| j, init, |_, _| ());
            });
            assert_eq!(made.into_inner(), 0);
        }
    }
}
