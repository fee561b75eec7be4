"""Qwen2-MoE (`Qwen2MoeForCausalLM`) and Qwen3-MoE (`Qwen3MoeForCausalLM`): SwiGLU experts every
`decoder_sparse_step` layers (dense SwiGLU MLPs of `intermediate_size` between, and in the first layers when
`mlp_only_layers` lists them), experts of
`moe_intermediate_size`, softmax top-k with or without renormalisation (`norm_topk_prob`), dropless.
Qwen2-MoE adds q/k/v biases and a shared expert scaled by a sigmoid gate; Qwen3-MoE has neither but an
RMSNorm of each head's q and k."""

from __future__ import annotations

from moe_jax.convert import hf_config
from moe_jax.convert.mapping import MoeNames
from moe_jax.models import decoder, layers

NAMES = MoeNames(prefix="mlp", gate="gate_proj", up="up_proj", down="down_proj")


def _layout(hf: hf_config.HfConfig, c) -> None:
    """What both share: the sparse layer layout, expert width, renormalisation, no sliding window."""
    c.moe.every = int(hf.take("decoder_sparse_step", 1))
    c.moe.first_dense_layers = dense_prefix(hf.source, c.num_layers, c.moe.every,
                                            hf.take("mlp_only_layers", None) or [])
    c.moe.d_ff = int(hf.take("moe_intermediate_size"))
    c.moe.normalize = bool(hf.take("norm_topk_prob", False))
    hf.expect("use_sliding_window", (False,), "attention over the whole sequence")
    for unused_without_sliding_window in ("sliding_window", "max_window_layers"):
        hf.take(unused_without_sliding_window, None)
    kinds = set(hf.take("layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"{hf.source}: layer_types {sorted(kinds)} have no counterpart in moe_jax "
                         f"(full attention only)")


def dense_prefix(source, num_layers: int, step: int, mlp_only_layers: list) -> int:
    """`mlp_only_layers` as our `moe.first_dense_layers`: HF makes layer i sparse when i is not listed and
    (i + 1) % step == 0; we have dense layers only as a prefix, so the listed sparse layers must be all of
    those below some layer. ValueError naming the key otherwise."""
    if step < 1:
        raise ValueError(f"{source}: decoder_sparse_step={step} must be >= 1")
    listed = sorted({int(i) for i in mlp_only_layers})
    if any(not 0 <= i < num_layers for i in listed):
        raise ValueError(f"{source}: mlp_only_layers={listed} must be layer indices in [0, {num_layers})")
    sparse = lambda i: (i + 1) % step == 0
    turned_dense = [i for i in listed if sparse(i)]
    prefix = turned_dense[-1] + 1 if turned_dense else 0
    if turned_dense != [i for i in range(prefix) if sparse(i)]:
        raise ValueError(f"{source}: mlp_only_layers={listed!r} has no counterpart in moe_jax: it leaves sparse "
                         f"layers before dense ones, and moe_jax has dense layers only before the first MoE layer "
                         f"(model.moe.first_dense_layers), so the listed sparse layers must be every sparse layer "
                         f"below some layer")
    if prefix >= num_layers:
        raise ValueError(f"{source}: mlp_only_layers={listed} makes every layer dense; import it as a dense "
                         f"model (num_experts=0)")
    return prefix


def _hf_layout(cfg, values: dict) -> dict:
    values.update(decoder_sparse_step=cfg.moe.every, mlp_only_layers=list(range(decoder.num_dense_prefix(cfg))),
                  moe_intermediate_size=layers.expert_d_ff(cfg),
                  norm_topk_prob=bool(cfg.moe.normalize), use_sliding_window=False)
    return values


def qwen2_config(hf: hf_config.HfConfig):
    c = hf_config.decoder_config(hf, num_experts_key="num_experts", d_ff_key="intermediate_size")
    _layout(hf, c)
    c.qkv_bias = bool(hf.take("qkv_bias", True))
    shared = int(hf.take("shared_expert_intermediate_size"))
    if shared < 1:
        raise ValueError(f"{hf.source}: shared_expert_intermediate_size={shared} must be positive")
    c.moe.num_shared_experts, c.moe.shared_d_ff, c.moe.shared_expert_gate = 1, shared, True
    return c


def qwen2_hf_config(cfg) -> dict:
    values = hf_config.hf_decoder_config(cfg, architecture=QWEN2.name, model_type="qwen2_moe",
                                         num_experts_key="num_experts", d_ff_key="intermediate_size", d_ff=cfg.d_ff)
    hf_config.require(cfg, "qk_norm", ("none",), "Qwen2-MoE has no QK-norm")
    hf_config.require(cfg, "moe.num_shared_experts", (1,), "Qwen2-MoE has one gated shared expert")
    hf_config.require(cfg, "moe.shared_expert_gate", (True,), "Qwen2-MoE gates its shared expert")
    values.update(qkv_bias=bool(cfg.qkv_bias),
                  shared_expert_intermediate_size=cfg.moe.shared_d_ff or layers.expert_d_ff(cfg))
    return _hf_layout(cfg, values)


def qwen3_config(hf: hf_config.HfConfig):
    experts_key = "num_experts" if "num_experts" in hf.values else "num_local_experts"
    c = hf_config.decoder_config(hf, num_experts_key=experts_key, d_ff_key="intermediate_size")
    _layout(hf, c)
    hf.expect("attention_bias", (False,), "Qwen3-MoE's attention biases (q, k, v and o) are not modelled")
    c.qk_norm = "head"
    return c


def qwen3_hf_config(cfg) -> dict:
    values = hf_config.hf_decoder_config(cfg, architecture=QWEN3.name, model_type="qwen3_moe",
                                         num_experts_key="num_experts", d_ff_key="intermediate_size", d_ff=cfg.d_ff)
    hf_config.require(cfg, "qk_norm", ("head",), "Qwen3-MoE normalises each head's q and k")
    for key, allowed in (("qkv_bias", (False,)), ("moe.num_shared_experts", (0,))):
        hf_config.require(cfg, key, allowed, "Qwen3-MoE has no such layer option")
    values.update(attention_bias=False)
    return _hf_layout(cfg, values)


QWEN2 = hf_config.Architecture(name="Qwen2MoeForCausalLM", model_type="qwen2_moe", moe_names=NAMES,
                               model_config=qwen2_config, hf_config=qwen2_hf_config,
                               matches=lambda cfg: hf_config.fits(qwen2_hf_config, cfg))
QWEN3 = hf_config.Architecture(name="Qwen3MoeForCausalLM", model_type="qwen3_moe", moe_names=NAMES,
                               model_config=qwen3_config, hf_config=qwen3_hf_config,
                               matches=lambda cfg: hf_config.fits(qwen3_hf_config, cfg))
