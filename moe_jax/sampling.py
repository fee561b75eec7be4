"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus), jit-friendly.

    next_B = sampling.sample(logits_BV, rng, temperature=0.8, top_k=50, top_p=0.95)

`temperature=0` is greedy (argmax; `rng` unused). Otherwise logits are divided by the temperature, tokens
outside the `top_k` largest and outside the smallest set whose probability reaches `top_p` are removed (the
most likely token always stays), and one token is drawn from what is left.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def check(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """ValueError naming the argument for settings that cannot work."""
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] or None")


def filter_logits(logits_BV: Array, *, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Array:
    """The logits with every token outside the top-k / top-p set at -inf (float32)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None and top_p < 1:
        order_BV = jnp.argsort(-logits_BV, axis=-1)
        sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
        cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # keep a token if the probability mass before it is < top_p: the first token always stays
        keep_sorted_BV = (cumulative_BV - jax.nn.softmax(sorted_BV, axis=-1)) < top_p
        keep_BV = jnp.zeros_like(keep_sorted_BV).at[jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(
            keep_sorted_BV)
        logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
    return logits_BV


def sample(logits_BV: Array, rng: Optional[Array], *, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None) -> Array:
    """[B, V] logits -> [B] int32 token ids (see the module docstring)."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng (jax.random.key(seed))")
    filtered_BV = filter_logits(logits_BV.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, filtered_BV, axis=-1).astype(jnp.int32)
