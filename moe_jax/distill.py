"""Distillation into any student (Switch Transformer §4, Tables 6-7): a trained teacher run in the same jitted
train step as the student.

    python -m moe_jax.main --config=experiments/tiny_dense.py --workdir=runs/distilled \
        --config.distill.teacher_workdir=runs/tiny_switch --config.distill.alpha=0.25 \
        [--config.distill.init_from_teacher=True --config.distill.teacher_step=N]

The student's loss is `alpha * CE(teacher probabilities) + (1 - alpha) * CE(ground truth)` (+ the student's own
MoE losses), both cross-entropies weighted by the batch's loss weights; the paper mixes 0.25 of the teacher's
probabilities with 0.75 of the ground truth. The teacher runs in evaluation mode (its eval capacity factor, no
dropout), its parameters are placed on the student's mesh with the student's sharding rules, and its
forward pass is part of the one compiled step (no second process). Evaluation and the logged `train/ce` stay
the ground-truth CE; `train/distill_ce` is the CE against the teacher's probabilities and `train/teacher_ce`
the teacher's own CE on the batch. `init_from_teacher` starts a new run (not a resumed one) with every
non-expert weight copied from the teacher where the layouts agree (embeddings, attention, norms, the dense
MLPs of layers that are dense in both; per-layer keys as in `moe_jax.upcycle`); experts and routers stay
freshly initialised. Off by default (`distill.teacher_workdir=""`): the train step is then the plain one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

# Where the loss weights of each batch format are (the distillation CE is weighted like the model's own CE).
_LOSS_WEIGHTS = {"lm": "loss_weights", "span_corruption": "decoder_loss_weights"}


def default_config() -> ml_collections.ConfigDict:
    """The `distill` section of a run config; off unless `teacher_workdir` is set."""
    c = ml_collections.ConfigDict()
    c.teacher_workdir = ""  # a trained run directory; "" = no distillation
    c.teacher_step = ml_collections.config_dict.placeholder(int)  # None: the teacher's latest checkpoint
    c.alpha = 0.25  # weight of the teacher's probabilities in the target mixture (Switch §4: 0.25)
    c.init_from_teacher = False  # a new run starts with the teacher's non-expert weights
    return c


def enabled(cfg) -> bool:
    return bool(cfg.get("distill") and cfg.distill.teacher_workdir)


def validate(cfg) -> None:
    """The `distill.*` checks that need no file (config_validation calls this); the teacher run itself is
    checked by `load_teacher`, before a run writes anything."""
    if "distill" not in cfg:
        return
    d = cfg.distill
    if not isinstance(d.alpha, (int, float)) or not 0.0 <= d.alpha <= 1.0:
        raise ValueError(f"distill.alpha={d.alpha!r} must be in [0, 1]: the teacher's share of the target mixture")
    if not isinstance(d.init_from_teacher, bool):
        raise ValueError(f"distill.init_from_teacher={d.init_from_teacher!r} must be True or False")
    if d.init_from_teacher and not d.teacher_workdir:
        raise ValueError("distill.init_from_teacher=True needs distill.teacher_workdir (the teacher run)")


# --------------------------------------------------------------------------------------------- loss


def soft_cross_entropy(logits_BLV: jax.Array, probs_BLV: jax.Array, weights_BL: Optional[jax.Array]) -> jax.Array:
    """Mean over weighted tokens of -sum_v p_v log softmax(logits)_v (float32)."""
    log_q = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    per_token = -jnp.sum(probs_BLV.astype(jnp.float32) * log_q, axis=-1)
    weights = jnp.ones(per_token.shape, jnp.float32) if weights_BL is None else weights_BL.astype(jnp.float32)
    return jnp.sum(per_token * weights) / jnp.maximum(weights.sum(), 1e-8)


class _LogitsTap:
    """Stands in for a model inside the family's `loss_fn` and keeps the logits it returns: the family's loss
    is the one place that knows how its model reads a batch, so distillation does not repeat it."""

    def __init__(self, model):
        self.model = model
        self.logits = None

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.logits = out[0]
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


def forward(loss_fn, model, batch, **kwargs):
    """(loss, metrics, logits) of the family's `loss_fn` on `model`."""
    tap = _LogitsTap(model)
    loss, metrics = loss_fn(tap, batch, **kwargs)
    return loss, metrics, tap.logits


