"""The pod dry run: tiny_switch compiled for a real TPU topology (v5e:2x2) through libtpu, no TPU needed.

libtpu is a pinned requirement (requirements.txt): these tests fail, never skip, without it.
"""

import importlib
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("TPU_LOG_DIR", tempfile.mkdtemp(prefix="moe_jax_tpu_logs_"))

import jax  # noqa: E402
import pytest  # noqa: E402
from cli_checks import assert_user_error, run_cli  # noqa: E402

from experiments import tiny_switch  # noqa: E402
from moe_jax import data, dryrun, sharding, train  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_switch_config(mesh_shape, **model):
    cfg = tiny_switch.get_config()
    # einsum is switch_base's dispatcher: the one whose all-to-alls XLA's partitioner places.
    cfg.model.moe.dispatcher = "einsum"
    cfg.model.moe.group_size = 1024  # divides the per-chip tokens of every 4-chip mesh here
    cfg.model.update(**model)
    cfg.mesh.shape = mesh_shape
    return cfg


def check_report(report, mesh):
    data_axis, expert_axis, _ = mesh
    assert report["fits"] and report["chip"]["count"] == 4 and report["chip"]["name"] == "TPU v5e"
    assert report["mesh"]["data"] == data_axis and report["mesh"]["expert"] == expert_axis

    params, state = report["params"], report["state_bytes"]
    assert params["total"] > params["active_per_token"] > params["total"] - params["expert"]
    assert state["params_total"] == 4 * params["total"]  # float32 parameters
    assert state["params_per_chip"] * 4 >= state["params_total"]
    # expert weights are split over 'expert' (and only over it: model=1, no FSDP)
    assert state["expert_params_per_chip"] * expert_axis == state["expert_params_total"]

    step = report["train_step"]
    memory = step["memory_per_chip"]
    assert memory["arguments"] >= state["params_per_chip"] + state["optimizer_per_chip"]
    assert memory["total"] == (memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
                               + memory["generated_code"])
    assert 0 < memory["total"] < memory["usable_hbm"] == 15.75 * 2**30
    assert 0 < memory["xla_peak"] < memory["usable_hbm"]
    assert memory["fraction_of_usable_hbm"] == memory["xla_peak"] / memory["usable_hbm"]
    assert memory["aliased"] > 0  # the state is donated: updated in place

    flops = step["flops"]
    assert flops["matmul_per_chip"] * 4 == pytest.approx(flops["matmul_global"])
    # compiled matmuls: the model's 6N + attention plus router, capacity padding and dispatch einsums
    assert 1.0 <= flops["matmul_per_chip"] / flops["model_per_chip"] < 3.0
    assert step["step_time_floor_s"] == pytest.approx(flops["matmul_per_chip"] / 197e12)
    assert step["compile_s"] > 0 and step["lower_s"] > 0 and step["trace_s"] > 0

    collectives = step["collectives"]
    assert not collectives["unknown_trip_counts"]
    if expert_axis > 1:
        assert collectives["all-to-all"]["ops"] > 0 and collectives["all-to-all"]["bytes_per_step"] > 0
        # the all-to-alls sit in the layer loop: they run once per MoE block (2 here), more than once a step
        assert collectives["all-to-all"]["per_step"] > collectives["all-to-all"]["ops"]
    else:
        assert collectives["all-to-all"] == dict(ops=0, per_step=0, bytes_per_step=0)
    assert collectives["all-reduce"]["ops"] > 0  # gradients over the batch axes


def test_tiny_switch_on_v5e_2x2_reports_are_self_consistent():
    """Expert parallel (1, 4, 1), mixed (2, 2, 1), and pure data parallel (4, 1, 1), which has no all-to-all.
    One test, so that a parallel test run compiles each mesh once."""
    for mesh in [(1, 4, 1), (2, 2, 1), (4, 1, 1)]:
        report = dryrun.dry_run(tiny_switch_config(mesh), "v5e:2x2", include_eval=mesh == (1, 4, 1))
        check_report(report, mesh)
        if mesh != (1, 4, 1):
            continue
        train_step, eval_step = report["train_step"], report["eval_step"]
        assert eval_step["flops"]["matmul_per_chip"] < train_step["flops"]["matmul_per_chip"] / 1.5
        assert eval_step["memory_per_chip"]["aliased"] == 0
        assert eval_step["collectives"]["all-to-all"]["ops"] > 0
        # Tokens go to their experts and back by all-to-all only: no all-gathered dispatch tensor and no
        # all-reduced combine output (what the einsum dispatcher compiled to before both sides were pinned).
        assert train_step["collectives"]["all-gather"]["ops"] == 0
        assert not any(op["kind"] == "all-reduce" and "GSEC" in op["op_name"]
                       for op in train_step["collectives"]["largest"])
        text = dryrun.format_report(report)
        for needle in ("v5e:2x2", "TPU v5e", "197 TFLOP/s", "cloud.google.com/tpu/docs/v5e", "all-to-all",
                       "step-time floor", "usable HBM", "eval step"):
            assert needle in text
        assert json.loads(json.dumps(report)) == report


