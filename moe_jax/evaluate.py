"""Loss and bits per byte of a trained run on any text.

    python -m moe_jax.evaluate --workdir=runs/tiny_switch [--step=N] --config.data.source=text \
        --config.data.paths=held_out.txt [--output=eval.json]

Restores the run's model and tokenizer from its workdir (the training config is `RUN/config.json`;
`--config.data.*` overrides only the data to evaluate on), reads every document of the given data once, in
order, and reports:

  loss             mean cross-entropy in nats per target token (every token after a document's first,
                   and its EOS, is a target; a document longer than a row continues in the next row, whose
                   first token then has no target);
  bits_per_byte    total nats / ln 2 / UTF-8 bytes of the documents' text: comparable across tokenizers;
  tokens, bytes    the counts behind those two;
  dropped_fraction per MoE layer, at the run's eval capacity factor (an empty list for a dense model).

Documents are packed greedily into rows of `data.seq_len` (a document that does not fit in what is left of
a row starts the next one; segment ids keep documents apart in attention), in batches of the run's
`data.batch_size`; the last batch is padded, and nothing wraps around to the start of the data.
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Iterator, Optional

import numpy as np

from moe_jax.data import packing, sources, tokenizers


def pack_documents(token_lists: Iterable[list[int]], seq_len: int, pad_id: int) -> Iterator[dict]:
    """Token lists (EOS included) -> LM rows (`inputs`, `targets`, `loss_weights`, `segment_ids`, `positions`),
    greedily packed, in order; a list longer than `seq_len` is cut into pieces that each start a row."""
    row: list[tuple[int, int, int]] = []  # (token, segment, position)
    segment = 0
    for tokens in token_lists:
        for start in range(0, len(tokens), seq_len):
            piece = tokens[start:start + seq_len]
            if len(row) + len(piece) > seq_len:
                yield _lm_row(row, seq_len, pad_id)
                row, segment = [], 0
            segment += 1
            row.extend((token, segment, position) for position, token in enumerate(piece))
    if row:
        yield _lm_row(row, seq_len, pad_id)


def _lm_row(row, seq_len: int, pad_id: int) -> dict:
    """(token, segment, position) triples -> the training pipeline's LM features (`packing.LmFeatures`)."""
    packed = {"tokens": np.full(seq_len, pad_id, np.int32), "tokens_segment_ids": np.zeros(seq_len, np.int32),
              "tokens_positions": np.zeros(seq_len, np.int32)}
    for i, (token, segment, position) in enumerate(row):
        packed["tokens"][i], packed["tokens_segment_ids"][i], packed["tokens_positions"][i] = token, segment, position
    return packing.LmFeatures(pad_id, with_domains=False)(packed)


def _batches(rows: Iterator[dict], batch_size: int, seq_len: int, pad_id: int) -> Iterator[dict]:
    empty = _lm_row([], seq_len, pad_id)
    while True:
        chunk = [row for _, row in zip(range(batch_size), rows)]
        if not chunk:
            return
        chunk += [empty] * (batch_size - len(chunk))
        yield {key: np.stack([row[key] for row in chunk]) for key in empty}


