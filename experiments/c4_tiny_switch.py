"""Tiny Switch LM on real text (C4, bytes): tiny_switch.py's 8 top-1 experts in every other layer, with
c4_tiny_dense.py's data, length and evaluation (equal active FLOPs, same everything else).

    python -m moe_jax.main --config=experiments/c4_tiny_switch.py --workdir=runs/c4_tiny_switch \
        --config.data.paths=c4-train.00000-of-01024.json.gz

Expected (experiments/results/c4_byte.md, the C4 sample, 3 seeds, 2-core CPU, about 9 minutes): held-out
1.6622 +- 0.0024 nats/byte, behind c4_tiny_dense's 1.6524 +- 0.0032 by 0.0097 (more than 3 seed standard
deviations), with the gap narrowing from 0.0127 at 300 steps; 0.3% of tokens dropped at capacity factor 1.25.
The real-text study (experiments/ablations/c4_study.py) is looking for the recipe where Switch wins.
"""

from experiments import c4_tiny_dense, tiny_switch


def get_config(arg: str = ""):
    return c4_tiny_dense.real_text(tiny_switch.get_config(arg))
