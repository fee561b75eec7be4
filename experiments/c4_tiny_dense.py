"""Tiny dense LM on real text (C4, SentencePiece 8k): the dense half of the real-text recipe, twin of
c4_tiny_switch.py.

tiny_dense.py's model (d_model 128, d_ff 512, 4 layers, 4 heads) on C4 documents cut into the pieces of a
SentencePiece unigram vocabulary of 8,000 pieces (experiments/tokenizers/c4_sample_unigram_8000.model, trained
on the training split of the C4 sample; about 3.8 bytes a piece), 900 steps of 32 x 128 pieces (14 M training
bytes), a seeded 5% of the documents held out (16 eval batches). The only thing to give is the data: C4's
released shards are the `en/c4-train.*-of-01024.json.gz` files of the allenai/c4 dataset on the Hugging Face hub
(356 MB each), or any jsonl.gz with a `text` field:

    python -m moe_jax.main --config=experiments/c4_tiny_dense.py --workdir=runs/c4_tiny_dense \
        --config.data.paths=c4-train.00000-of-01024.json.gz

A vocabulary of your own text: `python -m moe_jax.data.tokenizers train --config=experiments/c4_tiny_dense.py
--config.data.paths=... --vocab_size=8000 --output=my_spm`, then `--config.data.tokenizer=my_spm.model`.

Expected (experiments/results/c4_study.md, `dense sp8k 900 steps`, the 2,444-document C4 sample
`../shared/data/c4_sample.jsonl.gz`, 3 seeds, 2-core CPU, 8-15 minutes): held-out 5.4432 +- 0.0073 nats/token
(1.4300 nats/byte), level with c4_tiny_switch's 5.4432 +- 0.0083. The study's best real-text recipe for Switch,
and still no Switch win; see the README's Results.
"""

import pathlib

from experiments import tiny_dense

TOKENIZER = pathlib.Path(__file__).resolve().parent / "tokenizers" / "c4_sample_unigram_8000.model"
VOCAB_SIZE = 8000  # the pieces of TOKENIZER
REAL_TEXT = dict(source="jsonl", paths="", eval_fraction=0.05, tokenizer=str(TOKENIZER))


def real_text(c):
    """tiny_* settings -> the real-text recipe's data, length and evaluation."""
    c.data.update(REAL_TEXT)
    c.model.vocab_size = VOCAB_SIZE
    c.train.update(steps=900, eval_steps=16, eval_every=180, checkpoint_every=300)
    return c


def get_config(arg: str = ""):
    return real_text(tiny_dense.get_config(arg))
