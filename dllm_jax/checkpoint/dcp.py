"""Reading PyTorch Distributed Checkpoints (DCP), the format NeMo-RL saves a policy's weights in.

``DcpSource`` is a ``TensorSource`` over a DCP directory (``.metadata`` + ``__R_0.distcp``
files). Nothing from the checkpoint is unpickled without restriction: ``.metadata`` goes
through :func:`read_dcp_metadata`, a restricted unpickler; tensor data through torch's
``torch.load(weights_only=True)``; non-tensor entries are never loaded. Finding the DCP
directory inside a checkpoint tree is ``layout.detect_layout``.

Torch is an optional extra (``dllm-jax[dcp]``), imported lazily, only here and only when a DCP
checkpoint is opened: ``import dllm_jax`` never imports it.
"""

from __future__ import annotations

import importlib
import pickle
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np

from dllm_jax.checkpoint import dtypes
from dllm_jax.checkpoint.tensors import CheckpointError, TensorInfo, excerpt, file_in, regular_file

DCP_METADATA = ".metadata"


def _torch():
    try:
        import torch
        import torch.distributed.checkpoint as dcp
    except ImportError:
        raise CheckpointError("reading a DCP checkpoint needs PyTorch (a CPU build is enough): "
                              "pip install 'dllm-jax[dcp]'") from None
    return torch, dcp


