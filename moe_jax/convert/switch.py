"""Switch Transformers (`SwitchTransformersForConditionalGeneration`, google/switch-base-8 ... switch-c-2048)
onto our encoder-decoder (moe_jax/models/encdec.py): T5 layers (RMSNorm, relative position bias in each
stack's first layer, shared by the stack), ReLU (or tanh-GELU) MLPs, top-1 experts in every
`{encoder,decoder}_sparse_step`-th FFN, one input embedding for both stacks (`shared.weight`; the per-stack
`embed_tokens` copies must hold the same values: transformers 5 unties them too when `tie_word_embeddings` is
false, and such a checkpoint is refused, naming the tensor).

Two layout differences are folded into the weights:
- attention: HF's T5 does not scale q.k (its initialisation absorbs the factor); ours divides by
  sqrt(head_dim), so our query is HF's x sqrt(head_dim) (exact in both directions when head_dim is a power of 4);
- sparse layers: HF's layer i is sparse when i % step == 1, ours is the last of each block of `every`, the same
  layers for steps 1 and 2 (every released checkpoint); other steps are refused.

Capacity: HF drops the tokens of a sequence beyond `expert_capacity` per expert (64 in the released
checkpoints), first come first served along the sequence. The import keeps that number as
`model.moe.expert_capacity` but routes dropless, so its logits are HF's whenever HF drops nothing (sequences of
up to `expert_capacity` tokens, or balanced enough); with `model.moe.dispatcher=index` (or einsum) and
`model.moe.group_size` = the sequence length it drops exactly HF's tokens. The export writes
`model.moe.expert_capacity`, or, when unset, a capacity no sequence reaches (HF then drops nothing).
"""

from __future__ import annotations

from moe_jax.convert import hf_config
from moe_jax.convert.mapping import MoeNames, Placement, Tensor, layer_placement
from moe_jax.models import encdec, layers

NAME = "SwitchTransformersForConditionalGeneration"
ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu"}  # HF name -> ours (jax.nn.gelu is the tanh form)
NO_DROPS_CAPACITY = 1 << 30  # an HF expert_capacity no sequence reaches: HF then drops nothing, as our import
STACKS = ("encoder", "decoder")


def _sparse_step(hf: hf_config.HfConfig, stack: str, num_layers: int) -> int:
    """Our `moe.<stack>_every` from HF's number of sparse layers (HF's own `<stack>_sparse_step` is derived)."""
    sparse = int(hf.take(f"num_sparse_{stack}_layers"))
    hf.take(f"{stack}_sparse_step", None)
    if sparse < 1:
        raise ValueError(f"{hf.source}: num_sparse_{stack}_layers={sparse}: a Switch model without experts in "
                         f"its {stack} has no counterpart in moe_jax")
    step = num_layers // sparse
    if step not in (1, 2) or num_layers % step:
        raise ValueError(f"{hf.source}: num_sparse_{stack}_layers={sparse} of {num_layers} layers puts experts "
                         f"in every {step}th layer from layer 1; moe_jax has experts in the last layer of each "
                         f"block of moe.{stack}_every layers, the same layers only for every 1 or 2 layers")
    return step


