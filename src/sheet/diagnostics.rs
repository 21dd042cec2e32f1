//! Stability diagnostics for attention (seed question 7, loss spikes).
//!
//! Loss spikes in large-model training often start in attention: logits grow until the
//! softmax saturates onto one key ("attention entropy collapse", Zhai et al. 2023), and the
//! gradient through it vanishes or explodes. Two numbers per query row watch for it:
//!
//! ```text
//! max logit   max_j S_ij                      (grows before a spike)
//! entropy     H_i = −Σ_j P_ij ln P_ij          (collapses toward 0 before a spike)
//! ```
//!
//! and two standard remedies are provided: logit soft-capping ([`softcap`], also
//! [`AttentionOptions::softcap`](crate::AttentionOptions::softcap)) and QK-norm
//! ([`rms_normalize_rows`], applied to Q and K per head before the dot product, as in
//! ViT-22B and OLMo 2), which bounds every logit by `scale · d`.

use crate::AttentionOptions;
use crate::Float;
use crate::attention::scaled_attention_with_stats;
use crate::error::{Error, Result, check_positive, checked_len};
use crate::kernel;
use crate::mask::Mask;
use crate::multihead::{Heads, head_problems};
use crate::prelude::*;
use crate::spec::{AttentionStats, Inputs};
use alloc::collections::VecDeque;
use core::fmt;
use nalgebra::{DMatrix, DMatrixView, DVector};

#[cfg(doc)]
use crate::{entropy_rows, scaled_attention_reference};

/// Per-query-row health of an attention: see the [module docs](self); made by [`diagnose`],
/// see there for an example.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionDiagnostics<T: Float> {
    /// `max_j S_ij` over the allowed keys (final scores: scaled, capped, biased); `-inf` for
    /// a fully masked row. Length n.
    pub max_logit: DVector<T>,
    /// Entropy of each row's weights in nats, `0 <= H_i <= ln(allowed keys)`; 0 for a fully
    /// masked row. Length n.
    pub entropy: DVector<T>,
    /// Each row's entropy divided by the log of its number of allowed keys: 1 is uniform
    /// attention, 0 is one-hot. Rows with fewer than two allowed keys get 0. Length n.
    pub normalized_entropy: DVector<T>,
}

/// Computes [`AttentionDiagnostics`] for the attention of `q` over `k` under `mask` and `opts`.
///
/// The statistics come from the tiled kernel ([`scaled_attention_with_stats`]), which never
/// materialises the n x m weights: O(tile) extra memory, the kernel's threads, cheap enough
/// for a training step. The normalised entropy divides by `ln a_i`, `a_i` the number of keys
/// the mask allows query i (the bias does not count).
///
/// Accuracy (see [`AttentionStats`]): the entropy has a relative error of about `(m + 4) · ε`
/// plus the first-order effect of the scores' rounding, `Σ_j P_ij |ln P_ij + H_i| · δ` (δ the
/// absolute error of a score, about `ε · |S_ij|`); the max logit a relative error of a few ε.
/// Rows whose scores leave the float range are computed exactly from their weights as
/// [`scaled_attention_reference`] does (then the max logit is `lse_i + ln max_j P_ij`, with
/// an absolute error of about `ε · (|lse_i| + ln m + 2)`).
///
/// # Errors
///
/// Those of [`scaled_attention_with`](crate::scaled_attention_with) (V is not needed; its
/// shape is not checked), and [`Error::TooLarge`] if n · m is past
/// what an n x m matrix could hold, checked before the attention runs (such a call could not
/// finish).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::diagnostics::diagnose;
/// use attention_math::{AttentionOptions, Mask};
/// use nalgebra::DMatrix;
///
/// // Large, aligned vectors: the unscaled logits saturate the softmax.
/// let x = DMatrix::<f64>::from_fn(4, 16, |i, j| if j % 4 == i { 8.0 } else { 0.0 });
/// let scaled = diagnose(&x, &x, &Mask::none(), &AttentionOptions::new())?;
/// let unscaled = diagnose(&x, &x, &Mask::none(), &AttentionOptions::new().scale(1.0))?;
/// assert!((unscaled.max_logit[0] - 4.0 * 64.0).abs() < 1e-12);
/// assert!((scaled.max_logit[0] - 64.0).abs() < 1e-12);
/// assert!(unscaled.entropy[0] < 1e-12 && scaled.entropy[0] < 1e-12);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn diagnose<'q, 'k, T: Float>(
    q: impl Into<DMatrixView<'q, T>>,
    k: impl Into<DMatrixView<'k, T>>,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
) -> Result<AttentionDiagnostics<T>> {
    let (q, k) = (q.into(), k.into());
    let (n, m) = (q.nrows(), k.nrows());
    checked_len::<T>("the n x m attention weights", n, m)?;
    let no_values = DMatrix::<T>::zeros(m, 0);
    let (_, stats) = scaled_attention_with_stats(q, k, &no_values, mask, opts)?;
    let allowed = allowed_keys(mask, n, m);
    Ok(diagnostics_of(stats, &allowed).0)
}

/// The number of keys the mask allows each query.
fn allowed_keys(mask: &Mask, n: usize, m: usize) -> Vec<usize> {
    (0..n)
        .map(|i| (0..m).filter(|&j| mask.allows_in(n, m, i, j)).count())
        .collect()
}

