//! Mixture-of-experts routing (seed question 4: dense vs MoE).
//!
//! A dense layer runs every token through the same feed-forward block; an MoE layer has E
//! experts and a router that sends each token to k of them, so parameters grow with E while
//! compute per token grows only with k. For token `i` with router logits `z_i` (length E):
//!
//! ```text
//! p_i     = softmax(z_i)                          router probabilities
//! top_k_i = the k largest entries of p_i          (ties: the lower expert index first)
//! g_ie    = p_ie / Σ_{e' ∈ top_k_i} p_ie'          gate weights, renormalised (Mixtral)
//!         or p_ie                                  (Switch Transformer, k = 1)
//! ```
//!
//! Two auxiliary losses keep routing healthy:
//!
//! ```text
//! load balance  L_bal = E · Σ_e f_e · P_e         f_e = share of the n·k assignments to e,
//!                                                 P_e = mean_i p_ie        (Switch, Fedus et al.)
//! router z-loss L_z   = mean_i (lse(z_i))²          keeps logits small      (ST-MoE, Zoph et al.)
//! ```
//!
//! `L_bal` is 1 for perfectly uniform routing and up to E when every token picks one expert.
//!
//! **Expert capacity** (GShard, Lepikhin et al. 2020, §2.2 and Algorithm 1; Switch
//! Transformer, Fedus et al. 2022, §2.2). Each expert has a buffer of
//!
//! ```text
//! C = min(n, ⌈capacity_factor · n · k / E⌉)          (expert_capacity)
//! ```
//!
//! slots, the ceiling taken exactly on the binary value of the factor. [`apply_capacity`] fills
//! the buffers in priority order, every token's first choice before any second choice, and
//! within one choice rank in token order (GShard's and Flaxformer's rule, and DeepSpeed's
//! `top2gating`); an assignment that finds its expert full is **dropped** (the token skips that
//! expert; with a residual connection it passes through unchanged) and reported, never lost
//! silently: [`CapacityDispatch::dropped`] lists the (token, expert) pairs and
//! [`CapacityDispatch::loads`] counts, per expert, the assignments routed, kept and dropped.
//! `docs/conventions.md` compares this rule with other implementations.
//!
//! **Dense vs MoE cost.** [`Ffn`] and [`MoeFfn`] count the parameters and the forward FLOPs per
//! token of a feed-forward block, gated (SwiGLU/GEGLU: three matrices) or not (two):
//!
//! ```text
//! dense   P = m · d_model · d_ff                      m = 3 gated, 2 plain
//! MoE     P_total  = (E + S) · m · d_model · d_ff + d_model · E      S shared experts, router
//!         P_active = (k + S) · m · d_model · d_ff + d_model · E
//! FLOPs/token = 2 · P_active                          (one multiply-add per weight)
//! ```
//!
//! and [`ModelShape`] adds attention, norms and embeddings to reproduce published totals
//! (Mixtral 8x7B: 46.70B total, 12.88B active; `docs/moe.md` has the table and the sources).

use crate::Float;
use crate::error::{Axis, Error, Result, check_finite, try_matrix, try_with_capacity};
use crate::prelude::*;
use crate::softmax::{logsumexp_rows, softmax_rows};
use nalgebra::{DMatrix, DMatrixView};

/// The outcome of routing n tokens over E experts; made by [`route_top_k`] (see there for
/// an example).
///
/// The fields are private so that they always describe one routing (n x E probabilities,
/// n lists of k distinct experts below E, n lists of k gates): read them with
/// [`probs`](Self::probs), [`experts`](Self::experts) and [`gates`](Self::gates).
#[derive(Clone, Debug, PartialEq)]
pub struct Routing<T: Float> {
    probs: DMatrix<T>,
    experts: Vec<Vec<usize>>,
    gates: Vec<Vec<T>>,
    k: usize,
}

impl<T: Float> Routing<T> {
    /// The number of experts each token was routed to, `k` (kept when there are no tokens).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::moe::route_top_k;
    /// use nalgebra::DMatrix;
    ///
    /// assert_eq!(route_top_k(&DMatrix::<f32>::zeros(0, 8), 2, true)?.k(), 2);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn k(&self) -> usize {
        self.k
    }

    /// Router probabilities `softmax(z_i)`, n x E.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::moe::route_top_k;
    /// use nalgebra::dmatrix;
    ///
    /// let r = route_top_k(&dmatrix![0.0_f64, 0.0], 1, false)?;
    /// assert_eq!(r.probs(), &dmatrix![0.5, 0.5]);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn probs(&self) -> &DMatrix<T> {
        &self.probs
    }

    /// For each token, its k experts, best first (ties: the lower index first).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::moe::route_top_k;
    /// use nalgebra::dmatrix;
    ///
    /// let r = route_top_k(&dmatrix![0.0_f64, 1.0, 0.0], 2, false)?;
    /// assert_eq!(r.experts(), &[vec![1, 0]]);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn experts(&self) -> &[Vec<usize>] {
        &self.experts
    }

    /// For each token, the gate weights of its k experts, in the order of
    /// [`experts`](Self::experts).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::moe::route_top_k;
    /// use nalgebra::dmatrix;
    ///
    /// let r = route_top_k(&dmatrix![0.0_f64, 0.0, 0.0, 0.0], 2, true)?;
    /// assert_eq!(r.gates(), &[vec![0.5, 0.5]]);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn gates(&self) -> &[Vec<T>] {
        &self.gates
    }
}

/// Routes each token (a row of `logits`, n x E) to its `k` most probable experts.
///
/// With `renormalize`, the k gate weights are renormalised to sum to 1 (Mixtral, which is
/// the same as a softmax over the top-k logits); without, they are the raw probabilities
/// (Switch Transformer).
///
/// # Errors
///
/// - [`Error::InvalidParameter`] unless `1 <= k <= E`;
/// - [`Error::NonFinite`] if a logit is NaN or infinite.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::moe::route_top_k;
/// use nalgebra::dmatrix;
///
/// let logits = dmatrix![2.0_f64, 0.0, 1.0, 0.0];
/// let r = route_top_k(&logits, 2, true)?;
/// assert_eq!(r.experts()[0], vec![0, 2]);
/// let (a, b) = (2.0_f64.exp(), 1.0_f64.exp());
/// assert!((r.gates()[0][0] - a / (a + b)).abs() < 1e-15);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn route_top_k<'a, T: Float>(
    logits: impl Into<DMatrixView<'a, T>>,
    k: usize,
    renormalize: bool,
) -> Result<Routing<T>> {
    let logits = logits.into();
    let (n, e) = logits.shape();
    if k == 0 || k > e {
        return Err(Error::InvalidParameter {
            name: "k",
            value: k as f64,
            requirement: "must be between 1 and the number of experts",
        });
    }
    check_finite("logits", &logits)?;
    let probs = softmax_rows(logits);
    let mut experts = Vec::with_capacity(n);
    let mut gates = Vec::with_capacity(n);
    for i in 0..n {
        let mut order: Vec<usize> = (0..e).collect();
        // Stable sort: equal probabilities keep the lower expert index first. (Softmax
        // weights of finite logits are never NaN; the fallback only avoids a panic path.)
        order.sort_by(|&a, &b| {
            probs[(i, b)]
                .partial_cmp(&probs[(i, a)])
                .unwrap_or(core::cmp::Ordering::Equal)
        });
        order.truncate(k);
        let mut g: Vec<T> = order.iter().map(|&j| probs[(i, j)]).collect();
        if renormalize {
            let total = g.iter().fold(T::zero(), |acc, &x| acc + x);
            g.iter_mut().for_each(|x| *x /= total);
        }
        experts.push(order);
        gates.push(g);
    }
    Ok(Routing {
        probs,
        experts,
        gates,
        k,
    })
}

/// The Switch Transformer load-balancing loss `E · Σ_e f_e · P_e` of a routing; see the
/// [module docs](self). 1 when balanced, E when every token goes to the same expert.
///
/// Accuracy: `f_e` is an exact count divided once (not `n·k` additions of `1/(n k)`), and
/// every term is non-negative: a relative error of about `(n + E + 3) · ε`.
///
/// # Errors
///
/// [`Error::Empty`] if there are no tokens.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::moe::{load_balancing_loss, route_top_k};
/// use nalgebra::DMatrix;
///
/// // Equal logits: uniform probabilities, and ties sent to expert 0 (f = (1, 0, 0, 0)).
/// let r = route_top_k(&DMatrix::<f64>::zeros(8, 4), 1, false)?;
/// assert!((load_balancing_loss(&r)? - 1.0).abs() < 1e-15); // 4 · (1 · 1/4)
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn load_balancing_loss<T: Float>(routing: &Routing<T>) -> Result<T> {
    let (n, e) = routing.probs.shape();
    if n == 0 {
        return Err(Error::Empty { what: "routing" });
    }
    // A routing made by route_top_k has n x E probabilities (allocated, so E is bounded)
    // and experts below E.
    let assignments: usize = routing.experts.iter().map(Vec::len).sum();
    let mut count = vec![0_usize; e];
    for chosen in &routing.experts {
        for &j in chosen {
            count[j] += 1;
        }
    }
    let total = T::of_usize(assignments);
    let loss = (0..e).fold(T::zero(), |acc, j| {
        let mean_p = routing.probs.column(j).sum() / T::of_usize(n);
        acc + T::of_usize(count[j]) / total * mean_p
    });
    Ok(loss * T::of_usize(e))
}

