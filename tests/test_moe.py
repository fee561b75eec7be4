"""MoeLayer: routed output against the NumPy reference, dropping, causality, precision, routers x dispatchers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference
from moe_jax import dispatch, routing
from moe_jax.moe import ROUTERS, MoeLayer, update_router_biases

D, F, E, L = 8, 16, 4, 8


def layer(**overrides):
    kwargs = dict(d_model=D, d_ff=F, num_experts=E, group_size=L, vocab_size=32, rngs=nnx.Rngs(0))
    kwargs.update(overrides)
    return MoeLayer(**kwargs)


def tokens(batch=2, length=L, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, length, D))


def route_to_expert_zero(moe):
    """Router kernel that sends every token whose feature 0 is positive to expert 0."""
    moe.router_kernel[...] = jnp.zeros((D, moe.num_experts)).at[0, 0].set(50.0)


def expected_output(moe, x_BLd, capacity, k=1, padding_mask=None):
    """The reference: route_top_k on the layer's float32 logits, then the per-token NumPy loop."""
    B, Ln, d = x_BLd.shape
    S = moe.group_size
    x_GSd = x_BLd.reshape(-1, S, d)
    logits = jnp.einsum("GSd,dE->GSE", x_GSd, moe.router_kernel[...])
    mask = None if padding_mask is None else padding_mask.reshape(-1, S)
    route = routing.route_top_k(logits, k=k, capacity=capacity, padding_mask=mask)
    gate = None if moe.wi_gate is None else np.asarray(moe.wi_gate[...])
    y = reference.routing_forward(np.asarray(x_GSd), route, wi=np.asarray(moe.wi[...]), wo=np.asarray(moe.wo[...]),
                                  wi_gate=gate, activation=moe.activation)
    return y.reshape(B, Ln, d)


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu", "geglu"])
def test_output_matches_reference_for_each_activation(activation):
    moe = layer(activation=activation, k=2, capacity_factor=0.75, eval_capacity_factor=0.75)
    x = tokens()
    capacity = routing.expert_capacity(L, E, 0.75, k=2)
    y, _ = moe(x, deterministic=True)
    np.testing.assert_allclose(y, expected_output(moe, x, capacity, k=2), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dispatcher", ["einsum", "index"])
def test_dropped_tokens_get_exactly_zero_from_the_routed_experts(dispatcher):
    """All tokens want expert 0, capacity 1 per group: only the first token of each group is served."""
    moe = layer(dispatcher=dispatcher, capacity_factor=0.5)
    route_to_expert_zero(moe)
    x = jnp.abs(tokens())
    y, aux = moe(x)
    assert routing.expert_capacity(L, E, 0.5) == 1
    assert np.all(np.asarray(y[:, 1:]) == 0.0)
    assert np.all(np.any(np.asarray(y[:, 0]) != 0.0, axis=-1))
    np.testing.assert_allclose(aux["dropped_fraction"], 1 - 1 / L)


def test_router_gets_gradient_through_the_combine_weights_with_top1():
    moe = layer(k=1)
    x = tokens()
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def task_loss(params):  # no auxiliary loss: the only path to the router is the combine weight
        y, _ = nnx.merge(graphdef, params, rest)(x, deterministic=True)
        return jnp.sum(y ** 2)

    grads = jax.grad(task_loss)(params)
    assert float(jnp.abs(grads["router_kernel"][...]).max()) > 0


@pytest.mark.parametrize("dispatcher", ["einsum", "index", "dropless"])
def test_default_routing_is_causal(dispatcher):
    """Perturbing tokens after t in a sequence never changes that sequence's outputs at <= t, nor earlier
    sequences of the group (training capacity factor small enough to drop)."""
    moe = layer(dispatcher=dispatcher, capacity_factor=0.5, group_size=2 * L)
    x = tokens(batch=4)
    y, aux = moe(x, deterministic=False)
    assert float(aux["dropped_fraction"]) > 0 or dispatcher == "dropless"
    for b, t in [(0, 2), (1, 5), (2, 0)]:
        noise = jax.random.normal(jax.random.PRNGKey(b + 7), (L - t - 1, D)) * 3
        y2, _ = moe(x.at[b, t + 1:].add(noise), deterministic=False)
        np.testing.assert_array_equal(y2[b, :t + 1], y[b, :t + 1])
        np.testing.assert_array_equal(y2[:b - b % 2], y[:b - b % 2])  # earlier groups untouched
        if b % 2 == 1:
            np.testing.assert_array_equal(y2[b - 1], y[b - 1])  # the earlier sequence of the same group


def test_router_math_is_float32_under_a_bfloat16_model():
    moe = layer(dtype=jnp.bfloat16)
    x = tokens()
    y, aux = moe(x, deterministic=True)
    assert y.dtype == jnp.bfloat16
    for name in ("load_balancing_loss", "router_z_loss", "router_entropy", "top1_prob", "expert_load"):
        assert aux[name].dtype == jnp.float32, name
    # The router sees the bf16 activations but multiplies them in float32: z-loss to float32 precision.
    x_f32 = x.astype(jnp.bfloat16).astype(jnp.float32).reshape(-1, L, D)
    logits = jnp.einsum("GSd,dE->GSE", x_f32, moe.router_kernel[...], precision="highest")
    np.testing.assert_allclose(aux["router_z_loss"], routing.router_z_loss(logits), rtol=1e-6)
    bf16_router = layer(dtype=jnp.bfloat16, router_dtype=jnp.bfloat16)
    _, aux_bf16 = bf16_router(x, deterministic=True)
    assert abs(float(aux_bf16["router_z_loss"]) - float(aux["router_z_loss"])) > 1e-7  # the ablation differs


def test_shared_experts_add_an_always_on_ffn():
    moe = layer(num_shared_experts=2)
    assert moe.shared_wi.shape == (D, 2 * F)
    x = tokens()
    routed_only = layer(num_shared_experts=0)
    y, _ = moe(x, deterministic=True)
    for name in ("router_kernel", "wi", "wo"):
        getattr(routed_only, name)[...] = getattr(moe, name)[...]
    y_routed, _ = routed_only(x, deterministic=True)
    x_np = np.asarray(x, np.float64)
    shared = np.maximum(x_np @ np.asarray(moe.shared_wi[...]), 0) @ np.asarray(moe.shared_wo[...])
    np.testing.assert_allclose(y, np.asarray(y_routed) + shared, rtol=1e-4, atol=1e-6)


def test_fine_grained_experts_many_small_experts_large_k():
    moe_kwargs = dict(d_model=D, d_ff=4, num_experts=64, k=8, group_size=16, capacity_factor=1.0,
                      eval_capacity_factor=1.0)
    x = tokens(batch=2, length=16)
    outputs = {}
    for dispatcher in dispatch.DISPATCHERS:
        moe = MoeLayer(dispatcher=dispatcher, rngs=nnx.Rngs(3), **moe_kwargs)
        outputs[dispatcher], aux = moe(x, deterministic=True)
        assert aux["expert_load"].shape == (64,)
    capacity = routing.expert_capacity(16, 64, 1.0, k=8)
    np.testing.assert_allclose(outputs["einsum"], expected_output(moe, x, capacity, k=8), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(outputs["index"], outputs["einsum"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["dropless"], expected_output(moe, x, None, k=8), rtol=1e-4, atol=1e-6)


def test_group_size_that_does_not_fit_raises():
    with pytest.raises(ValueError, match=r"group_size=6 does not fit the 16 tokens \(batch 2 x length 8\)"):
        layer(group_size=6)(tokens())
    with pytest.raises(ValueError, match=r"group_size=32 does not fit the 16 tokens"):
        layer(group_size=32)(tokens())
    y, _ = layer(group_size=4)(tokens())  # a sequence cut into two groups is fine
    assert y.shape == (2, L, D)


def test_bad_names_and_values_raise():
    with pytest.raises(ValueError, match=r"router must be one of \('top_k', 'expert_choice', 'hash', 'noisy_top_k', "
                                         r"'bias_balanced'\), got 'switch'"):
        layer(router="switch")
    with pytest.raises(ValueError, match=r"dispatcher must be one of \('einsum', 'index', 'dropless'\), got 'scatter'"):
        layer(dispatcher="scatter")
    with pytest.raises(ValueError, match="activation must be one of"):
        layer(activation="tanh")
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, num_experts=4\], got 5"):
        layer(k=5)
    with pytest.raises(ValueError, match="capacity_factor must be > 0, got 0"):
        layer(capacity_factor=0)
    with pytest.raises(ValueError, match="router='hash' needs vocab_size"):
        layer(router="hash", vocab_size=None)
    with pytest.raises(ValueError, match="router='hash' needs token_ids"):
        layer(router="hash")(tokens())


def test_eval_capacity_factor_applies_when_deterministic():
    """Every token on expert 0: train capacity ceil(8 * 0.5 / 4) = 1, eval ceil(8 * 2 / 4) = 4 per group."""
    moe = layer(capacity_factor=0.5, eval_capacity_factor=2.0)
    route_to_expert_zero(moe)
    x = jnp.abs(tokens())
    _, train_aux = moe(x, deterministic=False)
    _, eval_aux = moe(x, deterministic=True)
    np.testing.assert_allclose(train_aux["dropped_fraction"], 1 - 1 / L)
    np.testing.assert_allclose(eval_aux["dropped_fraction"], 1 - 4 / L)


def test_padding_is_not_routed_and_not_in_losses():
    moe = layer(capacity_factor=0.5)
    route_to_expert_zero(moe)
    x = jnp.abs(tokens())
    padding = jnp.ones((2, L), bool).at[:, :3].set(False)  # first three tokens of each row are padding
    y, aux = moe(x, padding_mask=padding)
    assert np.all(np.asarray(y[:, :3]) == 0.0)
    assert np.all(np.any(np.asarray(y[:, 3]) != 0.0, axis=-1))  # the first real token takes the slot
    np.testing.assert_allclose(aux["dropped_fraction"], 1 - 1 / 5)
    y2, aux2 = moe(x.at[:, :3].set(100.0), padding_mask=padding)  # padding content changes nothing
    np.testing.assert_array_equal(y2, y)
    for name in aux:
        np.testing.assert_allclose(aux2[name], aux[name], err_msg=name)


@pytest.mark.parametrize("router", ROUTERS)
def test_each_router_runs_through_each_dispatcher_with_the_same_output(router):
    x = tokens()
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, L), 0, 32)
    outputs = []
    for dispatcher in dispatch.DISPATCHERS:
        moe = layer(router=router, dispatcher=dispatcher, k=2, capacity_factor=4.0, eval_capacity_factor=4.0)
        y, aux = moe(x, token_ids=ids, deterministic=True)
        assert y.shape == x.shape and aux["expert_load"].shape == (E,)
        assert all(np.isfinite(np.asarray(v)).all() for v in aux.values())
        if router == "noisy_top_k":
            assert {"importance_loss", "load_loss"} <= set(aux)
        outputs.append(y)
        y_train, _ = moe(x, token_ids=ids)  # training mode runs too (noise, jitter off by default)
        assert y_train.shape == x.shape
    for y in outputs[1:]:
        np.testing.assert_allclose(y, outputs[0], rtol=1e-5, atol=1e-6)


