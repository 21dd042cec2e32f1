//! The fast path: packing, the tiled forward pass, the tiled backward pass and their thread
//! handling, on the [`simd`](crate::simd) layer's micro-kernel, exp and softmax row step.
//!
//! The design is in `src/guide/kernel.md`, rendered as [`crate::guide::kernel`].

pub(crate) mod backward;
mod buffers;
mod decode;
pub(crate) mod forward;
mod pack;
mod threads;

pub(crate) use threads::{Exec, map, with_threads};

use crate::Float;
use crate::prelude::*;
use crate::simd::Isa;
use crate::spec::{AttentionOutput, AttentionStats, MultiHeadOutput, Problem};

/// Query rows per tile (a multiple of MR) and keys per tile (a multiple of NR): f32 96 x 256,
/// f64 48 x 128, so that one tile's scores and accumulator stay in L2.
pub(crate) fn tile<T: Float>() -> (usize, usize) {
    if size_of::<T>() == 4 {
        (96, 256)
    } else {
        (48, 128)
    }
}

/// The work of the block `rows` x `cols` of an n x m attention under `mask`, in query-key
/// pairs computed: all of a full block, half of a partial one, none of an empty one (what
/// [`threads::queued`] orders the forward's query tiles and the backward's lanes by).
pub(crate) fn block_work(
    mask: &crate::Mask,
    rows: core::ops::Range<usize>,
    cols: core::ops::Range<usize>,
    (n, m): (usize, usize),
) -> usize {
    let pairs = rows.len() * cols.len();
    match mask.classify(rows, cols, n, m) {
        crate::mask::Block::Empty => 0,
        crate::mask::Block::Partial => pairs / 2,
        crate::mask::Block::Full => pairs,
    }
}

/// The most rows one query tile holds: 1.5 tiles (f32 144, f64 72), so that a head of up to
/// that many queries is one tile, not two part-filled ones ([`tile_count`]; 16 heads of
/// n = 128, causal, one thread of a Zen 4: 1.03-1.04x faster with each head in one tile).
pub(crate) fn tile_capacity<T: Float>() -> usize {
    tile::<T>().0 / 2 * 3
}

/// How many query tiles cover `n` rows: one up to [`tile_capacity`] rows, else ⌈n / BR⌉.
pub(crate) fn tile_count<T: Float>(n: usize) -> usize {
    if n <= tile_capacity::<T>() {
        1
    } else {
        n.div_ceil(tile::<T>().0)
    }
}

/// Whether `rows` query rows per GQA group against `m` keys take the decode path.
#[cfg(feature = "half")]
pub(crate) fn decodes(rows: usize, m: usize) -> bool {
    decode::suits(rows, m)
}

