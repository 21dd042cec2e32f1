//! The two per-row steps of the online softmax, written once: exponentiate a score row
//! against its running maximum, and rescale an accumulator row.

use super::exp::{exp_lanes, exp_lanes_part, exp_vector, exp2};
use super::{Element, Isa, Kernel, Lanes, MAX_LANES, dispatch};

/// The exponentiation of one score row against its running maximum (see `softmax_row`, the
/// tests' entry point, and [`online_step`]).
struct SoftmaxRow<'a, E> {
    row: &'a mut [E],
    m_old: E,
    /// The row's maximum, if the caller has it already (see [`finite_max`]).
    row_max: Option<E>,
}

impl<E: Element> Kernel<E> for SoftmaxRow<'_, E> {
    type Output = (E, E);

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) -> (E, E) {
        let SoftmaxRow {
            row,
            m_old,
            row_max,
        } = self;
        let l = S::LANES;
        assert!(row.len().is_multiple_of(l), "score row not padded to {l}");
        let m_new = match row_max {
            Some(mx) => {
                if mx > m_old {
                    mx
                } else {
                    m_old
                }
            }
            None => {
                // Two independent chains for the maximum and for the sum: half the latency.
                let (mut mx0, mut mx1) = (s.splat(m_old), s.splat(m_old));
                let mut pairs = row.chunks_exact(2 * l);
                for pair in &mut pairs {
                    mx0 = s.max(mx0, s.load(&pair[..l]));
                    mx1 = s.max(mx1, s.load(&pair[l..]));
                }
                if !pairs.remainder().is_empty() {
                    mx0 = s.max(mx0, s.load(pairs.remainder()));
                }
                s.reduce_max(s.max(mx0, mx1))
            }
        };
        if m_new == E::NEG_INF {
            row.fill(E::ZERO);
            return (m_new, E::ZERO);
        }
        let mv = s.splat(m_new);
        let (mut s0, mut s1) = (s.splat(E::ZERO), s.splat(E::ZERO));
        let mut pairs = row.chunks_exact_mut(2 * l);
        for pair in &mut pairs {
            let (c0, c1) = pair.split_at_mut(l);
            let p0 = exp2(s, s.sub(s.load(c0), mv));
            let p1 = exp2(s, s.sub(s.load(c1), mv));
            s.store(c0, p0);
            s.store(c1, p1);
            s0 = s.add(s0, p0);
            s1 = s.add(s1, p1);
        }
        let rest = pairs.into_remainder();
        if !rest.is_empty() {
            let p0 = exp2(s, s.sub(s.load(rest), mv));
            s.store(rest, p0);
            s0 = s.add(s0, p0);
        }
        (m_new, s.reduce_sum(s.add(s0, s1)))
    }
}

/// One online-softmax step on a score row in log₂ units (length a multiple of the vector
/// width; the kernel pads rows to [`Element::NR`]): `m_new = max(m_old, max(row))`,
/// `row ← 2^(row − m_new)`; returns `(m_new, Σ row)`. If `m_new = −inf` (nothing allowed
/// yet) the row becomes zeros and `(−inf, 0)` is returned.
///
/// `row_max`, if given, is the row's maximum (from [`finite_max`] on the same scores): the
/// pass that finds it is skipped. Without NaN the result is the same bits either way.
#[cfg(test)]
pub fn softmax_row<E: Element>(isa: Isa, row: &mut [E], m_old: E, row_max: Option<E>) -> (E, E) {
    dispatch(
        isa,
        SoftmaxRow {
            row,
            m_old,
            row_max,
        },
    )
}

/// One online-softmax step of one row inside a kernel (see [`online_step`]).
#[inline(always)]
fn online_row<E: Element, S: Lanes<E>>(
    s: S,
    (row, row_max): (&mut [E], Option<E>),
    max: &mut E,
    sum: &mut E,
    o: &mut [E],
) {
    let m_old = *max;
    let (m_new, row_sum) = SoftmaxRow {
        row,
        m_old,
        row_max,
    }
    .run(s);
    if m_new == E::NEG_INF {
        return; // nothing allowed so far: P = 0, O and the sum stay 0
    }
    if m_new > m_old {
        // O ← α·O, ℓ ← α·ℓ with α = 2^(m_old − m_new) (0 while m_old = −inf, when O is
        // still 0 and needs no rescaling).
        let alpha = (m_old - m_new).std_exp2();
        *sum = *sum * alpha + row_sum;
        if m_old != E::NEG_INF {
            ScaleRow { row: o, alpha }.run(s);
        }
        *max = m_new;
    } else {
        *sum += row_sum;
    }
}

/// See [`online_step`].
struct OnlineStep<'a, E> {
    row: &'a mut [E],
    row_max: Option<E>,
    max: &'a mut E,
    sum: &'a mut E,
    o: &'a mut [E],
}

impl<E: Element> Kernel<E> for OnlineStep<'_, E> {
    type Output = ();

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) {
        online_row(s, (self.row, self.row_max), self.max, self.sum, self.o);
    }
}

/// One online-softmax step for one row: `row` (scores in log₂ units, padded with −inf to a
/// multiple of the vector width) becomes `P = 2^(row − max')` with `max' = max(max, row)`
/// (what `softmax_row` computes); the running `sum` and the accumulator row `o` are rescaled by
/// `α = 2^(max − max')` when the maximum moves, and `Σ P` is added to the sum. The caller
/// then adds `P · V` to `o`. `row_max` is the row's maximum if the caller found it.
pub fn online_step<E: Element>(
    isa: Isa,
    (row, row_max): (&mut [E], Option<E>),
    max: &mut E,
    sum: &mut E,
    o: &mut [E],
) {
    dispatch(
        isa,
        OnlineStep {
            row,
            row_max,
            max,
            sum,
            o,
        },
    );
}

