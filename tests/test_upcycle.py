"""`moe_jax.upcycle`: an upcycled MoE computes the dense model's function at step 0 (renormalised top-k, nothing
dropped) for the decoder through the CLI and the run directory, and for the encoder-decoder on the model;
noise and Drop-Upcycling's re-initialised hidden units; the run `moe_jax.main` continues; clear errors."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cli_checks import run_cli
from tiny_runs import TINY, tiny
from moe_jax import checkpoint, data, models, train, upcycle
from moe_jax.models import encdec

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The command-line twin of `tiny`: experiments/tiny_switch.py made small.
TINY_FLAGS = [f"--config.model.{k}={v}" for k, v in TINY.items()] + [
    "--config.data.seq_len=32", "--config.data.batch_size=4", "--config.model.moe.group_size=128",
    "--config.train.eval_steps=1", "--config.train.log_every=1", "--config.train.warmup_steps=1",
    "--config.train.peak_flops_per_device=1e9"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dense_run")
    train.train(tiny(0), str(workdir), devices=jax.devices()[:1])
    return workdir


def eval_ce(workdir):
    run, state, step = checkpoint.restore_run(workdir, devices=jax.devices()[:1])
    batch = data.make_eval_batches(run.config.data, 1)[0]
    from moe_jax import sharding

    with jax.set_mesh(run.mesh):
        metrics = run.eval_step(state, sharding.shard_batch(batch, run.mesh))
    return float(metrics["ce"]), metrics, step


def test_cli_upcycled_run_equals_dense_at_step_0_and_main_continues_it(dense_run, tmp_path):
    out = tmp_path / "upcycled"
    flags = ["--config=experiments/tiny_switch.py", *TINY_FLAGS, "--config.model.moe.normalize=True",
             "--config.model.moe.eval_capacity_factor=8",  # 8 experts, k=1: room for every token in each
             "--config.train.steps=2", "--config.train.eval_every=2"]
    result = run_cli("moe_jax.upcycle", [f"--dense_workdir={dense_run}", *flags, f"--workdir={out}"], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"train it with: python -m moe_jax.main --workdir={out} " in result.stdout
    dense_ce, _, _ = eval_ce(dense_run)
    moe_ce, metrics, step = eval_ce(out)
    assert step == 0
    assert float(np.max(metrics["moe"]["dropped_fraction"])) == 0.0
    assert abs(moe_ce - dense_ce) < 1e-5, (moe_ce, dense_ce)

    result = run_cli("moe_jax.main", [f"--workdir={out}"], ROOT)  # the config the upcycled run was written with
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from step 0" in result.stderr
    assert checkpoint.Checkpointer(out / "checkpoints").all_steps() == [0, 2]


def test_top2_dropless_upcycle_keeps_the_logits(dense_run):
    dense_model, dense_cfg = checkpoint.restore_model(dense_run, devices=jax.devices()[:1])
    cfg = tiny(8, k=2, normalize=True, dispatcher="dropless").model
    moe_model = models.get(cfg).create(cfg, nnx.Rngs(params=5, dropout=6))
    report = upcycle.upcycle(dense_model, moe_model)
    assert report["fresh"] == ["layer/1/ffn/router_kernel"]
    assert sorted(report["experts"]) == ["layer/1/ffn/wi", "layer/1/ffn/wo"]
    tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, cfg.vocab_size)
    want, _ = dense_model(tokens, deterministic=True)
    got, aux = moe_model(tokens, deterministic=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    # The router is fresh and really routes: several experts are in use.
    assert int(jnp.sum(aux["expert_load"] > 0)) > 2


def encdec_config(num_experts):
    cfg = encdec.default_config()
    cfg.update(vocab_size=64, d_model=32, d_ff=64, num_heads=2, num_encoder_layers=2, num_decoder_layers=2)
    cfg.moe.update(num_experts=num_experts, every=2, group_size=8, dispatcher="index", normalize=True,
                   eval_capacity_factor=float(max(num_experts, 1)))
    return cfg


def span_corruption_batch(batch_size=2, seq_len=32):
    """A hand-built batch with the keys and shapes of `encdec.abstract_batch`: two packed examples per row."""
    shapes = encdec.abstract_batch(batch_size, seq_len)
    rng = np.random.default_rng(0)
    batch = {}
    for key, spec in shapes.items():
        length = spec.shape[1]
        if key.endswith("segment_ids"):
            batch[key] = np.repeat([[1] * (length // 2) + [2] * (length - length // 2)], batch_size, 0)
        elif key.endswith("positions"):
            batch[key] = np.repeat([list(range(length // 2)) + list(range(length - length // 2))], batch_size, 0)
        elif key.endswith("loss_weights"):
            batch[key] = np.ones(spec.shape, np.float32)
        else:
            batch[key] = rng.integers(3, 64, spec.shape)
    return {k: jnp.asarray(v, shapes[k].dtype) for k, v in batch.items()}


def test_encdec_upcycle_equals_dense_on_a_span_corruption_batch():
    family = models.get("encdec")
    dense = family.create(encdec_config(0), nnx.Rngs(params=0, dropout=1))
    sparse = family.create(encdec_config(4), nnx.Rngs(params=1, dropout=2))
    report = upcycle.upcycle(dense, sparse)
    assert {k.split("/")[0] for k in report["experts"]} == {"encoder_layer", "decoder_layer"}
    batch = span_corruption_batch()
    kwargs = dict(deterministic=True, aux_loss_weight=0.0, z_loss_weight=0.0)
    want, _ = family.loss_fn(dense, batch, **kwargs)
    got, metrics = family.loss_fn(sparse, batch, **kwargs)
    assert float(np.max(metrics["moe"]["dropped_fraction"])) == 0.0
    assert abs(float(got) - float(want)) < 1e-5, (float(got), float(want))


def test_noise_and_dropped_hidden_units_per_expert():
    rng = np.random.default_rng(0)
    dense_wi = jnp.asarray(rng.normal(0.3, 2.0, (16, 40)), jnp.float32)
    dense_wo = jnp.asarray(rng.normal(0.0, 1.0, (40, 16)), jnp.float32)
    units = [np.arange(0, 10), np.arange(10, 20), np.array([], int)]
    wi = upcycle.expert_copies(dense_wi, ("expert", "embed", "mlp"), 3, noise=0.0, hidden_units=units, rng=rng)
    wo = upcycle.expert_copies(dense_wo, ("expert", "mlp", "embed"), 3, noise=0.0, hidden_units=units, rng=rng)
    for e, dropped in enumerate(units):
        changed_in = np.flatnonzero(np.any(np.asarray(wi[e]) != np.asarray(dense_wi), axis=0))
        changed_out = np.flatnonzero(np.any(np.asarray(wo[e]) != np.asarray(dense_wo), axis=1))
        np.testing.assert_array_equal(changed_in, dropped)
        np.testing.assert_array_equal(changed_out, dropped)
    fresh = np.asarray(wi[0])[:, :10]
    assert abs(fresh.mean() - 0.3) < 0.35 and abs(fresh.std() - 2.0) < 0.4  # the dense weight's statistics
    noisy = upcycle.expert_copies(dense_wi, ("expert", "embed", "mlp"), 2, noise=0.1, hidden_units=[], rng=rng)
    difference = np.asarray(noisy[0] - dense_wi)
    assert 0.15 < difference.std() < 0.25  # 0.1 x the weight's std of 2
    assert not np.allclose(noisy[0], noisy[1])


def test_drop_fraction_through_upcycle(dense_run):
    dense_model, _ = checkpoint.restore_model(dense_run, devices=jax.devices()[:1])
    cfg = tiny(4).model
    moe_model = models.get(cfg).create(cfg, nnx.Rngs(params=0, dropout=1))
    upcycle.upcycle(dense_model, moe_model, drop_fraction=0.5, seed=3)
    dense_wi = np.asarray(upcycle.layer_params(dense_model)[("layer", 1, "ffn", "wi")].value)
    wi = np.asarray(upcycle.layer_params(moe_model)[("layer", 1, "ffn", "wi")].value)
    changed = [set(np.flatnonzero(np.any(wi[e] != dense_wi, axis=0))) for e in range(4)]
    assert all(len(c) == 32 for c in changed)  # half of d_ff = 64
    assert len(set.union(*changed)) > 32  # each expert its own units


def test_mismatched_models_and_workdirs_are_refused(dense_run, tmp_path):
    dense_model, _ = checkpoint.restore_model(dense_run, devices=jax.devices()[:1])
    wide = tiny(4).model
    wide.d_ff = 128
    with pytest.raises(ValueError, match="model.d_ff: 64 in the dense run, 128 in the config"):
        upcycle.upcycle(dense_model, models.get(wide).create(wide, nnx.Rngs(0)))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        upcycle.upcycle_run(dense_run, tiny(4), dense_run, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="needs an MoE config"):
        upcycle.upcycle_run(dense_run, tiny(0), tmp_path / "x", devices=jax.devices()[:1])
    from experiments import tiny_switch

    with pytest.raises(ValueError, match="model.d_model: 32 in the dense run, 128 in the config"):
        upcycle.upcycle_run(dense_run, tiny_switch.get_config(), tmp_path / "out", devices=jax.devices()[:1])
    assert not (tmp_path / "out").exists()
