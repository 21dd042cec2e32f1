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
//! (R = br rounded up to MR; padded rows and columns are zero.) Two passes spread the work
//! over threads without races: key blocks in parallel (dK, dV, d bias), then query blocks in
//! parallel (dQ), each block recomputed in both. On one thread the passes fuse into one, with
//! dQ_I updated in the very same order, so every thread count gives the same bits.

use super::Exec;
use super::pack::{self, round_up};
use super::threads::par::*;
use crate::Float;
use crate::mask::Block;
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
}

/// Everything a block reads, packed once per call.
struct Packed<T> {
    /// Q (n_pad x d), dO (n_pad x d_v): the left operands of X and dP, row-major.
    q_rows: Vec<T>,
    do_rows: Vec<T>,
    /// Kᵀ, Vᵀ in panels of NR keys: the right operands of X and dP.
    kt: Vec<T>,
    vt: Vec<T>,
    /// Q and dO in panels of NR columns (n_pad rows each): the right operands of dK and dV.
    q_panels: Vec<T>,
    do_panels: Vec<T>,
    /// K in panels of NR columns (m rows each): the right operand of dQ.
    k_panels: Vec<T>,
    n_pad: usize,
}

/// One block's working memory (row-major, padding kept at zero).
struct Scratch<T> {
    /// X, then dX (R x C).
    x: Vec<T>,
    /// dP (R x C).
    dp: Vec<T>,
    /// Pᵀ and dXᵀ (C x R).
    pt: Vec<T>,
    dxt: Vec<T>,
    /// One row's exponent arguments, then its probabilities (C).
    row: Vec<T>,
}

