"""Which Hugging Face tensor each of our decoder's parameters comes from, and the layout change between them.

Our decoder (moe_jax/models/decoder.py) scans identical blocks of `moe.every` layers, so a parameter of a
layer is one array with a leading block axis: HF layer i is block i // every, layer i % every of the block
(after `moe.first_dense_layers` dense layers, stacked apart in `dense_blocks`, when the model has them);
expert kernels are stacked [E, ...] as well. HF linear weights are [out, in]; ours are [in..., out...]
(attention kernels split the head axis: q [d, H, k], o [H, k, d]). Every architecture here uses the Llama
names for attention and norms; they differ in the MoE block's names (`MoeNames`) and in which options the
layers have (biases, QK-norm, a gated shared expert), all read from our config.

Import and export go one parameter at a time: one stacked array is assembled from (or split into) its HF
tensors, so memory holds the model once plus one parameter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Optional

import numpy as np

from moe_jax.models import decoder, layers

Path = tuple  # a parameter's path in nnx.state(model), e.g. ("blocks", "layers", 0, "attention", "query")
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed, not weights


@dataclasses.dataclass(frozen=True)
class MoeNames:
    """The names inside an architecture's MoE block: `{prefix}.gate.weight` is the router,
    `{prefix}.experts.{e}.{gate|up|down}.weight` the experts (`up` is the un-activated input of SwiGLU)."""

    prefix: str
    gate: str
    up: str
    down: str


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One of our parameters <-> HF tensors named by `hf` ({i}: HF layer, {e}: expert, one tensor each).

    `in_dims`: an HF linear weight [out, in] whose `in` is our first `in_dims` axes (per layer and expert);
    None: the same values, flattened in HF (norm scales, biases [H, k]) or, with `same_shape`, not at all."""

    hf: str
    in_dims: Optional[int] = None
    same_shape: bool = False
    scale: float = 1.0  # ours = HF x scale (T5's query, whose 1/sqrt(head dim) HF folds into the weights)
    copies: tuple = ()  # HF tensors that hold the same values (T5's per-stack views of the shared embedding)

    def to_ours(self, hf_array: np.ndarray, shape: tuple) -> np.ndarray:
        array = hf_array.reshape(shape) if self.in_dims is None else hf_array.T.reshape(shape)
        return array * np.float32(self.scale) if self.scale != 1.0 else array

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        if self.scale != 1.0:
            array = array / np.float32(self.scale)
        if self.in_dims is None:
            return array if self.same_shape else array.reshape(-1)
        return array.reshape(math.prod(array.shape[:self.in_dims]), -1).T


def top_level_tensors(cfg) -> dict[Path, Tensor]:
    tensors = {("embedding",): Tensor("model.embed_tokens.weight", same_shape=True),
               ("final_norm", "scale"): Tensor("model.norm.weight")}
    if not cfg.tie_embeddings:
        tensors[("unembedding",)] = Tensor("lm_head.weight", in_dims=1)
    return tensors


def layer_tensors(cfg, names: MoeNames, *, moe: bool) -> dict[Path, Tensor]:
    """Our parameters of one decoder layer (paths inside `DecoderLayer`) -> their HF tensors."""
    layer = "model.layers.{i}"
    attention = f"{layer}.self_attn"
    tensors = {
        ("attention_norm", "scale"): Tensor(f"{layer}.input_layernorm.weight"),
        ("ffn_norm", "scale"): Tensor(f"{layer}.post_attention_layernorm.weight"),
        ("attention", "query"): Tensor(f"{attention}.q_proj.weight", in_dims=1),
        ("attention", "key"): Tensor(f"{attention}.k_proj.weight", in_dims=1),
        ("attention", "value"): Tensor(f"{attention}.v_proj.weight", in_dims=1),
        ("attention", "out"): Tensor(f"{attention}.o_proj.weight", in_dims=2),
    }
    if cfg.qkv_bias:
        for ours, hf in (("query", "q"), ("key", "k"), ("value", "v")):
            tensors[("attention", f"{ours}_bias")] = Tensor(f"{attention}.{hf}_proj.bias")
    if cfg.qk_norm != "none":
        tensors[("attention", "query_norm", "scale")] = Tensor(f"{attention}.q_norm.weight")
        tensors[("attention", "key_norm", "scale")] = Tensor(f"{attention}.k_norm.weight")
    if not moe:
        for ours, hf in (("wi", "up_proj"), ("wi_gate", "gate_proj"), ("wo", "down_proj")):
            tensors[("ffn", ours)] = Tensor(f"{layer}.mlp.{hf}.weight", in_dims=1)
        return tensors
    block = f"{layer}.{names.prefix}"
    tensors[("ffn", "router_kernel")] = Tensor(f"{block}.gate.weight", in_dims=1)
    for ours, hf in (("wi", names.up), ("wi_gate", names.gate), ("wo", names.down)):
        tensors[("ffn", ours)] = Tensor(f"{block}.experts.{{e}}.{hf}.weight", in_dims=1)
    if cfg.moe.num_shared_experts:
        for ours, hf in (("shared_wi", "up_proj"), ("shared_wi_gate", "gate_proj"), ("shared_wo", "down_proj")):
            tensors[("ffn", ours)] = Tensor(f"{block}.shared_expert.{hf}.weight", in_dims=1)
        if cfg.moe.shared_expert_gate:
            tensors[("ffn", "shared_gate")] = Tensor(f"{block}.shared_expert_gate.weight", in_dims=1)
    return tensors


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one of our parameters lives in HF: its tensor rule and, for a layer parameter, the HF layer of
    each block (`layer_of_block`) and the number of experts it stacks (0: none)."""

    tensor: Tensor
    layer_of_block: Optional[Callable[[int], int]] = None
    num_experts: int = 0


def placement(cfg, names: MoeNames, path: Path) -> Placement:
    """The HF home of our decoder's parameter at `path`; ValueError when the architecture has none for it."""
    top = top_level_tensors(cfg)
    if path in top:
        return Placement(top[path])
    prefix = decoder.num_dense_prefix(cfg)
    tensors_of = lambda moe: layer_tensors(cfg, names, moe=moe)
    where = None
    if len(path) > 3 and path[:2] == ("dense_blocks", "layers"):
        where = layer_placement(cfg, path, 1, lambda moe: tensors_of(False))
    elif len(path) > 3 and path[:2] == ("blocks", "layers"):
        where = layer_placement(cfg, path, decoder.layers_per_block(cfg), tensors_of, first_layer=prefix)
    if where is not None:
        return where
    raise ValueError(f"our parameter {'.'.join(map(str, path))} has no counterpart in this Hugging Face "
                     f"architecture (a model setting it does not have)")


