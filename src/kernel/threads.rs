//! Where the work of one call runs: inline on the calling thread, or on a rayon pool (the
//! current one, or a private pool per thread count, built once and reused).

use std::sync::{Arc, Mutex, OnceLock};

/// Where the independent pieces of a call (query tiles, key blocks, heads) run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exec {
    /// One after another on the calling thread.
    Inline,
    /// In parallel on the current rayon pool.
    Pool,
}

impl Exec {
    /// Whether work handed to rayon here can actually run in parallel.
    pub(crate) fn parallel(self) -> bool {
        self == Exec::Pool && rayon::current_num_threads() > 1
    }
}

/// The largest private pool: four threads per logical CPU. More only adds OS threads that
/// wait, and `threads(usize::MAX)` must not try to spawn them.
/// Computed once: `available_parallelism` reads the affinity mask and cgroup files, tens of
/// microseconds that a small call cannot afford.
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
type Pools = Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>>;

/// The private pool of `threads` threads, built on first use.
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

#[cfg(test)]
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
}
