"""How a token picks its expert: pure functions from router logits to a `Routing`, plus the router losses.

Axis letters (used in every einsum string, shape comment and name in moe_jax):
  G groups, S tokens per group, E experts, C capacity (slots per expert per group), K choices per token.

Every router here is a pure function of arrays. All router math runs in float32 whatever dtype the logits
arrive in (the Switch Transformer's "selective precision"): the first thing each router does is cast.

Slot priority (token-choice routers): slots are handed out choice-rank-major -- every token's first choice
before any token's second choice -- then in token order within the group, or by descending top-1
probability with `batch_prioritized=True`. Consequences for a decoder:
  * k = 1 in token order is causal: a token's slot depends only on earlier tokens of its group.
  * k >= 2 with a finite capacity is *not* causal: a later token's first choice can take the slot an earlier
    token wanted for its second choice. Dropless routing (capacity=None) is causal for every k.
  * batch-prioritized routing and expert choice look at later tokens; they are for encoders and ablations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# --------------------------------------------------------------------------------------------- capacity


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    capacity_factor: float,
    *,
    k: int = 1,
    min_capacity: int = 1,
    multiple_of: int = 1,
) -> int:
    """Slots per expert for a group of `num_tokens` tokens.

    `ceil(k * num_tokens * capacity_factor / num_experts)`, at least `min_capacity`, rounded up to a
    multiple of `multiple_of`. Capacity factor 1.0 gives exactly enough slots under perfect balance for any k.
    """
    _check_positive_int("num_tokens", num_tokens)
    _check_positive_int("num_experts", num_experts)
    _check_positive_int("k", k)
    _check_positive_int("min_capacity", min_capacity)
    _check_positive_int("multiple_of", multiple_of)
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    # Round k * tokens * factor / experts in exact rational arithmetic where the factor is a short decimal,
    # so that e.g. 1.1 * 100 / 10 gives 11 and not 12 from float noise.
    exact = k * num_tokens * _as_fraction(capacity_factor) / num_experts
    capacity = max(math.ceil(exact), min_capacity)
    return -(-capacity // multiple_of) * multiple_of


def _as_fraction(value: float):
    from fractions import Fraction

    return Fraction(repr(float(value)))


# --------------------------------------------------------------------------------------------- Routing


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Which expert, which slot and what weight, for every (token, choice) of every group.

    The compact, per-token form (what the index and dropless dispatchers read):
      expert_index [G, S, K] int32   the expert of choice k of token s.
      slot         [G, S, K] int32   its position in that expert's buffer of this group, in [0, C);
                                     equal to C where the assignment was dropped or is padding.
      weight       [G, S, K] float32 the combine weight; exactly 0 where dropped or padding.
      kept         [G, S, K] bool    the assignment holds a slot.
    Static: `num_experts` (E) and `capacity` (C, or None for dropless routing, where C is taken as S:
    with distinct choices per token no expert can receive more than S tokens of one group).

    `dispatch_mask()` and `combine_tensor()` give the canonical one-hot [G, S, E, C] form (einsum path).
    """

    expert_index: Array
    slot: Array
    weight: Array
    kept: Array
    num_experts: int = dataclasses.field(metadata=dict(static=True))
    capacity: Optional[int] = dataclasses.field(metadata=dict(static=True))

    @property
    def num_groups(self) -> int:
        return self.expert_index.shape[0]

    @property
    def group_size(self) -> int:
        return self.expert_index.shape[1]

    @property
    def num_choices(self) -> int:
        return self.expert_index.shape[2]

    @property
    def buffer_size(self) -> int:
        """C: slots per expert per group (S when routing is dropless)."""
        return self.group_size if self.capacity is None else self.capacity

    def dispatch_mask(self) -> Array:
        """[G, S, E, C] bool: token s of group g sits in slot c of expert e."""
        return self._one_hot_slots(jnp.ones_like(self.weight)) > 0

    def combine_tensor(self) -> Array:
        """[G, S, E, C] float32: the weight with which slot c of expert e returns to token s."""
        return self._one_hot_slots(self.weight)

    def _one_hot_slots(self, values_GSK: Array) -> Array:
        expert_GSKE = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=jnp.float32)
        # A dropped assignment has slot == C, which one_hot maps to an all-zero row.
        slot_GSKC = jax.nn.one_hot(jnp.where(self.kept, self.slot, self.buffer_size), self.buffer_size,
                                   dtype=jnp.float32)
        return jnp.einsum("GSKE,GSKC,GSK->GSEC", expert_GSKE, slot_GSKC,
                          jnp.where(self.kept, values_GSK, 0).astype(jnp.float32))

    def expert_load(self) -> Array:
        """[E] float32: fraction of all kept (token, choice) assignments that each expert received."""
        counts_E = jnp.zeros((self.num_experts,), jnp.float32).at[self.expert_index.reshape(-1)].add(
            self.kept.reshape(-1).astype(jnp.float32))
        return counts_E / jnp.maximum(counts_E.sum(), 1.0)


