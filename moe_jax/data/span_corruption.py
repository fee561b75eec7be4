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

from typing import Sequence

import numpy as np


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
    num_noise = min(max(int(np.round(length * noise_density)), 1), length - 1)
    num_spans = max(int(np.round(num_noise / mean_noise_span_length)), 1)
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
