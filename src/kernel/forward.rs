//! The tiled forward pass: online softmax over key tiles, one query tile at a time.
//!
//! See the [kernel module docs](super) for the design; this file follows it step by step.

use super::buffers::Buf;
use super::pack::{self, round_up};
use super::threads::{all, queued};
use super::{Exec, block_work, tile, tile_capacity, tile_count};
use crate::Float;
use crate::float::pow2;
use crate::mask::Block;
use crate::prelude::*;
use crate::simd::{self, Isa, Out, Panels, Rows, Shape};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::spec::{
    AttentionStats, MultiHeadOutput, Plan, Problem, clamp_entropy, convex_combination, raw_dot_row,
    row_stats, softmax_exact_row,
};
use nalgebra::{DMatrix, DVector};

/// K and V in the micro-kernel's layouts: packed once per key-value head and shared by the
/// query heads of its GQA group.
pub(crate) struct PackedKv<T: Float> {
    /// Kᵀ in panels of NR keys.
    kt: Buf<T>,
    /// V in panels of NR columns, `m_pad` rows each.
    v: Buf<T>,
    m_pad: usize,
    dv_pad: usize,
    /// Whether every entry of K and V is finite (scanned as they were packed).
    finite: bool,
}

impl<T: Float> PackedKv<T> {
    /// Packs the K and V of `p` (every problem of a group has the same), scanning them for
    /// non-finite entries on the way; K and V side by side on a pool's threads (one head's
    /// packing would otherwise run on one thread while the other waits: 0.2 ms of a
    /// two-thread n = 2048, d = 64 call that takes 8.4, on an Intel Xeon model 167).
    pub(crate) fn new(isa: Isa, p: &Problem<'_, T>, exec: Exec) -> Self {
        let m_pad = round_up(p.plan.m, T::NR);
        // Each layout with its own finiteness flag, so that the two can pack side by side.
        let scanned = |pack: &dyn Fn(Option<&mut bool>) -> Buf<T>| {
            let mut finite = true;
            (pack(Some(&mut finite)), finite)
        };
        let pack_k = || scanned(&|f| pack::panels_of_transpose(isa, &p.k, T::NR, f));
        let pack_v = || scanned(&|f| pack::panels(isa, &p.v, T::NR, m_pad, f));
        let mut packs = all(exec, &[&pack_k, &pack_v]).into_iter();
        let mut next = || packs.next().unwrap_or_else(|| (Buf::zeroed(0), false));
        let ((kt, k_finite), (v, v_finite)) = (next(), next());
        PackedKv {
            kt,
            v,
            m_pad,
            dv_pad: round_up(p.plan.dv, T::NR),
            finite: k_finite && v_finite,
        }
    }
}

/// Per-thread working memory for one query tile: O(BR·(BC + d + d_v)), independent of n and m.
/// The three tiles come from the kept buffers as they are (rayon makes a scratch per piece
/// of work it splits off, many per call, and clearing 120 KiB each time showed in profiles):
/// every entry is written before it is read.
struct Scratch<T: Float> {
    /// The tile's rows of Q · q_factor, column by column (element (i, t) at `t·BR + i`),
    /// rows padded with zeros to a multiple of MR: a copy of the tile's segment of each
    /// column of Q, no transpose (the micro-kernel reads A with any strides).
    q: Buf<T>,
    /// The score tile S, then the probability tile P (BR x BC, row-major).
    s: Buf<T>,
    /// The unnormalised output accumulator (BR x dv_pad), cleared by each tile.
    o: Buf<T>,
    /// Running maximum per row, in log₂ units.
    max: Vec<T>,
    /// Running sum per row: `Σ_j 2^(s_j − max)`.
    sum: Vec<T>,
    /// Per-row normalising factor `1 / sum` at the end.
    inv: Vec<T>,
    /// Per row: whether the mask allowed any key so far.
    seen: Vec<bool>,
    /// Per row: whether a raw product overflowed.
    overflow: Vec<bool>,
    /// With statistics only (else empty): a copy of one row's scores (BC, log₂ units).
    scores: Vec<T>,
    /// Per row: `u = Σ_j 2^(s_j − max) (s_j − max)`, log₂ units (see [`stats_step`]).
    u: Vec<T>,
    /// Per row: `sum − 1`, the sum without one instance of the maximum's `2^0`.
    excess: Vec<T>,
    /// Per row: the number of scores above −inf.
    support: Vec<usize>,
    /// The tile's key blocks: their class and the keys worth computing ([`trim`]).
    blocks: Vec<(Block, core::ops::Range<usize>)>,
    /// One strip's allowed columns per row ([`runs`]).
    runs: Vec<(usize, usize)>,
}

impl<T: Float> Scratch<T> {
    fn new(d: usize, dv_pad: usize, stats: bool) -> Self {
        // Room for a tile's most rows (see `tile_capacity`).
        let (br, bc) = (tile_capacity::<T>(), tile::<T>().1);
        let (sr, sc) = if stats { (br, bc) } else { (0, 0) };
        Scratch {
            // At least one column, so that a strip can slice its rows when d = 0.
            q: Buf::stale(d.max(1) * br),
            scores: vec![T::zero(); sc],
            u: vec![T::zero(); sr],
            excess: vec![T::zero(); sr],
            support: vec![0; sr],
            s: Buf::stale(br * bc),
            o: Buf::stale(br * dv_pad),
            max: vec![T::NEG_INFINITY; br],
            sum: vec![T::zero(); br],
            inv: vec![T::zero(); br],
            seen: vec![false; br],
            overflow: vec![false; br],
            blocks: Vec::new(),
            runs: Vec::new(),
        }
    }
}