/// The rows of a block of scores and the tile's running state for them, for
/// [`online_rows`].
pub struct ScoreRows<'a, E> {
    /// The score rows (raw products in log₂ units), `stride` apart, each `pad` long (a
    /// multiple of the vector width): `cols` scores, then padding.
    pub s: &'a mut [E],
    /// See [`ScoreRows::s`].
    pub stride: usize,
    /// See [`ScoreRows::s`].
    pub cols: usize,
    /// See [`ScoreRows::s`].
    pub pad: usize,
    /// Per row, the columns `a .. b <= cols` its mask allows (`0 .. cols` in a full block).
    pub runs: &'a [(usize, usize)],
    /// Per row: the running maximum and sum, whether any key was allowed, whether a raw
    /// product was not finite.
    pub max: &'a mut [E],
    /// See [`ScoreRows::max`].
    pub sum: &'a mut [E],
    /// See [`ScoreRows::max`].
    pub seen: &'a mut [bool],
    /// See [`ScoreRows::max`].
    pub overflow: &'a mut [bool],
    /// The accumulator rows, `o_stride` apart.
    pub o: &'a mut [E],
    /// See [`ScoreRows::o`].
    pub o_stride: usize,
}

impl<E: Element> Kernel<E> for ScoreRows<'_, E> {
    type Output = ();

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) {
        let ScoreRows {
            s: scores,
            stride,
            cols,
            pad,
            runs,
            max,
            sum,
            seen,
            overflow,
            o,
            o_stride,
        } = self;
        for (r, &(a, b)) in runs.iter().enumerate() {
            let row = &mut scores[r * stride..r * stride + pad];
            assert!(a <= b && b <= cols && cols <= pad);
            row[..a].fill(E::NEG_INF);
            row[b..].fill(E::NEG_INF);
            let row_max = if a == b {
                E::NEG_INF
            } else {
                let (finite, mx) = FiniteMax { x: &row[a..b] }.run(s);
                seen[r] = true;
                overflow[r] |= !finite;
                mx
            };
            let o_row = &mut o[r * o_stride..(r + 1) * o_stride];
            online_row(s, (row, Some(row_max)), &mut max[r], &mut sum[r], o_row);
        }
    }
}

/// The whole softmax row step of a block's rows in one dispatch, where the scores need
/// nothing but the mask (no softcap, no bias) and each row's allowed keys are one run: per
/// row, everything outside its run set to −inf, one scan of the run for its maximum and
/// finiteness ([`finite_max`]: `seen` and `overflow` are updated), then [`online_step`]
/// with that maximum. The same bits as those calls one by one.
pub fn online_rows<E: Element>(isa: Isa, rows: ScoreRows<'_, E>) {
    dispatch(isa, rows);
}

/// See [`scale_row`].
struct ScaleRow<'a, E> {
    row: &'a mut [E],
    alpha: E,
}

impl<E: Element> Kernel<E> for ScaleRow<'_, E> {
    type Output = ();

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) {
        let av = s.splat(self.alpha);
        let mut chunks = self.row.chunks_exact_mut(S::LANES);
        for c in &mut chunks {
            s.store(c, s.mul(s.load(c), av));
        }
        for x in chunks.into_remainder() {
            *x *= self.alpha;
        }
    }
}

/// `row ← alpha · row` (any length).
pub fn scale_row<E: Element>(isa: Isa, row: &mut [E], alpha: E) {
    dispatch(isa, ScaleRow { row, alpha });
}

/// See [`max_abs_into`].
struct MaxAbsInto<'a, E> {
    acc: &'a mut [E],
    x: &'a [E],
}

impl<E: Element> Kernel<E> for MaxAbsInto<'_, E> {
    type Output = ();

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) {
        let MaxAbsInto { acc, x } = self;
        assert_eq!(acc.len(), x.len());
        let zero = s.splat(E::ZERO);
        // |x| = max(x, 0 − x): exact, and +0 for either zero.
        let step = |a: S::V, v: S::V| s.max(s.max(v, s.sub(zero, v)), a);
        let mut xs = x.chunks_exact(S::LANES);
        let mut accs = acc.chunks_exact_mut(S::LANES);
        for (xc, ac) in (&mut xs).zip(&mut accs) {
            s.store(ac, step(s.load(ac), s.load(xc)));
        }
        let (xt, at) = (xs.remainder(), accs.into_remainder());
        if !xt.is_empty() {
            s.store_part(at, step(s.load_part(at, E::ZERO), s.load_part(xt, E::ZERO)));
        }
    }
}

/// `acc[i] ← max(acc[i], |x[i]|)` for every `i` (`acc` and `x` of equal length): the
/// running row maxima of a column-major matrix's magnitudes, a column at a time. Exact; with
/// a NaN in `x` or `acc` the result is unspecified.
pub fn max_abs_into<E: Element>(isa: Isa, acc: &mut [E], x: &[E]) {
    dispatch(isa, MaxAbsInto { acc, x });
}

/// See [`add_products`].
struct AddProducts<'a, E> {
    acc: &'a mut [E],
    a: &'a [E],
    b: &'a [E],
}

