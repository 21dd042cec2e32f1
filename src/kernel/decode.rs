//! The decode path: a few queries (one new token, or a short chunk, of every query head of a
//! GQA group) against a long cache of keys and values.
//!
//! The work per key is a few dot products, so the cost is reading K and V, and the layout
//! nalgebra already has serves it: K is column-major, so for a block of keys `j0 .. j1` the
//! scores of every query row of the group accumulate down contiguous column segments,
//!
//! ```text
//!   for each column c of K:   S[r, j0..j1] += q[r, c] · K[j0..j1, c]     (every row r)
//!   for each column c of V:   O[r, c]      += Σ_j P[r, j] · V[j, c]       (every row r)
//! ```
//!
//! with nothing packed and nothing padded: each cached key is read once per group, not once
//! per query head. The keys are cut into chunks of [`CHUNK`] (fixed, so the split does not
//! depend on the thread count); chunks run in parallel, each with its own running maximum,
//! sum and accumulator (the online softmax of the tiled path), and the partial results are
//! merged in chunk order, flash-decoding style: the same bits for any thread count.

use super::Exec;
use super::forward::{RowEnd, finish_scores, q_factor, row_end};
use super::pack::column;
use super::threads::map;
use crate::Float;
use crate::mask::Block;
use crate::prelude::*;
use crate::simd::{self, Element, Isa, Kernel, Lanes, Stored};
use crate::spec::Problem;
use core::ops::Range;
use nalgebra::{DMatrix, DMatrixView, DVector};

/// Keys per block. Each block reads every column of K and V in a run of `BLOCK` elements
/// (4 KiB of f32), long enough for the hardware prefetcher and DRAM pages; the block's
/// scores, `rows x BLOCK`, stay in L1/L2. Measured on a Zen 3 (one token, 32/8 heads, d = 128,
/// m = 8192, one thread, interleaved runs): medians 17 ms at 256, 15 ms at 512, 11-13 ms at
/// 1024, 13 ms at 2048.
const BLOCK: usize = 1024;
/// Keys per chunk: the unit of parallel work (a multiple of [`BLOCK`]).
pub(crate) const CHUNK: usize = 2048;
/// The most query rows (heads of a group x queries) one pass handles.
pub(crate) const MAX_ROWS: usize = 8;

/// Whether `rows` query rows against `m` keys go the decode path.
pub(crate) fn suits(rows: usize, m: usize) -> bool {
    rows > 0 && rows <= MAX_ROWS && m >= 2 * rows
}

/// `S[r, ..bc] = Σ_c q[r, c] · K[j0 + .., c]` for `R` rows (see the module docs), `KV`
/// vectors of keys at a time: the `R x KV` partial scores stay in registers while the loop
/// runs down all d columns (one load of K per vector of keys and column, one broadcast of q
/// per row and column), and each score is stored once.
struct Scores<'a, E, X, const R: usize, const KV: usize> {
    /// The query rows, row-major `R x d`, already multiplied by the plan's factor.
    q: &'a [E],
    /// The keys, stored as `X` (`E`, or a half-precision format widened as it is read).
    k: DMatrixView<'a, X>,
    j0: usize,
    bc: usize,
    /// `R` rows of `stride` scores.
    s: &'a mut [E],
    stride: usize,
}

/// Columns of K per pass over a block's keys (see [`Scores`]). One register tile reads the
/// same key range of `PANEL` columns, and when the column stride is a multiple of 4 KiB (a
/// cache whose capacity is a power of two: the usual case) those lines all fall in one set
/// of the L1 data cache, so `PANEL` must stay within its associativity (8 ways on Zen 2 and
/// 3, 12 on Zen 5 and recent Intel cores) or the lines, and those the hardware prefetches
/// next to them, evict each other. Measured on a Zen 2 (one token, 32/8 heads, d = 128,
/// exact-capacity cache, three alternated rounds, medians): against 16 columns, 8 took
/// 0.90-0.93x the time at m = 1024, 4096 and 8192 on one and two threads, 6 took 0.90-0.97x,
/// 4 took 0.95-1.02x and 32 took 1.22-1.63x.
const PANEL: usize = 8;

/// Scores of keys `j .. j + U · LANES` for `R` rows over the columns `cols`, added to the
/// partial scores in `out` unless `first`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_tile<
    E: Element + nalgebra::Scalar,
    X: Stored<E> + nalgebra::Scalar,
    S: Lanes<E>,
    const R: usize,
    const U: usize,
