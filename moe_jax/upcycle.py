"""Sparse upcycling (Komatsuzaki et al. 2022): start an MoE run from a trained dense run.

    python -m moe_jax.upcycle --dense_workdir=runs/tiny_dense --config=experiments/tiny_switch.py \
        --workdir=runs/tiny_switch_upcycled [--noise=0.0 --drop_fraction=0.0 --seed=0 --step=N]
    python -m moe_jax.main --workdir=runs/tiny_switch_upcycled

writes a run directory at step 0 (config.json and a step-0 checkpoint holding the state and the data iterator
at its start) that `moe_jax.main` then trains like any run it resumes. Every expert of an MoE layer is a copy of
the dense model's MLP at that layer, the router is freshly initialised (the config's seed), every other weight
is copied, and the optimizer state is fresh. `--noise=s` adds Gaussian noise of s x the weight's standard
deviation to each expert's copy; `--drop_fraction=r` re-initialises a random share r of each expert's hidden
units (their `wi`/`wi_gate` columns and `wo` rows) from a normal with the dense weight's mean and standard
deviation, as Drop-Upcycling (Nakamura et al. 2025) does, so the experts start different.

With neither, renormalised top-k weights (`model.moe.normalize=True`) and a capacity that drops nothing (e.g.
`model.moe.eval_capacity_factor >= num_experts / k`, or the dropless dispatcher), the upcycled model computes
exactly the dense model's function at step 0: each token's k experts are the same MLP and their weights sum to
one. (Padding tokens are not routed and leave the MoE layer as zeros, but no real token sees them.)

`layer_params` / `set_layer_params` give any model's parameters under per-layer keys (both families store layers
scanned in blocks of `moe.every`, so a dense and an MoE decoder store the same layer under different paths);
distillation (`moe_jax.distill`) uses them to copy a teacher's non-expert weights too.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from moe_jax import models

Key = tuple


@dataclasses.dataclass
class LayerParam:
    """One parameter of one layer: its value and logical axis names (the scanned "layers" axis removed)."""

    value: jax.Array
    names: tuple


# --------------------------------------------------------------------------------------------- layer view


def _scanned_stacks(model) -> dict[tuple, tuple[str, int, int]]:
    """Storage path of each scanned stack's layers -> (the layer key's name, layers per block, index of the
    stack's first layer): the decoder's `blocks.layers` (after its `dense_blocks.layers` prefix, if any), the
    encoder-decoder's `encoder_blocks.layers` and `decoder_blocks.layers`."""
    name = models.name_of(model.config)
    if name == "decoder":
        from moe_jax.models import decoder

        prefix = decoder.num_dense_prefix(model.config)
        return {("dense_blocks", "layers"): ("layer", 1, 0),
                ("blocks", "layers"): ("layer", decoder.layers_per_block(model.config), prefix)}
    if name == "encdec":
        from moe_jax.models import encdec

        return {(f"{stack}_blocks", "layers"): (f"{stack}_layer", encdec.layers_per_block(model.config, stack), 0)
                for stack in ("encoder", "decoder")}
    return {}


def _names(variable) -> tuple:
    return tuple(variable.get_metadata().get("out_sharding") or ())


def _layer_keys(stacks, path, num_blocks: int) -> Optional[list[Key]]:
    """The per-layer keys of the rows of a scanned parameter at `path` (None: not in a scanned stack)."""
    if path[:2] not in stacks:
        return None
    name, per_block, first_layer = stacks[path[:2]]
    return [(name, first_layer + block * per_block + path[2], *path[3:]) for block in range(num_blocks)]


def layer_params(model) -> dict[Key, LayerParam]:
    """Every `nnx.Param` of `model` under a key that names the layer, not the storage: the decoder's layer
    `i = block * every + j`, stored at `blocks.layers[j]` row `block`, becomes `("layer", i, *rest)` (the
    encoder-decoder's `("encoder_layer", i, ...)` and `("decoder_layer", i, ...)`); other paths (embeddings,
    norms, position biases) are kept as they are."""
    stacks = _scanned_stacks(model)
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value, names = variable.get_value(), _names(variable)
        keys = _layer_keys(stacks, tuple(path), value.shape[0] if value.ndim else 0)
        if keys is not None:
            out.update({key: LayerParam(value[block], names[1:]) for block, key in enumerate(keys)})
        else:
            out[tuple(path)] = LayerParam(value, names)
    return out


def set_layer_params(model, values: dict[Key, jax.Array]) -> None:
    """Write copies of `values` (keys of `layer_params`; a subset is fine) into `model`'s parameters in place,
    each placed like the parameter it replaces."""
    stacks = _scanned_stacks(model)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        old = variable.get_value()
        keys = _layer_keys(stacks, tuple(path), old.shape[0] if old.ndim else 0)
        if keys is not None:
            if not any(key in values for key in keys):
                continue
            new = jnp.stack([values[key] if key in values else old[block] for block, key in enumerate(keys)])
        elif tuple(path) in values:
            new = values[tuple(path)]
        else:
            continue
        if new.shape != old.shape:
            raise ValueError(f"parameter {'/'.join(map(str, path))}: new value has shape {new.shape}, the model's "
                             f"has {old.shape}")
        sharding = getattr(old, "sharding", None)
        new = jnp.array(new, old.dtype, copy=True)  # never the source's buffer: a train step donates the state
        variable.set_value(jax.device_put(new, sharding) if sharding is not None else new)


