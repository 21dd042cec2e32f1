//! Parameter-efficient fine-tuning (seed question 3): LoRA and bottleneck adapters.
//!
//! Rows are tokens, so a linear layer maps `x` (n x d_in) to `x W` (n x d_out).
//!
//! **LoRA** (Hu et al. 2021) freezes `W` and learns a rank-r update:
//!
//! ```text
//! y = x W + (α / r) · x A B          A: d_in x r,  B: r x d_out,  r ≪ min(d_in, d_out)
//! ```
//!
//! `B` starts at zero, so training starts from the base model exactly. The update can be
//! merged into the weight, `W' = W + (α/r) A B`, so inference costs nothing extra, and
//! unmerged again to swap adapters. It trains `r (d_in + d_out)` parameters instead of
//! `d_in · d_out` ([`lora_parameter_ratio`]: 0.39% for Llama-2-7B's 4096 x 4096 `q_proj` at
//! rank 8); applied to the Q, K, V and O projections of attention it changes what the heads
//! attend to without touching the frozen weights.
//!
//! A **bottleneck adapter** (Houlsby et al. 2019) adds a small residual MLP after a sublayer:
//!
//! ```text
//! y = x + relu(x W_down) W_up                W_down: d x r,  W_up: r x d
//! ```
//!
//! which, unlike LoRA, cannot be merged away (the nonlinearity), so it adds inference latency.
//!
//! **Gradients.** Given `d_y = ∂L/∂y` ([`LoraLinear::backward`],
//! [`BottleneckAdapter::backward`]), with `s = α/r` and `H = x W_down`:
//!
//! ```text
//! LoRA     ∂L/∂B = s (x A)ᵀ d_y     ∂L/∂A = s xᵀ (d_y Bᵀ)     ∂L/∂x = d_y Wᵀ + s (d_y Bᵀ) Aᵀ
//! adapter  G = (d_y W_upᵀ) ⊙ relu'(H)
//!          ∂L/∂W_up = relu(H)ᵀ d_y   ∂L/∂W_down = xᵀ G     ∂L/∂x = d_y + G W_downᵀ
//! ```
//!
//! `W` is frozen: LoRA has no `∂L/∂W`. Since `B = 0` at initialisation, `∂L/∂A = 0` at the
//! first step; only `B` moves, and `A` starts learning once `B` is non-zero. The derivations
//! and the sources are in `docs/rlhf-and-lora.md`.

use crate::Float;
use crate::error::{Axis, Error, Result, try_matrix};
use crate::float::pow2;
use crate::prelude::*;
use crate::spec::{exponent, mul_pow2};
use nalgebra::{DMatrix, DMatrixView, DMatrixViewMut, Dyn, MatrixView};

/// `a · b` (n x k times k x p) into a freshly allocated, size-checked n x p matrix named `what`.
fn product<T: Float>(
    what: &'static str,
    a: &DMatrixView<'_, T>,
    b: &DMatrixView<'_, T>,
) -> Result<DMatrix<T>> {
    let mut out = try_matrix(what, a.nrows(), b.ncols(), |_, _| T::zero())?;
    out.gemm(T::one(), a, b, T::zero());
    Ok(out)
}

/// `aᵀ · b` (k x n transposed, times k x p) into a freshly allocated, size-checked n x p
/// matrix named `what`.
fn product_tn<T: Float>(
    what: &'static str,
    a: &DMatrixView<'_, T>,
    b: &DMatrixView<'_, T>,
) -> Result<DMatrix<T>> {
    let mut out = try_matrix(what, a.ncols(), b.ncols(), |_, _| T::zero())?;
    out.gemm_tr(T::one(), a, b, T::zero());
    Ok(out)
}

/// `a · bᵀ` (n x k times p x k transposed) into a freshly allocated, size-checked n x p
/// matrix named `what`; `bᵀ` is read in place, as a view of `b`'s storage with the strides
/// swapped.
fn product_nt<T: Float>(
    what: &'static str,
    a: &DMatrixView<'_, T>,
    b: &DMatrix<T>,
) -> Result<DMatrix<T>> {
    let mut out = try_matrix(what, a.nrows(), b.nrows(), |_, _| T::zero())?;
    // An empty b gives an empty product or a sum of no terms (zeros), and it may have a
    // dimension near usize::MAX, which the view's bounds check would overflow on.
    if !b.is_empty() {
        let (p, k) = b.shape();
        // Entry (j, i) of bᵀ is b[(i, j)] at offset i + j p: row stride p, column stride 1.
        let bt = MatrixView::<'_, T, Dyn, Dyn, Dyn, Dyn>::from_slice_with_strides(
            b.as_slice(),
            k,
            p,
            p,
            1,
        );
        out.gemm(T::one(), a, &bt, T::zero());
    }
    Ok(out)
}

/// Entries of `h = x m` (computed by the caller) that overflowed (to ±inf, or to NaN through
/// inf − inf part-way) although their row of `x` and column of `m` are finite, recomputed at the scale `2^-e`: `(i, k, h_ik · 2^-e)`, with the
/// entry in `h` set to 0 so that the caller's next product skips it. `|Σ_c x_ic m_ck|` is at
/// most `d · MAX²`, so `e = MAX_EXP + log₂(d) + 2`, applied half to x and half to m (each half
/// a normal power of two), brings it below MAX/2.
struct Rescued<T> {
    entries: Vec<(usize, usize, T)>,
    /// `e`, split into two halves whose powers of two are normal.
    halves: (i32, i32),
}

fn rescue_overflow<T: Float>(
    x: &DMatrixView<'_, T>,
    m: &DMatrixView<'_, T>,
    h: &mut DMatrix<T>,
) -> Rescued<T> {
    let d = x.ncols();
    let e = T::MAX_EXP + (usize::BITS - d.leading_zeros()) as i32 + 2;
    let halves = (e / 2, e - e / 2);
    let (lo, hi) = (pow2::<T>(-halves.0), pow2::<T>(-halves.1));
    let mut entries = Vec::new();
    for k in 0..h.ncols() {
        if !m.column(k).iter().all(|v| v.is_finite()) {
            continue;
        }
        for i in 0..h.nrows() {
            let v = h[(i, k)];
            // Not finite (inf, or NaN from inf − inf part-way) from a finite row and column.
            if !v.is_finite() && x.row(i).iter().all(|v| v.is_finite()) {
                let z = (0..d).fold(T::zero(), |acc, c| {
                    acc + (x[(i, c)] * lo) * (m[(c, k)] * hi)
                });
                entries.push((i, k, z));
                h[(i, k)] = T::zero();
            }
        }
    }
    Rescued { entries, halves }
}

/// `x · 2^e` times every factor, each taken as its mantissa (in [1, 2)) and its exponent, so
/// that nothing over- or underflows before the one scaling at the end (which rounds once, as
/// the exact product would): a subnormal α/r keeps its bits, a huge one meets a huge power of
/// two without overflowing first.
fn product_pow2<T: Float>(x: T, factors: &[T], e: i32) -> T {
    let (mut t, mut k) = (x, e);
    for &f in factors {
        if f == T::zero() || !f.is_finite() {
            return x * f; // 0, or the inf / NaN the direct product gives
        }
        let kf = exponent(f);
        t *= mul_pow2(f, -kf);
        k += kf;
    }
    mul_pow2(t, k)
}

/// `z · s · n · 2^e` (e the rescue's power of two, the sum of its two halves); 0 stays 0.
fn rescued_term<T: Float>(z: T, s: T, n: T, e: i32) -> T {
    if z == T::zero() {
        return z;
    }
    product_pow2(z, &[s, n], e)
}

/// Adds the rescued entries of a product, scaled by `s`, to `y`: `y_ij += s · z · 2^e`,
/// rounded once (see [`product_pow2`]).
fn add_scaled_back<T: Float>(y: &mut DMatrix<T>, r: &Rescued<T>, s: T) {
    let e = r.halves.0 + r.halves.1;
    for &(i, j, z) in &r.entries {
        y[(i, j)] += product_pow2(z, &[s], e);
    }
}