/// The ST-MoE router z-loss `mean_i lse(z_i)²` of router logits (n x E).
///
/// If the sum of squares overflows while the mean does not, the mean is recomputed as
/// `Σ_i (lse_i / √n)²`. Accuracy: that of [`logsumexp`](crate::logsumexp) per row, doubled by
/// the square, plus `(n + 2) · ε` relative for the mean (all terms are non-negative).
///
/// # Errors
///
/// - [`Error::Empty`] if there are no tokens;
/// - [`Error::NonFinite`] if a logit is NaN or infinite (as for [`route_top_k`]).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::moe::router_z_loss;
/// use nalgebra::dmatrix;
///
/// let z = dmatrix![0.0_f64, 0.0; 1.0, 1.0];
/// let l0 = 2.0_f64.ln();
/// let expected = (l0 * l0 + (1.0 + l0) * (1.0 + l0)) / 2.0;
/// assert!((router_z_loss(&z)? - expected).abs() < 1e-15);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn router_z_loss<'a, T: Float>(logits: impl Into<DMatrixView<'a, T>>) -> Result<T> {
    let logits = logits.into();
    let n = logits.nrows();
    if n == 0 {
        return Err(Error::Empty { what: "logits" });
    }
    check_finite("logits", &logits)?;
    let lse = logsumexp_rows(logits);
    let total = lse.iter().fold(T::zero(), |acc, &l| acc + l * l);
    if total.is_finite() {
        return Ok(total / T::of_usize(n));
    }
    let root_n = T::of_usize(n).sqrt();
    Ok(lse.iter().fold(T::zero(), |acc, &l| {
        let scaled = l / root_n;
        acc + scaled * scaled
    }))
}

/// The number of slots in each expert's buffer, for `tokens` tokens routed to `k` experts each
/// over `experts` experts:
///
/// ```text
/// C = min(n, ⌈capacity_factor · n · k / E⌉)
/// ```
///
/// the convention of GShard (Lepikhin et al. 2020, §2.2 and Algorithm 1: `2N / E` per group for
/// top-2 at factor 1) and of DeepSpeed-MoE (`ceil(tokens / experts · capacity_factor · k)`);
/// the Switch Transformer (Fedus et al. 2022, §2.2) writes
/// `tokens per batch / experts · capacity factor` for k = 1. The ceiling is exact: it is taken on the exact rational value
/// `capacity_factor · n · k / E`, with `capacity_factor` read as the binary float it is, with
/// no rounding in between. So `1.25 · 8 · 2 / 4 = 5` and `1.0 · 6 · 1 / 4 = 1.5` gives 2, while
/// `1.1 · 10 · 1 / 11` gives 2: the float `1.1` is `1.100000000000000088…`, just above 1.1.
/// The cap at `n` changes no routing decision: an expert receives at most one assignment per
/// token, so with `C >= n` nothing is dropped (Mesh TensorFlow caps at the group size too).
/// No tokens, no slots: `n = 0` gives 0.
///
/// # Errors
///
/// - [`Error::InvalidParameter`] naming `capacity_factor` unless it is finite and > 0;
/// - [`Error::InvalidParameter`] naming `experts` if it is 0, or `k` unless `1 <= k <= E`;
/// - [`Error::TooLarge`] if `n · k`, the number of assignments, overflows `usize`.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::moe::expert_capacity;
///
/// // Mixtral-like: 4096 tokens, top-2 of 8 experts, factor 1.25: 1.25 · 4096 · 2 / 8 = 1280.
/// assert_eq!(expert_capacity(1.25, 4096, 2, 8)?, 1280);
/// assert_eq!(expert_capacity(1.0, 6, 1, 4)?, 2); // ⌈1.5⌉
/// assert_eq!(expert_capacity(100.0, 6, 1, 4)?, 6); // capped at n
/// assert!(expert_capacity(f64::NAN, 6, 1, 4).is_err());
/// assert!(expert_capacity(1.0, 6, 3, 2).is_err()); // k > E
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn expert_capacity(
    capacity_factor: f64,
    tokens: usize,
    k: usize,
    experts: usize,
) -> Result<usize> {
    if !(capacity_factor.is_finite() && capacity_factor > 0.0) {
        return Err(Error::InvalidParameter {
            name: "capacity_factor",
            value: capacity_factor,
            requirement: "must be finite and > 0",
        });
    }
    if experts == 0 {
        return Err(Error::InvalidParameter {
            name: "experts",
            value: 0.0,
            requirement: "must be >= 1",
        });
    }
    if k == 0 || k > experts {
        return Err(Error::InvalidParameter {
            name: "k",
            value: k as f64,
            requirement: "must be between 1 and the number of experts",
        });
    }
    let assignments = tokens.checked_mul(k).ok_or(Error::TooLarge {
        what: "the n x k expert assignments",
        shape: (tokens, k),
    })?;
    let c = ceil_scaled(capacity_factor, assignments as u128, experts as u128);
    // c <= n fits in usize; a larger c is capped at n.
    Ok(if c >= tokens as u128 {
        tokens
    } else {
        c as usize
    })
}

/// `⌈x · num / den⌉` exactly, for a finite `x > 0`, `num < 2^64` and `1 <= den < 2^64`,
/// saturating at `u128::MAX`. With `x = m · 2^e` (m < 2^53 an integer), `m · num < 2^117`
/// fits in a `u128`; the power of two goes to the numerator or the denominator.
fn ceil_scaled(x: f64, num: u128, den: u128) -> u128 {
    if num == 0 {
        return 0;
    }
    let bits = x.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i32;
    let fraction = (bits & ((1_u64 << 52) - 1)) as u128;
    let (m, e) = if exponent == 0 {
        (fraction, -1074) // subnormal
    } else {
        (fraction | (1 << 52), exponent - 1075)
    };
    let p = m * num;
    if e >= 0 {
        let e = e as u32;
        if e > p.leading_zeros() {
            return u128::MAX; // p · 2^e >= 2^128
        }
        (p << e).div_ceil(den)
    } else {
        let s = e.unsigned_abs();
        if s >= den.leading_zeros() {
            return 1; // den · 2^s >= 2^127 > p > 0
        }
        p.div_ceil(den << s)
    }
}

/// One (token, expert) assignment of a routing after the capacity rule; see
/// [`apply_capacity`] (and there for an example).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Assignment<T: Float> {
    /// The token (row of the router logits).
    pub token: usize,
    /// Its choice rank: 0 for the token's best expert, up to k − 1.
    pub rank: usize,
    /// The expert.
    pub expert: usize,
    /// The gate weight the routing gave this assignment (whether kept or dropped).
    pub gate: T,
    /// Its position in the expert's buffer, `0..capacity`, or `None` if it was dropped.
    pub slot: Option<usize>,
}

/// How many assignments one expert received and kept; see [`CapacityDispatch::loads`].
///
/// # Examples
///
/// ```
/// use attention_math::sheet::moe::ExpertLoad;
///
/// let load = ExpertLoad { routed: 5, kept: 4, dropped: 1, share: 0.5, utilisation: 1.0 };
/// assert_eq!(load.routed, load.kept + load.dropped);
/// assert_eq!(load.drop_rate(), 0.2);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExpertLoad {
    /// Assignments the router sent to this expert (before the capacity rule).
    pub routed: usize,
    /// Of those, the ones that found a slot.
    pub kept: usize,
    /// Of those, the ones that found the buffer full: `routed − kept`.
    pub dropped: usize,
    /// This expert's share of all `n · k` assignments, `routed / (n k)`: the `f_e` of the
    /// load-balancing loss (0 when there are no tokens).
    pub share: f64,
    /// The fraction of the buffer in use, `kept / capacity` (0 when the capacity is 0).
    pub utilisation: f64,
}

impl ExpertLoad {
    /// The fraction of this expert's assignments that were dropped, `dropped / routed`
    /// (0 if it received none). See [`ExpertLoad`] for an example.
    pub fn drop_rate(&self) -> f64 {
        if self.routed == 0 {
            0.0
        } else {
            self.dropped as f64 / self.routed as f64
        }
    }
}