# --------------------------------------------------------------------------------------------- routers


def route_top_k(
    router_logits: Array,
    *,
    k: int,
    capacity: Optional[int],
    batch_prioritized: bool = False,
    normalize: bool = False,
    padding_mask: Optional[Array] = None,
    selection_bias: Optional[Array] = None,
) -> Routing:
    """Token choice: each token picks its top-k experts; experts keep the first `capacity` arrivals.

    Args:
      router_logits: [G, S, E] (any float dtype; routed in float32).
      k: choices per token, 1 <= k <= E. k=1 is Switch, k=2 GShard / ST-MoE.
      capacity: slots per expert per group (see `expert_capacity`), or None for dropless routing.
      batch_prioritized: hand out slots by descending top-1 probability instead of token order (BPR,
        Riquelme et al. 2021). Looks at later tokens: not for causal decoding.
      normalize: renormalise the top-k probabilities to sum to 1 per token (Mixtral). Otherwise the weight
        is the raw softmax probability (Switch, flaxformer, vmoe).
      padding_mask: [G, S] bool, True for real tokens. Padding is never routed and uses no capacity.
      selection_bias: [E] float32 added to the probabilities for *choosing* experts only (DeepSeek-V3
        auxiliary-loss-free balancing); weights come from the unbiased probabilities.

    Returns:
      A `Routing` with K = k.
    """
    logits_GSE = _as_router_logits(router_logits)
    num_experts = logits_GSE.shape[-1]
    _check_k(k, num_experts)
    _check_capacity(capacity)
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    scores_GSE = probs_GSE if selection_bias is None else probs_GSE + selection_bias.astype(jnp.float32)
    _, expert_index_GSK = jax.lax.top_k(scores_GSE, k)
    weight_GSK = jnp.take_along_axis(probs_GSE, expert_index_GSK, axis=-1)
    if normalize:
        weight_GSK = weight_GSK / jnp.sum(weight_GSK, axis=-1, keepdims=True)
    priority_GS = probs_GSE.max(axis=-1) if batch_prioritized else None
    return assign_slots(expert_index_GSK, weight_GSK, num_experts=num_experts, capacity=capacity,
                        padding_mask=padding_mask, priority=priority_GS)


def route_hash(
    token_ids: Array,
    *,
    expert_of_token: Array,
    num_experts: int,
    capacity: Optional[int],
    padding_mask: Optional[Array] = None,
) -> Routing:
    """Hash routing (Roller et al. 2021): a fixed token-id -> expert map, no learned router, weight 1.

    Args:
      token_ids: [G, S] int vocabulary ids.
      expert_of_token: [V] int32 table with values in [0, E), e.g. from `hash_expert_table`.
      num_experts: E.
      capacity: slots per expert per group, or None for dropless.
      padding_mask: [G, S] bool, True for real tokens.
    """
    _check_positive_int("num_experts", num_experts)
    _check_capacity(capacity)
    expert_index_GSK = jnp.asarray(expert_of_token)[token_ids][..., None].astype(jnp.int32)
    weight_GSK = jnp.ones(expert_index_GSK.shape, jnp.float32)
    return assign_slots(expert_index_GSK, weight_GSK, num_experts=num_experts, capacity=capacity,
                        padding_mask=padding_mask)


def hash_expert_table(vocab_size: int, num_experts: int, *, seed: int = 0) -> np.ndarray:
    """[V] int32: a balanced random map from token id to expert (each expert gets V/E ids, +-1)."""
    _check_positive_int("vocab_size", vocab_size)
    _check_positive_int("num_experts", num_experts)
    permutation = np.random.default_rng(seed).permutation(vocab_size)
    table = np.empty(vocab_size, np.int32)
    table[permutation] = np.arange(vocab_size) % num_experts
    return table


