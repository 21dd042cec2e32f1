//! The tiled backward pass (FlashAttention-2 style) on the same packing and micro-kernel as
//! the forward pass.
//!
//! For a block of queries I (br rows) and keys J (bc keys), with every operand packed once
//! per call into the micro-kernel's layouts:
//!
//! ```text
//!   X   = Q_I K_Jᵀ          A: Q rows           B: Kᵀ panels      R x bc
//!   dP  = dO_I V_Jᵀ         A: dO rows          B: Vᵀ panels      R x bc
//!   P   = exp(S(X) − lse),  dS = P ⊙ (dP − D),  dX = dS ⊙ ∂S/∂X      (element by element)
//!   dV_J += Pᵀ dO_I          A: Pᵀ (bc x R)      B: dO panels      bc x d_v
//!   dK_J += dXᵀ Q_I          A: dXᵀ (bc x R)     B: Q panels       bc x d
//!   dQ_I += dX K_J           A: dX (R x bc)      B: K panels       R x d
//! ```
//!
//! (R = br rounded up to MR; padded rows and columns are zero.) Pᵀ and dXᵀ are never formed:
//! the micro-kernel reads P and dX transposed ([`Rows::transposed`]). P, dS and dX are one
//! vectorised pass per row ([`simd::softmax_grad_row`]) where the score's derivative is the
//! constant `scale` (no softcap) and no d bias is asked for, and one dispatch for the whole
//! block ([`simd::softmax_grad_rows`], the weights' arguments computed in registers) where,
//! besides, no bias and no mask inside the block shape them.
//!
//! One pass over the key blocks, FlashAttention-2's loop: each key block owns its rows of dK
//! and dV (and its columns of d bias), so key blocks run in parallel without races. dQ gets a
//! contribution from every key block; to keep it race-free *and* the same bits for any
//! thread count, the key blocks are dealt round-robin to a fixed number of lanes that depends
//! only on the shape ([`dq_lanes`]): lane l accumulates its blocks' `dX K_J` in order into its
//! own partial dQ, and the partials are summed in lane order at the end. One thread runs the
//! lanes one after another (one partial buffer, reused); several run them in parallel.

use super::buffers::Buf;
use super::pack::{self, round_up};
use super::threads::{all, queued};
use super::{Exec, block_work};
use crate::Float;
use crate::float::pow2;
use crate::mask::Block;
use crate::prelude::*;
use crate::simd::{self, Isa, Out, Panels, Rows, Shape};
use crate::spec::{Problem, raw_dot_row, softmax_exact_row};
use nalgebra::{DMatrix, DMatrixView};

/// Queries and keys per block: multiples of MR, and of lcm(MR, NR) for keys (a key block is
/// both the columns of the score block and the rows of the dK, dV products).
pub(crate) fn tiles<T: Float>() -> (usize, usize) {
    if size_of::<T>() == 4 {
        (96, 96)
    } else {
        (48, 96)
    }
}

/// The gradients, in the shapes of the inputs; `dbias` if the call had a bias.
pub(crate) struct Gradients<T: Float> {
    pub dq: DMatrix<T>,
    pub dk: DMatrix<T>,
    pub dv: DMatrix<T>,
    pub dbias: Option<DMatrix<T>>,
    /// The first row whose recomputed weights do not sum to 1 (see [`check_row_sums`]), and
    /// their sum: the saved forward result came from another call.
    pub mismatch: Option<(usize, T)>,
}

/// Everything a block reads, packed once per call.
struct Packed<T: Float> {
    /// Q (n_pad x d), dO (n_pad x d_v): the left operands of X and dP, row-major.
    q_rows: Buf<T>,
    do_rows: Buf<T>,
    /// Kᵀ, Vᵀ in panels of NR keys: the right operands of X and dP.
    kt: Buf<T>,
    vt: Buf<T>,
    /// Q and dO in panels of NR columns (n_pad rows each): the right operands of dK and dV.
    q_panels: Buf<T>,
    do_panels: Buf<T>,
    /// K in panels of NR columns (m rows each): the right operand of dQ.
    k_panels: Buf<T>,
    n_pad: usize,
}