/// [`AttentionDiagnostics`] and the max probabilities from the kernel's statistics.
fn diagnostics_of<T: Float>(
    stats: AttentionStats<T>,
    allowed: &[usize],
) -> (AttentionDiagnostics<T>, DVector<T>) {
    let normalized_entropy = DVector::from_fn(allowed.len(), |i, _| {
        if allowed[i] < 2 {
            T::zero()
        } else {
            stats.entropy[i] / T::of_usize(allowed[i]).ln()
        }
    });
    let AttentionStats {
        max_logit,
        entropy,
        max_prob,
        ..
    } = stats;
    let diag = AttentionDiagnostics {
        max_logit,
        entropy,
        normalized_entropy,
    };
    (diag, max_prob)
}

/// One head's diagnostics over its query rows: made by [`diagnose_heads`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct HeadDiagnostics<T: Float> {
    /// Per query row: max logit, entropy, normalised entropy (as [`diagnose`] gives them).
    pub rows: AttentionDiagnostics<T>,
    /// Per query row: the largest weight, `exp(max_logit − lse)`; 0 for a fully masked row.
    pub max_prob: DVector<T>,
    /// The head in a few numbers.
    pub summary: HeadSummary<T>,
}

/// One head's statistics reduced over its query rows: those with at least two allowed keys
/// (a row with one key has weight 1 on it whatever the logits: it says nothing about
/// collapse, and under a causal mask row 0 is always such a row).
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct HeadSummary<T: Float> {
    /// How many rows the summary is over.
    pub rows: usize,
    /// Mean and minimum entropy (nats); 0 if `rows` is 0.
    pub mean_entropy: T,
    /// See `mean_entropy`.
    pub min_entropy: T,
    /// Mean and minimum normalised entropy (`H_i / ln a_i`, in [0, 1]); 1 if `rows` is 0
    /// (nothing that could collapse, so a [`StabilityMonitor`] does not flag it).
    pub mean_normalized_entropy: T,
    /// See `mean_normalized_entropy`.
    pub min_normalized_entropy: T,
    /// The largest max logit; −inf if `rows` is 0.
    pub max_logit: T,
    /// The largest max probability; 0 if `rows` is 0.
    pub max_prob: T,
}

impl<T: Float> HeadSummary<T> {
    fn of(rows: &AttentionDiagnostics<T>, max_prob: &DVector<T>, allowed: &[usize]) -> Self {
        let mut s = HeadSummary {
            rows: 0,
            mean_entropy: T::zero(),
            min_entropy: T::INFINITY,
            mean_normalized_entropy: T::zero(),
            min_normalized_entropy: T::INFINITY,
            max_logit: T::NEG_INFINITY,
            max_prob: T::zero(),
        };
        let pick_min = |a: T, b: T| if b < a { b } else { a };
        let pick_max = |a: T, b: T| if b > a { b } else { a };
        for (i, &a) in allowed.iter().enumerate() {
            if a < 2 {
                continue;
            }
            s.rows += 1;
            let (h, hn) = (rows.entropy[i], rows.normalized_entropy[i]);
            s.mean_entropy += h;
            s.mean_normalized_entropy += hn;
            s.min_entropy = pick_min(s.min_entropy, h);
            s.min_normalized_entropy = pick_min(s.min_normalized_entropy, hn);
            s.max_logit = pick_max(s.max_logit, rows.max_logit[i]);
            s.max_prob = pick_max(s.max_prob, max_prob[i]);
        }
        if s.rows == 0 {
            s.min_entropy = T::zero();
            s.mean_normalized_entropy = T::one();
            s.min_normalized_entropy = T::one();
        } else {
            let r = T::of_usize(s.rows);
            s.mean_entropy /= r;
            s.mean_normalized_entropy /= r;
        }
        s
    }

    /// What a [`StabilityMonitor`] reads from this head.
    ///
    /// # Examples
    ///
    /// See [`diagnose_heads`].
    pub fn observation(&self) -> HeadObservation {
        HeadObservation {
            mean_normalized_entropy: self.mean_normalized_entropy.as_f64(),
            min_normalized_entropy: self.min_normalized_entropy.as_f64(),
            max_logit: self.max_logit.as_f64(),
        }
    }
}