def test_dry_run_compiles_the_trainers_own_step(eight_devices):
    """The dry run's step, traced from abstract shapes, lowers to the same program as the trainer's step fed
    real arrays from the data pipeline (8 CPU devices, expert parallelism on)."""
    cfg = tiny_switch_config((2, 4, 1))
    run, traced = dryrun.trace_steps(cfg, eight_devices)
    with jax.set_mesh(run.mesh):
        dry = {name: t.lower().as_text() for name, (t, _) in traced.items()}

    trainer = train.setup(cfg, eight_devices)  # a separate setup, as train.train makes it
    state = trainer.init_state()
    batch = sharding.shard_batch(next(data.make_train_iterator(cfg.data, process_index=0, process_count=1)),
                                 trainer.mesh)
    with jax.set_mesh(trainer.mesh):
        real = dict(train_step=trainer.train_step.lower(state, batch).as_text(),
                    eval_step=trainer.eval_step.lower(state, batch).as_text())
    assert dry == real
    assert "all_to_all" in dry["train_step"] or "sharding_constraint" in dry["train_step"]


def test_fsdp_with_adafactor_sets_up(eight_devices):
    """Found by the dry run of switch_large (FSDP + Adafactor): the (1,)-shaped placeholders Adafactor keeps for
    the parameters it does not factor took the parameter's 'embed' -> 'data' sharding and could not be split."""
    cfg = tiny_switch_config((2, 4, 1))
    cfg.mesh.fsdp = True
    cfg.train.optimizer = "adafactor"
    run = train.setup(cfg, eight_devices)
    specs = {s.spec for s in jax.tree.leaves(run.state_shardings)}
    assert any("data" in str(spec) for spec in specs)  # FSDP is on: something is split over 'data'


def test_too_large_config_does_not_fit():
    cfg = tiny_switch_config((4, 1, 1), d_model=8192, d_ff=32768, num_heads=64)
    with pytest.raises(dryrun.DoesNotFit) as caught:
        dryrun.dry_run(cfg, "v5e:2x2")
    message = str(caught.value)
    assert message.startswith("Does not fit")
    assert "\n" not in message  # one paragraph
    assert "v5e:2x2" in message and "(4, 1, 1)" in message
    assert re.search(r"needs [\d.]+G of .* against 15\.75G of usable HBM", message)
    for knob in ("mesh.fsdp=True", "model.remat=full", "group_size", "mesh.shape='(-1,2,1)'"):
        assert knob in message, knob
    assert caught.value.report["fits"] is False