/// [`attend`] on the decode path over keys and values stored as `X` (a half-precision
/// cache): `kv` are the whole layer's K (m x G·d) and V (m x G·d_v), `dims` = (d, d_v); the
/// problems' own K and V only give the shapes. Only for calls that [`decodes`] accepts.
#[cfg(feature = "half")]
pub(crate) fn attend_stored<T: Float, X: crate::simd::Stored<T> + nalgebra::Scalar>(
    problems: &[Problem<'_, T>],
    group: usize,
    (k, v): (nalgebra::DMatrixView<'_, X>, nalgebra::DMatrixView<'_, X>),
    (d, dv): (usize, usize),
    threads: Option<usize>,
) -> MultiHeadOutput<T> {
    let isa = Isa::get();
    let n = problems.first().map_or(0, |p| p.plan.n);
    let groups: Vec<Vec<&Problem<'_, T>>> =
        problems.chunks(group).map(|g| g.iter().collect()).collect();
    let one = |(gi, g): (usize, &Vec<&Problem<'_, T>>), exec: Exec| {
        let (kg, vg) = (k.columns(gi * d, d), v.columns(gi * dv, dv));
        // A row that overflowed: the reference's way on the group's K and V widened to T.
        let exact = |h: usize, i: usize| {
            let p = g[h];
            let (kw, vw) = (kg.map(|x| x.widen()), vg.map(|x| x.widen()));
            let wide = Problem {
                k: kw.as_view(),
                v: vw.as_view(),
                ..*p
            };
            forward::exact_row(&wide, i)
        };
        decode::decode(g, (kg, vg), &exact, isa, exec)
    };
    let results: Vec<Vec<(nalgebra::DMatrix<T>, nalgebra::DVector<T>)>> =
        with_threads(threads, |exec| {
            map(exec, groups.iter().enumerate().collect(), |x| one(x, exec))
        });
    MultiHeadOutput::from_heads(results, n, dv)
}

/// Whether [`attend`] scans the inputs itself for `rows` query rows per GQA group against `m`
/// keys: the tiled forward pass reads every entry of Q, K and V once as it packs them and
/// checks them there; the decode path does not (its caller scans Q, and K and V unless a
/// cache checked them on append).
pub(crate) fn scans_inputs(rows: usize, m: usize) -> bool {
    !decode::suits(rows, m)
}

/// Runs validated calls on the kernel: `problems` are the heads of an attention layer, in
/// groups of `group` consecutive heads that share K, V, the mask and the options (GQA; 1 for
/// independent heads). Returns the heads' outputs side by side and their log-sum-exps,
/// computed on `threads` as [`with_threads`] says, and whether the inputs were all finite
/// (always true where [`scans_inputs`] is false; else the results are meaningless when it
/// is false, and the caller reports the error).
///
/// A few query rows per group against many keys take the decode path (each group's keys read
/// once, split across threads); everything else the tiled forward pass, heads in parallel.
pub(crate) fn attend<T: Float>(
    problems: &[Problem<'_, T>],
    group: usize,
    threads: Option<usize>,
) -> (MultiHeadOutput<T>, bool) {
    let isa = Isa::get();
    let Some(first) = problems.first() else {
        return (MultiHeadOutput::from_heads(Vec::new(), 0, 0), true);
    };
    let (n, m, dv) = (first.plan.n, first.plan.m, first.plan.dv);
    if decode::suits(group * n, m) {
        let groups: Vec<Vec<&Problem<'_, T>>> =
            problems.chunks(group).map(|g| g.iter().collect()).collect();
        let results: Vec<Vec<(nalgebra::DMatrix<T>, nalgebra::DVector<T>)>> =
            with_threads(threads, |exec| {
                let one = |g: &Vec<&Problem<'_, T>>| {
                    let exact = |h: usize, i: usize| forward::exact_row(g[h], i);
                    decode::decode(g, (g[0].k, g[0].v), &exact, isa, exec)
                };
                map(exec, groups.iter().collect(), one)
            });
        return (MultiHeadOutput::from_heads(results, n, dv), true);
    }
    // One query tile in all runs on the calling thread alone: a helper could only pack V
    // while the caller packs K, less work than waking it costs. From two tiles on the split
    // pays now that the caller works too: n = 256 in f32 (three tiles) ran 1.28-1.32x faster
    // on two threads than on one (Zen 4), where moving the call onto a pool worker had made
    // it 0.89-0.91x. The calling thread computes the same bits.
    let threads = if problems.len() * tile_count::<T>(n) < 2 {
        Some(1)
    } else {
        threads
    };
    // K and V are packed once per key-value head and shared by its group's query heads; the
    // query tiles of all heads then run in one loop.
    with_threads(threads, |exec| {
        // Packing K and V side by side inside a head pays only with fewer heads than threads.
        let groups: Vec<&[Problem<'_, T>]> = problems.chunks(group).collect();
        let inner = if groups.len() >= exec.threads() {
            Exec::Inline
        } else {
            exec
        };
        let pack = |g: &[Problem<'_, T>]| forward::PackedKv::new(isa, &g[0], inner);
        let kvs: Vec<forward::PackedKv<T>> = map(exec, groups, pack);
        let jobs: Vec<(&Problem<'_, T>, &forward::PackedKv<T>)> = problems
            .iter()
            .enumerate()
            .map(|(h, p)| (p, &kvs[h / group]))
            .collect();
        forward::forward_many(&jobs, isa, exec)
    })
}

/// Runs one validated call on the tiled forward pass with the statistics of its weights
/// ([`AttentionStats`]). Few queries do not take the decode path here: the statistics are
/// accumulated by the tiled pass only (the same results to rounding).
pub(crate) fn attend_stats<T: Float>(
    p: &Problem<'_, T>,
    threads: Option<usize>,
) -> (AttentionOutput<T>, AttentionStats<T>) {
    let isa = Isa::get();
    // As in `attend`: one query tile runs on the calling thread.
    let threads = if tile_count::<T>(p.plan.n) < 2 {
        Some(1)
    } else {
        threads
    };
    let (output, lse, stats) = with_threads(threads, |exec| {
        let kv = forward::PackedKv::new(isa, p, exec);
        forward::forward_with_stats(p, &kv, isa, exec)
    });
    let out = AttentionOutput {
        output,
        lse,
        weights: None,
    };
    (out, stats)
}

#[cfg(test)]
mod tests {
    use super::block_work;
    use crate::Mask;

    /// All pairs of a full block, half of a partial one, none of an empty one.
    #[test]
    fn block_work_counts_the_pairs_a_block_computes() {
        let (causal, dims) = (Mask::causal(), (8, 8));
        assert_eq!(block_work(&causal, 4..8, 0..4, dims), 16);
        assert_eq!(block_work(&causal, 0..4, 0..4, dims), 8);
        assert_eq!(block_work(&causal, 0..4, 4..8, dims), 0);
        assert_eq!(block_work(&Mask::none(), 0..3, 0..5, dims), 15);
        assert_eq!(block_work(&causal, 2..2, 0..8, dims), 0);
    }
}