impl<T: Float> Packed<T> {
    /// The seven layouts of Q, dO, K and V (each a function of the inputs alone), packed on
    /// the call's threads.
    fn new(
        p: &Problem<'_, T>,
        d_out: DMatrixView<'_, T>,
        n_pad: usize,
        isa: Isa,
        exec: Exec,
    ) -> Self {
        let m = p.plan.m;
        let jobs: [&(dyn Fn() -> Buf<T> + Sync); 7] = [
            &|| pack::rows(isa, &p.q, n_pad),
            &|| pack::rows(isa, &d_out, n_pad),
            &|| pack::panels_of_transpose(isa, &p.k, T::NR, None),
            &|| pack::panels_of_transpose(isa, &p.v, T::NR, None),
            &|| pack::panels(isa, &p.q, T::NR, n_pad, None),
            &|| pack::panels(isa, &d_out, T::NR, n_pad, None),
            &|| pack::panels(isa, &p.k, T::NR, m, None),
        ];
        let mut packs = all(exec, &jobs).into_iter();
        let mut next = || packs.next().unwrap_or_else(|| Buf::zeroed(0));
        Packed {
            q_rows: next(),
            do_rows: next(),
            kt: next(),
            vt: next(),
            q_panels: next(),
            do_panels: next(),
            k_panels: next(),
            n_pad,
        }
    }
}

/// One block's working memory (row-major, R x C, padding kept at zero).
struct Scratch<T> {
    /// X, then dX.
    x: Vec<T>,
    /// dP, then P.
    dp: Vec<T>,
    /// One row's exponent arguments, then its probabilities (C).
    row: Vec<T>,
}

impl<T: Float> Scratch<T> {
    /// For blocks of up to `tq` queries, rows `c` wide.
    fn new(tq: usize, c: usize) -> Self {
        let len = round_up(tq, T::MR) * c;
        Scratch {
            x: vec![T::zero(); len],
            dp: vec![T::zero(); len],
            row: vec![T::zero(); c],
        }
    }
}

/// The call's inputs and saved forward results.
struct Ctx<'a, T: Float> {
    p: &'a Problem<'a, T>,
    lse: &'a [T],
    /// `D_i = ⟨dO_i, O_i⟩ = Σ_j P_ij dP_ij`, the softmax VJP's row correction.
    delta: &'a [T],
    /// Rows left out of the tiled pass and computed by [`exact_rows`] instead.
    exact: Vec<bool>,
    packed: Packed<T>,
    isa: Isa,
    /// Columns of the score scratch: the key tile rounded up to MR and then to NR, so that a
    /// block's padded columns hold both the score products (NR) and the dK, dV rows (MR).
    c: usize,
    /// Padded widths of d and d_v.
    d_pad: usize,
    dv_pad: usize,
}

/// The output blocks of one key block: dK_J and dV_J (cm x d_pad, cm x dv_pad, row-major)
/// and the columns J of d bias (n x |J|, column-major).
struct KeyOut<'a, T> {
    dk: &'a mut [T],
    dv: &'a mut [T],
    dbias: Option<&'a mut [T]>,
}

/// A key block's range and its outputs.
type KeyWork<'a, T> = ((usize, usize), KeyOut<'a, T>);