def model_config(hf: hf_config.HfConfig):
    c = encdec.default_config()
    c.vocab_size = int(hf.take("vocab_size"))
    c.d_model = int(hf.take("d_model"))
    c.num_heads = int(hf.take("num_heads"))
    d_kv = int(hf.take("d_kv"))
    c.head_dim = None if d_kv * c.num_heads == c.d_model else d_kv
    c.d_ff = int(hf.take("d_ff"))
    c.num_encoder_layers = int(hf.take("num_layers"))
    c.num_decoder_layers = int(hf.take("num_decoder_layers", c.num_encoder_layers) or c.num_encoder_layers)
    c.relative_attention_num_buckets = int(hf.take("relative_attention_num_buckets"))
    c.relative_attention_max_distance = int(hf.take("relative_attention_max_distance"))
    c.norm_eps = float(hf.take("layer_norm_epsilon"))
    c.dropout = float(hf.take("dropout_rate", 0.0))
    activation = hf.expect("dense_act_fn", tuple(ACTIVATIONS), "the MLPs and experts are ReLU or tanh-GELU")
    c.activation = ACTIVATIONS[activation]
    c.tie_embeddings = bool(hf.take("tie_word_embeddings", True))
    m = c.moe
    m.num_experts = int(hf.take("num_experts"))
    m.k, m.router, m.normalize = 1, "top_k", False
    m.encoder_every = _sparse_step(hf, "encoder", c.num_encoder_layers)
    m.decoder_every = _sparse_step(hf, "decoder", c.num_decoder_layers)
    m.every = m.encoder_every
    m.dispatcher = "dropless"  # see the module docstring on expert_capacity
    m.group_size = 1
    m.expert_capacity = int(hf.take("expert_capacity"))  # used by a capacity dispatcher, not by dropless
    hf.expect("router_bias", (False,), "the router has no bias")
    m.router_dtype = hf.expect("router_dtype", ("float32", "bfloat16"), "routers run in float32 or bfloat16")
    m.jitter = float(hf.take("router_jitter_noise", 0.0))  # the same multiplicative input jitter, training only
    hf.take("router_ignore_padding_tokens", None)  # ours never routes padding
    hf.take("add_router_probs", None)  # what HF returns, not what it computes
    # HF's balancing loss is E * sum(f * P), 1 under perfect balance, as ours for k = 1; z-loss the same.
    m.aux_loss_weight = float(hf.take("router_aux_loss_coef", 0.0))
    m.z_loss_weight = float(hf.take("router_z_loss_coef", 0.0))
    hf.take("initializer_factor", None)
    return c


def hf_config_of(cfg) -> dict:
    hf_config.require(cfg, "name", ("encdec",), "Switch Transformers are encoder-decoders")
    if not layers.is_moe(cfg):
        raise ValueError("model.moe.num_experts=0: a dense encoder-decoder has no Switch Transformers counterpart")
    for key, allowed, why in (("moe.k", (1,), "Switch routes each token to one expert"),
                              ("moe.router", ("top_k",), "Switch routes by softmax top-1"),
                              ("moe.normalize", (False,), "Switch scales the expert output by its router prob"),
                              ("activation", tuple(ACTIVATIONS.values()), "Switch MLPs are not gated"),
                              ("moe.num_shared_experts", (0,), "Switch has no shared expert"),
                              ("qk_norm", ("none",), "Switch has no QK-norm"),
                              ("qkv_bias", (False,), "Switch attention has no biases")):
        hf_config.require(cfg, key, allowed, why)
    if layers.num_kv_heads(cfg) != cfg.num_heads:
        raise ValueError(f"model.num_kv_heads={cfg.num_kv_heads} cannot be exported: Switch attention has as many "
                         f"key/value heads as query heads")
    if layers.expert_d_ff(cfg) != cfg.d_ff:
        raise ValueError(f"model.moe.d_ff={cfg.moe.d_ff} cannot be exported: Switch experts are as wide as its "
                         f"dense MLPs (model.d_ff={cfg.d_ff})")
    every = {stack: encdec.moe_every(cfg, stack) for stack in STACKS}
    for stack, step in every.items():
        if step not in (1, 2):
            raise ValueError(f"model.moe.{stack}_every={step} cannot be exported: Switch Transformers put experts "
                             f"in every layer or every other layer from layer 1")
    moe = cfg.moe
    return {
        "architectures": [NAME], "model_type": "switch_transformers", "dtype": "float32",
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": layers.head_dim(cfg), "d_ff": cfg.d_ff,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers, "num_experts": moe.num_experts,
        "num_sparse_encoder_layers": cfg.num_encoder_layers // every["encoder"],
        "num_sparse_decoder_layers": cfg.num_decoder_layers // every["decoder"],
        "expert_capacity": moe.get("expert_capacity") or NO_DROPS_CAPACITY,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": layers.norm_eps(cfg), "dropout_rate": float(cfg.dropout),
        "dense_act_fn": {ours: hf for hf, ours in ACTIVATIONS.items()}[cfg.activation],
        "tie_word_embeddings": bool(cfg.tie_embeddings), "is_encoder_decoder": True,
        "router_bias": False, "router_dtype": moe.router_dtype, "router_jitter_noise": float(moe.jitter),
        "router_aux_loss_coef": float(moe.aux_loss_weight), "router_z_loss_coef": float(moe.z_loss_weight),
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "decoder_start_token_id": None,
    }