def test_noise_jitter_and_dropouts_only_in_training():
    moe = layer(router="noisy_top_k", jitter=0.1, expert_dropout=0.3, dropout=0.3)
    x = tokens()
    eval_1, _ = moe(x, deterministic=True)
    eval_2, _ = moe(x, deterministic=True)
    np.testing.assert_array_equal(eval_1, eval_2)
    train_1, _ = moe(x)
    train_2, _ = moe(x)
    assert not np.allclose(train_1, train_2)


def test_bias_balanced_router_bias_moves_against_the_load():
    moe = layer(router="bias_balanced", bias_update_rate=0.01)
    assert not isinstance(moe.selection_bias, nnx.Param)
    assert "selection_bias" not in nnx.state(moe, nnx.Param)
    load = jnp.array([0.4, 0.3, 0.2, 0.1])
    update_router_biases(moe, load)
    np.testing.assert_allclose(moe.selection_bias[...], [-0.01, -0.01, 0.01, 0.01])
    y, aux = moe(tokens())
    assert aux["expert_load"].shape == (E,)
    with pytest.raises(ValueError, match="update_router_biases expects one bias_balanced MoeLayer"):
        update_router_biases(layer(), load)


def test_params_carry_logical_axis_names_and_switch_init():
    moe = MoeLayer(d_model=256, d_ff=512, num_experts=E, activation="swiglu", num_shared_experts=1,
                   init_scale=0.1, rngs=nnx.Rngs(0))
    names = {path: v.get_metadata()["out_sharding"]
             for path, v in nnx.to_flat_state(nnx.state(moe, nnx.Param))}
    assert names[("wi",)] == ("expert", "embed", "mlp")
    assert names[("wi_gate",)] == ("expert", "embed", "mlp")
    assert names[("wo",)] == ("expert", "mlp", "embed")
    assert names[("router_kernel",)] == ("embed", None)
    assert moe.router_kernel.dtype == jnp.float32 and moe.wi.dtype == jnp.float32
    np.testing.assert_allclose(np.std(moe.wi[...]), math.sqrt(0.1 / 256), rtol=0.03)
    np.testing.assert_allclose(np.std(moe.wo[...]), math.sqrt(0.1 / 512), rtol=0.03)
    np.testing.assert_allclose(np.std(moe.router_kernel[...]), math.sqrt(0.1 / 256), rtol=0.1)
    assert np.abs(moe.wi[...]).max() <= 2 * math.sqrt(0.1 / 256) / 0.8796 + 1e-6  # truncated at 2 sigma