/// The forward pass of several heads (each with the packed K and V of its key-value head),
/// all with the same n and d_v: their outputs side by side (n x H·d_v, head h in columns
/// h·d_v .. (h+1)·d_v) and log-sum-exps (n x H, natural log). The query tiles of all heads
/// are scheduled in one loop, with one scratch per thread, and write their rows straight
/// into the result. Also returns whether every entry of the inputs was finite: the pass scans
/// them as it reads them (Q tile by tile, K and V as they were packed), and with a
/// non-finite entry its results are meaningless and the caller reports the error.
pub(crate) fn forward_many<T: Float>(
    jobs: &[(&Problem<'_, T>, &PackedKv<T>)],
    isa: Isa,
    exec: Exec,
) -> (MultiHeadOutput<T>, bool) {
    let (layer, _, finite) = run::<T, false>(jobs, isa, exec);
    (layer, finite)
}

/// Runs the forward pass of one head: the output (n x d_v) and the per-row log-sum-exp.
#[cfg(test)]
pub(crate) fn forward<T: Float>(
    p: &Problem<'_, T>,
    kv: &PackedKv<T>,
    isa: Isa,
    exec: Exec,
) -> (DMatrix<T>, DVector<T>) {
    run::<T, false>(&[(p, kv)], isa, exec).0.into_head()
}

/// The forward pass of one head with the per-row statistics of its weights
/// ([`AttentionStats`]), accumulated in the same pass (see [`stats_step`]); the output and
/// log-sum-exp are the same bits as without them.
pub(crate) fn forward_with_stats<T: Float>(
    p: &Problem<'_, T>,
    kv: &PackedKv<T>,
    isa: Isa,
    exec: Exec,
) -> (DMatrix<T>, DVector<T>, AttentionStats<T>) {
    let (layer, mut stats, _) = run::<T, true>(&[(p, kv)], isa, exec);
    let (output, lse) = layer.into_head();
    let [max_logit, entropy, max_prob] = stats.swap_remove(0).map(DVector::from_vec);
    let stats = AttentionStats {
        max_logit,
        entropy,
        max_prob,
    };
    (output, lse, stats)
}

/// One tile's rows of the three statistics (empty slices when they are not computed).
type StatRows<'a, T> = [&'a mut [T]; 3];

/// One query tile of one head: the head, the tile's first row, and where its rows go (the
/// tile's segment of every output column of its head, of the lse and of the statistics).
struct TileJob<'a, T> {
    head: usize,
    q0: usize,
    out: Vec<&'a mut [T]>,
    lse: &'a mut [T],
    stats: StatRows<'a, T>,
}

/// The forward pass of every head of `jobs` (one n and one d_v for all); with `STATS` it also
/// fills each head's three statistics (max logit, entropy, max probability; each of length n,
/// else empty). A compile-time choice: without it the statistics code is not in the loop at
/// all. The last result says whether every input entry was finite (see [`forward_many`]).
fn run<T: Float, const STATS: bool>(
    jobs: &[(&Problem<'_, T>, &PackedKv<T>)],
    isa: Isa,
    exec: Exec,
) -> (MultiHeadOutput<T>, Vec<[Vec<T>; 3]>, bool) {
    let (n, dv) = jobs.first().map_or((0, 0), |(p, _)| (p.plan.n, p.plan.dv));
    debug_assert!(jobs.iter().all(|(p, _)| (p.plan.n, p.plan.dv) == (n, dv)));
    // The result is column-major, so head h's n x d_v block is one contiguous run of it, and
    // a query tile of rows q0 .. q0 + r owns that segment of each of its head's columns (and
    // of its lse column): the tiles write their rows in place, in parallel.
    let heads = jobs.len();
    let mut layer = MultiHeadOutput {
        output: pack::zeros(n, heads * dv),
        lse: pack::zeros(n, heads),
    };
    let sn = if STATS { n } else { 0 };
    let mut stats: Vec<[Vec<T>; 3]> = (0..heads)
        .map(|_| {
            [
                vec![T::NEG_INFINITY; sn],
                vec![T::zero(); sn],
                vec![T::zero(); sn],
            ]
        })
        .collect();
    let mut tiles: Vec<TileJob<'_, T>> = Vec::new();
    if n > 0 {
        let rows = tile_rows::<T>(n, heads, exec.threads());
        let mut columns = layer.output.as_mut_slice().chunks_mut(n);
        let lse_columns = layer.lse.as_mut_slice().chunks_mut(n);
        for (head, (lse, [a, b, c])) in lse_columns.zip(&mut stats).enumerate() {
            let first = tiles.len();
            let pieces = cut(lse, &rows).zip(cut(a, &rows).zip(cut(b, &rows).zip(cut(c, &rows))));
            let mut q0 = 0;
            for (l, (a, (b, c))) in pieces {
                let r = l.len();
                tiles.push(TileJob {
                    head,
                    q0,
                    out: Vec::with_capacity(dv),
                    lse: l,
                    stats: [a, b, c],
                });
                q0 += r;
            }
            for column in columns.by_ref().take(dv) {
                for (tile, segment) in tiles[first..].iter_mut().zip(cut(column, &rows)) {
                    tile.out.push(segment);
                }
            }
        }
    }
    let dv_pad = jobs.iter().map(|(_, kv)| kv.dv_pad).max().unwrap_or(0);
    let d = jobs.iter().map(|(p, _)| p.plan.d).max().unwrap_or(0);
    let finite = AtomicBool::new(jobs.iter().all(|(_, kv)| kv.finite));
    let one = |scratch: &mut Scratch<T>, t: TileJob<'_, T>| {
        let (p, kv) = jobs[t.head];
        // Once an input is known not to be finite the results are discarded: skip the rest.
        if finite.load(Ordering::Relaxed)
            && !query_tile::<T, STATS>(p, kv, isa, t.q0, t.out, t.lse, t.stats, scratch)
        {
            finite.store(false, Ordering::Relaxed);
        }
    };
    // Head by head (the threads share its K and V while they are in cache), each head's
    // largest tiles first: the threads end together.
    let order = |t: &TileJob<'_, T>| {
        let cost = tile_cost(jobs[t.head].0, t.q0, t.lse.len());
        (t.head, core::cmp::Reverse(cost))
    };
    queued(exec, tiles, order, || Scratch::new(d, dv_pad, STATS), one);
    (layer, stats, finite.into_inner())
}

/// The work of the query tile of `rows` rows from `q0` of `p` (see [`block_work`]).
fn tile_cost<T: Float>(p: &Problem<'_, T>, q0: usize, rows: usize) -> usize {
    let (Plan { n, m, .. }, bc) = (p.plan, tile::<T>().1);
    let block = |k0: usize| block_work(p.mask, q0..q0 + rows, k0..(k0 + bc).min(m), (n, m));
    (0..m).step_by(bc).map(block).sum()
}

/// The row counts of each head's query tiles (n rows in all): [`tile_count`] tiles, or, where
/// the call's tiles, `heads` times as many, are few (under 8 a thread) and do not split
/// evenly over `threads` threads, a few more, as many as make the count a multiple of the
/// threads; the MR-row strips dealt out among them as evenly as they go (a dense n = 1024 in
/// f32 on two threads: 12 tiles of 84-90 rows, not 11 of 96, one thread's sixth while the
/// other idles). The result does not depend on the tiles (see the kernel guide), only the
/// time.
fn tile_rows<T: Float>(n: usize, heads: usize, threads: usize) -> Vec<usize> {
    let (cap, mr) = (tile_capacity::<T>(), T::MR);
    let mut count = tile_count::<T>(n);
    if threads > 1 && heads * count < 8 * threads {
        while !(heads * count).is_multiple_of(threads) {
            count += 1;
        }
    }
    let strips = n.div_ceil(mr);
    let count = count.min(strips).max(1);
    let (each, extra) = (strips / count, strips % count);
    let mut left = n;
    (0..count)
        .map(|t| {
            let r = ((each + usize::from(t < extra)) * mr).min(left);
            debug_assert!(r <= cap);
            left -= r;
            r
        })
        .collect()
}

