#!/usr/bin/env python3
"""attention-math vs PyTorch's CPU scaled_dot_product_attention, side by side in one run.

For every workload and thread count the two implementations are alternated (torch, crate,
torch, crate, ... for --rounds rounds); each turn times at least 3 calls and at least --secs
seconds after one untimed warm-up call, and the table gives the medians over all timed calls.
ratio = torch ms / crate ms: above 1, the crate is faster.

The crate's side is the `sdpa` binary of this package (built here with cargo unless
--no-build), run as a subprocess per turn with the same thread count; PyTorch runs in this
process with torch.set_num_threads(t). Both build bit-identical inputs from one formula (see
`inputs` below and `input_value` in src/bin/sdpa.rs); the crate's first turn of each
workload dumps its results and the max abs difference to PyTorch's is printed (O, and for
forward + backward also dQ, dK, dV).

    bash benches/peers/setup_torch.sh
    benches/peers/.venv/bin/python benches/peers/torch_compare.py [--quick]
        [--threads 1,2] [--rounds 5] [--secs 0.3] [--only SUBSTR] [--json out.json]

GFLOP/s count the allowed (query, key) pairs only: forward 2·pairs·(d + d_v) per head;
forward + backward 3.5 times that (the backward as 2.5 forwards, FlashAttention-2's count).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.join(HERE, "target", "release", "sdpa")


# ---------------------------------------------------------------------------------------
# Inputs: the same bits as src/bin/sdpa.rs.


def _splitmix64(x):
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def inputs(t, heads, rows, cols, dtype):
    """Tensor t (0 Q, 1 K, 2 V, 3 dO) as (1, heads, rows, cols), value uniform on [-√3, √3)."""
    count = heads * rows * cols
    out = np.empty(count, dtype=dtype)
    chunk = 1 << 22  # bounded temporaries for the large decode caches
    for s in range(0, count, chunk):
        idx = np.arange(s, min(s + chunk, count), dtype=np.uint64) | np.uint64(t << 40)
        u = (_splitmix64(idx) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
        out[s : s + len(idx)] = ((2.0 * u - 1.0) * math.sqrt(3.0)).astype(dtype)
    return torch.from_numpy(out.reshape(1, heads, rows, cols))


# ---------------------------------------------------------------------------------------
# Workloads.


class Workload:
    def __init__(self, name, n, d, heads=1, kv_heads=None, m=None, mask="none",
                 dtype="f32", backward=False, cache=False):
        self.name, self.n, self.d, self.heads = name, n, d, heads
        self.kv_heads = heads if kv_heads is None else kv_heads
        self.m = n if m is None else m
        self.mask, self.dtype, self.backward = mask, dtype, backward
        # The crate's side through KvCache::attention (the decode path of a real model);
        # PyTorch's is the same SDPA call on the cached K and V.
        self.cache = cache

    def crate_args(self):
        a = ["--n", self.n, "--m", self.m, "--d", self.d, "--heads", self.heads,
             "--kv-heads", self.kv_heads, "--mask", self.mask, "--dtype", self.dtype]
        return ([str(x) for x in a] + (["--backward"] if self.backward else [])
                + (["--cache"] if self.cache else []))

    def kv_bytes(self):
        return self.m * self.kv_heads * 2 * self.d * (4 if self.dtype == "f32" else 8)

    def pairs(self):
        """Allowed (query, key) pairs of the mask for n queries and m keys (one head)."""
        n, m = self.n, self.m
        i = np.arange(n, dtype=np.int64)
        if self.mask == "none":
            return n * m
        if self.mask == "causal":
            return int(np.clip(i + 1, 0, m).sum())
        if self.mask == "causal_br":
            return int(np.clip(i + 1 + m - n, 0, m).sum())
        if self.mask.startswith("window:"):
            w = int(self.mask.split(":")[1])
            hi = np.minimum(i, m - 1)
            lo = np.maximum(i - w, 0)
            return int(np.maximum(hi - lo + 1, 0).sum())
        raise ValueError(self.mask)

    def gflop(self):
        f = 2.0 * self.pairs() * (2 * self.d) * self.heads * 1e-9
        return 3.5 * f if self.backward else f


def full_workloads():
    w = []
    for d in (64, 128):
        for mask in ("none", "causal", "window:256"):
            for n in (1024, 2048, 4096):
                w.append(Workload(f"1 head n={n} d={d} {mask}", n, d, mask=mask))
    w.append(Workload("16 heads n=128 d=64 causal", 128, 64, heads=16, mask="causal"))
    w.append(Workload("8 heads n=1024 d=64 causal", 1024, 64, heads=8, mask="causal"))
    w.append(Workload("fwd+bwd 1 head n=1024 d=64 causal", 1024, 64, mask="causal",
                      backward=True))
    w.append(Workload("fwd+bwd 1 head n=2048 d=64 none", 2048, 64, backward=True))
    w.append(Workload("f64 1 head n=1024 d=64 none", 1024, 64, dtype="f64"))
    for m in (1024, 4096, 8192, 32768):
        w.append(Workload(f"decode 32q/8kv m={m} d=128 cache", 1, 128, heads=32, kv_heads=8,
                          m=m, cache=True))
    w.append(Workload("decode 32q/8kv m=8192 d=128 views", 1, 128, heads=32, kv_heads=8,
                      m=8192))
    return w


def quick_workloads():
    return [
        Workload("1 head n=256 d=64 causal", 256, 64, mask="causal"),
        Workload("1 head n=256 d=64 window:32", 256, 64, mask="window:32"),
        Workload("4 heads n=64 d=64 causal", 64, 64, heads=4, mask="causal"),
        Workload("fwd+bwd 1 head n=128 d=64 causal", 128, 64, mask="causal", backward=True),
        Workload("f64 1 head n=128 d=64 none", 128, 64, dtype="f64"),
        Workload("decode 8q/2kv m=512 d=64 cache", 1, 64, heads=8, kv_heads=2, m=512,
                 cache=True),
    ]


# ---------------------------------------------------------------------------------------
# PyTorch's side.


class TorchSide:
    def __init__(self, w):
        dt = torch.float32 if w.dtype == "f32" else torch.float64
        npdt = np.float32 if w.dtype == "f32" else np.float64
        self.w = w
        self.q = inputs(0, w.heads, w.n, w.d, npdt)
        self.k = inputs(1, w.kv_heads, w.m, w.d, npdt)
        self.v = inputs(2, w.kv_heads, w.m, w.d, npdt)
        self.d_out = inputs(3, w.heads, w.n, w.d, npdt) if w.backward else None
        assert self.q.dtype == dt
        self.kw = {}
        if w.mask == "causal":
            assert w.n == w.m, "PyTorch's is_causal is top-left aligned"
            self.kw["is_causal"] = True
        elif w.mask == "causal_br":
            self.kw["attn_mask"] = self._float_mask(
                lambda i, j: j <= i + (w.m - w.n), dt)
        elif w.mask.startswith("window:"):
            win = int(w.mask.split(":")[1])
            self.kw["attn_mask"] = self._float_mask(lambda i, j: (j <= i) & (j >= i - win), dt)
        if w.kv_heads != w.heads:
            self.kw["enable_gqa"] = True
        if w.backward:
            for t in (self.q, self.k, self.v):
                t.requires_grad_(True)

    def _float_mask(self, allow, dt):
        # Built once outside the timed call as model code does: an additive 0 / -inf mask.
        # (A bool mask would be converted by torch.where inside every call.)
        i = torch.arange(self.w.n).unsqueeze(1)
        j = torch.arange(self.w.m).unsqueeze(0)
        zero = torch.zeros((), dtype=dt)
        return torch.where(allow(i, j), zero, torch.tensor(float("-inf"), dtype=dt))

    def backend(self):
        try:
            from torch.nn.attention import SDPBackend
            c = torch._fused_sdp_choice(self.q, self.k, self.v, **self.kw)
            return SDPBackend(c).name.lower()
        except Exception:  # noqa: BLE001 (private API; report rather than fail)
            return "?"

    def call(self):
        if self.w.backward:
            for t in (self.q, self.k, self.v):
                t.grad = None
            out = F.scaled_dot_product_attention(self.q, self.k, self.v, **self.kw)
            out.backward(self.d_out)
            return out
        with torch.no_grad():
            return F.scaled_dot_product_attention(self.q, self.k, self.v, **self.kw)

    def results(self):
        """What the crate's --dump holds, as one flat numpy array."""
        out = self.call().detach()
        parts = [out]
        if self.w.backward:
            parts += [self.q.grad, self.k.grad, self.v.grad]
        return np.concatenate([p.reshape(-1).numpy() for p in parts])

    def turn(self, secs, min_reps=3):
        self.call()
        times = []
        start = time.perf_counter()
        while len(times) < min_reps or time.perf_counter() - start < secs:
            t = time.perf_counter()
            self.call()
            times.append((time.perf_counter() - t) * 1e3)
        return times