/// A routing with expert capacity applied: which assignments kept a slot, which were
/// dropped, and the per-expert loads. Made by [`apply_capacity`] (see there for an example).
#[derive(Clone, Debug, PartialEq)]
pub struct CapacityDispatch<T: Float> {
    capacity: usize,
    tokens: usize,
    experts: usize,
    k: usize,
    assignments: Vec<Assignment<T>>,
    dropped: Vec<(usize, usize)>,
    loads: Vec<ExpertLoad>,
}

impl<T: Float> CapacityDispatch<T> {
    /// The capacity `C` of every expert's buffer ([`expert_capacity`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::moe::{apply_capacity, route_top_k};
    /// use nalgebra::DMatrix;
    ///
    /// let r = route_top_k(&DMatrix::<f64>::zeros(10, 4), 1, false)?;
    /// assert_eq!(apply_capacity(&r, 1.0)?.capacity(), 3); // ⌈10 / 4⌉
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Every assignment, token by token (token i's k choices at `i·k .. i·k + k`, best
    /// first), with its slot or `None` if dropped.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::moe::{apply_capacity, route_top_k};
    /// use nalgebra::dmatrix;
    ///
    /// // Both tokens prefer expert 1; its one slot goes to token 0.
    /// let r = route_top_k(&dmatrix![0.0_f64, 2.0; 0.0, 3.0], 1, false)?;
    /// let d = apply_capacity(&r, 1.0)?; // C = ⌈1 · 2 · 1 / 2⌉ = 1
    /// assert_eq!(d.assignments()[0].slot, Some(0));
    /// assert_eq!(d.assignments()[1].slot, None);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn assignments(&self) -> &[Assignment<T>] {
        &self.assignments
    }

    /// The dropped assignments as (token, expert) pairs, in the order the rule met them:
    /// all first choices in token order, then all second choices, and so on.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::moe::{apply_capacity, route_top_k};
    /// use nalgebra::dmatrix;
    ///
    /// let r = route_top_k(&dmatrix![0.0_f64, 2.0; 0.0, 3.0], 1, false)?;
    /// assert_eq!(apply_capacity(&r, 1.0)?.dropped(), &[(1, 1)]);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn dropped(&self) -> &[(usize, usize)] {
        &self.dropped
    }

    /// Per expert (E of them): assignments routed, kept and dropped, its share of all
    /// assignments and its buffer's utilisation.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::moe::{apply_capacity, route_top_k};
    /// use nalgebra::dmatrix;
    ///
    /// let r = route_top_k(&dmatrix![0.0_f64, 2.0; 0.0, 3.0], 1, false)?;
    /// let loads = apply_capacity(&r, 1.0)?.loads().to_vec();
    /// assert_eq!((loads[1].routed, loads[1].kept, loads[1].dropped), (2, 1, 1));
    /// assert_eq!((loads[0].routed, loads[0].share, loads[1].share), (0, 0.0, 1.0));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn loads(&self) -> &[ExpertLoad] {
        &self.loads
    }

    /// The fraction of all `n · k` assignments that were dropped (0 with no tokens).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::moe::{apply_capacity, route_top_k};
    /// use nalgebra::dmatrix;
    ///
    /// let r = route_top_k(&dmatrix![0.0_f64, 2.0; 0.0, 3.0], 1, false)?;
    /// assert_eq!(apply_capacity(&r, 1.0)?.drop_fraction(), 0.5);
    /// assert_eq!(apply_capacity(&r, 2.0)?.drop_fraction(), 0.0); // C = 2
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn drop_fraction(&self) -> f64 {
        if self.assignments.is_empty() {
            0.0
        } else {
            self.dropped.len() as f64 / self.assignments.len() as f64
        }
    }

    /// The n x E combine weights: entry (i, e) is the gate of token i's kept assignment to
    /// expert e, 0 where there is none or it was dropped. An MoE layer's output is
    /// `y_i = Σ_e C_ie · expert_e(x_i)`; a token all of whose assignments were dropped gets
    /// `y_i = 0` (and, through the residual connection, passes the layer unchanged). Gates are
    /// not renormalised after a drop (as in GShard and the Switch Transformer).
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`] if the n x E matrix cannot be allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::moe::{apply_capacity, route_top_k};
    /// use nalgebra::dmatrix;
    ///
    /// let r = route_top_k(&dmatrix![0.0_f64, 0.0; 0.0, 0.0], 1, false)?;
    /// // Ties go to expert 0, whose single slot token 0 takes.
    /// assert_eq!(apply_capacity(&r, 1.0)?.combine_weights()?, dmatrix![0.5, 0.0; 0.0, 0.0]);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn combine_weights(&self) -> Result<DMatrix<T>> {
        let mut c = try_matrix(
            "the n x E combine weights",
            self.tokens,
            self.experts,
            |_, _| T::zero(),
        )?;
        for a in self.assignments.iter().filter(|a| a.slot.is_some()) {
            c[(a.token, a.expert)] = a.gate;
        }
        Ok(c)
    }

    /// The number of experts each token was routed to, k.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::moe::{apply_capacity, route_top_k};
    /// use nalgebra::DMatrix;
    ///
    /// let r = route_top_k(&DMatrix::<f32>::zeros(3, 4), 2, true)?;
    /// let d = apply_capacity(&r, 1.0)?;
    /// assert_eq!((d.k(), d.assignments().len()), (2, 6));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn k(&self) -> usize {
        self.k
    }
}

/// Applies expert capacity to a routing: each expert keeps at most
/// `C = ⌈capacity_factor · n · k / E⌉` assignments ([`expert_capacity`]) and the rest are
/// dropped and reported.
///
/// **Priority.** Buffers are filled rank by rank, and within a rank in token order: every
/// token's first choice is placed before any token's second choice, and so on; the slot of an
/// assignment is the number of assignments its expert had already kept. This is GShard's
/// Algorithm 1 and Flaxformer's `TokensChooseMaskedRouter` / `TokensChooseScatterRouter`
/// without batch-prioritised routing (the Switch Transformer's code), and DeepSpeed's
/// `top2gating`; see `docs/conventions.md` for the implementations that order otherwise.
/// Dropped assignments keep their gate in [`CapacityDispatch::assignments`] but get weight 0
/// in [`CapacityDispatch::combine_weights`].
///
/// Per expert `e`: `kept_e = min(routed_e, C)`, `dropped_e = routed_e − kept_e`; the
/// load-balancing loss is still computed from the routing before capacity
/// ([`load_balancing_loss`]), as in the Switch Transformer.
///
/// # Errors
///
/// - [`Error::InvalidParameter`] naming `capacity_factor` unless it is finite and > 0;
/// - [`Error::TooLarge`] if the assignments or the per-expert counts cannot be allocated.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::moe::{apply_capacity, route_top_k};
/// use nalgebra::dmatrix;
///
/// // 4 tokens, 2 experts, top-1: tokens 0, 1, 2 prefer expert 0, token 3 expert 1.
/// let logits = dmatrix![1.0_f64, 0.0; 2.0, 0.0; 3.0, 0.0; 0.0, 1.0];
/// let r = route_top_k(&logits, 1, false)?;
/// let d = apply_capacity(&r, 1.0)?; // C = ⌈1 · 4 · 1 / 2⌉ = 2
/// assert_eq!(d.capacity(), 2);
/// assert_eq!(d.dropped(), &[(2, 0)]); // token 2 comes third for expert 0
/// let load = d.loads()[0];
/// assert_eq!((load.routed, load.kept, load.dropped), (3, 2, 1));
/// assert_eq!(d.assignments()[3].slot, Some(0)); // token 3 is alone at expert 1
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn apply_capacity<T: Float>(
    routing: &Routing<T>,
    capacity_factor: f64,
) -> Result<CapacityDispatch<T>> {
    let (n, e) = routing.probs.shape();
    let k = routing.k;
    // A routing has 1 <= k <= E (route_top_k checks it).
    let capacity = expert_capacity(capacity_factor, n, k, e)?;
    let mut loads: Vec<ExpertLoad> = try_with_capacity("the per-expert loads", e, 1)?;
    loads.resize(e, ExpertLoad::default());
    let total = n * k; // checked by expert_capacity
    let mut assignments = try_with_capacity("the n x k expert assignments", n, k)?;
    for (i, (chosen, gates)) in routing.experts.iter().zip(&routing.gates).enumerate() {
        for (rank, (&expert, &gate)) in chosen.iter().zip(gates).enumerate() {
            assignments.push(Assignment {
                token: i,
                rank,
                expert,
                gate,
                slot: None,
            });
        }
    }
    let mut dropped = Vec::new();
    for rank in 0..k {
        for i in 0..n {
            let a = &mut assignments[i * k + rank];
            let load = &mut loads[a.expert];
            load.routed += 1;
            if load.kept < capacity {
                a.slot = Some(load.kept);
                load.kept += 1;
            } else {
                load.dropped += 1;
                dropped.push((i, a.expert));
            }
        }
    }
    for load in &mut loads {
        load.share = if total == 0 {
            0.0
        } else {
            load.routed as f64 / total as f64
        };
        load.utilisation = if capacity == 0 {
            0.0
        } else {
            load.kept as f64 / capacity as f64
        };
    }
    Ok(CapacityDispatch {
        capacity,
        tokens: n,
        experts: e,
        k,
        assignments,
        dropped,
        loads,
    })
}

/// Checked `a · b` for a parameter count; the error names the shape field at fault.
fn mul(name: &'static str, value: usize, a: u64, b: u64) -> Result<u64> {
    a.checked_mul(b).ok_or(Error::InvalidParameter {
        name,
        value: value as f64,
        requirement: "must keep the parameter and FLOP counts below 2^64",
    })
}

/// Checked `a + b` for a parameter count.
fn add(name: &'static str, value: usize, a: u64, b: u64) -> Result<u64> {
    a.checked_add(b).ok_or(Error::InvalidParameter {
        name,
        value: value as f64,
        requirement: "must keep the parameter and FLOP counts below 2^64",
    })
}

/// `Err` naming `name` unless `value >= 1`.
fn positive(name: &'static str, value: usize) -> Result<u64> {
    if value == 0 {
        return Err(Error::InvalidParameter {
            name,
            value: 0.0,
            requirement: "must be >= 1",
        });
    }
    Ok(value as u64)
}

/// The shape of a dense feed-forward block, `d_model → d_ff → d_model`, without biases (as in
/// T5, Llama, Mistral, Mixtral and DeepSeek).
///
/// Parameters and forward FLOPs per token:
///
/// ```text
/// plain  (ReLU/GELU)      FFN(x) = act(x W_1) W_2               P = 2 · d_model · d_ff
/// gated  (SwiGLU/GEGLU)   FFN(x) = (act(x W_1) ⊙ x W_3) W_2     P = 3 · d_model · d_ff
/// FLOPs per token = 2 · P   (one multiply and one add per weight; the activation and the
///                            gate's elementwise product, O(d_ff), are not counted)
/// ```
///
/// (Shazeer 2020, *GLU Variants Improve Transformer*, §2; the FLOP convention is Kaplan et al.
/// 2020, §2.1.)
///
/// # Examples
///
/// ```
/// use attention_math::sheet::moe::Ffn;
///
/// // Mistral 7B's (and each Mixtral expert's) SwiGLU block.
/// let ffn = Ffn::new(4096, 14336, true)?;
/// assert_eq!(ffn.params(), 3 * 4096 * 14336); // 176,160,768
/// assert_eq!(ffn.flops_per_token(), 2 * ffn.params());
/// assert!(Ffn::new(0, 14336, true).is_err());
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ffn {
    d_model: usize,
    d_ff: usize,
    gated: bool,
    params: u64,
}

