//! Self-attention vs a recurrent network (seed question 1): how much gradient reaches the first
//! token from the last position, through one layer of each.
//!
//! Rows are tokens: `X` is n x d_in, row `x_t` is token t. The two layers, both of width d:
//!
//! ```text
//! causal attention   Y = softmax(causal(Q Kᵀ / √d)) V,   Q = X W_q, K = X W_k, V = X W_v
//!                    (W_q, W_k, W_v: d_in x d; y_t is row t of Y)
//! tanh RNN           h_t = tanh(W h_{t−1} + U x_t),       h_{−1} = 0
//!                    (W: d x d, U: d x d_in; column vectors, as in Elman 1990)
//! ```
//!
//! The quantity compared is the Jacobian of the last position's output with respect to the
//! first position's input, `J(n) = ∂y_{n−1}/∂x_0` (attention) or `∂h_{n−1}/∂x_0` (RNN), a
//! d x d_in matrix, through two norms:
//!
//! ```text
//! G_u(n) = ‖uᵀ J(n)‖₂          for a fixed unit vector u ∈ ℝ^d   (one backward pass, dO = e_{n−1} uᵀ)
//! G_F(n) = ‖J(n)‖_F / √d       = √(E_u ‖uᵀ J(n)‖²) over u uniform on the unit sphere
//! ```
//!
//! **RNN.** By the chain rule (Bengio et al. 1994; Pascanu et al. 2013, §2, eq. 5; the bound
//! is their §3.1),
//!
//! ```text
//! J(n) = D_{n−1} W D_{n−2} W ⋯ W D_0 U,     D_t = diag(1 − h_t²) = diag(sech²(z_t)),   z_t = W h_{t−1} + U x_t
//! ‖J(n)‖₂ <= ‖U‖₂ ‖W‖₂^{n−1} Π_t max_i sech²(z_{t,i})
//! ```
//!
//! a product of n factors: with an orthogonal W (every singular value 1, the best case for the
//! linear part) the gradient still shrinks by the factors `sech² < 1` at every step, so it
//! decays exponentially in n unless the pre-activations stay at 0. [`TanhRnn::last_state_vjp`]
//! and [`TanhRnn::last_state_jacobian`] compute it by backpropagation through time, rescaling
//! the running cotangent at every step and keeping the scale as a logarithm
//! ([`LogScaled`]), so a gradient of 10^(−1000) is reported exactly instead of as 0.
//!
//! **Attention.** For n >= 2, `x_0` enters `y_{n−1} = Σ_j P_j v_j` only as key 0 and value 0
//! (`P_j` the last query's weights, `s_j = q_{n−1} · k_j / √d`), so
//!
//! ```text
//! J(n) = P_0 W_vᵀ + P_0 (v_0 − y_{n−1})ᵀ (q_{n−1} W_kᵀ) / √d
//! ```
//!
//! one step whatever n (the path length O(1) of the sheet), but proportional to the weight
//! `P_0`: for diffuse attention `P_0 ≈ 1/n`, so `G(n)` falls like 1/n, polynomially rather than
//! exponentially. [`CausalAttention::last_output_vjp`] computes it with the crate's
//! [`attention_backward`].
//!
//! [`PathStudy`] measures both norms for growing n with fixed seeds; `docs/attention-vs-rnn.md`
//! and `cargo run --release --example attention_vs_rnn` set the numbers (and wall times) beside
//! the sheet's table.

use crate::Float;
use crate::error::{Axis, Error, Result, check_finite, checked_len, try_matrix, try_with_capacity};
use crate::prelude::*;
use crate::{AttentionOptions, Mask, attention_backward, scaled_attention, scaled_attention_with};
use nalgebra::{DMatrix, DMatrixView};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

/// A matrix held as `exp(ln_scale) · mantissa`, so that its size may lie far outside the
/// float's range (a gradient of 10^(−1000) through a long recurrence). The mantissa has
/// Frobenius norm 1, or is zero with `ln_scale = −∞`.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::rnn::TanhRnn;
/// use nalgebra::DMatrix;
///
/// // h_t = tanh(0.5 h_{t−1} + x_t) at x = 0: ∂h_{n−1}/∂x_0 = 0.5^(n−1), below f64 at n = 2000.
/// let rnn = TanhRnn::new(DMatrix::from_element(1, 1, 0.5_f64), DMatrix::identity(1, 1))?;
/// let g = rnn.last_state_jacobian(&DMatrix::zeros(2000, 1))?;
/// assert_eq!(g.value()[(0, 0)], 0.0); // underflows
/// assert!((g.log10_norm() - 1999.0 * 0.5_f64.log10()).abs() < 1e-9); // -601.76...
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LogScaled<T: Float> {
    mantissa: DMatrix<T>,
    ln_scale: f64,
}

impl<T: Float> LogScaled<T> {
    /// `exp(ln_scale) · m`, rescaled so that the mantissa has norm 1.
    fn new(mut m: DMatrix<T>, ln_scale: f64) -> Self {
        let (big, ratio) = frobenius(&m);
        if big == 0.0 || ln_scale == f64::NEG_INFINITY {
            m.fill(T::zero());
            return Self {
                mantissa: m,
                ln_scale: f64::NEG_INFINITY,
            };
        }
        // In two steps: big is an entry of m (in T's range), ratio <= √(entries).
        m /= T::of_f64(big);
        m /= T::of_f64(ratio);
        Self {
            mantissa: m,
            ln_scale: ln_scale + big.ln() + ratio.ln(),
        }
    }

    /// The mantissa: Frobenius norm 1 (to rounding), or zero. See [`LogScaled`].
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::rnn::TanhRnn;
    /// use nalgebra::DMatrix;
    ///
    /// let rnn = TanhRnn::new(DMatrix::from_element(1, 1, 0.5_f64), DMatrix::identity(1, 1))?;
    /// let g = rnn.last_state_jacobian(&DMatrix::zeros(3, 1))?;
    /// assert_eq!(g.mantissa()[(0, 0)], 1.0);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn mantissa(&self) -> &DMatrix<T> {
        &self.mantissa
    }

    /// The natural logarithm of the Frobenius norm (`−∞` for zero).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::rnn::TanhRnn;
    /// use nalgebra::DMatrix;
    ///
    /// let rnn = TanhRnn::new(DMatrix::from_element(1, 1, 0.5_f64), DMatrix::identity(1, 1))?;
    /// let g = rnn.last_state_jacobian(&DMatrix::zeros(3, 1))?; // 0.25
    /// assert!((g.ln_norm() - 0.25_f64.ln()).abs() < 1e-15);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn ln_norm(&self) -> f64 {
        self.ln_scale
    }

    /// The base-10 logarithm of the Frobenius norm (`−∞` for zero). See [`LogScaled`] for an
    /// example.
    pub fn log10_norm(&self) -> f64 {
        self.ln_scale / core::f64::consts::LN_10
    }

    /// The matrix itself, `exp(ln_scale) · mantissa`; entries below the float's range
    /// underflow to 0. See [`LogScaled`] for an example.
    pub fn value(&self) -> DMatrix<T> {
        let scale = self.ln_scale.exp();
        self.mantissa.map(|m| {
            let m = m.as_f64();
            if scale.is_normal() {
                T::of_f64(m * scale)
            } else {
                // The scale alone is out of range; the product may not be.
                T::of_f64(m.signum() * (m.abs().ln() + self.ln_scale).exp())
            }
        })
    }
}

