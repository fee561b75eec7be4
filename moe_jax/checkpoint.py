"""Checkpoints: orbax CheckpointManager holding the train state and the data iterator together.

One checkpoint = one step directory with two items: `state` (any pytree of arrays: params, optimizer state,
step, rng) and `data_iter` (the grain iterator's position), so a resumed run sees exactly the batches the
uninterrupted run would have seen. Saves are asynchronous; `max_to_keep` old steps are kept. Restoring reads
onto whatever shardings the abstract state carries, so a run may resume on a different mesh.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint in a directory that has some could be read."""


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
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, abstract_state: Any, data_iterator: Optional[grain.DatasetIterator] = None):
        """Restore the newest readable checkpoint; returns (step, state), or None when there is none.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with shardings) or arrays of the right shapes.
        The data iterator, if given, is moved in place to the restored position. An unreadable checkpoint
        (interrupted write, corrupt file) is reported and the previous one is tried.
        """
        steps = self.all_steps()
        if not steps:
            return None
        abstract_state = jax.tree.map(_as_abstract, abstract_state)
        failures = []
        for step in reversed(steps):
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as error:  # orbax raises many types for a damaged directory
                message = f"checkpoint step {step} in {self.directory} is unreadable ({type(error).__name__}: " \
                          f"{str(error).splitlines()[0] if str(error) else ''})"
                log.warning("%s; trying the previous one", message)
                failures.append(message)
                continue
            if failures:
                log.warning("resumed from step %d after skipping %d unreadable checkpoint(s)", step, len(failures))
            return step, restored["state"]
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