impl<E: Element> Kernel<E> for AddProducts<'_, E> {
    type Output = ();

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) {
        let AddProducts { acc, a, b } = self;
        assert!(acc.len() == a.len() && acc.len() == b.len());
        let l = S::LANES;
        let whole = acc.len() - acc.len() % l;
        for j in (0..whole).step_by(l) {
            let sum = s.add(s.load(&acc[j..]), s.mul(s.load(&a[j..]), s.load(&b[j..])));
            s.store(&mut acc[j..], sum);
        }
        let (at, bt, ct) = (&a[whole..], &b[whole..], &mut acc[whole..]);
        if !ct.is_empty() {
            let product = s.mul(s.load_part(at, E::ZERO), s.load_part(bt, E::ZERO));
            let sum = s.add(s.load_part(ct, E::ZERO), product);
            s.store_part(ct, sum);
        }
    }
}

/// `acc[i] ← acc[i] + a[i] · b[i]` for every `i` (equal lengths), the product rounded and
/// then the sum, as the scalar expression (no fused multiply-add): the same bits as a plain
/// loop. Row dot products of two column-major matrices, accumulated a column at a time.
pub fn add_products<E: Element>(isa: Isa, acc: &mut [E], a: &[E], b: &[E]) {
    dispatch(isa, AddProducts { acc, a, b });
}

/// See [`affine_row`].
struct AffineRow<'a, E> {
    x: &'a [E],
    a: E,
    b: E,
    out: &'a mut [E],
}

impl<E: Element> Kernel<E> for AffineRow<'_, E> {
    type Output = ();

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) {
        let AffineRow { x, a, b, out } = self;
        assert_eq!(x.len(), out.len());
        let (av, bv) = (s.splat(a), s.splat(b));
        let mut xs = x.chunks_exact(S::LANES);
        let mut os = out.chunks_exact_mut(S::LANES);
        for (xc, oc) in (&mut xs).zip(&mut os) {
            s.store(oc, s.sub(s.mul(av, s.load(xc)), bv));
        }
        for (&xi, o) in xs.remainder().iter().zip(os.into_remainder()) {
            *o = a * xi - b;
        }
    }
}

/// `out ← a · x − b`, two roundings per entry as the scalar expression (any length; `x` and
/// `out` of equal length).
pub fn affine_row<E: Element>(isa: Isa, x: &[E], a: E, b: E, out: &mut [E]) {
    dispatch(isa, AffineRow { x, a, b, out });
}

/// See [`softmax_grad_row`].
struct SoftmaxGradRow<'a, E> {
    args: &'a [E],
    dp: &'a mut [E],
    dx: &'a mut [E],
    delta: E,
    g: E,
    tiny: E,
}

impl<E: Element> Kernel<E> for SoftmaxGradRow<'_, E> {
    type Output = E;

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) -> E {
        let SoftmaxGradRow {
            args,
            dp,
            dx,
            delta,
            g,
            tiny,
        } = self;
        assert!(args.len() == dp.len() && args.len() == dx.len());
        let l = S::LANES;
        let whole = args.len() - args.len() % l;
        let mut grad = GradLanes::new(s, delta, g, tiny);
        for j in (0..whole).step_by(l) {
            grad.step(
                exp_lanes::<E, S, false>(s, &args[j..]),
                &mut dp[j..],
                &mut dx[j..],
            );
        }
        // The tail's weights as one vector, its sums one by one.
        let (rest, mut p) = (&args[whole..], [E::ZERO; MAX_LANES]);
        if !rest.is_empty() {
            s.store(&mut p, exp_lanes_part::<E, S, false>(s, rest));
        }
        grad.finish(&p, &mut dp[whole..], &mut dx[whole..])
    }
}

/// The softmax-gradient arithmetic of [`softmax_grad_row`] after the weights: `Σ P` in one
/// vector, then `dS = P ⊙ (dP − D)` (0 where `P < tiny`), `dp ← P`, `dx ← g · dS`.
struct GradLanes<E: Element, S: Lanes<E>> {
    s: S,
    sum: S::V,
    delta: E,
    g: E,
    tiny: E,
    /// `delta` and `g` in every lane.
    dv: S::V,
    gv: S::V,
}

impl<E: Element, S: Lanes<E>> GradLanes<E, S> {
    #[inline(always)]
    fn new(s: S, delta: E, g: E, tiny: E) -> Self {
        let (sum, dv, gv) = (s.splat(E::ZERO), s.splat(delta), s.splat(g));
        GradLanes {
            s,
            sum,
            delta,
            g,
            tiny,
            dv,
            gv,
        }
    }

    /// One vector of weights `pv` for the first `LANES` entries of `dp` and `dx`.
    #[inline(always)]
    fn step(&mut self, pv: S::V, dp: &mut [E], dx: &mut [E]) {
        let s = self.s;
        self.sum = s.add(self.sum, pv);
        // A pair without weight gives exactly 0, even where dP − D is not finite.
        let ds = s.zero_below(pv, self.tiny, s.mul(pv, s.sub(s.load(dp), self.dv)));
        s.store(dp, pv);
        s.store(dx, s.mul(ds, self.gv));
    }

    /// The tail (`dp.len() < LANES` entries, weights `p`) one by one; returns `Σ P`.
    #[inline(always)]
    fn finish(self, p: &[E], dp: &mut [E], dx: &mut [E]) -> E {
        let mut total = self.s.reduce_sum(self.sum);
        for ((&pj, dpj), dxj) in p.iter().zip(dp).zip(dx) {
            total += pj;
            let ds = if pj < self.tiny {
                E::ZERO
            } else {
                pj * (*dpj - self.delta)
            };
            *dpj = pj;
            *dxj = ds * self.g;
        }
        total
    }
}

