"""Run an ablation sweep (one training run per variant) and write its table, CSV and plots.

    python -m moe_jax.sweep --sweep=experiments/ablations/num_experts.py --workdir=runs/ablations \
        [--scale=laptop|paper] [--variants=dense,8e] [--print_commands] [--results_only]
        [--results_dir=experiments/results]

Variants run one after another, each as `python -m moe_jax.main --config=<file> --workdir=<run>
--config.<key>=<value> ...` in a subprocess (a crash or a divergence stops that variant only). A variant
whose run already finished (its last evaluation is in `metrics.jsonl`) is not run again; a variant whose
config is identical to a finished run of another sweep under the same `--workdir` reuses that run.
`--print_commands` prints the commands instead of running them (one per line, for a cluster). `--results_only`
writes the results of the runs that exist without training anything (a sweep still running elsewhere).

Each finished (or diverged) run also leaves a record, its `metrics.jsonl` (gzipped), `config.json` and the
runner's status and config-hash files (tens of kB, no checkpoints), in
`<results_dir>/records/<sweep>/<variant>/`; commit those with the results. A variant whose run directory is
missing (another machine, a cleaned workdir) but whose record holds a finished run of the same config is
restored from the record instead of retrained, so a long sweep carries on across machines and its results can
always be rewritten. `--no_records` turns this off;
a sweep file whose later variants need earlier runs' checkpoints (a distillation teacher) sets
`RESTORE_FROM_RECORDS = False` (its records are still written).

Results (written by sweep_results.py): `<results_dir>/<sweep>.md` (table with the paper's numbers beside ours,
the analysis paragraph, the command, machine, date and git commit), `<sweep>.csv` and `<sweep>.png` (eval
cross-entropy against steps and against training time, one line per variant). `--scale=paper` writes
`<sweep>_paper.*`.

A sweep file (see experiments/ablations/) is a Python file with
  * `variants(scale: str) -> dict[str, Variant]`: variant name -> base config + overrides (use `base()`);
  * `analysis(results: dict[str, Summary], scale: str) -> str`: the paragraph written from the numbers;
  * optional `COLUMNS` (names from `COLUMN_FORMATS`) and `PAPER` (markdown: the paper's numbers, cited);
  * optional `RESTORE_FROM_RECORDS = False` when variants read other variants' checkpoints.
"""

from __future__ import annotations

import argparse
import gzip
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from typing import Any, Optional

# Results are read and written by sweep_results.py; sweep files' analyses use `num` and `Summary` from here.
from moe_jax.sweep_results import (COLUMN_FORMATS, RECORD_METRICS, REPO, STATUS_FILE, Summary,  # noqa: F401
                                   git_commit, num, results_stem, run_state, summarize, write_results)

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
FULL_LENGTH = 1 / LAPTOP_STEP_FRACTION  # `laptop_fraction` for the tiny configs' own length
KEY_FILE = "sweep_key.txt"
RECORD_FILES = (RECORD_METRICS, "config.json", STATUS_FILE, KEY_FILE)
_PLAIN_RECORD_FILES = RECORD_FILES[1:]


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
        """The docstring's first sentence on one line (a sentence that wraps in the file is not cut)."""
        first_paragraph = " ".join((self.module.__doc__ or self.name).strip().split("\n\n")[0].split())
        sentence_end = re.search(r"(?<!\bal)\.\s(?=[A-Z])", first_paragraph)  # "et al." ends no sentence
        return first_paragraph if sentence_end is None else first_paragraph[:sentence_end.start() + 1]

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
    """A hash of the whole resolved config: two variants with the same key are the same run. Paths inside
    the checkout (a trained tokenizer under runs/) or beside it (../shared/data) are hashed relative to it,
    so a record made in another clone or directory still matches."""
    text = cfg.to_json_best_effort(sort_keys=True)
    text = text.replace(str(REPO), "<repo>").replace(str(REPO.parent), "<repo>/..")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stale_runs(sweep_name: str, chosen: dict, workdir: pathlib.Path) -> list[pathlib.Path]:
    """Run dirs of `chosen` variants whose stored config hash is not their variant's: reporting or resuming
    them would pass another config's run off as this one."""
    stale = []
    for name, variant in chosen.items():
        key_file = workdir / sweep_name / slug(name) / KEY_FILE
        if key_file.exists() and key_file.read_text().strip() != config_key(load_config(variant)):
            stale.append(key_file.parent)
    return stale


