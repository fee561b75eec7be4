"""The decoder-only Transformer LM: attention, dense MLPs, an `MoeLayer` every `moe.every` layers, scanned.

Axis letters (besides routing.py's G S E C K): B batch, L length (query positions), T key positions,
d model width, f MLP hidden width, H heads, k head dim (`head_dim`), V vocabulary.

Layout. A *block* is `moe.every` layers: `every - 1` layers with a dense MLP, then one with an `MoeLayer`
(`every=2` is the Switch Transformer's "every other FFN"; a dense model, `moe.num_experts=0`, has blocks of one
layer). The `num_layers / every` identical blocks are created with `nnx.vmap` and run with `nnx.scan`, so
their parameters carry a leading "layers" axis and compile time does not grow with depth.

Each layer is pre-norm: x += attn(rms(x)); x += ffn(rms(x)). Attention is causal and, for packed rows,
restricted to the query's own document (`segment_ids`), with rotary positions taken from the packed
`positions`. Parameters are float32; activations run in `model.dtype` (bfloat16 for speed); attention softmax,
normalisation statistics, the router and the logits are float32 (the Switch paper's selective precision).

Every parameter carries logical axis names (`out_sharding` metadata): "vocab", "embed", "heads", "kv" (head
dim), "mlp", "expert", and "layers" for the scanned axis. sharding.py maps them onto the mesh.
"""

from __future__ import annotations

import difflib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from ml_collections import config_dict

from moe_jax import dispatch, routers, sharding

Array = jax.Array

ACTIVATIONS = ("relu", "gelu", "swiglu", "geglu")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


# --------------------------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
    """The `model` section of an experiment config (tiny sizes; experiments override them)."""
    c = ml_collections.ConfigDict()
    c.vocab_size = 256
    c.d_model = 128
    c.d_ff = 512
    c.num_layers = 4
    c.num_heads = 4
    c.head_dim = config_dict.placeholder(int)  # None: d_model // num_heads
    c.activation = "relu"  # relu | gelu | swiglu | geglu (dense MLPs and experts alike)
    c.tie_embeddings = True
    c.init_scale = 0.1  # Switch: truncated normal, std = sqrt(init_scale / fan_in), for every kernel
    c.dtype = "float32"  # compute dtype: float32 | bfloat16; parameters are always float32
    c.remat = "none"  # none | full (save nothing) | a jax.checkpoint_policies name, e.g. "dots_saveable"
    c.dropout = 0.0
    c.rope_theta = 10_000.0

    c.moe = ml_collections.ConfigDict()
    c.moe.num_experts = 0  # 0: dense baseline
    c.moe.k = 1
    c.moe.every = 2  # one MoE layer per `every` layers: the last layer of each block
    c.moe.router = "top_k"
    c.moe.dispatcher = "einsum"
    c.moe.capacity_factor = 1.25
    c.moe.eval_capacity_factor = 2.0
    c.moe.group_size = 1024
    c.moe.min_capacity = 1
    c.moe.aux_loss_weight = 1e-2
    c.moe.z_loss_weight = 0.0
    c.moe.jitter = 0.0
    c.moe.router_dtype = "float32"
    c.moe.num_shared_experts = 0
    c.moe.expert_dropout = 0.0
    c.moe.normalize = False
    c.moe.batch_prioritized = False
    c.moe.bias_update_rate = 1e-3
    return c


def _choice(key: str, value: Any, allowed) -> Any:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{key}={value!r} is not one of {tuple(allowed)}{hint}")
    return value


def _dtype(key: str, name: str):
    return DTYPES[_choice(key, name, DTYPES)]


def head_dim(cfg) -> int:
    if cfg.get("head_dim") is not None:
        return int(cfg.head_dim)
    if cfg.d_model % cfg.num_heads:
        raise ValueError(f"model.d_model={cfg.d_model} is not divisible by model.num_heads={cfg.num_heads}; "
                         "set model.head_dim")
    return cfg.d_model // cfg.num_heads


def is_moe(cfg) -> bool:
    return cfg.moe.num_experts > 0


def layers_per_block(cfg) -> int:
    return cfg.moe.every if is_moe(cfg) else 1


def num_blocks(cfg) -> int:
    every = layers_per_block(cfg)
    if every < 1:
        raise ValueError(f"model.moe.every={every} must be >= 1")
    if cfg.num_layers < 1 or cfg.num_layers % every:
        raise ValueError(f"model.num_layers={cfg.num_layers} must be a positive multiple of "
                         f"model.moe.every={every}: layers are scanned in identical blocks of `every` layers")
    return cfg.num_layers // every


