"""Checkpoints: orbax CheckpointManager holding the train state and the data iterator together.

One checkpoint = one step directory with two items: `state` (any pytree of arrays: params, optimizer state,
step, rng) and `data_iter` (the grain iterator's position), so a resumed run sees exactly the batches the
uninterrupted run would have seen. Saves are asynchronous; `max_to_keep` old steps are kept. Restoring reads
onto whatever shardings the abstract state carries, so a run may resume on a different mesh.

The iterator position is written by `DataIteratorHandler`, not grain's own handler: grain's writes
`get_state()` through plain JSON, which turns tuples into lists, and grain's packing compares its
`remainder_slices` with a tuple, so a state restored from that JSON yields other batches, silently. Here the
state is encoded so that it decodes to an equal object of the same types (tuples tagged), and a state that
would not round-trip exactly is refused when it is saved, not discovered after a resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint in a directory that has some could be read."""


# --------------------------------------------------------------------------------------------- data iterator

_FORMAT_KEY, _FORMAT = "moe_jax_iterator_state", 1


def encode_iterator_state(state: Any) -> str:
    """JSON text that `decode_iterator_state` turns back into an object equal to `state`, types included.

    Dicts (string keys), lists, tuples, str, int, float, bool and None are supported; anything else (a numpy
    scalar, a non-string key) is a ValueError naming where it is, since plain JSON would change it."""
    encoded = json.dumps({_FORMAT_KEY: _FORMAT, "state": _tag(state, "state")}, indent=1, allow_nan=False)
    if not _same(decode_iterator_state(encoded), state):
        raise ValueError(f"data iterator state does not round-trip exactly through JSON: {state!r}")
    return encoded


def decode_iterator_state(text: str) -> Any:
    """Inverse of `encode_iterator_state`; also reads grain's own (plain JSON) files, turning its packing
    `remainder_slices` back into the tuples grain compares them with."""
    raw = json.loads(text)
    if isinstance(raw, dict) and raw.get(_FORMAT_KEY) == _FORMAT:
        return _untag(raw["state"])
    return _tuples_in_remainder_slices(raw)


