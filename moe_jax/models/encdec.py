"""The T5.1.1-style encoder-decoder (`model.name="encdec"`), Switch layers in both stacks.

    model = models.get("encdec").create(cfg.model, nnx.Rngs(params=0, dropout=1))
    logits_BLV, aux = model(encoder_tokens_BL, decoder_tokens_BL, encoder_segment_ids=..., decoder_segment_ids=...)

T5.1.1 (Raffel et al. 2020; the v1.1 checkpoints): RMSNorm without bias before every sublayer, no absolute
positions but a learned relative position bias (`relative_attention_num_buckets` buckets, log-spaced out to
`relative_attention_max_distance`; bidirectional in the encoder, causal in the decoder; one bias table per
stack, shared by its layers), gated-GELU MLPs by default, input embedding shared by both stacks and untied
from the output head (`tie_embeddings=True`: T5 v1.0's tied head, applied to the output / sqrt(d_model)).
The decoder reads the targets shifted right. Every `moe.encoder_every`-th encoder FFN
and every `moe.decoder_every`-th decoder FFN is an `MoeLayer` (both default to `moe.every`): Switch puts one
in every other FFN of both stacks. Packed examples: encoder and decoder segment ids keep self- and
cross-attention inside one example. Decoder routing is causal with the default top-k router; the encoder may
use `moe.batch_prioritized` or expert choice, which look at the whole input.

Attention scales logits by 1/sqrt(head dim) (jax.nn.dot_product_attention); T5 instead folds that factor
into its initialisation. As in the decoder, each stack is a scan over identical *blocks* of `moe.<stack>_every`
layers (the last one MoE; one layer per block in a dense model), created with `nnx.vmap`, so the parameters carry
a leading "layers" axis and compile time does not grow with depth; `model.remat` rematerialises each block in
the backward pass.

Aux: `aux["encoder"]` and `aux["decoder"]` hold each stack's MoE-layer metrics stacked on a leading layer
axis; `loss_fn` reports their concatenation (encoder layers first) as `metrics["moe"]`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax import sharding
from moe_jax.models import decoder, layers

Array = jax.Array
BATCH_FORMAT = "span_corruption"


def default_config() -> ml_collections.ConfigDict:
    c = decoder.default_config()
    c.name = "encdec"
    c.activation = "geglu"
    c.tie_embeddings = False
    c.num_encoder_layers = 2
    c.num_decoder_layers = 2
    c.relative_attention_num_buckets = 32
    c.relative_attention_max_distance = 128
    c.moe.encoder_every = ml_collections.config_dict.placeholder(int)  # None: moe.every
    c.moe.decoder_every = ml_collections.config_dict.placeholder(int)
    # Routing group of the decoder stack, whose rows are the shorter targets; None: model.moe.group_size. The
    # trainer sets it to what fits the decoder's tokens per device (config_validation.decoder_group_size).
    c.moe.decoder_group_size = ml_collections.config_dict.placeholder(int)
    return c


def moe_every(cfg, stack: str) -> int:
    every = cfg.moe.get(f"{stack}_every")
    every = cfg.moe.every if every is None else every
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"model.moe.{stack}_every={every!r} must be a positive integer (None: model.moe.every)")
    return every


def layers_per_block(cfg, stack: str) -> int:
    return moe_every(cfg, stack) if layers.is_moe(cfg) else 1


def num_blocks(cfg, stack: str) -> int:
    count, every = cfg[f"num_{stack}_layers"], layers_per_block(cfg, stack)
    if count % every:
        raise ValueError(f"model.num_{stack}_layers={count} must be a multiple of model.moe.{stack}_every={every}: "
                         f"each stack is scanned in identical blocks of `every` layers")
    return count // every


def validate_config(cfg) -> None:
    layers.validate_config(cfg)
    for key in ("num_encoder_layers", "num_decoder_layers", "relative_attention_num_buckets",
                "relative_attention_max_distance"):
        if not (isinstance(cfg.get(key), int) and cfg[key] > 0):
            raise ValueError(f"model.{key}={cfg.get(key)!r} must be a positive integer")
    if cfg.relative_attention_num_buckets % 2:
        raise ValueError(f"model.relative_attention_num_buckets={cfg.relative_attention_num_buckets} must be even "
                         f"(half of them for each direction in the encoder)")
    for stack in ("encoder", "decoder"):
        moe_every(cfg, stack)
        num_blocks(cfg, stack)


def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's bucketing of `key position - query position`: exact for small distances, log-spaced beyond, all
    distances past `max_distance` in the last bucket; in one direction only when not bidirectional."""
    bucket = jnp.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    scaled = jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps) / np.log(max_distance / max_exact)
    large = jnp.minimum(max_exact + (scaled * (num_buckets - max_exact)).astype(jnp.int32), num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


class RelativePositionBias(nnx.Module):
    """One learned bias per (bucket, head), shared by every layer of a stack -> [B, H, L, T]."""

    def __init__(self, cfg, *, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        self.table = layers.kernel(rngs, (self.num_buckets, cfg.num_heads), (None, "heads"), scale=cfg.init_scale)

    def __call__(self, query_positions_BL: Array, key_positions_BT: Array) -> Array:
        relative_BLT = key_positions_BT[:, None, :] - query_positions_BL[:, :, None]
        buckets_BLT = relative_position_bucket(relative_BLT, bidirectional=self.bidirectional,
                                               num_buckets=self.num_buckets, max_distance=self.max_distance)
        return jnp.transpose(jnp.take(self.table[...], buckets_BLT, axis=0), (0, 3, 1, 2))


class EncDecLayer(nnx.Module):
    """x += self_attn(rms(x)) [+ cross_attn(rms(x), encoder output)]; x += ffn(rms(x)), ffn dense or MoE."""

    def __init__(self, cfg, *, cross: bool, moe: bool, rngs: nnx.Rngs, group_size: Optional[int] = None):
        dt = layers.dtype("model.dtype", cfg.dtype)
        self.self_norm = layers.rms_norm(cfg.d_model, dt, rngs, eps=layers.norm_eps(cfg))
        self.self_attention = layers.Attention(cfg, rngs=rngs)
        if cross:
            self.cross_norm = layers.rms_norm(cfg.d_model, dt, rngs, eps=layers.norm_eps(cfg))
            self.cross_attention = layers.Attention(cfg, rngs=rngs)
        self.has_cross, self.is_moe = cross, moe
        self.ffn_norm = layers.rms_norm(cfg.d_model, dt, rngs, eps=layers.norm_eps(cfg))
        self.ffn = layers.make_moe_layer(_with_group_size(cfg, group_size), rngs=rngs) if moe else layers.Mlp(
            cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None

    def _drop(self, x, deterministic):
        return x if self.dropout is None else self.dropout(x, deterministic=deterministic)

    def __call__(self, x_BLd, *, mask_B1LT, bias_BHLT, padding_mask_BL, token_ids_BL, deterministic,
                 encoded_BTd=None, cross_mask_B1LT=None, return_routing=False):
        h = self.self_attention(self.self_norm(x_BLd), positions_BL=None, mask_B1LT=mask_B1LT, bias_BHLT=bias_BHLT)
        x_BLd = x_BLd + self._drop(h, deterministic)
        if self.has_cross:
            h = self.cross_attention(self.cross_norm(x_BLd), positions_BL=None, mask_B1LT=cross_mask_B1LT,
                                     kv_BTd=encoded_BTd)
            x_BLd = x_BLd + self._drop(h, deterministic)
        h = self.ffn_norm(x_BLd)
        aux = {}
        if self.is_moe:
            h, aux = self.ffn(h, padding_mask=padding_mask_BL, token_ids=token_ids_BL, deterministic=deterministic,
                              return_routing=return_routing)
        else:
            h = self.ffn(h)
        return x_BLd + self._drop(h.astype(x_BLd.dtype), deterministic), aux


def _with_group_size(cfg, group_size: Optional[int]):
    if group_size is None:
        return cfg
    changed = ml_collections.ConfigDict(cfg.to_dict())  # a copy: ConfigDict(cfg) would share cfg.moe
    changed.moe.group_size = group_size
    return ml_collections.FrozenConfigDict(changed)


class EncDecBlock(nnx.Module):
    """`layers_per_block` layers of one stack; the last holds the MoE layer when the model has experts."""

    def __init__(self, cfg, *, stack: str, rngs: nnx.Rngs, group_size: Optional[int] = None):
        n = layers_per_block(cfg, stack)
        self.layers = nnx.List([EncDecLayer(cfg, cross=stack == "decoder", moe=layers.is_moe(cfg) and i == n - 1,
                                            rngs=rngs, group_size=group_size) for i in range(n)])

    def __call__(self, x_BLd, **kwargs):
        aux = {}
        for layer in self.layers:
            x_BLd, layer_aux = layer(x_BLd, **kwargs)
            aux.update(layer_aux)
        return x_BLd, aux


class EncoderDecoder(nnx.Module):
    """See the module docstring."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate_config(cfg)
        cfg = ml_collections.FrozenConfigDict(cfg)
        self.config = cfg
        self.dtype = layers.dtype("model.dtype", cfg.dtype)
        self._remat, self._remat_policy = layers.remat_policy(cfg.remat)
        d, V = cfg.d_model, cfg.vocab_size
        self.embedding = layers.embedding(rngs, V, d)
        self.encoder_bias = RelativePositionBias(cfg, bidirectional=True, rngs=rngs)
        self.decoder_bias = RelativePositionBias(cfg, bidirectional=False, rngs=rngs)

        def make_stack(stack, group_size=None):
            @nnx.split_rngs(splits=num_blocks(cfg, stack))
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs):
                return EncDecBlock(cfg, stack=stack, rngs=rngs, group_size=group_size)

            return make_blocks(rngs)

        self.encoder_blocks = make_stack("encoder")
        self.decoder_blocks = make_stack("decoder", cfg.moe.get("decoder_group_size"))
        self.encoder_norm = layers.rms_norm(d, self.dtype, rngs, eps=layers.norm_eps(cfg))
        self.decoder_norm = layers.rms_norm(d, self.dtype, rngs, eps=layers.norm_eps(cfg))
        if not cfg.tie_embeddings:
            self.unembedding = layers.kernel(rngs, (d, V), ("embed", "vocab"), scale=cfg.init_scale)

    def _run(self, blocks, x_BLd, kwargs):
        """One stack's blocks, scanned (each rematerialised as `model.remat` says) -> (x, aux stacked on the
        block axis: one entry per MoE layer)."""
        def block_fn(block, x_BLd):
            x_BLd, aux = block(x_BLd, **kwargs)
            return sharding.constrain(x_BLd, ("batch", "length", "embed")), aux

        if self._remat:
            block_fn = nnx.remat(block_fn, policy=self._remat_policy)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0), transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan_blocks(x_BLd, block):
            return block_fn(block, x_BLd)

        return scan_blocks(x_BLd, blocks)

    def encode(self, tokens_BL, *, segment_ids=None, positions=None, deterministic=False, return_routing=False):
        """-> (encoded [B, L, d], aux of the encoder's MoE layers; with `return_routing` also their
        `expert_index` / `routing_weight` [layers, B, L, K])."""
        B, L = tokens_BL.shape
        segment_ids = jnp.ones((B, L), jnp.int32) if segment_ids is None else segment_ids
        positions = jnp.broadcast_to(jnp.arange(L), (B, L)) if positions is None else positions
        kwargs = dict(mask_B1LT=layers.attention_mask(segment_ids, segment_ids, causal=False),
                      bias_BHLT=self.encoder_bias(positions, positions), padding_mask_BL=segment_ids > 0,
                      token_ids_BL=tokens_BL, deterministic=deterministic, return_routing=return_routing)
        x_BLd = jnp.take(self.embedding[...], tokens_BL, axis=0).astype(self.dtype)
        x_BLd, aux = self._run(self.encoder_blocks, x_BLd, kwargs)
        return self.encoder_norm(x_BLd), aux

    def __call__(self, encoder_tokens_BL, decoder_tokens_BL, *, encoder_segment_ids=None, decoder_segment_ids=None,
                 encoder_positions=None, decoder_positions=None, deterministic: bool = False,
                 return_routing: bool = False):
        """-> (logits [B, L_dec, V] float32, aux {"encoder": {...}, "decoder": {...}}), each stack's MoE metrics
        stacked on a leading MoE-layer axis (with `return_routing`, also `expert_index` / `routing_weight`
        [layers, B, L, K])."""
        encoded_BTd, encoder_aux = self.encode(encoder_tokens_BL, segment_ids=encoder_segment_ids,
                                               positions=encoder_positions, deterministic=deterministic,
                                               return_routing=return_routing)
        B, L = decoder_tokens_BL.shape
        T = encoder_tokens_BL.shape[1]
        dec_segments = jnp.ones((B, L), jnp.int32) if decoder_segment_ids is None else decoder_segment_ids
        enc_segments = jnp.ones((B, T), jnp.int32) if encoder_segment_ids is None else encoder_segment_ids
        positions = jnp.broadcast_to(jnp.arange(L), (B, L)) if decoder_positions is None else decoder_positions
        kwargs = dict(mask_B1LT=layers.attention_mask(dec_segments), bias_BHLT=self.decoder_bias(positions, positions),
                      padding_mask_BL=dec_segments > 0, token_ids_BL=decoder_tokens_BL, deterministic=deterministic,
                      encoded_BTd=encoded_BTd, return_routing=return_routing,
                      cross_mask_B1LT=layers.attention_mask(dec_segments, enc_segments, causal=False))
        x_BLd = jnp.take(self.embedding[...], decoder_tokens_BL, axis=0).astype(self.dtype)
        x_BLd, decoder_aux = self._run(self.decoder_blocks, x_BLd, kwargs)
        x_BLd = self.decoder_norm(x_BLd)
        if self.config.tie_embeddings:  # T5 v1.0: the shared embedding as the head, on x / sqrt(d_model)
            logits = layers.linear(x_BLd * self.config.d_model ** -0.5, self.embedding[...].astype(self.dtype),
                                   w_transposed=True, preferred_element_type=jnp.float32)
        else:
            logits = layers.linear(x_BLd, self.unembedding[...].astype(self.dtype),
                                   preferred_element_type=jnp.float32)
        return logits.astype(jnp.float32), {"encoder": encoder_aux, "decoder": decoder_aux}


# --------------------------------------------------------------------------------------------- family


def create(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> EncoderDecoder:
    return EncoderDecoder(cfg, rngs=rngs)


def loss_fn(model: EncoderDecoder, batch: dict, *, deterministic: bool, aux_loss_weight: float,
            z_loss_weight: float) -> tuple[Array, dict]:
    """Span-corruption loss: CE of `decoder_targets` (weighted by `decoder_loss_weights`) + the MoE losses
    averaged over the MoE layers of both stacks; `metrics["moe"]` stacks encoder then decoder layers."""
    logits, aux = model(batch["encoder_inputs"], batch["decoder_inputs"],
                        encoder_segment_ids=batch.get("encoder_segment_ids"),
                        decoder_segment_ids=batch.get("decoder_segment_ids"),
                        encoder_positions=batch.get("encoder_positions"),
                        decoder_positions=batch.get("decoder_positions"), deterministic=deterministic)
    stacks = [a for a in (aux["encoder"], aux["decoder"]) if a]
    moe_aux = {key: jnp.concatenate([a[key] for a in stacks]) for key in stacks[0]} if stacks else {}
    return layers.lm_loss(logits, batch["decoder_targets"], batch.get("decoder_loss_weights"), moe_aux,
                          aux_loss_weight=aux_loss_weight, z_loss_weight=z_loss_weight)


def abstract_batch(batch_size: int, seq_len: int, batch_sharding=None, *, data_config=None) -> dict:
    """The `span_corruption` batch: encoder rows of `seq_len` and decoder rows of the matching T5 targets
    length (`span_corruption.input_and_target_lengths`)."""
    from moe_jax.data import span_corruption

    sc = data_config.span_corruption if data_config is not None else span_corruption.default_config()
    _, targets_length = span_corruption.input_and_target_lengths(seq_len, sc.noise_density,
                                                                 sc.mean_noise_span_length)
    spec = lambda length, dtype: jax.ShapeDtypeStruct((batch_size, length), dtype, sharding=batch_sharding)
    batch = {f"encoder_{k}": spec(seq_len, jnp.int32) for k in ("inputs", "segment_ids", "positions")}
    batch.update({f"decoder_{k}": spec(targets_length, jnp.int32) for k in ("inputs", "targets", "segment_ids",
                                                                             "positions")})
    batch["decoder_loss_weights"] = spec(targets_length, jnp.float32)
    return batch


def count_params(model: EncoderDecoder) -> dict:
    moe = model.config.moe
    return layers.count_params(model, k=moe.k, num_experts=moe.num_experts)


def flops_per_token(model: EncoderDecoder, seq_len: int) -> float:
    """Training FLOPs per encoder token (the trainer counts `seq_len` tokens per row): 6 x the encoder's active
    parameters, plus 6 x the decoder's and the output head's for the L_dec / seq_len decoder tokens per encoder
    token, plus attention (self over each stack's own length, cross from L_dec queries to seq_len keys). L_dec
    is the targets length of T5's default 15% noise, mean span 3."""
    from moe_jax.data import span_corruption

    cfg = model.config
    _, decoder_length = span_corruption.input_and_target_lengths(seq_len)
    share = decoder_length / seq_len
    moe = cfg.moe

    def active(stack):
        return layers.count_params(stack, k=moe.k, num_experts=moe.num_experts)["active"]

    width = cfg.num_heads * layers.head_dim(cfg)
    attention = 12 * width * (cfg.num_encoder_layers * seq_len
                              + cfg.num_decoder_layers * share * (decoder_length + seq_len))
    return float(6 * (active(model.encoder_blocks) + share * (active(model.decoder_blocks)
                                                              + cfg.d_model * cfg.vocab_size)) + attention)


def describe(cfg) -> str:
    stacks = f"{cfg.num_encoder_layers} + {cfg.num_decoder_layers} layers"
    if not layers.is_moe(cfg):
        return f" (encoder-decoder, {stacks}, dense)"
    return (f"; encoder-decoder, {stacks}, {cfg.moe.num_experts} experts every {moe_every(cfg, 'encoder')} "
            f"encoder / {moe_every(cfg, 'decoder')} decoder layers")