impl<T: Float> Ctx<'_, T> {
    /// Recomputes block (queries `i0..i1`) x (keys `j0..j1`): leaves dX in `scr.x` and P in
    /// `scr.dp` (R x C; padded columns zero, and padded rows of dX); writes dS into
    /// `dbias` (the columns of this key block, column-major, n rows) if given. Returns
    /// `false`, touching nothing, if the mask rules the block out.
    fn block(
        &self,
        (i0, i1): (usize, usize),
        (j0, j1): (usize, usize),
        scr: &mut Scratch<T>,
        dbias: Option<&mut [T]>,
        psum: &mut [T],
    ) -> bool {
        let plan = &self.p.plan;
        let (n, m, d, dv) = (plan.n, plan.m, plan.d, plan.dv);
        let class = self.p.mask.classify(i0..i1, j0..j1, n, m);
        if class == Block::Empty {
            return false;
        }
        let (br, bc) = (i1 - i0, j1 - j0);
        let (rows, c) = (round_up(br, T::MR), self.c);
        let cn = round_up(bc, T::NR);
        let (isa, pk) = (self.isa, &self.packed);
        let shape = |k| Shape {
            rows,
            ncols: cn,
            k,
            accumulate: false,
        };
        // X = Q_I K_Jᵀ and dP = dO_I V_Jᵀ.
        simd::gemm(
            isa,
            shape(d),
            Rows::new(&pk.q_rows[i0 * d..], d),
            Panels::new(&pk.kt[(j0 / T::NR) * d * T::NR..], d * T::NR),
            Out::new(&mut scr.x, c),
        );
        simd::gemm(
            isa,
            shape(dv),
            Rows::new(&pk.do_rows[i0 * dv..], dv),
            Panels::new(&pk.vt[(j0 / T::NR) * dv * T::NR..], dv * T::NR),
            Out::new(&mut scr.dp, c),
        );
        // P, dS and dX, row by row. P_ij = exp(S_ij − lse_i) through the vectorised exp;
        // pairs with no weight (masked, or a fully masked row whose lse is −inf, where
        // S − lse would be NaN) get −inf, so exactly 0.
        let mut dbias = dbias;
        // The exp flushes weights below the smallest normal number to 0.
        let tiny = pow2::<T>(2 - T::MAX_EXP);
        if class == Block::Full && plan.softcap.is_none() && dbias.is_none() && !self.p.biased() {
            // The common case in one dispatch for the block, the same bits as the rows one by
            // one below (forward + backward 1.01-1.03x on a Zen 4 at n = 1024-2048).
            simd::softmax_grad_rows(
                isa,
                simd::GradRows {
                    x: &mut scr.x[..br * c],
                    dp: &mut scr.dp[..br * c],
                    stride: c,
                    cols: bc,
                    lse: &self.lse[i0..i1],
                    skip: &self.exact[i0..i1],
                    delta: &self.delta[i0..i1],
                    sum: &mut psum[i0..i1],
                    scale: plan.scale,
                    tiny,
                },
            );
            scr.x[br * c..rows * c].fill(T::zero());
            return true;
        }
        for r in 0..rows {
            let x_row = &mut scr.x[r * c..(r + 1) * c];
            if r >= br {
                x_row.fill(T::zero());
                continue;
            }
            let i = i0 + r;
            let prob = &mut scr.row[..bc];
            self.exponent_args(i, j0, &x_row[..bc], class == Block::Partial, prob);
            let dp_row = &mut scr.dp[r * c..(r + 1) * c];
            psum[i] += match (plan.softcap, dbias.as_deref_mut()) {
                // The exp on the way (one pass over the row, not two).
                (None, None) => simd::softmax_grad_row(
                    isa,
                    prob,
                    (&mut dp_row[..bc], &mut x_row[..bc]),
                    self.delta[i],
                    plan.scale,
                    tiny,
                ),
                (_, mut db) => {
                    simd::exp_in_place(isa, prob);
                    let mut sum = T::zero();
                    for (jj, &pij) in prob.iter().enumerate() {
                        sum += pij;
                        let ds = if pij == T::zero() {
                            T::zero()
                        } else {
                            pij * (dp_row[jj] - self.delta[i])
                        };
                        if let Some(db) = db.as_deref_mut() {
                            db[i + jj * n] = ds;
                        }
                        dp_row[jj] = pij;
                        x_row[jj] = ds * plan.score_grad(x_row[jj]);
                    }
                    sum
                }
            };
            x_row[bc..].fill(T::zero());
            dp_row[bc..].fill(T::zero());
        }
        true
    }

    /// `S_ij − lse_i` for the keys `j0 .. j0 + x.len()` of row `i` from the raw products `x`,
    /// or `−inf` where the pair carries no weight.
    fn exponent_args(&self, i: usize, j0: usize, x: &[T], partial: bool, out: &mut [T]) {
        let (plan, lse) = (&self.p.plan, self.lse[i]);
        // A fully masked row, or one left to the exact pass (see `exact_rows`).
        if lse == T::NEG_INFINITY || self.exact[i] {
            out.fill(T::NEG_INFINITY);
            return;
        }
        if !self.p.biased() && plan.softcap.is_none() {
            // `score(x) − lse = scale · x − lse`, the same two roundings, vectorised.
            simd::affine_row(self.isa, x, plan.scale, lse, out);
        } else {
            for (jj, (o, &xij)) in out.iter_mut().zip(x).enumerate() {
                *o = plan.score(xij, self.p.bias_at(i, j0 + jj)) - lse;
            }
        }
        if partial {
            let (n, m) = (plan.n, plan.m);
            let j1 = j0 + x.len();
            match self.p.mask.row_run(i, j0..j1, n, m) {
                Some(run) => {
                    out[..run.start - j0].fill(T::NEG_INFINITY);
                    out[run.end - j0..].fill(T::NEG_INFINITY);
                }
                None => {
                    for (jj, o) in out.iter_mut().enumerate() {
                        if !self.p.mask.allows_in(n, m, i, j0 + jj) {
                            *o = T::NEG_INFINITY;
                        }
                    }
                }
            }
        }
    }

    /// `dV_J += Pᵀ dO_I` and `dK_J += dXᵀ Q_I` from the block in `scr`.
    fn add_dk_dv(
        &self,
        i0: usize,
        br: usize,
        bc: usize,
        scr: &Scratch<T>,
        out: &mut KeyOut<'_, T>,
    ) {
        let cm = round_up(bc, T::MR);
        let pk = &self.packed;
        let stride = pk.n_pad * T::NR;
        let shape = |ncols| Shape {
            rows: cm,
            ncols,
            k: br,
            accumulate: true,
        };
        // (An empty d or d_v has no panels to offset into, and nothing to compute.)
        if self.dv_pad > 0 {
            simd::gemm(
                self.isa,
                shape(self.dv_pad),
                Rows::transposed(&scr.dp, self.c),
                Panels::new(&pk.do_panels[i0 * T::NR..], stride),
                Out::new(out.dv, self.dv_pad),
            );
        }
        if self.d_pad > 0 {
            simd::gemm(
                self.isa,
                shape(self.d_pad),
                Rows::transposed(&scr.x, self.c),
                Panels::new(&pk.q_panels[i0 * T::NR..], stride),
                Out::new(out.dk, self.d_pad),
            );
        }
    }

    /// `dQ_I += dX K_J` from the block in `scr`; `dq` is the block's R x d_pad rows.
    fn add_dq(&self, br: usize, (j0, bc): (usize, usize), scr: &Scratch<T>, dq: &mut [T]) {
        if self.d_pad == 0 {
            return;
        }
        simd::gemm(
            self.isa,
            Shape {
                rows: round_up(br, T::MR),
                ncols: self.d_pad,
                k: bc,
                accumulate: true,
            },
            Rows::new(&scr.x, self.c),
            Panels::new(&self.packed.k_panels[j0 * T::NR..], self.p.plan.m * T::NR),
            Out::new(dq, self.d_pad),
        );
    }

    /// One key block: dK_J, dV_J and the columns J of d bias over every query block, and its
    /// contributions `dX_IJ K_J` to `dq` (one piece per query block: a lane's partial dQ)
    /// and its weights to the row sums `psum`.
    fn key_block(
        &self,
        queries: &[(usize, usize)],
        (j0, j1): (usize, usize),
        mut out: KeyOut<'_, T>,
        (dq, psum): (&mut [&mut [T]], &mut [T]),
        scr: &mut Scratch<T>,
    ) {
        for (ib, &(i0, i1)) in queries.iter().enumerate() {
            if !self.block((i0, i1), (j0, j1), scr, out.dbias.as_deref_mut(), psum) {
                continue;
            }
            self.add_dk_dv(i0, i1 - i0, j1 - j0, scr, &mut out);
            self.add_dq(i1 - i0, (j0, j1 - j0), scr, dq[ib]);
        }
    }

    /// One lane: its key blocks in order, their dQ contributions and row sums of the weights
    /// accumulated into `buf` (zero on entry): n_pad x d_pad of dQ, then n_pad row sums.
    fn lane(
        &self,
        queries: &[(usize, usize)],
        q_blocks: &[(usize, usize)],
        blocks: Vec<KeyWork<'_, T>>,
        buf: &mut [T],
        scr: &mut Scratch<T>,
    ) {
        let (dq, psum) = buf.split_at_mut(self.packed.n_pad * self.d_pad);
        let end = q_blocks.last().map_or(0, |b| b.1);
        let mut dq_parts = split(&mut dq[..end * self.d_pad], self.d_pad, q_blocks);
        for (key, out) in blocks {
            self.key_block(queries, key, out, (&mut dq_parts, psum), scr);
        }
    }
}

