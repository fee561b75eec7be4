"""The input pipeline: documents -> shard -> shuffle -> tokenize + EOS -> pack -> batch -> prefetch (grain).

The global batch does not depend on how many processes build it. Its `batch_size` rows are cut into
`num_shards` logical data shards (`data.num_shards`; 0 = one per row) of consecutive rows; shard s packs its
own stream of documents `documents[s::num_shards]` (shuffled with its own seed) into its rows of every batch.
Process p of P builds the contiguous block of shards [p S/P, (p+1) S/P), reading only their documents, and
yields `batch_size / process_count` rows: dicts of numpy arrays [B_local, L] -- `inputs`, `targets` (int32),
`loss_weights` (float32), `segment_ids` (1..n per row, 0 padding), `positions` (int32), plus `domains`
(int32, -1 on padding) for the synthetic source. So 1 process x 8 devices and 2 processes x 4 devices train
on the same global batches (`jax.make_array_from_process_local_data` concatenates the processes' blocks).
The train iterator repeats the data forever with a fresh seeded shuffle each epoch and is a grain
DatasetIterator (the state of every local shard): save/restore it with
`grain.checkpoint.CheckpointSave/CheckpointRestore` and the next batch is the one that was due.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
from typing import Optional

import grain
import jax
import ml_collections
import numpy as np

from moe_jax.data import packing, sources, span_corruption, synthetic, tokenizers

# The batch formats the pipeline builds; a model family names the one it trains on (`models.get(cfg).batch_format`).
# "lm": the rows described above (targets are the inputs shifted by one within each document).
# "span_corruption": T5's objective (`span_corruption.py`): encoder rows of seq_len and decoder rows of the matching
#   targets length, examples packed whole with segment ids (`moe_jax.models.encdec.abstract_batch` names the keys).
BATCH_FORMATS = ("lm", "span_corruption")

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
    c.eval_paths = ""  # jsonl/text: evaluate on these files instead (then all of `paths` is trained on)
    c.tokenizer = "byte"  # 'byte' or a SentencePiece '<path>.model' (ignored by the synthetic source)
    c.seq_len = 128
    c.batch_size = 32  # global, over all processes
    c.num_shards = 0  # logical data shards, each a packed stream of its own rows; 0 = one per row
    c.seed = 0
    c.num_threads = 2  # threads per process: grain read threads (one shard) or shards advanced at once (several)
    c.prefetch = 4  # read-ahead buffer per process: documents (one shard) or batches (several)
    c.num_workers = 0  # >0: grain worker processes (mp_prefetch) for heavy tokenization
    c.span_corruption = span_corruption.default_config()  # read when the model trains on span corruption
    c.synthetic = ml_collections.ConfigDict(dict(
        num_domains=32, vocab_size=1024, domain_vocab=32, neighborhood=8, order=2, branching=4, mean_length=64.0,
        alpha=1.0, seed=0))
    return c


@dataclasses.dataclass(frozen=True)
class _Layout:
    """This process's share of the global batch: logical shards [first, first + local) of `total`."""

    process_count: int
    total: int  # S logical shards
    first: int
    local: int
    rows_per_shard: int

    @property
    def rows(self) -> int:
        return self.local * self.rows_per_shard


