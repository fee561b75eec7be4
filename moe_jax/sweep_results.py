"""A sweep's results: each run's metrics.jsonl and status file read into a `Summary`, and the table (markdown +
CSV, with the paper's numbers, machine, date and commit) and the plot of eval loss against steps and time.
`python -m moe_jax.sweep` (sweep.py: variants, configs, subprocesses, CLI) calls `summarize` and `write_results`.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import gzip
import json
import math
import os
import pathlib
import platform
import subprocess
import textwrap
from typing import Callable, Optional

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
STATUS_FILE = "sweep_status.json"  # written by sweep.run_variant: finished | diverged | failed, git commit


RECORD_METRICS = "metrics.jsonl.gz"  # a sweep record (sweep.save_record) keeps metrics.jsonl gzipped


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
    """metrics.jsonl records (or a sweep record's metrics.jsonl.gz); a resumed run's repeated steps keep their
    last record."""
    path, record = run_dir / "metrics.jsonl", run_dir / RECORD_METRICS
    if path.exists():
        text = path.read_text()
    elif record.exists():
        text = gzip.decompress(record.read_bytes()).decode()
    else:
        return []
    by_step_kind = {}
    for line in text.splitlines():
        if line.strip():
            record = json.loads(line)
            kind = "eval" if any(k.startswith("eval/") for k in record) else "train"
            by_step_kind[(record["step"], kind)] = record
    return [by_step_kind[k] for k in sorted(by_step_kind)]


def run_state(run_dir: pathlib.Path, steps: int) -> str:
    """'finished' (final evaluation logged), 'diverged' (stopped on NaN/Inf), or 'todo'."""
    status = run_dir / STATUS_FILE
    if status.exists() and json.loads(status.read_text()).get("status") == "diverged":
        return "diverged"
    records = read_metrics(run_dir)
    if any(r.get("step") == steps and "eval/ce" in r for r in records):
        return "finished"
    return "todo"


@dataclasses.dataclass
class Summary:
    """What one run measured. Curves are lists of (step, value); times are training seconds."""

    name: str
    run_dir: str
    status: str  # finished | diverged | failed | todo
    steps: int  # configured steps
    last_step: int
    eval_steps: list
    eval_ce: list  # eval cross-entropy at eval_steps
    eval_seconds: list  # training time (s) at eval_steps
    train_steps: list
    train_loss: list
    entropy_floor: Optional[float]
    examples_per_sec: float
    train_seconds: float
    dropped_fraction: float  # training, mean over the last quarter of the logs
    load_cv: float
    router_max_logit: float
    max_train_loss_jump: float  # largest rise between consecutive logged train losses (0: never rose)
    paper: str = ""
    note: str = ""

    @property
    def final_ce(self) -> float:
        return self.eval_ce[-1] if self.status == "finished" and self.eval_ce else float("nan")

    def ce_at(self, step: int) -> float:
        """Eval cross-entropy logged at `step` (nan if none)."""
        return dict(zip(self.eval_steps, self.eval_ce)).get(step, float("nan"))

    def steps_to_reach(self, target: float) -> float:
        """First step at which eval CE <= target, linearly interpolated between evaluations (nan: never)."""
        previous = (0, float("inf"))
        for step, ce in zip(self.eval_steps, self.eval_ce):
            if ce <= target:
                p_step, p_ce = previous
                if not math.isfinite(p_ce):
                    return float(step)
                return p_step + (step - p_step) * (p_ce - target) / (p_ce - ce)
            previous = (step, ce)
        return float("nan")


def summarize(name: str, run_dir: pathlib.Path, variant, cfg) -> Summary:
    """What the run in `run_dir` measured; `variant` (a sweep.Variant) gives the paper's number and the note,
    `cfg` its resolved config."""
    records = read_metrics(run_dir)
    steps = int(cfg.train.steps)
    status_file = run_dir / STATUS_FILE
    status = run_state(run_dir, steps)
    if status == "todo" and status_file.exists():
        status = json.loads(status_file.read_text()).get("status", "todo")
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/ce" in r]
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len

    # Training time from the logged throughput. The first window also holds the compilation: count it at
    # the run's median speed instead, so that curves compare training speed, not compile time.
    rates = [r["train/tokens_per_sec"] for r in train]
    steady = float(np.median(rates[1:] if len(rates) > 1 else rates)) if rates else float("nan")
    seconds, clock, previous = [], 0.0, 0
    for i, r in enumerate(train):
        rate = steady if i == 0 else r["train/tokens_per_sec"]
        clock += (r["step"] - previous) * tokens_per_step / rate
        seconds.append(clock)
        previous = r["step"]
    train_steps = [r["step"] for r in train]
    eval_steps = [r["step"] for r in evals]
    eval_seconds = list(np.interp(eval_steps, [0] + train_steps, [0.0] + seconds)) if train else []

    def late_mean(key: str) -> float:
        values = [r[key] for r in train if isinstance(r.get(key), (int, float))]
        return float(np.mean(values[-max(1, len(values) // 4):])) if values else float("nan")

    logits = [r["moe/router_max_logit"] for r in train if "moe/router_max_logit" in r]
    losses = [r["train/loss"] for r in train]
    jumps = [b - a for a, b in zip(losses, losses[1:]) if math.isfinite(a) and math.isfinite(b)]
    floors = [r["eval/entropy_floor"] for r in evals if "eval/entropy_floor" in r]
    return Summary(
        name=name, run_dir=str(run_dir), status=status, steps=steps,
        last_step=max([r["step"] for r in records], default=0),
        eval_steps=eval_steps, eval_ce=[r["eval/ce"] for r in evals], eval_seconds=eval_seconds,
        train_steps=train_steps, train_loss=losses,
        entropy_floor=floors[-1] if floors else None,
        examples_per_sec=steady / cfg.data.seq_len if rates else float("nan"),
        train_seconds=seconds[-1] if seconds else float("nan"),
        dropped_fraction=late_mean("moe/dropped_fraction"), load_cv=late_mean("moe/load_cv"),
        router_max_logit=max(logits) if logits else float("nan"),
        max_train_loss_jump=max(jumps + [0.0]) if losses else float("nan"),
        paper=variant.paper, note=variant.note)


def seed_stats(values) -> tuple[float, float, int]:
    """(mean, sample standard deviation, count) of the finite values (a point's seeds); nan where undefined."""
    import statistics

    values = [v for v in values if math.isfinite(v)]
    mean = statistics.fmean(values) if values else float("nan")
    return mean, statistics.stdev(values) if len(values) > 1 else float("nan"), len(values)


def num(value, spec: str = ".4f") -> str:
    """A number for a table or a sentence; '–' for None / nan / inf."""
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


# Column name -> (header, formatter of a Summary).
COLUMN_FORMATS: dict[str, tuple[str, Callable[[Summary], str]]] = {
    "eval_ce": ("eval CE (nats/token)", lambda s: num(s.final_ce, ".4f")),
    "gap_to_floor": ("gap to floor", lambda s: num(s.final_ce - s.entropy_floor if s.entropy_floor else None,
                                                    ".4f")),
    "examples_per_sec": ("examples/s", lambda s: num(s.examples_per_sec, ".1f")),
    "train_seconds": ("train time (s)", lambda s: num(s.train_seconds, ".0f")),
    "dropped_fraction": ("dropped (train, %)", lambda s: num(100 * s.dropped_fraction, ".2f")),
    "load_cv": ("load CV (train)", lambda s: num(s.load_cv, ".3f")),
    "router_max_logit": ("max router logit", lambda s: num(s.router_max_logit, ".2f")),
    "max_train_loss_jump": ("largest train-loss rise", lambda s: num(s.max_train_loss_jump, ".3f")),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{platform.node()}: {os.cpu_count()} × {cpu}, {platform.system()} {platform.release()}; " \
           f"load average (1/5/15 min) at write time {load}"


def git_commit() -> str:
    """HEAD's short hash, plus the code files with uncommitted changes (the code a run actually used)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout
    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "moe_jax", "experiments/*.py").splitlines()]
    return commit + (f" (uncommitted changes in {', '.join(changed)})" if changed else "")


def results_stem(sweep_name: str, scale: str) -> str:
    """The name a sweep's results (and records) go under: `<sweep>`, or `<sweep>_<scale>` off the laptop."""
    return sweep_name + ("" if scale == "laptop" else f"_{scale}")


def write_results(sweep, summaries: dict, scale: str, results_dir: pathlib.Path, command: str):
    """<name>.md, .csv and .png of `sweep` (a sweep.Sweep) in results_dir; returns their paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(sweep.name, scale)
    md, csv_path, png = (results_dir / f"{stem}{ext}" for ext in (".md", ".csv", ".png"))
    plot(summaries, png, sweep.title)

    with open(csv_path, "w", newline="") as f:
        fields = ["variant", "status", "last_step", "final_eval_ce", "entropy_floor", "examples_per_sec",
                  "train_seconds", "dropped_fraction", "load_cv", "router_max_logit", "max_train_loss_jump",
                  "paper", "note", "run_dir"]
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for s in summaries.values():
            writer.writerow(dict(variant=s.name, status=s.status, last_step=s.last_step, final_eval_ce=s.final_ce,
                                 entropy_floor=s.entropy_floor, examples_per_sec=s.examples_per_sec,
                                 train_seconds=s.train_seconds, dropped_fraction=s.dropped_fraction,
                                 load_cv=s.load_cv, router_max_logit=s.router_max_logit,
                                 max_train_loss_jump=s.max_train_loss_jump, paper=s.paper, note=s.note,
                                 run_dir=s.run_dir))

    headers = ["variant", "status"] + [COLUMN_FORMATS[c][0] for c in sweep.columns] + ["paper", "note"]
    lines = [f"# {sweep.title}", "",
             f"- command: `{command}`",
             f"- machine: {machine()}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- git commit: {git_commit()}" + _run_commits(summaries),
             f"- scale: {scale}; sweep file: `{_shown_path(sweep.path)}`",
             "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for s in summaries.values():
        cells = [s.name, s.status if s.status != "diverged" else f"diverged at step {s.last_step}"]
        cells += [COLUMN_FORMATS[c][1](s) for c in sweep.columns] + [s.paper or "", s.note or ""]
        lines.append("| " + " | ".join(cells) + " |")
    floor = next((s.entropy_floor for s in summaries.values() if s.entropy_floor), None)
    lines += ["", "Eval CE: held-out cross-entropy after the last step"
              + (f" (entropy floor of the data: {floor:.4f})" if floor else "")
              + ". Examples/s: median training throughput over the logged windows after the first (which "
              "includes compilation); the machine is shared, so speeds carry a few-% to 2× load noise. "
              "Train time: the same throughput summed over steps (evaluation and compilation excluded).",
              "", f"![eval loss vs steps and training time]({png.name})", ""]
    paper = getattr(sweep.module, "PAPER", "")
    if paper:
        lines += ["## The paper", "", paper.strip(), ""]
    lines += ["## Analysis", "", sweep.module.analysis(summaries, scale).strip(), ""]
    md.write_text("\n".join(lines))
    return md, csv_path, png


def _run_commits(summaries: dict) -> str:
    commits = set()
    for s in summaries.values():
        status = pathlib.Path(s.run_dir) / STATUS_FILE
        if status.exists():
            commits.add(json.loads(status.read_text()).get("git_commit", "not recorded"))
    return f"; the runs were trained at: {'; '.join(sorted(commits))}" if commits else ""


def _shown_path(path: pathlib.Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


SEED_SUFFIX = " seed "  # variants named "<point> seed <n>" are seeds of one point


def seed_groups(results: dict) -> dict[str, list]:
    """{point: its runs}: variants named "<point> seed <n>" grouped by point (others are points of their own),
    in the order the points first appear."""
    groups: dict[str, list] = {}
    for name, summary in results.items():
        point, _, seed = name.rpartition(SEED_SUFFIX)
        groups.setdefault(point if point and seed.isdigit() else name, []).append(summary)
    return groups


@dataclasses.dataclass(frozen=True)
class PointComparison:
    """A point's final eval CE over its seeds against the baseline point's."""

    point: str
    mean: float
    std: float
    seeds: int
    delta: float  # mean - baseline mean (nats; negative: better than the baseline)
    in_seed_stds: float  # delta / the larger of the two seed stds
    in_standard_errors: float  # delta / sqrt(std^2 / n + baseline std^2 / baseline n)

    @property
    def beyond_noise(self) -> bool:
        """The issue's bar: the difference exceeds 3 seed standard deviations."""
        return math.isfinite(self.in_seed_stds) and abs(self.in_seed_stds) > 3


def compare_points(results: dict, baseline: str) -> list[PointComparison]:
    """Every point (`seed_groups`) against `baseline`, the baseline first."""
    groups = seed_groups(results)
    base_mean, base_std, base_n = seed_stats([s.final_ce for s in groups.get(baseline, [])])
    out = []
    for point, runs in groups.items():
        mean, std, n = seed_stats([s.final_ce for s in runs])
        delta = mean - base_mean
        seed_std = max(std, base_std) if n > 1 and base_n > 1 else float("nan")
        stderr = math.sqrt(std ** 2 / n + base_std ** 2 / base_n) if n > 1 and base_n > 1 else float("nan")
        ratio = lambda scale: delta / scale if math.isfinite(scale) and scale > 0 else float("nan")
        out.append(PointComparison(point, mean, std, n, delta if point != baseline else 0.0,
                                   ratio(seed_std) if point != baseline else float("nan"),
                                   ratio(stderr) if point != baseline else float("nan")))
    return sorted(out, key=lambda c: c.point != baseline)


def comparison_table(comparisons: list[PointComparison], baseline: str) -> list[str]:
    """Markdown rows: mean ± std (seeds), the difference to `baseline` in nats, seed stds and standard errors."""
    rows = [f"| point | eval CE, mean ± std (seeds) | Δ vs {baseline} | in seed stds | in std. errors | beyond 3 "
            f"seed stds |", "|---|---|---|---|---|---|"]
    for c in comparisons:
        rows.append(f"| {c.point} | {num(c.mean)} ± {num(c.std)} ({c.seeds}) | {num(c.delta, '+.4f')} | "
                    f"{num(c.in_seed_stds, '+.1f')} | {num(c.in_standard_errors, '+.1f')} | "
                    f"{'yes' if c.beyond_noise else 'no' if math.isfinite(c.in_seed_stds) else ''} |")
    return rows


def noise_sentence(comparisons: list[PointComparison], baseline: str) -> str:
    """Which differences to the baseline exceed 3 seed standard deviations, in one sentence."""
    others = [c for c in comparisons if c.point != baseline and math.isfinite(c.in_seed_stds)]
    if not others:
        return f"Not enough finished seeds to compare with {baseline}."
    beyond = [c for c in others if c.beyond_noise]
    if not beyond:
        largest = max(others, key=lambda c: abs(c.in_seed_stds))
        return (f"No point differs from {baseline} by more than 3 seed standard deviations (the largest gap: "
                f"{largest.point}, {largest.in_seed_stds:+.1f}).")
    return (f"Beyond 3 seed standard deviations from {baseline}: "
            + ", ".join(f"{c.point} ({c.delta:+.4f}, {c.in_seed_stds:+.1f} stds)" for c in beyond)
            + "; every other difference is within the seed noise.")


@dataclasses.dataclass(frozen=True)
class Curve:
    """One line of the plot: a run, or the mean of a point's seeds with their standard deviation (`spread`)."""

    label: str
    steps: list
    ce: list
    seconds: list
    spread: Optional[list] = None


def curves(runs: list) -> list[Curve]:
    """A curve per run, except that the seeds of one point ("<point> seed <n>") become their mean and standard
    deviation over the eval steps they all reached."""
    out = []
    for point, group in seed_groups({s.name: s for s in runs}).items():
        if len(group) == 1:
            s = group[0]
            out.append(Curve(s.name + ("" if s.status == "finished" else f" ({s.status})"), list(s.eval_steps),
                             list(s.eval_ce), list(s.eval_seconds)))
            continue
        n = min(len(s.eval_steps) for s in group)
        steps = list(group[0].eval_steps[:n])
        ce = np.array([s.eval_ce[:n] for s in group], dtype=float)
        seconds = np.array([s.eval_seconds[:n] for s in group], dtype=float)
        unfinished = sum(s.status != "finished" for s in group)
        label = f"{point} (mean ± std, {len(group)} seeds" + (f", {unfinished} unfinished)" if unfinished else ")")
        out.append(Curve(label, steps, list(ce.mean(0)), list(seconds.mean(0)), list(ce.std(0, ddof=1))))
    return out


def mean_curves(results: dict) -> dict[str, Curve]:
    """{point: the mean curve of its finished seeds} ("<point> seed <n>" variants; others are their own point)."""
    out = {}
    for c in curves([s for s in results.values() if s.status == "finished"]):
        label = c.label.split(" (")[0]  # "<point> (mean ± std, n seeds)", or one run "<point> seed <n>"
        out[label.rpartition(SEED_SUFFIX)[0] or label] = c
    return out


def steps_to_reach(curve: Curve, target: float) -> float:
    """First step at which a curve's eval CE <= target, interpolated between evaluations (nan: never)."""
    previous = (0, float("inf"))
    for step, ce in zip(curve.steps, curve.ce):
        if ce <= target:
            p_step, p_ce = previous
            return float(step) if not math.isfinite(p_ce) else p_step + (step - p_step) * (p_ce - target) / (p_ce - ce)
        previous = (step, ce)
    return float("nan")


def step_speedup(baseline: Curve, other: Curve) -> float:
    """The baseline's steps to its own final loss over `other`'s steps to that loss (nan: never reached)."""
    if not baseline.ce:
        return float("nan")
    target = baseline.ce[-1]
    return steps_to_reach(baseline, target) / steps_to_reach(other, target)


def plot(summaries: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Top row: whole curves; bottom row: the second half of training, where the variants separate.
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    floor = next((s.entropy_floor for s in summaries.values() if s.entropy_floor), None)
    runs = [s for s in summaries.values() if s.eval_steps]
    for curve in curves(runs):
        for row in (0, 1):
            for col, x in enumerate((curve.steps, curve.seconds)):
                line, = axes[row, col].plot(x, curve.ce, marker=".", label=curve.label)
                if curve.spread is not None:
                    low = [m - d for m, d in zip(curve.ce, curve.spread)]
                    high = [m + d for m, d in zip(curve.ce, curve.spread)]
                    axes[row, col].fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    for row in (0, 1):
        for col, xlabel in enumerate(("training step", "training time (s, excl. eval + compile)")):
            ax = axes[row, col]
            if floor and row == 0:
                ax.axhline(floor, color="k", linestyle=":", linewidth=1, label=f"entropy floor {floor:.3f}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("eval cross-entropy (nats/token)")
            ax.grid(alpha=0.3)
    late = [(x, ce) for s in runs for x, ce in zip(s.eval_steps, s.eval_ce)
            if x >= s.steps / 2 and math.isfinite(ce)]
    if late:
        low, high = min(ce for _, ce in late), max(ce for _, ce in late)
        pad = 0.05 * (high - low) + 1e-3
        axes[1, 0].set_xlim(max(runs, key=lambda s: s.steps).steps / 2 * 0.98, None)
        for ax in axes[1]:
            ax.set_ylim(low - pad, high + pad)
        times = [t for s in runs for x, t in zip(s.eval_steps, s.eval_seconds) if x >= s.steps / 2]
        axes[1, 1].set_xlim(min(times) * 0.98, None)
        axes[1, 0].set_title("second half of training", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 120), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
