//! Rotary position embeddings (RoPE, Su et al. 2021) in both conventions in use.
//!
//! The module is private; everything is documented on [`Rope`] and [`RopeLayout`].

use crate::Float;
use crate::error::{Error, Result, check_positive};
use crate::prelude::*;
use nalgebra::{DMatrix, DMatrixView, DMatrixViewMut};

/// Rows whose cos/sin are computed together before they are applied to every head: the
/// table is `ROW_BLOCK x r/2` pairs of `f64`, independent of n.
const ROW_BLOCK: usize = 64;

/// Which pairs of features a [`Rope`] rotates together. The two conventions rotate the same
/// angles but pair different columns, so a checkpoint trained with one gives wrong results
/// with the other unless its query and key projections are permuted (see
/// [`Rope::interleaved_to_rotate_half`]).
///
/// Within each head of width d, with r rotated dims (r = d unless
/// [`Rope::rotary_dim`] says otherwise) and `k = 0 .. r/2`, pair k is rotated by the
/// angle `p · θ_k` of the token's position p:
///
/// | layout | pair k | used by |
/// |---|---|---|
/// | [`Interleaved`](RopeLayout::Interleaved) | `(2k, 2k + 1)` | GPT-J, Meta's original Llama code (`torch.view_as_complex`), RoFormer |
/// | [`RotateHalf`](RopeLayout::RotateHalf) | `(k, k + r/2)` | GPT-NeoX, Hugging Face `transformers` (`rotate_half`), most converted Llama checkpoints |
///
/// # Examples
///
/// ```
/// use attention_math::{Rope, RopeLayout};
/// use nalgebra::DMatrix;
///
/// // One token at position 1, one head of width 4, theta = 1 so that θ_k = 1 for every k.
/// let x = DMatrix::<f64>::from_row_slice(1, 4, &[1.0, 2.0, 3.0, 4.0]);
/// let (c, s) = (1.0_f64.cos(), 1.0_f64.sin());
///
/// let mut a = x.clone();
/// Rope::new(4, RopeLayout::Interleaved).theta(1.0).apply(&mut a, 1)?;
/// // Pairs (0, 1) and (2, 3).
/// let expected = [1.0 * c - 2.0 * s, 1.0 * s + 2.0 * c, 3.0 * c - 4.0 * s, 3.0 * s + 4.0 * c];
/// assert!(a.iter().zip(expected).all(|(x, e)| (x - e).abs() < 1e-15));
///
/// let mut b = x.clone();
/// Rope::new(4, RopeLayout::RotateHalf).theta(1.0).apply(&mut b, 1)?;
/// // Pairs (0, 2) and (1, 3).
/// let expected = [1.0 * c - 3.0 * s, 2.0 * c - 4.0 * s, 1.0 * s + 3.0 * c, 2.0 * s + 4.0 * c];
/// assert!(b.iter().zip(expected).all(|(x, e)| (x - e).abs() < 1e-15));
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopeLayout {
    /// Rotates adjacent features: pair k is `(2k, 2k + 1)`, read as the complex number
    /// `x_{2k} + i·x_{2k+1}` multiplied by `e^{i·p·θ_k}`. GPT-J, Meta's original Llama
    /// reference code, RoFormer.
    Interleaved,
    /// Rotates the first half against the second: pair k is `(k, k + r/2)`, i.e.
    /// `x·cos + rotate_half(x)·sin` with `rotate_half(x) = [-x_2, x_1]`. GPT-NeoX and
    /// Hugging Face `transformers` (including the Llama, Mistral, Qwen and Phi ports).
    RotateHalf,
}

impl RopeLayout {
    /// The two columns (within a head) of pair `k` when `r` dims rotate.
    #[inline]
    fn pair(self, k: usize, r: usize) -> (usize, usize) {
        match self {
            RopeLayout::Interleaved => (2 * k, 2 * k + 1),
            RopeLayout::RotateHalf => (k, k + r / 2),
        }
    }
}

