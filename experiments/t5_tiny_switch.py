"""Tiny Switch encoder-decoder with span corruption: 8 top-1 experts in every other FFN of both stacks.

Same model, data and steps as t5_tiny_dense.py, with tiny_switch.py's MoE recipe (top-1, capacity factor 1.25
train / 2.0 eval, load-balancing weight 1e-2, 0.1x init, float32 router, index dispatcher): the setting of the
Switch paper's Tables 1 and 9 at laptop scale. Encoder and decoder route separately; each routes all of its
tokens on a device as one group (the decoder's rows are the 29 targets, so its group is smaller).

    python -m moe_jax.main --config=experiments/t5_tiny_switch.py --workdir=runs/t5_tiny_switch

Expected: see the README's "The encoder-decoder and span corruption" (2-core CPU, a few minutes).
"""

from experiments import t5_tiny_dense, tiny_switch


def get_config(arg: str = ""):
    c = t5_tiny_dense.get_config(arg)
    c.model.moe = tiny_switch.get_config(arg).model.moe
    c.model.moe.encoder_every = None
    c.model.moe.decoder_every = None
    c.model.moe.decoder_group_size = None
    return c