def _remat_policy(value):
    """model.remat -> (enabled, policy): "none"/False, "full"/True (save nothing, recompute the whole
    block), or the name of a jax.checkpoint_policies policy (e.g. "dots_saveable")."""
    if value is False or value is None or value == "none":
        return False, None
    if value is True or value == "full":
        return True, None
    name = _choice("model.remat", value, ("none", "full") + REMAT_POLICIES)
    return True, getattr(jax.checkpoint_policies, name)


def validate_config(cfg) -> None:
    """Raises ValueError naming the key for every model setting that cannot work."""
    for key in ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads"):
        if not (isinstance(cfg[key], int) and cfg[key] > 0):
            raise ValueError(f"model.{key}={cfg[key]!r} must be a positive integer")
    _choice("model.activation", cfg.activation, ACTIVATIONS)
    _dtype("model.dtype", cfg.dtype)
    _remat_policy(cfg.remat)
    if head_dim(cfg) % 2:
        raise ValueError(f"head dim {head_dim(cfg)} must be even for rotary positions (model.head_dim)")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout={cfg.dropout} must be in [0, 1)")
    if not cfg.init_scale > 0:
        raise ValueError(f"model.init_scale={cfg.init_scale} must be > 0")
    if cfg.moe.num_experts < 0:
        raise ValueError(f"model.moe.num_experts={cfg.moe.num_experts} must be >= 0 (0 = dense)")
    if is_moe(cfg):
        _dtype("model.moe.router_dtype", cfg.moe.router_dtype)
        _choice("model.moe.router", cfg.moe.router, routers.NAMES)
        _choice("model.moe.dispatcher", cfg.moe.dispatcher, dispatch.DISPATCHERS)
        if not 1 <= cfg.moe.k <= cfg.moe.num_experts:
            raise ValueError(f"model.moe.k={cfg.moe.k} must be in [1, model.moe.num_experts="
                             f"{cfg.moe.num_experts}]")
        routers.get(cfg.moe.router).check_config(cfg.moe)
    num_blocks(cfg)


# --------------------------------------------------------------------------------------------- params


def _kernel(rngs: nnx.Rngs, shape, names, *, scale: float, in_axis=0, out_axis=-1) -> nnx.Param:
    """A float32 kernel, truncated normal with std sqrt(scale / fan_in) (Switch init), logically named.

    `eager_sharding=False`: the model can be built without a mesh (notebooks, tests); shardings are applied
    by sharding.param_shardings when the state is placed on devices.
    """
    init = jax.nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                                in_axis=in_axis, out_axis=out_axis)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names, eager_sharding=False)


def _rms_norm(d_model: int, dtype, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                       scale_metadata={"out_sharding": ("embed",), "eager_sharding": False})


def rotary(x_BLHk: Array, positions_BL: Array, theta: float) -> Array:
    """Rotary position embedding (RoPE, half-split form); angles in float32, result in x's dtype."""
    half = x_BLHk.shape[-1] // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float32) / half)
    angle_BLh = positions_BL.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angle_BLh)[:, :, None, :], jnp.sin(angle_BLh)[:, :, None, :]
    x1, x2 = jnp.split(x_BLHk.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLHk.dtype)


def attention_mask(segment_ids_BL: Array) -> Array:
    """[B, 1, L, T] bool: causal, and only within the query's own segment (packed documents).

    Padding (segment 0) attends to earlier padding, so no row is empty and the softmax never sees only -inf.
    """
    L = segment_ids_BL.shape[1]
    causal_LT = jnp.tril(jnp.ones((L, L), bool))
    same_BLT = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return (same_BLT & causal_LT)[:, None]


# --------------------------------------------------------------------------------------------- modules