def _tag(value, where):
    if isinstance(value, bool) or value is None or isinstance(value, (str, int, float)):
        if type(value) not in (bool, int, float, str, type(None)):
            raise ValueError(f"data iterator state at {where}: {type(value).__name__} {value!r} is not a plain "
                             f"Python scalar and would not round-trip through JSON")
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_tag(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_tag(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or "__tuple__" in value:
            raise ValueError(f"data iterator state at {where}: dict keys must be strings, got {list(value)}")
        return {k: _tag(v, f"{where}.{k}") for k, v in value.items()}
    raise ValueError(f"data iterator state at {where}: {type(value).__name__} is not JSON-serialisable exactly")


def _untag(value):
    if isinstance(value, list):
        return [_untag(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_untag(v) for v in value["__tuple__"])
        return {k: _untag(v) for k, v in value.items()}
    return value


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _tuples_in_remainder_slices(value):
    if isinstance(value, list):
        return [_tuples_in_remainder_slices(v) for v in value]
    if isinstance(value, dict):
        return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" and isinstance(v, dict)
                    else _tuples_in_remainder_slices(v)) for k, v in value.items()}
    return value


class DataIteratorHandler(ocp.CheckpointHandler):
    """Orbax handler for a grain DatasetIterator: `process_<i>-of-<n>.json` per process, exact round trip."""

    def save(self, directory: epath.Path, args: "DataIteratorSave"):
        directory = epath.Path(directory)
        (directory / _iterator_file()).write_text(encode_iterator_state(args.item.get_state()))

    def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
        path = epath.Path(directory) / _iterator_file()
        if not path.exists():
            raise FileNotFoundError(f"no data iterator state {path} (this process's position in the data)")
        iterator = args.item
        iterator.set_state(decode_iterator_state(path.read_text()))
        if hasattr(iterator, "start_prefetch"):
            iterator.start_prefetch()
        return iterator

    def metadata(self, directory: epath.Path):
        return None

    def structure(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass

    @classmethod
    def typestr(cls):
        return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    item: Any


def _iterator_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


# --------------------------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Save and resume (state, data iterator) pairs under `<directory>/<step>/`."""

    def __init__(self, directory: str | epath.Path, *, max_to_keep: int = 3):
        if max_to_keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {max_to_keep}")
        self.directory = epath.Path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory.resolve() if not str(directory).startswith(("gs://", "s3://")) else self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_iterator: Optional[grain.DatasetIterator] = None, *,
             force: bool = False) -> bool:
        """Start an asynchronous save of `state` (and the iterator position) as step `step`."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data_iter"] = DataIteratorSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_step(self, step: int, abstract_state: Any, data_iterator: Optional[grain.DatasetIterator] = None):
        """Restore checkpoint `step` exactly (no fallback); returns (step, state). CheckpointError if unreadable.

        A checkpoint saved without a data position (an imported model, moe_jax.convert) leaves the iterator
        at its start."""
        abstract_state = jax.tree.map(_as_abstract, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and (self.directory / str(step) / "data_iter").exists():
            items["data_iter"] = DataIteratorRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # orbax raises many types for a damaged directory
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable "
                                  f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") \
                from None
        return step, restored["state"]

    def restore_latest(self, abstract_state: Any, data_iterator: Optional[grain.DatasetIterator] = None):
        """Restore the newest readable checkpoint; returns (step, state), or None when there is none.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with shardings) or arrays of the right shapes.
        The data iterator, if given, is moved in place to the restored position. An unreadable checkpoint
        (interrupted write, corrupt file) is reported and the previous one is tried.
        """
        steps = self.all_steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):
            try:
                restored = self.restore_step(step, abstract_state, data_iterator)
            except CheckpointError as error:
                log.warning("%s; trying the previous one", error)
                failures.append(str(error))
                continue
            if failures:
                log.warning("resumed from step %d after skipping %d unreadable checkpoint(s)", step, len(failures))
            return restored
        raise CheckpointError("no readable checkpoint in {}:\n  {}".format(self.directory, "\n  ".join(failures)))

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _as_abstract(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    sharding = getattr(leaf, "sharding", None)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


# --------------------------------------------------------------------------------------------- runs


def load_run_config(workdir: str | epath.Path):
    """The config a run was trained with (`<workdir>/config.json`), as a ConfigDict; errors name the path."""
    import ml_collections

    path = epath.Path(workdir) / "config.json"
    if not epath.Path(workdir).exists():
        raise FileNotFoundError(f"--workdir={workdir}: no such run directory")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; is {workdir} a moe_jax run directory (moe_jax.main writes "
                                f"config.json, metrics.jsonl and checkpoints/ there)?")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    from moe_jax import models, train

    cfg = train.default_config()
    model_name = (values.get("model") or {}).get("name")
    if model_name:  # the family's own keys (e.g. the encoder-decoder's layer counts) at their defaults first
        cfg.model.name = model_name
        cfg = models.with_family_defaults(cfg)
    cfg.update_from_flattened_dict({k: v for k, v in _flatten(values).items() if _has_key(cfg, k)})
    return cfg


def restore_run(workdir: str | epath.Path, step: Optional[int] = None, *, devices=None):
    """(TrainSetup, state, step) of a run directory: its config, compiled steps and restored train state.

    `step=None` takes the newest readable checkpoint. The run's mesh is kept when it fits the devices (default
    all), otherwise the devices form one data-parallel axis (`mesh.shape=(-1, 1, 1)`).
    """
    import jax

    from moe_jax import sharding, train

    cfg = load_run_config(workdir)
    devices = list(jax.devices() if devices is None else devices)
    try:
        sharding.mesh_shape(cfg.mesh.shape, len(devices))
    except ValueError:
        cfg.mesh.shape = (-1, 1, 1)
    run = train.setup(cfg, devices)
    directory = epath.Path(workdir) / "checkpoints"
    checkpointer = Checkpointer(directory) if directory.exists() else None
    steps = checkpointer.all_steps() if checkpointer else []
    if not steps:
        raise FileNotFoundError(f"{directory}: no checkpoint; the run in {workdir} has not saved one yet")
    if step is not None and step not in steps:
        raise ValueError(f"--step={step}: {directory} has checkpoints at steps {steps}")
    restored = checkpointer.restore_latest(run.abstract_state) if step is None else \
        checkpointer.restore_step(step, run.abstract_state)
    checkpointer.close()
    return run, restored[1], restored[0]


def restore_model(workdir: str | epath.Path, step: Optional[int] = None, *, devices=None):
    """(model, config) of a run directory at `step` (default the latest): the nnx model with its trained
    parameters, on the given devices (default all; CPU works for any run)."""
    from flax import nnx

    run, state, _ = restore_run(workdir, step, devices=devices)
    model, _ = nnx.merge(run.graphdef, state)
    return model, run.config


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def _has_key(cfg, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True
