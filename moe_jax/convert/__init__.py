"""Hugging Face interop: import and export MoE checkpoints with the same logits.

    from moe_jax import convert
    model, config = convert.from_hf("path/to/hf_dir")        # our decoder.Transformer and its run config
    logits_BLV, aux = model(tokens_BL, deterministic=True)
    convert.to_hf(model, config, "path/to/out")             # transformers' from_pretrained reads it

Architectures (`ARCHITECTURES`): MixtralForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM,
Qwen3MoeForCausalLM onto our decoder; SwitchTransformersForConditionalGeneration onto our encoder-decoder
(`model(encoder_tokens_BL, decoder_tokens_BL, deterministic=True)`). A directory holds config.json and
model.safetensors or a sharded model.safetensors.index.json; tensors are read and written one at a time
(safetensors_io.py), so a large checkpoint is never held twice. Only numpy and safetensors are needed: no torch, no transformers.
The run-directory side (write a run that `moe_jax.main` fine-tunes, export a run's step) is runs.py, the CLI
`python -m moe_jax.convert`.
"""

from __future__ import annotations

import difflib
import json
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.convert import hf_config, mapping, mixtral, olmoe, qwen_moe, switch
from moe_jax.convert.safetensors_io import ShardedWriter, TensorReader

ARCHITECTURES = {a.name: a for a in (mixtral.ARCHITECTURE, olmoe.ARCHITECTURE, qwen_moe.QWEN2, qwen_moe.QWEN3,
                                     switch.ARCHITECTURE)}


def read_config(path: str | pathlib.Path):
    """(our run config, Architecture) of the HF directory `path`; errors name the file and the key."""
    from moe_jax import train

    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"--from_hf={path}: no such directory")
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: it has no config.json")
    try:
        values = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON ({error.msg} at line {error.lineno})") from None
    architecture = architecture_named(values, config_file)
    hf = hf_config.HfConfig(values, str(config_file))
    model_cfg = architecture.model_config(hf)
    hf.finish()
    cfg = train.default_config()
    cfg.model = model_cfg
    return cfg, architecture


def architecture_named(values: dict, source) -> hf_config.Architecture:
    names = values.get("architectures") or []
    if len(names) != 1:
        raise ValueError(f"{source}: 'architectures' must name one model class, got {names!r}; supported: "
                         f"{sorted(ARCHITECTURES)}")
    if names[0] not in ARCHITECTURES:
        close = difflib.get_close_matches(names[0], ARCHITECTURES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{source}: architecture {names[0]!r} is not supported; supported: "
                         f"{sorted(ARCHITECTURES)}{hint}")
    return ARCHITECTURES[names[0]]


def hf_values(model_cfg, architecture: hf_config.Architecture, reader: TensorReader, abstract_params):
    """(path, float32 numpy value) for every parameter of `abstract_params` (a flat [(path, variable)] list
    of our model's Params), read from the HF checkpoint one parameter at a time. Raises ValueError for a shape
    mismatch, a missing tensor, or checkpoint tensors that nothing reads."""
    used = set()
    available = set(reader.names())

    def get(name):
        used.add(name)
        try:
            return reader.get(name)
        except KeyError as error:
            raise ValueError(f"{error.args[0]} (expected by {architecture.name} with this config.json)") from None

    for path, variable in abstract_params:
        yield path, mapping.import_parameter(architecture.place(model_cfg, path), path, tuple(variable.shape), get,
                                             has_hf=available.__contains__)
    unused = [n for n in reader.names() if n not in used and not n.endswith(mapping.IGNORED_HF_TENSORS)]
    if unused:
        raise ValueError(f"{reader.directory}: tensors with no counterpart in moe_jax ({len(unused)}): "
                         f"{unused[:8]}{' ...' if len(unused) > 8 else ''}")


def from_hf(path: str | pathlib.Path, *, overrides: Optional[dict] = None):
    """(model, config) of a local HF MoE directory: our decoder (or encoder-decoder) with the checkpoint's
    weights and the routing that reproduces HF (dropless top-k), and the run config it belongs to (`config.model`).

    `overrides`: `model` settings to change before the model is built, e.g. HF Switch Transformers' dropping
    (a fixed `expert_capacity` per sequence): `{"moe.dispatcher": "index", "moe.group_size": sequence_length}`."""
    from moe_jax import models

    cfg, architecture = read_config(path)
    cfg.model.update_from_flattened_dict(dict(overrides or {}))
    reader = TensorReader(path)
    create = lambda: models.get(cfg).create(cfg.model, nnx.Rngs(params=0, dropout=1))
    # Shapes only, then each parameter from the checkpoint: no random initialisation to compute and replace.
    graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
    rest = jax.jit(lambda: nnx.split(create(), nnx.Param, ...)[2])()  # rng streams: tiny
    flat = list(nnx.to_flat_state(abstract_params))
    values = hf_values(cfg.model, architecture, reader, flat)
    loaded = nnx.from_flat_state([(p, v.replace(jnp.asarray(a))) for (p, v), (_, a) in zip(flat, values, strict=True)])
    reader.close()
    return nnx.merge(graphdef, loaded, rest), cfg


def architecture_for(model_cfg, name: Optional[str] = None) -> hf_config.Architecture:
    """The architecture `name`, or the one whose settings our config has; ValueError when none fits."""
    if name is not None:
        if name not in ARCHITECTURES:
            raise ValueError(f"--architecture={name!r} is not one of {sorted(ARCHITECTURES)}")
        return ARCHITECTURES[name]
    for architecture in ARCHITECTURES.values():
        if architecture.matches(model_cfg):
            return architecture
    reasons = []
    for architecture in ARCHITECTURES.values():
        try:
            architecture.hf_config(model_cfg)
        except ValueError as error:
            reasons.append(f"{architecture.name}: {error}")
    raise ValueError("no Hugging Face architecture has this model's settings:\n  " + "\n  ".join(reasons))


def to_hf(model, config, path: str | pathlib.Path, *, architecture: Optional[str] = None,
          max_shard_bytes: int = 5 << 30) -> pathlib.Path:
    """Write `model` (our decoder or encoder-decoder; `config` its run config or `model` section) as an HF
    directory:
    config.json + model.safetensors (sharded above `max_shard_bytes`, with model.safetensors.index.json).
    `architecture`: an `ARCHITECTURES` name; None picks the one that has the model's settings."""
    model_cfg = config.model if "model" in config else config
    chosen = architecture_for(model_cfg, architecture)
    values = chosen.hf_config(model_cfg)
    directory = pathlib.Path(path)
    with ShardedWriter(directory, max_shard_bytes=max_shard_bytes) as writer:
        for path_, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            array = np.asarray(variable.get_value(), dtype=np.float32)
            for name, tensor in mapping.export_parameter(chosen.place(model_cfg, path_), array):
                writer.add(name, tensor)
    (directory / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True))
    return directory