/// Adds the rescued entries' share of `f(h) n` to `y`: `y_ij += (f(h'_ik) · s · n_kj) · 2^e` for
/// a positively homogeneous `f` (identity or relu), so the scale comes out exactly.
fn add_rescued<T: Float>(
    y: &mut DMatrix<T>,
    r: &Rescued<T>,
    n: &DMatrix<T>,
    s: T,
    f: impl Fn(T) -> T,
) {
    let e = r.halves.0 + r.halves.1;
    for &(i, k, z) in &r.entries {
        let z = f(z);
        if z == T::zero() {
            continue;
        }
        for j in 0..y.ncols() {
            let t = rescued_term(z, s, n[(k, j)], e);
            if t != T::zero() {
                y[(i, j)] += t;
            }
        }
    }
}

/// Adds the rescued entries' share of `s f(h)ᵀ n` to `y`, the transposed counterpart of
/// [`add_rescued`] for the gradients: `y_kj += (f(h'_ik) · s · n_ij) · 2^e`.
fn add_rescued_tn<T: Float>(
    y: &mut DMatrix<T>,
    r: &Rescued<T>,
    n: &DMatrixView<'_, T>,
    s: T,
    f: impl Fn(T) -> T,
) {
    let e = r.halves.0 + r.halves.1;
    for &(i, k, z) in &r.entries {
        let z = f(z);
        if z == T::zero() {
            continue;
        }
        for j in 0..y.ncols() {
            let t = rescued_term(z, s, n[(i, j)], e);
            if t != T::zero() {
                y[(k, j)] += t;
            }
        }
    }
}

fn check_inner(
    arg: &'static str,
    found: usize,
    other: &'static str,
    other_axis: Axis,
    expected: usize,
) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(Error::DimensionMismatch {
            arg,
            axis: Axis::Cols,
            found,
            other,
            other_axis,
            expected,
        })
    }
}

fn check_shape(arg: &'static str, found: (usize, usize), expected: (usize, usize)) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            arg,
            found,
            expected,
        })
    }
}

/// A frozen linear layer `W` (d_in x d_out) with a LoRA update `(α/r) A B`.
///
/// The fields are private so that their shapes always agree (`A` is d_in x r, `B` is
/// r x d_out): read them with [`w`](Self::w), [`a`](Self::a), [`b`](Self::b), edit entries
/// through [`a_mut`](Self::a_mut) / [`b_mut`](Self::b_mut) (views of fixed shape), and
/// replace a factor with the checked [`set_a`](Self::set_a) / [`set_b`](Self::set_b).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::lora::LoraLinear;
/// use nalgebra::DMatrix;
///
/// let w = DMatrix::<f64>::identity(4, 4);
/// let mut layer = LoraLinear::new(w, 2, 4.0)?; // rank 2, alpha 4
/// let x = DMatrix::<f64>::from_fn(3, 4, |i, j| (i + j) as f64);
/// assert_eq!(layer.forward(&x)?, x); // B = 0: exactly the base layer
/// layer.b_mut()[(0, 0)] = 1.0;
/// layer.a_mut()[(0, 0)] = 0.5;
/// let merged = layer.merged();
/// assert!((layer.forward(&x)? - &x * &merged).amax() < 1e-12);
/// assert_eq!(layer.trainable_parameters(), 2 * (4 + 4));
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LoraLinear<T: Float> {
    /// The frozen base weight, d_in x d_out.
    w: DMatrix<T>,
    /// The down projection A, d_in x r.
    a: DMatrix<T>,
    /// The up projection B, r x d_out (zero at initialisation).
    b: DMatrix<T>,
    /// The scaling numerator α; the update is multiplied by α / r.
    alpha: T,
}

