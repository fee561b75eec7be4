"""Sparse upcycling on the C4 sample (bytes): experiments/ablations/upcycle.py's experiment with 300-step dense
bases (the real-text study's `dense seed <n>` configs) and 150 more steps each way; 3 seeds. Run it through
that file, which writes the upcycled runs between the two sweep passes:

    python experiments/ablations/upcycle.py --corpus=c4 --workdir=runs/ablations

(`python -m moe_jax.sweep --sweep=experiments/ablations/upcycle_c4.py --workdir=runs/ablations` alone would
train the upcycled variants from scratch.)

Expected: see experiments/results/upcycle_c4.md (2-core CPU, 2-5 minutes per run, 12 runs).
"""

from experiments.ablations import upcycle

SETTING = upcycle.SETTINGS["c4"]
COLUMNS = upcycle.COLUMNS
PAPER = upcycle.PAPER


def variants(scale):
    return upcycle.variants(scale, SETTING)


def analysis(results, scale):
    return upcycle.analysis(results, scale, SETTING)
