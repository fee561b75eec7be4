"""Test set-up: eight host CPU devices for the multi-device tests, set before jax is imported, and XLA's fast
CPU compilation (cli_checks.FAST_COMPILE_FLAGS; subprocesses get the same from cli_checks.cpu_env)."""

import os

from cli_checks import FAST_COMPILE_FLAGS

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

NUM_TEST_DEVICES = 8


@pytest.fixture
def eight_devices():
    """The 8 host devices; a test that asks for them fails (never skips) when they are missing."""
    devices = jax.devices()
    assert len(devices) >= NUM_TEST_DEVICES, (
        f"this test needs {NUM_TEST_DEVICES} devices but jax sees {len(devices)}; "
        "XLA_FLAGS must carry --xla_force_host_platform_device_count=8 before jax is imported"
    )
    return devices[:NUM_TEST_DEVICES]
