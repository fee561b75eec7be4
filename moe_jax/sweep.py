"""Run an ablation sweep (one training run per variant) and write its table, CSV and plots.

    python -m moe_jax.sweep --sweep=experiments/ablations/num_experts.py --workdir=runs/ablations \
        [--scale=laptop|paper] [--variants=dense,8e] [--print_commands] [--results_dir=experiments/results]

Variants run one after another, each as `python -m moe_jax.main --config=<file> --workdir=<run>
--config.<key>=<value> ...` in a subprocess (a crash or a divergence stops that variant only). A variant
whose run already finished (its last evaluation is in `metrics.jsonl`) is not run again; a variant whose
config is identical to a finished run of another sweep under the same `--workdir` reuses that run.
`--print_commands` prints the commands instead of running them (one per line, for a cluster).

Results: `<results_dir>/<sweep>.md` (table with the paper's numbers beside ours, the analysis paragraph,
the command, machine, date and git commit), `<sweep>.csv` and `<sweep>.png` (eval cross-entropy against
steps and against training time, one line per variant). `--scale=paper` writes `<sweep>_paper.*`.

A sweep file (see experiments/ablations/) is a Python file with
  * `variants(scale: str) -> dict[str, Variant]`: variant name -> base config + overrides (use `base()`);
  * `analysis(results: dict[str, Summary], scale: str) -> str`: the paragraph written from the numbers;
  * optional `COLUMNS` (names from `COLUMN_FORMATS`) and `PAPER` (markdown: the paper's numbers, cited).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import traceback
from typing import Any, Callable, Optional

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SCALES = ("laptop", "paper")
# The configs a sweep starts from. Laptop: the tiny configs (runs in minutes on a 2-core CPU); paper:
# Switch-Base / T5-Base sizes from Table 9 (experiments/switch_base.py, t5_base.py), 100k steps as in Table 1.
BASES = {
    ("laptop", "moe"): "experiments/tiny_switch.py",
    ("laptop", "dense"): "experiments/tiny_dense.py",
    ("paper", "moe"): "experiments/switch_base.py:experts={experts}",
    ("paper", "dense"): "experiments/t5_base.py",
}
PAPER_EXPERTS = 128
PAPER_STEPS = 100_000
# Laptop sweeps run this share of the tiny configs' steps: the eight sweeps (about 30 runs) then fit in about
# an hour and a quarter on a shared 2-core CPU. Every variant of a sweep runs the same steps.
LAPTOP_STEP_FRACTION = 1 / 3
STATUS_FILE = "sweep_status.json"
KEY_FILE = "sweep_key.txt"


class SweepError(ValueError):
    """A sweep file or a command-line choice that cannot work; the message says what to change."""


# --------------------------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """One run of a sweep: an experiment config file (with its optional `:arg`) and dotted-key overrides.

    `paper` is the paper's number for this row (text, cited), `note` a remark shown in the table.
    """

    config: str
    overrides: dict = dataclasses.field(default_factory=dict)
    paper: str = ""
    note: str = ""

    def override(self, overrides: Optional[dict] = None, **fields) -> "Variant":
        """A copy with more overrides (and/or other `paper` / `note` text)."""
        return dataclasses.replace(self, overrides={**self.overrides, **(overrides or {})}, **fields)

    def command(self, workdir: str) -> list[str]:
        """argv of the training run (config paths are relative to the repository root)."""
        flags = [f"--config.{key}={_flag_value(value)}" for key, value in self.overrides.items()]
        return ["python", "-m", "moe_jax.main", f"--config={self.config}", f"--workdir={workdir}", *flags]


def base(scale: str, *, dense: bool = False, experts: Optional[int] = None, laptop_steps: Optional[int] = None,
         laptop_fraction: float = 1.0, paper_steps: int = PAPER_STEPS, evals: int = 10) -> Variant:
    """The sweep's starting point at `scale`: tiny_switch / tiny_dense (laptop) or Switch-Base / T5-Base
    (paper). `experts` changes the expert count (Switch-Base's `:experts=` argument). Run length: laptop
    `laptop_steps`, or `laptop_fraction` x `LAPTOP_STEP_FRACTION` x the tiny config's steps; paper
    `paper_steps`. `evals` evaluations are spread over the run; laptop runs checkpoint only at the end."""
    if scale not in SCALES:
        raise SweepError(f"--scale={scale!r} is not one of {SCALES}")
    config = BASES[(scale, "dense" if dense else "moe")]
    if scale == "laptop":
        overrides = {} if dense or experts is None else {"model.moe.num_experts": experts}
        steps = laptop_steps or max(1, round(int(load_config(Variant(config)).train.steps) * LAPTOP_STEP_FRACTION
                                             * laptop_fraction))
    else:
        config, overrides, steps = config.format(experts=experts or PAPER_EXPERTS), {}, paper_steps
    every = max(1, steps // evals)
    overrides.update({"train.steps": steps, "train.eval_every": every})
    if scale == "laptop":
        overrides.update({"train.log_every": max(1, min(every, 10)), "train.checkpoint_every": steps})
    return Variant(config, overrides)


def _flag_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value) if isinstance(value, float) else str(value)


def load_config(variant: Variant):
    """The run's full config: the file's `get_config(arg)` with the overrides applied (checked key by key)."""
    path, _, arg = variant.config.partition(":")
    file = REPO / path
    if not file.is_file():
        raise SweepError(f"config file {path!r} not found (paths are relative to {REPO})")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # experiment files import each other as `experiments.*`
    try:
        cfg = _load_module(file, "sweep_config_").get_config(arg)
    except Exception as error:  # a bad `:arg` (switch_base.py:experts=abc) or a broken config file
        raise SweepError(f"config {variant.config!r}: get_config({arg!r}) raised {_raised(error, file)}") from None
    for key, value in variant.overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            if part not in node:
                raise SweepError(f"{variant.config}: unknown config key {key!r} ({part!r} is not a section)")
            node = node[part]
        if leaf not in node:
            raise SweepError(f"{variant.config}: unknown config key {key!r}")
        current = node[leaf]
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[leaf] = value
        except TypeError as error:
            raise SweepError(f"{variant.config}: {key}={value!r}: {error}") from None
    return cfg


def _raised(error: BaseException, file: pathlib.Path) -> str:
    """'TypeName: message (file.py line N)', the line being the last frame of the traceback inside `file`."""
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if pathlib.Path(f.filename) == file]
    return f"{type(error).__name__}: {error}" + (f" ({file.name} line {lines[-1]})" if lines else "")


def _load_module(path: pathlib.Path, prefix: str):
    name = prefix + hashlib.sha1(str(path).encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass
class Sweep:
    name: str
    path: pathlib.Path
    module: Any
    variants: dict  # name -> Variant

    @property
    def title(self) -> str:
        return (self.module.__doc__ or self.name).strip().splitlines()[0]

    @property
    def columns(self) -> tuple:
        return tuple(getattr(self.module, "COLUMNS", ("eval_ce", "examples_per_sec")))


def load_sweep(path: str, scale: str = "laptop") -> Sweep:
    """Import a sweep file and build its variants at `scale`; SweepError says what is wrong with it."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise SweepError(f"sweep file {path!r} not found")
    if file.suffix != ".py":
        raise SweepError(f"sweep file {path!r} is not a Python file: give experiments/ablations/<name>.py")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        module = _load_module(file.resolve(), "sweep_")
    except Exception as error:  # a syntax or import error in the sweep file itself
        raise SweepError(f"sweep file {path!r} failed to import: {_raised(error, file.resolve())}") from None
    for required in ("variants", "analysis"):
        if not callable(getattr(module, required, None)):
            raise SweepError(f"sweep file {path!r} must define a function `{required}` "
                             f"(see the moe_jax.sweep docstring)")
    if scale not in SCALES:
        raise SweepError(f"--scale={scale!r} is not one of {SCALES}")
    try:
        variants = module.variants(scale)
    except SweepError as error:
        raise SweepError(f"sweep file {path!r}: {error}") from None
    except Exception as error:  # a bug in the sweep file: say where, without a traceback
        raise SweepError(f"sweep file {path!r}: variants({scale!r}) raised {_raised(error, file.resolve())}") from None
    if not isinstance(variants, dict) or not variants or not all(
            isinstance(v, Variant) for v in variants.values()):
        raise SweepError(f"sweep file {path!r}: variants({scale!r}) must return a non-empty dict "
                         f"name -> moe_jax.sweep.Variant, got {type(variants).__name__}")
    for column in getattr(module, "COLUMNS", ()):
        if column not in COLUMN_FORMATS:
            raise SweepError(f"sweep file {path!r}: unknown column {column!r}; choose from {sorted(COLUMN_FORMATS)}")
    for name, variant in variants.items():
        try:
            load_config(variant)
        except SweepError as error:
            raise SweepError(f"sweep file {path!r}, variant {name!r}: {error}") from None
    return Sweep(file.stem, file, module, variants)


def select(sweep: Sweep, names: str) -> dict:
    """The variants named in a comma-separated list (all when empty), in the sweep's order."""
    if not names:
        return dict(sweep.variants)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in sweep.variants]
    if unknown:
        raise SweepError(f"unknown variant(s) {unknown} in sweep {sweep.name!r}; its variants are "
                         f"{list(sweep.variants)}")
    return {n: v for n, v in sweep.variants.items() if n in wanted}


