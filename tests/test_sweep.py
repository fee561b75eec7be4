"""The sweep runner: a 2-variant sweep runs end to end and writes its results, finished variants are skipped,
identical configs share a run, --print_commands prints runnable commands, and bad input fails clearly."""

import csv
import json
import math
import pathlib
import shlex
import subprocess
import sys

import pytest
from cli_checks import assert_user_error, cpu_env, cpu_settings, run_cli

from moe_jax import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every file there is a sweep (defines `variants`) except these helpers: a script that trains nothing and the
# C4-recipe wrapper the *_c4.py sweeps share.
NOT_SWEEPS = {"__init__", "c4_crossover", "on_c4"}
ABLATIONS = sorted(p for p in (REPO / "experiments" / "ablations").glob("*.py") if p.stem not in NOT_SWEEPS)

# Two variants of a very small Switch model: a handful of steps, one device, no checkpoints to speak of.
SWEEP_FILE = '''"""Tiny test sweep: einsum vs index."""
from moe_jax import sweep

COLUMNS = ("eval_ce", "dropped_fraction", "examples_per_sec", "router_max_logit")
PAPER = "No paper number."


def variants(scale):
    b = sweep.base(scale, laptop_steps=4, evals=2).override({
        "model.num_layers": 2, "model.d_model": 32, "model.d_ff": 64, "model.num_heads": 2,
        "model.moe.num_experts": 4, "model.moe.group_size": 64, "data.batch_size": 4, "data.seq_len": 32,
        "train.eval_steps": 1, "train.warmup_steps": 1, "train.peak_flops_per_device": 1e12})
    return {"index": b, "einsum": b.override({"model.moe.dispatcher": "einsum"}, paper="-1.5")}


def analysis(results, scale):
    return "measured " + ", ".join(f"{n}={s.final_ce:.3f}" for n, s in results.items())
'''


@pytest.fixture
def one_device(monkeypatch):
    """Training subprocesses on one CPU device (conftest gives this process 8), compiled fast."""
    for name, value in cpu_settings().items():
        monkeypatch.setenv(name, value)


def write_sweep(tmp_path, text=SWEEP_FILE, name="toy"):
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return path


