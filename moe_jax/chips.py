"""Accelerator chips: each one's published bf16 peak and HBM, in one table that the trainer's MFU and the dry
run both read.

Peak: dense bf16 matmul throughput per chip from the vendors' specifications (Google Cloud's TPU
system-architecture pages, NVIDIA's data sheets). Usable HBM: what XLA reports as "available HBM" when a
compile for the chip runs out of memory (libtpu 0.0.42). `shapes`: the slice shapes Google Cloud lists for a
generation, i.e. the topologies the dry run compiles for (empty: not a dry-run target).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional

import numpy as np

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures; `device_kinds` are the `jax.Device.device_kind` strings the chip reports."""

    name: str
    peak_bf16_flops: float
    device_kinds: tuple[str, ...]
    hbm: str = ""  # as published
    usable_hbm_bytes: float = 0.0
    hbm_bandwidth: float = 0.0  # bytes/s
    shapes: tuple[str, ...] = ()
    source: str = ""
    ici_bandwidth: float = 0.0  # bytes/s per chip: the published "Interchip Interconnect BW" in Gbps / 8; 0: unknown


CHIPS = {
    "v4": Chip("TPU v4", 275e12, ("TPU v4",), source="Google Cloud, TPU v4: https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 197e12, ("TPU v5 lite", "TPU v5e"), "16 GB", 15.75 * GiB, 819e9,
                ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
                "Google Cloud, TPU v5e key chip specifications: https://cloud.google.com/tpu/docs/v5e", 1600e9 / 8),
    "v5p": Chip("TPU v5p", 459e12, ("TPU v5p", "TPU v5"), "95 GB", 95.74 * GiB, 2765e9,
                ("2x2x1", "2x2x2", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16", "16x16x16",
                 "16x16x24"),
                "Google Cloud, TPU v5p key chip specifications: https://cloud.google.com/tpu/docs/v5p", 4800e9 / 8),
    "v6e": Chip("TPU v6e", 918e12, ("TPU v6 lite", "TPU v6e"), "32 GB", 31.25 * GiB, 1640e9,
                ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
                "Google Cloud, TPU v6e key chip specifications: https://cloud.google.com/tpu/docs/v6e", 3584e9 / 8),
    "h100": Chip("NVIDIA H100", 989e12, ("NVIDIA H100 80GB HBM3",), source="NVIDIA H100 data sheet (SXM, dense)"),
    "h200": Chip("NVIDIA H200", 989e12, ("NVIDIA H200",), source="NVIDIA H200 data sheet (SXM, dense)"),
}

# The generations the dry run compiles for (those with slice shapes).
TOPOLOGY_CHIPS = {generation: chip for generation, chip in CHIPS.items() if chip.shapes}


def for_device_kind(device_kind: str) -> Optional[Chip]:
    """The chip a `jax.Device.device_kind` names, or None (e.g. a CPU)."""
    return next((chip for chip in CHIPS.values() if device_kind in chip.device_kinds), None)


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(size: int = 2048) -> float:
    """FLOP/s of a large float32 square matmul on the default device: the practical peak used for CPU MFU."""
    import jax  # here: the chip table itself needs no jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / float(np.median(times))
