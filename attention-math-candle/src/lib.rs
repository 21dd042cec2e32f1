//! A fused CPU scaled dot-product attention op for [candle](https://docs.rs/candle-core)
//! tensors, computed by [`attention_math`]'s tiled online-softmax kernel.
//!
//! [`scaled_dot_product_attention`] takes `q` (B, H, n, d), `k` (B, G, m, d) and `v`
//! (B, G, m, d_v), with H a multiple of G (grouped-query attention; G = H is multi-head,
//! G = 1 multi-query), and returns the (B, H, n, d_v) tensor
//!
//! ```text
//! out[b, h] = softmax(scale · q[b, h] · k[b, h / (H/G)]ᵀ + mask) · v[b, h / (H/G)]
//! ```
//!
//! with any [`Mask`] of `attention_math` (causal, bottom-right causal for a KV cache, sliding
//! window, key padding, packed documents, and their combinations), the [`Options`] scale,
//! softcap, ALiBi and thread count, in `f32` or `f64` on the CPU. It is a
//! [`candle_core::CustomOp3`], so it sits in a candle graph, and its backward pass is the
//! crate's [`multi_head_attention_backward`](attention_math::multi_head_attention_backward):
//! `Tensor::backward` gives dQ, dK and dV (summed over each GQA group).
//!
//! Unlike candle's unfused path (`q.matmul(&k.t()?)`, a 0/−inf mask tensor, `softmax_last_dim`,
//! `.matmul(&v)`, and `repeat_kv` for GQA), the op never builds the n x m scores or the
//! repeated keys and values, and skips the key tiles a mask rules out.
//!
//! # Layout and copies
//!
//! The crate's kernels read each batch element as an n x (H·d) column-major matrix (a
//! `nalgebra::DMatrixView`, unit stride down a column): head h in columns `h·d .. (h+1)·d`.
//! For each of `q`, `k`, `v` and batch element b:
//!
//! - **no copy** when the tensor's strides already are that matrix: stride 1 along the
//!   sequence axis (or a sequence of length 1, e.g. the query of a decode step in candle's
//!   ordinary row-major layout), a dimension stride `s >= seq`, and a head stride `d·s`. That
//!   is what `x.transpose(2, 3)?.contiguous()?.transpose(2, 3)?` gives;
//! - **one copy** otherwise (candle's default row-major (B, H, n, d), a `transpose(1, 2)` of a
//!   (B, n, H, d) projection, broadcast strides, offsets: any layout): a tiled transpose of
//!   O(H·n·d) elements per batch element, next to the attention's O(H·n·m·d) work. Inputs are
//!   never made contiguous by candle first (no second copy).
//!
//! For a decode step (n = 1) against a long cache, the attention itself only streams K and V
//! once, so the copy of a row-major cache costs more than the attention (the `compare`
//! example prints both): keep such a cache column-major per head to have it read in place.
//!
//! The output is always a new contiguous row-major (B, H, n, d_v) tensor: the kernel's
//! column-major result is transposed once into it (O(H·n·d_v)). The backward pass reads its
//! inputs the same way and writes dQ, dK, dV as contiguous tensors.
//!
//! Batch elements run one after the other; the heads of each (and the query tiles, or for
//! decoding the key blocks) run on rayon threads, as [`Options::threads`] says.
//!
//! # Errors
//!
//! Every failure is a [`candle_core::Error`] whose message starts with
//! `scaled_dot_product_attention:` and names the argument: a device other than the CPU, a
//! dtype other than `f32` / `f64` or differing between the inputs, a rank other than 4,
//! mismatched batch sizes, head counts (H not a multiple of G), key lengths or head widths,
//! and every error of [`attention_math::multi_head_attention`] (non-finite entries in q, k or
//! v, a bad softcap). Non-finite inputs are errors here, where candle's unfused path would
//! propagate NaN.
//!
//! # Examples
//!
//! ```
//! use attention_math_candle::{scaled_dot_product_attention, Mask, Options};
//! use candle_core::{Device, Tensor};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! // Batch 2, 4 query heads sharing 2 key-value heads, 5 tokens, head width 8.
//! let q = Tensor::randn(0f32, 1.0, (2, 4, 5, 8), &dev)?;
//! let k = Tensor::randn(0f32, 1.0, (2, 2, 5, 8), &dev)?;
//! let v = Tensor::randn(0f32, 1.0, (2, 2, 5, 8), &dev)?;
//! let out = scaled_dot_product_attention(&q, &k, &v, &Mask::causal(), &Options::new())?;
//! assert_eq!(out.dims(), &[2, 4, 5, 8]);
//!
//! // candle's unfused path for query head 3 (key-value head 1) of batch element 1.
//! let (qh, kh, vh) = (q.get(1)?.get(3)?, k.get(1)?.get(1)?, v.get(1)?.get(1)?);
//! let bias = Tensor::from_vec(
//!     (0..25).map(|x| if x % 5 <= x / 5 { 0f32 } else { f32::NEG_INFINITY }).collect(),
//!     (5, 5),
//!     &dev,
//! )?;
//! let s = ((qh.matmul(&kh.t()?)? / 8f64.sqrt())? + bias)?;
//! let want = candle_nn::ops::softmax_last_dim(&s)?.matmul(&vh)?;
//! let diff = (out.get(1)?.get(3)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-5);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub use attention_math::Mask;

