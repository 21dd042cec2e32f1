//! The seed's question 2, *why divide by √d_k?*, as a reproducible Monte Carlo study.
//!
//! For `d_k`-dimensional query and key vectors with independent zero-mean, unit-variance
//! components, the dot product `s = q · k = Σ_i q_i k_i` is a sum of `d_k` independent terms
//! of variance `E[q_i²] E[k_i²] = 1`, so
//!
//! ```text
//! Var(q · k)        = d_k
//! Var(q · k / √d_k) = 1
//! ```
//!
//! Unscaled, the logits spread out as `d_k` grows, the softmax saturates towards one-hot,
//! and its Jacobian `∂p/∂s = diag(p) − p pᵀ` collapses towards zero: little gradient gets
//! through. Scaled by `1/√d_k`, every `d_k` looks like `d_k = 1`.
//!
//! [`ScalingStudy`] draws, for each `d_k`, `trials` queries each scored against `m` fresh keys
//! (the seed's `simulate(d_k_list=(4, 64, 256), m=64, trials=2000)`), and reports per `d_k`, for
//! the raw and the scaled logits, the columns of the seed's table ([`Stats`]) plus the mean
//! Frobenius norm of the softmax Jacobian ([`softmax_jacobian_fro`]). The derivation, this
//! crate's table next to the seed's, the figures and the timings are in `docs/scaling.md` in
//! the repository; `cargo run --release --example scaling_study` prints the table and writes
//! the seed's CSV and histograms plus a sweep over `d_k = 1 ..= 1024`.
//!
//! Everything is computed in `f64` and reuses the crate's [`softmax_in_place`] and
//! [`entropy`]. Runs are deterministic: each `d_k` draws from its own
//! [`Xoshiro256PlusPlus`] stream seeded from `(seed, d_k)`, so a row depends on the seed, `d_k`,
//! `m`, `trials` and the distribution, not on which other `d_k` are in the list.
//!
//! # Examples
//!
//! ```
//! use attention_math::sheet::scaling::ScalingStudy;
//!
//! let report = ScalingStudy::new().d_k([4, 256]).keys(16).trials(200).seed(7).run()?;
//! let (small, large) = (&report.rows[0], &report.rows[1]);
//! // Unscaled, the logit variance is about d_k; scaled, about 1.
//! assert!((large.unscaled.logit_var / 256.0 - 1.0).abs() < 0.2);
//! assert!((large.scaled.logit_var - 1.0).abs() < 0.2);
//! // Unscaled attention saturates as d_k grows; scaled attention does not.
//! assert!(large.unscaled.mean_max_prob > small.unscaled.mean_max_prob + 0.3);
//! assert!((large.scaled.mean_max_prob - small.scaled.mean_max_prob).abs() < 0.05);
//! # Ok::<(), attention_math::Error>(())
//! ```

use crate::Float;
use crate::entropy::entropy;
use crate::error::{Error, Result, checked_len, try_vec, try_with_capacity};
use crate::grad::softmax_vjp;
use crate::prelude::*;
use crate::softmax::softmax_in_place;
use core::fmt;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

/// The distribution of every query and key component. All have mean 0 and variance 1, so
/// `Var(q · k) = d_k` for each of them; they differ in their fourth moment (3, 1.8 and 1),
/// which only changes how fast the estimates converge.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::scaling::{Components, ScalingStudy};
///
/// assert_eq!(Components::default(), Components::StandardNormal);
/// let r = ScalingStudy::new()
///     .d_k([64])
///     .trials(300)
///     .components(Components::Rademacher)
///     .run()?;
/// assert!((r.rows[0].unscaled.logit_var / 64.0 - 1.0).abs() < 0.1);
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Components {
    /// `N(0, 1)`, as the seed (`rng.normal`).
    #[default]
    StandardNormal,
    /// Uniform on `[−√3, √3)`.
    Uniform,
    /// `±1` with probability 1/2 each.
    Rademacher,
}

/// Configuration of the scaling study (a builder); [`run`](ScalingStudy::run) performs it.
///
/// Defaults are the seed's: `d_k ∈ {4, 64, 256}`, `m = 64` keys, 2000 trials, standard
/// normal components, and seed 42 (the seed's `default_rng(42)`; the generators differ, so
/// the draws do too).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::scaling::ScalingStudy;
///
/// let study = ScalingStudy::new();
/// assert_eq!(study.d_k_list(), &[4, 64, 256]);
/// let r = ScalingStudy::new().d_k([1, 16]).keys(8).trials(50).run()?;
/// assert_eq!(r.rows.len(), 2);
/// assert_eq!((r.rows[1].d_k, r.rows[1].keys, r.rows[1].trials), (16, 8, 50));
/// // Same configuration, same numbers.
/// assert_eq!(r, ScalingStudy::new().d_k([1, 16]).keys(8).trials(50).run()?);
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalingStudy {
    d_k: Vec<usize>,
    keys: usize,
    trials: usize,
    components: Components,
    seed: u64,
}

impl Default for ScalingStudy {
    fn default() -> Self {
        Self {
            d_k: vec![4, 64, 256],
            keys: 64,
            trials: 2000,
            components: Components::StandardNormal,
            seed: 42,
        }
    }
}

