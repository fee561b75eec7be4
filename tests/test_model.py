"""The Transformer LM: causality, packed-segment masking, scanned depth, per-layer MoE aux, precision, loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax import model as M

V, L = 64, 16


def tiny_config(**overrides):
    """2-layer d=32 model; `moe=dict(...)` overrides model.moe keys."""
    cfg = M.default_config()
    cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_layers = V, 32, 64, 2, 2
    for key, value in overrides.pop("moe", {}).items():
        cfg.moe[key] = value
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def tiny_moe(**moe):
    # group_size = L: one sequence per group, so a token's slot depends only on earlier tokens of its row.
    return {**dict(num_experts=4, k=1, every=2, group_size=L), **moe}


@nnx.jit
def _forward(model, inputs, kwargs):
    return model(inputs, deterministic=True, **kwargs)


def forward(model, inputs, **kwargs):
    """Eval-mode logits (numpy) and aux; compiled once per model structure and input shapes."""
    logits, aux = _forward(model, inputs, kwargs)
    return np.asarray(logits), aux


def random_tokens(seed, shape=(2, L)):
    return jnp.asarray(np.random.RandomState(seed).randint(0, V, shape), jnp.int32)


# --------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("moe", [dict(num_experts=0), tiny_moe(capacity_factor=0.5, eval_capacity_factor=0.5)],
                         ids=["dense", "moe_top1_dropping"])
def test_decoder_is_causal_end_to_end(moe):
    """Changing tokens t+1.. never changes logits at positions <= t (also when the MoE layer drops tokens)."""
    model = M.Transformer(tiny_config(moe=moe), rngs=nnx.Rngs(0))
    inputs = random_tokens(0)
    logits, aux = forward(model, inputs)
    if moe["num_experts"]:
        assert float(jnp.max(aux["dropped_fraction"])) > 0, "capacity 0.5 should drop tokens"
    for t in (0, 5, L - 2):
        changed = inputs.at[:, t + 1:].set((inputs[:, t + 1:] + 7) % V)
        new_logits, _ = forward(model, changed)
        np.testing.assert_array_equal(new_logits[:, :t + 1], logits[:, :t + 1])
        assert not np.allclose(new_logits[:, t + 1:], logits[:, t + 1:])


@pytest.mark.parametrize("moe", [dict(num_experts=0), tiny_moe(capacity_factor=4.0, eval_capacity_factor=4.0)],
                         ids=["dense", "moe_dropless"])
def test_packed_documents_do_not_see_each_other(moe):
    """A document packed after another gets the logits it gets alone (positions reset, padding after)."""
    model = M.Transformer(tiny_config(moe=moe), rngs=nnx.Rngs(1))
    doc_a, doc_b = random_tokens(1, (5,)), random_tokens(2, (7,))
    pad = L - 12
    packed = jnp.concatenate([doc_a, doc_b, jnp.zeros(pad, jnp.int32)])[None]
    packed_seg = jnp.asarray([[1] * 5 + [2] * 7 + [0] * pad])
    packed_pos = jnp.asarray([list(range(5)) + list(range(7)) + list(range(pad))])
    alone = jnp.concatenate([doc_b, jnp.zeros(L - 7, jnp.int32)])[None]
    alone_seg = jnp.asarray([[1] * 7 + [0] * (L - 7)])
    alone_pos = jnp.asarray([list(range(7)) + list(range(L - 7))])

    packed_logits, _ = forward(model, packed, segment_ids=packed_seg, positions=packed_pos)
    alone_logits, _ = forward(model, alone, segment_ids=alone_seg, positions=alone_pos)
    np.testing.assert_allclose(packed_logits[0, 5:12], alone_logits[0, :7], rtol=1e-5, atol=1e-5)
    # Without segment ids doc B would see doc A: the mask is what makes them equal.
    unmasked_logits, _ = forward(model, packed, positions=packed_pos)
    assert not np.allclose(unmasked_logits[0, 5:12], alone_logits[0, :7], atol=1e-3)


def test_attention_mask_is_causal_and_per_segment():
    mask = np.asarray(M.attention_mask(jnp.asarray([[1, 1, 2, 2, 0]])))[0, 0]
    expected = np.array([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 0, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_rotary_scores_depend_only_on_relative_position():
    rng = np.random.RandomState(0)
    q, k = (jnp.asarray(rng.randn(1, 1, 1, 8), jnp.float32) for _ in range(2))

    def score(pos_q, pos_k):
        return float(jnp.sum(M.rotary(q, jnp.asarray([[pos_q]]), 10_000.0)
                             * M.rotary(k, jnp.asarray([[pos_k]]), 10_000.0)))

    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


# --------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("num_layers", [4, 8])
def test_layers_are_scanned_blocks(num_layers):
    cfg = tiny_config(num_layers=num_layers, moe=tiny_moe())
    model = M.Transformer(cfg, rngs=nnx.Rngs(0))
    blocks = num_layers // 2
    assert model.blocks.layers[0].attention.query.shape == (blocks, 32, 2, 16)
    assert model.blocks.layers[0].attention.query.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "kv")
    assert not model.blocks.layers[0].is_moe and model.blocks.layers[1].is_moe
    logits, aux = forward(model, random_tokens(0))
    assert logits.shape == (2, L, V) and logits.dtype == np.float32
    # aux: every MoE layer's metrics, stacked on a leading MoE-layer axis.
    assert aux["load_balancing_loss"].shape == (blocks,)
    assert aux["router_z_loss"].shape == (blocks,)
    assert aux["dropped_fraction"].shape == (blocks,)
    assert aux["expert_load"].shape == (blocks, 4)
    np.testing.assert_allclose(np.asarray(aux["expert_load"]).sum(-1), 1.0, rtol=1e-5)


def test_first_dense_layers_run_before_the_moe_blocks():
    """`moe.first_dense_layers=1` with 5 layers: a dense layer, then two blocks of (dense, MoE)."""
    model = M.Transformer(tiny_config(num_layers=5, moe=tiny_moe(first_dense_layers=1)), rngs=nnx.Rngs(0))
    assert model.dense_blocks.layers[0].attention.query.shape == (1, 32, 2, 16)
    assert not model.dense_blocks.layers[0].is_moe and len(model.dense_blocks.layers) == 1
    assert model.blocks.layers[0].attention.query.shape == (2, 32, 2, 16)
    _, aux = forward(model, random_tokens(0))
    assert aux["expert_load"].shape == (2, 4)
    # The prefix is part of the function: changing its weights changes the logits.
    before, _ = forward(model, random_tokens(0))
    model.dense_blocks.layers[0].ffn.wo[...] *= 2.0
    after, _ = forward(model, random_tokens(0))
    assert float(jnp.abs(after - before).max()) > 1e-4
    with pytest.raises(ValueError, match=r"model.num_layers=4 minus model.moe.first_dense_layers=1 .*every=2"):
        M.Transformer(tiny_config(num_layers=4, moe=tiny_moe(first_dense_layers=1)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"model.moe.first_dense_layers=4 must be an integer in \[0, "):
        M.Transformer(tiny_config(num_layers=4, moe=tiny_moe(first_dense_layers=4)), rngs=nnx.Rngs(0))


def test_program_size_does_not_grow_with_depth():
    """The blocks run in one scan: 4 and 8 layers trace to the same program (so compile time stays flat)."""

    def program(num_layers):
        model = M.Transformer(tiny_config(num_layers=num_layers, moe=tiny_moe()), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x, deterministic=True))(
            state, random_tokens(0))
        return len(str(jaxpr).splitlines())

    assert program(4) == program(8)


def test_dense_baseline_has_no_experts():
    model = M.Transformer(tiny_config(num_layers=3, moe=dict(num_experts=0, every=2)), rngs=nnx.Rngs(0))
    logits, aux = forward(model, random_tokens(0))
    assert aux == {} and logits.shape == (2, L, V)
    counts = M.count_params(model)
    d, f, layers = 32, 64, 3
    per_layer = 4 * d * d + 2 * d * f + 2 * d
    assert counts == dict(total=V * d + layers * per_layer + d, embedding=V * d, expert=0,
                          active=V * d + layers * per_layer + d, active_non_embedding=layers * per_layer + d)


def test_moe_active_params_count_k_of_e_experts():
    model = M.Transformer(tiny_config(moe=tiny_moe(k=2)), rngs=nnx.Rngs(0))
    counts = M.count_params(model)
    assert counts["expert"] > 0
    assert counts["active"] == counts["total"] - counts["expert"] + counts["expert"] * 2 // 4
    flops = M.flops_per_token(model, seq_len=L)
    assert flops == 6 * (counts["active_non_embedding"] + 32 * V) + 12 * 2 * 2 * 16 * L


def test_bad_config_values_name_their_key():
    with pytest.raises(ValueError, match=r"model.num_layers=3.*model.moe.every=2"):
        M.Transformer(tiny_config(num_layers=3, moe=tiny_moe()), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.activation='tanh'"):
        M.Transformer(tiny_config(activation="tanh"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.dtype='float16'"):
        M.Transformer(tiny_config(dtype="float16"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.remat='sometimes'"):
        M.Transformer(tiny_config(remat="sometimes"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.moe.k=5"):
        M.Transformer(tiny_config(moe=tiny_moe(k=5)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.moe.expert_capacity=0 must be a positive integer"):
        M.Transformer(tiny_config(moe=tiny_moe(expert_capacity=0)), rngs=nnx.Rngs(0))


def test_a_fixed_expert_capacity_replaces_the_capacity_factors():
    """`model.moe.expert_capacity=1`: one slot per expert per group, in training and evaluation alike."""
    inputs = random_tokens(0)
    for deterministic in (True, False):
        model = M.Transformer(tiny_config(moe=tiny_moe(expert_capacity=1, dispatcher="index")), rngs=nnx.Rngs(0))
        _, aux = model(inputs, deterministic=deterministic)
        groups = inputs.size // L
        np.testing.assert_array_equal(aux["expert_rows_computed"], 4 * groups)  # 4 experts x 1 slot per group
        assert float(np.min(aux["dropped_fraction"])) >= 1 - 4 / L


def test_dropout_only_in_training():
    model = M.Transformer(tiny_config(dropout=0.5), rngs=nnx.Rngs(params=0, dropout=1))
    inputs = random_tokens(0)
    train = nnx.jit(lambda m, x: m(x, deterministic=False)[0])
    first, second = np.asarray(train(model, inputs)), np.asarray(train(model, inputs))
    assert not np.allclose(first, second)  # fresh dropout masks each step
    np.testing.assert_array_equal(forward(model, inputs)[0], forward(model, inputs)[0])


# --------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_bfloat16_compute_keeps_float32_params_and_grads(activation):
    cfg = tiny_config(dtype="bfloat16", activation=activation, tie_embeddings=False, remat="full",
                      moe=tiny_moe())
    model = M.Transformer(cfg, rngs=nnx.Rngs(0))
    inputs = random_tokens(3)
    batch = dict(inputs=inputs, targets=inputs)

    @nnx.jit
    def grads_and_logits(model, batch):
        loss = lambda m: M.loss_fn(m, batch, deterministic=True, aux_loss_weight=0.01, z_loss_weight=0.001)[0]
        return nnx.grad(loss)(model), model(batch["inputs"], deterministic=True)[0]

    grads, logits = grads_and_logits(model, batch)
    assert logits.dtype == jnp.float32
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    # The same weights in float32 give nearly the same logits (bf16 has ~3 significant digits).
    cfg32 = tiny_config(activation=activation, tie_embeddings=False, moe=tiny_moe())
    model32 = M.Transformer(cfg32, rngs=nnx.Rngs(0))
    logits32, _ = forward(model32, inputs)
    np.testing.assert_allclose(np.asarray(logits), logits32, atol=0.1)


# --------------------------------------------------------------------------------------------- loss


def test_loss_fn_weights_tokens_and_adds_router_losses():
    model = M.Transformer(tiny_config(moe=tiny_moe()), rngs=nnx.Rngs(0))
    inputs, targets = random_tokens(4), random_tokens(5)
    weights = jnp.asarray(np.random.RandomState(6).rand(2, L) > 0.3, jnp.float32)
    batch = dict(inputs=inputs, targets=targets, loss_weights=weights)
    loss, metrics = nnx.jit(lambda m, b: M.loss_fn(m, b, deterministic=True, aux_loss_weight=0.5,
                                                   z_loss_weight=0.25))(model, batch)
    logits, aux = forward(model, inputs)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    w = np.asarray(weights)
    ce = (nll * w).sum() / w.sum()
    acc = ((logits.argmax(-1) == np.asarray(targets)) * w).sum() / w.sum()
    lb, z = float(jnp.mean(aux["load_balancing_loss"])), float(jnp.mean(aux["router_z_loss"]))
    assert lb > 0 and z > 0
    assert float(metrics["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(acc, abs=1e-6)
    assert float(loss) == pytest.approx(ce + 0.5 * lb + 0.25 * z, rel=1e-5)
    assert float(metrics["num_tokens"]) == w.sum()
    assert metrics["moe"]["expert_load"].shape == (1, 4)


@pytest.mark.parametrize("moe", [dict(num_experts=0), tiny_moe()], ids=["dense", "moe"])
def test_loss_falls_with_adam_on_a_repeated_batch(moe):
    model = M.Transformer(tiny_config(moe=moe), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    inputs = random_tokens(7, (4, L))
    batch = dict(inputs=inputs, targets=jnp.roll(inputs, -1, axis=1), loss_weights=jnp.ones((4, L)))

    @nnx.jit
    def step(model, optimizer, batch):
        loss_of = lambda m: M.loss_fn(m, batch, deterministic=False, aux_loss_weight=0.01, z_loss_weight=0.0)
        (loss, _), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, batch)) for _ in range(30)]
    # Tied embeddings start out predicting the input token, so the first loss sits above log V.
    assert np.log(V) * 0.9 < losses[0] < np.log(V) * 1.6, losses
    assert losses[-1] < 0.5 * losses[0], losses