/// The rows of a backward block whose weights need nothing but `scale` and the saved
/// log-sum-exp (no mask inside the block, no softcap, no bias), for [`softmax_grad_rows`].
pub struct GradRows<'a, E> {
    /// The raw products `X = Q_I K_Jᵀ`, rows `stride` apart, `cols` of each used: they become
    /// `dX = scale · dS`, and the rest of each row 0.
    pub x: &'a mut [E],
    /// `dP = dO_I V_Jᵀ`, laid out as `x`: it becomes `P`, and the rest of each row 0.
    pub dp: &'a mut [E],
    /// See [`GradRows::x`].
    pub stride: usize,
    /// See [`GradRows::x`].
    pub cols: usize,
    /// Per row: the log-sum-exp (`−inf`: the row has no weight), whether the row has no
    /// weight here anyway (left to the exact pass), the correction `D`, and the running sum
    /// of its weights, to which the row's `Σ P` is added.
    pub lse: &'a [E],
    /// See [`GradRows::lse`].
    pub skip: &'a [bool],
    /// See [`GradRows::lse`].
    pub delta: &'a [E],
    /// See [`GradRows::lse`].
    pub sum: &'a mut [E],
    /// The score scale (also the score's derivative).
    pub scale: E,
    /// See [`softmax_grad_row`].
    pub tiny: E,
}

impl<E: Element> Kernel<E> for GradRows<'_, E> {
    type Output = ();

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) {
        let GradRows {
            x,
            dp,
            stride,
            cols,
            lse,
            skip,
            delta,
            sum,
            scale,
            tiny,
        } = self;
        let rows = lse.len();
        assert!(skip.len() == rows && delta.len() == rows && sum.len() == rows);
        assert!(cols <= stride && x.len() >= rows * stride && dp.len() >= rows * stride);
        let (l, av) = (S::LANES, s.splat(scale));
        let whole = cols - cols % l;
        for r in 0..rows {
            let (x_row, dp_row) = (
                &mut x[r * stride..][..stride],
                &mut dp[r * stride..][..stride],
            );
            // `affine_row` and `exponent_args`' arguments: `scale · x − lse`, or −inf.
            let none = lse[r] == E::NEG_INF || skip[r];
            let bv = s.splat(lse[r]);
            let arg = |v: S::V| {
                if none {
                    s.splat(E::NEG_INF)
                } else {
                    s.sub(s.mul(av, v), bv)
                }
            };
            let mut grad = GradLanes::new(s, delta[r], scale, tiny);
            for j in (0..whole).step_by(l) {
                let pv = exp_vector::<E, S, false>(s, arg(s.load(&x_row[j..])));
                grad.step(pv, &mut dp_row[j..], &mut x_row[j..]);
            }
            // The tail as one vector, zero-padded: the same rule, lane by lane the same
            // roundings as the scalar expression; the padding lanes' weights are not read.
            let mut p = [E::ZERO; MAX_LANES];
            if whole < cols {
                let mut tail = [E::ZERO; MAX_LANES];
                tail[..cols - whole].copy_from_slice(&x_row[whole..cols]);
                let pv = exp_vector::<E, S, false>(s, arg(s.load(&tail)));
                s.store(&mut p, pv);
            }
            sum[r] += grad.finish(&p, &mut dp_row[whole..cols], &mut x_row[whole..cols]);
            x_row[cols..].fill(E::ZERO);
            dp_row[cols..].fill(E::ZERO);
        }
    }
}

/// The backward pass's softmax step over a whole block in one dispatch, where every weight is
/// `P_ij = exp(scale · X_ij − lse_i)` (see [`GradRows`]): per row, what
/// [`affine_row`] then [`softmax_grad_row`] (with `g = scale`) make, the same bits, without
/// the arguments' round trip through memory.
pub fn softmax_grad_rows<E: Element>(isa: Isa, rows: GradRows<'_, E>) {
    dispatch(isa, rows);
}

/// One row of the backward pass's softmax step, for a constant score derivative `g`, from
/// the weights' exponent arguments `args` (`S − lse`, −inf where a pair has no weight): the
/// weights `P = eˣ` ([`exp_in_place`](super::exp_in_place)'s values), `dS = P ⊙ (dP − D)`
/// (0 where `P < tiny`, which callers set to the smallest normal number: the vector exp
/// flushes smaller weights to 0), then `dp ← P` and `dx ← g · dS` (all of equal length), in
/// one pass. Returns `Σ P`.
pub fn softmax_grad_row<E: Element>(
    isa: Isa,
    args: &[E],
    (dp, dx): (&mut [E], &mut [E]),
    delta: E,
    g: E,
    tiny: E,
) -> E {
    dispatch(
        isa,
        SoftmaxGradRow {
            args,
            dp,
            dx,
            delta,
            g,
            tiny,
        },
    )
}

/// See [`all_finite`].
struct AllFinite<I> {
    parts: I,
}

impl<'a, E: Element, I: Iterator<Item = &'a [E]>> Kernel<E> for AllFinite<I> {
    type Output = bool;

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) -> bool {
        // acc + 0·x stays 0 for every finite x and becomes NaN at the first infinity or NaN:
        // a branch-free scan at memory speed. Eight chains, so that the fused multiply-add's
        // latency (4-5 cycles) does not hold the loads back (two chains ran at a quarter of
        // the load rate on a Zen 2).
        const CHAINS: usize = 8;
        let l = S::LANES;
        let zero = s.splat(E::ZERO);
        let mut acc = [zero; CHAINS];
        for x in self.parts {
            let mut groups = x.chunks_exact(CHAINS * l);
            for group in &mut groups {
                for (a, v) in acc.iter_mut().zip(group.chunks_exact(l)) {
                    *a = s.mul_add(s.load(v), zero, *a);
                }
            }
            let mut vectors = groups.remainder().chunks_exact(l);
            for (a, v) in acc.iter_mut().zip(&mut vectors) {
                *a = s.mul_add(s.load(v), zero, *a);
            }
            let rest = vectors.remainder();
            if !rest.is_empty() {
                // The tail as one vector, the missing lanes 0 (finite).
                acc[CHAINS - 1] = s.mul_add(s.load_part(rest, E::ZERO), zero, acc[CHAINS - 1]);
            }
        }
        let all = acc.iter().fold(zero, |x, &a| s.add(x, a));
        s.reduce_sum(all) == E::ZERO
    }
}

