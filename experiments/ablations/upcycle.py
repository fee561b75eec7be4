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
"""

import math
import pathlib
import shutil
import sys

if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from moe_jax import sweep
from moe_jax.sweep_results import seed_stats

SEEDS = (0, 1, 2)
BASE_STEPS, EXTRA_STEPS = 100, 50
COLUMNS = ("eval_ce", "examples_per_sec")
PAPER = """
Komatsuzaki et al. 2022 (Sparse Upcycling, ICLR 2023), abstract: "sparsely upcycled T5 Base, Large, and XL
language models and Vision Transformer Base and Large models, respectively, significantly outperform their
dense counterparts on SuperGLUE and ImageNet, using only ~50% of the initial dense pretraining sunk cost. The
upcycled models also outperform sparse models trained from scratch on 100% of the initial dense pretraining
computation budget." Their recipe copies every parameter (and optionally the optimizer state) except the new
router; ours starts the optimizer and its warmup afresh.
"""

def _seeded(variant, seed):
    return variant.override({"train.seed": seed})


def variants(scale):
    out = {}
    for seed in SEEDS:
        dense = sweep.base(scale, dense=True, laptop_steps=BASE_STEPS)
        out[f"dense {BASE_STEPS} s{seed}"] = _seeded(dense, seed).override(note="the dense base")
        out[f"dense +{EXTRA_STEPS} s{seed}"] = _seeded(dense, seed).override(
            {"train.steps": BASE_STEPS + EXTRA_STEPS}, note=f"base resumed to {BASE_STEPS + EXTRA_STEPS} steps")
        switch = _seeded(sweep.base(scale, laptop_steps=EXTRA_STEPS, evals=5), seed)
        out[f"upcycled +{EXTRA_STEPS} s{seed}"] = switch.override(note=f"from dense {BASE_STEPS}, moe_jax.upcycle")
        out[f"scratch {EXTRA_STEPS} s{seed}"] = switch.override(note="tiny_switch from scratch")
    return out


def analysis(results, scale):
    def group(prefix, step=None):
        return seed_stats([(s.ce_at(step) if step else s.final_ce) for n, s in results.items() if n.startswith(prefix)])

    base = group(f"dense {BASE_STEPS}")
    rows = {"dense continued": group(f"dense +{EXTRA_STEPS}"), "upcycled": group(f"upcycled +{EXTRA_STEPS}"),
            "Switch from scratch": group(f"scratch {EXTRA_STEPS}")}
    if not math.isfinite(base[0]):
        return "Not enough finished runs for an analysis."
    text = [f"Eval CE, mean ± std over seeds (n): dense base at step {BASE_STEPS} {base[0]:.4f} ± {base[1]:.4f} "
            f"({base[2]}); after {EXTRA_STEPS} more steps:"]
    text += [f"{name} {m:.4f} ± {s:.4f} ({n})" for name, (m, s, n) in rows.items() if n]
    sentences = ["; ".join(text) + "."]
    cont, up, scratch = (rows[k][0] for k in rows)
    if math.isfinite(cont) and math.isfinite(up):
        sentences.append(f"For the same {EXTRA_STEPS} extra steps the upcycled model is "
                         f"{'ahead of' if up < cont else 'behind'} the dense continuation by {abs(cont - up):.4f} nats")
    if math.isfinite(scratch) and math.isfinite(up):
        sentences.append(f"and {'ahead of' if up < scratch else 'behind'} the Switch model trained from scratch for "
                         f"those steps by {abs(up - scratch):.4f} nats.")
    return " ".join(sentences)


def prepare(workdir: pathlib.Path) -> None:
    """Write the upcycled and dense-continued run directories from the finished dense bases (once)."""
    from moe_jax import upcycle

    chosen = variants("laptop")
    for seed in SEEDS:
        base_dir = workdir / "upcycle" / sweep.slug(f"dense {BASE_STEPS} s{seed}")
        if not (base_dir / "checkpoints" / str(BASE_STEPS)).exists():
            continue
        up_name = f"upcycled +{EXTRA_STEPS} s{seed}"
        up_dir = workdir / "upcycle" / sweep.slug(up_name)
        if not (up_dir / "checkpoints").exists():
            upcycle.upcycle_run(base_dir, sweep.load_config(chosen[up_name]), up_dir)
        cont_dir = workdir / "upcycle" / sweep.slug(f"dense +{EXTRA_STEPS} s{seed}")
        if not (cont_dir / "checkpoints").exists():
            cont_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(base_dir / "checkpoints", cont_dir / "checkpoints")


def plot(results_dir: pathlib.Path, workdir: pathlib.Path) -> None:
    """Eval CE against steps after the dense base (the dense continuation shifted back by the base steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from moe_jax import sweep_results

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {f"dense +{EXTRA_STEPS}": ("tab:blue", BASE_STEPS), f"upcycled +{EXTRA_STEPS}": ("tab:red", 0),
              f"scratch {EXTRA_STEPS}": ("tab:gray", 0)}
    for name in variants("laptop"):
        prefix = name.rsplit(" ", 1)[0]
        if prefix not in styles:
            continue
        rows = [r for r in sweep_results.read_metrics(workdir / "upcycle" / sweep.slug(name)) if "eval/ce" in r]
        color, shift = styles[prefix]
        steps = [r["step"] - shift for r in rows if r["step"] > shift or shift == 0]
        ces = [r["eval/ce"] for r in rows if r["step"] > shift or shift == 0]
        ax.plot(steps, ces, color=color, alpha=0.7, label=prefix if name.endswith("s0") else None)
    ax.set_xlabel(f"training steps after the {BASE_STEPS}-step dense base (scratch: from step 0)")
    ax.set_ylabel("eval cross-entropy (nats/token)")
    ax.set_xlim(0, EXTRA_STEPS)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title("Sparse upcycling, tiny configs, synthetic corpus, 3 seeds")
    fig.tight_layout()
    fig.savefig(results_dir / "upcycle.png", dpi=120)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/ablations")
    parser.add_argument("--results_dir", default=str(pathlib.Path(__file__).resolve().parents[1] / "results"))
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir).resolve()
    this = str(pathlib.Path(__file__).resolve())
    bases = ",".join(f"dense {BASE_STEPS} s{s}" for s in SEEDS)
    common = ["--sweep", this, "--workdir", str(workdir), "--results_dir", args.results_dir, "--no_reuse"]
    sweep.main([*common, "--variants", bases])
    prepare(workdir)
    code = sweep.main(common)
    plot(pathlib.Path(args.results_dir), workdir)
    sys.exit(code)