impl<T: Float> LoraLinear<T> {
    /// Wraps `w` with a rank-`rank` update: `A` gets a deterministic small initialisation
    /// (a scaled cosine pattern standing in for Kaiming-uniform; overwrite it for training)
    /// and `B = 0`, so the layer starts equal to `w`.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidParameter`] if `rank` is 0 or `alpha` is not finite;
    /// - [`Error::TooLarge`] if `A` (d_in x rank) or `B` (rank x d_out) cannot be allocated
    ///   (for example a weight with 2^32 rows and a rank of 2^32, whose entry count wraps).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Error, sheet::lora::LoraLinear};
    /// use nalgebra::DMatrix;
    ///
    /// let layer = LoraLinear::new(DMatrix::<f32>::zeros(8, 6), 2, 16.0)?;
    /// assert_eq!((layer.a().shape(), layer.b().shape()), ((8, 2), (2, 6)));
    /// assert_eq!(layer.scaling(), 8.0);
    /// // A 2^32 x 0 weight holds no data, but a rank-2^32 A would hold 2^64 entries.
    /// let tall = DMatrix::<f32>::zeros(1 << 32, 0);
    /// assert!(matches!(LoraLinear::new(tall, 1 << 32, 1.0), Err(Error::TooLarge { .. })));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn new(w: DMatrix<T>, rank: usize, alpha: T) -> Result<Self> {
        if rank == 0 {
            return Err(Error::InvalidParameter {
                name: "rank",
                value: 0.0,
                requirement: "must be >= 1",
            });
        }
        if !alpha.is_finite() {
            return Err(Error::InvalidParameter {
                name: "alpha",
                value: alpha.as_f64(),
                requirement: "must be finite",
            });
        }
        let (d_in, d_out) = w.shape();
        let bound = T::one() / T::of_usize(d_in.max(1)).sqrt();
        // i · rank + j < d_in · rank, which try_matrix has checked to fit in usize.
        let a = try_matrix("the d_in x rank LoRA factor a", d_in, rank, |i, j| {
            bound * T::of_f64(((i * rank + j) as f64 * 0.7 + 0.3).cos())
        })?;
        let b = try_matrix("the rank x d_out LoRA factor b", rank, d_out, |_, _| {
            T::zero()
        })?;
        Ok(LoraLinear { w, a, b, alpha })
    }

    /// The frozen base weight `W`, d_in x d_out.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::lora::LoraLinear;
    /// # use nalgebra::DMatrix;
    /// let layer = LoraLinear::new(DMatrix::<f64>::identity(3, 2), 1, 1.0)?;
    /// assert_eq!(layer.w(), &DMatrix::identity(3, 2));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn w(&self) -> &DMatrix<T> {
        &self.w
    }

    /// The down projection `A`, d_in x r.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::lora::LoraLinear;
    /// # use nalgebra::DMatrix;
    /// assert_eq!(LoraLinear::new(DMatrix::<f64>::zeros(3, 2), 4, 1.0)?.a().shape(), (3, 4));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn a(&self) -> &DMatrix<T> {
        &self.a
    }

    /// The up projection `B`, r x d_out (zero after [`new`](Self::new)).
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::lora::LoraLinear;
    /// # use nalgebra::DMatrix;
    /// let layer = LoraLinear::new(DMatrix::<f64>::zeros(3, 2), 4, 1.0)?;
    /// assert_eq!(layer.b(), &DMatrix::zeros(4, 2));
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn b(&self) -> &DMatrix<T> {
        &self.b
    }

    /// The scaling numerator α.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::lora::LoraLinear;
    /// # use nalgebra::DMatrix;
    /// assert_eq!(LoraLinear::new(DMatrix::<f64>::zeros(3, 2), 4, 8.0)?.alpha(), 8.0);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn alpha(&self) -> T {
        self.alpha
    }

    /// The entries of `A` for editing in place; the view's shape is fixed, so `A` stays
    /// d_in x r. See [`LoraLinear`] for an example.
    pub fn a_mut(&mut self) -> DMatrixViewMut<'_, T> {
        self.a.as_view_mut()
    }

    /// The entries of `B` for editing in place; the view's shape is fixed, so `B` stays
    /// r x d_out. See [`LoraLinear`] for an example.
    pub fn b_mut(&mut self) -> DMatrixViewMut<'_, T> {
        self.b.as_view_mut()
    }

    /// Replaces `A` (say, with trained values).
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] unless `a` is d_in x r; the layer is then unchanged.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::lora::LoraLinear;
    /// # use nalgebra::DMatrix;
    /// let mut layer = LoraLinear::new(DMatrix::<f64>::zeros(3, 2), 1, 1.0)?;
    /// layer.set_a(DMatrix::from_element(3, 1, 0.5))?;
    /// assert_eq!(layer.a()[(2, 0)], 0.5);
    /// let err = layer.set_a(DMatrix::zeros(3, 2)).unwrap_err();
    /// assert_eq!(err.to_string(), "a is 3 x 2 but must be 3 x 1");
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn set_a(&mut self, a: DMatrix<T>) -> Result<()> {
        let expected = self.a.shape();
        if a.shape() != expected {
            return Err(Error::ShapeMismatch {
                arg: "a",
                found: a.shape(),
                expected,
            });
        }
        self.a = a;
        Ok(())
    }

    /// Replaces `B` (say, with trained values).
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] unless `b` is r x d_out; the layer is then unchanged.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::lora::LoraLinear;
    /// # use nalgebra::DMatrix;
    /// let mut layer = LoraLinear::new(DMatrix::<f64>::zeros(3, 2), 1, 1.0)?;
    /// assert!(layer.set_b(DMatrix::zeros(2, 2)).is_err());
    /// layer.set_b(DMatrix::from_element(1, 2, 1.0))?;
    /// assert_eq!(layer.merged(), layer.a() * layer.b());
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn set_b(&mut self, b: DMatrix<T>) -> Result<()> {
        let expected = self.b.shape();
        if b.shape() != expected {
            return Err(Error::ShapeMismatch {
                arg: "b",
                found: b.shape(),
                expected,
            });
        }
        self.b = b;
        Ok(())
    }

    /// The rank r.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::lora::LoraLinear;
    /// # use nalgebra::DMatrix;
    /// assert_eq!(LoraLinear::new(DMatrix::<f64>::zeros(3, 3), 2, 1.0)?.rank(), 2);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn rank(&self) -> usize {
        self.a.ncols()
    }

    /// The factor α / r applied to the update.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::lora::LoraLinear;
    /// # use nalgebra::DMatrix;
    /// assert_eq!(LoraLinear::new(DMatrix::<f64>::zeros(3, 3), 2, 1.0)?.scaling(), 0.5);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn scaling(&self) -> T {
        self.alpha / T::of_usize(self.rank())
    }

    /// `y = x W + (α/r) (x A) B` for `x` (n x d_in), computed without forming `A B`.
    ///
    /// NaN or infinite entries propagate to the output rows they reach. Accuracy: that of
    /// the matrix products (a relative `(d_in + r + 2) · ε` of `|x| (|W| + (α/r) |A| |B|)`),
    /// plus, where `x A` or `(x A) B` falls in the subnormal range (tiny entries), the
    /// rounding there carried by the scaling: an absolute `(α/r) (Σ_k |B_kj| + r)` times half
    /// the subnormal spacing (2^−150 in f32, 2^−1075 in f64), which a huge α/r can make
    /// visible. (The products come before the scaling so that a huge α/r never meets a zero
    /// factor as `inf · 0`.) `x · merged()` forms `(α/r) A B` first and has no such term.
    ///
    /// # Errors
    ///
    /// - [`Error::DimensionMismatch`] if `x` does not have d_in columns;
    /// - [`Error::TooLarge`] if the n x r intermediate `x A` or the n x d_out output cannot be
    ///   allocated.
    ///
    /// # Examples
    ///
    /// See [`LoraLinear`].
    pub fn forward<'x>(&self, x: impl Into<DMatrixView<'x, T>>) -> Result<DMatrix<T>> {
        let x = x.into();
        check_inner("x", x.ncols(), "w", Axis::Rows, self.w.nrows())?;
        let mut xa = product("the n x rank LoRA intermediate x a", &x, &self.a.as_view())?;
        let y = product("the n x d_out LoRA output", &x, &self.w.as_view())?;
        // An entry of x A past the range (B may still make the update finite, or 0) is
        // recomputed at a power-of-two scale.
        let rescued = rescue_overflow(&x, &self.a.as_view(), &mut xa);
        // (x A) B first, then the scaling: a huge α/r must not meet a zero B as inf · 0
        // (the product then overflows only if the update itself does).
        let mut xab = product(
            "the n x d_out LoRA update",
            &xa.as_view(),
            &self.b.as_view(),
        )?;
        // And entries of (x A) B past the range that a tiny α/r brings back (recomputed at a
        // power-of-two scale, then scaled by α/r before the scale comes out).
        let again = rescue_overflow(&xa.as_view(), &self.b.as_view(), &mut xab);
        let s = self.scaling();
        let mut y = y + xab * s;
        add_rescued(&mut y, &rescued, &self.b, s, |z| z);
        add_scaled_back(&mut y, &again, s);
        Ok(y)
    }

    /// The merged weight `W + (α/r) A B` (d_in x d_out): one matmul at inference.
    ///
    /// # Examples
    ///
    /// See [`LoraLinear`].
    pub fn merged(&self) -> DMatrix<T> {
        &self.w + self.update()
    }

    /// The update `(α/r) A B`: A B first, then the scaling, as in `forward` (a huge α/r must
    /// not meet a zero B as inf · 0), with entries of A B past the range that a tiny α/r
    /// brings back recomputed at a power-of-two scale.
    fn update(&self) -> DMatrix<T> {
        let mut ab = &self.a * &self.b;
        let again = rescue_overflow(&self.a.as_view(), &self.b.as_view(), &mut ab);
        let s = self.scaling();
        let mut update = ab * s;
        add_scaled_back(&mut update, &again, s);
        update
    }

    /// Recovers the base weight from a merged one: `W' − (α/r) A B`.
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] if `merged` is not d_in x d_out.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lora::LoraLinear;
    /// use nalgebra::DMatrix;
    ///
    /// let mut layer = LoraLinear::new(DMatrix::<f64>::identity(3, 3), 1, 2.0)?;
    /// layer.b_mut().fill(0.25);
    /// let back = layer.unmerge(&layer.merged())?;
    /// assert!((back - layer.w()).amax() < 1e-15);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn unmerge(&self, merged: &DMatrix<T>) -> Result<DMatrix<T>> {
        if merged.shape() != self.w.shape() {
            return Err(Error::ShapeMismatch {
                arg: "merged",
                found: merged.shape(),
                expected: self.w.shape(),
            });
        }
        // The same update as `merged` (a gemm with the scaling as its α may scale A first:
        // inf · 0 = NaN for a huge α/r and a zero B).
        Ok(merged - self.update())
    }

    /// The gradients of a loss `L` through [`forward`](Self::forward), given `d_y = ∂L/∂y`
    /// (n x d_out) at the input `x` (n x d_in), for `y = x W + s (x A) B` with `s = α/r`:
    ///
    /// ```text
    /// ∂L/∂B = s (x A)ᵀ d_y         r x d_out
    /// ∂L/∂A = s xᵀ (d_y Bᵀ)        d_in x r
    /// ∂L/∂x = d_y Wᵀ + s (d_y Bᵀ) Aᵀ   n x d_in
    /// ```
    ///
    /// `W` is frozen, so it has no gradient. The products are formed first and scaled after
    /// (as in `forward`: a huge `α/r` meets a zero factor as 0, not `inf · 0`); entries of
    /// `x A`, `d_y Bᵀ` and of the products past the range, which a tiny `α/r` may bring back,
    /// are recomputed at a power-of-two scale (as in `forward`), so a gradient is finite
    /// wherever its exact value is; and the
    /// n x r intermediates `x A` and `d_y Bᵀ` are computed once; `A B` is never formed. With
    /// `B = 0`, as after [`new`](Self::new), `∂L/∂A` is exactly 0 and only `B` learns at the
    /// first step. NaN or infinite entries propagate to the gradients they reach.
    ///
    /// # Errors
    ///
    /// - [`Error::DimensionMismatch`] if `x` does not have d_in columns;
    /// - [`Error::ShapeMismatch`] unless `d_y` is n x d_out;
    /// - [`Error::TooLarge`] if an intermediate (n x r) or a gradient cannot be allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lora::LoraLinear;
    /// use nalgebra::{dmatrix, DMatrix};
    ///
    /// let mut layer = LoraLinear::new(DMatrix::<f64>::identity(2, 2), 1, 2.0)?; // s = 2
    /// layer.set_a(dmatrix![1.0; 0.5])?;
    /// layer.set_b(dmatrix![0.0, 3.0])?;
    /// let x = dmatrix![1.0, 2.0];
    /// let d_y = dmatrix![1.0, -1.0]; // L = y_0 − y_1
    /// let g = layer.backward(&x, &d_y)?;
    /// // x A = 2, so ∂L/∂B = 2 · 2 · (1, −1); d_y Bᵀ = −3, so ∂L/∂A = 2 · xᵀ · −3.
    /// assert_eq!(g.d_b, dmatrix![4.0, -4.0]);
    /// assert_eq!(g.d_a, dmatrix![-6.0; -12.0]);
    /// // ∂L/∂x = d_y Wᵀ + 2 · −3 · Aᵀ = (1, −1) + (−6, −3).
    /// assert_eq!(g.d_x, dmatrix![-5.0, -4.0]);
    /// // Shapes are checked.
    /// assert!(layer.backward(&x, &DMatrix::zeros(1, 3)).is_err());
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn backward<'x, 'g>(
        &self,
        x: impl Into<DMatrixView<'x, T>>,
        d_y: impl Into<DMatrixView<'g, T>>,
    ) -> Result<LoraGrads<T>> {
        let (x, d_y) = (x.into(), d_y.into());
        check_inner("x", x.ncols(), "w", Axis::Rows, self.w.nrows())?;
        check_shape("d_y", d_y.shape(), (x.nrows(), self.w.ncols()))?;
        let s = self.scaling();
        let mut xa = product("the n x rank LoRA intermediate x a", &x, &self.a.as_view())?;
        // Entries of x A past the range are recomputed at a power-of-two scale, as in
        // `forward`, so d_b is finite wherever its exact value is.
        let rescued = rescue_overflow(&x, &self.a.as_view(), &mut xa);
        let (bt, at) = (self.b.transpose(), self.a.transpose());
        let mut g = product_nt("the n x rank LoRA intermediate d_y bᵀ", &d_y, &self.b)?;
        let g_rescued = rescue_overflow(&d_y, &bt.as_view(), &mut g);
        // Every product is formed before the scaling (a huge α/r must not meet a zero
        // factor as inf · 0); entries past the range that a tiny α/r brings back are
        // recomputed at a power-of-two scale and scaled back after (as in `forward`).
        let scaled = |a: &DMatrixView<'_, T>, b: &DMatrixView<'_, T>, mut p: DMatrix<T>| {
            let again = rescue_overflow(a, b, &mut p);
            let mut p = p * s;
            add_scaled_back(&mut p, &again, s);
            p
        };
        let xat = xa.transpose();
        let d_b = product_tn("the rank x d_out LoRA gradient d_b", &xa.as_view(), &d_y)?;
        let mut d_b = scaled(&xat.as_view(), &d_y, d_b);
        add_rescued_tn(&mut d_b, &rescued, &d_y, s, |z| z);
        let xt = x.transpose();
        let d_a = product_tn("the d_in x rank LoRA gradient d_a", &x, &g.as_view())?;
        let mut d_a = scaled(&xt.as_view(), &g.as_view(), d_a).transpose();
        add_rescued_tn(&mut d_a, &g_rescued, &x, s, |z| z);
        let d_a = d_a.transpose();
        let mut d_x = product_nt("the n x d_in LoRA gradient d_x", &d_y, &self.w)?;
        let update = product_nt("the n x d_in LoRA update of d_x", &g.as_view(), &self.a)?;
        d_x += scaled(&g.as_view(), &at.as_view(), update);
        add_rescued(&mut d_x, &g_rescued, &at, s, |z| z);
        Ok(LoraGrads { d_a, d_b, d_x })
    }

    /// Parameters full fine-tuning would train in this layer: `d_in · d_out`, the entries of
    /// `W`. See [`lora_parameter_ratio`] for the ratio at a given shape.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::lora::LoraLinear;
    /// # use nalgebra::DMatrix;
    /// let layer = LoraLinear::new(DMatrix::<f32>::zeros(64, 32), 4, 8.0)?;
    /// assert_eq!(layer.full_fine_tuning_parameters(), 2048);
    /// assert_eq!(layer.trainable_parameters(), 4 * (64 + 32)); // 384: 18.75%
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn full_fine_tuning_parameters(&self) -> usize {
        self.w.len()
    }

    /// Parameters LoRA trains: `r (d_in + d_out)`, against `d_in · d_out` for full fine-tuning.
    ///
    /// # Examples
    ///
    /// ```
    /// # use attention_math::sheet::lora::LoraLinear;
    /// # use nalgebra::DMatrix;
    /// let layer = LoraLinear::new(DMatrix::<f32>::zeros(4096, 4096), 8, 16.0)?;
    /// assert_eq!(layer.trainable_parameters(), 65_536); // 0.4% of 16.8M
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn trainable_parameters(&self) -> usize {
        // Both factors are allocated, so each count is below isize::MAX.
        self.a.len() + self.b.len()
    }
}

