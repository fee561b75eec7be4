"""Where Switch would overtake dense on the C4 sample: the gap against training tokens, fitted and extrapolated.

    python experiments/ablations/c4_crossover.py [--output_dir=experiments/results]

reads the committed per-run results of experiments/results/c4_byte.csv (tiny_dense vs tiny_switch, bytes,
300 and 900 steps, 3 seeds) and, where they have run, c4_study.csv's half-width pairs (`d 64 900 steps`,
`d 64 1800 steps`) and SentencePiece-8k pairs (`sp8k`, `sp8k 900 steps`); pairs each seed's Switch run with the
dense run of the same seed (same data order), fits gap = a + b ln(training bytes) per series
(moe_jax/crossover.py) and writes experiments/results/c4_crossover.{md,png}. A SentencePiece series is put in
bytes with the held-out text's tokens per byte (gap in nats/token x tokens/byte; training bytes = training
tokens / tokens per byte, the held-out ratio taken for the training text). It trains nothing; rerun it when the
study adds lengths.
"""

import argparse
import csv
import datetime
import math
import pathlib
import re
import sys

if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from experiments.ablations import c4_study
from moe_jax import crossover, sweep
from moe_jax.sweep_results import git_commit

RESULTS = sweep.REPO / "experiments" / "results"
# (series title, results CSV, its sweep file, the variant-name pattern: dense|switch-8, the length tag, seed)
SERIES = (
    ("d_model 128 (tiny_dense / tiny_switch)", "c4_byte",
     re.compile(r"^(dense|switch-8)(?: (\d+) steps)? seed (\d+)$")),
    ("d_model 64 (half width)", "c4_study",
     re.compile(r"^(dense|switch-8) (d 64 \d+ steps) seed (\d+)$")),
    ("d_model 128, SentencePiece 8k", "c4_study",
     re.compile(r"^(dense|switch-8) (sp8k(?: \d+ steps)?) seed (\d+)$")),
)


def series_points(sweep_name: str, pattern) -> list[tuple[int, crossover.GapPoint]]:
    """[(steps, GapPoint in nats/byte against training bytes)] from a results CSV's finished runs, seeds
    paired; lengths with no pair left out."""
    path = RESULTS / f"{sweep_name}.csv"
    rows = [row for row in csv.DictReader(open(path)) if pattern.match(row["variant"]) and row["status"] == "finished"
            ] if path.exists() else []
    if not rows:
        return []
    variants = sweep.load_sweep(str(sweep.REPO / "experiments" / "ablations" / f"{sweep_name}.py")).variants
    runs = {}
    for row in rows:
        match = pattern.match(row["variant"])
        cfg = sweep.load_config(variants[row["variant"]])
        tokens_per_byte = 1.0 if cfg.data.tokenizer == "byte" else c4_study.held_out_tokens_per_byte(cfg.data.tokenizer)
        training_bytes = round(int(cfg.train.steps) * cfg.data.batch_size * cfg.data.seq_len / tokens_per_byte)
        runs[(match[1], training_bytes, match[3])] = (int(cfg.train.steps),
                                                      float(row["final_eval_ce"]) * tokens_per_byte)
    points = []
    for size in sorted({b for _, b, _ in runs}):
        seeds = sorted(s for kind, b, s in runs if kind == "dense" and b == size and ("switch-8", b, s) in runs)
        if seeds:
            gaps = tuple(runs[("switch-8", size, s)][1] - runs[("dense", size, s)][1] for s in seeds)
            points.append((runs[("dense", size, seeds[0])][0], crossover.GapPoint(size, gaps)))
    return points


def plot(fits, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for title, points, trend in fits:
        tokens = [p.tokens for _, p in points]
        line = ax.errorbar(tokens, [p.mean for _, p in points], yerr=[2 * p.stderr for _, p in points],
                           fmt="o", capsize=3, label=f"{title}: mean gap ± 2 std. errors")
        if math.isfinite(trend.slope):
            end = trend.crossover if math.isfinite(trend.crossover) else 10 * max(tokens)
            xs = [min(tokens) * (end / min(tokens)) ** (i / 50) for i in range(51)]
            ax.plot(xs, [trend.intercept + trend.slope * math.log(x) for x in xs], "--",
                    color=line[0].get_color(), label=f"{title}: fit, extrapolated")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training bytes (log)")
    ax.set_ylabel("Switch-8 − dense, held-out nats/byte")
    ax.set_title("C4 sample: the Switch-minus-dense gap against training data")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=str(RESULTS), help="where c4_crossover.md / .png go")
    output = pathlib.Path(parser.parse_args(argv).output_dir)
    fits = [(title, points, crossover.fit_gap_trend([p for _, p in points]))
            for title, name, pattern in SERIES if (points := series_points(name, pattern))]
    if not fits:
        print(f"error: no finished Switch / dense seed pairs in {RESULTS}/c4_byte.csv or c4_study.csv",
              file=sys.stderr)
        return 1
    split_bytes = c4_study.training_split_bytes()
    lines = ["# Where Switch would overtake dense on the C4 sample", "",
             f"command: `python experiments/ablations/c4_crossover.py` (trains nothing; reads the committed "
             f"CSVs)  ", f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; git commit: "
             f"{git_commit()}", "",
             "Gap = Switch-8's held-out nats/byte minus dense's (SentencePiece: nats/token times held-out tokens per "
             "byte), seed by seed (both runs of a seed see the same "
             "data order). Fit: gap = a + b ln(training bytes), weighted by 1 / (standard error)^2; the "
             "crossover range moves the slope by ± 2 standard errors (moe_jax/crossover.py).", "",
             f"Epochs: training bytes over the {split_bytes / 1e6:.2f}M UTF-8 bytes of the sample's training split. "
             "Past one epoch a run sees its documents again, where extra (expert) parameters can memorise "
             "instead of generalise: the sample itself bounds how far along this axis the fit can be checked.", ""]
    for title, points, trend in fits:
        lines += [f"## {title}", "", "| steps | training bytes | epochs | gap per seed | mean ± std. error |",
                  "|---|---|---|---|---|"]
        lines += [f"| {steps} | {p.tokens / 1e6:.2f}M | {p.tokens / split_bytes:.2f} | "
                  f"{', '.join(f'{g:+.4f}' for g in p.gaps)} | {p.mean:+.4f} ± {p.stderr:.4f} |"
                  for steps, p in points]
        lines += ["", crossover.describe(trend, "bytes")]
        sign_change = next((t for t in (trend.crossover, trend.sign_change) if math.isfinite(t)), None)
        if sign_change is not None:
            bytes_per_step = points[0][1].tokens / points[0][0]
            lines[-1] += (f" At this batch that is {sign_change / bytes_per_step:,.0f} steps, "
                          f"{sign_change / split_bytes:.2g} epochs of the sample's training split.")
        lines += [""]
    lines += ["![gap against training bytes](c4_crossover.png)", ""]
    output.mkdir(parents=True, exist_ok=True)
    (output / "c4_crossover.md").write_text("\n".join(lines))
    plot(fits, output / "c4_crossover.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
