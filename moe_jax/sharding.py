"""The device mesh, logical-axis rules, and the shardings of parameters and batches.

Mesh axes are `('data', 'expert', 'model')`, sizes from `mesh.shape` (one entry may be -1: it takes the
remaining devices). Model code names array axes logically ("batch", "embed", "mlp", "expert", ...); the rules
below map each logical name to mesh axes:

    batch  -> ('data', 'expert')   tokens are spread over every data-parallel and expert-parallel device
    expert -> 'expert'             expert weights [E, d, f] split on E: each device holds only its experts
    heads, mlp, vocab -> 'model'   tensor parallelism inside attention, MLPs, experts and the softmax
    embed  -> 'data' with FSDP (`fsdp=True`, params sharded over 'data'), else replicated
    layers, kv, length -> replicated

A mesh axis is used at most once per array: where two logical axes map to the same mesh axis, the first
(leftmost) keeps it (so FSDP's embed -> 'data' disappears from activations, whose batch axis holds 'data').

Axis types: **Auto**, deliberately. `jax.make_mesh` defaults to Explicit axes in jax 0.10, where every op
that contracts a sharded dimension must state its `out_sharding` and `with_sharding_constraint` only
asserts. The model, the MoE layer and the dispatchers are written by different hands and also run without
any mesh (notebooks, tests); Explicit mode would make each of their einsums a place that must name a
sharding. With Auto axes the parameters and the batch get their shardings from `jax.jit`
in/out_shardings (or `jax.device_put`), XLA's partitioner propagates them, `constrain` pins the layouts that
matter (the residual stream, the logits, the expert buffer), and the expert all-to-all is an explicit
`jax.shard_map` + `jax.lax.all_to_all` under `jax.set_mesh(mesh)`. The mesh is always passed explicitly
(NamedSharding, `jax.set_mesh`); the legacy `with mesh:` global is never used.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "expert", "model")

log = logging.getLogger(__name__)

Rules = tuple[tuple[str, Any], ...]


def logical_axis_rules(*, fsdp: bool = False) -> Rules:
    """(logical name, mesh axis or tuple of mesh axes or None) pairs."""
    return (
        ("batch", ("data", "expert")),
        ("length", None),
        ("expert", "expert"),
        ("heads", "model"),
        ("kv", None),
        ("mlp", "model"),
        ("vocab", "model"),
        ("embed", "data" if fsdp else None),
        ("layers", None),
    )


DEFAULT_RULES = logical_axis_rules()


def rules_from_config(config) -> Rules:
    """The rules for a run: `mesh.fsdp` (default False) turns FSDP on."""
    mesh_cfg = config.get("mesh") if hasattr(config, "get") else None
    fsdp = bool(mesh_cfg.get("fsdp", False)) if mesh_cfg is not None else False
    return logical_axis_rules(fsdp=fsdp)


# --------------------------------------------------------------------------------------------- mesh


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """`mesh.shape` with its -1 filled in; ValueError naming the key when it cannot fit `num_devices`."""
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"mesh.shape={shape!r} must be {len(MESH_AXES)} integers, one per axis {MESH_AXES}, "
                         f"e.g. (-1, 8, 1)") from None
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape={shape} must have {len(MESH_AXES)} entries, one per axis {MESH_AXES}")
    if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise ValueError(f"mesh.shape={shape}: entries must be positive, with at most one -1 (fill)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh.shape={shape}: the fixed axes ({known} devices) do not divide the "
                             f"device count {num_devices}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh.shape={shape} has {math.prod(shape)} devices but there are {num_devices} "
                         f"devices; the product must equal the device count")
    return shape


def make_mesh(config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The ('data', 'expert', 'model') mesh, Auto axes (see the module docstring).

    On TPUs `mesh_utils.create_device_mesh` lays each mesh axis onto whole physical torus axes where its size
    allows (a product of some of them: on a 4x4x4 v5p slice, sizes 1, 4, 16, 64). Otherwise a physical axis is split between mesh axes
    (`allow_split_physical_axes`) and a warning says which mesh axes pay for it: their collectives no longer
    run on whole rings of the torus, so an all-to-all or all-reduce over them gets less bandwidth than over an
    axis of whole physical axes. `split_physical_axes(mesh)` tells afterwards. Other devices: `jax.make_mesh`.

    Args:
      config: the run config (reads `config.mesh.shape`), a `mesh` section (reads `.shape`), or the
        3-tuple itself.
      devices: default `jax.devices()` (all processes' devices).
    """
    if isinstance(config, (tuple, list)):
        shape = config
    elif "mesh" in config:
        shape = config.mesh.shape
    else:
        shape = config.shape
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(shape, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices[0].platform != "tpu":
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    if len({getattr(d, "slice_index", 0) for d in devices}) > 1:  # as jax.make_mesh refuses them
        raise ValueError(f"mesh.shape={shape}: the devices span several TPU slices; a multi-slice mesh needs "
                         f"jax.experimental.mesh_utils.create_hybrid_device_mesh, which make_mesh does not build")
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices)
    except NotImplementedError:  # an axis size that is no product of whole physical axes
        try:
            device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except Exception as error:  # mesh_utils raises several types for a shape it cannot place
            raise ValueError(f"mesh.shape={shape} cannot be placed on {_torus_name(devices)}: {error}; shapes "
                             f"that fit directly have every axis a product of whole physical axes: "
                             f"{direct_mesh_shapes(devices)}") from None
        mesh = Mesh(device_array, MESH_AXES, axis_types=axis_types)
        log.warning("%s", placement_note(mesh))
        return mesh
    return Mesh(device_array, MESH_AXES, axis_types=axis_types)


