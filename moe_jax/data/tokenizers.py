"""Tokenizers: `byte` (UTF-8 bytes + pad/eos/bos) and SentencePiece, one interface, plus a training command.

Every tokenizer has `vocab_size`, `pad_id`, `eos_id`, `bos_id` (None when the model has none), `encode(str) ->
list[int]` and `decode(ids) -> str`. Train a SentencePiece model from any configured source:

    python -m moe_jax.data.tokenizers train --config=experiments/tiny_dense.py --vocab_size=8000 --output=spm

writes `spm.model` (ids: pad 0, eos 1, unk 2, bos 3, as T5 plus a bos). `--config.data.source=jsonl` etc. work.
"""

from __future__ import annotations

import io
from typing import Sequence

from etils import epath


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: ids 0 pad, 1 eos, 2 bos, 3..258 the bytes 0..255."""

    vocab_size = 259
    pad_id, eos_id, bos_id = 0, 1, 2
    _offset = 3

    def encode(self, text: str) -> list[int]:
        return [b + self._offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self._offset for i in ids if int(i) >= self._offset)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece `.model` file (local or any etils.epath path, e.g. gs://)."""

    def __init__(self, path: str):
        import sentencepiece as spm

        model_path = epath.Path(path)
        if not model_path.exists():
            raise FileNotFoundError(f"data.tokenizer={path!r}: no such SentencePiece model file")
        self.path = str(path)
        self._sp = spm.SentencePieceProcessor(model_proto=model_path.read_bytes())
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"SentencePiece model {path!r} has no EOS id; documents need one to be packed")
        self.pad_id = max(self._sp.pad_id(), 0)  # T5's model has pad 0; a model without pad pads with 0 too
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self):  # grain may pickle map functions into worker processes
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def make_tokenizer(config):
    """The tokenizer `config` (the `data` ConfigDict) names; the synthetic source's own token space for it."""
    if config.source == "synthetic":
        from moe_jax.data import synthetic

        return synthetic.SyntheticTokenizer(synthetic.SyntheticCorpus.from_config(config))
    if config.tokenizer == "byte":
        return ByteTokenizer()
    if str(config.tokenizer).endswith(".model"):
        return SentencePieceTokenizer(config.tokenizer)
    raise ValueError(f"data.tokenizer={config.tokenizer!r}: use 'byte' or a SentencePiece '<path>.model' file")


def train_sentencepiece(texts, *, vocab_size: int, output: str, model_type: str = "unigram",
                        character_coverage: float = 0.9995, max_sentence_length: int = 65536) -> str:
    """Train a SentencePiece model on an iterable of documents; returns the `.model` path."""
    import sentencepiece as spm

    prefix = output[:-len(".model")] if output.endswith(".model") else output
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, pad_id=0, eos_id=1, unk_id=2, bos_id=3,
        max_sentence_length=max_sentence_length, hard_vocab_limit=False, minloglevel=2)
    path = epath.Path(prefix + ".model")
    path.write_bytes(model.getvalue())
    return str(path)


def _main(argv):
    from absl import flags

    args = flags.FLAGS
    if len(argv) != 2 or argv[1] != "train":
        raise SystemExit("usage: python -m moe_jax.data.tokenizers train --config=FILE --vocab_size=N --output=PATH")
    from moe_jax.data import sources

    cfg = args.config
    data_cfg = cfg.data if "data" in cfg else cfg
    texts = sources.load_texts(data_cfg, split="train", max_documents=args.max_documents)
    path = train_sentencepiece(texts, vocab_size=args.vocab_size, output=args.output, model_type=args.model_type)
    print(f"wrote {path} ({SentencePieceTokenizer(path).vocab_size} pieces)")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (uses its `data` section)")
    flags.DEFINE_integer("vocab_size", 32000, "number of pieces")
    flags.DEFINE_string("output", None, "output path; '.model' is appended if missing")
    flags.DEFINE_string("model_type", "unigram", "unigram | bpe | char | word")
    flags.DEFINE_integer("max_documents", 1_000_000, "train on at most this many documents")
    flags.mark_flags_as_required(["config", "output"])
    app.run(_main)
