"""Sparse upcycling (Komatsuzaki et al. 2022) at laptop scale: for the same 50 extra steps after a 100-step
tiny dense run, dense continued vs upcycled to tiny_switch vs tiny_switch from scratch; 3 seeds.

    python experiments/ablations/upcycle.py --workdir=runs/ablations

runs, with the sweep runner (which skips finished variants): the dense bases (`dense 100 s<seed>`), then writes
the upcycled run directories with `moe_jax.upcycle` (experts = copies of the dense MLP, fresh router, the
optimizer and its warmup-cosine schedule fresh) and the dense continuations (a copy of the base run resumed to
150 steps; the cosine schedule is then recomputed over 150 steps, so the learning rate at step 100 jumps from
its final 10% back to about a third of its peak), and trains everything else (the scratch runs: tiny_switch
for the same 50 steps). `python -m moe_jax.sweep --sweep=experiments/ablations/upcycle.py --workdir=runs/ablations`
alone would train the upcycled variants from scratch: run this file. Writes experiments/results/upcycle.{md,csv,png}
(the plot: eval CE against the steps after the dense base; the dense continuation shifted by 100).

    python experiments/ablations/upcycle.py --corpus=c4 --workdir=runs/ablations

does the same on the C4 sample (bytes, the real-text study's data and held-out split): 300-step dense bases
(the same configs as experiments/ablations/c4_study.py's `dense seed <n>`), then 150 more steps each way;
the runs go to runs/ablations/upcycle_c4/ and the results to experiments/results/upcycle_c4.{md,csv,png}.
"""

import dataclasses
import math
import pathlib
import shutil
import sys

if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from moe_jax import sweep
from moe_jax.sweep_results import seed_stats

SEEDS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One corpus's version of the experiment: its run directory under --workdir, lengths and data."""

    name: str  # the sweep's name: runs go to <workdir>/<name>/, results to experiments/results/<name>.*
    base_steps: int
    extra_steps: int
    overrides: tuple = ()  # (key, value) pairs every run gets
    title: str = "tiny configs, synthetic corpus"


def _real_text():
    from experiments.ablations.c4_byte import REAL_TEXT

    return tuple(REAL_TEXT.items())


SETTINGS = {"synthetic": Setting("upcycle", 100, 50),
            "c4": Setting("upcycle_c4", 300, 150, _real_text(), "tiny configs, C4 sample (bytes)")}
SETTING = SETTINGS["synthetic"]
COLUMNS = ("eval_ce", "examples_per_sec")
PAPER = """
Komatsuzaki et al. 2022 (Sparse Upcycling, ICLR 2023), abstract: "sparsely upcycled T5 Base, Large, and XL
language models and Vision Transformer Base and Large models, respectively, significantly outperform their
dense counterparts on SuperGLUE and ImageNet, using only ~50% of the initial dense pretraining sunk cost. The
upcycled models also outperform sparse models trained from scratch on 100% of the initial dense pretraining
computation budget." Their recipe copies every parameter (and optionally the optimizer state) except the new
router; ours starts the optimizer and its warmup afresh.
"""

def _seeded(variant, seed, setting):
    return variant.override({**dict(setting.overrides), "train.seed": seed})


def variants(scale, setting: Setting = SETTING):
    out = {}
    base, extra = setting.base_steps, setting.extra_steps
    evals = 10 if setting is SETTINGS["synthetic"] else 5
    for seed in SEEDS:
        dense = sweep.base(scale, dense=True, laptop_steps=base, evals=evals)
        out[f"dense {base} s{seed}"] = _seeded(dense, seed, setting).override(note="the dense base")
        out[f"dense +{extra} s{seed}"] = _seeded(dense, seed, setting).override(
            {"train.steps": base + extra}, note=f"base resumed to {base + extra} steps")
        switch = _seeded(sweep.base(scale, laptop_steps=extra, evals=5), seed, setting)
        out[f"upcycled +{extra} s{seed}"] = switch.override(note=f"from dense {base}, moe_jax.upcycle")
        out[f"scratch {extra} s{seed}"] = switch.override(note="tiny_switch from scratch")
    return out