/// [`diagnose`] for every query head of a multi-head, grouped-query or multi-query layer
/// ([`Heads`]): per-row diagnostics, max probabilities and a [`HeadSummary`] per head.
///
/// Shapes: `q` n x (H·d), `k` m x (G·d), as for
/// [`multi_head_attention`](crate::multi_head_attention) (V is not needed). Each head runs
/// the tiled kernel with statistics (the few-query decode path is not used: the statistics
/// live in the tiled pass); ALiBi by head ([`AttentionOptions::alibi`]) gives head h the
/// h-th slope of H. Returns H entries, in head order.
///
/// # Errors
///
/// Those of [`multi_head_attention`](crate::multi_head_attention) for `q` and `k`, and
/// [`Error::TooLarge`] as for [`diagnose`].
///
/// # Examples
///
/// ```
/// use attention_math::sheet::diagnostics::{diagnose, diagnose_heads};
/// use attention_math::{AttentionOptions, Heads, Mask};
/// use nalgebra::DMatrix;
///
/// // 4 query heads of width 2 over 2 key-value heads.
/// let q = DMatrix::<f64>::from_fn(6, 8, |i, j| ((i * 8 + j) as f64).sin() * (1 + j / 2) as f64);
/// let k = DMatrix::<f64>::from_fn(6, 4, |i, j| ((i * 4 + j) as f64).cos());
/// let opts = AttentionOptions::new();
/// let heads = diagnose_heads(&q, &k, Heads::grouped(4, 2), &Mask::causal(), &opts)?;
/// assert_eq!(heads.len(), 4);
/// // Head 3 is query columns 6..8 against key-value head 1 (columns 2..4).
/// let one = diagnose(q.columns(6, 2), k.columns(2, 2), &Mask::causal(), &opts)?;
/// assert!((&heads[3].rows.entropy - &one.entropy).amax() < 1e-14);
/// // Row 0 sees one key and is left out of the summary.
/// assert_eq!(heads[3].summary.rows, 5);
/// let obs = heads[3].summary.observation();
/// assert!(obs.min_normalized_entropy <= obs.mean_normalized_entropy);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn diagnose_heads<'q, 'k, T: Float>(
    q: impl Into<DMatrixView<'q, T>>,
    k: impl Into<DMatrixView<'k, T>>,
    heads: Heads,
    mask: &Mask,
    opts: &AttentionOptions<'_, T>,
) -> Result<Vec<HeadDiagnostics<T>>> {
    let (q, k) = (q.into(), k.into());
    let (n, m) = (q.nrows(), k.nrows());
    checked_len::<T>("the n x m attention weights", n, m)?;
    let no_values = DMatrix::<T>::zeros(m, 0);
    let v = no_values.as_view();
    let (problems, _, _) = head_problems(&q, &k, &v, heads, mask, opts, Inputs::Check, false)?;
    let allowed = allowed_keys(mask, n, m);
    Ok(problems
        .iter()
        .map(|p| {
            let (_, stats) = kernel::attend_stats(p, opts.threads);
            let (rows, max_prob) = diagnostics_of(stats, &allowed);
            let summary = HeadSummary::of(&rows, &max_prob, &allowed);
            HeadDiagnostics {
                rows,
                max_prob,
                summary,
            }
        })
        .collect())
}

/// One head's health at one step, as a [`StabilityMonitor`] reads it (from
/// [`HeadSummary::observation`], or from statistics of your own).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadObservation {
    /// Mean normalised entropy over the head's query rows, in [0, 1].
    pub mean_normalized_entropy: f64,
    /// Minimum normalised entropy over the head's query rows (reported with the alerts).
    pub min_normalized_entropy: f64,
    /// The head's largest attention logit.
    pub max_logit: f64,
}

/// The thresholds of a [`StabilityMonitor`]; see [`MonitorConfig::default`] for the
/// defaults and their reasons.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MonitorConfig {
    /// Flag a head whose mean normalised entropy is below this, in [0, 1). Default 0.1.
    pub entropy_floor: f64,
    /// Flag a head whose mean normalised entropy falls faster than this per step, averaged
    /// over the window (> 0). Default 0.02.
    pub entropy_fall_per_step: f64,
    /// Flag a head whose max logit is above this (> 0). Default 50.
    pub logit_ceiling: f64,
    /// Flag a head whose max logit grows faster than this relative rate per step, the
    /// geometric mean over the window: `(L_t / L_{t−w})^(1/w) − 1` (> 0). Default 0.05.
    pub logit_growth_per_step: f64,
    /// The growth rate is only read when the older logit `L_{t−w}` is at least this (> 0): a
    /// ratio of logits near 0 is noise. Default 1.
    pub growth_min_logit: f64,
    /// Steps the rates are measured over, w >= 1. Default 8.
    pub window: usize,
}

impl Default for MonitorConfig {
    /// The defaults, and why (the full argument, with the formulas, is in
    /// `docs/stability.md`):
    ///
    /// - `entropy_floor = 0.1`: a mean normalised entropy of 0.1 over m keys is an effective
    ///   number of keys `exp(H) = m^0.1` (2 keys of 1024): the whole head attends almost
    ///   one-hot, the state Zhai et al. (2023, "Stabilizing Transformer Training by
    ///   Preventing Attention Entropy Collapse") find before divergence. A single sharp row
    ///   is normal (a previous-token head), so the floor reads the mean, not the minimum.
    /// - `entropy_fall_per_step = 0.02` over `window = 8`: a drop of 0.16 of the maximum
    ///   entropy in 8 observations, the sharp fall that precedes a collapse in their runs,
    ///   well above the slow drift of a head that is learning to focus.
    /// - `logit_ceiling = 50`: Gemma 2 soft-caps attention logits at 50 (`50 tanh(s / 50)`,
    ///   [`AttentionOptions::softcap`]); a logit past it outweighs any other key at 0 by
    ///   `e^50 ≈ 5·10^21`. Dehghani et al. (2023, ViT-22B) traced their divergence to
    ///   attention logits growing without bound and fixed it with QK-norm
    ///   ([`rms_normalize_rows`]).
    /// - `logit_growth_per_step = 0.05` (5% per observation, 1.5x over the window): steady
    ///   geometric growth is the signature of the query/key weights growing (the logit is
    ///   quadratic in them), and flags the trend long before the ceiling. The same reasoning
    ///   is behind ST-MoE's router z-loss (Zoph et al., 2022), which penalises
    ///   `(log Σ exp x)²` so that the logits entering a softmax stay small.
    ///
    /// The rates are per observation: with statistics logged every k steps, scale them.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::diagnostics::MonitorConfig;
    ///
    /// let c = MonitorConfig::default();
    /// assert_eq!((c.entropy_floor, c.logit_ceiling, c.window), (0.1, 50.0, 8));
    /// ```
    fn default() -> Self {
        MonitorConfig {
            entropy_floor: 0.1,
            entropy_fall_per_step: 0.02,
            logit_ceiling: 50.0,
            logit_growth_per_step: 0.05,
            growth_min_logit: 1.0,
            window: 8,
        }
    }
}