def find_shared_run(workdir: pathlib.Path, key: str, steps: int, exclude: pathlib.Path):
    """A finished (or diverged) run of the same config anywhere under `workdir/<sweep>/<variant>` (run dirs,
    or the records under `<results>/records`, which have the same layout)."""
    for key_file in sorted(workdir.glob(f"*/*/{KEY_FILE}")):
        run_dir = key_file.parent
        if run_dir != exclude and key_file.read_text().strip() == key and run_state(run_dir, steps) != "todo":
            return run_dir
    return None


def save_record(run_dir: pathlib.Path, record_dir: pathlib.Path) -> None:
    """Copy a finished or diverged run's small files to `record_dir` (RECORD_FILES; metrics gzipped). `main`
    has refused run dirs of another config (`stale_runs`) before, so the run's hash file is its variant's."""
    record_dir.mkdir(parents=True, exist_ok=True)
    for file in _PLAIN_RECORD_FILES:
        if (run_dir / file).exists():
            shutil.copyfile(run_dir / file, record_dir / file)
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    (record_dir / RECORD_METRICS).write_bytes(gzip.compress(metrics, mtime=0))  # mtime 0: same run, same bytes


def restore_record(run_dir: pathlib.Path, record_dir: pathlib.Path, key: str, steps: int) -> bool:
    """Fill a not-yet-finished `run_dir` from `record_dir` when the record holds a finished (or diverged) run
    of the config with hash `key`; True when it did. A record of another config is left alone."""
    key_file = record_dir / KEY_FILE
    if run_state(run_dir, steps) != "todo" or not key_file.exists() or key_file.read_text().strip() != key:
        return False
    if run_state(record_dir, steps) == "todo":  # read_metrics reads the record's gzipped metrics
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    for file in _PLAIN_RECORD_FILES:
        if (record_dir / file).exists():
            shutil.copyfile(record_dir / file, run_dir / file)
    (run_dir / "metrics.jsonl").write_bytes(gzip.decompress((record_dir / RECORD_METRICS).read_bytes()))
    return True


def restore_from_records(run_dir: pathlib.Path, own_record: pathlib.Path, key: str, steps: int, *,
                         reuse_unless_in: Optional[pathlib.Path] = None) -> Optional[pathlib.Path]:
    """Fill a not-yet-finished `run_dir` from the variant's own record or, given `reuse_unless_in` (the
    workdir), from any sweep's record of the same config (`<results>/records/<sweep>/<variant>`) when no run
    dir of it is in that workdir (one there is reused as it is): the record it used, or None."""
    if restore_record(run_dir, own_record, key, steps):
        return own_record
    if reuse_unless_in is None or run_state(run_dir, steps) != "todo" or find_shared_run(
            reuse_unless_in, key, steps, run_dir) is not None:
        return None
    other = find_shared_run(own_record.parents[1], key, steps, own_record)
    return other if other is not None and restore_record(run_dir, other, key, steps) else None


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
    parser.add_argument("--results_only", action="store_true",
                        help="train nothing: write the results of the runs that exist (unfinished ones as such), "
                             "e.g. while the sweep still runs elsewhere")
    parser.add_argument("--no_records", action="store_true",
                        help="neither restore runs from nor save them to <results_dir>/records/<sweep>/")
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
    stale = stale_runs(sweep.name, chosen, workdir)
    if stale:
        print(f"error: these run dirs hold runs of another config than their variant's (the sweep file or a "
              f"config it reads changed since they ran): {', '.join(map(str, stale))}; move them away (or delete "
              f"them) to rerun those variants", file=sys.stderr)
        return 2
    records = pathlib.Path(args.results_dir) / "records" / results_stem(sweep.name, args.scale)
    restore = not args.no_records and getattr(sweep.module, "RESTORE_FROM_RECORDS", True)
    summaries = {}
    for name, variant in chosen.items():
        run_dir = workdir / sweep.name / slug(name)
        cfg = load_config(variant)
        key, steps = config_key(cfg), int(cfg.train.steps)
        record = (restore_from_records(run_dir, records / slug(name), key, steps,
                                       reuse_unless_in=None if args.no_reuse else workdir) if restore else None)
        if record is not None:
            whose = "its record" if record == records / slug(name) else "the record of an identical config"
            print(f"[sweep] {name}: restored from {whose} in {record}", flush=True)
        if args.results_only:
            shared = None if args.no_reuse else find_shared_run(workdir, key, steps, run_dir)
            run_dir = run_dir if shared is None or run_state(run_dir, steps) != "todo" else shared
        else:
            run_dir = run_variant(name, variant, run_dir, workdir, reuse=not args.no_reuse)
        if not args.no_records and run_state(run_dir, steps) != "todo":
            save_record(run_dir, records / slug(name))
        summaries[name] = summarize(name, run_dir, variant, cfg)
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
