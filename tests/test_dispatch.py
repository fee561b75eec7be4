"""The three dispatchers against the NumPy per-token reference (tests/reference.py) and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_jax import dispatch, routing
import reference

SETTINGS = settings(max_examples=25, deadline=None)
# Jitted, so that repeated shapes hit the compilation cache (eager op-by-op dispatch compiles every op).
apply_experts = jax.jit(dispatch.apply_experts, static_argnames=("name", "transport_dtype", "grouped_matmul",
                                                                  "block_size"))
route_top_k = jax.jit(routing.route_top_k, static_argnames=("k", "capacity", "batch_prioritized", "normalize"))
route_expert_choice = jax.jit(routing.route_expert_choice, static_argnames=("capacity",))
EXECUTORS = [("einsum", {}), ("index", {}), ("dropless", dict(grouped_matmul="blocks", block_size=4)),
             ("dropless", dict(grouped_matmul="blocks", block_size=1)), ("dropless", dict(grouped_matmul="ragged"))]
EXECUTOR_IDS = ["einsum", "index", "dropless_blocks4", "dropless_blocks1", "dropless_ragged"]


def make_experts(key, num_experts, d, f, activation="relu"):
    k1, k2, k3 = jax.random.split(key, 3)
    gated = activation in ("swiglu", "geglu")
    return dispatch.ExpertFFN(
        wi=jax.random.normal(k1, (num_experts, d, f)) / np.sqrt(d),
        wo=jax.random.normal(k2, (num_experts, f, d)) / np.sqrt(f),
        wi_gate=jax.random.normal(k3, (num_experts, d, f)) / np.sqrt(d) if gated else None,
        activation=activation)


def reference_output(x, route, experts):
    return reference.routing_forward(np.asarray(x), route, wi=np.asarray(experts.wi), wo=np.asarray(experts.wo),
                                     wi_gate=None if experts.wi_gate is None else np.asarray(experts.wi_gate),
                                     activation=experts.activation)


@st.composite
def problems(draw):
    """A random Routing (top-k with capacity 1..S or None, or expert choice), inputs and experts."""
    # A few sizes only (each new shape compiles); E > S and S > E both drawn.
    num_groups = draw(st.integers(1, 2))
    group_size = draw(st.sampled_from([1, 4, 7]))
    num_experts = draw(st.sampled_from([1, 3, 9]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(num_groups, group_size, num_experts)) * 2, jnp.float32)
    padding = jnp.asarray(rng.random((num_groups, group_size)) < 0.8) if draw(st.booleans()) else None
    kind = draw(st.sampled_from(["top_k", "top_k", "expert_choice"]))
    if kind == "top_k":
        k = draw(st.integers(1, min(4, num_experts)))
        capacity = draw(st.one_of(st.none(), st.integers(1, group_size)))
        route = route_top_k(logits, k=k, capacity=capacity, padding_mask=padding,
                            normalize=draw(st.booleans()), batch_prioritized=draw(st.booleans()))
    else:
        route = route_expert_choice(logits, capacity=draw(st.integers(1, group_size)), padding_mask=padding)
    d, f = 3, 5
    activation = draw(st.sampled_from(dispatch.ACTIVATIONS))
    experts = make_experts(jax.random.PRNGKey(seed), num_experts, d, f, activation)
    x = jnp.asarray(rng.normal(size=(num_groups, group_size, d)), jnp.float32)
    return x, route, experts


@SETTINGS
@given(problems())
def test_every_dispatcher_matches_per_token_reference(problem):
    x, route, experts = problem
    want = reference_output(x, route, experts)
    for (name, options), label in zip(EXECUTORS, EXECUTOR_IDS):
        y = apply_experts(name, x, route, experts, **options)
        assert y.shape == x.shape and y.dtype == x.dtype
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5, err_msg=label)


@settings(max_examples=10, deadline=None)
@given(problems())
def test_dispatchers_agree_in_value_and_gradient(problem):
    """Same Routing -> same output and same gradients w.r.t. inputs, expert weights and combine weights."""
    x, route, experts = problem
    cotangent = jax.random.normal(jax.random.PRNGKey(1), x.shape)

    def loss(x, experts, weight, name, options):
        r = routing.Routing(route.expert_index, route.slot, weight, route.kept, route.num_experts, route.capacity)
        return jnp.sum(dispatch.apply_experts(name, x, r, experts, **dict(options)) * cotangent)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4))
    results = [value_and_grad(x, experts, route.weight, name, tuple(options.items())) for name, options in EXECUTORS]
    for value, grads in results[1:]:
        np.testing.assert_allclose(value, results[0][0], rtol=1e-4, atol=1e-4)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(results[0][1])):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dropless_equals_capacity_paths_when_nothing_drops(k):
    """Capacity S cannot drop (distinct choices per token): capacity routing == dropless routing."""
    G, S, E, d, f = 2, 24, 6, 8, 16
    logits = jax.random.normal(jax.random.PRNGKey(k), (G, S, E)) * 3
    x = jax.random.normal(jax.random.PRNGKey(10 + k), (G, S, d))
    experts = make_experts(jax.random.PRNGKey(20 + k), E, d, f)
    with_capacity = route_top_k(logits, k=k, capacity=S)
    assert bool(with_capacity.kept.all())
    dropless = apply_experts("dropless", x, route_top_k(logits, k=k, capacity=None), experts)
    for name in ("einsum", "index"):
        np.testing.assert_allclose(apply_experts(name, x, with_capacity, experts), dropless,
                                   rtol=1e-5, atol=1e-5)


def test_dropped_assignments_contribute_exactly_zero():
    """Capacity 1, every token wants expert 0: only token 0 is served; the others get exact zeros."""
    G, S, E, d = 1, 6, 3, 4
    logits = jnp.zeros((G, S, E)).at[..., 0].set(5.0)
    route = route_top_k(logits, k=1, capacity=1)
    x = jax.random.normal(jax.random.PRNGKey(0), (G, S, d))
    experts = make_experts(jax.random.PRNGKey(1), E, d, 8)
    for name, options in EXECUTORS:
        y = apply_experts(name, x, route, experts, **options)
        assert np.all(np.asarray(y[0, 1:]) == 0.0), name
        assert np.any(np.asarray(y[0, 0]) != 0.0), name


def test_bf16_transport_is_close_to_float32():
    G, S, E, d, f = 2, 64, 8, 32, 64
    logits = jax.random.normal(jax.random.PRNGKey(0), (G, S, E))
    route = route_top_k(logits, k=2, capacity=routing.expert_capacity(S, E, 1.25, k=2))
    x = jax.random.normal(jax.random.PRNGKey(1), (G, S, d))
    experts = make_experts(jax.random.PRNGKey(2), E, d, f)
    full = apply_experts("einsum", x, route, experts)
    bf16 = apply_experts("einsum", x, route, experts, transport_dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32
    scale = float(jnp.abs(full).max())
    np.testing.assert_allclose(bf16, full, atol=2e-2 * scale)
    assert float(jnp.abs(bf16 - full).max()) > 0  # the transport really was bf16


@pytest.mark.parametrize("block_size", [1, 3, 8, 64])
def test_block_grouped_matmul_worst_case_load(block_size):
    """All assignments on one expert, and a load spread so every expert pads: the static block bound holds."""
    G, S, E, d, f, k = 2, 16, 5, 4, 8, 2
    x = jax.random.normal(jax.random.PRNGKey(0), (G, S, d))
    experts = make_experts(jax.random.PRNGKey(1), E, d, f)
    skewed = jnp.zeros((G, S, E)).at[..., 0].set(9.0).at[..., 1].set(5.0)
    spread = jax.random.normal(jax.random.PRNGKey(2), (G, S, E))
    for logits in (skewed, spread):
        route = route_top_k(logits, k=k, capacity=None)
        y = apply_experts("dropless", x, route, experts, grouped_matmul="blocks", block_size=block_size)
        np.testing.assert_allclose(y, reference_output(x, route, experts), rtol=1e-4, atol=1e-5)


def test_expert_dropout_drops_hidden_units_only_with_a_key():
    G, S, E, d, f = 1, 32, 4, 8, 64
    route = route_top_k(jax.random.normal(jax.random.PRNGKey(0), (G, S, E)), k=1, capacity=None)
    x = jax.random.normal(jax.random.PRNGKey(1), (G, S, d))
    base = make_experts(jax.random.PRNGKey(2), E, d, f)
    dropping = dispatch.ExpertFFN(base.wi, base.wo, dropout_rng=jax.random.PRNGKey(3), dropout_rate=0.5)
    clean = apply_experts("index", x, route, base)
    for name, options in EXECUTORS:
        y = apply_experts(name, x, route, dropping, **options)
        assert not np.allclose(y, clean), name
    no_key = dispatch.ExpertFFN(base.wi, base.wo, dropout_rate=0.5)
    np.testing.assert_allclose(apply_experts("index", x, route, no_key), clean)


def test_jit_compiles_each_dispatcher():
    G, S, E, d = 2, 8, 4, 4
    route = route_top_k(jax.random.normal(jax.random.PRNGKey(0), (G, S, E)), k=2, capacity=3)
    x = jax.random.normal(jax.random.PRNGKey(1), (G, S, d))
    experts = make_experts(jax.random.PRNGKey(2), E, d, 8)
    want = reference_output(x, route, experts)
    for name in dispatch.DISPATCHERS:
        y = jax.jit(dispatch.apply_experts, static_argnums=0)(name, x, route, experts)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_bad_names_and_shapes_raise():
    route = route_top_k(jnp.zeros((1, 4, 2)), k=1, capacity=2)
    experts = make_experts(jax.random.PRNGKey(0), 2, 3, 4)
    x = jnp.zeros((1, 4, 3))
    with pytest.raises(ValueError, match=r"dispatcher must be one of \('einsum', 'index', 'dropless'\), got 'gather'"):
        apply_experts("gather", x, route, experts)
    with pytest.raises(ValueError, match="grouped_matmul must be 'ragged' or 'blocks'"):
        apply_experts("dropless", x, route, experts, grouped_matmul="dense")
    with pytest.raises(ValueError, match=r"x_GSd must be \[G, S, d\]"):
        apply_experts("index", jnp.zeros((1, 5, 3)), route, experts)
    with pytest.raises(ValueError, match="experts hold 3 experts but routing.num_experts = 2"):
        apply_experts("index", x, route, make_experts(jax.random.PRNGKey(0), 3, 3, 4))
    with pytest.raises(ValueError, match="activation must be one of"):
        dispatch.check_activation("tanh")


@pytest.mark.parametrize("name, grouped_matmul, capacity", [
    ("index", None, 3), ("dropless", "blocks", None), ("dropless", "ragged", None)])
@pytest.mark.parametrize("skewed", [False, True])
def test_expert_parallel_on_8_devices_matches_one_device(eight_devices, name, grouped_matmul, capacity, skewed):
    """Under a (data 2, expert 4) mesh index and dropless exchange tokens by all-to-all in jax.shard_map:
    same output and gradients as without a mesh (to 1e-5: gradients of replicated inputs are summed in
    another order), also when every token picks the experts of one device (dropless's worst case)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from moe_jax import sharding

    E, G, S, d, f = 8, 8, 16, 8, 12
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k1, (G, S, d))
    logits = jax.random.normal(k2, (G, S, E)) * 2 + (jnp.arange(E) < 2) * 20.0 * skewed
    wi, wo = jax.random.normal(k3, (E, d, f)) / 3, jax.random.normal(k4, (E, f, d)) / 3

    def loss(x, logits, wi, wo):
        route = routing.route_top_k(logits, k=2, capacity=capacity)
        y = dispatch.apply_experts(name, x, route, dispatch.ExpertFFN(wi=wi, wo=wo), grouped_matmul=grouped_matmul,
                                   block_size=4)
        return jnp.sum(y * jnp.sin(x)), y

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    (_, expected_y), expected_grads = step(x, logits, wi, wo)
    mesh = sharding.make_mesh((2, 4, 1), eight_devices)
    with jax.set_mesh(mesh):
        put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
        args = (put(x, P(("data", "expert"))), logits, put(wi, P("expert")), put(wo, P("expert")))
        hlo = step.lower(*args).compile().as_text()
        (_, y), grads = step(*args)
    assert hlo.count("all-to-all(") >= 2
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
