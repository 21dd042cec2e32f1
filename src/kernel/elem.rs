//! What the kernel needs of a float beyond [`Float`](crate::Float): tile sizes and the
//! vector hooks, implemented for `f32` and `f64` only.
//!
//! [`KernelFloat`] is a supertrait of `Float`, sealed the same way (it lives in a private
//! module), so generic code bound by `T: Float` can call the hooks while users cannot name or
//! implement the trait.

use super::exp;
use super::microkernel::{self, Out, Panels, Rows, Shape};

/// The instruction set the vector hooks run on. `Avx2Fma` is only ever constructed by
/// [`Isa::detect`], after the CPU reported both features: the `unsafe` dispatch sites rely
/// on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, any target.
    Portable,
    /// AVX2 and FMA on x86-64.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once by `std`, then cached).
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Isa::Avx2Fma;
        }
        Isa::Portable
    }

    /// Every instruction set this CPU can run, for tests of each path.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let mut all = vec![Isa::Portable];
        if Isa::detect() != Isa::Portable {
            all.push(Isa::detect());
        }
        all
    }
}

/// Tile sizes and vector hooks of one float type.
pub trait KernelFloat: Copy + Send + Sync + 'static {
    /// Rows of the micro-kernel's block (query rows per register block).
    const MR: usize;
    /// Columns of a packed panel: two vectors (16 f32, 8 f64).
    const NR: usize;
    /// Query rows per tile (a multiple of MR).
    const BR: usize;
    /// Keys per tile (a multiple of NR).
    const BC: usize;

    /// C (+)= A · B over a padded tile; see [`microkernel`].
    fn gemm(isa: Isa, s: Shape, a: Rows<'_, Self>, b: Panels<'_, Self>, c: Out<'_, Self>);

    /// One online-softmax step on a score row in log₂ units (length a multiple of NR):
    /// `m_new = max(m_old, max(row))`, `row ← 2^(row − m_new)`; returns `(m_new, Σ row)`.
    /// If `m_new = −inf` the row becomes zeros and `(−inf, 0)` is returned.
    fn softmax_row(isa: Isa, row: &mut [Self], m_old: Self) -> (Self, Self);

    /// `row ← alpha · row`.
    fn scale_row(isa: Isa, row: &mut [Self], alpha: Self);

    /// `x ← eˣ` in place (see [`exp`] for accuracy and special values).
    fn exp_in_place(isa: Isa, x: &mut [Self]);
}

macro_rules! kernel_float {
    ($t:ty, $nr:expr, $br:expr, $bc:expr, $gemm:ident, $softmax:ident, $scale:ident,
     $exp:ident, $exp2:ident) => {
        impl KernelFloat for $t {
            const MR: usize = 6;
            const NR: usize = $nr;
            const BR: usize = $br;
            const BC: usize = $bc;

            #[inline]
            fn gemm(isa: Isa, s: Shape, a: Rows<'_, Self>, b: Panels<'_, Self>, c: Out<'_, Self>) {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Isa::Avx2Fma` is only constructed after detecting AVX2 and FMA.
                    Isa::Avx2Fma => unsafe { microkernel::avx2::$gemm(s, a, b, c) },
                    Isa::Portable => microkernel::gemm_portable::<$t, 6, $nr>(s, a, b, c),
                }
            }

            #[inline]
            fn softmax_row(isa: Isa, row: &mut [Self], m_old: Self) -> (Self, Self) {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as in `gemm`.
                    Isa::Avx2Fma => unsafe { microkernel::avx2::$softmax(row, m_old) },
                    Isa::Portable => {
                        microkernel::softmax_row_portable(row, m_old, exp::portable::$exp2)
                    }
                }
            }

            #[inline]
            fn scale_row(isa: Isa, row: &mut [Self], alpha: Self) {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as in `gemm`.
                    Isa::Avx2Fma => unsafe { microkernel::avx2::$scale(row, alpha) },
                    Isa::Portable => row.iter_mut().for_each(|x| *x *= alpha),
                }
            }

            #[inline]
            fn exp_in_place(isa: Isa, x: &mut [Self]) {
                exp::$exp(isa, x)
            }
        }
    };
}

kernel_float!(
    f32,
    16,
    96,
    256,
    gemm_f32,
    softmax_row_f32,
    scale_row_f32,
    exp_f32,
    exp2_f32
);
kernel_float!(
    f64,
    8,
    48,
    128,
    gemm_f64,
    softmax_row_f64,
    scale_row_f64,
    exp_f64,
    exp2_f64
);