use attention_math::{AttentionOptions, Float, Heads, MultiHeadOutput};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType};
use nalgebra::{Const, DMatrix, DMatrixView, Dyn};
use std::sync::Mutex;

/// The prefix of every error message of this crate.
const NAME: &str = "scaled_dot_product_attention";

fn error(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(format!("{NAME}: {msg}"))
}

/// The options of [`scaled_dot_product_attention`] beyond the mask: the score scale, a
/// softcap, ALiBi and the thread count. Built with chained setters from [`Options::new`] (or
/// `Default`); the values are `f64` and converted to the tensors' dtype when the op runs.
/// They are those of [`attention_math::AttentionOptions`] (an additive bias matrix is not
/// offered: use a [`Mask`], or ALiBi).
///
/// # Examples
///
/// ```
/// use attention_math_candle::{scaled_dot_product_attention, Mask, Options};
/// use candle_core::{Device, Tensor};
///
/// # fn main() -> candle_core::Result<()> {
/// let q = Tensor::randn(0f64, 1.0, (1, 2, 3, 4), &Device::Cpu)?;
/// let opts = Options::new().scale(0.25).softcap(30.0).threads(1);
/// let out = scaled_dot_product_attention(&q, &q, &q, &Mask::causal(), &opts)?;
/// assert_eq!(out.dims(), &[1, 2, 3, 4]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Options {
    scale: Option<f64>,
    softcap: Option<f64>,
    alibi: Option<Alibi>,
    threads: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Alibi {
    ByHead,
    Slope(f64),
}

