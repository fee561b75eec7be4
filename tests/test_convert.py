"""Hugging Face import / export (moe_jax.convert) against tiny random HF models built here with transformers
(no download): our logits equal HF's, export then import is the identity, HF reads our export, bad input is a
clear error. Shapes stress the mapping: GQA ratio 2, odd expert counts, top-3, untied embeddings, a vocabulary
of 301 (not a multiple of 8), weights large enough (std 0.2) that the router has no near-ties."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from moe_jax import convert
from moe_jax.checkpoint import _flatten

VOCAB = 301
PARITY = 1e-4
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=3, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
              tie_word_embeddings=False)


def hf_configs():
    """Architecture name -> a tiny transformers config of it."""
    return {
        "MixtralForCausalLM": transformers.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=5,
                                                         rope_theta=5000.0),
        "OlmoeForCausalLM": transformers.OlmoeConfig(**COMMON, intermediate_size=48, num_experts=7),
        # MoE in every other layer (dense MLPs of another width between) but not in layer 1 (our
        # first_dense_layers=2), a shared expert wider than the routed ones, top-k weights renormalised
        "Qwen2MoeForCausalLM": transformers.Qwen2MoeConfig(
            **{**COMMON, "num_hidden_layers": 6}, intermediate_size=56, moe_intermediate_size=24,
            shared_expert_intermediate_size=40, num_experts=5, decoder_sparse_step=2, mlp_only_layers=[1],
            norm_topk_prob=True),
        # head_dim 16 with d_model 32 and 4 heads: q is wider than the model
        "Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig(
            **COMMON, intermediate_size=48, moe_intermediate_size=24, num_experts=5, head_dim=16,
            norm_topk_prob=True),
    }


def build_hf(name: str, directory, max_shard_size=None):
    """A random HF model of architecture `name`, saved to `directory` (sharded above `max_shard_size`);
    -> the model (eval mode, eager attention)."""
    config = hf_configs()[name]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(directory, **({} if max_shard_size is None else dict(max_shard_size=max_shard_size)))
    return model


def tokens(batch=2, length=13, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length))


def hf_logits(model, tokens_BL):
    with torch.no_grad():
        return model(torch.tensor(tokens_BL)).logits.numpy()


def our_logits(model, tokens_BL):
    logits, _ = model(jnp.asarray(tokens_BL), deterministic=True)
    return np.asarray(logits)


def params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


ARCHITECTURES = sorted(hf_configs())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_import_matches_hf_logits_export_reimports_identically_and_hf_reads_the_export(name, tmp_path):
    reference = build_hf(name, tmp_path / "hf")
    ids = tokens()
    expected = hf_logits(reference, ids)

    model, config = convert.from_hf(tmp_path / "hf")
    got = our_logits(model, ids)
    difference = float(np.abs(got - expected).max())
    print(f"{name}: max |logit difference| {difference:.2e} (logits up to {np.abs(expected).max():.1f})")
    assert difference <= PARITY
    assert config.model.moe.dispatcher == "dropless"

    # A few tensors per shard: the sharded layout (index.json) is written and read back.
    out = convert.to_hf(model, config, tmp_path / "export", max_shard_bytes=64 * 1024)
    assert (out / "model.safetensors.index.json").exists()
    again, config_again = convert.from_hf(out)
    assert _flatten(config_again.model.to_dict()) == _flatten(config.model.to_dict())
    assert all(np.array_equal(a, b) for a, b in zip(params(model), params(again), strict=True))

    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    assert type(exported).__name__ == name
    back = float(np.abs(hf_logits(exported, ids) - got).max())
    print(f"{name}: HF on our export vs ours: max |logit difference| {back:.2e}")
    assert back <= PARITY


def test_bad_directories_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        convert.from_hf(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory: it has no config.json"):
        convert.from_hf(tmp_path / "empty")

    # HF's own sharded layout reads as the single file does.
    reference = build_hf("MixtralForCausalLM", tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model, _ = convert.from_hf(tmp_path / "hf")
    assert float(np.abs(our_logits(model, tokens()) - hf_logits(reference, tokens())).max()) <= PARITY
    config_file = tmp_path / "hf" / "config.json"
    original = json.loads(config_file.read_text())

    def with_config(**changes):
        config_file.write_text(json.dumps({**original, **changes}))

    with_config(architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="architecture 'LlamaForCausalLM' is not supported; supported:"):
        convert.from_hf(tmp_path / "hf")
    with_config(intermediate_size=40)
    with pytest.raises(ValueError, match=r"shape mismatch: tensor model\.layers\.0\.block_sparse_moe\.experts\.0\."
                                         r"w\d\.weight has shape \(48, 32\) but config\.json implies \(40, 32\)"):
        convert.from_hf(tmp_path / "hf")
    with_config(attention_sink=True, quantization_config={"bits": 4})
    with pytest.raises(ValueError, match=r"config keys with no counterpart in moe_jax: \['attention_sink', "
                                         r"'quantization_config'\]"):
        convert.from_hf(tmp_path / "hf")
    with_config(sliding_window=4)
    with pytest.raises(ValueError, match="sliding_window=4 has no counterpart in moe_jax"):
        convert.from_hf(tmp_path / "hf")
    with_config(num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"tensors with no counterpart in moe_jax .*model\.layers\.1\."):
        convert.from_hf(tmp_path / "hf")
    config_file.write_text(json.dumps(original))
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard files that are missing: .*{shard.name}"):
        convert.from_hf(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        convert.from_hf(tmp_path / "hf")


def test_bfloat16_tensors_are_read_as_float32(tmp_path):
    from safetensors.torch import save_file

    from moe_jax.convert.safetensors_io import TensorReader

    weights = torch.randn(3, 5)
    save_file({"w": weights.to(torch.bfloat16), "v": weights}, str(tmp_path / "model.safetensors"))
    reader = TensorReader(tmp_path)
    assert reader.get("w").dtype == np.float32 and reader.names() == ["v", "w"]
    np.testing.assert_array_equal(reader.get("w"), weights.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(reader.get("v"), weights.numpy())
    with pytest.raises(KeyError, match="no tensor 'u' in the checkpoint"):
        reader.get("u")


def test_a_native_model_without_an_hf_counterpart_is_refused_naming_the_setting(tmp_path):
    from moe_jax.models import decoder

    cfg = decoder.default_config()
    cfg.update(vocab_size=64, d_model=16, d_ff=32, num_layers=2, num_heads=2)
    cfg.moe.update(num_experts=3, every=2)  # relu experts every other layer: Switch-style, not an HF decoder
    model = nnx.eval_shape(lambda: decoder.create(cfg, nnx.Rngs(0)))  # refused before any weight is read
    with pytest.raises(ValueError, match=r"MixtralForCausalLM: model\.activation='relu' cannot be exported"):
        convert.to_hf(model, cfg, tmp_path / "out")


@pytest.mark.parametrize("name, key, value", [
    ("MixtralForCausalLM", "hidden_act", "gelu"),
    ("OlmoeForCausalLM", "clip_qkv", 8.0),
    ("Qwen2MoeForCausalLM", "mlp_only_layers", [3]),  # sparse layer 1 before dense layer 3
    ("Qwen3MoeForCausalLM", "use_sliding_window", True),
])
def test_a_setting_we_cannot_reproduce_is_an_error_naming_the_key(name, key, value, tmp_path):
    config = hf_configs()[name]
    setattr(config, key, value)
    config.architectures = [name]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"config.json: {key}={value!r} has no counterpart in moe_jax")):
        convert.read_config(tmp_path)


def test_greedy_decoding_with_the_kv_cache_matches_hf_generate(tmp_path):
    """Grouped-query attention through our KV cache (`generate`), against HF's own greedy decoding."""
    from moe_jax import generate

    reference = build_hf("MixtralForCausalLM", tmp_path / "hf")
    prompt = tokens(batch=2, length=5, seed=3)
    with torch.no_grad():
        expected = reference.generate(torch.tensor(prompt), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                      pad_token_id=0).numpy()
    model, config = convert.from_hf(tmp_path / "hf")
    got = np.asarray(generate.generate(model, config, prompt, max_new_tokens=6))
    np.testing.assert_array_equal(got, expected)