def _layout(config, process_index, process_count) -> _Layout:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} must be in [0, process_count={count})")
    for key in ("seq_len", "batch_size"):
        if not (isinstance(config[key], int) and config[key] > 0):
            raise ValueError(f"data.{key}={config[key]!r} must be a positive integer")
    if config.batch_size % count:
        raise ValueError(f"data.batch_size={config.batch_size} must be a multiple of the {count} processes")
    total = config.get("num_shards", 0) or config.batch_size
    if total < 0 or config.batch_size % total or total % count:
        raise ValueError(f"data.num_shards={config.num_shards} (0 = data.batch_size) must divide data.batch_size="
                         f"{config.batch_size} and be a multiple of the {count} processes")
    local = total // count
    return _Layout(count, total, index * local, local, config.batch_size // total)


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


def _documents(config, split: str, layout: _Layout) -> list[grain.MapDataset]:
    """Tokenized documents of each of this process's shards of `split`, in fixed order (None = skipped)."""
    shards = range(layout.first, layout.first + layout.local)
    if config.source == "synthetic":
        corpus = synthetic.SyntheticCorpus.from_config(config)
        stream = grain.MapDataset.range(_SYNTHETIC_DOCUMENTS).map(_Synthetic(corpus, 0 if split == "train" else 1))
        return [stream[s::layout.total] for s in shards]
    docs = sources.text_dataset(config, split)
    if not len(docs):
        raise ValueError(f"data ({config.source}, {split} split) has no documents (data.paths={config.paths!r}, "
                         f"data.eval_fraction={config.eval_fraction})")
    tokenize = _Tokenize(tokenizers.make_tokenizer(config))
    few = len(docs) < layout.total
    if split == "train":  # the held-out stream repeats until its batches are full: any size will do
        _check_fills_one_batch([docs.map(tokenize)] if few else [docs[s::layout.total].map(tokenize) for s in shards],
                               config, split, layout.rows, "the data" if few else "this process's shards")
    if few:
        # Fewer documents than shards (a small held-out set, a short file): shard s starts at document
        # s mod n of the repeated list, so every shard has documents; the train stream is reshuffled anyway.
        docs = docs.repeat(-(-layout.total // len(docs)))
    return [docs[s::layout.total].map(tokenize) for s in shards]


def _check_fills_one_batch(shards: list[grain.MapDataset], config, split: str, rows: int, what: str):
    needed, have, seen = rows * config.seq_len, 0, 0
    for docs in shards:
        for i in range(len(docs)):
            doc = docs[i]
            seen += 1
            if doc is not None:
                have += len(doc["tokens"])
                if have >= needed:
                    return
    raise ValueError(f"data ({config.source}, {split} split) is too small for one batch: {what} "
                     f"{'have' if what.endswith('s') else 'has'} {seen} documents and {have} tokens (EOS included), "
                     f"one batch of {rows} rows x data.seq_len {config.seq_len} needs {needed}")


def _shard_seed(seed: int, shard: int) -> int:
    return seed + 1_000_003 * shard  # shard 0 keeps `seed`: one shard is the plain seeded shuffle


def _batches(shards: list[grain.MapDataset], config, layout: _Layout, read: grain.ReadOptions, batch_format: str,
             corruption_seed: int) -> grain.IterDataset:
    """Endless rows of every local shard, packed separately and concatenated in shard order per batch."""
    tokenizer = tokenizers.make_tokenizer(config)
    if len(shards) > 1:  # threads advance whole shards (below) and one thread prefetches batches, not per shard
        read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    if batch_format == "span_corruption":
        streams = [span_corruption.examples(docs.to_iter_dataset(read), config, tokenizer,
                                            seed=_shard_seed(corruption_seed, s), rows=layout.rows_per_shard)
                   for s, docs in zip(range(layout.first, layout.first + layout.local), shards)]
    else:
        features = packing.LmFeatures(tokenizer.pad_id, with_domains=config.source == "synthetic")
        streams = [packing.pack(docs.to_iter_dataset(read), config.seq_len).map(features)
                   .batch(layout.rows_per_shard, drop_remainder=True) for docs in shards]
    if len(streams) == 1:
        return streams[0]
    return _ConcatenatedShards(streams, num_threads=config.num_threads)


class _ConcatenatedShards(grain.IterDataset):
    """Each parent's next rows, concatenated in parent order. The parents are independent, so up to
    `num_threads` threads advance them at once (document generation and tokenization overlap); the state is
    every parent's state."""

    def __init__(self, parents, num_threads: int):
        super().__init__(parents)
        self.num_threads = num_threads

    def __iter__(self):
        return _ConcatenatedShardsIterator([iter(p) for p in self.parents], self.num_threads)


class _ConcatenatedShardsIterator(grain.DatasetIterator):
    def __init__(self, parents, num_threads: int):
        super().__init__(parents)
        self._pool = None if num_threads < 2 else concurrent.futures.ThreadPoolExecutor(num_threads)

    def __next__(self) -> dict:
        parts = list(self._pool.map(next, self._parents) if self._pool else map(next, self._parents))
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def get_state(self):
        return {"shards": [it.get_state() for it in self._parents]}

    def set_state(self, state):
        for it, shard_state in zip(self._parents, state["shards"]):
            it.set_state(shard_state)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        super().close()


def check_batch_format(config, batch_format: str) -> None:
    """ValueError unless this data config builds `batch_format` batches (every source builds every format)."""
    del config
    if batch_format not in BATCH_FORMATS:
        raise ValueError(f"the model trains on {batch_format!r} batches, which the data pipeline does not build "
                         f"(it builds {BATCH_FORMATS}); check model.name")


def make_train_iterator(config, *, process_index: Optional[int] = None, process_count: Optional[int] = None,
                        batch_format: str = "lm") -> grain.DatasetIterator:
    """Endless, checkpointable iterator of this process's rows of every train batch ([batch_size / count, L]).

    Process `process_index` gets rows [i B/P, (i+1) B/P) of the global batch, whatever P is. `batch_format`:
    the format the model needs (`BATCH_FORMATS`); ValueError if this config cannot build it.
    """
    check_batch_format(config, batch_format)
    layout = _layout(config, process_index, process_count)
    shards = _documents(config, "train", layout)
    if config.source != "synthetic":
        shards = [docs.shuffle(seed=_shard_seed(config.seed, s)).repeat(None)
                  for s, docs in zip(range(layout.first, layout.first + layout.local), shards)]
    read = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch)
    ds = _batches(shards, config, layout, read, batch_format, corruption_seed=config.seed)
    if config.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app.run, use defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    elif layout.local > 1 and config.prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=config.prefetch)
    return iter(ds)


_EVAL_CORRUPTION_SEED = 7  # held-out noise masks are the same whatever data.seed


def make_eval_batches(config, num_batches: int, *, process_index: Optional[int] = None,
                      process_count: Optional[int] = None, batch_format: str = "lm") -> list[dict]:
    """This process's rows of `num_batches` held-out batches in a fixed order (the same every call, whatever
    `data.seed` or the process count). A shard that runs out of held-out documents starts over."""
    check_batch_format(config, batch_format)
    layout = _layout(config, process_index, process_count)
    shards = [docs.repeat(None) if config.source != "synthetic" else docs
              for docs in _documents(config, "eval", layout)]
    batches = _batches(shards, config, layout, grain.ReadOptions(num_threads=0), batch_format,
                       corruption_seed=_EVAL_CORRUPTION_SEED)
    return list(itertools.islice(iter(batches), num_batches))


def entropy_floor(config) -> Optional[float]:
    """Nats per target token of the synthetic generator given each document's domain; None otherwise."""
    if config.source != "synthetic":
        return None
    return synthetic.SyntheticCorpus.from_config(config).entropy_floor()