/// Partial dQ buffers of the backward pass for `key_blocks` key blocks and a dQ of `len`
/// elements of `size` bytes: up to 8 (so that 8 threads find work), at least 2 where there
/// are two key blocks (so that two threads do), and otherwise no more than 64 MiB in all.
/// A function of the shape alone, never of the thread count: the lanes fix the order of
/// dQ's sums, hence its bits.
pub(crate) fn dq_lanes(key_blocks: usize, len: usize, size: usize) -> usize {
    let budget = (64 << 20) / (len * size).max(1);
    key_blocks.min(budget.clamp(2, 8)).max(1)
}

/// The half-open ranges `[start, end)` of `len` positions cut into tiles of `tile`.
fn ranges(len: usize, tile: usize) -> Vec<(usize, usize)> {
    (0..len)
        .step_by(tile)
        .map(|s| (s, (s + tile).min(len)))
        .collect()
}

/// Splits `data` into consecutive pieces of `per · (end − start)` elements, one per range.
fn split<'a, T>(mut data: &'a mut [T], per: usize, ranges: &[(usize, usize)]) -> Vec<&'a mut [T]> {
    let mut pieces = Vec::with_capacity(ranges.len());
    for &(a, b) in ranges {
        let (head, tail) = core::mem::take(&mut data).split_at_mut(per * (b - a));
        pieces.push(head);
        data = tail;
    }
    pieces
}