/// `s` cut into consecutive pieces of the lengths `lens` (empty pieces where `s` runs out:
/// the statistics are empty without `STATS`).
fn cut<'s, X>(mut s: &'s mut [X], lens: &[usize]) -> impl Iterator<Item = &'s mut [X]> {
    lens.iter().map(move |&l| {
        let whole = core::mem::take(&mut s);
        let (head, rest) = whole.split_at_mut(l.min(whole.len()));
        s = rest;
        head
    })
}

/// Rows `q0 .. q0 + lse.len()` of the output (`out[c]`: the tile's segment of column c)
/// and of the log-sum-exp. The arithmetic depends only on the tile, never on the thread, so
/// the result is the same bits for any thread count.
/// With `STATS`, `stats` gets the tile's rows of the statistics.
#[allow(clippy::too_many_arguments)]
fn query_tile<T: Float, const STATS: bool>(
    p: &Problem<'_, T>,
    kv: &PackedKv<T>,
    isa: Isa,
    q0: usize,
    mut out: Vec<&mut [T]>,
    lse: &mut [T],
    stats: StatRows<'_, T>,
    scr: &mut Scratch<T>,
) -> bool {
    let Plan { n, m, d, dv, .. } = p.plan;
    let (cap, bc, mr, nr) = (tile_capacity::<T>(), tile::<T>().1, T::MR, T::NR);
    let rows = lse.len();
    let rows_pad = round_up(rows, mr);
    let dv_pad = kv.dv_pad;
    // The tile's Q, scaled: the real rows only, as padded rows must stay zero (their P must
    // be 0, and a factor that overflowed to inf would make them NaN).
    let factor = q_factor(&p.plan);
    let segment = |t: usize| &pack::column(&p.q, t)[q0..q0 + rows];
    // The segments are n apart (column-major Q): hint them all first, so that their lines
    // arrive together, then one pass scans, scales and pads them. Measured on an Intel Xeon
    // (model 167): without the hints the fused pass took 1.6x the time of a scan followed by
    // copies at n = 2048, d = 128 (the scan's loads keep more misses in flight); with them it
    // takes the same there, and on 16 heads of n = 128 this setup costs 0.12-0.15 ms a call
    // against 0.15-0.17 for the scan and the per-column copies (one dispatch, not 3·d).
    (0..d).for_each(|t| simd::prefetch(segment(t)));
    let finite = factor.apply_into(isa, (0..d).map(segment), &mut scr.q, (cap, rows_pad));
    if !finite {
        return false; // the caller reports the error; nothing of this tile is used
    }
    scr.o[..rows_pad * dv_pad].fill(T::zero());
    scr.max[..rows].fill(T::NEG_INFINITY);
    scr.sum[..rows].fill(T::zero());
    scr.seen[..rows].fill(false);
    scr.overflow[..rows].fill(false);
    if STATS {
        scr.u[..rows].fill(T::zero());
        scr.excess[..rows].fill(T::zero());
        scr.support[..rows].fill(0);
    }
    debug_assert!(rows <= cap);

    let blocks = (0..m)
        .step_by(bc)
        .map(|kb| trim(p.mask, q0..q0 + rows, kb..kb + bc.min(m - kb), (n, m), nr));
    scr.blocks.clear();
    scr.blocks.extend(blocks);
    // The tile's output segments are cold and n apart (see `simd::prefetch`): fetch them
    // while the last block that computes anything runs.
    let last = scr.blocks.iter().rposition(|(b, _)| *b != Block::Empty);
    let step = strip_rows::<T>(isa);
    for at in 0..scr.blocks.len() {
        let (block, keys) = scr.blocks[at].clone();
        if Some(at) == last {
            out.iter().for_each(|segment| simd::prefetch(segment));
        }
        match block {
            Block::Empty => {}
            Block::Full => strip::<T, STATS>(p, kv, isa, q0, (0, rows, rows_pad), keys, block, scr),
            // A partial block (the diagonal of a causal mask, the edges of a window) goes a
            // register block of rows at a time (12 on AVX-512, 6 elsewhere), each strip of
            // rows over the keys its own rows can see: the products, the softmax and P · V
            // skip the rest (a causal diagonal block of 96 rows in strips of 6 computes 69%
            // of its scores, not all). The keys a strip adds for its other rows are masked
            // for this one: its result does not depend on the strip's height.
            Block::Partial => {
                for i0 in (0..rows).step_by(step) {
                    let i1 = (i0 + step).min(rows);
                    let (class, cut) = trim(p.mask, q0 + i0..q0 + i1, keys.clone(), (n, m), nr);
                    if class != Block::Empty {
                        let i_pad = i0 + round_up(i1 - i0, mr);
                        strip::<T, STATS>(p, kv, isa, q0, (i0, i1, i_pad), cut, class, scr);
                    }
                }
            }
        }
    }

    // Normalise: row r of the output is O_r / ℓ_r. First the per-row factors (0 for a fully
    // masked row, whose O_r is 0), then the output one column segment at a time: the
    // segments of one tile are n apart in memory, so writing them row by row would thrash
    // the cache sets.
    let mut exact = Vec::new();
    let [st_max, st_h, st_p] = stats;
    for (r, l) in lse.iter_mut().enumerate() {
        match row_end(scr.max[r], scr.sum[r], scr.seen[r]) {
            // The unnormalised accumulator can overflow where the output cannot (values near
            // the float's maximum): such a row is recomputed with normalised weights.
            RowEnd::Normal { .. }
                if scr.overflow[r]
                    || !simd::all_finite(isa, &scr.o[r * dv_pad..r * dv_pad + dv]) =>
            {
                scr.inv[r] = T::zero();
                exact.push(r);
            }
            RowEnd::Normal { inv, lse } => {
                (scr.inv[r], *l) = (inv, lse);
                if STATS {
                    let ln2 = T::of_f64(core::f64::consts::LN_2);
                    let (u, excess) = (scr.u[r], scr.excess[r]);
                    let h = excess.ln_1p() - ln2 * u / (T::one() + excess);
                    st_max[r] = scr.max[r] * ln2;
                    st_h[r] = clamp_entropy(h, scr.support[r]);
                    st_p[r] = inv;
                }
            }
            RowEnd::Masked => (scr.inv[r], *l) = (T::zero(), T::NEG_INFINITY),
            RowEnd::Exact => {
                scr.inv[r] = T::zero();
                exact.push(r);
            }
        }
    }
    if dv > 0 {
        let o = &mut scr.o[..rows * dv_pad];
        for (row, &inv) in o.chunks_mut(dv_pad).zip(&scr.inv) {
            simd::scale_row(isa, &mut row[..dv], inv);
        }
        let o_rows: Vec<&[T]> = o.chunks(dv_pad).collect();
        simd::transpose(isa, &o_rows, &mut out);
    }
    for r in exact {
        let (row, l, st) = exact_row_impl::<T, STATS>(p, q0 + r);
        for (column, x) in out.iter_mut().zip(row) {
            column[r] = x;
        }
        lse[r] = l;
        if STATS {
            [st_max[r], st_h[r], st_p[r]] = st;
        }
    }
    true
}

