"""Every config in experiments/ builds (shapes only, nothing allocated) and starts with a runnable docstring."""

import importlib.util
import pathlib

import pytest
from flax import nnx

from cli_checks import cpu_env
from moe_jax import model as model_lib, models

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
CONFIG_FILES = sorted(p for p in EXPERIMENTS.glob("*.py") if not p.name.startswith("_"))


def load(path):
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_configs():
    assert {p.stem for p in CONFIG_FILES} >= {"tiny_dense", "tiny_switch", "switch_base", "moe_base", "t5_base"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_builds_with_shapes_only(path):
    module = load(path)
    assert module.__doc__ and "python -m moe_jax.main --config=experiments/" in module.__doc__
    counts = param_counts(module.get_config(""))
    assert counts["total"] >= counts["active"] > 0


def param_counts(cfg) -> dict:
    cfg = models.with_family_defaults(cfg)
    family = models.get(cfg)
    return family.count_params(nnx.eval_shape(lambda: family.create(cfg.model, nnx.Rngs(0))))


@pytest.mark.parametrize("name, arg, paper", [
    ("t5_base_encdec", "", 223e6), ("switch_base_encdec", "experts=128", 7.4e9),
    ("switch_large_encdec", "experts=0", 739e6), ("switch_large_encdec", "experts=128", 26.3e9)])
def test_encoder_decoder_configs_have_the_papers_parameter_counts(name, arg, paper):
    """T5-Base 223M and T5-Large 739M (§4.1), Switch-Base 7.4B and Switch-Large 26.3B (Table 9), within 2%."""
    cfg = load(EXPERIMENTS / f"{name}.py").get_config(arg)
    assert cfg.model.name == "encdec"
    assert abs(param_counts(cfg)["total"] / paper - 1) < 0.02


def test_switch_base_matches_the_paper_sizes():
    module = load(EXPERIMENTS / "switch_base.py")
    cfg = module.get_config("experts=128")
    model = nnx.eval_shape(lambda: model_lib.Transformer(cfg.model, rngs=nnx.Rngs(0)))
    counts = model_lib.count_params(model)
    assert 7.0e9 < counts["total"] < 7.8e9  # paper Table 9: 7B (Switch-Base, 128 experts)
    with pytest.raises(ValueError, match="expected experts=<int>"):
        module.get_config("expert=12")


def test_the_c4_recipe_trains_from_the_cli_given_only_its_data(tmp_path):
    """The README's real-text recipe: `--config.data.paths=` C4-style jsonl.gz is all it needs; two steps and an
    evaluation on held-out documents."""
    import gzip
    import json
    import subprocess
    import sys

    data = tmp_path / "c4-train.00000-of-01024.json.gz"
    with gzip.open(data, "wt") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog. " * 6,
                                "url": f"https://example.com/{i}", "timestamp": "2019-04-25T00:00:00Z"}) + "\n")
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "moe_jax.main", "--config=experiments/c4_tiny_switch.py", f"--workdir={workdir}",
         f"--config.data.paths={data}", "--config.train.steps=2", "--config.train.eval_every=2",
         "--config.train.eval_steps=1", "--config.data.batch_size=4"],
        cwd=EXPERIMENTS.parent, capture_output=True, text=True, timeout=600,
        env=cpu_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["tokenizer"] == "byte" and saved["model"]["vocab_size"] == 259
    assert saved["model"]["d_model"] == 64 and saved["model"]["moe"]["num_experts"] == 8
    evals = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 2 and "eval/ce" in r for r in evals)
