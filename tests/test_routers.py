"""The router registry: every entry builds, routes, is validated in config, has honest flags; the trainer hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import config_validation, dispatch, model as model_lib, moe as moe_lib, routers, train
from moe_jax.moe import MoeLayer

D, F, E, L, V = 8, 16, 4, 8, 32


def layer(router, **overrides):
    kwargs = dict(d_model=D, d_ff=F, num_experts=E, group_size=L, vocab_size=V, router=router,
                  rngs=nnx.Rngs(params=0, dropout=1))
    kwargs.update(overrides)
    return MoeLayer(**kwargs)


def inputs(batch=2, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, L, D))
    ids = jax.random.randint(jax.random.PRNGKey(seed + 1), (batch, L), 0, V)
    return x, ids


def run_config(router, **moe):
    cfg = train.default_config()
    cfg.model.update(vocab_size=cfg.data.synthetic.vocab_size, d_model=32, d_ff=64, num_layers=2, num_heads=2)
    cfg.model.moe.update(num_experts=E, every=2, group_size=64, router=router, **moe)
    cfg.data.update(source="synthetic", seq_len=32, batch_size=8)
    cfg.mesh.shape = (1, 1, 1)
    return cfg


def test_registry_names_match_the_layer_and_the_public_tuple():
    assert routers.NAMES == ("top_k", "expert_choice", "hash", "noisy_top_k", "bias_balanced")
    assert moe_lib.ROUTERS == routers.NAMES
    assert all(routers.get(name).name == name for name in routers.NAMES)


@pytest.mark.parametrize("name", routers.NAMES)
def test_every_router_builds_its_params_and_routes(name):
    spec = routers.get(name)
    moe = layer(name, k=1)
    expected = spec.make_params(lambda shape, names: nnx.Param(jnp.zeros(shape)), d_model=D, num_experts=E,
                                vocab_size=V)
    for attribute, variable in expected.items():
        assert type(getattr(moe, attribute)) is type(variable), attribute
        assert getattr(moe, attribute).shape == variable.shape, attribute
    x, ids = inputs()
    for deterministic in (True, False):
        y, aux = moe(x, token_ids=ids, deterministic=deterministic)
        assert y.shape == x.shape
        assert {"load_balancing_loss", "router_z_loss", "router_max_logit", "expert_load"} <= set(aux)
        assert all(np.isfinite(np.asarray(v)).all() for v in aux.values())


@pytest.mark.parametrize("name", routers.NAMES)
def test_every_router_passes_config_validation(name):
    cfg = run_config(name)
    config_validation.validate(cfg, num_devices=1)
    model_lib.validate_config(cfg.model)


def test_a_routers_own_config_check_runs_from_config_validation():
    with pytest.raises(ValueError, match=r"model.moe.k=2 must be 1 for model.moe.router='hash'"):
        config_validation.validate(run_config("hash", k=2), num_devices=1)


@pytest.mark.parametrize("key, value, message", [
    ("router", "top-k", r"model.moe.router='top-k' is not one of \('top_k', 'expert_choice', 'hash', "
                        r"'noisy_top_k', 'bias_balanced'\); did you mean 'top_k'\?"),
    ("router", "expert-choise", r"did you mean 'expert_choice'\?"),
    ("dispatcher", "indx", r"model.moe.dispatcher='indx' is not one of \('einsum', 'index', 'dropless'\); "
                           r"did you mean 'index'\?"),
])
def test_unknown_name_says_did_you_mean(key, value, message):
    cfg = run_config("top_k")
    cfg.model.moe[key] = value
    with pytest.raises(ValueError, match=message):
        config_validation.validate(cfg, num_devices=1)
    with pytest.raises(ValueError, match=message):  # the model checks its own config too
        model_lib.Transformer(cfg.model, rngs=nnx.Rngs(0))


def test_a_name_with_nothing_close_lists_the_names_without_a_guess():
    cfg = run_config("zzzz")
    with pytest.raises(ValueError, match=r"model.moe.router='zzzz' is not one of \([^)]*\)$"):
        config_validation.validate(cfg, num_devices=1)


@pytest.mark.parametrize("name", routers.NAMES)
def test_causal_flag_is_honest(name):
    """k=1 with drops: a causal router's earlier outputs never see later tokens; expert choice's do."""
    moe = layer(name, k=1, group_size=2 * L, eval_capacity_factor=0.5)
    x, ids = inputs(batch=4)
    y, aux = moe(x, token_ids=ids, deterministic=True)
    assert float(aux["dropped_fraction"]) > 0 or name == "expert_choice"
    changed_earlier = False
    for b, t in [(0, 2), (1, 5), (2, 0)]:
        noise = jax.random.normal(jax.random.PRNGKey(b + 7), (L - t - 1, D)) * 3
        other_ids = (ids[b, t + 1:] + 1) % V
        y2, _ = moe(x.at[b, t + 1:].add(noise), token_ids=ids.at[b, t + 1:].set(other_ids), deterministic=True)
        group = slice(b - b % 2, b + 1)
        earlier = jnp.concatenate([y[group][:-1].reshape(-1, D), y[b, :t + 1]])
        earlier2 = jnp.concatenate([y2[group][:-1].reshape(-1, D), y2[b, :t + 1]])
        if routers.get(name).causal:
            np.testing.assert_array_equal(earlier2, earlier)
        changed_earlier |= not np.array_equal(earlier2, earlier)
    assert changed_earlier != routers.get(name).causal


@pytest.mark.parametrize("name", routers.NAMES)
def test_needs_token_ids_flag_is_honest(name):
    x, _ = inputs()
    moe = layer(name)
    if routers.get(name).needs_token_ids:
        with pytest.raises(ValueError, match=f"router='{name}' needs token_ids"):
            moe(x)
    else:
        y, _ = moe(x)
        assert y.shape == x.shape


@pytest.mark.parametrize("name", routers.NAMES)
def test_draws_rng_flag_is_honest(name):
    """Without jitter or dropout only a router that draws noise makes two training calls differ."""
    moe = layer(name)
    x, ids = inputs()
    assert (moe.rng is not None) == routers.get(name).draws_rng
    y1, _ = moe(x, token_ids=ids)
    y2, _ = moe(x, token_ids=ids)
    assert np.array_equal(y1, y2) != routers.get(name).draws_rng


@pytest.mark.parametrize("dispatcher", dispatch.DISPATCHERS)
def test_only_the_dropless_dispatcher_routes_without_capacity(dispatcher):
    assert dispatch.is_dropless(dispatcher) == (dispatcher == "dropless")


# --------------------------------------------------------------------------------------------- trainer hook


def _model_and_metrics(router):
    cfg = run_config(router).model
    model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, cfg.vocab_size)
    _, metrics = model_lib.loss_fn(model, {"inputs": tokens, "targets": tokens}, deterministic=False,
                                   aux_loss_weight=0.01, z_loss_weight=0.0)
    return model, metrics


def _arrays(model):
    """A copy of every parameter and router variable (no RNG keys)."""
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.RngState)))


@pytest.mark.parametrize("name", routers.NAMES)
def test_after_step_applies_the_routers_update_and_is_a_no_op_otherwise(name):
    model, metrics = _model_and_metrics(name)
    before = _arrays(model)
    moe_lib.after_step(model, metrics)
    if routers.get(name).after_step is None:
        jax.tree.map(np.testing.assert_array_equal, _arrays(model), before)
        return
    reference, _ = _model_and_metrics(name)
    moe_lib.update_router_biases(reference, metrics["moe"]["expert_load"])
    jax.tree.map(np.testing.assert_array_equal, _arrays(model), _arrays(reference))
    bias = nnx.to_flat_state(nnx.state(model, routers.BalancingBias))
    assert len(bias) == 1 and np.any(np.asarray(bias[0][1][...]) != 0)


def test_after_step_on_a_dense_model_is_a_no_op():
    cfg = run_config("top_k").model
    cfg.moe.num_experts = 0
    model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
    moe_lib.after_step(model, {"moe": {}})


def test_after_step_refuses_two_layers_it_cannot_tell_apart():
    pair = nnx.List([layer("bias_balanced"), layer("bias_balanced")])
    with pytest.raises(ValueError, match="after_step expects at most one MoeLayer with an after-step router"):
        moe_lib.after_step(pair, {"moe": {"expert_load": jnp.zeros((E,))}})


def test_after_step_runs_under_jit():
    moe = layer("bias_balanced", bias_update_rate=0.01)

    @nnx.jit
    def step(moe, load):
        moe_lib.after_step(moe, {"moe": {"expert_load": load}})

    step(moe, jnp.array([0.4, 0.3, 0.2, 0.1]))
    np.testing.assert_allclose(moe.selection_bias[...], [-0.01, -0.01, 0.01, 0.01])
