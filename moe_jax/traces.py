"""Routing traces on disk: which experts every token of a generation went to, and their replay.

    tokens_BT, trace = generate.generate(model, config, prompts, max_new_tokens=32, trace=True)
    traces.write(path, tokens_BT, trace, tokenizer)      # what `python -m moe_jax.sample --trace=PATH` writes
    tokens_BT, replay, recorded = traces.read(path)
    logits, aux = model(tokens_BT, replay=replay)          # teacher-forced, with the recorded routing

A trace file is JSON lines, one per token the model read: `sample`, `position`, `token`, `text` (the
token decoded alone, when there is a tokenizer), and `moe_layers`: for every MoE layer in order, the chosen
`experts` and their combine `weights` (0 for a choice that was dropped).
"""

from __future__ import annotations

import json
from typing import Optional

import jax.numpy as jnp
import numpy as np
from etils import epath


def write(path, tokens_BT: np.ndarray, trace: dict, tokenizer=None) -> int:
    """Write a `generate(..., trace=True)` trace as JSON lines; returns the number of lines."""
    index, weight, recorded = trace["expert_index"], trace["weight"], trace["recorded"]
    lines = []
    for b, t in zip(*np.nonzero(recorded)):
        token = int(tokens_BT[b, t])
        row = dict(sample=int(b), position=int(t), token=token)
        if tokenizer is not None:
            row["text"] = tokenizer.decode([token])
        row["moe_layers"] = [dict(experts=index[layer, b, t].tolist(),
                                  weights=[round(float(w), 6) for w in weight[layer, b, t]])
                             for layer in range(index.shape[0])]
        lines.append(json.dumps(row))
    epath.Path(path).write_text("\n".join(lines) + "\n")
    return len(lines)


def read(path, pad_id: int = 0) -> tuple[np.ndarray, tuple[jnp.ndarray, jnp.ndarray], np.ndarray]:
    """(tokens_BT, replay=(expert_index, weight) [layers, B, T, K], recorded [B, T]) from a trace file."""
    file = epath.Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{path}: no such trace file")
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
    if not rows:
        raise ValueError(f"{path}: empty trace")
    B = 1 + max(r["sample"] for r in rows)
    T = 1 + max(r["position"] for r in rows)
    layers = len(rows[0]["moe_layers"])
    K = len(rows[0]["moe_layers"][0]["experts"])
    tokens = np.full((B, T), pad_id, np.int32)
    index = np.zeros((layers, B, T, K), np.int32)
    weight = np.zeros((layers, B, T, K), np.float32)
    recorded = np.zeros((B, T), bool)
    for r in rows:
        b, t = r["sample"], r["position"]
        tokens[b, t], recorded[b, t] = r["token"], True
        for layer, routed in enumerate(r["moe_layers"]):
            index[layer, b, t], weight[layer, b, t] = routed["experts"], routed["weights"]
    return tokens, (jnp.asarray(index), jnp.asarray(weight)), recorded


def segment_ids(recorded: np.ndarray) -> Optional[np.ndarray]:
    """[B, T] int32 segment ids for replaying a trace: 1 on recorded tokens, 0 (padding) elsewhere."""
    return recorded.astype(np.int32)
