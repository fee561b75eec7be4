"""Document sources: TFDS by name, JSON-lines files, plain text files -> a grain.MapDataset of str.

`jsonl` and `text` files (local or any etils.epath path, `.gz` read transparently, globs allowed) are read
into host memory: right for samples and corpora up to a few GB. For all of C4 use `tfds` (array_record,
random access, nothing held in memory). Empty documents are skipped and invalid UTF-8 is replaced; both are
counted in `STATS` and logged.
"""

from __future__ import annotations

import collections
import gzip
import json
import zlib
from typing import Iterable, Optional

import grain
import numpy as np
from absl import logging
from etils import epath

SOURCES = ("synthetic", "tfds", "jsonl", "text")

# Per-process counters (documents seen by this process; not summed over grain worker processes).
STATS: collections.Counter = collections.Counter()


def decode_utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        STATS["invalid_utf8_documents"] += 1
        return data.decode("utf-8", errors="replace")


def expand_paths(patterns, key: str = "data.paths") -> list[epath.Path]:
    """Every file the patterns name, in sorted order; an error names a pattern that matches nothing."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p]
    if not patterns:
        raise ValueError(f"{key} is empty: give one or more files or globs (comma-separated)")
    files = []
    for pattern in patterns:
        if any(ch in str(pattern) for ch in "*?["):
            path = epath.Path(pattern)
            matches = sorted(path.parent.glob(path.name)) if path.parent.exists() else []
            if not matches:
                raise FileNotFoundError(f"{key}: the glob {pattern!r} matches no file")
            files.extend(matches)
        else:
            path = epath.Path(pattern)
            if not path.exists():
                raise FileNotFoundError(f"{key}: no such file {pattern!r}")
            files.append(path)
    return files


def _read_bytes(path: epath.Path) -> bytes:
    if path.is_dir():
        raise IsADirectoryError(f"data.paths: {path} is a directory; give files or a glob such as {path}/*.jsonl")
    data = path.read_bytes()
    if not str(path).endswith(".gz"):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile, a truncated stream, a bad deflate block
        raise ValueError(f"data.paths: {path} is not a readable gzip file ({type(error).__name__}: {error})") \
            from None


def _jsonl_documents(path: epath.Path, field: str) -> Iterable[str]:
    for number, line in enumerate(_read_bytes(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(decode_utf8(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise KeyError(f"{path}:{number}: no text field {field!r} (data.text_field); the record has {keys}")
        yield str(record[field])


def _text_documents(path: epath.Path, per: str) -> Iterable[str]:
    data = _read_bytes(path)
    if per == "line":
        return [decode_utf8(line) for line in data.splitlines()]
    if per == "paragraph":
        return [decode_utf8(p).strip() for p in data.replace(b"\r\n", b"\n").split(b"\n\n")]
    raise ValueError(f"data.text_document={per!r}: use 'line' or 'paragraph'")


def _file_documents(config, paths=None) -> list[str]:
    docs = []
    for path in (expand_paths(config.paths) if paths is None else expand_paths(paths, "data.eval_paths")):
        if config.source == "jsonl":
            docs.extend(_jsonl_documents(path, config.text_field))
        else:
            docs.extend(_text_documents(path, config.text_document))
    kept = [d for d in docs if d.strip()]
    STATS["empty_documents"] += len(docs) - len(kept)
    logging.info("data: %d documents from %s (%d empty skipped, %d with invalid UTF-8 replaced)", len(kept),
                 config.paths if paths is None else paths, len(docs) - len(kept), STATS["invalid_utf8_documents"])
    return kept


def _tfds_source(config, split: str):
    import tensorflow_datasets as tfds

    name = config.tfds_name
    if name.split("/")[0].split(":")[0] == "c4":
        import tensorflow_datasets.text.c4  # noqa: F401  (registers c4 without needing h5py; see STACK.md)
    try:
        return tfds.data_source(name, split=split, data_dir=config.tfds_data_dir or None)
    except Exception as e:  # tfds raises several types (DatasetNotFoundError, AssertionError, ValueError)
        raise ValueError(f"data.tfds_name={name!r} split={split!r} data_dir={config.tfds_data_dir!r}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


class _TfdsText:
    """Record -> str for one TFDS text field (picklable, for grain workers)."""

    def __init__(self, field: str, name: str):
        self.field, self.name = field, name

    def __call__(self, record) -> str:
        if self.field not in record:
            raise KeyError(f"TFDS dataset {self.name!r} has no text field {self.field!r} (data.text_field); "
                           f"its features are {sorted(record)}")
        value = record[self.field]
        return decode_utf8(value) if isinstance(value, bytes) else str(value)


def text_dataset(config, split: str) -> grain.MapDataset:
    """Documents of `split` ('train' or 'eval') as a MapDataset of str, in the source's fixed order.

    File sources hold out a seeded `eval_fraction` of documents for 'eval'; TFDS uses its own split names
    (`tfds_train_split`, `tfds_eval_split`).
    """
    if config.source == "tfds":
        source = _tfds_source(config, config.tfds_train_split if split == "train" else config.tfds_eval_split)
        ds = grain.MapDataset.source(source)
        text = _TfdsText(config.text_field, config.tfds_name)
        text(ds[0]) if len(ds) else None  # fail now, naming the field, not deep inside an iterator
        return ds.map(text)
    if config.source in ("jsonl", "text"):
        eval_paths = config.get("eval_paths", "")
        if eval_paths:  # held-out files of their own: train on all of data.paths, evaluate on all of these
            docs = _file_documents(config, eval_paths if split == "eval" else None)
            if not docs:
                raise ValueError(f"data.{'eval_paths' if split == 'eval' else 'paths'}: no non-empty documents")
            return grain.MapDataset.source(docs)
        docs = _file_documents(config)
        if not docs:
            raise ValueError(f"data.paths={config.paths!r}: no non-empty documents in "
                             f"{', '.join(str(p) for p in expand_paths(config.paths))} (data.source="
                             f"{config.source!r}{', data.text_field=' + repr(config.text_field) if config.source == 'jsonl' else ''})")
        order = np.random.default_rng([config.seed, 7]).permutation(len(docs))
        num_eval = int(round(len(docs) * config.eval_fraction))
        if config.eval_fraction > 0:
            num_eval = min(max(num_eval, 1), len(docs) - 1)
        chosen = order[:num_eval] if split == "eval" else order[num_eval:]
        return grain.MapDataset.source([docs[i] for i in np.sort(chosen)])
    raise ValueError(f"data.source={config.source!r}: use one of {', '.join(SOURCES)}")


def all_documents(config) -> grain.MapDataset:
    """Every document of the configured data, in order, none held out (what `moe_jax.evaluate` reads):
    all of `data.paths` for jsonl/text, the `tfds_eval_split` split for TFDS."""
    if config.source == "tfds":
        return text_dataset(config, "eval")
    if config.source in ("jsonl", "text"):
        return grain.MapDataset.source(_file_documents(config))
    raise ValueError(f"data.source={config.source!r}: evaluate text from one of tfds, jsonl, text")


def load_texts(config, split: str = "train", max_documents: Optional[int] = None) -> Iterable[str]:
    """Plain documents of any non-synthetic source (e.g. for tokenizer training)."""
    if config.source == "synthetic":
        raise ValueError("data.source='synthetic' has no text; train a tokenizer on tfds, jsonl or text")
    ds = text_dataset(config, split)
    count = len(ds) if max_documents is None else min(len(ds), max_documents)
    for i in range(count):
        if ds[i].strip():
            yield ds[i]
