"""Packing: token streams -> rows of `seq_len` with segment ids and positions -> causal-LM features.

Documents (tokens with EOS appended) are concatenated and split at row boundaries (grain's
ConcatThenSplitIterDataset), so no token is dropped or repeated and rows carry no padding except at the very
end of a finite stream. A document split across rows continues in the next row as a new segment whose
positions restart at 0.
"""

from __future__ import annotations

import grain
import numpy as np


def pack(documents: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """{'tokens': [n] int32, 'domains': [n] int32} documents -> rows with `*_segment_ids`, `*_positions` [L]."""
    return grain.experimental.ConcatThenSplitIterDataset(
        documents, length_struct={"tokens": seq_len, "domains": seq_len})


class LmFeatures:
    """A packed row -> `inputs`, `targets`, `loss_weights`, `segment_ids`, `positions` (+ `domains`).

    target[i] = token[i+1]; it has weight 1 exactly when i and i+1 are in the same segment (so a document's
    last real token predicts its EOS, while the EOS's target, the next document's first token, has weight 0),
    and 0 on padding and at a row's last position.
    """

    def __init__(self, pad_id: int, with_domains: bool):
        self.pad_id, self.with_domains = pad_id, with_domains

    def __call__(self, row: dict) -> dict:
        segments = row["tokens_segment_ids"].astype(np.int32)
        tokens = np.where(segments > 0, row["tokens"], self.pad_id).astype(np.int32)
        targets = np.full_like(tokens, self.pad_id)
        targets[:-1] = tokens[1:]
        weights = np.zeros(tokens.shape, np.float32)
        weights[:-1] = (segments[:-1] > 0) & (segments[:-1] == segments[1:])
        out = dict(inputs=tokens, targets=targets, loss_weights=weights, segment_ids=segments,
                   positions=np.where(segments > 0, row["tokens_positions"], 0).astype(np.int32))
        if self.with_domains:
            out["domains"] = np.where(segments > 0, row["domains"], -1).astype(np.int32)
        return out
