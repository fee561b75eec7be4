"""KV-cache generation equals recomputing the whole sequence; prompts of different lengths; EOS; sampling;
clear errors; and the sample CLI end to end on a tiny trained run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import generate, models, train


def tiny_config(num_experts, dispatcher="index", k=1):
    cfg = train.default_config()
    cfg.model.update(vocab_size=64, d_model=32, d_ff=64, num_layers=4, num_heads=2)
    # group_size 1: every token is its own routing group, so the recomputed reference drops nothing either
    cfg.model.moe.update(num_experts=num_experts, every=2, group_size=1, dispatcher=dispatcher, k=k)
    return cfg


def make_model(cfg):
    return models.get(cfg).create(cfg.model, nnx.Rngs(params=0, dropout=1))


def greedy_by_recomputing(model, prompt, steps):
    """The obviously-correct reference: a full forward pass over the whole sequence for every new token."""
    tokens = list(prompt)
    for _ in range(steps):
        logits, _ = model(jnp.asarray([tokens], jnp.int32), deterministic=True)
        tokens.append(int(jnp.argmax(logits[0, -1])))
    return tokens


@pytest.mark.parametrize("num_experts, dispatcher, k", [(0, "index", 1), (4, "index", 1), (4, "index", 2),
                                                       (4, "einsum", 1), (4, "einsum", 2), (4, "dropless", 1),
                                                       (4, "dropless", 2)])
def test_cached_greedy_equals_recomputing_the_sequence(num_experts, dispatcher, k):
    cfg = tiny_config(num_experts, dispatcher, k)
    model = make_model(cfg)
    prompt = [5, 9, 2, 33, 7]
    got = generate.generate(model, cfg, [prompt], max_new_tokens=8)
    assert got.shape == (1, 13)
    assert got[0].tolist() == greedy_by_recomputing(model, prompt, 8)


def test_cached_greedy_with_dense_layers_before_the_moe_blocks():
    cfg = tiny_config(4)
    cfg.model.num_layers = 5
    cfg.model.moe.first_dense_layers = 1
    model = make_model(cfg)
    prompt = [5, 9, 2, 33, 7]
    assert generate.generate(model, cfg, [prompt], max_new_tokens=6)[0].tolist() == greedy_by_recomputing(
        model, prompt, 6)


def test_prefill_logits_equal_the_full_forward_logits():
    cfg = tiny_config(4, "index", 2)
    model = make_model(cfg)
    prompt = jnp.asarray([[5, 9, 2, 33, 7, 1, 40, 3]], jnp.int32)
    full, _ = model(prompt, deterministic=True)
    valid = jnp.ones((1, 64), bool)
    slots = jnp.arange(8)[None]
    cached, _, _ = model.decode(prompt, positions_BL=slots, mask_B1LT=generate.decode_mask(valid, slots),
                                padding_mask_BL=jnp.ones((1, 8), bool), cache=model.init_cache(1, 64),
                                index=jnp.zeros((), jnp.int32))
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)


def test_prompts_of_different_lengths_each_match_their_own_generation():
    cfg = tiny_config(4)
    model = make_model(cfg)
    prompts = [[3, 4, 5, 6, 7, 8], [10], [11, 12, 13]]
    batch = generate.generate(model, cfg, prompts, max_new_tokens=6)
    for row, prompt in zip(batch, prompts):
        alone = generate.generate(model, cfg, [prompt], max_new_tokens=6)[0]
        assert row[:len(prompt)].tolist() == prompt
        assert row[len(prompt):len(prompt) + 6].tolist() == alone[len(prompt):].tolist()


def test_eos_stops_a_sequence_and_pads_after_it():
    cfg = tiny_config(0)
    model = make_model(cfg)
    free = generate.generate(model, cfg, [[1, 2, 3]], max_new_tokens=8)[0].tolist()
    eos = free[4]  # the second generated token
    stopped = generate.generate(model, cfg, [[1, 2, 3]], max_new_tokens=8, eos_id=eos, pad_id=0)[0].tolist()
    first = free.index(eos, 3)
    assert stopped[:first + 1] == free[:first + 1] and set(stopped[first + 1:]) <= {0}


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    cfg = tiny_config(4)
    model = make_model(cfg)
    kwargs = dict(max_new_tokens=8, temperature=1.0, rng=jax.random.key(3))
    a = generate.generate(model, cfg, [[1, 2], [3, 4]], **kwargs)
    np.testing.assert_array_equal(a, generate.generate(model, cfg, [[1, 2], [3, 4]], **kwargs))
    np.testing.assert_array_equal(generate.generate(model, cfg, [[1, 2]], top_k=1, **kwargs),
                                  generate.generate(model, cfg, [[1, 2]], max_new_tokens=8))


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_BL=[[]], max_new_tokens=4), "at least one token"),
    (dict(prompt_BL=[[1, 99]], max_new_tokens=4), "token id 99 is outside"),
    (dict(prompt_BL=[[1]], max_new_tokens=0), "max_new_tokens=0"),
    (dict(prompt_BL=[[1]], max_new_tokens=2, temperature=0.5), "needs rng"),
    (dict(prompt_BL=[[1]], max_new_tokens=2, top_p=2.0, temperature=1.0, rng=jax.random.key(0)), "top_p=2.0"),
])
def test_bad_arguments_name_themselves(kwargs, message):
    cfg = tiny_config(0)
    with pytest.raises(ValueError, match=message):
        generate.generate(make_model(cfg), cfg, **kwargs)


def test_sample_cli_prints_text_from_a_trained_run(tmp_path):
    """The README's sample command on a tiny byte-level run trained here for 2 steps."""
    import pathlib

    from cli_checks import assert_user_error, run_cli

    root = pathlib.Path(__file__).resolve().parents[1]
    (tmp_path / "text.txt").write_text("".join(f"the expert routes token {i}\n" for i in range(200)))
    cfg = tiny_config(4)
    cfg.model.vocab_size = 259
    cfg.model.moe.group_size = 64
    cfg.data.update(source="text", paths=str(tmp_path / "text.txt"), seq_len=32, batch_size=4)
    cfg.train.update(steps=2, log_every=1, eval_every=2, eval_steps=1, checkpoint_every=2, warmup_steps=1,
                     peak_flops_per_device=1e9)
    train.train(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
    done = run_cli("moe_jax.sample", [f"--workdir={tmp_path / 'run'}", "--prompt=the expert", "--max_new_tokens=8",
                                      "--temperature=0.8", "--top_p=0.95", "--num_samples=2", "--seed=1"], root)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = [line for line in done.stdout.splitlines() if line.startswith("the expert")]
    assert len(samples) == 2 and "--- sample 2/2" in done.stdout
    # --trace, read back and replayed: the teacher-forced pass routes exactly as the generation did
    from moe_jax import checkpoint, traces

    trace_file = tmp_path / "trace.jsonl"
    done = run_cli("moe_jax.sample", [f"--workdir={tmp_path / 'run'}", "--prompt=the expert", "--max_new_tokens=5",
                                      f"--trace={trace_file}"], root)
    assert done.returncode == 0 and "wrote" in done.stdout, done.stderr[-3000:]
    tokens, replay, recorded = traces.read(trace_file)
    assert recorded.sum() == len("the expert") + 4 and "moe_layers" in trace_file.read_text()
    model, _ = checkpoint.restore_model(tmp_path / "run", devices=jax.devices()[:1])
    width = 64 - tokens.shape[1]  # the run routes in groups of 64 tokens: pad the row to one group
    tokens, recorded = np.pad(tokens, ((0, 0), (0, width))), np.pad(recorded, ((0, 0), (0, width)))
    replay = tuple(jnp.pad(a, ((0, 0), (0, 0), (0, width), (0, 0))) for a in replay)
    _, aux = model(jnp.asarray(tokens), segment_ids=jnp.asarray(traces.segment_ids(recorded)), deterministic=True,
                   return_routing=True, replay=replay)
    np.testing.assert_array_equal(np.asarray(aux["expert_index"])[:, recorded], np.asarray(replay[0])[:, recorded])
    assert_user_error(run_cli("moe_jax.sample", [f"--workdir={tmp_path / 'nope'}", "--prompt=x"], root),
                      "no such run directory")


def test_trace_is_the_routing_of_a_full_forward_pass_and_replays_exactly():
    cfg = tiny_config(4)
    model = make_model(cfg)
    prompt = [5, 9, 2, 33, 7]
    tokens, trace = generate.generate(model, cfg, [prompt], max_new_tokens=6, trace=True)
    read = int(trace["recorded"][0].sum())
    assert read == len(prompt) + 5  # every token the model read: the last generated one is never read
    seq = jnp.asarray(tokens[:, :read])
    _, aux = model(seq, deterministic=True, return_routing=True)
    np.testing.assert_array_equal(aux["expert_index"], trace["expert_index"][:, :, :read])
    np.testing.assert_allclose(aux["routing_weight"], trace["weight"][:, :, :read], rtol=1e-5, atol=1e-6)

    # Router replay: a model whose router changed routes otherwise, unless the trace is replayed.
    changed = make_model(cfg)
    moe_layers = [m for _, m in nnx.iter_graph(changed) if type(m).__name__ == "MoeLayer"]
    for layer in moe_layers:
        layer.router_kernel[...] = -layer.router_kernel[...]
    replay = (jnp.asarray(trace["expert_index"][:, :, :read]), jnp.asarray(trace["weight"][:, :, :read]))
    _, free = changed(seq, deterministic=True, return_routing=True)
    _, replayed = changed(seq, deterministic=True, return_routing=True, replay=replay)
    assert not np.array_equal(free["expert_index"], trace["expert_index"][:, :, :read])
    np.testing.assert_array_equal(replayed["expert_index"], trace["expert_index"][:, :, :read])
    # replaying a model's own trace changes nothing
    own, _ = model(seq, deterministic=True)
    again, _ = model(seq, deterministic=True, replay=replay)
    np.testing.assert_allclose(own, again, rtol=1e-5, atol=1e-5)