/// What a [`StabilityMonitor`] flags, for one head at one step.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Alert {
    /// The head's mean normalised entropy is below [`MonitorConfig::entropy_floor`].
    EntropyLow {
        /// The step (0-based count of observations).
        step: usize,
        /// The head.
        head: usize,
        /// Its mean normalised entropy.
        mean: f64,
        /// Its minimum normalised entropy.
        min: f64,
    },
    /// The mean normalised entropy fell faster than
    /// [`MonitorConfig::entropy_fall_per_step`] over the window.
    EntropyFalling {
        /// The step.
        step: usize,
        /// The head.
        head: usize,
        /// The fall per step, averaged over the window.
        per_step: f64,
    },
    /// The head's max logit is above [`MonitorConfig::logit_ceiling`].
    LogitHigh {
        /// The step.
        step: usize,
        /// The head.
        head: usize,
        /// Its max logit.
        max_logit: f64,
    },
    /// The max logit grew faster than [`MonitorConfig::logit_growth_per_step`] over the
    /// window.
    LogitGrowing {
        /// The step.
        step: usize,
        /// The head.
        head: usize,
        /// The relative growth per step (geometric mean over the window).
        per_step: f64,
    },
}

impl Alert {
    /// A short name of the alert's kind: `entropy-low`, `entropy-falling`, `logit-high` or
    /// `logit-growing`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::diagnostics::Alert;
    ///
    /// let a = Alert::LogitHigh { step: 3, head: 0, max_logit: 60.0 };
    /// assert_eq!(a.kind(), "logit-high");
    /// assert_eq!(a.to_string(), "step 3, head 0: max logit 60 above the ceiling");
    /// ```
    pub fn kind(&self) -> &'static str {
        match self {
            Alert::EntropyLow { .. } => "entropy-low",
            Alert::EntropyFalling { .. } => "entropy-falling",
            Alert::LogitHigh { .. } => "logit-high",
            Alert::LogitGrowing { .. } => "logit-growing",
        }
    }
}

impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Alert::EntropyLow {
                step,
                head,
                mean,
                min,
            } => write!(
                f,
                "step {step}, head {head}: mean normalised entropy {mean:.3} (min {min:.3}) below the floor"
            ),
            Alert::EntropyFalling {
                step,
                head,
                per_step,
            } => write!(
                f,
                "step {step}, head {head}: normalised entropy falling {per_step:.3} per step"
            ),
            Alert::LogitHigh {
                step,
                head,
                max_logit,
            } => write!(
                f,
                "step {step}, head {head}: max logit {max_logit} above the ceiling"
            ),
            Alert::LogitGrowing {
                step,
                head,
                per_step,
            } => write!(
                f,
                "step {step}, head {head}: max logit growing {:.1}% per step",
                per_step * 100.0
            ),
        }
    }
}

/// Watches per-step attention statistics for the two precursors of a loss spike in
/// attention: entropy collapse (Zhai et al., 2023) and logit growth (Dehghani et al., 2023),
/// with the thresholds of a [`MonitorConfig`].
///
/// Feed it one [`HeadObservation`] per head per step ([`StabilityMonitor::observe`]); each call
/// returns the alerts of that step. For head h at step t with mean normalised entropy `H_t`
/// and max logit `L_t`, over a window of w steps:
///
/// ```text
/// entropy-low      H_t < entropy_floor
/// entropy-falling  (H_{t−w} − H_t) / w > entropy_fall_per_step
/// logit-high       L_t > logit_ceiling
/// logit-growing    (L_t / L_{t−w})^(1/w) − 1 > logit_growth_per_step,  if L_{t−w} >= growth_min_logit
/// ```
///
/// The rates need w + 1 observations; before that only the levels are checked.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::diagnostics::{HeadObservation, MonitorConfig, StabilityMonitor};
///
/// let mut monitor = StabilityMonitor::new(MonitorConfig::default())?;
/// // A head whose logits grow 10% per step while its entropy falls.
/// let mut fired = None;
/// for t in 0..40 {
///     let max_logit = 2.0 * 1.1_f64.powi(t);
///     let h = (1.0 - 0.03 * t as f64).max(0.0);
///     let obs = HeadObservation { mean_normalized_entropy: h, min_normalized_entropy: h, max_logit };
///     let alerts = monitor.observe(&[obs])?;
///     if fired.is_none() && !alerts.is_empty() {
///         fired = Some((t, alerts[0].kind()));
///     }
/// }
/// // Both rates are flagged as soon as the window is full (step 8), long before the levels.
/// assert_eq!(fired, Some((8, "entropy-falling")));
/// // Bad thresholds are errors.
/// assert!(StabilityMonitor::new(MonitorConfig { entropy_floor: 1.5, ..Default::default() }).is_err());
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct StabilityMonitor {
    config: MonitorConfig,
    /// The last `window` steps, oldest first.
    history: VecDeque<Vec<HeadObservation>>,
    step: usize,
}