impl ScalingStudy {
    /// The seed's configuration: d_k = 4, 64, 256; m = 64 keys; 2000 trials; standard
    /// normal components; seed 42.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::scaling::ScalingStudy;
    ///
    /// assert_eq!(ScalingStudy::new().d_k_list(), &[4, 64, 256]);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The key/query dimensions to study, in the order the rows are reported.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::scaling::{Components, ScalingStudy};
    ///
    /// let study = ScalingStudy::new().d_k([8, 32]).keys(16).trials(100).components(Components::Uniform).seed(1);
    /// assert_eq!(study.d_k_list(), &[8, 32]);
    /// let r = study.run()?;
    /// assert_eq!((r.rows.len(), r.rows[0].keys, r.rows[0].trials), (2, 16, 100));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn d_k(mut self, d_k: impl Into<Vec<usize>>) -> Self {
        self.d_k = d_k.into();
        self
    }

    /// The number of keys `m` each query is scored against (the softmax length). See
    /// [`ScalingStudy::d_k`] for an example.
    pub fn keys(mut self, m: usize) -> Self {
        self.keys = m;
        self
    }

    /// The number of independent queries per `d_k` (each with its own `m` keys). See
    /// [`ScalingStudy::d_k`] for an example.
    pub fn trials(mut self, trials: usize) -> Self {
        self.trials = trials;
        self
    }

    /// The distribution of the query and key components. See [`ScalingStudy::d_k`] for an
    /// example.
    pub fn components(mut self, components: Components) -> Self {
        self.components = components;
        self
    }

    /// The seed of the random number generator. See [`ScalingStudy::d_k`] for an example.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The configured list of `d_k`. See [`ScalingStudy::d_k`] for an example.
    pub fn d_k_list(&self) -> &[usize] {
        &self.d_k
    }

    /// Runs the study: for each `d_k`, draws `trials` queries `q` and `trials x m` keys `k`,
    /// forms the logits `s = q · k` and `s / √d_k`, and summarises both (see [`Stats`]).
    ///
    /// Cost: `trials · (m + 1) · Σ d_k` random draws; memory: `trials · m` logits (those of
    /// the last `d_k` are returned in [`ScalingReport::samples`]).
    ///
    /// # Errors
    ///
    /// - [`Error::Empty`] if the `d_k` list is empty;
    /// - [`Error::InvalidParameter`] if some `d_k`, `keys` or `trials` is 0, or if
    ///   `trials · keys < 2` (the variance is taken with `ddof = 1`);
    /// - [`Error::TooLarge`] if a buffer the study needs (the `trials x keys` logits, one
    ///   trial's `keys x d_k` key components, the per-row samples) cannot be allocated: its
    ///   size overflows, exceeds `isize::MAX` bytes or is refused by the allocator. Sizes are
    ///   checked for every `d_k` before any work starts.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Error, sheet::scaling::ScalingStudy};
    ///
    /// assert!(matches!(ScalingStudy::new().d_k([]).run(), Err(Error::Empty { .. })));
    /// let err = ScalingStudy::new().d_k([4, 0]).run().unwrap_err();
    /// assert_eq!(err.to_string(), "d_k = 0 is invalid: it must be >= 1");
    /// assert!(ScalingStudy::new().keys(1).trials(1).run().is_err());
    /// let huge = ScalingStudy::new().keys(2).trials(usize::MAX / 2).run();
    /// assert!(matches!(huge, Err(Error::TooLarge { .. })));
    /// ```
    pub fn run(&self) -> Result<ScalingReport> {
        self.validate()?;
        let mut rows = Vec::with_capacity(self.d_k.len());
        let mut samples = None;
        for &d_k in &self.d_k {
            let (row, s) = match self.components {
                Components::StandardNormal => {
                    self.run_one(d_k, |rng| rng.sample::<f64, _>(StandardNormal))?
                }
                Components::Uniform => {
                    let half_width = 3.0_f64.sqrt();
                    self.run_one(d_k, move |rng| {
                        (2.0 * rng.random::<f64>() - 1.0) * half_width
                    })?
                }
                Components::Rademacher => {
                    self.run_one(d_k, |rng| if rng.random::<bool>() { 1.0 } else { -1.0 })?
                }
            };
            rows.push(row);
            samples = Some(s);
        }
        let samples = samples.ok_or(Error::Empty { what: "d_k" })?;
        Ok(ScalingReport { rows, samples })
    }

    fn validate(&self) -> Result<()> {
        let at_least_one = |name: &'static str, value: usize| {
            if value == 0 {
                Err(Error::InvalidParameter {
                    name,
                    value: 0.0,
                    requirement: "must be >= 1",
                })
            } else {
                Ok(())
            }
        };
        if self.d_k.is_empty() {
            return Err(Error::Empty { what: "d_k" });
        }
        for &d in &self.d_k {
            at_least_one("d_k", d)?;
        }
        at_least_one("keys", self.keys)?;
        at_least_one("trials", self.trials)?;
        // The buffers of run_one, checked before any d_k runs (the allocations themselves
        // are fallible too, for sizes that fit in the address space but not in memory).
        if checked_len::<f64>(LOGITS, self.trials, self.keys)? < 2 {
            return Err(Error::InvalidParameter {
                name: "trials",
                value: self.trials as f64,
                requirement: "must make trials x keys >= 2 (ddof = 1)",
            });
        }
        for &d in &self.d_k {
            checked_len::<f64>(KEYS, self.keys, d)?;
        }
        checked_len::<f64>(PER_ROW, self.trials, 1)?;
        Ok(())
    }

    fn run_one(
        &self,
        d_k: usize,
        mut draw: impl FnMut(&mut Xoshiro256PlusPlus) -> f64,
    ) -> Result<(ScalingRow, Samples)> {
        let (m, trials) = (self.keys, self.trials);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(stream_seed(self.seed, d_k));
        // Upstream gradients come from a stream of their own, so adding them left every
        // draw of the seed's columns unchanged.
        let mut grad_rng =
            Xoshiro256PlusPlus::seed_from_u64(stream_seed(self.seed, d_k) ^ GRADIENT_STREAM);
        let sqrt_d = (d_k as f64).sqrt();
        let mut q = try_vec("the d_k query components", d_k, 1, 0.0_f64)?;
        let mut keys = try_vec(KEYS, m, d_k, 0.0_f64)?;
        let mut upstream = try_vec("the keys upstream gradients", m, 1, 0.0_f64)?;
        let mut logits = try_with_capacity(LOGITS, trials, m)?;
        let (mut grad_unscaled, mut grad_scaled) = (
            try_with_capacity(PER_ROW, trials, 1)?,
            try_with_capacity(PER_ROW, trials, 1)?,
        );
        for _ in 0..trials {
            q.iter_mut().for_each(|x| *x = draw(&mut rng));
            // This trial's keys only: the trials x m x d_k key tensor is never stored.
            for key in keys.chunks_exact_mut(d_k.max(1)).take(m) {
                key.iter_mut().for_each(|x| *x = draw(&mut rng));
                logits.push(q.iter().zip(key.iter()).map(|(a, b)| a * b).sum());
            }
            upstream
                .iter_mut()
                .for_each(|u| *u = grad_rng.sample(StandardNormal));
            let row = &logits[logits.len() - m..];
            grad_unscaled.push(query_gradient_norm(row, &keys, &upstream, 1.0));
            grad_scaled.push(query_gradient_norm(row, &keys, &upstream, 1.0 / sqrt_d));
        }
        let mut unscaled = RowSamples::of(&logits, m, 1.0)?;
        let mut scaled = RowSamples::of(&logits, m, sqrt_d)?;
        unscaled.grad_q_norm = grad_unscaled;
        scaled.grad_q_norm = grad_scaled;
        let row = ScalingRow {
            d_k,
            keys: m,
            trials,
            unscaled: unscaled.stats(sample_variance(logits.iter().copied())),
            scaled: scaled.stats(sample_variance(logits.iter().map(|&s| s / sqrt_d))),
        };
        let samples = Samples {
            d_k,
            keys: m,
            logits,
            unscaled,
            scaled,
        };
        Ok((row, samples))
    }
}