/// The backward pass of one validated call, given the upstream gradient `d_out` (n x d_v),
/// the saved log-sum-exp and the row corrections `delta`, with blocks of `tq` queries
/// (a multiple of MR) and `tk` keys (a multiple of MR and NR).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Float>(
    p: &Problem<'_, T>,
    d_out: DMatrixView<'_, T>,
    lse: &[T],
    delta: &[T],
    isa: Isa,
    exec: Exec,
    (tq, tk): (usize, usize),
) -> Gradients<T> {
    let plan = p.plan;
    let (n, m, d, dv) = (plan.n, plan.m, plan.d, plan.dv);
    assert!(
        tq > 0
            && tk > 0
            && tq.is_multiple_of(T::MR)
            && tk.is_multiple_of(T::MR)
            && tk.is_multiple_of(T::NR),
        "backward tiles {tq} x {tk} do not fit the micro-kernel"
    );
    let n_pad = round_up(n, T::MR);
    let (d_pad, dv_pad) = (round_up(d, T::NR), round_up(dv, T::NR));
    // Rows whose dot products could leave the range (max |q_i| · max |k| · d ≥ MAX / 4, a
    // cheap bound) go to the exact rows too: the tiled pass would meet inf (or scale · inf).
    // The row maxima of |Q| and |K|, a column at a time (both are column-major; the inputs
    // are finite, checked before the kernel, and the maxima exact).
    let row_max_abs = |x: &DMatrixView<'_, T>| {
        let mut acc = vec![T::zero(); x.nrows()];
        for c in 0..x.ncols() {
            simd::max_abs_into(isa, &mut acc, pack::column(x, c));
        }
        acc
    };
    let kmax = simd::finite_max(isa, &row_max_abs(&p.k))
        .1
        .as_f64()
        .max(0.0);
    let limit = 2f64.powi(T::MAX_EXP - 2);
    // max |q_i| · max |k| · d per row: a bound on |q_i · k_j| and on its rounding error / ε.
    let dots: Vec<f64> = row_max_abs(&p.q)
        .iter()
        .map(|&q| q.as_f64() * kmax * d.max(1) as f64)
        .collect();
    let exact: Vec<bool> = lse
        .iter()
        .zip(&dots)
        .map(|(&l, &dot)| too_coarse(l) || dot >= limit)
        .collect();
    let ctx = Ctx {
        p,
        lse,
        delta,
        exact,
        packed: Packed::new(p, d_out, n_pad, isa, exec),
        isa,
        c: round_up(round_up(tk.min(m.max(1)), T::MR), T::NR),
        d_pad,
        dv_pad,
    };
    let queries = ranges(n, tq);
    let keys = ranges(m, tk);
    // dK and dV row-major with rows padded per key block to MR (so a block's rows are one
    // contiguous piece), dQ row-major with n_pad rows, d bias column-major.
    let key_rows = |(a, b): (usize, usize)| round_up(b - a, T::MR);
    let kv_rows: usize = keys.iter().map(|&r| key_rows(r)).sum();
    let mut dk = Buf::zeroed(kv_rows * d_pad);
    let mut dvb = Buf::zeroed(kv_rows * dv_pad);
    // dQ (n_pad x d_pad), then the row sums of the recomputed weights (n_pad).
    let mut dq = Buf::zeroed(n_pad * d_pad + n_pad);
    let mut dbias = p.bias.map(|_| vec![T::zero(); n * m]);
    // Key block J owns rows [start_J, start_J + key_rows(J)) of dK and dV.
    let key_blocks: Vec<(usize, usize)> = keys
        .iter()
        .scan(0, |at, &r| {
            let start = *at;
            *at += key_rows(r);
            Some((start, *at))
        })
        .collect();
    let dk_parts = split(&mut dk, d_pad, &key_blocks);
    let dv_parts = split(&mut dvb, dv_pad, &key_blocks);
    let db_parts: Vec<Option<&mut [T]>> = match dbias.as_deref_mut() {
        Some(data) => split(data, n, &keys).into_iter().map(Some).collect(),
        None => keys.iter().map(|_| None).collect(),
    };
    let outs = dk_parts
        .into_iter()
        .zip(dv_parts)
        .zip(db_parts)
        .map(|((dk, dv), dbias)| KeyOut { dk, dv, dbias });
    let q_rows = |(a, b): (usize, usize)| (a, a + round_up(b - a, T::MR));
    let q_blocks: Vec<(usize, usize)> = queries.iter().map(|&r| q_rows(r)).collect();
    // Key block J goes to lane J mod L; lane 0 accumulates straight into dq.
    let lanes = dq_lanes(keys.len(), dq.len(), size_of::<T>());
    let mut work: Vec<Vec<KeyWork<'_, T>>> = (0..lanes).map(|_| Vec::new()).collect();
    for (jb, (&key, out)) in keys.iter().zip(outs).enumerate() {
        work[jb % lanes].push((key, out));
    }
    let c = ctx.c;
    if exec.parallel() {
        let mut partials: Vec<Buf<T>> = (1..lanes).map(|_| Buf::zeroed(dq.len())).collect();
        let bufs = core::iter::once(&mut dq[..]).chain(partials.iter_mut().map(|b| &mut b[..]));
        // The largest lanes first (see `queued`): a causal mask's first key blocks carry
        // the most queries.
        let block = |&((j0, j1), _): &KeyWork<'_, T>| {
            let q = |&(i0, i1): &(usize, usize)| block_work(p.mask, i0..i1, j0..j1, (n, m));
            queries.iter().map(q).sum::<usize>()
        };
        let order = |(blocks, _): &(Vec<KeyWork<'_, T>>, &mut [T])| {
            core::cmp::Reverse(blocks.iter().map(block).sum::<usize>())
        };
        let jobs: Vec<_> = work.into_iter().zip(bufs).collect();
        let lane = |scr: &mut Scratch<T>, (blocks, buf): (Vec<KeyWork<'_, T>>, &mut [T])| {
            ctx.lane(&queries, &q_blocks, blocks, buf, scr);
        };
        queued(exec, jobs, order, || Scratch::new(tq, c), lane);
        // Element by element in lane order (the same sums as one thread makes), cut into
        // pieces across the threads.
        const PIECE: usize = 1 << 14;
        let pieces: Vec<(usize, &mut [T])> = dq.chunks_mut(PIECE).enumerate().collect();
        let sum = |_: &mut (), (i, piece): (usize, &mut [T])| {
            for part in &partials {
                add_into(piece, &part[i * PIECE..]);
            }
        };
        queued(exec, pieces, |&(i, _)| i, || (), sum);
    } else {
        let mut scr = Scratch::new(tq, c);
        let mut lanes_work = work.into_iter();
        if let Some(first) = lanes_work.next() {
            ctx.lane(&queries, &q_blocks, first, &mut dq, &mut scr);
        }
        let mut part: Option<Buf<T>> = None;
        for blocks in lanes_work {
            // One partial buffer, zeroed again for every lane after the first.
            let part = match &mut part {
                Some(p) => {
                    p.fill(T::zero());
                    p
                }
                None => part.insert(Buf::zeroed(dq.len())),
            };
            ctx.lane(&queries, &q_blocks, blocks, part, &mut scr);
            add_into(&mut dq, part);
        }
    }
    let key_row = |j: usize| key_blocks[j / tk].0 + j % tk;
    if ctx.exact.iter().any(|&e| e) {
        let mut out = ExactOut {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dvb,
            dbias: dbias.as_deref_mut(),
            d_pad,
            dv_pad,
        };
        exact_rows(&ctx, d_out, &key_row, &mut out);
    }
    let mismatch = check_row_sums(&ctx, &dq[n_pad * d_pad..], &dots);
    // Back to column-major nalgebra matrices, dropping the padding.
    // (Row i of each buffer is `stride` long, of which the first `cols` are the gradient.)
    let unpack = |buf: &[T], (stride, cols): (usize, usize), at: &dyn Fn(usize) -> usize, count| {
        let r: Vec<&[T]> = (0..count)
            .map(|i| &buf[at(i) * stride..][..stride])
            .collect();
        pack::matrix_of_rows(isa, &r, cols)
    };
    // Side by side on a pool: each is a fresh matrix, faulted in page by page.
    let jobs: [&(dyn Fn() -> DMatrix<T> + Sync); 3] = [
        &|| unpack(&dq, (d_pad, d), &|i| i, n),
        &|| unpack(&dk, (d_pad, d), &key_row, m),
        &|| unpack(&dvb, (dv_pad, dv), &key_row, m),
    ];
    let mut grads = all(exec, &jobs).into_iter();
    let mut next = || grads.next().unwrap_or_else(|| DMatrix::zeros(0, 0));
    Gradients {
        mismatch,
        dq: next(),
        dk: next(),
        dv: next(),
        dbias: dbias.map(|data| DMatrix::from_vec(n, m, data)),
    }
}

