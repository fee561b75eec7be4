"""The trainer end to end on the synthetic corpus: loss falls, NaN stop, config errors, 8 devices = 1 device.
(Exact resume after SIGKILL or SIGTERM, from disk in a fresh process: test_resume.py and test_multiprocess.py.)"""

import json
import pathlib

import jax
import numpy as np
import pytest

from moe_jax import train


def tiny_config(*, experts=4, steps=6, **train_overrides):
    cfg = train.default_config()
    cfg.model.update(vocab_size=cfg.data.synthetic.vocab_size, d_model=32, d_ff=64, num_layers=2, num_heads=2)
    cfg.model.moe.update(num_experts=experts, every=2, group_size=64, dispatcher="index")
    cfg.data.update(source="synthetic", seq_len=32, batch_size=8)
    cfg.train.update(steps=steps, log_every=1, eval_every=3, eval_steps=1, checkpoint_every=3,
                     learning_rate=3e-3, warmup_steps=2)
    cfg.train.update(**train_overrides)
    cfg.mesh.shape = (1, 1, 1)
    return cfg


def losses(workdir):
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def test_loss_falls_and_run_writes_its_files(tmp_path):
    cfg = tiny_config(steps=40, eval_every=20, checkpoint_every=20, learning_rate=1e-2)
    result = train.train(cfg, str(tmp_path), devices=jax.devices()[:1])
    curve = losses(tmp_path)
    assert np.mean([curve[s] for s in range(36, 41)]) < np.mean([curve[s] for s in range(1, 6)]) - 0.3
    assert (tmp_path / "config.json").exists() and list((tmp_path / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [20, 40]
    assert result["eval/gap_to_floor"] > 0
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("train/loss", "train/accuracy", "train/perplexity", "train/tokens_per_sec", "train/mfu",
                "moe/layer0/dropped_fraction", "moe/layer0/expert_load", "moe/layer0/load_balancing_loss"):
        assert key in record, key
    assert len(record["moe/layer0/expert_load"]) == 4


def test_nan_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path):
    cfg = tiny_config(steps=6)
    train.train(cfg, str(tmp_path), devices=jax.devices()[:1])  # good checkpoints at 3 and 6
    cfg = tiny_config(steps=12, learning_rate=1e30)
    with pytest.raises(train.TrainingDiverged, match=r"train/loss is (nan|inf|-inf) at step \d+"):
        train.train(cfg, str(tmp_path), devices=jax.devices()[:1])
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6


@pytest.mark.parametrize("key, value, message", [
    ("mesh.shape", (3, 1, 1), r"mesh.shape=\(3, 1, 1\) has 3 devices but there are 8 devices"),
    ("model.moe.num_experts", 6, r"model.moe.num_experts=6 must be divisible by the expert mesh axis \(4"),
    ("model.moe.k", 5, r"model.moe.k=5 must be in \[1, model.moe.num_experts=4\]"),
    ("model.moe.group_size", 24, r"model.moe.group_size=24 must be a positive integer that divides the tokens "
                                 r"per device, 32"),
    ("model.moe.capacity_factor", 0.0, r"model.moe.capacity_factor=0.0 must be > 0"),
    ("model.moe.router", "switch", r"model.moe.router='switch' is not one of \('top_k'"),
    ("model.moe.dispatcher", "gather", r"model.moe.dispatcher='gather' is not one of \('einsum'"),
    ("model.vocab_size", 512, r"model.vocab_size=512 is smaller than the 1024 token ids of data.synthetic.vocab_size"),
])
def test_config_errors_name_the_key_value_and_allowed(tmp_path, eight_devices, key, value, message):
    cfg = tiny_config()
    cfg.mesh.shape = (2, 4, 1)
    section, name = key.rsplit(".", 1)
    target = cfg
    for part in section.split("."):
        target = target[part]
    target[name] = value
    with pytest.raises(ValueError, match=message):
        train.train(cfg, str(tmp_path), devices=eight_devices)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("dispatcher", ["einsum", "index", "dropless"])
def test_sharded_training_on_8_devices_matches_one_device(tmp_path, eight_devices, dispatcher):
    """data=2, expert=4: the same 5 losses as one device, to 1e-4 relative (float32 reductions in another
    order); each device holds only its experts' weights. einsum exchanges tokens through XLA's partitioner,
    index and dropless under jax.shard_map with explicit all-to-alls."""
    one = tiny_config(steps=5, eval_every=100, checkpoint_every=100)
    one.model.moe.update(group_size=32, dispatcher=dispatcher)  # one sequence per group: the tokens a device
    train.train(one, str(tmp_path / "one"), devices=eight_devices[:1])  # holds at data x expert = 8
    eight = tiny_config(steps=5, eval_every=100, checkpoint_every=100)
    eight.mesh.shape = (2, 4, 1)
    eight.model.moe.update(group_size=32, dispatcher=dispatcher)
    train.train(eight, str(tmp_path / "eight"), devices=eight_devices)
    expected, got = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(got) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)], rtol=1e-4)

    run = train.setup(eight, eight_devices)
    expert_kernels = [s for p, s in jax.tree_util.tree_flatten_with_path(run.state_shardings)[0]
                      if "['layers'][1]['ffn']['w" in jax.tree_util.keystr(p) and "opt_state" not in jax.tree_util.keystr(p)]
    assert expert_kernels
    for kernel_sharding in expert_kernels:
        assert "expert" in jax.tree.leaves(tuple(kernel_sharding.spec))


@pytest.mark.parametrize("dispatcher", ["einsum", "index", "dropless"])
@pytest.mark.parametrize("mesh_shape, expect_all_to_all", [((2, 4, 1), True), ((8, 1, 1), False)])
def test_compiled_train_step_exchanges_tokens_by_all_to_all_over_the_expert_axis(
        eight_devices, mesh_shape, expect_all_to_all, dispatcher):
    cfg = tiny_config()
    cfg.mesh.shape = mesh_shape
    cfg.model.moe.update(dispatcher=dispatcher, group_size=32)
    run = train.setup(cfg, eight_devices)
    with jax.set_mesh(run.mesh):
        hlo = run.train_step.lower(run.abstract_state, run.abstract_batch(8, 32)).compile().as_text()
    count = hlo.count("all-to-all(")
    assert (count >= 2) if expect_all_to_all else (count == 0), count
    # Expert weights stay where they are: no all-gather of a whole [E, d, f] kernel (E=4, d=32, f=64).
    gathered = [line for line in hlo.splitlines() if "all-gather(" in line and ("[4,32,64]" in line or
                                                                              "[4,64,32]" in line)]
    assert not gathered
