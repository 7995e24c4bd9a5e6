"""Meshes and the one table that maps logical axis names onto mesh axes.

The mesh always has the axes ``("data", "model")``: ``--mesh 8`` is ``(8, 1)`` (batch split
8 ways, params replicated), ``--mesh 4x2`` adds 2-way tensor parallelism (heads, kv heads,
MLP and vocabulary of the head split over ``model``). A logical axis whose dimension does not
divide evenly falls back to replication for that parameter.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
    """A ("data", "model") mesh over the first data*model devices."""
    devices = list(devices if devices is not None else jax.devices())
    data, model = parse_mesh_shape(spec, len(devices))
    return Mesh(np.array(devices[: data * model]).reshape(data, model), MESH_AXES)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for a value with these logical axes (non-dividing axes replicated)."""
    out, used = [], set()
    for name, dim in zip(axes, shape):
        mesh_axis = LOGICAL_RULES.get(name) if name else None
        if mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1 or dim % mesh.shape[mesh_axis]:
            out.append(None)
        else:
            out.append(mesh_axis)
            used.add(mesh_axis)
    return P(*out)


def named(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int, batch: int) -> NamedSharding:
    """Shard dim 0 over 'data' when it divides, replicate otherwise."""
    return named(mesh, ("batch",) + (None,) * (ndim - 1), (batch,) + (1,) * (ndim - 1))
