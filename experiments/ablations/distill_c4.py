"""Distillation into dense on the C4 sample (bytes): experiments/ablations/distill.py's experiment on the
real-text study's data, 300 steps, 3 seeds. The dense baselines and the Switch-8 teachers are the study's
`dense seed <n>` / `switch-8 seed <n>` configs (experiments/ablations/c4_study.py), which the runner reuses
when that sweep ran; the students are tiny_dense distilled from the teacher of their seed with alpha = 0.25
(no initialisation from the teacher).

    python -m moe_jax.sweep --sweep=experiments/ablations/distill_c4.py --workdir=runs/ablations

Run from the repository root with exactly this --workdir (a student names its teacher's run directory).
Expected: see experiments/results/distill_c4.md (2-core CPU, 3-6 minutes per run).
"""

from experiments.ablations import distill
from experiments.ablations.c4_byte import REAL_TEXT
from moe_jax import sweep

SEEDS = (0, 1, 2)
RESTORE_FROM_RECORDS = False  # the students read the teachers' checkpoints
STEPS = 300
COLUMNS = distill.COLUMNS
PAPER = distill.PAPER


def teacher_dir(seed: int) -> str:
    """The study's identical Switch-8 run when it finished (the runner then reuses it instead of training the
    teacher here), else this sweep's own teacher run."""
    study = f"{distill.RUNS}/c4_study/{sweep.slug(f'switch-8 seed {seed}')}"
    if (sweep.REPO / study / "checkpoints" / str(STEPS)).exists():
        return study
    return f"{distill.RUNS}/distill_c4/{sweep.slug(f'switch {STEPS} s{seed}')}"


def variants(scale):
    out = {}
    for seed in SEEDS:
        seeded = {**REAL_TEXT, "train.seed": seed}
        dense = sweep.base(scale, dense=True, laptop_steps=STEPS, evals=5).override(seeded)
        out[f"dense {STEPS} s{seed}"] = dense.override(note="the dense baseline")
        out[f"switch {STEPS} s{seed}"] = sweep.base(scale, experts=8, laptop_steps=STEPS, evals=5).override(
            seeded, note="the teacher")
        out[f"distilled {STEPS} s{seed}"] = dense.override(
            {"distill.teacher_workdir": teacher_dir(seed), "distill.alpha": 0.25}, note="alpha 0.25")
    return out


def analysis(results, scale):
    return distill.analysis(results, scale, steps=STEPS)