/// The Frobenius norm as `big · ratio`, `big` the largest magnitude (0 for a zero matrix),
/// so that neither tiny nor huge entries lose it.
fn frobenius<T: Float>(m: &DMatrix<T>) -> (f64, f64) {
    let big = m.iter().fold(0.0_f64, |a, x| a.max(x.as_f64().abs()));
    if big == 0.0 || !big.is_finite() {
        return (big, 1.0);
    }
    let ratio = m
        .iter()
        .map(|x| x.as_f64() / big)
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt();
    (big, ratio)
}

/// `1 − tanh²(z) = sech²(z) = 4e / (1 + e)²` with `e = exp(−2|z|)`: no overflow, and accurate
/// where `tanh(z)` rounds to ±1 (`1 − h²` would be 0 there).
fn sech2<T: Float>(z: T) -> T {
    let e = (-(z.abs() + z.abs())).exp();
    let four = T::of_f64(4.0);
    four * e / ((T::one() + e) * (T::one() + e))
}

/// The Glorot (Xavier) uniform distribution for a `fan_out x fan_in` weight:
/// `U(−a, a)` with `a = √(6 / (fan_in + fan_out))`, variance `2 / (fan_in + fan_out)`.
fn glorot(rng: &mut Xoshiro256PlusPlus, rows: usize, cols: usize) -> Result<DMatrix<f64>> {
    let a = (6.0 / (rows as f64 + cols as f64)).sqrt();
    try_matrix("a Glorot-initialised weight", rows, cols, |_, _| {
        (2.0 * rng.random::<f64>() - 1.0) * a
    })
}

/// Checks that `m` is `rows x cols` (naming `arg`), non-empty and finite.
fn check_weight<T: Float>(arg: &'static str, m: &DMatrix<T>, shape: (usize, usize)) -> Result<()> {
    if m.shape() != shape {
        return Err(Error::ShapeMismatch {
            arg,
            found: m.shape(),
            expected: shape,
        });
    }
    if m.is_empty() {
        return Err(Error::Empty { what: arg });
    }
    check_finite(arg, &m.as_view())
}

/// Checks the inputs `x` (n x d_in, finite): d_in is `other`'s size along `other_axis`.
fn check_input<T: Float>(
    x: &DMatrixView<'_, T>,
    d_in: usize,
    other: &'static str,
    other_axis: Axis,
) -> Result<()> {
    if x.ncols() != d_in {
        return Err(Error::DimensionMismatch {
            arg: "x",
            axis: Axis::Cols,
            found: x.ncols(),
            other,
            other_axis,
            expected: d_in,
        });
    }
    check_finite("x", x)
}

/// Checks a direction `u` (length d, finite) and returns it as a d x 1 matrix.
fn direction_column<T: Float>(u: &[T], d: usize) -> Result<DMatrix<T>> {
    if u.len() != d {
        return Err(Error::LengthMismatch {
            arg: "direction",
            found: u.len(),
            expected: d,
        });
    }
    if let Some(i) = u.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            arg: "direction",
            row: 0,
            col: i,
        });
    }
    Ok(DMatrix::from_column_slice(d, 1, u))
}

/// An Elman network with tanh units and no bias, `h_t = tanh(W h_{t−1} + U x_t)`, `h_{−1} = 0`;
/// the recurrent side of seed question 1. `W` is d x d, `U` is d x d_in.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::rnn::TanhRnn;
/// use nalgebra::{dmatrix, DMatrix};
///
/// let rnn = TanhRnn::new(dmatrix![0.0_f64, 1.0; 1.0, 0.0], DMatrix::identity(2, 2))?;
/// let h = rnn.forward(&dmatrix![1.0, 0.0; 0.0, 0.0])?; // two tokens
/// assert_eq!(h[(0, 0)], 1.0_f64.tanh());
/// assert_eq!(h[(1, 1)], h[(0, 0)].tanh()); // W swaps the two units
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct TanhRnn<T: Float> {
    w: DMatrix<T>,
    u: DMatrix<T>,
}

impl<T: Float> TanhRnn<T> {
    /// A network with recurrent weights `w` (d x d) and input weights `u` (d x d_in).
    ///
    /// # Errors
    ///
    /// - [`Error::ShapeMismatch`] naming `w` unless it is square, or `u` unless it has d rows;
    /// - [`Error::Empty`] naming `w` or `u` if d or d_in is 0;
    /// - [`Error::NonFinite`] naming `w` or `u` for a NaN or infinite weight.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::rnn::TanhRnn;
    /// use nalgebra::DMatrix;
    ///
    /// assert!(TanhRnn::new(DMatrix::<f32>::zeros(3, 3), DMatrix::zeros(3, 5)).is_ok());
    /// assert!(TanhRnn::new(DMatrix::<f32>::zeros(3, 2), DMatrix::zeros(3, 5)).is_err());
    /// assert!(TanhRnn::new(DMatrix::<f32>::zeros(3, 3), DMatrix::zeros(2, 5)).is_err());
    /// ```
    pub fn new(w: DMatrix<T>, u: DMatrix<T>) -> Result<Self> {
        let d = w.nrows();
        check_weight("w", &w, (d, d))?;
        check_weight("u", &u, (d, u.ncols()))?;
        Ok(Self { w, u })
    }