def _top_level(cfg) -> dict:
    embedding_views = tuple(f"{stack}.embed_tokens.weight" for stack in STACKS)
    tensors = {("embedding",): Tensor("shared.weight", same_shape=True, copies=embedding_views)}
    for stack in STACKS:
        tensors[(f"{stack}_norm", "scale")] = Tensor(f"{stack}.final_layer_norm.weight")
        tensors[(f"{stack}_bias", "table")] = Tensor(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", same_shape=True)
    if not cfg.tie_embeddings:
        tensors[("unembedding",)] = Tensor("lm_head.weight", in_dims=1)
    return tensors


def _attention(prefix: str, ours: str, query_scale: float) -> dict:
    return {(ours, "query"): Tensor(f"{prefix}.q.weight", in_dims=1, scale=query_scale),
            (ours, "key"): Tensor(f"{prefix}.k.weight", in_dims=1),
            (ours, "value"): Tensor(f"{prefix}.v.weight", in_dims=1),
            (ours, "out"): Tensor(f"{prefix}.o.weight", in_dims=2)}


def _layer(cfg, stack: str, *, moe: bool) -> dict:
    """Our parameters of one `EncDecLayer` of `stack` -> HF tensors of `{stack}.block.{i}`."""
    layer = f"{stack}.block.{{i}}.layer"
    query_scale = layers.head_dim(cfg) ** 0.5
    tensors = {("self_norm", "scale"): Tensor(f"{layer}.0.layer_norm.weight"),
               **_attention(f"{layer}.0.SelfAttention", "self_attention", query_scale)}
    ffn = 1
    if stack == "decoder":
        tensors[("cross_norm", "scale")] = Tensor(f"{layer}.1.layer_norm.weight")
        tensors.update(_attention(f"{layer}.1.EncDecAttention", "cross_attention", query_scale))
        ffn = 2
    tensors[("ffn_norm", "scale")] = Tensor(f"{layer}.{ffn}.layer_norm.weight")
    mlp = f"{layer}.{ffn}.mlp"
    if moe:
        tensors[("ffn", "router_kernel")] = Tensor(f"{mlp}.router.classifier.weight", in_dims=1)
        mlp = f"{mlp}.experts.expert_{{e}}"
    tensors[("ffn", "wi")] = Tensor(f"{mlp}.wi.weight", in_dims=1)
    tensors[("ffn", "wo")] = Tensor(f"{mlp}.wo.weight", in_dims=1)
    return tensors


def placement(cfg, path: tuple) -> Placement:
    top = _top_level(cfg)
    if path in top:
        return Placement(top[path])
    stack = path[0].removesuffix("_blocks") if path and isinstance(path[0], str) else None
    if stack in STACKS and len(path) > 3 and path[1] == "layers":
        where = layer_placement(cfg, path, encdec.layers_per_block(cfg, stack),
                                lambda moe: _layer(cfg, stack, moe=moe))
        if where is not None:
            return where
    raise ValueError(f"our parameter {'.'.join(map(str, path))} has no counterpart in Switch Transformers "
                     f"(a model setting it does not have)")


ARCHITECTURE = hf_config.Architecture(
    name=NAME, model_type="switch_transformers", moe_names=MoeNames(prefix="mlp", gate="", up="wi", down="wo"),
    model_config=model_config, hf_config=hf_config_of, matches=lambda cfg: hf_config.fits(hf_config_of, cfg),
    placement=placement)