def route_noisy_top_k(
    clean_logits: Array,
    noise_stddev: Optional[Array],
    *,
    k: int,
    capacity: Optional[int],
    rng: Optional[Array] = None,
    padding_mask: Optional[Array] = None,
) -> tuple[Routing, dict[str, Array]]:
    """Noisy top-k gating (Shazeer et al. 2017, eqs. 3-5 and appendix A).

    H = clean_logits + N(0, 1) * noise_stddev (noise only when `rng` is given, i.e. in training);
    the gates are a softmax over the k largest H (the others are -inf), so the kept weights sum to 1.

    Args:
      clean_logits: [G, S, E], x . W_g.
      noise_stddev: [G, S, E], softplus(x . W_noise), learned and input dependent (ignored without rng).
      k: experts per token.
      capacity: slots per expert per group, or None.
      rng: PRNG key for the noise; None for evaluation (no noise, and the load loss uses zero noise).
      padding_mask: [G, S] bool, True for real tokens.

    Returns:
      (Routing, {"importance_loss", "load_loss"}): CV(importance)^2 and CV(load)^2, the paper's losses,
      where load is the smooth estimator P(token picks e) = Phi((clean_e - threshold_e) / noise_stddev_e).
    """
    clean_GSE = _as_router_logits(clean_logits)
    num_experts = clean_GSE.shape[-1]
    _check_k(k, num_experts)
    _check_capacity(capacity)
    if rng is not None and noise_stddev is not None:
        stddev_GSE = noise_stddev.astype(jnp.float32)
        noisy_GSE = clean_GSE + jax.random.normal(rng, clean_GSE.shape, jnp.float32) * stddev_GSE
    else:
        stddev_GSE = None
        noisy_GSE = clean_GSE
    top_values_GSK, expert_index_GSK = jax.lax.top_k(noisy_GSE, min(k + 1, num_experts))
    expert_index_GSK = expert_index_GSK[..., :k]
    weight_GSK = jax.nn.softmax(top_values_GSK[..., :k], axis=-1)
    real_GS = _real_tokens(padding_mask, clean_GSE.shape[:2])

    gates_GSE = jnp.sum(jax.nn.one_hot(expert_index_GSK, num_experts) * weight_GSK[..., None], axis=2)
    importance_E = jnp.sum(gates_GSE * real_GS[..., None], axis=(0, 1))
    if stddev_GSE is not None and k < num_experts:
        # P(noisy_e is in the top k | other noise fixed) = P(clean_e + noise > k-th largest of the others).
        kth_in_GS = top_values_GSK[..., k - 1:k]
        kth_out_GS = top_values_GSK[..., k:k + 1]
        is_in_GSE = noisy_GSE >= kth_in_GS
        threshold_GSE = jnp.where(is_in_GSE, kth_out_GS, kth_in_GS)
        prob_in_GSE = jax.scipy.stats.norm.cdf((clean_GSE - threshold_GSE) / jnp.maximum(stddev_GSE, 1e-9))
        load_E = jnp.sum(prob_in_GSE * real_GS[..., None], axis=(0, 1))
    else:
        load_E = jnp.sum((gates_GSE > 0) * real_GS[..., None], axis=(0, 1)).astype(jnp.float32)
    losses = {"importance_loss": cv_squared(importance_E), "load_loss": cv_squared(load_E)}
    routing = assign_slots(expert_index_GSK, weight_GSK, num_experts=num_experts, capacity=capacity,
                           padding_mask=padding_mask)
    return routing, losses


def route_expert_choice(
    router_logits: Array,
    *,
    capacity: int,
    padding_mask: Optional[Array] = None,
) -> Routing:
    """Expert choice (Zhou et al. 2022): each expert takes its `capacity` highest-probability tokens.

    Probabilities are a softmax over experts per token; expert e then picks the top-`capacity` tokens of
    the group by that probability. A token may be taken by 0..E experts. Looks at the whole group, so it is
    not causal: in a decoder use it only for ablations.

    Returns:
      A `Routing` with K = E: choice e of every token is expert e, kept where expert e took the token.
    """
    logits_GSE = _as_router_logits(router_logits)
    num_groups, group_size, num_experts = logits_GSE.shape
    if capacity is None:
        raise ValueError("route_expert_choice needs an integer capacity, got None")
    _check_capacity(capacity)
    if capacity > group_size:
        raise ValueError(f"capacity must be in [1, group size {group_size}] for expert choice, got {capacity}")
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    real_GS = _real_tokens(padding_mask, (num_groups, group_size))
    # Padding sorts below every real token (probabilities are >= 0) and is then rejected below.
    scores_GES = jnp.where(real_GS[:, None, :], probs_GSE.transpose(0, 2, 1), -1.0)
    top_scores_GEC, token_GEC = jax.lax.top_k(scores_GES, capacity)
    taken_GEC = top_scores_GEC >= 0
    g_idx = jnp.arange(num_groups)[:, None, None]
    e_idx = jnp.arange(num_experts)[None, :, None]
    c_idx = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), token_GEC.shape)
    slot_GSE = jnp.full((num_groups, group_size, num_experts), capacity, jnp.int32)
    slot_GSE = slot_GSE.at[g_idx, token_GEC, e_idx].set(jnp.where(taken_GEC, c_idx, capacity))
    kept_GSE = slot_GSE < capacity
    expert_index_GSE = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), slot_GSE.shape)
    return Routing(expert_index=expert_index_GSE, slot=slot_GSE,
                   weight=jnp.where(kept_GSE, probs_GSE, 0.0), kept=kept_GSE,
                   num_experts=num_experts, capacity=capacity)


