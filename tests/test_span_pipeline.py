"""The span-corruption pipeline and the encoder-decoder in the trainer: batches that reconstruct the documents,
examples packed apart, exact resume of the iterator from disk, every source, 8 devices = 1 device, the dry
run's step is the trainer's, and clear errors."""

import json
import pathlib

import jax
import numpy as np
import pytest

from experiments import t5_tiny_switch
from moe_jax import data, dryrun, models, sharding, train
from moe_jax.checkpoint import Checkpointer
from moe_jax.data import pipeline, span_corruption, tokenizers

TEXT = ("the router sends each token to one expert . capacity is per group and tokens past it are dropped . "
        "span corruption replaces spans with sentinels and the decoder writes them back .").split(" . ")


def text_config(tmp_path, *, seq_len=24, batch_size=4, documents=60):
    cfg = t5_tiny_switch.get_config()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.permutation(TEXT[i % 3].split())[: 3 + i % 11]) for i in range(documents)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    cfg.data.update(source="text", paths=str(path), tokenizer="byte", seq_len=seq_len, batch_size=batch_size,
                    eval_fraction=0.1)
    cfg.model.vocab_size = 259 + 100
    return cfg, lines


def tiny_model(cfg, **moe):
    cfg.model.update(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=2, num_decoder_layers=2)
    cfg.model.moe.update(num_experts=4, dispatcher="index", **moe)
    return cfg


def examples_of(batch):
    """Each packed example of a batch: (encoder tokens, decoder targets, decoder inputs)."""
    out = []
    for row in range(batch["encoder_inputs"].shape[0]):
        enc_seg, dec_seg = batch["encoder_segment_ids"][row], batch["decoder_segment_ids"][row]
        assert sorted(set(enc_seg[enc_seg > 0])) == sorted(set(dec_seg[dec_seg > 0]))  # one id, both parts
        for segment in sorted(set(enc_seg[enc_seg > 0])):
            enc, dec = enc_seg == segment, dec_seg == segment
            np.testing.assert_array_equal(batch["encoder_positions"][row][enc], np.arange(enc.sum()))
            np.testing.assert_array_equal(batch["decoder_positions"][row][dec], np.arange(dec.sum()))
            out.append((batch["encoder_inputs"][row][enc], batch["decoder_targets"][row][dec],
                        batch["decoder_inputs"][row][dec]))
        assert not batch["decoder_loss_weights"][row][dec_seg == 0].any()
        assert batch["decoder_loss_weights"][row][dec_seg > 0].all()
    return out


def uncorrupt(inputs, targets, vocab_size, eos_id):
    """inputs + targets (each ending in EOS) -> the original piece."""
    assert inputs[-1] == eos_id and targets[-1] == eos_id
    spans, current = {}, None
    for t in targets[:-1]:
        if t >= vocab_size:
            current = int(t)
            spans[current] = []
        else:
            spans[current].append(int(t))
    out = []
    for t in inputs[:-1]:
        out += spans[int(t)] if t >= vocab_size else [int(t)]
    return out


def test_batches_reconstruct_the_documents_in_order_with_examples_apart(tmp_path):
    cfg, _ = text_config(tmp_path)
    cfg.data.num_shards = 1  # one stream: the examples follow the shuffled training documents in order
    tok = tokenizers.make_tokenizer(cfg.data)
    raw, enc_len, dec_len = span_corruption.lengths(cfg.data)
    spec = models.get(cfg).abstract_batch(cfg.data.batch_size, cfg.data.seq_len, data_config=cfg.data)
    it = data.make_train_iterator(cfg.data, batch_format="span_corruption")
    pieces = []
    for _ in range(6):
        batch = next(it)
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s.shape, s.dtype) for k, s in spec.items()}
        for inputs, targets, decoder_inputs in examples_of(batch):
            assert len(inputs) <= enc_len and len(targets) <= dec_len
            np.testing.assert_array_equal(decoder_inputs, np.concatenate([[tok.pad_id], targets[:-1]]))
            sentinels = [t for t in inputs if t >= tok.vocab_size]
            assert sentinels == list(span_corruption.sentinels(tok.vocab_size, 100)[:len(sentinels)])
            pieces.append(uncorrupt(inputs, targets, tok.vocab_size, tok.eos_id))
    # First-fit packing puts each piece in the first of 8 rows with room, so rows reorder the pieces within a
    # round of 8 rows (2 batches here); the 6 batches hold exactly the first pieces of the shuffled documents.
    shuffled = pipeline.sources.text_dataset(cfg.data, "train").shuffle(seed=cfg.data.seed)
    expected = []
    for i in range(len(shuffled)):
        tokens = tok.encode(shuffled[i])
        expected += [tokens[j:j + raw] for j in range(0, len(tokens), raw)]
    assert len(pieces) > 20
    assert sorted(map(tuple, pieces)) == sorted(map(tuple, expected[:len(pieces)]))


@pytest.mark.parametrize("source", ["synthetic", "text"])
def test_iterator_restored_from_disk_gives_the_batches_that_were_due(tmp_path, source):
    cfg, _ = text_config(tmp_path)
    if source == "synthetic":
        cfg = t5_tiny_switch.get_config()
        cfg.data.update(seq_len=24, batch_size=4, synthetic=dict(cfg.data.synthetic, mean_length=12.0))
    for position in (1, 3, 4):
        it = data.make_train_iterator(cfg.data, batch_format="span_corruption")
        for _ in range(position):
            next(it)
        checkpointer = Checkpointer(tmp_path / f"{source}{position}", max_to_keep=1)
        checkpointer.save(position, {"x": np.zeros(2)}, it)
        checkpointer.close()
        due = [next(it) for _ in range(4)]
        fresh = data.make_train_iterator(cfg.data, batch_format="span_corruption")
        Checkpointer(tmp_path / f"{source}{position}").restore_latest({"x": np.zeros(2)}, fresh)
        for expected in due:
            got = next(fresh)
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{source} at {position}: {key}")