class Attention(nnx.Module):
    """Multi-head self-attention with rotary positions; q/k/v kernels [d, H, k], output kernel [H, k, d]."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, H, k = cfg.d_model, cfg.num_heads, head_dim(cfg)
        self.dtype = _dtype("model.dtype", cfg.dtype)
        self.rope_theta = float(cfg.rope_theta)
        s = cfg.init_scale
        self.query = _kernel(rngs, (d, H, k), ("embed", "heads", "kv"), scale=s, in_axis=0, out_axis=(1, 2))
        self.key = _kernel(rngs, (d, H, k), ("embed", "heads", "kv"), scale=s, in_axis=0, out_axis=(1, 2))
        self.value = _kernel(rngs, (d, H, k), ("embed", "heads", "kv"), scale=s, in_axis=0, out_axis=(1, 2))
        self.out = _kernel(rngs, (H, k, d), ("heads", "kv", "embed"), scale=s, in_axis=(0, 1), out_axis=2)

    def __call__(self, x_BLd: Array, *, positions_BL: Array, mask_B1LT: Optional[Array]) -> Array:
        dt = self.dtype
        q_BLHk = jnp.einsum("BLd,dHk->BLHk", x_BLd, self.query[...].astype(dt))
        k_BTHk = jnp.einsum("BTd,dHk->BTHk", x_BLd, self.key[...].astype(dt))
        v_BTHk = jnp.einsum("BTd,dHk->BTHk", x_BLd, self.value[...].astype(dt))
        q_BLHk = rotary(q_BLHk, positions_BL, self.rope_theta)
        k_BTHk = rotary(k_BTHk, positions_BL, self.rope_theta)
        # Logits and softmax in float32 inside dot_product_attention whatever the input dtype.
        o_BLHk = jax.nn.dot_product_attention(q_BLHk, k_BTHk, v_BTHk, mask=mask_B1LT,
                                              is_causal=mask_B1LT is None)
        return jnp.einsum("BLHk,Hkd->BLd", o_BLHk, self.out[...].astype(dt))


class Mlp(nnx.Module):
    """Dense feed-forward: relu/gelu, or gated swiglu/geglu (two input kernels)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, f, s = cfg.d_model, cfg.d_ff, cfg.init_scale
        self.dtype = _dtype("model.dtype", cfg.dtype)
        self.activation = _choice("model.activation", cfg.activation, ACTIVATIONS)
        self.wi = _kernel(rngs, (d, f), ("embed", "mlp"), scale=s)
        if self.activation in ("swiglu", "geglu"):
            self.wi_gate = _kernel(rngs, (d, f), ("embed", "mlp"), scale=s)
        self.wo = _kernel(rngs, (f, d), ("mlp", "embed"), scale=s)

    def __call__(self, x_BLd: Array) -> Array:
        dt = self.dtype
        h_BLf = jnp.einsum("BLd,df->BLf", x_BLd, self.wi[...].astype(dt))
        if self.activation == "relu":
            h_BLf = jax.nn.relu(h_BLf)
        elif self.activation == "gelu":
            h_BLf = jax.nn.gelu(h_BLf)
        else:
            gate_BLf = jnp.einsum("BLd,df->BLf", x_BLd, self.wi_gate[...].astype(dt))
            act = jax.nn.silu if self.activation == "swiglu" else jax.nn.gelu
            h_BLf = act(gate_BLf) * h_BLf
        return jnp.einsum("BLf,fd->BLd", h_BLf, self.wo[...].astype(dt))


def make_moe_layer(cfg, *, rngs: nnx.Rngs):
    """The `MoeLayer` of one MoE layer, configured from `model` and `model.moe`."""
    from moe_jax.moe import MoeLayer  # imported here: the dense model does not need moe.py

    m = cfg.moe
    return MoeLayer(
        d_model=cfg.d_model, d_ff=cfg.d_ff, num_experts=m.num_experts, k=m.k, router=m.router,
        dispatcher=m.dispatcher, capacity_factor=m.capacity_factor,
        eval_capacity_factor=m.eval_capacity_factor, group_size=m.group_size, min_capacity=m.min_capacity,
        activation=cfg.activation, num_shared_experts=m.num_shared_experts, init_scale=cfg.init_scale,
        jitter=m.jitter, expert_dropout=m.expert_dropout, dropout=cfg.dropout, normalize=m.normalize,
        batch_prioritized=m.batch_prioritized, vocab_size=cfg.vocab_size, bias_update_rate=m.bias_update_rate,
        router_dtype=_dtype("model.moe.router_dtype", m.router_dtype), dtype=_dtype("model.dtype", cfg.dtype),
        rngs=rngs)