def assign_slots(
    expert_index: Array,
    weight: Array,
    *,
    num_experts: int,
    capacity: Optional[int],
    padding_mask: Optional[Array] = None,
    priority: Optional[Array] = None,
) -> Routing:
    """Turn per-token choices into slots: choice-rank-major, then token order (or descending `priority`).

    Args:
      expert_index: [G, S, K] int, distinct experts per token.
      weight: [G, S, K] float combine weights before dropping.
      num_experts: E.
      capacity: C, or None for dropless (every real assignment kept).
      padding_mask: [G, S] bool, True for real tokens; padding takes no slot and gets weight 0.
      priority: [G, S] float; if given, higher-priority tokens get slots first (batch-prioritized routing).
    """
    num_groups, group_size, num_choices = expert_index.shape
    buffer_size = group_size if capacity is None else capacity
    real_GS = _real_tokens(padding_mask, (num_groups, group_size))

    if priority is not None:
        # Stable sort, so ties keep token order.
        order_GS = jnp.argsort(-priority.astype(jnp.float32), axis=-1, stable=True)
    else:
        order_GS = jnp.broadcast_to(jnp.arange(group_size), (num_groups, group_size))
    expert_sorted_GSK = jnp.take_along_axis(expert_index, order_GS[..., None], axis=1)
    real_sorted_GS = jnp.take_along_axis(real_GS, order_GS, axis=1)

    # Choice-rank-major: flatten as [G, K*S] with all first choices first, and count arrivals per expert.
    one_hot_GKSE = (jax.nn.one_hot(expert_sorted_GSK.transpose(0, 2, 1), num_experts, dtype=jnp.int32)
                    * real_sorted_GS[:, None, :, None])
    arrivals_GXE = one_hot_GKSE.reshape(num_groups, num_choices * group_size, num_experts)
    position_GXE = jnp.cumsum(arrivals_GXE, axis=1) - 1
    position_GKS = jnp.sum(position_GXE * arrivals_GXE, axis=-1).reshape(num_groups, num_choices, group_size)
    position_sorted_GSK = position_GKS.transpose(0, 2, 1)

    inverse_GS = jnp.argsort(order_GS, axis=-1)
    position_GSK = jnp.take_along_axis(position_sorted_GSK, inverse_GS[..., None], axis=1)
    kept_GSK = real_GS[..., None] & (position_GSK < buffer_size)
    return Routing(
        expert_index=expert_index.astype(jnp.int32),
        slot=jnp.where(kept_GSK, position_GSK, buffer_size).astype(jnp.int32),
        weight=jnp.where(kept_GSK, weight.astype(jnp.float32), 0.0),
        kept=kept_GSK,
        num_experts=num_experts,
        capacity=capacity,
    )


# --------------------------------------------------------------------------------------------- jitter, bias


def jitter(x: Array, rng: Array, epsilon: float) -> Array:
    """Multiplicative input jitter (Switch): x * U(1 - eps, 1 + eps). Apply in training only."""
    if epsilon <= 0:
        return x
    noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - epsilon, 1.0 + epsilon)
    return (x.astype(jnp.float32) * noise).astype(x.dtype)


def update_balancing_bias(bias: Array, expert_load: Array, rate: float) -> Array:
    """DeepSeek-V3 auxiliary-loss-free balancing: `b -= rate * sign(load - mean(load))`, outside the gradient.

    Args:
      bias: [..., E] selection bias (see `route_top_k(selection_bias=...)`); leading axes (e.g. stacked
        layers) are independent.
      expert_load: [..., E] observed load (counts or fractions) of the last step.
      rate: the bias update speed (DeepSeek-V3 uses 1e-3).
    """
    load = jax.lax.stop_gradient(expert_load.astype(jnp.float32))
    return bias - rate * jnp.sign(load - load.mean(axis=-1, keepdims=True))


# --------------------------------------------------------------------------------------------- losses


