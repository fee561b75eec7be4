"""Distillation (`moe_jax.distill`): the loss is alpha * CE(teacher probabilities) + (1 - alpha) * CE(ground truth)
against a NumPy computation on a tiny case; alpha=0 is the plain loss; a dense student trains against a Switch
teacher through `moe_jax.main` on two devices, initialised from the teacher's non-expert weights; clear errors."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cli_checks import assert_user_error, cpu_env, run_cli
from tiny_runs import tiny, tiny_encdec
from moe_jax import checkpoint, distill, models, train, upcycle

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.num_layers=2",
         "--config.model.num_heads=2", "--config.data.seq_len=32", "--config.data.batch_size=4",
         "--config.train.eval_steps=1", "--config.train.log_every=1", "--config.train.warmup_steps=1",
         "--config.train.peak_flops_per_device=1e9"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher")
    train.train(tiny(4, steps=2), str(workdir), devices=jax.devices()[:1])
    return workdir


def numpy_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_soft_cross_entropy_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5))
    probs = np.exp(numpy_log_softmax(rng.normal(size=(2, 3, 5))))
    weights = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    want = (-(probs * numpy_log_softmax(logits)).sum(-1) * weights).sum() / weights.sum()
    got = distill.soft_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(probs, jnp.float32),
                                     jnp.asarray(weights))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_distillation_loss_is_the_mixture_of_teacher_and_ground_truth():
    student_cfg, teacher_cfg = tiny(0, steps=2).model, tiny(4, steps=2).model
    family = models.get(student_cfg)
    student = family.create(student_cfg, nnx.Rngs(params=0, dropout=1))
    teacher = family.create(teacher_cfg, nnx.Rngs(params=1, dropout=2))
    teacher.eval()
    rng = np.random.default_rng(0)
    batch = dict(inputs=jnp.asarray(rng.integers(0, 1024, (4, 32)), jnp.int32),
                 targets=jnp.asarray(rng.integers(0, 1024, (4, 32)), jnp.int32),
                 loss_weights=jnp.asarray(rng.integers(0, 2, (4, 32)), jnp.float32))
    weights = dict(aux_loss_weight=1e-2, z_loss_weight=0.0)
    for alpha in (0.0, 0.25, 1.0):
        loss, metrics = distill.distillation_loss(family, student, teacher, batch, alpha=alpha, **weights)
        student_logits, _ = student(batch["inputs"], deterministic=False)
        teacher_logits, _ = teacher(batch["inputs"], deterministic=True)
        log_q, p = numpy_log_softmax(student_logits), np.exp(numpy_log_softmax(teacher_logits))
        w = np.asarray(batch["loss_weights"], np.float64)
        soft = (-(p * log_q).sum(-1) * w).sum() / w.sum()
        hard = (-np.take_along_axis(log_q, np.asarray(batch["targets"])[..., None], -1)[..., 0] * w).sum() / w.sum()
        np.testing.assert_allclose(float(loss), alpha * soft + (1 - alpha) * hard, rtol=2e-5)
        np.testing.assert_allclose(float(metrics["distill_ce"]), soft, rtol=2e-5)
        np.testing.assert_allclose(float(metrics["ce"]), hard, rtol=2e-5)
    plain, _ = family.loss_fn(student, batch, deterministic=False, **weights)
    at_zero, _ = distill.distillation_loss(family, student, teacher, batch, alpha=0.0, **weights)
    assert float(at_zero) == float(plain)


def test_encoder_decoder_distillation_loss_is_the_mixture_on_span_corruption():
    """A dense encoder-decoder student of a Switch encoder-decoder teacher: the soft targets are the teacher's
    decoder distributions, weighted by `decoder_loss_weights`."""
    from moe_jax import data

    student_cfg, teacher_cfg = tiny_encdec(0), tiny_encdec(4)
    family = models.get(student_cfg)
    student = family.create(student_cfg.model, nnx.Rngs(params=0, dropout=1))
    teacher = family.create(teacher_cfg.model, nnx.Rngs(params=1, dropout=2))
    batch, = data.make_eval_batches(student_cfg.data, 1, batch_format=family.batch_format)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    call = lambda model, deterministic: model(
        batch["encoder_inputs"], batch["decoder_inputs"], encoder_segment_ids=batch["encoder_segment_ids"],
        decoder_segment_ids=batch["decoder_segment_ids"], encoder_positions=batch["encoder_positions"],
        decoder_positions=batch["decoder_positions"], deterministic=deterministic)[0]
    log_q, p = numpy_log_softmax(call(student, False)), np.exp(numpy_log_softmax(call(teacher, True)))
    w = np.asarray(batch["decoder_loss_weights"], np.float64)
    assert 0 < w.sum() < w.size  # padding in the decoder rows is left out
    soft = (-(p * log_q).sum(-1) * w).sum() / w.sum()
    hard = (-np.take_along_axis(log_q, np.asarray(batch["decoder_targets"])[..., None], -1)[..., 0] * w).sum() / w.sum()
    loss, metrics = distill.distillation_loss(family, student, teacher, batch, alpha=0.25, aux_loss_weight=0.0,
                                              z_loss_weight=0.0)
    np.testing.assert_allclose(float(loss), 0.25 * soft + 0.75 * hard, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["distill_ce"]), soft, rtol=2e-5)


def test_cli_dense_student_of_a_switch_teacher_on_two_devices(teacher_run, tmp_path):
    out = tmp_path / "student"
    env_flags = [f"--config.distill.teacher_workdir={teacher_run}", "--config.distill.alpha=0.25",
                 "--config.distill.init_from_teacher=True", "--config.train.steps=2", "--config.train.eval_every=2",
                 "--config.mesh.shape=(2,1,1)"]
    import subprocess
    import sys

    env = cpu_env(devices=2)
    result = subprocess.run([sys.executable, "-m", "moe_jax.main", "--config=experiments/tiny_dense.py", *SMALL,
                             *env_flags, f"--workdir={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"distilling from {teacher_run} at step 2 with alpha=0.25" in result.stdout
    assert "non-expert weights initialised from the teacher" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "train/distill_ce" in r]
    assert logged and all(np.isfinite(r["train/distill_ce"]) and np.isfinite(r["train/teacher_ce"]) for r in logged)
    assert json.loads((out / "config.json").read_text())["distill"]["alpha"] == 0.25
    # The distilled run is an ordinary dense run to every other tool.
    model, cfg = checkpoint.restore_model(out, devices=jax.devices()[:1])
    assert cfg.model.moe.num_experts == 0


def test_init_from_teacher_copies_the_non_expert_weights(teacher_run):
    cfg = tiny(0, steps=2)
    cfg.distill.update(teacher_workdir=str(teacher_run), init_from_teacher=True)
    run = train.setup(cfg, jax.devices()[:1])
    teacher = distill.load_teacher(run)
    _, state = distill.attach(run, teacher, run.init_state(), fresh=True)
    student, _ = nnx.merge(run.graphdef, state)
    teacher_params = upcycle.layer_params(nnx.merge(teacher.graphdef, teacher.state))
    student_params = upcycle.layer_params(student)
    for key in [("embedding",), ("layer", 0, "ffn", "wi"), ("layer", 1, "attention", "query"), ("final_norm", "scale")]:
        np.testing.assert_array_equal(np.asarray(student_params[key].value), np.asarray(teacher_params[key].value))
    # Layer 1's FFN is the teacher's MoE layer: the dense student keeps its own.
    assert not np.array_equal(np.asarray(student_params[("layer", 1, "ffn", "wi")].value),
                              np.asarray(teacher_params[("layer", 1, "ffn", "wi")].value[0]))


def test_bad_distill_settings_are_named(teacher_run, tmp_path):
    cfg = tiny(0, steps=2)
    cfg.distill.teacher_workdir = str(tmp_path / "no_such_run")
    with pytest.raises(FileNotFoundError, match="distill.teacher_workdir"):
        train.train(cfg, str(tmp_path / "student"), devices=jax.devices()[:1])
    assert not (tmp_path / "student").exists()
    wide = tiny(0, steps=2)
    wide.model.vocab_size = 2048
    wide.distill.teacher_workdir = str(teacher_run)
    with pytest.raises(ValueError, match="vocab_size"):
        train.train(wide, str(tmp_path / "student"), devices=jax.devices()[:1])
    result = run_cli("moe_jax.main", ["--config=experiments/tiny_dense.py", "--config.distill.alpha=2",
                                      f"--config.distill.teacher_workdir={teacher_run}",
                                      f"--workdir={tmp_path / 'bad'}"], ROOT)
    assert_user_error(result, "distill.alpha=2", not_created=[tmp_path / "bad"])
