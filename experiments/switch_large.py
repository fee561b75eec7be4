"""Switch-Large on C4: T5-Large-sized with 128 top-1 experts in every other FFN layer (Fedus et al. 2022,
Table 9: d_model 1024, GEGLU d_ff 2816, 16 heads of 64, 24 + 24 layers, 128 experts, 26B parameters).

Same recipe as switch_base.py (top-1, capacity factor 1.25 / 2.0, load-balancing weight 1e-2, 0.1x init,
float32 router, jitter, Adafactor); the argument sets the expert count:

    python -m moe_jax.main --config=experiments/switch_large.py:experts=128 --workdir=gs://BUCKET/run \
        --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.tokenizer=PATH/TO/t5_spm.model

How this differs from the paper: decoder-only with 48 layers (24 of them MoE) in place of the 24 + 24
encoder-decoder, next-token loss in place of span corruption. With 128 experts the 24 MoE layers hold
24 x 128 x 3 x 1024 x 2816 = 26.6B expert parameters (paper: 26B in total). Mesh as switch_base.py,
(-1, min(E, 8), 1), plus FSDP: on a pod with data > 1 the float32 parameters and their Adafactor state are
split over 'data' too instead of replicated.

Expected: not run by us (needs a pod and C4); `python -m moe_jax.dryrun` reports its memory and FLOPs
(experiments/results/pod_dryrun.md).
"""

from experiments import switch_base


def get_config(arg: str = ""):
    c = switch_base.get_config(arg)
    c.model.d_model = 1024
    c.model.d_ff = 2816
    c.model.num_layers = 48
    c.model.num_heads = 16
    c.model.head_dim = 64
    c.mesh.fsdp = True
    return c