impl Ffn {
    /// A feed-forward block of width `d_model` and hidden width `d_ff`, gated or not; see
    /// [`Ffn`] for the counts and an example.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] naming `d_model` or `d_ff` if it is 0, or `d_ff` if the
    /// FLOP count `2 P` overflows `u64`.
    pub fn new(d_model: usize, d_ff: usize, gated: bool) -> Result<Self> {
        let d = positive("d_model", d_model)?;
        let f = positive("d_ff", d_ff)?;
        let params = mul(
            "d_ff",
            d_ff,
            mul("d_ff", d_ff, d, f)?,
            if gated { 3 } else { 2 },
        )?;
        mul("d_ff", d_ff, params, 2)?; // the FLOPs fit too
        Ok(Self {
            d_model,
            d_ff,
            gated,
            params,
        })
    }

    /// The model width.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::Ffn;
    /// assert_eq!(Ffn::new(768, 3072, false)?.d_model(), 768);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// The hidden width.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::Ffn;
    /// assert_eq!(Ffn::new(768, 3072, false)?.d_ff(), 3072);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn d_ff(&self) -> usize {
        self.d_ff
    }

    /// Whether the block is gated (three matrices) or plain (two).
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::Ffn;
    /// assert!(!Ffn::new(768, 3072, false)?.gated());
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn gated(&self) -> bool {
        self.gated
    }

    /// Its parameters, `(3 if gated else 2) · d_model · d_ff`.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::Ffn;
    /// assert_eq!(Ffn::new(768, 3072, false)?.params(), 4_718_592); // T5-Base
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn params(&self) -> u64 {
        self.params
    }

    /// Forward FLOPs per token, `2 · params()`.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::Ffn;
    /// assert_eq!(Ffn::new(768, 3072, false)?.flops_per_token(), 9_437_184);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn flops_per_token(&self) -> u64 {
        2 * self.params // checked in new
    }
}

/// The shape of a mixture-of-experts feed-forward layer: `experts` routed experts of shape
/// `expert`, of which each token uses `k`, plus `shared` experts every token uses
/// (DeepSeekMoE's shared-expert isolation; 0 for Switch and Mixtral), and a linear router
/// `d_model → experts` without bias.
///
/// ```text
/// P_total  = (E + S) · P_expert + d_model · E
/// P_active = (k + S) · P_expert + d_model · E          (the router runs for every token)
/// FLOPs per token = 2 · P_active                        (softmax and top-k not counted)
/// ```
///
/// A dense block with the same FLOPs per token ([`dense_equivalent`](Self::dense_equivalent))
/// has hidden width `(k + S) · d_ff`; one with the same parameters would cost
/// `P_total / P_active` times the FLOPs.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::moe::{Ffn, MoeFfn};
///
/// // One Mixtral 8x7B layer: 8 SwiGLU experts of 4096 → 14336, top-2.
/// let moe = MoeFfn::new(Ffn::new(4096, 14336, true)?, 8, 2, 0)?;
/// assert_eq!(moe.total_params(), 8 * 176_160_768 + 4096 * 8);
/// assert_eq!(moe.active_params(), 2 * 176_160_768 + 4096 * 8);
/// assert_eq!(moe.dense_equivalent().d_ff(), 2 * 14336);
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeFfn {
    expert: Ffn,
    experts: usize,
    k: usize,
    shared: usize,
    total: u64,
    active: u64,
    dense: Ffn,
}

impl MoeFfn {
    /// An MoE layer of `experts` routed experts shaped like `expert`, top-`k` routing and
    /// `shared` always-on experts of the same shape; see [`MoeFfn`] for the counts and an
    /// example.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidParameter`] naming `experts` if it is 0, or `k` unless
    ///   `1 <= k <= experts`;
    /// - [`Error::InvalidParameter`] naming `experts` if a count overflows `u64`.
    ///
    /// ```
    /// # use attention_math::sheet::moe::{Ffn, MoeFfn};
    /// let expert = Ffn::new(512, 1024, true)?;
    /// assert!(MoeFfn::new(expert, 0, 1, 0).is_err());
    /// assert!(MoeFfn::new(expert, 4, 5, 0).is_err());
    /// assert!(MoeFfn::new(expert, 4, 0, 1).is_err());
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn new(expert: Ffn, experts: usize, k: usize, shared: usize) -> Result<Self> {
        let e = positive("experts", experts)?;
        if k == 0 || k > experts {
            return Err(Error::InvalidParameter {
                name: "k",
                value: k as f64,
                requirement: "must be between 1 and the number of experts",
            });
        }
        let router = mul("experts", experts, expert.d_model as u64, e)?;
        let count = |n: usize| -> Result<u64> {
            let ffns = mul("experts", experts, expert.params, n as u64)?;
            add("experts", experts, ffns, router)
        };
        let total = count(experts.checked_add(shared).ok_or(Error::InvalidParameter {
            name: "shared",
            value: shared as f64,
            requirement: "must keep experts + shared below 2^64",
        })?)?;
        let active = count(k + shared)?; // k + shared <= experts + shared
        mul("experts", experts, total, 2)?; // FLOPs of the active part fit too
        // (k + S) · d_ff <= active / 2 fits in u64; checked for a narrower usize.
        let dense_ff = expert
            .d_ff
            .checked_mul(k + shared)
            .ok_or(Error::InvalidParameter {
                name: "experts",
                value: experts as f64,
                requirement: "must keep the parameter and FLOP counts below 2^64",
            })?;
        let dense = Ffn::new(expert.d_model, dense_ff, expert.gated)?;
        Ok(Self {
            expert,
            experts,
            k,
            shared,
            total,
            active,
            dense,
        })
    }

