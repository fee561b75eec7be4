"""T5's span-corruption objective (Raffel et al. 2020, §3.1.4), with the semantics of T5's own preprocessors.

    mask = random_spans_noise_mask(568, noise_density=0.15, mean_noise_span_length=3.0, rng=rng)
    inputs, targets = span_corrupt(tokens_568, rng, sentinel_ids=sentinels(vocab_size=32000, count=100))
    # inputs: the kept tokens with one sentinel where each noise span was (+ EOS, added by the pipeline)
    # targets: each sentinel followed by the span it replaced

`random_spans_noise_mask`: round(length x density) noise tokens (at least 1, at most length - 1) in
round(noise / mean span length) spans (at least 1); the noise and the non-noise tokens are each cut into that
many spans of random lengths (each >= 1), and the spans alternate starting with a non-noise span, as in
`t5.data.preprocessors.random_spans_noise_mask` (without its optional random roll). `input_and_target_lengths`
is T5's `random_spans_helper`: the raw token length that fills `inputs_length` after corruption, and the
targets length that then results (512 -> 568 raw tokens and 114 targets for the defaults).

Sentinels take ids of their own: span i is marked with `sentinel_ids[i]`. T5's vocabulary puts its 100 extra
ids at the top, `<extra_id_0>` highest (32099 of 32100); `sentinels(vocab_size, count)` gives the same
layout after any tokenizer's ids, so the model's vocabulary must hold `vocab_size + count` ids.
"""

from __future__ import annotations

from typing import Optional, Sequence

import grain
import ml_collections
import numpy as np


def noise_and_span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of `random_spans_noise_mask` for `length` (>= 2) tokens."""
    num_noise = min(max(int(np.round(length * noise_density)), 1), length - 1)
    return num_noise, max(int(np.round(num_noise / mean_noise_span_length)), 1)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """[length] bool, True on noise tokens; see the module docstring for the exact semantics."""
    if length < 1:
        raise ValueError(f"length={length} must be >= 1")
    if not 0 < noise_density < 1:
        raise ValueError(f"noise_density={noise_density} must be in (0, 1)")
    if not mean_noise_span_length >= 1:
        raise ValueError(f"mean_noise_span_length={mean_noise_span_length} must be >= 1")
    original_length, length = length, max(length, 2)  # room for one noise and one non-noise token
    num_noise, num_spans = noise_and_span_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    start_indicator = np.zeros(length, np.int64)
    start_indicator[span_starts] = 1
    is_noise = np.cumsum(start_indicator) % 2 == 1
    return is_noise[:original_length]


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """`num_items` cut at random into `num_segments` segments of length >= 1 -> their lengths."""
    if num_segments > num_items:
        raise ValueError(f"{num_segments} spans do not fit in {num_items} tokens: lower noise_density or raise "
                         f"mean_noise_span_length")
    first_in_segment = np.concatenate([[0], rng.permutation(np.arange(num_items - 1) < num_segments - 1)])
    segment_id = np.cumsum(first_in_segment)
    lengths = np.bincount(segment_id, minlength=num_segments)
    return lengths


def sentinels(vocab_size: int, count: int = 100) -> np.ndarray:
    """`count` sentinel ids after a vocabulary of `vocab_size`, the first span's highest (T5's layout)."""
    return vocab_size + count - 1 - np.arange(count)


def span_corrupt(tokens: Sequence[int], rng: np.random.Generator, *, sentinel_ids: Sequence[int],
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """tokens [n] -> (inputs, targets), without EOS: inputs keep the non-noise tokens and put `sentinel_ids[i]`
    where the i-th noise span was; targets are `sentinel_ids[i]` followed by that span, for every span."""
    tokens = np.asarray(tokens)
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
    return (_replace_spans(tokens, mask, np.asarray(sentinel_ids)),
            _replace_spans(tokens, ~mask, np.asarray(sentinel_ids)))


def _replace_spans(tokens: np.ndarray, mask: np.ndarray, sentinel_ids: np.ndarray) -> np.ndarray:
    """Each run of True in `mask` -> one sentinel (the i-th run gets sentinel_ids[i]); False tokens kept."""
    previous = np.concatenate([[False], mask[:-1]])
    first = mask & ~previous
    span_index = np.cumsum(first) - 1
    if first.sum() > len(sentinel_ids):
        raise ValueError(f"{int(first.sum())} spans need more than the {len(sentinel_ids)} sentinel ids given")
    out = np.where(first, sentinel_ids[np.clip(span_index, 0, None)], tokens)
    return out[~(mask & previous)].astype(np.int32)


def input_and_target_lengths(inputs_length: int, noise_density: float = 0.15,
                             mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(raw tokens per example, targets length) so that corrupted inputs (+ EOS) fill `inputs_length`
    exactly as T5's `random_spans_helper` chooses them (one sentinel per span, one EOS on each side)."""

    def lengths(tokens_length):
        num_noise = int(round(tokens_length * noise_density))
        num_spans = int(round(num_noise / mean_noise_span_length))
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    if inputs_length < 2:
        raise ValueError(f"inputs_length={inputs_length} must be >= 2")
    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:  # T5: keep the targets at the round number
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


