"""Looking inside a trained MoE model: where tokens go, which experts idle, what each expert prefers.

    routed = analysis.collect(model, batches)                    # every real token's routing, per MoE layer
    analysis.collect_stacks(model, batches)                      # {stack: Routed}, e.g. encoder and decoder
    analysis.expert_load(routed)                                 # [layers, E] share of kept assignments
    analysis.dead_experts(routed)                                # per layer: experts under 10% of a fair share
    analysis.dropped_fraction(routed, capacity_factor=1.25)      # [layers], recomputed at any capacity
    analysis.token_preferences(routed, top=8)                    # per layer and expert: tokens by lift
    analysis.token_determinism(routed)                           # is the choice a function of the token id?
    analysis.domain_expert_counts(routed, num_domains)           # synthetic corpus: [layers, D, E] + I(D; E)
    analysis.router_drift(model_a, model_b, batches)             # [layers] share of tokens whose top-1 moved

`collect` runs the model's own forward pass with `return_routing=True` (no dropout, eval capacity), so what
is analysed is what the model does. `python -m moe_jax.analyze` (moe_jax/analyze.py) writes all of it as PNG
plots and a markdown summary for a run directory.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import routing


@dataclasses.dataclass
class Routed:
    """Every real token of the analysed batches, flattened in order (N tokens), and its routing."""

    expert_index: np.ndarray  # [layers, N, K] int32, the router's choices (before capacity)
    weight: np.ndarray  # [layers, N, K] float32 combine weight (0 where dropped at the eval capacity)
    token_ids: np.ndarray  # [N] int32
    domains: Optional[np.ndarray]  # [N] int32 synthetic-corpus domain, or None
    group_of: np.ndarray  # [N] int64: the routing group each token belonged to (batch, group)
    router_entropy: np.ndarray  # [layers] mean over the batches
    num_experts: int
    group_size: int

    @property
    def num_layers(self) -> int:
        return self.expert_index.shape[0]

    @property
    def top1(self) -> np.ndarray:
        return self.expert_index[..., 0]


# The MoE stacks of each model family in the order they run: stack attribute -> (its batch keys' prefix, its
# key in the model's aux)
STACKS = {"decoder": {"blocks": ("", None)},
           "encdec": {"encoder_blocks": ("encoder_", "encoder"), "decoder_blocks": ("decoder_", "decoder")}}


def collect(model, batches: Iterable[dict]) -> Routed:
    """Run `model` (a decoder with MoE layers) over LM batches (`inputs`, `segment_ids`, `positions`, optional
    `domains`) and keep every real token's routing."""
    from moe_jax import models

    if models.name_of(model.config) != "decoder":
        raise ValueError(f"analysis.collect reads decoder-only models; for model.name="
                         f"{models.name_of(model.config)!r} use collect_stacks (one Routed per stack)")
    return collect_stacks(model, batches)["blocks"]


def collect_stacks(model, batches: Iterable[dict]) -> dict[str, Routed]:
    """{MoE stack: every real token's routing in it}: the decoder's `blocks`, or the encoder-decoder's
    `encoder_blocks` (encoder tokens) and `decoder_blocks` (decoder tokens), from the model's own forward pass
    over its family's batches (LM or span corruption)."""
    from flax import nnx

    from moe_jax import models

    cfg = model.config
    if not cfg.moe.num_experts:
        raise ValueError("analysis needs an MoE model (model.moe.num_experts > 0); this one is dense")
    family = models.name_of(cfg)
    if family not in STACKS:
        raise ValueError(f"analysis: model.name={family!r} has no known MoE stacks ({sorted(STACKS)})")
    stacks = STACKS[family]
    graphdef, state = nnx.split(model)
    forward = jax.jit(functools.partial(_forward if family == "decoder" else _encdec_forward, graphdef))
    parts = {stack: dict(index=[], weight=[], tokens=[], domains=[], groups=[], entropy=[]) for stack in stacks}
    group_sizes = {stack: cfg.moe.group_size for stack in stacks}
    if family == "encdec" and cfg.moe.get("decoder_group_size"):
        group_sizes["decoder_blocks"] = cfg.moe.decoder_group_size
    for b, batch in enumerate(batches):
        aux_all = forward(state, {k: jnp.asarray(v) for k, v in batch.items() if k != "domains"})
        for stack, (prefix, aux_key) in stacks.items():
            aux, part = aux_all if aux_key is None else aux_all[aux_key], parts[stack]
            real = np.asarray(batch[prefix + "segment_ids"]) > 0
            part["index"].append(np.asarray(aux["expert_index"])[:, real])
            part["weight"].append(np.asarray(aux["routing_weight"])[:, real])
            part["tokens"].append(np.asarray(batch[prefix + "inputs"])[real])
            if "domains" in batch and not prefix:
                part["domains"].append(np.asarray(batch["domains"])[real])
            flat_position = np.arange(real.size).reshape(real.shape)
            part["groups"].append(b * 1_000_000_007 + flat_position[real] // group_sizes[stack])
            part["entropy"].append(np.asarray(aux["router_entropy"]))
    if not parts[next(iter(stacks))]["index"]:
        raise ValueError("analysis: no batches to analyse")
    return {stack: Routed(np.concatenate(p["index"], axis=1), np.concatenate(p["weight"], axis=1),
                          np.concatenate(p["tokens"]), np.concatenate(p["domains"]) if p["domains"] else None,
                          np.concatenate(p["groups"]), np.mean(p["entropy"], axis=0), cfg.moe.num_experts,
                          group_sizes[stack])
            for stack, p in parts.items()}


def _forward(graphdef, state, batch):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    _, aux = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                   deterministic=True, return_routing=True)
    return aux


