"""Two processes x 4 host CPU devices on localhost train exactly like one process x 8 devices.

The test launches the CLI twice (`python -m moe_jax.main ... --config.distributed.*`), each process with 4
CPU devices, jax.distributed on a free localhost port and gloo CPU collectives; the 8-device mesh spans both
processes (expert axis 8: the token all-to-all and the gradient all-reduce cross the process boundary). Each
process builds only its half of every global batch. The reference runs here, in one process on the 8 test
devices. Then both processes resume from the checkpoint they wrote together and finish the run.
"""

import json
import pathlib
import random
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from cli_checks import cpu_env
from moe_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 150  # per launch; a run takes ~20 s on a loaded 2-core machine

CONFIG = textwrap.dedent("""
    from moe_jax import train

    def get_config(arg=""):
        cfg = train.default_config()
        cfg.model.update(vocab_size=cfg.data.synthetic.vocab_size, d_model=32, d_ff=64, num_layers=2, num_heads=2)
        cfg.model.moe.update(num_experts=8, every=2, group_size=32, dispatcher="{dispatcher}")
        cfg.data.update(source="synthetic", seq_len=32, batch_size=8)
        cfg.train.update(steps={steps}, log_every=1, eval_every=6, eval_steps=1, checkpoint_every=3,
                         learning_rate=3e-3, warmup_steps=2, peak_flops_per_device=1e9)
        cfg.mesh.shape = (1, 8, 1)
        return cfg
""")


def write_config(path, *, steps, dispatcher="index"):
    path.write_text(CONFIG.format(steps=steps, dispatcher=dispatcher))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(config_path, workdir, cache_dir):
    """Start the CLI as processes 0 and 1 of a 2-process job on a free localhost port.

    A second launch in the same test reuses the first one's compiled steps from `cache_dir` (jax's
    persistent compilation cache)."""
    port = free_port()
    env = cpu_env(devices=4, JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    procs = []
    for process_id in range(2):
        args = [sys.executable, "-m", "moe_jax.main", f"--config={config_path}", f"--workdir={workdir}",
                "--config.distributed.enabled=True", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}",
                "--config.distributed.initialization_timeout=60"]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def wait_for(procs) -> list[str]:
    """Both processes' output; fails with the tail of both outputs if either fails or times out."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        outputs = [proc.communicate()[0] for proc in procs]
        raise AssertionError(f"2-process run did not finish in {TIMEOUT_S} s:\n" + _report(procs, outputs))
    if any(proc.returncode for proc in procs):
        raise AssertionError("2-process run failed:\n" + _report(procs, outputs))
    return outputs


def _report(procs, outputs):
    return "\n".join(f"--- process {i} (exit {p.returncode}), last lines:\n" + "\n".join(out.splitlines()[-30:])
                     for i, (p, out) in enumerate(zip(procs, outputs)))


def metrics(workdir, key, rows=slice(None)):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()[rows]
    return {row["step"]: row[key] for row in map(json.loads, lines) if key in row}


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path, eight_devices):
    """Same train losses step by step and same eval losses as one process, to rtol 1e-5 (the only difference
    is the order of float32 sums in cross-process collectives). Then the same 2-process command, killed with
    SIGKILL at a random step after its first checkpoint and rerun, resumes from the checkpoint both processes
    wrote together and logs the uninterrupted 2-process run's losses exactly (same programs)."""
    import importlib.util

    config_path = write_config(tmp_path / "config.py", steps=12)
    spec = importlib.util.spec_from_file_location("multiprocess_test_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    multi, cache = tmp_path / "two", tmp_path / "compilation_cache"
    procs = start_two_processes(config_path, multi, cache)
    try:  # the reference runs while the two processes start up and compile
        train.train(module.get_config(), str(tmp_path / "one"), devices=eight_devices)
    finally:
        wait_for(procs)
    for key in ("train/loss", "eval/loss"):
        expected, got = metrics(tmp_path / "one", key), metrics(multi, key)
        assert sorted(got) == sorted(expected) and len(got) >= 2, (key, got, expected)
        np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)],
                                   rtol=1e-5, err_msg=key)

    checkpoints = multi / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [6, 9, 12]
    # One set of arrays; each process saved its own data-iterator position.
    assert sorted(p.name for p in (checkpoints / "6" / "data_iter").iterdir() if p.name.startswith("process_")) \
        == ["process_0-of-2.json", "process_1-of-2.json"]

    # Both processes SIGKILLed at a random step after the first checkpoint is on disk, then the same command
    # again in two fresh processes: every logged loss equals the uninterrupted 2-process run's, bitwise.
    killed = tmp_path / "killed"
    kill_at = random.Random().randint(4, 11)
    procs = start_two_processes(config_path, killed, cache)
    try:
        for line in procs[0].stdout:
            seen = int(line.split()[1].split("/")[0]) if line.startswith("step ") else 0
            if seen >= kill_at and any(p.name.isdigit() for p in (killed / "checkpoints").glob("*")):
                break
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=TIMEOUT_S)
    assert [proc.returncode for proc in procs] == [-signal.SIGKILL] * 2, "the run ended before it was killed"
    outputs = wait_for(start_two_processes(config_path, killed, cache))
    assert "resuming from the step-" in outputs[0], outputs[0][-2000:]
    expected = metrics(multi, "train/loss")
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    logged = [(row["step"], row["train/loss"]) for row in rows if "train/loss" in row]
    assert {step for step, _ in logged} == set(expected), logged
    assert all(loss == expected[step] for step, loss in logged), (kill_at, logged, expected)