# --------------------------------------------------------------------------------------------- the pipeline
# documents (tokens + EOS) -> pieces of at most `raw_length` tokens, each inside one document -> span corruption
# (seeded per piece, resumable) -> examples first-fit packed into rows of (seq_len, targets_length) with one
# segment id per example shared by its encoder and decoder parts -> `span_corruption` features.


def default_config():
    """The `data.span_corruption` section: T5's defaults (15% noise, mean span 3, 100 sentinel ids)."""
    return ml_collections.ConfigDict(dict(noise_density=0.15, mean_noise_span_length=3.0, num_sentinels=100))


def lengths(data_config) -> tuple[int, int, int]:
    """(raw tokens per piece, encoder length, decoder length) for a data config (encoder length = seq_len)."""
    sc = data_config.span_corruption
    raw, targets = input_and_target_lengths(data_config.seq_len, sc.noise_density, sc.mean_noise_span_length)
    return raw, data_config.seq_len, targets


def validate(data_config, tokenizer_vocab_size: Optional[int], model_vocab_size: int) -> None:
    """ValueError naming the key unless `data.span_corruption` can corrupt rows of `data.seq_len`."""
    sc = data_config.span_corruption
    if not (isinstance(sc.noise_density, (int, float)) and 0 < sc.noise_density < 1):
        raise ValueError(f"data.span_corruption.noise_density={sc.noise_density!r} must be in (0, 1)")
    if not (isinstance(sc.mean_noise_span_length, (int, float)) and sc.mean_noise_span_length >= 1):
        raise ValueError(f"data.span_corruption.mean_noise_span_length={sc.mean_noise_span_length!r} must be >= 1")
    if data_config.seq_len < 4:
        raise ValueError(f"data.seq_len={data_config.seq_len} (the encoder length) must be >= 4 for span corruption")
    raw, _, _ = lengths(data_config)
    _, spans = noise_and_span_counts(max(raw, 2), sc.noise_density, sc.mean_noise_span_length)
    if not (isinstance(sc.num_sentinels, int) and sc.num_sentinels >= spans):
        raise ValueError(f"data.span_corruption.num_sentinels={sc.num_sentinels!r}: a piece of {raw} tokens has up "
                         f"to {spans} noise spans, each needing its own sentinel id; set it >= {spans}")
    if tokenizer_vocab_size is not None and model_vocab_size < tokenizer_vocab_size + sc.num_sentinels:
        raise ValueError(f"model.vocab_size={model_vocab_size} must hold the tokenizer's {tokenizer_vocab_size} ids "
                         f"and data.span_corruption.num_sentinels={sc.num_sentinels} sentinel ids after them: set "
                         f"model.vocab_size >= {tokenizer_vocab_size + sc.num_sentinels}")


class _Pieces(grain.IterDataset):
    """Each document's tokens (its EOS removed) cut into consecutive pieces of at most `raw_length`."""

    def __init__(self, parent: grain.IterDataset, raw_length: int):
        super().__init__(parent)
        self.raw_length = raw_length

    def __iter__(self):
        return _PiecesIterator(iter(self._parent), self.raw_length)


