"""Tiny dense LM on real text (C4, bytes): the dense half of the real-text recipe, twin of c4_tiny_switch.py.

tiny_dense.py's model at half the width (d_model 64, d_ff 256, 4 layers, 4 heads of 16) on C4 documents read as
UTF-8 bytes (259 ids), 1800 steps of 32 x 128 bytes (7.4M training bytes), a seeded 5% of the documents held out
(16 eval batches). The only thing to give is the data: C4's released shards are the
`en/c4-train.*-of-01024.json.gz` files of the allenai/c4 dataset on the Hugging Face hub (356 MB each), or any
jsonl.gz with a `text` field:

    python -m moe_jax.main --config=experiments/c4_tiny_dense.py --workdir=runs/c4_tiny_dense \
        --config.data.paths=c4-train.00000-of-01024.json.gz

Expected (experiments/results/c4_study.md, `dense d 64 1800 steps`, the 2,444-document C4 sample
`../shared/data/c4_sample.jsonl.gz`, 5 seeds, 2-core CPU, 8-9 minutes beside another run at the study's
115-121 examples/s): held-out 1.6171 +- 0.0048 nats/byte, behind c4_tiny_switch's 1.5881 +- 0.0043 in every
seed. See the README's Results.
"""

from experiments import tiny_dense

REAL_TEXT = dict(source="jsonl", paths="", eval_fraction=0.05, tokenizer="byte")
WIDTH = dict(d_model=64, d_ff=256)  # tiny_* at half the width: more training tokens per parameter


def real_text(c):
    """tiny_* settings -> the real-text recipe's width, data, length and evaluation."""
    c.data.update(REAL_TEXT)
    c.model.update(WIDTH, vocab_size=259)
    c.train.update(steps=1800, eval_steps=16, eval_every=360, checkpoint_every=300)
    return c


def get_config(arg: str = ""):
    return real_text(tiny_dense.get_config(arg))
