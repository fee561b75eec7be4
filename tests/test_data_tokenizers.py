"""Tokenizers: byte round trip and specials; SentencePiece train (function and CLI) and load round trip."""

import pathlib
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from moe_jax import data
from moe_jax.data import tokenizers

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS = [f"the {w} sat on the {v} mat number {i}" for i, (w, v) in
          enumerate(zip(["cat", "dog", "bird", "fox"] * 50, ["red", "blue", "green", "old", "new"] * 40))]


@given(st.text())
def test_byte_round_trip(text):
    tok = tokenizers.ByteTokenizer()
    ids = tok.encode(text)
    assert all(3 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text


def test_sentencepiece_train_load_round_trip_and_pipeline(tmp_path):
    path = tokenizers.train_sentencepiece(CORPUS, vocab_size=60, output=str(tmp_path / "spm"))
    assert path.endswith("spm.model")
    tok = tokenizers.SentencePieceTokenizer(path)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 3) and tok.vocab_size <= 60  # soft limit
    assert tok.decode(tok.encode("the cat sat on the red mat")) == "the cat sat on the red mat"
    (tmp_path / "c.txt").write_text("\n".join(CORPUS))
    cfg = data.default_config()
    cfg.update(source="text", paths=str(tmp_path / "c.txt"), tokenizer=path, seq_len=32, batch_size=2,
               num_shards=1)  # one packed stream: the two rows are 64 consecutive tokens
    batch = next(data.make_train_iterator(cfg, process_index=0, process_count=1))
    assert batch["inputs"].max() < 60 and (batch["inputs"] == tok.eos_id).any()


def test_training_command(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(CORPUS))
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "from moe_jax import data\n"
        "def get_config():\n"
        "    c = data.default_config()\n"
        f"    c.source, c.paths = 'text', {str(tmp_path / 'c.txt')!r}\n"
        "    return c\n")
    result = subprocess.run(
        [sys.executable, "-m", "moe_jax.data.tokenizers", "train", f"--config={cfg_file}", "--vocab_size=50",
         f"--output={tmp_path / 'cli.model'}"], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert tokenizers.SentencePieceTokenizer(str(tmp_path / "cli.model")).vocab_size == 50


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tokenizers.SentencePieceTokenizer(str(tmp_path / "nope.model"))