class _PiecesIterator(grain.DatasetIterator):
    """State: the parent's state before the current document, and how many of its pieces were given."""

    def __init__(self, parent, raw_length: int):
        super().__init__(parent)
        self._raw_length = raw_length
        self._document_state, self._pieces, self._given = parent.get_state(), [], 0

    def _read_document(self):
        tokens = next(self._parent)["tokens"][:-1]
        self._pieces = [tokens[i:i + self._raw_length] for i in range(0, len(tokens), self._raw_length)]

    def __next__(self) -> np.ndarray:
        while self._given == len(self._pieces):
            self._document_state, self._given = self._parent.get_state(), 0
            self._read_document()
        self._given += 1
        return self._pieces[self._given - 1]

    def get_state(self) -> dict:
        return {"document": self._document_state, "given": self._given}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["document"])
        self._document_state, self._pieces, self._given = state["document"], [], state["given"]
        if self._given:
            self._read_document()


class _Corrupt:
    """(piece, rng) -> {"encoder": inputs + EOS, "decoder": targets + EOS} (a grain random_map function)."""

    def __init__(self, data_config, tokenizer):
        sc = data_config.span_corruption
        self.noise_density, self.mean_noise_span_length = sc.noise_density, sc.mean_noise_span_length
        self.sentinel_ids = sentinels(tokenizer.vocab_size, sc.num_sentinels)
        self.eos_id = tokenizer.eos_id

    def __call__(self, piece: np.ndarray, rng: np.random.Generator) -> dict:
        inputs, targets = span_corrupt(piece, rng, sentinel_ids=self.sentinel_ids, noise_density=self.noise_density,
                                       mean_noise_span_length=self.mean_noise_span_length)
        return {"encoder": np.append(inputs, self.eos_id).astype(np.int32),
                "decoder": np.append(targets, self.eos_id).astype(np.int32)}


class SpanFeatures:
    """A packed row -> the `span_corruption` batch keys of `moe_jax.models.encdec.abstract_batch`.

    decoder_inputs are the targets shifted right within each example, starting from `start_id` (T5: the pad id);
    every real decoder position is a target (weight 1)."""

    def __init__(self, pad_id: int, start_id: int):
        self.pad_id, self.start_id = pad_id, start_id

    def __call__(self, row: dict) -> dict:
        out = {}
        for stack in ("encoder", "decoder"):
            segments = row[f"{stack}_segment_ids"].astype(np.int32)
            out[f"{stack}_segment_ids"] = segments
            out[f"{stack}_positions"] = np.where(segments > 0, row[f"{stack}_positions"], 0).astype(np.int32)
            out[f"{stack}_tokens"] = np.where(segments > 0, row[stack], self.pad_id).astype(np.int32)
        targets, segments = out.pop("decoder_tokens"), out["decoder_segment_ids"]
        starts = out["decoder_positions"] == 0
        shifted = np.concatenate([[self.start_id], targets[:-1]])
        out["encoder_inputs"] = out.pop("encoder_tokens")
        out["decoder_inputs"] = np.where(starts | (segments == 0), self.start_id, shifted).astype(np.int32)
        out["decoder_targets"] = targets
        out["decoder_loss_weights"] = (segments > 0).astype(np.float32)
        return out


# Packing bins filled at once: more bins leave less padding (each example goes to the first bin it fits).
_BINS = 8


def examples(documents, data_config, tokenizer, *, seed: int, rows: int):
    """grain IterDataset of tokenized documents -> batches of `rows` packed span-corruption rows."""
    raw, encoder_length, decoder_length = lengths(data_config)
    pieces = _Pieces(documents, raw).random_map(_Corrupt(data_config, tokenizer), seed=seed)
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces, length_struct={"encoder": encoder_length, "decoder": decoder_length}, num_packing_bins=max(rows, _BINS),
        shuffle_bins=False)
    return packed.map(SpanFeatures(tokenizer.pad_id, tokenizer.pad_id)).batch(rows, drop_remainder=True)

