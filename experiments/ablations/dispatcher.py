"""Dispatcher: einsum vs index vs dropless on the same tiny Switch model: same loss curve, different speed.

`einsum` (one-hot [G,S,E,C] dispatch/combine tensors, the TPU path) and `index` (gather/scatter by slot) execute
the same Routing, so their loss curves must agree to float noise. `dropless` routes with no capacity (nothing
dropped), so its curve may differ by what dropping costs; its speed shows what the grouped matmul costs on CPU.

    python -m moe_jax.sweep --sweep=experiments/ablations/dispatcher.py --workdir=runs/ablations

Expected: see experiments/results/dispatcher.md (2-core CPU, a few minutes per variant).
"""

import math

from moe_jax import sweep

COLUMNS = ("eval_ce", "examples_per_sec", "train_seconds", "dropped_fraction")
PAPER = """
Not a paper ablation: the Switch paper uses the einsum (Mesh TensorFlow) formulation only. Footnote 5 of §2.3
notes that speed depends on the implementation as well as the algorithm.
"""


def variants(scale):
    return {d: sweep.base(scale).override({"model.moe.dispatcher": d}, note="no capacity" if d == "dropless" else "")
            for d in ("einsum", "index", "dropless")}


def analysis(results, scale):
    e, i, d = (results.get(n) for n in ("einsum", "index", "dropless"))
    if not (e and i) or not (math.isfinite(e.final_ce) and math.isfinite(i.final_ce)):
        return "Not enough finished runs for an analysis."
    common = sorted(set(e.eval_steps) & set(i.eval_steps))
    gap = max(abs(e.ce_at(s) - i.ce_at(s)) for s in common)
    verdict = ("the same curve to noise: both execute the same routing, and float rounding differences compound "
               "over training" if gap < 1e-2 else "more than rounding noise")
    text = [f"einsum and index differ by at most {gap:.2e} nats in eval CE over the {len(common)} evaluations "
            f"({verdict}); "
            f"index runs at {i.examples_per_sec / e.examples_per_sec:.2f}× einsum's examples/s "
            f"({i.examples_per_sec:.0f} vs {e.examples_per_sec:.0f})."]
    if d and math.isfinite(d.final_ce):
        text.append(f"dropless ends at {d.final_ce:.4f} vs {i.final_ce:.4f} for index (it drops nothing; index "
                    f"dropped {100 * i.dropped_fraction:.1f}% of tokens in training), at "
                    f"{d.examples_per_sec / i.examples_per_sec:.2f}× index's speed.")
    text.append("Speeds are from a shared 2-core CPU: differences below ~10% are within load noise.")
    return " ".join(text)