impl<T: Float> Scratch<T> {
    fn new(tq: usize, tk: usize) -> Self {
        let len = round_up(tq, T::MR) * round_up(tk, T::NR);
        Scratch {
            x: vec![T::zero(); len],
            dp: vec![T::zero(); len],
            pt: vec![T::zero(); len],
            dxt: vec![T::zero(); len],
            row: vec![T::zero(); round_up(tk, T::NR)],
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
    /// Columns of the score scratch (the key tile rounded up to NR).
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

impl<T: Float> Ctx<'_, T> {
    /// Recomputes block (queries `i0..i1`) x (keys `j0..j1`): leaves dX in `scr.x`
    /// (R x C), and Pᵀ, dXᵀ in `scr.pt`, `scr.dxt` (C x R), padding zero; writes dS into
    /// `dbias` (the columns of this key block, column-major, n rows) if given. Returns
    /// `false`, touching nothing, if the mask rules the block out.
    fn block(
        &self,
        (i0, i1): (usize, usize),
        (j0, j1): (usize, usize),
        scr: &mut Scratch<T>,
        dbias: Option<&mut [T]>,
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
            Rows {
                data: &pk.q_rows[i0 * d..],
                stride: d,
            },
            Panels {
                data: &pk.kt[(j0 / T::NR) * d * T::NR..],
                stride: d * T::NR,
            },
            Out {
                data: &mut scr.x,
                stride: c,
            },
        );
        simd::gemm(
            isa,
            shape(dv),
            Rows {
                data: &pk.do_rows[i0 * dv..],
                stride: dv,
            },
            Panels {
                data: &pk.vt[(j0 / T::NR) * dv * T::NR..],
                stride: dv * T::NR,
            },
            Out {
                data: &mut scr.dp,
                stride: c,
            },
        );
        // P, dS and dX, row by row. P_ij = exp(S_ij − lse_i) through the vectorised exp;
        // pairs with no weight (masked, or a fully masked row whose lse is −inf, where
        // S − lse would be NaN) get −inf, so exactly 0.
        scr.pt.fill(T::zero());
        scr.dxt.fill(T::zero());
        let mut dbias = dbias;
        for r in 0..rows {
            let x_row = &mut scr.x[r * c..(r + 1) * c];
            if r >= br {
                x_row.fill(T::zero());
                continue;
            }
            let i = i0 + r;
            let prob = &mut scr.row[..bc];
            self.exponent_args(i, j0, &x_row[..bc], class == Block::Partial, prob);
            simd::exp_in_place(isa, prob);
            let dp_row = &scr.dp[r * c..r * c + bc];
            for (jj, (&pij, &dpij)) in prob.iter().zip(dp_row).enumerate() {
                let ds = if pij == T::zero() {
                    T::zero()
                } else {
                    pij * (dpij - self.delta[i])
                };
                if let Some(db) = dbias.as_deref_mut() {
                    db[i + jj * n] = ds;
                }
                let dx = ds * plan.score_grad(x_row[jj]);
                scr.pt[jj * rows + r] = pij;
                scr.dxt[jj * rows + r] = dx;
                x_row[jj] = dx;
            }
            x_row[bc..].fill(T::zero());
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
        for (jj, (o, &xij)) in out.iter_mut().zip(x).enumerate() {
            *o = plan.score(xij, self.p.bias_at(i, j0 + jj)) - lse;
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
        let (rows, cm) = (round_up(br, T::MR), round_up(bc, T::MR));
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
                Rows {
                    data: &scr.pt,
                    stride: rows,
                },
                Panels {
                    data: &pk.do_panels[i0 * T::NR..],
                    stride,
                },
                Out {
                    data: out.dv,
                    stride: self.dv_pad,
                },
            );
        }
        if self.d_pad > 0 {
            simd::gemm(
                self.isa,
                shape(self.d_pad),
                Rows {
                    data: &scr.dxt,
                    stride: rows,
                },
                Panels {
                    data: &pk.q_panels[i0 * T::NR..],
                    stride,
                },
                Out {
                    data: out.dk,
                    stride: self.d_pad,
                },
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
            Rows {
                data: &scr.x,
                stride: self.c,
            },
            Panels {
                data: &self.packed.k_panels[j0 * T::NR..],
                stride: self.p.plan.m * T::NR,
            },
            Out {
                data: dq,
                stride: self.d_pad,
            },
        );
    }

    /// Pass 1, one key block: dK_J, dV_J and the columns J of d bias over every query block;
    /// with `dq` (one piece per query block) also dQ, the one-pass loop of FlashAttention-2,
    /// making the same dQ_I updates in the same order as pass 2.
    fn key_block(
        &self,
        queries: &[(usize, usize)],
        (j0, j1): (usize, usize),
        mut out: KeyOut<'_, T>,
        mut dq: Option<&mut [&mut [T]]>,
        scr: &mut Scratch<T>,
    ) {
        for (ib, &(i0, i1)) in queries.iter().enumerate() {
            if !self.block((i0, i1), (j0, j1), scr, out.dbias.as_deref_mut()) {
                continue;
            }
            self.add_dk_dv(i0, i1 - i0, j1 - j0, scr, &mut out);
            if let Some(dq) = dq.as_deref_mut() {
                self.add_dq(i1 - i0, (j0, j1 - j0), scr, dq[ib]);
            }
        }
    }

    /// Pass 2, one query block: dQ_I over every key block.
    fn query_block(
        &self,
        keys: &[(usize, usize)],
        (i0, i1): (usize, usize),
        dq: &mut [T],
        scr: &mut Scratch<T>,
    ) {
        for &(j0, j1) in keys {
            if self.block((i0, i1), (j0, j1), scr, None) {
                self.add_dq(i1 - i0, (j0, j1 - j0), scr, dq);
            }
        }
    }
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
        let (head, tail) = std::mem::take(&mut data).split_at_mut(per * (b - a));
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
    let kmax = p.k.iter().fold(0.0_f64, |a, v| a.max(v.as_f64().abs()));
    let limit = 2f64.powi(T::MAX_EXP - 2);
    let exact: Vec<bool> = lse
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            let qmax =
                p.q.row(i)
                    .iter()
                    .fold(0.0_f64, |a, v| a.max(v.as_f64().abs()));
            too_coarse(l) || qmax * kmax * d.max(1) as f64 >= limit
        })
        .collect();
    let ctx = Ctx {
        p,
        lse,
        delta,
        exact,
        packed: Packed {
            q_rows: pack::rows(&p.q, |x| x, n_pad),
            do_rows: pack::rows(&d_out, |x| x, n_pad),
            kt: pack::panels_of_transpose(&p.k, T::NR),
            vt: pack::panels_of_transpose(&p.v, T::NR),
            q_panels: pack::panels(&p.q, T::NR, n_pad),
            do_panels: pack::panels(&d_out, T::NR, n_pad),
            k_panels: pack::panels(&p.k, T::NR, m),
            n_pad,
        },
        isa,
        c: round_up(tk.min(m.max(1)), T::NR),
        d_pad,
        dv_pad,
    };
    let queries = ranges(n, tq);
    let keys = ranges(m, tk);
    // dK and dV row-major with rows padded per key block to MR (so a block's rows are one
    // contiguous piece), dQ row-major with n_pad rows, d bias column-major.
    let key_rows = |(a, b): (usize, usize)| round_up(b - a, T::MR);
    let kv_rows: usize = keys.iter().map(|&r| key_rows(r)).sum();
    let mut dk = vec![T::zero(); kv_rows * d_pad];
    let mut dvb = vec![T::zero(); kv_rows * dv_pad];
    let mut dq = vec![T::zero(); n_pad * d_pad];
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
    if exec.parallel() {
        let outs: Vec<KeyOut<'_, T>> = outs.collect();
        keys.par_iter().zip(outs).for_each_init(
            || Scratch::new(tq, tk),
            |scr, (&key, out)| ctx.key_block(&queries, key, out, None, scr),
        );
        queries
            .par_iter()
            .zip(split(
                &mut dq[..q_blocks.last().map_or(0, |b| b.1) * d_pad],
                d_pad,
                &q_blocks,
            ))
            .for_each_init(
                || Scratch::new(tq, tk),
                |scr, (&query, dq)| ctx.query_block(&keys, query, dq, scr),
            );
    } else {
        let mut scr = Scratch::new(tq, tk);
        let end = q_blocks.last().map_or(0, |b| b.1);
        let mut dq_parts = split(&mut dq[..end * d_pad], d_pad, &q_blocks);
        for (&key, out) in keys.iter().zip(outs) {
            ctx.key_block(&queries, key, out, Some(&mut dq_parts), &mut scr);
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
    // Back to column-major nalgebra matrices, dropping the padding.
    Gradients {
        dq: DMatrix::from_fn(n, d, |i, c| dq[i * d_pad + c]),
        dk: DMatrix::from_fn(m, d, |j, c| dk[key_row(j) * d_pad + c]),
        dv: DMatrix::from_fn(m, dv, |j, c| dvb[key_row(j) * dv_pad + c]),
        dbias: dbias.map(|data| DMatrix::from_vec(n, m, data)),
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
