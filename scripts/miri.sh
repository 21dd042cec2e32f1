#!/usr/bin/env bash
# Runs the library's unit tests that Miri can run under Miri, on the portable SIMD path.
#
#   scripts/miri.sh [TEST FILTER...]
#
# Default filters: the safe layers and the portable path (simd::, softmax::, entropy::,
# mask::, error::, float::, grad::softmax). Miri is far too slow for the kernel's large
# tests and cannot run the x86 intrinsics path (it is forced off with
# ATTENTION_MATH_ISA=portable), so those are not in the default set.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo +nightly miri --version >/dev/null 2>&1; then
    echo "Miri is not installed for the nightly toolchain; trying: rustup +nightly component add miri"
    if ! rustup +nightly component add miri; then
        echo "error: the Miri component cannot be had here (no network for toolchains?);" >&2
        echo "       install it with 'rustup +nightly component add miri' and rerun." >&2
        exit 2
    fi
fi
filters=("$@")
if [ ${#filters[@]} -eq 0 ]; then
    filters=(simd:: softmax:: entropy:: mask:: error:: float:: grad::softmax)
fi
export ATTENTION_MATH_ISA=portable
# Tree borrows is the model the crate's unsafe code is written for; isolation stays on
# except for the environment variable above (Miri forwards env vars by default). Miri adds
# a random error of a few ulps to std's float functions (exp, ln, ...) unless floats are made
# deterministic: the exp tests compare the vector exp with std's to an ulp and would fail.
export MIRIFLAGS="${MIRIFLAGS:--Zmiri-tree-borrows -Zmiri-deterministic-floats -Zmiri-env-forward=ATTENTION_MATH_ISA}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
cargo +nightly miri setup
status=0
for f in "${filters[@]}"; do
    echo "=== miri: cargo test --lib $f"
    cargo +nightly miri test --lib -- "$f" || status=1
done
exit $status