def test_sweep_runs_writes_results_and_skips_finished(tmp_path, one_device, capsys):
    path = write_sweep(tmp_path)
    workdir, results = tmp_path / "runs", tmp_path / "results"
    argv = [f"--sweep={path}", f"--workdir={workdir}", f"--results_dir={results}"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("python -m moe_jax.main") == 2

    for variant in ("index", "einsum"):
        records = [json.loads(l) for l in (workdir / "toy" / variant / "metrics.jsonl").read_text().splitlines()]
        assert any(r["step"] == 4 and "eval/ce" in r for r in records)
        assert any("moe/router_max_logit" in r for r in records)  # the metric the z-loss sweep reads
    md = (results / "toy.md").read_text()
    for text in ("command: `python -m moe_jax.sweep", "machine:", "date:", "git commit:", "| index | finished",
                 "| einsum | finished", "-1.5", "No paper number.", "measured index=", "![", "toy.png"):
        assert text in md, text
    rows = list(csv.DictReader(open(results / "toy.csv")))
    assert [r["variant"] for r in rows] == ["index", "einsum"]
    assert all(float(r["final_eval_ce"]) > 0 and float(r["examples_per_sec"]) > 0 for r in rows)
    assert (results / "toy.png").read_bytes()[:4] == b"\x89PNG"
    # einsum and index execute the same routing: the same losses to float noise.
    assert float(rows[0]["final_eval_ce"]) == pytest.approx(float(rows[1]["final_eval_ce"]), abs=1e-3)

    # Each run left a record beside the results (no checkpoints): on a fresh machine (a new, empty workdir) the
    # sweep restores both runs from them instead of training, and writes the same table.
    for variant in ("index", "einsum"):
        record = results / "records" / "toy" / variant
        assert sorted(p.name for p in record.iterdir()) == sorted(sweep.RECORD_FILES)
    table = (results / "toy.csv").read_text()
    assert sweep.main([f"--sweep={path}", f"--workdir={tmp_path / 'elsewhere'}", f"--results_dir={results}"]) == 0
    out = capsys.readouterr().out
    assert out.count("restored from its record") == 2 and "python -m moe_jax.main" not in out
    strip_run_dirs = lambda text: [row.rsplit(",", 1)[0] for row in text.splitlines()]
    assert strip_run_dirs((results / "toy.csv").read_text()) == strip_run_dirs(table)
    # A record of another config (the sweep file changed since) is not restored: that variant trains again.
    (results / "records" / "toy" / "index" / sweep.KEY_FILE).write_text("0123456789abcdef\n")
    assert sweep.main([f"--sweep={path}", f"--workdir={tmp_path / 'third'}", f"--results_dir={results}",
                       "--variants=index"]) == 0
    out = capsys.readouterr().out
    assert "restored" not in out and out.count("python -m moe_jax.main") == 1
    assert (results / "records" / "toy" / "index" / sweep.KEY_FILE).read_text() != "0123456789abcdef\n"

    # Running again trains nothing: both variants are finished.
    (results / "toy.md").unlink()
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("already done") == 2 and "python -m moe_jax.main" not in out
    assert (results / "toy.md").exists()
    # A run dir of another config (the sweep file changed since it ran) is neither reported, resumed nor
    # recorded: the sweep stops before training anything and names it.
    record_key = (results / "records" / "toy" / "einsum" / sweep.KEY_FILE).read_text()
    changed = write_sweep(tmp_path, SWEEP_FILE.replace('"model.moe.dispatcher": "einsum"',
                                                       '"model.moe.dispatcher": "einsum", "train.seed": 3'))
    assert sweep.main([f"--sweep={changed}", f"--workdir={workdir}", f"--results_dir={results}"]) == 2
    err = capsys.readouterr().err
    assert "hold runs of another config" in err and str(workdir / "toy" / "einsum") in err and "index" not in err
    assert (results / "records" / "toy" / "einsum" / sweep.KEY_FILE).read_text() == record_key
    write_sweep(tmp_path)

    # Another sweep with an identical config under the same workdir reuses the finished run.
    other = write_sweep(tmp_path, SWEEP_FILE.replace('"einsum": b.override', '"unused": b.override'), "other")
    assert sweep.main([f"--sweep={other}", f"--workdir={workdir}", f"--results_dir={results}",
                       "--variants=index"]) == 0
    assert "reused" in capsys.readouterr().out
    assert not (workdir / "other" / "index" / "metrics.jsonl").exists()
    # ... and on a fresh machine (an empty workdir, records only) a third sweep restores it from the toy sweep's
    # record instead of training it; --no_reuse trains it.
    third = write_sweep(tmp_path, SWEEP_FILE.replace('"einsum": b.override', '"unused": b.override'), "third")
    assert sweep.main([f"--sweep={third}", f"--workdir={tmp_path / 'fresh'}", f"--results_dir={results}",
                       "--variants=index"]) == 0
    out = capsys.readouterr().out
    assert "restored from the record of an identical config" in out and "python -m moe_jax.main" not in out
    assert (results / "records" / "third" / "index" / sweep.KEY_FILE).read_text() == (
        results / "records" / "toy" / "index" / sweep.KEY_FILE).read_text()
    assert sweep.main([f"--sweep={third}", f"--workdir={tmp_path / 'fresher'}", f"--results_dir={results}",
                       "--variants=unused", "--no_reuse", "--no_records"]) == 0
    assert "python -m moe_jax.main" in capsys.readouterr().out

    # --results_only trains nothing: the finished run (here the toy sweep's identical one) is reported, the
    # variant that never ran is listed as todo.
    partial = write_sweep(tmp_path, SWEEP_FILE.replace('"einsum": b.override({"model.moe.dispatcher": "einsum"}',
                                                       '"fresh": b.override({"train.seed": 7}'), "partial")
    assert sweep.main([f"--sweep={partial}", f"--workdir={workdir}", f"--results_dir={results}",
                       "--results_only"]) == 0
    assert "python -m moe_jax.main" not in capsys.readouterr().out
    md = (results / "partial.md").read_text()
    assert "| index | finished" in md and "| fresh | todo" in md
    assert not (workdir / "partial").exists()


def test_print_commands_are_runnable_main_commands(tmp_path, capsys):
    path = write_sweep(tmp_path)
    assert sweep.main([f"--sweep={path}", "--workdir=runs/x", "--print_commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    argv = shlex.split(lines[1])
    assert argv[:3] == ["python", "-m", "moe_jax.main"]
    assert "--config=experiments/tiny_switch.py" in argv and "--workdir=runs/x/toy/einsum" in argv
    assert "--config.model.moe.dispatcher=einsum" in argv
    # The CLI accepts exactly these flags: a config that validates but cannot train (0 steps) errors out
    # on the value, not on the flag syntax.
    proc = subprocess.run([sys.executable, *argv[1:], "--config.train.steps=0"], cwd=REPO, capture_output=True,
                          text=True, env=cpu_env())
    assert "train.steps=0" in proc.stderr, proc.stderr[-2000:]


def test_the_helpers_beside_the_sweeps_are_not_sweeps():
    for stem in NOT_SWEEPS - {"__init__"}:
        assert "\ndef variants(" not in (REPO / "experiments" / "ablations" / f"{stem}.py").read_text()


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_every_ablation_builds_at_both_scales(path):
    for scale in sweep.SCALES:
        loaded = sweep.load_sweep(str(path), scale)
        assert len(loaded.variants) >= 2
        assert "python -m moe_jax.sweep --sweep=experiments/ablations/" in loaded.module.__doc__
        assert loaded.title.endswith((".", "?", ")")) and "\n" not in loaded.title, loaded.title
        # Laptop variants start from the tiny configs (the encoder-decoder twins derive from them), so a retune
        # of those configs reaches every sweep.
        bases = {v.config.split(":")[0] for v in loaded.variants.values()}
        laptop = {f"experiments/{name}.py" for name in ("tiny_switch", "tiny_dense", "t5_tiny_switch", "t5_tiny_dense")}
        paper = {f"experiments/{name}.py" for name in ("switch_base", "t5_base", "switch_base_encdec", "t5_base_encdec")}
        assert bases <= (laptop if scale == "laptop" else paper)


def test_bad_sweep_files_and_variants_fail_clearly(tmp_path, capsys):
    def error(argv):
        assert sweep.main(argv) == 2
        return capsys.readouterr().err

    workdir = f"--workdir={tmp_path}"
    assert "not found" in error(["--sweep=nope.py", workdir])
    assert "must define a function `variants`" in error([f"--sweep={write_sweep(tmp_path, 'X = 1')}", workdir])
    broken = write_sweep(tmp_path, "import not_a_module_anywhere", "broken")
    assert "failed to import: ModuleNotFoundError" in error([f"--sweep={broken}", workdir])
    bad_key = write_sweep(tmp_path, SWEEP_FILE.replace('"model.moe.num_experts"', '"model.moe.num_expert"'), "key")
    assert "unknown config key 'model.moe.num_expert'" in error([f"--sweep={bad_key}", workdir])
    message = error([f"--sweep={write_sweep(tmp_path)}", workdir, "--variants=index,bogus"])
    assert "unknown variant(s) ['bogus']" in message and "['index', 'einsum']" in message


RAISES_IN_VARIANTS = """from moe_jax import sweep


def variants(scale):
    return {"a": sweep.base(scale)} | {"b": 1 / 0}


def analysis(results, scale):
    return ""
"""
BAD_CONFIG_ARG = RAISES_IN_VARIANTS.replace('{"a": sweep.base(scale)} | {"b": 1 / 0}',
                                            '{"a": sweep.Variant("experiments/switch_base.py:experts=abc")}')
NUM_EXPERTS = "--sweep=experiments/ablations/num_experts.py"


@pytest.mark.parametrize("args, needles", [
    ([NUM_EXPERTS, "--scale=huge"], ["--scale", "'huge'", "'laptop', 'paper'"]),
    (["--sweep=experiments/ablations/nope.py"], ["'experiments/ablations/nope.py' not found"]),
    (["--sweep=README.md"], ["'README.md' is not a Python file"]),
    ([NUM_EXPERTS, "--variants=8 experts seed 0,bogus"], ["['bogus']", "'dense seed 0', '2 experts seed 0'"]),
    ([], ["required: --sweep"]),
    (["--sweep={raises}"], ["variants('laptop') raised ZeroDivisionError", "raises.py line 5"]),
    (["--sweep={bad_arg}"], ["variant 'a'", "get_config('experts=abc') raised ValueError", "experts=<int>"]),
], ids=["scale", "missing-file", "not-python", "variant", "missing-flag", "variants-raises", "config-arg"])
def test_command_mistakes_are_one_error_line(tmp_path, args, needles):
    """The sweep command as a user runs it: one `error:` line, status 2, nothing created."""
    files = dict(raises=write_sweep(tmp_path, RAISES_IN_VARIANTS, "raises"),
                 bad_arg=write_sweep(tmp_path, BAD_CONFIG_ARG, "bad_arg"))
    workdir, results = tmp_path / "runs", tmp_path / "results"
    args = [a.format(**files) for a in args] + [f"--workdir={workdir}", f"--results_dir={results}"]
    result = run_cli("moe_jax.sweep", args, cwd=REPO)
    assert result.returncode == 2
    assert_user_error(result, *needles, not_created=[workdir, results])


def test_seeds_of_one_point_are_plotted_as_mean_and_spread():
    from types import SimpleNamespace

    from moe_jax import sweep_results

    def run(name, ce, status="finished"):
        return SimpleNamespace(name=name, status=status, eval_steps=[10, 20, 30][:len(ce)], eval_ce=ce,
                               eval_seconds=[1.0, 2.0, 3.0][:len(ce)])

    curves = sweep_results.curves([run("dense seed 0", [3.0, 2.0, 1.0]), run("dense seed 1", [3.2, 2.4]),
                                   run("switch-8 CF 1.0", [2.9, 1.9, 0.9], status="diverged")])
    dense, switch = curves
    assert dense.label == "dense (mean ± std, 2 seeds)" and dense.steps == [10, 20]  # the steps both reached
    assert dense.ce == pytest.approx([3.1, 2.2]) and dense.spread == pytest.approx([0.1414214, 0.2828427])
    assert switch.label == "switch-8 CF 1.0 (diverged)" and switch.spread is None and switch.ce == [2.9, 1.9, 0.9]


def fake_run(name, final_ce, steps=300):
    from moe_jax import sweep_results

    eval_steps = list(range(50, steps + 1, 50))
    ce = [final_ce + 0.1 * (len(eval_steps) - i - 1) for i in range(len(eval_steps))]
    return sweep_results.Summary(
        name=name, run_dir="", status="finished", steps=steps, last_step=steps, eval_steps=eval_steps, eval_ce=ce,
        eval_seconds=[float(s) for s in eval_steps], train_steps=eval_steps, train_loss=ce, entropy_floor=None,
        examples_per_sec=50.0, train_seconds=100.0, dropped_fraction=0.01, load_cv=0.2, router_max_logit=1.0,
        max_train_loss_jump=0.0)


def test_points_are_compared_over_their_seeds_against_the_noise():
    from moe_jax import sweep_results

    results = {f"{point} seed {seed}": fake_run(f"{point} seed {seed}", ce)
               for point, ces in {"dense": (2.00, 2.02, 2.04), "near": (1.99, 2.01, 2.03),
                                  "far": (1.80, 1.81, 1.82)}.items() for seed, ce in enumerate(ces)}
    dense, near, far = sweep_results.compare_points(results, "dense")
    assert (dense.point, dense.mean, dense.seeds) == ("dense", pytest.approx(2.02), 3)
    assert near.delta == pytest.approx(-0.01) and near.in_seed_stds == pytest.approx(-0.5)
    assert not near.beyond_noise and far.beyond_noise and far.in_seed_stds == pytest.approx(-0.21 / 0.02)
    assert far.in_standard_errors == pytest.approx(-0.21 / ((0.02 ** 2 + 0.01 ** 2) / 3) ** 0.5)
    sentence = sweep_results.noise_sentence([dense, near, far], "dense")
    assert "far (-0.2100, -10.5 stds)" in sentence and "near" not in sentence
    table = sweep_results.comparison_table([dense, near, far], "dense")
    assert table[3].startswith("| near | 2.0100 ± 0.0200 (3) | -0.0100 | -0.5 |") and table[4].endswith("| yes |")


def test_step_speedup_interpolates_where_the_mean_curve_reaches_the_baselines_final_loss():
    from moe_jax import sweep_results

    results = {f"{point} seed {seed}": fake_run(f"{point} seed {seed}", ce)
               for point, ces in {"dense": (2.0, 2.0), "moe": (1.9, 1.9), "worse": (2.1, 2.1)}.items()
               for seed, ce in enumerate(ces)}
    means = sweep_results.mean_curves(results)
    assert set(means) == {"dense", "moe", "worse"}
    # dense reaches 2.0 at step 300; moe's curve (2.4, 2.3, ..., 1.9 at 50..300) reaches it at step 250
    assert sweep_results.step_speedup(means["dense"], means["moe"]) == pytest.approx(300 / 250)
    assert math.isnan(sweep_results.step_speedup(means["dense"], means["worse"]))
    c4_study = sweep.load_sweep("experiments/ablations/c4_study.py")
    study = {n: fake_run(n, 2.0 - 0.1 * n.startswith("switch")) for n in c4_study.variants}
    row = next(line for line in c4_study.module.analysis(study, "laptop").splitlines()
               if line.startswith("| switch-8 d 64 900 steps"))
    assert row.endswith("| 1.20× |")
    assert "| -0.1000 ± 0.0000 (5 of 5) |" in row  # the recipe's point pairs its five seeds


@pytest.mark.parametrize("name", ["num_experts", "capacity_factor", "init_scale"])
def test_headline_sweeps_run_three_seeds_at_full_length_and_analyse_them(name):
    """The Fig. 4 / Table 1 / Table 3 sweeps: every point has seeds 0-2 at the tiny configs' 300 steps, and
    the analysis of a full set of (fake) results reports means, spreads and the noise verdict."""
    module = sweep.load_sweep(f"experiments/ablations/{name}.py")
    names = list(module.variants)
    assert {n.rpartition(" seed ")[2] for n in names} == {"0", "1", "2"}
    assert {v.overrides["train.steps"] for v in module.variants.values()} == {300}
    results = {n: fake_run(n, 2.0 + 0.01 * i) for i, n in enumerate(names)}
    text = module.module.analysis(results, "laptop")
    assert "±" in text and "seed std" in text


@pytest.mark.parametrize("name", ["num_experts", "capacity_factor", "init_scale"])
def test_headline_sweeps_on_the_c4_recipe_are_their_twins_on_c4_tiny_data(name):
    """<name>_c4.py: the same points and seeds, each run with c4_tiny_*.py's data and length (1800 steps, the
    study's 5 evaluations), and an analysis that reads those steps (init_scale's 'early': the first evaluation
    past a third); the points it shares with the recipe are the study's `d 64 1800 steps` configs."""
    from experiments import c4_tiny_dense

    synthetic = sweep.load_sweep(f"experiments/ablations/{name}.py").variants
    on_c4 = sweep.load_sweep(f"experiments/ablations/{name}_c4.py")
    assert list(on_c4.variants) == list(synthetic)
    recipe = c4_tiny_dense.get_config()
    for variant_name, variant in on_c4.variants.items():
        cfg = sweep.load_config(variant)
        assert (cfg.train.steps, cfg.data.source, cfg.data.tokenizer, cfg.model.vocab_size) == (
            recipe.train.steps, "jsonl", recipe.data.tokenizer, recipe.model.vocab_size)
        assert cfg.data.paths.endswith("c4_sample.jsonl.gz") and cfg.data.eval_fraction == 0.05
        assert (cfg.model.d_model, cfg.model.d_ff) == (recipe.model.d_model, recipe.model.d_ff)
        # the study's cadence (5 evaluations), so the points it shares with the recipe are the study's runs
        assert (cfg.train.eval_every, cfg.train.checkpoint_every) == (recipe.train.steps // 5, recipe.train.steps)
        twin = {k: v for k, v in synthetic[variant_name].overrides.items() if not k.startswith(("train.", "data."))}
        assert {k: variant.overrides[k] for k in twin} == twin  # the point's own settings are kept
    study = sweep.load_sweep("experiments/ablations/c4_study.py").variants
    recipe_runs = {sweep.config_key(sweep.load_config(v)) for n, v in study.items() if " d 64 1800 steps " in n}
    shared = [n for n, v in on_c4.variants.items() if sweep.config_key(sweep.load_config(v)) in recipe_runs]
    assert len(shared) == {"num_experts": 6, "capacity_factor": 3, "init_scale": 3}[name]
    results = {n: fake_run(n, 2.0 + 0.01 * i, steps=1800) for i, n in enumerate(on_c4.variants)}
    text = on_c4.module.analysis(results, "laptop")
    assert "±" in text and "seed std" in text and "300 steps" not in text
    if name == "init_scale":
        assert "eval CE at step 720" in text  # the first evaluation past a third of the run


@pytest.mark.parametrize("early_gap, reading", [(0.3, "the slower start of the larger init"),
                                                 (0.0, "neither behind beyond the noise nor less stable")])
def test_init_scale_analysis_says_what_the_runs_show_instead_of_instability(early_gap, reading):
    """The closing reading follows the runs: a slow start of 1.0x only when it is behind beyond the noise."""
    from dataclasses import replace

    from experiments.ablations import init_scale

    results = {}
    for scale, gap, jump in ((0.1, 0.0, 0.12), (1.0, early_gap, 0.25)):
        for seed in range(3):
            run = fake_run(f"{scale:g}x seed {seed}", 2.0 + 0.01 * seed)
            results[run.name] = replace(run, eval_ce=[ce + gap for ce in run.eval_ce[:-1]] + run.eval_ce[-1:],
                                        max_train_loss_jump=jump)
    text = init_scale.analysis(results, "laptop")
    assert reading in text and "0.250 with 1.0× against 0.120 with 0.1×" in text


def test_upcycling_analysis_compares_each_seed_with_its_own_dense_continuation():
    module = sweep.load_sweep("experiments/ablations/upcycle_c4.py")
    ce = {"dense 300": 1.89, "dense +150": 1.81, "upcycled +150": 1.82, "scratch 150": 2.09}
    results = {n: fake_run(n, ce[n.rsplit(" ", 1)[0]] + 0.001 * int(n[-1]) * (1 + n.startswith("up")))
               for n in module.variants}
    text = module.module.analysis(results, "laptop")
    assert "upcycled minus dense continued: +0.0100, +0.0110, +0.0120" in text and "behind in 3 of 3 seeds" in text
    assert "ahead of the Switch model trained from scratch" in text


def test_config_keys_do_not_depend_on_where_the_checkout_is(monkeypatch):
    """Records made in one clone restore in another: paths in and beside the checkout hash relative to it."""
    def key_with_root(root):
        variant = sweep.Variant("experiments/tiny_dense.py", {
            "data.paths": str(root.parent / "shared" / "data" / "c4_sample.jsonl.gz"),
            "data.tokenizer": str(root / "runs" / "tokenizers" / "sp.model")})
        cfg = sweep.load_config(variant)
        with monkeypatch.context() as patch:
            patch.setattr(sweep, "REPO", root)
            return sweep.config_key(cfg)

    here = key_with_root(sweep.REPO)
    assert key_with_root(pathlib.Path("/somewhere/else/moe_jax")) == here
    assert key_with_root(pathlib.Path("/somewhere/else/moe_jax")) != sweep.config_key(sweep.load_config(
        sweep.Variant("experiments/tiny_dense.py", {"data.tokenizer": "byte"})))


def test_the_c4_recipe_is_the_study_pair_it_reports():
    """c4_tiny_*.py quote the study's `d 64 1800 steps` numbers, so their configs must be those runs' configs
    (logging and checkpoint cadence aside)."""
    from experiments import c4_tiny_dense, c4_tiny_switch

    study = sweep.load_sweep("experiments/ablations/c4_study.py").variants
    for kind, module in (("dense", c4_tiny_dense), ("switch-8", c4_tiny_switch)):
        measured = sweep.load_config(study[f"{kind} d 64 1800 steps seed 0"])
        recipe = module.get_config()
        recipe.data.paths = measured.data.paths
        for cfg in (measured, recipe):
            cfg.train.log_every, cfg.train.checkpoint_every = 0, 0
        assert recipe.to_dict() == measured.to_dict(), kind