>(
    s: S,
    q: &[&[E]; R],
    k: &DMatrixView<'_, X>,
    cols: Range<usize>,
    j: usize,
    first: bool,
    out: &mut [E],
    stride: usize,
) {
    let l = S::LANES;
    let mut acc = [[s.splat(E::ZERO); U]; R];
    if !first {
        for (r, acc) in acc.iter_mut().enumerate() {
            for (u, a) in acc.iter_mut().enumerate() {
                *a = s.load(&out[r * stride + u * l..]);
            }
        }
    }
    for c in cols {
        let col = column(k, c);
        let kv: [S::V; U] = core::array::from_fn(|u| s.load_stored(&col[j + u * l..]));
        for (qr, acc) in q.iter().zip(acc.iter_mut()) {
            let qb = s.splat(qr[c]);
            for (a, &kv) in acc.iter_mut().zip(&kv) {
                *a = s.mul_add(qb, kv, *a);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (u, &a) in acc.iter().enumerate() {
            s.store(&mut out[r * stride + u * l..], a);
        }
    }
}

impl<
    E: Element + nalgebra::Scalar,
    X: Stored<E> + nalgebra::Scalar,
    const R: usize,
    const KV: usize,
> Kernel<E> for Scores<'_, E, X, R, KV>
{
    type Output = ();

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) {
        let Scores {
            q,
            k,
            j0,
            bc,
            s: out,
            stride,
        } = self;
        let d = k.ncols();
        let l = S::LANES;
        let qr: [&[E]; R] = core::array::from_fn(|r| &q[r * d..(r + 1) * d]);
        let vectors = bc / l * l;
        for c0 in (0..d).step_by(PANEL) {
            let cols = c0..(c0 + PANEL).min(d);
            let first = c0 == 0;
            let mut j = 0;
            while j + KV * l <= vectors {
                let o = &mut out[j..];
                score_tile::<E, X, S, R, KV>(s, &qr, &k, cols.clone(), j0 + j, first, o, stride);
                j += KV * l;
            }
            while j < vectors {
                let o = &mut out[j..];
                score_tile::<E, X, S, R, 1>(s, &qr, &k, cols.clone(), j0 + j, first, o, stride);
                j += l;
            }
        }
        if d == 0 {
            for row in out.chunks_mut(stride).take(R) {
                row[..vectors].fill(E::ZERO);
            }
        }
        let j = vectors;
        for jj in j..bc {
            for (r, qr) in qr.iter().enumerate() {
                let mut acc = E::ZERO;
                for (c, &qc) in qr.iter().enumerate() {
                    acc = qc.mul_add(column(&k, c)[j0 + jj].widen(), acc);
                }
                out[r * stride + jj] = acc;
            }
        }
    }
}

/// `O[r, c] += Σ_j P[r, j] · V[j0 + j, c]` for `R` rows, `CV` columns of V at a time (the
/// `R x CV` vector accumulators in registers; each vector of P loaded once per `CV`
/// columns), `CW` at a time with 32 vector registers. Each output element is the same sum
/// either way (one vector accumulator over the keys, then its lanes, then the tail).
struct Values<'a, E, X, const R: usize, const CV: usize, const CW: usize> {
    /// `R` rows of probabilities, `stride` apart.
    p: &'a [E],
    stride: usize,
    /// The values, stored as `X` (see [`Scores`]).
    v: DMatrixView<'a, X>,
    j0: usize,
    bc: usize,
    /// `R` accumulator rows of `ostride`.
    o: &'a mut [E],
    ostride: usize,
}

/// Columns `c .. c + U` of `Values` (see there); prefetches the next block of them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn value_tile<
    E: Element + nalgebra::Scalar,
    X: Stored<E> + nalgebra::Scalar,
    S: Lanes<E>,
    const R: usize,
    const U: usize,