impl StabilityMonitor {
    /// A monitor with the given thresholds.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] naming the field unless `entropy_floor` is in [0, 1),
    /// `entropy_fall_per_step`, `logit_ceiling`, `logit_growth_per_step` and
    /// `growth_min_logit` are finite and > 0, and `window >= 1`.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::diagnostics::{MonitorConfig, StabilityMonitor};
    ///
    /// let e = StabilityMonitor::new(MonitorConfig { logit_ceiling: -1.0, ..Default::default() }).unwrap_err();
    /// assert_eq!(e.to_string(), "logit_ceiling = -1 is invalid: it must be finite and > 0");
    /// ```
    pub fn new(config: MonitorConfig) -> Result<Self> {
        let c = &config;
        if !(c.entropy_floor >= 0.0 && c.entropy_floor < 1.0) {
            return Err(Error::InvalidParameter {
                name: "entropy_floor",
                value: c.entropy_floor,
                requirement: "must be in [0, 1)",
            });
        }
        check_positive("entropy_fall_per_step", c.entropy_fall_per_step)?;
        check_positive("logit_ceiling", c.logit_ceiling)?;
        check_positive("logit_growth_per_step", c.logit_growth_per_step)?;
        check_positive("growth_min_logit", c.growth_min_logit)?;
        if c.window == 0 {
            return Err(Error::InvalidParameter {
                name: "window",
                value: 0.0,
                requirement: "must be >= 1",
            });
        }
        Ok(StabilityMonitor {
            config,
            history: VecDeque::with_capacity(c.window),
            step: 0,
        })
    }