MAX_DCP_METADATA_BYTES = 1 << 30
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# What torch.distributed.checkpoint.save (2.4 ... 2.13) writes into .metadata: its dataclasses,
# torch.Size, dtypes/layouts/memory formats (singletons, by name), the layout and memory-format
# reducers, a pathlib checkpoint id. Nothing here runs code or reaches other objects.
_DCP_CLASSES = {
    (_DCP_METADATA_MODULE, name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
_DCP_GLOBALS = _DCP_CLASSES | {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
}


class _Refused(Exception):
    """What the restricted unpickler raises for anything a DCP checkpoint never contains."""


def _restricted_unpickler(torch, file):
    """A ``pickle`` unpickler over ``file`` admitting only ``_DCP_GLOBALS`` and torch's dtype,
    layout and memory-format singletons, and state (BUILD) only on DCP's own dataclasses."""
    admitted = set(_DCP_GLOBALS)
    singletons = (torch.dtype, torch.layout, torch.memory_format)
    # BUILD only on instances of DCP's dataclasses (not on the _MEM_FORMAT_ENCODING enum's members)
    instance_types = {getattr(importlib.import_module(m), n) for m, n in _DCP_CLASSES if n != "_MEM_FORMAT_ENCODING"}

    class Unpickler(pickle._Unpickler):  # the Python implementation: BUILD can be checked
        dispatch = dict(pickle._Unpickler.dispatch)

        def find_class(self, module, name):
            if (module, name) in admitted:
                return super().find_class(module, name)
            if module == "torch" and isinstance(vars(torch).get(name), singletons):  # (no lazy imports)
                return vars(torch)[name]
            raise _Refused(f"it references {module}.{name}, which a DCP checkpoint never contains")

        def load_build(self):
            target = self.stack[-2]
            if type(target) not in instance_types:
                owner = target if hasattr(target, "__qualname__") else type(target)
                raise _Refused(f"it sets the state of {owner.__module__}.{owner.__qualname__} (BUILD), which a DCP "
                               "checkpoint only does on the metadata objects it creates")
            super().load_build()

        dispatch[pickle.BUILD[0]] = load_build

        def persistent_load(self, pid):
            raise _Refused("it references a persistent id, which a DCP checkpoint never contains")

    return Unpickler(file)


def read_dcp_metadata(path: Path):
    """Unpickle a DCP ``.metadata`` file admitting only the classes DCP itself writes.

    ``FileSystemReader.read_metadata`` is a plain ``pickle.load``: a checkpoint, which other jobs
    may write, could run anything. Here every global the pickle names must be one of
    ``_DCP_GLOBALS`` (or a torch dtype / layout / memory format by name), and state may be set
    (the BUILD opcode) only on a DCP metadata object the pickle itself created, never on a
    global (a class, a function, an enum member), so not even shared state can change. The
    result must be a ``Metadata`` whose file names stay inside the directory (checked by the
    caller).

    Raises:
      CheckpointError: naming the file, and the refused global when that was the reason.
    """
    torch, _ = _torch()
    from torch.distributed.checkpoint.metadata import Metadata

    size = regular_file(path, "DCP metadata").stat().st_size
    if size > MAX_DCP_METADATA_BYTES:
        raise CheckpointError(f"DCP metadata {path} is {size:,} bytes, over the {MAX_DCP_METADATA_BYTES:,}-byte limit")
    try:
        with open(path, "rb") as f:
            metadata = _restricted_unpickler(torch, f).load()
    except _Refused as e:
        raise CheckpointError(f"DCP metadata {path} refused: {e} (a crafted or foreign pickle?); nothing in it "
                              "was run") from None
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises anything; its text may quote the file
        raise CheckpointError(f"could not read DCP metadata {path}: not a valid DCP metadata pickle "
                              f"({type(e).__name__})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"DCP metadata {path} holds a {type(metadata).__name__}, not a DCP Metadata")
    return metadata


def _check_metadata(metadata, directory: Path, meta_path: Path, torch) -> None:
    """Types and ranges of what the reader uses from ``.metadata`` (before it is used)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

    def bad(what):
        return CheckpointError(f"DCP metadata {meta_path} is malformed: {what}")

    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        raise bad("state_dict_metadata and storage_data must be dicts")
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(key, str):
            raise bad(f"key {excerpt(key)} is not a string")
        if isinstance(meta, TensorStorageMetadata):
            if not (isinstance(meta.size, torch.Size) and all(isinstance(d, int) and d >= 0 for d in meta.size)
                    and isinstance(getattr(meta.properties, "dtype", None), torch.dtype)):
                raise bad(f"tensor {excerpt(key)} has no valid size and dtype")
        elif not isinstance(meta, BytesStorageMetadata):
            raise bad(f"entry {excerpt(key)} is a {type(meta).__name__}")
    for index, info in metadata.storage_data.items():
        ints = (getattr(info, "offset", None), getattr(info, "length", None))
        if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints):
            raise bad(f"storage entry {excerpt(index)} has no valid file, offset and length")
        file_in(directory, getattr(info, "relative_path", None), meta_path)


def _reader_and_planner(dcp, directory: Path, metadata):
    """torch's FileSystemReader and DefaultLoadPlanner, except that the reader hands out the
    already checked ``metadata`` (instead of unpickling ``.metadata`` again) and the planner
    refuses to unpickle a non-tensor entry (torch would ``torch.load(weights_only=False)`` it)."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raise CheckpointError(f"DCP entry {read_item.dest_index.fqn!r} in {directory} is a pickled object, "
                                  "which is never loaded (only tensors are read)")

    return Reader(str(directory)), Planner()


def _torch_error(e: Exception) -> str:
    """What a failed tensor read says: torch's own message (the structure of the file), unless it
    comes from unpickling, whose message may quote the file's bytes."""
    if isinstance(e, (pickle.UnpicklingError, UnicodeDecodeError, EOFError)):
        text = str(e)
        refused = "Weights only load failed" in text or "Unsupported global" in text
        return (f"{type(e).__name__}: not a tensor saved by torch"
                + (" (torch.load(weights_only=True) refused a global in it)" if refused else ""))
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:300]


class DcpSource:
    """TensorSource over a DCP directory, reading one tensor per ``read`` call.

    ``tensors()`` comes from ``.metadata`` alone (names, shapes, dtypes, and the ``.distcp``
    files each tensor lives in, whose sizes are checked up front so a truncated copy fails
    before any conversion work). ``read`` asks ``torch.distributed.checkpoint.load`` for that
    single key (it assembles FSDP shards from several files if needed), so peak memory is one
    tensor plus DCP's own staging copy of it. Non-tensor entries (bytes) are listed with
    shape ``()`` and dtype ``"bytes"`` so the bookkeeping sees them too.

    Nothing from the checkpoint is unpickled without restriction: ``.metadata`` through
    :func:`read_dcp_metadata`, tensor data by torch's ``torch.load(weights_only=True)``, and
    non-tensor entries (pickled objects) are never loaded. Every file name in the metadata must
    stay inside the directory (``file_in``).
    """

    def __init__(self, directory: str | Path):
        torch, dcp = _torch()
        self._torch, self._dcp = torch, dcp
        self.directory = Path(directory)
        meta_path = self.directory / DCP_METADATA
        if not meta_path.is_file():
            raise CheckpointError(f"no {DCP_METADATA} in {self.directory}: not a complete DCP checkpoint")
        metadata = read_dcp_metadata(file_in(self.directory, DCP_METADATA))
        _check_metadata(metadata, self.directory, meta_path, torch)
        self._reader, self._planner = _reader_and_planner(dcp, self.directory, metadata)
        files: dict[str, set[str]] = {}
        sizes: dict[str, int] = {}
        for index, info in metadata.storage_data.items():
            file = self.directory / info.relative_path
            if str(file) not in sizes:
                sizes[str(file)] = file.stat().st_size
            end = info.offset + info.length
            if end > sizes[str(file)]:
                raise CheckpointError(f"truncated DCP file {file}: tensor {excerpt(index.fqn)} needs bytes up to "
                                      f"{end}, the file has {sizes[str(file)]}")
            files.setdefault(index.fqn, set()).add(str(file))
        self._meta = metadata.state_dict_metadata
        self._infos: dict[str, TensorInfo] = {}
        for key, meta in self._meta.items():
            file = ", ".join(sorted(files.get(key, ()))) or str(meta_path)
            if hasattr(meta, "size"):
                self._infos[key] = TensorInfo(tuple(meta.size), dtypes.code_of_name(str(meta.properties.dtype)), file)
            else:
                self._infos[key] = TensorInfo((), "bytes", file)

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, key: str) -> np.ndarray:
        torch, info, meta = self._torch, self._infos[key], self._meta[key]
        if info.dtype == "bytes":
            raise CheckpointError(f"DCP entry {key!r} in {info.file} is not a tensor")
        target = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            try:
                self._dcp.load({key: target}, storage_reader=self._reader, planner=self._planner, no_dist=True)
            except CheckpointError:
                raise
            except Exception as e:  # torch raises CheckpointException / RuntimeError / pickle errors
                raise CheckpointError(f"could not read tensor {key!r} from {info.file}: {_torch_error(e)}") from None
        if target.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits, no copy
            return target.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return target.numpy()

    def close(self):
        pass
