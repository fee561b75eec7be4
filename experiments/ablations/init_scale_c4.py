"""Initialisation scale (Switch paper, Table 3) on the C4 recipe: the C4 sample, bytes, d 64, 1800 steps, 3 seeds.

experiments/ablations/init_scale.py's variants and analysis with experiments/c4_tiny_*.py's width, data, length
and evaluation (experiments/ablations/on_c4.py):

    python -m moe_jax.sweep --sweep=experiments/ablations/init_scale_c4.py --workdir=runs/ablations

Expected: see experiments/results/init_scale_c4.md (2-core CPU, 13-16 minutes a run beside a full-width
study run, 55-65 examples/s).
"""

from experiments.ablations import init_scale
from experiments.ablations.on_c4 import c4_twin, first_eval_at_or_after, stretch

COLUMNS = init_scale.COLUMNS
PAPER = init_scale.PAPER
# "Early": the first evaluation at or after the synthetic sweep's share of the run (a third: step 600 -> 720).
variants, analysis = c4_twin(init_scale, early_step=first_eval_at_or_after(init_scale.EARLY_STEP * stretch(init_scale)))
