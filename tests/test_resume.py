"""Exact resume from disk: a training process stopped at a random step after its first checkpoint, rerun with the
same command in a fresh process, logs exactly (bitwise) the train losses of an uninterrupted run at every step.
Killed with SIGKILL, it resumes from its last periodic checkpoint (jsonl, and text for the encoder-decoder on span
corruption); asked to stop with SIGTERM (synthetic), it saves at the end of the current step, exits 0 and resumes
from there. (The 2-process x 4-device SIGKILL case, on the synthetic corpus, is in test_multiprocess.py.)

Both runs are the real CLI in subprocesses with the same environment, so they run the same compiled programs;
they share jax's persistent compilation cache, so only the first launch of each source compiles.
"""

import json
import pathlib
import random
import signal
import subprocess
import sys

import pytest

from cli_checks import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT_EVERY = 14, 4
TIMEOUT_S = 300

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or "
         "expert router token capacity group layer model switch dense mixture sparse train loss step").split()


def write_corpus(directory: pathlib.Path, source: str) -> str:
    """Documents of one to three random words, as jsonl or as plain text lines. Short documents make rows
    that end exactly at a document's end common: the state grain's own checkpoint handler restored wrongly."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(2000)]
    if source == "jsonl":
        path = directory / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    else:
        path = directory / "corpus.txt"
        path.write_text("\n".join(docs) + "\n")
    return str(path)


def command(workdir, source: str, data_path: str, model: str = "decoder"):
    """The run's argv; model "encdec": t5_tiny_switch (span corruption, MoE in both stacks)."""
    layers = (["--config.model.num_encoder_layers=2", "--config.model.num_decoder_layers=2"] if model == "encdec"
              else ["--config.model.num_layers=2"])
    config = "t5_tiny_switch" if model == "encdec" else "tiny_switch"
    args = [sys.executable, "-m", "moe_jax.main", f"--config=experiments/{config}.py", f"--workdir={workdir}",
            "--config.model.d_model=32", "--config.model.d_ff=64", *layers,
            "--config.model.num_heads=2", "--config.model.moe.num_experts=4", "--config.model.moe.dispatcher=index",
            "--config.data.seq_len=32", "--config.data.batch_size=8", f"--config.data.source={source}",
            f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.train.eval_every=7",
            "--config.train.eval_steps=1", f"--config.train.checkpoint_every={CHECKPOINT_EVERY}"]
    if data_path:
        args.append(f"--config.data.paths={data_path}")
    else:  # synthetic documents of ~3 tokens (see write_corpus)
        args.append("--config.data.synthetic.mean_length=3.0")
    return args


def environment(cache_dir) -> dict:
    return cpu_env(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def logged(workdir, key="train/loss") -> list[tuple[int, float]]:
    """(step, value) of every row of metrics.jsonl that has `key`, in file order (a resumed run appends)."""
    rows = map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())
    return [(row["step"], row[key]) for row in rows if key in row]


def finished_checkpoints(workdir) -> list[int]:
    directory = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def run_stopped_at_random_step(args, env, workdir, rng, stop) -> tuple[int, str]:
    """Start the run, send it `stop` at a random step after its first checkpoint is on disk, and let it end;
    (the last step it logged before the signal, its whole output)."""
    stop_at = rng.randint(CHECKPOINT_EVERY + 1, STEPS - 3)  # a step takes milliseconds: time to land
    process = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    seen, lines = 0, []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("step "):
                seen = int(line.split()[1].split("/")[0])
            if seen >= stop_at and finished_checkpoints(workdir):
                process.send_signal(stop)
                break
        lines.append(process.communicate(timeout=TIMEOUT_S)[0])
    finally:
        process.kill()
        process.wait(timeout=TIMEOUT_S)
    output = "".join(lines)
    expected_code = 0 if stop == signal.SIGTERM else -stop
    assert process.returncode == expected_code and seen < STEPS, \
        f"exit {process.returncode}, expected {expected_code} from {stop.name} at step {seen}:\n{output[-3000:]}"
    return seen, output


@pytest.mark.parametrize("source, model, stop_signal", [("synthetic", "decoder", "SIGTERM"),
                                                        ("jsonl", "decoder", "SIGKILL"),
                                                        ("text", "encdec", "SIGKILL")])
def test_stopped_then_rerun_logs_the_uninterrupted_losses_bitwise(tmp_path, source, model, stop_signal):
    stop = signal.Signals[stop_signal]
    data_path = write_corpus(tmp_path, source) if source != "synthetic" else ""
    env = environment(tmp_path / "compilation_cache")
    straight = tmp_path / "straight"
    done = subprocess.run(command(straight, source, data_path, model), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = dict(logged(straight))
    assert sorted(expected) == list(range(1, STEPS + 1))

    rng = random.Random()
    killed = tmp_path / "killed"
    args = command(killed, source, data_path, model)
    killed_at, first_output = run_stopped_at_random_step(args, env, killed, rng, stop)
    checkpoint = max(finished_checkpoints(killed))
    assert checkpoint >= CHECKPOINT_EVERY
    if stop == signal.SIGTERM:  # saved where it stopped, at the end of the step under way, not a periodic one
        assert checkpoint >= killed_at, first_output[-3000:]
        assert f"interrupted at step {checkpoint}; checkpoint saved, run the same command to resume" in first_output

    rerun = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming from the step-{checkpoint} checkpoint" in rerun.stdout, rerun.stdout[-2000:]

    rows = logged(killed)
    context = f"{source} ({model}): {stop.name} at step {killed_at}, resumed from {checkpoint}"
    assert {step for step, _ in rows} == set(range(1, STEPS + 1)), context
    for step, loss in rows:  # steps logged before the kill and again after the resume: all bitwise equal
        assert loss == expected[step], f"{context}: train/loss at step {step} is {loss!r}, uninterrupted " \
                                       f"{expected[step]!r}"
    expected_eval = dict(logged(straight, "eval/loss"))
    assert all(value == expected_eval[step] for step, value in logged(killed, "eval/loss")), context