/// Whether every entry of `x` is finite (no NaN, no infinity).
pub fn all_finite<E: Element>(isa: Isa, x: &[E]) -> bool {
    dispatch(
        isa,
        AllFinite {
            parts: core::iter::once(x),
        },
    )
}

/// Whether every entry of every slice of `parts` is finite: [`all_finite`] of several
/// slices (the columns of a view) in one call.
pub fn all_finite_parts<'a, E: Element>(isa: Isa, parts: impl Iterator<Item = &'a [E]>) -> bool {
    dispatch(isa, AllFinite { parts })
}

/// See [`scale_parts_into`].
struct ScaleParts<'a, I, E> {
    parts: I,
    a: E,
    b: E,
    dst: &'a mut [E],
    stride: usize,
    pad: usize,
}

impl<'a, 'b, E: Element, I: Iterator<Item = &'b [E]>> Kernel<E> for ScaleParts<'a, I, E> {
    type Output = bool;

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) -> bool {
        let ScaleParts {
            parts,
            a,
            b,
            dst,
            stride,
            pad,
        } = self;
        let l = S::LANES;
        let (zero, av, bv) = (s.splat(E::ZERO), s.splat(a), s.splat(b));
        let twice = b != E::ONE;
        // The scan of [`AllFinite`] (acc + 0·x turns NaN at the first non-finite x), two
        // chains: the parts are short (a query tile's rows).
        let mut acc = [zero; 2];
        for (t, x) in parts.enumerate() {
            let row = &mut dst[t * stride..t * stride + pad];
            let (body, rest) = row.split_at_mut(x.len());
            let mut src = x.chunks_exact(l);
            let mut out = body.chunks_exact_mut(l);
            for (j, (v, o)) in (&mut src).zip(&mut out).enumerate() {
                let v = s.load(v);
                acc[j % 2] = s.mul_add(v, zero, acc[j % 2]);
                let w = s.mul(v, av);
                s.store(o, if twice { s.mul(w, bv) } else { w });
            }
            let (tail, o) = (src.remainder(), out.into_remainder());
            if !tail.is_empty() {
                // The tail as one vector (masked, where the instruction set can), the
                // missing lanes 0: the same products lane by lane.
                let v = s.load_part(tail, E::ZERO);
                acc[1] = s.mul_add(v, zero, acc[1]);
                let w = s.mul(v, av);
                s.store_part(o, if twice { s.mul(w, bv) } else { w });
            }
            rest.fill(E::ZERO);
        }
        s.reduce_sum(s.add(acc[0], acc[1])) == E::ZERO
    }
}

/// `dst[t·stride + i] = (parts[t][i] · a) · b` for every part `t` and `i < parts[t].len()`
/// (one rounding per multiplication, and the second left out where `b = 1`: the same bits
/// as [`scale_row`] by `a` and then by `b`), and zeros from there to `t·stride + pad`;
/// returns whether every entry of every part is finite ([`all_finite_parts`]). Copies the
/// columns of a query tile into the kernel's scratch, scaled, scanned and padded in one
/// pass and one dispatch. Panics if a part is longer than `pad` or `dst` is too short.
pub fn scale_parts_into<'a, E: Element>(
    isa: Isa,
    parts: impl Iterator<Item = &'a [E]>,
    (a, b): (E, E),
    dst: &mut [E],
    (stride, pad): (usize, usize),
) -> bool {
    dispatch(
        isa,
        ScaleParts {
            parts,
            a,
            b,
            dst,
            stride,
            pad,
        },
    )
}

/// See [`finite_max`].
struct FiniteMax<'a, E> {
    x: &'a [E],
}

impl<E: Element> Kernel<E> for FiniteMax<'_, E> {
    type Output = (bool, E);

    #[inline(always)]
    fn run<S: Lanes<E>>(self, s: S) -> (bool, E) {
        // The scan of [`AllFinite`] and the maximum of [`SoftmaxRow`]'s first pass, on one
        // load of each vector.
        // Four chains of each (see [`AllFinite`] on the latency).
        const CHAINS: usize = 4;
        let l = S::LANES;
        let (zero, low) = (s.splat(E::ZERO), s.splat(E::NEG_INF));
        let (mut acc, mut mx) = ([zero; CHAINS], [low; CHAINS]);
        let mut groups = self.x.chunks_exact(CHAINS * l);
        for group in &mut groups {
            for ((a, m), v) in acc.iter_mut().zip(&mut mx).zip(group.chunks_exact(l)) {
                let v = s.load(v);
                *a = s.mul_add(v, zero, *a);
                *m = s.max(*m, v);
            }
        }
        let mut vectors = groups.remainder().chunks_exact(l);
        for v in &mut vectors {
            let v = s.load(v);
            acc[0] = s.mul_add(v, zero, acc[0]);
            mx[0] = s.max(mx[0], v);
        }
        let rest = vectors.remainder();
        if let Some(&first) = rest.first() {
            // The tail as one vector, the missing lanes a copy of its first entry (which
            // changes neither the maximum nor the scan).
            let v = s.load_part(rest, first);
            acc[1] = s.mul_add(v, zero, acc[1]);
            mx[1] = s.max(mx[1], v);
        }
        let scan = s.reduce_sum(acc.iter().fold(zero, |x, &a| s.add(x, a)));
        let max = s.reduce_max(mx.iter().fold(low, |x, &m| s.max(x, m)));
        (scan == E::ZERO, max)
    }
}

