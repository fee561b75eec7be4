"""Distillation into dense (Switch Transformer §4, Tables 6-7) at laptop scale: tiny_dense baseline, tiny_switch
teacher, and tiny_dense students distilled from it (alpha = 0.25 teacher probabilities + 0.75 ground truth),
with and without the teacher's non-expert weights as initialisation; 100 steps each, 3 seeds.

    python -m moe_jax.sweep --sweep=experiments/ablations/distill.py --workdir=runs/ablations

Run from the repository root with exactly this --workdir: a student names its teacher's run directory
(`runs/ablations/distill/switch_100_s<seed>`), which the sweep trains first. The dense baselines are the same
configs as experiments/ablations/upcycle.py's bases (the runner reuses them when that sweep ran). Writes
experiments/results/distill.{md,csv,png}.
"""

import math

from moe_jax import sweep
from moe_jax.sweep_results import seed_stats

SEEDS = (0, 1, 2)
STEPS = 100
RESTORE_FROM_RECORDS = False  # the students read the teachers' checkpoints
RUNS = "runs/ablations"  # the sweep's --workdir, as typed above
COLUMNS = ("eval_ce", "examples_per_sec")
PAPER = """
Fedus et al. 2022, §4 "Distillation": distilling Switch-Base into T5-Base with the student's non-expert
weights initialised from the teacher and a loss mixing 0.25 of the teacher's probabilities with 0.75 of the
ground truth keeps about 30% of the teacher's quality gain (Table 6; the abstract: "preserving 30% of the
quality gains of the large sparse teacher") at about 1/20 of its parameters. Table 7 (experiments/results/
switch_paper.md): Switch-Base teachers of 1.1B-14.7B parameters score -1.505 to -1.427 neg. log perplexity
against T5-Base's -1.636.
"""


def teacher_dir(seed: int) -> str:
    return f"{RUNS}/distill/{sweep.slug(f'switch {STEPS} s{seed}')}"


def variants(scale):
    out = {}
    for seed in SEEDS:
        dense = sweep.base(scale, dense=True, laptop_steps=STEPS).override({"train.seed": seed})
        out[f"dense {STEPS} s{seed}"] = dense.override(note="the dense baseline")
        out[f"switch {STEPS} s{seed}"] = sweep.base(scale, laptop_steps=STEPS).override(
            {"train.seed": seed}, note="the teacher")
        student = dense.override({"distill.teacher_workdir": teacher_dir(seed), "distill.alpha": 0.25})
        out[f"distilled {STEPS} s{seed}"] = student.override(note="alpha 0.25")
        out[f"distilled+init {STEPS} s{seed}"] = student.override(
            {"distill.init_from_teacher": True}, note="alpha 0.25, non-expert weights from the teacher")
    return out


def analysis(results, scale, steps: int = STEPS):
    groups = {prefix: seed_stats([s.final_ce for n, s in results.items() if n.rsplit(" ", 2)[0] == prefix])
              for prefix in ("dense", "switch", "distilled", "distilled+init")}
    dense, switch = groups["dense"][0], groups["switch"][0]
    if not (math.isfinite(dense) and math.isfinite(switch)):
        return "Not enough finished runs for an analysis."
    text = ["Eval CE, mean ± std over seeds (n): " + "; ".join(
        f"{name} {m:.4f} ± {s:.4f} ({n})" for name, (m, s, n) in groups.items() if n) + "."]
    gain = dense - switch
    text.append(f"The teacher's gain over the dense baseline is {gain:.4f} nats.")
    mean = groups["distilled"][0]
    if math.isfinite(mean) and gain > 0:
        text.append(f"The distilled student keeps {100 * (dense - mean) / gain:.0f}% of it (paper: about 30%), "
                    f"with the caveat that the gain itself is {gain / max(groups['switch'][1], 1e-9):.1f} teacher "
                    f"seed standard deviations.")
    elif math.isfinite(mean):
        text.append(f"The teacher is not ahead of the dense baseline, so there is no gain to keep: the distilled "
                    f"student ends {mean - dense:+.4f} nats from the baseline ({groups['dense'][1]:.4f} seed std).")
    init = groups["distilled+init"][0]
    if math.isfinite(init):
        text.append(f"The students initialised from the teacher ({init:.4f}) are not comparable with the {steps}-step "
                    f"baseline: their non-expert weights arrive trained for the teacher's {steps} steps, so they have "
                    f"had {2 * steps} steps of training, which at this early point of training is worth far more than the "
                    f"teacher's gain. A fair baseline for them is a dense model trained {2 * steps} steps, "
                    f"not run here.")
    # Per seed, each student against its own teacher and the same seed's dense baseline.
    for name in ("distilled",):
        kept = []
        for seed in SEEDS:
            d, t, s = (results.get(f"{p} {steps} s{seed}") for p in ("dense", "switch", name))
            if d and t and s and all(math.isfinite(x.final_ce) for x in (d, t, s)) and d.final_ce > t.final_ce:
                kept.append(100 * (d.final_ce - s.final_ce) / (d.final_ce - t.final_ce))
        if kept:
            text.append(f"Per seed, where the teacher beat its dense twin ({len(kept)} of {len(SEEDS)} seeds), the "
                        f"distilled student keeps " + ", ".join(f"{k:.0f}%" for k in kept) + " of its teacher's gain.")
    return " ".join(text)
