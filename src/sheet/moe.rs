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

use crate::Float;
use crate::error::{Error, Result, check_finite};
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
}

impl<T: Float> Routing<T> {
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
                .unwrap_or(std::cmp::Ordering::Equal)
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
}
