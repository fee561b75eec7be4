"""Packing against a slow, obviously-correct reference: nothing lost or repeated, ids/positions/weights right."""

import grain
import numpy as np
from hypothesis import given, settings, strategies as st

from moe_jax.data import packing

EOS = 1


def reference_rows(docs, seq_len, pad_id=0):
    """Concatenate every document, cut every `seq_len` tokens; segments restart at cuts."""
    tokens, doc_of = [], []
    for d, doc in enumerate(docs):
        tokens += list(doc)
        doc_of += [d] * len(doc)
    rows = []
    for start in range(0, len(tokens), seq_len):
        t, owner = tokens[start:start + seq_len], doc_of[start:start + seq_len]
        seg, pos = [], []
        for i, o in enumerate(owner):
            new = i == 0 or owner[i - 1] != o
            seg.append(1 if i == 0 else seg[-1] + new)
            pos.append(0 if new else pos[-1] + 1)
        pad = seq_len - len(t)
        inputs = t + [pad_id] * pad
        seg, pos = seg + [0] * pad, pos + [0] * pad
        targets = inputs[1:] + [pad_id]
        weights = [float(i + 1 < len(t) and seg[i] == seg[i + 1]) for i in range(seq_len)]
        rows.append(dict(inputs=inputs, targets=targets, loss_weights=weights, segment_ids=seg, positions=pos))
    return rows


def packed_rows(docs, seq_len):
    ds = grain.MapDataset.source([
        {"tokens": np.asarray(d, np.int32), "domains": np.full(len(d), k, np.int32)} for k, d in enumerate(docs)])
    rows = packing.pack(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)), seq_len)
    return list(rows.map(packing.LmFeatures(pad_id=0, with_domains=True)))


documents = st.lists(st.lists(st.integers(2, 50), min_size=0, max_size=20).map(lambda d: d + [EOS]),
                     min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(docs=documents, seq_len=st.integers(2, 16))
def test_packing_matches_reference(docs, seq_len):
    got = packed_rows(docs, seq_len)
    want = reference_rows(docs, seq_len)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in w:
            np.testing.assert_array_equal(g[key], np.asarray(w[key], g[key].dtype), err_msg=key)


@settings(max_examples=30, deadline=None)
@given(docs=documents, seq_len=st.integers(2, 16))
def test_no_token_lost_or_repeated_and_domains_follow_tokens(docs, seq_len):
    rows = packed_rows(docs, seq_len)
    real = np.concatenate([r["segment_ids"] > 0 for r in rows])
    stream = np.concatenate([r["inputs"] for r in rows])[real]
    np.testing.assert_array_equal(stream, np.concatenate([np.asarray(d) for d in docs]))
    domains = np.concatenate([r["domains"] for r in rows])
    np.testing.assert_array_equal(domains[real], np.concatenate([np.full(len(d), k) for k, d in enumerate(docs)]))
    assert (domains[~real] == -1).all()


def test_hand_worked_row():
    # docs [5 6 EOS] [7 EOS] [8 9 10 EOS] in rows of 4: [5 6 1 7] [1 8 9 10] [1 pad pad pad]
    rows = packed_rows([[5, 6, EOS], [7, EOS], [8, 9, 10, EOS]], 4)
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2])
    np.testing.assert_array_equal(rows[0]["targets"], [6, 1, 7, 0])  # a row's last target is cut
    np.testing.assert_array_equal(rows[0]["loss_weights"], [1, 1, 0, 0])  # 6->EOS predicted, EOS->7 not
    np.testing.assert_array_equal(rows[1]["positions"], [0, 0, 1, 2])  # a split document restarts at 0
    np.testing.assert_array_equal(rows[1]["loss_weights"], [0, 1, 1, 0])
    np.testing.assert_array_equal(rows[2]["segment_ids"], [1, 0, 0, 0])
    np.testing.assert_array_equal(rows[2]["loss_weights"], [0, 0, 0, 0])
