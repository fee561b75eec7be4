"""Model families, chosen by `config.model.name`: each module here gives the same small interface.

    family = models.get(cfg)                       # or models.get("decoder"); cfg.model.name, default "decoder"
    model = family.create(cfg.model, nnx.Rngs(params=0, dropout=1))
    loss, metrics = family.loss_fn(model, batch, deterministic=False, aux_loss_weight=1e-2, z_loss_weight=0.0)

A family module (decoder.py; encdec.py next) defines, under these names:
  default_config() -> the `model` config section (with `name`);
  validate_config(model_cfg) -> None, ValueError naming the key;
  create(model_cfg, rngs) -> the nnx model;
  loss_fn(model, batch, *, deterministic, aux_loss_weight, z_loss_weight) -> (loss, metrics), metrics holding at
    least the scalars `loss`, `ce`, `accuracy`, `num_tokens` and `moe` (per-layer routing aux, {} if dense);
  abstract_batch(batch_size, seq_len, batch_sharding, *, data_config=None) -> {key: ShapeDtypeStruct}, the batch
    loss_fn reads (the dry run compiles from it);
  count_params(model) -> {total, embedding, expert, active, active_non_embedding};
  flops_per_token(model, seq_len) -> training FLOPs per token (for MFU);
  describe(model_cfg) -> the start-up header's words on the layout;
  BATCH_FORMAT: the data pipeline's batch format it trains on (`moe_jax.data.BATCH_FORMATS`).
The trainer, the dry run and the sweep use only this interface.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Callable, Union

DEFAULT = "decoder"
# Built-in families: name -> module, imported when first asked for.
MODULES = {"decoder": "moe_jax.models.decoder", "encdec": "moe_jax.models.encdec"}


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family's interface (see the module docstring for each field's signature)."""

    name: str
    default_config: Callable
    validate_config: Callable
    create: Callable
    loss_fn: Callable
    abstract_batch: Callable
    count_params: Callable
    flops_per_token: Callable
    describe: Callable
    batch_format: str

    @classmethod
    def from_module(cls, name: str, module: Any) -> "ModelFamily":
        """The family a module defines under the interface's names."""
        fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(cls)
                  if f.name not in ("name", "batch_format")}
        return cls(name=name, batch_format=module.BATCH_FORMAT, **fields)


_REGISTERED: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Make `family` available as `model.name=family.name` (a test's or a notebook's own family)."""
    _REGISTERED[family.name] = family
    return family


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*MODULES, *_REGISTERED]))


def name_of(config) -> str:
    """The family name of a run config (its `model` section) or of a `model` config; "decoder" if unset."""
    model_cfg = config.model if "model" in config else config
    return model_cfg.get("name", DEFAULT) or DEFAULT


def get(config_or_name: Union[str, Any]) -> ModelFamily:
    """The family named by a string, a run config or a `model` config (`model.name`, default "decoder").

    An unknown name is a ValueError naming `model.name`, what exists and the closest match.
    """
    name = config_or_name if isinstance(config_or_name, str) else name_of(config_or_name)
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in MODULES:
        close = difflib.get_close_matches(str(name), names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"model.name={name!r} is not one of {names()}{hint}")
    try:
        module = importlib.import_module(MODULES[name])
    except ModuleNotFoundError as error:
        if error.name != MODULES[name]:
            raise
        raise ValueError(f"model.name={name!r} is reserved for a model family not built yet "
                         f"({MODULES[name].replace('.', '/')}.py); use 'decoder'") from None
    return register(ModelFamily.from_module(name, module))


def with_family_defaults(config):
    """A copy of a run config whose `model` section also has every key of its family's default config that it
    lacks (existing values kept): `--config.model.name=encdec` on a decoder config gets the encoder-decoder's
    own keys (layer counts, relative attention) at their defaults, and everything it shares stays as given."""
    config = config.copy_and_resolve_references()
    _fill(config.model, get(config).default_config())
    return config


def _fill(section, defaults) -> None:
    with section.unlocked():
        for key, value in defaults.items():
            if key not in section:
                section[key] = value
            elif hasattr(value, "items") and hasattr(section[key], "items"):
                _fill(section[key], value)


def require_language_model(config, command: str) -> None:
    """ValueError unless a run config's family is a decoder-only LM (what `command` reads)."""
    family = get(config)
    if family.batch_format != "lm":
        raise ValueError(f"{command} works on decoder-only language models; this run is model.name="
                         f"{family.name!r}, trained on {family.batch_format} batches (its held-out loss is "
                         f"eval/neg_log_perplexity in metrics.jsonl)")
