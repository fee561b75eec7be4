"""Tiny Switch LM on real text (C4, SentencePiece 8k): tiny_switch.py's 8 top-1 experts in every other layer,
with c4_tiny_dense.py's data, vocabulary, length and evaluation (equal active FLOPs, same everything else).

    python -m moe_jax.main --config=experiments/c4_tiny_switch.py --workdir=runs/c4_tiny_switch \
        --config.data.paths=c4-train.00000-of-01024.json.gz

Expected (experiments/results/c4_study.md, `switch-8 sp8k 900 steps`, the C4 sample, 3 seeds, 2-core CPU,
8-15 minutes): held-out 5.4432 +- 0.0083 nats/token (1.4300 nats/byte), level with c4_tiny_dense.py's
5.4432 +- 0.0073 (per seed within 0.004); 0.7% of tokens dropped at capacity factor 1.25.
"""

from experiments import c4_tiny_dense, tiny_switch


def get_config(arg: str = ""):
    return c4_tiny_dense.real_text(tiny_switch.get_config(arg))
