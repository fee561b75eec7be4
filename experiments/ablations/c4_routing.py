"""Why does the router overflow on real text? Where tokens go during training, bytes against SentencePiece.

    python experiments/ablations/c4_routing.py --workdir=runs/ablations

first runs `python -m moe_jax.sweep --sweep=experiments/ablations/c4_routing.py --workdir=runs/ablations`,
which trains (once; finished runs are skipped) the real-text study's Switch-8 run of seed 0 for each tokenizer
(bytes, and the 8k SentencePiece vocabulary: experiments/ablations/c4_study.py's `switch-8 seed 0` and
`switch-8 sp8k seed 0` configs) with a checkpoint every 10 steps, then routes the 16 held-out eval batches through the
checkpoints of steps 10, 30, 100 and 300 (`moe_jax.analysis`) and writes experiments/results/c4_routing.md:
per step, the tokens dropped at the training capacity factor 1.25, the load CV, the busiest expert's share
against its capacity (1.25 / 8 = 15.6% of a group), and how far the choice is a function of the token id
(the share of tokens at their id's most common expert, and I(id; expert) / H(expert)); plus the most frequent
tokens with the expert that takes them. 2-core CPU: about 5 minutes per training run, 1 minute of analysis.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RUNS = {"bytes": "switch-8 seed 0", "SentencePiece 8k": "switch-8 sp8k seed 0"}  # c4_study variants
STEPS = (10, 30, 100, 300)
FREQUENT = 5  # most frequent tokens shown per run


def variants(scale):
    """The study's two seed-0 Switch-8 runs, checkpointed every 10 steps (laptop scale only)."""
    from moe_jax import sweep

    study = sweep.load_sweep(str(REPO / "experiments" / "ablations" / "c4_study.py"), scale)
    return {name: study.variants[name].override({"train.checkpoint_every": 10, "train.keep_checkpoints": 40})
            for name in RUNS.values()}


def analysis(results, scale):
    return "These are the runs experiments/ablations/c4_routing.py analyses; run that file for the routing tables."


def train_runs(workdir: pathlib.Path) -> dict[str, pathlib.Path]:
    """{tokenizer: run directory}, training (with the sweep runner) the runs that have not finished."""
    import tempfile

    from moe_jax import sweep

    sweep.main(["--sweep", str(pathlib.Path(__file__).resolve()), "--workdir", str(workdir),
                "--results_dir", tempfile.mkdtemp(), "--no_reuse"])
    return {label: workdir / "c4_routing" / sweep.slug(name) for label, name in RUNS.items()}


def measure(run_dir: pathlib.Path, step: int) -> dict:
    """Routing of the held-out eval batches at checkpoint `step` (both MoE layers, averaged where a mean)."""
    import numpy as np
    from flax import nnx

    from moe_jax import analysis, analyze, checkpoint, data
    from moe_jax.data import tokenizers

    run, state, _ = checkpoint.restore_run(run_dir, step)
    model, _ = nnx.merge(run.graphdef, state)
    cfg = run.config
    routed = analysis.collect(model, data.make_eval_batches(cfg.data, cfg.train.eval_steps))
    load = analysis.expert_load(routed)
    majority, information = analysis.token_determinism(routed)
    tokenizer = tokenizers.make_tokenizer(cfg.data)
    ids, counts = np.unique(routed.token_ids, return_counts=True)
    frequent = []
    for token, count in sorted(zip(ids.tolist(), counts.tolist()), key=lambda x: -x[1])[:FREQUENT]:
        at = routed.top1[-1][routed.token_ids == token]
        expert = int(np.bincount(at, minlength=routed.num_experts).argmax())
        frequent.append(dict(token=analyze.token_text(tokenizer, token), share=count / len(routed.token_ids),
                             expert=expert, at_expert=float(np.mean(at == expert))))
    return dict(step=step, dropped=float(np.mean(analysis.dropped_fraction(routed, cfg.model.moe.capacity_factor))),
                load_cv=float(np.mean(load.std(axis=1) / load.mean(axis=1))), busiest=float(load.max()),
                capacity=cfg.model.moe.capacity_factor / routed.num_experts, majority=float(np.mean(majority)),
                information=float(np.mean(information)), frequent=frequent, tokens=len(routed.token_ids))


def training_drops(run_dir: pathlib.Path) -> dict[int, tuple[float, float]]:
    """{step: (dropped fraction, load CV)} of the training batches, from metrics.jsonl."""
    from moe_jax import sweep_results

    return {r["step"]: (r["moe/dropped_fraction"], r["moe/load_cv"]) for r in sweep_results.read_metrics(run_dir)
            if "moe/dropped_fraction" in r}