def load_balancing_loss(router_probs: Array, expert_index: Array, padding_mask: Optional[Array] = None) -> Array:
    """Switch eqs. 4-6: `E * sum_e f_e * P_e`, averaged over groups; equals k under perfect balance.

    Args:
      router_probs: [G, S, E] softmax probabilities.
      expert_index: [G, S, K] the top-k choices *before* capacity is applied.
      padding_mask: [G, S] bool, True for real tokens; padding counts in neither f nor P.
    """
    probs_GSE = router_probs.astype(jnp.float32)
    num_experts = probs_GSE.shape[-1]
    real_GS1 = _real_tokens(padding_mask, probs_GSE.shape[:2])[..., None].astype(jnp.float32)
    num_real_G1 = jnp.maximum(real_GS1.sum(axis=1), 1.0)
    chosen_GSE = jnp.sum(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=2)
    fraction_GE = jnp.sum(chosen_GSE * real_GS1, axis=1) / num_real_G1
    mean_prob_GE = jnp.sum(probs_GSE * real_GS1, axis=1) / num_real_G1
    return num_experts * jnp.mean(jnp.sum(fraction_GE * mean_prob_GE, axis=-1))


def router_z_loss(router_logits: Array, padding_mask: Optional[Array] = None) -> Array:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2."""
    logits_GSE = router_logits.astype(jnp.float32)
    real_GS = _real_tokens(padding_mask, logits_GSE.shape[:2]).astype(jnp.float32)
    z_GS = jax.nn.logsumexp(logits_GSE, axis=-1) ** 2
    return jnp.sum(z_GS * real_GS) / jnp.maximum(real_GS.sum(), 1.0)


def cv_squared(x: Array) -> Array:
    """Squared coefficient of variation, var/mean^2 (0 for a constant vector)."""
    x = x.astype(jnp.float32)
    return jnp.var(x) / (jnp.mean(x) ** 2 + 1e-10)


def importance_loss(router_probs: Array, padding_mask: Optional[Array] = None) -> Array:
    """Shazeer et al. 2017 importance loss: CV(sum over tokens of the gate values)^2."""
    probs_GSE = router_probs.astype(jnp.float32)
    real_GS1 = _real_tokens(padding_mask, probs_GSE.shape[:2])[..., None]
    return cv_squared(jnp.sum(probs_GSE * real_GS1, axis=(0, 1)))


def routing_metrics(routing: Routing, router_probs: Array, padding_mask: Optional[Array] = None) -> dict:
    """Per-layer diagnostics of one routing decision (all float32).

    Returns a dict with
      dropped_fraction  fraction of real (token, choice) assignments that found no slot;
      expert_load       [E] fraction of kept assignments that went to each expert;
      load_cv           coefficient of variation of the per-expert kept counts (0 = perfect balance);
      router_entropy    mean entropy (nats) of the router distribution over experts;
      top1_prob         mean largest router probability.
    """
    probs_GSE = router_probs.astype(jnp.float32)
    real_GS = _real_tokens(padding_mask, probs_GSE.shape[:2])
    real_f_GS = real_GS.astype(jnp.float32)
    num_real = jnp.maximum(real_f_GS.sum(), 1.0)
    assignments = num_real * routing.num_choices
    real_kept = jnp.sum(routing.kept & real_GS[..., None])
    load_E = routing.expert_load()
    entropy_GS = -jnp.sum(probs_GSE * jnp.log(jnp.maximum(probs_GSE, 1e-30)), axis=-1)
    return {
        "dropped_fraction": 1.0 - real_kept / assignments,
        "expert_load": load_E,
        "load_cv": jnp.sqrt(cv_squared(load_E)),
        "router_entropy": jnp.sum(entropy_GS * real_f_GS) / num_real,
        "top1_prob": jnp.sum(probs_GSE.max(axis=-1) * real_f_GS) / num_real,
    }


# --------------------------------------------------------------------------------------------- checks


def _as_router_logits(router_logits: Array) -> Array:
    if router_logits.ndim != 3:
        raise ValueError(f"router_logits must be [G, S, E] (3 dims), got shape {router_logits.shape}")
    return router_logits.astype(jnp.float32)


def _real_tokens(padding_mask: Optional[Array], shape_GS: tuple[int, int]) -> Array:
    if padding_mask is None:
        return jnp.ones(shape_GS, bool)
    if tuple(padding_mask.shape) != tuple(shape_GS):
        raise ValueError(f"padding_mask must have shape [G, S] = {tuple(shape_GS)}, got {padding_mask.shape}")
    return padding_mask.astype(bool)


def _check_k(k: int, num_experts: int) -> None:
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an integer in [1, num_experts={num_experts}], got {k!r}")


def _check_capacity(capacity: Optional[int]) -> None:
    if capacity is None:
        return
    if not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(f"capacity must be a positive integer or None (dropless), got {capacity!r}")


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