    /// The shape of one expert.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::{Ffn, MoeFfn};
    /// let expert = Ffn::new(2048, 1408, true)?;
    /// assert_eq!(MoeFfn::new(expert, 64, 6, 2)?.expert(), expert);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn expert(&self) -> Ffn {
        self.expert
    }

    /// The number of routed experts, E.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::{Ffn, MoeFfn};
    /// assert_eq!(MoeFfn::new(Ffn::new(2048, 1408, true)?, 64, 6, 2)?.experts(), 64);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Routed experts per token, k.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::{Ffn, MoeFfn};
    /// assert_eq!(MoeFfn::new(Ffn::new(2048, 1408, true)?, 64, 6, 2)?.k(), 6);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn k(&self) -> usize {
        self.k
    }

    /// Shared experts, S: every token goes through them.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::{Ffn, MoeFfn};
    /// assert_eq!(MoeFfn::new(Ffn::new(2048, 1408, true)?, 64, 6, 2)?.shared_experts(), 2);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn shared_experts(&self) -> usize {
        self.shared
    }

    /// The router's parameters, `d_model · E`.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::{Ffn, MoeFfn};
    /// assert_eq!(MoeFfn::new(Ffn::new(2048, 1408, true)?, 64, 6, 2)?.router_params(), 2048 * 64);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn router_params(&self) -> u64 {
        self.expert.d_model as u64 * self.experts as u64 // checked in new
    }

    /// All parameters, `(E + S) · P_expert + d_model · E`.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::{Ffn, MoeFfn};
    /// let moe = MoeFfn::new(Ffn::new(2048, 1408, true)?, 64, 6, 2)?;
    /// assert_eq!(moe.total_params(), 66 * 3 * 2048 * 1408 + 2048 * 64);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn total_params(&self) -> u64 {
        self.total
    }

    /// The parameters one token uses, `(k + S) · P_expert + d_model · E`.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::{Ffn, MoeFfn};
    /// let moe = MoeFfn::new(Ffn::new(2048, 1408, true)?, 64, 6, 2)?;
    /// assert_eq!(moe.active_params(), 8 * 3 * 2048 * 1408 + 2048 * 64);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn active_params(&self) -> u64 {
        self.active
    }

    /// Forward FLOPs per token, `2 · active_params()` (router included).
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::{Ffn, MoeFfn};
    /// let moe = MoeFfn::new(Ffn::new(4096, 14336, true)?, 8, 2, 0)?;
    /// let dense = Ffn::new(4096, 14336, true)?;
    /// // Top-2 costs two dense blocks plus the router.
    /// assert_eq!(moe.flops_per_token(), 2 * dense.flops_per_token() + 2 * 4096 * 8);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn flops_per_token(&self) -> u64 {
        2 * self.active // checked in new
    }

    /// The dense block with the same FLOPs per token, router aside: hidden width
    /// `(k + S) · d_ff`, gated like the experts.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::moe::{Ffn, MoeFfn};
    /// let moe = MoeFfn::new(Ffn::new(2048, 1408, true)?, 64, 6, 2)?;
    /// let dense = moe.dense_equivalent();
    /// assert_eq!(dense.d_ff(), 8 * 1408);
    /// assert_eq!(dense.params() + moe.router_params(), moe.active_params());
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn dense_equivalent(&self) -> Ffn {
        self.dense
    }
}

/// A feed-forward block of either kind, for [`ModelShape::layers`].
///
/// # Examples
///
/// ```
/// use attention_math::sheet::moe::{Ffn, FfnKind, MoeFfn};
///
/// let dense = Ffn::new(1024, 4096, false)?;
/// let moe = MoeFfn::new(dense, 16, 1, 0)?;
/// let (a, b) = (FfnKind::from(dense), FfnKind::from(moe));
/// assert_eq!(a.active_params(), a.total_params());
/// assert_eq!(b.active_params(), dense.params() + 1024 * 16);
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnKind {
    /// A dense block: every parameter is active.
    Dense(Ffn),
    /// A mixture of experts.
    Moe(MoeFfn),
}

impl From<Ffn> for FfnKind {
    fn from(f: Ffn) -> Self {
        FfnKind::Dense(f)
    }
}

impl From<MoeFfn> for FfnKind {
    fn from(m: MoeFfn) -> Self {
        FfnKind::Moe(m)
    }
}

impl FfnKind {
    /// All parameters of the block. See [`FfnKind`] for an example.
    pub fn total_params(&self) -> u64 {
        match self {
            FfnKind::Dense(f) => f.params(),
            FfnKind::Moe(m) => m.total_params(),
        }
    }

    /// The parameters one token uses. See [`FfnKind`] for an example.
    pub fn active_params(&self) -> u64 {
        match self {
            FfnKind::Dense(f) => f.params(),
            FfnKind::Moe(m) => m.active_params(),
        }
    }

    /// Forward FLOPs per token, `2 · active_params()`. See [`FfnKind`] for an example.
    pub fn flops_per_token(&self) -> u64 {
        match self {
            FfnKind::Dense(f) => f.flops_per_token(),
            FfnKind::Moe(m) => m.flops_per_token(),
        }
    }
}

/// The parameters of a multi-head attention block with grouped-query attention and no
/// biases (Llama, Mistral, Mixtral, T5, DeepSeekMoE): `heads` query heads and `kv_heads` key
/// and value heads (MHA: equal; MQA: 1), each `head_dim` wide.
///
/// ```text
/// P = d_model · h · d_head  (W_q)  +  2 · d_model · h_kv · d_head  (W_k, W_v)
///   + h · d_head · d_model  (W_o)
/// ```
///
/// (Ainslie et al. 2023, *GQA*, §2.)
///
/// # Errors
///
/// - [`Error::InvalidParameter`] naming the argument if one is 0;
/// - [`Error::InvalidParameter`] naming `kv_heads` unless it divides `heads`;
/// - [`Error::InvalidParameter`] naming `d_model` if the count overflows `u64`.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::moe::attention_params;
///
/// // Mistral 7B / Mixtral: d_model 4096, 32 query heads, 8 KV heads of 128.
/// assert_eq!(attention_params(4096, 32, 8, 128)?, 2 * 4096 * 4096 + 2 * 4096 * 1024);
/// assert!(attention_params(4096, 32, 5, 128).is_err());
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn attention_params(
    d_model: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<u64> {
    let d = positive("d_model", d_model)?;
    let h = positive("heads", heads)?;
    let kv = positive("kv_heads", kv_heads)?;
    let hd = positive("head_dim", head_dim)?;
    if !heads.is_multiple_of(kv_heads) {
        return Err(Error::InvalidParameter {
            name: "kv_heads",
            value: kv_heads as f64,
            requirement: "must divide heads",
        });
    }
    let m = |a, b| mul("d_model", d_model, a, b);
    let q_width = m(h, hd)?;
    let kv_width = m(kv, hd)?;
    let q_and_o = m(m(d, q_width)?, 2)?;
    let k_and_v = m(m(d, kv_width)?, 2)?;
    add("d_model", d_model, q_and_o, k_and_v)
}

/// The parameters of DeepSeek's multi-head latent attention (MLA; DeepSeek-V2, §2.1, and
/// DeepSeek-V3, §2.1.1): queries through a rank-`q_lora_rank` bottleneck (0: a plain
/// projection), keys and values through a shared rank-`kv_lora_rank` latent, a decoupled
/// RoPE key of `qk_rope_head_dim` shared by all heads, and the RMSNorms of the two latents.
///
/// ```text
/// queries   d_model · r_q + r_q + r_q · h · (d_nope + d_rope)     (r_q = 0: d_model · h · (d_nope + d_rope))
/// keys and values   d_model · (r_kv + d_rope) + r_kv + r_kv · h · (d_nope + d_v)
/// output    h · d_v · d_model
/// ```
///
/// # Errors
///
/// - [`Error::InvalidParameter`] naming the argument if `d_model`, `heads`, `kv_lora_rank`
///   or `v_head_dim` is 0, or naming `qk_nope_head_dim` if both query-key widths are 0;
/// - [`Error::InvalidParameter`] naming `d_model` if the count overflows `u64`.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::moe::mla_attention_params;
///
/// // DeepSeek-V3: 7168 wide, 128 heads, r_q 1536, r_kv 512, 128 + 64 query-key, 128 value.
/// assert_eq!(mla_attention_params(7168, 128, 1536, 512, 128, 64, 128)?, 187_107_328);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn mla_attention_params(
    d_model: usize,
    heads: usize,
    q_lora_rank: usize,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
) -> Result<u64> {
    let d = positive("d_model", d_model)?;
    let h = positive("heads", heads)?;
    let r_kv = positive("kv_lora_rank", kv_lora_rank)?;
    let d_v = positive("v_head_dim", v_head_dim)?;
    let qk = qk_nope_head_dim.checked_add(qk_rope_head_dim).unwrap_or(0);
    let qk = positive("qk_nope_head_dim", qk)?;
    let (nope, rope, r_q) = (
        qk_nope_head_dim as u64,
        qk_rope_head_dim as u64,
        q_lora_rank as u64,
    );
    let m = |a, b| mul("d_model", d_model, a, b);
    let a = |a, b| add("d_model", d_model, a, b);
    let q_out = m(h, qk)?;
    let queries = if q_lora_rank == 0 {
        m(d, q_out)?
    } else {
        a(a(m(d, r_q)?, r_q)?, m(r_q, q_out)?)?
    };
    let latent = m(d, a(r_kv, rope)?)?;
    let up = m(r_kv, m(h, a(nope, d_v)?)?)?;
    let keys_values = a(a(latent, r_kv)?, up)?;
    let output = m(m(h, d_v)?, d)?;
    a(a(queries, keys_values)?, output)
}

