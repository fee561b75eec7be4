"""OLMoE (`OlmoeForCausalLM`): RMSNorm of the whole q and k projections (QK-norm before the heads split),
SwiGLU experts in every layer, softmax top-k without renormalisation (`norm_topk_prob`), dropless."""

from __future__ import annotations

from moe_jax.convert import hf_config
from moe_jax.convert.mapping import MoeNames
from moe_jax.models import layers


def model_config(hf: hf_config.HfConfig):
    c = hf_config.decoder_config(hf, num_experts_key="num_experts", d_ff_key="intermediate_size")
    hf.expect("attention_bias", (False,), "OLMoE's attention biases (q, k, v and o) are not modelled")
    hf.expect("clip_qkv", (None,), "no clipping of q, k, v")
    c.moe.normalize = bool(hf.take("norm_topk_prob", False))
    c.qk_norm = "projection"
    return c


def hf_config_of(cfg) -> dict:
    values = hf_config.hf_decoder_config(cfg, architecture=ARCHITECTURE.name, model_type="olmoe",
                                         num_experts_key="num_experts", d_ff_key="intermediate_size",
                                         d_ff=layers.expert_d_ff(cfg))
    hf_config.require(cfg, "qk_norm", ("projection",), "OLMoE normalises the whole q and k projections")
    hf_config.require(cfg, "moe.every", (1,), "OLMoE has experts in every layer")
    hf_config.require_no_dense_prefix(cfg, "OLMoE has experts in every layer")
    for key, allowed in (("qkv_bias", (False,)), ("moe.num_shared_experts", (0,))):
        hf_config.require(cfg, key, allowed, "OLMoE has no such layer option")
    values.update(norm_topk_prob=bool(cfg.moe.normalize), attention_bias=False, clip_qkv=None)
    return values


ARCHITECTURE = hf_config.Architecture(
    name="OlmoeForCausalLM", model_type="olmoe",
    moe_names=MoeNames(prefix="mlp", gate="gate_proj", up="up_proj", down="down_proj"),
    model_config=model_config, hf_config=hf_config_of, matches=lambda cfg: hf_config.fits(hf_config_of, cfg))