class DecoderLayer(nnx.Module):
    """x += attn(rms(x)); x += ffn(rms(x)), where ffn is a dense `Mlp` or an `MoeLayer`."""

    def __init__(self, cfg, *, moe: bool, rngs: nnx.Rngs):
        dt = _dtype("model.dtype", cfg.dtype)
        self.attention_norm = _rms_norm(cfg.d_model, dt, rngs)
        self.attention = Attention(cfg, rngs=rngs)
        self.ffn_norm = _rms_norm(cfg.d_model, dt, rngs)
        self.is_moe = moe
        self.ffn = make_moe_layer(cfg, rngs=rngs) if moe else Mlp(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None

    def _drop(self, x, deterministic):
        return x if self.dropout is None else self.dropout(x, deterministic=deterministic)

    def __call__(self, x_BLd, *, positions_BL, mask_B1LT, padding_mask_BL, token_ids_BL, deterministic):
        h_BLd = self.attention(self.attention_norm(x_BLd), positions_BL=positions_BL, mask_B1LT=mask_B1LT)
        x_BLd = x_BLd + self._drop(h_BLd, deterministic)
        h_BLd = self.ffn_norm(x_BLd)
        aux = {}
        if self.is_moe:
            h_BLd, aux = self.ffn(h_BLd, padding_mask=padding_mask_BL, token_ids=token_ids_BL,
                                  deterministic=deterministic)
        else:
            h_BLd = self.ffn(h_BLd)
        x_BLd = x_BLd + self._drop(h_BLd.astype(x_BLd.dtype), deterministic)
        return x_BLd, aux


class Block(nnx.Module):
    """`layers_per_block` layers; the last one holds the MoE layer when the model has experts."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        n = layers_per_block(cfg)
        self.layers = nnx.List([DecoderLayer(cfg, moe=is_moe(cfg) and i == n - 1, rngs=rngs) for i in range(n)])

    def __call__(self, x_BLd, **kwargs):
        aux = {}
        for layer in self.layers:
            x_BLd, layer_aux = layer(x_BLd, **kwargs)
            aux.update(layer_aux)
        return x_BLd, aux


class Transformer(nnx.Module):
    """Decoder-only causal LM.

    `Transformer(config.model, rngs=nnx.Rngs(0))`; for dropout or router jitter in training give a
    `dropout` stream too (e.g. `nnx.Rngs(params=0, dropout=1)`); otherwise the default stream is used.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate_config(cfg)
        cfg = ml_collections.FrozenConfigDict(cfg)  # static and hashable; later edits cannot reach the model
        self.config = cfg
        self.dtype = _dtype("model.dtype", cfg.dtype)
        d, V = cfg.d_model, cfg.vocab_size
        # Embedding: std 1/sqrt(d), so that the tied output projection of an RMS-normalised x has logits of
        # order 1. The Switch init scale is for the matmul kernels.
        embed_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)
        self.embedding = nnx.Param(embed_init(rngs.params(), (V, d), jnp.float32), out_sharding=("vocab", "embed"),
                                   eager_sharding=False)
        if not cfg.tie_embeddings:
            self.unembedding = _kernel(rngs, (d, V), ("embed", "vocab"), scale=cfg.init_scale)

        @nnx.split_rngs(splits=num_blocks(cfg))
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = _rms_norm(d, self.dtype, rngs)
        remat, self._remat_policy = _remat_policy(cfg.remat)
        self._remat = remat

    def __call__(self, inputs: Array, *, segment_ids: Optional[Array] = None, positions: Optional[Array] = None,
                 deterministic: bool = False) -> tuple[Array, dict]:
        """Next-token logits.

        Args:
          inputs: [B, L] int token ids.
          segment_ids: [B, L] int, 1..n per packed document, 0 for padding; None: one document per row.
            Tokens attend only to earlier tokens of their own segment; padding is not routed to experts.
          positions: [B, L] int position of each token within its document (rotary); None: 0..L-1.
          deterministic: eval mode (no dropout or router jitter; MoE layers use the eval capacity factor).

        Returns:
          logits [B, L, V] float32, and aux: each MoE layer's routing metrics stacked on a leading axis of
          size num_layers / moe.every (MoE layer index; empty dict for a dense model).
        """
        B, L = inputs.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        mask_B1LT = None if segment_ids is None else attention_mask(segment_ids)
        padding_mask_BL = None if segment_ids is None else segment_ids > 0

        x_BLd = jnp.take(self.embedding[...], inputs, axis=0).astype(self.dtype)
        x_BLd = sharding.constrain(x_BLd, ("batch", "length", "embed"))
        layer_kwargs = dict(positions_BL=positions, mask_B1LT=mask_B1LT, padding_mask_BL=padding_mask_BL,
                            token_ids_BL=inputs, deterministic=deterministic)

        def block_fn(block, x_BLd):
            x_BLd, aux = block(x_BLd, **layer_kwargs)
            return sharding.constrain(x_BLd, ("batch", "length", "embed")), aux

        if self._remat:
            block_fn = nnx.remat(block_fn, policy=self._remat_policy)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan_blocks(x_BLd, block):
            return block_fn(block, x_BLd)

        x_BLd, aux = scan_blocks(x_BLd, self.blocks)
        x_BLd = self.final_norm(x_BLd)
        if self.config.tie_embeddings:
            logits_BLV = jnp.einsum("BLd,Vd->BLV", x_BLd, self.embedding[...].astype(self.dtype),
                                    preferred_element_type=jnp.float32)
        else:
            logits_BLV = jnp.einsum("BLd,dV->BLV", x_BLd, self.unembedding[...].astype(self.dtype),
                                    preferred_element_type=jnp.float32)
        logits_BLV = sharding.constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))
        return logits_BLV, aux


