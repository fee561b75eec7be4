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
               over block-padded overflow rows (grouped_ffn.py).

All three give the same output for the same Routing (to float tolerance): only kept assignments are
computed, and each comes back multiplied by its combine weight. With a capacity large enough that nothing
drops, dropless therefore equals the capacity paths. A dropped assignment contributes exactly 0.

Expert parallelism (a `jax.set_mesh` mesh whose 'expert' axis is > 1; groups arrive split over the batch
axes ('data', 'expert'), expert weights split on E over 'expert'): each device holds only its E / ep experts
and tokens travel by all-to-all over 'expert'. ``einsum`` pins its [E, G, C, d] buffer to 'expert' and lets
XLA's partitioner emit the all-to-alls. ``index`` and ``dropless`` run per device under `jax.shard_map`
with explicit `jax.lax.all_to_all`s (`_expert_parallel`): ``index`` sends each device's [E, G_local C, d]
buffer, split on E; ``dropless`` sends every kept assignment to the device of its expert in a [ep, A_local, d]
buffer (sized for the worst case, all to one device: dropless cannot bound the load; `ragged_all_to_all`
would avoid that padding on TPU / GPU), runs the grouped matmul over its local experts there, and sends the
rows back. Each kept assignment goes through the same expert matmuls as without a mesh, so the numbers are
those of the single-device path (up to the order of float sums inside a matmul).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import buffer_rows, grouped_ffn, sharding
from moe_jax.routing import Routing

# Logical axes of the [E, G, C, d] expert buffer: experts on 'expert', groups on what remains of the batch axes.
EXPERT_BUFFER_AXES = ("expert", "batch", None, "embed")
# The same buffer where the tokens live: groups over the batch axes ('data', 'expert'), every expert local.
TOKEN_BUFFER_AXES = (None, "batch", None, "embed")

Array = jax.Array

DISPATCHERS = ("einsum", "index", "dropless")
ACTIVATIONS = ("relu", "gelu", "swiglu", "geglu")


def check_dispatcher(name: str) -> str:
    if name not in DISPATCHERS:
        raise ValueError(f"dispatcher must be one of {DISPATCHERS}, got {name!r}")
    return name


def is_dropless(name: str) -> bool:
    """Whether dispatcher `name` serves every routed token, so routing runs with `capacity=None`."""
    return check_dispatcher(name) == "dropless"


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
        return grouped_ffn.hidden_units(h, gate, rng, self.activation, self.dropout_rate)


# --------------------------------------------------------------------------------------------- entry point