def write(results: dict, drops: dict, path: pathlib.Path, command: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    lines = ["# Why the router overflows on real text: routing of the C4 sample during training", "",
             f"- command: `{command}`", f"- machine: {platform.machine()} {platform.system()}, 2 CPU cores shared "
             f"with other jobs", f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- git commit: {commit}", "",
             "The real-text study's Switch-8 (tiny_switch: 8 top-1 experts in every other layer, CF 1.25, groups "
             "of 4096 tokens, load-balancing weight 1e-2), seed 0, 300 steps on the C4 sample, for each tokenizer; "
             "the 16 held-out eval batches routed through the checkpoints of the steps shown (both MoE layers; "
             "the frequent tokens' experts are the last layer's).", "",
             "| tokenizer | step | dropped at CF 1.25 (held-out) | dropped in training (that step's batch) | "
             "load CV | busiest expert's share (capacity 15.6%) | tokens at their id's usual expert | "
             "I(id; expert) / H(expert) |", "|---|---|---|---|---|---|---|---|"]
    for label, rows in results.items():
        for r in rows:
            train_drop = drops[label].get(r["step"], (float("nan"), float("nan")))[0]
            lines.append(f"| {label} | {r['step']} | {100 * r['dropped']:.1f}% | {100 * train_drop:.1f}% | "
                         f"{r['load_cv']:.3f} | {100 * r['busiest']:.1f}% | {100 * r['majority']:.1f}% | "
                         f"{r['information']:.2f} |")
    lines += ["", "The most frequent held-out tokens, their share of the tokens, and the last MoE layer's expert "
              "that takes most of them (with the share of that token it takes):", "",
              "| tokenizer | step | tokens |", "|---|---|---|"]
    for label, rows in results.items():
        for r in rows:
            shown = ", ".join(f"`{f['token']}` {100 * f['share']:.1f}% -> e{f['expert']} ({100 * f['at_expert']:.0f}%)"
                              for f in r["frequent"])
            lines.append(f"| {label} | {r['step']} | {shown} |")
    lines += ["", "## Analysis", "", analysis_text(results, drops)]
    path.write_text("\n".join(lines) + "\n")


def analysis_text(results: dict, drops: dict) -> str:
    text = []
    for label, rows in results.items():
        first, last = rows[0], rows[-1]
        top = first["frequent"][0]
        text.append(
            f"{label}: at step {first['step']} the routers drop {100 * first['dropped']:.1f}% of the held-out tokens "
            f"at CF 1.25 (busiest expert {100 * first['busiest']:.1f}% of the tokens against a capacity of "
            f"{100 * first['capacity']:.1f}%), {100 * first['majority']:.0f}% of tokens sit at their id's usual "
            f"expert (I/H {first['information']:.2f}); the most frequent token, `{top['token']}` "
            f"({100 * top['share']:.1f}% of all tokens), goes {100 * top['at_expert']:.0f}% to one expert. By step "
            f"{last['step']}: {100 * last['dropped']:.1f}% dropped, busiest expert {100 * last['busiest']:.1f}%, "
            f"{100 * last['majority']:.0f}% at the usual expert (I/H {last['information']:.2f}).")
    text.append(
        "Reading (c4_routing.md of 2026-12-02): at step 10 the routers of both tokenizers partition the vocabulary "
        "(86-95% of the tokens at their id's usual expert): the hidden state a router sees is still little more "
        "than the token's embedding. Real text is Zipfian, and the early routers put the frequent ids together "
        "(for bytes the space on one expert and `e`, `t`, `a`, `o` all on another), so the busiest expert holds "
        "49-69% of the tokens against a capacity of 15.6% and 44-66% of the tokens are dropped. The "
        "load-balancing loss acts only through the router's probabilities and takes about 100 steps to spread "
        "the ids (drops 17% at step 100, 3% at step 300). Bytes and SentencePiece part ways in how: byte routing "
        "becomes contextual (52% at the id's usual expert by step 300; a byte alone says little), SentencePiece "
        "routing stays a function of the piece (80%) with the frequent pieces spread over experts. The synthetic "
        "corpus has uniform domains and near-uniform ids, so its experts fill evenly from the start. "
        "Consequence for the study: a Switch run on real text spends its first ~100 steps dropping a large "
        "share of its tokens in its MoE layers, which a dropless or higher-capacity point (c4_study.py) removes.")
    return " ".join(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/ablations")
    parser.add_argument("--results_dir", default=str(REPO / "experiments" / "results"))
    args = parser.parse_args()
    runs = train_runs(pathlib.Path(args.workdir).resolve())
    results = {label: [measure(run_dir, step) for step in STEPS] for label, run_dir in runs.items()}
    drops = {label: training_drops(run_dir) for label, run_dir in runs.items()}
    results_dir = pathlib.Path(args.results_dir)
    (results_dir / "c4_routing.json").write_text(json.dumps(results, indent=1))
    write(results, drops, results_dir / "c4_routing.md",
          "python experiments/ablations/c4_routing.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