/// The gradients of a loss with respect to LoRA's trainable factors and to the layer's
/// input; made by [`LoraLinear::backward`] (see there for the formulas and the errors).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::lora::LoraLinear;
/// use nalgebra::DMatrix;
///
/// let layer = LoraLinear::new(DMatrix::<f64>::identity(4, 3), 2, 4.0)?;
/// let x = DMatrix::from_fn(5, 4, |i, j| (i as f64) - (j as f64));
/// let g = layer.backward(&x, &DMatrix::from_element(5, 3, 1.0))?;
/// // Shaped like A (d_in x r), B (r x d_out) and x (n x d_in).
/// assert_eq!((g.d_a.shape(), g.d_b.shape(), g.d_x.shape()), ((4, 2), (2, 3), (5, 4)));
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LoraGrads<T: Float> {
    /// `∂L/∂A = (α/r) xᵀ (∂L/∂y) Bᵀ`, d_in x r.
    pub d_a: DMatrix<T>,
    /// `∂L/∂B = (α/r) (x A)ᵀ ∂L/∂y`, r x d_out.
    pub d_b: DMatrix<T>,
    /// `∂L/∂x = (∂L/∂y) Wᵀ + (α/r) (∂L/∂y) Bᵀ Aᵀ`, n x d_in.
    pub d_x: DMatrix<T>,
}

/// LoRA's trainable parameters as a fraction of full fine-tuning's for a `d_in x d_out`
/// weight at rank `rank`:
///
/// ```text
/// r (d_in + d_out) / (d_in · d_out) = r / d_out + r / d_in
/// ```
///
/// computed in `f64` in the second form, which cannot overflow. It needs no matrix, so it
/// works for real layer shapes without allocating them. (A rank above `min(d_in, d_out)`
/// is allowed, though pointless: the ratio may then exceed 1.)
///
/// # Errors
///
/// [`Error::InvalidParameter`] if `rank`, `d_in` or `d_out` is 0 (full fine-tuning of an
/// empty layer trains nothing, so there is no ratio).
///
/// # Examples
///
/// Llama-2-7B's attention projections are 4096 x 4096 (`q_proj`, `k_proj`, `v_proj`,
/// `o_proj`, in each of its 32 layers); at rank 8 LoRA trains `8 · (4096 + 4096) = 65,536`
/// parameters of `q_proj` instead of 16,777,216:
///
/// ```
/// use attention_math::sheet::lora::lora_parameter_ratio;
///
/// let ratio = lora_parameter_ratio(4096, 4096, 8)?;
/// assert_eq!(ratio, 65_536.0 / 16_777_216.0); // 2^-8 exactly
/// assert_eq!(format!("{:.2}%", 100.0 * ratio), "0.39%");
/// assert!(lora_parameter_ratio(4096, 0, 8).is_err());
/// # Ok::<(), attention_math::Error>(())
/// ```
pub fn lora_parameter_ratio(d_in: usize, d_out: usize, rank: usize) -> Result<f64> {
    for (name, value) in [("rank", rank), ("d_in", d_in), ("d_out", d_out)] {
        if value == 0 {
            return Err(Error::InvalidParameter {
                name,
                value: 0.0,
                requirement: "must be >= 1",
            });
        }
    }
    let r = rank as f64;
    Ok(r / d_out as f64 + r / d_in as f64)
}