def key_name(key: Key) -> str:
    return "/".join(str(part) for part in key)


# --------------------------------------------------------------------------------------------- upcycling


def expert_copies(dense_value: jax.Array, names: tuple, num_experts: int, *, noise: float, hidden_units,
                  rng: np.random.Generator) -> jax.Array:
    """[..., d, f]-shaped dense weight -> the expert weight with an "expert" axis of `num_experts` copies.

    `names`: the expert weight's logical names (where "expert" and "mlp" are). `noise`: std of added Gaussian
    noise relative to the weight's std. `hidden_units`: [E] index arrays of hidden units to re-initialise in
    each expert (Drop-Upcycling), drawn from a normal with the dense weight's mean and std."""
    expert_axis = names.index("expert")
    dense = np.asarray(dense_value, np.float32)
    mean, std = float(dense.mean()), float(dense.std())
    hidden_axis = names.index("mlp") - (names.index("mlp") > expert_axis)  # in the dense weight
    dense_hidden_first = np.moveaxis(dense, hidden_axis, 0)
    copies = np.repeat(dense_hidden_first[None], num_experts, axis=0)  # [E, f, ...]
    if noise > 0:
        copies = copies + rng.normal(0.0, noise * std, copies.shape).astype(np.float32)
    for e, units in enumerate(hidden_units):
        copies[e, units] = rng.normal(mean, std, (len(units),) + copies.shape[2:])
    copies = np.moveaxis(copies, 1, hidden_axis + 1)  # [E, dense weight's axes]
    return jnp.asarray(np.moveaxis(copies, 0, expert_axis))


def upcycle(dense_model, moe_model, *, noise: float = 0.0, drop_fraction: float = 0.0, seed: int = 0) -> dict:
    """Overwrite `moe_model`'s parameters from `dense_model` in place (see the module docstring).

    Both models are of one family and agree on everything but the MoE layers. Returns a report:
    `copied` (keys taken as they are), `experts` (expert weights made of copies), `fresh` (left as initialised:
    routers, shared experts). ValueError naming the parameter when the models disagree elsewhere."""
    dense_family, moe_family = models.name_of(dense_model.config), models.name_of(moe_model.config)
    if dense_family != moe_family:
        raise ValueError(f"model.name: the dense run is a {dense_family!r} model, the config a {moe_family!r} one")
    if dense_model.config.moe.num_experts:
        raise ValueError(f"--dense_workdir: the run has model.moe.num_experts={dense_model.config.moe.num_experts};"
                         f" upcycling starts from a dense run (num_experts=0)")
    if not 0.0 <= drop_fraction <= 1.0:
        raise ValueError(f"--drop_fraction={drop_fraction} must be in [0, 1]")
    if noise < 0:
        raise ValueError(f"--noise={noise} must be >= 0")
    mismatch = "the model settings outside model.moe must match the dense run's" + _differences(
        dense_model.config, moe_model.config)
    source, target = layer_params(dense_model), layer_params(moe_model)
    rng = np.random.default_rng(seed)
    values, report = {}, {"copied": [], "experts": [], "fresh": []}
    hidden_draws: dict[Key, list] = {}  # one draw of dropped units per (layer, expert), shared by wi/wi_gate/wo
    for key, param in target.items():
        if "expert" in param.names:
            if key not in source:
                raise ValueError(f"{key_name(key)}: the dense model has no MLP weight at this layer to copy")
            expert_axis = param.names.index("expert")
            num_experts = param.value.shape[expert_axis]
            expected = param.value.shape[:expert_axis] + param.value.shape[expert_axis + 1:]
            if source[key].value.shape != expected:
                raise ValueError(f"{key_name(key)}: the dense MLP weight is {source[key].value.shape}, each expert "
                                 f"needs {expected}: model.d_model / model.d_ff / model.activation must match the "
                                 f"dense run")
            units = param.value.shape[param.names.index("mlp")]
            layer = key[:-1]
            if layer not in hidden_draws:
                dropped = int(round(drop_fraction * units))
                hidden_draws[layer] = [np.sort(rng.choice(units, dropped, replace=False)) for _ in range(num_experts)]
            values[key] = expert_copies(source[key].value, param.names, num_experts, noise=noise,
                                        hidden_units=hidden_draws[layer], rng=rng)
            report["experts"].append(key_name(key))
        elif key in source:
            if source[key].value.shape != param.value.shape:
                raise ValueError(f"{key_name(key)}: shape {param.value.shape} in the config's model, "
                                 f"{source[key].value.shape} in the dense run; {mismatch}")
            values[key] = source[key].value
            report["copied"].append(key_name(key))
        elif "ffn" in key:
            report["fresh"].append(key_name(key))  # the router (and shared experts): nothing dense to start from
        else:
            raise ValueError(f"{key_name(key)}: the config's model has this parameter and the dense run does not; "
                             f"{mismatch}")
    unused = sorted(key_name(k) for k in source if k not in target)
    if unused:
        raise ValueError(f"the dense run has parameters the config's model lacks ({', '.join(unused[:4])}); "
                         f"{mismatch}")
    set_layer_params(moe_model, values)
    return report


