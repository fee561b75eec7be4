"""Expert analysis: hand-worked loads, drops, lifts and mutual information; collect/drift on a tiny model;
the analyze CLI end to end on a tiny synthetic run with two checkpoints."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cli_checks import assert_user_error, run_cli
from moe_jax import analysis, models, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def routed(top1_LN, *, tokens=None, domains=None, groups=None, E=4, group_size=4):
    top1 = np.asarray(top1_LN, np.int32)
    L, N = top1.shape
    return analysis.Routed(top1[..., None], np.ones((L, N, 1), np.float32),
                           np.asarray(tokens if tokens is not None else np.arange(N), np.int32),
                           None if domains is None else np.asarray(domains),
                           np.asarray(groups if groups is not None else np.arange(N) // group_size),
                           np.zeros(L), E, group_size)


def test_load_dead_experts_and_drops_by_hand():
    r = routed([[0, 0, 0, 0, 1, 1, 2, 2]])  # group 0: four tokens to expert 0; group 1: two each to 1 and 2
    np.testing.assert_allclose(analysis.expert_load(r), [[0.5, 0.25, 0.25, 0.0]])
    assert analysis.dead_experts(r) == [[3]]
    # capacity ceil(4 * 1.0 / 4) = 1 slot per expert per group: group 0 keeps 1 of 4, group 1 keeps 2 of 4
    np.testing.assert_allclose(analysis.dropped_fraction(r, 1.0), [5 / 8])
    np.testing.assert_allclose(analysis.dropped_fraction(r, 4.0), [0.0])


def test_token_lift_and_domain_information():
    # token 7 always goes to expert 1 (which takes a quarter of all tokens): lift 4
    r = routed([[1, 0, 2, 3] * 5], tokens=[7, 1, 2, 3] * 5, domains=[0, 1, 2, 3] * 5)
    prefs = analysis.token_preferences(r, top=1, min_count=5)[0]
    assert prefs[1] == [(7, 5, pytest.approx(4.0))]
    counts, information = analysis.domain_expert_counts(r, num_domains=4)
    assert counts.shape == (1, 4, 4) and counts[0].sum() == 20
    np.testing.assert_allclose(information, [2.0])  # each domain has its own expert: log2(4) bits


def tiny_model(seed=0):
    cfg = train.default_config()
    cfg.model.update(vocab_size=1024, d_model=32, d_ff=64, num_layers=4, num_heads=2)
    cfg.model.moe.update(num_experts=4, every=2, group_size=64, dispatcher="index")
    return models.get(cfg).create(cfg.model, nnx.Rngs(params=seed, dropout=1))


def test_token_determinism_is_one_for_routing_by_id_and_low_for_routing_that_ignores_it():
    tokens = np.tile(np.arange(8), 50)
    by_id = routed([tokens % 4], tokens=tokens)  # expert = id mod 4
    majority, information = analysis.token_determinism(by_id)
    np.testing.assert_allclose(majority, [1.0])
    np.testing.assert_allclose(information, [1.0], rtol=1e-9)
    many = np.tile(np.arange(8), 500)
    ignoring = routed([np.random.default_rng(0).integers(0, 4, many.size)], tokens=many)  # experts at random
    majority, information = analysis.token_determinism(ignoring)
    assert majority[0] < 0.3 and information[0] < 0.01


def test_collect_and_router_drift_on_a_model():
    model = tiny_model()
    rng = np.random.default_rng(0)
    segments = np.ones((2, 32), np.int32)
    segments[1, 20:] = 0  # padding is left out
    batch = dict(inputs=rng.integers(3, 1024, (2, 32)).astype(np.int32), segment_ids=segments,
                 positions=np.tile(np.arange(32, dtype=np.int32), (2, 1)))
    r = analysis.collect(model, [batch])
    assert r.expert_index.shape == (2, 52, 1) and r.token_ids.shape == (52,)
    np.testing.assert_array_equal(analysis.router_drift(model, model, [batch]), [0.0, 0.0])
    assert analysis.router_drift(model, tiny_model(seed=1), [batch]).max() > 0


def test_analyze_cli_writes_summary_and_plots(tmp_path):
    cfg = train.default_config()
    cfg.model.update(vocab_size=1024, d_model=32, d_ff=64, num_layers=2, num_heads=2)
    cfg.model.moe.update(num_experts=4, every=2, group_size=64, dispatcher="index")
    cfg.data.update(seq_len=32, batch_size=4)
    cfg.train.update(steps=4, log_every=2, eval_every=4, eval_steps=1, checkpoint_every=2, warmup_steps=1,
                     peak_flops_per_device=1e9)
    train.train(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
    out = tmp_path / "analysis"
    done = run_cli("moe_jax.analyze", [f"--workdir={tmp_path / 'run'}", f"--output={out}", "--compare_step=2",
                                       "--num_batches=2"], ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "load CV" in summary and "Router drift from step 2" in summary and "I(domain; top-1 expert)" in summary
    assert (out / "expert_load.png").exists() and (out / "domain_expert.png").exists()
    assert_user_error(run_cli("moe_jax.analyze", [f"--workdir={tmp_path / 'run'}", f"--output={out}",
                                                  "--compare_step=3"], ROOT), "--step=3")