impl Options {
    /// The defaults: scale `1/√d`, no softcap, no ALiBi, the current rayon pool.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attention_math_candle::Options::new(), Default::default());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Overrides the score scale (default `1/√d`), as
    /// [`AttentionOptions::scale`](attention_math::AttentionOptions::scale).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math_candle::{scaled_dot_product_attention, Mask, Options};
    /// use candle_core::{Device, Tensor};
    ///
    /// # fn main() -> candle_core::Result<()> {
    /// // With scale 0 every key gets the same weight: the output is the mean of v.
    /// let q = Tensor::randn(0f64, 1.0, (1, 1, 1, 2), &Device::Cpu)?;
    /// let k = Tensor::randn(0f64, 1.0, (1, 1, 2, 2), &Device::Cpu)?;
    /// let v = Tensor::new(&[[[[2.0f64], [4.0]]]], &Device::Cpu)?;
    /// let out = scaled_dot_product_attention(&q, &k, &v, &Mask::none(), &Options::new().scale(0.0))?;
    /// assert!((out.flatten_all()?.to_vec1::<f64>()?[0] - 3.0).abs() < 1e-15);
    /// # Ok(())
    /// # }
    /// ```
    pub fn scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Caps the scaled scores smoothly, `S ← c · tanh(S / c)` (Gemma 2), before the mask, as
    /// [`AttentionOptions::softcap`](attention_math::AttentionOptions::softcap); `c` must be
    /// finite and > 0 (else the op returns an error).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math_candle::{scaled_dot_product_attention, Mask, Options};
    /// use candle_core::{Device, Tensor};
    ///
    /// # fn main() -> candle_core::Result<()> {
    /// let q = Tensor::new(&[[[[100.0f64]]]], &Device::Cpu)?;
    /// let k = Tensor::new(&[[[[100.0f64], [0.0]]]], &Device::Cpu)?;
    /// let v = Tensor::new(&[[[[1.0f64], [0.0]]]], &Device::Cpu)?;
    /// let out = scaled_dot_product_attention(&q, &k, &v, &Mask::none(), &Options::new().softcap(1.0))?;
    /// // The scores are capped at ≈ 1 and 0, so the weight of key 0 is e / (e + 1).
    /// let e = 1f64.exp();
    /// assert!((out.flatten_all()?.to_vec1::<f64>()?[0] - e / (e + 1.0)).abs() < 1e-12);
    /// assert!(scaled_dot_product_attention(&q, &k, &v, &Mask::none(), &Options::new().softcap(-1.0)).is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn softcap(mut self, cap: f64) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// ALiBi with the paper's slopes by head:
    /// query head h of H gets slope [`attention_math::alibi_slopes`]`(H)[h]` (see
    /// [`AttentionOptions::alibi`](attention_math::AttentionOptions::alibi); computed inside
    /// the kernel, never as a tensor).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math_candle::{scaled_dot_product_attention, Mask, Options};
    /// use candle_core::{Device, Tensor};
    ///
    /// # fn main() -> candle_core::Result<()> {
    /// let x = Tensor::randn(0f32, 1.0, (1, 4, 6, 8), &Device::Cpu)?;
    /// let out = scaled_dot_product_attention(&x, &x, &x, &Mask::causal(), &Options::new().alibi())?;
    /// assert_eq!(out.dims(), &[1, 4, 6, 8]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn alibi(mut self) -> Self {
        self.alibi = Some(Alibi::ByHead);
        self
    }

    /// ALiBi with one slope for every head (see
    /// [`AttentionOptions::alibi_slope`](attention_math::AttentionOptions::alibi_slope)).
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math_candle::{scaled_dot_product_attention, Mask, Options};
    /// use candle_core::{Device, Tensor};
    ///
    /// # fn main() -> candle_core::Result<()> {
    /// // A steep slope: every query attends (almost) only to its own position.
    /// let q = Tensor::zeros((1, 1, 3, 2), candle_core::DType::F64, &Device::Cpu)?;
    /// let v = Tensor::new(&[[[[0.0f64], [1.0], [2.0]]]], &Device::Cpu)?;
    /// let out = scaled_dot_product_attention(&q, &q, &v, &Mask::none(), &Options::new().alibi_slope(50.0))?;
    /// assert!((out.flatten_all()?.to_vec1::<f64>()?[2] - 2.0).abs() < 1e-15);
    /// # Ok(())
    /// # }
    /// ```
    pub fn alibi_slope(mut self, slope: f64) -> Self {
        self.alibi = Some(Alibi::Slope(slope));
        self
    }

    /// Runs the op on a private pool of `threads` workers (1 = the calling thread), as
    /// [`AttentionOptions::threads`](attention_math::AttentionOptions::threads); by default
    /// the current rayon pool. The result is bit-identical for every thread count.
    ///
    /// # Examples
    ///
    /// ```
    /// use attention_math_candle::{scaled_dot_product_attention, Mask, Options};
    /// use candle_core::{Device, Tensor};
    ///
    /// # fn main() -> candle_core::Result<()> {
    /// let x = Tensor::randn(0f32, 1.0, (1, 2, 300, 16), &Device::Cpu)?;
    /// let one = scaled_dot_product_attention(&x, &x, &x, &Mask::causal(), &Options::new().threads(1))?;
    /// let two = scaled_dot_product_attention(&x, &x, &x, &Mask::causal(), &Options::new().threads(2))?;
    /// assert_eq!(one.flatten_all()?.to_vec1::<f32>()?, two.flatten_all()?.to_vec1::<f32>()?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }

    /// The crate's options in the dtype `T`.
    fn attention<T: Float>(&self) -> AttentionOptions<'static, T> {
        let mut o = AttentionOptions::new();
        if let Some(s) = self.scale {
            o = o.scale(T::of_f64(s));
        }
        if let Some(c) = self.softcap {
            o = o.softcap(T::of_f64(c));
        }
        match self.alibi {
            Some(Alibi::ByHead) => o = o.alibi(),
            Some(Alibi::Slope(s)) => o = o.alibi_slope(T::of_f64(s)),
            None => {}
        }
        if let Some(t) = self.threads {
            o = o.threads(t);
        }
        o
    }
}

