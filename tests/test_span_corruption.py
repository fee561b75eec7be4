"""Span corruption: T5's exact noise and span counts, alternation, reconstruction, sentinels, lengths."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moe_jax.data import span_corruption as sc


def spans(mask):
    """Runs of equal values: [(is_noise, length), ...]."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((bool(mask[start]), i - start))
            start = i
    return runs


@settings(max_examples=200, deadline=None)
@given(length=st.integers(2, 600), density=st.floats(0.05, 0.5), mean=st.floats(1.0, 8.0), seed=st.integers(0, 99))
def test_noise_and_span_counts_are_t5s_and_spans_alternate_from_non_noise(length, density, mean, seed):
    num_noise = min(max(int(np.round(length * density)), 1), length - 1)
    num_spans = max(int(np.round(num_noise / mean)), 1)
    if num_spans > length - num_noise:
        with pytest.raises(ValueError, match="spans do not fit"):
            sc.random_spans_noise_mask(length, density, mean, np.random.default_rng(seed))
        return
    mask = sc.random_spans_noise_mask(length, density, mean, np.random.default_rng(seed))
    assert mask.shape == (length,) and mask.sum() == num_noise
    runs = spans(mask)
    assert runs[0][0] is False  # the first span is not noise
    assert all(a[0] != b[0] for a, b in zip(runs, runs[1:]))  # alternate
    assert sum(1 for noise, _ in runs if noise) == num_spans


def test_same_rng_state_same_mask_and_length_one():
    a = sc.random_spans_noise_mask(100, 0.15, 3.0, np.random.default_rng(7))
    b = sc.random_spans_noise_mask(100, 0.15, 3.0, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert sc.random_spans_noise_mask(1, 0.15, 3.0, np.random.default_rng(0)).tolist() == [False]


@settings(max_examples=100, deadline=None)
@given(length=st.integers(2, 300), seed=st.integers(0, 999))
def test_inputs_and_targets_reconstruct_the_tokens_with_ordered_distinct_sentinels(length, seed):
    tokens = np.random.default_rng(seed).integers(0, 250, length)
    ids = sc.sentinels(259, 100)
    inputs, targets = sc.span_corrupt(tokens, np.random.default_rng(seed), sentinel_ids=ids)
    in_sentinels = [t for t in inputs if t >= 259]
    out_sentinels = [t for t in targets if t >= 259]
    assert in_sentinels == out_sentinels == list(ids[:len(in_sentinels)])  # distinct, in order, <extra_id_0> first
    assert targets[0] == ids[0]  # targets start with the first sentinel: inputs start with kept tokens
    # Put each target span back where its sentinel stands in the inputs.
    pieces = {}
    current = None
    for t in targets:
        if t >= 259:
            current = t
            pieces[current] = []
        else:
            pieces[current].append(t)
    rebuilt = [x for t in inputs for x in (pieces[t] if t >= 259 else [t])]
    assert rebuilt == tokens.tolist()
    assert len(inputs) + len(targets) == length + 2 * len(in_sentinels)  # one sentinel per span on each side


def test_t5_lengths():
    assert sc.input_and_target_lengths(512) == (568, 114)  # T5: inputs 512 -> targets 114
    assert sc.input_and_target_lengths(128) == (141, 29)  # 141 - 21 noise + 7 sentinels + EOS = 128
    tokens, targets = sc.input_and_target_lengths(512, noise_density=0.5)
    assert targets <= 512


def test_sentinel_layout_matches_t5():
    assert sc.sentinels(32000, 100)[0] == 32099 and sc.sentinels(32000, 100)[-1] == 32000
    with pytest.raises(ValueError, match="more than the 2 sentinel ids"):
        sc.span_corrupt(np.arange(100), np.random.default_rng(0), sentinel_ids=[300, 299])