def teacher_targets(teacher_family, teacher_model, batch):
    """(teacher probabilities [B, L, V] float32, the teacher's CE on the batch), in evaluation mode, no gradient."""
    _, metrics, logits = forward(teacher_family.loss_fn, teacher_model, batch, deterministic=True,
                                 aux_loss_weight=0.0, z_loss_weight=0.0)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jax.lax.stop_gradient(probs), jax.lax.stop_gradient(metrics["ce"])


def student_loss(family, model, batch, teacher_probs, teacher_ce, *, alpha: float, aux_loss_weight: float,
                 z_loss_weight: float):
    """alpha * CE(teacher probabilities) + (1 - alpha) * CE(ground truth) + the student's MoE losses ->
    (loss, metrics): the family's metrics plus `distill_ce` and `teacher_ce`."""
    loss, metrics, logits = forward(family.loss_fn, model, batch, deterministic=False,
                                    aux_loss_weight=aux_loss_weight, z_loss_weight=z_loss_weight)
    distill_ce = soft_cross_entropy(logits, teacher_probs, batch.get(_LOSS_WEIGHTS[family.batch_format]))
    loss = loss + alpha * (distill_ce - metrics["ce"])  # the CE part becomes alpha * soft + (1 - alpha) * hard
    return loss, dict(metrics, loss=loss, distill_ce=distill_ce, teacher_ce=teacher_ce)


def distillation_loss(family, model, teacher_model, batch, *, alpha: float, aux_loss_weight: float,
                      z_loss_weight: float, teacher_family=None):
    """`student_loss` against `teacher_model`'s probabilities on `batch` (`teacher_family` defaults to the
    student's `family`); the train step computes the teacher's part outside the gradient."""
    probs, teacher_ce = teacher_targets(family if teacher_family is None else teacher_family, teacher_model, batch)
    return student_loss(family, model, batch, probs, teacher_ce, alpha=alpha, aux_loss_weight=aux_loss_weight,
                        z_loss_weight=z_loss_weight)


# --------------------------------------------------------------------------------------------- teacher


@dataclasses.dataclass
class Teacher:
    """A restored teacher placed on the student's mesh."""

    workdir: str
    step: int
    config: ml_collections.ConfigDict  # the teacher's run config, its routing groups fitted to the student's batch
    graphdef: Any
    state: Any  # nnx.State of the teacher model, sharded like the student (the student's rules on its mesh)
    shardings: Any


def load_teacher(run) -> Teacher:
    """Restore the teacher of `run.config.distill` onto `run.mesh`. ValueError / FileNotFoundError naming
    `distill.teacher_workdir` when the teacher cannot teach this student (another vocabulary or batch format)."""
    from moe_jax import checkpoint, config_validation, models, sharding, train

    cfg = run.config
    workdir = cfg.distill.teacher_workdir
    try:
        teacher_cfg = checkpoint.load_run_config(workdir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"distill.teacher_workdir: {error}") from None
    family = models.get(teacher_cfg)
    if family.batch_format != run.family.batch_format:
        raise ValueError(f"distill.teacher_workdir={workdir}: the teacher ({models.name_of(teacher_cfg)}) reads "
                         f"{family.batch_format!r} batches, the student {run.family.batch_format!r}")
    if teacher_cfg.model.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"distill.teacher_workdir={workdir}: the teacher's model.vocab_size="
                         f"{teacher_cfg.model.vocab_size}, the student's {cfg.model.vocab_size}; distillation "
                         f"matches their distributions over one vocabulary")
    # The teacher reads the student's batches on the student's devices: route in groups that fit them.
    teacher_cfg.data = cfg.data.copy_and_resolve_references()
    teacher_cfg.mesh = cfg.mesh.copy_and_resolve_references()
    teacher_cfg.distill = default_config()
    teacher_cfg = config_validation.resolve(teacher_cfg, num_devices=run.mesh.size)
    model, _ = checkpoint.restore_model(workdir, cfg.distill.teacher_step, devices=list(run.mesh.devices.flat))
    step = _restored_step(workdir, cfg.distill.teacher_step)
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: family.create(teacher_cfg.model, nnx.Rngs(params=0, dropout=1))))
    shardings = train.state_shardings_for(abstract, run.mesh, sharding.rules_from_config(cfg))
    restored = nnx.state(model)
    leaves, shard_leaves = jax.tree.leaves(restored), jax.tree.leaves(shardings)
    if len(leaves) != len(shard_leaves):
        raise ValueError(f"distill.teacher_workdir={workdir}: the restored teacher does not match its own config")
    placed = [jax.device_put(leaf, s) for leaf, s in zip(leaves, shard_leaves)]
    state = jax.tree.unflatten(jax.tree.structure(abstract), placed)
    return Teacher(str(workdir), step, teacher_cfg, graphdef, state, shardings)


