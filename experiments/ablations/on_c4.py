"""The headline sweeps on the C4 recipe: a synthetic-corpus sweep's variants with the width, data, length and
evaluation of experiments/c4_tiny_dense.py / c4_tiny_switch.py (d_model 64 / d_ff 256, the C4 sample, bytes, 1800
steps, a fixed 5% of the documents held out, 16 eval batches), everything else as the sweep sets it. Used by
num_experts_c4.py, capacity_factor_c4.py and init_scale_c4.py; not a sweep itself.

Every run evaluates EVALS times, as the C4 study's runs do: the points these sweeps share with the recipe (dense,
8 top-1 experts at capacity factor 1.25, 0.1x init) are then the same configs as the study's `d 64 1800 steps`
runs, which the sweep runner reuses (from their run dirs or their committed records) instead of retraining.
"""

import math

from experiments import c4_tiny_dense
from experiments.ablations.c4_byte import C4_SAMPLE

EVALS = 5  # c4_study's cadence (sweep.base(..., evals=5)), so the shared points are the study's runs


def recipe_overrides() -> dict:
    """The recipe's width, data, vocabulary and evaluation settings, reading the C4 sample."""
    recipe = c4_tiny_dense.get_config()
    return {**{f"data.{k}": v for k, v in c4_tiny_dense.REAL_TEXT.items()}, "data.paths": str(C4_SAMPLE),
            **{f"model.{k}": v for k, v in c4_tiny_dense.WIDTH.items()},
            "model.vocab_size": recipe.model.vocab_size, "train.eval_steps": recipe.train.eval_steps}


def recipe_steps() -> int:
    return int(c4_tiny_dense.get_config().train.steps)


def eval_every() -> int:
    return recipe_steps() // EVALS


def stretch(module) -> float:
    """How many times longer the C4 recipe runs than `module`'s laptop sweep (every variant has one length)."""
    (steps,) = {v.overrides["train.steps"] for v in module.variants("laptop").values()}
    return recipe_steps() / steps


def first_eval_at_or_after(step: float) -> int:
    """The first step at which the C4 runs evaluate, at or after `step`."""
    return math.ceil(step / eval_every()) * eval_every()


def variants_on_c4(module, scale) -> dict:
    """`module.variants(scale)` moved onto the C4 recipe: its length, EVALS evaluations, a checkpoint at the
    end. Laptop scale only: the paper-scale sweeps already name C4-sized runs and keep their own data."""
    chosen = module.variants(scale)
    if scale != "laptop":
        return chosen
    steps = recipe_steps()
    return {name: variant.override({**recipe_overrides(), "train.steps": steps, "train.checkpoint_every": steps,
                                    "train.eval_every": eval_every(), "train.log_every": 10})
            for name, variant in chosen.items()}


def c4_twin(module, **analysis_kwargs):
    """(variants, analysis) of `module`'s sweep on the C4 recipe, for a sweep file to bind; `analysis_kwargs`
    go to `module.analysis`."""

    def variants(scale):
        return variants_on_c4(module, scale)

    def analysis(results, scale):
        return module.analysis(results, scale, **analysis_kwargs)

    return variants, analysis