    /// The usual initialisation of a tanh RNN, that of Keras' `SimpleRNN`: `W` a random
    /// orthogonal matrix (every singular value and every eigenvalue's modulus 1, so its
    /// spectral radius is exactly 1; Saxe et al. 2014), drawn as the Q factor of a standard
    /// normal matrix's QR decomposition with the signs of R's diagonal moved into Q
    /// (Mezzadri 2007), and `U` Glorot uniform, `U(−a, a)` with `a = √(6 / (d + d_in))`
    /// (Glorot & Bengio 2010, eq. 16). Drawn in f64 from a seeded Xoshiro256++ stream, then
    /// rounded to `T`, so the f32 and f64 networks of one seed agree.
    ///
    /// # Errors
    ///
    /// - [`Error::Empty`] naming `w` or `u` if `width` or `input_width` is 0;
    /// - [`Error::TooLarge`] if the weights cannot be allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::rnn::TanhRnn;
    /// use nalgebra::DMatrix;
    ///
    /// let rnn = TanhRnn::<f64>::orthogonal_glorot(16, 8, 7)?;
    /// let w = rnn.w();
    /// assert!((w.transpose() * w - DMatrix::identity(16, 16)).amax() < 1e-12);
    /// assert!(rnn.u().amax() <= (6.0_f64 / 24.0).sqrt());
    /// assert_eq!(rnn, TanhRnn::orthogonal_glorot(16, 8, 7)?); // reproducible
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn orthogonal_glorot(width: usize, input_width: usize, seed: u64) -> Result<Self> {
        if width == 0 {
            return Err(Error::Empty { what: "w" });
        }
        if input_width == 0 {
            return Err(Error::Empty { what: "u" });
        }
        checked_len::<f64>("the width x width recurrent weights", width, width)?;
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let g = try_matrix(
            "the width x width recurrent weights",
            width,
            width,
            |_, _| rng.sample::<f64, _>(StandardNormal),
        )?;
        let qr = g.qr();
        let (mut q, r) = (qr.q(), qr.r());
        for j in 0..width {
            if r[(j, j)] < 0.0 {
                q.column_mut(j).neg_mut();
            }
        }
        let u = glorot(&mut rng, width, input_width)?;
        Self::new(q.map(T::of_f64), u.map(T::of_f64))
    }

    /// The recurrent weights W, d x d.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::rnn::TanhRnn;
    /// assert_eq!(TanhRnn::<f32>::orthogonal_glorot(4, 3, 0)?.w().shape(), (4, 4));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn w(&self) -> &DMatrix<T> {
        &self.w
    }

    /// The input weights U, d x d_in.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::rnn::TanhRnn;
    /// assert_eq!(TanhRnn::<f32>::orthogonal_glorot(4, 3, 0)?.u().shape(), (4, 3));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn u(&self) -> &DMatrix<T> {
        &self.u
    }

    /// The pre-activations `z_t` and states `h_t`, both d x n (column t is step t).
    fn states(&self, x: &DMatrixView<'_, T>) -> Result<(DMatrix<T>, DMatrix<T>)> {
        check_input(x, self.u.ncols(), "u", Axis::Cols)?;
        let (d, n) = (self.w.nrows(), x.nrows());
        let mut z = try_matrix("the width x n pre-activations", d, n, |_, _| T::zero())?;
        let mut h = try_matrix("the width x n states", d, n, |_, _| T::zero())?;
        // The input projections of all steps at once (a matrix product: parallelisable).
        z.gemm(T::one(), &self.u, &x.transpose(), T::zero());
        // The recurrence: step t needs step t − 1.
        for t in 0..n {
            if t > 0 {
                z.column_mut(t)
                    .gemv(T::one(), &self.w, &h.column(t - 1), T::one());
            }
            for i in 0..d {
                h[(i, t)] = z[(i, t)].tanh();
            }
        }
        Ok((z, h))
    }

    /// Runs the network over `x` (n x d_in, one row per token) from `h_{−1} = 0` and returns
    /// the states `H` (n x d, row t is `h_t`). Cost: one n x d_in x d matrix product for the
    /// inputs, then n dependent steps of a d x d matrix-vector product and d tanh.
    ///
    /// # Errors
    ///
    /// - [`Error::DimensionMismatch`] if `x` does not have d_in columns;
    /// - [`Error::NonFinite`] naming `x` for a NaN or infinite input;
    /// - [`Error::TooLarge`] if the n x d states cannot be allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::rnn::TanhRnn;
    /// use nalgebra::DMatrix;
    ///
    /// let rnn = TanhRnn::<f64>::orthogonal_glorot(8, 4, 1)?;
    /// let x = DMatrix::from_fn(10, 4, |i, j| ((i * 4 + j) as f64).sin());
    /// let h = rnn.forward(&x)?;
    /// assert_eq!(h.shape(), (10, 8));
    /// // The first state depends on the first token only: h_0 = tanh(U x_0).
    /// let h0 = (rnn.u() * x.row(0).transpose()).map(f64::tanh);
    /// assert!((h.row(0).transpose() - h0).amax() < 1e-15);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn forward<'a>(&self, x: impl Into<DMatrixView<'a, T>>) -> Result<DMatrix<T>> {
        let (_, h) = self.states(&x.into())?;
        Ok(h.transpose())
    }

    /// Backpropagation through time from the last state to the first input: with the
    /// cotangent `g` (d x c) on `h_{n−1}`, returns `gᵀ J(n)` (c x d_in), the running
    /// cotangent rescaled to norm 1 at each step and its scale kept as a logarithm.
    fn backprop_to_first_input(
        &self,
        x: &DMatrixView<'_, T>,
        g: DMatrix<T>,
    ) -> Result<LogScaled<T>> {
        let (z, _) = self.states(x)?;
        let n = z.ncols();
        if n == 0 {
            return Err(Error::Empty { what: "x" });
        }
        let mut g = LogScaled::new(g, 0.0);
        for t in (0..n).rev() {
            if g.ln_scale == f64::NEG_INFINITY {
                break;
            }
            // Through the tanh: the cotangent on z_t is D_t g.
            let mut a = g.mantissa;
            for (i, mut row) in a.row_iter_mut().enumerate() {
                row *= sech2(z[(i, t)]);
            }
            if t == 0 {
                // Through z_0 = U x_0 (+ W h_{−1} = 0): the cotangent on x_0 is Uᵀ a.
                return Ok(LogScaled::new(a.transpose() * &self.u, g.ln_scale));
            }
            // Through z_t = W h_{t−1} + U x_t: the cotangent on h_{t−1} is Wᵀ a.
            g = LogScaled::new(self.w.tr_mul(&a), g.ln_scale);
        }
        Ok(LogScaled::new(
            DMatrix::zeros(g.mantissa.ncols(), self.u.ncols()),
            f64::NEG_INFINITY,
        ))
    }

    /// The gradient of `direction · h_{n−1}` with respect to the first input `x_0`,
    /// `uᵀ ∂h_{n−1}/∂x_0` (1 x d_in), by backpropagation through time:
    ///
    /// ```text
    /// g ← u;   for t = n−1 down to 1:  g ← Wᵀ (sech²(z_t) ⊙ g);   result = (Uᵀ (sech²(z_0) ⊙ g))ᵀ
    /// ```
    ///
    /// with `sech²(z) = 1 − tanh²(z)` evaluated from `z` (accurate where `tanh` rounds to ±1).
    /// The running cotangent is rescaled to norm 1 at each step and the scale kept as a
    /// logarithm, so the result is exact to rounding however small (see [`LogScaled`]).
    /// `direction` need not be a unit vector (the gradient is linear in it).
    /// Cost: the forward pass plus n matrix-vector products.
    ///
    /// # Errors
    ///
    /// Those of [`forward`](Self::forward), and:
    /// - [`Error::Empty`] naming `x` if there are no tokens;
    /// - [`Error::LengthMismatch`] naming `direction` unless it has length d;
    /// - [`Error::NonFinite`] naming `direction` for a NaN or infinite entry.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::rnn::TanhRnn;
    /// use nalgebra::DMatrix;
    ///
    /// let rnn = TanhRnn::<f64>::orthogonal_glorot(4, 3, 2)?;
    /// let x = DMatrix::from_fn(5, 3, |i, j| 0.3 * ((i + 2 * j) as f64).cos());
    /// let u = [0.5, -0.5, 0.5, 0.5];
    /// let g = rnn.last_state_vjp(&x, &u)?.value();
    /// // A central difference of u · h_4 in x_0's first entry.
    /// let f = |x: &DMatrix<f64>| {
    ///     let h = rnn.forward(x).unwrap();
    ///     (0..4).map(|i| u[i] * h[(4, i)]).sum::<f64>()
    /// };
    /// let (mut xp, mut xm) = (x.clone(), x.clone());
    /// xp[(0, 0)] += 1e-6;
    /// xm[(0, 0)] -= 1e-6;
    /// assert!((g[(0, 0)] - (f(&xp) - f(&xm)) / 2e-6).abs() < 1e-9);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn last_state_vjp<'a>(
        &self,
        x: impl Into<DMatrixView<'a, T>>,
        direction: &[T],
    ) -> Result<LogScaled<T>> {
        let u = direction_column(direction, self.w.nrows())?;
        self.backprop_to_first_input(&x.into(), u)
    }

    /// The Jacobian `J(n) = ∂h_{n−1}/∂x_0` (d x d_in), by backpropagation through time with
    /// the identity as cotangent (d vector-Jacobian products at once; see
    /// [`last_state_vjp`](Self::last_state_vjp)). Exact to rounding however small, as a
    /// [`LogScaled`]. Cost: the forward pass plus n d x d x d matrix products.
    ///
    /// # Errors
    ///
    /// Those of [`forward`](Self::forward), and [`Error::Empty`] naming `x` if there are no
    /// tokens.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::rnn::TanhRnn;
    /// use nalgebra::DMatrix;
    ///
    /// // One step: J(1) = diag(sech²(U x_0)) U.
    /// let rnn = TanhRnn::<f64>::orthogonal_glorot(3, 2, 5)?;
    /// let x = DMatrix::from_row_slice(1, 2, &[0.4, -0.7]);
    /// let z = rnn.u() * x.transpose();
    /// let expected = DMatrix::from_fn(3, 2, |i, j| (1.0 - z[i].tanh().powi(2)) * rnn.u()[(i, j)]);
    /// assert!((rnn.last_state_jacobian(&x)?.value() - expected).amax() < 1e-15);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn last_state_jacobian<'a>(
        &self,
        x: impl Into<DMatrixView<'a, T>>,
    ) -> Result<LogScaled<T>> {
        let d = self.w.nrows();
        self.backprop_to_first_input(&x.into(), DMatrix::identity(d, d))
    }
}