def test_the_library_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = ("import sys, moe_jax.convert, moe_jax.convert.runs; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_a_run_is_written_straight_into_the_shardings_of_its_mesh(tmp_path):
    """save_run on 8 devices with FSDP: each parameter is placed in its run sharding as it is read, and the
    restored run holds exactly from_hf's parameters."""
    from moe_jax import checkpoint
    from moe_jax.convert import runs

    build_hf("MixtralForCausalLM", tmp_path / "hf")
    (tmp_path / "train.txt").write_text("the router picks an expert\n" * 64)
    runs.save_run(tmp_path / "hf", tmp_path / "run", devices=jax.devices()[:8], overrides={
        "mesh.shape": (8, 1, 1), "mesh.fsdp": True, "data.batch_size": 8, "data.source": "text",
        "data.paths": str(tmp_path / "train.txt")})
    _, state, step = checkpoint.restore_run(tmp_path / "run", devices=jax.devices()[:8])
    restored = {path[1:]: v.get_value() for path, v in nnx.to_flat_state(state)
                if path[0] == 0 and isinstance(v, nnx.Param)}
    assert step == 0 and restored[("embedding",)].sharding.spec == jax.sharding.PartitionSpec("model", "data")
    assert len(restored[("embedding",)].sharding.device_set) == 8
    model, _ = convert.from_hf(tmp_path / "hf")
    expected = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert set(restored) == set(expected)
    assert all(np.array_equal(np.asarray(restored[p]), np.asarray(v.get_value())) for p, v in expected.items())


SWITCH = "SwitchTransformersForConditionalGeneration"


def switch_config(**overrides):
    """A tiny Switch Transformer: 4 + 4 layers, head dim 16 with d_model 32 (q wider than the model), 8 buckets
    out to distance 20 (inputs of 40 reach the log-spaced buckets), capacity above any sequence here."""
    values = dict(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=48, num_layers=4, num_decoder_layers=4,
                  num_sparse_encoder_layers=2, num_sparse_decoder_layers=4, num_heads=4, num_experts=5,
                  expert_capacity=64, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                  initializer_factor=1.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    config = transformers.SwitchTransformersConfig(**{**values, **overrides})
    config._attn_implementation = "eager"
    return config


def switch_logits(model, encoder_BL, decoder_BL):
    with torch.no_grad():
        return model(input_ids=torch.tensor(encoder_BL), decoder_input_ids=torch.tensor(decoder_BL)).logits.numpy()


@pytest.mark.parametrize("overrides", [
    dict(),  # the released checkpoints' layout: tied head (x d_model^-0.5), ReLU; experts every other encoder layer
    dict(tie_word_embeddings=False, dense_act_fn="gelu_new", num_sparse_decoder_layers=2, num_decoder_layers=2),
], ids=["tied-relu", "untied-gelu"])
def test_switch_transformers_import_matches_hf_and_export_round_trips(overrides, tmp_path):
    torch.manual_seed(0)
    reference = transformers.SwitchTransformersForConditionalGeneration(switch_config(**overrides)).eval()
    with torch.no_grad():  # untied, transformers 5 gives each stack its own embedding; T5's share one
        for stack in (reference.encoder, reference.decoder):
            stack.embed_tokens.weight.copy_(reference.shared.weight)
    reference.save_pretrained(tmp_path / "hf")
    rng = np.random.RandomState(1)
    encoder_BL, decoder_BL = rng.randint(0, VOCAB, (2, 40)), rng.randint(0, VOCAB, (2, 11))
    expected = switch_logits(reference, encoder_BL, decoder_BL)

    model, config = convert.from_hf(tmp_path / "hf")
    assert config.model.name == "encdec" and config.model.moe.dispatcher == "dropless"
    got, _ = model(jnp.asarray(encoder_BL), jnp.asarray(decoder_BL), deterministic=True)
    difference = float(np.abs(np.asarray(got) - expected).max())
    print(f"{SWITCH} {overrides}: max |logit difference| {difference:.2e} (logits up to {np.abs(expected).max():.1f})")
    assert difference <= PARITY

    out = convert.to_hf(model, config, tmp_path / "export")
    again, config_again = convert.from_hf(out)
    assert _flatten(config_again.model.to_dict()) == _flatten(config.model.to_dict())
    assert all(np.array_equal(a, b) for a, b in zip(params(model), params(again), strict=True))
    exported = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    back = float(np.abs(switch_logits(exported, encoder_BL, decoder_BL) - np.asarray(got)).max())
    print(f"{SWITCH} {overrides}: HF on our export vs ours: max |logit difference| {back:.2e}")
    assert back <= PARITY


@pytest.mark.parametrize("key, value, message", [
    ("num_sparse_encoder_layers", 1, "puts experts in every 4th layer from layer 1"),
    ("num_sparse_decoder_layers", 0, "a Switch model without experts in its decoder"),
    ("router_bias", True, "router_bias=True has no counterpart in moe_jax"),
    ("dense_act_fn", "gelu", "dense_act_fn='gelu' has no counterpart in moe_jax"),
])
def test_a_switch_layout_we_cannot_reproduce_is_an_error_naming_the_key(key, value, message, tmp_path):
    config = switch_config(**{key: value})
    config.architectures = [SWITCH]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        convert.read_config(tmp_path)


def test_the_tied_embedding_views_must_agree(tmp_path):
    from safetensors.numpy import load_file, save_file

    torch.manual_seed(0)
    transformers.SwitchTransformersForConditionalGeneration(switch_config()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    if "encoder.embed_tokens.weight" not in tensors:  # a transformers that saves only shared.weight
        tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    tensors["encoder.embed_tokens.weight"] = tensors["encoder.embed_tokens.weight"] + 1.0
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tensor encoder.embed_tokens.weight differs from shared.weight"):
        convert.from_hf(tmp_path)


def test_switch_transformers_capacity_drops_the_tokens_hf_drops(tmp_path):
    """HF's fixed expert_capacity per sequence is ours with groups of one sequence: at capacity 3 for 40 tokens
    and 5 experts most tokens are dropped, and the logits are still HF's; dropless ones are not."""
    torch.manual_seed(0)
    reference = transformers.SwitchTransformersForConditionalGeneration(switch_config(expert_capacity=3)).eval()
    reference.save_pretrained(tmp_path / "hf")
    rng = np.random.RandomState(1)
    encoder_BL, decoder_BL = rng.randint(0, VOCAB, (2, 40)), rng.randint(0, VOCAB, (2, 11))
    expected = switch_logits(reference, encoder_BL, decoder_BL)
    dropless, config = convert.from_hf(tmp_path / "hf")
    assert config.model.moe.expert_capacity == 3
    got, _ = dropless(jnp.asarray(encoder_BL), jnp.asarray(decoder_BL), deterministic=True)
    assert float(np.abs(np.asarray(got) - expected).max()) > 1e-2  # HF dropped tokens that dropless keeps
    # Each stack's routing group is one of its sequences: 40 encoder tokens, 11 decoder tokens.
    capped, _ = convert.from_hf(tmp_path / "hf", overrides={
        "moe.dispatcher": "index", "moe.group_size": 40, "moe.decoder_group_size": 11})
    got, aux = capped(jnp.asarray(encoder_BL), jnp.asarray(decoder_BL), deterministic=True)
    dropped = float(np.mean(aux["encoder"]["dropped_fraction"]))
    difference = float(np.abs(np.asarray(got) - expected).max())
    print(f"{SWITCH} at expert_capacity 3: {dropped:.0%} of encoder tokens dropped, max |logit difference| "
          f"{difference:.2e}")
    assert dropped > 0.3 and difference <= PARITY
