"""`moe_jax.evaluate`: the reported loss and bits per byte equal a direct computation on a tiny trained run;
byte and token counts; `data.eval_paths` in training; clear errors for bad input; the CLI end to end."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_checks import assert_user_error, run_cli
from moe_jax import checkpoint, evaluate, train
from moe_jax.data import tokenizers

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["the router sends each token to one expert", "héllo wörld", "a", "capacity factor 1.25 and top-1 routing",
        "mixture of experts"]


def tiny_config(num_experts, paths, steps=2):
    cfg = train.default_config()
    cfg.model.update(vocab_size=259, d_model=32, d_ff=64, num_layers=2, num_heads=2)
    cfg.model.moe.update(num_experts=num_experts, every=2, group_size=64, dispatcher="index")
    cfg.data.update(source="text", paths=paths, seq_len=64, batch_size=4, eval_fraction=0.2)
    cfg.train.update(steps=steps, log_every=1, eval_every=steps, eval_steps=1, checkpoint_every=steps,
                     warmup_steps=1, peak_flops_per_device=1e9)
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    train_file = directory / "train.txt"
    train_file.write_text("\n".join(f"document {i} about experts and routers" for i in range(60)) + "\n")
    held_out = directory / "held_out.txt"
    held_out.write_text("\n".join(DOCS) + "\n")
    return train_file, held_out


@pytest.fixture(scope="module")
def dense_run(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dense_run")
    train.train(tiny_config(0, str(corpus[0])), str(workdir), devices=jax.devices()[:1])
    return workdir


def direct_nats(model, text_ids, eos_id):
    """Sum of -log p(next token) over one document fed alone (no packing, positions from 0)."""
    tokens = jnp.asarray([text_ids + [eos_id]], jnp.int32)
    logits, _ = model(tokens[:, :-1], deterministic=True)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -float(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1).sum()), tokens.shape[1] - 1


def test_loss_and_bits_per_byte_equal_a_direct_computation(dense_run, corpus):
    run, state, step = checkpoint.restore_run(dense_run, devices=jax.devices()[:1])
    data_config = evaluate.evaluation_data_config(run.config.data, {"data.paths": str(corpus[1])})
    result = evaluate.evaluate_run(run, state, data_config)

    model, config = checkpoint.restore_model(dense_run, devices=jax.devices()[:1])
    tokenizer = tokenizers.make_tokenizer(config.data)
    nats = tokens = 0.0
    for doc in DOCS:  # every document shorter than a row: none is cut, so packing changes nothing
        doc_nats, doc_tokens = direct_nats(model, tokenizer.encode(doc), tokenizer.eos_id)
        nats, tokens = nats + doc_nats, tokens + doc_tokens
    assert step == 2 and result["tokens"] == tokens == sum(len(d.encode()) for d in DOCS)  # byte ids + EOS - 1
    assert result["bytes"] == sum(len(d.encode("utf-8")) for d in DOCS)  # é and ö are two bytes each
    assert result["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / result["bytes"], rel=1e-5)
    assert result["dropped_fraction"] == [] and result["documents"] == len(DOCS)


def test_packing_cuts_long_documents_and_keeps_them_apart():
    rows = list(evaluate.pack_documents([[5, 6, 1], [7, 8, 9, 10, 11, 1], [12, 1]], seq_len=4, pad_id=0))
    assert [r["inputs"].tolist() for r in rows] == [[5, 6, 1, 0], [7, 8, 9, 10], [11, 1, 12, 1]]
    assert [r["segment_ids"].tolist() for r in rows] == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 2, 2]]
    assert [r["loss_weights"].tolist() for r in rows] == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 0]]
    assert rows[2]["positions"].tolist() == [0, 1, 0, 1]


def test_moe_run_reports_dropped_fraction_per_layer_and_eval_paths_in_training(corpus, tmp_path):
    cfg = tiny_config(4, str(corpus[0]))
    cfg.model.num_layers = 4  # two MoE layers
    cfg.data.eval_paths = str(corpus[1])
    last = train.train(cfg, str(tmp_path), devices=jax.devices()[:1])
    assert math.isfinite(last["eval/loss"])
    run, state, _ = checkpoint.restore_run(tmp_path, devices=jax.devices()[:1])
    result = evaluate.evaluate_run(run, state,
                                   evaluate.evaluation_data_config(run.config.data, {"data.paths": str(corpus[1])}))
    assert len(result["dropped_fraction"]) == 2 and all(0 <= d <= 1 for d in result["dropped_fraction"])


def test_cli_writes_the_json_keys(dense_run, corpus, tmp_path):
    output = tmp_path / "out.json"
    done = run_cli("moe_jax.evaluate", [f"--workdir={dense_run}", "--config.data.source=text",
                                        f"--config.data.paths={corpus[1]}", f"--output={output}"], ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert {"loss", "bits_per_byte", "tokens", "bytes", "dropped_fraction"} <= set(result)
    assert "bits/byte" in done.stdout and result["step"] == 2


@pytest.mark.parametrize("args, needles", [
    (["--workdir={tmp}/nope"], ["--workdir=", "no such run directory"]),
    (["--workdir={run}", "--step=7"], ["--step=7", "checkpoints at steps [2]"]),
    (["--workdir={run}", "--config.data.paths={tmp}/missing.txt"], ["data.paths: no such file"]),
    (["--workdir={run}", "--config.data.source=synthetic"], ["synthetic' has no text"]),
    (["--workdir={run}", "--config.model.d_model=3"], ["unknown config key model"]),
    (["--workdir={run}", "--config.data.tokenizer=x.model"], ["data.tokenizer cannot be overridden"]),
])
def test_bad_input_is_one_error_line(dense_run, tmp_path, args, needles):
    args = [a.format(tmp=tmp_path, run=dense_run) for a in args]
    assert_user_error(run_cli("moe_jax.evaluate", args, ROOT), *needles)