/// The gradients of a loss through a [`BottleneckAdapter`]; made by
/// [`BottleneckAdapter::backward`] (see there for the formulas and the errors).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::lora::BottleneckAdapter;
/// use nalgebra::DMatrix;
///
/// let adapter = BottleneckAdapter::new(DMatrix::<f64>::zeros(6, 2), DMatrix::zeros(2, 6))?;
/// let g = adapter.backward(&DMatrix::zeros(3, 6), &DMatrix::from_element(3, 6, 1.0))?;
/// // Shaped like W_down (d x r), W_up (r x d) and x (n x d); with every hidden unit
/// // closed only the residual path carries the gradient.
/// assert_eq!((g.d_down.shape(), g.d_up.shape()), ((6, 2), (2, 6)));
/// assert_eq!(g.d_x, DMatrix::from_element(3, 6, 1.0));
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterGrads<T: Float> {
    /// `∂L/∂W_down = xᵀ G`, d x r, with `G = ((∂L/∂y) W_upᵀ) ⊙ relu'(x W_down)`.
    pub d_down: DMatrix<T>,
    /// `∂L/∂W_up = relu(x W_down)ᵀ ∂L/∂y`, r x d.
    pub d_up: DMatrix<T>,
    /// `∂L/∂x = ∂L/∂y + G W_downᵀ`, n x d (the first term is the residual path).
    pub d_x: DMatrix<T>,
}

/// A bottleneck adapter `y = x + relu(x W_down) W_up`; see the [module docs](self).
///
/// # Examples
///
/// ```
/// use attention_math::sheet::lora::BottleneckAdapter;
/// use nalgebra::{dmatrix, DMatrix};
///
/// let adapter = BottleneckAdapter::new(dmatrix![1.0_f64; -1.0], dmatrix![2.0_f64, 0.0])?;
/// let x = dmatrix![3.0_f64, 1.0; 1.0, 3.0];
/// // Row 0: relu(3 - 1) = 2, so y = x + (4, 0); row 1: relu(-2) = 0, y = x.
/// assert_eq!(adapter.forward(&x)?, dmatrix![7.0, 1.0; 1.0, 3.0]);
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct BottleneckAdapter<T: Float> {
    down: DMatrix<T>,
    up: DMatrix<T>,
}