def slug(name: str) -> str:
    """A variant name as a directory name: ASCII letters, digits, '-', '.', single '_' between words."""
    kept = "".join(c if (c.isascii() and c.isalnum()) or c in "-." else " " for c in name)
    return "_".join(kept.split()) or "variant"


# --------------------------------------------------------------------------------------------- running


def config_key(cfg) -> str:
    """A hash of the whole resolved config: two variants with the same key are the same run."""
    return hashlib.sha256(cfg.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:16]


def run_state(run_dir: pathlib.Path, steps: int) -> str:
    """'finished' (final evaluation logged), 'diverged' (stopped on NaN/Inf), or 'todo'."""
    status = run_dir / STATUS_FILE
    if status.exists() and json.loads(status.read_text()).get("status") == "diverged":
        return "diverged"
    records = read_metrics(run_dir)
    if any(r.get("step") == steps and "eval/ce" in r for r in records):
        return "finished"
    return "todo"


def find_shared_run(workdir: pathlib.Path, key: str, steps: int, exclude: pathlib.Path):
    """A finished (or diverged) run of the same config anywhere under `workdir/<sweep>/<variant>`."""
    for key_file in sorted(workdir.glob(f"*/*/{KEY_FILE}")):
        run_dir = key_file.parent
        if run_dir != exclude and key_file.read_text().strip() == key and run_state(run_dir, steps) != "todo":
            return run_dir
    return None


