//! Where the work of one call runs: on the calling thread alone, or on the calling thread
//! together with helpers from a rayon pool (the current one, or a private pool per thread
//! count, built once and reused).
//!
//! The calling thread always works. A parallel region ([`queued`], and [`map`] and [`all`]
//! on it) puts its jobs on one shared queue, hands `threads − 1` helper tasks to the pool and
//! starts on the queue at once; a helper that wakes up finds what is left. When the queue is
//! empty the caller closes the region and waits only for the helpers already inside it (each
//! finishing the one job it holds); a helper that wakes up later finds the region closed and
//! returns without touching it. So a call never waits for a sleeping thread to wake: on a
//! virtual machine that has halted an idle vCPU, waking it costs 0.3-0.7 ms, as much as a
//! whole call at n = 1024, and rayon's `install` (moving the call onto a worker and the
//! result back) paid that twice.
//!
//! Without the `rayon` feature every call runs inline, with the same bits.

use crate::prelude::*;
#[cfg(feature = "rayon")]
use std::sync::{Arc, Mutex, OnceLock};

/// Where the independent pieces of a call (query tiles, key blocks, heads) run.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Exec {
    /// One after another on the calling thread.
    Inline,
    /// On the calling thread and `threads − 1` helpers from `pool` (`None`: the current
    /// rayon pool, the global one outside any pool); `threads >= 2`.
    #[cfg(feature = "rayon")]
    Pool {
        threads: usize,
        pool: Option<&'static rayon::ThreadPool>,
    },
}

impl Exec {
    /// Whether work handed to a parallel region here can actually run in parallel.
    pub(crate) fn parallel(self) -> bool {
        self.threads() > 1
    }

    /// How many threads a parallel region here runs on (1 inline).
    pub(crate) fn threads(self) -> usize {
        match self {
            Exec::Inline => 1,
            #[cfg(feature = "rayon")]
            Exec::Pool { threads, .. } => threads,
        }
    }
}

/// The results of `jobs`, in order: side by side where `exec` is parallel, else one after
/// another.
pub(crate) fn all<R: Send>(exec: Exec, jobs: &[&(dyn Fn() -> R + Sync)]) -> Vec<R> {
    map(exec, jobs.iter().collect(), |f| f())
}

/// `f` of every item, in order: the items taken off one queue in the order given where
/// `exec` is parallel (see [`queued`]), else one after another.
pub(crate) fn map<I: Send, R: Send>(
    exec: Exec,
    items: Vec<I>,
    f: impl Fn(I) -> R + Sync,
) -> Vec<R> {
    if !exec.parallel() || items.len() < 2 {
        return items.into_iter().map(f).collect();
    }
    let mut out: Vec<Option<R>> = items.iter().map(|_| None).collect();
    let jobs: Vec<(&mut Option<R>, I)> = out.iter_mut().zip(items).collect();
    queued(
        exec,
        jobs,
        |_| (),
        || (),
        |_, (slot, item)| *slot = Some(f(item)),
    );
    // Every job ran once (`queued` returns only then, or unwinds), so every slot is full.
    out.into_iter().flatten().collect()
}

