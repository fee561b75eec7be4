"""The README's commands are the ones CI runs, and its routing snippet runs as printed."""

import pathlib
import re
import subprocess
import sys

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
