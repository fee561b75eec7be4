"""The README's commands are the ones CI runs, and its routing snippet runs as printed."""

import pathlib
import re
import subprocess
import sys

from cli_checks import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme():
    return (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.startswith("python3 -m venv")]
    assert len(ci_lines) == 1, ".ci/run must hold the README's test command on one line"
    assert ci_lines[0] in _readme().splitlines(), "README test command and .ci/run differ"


def test_routing_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", _readme(), flags=re.S)
    snippet = next(block for block in blocks if "route_top_k" in block)
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120,
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "(1, 8, 4, 2)" in result.stdout


def test_readme_train_command_uses_an_existing_config():
    line = next(l for l in _readme().splitlines() if l.startswith("python3 -m venv") and "moe_jax.main" in l)
    config = re.search(r"--config=(\S+)", line).group(1)
    assert (ROOT / config).exists()


def test_readme_train_command_runs_on_8_devices_without_a_group_size(tmp_path):
    """The README's main command on 8 host devices, as given (plus a short run): the routing group follows the
    devices (4096 tokens per step / 8 = groups of 512), no flag to compute."""
    import shlex

    line = next(l for l in _readme().splitlines() if l.startswith("python3 -m venv") and "moe_jax.main" in l)
    command = shlex.split(line[line.index("python -m moe_jax.main"):])
    command = [sys.executable if part == "python" else part for part in command]
    command = [f"--workdir={tmp_path / 'run'}" if part.startswith("--workdir=") else part for part in command]
    command += ["--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_steps=1"]
    env = cpu_env(devices=8)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "devices: 8 x cpu" in result.stdout and "routing groups of 512 tokens" in result.stdout, result.stdout
    assert "step 2/2" in result.stdout and "eval at step 2/2" in result.stdout
    assert "Traceback" not in result.stderr