/// The height of a partial block's strips: the micro-kernel's register block
/// ([`simd::block_rows`]); tests may set another multiple of MR (the results must not change).
fn strip_rows<T: Float>(isa: Isa) -> usize {
    #[cfg(test)]
    if let Some(rows) = tests::STRIP_ROWS.with(|c| c.get()) {
        return rows;
    }
    simd::block_rows::<T>(isa)
}

/// One online-softmax step of the tile's rows `i0 .. i1` (padded to `i_pad`, a multiple of
/// MR past `i0`) over `keys` (starting on a panel boundary), of class `block`: S = Q Kᵀ for
/// those rows and keys, the scores finished and folded into the running maximum and sum
/// ([`online_step`]), then O += P · V over the same keys. Padded rows have zero Q, so S = 0
/// there and they take no softmax step: their P stays 0.
#[allow(clippy::too_many_arguments)]
fn strip<T: Float, const STATS: bool>(
    p: &Problem<'_, T>,
    kv: &PackedKv<T>,
    isa: Isa,
    q0: usize,
    (i0, i1, i_pad): (usize, usize, usize),
    keys: core::ops::Range<usize>,
    block: Block,
    scr: &mut Scratch<T>,
) {
    let (Plan { d, dv, .. }, cap, bc, nr) = (p.plan, tile_capacity::<T>(), tile::<T>().1, T::NR);
    let dv_pad = kv.dv_pad;
    let (k0, cols) = (keys.start, keys.len());
    let cols_pad = round_up(cols, nr);
    simd::gemm(
        isa,
        Shape {
            rows: i_pad - i0,
            ncols: cols_pad,
            k: d,
            accumulate: false,
        },
        Rows::transposed(&scr.q[i0..], cap),
        Panels::new(&kv.kt[(k0 / nr) * d * nr..], d * nr),
        Out::new(&mut scr.s[i0 * bc..], bc),
    );
    // The common case in one dispatch: scores that need nothing but the mask, allowed keys
    // in one run per row (every mask but a closure's), no statistics.
    #[cfg(test)]
    let by_row = tests::ROW_BY_ROW.with(|c| c.get());
    #[cfg(not(test))]
    let by_row = false;
    let simple = !STATS && !by_row && p.plan.softcap.is_none() && !p.biased();
    let fused = simple && runs(p, (q0 + i0, q0 + i1), k0, cols, block, &mut scr.runs);
    if fused {
        simd::online_rows(
            isa,
            simd::ScoreRows {
                s: &mut scr.s[i0 * bc..],
                stride: bc,
                cols,
                pad: cols_pad,
                runs: &scr.runs,
                max: &mut scr.max[i0..i1],
                sum: &mut scr.sum[i0..i1],
                seen: &mut scr.seen[i0..i1],
                overflow: &mut scr.overflow[i0..i1],
                o: &mut scr.o[i0 * dv_pad..],
                o_stride: dv_pad,
            },
        );
    } else {
        for r in i0..i1 {
            let row = &mut scr.s[r * bc..r * bc + cols_pad];
            let seen = finish_scores(
                p,
                isa,
                q0 + r,
                k0,
                &mut row[..cols],
                block == Block::Partial,
            );
            scr.seen[r] |= seen.seen;
            scr.overflow[r] |= seen.overflow;
            row[cols..].fill(T::NEG_INFINITY);
            let m_old = scr.max[r];
            if STATS {
                scr.scores[..cols].copy_from_slice(&row[..cols]);
            }
            simd::online_step(
                isa,
                (row, seen.max),
                &mut scr.max[r],
                &mut scr.sum[r],
                &mut scr.o[r * dv_pad..(r + 1) * dv_pad],
            );
            if STATS {
                stats_step(
                    &scr.scores[..cols],
                    &row[..cols],
                    m_old,
                    scr.max[r],
                    &mut scr.u[r],
                    &mut scr.excess[r],
                    &mut scr.support[r],
                );
            }
        }
    }
    if dv > 0 {
        // O += P · V over these keys.
        simd::gemm(
            isa,
            Shape {
                rows: i_pad - i0,
                ncols: dv_pad,
                k: cols_pad,
                accumulate: true,
            },
            Rows::new(&scr.s[i0 * bc..], bc),
            Panels::new(&kv.v[k0 * nr..], kv.m_pad * nr),
            Out::new(&mut scr.o[i0 * dv_pad..], dv_pad),
        );
    }
}

/// Each row's allowed columns `a .. b` of the block (keys `k0 .. k0 + cols`, class `block`)
/// into `out`, one per row of `rows`; `false` (and `out` cleared) if some row's allowed keys
/// are not one run (a closure mask), which [`finish_scores`] handles key by key.
fn runs(
    p: &Problem<'_, impl Float>,
    rows: (usize, usize),
    k0: usize,
    cols: usize,
    block: Block,
    out: &mut Vec<(usize, usize)>,
) -> bool {
    out.clear();
    if block != Block::Partial {
        out.extend((rows.0..rows.1).map(|_| (0, cols)));
        return true;
    }
    let (n, m) = (p.plan.n, p.plan.m);
    for i in rows.0..rows.1 {
        match p.mask.row_run(i, k0..k0 + cols, n, m) {
            Some(run) => out.push((run.start - k0, run.end - k0)),
            None => {
                out.clear();
                return false;
            }
        }
    }
    true
}

/// The class of the block `rows` x `keys` and the keys worth computing: a partial block
/// loses the runs of `nr` keys at either end that the mask rules out for every row (a causal
/// tile's keys past its last row, a sliding window's keys before its first), so the products
/// skip them; the start stays a multiple of `nr` (a panel boundary) if `keys.start` is one.
/// The trimmed block is classified again (it may have become full).
fn trim(
    mask: &crate::Mask,
    rows: core::ops::Range<usize>,
    keys: core::ops::Range<usize>,
    (n, m): (usize, usize),
    nr: usize,
) -> (Block, core::ops::Range<usize>) {
    let class = |k: core::ops::Range<usize>| mask.classify(rows.clone(), k, n, m);
    let block = class(keys.clone());
    if block != Block::Partial {
        return (block, keys);
    }
    let (mut lo, mut hi) = (keys.start, keys.end);
    while hi - lo > nr && class(lo..lo + nr) == Block::Empty {
        lo += nr;
    }
    loop {
        let last = lo + (hi - lo - 1) / nr * nr;
        if last == lo || class(last..hi) != Block::Empty {
            break;
        }
        hi = last;
    }
    if (lo, hi) == (keys.start, keys.end) {
        return (block, keys);
    }
    (class(lo..hi), lo..hi)
}

