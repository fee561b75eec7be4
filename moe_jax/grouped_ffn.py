"""The dropless dispatcher's grouped matmuls: every expert's FFN over its rows of an expert-major buffer.

    y_Rd = ragged(x_Rd, rows_E, experts)                                  # jax.lax.ragged_dot (TPU / GPU)
    y_Rd = dense_and_blocks(x_Rd, base, padded_E, experts, block_size)    # CPU: see dense_and_blocks

`experts` is a `dispatch.ExpertFFN` (stacked [E, d, f] / [E, f, d] kernels, activation, expert dropout);
`dispatch.py` arranges the rows (`_expert_major_rows`) and moves them back to token order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def hidden_units(h, gate, rng, activation, dropout_rate):
    """The experts' activation (gated where `gate` is given) and dropout on their hidden units."""
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


def ragged(x_Rd, rows_E, experts):
    """Expert FFN on expert-major rows with jax.lax.ragged_dot (rows past sum(rows_E) give 0)."""
    dt = experts.dtype
    x_Rd = x_Rd.astype(dt)
    h_Rf = jax.lax.ragged_dot(x_Rd, experts.wi.astype(dt), rows_E)
    gate_Rf = None if experts.wi_gate is None else jax.lax.ragged_dot(x_Rd, experts.wi_gate.astype(dt), rows_E)
    h_Rf = experts.hidden(h_Rf, gate_Rf, experts.dropout_rng)
    return jax.lax.ragged_dot(h_Rf, experts.wo.astype(dt), rows_E)


def dense_and_blocks(x_Rd, base, padded_E, experts, block_size):
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
    y_ENd, y_Od = _grouped_expert_ffn(spec, x_Rd[:E * base].reshape(E, base, d), x_Rd[E * base:], weights, expert_B,
                               block_end_E[-1], experts.dropout_rng)
    return jnp.concatenate([y_ENd.reshape(E * base, d), y_Od])


def _dense_ffn(spec, x_ENd, wi, wo, wg, rng):
    _, activation, rate = spec
    gate_ENf = None if wg is None else jnp.einsum("ENd,Edf->ENf", x_ENd, wg)
    h_ENf = hidden_units(jnp.einsum("ENd,Edf->ENf", x_ENd, wi), gate_ENf, rng, activation, rate)
    return jnp.einsum("ENf,Efd->ENd", h_ENf, wo)


def _block_ffn(spec, x_bd, wi_df, wo_fd, wg_df, rng):
    _, activation, rate = spec
    gate = None if wg_df is None else x_bd @ wg_df
    return hidden_units(x_bd @ wi_df, gate, rng, activation, rate) @ wo_fd


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

    return jax.lax.fori_loop(0, num_used, body, jnp.zeros_like(x_Od))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grouped_expert_ffn(spec, x_ENd, x_Od, weights, expert_B, num_used, rng):
    """(dense FFN of x_ENd [E, base, d], overflow FFN of x_Od [blocks * block_size, d]).

    The overflow is a loop over the used blocks only (a dynamic trip count): each block slices its
    expert's weights, keeps its [block, f] hidden in cache and writes its rows in place. Such a loop has
    no automatic reverse mode, so the VJP is written out: it takes the dense part's weight gradients and
    adds each overflow block's into them in place (recomputing the block's hidden), so no second
    full-size [E, d, f] gradient is zeroed, carried or summed.
    """
    y_ENd = _dense_ffn(spec, x_ENd, *weights, rng)
    return y_ENd, _overflow_forward(spec, x_Od, weights, expert_B, num_used, rng)


def _grouped_expert_ffn_fwd(spec, x_ENd, x_Od, weights, expert_B, num_used, rng):
    y_ENd, dense_vjp = jax.vjp(lambda x, wi, wo, wg: _dense_ffn(spec, x, wi, wo, wg, rng), x_ENd, *weights)
    y_Od = _overflow_forward(spec, x_Od, weights, expert_B, num_used, rng)
    return (y_ENd, y_Od), (dense_vjp, x_Od, weights, expert_B, num_used, rng)


def _grouped_expert_ffn_bwd(spec, residuals, cotangents):
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

    dx_Od, dwi, dwo, dwg = jax.lax.fori_loop(0, num_used, body, (jnp.zeros_like(x_Od), dwi, dwo, dwg))
    return dx_ENd, dx_Od, (dwi, dwo, dwg), None, None, None


_grouped_expert_ffn.defvjp(_grouped_expert_ffn_fwd, _grouped_expert_ffn_bwd)
