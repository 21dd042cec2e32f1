"""Is this crate's scaling study within Monte Carlo error of the seed's own script?

Runs the seed's `simulate()` (study sheet, question 2) unchanged but for the numpy seed, for
seeds 0..N-1 (seed 42 is the seed's published draw), plus two added columns: the mean softmax
Jacobian norm, which the seed does not compute. Then compares each CSV given on the command
line (written by `cargo run --release --example scaling_study -- --seed S --out DIR`) with
that spread: per column, z = (crate - mean) / sd. With several crate CSVs (different --seed),
it also compares the two means (Welch t).

    pip install numpy pandas
    for s in 0 1 2 3 4 5 6 7 8 9; do
        cargo run --release --example scaling_study -- --seed $s --out /tmp/crate_$s
    done
    python3 docs/scaling_seed_check.py --reps 100 /tmp/crate_*/attention_scaling_simulation_summary.csv
"""
import argparse
from math import sqrt

import numpy as np
import pandas as pd


def jacobian_fro(p):
    """Mean over rows of ||diag(p) - p p^T||_F, closed form (an addition, not the seed's)."""
    s2 = (p ** 2).sum(axis=1)
    s3 = (p ** 3).sum(axis=1)
    return np.sqrt(np.clip(s2 - 2 * s3 + s2 ** 2, 0, None)).mean()


def simulate(rng, d_k_list=(4, 64, 256), m=64, trials=2000):
    """The seed's simulate(), verbatim but for the rng argument and the Jacobian columns."""
    rows = []
    for d_k in d_k_list:
        Q = rng.normal(size=(trials, d_k))
        K = rng.normal(size=(trials, m, d_k))
        logits = np.einsum('td,tmd->tm', Q, K)  # (trials, m)
        var_unscaled = logits.var(ddof=1)
        max_logits = logits.max(axis=1, keepdims=True)
        exp_logits = np.exp(logits - max_logits)
        p_unscaled = exp_logits / exp_logits.sum(axis=1, keepdims=True)
        max_p_u = p_unscaled.max(axis=1).mean()
        entropy_u = (- (p_unscaled * np.log(np.clip(p_unscaled, 1e-12, 1))).sum(axis=1)).mean()
        frac_over_0_9_u = (p_unscaled.max(axis=1) > 0.9).mean()
        frac_over_0_99_u = (p_unscaled.max(axis=1) > 0.99).mean()
        scale = sqrt(d_k)
        logits_s = logits / scale
        var_scaled = logits_s.var(ddof=1)
        max_logits_s = logits_s.max(axis=1, keepdims=True)
        exp_logits_s = np.exp(logits_s - max_logits_s)
        p_scaled = exp_logits_s / exp_logits_s.sum(axis=1, keepdims=True)
        max_p_s = p_scaled.max(axis=1).mean()
        entropy_s = (- (p_scaled * np.log(np.clip(p_scaled, 1e-12, 1))).sum(axis=1)).mean()
        frac_over_0_9_s = (p_scaled.max(axis=1) > 0.9).mean()
        frac_over_0_99_s = (p_scaled.max(axis=1) > 0.99).mean()
        rows.append({
            "d_k": d_k,
            "keys(m)": m,
            "logit_var (no scale)": var_unscaled,
            "logit_var (/√d_k)": var_scaled,
            "avg max prob (no scale)": max_p_u,
            "avg max prob (/√d_k)": max_p_s,
            "avg entropy (nats) (no scale)": entropy_u,
            "avg entropy (nats) (/√d_k)": entropy_s,
            "frac max>0.9 (no scale)": frac_over_0_9_u,
            "frac max>0.9 (/√d_k)": frac_over_0_9_s,
            "frac max>0.99 (no scale)": frac_over_0_99_u,
            "frac max>0.99 (/√d_k)": frac_over_0_99_s,
            "jacobian_fro (no scale)": jacobian_fro(p_unscaled),
            "jacobian_fro (/√d_k)": jacobian_fro(p_scaled),
        })
    return pd.DataFrame(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=100, help="numpy seeds 0..reps-1")
    ap.add_argument("crate_csv", nargs="+", help="attention_scaling_simulation_summary.csv files")
    args = ap.parse_args()

    reps = pd.concat(simulate(np.random.default_rng(s)).assign(rng_seed=s) for s in range(args.reps))
    crate = [pd.read_csv(path) for path in args.crate_csv]
    cols = [c for c in crate[0].columns if c not in ("d_k", "keys(m)")]
    worst = 0.0
    print("| d_k | column | seed's script: mean ± sd | this crate | z |" + (" t |" if len(crate) > 1 else ""))
    print("|---:|---|---:|---:|---:|" + ("---:|" if len(crate) > 1 else ""))
    for d in sorted(reps.d_k.unique()):
        s = reps[reps.d_k == d]
        ours = pd.concat(c[c.d_k == d] for c in crate)
        for col in cols:
            mean, sd = s[col].mean(), s[col].std(ddof=1)
            if sd == 0:
                z_text, t_text = "–", "–"
            else:
                z = (ours[col] - mean) / sd
                worst = max(worst, z.abs().max())
                z_text = ", ".join(f"{v:+.1f}" for v in z) if len(z) <= 3 else f"max |z| {z.abs().max():.1f}"
                se = sqrt(sd ** 2 / len(s) + ours[col].var(ddof=1) / len(ours)) if len(ours) > 1 else np.nan
                t_text = f"{(ours[col].mean() - mean) / se:+.2f}" if se > 0 else "–"
            vals = f"{ours[col].iloc[0]:.4f}" if len(ours) == 1 else f"{ours[col].mean():.4f} ± {ours[col].std(ddof=1):.4f}"
            line = f"| {d} | `{col}` | {mean:.4f} ± {sd:.4f} | {vals} | {z_text} |"
            print(line + (f" {t_text} |" if len(crate) > 1 else ""))
    print(f"\nlargest |z|: {worst:.2f} (rare-event columns such as `frac max>0.9 (/√d_k)` count "
          "single rows out of 2000: read them as counts, not as normal z)")


if __name__ == "__main__":
    main()
