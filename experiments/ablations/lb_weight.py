"""Load-balancing loss weight α (Switch paper §2.2): 0, 1e-3, 1e-2, 1e-1 on the tiny Switch model.

We report eval cross-entropy, the coefficient of variation of the per-expert load in training (0 = perfectly
balanced) and the dropped fraction (an unbalanced router overflows its experts' capacity).

    python -m moe_jax.sweep --sweep=experiments/ablations/lb_weight.py --workdir=runs/ablations

Expected: see experiments/results/lb_weight.md (2-core CPU, a few minutes per variant).
"""

import math

from moe_jax import sweep

WEIGHTS = (0.0, 1e-3, 1e-2, 1e-1)
COLUMNS = ("eval_ce", "load_cv", "dropped_fraction", "examples_per_sec")
PAPER = """
Fedus et al. 2022, §2.2: "throughout this work we use an α = 10−2 which was sufficiently large to ensure load
balancing while small enough to not to overwhelm the primary cross-entropy objective. We swept hyper-parameter
ranges of α from 10−1 to 10−5 in powers of 10 and found 10−2 balanced load quickly without interfering with
training loss." No per-α numbers are given.
"""


def variants(scale):
    return {f"lb {w:g}": sweep.base(scale).override({"model.moe.aux_loss_weight": w},
                                                   paper="the paper's choice" if w == 1e-2 else "")
            for w in WEIGHTS}


def analysis(results, scale):
    done = {n: s for n, s in results.items() if math.isfinite(s.final_ce)}
    if len(done) < 2:
        return "Not enough finished runs for an analysis."
    text = ["Load-balancing weight α: eval CE / load CV / dropped: " + "; ".join(
        f"{n} {s.final_ce:.4f} / {s.load_cv:.2f} / {100 * s.dropped_fraction:.1f}%" for n, s in done.items()) + "."]
    zero, paper = done.get("lb 0"), done.get("lb 0.01")
    if zero and paper:
        collapsed = zero.load_cv > 2 * paper.load_cv
        text.append(f"Without the loss the load is {'much' if collapsed else 'only a little'} less balanced "
                    f"(CV {zero.load_cv:.2f} vs {paper.load_cv:.2f} at α=1e-2)"
                    + (", the collapse the paper's loss is there to prevent" if collapsed else
                       ": at this scale and length the router does not collapse on its own") + ".")
        text.append(f"α=1e-2 {'improves' if paper.final_ce < zero.final_ce else 'does not improve'} the loss over "
                    f"α=0 ({paper.final_ce:.4f} vs {zero.final_ce:.4f}).")
    big = done.get("lb 0.1")
    if big and paper:
        text.append(f"α=1e-1 is {big.final_ce - paper.final_ce:+.4f} nats from α=1e-2: "
                    + ("it starts to interfere with the cross-entropy, consistent with the paper's choice of 1e-2."
                       if big.final_ce > paper.final_ce + 0.005 else
                       "no sign of the interference that made the paper stop at 1e-2 (within one-seed noise)."))
    return " ".join(text)
