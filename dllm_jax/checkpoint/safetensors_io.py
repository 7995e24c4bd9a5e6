"""A streaming safetensors reader (single file or a sharded ``*.index.json``).

Parses the header itself so that every tensor's byte range is checked against the file size
up front (a truncated download fails with the file and tensor named, before any conversion),
reads one tensor at a time through a memory map, and handles bfloat16 via ml_dtypes.

The files are untrusted: the header length is checked against the format's 100 MB limit and
the file size before the header is read, every header entry's fields are type-checked, shard
names from the index must stay inside the directory (``file_in``), and no error quotes a
file's bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from dllm_jax.checkpoint import dtypes
from dllm_jax.checkpoint.tensors import (CheckpointError, TensorInfo, excerpt, file_in, parse_json, read_json,
                                         regular_file)


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit (the reference reader refuses more)
INDEX = "model.safetensors.index.json"


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header and where the data starts; the header's length is checked against the
    format's limit and the file size before a byte of it is read. Errors never quote the file."""
    path = regular_file(path, "safetensors file")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"truncated safetensors file {path}: {size} bytes, no header")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:  # (the length itself is not shown: in a file that is not safetensors
            # at all, it is the file's first 8 bytes)
            raise CheckpointError(f"{path} is not a valid safetensors file: its header length exceeds the format's "
                                  f"limit of {MAX_HEADER_BYTES:,} bytes (100 MB)")
        if n > size - 8:
            raise CheckpointError(f"truncated safetensors file {path}: its header length exceeds the file's "
                                  f"{size:,} bytes")
        raw = f.read(n)
    header = parse_json(raw, f"the safetensors header of {path}", offset=8)
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors header in {path}: not a JSON object")
    return header, 8 + n


def _check_entry(path: Path, key, meta) -> None:
    """One header entry has the fields and types the format prescribes (before they are used)."""
    ok = (isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and isinstance(meta.get("shape"), list)
          and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in meta["shape"])
          and isinstance(meta.get("data_offsets"), list) and len(meta["data_offsets"]) == 2
          and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in meta["data_offsets"])
          and meta["data_offsets"][0] <= meta["data_offsets"][1])
    if not ok:
        raise CheckpointError(f"corrupt safetensors header in {path}: entry {excerpt(key)} is not "
                              "{dtype, shape, data_offsets} with non-negative integers")


def _index_shards(directory: Path) -> list[Path]:
    """The shard files named by ``model.safetensors.index.json``, each kept inside ``directory``."""
    index = file_in(directory, INDEX)
    raw = read_json(index, "safetensors index")
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no weight_map of tensor name -> shard file name")
    return [file_in(directory, name, index) for name in sorted(set(weight_map.values()))]


class SafetensorsSource:
    """TensorSource over ``model.safetensors`` or the shards named by an index file."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            single = path / "model.safetensors"
            if (path / INDEX).exists() or (path / INDEX).is_symlink():
                paths = _index_shards(path)
            elif single.exists() or single.is_symlink():
                paths = [file_in(path, single.name)]
            else:
                found = sorted(p.name for p in path.glob("*.safetensors"))
                if not found:
                    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
                paths = [file_in(path, f) for f in found]
        else:
            paths = [path]
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for p in paths:
            header, data_start = _read_header(p)
            size = p.stat().st_size
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                _check_entry(p, key, meta)
                if not dtypes.is_code(meta["dtype"]):
                    raise CheckpointError(f"tensor {excerpt(key)} in {p}: unsupported dtype {excerpt(meta['dtype'])}")
                begin, end = meta["data_offsets"]
                nbytes = math.prod(meta["shape"]) * dtypes.itemsize(meta["dtype"])  # (Python ints: no overflow)
                if end - begin != nbytes:
                    raise CheckpointError(f"tensor {excerpt(key)} in {p}: byte range {end - begin} does not match "
                                          f"shape {meta['shape']} x {meta['dtype']}")
                if data_start + end > size:
                    raise CheckpointError(f"truncated safetensors file {p}: tensor {excerpt(key)} needs bytes up to "
                                          f"{data_start + end}, the file has {size}")
                if key in self._entries:
                    raise CheckpointError(f"tensor {excerpt(key)} appears in both {self._entries[key][0]} and {p}")
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


class OneMapAtATime:
    """A ``SafetensorsSource`` that drops the previous file's memory map before each read.

    Pages of a still-mapped file count towards RSS; without this a conversion would look
    (and, under cgroup limits, be charged) as if it held the whole source in memory.
    """

    def __init__(self, source: SafetensorsSource):
        self._source = source

    def tensors(self):
        return self._source.tensors()

    def read(self, key):
        self._source.close()
        return self._source.read(key)

    def close(self):
        self._source.close()


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
