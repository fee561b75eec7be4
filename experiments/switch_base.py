"""Switch-Base on C4: T5-Base with 128 top-1 experts in every other FFN layer (Fedus et al. 2022, Table 9).

Switch recipe: top-1 routing, capacity factor 1.25 in training and 2.0 in evaluation, load-balancing weight
1e-2, 0.1x init, float32 router in a bfloat16 model, router input jitter, Adafactor. The argument sets the
expert count (the paper's Figure 4 sweeps it):

    python -m moe_jax.main --config=experiments/switch_base.py:experts=128 --workdir=gs://BUCKET/run \
        --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.tokenizer=PATH/TO/t5_spm.model

How this differs from the paper: decoder-only with 24 layers (12 of them MoE) in place of the 12 + 12
encoder-decoder, next-token loss in place of span corruption (see t5_base.py). With 128 experts the
12 MoE layers hold 12 x 128 x 3 x 768 x 2048 = 7.2B expert parameters (paper: 7B in total). The jitter
epsilon (1e-2) is our choice: the paper does not state its value. Expert axis of the mesh: 8 by default
(each device holds E/8 experts); change `mesh.shape` for your pod, e.g. (-1, 16, 1).

Expected: not run by us (needs a pod and C4); `python -m moe_jax.dryrun` reports its memory and FLOPs.
"""

from experiments import t5_base


def parse_arg(arg: str) -> dict:
    """"experts=128" -> {"experts": 128}; an empty argument gives the defaults."""
    values = {}
    for item in filter(None, arg.split(",")):
        key, _, value = item.partition("=")
        if key != "experts" or not value.isdigit():
            raise ValueError(f"config argument {item!r}: expected experts=<int>, e.g. switch_base.py:experts=128")
        values[key] = int(value)
    return values


def get_config(arg: str = ""):
    experts = parse_arg(arg).get("experts", 128)
    c = t5_base.get_config()
    c.model.moe.num_experts = experts
    c.model.moe.k = 1
    c.model.moe.every = 2
    c.model.moe.router = "top_k"
    c.model.moe.dispatcher = "einsum"
    c.model.moe.capacity_factor = 1.25
    c.model.moe.eval_capacity_factor = 2.0
    c.model.moe.group_size = 4096
    c.model.moe.aux_loss_weight = 1e-2
    c.model.moe.z_loss_weight = 0.0
    c.model.moe.jitter = 1e-2
    c.model.moe.router_dtype = "float32"
    c.mesh.shape = (-1, min(experts, 8), 1)
    return c