/// Fused scaled dot-product attention on candle CPU tensors, with grouped-query attention
/// and `attention_math`'s masks; named after PyTorch's
/// `torch.nn.functional.scaled_dot_product_attention`.
///
/// Shapes: `q` (B, H, n, d), `k` (B, G, m, d), `v` (B, G, m, d_v), H a multiple of G; the
/// result is a contiguous (B, H, n, d_v) tensor of the inputs' dtype. Query head h reads
/// key-value head `h / (H/G)`. The mask is applied to every (batch, head) pair with n queries
/// and m keys (so [`Mask::causal`] is top-left aligned and [`Mask::causal_bottom_right`]
/// aligns the queries with the last n keys, as in a KV-cache decode step). A fully masked
/// query row gives an output row of zeros.
///
/// The op is a [`candle_core::CustomOp3`]: the result is tracked by candle's autograd when an
/// input is a `Var` (or otherwise tracked), and `Tensor::backward` runs the crate's tiled
/// backward pass, using the log-sum-exp saved by the forward pass (B·n·H values, kept with the
/// graph node; no recomputation of the forward). The gradients are plain tensors (no
/// second-order gradients).
///
/// See [the crate documentation](crate) for the layouts read in place and the copies made.
///
/// # Errors
///
/// A [`candle_core::Error`] (see [the crate documentation](crate#errors)): non-CPU devices,
/// dtypes other than `f32` and `f64` (or differing between the inputs), ranks other than 4,
/// inconsistent shapes, and the errors of [`attention_math::multi_head_attention`].
///
/// # Examples
///
/// ```
/// use attention_math_candle::{scaled_dot_product_attention, Mask, Options};
/// use candle_core::{DType, Device, Tensor, Var};
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// // A decode step: one new query per head, 32 query heads over 8 KV heads, 16 cached keys.
/// let q = Var::randn(0f32, 1.0, (1, 32, 1, 64), &dev)?;
/// let k = Tensor::randn(0f32, 1.0, (1, 8, 16, 64), &dev)?;
/// let v = Tensor::randn(0f32, 1.0, (1, 8, 16, 64), &dev)?;
/// let out = scaled_dot_product_attention(&q, &k, &v, &Mask::causal_bottom_right(), &Options::new())?;
/// assert_eq!(out.dims(), &[1, 32, 1, 64]);
///
/// // Gradients flow back through candle's autograd.
/// let grads = out.sqr()?.sum_all()?.backward()?;
/// assert_eq!(grads.get(&q).unwrap().dims(), &[1, 32, 1, 64]);
///
/// // f16 is not supported.
/// let h = q.to_dtype(DType::F16)?;
/// let e = scaled_dot_product_attention(&h, &h, &h, &Mask::none(), &Options::new()).unwrap_err();
/// assert!(e.to_string().contains("f32 or f64"));
/// # Ok(())
/// # }
/// ```
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    opts: &Options,
) -> candle_core::Result<Tensor> {
    for (arg, t) in [("q", q), ("k", k), ("v", v)] {
        if !t.device().is_cpu() {
            return Err(error(format_args!(
                "{arg} is on {:?}, but the op runs on the CPU only",
                t.device().location()
            )));
        }
    }
    q.apply_op3(
        k,
        v,
        Sdpa {
            mask: mask.clone(),
            opts: *opts,
            lse: Mutex::new(None),
        },
    )
}