def test_layer_under_nnx_jit():
    moe = layer(k=2, dispatcher="dropless")
    x = tokens()

    @nnx.jit
    def run(moe, x):
        return moe(x, deterministic=True)

    y, aux = run(moe, x)
    y_eager, _ = moe(x, deterministic=True)
    np.testing.assert_allclose(y, y_eager, rtol=1e-5, atol=1e-6)


def test_readme_layer_snippet_runs():
    import pathlib
    import re
    import subprocess
    import sys

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("<!-- dispatch:start -->"):readme.index("<!-- dispatch:end -->")]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120,
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("(2, 16, 64)")


def test_decode_mode_routes_the_step_as_one_group_and_drops_nothing():
    """Generation: a token's output does not depend on the other sequences of the batch (nothing dropped)."""
    layer = MoeLayer(d_model=16, d_ff=32, num_experts=4, group_size=64, capacity_factor=0.5, rngs=nnx.Rngs(0))
    x_B1d = jax.random.normal(jax.random.key(1), (6, 1, 16))
    y_B1d, aux = layer(x_B1d, decode=True)
    assert float(aux["dropped_fraction"]) == 0.0
    for b in range(6):
        alone, _ = layer(x_B1d[b:b + 1], decode=True)
        np.testing.assert_allclose(alone, y_B1d[b:b + 1], rtol=1e-5, atol=1e-6)
