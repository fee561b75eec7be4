"""Mesh construction, logical-axis rules, parameter and batch shardings, and a sharded forward on 8 devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from moe_jax import model as M
from moe_jax import sharding as S

V, L = 64, 16


def tiny_config(**moe):
    cfg = M.default_config()
    cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_layers = V, 32, 64, 2, 2
    cfg.moe.update(moe)
    return cfg


def run_config(shape, fsdp=False):
    return ml_collections.ConfigDict(dict(mesh=dict(shape=shape, fsdp=fsdp)))


# --------------------------------------------------------------------------------------------- mesh


def test_mesh_shape_fills_minus_one():
    assert S.mesh_shape((-1, 4, 1), 8) == (2, 4, 1)
    assert S.mesh_shape((1, 1, -1), 8) == (1, 1, 8)
    assert S.mesh_shape((2, 2, 2), 8) == (2, 2, 2)


@pytest.mark.parametrize("shape, message", [
    ((2, 2, 1), r"mesh.shape=\(2, 2, 1\) has 4 devices but there are 8 devices"),
    ((3, -1, 1), r"mesh.shape=\(3, -1, 1\).*do not divide the device count 8"),
    ((-1, -1, 1), r"at most one -1"),
    ((8, 1), r"must have 3 entries"),
    ((0, 8, 1), r"entries must be positive"),
])
def test_mesh_shape_errors_name_the_key_value_and_device_count(shape, message):
    with pytest.raises(ValueError, match=message):
        S.mesh_shape(shape, 8)


def test_make_mesh_from_config(eight_devices):
    mesh = S.make_mesh(run_config((2, -1, 1)), devices=eight_devices)
    assert dict(mesh.shape) == dict(data=2, expert=4, model=1)
    assert mesh.axis_names == S.MESH_AXES
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="mesh.shape"):
        S.make_mesh(run_config((4, 4, 1)), devices=eight_devices)


# --------------------------------------------------------------------------------------------- rules


def test_logical_to_mesh_follows_the_rules():
    rules = S.logical_axis_rules()
    assert S.logical_to_mesh(("batch", "length", "embed"), rules) == P(("data", "expert"), None, None)
    assert S.logical_to_mesh(("layers", "expert", "embed", "mlp"), rules) == P(None, "expert", None, "model")
    assert S.logical_to_mesh(("embed", "heads", "kv"), rules) == P(None, "model", None)
    assert S.logical_to_mesh(("vocab", "embed"), rules) == P("model", None)
    assert S.logical_to_mesh(("embed", None), rules) == P(None, None)
    fsdp = S.logical_axis_rules(fsdp=True)
    assert S.logical_to_mesh(("layers", "expert", "embed", "mlp"), fsdp) == P(None, "expert", "data", "model")
    # A mesh axis is used once: the batch axis takes 'data', so FSDP's embed -> 'data' drops out.
    assert S.logical_to_mesh(("batch", "length", "embed"), fsdp) == P(("data", "expert"), None, None)
    with pytest.raises(ValueError, match="'embedding' has no rule"):
        S.logical_to_mesh(("embedding",), rules)


# --------------------------------------------------------------------------------------------- params


def _spec_of(array):
    return array.sharding.spec


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated_embed", "fsdp"])
def test_params_are_sharded_as_the_rules_say(eight_devices, fsdp):
    mesh = S.make_mesh(run_config((2, 2, 2)), devices=eight_devices)
    rules = S.logical_axis_rules(fsdp=fsdp)
    model = M.Transformer(tiny_config(num_experts=4, every=2, group_size=L), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, S.param_shardings(state, mesh, rules))
    model = nnx.merge(graphdef, state)
    embed = "data" if fsdp else None

    attention = model.blocks.layers[0].attention
    assert _spec_of(attention.query[...]) == P(None, embed, "model", None)
    assert _spec_of(attention.out[...]) == P(None, "model", None, embed)
    assert _spec_of(model.blocks.layers[0].ffn.wi[...]) == P(None, embed, "model")
    assert _spec_of(model.embedding[...]) == P("model", embed)

    # Expert weights: split on E over 'expert' (and on the hidden dim over 'model').
    expert_kernels = [v for v in jax.tree.leaves(nnx.state(model.blocks.layers[1].ffn, nnx.Param),
                                                 is_leaf=lambda v: isinstance(v, nnx.Variable))
                      if "expert" in v.get_metadata()["out_sharding"]]
    assert expert_kernels, "the MoE layer has no parameters named with an 'expert' axis"
    for kernel in expert_kernels:
        names = kernel.get_metadata()["out_sharding"]
        spec = _spec_of(kernel[...])
        assert spec[names.index("expert")] == "expert"
        assert spec == S.logical_to_mesh(names, rules)
        num_experts = kernel.shape[names.index("expert")]
        for shard in kernel[...].addressable_shards:  # each device holds only its experts' weights
            assert shard.data.shape[names.index("expert")] == num_experts // 2


def test_param_shardings_reject_dims_the_mesh_does_not_divide(eight_devices):
    mesh = S.make_mesh(run_config((1, 1, 8)), devices=eight_devices)
    state = nnx.state(M.Transformer(tiny_config(), rngs=nnx.Rngs(0)))  # 2 heads cannot split 8 ways
    with pytest.raises(ValueError, match=r"attention/\w+: dimension of size 2 .*\('model',\) of total size 8"):
        S.param_shardings(state, mesh)


def test_param_shardings_of_an_abstract_state(eight_devices):
    mesh = S.make_mesh(run_config((2, 2, 2)), devices=eight_devices)
    abstract = nnx.eval_shape(lambda: M.Transformer(tiny_config(), rngs=nnx.Rngs(0)))
    shardings = S.param_shardings(nnx.state(abstract), mesh)
    assert shardings["embedding"].get_value() == NamedSharding(mesh, P("model", None))


# --------------------------------------------------------------------------------------------- batches


def test_shard_batch_spreads_rows_over_data_and_expert(eight_devices):
    mesh = S.make_mesh(run_config((2, 2, 2)), devices=eight_devices)
    batch = dict(inputs=np.arange(8 * L, dtype=np.int32).reshape(8, L),
                 loss_weights=np.ones((8, L), np.float32))
    sharded = S.shard_batch(batch, mesh)
    for key, value in sharded.items():
        assert value.sharding == S.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(value), batch[key])
        assert {shard.data.shape for shard in value.addressable_shards} == {(2, L)}
    with pytest.raises(ValueError, match="multiple of 4"):
        S.shard_batch(dict(inputs=np.zeros((6, L), np.int32)), mesh)


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((4, L, 32))
    assert S.constrain(x, ("batch", "length", "embed")) is x


# --------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("moe, fsdp", [(dict(num_experts=0), False),
                                       (dict(num_experts=4, every=2, group_size=L), True)], ids=["dense", "moe_fsdp"])
def test_sharded_forward_equals_one_device(eight_devices, moe, fsdp):
    """Jitted forward with params and batch sharded over a (2, 2, 2) mesh == the unsharded forward.

    Tolerance 1e-5 (float32): sharding over 'model' splits contractions into partial sums reduced across
    devices, which changes summation order only.
    """
    cfg = tiny_config(**moe)
    mesh = S.make_mesh(run_config((2, 2, 2)), devices=eight_devices)
    rng = np.random.RandomState(0)
    inputs = rng.randint(0, V, (8, L)).astype(np.int32)
    segment_ids = np.repeat(np.array([[1] * 10 + [2] * 4 + [0] * 2]), 8, axis=0).astype(np.int32)
    positions = np.repeat(np.array([list(range(10)) + list(range(4)) + [0, 1]]), 8, axis=0).astype(np.int32)
    batch = dict(inputs=inputs, segment_ids=segment_ids, positions=positions)

    model = M.Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def forward(state, batch):
        logits, aux = nnx.merge(graphdef, state)(batch["inputs"], segment_ids=batch["segment_ids"],
                                                 positions=batch["positions"], deterministic=True)
        return logits, aux

    expected_logits, expected_aux = jax.jit(forward)(state, batch)

    shardings = S.param_shardings(state, mesh, S.logical_axis_rules(fsdp=fsdp))
    sharded_state = jax.device_put(state, shardings)
    sharded_batch = S.shard_batch(batch, mesh)
    with jax.set_mesh(mesh):
        logits, aux = jax.jit(forward, in_shardings=(shardings, S.batch_sharding(mesh)))(sharded_state,
                                                                                         sharded_batch)
    assert logits.sharding.spec == P(("data", "expert"), None, "model")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected_logits), rtol=1e-5, atol=1e-5)
    for key in expected_aux:
        np.testing.assert_allclose(np.asarray(aux[key]), np.asarray(expected_aux[key]), rtol=1e-5, atol=1e-6)

