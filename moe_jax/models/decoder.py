"""The decoder-only Transformer LM (`model.name="decoder"`, the default family): attention, dense MLPs, an
`MoeLayer` every `moe.every` layers, scanned. Its building blocks are in layers.py; the names at the bottom
(`create`, `loss_fn`, `abstract_batch`, `count_params`, `flops_per_token`, `describe`, `BATCH_FORMAT`) are the
family interface `moe_jax.models.get("decoder")` hands the trainer, the dry run and the sweep.

Axis letters as in layers.py (B batch, L length, T key positions, d, f, H heads, k head dim, V vocabulary).

Layout. A *block* is `moe.every` layers: `every - 1` layers with a dense MLP, then one with an `MoeLayer`
(`every=2` is the Switch Transformer's "every other FFN"; a dense model, `moe.num_experts=0`, has blocks of one
layer). The `num_layers / every` identical blocks are created with `nnx.vmap` and run with `nnx.scan`, so
their parameters carry a leading "layers" axis and compile time does not grow with depth. An MoE model may
start with `moe.first_dense_layers` dense layers (DeepSeek's `first_k_dense_replace`, Qwen's `mlp_only_layers`
as a prefix), a second scanned stack `dense_blocks` of one-layer blocks that runs before `blocks`.

Each layer is pre-norm: x += attn(rms(x)); x += ffn(rms(x)). Attention is causal and, for packed rows,
restricted to the query's own document (`segment_ids`), with rotary positions taken from the packed
`positions`. Parameters are float32; activations run in `model.dtype` (bfloat16 for speed); attention softmax,
normalisation statistics, the router and the logits are float32 (the Switch paper's selective precision).
Parameters carry logical axis names (layers.py), "layers" for the scanned axis.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from ml_collections import config_dict

from moe_jax import sharding
from moe_jax.models import layers
from moe_jax.models.layers import Attention, Mlp, attention_mask, head_dim, is_moe, make_moe_layer

Array = jax.Array
BATCH_FORMAT = "lm"  # the data pipeline's batches: inputs, targets, loss_weights, segment_ids, positions [B, L]


# --------------------------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
    """The `model` section of an experiment config (tiny sizes; experiments override them)."""
    c = ml_collections.ConfigDict()
    c.name = "decoder"  # the model family (moe_jax.models): decoder | encdec
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
    # Options of imported architectures (moe_jax.convert); the defaults are the original model's.
    c.num_kv_heads = config_dict.placeholder(int)  # None: num_heads; fewer: grouped-query attention
    c.qk_norm = "none"  # none | head (RMSNorm per head, Qwen3-MoE) | projection (whole q/k projection, OLMoE)
    c.qkv_bias = False  # biases on the q, k, v projections (Qwen2-MoE)
    c.norm_eps = layers.DEFAULT_NORM_EPS  # of every RMSNorm

    c.moe = ml_collections.ConfigDict()
    c.moe.num_experts = 0  # 0: dense baseline
    c.moe.k = 1
    c.moe.every = 2  # one MoE layer per `every` layers: the last layer of each block
    c.moe.first_dense_layers = 0  # dense layers before the first block (MoE models only)
    c.moe.router = "top_k"
    c.moe.dispatcher = "einsum"
    c.moe.capacity_factor = 1.25
    c.moe.eval_capacity_factor = 2.0
    # generation (moe_jax.generate): None = room for every token of a step in every expert (nothing dropped)
    c.moe.decode_capacity_factor = ml_collections.config_dict.placeholder(float)
    c.moe.group_size = 1024
    c.moe.min_capacity = 1
    # slots per expert per routing group, in training and evaluation; None: from the capacity factors (HF's
    # Switch Transformers: a fixed `expert_capacity` per sequence, i.e. group_size = the sequence length)
    c.moe.expert_capacity = config_dict.placeholder(int)
    c.moe.aux_loss_weight = 1e-2
    c.moe.z_loss_weight = 0.0
    c.moe.jitter = 0.0
    c.moe.router_dtype = "float32"
    c.moe.num_shared_experts = 0
    c.moe.d_ff = config_dict.placeholder(int)  # the routed experts' hidden width; None: model.d_ff
    c.moe.shared_d_ff = config_dict.placeholder(int)  # the shared experts' total width; None: num_shared x d_ff
    c.moe.shared_expert_gate = False  # shared output x sigmoid(x w), w [d, 1] (Qwen2-MoE)
    c.moe.expert_dropout = 0.0
    c.moe.normalize = False
    c.moe.batch_prioritized = False
    c.moe.bias_update_rate = 1e-3
    return c


def layers_per_block(cfg) -> int:
    return cfg.moe.every if is_moe(cfg) else 1


def num_dense_prefix(cfg) -> int:
    """Layers with a dense MLP before the first block (`moe.first_dense_layers`; 0 for a dense model)."""
    prefix = cfg.moe.get("first_dense_layers", 0) if is_moe(cfg) else 0
    if not isinstance(prefix, int) or isinstance(prefix, bool) or not 0 <= prefix < cfg.num_layers:
        raise ValueError(f"model.moe.first_dense_layers={prefix!r} must be an integer in [0, model.num_layers="
                         f"{cfg.num_layers})")
    return prefix


def num_blocks(cfg) -> int:
    every, prefix = layers_per_block(cfg), num_dense_prefix(cfg)
    if every < 1:
        raise ValueError(f"model.moe.every={every} must be >= 1")
    if cfg.num_layers - prefix < 1 or (cfg.num_layers - prefix) % every:
        raise ValueError(f"model.num_layers={cfg.num_layers} minus model.moe.first_dense_layers={prefix} must be a "
                         f"positive multiple of model.moe.every={every}: layers are scanned in identical blocks of "
                         f"`every` layers")
    return (cfg.num_layers - prefix) // every


def validate_config(cfg) -> None:
    """Raises ValueError naming the key for every model setting that cannot work."""
    layers.validate_config(cfg)
    num_blocks(cfg)


# --------------------------------------------------------------------------------------------- modules


class DecoderLayer(nnx.Module):
    """x += attn(rms(x)); x += ffn(rms(x)), where ffn is a dense `Mlp` or an `MoeLayer`."""

    def __init__(self, cfg, *, moe: bool, rngs: nnx.Rngs):
        dt = layers.dtype("model.dtype", cfg.dtype)
        eps = layers.norm_eps(cfg)
        self.attention_norm = layers.rms_norm(cfg.d_model, dt, rngs, eps=eps)
        self.attention = Attention(cfg, rngs=rngs)
        self.ffn_norm = layers.rms_norm(cfg.d_model, dt, rngs, eps=eps)
        self.is_moe = moe
        self.ffn = make_moe_layer(cfg, rngs=rngs) if moe else Mlp(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None

    def _drop(self, x, deterministic):
        return x if self.dropout is None else self.dropout(x, deterministic=deterministic)

    def __call__(self, x_BLd, *, positions_BL, mask_B1LT, padding_mask_BL, token_ids_BL, deterministic,
                 cache=None, cache_index=None, decode_capacity_factor=None, return_routing=False, replay=None):
        """-> (x, aux); with a KV `cache` (generation, see `Transformer.decode`) -> (x, aux, updated cache)."""
        h_BLd = self.attention(self.attention_norm(x_BLd), positions_BL=positions_BL, mask_B1LT=mask_B1LT,
                               cache=cache, cache_index=cache_index)
        if cache is not None:
            h_BLd, cache = h_BLd
        x_BLd = x_BLd + self._drop(h_BLd, deterministic)
        h_BLd = self.ffn_norm(x_BLd)
        aux = {}
        if self.is_moe:
            h_BLd, aux = self.ffn(h_BLd, padding_mask=padding_mask_BL, token_ids=token_ids_BL,
                                  deterministic=deterministic, decode=cache is not None,
                                  decode_capacity_factor=decode_capacity_factor, return_routing=return_routing,
                                  replay=replay)
        else:
            h_BLd = self.ffn(h_BLd)
        x_BLd = x_BLd + self._drop(h_BLd.astype(x_BLd.dtype), deterministic)
        return (x_BLd, aux) if cache is None else (x_BLd, aux, cache)


class Block(nnx.Module):
    """`num_layers` layers (default `layers_per_block`); the last one holds the MoE layer when `moe`."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, num_layers: Optional[int] = None, moe: Optional[bool] = None):
        n = layers_per_block(cfg) if num_layers is None else num_layers
        moe = is_moe(cfg) if moe is None else moe
        self.layers = nnx.List([DecoderLayer(cfg, moe=moe and i == n - 1, rngs=rngs) for i in range(n)])

    def __call__(self, x_BLd, cache=None, **kwargs):
        """-> (x, aux); with a KV `cache` (keys, values) [layers_per_block, B, T, H, k] -> (x, aux, cache)."""
        aux, keys, values = {}, [], []
        for i, layer in enumerate(self.layers):
            if cache is None:
                x_BLd, layer_aux = layer(x_BLd, **kwargs)
            else:
                x_BLd, layer_aux, (k, v) = layer(x_BLd, cache=(cache[0][i], cache[1][i]), **kwargs)
                keys.append(k)
                values.append(v)
            aux.update(layer_aux)
        return (x_BLd, aux) if cache is None else (x_BLd, aux, (jnp.stack(keys), jnp.stack(values)))


