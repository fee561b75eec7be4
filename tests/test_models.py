"""The model seam (moe_jax.models): family lookup by `model.name`, the trainer using only the interface, and the
shared attention's cross / bidirectional options against a NumPy reference."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import models, train
from moe_jax.models import decoder, layers


def tiny_run_config(name="decoder", steps=2):
    cfg = train.default_config()
    cfg.model.update(name=name, vocab_size=cfg.data.synthetic.vocab_size, d_model=32, d_ff=64, num_layers=2,
                     num_heads=2)
    cfg.model.moe.update(num_experts=4, every=2, group_size=64, dispatcher="index")
    cfg.data.update(source="synthetic", seq_len=32, batch_size=8)
    cfg.train.update(steps=steps, log_every=1, eval_every=steps, eval_steps=1, checkpoint_every=steps,
                     warmup_steps=1)
    cfg.mesh.shape = (1, 1, 1)
    return cfg


# --------------------------------------------------------------------------------------------- lookup


def test_get_decoder_from_a_name_a_run_config_and_a_model_config():
    family = models.get("decoder")
    assert family.name == "decoder" and family.batch_format == "lm"
    assert family.create is decoder.create and family.loss_fn is decoder.loss_fn
    assert models.get(train.default_config()) is family and models.get(train.default_config().model) is family
    assert train.default_config().model.name == "decoder"
    legacy = train.default_config().model
    del legacy["name"]  # a config written before model.name existed is a decoder
    assert models.get(legacy) is family
    model = family.create(family.default_config(), nnx.Rngs(0))
    assert isinstance(model, decoder.Transformer)


def test_unknown_model_name_is_a_value_error_with_did_you_mean():
    with pytest.raises(ValueError, match=r"model\.name='decodr' is not one of .*did you mean 'decoder'\?"):
        models.get("decodr")
    cfg = tiny_run_config(name="decodr")
    with pytest.raises(ValueError, match=r"model\.name='decodr'.*did you mean 'decoder'"):
        train.setup(cfg, jax.devices()[:1])


def test_a_reserved_family_not_built_yet_says_so(monkeypatch):
    monkeypatch.setitem(models.MODULES, "future", "moe_jax.models.future_family_not_built")
    with pytest.raises(ValueError, match=r"model\.name='future' is reserved .*not built yet"):
        models.get("future")


# --------------------------------------------------------------------------------------------- the trainer


OFFSET = 100.0


def _offset_loss(model, batch, **kwargs):
    loss, metrics = decoder.loss_fn(model, batch, **kwargs)
    metrics["loss"] = loss + OFFSET
    return loss + OFFSET, metrics


def _abstract_batch(batch_size, seq_len, batch_sharding, *, data_config=None):
    batch = decoder.abstract_batch(batch_size, seq_len, batch_sharding, data_config=data_config)
    return {k: v for k, v in batch.items() if k != "loss_weights"}  # marks the family's own batch


def fake_family(name="offset", **fields):
    """The decoder behind other interface functions: the trainer shows whose functions it called."""
    base = models.get("decoder")
    return dataclasses.replace(base, name=name, loss_fn=_offset_loss, abstract_batch=_abstract_batch,
                               describe=lambda cfg: " (the offset family)", **fields)


@pytest.fixture
def registered():
    families = []

    def register(family):
        families.append(models.register(family))
        return family

    yield register
    for family in families:
        models.unregister(family.name)


def test_train_uses_the_registered_familys_interface(tmp_path, registered, capsys):
    registered(fake_family())
    cfg = tiny_run_config(name="offset")
    run = train.setup(cfg, jax.devices()[:1])
    assert run.family.name == "offset"
    assert set(run.abstract_batch(8, 32)) == {"inputs", "targets", "segment_ids", "positions"}

    train.train(cfg, str(tmp_path), devices=jax.devices()[:1])
    rows = [json.loads(line) for line in (pathlib.Path(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in train_rows:  # the family's loss_fn is the one trained and logged
        assert row["train/loss"] == pytest.approx(row["train/ce"] + OFFSET, abs=0.1)
    evals = [r for r in rows if "eval/loss" in r]
    assert evals and evals[-1]["eval/loss"] == pytest.approx(evals[-1]["eval/ce"] + OFFSET, abs=0.1)
    assert "(the offset family)" in capsys.readouterr().out


def test_a_family_whose_batch_format_the_data_cannot_build_fails_before_the_run(tmp_path, registered):
    registered(fake_family(name="spans", batch_format="images"))
    with pytest.raises(ValueError, match=r"'images' batches.*\('lm', 'span_corruption'\).*model\.name"):
        train.train(tiny_run_config(name="spans"), str(tmp_path / "run"), devices=jax.devices()[:1])
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------- attention


def reference_attention(q_BLHk, k_BTHk, v_BTHk, mask_BLT):
    logits = np.einsum("BLHk,BTHk->BHLT", q_BLHk, k_BTHk) / np.sqrt(q_BLHk.shape[-1])
    logits = np.where(mask_BLT[:, None], logits, -1e30)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("BHLT,BTHk->BLHk", weights, v_BTHk)


def attention_module():
    cfg = decoder.default_config()
    cfg.update(d_model=16, num_heads=2)
    return layers.Attention(cfg, rngs=nnx.Rngs(0))


def test_attention_mask_self_causal_bidirectional_and_cross():
    seg_BL = np.array([[1, 1, 2, 2, 0]])
    causal = np.asarray(layers.attention_mask(jnp.asarray(seg_BL)))[:, 0]
    same = seg_BL[:, :, None] == seg_BL[:, None, :]
    np.testing.assert_array_equal(causal, same & np.tril(np.ones((5, 5), bool)))
    np.testing.assert_array_equal(np.asarray(layers.attention_mask(jnp.asarray(seg_BL), causal=False))[:, 0], same)
    kv_BT = np.array([[1, 2, 2]])
    cross = np.asarray(layers.attention_mask(jnp.asarray(seg_BL), jnp.asarray(kv_BT), causal=False))
    assert cross.shape == (1, 1, 5, 3)
    np.testing.assert_array_equal(cross[:, 0], seg_BL[:, :, None] == kv_BT[:, None, :])
    with pytest.raises(ValueError, match="causal"):
        layers.attention_mask(jnp.asarray(seg_BL), jnp.asarray(kv_BT))


def test_bidirectional_self_attention_sees_later_tokens_and_causal_does_not():
    attention = attention_module()
    x = jax.random.normal(jax.random.key(1), (1, 6, 16))
    changed = x.at[0, -1].add(1.0)
    positions = jnp.arange(6)[None]
    for causal in (True, False):
        before = attention(x, positions_BL=positions, mask_B1LT=None, causal=causal)
        after = attention(changed, positions_BL=positions, mask_B1LT=None, causal=causal)
        moved = not np.allclose(before[0, 0], after[0, 0])
        assert moved == (not causal)


def test_cross_attention_matches_numpy_and_stays_inside_segments():
    attention = attention_module()
    x_BLd = np.asarray(jax.random.normal(jax.random.key(2), (2, 5, 16)))
    kv_BTd = np.asarray(jax.random.normal(jax.random.key(3), (2, 3, 16)))
    seg_BL, kv_seg_BT = np.array([[1, 1, 2, 2, 2], [1, 1, 1, 1, 1]]), np.array([[1, 2, 2], [1, 1, 1]])
    mask = layers.attention_mask(jnp.asarray(seg_BL), jnp.asarray(kv_seg_BT), causal=False)
    out = np.asarray(attention(jnp.asarray(x_BLd), positions_BL=None, mask_B1LT=mask, kv_BTd=jnp.asarray(kv_BTd)))
    q = np.einsum("BLd,dHk->BLHk", x_BLd, np.asarray(attention.query[...]))
    k = np.einsum("BTd,dHk->BTHk", kv_BTd, np.asarray(attention.key[...]))
    v = np.einsum("BTd,dHk->BTHk", kv_BTd, np.asarray(attention.value[...]))
    expected = np.einsum("BLHk,Hkd->BLd", reference_attention(q, k, v, np.asarray(mask)[:, 0]),
                         np.asarray(attention.out[...]))
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)
    # a key of segment 2 changes no query of segment 1
    changed = kv_BTd.copy()
    changed[0, 1:] += 1.0
    out2 = np.asarray(attention(jnp.asarray(x_BLd), positions_BL=None, mask_B1LT=mask, kv_BTd=jnp.asarray(changed)))
    np.testing.assert_array_equal(out2[0, :2], out[0, :2])
    assert not np.allclose(out2[0, 2:], out[0, 2:])
