"""Reading an HF `config.json` into our `model` config and writing one back, key by key.

Every key of config.json is either mapped onto a `model.*` setting, checked to hold the one value we can
reproduce (e.g. `sliding_window: null`), or known to have no effect on the logits (token ids, init range,
`use_cache` ...). Any other key is an error naming it: silently dropping a setting would break parity.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import ml_collections

from moe_jax.models import decoder, layers

# Keys with no effect on the forward pass in float32 (ids, training-only or generation-only settings).
NO_EFFECT = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "initializer_range",
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "output_router_logits", "max_position_embeddings",
    "_name_or_path", "tokenizer_class", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tie_encoder_decoder", "problem_type", "id2label", "label2id", "task_specific_params", "prefix",
    "finetuning_task", "pruned_heads", "cross_attention_hidden_size", "decoder_start_token_id", "sep_token_id",
    "tf_legacy_loss", "use_return_dict",
})


class HfConfig:
    """config.json's values, tracking which keys were read (`take`), so that `finish` can name the rest."""

    def __init__(self, values: dict, source: str):
        self.values, self.source, self._seen = dict(values), source, set(NO_EFFECT)

    def take(self, key: str, default: Any = KeyError) -> Any:
        self._seen.add(key)
        if key in self.values:
            return self.values[key]
        if default is KeyError:
            raise ValueError(f"{self.source}: no {key!r} (needed for this architecture)")
        return default

    def expect(self, key: str, allowed: tuple, why: str) -> Any:
        """The value of `key`, which must be one of `allowed` (a missing key counts as `allowed[0]`)."""
        value = self.take(key, allowed[0])
        if value not in allowed:
            raise ValueError(f"{self.source}: {key}={value!r} has no counterpart in moe_jax ({why}); "
                             f"supported: {' or '.join(repr(a) for a in allowed)}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.values) - self._seen)
        if unknown:
            raise ValueError(f"{self.source}: config keys with no counterpart in moe_jax: {unknown}; converting "
                             f"without them would change the model")


def rope_theta(hf: HfConfig) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or the older top-level `rope_theta` / `rope_scaling`."""
    parameters = hf.take("rope_parameters", None) or {}
    theta = parameters.get("rope_theta", hf.take("rope_theta", 10_000.0))
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    scaling = hf.take("rope_scaling", None)
    if kind != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise ValueError(f"{hf.source}: rope_type {kind if kind != 'default' else scaling!r} has no counterpart "
                         f"in moe_jax (plain RoPE only)")
    extra = sorted(set(parameters) - {"rope_theta", "rope_type"})
    if extra:
        raise ValueError(f"{hf.source}: rope_parameters keys with no counterpart in moe_jax: {extra}")
    return float(theta)


def decoder_config(hf: HfConfig, *, num_experts_key: str, d_ff_key: str) -> ml_collections.ConfigDict:
    """Our `model` config from what every HF MoE decoder here shares; the architecture adds the rest."""
    c = decoder.default_config()
    c.vocab_size = int(hf.take("vocab_size"))
    c.d_model = int(hf.take("hidden_size"))
    c.num_layers = int(hf.take("num_hidden_layers"))
    c.num_heads = int(hf.take("num_attention_heads"))
    c.num_kv_heads = int(hf.take("num_key_value_heads", c.num_heads))
    head_dim = hf.take("head_dim", None)
    # None when it is the default, so that export then import gives back the same config.
    c.head_dim = None if head_dim is None or int(head_dim) * c.num_heads == c.d_model else int(head_dim)
    c.d_ff = int(hf.take(d_ff_key))
    c.norm_eps = float(hf.take("rms_norm_eps"))
    c.rope_theta = rope_theta(hf)
    c.tie_embeddings = bool(hf.take("tie_word_embeddings", False))
    hf.expect("hidden_act", ("silu",), "experts and MLPs are SwiGLU")
    c.activation = "swiglu"
    hf.expect("attention_dropout", (0.0, 0), "no attention dropout")
    m = c.moe
    m.num_experts = int(hf.take(num_experts_key))
    m.k = int(hf.take("num_experts_per_tok"))
    m.every = 1
    m.router = "top_k"
    m.dispatcher = "dropless"  # HF MoE layers drop no token
    m.group_size = 1  # dropless: groups change no output; `save_run` sets training's groups
    # HF's balancing loss is 1 under perfect balance, ours is k (DESIGN.md): the same gradient needs / k.
    m.aux_loss_weight = float(hf.take("router_aux_loss_coef", 0.0)) / m.k
    m.z_loss_weight = 0.0
    return c


def hf_decoder_config(cfg, *, architecture: str, model_type: str, num_experts_key: str, d_ff_key: str,
                      d_ff: int) -> dict:
    """config.json values every architecture here shares, from our `model` config (ValueError naming the
    setting that cannot be expressed)."""
    require(cfg, "name", ("decoder",), f"{architecture} is a decoder-only language model")
    require(cfg, "activation", ("swiglu",), f"{architecture} experts are SwiGLU")
    require(cfg, "moe.router", ("top_k",), f"{architecture} routes by softmax top-k")
    if not layers.is_moe(cfg):
        raise ValueError(f"model.moe.num_experts=0: a dense model has no {architecture} counterpart")
    return {
        "architectures": [architecture], "model_type": model_type, "dtype": "float32",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": layers.num_kv_heads(cfg),
        "head_dim": layers.head_dim(cfg), d_ff_key: d_ff, "rms_norm_eps": layers.norm_eps(cfg),
        "rope_parameters": {"rope_theta": float(cfg.rope_theta), "rope_type": "default"},
        "tie_word_embeddings": bool(cfg.tie_embeddings), "hidden_act": "silu", "attention_dropout": 0.0,
        num_experts_key: cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.k,
        "router_aux_loss_coef": cfg.moe.aux_loss_weight * cfg.moe.k,
        # Not carried by our config; None rather than the class defaults (OLMoE's eos 50279 is outside small
        # vocabularies).
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }


def require(cfg, key: str, allowed: tuple, why: str) -> None:
    node = cfg
    for part in key.split("."):
        node = node[part]
    if node not in allowed:
        raise ValueError(f"model.{key}={node!r} cannot be exported: {why} (needs {' or '.join(map(repr, allowed))})")


def require_no_dense_prefix(cfg, why: str) -> None:
    """`require` for `moe.first_dense_layers`, which configs written before it existed do not have."""
    from moe_jax.models import decoder

    prefix = decoder.num_dense_prefix(cfg)
    if prefix:
        raise ValueError(f"model.moe.first_dense_layers={prefix!r} cannot be exported: {why} (needs 0)")


def fits(hf_config_of: Callable[[Any], dict], cfg) -> bool:
    """Whether `hf_config_of` can express our config (an architecture's `matches`)."""
    try:
        hf_config_of(cfg)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One HF architecture: its class name, model_type, MoE block names and the two config translations."""

    name: str
    model_type: str
    moe_names: Any  # mapping.MoeNames
    model_config: Callable[[HfConfig], ml_collections.ConfigDict]
    hf_config: Callable[[Any], dict]
    matches: Callable[[Any], bool]  # whether one of our configs is this architecture's (for to_hf's default)
    # (model cfg, our parameter path) -> its mapping.Placement; None: the decoder layout (mapping.placement)
    placement: Optional[Callable[[Any, tuple], Any]] = None

    def place(self, cfg, path: tuple):
        """Where our parameter at `path` lives in this architecture's checkpoint (a `mapping.Placement`)."""
        if self.placement is not None:
            return self.placement(cfg, path)
        from moe_jax.convert import mapping

        return mapping.placement(cfg, self.moe_names, path)
