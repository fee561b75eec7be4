"""Train a model from an experiment config: the same command on a laptop, 8 simulated devices or a pod.

    python -m moe_jax.main --config=experiments/tiny_switch.py --workdir=runs/tiny_switch \
        [--config.train.steps=1000 --config.model.moe.capacity_factor=1.0 ...]

Running the same command again resumes from the latest checkpoint in the workdir; `--workdir=RUN` alone
continues a run with the config it was written with (`RUN/config.json`: a run that `moe_jax.upcycle`,
`moe_jax.prune` or `moe_jax.convert` wrote, or any earlier run; to change a setting too, use
`--config=moe_jax/convert/run_config.py:RUN --config.train.steps=...`). A mistake in the command
(an unknown key, a bad value, a missing data file) is one `error: ...` line, exit status 2, and no run
directory (moe_jax.cli).
"""

from __future__ import annotations

import logging

from absl import flags
from ml_collections import config_flags

from moe_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (with an optional :arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config.json, metrics.jsonl, checkpoints/.")
flags.mark_flags_as_required(["workdir"])


def initialize_distributed(cfg) -> None:
    """`jax.distributed.initialize` when `distributed.enabled`: explicit coordinator settings if given,
    otherwise jax's own cluster detection (TPU pods, SLURM, ...)."""
    import jax

    dist = cfg.distributed
    if not dist.enabled:
        return
    kwargs = {}
    if dist.coordinator_address:
        kwargs = dict(coordinator_address=dist.coordinator_address, num_processes=dist.num_processes,
                      process_id=dist.process_id)
    jax.distributed.initialize(initialization_timeout=dist.initialization_timeout, **kwargs)


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = _CONFIG.value if _CONFIG.value is not None else _config_of_run(_WORKDIR.value)
    initialize_distributed(cfg)
    from moe_jax import train

    try:
        result = train.train(cfg, _WORKDIR.value)
    except train.TrainingDiverged as error:
        cli.fail(str(error))
    if result.get("interrupted"):
        print(f"interrupted at step {result['step']}; checkpoint saved, run the same command to resume")
    return 0


def _config_of_run(workdir: str):
    """The config.json of the run in `workdir`, for `--workdir` without `--config`."""
    from etils import epath

    from moe_jax import checkpoint

    if not (epath.Path(workdir) / "config.json").exists():
        cli.fail(f"--config is required: --workdir={workdir} holds no run to continue (no config.json)")
    return checkpoint.load_run_config(workdir)


if __name__ == "__main__":
    cli.run(main)