/// Rotary position embeddings: the configuration, and [`apply`](Rope::apply) /
/// [`backward`](Rope::backward) on the heads of an n x (H·d) matrix.
///
/// # The formula
///
/// A head of width d rotates its first r dims (r even, r <= d; by default r = d) in r/2
/// planes; the remaining `d - r` dims pass through unchanged (partial rotary embeddings, as
/// GPT-NeoX's `rotary_pct` or Phi's `partial_rotary_factor`, with r = ⌊d·fraction⌋ rounded to
/// even). With base θ (default 10000) and linear scaling factor s (default 1, Hugging Face's
/// `rope_scaling = {"type": "linear", "factor": s}`), pair k = 0 .. r/2 of a token at
/// position p turns by
///
/// ```text
/// θ_k = θ^(-2k/r)          φ = (p / s) · θ_k
/// (a, b) ← (a·cos φ − b·sin φ,  a·sin φ + b·cos φ)
/// ```
///
/// where `(a, b)` are the columns [`RopeLayout`] names. Row i of the matrix is the token at
/// position `p = offset + i`: when decoding against a KV cache, `offset` is the number of
/// positions already cached ([`KvCache::end_position`](crate::KvCache::end_position)), so the
/// new queries and keys are rotated for where they are in the sequence, not for row 0.
///
/// Because the rotation of a query at p and of a key at p' compose to a rotation by
/// `(p' − p)·θ_k`, the score `q_p · k_p'` after RoPE depends on the positions only through
/// `p' − p`.
///
/// # Accuracy
///
/// Angles are computed in `f64` whatever `T` is: θ_k by `powf`, `p / s`, the product, then
/// `sin_cos`, each correctly rounded or within an ulp, so the angle's error is a few ulp of
/// `f64` (about `4e-16 · |φ|`: below 1e-9 rad at position 10^6, where the same angle computed
/// in `f32` could be off by 0.03 rad). cos and sin are computed once per (position, k) and
/// shared by every head; the rotation itself runs in `f64` and rounds once to `T`. Positions
/// are exact in `f64` up to 2^53.
///
/// Non-finite entries are not checked here (the attention functions check their inputs): a
/// rotated NaN or infinity gives NaN in its pair.
///
/// # Examples
///
/// ```
/// use attention_math::{Rope, RopeLayout};
/// use nalgebra::DMatrix;
///
/// // Llama-style: 4 heads of width 8, rotate-half, base 500000.
/// let rope = Rope::new(8, RopeLayout::RotateHalf).theta(500_000.0);
/// let mut q = DMatrix::<f32>::from_fn(3, 32, |i, j| ((i * 32 + j) as f32 * 0.1).sin());
/// let original = q.clone();
/// rope.apply(&mut q, 10)?; // rows are positions 10, 11, 12
/// // Rotations keep the norm of every head row ...
/// for i in 0..3 {
///     for h in 0..4 {
///         let (a, b) = (q.view((i, 8 * h), (1, 8)).norm(), original.view((i, 8 * h), (1, 8)).norm());
///         assert!((a - b).abs() < 1e-5);
///     }
/// }
/// // ... and the backward (the transposed rotation) undoes them.
/// rope.backward(&mut q, 10)?;
/// assert!((q - original).amax() < 1e-5);
/// # Ok::<(), attention_math::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    head_dim: usize,
    layout: RopeLayout,
    theta: f64,
    rotary_dim: Option<usize>,
    scale: f64,
}