# ---------------------------------------------------------------------------------------
# The crate's side.


def crate_turn(w, threads, secs, dump=None, min_reps=3):
    cmd = [BIN] + w.crate_args() + ["--threads", str(threads), "--reps", str(min_reps),
                                     "--min-secs", str(secs)]
    if dump:
        cmd += ["--dump", dump]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])["times_ms"]


def read_turn(w, threads, secs):
    """One read of the workload's cached K and V (the decode bound), in ms per call."""
    cmd = [BIN] + w.crate_args() + ["--read-kv", "--threads", str(threads), "--reps", "3",
                                     "--min-secs", str(secs)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])["times_ms"]


def max_diff(w, torch_side, dump):
    dt = np.float32 if w.dtype == "f32" else np.float64
    ours = np.fromfile(dump, dtype=np.dtype(dt).newbyteorder("<"))
    theirs = torch_side.results()
    if ours.shape != theirs.shape:
        return f"shape {ours.shape} vs {theirs.shape}"
    if not w.backward:
        return f"{np.abs(ours - theirs).max():.1e}"
    # O, dQ, dK, dV: sizes n·d, n·d, m·d, m·d (one head).
    sizes = [w.n * w.d, w.n * w.d, w.m * w.d, w.m * w.d]
    cuts = np.cumsum([0] + sizes)
    diffs = [np.abs(ours[a:b] - theirs[a:b]).max() for a, b in zip(cuts[:-1], cuts[1:])]
    return "/".join(f"{x:.0e}" for x in diffs) + " (O/dQ/dK/dV)"