def layer_placement(cfg, path: Path, every: int, tensors_of: Callable[[bool], dict], *,
                    first_layer: int = 0) -> Optional[Placement]:
    """The placement of a scanned layer's parameter, `path` = (stack, "layers", j, *inside) for layer j of
    blocks of `every` (the last one MoE), the stack starting at HF layer `first_layer`; `tensors_of(moe)`:
    that layer's {inside: Tensor}. None: no tensor."""
    j, inside = int(path[2]), tuple(path[3:])
    tensors = tensors_of(layers.is_moe(cfg) and j == every - 1)
    if inside not in tensors:
        return None
    experts = cfg.moe.num_experts if "{e}" in tensors[inside].hf else 0
    return Placement(tensors[inside], lambda b: first_layer + b * every + j, experts)


def hf_names(where: Placement, num_blocks: int) -> list[str]:
    """Every HF tensor name a parameter placed at `where` is made of, in stacking order (block, then expert)."""
    if where.layer_of_block is None:
        return [where.tensor.hf]
    return [where.tensor.hf.format(i=where.layer_of_block(b), e=e)
            for b in range(num_blocks) for e in (range(where.num_experts) if where.num_experts else [None])]


def import_parameter(where: Placement, path: Path, shape: tuple, get_hf: Callable[[str], np.ndarray],
                     has_hf: Callable[[str], bool] = lambda name: False) -> np.ndarray:
    """Our parameter at `path` (float32, `shape`; placed at `where`) assembled from its HF tensors, read by
    `get_hf(name)`. Copies of a tensor that the checkpoint holds (`has_hf`) must hold the same values."""
    rule = where.tensor
    if where.layer_of_block is None:
        hf_array = get_hf(rule.hf)
        value = _checked(rule, rule.hf, hf_array, shape)
        for copy in (c for c in rule.copies if has_hf(c)):
            if not np.array_equal(get_hf(copy), hf_array):
                raise ValueError(f"tensor {copy} differs from {rule.hf}; moe_jax has one tensor for both "
                                 f"({'/'.join(map(str, path))})")
        return value
    per_tensor = shape[2:] if where.num_experts else shape[1:]
    arrays = [_checked(rule, name, get_hf(name), per_tensor) for name in hf_names(where, shape[0])]
    return np.stack(arrays).reshape(shape)


def export_parameter(where: Placement, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, HF tensor) pairs of our parameter placed at `where`."""
    rule = where.tensor
    if where.layer_of_block is None:
        tensor = rule.to_hf(array)
        for name in (rule.hf, *rule.copies):
            yield name, tensor
        return
    per_tensor = array.reshape((-1,) + array.shape[2 if where.num_experts else 1:])
    for name, part in zip(hf_names(where, array.shape[0]), per_tensor):
        yield name, rule.to_hf(part)


def _hf_shape(rule: Tensor, shape: tuple) -> tuple:
    if rule.in_dims is not None:
        return (math.prod(shape[rule.in_dims:]), math.prod(shape[:rule.in_dims]))
    return tuple(shape) if rule.same_shape else (math.prod(shape),)


def _checked(rule: Tensor, name: str, hf_array: np.ndarray, shape: tuple) -> np.ndarray:
    want = _hf_shape(rule, shape)
    if tuple(hf_array.shape) != want:
        raise ValueError(f"shape mismatch: tensor {name} has shape {tuple(hf_array.shape)} but config.json "
                         f"implies {want}")
    return rule.to_ours(hf_array, shape)