def _physical_coords(devices) -> Optional[np.ndarray]:
    """[..., 3] torus coordinates of TPU devices (an array of devices of any shape), or None elsewhere."""
    devices = np.asarray(devices, dtype=object)
    if not all(getattr(d, "coords", None) is not None for d in devices.flat):
        return None
    coords = np.array([list(d.coords) for d in devices.flat], dtype=np.int64)
    return coords.reshape(*devices.shape, coords.shape[-1])


def _torus_shape(coords: np.ndarray) -> tuple[int, ...]:
    flat = coords.reshape(-1, coords.shape[-1])
    return tuple(int(n) for n in flat.max(0) - flat.min(0) + 1)


def _torus_name(devices) -> str:
    coords = _physical_coords(devices)
    torus = "x".join(map(str, _torus_shape(coords))) if coords is not None else "?"
    return f"{len(devices)} x {devices[0].device_kind} (physical torus {torus})"


def direct_mesh_shapes(devices) -> list[tuple[int, int, int]]:
    """The (data, expert, model) shapes whose every axis is a product of whole physical axes of `devices`."""
    coords = _physical_coords(devices)
    if coords is None:
        return []
    torus = [n for n in _torus_shape(coords) if n > 1]
    shapes = set()
    for owner in itertools.product(range(len(MESH_AXES)), repeat=len(torus)):  # physical axis -> mesh axis
        shapes.add(tuple(math.prod(n for n, o in zip(torus, owner) if o == axis) for axis in range(len(MESH_AXES))))
    return sorted(shapes)


def split_physical_axes(mesh: Mesh) -> dict[str, tuple[int, ...]]:
    """The mesh axes `make_mesh` had to lay across part of a physical torus axis, each with how many chips it
    spans along each physical axis. Empty off TPUs and where mesh_utils places the shape without splitting
    (whole physical axes, or its own ring order for a device kind, as on an 8-chip v5e)."""
    coords = _physical_coords(mesh.devices)
    if coords is None:
        return {}
    try:
        mesh_utils.create_device_mesh(mesh.devices.shape, list(mesh.devices.flat))
        return {}
    except NotImplementedError:  # the shape needs allow_split_physical_axes
        pass
    torus = _torus_shape(coords)
    split = {}
    for index, name in enumerate(mesh.axis_names):
        if mesh.devices.shape[index] == 1:
            continue
        line = np.moveaxis(coords, index, 0).reshape(mesh.devices.shape[index], -1, coords.shape[-1])[:, 0]
        spans = tuple(len(set(line[:, p].tolist())) for p in range(coords.shape[-1]))
        if any(1 < span < size for span, size in zip(spans, torus)):
            split[name] = spans
    return split


