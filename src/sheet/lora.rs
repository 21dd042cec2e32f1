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
use crate::error::{Axis, Error, Result};
use nalgebra::{DMatrix, DMatrixView};

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
/// layer.b[(0, 0)] = 1.0;
/// layer.a[(0, 0)] = 0.5;
/// let merged = layer.merged();
/// assert!((layer.forward(&x)? - &x * &merged).amax() < 1e-12);
/// assert_eq!(layer.trainable_parameters(), 2 * (4 + 4));
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LoraLinear<T: Float> {
    /// The frozen base weight, d_in x d_out.
    pub w: DMatrix<T>,
    /// The down projection A, d_in x r.
    pub a: DMatrix<T>,
    /// The up projection B, r x d_out (zero at initialisation).
    pub b: DMatrix<T>,
    /// The scaling numerator α; the update is multiplied by α / r.
    pub alpha: T,
}

impl<T: Float> LoraLinear<T> {
    /// Wraps `w` with a rank-`rank` update: `A` gets a deterministic small initialisation
    /// (a scaled cosine pattern standing in for Kaiming-uniform; overwrite it for training)
    /// and `B = 0`, so the layer starts equal to `w`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] if `rank` is 0 or `alpha` is not finite.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::sheet::lora::LoraLinear;
    /// use nalgebra::DMatrix;
    ///
    /// let layer = LoraLinear::new(DMatrix::<f32>::zeros(8, 6), 2, 16.0)?;
    /// assert_eq!((layer.a.shape(), layer.b.shape()), ((8, 2), (2, 6)));
    /// assert_eq!(layer.scaling(), 8.0);
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
        let a = DMatrix::from_fn(d_in, rank, |i, j| {
            bound * T::of_f64(((i * rank + j) as f64 * 0.7 + 0.3).cos())
        });
        Ok(LoraLinear {
            w,
            a,
            b: DMatrix::zeros(rank, d_out),
            alpha,
        })
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

    fn check(&self) -> Result<()> {
        let (d_in, d_out) = self.w.shape();
        if self.a.shape() != (d_in, self.a.ncols()) {
            return Err(Error::ShapeMismatch {
                arg: "a",
                found: self.a.shape(),
                expected: (d_in, self.a.ncols()),
            });
        }
        if self.b.shape() != (self.a.ncols(), d_out) {
            return Err(Error::ShapeMismatch {
                arg: "b",
                found: self.b.shape(),
                expected: (self.a.ncols(), d_out),
            });
        }
        Ok(())
    }

    /// `y = x W + (α/r) (x A) B` for `x` (n x d_in), computed without forming `A B`.
    ///
    /// # Errors
    ///
    /// [`Error::DimensionMismatch`] if `x` does not have d_in columns;
    /// [`Error::ShapeMismatch`] if `a` or `b` were replaced by matrices of the wrong shape.
    ///
    /// # Examples
    ///
    /// See [`LoraLinear`].
    pub fn forward<'x>(&self, x: impl Into<DMatrixView<'x, T>>) -> Result<DMatrix<T>> {
        let x = x.into();
        self.check()?;
        check_inner("x", x.ncols(), "w", Axis::Rows, self.w.nrows())?;
        let low_rank = (x * &self.a) * &self.b;
        Ok(x * &self.w + low_rank * self.scaling())
    }

    /// The merged weight `W + (α/r) A B` (d_in x d_out): one matmul at inference.
    ///
    /// # Examples
    ///
    /// See [`LoraLinear`].
    pub fn merged(&self) -> DMatrix<T> {
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
    /// layer.b.fill(0.25);
    /// let back = layer.unmerge(&layer.merged())?;
    /// assert!((back - &layer.w).amax() < 1e-15);
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
    /// # Errors
    ///
    /// [`Error::DimensionMismatch`] if `x` does not have d columns.
    ///
    /// # Examples
    ///
    /// See [`BottleneckAdapter`].
    pub fn forward<'x>(&self, x: impl Into<DMatrixView<'x, T>>) -> Result<DMatrix<T>> {
        let x = x.into();
        check_inner("x", x.ncols(), "down", Axis::Rows, self.down.nrows())?;
        let hidden = (x * &self.down).map(|h| h.max(T::zero()));
        Ok(x + hidden * &self.up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_equals_merged_and_errors_are_named() {
        let w = DMatrix::<f64>::from_fn(5, 3, |i, j| ((i * 3 + j) as f64).sin());
        let mut layer = LoraLinear::new(w, 2, 8.0).unwrap();
        layer.b = DMatrix::from_fn(2, 3, |i, j| (i as f64) - 0.5 * j as f64);
        let x = DMatrix::<f64>::from_fn(4, 5, |i, j| ((i + 2 * j) as f64).cos());
        let direct = layer.forward(&x).unwrap();
        assert!((direct - &x * layer.merged()).amax() < 1e-12);
        let e = layer.forward(&DMatrix::<f64>::zeros(2, 4)).unwrap_err();
        assert_eq!(e.to_string(), "x has 4 columns but w has 5 rows");
        layer.b = DMatrix::zeros(3, 3);
        assert_eq!(
            layer.forward(&x).unwrap_err().to_string(),
            "b is 3 x 3 but must be 2 x 3"
        );
        assert!(LoraLinear::new(DMatrix::<f64>::zeros(2, 2), 0, 1.0).is_err());
        assert!(LoraLinear::new(DMatrix::<f64>::zeros(2, 2), 1, f64::NAN).is_err());
    }

    #[test]
    fn update_has_rank_at_most_r() {
        let mut layer = LoraLinear::new(DMatrix::<f64>::zeros(6, 6), 2, 2.0).unwrap();
        layer.b = DMatrix::from_fn(2, 6, |i, j| ((i * 6 + j) as f64 * 1.3).sin());
        let delta = layer.merged() - &layer.w;
        let sv = delta.singular_values();
        let significant = sv.iter().filter(|s| **s > 1e-10).count();
        assert_eq!(significant, 2);
    }
}