/// Total and active parameters of a transformer, built up from its layers: the embeddings
/// (`vocab · d_model`, twice if the output head is not tied to them), a final norm
/// (`d_model`), then groups of identical layers, each with its token mixer (attention plus the
/// layer's norms, counted by the caller, e.g. with [`attention_params`]) and its feed-forward
/// block.
///
/// ```text
/// total  = embeddings + d_model + Σ_groups count · (mixer + FFN_total) + extra
/// active = embeddings + d_model + Σ_groups count · (mixer + FFN_active) + extra
/// ```
///
/// Embeddings count as active (as Mistral AI and DeepSeek count them; a token reads one row of
/// the input embedding and the whole output head).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::moe::{attention_params, Ffn, ModelShape, MoeFfn};
///
/// // Mixtral 8x7B (Jiang et al. 2024, Table 1): 32 layers, two RMSNorms per layer.
/// let expert = Ffn::new(4096, 14336, true)?;
/// let mixer = attention_params(4096, 32, 8, 128)? + 2 * 4096;
/// let mixtral = ModelShape::new(32000, 4096, false)?.layers(32, mixer, MoeFfn::new(expert, 8, 2, 0)?)?;
/// assert_eq!(mixtral.total_params(), 46_702_792_704); // published: 46.7B
/// assert_eq!(mixtral.active_params(), 12_879_925_248); // published: 12.9B
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelShape {
    d_model: usize,
    total: u64,
    active: u64,
}

impl ModelShape {
    /// A model with only its embeddings and final norm: `vocab · d_model · (1 if tied else 2)
    /// + d_model` parameters, all active. See [`ModelShape`] for an example.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] naming `vocab` or `d_model` if it is 0, or `vocab` if the
    /// count overflows `u64`.
    pub fn new(vocab: usize, d_model: usize, tied_embeddings: bool) -> Result<Self> {
        let v = positive("vocab", vocab)?;
        let d = positive("d_model", d_model)?;
        let embeddings = mul(
            "vocab",
            vocab,
            mul("vocab", vocab, v, d)?,
            if tied_embeddings { 1 } else { 2 },
        )?;
        let total = add("vocab", vocab, embeddings, d)?;
        Ok(Self {
            d_model,
            total,
            active: total,
        })
    }

    /// Adds `count` identical layers, each with `mixer_params` parameters besides its
    /// feed-forward block `ffn` (attention and norms; all active) and the block itself.
    ///
    /// # Errors
    ///
    /// - [`Error::DimensionMismatch`] if `ffn`'s `d_model` is not the model's;
    /// - [`Error::InvalidParameter`] naming `count` if a total overflows `u64`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::moe::{Ffn, ModelShape};
    ///
    /// let m = ModelShape::new(100, 8, true)?.layers(2, 50, Ffn::new(8, 32, false)?)?;
    /// assert_eq!(m.total_params(), 100 * 8 + 8 + 2 * (50 + 2 * 8 * 32));
    /// assert!(ModelShape::new(100, 8, true)?.layers(2, 50, Ffn::new(16, 32, false)?).is_err());
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn layers(self, count: usize, mixer_params: u64, ffn: impl Into<FfnKind>) -> Result<Self> {
        let ffn = ffn.into();
        let width = match ffn {
            FfnKind::Dense(f) => f.d_model(),
            FfnKind::Moe(m) => m.expert().d_model(),
        };
        if width != self.d_model {
            return Err(Error::DimensionMismatch {
                arg: "ffn",
                axis: Axis::Cols,
                found: width,
                other: "model",
                other_axis: Axis::Cols,
                expected: self.d_model,
            });
        }
        let c = count as u64;
        let grow = |sum: u64, per_layer: u64| -> Result<u64> {
            let layer = add("count", count, mixer_params, per_layer)?;
            add("count", count, sum, mul("count", count, layer, c)?)
        };
        Ok(Self {
            d_model: self.d_model,
            total: grow(self.total, ffn.total_params())?,
            active: grow(self.active, ffn.active_params())?,
        })
    }