# --------------------------------------------------------------------------------------------- loss


def loss_fn(model: Transformer, batch: dict, *, deterministic: bool, aux_loss_weight: float,
            z_loss_weight: float) -> tuple[Array, dict]:
    """CE (weighted by `loss_weights`) + aux_loss_weight * mean_layers(LB) + z_loss_weight * mean_layers(z).

    Args:
      batch: `inputs`, `targets` [B, L] int; optional `loss_weights` [B, L] float (default 1),
        `segment_ids`, `positions` [B, L] int (packed rows).

    Returns:
      (loss, metrics): scalars `loss`, `ce`, `accuracy`, `load_balancing_loss`, `router_z_loss` (means over
      MoE layers; 0 for a dense model), `num_tokens` (sum of loss weights), and `moe`: the per-layer routing
      metrics from the model's aux ({} for a dense model).
    """
    logits_BLV, aux = model(batch["inputs"], segment_ids=batch.get("segment_ids"),
                            positions=batch.get("positions"), deterministic=deterministic)
    targets_BL = batch["targets"]
    weights_BL = batch.get("loss_weights")
    weights_BL = jnp.ones(targets_BL.shape, jnp.float32) if weights_BL is None else weights_BL.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    num_tokens = weights_BL.sum()
    denom = jnp.maximum(num_tokens, 1e-8)
    ce = jnp.sum((log_z_BL - target_logit_BL) * weights_BL) / denom
    accuracy = jnp.sum((jnp.argmax(logits_BLV, axis=-1) == targets_BL) * weights_BL) / denom
    lb = jnp.mean(aux["load_balancing_loss"]) if "load_balancing_loss" in aux else jnp.zeros((), jnp.float32)
    z = jnp.mean(aux["router_z_loss"]) if "router_z_loss" in aux else jnp.zeros((), jnp.float32)
    loss = ce + aux_loss_weight * lb + z_loss_weight * z
    metrics = dict(loss=loss, ce=ce, accuracy=accuracy, load_balancing_loss=lb, router_z_loss=z,
                   num_tokens=num_tokens, moe=aux)
    return loss, metrics


# --------------------------------------------------------------------------------------------- counting


def _names(variable) -> tuple:
    return tuple(variable.get_metadata().get("out_sharding") or ())


def count_params(model: Transformer) -> dict:
    """Parameter counts from the model's `nnx.Param`s and their logical axis names.

    Returns a dict of ints:
      total: every parameter.
      embedding: parameters with a "vocab" axis (embedding, untied output projection).
      expert: routed-expert parameters (those with an "expert" axis; not shared experts or the router).
      active: parameters one token uses: total - expert + expert * k / E (k / E is each token's share of
        the routed experts; for expert-choice routing it is the average over tokens).
      active_non_embedding: active - embedding (the N of the 6N FLOPs rule).
    """
    cfg = model.config
    total = embedding = expert = 0
    for variable in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)):
        size = int(np.prod(variable.shape))
        names = _names(variable)
        total += size
        embedding += size if "vocab" in names else 0
        expert += size if "expert" in names else 0
    share = cfg.moe.k / cfg.moe.num_experts if is_moe(cfg) else 0.0
    active = total - expert + int(round(expert * share))
    return dict(total=total, embedding=embedding, expert=expert, active=active,
                active_non_embedding=active - embedding)


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM appendix B accounting used for MFU.

    6 * (active non-embedding params + the d x V output projection) + 12 * num_layers * H * k * seq_len
    (attention scores and values, counted for the full L x L square as in PaLM, not halved for causality).
    Router, capacity padding and dropped tokens are not counted: these are model FLOPs, not hardware FLOPs.
    """
    cfg = model.config
    counts = count_params(model)
    matmul_params = counts["active_non_embedding"] + cfg.d_model * cfg.vocab_size
    attention = 12 * cfg.num_layers * cfg.num_heads * head_dim(cfg) * seq_len
    return float(6 * matmul_params + attention)
