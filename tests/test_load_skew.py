"""The dry run under routing skew (moe_jax/load_skew.py): --load_skew values, observed loads from a run's
metrics.jsonl, the per-chip model by hand-worked cases, and the command on a tiny config for v5e:2x2."""

import json
import os
import pathlib
import tempfile

os.environ.setdefault("TPU_LOG_DIR", tempfile.mkdtemp(prefix="moe_jax_tpu_logs_"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from cli_checks import assert_user_error, run_cli  # noqa: E402

from experiments import tiny_switch  # noqa: E402
from moe_jax import chips, dryrun, load_skew  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def shape(dispatcher="index", experts=4, k=1, layers=2, group=64):
    return load_skew.MoeShape(num_layers=layers, num_experts=experts, k=k, d_model=8, d_ff=16, gated=False,
                              dispatcher=dispatcher, capacity_factor=1.0, min_capacity=1, group_size=group,
                              dtype_bytes=4)


def write_metrics(run, rows):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("spec, kind", [("uniform", ("uniform", None)), ("worst", ("worst", None)),
                                        ("observed:runs/a", ("observed", "runs/a"))])
def test_parse(spec, kind):
    assert load_skew.parse(spec) == kind


@pytest.mark.parametrize("spec", ["", "skewed", "observed:", "observed"])
def test_parse_names_the_flag_and_the_allowed_values(spec):
    with pytest.raises(ValueError, match=r"--load_skew=.*uniform, worst, observed:RUN"):
        load_skew.parse(spec)


def test_uniform_and_worst_loads():
    uniform, _ = load_skew.loads("uniform", shape(experts=4))
    np.testing.assert_allclose(uniform, np.full((2, 4), 0.25))
    worst, text = load_skew.loads("worst", shape(experts=4, k=2))
    np.testing.assert_allclose(worst, [[0.5, 0.5, 0, 0]] * 2)  # a token's two choices are distinct experts
    assert "worst" in text


def test_observed_takes_the_most_skewed_logged_step(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, [
        {"step": 10, "moe/layer0/expert_load": [0.25] * 4, "moe/layer1/expert_load": [0.4, 0.2, 0.2, 0.2]},
        {"step": 20, "eval/loss": 1.0},
        {"step": 30, "moe/layer0/expert_load": [0.7, 0.1, 0.1, 0.1], "moe/layer1/expert_load": [0.25] * 4},
        {"step": 40, "moe/layer0/expert_load": [0.3, 0.3, 0.2, 0.2], "moe/layer1/expert_load": [0.25] * 4}])
    step, load = load_skew.observed_loads(str(run), num_experts=4)
    assert step == 30
    np.testing.assert_allclose(load, [[0.7, 0.1, 0.1, 0.1], [0.25] * 4])
    loads, text = load_skew.loads(f"observed:{run}", shape(experts=4, layers=2))
    np.testing.assert_allclose(loads, load)
    assert "step 30" in text


def test_observed_mistakes_name_the_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        load_skew.observed_loads(str(tmp_path / "missing"), num_experts=4)
    write_metrics(tmp_path / "dense", [{"step": 1, "train/loss": 2.0}])
    with pytest.raises(ValueError, match="no per-layer moe/layer<i>/expert_load"):
        load_skew.observed_loads(str(tmp_path / "dense"), num_experts=4)
    write_metrics(tmp_path / "e8", [{"step": 1, "moe/layer0/expert_load": [0.125] * 8}])
    with pytest.raises(ValueError, match="8 experts per layer and this config 4"):
        load_skew.observed_loads(str(tmp_path / "e8"), num_experts=4)
    write_metrics(tmp_path / "three", [{"step": 1, **{f"moe/layer{i}/expert_load": [0.25] * 4 for i in range(3)}}])
    with pytest.raises(ValueError, match="logged 3 MoE layers and this config has 2"):
        load_skew.loads(f"observed:{tmp_path / 'three'}", shape(layers=2))


def report(moe_shape, spec, ep=2, chips_=2, tokens=256):
    load_LE, text = load_skew.loads(spec, moe_shape)
    return load_skew.skew_report(moe_shape, load_LE, tokens_per_step=tokens, num_chips=chips_, expert_axis=ep,
                                 chip=chips.CHIPS["v5e"], compiled_matmul_per_chip=1e9,
                                 compiled_expert_matmul_per_chip=4e8, compiled_all_to_all_bytes=1e6,
                                 compiled_peak_bytes=1e8, description=text)


def test_capacity_path_by_hand():
    # 2 chips x 128 tokens, groups of 64: 2 groups per chip; E=4 (2 per chip), C = 64/4 = 16 slots.
    # Every chip computes 2 experts x (2 groups x 2 chips) x 16 slots = 128 rows per layer, any load.
    uniform = report(shape("index"), "uniform")
    assert uniform["expert_rows_busiest_chip"] == uniform["expert_rows_mean_chip"] == 2 * 128
    assert uniform["goodput_per_chip"]["mean"]["goodput"] == pytest.approx(1.0)  # 16 of 16 slots used
    worst = report(shape("index"), "worst")
    assert worst["expert_rows_busiest_chip"] == 2 * 128  # capacity: the same work, mostly padding
    busiest = worst["goodput_per_chip"]["busiest"]
    assert busiest["goodput"] == pytest.approx(0.5)  # expert 0's 4 x 16 slots full, expert 1's empty
    assert busiest["expert_flops_lost"] / busiest["expert_flops_useful"] == pytest.approx((256 - 64) / 64)
    assert worst["step_time_floor_s"] == pytest.approx(uniform["step_time_floor_s"])
    assert worst["memory_if_sized_to_load"] == worst["memory_peak_compiled"]


def test_dropless_worst_case_is_the_compiled_buffer():
    uniform, worst = report(shape("dropless"), "uniform"), report(shape("dropless"), "worst")
    # uniform: 256 assignments per layer over 2 chips -> 128 each; worst: all 256 on chip 0
    assert uniform["expert_rows_busiest_chip"] == 2 * 128 and worst["expert_rows_busiest_chip"] == 2 * 256
    assert worst["goodput_per_chip"]["busiest"]["goodput"] == 1.0  # exact grouped matmul: no padding
    assert worst["expert_activation_bytes_busiest"] == worst["expert_activation_bytes_static"]
    assert worst["memory_if_sized_to_load"] == worst["memory_peak_compiled"]
    assert uniform["memory_if_sized_to_load"] < uniform["memory_peak_compiled"]
    assert worst["step_time_floor_s"] > uniform["step_time_floor_s"]
    # real rows into the busiest chip: half its rows come from the other chip, 4 exchanges, 8 floats each
    assert worst["all_to_all_bytes_real_rows_busiest"] == 2 * 256 / 2 * 4 * 8 * 4
    assert uniform["all_to_all_bytes_real_rows_busiest"] == 2 * 128 / 2 * 4 * 8 * 4


def test_dry_run_of_tiny_switch_under_observed_skew(tmp_path):
    cfg = tiny_switch.get_config()
    cfg.model.update(num_layers=2, d_model=64, d_ff=128, num_heads=2)
    cfg.model.moe.update(dispatcher="dropless", group_size=1024)
    cfg.mesh.shape = (1, 4, 1)
    run = tmp_path / "run"
    write_metrics(run, [{"step": 5, "moe/layer0/expert_load": [0.65] + [0.05] * 7}])
    result = dryrun.dry_run(cfg, "v5e:2x2", include_eval=False, load_skew_spec=f"observed:{run}")
    skew = result["load_skew"]
    assert "step 5" in skew["load"] and skew["max_expert_load"] == pytest.approx(0.65)
    # chip 0 holds experts 0 and 1: 70% of the 4096 assignments of its layer
    assert skew["expert_rows_busiest_chip"] == pytest.approx(0.70 * 4096)
    assert skew["step_time_floor_s"] > 0 and skew["all_to_all_bytes_compiled"] > 0
    assert skew["memory_peak_compiled"] == result["train_step"]["memory_per_chip"]["xla_peak"]
    shares = result["train_step"]["step_shares"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares["experts"] > 0 and shares["all_to_all"] > 0
    text = dryrun.format_report(result)
    assert "expert goodput per chip" in text and "busiest chip" in text and "step shares" in text


def test_command_load_skew_mistakes_are_one_error_line(tmp_path):
    common = ["--config=experiments/tiny_switch.py", "--topology=v5e:2x2", "--config.mesh.shape=(1,4,1)",
              f"--workdir={tmp_path / 'dryrun'}"]
    result = run_cli("moe_jax.dryrun", [*common, "--load_skew=skewed"], cwd=ROOT)
    assert_user_error(result, "--load_skew='skewed'", "observed:RUN", not_created=[tmp_path / "dryrun"])
    result = run_cli("moe_jax.dryrun", [*common, f"--load_skew=observed:{tmp_path / 'nope'}"], cwd=ROOT)
    assert_user_error(result, "metrics.jsonl", "nope", not_created=[tmp_path / "dryrun"])