impl Rope {
    /// RoPE on heads of width `head_dim` in the given layout, with base θ = 10000, every dim
    /// rotated (r = d) and no position scaling. The configuration is checked when it is used:
    /// [`apply`](Rope::apply) and the other methods return the errors.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Rope, RopeLayout};
    ///
    /// let rope = Rope::new(64, RopeLayout::Interleaved);
    /// assert_eq!(rope.head_dim(), 64);
    /// assert_eq!(rope.layout(), RopeLayout::Interleaved);
    /// assert_eq!(rope.frequencies()?.len(), 32);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn new(head_dim: usize, layout: RopeLayout) -> Self {
        Rope {
            head_dim,
            layout,
            theta: 10_000.0,
            rotary_dim: None,
            scale: 1.0,
        }
    }

    /// Sets the base θ of the frequencies `θ_k = θ^(-2k/r)` (default 10000; Llama 3 uses
    /// 500000). It must be finite and > 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Rope, RopeLayout};
    ///
    /// let f = Rope::new(4, RopeLayout::RotateHalf).theta(100.0).frequencies()?;
    /// assert_eq!(f.len(), 2);
    /// assert!((f[0] - 1.0).abs() < 1e-15 && (f[1] - 0.1).abs() < 1e-15); // 100^0, 100^(-1/2)
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn theta(mut self, theta: f64) -> Self {
        self.theta = theta;
        self
    }

    /// Rotates only the first `r` dims of each head; dims `r .. d` pass through bit for bit.
    /// `r` must be even and at most the head width (default: the head width). The
    /// frequencies are spread over r: `θ_k = θ^(-2k/r)`, and in the rotate-half layout
    /// pair k is `(k, k + r/2)`, as in GPT-NeoX's partial rotary embeddings.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Rope, RopeLayout};
    /// use nalgebra::DMatrix;
    ///
    /// let mut x = DMatrix::<f64>::from_element(2, 6, 1.0);
    /// Rope::new(6, RopeLayout::RotateHalf).rotary_dim(2).apply(&mut x, 5)?;
    /// assert_ne!(x[(0, 0)], 1.0); // rotated
    /// assert!(x.columns(2, 4).iter().all(|&v| v == 1.0)); // untouched
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn rotary_dim(mut self, r: usize) -> Self {
        self.rotary_dim = Some(r);
        self
    }

    /// Linear position scaling ("position interpolation", Chen et al. 2023; Hugging Face's
    /// `"linear"` `rope_scaling`): positions are divided by `factor` before they are turned
    /// into angles, `φ = (p / factor)·θ_k`. It must be finite and > 0 (default 1).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Rope, RopeLayout};
    /// use nalgebra::DMatrix;
    ///
    /// // Position 8 with factor 4 is rotated exactly as position 2 without scaling.
    /// let x = DMatrix::<f64>::from_fn(1, 8, |_, j| j as f64 + 1.0);
    /// let (mut a, mut b) = (x.clone(), x.clone());
    /// Rope::new(8, RopeLayout::Interleaved).linear_scaling(4.0).apply(&mut a, 8)?;
    /// Rope::new(8, RopeLayout::Interleaved).apply(&mut b, 2)?;
    /// assert_eq!(a, b);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn linear_scaling(mut self, factor: f64) -> Self {
        self.scale = factor;
        self
    }

    /// The head width d.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attention_math::Rope::new(16, attention_math::RopeLayout::RotateHalf).head_dim(), 16);
    /// ```
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The pairing convention.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Rope, RopeLayout};
    /// assert_eq!(Rope::new(16, RopeLayout::RotateHalf).layout(), RopeLayout::RotateHalf);
    /// ```
    pub fn layout(&self) -> RopeLayout {
        self.layout
    }

    /// The number of rotated dims r of each head, after checking the configuration.
    fn checked_rotary_dim(&self) -> Result<usize> {
        if self.head_dim == 0 {
            return Err(Error::InvalidParameter {
                name: "head_dim",
                value: 0.0,
                requirement: "must be >= 1",
            });
        }
        let r = self.rotary_dim.unwrap_or(self.head_dim);
        if !r.is_multiple_of(2) || r > self.head_dim {
            return Err(Error::InvalidParameter {
                name: "rotary_dim",
                value: r as f64,
                requirement: "must be even and at most head_dim",
            });
        }
        check_positive("theta", self.theta)?;
        check_positive("linear_scaling", self.scale)?;
        Ok(r)
    }

    /// The r/2 frequencies `θ_k = θ^(-2k/r)`, k = 0 .. r/2, in radians per position (before
    /// linear scaling).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] naming `head_dim` if it is 0, `rotary_dim` if it is odd or
    /// larger than the head width, `theta` or `linear_scaling` if not finite and > 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Rope, RopeLayout};
    ///
    /// let f = Rope::new(8, RopeLayout::Interleaved).frequencies()?;
    /// assert_eq!(f.len(), 4);
    /// assert_eq!(f[0], 1.0);
    /// assert!((f[2] - 0.01).abs() < 1e-15); // 10000^(-4/8)
    /// assert!(Rope::new(8, RopeLayout::Interleaved).rotary_dim(3).frequencies().is_err());
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn frequencies(&self) -> Result<Vec<f64>> {
        let r = self.checked_rotary_dim()?;
        Ok((0..r / 2)
            .map(|k| self.theta.powf(-((2 * k) as f64) / r as f64))
            .collect())
    }

    /// Rotates every head of `x` in place: row i is the token at position `offset + i`.
    ///
    /// Shapes: `x` is n x (H·d) — rows are tokens, the H heads of width d side by side in the
    /// columns, as [`multi_head_attention`](crate::multi_head_attention) takes queries (H
    /// query heads) and keys (G key-value heads); H is the number of columns over d. `x` may
    /// be `&mut DMatrix<T>` or any mutable view (for example the query columns of a fused QKV
    /// matrix). The formula is on [`Rope`].
    ///
    /// On an `Err`, `x` is unchanged.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidParameter`] naming `head_dim` (0), `rotary_dim` (odd or > d),
    ///   `theta` or `linear_scaling` (not finite and > 0, or such that the largest angle,
    ///   `(offset + n − 1) / scaling` times the largest frequency, overflows: a tiny scaling,
    ///   or a theta so far below 1 that `θ^(-2k/r)` is huge), or `offset` if `offset + n`
    ///   overflows `usize`;
    /// - [`Error::HeadWidth`] naming `x` if its columns are not a multiple of d;
    /// - [`Error::TooLarge`] if the cos/sin table (at most 64 x r/2) cannot be allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Rope, RopeLayout};
    /// use nalgebra::DMatrix;
    ///
    /// // Decoding: the cache holds 7 positions, so the new token is at position 7.
    /// let rope = Rope::new(4, RopeLayout::RotateHalf);
    /// let prompt = DMatrix::<f64>::from_fn(8, 8, |i, j| ((i * 8 + j) as f64).cos());
    /// let mut whole = prompt.clone();
    /// rope.apply(&mut whole, 0)?;
    /// let mut last = prompt.rows(7, 1).clone_owned();
    /// rope.apply(&mut last, 7)?;
    /// assert_eq!(last, whole.rows(7, 1));
    ///
    /// let err = rope.apply(&mut DMatrix::<f64>::zeros(1, 6), 0).unwrap_err();
    /// assert_eq!(err.to_string(), "x has 6 columns, which do not split into heads of width 4");
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn apply<'a, T: Float>(
        &self,
        x: impl Into<DMatrixViewMut<'a, T>>,
        offset: usize,
    ) -> Result<()> {
        self.rotate(x.into(), "x", offset, 1.0)
    }

    /// The backward of [`apply`](Rope::apply): rotates every pair by `−φ` instead of `φ`,
    /// which is the transposed (and inverse) rotation `Rᵀ = R⁻¹`. Applied to the upstream
    /// gradient `dL/dy` of `y = R x`, it gives `dL/dx = Rᵀ dL/dy`, in place; applied to
    /// rotated values, it undoes the rotation (to rounding).
    ///
    /// Same shapes (`grad` is n x (H·d), row i at position `offset + i`), same parameters,
    /// same errors as [`apply`](Rope::apply), with `grad` named in them.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Rope, RopeLayout};
    /// use nalgebra::DMatrix;
    ///
    /// // ⟨R x, g⟩ = ⟨x, Rᵀ g⟩.
    /// let rope = Rope::new(6, RopeLayout::Interleaved).rotary_dim(4);
    /// let x = DMatrix::<f64>::from_fn(5, 12, |i, j| ((i * 12 + j) as f64 * 0.3).sin());
    /// let g = DMatrix::<f64>::from_fn(5, 12, |i, j| ((i * 12 + j) as f64 * 0.7).cos());
    /// let (mut rx, mut rtg) = (x.clone(), g.clone());
    /// rope.apply(&mut rx, 3)?;
    /// rope.backward(&mut rtg, 3)?;
    /// assert!((rx.dot(&g) - x.dot(&rtg)).abs() < 1e-12);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn backward<'a, T: Float>(
        &self,
        grad: impl Into<DMatrixViewMut<'a, T>>,
        offset: usize,
    ) -> Result<()> {
        self.rotate(grad.into(), "grad", offset, -1.0)
    }

    /// Rotates by `sign · φ`.
    fn rotate<T: Float>(
        &self,
        mut x: DMatrixViewMut<'_, T>,
        arg: &'static str,
        offset: usize,
        sign: f64,
    ) -> Result<()> {
        let inv_freq = self.frequencies()?;
        let (n, cols) = x.shape();
        let d = self.head_dim;
        if !cols.is_multiple_of(d) {
            return Err(Error::HeadWidth {
                arg,
                len: cols,
                width: d,
            });
        }
        if offset.checked_add(n).is_none() {
            return Err(Error::InvalidParameter {
                name: "offset",
                value: offset as f64,
                requirement: "must leave room for the rows: offset + n must not overflow usize",
            });
        }
        let (heads, half) = (cols / d, inv_freq.len());
        if n == 0 || heads == 0 || half == 0 {
            return Ok(());
        }
        // The largest angle must be finite (a tiny scaling factor divides positions into
        // infinities, and a theta below 1 makes frequencies above 1; the sine of inf is NaN).
        let top = inv_freq.iter().fold(0.0_f64, |a, &f| a.max(f));
        let position = (offset + n - 1) as f64 / self.scale;
        if !(position * top).is_finite() {
            let (name, value) = if position.is_finite() {
                ("theta", self.theta)
            } else {
                ("linear_scaling", self.scale)
            };
            return Err(Error::InvalidParameter {
                name,
                value,
                requirement: "must keep every angle finite: (offset + n − 1) / linear_scaling \
                    times the largest frequency (1, or more for theta < 1) overflows",
            });
        }
        let r = 2 * half;
        let block = ROW_BLOCK.min(n);
        let too_large = || Error::TooLarge {
            what: "the RoPE cos/sin table (64 rows x rotary_dim/2)",
            shape: (block, half),
        };
        let len = half.checked_mul(block).ok_or_else(too_large)?;
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for table in [&mut cos, &mut sin] {
            table.try_reserve_exact(len).map_err(|_| too_large())?;
            table.resize(len, 0.0);
        }
        for b in (0..n).step_by(block) {
            let rows = block.min(n - b);
            for (k, &f) in inv_freq.iter().enumerate() {
                for t in 0..rows {
                    // offset + b + t <= offset + n, checked above.
                    let p = (offset + b + t) as f64 / self.scale;
                    let (s, c) = (p * f).sin_cos();
                    cos[k * block + t] = c;
                    sin[k * block + t] = sign * s;
                }
            }
            for h in 0..heads {
                for k in 0..half {
                    let (ia, ib) = self.layout.pair(k, r);
                    let (ca, cb) = (h * d + ia, h * d + ib);
                    for t in 0..rows {
                        let i = b + t;
                        let (c, s) = (cos[k * block + t], sin[k * block + t]);
                        let xa = x[(i, ca)].as_f64();
                        let xb = x[(i, cb)].as_f64();
                        x[(i, ca)] = T::of_f64(xa * c - xb * s);
                        x[(i, cb)] = T::of_f64(xa * s + xb * c);
                    }
                }
            }
        }
        Ok(())
    }

    /// The column order, within one head, that turns interleaved features into rotate-half
    /// features: entry j is the interleaved index that lands at rotate-half index j,
    /// `[0, 2, 4, ..., r-2, 1, 3, ..., r-1, r, r+1, ..., d-1]` (the tail `r .. d` stays
    /// in place). It depends on d and r only, not on the layout.
    ///
    /// This is the permutation Hugging Face's `convert_llama_weights_to_hf.py` applies to the
    /// rows of `W_q` and `W_k` (its `permute` reshapes each head's rows to (r/2, 2) and
    /// transposes to (2, r/2)): after it, [`RopeLayout::RotateHalf`] on the converted
    /// projections computes exactly what [`RopeLayout::Interleaved`] computed on the original
    /// ones, with the features of q and k reordered — and q·k, hence attention, unchanged.
    ///
    /// # Errors
    ///
    /// Those of [`frequencies`](Rope::frequencies).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Rope, RopeLayout};
    ///
    /// let order = Rope::new(8, RopeLayout::RotateHalf).rotary_dim(6).rotate_half_order()?;
    /// assert_eq!(order, vec![0, 2, 4, 1, 3, 5, 6, 7]);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn rotate_half_order(&self) -> Result<Vec<usize>> {
        let r = self.checked_rotary_dim()?;
        Ok((0..r)
            .step_by(2)
            .chain((1..r).step_by(2))
            .chain(r..self.head_dim)
            .collect())
    }

    /// Reorders the columns of every head of an n x (H·d) matrix from the interleaved to the
    /// rotate-half convention (see [`rotate_half_order`](Rope::rotate_half_order)):
    /// `out[:, h·d + j] = x[:, h·d + order[j]]`.
    ///
    /// Use it on activations (q or k before RoPE) or on a projection stored as d_model x
    /// (H·d) with `q = x W`; a PyTorch `nn.Linear` weight is (H·d) x d_model (`q = x Wᵀ`),
    /// so pass its transpose, or permute its rows, as the Hugging Face script does.
    ///
    /// # Errors
    ///
    /// Those of [`frequencies`](Rope::frequencies), and [`Error::HeadWidth`] naming `x` if its
    /// columns are not a multiple of d.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Rope, RopeLayout};
    /// use nalgebra::DMatrix;
    ///
    /// let x = DMatrix::<f64>::from_fn(3, 8, |i, j| ((i * 8 + j) as f64 * 0.4).sin());
    /// let interleaved = Rope::new(4, RopeLayout::Interleaved);
    /// let rotate_half = Rope::new(4, RopeLayout::RotateHalf);
    ///
    /// // Rotate-half on the permuted features = interleaved on the originals, permuted.
    /// let mut a = rotate_half.interleaved_to_rotate_half(&x)?;
    /// rotate_half.apply(&mut a, 2)?;
    /// let mut b = x.clone();
    /// interleaved.apply(&mut b, 2)?;
    /// let b = rotate_half.interleaved_to_rotate_half(&b)?;
    /// assert!((a - b).amax() < 1e-15);
    /// // The inverse restores the order.
    /// assert_eq!(rotate_half.rotate_half_to_interleaved(&rotate_half.interleaved_to_rotate_half(&x)?)?, x);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn interleaved_to_rotate_half<'a, T: Float>(
        &self,
        x: impl Into<DMatrixView<'a, T>>,
    ) -> Result<DMatrix<T>> {
        self.permute(x.into(), false)
    }

    /// The inverse of [`interleaved_to_rotate_half`](Rope::interleaved_to_rotate_half):
    /// `out[:, h·d + order[j]] = x[:, h·d + j]`, turning rotate-half features (a Hugging Face
    /// checkpoint) back into interleaved ones (Meta's layout).
    ///
    /// # Errors
    ///
    /// As [`interleaved_to_rotate_half`](Rope::interleaved_to_rotate_half).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math::{Rope, RopeLayout};
    /// use nalgebra::DMatrix;
    ///
    /// // One head of width 6: the order is [0, 2, 4, 1, 3, 5].
    /// let x = DMatrix::<f32>::from_row_slice(1, 6, &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    /// let rope = Rope::new(6, RopeLayout::RotateHalf);
    /// assert_eq!(rope.interleaved_to_rotate_half(&x)?.as_slice(), &[0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
    /// assert_eq!(rope.rotate_half_to_interleaved(&x)?.as_slice(), &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    /// # Ok::<(), attention_math::Error>(())
    /// ```
    pub fn rotate_half_to_interleaved<'a, T: Float>(
        &self,
        x: impl Into<DMatrixView<'a, T>>,
    ) -> Result<DMatrix<T>> {
        self.permute(x.into(), true)
    }

    fn permute<T: Float>(&self, x: DMatrixView<'_, T>, inverse: bool) -> Result<DMatrix<T>> {
        let order = self.rotate_half_order()?;
        let d = self.head_dim;
        let (n, cols) = x.shape();
        if !cols.is_multiple_of(d) {
            return Err(Error::HeadWidth {
                arg: "x",
                len: cols,
                width: d,
            });
        }
        let mut out = x.clone_owned();
        for h in 0..cols / d {
            for (j, &o) in order.iter().enumerate() {
                let (dst, src) = if inverse { (o, j) } else { (j, o) };
                if n > 0 {
                    out.column_mut(h * d + dst)
                        .copy_from(&x.column(h * d + src));
                }
            }
        }
        Ok(out)
    }
}