/// Names of the study's caller-sized buffers, for [`Error::TooLarge`].
const LOGITS: &str = "the trials x keys logits";
const KEYS: &str = "the keys x d_k key components of one trial";
const PER_ROW: &str = "the per-row samples (trials values each)";

/// Separates the upstream-gradient stream from the query/key stream of the same `d_k`.
const GRADIENT_STREAM: u64 = 0xD1B5_4A32_D192_ED03;

/// `‖∂L/∂q‖` for one query whose raw logits against `keys` (m x d_k, row-major) are `raw`,
/// with scores `s = scale · raw` and upstream gradient `∂L/∂p_j = upstream_j`:
/// `∂L/∂q = scale · Σ_j (∂L/∂s_j) k_j`, where `∂L/∂s` is the crate's [`softmax_vjp`].
fn query_gradient_norm(raw: &[f64], keys: &[f64], upstream: &[f64], scale: f64) -> f64 {
    let scores: Vec<f64> = raw.iter().map(|&r| scale * r).collect();
    let ds = softmax_vjp(&scores, upstream).expect("scores and upstream have length m");
    let d_k = keys.len() / raw.len().max(1);
    let mut dq = vec![0.0_f64; d_k];
    for (key, &dsj) in keys.chunks_exact(d_k.max(1)).zip(&ds) {
        dq.iter_mut().zip(key).for_each(|(g, &kt)| *g += dsj * kt);
    }
    scale * dq.iter().map(|g| g * g).sum::<f64>().sqrt()
}

/// The generator's seed for one `d_k` (`seed_from_u64` expands it with PCG32, so nearby
/// inputs give unrelated streams).
fn stream_seed(seed: u64, d_k: usize) -> u64 {
    seed.rotate_left(32) ^ (d_k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The median (mean of the middle two for an even count); NaN for no values.
fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        0.5 * (sorted[mid - 1] + sorted[mid])
    }
}

/// Unbiased sample variance (`ddof = 1`), two passes. Needs at least two values.
fn sample_variance(x: impl Iterator<Item = f64> + Clone) -> f64 {
    let (n, sum) = x.clone().fold((0usize, 0.0), |(n, s), v| (n + 1, s + v));
    let mean = sum / n as f64;
    x.map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n as f64 - 1.0)
}

/// The summary of one side (unscaled or scaled) of one `d_k`: the seed's five columns plus
/// the gradient column. Means are over the `trials` softmax rows.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::scaling::ScalingStudy;
///
/// let r = ScalingStudy::new().d_k([256]).trials(400).run()?;
/// let (u, s) = (&r.rows[0].unscaled, &r.rows[0].scaled);
/// // At d_k = 256 unscaled attention is nearly one-hot for many rows...
/// assert!(u.mean_max_prob > 0.8 && u.frac_max_over_0_9 > 0.5);
/// // ...scaled attention spreads over the 64 keys (entropy near ln 64 = 4.16).
/// assert!(s.mean_entropy > 3.5 && s.frac_max_over_0_9 == 0.0);
/// // and lets more gradient through.
/// assert!(s.mean_jacobian_fro > u.mean_jacobian_fro);
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// Sample variance (`ddof = 1`) of all `trials x m` logits.
    pub logit_var: f64,
    /// Mean over rows of `max_j p_j`, `p = softmax(row)`.
    pub mean_max_prob: f64,
    /// Mean over rows of the entropy `H(p) = −Σ p_j ln p_j`, in nats (at most `ln m`).
    pub mean_entropy: f64,
    /// Fraction of rows with `max_j p_j > 0.9`.
    pub frac_max_over_0_9: f64,
    /// Fraction of rows with `max_j p_j > 0.99`.
    pub frac_max_over_0_99: f64,
    /// Mean over rows of `‖∂p/∂s‖_F`, the Frobenius norm of the softmax Jacobian with respect
    /// to the softmax's own input (the raw or the scaled logits): see [`softmax_jacobian_fro`].
    pub mean_jacobian_fro: f64,
    /// Median over rows of `‖∂L/∂q‖` for a loss whose gradient at the weights is standard
    /// normal (random values `v_j` and a unit upstream gradient `g` give `∂L/∂p_j = v_j · g`),
    /// through the softmax and the scale: `∂L/∂q = scale · Σ_j (∂L/∂s_j) k_j`.
    pub median_grad_q_norm: f64,
    /// Mean over rows of `‖∂L/∂q‖`. Unscaled it is dominated by the rare rows whose top two
    /// logits nearly tie (their gradient carries `‖k‖ ≈ √d_k`); the median shows the typical row.
    pub mean_grad_q_norm: f64,
}

