"""The input pipeline: documents -> shard -> shuffle -> tokenize + EOS -> pack -> batch -> prefetch (grain).

Each process reads only its shard of documents (`documents[process_index::process_count]`) and yields
`batch_size / process_count` rows: dicts of numpy arrays [B_local, L] -- `inputs`, `targets` (int32),
`loss_weights` (float32), `segment_ids` (1..n per row, 0 padding), `positions` (int32), plus `domains`
(int32, -1 on padding) for the synthetic source. The train iterator repeats the data forever with a fresh
seeded shuffle each epoch and is a grain DatasetIterator: save/restore it with
`grain.checkpoint.CheckpointSave/CheckpointRestore` and the next batch is the one that was due.
"""

from __future__ import annotations

from typing import Optional

import grain
import jax
import ml_collections
import numpy as np

from moe_jax.data import packing, sources, synthetic, tokenizers


def default_config() -> ml_collections.ConfigDict:
    """`data` section of a run config. `source` is one of synthetic | tfds | jsonl | text."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"
    c.tfds_name = "c4/en:3.1.0"
    c.tfds_data_dir = ""  # "" = TFDS's default (~/tensorflow_datasets); gs:// works
    c.tfds_train_split = "train"
    c.tfds_eval_split = "validation"
    c.paths = ""  # jsonl/text: comma-separated files or globs (.gz read transparently)
    c.text_field = "text"  # jsonl record key / TFDS feature holding the document
    c.text_document = "line"  # text files: one document per 'line' or per blank-line-separated 'paragraph'
    c.eval_fraction = 0.01  # jsonl/text: seeded share of documents held out for evaluation
    c.tokenizer = "byte"  # 'byte' or a SentencePiece '<path>.model' (ignored by the synthetic source)
    c.seq_len = 128
    c.batch_size = 32  # global, over all processes
    c.seed = 0
    c.num_threads = 2  # grain read threads per process
    c.prefetch = 4  # grain read-ahead buffer (elements) per process
    c.num_workers = 0  # >0: grain worker processes (mp_prefetch) for heavy tokenization
    c.synthetic = ml_collections.ConfigDict(dict(
        num_domains=16, vocab_size=512, domain_vocab=32, neighborhood=8, order=2, branching=4, mean_length=64.0,
        alpha=1.0, seed=0))
    return c


def _shard(config, process_index, process_count) -> tuple[int, int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} must be in [0, process_count={count})")
    for key in ("seq_len", "batch_size"):
        if not (isinstance(config[key], int) and config[key] > 0):
            raise ValueError(f"data.{key}={config[key]!r} must be a positive integer")
    if config.batch_size % count:
        raise ValueError(f"data.batch_size={config.batch_size} must be a multiple of the {count} processes")
    return index, count, config.batch_size // count


class _Tokenize:
    """str -> {'tokens', 'domains'} with EOS appended; None (dropped, counted) for an empty document."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text):
        ids = self.tokenizer.encode(text) if text.strip() else []
        if not ids:
            sources.STATS["empty_documents"] += 1
            return None
        tokens = np.asarray(ids + [self.tokenizer.eos_id], np.int32)
        return {"tokens": tokens, "domains": np.full(tokens.shape, -1, np.int32)}


class _Synthetic:
    """Document index -> {'tokens', 'domains'} from the synthetic corpus (EOS appended)."""

    def __init__(self, corpus: synthetic.SyntheticCorpus, stream: int):
        self.corpus, self.stream = corpus, stream

    def __call__(self, index):
        tokens, domain = self.corpus.document(int(index), self.stream)
        tokens = np.append(tokens, synthetic.EOS).astype(np.int32)
        return {"tokens": tokens, "domains": np.full(tokens.shape, domain, np.int32)}


# The synthetic corpus is an endless i.i.d. stream; this many virtual documents per stream is "forever".
_SYNTHETIC_DOCUMENTS = 1 << 40


def _documents(config, split: str, index: int, count: int) -> grain.MapDataset:
    """This process's tokenized documents of `split`, in fixed order (entries may be None = skipped)."""
    if config.source == "synthetic":
        corpus = synthetic.SyntheticCorpus.from_config(config)
        return grain.MapDataset.range(_SYNTHETIC_DOCUMENTS)[index::count].map(
            _Synthetic(corpus, 0 if split == "train" else 1))
    docs = sources.text_dataset(config, split)
    if len(docs) < count:
        raise ValueError(f"data ({config.source}, {split}) has {len(docs)} documents, fewer than the {count} "
                         "processes reading it")
    return docs[index::count].map(_Tokenize(tokenizers.make_tokenizer(config)))


def _check_fills_one_batch(docs: grain.MapDataset, config, split: str, rows: int):
    needed, have, seen = rows * config.seq_len, 0, 0
    for i in range(len(docs)):
        doc = docs[i]
        seen += 1
        if doc is not None:
            have += len(doc["tokens"])
            if have >= needed:
                return
    raise ValueError(f"data ({config.source}, {split} split) is too small for one batch: this process's shard "
                     f"has {seen} documents and {have} tokens (EOS included), one batch of {rows} rows x "
                     f"data.seq_len {config.seq_len} needs {needed}")


def _batches(docs: grain.IterDataset, config, rows: int) -> grain.IterDataset:
    tokenizer = tokenizers.make_tokenizer(config)
    features = packing.LmFeatures(tokenizer.pad_id, with_domains=config.source == "synthetic")
    return packing.pack(docs, config.seq_len).map(features).batch(rows, drop_remainder=True)


def make_train_iterator(config, *, process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> grain.DatasetIterator:
    """Endless, checkpointable iterator of this process's train batches ([batch_size / process_count, L])."""
    index, count, rows = _shard(config, process_index, process_count)
    docs = _documents(config, "train", index, count)
    if config.source != "synthetic":
        _check_fills_one_batch(docs, config, "train", rows)
        docs = docs.shuffle(seed=config.seed).repeat(None)
    read = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch)
    ds = _batches(docs.to_iter_dataset(read), config, rows)
    if config.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app.run, use defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return iter(ds)


def make_eval_batches(config, num_batches: int, *, process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> list[dict]:
    """`num_batches` held-out batches in a fixed order (the same every call, whatever `data.seed`).

    When one pass over the eval documents gives fewer batches, the pass is repeated (in the same order) so
    every process returns exactly `num_batches`.
    """
    index, count, rows = _shard(config, process_index, process_count)
    docs = _documents(config, "eval", index, count)
    if config.source != "synthetic":
        _check_fills_one_batch(docs, config, "eval", rows)
    one_pass = _batches(docs.to_iter_dataset(grain.ReadOptions(num_threads=0)), config, rows)
    batches = []
    for batch in one_pass:
        batches.append(batch)
        if len(batches) == num_batches:
            return batches
    return [batches[i % len(batches)] for i in range(num_batches)]


def entropy_floor(config) -> Optional[float]:
    """Nats per target token of the synthetic generator given each document's domain; None otherwise."""
    if config.source != "synthetic":
        return None
    return synthetic.SyntheticCorpus.from_config(config).entropy_floor()
