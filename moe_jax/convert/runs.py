"""Run directories from and to Hugging Face checkpoints.

`save_run(hf_dir, workdir)` writes what `moe_jax.main` writes: `config.json` and an orbax checkpoint at step 0
holding the whole train state (the imported parameters, a fresh optimizer state), placed on the run's mesh as
each parameter is read. Fine-tune it with the config file `moe_jax/convert/run_config.py`, which reads the
run's own config.json:

    python -m moe_jax.main --config=moe_jax/convert/run_config.py:RUN --workdir=RUN --config.train.steps=100 \
        --config.data.source=text --config.data.paths=my.txt

`moe_jax.evaluate`, `sample` and `analyze` read the run as any other. `export_run(workdir, hf_dir, step)`
writes a checkpoint step back as an HF directory.
"""

from __future__ import annotations

import pathlib
from typing import Optional

import jax
from flax import nnx

from moe_jax.convert import hf_values, read_config, to_hf
from moe_jax.convert.safetensors_io import TensorReader

# Fine-tuning defaults for a converted run (the trainer's are for training from scratch); --config.train.* wins.
FINE_TUNING = dict(learning_rate=1e-5, warmup_steps=10, weight_decay=0.0, steps=100)
GROUP_SIZE = 4096  # tokens per routing group in training (capped at the tokens per device; see README)


def default_run_config():
    """The run config a converted model starts from, before its `model` section (fine-tuning defaults)."""
    from moe_jax import train

    cfg = train.default_config()
    cfg.train.update(FINE_TUNING)
    return cfg


def save_run(hf_dir: str | pathlib.Path, workdir: str | pathlib.Path, *, overrides: Optional[dict] = None,
             devices=None):
    """Write the run directory `workdir` from the HF directory `hf_dir`; returns its run config.

    `overrides`: {"data.source": "text", "train.steps": 10, ...}: the run's `data`, `train` and `mesh` settings
    (the `model` is the checkpoint's). A SentencePiece `tokenizer.model` in `hf_dir` is the run's tokenizer
    unless `data.tokenizer` is given. The parameters are read one at a time into the shardings of the run's
    mesh (default all devices), so a large checkpoint is never held twice. FileExistsError if `workdir`
    already holds a run."""
    from moe_jax import checkpoint, train

    workdir = pathlib.Path(workdir)
    if (workdir / "config.json").exists() or (workdir / "checkpoints").exists():
        raise FileExistsError(f"--workdir={workdir} already holds a run; choose a new directory")
    overrides = dict(overrides or {})
    model_keys = sorted(k for k in overrides if not k.startswith(("data.", "train.", "mesh.")))
    if model_keys:
        raise ValueError(f"--config.{model_keys[0]}: only data.*, train.* and mesh.* can be set; the model is the "
                         f"checkpoint's (config.json in {hf_dir})")
    model_cfg, architecture = read_config(hf_dir)
    cfg = default_run_config()
    cfg.model = model_cfg.model
    cfg.model.moe.group_size = GROUP_SIZE
    if (pathlib.Path(hf_dir) / "tokenizer.model").exists():
        cfg.data.tokenizer = str(pathlib.Path(hf_dir).resolve() / "tokenizer.model")
    cfg.update_from_flattened_dict(overrides)
    reader = TensorReader(hf_dir)
    run = train.setup(cfg, devices)
    state = run.init_state()  # (model, optimizer); the random parameters are replaced one by one below
    flat = [(path, variable) for path, variable in nnx.to_flat_state(state)
            if path[0] == 0 and isinstance(variable, nnx.Param)]
    model_params = [(path[1:], variable) for path, variable in flat]
    for (path, variable), (_, value) in zip(flat, hf_values(run.config.model, architecture, reader, model_params),
                                            strict=True):
        sharding = variable.get_value().sharding
        variable.set_value(jax.device_put(value, sharding))
    reader.close()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints")
    checkpointer.save(0, state, force=True)
    checkpointer.close()
    return cfg


def export_run(workdir: str | pathlib.Path, hf_dir: str | pathlib.Path, *, step: Optional[int] = None,
               architecture: Optional[str] = None, max_shard_bytes: int = 5 << 30) -> pathlib.Path:
    """Write checkpoint `step` (default the latest) of the run in `workdir` as an HF directory."""
    from moe_jax import checkpoint

    model, cfg = checkpoint.restore_model(workdir, step, devices=jax.devices()[:1])
    return to_hf(model, cfg, hf_dir, architecture=architecture, max_shard_bytes=max_shard_bytes)
