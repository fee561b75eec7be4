"""Mixtral (`MixtralForCausalLM`): GQA, RoPE, RMSNorm, SwiGLU experts in every layer, softmax top-k with the
kept weights renormalised, dropless."""

from __future__ import annotations

from moe_jax.convert import hf_config
from moe_jax.convert.mapping import MoeNames
from moe_jax.models import layers


def model_config(hf: hf_config.HfConfig):
    c = hf_config.decoder_config(hf, num_experts_key="num_local_experts", d_ff_key="intermediate_size")
    hf.expect("sliding_window", (None,), "attention over the whole sequence")
    c.moe.normalize = True
    c.moe.jitter = float(hf.take("router_jitter_noise", 0.0))  # the same multiplicative input jitter
    return c


def hf_config_of(cfg) -> dict:
    values = hf_config.hf_decoder_config(cfg, architecture=ARCHITECTURE.name, model_type="mixtral",
                                         num_experts_key="num_local_experts", d_ff_key="intermediate_size",
                                         d_ff=layers.expert_d_ff(cfg))
    hf_config.require(cfg, "moe.normalize", (True,), "Mixtral renormalises the top-k weights")
    hf_config.require(cfg, "moe.every", (1,), "Mixtral has experts in every layer")
    hf_config.require_no_dense_prefix(cfg, "Mixtral has experts in every layer")
    for key, allowed in (("qk_norm", ("none",)), ("qkv_bias", (False,)), ("moe.num_shared_experts", (0,))):
        hf_config.require(cfg, key, allowed, "Mixtral has no such layer option")
    values.update(sliding_window=None, router_jitter_noise=float(cfg.moe.jitter))
    return values


ARCHITECTURE = hf_config.Architecture(
    name="MixtralForCausalLM", model_type="mixtral",
    moe_names=MoeNames(prefix="block_sparse_moe", gate="w1", up="w3", down="w2"),
    model_config=model_config, hf_config=hf_config_of, matches=lambda cfg: hf_config.fits(hf_config_of, cfg))
