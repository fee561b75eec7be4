"""MoE-Base on C4: Switch-Base with top-2 routing (GShard-style), the paper's Table 1 comparison.

Same model as switch_base.py but each token goes to its 2 highest-probability experts, which doubles the
expert FLOPs per token and, at equal capacity factor, the slots per expert:

    python -m moe_jax.main --config=experiments/moe_base.py:experts=128 --workdir=gs://BUCKET/run

Paper (Table 1, 128 experts, 100k steps): MoE-Base -1.559 at capacity factor 1.25 vs Switch-Base -1.553,
790 vs 910 examples/s. Differences from the paper as in switch_base.py.

Expected: not run by us (needs a pod and C4); `python -m moe_jax.dryrun` reports its memory and FLOPs.
"""

from experiments import switch_base


def get_config(arg: str = ""):
    c = switch_base.get_config(arg)
    c.model.moe.k = 2
    return c
