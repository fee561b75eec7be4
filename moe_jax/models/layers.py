"""The building blocks every model family shares: config helpers, kernels, RMSNorm, rotary positions, attention
(self or cross, causal or bidirectional), dense MLPs, the embedding and the `MoeLayer` built from a config.

Axis letters (besides routing.py's G S E C K): B batch, L length (query positions), T key positions,
d model width, f MLP hidden width, H heads, k head dim (`head_dim`), V vocabulary.

Parameters are float32; activations run in `model.dtype` (bfloat16 for speed); attention softmax,
normalisation statistics, the router and the logits are float32 (the Switch paper's selective precision).
Every parameter carries logical axis names (`out_sharding` metadata): "vocab", "embed", "heads", "kv" (head
dim), "mlp", "expert", and "layers" for a scanned axis. sharding.py maps them onto the mesh.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import dispatch, routers

Array = jax.Array

ACTIVATIONS = ("relu", "gelu", "swiglu", "geglu")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# "head": RMSNorm of each head's query and key (Qwen3-MoE); "projection": over the whole projection (OLMoE)
QK_NORMS = ("none", "head", "projection")
DEFAULT_NORM_EPS = 1e-6  # nnx.RMSNorm's default
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


# --------------------------------------------------------------------------------------------- config


def choice(key: str, value: Any, allowed) -> Any:
    """`value` if it is one of `allowed`, else ValueError naming `key`, what is allowed and the closest match."""
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{key}={value!r} is not one of {tuple(allowed)}{hint}")
    return value


def dtype(key: str, name: str):
    return DTYPES[choice(key, name, DTYPES)]


def head_dim(cfg) -> int:
    if cfg.get("head_dim") is not None:
        return int(cfg.head_dim)
    if cfg.d_model % cfg.num_heads:
        raise ValueError(f"model.d_model={cfg.d_model} is not divisible by model.num_heads={cfg.num_heads}; "
                         "set model.head_dim")
    return cfg.d_model // cfg.num_heads


def num_kv_heads(cfg) -> int:
    """Key/value heads: `model.num_kv_heads` (grouped-query attention), None: one per query head."""
    value = cfg.get("num_kv_heads")
    return cfg.num_heads if value is None else int(value)


def expert_d_ff(cfg) -> int:
    """The routed experts' hidden width: `model.moe.d_ff`, None: `model.d_ff` (the dense MLPs' width)."""
    value = cfg.moe.get("d_ff")
    return cfg.d_ff if value is None else int(value)


def is_moe(cfg) -> bool:
    return cfg.moe.num_experts > 0


def remat_policy(value):
    """model.remat -> (enabled, policy): "none"/False, "full"/True (save nothing, recompute the whole
    block), or the name of a jax.checkpoint_policies policy (e.g. "dots_saveable")."""
    if value is False or value is None or value == "none":
        return False, None
    if value is True or value == "full":
        return True, None
    name = choice("model.remat", value, ("none", "full") + REMAT_POLICIES)
    return True, getattr(jax.checkpoint_policies, name)


def validate_config(cfg) -> None:
    """The checks of every `model` setting the shared layers read (sizes, activation, dtypes, remat, dropout,
    init scale, `model.moe.*`); ValueError naming the key. A family adds its own layout checks."""
    for key in ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads"):
        if not (isinstance(cfg[key], int) and cfg[key] > 0):
            raise ValueError(f"model.{key}={cfg[key]!r} must be a positive integer")
    choice("model.activation", cfg.activation, ACTIVATIONS)
    dtype("model.dtype", cfg.dtype)
    remat_policy(cfg.remat)
    if head_dim(cfg) % 2:
        raise ValueError(f"head dim {head_dim(cfg)} must be even for rotary positions (model.head_dim)")
    kv_heads = num_kv_heads(cfg)
    if not (isinstance(kv_heads, int) and kv_heads > 0 and cfg.num_heads % kv_heads == 0):
        raise ValueError(f"model.num_kv_heads={kv_heads!r} must be a positive divisor of model.num_heads="
                         f"{cfg.num_heads} (grouped-query attention)")
    choice("model.qk_norm", cfg.get("qk_norm", "none"), QK_NORMS)
    if not cfg.get("norm_eps", DEFAULT_NORM_EPS) > 0:
        raise ValueError(f"model.norm_eps={cfg.norm_eps} must be > 0")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout={cfg.dropout} must be in [0, 1)")
    if not cfg.init_scale > 0:
        raise ValueError(f"model.init_scale={cfg.init_scale} must be > 0")
    if cfg.moe.num_experts < 0:
        raise ValueError(f"model.moe.num_experts={cfg.moe.num_experts} must be >= 0 (0 = dense)")
    if is_moe(cfg):
        dtype("model.moe.router_dtype", cfg.moe.router_dtype)
        choice("model.moe.router", cfg.moe.router, routers.NAMES)
        choice("model.moe.dispatcher", cfg.moe.dispatcher, dispatch.DISPATCHERS)
        if cfg.moe.get("d_ff") is not None and not (isinstance(cfg.moe.d_ff, int) and cfg.moe.d_ff > 0):
            raise ValueError(f"model.moe.d_ff={cfg.moe.d_ff!r} must be a positive integer (None: model.d_ff)")
        if cfg.moe.get("shared_d_ff") is not None and not (
                isinstance(cfg.moe.shared_d_ff, int) and cfg.moe.shared_d_ff > 0 and cfg.moe.num_shared_experts):
            raise ValueError(f"model.moe.shared_d_ff={cfg.moe.shared_d_ff!r} must be a positive integer and needs "
                             f"model.moe.num_shared_experts > 0")
        capacity = cfg.moe.get("expert_capacity")
        if capacity is not None and not (isinstance(capacity, int) and capacity > 0):
            raise ValueError(f"model.moe.expert_capacity={capacity!r} must be a positive integer (None: from "
                             f"model.moe.capacity_factor / eval_capacity_factor)")
        if not 1 <= cfg.moe.k <= cfg.moe.num_experts:
            raise ValueError(f"model.moe.k={cfg.moe.k} must be in [1, model.moe.num_experts="
                             f"{cfg.moe.num_experts}]")
        routers.get(cfg.moe.router).check_config(cfg.moe)


# --------------------------------------------------------------------------------------------- params


def kernel(rngs: nnx.Rngs, shape, names, *, scale: float, in_axis=0, out_axis=-1) -> nnx.Param:
    """A float32 kernel, truncated normal with std sqrt(scale / fan_in) (Switch init), logically named.

    `eager_sharding=False`: the model can be built without a mesh (notebooks, tests); shardings are applied
    by sharding.param_shardings when the state is placed on devices.
    """
    init = jax.nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                                in_axis=in_axis, out_axis=out_axis)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names, eager_sharding=False)


def embedding(rngs: nnx.Rngs, vocab_size: int, d_model: int) -> nnx.Param:
    """The [V, d] token embedding, std 1/sqrt(d): a tied output projection of an RMS-normalised x then gives
    logits of order 1 (the Switch init scale is for the matmul kernels)."""
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)
    return nnx.Param(init(rngs.params(), (vocab_size, d_model), jnp.float32), out_sharding=("vocab", "embed"),
                     eager_sharding=False)


def rms_norm(d_model: int, dtype, rngs: nnx.Rngs, *, eps: float = DEFAULT_NORM_EPS,
             names=("embed",)) -> nnx.RMSNorm:
    return nnx.RMSNorm(d_model, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                       scale_metadata={"out_sharding": names, "eager_sharding": False})


def norm_eps(cfg) -> float:
    return float(cfg.get("norm_eps", DEFAULT_NORM_EPS))


def rotary(x_BLHk: Array, positions_BL: Array, theta: float) -> Array:
    """Rotary position embedding (RoPE, half-split form); angles in float32, result in x's dtype."""
    half = x_BLHk.shape[-1] // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float32) / half)
    angle_BLh = positions_BL.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angle_BLh)[:, :, None, :], jnp.sin(angle_BLh)[:, :, None, :]
    x1, x2 = jnp.split(x_BLHk.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLHk.dtype)


