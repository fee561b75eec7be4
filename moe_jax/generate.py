"""Text generation with a KV cache: prefill the prompts, then one token at a time.

    tokens_BT = generate.generate(model, config, prompt_BL, max_new_tokens=64, temperature=0.8, top_p=0.95,
                                  rng=jax.random.key(0), eos_id=1)

Prompts of different lengths share a batch: they are right-aligned (left padding, masked out of attention and
never routed), so every sequence writes its next key and value at the same cache slot. The cache holds every
attention layer's keys and values, [blocks, layers per block, B, T, H, k], carried through the scanned layer
stack. Prefill and the one-token step are each compiled once per (batch, cache length) bucket: the cache length
is the prompt length plus `max_new_tokens` rounded up to a multiple of `LENGTH_BUCKET`.

MoE layers decode in `decode` mode (moe.MoeLayer): the routing group is the batch's tokens of the current step
(the prompts' real tokens at prefill), with room for every token unless `model.moe.decode_capacity_factor` is
set, so a token's routing never depends on the other sequences of the batch.

Returns [B, P + max_new_tokens] ids (P the longest prompt): each prompt immediately followed by its
continuation, then pad ids (after a sequence's EOS, which is kept, and after shorter prompts). Generation
stops early when every sequence has ended.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import sampling

LENGTH_BUCKET = 64


def _as_rows(prompt_BL: Union[np.ndarray, Sequence[Sequence[int]]], pad_id: int) -> list[list[int]]:
    """Prompts as lists of ids: a list of lists, or an array right-padded with `pad_id`."""
    if isinstance(prompt_BL, (list, tuple)) and all(isinstance(p, (list, tuple, np.ndarray)) for p in prompt_BL):
        rows = [list(map(int, p)) for p in prompt_BL]
    else:
        array = np.asarray(prompt_BL)
        if array.ndim != 2:
            raise ValueError(f"prompt_BL must be [batch, length] token ids or a list of id lists, got shape "
                             f"{array.shape}")
        rows = []
        for row in array.tolist():
            while row and row[-1] == pad_id:
                row.pop()
            rows.append(row)
    if not rows or any(not row for row in rows):
        raise ValueError("every prompt needs at least one token (an empty prompt has nothing to condition on; "
                         "start it with the tokenizer's BOS or any text)")
    return rows


def _bucket(length: int) -> int:
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


def generate(model: nnx.Module, config, prompt_BL, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, rng: Optional[jax.Array] = None,
             eos_id: Optional[int] = None, pad_id: int = 0, trace: bool = False):
    """Prompt ids [B, L] (right-padded with `pad_id`, or a list of id lists) -> [B, P + max_new_tokens] ids:
    each prompt followed by its continuation, then pads. See the module docstring.

    With `trace=True` returns (tokens_BT, trace): the routing of every token the model read (the prompt and
    every generated token but the last), aligned with tokens_BT: `expert_index` and `weight`
    [MoE layers, B, T, K] and `recorded` [B, T] bool. `model(tokens_BT, replay=(expert_index, weight))`
    replays it (router replay)."""
    sampling.check(temperature, top_k, top_p)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if temperature > 0 and rng is None:
        raise ValueError("temperature > 0 needs rng=jax.random.key(seed)")
    rows = _as_rows(prompt_BL, pad_id)
    B, P = len(rows), max(len(r) for r in rows)
    vocab = config.model.vocab_size
    bad = [t for r in rows for t in r if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
    T = _bucket(P + max_new_tokens)
    pads = np.asarray([P - len(r) for r in rows], np.int32)
    prompt = np.full((B, P), pad_id, np.int32)
    for b, row in enumerate(rows):
        prompt[b, pads[b]:] = row
    valid_BT = np.zeros((B, T), bool)
    valid_BT[:, P:] = True
    for b in range(B):
        valid_BT[b, pads[b]:P] = True

    graphdef, state = nnx.split(model)
    decode_cf = config.model.moe.get("decode_capacity_factor", None) if "moe" in config.model else None
    cache = model.init_cache(B, T)
    logits_BV, cache, routed = _prefill(graphdef, state, cache, jnp.asarray(prompt), jnp.asarray(pads),
                                        jnp.asarray(valid_BT), decode_cf, trace)
    lengths = np.asarray([len(r) for r in rows])
    recorder = _TraceRecorder(routed, pads, lengths, P + max_new_tokens) if trace else None
    out = np.full((B, max_new_tokens), pad_id, np.int32)
    done = np.zeros(B, bool)
    keys = jax.random.split(rng, max_new_tokens) if rng is not None else [None] * max_new_tokens
    for i in range(max_new_tokens):
        token_B = np.asarray(sampling.sample(logits_BV, keys[i], temperature=temperature, top_k=top_k,
                                             top_p=top_p))
        token_B = np.where(done, pad_id, token_B)
        out[:, i] = token_B
        real_B = ~done  # this token is part of its sequence (an EOS too); pads after an EOS are not
        if eos_id is not None:
            done |= token_B == eos_id
        if done.all() or i == max_new_tokens - 1:
            break
        logits_BV, cache, routed = _step(graphdef, state, cache, jnp.asarray(token_B[:, None]),
                                         jnp.asarray(P + i, jnp.int32), jnp.asarray(P + i - pads, jnp.int32),
                                         jnp.asarray(valid_BT), decode_cf, trace)
        if recorder is not None:
            recorder.add_step(routed, lengths + i, real_B)
    tokens_BT = np.full((B, P + max_new_tokens), pad_id, np.int32)
    for b, row in enumerate(rows):
        tokens_BT[b, :len(row) + max_new_tokens] = row + out[b].tolist()
    return (tokens_BT, recorder.result()) if trace else tokens_BT


class _TraceRecorder:
    """Collects each MoE layer's routing of every token read, in the coordinates of the returned tokens."""

    def __init__(self, routed, pads, lengths, length):
        index = np.asarray(routed["expert_index"])  # [layers, B, P, K], prompts right-aligned in the cache
        num_layers, B, _, K = index.shape
        self.expert_index = np.zeros((num_layers, B, length, K), np.int32)
        self.weight = np.zeros((num_layers, B, length, K), np.float32)
        self.recorded = np.zeros((B, length), bool)
        weight = np.asarray(routed["routing_weight"])
        for b in range(B):
            n = int(lengths[b])
            self.expert_index[:, b, :n] = index[:, b, pads[b]:]
            self.weight[:, b, :n] = weight[:, b, pads[b]:]
            self.recorded[b, :n] = True

    def add_step(self, routed, positions_B, read_B):
        index, weight = np.asarray(routed["expert_index"]), np.asarray(routed["routing_weight"])
        for b in np.flatnonzero(read_B):
            self.expert_index[:, b, positions_B[b]] = index[:, b, 0]
            self.weight[:, b, positions_B[b]] = weight[:, b, 0]
            self.recorded[b, positions_B[b]] = True

    def result(self) -> dict:
        return dict(expert_index=self.expert_index, weight=self.weight, recorded=self.recorded)