class Transformer(nnx.Module):
    """Decoder-only causal LM.

    `Transformer(config.model, rngs=nnx.Rngs(0))`; for dropout or router jitter in training give a
    `dropout` stream too (e.g. `nnx.Rngs(params=0, dropout=1)`); otherwise the default stream is used.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate_config(cfg)
        cfg = ml_collections.FrozenConfigDict(cfg)  # static and hashable; later edits cannot reach the model
        self.config = cfg
        self.dtype = layers.dtype("model.dtype", cfg.dtype)
        d, V = cfg.d_model, cfg.vocab_size
        self.embedding = layers.embedding(rngs, V, d)
        if not cfg.tie_embeddings:
            self.unembedding = layers.kernel(rngs, (d, V), ("embed", "vocab"), scale=cfg.init_scale)

        def stack(count, **block_kwargs):
            @nnx.split_rngs(splits=count)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs):
                return Block(cfg, rngs=rngs, **block_kwargs)

            return make_blocks(rngs)

        if num_dense_prefix(cfg):
            self.dense_blocks = stack(num_dense_prefix(cfg), num_layers=1, moe=False)
        self.blocks = stack(num_blocks(cfg))
        self.final_norm = layers.rms_norm(d, self.dtype, rngs, eps=layers.norm_eps(cfg))
        remat, self._remat_policy = layers.remat_policy(cfg.remat)
        self._remat = remat

    def __call__(self, inputs: Array, *, segment_ids: Optional[Array] = None, positions: Optional[Array] = None,
                 deterministic: bool = False, return_routing: bool = False,
                 replay: Optional[tuple[Array, Array]] = None) -> tuple[Array, dict]:
        """Next-token logits.

        Args:
          inputs: [B, L] int token ids.
          segment_ids: [B, L] int, 1..n per packed document, 0 for padding; None: one document per row.
            Tokens attend only to earlier tokens of their own segment; padding is not routed to experts.
          positions: [B, L] int position of each token within its document (rotary); None: 0..L-1.
          deterministic: eval mode (no dropout or router jitter; MoE layers use the eval capacity factor).
          return_routing: aux also holds each MoE layer's `expert_index` / `routing_weight` [layers, B, L, K].
          replay: router replay (`moe.MoeLayer`): recorded (expert_index, weight) [layers, B, L, K] used instead
            of the routers' choices, e.g. a generation trace (`generate.generate(..., trace=True)`).

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
                            token_ids_BL=inputs, deterministic=deterministic, return_routing=return_routing)

        def block_fn(block, x_BLd, block_replay):
            extra = {} if block_replay is None else dict(replay=block_replay)
            x_BLd, aux = block(x_BLd, **layer_kwargs, **extra)
            return sharding.constrain(x_BLd, ("batch", "length", "embed")), aux

        if self._remat:
            block_fn = nnx.remat(block_fn, policy=self._remat_policy)

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan_blocks(x_BLd, block, block_replay):
            return block_fn(block, x_BLd, block_replay)

        if replay is not None and not is_moe(self.config):
            raise ValueError("replay: this model has no MoE layer to replay routing into")
        if hasattr(self, "dense_blocks"):
            x_BLd, _ = scan_blocks(x_BLd, self.dense_blocks, None)
        x_BLd, aux = scan_blocks(x_BLd, self.blocks, replay)
        return self._logits(x_BLd), aux

    def _stacks(self) -> dict:
        """The scanned stacks in the order they run: {attribute name: (blocks, layers per block)}."""
        prefix = {"dense_blocks": (num_dense_prefix(self.config), 1)} if hasattr(self, "dense_blocks") else {}
        return {**prefix, "blocks": (num_blocks(self.config), layers_per_block(self.config))}

    def init_cache(self, batch_size: int, length: int) -> dict[str, tuple[Array, Array]]:
        """An empty KV cache for `decode`: {stack: (keys, values) [blocks, layers per block, B, T, Hkv, k]}."""
        cfg = self.config
        cache = {}
        for name, (count, per_block) in self._stacks().items():
            shape = (count, per_block, batch_size, length, layers.num_kv_heads(cfg), layers.head_dim(cfg))
            cache[name] = (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
        return cache

    def decode(self, inputs: Array, *, positions_BL: Array, mask_B1LT: Array, padding_mask_BL: Array,
               cache: dict[str, tuple[Array, Array]], index: Array, decode_capacity_factor: Optional[float] = None,
               return_routing: bool = False):
        """Generation: logits of `inputs` [B, L] written at cache slots [index, index + L) -> (logits, cache,
        aux), aux holding each MoE layer's `expert_index` / `routing_weight` [layers, B, L, K] with
        `return_routing`.

        `mask_B1LT` says which of the T cache slots each query sees (causal, and not the prompts' padding);
        `padding_mask_BL` which inputs are real (padding is not routed). MoE layers route in decode mode (the
        call's tokens form one group; `decode_capacity_factor` None: nothing is dropped). No dropout."""
        x_BLd = jnp.take(self.embedding[...], inputs, axis=0).astype(self.dtype)
        layer_kwargs = dict(positions_BL=positions_BL, mask_B1LT=mask_B1LT, padding_mask_BL=padding_mask_BL,
                            token_ids_BL=inputs, deterministic=True, cache_index=index,
                            decode_capacity_factor=decode_capacity_factor, return_routing=return_routing)

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0, 0),
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan_blocks(x_BLd, block, block_cache):
            x_BLd, aux, block_cache = block(x_BLd, cache=block_cache, **layer_kwargs)
            return x_BLd, block_cache, aux

        cache = dict(cache)
        if "dense_blocks" in cache:
            x_BLd, cache["dense_blocks"], _ = scan_blocks(x_BLd, self.dense_blocks, cache["dense_blocks"])
        x_BLd, cache["blocks"], aux = scan_blocks(x_BLd, self.blocks, cache["blocks"])
        return self._logits(x_BLd), cache, aux

    def _logits(self, x_BLd: Array) -> Array:
        x_BLd = self.final_norm(x_BLd)
        if self.config.tie_embeddings:
            logits_BLV = layers.linear(x_BLd, self.embedding[...].astype(self.dtype), w_transposed=True,
                                       preferred_element_type=jnp.float32)
        else:
            logits_BLV = layers.linear(x_BLd, self.unembedding[...].astype(self.dtype),
                                       preferred_element_type=jnp.float32)
        return sharding.constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))


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
    return layers.lm_loss(logits_BLV, batch["targets"], batch.get("loss_weights"), aux,
                          aux_loss_weight=aux_loss_weight, z_loss_weight=z_loss_weight)


