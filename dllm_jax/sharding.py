"""Meshes and the one table that maps logical axis names onto mesh axes.

The mesh always has the axes ``("data", "model")``: ``--mesh 8`` is ``(8, 1)`` (batch split
8 ways, params replicated), ``--mesh 4x2`` adds 2-way tensor parallelism (heads, kv heads,
MLP and vocabulary of the head split over ``model``). A logical axis whose dimension does not
divide evenly falls back to replication for that value (with a warning, once per case).

Meshes come from ``jax.make_mesh`` (topology-aware device order). The library's programs are
written for *Auto* axis types (jit in/out shardings, XLA propagates the rest); a mesh a user
built with Explicit axes (``jax.make_mesh``'s default) is re-typed to Auto over the same
devices by ``as_mesh``, so any ``("data", "model")`` mesh works through ``load``, ``logits``,
``generate`` and the server.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "model")

# logical axis -> mesh axis (None = replicated)
LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "layers": None,
    "embed": None,
    "vocab_in": None,   # embedding table rows: gathered, so kept whole
    "vocab": "model",   # output head columns
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "seq": None,
}


def parse_mesh_shape(spec: str | int | Sequence[int] | None, n_devices: int | None = None) -> tuple[int, int]:
    """'8' -> (8, 1); '4x2' -> (4, 2); None -> (all devices, 1)."""
    n_devices = n_devices or jax.device_count()
    if spec is None:
        return (n_devices, 1)
    if isinstance(spec, int):
        return (spec, 1)
    if isinstance(spec, str):
        try:
            parts = tuple(int(p) for p in spec.lower().split("x"))
        except ValueError:
            raise ValueError(f"mesh {spec!r} must look like '8' or '4x2'") from None
    else:
        parts = tuple(int(p) for p in spec)
    if len(parts) == 1:
        parts = (parts[0], 1)
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError(f"mesh {spec!r} must be DATA or DATAxMODEL with positive sizes")
    if math.prod(parts) > n_devices:
        raise ValueError(f"mesh {spec!r} needs {math.prod(parts)} devices, only {n_devices} available")
    return parts


def make_mesh(spec: str | int | Sequence[int] | None = None, devices=None) -> Mesh:
    """A ("data", "model") mesh (Auto axis types) from ``jax.make_mesh`` over the first
    data*model devices (of ``devices``, default ``jax.devices()``)."""
    devices = list(devices if devices is not None else jax.devices())
    data, model = parse_mesh_shape(spec, len(devices))
    return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices[: data * model])


def as_mesh(mesh: Mesh) -> Mesh:
    """The mesh the library runs on, for any mesh a user built.

    Keeps the devices and their order; axis types become Auto (an Explicit mesh's sharding-in-
    types rules would demand an ``out_sharding`` on every gather of the embedding). A mesh with
    only a ``data`` axis gets a ``model`` axis of size 1. Other axis names are refused.

    Raises:
      ValueError: naming the unexpected axes.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((8, 1), {MESH_AXES})), "
                        f"got {type(mesh).__name__}")
    names = given = tuple(mesh.axis_names)
    unknown = [n for n in names if n not in MESH_AXES]
    if unknown or "data" not in names:
        raise ValueError(f"mesh axes {names} must be {MESH_AXES} (or just ('data',)); unexpected: "
                         f"{unknown or ['no data axis']}")
    devices = np.asarray(mesh.devices)
    if "model" not in names:
        devices = devices.reshape(devices.shape + (1,))
        names = names + ("model",)
    order = [names.index(a) for a in MESH_AXES]
    devices = devices.transpose(order)
    if given == MESH_AXES and all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * 2)


def mesh_or_default(mesh: Mesh | None) -> Mesh:
    """``as_mesh(mesh)``, or the default when None: one device (a 1x1 mesh)."""
    return as_mesh(mesh) if mesh is not None else make_mesh((1, 1))


_warned: set = set()


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for a value with these logical axes.

    A dimension that does not divide its mesh axis is replicated (warned once per case).

    Raises:
      ValueError: two logical axes of one value map to the same mesh axis (a rules-table bug:
        the value could not be laid out as asked).
    """
    out, used = [], {}
    for name, dim in zip(axes, shape):
        mesh_axis = LOGICAL_RULES.get(name) if name else None
        if mesh_axis is not None and mesh_axis in used:
            raise ValueError(f"logical axes {used[mesh_axis]!r} and {name!r} of a value of shape {tuple(shape)} "
                             f"(axes {tuple(axes)}) both map to mesh axis {mesh_axis!r}")
        if mesh_axis is not None:
            used[mesh_axis] = name
        size = mesh.shape[mesh_axis] if mesh_axis is not None else 1
        if size == 1:
            out.append(None)
        elif dim % size:
            case = (name, dim, mesh_axis, size)
            if case not in _warned:
                _warned.add(case)
                warnings.warn(f"logical axis {name!r} of size {dim} (shape {tuple(shape)}) does not divide mesh "
                              f"axis {mesh_axis!r} of size {size}: replicated instead", stacklevel=2)
            out.append(None)
        else:
            out.append(mesh_axis)
    return P(*out)


def named(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int, batch: int) -> NamedSharding:
    """Shard dim 0 over 'data' when it divides, replicate otherwise."""
    return named(mesh, ("batch",) + (None,) * (ndim - 1), (batch,) + (1,) * (ndim - 1))