/// One causal self-attention layer with a single head and no output projection,
/// `Y = softmax(causal(Q Kᵀ / √d)) V` with `Q = X W_q`, `K = X W_k`, `V = X W_v`
/// (each weight d_in x d); the attention side of seed question 1.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::rnn::CausalAttention;
/// use nalgebra::DMatrix;
///
/// let layer = CausalAttention::<f64>::glorot(8, 4, 3)?;
/// let x = DMatrix::from_fn(6, 4, |i, j| ((i + j) as f64).sin());
/// let y = layer.forward(&x)?;
/// assert_eq!(y.shape(), (6, 8));
/// // The first token sees only itself: y_0 = v_0 = x_0 W_v.
/// assert!((y.row(0) - x.row(0) * layer.wv()).amax() < 1e-15);
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct CausalAttention<T: Float> {
    wq: DMatrix<T>,
    wk: DMatrix<T>,
    wv: DMatrix<T>,
}

impl<T: Float> CausalAttention<T> {
    /// A layer with projections `wq`, `wk`, `wv`, each d_in x d.
    ///
    /// # Errors
    ///
    /// - [`Error::ShapeMismatch`] naming `wk` or `wv` unless it has `wq`'s shape;
    /// - [`Error::Empty`] naming `wq` if d_in or d is 0;
    /// - [`Error::NonFinite`] naming the weight for a NaN or infinite entry.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::rnn::CausalAttention;
    /// use nalgebra::DMatrix;
    ///
    /// let w = DMatrix::<f32>::identity(4, 4);
    /// assert!(CausalAttention::new(w.clone(), w.clone(), w.clone()).is_ok());
    /// assert!(CausalAttention::new(w.clone(), DMatrix::zeros(4, 3), w).is_err());
    /// ```
    pub fn new(wq: DMatrix<T>, wk: DMatrix<T>, wv: DMatrix<T>) -> Result<Self> {
        let shape = wq.shape();
        check_weight("wq", &wq, shape)?;
        check_weight("wk", &wk, shape)?;
        check_weight("wv", &wv, shape)?;
        Ok(Self { wq, wk, wv })
    }

