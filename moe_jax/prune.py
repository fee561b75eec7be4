"""Expert pruning and merging: keep N experts of every MoE layer of a trained run and write a new run.

    python -m moe_jax.prune --workdir=runs/tiny_switch --keep=6 [--method=load|router_mass|merge] \
        --output=runs/tiny_switch_keep6 [--step=N --num_batches=8]

Each MoE layer's experts are scored on `--num_batches` held-out batches that follow the run's own evaluation
batches (`data.make_eval_batches`; the first `train.eval_steps` are the run's eval set, on which the eval
cross-entropy before and after pruning is measured, so scoring and measuring never see the same tokens),
through the model's own forward pass (`analysis.collect`):

  load         the share of the tokens' top-k choices each expert receives (before capacity);
  router_mass  the router probability (gate weight) the tokens give each expert among their choices;
  merge        keeps the N experts of highest load and averages each removed expert into the kept expert whose
               weights are most similar (cosine of the flattened `wi`, `wi_gate`, `wo`), weighted by load.

The N experts kept keep their order; the router's columns (and `noise_kernel` / `selection_bias`) are taken
with them, so the router is renumbered 0..N-1 and a token goes to the best of the kept experts. Optimizer
moments are pruned (or merged) the same way, so the output is a run at the same step with `model.moe.num_experts
= N` that `moe_jax.evaluate`, `moe_jax.sample` and `moe_jax.main` (with a larger `train.steps`) use as they use
any run; the data iterator continues where the source run stopped. The hash router (a fixed token -> expert
table) cannot be pruned. Decoder and encoder-decoder (both stacks' MoE layers; scored on span-corruption
batches) alike.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

METHODS = ("load", "router_mass", "merge")
_ROUTER_VARIABLES = ("router_kernel", "noise_kernel", "selection_bias")  # an [..., E] last axis
_EXPERT_WEIGHTS = ("wi", "wi_gate", "wo")


def expert_scores(model, batches, method: str) -> np.ndarray:
    """[MoE layers, E] score of each expert on `batches` (the family's batches): `load` or `router_mass`
    shares; the layers of every MoE stack in `_moe_layers` order (the encoder's before the decoder's)."""
    from moe_jax import analysis

    stacks = analysis.collect_stacks(model, batches)
    scores = []
    for path in _moe_layers(model):
        routed = stacks[path[0]]
        if method == "router_mass":
            E = routed.num_experts
            mass = np.stack([np.bincount(index.reshape(-1), weights=weight.reshape(-1), minlength=E)
                             for index, weight in zip(routed.expert_index, routed.weight)])
            scores.append(mass / np.maximum(mass.sum(axis=1, keepdims=True), 1e-30))
        else:
            scores.append(analysis.expert_load(routed))
    return np.concatenate(scores)


def kept_experts(scores_LE: np.ndarray, keep: int) -> np.ndarray:
    """[layers, keep] indices of the highest-scoring experts of each layer, in their original order."""
    order = np.argsort(-scores_LE, axis=1, kind="stable")[:, :keep]
    return np.sort(order, axis=1)


def merge_plan(expert_weights_LEx: np.ndarray, kept_LN: np.ndarray, load_LE: np.ndarray) -> np.ndarray:
    """[layers, N, E] merge matrix: row n averages kept expert n with the removed experts most similar to it
    (cosine of flattened weights [layers, E, x]), weighted by their load; rows sum to 1."""
    L, E, _ = expert_weights_LEx.shape
    N = kept_LN.shape[1]
    unit = expert_weights_LEx / np.maximum(np.linalg.norm(expert_weights_LEx, axis=-1, keepdims=True), 1e-30)
    plan = np.zeros((L, N, E))
    for layer in range(L):
        kept = kept_LN[layer]
        plan[layer, np.arange(N), kept] = 1.0
        for removed in sorted(set(range(E)) - set(kept.tolist())):
            nearest = int(np.argmax(unit[layer, kept] @ unit[layer, removed]))
            plan[layer, nearest, removed] = 1.0
        weighted = plan[layer] * (load_LE[layer] + 1e-6)  # an unused expert still counts a little
        plan[layer] = weighted / weighted.sum(axis=1, keepdims=True)
    return plan


def _moe_layers(model) -> dict[tuple, object]:
    """Path -> MoeLayer (a scanned stack of MoE layers is one entry with stacked variables), in the order the
    model runs them: the encoder's stack before the decoder's."""
    from moe_jax import analysis, models, moe

    found = {tuple(path): module for path, module in nnx.iter_graph(model) if isinstance(module, moe.MoeLayer)}
    order = list(analysis.STACKS.get(models.name_of(model.config), {}))
    return dict(sorted(found.items(), key=lambda item: order.index(item[0][0]) if item[0][0] in order else len(order)))


def _layer_rows(model) -> dict[tuple, slice]:
    """Path of each MoE stack -> its rows of the [MoE layers, ...] score and plan arrays."""
    rows, start = {}, 0
    for path, layer in _moe_layers(model).items():
        count = layer.wo.shape[0]  # the scanned stack's leading axis
        rows[path] = slice(start, start + count)
        start += count
    return rows


def _expert_axis(name: str, names: tuple, ndim: int) -> int:
    return names.index("expert") if name in _EXPERT_WEIGHTS else ndim - 1


def prune_state(run, state, kept_LN: np.ndarray, plan_LNE: Optional[np.ndarray] = None):
    """The train state (model and optimizer) with each MoE layer's experts cut to `kept_LN` [layers, N], or
    combined by `plan_LNE` [layers, N, E] (merging). Layers are the MoE layers in `_moe_layers` order (each
    scanned stack's leading axis, the encoder's stack first). Returns {flat path: new array} for every
    variable that changes."""
    model, _ = nnx.merge(run.graphdef, state)
    stacks = _moe_layers(model)
    rows = _layer_rows(model)
    if sum(r.stop - r.start for r in rows.values()) != kept_LN.shape[0]:
        raise ValueError(f"prune: {kept_LN.shape[0]} layers of kept experts for a model with "
                         f"{sum(r.stop - r.start for r in rows.values())} MoE layers")
    changed = {}
    for layer_path, layer in stacks.items():
        part = rows[layer_path]
        changed.update(_prune_stack(state, layer_path, layer, kept_LN[part],
                                    None if plan_LNE is None else plan_LNE[part]))
    return changed


def _prune_stack(state, layer_path: tuple, layer, kept_LN: np.ndarray, plan_LNE: Optional[np.ndarray]) -> dict:
    """`prune_state` for one scanned stack of MoE layers at `layer_path`."""
    if layer.router == "hash":
        raise ValueError("model.moe.router='hash': the fixed token -> expert table cannot be pruned")
    E, L = layer.num_experts, kept_LN.shape[0]
    targets = {}  # variable name -> (expert axis in the model's variable, its shape)
    for name in _EXPERT_WEIGHTS + _ROUTER_VARIABLES:
        variable = getattr(layer, name, None)
        if isinstance(variable, nnx.Variable):
            names = tuple(variable.get_metadata().get("out_sharding") or ())
            targets[name] = (_expert_axis(name, names, variable.ndim), variable.shape)

    def transform(value, axis):
        moved = np.moveaxis(np.asarray(value, np.float32), axis, 1)  # [L, E, ...]
        if moved.shape[:2] != (L, E):
            raise ValueError(f"prune: expected [layers={L}, experts={E}, ...], got {moved.shape}")
        if plan_LNE is None:
            out = np.take_along_axis(moved, kept_LN.reshape(L, -1, *([1] * (moved.ndim - 2))), axis=1)
        else:
            out = np.einsum("lne,le...->ln...", plan_LNE, moved)
        return np.moveaxis(out, 1, axis).astype(np.asarray(value).dtype)

    changed = {}
    for path, variable in nnx.to_flat_state(state):
        path = tuple(path)  # the model's variable, or an optimizer moment whose path ends with the model's
        if path[-1] not in targets or path[-len(layer_path) - 1:-1] != layer_path:
            continue
        axis, shape = targets[path[-1]]
        value = variable.get_value()
        if value.ndim > axis and value.shape[axis] == E:
            changed[path] = transform(value, axis)
        elif value.size > 1:
            raise ValueError(f"prune: {'/'.join(map(str, path))} has shape {value.shape}, not the expert layout "
                             f"{shape}")
    return changed


def prune_run(workdir, keep: int, output, *, method: str = "load", step: Optional[int] = None,
              num_batches: int = 8, devices=None) -> dict:
    """Write the pruned run `output` from the run in `workdir`; returns what was done and measured."""
    import grain  # noqa: F401  (the data iterator's checkpoint item)
    import orbax.checkpoint as ocp
    from etils import epath

    from moe_jax import checkpoint, data, train, upcycle
    from moe_jax.models import layers

    layers.choice("--method", method, METHODS)
    upcycle.check_new_workdir(output, "--output")
    cfg = checkpoint.load_run_config(workdir)  # checked before anything is restored or compiled
    E = cfg.model.moe.num_experts
    if not E:
        raise ValueError(f"--workdir={workdir}: the run is dense (model.moe.num_experts=0); nothing to prune")
    if not 1 <= keep < E or keep < cfg.model.moe.k:
        raise ValueError(f"--keep={keep} must be in [max(1, model.moe.k={cfg.model.moe.k}), "
                         f"model.moe.num_experts={E}) for this run")
    if num_batches < 1:
        raise ValueError(f"--num_batches={num_batches} must be >= 1")
    if cfg.model.moe.router == "hash":
        raise ValueError("model.moe.router='hash': the fixed token -> expert table cannot be pruned")
    run, state, step = checkpoint.restore_run(workdir, step, devices=devices)
    cfg = run.config
    model, _ = nnx.merge(run.graphdef, state)
    batches = data.make_eval_batches(cfg.data, cfg.train.eval_steps + num_batches,
                                     batch_format=run.family.batch_format)
    eval_batches, scoring_batches = batches[:cfg.train.eval_steps], batches[cfg.train.eval_steps:]
    scores = expert_scores(model, scoring_batches, "load" if method == "merge" else method)
    kept = kept_experts(scores, keep)
    plan = model_merge_plan(model, kept, scores) if method == "merge" else None
    new_run = pruned_setup(run, keep, devices)
    new_state = pruned_train_state(new_run, state, prune_state(run, state, kept, plan))
    new_cfg = new_run.config

    iterator = data.make_train_iterator(
        new_cfg.data, process_index=train.process_batch_block(new_run.batch_sharding, new_cfg.data.batch_size),
        process_count=jax.process_count(), batch_format=new_run.family.batch_format)
    manager = ocp.CheckpointManager((epath.Path(workdir) / "checkpoints").resolve())
    manager.restore(step, args=ocp.args.Composite(data_iter=checkpoint.DataIteratorRestore(iterator)))
    manager.close()
    upcycle.write_run(new_run, new_state, output, step=step, data_iterator=iterator)
    return dict(step=step, method=method, kept=kept.tolist(), scores=scores.tolist(),
                eval_ce_before=eval_ce(run, state, eval_batches),
                eval_ce_after=eval_ce(new_run, new_state, eval_batches))


def model_merge_plan(model, kept_LN: np.ndarray, load_LE: np.ndarray) -> np.ndarray:
    """`merge_plan` of the model's MoE layers from their expert weights (`wi`, `wi_gate`, `wo`)."""
    plans = []
    for (path, layer), part in zip(_moe_layers(model).items(), _layer_rows(model).values()):
        weights = [np.asarray(getattr(layer, n)[...]) for n in _EXPERT_WEIGHTS
                   if isinstance(getattr(layer, n, None), nnx.Variable)]
        flat = np.concatenate([w.reshape(w.shape[0], w.shape[1], -1) for w in weights], axis=-1)
        plans.append(merge_plan(flat, kept_LN[part], load_LE[part]))
    return np.concatenate(plans)


def pruned_setup(run, keep: int, devices=None):
    """The `TrainSetup` of `run`'s config with `keep` experts per MoE layer."""
    from moe_jax import train

    cfg = run.config.copy_and_resolve_references()
    cfg.model.moe.num_experts = keep
    return train.setup(cfg, devices)


def pruned_train_state(new_run, state, changed: dict):
    """`state` with the `prune_state` changes, as the pruned run's train state in its shardings."""
    old = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    leaves = []
    for path, abstract in nnx.to_flat_state(new_run.abstract_state):
        path = tuple(path)
        value = changed.get(path, old[path].get_value())
        spec = abstract.get_value()
        if tuple(value.shape) != tuple(spec.shape):
            raise ValueError(f"prune: {'/'.join(map(str, path))} is {value.shape} after pruning, the pruned model "
                             f"needs {spec.shape}")
        leaves.append((path, abstract.replace(jax.device_put(jnp.asarray(value, spec.dtype), spec.sharding))))
    return nnx.from_flat_state(leaves)


def eval_ce(run, state, batches) -> float:
    """Mean eval cross-entropy of `state` over `batches` (host LM batches), weighted by tokens."""
    from moe_jax import sharding

    total = weight = 0.0
    with jax.set_mesh(run.mesh):
        for batch in batches:
            metrics = jax.device_get(run.eval_step(state, sharding.shard_batch(batch, run.mesh)))
            total += float(metrics["ce"]) * float(metrics["num_tokens"])
            weight += float(metrics["num_tokens"])
    return total / max(weight, 1.0)


# --------------------------------------------------------------------------------------------- CLI

_FLAGS: dict = {}


def _define_flags() -> None:
    from absl import flags

    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "The trained MoE run directory.")
    _FLAGS["keep"] = flags.DEFINE_integer("keep", None, "Experts to keep in every MoE layer.")
    _FLAGS["method"] = flags.DEFINE_string("method", "load", f"One of {METHODS}.")
    _FLAGS["output"] = flags.DEFINE_string("output", None, "The new run directory.")
    _FLAGS["step"] = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    _FLAGS["num_batches"] = flags.DEFINE_integer("num_batches", 8, "Held-out batches to score the experts on.")
    flags.mark_flags_as_required(["workdir", "keep", "output"])


def main(argv) -> int:
    del argv
    result = prune_run(_FLAGS["workdir"].value, _FLAGS["keep"].value, _FLAGS["output"].value,
                       method=_FLAGS["method"].value, step=_FLAGS["step"].value,
                       num_batches=_FLAGS["num_batches"].value)
    kept = "; ".join(f"layer {i}: {k}" for i, k in enumerate(result["kept"]))
    print(f"wrote {_FLAGS['output'].value} at step {result['step']}: kept {_FLAGS['keep'].value} experts per MoE "
          f"layer by {result['method']} ({kept}); eval CE on the run's eval batches "
          f"{result['eval_ce_before']:.4f} before, {result['eval_ce_after']:.4f} after")
    out = _FLAGS["output"].value
    print(f"evaluate or sample it with --workdir={out}; train it further with python -m moe_jax.main "
          f"--config=moe_jax/convert/run_config.py:{out} --workdir={out} --config.train.steps=<more than "
          f"{result['step']}>")
    return 0


if __name__ == "__main__":
    from moe_jax import cli

    cli.run(main, define_flags=_define_flags)
