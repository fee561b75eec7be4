"""Number of experts (Switch paper, Figure 4) on the C4 recipe: the C4 sample, bytes, d 64, 1800 steps, 3 seeds.

experiments/ablations/num_experts.py's variants and analysis with experiments/c4_tiny_*.py's width, data, length
and evaluation (experiments/ablations/on_c4.py):

    python -m moe_jax.sweep --sweep=experiments/ablations/num_experts_c4.py --workdir=runs/ablations

Expected: see experiments/results/num_experts_c4.md (2-core CPU, 13-16 minutes a run beside a full-width
study run, 55-65 examples/s).
"""

from experiments.ablations import num_experts
from experiments.ablations.on_c4 import c4_twin

COLUMNS = num_experts.COLUMNS
PAPER = num_experts.PAPER
variants, analysis = c4_twin(num_experts, corpus="the C4 sample (bytes)")