def analysis(results, scale, setting: Setting = SETTING):
    base_steps, extra_steps = setting.base_steps, setting.extra_steps

    def group(prefix, step=None):
        return seed_stats([(s.ce_at(step) if step else s.final_ce) for n, s in results.items() if n.startswith(prefix)])

    base = group(f"dense {base_steps}")
    rows = {"dense continued": group(f"dense +{extra_steps}"), "upcycled": group(f"upcycled +{extra_steps}"),
            "Switch from scratch": group(f"scratch {extra_steps}")}
    if not math.isfinite(base[0]):
        return "Not enough finished runs for an analysis."
    text = [f"Eval CE, mean ± std over seeds (n): dense base at step {base_steps} {base[0]:.4f} ± {base[1]:.4f} "
            f"({base[2]}); after {extra_steps} more steps:"]
    sentences = [text[0] + " " + "; ".join(f"{name} {m:.4f} ± {s:.4f} ({n})" for name, (m, s, n) in rows.items()
                                         if n) + "."]
    cont, up, scratch = (rows[k][0] for k in rows)
    if math.isfinite(cont) and math.isfinite(up):
        sentences.append(f"For the same {extra_steps} extra steps the upcycled model is "
                         f"{'ahead of' if up < cont else 'behind'} the dense continuation by {abs(cont - up):.4f} nats")
    paired = [results[f"upcycled +{extra_steps} s{seed}"].final_ce - results[f"dense +{extra_steps} s{seed}"].final_ce
              for seed in SEEDS if f"upcycled +{extra_steps} s{seed}" in results
              and f"dense +{extra_steps} s{seed}" in results]
    paired = [d for d in paired if math.isfinite(d)]
    if len(paired) > 1:
        mean, std, n = seed_stats(paired)
        sentences.append(f"(seed by seed, upcycled minus dense continued: {', '.join(f'{d:+.4f}' for d in paired)}; "
                         f"mean {mean:+.4f} ± {std:.4f}, {abs(mean) / std:.1f} stds; behind in "
                         f"{sum(d > 0 for d in paired)} of {n} seeds)")
    if math.isfinite(scratch) and math.isfinite(up):
        sentences.append(f"and {'ahead of' if up < scratch else 'behind'} the Switch model trained from scratch for "
                         f"those steps by {abs(up - scratch):.4f} nats.")
    return " ".join(sentences)


def prepare(workdir: pathlib.Path, setting: Setting = SETTING) -> None:
    """Write the upcycled and dense-continued run directories from the finished dense bases (once)."""
    from moe_jax import upcycle

    chosen = variants("laptop", setting)
    base_steps, extra_steps = setting.base_steps, setting.extra_steps
    for seed in SEEDS:
        base_dir = workdir / setting.name / sweep.slug(f"dense {base_steps} s{seed}")
        if not (base_dir / "checkpoints" / str(base_steps)).exists():
            continue
        up_name = f"upcycled +{extra_steps} s{seed}"
        up_dir = workdir / setting.name / sweep.slug(up_name)
        if not (up_dir / "checkpoints").exists():
            upcycle.upcycle_run(base_dir, sweep.load_config(chosen[up_name]), up_dir)
        cont_dir = workdir / setting.name / sweep.slug(f"dense +{extra_steps} s{seed}")
        if not (cont_dir / "checkpoints").exists():
            cont_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(base_dir / "checkpoints", cont_dir / "checkpoints")


def plot(results_dir: pathlib.Path, workdir: pathlib.Path, setting: Setting = SETTING) -> None:
    """Eval CE against steps after the dense base (the dense continuation shifted back by the base steps)."""
    base_steps, extra_steps = setting.base_steps, setting.extra_steps
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from moe_jax import sweep_results

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {f"dense +{extra_steps}": ("tab:blue", base_steps), f"upcycled +{extra_steps}": ("tab:red", 0),
              f"scratch {extra_steps}": ("tab:gray", 0)}
    for name in variants("laptop", setting):
        prefix = name.rsplit(" ", 1)[0]
        if prefix not in styles:
            continue
        rows = [r for r in sweep_results.read_metrics(workdir / setting.name / sweep.slug(name)) if "eval/ce" in r]
        color, shift = styles[prefix]
        steps = [r["step"] - shift for r in rows if r["step"] > shift or shift == 0]
        ces = [r["eval/ce"] for r in rows if r["step"] > shift or shift == 0]
        ax.plot(steps, ces, color=color, alpha=0.7, label=prefix if name.endswith("s0") else None)
    ax.set_xlabel(f"training steps after the {base_steps}-step dense base (scratch: from step 0)")
    ax.set_ylabel("eval cross-entropy (nats/token)")
    ax.set_xlim(0, extra_steps)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(f"Sparse upcycling, {setting.title}, 3 seeds")
    fig.tight_layout()
    fig.savefig(results_dir / f"{setting.name}.png", dpi=120)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/ablations")
    parser.add_argument("--results_dir", default=str(pathlib.Path(__file__).resolve().parents[1] / "results"))
    parser.add_argument("--corpus", default="synthetic", choices=sorted(SETTINGS))
    args = parser.parse_args()
    setting = SETTINGS[args.corpus]
    workdir = pathlib.Path(args.workdir).resolve()
    this = pathlib.Path(__file__).resolve()
    sweep_file = str(this if setting is SETTING else this.with_name(f"{setting.name}.py"))
    bases = ",".join(f"dense {setting.base_steps} s{s}" for s in SEEDS)
    common = ["--sweep", sweep_file, "--workdir", str(workdir), "--results_dir", args.results_dir, "--no_reuse"]
    sweep.main([*common, "--variants", bases])
    prepare(workdir, setting)
    code = sweep.main(common)
    plot(pathlib.Path(args.results_dir), workdir, setting)
    sys.exit(code)
