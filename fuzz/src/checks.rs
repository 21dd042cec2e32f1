//! Property checks for the fuzz targets of `attention-math`, shared by the `cargo fuzz`
//! targets (`fuzz/fuzz_targets/*.rs`, through `attention_math_fuzz::checks`) and by the
//! stable replay test `tests/fuzz_corpus.rs` (which includes this file with `#[path]`).
//!
//! This file depends only on `attention_math`, `nalgebra` and `std`: the bytes are decoded
//! by the small hand-written [`Bytes`] reader below (not by `arbitrary`), so the fuzzer and
//! the replay test turn a file into exactly the same input.
//!
//! Every check panics (with the decoded input in the message) when a property fails:
//! a panic of the library itself, an `Err` that is not a documented variant of the function
//! called, an `Ok` where an `Err` is due (or the reverse), a non-finite result from finite
//! input where the math is finite, or a fast path that disagrees with its reference beyond
//! a tolerance derived from the conditioning of the problem.
//!
//! Decoding: byte 0 picks the float type (even: f32, odd: f64); then every target reads
//! its shapes and parameters, and values come from [`Bytes::value`]: most bytes map to a
//! moderate value in [-7, 7], some to special values (±0, ±1, NaN, ±inf, ±MAX, the
//! smallest normal and subnormal, ε, ±√MAX), some to wide values `m · 2^e` for any
//! exponent, and some to raw bit patterns of the type. Exhausted input reads as zeros.

// `!(x < y)` is meant: it is true for NaN. Index loops mirror the formulas.
#![allow(clippy::neg_cmp_op_on_partial_ord, clippy::needless_range_loop)]

use attention_math::sheet::{diagnostics, lm, lora, moe, preference};
use attention_math::{
    AttentionOptions, Block, Error, Float, Heads, KvCache, Mask, Rope, RopeLayout,
    attention_backward, attention_backward_reference, entropy, entropy_bits, entropy_from_logits,
    entropy_from_logits_grad, entropy_from_logits_rows, entropy_rows, exp_in_place, kl_divergence,
    log_softmax, log_softmax_in_place, log_softmax_rows, log_softmax_vjp, logsumexp,
    logsumexp_rows, multi_head_attention, scaled_attention_reference, scaled_attention_with,
    scaled_attention_with_stats, softmax, softmax_in_place, softmax_jacobian, softmax_jvp,
    softmax_rows, softmax_vjp, softmax_with_temperature,
};
use nalgebra::DMatrix;
use std::fmt::Debug;

/// A target's check: the raw fuzz input in, a panic on a failed property.
pub type Check = fn(&[u8]);

/// Every fuzz target, by name (the directory names under `fuzz/corpus/`).
pub const TARGETS: &[(&str, Check)] = &[
    ("attention", attention),
    ("backward", backward),
    ("multihead", multihead),
    ("kv_cache", kv_cache),
    ("rope", rope),
    ("softmax", softmax_family),
    ("entropy", entropy_family),
    ("lm", lm),
    ("moe", moe),
    ("preference", preference),
    ("lora", lora),
    ("diagnostics", diagnostics),
];

// ------------------------------------------------------------------------------------------
// Decoding

/// A reader over the fuzzer's bytes; reads past the end give zeros.
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    /// A reader at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data, pos: 0 }
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn u64(&mut self, bytes: usize) -> u64 {
        (0..bytes).fold(0, |acc, k| acc | (u64::from(self.u8()) << (8 * k)))
    }

    /// A number in `0 ..= max` (max < 65536).
    fn upto(&mut self, max: usize) -> usize {
        if max < 256 {
            self.u8() as usize % (max + 1)
        } else {
            self.u64(2) as usize % (max + 1)
        }
    }

    fn flag(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// A count or position parameter: mostly small (`0 ..= small`), sometimes extreme.
    fn param(&mut self, small: usize) -> usize {
        let b = self.u8();
        if b < 224 {
            return self.upto(small);
        }
        const EXTREME: [usize; 8] = [
            usize::MAX,
            usize::MAX - 1,
            1 << 63,
            (1 << 63) - 1,
            1 << 32,
            (1 << 32) - 1,
            usize::MAX / 2 + 2,
            1 << 31,
        ];
        EXTREME[(b - 224) as usize % 8]
    }

    /// A value of the float type from the next byte(s); see the module docs.
    fn value<T: Fz>(&mut self) -> T {
        let b = self.u8();
        match b {
            0..=0xDF => T::of_f64((f64::from(b) - 112.0) / 16.0),
            0xE0..=0xEF => T::special(b - 0xE0),
            0xF0..=0xF3 => {
                let m = (f64::from(self.u8()) - 128.0) / 16.0;
                T::of_f64(m * 2f64.powi(i32::from(self.u8() as i8)))
            }
            0xF4..=0xF7 => {
                let m = (f64::from(self.u8()) - 128.0) / 16.0;
                T::of_f64(m * 2f64.powi(8 * i32::from(self.u8() as i8)))
            }
            _ => T::from_raw(self.u64(T::BYTES)),
        }
    }

    fn matrix<T: Fz>(&mut self, rows: usize, cols: usize) -> DMatrix<T> {
        let mut m = DMatrix::<T>::zeros(rows, cols);
        for j in 0..cols {
            for i in 0..rows {
                m[(i, j)] = self.value();
            }
        }
        m
    }

    fn vec<T: Fz>(&mut self, len: usize) -> Vec<T> {
        (0..len).map(|_| self.value()).collect()
    }

    /// A mask over (at most) `n x m` with leaves of every kind and all three combinators;
    /// with it, a model of the mask evaluated independently of the library.
    fn mask(&mut self, depth: usize) -> (Mask, Model) {
        let tag = self.u8() % if depth >= 4 { 8 } else { 12 };
        match tag {
            0 => (Mask::none(), Model::None),
            1 => (Mask::causal(), Model::Causal),
            2 => (Mask::causal_bottom_right(), Model::BottomRight),
            3 => {
                let p = self.param(48);
                (Mask::prefix_lm(p), Model::Prefix(p))
            }
            4 => {
                let w = self.param(48);
                (Mask::sliding_window(w), Model::Window(w))
            }
            5 => {
                let v = self.param(48);
                (Mask::key_padding(v), Model::Padding(v))
            }
            6 => {
                let len = self.upto(44);
                let ids: Vec<usize> = (0..len).map(|_| self.upto(3)).collect();
                (Mask::documents(ids.clone()), Model::Docs(ids))
            }
            7 => {
                let (a, b, c) = (self.upto(7), self.upto(7), 1 + self.upto(6));
                let t = self.upto(c);
                let f = move |i: usize, j: usize| {
                    (i.wrapping_mul(a).wrapping_add(j.wrapping_mul(b))) % c < t
                };
                (Mask::from_fn(f), Model::Fn(a, b, c, t))
            }
            8 => {
                let (x, mx) = self.mask(depth + 1);
                let (y, my) = self.mask(depth + 1);
                (x.and(y), Model::And(Box::new(mx), Box::new(my)))
            }
            9 => {
                let (x, mx) = self.mask(depth + 1);
                let (y, my) = self.mask(depth + 1);
                (x.or(y), Model::Or(Box::new(mx), Box::new(my)))
            }
            10 => {
                let (x, mx) = self.mask(depth + 1);
                (x.not(), Model::Not(Box::new(mx)))
            }
            _ => {
                // A deep chain: `x op none op none ...` (the library must not recurse).
                let (mut x, mut mx) = self.mask(depth + 1);
                let count = 1 + self.upto(255) * 8;
                let or = self.flag();
                for _ in 0..count {
                    if or {
                        x = x.or(Mask::none().not());
                        mx = Model::Or(Box::new(mx), Box::new(Model::Not(Box::new(Model::None))));
                    } else {
                        x = x.and(Mask::none());
                        mx = Model::And(Box::new(mx), Box::new(Model::None));
                    }
                }
                (x, mx)
            }
        }
    }
}

/// The float types, with what the checks need beyond [`Float`].
pub trait Fz: Float {
    /// Bytes in the raw bit pattern.
    const BYTES: usize;
    /// The largest finite value, as f64.
    const MAXV: f64;
    /// The smallest positive normal value, as f64.
    const TINY: f64;
    /// The value with these raw bits (truncated to the type's width).
    fn from_raw(bits: u64) -> Self;
    /// One of 16 special values.
    fn special(k: u8) -> Self {
        let max = Self::MAXV;
        Self::of_f64(match k {
            0 => 0.0,
            1 => -0.0,
            2 => 1.0,
            3 => -1.0,
            4 => f64::NAN,
            5 => f64::INFINITY,
            6 => f64::NEG_INFINITY,
            7 => max,
            8 => -max,
            9 => Self::TINY,
            10 => return Self::from_raw(1),
            11 => Self::EPSILON.as_f64(),
            12 => max.sqrt(),
            13 => -max.sqrt(),
            14 => 1e4,
            _ => -1e4,
        })
    }
}

impl Fz for f32 {
    const BYTES: usize = 4;
    const MAXV: f64 = f32::MAX as f64;
    const TINY: f64 = f32::MIN_POSITIVE as f64;
    fn from_raw(bits: u64) -> Self {
        f32::from_bits(bits as u32)
    }
}

impl Fz for f64 {
    const BYTES: usize = 8;
    const MAXV: f64 = f64::MAX;
    const TINY: f64 = f64::MIN_POSITIVE;
    fn from_raw(bits: u64) -> Self {
        f64::from_bits(bits)
    }
}

/// An independent model of a mask, from the definitions in the docs (positions in u128).
#[derive(Clone, Debug)]
pub enum Model {
    None,
    Causal,
    BottomRight,
    Prefix(usize),
    Window(usize),
    Padding(usize),
    Docs(Vec<usize>),
    Fn(usize, usize, usize, usize),
    And(Box<Model>, Box<Model>),
    Or(Box<Model>, Box<Model>),
    Not(Box<Model>),
}

impl Model {
    fn allows(&self, n: usize, m: usize, i: usize, j: usize) -> bool {
        let (i8, j8) = (i as u128, j as u128);
        match self {
            Model::None => true,
            Model::Causal => j <= i,
            Model::BottomRight => j8 + n as u128 <= i8 + m as u128,
            Model::Prefix(p) => j < *p || j <= i,
            Model::Window(w) => j <= i && i8 <= j8 + *w as u128,
            Model::Padding(v) => j < *v,
            Model::Docs(ids) => i < ids.len() && j < ids.len() && ids[i] == ids[j],
            Model::Fn(a, b, c, t) => (i.wrapping_mul(*a).wrapping_add(j.wrapping_mul(*b))) % c < *t,
            Model::And(x, y) => x.allows(n, m, i, j) && y.allows(n, m, i, j),
            Model::Or(x, y) => x.allows(n, m, i, j) || y.allows(n, m, i, j),
            Model::Not(x) => !x.allows(n, m, i, j),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Helpers

/// Panics with the property, the details and the decoded input.
macro_rules! ensure {
    ($cond:expr, $input:expr, $($msg:tt)+) => {
        if !$cond {
            panic!("property failed: {}\ninput: {:?}", format!($($msg)+), $input);
        }
    };
}

/// The variant name of a documented error, or `None` for anything else.
fn kind(e: &Error) -> Option<&'static str> {
    Some(match e {
        Error::DimensionMismatch { .. } => "DimensionMismatch",
        Error::ShapeMismatch { .. } => "ShapeMismatch",
        Error::LengthMismatch { .. } => "LengthMismatch",
        Error::NonFinite { .. } => "NonFinite",
        Error::InvalidParameter { .. } => "InvalidParameter",
        Error::IndexOutOfRange { .. } => "IndexOutOfRange",
        Error::HeadSplit { .. } => "HeadSplit",
        Error::HeadWidth { .. } => "HeadWidth",
        Error::Empty { .. } => "Empty",
        Error::TooLarge { .. } => "TooLarge",
        _ => return None,
    })
}

/// Checks that `r` is `Err` exactly when `expected` names a reason, and that the error is
/// one of the variants `allowed` for the function and one of the kinds `expected` predicts
/// (the order of the checks is the library's business). Returns the `Ok` value.
fn expect<V, I: Debug>(
    what: &str,
    r: Result<V, Error>,
    allowed: &[&str],
    expected: &[&str],
    input: &I,
) -> Option<V> {
    match r {
        Ok(v) => {
            ensure!(
                expected.is_empty(),
                input,
                "{what} is Ok but should fail with one of {expected:?}"
            );
            Some(v)
        }
        Err(e) => {
            let k = kind(&e);
            ensure!(
                k.is_some_and(|k| allowed.contains(&k)),
                input,
                "{what}: undocumented error {e:?} (documented: {allowed:?})"
            );
            ensure!(
                k.is_some_and(|k| expected.contains(&k)),
                input,
                "{what}: unexpected error {e:?} (expected one of {expected:?})"
            );
            None
        }
    }
}

fn all_finite<T: Float>(x: &[T]) -> bool {
    x.iter().all(|v| v.is_finite())
}

fn amax(x: &[f64]) -> f64 {
    x.iter().fold(0.0, |a, &v| a.max(v.abs()))
}

fn f64s<T: Float>(m: &DMatrix<T>) -> DMatrix<f64> {
    m.map(|x| x.as_f64())
}

fn eps<T: Float>() -> f64 {
    T::EPSILON.as_f64()
}

/// Bitwise equality of two float slices (NaN equals NaN with the same bits).
fn same_bits<T: Float>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.as_f64().to_bits() == y.as_f64().to_bits())
}

// ------------------------------------------------------------------------------------------
// Attention (forward), masks and options

/// Options decoded for an attention call.
#[derive(Debug, Clone)]
struct Opts<T> {
    scale: Option<T>,
    softcap: Option<T>,
    bias: Option<DMatrix<T>>,
    threads: Option<usize>,
    weights: bool,
}

impl<T: Fz> Opts<T> {
    fn decode(b: &mut Bytes, n: usize, m: usize) -> Self {
        let f = b.u8();
        let scale = (f & 1 != 0).then(|| b.value());
        let softcap = (f & 2 != 0).then(|| b.value());
        let bias = (f & 4 != 0).then(|| {
            let (bn, bm) = if b.u8() < 8 { (n + 1, m) } else { (n, m) };
            let mut x = b.matrix::<T>(bn, bm);
            // -inf is a legal bias (it masks): make it common.
            for v in x.iter_mut() {
                if b.u8() < 40 {
                    *v = T::NEG_INFINITY;
                }
            }
            x
        });
        let threads = (f & 8 != 0).then(|| [1, 2, 3, usize::MAX][b.upto(3)]);
        Opts {
            scale,
            softcap,
            bias,
            threads,
            weights: f & 16 != 0,
        }
    }

    fn build(&self) -> AttentionOptions<'_, T> {
        let mut o = AttentionOptions::new();
        if let Some(s) = self.scale {
            o = o.scale(s);
        }
        if let Some(c) = self.softcap {
            o = o.softcap(c);
        }
        if let Some(bias) = &self.bias {
            o = o.bias(bias);
        }
        if let Some(t) = self.threads {
            o = o.threads(t);
        }
        o.return_weights(self.weights)
    }
}

#[derive(Debug)]
struct AttnInput<T> {
    q: DMatrix<T>,
    k: DMatrix<T>,
    v: DMatrix<T>,
    mask: Mask,
    model: Model,
    opts: Opts<T>,
}

fn attn_input<T: Fz>(b: &mut Bytes, max_nm: usize, max_d: usize) -> AttnInput<T> {
    let (n, m) = (b.upto(max_nm), b.upto(max_nm));
    let (d, dv) = (b.upto(max_d), b.upto(max_d));
    let shape = b.u8();
    let dk = if shape == 1 { d + 1 } else { d };
    let mv = if shape == 2 { m + 1 } else { m };
    let q = b.matrix(n, d);
    let k = b.matrix(m, dk);
    let v = b.matrix(mv, dv);
    let (mask, model) = b.mask(0);
    let opts = Opts::decode(b, n, m);
    AttnInput {
        q,
        k,
        v,
        mask,
        model,
        opts,
    }
}