/// The op behind [`scaled_dot_product_attention`]. One is made per call, so the log-sum-exp
/// it saves in its forward pass belongs to the one result its backward pass is asked about.
struct Sdpa {
    mask: Mask,
    opts: Options,
    /// Every batch element's per-head log-sum-exp (n x H), from the forward pass.
    lse: Mutex<Option<Saved>>,
}

enum Saved {
    F32(Vec<DMatrix<f32>>),
    F64(Vec<DMatrix<f64>>),
}

/// The two dtypes the op computes in.
trait Scalar: Float + WithDType {
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
    fn save(lse: Vec<DMatrix<Self>>) -> Saved;
    fn saved(s: &Saved) -> Option<&[DMatrix<Self>]>;
}

macro_rules! scalar {
    ($t:ty, $v:ident) => {
        impl Scalar for $t {
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$v(x) => Some(x),
                    _ => None,
                }
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$v(v)
            }
            fn save(lse: Vec<DMatrix<Self>>) -> Saved {
                Saved::$v(lse)
            }
            fn saved(s: &Saved) -> Option<&[DMatrix<Self>]> {
                match s {
                    Saved::$v(x) => Some(x),
                    _ => None,
                }
            }
        }
    };
}
scalar!(f32, F32);
scalar!(f64, F64);

/// The sizes of one call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    h: usize,
    g: usize,
    n: usize,
    m: usize,
    d: usize,
    dv: usize,
}

impl Dims {
    fn heads(&self) -> Heads {
        Heads::grouped(self.h, self.g)
    }
}

fn rank4(arg: &str, l: &Layout) -> candle_core::Result<[usize; 4]> {
    l.dims().try_into().map_err(|_| {
        error(format_args!(
            "{arg} must have rank 4 (batch, heads, seq, dim), but its shape is {:?}",
            l.dims()
        ))
    })
}

fn check_dims(q: &Layout, k: &Layout, v: &Layout) -> candle_core::Result<Dims> {
    let [b, h, n, d] = rank4("q", q)?;
    let [bk, g, m, dk] = rank4("k", k)?;
    let [bv, gv, mv, dv] = rank4("v", v)?;
    let shapes = || format!("q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims());
    if bk != b || bv != b {
        return Err(error(format_args!("the batch sizes differ ({})", shapes())));
    }
    if gv != g || mv != m {
        return Err(error(format_args!(
            "k and v must have the same number of heads and keys ({})",
            shapes()
        )));
    }
    if dk != d {
        return Err(error(format_args!(
            "q and k must have the same head width ({})",
            shapes()
        )));
    }
    if h == 0 || g == 0 || !h.is_multiple_of(g) {
        return Err(error(format_args!(
            "the query heads ({h}) must be a positive multiple of the key-value heads ({g}) ({})",
            shapes()
        )));
    }
    Ok(Dims {
        b,
        h,
        g,
        n,
        m,
        d,
        dv,
    })
}

fn dtype_error(arg: &str, dtype: DType) -> candle_core::Error {
    error(format_args!(
        "{arg} has dtype {}, but the op computes in f32 or f64 only",
        dtype.as_str()
    ))
}

/// The elements of a CPU storage as `T`, or an error naming the argument.
fn data<'s, T: Scalar>(arg: &str, s: &'s CpuStorage, want: DType) -> candle_core::Result<&'s [T]> {
    T::slice(s).ok_or_else(|| {
        error(format_args!(
            "{arg} has dtype {}, but q has dtype {}",
            s.dtype().as_str(),
            want.as_str()
        ))
    })
}