>(
    s: S,
    p: &[&[E]; R],
    v: &DMatrixView<'_, X>,
    c: usize,
    j0: usize,
    bc: usize,
    o: &mut [E],
    ostride: usize,
) {
    let l = S::LANES;
    let full = bc / l * l;
    let line = 64 / size_of::<E>();
    let cols: [&[X]; U] = core::array::from_fn(|u| column(v, c + u));
    let ahead = j0 + bc;
    for col in &cols {
        for at in (ahead..(ahead + bc).min(col.len())).step_by(line) {
            s.prefetch(&col[at..]);
        }
    }
    let cols: [&[X]; U] = core::array::from_fn(|u| &cols[u][j0..j0 + bc]);
    let mut acc = [[s.splat(E::ZERO); U]; R];
    for j in (0..full).step_by(l) {
        let vv: [S::V; U] = core::array::from_fn(|u| s.load_stored(&cols[u][j..]));
        for (pr, acc) in p.iter().zip(acc.iter_mut()) {
            let pv = s.load(&pr[j..]);
            for (a, &vv) in acc.iter_mut().zip(&vv) {
                *a = s.mul_add(pv, vv, *a);
            }
        }
    }
    for (r, (pr, acc)) in p.iter().zip(&acc).enumerate() {
        for (u, (&a, col)) in acc.iter().zip(&cols).enumerate() {
            let mut sum = s.reduce_sum(a);
            for j in full..bc {
                sum = pr[j].mul_add(col[j].widen(), sum);
            }
            o[r * ostride + c + u] += sum;
        }
    }
}

impl<
    E: Element + nalgebra::Scalar,
    X: Stored<E> + nalgebra::Scalar,
    const R: usize,
    const CV: usize,
    const CW: usize,
> Kernel<E> for Values<'_, E, X, R, CV, CW>
{
    type Output = ();

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) {
        let Values {
            p,
            stride,
            v,
            j0,
            bc,
            o,
            ostride,
        } = self;
        let pr: [&[E]; R] = core::array::from_fn(|r| &p[r * stride..r * stride + bc]);
        let dv = v.ncols();
        let mut c = 0;
        // With 32 vector registers (AVX-512: two vectors make a panel, the gemm's test) the
        // wider tile, then the narrow one for the columns left.
        if 2 * S::LANES == E::NR {
            while c + CW <= dv {
                value_tile::<E, X, S, R, CW>(s, &pr, &v, c, j0, bc, o, ostride);
                c += CW;
            }
        }
        while c + CV <= dv {
            value_tile::<E, X, S, R, CV>(s, &pr, &v, c, j0, bc, o, ostride);
            c += CV;
        }
        while c < dv {
            value_tile::<E, X, S, R, 1>(s, &pr, &v, c, j0, bc, o, ostride);
            c += 1;
        }
    }
}

/// Runs `Scores` or `Values` with the row count as a constant (1, 2, 4 or 8 rows; the
/// caller pads to one of them) and a register tile that fits 16 vector registers: `R x U`
/// accumulators (U = 4, 4, 2, 1 vectors of keys or columns of V). `Values` takes twice as
/// many columns where there are 32 registers (AVX-512). Measured on a Zen 4 (AMD EPYC,
/// family 25 model 17; one token, 32/8 heads, d = 128, one thread, 16 alternated runs,
/// medians): 1.05x, 1.34x, 1.09x and 1.12x faster at m = 1024, 2048, 4096 and 8192; twice
/// the vectors of keys in `Scores` as well gained nothing more (0.85-1.06x of that).
macro_rules! with_rows {
    ($rows:expr, $isa:expr, Values { $($f:ident: $v:expr),* $(,)? }) => {
        match $rows {
            1 => simd::dispatch($isa, Values::<_, _, 1, 4, 8> { $($f: $v),* }),
            2 => simd::dispatch($isa, Values::<_, _, 2, 4, 8> { $($f: $v),* }),
            3 | 4 => simd::dispatch($isa, Values::<_, _, 4, 2, 4> { $($f: $v),* }),
            _ => simd::dispatch($isa, Values::<_, _, 8, 1, 2> { $($f: $v),* }),
        }
    };
    ($rows:expr, $isa:expr, $op:ident { $($f:ident: $v:expr),* $(,)? }) => {
        match $rows {
            1 => simd::dispatch($isa, $op::<_, _, 1, 4> { $($f: $v),* }),
            2 => simd::dispatch($isa, $op::<_, _, 2, 4> { $($f: $v),* }),
            3 | 4 => simd::dispatch($isa, $op::<_, _, 4, 2> { $($f: $v),* }),
            _ => simd::dispatch($isa, $op::<_, _, 8, 1> { $($f: $v),* }),
        }
    };
}