/// The reasons an attention call must fail, by variant (empty: it must succeed).
fn attn_expected<T: Fz>(x: &AttnInput<T>) -> Vec<&'static str> {
    let mut e = Vec::new();
    if x.k.ncols() != x.q.ncols() || x.v.nrows() != x.k.nrows() {
        e.push("DimensionMismatch");
    }
    if !all_finite(x.q.as_slice()) || !all_finite(x.k.as_slice()) || !all_finite(x.v.as_slice()) {
        e.push("NonFinite");
    }
    if let Some(bias) = &x.opts.bias {
        if bias.shape() != (x.q.nrows(), x.k.nrows()) {
            e.push("ShapeMismatch");
        }
        if bias.iter().any(|b| b.is_nan_value() || *b == T::INFINITY) {
            e.push("NonFinite");
        }
    }
    if x.opts
        .softcap
        .is_some_and(|c| !(c.is_finite() && c > T::zero()))
    {
        e.push("InvalidParameter");
    }
    if x.opts.scale.is_some_and(|s| !s.is_finite()) {
        e.push("InvalidParameter");
    }
    e
}

const ATTN_ERRORS: &[&str] = &[
    "DimensionMismatch",
    "ShapeMismatch",
    "NonFinite",
    "InvalidParameter",
    "TooLarge",
];

/// Per query row of a valid attention call: whether some key is allowed (mask and bias),
/// a bound on the magnitude of its allowed scores, and a bound on their rounding error
/// (both in f64, upper bounds: `|scale| Σ_l |q_il k_jl| + |b_ij|`).
struct RowInfo {
    allowed: Vec<bool>,
    any: bool,
    score_bound: f64,
    score_err: f64,
}

fn row_infos<T: Fz>(x: &AttnInput<T>) -> Vec<RowInfo> {
    let (n, d) = x.q.shape();
    let m = x.k.nrows();
    let scale = x
        .opts
        .scale
        .map_or(if d == 0 { 1.0 } else { 1.0 / (d as f64).sqrt() }, |s| {
            s.as_f64()
        });
    let e = eps::<T>();
    (0..n)
        .map(|i| {
            let mut info = RowInfo {
                allowed: vec![false; m],
                any: false,
                score_bound: 0.0,
                score_err: 0.0,
            };
            for j in 0..m {
                let b = x.opts.bias.as_ref().map_or(0.0, |b| b[(i, j)].as_f64());
                if !x.mask.allows_in(n, m, i, j) || b == f64::NEG_INFINITY {
                    continue;
                }
                info.allowed[j] = true;
                info.any = true;
                let dot: f64 = (0..d)
                    .map(|l| (x.q[(i, l)].as_f64() * x.k[(j, l)].as_f64()).abs())
                    .sum();
                let s = scale.abs() * dot;
                let capped = x.opts.softcap.map_or(s, |c| s.min(c.as_f64()));
                info.score_bound = info.score_bound.max(capped + b.abs());
                let cap_err = x.opts.softcap.map_or(0.0, |c| 4.0 * c.as_f64());
                info.score_err = info
                    .score_err
                    .max(e * ((d as f64 + 2.0) * s + 2.0 * b.abs() + cap_err));
            }
            info
        })
        .collect()
}

/// `attention`: scaled_attention_with (kernel, or the reference with return_weights) and
/// scaled_attention_reference, every mask kind, combinator and option; plus the mask
/// methods (allows_in, to_dense, to_bias, classify) against an independent model.
pub fn attention(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8().is_multiple_of(2) {
        attention_t::<f32>(&mut b)
    } else {
        attention_t::<f64>(&mut b)
    }
}

fn attention_t<T: Fz>(b: &mut Bytes) {
    let x = attn_input::<T>(b, 40, 16);
    check_mask(b, &x);
    let opts = x.opts.build();
    let expected = attn_expected(&x);
    let fast = scaled_attention_with(&x.q, &x.k, &x.v, &x.mask, &opts);
    let slow = scaled_attention_reference(&x.q, &x.k, &x.v, &x.mask, &opts);
    ensure!(
        format!("{:?}", fast.as_ref().err()) == format!("{:?}", slow.as_ref().err()),
        &x,
        "kernel and reference errors differ: {:?} vs {:?}",
        fast.as_ref().err(),
        slow.as_ref().err()
    );
    let Some(fast) = expect("scaled_attention_with", fast, ATTN_ERRORS, &expected, &x) else {
        return;
    };
    let Some(slow) = expect(
        "scaled_attention_reference",
        slow,
        ATTN_ERRORS,
        &expected,
        &x,
    ) else {
        return;
    };
    let (n, m, dv) = (x.q.nrows(), x.k.nrows(), x.v.ncols());
    let e = eps::<T>();
    let infos = row_infos(&x);
    let vmax: Vec<f64> = (0..dv)
        .map(|c| {
            x.v.column(c)
                .iter()
                .fold(0.0_f64, |a, v| a.max(v.as_f64().abs()))
        })
        .collect();
    for (name, out) in [("kernel", &fast), ("reference", &slow)] {
        ensure!(
            out.output.shape() == (n, dv) && out.lse.len() == n,
            &x,
            "{name}: wrong output shape"
        );
        ensure!(
            out.weights.is_some() == x.opts.weights,
            &x,
            "{name}: weights returned iff asked"
        );
        for i in 0..n {
            let info = &infos[i];
            if !info.any {
                ensure!(
                    out.output.row(i).iter().all(|o| *o == T::zero())
                        && out.lse[i] == T::NEG_INFINITY,
                    &x,
                    "{name}: fully masked row {i} must be 0 with lse -inf, got {:?} lse {:?}",
                    out.output.row(i),
                    out.lse[i]
                );
                continue;
            }
            for c in 0..dv {
                let o = out.output[(i, c)].as_f64();
                // A convex combination of the column: finite, and within its range.
                ensure!(
                    o.is_finite()
                        && o.abs()
                            <= vmax[c] * (1.0 + 4.0 * (m as f64 + 2.0) * e) + m as f64 * T::TINY,
                    &x,
                    "{name}: output ({i}, {c}) = {o:e} is not a convex combination of V (max |v| = {:e})",
                    vmax[c]
                );
            }
            // Scores that cannot overflow (bound well inside the range): lse is finite.
            if info.score_bound * 4.0 < T::MAXV && info.score_bound.is_finite() {
                let l = out.lse[i].as_f64();
                ensure!(
                    l.is_finite(),
                    &x,
                    "{name}: row {i} has allowed keys and scores bounded by {:e}, but lse = {l:e}",
                    info.score_bound
                );
            }
        }
        if let Some(w) = &out.weights {
            for i in 0..n {
                let mut sum = 0.0;
                for j in 0..m {
                    let p = w[(i, j)].as_f64();
                    ensure!(
                        (0.0..=1.0).contains(&p),
                        &x,
                        "{name}: weight ({i}, {j}) = {p:e}"
                    );
                    ensure!(
                        infos[i].allowed[j] || p == 0.0,
                        &x,
                        "{name}: masked weight ({i}, {j}) = {p:e}"
                    );
                    sum += p;
                }
                let want = if infos[i].any { 1.0 } else { 0.0 };
                ensure!(
                    (sum - want).abs() <= 4.0 * (m as f64 + 2.0) * e,
                    &x,
                    "{name}: weights of row {i} sum to {sum:e}, not {want}"
                );
            }
        }
    }
    // The kernel against the reference, where the comparison is meaningful: the score's
    // rounding error (about ε·(d+2)·Σ|q_il k_jl|·|scale| + ε|b|) moves each weight by that
    // much relative, so the output may differ by about 2·err·max|v| + (m+d)·ε·max|v|. When
    // err is not small (huge scores) the two roundings may legitimately pick different
    // winners, and there is nothing to compare: those rows are skipped.
    let d = x.q.ncols() as f64;
    for (i, info) in infos.iter().enumerate() {
        if !info.any || !(info.score_err < 0.01) || info.score_bound * 4.0 >= T::MAXV {
            continue;
        }
        let rel = 16.0 * (2.0 * info.score_err + (m as f64 + d + 8.0) * e);
        for c in 0..dv {
            let (a, r) = (fast.output[(i, c)].as_f64(), slow.output[(i, c)].as_f64());
            ensure!(
                (a - r).abs() <= rel * vmax[c] + 4.0 * m as f64 * T::TINY,
                &x,
                "kernel and reference outputs differ at ({i}, {c}): {a:e} vs {r:e} (tolerance {:e}, score bound {:e})",
                rel * vmax[c],
                info.score_bound
            );
        }
        let (la, lr) = (fast.lse[i].as_f64(), slow.lse[i].as_f64());
        let tol = 16.0 * (info.score_err + (m as f64 + 4.0) * e * (1.0 + lr.abs()));
        ensure!(
            (la - lr).abs() <= tol,
            &x,
            "kernel and reference lse differ in row {i}: {la:e} vs {lr:e}"
        );
    }
    // Any thread count gives the same bits as the default pool.
    if x.opts.threads.is_some() && !x.opts.weights {
        let mut o = x.opts.clone();
        o.threads = None;
        let again =
            scaled_attention_with(&x.q, &x.k, &x.v, &x.mask, &o.build()).expect("succeeded once");
        ensure!(
            same_bits(again.output.as_slice(), fast.output.as_slice())
                && same_bits(again.lse.as_slice(), fast.lse.as_slice()),
            &x,
            "threads({:?}) changes the bits of the result",
            x.opts.threads
        );
    }
}

/// The mask methods against the model, on the call's n x m and near usize::MAX.
fn check_mask<T: Fz>(b: &mut Bytes, x: &AttnInput<T>) {
    let (n, m) = (x.q.nrows(), x.k.nrows());
    let dense = x.mask.to_dense(n, m).expect("a small dense mask");
    let bias = x.mask.to_bias::<T>(n, m).expect("a small bias");
    for i in 0..n {
        for j in 0..m {
            let a = x.mask.allows_in(n, m, i, j);
            ensure!(
                a == x.model.allows(n, m, i, j),
                x,
                "allows_in({n}, {m}, {i}, {j}) = {a} disagrees with the docs"
            );
            ensure!(
                dense[(i, j)] == a,
                x,
                "to_dense disagrees with allows_in at ({i}, {j})"
            );
            ensure!(
                bias[(i, j)] == if a { T::zero() } else { T::NEG_INFINITY },
                x,
                "to_bias disagrees with allows_in at ({i}, {j})"
            );
        }
    }
    if n > 0 && m > 0 {
        let (r0, c0) = (b.upto(n - 1), b.upto(m - 1));
        let (r1, c1) = (r0 + b.upto(n - r0), c0 + b.upto(m - c0));
        let class = x.mask.classify(r0..r1, c0..c1, n, m);
        let all = (r0..r1).all(|i| (c0..c1).all(|j| dense[(i, j)]));
        let none = (r0..r1).all(|i| (c0..c1).all(|j| !dense[(i, j)]));
        ensure!(
            match class {
                Block::Full => all,
                Block::Empty => none,
                Block::Partial => true,
            },
            x,
            "classify({r0}..{r1}, {c0}..{c1}, {n}, {m}) = {class:?} is wrong"
        );
    }
    // Huge shapes and positions: exact arithmetic, no wrap, no panic.
    let (bn, bm) = (b.param(40).max(1), b.param(40).max(1));
    let (bi, bj) = (
        bn - 1 - b.upto(3).min(bn - 1),
        bm - 1 - b.upto(3).min(bm - 1),
    );
    let a = x.mask.allows_in(bn, bm, bi, bj);
    ensure!(
        a == x.model.allows(bn, bm, bi, bj),
        x,
        "allows_in({bn}, {bm}, {bi}, {bj}) = {a} disagrees with the docs"
    );
    let _ = x.mask.classify(bi / 2..bi, bj / 2..bj, bn, bm);
    let _ = x.mask.to_string();
}

// ------------------------------------------------------------------------------------------
// Backward

#[derive(Debug)]
struct BackInput<T> {
    attn: AttnInput<T>,
    d_out: DMatrix<T>,
    corrupt: u8,
}

/// `backward`: attention_backward (the tiled kernel) against attention_backward_reference.
pub fn backward(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8().is_multiple_of(2) {
        backward_t::<f32>(&mut b)
    } else {
        backward_t::<f64>(&mut b)
    }
}