/// The statistics' part of one online-softmax step for one row (see [`AttentionStats`]):
/// `s` the row's scores (log₂ units, −inf where masked) and `p` what [`online_step`] made of
/// them, `2^(s − m_new)`, with the running maximum moved from `m_old` to `m_new`. Keeps, in
/// log₂ units, `u = Σ_j 2^(s_j − max)(s_j − max) <= 0` and `excess = Σ_j 2^(s_j − max) − 1
/// >= 0` (the sum without one instance of the maximum's exact 1, so that a nearly one-hot
/// row keeps its tiny `ln(1 + excess)` instead of rounding `1 + tiny` to 1), rescaled when the
/// maximum moves by `α = 2^(m_old − m_new)`:
///
/// ```text
/// u ← α (u + (m_old − m_new)(1 + excess)) + Σ_tile p_j (s_j − m_new)
/// excess ← α (1 + excess) − 1 + Σ_tile p_j      (the −1 taken by the new maximum's own p = 1)
/// ```
///
/// Every term of each sum has one sign, so nothing cancels. `support` counts the scores above
/// −inf.
#[inline]
fn stats_step<T: Float>(
    s: &[T],
    p: &[T],
    m_old: T,
    m_new: T,
    u: &mut T,
    excess: &mut T,
    support: &mut usize,
) {
    if m_new == T::NEG_INFINITY {
        return; // nothing allowed so far
    }
    let moved = m_new > m_old;
    let (mut tu, mut te, mut skip) = (T::zero(), T::zero(), moved);
    for (&sj, &pj) in s.iter().zip(p) {
        if sj == T::NEG_INFINITY {
            continue;
        }
        *support += 1;
        if pj != T::zero() {
            // (A weight that underflowed to 0 adds nothing, even where s_j − max itself
            // overflows to −inf: scores of ±1e38 in one row; 0 · −inf would be NaN.)
            tu += pj * (sj - m_new);
        }
        if skip && sj == m_new {
            skip = false; // the new maximum: its p is the 1 that `excess` leaves out
        } else {
            te += pj;
        }
    }
    if !moved {
        *u += tu;
        *excess += te;
        return;
    }
    let alpha = if m_old == T::NEG_INFINITY {
        T::zero()
    } else {
        (m_old - m_new).exp2()
    };
    if alpha == T::zero() {
        // The old terms vanish (and (m_old − m_new)·ℓ may be −inf).
        (*u, *excess) = (tu, te);
    } else {
        let l = T::one() + *excess;
        *u = alpha * (*u + (m_old - m_new) * l) + tu;
        *excess = alpha * l + te;
    }
}

/// The factor packed into Q. Without a softcap the whole chain up to exp is linear in q:
/// folding `scale·log₂e` into Q once makes every score leave the product in log₂ units, ready
/// for exp2. With a softcap the products stay in natural units (see [`finish_scores`]).
pub(super) fn q_factor<T: Float>(plan: &Plan<T>) -> QFactor<T> {
    let raw = match plan.softcap {
        None => plan.scale * T::of_f64(core::f64::consts::LOG2_E),
        Some(_) => plan.scale,
    };
    if raw == T::zero() || raw.abs() >= pow2::<T>(2 - T::MAX_EXP) {
        return QFactor {
            factor: raw,
            post: T::one(),
        };
    }
    // A subnormal factor has only a few bits (scale 4e-45 in f32 is 3 · 2^−149, and
    // scale·log₂e rounds to 4 · 2^−149): take it 2^64 times larger, where it is normal, and
    // multiply by 2^−64 after, so that `q · factor` is rounded once, as the exact product.
    let big = plan.scale * pow2::<T>(64);
    QFactor {
        factor: match plan.softcap {
            None => big * T::of_f64(core::f64::consts::LOG2_E),
            Some(_) => big,
        },
        post: pow2(-64),
    }
}

/// The factor of [`q_factor`]: `q ↦ (q · factor) · post`, with `post` = 1 unless the factor
/// alone would be subnormal.
#[derive(Clone, Copy)]
pub(super) struct QFactor<T> {
    factor: T,
    post: T,
}

impl<T: Float> QFactor<T> {
    /// `q` times the factor.
    #[inline]
    pub(super) fn apply(self, q: T) -> T {
        (q * self.factor) * self.post
    }

    /// [`apply`](Self::apply) to every entry of the columns `q` (the same bits, a vector at
    /// a time): column t into `dst[t·stride ..]`, zeros after it up to `pad` entries; returns
    /// whether every entry of `q` is finite. One pass over the tile's Q
    /// ([`simd::scale_parts_into`]).
    pub(super) fn apply_into<'a>(
        self,
        isa: Isa,
        q: impl Iterator<Item = &'a [T]>,
        dst: &mut [T],
        (stride, pad): (usize, usize),
    ) -> bool {
        simd::scale_parts_into(isa, q, (self.factor, self.post), dst, (stride, pad))
    }
}

/// How a row ends, from its running maximum (log₂ units) and sum.
pub(super) enum RowEnd<T> {
    /// The output row is `O / sum`; `lse` in natural units.
    Normal { inv: T, lse: T },
    /// No allowed key: output 0, lse −inf.
    Masked,
    /// A score overflowed to ±inf or NaN (finite inputs whose products exceed the range), or
    /// every allowed score left the float range downwards: the row is recomputed exactly as
    /// the reference does, by [`exact_row`].
    Exact,
}

/// See [`RowEnd`]; `seen` says whether the mask allowed any key of the row.
pub(super) fn row_end<T: Float>(max: T, sum: T, seen: bool) -> RowEnd<T> {
    if sum > T::zero() && sum.is_finite() && max.is_finite() {
        let lse = (max + sum.log2()) * T::of_f64(core::f64::consts::LN_2);
        RowEnd::Normal {
            inv: T::one() / sum,
            lse,
        }
    } else if sum == T::zero() && !seen {
        RowEnd::Masked
    } else {
        RowEnd::Exact
    }
}

