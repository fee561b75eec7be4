"""Sources: TFDS through mock_data, JSON-lines plain/gz/glob, text files, and every bad input."""

import gzip
import json

import pytest
import tensorflow_datasets as tfds

from moe_jax import data
from moe_jax.data import sources


def config(**overrides):
    cfg = data.default_config()
    cfg.update(seq_len=16, batch_size=2, num_threads=0, eval_fraction=0.2)
    cfg.update(**overrides)
    return cfg


def train_iterator(cfg, process_index=0, process_count=1):
    return data.make_train_iterator(cfg, process_index=process_index, process_count=process_count)


def c4_lines(texts):
    return "".join(json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": "https://x"}) + "\n"
                   for t in texts)


def all_docs(cfg):
    return sorted(sources.text_dataset(cfg, "train")) + sorted(sources.text_dataset(cfg, "eval"))


def test_jsonl_plain_gz_and_glob_in_c4_format(tmp_path):
    (tmp_path / "c4-train.00000-of-00002.json").write_text(c4_lines(["héllo", "world"]))
    (tmp_path / "c4-train.00001-of-00002.json.gz").write_bytes(gzip.compress(c4_lines(["a b", "c d e"]).encode()))
    cfg = config(source="jsonl", paths=str(tmp_path / "c4-train.*"), seq_len=4)
    assert sorted(all_docs(cfg)) == sorted(["héllo", "world", "a b", "c d e"])
    batch = next(train_iterator(cfg))
    assert batch["inputs"].shape == (2, 4)


def test_jsonl_custom_field_and_comma_separated_paths(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "one"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "two"}) + "\n")
    cfg = config(source="jsonl", paths=f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl", text_field="body")
    assert sorted(all_docs(cfg)) == ["one", "two"]


def test_text_lines_and_paragraphs(tmp_path):
    (tmp_path / "t.txt").write_text("first line\nsecond line\n\nthird\nstill third\n")
    cfg = config(source="text", paths=str(tmp_path / "t.txt"), eval_fraction=0.0)
    assert sorted(all_docs(cfg)) == ["first line", "second line", "still third", "third"]
    cfg.text_document = "paragraph"
    assert sorted(all_docs(cfg)) == ["first line\nsecond line", "third\nstill third"]


def test_tfds_through_mock_data():
    cfg = config(source="tfds", tfds_name="c4/en:3.1.0", batch_size=2)
    with tfds.testing.mock_data(num_examples=20):
        batches = [next(train_iterator(cfg))]
        batches += data.make_eval_batches(cfg, 2, process_index=0, process_count=1)
        texts = list(sources.load_texts(cfg, max_documents=3))
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    for b in batches:
        assert b["inputs"].shape == (2, 16) and (b["segment_ids"] > 0).any()


def test_tfds_unknown_name_and_missing_field():
    with pytest.raises(ValueError, match="no_such_dataset"):
        train_iterator(config(source="tfds", tfds_name="no_such_dataset"))
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(KeyError, match="'body'.*url"):
            train_iterator(config(source="tfds", text_field="body"))


def test_empty_documents_skipped_and_counted_invalid_utf8_replaced_and_counted(tmp_path):
    raw = b'{"text": ""}\n{"text": "   "}\n{"text": "ok"}\n' + b'{"text": "bad \xff byte"}\n' + b'{"text": "fine"}\n'
    (tmp_path / "d.jsonl").write_bytes(raw)
    before = dict(sources.STATS)
    cfg = config(source="jsonl", paths=str(tmp_path / "d.jsonl"), eval_fraction=0.0)
    docs = list(sources.text_dataset(cfg, "train"))
    assert sorted(docs) == ["bad \ufffd byte", "fine", "ok"]
    assert sources.STATS["empty_documents"] - before.get("empty_documents", 0) == 2
    assert sources.STATS["invalid_utf8_documents"] - before.get("invalid_utf8_documents", 0) == 1
    (tmp_path / "t.txt").write_bytes(b"good\n\xfe\xffbad\nalso \xc3 bad\n\n")
    cfg = config(source="text", paths=str(tmp_path / "t.txt"), eval_fraction=0.0)
    before = dict(sources.STATS)
    assert sorted(sources.text_dataset(cfg, "train")) == ["also \ufffd bad", "good", "\ufffd\ufffdbad"]
    assert sources.STATS["invalid_utf8_documents"] - before.get("invalid_utf8_documents", 0) == 2
    assert sources.STATS["empty_documents"] - before.get("empty_documents", 0) == 1


@pytest.mark.parametrize("paths,error,message", [
    ("{tmp}/nothing-*.jsonl", FileNotFoundError, "glob .*nothing-\\*.jsonl.* matches no file"),
    ("{tmp}/missing.jsonl", FileNotFoundError, "no such file .*missing.jsonl"),
    ("", ValueError, "data.paths is empty"),
])
def test_path_errors_name_the_path(tmp_path, paths, error, message):
    with pytest.raises(error, match=message):
        train_iterator(config(source="jsonl", paths=paths.format(tmp=tmp_path)))


def test_missing_jsonl_field_and_bad_json_name_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(KeyError, match="d.jsonl:2: no text field 'text'.*content"):
        train_iterator(config(source="jsonl", paths=str(tmp_path / "d.jsonl")))
    (tmp_path / "e.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="e.jsonl:2: not a JSON object"):
        train_iterator(config(source="jsonl", paths=str(tmp_path / "e.jsonl")))


def test_too_small_for_one_batch_says_how_large(tmp_path):
    (tmp_path / "d.txt").write_text("tiny\nsmall\nwee\n")
    cfg = config(source="text", paths=str(tmp_path / "d.txt"), eval_fraction=0.0, batch_size=8, seq_len=64)
    with pytest.raises(ValueError, match=r"too small for one batch.*3 documents and 15 tokens.*needs 512"):
        train_iterator(cfg)
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        train_iterator(config(source="text", paths=str(tmp_path / "e.txt")))
    (tmp_path / "f.txt").write_text("one\n")
    with pytest.raises(ValueError, match="too small for one batch"):  # not "fewer documents than shards"
        train_iterator(config(source="text", paths=str(tmp_path / "f.txt"), eval_fraction=0.0), process_count=2)


def test_a_held_out_set_smaller_than_the_shard_count_still_evaluates(tmp_path):
    """The C4 sample's 1% held out is 24 documents for 32 shards: every shard still gets documents."""
    (tmp_path / "d.txt").write_text("".join(f"document number {i} with a few words\n" for i in range(200)))
    cfg = config(source="text", paths=str(tmp_path / "d.txt"), eval_fraction=0.02, batch_size=32, seq_len=16)
    batches = data.make_eval_batches(cfg, 2)
    assert len(batches) == 2 and batches[0]["inputs"].shape == (32, 16)
    assert (batches[0]["segment_ids"] > 0).all()  # every row of every shard is filled