# --------------------------------------------------------------------------------------------- counting


def count_params(model: Transformer) -> dict:
    """Parameter counts (`layers.count_params`): total, embedding, expert, active, active_non_embedding."""
    moe = model.config.moe
    return layers.count_params(model, k=moe.k, num_experts=moe.num_experts)


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


# --------------------------------------------------------------------------------------------- family


def create(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Transformer:
    """The model of `config.model` (the family interface's constructor)."""
    return Transformer(cfg, rngs=rngs)


def abstract_batch(batch_size: int, seq_len: int, batch_sharding: Optional[jax.sharding.Sharding] = None, *,
                   data_config=None) -> dict:
    """The `lm` batch `loss_fn` reads, as ShapeDtypeStructs [batch_size, seq_len] placed by `batch_sharding`
    (dry run, ahead-of-time compilation). `data_config` is unused: an LM row is `seq_len` tokens whatever the
    data."""
    del data_config
    spec = lambda dtype: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=batch_sharding)
    return dict(inputs=spec(jnp.int32), targets=spec(jnp.int32), loss_weights=spec(jnp.float32),
                segment_ids=spec(jnp.int32), positions=spec(jnp.int32))


def describe(cfg) -> str:
    """The start-up header's words on the layout: where the experts are, or "(dense)"."""
    if not is_moe(cfg):
        return " (dense)"
    prefix = f" after {num_dense_prefix(cfg)} dense layers" if num_dense_prefix(cfg) else ""
    return (f"; {cfg.moe.num_experts} experts every {cfg.moe.every} layers{prefix}, routing groups of "
            f"{cfg.moe.group_size} tokens")