def apply_experts(
    name: str,
    x_GSd: Array,
    routing: Routing,
    experts: ExpertFFN,
    *,
    transport_dtype=None,
    grouped_matmul: Optional[str] = None,
    block_size: Optional[int] = None,
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
      block_size: rows per overflow block of the 'blocks' grouped matmul; None: `overflow_block_size`.

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
    grouped_matmul = grouped_matmul or default_grouped_matmul()
    if name == "index":
        local = _index_dispatch
    else:
        local = functools.partial(_dropless_dispatch, grouped_matmul=grouped_matmul, block_size=block_size)
    mesh = expert_parallel_mesh(routing.num_groups, routing.num_experts)
    if mesh is None:
        return local(x_GSd, routing, experts)
    if mesh.shape[EXPERT_AXIS] > 1 and name == "dropless":
        local = functools.partial(_dropless_expert_parallel, grouped_matmul=grouped_matmul, block_size=block_size)
    return _expert_parallel(local, x_GSd, routing, experts)


def computed_rows(name: str, routing: Routing, *, grouped_matmul: Optional[str] = None,
                  block_size: Optional[int] = None) -> Array:
    """Rows the expert FFNs run over for `routing` (a float32 scalar; goodput.py's denominator).

    einsum / index: every slot, E * G * C. dropless: 'ragged' the kept assignments; 'blocks' the E dense
    parts of A/E rows plus each expert's overflow in whole blocks (as `_expert_major_rows` lays them out,
    counted as on one device).
    """
    check_dispatcher(name)
    E = routing.num_experts
    if name != "dropless":
        return jnp.float32(E * routing.num_groups * routing.buffer_size)
    kept = jnp.sum(routing.kept)
    if (grouped_matmul or default_grouped_matmul()) == "ragged":
        return kept.astype(jnp.float32)
    base = routing.expert_index.size // E
    block_size = block_size or overflow_block_size(base)
    counts_E = jnp.zeros((E,), jnp.int32).at[routing.expert_index.reshape(-1)].add(
        routing.kept.reshape(-1).astype(jnp.int32))
    padded_E = -(-jnp.maximum(counts_E - base, 0) // block_size) * block_size
    return (E * base + jnp.sum(padded_E)).astype(jnp.float32)


def overflow_block_size(dense_rows: int) -> int:
    """Rows per overflow block of dropless 'blocks' when not given: 1/8 of an expert's dense rows, in [16, 64].
    Measured at T 4096, d 512, f 2048 (fwd + bwd, alternated): E 32 (128 dense rows) 4292 / 4628 / 4776 ms
    with blocks of 16 / 32 / 64, E 8 (512 rows) 3568 / 3640 / 3431 ms: padding costs more than loop trips
    when the dense part is short."""
    return min(64, max(16, dense_rows // 8))


def default_grouped_matmul() -> str:
    """'ragged' (jax.lax.ragged_dot) on TPU / GPU, 'blocks' on CPU where ragged_dot is dense over groups."""
    return "blocks" if jax.default_backend() == "cpu" else "ragged"


# --------------------------------------------------------------------------------------------- expert parallel

EXPERT_AXIS = "expert"


def expert_parallel_mesh(num_groups: int, num_experts: int):
    """The current `jax.set_mesh` mesh if index / dropless should run per device under `jax.shard_map`.

    That is when it has more than one device, E splits over 'expert' and the G groups over the batch axes;
    tokens are exchanged over 'expert' when that axis is > 1. With 'expert' = 1 (pure data parallelism) each
    device still dispatches only its own groups: left to the partitioner, the scatter into the global
    [E, G*C, d] buffer was computed on every device and all-reduced. Otherwise None (no mesh, notebooks,
    1-device runs: the single-device path).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(sharding.MESH_AXES) <= set(mesh.axis_names) or math.prod(mesh.shape.values()) == 1:
        return None
    groups = math.prod(mesh.shape[a] for a in _group_axes())
    if num_experts % mesh.shape[EXPERT_AXIS] or num_groups % groups:
        return None
    return mesh


def _group_axes() -> tuple[str, ...]:
    """Mesh axes the groups (the batch) are split over: ('data', 'expert')."""
    axes = sharding.logical_to_mesh(("batch",))[0]
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _expert_parallel(local_fn, x_GSd, routing, experts):
    """`local_fn(x_GSd, routing, experts)` on every device of the current mesh, under `jax.shard_map`.

    Each device gets its groups (split over ('data', 'expert') like the batch) and its E / ep experts (split
    over 'expert'; gathered over any other axis the kernels are split on, e.g. 'model' or FSDP's 'data').
    `local_fn` does its own all-to-alls over 'expert'. Expert dropout gets a different key per device.
    """
    P = jax.sharding.PartitionSpec
    groups = P(_group_axes())
    kernels = {k: v for k, v in (("wi", experts.wi), ("wo", experts.wo), ("wi_gate", experts.wi_gate))
               if v is not None}
    rng = experts.dropout_rng

    def local(x_GSd, routing, kernels, rng):
        # The kernels are the same on every 'data' device; mark them varying there like the tokens, so that
        # every value (and loop carry) of the local computation has one type. Its transpose sums the
        # kernels' gradients over 'data'.
        batch_only = tuple(a for a in _group_axes() if a != EXPERT_AXIS)
        kernels = {k: jax.lax.pcast(v, batch_only, to="varying") for k, v in kernels.items()}
        if rng is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(_group_axes()))
        return local_fn(x_GSd, routing, dataclasses.replace(experts, dropout_rng=rng, **kernels))

    return jax.shard_map(local, in_specs=(groups, groups, {k: P(EXPERT_AXIS) for k in kernels}, P()),
                         out_specs=groups)(x_GSd, routing, kernels, rng)


def _through_experts(experts, x_ENd, exchange: Optional[str]):
    """experts(x_ENd); with `exchange`, x_ENd [E, N, d] holds every expert's rows from this device and goes
    to the experts' devices and back: [E, N, d] -> [E/ep, ep*N, d] -> experts -> [E, N, d]."""
    if exchange is None:
        return experts(x_ENd)
    x_ENd = jax.lax.all_to_all(x_ENd, exchange, 0, 1, tiled=True)
    return jax.lax.all_to_all(experts(x_ENd), exchange, 1, 0, tiled=True)


# --------------------------------------------------------------------------------------------- einsum


def _einsum_dispatch(x_GSd, routing, experts, transport_dtype):
    with jax.named_scope("moe_dispatch"):  # the one-hot tensor's einsum
        stages = einsum_stages(x_GSd.shape, routing, experts, transport_dtype)
    return buffer_rows.run_stages(stages, x_GSd)


def einsum_stages(shape_GSd, routing, experts, transport_dtype=None) -> "buffer_rows.Stages":
    """The einsum dispatcher as stages: one-hot dispatch einsum -> experts -> one-hot combine einsum."""
    num_groups, _, d = shape_GSd
    E, C = routing.num_experts, routing.buffer_size
    dispatch_GSEC = routing.dispatch_mask()

    # Expert parallelism: groups arrive sharded over ('data', 'expert'); the experts' inputs must sit with
    # their weights, E over 'expert'. Pinning the buffer first where its tokens are (dispatch einsum local to
    # each device), then by expert, makes that re-layout one all-to-all; the reverse pair brings the outputs
    # back so the combine einsum is local too. With only the expert-side pin XLA all-gathers the dispatch
    # tensor and all-reduces the combined [G, S, d] activations instead (seen in the pod dry run's HLO).
    # All four pins are no-ops without a mesh.
    def send(x_GSd):
        td = x_GSd.dtype if transport_dtype is None else transport_dtype
        x_EGCd = jnp.einsum("GSEC,GSd->EGCd", dispatch_GSEC.astype(td), x_GSd.astype(td))
        x_EGCd = sharding.constrain(sharding.constrain(x_EGCd, TOKEN_BUFFER_AXES), EXPERT_BUFFER_AXES)
        return x_EGCd.reshape(E, num_groups * C, d)

    def combine(y_ENd, dtype):
        td = dtype if transport_dtype is None else transport_dtype
        y_EGCd = sharding.constrain(y_ENd.reshape(E, num_groups, C, d), EXPERT_BUFFER_AXES)
        y_EGCd = sharding.constrain(y_EGCd, TOKEN_BUFFER_AXES).astype(td)
        if routing.num_choices == 1:
            # One choice per token: read back with the 0/1 dispatch tensor and weight per token. Same numbers as
            # the combine tensor, but the weight gradient is a [G, S] product instead of a third GSEC einsum.
            y_GSd = jnp.einsum("GSEC,EGCd->GSd", dispatch_GSEC.astype(td), y_EGCd, preferred_element_type=jnp.float32)
            y_GSd = y_GSd * routing.weight[..., 0, None]
        else:
            y_GSd = jnp.einsum("GSEC,EGCd->GSd", routing.combine_tensor().astype(td), y_EGCd,
                               preferred_element_type=jnp.float32)
        return y_GSd.astype(dtype)

    return buffer_rows.Stages(send=send, compute=experts, combine=combine)


# --------------------------------------------------------------------------------------------- index


def _index_dispatch(x_GSd, routing, experts):
    """The [E, G*C, d] buffer by gathers; under `_expert_parallel` (experts holds E / ep of them) the buffer
    is exchanged with the experts' devices."""
    return buffer_rows.run_stages(index_stages(x_GSd.shape, routing, experts), x_GSd)


def index_stages(shape_GSd, routing, experts) -> "buffer_rows.Stages":
    """The index dispatcher as stages: slot rows -> gather into [E, G*C, d] -> experts -> gather back."""
    num_groups, group_size, d = shape_GSd
    E, C = routing.num_experts, routing.buffer_size
    num_rows = num_groups * C  # N
    # Row of every assignment in the flat buffer [E * N]; E * N (out of range) where dropped.
    g_GSK = jnp.arange(num_groups, dtype=jnp.int32)[:, None, None]
    row_GSK = routing.expert_index * num_rows + g_GSK * C + routing.slot
    rows = buffer_rows.BufferRows.of(jnp.where(routing.kept, row_GSK, E * num_rows), E * num_rows)
    exchange = None if experts.num_experts == E else EXPERT_AXIS
    return buffer_rows.Stages(send=lambda x_GSd: rows.to_buffer(x_GSd).reshape(E, num_rows, d),
                  compute=lambda x_ENd: _through_experts(experts, x_ENd, exchange),
                  combine=lambda y_ENd, dtype: rows.to_tokens(y_ENd.reshape(E * num_rows, d), routing.weight, dtype))


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


def _dropless_dispatch(x_GSd, routing, experts, grouped_matmul, block_size, dense_rows=None):
    """Kept assignments in expert-major rows, the expert FFN as a grouped matmul, back and weighted.

    'ragged': one ragged_dot per kernel over the exactly-sized expert runs.
    'blocks' (CPU): the first A/E rows of every expert (A = G*S*K; all of them under perfect balance) as
    one batched [E, A/E, d] FFN; rows beyond that, of overloaded experts, in blocks of `block_size` rows
    (`grouped_ffn.dense_and_blocks`). Empty
    dense rows of underloaded experts cost as much as the overflow, so the waste is about twice the
    imbalance, plus at most E * (block_size - 1) padding rows. `dense_rows` overrides A/E (the expected
    rows per expert when most assignments are empty padding, as in `_dropless_expert_parallel`).
    """
    stages = dropless_stages(x_GSd.shape, routing, experts, grouped_matmul, block_size, dense_rows)
    return buffer_rows.run_stages(stages, x_GSd)


def dropless_stages(shape_GSd, routing, experts, grouped_matmul, block_size,
                    dense_rows=None) -> "buffer_rows.Stages":
    """The dropless dispatcher as stages: expert-major rows -> gather -> grouped matmul -> gather back."""
    if grouped_matmul not in ("ragged", "blocks"):
        raise ValueError(f"grouped_matmul must be 'ragged' or 'blocks', got {grouped_matmul!r}")
    E = routing.num_experts
    base = 0 if grouped_matmul == "ragged" else routing.expert_index.size // E if dense_rows is None else dense_rows
    block_size = block_size or overflow_block_size(base)
    block = 1 if grouped_matmul == "ragged" else block_size
    row_GSK, over_E, padded_E, num_rows = _expert_major_rows(routing, block, base)
    rows = buffer_rows.BufferRows.of(row_GSK, num_rows)
    if grouped_matmul == "ragged":
        compute = lambda x_Rd: grouped_ffn.ragged(x_Rd, over_E, experts)
    else:
        compute = lambda x_Rd: grouped_ffn.dense_and_blocks(x_Rd, base, padded_E, experts, block_size)
    return buffer_rows.Stages(send=rows.to_buffer, compute=compute,
                  combine=lambda y_Rd, dtype: rows.to_tokens(y_Rd, routing.weight, dtype))


def _dropless_expert_parallel(x_GSd, routing, experts, grouped_matmul, block_size):
    """Dropless on one device of an expert-parallel mesh (inside `_expert_parallel`; `experts` holds this
    device's E_l = E / ep experts).

    The A = G*S*K local assignments go to their experts' devices: a send buffer [ep, A, d] where device j's
    block holds, in order, the kept assignments to its experts (A rows: enough if all go to one device).
    One all-to-all; the ep*A received rows go through the local grouped matmul as one dropless group routed
    to their local expert (weight 1, empty rows not kept); one all-to-all back; each assignment reads its row
    and is weighted and summed over its choices as on one device.
    """
    num_groups, group_size, d = x_GSd.shape
    E, E_l = routing.num_experts, experts.num_experts
    ep = E // E_l
    A = routing.expert_index.size
    kept_A = routing.kept.reshape(A)
    dest_A = jnp.where(kept_A, routing.expert_index.reshape(A) // E_l, ep)
    onehot_AJ = jax.nn.one_hot(dest_A, ep, dtype=jnp.int32)  # none for dropped (dest ep)
    pos_A = jnp.sum((jnp.cumsum(onehot_AJ, axis=0) - 1) * onehot_AJ, axis=1)
    row_A = jnp.where(kept_A, dest_A * A + pos_A, ep * A)
    num_tokens = num_groups * group_size
    token_A = jnp.arange(A, dtype=jnp.int32) // routing.num_choices
    token_of_row = jnp.full((ep * A,), num_tokens, jnp.int32).at[row_A].set(token_A, mode="drop",
                                                                            unique_indices=True)
    send_Rd = x_GSd.reshape(num_tokens, d).at[token_of_row].get(mode="fill", fill_value=0)
    # The local expert of each row, E_l for an empty one.
    send_R = jnp.full((ep * A,), E_l, jnp.int32).at[row_A].set(routing.expert_index.reshape(A) % E_l, mode="drop",
                                                             unique_indices=True)
    recv_Rd = jax.lax.all_to_all(send_Rd, EXPERT_AXIS, 0, 0, tiled=True)
    recv_R = jax.lax.all_to_all(send_R, EXPERT_AXIS, 0, 0, tiled=True)

    valid_R = recv_R < E_l
    expert_R = jnp.minimum(recv_R, E_l - 1)
    onehot_RE = jax.nn.one_hot(jnp.where(valid_R, recv_R, E_l), E_l, dtype=jnp.int32)
    slot_R = jnp.sum((jnp.cumsum(onehot_RE, axis=0) - 1) * onehot_RE, axis=1)
    local = Routing(expert_index=expert_R[None, :, None], slot=jnp.where(valid_R, slot_R, ep * A)[None, :, None],
                    weight=valid_R.astype(jnp.float32)[None, :, None], kept=valid_R[None, :, None],
                    num_experts=E_l, capacity=None)
    y_Rd = _dropless_dispatch(recv_Rd[None], local, experts, grouped_matmul, block_size,
                              dense_rows=A // E_l)[0]
    back_Rd = jax.lax.all_to_all(y_Rd, EXPERT_AXIS, 0, 0, tiled=True)
    y_GSKd = back_Rd.at[row_A].get(mode="fill", fill_value=0).reshape(*routing.expert_index.shape, d)
    y_GSd = jnp.einsum("GSKd,GSK->GSd", y_GSKd.astype(jnp.float32), routing.weight)
    return y_GSd.astype(x_GSd.dtype)
