#!/usr/bin/env bash
# Runs every cargo-fuzz target of attention-math for a fixed time, then minimises its corpus.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS defaults to 600 per target; the targets default to all of them. Needs the nightly
# toolchain and cargo-fuzz (`cargo install cargo-fuzz`). One job, one worker, so that it
# leaves the other cores alone; set FUZZ_JOBS to run more. Crashes are written to
# fuzz/artifacts/<target>/; the corpus (fuzz/corpus/<target>/) is replayed on stable by
# `cargo test --test fuzz_corpus`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
jobs="${FUZZ_JOBS:-1}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
status=0
for t in "${targets[@]}"; do
    echo "=== $t: ${secs}s"
    mkdir -p "corpus/$t" "artifacts/$t"
    if ! cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -jobs="$jobs" -workers="$jobs" \
        -max_len=4096 -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tee "/tmp/fuzz-$t.log" | grep -E "^(#[0-9]+.*(DONE|pulse)|stat::|==|SUMMARY|thread|property)" ; then
        echo "!!! $t stopped early: see /tmp/fuzz-$t.log and fuzz/artifacts/$t/"
        status=1
    fi
    cargo +nightly fuzz cmin "$t" 2>&1 | tail -n 2 || true
done
exit $status
