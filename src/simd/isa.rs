//! Which instruction set the vector code runs on: detected once, cached, and capped by the
//! `ATTENTION_MATH_ISA` environment variable.
//!
//! Without the `std` feature there is neither run-time detection nor an environment: the
//! instruction set is the best one the build's target features enable (`-C target-cpu=...`
//! or `-C target-feature=...`), fixed at compile time, and nothing caps it.

#[cfg(target_arch = "x86_64")]
use super::{Avx2, Avx512};
use alloc::string::String;
use alloc::vec::Vec;
use alloc::{format, vec};
use core::fmt;
#[cfg(feature = "std")]
use std::sync::OnceLock;

/// The instruction sets the crate's kernels are written for, from the least to the most
/// capable, as reported by [`instruction_set`].
///
/// # Examples
///
/// ```
/// use attention_math::{instruction_set, InstructionSet};
///
/// let isa = instruction_set();
/// assert!(isa >= InstructionSet::Portable);
/// assert_eq!(InstructionSet::Avx2.to_string(), "avx2");
/// assert_eq!("AVX512".parse::<InstructionSet>(), Ok(InstructionSet::Avx512));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InstructionSet {
    /// Plain Rust on any target (the vector algorithms on arrays).
    Portable,
    /// AVX2, FMA and F16C on x86-64: 8 f32 or 4 f64 lanes.
    Avx2,
    /// AVX-512F on x86-64: 16 f32 or 8 f64 lanes.
    Avx512,
}

impl InstructionSet {
    /// The name used by `ATTENTION_MATH_ISA` and by [`Display`](fmt::Display): `portable`,
    /// `avx2` or `avx512`.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(attention_math::InstructionSet::Portable.name(), "portable");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            InstructionSet::Portable => "portable",
            InstructionSet::Avx2 => "avx2",
            InstructionSet::Avx512 => "avx512",
        }
    }
}

impl fmt::Display for InstructionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for InstructionSet {
    type Err = String;

    /// Parses `portable`, `avx2` or `avx512` (any case, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" => Ok(InstructionSet::Portable),
            "avx2" => Ok(InstructionSet::Avx2),
            "avx512" => Ok(InstructionSet::Avx512),
            _ => Err(format!(
                "`{s}` is not an instruction set: expected portable, avx2 or avx512"
            )),
        }
    }
}

/// The instruction set the kernels run on in this process: the best this CPU supports, capped
/// by the environment variable `ATTENTION_MATH_ISA` (`portable`, `avx2` or `avx512`) if it is
/// set. Detected on first use, then fixed for the life of the process.
///
/// The cap never raises the choice above what the CPU has: asking for `avx512` on a CPU
/// without AVX-512F runs AVX2 (or portable code) and says so once on standard error, as does
/// a value that is not one of the three names (which is then ignored). Tests and benchmarks
/// use the variable to run each code path on a machine that has several; ordinary programs
/// leave it unset.
///
/// Without the `std` feature: the best instruction set the build's target features enable
/// (portable code unless the crate is built with, say, `-C target-cpu=native` or
/// `-C target-feature=+avx2,+fma,+f16c`), and no variable.
///
/// # Examples
///
/// ```
/// use attention_math::{instruction_set, InstructionSet};
///
/// match std::env::var("ATTENTION_MATH_ISA").ok().and_then(|v| v.parse().ok()) {
///     Some(cap) => assert!(instruction_set() <= cap),
///     None => println!("running on {}", instruction_set()),
/// }
/// # let _: InstructionSet = instruction_set();
/// ```
pub fn instruction_set() -> InstructionSet {
    Isa::get().kind()
}

/// The instruction set in use, holding its token: only detection makes one (see the
/// [module docs](super)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust.
    Portable,
    /// AVX2 + FMA + F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
    /// AVX-512F (+ AVX2, FMA, F16C).
    #[cfg(target_arch = "x86_64")]
    Avx512(Avx512),
}

impl Isa {
    /// The best instruction set of this CPU, ignoring any cap.
    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(t) = Avx512::detect() {
                return Isa::Avx512(t);
            }
            if let Some(t) = Avx2::detect() {
                return Isa::Avx2(t);
            }
        }
        Isa::Portable
    }

    /// The instruction set in use: [`Isa::best`] capped by `ATTENTION_MATH_ISA`, detected
    /// once and cached.
    #[cfg(feature = "std")]
    pub fn get() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::best();
            match std::env::var("ATTENTION_MATH_ISA") {
                Err(_) => best,
                Ok(v) if v.trim().is_empty() => best,
                Ok(v) => match v.parse::<InstructionSet>() {
                    Err(e) => {
                        eprintln!("attention-math: ATTENTION_MATH_ISA: {e}; ignored");
                        best
                    }
                    Ok(cap) => {
                        let isa = best.capped(cap);
                        if isa.kind() < cap {
                            eprintln!(
                                "attention-math: ATTENTION_MATH_ISA={cap} asks for more than \
                                 this CPU has; running {}",
                                isa.kind()
                            );
                        }
                        isa
                    }
                },
            }
        })
    }

    /// The instruction set in use without `std`: [`Isa::best`], which is then a compile-time
    /// constant (no cache is needed, and there is no environment to cap it).
    #[cfg(not(feature = "std"))]
    pub fn get() -> Isa {
        Isa::best()
    }

    /// `self`, or the best instruction set below it that does not exceed `cap`.
    #[cfg(any(feature = "std", test))]
    fn capped(self, cap: InstructionSet) -> Isa {
        Isa::down_from(self)
            .into_iter()
            .find(|isa| isa.kind() <= cap)
            .unwrap_or(Isa::Portable)
    }

    /// `isa` and every instruction set below it, from the top.
    fn down_from(isa: Isa) -> Vec<Isa> {
        match isa {
            Isa::Portable => vec![Isa::Portable],
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(t) => vec![Isa::Avx2(t), Isa::Portable],
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512(t) => vec![Isa::Avx512(t), Isa::Avx2(t.avx2()), Isa::Portable],
        }
    }

    /// Every instruction set up to the one in use, from portable up: tests run each path.
    pub fn available() -> Vec<Isa> {
        let mut all = Isa::down_from(Isa::get());
        all.reverse();
        all
    }

    /// The public name of this instruction set.
    pub fn kind(self) -> InstructionSet {
        match self {
            Isa::Portable => InstructionSet::Portable,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(_) => InstructionSet::Avx2,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512(_) => InstructionSet::Avx512,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    #[test]
    fn available_runs_from_portable_up_to_the_one_in_use() {
        let all = Isa::available();
        assert_eq!(all[0], Isa::Portable);
        assert_eq!(*all.last().unwrap(), Isa::get());
        for w in all.windows(2) {
            assert!(w[0].kind() < w[1].kind(), "{all:?}");
        }
        assert_eq!(Isa::get().kind(), instruction_set());
        // Capping never raises: portable caps everything to portable.
        assert_eq!(Isa::get().capped(InstructionSet::Portable), Isa::Portable);
        assert_eq!(Isa::get().capped(InstructionSet::Avx512), Isa::get());
    }

    #[test]
    fn names_round_trip() {
        for k in [
            InstructionSet::Portable,
            InstructionSet::Avx2,
            InstructionSet::Avx512,
        ] {
            assert_eq!(k.name().parse::<InstructionSet>(), Ok(k));
            assert_eq!(format!(" {} ", k.to_string().to_uppercase()).parse(), Ok(k));
        }
        let e = "sse2".parse::<InstructionSet>().unwrap_err();
        assert_eq!(
            e,
            "`sse2` is not an instruction set: expected portable, avx2 or avx512"
        );
    }
}
