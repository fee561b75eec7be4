"""Capacity factor x top-1/top-2 (Switch paper, Table 1) on the C4 recipe: the C4 sample, bytes, d_model 64,
1800 steps, 3 seeds.

experiments/ablations/capacity_factor.py's variants and analysis with experiments/c4_tiny_*.py's width, data, length
and evaluation (experiments/ablations/on_c4.py):

    python -m moe_jax.sweep --sweep=experiments/ablations/capacity_factor_c4.py --workdir=runs/ablations

Expected: see experiments/results/capacity_factor_c4.md (2-core CPU, 13-16 minutes a run beside a full-width
study run, 55-65 examples/s).
"""

from experiments.ablations import capacity_factor
from experiments.ablations.on_c4 import c4_twin

COLUMNS = capacity_factor.COLUMNS
PAPER = capacity_factor.PAPER
variants, analysis = c4_twin(capacity_factor)