def _differences(dense_cfg, moe_cfg) -> str:
    """' (they differ in model.d_ff: 64 in the dense run, 128 in the config)', or '' when only model.moe does."""
    keys = sorted(k for k in set(dense_cfg) | set(moe_cfg) if k != "moe" and dense_cfg.get(k) != moe_cfg.get(k))
    if not keys:
        return ""
    return " (they differ in " + ", ".join(f"model.{k}: {dense_cfg.get(k)!r} in the dense run, {moe_cfg.get(k)!r} "
                                           f"in the config" for k in keys) + ")"


# --------------------------------------------------------------------------------------------- run directory


def check_new_workdir(workdir, flag: str = "--workdir") -> epath.Path:
    """`workdir` as a path; ValueError if it already holds a run's checkpoints (nothing is overwritten)."""
    workdir = epath.Path(workdir)
    if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
        raise ValueError(f"{flag}={workdir} already holds checkpoints; choose a new directory")
    return workdir


def write_run(run, state, workdir, *, step: int, data_iterator=None) -> None:
    """A run directory `moe_jax.main` resumes: `config.json` (`run.config`) and checkpoint `step` holding
    `state` and the data iterator (default: a fresh train iterator, at the start of the data)."""
    from moe_jax import checkpoint, data, train

    workdir = check_new_workdir(workdir)
    cfg = run.config
    if data_iterator is None:
        data_iterator = data.make_train_iterator(
            cfg.data, process_index=train.process_batch_block(run.batch_sharding, cfg.data.batch_size),
            process_count=jax.process_count(), batch_format=run.family.batch_format)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=cfg.train.keep_checkpoints)
    checkpointer.save(step, state, data_iterator, force=True)
    checkpointer.close()


def upcycle_run(dense_workdir, cfg, workdir, *, noise: float = 0.0, drop_fraction: float = 0.0,
                seed: Optional[int] = None, dense_step: Optional[int] = None, devices=None) -> dict:
    """Write the upcycled run directory `workdir` from the dense run in `dense_workdir` and the MoE config
    `cfg`; returns `upcycle`'s report. Nothing is written when a check fails."""
    from moe_jax import checkpoint, train

    check_new_workdir(workdir)
    dense_model, _ = checkpoint.restore_model(dense_workdir, dense_step, devices=devices)
    run = train.setup(cfg, devices)
    if not run.config.model.moe.num_experts:
        raise ValueError("model.moe.num_experts=0 in --config: upcycling needs an MoE config")
    model, optimizer = nnx.merge(run.graphdef, run.init_state())
    with jax.set_mesh(run.mesh):
        report = upcycle(dense_model, model, noise=noise, drop_fraction=drop_fraction,
                         seed=run.config.train.seed if seed is None else seed)
    write_run(run, nnx.state((model, optimizer)), workdir, step=0)
    return report


# --------------------------------------------------------------------------------------------- CLI

_FLAGS: dict = {}


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "The MoE experiment config file.",
                                                       lock_config=True)
    _FLAGS["dense_workdir"] = flags.DEFINE_string("dense_workdir", None, "The trained dense run directory.")
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "The new MoE run directory (written at step 0).")
    _FLAGS["step"] = flags.DEFINE_integer("step", None, "The dense run's checkpoint step (default: the latest).")
    _FLAGS["noise"] = flags.DEFINE_float("noise", 0.0, "Gaussian noise on each expert copy, x the weight's std.")
    _FLAGS["drop_fraction"] = flags.DEFINE_float(
        "drop_fraction", 0.0, "Share of each expert's hidden units re-initialised (Drop-Upcycling).")
    _FLAGS["seed"] = flags.DEFINE_integer("seed", None, "Seed of the noise and dropped units (default train.seed).")
    flags.mark_flags_as_required(["config", "dense_workdir", "workdir"])


def main(argv) -> int:
    del argv
    report = upcycle_run(_FLAGS["dense_workdir"].value, _FLAGS["config"].value, _FLAGS["workdir"].value,
                         noise=_FLAGS["noise"].value, drop_fraction=_FLAGS["drop_fraction"].value,
                         seed=_FLAGS["seed"].value, dense_step=_FLAGS["step"].value)
    workdir = _FLAGS["workdir"].value
    print(f"wrote {workdir} at step 0 from {_FLAGS['dense_workdir'].value}: {len(report['experts'])} expert "
          f"weights copied from the dense MLPs, {len(report['copied'])} weights copied, fresh: "
          f"{', '.join(report['fresh']) or 'nothing'}")
    print(f"train it with: python -m moe_jax.main --workdir={workdir} (the config it was written with; to change "
          f"a setting: --config=moe_jax/convert/run_config.py:{workdir} --config.train.steps=...)")
    return 0


if __name__ == "__main__":
    from moe_jax import cli

    cli.run(main, define_flags=_define_flags)
