"""MoE goodput: expert rows computed / useful / lost by hand-worked routings, the layer's aux, the step split,
the load model the dry run uses, and the trainer's metrics.jsonl and console line."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_checks import run_cli
from flax import nnx

from moe_jax import dispatch, goodput, routing
from moe_jax.moe import MoeLayer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def three_to_expert_0_one_to_expert_1(capacity):
    """G=1, S=4, E=2, top-1: tokens 0, 1, 2 pick expert 0, token 3 expert 1."""
    logits = jnp.asarray([[[5.0, 0.0], [5.0, 0.0], [5.0, 0.0], [0.0, 5.0]]])
    return routing.route_top_k(logits, k=1, capacity=capacity)


@pytest.mark.parametrize("name, options, computed", [
    ("einsum", {}, 4),  # E * G * C = 2 * 1 * 2 slots, one empty
    ("index", {}, 4),
    ("dropless", dict(grouped_matmul="ragged"), 4),  # exactly the 4 assignments
    ("dropless", dict(grouped_matmul="blocks", block_size=1), 5),  # dense part 2 x 2 rows, expert 0's 1 over
    ("dropless", dict(grouped_matmul="blocks", block_size=64), 68),  # ... padded to a whole 64-row block
])
def test_hand_worked_rows(name, options, computed):
    route = three_to_expert_0_one_to_expert_1(None if name == "dropless" else 2)
    assert float(dispatch.computed_rows(name, route, **options)) == computed
    rows = goodput.layer_rows(name, route, None, 1, row_flops=10.0, **(
        dict(block_size=options["block_size"]) if "block_size" in options else {}))
    if "grouped_matmul" in options and options["grouped_matmul"] == "ragged":
        return  # layer_rows follows the backend's grouped matmul: 'blocks' on this CPU
    useful, lost = (3, 1) if name != "dropless" else (4, 0)  # token 2 found no slot at capacity 2
    assert float(rows["expert_rows_computed"]) == computed
    assert float(rows["expert_rows_useful"]) == useful and float(rows["expert_rows_lost"]) == lost
    split = goodput.step_split(rows)
    assert split["goodput"] == pytest.approx(useful / computed)
    assert split["expert_flops_useful"] == pytest.approx(3 * 10.0 * useful)  # fwd + bwd
    assert split["expert_flops_padding"] == pytest.approx(3 * 10.0 * (computed - useful))
    assert split["expert_flops_lost"] == pytest.approx(3 * 10.0 * lost)
    assert split["expert_padding_share"] + split["goodput"] == pytest.approx(1.0)


def test_padding_tokens_are_neither_useful_nor_lost():
    logits = jnp.zeros((1, 4, 2)).at[0, :, 0].set(5.0)  # all four want expert 0, capacity 2
    mask = jnp.asarray([[True, True, True, False]])
    route = routing.route_top_k(logits, k=1, capacity=2, padding_mask=mask)
    rows = goodput.layer_rows("index", route, mask, 1, row_flops=1.0)
    assert (float(rows["expert_rows_computed"]), float(rows["expert_rows_useful"]),
            float(rows["expert_rows_lost"])) == (4.0, 2.0, 1.0)


@pytest.mark.parametrize("dispatcher", dispatch.DISPATCHERS)
def test_layer_aux_counts_agree_with_its_routing_metrics(dispatcher):
    layer = MoeLayer(d_model=8, d_ff=16, num_experts=4, k=2, dispatcher=dispatcher, capacity_factor=1.0,
                     group_size=32, activation="swiglu", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 8))
    _, aux = layer(x)
    assert float(aux["expert_row_flops"]) == 2 * 8 * 16 * 3  # three kernels with swiglu
    useful, lost = float(aux["expert_rows_useful"]), float(aux["expert_rows_lost"])
    assert useful + lost == 2 * 32 * 2  # every (token, choice) is kept or lost
    assert lost / (useful + lost) == pytest.approx(float(aux["dropped_fraction"]))
    if dispatcher == "dropless":
        assert lost == 0 and float(aux["expert_rows_computed"]) >= useful
    else:
        assert float(aux["expert_rows_computed"]) == 4 * 2 * routing.expert_capacity(32, 4, 1.0, k=2)


def test_step_split_sums_stacked_layers():
    aux = dict(expert_rows_computed=np.array([10.0, 20.0]), expert_rows_useful=np.array([8.0, 10.0]),
               expert_rows_lost=np.array([1.0, 0.0]), expert_row_flops=np.array([2.0, 2.0]))
    split = goodput.step_split(aux, training=False)
    assert split == pytest.approx(dict(goodput=18 / 30, expert_flops_useful=36.0, expert_flops_padding=24.0,
                                       expert_flops_lost=2.0, expert_padding_share=12 / 30,
                                       expert_lost_share=1 / 30))
    assert goodput.step_split({}) == {}


def test_expected_rows_under_uniform_and_one_hot_load():
    uniform = goodput.expected_rows("index", np.full(4, 0.25), num_groups=2, group_size=64, k=1, capacity=20)
    assert uniform == dict(computed=4 * 2 * 20, useful=2 * 64, lost=0)
    hot = goodput.expected_rows("einsum", [1, 0, 0, 0], num_groups=2, group_size=64, k=1, capacity=20)
    assert hot == dict(computed=160, useful=40, lost=128 - 40)
    dropless = goodput.expected_rows("dropless", [1, 0, 0, 0], num_groups=2, group_size=64, k=1, capacity=None,
                                     block_size=64)
    # dense part 4 x 32 rows, expert 0's 96 extra rows in 2 blocks of 64
    assert dropless == dict(computed=128 + 128, useful=128, lost=0)


def test_trainer_logs_goodput_to_metrics_and_console(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("moe_jax.main", [
        "--config=experiments/tiny_switch.py", f"--workdir={workdir}", "--config.train.steps=2",
        "--config.train.log_every=1", "--config.train.eval_every=2", "--config.train.eval_steps=1",
        "--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.num_layers=2",
        "--config.model.num_heads=2", "--config.data.seq_len=32", "--config.data.batch_size=8",
        "--config.model.moe.group_size=64"], cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/goodput" in r]
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert 0 < r["train/goodput"] <= 1
        assert r["train/expert_flops_useful"] > 0 and r["train/expert_flops_lost"] >= 0
        share = r["train/expert_flops_padding"] / (r["train/expert_flops_useful"] + r["train/expert_flops_padding"])
        assert r["train/expert_padding_share"] == pytest.approx(share)
    assert "goodput=" in result.stdout + result.stderr