/// Runs `op` on every job, with one state per thread made by `init` (only by threads that
/// get a job). Where `exec` is parallel: the jobs sorted by `order` (stably), each thread
/// taking the next one off one shared queue as it finishes its last. With the largest jobs
/// first ("longest processing time first") the threads finish within about one of the
/// smallest jobs of each other; halving a list in order instead can leave one of the largest
/// jobs to one thread at the end (a causal attention's last query tile is 1/6 of the work at
/// n = 1024 in 12 tiles). Inline: the jobs in the order given. The order changes only when
/// each job runs, never what it computes. A panic in a job reaches the caller once every
/// thread has left the queue.
pub(crate) fn queued<J: Send, K: Ord, S>(
    exec: Exec,
    jobs: Vec<J>,
    order: impl Fn(&J) -> K,
    init: impl Fn() -> S + Sync,
    op: impl Fn(&mut S, J) + Sync,
) {
    #[cfg(feature = "rayon")]
    if let Exec::Pool { threads, pool } = exec
        && jobs.len() > 1
    {
        let mut jobs = jobs;
        jobs.sort_by_cached_key(order);
        let helpers = (threads - 1).min(jobs.len() - 1);
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
        region(pool, helpers, &|| drain(next, &init, &op));
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

/// The door of one parallel region: how many helpers are inside `work`, and whether the
/// region is closed to helpers that have not entered yet.
#[cfg(feature = "rayon")]
#[derive(Default)]
struct Door {
    /// [`CLOSED`] or'ed with the number of helpers inside.
    state: core::sync::atomic::AtomicUsize,
    /// The first panic of a helper, handed on to the caller.
    panic: Mutex<Option<Box<dyn core::any::Any + Send>>>,
}

/// The bit of [`Door::state`] that says no helper may enter any more.
#[cfg(feature = "rayon")]
const CLOSED: usize = 1 << (usize::BITS - 1);

/// The region's work with its borrow's lifetime erased, so that a `'static` helper task can
/// carry it.
#[cfg(feature = "rayon")]
struct Work(*const (dyn Fn() + Sync + 'static));

// SAFETY: `Work` points at a `Sync` closure, so calling it from another thread is sound while
// it lives; [`region`] does not return (nor unwind) before every helper that entered its door
// has left, and a helper dereferences the pointer only between entering and leaving.
#[cfg(feature = "rayon")]
unsafe impl Send for Work {}

#[cfg(feature = "rayon")]
impl Door {
    /// A helper's turn: `work` once if the region is still open, its panic kept.
    fn help(&self, work: Work) {
        use core::sync::atomic::Ordering::Acquire;
        let mut state = self.state.load(Acquire);
        loop {
            if state & CLOSED != 0 {
                return;
            }
            match self
                .state
                .compare_exchange_weak(state, state + 1, Acquire, Acquire)
            {
                Ok(_) => break,
                Err(now) => state = now,
            }
        }
        // SAFETY: this helper is inside the door (counted in `state` while the region was
        // open), so `region` is still waiting and the closure `work` points at is alive.
        let run = || unsafe { (*work.0)() };
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            let mut first = self.panic.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert(panic);
        }
        self.state
            .fetch_sub(1, core::sync::atomic::Ordering::Release);
    }

    /// Closes the door and waits until every helper inside has left: a spin, then yields
    /// (the helpers are running, each on its last job; none of them sleeps).
    fn close(&self) {
        use core::sync::atomic::Ordering::{AcqRel, Acquire};
        self.state.fetch_or(CLOSED, AcqRel);
        let mut spins = 0u32;
        while self.state.load(Acquire) != CLOSED {
            if spins < 1 << 10 {
                spins += 1;
                core::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Closes its door when dropped, so that [`region`] waits for its helpers even while a panic
/// of the caller's own share unwinds.
#[cfg(feature = "rayon")]
struct Closing<'a>(&'a Door);

#[cfg(feature = "rayon")]
impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Runs `work` on the calling thread and on up to `helpers` helper tasks handed to `pool`
/// (the current pool for `None`); returns once the caller's run has ended and every helper
/// that started has ended too. `work` must finish early when there is nothing left to do (it
/// drains a shared queue), so a helper that enters late does almost nothing.
#[cfg(feature = "rayon")]
fn region(pool: Option<&rayon::ThreadPool>, helpers: usize, work: &(dyn Fn() + Sync)) {
    let door = Arc::new(Door::default());
    let erased: *const (dyn Fn() + Sync + '_) = work;
    // SAFETY: only the lifetime changes (same fat pointer); see `Work` for why no helper
    // calls it after `work`'s borrow ends.
    let erased: *const (dyn Fn() + Sync + 'static) = unsafe { core::mem::transmute(erased) };
    for _ in 0..helpers {
        let (door, work) = (Arc::clone(&door), Work(erased));
        let task = move || door.help(work);
        match pool {
            Some(pool) => pool.spawn(task),
            None => rayon::spawn(task),
        }
    }
    let closing = Closing(&door);
    work();
    drop(closing);
    let panic = door.panic.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(panic) = panic {
        std::panic::resume_unwind(panic);
    }
}

/// The largest thread count: four threads per logical CPU. More only adds OS threads that
/// wait, and `threads(usize::MAX)` must not try to spawn them.
/// Computed once: `available_parallelism` reads the affinity mask and cgroup files, tens of
/// microseconds that a small call cannot afford.
#[cfg(feature = "rayon")]
pub(crate) fn max_threads() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()) * 4)
}

/// Runs `f` on the calling thread with the [`Exec`] that
/// [`AttentionOptions::threads`](crate::AttentionOptions::threads) asks for: `None` the
/// current rayon pool's thread count (the global pool's outside any pool), `Some(1)` inline,
/// `Some(t)` the caller and a private pool of `min(t, max_threads()) − 1` workers (if the pool
/// cannot be built, inline: the result is the same bits either way).
///
/// Private pools are built once per thread count and kept for the life of the process:
/// building one costs tens of microseconds, as much as a whole attention at n = 256.
/// rayon's global pool is never touched.
#[cfg(feature = "rayon")]
pub(crate) fn with_threads<R>(threads: Option<usize>, f: impl FnOnce(Exec) -> R) -> R {
    let exec = match threads.map(|t| t.min(max_threads())) {
        None => match rayon::current_num_threads() {
            0 | 1 => Exec::Inline,
            threads => Exec::Pool {
                threads,
                pool: None,
            },
        },
        Some(0 | 1) => Exec::Inline,
        Some(threads) => match private_pool(threads - 1) {
            Some(pool) => Exec::Pool {
                threads,
                pool: Some(pool),
            },
            None => Exec::Inline,
        },
    };
    f(exec)
}

/// The private pool of `workers` threads, built on first use and kept (leaked) for the life
/// of the process.
#[cfg(feature = "rayon")]
fn private_pool(workers: usize) -> Option<&'static rayon::ThreadPool> {
    type Pools = Mutex<Vec<(usize, &'static rayon::ThreadPool)>>;
    static POOLS: OnceLock<Pools> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&(_, pool)) = pools.iter().find(|(w, _)| *w == workers) {
        return Some(pool);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("attention-math-{i}"))
        .build()
        .ok()?;
    let pool: &'static rayon::ThreadPool = Box::leak(Box::new(pool));
    pools.push((workers, pool));
    Some(pool)
}

/// Without the `rayon` feature: always inline (the same bits as any pool would give).
#[cfg(not(feature = "rayon"))]
pub(crate) fn with_threads<R>(threads: Option<usize>, f: impl FnOnce(Exec) -> R) -> R {
    let _ = threads;
    f(Exec::Inline)
}

#[cfg(all(test, feature = "rayon"))]
mod tests {
    use super::*;
    use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    #[test]
    fn absurd_thread_counts_are_capped() {
        let cap = max_threads();
        assert!(cap >= 4);
        assert_eq!(with_threads(Some(usize::MAX), Exec::threads), cap);
        assert!(matches!(with_threads(Some(1), |exec| exec), Exec::Inline));
        assert!(matches!(with_threads(Some(0), |exec| exec), Exec::Inline));
        assert_eq!(with_threads(Some(2), Exec::threads), 2);
        // Inside a pool of three, `None` is that pool.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        assert_eq!(pool.install(|| with_threads(None, Exec::threads)), 3);
    }

    #[test]
    fn a_queue_runs_every_job_once_on_any_thread_count() {
        for threads in [1, 2, 3, 8] {
            let seen = Mutex::new(Vec::new());
            let states = AtomicUsize::new(0);
            with_threads(Some(threads), |exec| {
                let init = || states.fetch_add(1, Relaxed);
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
            let made = AtomicUsize::new(0);
            with_threads(Some(threads), |exec| {
                let init = || made.fetch_add(1, Relaxed);
                queued(exec, Vec::<usize>::new(), |&j| j, init, |_, _| ());
            });
            assert_eq!(made.into_inner(), 0);
        }
    }

    /// The calling thread works too: with helpers that cannot start (their pool's only
    /// worker is held until the region is done), the caller alone runs every job and the
    /// region still returns.
    #[test]
    fn the_caller_finishes_a_region_whose_helpers_never_start() {
        let pool: &'static rayon::ThreadPool = Box::leak(Box::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap(),
        ));
        let (hold, release) = std::sync::mpsc::channel::<()>();
        let (started, is_held) = std::sync::mpsc::channel::<()>();
        pool.spawn(move || {
            started.send(()).unwrap();
            release.recv().unwrap();
        });
        is_held.recv().unwrap();
        let exec = Exec::Pool {
            threads: 2,
            pool: Some(pool),
        };
        let caller = std::thread::current().id();
        let out = map(exec, (0..20).collect(), |i: usize| {
            assert_eq!(std::thread::current().id(), caller);
            i * i
        });
        assert_eq!(out, (0..20).map(|i| i * i).collect::<Vec<_>>());
        hold.send(()).unwrap();
    }

    /// `map` and `all` keep the order of their inputs on any thread count, nested too.
    #[test]
    fn map_and_all_keep_order_nested() {
        for threads in [1, 2, 4] {
            let out = with_threads(Some(threads), |exec| {
                map(exec, (0..9).collect(), |i: usize| {
                    map(exec, (0..7).collect(), |j: usize| i * 10 + j)
                })
            });
            let want: Vec<Vec<usize>> = (0..9)
                .map(|i| (0..7).map(|j| i * 10 + j).collect())
                .collect();
            assert_eq!(out, want, "{threads} threads");
            let (a, b) = (|| 1, || 2);
            assert_eq!(
                with_threads(Some(threads), |exec| all(exec, &[&a, &b])),
                [1, 2]
            );
        }
    }

    /// Many short regions back to back, nested and not, on 2 and 3 threads: helpers that
    /// arrive after a region closed must leave the next one's jobs alone, and every result
    /// lands in its slot once.
    #[test]
    fn short_regions_back_to_back_keep_their_results() {
        for threads in [2, 3] {
            with_threads(Some(threads), |exec| {
                for round in 0..500usize {
                    let jobs = 1 + round % 5;
                    let out = map(exec, (0..jobs).collect(), |i: usize| {
                        let inner = map(exec, (0..round % 3).collect(), |j: usize| j + i);
                        (i * round, inner.iter().sum::<usize>())
                    });
                    let want: Vec<(usize, usize)> = (0..jobs)
                        .map(|i| (i * round, (0..round % 3).map(|j| j + i).sum()))
                        .collect();
                    assert_eq!(out, want, "{threads} threads, round {round}");
                }
            });
        }
    }

    /// A job's panic reaches the caller, after every helper has left the region, whichever
    /// thread ran the job.
    #[test]
    fn a_panicking_job_unwinds_to_the_caller() {
        for threads in [2, 3] {
            let ran = AtomicUsize::new(0);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                with_threads(Some(threads), |exec| {
                    queued(
                        exec,
                        (0..40).collect(),
                        |&j| j,
                        || (),
                        |_, j: usize| {
                            ran.fetch_add(1, Relaxed);
                            assert!(j != 17, "job 17");
                        },
                    )
                })
            }));
            let panic = result.unwrap_err();
            let message = (panic.downcast_ref::<&str>().copied())
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str));
            assert_eq!(message, Some("job 17"));
            // Jobs 0 to 16 were taken before job 17, and a taken job always runs.
            assert!(ran.into_inner() >= 18);
        }
    }
}