def test_eval_batches_are_fixed_whatever_the_data_seed():
    """The synthetic held-out stream does not depend on data.seed; nor do its noise masks."""
    cfg = t5_tiny_switch.get_config()
    cfg.data.update(seq_len=24, batch_size=4)
    first = data.make_eval_batches(cfg.data, 2, batch_format="span_corruption")
    cfg.data.seed = 5
    again = data.make_eval_batches(cfg.data, 2, batch_format="span_corruption")
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_encdec_on_8_devices_matches_one_device(tmp_path, eight_devices):
    """data=2, expert=4, both stacks with MoE layers: the same losses as one device, to 1e-4 relative."""
    def config(mesh):
        # one row per routing group in both stacks, so that 1 and 8 devices route the same groups
        cfg = tiny_model(t5_tiny_switch.get_config(), group_size=24, decoder_group_size=6)
        cfg.data.update(seq_len=24, batch_size=8)
        cfg.train.update(steps=4, log_every=1, eval_every=100, eval_steps=1, checkpoint_every=100)
        cfg.mesh.shape = mesh
        return cfg

    train.train(config((1, 1, 1)), str(tmp_path / "one"), devices=eight_devices[:1])
    eight = config((2, 4, 1))
    train.train(eight, str(tmp_path / "eight"), devices=eight_devices)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "eight")}
    loss = {name: [r["train/loss"] for r in rows[name] if "train/loss" in r] for name in rows}
    assert len(loss["one"]) == 4
    np.testing.assert_allclose(loss["eight"], loss["one"], rtol=1e-4)
    logged = json.loads((tmp_path / "eight" / "config.json").read_text())
    assert span_corruption.lengths(eight.data) == (26, 24, 6)  # raw piece, encoder row, decoder row
    assert logged["model"]["moe"]["group_size"] == 24 and logged["model"]["moe"]["decoder_group_size"] == 6
    assert all("train/neg_log_perplexity" in r for r in rows["eight"] if "train/loss" in r)
    assert not any("eval/gap_to_floor" in r for r in rows["eight"])


def test_dry_run_compiles_the_trainers_own_encdec_step(eight_devices):
    cfg = tiny_model(t5_tiny_switch.get_config(), group_size=96)
    cfg.data.update(seq_len=24, batch_size=8)
    cfg.mesh.shape = (2, 4, 1)
    run, traced = dryrun.trace_steps(cfg, eight_devices)
    with jax.set_mesh(run.mesh):
        dry = {name: t.lower().as_text() for name, (t, _) in traced.items()}
    trainer = train.setup(cfg, eight_devices)
    state = trainer.init_state()
    batch = sharding.shard_batch(next(data.make_train_iterator(cfg.data, process_index=0, process_count=1,
                                                               batch_format="span_corruption")), trainer.mesh)
    with jax.set_mesh(trainer.mesh):
        real = dict(train_step=trainer.train_step.lower(state, batch).as_text(),
                    eval_step=trainer.eval_step.lower(state, batch).as_text())
    assert dry == real


@pytest.mark.parametrize("overrides, message", [
    ({"model.vocab_size": 1024}, r"model.vocab_size=1024 must hold the tokenizer's 1024 ids and "
                                 r"data.span_corruption.num_sentinels=100 sentinel ids after them: set "
                                 r"model.vocab_size >= 1124"),
    ({"data.span_corruption.num_sentinels": 3}, r"num_sentinels=3: a piece of 141 tokens has up to 7 noise spans"),
    ({"data.span_corruption.noise_density": 1.5}, r"data.span_corruption.noise_density=1.5 must be in \(0, 1\)"),
])
def test_bad_span_corruption_settings_name_the_key(overrides, message):
    cfg = t5_tiny_switch.get_config()
    for key, value in overrides.items():
        section = cfg
        *path, last = key.split(".")
        for part in path:
            section = section[part]
        section[last] = value
    with pytest.raises(ValueError, match=message):
        train.setup(cfg, jax.devices()[:1])


def test_model_name_encdec_on_a_decoder_config_gets_the_encdec_keys():
    from experiments import tiny_switch

    cfg = tiny_switch.get_config()
    cfg.model.name = "encdec"
    cfg.model.vocab_size = 1124
    resolved = train.setup(cfg, jax.devices()[:1]).config
    assert resolved.model.num_encoder_layers == 2 and resolved.model.relative_attention_num_buckets == 32
    assert resolved.model.d_model == 128  # what the decoder config set stays


@pytest.mark.parametrize("module, args", [("moe_jax.evaluate", ["--config.data.source=text"]),
                                          ("moe_jax.sample", ["--prompt=t5"]),
                                          ("moe_jax.analyze", ["--output=out"])])
def test_lm_commands_on_an_encdec_run_say_what_they_need(tmp_path, module, args):
    from cli_checks import assert_user_error, run_cli

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(models.with_family_defaults(t5_tiny_switch.get_config())
                                                  .to_json_best_effort())
    result = run_cli(module, [f"--workdir={tmp_path / 'run'}", *args], cwd=pathlib.Path(__file__).parents[1])
    assert_user_error(result, f"{module} works on decoder-only language models", "model.name='encdec'",
                      "eval/neg_log_perplexity")