def run_variant(name: str, variant: Variant, run_dir: pathlib.Path, workdir: pathlib.Path, *,
                reuse: bool = True) -> pathlib.Path:
    """Train one variant unless it (or, with `reuse`, an identical config) already ran; returns its run dir."""
    cfg = load_config(variant)
    steps = int(cfg.train.steps)
    key = config_key(cfg)
    if run_state(run_dir, steps) != "todo":
        print(f"[sweep] {name}: already done in {run_dir}, skipped", flush=True)
        return run_dir
    shared = find_shared_run(workdir, key, steps, run_dir) if reuse else None
    if shared is not None:
        print(f"[sweep] {name}: identical config already ran in {shared}, reused", flush=True)
        return shared
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / KEY_FILE).write_text(key + "\n")
    argv = variant.command(str(run_dir))
    commit = git_commit()
    print(f"[sweep] {name}: {shlex.join(argv)}", flush=True)
    # A persistent compilation cache: variants of one model share its init (and reruns all their steps).
    env = {"JAX_COMPILATION_CACHE_DIR": str(workdir / "jax_cache"), **os.environ}
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    tail = (run_dir / "train.log").read_text().strip().splitlines()[-3:]
    if proc.returncode == 0:
        (run_dir / STATUS_FILE).write_text(json.dumps({"status": "finished", "git_commit": commit}))
    else:
        diverged = any("train/loss is" in line for line in tail)
        status = "diverged" if diverged else "failed"
        (run_dir / STATUS_FILE).write_text(json.dumps({"status": status, "returncode": proc.returncode,
                                                       "message": "\n".join(tail), "git_commit": commit}))
        print(f"[sweep] {name}: {status} (exit {proc.returncode}): {' | '.join(tail)}", flush=True)
    return run_dir


