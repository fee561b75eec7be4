"""Slow, obviously-correct NumPy MoE execution: fill expert buffers one (token, choice) at a time, run each
expert on its buffer row by row, read every kept assignment back and add it with its weight.

Asserts the dispatch invariants on the way: a kept assignment has a slot in [0, C) and no slot is used twice.
"""

import numpy as np


def activation_fn(name):
    relu = lambda h: np.maximum(h, 0.0)
    # tanh approximation, as jax.nn.gelu(approximate=True) (its default).
    gelu = lambda h: 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h ** 3)))
    silu = lambda h: h / (1.0 + np.exp(-h))
    return {"relu": relu, "gelu": gelu, "swiglu": silu, "geglu": gelu}[name]


def expert_ffn(x_d, e, wi, wo, wi_gate=None, activation="relu"):
    """One token through expert e, in float64."""
    act = activation_fn(activation)
    h = np.asarray(x_d, np.float64) @ np.asarray(wi[e], np.float64)
    if activation in ("swiglu", "geglu"):
        h = act(np.asarray(x_d, np.float64) @ np.asarray(wi_gate[e], np.float64)) * h
    else:
        h = act(h)
    return h @ np.asarray(wo[e], np.float64)


def moe_forward(x, expert_index, slot, weight, kept, *, num_experts, buffer_size, wi, wo, wi_gate=None,
                activation="relu"):
    """x [G, S, d]; routing fields [G, S, K] -> y [G, S, d] float64."""
    x = np.asarray(x, np.float64)
    expert_index, slot, weight, kept = (np.asarray(a) for a in (expert_index, slot, weight, kept))
    num_groups, group_size, num_choices = expert_index.shape
    d = x.shape[-1]
    y = np.zeros((num_groups, group_size, d))
    for g in range(num_groups):
        # Dispatch: buffer[e][c] = the token in slot c of expert e.
        buffer = [[None] * buffer_size for _ in range(num_experts)]
        for s in range(group_size):
            for k in range(num_choices):
                if not kept[g, s, k]:
                    assert weight[g, s, k] == 0, "a dropped assignment must have weight 0"
                    continue
                e, c = int(expert_index[g, s, k]), int(slot[g, s, k])
                assert 0 <= c < buffer_size, f"slot {c} outside [0, {buffer_size})"
                assert buffer[e][c] is None, f"slot {c} of expert {e} used twice"
                buffer[e][c] = s
        # Experts: each filled row through its own expert.
        out = [[None if buffer[e][c] is None else expert_ffn(x[g, buffer[e][c]], e, wi, wo, wi_gate, activation)
                for c in range(buffer_size)] for e in range(num_experts)]
        # Combine: every kept assignment reads its row back, scaled by its weight.
        for s in range(group_size):
            for k in range(num_choices):
                if kept[g, s, k]:
                    y[g, s] += float(weight[g, s, k]) * out[int(expert_index[g, s, k])][int(slot[g, s, k])]
    return y


def routing_forward(x, routing, **experts):
    """`moe_forward` on the fields of a moe_jax.routing.Routing."""
    return moe_forward(x, routing.expert_index, routing.slot, routing.weight, routing.kept,
                       num_experts=routing.num_experts, buffer_size=routing.buffer_size, **experts)
