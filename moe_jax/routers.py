"""One home per router: its parameters, its routing function, its flags, its config checks and its optional
after-step update. `MoeLayer`, `config_validation` and the trainer (through `moe.after_step`) all read `REGISTRY`.

    routers.NAMES                       # ('top_k', 'expert_choice', 'hash', 'noisy_top_k', 'bias_balanced')
    spec = routers.get("bias_balanced")
    spec.causal, spec.needs_token_ids, spec.after_step is not None    # True, False, True

The math stays in routing.py (pure functions of arrays); an entry here says which of those functions a router
calls, with which of the layer's variables and settings. A new router is one `Router(...)` in `REGISTRY`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import routing

Array = jax.Array


class BalancingBias(nnx.Variable):
    """DeepSeek-V3 per-expert selection bias: not a Param, changed only by the after-step update."""


class HashTable(nnx.Variable):
    """Fixed token-id -> expert map of the hash router (never trained)."""


@dataclasses.dataclass(frozen=True)
class Router:
    """A router. `layer` in the signatures below is the `MoeLayer` that holds the router's variables and
    settings (`num_experts`, `k`, capacity factors, `min_capacity`, `normalize`, `batch_prioritized`,
    `jitter`, `rng`, `router_dtype`).

    Fields:
      name: the value of `MoeLayer(router=...)` and `model.moe.router`.
      make_params: `(new_kernel, *, d_model, num_experts, vocab_size) -> {attribute: nnx.Variable}`, set on
        the layer before the experts are made. `new_kernel(shape, logical_names)` draws a Switch-initialised
        Param from the layer's params stream: the order of those draws is part of "same seed, same weights".
      route: `(layer, x_GSd, *, mask_GS, token_ids_GS, capacity, deterministic)` -> (Routing, router
        probabilities [G, S, E] float32, {name: scalar}: at least `load_balancing_loss`, `router_z_loss`,
        `router_max_logit`). `capacity` is None under a dropless dispatcher.
      causal: a token's expert and slot depend only on earlier tokens of its group, at k=1 in token order
        (no `batch_prioritized`) or dropless; see routing.py. False: it looks at later tokens (encoders and
        ablations only).
      needs_token_ids: `route` reads `token_ids_GS`, so the layer's call must be given `token_ids`.
      draws_rng: `route` draws from `layer.rng` in training (router noise), so the layer must hold a stream.
      check_config: `(moe_cfg) -> None`; raises ValueError naming the `model.moe.*` key this router cannot
        work with (called by config_validation).
      after_step: `(layer, aux) -> None` or None: an update outside the gradient after each optimizer step;
        `aux` is the layer's aux of that step (`expert_load` ...). Applied by `moe.after_step`.
    """

    name: str
    make_params: Callable[..., dict[str, nnx.Variable]]
    route: Callable[..., tuple[routing.Routing, Array, dict[str, Array]]]
    causal: bool
    needs_token_ids: bool = False
    draws_rng: bool = False
    check_config: Callable[[Any], None] = lambda moe_cfg: None
    after_step: Optional[Callable[[Any, dict], None]] = None


# --------------------------------------------------------------------------------------------- parameters


def _router_kernel(new_kernel, *, d_model, num_experts, vocab_size):
    del vocab_size
    return {"router_kernel": new_kernel((d_model, num_experts), ("embed", None))}


def _noisy_params(new_kernel, *, d_model, num_experts, vocab_size):
    params = _router_kernel(new_kernel, d_model=d_model, num_experts=num_experts, vocab_size=vocab_size)
    # Shazeer et al. 2017 start the noise kernel at zero: softplus(0) = 0.69 noise, no signal.
    params["noise_kernel"] = nnx.Param(jnp.zeros((d_model, num_experts), jnp.float32),
                                       out_sharding=("embed", None), eager_sharding=False)
    return params


def _bias_params(new_kernel, *, d_model, num_experts, vocab_size):
    params = _router_kernel(new_kernel, d_model=d_model, num_experts=num_experts, vocab_size=vocab_size)
    params["selection_bias"] = BalancingBias(jnp.zeros((num_experts,), jnp.float32), out_sharding=(None,),
                                             eager_sharding=False)
    return params


def _hash_params(new_kernel, *, d_model, num_experts, vocab_size):
    del new_kernel, d_model
    if not vocab_size:
        raise ValueError("router='hash' needs vocab_size (the token-id -> expert table size)")
    return {"hash_table": HashTable(jnp.asarray(routing.hash_expert_table(vocab_size, num_experts)))}


# --------------------------------------------------------------------------------------------- routing


def router_logits(layer, x_GSd: Array, kernel_dE: Array) -> Array:
    """[G, S, d] x [d, E] -> [G, S, E] float32, the matmul in `layer.router_dtype` (selective precision)."""
    rdt = layer.router_dtype
    logits = jnp.einsum("GSd,dE->GSE", x_GSd.astype(rdt), kernel_dE.astype(rdt))
    return logits.astype(jnp.float32)


def _learned_logits(layer, x_GSd, mask_GS, deterministic):
    """What every learned router starts with -> (router inputs, logits, probabilities, losses so far)."""
    router_in_GSd = x_GSd
    if not deterministic and layer.jitter > 0:
        router_in_GSd = routing.jitter(x_GSd, layer.rng(), layer.jitter)
    logits_GSE = router_logits(layer, router_in_GSd, layer.router_kernel[...])
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    losses = {"load_balancing_loss": jnp.zeros((), jnp.float32),
              "router_z_loss": routing.router_z_loss(logits_GSE, mask_GS),
              "router_max_logit": _max_abs(logits_GSE, mask_GS)}  # what the z-loss keeps small
    return router_in_GSd, logits_GSE, probs_GSE, losses


def _with_balancing_loss(route, probs_GSE, mask_GS, losses):
    losses["load_balancing_loss"] = routing.load_balancing_loss(probs_GSE, route.expert_index, mask_GS)
    return route, probs_GSE, losses


def _top_k_with_bias(layer, x_GSd, mask_GS, capacity, deterministic, selection_bias):
    _, logits_GSE, probs_GSE, losses = _learned_logits(layer, x_GSd, mask_GS, deterministic)
    route = routing.route_top_k(logits_GSE, k=layer.k, capacity=capacity, batch_prioritized=layer.batch_prioritized,
                                normalize=layer.normalize, padding_mask=mask_GS, selection_bias=selection_bias)
    return _with_balancing_loss(route, probs_GSE, mask_GS, losses)


def _route_top_k(layer, x_GSd, *, mask_GS, token_ids_GS, capacity, deterministic):
    del token_ids_GS
    return _top_k_with_bias(layer, x_GSd, mask_GS, capacity, deterministic, None)


def _route_bias_balanced(layer, x_GSd, *, mask_GS, token_ids_GS, capacity, deterministic):
    del token_ids_GS
    return _top_k_with_bias(layer, x_GSd, mask_GS, capacity, deterministic, layer.selection_bias[...])


def _route_noisy_top_k(layer, x_GSd, *, mask_GS, token_ids_GS, capacity, deterministic):
    del token_ids_GS
    router_in_GSd, logits_GSE, probs_GSE, losses = _learned_logits(layer, x_GSd, mask_GS, deterministic)
    stddev_GSE = jax.nn.softplus(router_logits(layer, router_in_GSd, layer.noise_kernel[...]))
    route, noisy_losses = routing.route_noisy_top_k(
        logits_GSE, stddev_GSE, k=layer.k, capacity=capacity, rng=None if deterministic else layer.rng(),
        padding_mask=mask_GS)
    losses.update(noisy_losses)
    return _with_balancing_loss(route, probs_GSE, mask_GS, losses)


def _route_expert_choice(layer, x_GSd, *, mask_GS, token_ids_GS, capacity, deterministic):
    """No load-balancing loss: every expert takes exactly its capacity. The capacity is the expert's own
    (k tokens per token on average), also under a dropless dispatcher, capped at the group size."""
    del token_ids_GS, capacity
    _, logits_GSE, probs_GSE, losses = _learned_logits(layer, x_GSd, mask_GS, deterministic)
    S = x_GSd.shape[1]
    capacity = min(S, layer.slots_per_expert(S, deterministic))
    return routing.route_expert_choice(logits_GSE, capacity=capacity, padding_mask=mask_GS), probs_GSE, losses


def _route_hash(layer, x_GSd, *, mask_GS, token_ids_GS, capacity, deterministic):
    del x_GSd, deterministic
    E = layer.num_experts
    route = routing.route_hash(token_ids_GS, expert_of_token=layer.hash_table[...], num_experts=E,
                               capacity=capacity, padding_mask=mask_GS)
    # No learned router: the "probabilities" are the fixed choice, and there is nothing to balance.
    probs_GSE = jax.nn.one_hot(route.expert_index[..., 0], E, dtype=jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    return route, probs_GSE, {"load_balancing_loss": zero, "router_z_loss": zero, "router_max_logit": zero}


def _max_abs(x_GSE: Array, mask_GS: Optional[Array]) -> Array:
    """Largest |router logit| over real tokens (a metric, no gradient)."""
    real_GS1 = jnp.ones(x_GSE.shape[:2] + (1,), bool) if mask_GS is None else mask_GS[..., None]
    return jax.lax.stop_gradient(jnp.max(jnp.where(real_GS1, jnp.abs(x_GSE), 0.0)))


# --------------------------------------------------------------------------------------------- config, after step


def _check_hash_config(moe_cfg) -> None:
    # The table holds one expert per token id.
    if moe_cfg.k != 1:
        raise ValueError(f"model.moe.k={moe_cfg.k} must be 1 for model.moe.router='hash'")


def update_selection_bias(layer, expert_load: Array) -> None:
    """bias_balanced: `bias -= bias_update_rate * sign(load - mean load)`, per layer of a stack.

    `expert_load` has the bias's shape ([E], or [layers, E] for a layer stack made by nnx.vmap).
    """
    bias = layer.selection_bias[...]
    load = jnp.asarray(expert_load)
    if load.shape != bias.shape:
        raise ValueError(f"expert_load must have the bias shape {bias.shape}, got {load.shape}")
    E = layer.num_experts
    update = jax.vmap(lambda b, l: routing.update_balancing_bias(b, l, layer.bias_update_rate))
    layer.selection_bias[...] = update(bias.reshape(-1, E), load.reshape(-1, E)).reshape(bias.shape)


# --------------------------------------------------------------------------------------------- registry


REGISTRY: dict[str, Router] = {spec.name: spec for spec in (
    Router("top_k", _router_kernel, _route_top_k, causal=True),
    Router("expert_choice", _router_kernel, _route_expert_choice, causal=False),
    Router("hash", _hash_params, _route_hash, causal=True, needs_token_ids=True,
           check_config=_check_hash_config),
    Router("noisy_top_k", _noisy_params, _route_noisy_top_k, causal=True, draws_rng=True),
    Router("bias_balanced", _bias_params, _route_bias_balanced, causal=True,
           after_step=lambda layer, aux: update_selection_bias(layer, aux["expert_load"])),
)}
NAMES = tuple(REGISTRY)


def get(name: str) -> Router:
    """The registered router called `name`; ValueError listing the names otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"router must be one of {NAMES}, got {name!r}")
    return REGISTRY[name]
