"""The README's table of the tiny configs, measured at the current commit with the README's own command.

    python benchmarks/readme_numbers.py [--workdir=runs/readme_numbers] [--configs=tiny_dense,tiny_switch]

Runs `python -m moe_jax.main --config=experiments/<name>.py --workdir=<fresh dir>` for each config, one after
another, and writes `experiments/results/tiny_configs.md`: eval cross-entropy at every evaluation, the gap to
the synthetic corpus's entropy floor, wall time of the whole command (start-up, compilation and evals
included) and its CPU time, with the commit, the machine and the date. Paste its table into the README and
the configs' docstrings; do not edit the numbers by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def run(name: str, workdir: pathlib.Path) -> dict:
    if workdir.exists():
        shutil.rmtree(workdir)
    command = [sys.executable, "-m", "moe_jax.main", f"--config=experiments/{name}.py", f"--workdir={workdir}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = {row["step"]: row for row in rows if "eval/ce" in row}
    last = evals[max(evals)]
    return dict(name=name, eval_ce={step: row["eval/ce"] for step, row in sorted(evals.items())},
                gap=last.get("eval/gap_to_floor"), wall=wall,
                cpu=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))


def table(results: list[dict]) -> str:
    steps = sorted({s for r in results for s in r["eval_ce"]})
    lines = [f"| config | eval CE at step {' / '.join(map(str, steps))} | gap to floor | wall | CPU (user+sys) |",
             "|---|---|---|---|---|"]
    for r in results:
        ce = " / ".join(f"{r['eval_ce'][s]:.3f}" for s in steps)
        lines.append(f"| `experiments/{r['name']}.py` | {ce} | {r['gap']:.3f} | {int(r['wall'] // 60)} m "
                     f"{int(r['wall'] % 60)} s | {r['cpu']:.0f} s |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/readme_numbers")
    parser.add_argument("--configs", default="tiny_dense,tiny_switch")
    parser.add_argument("--output", default=str(REPO / "experiments" / "results" / "tiny_configs.md"))
    args = parser.parse_args()
    results = [run(name, REPO / args.workdir / name) for name in args.configs.split(",")]
    text = "\n".join([
        "# The tiny configs, as the README's command runs them",
        "",
        f"`python benchmarks/readme_numbers.py` at commit {commit()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"on {platform.machine()} with {os.cpu_count()} cores ({platform.processor() or 'unknown CPU'}); each "
        f"config is `python -m moe_jax.main --config=experiments/<name>.py --workdir=<fresh dir>`, run one after "
        f"another. Eval CE in nats/token on the held-out synthetic stream; wall time of the whole command.",
        "",
        table(results),
        "",
    ])
    pathlib.Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