def decode_mask(valid_BT: jax.Array, query_slots_BL: jax.Array) -> jax.Array:
    """[B, 1, L, T] bool: query at cache slot s sees valid keys at slots <= s."""
    T = valid_BT.shape[1]
    causal_BLT = jnp.arange(T)[None, None, :] <= query_slots_BL[:, :, None]
    return (causal_BLT & valid_BT[:, None, :])[:, None]


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(2,))
def _prefill(graphdef, state, cache, prompt_BP, pads_B, valid_BT, decode_cf, trace):
    model = nnx.merge(graphdef, state)
    B, P = prompt_BP.shape
    slots_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    positions_BP = jnp.maximum(slots_BP - pads_B[:, None], 0)
    real_BP = slots_BP >= pads_B[:, None]
    logits_BPV, cache, aux = model.decode(prompt_BP, positions_BL=positions_BP,
                                          mask_B1LT=decode_mask(valid_BT, slots_BP), padding_mask_BL=real_BP,
                                          cache=cache, index=jnp.zeros((), jnp.int32),
                                          decode_capacity_factor=decode_cf, return_routing=trace)
    return logits_BPV[:, -1], cache, _routing(aux, trace)


def _routing(aux, trace):
    if not trace:
        return None
    if "expert_index" not in aux:
        raise ValueError("trace=True: this model has no MoE layer, so there is no routing to trace")
    return {key: aux[key] for key in ("expert_index", "routing_weight")}


@functools.partial(jax.jit, static_argnums=(0, 7, 8), donate_argnums=(2,))
def _step(graphdef, state, cache, token_B1, index, positions_B, valid_BT, decode_cf, trace):
    model = nnx.merge(graphdef, state)
    B = token_B1.shape[0]
    slots_B1 = jnp.full((B, 1), index, jnp.int32)
    logits_B1V, cache, aux = model.decode(token_B1, positions_BL=positions_B[:, None],
                                          mask_B1LT=decode_mask(valid_BT, slots_B1),
                                          padding_mask_BL=jnp.ones((B, 1), bool), cache=cache, index=index,
                                          decode_capacity_factor=decode_cf, return_routing=trace)
    return logits_B1V[:, -1], cache, _routing(aux, trace)