# ---------------------------------------------------------------------------------------
# Machine and versions.


def cpu_info():
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
    except OSError:
        pass
    flags = fields.get("Flags", "")
    isa = "avx512f" if "avx512f" in flags.split() else ("avx2" if "avx2" in flags.split() else "")
    return (f"{fields.get('Model name', platform.processor() or '?')} "
            f"(family {fields.get('CPU family', '?')}, model {fields.get('Model', '?')}, "
            f"{fields.get('CPU(s)', '?')} CPUs, {isa or 'no avx2'}; "
            f"L2 {fields.get('L2 cache', '?')}, L3 {fields.get('L3 cache', '?')})")


def git_commit():
    try:
        rev = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--", "../../src"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (src/ modified)" if dirty else "")
    except OSError:
        return "?"


def parallel_backend():
    for line in torch.__config__.parallel_info().splitlines():
        if "parallel backend" in line:
            return line.strip()
    return "parallel backend ?"


def noisy(turns):
    """Whether the per-turn medians of one implementation differ by more than 20%."""
    meds = [float(np.median(t)) for t in turns]
    return max(meds) > 1.2 * min(meds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few tiny workloads (smoke test)")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma separated")
    ap.add_argument("--rounds", type=int, default=None, help="alternations (default 5; quick 2)")
    ap.add_argument("--secs", type=float, default=None,
                    help="minimum seconds per turn (default 0.3; quick 0.02)")
    ap.add_argument("--only", default=None, help="run workloads whose name contains this")
    ap.add_argument("--json", default=None, help="also write all timings to this file")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build first")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    secs = args.secs if args.secs is not None else (0.02 if args.quick else 0.3)
    threads = [int(t) for t in args.threads.split(",")]
    workloads = quick_workloads() if args.quick else full_workloads()
    if args.only:
        workloads = [w for w in workloads if args.only in w.name]

    try:  # read before the build, which adds load of its own
        load = float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError):
        load = 0.0
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "sdpa"], cwd=HERE,
                       check=True)
    info = json.loads(subprocess.run([BIN, "--info"], capture_output=True, text=True,
                                     check=True).stdout)
    header = {
        "cpu": cpu_info(),
        "commit": git_commit(),
        "crate_isa": info["instruction_set"],
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "rounds": rounds,
        "secs_per_turn": secs,
    }
    print(f"CPU: {header['cpu']}")
    print(f"attention-math at {header['commit']}, instruction set {header['crate_isa']}; "
          f"torch {header['torch']} (CPU capability {header['torch_cpu_capability']}, "
          f"{parallel_backend()}), "
          f"python {header['python']}")
    print(f"{rounds} rounds alternating torch / crate, each turn >= 3 calls and >= {secs} s; "
          f"medians of all timed calls; ratio = torch / crate (above 1: the crate is faster)")
    header["loadavg_1min"] = load
    if load > 0.5:
        print(f"WARNING: 1-minute load average {load:.2f} before the run: other work shares the "
              f"CPUs and the timings (above all the 2-thread PyTorch ones) are not meaningful")
    print()
    cols = (f"{'workload':<36} {'thr':>3} | {'crate ms':>9} {'torch ms':>9} {'ratio':>7} | "
            f"{'crate GF/s':>10} {'torch GF/s':>10} | {'torch backend':<13} | max |diff|")
    print(cols)
    print("-" * len(cols))

    results = []
    n_noisy = 0
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for w in workloads:
            side = TorchSide(w)
            backend = side.backend()
            for t in threads:
                torch.set_num_threads(t)
                t_turns, c_turns = [], []
                diff = "-"
                r_turns = []
                for r in range(rounds):
                    t_turns.append(side.turn(secs))
                    time.sleep(0.05)  # let torch's OpenMP workers stop spinning
                    dump = os.path.join(tmp, "out.bin") if r == 0 else None
                    c_turns.append(crate_turn(w, t, secs, dump))
                    if dump:
                        diff = max_diff(w, side, dump)
                    if w.cache:
                        r_turns.append(read_turn(w, t, secs))
                tt = [x for turn in t_turns for x in turn]
                ct = [x for turn in c_turns for x in turn]
                c_ms, t_ms = float(np.median(ct)), float(np.median(tt))
                flag = "*" if rounds > 1 and (noisy(t_turns) or noisy(c_turns)) else " "
                n_noisy += flag == "*"
                g = w.gflop()
                print(f"{w.name:<36} {t:>3} | {c_ms:>9.3f} {t_ms:>9.3f} {t_ms / c_ms:>6.2f}x{flag}| "
                      f"{g / c_ms * 1e3:>10.1f} {g / t_ms * 1e3:>10.1f} | {backend:<13} | {diff}",
                      flush=True)
                read = None
                if w.cache:
                    read = float(np.median([x for turn in r_turns for x in turn]))
                    print(f"{'  read K, V once (the bound)':<36} {t:>3} | {read:>9.3f} "
                          f"{'':>9} {c_ms / read:>6.2f}x | "
                          f"{w.kv_bytes() / read * 1e-6:>7.1f} GB/s; the step: "
                          f"{w.kv_bytes() / c_ms * 1e-6:.1f} GB/s, {c_ms / read:.2f}x the read",
                          flush=True)
                results.append({"workload": w.name, "threads": t, "crate_ms": c_ms,
                                "read_kv_ms": read,
                                "torch_ms": t_ms, "ratio": t_ms / c_ms, "gflop": g,
                                "torch_backend": backend, "max_abs_diff": diff,
                                "noisy": flag == "*",
                                "crate_times_ms": ct, "torch_times_ms": tt,
                                "crate_args": w.crate_args()})
            del side
    elapsed = time.perf_counter() - t_start
    print(f"\n{len(results)} rows in {elapsed:.0f} s")
    if n_noisy:
        print(f"* {n_noisy} rows: the per-turn medians of one side differ by more than 20% "
              f"(a busy machine?); rerun them with --only")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