/// A tensor's storage as CPU elements of `T`, or an error naming the argument.
fn cpu_data<'s, T: Scalar>(arg: &str, s: &'s Storage) -> candle_core::Result<&'s [T]> {
    match s {
        Storage::Cpu(c) => data::<T>(arg, c, T::DTYPE),
        _ => Err(error(format_args!(
            "backward: {arg} is not on the CPU ({:?})",
            s.device().location()
        ))),
    }
}

/// Batch element `b` of a (B, heads, rows, width) tensor, as the rows x (heads·width)
/// column-major matrix (head h in columns `h·width ..`) that the crate's multi-head entry
/// points take: a view when the strides allow (see the crate docs), else a copy.
enum Slab<'a, T: Scalar> {
    Borrowed(DMatrixView<'a, T>),
    Owned(DMatrix<T>),
}

impl<'a, T: Scalar> Slab<'a, T> {
    fn of(data: &'a [T], layout: &Layout, b: usize) -> Self {
        let [_, heads, rows, width] = layout.dims() else {
            unreachable!("rank 4 is checked first")
        };
        let (heads, rows, width) = (*heads, *rows, *width);
        let [sb, sh, sr, sw] = layout.stride() else {
            unreachable!("rank 4 is checked first")
        };
        let base = layout.start_offset() + b * sb;
        let cols = heads * width;
        if rows == 0 || cols == 0 {
            return Slab::Owned(DMatrix::zeros(rows, cols));
        }
        {
            // Column j = h·width + c must start at base + j·cs, rows 1 apart.
            let cs = if width > 1 {
                *sw
            } else if heads > 1 {
                *sh
            } else {
                rows
            };
            let fits = (rows == 1 || *sr == 1)
                && (width == 1 || *sw == cs)
                && (heads == 1 || *sh == width * cs)
                && cs >= rows;
            if fits {
                let end = base + (cols - 1) * cs + rows;
                return Slab::Borrowed(DMatrixView::from_slice_with_strides_generic(
                    &data[base..end],
                    Dyn(rows),
                    Dyn(cols),
                    Const::<1>,
                    Dyn(cs),
                ));
            }
        }
        let mut out = vec![T::default(); rows * cols];
        for h in 0..heads {
            gather(
                &data[base + h * sh..],
                (*sr, *sw),
                &mut out[h * width * rows..(h + 1) * width * rows],
                rows,
                width,
            );
        }
        Slab::Owned(DMatrix::from_vec(rows, cols, out))
    }

    fn view(&self) -> DMatrixView<'_, T> {
        match self {
            Slab::Borrowed(v) => *v,
            Slab::Owned(m) => m.as_view(),
        }
    }
}

/// Tile edge of the strided copies.
const TILE: usize = 32;

/// Copies the rows x width block at `src` (element (i, c) at `src[i·sr + c·sw]`) into
/// `dst` column-major (element (i, c) at `dst[c·rows + i]`), tile by tile so that both sides
/// stay in cache whatever the strides.
fn gather<T: Copy>(src: &[T], (sr, sw): (usize, usize), dst: &mut [T], rows: usize, width: usize) {
    if sw == 1 && sr == width {
        // A contiguous row-major block (candle's default layout): a blocked transpose.
        transpose::transpose(&src[..rows * width], dst, width, rows);
        return;
    }
    if sr == 1 {
        for c in 0..width {
            dst[c * rows..(c + 1) * rows].copy_from_slice(&src[c * sw..c * sw + rows]);
        }
        return;
    }
    for i0 in (0..rows).step_by(TILE) {
        for c0 in (0..width).step_by(TILE) {
            for c in c0..(c0 + TILE).min(width) {
                for i in i0..(i0 + TILE).min(rows) {
                    dst[c * rows + i] = src[i * sr + c * sw];
                }
            }
        }
    }
}