/// One query row: which head's problem and which of its queries.
#[derive(Clone, Copy)]
struct RowOf {
    head: usize,
    query: usize,
}

/// The running state of one chunk: per row the maximum (log₂ units), the sum, and the
/// unnormalised output (`dv` per row).
struct Partial<T> {
    max: Vec<T>,
    sum: Vec<T>,
    o: Vec<T>,
    /// Whether the mask allowed any key of the row in this chunk.
    seen: Vec<bool>,
    /// Whether a raw product overflowed in this chunk.
    overflow: Vec<bool>,
}

/// The row the reference's way, for head `h` (an index into the group) and query `i`: what a
/// row whose scores or accumulator overflowed falls back to ([`exact_row`] on the problem).
pub(crate) type ExactRow<'a, T> = dyn Fn(usize, usize) -> (Vec<T>, T) + Sync + 'a;

/// Attention for the heads `problems` (all with the same K, V, mask and options: one GQA
/// group), whose queries together are at most [`MAX_ROWS`] rows, over the group's keys and
/// values `k` and `v` stored as `X` (the problems' own K and V, or a half-precision cache of
/// them, whose shapes the problems' plans carry). Returns each head's output (n x d_v) and
/// log-sum-exp, as the tiled forward pass would.
pub(crate) fn decode<T: Float, X: Stored<T> + nalgebra::Scalar>(
    problems: &[&Problem<'_, T>],
    (k, v): (DMatrixView<'_, X>, DMatrixView<'_, X>),
    exact: &ExactRow<'_, T>,
    isa: Isa,
    exec: Exec,
) -> Vec<(DMatrix<T>, DVector<T>)> {
    let first = problems[0];
    let plan = first.plan;
    let (n, m, d, dv) = (plan.n, plan.m, plan.d, plan.dv);
    let rows: Vec<RowOf> = (0..problems.len())
        .flat_map(|head| (0..n).map(move |query| RowOf { head, query }))
        .collect();
    let count = rows.len();
    debug_assert!(count <= MAX_ROWS);
    // The kernel's row count: 1, 2, 4 or 8, padded with zero query rows (scores 0, then
    // masked: their results are never read).
    let padded = count.next_power_of_two();
    let factor = q_factor(&plan);
    let mut q = vec![T::zero(); padded * d];
    for (r, row) in rows.iter().enumerate() {
        let qh = &problems[row.head].q;
        for c in 0..d {
            q[r * d + c] = factor.apply(qh[(row.query, c)]);
        }
    }
    let chunks: Vec<usize> = (0..m).step_by(CHUNK).collect();
    let kv = (k, v);
    let run = |&c0: &usize| {
        chunk(
            problems,
            kv,
            &rows,
            &q,
            padded,
            c0..(c0 + CHUNK).min(m),
            isa,
        )
    };
    let partials: Vec<Partial<T>> = map(exec, chunks.iter().collect(), run);
    // Merge the chunks in order: M = max of the maxima, every sum and accumulator rescaled
    // by 2^(max_k − M).
    let mut results: Vec<(DMatrix<T>, DVector<T>)> = problems
        .iter()
        .map(|_| (DMatrix::zeros(n, dv), DVector::zeros(n)))
        .collect();
    for (r, row) in rows.iter().enumerate() {
        let big = partials.iter().fold(
            T::NEG_INFINITY,
            |a, p| if p.max[r] > a { p.max[r] } else { a },
        );
        let mut sum = T::zero();
        let mut o = vec![T::zero(); dv];
        if big != T::NEG_INFINITY {
            for p in &partials {
                if p.max[r] == T::NEG_INFINITY {
                    continue;
                }
                let w = (p.max[r] - big).exp2();
                sum += p.sum[r] * w;
                for (oc, &pc) in o.iter_mut().zip(&p.o[r * dv..(r + 1) * dv]) {
                    *oc += pc * w;
                }
            }
        }
        let (out, lse) = &mut results[row.head];
        let seen = partials.iter().any(|p| p.seen[r]);
        let end = match row_end(big, sum, seen) {
            // The unnormalised accumulator overflowed (values near the float's maximum).
            RowEnd::Normal { .. }
                if !simd::all_finite(isa, &o) || partials.iter().any(|p| p.overflow[r]) =>
            {
                RowEnd::Exact
            }
            end => end,
        };
        match end {
            RowEnd::Normal { inv, lse: l } => {
                for (c, &oc) in o.iter().enumerate() {
                    out[(row.query, c)] = oc * inv;
                }
                lse[row.query] = l;
            }
            RowEnd::Masked => lse[row.query] = T::NEG_INFINITY,
            RowEnd::Exact => {
                let (exact, l) = exact(row.head, row.query);
                for (c, x) in exact.into_iter().enumerate() {
                    out[(row.query, c)] = x;
                }
                lse[row.query] = l;
            }
        }
    }
    results
}

/// One chunk of keys `c0 .. c1` for every row.
fn chunk<T: Float, X: Stored<T> + nalgebra::Scalar>(
    problems: &[&Problem<'_, T>],
    (k, v): (DMatrixView<'_, X>, DMatrixView<'_, X>),
    rows: &[RowOf],
    q: &[T],
    padded: usize,
    Range { start: c0, end: c1 }: Range<usize>,
    isa: Isa,
) -> Partial<T> {
    let first = problems[0];
    let plan = first.plan;
    let (n, m, dv) = (plan.n, plan.m, plan.dv);
    let count = rows.len();
    let stride = BLOCK.next_multiple_of(T::NR);
    let mut s = vec![T::zero(); padded * stride];
    let mut part = Partial {
        max: vec![T::NEG_INFINITY; count],
        sum: vec![T::zero(); count],
        o: vec![T::zero(); padded * dv],
        seen: vec![false; count],
        overflow: vec![false; count],
    };
    for j0 in (c0..c1).step_by(BLOCK) {
        let bc = BLOCK.min(c1 - j0);
        let block = first.mask.classify(0..n, j0..j0 + bc, n, m);
        if block == Block::Empty {
            continue;
        }
        with_rows!(
            padded,
            isa,
            Scores {
                q: q,
                k: k,
                j0: j0,
                bc: bc,
                s: &mut s,
                stride: stride,
            }
        );
        let width = bc.next_multiple_of(T::NR);
        for (r, row) in rows.iter().enumerate() {
            let scores = &mut s[r * stride..r * stride + width];
            let p = problems[row.head];
            let seen = finish_scores(
                p,
                isa,
                row.query,
                j0,
                &mut scores[..bc],
                block == Block::Partial,
            );
            part.seen[r] |= seen.seen;
            part.overflow[r] |= seen.overflow;
            scores[bc..].fill(T::NEG_INFINITY);
            simd::online_step(
                isa,
                (scores, seen.max),
                &mut part.max[r],
                &mut part.sum[r],
                &mut part.o[r * dv..(r + 1) * dv],
            );
        }
        // Padded rows: P = 0 (their scores were never exponentiated; zero them).
        for r in count..padded {
            s[r * stride..(r + 1) * stride].fill(T::zero());
        }
        if dv > 0 {
            with_rows!(
                padded,
                isa,
                Values {
                    p: &s,
                    stride: stride,
                    v: v,
                    j0: j0,
                    bc: bc,
                    o: &mut part.o,
                    ostride: dv,
                }
            );
        }
    }
    part
}

#[cfg(test)]
mod tests {
    //! The decode path against the reference, over several chunks, GQA groups, masks, bias
    //! and softcap; the same bits on every thread count.

    use crate::attention::scaled_attention_reference;
    use crate::mask::Mask;
    use crate::spec::AttentionOptions;
    use crate::{Heads, multi_head_attention};
    use nalgebra::DMatrix;

    fn matrix(rows: usize, cols: usize, seed: f64) -> DMatrix<f64> {
        DMatrix::from_fn(rows, cols, |i, j| {
            ((i * cols + j) as f64 * 0.618 + seed).sin() * 2.0
        })
    }

    /// Every head of a 4-query-head / 2-KV-head layer, n = 1 and 2 new tokens against
    /// m = 5000 cached keys (three chunks, a ragged last block), against the reference head by
    /// head; d_v = 5 takes the value tile's wide and one-column passes for four rows.
    #[test]
    fn grouped_decode_matches_the_reference() {
        let (m, d, dv) = (5000, 8, 5);
        let heads = Heads::grouped(4, 2);
        let k = matrix(m, 2 * d, 0.2);
        let v = matrix(m, 2 * dv, 0.4);
        let masks = [
            Mask::causal_bottom_right(),
            Mask::none(),
            Mask::key_padding(4100),
            Mask::sliding_window(300).or(Mask::key_padding(7)),
            Mask::from_fn(|i, j| (i + j) % 3 != 0),
            Mask::key_padding(0),
        ];
        for n in [1, 2] {
            let q = matrix(n, 4 * d, 0.1);
            let bias = matrix(n, m, 0.9);
            for mask in &masks {
                for opts in [
                    AttentionOptions::new(),
                    AttentionOptions::new().softcap(1.5).bias(&bias).scale(0.9),
                ] {
                    let out = multi_head_attention(&q, &k, &v, heads, mask, &opts).unwrap();
                    for h in 0..4 {
                        let g = heads.kv_head(h);
                        let want = scaled_attention_reference(
                            q.columns(h * d, d),
                            k.columns(g * d, d),
                            v.columns(g * dv, dv),
                            mask,
                            &opts,
                        )
                        .unwrap()
                        .output;
                        let got = out.columns(h * dv, dv);
                        assert!((got - &want).amax() < 1e-12, "{mask} n = {n} head {h}");
                    }
                }
            }
        }
    }

    #[test]
    fn single_head_decode_matches_the_reference_in_f32() {
        let (m, d) = (4500, 16);
        let k = matrix(m, d, 0.3).map(|x| x as f32);
        let v = matrix(m, d, 0.5).map(|x| x as f32);
        for n in 1..=4 {
            let q = matrix(n, d, 0.7).map(|x| x as f32);
            let opts = AttentionOptions::new();
            let mask = Mask::causal_bottom_right();
            let fast = crate::scaled_attention_with(&q, &k, &v, &mask, &opts).unwrap();
            // The oracle in f64 on the same (f32-rounded) inputs: both f32 paths sum 4500
            // terms, so compare each with the exact value, not with each other.
            let up = |x: &DMatrix<f32>| x.map(f64::from);
            let exact = scaled_attention_reference(
                &up(&q),
                &up(&k),
                &up(&v),
                &mask,
                &AttentionOptions::new(),
            )
            .unwrap();
            let err = (up(&fast.output) - &exact.output).amax();
            assert!(err < 2e-6, "n = {n}: {err}");
            for (a, b) in fast.lse.iter().zip(exact.lse.iter()) {
                assert!(
                    (f64::from(*a) - b).abs() < 1e-5 * b.abs().max(1.0),
                    "{a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn every_thread_count_gives_the_same_bits() {
        let (m, d) = (7000, 8);
        let heads = Heads::grouped(8, 2);
        let q = matrix(1, 8 * d, 0.1);
        let k = matrix(m, 2 * d, 0.2);
        let v = matrix(m, 2 * d, 0.3);
        let mask = Mask::causal_bottom_right();
        let run = |t: usize| {
            multi_head_attention(
                &q,
                &k,
                &v,
                heads,
                &mask,
                &AttentionOptions::new().threads(t),
            )
            .unwrap()
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
        let pool = multi_head_attention(&q, &k, &v, heads, &mask, &AttentionOptions::new());
        assert_eq!(one, pool.unwrap());
    }

    /// Scores that overflow take the reference's formula, as on the tiled path; a row with no
    /// allowed key gives zeros and lse = −inf.
    #[test]
    fn overflow_and_fully_masked_rows() {
        let m = 100;
        let mut k = matrix(m, 1, 0.0).map(|x| x as f32);
        k[(3, 0)] = 1e20;
        k[(4, 0)] = 2e20;
        let v = matrix(m, 2, 0.1).map(|x| x as f32);
        let q = DMatrix::<f32>::from_element(1, 1, 1e20);
        let opts = AttentionOptions::new();
        let fast = crate::scaled_attention_with(&q, &k, &v, &Mask::none(), &opts).unwrap();
        let slow = scaled_attention_reference(&q, &k, &v, &Mask::none(), &opts).unwrap();
        assert_eq!(fast.output, slow.output);
        assert_eq!(fast.lse[0], f32::INFINITY);
        let none = crate::scaled_attention_with(&q, &k, &v, &Mask::key_padding(0), &opts).unwrap();
        assert_eq!(none.output, DMatrix::zeros(1, 2));
        assert_eq!(none.lse[0], f32::NEG_INFINITY);
    }
}
