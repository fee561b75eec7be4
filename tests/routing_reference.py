"""Slow, obviously-correct NumPy routing: one token and one choice at a time, in plain loops.

Each function returns per-token arrays in the same layout as `moe_jax.routing.Routing`
(expert_index, slot, weight, kept: [G, S, K]) so tests compare them field by field.
"""

import numpy as np


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def top_k_choices(scores, k):
    """[G, S, K] experts in descending score, ties broken by lower expert id (as lax.top_k does)."""
    num_groups, group_size, _ = scores.shape
    choices = np.zeros((num_groups, group_size, k), np.int64)
    for g in range(num_groups):
        for s in range(group_size):
            ranked = sorted(range(scores.shape[-1]), key=lambda e: (-scores[g, s, e], e))
            choices[g, s] = ranked[:k]
    return choices


def route_top_k(logits, *, k, capacity, batch_prioritized=False, normalize=False, padding_mask=None,
                selection_bias=None):
    probs = softmax(np.asarray(logits, np.float32))
    num_groups, group_size, num_experts = probs.shape
    real = np.ones((num_groups, group_size), bool) if padding_mask is None else np.asarray(padding_mask, bool)
    scores = probs if selection_bias is None else probs + np.asarray(selection_bias)
    choices = top_k_choices(scores, k)
    weights = np.take_along_axis(probs, choices, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    buffer_size = group_size if capacity is None else capacity

    slot = np.full((num_groups, group_size, k), buffer_size, np.int64)
    kept = np.zeros((num_groups, group_size, k), bool)
    for g in range(num_groups):
        if batch_prioritized:
            token_order = sorted(range(group_size), key=lambda s: (-probs[g, s].max(), s))
        else:
            token_order = list(range(group_size))
        filled = [0] * num_experts
        for choice in range(k):  # every token's first choice before any token's second choice
            for s in token_order:
                if not real[g, s]:
                    continue
                expert = choices[g, s, choice]
                if filled[expert] < buffer_size:
                    slot[g, s, choice] = filled[expert]
                    kept[g, s, choice] = True
                    filled[expert] += 1
    return choices, slot, np.where(kept, weights, 0.0), kept


def route_expert_choice(logits, *, capacity, padding_mask=None):
    probs = softmax(np.asarray(logits, np.float32))
    num_groups, group_size, num_experts = probs.shape
    real = np.ones((num_groups, group_size), bool) if padding_mask is None else np.asarray(padding_mask, bool)
    slot = np.full((num_groups, group_size, num_experts), capacity, np.int64)
    kept = np.zeros((num_groups, group_size, num_experts), bool)
    for g in range(num_groups):
        for e in range(num_experts):
            candidates = [s for s in range(group_size) if real[g, s]]
            ranked = sorted(candidates, key=lambda s: (-probs[g, s, e], s))
            for position, s in enumerate(ranked[:capacity]):
                slot[g, s, e] = position
                kept[g, s, e] = True
    choices = np.broadcast_to(np.arange(num_experts), slot.shape)
    return choices, slot, np.where(kept, probs, 0.0), kept


def load_balancing_loss(probs, choices, padding_mask=None):
    probs = np.asarray(probs, np.float64)
    num_groups, group_size, num_experts = probs.shape
    real = np.ones((num_groups, group_size), bool) if padding_mask is None else np.asarray(padding_mask, bool)
    per_group = []
    for g in range(num_groups):
        tokens = [s for s in range(group_size) if real[g, s]]
        n = max(len(tokens), 1)
        fraction = [sum(e in choices[g, s] for s in tokens) / n for e in range(num_experts)]
        mean_prob = [sum(probs[g, s, e] for s in tokens) / n for e in range(num_experts)]
        per_group.append(num_experts * sum(f * p for f, p in zip(fraction, mean_prob)))
    return float(np.mean(per_group))


def router_z_loss(logits, padding_mask=None):
    logits = np.asarray(logits, np.float64)
    real = np.ones(logits.shape[:2], bool) if padding_mask is None else np.asarray(padding_mask, bool)
    values = [np.log(np.exp(logits[g, s]).sum()) ** 2 for g, s in zip(*np.nonzero(real))]
    return float(np.mean(values)) if values else 0.0