/// One row of the study's table: a `d_k`, unscaled and scaled. See [`Stats`] for an example.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScalingRow {
    /// The key/query dimension.
    pub d_k: usize,
    /// The number of keys `m` (the softmax length).
    pub keys: usize,
    /// The number of softmax rows (queries) summarised.
    pub trials: usize,
    /// Statistics of the raw logits `q · k`.
    pub unscaled: Stats,
    /// Statistics of the scaled logits `q · k / √d_k`.
    pub scaled: Stats,
}

impl ScalingRow {
    /// The row's values in the order of [`ScalingReport::COLUMNS`].
    fn values(&self) -> [f64; 18] {
        let (u, s) = (&self.unscaled, &self.scaled);
        [
            self.d_k as f64,
            self.keys as f64,
            u.logit_var,
            s.logit_var,
            u.mean_max_prob,
            s.mean_max_prob,
            u.mean_entropy,
            s.mean_entropy,
            u.frac_max_over_0_9,
            s.frac_max_over_0_9,
            u.frac_max_over_0_99,
            s.frac_max_over_0_99,
            u.mean_jacobian_fro,
            s.mean_jacobian_fro,
            u.median_grad_q_norm,
            s.median_grad_q_norm,
            u.mean_grad_q_norm,
            s.mean_grad_q_norm,
        ]
    }
}

/// Per-row values of one side (unscaled or scaled) of the last `d_k`, each of length
/// `trials`: the samples behind the means in [`Stats`] (for histograms and standard errors).
/// See [`Samples`] for an example.
#[derive(Clone, Debug, PartialEq)]
pub struct RowSamples {
    /// `max_j p_j` of each row.
    pub max_prob: Vec<f64>,
    /// `H(p)` of each row, in nats.
    pub entropy: Vec<f64>,
    /// `‖diag(p) − p pᵀ‖_F` of each row.
    pub jacobian_fro: Vec<f64>,
    /// `‖∂L/∂q‖` of each row (see [`Stats::median_grad_q_norm`]).
    pub grad_q_norm: Vec<f64>,
}

impl RowSamples {
    /// Softmax of every row of `logits / divisor` through one buffer.
    fn of(logits: &[f64], m: usize, divisor: f64) -> Result<Self> {
        let rows = logits.len() / m;
        let mut out = RowSamples {
            max_prob: try_with_capacity(PER_ROW, rows, 1)?,
            entropy: try_with_capacity(PER_ROW, rows, 1)?,
            jacobian_fro: try_with_capacity(PER_ROW, rows, 1)?,
            grad_q_norm: Vec::new(),
        };
        let mut p = try_vec("one row of keys probabilities", m, 1, 0.0_f64)?;
        for row in logits.chunks_exact(m) {
            for (pi, &s) in p.iter_mut().zip(row) {
                *pi = s / divisor;
            }
            softmax_in_place(&mut p);
            out.max_prob
                .push(p.iter().copied().fold(f64::NEG_INFINITY, f64::max));
            out.entropy.push(entropy(&p));
            out.jacobian_fro.push(softmax_jacobian_fro(&p));
        }
        Ok(out)
    }

    fn stats(&self, logit_var: f64) -> Stats {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let frac = |t: f64| {
            self.max_prob.iter().filter(|&&p| p > t).count() as f64 / self.max_prob.len() as f64
        };
        Stats {
            logit_var,
            mean_max_prob: mean(&self.max_prob),
            mean_entropy: mean(&self.entropy),
            frac_max_over_0_9: frac(0.9),
            frac_max_over_0_99: frac(0.99),
            mean_jacobian_fro: mean(&self.jacobian_fro),
            median_grad_q_norm: median(&self.grad_q_norm),
            mean_grad_q_norm: mean(&self.grad_q_norm),
        }
    }
}

/// The raw draws of the last `d_k` of a study: what the seed's four histograms plot.
///
/// The logits are stored once (`trials x m`, row-major: row `t` holds query `t`'s scores);
/// the scaled logits are derived on the fly by [`scaled_logits`](Samples::scaled_logits).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::scaling::ScalingStudy;
///
/// let r = ScalingStudy::new().d_k([4, 16]).keys(8).trials(10).run()?;
/// let s = &r.samples;
/// assert_eq!((s.d_k, s.keys), (16, 8));
/// assert_eq!(s.logits().len(), 10 * 8);
/// assert_eq!(s.logit_row(2), Some(&s.logits()[16..24]));
/// assert_eq!(s.logit_row(10), None);
/// let scaled: Vec<f64> = s.scaled_logits().collect();
/// assert_eq!(scaled[5], s.logits()[5] / 4.0);
/// assert_eq!(s.unscaled.max_prob.len(), 10);
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Samples {
    /// The `d_k` these samples belong to (the last of the study's list).
    pub d_k: usize,
    /// The number of keys `m` (the row length of the logits).
    pub keys: usize,
    logits: Vec<f64>,
    /// Per-row values of the unscaled softmax.
    pub unscaled: RowSamples,
    /// Per-row values of the scaled softmax.
    pub scaled: RowSamples,
}

impl Samples {
    /// All `trials x m` raw logits `q · k`, row-major. See [`Samples`] for an example.
    pub fn logits(&self) -> &[f64] {
        &self.logits
    }

    /// The `m` raw logits of query `t`, or `None` if `t >= trials` (or if the public `keys`
    /// field was set to 0). See [`Samples`] for an example.
    pub fn logit_row(&self, t: usize) -> Option<&[f64]> {
        if self.keys == 0 {
            return None;
        }
        self.logits.chunks_exact(self.keys).nth(t)
    }

    /// The scaled logits `q · k / √d_k`, in the order of [`logits`](Samples::logits). See
    /// [`Samples`] for an example.
    pub fn scaled_logits(&self) -> impl ExactSizeIterator<Item = f64> + Clone + '_ {
        let sqrt_d = (self.d_k as f64).sqrt();
        self.logits.iter().map(move |&s| s / sqrt_d)
    }
}

