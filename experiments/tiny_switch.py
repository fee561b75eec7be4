"""Tiny Switch Transformer on the built-in synthetic corpus: 8 top-1 experts in every other layer.

Reproduces, at laptop scale, the Switch Transformer's claim that adding experts at equal active FLOPs lowers
the loss at equal steps (Fedus et al. 2022). Same width, depth, d_ff, data and steps as tiny_dense.py; the
MoE layers use Switch's recipe (top-1, capacity factor 1.25 train / 2.0 eval, load-balancing weight 1e-2,
0.1x init, float32 router). All 4096 tokens of a step form one routing group: with 512-token groups the
router, which learns to send a domain's tokens to one expert, overflows experts and drops 17% of the tokens
(eval 1.688 instead of 1.611). On N devices the group is capped at the tokens per device (4096 / N).

    python -m moe_jax.main --config=experiments/tiny_switch.py --workdir=runs/tiny_switch

Expected (`python benchmarks/readme_numbers.py` at commit 790ec1d, 2-core CPU, 2026-12-01): eval CE 1.611
nats/token after 300 steps (floor 1.132, gap 0.479) vs 1.665 for tiny_dense; 2 m 30 s wall for the whole
command on an idle machine.
"""

from experiments import tiny_dense


def get_config(arg: str = ""):
    c = tiny_dense.get_config(arg)
    c.model.moe.num_experts = 8
    c.model.moe.k = 1
    c.model.moe.every = 2
    c.model.moe.capacity_factor = 1.25
    c.model.moe.eval_capacity_factor = 2.0
    c.model.moe.group_size = 4096
    c.model.moe.router = "top_k"
    c.model.moe.dispatcher = "index"
    c.model.moe.aux_loss_weight = 1e-2
    return c
