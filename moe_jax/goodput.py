"""MoE goodput: how much of the expert FLOPs a step pays for does real work.

Per MoE layer call the expert FFNs run over a number of buffer rows, and each row costs the same FLOPs:

  useful   rows holding a real (token, choice) assignment;
  padding  rows computed without one: empty capacity slots (einsum / index), the empty dense rows and block
           padding of dropless on CPU ('blocks'); 0 for exact grouped matmuls ('ragged');
  lost     assignments the router made that found no slot (dropped tokens): work the model wanted, never
           done, though capacity was paid for (computed = useful + padding; lost is on top).

  goodput = useful / (useful + padding)

`layer_rows` counts the rows of one routing decision (MoeLayer puts them in its aux); `step_split` turns the
aux of a step (any leading layer axes) into FLOPs per step and the shares the trainer logs as
`train/goodput`, `train/expert_flops_{useful,padding,lost}`, `train/expert_{padding,lost}_share`.
`expected_rows` is the same count from a per-expert load, for the dry run (no routing needed).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import dispatch

ROW_KEYS = ("expert_rows_computed", "expert_rows_useful", "expert_rows_lost", "expert_row_flops")
TRAINING_FLOPS_MULTIPLIER = 3  # forward + backward (two matmuls per forward one)


def row_flops(d_model: int, d_ff: int, gated: bool) -> float:
    """Forward matmul FLOPs of one row through one expert: 2 d f per kernel, 2 kernels (3 if gated)."""
    return 2.0 * d_model * d_ff * (3 if gated else 2)


def layer_rows(dispatcher: str, route, padding_mask_GS: Optional[jax.Array], k: int, *, row_flops: float,
               block_size: Optional[int] = None) -> dict:
    """{`expert_rows_computed`, `expert_rows_useful`, `expert_rows_lost`, `expert_row_flops`} float32 scalars
    of one routing decision. `k` is the choices a token asks for (expert choice: the average, so lost is 0
    when the experts take k per token)."""
    computed = dispatch.computed_rows(dispatcher, route, block_size=block_size)
    useful = jnp.sum(route.kept).astype(jnp.float32)
    num_real = (float(route.num_groups * route.group_size) if padding_mask_GS is None
                else jnp.sum(padding_mask_GS).astype(jnp.float32))
    lost = jnp.maximum(num_real * k - useful, 0.0)
    return dict(expert_rows_computed=jnp.asarray(computed, jnp.float32), expert_rows_useful=useful,
                expert_rows_lost=jnp.asarray(lost, jnp.float32), expert_row_flops=jnp.float32(row_flops))


def step_split(moe_aux: dict, *, training: bool = True) -> dict:
    """Expert FLOPs of one step from the MoE aux (arrays with any leading layer axes; {} for a dense model).

    Returns {} without MoE layers, else floats: `goodput`, `expert_flops_useful`, `expert_flops_padding`,
    `expert_flops_lost` (summed over layers, forward + backward when `training`), `expert_padding_share` and
    `expert_lost_share` (of the computed expert FLOPs).
    """
    if not moe_aux or "expert_rows_computed" not in moe_aux:
        return {}
    scale = TRAINING_FLOPS_MULTIPLIER if training else 1
    per_row = np.asarray(moe_aux["expert_row_flops"], np.float64) * scale
    total = {key: float(np.sum(np.asarray(moe_aux[f"expert_rows_{key}"], np.float64) * per_row))
             for key in ("computed", "useful", "lost")}
    return split_from_flops(total["useful"], total["computed"] - total["useful"], total["lost"])


def split_from_flops(useful: float, padding: float, lost: float) -> dict:
    computed = useful + padding
    return dict(goodput=useful / computed if computed else 1.0, expert_flops_useful=useful,
                expert_flops_padding=padding, expert_flops_lost=lost,
                expert_padding_share=padding / computed if computed else 0.0,
                expert_lost_share=lost / computed if computed else 0.0)


def expected_rows(dispatcher: str, load_E, *, num_groups: int, group_size: int, k: int,
                  capacity: Optional[int], block_size: Optional[int] = None, grouped_matmul: str = "blocks",
                  on_experts: slice = slice(None)) -> dict:
    """{computed, useful, lost} rows of one MoE layer when expert e receives a fraction load_E[e] of the
    G*S*k assignments in every group (the dry run's model of a step; numbers, not arrays), counted over the
    experts `on_experts` only (e.g. one chip's).

    Capacity dispatchers keep min(assignments, C) per expert and group and compute all G*C slots of every
    expert; dropless keeps everything and computes what its grouped matmul runs ('ragged': the rows
    themselves; 'blocks': a dense part of A/E rows per expert plus its overflow in whole blocks).
    """
    load_E = np.asarray(load_E, np.float64)
    E = load_E.size
    per_group_E = (load_E / max(load_E.sum(), 1e-30) * group_size * k)[on_experts]
    experts = per_group_E.size
    if not dispatch.is_dropless(dispatcher):
        kept = num_groups * float(np.minimum(per_group_E, capacity).sum())
        return dict(computed=float(experts * num_groups * capacity), useful=kept,
                    lost=num_groups * float(per_group_E.sum()) - kept)
    rows_E = per_group_E * num_groups
    useful = float(rows_E.sum())
    if grouped_matmul == "ragged":
        return dict(computed=useful, useful=useful, lost=0.0)
    base = num_groups * group_size * k // E
    block_size = block_size or dispatch.overflow_block_size(base)
    overflow_E = np.maximum(np.ceil(rows_E) - base, 0)
    computed = float(experts * base + sum(math.ceil(o / block_size) * block_size for o in overflow_E))
    return dict(computed=computed, useful=useful, lost=0.0)
