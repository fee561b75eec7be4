"""`MoeLayer`: a sparse Mixture-of-Experts feed-forward layer (flax.nnx).

    layer = MoeLayer(d_model=64, d_ff=256, num_experts=8, rngs=nnx.Rngs(0))
    y_BLd, aux = layer(x_BLd)                     # aux: unscaled losses and routing metrics

The layer holds parameters only; how a token picks its expert is routing.py, which variables each router
keeps and which routing function it calls is routers.py, how a token travels to its experts is dispatch.py.
One call:

  x [B, L, d] -> groups [G, S, d]        S = group_size tokens, whole sequences in order (see `_groups`)
  router logits [G, S, E] in `router_dtype` (float32 by default: Switch selective precision)
  Routing = routers.get(router).route(...) -> routing.route_*(...)
                                          capacity from routing.expert_capacity (train or eval factor)
  y = dispatch.apply_experts(dispatcher, x, routing, experts) (+ shared experts) -> dropout -> [B, L, d]

A token dropped by every choice gets exactly 0 from the routed experts; in the model it passes through
the residual connection. Padding tokens are never routed and count in no loss or metric.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import dispatch, goodput, routers, routing

Array = jax.Array

ROUTERS = routers.NAMES


def _switch_init(rngs: nnx.Rngs, shape, names, scale: float, *, batch_axis=()) -> nnx.Param:
    """Truncated normal, std sqrt(scale / fan_in) (Switch Transformer), float32, logical axis names."""
    init = jax.nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                                batch_axis=batch_axis)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names, eager_sharding=False)


class MoeLayer(nnx.Module):
    """Router + E stacked experts (+ shared experts). See the module docstring.

    Args (keyword only):
      d_model, d_ff: model and expert hidden width (each expert is a d_model -> d_ff -> d_model FFN).
      num_experts: E. k: choices per token (token-choice routers); for expert choice, the average number of
        experts per token that sets the capacity.
      router: a name in `routers.NAMES` ('top_k', 'expert_choice', 'hash', 'noisy_top_k', 'bias_balanced');
        routers.py says what each one holds and does.
      dispatcher: a name in `dispatch.DISPATCHERS` ('einsum', 'index', 'dropless'; dropless routes with no
        capacity).
      capacity_factor / eval_capacity_factor: training / `deterministic=True` capacity factor.
      group_size: tokens per routing group (S). Groups hold whole sequences in order, or a sequence is cut
        into group_size pieces: group_size must divide B*L and be a multiple or a divisor of L.
      min_capacity: lower bound on slots per expert per group.
      expert_capacity: slots per expert per group in training and evaluation, overriding the capacity factors
        (HF Switch Transformers' fixed `expert_capacity`); None: from the factors.
      activation: 'relu' | 'gelu' | 'swiglu' | 'geglu'.
      num_shared_experts: always-on dense FFNs of width d_ff added to the routed output.
      shared_d_ff: the shared experts' total hidden width (None: num_shared_experts * d_ff).
      shared_expert_gate: scale the shared experts' output by sigmoid(x w_gate), w_gate [d, 1] (Qwen2-MoE).
      init_scale: Switch init scale (std = sqrt(init_scale / fan_in)) for experts and router.
      jitter: multiplicative router-input jitter U(1 - jitter, 1 + jitter) in training.
      expert_dropout: dropout on the experts' hidden units; dropout: on the layer output.
      normalize: renormalise the top-k weights (Mixtral). batch_prioritized: BPR slot priority (encoders).
      vocab_size: needed by the hash router. bias_update_rate: step of the bias_balanced bias update.
      router_dtype: dtype of the router matmul (float32 default). dtype: compute dtype of the experts.
    """

    def __init__(self, *, d_model: int, d_ff: int, num_experts: int, k: int = 1, router: str = "top_k",
                 dispatcher: str = "einsum", capacity_factor: float = 1.25, eval_capacity_factor: float = 2.0,
                 group_size: int = 1024, min_capacity: int = 1, expert_capacity: Optional[int] = None,
                 activation: str = "relu",
                 num_shared_experts: int = 0, init_scale: float = 0.1, jitter: float = 0.0,
                 expert_dropout: float = 0.0, dropout: float = 0.0, normalize: bool = False,
                 batch_prioritized: bool = False, vocab_size: Optional[int] = None,
                 bias_update_rate: float = 1e-3, router_dtype=jnp.float32, dtype=jnp.float32,
                 shared_d_ff: Optional[int] = None, shared_expert_gate: bool = False, rngs: nnx.Rngs):
        spec = routers.get(router)
        dispatch.check_dispatcher(dispatcher)
        dispatch.check_activation(activation)
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts),
                            ("group_size", group_size), ("min_capacity", min_capacity)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if expert_capacity is not None and (not isinstance(expert_capacity, (int, np.integer)) or expert_capacity < 1):
            raise ValueError(f"expert_capacity must be a positive integer or None, got {expert_capacity!r}")
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= num_experts:
            raise ValueError(f"k must be an integer in [1, num_experts={num_experts}], got {k!r}")
        for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in (("expert_dropout", expert_dropout), ("dropout", dropout), ("jitter", jitter)):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {num_shared_experts}")

        self.d_model, self.d_ff, self.num_experts, self.k = d_model, d_ff, num_experts, k
        self.router, self.dispatcher, self.activation = router, dispatcher, activation
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.group_size, self.min_capacity, self.expert_capacity = group_size, min_capacity, expert_capacity
        self.jitter, self.expert_dropout = jitter, expert_dropout
        self.normalize, self.batch_prioritized = normalize, batch_prioritized
        self.bias_update_rate = bias_update_rate
        self.router_dtype, self.dtype = router_dtype, dtype
        E, d, f = num_experts, d_model, d_ff
        gated = activation in ("swiglu", "geglu")

        # Router variables first: their draws from the params stream come before the experts'.
        router_params = spec.make_params(lambda shape, names: _switch_init(rngs, shape, names, init_scale),
                                         d_model=d, num_experts=E, vocab_size=vocab_size)
        for name, variable in router_params.items():
            setattr(self, name, variable)

        self.wi = _switch_init(rngs, (E, d, f), ("expert", "embed", "mlp"), init_scale, batch_axis=0)
        self.wi_gate = (_switch_init(rngs, (E, d, f), ("expert", "embed", "mlp"), init_scale, batch_axis=0)
                        if gated else nnx.data(None))
        self.wo = _switch_init(rngs, (E, f, d), ("expert", "mlp", "embed"), init_scale, batch_axis=0)

        self.num_shared_experts = num_shared_experts
        if num_shared_experts:
            # n shared FFNs of width f summed == one FFN of width n * f.
            fs = num_shared_experts * f if shared_d_ff is None else shared_d_ff
            self.shared_wi = _switch_init(rngs, (d, fs), ("embed", "mlp"), init_scale)
            self.shared_wi_gate = (_switch_init(rngs, (d, fs), ("embed", "mlp"), init_scale)
                                   if gated else nnx.data(None))
            self.shared_wo = _switch_init(rngs, (fs, d), ("mlp", "embed"), init_scale)
            if shared_expert_gate:
                self.shared_gate = _switch_init(rngs, (d, 1), ("embed", None), init_scale)

        self.output_dropout = nnx.Dropout(dropout, rngs=rngs)
        needs_rng = jitter > 0 or expert_dropout > 0 or spec.draws_rng
        self.rng = rngs["dropout"].fork() if needs_rng else nnx.data(None)

    # ----------------------------------------------------------------------------------------- call

    def __call__(self, x_BLd: Array, *, padding_mask: Optional[Array] = None, token_ids: Optional[Array] = None,
                 deterministic: bool = False, decode: bool = False,
                 decode_capacity_factor: Optional[float] = None, return_routing: bool = False,
                 replay: Optional[tuple[Array, Array]] = None) -> tuple[Array, dict]:
        """[B, L, d] -> ([B, L, d] in `dtype`, aux).

        Args:
          x_BLd: tokens.
          padding_mask: [B, L] bool, True for real tokens (None: all real).
          token_ids: [B, L] int, needed by the hash router.
          deterministic: evaluation: eval capacity factor, no jitter, router noise or dropout.
          decode: generation: all B*L tokens of the call form one routing group (the batch's tokens of the
            current step), with `decode_capacity_factor` (None: room for every token in every expert, so nothing
            is dropped and a token's routing never depends on the other sequences). Implies deterministic.
          return_routing: also put each token's routing in aux: `expert_index` [B, L, K] int32 and
            `routing_weight` [B, L, K] float32 (0 for a dropped choice or padding).
          replay: router replay: (expert_index [B, L, K], weight [B, L, K]) recorded earlier (a trace) are used
            instead of the router's choices; slots are assigned to them as to the router's own (same capacity).
            The router still runs, for its losses and metrics.

        Returns:
          y and aux, a dict of float32 arrays (unscaled): `load_balancing_loss`, `router_z_loss`,
          `dropped_fraction`, `expert_load` [E], `load_cv`, `router_entropy`, `top1_prob`,
          `router_max_logit` (largest |logit|), the expert rows of goodput.py (`expert_rows_computed`,
          `expert_rows_useful`, `expert_rows_lost`, `expert_row_flops`), and for noisy_top_k `importance_loss`,
          `load_loss`.
        """
        B, L, d = x_BLd.shape
        deterministic = deterministic or decode
        S = B * L if decode else _check_group_size(self.group_size, B, L)
        G = B * L // S
        x_GSd = x_BLd.reshape(G, S, d).astype(self.dtype)
        mask_GS = None if padding_mask is None else padding_mask.reshape(G, S).astype(bool)
        capacity = self.slots_per_expert(S, deterministic)
        if decode:
            capacity = S if decode_capacity_factor is None else routing.expert_capacity(
                S, self.num_experts, decode_capacity_factor, k=self.k, min_capacity=self.min_capacity)
        if dispatch.is_dropless(self.dispatcher):
            capacity = None

        with jax.named_scope("moe_router"):  # program_costs.MOE_SCOPES
            route, probs_GSE, losses = self._route(x_GSd, mask_GS, token_ids, capacity, deterministic)
        if replay is not None:
            index_BLK, weight_BLK = replay
            K = index_BLK.shape[-1]
            route = routing.assign_slots(index_BLK.reshape(G, S, K).astype(jnp.int32),
                                         weight_BLK.reshape(G, S, K).astype(jnp.float32),
                                         num_experts=self.num_experts, capacity=capacity, padding_mask=mask_GS)

        experts = dispatch.ExpertFFN(
            wi=self.wi[...], wo=self.wo[...], wi_gate=None if self.wi_gate is None else self.wi_gate[...],
            dropout_rng=None if deterministic or self.expert_dropout == 0 else self.rng(),
            activation=self.activation, dropout_rate=self.expert_dropout, dtype=self.dtype)
        y_GSd = dispatch.apply_experts(self.dispatcher, x_GSd, route, experts)
        if self.num_shared_experts:
            y_GSd = y_GSd + self._shared(x_GSd)
        y_BLd = self.output_dropout(y_GSd.reshape(B, L, d), deterministic=deterministic)

        aux = dict(losses)
        aux.update(routing.routing_metrics(route, probs_GSE, mask_GS))
        aux.update(goodput.layer_rows(self.dispatcher, route, mask_GS, self.k, row_flops=goodput.row_flops(
            d, self.d_ff, self.activation in ("swiglu", "geglu"))))
        if return_routing:
            K = route.expert_index.shape[-1]
            aux["expert_index"] = route.expert_index.reshape(B, L, K).astype(jnp.int32)
            aux["routing_weight"] = jnp.where(route.kept, route.weight, 0.0).reshape(B, L, K).astype(jnp.float32)
        return y_BLd.astype(self.dtype), aux

    def _route(self, x_GSd, mask_GS, token_ids, capacity, deterministic):
        """-> (Routing, router probabilities [G, S, E] float32, {loss name: scalar}), by the layer's router."""
        spec = routers.get(self.router)
        token_ids_GS = None
        if spec.needs_token_ids:
            if token_ids is None:
                raise ValueError(f"router={self.router!r} needs token_ids [B, L] in the call")
            token_ids_GS = token_ids.reshape(x_GSd.shape[:2])
        return spec.route(self, x_GSd, mask_GS=mask_GS, token_ids_GS=token_ids_GS, capacity=capacity,
                          deterministic=deterministic)

    def _shared(self, x_GSd):
        dt = self.dtype
        shared = dispatch.ExpertFFN(
            wi=self.shared_wi[...][None], wo=self.shared_wo[...][None],
            wi_gate=None if self.shared_wi_gate is None else self.shared_wi_gate[...][None],
            activation=self.activation, dtype=dt)
        G, S, d = x_GSd.shape
        y_GSd = shared(x_GSd.reshape(1, G * S, d)).reshape(G, S, d)
        if hasattr(self, "shared_gate"):
            gate_GS1 = jnp.einsum("GSd,de->GSe", x_GSd, self.shared_gate[...].astype(dt))
            y_GSd = y_GSd * jax.nn.sigmoid(gate_GS1.astype(jnp.float32)).astype(y_GSd.dtype)
        return y_GSd

    # ----------------------------------------------------------------------------------------- balancing

    def slots_per_expert(self, group_size: int, deterministic: bool) -> int:
        """Capacity per expert per group of `group_size` tokens: `expert_capacity` when set, else from the
        training or evaluation capacity factor."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        factor = self.eval_capacity_factor if deterministic else self.capacity_factor
        return routing.expert_capacity(group_size, self.num_experts, factor, k=self.k, min_capacity=self.min_capacity)

    def update_bias(self, expert_load: Array) -> None:
        """bias_balanced: `bias -= bias_update_rate * sign(load - mean load)` from the aux `expert_load`.

        `expert_load` has the bias's shape ([E], or [layers, E] for a layer stack made by nnx.vmap).
        """
        if self.router != "bias_balanced":
            raise ValueError(f"update_bias needs router='bias_balanced', this layer has router={self.router!r}")
        routers.update_selection_bias(self, expert_load)


def after_step(model: nnx.Module, metrics: dict) -> None:
    """The trainer's hook after each optimizer step: every router's after-step update (`Router.after_step`,
    today bias_balanced's bias update), outside the gradient; a no-op for routers without one and for dense
    models.

    Args:
      model: any nnx module; at most one of its `MoeLayer`s may have a router with an after-step update (a
        scanned layer stack counts as one), since `metrics` holds one layer's routing aux.
      metrics: the step's `model.loss_fn` metrics; `metrics["moe"]` is the MoE layer's aux (stacked over
        layers, e.g. `expert_load` [layers, E]).
    """
    layers = [m for _, m in nnx.iter_graph(model)
              if isinstance(m, MoeLayer) and routers.get(m.router).after_step is not None]
    if not layers:
        return
    if len(layers) != 1:
        raise ValueError(f"after_step expects at most one MoeLayer with an after-step router in the model, "
                         f"found {len(layers)}; call each router's after_step with its own layer's aux")
    routers.get(layers[0].router).after_step(layers[0], metrics["moe"])


def update_router_biases(model: nnx.Module, expert_load: Array) -> None:
    """Apply `MoeLayer.update_bias` to the bias_balanced MoE layer of `model` (outside the gradient).

    Args:
      model: any nnx module holding exactly one bias_balanced `MoeLayer` (a scanned layer stack counts as
        one; its bias is [layers, E]).
      expert_load: the aux `expert_load` of the last step, same shape as that layer's bias.
    """
    layers = [m for _, m in nnx.iter_graph(model)
              if isinstance(m, MoeLayer) and m.router == "bias_balanced"]
    if len(layers) != 1:
        raise ValueError(f"update_router_biases expects one bias_balanced MoeLayer in the model, found "
                         f"{len(layers)}; call MoeLayer.update_bias on each layer with its own load")
    layers[0].update_bias(expert_load)


def _check_group_size(group_size: int, batch: int, length: int) -> int:
    """S = group_size if the B*L tokens split into groups of whole sequences (or whole pieces of one)."""
    num_tokens = batch * length
    if num_tokens % group_size or (group_size % length and length % group_size):
        raise ValueError(
            f"group_size={group_size} does not fit the {num_tokens} tokens (batch {batch} x length {length}): "
            f"it must divide {num_tokens} and be a multiple of the length {length} (groups of whole "
            f"sequences) or a divisor of it (a sequence cut into groups)")
    return group_size