def test_command_writes_report_or_clear_paragraph(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "moe_jax.dryrun", "--config=experiments/tiny_switch.py", "--topology=v5e:2x2",
               "--config.mesh.shape=(4,1,1)", "--config.model.moe.group_size=1024", "--config.model.d_model=8192", "--config.model.d_ff=32768",
               "--config.model.num_heads=64", f"--workdir={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Does not fit: the train step of experiments/tiny_switch.py" in result.stderr
    assert "--config.model.d_model=8192" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((tmp_path / "dryrun.json").read_text())["fits"] is False


@pytest.mark.parametrize("topology, needle", [
    ("v9:2x2", "allowed generations ('v5e', 'v5p', 'v6e')"),
    ("v5e:3x3", "allowed for v5e: 1x1, 2x2"),
    ("v5p:4x4", "allowed for v5p: 2x2x1"),
    ("", "not a TPU topology"),
])
def test_unknown_topology_names_value_and_allowed(topology, needle):
    with pytest.raises(dryrun.DryRunError) as caught:
        dryrun.dry_run(tiny_switch_config((1, 4, 1)), topology)
    assert repr(topology) in str(caught.value) and needle in str(caught.value)


def test_mesh_not_matching_topology():
    with pytest.raises(dryrun.DryRunError) as caught:
        dryrun.dry_run(tiny_switch_config((2, 4, 1)), "v5e:2x2")
    message = str(caught.value)
    assert "v5e:2x2 has 4 chips" in message and "mesh.shape=(2, 4, 1)" in message
    assert "(-1,4,1)" in message


def test_missing_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.setattr(dryrun, "libtpu_available", lambda: False)
    with pytest.raises(dryrun.DryRunError) as caught:
        dryrun.dry_run(tiny_switch_config((1, 4, 1)), "v5e:2x2")
    assert f"pip install 'jax[tpu]=={jax.__version__}'" in str(caught.value)


def test_requirements_pin_the_libtpu_that_jax_tpu_brings():
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    pin = next(line for line in requirements if line.startswith("libtpu=="))
    assert pin == f"libtpu=={importlib.metadata.version('libtpu')}"
    wanted = [r for r in importlib.metadata.requires("jax") if r.startswith("libtpu") and 'extra == "tpu"' in r]
    prefix = re.search(r"libtpu==([\d.]+)\*", wanted[0]).group(1)
    assert pin.split("==")[1].startswith(prefix)


# --------------------------------------------------------------------------------------------- meshes

EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem != "__init__")
V5P = dryrun.CHIPS["v5p"].shapes
MESH_TOPOLOGIES = ([f"v5p:{s}" for s in V5P[:V5P.index("8x8x8") + 1]]
                   + [f"v5e:{s}" for s in dryrun.CHIPS["v5e"].shapes if s != "1x1"])  # libtpu rejects v5e:1x1


def test_every_experiment_mesh_on_every_topology():
    """Shape only, no compilation: the mesh of every experiment config (its default `get_config()`) on v5p 2x2x1
    ... 8x8x8 and v5e 2x2 ... 16x16. A shape made of whole physical axes is placed as jax.make_mesh places it;
    any other shape splits a physical axis and says so; a shape the chip count cannot hold is a ValueError
    naming mesh.shape."""
    configs = {name: importlib.import_module(f"experiments.{name}").get_config() for name in EXPERIMENTS}
    refused = []
    for topology in MESH_TOPOLOGIES:
        _, devices = dryrun.topology_devices(topology)
        direct = sharding.direct_mesh_shapes(devices)
        for name, cfg in configs.items():
            typed = f"mesh.shape={tuple(cfg.mesh.shape)}"
            try:
                shape = sharding.mesh_shape(cfg.mesh.shape, len(devices))
            except ValueError:
                with pytest.raises(ValueError, match=re.escape(typed)):
                    sharding.make_mesh(cfg, devices)
                refused.append((name, topology))
                continue
            mesh = sharding.make_mesh(cfg, devices)
            assert mesh.devices.shape == shape and mesh.axis_names == sharding.MESH_AXES
            assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
            assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
            split = sharding.split_physical_axes(mesh)
            if shape in direct:
                assert not split, (name, topology)
                assert not sharding.placement_note(mesh)
                reference = jax.make_mesh(shape, sharding.MESH_AXES, devices=devices)
                assert mesh.devices.tolist() == reference.devices.tolist(), (name, topology)
            else:
                assert "expert" in split, (name, topology, shape, split)
    # The Switch configs' expert axis of 8 does not fit a 4-chip slice; nothing else is refused.
    assert sorted(refused) == sorted((name, topology) for name in ("moe_base", "switch_base", "switch_large",
                                                                   "switch_base_encdec", "switch_large_encdec")
                                     for topology in ("v5p:2x2x1", "v5e:2x2"))


