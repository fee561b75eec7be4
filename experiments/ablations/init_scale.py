"""Initialisation scale (Switch paper, Table 3): 0.1× vs 1.0× init, 3 seeds each, eval loss early in training.

Every kernel is truncated normal with std sqrt(s / fan_in); the paper cuts the default s = 1.0 to 0.1. We
train the tiny Switch model for a short run (a third of the other sweeps' steps, just past the 30-step warmup:
"early in training") with train.seed 0, 1, 2 (parameter init and dropout; the data order is fixed) and report
mean ± std of the final eval loss.

    python -m moe_jax.sweep --sweep=experiments/ablations/init_scale.py --workdir=runs/ablations

`--scale=paper`: Switch-Base with 32 experts for 3.5k steps, as in Table 3.
Expected: see experiments/results/init_scale.md (2-core CPU, about a minute per variant).
"""

import math

import numpy as np

from moe_jax import sweep

SCALES = (0.1, 1.0)
SEEDS = (0, 1, 2)
EARLY = 1 / 3  # share of the other sweeps' run length: just past the 30-step warmup
COLUMNS = ("eval_ce", "max_train_loss_jump", "examples_per_sec")
PAPER = """
Fedus et al. 2022, Table 3 (32 experts, after 3.5k steps, 3 seeds each; negative log perplexity, higher is
better): 0.1× init -2.72 ± 0.01, 1.0× init -3.60 ± 0.68.
"""


def variants(scale):
    out = {}
    for s in SCALES:
        for seed in SEEDS:
            out[f"{s:g}x seed {seed}"] = sweep.base(scale, experts=32 if scale == "paper" else None,
                                                    laptop_fraction=EARLY, paper_steps=3_500, evals=5).override(
                {"model.init_scale": s, "train.seed": seed},
                paper="-2.72 ± 0.01 (mean of 3)" if s == 0.1 else "-3.60 ± 0.68 (mean of 3)")
    return out


def analysis(results, scale):
    rows, stats = ["| init | eval CE mean ± std (3 seeds) | paper (neg. log perp.) |", "|---|---|---|"], {}
    for s in SCALES:
        ces = [r.final_ce for n, r in results.items() if n.startswith(f"{s:g}x") and math.isfinite(r.final_ce)]
        diverged = [n for n, r in results.items() if n.startswith(f"{s:g}x") and r.status == "diverged"]
        stats[s] = (float(np.mean(ces)) if ces else float("nan"), float(np.std(ces)) if ces else float("nan"),
                    len(ces), diverged)
        paper = "-2.72 ± 0.01" if s == 0.1 else "-3.60 ± 0.68"
        rows.append(f"| {s:g}× | {sweep.num(stats[s][0])} ± {sweep.num(stats[s][1])} (n={len(ces)}"
                    f"{', diverged: ' + ', '.join(diverged) if diverged else ''}) | {paper} |")
    (m1, s1, n1, _), (m10, s10, n10, _) = stats[0.1], stats[1.0]
    if not (n1 and n10):
        return "\n".join(rows) + "\n\nNot enough finished runs for an analysis."
    agree_mean, agree_std = m1 < m10, s1 < s10
    verdict = ("holds" if agree_mean and agree_std else "holds only partly" if agree_mean or agree_std else
               "does not hold")
    text = (f"0.1× init ends at {m1:.4f} ± {s1:.4f} nats and 1.0× at {m10:.4f} ± {s10:.4f} after "
            f"{results[next(iter(results))].steps} steps. The paper's direction (smaller init: better and far less "
            f"seed-dependent) {verdict} "
            f"here: the mean is {'better' if agree_mean else 'not better'} and the spread "
            f"{'smaller' if agree_std else 'not smaller'} with 0.1×. Magnitude: our gap is {m10 - m1:.2f} nats and "
            f"the 1.0× spread {s10:.3f}, against the paper's 0.88 and 0.68. Likely reasons: the paper's runs are "
            f"bfloat16 Switch-Base models, where a large init can make training unstable (hence its large spread), "
            f"while ours is a small float32 model trained with AdamW, warmup and gradient clipping; the gap we see "
            f"is the slower start of the larger init, not instability.")
    return "\n".join(rows) + "\n\n" + text