/// Turns the raw products of one row of a tile into final scores in log₂ units: softcap,
/// bias, and (in a partial tile) the mask.
///
/// Returns what the row needs to know: whether the mask allows any key of it here (a row
/// whose scores all end at −inf although the mask allows keys has hit the float range, a
/// bias of −3e38, not a fully masked row), and whether a raw product left the float range
/// (finite inputs, an infinite dot product: fused multiply-adds turn `+inf − inf` into ±inf,
/// and a −inf would pass for a mask). Either way the row is recomputed exactly
/// (see [`row_end`]).
pub(super) fn finish_scores<T: Float>(
    p: &Problem<'_, T>,
    isa: Isa,
    i: usize,
    k0: usize,
    row: &mut [T],
    partial: bool,
) -> Scores<T> {
    if p.plan.softcap.is_none() && !p.biased() {
        if !partial {
            // Nothing changes the raw products: one pass finds their overflow and their
            // maximum.
            let (finite, max) = simd::finite_max(isa, row);
            return Scores {
                seen: !row.is_empty(),
                overflow: !finite,
                max: Some(max),
            };
        }
        let (n, m) = (p.plan.n, p.plan.m);
        if let Some(run) = p.mask.row_run(i, k0..k0 + row.len(), n, m) {
            // The allowed keys are one run: mask the rest, then one pass over the run finds
            // the overflow of the products that count and their maximum.
            let (a, b) = mask_outside(row, k0, &run);
            if a == b {
                return Scores {
                    seen: false,
                    overflow: false,
                    max: Some(T::NEG_INFINITY),
                };
            }
            let (finite, max) = simd::finite_max(isa, &row[a..b]);
            return Scores {
                seen: true,
                overflow: !finite,
                max: Some(max),
            };
        }
    }
    let overflow = !simd::all_finite(isa, row);
    Scores {
        seen: mask_scores(p, i, k0, row, partial),
        overflow,
        max: None,
    }
}

/// What [`finish_scores`] learnt about a row.
#[derive(Clone, Copy)]
pub(super) struct Scores<T> {
    /// The mask allows some key of the row in this block.
    pub seen: bool,
    /// A raw product was not finite.
    pub overflow: bool,
    /// The row's maximum score, where the scan found it (a full block's raw products, which
    /// nothing changes); for [`online_step`].
    pub max: Option<T>,
}

/// Sets to −inf every score of `row` (keys `k0 ..`) outside the allowed keys `run`; returns
/// the run's bounds within the row.
fn mask_outside<T: Float>(
    row: &mut [T],
    k0: usize,
    run: &core::ops::Range<usize>,
) -> (usize, usize) {
    let (a, b) = (run.start - k0, run.end - k0);
    row[..a].fill(T::NEG_INFINITY);
    row[b..].fill(T::NEG_INFINITY);
    (a, b)
}

/// Softcap, bias and mask of [`finish_scores`]; returns whether the mask allows any key.
fn mask_scores<T: Float>(
    p: &Problem<'_, T>,
    i: usize,
    k0: usize,
    row: &mut [T],
    partial: bool,
) -> bool {
    let log2e = T::of_f64(core::f64::consts::LOG2_E);
    match (p.plan.softcap, p.biased()) {
        (None, false) => {}
        (None, true) => {
            for (j, x) in row.iter_mut().enumerate() {
                *x += p.bias_at(i, k0 + j).unwrap_or(T::zero()) * log2e;
            }
        }
        (Some(c), _) => {
            // The products are in natural units here: cap, add the bias, then convert.
            for (j, x) in row.iter_mut().enumerate() {
                let bias = p.bias_at(i, k0 + j).unwrap_or(T::zero());
                *x = (c * (*x / c).tanh() + bias) * log2e;
            }
        }
    }
    if !partial {
        return !row.is_empty();
    }
    let (n, m) = (p.plan.n, p.plan.m);
    match p.mask.row_run(i, k0..k0 + row.len(), n, m) {
        // The common case (causal, window, prefix, padding and their intersections): the
        // allowed keys are one run, so mask everything outside it.
        Some(run) => {
            mask_outside(row, k0, &run);
            !run.is_empty()
        }
        None => {
            let mut any = false;
            for (j, x) in row.iter_mut().enumerate() {
                if p.mask.allows_in(n, m, i, k0 + j) {
                    any = true;
                } else {
                    *x = T::NEG_INFINITY;
                }
            }
            any
        }
    }
}

/// Row i the reference's way (its scores, [`logsumexp`], [`softmax_in_place`]): the output
/// row and the log-sum-exp. Only reached when a score is not finite.
pub(super) fn exact_row<T: Float>(p: &Problem<'_, T>, i: usize) -> (Vec<T>, T) {
    let (out, lse, _) = exact_row_impl::<T, false>(p, i);
    (out, lse)
}

/// [`exact_row`]; with `STATS` also the row's statistics from its weights ([`row_stats`]:
/// max logit, entropy, max probability), else zeros.
fn exact_row_impl<T: Float, const STATS: bool>(
    p: &Problem<'_, T>,
    i: usize,
) -> (Vec<T>, T, [T; 3]) {
    let Plan { n, m, dv, .. } = p.plan;
    let mut row = raw_dot_row(&p.q, i, &p.k, p.plan.scale);
    for (j, s) in row.iter_mut().enumerate() {
        *s = if p.mask.allows_in(n, m, i, j) {
            p.plan.finish(*s, p.bias_at(i, j))
        } else {
            T::NEG_INFINITY
        };
    }
    let (max_score, support) = if STATS {
        let max = row
            .iter()
            .fold(T::NEG_INFINITY, |a, &s| if s > a { s } else { a });
        let support = (0..m)
            .filter(|&j| p.mask.allows_in(n, m, i, j) && p.bias_at(i, j) != Some(T::NEG_INFINITY))
            .count();
        (max, support)
    } else {
        (T::NEG_INFINITY, 0)
    };
    let lse = softmax_exact_row(
        &p.plan,
        &p.q,
        i,
        &p.k,
        &mut row,
        |j| p.mask.allows_in(n, m, i, j),
        |j| p.bias_at(i, j),
    );
    let stats = if STATS {
        row_stats(max_score, &row, lse, support)
    } else {
        [T::zero(); 3]
    };
    let out = (0..dv).map(|c| convex_combination(&row, &p.v, c)).collect();
    (out, lse, stats)
}

#[cfg(test)]
mod tests {
    //! The portable path and the vector path against the reference, and against each other;
    //! the public behaviour is tested in `tests/kernel.rs`.

    use super::*;
    use crate::attention::scaled_attention_reference;
    use crate::mask::Mask;
    use crate::spec::{AttentionOptions, plan};
    use rand::{RngExt, SeedableRng};