def _restored_step(workdir, step: Optional[int]) -> int:
    from etils import epath

    from moe_jax import checkpoint

    if step is not None:
        return step
    checkpointer = checkpoint.Checkpointer(epath.Path(workdir) / "checkpoints")
    latest = checkpointer.latest_step()
    checkpointer.close()
    return latest


def init_student(student_model, teacher_model) -> list[str]:
    """Copy the teacher's non-expert weights into the student in place where the per-layer keys and shapes
    agree (not experts, routers or shared experts: anything of an MoE layer's FFN); returns the keys copied."""
    from moe_jax import upcycle

    source, target = upcycle.layer_params(teacher_model), upcycle.layer_params(student_model)

    def routed(key, params):
        return key in params and ("expert" in params[key].names or _is_moe_ffn(key, params))

    values = {key: source[key].value for key, param in target.items()
              if key in source and source[key].value.shape == param.value.shape
              and not routed(key, source) and not routed(key, target)}
    upcycle.set_layer_params(student_model, values)
    return sorted(upcycle.key_name(k) for k in values)


def _is_moe_ffn(key, params) -> bool:
    """Whether `key` is a weight of an MoE layer's FFN (its layer's `ffn` holds an expert weight)."""
    if "ffn" not in key:
        return False
    prefix = key[:key.index("ffn") + 1]
    return any(k[:len(prefix)] == prefix and "expert" in p.names for k, p in params.items())


def make_train_step(run, teacher: Teacher):
    """The jitted distillation step `(state, batch) -> (state, metrics)` of `run` with `teacher`, compiled with
    the teacher's state as an argument in its shardings (not a constant baked into the program)."""
    from moe_jax import models, train

    cfg = run.config
    weights = train._loss_weights(cfg)  # noqa: SLF001  (the student's MoE loss weights, as the plain step)
    teacher_family = models.get(teacher.config)

    def teacher_part(batch, teacher_state):
        teacher_model = nnx.merge(teacher.graphdef, teacher_state)
        teacher_model.eval()
        return teacher_targets(teacher_family, teacher_model, batch)

    def loss(model, batch, teacher_probs, teacher_ce):
        return student_loss(run.family, model, batch, teacher_probs, teacher_ce, alpha=float(cfg.distill.alpha),
                            **weights)

    step = jax.jit(functools.partial(train.make_train_step(cfg, loss=loss, before_gradient=teacher_part),
                                     run.graphdef),
                   in_shardings=(run.state_shardings, run.batch_sharding, teacher.shardings),
                   out_shardings=(run.state_shardings, None), donate_argnums=0)
    return lambda state, batch: step(state, batch, teacher.state)


def attach(run, teacher: Teacher, state, *, fresh: bool):
    """(train step, state) for the loop: the distillation step, and for a new run with `init_from_teacher` the
    state with the teacher's non-expert weights (the optimizer state is untouched: it starts at zero)."""
    d = run.config.distill
    words = f"distilling from {teacher.workdir} at step {teacher.step} with alpha={d.alpha}"
    if fresh and d.init_from_teacher:
        model, optimizer = nnx.merge(run.graphdef, state)
        with jax.set_mesh(run.mesh):
            copied = init_student(model, nnx.merge(teacher.graphdef, teacher.state))
        state = nnx.state((model, optimizer))
        words += f"; {len(copied)} non-expert weights initialised from the teacher"
    if jax.process_index() == 0:
        print(words, flush=True)
    return make_train_step(run, teacher), state
