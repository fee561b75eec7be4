"""The T5.1.1-style encoder-decoder: T5's relative position buckets, a bidirectional encoder, a causal
decoder, cross-attention inside each packed example, MoE layers in both stacks, the family interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import models, train
from moe_jax.models import encdec, layers


def config(num_experts=4, **model):
    cfg = train.default_config()
    cfg.model = encdec.default_config()
    cfg.model.update(vocab_size=64, d_model=32, d_ff=64, num_heads=2, num_encoder_layers=2, num_decoder_layers=2,
                     **model)
    cfg.model.moe.update(num_experts=num_experts, every=2, group_size=16, dispatcher="index")
    return cfg


def make(cfg):
    return models.get(cfg).create(cfg.model, nnx.Rngs(params=0, dropout=1))


def test_t5_relative_position_buckets_by_hand():
    rel = jnp.asarray([0, -1, -7, -8, -16, -128, -1000, 1, 16, 1000])
    got = encdec.relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    # 16 buckets a direction, 8 exact; 16 -> 8 + floor(log(2) / log(16) * 8) = 10; >= 128 -> 15; keys after +16
    assert got.tolist() == [0, 1, 7, 8, 10, 15, 15, 17, 26, 31]
    causal = encdec.relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert causal.tolist()[:7] == [0, 1, 7, 8, 16, 31, 31]  # 32 buckets one way, 16 exact and causal.tolist()[7:] == [0, 0, 0]


def test_encoder_is_bidirectional_and_decoder_causal():
    model = make(config())
    enc = jax.random.randint(jax.random.key(0), (1, 16), 3, 64)
    dec = jax.random.randint(jax.random.key(1), (1, 16), 3, 64)
    base, _ = model.encode(enc, deterministic=True)
    later, _ = model.encode(enc.at[0, 12].set(5), deterministic=True)
    assert not np.allclose(base[0, :12], later[0, :12])  # earlier encoder positions see a later token
    logits, _ = model(enc, dec, deterministic=True)
    changed, _ = model(enc, dec.at[0, 12].set(5), deterministic=True)
    np.testing.assert_allclose(logits[0, :12], changed[0, :12], rtol=1e-5, atol=1e-5)  # causal decoder
    assert not np.allclose(logits[0, 12:], changed[0, 12:])


def test_cross_attention_stays_inside_each_packed_example():
    model = make(config(num_experts=0))
    enc = jax.random.randint(jax.random.key(0), (1, 16), 3, 64)
    dec = jax.random.randint(jax.random.key(1), (1, 8), 3, 64)
    enc_seg = jnp.asarray([[1] * 10 + [2] * 6])
    dec_seg = jnp.asarray([[1] * 5 + [2] * 3])
    kwargs = dict(encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg, deterministic=True)
    logits, _ = model(enc, dec, **kwargs)
    other, _ = model(enc.at[0, 10:].set(7), dec, **kwargs)  # change only the second example's inputs
    np.testing.assert_allclose(logits[0, :5], other[0, :5], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[0, 5:], other[0, 5:])


def test_moe_in_both_stacks_loss_and_interface():
    cfg = config()
    family = models.get(cfg)
    assert family.name == "encdec" and family.batch_format == "span_corruption"
    model = family.create(cfg.model, nnx.Rngs(params=0, dropout=1))
    batch = family.abstract_batch(2, 32, None)  # decoder rows of 8 (T5 lengths for 32 inputs)
    batch = {k: (jnp.ones(v.shape, v.dtype) if "weights" in k or "segment" in k else
                 jnp.broadcast_to(jnp.arange(v.shape[1]), v.shape).astype(v.dtype) % 60 + 3)
             for k, v in batch.items()}
    loss, metrics = family.loss_fn(model, batch, deterministic=False, aux_loss_weight=1e-2, z_loss_weight=0.0)
    assert np.isfinite(float(loss)) and metrics["moe"]["expert_load"].shape == (2, 4)  # 1 encoder + 1 decoder
    counts = family.count_params(model)
    assert counts["total"] > counts["active"] > 0 and family.flops_per_token(model, 16) > 0
    assert "encoder-decoder, 2 + 2 layers" in family.describe(cfg.model)
    assert family.abstract_batch(4, 512, None)["decoder_targets"].shape == (4, 114)  # T5: 512 -> 114


def test_remat_and_tied_head_keep_the_math():
    """model.remat recomputes each layer in the backward pass: the same loss and gradients. The tied head
    (T5 v1.0) is the embedding applied to the output / sqrt(d_model)."""
    def loss_and_grads(**model):
        cfg = config(**model)
        family = models.get(cfg)
        m = family.create(cfg.model, nnx.Rngs(params=0, dropout=1))
        batch = family.abstract_batch(2, 32, None)
        batch = {k: (jnp.ones(v.shape, v.dtype) if "weights" in k or "segment" in k else
                     jnp.broadcast_to(jnp.arange(v.shape[1]), v.shape).astype(v.dtype) % 60 + 3)
                 for k, v in batch.items()}
        (loss, _), grads = nnx.value_and_grad(lambda m: family.loss_fn(
            m, batch, deterministic=True, aux_loss_weight=1e-2, z_loss_weight=0.0), has_aux=True)(m)
        return m, float(loss), jax.tree.leaves(nnx.state(grads))

    _, plain, plain_grads = loss_and_grads()
    _, remat, remat_grads = loss_and_grads(remat="full")
    assert remat == pytest.approx(plain, rel=1e-6)
    for a, b in zip(plain_grads, remat_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    tied, _, _ = loss_and_grads(tie_embeddings=True)
    assert not hasattr(tied, "unembedding")
    encoder = jnp.arange(32).reshape(2, 16) % 60 + 3  # routing groups of 16 tokens: whole rows
    decoder = jnp.arange(16).reshape(2, 8) % 60 + 3
    logits, _ = tied(encoder, decoder, deterministic=True)
    embedded = jnp.take(tied.embedding[...], decoder, axis=0)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    hidden = tied.decoder_norm(tied._run(tied.decoder_blocks, embedded, dict(
        mask_B1LT=layers.attention_mask(jnp.ones((2, 8), jnp.int32)), bias_BHLT=tied.decoder_bias(positions, positions),
        padding_mask_BL=jnp.ones((2, 8), bool), token_ids_BL=decoder, deterministic=True,
        encoded_BTd=tied.encode(encoder, deterministic=True)[0],
        cross_mask_B1LT=layers.attention_mask(jnp.ones((2, 8), jnp.int32), jnp.ones((2, 16), jnp.int32),
                                              causal=False)))[0])
    np.testing.assert_allclose(logits, hidden @ tied.embedding[...].T / np.sqrt(32), rtol=1e-5, atol=1e-5)


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="model.relative_attention_num_buckets=31 must be even"):
        make(config(relative_attention_num_buckets=31))
    cfg = config()
    cfg.model.moe.decoder_every = 0
    with pytest.raises(ValueError, match="model.moe.decoder_every=0"):
        make(cfg)