def attention_mask(segment_ids_BL: Array, kv_segment_ids_BT: Optional[Array] = None, *,
                   causal: bool = True) -> Array:
    """[B, 1, L, T] bool: a query sees only keys of its own segment (packed documents), and with `causal`
    (self-attention only) only keys at or before its position.

    `kv_segment_ids_BT`: the keys' segments for cross-attention (None: self-attention, T = L). Padding (segment
    0) attends to padding, so no self-attention row is empty and the softmax never sees only -inf.
    """
    kv_BT = segment_ids_BL if kv_segment_ids_BT is None else kv_segment_ids_BT
    mask_BLT = segment_ids_BL[:, :, None] == kv_BT[:, None, :]
    if causal:
        if kv_segment_ids_BT is not None:
            raise ValueError("attention_mask: a causal mask is for self-attention; pass causal=False with "
                             "kv_segment_ids_BT (cross-attention)")
        L = segment_ids_BL.shape[1]
        mask_BLT = mask_BLT & jnp.tril(jnp.ones((L, L), bool))
    return mask_BLT[:, None]


# --------------------------------------------------------------------------------------------- modules

# How `linear` contracts: "2d" reshapes to one [tokens, in] x [in, out] matmul, "einsum" contracts the named
# axes in place. The same dot on TPU and GPU; on XLA:CPU the 2D form makes whole train steps 1.13-1.26x faster
# (benchmarks/RESULTS.md, "Train step"), so it is the default. benchmarks/train_step.py sets "einsum" to time
# the other form in the same process.
MATMUL_FORM = "2d"