def placement_note(mesh: Mesh) -> str:
    """One paragraph on the mesh axes split across physical torus axes and what that costs; "" if none."""
    split = split_physical_axes(mesh)
    if not split:
        return ""
    devices = list(mesh.devices.flat)
    torus = _torus_shape(_physical_coords(devices))
    sizes = sorted({s for shape in direct_mesh_shapes(devices) for s in shape})
    axes = ", ".join(f"{name}={mesh.shape[name]} (spans {'x'.join(map(str, spans))} of the "
                     f"{'x'.join(map(str, torus))} torus)" for name, spans in split.items())
    shape = tuple(mesh.devices.shape)
    return (f"mesh.shape={shape} on {_torus_name(devices)}: physical axes are split between mesh axes "
            f"(allow_split_physical_axes) for {axes}. Collectives over a split axis (the all-to-all over "
            f"'expert', the gradient all-reduce over 'data') no longer run on whole rings of the torus and get "
            f"less bandwidth than over an axis made of whole physical axes; axis sizes that map directly here: "
            f"{sizes}.")


# --------------------------------------------------------------------------------------------- rules


def logical_to_mesh(names: Sequence[Optional[str]], rules: Rules = DEFAULT_RULES) -> P:
    """PartitionSpec for an array whose axes have these logical names (None = unnamed, replicated).

    A name missing from the rules is an error (a typo would otherwise silently replicate). A mesh axis
    already taken by an earlier dimension is dropped from later ones.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        target = table[name]
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _spec_for(shape: Sequence[int], names: Sequence[Optional[str]], mesh: Mesh, rules: Rules, where: str) -> P:
    if len(names) != len(shape):
        raise ValueError(f"{where}: logical names {tuple(names)} do not match the shape {tuple(shape)}")
    spec = logical_to_mesh(names, rules)
    for dim, axes in zip(shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        size = math.prod(mesh.shape[a] for a in axes)
        if dim % size:
            raise ValueError(f"{where}: dimension of size {dim} (logical axes {tuple(names)}) cannot be split "
                             f"over mesh axes {axes} of total size {size}; change the model size or mesh.shape")
    return spec


def param_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for an nnx state (real or abstract), from each Variable's `out_sharding` names.

    Returns a tree of the state's structure (usable as jax.jit in/out_shardings or with jax.device_put);
    Variables without names (RNG state, counters) are replicated.
    """

    def one(path, variable):
        names = variable.get_metadata().get("out_sharding")
        if not names:
            return variable.replace(NamedSharding(mesh, P()))
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        return variable.replace(NamedSharding(mesh, _spec_for(variable.shape, names, mesh, rules, where)))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


# --------------------------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays [B, ...]: leading axis over ('data', 'expert'), the rest replicated."""
    return NamedSharding(mesh, P(("data", "expert"), *([None] * (ndim - 1))))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Global jax.Arrays from this process's slice of a batch (numpy [B_local, ...] arrays).

    Works single- and multi-process: each process passes the rows its devices hold
    (`jax.make_array_from_process_local_data`); the global batch is the concatenation over processes.
    """
    shards = mesh.shape["data"] * mesh.shape["expert"]
    local_shards = shards // jax.process_count()
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.shape[0] % max(local_shards, 1):
            raise ValueError(f"batch[{key!r}] has {value.shape[0]} rows on this process, not divisible by the "
                             f"{local_shards} ('data' x 'expert') shards it holds; data.batch_size must be a "
                             f"multiple of {shards}")
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out


# --------------------------------------------------------------------------------------------- activations


def constrain(x: jax.Array, names: Sequence[Optional[str]], rules: Rules = DEFAULT_RULES) -> jax.Array:
    """Pin an activation's layout by logical names under the current `jax.set_mesh` mesh.

    Expert parallelism with the einsum dispatcher: pinning the expert buffer on both sides of the experts,
    `constrain(x_EGCd, ("expert", "batch", None, "embed"))`, makes the partitioner move tokens with one
    all-to-all each way and keep every expert's weights on its own devices (without it, it all-gathers the
    [E, d, f] kernels instead). "batch" resolves to 'data' there, 'expert' being taken by E.

    A no-op without a mesh (single device, notebooks) and for dimensions the mesh axes do not divide (a
    constraint is a layout hint, never a reason to fail).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    if not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = []
    for dim, axes in zip(x.shape, logical_to_mesh(names, rules)):
        tup = () if axes is None else (axes,) if isinstance(axes, str) else axes
        spec.append(axes if dim % math.prod(mesh.shape[a] for a in tup) == 0 else None)
    return jax.lax.with_sharding_constraint(x, P(*spec))
