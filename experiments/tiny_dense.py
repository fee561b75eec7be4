"""Tiny dense baseline on the built-in synthetic corpus: the reference point for tiny_switch.py.

Reproduces: nothing from a paper; it is the equal-active-FLOPs dense twin of tiny_switch (same width, depth,
d_ff, data, optimizer and steps; every FFN dense).

    python -m moe_jax.main --config=experiments/tiny_dense.py --workdir=runs/tiny_dense

Expected (`python benchmarks/readme_numbers.py` at commit 790ec1d, 2-core CPU, 2026-12-01): eval CE 1.665
nats/token after 300 steps (floor 1.132, gap 0.533) vs 1.611 for tiny_switch; 2 m 30 s wall for the whole
command on an idle machine. (A tuning run before the data-shard change gave
1.731; see the README.)
"""

from moe_jax import train


def get_config(arg: str = ""):
    del arg
    c = train.default_config()
    c.model.d_model = 128
    c.model.d_ff = 512
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.moe.num_experts = 0
    c.data.source = "synthetic"
    c.model.vocab_size = c.data.synthetic.vocab_size
    c.data.seq_len = 128
    c.data.batch_size = 32
    c.train.steps = 300
    c.train.optimizer = "adamw"
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 30
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    return c
