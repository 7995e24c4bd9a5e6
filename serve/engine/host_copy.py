"""Parameters in host memory while the device is released (``Executor.offload`` / ``reload``,
SGLang's ``release_memory_occupation``): each distinct shard a process holds, copied once."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(eq=False)
class HostCopy:
    """One parameter in host memory: each distinct shard this process holds, once (a replicated
    parameter is one numpy array, not one per device)."""

    shape: tuple[int, ...]
    dtype: Any
    sharding: Any
    shards: dict[tuple, np.ndarray]

    @classmethod
    def of(cls, x: jax.Array) -> "HostCopy":
        shards = {}
        for shard in x.addressable_shards:
            key = _index_key(shard.index, x.shape)
            if key not in shards:
                shards[key] = np.array(shard.data)  # (a copy: never a view of the buffer freed next)
        return cls(x.shape, x.dtype, x.sharding, shards)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.shards.values())

    def abstract(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, self.dtype, sharding=self.sharding)

    def to_device(self) -> jax.Array:
        devices = self.sharding.addressable_devices_indices_map(self.shape)
        return jax.make_array_from_single_device_arrays(
            self.shape, self.sharding,
            [jax.device_put(self.shards[_index_key(index, self.shape)], device) for device, index in devices.items()])


def _index_key(index: tuple, shape: tuple[int, ...]) -> tuple:
    """A shard's index (a tuple of slices) as a hashable key."""
    return tuple(s.indices(n) for s, n in zip(index, shape))
