"""A streaming safetensors reader (single file or a sharded ``*.index.json``).

Parses the header itself so that every tensor's byte range is checked against the file size
up front (a truncated download fails with the file and tensor named, before any conversion),
reads one tensor at a time through a memory map, and handles bfloat16 via ml_dtypes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from dllm_jax.checkpoint import dtypes
from dllm_jax.checkpoint.tensors import CheckpointError, TensorInfo


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"truncated safetensors file {path}: {size} bytes, no header")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(f"truncated safetensors file {path}: header of {n} bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"corrupt safetensors header in {path}: {e}") from None
    return header, 8 + n


class SafetensorsSource:
    """TensorSource over ``model.safetensors`` or the shards named by an index file."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            single = path / "model.safetensors"
            if index.exists():
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                paths = [path / f for f in files]
            elif single.exists():
                paths = [single]
            else:
                found = sorted(p.name for p in path.glob("*.safetensors"))
                if not found:
                    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
                paths = [path / f for f in found]
        else:
            paths = [path]
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for p in paths:
            if not p.exists():
                raise CheckpointError(f"safetensors shard {p} listed in the index is missing")
            header, data_start = _read_header(p)
            size = p.stat().st_size
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                if not dtypes.is_code(meta["dtype"]):
                    raise CheckpointError(f"tensor {key!r} in {p}: unsupported dtype {meta['dtype']}")
                begin, end = meta["data_offsets"]
                nbytes = int(np.prod(meta["shape"], dtype=np.int64)) * dtypes.itemsize(meta["dtype"])
                if end - begin != nbytes:
                    raise CheckpointError(f"tensor {key!r} in {p}: byte range {end - begin} does not match "
                                          f"shape {meta['shape']} x {meta['dtype']}")
                if data_start + end > size:
                    raise CheckpointError(f"truncated safetensors file {p}: tensor {key!r} needs bytes up to "
                                          f"{data_start + end}, the file has {size}")
                if key in self._entries:
                    raise CheckpointError(f"tensor {key!r} appears in both {self._entries[key][0]} and {p}")
                self._entries[key] = (p, data_start, meta)
        self._maps: dict[Path, np.memmap] = {}

    def tensors(self) -> dict[str, TensorInfo]:
        return {k: TensorInfo(tuple(m["shape"]), m["dtype"], str(p)) for k, (p, _, m) in self._entries.items()}

    def read(self, key: str) -> np.ndarray:
        path, data_start, meta = self._entries[key]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        begin, end = meta["data_offsets"]
        raw = self._maps[path][data_start + begin: data_start + end]
        return raw.view(dtypes.from_code(meta["dtype"])).reshape(meta["shape"])

    def close(self):
        self._maps.clear()


def save_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write a safetensors file (used by tests and the demo model; handles bfloat16)."""
    header, offset, blobs = {}, 0, []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        header[key] = {"dtype": dtypes.code_of(arr.dtype), "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        blobs.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in blobs:
            f.write(arr.tobytes())