/// `D_i = ⟨dO_i, O_i⟩ = Σ_c dO_ic · O_ic` for every row (summed in column order, each product
/// rounded before its sum): the softmax VJP's row correction. A column at a time, as both
/// matrices are column-major.
pub(crate) fn row_corrections<T: Float>(
    isa: Isa,
    d_out: &DMatrixView<'_, T>,
    o: &DMatrixView<'_, T>,
) -> Vec<T> {
    assert_eq!(d_out.shape(), o.shape());
    let mut acc = vec![T::zero(); o.nrows()];
    for c in 0..o.ncols() {
        simd::add_products(isa, &mut acc, pack::column(d_out, c), pack::column(o, c));
    }
    acc
}

/// The first row (with its sum) whose weights, recomputed from the saved log-sum-exp, do not
/// sum to 1: the forward result was computed with another mask, options, Q or K than this
/// call. Rows without weight (lse = −inf) and the rows of the exact pass (which do not use
/// the saved lse) are not checked. The tolerance covers every rounding between the forward
/// and this pass: `2⁻⁶ + m·ε` for the sums and the exp, and `e^(8ε·c_i) − 1` with
/// `c_i = |scale|·dots_i + |lse_i| + 88` for the scores (`dots_i` bounds |q_i · k_j|; the
/// scores that carry weight lie within 88 of lse_i), so that rounding alone never fails the
/// check, however ill-conditioned the products; a mismatch that moves less weight than that
/// goes unnoticed.
fn check_row_sums<T: Float>(ctx: &Ctx<'_, T>, sums: &[T], dots: &[f64]) -> Option<(usize, T)> {
    let plan = &ctx.p.plan;
    let eps = T::EPSILON.as_f64();
    let scale = plan.scale.as_f64().abs();
    (0..plan.n).find_map(|i| {
        let l = ctx.lse[i];
        if ctx.exact[i] || !l.is_finite() {
            return None;
        }
        let conditioning = scale * dots[i] + l.as_f64().abs() + 88.0;
        let tol = 2f64.powi(-6) + plan.m as f64 * eps + (8.0 * eps * conditioning).exp_m1();
        let sum = sums[i];
        // (A NaN tolerance or sum fails neither test: never an error the math does not make.)
        ((sum.as_f64() - 1.0).abs() > tol).then_some((i, sum))
    })
}