# --------------------------------------------------------------------------------------------- results


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
    """metrics.jsonl records; a resumed run's repeated steps keep their last record."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    by_step_kind = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            kind = "eval" if any(k.startswith("eval/") for k in record) else "train"
            by_step_kind[(record["step"], kind)] = record
    return [by_step_kind[k] for k in sorted(by_step_kind)]


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


def summarize(name: str, run_dir: pathlib.Path, variant: Variant, cfg) -> Summary:
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


def write_results(sweep: Sweep, summaries: dict, scale: str, results_dir: pathlib.Path, command: str):
    """<name>.md, .csv and .png in results_dir; returns their paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = sweep.name + ("" if scale == "laptop" else f"_{scale}")
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


def plot(summaries: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Top row: whole curves; bottom row: the second half of training, where the variants separate.
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    floor = next((s.entropy_floor for s in summaries.values() if s.entropy_floor), None)
    runs = [s for s in summaries.values() if s.eval_steps]
    for s in runs:
        label = s.name + ("" if s.status == "finished" else f" ({s.status})")
        for row in (0, 1):
            axes[row, 0].plot(s.eval_steps, s.eval_ce, marker=".", label=label)
            axes[row, 1].plot(s.eval_seconds, s.eval_ce, marker=".", label=label)
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
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- CLI


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown --scale, missing --sweep, unknown flag) are one `error:` line."""

    def error(self, message):
        from moe_jax import cli

        cli.fail(f"{message}\n(python -m moe_jax.sweep --help lists the flags)")


def main(argv: Optional[list] = None) -> int:
    parser = _ArgumentParser(prog="python -m moe_jax.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", required=True, help="experiments/ablations/<name>.py")
    parser.add_argument("--workdir", required=True, help="runs go to <workdir>/<sweep>/<variant>")
    parser.add_argument("--scale", default="laptop", choices=SCALES)
    parser.add_argument("--variants", default="", help="comma-separated subset of the variants (default all)")
    parser.add_argument("--print_commands", action="store_true", help="print one command per variant, run nothing")
    parser.add_argument("--results_dir", default=str(REPO / "experiments" / "results"))
    parser.add_argument("--no_reuse", action="store_true",
                        help="train every variant here even if another sweep ran the same config (for speed "
                             "comparisons made under the same machine load)")
    args = parser.parse_args(argv)
    command = "python -m moe_jax.sweep " + shlex.join(argv if argv is not None else sys.argv[1:])
    try:
        sweep = load_sweep(args.sweep, args.scale)
        chosen = select(sweep, args.variants)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    workdir = pathlib.Path(args.workdir)
    if args.print_commands:
        for name, variant in chosen.items():
            print(shlex.join(variant.command(str(workdir / sweep.name / slug(name)))))
        return 0

    workdir = workdir.resolve()
    summaries = {}
    for name, variant in chosen.items():
        run_dir = run_variant(name, variant, workdir / sweep.name / slug(name), workdir, reuse=not args.no_reuse)
        summaries[name] = summarize(name, run_dir, variant, load_config(variant))
    paths = write_results(sweep, summaries, args.scale, pathlib.Path(args.results_dir), command)
    print("[sweep] wrote " + ", ".join(str(p) for p in paths), flush=True)
    bad = [n for n, s in summaries.items() if s.status == "failed"]
    if bad:
        print(f"[sweep] failed variants: {bad} (see their train.log)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run the importable module, not __main__: sweep files build `moe_jax.sweep.Variant`s.
    from moe_jax import sweep as _module

    sys.exit(_module.main())