impl<T: Float> BottleneckAdapter<T> {
    /// An adapter from `down` (d x r) and `up` (r x d).
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] unless `up` is r x d for `down` of shape d x r.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lora::BottleneckAdapter;
    /// use nalgebra::DMatrix;
    ///
    /// assert!(BottleneckAdapter::new(DMatrix::<f64>::zeros(4, 2), DMatrix::zeros(2, 3)).is_err());
    /// ```
    pub fn new(down: DMatrix<T>, up: DMatrix<T>) -> Result<Self> {
        let (d, r) = down.shape();
        if up.shape() != (r, d) {
            return Err(Error::ShapeMismatch {
                arg: "up",
                found: up.shape(),
                expected: (r, d),
            });
        }
        Ok(BottleneckAdapter { down, up })
    }

    /// `x + relu(x W_down) W_up` for `x` (n x d).
    ///
    /// NaN propagates: a NaN hidden activation stays NaN through the relu (a plain
    /// `max(h, 0)` would turn it into 0). A hidden activation that overflows `T` although
    /// its inputs are finite is recomputed at a power-of-two scale, so the output is finite
    /// wherever the exact result is.
    ///
    /// # Errors
    ///
    /// - [`Error::DimensionMismatch`] if `x` does not have d columns;
    /// - [`Error::TooLarge`] if the n x r hidden activations cannot be allocated.
    ///
    /// # Examples
    ///
    /// See [`BottleneckAdapter`].
    pub fn forward<'x>(&self, x: impl Into<DMatrixView<'x, T>>) -> Result<DMatrix<T>> {
        let x = x.into();
        check_inner("x", x.ncols(), "down", Axis::Rows, self.down.nrows())?;
        let mut hidden = product("the n x r adapter hidden layer", &x, &self.down.as_view())?;
        // Hidden entries that overflowed although their inputs are finite: recomputed at a
        // power-of-two scale (relu is positively homogeneous), so a finite output is not lost
        // to an intermediate inf (or NaN from inf · 0).
        let rescued = rescue_overflow(&x, &self.down.as_view(), &mut hidden);
        hidden.apply(|h| {
            if *h < T::zero() {
                *h = T::zero();
            }
        });
        let mut y = x.clone_owned();
        y.gemm(T::one(), &hidden, &self.up, T::one());
        let relu = |z: T| if z > T::zero() { z } else { T::zero() };
        add_rescued(&mut y, &rescued, &self.up, T::one(), relu);
        Ok(y)
    }

    /// The gradients of a loss `L` through [`forward`](Self::forward), given `d_y = ∂L/∂y`
    /// (n x d) at the input `x` (n x d), for `y = x + relu(H) W_up` with `H = x W_down`:
    ///
    /// ```text
    /// G         = (d_y W_upᵀ) ⊙ relu'(H)       n x r,  relu'(h) = 1 if h > 0, else 0
    /// ∂L/∂W_up   = relu(H)ᵀ d_y                r x d
    /// ∂L/∂W_down = xᵀ G                        d x r
    /// ∂L/∂x      = d_y + G W_downᵀ              n x d
    /// ```
    ///
    /// `relu'(0) = 0`, as in PyTorch. A NaN hidden activation gives a NaN entry of `G`
    /// (PyTorch would pass the gradient through it), so NaN in `x` or `W_down` reaches every
    /// gradient it touches instead of being dropped at the relu. Hidden activations that
    /// overflow although their inputs are finite are recomputed at a power-of-two scale, as
    /// in `forward`, so `∂L/∂W_up` is finite wherever its exact value is.
    ///
    /// # Errors
    ///
    /// - [`Error::DimensionMismatch`] if `x` does not have d columns;
    /// - [`Error::ShapeMismatch`] unless `d_y` is n x d;
    /// - [`Error::TooLarge`] if the n x r hidden layer or its gradient cannot be allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lora::BottleneckAdapter;
    /// use nalgebra::dmatrix;
    ///
    /// let adapter = BottleneckAdapter::new(dmatrix![1.0_f64; -1.0], dmatrix![2.0_f64, 0.0])?;
    /// // Row 0: h = 2 > 0, the bottleneck is open; row 1: h = −2, it is closed.
    /// let x = dmatrix![3.0_f64, 1.0; 1.0, 3.0];
    /// let d_y = dmatrix![1.0_f64, 1.0; 1.0, 1.0];
    /// let g = adapter.backward(&x, &d_y)?;
    /// // G = (d_y W_upᵀ) ⊙ relu'(h) = (2, 0)ᵀ.
    /// assert_eq!(g.d_up, dmatrix![2.0, 2.0]); // relu(h)ᵀ d_y = 2 · (1, 1)
    /// assert_eq!(g.d_down, dmatrix![6.0; 2.0]); // xᵀ G = 2 · (3, 1)ᵀ
    /// assert_eq!(g.d_x, dmatrix![3.0, -1.0; 1.0, 1.0]); // d_y + G W_downᵀ
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn backward<'x, 'g>(
        &self,
        x: impl Into<DMatrixView<'x, T>>,
        d_y: impl Into<DMatrixView<'g, T>>,
    ) -> Result<AdapterGrads<T>> {
        let (x, d_y) = (x.into(), d_y.into());
        check_inner("x", x.ncols(), "down", Axis::Rows, self.down.nrows())?;
        check_shape("d_y", d_y.shape(), (x.nrows(), self.down.nrows()))?;
        let mut hidden = product("the n x r adapter hidden layer", &x, &self.down.as_view())?;
        // Overflowed hidden entries, recomputed at a power-of-two scale as in `forward`; they
        // hold 0 in `hidden`, and their sign is their z's.
        let rescued = rescue_overflow(&x, &self.down.as_view(), &mut hidden);
        hidden.apply(|h| {
            if *h < T::zero() {
                *h = T::zero();
            }
        });
        let mut d_up = product_tn("the r x d adapter gradient d_up", &hidden.as_view(), &d_y)?;
        let relu = |z: T| if z > T::zero() { z } else { T::zero() };
        add_rescued_tn(&mut d_up, &rescued, &d_y, T::one(), relu);
        // G = (d_y W_upᵀ) ⊙ relu'(H), by selection (no 0 · inf): kept where h > 0, NaN
        // where h is NaN, 0 elsewhere.
        let mut grad_h = product_nt("the n x r adapter hidden gradient", &d_y, &self.up)?;
        let open: Vec<(usize, usize, T)> = rescued
            .entries
            .iter()
            .filter(|(_, _, z)| *z > T::zero())
            .map(|&(i, k, _)| (i, k, grad_h[(i, k)]))
            .collect();
        grad_h.zip_apply(&hidden, |g, a| {
            if a.is_nan_value() {
                *g = T::NAN;
            } else if a <= T::zero() {
                *g = T::zero();
            }
        });
        for (i, k, g) in open {
            grad_h[(i, k)] = g;
        }
        let d_down = product_tn("the d x r adapter gradient d_down", &x, &grad_h.as_view())?;
        let mut d_x = product_nt(
            "the n x d adapter gradient d_x",
            &grad_h.as_view(),
            &self.down,
        )?;
        d_x += d_y;
        Ok(AdapterGrads { d_down, d_up, d_x })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: f64 = 1e-6;

    /// A deterministic r x c matrix with entries in [-scale, scale].
    fn fill(rows: usize, cols: usize, seed: f64, scale: f64) -> DMatrix<f64> {
        DMatrix::from_fn(rows, cols, |i, j| {
            scale * (((i * cols + j) as f64 + 1.0) * 0.917 + seed).sin()
        })
    }

    /// `analytic` agrees with the central difference `numeric` to a relative 1e-6 of the
    /// largest entry of the gradient it belongs to.
    fn assert_grad(analytic: f64, numeric: f64, scale: f64, what: &str) {
        assert!(
            (analytic - numeric).abs() <= 1e-6 * scale.max(1e-3),
            "{what}: analytic {analytic:e} vs finite difference {numeric:e}"
        );
    }

    /// Checks every entry of `grad` against central differences of `loss` in the entries
    /// of `at`, each perturbed through `set`.
    fn check_entries(
        grad: &DMatrix<f64>,
        at: &DMatrix<f64>,
        loss: impl Fn(&DMatrix<f64>) -> f64,
        what: &str,
    ) {
        assert_eq!(grad.shape(), at.shape(), "{what}");
        let scale = grad.amax();
        for i in 0..at.nrows() {
            for j in 0..at.ncols() {
                let mut plus = at.clone();
                plus[(i, j)] += H;
                let mut minus = at.clone();
                minus[(i, j)] -= H;
                let numeric = (loss(&plus) - loss(&minus)) / (2.0 * H);
                assert_grad(grad[(i, j)], numeric, scale, &format!("{what}[({i}, {j})]"));
            }
        }
    }

    /// A LoRA layer with every factor non-zero.
    fn lora_layer(d_in: usize, d_out: usize, rank: usize, alpha: f64) -> LoraLinear<f64> {
        let mut layer = LoraLinear::new(fill(d_in, d_out, 0.1, 1.0), rank, alpha).unwrap();
        layer.set_a(fill(d_in, rank, 1.7, 0.8)).unwrap();
        layer.set_b(fill(rank, d_out, 2.3, 0.6)).unwrap();
        layer
    }

    #[test]
    fn lora_backward_matches_finite_differences() {
        // Small shapes (nalgebra's own loops) and shapes above 5 (matrixmultiply, which
        // reads the transposed views through their strides).
        for (n, d_in, d_out, rank, alpha) in [(3, 4, 5, 2, 3.0), (7, 8, 9, 6, 12.0)] {
            let layer = lora_layer(d_in, d_out, rank, alpha);
            let x = fill(n, d_in, 0.4, 1.5);
            let d_y = fill(n, d_out, 3.1, 1.0);
            // L = Σ y ⊙ d_y, so ∂L/∂y = d_y.
            let loss_of = |layer: &LoraLinear<f64>, x: &DMatrix<f64>| {
                layer.forward(x).unwrap().component_mul(&d_y).sum()
            };
            let g = layer.backward(&x, &d_y).unwrap();
            check_entries(
                &g.d_a,
                layer.a(),
                |a| {
                    let mut l = layer.clone();
                    l.set_a(a.clone()).unwrap();
                    loss_of(&l, &x)
                },
                "d_a",
            );
            check_entries(
                &g.d_b,
                layer.b(),
                |b| {
                    let mut l = layer.clone();
                    l.set_b(b.clone()).unwrap();
                    loss_of(&l, &x)
                },
                "d_b",
            );
            check_entries(&g.d_x, &x, |x| loss_of(&layer, x), "d_x");
            // And against the textbook formulas with nalgebra's own transposes.
            let s = layer.scaling();
            let (w, a, b) = (layer.w(), layer.a(), layer.b());
            let d_b = (&x * a).transpose() * &d_y * s;
            let d_a = x.transpose() * (&d_y * b.transpose()) * s;
            let d_x = &d_y * w.transpose() + (&d_y * b.transpose()) * a.transpose() * s;
            assert!((&g.d_b - d_b).amax() < 1e-12);
            assert!((&g.d_a - d_a).amax() < 1e-12);
            assert!((&g.d_x - d_x).amax() < 1e-12);
        }
    }

    #[test]
    fn lora_backward_at_initialisation_trains_only_b() {
        // B = 0 (as after `new`) with a huge α/r: ∂L/∂A is exactly 0, not inf · 0 = NaN,
        // and ∂L/∂x is the base layer's d_y Wᵀ.
        let w = fill(4, 3, 0.2, 1.0);
        let layer = LoraLinear::new(w.clone(), 1, 1e300).unwrap();
        let x = fill(2, 4, 0.9, 1.0);
        let d_y = fill(2, 3, 1.3, 1e-10);
        let g = layer.backward(&x, &d_y).unwrap();
        assert_eq!(g.d_a, DMatrix::zeros(4, 1));
        assert_eq!(g.d_x, &d_y * w.transpose());
        assert!(g.d_b.iter().all(|v| v.is_finite() && *v != 0.0));
    }

    /// An entry of x A past f32's range (as the forward's fuzz find): d_b = s (x A)ᵀ d_y is
    /// finite, because the entry is recomputed at a power-of-two scale as in `forward`.
    #[test]
    fn lora_backward_survives_an_overflowing_x_a() {
        let mut layer = LoraLinear::new(DMatrix::<f32>::zeros(2, 2), 1, 0.5).unwrap();
        layer
            .set_a(DMatrix::from_column_slice(2, 1, &[-3.4e38, 1.0]))
            .unwrap();
        layer
            .set_b(DMatrix::from_row_slice(1, 2, &[1e-3, -2.0]))
            .unwrap();
        let x = DMatrix::from_row_slice(1, 2, &[-7.0_f32, 0.5]);
        let d_y = DMatrix::from_row_slice(1, 2, &[1e-5_f32, -3e-6]);
        let g = layer.backward(&x, &d_y).unwrap();
        // x A = 7 · 3.4e38 + 0.5 = 2.38e39, s = 0.5.
        let xa = 7.0 * f64::from(3.4e38_f32) + 0.5;
        for j in 0..2 {
            let want = 0.5 * xa * f64::from(d_y[(0, j)]);
            let got = f64::from(g.d_b[(0, j)]);
            assert!(
                (got / want - 1.0).abs() < 1e-5,
                "d_b[{j}] = {got} vs {want}"
            );
        }
        assert!(g.d_a.iter().chain(g.d_x.iter()).all(|v| v.is_finite()));
    }

    #[test]
    fn lora_backward_checks_shapes_and_propagates_nan() {
        let layer = lora_layer(5, 3, 2, 4.0);
        let x = fill(4, 5, 0.0, 1.0);
        let e = layer
            .backward(&DMatrix::<f64>::zeros(4, 4), &DMatrix::zeros(4, 3))
            .unwrap_err();
        assert_eq!(e.to_string(), "x has 4 columns but w has 5 rows");
        let e = layer.backward(&x, &DMatrix::zeros(4, 2)).unwrap_err();
        assert_eq!(
            e,
            Error::ShapeMismatch {
                arg: "d_y",
                found: (4, 2),
                expected: (4, 3)
            }
        );
        // NaN at x[(1, 2)]: every entry of d_b (each sums over the rows of x A) and row 2
        // of d_a are NaN; d_x does not depend on x and stays finite.
        let mut bad = x.clone();
        bad[(1, 2)] = f64::NAN;
        let g = layer.backward(&bad, &fill(4, 3, 0.5, 1.0)).unwrap();
        assert!(g.d_b.iter().all(|v| v.is_nan()));
        for c in 0..5 {
            assert_eq!(g.d_a.row(c).iter().all(|v| v.is_nan()), c == 2, "row {c}");
            assert!(c == 2 || g.d_a.row(c).iter().all(|v| v.is_finite()));
        }
        assert!(g.d_x.iter().all(|v| v.is_finite()));
        let mut bad_dy = fill(4, 3, 0.5, 1.0);
        bad_dy[(3, 0)] = f64::NAN;
        let g = layer.backward(&x, &bad_dy).unwrap();
        assert!(g.d_x.row(3).iter().all(|v| v.is_nan()));
        assert!(g.d_x.row(0).iter().all(|v| v.is_finite()));
        assert!(g.d_b.column(0).iter().all(|v| v.is_nan()));
        // Empty batch: zero gradients of the right shapes.
        let g = layer
            .backward(&DMatrix::<f64>::zeros(0, 5), &DMatrix::zeros(0, 3))
            .unwrap();
        assert_eq!(
            (g.d_a, g.d_b, g.d_x.shape()),
            (DMatrix::zeros(5, 2), DMatrix::zeros(2, 3), (0, 5))
        );
        // Sizes whose intermediates cannot be allocated are errors, not panics.
        let tiny = LoraLinear::new(DMatrix::<f32>::zeros(0, 0), 1 << 32, 1.0).unwrap();
        let x = DMatrix::<f32>::zeros(1 << 32, 0);
        assert!(matches!(
            tiny.backward(&x, &x),
            Err(Error::TooLarge {
                what: "the n x rank LoRA intermediate x a",
                ..
            })
        ));
    }

    #[test]
    fn parameter_ratio_for_real_shapes() {
        // Llama-2-7B's q_proj, 4096 x 4096 at rank 8: 65,536 of 16,777,216, 0.39%.
        let ratio = lora_parameter_ratio(4096, 4096, 8).unwrap();
        assert_eq!(ratio, 65_536.0 / 16_777_216.0);
        assert!((100.0 * ratio - 0.390625).abs() < 1e-15);
        // Its MLP up projection, 4096 x 11008 at rank 16.
        let ratio = lora_parameter_ratio(4096, 11008, 16).unwrap();
        let want = (16 * (4096 + 11008)) as f64 / (4096 * 11008) as f64;
        assert!((ratio - want).abs() < 1e-16);
        // The layer's own counts agree with the ratio.
        let layer = LoraLinear::new(DMatrix::<f32>::zeros(48, 20), 3, 1.0).unwrap();
        assert_eq!(layer.full_fine_tuning_parameters(), 960);
        let counts = layer.trainable_parameters() as f64 / 960.0;
        assert!((lora_parameter_ratio(48, 20, 3).unwrap() - counts).abs() < 1e-16);
        // Dimensions near usize::MAX do not overflow.
        let huge = lora_parameter_ratio(usize::MAX, usize::MAX, usize::MAX).unwrap();
        assert_eq!(huge, 2.0);
        for (d_in, d_out, rank, name) in [(0, 4, 1, "d_in"), (4, 0, 1, "d_out"), (4, 4, 0, "rank")]
        {
            assert_eq!(
                lora_parameter_ratio(d_in, d_out, rank),
                Err(Error::InvalidParameter {
                    name,
                    value: 0.0,
                    requirement: "must be >= 1"
                })
            );
        }
    }

    /// An adapter whose hidden pre-activations on `x` are all at least 1e-2 away from the
    /// relu's kink, so central differences with h = 1e-6 see a smooth function.
    fn adapter_case(n: usize, d: usize, r: usize) -> (BottleneckAdapter<f64>, DMatrix<f64>) {
        let down = fill(d, r, 0.6, 1.0);
        let up = fill(r, d, 1.9, 0.7);
        let x = fill(n, d, 2.6, 1.2);
        let h = &x * &down;
        assert!(h.iter().all(|v| v.abs() > 1e-2), "pick another fill: {h}");
        assert!(h.iter().any(|v| *v > 0.0) && h.iter().any(|v| *v < 0.0));
        (BottleneckAdapter::new(down, up).unwrap(), x)
    }

    #[test]
    fn adapter_backward_matches_finite_differences() {
        for (n, d, r) in [(5, 4, 3), (7, 8, 6)] {
            let (adapter, x) = adapter_case(n, d, r);
            let d_y = fill(n, d, 0.8, 1.0);
            let loss_of = |a: &BottleneckAdapter<f64>, x: &DMatrix<f64>| {
                a.forward(x).unwrap().component_mul(&d_y).sum()
            };
            let g = adapter.backward(&x, &d_y).unwrap();
            check_entries(
                &g.d_down,
                &adapter.down,
                |down| {
                    let a = BottleneckAdapter::new(down.clone(), adapter.up.clone()).unwrap();
                    loss_of(&a, &x)
                },
                "d_down",
            );
            check_entries(
                &g.d_up,
                &adapter.up,
                |up| {
                    let a = BottleneckAdapter::new(adapter.down.clone(), up.clone()).unwrap();
                    loss_of(&a, &x)
                },
                "d_up",
            );
            check_entries(&g.d_x, &x, |x| loss_of(&adapter, x), "d_x");
        }
    }

    #[test]
    fn adapter_backward_relu_at_zero_and_nan() {
        // Row 0: h = 1 − 1 = 0 exactly, relu'(0) = 0, so the bottleneck passes nothing back
        // and d_x is the residual path alone. Row 1: h = 2 > 0.
        let adapter = BottleneckAdapter::new(
            DMatrix::<f64>::from_element(2, 1, 1.0),
            nalgebra::dmatrix![3.0, -1.0],
        )
        .unwrap();
        let x = nalgebra::dmatrix![1.0, -1.0; 1.0, 1.0];
        let d_y = nalgebra::dmatrix![0.5, 2.0; 1.0, 1.0];
        let g = adapter.backward(&x, &d_y).unwrap();
        assert_eq!(g.d_x.row(0), d_y.row(0));
        // Row 1: G = d_y W_upᵀ = 3 − 1 = 2; d_x = d_y + 2 · W_downᵀ.
        assert_eq!(g.d_x.row(1), nalgebra::dmatrix![3.0, 3.0].row(0));
        assert_eq!(g.d_down, nalgebra::dmatrix![2.0; 2.0]); // only row 1 of x contributes
        assert_eq!(g.d_up, nalgebra::dmatrix![2.0, 2.0]); // relu(h)ᵀ d_y = 2 · (1, 1)
        // NaN in x reaches every gradient it touches: its hidden unit is NaN, so G is NaN
        // there (not the upstream gradient, as PyTorch's relu backward would give).
        let bad = nalgebra::dmatrix![f64::NAN, 0.0; 1.0, 1.0];
        let g = adapter.backward(&bad, &d_y).unwrap();
        assert!(g.d_x.row(0).iter().all(|v| v.is_nan()));
        assert!(g.d_x.row(1).iter().all(|v| v.is_finite()));
        assert!(g.d_down.iter().all(|v| v.is_nan()));
        assert!(g.d_up.iter().all(|v| v.is_nan()));
        // Shapes.
        let e = adapter
            .backward(&DMatrix::<f64>::zeros(2, 3), &DMatrix::zeros(2, 3))
            .unwrap_err();
        assert!(matches!(e, Error::DimensionMismatch { arg: "x", .. }));
        let e = adapter.backward(&x, &DMatrix::zeros(3, 2)).unwrap_err();
        assert_eq!(e.to_string(), "d_y is 3 x 2 but must be 2 x 2");
    }

    /// The forward's overflow case (a hidden activation past f32's range with a finite
    /// output): d_up = Σ_i h_i d_y_i is finite too, as is everything else.
    #[test]
    fn adapter_backward_survives_hidden_overflow() {
        let down = DMatrix::<f32>::from_row_slice(1, 2, &[-3.4028235e38, 1.6940658e-21]);
        let up = DMatrix::<f32>::from_row_slice(2, 1, &[1.9073486e-5, 10000.0]);
        let adapter = BottleneckAdapter::new(down, up).unwrap();
        let x = DMatrix::from_element(3, 1, -7.0_f32);
        let d_y = DMatrix::from_element(3, 1, 1e-5_f32);
        let g = adapter.backward(&x, &d_y).unwrap();
        let h0 = 7.0 * 3.4028235e38_f64;
        let want = 3.0 * h0 * f64::from(1e-5_f32);
        assert!(
            (f64::from(g.d_up[(0, 0)]) / want - 1.0).abs() < 1e-5,
            "{} vs {want}",
            g.d_up[(0, 0)]
        );
        // The second hidden unit, h = −7 · 1.7e-21 < 0, is closed.
        assert_eq!(g.d_up[(1, 0)], 0.0);
        assert!(g.d_down.iter().chain(g.d_x.iter()).all(|v| v.is_finite()));
        // G = d_y · W_up[0] on the open unit: d_down[0] = Σ x_i G_i = 3 · −7 · 1e-5 · 1.9e-5.
        let want = 3.0 * -7.0 * f64::from(1e-5_f32) * f64::from(1.9073486e-5_f32);
        assert!((f64::from(g.d_down[(0, 0)]) / want - 1.0).abs() < 1e-5);
    }

    /// A hidden activation past f32's range with a finite output (found by the `lora` fuzz
    /// target): relu(-7 · -3.4e38) · 1.9e-5 = 4.5e34, not inf.
    #[test]
    fn adapter_hidden_overflow_keeps_a_finite_output() {
        let down = DMatrix::<f32>::from_row_slice(1, 2, &[-3.4028235e38, 1.6940658e-21]);
        let up = DMatrix::<f32>::from_row_slice(2, 1, &[1.9073486e-5, 10000.0]);
        let adapter = BottleneckAdapter::new(down, up).unwrap();
        let y = adapter
            .forward(&DMatrix::from_element(3, 1, -7.0_f32))
            .unwrap();
        let want = -7.0 + 7.0 * 3.4028235e38_f64 * 1.9073486e-5;
        for v in y.iter() {
            assert!((f64::from(*v) - want).abs() < 1e-5 * want, "{v} vs {want}");
        }
    }

    /// A huge α/r with B = 0 (as initialised): the update is exactly 0, not inf · 0 = NaN
    /// (found by the `lora` fuzz target).
    #[test]
    fn huge_scaling_with_zero_b_merges_and_unmerges_exactly() {
        let w = DMatrix::<f32>::from_column_slice(3, 1, &[-1.1875, -6.6875, -6.0]);
        let mut layer = LoraLinear::new(w.clone(), 3, -6.6875).unwrap();
        layer.a_mut()[(0, 0)] = -1.715e38;
        assert_eq!(layer.merged(), w);
        assert_eq!(layer.unmerge(&w).unwrap(), w);
    }

    /// A tiny α/r brings back gradient products past the range: (d_y Bᵀ) Aᵀ with A at f32's
    /// maximum was inf · 1e-30 = inf in d_x (found by the `lora` fuzz target); x A and d_y Bᵀ
    /// past the range likewise for d_b and d_a.
    #[test]
    fn backward_survives_products_past_the_range_with_a_tiny_scaling() {
        let mut layer = LoraLinear::new(DMatrix::<f32>::zeros(2, 2), 1, 1e-30).unwrap();
        layer.set_a(DMatrix::from_element(2, 1, f32::MAX)).unwrap();
        layer.set_b(DMatrix::from_element(1, 2, 1.0)).unwrap();
        let (x, d_y) = (
            DMatrix::from_element(1, 2, 1.0),
            DMatrix::from_element(1, 2, 1.0),
        );
        let g = layer.backward(&x, &d_y).unwrap();
        // d_x = s (d_y Bᵀ) Aᵀ = 1e-30 · 2 · MAX; d_b = s (x A)ᵀ d_y = 1e-30 · 2 · MAX.
        let want = 2.0 * 1e-30 * f64::from(f32::MAX);
        for v in g.d_x.iter().chain(g.d_b.iter()) {
            assert!(((f64::from(*v) - want) / want).abs() < 1e-6, "{v}");
        }
        assert!(g.d_a.iter().all(|&v| (v - 2e-30).abs() < 1e-36));
        // d_y Bᵀ past the range: B at MAX, d_y = 1 twice.
        layer.set_a(DMatrix::from_element(2, 1, 1.0)).unwrap();
        layer.set_b(DMatrix::from_element(1, 2, f32::MAX)).unwrap();
        let g = layer.backward(&x, &d_y).unwrap();
        for v in g.d_a.iter().chain(g.d_x.iter()) {
            assert!(((f64::from(*v) - want) / want).abs() < 1e-6, "{v}");
        }
    }

    #[test]
    fn forward_equals_merged_and_errors_are_named() {
        let w = DMatrix::<f64>::from_fn(5, 3, |i, j| ((i * 3 + j) as f64).sin());
        let mut layer = LoraLinear::new(w, 2, 8.0).unwrap();
        layer
            .set_b(DMatrix::from_fn(2, 3, |i, j| (i as f64) - 0.5 * j as f64))
            .unwrap();
        let x = DMatrix::<f64>::from_fn(4, 5, |i, j| ((i + 2 * j) as f64).cos());
        let direct = layer.forward(&x).unwrap();
        assert!((&direct - &x * layer.merged()).amax() < 1e-12);
        // Against the textbook formula with nalgebra's own products.
        let textbook = &x * layer.w() + (&x * layer.a() * layer.b()) * 4.0;
        assert!((direct - textbook).amax() < 1e-12);
        let e = layer.forward(&DMatrix::<f64>::zeros(2, 4)).unwrap_err();
        assert_eq!(e.to_string(), "x has 4 columns but w has 5 rows");
        assert_eq!(
            layer.set_b(DMatrix::zeros(3, 3)).unwrap_err().to_string(),
            "b is 3 x 3 but must be 2 x 3"
        );
        assert!(layer.forward(&x).is_ok()); // unchanged by the rejected set_b
        assert!(LoraLinear::new(DMatrix::<f64>::zeros(2, 2), 0, 1.0).is_err());
        assert!(LoraLinear::new(DMatrix::<f64>::zeros(2, 2), 1, f64::NAN).is_err());
    }

    #[test]
    fn update_has_rank_at_most_r() {
        let mut layer = LoraLinear::new(DMatrix::<f64>::zeros(6, 6), 2, 2.0).unwrap();
        layer
            .set_b(DMatrix::from_fn(2, 6, |i, j| {
                ((i * 6 + j) as f64 * 1.3).sin()
            }))
            .unwrap();
        let delta = layer.merged() - layer.w();
        let sv = delta.singular_values();
        let significant = sv.iter().filter(|s| **s > 1e-10).count();
        assert_eq!(significant, 2);
    }

    /// Sizes whose entry count wraps in usize: before, nalgebra was handed a wrapped
    /// length and wrote through a dangling pointer (a panic on overflow in debug builds).
    #[test]
    fn caller_sized_buffers_are_checked() {
        let tall = DMatrix::<f32>::zeros(1 << 32, 0);
        assert_eq!(
            LoraLinear::new(tall, 1 << 32, 1.0).unwrap_err(),
            Error::TooLarge {
                what: "the d_in x rank LoRA factor a",
                shape: (1 << 32, 1 << 32)
            }
        );
        let wide = DMatrix::<f32>::zeros(0, 1 << 33);
        assert!(matches!(
            LoraLinear::new(wide, 1 << 31, 1.0),
            Err(Error::TooLarge {
                what: "the rank x d_out LoRA factor b",
                ..
            })
        ));
        // d_in = d_out = 0 with rank 2^32: A and B hold nothing, but x A is n x 2^32.
        let layer = LoraLinear::new(DMatrix::<f32>::zeros(0, 0), 1 << 32, 1.0).unwrap();
        let x = DMatrix::<f32>::zeros(1 << 32, 0);
        assert!(matches!(
            layer.forward(&x),
            Err(Error::TooLarge {
                what: "the n x rank LoRA intermediate x a",
                ..
            })
        ));
        let adapter = BottleneckAdapter::new(
            DMatrix::<f32>::zeros(0, 1 << 32),
            DMatrix::zeros(1 << 32, 0),
        )
        .unwrap();
        assert!(matches!(adapter.forward(&x), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn adapter_propagates_nan() {
        let adapter = BottleneckAdapter::new(
            DMatrix::<f64>::from_element(2, 1, 1.0),
            DMatrix::from_element(1, 2, 1.0),
        )
        .unwrap();
        let y = adapter
            .forward(&nalgebra::dmatrix![f64::NAN, 0.0; 1.0, -3.0])
            .unwrap();
        assert!(y.row(0).iter().all(|v| v.is_nan()));
        assert_eq!(
            y.row(1).iter().copied().collect::<Vec<_>>(),
            vec![1.0, -3.0]
        );
    }
}
