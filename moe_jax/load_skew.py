"""The dry run under routing skew: per-chip expert work, all-to-all bytes, memory and step-time floor when the
experts' load is `uniform`, the `worst` case, or `observed:RUN` (a run's logged loads at its most skewed step).

    python -m moe_jax.dryrun --config=... --topology=v5p:4x4x4 --load_skew=worst

A compiled XLA step has static shapes: capacity dispatchers (einsum, index) always compute E x G x C slots
and send them all, whatever the load (skew only drops more tokens), and the dropless buffers are sized for
the worst case (every assignment to one chip's experts), so the compiled peak memory is the same under every
load. What the load changes, and this module models, assuming every routing group sees the same per-expert
load: the rows that carry tokens (goodput), the rows the busiest chip's grouped matmul runs (dropless), the
bytes an exchange that sent only real rows (`ragged_all_to_all`) would move, and the expert activations a
dynamically sized buffer would hold (what runs out of memory in frameworks that size them per step).

Loads are fractions of a layer's (token, choice) assignments per expert, [MoE layers, E]. Observed loads
come from `moe/layer{i}/expert_load` in RUN/metrics.jsonl: fractions of the *kept* assignments, so a run with
a capacity factor under-reports its skew by what it dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Optional

import numpy as np
from flax import nnx

from moe_jax import dispatch, goodput, routing

KINDS = ("uniform", "worst", "observed:RUN")
_LAYER_LOAD_RE = re.compile(r"^moe/layer(\d+)/expert_load$")


@dataclasses.dataclass(frozen=True)
class MoeShape:
    """What the skew model needs of a model's MoE layers (all alike)."""

    num_layers: int
    num_experts: int
    k: int
    d_model: int
    d_ff: int
    gated: bool
    dispatcher: str
    capacity_factor: float
    min_capacity: int
    group_size: int
    dtype_bytes: int

    @property
    def row_flops(self) -> float:
        return goodput.row_flops(self.d_model, self.d_ff, self.gated)


def moe_shape(model: nnx.Module) -> Optional[MoeShape]:
    """The MoE layers of a (possibly abstract) model; None for a dense model. A scanned stack counts its length."""
    from moe_jax.moe import MoeLayer

    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, MoeLayer)]
    if not layers:
        return None
    first = layers[0]
    count = sum(math.prod(m.wi.get_value().shape[:-3]) for m in layers)
    return MoeShape(num_layers=count, num_experts=first.num_experts, k=first.k, d_model=first.d_model,
                    d_ff=first.d_ff, gated=first.activation in ("swiglu", "geglu"), dispatcher=first.dispatcher,
                    capacity_factor=first.capacity_factor, min_capacity=first.min_capacity,
                    group_size=first.group_size, dtype_bytes=np.dtype(first.dtype).itemsize)


def parse(spec: str) -> tuple[str, Optional[str]]:
    """'uniform' | 'worst' | 'observed:RUN' -> (kind, RUN or None); ValueError naming the flag otherwise."""
    spec = spec or ""
    if spec in ("uniform", "worst"):
        return spec, None
    if spec.startswith("observed:") and spec[len("observed:"):]:
        return "observed", spec[len("observed:"):]
    raise ValueError(f"--load_skew={spec!r} must be one of {', '.join(KINDS)} (RUN: a run directory with a "
                     f"metrics.jsonl)")