def _encdec_forward(graphdef, state, batch):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    _, aux = model(batch["encoder_inputs"], batch["decoder_inputs"], encoder_segment_ids=batch["encoder_segment_ids"],
                   decoder_segment_ids=batch["decoder_segment_ids"], encoder_positions=batch["encoder_positions"],
                   decoder_positions=batch["decoder_positions"], deterministic=True, return_routing=True)
    return aux


def expert_load(routed: Routed) -> np.ndarray:
    """[layers, E]: each expert's share of the tokens' choices (before capacity; 1/E each when balanced)."""
    E = routed.num_experts
    counts = np.stack([np.bincount(layer.reshape(-1), minlength=E) for layer in routed.expert_index])
    return counts / counts.sum(axis=1, keepdims=True)


def dead_experts(routed: Routed, fraction_of_fair_share: float = 0.1) -> list[list[int]]:
    """Per layer, the experts that receive less than `fraction_of_fair_share` of 1/E of the choices."""
    load = expert_load(routed)
    return [np.flatnonzero(layer < fraction_of_fair_share / routed.num_experts).tolist() for layer in load]


def dropped_fraction(routed: Routed, capacity_factor: float) -> np.ndarray:
    """[layers]: the share of (token, choice) assignments with no slot if the same choices were given
    `capacity_factor` (slots per group as in training: `routing.expert_capacity(group_size, E, cf, k=K)`)."""
    K = routed.expert_index.shape[-1]
    capacity = routing.expert_capacity(routed.group_size, routed.num_experts, capacity_factor, k=K)
    dropped = np.zeros(routed.num_layers)
    total = 0
    for group in np.unique(routed.group_of):
        members = routed.group_of == group
        for layer in range(routed.num_layers):
            choices = routed.expert_index[layer, members][None]
            kept = routing.assign_slots(jnp.asarray(choices), jnp.ones(choices.shape, jnp.float32),
                                        num_experts=routed.num_experts, capacity=capacity).kept
            dropped[layer] += float((~np.asarray(kept)).sum())
        total += int(members.sum()) * K
    return dropped / max(total, 1)


def token_preferences(routed: Routed, *, top: int = 8, min_count: int = 5) -> list[list[list[tuple]]]:
    """Per layer and expert: the `top` tokens the expert takes most by lift, P(expert | token) / P(expert),
    among tokens seen at least `min_count` times: [(token id, count routed there, lift), ...]."""
    E, tokens = routed.num_experts, routed.token_ids
    vocab = int(tokens.max()) + 1
    out = []
    for layer in range(routed.num_layers):
        counts = np.zeros((vocab, E))
        np.add.at(counts, (tokens, routed.top1[layer]), 1)
        per_token = counts.sum(axis=1)
        share = counts.sum(axis=0) / counts.sum()
        frequent = per_token >= min_count
        lift = np.where(frequent[:, None], counts / np.maximum(per_token[:, None], 1) / np.maximum(share, 1e-12), 0)
        layer_prefs = []
        for e in range(E):
            order = np.argsort(-lift[:, e])[:top]
            layer_prefs.append([(int(t), int(counts[t, e]), float(lift[t, e])) for t in order if lift[t, e] > 0])
        out.append(layer_prefs)
    return out


def token_determinism(routed: Routed) -> tuple[np.ndarray, np.ndarray]:
    """How far routing is a function of the token id alone, per layer: ([layers] share of tokens whose top-1
    is their id's most common expert, [layers] I(token id; expert) / H(expert)). Both are 1 when each id
    always goes to one expert (then an expert's load is the frequency of its ids, however it is balanced),
    and near 1/E and 0 when the choice ignores the id."""
    E, tokens = routed.num_experts, routed.token_ids
    vocab = int(tokens.max()) + 1
    majority, information = np.zeros(routed.num_layers), np.zeros(routed.num_layers)
    for layer in range(routed.num_layers):
        counts = np.zeros((vocab, E))
        np.add.at(counts, (tokens, routed.top1[layer]), 1)
        total = counts.sum()
        majority[layer] = counts.max(axis=1).sum() / total
        joint = counts / total
        p_token, p_expert = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
        nonzero = joint > 0
        mutual = float(np.sum(joint[nonzero] * np.log(joint[nonzero] / (p_token @ p_expert)[nonzero])))
        entropy = float(-np.sum(p_expert[p_expert > 0] * np.log(p_expert[p_expert > 0])))
        information[layer] = mutual / entropy if entropy > 0 else 0.0
    return majority, information


def domain_expert_counts(routed: Routed, num_domains: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic corpus: ([layers, D, E] top-1 counts, [layers] mutual information I(domain; expert) in bits)."""
    if routed.domains is None:
        raise ValueError("domain_expert_counts needs batches with `domains` (the synthetic source)")
    counts = np.zeros((routed.num_layers, num_domains, routed.num_experts))
    for layer in range(routed.num_layers):
        np.add.at(counts[layer], (routed.domains, routed.top1[layer]), 1)
    information = []
    for layer_counts in counts:
        joint = layer_counts / layer_counts.sum()
        p_d, p_e = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nz = joint > 0
        information.append(float(np.sum(joint[nz] * np.log2(joint[nz] / (p_d * p_e)[nz]))))
    return counts, np.asarray(information)


def router_drift(model_a, model_b, batches: list[dict]) -> np.ndarray:
    """[layers]: share of real tokens whose top-1 expert differs between two models (e.g. two checkpoints
    of one run) on the same batches."""
    a, b = collect(model_a, batches), collect(model_b, batches)
    if a.expert_index.shape != b.expert_index.shape:
        raise ValueError("router_drift: the two models have different MoE layouts")
    return (a.top1 != b.top1).mean(axis=1)
