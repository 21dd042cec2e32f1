//! What the kernel needs of a float beyond [`Float`](crate::Float): tile sizes and the
//! vector hooks, implemented for `f32` and `f64` only.
//!
//! [`KernelFloat`] is a supertrait of `Float`, sealed the same way (it lives in a private
//! module), so generic code bound by `T: Float` can call the hooks while users cannot name or
//! implement the trait.

use super::exp;
use super::microkernel::{self, Out, Panels, Rows, Shape};

/// The instruction set the vector hooks run on. `Avx2Fma` and `Avx512` are only ever
/// constructed by [`Isa::detect`] or [`Isa::available`], after the CPU reported the features
/// they name: the `unsafe` dispatch sites rely on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, any target.
    Portable,
    /// AVX2 and FMA on x86-64.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// AVX-512F on x86-64 (together with AVX2 and FMA, which every AVX-512 CPU has; the
    /// detection checks all three). f32 runs on 16-lane zmm kernels; f64 on the AVX2 ones.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once by `std`, then cached).
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            if std::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            return Isa::Avx2Fma;
        }
        Isa::Portable
    }

    /// Every instruction set this CPU can run, for tests of each path.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            let best = Isa::detect();
            if best != Isa::Portable {
                all.push(Isa::Avx2Fma);
            }
            if best == Isa::Avx512 {
                all.push(Isa::Avx512);
            }
        }
        all
    }
}

/// Tile sizes and vector hooks of one float type.
pub trait KernelFloat: Copy + Send + Sync + 'static {
    /// Rows of the micro-kernel's block (query rows per register block).
    const MR: usize;
    /// Columns of a packed panel (32 f32: two zmm vectors, or two halves of two ymm vectors
    /// each for AVX2; 8 f64: two ymm vectors).
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
     $exp:ident, $exp2:ident, $wide:ident) => {
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
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Isa::Avx512` is only constructed after detecting AVX-512F, AVX2
                    // and FMA.
                    Isa::Avx512 => unsafe { microkernel::$wide::$gemm(s, a, b, c) },
                    Isa::Portable => microkernel::gemm_portable::<$t, 6, $nr>(s, a, b, c),
                }
            }

            #[inline]
            fn softmax_row(isa: Isa, row: &mut [Self], m_old: Self) -> (Self, Self) {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as in `gemm`.
                    Isa::Avx2Fma => unsafe { microkernel::avx2::$softmax(row, m_old) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as in `gemm`.
                    Isa::Avx512 => unsafe { microkernel::$wide::$softmax(row, m_old) },
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
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as in `gemm`.
                    Isa::Avx512 => unsafe { microkernel::$wide::$scale(row, alpha) },
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
    32,
    96,
    256,
    gemm_f32,
    softmax_row_f32,
    scale_row_f32,
    exp_f32,
    exp2_f32,
    avx512
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
    exp2_f64,
    avx2 // f64 keeps the AVX2 kernels on AVX-512 CPUs
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel tests iterate over `Isa::available()`: it must hold the path the library
    /// actually takes (AVX-512 on CPUs that have it), the portable one, and no duplicates.
    #[test]
    fn available_covers_the_detected_path() {
        let all = Isa::available();
        assert!(all.contains(&Isa::detect()), "{all:?}");
        assert_eq!(all[0], Isa::Portable);
        for (i, a) in all.iter().enumerate() {
            assert!(!all[i + 1..].contains(a), "{all:?}");
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx2") {
            assert!(all.contains(&Isa::Avx512) && all.contains(&Isa::Avx2Fma));
        }
    }
}
