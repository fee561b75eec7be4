"""The pipeline: determinism, disjoint shards covering the data, exact resume, eval stream, config errors."""

import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax import data


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "url": "u", "timestamp": "t"}) + "\n" for t in texts))
    return str(path)


def file_config(tmp_path, n=60, **overrides):
    cfg = data.default_config()
    texts = [f"doc {i} " + "abc" * (i % 7) for i in range(n)]
    cfg.update(source="jsonl", paths=write_jsonl(tmp_path / "d.jsonl", texts), seq_len=16, batch_size=4,
               eval_fraction=0.1, num_threads=0)
    cfg.update(**overrides)
    return cfg, texts


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("source", ["synthetic", "jsonl"])
def test_same_seed_same_batches_other_seed_other_batches(tmp_path, source):
    cfg = file_config(tmp_path)[0] if source == "jsonl" else data.default_config()
    cfg.update(seq_len=16, batch_size=4)
    first = take(data.make_train_iterator(cfg, process_index=0, process_count=1), 5)
    assert_same(first, take(data.make_train_iterator(cfg, process_index=0, process_count=1), 5))
    for b in first:
        assert b["inputs"].shape == (4, 16) and b["inputs"].dtype == np.int32
        assert b["loss_weights"].dtype == np.float32
    if source == "jsonl":
        cfg.seed = 1
        other = take(data.make_train_iterator(cfg, process_index=0, process_count=1), 5)
        assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))


def decoded_documents(batches, tokenizer):
    """Documents reassembled from packed rows. With the default data.num_shards (one per row) row r of every
    batch continues row r of the previous batch, and a split document continues there."""
    docs = []
    for row in range(batches[0]["inputs"].shape[0]):
        stream = np.concatenate([b["inputs"][row][b["segment_ids"][row] > 0] for b in batches])
        current = []
        for t in stream:
            if t == tokenizer.eos_id:
                docs.append(tokenizer.decode(current))
                current = []
            else:
                current.append(t)
    return docs


def test_hosts_read_disjoint_shards_that_cover_the_data(tmp_path):
    cfg, texts = file_config(tmp_path, n=64, eval_fraction=0.0, batch_size=2)
    tok = data.make_tokenizer(cfg)
    seen = []
    for host in range(2):
        it = data.make_train_iterator(cfg, process_index=host, process_count=2)
        # one epoch of this shard: 32 docs of < 30 tokens fit in 60 rows of 16 (one row per batch per host)
        docs = decoded_documents(take(it, 60), tok)
        epoch = docs[:32]
        assert len(set(epoch)) == 32
        seen.append(set(epoch))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(texts)


def test_synthetic_hosts_differ_and_local_batch_is_a_share():
    cfg = data.default_config()
    cfg.update(seq_len=16, batch_size=4)
    a = next(data.make_train_iterator(cfg, process_index=0, process_count=2))
    b = next(data.make_train_iterator(cfg, process_index=1, process_count=2))
    assert a["inputs"].shape == (2, 16)
    assert not np.array_equal(a["inputs"], b["inputs"])


@pytest.mark.parametrize("source, num_shards", [("synthetic", 0), ("jsonl", 0), ("jsonl", 4)])
def test_global_batch_does_not_depend_on_the_process_count(tmp_path, source, num_shards):
    """Processes' rows, concatenated in process order, are the one-process batch, batch after batch."""
    cfg = file_config(tmp_path, n=200)[0] if source == "jsonl" else data.default_config()
    cfg.update(seq_len=16, batch_size=8, num_shards=num_shards)
    one = take(data.make_train_iterator(cfg, process_index=0, process_count=1), 6)
    for count in (2, 4):
        parts = [take(data.make_train_iterator(cfg, process_index=p, process_count=count), 6) for p in range(count)]
        joined = [{k: np.concatenate([part[i][k] for part in parts]) for k in one[i]} for i in range(6)]
        assert_same(joined, one)
    evals = [data.make_eval_batches(cfg, 2, process_index=p, process_count=2) for p in range(2)]
    assert_same([{k: np.concatenate([e[i][k] for e in evals]) for k in evals[0][i]} for i in range(2)],
                data.make_eval_batches(cfg, 2, process_index=0, process_count=1))
    with pytest.raises(ValueError, match="num_shards=3.*must divide data.batch_size=8"):
        cfg.num_shards = 3
        data.make_train_iterator(cfg, process_index=0, process_count=1)