fn backward_t<T: Fz>(b: &mut Bytes) {
    let mut attn = attn_input::<T>(b, 24, 12);
    attn.opts.weights = false;
    let (n, dv) = (attn.q.nrows(), attn.v.ncols());
    let bad_d_out = b.u8() == 1;
    let d_out = b.matrix::<T>(n + usize::from(bad_d_out), dv);
    let corrupt = b.u8() % 16;
    let x = BackInput {
        attn,
        d_out,
        corrupt,
    };
    let a = &x.attn;
    let opts = a.opts.build();
    let mut expected = attn_expected(a);
    let Ok(mut forward) = scaled_attention_with(&a.q, &a.k, &a.v, &a.mask, &opts) else {
        // The forward's errors are checked by `attention`; the backward must fail too.
        let r = attention_backward_reference(&a.q, &a.k, &a.v, &a.mask, &opts, &x.d_out);
        ensure!(
            r.is_err(),
            &x,
            "backward_reference is Ok where the forward fails"
        );
        return;
    };
    if bad_d_out {
        expected.push("ShapeMismatch");
    }
    if !all_finite(x.d_out.as_slice()) {
        expected.push("NonFinite");
    }
    let mut expected_tiled = expected.clone();
    match x.corrupt {
        1 if n > 0 => {
            forward.lse[0] = T::NAN;
            expected_tiled.push("NonFinite");
        }
        2 if n > 0 => {
            // +inf is what an overflowing forward returns: the backward may accept it
            // (as of 1c7cf5d it does) or reject it as NonFinite.
            forward.lse[0] = T::INFINITY;
        }
        3 => {
            forward.lse = nalgebra::DVector::zeros(n + 1);
            expected_tiled.push("LengthMismatch");
        }
        4 => {
            forward.output = DMatrix::zeros(n + 1, dv);
            expected_tiled.push("ShapeMismatch");
        }
        5 if n > 0 && dv > 0 => {
            forward.output[(0, 0)] = T::NAN;
            expected_tiled.push("NonFinite");
        }
        _ => {}
    }
    const ERRS: &[&str] = &[
        "DimensionMismatch",
        "ShapeMismatch",
        "NonFinite",
        "InvalidParameter",
        "LengthMismatch",
        "TooLarge",
    ];
    let tiled = attention_backward(&a.q, &a.k, &a.v, &a.mask, &opts, &forward, &x.d_out);
    let reference = attention_backward_reference(&a.q, &a.k, &a.v, &a.mask, &opts, &x.d_out);
    if x.corrupt == 2
        && expected_tiled.is_empty()
        && let Err(e) = &tiled
    {
        expected_tiled.push("NonFinite");
        ensure!(
            kind(e) == Some("NonFinite"),
            &x,
            "backward with lse = +inf: {e:?}"
        );
    }
    let tiled = expect("attention_backward", tiled, ERRS, &expected_tiled, &x);
    let Some(reference) = expect(
        "attention_backward_reference",
        reference,
        ERRS,
        &expected,
        &x,
    ) else {
        return;
    };
    let Some(tiled) = tiled else { return };
    let (m, d) = (a.k.nrows(), a.q.ncols());
    let e = eps::<T>();
    let infos = row_infos(a);
    let vmax = amax(f64s(&a.v).as_slice());
    let kmax = amax(f64s(&a.k).as_slice());
    let qmax = amax(f64s(&a.q).as_slice());
    let gmax = amax(f64s(&x.d_out).as_slice());
    let scale = a
        .opts
        .scale
        .map_or(if d == 0 { 1.0 } else { 1.0 / (d as f64).sqrt() }, |s| {
            s.as_f64()
        })
        .abs();
    let dp = dv as f64 * gmax * vmax; // bound on |dP_ij|
    // Where dP = dO Vᵀ (or the gradients built from it) may leave the range, the tiled and
    // reference paths may overflow at different places, and dS = P (dP − D) may be inf − inf:
    // the documented limit of the backward (docs/robustness.md), not checked there.
    let grads_in_range = dp * (m + n + d + 8) as f64 * 16.0 < T::MAXV;
    let moderate = infos
        .iter()
        .all(|r| r.score_bound.is_finite() && r.score_bound * 4.0 < T::MAXV);
    for (name, g) in [("tiled", &tiled), ("reference", &reference)] {
        ensure!(
            g.dq.shape() == (n, d) && g.dk.shape() == (m, d) && g.dv.shape() == (m, dv),
            &x,
            "{name}: wrong gradient shapes"
        );
        ensure!(
            g.dbias.is_some() == a.opts.bias.is_some(),
            &x,
            "{name}: dbias iff a bias"
        );
        if !moderate {
            continue;
        }
        // dV = Pᵀ dO: its column sums are those of dO over the rows that see a key
        // (every row of P sums to 1), whatever the scores.
        let bound =
            2.0 * (n as f64 + m as f64) * (1.0 + scale * (qmax + kmax)) * dp * (m + n + 1) as f64;
        for c in 0..dv {
            let got: f64 = g.dv.column(c).iter().map(|v| v.as_f64()).sum();
            let want: f64 = (0..n)
                .filter(|&i| infos[i].any)
                .map(|i| x.d_out[(i, c)].as_f64())
                .sum();
            // Each row of P sums to 1 up to (m + 4)·ε plus the rounding of exp(s − lse),
            // about ε·|s| (the tiled pass recomputes P from the saved lse).
            let abs: f64 = (0..n)
                .map(|i| {
                    x.d_out[(i, c)].as_f64().abs()
                        * (1.0 + 2.0 * infos[i].score_bound + infos[i].score_err / e)
                })
                .sum();
            let tol = 8.0 * (m as f64 + n as f64 + 4.0) * e * abs + m as f64 * T::TINY;
            ensure!(
                (got - want).abs() <= tol
                    // A column of dO summing past the range: dV's sum rightly overflows too.
                    || (!grads_in_range && got.is_infinite())
                    // A bound that is not a number bounds nothing.
                    || tol.is_nan(),
                &x,
                "{name}: the column sums of dv are {got:e}, those of d_out over rows with a key {want:e}"
            );
        }
        if bound * 16.0 < T::MAXV {
            for (gn, gm) in [("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)] {
                ensure!(
                    all_finite(gm.as_slice()),
                    &x,
                    "{name}: {gn} is not finite for moderate finite input"
                );
            }
        }
        if let Some(db) = &g.dbias {
            // dS rows sum to 0 (softmax is shift invariant).
            for i in 0..n {
                let s: f64 = db.row(i).iter().map(|v| v.as_f64()).sum();
                let tol = 32.0 * (infos[i].score_err + (m as f64 + dv as f64 + 4.0) * e) * 2.0 * dp
                    + m as f64 * T::TINY;
                // (A NaN tolerance, an infinite score bound times a zero magnitude, skips.)
                ensure!(
                    s.abs() <= tol || tol.is_nan() || m == 0 || !grads_in_range,
                    &x,
                    "{name}: dbias row {i} sums to {s:e}, not 0 (tolerance {tol:e})"
                );
                for j in 0..m {
                    ensure!(
                        infos[i].allowed[j] || db[(i, j)] == T::zero(),
                        &x,
                        "{name}: dbias ({i}, {j}) masked but nonzero"
                    );
                }
            }
        }
    }
    // Tiled against reference where every row is well conditioned.
    let err = infos.iter().fold(0.0_f64, |acc, r| acc.max(r.score_err));
    if !moderate || !(err < 1e-3) || !grads_in_range {
        return;
    }
    let rel = 32.0 * (2.0 * err + (m + n) as f64 * e + (d + dv + 8) as f64 * e);
    let dscore = 2.0 * dp; // bound on |dS_ij| / P_ij
    let scales = [
        ("dv", n as f64 * gmax),
        ("dq", scale * m as f64 * dscore * kmax),
        ("dk", scale * n as f64 * dscore * qmax),
    ];
    for ((gn, s), (t, r)) in scales.iter().zip([
        (&tiled.dv, &reference.dv),
        (&tiled.dq, &reference.dq),
        (&tiled.dk, &reference.dk),
    ]) {
        let diff = amax((f64s(t) - f64s(r)).as_slice());
        let tol = rel * s + 16.0 * (m + n) as f64 * T::TINY;
        // A bound that is not a number (an infinite score bound times a zero magnitude) bounds
        // nothing: there is no comparison to make.
        ensure!(
            tol.is_nan() || diff <= tol,
            &x,
            "tiled and reference {gn} differ by {diff:e} (tolerance {:e})",
            rel * s
        );
    }
}

// ------------------------------------------------------------------------------------------
// Multi-head attention

#[derive(Debug)]
#[allow(dead_code)] // the fields are read through Debug, in failure messages
struct MhaInput<T> {
    q: DMatrix<T>,
    k: DMatrix<T>,
    v: DMatrix<T>,
    heads: (usize, usize),
    mask: Mask,
    opts: Opts<T>,
}

/// `multihead`: multi_head_attention (MHA, MQA, GQA, bad head counts) against one
/// scaled_attention_with per head on column slices.
pub fn multihead(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8().is_multiple_of(2) {
        multihead_t::<f32>(&mut b)
    } else {
        multihead_t::<f64>(&mut b)
    }
}

fn multihead_t<T: Fz>(b: &mut Bytes) {
    let (h, g) = (b.upto(5), b.upto(5));
    let (n, m, d, dv) = (b.upto(20), b.upto(20), b.upto(6), b.upto(5));
    let bad = b.u8() % 8;
    let qc = h.max(1) * d + usize::from(bad == 1);
    let kc = g.max(1) * d + usize::from(bad == 2);
    let vc = g.max(1) * dv + usize::from(bad == 3);
    let q = b.matrix::<T>(n, qc);
    let k = b.matrix::<T>(m, kc);
    let v = b.matrix::<T>(m + usize::from(bad == 4), vc);
    let (mask, _) = b.mask(1);
    let mut opts = Opts::<T>::decode(b, n, m);
    opts.weights = false;
    let x = MhaInput {
        q,
        k,
        v,
        heads: (h, g),
        mask,
        opts,
    };
    let o = x.opts.build();
    let r = multi_head_attention(&x.q, &x.k, &x.v, Heads::grouped(h, g), &x.mask, &o);
    const ERRS: &[&str] = &[
        "InvalidParameter",
        "HeadSplit",
        "ShapeMismatch",
        "DimensionMismatch",
        "NonFinite",
        "TooLarge",
    ];
    let mut expected = Vec::new();
    if h == 0 || g == 0 || h % g != 0 {
        expected.push("InvalidParameter");
    }
    let hh = h.max(1);
    let gg = g.max(1);
    if qc % hh != 0 || kc % gg != 0 || vc % gg != 0 {
        expected.push("HeadSplit");
    }
    let (hd, kd, vd) = (qc / hh, kc / gg, vc / gg);
    if kd != hd {
        expected.push("ShapeMismatch");
    }
    let single = AttnInput {
        q: x.q.columns(0, hd.min(qc)).clone_owned(),
        k: x.k.columns(0, hd.min(kc)).clone_owned(),
        v: x.v.columns(0, vd.min(vc)).clone_owned(),
        mask: x.mask.clone(),
        model: Model::None,
        opts: x.opts.clone(),
    };
    expected.extend(attn_expected(&single));
    if !all_finite(x.q.as_slice()) || !all_finite(x.k.as_slice()) || !all_finite(x.v.as_slice()) {
        expected.push("NonFinite");
    }
    let Some(out) = expect("multi_head_attention", r, ERRS, &expected, &x) else {
        return;
    };
    ensure!(
        out.shape() == (n, h * vd),
        &x,
        "wrong output shape {:?}",
        out.shape()
    );
    for head in 0..h {
        let grp = head / (h / g);
        let one = scaled_attention_with(
            x.q.columns(head * hd, hd),
            x.k.columns(grp * kd, kd),
            x.v.columns(grp * vd, vd),
            &x.mask,
            &o,
        )
        .expect("every head is a valid attention");
        // The same function to rounding: the decode path (few query rows) batches a GQA
        // group's heads, which may round differently (by an ulp or so) from one head alone.
        let hi = AttnInput {
            q: x.q.columns(head * hd, hd).clone_owned(),
            k: x.k.columns(grp * kd, kd).clone_owned(),
            v: x.v.columns(grp * vd, vd).clone_owned(),
            mask: x.mask.clone(),
            model: Model::None,
            opts: x.opts.clone(),
        };
        let infos = row_infos(&hi);
        let e = eps::<T>();
        let vmax = amax(f64s(&hi.v).as_slice());
        for i in 0..n {
            if !(infos[i].score_err < 0.01) || infos[i].score_bound * 4.0 >= T::MAXV {
                continue;
            }
            let tol = 16.0 * (2.0 * infos[i].score_err + (m + hd + 8) as f64 * e) * vmax
                + 4.0 * m as f64 * T::TINY;
            for c in 0..vd {
                let (a, r) = (
                    out[(i, head * vd + c)].as_f64(),
                    one.output[(i, c)].as_f64(),
                );
                ensure!(
                    a == r || (a - r).abs() <= tol,
                    &x,
                    "head {head} (group {grp}) differs from scaled_attention_with at ({i}, {c}): {a:e} vs {r:e}"
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// KV cache

#[derive(Debug)]
#[allow(dead_code)] // the fields are read through Debug, in failure messages
struct CacheLog {
    setup: (usize, usize, usize, u8, usize),
    ops: Vec<String>,
}

/// `kv_cache`: KvCache construction, append (one token, chunks, bad shapes, non-finite),
/// truncate and clear, with and without a window, against a plain model of the positions;
/// attention over the zero-copy views against attention over owned copies.
pub fn kv_cache(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8().is_multiple_of(2) {
        kv_cache_t::<f32>(&mut b)
    } else {
        kv_cache_t::<f64>(&mut b)
    }
}

fn kv_cache_t<T: Fz>(b: &mut Bytes) {
    let (g, d, dv) = (b.upto(3), b.upto(6), b.upto(5));
    let ctor = b.u8() % 3;
    // Huge capacities only where the byte count overflows (no real multi-gigabyte
    // allocation attempts: ASan aborts on those instead of returning an error).
    let extra = match b.param(8) {
        p if p > 8 => [usize::MAX, 1 << 62, usize::MAX / 2][p % 3],
        p => p,
    };
    let mut log = CacheLog {
        setup: (g, d, dv, ctor, extra),
        ops: Vec::new(),
    };
    const ERRS: &[&str] = &[
        "InvalidParameter",
        "TooLarge",
        "ShapeMismatch",
        "DimensionMismatch",
        "NonFinite",
    ];
    let r = match ctor {
        0 => KvCache::<T>::new(g, d, dv),
        1 => KvCache::<T>::with_capacity(g, d, dv, extra),
        _ => KvCache::<T>::with_window(g, d, dv, extra),
    };
    let mut expected = Vec::new();
    if g == 0 || (ctor == 2 && extra == 0) {
        expected.push("InvalidParameter");
    }
    if ctor == 1 && extra > 1 << 20 && g * d.max(dv) > 0 {
        expected.push("TooLarge");
    }
    if ctor == 1 && extra > 1 << 20 && g * d.max(dv) == 0 {
        // No bytes per position: any capacity fits.
        expected.clear();
        if g == 0 {
            expected.push("InvalidParameter");
        }
    }
    let r = match r {
        Err(e) if expected.is_empty() && ctor == 1 && extra > 1 << 20 => {
            ensure!(kind(&e) == Some("TooLarge"), &log, "with_capacity: {e:?}");
            return;
        }
        r => r,
    };
    let Some(mut cache) = expect("KvCache constructor", r, ERRS, &expected, &log) else {
        return;
    };
    let window = (ctor == 2).then_some(extra);
    // The model: absolute start position and the rows kept.
    let mut start = 0_usize;
    let mut keys: Vec<Vec<T>> = Vec::new();
    let mut values: Vec<Vec<T>> = Vec::new();
    let ops = b.upto(24);
    for _ in 0..ops {
        match b.u8() % 8 {
            0..=3 => {
                let c = b.upto(6);
                let bad = b.u8() % 16;
                let kc = g * d + usize::from(bad == 1);
                let vc = g * dv + usize::from(bad == 2);
                let kr = b.matrix::<T>(c, kc);
                let vr = b.matrix::<T>(c + usize::from(bad == 3), vc);
                log.ops.push(format!("append({kr:?}, {vr:?})"));
                let mut exp = Vec::new();
                if bad == 3 {
                    exp.push("DimensionMismatch");
                }
                if bad == 1 || bad == 2 {
                    exp.push("ShapeMismatch");
                }
                if !all_finite(kr.as_slice()) || !all_finite(vr.as_slice()) {
                    exp.push("NonFinite");
                }
                let before = (cache.len(), cache.start_position());
                let r = cache.append(&kr, &vr);
                if expect("append", r, ERRS, &exp, &log).is_none() {
                    ensure!(
                        (cache.len(), cache.start_position()) == before,
                        &log,
                        "a failed append changed the cache"
                    );
                    continue;
                }
                for i in 0..c {
                    keys.push(kr.row(i).iter().copied().collect());
                    values.push(vr.row(i).iter().copied().collect());
                }
                if let Some(w) = window {
                    while keys.len() > w {
                        keys.remove(0);
                        values.remove(0);
                        start += 1;
                    }
                }
            }
            4 => {
                let end = start + keys.len();
                let p = match b.u8() % 4 {
                    0 => start.saturating_sub(1 + b.upto(2)),
                    1 => start + b.upto(keys.len()),
                    2 => end + b.upto(3),
                    _ => b.param(30),
                };
                log.ops.push(format!("truncate({p})"));
                let mut exp = Vec::new();
                if p < start && p < end {
                    exp.push("InvalidParameter");
                }
                if expect("truncate", cache.truncate(p), ERRS, &exp, &log).is_some() && p < end {
                    keys.truncate(p - start);
                    values.truncate(p - start);
                }
            }
            5 => {
                log.ops.push("clear".into());
                cache.clear();
                start = 0;
                keys.clear();
                values.clear();
            }
            _ => {
                let nq = b.upto(3);
                let q = b.matrix::<T>(nq, d);
                log.ops.push(format!("attend({q:?})"));
                let mask = Mask::causal_bottom_right();
                let o = AttentionOptions::new();
                for grp in 0..g {
                    let (kv, vv) = (
                        cache.keys(grp).expect("group < G"),
                        cache.values(grp).expect("group < G"),
                    );
                    let (ko, vo) = (kv.clone_owned(), vv.clone_owned());
                    let a = scaled_attention_with(&q, kv, vv, &mask, &o);
                    let r = scaled_attention_with(&q, &ko, &vo, &mask, &o);
                    ensure!(
                        a == r,
                        &log,
                        "attention over the cache views differs from owned copies (group {grp})"
                    );
                }
            }
        }
        // The cache against the model.
        ensure!(
            cache.len() == keys.len(),
            &log,
            "len {} but the model has {}",
            cache.len(),
            keys.len()
        );
        ensure!(cache.is_empty() == keys.is_empty(), &log, "is_empty");
        ensure!(
            cache.start_position() == start,
            &log,
            "start_position {} vs {start}",
            cache.start_position()
        );
        ensure!(
            cache.end_position() == start + keys.len(),
            &log,
            "end_position"
        );
        ensure!(
            cache.positions() == (start..start + keys.len()),
            &log,
            "positions"
        );
        ensure!(cache.capacity() >= cache.len(), &log, "capacity < len");
        if let Some(w) = window {
            ensure!(
                cache.len() <= w,
                &log,
                "a window of {w} holds {}",
                cache.len()
            );
        }
        for grp in 0..g {
            let (kv, vv) = (
                cache.keys(grp).expect("group < G"),
                cache.values(grp).expect("group < G"),
            );
            ensure!(
                kv.shape() == (keys.len(), d) && vv.shape() == (keys.len(), dv),
                &log,
                "view shapes"
            );
            for (i, (kr, vr)) in keys.iter().zip(&values).enumerate() {
                ensure!(
                    same_bits(
                        &kv.row(i).iter().copied().collect::<Vec<_>>(),
                        &kr[grp * d..(grp + 1) * d]
                    ),
                    &log,
                    "keys({grp}) row {i}"
                );
                ensure!(
                    same_bits(
                        &vv.row(i).iter().copied().collect::<Vec<_>>(),
                        &vr[grp * dv..(grp + 1) * dv]
                    ),
                    &log,
                    "values({grp}) row {i}"
                );
            }
        }
        ensure!(
            cache.keys(g).is_err() && cache.values(g).is_err(),
            &log,
            "keys(G) must be an Err"
        );
        ensure!(
            cache.all_keys().shape() == (keys.len(), g * d),
            &log,
            "all_keys shape"
        );
        ensure!(
            cache.all_values().shape() == (keys.len(), g * dv),
            &log,
            "all_values shape"
        );
    }
}

// ------------------------------------------------------------------------------------------
// RoPE

#[derive(Debug)]
#[allow(dead_code)] // the fields are read through Debug, in failure messages
struct RopeInput<T> {
    d: usize,
    layout: RopeLayout,
    theta: Option<f64>,
    rotary: Option<usize>,
    scaling: Option<f64>,
    x: DMatrix<T>,
    offset: usize,
}

/// `rope`: Rope::apply / backward / frequencies / the checkpoint permutation, every
/// parameter (also invalid ones) and offsets up to usize::MAX.
pub fn rope(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8().is_multiple_of(2) {
        rope_t::<f32>(&mut b)
    } else {
        rope_t::<f64>(&mut b)
    }
}

fn rope_t<T: Fz>(b: &mut Bytes) {
    let d = b.upto(12);
    let layout = if b.flag() {
        RopeLayout::Interleaved
    } else {
        RopeLayout::RotateHalf
    };
    let f = b.u8();
    let theta = (f & 1 != 0).then(|| b.value::<f64>());
    let rotary = (f & 2 != 0).then(|| b.upto(14));
    let scaling = (f & 4 != 0).then(|| b.value::<f64>());
    let n = b.upto(10);
    let cols = d * b.upto(3) + usize::from(f & 8 != 0);
    let x = b.matrix::<T>(n, cols);
    let offset = b.param(100);
    let input = RopeInput {
        d,
        layout,
        theta,
        rotary,
        scaling,
        x,
        offset,
    };
    let mut rope = Rope::new(d, layout);
    if let Some(t) = theta {
        rope = rope.theta(t);
    }
    if let Some(r) = rotary {
        rope = rope.rotary_dim(r);
    }
    if let Some(s) = scaling {
        rope = rope.linear_scaling(s);
    }
    let r = rotary.unwrap_or(d);
    let mut params = Vec::new();
    if d == 0
        || r % 2 != 0
        || r > d
        || theta.is_some_and(|t| !(t.is_finite() && t > 0.0))
        || scaling.is_some_and(|s| !(s.is_finite() && s > 0.0))
    {
        params.push("InvalidParameter");
    }
    const ERRS: &[&str] = &["InvalidParameter", "HeadWidth", "TooLarge"];
    let freqs = expect("frequencies", rope.frequencies(), ERRS, &params, &input);
    if let Some(fr) = &freqs {
        ensure!(
            fr.len() == r / 2,
            &input,
            "frequencies has length {}",
            fr.len()
        );
        ensure!(
            fr.iter().all(|v| v.is_finite() && *v >= 0.0),
            &input,
            "frequencies {fr:?}"
        );
    }
    let mut expected = params.clone();
    if d > 0 && !cols.is_multiple_of(d) {
        expected.push("HeadWidth");
    }
    if offset.checked_add(n).is_none() {
        expected.push("InvalidParameter");
    }
    // A factor so small that the last position's angle overflows (as of 10f456c an Err),
    // where any angle is computed at all (some row, some head, some rotated pair).
    let last = offset.saturating_add(n).saturating_sub(1) as f64;
    let rotates = n > 0 && d > 0 && cols / d > 0 && r >= 2;
    let top = freqs
        .as_ref()
        .map_or(1.0, |f| f.iter().fold(0.0_f64, |a, &v| a.max(v.as_f64())));
    if rotates && !(last / scaling.unwrap_or(1.0) * top).is_finite() {
        expected.push("InvalidParameter");
    }
    let mut y = input.x.clone();
    let res = rope.apply(&mut y, offset);
    if expect("apply", res, ERRS, &expected, &input).is_none() {
        ensure!(
            same_bits(y.as_slice(), input.x.as_slice()),
            &input,
            "a failed apply changed x"
        );
        return;
    }
    let e = eps::<T>();
    let heads = cols / d;
    let finite_in = input
        .x
        .iter()
        .all(|v| v.is_finite() && v.as_f64().abs() <= T::MAXV / 4.0);
    // Pairs of each convention, per head.
    let pairs: Vec<(usize, usize)> = match layout {
        RopeLayout::Interleaved => (0..r / 2).map(|k| (2 * k, 2 * k + 1)).collect(),
        _ => (0..r / 2).map(|k| (k, k + r / 2)).collect(),
    };
    for i in 0..n {
        for h in 0..heads {
            for c in r..d {
                ensure!(
                    y[(i, h * d + c)].as_f64().to_bits()
                        == input.x[(i, h * d + c)].as_f64().to_bits(),
                    &input,
                    "dim {c} >= rotary_dim changed"
                );
            }
            if !finite_in {
                continue;
            }
            for &(a, bb) in &pairs {
                let (xa, xb) = (
                    input.x[(i, h * d + a)].as_f64(),
                    input.x[(i, h * d + bb)].as_f64(),
                );
                let (ya, yb) = (y[(i, h * d + a)].as_f64(), y[(i, h * d + bb)].as_f64());
                let (nx, ny) = (xa.hypot(xb), ya.hypot(yb));
                ensure!(
                    ya.is_finite() && yb.is_finite(),
                    &input,
                    "apply gave a non-finite value for finite x"
                );
                ensure!(
                    (nx - ny).abs() <= 8.0 * e * nx + 4.0 * T::TINY,
                    &input,
                    "rotation changed the norm of pair ({a}, {bb}) in row {i}: {nx:e} -> {ny:e}"
                );
            }
        }
    }
    if finite_in {
        let mut back = y.clone();
        rope.backward(&mut back, offset)
            .expect("backward takes what apply took");
        let xmax = amax(f64s(&input.x).as_slice());
        let diff = amax((f64s(&back) - f64s(&input.x)).as_slice());
        ensure!(
            diff <= 16.0 * e * xmax + 8.0 * T::TINY,
            &input,
            "backward(apply(x)) differs from x by {diff:e}"
        );
        // Row i at position offset + i, one row at a time.
        for i in 0..n {
            let mut row = input.x.rows(i, 1).clone_owned();
            rope.apply(&mut row, offset + i)
                .expect("a row of a valid call");
            ensure!(
                same_bits(row.as_slice(), y.rows(i, 1).clone_owned().as_slice()),
                &input,
                "row {i} alone differs"
            );
        }
    }
    if params.is_empty() && r == d && d.is_multiple_of(2) {
        let p = rope
            .interleaved_to_rotate_half(&input.x)
            .expect("valid permutation");
        let back = rope
            .rotate_half_to_interleaved(&p)
            .expect("valid permutation");
        ensure!(
            same_bits(back.as_slice(), input.x.as_slice()),
            &input,
            "the permutation's inverse does not restore x"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Softmax family

#[derive(Debug)]
struct VecInput<T> {
    x: Vec<T>,
    y: Vec<T>,
    t: T,
}

/// `softmax`: softmax, softmax_in_place, log_softmax(_in_place), logsumexp, the row
/// variants, softmax_with_temperature, exp_in_place and the softmax VJP/JVP/Jacobian.
pub fn softmax_family(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8().is_multiple_of(2) {
        softmax_t::<f32>(&mut b)
    } else {
        softmax_t::<f64>(&mut b)
    }
}

/// softmax of `x` in f64 from the definition (for f32 inputs, an accurate reference).
fn softmax64(x: &[f64]) -> Vec<f64> {
    let max = x.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
    let e: Vec<f64> = x.iter().map(|&v| (v - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn softmax_t<T: Fz>(b: &mut Bytes) {
    let m = b.upto(40);
    let x = b.vec::<T>(m);
    let ylen = if b.u8() < 16 { b.upto(41) } else { m };
    let y = b.vec::<T>(ylen);
    let t = b.value::<T>();
    let input = VecInput { x, y, t };
    let x = &input.x;
    let e = eps::<T>();
    let mf = m as f64;
    let p = softmax(x);
    let mut p2 = x.clone();
    softmax_in_place(&mut p2);
    ensure!(
        same_bits(&p, &p2),
        &input,
        "softmax and softmax_in_place differ"
    );
    let lp = log_softmax(x);
    let mut lp2 = x.clone();
    log_softmax_in_place(&mut lp2);
    ensure!(
        same_bits(&lp, &lp2),
        &input,
        "log_softmax and log_softmax_in_place differ"
    );
    let lse = logsumexp(x).as_f64();
    let mut ex = x.clone();
    exp_in_place(&mut ex);
    let x64: Vec<f64> = x.iter().map(|v| v.as_f64()).collect();
    if x.iter().any(|v| v.is_nan_value()) {
        ensure!(
            p.iter().any(|v| v.is_nan_value()) && lse.is_nan(),
            &input,
            "a NaN logit gave a finite softmax or lse"
        );
    } else if all_finite(x) && m > 0 {
        let max = x64.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
        let sum: f64 = p.iter().map(|v| v.as_f64()).sum();
        ensure!(
            (sum - 1.0).abs() <= 4.0 * (mf + 2.0) * e,
            &input,
            "softmax sums to {sum:e}"
        );
        ensure!(
            p.iter().all(|v| (0.0..=1.0).contains(&v.as_f64())),
            &input,
            "softmax outside [0, 1]"
        );
        ensure!(
            lse.is_finite()
                && lse >= max - 4.0 * e * max.abs()
                && lse <= max + mf.ln() + 4.0 * e * (max.abs() + mf),
            &input,
            "logsumexp = {lse:e}, max {max:e}"
        );
        for (i, l) in lp.iter().enumerate() {
            let l = l.as_f64();
            let true_gap = x64[i] - max;
            ensure!(
                l <= 4.0 * e * (mf.ln() + mf),
                &input,
                "log_softmax[{i}] = {l:e} > 0"
            );
            if true_gap.abs() < T::MAXV / 2.0 {
                ensure!(l.is_finite(), &input, "log_softmax[{i}] is not finite");
            }
        }
        if T::BYTES == 4 {
            // Against the f64 definition, with the documented accuracy (times 4).
            let want = softmax64(&x64);
            for i in 0..m {
                let (got, w) = (p[i].as_f64(), want[i]);
                let tol = 4.0 * ((x64[i] - max).abs() + mf + 2.0) * e * w + T::TINY;
                ensure!(
                    (got - w).abs() <= tol,
                    &input,
                    "softmax[{i}] = {got:e}, true {w:e}"
                );
            }
            // ln Σ exp(x_j − max), kept apart from max (max + it may round to max in f64).
            let lsum = x64.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            let want_lse = max + lsum;
            let tol = 4.0 * (max.abs() + mf.ln() + mf + 2.0) * e;
            ensure!(
                (lse - want_lse).abs() <= tol,
                &input,
                "logsumexp = {lse:e}, true {want_lse:e}"
            );
            for i in 0..m {
                let w = (x64[i] - max) - lsum;
                let got = lp[i].as_f64();
                let tol = 4.0 * ((x64[i] - max).abs() + mf.ln() + mf + 2.0) * e;
                ensure!(
                    (got - w).abs() <= tol
                        // Below the type's range, -inf is the rounded value.
                        || (got == f64::NEG_INFINITY && w - tol < -T::MAXV),
                    &input,
                    "log_softmax[{i}] = {got:e}, true {w:e}"
                );
            }
        }
    }
    // The temperature.
    let t = input.t;
    let r = softmax_with_temperature(x, t);
    let bad_t = !(t.is_finite() && t > T::zero());
    if let Some(pt) = expect(
        "softmax_with_temperature",
        r,
        &["InvalidParameter"],
        if bad_t { &["InvalidParameter"] } else { &[] },
        &input,
    ) && all_finite(x)
        && m > 0
    {
        let sum: f64 = pt.iter().map(|v| v.as_f64()).sum();
        ensure!(
            all_finite(&pt) && (sum - 1.0).abs() <= 4.0 * (mf + 3.0) * e,
            &input,
            "softmax_with_temperature sums to {sum:e}"
        );
        if T::BYTES == 4 {
            let tt = t.as_f64();
            let want = softmax64(&x64.iter().map(|v| v / tt).collect::<Vec<_>>());
            let max = x64.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
            for i in 0..m {
                let tol = 4.0 * ((x64[i] - max).abs() / tt + mf + 3.0) * e * want[i] + T::TINY;
                ensure!(
                    (pt[i].as_f64() - want[i]).abs() <= tol,
                    &input,
                    "softmax_with_temperature[{i}] = {:e}, true {:e}",
                    pt[i].as_f64(),
                    want[i]
                );
            }
        }
    }
    // Row variants against the slice functions (a matrix of the same values).
    let cols = b.upto(8).max(1);
    let nrows = m / cols;
    if nrows > 0 {
        let mat = DMatrix::from_row_slice(nrows, cols, &x[..nrows * cols]);
        let (sr, lr, er) = (
            softmax_rows(&mat),
            log_softmax_rows(&mat),
            logsumexp_rows(&mat),
        );
        for i in 0..nrows {
            let row: Vec<T> = mat.row(i).iter().copied().collect();
            let (s1, l1, e1) = (softmax(&row), log_softmax(&row), logsumexp(&row));
            let close = |a: T, b: T, scale: f64| {
                let (a, b) = (a.as_f64(), b.as_f64());
                a.to_bits() == b.to_bits()
                    || (a - b).abs()
                        <= 8.0 * (cols as f64 + 2.0) * e * scale.max(a.abs()).max(b.abs()) + T::TINY
            };
            for j in 0..cols {
                ensure!(
                    close(sr[(i, j)], s1[j], 0.0),
                    &input,
                    "softmax_rows ({i}, {j}) = {:?} vs softmax {:?}",
                    sr[(i, j)],
                    s1[j]
                );
                ensure!(
                    close(lr[(i, j)], l1[j], 1.0),
                    &input,
                    "log_softmax_rows ({i}, {j}) = {:?} vs log_softmax {:?}",
                    lr[(i, j)],
                    l1[j]
                );
            }
            ensure!(
                close(er[i], e1, 1.0),
                &input,
                "logsumexp_rows {i} = {:?} vs logsumexp {:?}",
                er[i],
                e1
            );
        }
    }
    // VJP / JVP / Jacobian.
    let y = &input.y;
    let mut exp = Vec::new();
    if y.len() != m {
        exp.push("LengthMismatch");
    }
    if !all_finite(y) {
        exp.push("NonFinite");
    }
    const ERRS: &[&str] = &["LengthMismatch", "NonFinite"];
    let moderate = all_finite(x)
        && all_finite(y)
        && amax(&y.iter().map(|v| v.as_f64()).collect::<Vec<_>>()) < T::MAXV.sqrt() / 64.0;
    if let Some(g) = expect("softmax_vjp", softmax_vjp(x, y), ERRS, &exp, &input) {
        ensure!(g.len() == m, &input, "softmax_vjp length");
        if moderate && m > 0 {
            ensure!(all_finite(&g), &input, "softmax_vjp not finite: {g:?}");
            let s: f64 = g.iter().map(|v| v.as_f64()).sum();
            let ymax = amax(&y.iter().map(|v| v.as_f64()).collect::<Vec<_>>());
            ensure!(
                s.abs() <= 16.0 * (mf + 4.0) * e * ymax + T::TINY * mf,
                &input,
                "softmax_vjp sums to {s:e}"
            );
        }
    }
    if let Some(g) = expect("softmax_jvp", softmax_jvp(x, y), ERRS, &exp, &input)
        && moderate
    {
        ensure!(all_finite(&g), &input, "softmax_jvp not finite");
    }
    if let Some(g) = expect("log_softmax_vjp", log_softmax_vjp(x, y), ERRS, &exp, &input)
        && moderate
    {
        ensure!(all_finite(&g), &input, "log_softmax_vjp not finite");
    }
    if m <= 16 {
        let j = softmax_jacobian(x);
        ensure!(j.shape() == (m, m), &input, "softmax_jacobian shape");
        if all_finite(x) {
            ensure!(
                all_finite(j.as_slice()),
                &input,
                "softmax_jacobian not finite"
            );
            for r in 0..m {
                let s: f64 = j.row(r).iter().map(|v| v.as_f64()).sum();
                ensure!(
                    s.abs() <= 8.0 * (mf + 2.0) * e,
                    &input,
                    "softmax_jacobian row {r} sums to {s:e}"
                );
                for c in 0..m {
                    ensure!(
                        j[(r, c)] == j[(c, r)],
                        &input,
                        "softmax_jacobian not symmetric"
                    );
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Entropy family

/// `entropy`: entropy, entropy_bits, entropy_from_logits(_rows), entropy_rows,
/// kl_divergence, entropy_from_logits_grad.
pub fn entropy_family(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8().is_multiple_of(2) {
        entropy_t::<f32>(&mut b)
    } else {
        entropy_t::<f64>(&mut b)
    }
}

fn entropy_t<T: Fz>(b: &mut Bytes) {
    let m = b.upto(40);
    let x = b.vec::<T>(m);
    let qlen = if b.u8() < 16 { b.upto(41) } else { m };
    let y = b.vec::<T>(qlen);
    let raw = b.flag(); // entropy/KL of the raw values instead of softmaxes
    let input = VecInput { x, y, t: T::zero() };
    let (x, y) = (&input.x, &input.y);
    let e = eps::<T>();
    let mf = m as f64;
    let x64: Vec<f64> = x.iter().map(|v| v.as_f64()).collect();
    let h = entropy_from_logits(x).as_f64();
    let grad = entropy_from_logits_grad(x);
    ensure!(grad.len() == m, &input, "entropy_from_logits_grad length");
    if x.iter().any(|v| v.is_nan_value()) {
        ensure!(
            h.is_nan_value(),
            &input,
            "entropy_from_logits of a NaN logit is {h:e}"
        );
    } else if all_finite(x) && m > 0 {
        ensure!(
            h.is_finite() && h >= -4.0 * e && h <= mf.ln() * (1.0 + 4.0 * (mf + 4.0) * e) + e,
            &input,
            "entropy_from_logits = {h:e} outside [0, ln m]"
        );
        let p = softmax(x);
        let hp = entropy(&p).as_f64();
        let hb = entropy_bits(&p).as_f64();
        ensure!(
            hp.is_finite() && hp >= 0.0,
            &input,
            "entropy(softmax) = {hp:e}"
        );
        ensure!(
            (hb - hp / std::f64::consts::LN_2).abs() <= 8.0 * e * (hb.abs() + 1.0),
            &input,
            "entropy_bits = {hb:e}, entropy = {hp:e}"
        );
        let max = x64.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
        if T::BYTES == 4 {
            let pw = softmax64(&x64);
            let z: Vec<f64> = x64.iter().map(|v| v - max).collect();
            // Σ p_i (L − z_i) with L = ln Σ e^{z_i} taken as ln1p of the non-maximal terms:
            // −p ln p loses the top term when p rounds to 1 (a near-deterministic row).
            let top = z.iter().filter(|v| **v == 0.0).count() as f64;
            let rest: f64 = z.iter().filter(|v| **v < 0.0).map(|v| v.exp()).sum();
            let l = if top == 1.0 {
                rest.ln_1p()
            } else {
                (top + rest).ln()
            };
            let want: f64 = z
                .iter()
                .map(|zi| {
                    let gap = l - zi;
                    let p = (-gap).exp();
                    if p > 0.0 { p * gap } else { 0.0 }
                })
                .sum::<f64>()
                .max(0.0);
            let zbar: f64 = pw.iter().zip(&z).map(|(p, z)| p * z).sum();
            let cond: f64 = pw
                .iter()
                .zip(&z)
                .map(|(p, z)| p * z.abs() * ((z - zbar).abs() + 1.0))
                .sum();
            let tol = 4.0 * ((mf + 4.0) * e * want + e * cond) + 64.0 * T::TINY;
            ensure!(
                (h - want).abs() <= tol,
                &input,
                "entropy_from_logits = {h:e}, true {want:e} (tolerance {tol:e})"
            );
        }
        let gs: f64 = grad.iter().map(|v| v.as_f64()).sum();
        if x64.iter().all(|v| (v - max).abs() < 1e3) {
            ensure!(
                all_finite(&grad),
                &input,
                "entropy_from_logits_grad not finite"
            );
            let gmax = amax(&grad.iter().map(|v| v.as_f64()).collect::<Vec<_>>());
            ensure!(
                gs.abs()
                    <= 16.0
                        * (mf + 4.0)
                        * e
                        * (gmax + 1.0)
                        * (1.0 + (x64.iter().map(|v| (v - max).abs()).fold(0.0, f64::max))),
                &input,
                "entropy_from_logits_grad sums to {gs:e}"
            );
        }
        // Rows.
        let cols = b.upto(8).max(1);
        let nrows = m / cols;
        if nrows > 0 {
            let mat = DMatrix::from_row_slice(nrows, cols, &x[..nrows * cols]);
            let hr = entropy_from_logits_rows(&mat);
            let pr = softmax_rows(&mat);
            let er = entropy_rows(&pr);
            for i in 0..nrows {
                let row: Vec<T> = mat.row(i).iter().copied().collect();
                let h1 = entropy_from_logits(&row).as_f64();
                let tol = 16.0 * (cols as f64 + 4.0) * e * (h1.abs() + 1.0);
                ensure!(
                    (hr[i].as_f64() - h1).abs() <= tol,
                    &input,
                    "entropy_from_logits_rows {i}"
                );
                let prow: Vec<T> = pr.row(i).iter().copied().collect();
                ensure!(
                    (er[i].as_f64() - entropy(&prow).as_f64()).abs() <= tol,
                    &input,
                    "entropy_rows {i}"
                );
            }
        }
    }
    // Raw entropy: a NaN or negative entry gives NaN.
    if raw {
        let hr = entropy(x).as_f64();
        if x.iter().any(|v| v.is_nan_value() || *v < T::zero()) {
            ensure!(
                hr.is_nan_value(),
                &input,
                "entropy of a NaN or negative entry is {hr:e}"
            );
        }
    }
    // KL.
    let (p, q) = if raw {
        (x.clone(), y.clone())
    } else {
        (softmax(x), softmax(y))
    };
    let exp: &[&str] = if p.len() != q.len() {
        &["LengthMismatch"]
    } else {
        &[]
    };
    if let Some(kl) = expect(
        "kl_divergence",
        kl_divergence(&p, &q),
        &["LengthMismatch"],
        exp,
        &input,
    ) {
        let kl = kl.as_f64();
        if p.iter()
            .chain(&q)
            .any(|v| v.is_nan_value() || *v < T::zero())
        {
            ensure!(
                kl.is_nan_value(),
                &input,
                "kl_divergence with a NaN or negative entry is {kl:e}"
            );
        } else if !raw && all_finite(x) && all_finite(y) && m > 0 {
            let tol = 16.0 * (mf + 4.0) * e * (1.0 + kl.abs());
            ensure!(
                !kl.is_nan_value() && kl >= -tol,
                &input,
                "kl_divergence of two distributions = {kl:e}"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// sheet::lm

#[derive(Debug)]
struct LmInput<T> {
    objective: lm::Objective,
    examples: Vec<(usize, lm::Objective)>,
    logits: DMatrix<T>,
    tokens: Vec<usize>,
    loss_mask: Vec<bool>,
}

fn objective(b: &mut Bytes) -> lm::Objective {
    match b.u8() % 3 {
        0 => lm::Objective::Causal,
        1 => lm::Objective::PrefixLm {
            prefix_len: b.param(10),
        },
        _ => lm::Objective::PromptMasked {
            prompt_len: b.param(10),
        },
    }
}

/// Positions scored by an objective on n tokens, from the docs.
fn scored_model(o: &lm::Objective, n: usize) -> std::ops::Range<usize> {
    let p = o.condition_len();
    let end = n.saturating_sub(1);
    p.saturating_sub(1).min(end)..end
}

/// `lm`: Objective (masks, loss masks, loss), Packed (ids, documents, masks, loss),
/// cross_entropy and cross_entropy_grad with both reductions.
pub fn lm(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8().is_multiple_of(2) {
        lm_t::<f32>(&mut b)
    } else {
        lm_t::<f64>(&mut b)
    }
}

fn lm_t<T: Fz>(b: &mut Bytes) {
    let obj = objective(b);
    let count = b.upto(4);
    let examples: Vec<(usize, lm::Objective)> = (0..count)
        .map(|_| {
            (
                if b.param(6) > 6 {
                    usize::MAX
                } else {
                    b.upto(6)
                },
                objective(b),
            )
        })
        .collect();
    let (n, vocab) = (b.upto(20), b.upto(10));
    let logits = b.matrix::<T>(n, vocab);
    let tlen = if b.u8() < 8 { b.upto(21) } else { n };
    let tokens: Vec<usize> = (0..tlen)
        .map(|_| {
            if b.u8() < 8 {
                b.param(20)
            } else {
                b.upto(vocab.max(1) - 1)
            }
        })
        .collect();
    let mode = b.u8() % 4;
    let loss_mask: Vec<bool> = match mode {
        0 => obj.loss_mask(n).expect("a small loss mask"),
        1 => (0..n).map(|_| b.flag()).collect(),
        2 => (0..b.upto(21)).map(|_| b.flag()).collect(),
        _ => (0..n).map(|i| i + 1 < n && b.flag()).collect(),
    };
    let x = LmInput {
        objective: obj,
        examples,
        logits,
        tokens,
        loss_mask,
    };
    // The objective's masks.
    let am = x.objective.attention_mask();
    for i in 0..n {
        for j in 0..n {
            let want = match x.objective {
                lm::Objective::PrefixLm { prefix_len } => j < prefix_len || j <= i,
                _ => j <= i,
            };
            ensure!(
                am.allows_in(n, n, i, j) == want,
                &x,
                "attention_mask of {} at ({i}, {j})",
                x.objective
            );
        }
    }
    let sp = x.objective.scored_positions(n);
    ensure!(
        sp == scored_model(&x.objective, n),
        &x,
        "scored_positions({n}) = {sp:?}"
    );
    ensure!(x.objective.scored_count(n) == sp.len(), &x, "scored_count");
    let lmask = x.objective.loss_mask(n).expect("small");
    ensure!(
        lmask.iter().enumerate().all(|(i, &s)| s == sp.contains(&i)),
        &x,
        "loss_mask vs scored_positions"
    );
    ensure!(
        matches!(
            x.objective.loss_mask(usize::MAX),
            Err(Error::TooLarge { .. })
        ),
        &x,
        "loss_mask(usize::MAX)"
    );
    let _ = x.objective.scored_positions(usize::MAX);
    // Packing.
    let total = x
        .examples
        .iter()
        .try_fold(0_usize, |a, (l, _)| a.checked_add(*l));
    let packed = lm::Packed::new(x.examples.clone());
    let too_big = total.is_none_or(|t| t > 1 << 20);
    match packed {
        Err(e) => ensure!(
            too_big && kind(&e) == Some("TooLarge"),
            &x,
            "Packed::new: {e:?}"
        ),
        Ok(p) => {
            ensure!(!too_big, &x, "Packed::new of {total:?} positions is Ok");
            let len = total.expect("checked");
            ensure!(
                p.len() == len && p.document_ids().len() == len && p.is_empty() == (len == 0),
                &x,
                "Packed::len"
            );
            let pm = p.attention_mask();
            let docs = p.documents();
            let pn = len + 2;
            let lmask = p.loss_mask(pn).expect("small");
            for (k, (range, o)) in docs.iter().enumerate() {
                let local = o.attention_mask();
                let want_scored = scored_model(o, range.len());
                for i in range.clone() {
                    ensure!(
                        p.document_ids()[i] == p.document_ids()[range.start],
                        &x,
                        "document ids within document {k}"
                    );
                    ensure!(
                        lmask[i] == (want_scored.contains(&(i - range.start)) && i + 1 < pn),
                        &x,
                        "packed loss_mask at {i}"
                    );
                    for j in 0..pn {
                        let want = range.contains(&j)
                            && local.allows_in(
                                range.len(),
                                range.len(),
                                i - range.start,
                                j - range.start,
                            );
                        ensure!(
                            pm.allows_in(pn, pn, i, j) == want,
                            &x,
                            "packed attention_mask at ({i}, {j})"
                        );
                    }
                }
            }
            for i in len..pn {
                ensure!(
                    !lmask[i] && (0..pn).all(|j| !pm.allows_in(pn, pn, i, j)),
                    &x,
                    "padding position {i} is used"
                );
            }
            if len == n {
                let r = p.loss(&x.logits, &x.tokens);
                let r2 = lm::cross_entropy(&x.logits, &x.tokens, &p.loss_mask(n).expect("small"));
                ensure!(
                    r == r2 || x.tokens.len() != n,
                    &x,
                    "Packed::loss differs from cross_entropy with its loss mask"
                );
            }
        }
    }
    // Cross-entropy.
    let mut expected = Vec::new();
    if x.tokens.len() != n || x.loss_mask.len() != n {
        expected.push("LengthMismatch");
    }
    if !all_finite(x.logits.as_slice()) {
        expected.push("NonFinite");
    }
    if x.loss_mask.len() == n && n > 0 && x.loss_mask[n - 1] {
        expected.push("InvalidParameter");
    }
    let scored: Vec<usize> = (0..n)
        .filter(|&i| x.loss_mask.get(i) == Some(&true) && i + 1 < n)
        .collect();
    if x.tokens.len() == n && scored.iter().any(|&i| x.tokens[i + 1] >= vocab) {
        expected.push("IndexOutOfRange");
    }
    const ERRS: &[&str] = &[
        "LengthMismatch",
        "NonFinite",
        "InvalidParameter",
        "IndexOutOfRange",
        "TooLarge",
        "Empty",
    ];
    let ce = lm::cross_entropy(&x.logits, &x.tokens, &x.loss_mask);
    let r = x.objective.loss(&x.logits, &x.tokens);
    if mode == 0 {
        ensure!(
            r == ce,
            &x,
            "Objective::loss differs from cross_entropy with its loss mask"
        );
    }
    let mean = lm::cross_entropy_grad(&x.logits, &x.tokens, &x.loss_mask, lm::Reduction::Mean);
    let sum = lm::cross_entropy_grad(&x.logits, &x.tokens, &x.loss_mask, lm::Reduction::Sum);
    let Some(ce) = expect("cross_entropy", ce, ERRS, &expected, &x) else {
        return;
    };
    let e = eps::<T>();
    ensure!(
        ce.per_position.len() == n && ce.count == scored.len(),
        &x,
        "cross_entropy shape/count"
    );
    let vf = vocab as f64;
    let mut total = 0.0;
    for i in 0..n {
        let l = ce.per_position[i].as_f64();
        if !scored.contains(&i) {
            ensure!(l == 0.0, &x, "unscored position {i} has loss {l:e}");
            continue;
        }
        let row: Vec<f64> = x.logits.row(i).iter().map(|v| v.as_f64()).collect();
        let max = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
        let st = row[x.tokens[i + 1]];
        let tol = 4.0 * ((st - max).abs() + vf.ln() + vf + 2.0) * e;
        ensure!(l >= -tol, &x, "loss at {i} = {l:e} < 0");
        if (st - max).abs() < T::MAXV / 2.0 {
            ensure!(l.is_finite(), &x, "loss at {i} not finite");
        }
        if T::BYTES == 4 {
            let want = (max - st) + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            ensure!(
                (l - want).abs() <= tol
                    // A loss past the type's range rightly rounds to inf.
                    || (l == f64::INFINITY && want + tol > T::MAXV),
                &x,
                "loss at {i} = {l:e}, true {want:e}"
            );
        }
        total += l;
    }
    let s = ce.sum.as_f64();
    ensure!(
        (s - total).abs() <= 4.0 * (n as f64 + 2.0) * e * total.abs()
            || (s.is_infinite() && total.is_infinite())
            // A sum past the type's maximum rightly overflows.
            || (s == f64::INFINITY && total >= T::MAXV * (1.0 - 4.0 * (n as f64 + 2.0) * e)),
        &x,
        "sum {s:e} vs Σ per_position {total:e}"
    );
    let mut exp_mean = Vec::new();
    if scored.is_empty() {
        exp_mean.push("Empty");
    }
    if let Some((loss, grad)) = expect("cross_entropy_grad(Mean)", mean, ERRS, &exp_mean, &x) {
        let want = ce.mean().expect("count > 0").as_f64();
        ensure!(
            (loss.as_f64() - want).abs() <= 8.0 * e * want.abs() || loss.as_f64() == want,
            &x,
            "Mean loss {:e} vs mean {want:e}",
            loss.as_f64()
        );
        check_ce_grad(&x, &grad, &scored, scored.len() as f64);
    }
    if let Some((loss, grad)) = expect("cross_entropy_grad(Sum)", sum, ERRS, &[], &x) {
        ensure!(
            loss == ce.sum,
            &x,
            "Sum loss {:?} vs sum {:?}",
            loss,
            ce.sum
        );
        check_ce_grad(&x, &grad, &scored, 1.0);
    }
}

fn check_ce_grad<T: Fz>(x: &LmInput<T>, grad: &DMatrix<T>, scored: &[usize], c: f64) {
    let e = eps::<T>();
    let (n, vocab) = x.logits.shape();
    ensure!(grad.shape() == (n, vocab), x, "gradient shape");
    for i in 0..n {
        let row: Vec<f64> = grad.row(i).iter().map(|v| v.as_f64()).collect();
        if !scored.contains(&i) {
            ensure!(
                row.iter().all(|v| *v == 0.0),
                x,
                "gradient of unscored row {i} is not 0"
            );
            continue;
        }
        ensure!(
            row.iter()
                .all(|v| v.is_finite() && v.abs() <= (1.0 + 4.0 * e) / c),
            x,
            "gradient row {i} outside [-1/c, 1/c]: {row:?}"
        );
        let s: f64 = row.iter().sum();
        ensure!(
            s.abs() <= 8.0 * (vocab as f64 + 2.0) * e / c,
            x,
            "gradient row {i} sums to {s:e}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// sheet::moe

#[derive(Debug)]
#[allow(dead_code)] // the fields are read through Debug, in failure messages
struct MoeInput<T> {
    logits: DMatrix<T>,
    k: usize,
    renormalize: bool,
}

/// `moe`: route_top_k, load_balancing_loss, router_z_loss.
pub fn moe(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8().is_multiple_of(2) {
        moe_t::<f32>(&mut b)
    } else {
        moe_t::<f64>(&mut b)
    }
}

fn moe_t<T: Fz>(b: &mut Bytes) {
    let (n, ne) = (b.upto(16), b.upto(10));
    let k = b.param(ne + 1);
    let renormalize = b.flag();
    let logits = b.matrix::<T>(n, ne);
    let x = MoeInput {
        logits,
        k,
        renormalize,
    };
    let e = eps::<T>();
    let finite = all_finite(x.logits.as_slice());
    let mut expected = Vec::new();
    if k == 0 || k > ne {
        expected.push("InvalidParameter");
    }
    if !finite {
        expected.push("NonFinite");
    }
    let r = moe::route_top_k(&x.logits, k, renormalize);
    let Some(routing) = expect(
        "route_top_k",
        r,
        &["InvalidParameter", "NonFinite", "TooLarge"],
        &expected,
        &x,
    ) else {
        let exp: Vec<&str> = if n == 0 {
            vec!["Empty"]
        } else if !finite {
            vec!["NonFinite"]
        } else {
            vec![]
        };
        let _ = expect(
            "router_z_loss",
            moe::router_z_loss(&x.logits),
            &["Empty", "NonFinite"],
            &exp,
            &x,
        );
        return;
    };
    let probs = routing.probs();
    ensure!(
        probs.shape() == (n, ne) && routing.experts().len() == n && routing.gates().len() == n,
        &x,
        "routing shapes"
    );
    for i in 0..n {
        let (ex, gs) = (&routing.experts()[i], &routing.gates()[i]);
        ensure!(
            ex.len() == k && gs.len() == k,
            &x,
            "row {i}: {} experts, {} gates for k = {k}",
            ex.len(),
            gs.len()
        );
        let sum: f64 = probs.row(i).iter().map(|v| v.as_f64()).sum();
        ensure!(
            (sum - 1.0).abs() <= 4.0 * (ne as f64 + 2.0) * e,
            &x,
            "probs row {i} sums to {sum:e}"
        );
        for a in 0..k {
            ensure!(
                ex[a] < ne && !ex[..a].contains(&ex[a]),
                &x,
                "row {i}: experts {ex:?}"
            );
            if a > 0 {
                let (pa, pb) = (probs[(i, ex[a - 1])], probs[(i, ex[a])]);
                ensure!(
                    pa > pb || (pa == pb && ex[a - 1] < ex[a]),
                    &x,
                    "row {i}: experts {ex:?} not in order"
                );
            }
        }
        let last = probs[(i, ex[k - 1])];
        for j in (0..ne).filter(|j| !ex.contains(j)) {
            ensure!(
                probs[(i, j)] < last || (probs[(i, j)] == last && j > ex[k - 1]),
                &x,
                "row {i}: expert {j} should be chosen over {ex:?}"
            );
        }
        ensure!(
            gs.iter()
                .all(|g| g.is_finite() && (0.0..=1.0 + e).contains(&g.as_f64())),
            &x,
            "row {i}: gates {gs:?}"
        );
        if renormalize {
            let s: f64 = gs.iter().map(|v| v.as_f64()).sum();
            ensure!(
                (s - 1.0).abs() <= 4.0 * (k as f64 + 2.0) * e,
                &x,
                "row {i}: renormalised gates sum to {s:e}"
            );
        } else {
            ensure!(
                ex.iter().zip(gs).all(|(&j, &g)| g == probs[(i, j)]),
                &x,
                "row {i}: gates are not the probabilities"
            );
        }
    }
    let lb = moe::load_balancing_loss(&routing);
    let exp: &[&str] = if n == 0 { &["Empty"] } else { &[] };
    if let Some(l) = expect("load_balancing_loss", lb, &["Empty"], exp, &x) {
        let l = l.as_f64();
        ensure!(
            l.is_finite() && l >= 0.0 && l <= ne as f64 * (1.0 + 4.0 * (n + ne + 3) as f64 * e),
            &x,
            "load_balancing_loss = {l:e}"
        );
    }
    if let Some(z) = expect(
        "router_z_loss",
        moe::router_z_loss(&x.logits),
        &["Empty", "NonFinite"],
        exp,
        &x,
    ) {
        let z = z.as_f64();
        let lmax = amax(f64s(&x.logits).as_slice());
        ensure!(!z.is_nan_value() && z >= 0.0, &x, "router_z_loss = {z:e}");
        if lmax < T::MAXV.sqrt() / 4.0 {
            ensure!(
                z.is_finite(),
                &x,
                "router_z_loss = {z:e} for logits below √MAX/4"
            );
        }
        if T::BYTES == 4 && n > 0 {
            let want = (0..n)
                .map(|i| {
                    let row: Vec<f64> = x.logits.row(i).iter().map(|v| v.as_f64()).collect();
                    let max = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
                    let l = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                    l * l
                })
                .sum::<f64>()
                / n as f64;
            let tol = 16.0 * (ne as f64 + n as f64 + 4.0) * e * (want + lmax.abs() + 1.0);
            ensure!(
                !want.is_finite() || want + tol > T::MAXV || (z - want).abs() <= tol,
                &x,
                "router_z_loss = {z:e}, true {want:e}"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// sheet::preference

#[derive(Debug)]
struct PrefInput<T> {
    a: T,
    b: T,
    pair: [T; 4],
    beta: T,
    logp: Vec<T>,
    logp_old: Vec<T>,
    adv: Vec<T>,
    epsilon: T,
}

fn log_sigmoid64(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// `preference`: log_sigmoid, reward_model_loss, dpo_loss, ppo_clipped_loss.
pub fn preference(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8().is_multiple_of(2) {
        preference_t::<f32>(&mut b)
    } else {
        preference_t::<f64>(&mut b)
    }
}

fn preference_t<T: Fz>(b: &mut Bytes) {
    let (a, bb) = (b.value::<T>(), b.value::<T>());
    let pair = [b.value::<T>(), b.value(), b.value(), b.value()];
    let beta = b.value::<T>();
    let len = b.upto(12);
    let bad = b.u8() % 16;
    let logp = b.vec::<T>(len + usize::from(bad == 1));
    let logp_old = b.vec::<T>(len + usize::from(bad == 2));
    let adv = b.vec::<T>(len);
    let epsilon = if b.flag() {
        b.value::<T>()
    } else {
        T::of_f64(0.2)
    };
    let x = PrefInput {
        a,
        b: bb,
        pair,
        beta,
        logp,
        logp_old,
        adv,
        epsilon,
    };
    let e = eps::<T>();
    // log_sigmoid.
    for v in [x.a, x.b] {
        let ls = preference::log_sigmoid(v).as_f64();
        let v = v.as_f64();
        if v.is_nan_value() {
            ensure!(ls.is_nan_value(), &x, "log_sigmoid(NaN) = {ls:e}");
        } else {
            let want = log_sigmoid64(v);
            ensure!(
                !ls.is_nan_value() && ls <= 0.0,
                &x,
                "log_sigmoid({v:e}) = {ls:e}"
            );
            if v.is_finite() {
                ensure!(ls.is_finite(), &x, "log_sigmoid({v:e}) not finite");
                if T::BYTES == 4 {
                    ensure!(
                        (ls - want).abs() <= 8.0 * e * want.abs() + T::TINY * e,
                        &x,
                        "log_sigmoid({v:e}) = {ls:e}, true {want:e}"
                    );
                }
            }
        }
    }
    // Bradley-Terry.
    let rm = preference::reward_model_loss(x.a, x.b).as_f64();
    let diff = x.a.as_f64() - x.b.as_f64();
    if diff.is_nan_value() {
        ensure!(rm.is_nan_value(), &x, "reward_model_loss with NaN = {rm:e}");
    } else {
        ensure!(
            !rm.is_nan_value() && rm >= 0.0,
            &x,
            "reward_model_loss = {rm:e}"
        );
        if diff.abs() <= T::MAXV && x.a.is_finite() && x.b.is_finite() {
            ensure!(
                rm.is_finite(),
                &x,
                "reward_model_loss not finite for a finite difference {diff:e}"
            );
            if T::BYTES == 4 {
                let want = -log_sigmoid64(diff);
                let tol = 8.0 * e * want.abs()
                    + 4.0 * e * (x.a.as_f64().abs() + x.b.as_f64().abs())
                    + T::TINY;
                ensure!(
                    (rm - want).abs() <= tol,
                    &x,
                    "reward_model_loss = {rm:e}, true {want:e}"
                );
            }
        }
    }
    // DPO.
    let (p, exp) = dpo_pair(&x);
    if let Some(l) = expect(
        "dpo_loss",
        preference::dpo_loss(&p, x.beta),
        &["InvalidParameter", "NonFinite"],
        &exp,
        &x,
    ) {
        let l = l.as_f64();
        let lp: Vec<f64> = x.pair.iter().map(|v| v.as_f64()).collect();
        let z = x.beta.as_f64() * ((lp[0] - lp[2]) - (lp[1] - lp[3]));
        ensure!(!l.is_nan_value() && l >= 0.0, &x, "dpo_loss = {l:e}");
        if z.abs() <= T::MAXV / 2.0 {
            ensure!(
                l.is_finite(),
                &x,
                "dpo_loss not finite for β·margin = {z:e}"
            );
            if T::BYTES == 4 {
                let want = -log_sigmoid64(z);
                // The margin's own rounding (ε times the log-probabilities, times β) moves z,
                // and -log_sigmoid is 1-Lipschitz: that is the input's conditioning.
                let tol = 16.0 * e * want
                    + 8.0 * e * x.beta.as_f64() * lp.iter().map(|v| v.abs()).sum::<f64>()
                    + T::TINY;
                ensure!(
                    (l - want).abs() <= tol,
                    &x,
                    "dpo_loss = {l:e}, true {want:e} (tolerance {tol:e})"
                );
            }
        }
    }
    // PPO.
    let mut exp = Vec::new();
    let ep = x.epsilon;
    if !(ep.is_finite() && ep > T::zero()) {
        exp.push("InvalidParameter");
    }
    let n = x.logp.len();
    if x.logp_old.len() != n || x.adv.len() != n {
        exp.push("LengthMismatch");
    }
    if n == 0 {
        exp.push("Empty");
    }
    if !all_finite(&x.logp) || !all_finite(&x.logp_old) || !all_finite(&x.adv) {
        exp.push("NonFinite");
    }
    const ERRS: &[&str] = &["InvalidParameter", "LengthMismatch", "Empty", "NonFinite"];
    if let Some(l) = expect(
        "ppo_clipped_loss",
        preference::ppo_clipped_loss(&x.logp, &x.logp_old, &x.adv, ep),
        ERRS,
        &exp,
        &x,
    ) {
        let l = l.as_f64();
        let epf = ep.as_f64();
        if epf < 1.0 {
            ensure!(
                !l.is_nan_value(),
                &x,
                "ppo_clipped_loss is NaN for finite input and ε < 1"
            );
        }
        let terms: Vec<(f64, f64)> = (0..n)
            .map(|t| {
                (
                    x.logp[t].as_f64() - x.logp_old[t].as_f64(),
                    x.adv[t].as_f64(),
                )
            })
            .collect();
        if terms.iter().all(|(d, a)| d.abs() <= 60.0 && a.abs() <= 1e3) && epf <= 1e3 {
            ensure!(
                l.is_finite(),
                &x,
                "ppo_clipped_loss not finite for moderate input"
            );
            let term = |d: f64, a: f64| {
                let r = d.exp();
                if a > 0.0 {
                    r.min(1.0 + epf) * a
                } else {
                    r.max(1.0 - epf) * a
                }
            };
            let want = -terms.iter().map(|&(d, a)| term(d, a)).sum::<f64>() / n as f64;
            let abs: f64 = terms.iter().map(|&(d, a)| term(d, a).abs()).sum::<f64>() / n as f64;
            let dmax = terms.iter().fold(0.0_f64, |m, (d, _)| m.max(d.abs()));
            let lmax = (0..n).fold(0.0_f64, |m, t| {
                m.max(x.logp[t].as_f64().abs())
                    .max(x.logp_old[t].as_f64().abs())
            });
            let tol = 8.0 * ((dmax + lmax + 3.0) * e + n as f64 * e) * abs + T::TINY;
            ensure!(
                (l - want).abs() <= tol,
                &x,
                "ppo_clipped_loss = {l:e}, true {want:e} (tolerance {tol:e})"
            );
        }
    }
    preference_grads(&x, &exp, ERRS);
}

/// The DPO pair of an input and the errors `dpo_loss` and `dpo_loss_grad` must give for it.
fn dpo_pair<T: Fz>(x: &PrefInput<T>) -> (preference::PairLogProbs<T>, Vec<&'static str>) {
    let p = preference::PairLogProbs {
        policy_chosen: x.pair[0],
        policy_rejected: x.pair[1],
        reference_chosen: x.pair[2],
        reference_rejected: x.pair[3],
    };
    let mut exp = Vec::new();
    if !(x.beta.is_finite() && x.beta > T::zero()) {
        exp.push("InvalidParameter");
    }
    if !all_finite(&x.pair) {
        exp.push("NonFinite");
    }
    (p, exp)
}

fn sigmoid64(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        x.exp() / (1.0 + x.exp())
    }
}

/// The gradients of `preference`: the reward-model, DPO and PPO-clip losses and the k1 / k2 /
/// k3 KL penalties. `ppo_exp` are the errors the PPO loss expected (the gradient has the
/// same).
fn preference_grads<T: Fz>(x: &PrefInput<T>, ppo_exp: &[&str], ppo_errs: &[&str]) {
    let e = eps::<T>();
    // Bradley-Terry: (−σ(b − a), σ(b − a)).
    let (gc, gr) = preference::reward_model_loss_grad(x.a, x.b);
    let (gc, gr) = (gc.as_f64(), gr.as_f64());
    let diff = x.a.as_f64() - x.b.as_f64();
    if !diff.is_nan_value() {
        ensure!(
            (-1.0..=0.0).contains(&gc) && gr == -gc,
            x,
            "reward_model_loss_grad = ({gc:e}, {gr:e})"
        );
        if x.a.is_finite() && x.b.is_finite() {
            let want = sigmoid64(-diff);
            // σ is 1/4-Lipschitz: the difference's rounding, ε (|a| + |b|), moves it by a quarter.
            let tol = 8.0 * e * want + e * (x.a.as_f64().abs() + x.b.as_f64().abs()) + T::TINY;
            ensure!(
                (gr - want).abs() <= tol,
                x,
                "reward_model_loss_grad = {gr:e}, true {want:e}"
            );
        }
    }
    // DPO: β σ(−z) with alternating signs.
    let (p, exp) = dpo_pair(x);
    if let Some(g) = expect(
        "dpo_loss_grad",
        preference::dpo_loss_grad(&p, x.beta),
        &["InvalidParameter", "NonFinite"],
        &exp,
        x,
    ) {
        let beta = x.beta.as_f64();
        let gs = [
            g.policy_chosen.as_f64(),
            g.policy_rejected.as_f64(),
            g.reference_chosen.as_f64(),
            g.reference_rejected.as_f64(),
        ];
        let mag = gs[1];
        ensure!(
            gs.iter().all(|v| v.is_finite())
                && gs[0] == -mag
                && gs[2] == mag
                && gs[3] == -mag
                && mag >= 0.0
                && mag <= beta * (1.0 + 4.0 * e),
            x,
            "dpo_loss_grad = {gs:?}"
        );
        let lp: Vec<f64> = x.pair.iter().map(|v| v.as_f64()).collect();
        let z = beta * ((lp[0] - lp[2]) - (lp[1] - lp[3]));
        if z.abs() <= T::MAXV / 2.0 {
            let want = beta * sigmoid64(-z);
            // z's rounding (8 ε β Σ|lp|, as for the loss), through β σ' <= β / 4.
            // (z's error first, so that a huge β meets a zero Σ|lp| as 0, not inf · 0.)
            let zerr = 8.0 * e * (beta * lp.iter().map(|v| v.abs()).sum::<f64>());
            let tol = 16.0 * e * want + beta / 4.0 * zerr + T::TINY;
            ensure!(
                mag == want || (mag - want).abs() <= tol,
                x,
                "dpo_loss_grad magnitude {mag:e}, true {want:e} (tolerance {tol:e})"
            );
        }
    }
    // PPO-clip: −ρ_t A_t / n inside the trust region, 0 where clipped.
    let n = x.logp.len();
    if let Some(g) = expect(
        "ppo_clipped_loss_grad",
        preference::ppo_clipped_loss_grad(&x.logp, &x.logp_old, &x.adv, x.epsilon),
        ppo_errs,
        ppo_exp,
        x,
    ) {
        ensure!(g.len() == n, x, "ppo_clipped_loss_grad length {}", g.len());
        let epf = x.epsilon.as_f64();
        for t in 0..n {
            let gt = g[t].as_f64();
            let d = x.logp[t].as_f64() - x.logp_old[t].as_f64();
            let a = x.adv[t].as_f64();
            ensure!(!gt.is_nan_value(), x, "ppo_clipped_loss_grad[{t}] is NaN");
            if d.abs() <= 60.0 && a.abs() <= 1e30 && epf <= 1e3 {
                let r = d.exp();
                let want = -r * a / n as f64;
                ensure!(gt.is_finite(), x, "ppo_clipped_loss_grad[{t}] not finite");
                // Clipped (0), or the unclipped value; near the clip boundary either.
                let lmax = x.logp[t].as_f64().abs().max(x.logp_old[t].as_f64().abs());
                let tol = 8.0 * (d.abs() + lmax + 3.0) * e * want.abs() + T::TINY;
                ensure!(
                    gt == 0.0 || (gt - want).abs() <= tol,
                    x,
                    "ppo_clipped_loss_grad[{t}] = {gt:e}, unclipped {want:e} (tolerance {tol:e})"
                );
            }
        }
    }
    // KL penalties to the "old" log-probabilities as the reference: r_t = ref − logp.
    let mut exp = Vec::new();
    if x.logp_old.len() != n {
        exp.push("LengthMismatch");
    }
    if !all_finite(&x.logp) || !all_finite(&x.logp_old) {
        exp.push("NonFinite");
    }
    if n == 0 {
        exp.push("Empty");
    }
    for est in [
        preference::KlEstimator::K1,
        preference::KlEstimator::K2,
        preference::KlEstimator::K3,
    ] {
        let Some(g) = expect(
            "kl_penalty_grad",
            preference::kl_penalty_grad(&x.logp, &x.logp_old, est),
            &["LengthMismatch", "NonFinite", "Empty"],
            &exp,
            x,
        ) else {
            continue;
        };
        ensure!(g.len() == n, x, "kl_penalty_grad length {}", g.len());
        for t in 0..n {
            let (lp, lr) = (x.logp[t].as_f64(), x.logp_old[t].as_f64());
            let r = lr - lp;
            let gt = g[t].as_f64();
            let want = match est {
                preference::KlEstimator::K1 => 1.0 / n as f64,
                preference::KlEstimator::K2 => -r / n as f64,
                preference::KlEstimator::K3 => -r.exp_m1() / n as f64,
            };
            if want.abs() < T::MAXV / 2.0 {
                let tol = 16.0
                    * e
                    * (lp.abs() + lr.abs() + r.abs() + 2.0)
                    * (want.abs() + 1.0 / n as f64)
                    + T::TINY;
                ensure!(
                    gt.is_finite() && (gt - want).abs() <= tol,
                    x,
                    "kl_penalty_grad({est:?})[{t}] = {gt:e}, true {want:e} (tolerance {tol:e})"
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// sheet::lora

#[derive(Debug)]
#[allow(dead_code)] // the fields are read through Debug, in failure messages
struct LoraInput<T> {
    w: DMatrix<T>,
    rank: usize,
    alpha: T,
    a: Option<DMatrix<T>>,
    b: Option<DMatrix<T>>,
    x: DMatrix<T>,
    down: DMatrix<T>,
    up: DMatrix<T>,
}

/// `lora`: LoraLinear (new, set_a, set_b, forward, merged, unmerge, trainable_parameters)
/// and BottleneckAdapter (new, forward).
pub fn lora(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8().is_multiple_of(2) {
        lora_t::<f32>(&mut b)
    } else {
        lora_t::<f64>(&mut b)
    }
}

/// |a| |b| in f64 (for error bounds of products).
fn abs_mul(a: &DMatrix<f64>, b: &DMatrix<f64>) -> DMatrix<f64> {
    a.abs() * b.abs()
}

fn lora_t<T: Fz>(b: &mut Bytes) {
    let (din, dout) = (b.upto(8), b.upto(8));
    let w = b.matrix::<T>(din, dout);
    // Huge ranks only where the entry count overflows or exceeds isize::MAX bytes (no
    // multi-gigabyte allocations on a shared machine).
    let rank = if b.u8() < 16 {
        [usize::MAX, 1 << 62, 1 << 61, (1 << 62) + 1][b.upto(3)]
    } else {
        b.upto(6)
    };
    let alpha = b.value::<T>();
    let r = rank.min(6);
    let f = b.u8();
    let a = (f & 1 != 0).then(|| b.matrix::<T>(din + usize::from(f & 4 != 0), r));
    let bm = (f & 2 != 0).then(|| b.matrix::<T>(r, dout + usize::from(f & 8 != 0)));
    let n = b.upto(6);
    let x = b.matrix::<T>(n, din + usize::from(f & 16 != 0));
    let (ad, ar) = (b.upto(6), b.upto(4));
    let down = b.matrix::<T>(ad, ar + usize::from(f & 32 != 0));
    let up = b.matrix::<T>(ar, ad + usize::from(f & 64 != 0));
    let input = LoraInput {
        w,
        rank,
        alpha,
        a,
        b: bm,
        x,
        down,
        up,
    };
    let e = eps::<T>();
    let mut exp = Vec::new();
    if rank == 0 || !alpha.is_finite() {
        exp.push("InvalidParameter");
    }
    let entries = |rows: usize, cols: usize| {
        rows.checked_mul(cols)
            .and_then(|c| c.checked_mul(T::BYTES))
            .is_none_or(|b| b > isize::MAX as usize)
    };
    if rank > 6 && (entries(din, rank) || entries(rank, dout)) {
        exp.push("TooLarge");
    }
    let r = lora::LoraLinear::new(input.w.clone(), rank, alpha);
    if let Some(mut layer) = expect(
        "LoraLinear::new",
        r,
        &["InvalidParameter", "TooLarge"],
        &exp,
        &input,
    ) && rank <= 6
    {
        ensure!(
            layer.a().shape() == (din, rank)
                && layer.b().shape() == (rank, dout)
                && layer.rank() == rank,
            &input,
            "LoRA shapes"
        );
        ensure!(
            layer.trainable_parameters() == rank * (din + dout),
            &input,
            "trainable_parameters"
        );
        let merged = layer.merged();
        ensure!(
            merged
                .iter()
                .zip(input.w.iter())
                .all(|(m, w)| m == w || (m.is_nan_value() && w.is_nan_value())),
            &input,
            "a fresh layer (B = 0) merges to a different W"
        );
        if let Some(a) = &input.a {
            let exp: &[&str] = if a.shape() != (din, rank) {
                &["ShapeMismatch"]
            } else {
                &[]
            };
            let _ = expect(
                "set_a",
                layer.set_a(a.clone()),
                &["ShapeMismatch", "NonFinite"],
                exp,
                &input,
            );
        }
        if let Some(bb) = &input.b {
            let exp: &[&str] = if bb.shape() != (rank, dout) {
                &["ShapeMismatch"]
            } else {
                &[]
            };
            let _ = expect(
                "set_b",
                layer.set_b(bb.clone()),
                &["ShapeMismatch", "NonFinite"],
                exp,
                &input,
            );
        }
        let merged = layer.merged();
        let exp: &[&str] = if input.x.ncols() != din {
            &["DimensionMismatch"]
        } else {
            &[]
        };
        let fw = expect(
            "LoraLinear::forward",
            layer.forward(&input.x),
            &["DimensionMismatch", "TooLarge"],
            exp,
            &input,
        );
        let (w64, a64, b64) = (f64s(layer.w()), f64s(layer.a()), f64s(layer.b()));
        let s = layer.scaling().as_f64().abs();
        let bound = w64.abs() + abs_mul(&a64, &b64) * s;
        let finite = [w64.as_slice(), a64.as_slice(), b64.as_slice()]
            .iter()
            .all(|m| m.iter().all(|v| v.is_finite()));
        if let Some(y) = fw {
            ensure!(
                y.shape() == (input.x.nrows(), dout),
                &input,
                "forward shape"
            );
            let x64 = f64s(&input.x);
            let yb = x64.abs() * &bound;
            if finite && x64.iter().all(|v| v.is_finite()) && yb.iter().all(|v| *v < T::MAXV / 16.0)
            {
                // The exact merged weight in f64 (`merged()` itself may overflow in T where
                // x · merged does not: a huge α/r times A B, brought back by a tiny x).
                let ss = layer.scaling().as_f64();
                let want = &x64 * (&w64 + &a64 * &b64 * ss);
                // x A and (x A) B rounded in the subnormal range (tiny entries) have an
                // absolute error up to half the subnormal spacing (TINY · ε) per product,
                // which α/r carries into y: s · (Σ_k |B_kj| + r) · TINY · ε.
                let n = y.nrows();
                let carried: Vec<f64> = (0..dout)
                    .map(|j| {
                        let bsum = b64.column(j).iter().map(|v| v.abs()).sum::<f64>();
                        // α/r = 0 carries nothing, even where Σ|B| overflows f64 (0 · inf).
                        if s == 0.0 {
                            0.0
                        } else {
                            s * (bsum + rank as f64) * T::TINY * e
                        }
                    })
                    .collect();
                for (i, (g, wv)) in y.iter().zip(want.iter()).enumerate() {
                    let tol = 8.0 * (din + rank + 4) as f64 * e * yb[i] * 2.0
                        + 8.0 * T::TINY
                        + 4.0 * carried[i / n];
                    ensure!(
                        (g.as_f64() - wv).abs() <= tol,
                        &input,
                        "forward differs from x (W + s A B) by {:e} (tolerance {tol:e})",
                        (g.as_f64() - wv).abs()
                    );
                }
            }
        }
        // The backward at d_y = 1 (n x d_out): the closed forms in f64.
        let n = input.x.nrows();
        let dy = DMatrix::<T>::from_element(n, dout, T::one());
        if let Some(g) = expect(
            "LoraLinear::backward",
            layer.backward(&input.x, &dy),
            &["DimensionMismatch", "TooLarge"],
            exp,
            &input,
        ) {
            ensure!(
                g.d_a.shape() == (din, rank)
                    && g.d_b.shape() == (rank, dout)
                    && g.d_x.shape() == (n, din),
                &input,
                "backward shapes"
            );
            let x64 = f64s(&input.x);
            let ss = layer.scaling().as_f64();
            let dy64 = DMatrix::<f64>::from_element(n, dout, 1.0);
            let wants = [
                (&x64 * &a64).transpose() * &dy64 * ss,
                x64.transpose() * (&dy64 * b64.transpose()) * ss,
                &dy64 * w64.transpose() + &dy64 * b64.transpose() * a64.transpose() * ss,
            ];
            let bounds = [
                abs_mul(&x64, &a64).transpose() * &dy64 * s,
                x64.abs().transpose() * (&dy64 * b64.abs().transpose()) * s,
                &dy64 * w64.abs().transpose()
                    + &dy64 * b64.abs().transpose() * a64.abs().transpose() * s,
            ];
            let moderate = finite
                && x64.iter().all(|v| v.is_finite())
                && bounds.iter().all(|b| b.iter().all(|v| *v < T::MAXV / 16.0));
            if moderate {
                let k = (n + din + rank + dout + 4) as f64;
                let amax = a64.abs().max().max(b64.abs().max()).max(1.0);
                // Products in the subnormal range (tiny x), carried by α/r (see forward).
                let sub = 4.0 * (1.0 + s) * k * amax * T::TINY * e;
                for (name, got, want, bound) in [
                    ("d_b", &g.d_b, &wants[0], &bounds[0]),
                    ("d_a", &g.d_a, &wants[1], &bounds[1]),
                    ("d_x", &g.d_x, &wants[2], &bounds[2]),
                ] {
                    for (i, ((gv, wv), bv)) in
                        got.iter().zip(want.iter()).zip(bound.iter()).enumerate()
                    {
                        let tol = 16.0 * k * e * bv + 8.0 * T::TINY + sub;
                        ensure!(
                            (gv.as_f64() - wv).abs() <= tol,
                            &input,
                            "backward {name}[{i}] = {:e}, true {wv:e} (tolerance {tol:e})",
                            gv.as_f64()
                        );
                    }
                }
            }
        }
        if finite && bound.iter().all(|v| *v < T::MAXV / 16.0) {
            let back = layer.unmerge(&merged).expect("the right shape");
            for (i, (g, wv)) in back.iter().zip(w64.iter()).enumerate() {
                let tol = 8.0 * (rank + 2) as f64 * e * bound[i] + 4.0 * T::TINY;
                ensure!(
                    (g.as_f64() - wv).abs() <= tol,
                    &input,
                    "unmerge(merged()) differs from W at {i}: {:e} vs {wv:e}",
                    g.as_f64()
                );
            }
        }
        let wrong = DMatrix::<T>::zeros(din + 1, dout);
        ensure!(
            matches!(layer.unmerge(&wrong), Err(Error::ShapeMismatch { .. })),
            &input,
            "unmerge of a wrong shape"
        );
    }
    // Bottleneck adapter.
    let (d, rr) = input.down.shape();
    let exp: &[&str] = if input.up.shape() != (rr, d) {
        &["ShapeMismatch"]
    } else {
        &[]
    };
    if let Some(ad) = expect(
        "BottleneckAdapter::new",
        lora::BottleneckAdapter::new(input.down.clone(), input.up.clone()),
        &["ShapeMismatch"],
        exp,
        &input,
    ) {
        let (xr, xc) = (b.upto(5), d + usize::from(b.u8() == 1));
        let x = b.matrix::<T>(xr, xc);
        let exp: &[&str] = if x.ncols() != d {
            &["DimensionMismatch"]
        } else {
            &[]
        };
        if let Some(y) = expect(
            "BottleneckAdapter::forward",
            ad.forward(&x),
            &["DimensionMismatch", "TooLarge"],
            exp,
            &(&input, &x),
        ) {
            let (x64, dn, upm) = (f64s(&x), f64s(&input.down), f64s(&input.up));
            let h = (&x64 * &dn).map(|v| v.max(0.0));
            let want = &x64 + &h * &upm;
            let bound = x64.abs() + abs_mul(&abs_mul(&x64, &dn), &upm);
            // A hidden activation below the smallest normal is held in T with an absolute
            // error up to that value, which W_up then multiplies (the hidden layer is in T).
            // (Column sums of |W_up|: the bound for every row of output column j.)
            let under = upm.abs().row_sum().map(|v| v * T::TINY);
            if bound.iter().all(|v| v.is_finite() && *v < T::MAXV / 16.0) {
                for i in 0..want.len() {
                    let column = i / want.nrows();
                    let tol = 8.0 * (d + rr + 4) as f64 * e * bound[i]
                        + 8.0 * T::TINY
                        + 2.0 * under[column];
                    ensure!(
                        (y[i].as_f64() - want[i]).abs() <= tol,
                        &(&input, &x),
                        "adapter forward differs at {i}: {:e} vs {:e}",
                        y[i].as_f64(),
                        want[i]
                    );
                }
            }
        }
        // The backward at d_y = 1, where no hidden unit is close enough to 0 for rounding to
        // flip relu' (elsewhere the gradient jumps with the rounding).
        let dy = DMatrix::<T>::from_element(x.nrows(), x.ncols(), T::one());
        if let Some(g) = expect(
            "BottleneckAdapter::backward",
            ad.backward(&x, &dy),
            &["DimensionMismatch", "TooLarge", "ShapeMismatch"],
            exp,
            &(&input, &x),
        ) {
            let (n, d) = (x.nrows(), d);
            ensure!(
                g.d_down.shape() == (d, rr) && g.d_up.shape() == (rr, d) && g.d_x.shape() == (n, d),
                &(&input, &x),
                "adapter backward shapes"
            );
            let (x64, dn, upm) = (f64s(&x), f64s(&input.down), f64s(&input.up));
            let h = &x64 * &dn;
            let hb = x64.abs() * dn.abs();
            let dy64 = DMatrix::<f64>::from_element(n, d, 1.0);
            let clear = h
                .iter()
                .zip(hb.iter())
                .all(|(v, b)| v.abs() > 16.0 * (d + 2) as f64 * e * b + 4.0 * T::TINY);
            let moderate = [&x64, &dn, &upm]
                .iter()
                .all(|m| m.iter().all(|v| v.abs() < 1e15));
            if clear && moderate {
                let gm =
                    (&dy64 * upm.transpose()).zip_map(&h, |g, hv| if hv > 0.0 { g } else { 0.0 });
                let wants = [
                    x64.transpose() * &gm,
                    h.map(|v| v.max(0.0)).transpose() * &dy64,
                    &dy64 + &gm * dn.transpose(),
                ];
                let gb = &dy64 * upm.abs().transpose();
                let bounds = [
                    x64.abs().transpose() * &gb,
                    hb.transpose() * &dy64,
                    &dy64 + &gb * dn.abs().transpose(),
                ];
                let k = (n + d + rr + 4) as f64;
                for (name, got, want, bound) in [
                    ("d_down", &g.d_down, &wants[0], &bounds[0]),
                    ("d_up", &g.d_up, &wants[1], &bounds[1]),
                    ("d_x", &g.d_x, &wants[2], &bounds[2]),
                ] {
                    for (i, ((gv, wv), bv)) in
                        got.iter().zip(want.iter()).zip(bound.iter()).enumerate()
                    {
                        let tol = 16.0 * k * e * bv + 8.0 * T::TINY;
                        ensure!(
                            (gv.as_f64() - wv).abs() <= tol,
                            &(&input, &x),
                            "adapter backward {name}[{i}] = {:e}, true {wv:e} (tolerance {tol:e})",
                            gv.as_f64()
                        );
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// sheet::diagnostics

/// `diagnostics`: diagnose (max logit, entropy, normalised entropy) against the reference
/// weights, softcap, rms_normalize_rows.
pub fn diagnostics(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8().is_multiple_of(2) {
        diagnostics_t::<f32>(&mut b)
    } else {
        diagnostics_t::<f64>(&mut b)
    }
}

/// How far an entropy from the kernel's statistics may be from `hw`, the entropy of the
/// reference's weights `w` (m keys): the summation error of both, the scores' rounding `delta`
/// to first order (`dH = −Σ_j P_j (ln P_j + H) dS_j`), and the weights' own rounding, an
/// absolute `ε · P_j |1 + ln P_j|` per term (a weight that rounds to 1 loses its
/// `−(1 − r) ln(1 − r) ≈ r` entirely: the kernel's `ln_1p` keeps it).
fn entropy_tol<T: Fz>(w: &[T], hw: f64, delta: f64, m: usize) -> f64 {
    let e = eps::<T>();
    let (mut spread, mut own) = (0.0, 0.0);
    for p in w.iter().map(|p| p.as_f64()).filter(|&p| p > 0.0) {
        spread += p * (p.ln() + hw).abs();
        own += p * (1.0 + p.ln()).abs();
    }
    let scores = if spread > 0.0 {
        8.0 * delta * spread
    } else {
        0.0
    };
    // The reference's weights themselves carry a relative error of about (m + 2) ε (their
    // normalising sum), which −p ln p turns into (m + 2) ε p |1 + ln p| each: near a
    // one-hot row (p ≈ 1) that is ε-sized against an entropy that is not.
    8.0 * (m as f64 + 2.0) * e * (hw.abs() + 1e-30)
        + scores
        + 4.0 * (m as f64 + 2.0) * e * own
        + T::TINY
}

/// `scaled_attention_with_stats`: the kernel's statistics against those of the reference's
/// weights (`return_weights`), with the tolerances of `diagnostics_t` (the score error δ of
/// the max logit; the entropy's first-order sensitivity to it; the max probability's
/// relative change `exp(±2δ)`).
fn diagnostics_stats<T: Fz>(x: &AttnInput<T>, opts: &AttentionOptions<'_, T>, infos: &[RowInfo]) {
    let e = eps::<T>();
    let (n, m) = (x.q.nrows(), x.k.nrows());
    let fast = scaled_attention_with_stats(&x.q, &x.k, &x.k, &x.mask, opts);
    let slow = scaled_attention_with_stats(
        &x.q,
        &x.k,
        &x.k,
        &x.mask,
        &opts.clone().return_weights(true),
    );
    let ((fo, fs), (so, ss)) = match (fast, slow) {
        (Ok(f), Ok(s)) => (f, s),
        (f, s) => panic!(
            "stats: diagnose was Ok, the stats calls gave {:?} / {:?}",
            f.err(),
            s.err()
        ),
    };
    ensure!(
        fs.entropy.len() == n && fs.max_logit.len() == n && fs.max_prob.len() == n,
        x,
        "stats lengths"
    );
    let _ = fo;
    let w = so.weights.expect("asked");
    for i in 0..n {
        let (ml, h, p) = (
            fs.max_logit[i].as_f64(),
            fs.entropy[i].as_f64(),
            fs.max_prob[i].as_f64(),
        );
        let (wml, wh, wp) = (
            ss.max_logit[i].as_f64(),
            ss.entropy[i].as_f64(),
            ss.max_prob[i].as_f64(),
        );
        if wp == 0.0 {
            ensure!(
                ml == f64::NEG_INFINITY && h == 0.0 && p == 0.0 && wh == 0.0,
                x,
                "row {i}: masked row stats {ml:e} {h:e} {p:e}, reference {wml:e} {wh:e}"
            );
            continue;
        }
        let delta = infos[i].score_err + e * (infos[i].score_bound + (m as f64).ln() + 2.0);
        ensure!(
            !h.is_nan_value() && !p.is_nan_value() && !ml.is_nan_value(),
            x,
            "row {i}: NaN stats {ml:e} {h:e} {p:e}"
        );
        ensure!(p > 0.0 && p <= 1.0, x, "row {i}: max_prob {p:e}");
        let row: Vec<T> = w.row(i).iter().copied().collect();
        let h_tol = entropy_tol::<T>(&row, wh, delta, m);
        // (Scores whose rounding exceeds 0.01 may rightly tie on one path and not the other.)
        ensure!(
            infos[i].score_err >= 0.01 || h == wh || (h - wh).abs() <= h_tol,
            x,
            "row {i}: kernel entropy {h:e} vs the weights' {wh:e} (tolerance {h_tol:e})"
        );
        let p_tol = wp * ((8.0 * delta).exp_m1() + 8.0 * (m as f64 + 2.0) * e) + T::TINY;
        ensure!(
            p == wp || (p - wp).abs() <= p_tol,
            x,
            "row {i}: kernel max_prob {p:e} vs the weights' {wp:e} (tolerance {p_tol:e})"
        );
        if !wml.is_finite() || !ml.is_finite() {
            ensure!(
                ml == wml,
                x,
                "row {i}: kernel max_logit {ml:e} vs the reference's {wml:e}"
            );
            continue;
        }
        let l_tol = 8.0 * delta + T::TINY;
        ensure!(
            ml == wml || (ml - wml).abs() <= l_tol,
            x,
            "row {i}: kernel max_logit {ml:e} vs the reference's {wml:e} (tolerance {l_tol:e})"
        );
    }
}

fn diagnostics_t<T: Fz>(b: &mut Bytes) {
    let mut x = attn_input::<T>(b, 24, 12);
    x.opts.weights = false;
    x.v = x.k.clone();
    let opts = x.opts.build();
    let expected = attn_expected(&x);
    let e = eps::<T>();
    let r = diagnostics::diagnose(&x.q, &x.k, &x.mask, &opts);
    if let Some(dg) = expect("diagnose", r, ATTN_ERRORS, &expected, &x) {
        let (n, m) = (x.q.nrows(), x.k.nrows());
        ensure!(
            dg.max_logit.len() == n && dg.entropy.len() == n && dg.normalized_entropy.len() == n,
            &x,
            "diagnostics lengths"
        );
        let infos = row_infos(&x);
        let w = scaled_attention_reference(
            &x.q,
            &x.k,
            &x.k,
            &x.mask,
            &opts.clone().return_weights(true),
        )
        .expect("diagnose was Ok")
        .weights
        .expect("asked");
        for i in 0..n {
            let (ml, h, hn) = (
                dg.max_logit[i].as_f64(),
                dg.entropy[i].as_f64(),
                dg.normalized_entropy[i].as_f64(),
            );
            let allowed = infos[i].allowed.iter().filter(|a| **a).count();
            if allowed == 0 {
                ensure!(
                    ml == f64::NEG_INFINITY && h == 0.0 && hn == 0.0,
                    &x,
                    "fully masked row {i}: {ml:e} {h:e} {hn:e}"
                );
                continue;
            }
            let lnm = (allowed as f64).ln();
            ensure!(
                !h.is_nan_value() && h >= -e && h <= lnm * (1.0 + 4.0 * (m as f64 + 2.0) * e) + e,
                &x,
                "row {i}: entropy {h:e} outside [0, ln {allowed}]"
            );
            ensure!(
                !hn.is_nan_value() && hn >= -e && hn <= 1.0 + 4.0 * (m as f64 + 2.0) * e,
                &x,
                "row {i}: normalised entropy {hn:e}"
            );
            if allowed < 2 {
                ensure!(
                    hn == 0.0,
                    &x,
                    "row {i}: one allowed key, normalised entropy {hn:e}"
                );
            }
            let row: Vec<T> = w.row(i).iter().copied().collect();
            let hw = entropy(&row).as_f64();
            // diagnose reads the kernel's statistics: besides the summation error of the
            // entropy, the two paths round the scores differently, by δ at most (the score
            // error of the max-logit tolerance below), and to first order
            // dH = −Σ_j P_j (ln P_j + H) dS_j.
            let delta = infos[i].score_err + e * (infos[i].score_bound + (m as f64).ln() + 2.0);
            let h_tol = entropy_tol::<T>(&row, hw, delta, m);
            // Where a score's own rounding exceeds 0.01 the two paths may rightly pick
            // different winners (a tie on one, one-hot on the other: the attention target's
            // rule), and the entropy follows the weights.
            ensure!(
                infos[i].score_err >= 0.01 || h == hw || (h - hw).abs() <= h_tol,
                &x,
                "row {i}: entropy {h:e} vs entropy of the weights {hw:e} (tolerance {h_tol:e})"
            );
            if infos[i].score_bound * 4.0 < T::MAXV && infos[i].score_err < 0.01 {
                // The largest score, computed directly in f64.
                let (nq, d) = x.q.shape();
                let scale = x
                    .opts
                    .scale
                    .map_or(if d == 0 { 1.0 } else { 1.0 / (d as f64).sqrt() }, |s| {
                        s.as_f64()
                    });
                let best = (0..m)
                    .filter(|&j| infos[i].allowed[j])
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|l| x.q[(i, l)].as_f64() * x.k[(j, l)].as_f64())
                            .sum();
                        // scale 0 gives score 0 even where the f64 dot product overflows.
                        let mut s = if scale == 0.0 { 0.0 } else { scale * dot };
                        if let Some(c) = x.opts.softcap {
                            s = c.as_f64() * (s / c.as_f64()).tanh();
                        }
                        s + x.opts.bias.as_ref().map_or(0.0, |b| b[(i, j)].as_f64())
                    })
                    .fold(f64::NEG_INFINITY, f64::max);
                let _ = nq;
                let tol = 8.0
                    * (infos[i].score_err + e * (infos[i].score_bound + (m as f64).ln() + 2.0))
                    + T::TINY;
                ensure!(
                    ml.is_finite() && (ml - best).abs() <= tol,
                    &x,
                    "row {i}: max_logit {ml:e}, true {best:e} (tolerance {tol:e})"
                );
            }
        }
        diagnostics_stats(&x, &opts, &infos);
    }
    // softcap.
    let (v, c) = (b.value::<T>(), b.value::<T>());
    let exp: &[&str] = if !(c.is_finite() && c > T::zero()) {
        &["InvalidParameter"]
    } else {
        &[]
    };
    if let Some(y) = expect(
        "softcap",
        diagnostics::softcap(v, c),
        &["InvalidParameter", "NonFinite"],
        exp,
        &(v, c),
    ) {
        let (vf, cf, yf) = (v.as_f64(), c.as_f64(), y.as_f64());
        if vf.is_nan_value() {
            ensure!(yf.is_nan_value(), &(v, c), "softcap(NaN) = {yf:e}");
        } else {
            ensure!(
                !yf.is_nan_value()
                    && yf.abs() <= cf * (1.0 + 2.0 * e)
                    && yf.abs() <= vf.abs() * (1.0 + 2.0 * e),
                &(v, c),
                "softcap = {yf:e}"
            );
            ensure!(
                yf == 0.0 || (yf > 0.0) == (vf > 0.0),
                &(v, c),
                "softcap changed the sign"
            );
            if T::BYTES == 4 {
                let want = cf * (vf / cf).tanh();
                ensure!(
                    (yf - want).abs() <= 8.0 * e * want.abs() + T::TINY * e,
                    &(v, c),
                    "softcap = {yf:e}, true {want:e}"
                );
            }
        }
    }
    // rms_normalize_rows.
    let (n, d) = (b.upto(6), b.upto(12));
    let xm = b.matrix::<T>(n, d);
    let ep = if b.flag() {
        b.value::<T>()
    } else {
        T::of_f64(1e-6)
    };
    let exp: &[&str] = if !(ep.is_finite() && ep > T::zero()) {
        &["InvalidParameter"]
    } else {
        &[]
    };
    if let Some(y) = expect(
        "rms_normalize_rows",
        diagnostics::rms_normalize_rows(&xm, ep),
        &["InvalidParameter", "NonFinite"],
        exp,
        &(&xm, ep),
    ) {
        ensure!(y.shape() == (n, d), &(&xm, ep), "rms_normalize_rows shape");
        for i in 0..n {
            let row: Vec<f64> = xm.row(i).iter().map(|v| v.as_f64()).collect();
            let out: Vec<f64> = y.row(i).iter().map(|v| v.as_f64()).collect();
            if row.iter().any(|v| v.is_nan_value()) {
                ensure!(
                    out.iter().any(|v| v.is_nan_value()),
                    &(&xm, ep),
                    "a NaN row normalised to a finite row"
                );
                continue;
            }
            if !row.iter().all(|v| v.is_finite()) {
                continue;
            }
            ensure!(
                out.iter().all(|v| v.is_finite()),
                &(&xm, ep),
                "row {i}: rms_normalize_rows not finite: {out:?}"
            );
            let a = amax(&row);
            // The f64 reference is exact enough only for f32 inputs.
            if a > 0.0 && T::BYTES == 4 {
                let ms: f64 = row.iter().map(|v| (v / a) * (v / a)).sum::<f64>() / d as f64;
                let denom = (ms + ep.as_f64() / (a * a)).sqrt();
                for (j, (&xv, &yv)) in row.iter().zip(&out).enumerate() {
                    let want = (xv / a) / denom;
                    let want_t = T::of_f64(want).as_f64();
                    let tol = 4.0 * (d as f64 + 4.0) * e * want.abs()
                        + 2.0 * T::TINY
                        + (want - want_t).abs();
                    ensure!(
                        (yv - want).abs() <= tol,
                        &(&xm, ep),
                        "row {i}, col {j}: {yv:e}, true {want:e}"
                    );
                }
            }
        }
    }
}