    /// Adds `params` parameters that every token uses (extra norms, position biases, ...).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] naming `params` if a total overflows `u64`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::moe::ModelShape;
    ///
    /// let m = ModelShape::new(100, 8, true)?.extra(10)?;
    /// assert_eq!((m.total_params(), m.active_params()), (818, 818));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn extra(self, params: u64) -> Result<Self> {
        let overflow = Error::InvalidParameter {
            name: "params",
            value: params as f64,
            requirement: "must keep the parameter counts below 2^64",
        };
        Ok(Self {
            d_model: self.d_model,
            total: self.total.checked_add(params).ok_or(overflow.clone())?,
            active: self.active.checked_add(params).ok_or(overflow)?,
        })
    }

    /// All parameters. See [`ModelShape`] for an example.
    pub fn total_params(&self) -> u64 {
        self.total
    }

    /// The parameters one token uses. See [`ModelShape`] for an example.
    pub fn active_params(&self) -> u64 {
        self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapsed_routing_costs_e() {
        let logits = DMatrix::<f64>::from_fn(6, 4, |_, j| if j == 2 { 50.0 } else { 0.0 });
        let r = route_top_k(&logits, 1, false).unwrap();
        assert!(r.experts().iter().all(|x| x == &vec![2]));
        assert!((load_balancing_loss(&r).unwrap() - 4.0).abs() < 1e-12);
    }

    #[test]
    fn gates_renormalise_and_errors() {
        let logits = DMatrix::<f32>::from_fn(3, 5, |i, j| ((i * 5 + j) as f32 * 0.77).sin() * 3.0);
        let r = route_top_k(&logits, 3, true).unwrap();
        for (g, x) in r.gates().iter().zip(r.experts()) {
            assert!((g.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            assert!(g.windows(2).all(|w| w[0] >= w[1]));
            assert_eq!(x.len(), 3);
        }
        assert!(route_top_k(&logits, 0, true).is_err());
        assert!(route_top_k(&logits, 6, true).is_err());
        let mut bad = logits.clone();
        bad[(1, 1)] = f32::INFINITY;
        assert_eq!(
            route_top_k(&bad, 1, true).unwrap_err(),
            Error::NonFinite {
                arg: "logits",
                row: 1,
                col: 1
            }
        );
        let empty = route_top_k(&DMatrix::<f32>::zeros(0, 5), 1, true).unwrap();
        assert_eq!(
            load_balancing_loss(&empty),
            Err(Error::Empty { what: "routing" })
        );
    }

    #[test]
    fn z_loss_rejects_non_finite_and_survives_overflowing_squares() {
        let mut z = DMatrix::<f32>::zeros(2, 3);
        z[(1, 2)] = f32::NAN;
        assert_eq!(
            router_z_loss(&z),
            Err(Error::NonFinite {
                arg: "logits",
                row: 1,
                col: 2
            })
        );
        // lse ≈ 1.5e19 per row: lse² = 2.25e38 fits, two of them do not; the mean does.
        let z = DMatrix::<f32>::from_element(2, 1, 1.5e19);
        let loss = router_z_loss(&z).unwrap();
        assert!(((loss as f64) / 2.25e38 - 1.0).abs() < 1e-6, "{loss}");
    }

    #[test]
    fn balanced_routing_loss_is_exactly_one() {
        // 3 experts, 3 tokens each sent to a different expert with uniform probabilities.
        let logits = DMatrix::<f64>::from_fn(3, 3, |i, j| if i == j { 1e-9 } else { 0.0 });
        let r = route_top_k(&logits, 1, false).unwrap();
        assert_eq!(r.experts(), &[vec![0], vec![1], vec![2]]);
        assert!((load_balancing_loss(&r).unwrap() - 1.0).abs() < 1e-15);
    }

    #[test]
    fn capacity_is_the_exact_ceiling() {
        assert_eq!(expert_capacity(1.0, 4096, 1, 8).unwrap(), 512);
        assert_eq!(expert_capacity(1.25, 4096, 2, 8).unwrap(), 1280);
        assert_eq!(expert_capacity(1.0, 6, 1, 4).unwrap(), 2); // ⌈1.5⌉
        assert_eq!(expert_capacity(0.75, 8, 1, 3).unwrap(), 2); // exactly 2
        assert_eq!(expert_capacity(0.5, 10, 1, 11).unwrap(), 1); // ⌈0.4545⌉
        // The float 1.1 is 1.1000000000000000888...: 1.1 · 10 / 11 is just above 1.
        assert_eq!(expert_capacity(1.1, 10, 1, 11).unwrap(), 2);
        // Tiny and subnormal factors: a positive capacity below 1 rounds up to 1.
        assert_eq!(expert_capacity(1e-300, 1000, 2, 8).unwrap(), 1);
        assert_eq!(expert_capacity(f64::from_bits(1), 1000, 2, 8).unwrap(), 1);
        // Huge factors and sizes: capped at n, no overflow.
        assert_eq!(expert_capacity(f64::MAX, 1000, 2, 8).unwrap(), 1000);
        assert_eq!(
            expert_capacity(1.0, usize::MAX / 2, 2, 2).unwrap(),
            usize::MAX / 2
        );
        assert_eq!(expert_capacity(1.0, 0, 2, 8).unwrap(), 0);
        // Every dyadic factor a/4 against the integer formula ⌈a n k / (4 E)⌉, capped at n.
        for a in 1..=16_usize {
            for n in 0..40_usize {
                for e in 1..=6_usize {
                    for k in 1..=e {
                        let expected = (a * n * k).div_ceil(4 * e).min(n);
                        let got = expert_capacity(a as f64 / 4.0, n, k, e).unwrap();
                        assert_eq!(got, expected, "a={a} n={n} k={k} e={e}");
                    }
                }
            }
        }
    }

    #[test]
    fn capacity_rejects_bad_parameters() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -0.0, -1.0] {
            assert!(
                matches!(
                    expert_capacity(bad, 8, 1, 2),
                    Err(Error::InvalidParameter {
                        name: "capacity_factor",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            expert_capacity(1.0, 8, 1, 0),
            Err(Error::InvalidParameter {
                name: "experts",
                ..
            })
        ));
        for k in [0, 3] {
            assert!(matches!(
                expert_capacity(1.0, 8, k, 2),
                Err(Error::InvalidParameter { name: "k", .. })
            ));
        }
        assert!(matches!(
            expert_capacity(1.0, usize::MAX, 2, 2),
            Err(Error::TooLarge { .. })
        ));
        let r = route_top_k(&DMatrix::<f64>::zeros(3, 2), 1, false).unwrap();
        assert!(apply_capacity(&r, f64::NAN).is_err());
        assert!(apply_capacity(&r, 0.0).is_err());
    }

    /// 4 tokens, 3 experts, top-2, factor 0.75: C = ⌈0.75 · 4 · 2 / 3⌉ = 2. First choices in
    /// token order, then second choices: t0→e0, t1→e0, t2→e1 are placed, t3→e0 finds e0
    /// full; then t0→e1 and t1→e2 are placed, t2→e0 and t3→e1 find their experts full.
    #[test]
    fn capacity_overflow_drops_exactly_the_documented_assignments() {
        let logits = nalgebra::dmatrix![
            2.0_f64, 1.0, 0.0;
            2.0, 0.0, 1.0;
            1.0, 2.0, 0.0;
            2.0, 1.0, 0.0
        ];
        let r = route_top_k(&logits, 2, true).unwrap();
        assert_eq!(
            r.experts(),
            &[vec![0, 1], vec![0, 2], vec![1, 0], vec![0, 1]]
        );
        let d = apply_capacity(&r, 0.75).unwrap();
        assert_eq!(d.capacity(), 2);
        assert_eq!(d.dropped(), &[(3, 0), (2, 0), (3, 1)]);
        let slots: Vec<Option<usize>> = d.assignments().iter().map(|a| a.slot).collect();
        assert_eq!(
            slots,
            [
                Some(0), // t0 → e0
                Some(1), // t0 → e1 (after t2's first choice)
                Some(1), // t1 → e0
                Some(0), // t1 → e2
                Some(0), // t2 → e1
                None,    // t2 → e0: full
                None,    // t3 → e0: full
                None,    // t3 → e1: full
            ]
        );
        let counts: Vec<(usize, usize, usize)> = d
            .loads()
            .iter()
            .map(|l| (l.routed, l.kept, l.dropped))
            .collect();
        assert_eq!(counts, [(4, 2, 2), (3, 2, 1), (1, 1, 0)]);
        assert_eq!(d.loads()[0].share, 0.5);
        assert_eq!(d.loads()[2].utilisation, 0.5);
        assert_eq!(d.drop_fraction(), 3.0 / 8.0);
        // Token 3 lost both experts: a zero row of combine weights. Others keep their gates.
        let c = d.combine_weights().unwrap();
        assert_eq!(c.row(3).amax(), 0.0);
        assert_eq!(c[(0, 0)], r.gates()[0][0]);
        assert_eq!(c[(2, 1)], r.gates()[2][0]);
        assert_eq!(c[(2, 0)], 0.0);
    }

    /// First choices outrank second choices even from later tokens: with one slot per
    /// expert, token 1's first choice (e1) wins over token 0's second choice (e1). In token
    /// order (DeepSpeed's `topkgating` "position" policy) token 0 would have kept both.
    #[test]
    fn first_choices_have_priority_over_second_choices() {
        let logits = nalgebra::dmatrix![1.0_f64, 0.0; 0.0, 1.0];
        let r = route_top_k(&logits, 2, false).unwrap();
        let d = apply_capacity(&r, 0.5).unwrap(); // C = ⌈0.5 · 2 · 2 / 2⌉ = 1
        assert_eq!(d.capacity(), 1);
        assert_eq!(d.dropped(), &[(0, 1), (1, 0)]);
        let c = d.combine_weights().unwrap();
        assert_eq!(
            c,
            nalgebra::dmatrix![r.gates()[0][0], 0.0; 0.0, r.gates()[1][0]]
        );
    }

    #[test]
    fn no_tokens_and_enough_capacity() {
        let r = route_top_k(&DMatrix::<f32>::zeros(0, 4), 2, true).unwrap();
        let d = apply_capacity(&r, 1.0).unwrap();
        assert_eq!((d.capacity(), d.drop_fraction()), (0, 0.0));
        assert!(d.assignments().is_empty() && d.dropped().is_empty());
        assert_eq!(d.loads().len(), 4);
        assert_eq!(d.combine_weights().unwrap().shape(), (0, 4));
        // Factor E / k: C = n, nothing is dropped however skewed the routing.
        let skewed = DMatrix::<f64>::from_fn(9, 4, |_, j| if j == 3 { 9.0 } else { 0.0 });
        let r = route_top_k(&skewed, 2, true).unwrap();
        let d = apply_capacity(&r, 2.0).unwrap();
        assert_eq!(d.capacity(), 9);
        assert!(d.dropped().is_empty());
        assert_eq!(d.loads()[3].kept, 9);
    }

    proptest::proptest! {
        #[test]
        fn capacity_invariants(
            n in 0_usize..40,
            e in 1_usize..7,
            k_pick in 0_usize..7,
            factor in 0.05_f64..3.0,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let k = 1 + k_pick % e;
            let mut state = seed;
            // Skewed logits from a small LCG: expert j gets a bonus j / 2, so drops happen.
            let logits = DMatrix::<f64>::from_fn(n, e, |_, j| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 + j as f64 * 0.5
            });
            let r = route_top_k(&logits, k, true).unwrap();
            let d = apply_capacity(&r, factor).unwrap();
            let c = d.capacity();
            proptest::prop_assert_eq!(c, expert_capacity(factor, n, k, e).unwrap());
            proptest::prop_assert!(c <= n);
            let mut routed_total = 0;
            for (j, load) in d.loads().iter().enumerate() {
                proptest::prop_assert_eq!(load.routed, load.kept + load.dropped);
                proptest::prop_assert_eq!(load.kept, load.routed.min(c));
                proptest::prop_assert!(load.kept <= c);
                routed_total += load.routed;
                // The kept slots of expert j are exactly 0..kept.
                let mut slots: Vec<usize> = d
                    .assignments()
                    .iter()
                    .filter(|a| a.expert == j)
                    .filter_map(|a| a.slot)
                    .collect();
                slots.sort_unstable();
                proptest::prop_assert_eq!(slots, (0..load.kept).collect::<Vec<_>>());
                // Priority: every kept assignment comes before every dropped one in
                // (rank, token) order.
                let key = |a: &Assignment<f64>| (a.rank, a.token);
                let of_j = d.assignments().iter().filter(|a| a.expert == j);
                let last_kept = of_j.clone().filter(|a| a.slot.is_some()).map(key).max();
                let first_dropped = of_j.filter(|a| a.slot.is_none()).map(key).min();
                if let (Some(a), Some(b)) = (last_kept, first_dropped) {
                    proptest::prop_assert!(a < b);
                }
            }
            proptest::prop_assert_eq!(routed_total, n * k);
            // The dropped list is exactly the slot-less assignments, rank-major.
            let mut expected: Vec<(usize, usize, usize)> = d
                .assignments()
                .iter()
                .filter(|a| a.slot.is_none())
                .map(|a| (a.rank, a.token, a.expert))
                .collect();
            expected.sort_unstable();
            let expected: Vec<(usize, usize)> = expected.into_iter().map(|(_, t, x)| (t, x)).collect();
            proptest::prop_assert_eq!(d.dropped(), &expected[..]);
            // Combine weights: kept gates only, so each row sums to at most 1.
            let cw = d.combine_weights().unwrap();
            for i in 0..n {
                proptest::prop_assert!(cw.row(i).sum() <= 1.0 + 1e-12);
            }
        }
    }

    /// Whether `computed` rounds to `published`, a figure given to a last digit worth `ulp`
    /// (46.7B: ulp = 0.1B): within half of it.
    fn within_rounding(computed: u64, published: f64, ulp: f64) -> bool {
        (computed as f64 - published).abs() <= ulp / 2.0
    }

    #[test]
    fn ffn_and_moe_counts() {
        let plain = Ffn::new(768, 3072, false).unwrap();
        assert_eq!(plain.params(), 2 * 768 * 3072);
        let gated = Ffn::new(4096, 14336, true).unwrap();
        assert_eq!(gated.params(), 176_160_768);
        let moe = MoeFfn::new(Ffn::new(7168, 2048, true).unwrap(), 256, 8, 1).unwrap();
        let expert = 3 * 7168 * 2048;
        assert_eq!(moe.total_params(), 257 * expert + 7168 * 256);
        assert_eq!(moe.active_params(), 9 * expert + 7168 * 256);
        assert_eq!(moe.flops_per_token(), 2 * moe.active_params());
        assert_eq!(moe.dense_equivalent().d_ff(), 9 * 2048);
        assert!(Ffn::new(1, 0, true).is_err());
        assert!(Ffn::new(usize::MAX, usize::MAX, true).is_err());
        assert!(MoeFfn::new(gated, usize::MAX, 1, 0).is_err());
        assert!(MoeFfn::new(gated, 8, 1, usize::MAX).is_err());
        assert!(attention_params(0, 1, 1, 1).is_err());
        assert!(attention_params(usize::MAX, usize::MAX, 1, 2).is_err());
        assert!(mla_attention_params(7168, 128, 0, 512, 0, 0, 128).is_err());
        // Without the query bottleneck, queries are a plain d_model x h (d_nope + d_rope).
        assert_eq!(
            mla_attention_params(10, 2, 0, 4, 3, 1, 5).unwrap(),
            10 * 2 * 4 + (10 * 5 + 4 + 4 * 2 * 8) + 2 * 5 * 10
        );
        assert!(ModelShape::new(0, 8, true).is_err());
        assert!(
            ModelShape::new(8, 8, true)
                .unwrap()
                .extra(u64::MAX)
                .is_err()
        );
        assert!(
            ModelShape::new(8, 8, true)
                .unwrap()
                .layers(usize::MAX, u64::MAX / 2, plain)
                .is_err()
        );
    }

    /// The published totals, from the configurations in the papers and model cards, within the
    /// rounding of the published figure (see docs/moe.md for the sources).
    #[test]
    fn parameter_counts_reproduce_published_totals() {
        const B: f64 = 1e9;
        // Mixtral 8x7B (Jiang et al. 2024, Table 1; Mistral AI: 46.7B total, 12.9B active).
        let mixer = attention_params(4096, 32, 8, 128).unwrap() + 2 * 4096;
        let mixtral = ModelShape::new(32000, 4096, false)
            .unwrap()
            .layers(
                32,
                mixer,
                MoeFfn::new(Ffn::new(4096, 14336, true).unwrap(), 8, 2, 0).unwrap(),
            )
            .unwrap();
        assert!(within_rounding(mixtral.total_params(), 46.7 * B, 0.1 * B));
        assert!(within_rounding(mixtral.active_params(), 12.9 * B, 0.1 * B));
        // Mistral 7B, the same decoder with one dense FFN: Hugging Face's 7.24B (Mistral AI's
        // announcement says 7.3B, which this count does not reproduce; see docs/moe.md).
        let mistral = ModelShape::new(32000, 4096, false)
            .unwrap()
            .layers(32, mixer, Ffn::new(4096, 14336, true).unwrap())
            .unwrap();
        assert!(within_rounding(mistral.total_params(), 7.24 * B, 0.01 * B));
        assert_eq!(mistral.active_params(), mistral.total_params());
        // DeepSeek-V3 (Liu et al. 2024, §4.2; config_671B.json): 671B total.
        let v3_mixer = mla_attention_params(7168, 128, 1536, 512, 128, 64, 128).unwrap() + 2 * 7168;
        let v3 = ModelShape::new(129_280, 7168, false)
            .unwrap()
            .layers(3, v3_mixer, Ffn::new(7168, 18432, true).unwrap())
            .unwrap()
            .layers(
                58,
                v3_mixer,
                MoeFfn::new(Ffn::new(7168, 2048, true).unwrap(), 256, 8, 1).unwrap(),
            )
            .unwrap()
            .extra(58 * 256) // the routers' bias terms (auxiliary-loss-free balancing)
            .unwrap();
        assert!(within_rounding(v3.total_params(), 671.0 * B, 1.0 * B));
        assert_eq!(v3.total_params(), 671_026_419_200);
        // DeepSeekMoE 16B (Dai et al. 2024, §5.1): 16.4B total, 2.8B active.
        let mixer16 = attention_params(2048, 16, 16, 128).unwrap() + 2 * 2048;
        let moe16 = ModelShape::new(102_400, 2048, false)
            .unwrap()
            .layers(1, mixer16, Ffn::new(2048, 10944, true).unwrap())
            .unwrap()
            .layers(
                27,
                mixer16,
                MoeFfn::new(Ffn::new(2048, 1408, true).unwrap(), 64, 6, 2).unwrap(),
            )
            .unwrap();
        assert!(within_rounding(moe16.total_params(), 16.4 * B, 0.1 * B));
        assert!(within_rounding(moe16.active_params(), 2.8 * B, 0.1 * B));
        // Switch-C (Fedus et al. 2022, Table 9): 1571B, every FFN of 15 + 15 layers sparse.
        let (d, heads) = (2080, 32);
        let attn = attention_params(d, heads, heads, 64).unwrap();
        let experts = MoeFfn::new(Ffn::new(d, 6144, false).unwrap(), 2048, 1, 0).unwrap();
        let switch_c = ModelShape::new(32128, d, true)
            .unwrap()
            .layers(15, attn + 2 * d as u64, experts) // encoder: self-attention
            .unwrap()
            .layers(15, 2 * attn + 3 * d as u64, experts) // decoder: self + cross
            .unwrap()
            .extra(d as u64 + 2 * 32 * heads as u64) // second final norm, relative biases
            .unwrap();
        assert!(within_rounding(switch_c.total_params(), 1571.0 * B, B));
        // Switch-Base-8 (Hugging Face's google/switch-base-8: 619M): T5-Base, every other FFN
        // of the 12 + 12 layers sparse.
        let (d, heads) = (768, 12);
        let attn = attention_params(d, heads, heads, 64).unwrap();
        let ffn = Ffn::new(d, 3072, false).unwrap();
        let experts = MoeFfn::new(ffn, 8, 1, 0).unwrap();
        let (enc, dec) = (attn + 2 * d as u64, 2 * attn + 3 * d as u64);
        let switch_base = ModelShape::new(32128, d, true)
            .unwrap()
            .layers(6, enc, ffn)
            .unwrap()
            .layers(6, enc, experts)
            .unwrap()
            .layers(6, dec, ffn)
            .unwrap()
            .layers(6, dec, experts)
            .unwrap()
            .extra(d as u64 + 2 * 32 * heads as u64)
            .unwrap();
        assert!(within_rounding(switch_base.total_params(), 619e6, 1e6));
    }
}