/// Writes the rows x (heads·width) column-major matrix `m` into `dst`, a row-major
/// (heads, rows, width) block: the inverse of [`Slab::of`] on a contiguous tensor.
fn scatter<T: Copy>(m: &DMatrix<T>, heads: usize, dst: &mut [T]) {
    let rows = m.nrows();
    let width = m.ncols().checked_div(heads).unwrap_or(0);
    let src = m.as_slice();
    for h in 0..heads {
        let block = &src[h * width * rows..(h + 1) * width * rows];
        let out = &mut dst[h * rows * width..(h + 1) * rows * width];
        // block: element (i, c) at c·rows + i, i.e. a row-major width x rows block; out: at
        // i·width + c.
        transpose::transpose(block, out, rows, width);
    }
}

impl Sdpa {
    fn forward<T: Scalar>(
        &self,
        (q, ql): (&CpuStorage, &Layout),
        (k, kl): (&CpuStorage, &Layout),
        (v, vl): (&CpuStorage, &Layout),
        dims: Dims,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = data::<T>("q", q, T::DTYPE)?;
        let k = data::<T>("k", k, T::DTYPE)?;
        let v = data::<T>("v", v, T::DTYPE)?;
        let Dims { b, h, n, dv, .. } = dims;
        let opts = self.opts.attention::<T>();
        let mut out = vec![T::default(); b * h * n * dv];
        let mut lse = Vec::with_capacity(b);
        for bi in 0..b {
            let (qs, ks, vs) = (
                Slab::of(q, ql, bi),
                Slab::of(k, kl, bi),
                Slab::of(v, vl, bi),
            );
            let MultiHeadOutput { output, lse: l } = attention_math::multi_head_attention_with(
                qs.view(),
                ks.view(),
                vs.view(),
                dims.heads(),
                &self.mask,
                &opts,
            )
            .map_err(|e| error(format_args!("batch element {bi}: {e}")))?;
            scatter(&output, h, &mut out[bi * h * n * dv..(bi + 1) * h * n * dv]);
            lse.push(l);
        }
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(T::save(lse));
        Ok((T::storage(out), Shape::from((b, h, n, dv))))
    }

    #[allow(clippy::type_complexity)]
    fn backward<T: Scalar>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (qg, ql) = q.storage_and_layout();
        let (kg, kl) = k.storage_and_layout();
        let (vg, vl) = v.storage_and_layout();
        let (rg, rl) = res.storage_and_layout();
        let (gg, gl) = grad.storage_and_layout();
        let cpu = cpu_data::<T>;
        let (qd, kd, vd) = (cpu("q", &qg)?, cpu("k", &kg)?, cpu("v", &vg)?);
        let (rd, gd) = (cpu("the result", &rg)?, cpu("the gradient", &gg)?);
        let dims = check_dims(ql, kl, vl)?;
        let Dims {
            b,
            h,
            g,
            n,
            m,
            d,
            dv,
        } = dims;
        for (arg, l) in [("the result", rl), ("the gradient", gl)] {
            if l.dims() != [b, h, n, dv] {
                return Err(error(format_args!(
                    "backward: {arg} has shape {:?}, not {:?}",
                    l.dims(),
                    [b, h, n, dv]
                )));
            }
        }
        let opts = self.opts.attention::<T>();
        let saved = self.lse.lock().unwrap_or_else(|e| e.into_inner());
        let saved = saved.as_ref().and_then(T::saved);
        let (mut dq, mut dk, mut dvs) = (
            vec![T::default(); b * h * n * d],
            vec![T::default(); b * g * m * d],
            vec![T::default(); b * g * m * dv],
        );
        for bi in 0..b {
            let (qs, ks, vs) = (
                Slab::of(qd, ql, bi),
                Slab::of(kd, kl, bi),
                Slab::of(vd, vl, bi),
            );
            let fwd = match saved {
                Some(lse) => MultiHeadOutput {
                    output: Slab::of(rd, rl, bi).view().into_owned(),
                    lse: lse[bi].clone(),
                },
                // Not reached (the forward pass saves it); recompute rather than fail.
                None => attention_math::multi_head_attention_with(
                    qs.view(),
                    ks.view(),
                    vs.view(),
                    dims.heads(),
                    &self.mask,
                    &opts,
                )
                .map_err(|e| error(format_args!("backward, batch element {bi}: {e}")))?,
            };
            let gs = Slab::of(gd, gl, bi);
            let grads = attention_math::multi_head_attention_backward(
                qs.view(),
                ks.view(),
                vs.view(),
                dims.heads(),
                &self.mask,
                &opts,
                &fwd,
                gs.view(),
            )
            .map_err(|e| error(format_args!("backward, batch element {bi}: {e}")))?;
            scatter(&grads.dq, h, &mut dq[bi * h * n * d..(bi + 1) * h * n * d]);
            scatter(&grads.dk, g, &mut dk[bi * g * m * d..(bi + 1) * g * m * d]);
            scatter(
                &grads.dv,
                g,
                &mut dvs[bi * g * m * dv..(bi + 1) * g * m * dv],
            );
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, h, n, d), dev)?),
            Some(Tensor::from_vec(dk, (b, g, m, d), dev)?),
            Some(Tensor::from_vec(dvs, (b, g, m, dv), dev)?),
        ))
    }
}