def test_switch_base_on_v5p_4x4x4_splits_a_physical_axis_and_says_what_it_costs():
    """The command of the issue: the expert axis of 8 is no product of whole physical axes (4, 4, 4)."""
    _, devices = dryrun.topology_devices("v5p:4x4x4")
    cfg = importlib.import_module("experiments.switch_base").get_config()
    mesh = sharding.make_mesh(cfg, devices)
    assert dict(mesh.shape) == dict(data=8, expert=8, model=1)
    split = sharding.split_physical_axes(mesh)
    assert set(split) == {"data", "expert"} and sorted(split["expert"]) == [1, 2, 4]
    note = sharding.placement_note(mesh)
    for needle in ("mesh.shape=(8, 8, 1)", "physical torus 4x4x4", "less bandwidth", "all-to-all",
                   "map directly here: [1, 4, 16, 64]"):
        assert needle in note, needle
    assert (1, 16, 4) in sharding.direct_mesh_shapes(devices) and (8, 8, 1) not in sharding.direct_mesh_shapes(devices)


def test_mesh_that_cannot_be_placed_is_a_value_error(monkeypatch):
    _, devices = dryrun.topology_devices("v5p:4x4x4")

    def refuse(shape, devices, **kwargs):
        raise NotImplementedError("no assignment")

    monkeypatch.setattr(sharding.mesh_utils, "create_device_mesh", refuse)
    with pytest.raises(ValueError) as caught:
        sharding.make_mesh((8, 8, 1), devices)
    message = str(caught.value)
    assert "mesh.shape=(8, 8, 1) cannot be placed on 64 x TPU v5 (physical torus 4x4x4)" in message
    assert "(1, 16, 4)" in message  # the shapes that fit


def test_cpu_mesh_is_jax_make_mesh(eight_devices):
    mesh = sharding.make_mesh((2, 4, 1), eight_devices)
    reference = jax.make_mesh((2, 4, 1), sharding.MESH_AXES, devices=eight_devices)
    assert mesh.devices.tolist() == reference.devices.tolist() and not sharding.split_physical_axes(mesh)


def test_report_header_says_when_a_physical_axis_is_split():
    """(2, 8, 1) on v5e:4x4 (physical 4x4): 8 is no product of whole physical axes. A small model, train step only."""
    cfg = tiny_switch_config((2, 8, 1), num_layers=2, d_model=64, d_ff=128, num_heads=2)
    cfg.model.moe.group_size = 256
    cfg.data.batch_size, cfg.data.seq_len = 16, 64
    report = dryrun.dry_run(cfg, "v5e:4x4", include_eval=False, config_name="tiny")
    assert report["mesh"]["split_physical_axes"] == {"data": [1, 2, 1], "expert": [4, 2, 1]}
    header, *rest = dryrun.format_report(report).splitlines()
    assert "physical axes split for data, expert: less collective bandwidth over them" in header
    assert any(line.startswith("placement: mesh.shape=(2, 8, 1)") for line in rest)
    assert json.loads(json.dumps(report)) == report


# --------------------------------------------------------------------------------------------- CLI errors

TINY = "--config=experiments/tiny_switch.py"


@pytest.mark.parametrize("args, needles", [
    ([TINY, "--topology=v9:2x2"], ["'v9:2x2'", "allowed generations"]),
    ([TINY, "--topology=v5e:2x2", "--config.mesh.shape=(2,4,1)"], ["mesh.shape=(2, 4, 1)", "4 chips"]),
    ([TINY, "--topology=v5e:2x2", "--config.model.moe.num_expert=16"],
     ["num_expert", "did you mean model.moe.num_experts?"]),
    ([TINY, "--topology=v5e:2x2", "--config.model.d_model=abc"], ["model.d_model=abc", "integer"]),
    ([TINY, "--topology=v5e:2x2", "--config.model.moe.k=99"], ["model.moe.k=99", "num_experts=8"]),
    ([TINY, "--topology=v5e:2x2", "--config.model.moe.router=foo"], ["router='foo'", "top_k"]),
    ([TINY, "--topology=v5e:2x2", "--config.model.moe.dispatcher=foo"], ["dispatcher='foo'", "einsum"]),
    (["--config=experiments/nope.py", "--topology=v5e:2x2"], ["experiments/nope.py", "No such file"]),
    ([TINY], ["--topology is required"]),
], ids=["topology", "mesh", "unknown-key", "type", "k-above-experts", "router", "dispatcher", "config-file",
        "missing-flag"])
def test_command_mistakes_are_one_error_line(tmp_path, args, needles):
    workdir = tmp_path / "dryrun"
    result = run_cli("moe_jax.dryrun", [*args, f"--workdir={workdir}"], cwd=ROOT)
    assert result.returncode == 2
    assert_user_error(result, *needles, not_created=[workdir])