    /// Tiles cover the rows in order, each at most `tile_capacity` rows and a whole number of
    /// MR-row strips (but the last), and with few tiles their count is a multiple of the
    /// threads.
    #[test]
    fn tile_rows_cover_the_queries_evenly() {
        fn check<T: Float>() {
            let (cap, mr) = (tile_capacity::<T>(), T::MR);
            for n in [1, 5, 6, 7, 95, 96, 97, 128, 500, 1024, 2048, 5000] {
                for heads in [1, 2, 3, 16] {
                    for threads in [1, 2, 3, 4] {
                        let rows = tile_rows::<T>(n, heads, threads);
                        assert_eq!(rows.iter().sum::<usize>(), n);
                        assert!(rows.iter().all(|&r| r > 0 && r <= cap));
                        let last = rows.len() - 1;
                        assert!(rows[..last].iter().all(|r| r % mr == 0));
                        let plain = tile_count::<T>(n);
                        if threads == 1 {
                            assert_eq!(rows.len(), plain);
                        } else if heads * plain < 8 * threads && rows.len() < n.div_ceil(mr) {
                            assert_eq!(heads * rows.len() % threads, 0, "{n} {heads} {threads}");
                        }
                        let (lo, hi) = (rows[..last].iter().min(), rows.iter().max());
                        if let (Some(lo), Some(hi)) = (lo, hi) {
                            assert!(hi - lo <= mr, "{rows:?}");
                        }
                    }
                }
            }
            assert_eq!(
                tile_rows::<T>(1024, 1, 2).len(),
                tile_count::<T>(1024).next_multiple_of(2)
            );
        }
        check::<f32>();
        check::<f64>();
    }

    /// Trimming never drops an allowed pair, keeps panel boundaries, drops the empty runs
    /// it should, and classifies what is left as the mask does.
    #[test]
    fn trim_keeps_every_allowed_pair() {
        let (n, m, nr) = (300, 520, 32);
        let masks = [
            Mask::causal(),
            Mask::causal_bottom_right(),
            Mask::sliding_window(40),
            Mask::prefix_lm(50),
            Mask::key_padding(300).and(Mask::causal()),
            Mask::sliding_window(10).or(Mask::prefix_lm(5)),
            Mask::from_fn(|i, j| (i + j) % 7 == 0),
        ];
        for mask in &masks {
            for q0 in (0..n).step_by(96) {
                let rows = q0..(q0 + 96).min(n);
                for k0 in (0..m).step_by(256) {
                    let keys = k0..(k0 + 256).min(m);
                    let (block, kept) = trim(mask, rows.clone(), keys.clone(), (n, m), nr);
                    assert_eq!(block, mask.classify(rows.clone(), kept.clone(), n, m));
                    assert!(kept.start % nr == 0 && kept.start >= keys.start);
                    assert!(kept.end <= keys.end);
                    for i in rows.clone() {
                        for j in keys.clone() {
                            if mask.allows_in(n, m, i, j) {
                                assert!(kept.contains(&j), "{mask} ({i}, {j}) {kept:?}");
                            }
                        }
                    }
                }
            }
        }
        // A causal tile's keys past its last row, a window's keys before its first.
        let t = |mask: &Mask, rows, keys| trim(mask, rows, keys, (n, m), nr);
        assert_eq!(t(&Mask::causal(), 0..96, 0..256), (Block::Partial, 0..96));
        assert_eq!(
            t(&Mask::causal(), 96..192, 0..256),
            (Block::Partial, 0..192)
        );
        assert_eq!(
            t(&Mask::sliding_window(10), 200..296, 0..256),
            (Block::Partial, 160..256)
        );
    }

    fn random(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        DMatrix::from_fn(rows, cols, |_, _| rng.random_range(-2.0..2.0))
    }