    /// The thresholds.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::diagnostics::{MonitorConfig, StabilityMonitor};
    ///
    /// let m = StabilityMonitor::new(MonitorConfig::default())?;
    /// assert_eq!(m.config().window, 8);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn config(&self) -> &MonitorConfig {
        &self.config
    }

    /// Records one step (one observation per head, the same heads every step) and returns its
    /// alerts, head by head in the order entropy-low, entropy-falling, logit-high,
    /// logit-growing (see [`StabilityMonitor`] for the rules).
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidParameter`] (`heads`) if the number of heads differs from the first
    ///   step's, or is 0;
    /// - [`Error::NonFinite`] (`observation`, row = head, column = field 0, 1, 2 in the order
    ///   of [`HeadObservation`]) for a NaN, or an infinite entropy (a max logit of −inf, a
    ///   fully masked head, is fine; +inf is flagged as above the ceiling).
    ///
    /// On error nothing is recorded.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::diagnostics::{HeadObservation, MonitorConfig, StabilityMonitor};
    ///
    /// let mut m = StabilityMonitor::new(MonitorConfig::default())?;
    /// let healthy = HeadObservation { mean_normalized_entropy: 0.7, min_normalized_entropy: 0.2, max_logit: 6.0 };
    /// assert!(m.observe(&[healthy, healthy])?.is_empty());
    /// assert!(m.observe(&[healthy]).is_err()); // two heads, then one
    /// let hot = HeadObservation { max_logit: 80.0, ..healthy };
    /// assert_eq!(m.observe(&[healthy, hot])?[0].kind(), "logit-high");
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn observe(&mut self, heads: &[HeadObservation]) -> Result<Vec<Alert>> {
        let expected = self.history.front().map(Vec::len);
        if heads.is_empty() || expected.is_some_and(|e| e != heads.len()) {
            return Err(Error::InvalidParameter {
                name: "heads",
                value: heads.len() as f64,
                requirement: "must be >= 1 and the same number every step",
            });
        }
        for (h, o) in heads.iter().enumerate() {
            let fields = [
                o.mean_normalized_entropy,
                o.min_normalized_entropy,
                o.max_logit,
            ];
            for (c, &x) in fields.iter().enumerate() {
                if x.is_nan() || (c < 2 && x.is_infinite()) {
                    return Err(Error::NonFinite {
                        arg: "observation",
                        row: h,
                        col: c,
                    });
                }
            }
        }
        let c = self.config;
        let step = self.step;
        // The history holds steps t − w .. t − 1 once it is full.
        let old = (self.history.len() >= c.window).then(|| &self.history[0]);
        let w = c.window as f64;
        let mut alerts = Vec::new();
        for (head, o) in heads.iter().enumerate() {
            if o.mean_normalized_entropy < c.entropy_floor {
                alerts.push(Alert::EntropyLow {
                    step,
                    head,
                    mean: o.mean_normalized_entropy,
                    min: o.min_normalized_entropy,
                });
            }
            if let Some(old) = old {
                let per_step = (old[head].mean_normalized_entropy - o.mean_normalized_entropy) / w;
                if per_step > c.entropy_fall_per_step {
                    alerts.push(Alert::EntropyFalling {
                        step,
                        head,
                        per_step,
                    });
                }
            }
            if o.max_logit > c.logit_ceiling {
                alerts.push(Alert::LogitHigh {
                    step,
                    head,
                    max_logit: o.max_logit,
                });
            }
            if let Some(old) = old {
                let l0 = old[head].max_logit;
                if l0 >= c.growth_min_logit && o.max_logit.is_finite() {
                    let per_step = (o.max_logit / l0).powf(1.0 / w) - 1.0;
                    if per_step > c.logit_growth_per_step {
                        alerts.push(Alert::LogitGrowing {
                            step,
                            head,
                            per_step,
                        });
                    }
                }
            }
        }
        if self.history.len() >= c.window {
            self.history.pop_front();
        }
        self.history.push_back(heads.to_vec());
        self.step += 1;
        Ok(alerts)
    }
}

/// Soft-capping of one logit: `c · tanh(x / c)`, smooth, odd, ≈ x for |x| ≪ c, bounded by c.
///
/// For `|x / c| < √ε` the result is `x` itself (`tanh u = u (1 − u²/3 + ...)` there, so this is
/// exact to rounding), which keeps tiny logits whose quotient `x / c` would underflow.
/// `x = ±inf` gives `±c`; NaN gives NaN. Accuracy: a relative error of a few ε.
///
/// # Errors
///
/// [`Error::InvalidParameter`] unless `c` is finite and > 0.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::diagnostics::softcap;
///
/// assert!((softcap(0.1_f64, 50.0)? - 0.1).abs() < 1e-6);
/// assert!((softcap(1e6_f64, 50.0)? - 50.0).abs() < 1e-12);
/// assert!(softcap(1.0_f32, 0.0).is_err());
/// // x / c underflows to 0 in f32, the capped value is still x.
/// assert_eq!(softcap(1e-30_f32, 1e20)?, 1e-30);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn softcap<T: Float>(x: T, c: T) -> Result<T> {
    check_positive("softcap", c)?;
    let u = x / c;
    Ok(if u.abs() < T::EPSILON.sqrt() {
        x
    } else {
        c * u.tanh()
    })
}

/// RMS-normalises every row: `x_i ← x_i / sqrt(mean_j x_ij² + eps)`, the parameter-free
/// part of QK-norm. Apply it to each head's Q and K before attention: then
/// `|q_i · k_j| <= d` and the default scale bounds every logit by `√d`.
///
/// Each row is scaled by its largest magnitude `a` before squaring:
/// `x_i / sqrt(mean x² + eps) = (x_i / a) / sqrt(mean (x / a)² + eps / a²)`, so rows of
/// huge entries (1e20 in f32, whose squares overflow) and of tiny ones (whose squares
/// underflow) are normalised correctly. When `eps / a²` overflows, `a² · mean (x/a)²` is
/// below `eps · ε` and the row is `x / √eps`. A row holding NaN becomes all NaN and a row
/// holding an infinity gets NaN there and 0 elsewhere, as the direct formula gives.
///
/// Accuracy: a relative error of about `(d + 4) · ε` per entry (the mean of squares adds
/// terms of one sign).
///
/// # Errors
///
/// [`Error::InvalidParameter`] unless `eps` is finite and > 0.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::diagnostics::rms_normalize_rows;
/// use nalgebra::dmatrix;
///
/// let x = dmatrix![3.0_f64, 4.0; 0.0, 0.0];
/// let y = rms_normalize_rows(&x, 1e-12)?;
/// let rms = (12.5_f64 + 1e-12).sqrt();
/// assert!((y[(0, 0)] - 3.0 / rms).abs() < 1e-15);
/// assert_eq!(y[(1, 1)], 0.0); // a zero row stays zero
/// // Squares that would overflow: the RMS of (3e20, 4e20) is 3.54e20, not inf.
/// let big = rms_normalize_rows(&dmatrix![3e20_f32, 4e20], 1e-6)?;
/// assert!((big[(0, 0)] - 3.0 / 12.5_f32.sqrt()).abs() < 1e-6);
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn rms_normalize_rows<'a, T: Float>(
    x: impl Into<DMatrixView<'a, T>>,
    eps: T,
) -> Result<DMatrix<T>> {
    check_positive("eps", eps)?;
    let mut y = x.into().into_owned();
    let (n, cols) = y.shape();
    let d = T::of_usize(cols.max(1));
    // nalgebra is column-major: every pass runs down the columns, with the per-row state in
    // buffers of length n (a row walk strides by n and was 97 µs at 64 x 256). The sums add
    // each row's terms in column order, as a row walk does: the same bits.
    let mut a = vec![T::zero(); n];
    let mut nan = vec![false; n];
    for col in y.column_iter() {
        for ((a, nan), &v) in a.iter_mut().zip(nan.iter_mut()).zip(col.iter()) {
            *nan |= v.is_nan_value();
            if v.abs() > *a {
                *a = v.abs();
            }
        }
    }
    // Per row, what to do: `Div(r)`: x / r; `Mul(inv)`: x · inv; `Two(a, root)`: (x / a) / root.
    #[derive(Clone, Copy)]
    enum Step<T> {
        Nan,
        Div(T),
        Mul(T),
        Two(T, T),
    }
    // Pass 2: the mean of squares, of x (infinite or zero rows, the direct formula) or of
    // x / a (finite rows, scaled before squaring; see the doc comment).
    let direct = |a: T| !a.is_finite() || a == T::zero();
    let mut sq = vec![T::zero(); n];
    for col in y.column_iter() {
        for (i, &v) in col.iter().enumerate() {
            if nan[i] {
                continue;
            }
            if direct(a[i]) {
                sq[i] += v * v;
            } else if (eps / a[i] / a[i]).is_finite() {
                let r = v / a[i];
                sq[i] += r * r;
            }
        }
    }
    let steps: Vec<Step<T>> = (0..n)
        .map(|i| {
            if nan[i] {
                return Step::Nan;
            }
            let a = a[i];
            if direct(a) {
                // Infinite entries (the direct formula: inf / inf = NaN, finite / inf = 0),
                // or an all-zero row, which stays zero.
                return Step::Div((sq[i] / d + eps).sqrt());
            }
            let t = eps / a / a;
            if !t.is_finite() {
                return Step::Div(eps.sqrt());
            }
            let s = sq[i] / d;
            let inv = T::one() / ((s + t).sqrt() * a);
            if inv.is_finite() {
                Step::Mul(inv)
            } else {
                // (s + t)·a underflowed: divide in two steps instead.
                Step::Two(a, (s + t).sqrt())
            }
        })
        .collect();
    for mut col in y.column_iter_mut() {
        for (v, step) in col.iter_mut().zip(&steps) {
            *v = match *step {
                Step::Nan => T::NAN,
                Step::Div(r) => *v / r,
                Step::Mul(inv) => *v * inv,
                Step::Two(a, root) => (*v / a) / root,
            };
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::softmax::softmax;

    #[test]
    fn diagnostics_match_direct_computation() {
        let q = DMatrix::<f64>::from_fn(5, 3, |i, j| ((i * 3 + j) as f64 * 0.9).sin() * 2.0);
        let k = DMatrix::<f64>::from_fn(6, 3, |i, j| ((i + 7 * j) as f64 * 0.4).cos() * 2.0);
        let mask = Mask::causal_bottom_right().and(Mask::sliding_window(3).not().not());
        let diag = diagnose(&q, &k, &mask, &AttentionOptions::new()).unwrap();
        let (n, m) = (5, 6);
        for i in 0..n {
            let s: Vec<f64> = (0..m)
                .map(|j| {
                    if mask.allows_in(n, m, i, j) {
                        q.row(i).dot(&k.row(j)) / 3.0_f64.sqrt()
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(
                diag.max_logit[i] == f64::NEG_INFINITY,
                max == f64::NEG_INFINITY
            );
            if max.is_finite() {
                assert!((diag.max_logit[i] - max).abs() < 1e-12);
            }
            let h = crate::entropy::entropy(&softmax(&s));
            assert!((diag.entropy[i] - h).abs() < 1e-12);
            let allowed = s.iter().filter(|v| v.is_finite()).count();
            if allowed >= 2 {
                assert!((diag.normalized_entropy[i] - h / (allowed as f64).ln()).abs() < 1e-12);
            } else {
                assert_eq!(diag.normalized_entropy[i], 0.0);
            }
        }
    }

    /// Before: the squares of 1e20 overflowed (the row became 0) and those of 1e-23
    /// underflowed in f32 (the row came out 40% too large).
    #[test]
    fn rms_scales_before_squaring() {
        let x = nalgebra::dmatrix![3e20_f32, -4e20; 3e-23, 4e-23; 0.0, 0.0];
        let eps = 1e-45_f32; // subnormal: 1.4e-45
        let y = rms_normalize_rows(&x, eps).unwrap();
        for i in 0..2 {
            let row = [x[(i, 0)] as f64, x[(i, 1)] as f64];
            let ms = (row[0] * row[0] + row[1] * row[1]) / 2.0;
            for j in 0..2 {
                let want = row[j] / (ms + eps as f64).sqrt();
                let got = y[(i, j)] as f64;
                assert!(
                    (got - want).abs() < 1e-6 * want.abs(),
                    "({i}, {j}): {got} vs {want}"
                );
            }
        }
        assert_eq!((y[(2, 0)], y[(2, 1)]), (0.0, 0.0));
        // eps dominates a tiny row: x / sqrt(eps + tiny) ≈ x / √eps.
        let y = rms_normalize_rows(&nalgebra::dmatrix![1e-40_f64, 0.0], 1.0).unwrap();
        assert_eq!(y[(0, 0)], 1e-40);
        let y = rms_normalize_rows(&nalgebra::dmatrix![f64::NAN, 1.0; f64::INFINITY, 1.0], 1e-6)
            .unwrap();
        assert!(y[(0, 0)].is_nan() && y[(0, 1)].is_nan());
        assert!(y[(1, 0)].is_nan() && y[(1, 1)] == 0.0);
        // Against f64 on random-ish rows.
        let x = DMatrix::<f64>::from_fn(5, 7, |i, j| {
            ((i * 7 + j) as f64 * 0.61).sin() * 10f64.powi(i as i32 * 3 - 6)
        });
        let y = rms_normalize_rows(&x, 1e-12).unwrap();
        for i in 0..5 {
            let ms = x.row(i).iter().map(|v| v * v).sum::<f64>() / 7.0;
            for j in 0..7 {
                let want = x[(i, j)] / (ms + 1e-12).sqrt();
                assert!(
                    (y[(i, j)] - want).abs() <= 1e-14 * want.abs().max(1e-300),
                    "{i} {j}"
                );
            }
        }
    }

    /// The row-by-row implementation the column-wise one replaced, kept as the oracle.
    fn rms_rowwise<T: Float>(x: &DMatrix<T>, eps: T) -> DMatrix<T> {
        let mut y = x.clone();
        let d = T::of_usize(y.ncols().max(1));
        for mut row in y.row_iter_mut() {
            let mut a = T::zero();
            let mut nan = false;
            for &v in row.iter() {
                nan |= v.is_nan_value();
                if v.abs() > a {
                    a = v.abs();
                }
            }
            if nan {
                row.fill(T::NAN);
                continue;
            }
            if !a.is_finite() || a == T::zero() {
                let mean_sq = row.iter().fold(T::zero(), |acc, &v| acc + v * v) / d;
                row /= (mean_sq + eps).sqrt();
                continue;
            }
            let t = eps / a / a;
            if t.is_finite() {
                let s = row.iter().fold(T::zero(), |acc, &v| {
                    let r = v / a;
                    acc + r * r
                }) / d;
                let inv = T::one() / ((s + t).sqrt() * a);
                if inv.is_finite() {
                    row *= inv;
                } else {
                    let root = (s + t).sqrt();
                    row.apply(|v| *v = (*v / a) / root);
                }
            } else {
                row /= eps.sqrt();
            }
        }
        y
    }

    /// The column-wise pass gives the row walk's bits: random rows of every magnitude, and
    /// NaN, infinite, zero, tiny and huge rows, in f32 and f64.
    #[test]
    fn column_wise_rms_has_the_row_walks_bits() {
        fn run<T: Float>(specials: &[T], eps: &[T]) {
            let (n, d) = (24, 37);
            let x = DMatrix::<T>::from_fn(n, d, |i, j| {
                let base = T::of_f64(((i * d + j) as f64 * 0.713).sin());
                match i % 8 {
                    0 => base * T::of_f64(1e-30),
                    1 => base * T::of_f64(1e30),
                    2 if j == 5 => specials[i / 8 % specials.len()],
                    3 => T::zero(),
                    4 => base * T::of_f64(1e-44),
                    _ => base * T::of_f64(10f64.powi(i as i32 % 5)),
                }
            });
            for &e in eps {
                let (a, b) = (rms_normalize_rows(&x, e).unwrap(), rms_rowwise(&x, e));
                for (u, v) in a.iter().zip(b.iter()) {
                    assert_eq!(u.as_f64().to_bits(), v.as_f64().to_bits(), "eps {e}");
                }
            }
        }
        run::<f32>(
            &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0],
            &[1e-6, 1e-45, 1e30],
        );
        run::<f64>(&[f64::NAN, f64::INFINITY, 3.0], &[1e-12, 5e-324, 1.0]);
        // Empty shapes.
        assert_eq!(
            rms_normalize_rows(&DMatrix::<f64>::zeros(0, 3), 1e-6)
                .unwrap()
                .shape(),
            (0, 3)
        );
        assert_eq!(
            rms_normalize_rows(&DMatrix::<f64>::zeros(3, 0), 1e-6)
                .unwrap()
                .shape(),
            (3, 0)
        );
    }

    #[test]
    fn softcap_keeps_tiny_logits_and_caps_infinities() {
        assert_eq!(softcap(1e-30_f32, 1e20).unwrap(), 1e-30);
        assert_eq!(softcap(f64::INFINITY, 30.0).unwrap(), 30.0);
        assert_eq!(softcap(f64::NEG_INFINITY, 30.0).unwrap(), -30.0);
        assert!(softcap(f64::NAN, 30.0).unwrap().is_nan());
        let (x, c) = (0.5_f64, 30.0);
        assert!((softcap(x, c).unwrap() - c * (x / c).tanh()).abs() < 1e-16);
    }

    #[test]
    fn diagnose_checks_the_weights_size_first() {
        let q = DMatrix::<f32>::zeros(1 << 32, 0);
        assert!(matches!(
            diagnose(&q, &q, &Mask::none(), &AttentionOptions::new()),
            Err(crate::Error::TooLarge { .. })
        ));
    }

    #[test]
    fn qk_norm_bounds_the_logits() {
        let q = DMatrix::<f64>::from_fn(4, 8, |i, j| ((i * 8 + j) as f64).sin() * 1e3);
        let qn = rms_normalize_rows(&q, 1e-6).unwrap();
        for row in qn.row_iter() {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / 8.0;
            assert!((ms - 1.0).abs() < 1e-9);
        }
        let diag = diagnose(&qn, &qn, &Mask::none(), &AttentionOptions::new()).unwrap();
        assert!(diag.max_logit.iter().all(|&l| l <= 8.0_f64.sqrt() + 1e-9));
    }
}