    /// Glorot-uniform projections (Glorot & Bengio 2010, eq. 16: `U(−a, a)`,
    /// `a = √(6 / (d_in + d))`), the default of Keras' `Dense`: weights that look learned at
    /// initialisation in that the scores `q · k / √d` have variance about 1 for unit-variance
    /// inputs. Drawn in f64 from a seeded Xoshiro256++ stream (W_q, then W_k, then W_v), then
    /// rounded to `T`.
    ///
    /// # Errors
    ///
    /// - [`Error::Empty`] naming `wq` if `width` or `input_width` is 0;
    /// - [`Error::TooLarge`] if the weights cannot be allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::rnn::CausalAttention;
    ///
    /// let layer = CausalAttention::<f32>::glorot(64, 64, 42)?;
    /// assert_eq!(layer.wq().shape(), (64, 64));
    /// assert!(layer.wk().amax() <= (6.0_f32 / 128.0).sqrt());
    /// assert_eq!(layer, CausalAttention::glorot(64, 64, 42)?);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn glorot(width: usize, input_width: usize, seed: u64) -> Result<Self> {
        if width == 0 || input_width == 0 {
            return Err(Error::Empty { what: "wq" });
        }
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let wq = glorot(&mut rng, input_width, width)?;
        let wk = glorot(&mut rng, input_width, width)?;
        let wv = glorot(&mut rng, input_width, width)?;
        Self::new(wq.map(T::of_f64), wk.map(T::of_f64), wv.map(T::of_f64))
    }

    /// The query projection W_q, d_in x d.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::rnn::CausalAttention;
    /// assert_eq!(CausalAttention::<f32>::glorot(8, 3, 0)?.wq().shape(), (3, 8));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn wq(&self) -> &DMatrix<T> {
        &self.wq
    }

    /// The key projection W_k, d_in x d.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::rnn::CausalAttention;
    /// assert_eq!(CausalAttention::<f32>::glorot(8, 3, 0)?.wk().shape(), (3, 8));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn wk(&self) -> &DMatrix<T> {
        &self.wk
    }

    /// The value projection W_v, d_in x d.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::rnn::CausalAttention;
    /// assert_eq!(CausalAttention::<f32>::glorot(8, 3, 0)?.wv().shape(), (3, 8));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn wv(&self) -> &DMatrix<T> {
        &self.wv
    }

    /// The layer over `x` (n x d_in): `Y = softmax(causal(Q Kᵀ / √d)) V` (n x d), through
    /// [`scaled_attention`] with [`Mask::causal`].
    ///
    /// # Errors
    ///
    /// - [`Error::DimensionMismatch`] if `x` does not have d_in columns;
    /// - [`Error::NonFinite`] naming `x` for a NaN or infinite input;
    /// - those of [`scaled_attention`].
    ///
    /// # Examples
    ///
    /// See [`CausalAttention`].
    pub fn forward<'a>(&self, x: impl Into<DMatrixView<'a, T>>) -> Result<DMatrix<T>> {
        let x = x.into();
        check_input(&x, self.wq.nrows(), "wq", Axis::Rows)?;
        let (q, k, v) = (x * &self.wq, x * &self.wk, x * &self.wv);
        scaled_attention(&q, &k, &v, &Mask::causal())
    }

    /// `gᵀ J(n)` for each column of `g` (d x c), as rows of a c x d_in matrix: the backward
    /// pass of the last query only (the last row of a causal layer sees every key, so it is
    /// the same function), one [`attention_backward`] call per column.
    fn last_output_grads(&self, x: &DMatrixView<'_, T>, g: &DMatrix<T>) -> Result<DMatrix<T>> {
        check_input(x, self.wq.nrows(), "wq", Axis::Rows)?;
        let n = x.nrows();
        if n == 0 {
            return Err(Error::Empty { what: "x" });
        }
        let last = x.rows(n - 1, 1);
        let (q, k, v) = (last * &self.wq, x * &self.wk, x * &self.wv);
        let (mask, opts) = (Mask::none(), AttentionOptions::new());
        let forward = scaled_attention_with(&q, &k, &v, &mask, &opts)?;
        let mut out = try_matrix(
            "the directions x d_in gradients",
            g.ncols(),
            x.ncols(),
            |_, _| T::zero(),
        )?;
        for c in 0..g.ncols() {
            let d_out = DMatrix::from_iterator(1, g.nrows(), g.column(c).iter().copied());
            let grads = attention_backward(&q, &k, &v, &mask, &opts, &forward, &d_out)?;
            // x_0 is key 0 and value 0 (and, for n = 1, the query).
            let mut row =
                grads.dk.row(0) * self.wk.transpose() + grads.dv.row(0) * self.wv.transpose();
            if n == 1 {
                row += grads.dq.row(0) * self.wq.transpose();
            }
            out.row_mut(c).copy_from(&row);
        }
        Ok(out)
    }

    /// The gradient of `direction · y_{n−1}` with respect to the first input `x_0`,
    /// `uᵀ ∂y_{n−1}/∂x_0` (1 x d_in): one backward pass with `dO = e_{n−1} uᵀ` through
    /// [`attention_backward`], chained through the projections:
    ///
    /// ```text
    /// ∂(u · y_{n−1})/∂x_0 = dK_0 W_kᵀ + dV_0 W_vᵀ  (+ dQ_0 W_qᵀ for n = 1)
    ///                     = P_0 (uᵀ W_vᵀ + (u · (v_0 − y_{n−1})) q_{n−1} W_kᵀ / √d)
    /// ```
    ///
    /// Only the last query's row of dO is non-zero, so only that query is run (against all n
    /// keys, unmasked: the last row of a causal layer). `direction` need not be a unit vector.
    ///
    /// # Errors
    ///
    /// Those of [`forward`](Self::forward), and:
    /// - [`Error::Empty`] naming `x` if there are no tokens;
    /// - [`Error::LengthMismatch`] naming `direction` unless it has length d;
    /// - [`Error::NonFinite`] naming `direction` for a NaN or infinite entry.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::rnn::CausalAttention;
    /// use nalgebra::DMatrix;
    ///
    /// // Identical tokens: the weights are uniform, 1/n, and the score path cancels, so the
    /// // gradient is exactly uᵀ W_vᵀ / n: diluted by the sequence length.
    /// let layer = CausalAttention::<f64>::glorot(4, 3, 9)?;
    /// let x = DMatrix::from_fn(8, 3, |_, j| j as f64 - 1.0);
    /// let u = [1.0, 0.0, 0.0, 0.0];
    /// let g = layer.last_output_vjp(&x, &u)?.value();
    /// let expected = layer.wv().column(0).transpose() / 8.0;
    /// assert!((g - expected).amax() < 1e-14);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn last_output_vjp<'a>(
        &self,
        x: impl Into<DMatrixView<'a, T>>,
        direction: &[T],
    ) -> Result<LogScaled<T>> {
        let u = direction_column(direction, self.wq.ncols())?;
        Ok(LogScaled::new(self.last_output_grads(&x.into(), &u)?, 0.0))
    }

    /// The Jacobian `J(n) = ∂y_{n−1}/∂x_0` (d x d_in): d vector-Jacobian products (see
    /// [`last_output_vjp`](Self::last_output_vjp)), one per unit vector `e_c`. For n >= 2,
    ///
    /// ```text
    /// J(n) = P_0 W_vᵀ + P_0 (v_0 − y_{n−1})ᵀ (q_{n−1} W_kᵀ) / √d
    /// ```
    ///
    /// Cost: one forward pass of the last query and d backward passes, O(n d²) in all.
    ///
    /// # Errors
    ///
    /// Those of [`forward`](Self::forward), and [`Error::Empty`] naming `x` if there are no
    /// tokens.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::rnn::CausalAttention;
    /// use nalgebra::DMatrix;
    ///
    /// // One token: y_0 = x_0 W_v whatever the scores, so J(1) = W_vᵀ.
    /// let layer = CausalAttention::<f64>::glorot(4, 3, 1)?;
    /// let j = layer.last_output_jacobian(&DMatrix::from_row_slice(1, 3, &[0.1, 0.2, 0.3]))?;
    /// assert!((j.value() - layer.wv().transpose()).amax() < 1e-15);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn last_output_jacobian<'a>(
        &self,
        x: impl Into<DMatrixView<'a, T>>,
    ) -> Result<LogScaled<T>> {
        let d = self.wq.ncols();
        Ok(LogScaled::new(
            self.last_output_grads(&x.into(), &DMatrix::identity(d, d))?,
            0.0,
        ))
    }
}

