#!/bin/bash
# Decode step and read bound through f32 / f16 / bf16 caches, alternating: halfbench.sh ROUNDS THREADS
# (run in benches/peers after cargo build --release --bin sdpa; SDPA overrides the binary).
r=$1; threads=$2
for i in $(seq $r); do
 for m in 1024 4096 8192 32768; do
   for dt in f32 f16 bf16; do
    for mode in step read; do
     extra=""; [ $mode = read ] && extra="--read-kv"
     ms=$(${SDPA:-target/release/sdpa} --n 1 --m $m --d 128 --heads 32 --kv-heads 8 --mask causal_br --dtype $dt --cache $extra --threads $threads --reps 10 --min-secs 0.3 | python3 -c "import json,sys; print(json.loads(sys.stdin.read())['median_ms'])")
     echo "$m $threads $dt $mode $ms"
    done
   done
 done
done