/// `acc ← acc + x`, element by element: the lanes' partial dQ summed in lane order.
fn add_into<T: Float>(acc: &mut [T], x: &[T]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// Whether a row's log-sum-exp is too large for `exp(S − lse)` to be trusted (or infinite):
/// past
/// `2⁻¹⁰ / ε` (8192 in f32) one ulp of `lse` is over 2⁻¹⁰, and the rounding of the saved
/// lse alone would scale that row's weights by up to `e^(ulp/2)` (with a constant bias of
/// 1e8 in f32, every weight became 1). Such rows are recomputed exactly instead.
fn too_coarse<T: Float>(lse: T) -> bool {
    // +inf: scores that overflowed in the forward pass, which shared the weight equally.
    lse == T::INFINITY || (lse.is_finite() && lse.abs() >= T::of_f64(2f64.powi(-10)) / T::EPSILON)
}

/// Where [`exact_rows`] adds its gradients: the row-major padded buffers of the tiled pass.
struct ExactOut<'a, T> {
    dq: &'a mut [T],
    dk: &'a mut [T],
    dv: &'a mut [T],
    dbias: Option<&'a mut [T]>,
    d_pad: usize,
    dv_pad: usize,
}

/// The gradients of the rows the tiled pass left out, one row at a time the reference's way:
/// the row's scores, its softmax with the maximum subtracted (exact whatever the scores'
/// magnitude), `D = Σ_j P_j dP_j` from those weights, then `dS`, and the row's contributions
/// to dQ, dK, dV and d bias. Rows in order, keys in order: the same bits on any thread count.
fn exact_rows<T: Float>(
    ctx: &Ctx<'_, T>,
    d_out: DMatrixView<'_, T>,
    key_row: &dyn Fn(usize) -> usize,
    out: &mut ExactOut<'_, T>,
) {
    let p = ctx.p;
    let plan = &p.plan;
    let (n, m, d, dv) = (plan.n, plan.m, plan.d, plan.dv);
    let mut s = vec![T::zero(); m];
    let mut dp = vec![T::zero(); m];
    for i in (0..n).filter(|&i| ctx.exact[i]) {
        let x = raw_dot_row(&p.q, i, &p.k, plan.scale);
        for j in 0..m {
            s[j] = if p.mask.allows_in(n, m, i, j) {
                plan.finish(x[j], p.bias_at(i, j))
            } else {
                T::NEG_INFINITY
            };
            dp[j] = d_out.row(i).dot(&p.v.row(j));
        }
        softmax_exact_row(
            plan,
            &p.q,
            i,
            &p.k,
            &mut s,
            |j| p.mask.allows_in(n, m, i, j),
            |j| p.bias_at(i, j),
        );
        let delta = s
            .iter()
            .zip(&dp)
            .fold(T::zero(), |acc, (&pj, &g)| acc + pj * g);
        for j in 0..m {
            let pj = s[j];
            if pj == T::zero() {
                continue;
            }
            let ds = pj * (dp[j] - delta);
            if let Some(db) = out.dbias.as_deref_mut() {
                db[i + j * n] = ds;
            }
            let dx = ds * plan.score_grad_scaled(x[j]);
            let kr = key_row(j);
            for c in 0..d {
                out.dq[i * out.d_pad + c] += dx * p.k[(j, c)];
                out.dk[kr * out.d_pad + c] += dx * p.q[(i, c)];
            }
            for c in 0..dv {
                out.dv[kr * out.dv_pad + c] += pj * d_out[(i, c)];
            }
        }
    }
}
