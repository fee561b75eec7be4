"""Checkpointer: state + data iterator round trip, keep-N, corrupt-latest fallback, resharding on load."""

import logging

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import checkpoint
from moe_jax.checkpoint import CheckpointError, Checkpointer


def _iterator():
    return iter(grain.MapDataset.range(1000).shuffle(seed=3).batch(4))


def _state(scale):
    return {"params": {"w": jnp.arange(32.0).reshape(8, 4) * scale}, "step": jnp.asarray(scale, jnp.int32)}


def test_state_and_data_position_round_trip(tmp_path):
    it = _iterator()
    for _ in range(3):
        next(it)
    checkpointer = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    checkpointer.save(3, _state(3), it)
    checkpointer.wait()
    due = [next(it) for _ in range(2)]

    fresh = _iterator()
    step, state = Checkpointer(tmp_path / "ckpt").restore_latest(_state(0), fresh)
    assert step == 3
    np.testing.assert_array_equal(state["params"]["w"], _state(3)["params"]["w"])
    np.testing.assert_array_equal([next(fresh) for _ in range(2)], due)


def test_keeps_the_last_n(tmp_path):
    checkpointer = Checkpointer(tmp_path, max_to_keep=2)
    for step in (1, 2, 3, 4):
        checkpointer.save(step, _state(step), _iterator())
    checkpointer.wait()
    assert checkpointer.all_steps() == [3, 4]


def test_no_checkpoint_returns_none(tmp_path):
    assert Checkpointer(tmp_path).restore_latest(_state(0), _iterator()) is None


def _corrupt(step_dir):
    for path in step_dir.rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")


def test_unreadable_latest_falls_back_to_previous(tmp_path, caplog):
    checkpointer = Checkpointer(tmp_path, max_to_keep=3)
    for step in (1, 2):
        checkpointer.save(step, _state(step), _iterator())
    checkpointer.close()
    _corrupt(tmp_path / "2")
    with caplog.at_level(logging.WARNING):
        step, state = Checkpointer(tmp_path).restore_latest(_state(0), _iterator())
    assert step == 1
    np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
    assert any("step 2" in r.message and "unreadable" in r.message for r in caplog.records)


def test_all_unreadable_names_the_directory(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(5, _state(5), _iterator())
    checkpointer.close()
    _corrupt(tmp_path / "5")
    with pytest.raises(CheckpointError, match=f"no readable checkpoint in {tmp_path}"):
        Checkpointer(tmp_path).restore_latest(_state(0), _iterator())


def test_restore_onto_another_mesh(tmp_path, eight_devices):
    mesh_a = jax.make_mesh((8,), ("data",), devices=eight_devices)
    mesh_b = jax.make_mesh((2, 4), ("data", "expert"), devices=eight_devices)
    state = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh_a, P("data", None)))}
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, state)
    checkpointer.close()
    target = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh_b, P("expert", "data")))}
    _, restored = Checkpointer(tmp_path).restore_latest(target)
    assert restored["w"].sharding == target["w"].sharding
    np.testing.assert_array_equal(restored["w"], np.arange(64.0).reshape(8, 8))


def test_bad_keep_value():
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 1, got 0"):
        Checkpointer("/tmp/unused", max_to_keep=0)


def test_iterator_state_encoding_round_trips_types_exactly():
    state = {"a": (0, 0), "b": [1, (2, 3.5)], "c": {"d": None, "e": True, "f": "x"}, "g": []}
    decoded = checkpoint.decode_iterator_state(checkpoint.encode_iterator_state(state))
    assert decoded == state and isinstance(decoded["a"], tuple) and isinstance(decoded["b"][1], tuple)
    assert isinstance(decoded["b"], list)
    with pytest.raises(ValueError, match=r"state\.x.*int64"):
        checkpoint.encode_iterator_state({"x": np.int64(3)})


def test_grain_plain_json_state_gets_its_remainder_tuples_back():
    plain = '{"parent_state": {"next_index": 3}, "remainder_slices": {"tokens": [0, 0]}, "n": [1, 2]}'
    decoded = checkpoint.decode_iterator_state(plain)
    assert decoded["remainder_slices"]["tokens"] == (0, 0) and decoded["n"] == [1, 2]


def _packed_iterator():
    from moe_jax.data import packing

    lengths = (4, 12, 5, 11, 16, 7, 9, 8, 8)  # rows of 16 often end exactly at a document's end
    docs = grain.MapDataset.range(400).map(lambda n: {
        "tokens": np.full(lengths[n % len(lengths)], n, np.int32), "domains": np.zeros(lengths[n % len(lengths)], np.int32)})
    return iter(packing.pack(docs.to_iter_dataset(), 16).batch(2))


@pytest.mark.parametrize("position", range(1, 9))
def test_packed_stream_resumes_from_disk_on_the_batch_that_was_due(tmp_path, position):
    """The bug grain's plain-JSON state had: a packed stream restored from disk at a row boundary that is also
    a document boundary skipped a document (its `remainder_slices` came back as lists)."""
    it = _packed_iterator()
    for _ in range(position):
        next(it)
    checkpointer = Checkpointer(tmp_path, max_to_keep=1)
    checkpointer.save(position, _state(position), it)
    checkpointer.close()
    due = [next(it) for _ in range(6)]
    fresh = _packed_iterator()
    Checkpointer(tmp_path).restore_latest(_state(0), fresh)
    for expected in due:
        got = next(fresh)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
