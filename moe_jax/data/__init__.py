"""Data: sources (synthetic, tfds, jsonl, text), tokenizers (byte, SentencePiece), packing, the pipeline."""

from moe_jax.data.pipeline import (BATCH_FORMATS, check_batch_format, default_config, entropy_floor,
                                   make_eval_batches, make_train_iterator)
from moe_jax.data.tokenizers import make_tokenizer

__all__ = ["BATCH_FORMATS", "check_batch_format", "default_config", "entropy_floor", "make_eval_batches",
           "make_tokenizer", "make_train_iterator"]