/// The two gradient norms of one layer at one sequence length, as base-10 logarithms
/// averaged over the trials (the log of the geometric mean); see [`PathStudy`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PathNorms {
    /// `mean log10 ‖uᵀ J(n)‖₂` for a random unit vector u (one per trial).
    pub log10_vjp: f64,
    /// `mean log10 (‖J(n)‖_F / √d)`.
    pub log10_jacobian_rms: f64,
}

/// The gradient norms of both layers at one sequence length; see [`PathStudy::run`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PathRow {
    /// The sequence length n.
    pub n: usize,
    /// Through the causal attention layer, `∂y_{n−1}/∂x_0`.
    pub attention: PathNorms,
    /// Through the tanh RNN, `∂h_{n−1}/∂x_0`.
    pub rnn: PathNorms,
}

/// The gradient-path experiment of seed question 1: for each sequence length n, the norms of
/// `∂(last output)/∂(first input)` through one [`CausalAttention`] layer
/// ([`glorot`](CausalAttention::glorot)) and one [`TanhRnn`]
/// ([`orthogonal_glorot`](TanhRnn::orthogonal_glorot)) of the same width d, on inputs with
/// independent standard normal entries, computed exactly by backpropagation (see the
/// [module docs](self) for the definitions of `G_u` and `G_F`).
///
/// Each trial draws its own weights, unit direction u and inputs (row by row) from a
/// Xoshiro256++ stream seeded from `(seed, trial)`; the sequence of length n is the first n
/// rows of the trial's inputs, so a row of the result depends only on the seed, d, the trial
/// count and its n, not on the other lengths. Defaults: n = 16, 64, 256, 1024; d = 64; 4 trials; seed 42.
///
/// # Examples
///
/// ```
/// use attention_math::sheet::rnn::PathStudy;
///
/// let rows = PathStudy::new().lengths([4, 64]).width(8).trials(2).seed(1).run()?;
/// let (short, long) = (rows[0], rows[1]);
/// // The RNN's gradient shrinks exponentially with n, attention's only like 1/n.
/// assert!(long.rnn.log10_jacobian_rms < short.rnn.log10_jacobian_rms - 5.0);
/// assert!(long.attention.log10_jacobian_rms > short.attention.log10_jacobian_rms - 2.5);
/// assert_eq!(rows, PathStudy::new().lengths([4, 64]).width(8).trials(2).seed(1).run()?);
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct PathStudy {
    lengths: Vec<usize>,
    width: usize,
    trials: usize,
    seed: u64,
}

impl Default for PathStudy {
    fn default() -> Self {
        Self::new()
    }
}

impl PathStudy {
    /// The default study: n = 16, 64, 256, 1024; d = 64; 4 trials; seed 42. See
    /// [`PathStudy`] for an example.
    pub fn new() -> Self {
        Self {
            lengths: vec![16, 64, 256, 1024],
            width: 64,
            trials: 4,
            seed: 42,
        }
    }

    /// The sequence lengths n. See [`PathStudy`] for an example.
    pub fn lengths(mut self, lengths: impl IntoIterator<Item = usize>) -> Self {
        self.lengths = lengths.into_iter().collect();
        self
    }

    /// The width d of both layers (and of the inputs). See [`PathStudy`] for an example.
    pub fn width(mut self, width: usize) -> Self {
        self.width = width;
        self
    }

    /// The number of independent draws averaged. See [`PathStudy`] for an example.
    pub fn trials(mut self, trials: usize) -> Self {
        self.trials = trials;
        self
    }

    /// The seed. See [`PathStudy`] for an example.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Runs the study: one [`PathRow`] per length, in the order given.
    ///
    /// Cost per trial: for attention, at each n, d backward passes of one query against n
    /// keys (O(n d²)); for the RNN, at each n, n d x d x d products (O(n d³)). The default
    /// study takes about a second of CPU time in release builds.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidParameter`] naming `lengths` if there are none or one is 0, `width`
    ///   if it is 0, or `trials` if it is 0;
    /// - [`Error::TooLarge`] if the inputs cannot be allocated.
    ///
    /// # Examples
    ///
    /// See [`PathStudy`].
    pub fn run(&self) -> Result<Vec<PathRow>> {
        let invalid = |name, value: usize, requirement| Error::InvalidParameter {
            name,
            value: value as f64,
            requirement,
        };
        if self.lengths.is_empty() {
            return Err(invalid("lengths", 0, "must hold at least one length"));
        }
        if let Some(&bad) = self.lengths.iter().find(|&&n| n == 0) {
            return Err(invalid("lengths", bad, "must all be >= 1"));
        }
        if self.width == 0 {
            return Err(invalid("width", 0, "must be >= 1"));
        }
        if self.trials == 0 {
            return Err(invalid("trials", 0, "must be >= 1"));
        }
        let (d, n_max) = (self.width, *self.lengths.iter().max().unwrap_or(&1));
        let mut sums = vec![[0.0_f64; 4]; self.lengths.len()];
        for trial in 0..self.trials {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(trial_seed(self.seed, trial));
            let attention = CausalAttention::<f64>::glorot(d, d, rng.random())?;
            let rnn = TanhRnn::<f64>::orthogonal_glorot(d, d, rng.random())?;
            let mut u: Vec<f64> = (0..d).map(|_| rng.sample(StandardNormal)).collect();
            let norm = u.iter().map(|v| v * v).sum::<f64>().sqrt();
            u.iter_mut().for_each(|v| *v /= norm);
            // Row by row, so that the first n rows do not depend on the longest length.
            let mut entries = try_with_capacity::<f64>("the n x d inputs", n_max, d)?;
            entries.extend((0..n_max * d).map(|_| rng.sample::<f64, _>(StandardNormal)));
            let x = DMatrix::from_row_iterator(n_max, d, entries);
            let rms = (d as f64).log10() / 2.0;
            for (sum, &n) in sums.iter_mut().zip(&self.lengths) {
                let x = x.rows(0, n);
                sum[0] += attention.last_output_vjp(x, &u)?.log10_norm();
                sum[1] += attention.last_output_jacobian(x)?.log10_norm() - rms;
                sum[2] += rnn.last_state_vjp(x, &u)?.log10_norm();
                sum[3] += rnn.last_state_jacobian(x)?.log10_norm() - rms;
            }
        }
        let t = self.trials as f64;
        Ok(self
            .lengths
            .iter()
            .zip(&sums)
            .map(|(&n, s)| PathRow {
                n,
                attention: PathNorms {
                    log10_vjp: s[0] / t,
                    log10_jacobian_rms: s[1] / t,
                },
                rnn: PathNorms {
                    log10_vjp: s[2] / t,
                    log10_jacobian_rms: s[3] / t,
                },
            })
            .collect())
    }
}