def loads(spec: str, shape: MoeShape) -> tuple[np.ndarray, str]:
    """([MoE layers, E] load fractions, a description) for a --load_skew value."""
    kind, run = parse(spec)
    L, E, k = shape.num_layers, shape.num_experts, shape.k
    if kind == "uniform":
        return np.full((L, E), 1.0 / E), "uniform: every expert 1/E of the assignments"
    if kind == "worst":
        worst = np.zeros(E)
        worst[:k] = 1.0 / k  # a token's k choices are distinct experts: at most 1/k of them on one expert
        return np.tile(worst, (L, 1)), (f"worst: every token's {k} choice(s) on experts 0..{k - 1} (one chip "
                                        f"under expert parallelism) in every layer")
    step, observed = observed_loads(run, num_experts=E)
    if observed.shape[0] not in (1, L):
        raise ValueError(f"--load_skew=observed:{run}: the run logged {observed.shape[0]} MoE layers and this "
                         f"config has {L}; observe a run of the same layout")
    return np.broadcast_to(observed, (L, E)).copy(), (f"observed: {run} at step {step}, its most skewed logged "
                                                      f"step (largest expert load {observed.max():.3f})")


def observed_loads(run: str, *, num_experts: int) -> tuple[int, np.ndarray]:
    """(step, [layers, E]) of the logged step in RUN/metrics.jsonl whose largest per-expert load is largest."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--load_skew=observed:{run}: no {path} (give the workdir of a training run)")
    best: Optional[tuple[float, int, np.ndarray]] = None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error})") from None
            layers = {int(m.group(1)): v for key, v in row.items() if (m := _LAYER_LOAD_RE.match(key))
                      and isinstance(v, list)}
            if not layers:
                continue
            load = np.asarray([layers[i] for i in sorted(layers)], np.float64)
            if load.shape[1] != num_experts:
                raise ValueError(f"--load_skew=observed:{run}: the run has {load.shape[1]} experts per layer and "
                                 f"this config {num_experts}")
            if best is None or load.max() > best[0]:
                best = (float(load.max()), int(row.get("step", number)), load)
    if best is None:
        raise ValueError(f"--load_skew=observed:{run}: {path} has no per-layer moe/layer<i>/expert_load "
                         f"entries (a dense run, or one logged before MoE metrics existed)")
    return best[1], best[2]


def skew_report(shape: MoeShape, load_LE: np.ndarray, *, tokens_per_step: int, num_chips: int, expert_axis: int,
                chip, compiled_matmul_per_chip: float, compiled_expert_matmul_per_chip: float,
                compiled_all_to_all_bytes: float, compiled_peak_bytes: float, description: str = "") -> dict:
    """Per-chip expert work under `load_LE` for one train step (forward + backward), see the module doc.

    compiled_*: the compiled step's own per-chip matmul FLOPs (all, and those of the experts' stage), its
    all-to-all bytes and XLA's peak memory; the floor under load swaps the compiled expert FLOPs for the
    busiest chip's.
    """
    E, k, S = shape.num_experts, shape.k, shape.group_size
    ep = expert_axis
    experts_per_chip = E // ep
    groups = tokens_per_step // num_chips // S  # per chip
    capacity = (None if dispatch.is_dropless(shape.dispatcher) else
                routing.expert_capacity(S, E, shape.capacity_factor, k=k, min_capacity=shape.min_capacity))
    flops_per_row = shape.row_flops * goodput.TRAINING_FLOPS_MULTIPLIER
    activation_bytes_per_row = (2 * shape.d_model + shape.d_ff * (2 if shape.gated else 1)) * shape.dtype_bytes
    row_bytes = shape.d_model * shape.dtype_bytes
    chips = []
    for j in range(ep):  # chip j of an expert-parallel group holds experts [j E/ep, (j + 1) E/ep)
        on_chip = slice(j * experts_per_chip, (j + 1) * experts_per_chip)
        totals = dict(computed=0.0, useful=0.0, lost=0.0, received=0.0)
        for load_E in load_LE:
            load_E = np.asarray(load_E, np.float64) / max(float(np.sum(load_E)), 1e-30)
            # the ep chips of the group each send this chip their groups' assignments to its experts
            rows = goodput.expected_rows(shape.dispatcher, load_E, num_groups=groups * ep, group_size=S, k=k,
                                         capacity=capacity, grouped_matmul="ragged", on_experts=on_chip)
            for key in ("computed", "useful", "lost"):
                totals[key] += rows[key]
            totals["received"] += rows["useful"] * (ep - 1) / ep  # from the other chips, real rows only
        chips.append(totals)
    static_rows = (chips[0]["computed"] if capacity is not None  # every slot, under any load
                   else shape.num_layers * ep * groups * S * k)  # dropless buffers: all assignments on one chip
    busiest = max(chips, key=lambda c: (c["computed"], c["useful"]))
    mean = {key: float(np.mean([c[key] for c in chips])) for key in chips[0]}
    expert_flops = busiest["computed"] * flops_per_row
    floor_flops = compiled_matmul_per_chip - compiled_expert_matmul_per_chip + expert_flops
    exchanges = 4  # per MoE layer: to the experts and back, forward and backward
    needed_a2a = busiest["received"] * row_bytes * exchanges if ep > 1 else 0.0
    return dict(
        load=description,
        max_expert_load=float(np.max(load_LE)),
        goodput_per_chip=dict(busiest=goodput.split_from_flops(
            busiest["useful"] * flops_per_row, (busiest["computed"] - busiest["useful"]) * flops_per_row,
            busiest["lost"] * flops_per_row), mean=goodput.split_from_flops(
            mean["useful"] * flops_per_row, (mean["computed"] - mean["useful"]) * flops_per_row,
            mean["lost"] * flops_per_row)),
        expert_rows_busiest_chip=busiest["computed"],
        expert_rows_mean_chip=mean["computed"],
        step_time_floor_s=floor_flops / chip.peak_bf16_flops,
        matmul_flops_per_chip_busiest=floor_flops,
        all_to_all_bytes_compiled=compiled_all_to_all_bytes,
        all_to_all_bytes_real_rows_busiest=needed_a2a,
        all_to_all_floor_s=(needed_a2a / chip.ici_bandwidth) if chip.ici_bandwidth else None,
        memory_peak_compiled=compiled_peak_bytes,
        expert_activation_bytes_static=static_rows * activation_bytes_per_row,
        expert_activation_bytes_busiest=busiest["computed"] * activation_bytes_per_row,
        # buffers sized per step to the load (as frameworks with dynamic shapes do), the rest as compiled
        memory_if_sized_to_load=compiled_peak_bytes + (busiest["computed"] - static_rows) * activation_bytes_per_row,
    )


def format_lines(skew: dict, size) -> list[str]:
    """The report's lines for `skew_report`'s dict; `size(bytes) -> str`."""
    busiest, mean = skew["goodput_per_chip"]["busiest"], skew["goodput_per_chip"]["mean"]
    a2a_floor = skew["all_to_all_floor_s"]
    return [
        f"expert load: {skew['load']}",
        f"  expert goodput per chip: mean {mean['goodput']:.1%} (padding {mean['expert_padding_share']:.1%}, "
        f"lost {mean['expert_lost_share']:.1%} of the computed expert FLOPs); busiest chip {busiest['goodput']:.1%} "
        f"({skew['expert_rows_busiest_chip']:.0f} expert rows per step vs {skew['expert_rows_mean_chip']:.0f} mean)",
        f"  step-time floor on the busiest chip {skew['step_time_floor_s'] * 1e3:.2f} ms; all-to-all "
        f"{size(skew['all_to_all_bytes_compiled'])} as compiled, {size(skew['all_to_all_bytes_real_rows_busiest'])} "
        f"of real rows into the busiest chip"
        + (f" ({a2a_floor * 1e3:.2f} ms at ICI bandwidth)" if a2a_floor is not None else ""),
        f"  memory: peak {size(skew['memory_peak_compiled'])} as compiled (static buffers, the same under any load); "
        f"{size(skew['memory_if_sized_to_load'])} if expert buffers were sized to this load (expert activations "
        f"{size(skew['expert_activation_bytes_busiest'])} vs {size(skew['expert_activation_bytes_static'])} "
        f"compiled)",
    ]
