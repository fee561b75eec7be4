"""Where a run's numbers go: `metrics.jsonl` (one JSON object per logged step), TensorBoard, the console."""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics -> {"a/b": float | list}. Per-MoE-layer arrays [layers, ...] become `moe/layer{i}/name`
    entries plus their mean over layers as `moe/name`."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if key == "moe":
                flat.update(_per_layer(value))
            else:
                flat.update(flatten(value, name + "/"))
            continue
        array = np.asarray(value)
        flat[name] = float(array) if array.ndim == 0 else array.tolist()
    return flat


def _per_layer(moe_metrics: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in moe_metrics.items():
        array = np.asarray(value, np.float64)
        if array.ndim == 0:
            flat[f"moe/{key}"] = float(array)
            continue
        for layer, row in enumerate(array):
            flat[f"moe/layer{layer}/{key}"] = float(row) if row.ndim == 0 else row.tolist()
        mean = array.mean(axis=0)
        flat[f"moe/{key}"] = float(mean) if mean.ndim == 0 else mean.tolist()
    return flat


class MetricWriter:
    """Appends to `<workdir>/metrics.jsonl` and TensorBoard event files; only process 0 writes."""

    def __init__(self, workdir: str | epath.Path, *, total_steps: int):
        self.total_steps = total_steps
        self.enabled = jax.process_index() == 0
        self._start = time.time()
        self._jsonl = None
        self._tensorboard = None
        if self.enabled:
            workdir = epath.Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = (workdir / "metrics.jsonl").open("a")
            from tensorboardX import SummaryWriter
            self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, step)
        self._tensorboard.flush()

    def progress(self, step: int, values: Mapping[str, Any], seconds_per_step: float) -> None:
        """One console line of training: step, losses, speed, ETA."""
        if not self.enabled:
            return
        eta = max(self.total_steps - step, 0) * seconds_per_step
        print(f"step {step}/{self.total_steps} {_shown(values, _TRAIN_CONSOLE_KEYS)} eta {_duration(eta)}",
              flush=True)

    def eval_line(self, step: int, values: Mapping[str, Any]) -> None:
        """One console line of evaluation results."""
        if self.enabled:
            print(f"eval at step {step}/{self.total_steps}: {_shown(values, _EVAL_CONSOLE_KEYS)}", flush=True)

    def header(self, text: str) -> None:
        """Start-up and status lines (process 0 only)."""
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


_TRAIN_CONSOLE_KEYS = ("train/loss", "train/accuracy", "train/tokens_per_sec", "train/mfu", "moe/dropped_fraction",
                       "train/goodput", "train/expert_padding_share", "train/expert_lost_share")
_EVAL_CONSOLE_KEYS = ("eval/loss", "eval/ce", "eval/accuracy", "eval/gap_to_floor")


def _shown(values: Mapping[str, Any], keys) -> str:
    return " ".join(f"{key.split('/', 1)[-1]}={values[key]:.4g}" for key in keys
                    if isinstance(values.get(key), float))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
