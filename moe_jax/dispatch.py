"""How tokens travel to experts: three interchangeable executors of a `routing.Routing`.

    y_GSd = apply_experts(name, x_GSd, routing, experts)

Axis letters as in routing.py (G groups, S tokens per group, E experts, C capacity, K choices, d model
width, f hidden width), plus N rows of an expert buffer and A = G*S*K (token, choice) assignments.

* ``einsum``   one-hot dispatch / combine tensors [G, S, E, C] and two einsums around the expert buffer
               x_ENd [E, G*C, d]. Dense matmuls only: the TPU path. `transport_dtype=jnp.bfloat16` runs the
               two einsums in bf16 (half the bytes on the wire when the buffer is all-to-all'ed).
* ``index``    the same expert buffer x_ENd [E, G*C, d], filled by a gather (slot -> token) and read back
               by a gather (token -> slot) weighted by the combine weight. No [G, S, E, C] tensor: the
               GPU / CPU path.
* ``dropless`` no buffer and no capacity: the kept (token, choice) pairs in expert-major order, a grouped
               matmul, back to token order. `jax.lax.ragged_dot` on TPU / GPU; on CPU, where ragged_dot is a
               dense masked matmul over all groups, a batched matmul over each expert's first A/E rows plus a loop
               over block-padded overflow rows (see `_dropless_dispatch`).

All three give the same output for the same Routing (to float tolerance): only kept assignments are
computed, and each comes back multiplied by its combine weight. With a capacity large enough that nothing
drops, dropless therefore equals the capacity paths. A dropped assignment contributes exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import sharding
from moe_jax.routing import Routing

# Logical axes of the [E, G, C, d] expert buffer: experts on 'expert', groups on what remains of the batch axes.
EXPERT_BUFFER_AXES = ("expert", "batch", None, "embed")

Array = jax.Array

DISPATCHERS = ("einsum", "index", "dropless")
ACTIVATIONS = ("relu", "gelu", "swiglu", "geglu")


def check_dispatcher(name: str) -> str:
    if name not in DISPATCHERS:
        raise ValueError(f"dispatcher must be one of {DISPATCHERS}, got {name!r}")
    return name


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return name


# --------------------------------------------------------------------------------------------- experts


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertFFN:
    """E stacked feed-forward experts: y = act(x W_i [, x W_gate]) W_o, one weight set per expert.

    wi      [E, d, f]  input kernel.
    wo      [E, f, d]  output kernel.
    wi_gate [E, d, f]  gate kernel of the gated activations (swiglu: silu(x W_gate) * x W_i; geglu: gelu);
                       None for relu / gelu.
    dropout_rng        key for expert dropout on the hidden units (None: no dropout, e.g. at eval).
    Static: `activation`, `dropout_rate`, `dtype` (the compute dtype of the expert matmuls).
    """

    wi: Array
    wo: Array
    wi_gate: Optional[Array] = None
    dropout_rng: Optional[Array] = None
    activation: str = dataclasses.field(default="relu", metadata=dict(static=True))
    dropout_rate: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    dtype: jnp.dtype = dataclasses.field(default=jnp.float32, metadata=dict(static=True))

    @property
    def num_experts(self) -> int:
        return self.wi.shape[0]

    def __call__(self, x_ENd: Array) -> Array:
        """The expert buffer [E, N, d] -> [E, N, d]: row block e goes through expert e."""
        dt = self.dtype
        x_ENd = x_ENd.astype(dt)
        h_ENf = jnp.einsum("ENd,Edf->ENf", x_ENd, self.wi.astype(dt))
        gate_ENf = (None if self.wi_gate is None else
                    jnp.einsum("ENd,Edf->ENf", x_ENd, self.wi_gate.astype(dt)))
        h_ENf = self.hidden(h_ENf, gate_ENf, self.dropout_rng)
        return jnp.einsum("ENf,Efd->ENd", h_ENf, self.wo.astype(dt))

    def hidden(self, h: Array, gate: Optional[Array], rng: Optional[Array]) -> Array:
        """Activation (gated where `gate` is given) and expert dropout on the hidden units."""
        return _hidden(h, gate, rng, self.activation, self.dropout_rate)


def _hidden(h, gate, rng, activation, dropout_rate):
    if activation == "relu":
        h = jax.nn.relu(h)
    elif activation == "gelu":
        h = jax.nn.gelu(h)
    else:
        act = jax.nn.silu if activation == "swiglu" else jax.nn.gelu
        h = act(gate) * h
    if dropout_rate > 0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - dropout_rate, h.shape)
        h = jnp.where(keep, h / (1.0 - dropout_rate), 0).astype(h.dtype)
    return h


# --------------------------------------------------------------------------------------------- entry point


def apply_experts(
    name: str,
    x_GSd: Array,
    routing: Routing,
    experts: ExpertFFN,
    *,
    transport_dtype=None,
    grouped_matmul: Optional[str] = None,
    block_size: int = 64,
) -> Array:
    """Send every kept (token, choice) of `routing` through its expert and combine: [G, S, d] -> [G, S, d].

    Args:
      name: 'einsum' | 'index' | 'dropless'.
      x_GSd: tokens in groups.
      routing: from a router in routing.py (same G, S).
      experts: the stacked expert weights.
      transport_dtype: einsum only: dtype of the dispatch / combine einsums (e.g. jnp.bfloat16).
      grouped_matmul: dropless only: 'ragged' (jax.lax.ragged_dot) or 'blocks' (dense part + block-padded
        overflow, for CPU); None picks by `jax.default_backend()`.
      block_size: rows per overflow block of the 'blocks' grouped matmul.

    Returns:
      y_GSd = sum_k weight[g, s, k] * expert_{expert_index[g, s, k]}(x[g, s]) over kept choices, in x's dtype.
    """
    check_dispatcher(name)
    if x_GSd.ndim != 3 or tuple(x_GSd.shape[:2]) != tuple(routing.expert_index.shape[:2]):
        raise ValueError(f"x_GSd must be [G, S, d] with [G, S] = {tuple(routing.expert_index.shape[:2])} "
                         f"of the routing, got shape {x_GSd.shape}")
    if experts.num_experts != routing.num_experts:
        raise ValueError(f"experts hold {experts.num_experts} experts but routing.num_experts = "
                         f"{routing.num_experts}")
    if name == "einsum":
        return _einsum_dispatch(x_GSd, routing, experts, transport_dtype)
    if name == "index":
        return _index_dispatch(x_GSd, routing, experts)
    return _dropless_dispatch(x_GSd, routing, experts, grouped_matmul or default_grouped_matmul(), block_size)


def default_grouped_matmul() -> str:
    """'ragged' (jax.lax.ragged_dot) on TPU / GPU, 'blocks' on CPU where ragged_dot is dense over groups."""
    return "blocks" if jax.default_backend() == "cpu" else "ragged"


# --------------------------------------------------------------------------------------------- einsum


def _einsum_dispatch(x_GSd, routing, experts, transport_dtype):
    num_groups, _, d = x_GSd.shape
    E, C = routing.num_experts, routing.buffer_size
    td = x_GSd.dtype if transport_dtype is None else transport_dtype
    dispatch_GSEC = routing.dispatch_mask().astype(td)
    x_EGCd = jnp.einsum("GSEC,GSd->EGCd", dispatch_GSEC, x_GSd.astype(td))
    # Expert parallelism: groups arrive sharded over ('data', 'expert'); the experts' inputs must sit with
    # their weights, E over 'expert'. Under a mesh this re-layout is an all-to-all (a no-op without one).
    x_EGCd = sharding.constrain(x_EGCd, EXPERT_BUFFER_AXES)
    x_ENd = x_EGCd.reshape(E, num_groups * C, d)
    y_ENd = experts(x_ENd)
    y_EGCd = sharding.constrain(y_ENd.reshape(E, num_groups, C, d), EXPERT_BUFFER_AXES)
    if routing.num_choices == 1:
        # One choice per token: read back with the 0/1 dispatch tensor and weight per token. Same numbers as
        # the combine tensor, but the weight gradient is a [G, S] product instead of a third GSEC einsum.
        y_GSd = jnp.einsum("GSEC,EGCd->GSd", dispatch_GSEC, y_EGCd.astype(td), preferred_element_type=jnp.float32)
        y_GSd = y_GSd * routing.weight[..., 0, None]
    else:
        combine_GSEC = routing.combine_tensor().astype(td)
        y_GSd = jnp.einsum("GSEC,EGCd->GSd", combine_GSEC, y_EGCd.astype(td), preferred_element_type=jnp.float32)
    return y_GSd.astype(x_GSd.dtype)


# --------------------------------------------------------------------------------------------- index


def _index_dispatch(x_GSd, routing, experts):
    num_groups, group_size, d = x_GSd.shape
    E, C, K = routing.num_experts, routing.buffer_size, routing.num_choices
    num_rows = num_groups * C  # N
    num_tokens = num_groups * group_size
    # Row of every assignment in the flat buffer [E * N]; E * N (out of range) where dropped.
    g_GSK = jnp.arange(num_groups, dtype=jnp.int32)[:, None, None]
    row_GSK = routing.expert_index * num_rows + g_GSK * C + routing.slot
    row_GSK = jnp.where(routing.kept, row_GSK, E * num_rows)
    token_GSK = jnp.broadcast_to(
        jnp.arange(num_tokens, dtype=jnp.int32).reshape(num_groups, group_size, 1), row_GSK.shape)
    # Slot -> token (num_tokens, out of range, marks an empty slot); no slot is used twice.
    token_of_row = jnp.full((E * num_rows,), num_tokens, jnp.int32).at[row_GSK.reshape(-1)].set(
        token_GSK.reshape(-1), mode="drop", unique_indices=True)
    x_Td = x_GSd.reshape(num_tokens, d)
    x_ENd = x_Td.at[token_of_row].get(mode="fill", fill_value=0).reshape(E, num_rows, d)
    y_ENd = experts(x_ENd)
    y_GSKd = y_ENd.reshape(E * num_rows, d).at[row_GSK].get(mode="fill", fill_value=0)
    y_GSd = jnp.einsum("GSKd,GSK->GSd", y_GSKd.astype(jnp.float32), routing.weight)
    return y_GSd.astype(x_GSd.dtype)


# --------------------------------------------------------------------------------------------- dropless


def _expert_major_rows(routing: Routing, block_size: int, base: int):
    """Rows of the kept assignments, expert-major: a dense part of `base` rows per expert, then the rest.

    An expert's assignments are ranked group by group and, inside a group, by slot (slots of an expert in a
    group are 0..n-1, as every router in routing.py hands them out). Rank r < base goes to row e*base + r of
    the dense part [E, base]; the others to the overflow part after it, where each expert's overflow run is
    padded to whole blocks of `block_size` rows.

    Returns:
      row_GSK [G, S, K] int32: row of each kept assignment; `num_rows` (out of range) where not kept.
      over_E [E] int32: overflow rows per expert (unpadded).
      padded_E [E] int32: over_E rounded up to whole blocks.
      num_rows: static, E*base + a multiple of block_size bounding the padded overflow for any routing
        (an overflowing expert has more than base rows, so the overflow is at most G*S*K - base).
    """
    num_groups, _, num_choices = routing.expert_index.shape
    E = routing.num_experts
    kept_GSK = routing.kept
    e_GSK = jnp.where(kept_GSK, routing.expert_index, E)
    g_GSK = jnp.arange(num_groups)[:, None, None]
    counts_GE = jnp.zeros((num_groups, E + 1), jnp.int32).at[g_GSK, e_GSK].add(1)[:, :E]
    over_E = jnp.maximum(counts_GE.sum(axis=0) - base, 0)
    padded_E = -(-over_E // block_size) * block_size
    start_E = E * base + jnp.cumsum(padded_E) - padded_E
    group_offset_GE = jnp.cumsum(counts_GE, axis=0) - counts_GE
    e_safe_GSK = jnp.minimum(e_GSK, E - 1)
    rank_GSK = group_offset_GE[g_GSK, e_safe_GSK] + routing.slot
    row_GSK = jnp.where(rank_GSK < base, e_safe_GSK * base + rank_GSK, start_E[e_safe_GSK] + rank_GSK - base)
    max_overflow = max(routing.expert_index.size - base, 0)
    num_rows = E * base + -(-(max_overflow + E * (block_size - 1)) // block_size) * block_size
    row_GSK = jnp.where(kept_GSK, row_GSK, num_rows).astype(jnp.int32)
    return row_GSK, over_E, padded_E, num_rows


def _dropless_dispatch(x_GSd, routing, experts, grouped_matmul, block_size):
    """Kept assignments in expert-major rows, the expert FFN as a grouped matmul, back and weighted.

    'ragged': one ragged_dot per kernel over the exactly-sized expert runs.
    'blocks' (CPU): the first A/E rows of every expert (A = G*S*K; all of them under perfect balance) as
    one batched [E, A/E, d] FFN; rows beyond that, of overloaded experts, in blocks of `block_size` rows
    (`_dense_and_block_grouped`). Empty
    dense rows of underloaded experts cost as much as the overflow, so the waste is about twice the
    imbalance, plus at most E * (block_size - 1) padding rows.
    """
    if grouped_matmul not in ("ragged", "blocks"):
        raise ValueError(f"grouped_matmul must be 'ragged' or 'blocks', got {grouped_matmul!r}")
    num_groups, group_size, d = x_GSd.shape
    num_tokens = num_groups * group_size
    E = routing.num_experts
    base = 0 if grouped_matmul == "ragged" else routing.expert_index.size // E
    block = 1 if grouped_matmul == "ragged" else block_size
    row_GSK, over_E, padded_E, num_rows = _expert_major_rows(routing, block, base)
    token_GSK = jnp.broadcast_to(
        jnp.arange(num_tokens, dtype=jnp.int32).reshape(num_groups, group_size, 1), row_GSK.shape)
    token_of_row = jnp.full((num_rows,), num_tokens, jnp.int32).at[row_GSK.reshape(-1)].set(
        token_GSK.reshape(-1), mode="drop", unique_indices=True)
    x_Rd = x_GSd.reshape(num_tokens, d).at[token_of_row].get(mode="fill", fill_value=0)
    if grouped_matmul == "ragged":
        y_Rd = _ragged_grouped(x_Rd, over_E, experts)
    else:
        y_Rd = _dense_and_block_grouped(x_Rd, base, padded_E, experts, block_size)
    y_GSKd = y_Rd.at[row_GSK].get(mode="fill", fill_value=0)
    y_GSd = jnp.einsum("GSKd,GSK->GSd", y_GSKd.astype(jnp.float32), routing.weight)
    return y_GSd.astype(x_GSd.dtype)


def _ragged_grouped(x_Rd, rows_E, experts):
    """Expert FFN on expert-major rows with jax.lax.ragged_dot (rows past sum(rows_E) give 0)."""
    dt = experts.dtype
    x_Rd = x_Rd.astype(dt)
    h_Rf = jax.lax.ragged_dot(x_Rd, experts.wi.astype(dt), rows_E)
    gate_Rf = None if experts.wi_gate is None else jax.lax.ragged_dot(x_Rd, experts.wi_gate.astype(dt), rows_E)
    h_Rf = experts.hidden(h_Rf, gate_Rf, experts.dropout_rng)
    return jax.lax.ragged_dot(h_Rf, experts.wo.astype(dt), rows_E)


def _dense_and_block_grouped(x_Rd, base, padded_E, experts, block_size):
    """Expert FFN on the rows of `_expert_major_rows`: [E, base] dense rows, then block-padded overflow.

    The dense part is one batched [E, base, d] FFN. Overflow block i (< the number of used blocks, a
    dynamic count) runs through expert expert_B[i]; the overflow row count is a static bound and blocks past
    the last used one are never touched, so FLOPs are those of the used blocks only (against E times the
    rows for the dense masked matmul ragged_dot is on CPU).
    """
    num_rows, d = x_Rd.shape
    E = experts.num_experts
    num_blocks = (num_rows - E * base) // block_size
    block_end_E = jnp.cumsum(padded_E) // block_size
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)
    expert_B = jnp.minimum(jnp.searchsorted(block_end_E, blocks, side="right"), E - 1).astype(jnp.int32)
    dt = experts.dtype
    weights = tuple(None if w is None else w.astype(dt) for w in (experts.wi, experts.wo, experts.wi_gate))
    spec = (block_size, experts.activation, experts.dropout_rate)
    x_Rd = x_Rd.astype(dt)
    y_ENd, y_Od = _grouped_ffn(spec, x_Rd[:E * base].reshape(E, base, d), x_Rd[E * base:], weights, expert_B,
                               block_end_E[-1], experts.dropout_rng)
    return jnp.concatenate([y_ENd.reshape(E * base, d), y_Od])


def _dense_ffn(spec, x_ENd, wi, wo, wg, rng):
    _, activation, rate = spec
    gate_ENf = None if wg is None else jnp.einsum("ENd,Edf->ENf", x_ENd, wg)
    h_ENf = _hidden(jnp.einsum("ENd,Edf->ENf", x_ENd, wi), gate_ENf, rng, activation, rate)
    return jnp.einsum("ENf,Efd->ENd", h_ENf, wo)


def _block_ffn(spec, x_bd, wi_df, wo_fd, wg_df, rng):
    _, activation, rate = spec
    gate = None if wg_df is None else x_bd @ wg_df
    return _hidden(x_bd @ wi_df, gate, rng, activation, rate) @ wo_fd


def _block_rng(rng, i):
    return None if rng is None else jax.random.fold_in(rng, i + 1)


def _overflow_forward(spec, x_Od, weights, expert_B, num_used, rng):
    block_size = spec[0]
    wi, wo, wg = weights
    if x_Od.shape[0] == 0:  # no overflow possible (E = 1)
        return x_Od

    def body(i, y_Od):
        x_bd = jax.lax.dynamic_slice_in_dim(x_Od, i * block_size, block_size)
        e = expert_B[i]
        y_bd = _block_ffn(spec, x_bd, wi[e], wo[e], None if wg is None else wg[e], _block_rng(rng, i))
        return jax.lax.dynamic_update_slice_in_dim(y_Od, y_bd, i * block_size, axis=0)

    return jax.lax.fori_loop(0, num_used, body, jnp.zeros(x_Od.shape, x_Od.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grouped_ffn(spec, x_ENd, x_Od, weights, expert_B, num_used, rng):
    """(dense FFN of x_ENd [E, base, d], overflow FFN of x_Od [blocks * block_size, d]).

    The overflow is a loop over the used blocks only (a dynamic trip count): each block slices its
    expert's weights, keeps its [block, f] hidden in cache and writes its rows in place. Such a loop has
    no automatic reverse mode, so the VJP is written out: it takes the dense part's weight gradients and
    adds each overflow block's into them in place (recomputing the block's hidden), so no second
    full-size [E, d, f] gradient is zeroed, carried or summed.
    """
    y_ENd = _dense_ffn(spec, x_ENd, *weights, rng)
    return y_ENd, _overflow_forward(spec, x_Od, weights, expert_B, num_used, rng)


def _grouped_ffn_fwd(spec, x_ENd, x_Od, weights, expert_B, num_used, rng):
    y_ENd, dense_vjp = jax.vjp(lambda x, wi, wo, wg: _dense_ffn(spec, x, wi, wo, wg, rng), x_ENd, *weights)
    y_Od = _overflow_forward(spec, x_Od, weights, expert_B, num_used, rng)
    return (y_ENd, y_Od), (dense_vjp, x_Od, weights, expert_B, num_used, rng)


def _grouped_ffn_bwd(spec, residuals, cotangents):
    dense_vjp, x_Od, weights, expert_B, num_used, rng = residuals
    dy_ENd, dy_Od = cotangents
    block_size = spec[0]
    wi, wo, wg = weights
    dx_ENd, dwi, dwo, dwg = dense_vjp(dy_ENd)
    if x_Od.shape[0] == 0:
        return dx_ENd, x_Od, (dwi, dwo, dwg), None, None, None

    def body(i, grads):
        dx_Od, dwi, dwo, dwg = grads
        x_bd = jax.lax.dynamic_slice_in_dim(x_Od, i * block_size, block_size)
        dy_bd = jax.lax.dynamic_slice_in_dim(dy_Od, i * block_size, block_size)
        e = expert_B[i]
        block_fn = lambda x, a, b, c: _block_ffn(spec, x, a, b, c, _block_rng(rng, i))
        _, vjp = jax.vjp(block_fn, x_bd, wi[e], wo[e], None if wg is None else wg[e])
        dx_bd, dwi_e, dwo_e, dwg_e = vjp(dy_bd)
        dx_Od = jax.lax.dynamic_update_slice_in_dim(dx_Od, dx_bd, i * block_size, axis=0)
        return (dx_Od, dwi.at[e].add(dwi_e), dwo.at[e].add(dwo_e),
                None if wg is None else dwg.at[e].add(dwg_e))

    dx_Od, dwi, dwo, dwg = jax.lax.fori_loop(0, num_used, body, (jnp.zeros(x_Od.shape, x_Od.dtype), dwi, dwo, dwg))
    return dx_ENd, dx_Od, (dwi, dwo, dwg), None, None, None


_grouped_ffn.defvjp(_grouped_ffn_fwd, _grouped_ffn_bwd)