def linear(x: Array, w: Array, *, contract: int = 1, w_transposed: bool = False,
           preferred_element_type=None) -> Array:
    """x [..., *in] times w [*in, *out] -> [..., *out], `in` the last `contract` axes of x and the first of w
    (`w_transposed`: w is [*out, *in], e.g. a tied embedding [V, d] as the output head)."""
    in_shape = x.shape[x.ndim - contract:]
    out_shape = w.shape[:w.ndim - contract] if w_transposed else w.shape[contract:]
    lead = x.shape[:x.ndim - contract]
    if MATMUL_FORM == "einsum":
        axes = range(x.ndim - contract, x.ndim)
        w_axes = range(w.ndim - contract, w.ndim) if w_transposed else range(contract)
        return jax.lax.dot_general(x, w, ((tuple(axes), tuple(w_axes)), ((), ())),
                                   preferred_element_type=preferred_element_type)
    size = math.prod(in_shape)
    w_2d = w.reshape(-1, size).T if w_transposed else w.reshape(size, -1)
    y = jnp.dot(x.reshape(-1, size), w_2d, preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *out_shape)


class Attention(nnx.Module):
    """Multi-head attention with rotary positions; q kernel [d, H, k], k/v kernels [d, Hkv, k] (Hkv =
    `model.num_kv_heads`: grouped-query attention when < H), output kernel [H, k, d].

    Self-attention over x by default; cross-attention from x to `kv_BTd` (an encoder's output) when given.
    Options for imported architectures (moe_jax.convert): `model.qkv_bias` (biases on q, k, v: Qwen2-MoE) and
    `model.qk_norm` ("head": RMSNorm of each head's q and k, Qwen3-MoE; "projection": of the whole q and k
    projections, OLMoE), both applied before the rotary positions.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, H, k, Hkv = cfg.d_model, cfg.num_heads, head_dim(cfg), num_kv_heads(cfg)
        self.dtype = dtype("model.dtype", cfg.dtype)
        self.rope_theta = float(cfg.rope_theta)
        s = cfg.init_scale
        self.query = kernel(rngs, (d, H, k), ("embed", "heads", "kv"), scale=s, in_axis=0, out_axis=(1, 2))
        self.key = kernel(rngs, (d, Hkv, k), ("embed", "heads", "kv"), scale=s, in_axis=0, out_axis=(1, 2))
        self.value = kernel(rngs, (d, Hkv, k), ("embed", "heads", "kv"), scale=s, in_axis=0, out_axis=(1, 2))
        self.out = kernel(rngs, (H, k, d), ("heads", "kv", "embed"), scale=s, in_axis=(0, 1), out_axis=2)
        if cfg.get("qkv_bias", False):
            zeros = lambda heads: nnx.Param(jnp.zeros((heads, k), jnp.float32), out_sharding=("heads", "kv"),
                                            eager_sharding=False)
            self.query_bias, self.key_bias, self.value_bias = zeros(H), zeros(Hkv), zeros(Hkv)
        self.qk_norm = choice("model.qk_norm", cfg.get("qk_norm", "none"), QK_NORMS)
        if self.qk_norm != "none":
            eps = norm_eps(cfg)
            q_width, k_width = (k, k) if self.qk_norm == "head" else (H * k, Hkv * k)
            self.query_norm = rms_norm(q_width, self.dtype, rngs, eps=eps, names=(None,))
            self.key_norm = rms_norm(k_width, self.dtype, rngs, eps=eps, names=(None,))

    def _project(self, x_BLd: Array, name: str) -> Array:
        """[B, L, d] -> [B, L, heads, k]: the q, k or v projection with its bias and norm."""
        out_BLHk = linear(x_BLd, getattr(self, name)[...].astype(self.dtype))
        if hasattr(self, f"{name}_bias"):
            out_BLHk = out_BLHk + getattr(self, f"{name}_bias")[...].astype(self.dtype)
        if name != "value" and self.qk_norm == "head":
            out_BLHk = getattr(self, f"{name}_norm")(out_BLHk)
        elif name != "value" and self.qk_norm == "projection":
            B, L, H, k = out_BLHk.shape
            out_BLHk = getattr(self, f"{name}_norm")(out_BLHk.reshape(B, L, H * k)).reshape(B, L, H, k)
        return out_BLHk

    def __call__(self, x_BLd: Array, *, positions_BL: Optional[Array], mask_B1LT: Optional[Array],
                 kv_BTd: Optional[Array] = None, kv_positions_BT: Optional[Array] = None,
                 causal: bool = True, cache: Optional[tuple[Array, Array]] = None,
                 cache_index: Optional[Array] = None, bias_BHLT: Optional[Array] = None):
        """[B, L, d] -> [B, L, d].

        Args:
          x_BLd: the queries' inputs (and the keys' and values' for self-attention).
          positions_BL: rotary positions of the queries (and of the keys for self-attention); None: no rotary.
          mask_B1LT: bool, True where a query may see a key (`attention_mask`); None: causal, or every key
            when `causal=False`.
          kv_BTd: cross-attention: the keys' and values' inputs. kv_positions_BT: their rotary positions
            (None: keys without rotary).
          causal: with `mask_B1LT=None`, whether a query sees only earlier keys (False: bidirectional).
          cache: self-attention with a KV cache (generation): (keys, values) [B, T, Hkv, k] of every slot so far;
            this call's keys and values are written at slots [cache_index, cache_index + L) and the queries
            attend over all T slots under `mask_B1LT` [B, 1, L, T]. Returns (output, updated cache) then.
          bias_BHLT: an additive attention-logit bias broadcastable to [B, H, L, T] (T5's relative positions).
        """
        dt = self.dtype
        source_BTd = x_BLd if kv_BTd is None else kv_BTd
        source_positions_BT = positions_BL if kv_BTd is None else kv_positions_BT
        q_BLHk = self._project(x_BLd, "query")
        k_BTHk = self._project(source_BTd, "key")  # [B, T, Hkv, k]: heads in groups of H / Hkv share them
        v_BTHk = self._project(source_BTd, "value")
        if positions_BL is not None:
            q_BLHk = rotary(q_BLHk, positions_BL, self.rope_theta)
        if source_positions_BT is not None:
            k_BTHk = rotary(k_BTHk, source_positions_BT, self.rope_theta)
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k_BTHk = jax.lax.dynamic_update_slice(cache[0], k_BTHk.astype(cache[0].dtype), start)
            v_BTHk = jax.lax.dynamic_update_slice(cache[1], v_BTHk.astype(cache[1].dtype), start)
        # Logits and softmax in float32 inside dot_product_attention whatever the input dtype.
        o_BLHk = jax.nn.dot_product_attention(q_BLHk, k_BTHk, v_BTHk, mask=mask_B1LT, bias=bias_BHLT,
                                              is_causal=mask_B1LT is None and causal)
        out_BLd = linear(o_BLHk, self.out[...].astype(dt), contract=2)
        return out_BLd if cache is None else (out_BLd, (k_BTHk, v_BTHk))


class Mlp(nnx.Module):
    """Dense feed-forward: relu/gelu, or gated swiglu/geglu (two input kernels)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, f, s = cfg.d_model, cfg.d_ff, cfg.init_scale
        self.dtype = dtype("model.dtype", cfg.dtype)
        self.activation = choice("model.activation", cfg.activation, ACTIVATIONS)
        self.wi = kernel(rngs, (d, f), ("embed", "mlp"), scale=s)
        if self.activation in ("swiglu", "geglu"):
            self.wi_gate = kernel(rngs, (d, f), ("embed", "mlp"), scale=s)
        self.wo = kernel(rngs, (f, d), ("mlp", "embed"), scale=s)

    def __call__(self, x_BLd: Array) -> Array:
        dt = self.dtype
        h_BLf = linear(x_BLd, self.wi[...].astype(dt))
        if self.activation == "relu":
            h_BLf = jax.nn.relu(h_BLf)
        elif self.activation == "gelu":
            h_BLf = jax.nn.gelu(h_BLf)
        else:
            gate_BLf = linear(x_BLd, self.wi_gate[...].astype(dt))
            act = jax.nn.silu if self.activation == "swiglu" else jax.nn.gelu
            h_BLf = act(gate_BLf) * h_BLf
        return linear(h_BLf, self.wo[...].astype(dt))


def make_moe_layer(cfg, *, rngs: nnx.Rngs):
    """The `MoeLayer` of one MoE layer, configured from `model` and `model.moe`."""
    from moe_jax.moe import MoeLayer  # imported here: the dense model does not need moe.py

    m = cfg.moe
    return MoeLayer(
        d_model=cfg.d_model, d_ff=expert_d_ff(cfg), num_experts=m.num_experts, k=m.k, router=m.router,
        dispatcher=m.dispatcher, capacity_factor=m.capacity_factor,
        eval_capacity_factor=m.eval_capacity_factor, group_size=m.group_size, min_capacity=m.min_capacity,
        expert_capacity=m.get("expert_capacity"), activation=cfg.activation,
        num_shared_experts=m.num_shared_experts, init_scale=cfg.init_scale,
        jitter=m.jitter, expert_dropout=m.expert_dropout, dropout=cfg.dropout, normalize=m.normalize,
        batch_prioritized=m.batch_prioritized, vocab_size=cfg.vocab_size, bias_update_rate=m.bias_update_rate,
        router_dtype=dtype("model.moe.router_dtype", m.router_dtype), dtype=dtype("model.dtype", cfg.dtype),
        shared_d_ff=m.get("shared_d_ff"), shared_expert_gate=m.get("shared_expert_gate", False), rngs=rngs)


# --------------------------------------------------------------------------------------------- loss


def lm_loss(logits_BLV: Array, targets_BL: Array, weights_BL: Optional[Array], moe_aux: dict, *,
            aux_loss_weight: float, z_loss_weight: float) -> tuple[Array, dict]:
    """CE (weighted by `weights_BL`, default 1) + aux_loss_weight * mean_layers(LB) + z_loss_weight *
    mean_layers(z) -> (loss, metrics): `loss`, `ce`, `accuracy`, `load_balancing_loss`, `router_z_loss`,
    `num_tokens` (sum of weights) and `moe` (the per-layer routing aux, stacked on a leading layer axis)."""
    weights_BL = jnp.ones(targets_BL.shape, jnp.float32) if weights_BL is None else weights_BL.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    num_tokens = weights_BL.sum()
    denom = jnp.maximum(num_tokens, 1e-8)
    ce = jnp.sum((log_z_BL - target_logit_BL) * weights_BL) / denom
    accuracy = jnp.sum((jnp.argmax(logits_BLV, axis=-1) == targets_BL) * weights_BL) / denom
    aux = moe_aux
    lb = jnp.mean(aux["load_balancing_loss"]) if "load_balancing_loss" in aux else jnp.zeros((), jnp.float32)
    z = jnp.mean(aux["router_z_loss"]) if "router_z_loss" in aux else jnp.zeros((), jnp.float32)
    loss = ce + aux_loss_weight * lb + z_loss_weight * z
    metrics = dict(loss=loss, ce=ce, accuracy=accuracy, load_balancing_loss=lb, router_z_loss=z,
                   num_tokens=num_tokens, moe=aux)
    return loss, metrics


# --------------------------------------------------------------------------------------------- counting


def _names(variable) -> tuple:
    return tuple(variable.get_metadata().get("out_sharding") or ())


def count_params(model: nnx.Module, *, k: int, num_experts: int) -> dict:
    """Parameter counts from a model's `nnx.Param`s and their logical axis names.

    Returns a dict of ints:
      total: every parameter.
      embedding: parameters with a "vocab" axis (embedding, untied output projection).
      expert: routed-expert parameters (those with an "expert" axis; not shared experts or the router).
      active: parameters one token uses: total - expert + expert * k / E (k / E is each token's share of
        the routed experts; for expert-choice routing it is the average over tokens).
      active_non_embedding: active - embedding (the N of the 6N FLOPs rule).
    """
    total = embedding_ = expert = 0
    for variable in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)):
        size = int(np.prod(variable.shape))
        names = _names(variable)
        total += size
        embedding_ += size if "vocab" in names else 0
        expert += size if "expert" in names else 0
    share = k / num_experts if num_experts > 0 else 0.0
    active = total - expert + int(round(expert * share))
    return dict(total=total, embedding=embedding_, expert=expert, active=active,
                active_non_embedding=active - embedding_)