/// The result of [`ScalingStudy::run`]: one row per `d_k` and the samples of the last one.
///
/// [`to_csv`](ScalingReport::to_csv) writes the seed's CSV; `Display` prints the seed's table
/// (pandas' `to_string(index=False)` layout, values rounded to 4 decimals). See
/// [`ScalingReport::to_csv`] for an example.
#[derive(Clone, Debug, PartialEq)]
pub struct ScalingReport {
    /// One row per `d_k`, in the configured order.
    pub rows: Vec<ScalingRow>,
    /// The draws of the last `d_k`.
    pub samples: Samples,
}

impl ScalingReport {
    /// The seed's CSV header, column for column (its `rows.append({...})` keys, in order).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::scaling::ScalingReport;
    ///
    /// assert_eq!(ScalingReport::SEED_COLUMNS[3], "logit_var (/√d_k)");
    /// assert_eq!(ScalingReport::COLUMNS[..12], ScalingReport::SEED_COLUMNS);
    /// ```
    pub const SEED_COLUMNS: [&'static str; 12] = [
        "d_k",
        "keys(m)",
        "logit_var (no scale)",
        "logit_var (/√d_k)",
        "avg max prob (no scale)",
        "avg max prob (/√d_k)",
        "avg entropy (nats) (no scale)",
        "avg entropy (nats) (/√d_k)",
        "frac max>0.9 (no scale)",
        "frac max>0.9 (/√d_k)",
        "frac max>0.99 (no scale)",
        "frac max>0.99 (/√d_k)",
    ];

    /// All columns: [`SEED_COLUMNS`](Self::SEED_COLUMNS), then the mean softmax Jacobian norm,
    /// the median and the mean query-gradient norm, each unscaled and scaled. See
    /// [`ScalingReport::SEED_COLUMNS`] for an example.
    pub const COLUMNS: [&'static str; 18] = [
        "d_k",
        "keys(m)",
        "logit_var (no scale)",
        "logit_var (/√d_k)",
        "avg max prob (no scale)",
        "avg max prob (/√d_k)",
        "avg entropy (nats) (no scale)",
        "avg entropy (nats) (/√d_k)",
        "frac max>0.9 (no scale)",
        "frac max>0.9 (/√d_k)",
        "frac max>0.99 (no scale)",
        "frac max>0.99 (/√d_k)",
        "jacobian_fro (no scale)",
        "jacobian_fro (/√d_k)",
        "grad_q median (no scale)",
        "grad_q median (/√d_k)",
        "grad_q mean (no scale)",
        "grad_q mean (/√d_k)",
    ];

    /// The table as CSV, as the seed's `df.round(4).to_csv(index=False)` writes it: the
    /// header [`COLUMNS`](Self::COLUMNS), then one line per `d_k`; integers as integers, other
    /// values rounded to 4 decimals (half to even, as numpy) and printed in Python's shortest
    /// form (`0.001`, `64.126`, `0.0`).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::scaling::ScalingStudy;
    ///
    /// let csv = ScalingStudy::new().d_k([4]).trials(20).run()?.to_csv();
    /// let mut lines = csv.lines();
    /// assert!(lines.next().unwrap().starts_with(
    ///     "d_k,keys(m),logit_var (no scale),logit_var (/√d_k),avg max prob (no scale),"
    /// ));
    /// let row: Vec<&str> = lines.next().unwrap().split(',').collect();
    /// assert_eq!(row.len(), 18);
    /// assert_eq!((row[0], row[1]), ("4", "64"));
    /// assert_eq!(row[9], "0.0"); // frac max>0.9 (/√d_k): scaled rows never get that peaked
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn to_csv(&self) -> String {
        let mut out = Self::COLUMNS.join(",");
        out.push('\n');
        for row in &self.rows {
            let cells: Vec<String> = row
                .values()
                .iter()
                .enumerate()
                .map(|(c, &v)| {
                    if c < 2 {
                        format!("{}", v as usize)
                    } else {
                        python_float(round4(v))
                    }
                })
                .collect();
            out.push_str(&cells.join(","));
            out.push('\n');
        }
        out
    }
}

/// Rounds to 4 decimals as numpy's `round` does: scale, round half to even, unscale.
fn round4(x: f64) -> f64 {
    #[cfg(feature = "std")]
    let r = (x * 1e4).round_ties_even();
    #[cfg(not(feature = "std"))]
    let r = round_ties_even(x * 1e4);
    r / 1e4
}

/// `f64::round_ties_even` without std: below 2⁵² adding and subtracting 2⁵² rounds to an
/// integer, half to even (the default rounding); at or above it (and for NaN and the
/// infinities) the value is already its own rounding. The sign is kept, so -0.4 gives -0.
#[cfg(not(feature = "std"))]
fn round_ties_even(y: f64) -> f64 {
    const TWO_52: f64 = 4_503_599_627_370_496.0;
    let a = y.abs();
    if a < TWO_52 {
        ((a + TWO_52) - TWO_52).copysign(y)
    } else {
        y
    }
}

/// Python's `repr` of a float in the range the study produces: shortest round-trip digits,
/// always with a decimal point.
fn python_float(x: f64) -> String {
    let s = format!("{x}");
    if s.contains(['.', 'e', 'N', 'i']) {
        s
    } else {
        format!("{s}.0")
    }
}

impl fmt::Display for ScalingReport {
    /// pandas' `DataFrame.to_string(index=False)` of the rounded table: every column
    /// right-aligned to the wider of its header and its values, columns joined by two
    /// spaces, a sign slot before each number, and each float column printed with the fewest
    /// decimals (1 to 4) that show all its rounded values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values: Vec<[f64; 18]> = self.rows.iter().map(ScalingRow::values).collect();
        let mut columns: Vec<Vec<String>> = Vec::with_capacity(Self::COLUMNS.len());
        for (c, header) in Self::COLUMNS.iter().enumerate() {
            let cells: Vec<String> = if c < 2 {
                values
                    .iter()
                    .map(|v| format!(" {}", v[c] as usize))
                    .collect()
            } else {
                let rounded: Vec<f64> = values.iter().map(|v| round4(v[c])).collect();
                let decimals = rounded
                    .iter()
                    .map(|&x| decimals_needed(x))
                    .max()
                    .unwrap_or(1);
                rounded
                    .iter()
                    .map(|&x| {
                        let sign = if x < 0.0 { "" } else { " " };
                        format!("{sign}{x:.decimals$}")
                    })
                    .collect()
            };
            let mut column = vec![header.to_string()];
            column.extend(cells);
            columns.push(column);
        }
        let widths: Vec<usize> = columns
            .iter()
            .map(|col| col.iter().map(|s| s.chars().count()).max().unwrap_or(0))
            .collect();
        for line in 0..=self.rows.len() {
            let cells: Vec<String> = columns
                .iter()
                .zip(&widths)
                .map(|(col, &w)| format!("{:>w$}", col[line]))
                .collect();
            writeln!(f, "{}", cells.join("  "))?;
        }
        Ok(())
    }
}