/// Whether every entry of `x` is finite, and the largest entry (−inf for an empty `x`), in
/// one pass: what a score row's overflow check and the online softmax's maximum both need.
/// The maximum is meaningless when an entry is NaN.
pub fn finite_max<E: Element>(isa: Isa, x: &[E]) -> (bool, E) {
    dispatch(isa, FiniteMax { x })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    /// Against a plain loop on every instruction set: the maximum exactly, the probabilities
    /// and the sum to rounding; a row with nothing allowed.
    #[test]
    fn all_finite_finds_every_non_finite_entry() {
        for isa in Isa::available() {
            for len in [0, 1, 7, 16, 33, 100] {
                let x: Vec<f32> = (0..len).map(|i| (i as f32 - 50.0) * 6e36).collect();
                assert!(all_finite(isa, &x), "{isa:?} {len}");
                for at in 0..len {
                    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                        let mut y = x.clone();
                        y[at] = bad;
                        assert!(!all_finite(isa, &y), "{isa:?} {len} {at} {bad}");
                    }
                }
                // Values at the edge of the range are finite; 0·MAX is 0, not NaN.
                let mut z: Vec<f64> = (0..len)
                    .map(|i| [f64::MAX, -f64::MAX, 5e-324][i % 3])
                    .collect();
                assert!(all_finite(isa, &z), "{isa:?} {len}");
                if let Some(last) = z.last_mut() {
                    *last = f64::INFINITY;
                    assert!(!all_finite(isa, &z), "{isa:?} {len}");
                }
            }
        }
    }

    /// `scale_parts_into` against its definition entry by entry on every instruction set:
    /// `(x · a) · b` rounded twice (once where `b = 1`), zeros up to the padding, entries past
    /// it untouched; its finiteness answer is `all_finite_parts`' on every part and tail.
    #[test]
    fn scale_parts_into_is_two_products_a_pad_and_a_scan() {
        fn check<E: Element + From<i16>>(isa: Isa, a: E, b: E) {
            let (stride, pad) = (53, 45);
            for lens in [vec![], vec![0, 3], vec![40, 45, 17, 1, 33]] {
                let parts: Vec<Vec<E>> = lens
                    .iter()
                    .enumerate()
                    .map(|(t, &len)| {
                        (0..len)
                            .map(|i| E::from(((i * 37 + t * 11) % 201) as i16 - 100))
                            .collect()
                    })
                    .collect();
                let sentinel = E::from(7777);
                let mut dst = vec![sentinel; stride * parts.len()];
                let finite = scale_parts_into(
                    isa,
                    parts.iter().map(|p| &p[..]),
                    (a, b),
                    &mut dst,
                    (stride, pad),
                );
                assert!(finite, "{isa:?} {lens:?}");
                for (t, part) in parts.iter().enumerate() {
                    for i in 0..stride {
                        let want = match i {
                            _ if i < part.len() => {
                                let w = part[i] * a;
                                if b == E::ONE { w } else { w * b }
                            }
                            _ if i < pad => E::ZERO,
                            _ => sentinel,
                        };
                        let got = dst[t * stride + i];
                        assert!(
                            got == want || (got != got && want != want),
                            "{isa:?} ({t}, {i})"
                        );
                    }
                }
                // One non-finite entry anywhere (vector body or tail) is found.
                for t in 0..parts.len() {
                    for at in 0..parts[t].len() {
                        let inf = E::ZERO - E::NEG_INF;
                        for bad in [inf - inf, inf, E::NEG_INF] {
                            let mut bent = parts.clone();
                            bent[t][at] = bad;
                            let f = scale_parts_into(
                                isa,
                                bent.iter().map(|p| &p[..]),
                                (a, b),
                                &mut dst,
                                (stride, pad),
                            );
                            assert!(!f, "{isa:?} part {t} at {at}");
                        }
                    }
                }
            }
        }
        for isa in Isa::available() {
            check::<f32>(isa, 0.180_336_88, 1.0);
            check::<f32>(isa, 3.0e-3, 5.421_011e-20);
            check::<f64>(isa, 0.180_336_880_111_120_4, 1.0);
            check::<f64>(isa, 1.1e-300, 5.421_010_862_427_522e-20);
        }
    }

    /// `max_abs_into` and `add_products` give a plain loop's bits, tails included, on every
    /// instruction set.
    #[test]
    fn max_abs_and_products_match_plain_loops() {
        for isa in Isa::available() {
            for len in [0, 1, 5, 8, 15, 16, 17, 33, 100] {
                let x: Vec<f32> = (0..len)
                    .map(|i| {
                        [-0.0, 3.5, -7.25, f32::MAX, -f32::INFINITY][i % 5] * (1.0 + i as f32 / 7.0)
                    })
                    .collect();
                let acc0: Vec<f32> = (0..len).map(|i| (i % 4) as f32 * 1.5).collect();
                let mut acc = acc0.clone();
                max_abs_into(isa, &mut acc, &x);
                for i in 0..len {
                    let want = acc0[i].max(x[i].abs());
                    assert_eq!(acc[i].to_bits(), want.to_bits(), "{isa:?} {len} {i}");
                }
                let a: Vec<f64> = (0..len).map(|i| 0.1 * i as f64 - 1.3).collect();
                let b: Vec<f64> = (0..len).map(|i| 1.0 / (i as f64 + 0.7)).collect();
                let start: Vec<f64> = (0..len).map(|i| (i as f64).sqrt()).collect();
                let mut got = start.clone();
                add_products(isa, &mut got, &a, &b);
                for i in 0..len {
                    let want = start[i] + a[i] * b[i];
                    assert_eq!(got[i].to_bits(), want.to_bits(), "{isa:?} {len} {i}");
                }
            }
        }
    }

    /// `load_part` puts the slice in the first lanes and the fill in the others; `store_part`
    /// writes the first lanes and nothing past the slice; for every length up to a vector,
    /// every instruction set, both element types.
    #[test]
    fn partial_loads_and_stores_touch_only_the_slice() {
        struct Check;
        impl<E: Element + From<i8>> Kernel<E> for Check {
            type Output = ();
            fn run<S: Lanes<E>>(self, s: S) {
                let l = S::LANES;
                let x: Vec<E> = (0..l as i8).map(|i| E::from(i + 1)).collect();
                for len in 0..=l {
                    let mut lanes = vec![E::ZERO; l];
                    s.store(&mut lanes, s.load_part(&x[..len], E::from(-7)));
                    for (i, &v) in lanes.iter().enumerate() {
                        let want = if i < len { x[i] } else { E::from(-7) };
                        assert_eq!(v, want, "load_part: len {len} lane {i}");
                    }
                    // Canaries on either side of the slice.
                    let mut out = vec![E::from(99); len + 2];
                    s.store_part(&mut out[1..len + 1], s.load(&x));
                    assert_eq!(out[0], E::from(99), "store_part: len {len}");
                    assert_eq!(out[len + 1], E::from(99), "store_part: len {len}");
                    assert_eq!(&out[1..len + 1], &x[..len], "store_part: len {len}");
                }
            }
        }
        for isa in Isa::available() {
            dispatch::<f32, _>(isa, Check);
            dispatch::<f64, _>(isa, Check);
        }
    }

    /// The fused scan against its two halves: the finiteness of `all_finite` and the exact
    /// maximum, every length (tails included); a known maximum gives `softmax_row` the same
    /// bits as its own pass.
    #[test]
    fn finite_max_is_all_finite_and_the_maximum() {
        for isa in Isa::available() {
            for len in [0, 1, 7, 8, 15, 16, 17, 40, 96] {
                let x: Vec<f32> = (0..len)
                    .map(|j| ((j * 7 % 11) as f32 - 5.0) * 0.75)
                    .collect();
                let want = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                assert_eq!(finite_max(isa, &x), (true, want), "{isa:?} {len}");
                for at in 0..len {
                    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                        let mut y = x.clone();
                        y[at] = bad;
                        assert!(!finite_max(isa, &y).0, "{isa:?} {len} {at} {bad}");
                    }
                    // The maximum wherever it sits, masked entries (−inf) around it.
                    let mut y = vec![f32::NEG_INFINITY; len];
                    y[at] = -3.5;
                    assert_eq!(finite_max(isa, &y).1, -3.5, "{isa:?} {len} {at}");
                }
                let padded = len.next_multiple_of(16);
                let mut a: Vec<f32> = x.clone();
                a.resize(padded, f32::NEG_INFINITY);
                let mut b = a.clone();
                for m_old in [f32::NEG_INFINITY, -1.0, 10.0] {
                    let (mut a, mut b) = (a.clone(), b.clone());
                    let one = softmax_row(isa, &mut a, m_old, None);
                    let two = softmax_row(isa, &mut b, m_old, Some(want));
                    assert_eq!(one, two, "{isa:?} {len} {m_old}");
                    assert_eq!(a, b, "{isa:?} {len} {m_old}");
                }
                b.clear();
            }
        }
    }

    /// Against the scalar formulas on every instruction set, the tail included: the same bits.
    #[test]
    fn affine_and_softmax_grad_rows_match_plain_loops() {
        for isa in Isa::available() {
            for len in [0, 1, 7, 8, 16, 37, 96] {
                let x: Vec<f32> = (0..len).map(|j| (j as f32 * 0.37).sin() * 3.0).collect();
                let mut out = vec![0.0; len];
                affine_row(isa, &x, 0.125, -1.5, &mut out);
                for (o, &xi) in out.iter().zip(&x) {
                    assert_eq!(*o, 0.125 * xi - -1.5, "{isa:?}");
                }
                // Weights with exact zeros where dP is infinite: dS must stay 0 there.
                let p: Vec<f32> = (0..len)
                    .map(|j| {
                        if j % 3 == 0 {
                            0.0
                        } else {
                            (j as f32 * 0.11).cos().abs()
                        }
                    })
                    .collect();
                let dp0: Vec<f32> = (0..len)
                    .map(|j| {
                        if j % 6 == 0 {
                            f32::INFINITY
                        } else {
                            j as f32 * 0.5 - 2.0
                        }
                    })
                    .collect();
                // The weights' exponent arguments (−inf for a zero weight; one above the
                // vector exp's range, whose weight is +inf), and the weights exp_in_place
                // makes of them: what the row must use.
                let args: Vec<f32> = p
                    .iter()
                    .enumerate()
                    .map(|(j, &pj)| if j == 4 { 90.0 } else { pj.ln() })
                    .collect();
                let mut p = args.clone();
                crate::simd::exp_in_place(isa, &mut p);
                let (mut dp, mut dx) = (dp0.clone(), vec![7.0; len]);
                let sum = softmax_grad_row(
                    isa,
                    &args,
                    (&mut dp, &mut dx),
                    0.75,
                    0.25,
                    f32::MIN_POSITIVE,
                );
                let want: f32 = p.iter().sum();
                assert!(
                    sum == want || (sum - want).abs() <= 1e-5 * want.max(1.0),
                    "{isa:?} {sum} {want}"
                );
                for j in 0..len {
                    let ds = if p[j] == 0.0 {
                        0.0
                    } else {
                        p[j] * (dp0[j] - 0.75)
                    };
                    assert_eq!(dp[j].to_bits(), p[j].to_bits(), "{isa:?} {j}");
                    assert_eq!(dx[j].to_bits(), (ds * 0.25).to_bits(), "{isa:?} {j}");
                }
            }
        }
    }

    /// A block in one dispatch: the same bits as `affine_row` then `softmax_grad_row` row by
    /// row, with rows of no weight (lse −inf, or left to the exact pass), an argument above
    /// the vector exp's range, tails on every width and padding columns cleared.
    #[test]
    fn softmax_grad_rows_match_the_row_functions() {
        for isa in Isa::available() {
            for (cols, stride) in [(0, 8), (1, 8), (7, 16), (16, 16), (37, 48), (96, 96)] {
                let rows = 5;
                let mut x0: Vec<f64> = (0..rows * stride)
                    .map(|i| (i as f64 * 0.61).sin() * 4.0)
                    .collect();
                // Row 3 (lse 2): an argument of about 709.5, above the vector exp's range.
                x0[3 * stride + 2] = (709.5 + 2.0) / 0.375;
                let dp0: Vec<f64> = (0..rows * stride)
                    .map(|i| {
                        if i % 11 == 0 {
                            f64::INFINITY
                        } else {
                            (i as f64 * 0.3).cos()
                        }
                    })
                    .collect();
                let lse = [0.5, f64::NEG_INFINITY, -1.25, 2.0, -800.0];
                let skip = [false, false, true, false, false];
                let delta = [0.25, 1.0, -0.5, 0.0, 3.0];
                let (scale, tiny) = (0.375, f64::MIN_POSITIVE);
                let (mut x, mut dp, mut sum) = (x0.clone(), dp0.clone(), vec![1.0; rows]);
                let g = GradRows {
                    x: &mut x,
                    dp: &mut dp,
                    stride,
                    cols,
                    lse: &lse,
                    skip: &skip,
                    delta: &delta,
                    sum: &mut sum,
                    scale,
                    tiny,
                };
                softmax_grad_rows(isa, g);
                for r in 0..rows {
                    let span = r * stride..r * stride + cols;
                    let (mut wx, mut wdp) = (x0[span.clone()].to_vec(), dp0[span].to_vec());
                    if r == 3 && cols > 2 {
                        assert!(scale * wx[2] - lse[r] > 709.0);
                    }
                    let mut args = vec![f64::NEG_INFINITY; cols];
                    if lse[r] != f64::NEG_INFINITY && !skip[r] {
                        affine_row(isa, &wx, scale, lse[r], &mut args);
                    }
                    let want = 1.0
                        + softmax_grad_row(isa, &args, (&mut wdp, &mut wx), delta[r], scale, tiny);
                    let row = r * stride..(r + 1) * stride;
                    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&x[row.clone()][..cols]),
                        bits(&wx),
                        "{isa:?} {cols} {r}"
                    );
                    assert_eq!(
                        bits(&dp[row.clone()][..cols]),
                        bits(&wdp),
                        "{isa:?} {cols} {r}"
                    );
                    assert!(x[row.clone()][cols..].iter().all(|&v| v.to_bits() == 0));
                    assert!(dp[row][cols..].iter().all(|&v| v.to_bits() == 0));
                    assert_eq!(sum[r].to_bits(), want.to_bits(), "{isa:?} {cols} {r}");
                }
            }
        }
    }

    #[test]
    fn softmax_row_matches_a_plain_loop() {
        for isa in Isa::available() {
            for len in [32, 64, 96, 160] {
                let x: Vec<f64> = (0..len)
                    .map(|j| ((j * 37) % 11) as f64 * 0.7 - 3.0)
                    .collect();
                let m_old = 1.5;
                let mut row = x.clone();
                let (m, sum) = softmax_row(isa, &mut row, m_old, None);
                let want_m = x.iter().fold(m_old, |a, &b| a.max(b));
                assert_eq!(m, want_m);
                let want: Vec<f64> = x.iter().map(|&v| (v - want_m).exp2()).collect();
                for (a, b) in row.iter().zip(&want) {
                    assert!((a - b).abs() <= 4e-16 * b, "{isa:?} {a} vs {b}");
                }
                let want_sum: f64 = want.iter().sum();
                assert!((sum - want_sum).abs() <= 1e-14 * want_sum);
                let mut r32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                let (m32, s32) = softmax_row(isa, &mut r32, f32::NEG_INFINITY, None);
                assert_eq!(m32, 4.0);
                assert!(
                    (s32 as f64 - x.iter().map(|&v| (v - 4.0).exp2()).sum::<f64>()).abs() < 1e-4
                );
            }
            let mut dead = vec![f32::NEG_INFINITY; 32];
            assert_eq!(
                softmax_row(isa, &mut dead, f32::NEG_INFINITY, None),
                (f32::NEG_INFINITY, 0.0)
            );
            assert!(dead.iter().all(|&p| p == 0.0));
            let mut row = vec![1.0_f64; 13];
            scale_row(isa, &mut row, 0.25);
            assert!(row.iter().all(|&x| x == 0.25));
        }
    }
}
