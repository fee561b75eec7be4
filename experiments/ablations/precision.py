"""Selective precision (Switch paper, Table 2): bf16 model with a float32 router vs bf16 router vs all float32.

`model.dtype` sets the compute dtype of activations (parameters stay float32); `model.moe.router_dtype` the
dtype of the router matmul. In the "bf16 router" variant the router logits are computed in bfloat16 (the
softmax and routing math stay float32 in our code, so this is milder than the paper's all-bfloat16 router).
We report eval cross-entropy, the largest rise of the train loss (spikes), the largest router logit and speed.

    python -m moe_jax.sweep --sweep=experiments/ablations/precision.py --workdir=runs/ablations

Expected: see experiments/results/precision.md (2-core CPU, a few minutes per variant).
"""

import math

from moe_jax import sweep

COLUMNS = ("eval_ce", "max_train_loss_jump", "router_max_logit", "examples_per_sec")
PAPER = """
Fedus et al. 2022, Table 2 (32-expert Switch-Base, early in training; negative log perplexity, higher is
better): float32 -1.718 at 1160 examples/s; bfloat16 -3.780 [diverged] at 1390; selective precision (float32
router in a bfloat16 model) -1.716 at 1390.
"""


def variants(scale):
    b = sweep.base(scale, experts=32 if scale == "paper" else None)
    return {
        "all float32": b.override({"model.dtype": "float32", "model.moe.router_dtype": "float32"},
                                  paper="-1.718, 1160 ex/s"),
        "bf16 + f32 router": b.override({"model.dtype": "bfloat16", "model.moe.router_dtype": "float32"},
                                        paper="-1.716, 1390 ex/s (selective)"),
        "bf16 + bf16 router": b.override({"model.dtype": "bfloat16", "model.moe.router_dtype": "bfloat16"},
                                         paper="-3.780 [diverged], 1390 ex/s"),
    }


def analysis(results, scale):
    f32, sel, b16 = (results.get(n) for n in ("all float32", "bf16 + f32 router", "bf16 + bf16 router"))
    if not (f32 and sel and b16):
        return "Not enough runs for an analysis."
    def state(s):
        return f"diverged at step {s.last_step}" if s.status == "diverged" else f"eval CE {sweep.num(s.final_ce)}"
    text = [f"all float32: {state(f32)}, {f32.examples_per_sec:.0f} ex/s; selective (bf16 + f32 router): {state(sel)}, "
            f"{sel.examples_per_sec:.0f} ex/s; bf16 router: {state(b16)}, {b16.examples_per_sec:.0f} ex/s."]
    if b16.status == "diverged":
        text.append("As in the paper, the bfloat16 router diverges and the float32 router does not.")
    else:
        text.append(f"Unlike the paper, the bfloat16 router does not diverge here "
                    f"({b16.final_ce - sel.final_ce:+.4f} nats vs selective precision; largest train-loss rise "
                    f"{b16.max_train_loss_jump:.3f} vs {sel.max_train_loss_jump:.3f}). Likely reasons: only the "
                    f"router matmul is bfloat16 in our code (softmax, top-k and the losses stay float32), the model "
                    f"is tiny with 0.1× init and small logits (max |logit| {b16.router_max_logit:.1f}), and the run "
                    f"is short; the paper's divergence is a 32-expert Switch-Base with a bfloat16 softmax.")
    speed = sel.examples_per_sec / f32.examples_per_sec
    text.append(f"Speed: selective precision runs at {speed:.2f}× float32's examples/s "
                + ("(faster, as bfloat16 is in the paper: 1390 vs 1160)." if speed > 1.05 else
                   "(not faster; likely because a CPU without bfloat16 matrix units gains nothing from the narrower "
                   "type and pays for the conversions; the paper's 1.2× gain is on TPUs, built for bfloat16)."))
    if math.isfinite(sel.final_ce) and math.isfinite(f32.final_ce):
        text.append(f"Quality: selective precision is {sel.final_ce - f32.final_ce:+.4f} nats from float32 "
                    f"(paper: +0.002 in neg. log perplexity, i.e. the same).")
    return " ".join(text)
