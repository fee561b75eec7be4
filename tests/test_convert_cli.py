"""`python -m moe_jax.convert` as a user runs it: an HF checkpoint becomes a run directory that reproduces HF's
logits, fine-tunes with `moe_jax.main` (falling loss, exact resume), and exports back to a directory HF loads
with our logits; mistakes are one `error:` line."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from cli_checks import assert_user_error, run_cli
from moe_jax import checkpoint

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
VOCAB = 1031  # >= the synthetic corpus's 1024 ids the converted run's default data has; not a multiple of 8


def make_hf(directory):
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=3, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, initializer_range=0.2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(directory)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def our_logits(workdir, ids, step=None):
    model, _ = checkpoint.restore_model(workdir, step, devices=jax.devices()[:1])
    return np.asarray(model(jnp.asarray(ids), deterministic=True)[0])


def fine_tune(workdir, steps):
    """The run's own config (data and fine-tuning settings given to the converter) and the step count."""
    return run_cli("moe_jax.main", [f"--config=moe_jax/convert/run_config.py:{workdir}", f"--workdir={workdir}",
                                    f"--config.train.steps={steps}"], cwd=ROOT, timeout=600)


def losses(workdir):
    by_step = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            by_step[record["step"]] = record["train/loss"]
    return by_step


def test_convert_fine_tune_resume_and_export(tmp_path):
    reference = make_hf(tmp_path / "hf")
    ids = np.random.RandomState(0).randint(0, VOCAB, (4, 32))  # routing groups of the run's 2 x 32 tokens
    run = tmp_path / "run"
    text = tmp_path / "train.txt"
    words = "the router sends each token to the experts it prefers and adds what they return".split()
    rng = np.random.RandomState(1)
    text.write_text("\n".join(" ".join(rng.choice(words, 24)) for _ in range(300)))

    result = run_cli("moe_jax.convert", [
        f"--from_hf={tmp_path / 'hf'}", f"--workdir={run}", "--config.data.source=text", f"--config.data.paths={text}",
        "--config.data.batch_size=2", "--config.data.seq_len=32", "--config.train.learning_rate=3e-3",
        "--config.train.warmup_steps=1", "--config.train.log_every=1", "--config.train.eval_every=100",
        "--config.train.checkpoint_every=2", "--config.train.eval_steps=1"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint step 0" in result.stdout and "moe_jax/convert/run_config.py" in result.stdout
    assert float(np.abs(our_logits(run, ids) - hf_logits(reference, ids)).max()) <= 1e-4

    result = fine_tune(run, steps=4)
    assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted = losses(run)
    assert sorted(uninterrupted) == [1, 2, 3, 4]
    assert uninterrupted[4] < uninterrupted[1], uninterrupted

    # As if killed after the step-2 checkpoint: the same command again gives steps 3 and 4 exactly.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(run, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "4")
    result = fine_tune(interrupted, steps=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 2" in result.stderr, result.stderr[-2000:]
    assert losses(interrupted) == uninterrupted

    result = run_cli("moe_jax.evaluate", [f"--workdir={run}", "--config.data.source=text",
                                          f"--config.data.paths={text}"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 4 on text" in result.stdout and "bits/byte" in result.stdout

    out = tmp_path / "exported"
    result = run_cli("moe_jax.convert", [f"--to_hf={out}", f"--workdir={run}", "--step=4"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    tuned = our_logits(run, ids, step=4)
    assert float(np.abs(hf_logits(exported, ids) - tuned).max()) <= 1e-4
    assert float(np.abs(tuned - hf_logits(reference, ids)).max()) > 1e-3  # the export is the fine-tuned model


def test_cli_mistakes_are_one_error_line(tmp_path):
    result = run_cli("moe_jax.convert", [f"--workdir={tmp_path / 'run'}"], cwd=ROOT)
    assert_user_error(result, "exactly one of --from_hf=DIR", "--to_hf=DIR", not_created=[tmp_path / "run"])
    result = run_cli("moe_jax.convert", [f"--from_hf={tmp_path}", f"--workdir={tmp_path / 'run'}",
                                         "--config.model.d_model=64"], cwd=ROOT)
    assert_user_error(result, "--config.model.d_model: only data.*, train.* and mesh.* can be set",
                      not_created=[tmp_path / "run"])


def test_a_switch_transformer_converts_fine_tunes_with_span_corruption_and_exports(tmp_path):
    """SwitchTransformersForConditionalGeneration -> an encoder-decoder run (its relative-attention settings
    kept through config.json) -> two span-corruption steps on text -> an HF directory with the tuned logits."""
    config = transformers.SwitchTransformersConfig(
        vocab_size=400, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=2,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=20)  # 400 ids: the byte tokenizer's 259 and 100 sentinels fit
    torch.manual_seed(0)
    reference = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    text = tmp_path / "train.txt"
    text.write_text("\n".join(["the router sends each token to the expert it prefers"] * 200))
    run = tmp_path / "run"
    result = run_cli("moe_jax.convert", [
        f"--from_hf={tmp_path / 'hf'}", f"--workdir={run}", "--config.data.source=text", f"--config.data.paths={text}",
        "--config.data.batch_size=2", "--config.data.seq_len=64", "--config.train.learning_rate=3e-3",
        "--config.train.warmup_steps=1", "--config.train.log_every=1", "--config.train.eval_every=100",
        "--config.train.eval_steps=1"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    result = fine_tune(run, steps=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(run)) == [1, 2]
    assert json.loads((run / "config.json").read_text())["model"]["relative_attention_num_buckets"] == 8

    out = tmp_path / "exported"
    result = run_cli("moe_jax.convert", [f"--to_hf={out}", f"--workdir={run}"], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    rng = np.random.RandomState(0)
    # the run's routing groups: 2 x 64 encoder tokens, 2 x 14 decoder tokens (the targets of 64 inputs)
    encoder_BL, decoder_BL = rng.randint(0, 400, (2, 64)), rng.randint(0, 400, (2, 14))
    model, _ = checkpoint.restore_model(run, devices=jax.devices()[:1])
    tuned = np.asarray(model(jnp.asarray(encoder_BL), jnp.asarray(decoder_BL), deterministic=True)[0])
    with torch.no_grad():
        hf_tuned, hf_start = (m(input_ids=torch.tensor(encoder_BL), decoder_input_ids=torch.tensor(decoder_BL))
                              .logits.numpy() for m in (exported, reference))
    assert float(np.abs(hf_tuned - tuned).max()) <= 1e-4
    assert float(np.abs(hf_tuned - hf_start).max()) > 1e-3  # the export is the fine-tuned model
