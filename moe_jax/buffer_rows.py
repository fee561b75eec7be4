"""The pieces every dispatcher (dispatch.py) is built from: its three `Stages`, and `BufferRows`, where each
(token, choice) assignment sits in a flat expert buffer, moved either way by gathers whose transposes are
gathers (no scatter-add in the backward pass)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array



@dataclasses.dataclass(frozen=True)
class Stages:
    """One dispatcher as its three steps, for a fixed Routing (benchmarks/layer_breakdown.py times each):

      send(x_GSd) -> expert buffer        (the dispatch: one-hot einsum or gather)
      compute(buffer) -> buffer           (the expert matmuls, with any all-to-all around them)
      combine(buffer, dtype) -> y_GSd     (back to token order, weighted by the combine weights)
    """

    send: Callable
    compute: Callable
    combine: Callable


def run_stages(stages: Stages, x_GSd):
    # Named scopes let program_costs (the dry run) split the step's FLOPs by stage, backward included.
    with jax.named_scope("moe_dispatch"):
        x_buffer = stages.send(x_GSd)
    with jax.named_scope("moe_experts"):
        y_buffer = stages.compute(x_buffer)
    with jax.named_scope("moe_combine"):
        return stages.combine(y_buffer, x_GSd.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BufferRows:
    """Where every (token, choice) assignment sits in a flat expert buffer of R rows, both ways round.

    row_of_assignment [A] int32: its row, R where the assignment is not kept (A = G*S*K, flat (g, s, k)).
    assignment_of_row [R] int32: the assignment in each row, A where the row is empty.
    Each kept assignment has its own row, so the two maps are inverse permutations on the kept rows, and
    moving rows either way is a gather whose transpose is the gather the other way (no scatter-add in the
    backward pass, which XLA:CPU runs as a serial loop).
    """

    row_of_assignment: Array
    assignment_of_row: Array
    shape_GSK: tuple = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def of(cls, row_GSK: Array, num_rows: int) -> "BufferRows":
        """From each assignment's row ([G, S, K]; `num_rows` where not kept)."""
        row_A = row_GSK.reshape(-1).astype(jnp.int32)
        num_assignments = row_A.size
        assignment_of_row = jnp.full((num_rows,), num_assignments, jnp.int32).at[row_A].set(
            jnp.arange(num_assignments, dtype=jnp.int32), mode="drop", unique_indices=True)
        return cls(row_A, assignment_of_row, tuple(row_GSK.shape))

    def to_buffer(self, x_GSd: Array) -> Array:
        """[G, S, d] -> [R, d]: each row gets its assignment's token (zeros in empty rows)."""
        G, S, K = self.shape_GSK
        x_Ad = jnp.broadcast_to(x_GSd[:, :, None, :], (G, S, K, x_GSd.shape[-1])).reshape(G * S * K, -1)
        return _move_rows(x_Ad, self.assignment_of_row, self.row_of_assignment)

    def to_tokens(self, y_Rd: Array, weight_GSK: Array, dtype) -> Array:
        """[R, d] -> [G, S, d]: sum over k of weight[g, s, k] * the row of assignment (g, s, k) (0 if dropped)."""
        y_GSKd = _move_rows(y_Rd, self.row_of_assignment, self.assignment_of_row).reshape(
            *self.shape_GSK, y_Rd.shape[-1])
        return jnp.einsum("GSKd,GSK->GSd", y_GSKd.astype(jnp.float32), weight_GSK).astype(dtype)


@jax.custom_vjp
def _move_rows(src_Nd, source_of_M, target_of_N):
    """out[m] = src[source_of_M[m]] (0 where out of range). `target_of_N` is the inverse map (N for none)
    of an injective source_of_M, so the transpose is the gather d_src[n] = d_out[target_of_N[n]]."""
    return src_Nd.at[source_of_M].get(mode="fill", fill_value=0)


def _move_rows_fwd(src_Nd, source_of_M, target_of_N):
    return _move_rows(src_Nd, source_of_M, target_of_N), (source_of_M, target_of_N)


def _move_rows_bwd(residuals, d_out_Md):
    source_of_M, target_of_N = residuals
    return d_out_Md.at[target_of_N].get(mode="fill", fill_value=0), None, None


_move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)
