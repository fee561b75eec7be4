"""`moe_jax.prune`: which experts are kept (by hand), merging by similarity and load (by hand), the pruned state
(experts, router columns, optimizer moments) against the source run, and the pruned run evaluating, sampling
and resuming through the CLIs."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cli_checks import run_cli
from tiny_runs import tiny_encdec
from moe_jax import checkpoint, evaluate, generate, prune, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = '''
from moe_jax import train


def get_config(arg=""):
    cfg = train.default_config()
    cfg.model.update(vocab_size=259, d_model=32, d_ff=64, num_layers=2, num_heads=2)
    cfg.model.moe.update(num_experts=4, every=2, group_size=64, dispatcher="index")
    cfg.data.update(source="text", paths="{paths}", seq_len=64, batch_size=4, eval_fraction=0.2)
    cfg.train.update(steps=2, log_every=1, eval_every=2, eval_steps=1, checkpoint_every=2, warmup_steps=1,
                     peak_flops_per_device=1e9)
    return cfg
'''


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("prune")
    corpus = directory / "train.txt"
    corpus.write_text("\n".join(f"document {i} about experts, routers and capacity" for i in range(60)) + "\n")
    config_file = directory / "tiny_text_switch.py"
    config_file.write_text(CONFIG_FILE.format(paths=corpus))
    from ml_collections import config_flags  # noqa: F401  (the config file is also read by the CLI below)
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_text_switch", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    workdir = directory / "run"
    train.train(module.get_config(), str(workdir), devices=jax.devices()[:1])
    return workdir, config_file, corpus


def test_kept_experts_and_merge_plan_by_hand():
    scores = np.array([[0.1, 0.5, 0.3, 0.1], [0.4, 0.0, 0.2, 0.4]])
    np.testing.assert_array_equal(prune.kept_experts(scores, 2), [[1, 2], [0, 3]])
    # Expert 0 points like expert 1 and expert 3 like expert 2: each removed one joins its look-alike.
    weights = np.array([[[1.0, 0.1], [2.0, 0.0], [0.0, 1.0], [0.1, 3.0]]])
    load = np.array([[0.2, 0.6, 0.1, 0.1]])
    plan = prune.merge_plan(weights, np.array([[1, 2]]), load)
    np.testing.assert_allclose(plan[0], [[0.25, 0.75, 0, 0], [0, 0, 0.5, 0.5]], atol=1e-5)


def test_pruned_state_is_the_source_cut_to_the_kept_experts(moe_run, tmp_path):
    workdir, _, corpus = moe_run
    out = tmp_path / "keep2"
    result = prune.prune_run(workdir, 2, out, method="load", num_batches=1, devices=jax.devices()[:1])
    kept = np.asarray(result["kept"])  # [MoE layers, 2]
    assert kept.shape == (1, 2)
    source_run, source, step = checkpoint.restore_run(workdir, devices=jax.devices()[:1])
    pruned_run, pruned, pruned_step = checkpoint.restore_run(out, devices=jax.devices()[:1])
    assert pruned_step == step and pruned_run.config.model.moe.num_experts == 2
    flat_source, flat_pruned = (
        {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(s)
         if jnp.issubdtype(v.get_value().dtype, jnp.floating)} for s in (source, pruned))
    assert flat_source.keys() == flat_pruned.keys()
    checked = 0
    for path, value in flat_source.items():
        if path[-1] in ("wi", "wo") and "ffn" in path and value.ndim == 4:
            np.testing.assert_array_equal(flat_pruned[path], value[:, kept[0]])  # model and Adam moments
            checked += 1
        elif path[-1] == "router_kernel":
            np.testing.assert_array_equal(flat_pruned[path], value[..., kept[0]])
            checked += 1
        elif value.shape == flat_pruned[path].shape:
            np.testing.assert_array_equal(flat_pruned[path], value)
    assert checked >= 9  # wi, wo, router kernel x (model, mu, nu)
    assert result["eval_ce_after"] > 0 and np.isfinite(result["eval_ce_after"])

    data_config = evaluate.evaluation_data_config(pruned_run.config.data, {"data.paths": str(corpus)})
    evaluated = evaluate.evaluate_run(pruned_run, pruned, data_config)
    assert np.isfinite(evaluated["loss"]) and len(evaluated["dropped_fraction"]) == 1
    model, cfg = checkpoint.restore_model(out, devices=jax.devices()[:1])
    tokens = generate.generate(model, cfg, [[100, 111, 99]], max_new_tokens=4)
    assert np.asarray(tokens).shape == (1, 7)


def test_merge_averages_removed_experts_into_kept_ones(moe_run):
    workdir, _, _ = moe_run
    run, state, _ = checkpoint.restore_run(workdir, devices=jax.devices()[:1])
    plan = np.zeros((1, 2, 4))
    plan[0, 0, [0, 1]] = [0.25, 0.75]
    plan[0, 1, [2, 3]] = [0.5, 0.5]
    changed = prune.prune_state(run, state, np.array([[1, 2]]), plan)
    wi_path = next(p for p in changed if p[-1] == "wi" and p[0] == 0)
    wi = np.asarray(dict((tuple(p), v) for p, v in nnx.to_flat_state(state))[wi_path].get_value())
    np.testing.assert_allclose(changed[wi_path][0, 0], 0.25 * wi[0, 0] + 0.75 * wi[0, 1], atol=1e-8)
    np.testing.assert_allclose(changed[wi_path][0, 1], 0.5 * wi[0, 2] + 0.5 * wi[0, 3], atol=1e-8)


def test_cli_prune_then_main_resumes_the_pruned_run(moe_run, tmp_path):
    workdir, config_file, _ = moe_run
    out = tmp_path / "merged"
    result = run_cli("moe_jax.prune", [f"--workdir={workdir}", "--keep=3", "--method=merge", "--num_batches=1",
                                       f"--output={out}"], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kept 3 experts per MoE layer by merge" in result.stdout and "eval CE" in result.stdout
    assert json.loads((out / "config.json").read_text())["model"]["moe"]["num_experts"] == 3
    result = run_cli("moe_jax.main", [f"--config={config_file}", "--config.model.moe.num_experts=3",
                                      "--config.train.steps=3", f"--workdir={out}"], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from the step-2 checkpoint" in result.stdout
    assert checkpoint.Checkpointer(out / "checkpoints").all_steps()[-1] == 3


def test_bad_prune_requests_are_named(moe_run, tmp_path):
    workdir, _, _ = moe_run
    with pytest.raises(ValueError, match=r"--keep=4 must be in \[max\(1, model.moe.k=1\), model.moe.num_experts=4\)"):
        prune.prune_run(workdir, 4, tmp_path / "x")
    with pytest.raises(ValueError, match="--method='mass' is not one of"):
        prune.prune_run(workdir, 2, tmp_path / "x", method="mass")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        prune.prune_run(workdir, 2, workdir)
    assert not (tmp_path / "x").exists()


def test_encoder_decoder_prune_cuts_both_stacks_and_the_run_resumes(tmp_path):
    """Both stacks' MoE layers are scored on span-corruption batches and pruned; the pruned run evaluates and
    trains on through `moe_jax.main`."""
    from moe_jax import analysis

    source = tmp_path / "encdec"
    train.train(tiny_encdec(4, steps=2), str(source), devices=jax.devices()[:1])
    run, state, _ = checkpoint.restore_run(source, devices=jax.devices()[:1])
    model, _ = nnx.merge(run.graphdef, state)
    from moe_jax import data

    batches = data.make_eval_batches(run.config.data, 2, batch_format=run.family.batch_format)
    stacks = analysis.collect_stacks(model, batches)
    assert set(stacks) == {"encoder_blocks", "decoder_blocks"}
    real_encoder_tokens = sum(int((np.asarray(b["encoder_segment_ids"]) > 0).sum()) for b in batches)
    assert stacks["encoder_blocks"].expert_index.shape[:2] == (1, real_encoder_tokens)
    scores = prune.expert_scores(model, batches, "load")
    assert scores.shape == (2, 4)  # the encoder's MoE layer, then the decoder's
    np.testing.assert_allclose(scores[0], analysis.expert_load(stacks["encoder_blocks"])[0])
    np.testing.assert_allclose(scores[1], analysis.expert_load(stacks["decoder_blocks"])[0])

    out = tmp_path / "pruned"
    result = prune.prune_run(source, 2, out, method="merge", num_batches=1, devices=jax.devices()[:1])
    assert np.isfinite(result["eval_ce_after"]) and len(result["kept"]) == 2
    pruned, pruned_state, step = checkpoint.restore_run(out, devices=jax.devices()[:1])
    assert step == 2 and pruned.config.model.moe.num_experts == 2
    flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(pruned_state)}
    for stack in ("encoder_blocks", "decoder_blocks"):
        experts = [v.shape for p, v in flat.items() if stack in p and "ffn" in p and p[-1] == "wo" and v.ndim == 4]
        assert experts and all(shape[1] == 2 for shape in experts), (stack, experts)  # model and Adam moments
    result = run_cli("moe_jax.main", [f"--config=moe_jax/convert/run_config.py:{out}", f"--workdir={out}",
                                      "--config.train.steps=3"], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert checkpoint.Checkpointer(out / "checkpoints").all_steps()[-1] == 3