/// The fewest decimals (1 to 4) that print `x` (already rounded to 4 decimals) exactly.
fn decimals_needed(x: f64) -> usize {
    (1..4)
        .find(|&d| {
            let scale = 10f64.powi(d as i32);
            ((x * scale).round() / scale - x).abs() <= 1e-9 * x.abs().max(1.0)
        })
        .unwrap_or(4)
}

/// Frobenius norm of the softmax Jacobian at a probability vector `p`:
///
/// ```text
/// J = ∂p/∂s = diag(p) − p pᵀ          (m x m, where p = softmax(s))
/// ‖J‖_F² = Σ_i p_i² − 2 Σ_i p_i³ + (Σ_i p_i²)²
/// ```
///
/// This is `softmax_jacobian(s).norm()` (see [the gradients guide](crate::guide::gradients)) without forming the m x m
/// matrix. The backward pass of a softmax maps an upstream gradient `g` to `Jᵀ g`, so `‖J‖_F`
/// measures how much gradient survives the softmax: about `1/√m` for a uniform `p`, at most
/// 1/2 (two outcomes at 1/2 each) and 0 for a one-hot `p`.
///
/// The closed form above cancels catastrophically for a nearly one-hot `p` (its three terms
/// are each close to 1 while the result is tiny), so this evaluates the same sum grouped
/// around the largest entry `p_k`, with `1 − p_k` taken as `Σ_{j≠k} p_j`: accurate to a few
/// ulps of the result even when `1 − p_k` is far below machine epsilon. `p` must therefore be
/// a softmax output (summing to 1), or all zeros (a fully masked row; the result is 0). An
/// empty `p` gives 0 and a NaN entry gives NaN.
///
/// # Examples
///
/// ```
/// use attention_math::{sheet::scaling::softmax_jacobian_fro, softmax};
///
/// // Two outcomes at 1/2: J = [[1/4, -1/4], [-1/4, 1/4]], ‖J‖_F = 1/2.
/// assert!((softmax_jacobian_fro(&[0.5_f64, 0.5]) - 0.5).abs() < 1e-15);
/// // Uniform over m: ‖J‖_F = √(m − 1) / m.
/// let m = 64.0_f64;
/// let p = vec![1.0 / m; 64];
/// assert!((softmax_jacobian_fro(&p) - (m - 1.0).sqrt() / m).abs() < 1e-15);
/// // Nearly one-hot: for two outcomes ‖J‖_F = 2 p_0 p_1, accurate far below epsilon.
/// let p = softmax(&[0.0_f64, -50.0]);
/// let exact = 2.0 * p[0] * p[1];
/// assert!((softmax_jacobian_fro(&p) / exact - 1.0).abs() < 1e-14);
/// assert_eq!(softmax_jacobian_fro(&[1.0_f32, 0.0, 0.0]), 0.0);
/// ```
pub fn softmax_jacobian_fro<T: Float>(p: &[T]) -> T {
    if p.iter().any(|x| x.is_nan_value()) {
        return T::NAN;
    }
    let Some(k) = (0..p.len()).reduce(|a, b| if p[b] > p[a] { b } else { a }) else {
        return T::zero();
    };
    let pk = p[k];
    let pk2 = pk * pk;
    let (mut rest, mut rest2) = (T::zero(), T::zero()); // Σ_{j≠k} p_j, Σ_{j≠k} p_j²
    for (j, &pj) in p.iter().enumerate() {
        if j != k {
            rest += pj;
            rest2 += pj * pj;
        }
    }
    // Row k: diagonal (p_k (1 − p_k))², off-diagonal Σ_{j≠k} p_k² p_j².
    let mut sum = pk2 * rest * rest + pk2 * rest2;
    // Rows i ≠ k: diagonal (p_i (1 − p_i))² (p_i <= 1/2, no cancellation), off-diagonal
    // p_i² Σ_{j≠i} p_j² = p_i² (p_k² + Σ_{j≠i,k} p_j²).
    for (i, &pi) in p.iter().enumerate() {
        if i != k {
            let pi2 = pi * pi;
            let others = (rest2 - pi2).max(T::zero());
            sum += pi2 * (T::one() - pi) * (T::one() - pi) + pi2 * (pk2 + others);
        }
    }
    sum.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad::softmax_jacobian;
    use crate::softmax::softmax;

    #[test]
    fn jacobian_matches_explicit_matrix_and_closed_form() {
        for logits in [
            vec![0.3, -1.2, 2.0, 0.0],
            vec![1.0; 7],
            vec![5.0, -3.0],
            vec![0.0],
            (0..64)
                .map(|i| ((i * 37 % 11) as f64).sin() * 3.0)
                .collect(),
        ] {
            let p = softmax(&logits);
            let explicit = softmax_jacobian(&logits).norm();
            let s2: f64 = p.iter().map(|x| x * x).sum();
            let s3: f64 = p.iter().map(|x| x * x * x).sum();
            let closed = (s2 - 2.0 * s3 + s2 * s2).max(0.0).sqrt();
            let ours = softmax_jacobian_fro(&p);
            assert!((ours - explicit).abs() <= 1e-14, "{ours} vs {explicit}");
            assert!((closed - explicit).abs() <= 1e-7, "{closed} vs {explicit}");
            let p32: Vec<f32> = p.iter().map(|&x| x as f32).collect();
            assert!((softmax_jacobian_fro(&p32) as f64 - explicit).abs() < 1e-6);
        }
    }

    #[test]
    fn jacobian_stays_accurate_where_the_closed_form_cancels() {
        // s = (0, ln a, ln a): p = (1, a, a) / (1 + 2a). Entry by entry, without cancellation:
        // J00 = p0 (1 − p0) = 2 p0 p1, J01 = J02 = −p0 p1, J11 = J22 = p1 (p0 + p1), J12 = −p1².
        for a in [1e-3_f64, 1e-9, 1e-13, 1e-30] {
            let p = softmax(&[0.0, a.ln(), a.ln()]);
            let (p0, p1) = (p[0], p[1]);
            let exact = ((2.0 * p0 * p1).powi(2)
                + 4.0 * (p0 * p1).powi(2)
                + 2.0 * (p1 * (p0 + p1)).powi(2)
                + 2.0 * p1.powi(4))
            .sqrt();
            let ours = softmax_jacobian_fro(&p);
            assert!(
                (ours / exact - 1.0).abs() < 1e-14,
                "a = {a}: {ours} vs {exact}"
            );
            if a <= 1e-9 {
                // Σp² − 2Σp³ + (Σp²)² loses everything here.
                let s2: f64 = p.iter().map(|x| x * x).sum();
                let s3: f64 = p.iter().map(|x| x * x * x).sum();
                let naive = (s2 - 2.0 * s3 + s2 * s2).max(0.0).sqrt();
                assert!(
                    (naive / exact - 1.0).abs() > 0.5,
                    "a = {a}: {naive} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn jacobian_edge_cases() {
        assert_eq!(softmax_jacobian_fro::<f64>(&[]), 0.0);
        assert_eq!(softmax_jacobian_fro(&[0.0_f64; 4]), 0.0);
        assert!(softmax_jacobian_fro(&[0.5, f64::NAN]).is_nan());
        assert_eq!(softmax_jacobian_fro(&[1.0_f64]), 0.0);
    }

    #[test]
    fn columns_extend_the_seeds() {
        assert_eq!(ScalingReport::COLUMNS[..12], ScalingReport::SEED_COLUMNS);
        assert_eq!(
            ScalingReport::SEED_COLUMNS.join(","),
            "d_k,keys(m),logit_var (no scale),logit_var (/√d_k),avg max prob (no scale),\
             avg max prob (/√d_k),avg entropy (nats) (no scale),avg entropy (nats) (/√d_k),\
             frac max>0.9 (no scale),frac max>0.9 (/√d_k),frac max>0.99 (no scale),\
             frac max>0.99 (/√d_k)"
        );
    }

    /// Before, sizes that overflowed or could not be allocated panicked with "capacity
    /// overflow" (or wrapped, for keys x d_k).
    #[test]
    fn absurd_sizes_are_errors_not_panics() {
        let too_large = |r: Result<ScalingReport>| match r {
            Err(Error::TooLarge { what, .. }) => what,
            other => panic!("expected TooLarge, got {other:?}"),
        };
        let s = ScalingStudy::new();
        assert_eq!(
            too_large(s.clone().trials(usize::MAX / 2).keys(2).run()),
            LOGITS
        );
        assert_eq!(
            too_large(s.clone().trials(usize::MAX / 2).keys(1).run()),
            LOGITS
        );
        assert_eq!(too_large(s.clone().trials(usize::MAX / 2).run()), LOGITS);
        assert_eq!(
            too_large(s.clone().keys(usize::MAX / 2).trials(1).run()),
            LOGITS
        );
        assert_eq!(
            too_large(s.clone().keys(1 << 32).d_k([1 << 32]).trials(1).run()),
            KEYS
        );
        // Checked for the whole list before the first d_k runs.
        assert_eq!(
            too_large(s.clone().d_k([4, usize::MAX]).trials(2).run()),
            KEYS
        );
        // Fits in isize::MAX bytes (2^47 of them) but no allocator grants it: an Err too.
        assert_eq!(
            too_large(s.clone().keys(1 << 44).d_k([1]).trials(1).run()),
            KEYS
        );
    }

    #[test]
    fn samples_with_zero_keys_do_not_panic() {
        let mut r = ScalingStudy::new()
            .d_k([2])
            .keys(3)
            .trials(4)
            .run()
            .unwrap();
        assert_eq!(r.samples.logit_row(1).map(<[f64]>::len), Some(3));
        r.samples.keys = 0;
        assert_eq!(r.samples.logit_row(0), None);
    }

    #[test]
    fn sample_variance_is_ddof_1() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert!((sample_variance(v.iter().copied()) - 5.0 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn rounding_and_python_repr_match_pandas() {
        assert_eq!(python_float(round4(64.12604)), "64.126");
        assert_eq!(python_float(round4(0.001)), "0.001");
        assert_eq!(python_float(round4(0.0)), "0.0");
        assert_eq!(python_float(round4(255.30274)), "255.3027");
        assert_eq!(python_float(round4(1.0)), "1.0");
        assert_eq!(python_float(round4(0.00004)), "0.0");
        // numpy rounds halves to even after scaling: 0.00125 * 1e4 = 12.5 -> 12.
        assert_eq!(round4(0.00125), 0.0012);
        assert_eq!(decimals_needed(0.21), 2);
        assert_eq!(decimals_needed(0.0), 1);
        assert_eq!(decimals_needed(64.126), 3);
        assert_eq!(decimals_needed(0.4545), 4);
    }

    /// The study's `‖∂L/∂q‖` is the attention backward pass for one query whose upstream
    /// gradient at the weights is `u_j = v_j · dO`.
    #[test]
    fn query_gradient_is_the_attention_backward() {
        use crate::{AttentionOptions, Mask, attention_backward_reference};
        use nalgebra::DMatrix;
        let (m, d, dv) = (5, 3, 2);
        let q = DMatrix::<f64>::from_fn(1, d, |_, t| (t as f64 * 1.3 - 0.4).sin() * 2.0);
        let k = DMatrix::<f64>::from_fn(m, d, |j, t| ((j * d + t) as f64 * 0.7).cos() * 2.0);
        let v = DMatrix::<f64>::from_fn(m, dv, |j, c| ((j + 3 * c) as f64 * 0.9).sin());
        let d_out = DMatrix::<f64>::from_row_slice(1, dv, &[0.6, -0.8]);
        let raw: Vec<f64> = (0..m).map(|j| q.row(0).dot(&k.row(j))).collect();
        let keys: Vec<f64> = (0..m)
            .flat_map(|j| k.row(j).iter().copied().collect::<Vec<_>>())
            .collect();
        let upstream: Vec<f64> = (0..m).map(|j| v.row(j).dot(&d_out.row(0))).collect();
        for scale in [1.0, 1.0 / (d as f64).sqrt()] {
            let opts = AttentionOptions::new().scale(scale);
            let grads =
                attention_backward_reference(&q, &k, &v, &Mask::none(), &opts, &d_out).unwrap();
            let ours = query_gradient_norm(&raw, &keys, &upstream, scale);
            assert!(
                (ours - grads.dq.norm()).abs() < 1e-12,
                "{ours} vs {}",
                grads.dq.norm()
            );
        }
    }

    #[test]
    fn table_layout_matches_the_seeds_pandas_output() {
        // The seed's own printed numbers, put through our formatter.
        let stats = |v: f64, mp: f64, h: f64, f9: f64, f99: f64| Stats {
            logit_var: v,
            mean_max_prob: mp,
            mean_entropy: h,
            frac_max_over_0_9: f9,
            frac_max_over_0_99: f99,
            mean_jacobian_fro: 0.25,
            median_grad_q_norm: 0.125,
            mean_grad_q_norm: 0.5,
        };
        let row = |d_k, u, s| ScalingRow {
            d_k,
            keys: 64,
            trials: 2000,
            unscaled: u,
            scaled: s,
        };
        let rows = vec![
            row(
                4,
                stats(4.0476, 0.2784, 2.7958, 0.0095, 0.0010),
                stats(1.0119, 0.1067, 3.6947, 0.0, 0.0),
            ),
            row(
                64,
                stats(64.1260, 0.7979, 0.5688, 0.4480, 0.2100),
                stats(1.0020, 0.1090, 3.6823, 0.0, 0.0),
            ),
            row(
                256,
                stats(255.3027, 0.8934, 0.2759, 0.6885, 0.4545),
                stats(0.9973, 0.1069, 3.6870, 0.0, 0.0),
            ),
        ];
        let samples = ScalingStudy::new()
            .d_k([1])
            .keys(2)
            .trials(1)
            .run()
            .unwrap()
            .samples;
        let report = ScalingReport { rows, samples };
        let table = report.to_string();
        // pandas 3.1 / numpy 2.4 running the seed's script print exactly these lines
        // (the first 12 columns; ours adds the gradient columns at the end).
        let expected = [
            " d_k  keys(m)  logit_var (no scale)  logit_var (/√d_k)  avg max prob (no scale)  avg max prob (/√d_k)  avg entropy (nats) (no scale)  avg entropy (nats) (/√d_k)  frac max>0.9 (no scale)  frac max>0.9 (/√d_k)  frac max>0.99 (no scale)  frac max>0.99 (/√d_k)",
            "   4       64                4.0476             1.0119                   0.2784                0.1067                         2.7958                      3.6947                   0.0095                   0.0                    0.0010                    0.0",
            "  64       64               64.1260             1.0020                   0.7979                0.1090                         0.5688                      3.6823                   0.4480                   0.0                    0.2100                    0.0",
            " 256       64              255.3027             0.9973                   0.8934                0.1069                         0.2759                      3.6870                   0.6885                   0.0                    0.4545                    0.0",
        ];
        for (line, want) in table.lines().zip(expected) {
            assert!(line.starts_with(want), "\n{line}\n{want}");
        }
        assert_eq!(table.lines().count(), 4);
        let csv = report.to_csv();
        assert_eq!(
            csv.lines().nth(2).unwrap(),
            "64,64,64.126,1.002,0.7979,0.109,0.5688,3.6823,0.448,0.0,0.21,0.0,0.25,0.25,0.125,0.125,0.5,0.5"
        );
    }

    #[test]
    fn rows_do_not_depend_on_the_rest_of_the_list() {
        let a = ScalingStudy::new()
            .d_k([8, 32])
            .keys(5)
            .trials(30)
            .run()
            .unwrap();
        let b = ScalingStudy::new()
            .d_k([32])
            .keys(5)
            .trials(30)
            .run()
            .unwrap();
        assert_eq!(a.rows[1], b.rows[0]);
        assert_eq!(a.samples, b.samples);
        let c = ScalingStudy::new()
            .d_k([32])
            .keys(5)
            .trials(30)
            .seed(43)
            .run()
            .unwrap();
        assert_ne!(b.rows[0], c.rows[0]);
    }

    #[test]
    fn stats_agree_with_the_samples() {
        let r = ScalingStudy::new()
            .d_k([16])
            .keys(10)
            .trials(40)
            .run()
            .unwrap();
        let (row, s) = (&r.rows[0], &r.samples);
        // Recompute the unscaled side from the raw logits with the crate's public functions.
        let mut maxp = 0.0;
        let mut h = 0.0;
        for t in 0..40 {
            let p = softmax(s.logit_row(t).unwrap());
            maxp += p.iter().copied().fold(0.0, f64::max);
            h += crate::entropy(&p);
        }
        assert!((row.unscaled.mean_max_prob - maxp / 40.0).abs() < 1e-12);
        assert!((row.unscaled.mean_entropy - h / 40.0).abs() < 1e-12);
        let scaled: Vec<f64> = s.scaled_logits().collect();
        let mean = scaled.iter().sum::<f64>() / 400.0;
        let var = scaled.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 399.0;
        assert!((row.scaled.logit_var - var).abs() < 1e-12);
        assert!((row.unscaled.logit_var / 16.0 - var).abs() < 1e-12);
    }
}
