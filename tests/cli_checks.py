"""What a user's mistake on the command line must look like, for the subprocess tests of every CLI."""

import os
import subprocess
import sys

# The tests check behaviour, not speed: XLA's CPU backend skips its costly LLVM passes (the same HLO programs,
# compiled in about two thirds of the time; compilation dominates this suite).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def cpu_settings(devices: int = 1) -> dict:
    """The variables that put a new jax process on `devices` host CPU devices (libtpu quiet), compiled with
    FAST_COMPILE_FLAGS."""
    flags = FAST_COMPILE_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")
    return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


def cpu_env(devices: int = 1, **extra) -> dict:
    """os.environ for a subprocess, with cpu_settings(devices) and `extra`."""
    return {**os.environ, **cpu_settings(devices), **extra}


def run_cli(module, args, cwd, timeout=120):
    """`python -m <module> <args>` in `cwd` on one CPU device, as a user runs it."""
    env = cpu_env()
    env.pop("MOE_JAX_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(result, *needles, not_created=()):
    """A non-zero exit, exactly one stderr line starting with `error: ` that contains every needle, no
    traceback, and none of the paths in `not_created` left behind."""
    output = result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    for path in not_created:
        assert not os.path.exists(path), f"{path} was created by a command that failed"
    return errors[0]
