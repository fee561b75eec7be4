"""Keep libtpu quiet on machines without a TPU.

libtpu is installed with moe_jax (the dry run compiles for TPU pods with it). When jax finds it, it tries to
open a TPU at start-up even where there is none and prints an error block ("Failed to find host bounds for
accelerator type", "E0000 ... INVALID_ARGUMENT ...") that looks like a failure but is not. On a machine with
no TPU chip and no GPU plugin, CPU is the only backend jax can use anyway, so we say so (`JAX_PLATFORMS=cpu`)
before jax starts its backends. An explicit `JAX_PLATFORMS` is always respected, and TPU VMs and GPU
machines are left alone.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "jax_plugins")


def quiet_without_tpu() -> bool:
    """Set `JAX_PLATFORMS=cpu` when this machine has no TPU chip and jax no GPU plugin; True if it did."""
    if os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_FORCE_TPU_INIT"):
        return False
    if any(importlib.util.find_spec(name) is not None for name in _GPU_PLUGINS):
        return False
    from jax._src import hardware_utils  # a PCI scan; starts no backend

    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.config.update("jax_platforms", "cpu")  # takes effect while no backend has started
    return True