    /// Runs the kernel on `isa` and checks it against the reference (both in T).
    fn check<T: Float>(
        isa: Isa,
        (n, m, d, dv): (usize, usize, usize, usize),
        mask: &Mask,
        opts: &AttentionOptions<'_, T>,
        bias: Option<&DMatrix<T>>,
        tol: f64,
    ) -> (DMatrix<T>, DVector<T>) {
        let conv = |x: DMatrix<f64>| x.map(T::of_f64);
        let seed = (n * 1000 + m * 10 + d) as u64;
        let (q, k, v) = (
            conv(random(n, d, seed)),
            conv(random(m, d, seed + 1)),
            conv(random(m, dv, seed + 2)),
        );
        let (qv, kv, vv) = (q.as_view(), k.as_view(), v.as_view());
        let problem = Problem {
            q: qv,
            k: kv,
            v: vv,
            mask,
            bias: bias.map(|b| b.as_view()),
            plan: plan(&qv, &kv, &vv, opts).unwrap(),
        };
        let (out, lse) = forward(
            &problem,
            &PackedKv::new(isa, &problem, Exec::Inline),
            isa,
            Exec::Inline,
        );
        let want = scaled_attention_reference(&q, &k, &v, mask, opts).unwrap();
        for (a, b) in out.iter().zip(want.output.iter()) {
            let (a, b) = (a.as_f64(), b.as_f64());
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{isa:?} {mask}: {a} vs {b}"
            );
        }
        for (a, b) in lse.iter().zip(want.lse.iter()) {
            let (a, b) = (a.as_f64(), b.as_f64());
            assert!(
                a == b || (a - b).abs() <= tol * (1.0 + b.abs()),
                "{isa:?} lse {a} vs {b}"
            );
        }
        (out, lse)
    }

    /// Shapes around the tile sizes of both types (f32 96 x 256, f64 48 x 128).
    const SHAPES: [(usize, usize, usize, usize); 5] = [
        (1, 1, 1, 1),
        (7, 5, 3, 2),
        (50, 140, 16, 9),
        (100, 300, 33, 17),
        (130, 70, 8, 20),
    ];

    #[test]
    fn both_paths_match_the_reference() {
        let masks = [
            Mask::none(),
            Mask::causal(),
            Mask::causal_bottom_right(),
            Mask::sliding_window(20).or(Mask::key_padding(3)),
            Mask::documents((0..300).map(|i| i / 37).collect::<Vec<_>>()),
            Mask::from_fn(|i, j| (i * 7 + j * 3) % 5 != 0 && i % 4 != 1),
        ];
        for isa in Isa::available() {
            for &shape in &SHAPES {
                for mask in &masks {
                    check::<f64>(isa, shape, mask, &AttentionOptions::new(), None, 1e-12);
                    check::<f32>(isa, shape, mask, &AttentionOptions::new(), None, 2e-5);
                }
            }
        }
    }

    #[test]
    fn both_paths_apply_softcap_scale_and_bias() {
        for isa in Isa::available() {
            for &(n, m, d, dv) in &SHAPES[1..] {
                let bias = DMatrix::from_fn(n, m, |i, j| match (i + 2 * j) % 7 {
                    0 => f64::NEG_INFINITY,
                    r => r as f64 * 0.3 - 1.0,
                });
                let bias32 = bias.map(|x| x as f32);
                let opts = AttentionOptions::new().softcap(2.0).bias(&bias).scale(0.7);
                check::<f64>(
                    isa,
                    (n, m, d, dv),
                    &Mask::causal(),
                    &opts,
                    Some(&bias),
                    1e-12,
                );
                let opts = AttentionOptions::new().bias(&bias);
                check::<f64>(isa, (n, m, d, dv), &Mask::none(), &opts, Some(&bias), 1e-12);
                let opts = AttentionOptions::new().softcap(1.5_f32).bias(&bias32);
                check::<f32>(
                    isa,
                    (n, m, d, dv),
                    &Mask::prefix_lm(4),
                    &opts,
                    Some(&bias32),
                    2e-5,
                );
                let opts = AttentionOptions::new().softcap(0.5_f32).scale(-1.0);
                check::<f32>(isa, (n, m, d, dv), &Mask::none(), &opts, None, 2e-5);
            }
        }
    }

    std::thread_local! {
        /// A strip height for [`strip_rows`] to return instead of the register block's.
        pub(super) static STRIP_ROWS: core::cell::Cell<Option<usize>> =
            const { core::cell::Cell::new(None) };
        /// Set: [`strip`] takes its rows one by one, never through `simd::online_rows`.
        pub(super) static ROW_BY_ROW: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
    }

    /// Masks with partial blocks whose rows allow one run of keys each (in 300 positions).
    fn run_masks() -> Vec<Mask> {
        vec![
            Mask::causal(),
            Mask::causal_bottom_right(),
            Mask::sliding_window(9),
            Mask::sliding_window(40).or(Mask::prefix_lm(7)),
            Mask::documents((0..300).map(|i| i / 23).collect::<Vec<_>>()),
        ]
    }

    /// The fused row step (`simd::online_rows`, every mask whose rows are runs) gives the
    /// bits of the row-by-row path, for full and partial blocks, f32 and f64, every ISA.
    #[test]
    fn fused_row_steps_give_the_row_by_row_bits() {
        let mut masks = run_masks();
        masks.push(Mask::none());
        fn runs<T: Float>(isa: Isa, shape: (usize, usize, usize, usize), mask: &Mask, tol: f64) {
            let opts = AttentionOptions::<T>::new();
            let fused = check::<T>(isa, shape, mask, &opts, None, tol);
            ROW_BY_ROW.with(|c| c.set(true));
            let by_row = check::<T>(isa, shape, mask, &opts, None, tol);
            ROW_BY_ROW.with(|c| c.set(false));
            assert!(fused == by_row, "{isa:?} {mask} {shape:?}");
        }
        for isa in Isa::available() {
            for mask in &masks {
                for shape in [(130, 300, 16, 9), (61, 45, 8, 40)] {
                    runs::<f32>(isa, shape, mask, 2e-5);
                    runs::<f64>(isa, shape, mask, 1e-12);
                }
            }
        }
    }

    /// A partial block's strips may be any multiple of MR rows tall (12 on AVX-512, 6
    /// elsewhere, by default) and give the same bits: the keys a strip adds for its other
    /// rows are masked for a row that cannot see them, and its cuts stay on panel boundaries.
    #[test]
    fn strips_of_any_height_give_the_same_bits() {
        let masks = run_masks();
        fn runs<T: Float>(isa: Isa, shape: (usize, usize, usize, usize), mask: &Mask, tol: f64) {
            let opts = AttentionOptions::<T>::new();
            let heights = [T::MR, 2 * T::MR, 5 * T::MR];
            let results: Vec<_> = heights
                .iter()
                .map(|&h| {
                    STRIP_ROWS.with(|c| c.set(Some(h)));
                    let r = check::<T>(isa, shape, mask, &opts, None, tol);
                    STRIP_ROWS.with(|c| c.set(None));
                    r
                })
                .collect();
            for (h, r) in heights.iter().zip(&results).skip(1) {
                assert!(*r == results[0], "{isa:?} {mask} {shape:?}: {h} rows");
            }
        }
        for isa in Isa::available() {
            for mask in &masks {
                for shape in [(130, 130, 16, 9), (61, 45, 8, 40)] {
                    runs::<f32>(isa, shape, mask, 2e-5);
                    runs::<f64>(isa, shape, mask, 1e-12);
                }
                runs::<f32>(isa, (100, 300, 33, 17), mask, 2e-5);
            }
        }
    }

    /// The vector and portable paths differ only in rounding; fully masked rows are exact.
    #[test]
    fn paths_agree_and_masked_rows_are_exact() {
        let mask = Mask::causal_bottom_right().and(Mask::key_padding(90));
        let opts = AttentionOptions::<f32>::new();
        let runs: Vec<_> = Isa::available()
            .into_iter()
            .map(|isa| check::<f32>(isa, (200, 120, 24, 8), &mask, &opts, None, 2e-5))
            .collect();
        for (out, lse) in &runs {
            // n - m = 80 rows see no key at all.
            for i in 0..80 {
                assert_eq!(lse[i], f32::NEG_INFINITY);
                assert!(out.row(i).iter().all(|&x| x == 0.0));
            }
            assert!(lse.iter().skip(80).all(|l| l.is_finite()));
        }
    }

    /// Scores that overflow the float range take the reference's formula, row by row.
    #[test]
    fn overflowing_scores_follow_the_reference() {
        let q = DMatrix::<f32>::from_row_slice(2, 1, &[1e20, 1.0]);
        let k = DMatrix::<f32>::from_row_slice(3, 1, &[1e20, 2e20, -1.0]);
        let v = DMatrix::<f32>::from_row_slice(3, 2, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let opts = AttentionOptions::new();
        let (qv, kv, vv) = (q.as_view(), k.as_view(), v.as_view());
        let mask = Mask::none();
        let problem = Problem {
            q: qv,
            k: kv,
            v: vv,
            mask: &mask,
            bias: None,
            plan: plan(&qv, &kv, &vv, &opts).unwrap(),
        };
        let want = scaled_attention_reference(&q, &k, &v, &mask, &opts).unwrap();
        // Row 0: scores 1e40 and 2e40 are both past f32's range; the larger wins (rounding
        // both to +inf would split the weight between them).
        assert_eq!(
            want.output.row(0).iter().copied().collect::<Vec<_>>(),
            [3.0, 4.0]
        );
        assert_eq!(want.lse[0], f32::INFINITY);
        for isa in Isa::available() {
            let (out, lse) = forward(
                &problem,
                &PackedKv::new(isa, &problem, Exec::Inline),
                isa,
                Exec::Inline,
            );
            assert_eq!(out.row(0), want.output.row(0));
            assert_eq!(lse[0], f32::INFINITY);
            assert!((out.row(1) - want.output.row(1)).amax() < 1e-6);
            assert_eq!(lse[1], want.lse[1]);
        }
    }
}