impl CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = check_dims(l1, l2, l3)?;
        let (q, k, v) = ((s1, l1), (s2, l2), (s3, l3));
        match s1.dtype() {
            DType::F32 => self.forward::<f32>(q, k, v, dims),
            DType::F64 => self.forward::<f64>(q, k, v, dims),
            other => Err(dtype_error("q", other)),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match q.dtype() {
            DType::F32 => self.backward::<f32>(q, k, v, res, grad),
            DType::F64 => self.backward::<f64>(q, k, v, res, grad),
            other => Err(dtype_error("q", other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every layout reads the same numbers: contiguous (copied), head-column-major
    /// (borrowed), a decode query (borrowed), a transpose of (B, n, H, d) (copied).
    #[test]
    fn slabs_read_every_layout() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 5.0 * 4.0, &dev)
            .unwrap()
            .reshape((2, 3, 5, 4))
            .unwrap();
        let want = |b: usize| {
            DMatrix::from_fn(5, 12, |i, j| ((b * 3 + j / 4) * 20 + i * 4 + j % 4) as f32)
        };
        let check = |t: &Tensor, borrowed: bool| {
            let (s, l) = t.storage_and_layout();
            let Storage::Cpu(c) = &*s else { panic!() };
            let data = f32::slice(c).unwrap();
            for b in 0..2 {
                let slab = Slab::of(data, l, b);
                assert_eq!(matches!(slab, Slab::Borrowed(_)), borrowed, "{:?}", l);
                assert_eq!(slab.view().into_owned(), want(b));
            }
        };
        check(&x, false);
        let cm = x.transpose(2, 3).unwrap().contiguous().unwrap();
        check(&cm.transpose(2, 3).unwrap(), true);
        let bnhd = x.transpose(1, 2).unwrap().contiguous().unwrap();
        check(&bnhd.transpose(1, 2).unwrap(), false);
        // A decode query, (B, H, 1, d) row-major: its own view.
        let q = x.narrow(2, 0, 1).unwrap().contiguous().unwrap();
        let (s, l) = q.storage_and_layout();
        let Storage::Cpu(c) = &*s else { panic!() };
        let slab = Slab::of(f32::slice(c).unwrap(), l, 1);
        assert!(matches!(slab, Slab::Borrowed(_)));
        assert_eq!(slab.view().into_owned(), want(1).rows(0, 1).into_owned());
    }

    #[test]
    fn scatter_inverts_the_slab() {
        let m = DMatrix::from_fn(3, 4, |i, j| (i * 10 + j) as f64);
        let mut out = vec![0.0; 12];
        scatter(&m, 2, &mut out);
        // Head 0 is columns 0-1, row-major (3, 2); head 1 columns 2-3.
        assert_eq!(
            out,
            [0., 1., 10., 11., 20., 21., 2., 3., 12., 13., 22., 23.]
        );
    }
}

/// The README's example, run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