@pytest.mark.parametrize("source", ["synthetic", "jsonl"])
def test_resume_gives_exactly_the_next_batch(tmp_path, source):
    cfg = file_config(tmp_path)[0] if source == "jsonl" else data.default_config()
    cfg.update(seq_len=16, batch_size=4)
    it = data.make_train_iterator(cfg, process_index=0, process_count=1)
    take(it, 7)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 20)  # crosses an epoch boundary for the jsonl case

    fresh = data.make_train_iterator(cfg, process_index=0, process_count=1)
    manager.restore(7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same(take(fresh, 20), expected)
    # get_state / set_state works without orbax as well
    again = data.make_train_iterator(cfg, process_index=0, process_count=1)
    again.set_state(fresh.get_state())
    assert_same(take(again, 3), take(fresh, 3))


def test_eval_is_fixed_held_out_and_exactly_num_batches(tmp_path):
    cfg, texts = file_config(tmp_path, n=300)
    tok = data.make_tokenizer(cfg)
    first = data.make_eval_batches(cfg, 3, process_index=0, process_count=1)
    cfg.seed = cfg.seed  # same config, second call
    assert_same(first, data.make_eval_batches(cfg, 3, process_index=0, process_count=1))
    many = data.make_eval_batches(cfg, 50, process_index=0, process_count=1)
    assert len(many) == 50  # repeats the held-out pass to give exactly what was asked
    held_out = set(decoded_documents(first, tok))
    train_docs = set(decoded_documents(take(data.make_train_iterator(cfg, process_index=0, process_count=1), 40), tok))
    assert held_out and not held_out & train_docs and held_out <= set(texts)
    syn = data.default_config()
    syn.update(seq_len=16, batch_size=2)
    assert_same(data.make_eval_batches(syn, 2), data.make_eval_batches(syn, 2))
    train_first = next(data.make_train_iterator(syn, process_index=0, process_count=1))
    assert not np.array_equal(train_first["inputs"], data.make_eval_batches(syn, 1)[0]["inputs"])


def test_config_errors(tmp_path):
    cfg = data.default_config()
    cfg.source = "csv"
    with pytest.raises(ValueError, match="synthetic, tfds, jsonl, text"):
        data.make_train_iterator(cfg, process_index=0, process_count=1)
    cfg = data.default_config()
    cfg.batch_size = 3
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        data.make_train_iterator(cfg, process_index=0, process_count=2)
    cfg.tokenizer = "words"
    cfg.source = "text"
    with pytest.raises(ValueError, match="'byte' or a SentencePiece"):
        data.make_tokenizer(cfg)


def test_worker_processes_give_the_same_batches_and_resume():
    cfg = data.default_config()
    cfg.update(seq_len=16, batch_size=2)
    expected = take(data.make_train_iterator(cfg, process_index=0, process_count=1), 4)
    cfg.num_workers = 1
    it = data.make_train_iterator(cfg, process_index=0, process_count=1)
    assert_same(take(it, 2), expected[:2])
    state = it.get_state()
    resumed = data.make_train_iterator(cfg, process_index=0, process_count=1)
    resumed.set_state(state)
    assert_same(take(resumed, 2), expected[2:])
    it.close()
    resumed.close()


def test_readme_data_snippet_runs(capsys):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("<!-- data:start -->"):readme.index("<!-- data:end -->")]
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "make_train_iterator" in b)
    exec(compile(snippet, "README data snippet", "exec"), {})
    vocab, floor = capsys.readouterr().out.split()
    assert int(vocab) == 1024 and float(floor) == pytest.approx(data.entropy_floor(data.default_config()))