/// The seed of one trial's stream.
fn trial_seed(seed: u64, trial: usize) -> u64 {
    seed.rotate_left(17) ^ (trial as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(n: usize, d_in: usize, seed: u64) -> DMatrix<f64> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        DMatrix::from_fn(n, d_in, |_, _| rng.sample::<f64, _>(StandardNormal))
    }

    /// Central differences of `f` (a vector of d outputs) in every entry of row 0 of `x`: the
    /// d x d_in Jacobian.
    fn fd_jacobian(
        x: &DMatrix<f64>,
        d: usize,
        f: impl Fn(&DMatrix<f64>) -> Vec<f64>,
    ) -> DMatrix<f64> {
        let h = 1e-6;
        let mut j = DMatrix::zeros(d, x.ncols());
        for c in 0..x.ncols() {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[(0, c)] += h;
            xm[(0, c)] -= h;
            let (fp, fm) = (f(&xp), f(&xm));
            for i in 0..d {
                j[(i, c)] = (fp[i] - fm[i]) / (2.0 * h);
            }
        }
        j
    }

    #[test]
    fn attention_gradients_match_finite_differences() {
        let (d, d_in) = (5, 4);
        let layer = CausalAttention::<f64>::glorot(d, d_in, 11).unwrap();
        let u = [0.3, -0.2, 0.5, 0.1, -0.7];
        for n in [1, 2, 7] {
            let x = inputs(n, d_in, n as u64);
            let last = |x: &DMatrix<f64>| {
                let y = layer.forward(x).unwrap();
                (0..d).map(|i| y[(n - 1, i)]).collect::<Vec<_>>()
            };
            let fd = fd_jacobian(&x, d, last);
            let j = layer.last_output_jacobian(&x).unwrap().value();
            assert!((&j - &fd).amax() < 1e-8, "n = {n}: {}", (&j - &fd).amax());
            let vjp = layer.last_output_vjp(&x, &u).unwrap().value();
            let expected = DMatrix::from_row_slice(1, d, &u) * &fd;
            assert!((vjp - expected).amax() < 1e-8, "n = {n}");
        }
    }

    #[test]
    fn rnn_gradients_match_finite_differences() {
        let (d, d_in) = (5, 3);
        let rnn = TanhRnn::<f64>::orthogonal_glorot(d, d_in, 4).unwrap();
        let u = [0.3, -0.2, 0.5, 0.1, -0.7];
        for n in [1, 2, 9] {
            let x = inputs(n, d_in, 100 + n as u64);
            let last = |x: &DMatrix<f64>| {
                let h = rnn.forward(x).unwrap();
                (0..d).map(|i| h[(n - 1, i)]).collect::<Vec<_>>()
            };
            let fd = fd_jacobian(&x, d, last);
            let j = rnn.last_state_jacobian(&x).unwrap().value();
            assert!((&j - &fd).amax() < 1e-8, "n = {n}: {}", (&j - &fd).amax());
            let vjp = rnn.last_state_vjp(&x, &u).unwrap().value();
            let expected = DMatrix::from_row_slice(1, d, &u) * &fd;
            assert!((vjp - expected).amax() < 1e-8, "n = {n}");
        }
    }

    /// The single-query backward equals the full n x n causal layer's backward with
    /// dO = e_{n−1} uᵀ, chained through the three projections; and the closed form
    /// J = P_0 W_vᵀ + P_0 (v_0 − y)ᵀ (q W_kᵀ) / √d holds.
    #[test]
    fn attention_gradient_is_the_full_layers_and_the_closed_form() {
        let (n, d, d_in) = (9, 6, 4);
        let layer = CausalAttention::<f64>::glorot(d, d_in, 5).unwrap();
        let x = inputs(n, d_in, 8);
        let u = [0.1, 0.2, -0.3, 0.4, -0.5, 0.6];
        let (q, k, v) = (&x * layer.wq(), &x * layer.wk(), &x * layer.wv());
        let opts = AttentionOptions::new();
        let forward = scaled_attention_with(&q, &k, &v, &Mask::causal(), &opts).unwrap();
        let d_out = DMatrix::from_fn(n, d, |i, c| if i == n - 1 { u[c] } else { 0.0 });
        let g = attention_backward(&q, &k, &v, &Mask::causal(), &opts, &forward, &d_out).unwrap();
        let dx = &g.dq * layer.wq().transpose()
            + &g.dk * layer.wk().transpose()
            + &g.dv * layer.wv().transpose();
        let vjp = layer.last_output_vjp(&x, &u).unwrap().value();
        assert!((vjp - dx.rows(0, 1)).amax() < 1e-14);

        let y = forward.output.row(n - 1).into_owned();
        let scale = 1.0 / (d as f64).sqrt();
        let s: Vec<f64> = (0..n)
            .map(|j| q.row(n - 1).dot(&k.row(j)) * scale)
            .collect();
        let p = crate::softmax(&s);
        let closed = layer.wv().transpose() * p[0]
            + (v.row(0) - &y).transpose()
                * (q.row(n - 1) * layer.wk().transpose())
                * (p[0] * scale);
        let j = layer.last_output_jacobian(&x).unwrap().value();
        assert!((j - closed).amax() < 1e-14);
    }

    /// W = s I, U = I, x = 0: every pre-activation is 0 (sech² = 1) and J(n) = s^(n−1) I
    /// exactly, far below f64's range at n = 3000, reported exactly as a logarithm.
    #[test]
    fn rnn_gradient_below_the_float_range_is_exact_in_log() {
        let (d, s, n) = (3, 0.5_f64, 3000);
        let rnn = TanhRnn::new(DMatrix::identity(d, d) * s, DMatrix::identity(d, d)).unwrap();
        let x = DMatrix::zeros(n, d);
        let j = rnn.last_state_jacobian(&x).unwrap();
        let expected = (n - 1) as f64 * s.ln() + 0.5 * (d as f64).ln();
        assert!((j.ln_norm() - expected).abs() < 1e-9, "{}", j.ln_norm());
        assert_eq!(j.value(), DMatrix::zeros(d, d)); // 0.5^2999 underflows
        let m = j.mantissa();
        assert!((m - DMatrix::identity(d, d) / (d as f64).sqrt()).amax() < 1e-15);
        let g = rnn.last_state_vjp(&x, &[3.0, 0.0, 4.0]).unwrap();
        assert!((g.ln_norm() - ((n - 1) as f64 * s.ln() + 5.0_f64.ln())).abs() < 1e-9);
        // A zero direction gives a zero gradient, ln = −∞.
        let z = rnn.last_state_vjp(&x, &[0.0; 3]).unwrap();
        assert_eq!(z.ln_norm(), f64::NEG_INFINITY);
        assert_eq!(z.value(), DMatrix::zeros(1, d));
    }

    #[test]
    fn initialisations_are_reproducible_and_orthogonal() {
        let a = TanhRnn::<f64>::orthogonal_glorot(32, 16, 3).unwrap();
        assert_eq!(a, TanhRnn::orthogonal_glorot(32, 16, 3).unwrap());
        assert_ne!(a, TanhRnn::orthogonal_glorot(32, 16, 4).unwrap());
        assert!((a.w().transpose() * a.w() - DMatrix::identity(32, 32)).amax() < 1e-13);
        // Spectral radius 1: every eigenvalue on the unit circle.
        for lambda in a.w().complex_eigenvalues().iter() {
            // |λ| as num-complex's `norm` computes it (which needs its std or libm feature).
            assert!((lambda.re.hypot(lambda.im) - 1.0).abs() < 1e-10, "{lambda}");
        }
        // The f32 network is the f64 one rounded.
        let b = TanhRnn::<f32>::orthogonal_glorot(32, 16, 3).unwrap();
        assert_eq!(b.w(), &a.w().map(|v| v as f32));
        let l = CausalAttention::<f32>::glorot(8, 4, 1).unwrap();
        let l64 = CausalAttention::<f64>::glorot(8, 4, 1).unwrap();
        assert_eq!(l.wv(), &l64.wv().map(|v| v as f32));
        // Glorot's variance 2 / (fan_in + fan_out), to sampling error.
        let big = CausalAttention::<f64>::glorot(200, 200, 2).unwrap();
        let var = big.wq().iter().map(|w| w * w).sum::<f64>() / 40_000.0;
        assert!((var * 200.0 - 1.0).abs() < 0.03, "{var}");
    }

    #[test]
    fn study_is_reproducible_and_shows_the_two_decays() {
        let study = PathStudy::new()
            .lengths([2, 32, 128])
            .width(16)
            .trials(2)
            .seed(9);
        let rows = study.run().unwrap();
        assert_eq!(rows, study.run().unwrap());
        assert_ne!(rows, study.clone().seed(10).run().unwrap());
        assert_eq!(rows.iter().map(|r| r.n).collect::<Vec<_>>(), [2, 32, 128]);
        // A row does not depend on the other lengths.
        assert_eq!(study.clone().lengths([32]).run().unwrap()[0], rows[1]);
        // Attention: about 1/n (a decade per factor of 10, give or take the score term).
        let att = |i: usize| rows[i].attention.log10_jacobian_rms;
        assert!(
            (att(2) - att(1) + 4.0_f64.log10()).abs() < 0.5,
            "{} {}",
            att(1),
            att(2)
        );
        // The RNN: exponential, many decades below attention at n = 128.
        assert!(rows[2].rnn.log10_jacobian_rms < att(2) - 5.0);
        assert!(rows[2].rnn.log10_jacobian_rms < rows[1].rnn.log10_jacobian_rms - 5.0);
        // A single direction tracks the RMS over directions.
        for r in &rows {
            assert!((r.rnn.log10_vjp - r.rnn.log10_jacobian_rms).abs() < 1.0);
            assert!((r.attention.log10_vjp - r.attention.log10_jacobian_rms).abs() < 1.0);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let rnn = TanhRnn::<f64>::orthogonal_glorot(4, 3, 0).unwrap();
        let layer = CausalAttention::<f64>::glorot(4, 3, 0).unwrap();
        let wrong = DMatrix::zeros(5, 2);
        assert_eq!(
            rnn.forward(&wrong).unwrap_err().to_string(),
            "x has 2 columns but u has 3"
        );
        assert_eq!(
            layer.forward(&wrong).unwrap_err().to_string(),
            "x has 2 columns but wq has 3 rows"
        );
        let mut nan = DMatrix::zeros(5, 3);
        nan[(2, 1)] = f64::NAN;
        assert!(matches!(
            rnn.forward(&nan),
            Err(Error::NonFinite {
                arg: "x",
                row: 2,
                col: 1
            })
        ));
        assert!(matches!(
            layer.last_output_jacobian(&nan),
            Err(Error::NonFinite { .. })
        ));
        let empty = DMatrix::<f64>::zeros(0, 3);
        assert_eq!(rnn.forward(&empty).unwrap().shape(), (0, 4));
        assert_eq!(layer.forward(&empty).unwrap().shape(), (0, 4));
        assert_eq!(
            rnn.last_state_jacobian(&empty),
            Err(Error::Empty { what: "x" })
        );
        assert_eq!(
            layer.last_output_vjp(&empty, &[0.0; 4]),
            Err(Error::Empty { what: "x" })
        );
        let x = DMatrix::zeros(2, 3);
        assert!(matches!(
            rnn.last_state_vjp(&x, &[1.0; 3]),
            Err(Error::LengthMismatch {
                arg: "direction",
                ..
            })
        ));
        assert!(matches!(
            layer.last_output_vjp(&x, &[1.0, f64::INFINITY, 0.0, 0.0]),
            Err(Error::NonFinite {
                arg: "direction",
                row: 0,
                col: 1
            })
        ));
        assert!(TanhRnn::<f64>::orthogonal_glorot(0, 3, 0).is_err());
        assert!(CausalAttention::<f64>::glorot(3, 0, 0).is_err());
        let mut w = DMatrix::<f64>::identity(3, 3);
        w[(0, 0)] = f64::INFINITY;
        assert!(matches!(
            TanhRnn::new(w, DMatrix::zeros(3, 2)),
            Err(Error::NonFinite { arg: "w", .. })
        ));
        for study in [
            PathStudy::new().lengths([]),
            PathStudy::new().lengths([4, 0]),
            PathStudy::new().width(0),
            PathStudy::new().trials(0),
        ] {
            assert!(matches!(study.run(), Err(Error::InvalidParameter { .. })));
        }
    }

    /// f32 layers give the f64 gradients to f32 accuracy.
    #[test]
    fn f32_agrees_with_f64() {
        let x = inputs(20, 8, 1);
        let x32 = x.map(|v| v as f32);
        let (r64, r32) = (
            TanhRnn::<f64>::orthogonal_glorot(8, 8, 2).unwrap(),
            TanhRnn::<f32>::orthogonal_glorot(8, 8, 2).unwrap(),
        );
        let (a, b) = (
            r64.last_state_jacobian(&x).unwrap(),
            r32.last_state_jacobian(&x32).unwrap(),
        );
        assert!((a.ln_norm() - b.ln_norm()).abs() < 1e-4);
        let (l64, l32) = (
            CausalAttention::<f64>::glorot(8, 8, 2).unwrap(),
            CausalAttention::<f32>::glorot(8, 8, 2).unwrap(),
        );
        let (a, b) = (
            l64.last_output_jacobian(&x).unwrap(),
            l32.last_output_jacobian(&x32).unwrap(),
        );
        assert!((a.ln_norm() - b.ln_norm()).abs() < 1e-4);
    }
}
