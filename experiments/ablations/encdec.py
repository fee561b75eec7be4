"""Switch on the paper's own objective: capacity factor (Table 1) and number of experts (Figure 4) for the
encoder-decoder trained with span corruption, 3 seeds per point.

t5_tiny_dense against t5_tiny_switch (8 top-1 experts in every other FFN of both stacks, CF 1.25) at equal
active FLOPs, plus Switch at CF 1.0 and 2.0 (Table 1) and with 16 and 32 experts (Figure 4), on the synthetic
corpus, each for 150 steps (half the tiny configs' length, to fit 18 runs on a 2-core CPU) with seeds 0, 1, 2
(`train.seed`: initialisation; the data and the noise masks are the same for every seed). The metric is the
paper's: negative log perplexity per target token (−eval CE, nats; higher is better).

    python -m moe_jax.sweep --sweep=experiments/ablations/encdec.py --workdir=runs/ablations

`--scale=paper` runs t5_base_encdec against switch_base_encdec with the same points (100k steps each).
Expected: see experiments/results/encdec.md (2-core CPU: 4-8 minutes per run, about 2 hours in all).
"""

import dataclasses
import statistics

from moe_jax import sweep
from moe_jax.sweep_results import seed_stats

SEEDS = (0, 1, 2)
STEPS = 150
COLUMNS = ("eval_ce", "dropped_fraction", "examples_per_sec", "load_cv")
CONFIGS = {("laptop", "dense"): "experiments/t5_tiny_dense.py", ("laptop", "moe"): "experiments/t5_tiny_switch.py",
           ("paper", "dense"): "experiments/t5_base_encdec.py",
           ("paper", "moe"): "experiments/switch_base_encdec.py:experts={experts}"}
POINTS = {"dense": {}, "switch-8 CF 1.0": {"model.moe.capacity_factor": 1.0},
          "switch-8 CF 1.25": {}, "switch-8 CF 2.0": {"model.moe.capacity_factor": 2.0},
          "switch-16": {"model.moe.num_experts": 16}, "switch-32": {"model.moe.num_experts": 32}}
# Table 1 (Switch-Base, 128 experts, 100k steps): neg. log perplexity; Figure 4: more experts, better.
PAPER_POINTS = {"dense": "T5-Base -1.731 (Table 1, 100k steps)", "switch-8 CF 1.0": "Switch-Base CF 1.0: -1.561",
                "switch-8 CF 1.25": "Switch-Base CF 1.25: -1.553", "switch-8 CF 2.0": "Switch-Base CF 2.0: -1.554",
                "switch-16": "better than 8 experts (Fig. 4)", "switch-32": "better than 16 experts (Fig. 4)"}
PAPER = """
Fedus et al. 2022, Table 1 (T5-Base vs Switch-Base with 128 experts every other FFN, span corruption on C4,
100k steps; negative log perplexity, higher is better): T5-Base -1.731; Switch-Base -1.561 / -1.553 / -1.554 at
capacity factor 1.0 / 1.25 / 2.0. Figure 4: at equal FLOPs per token, more experts give a better loss at every
step, from 2 experts up. Here the experts are 8 / 16 / 32 (the paper's 128 do not fit this CPU), the model is
4 + 4 layers of width 128 and the corpus is synthetic, so compare signs and orderings, not values.
"""


def variants(scale):
    out = {}
    for seed in SEEDS:  # seed-major: a partial sweep has every point
        for point, overrides in POINTS.items():
            kind = "dense" if point == "dense" else "moe"
            experts = overrides.get("model.moe.num_experts", 8 if scale == "laptop" else 128)
            base = sweep.base(scale, dense=kind == "dense", laptop_steps=STEPS, evals=5)
            config = CONFIGS[(scale, kind)].format(experts=experts)
            out[f"{point} seed {seed}"] = dataclasses.replace(base, config=config).override(
                {**overrides, "train.seed": seed}, paper=PAPER_POINTS[point] if seed == 0 else "")
    return out


def _point(name):
    return name.rsplit(" seed ", 1)[0]


def analysis(results, scale):
    groups = {}
    for name, summary in results.items():
        groups.setdefault(_point(name), []).append(summary)
    dense_mean, dense_std, _ = seed_stats([s.final_ce for s in groups.get("dense", [])])
    rows = ["| point | neg. log perplexity, mean ± std (seeds) | Δ vs dense | in seed stds | dropped (train) | "
            "paper |", "|---|---|---|---|---|---|"]
    means = {}
    for point in POINTS:
        ces = [s.final_ce for s in groups.get(point, [])]
        mean, std, n = seed_stats(ces)
        means[point] = (mean, std, n)
        delta = mean - dense_mean
        noise = max(std, dense_std) if n > 1 else float("nan")
        runs = groups.get(point, [])
        dropped = statistics.fmean(s.dropped_fraction for s in runs) if point != "dense" and runs else None
        rows.append(f"| {point} | {sweep.num(-mean)} ± {sweep.num(std)} ({n}) | "
                    f"{'–' if point == 'dense' else sweep.num(-delta, '+.4f')} | "
                    f"{'–' if point == 'dense' else sweep.num(-delta / noise, '+.1f')} | "
                    f"{'–' if dropped is None else f'{100 * dropped:.2f}%'} | {PAPER_POINTS[point]} |")
    text = []
    finished = {p: m for p, m in means.items() if m[2] >= 2}
    if "dense" in finished and len(finished) > 1:
        ahead = [p for p, (m, s, n) in finished.items() if p != "dense" and dense_mean - m > 3 * max(s, dense_std)]
        behind = [p for p, (m, s, n) in finished.items() if p != "dense" and m - dense_mean > 3 * max(s, dense_std)]
        text.append(f"Ahead of dense by more than 3 seed standard deviations: {', '.join(ahead) or 'none'}; behind "
                    f"by more than 3: {', '.join(behind) or 'none'}; the rest are within the noise.")
        cf = [p for p in ("switch-8 CF 1.0", "switch-8 CF 1.25", "switch-8 CF 2.0") if p in finished]
        if len(cf) == 3:
            order = sorted(cf, key=lambda p: finished[p][0])
            text.append(f"Capacity factor, best to worst: {' > '.join(p.split()[-1] for p in order)} (paper: "
                        f"1.25 > 2.0 > 1.0, all within 0.008).")
        ex = [p for p in ("switch-8 CF 1.25", "switch-16", "switch-32") if p in finished]
        if len(ex) == 3:
            monotone = finished[ex[0]][0] > finished[ex[1]][0] > finished[ex[2]][0]
            text.append("More experts give a better loss at every doubling, as in Figure 4." if monotone else
                        "The loss is not monotone in the number of experts here, unlike Figure 4: "
                        + ", ".join(f"{p} {-finished[p][0]:.4f}" for p in ex) + ".")
    return "\n".join(rows) + ("\n\n" + " ".join(text) if text else "")
