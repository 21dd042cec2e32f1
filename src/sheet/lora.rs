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
//! `d_in · d_out`; applied to the Q, K, V and O projections of attention it changes what the
//! heads attend to without touching the frozen weights.
//!
//! A **bottleneck adapter** (Houlsby et al. 2019) adds a small residual MLP after a sublayer:
//!
//! ```text
//! y = x + relu(x W_down) W_up                W_down: d x r,  W_up: r x d
//! ```
//!
//! which, unlike LoRA, cannot be merged away (the nonlinearity), so it adds inference latency.

use crate::Float;
use crate::error::{Axis, Error, Result, try_matrix};
use nalgebra::{DMatrix, DMatrixView, DMatrixViewMut};

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

/// `2^k` for `|k|` within the normal range of `T`.
fn pow2<T: Float>(k: i32) -> T {
    T::of_f64(2f64.powi(k))
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

/// Adds the rescued entries' share of `f(h) n` to `y`: `y_ij += (f(h'_ik) · s · n_kj) · 2^e` for
/// a positively homogeneous `f` (identity or relu), so the scale comes out exactly.
fn add_rescued<T: Float>(
    y: &mut DMatrix<T>,
    r: &Rescued<T>,
    n: &DMatrix<T>,
    s: T,
    f: impl Fn(T) -> T,
) {
    let (a, b) = (pow2::<T>(r.halves.0), pow2::<T>(r.halves.1));
    for &(i, k, z) in &r.entries {
        let z = f(z);
        if z == T::zero() {
            continue;
        }
        for j in 0..y.ncols() {
            // The smaller of the two factors first, so the product overflows only if it must.
            let nk = n[(k, j)];
            let term = if s.abs() < nk.abs() {
                z * s * nk
            } else {
                z * nk * s
            };
            if term != T::zero() {
                y[(i, j)] += term * a * b;
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
    /// NaN or infinite entries propagate to the output rows they reach.
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
        let xab = product(
            "the n x d_out LoRA update",
            &xa.as_view(),
            &self.b.as_view(),
        )?;
        let mut y = y + xab * self.scaling();
        add_rescued(&mut y, &rescued, &self.b, self.scaling(), |z| z);
        Ok(y)
    }

    /// The merged weight `W + (α/r) A B` (d_in x d_out): one matmul at inference.
    ///
    /// # Examples
    ///
    /// See [`LoraLinear`].
    pub fn merged(&self) -> DMatrix<T> {
        // A B first, then the scaling, as in `forward`.
        &self.w + (&self.a * &self.b) * self.scaling()
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
        // A B first, then the scaling, as in `merged` (a gemm with the scaling as its α may
        // scale A first: inf · 0 = NaN for a huge α/r and a zero B).
        Ok(merged - (&self.a * &self.b) * self.scaling())
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