def evaluate_run(run, state, data_config) -> dict:
    """Evaluate a restored run (`checkpoint.restore_run`) on every document of `data_config`'s data."""
    import jax

    from moe_jax import models, sharding

    cfg = run.config
    models.require_language_model(cfg, "moe_jax.evaluate")
    if data_config.source == "synthetic":
        raise ValueError("data.source='synthetic' has no text to evaluate bits per byte on; give "
                         "--config.data.source=jsonl|text|tfds and --config.data.paths (or data.tfds_name)")
    tokenizer = tokenizers.make_tokenizer(cfg.data)  # the run's tokenizer, whatever the data config says
    documents = sources.all_documents(data_config)
    if not len(documents):
        raise ValueError(f"data.paths={data_config.paths!r}: no documents to evaluate")
    num_bytes = 0

    def token_lists():
        nonlocal num_bytes
        for i in range(len(documents)):
            text = documents[i]
            ids = tokenizer.encode(text)
            if ids:
                num_bytes += len(text.encode("utf-8"))
                yield ids + [tokenizer.eos_id]

    total_nats, total_tokens, dropped = 0.0, 0.0, None
    rows = pack_documents(token_lists(), cfg.data.seq_len, tokenizer.pad_id)
    with jax.set_mesh(run.mesh):
        for batch in _batches(rows, cfg.data.batch_size, cfg.data.seq_len, tokenizer.pad_id):
            metrics = jax.device_get(run.eval_step(state, sharding.shard_batch(batch, run.mesh)))
            tokens = float(metrics["num_tokens"])
            total_nats += float(metrics["ce"]) * tokens
            total_tokens += tokens
            layer_dropped = np.asarray(metrics["moe"].get("dropped_fraction", []), np.float64).reshape(-1)
            dropped = layer_dropped * tokens if dropped is None else dropped + layer_dropped * tokens
    if not total_tokens:
        raise ValueError(f"data.paths={data_config.paths!r}: the documents hold no token with a target")
    return dict(loss=total_nats / total_tokens, bits_per_byte=total_nats / math.log(2) / num_bytes,
                tokens=int(total_tokens), bytes=int(num_bytes), documents=len(documents),
                dropped_fraction=[float(d) for d in (dropped / total_tokens)] if dropped is not None else [])


# --------------------------------------------------------------------------------------------- CLI

_FLAGS: dict = {}


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_dict, config_flags

    from moe_jax import data

    evaluation = config_dict.ConfigDict({"data": data.default_config()})
    _FLAGS["config"] = config_flags.DEFINE_config_dict(
        "config", evaluation, "Only --config.data.* (the data to evaluate on); the model comes from --workdir.")
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "The run directory (moe_jax.main's --workdir).")
    _FLAGS["step"] = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    _FLAGS["output"] = flags.DEFINE_string("output", None, "Write the result as JSON here.")
    flags.mark_flags_as_required(["workdir"])


def evaluation_data_config(run_data_config, overrides: dict):
    """The run's data config with the `--config.data.*` overrides applied (the tokenizer stays the run's)."""
    data_config = run_data_config.copy_and_resolve_references()
    for key, value in overrides.items():
        name = key.removeprefix("data.")
        if name == "tokenizer":
            raise ValueError("data.tokenizer cannot be overridden: a run is evaluated with its own tokenizer")
        data_config[name] = value
    return data_config


def main(argv) -> int:
    del argv
    from absl import flags

    from moe_jax import checkpoint, models

    models.require_language_model(checkpoint.load_run_config(_FLAGS["workdir"].value), "moe_jax.evaluate")
    run, state, step = checkpoint.restore_run(_FLAGS["workdir"].value, _FLAGS["step"].value)
    overrides = dict(flags.FLAGS["config"].override_values)
    data_config = evaluation_data_config(run.config.data, overrides)
    result = evaluate_run(run, state, data_config)
    result.update(workdir=_FLAGS["workdir"].value, step=step, data=dict(source=data_config.source,
                                                                      paths=data_config.paths))
    dropped = ", ".join(f"{d:.4f}" for d in result["dropped_fraction"]) or "none (dense)"
    print(f"{_FLAGS['workdir'].value} at step {step} on {data_config.source} {data_config.paths}: "
          f"loss {result['loss']:.4f} nats/token, {result['bits_per_byte']:.4f} bits/byte "
          f"({result['tokens']} tokens, {result['bytes']} bytes, {result['documents']} documents); "
          f"dropped per MoE layer: {dropped}")
    if _FLAGS["output"].value:
        with open(_FLAGS["output"].value, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {_FLAGS['output'].value}")
    return 0


if __name__ == "__main__":
    from moe_jax import cli

    cli.run(main, define_flags=_define_flags)
