"""Checkpoint tensors: the reader protocol, errors, and the bookkeeping shared by ``load``
and ``convert``.

``check_source`` checks names and shapes of every tensor against a family's key map
(``dllm_jax.models.key_map``) before any data is read; ``assemble`` then yields one stacked
parameter at a time with full bookkeeping: every parameter slice filled exactly once, every
source key used or explicitly ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Mapping, Protocol

import numpy as np

from dllm_jax.configs import TransformerSpec
from dllm_jax.models.keymap import Target, param_shapes, source_shape, to_param


class CheckpointError(ValueError):
    """A checkpoint does not match the architecture (names the key, shapes and file)."""


def excerpt(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: what a message may quote of a checkpoint's content."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def inside(directory: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path``, symlinks resolved, lies inside ``directory`` (itself resolved: a linked-in
    directory is fine), or, for a Hugging Face hub cache snapshot (``snapshots/<revision>/``), in
    that repository's ``blobs/``, where the hub keeps the files its snapshot links point to."""
    root, target = Path(directory).resolve(), Path(path).resolve()
    if root == target or root in target.parents:
        return True
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


def file_in(directory: str | os.PathLike, name, listed_in: str | os.PathLike | None = None) -> Path:
    """``directory / name`` for a file of a checkpoint, kept inside ``directory``.

    ``name``, when read from the checkpoint (``listed_in``: an index, DCP metadata), must be a
    relative path without ``..`` components. The file, symlinks resolved, must lie inside
    ``directory`` (see ``inside``: a symlink to a file elsewhere would make a reader, or a
    converter copying it to its output, use a file the checkpoint's author chose), and be a
    regular file: FIFOs and devices, which could block a reader or never end, are refused.

    Raises:
      CheckpointError: naming the file (an excerpt of the name), never its content.
    """
    where = (f"{listed_in} names the file {excerpt(name)}" if listed_in is not None
             else f"checkpoint file {Path(directory) / str(name)}")
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{where}: not a file name inside {directory}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or pure.name in ("", "."):
        raise CheckpointError(f"{where}: file names in a checkpoint must stay inside its directory {directory} "
                              "(relative, no '..')")
    path = Path(directory) / pure
    mode = _mode(path, f"{where}, which is missing from {directory}", f"{where}, which cannot be read")
    if not inside(directory, path):
        raise CheckpointError(f"{where}, which is a symlink to a file outside {directory}: the files of a "
                              "checkpoint must stay inside its directory (link the whole directory instead)")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{where}, which is not a regular file")
    return path


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is a regular file (symlinks followed), else CheckpointError naming it."""
    path = Path(path)
    if not stat.S_ISREG(_mode(path, f"{what} {path} is missing", f"{what} {path} cannot be read")):
        raise CheckpointError(f"{what} {path} is not a regular file")
    return path


def _mode(path: Path, missing: str, unreadable: str) -> int:
    """``path``'s mode (symlinks followed), or CheckpointError(missing / unreadable: why)."""
    try:
        return path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(missing) from None
    except OSError as e:
        raise CheckpointError(f"{unreadable}: {e.strerror}") from None


def read_json(path: str | os.PathLike, what: str, limit: int = 100_000_000):
    """A JSON file of a checkpoint (at most ``limit`` bytes, checked before reading); errors name
    the file and the position, never its content."""
    path = regular_file(path, what)
    size = path.stat().st_size
    if size > limit:
        raise CheckpointError(f"{what} {path} is {size:,} bytes, over the {limit:,}-byte limit")
    with open(path, "rb") as f:
        return parse_json(f.read(limit + 1), f"{what} {path}")


def parse_json(raw: bytes, what: str, offset: int = 0):
    """JSON from a checkpoint's bytes (``offset``: where ``raw`` starts in its file); errors name
    ``what`` and a byte position, never the content."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} is not UTF-8 text (at byte {offset + e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} is not valid JSON: {e.msg} (at byte {offset + e.pos})") from None
    except RecursionError:
        raise CheckpointError(f"{what} is nested too deeply") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Name-independent facts of one source tensor: shape, safetensors dtype code, file(s)."""

    shape: tuple[int, ...]
    dtype: str
    file: str


class TensorSource(Protocol):
    """Random-access reader of named tensors (safetensors files, a DCP checkpoint ...)."""

    def tensors(self) -> Mapping[str, TensorInfo]: ...

    def read(self, key: str) -> np.ndarray: ...


# ---- bookkeeping ---------------------------------------------------------------------


def check_source(source: TensorSource, key_map: Mapping[str, Target], spec: TransformerSpec,
                 ignore: Callable[[str], bool] = lambda key: False, key_prefix: str = "") -> list[str]:
    """Check names and shapes of a source against the key map before reading any data.

    Returns the source keys that were explicitly ignored. Raises CheckpointError naming the
    offending key, the expected and found shape, and the file.
    """
    tensors = source.tensors()
    ignored, unknown, seen = [], [], set()
    for raw_key, info in tensors.items():
        key = raw_key[len(key_prefix):] if key_prefix and raw_key.startswith(key_prefix) else raw_key
        if key not in key_map:
            (ignored if ignore(raw_key) else unknown).append(raw_key)
            continue
        target = key_map[key]
        want = source_shape(target.kind, spec)
        if tuple(info.shape) != want:
            raise CheckpointError(
                f"tensor {raw_key!r} in {info.file}: expected shape {list(want)} for "
                f"{target.param}{'' if target.layer is None else f'[{target.layer}]'}, found {list(info.shape)}")
        seen.add(key)
    if unknown:
        files = sorted({tensors[k].file for k in unknown})
        raise CheckpointError(f"unexpected tensors {unknown[:8]}{' ...' if len(unknown) > 8 else ''} "
                              f"({len(unknown)} in all) in {', '.join(files)}: not part of this architecture")
    missing = sorted(set(key_map) - seen)
    if missing:
        raise CheckpointError(f"missing tensors {[key_prefix + m for m in missing[:8]]}"
                              f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all) in "
                              f"{', '.join(sorted({i.file for i in tensors.values()})) or 'the checkpoint'}")
    return ignored


def assemble(source: TensorSource, key_map: Mapping[str, Target], spec: TransformerSpec, dtype,
             *, key_prefix: str = "", on_tensor: Callable[[str, int], None] | None = None
             ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (param name, stacked array in ``dtype``) one parameter at a time.

    Source tensors are read one by one (peak memory: one output parameter plus one source
    tensor). Call ``check_source`` first; this re-checks that every slice is filled once.
    """
    by_param: dict[str, list[tuple[str, Target]]] = {}
    for key, target in key_map.items():
        by_param.setdefault(target.param, []).append((key, target))
    shapes = param_shapes(spec)
    if set(by_param) != set(shapes):
        raise CheckpointError(f"key map does not cover parameters {sorted(set(shapes) ^ set(by_param))}")
    for name, entries in by_param.items():
        out = np.empty(shapes[name], dtype)
        filled = np.zeros(shapes[name][0] if name.startswith("layers/") else 1, bool)
        for key, target in entries:
            w = source.read(key_prefix + key)
            want = source_shape(target.kind, spec)
            if tuple(w.shape) != want:  # a reader may know the shape only once it reads
                raise CheckpointError(f"tensor {key_prefix + key!r}: expected shape {list(want)}, found {list(w.shape)}")
            slot = 0 if target.layer is None else target.layer
            if filled[slot]:
                raise CheckpointError(f"parameter {name}[{slot}] filled twice (by {key_prefix + key!r})")
            value = to_param(target.kind, w, spec)
            if target.layer is None:
                out[...] = value
            else:
                out[target.layer] = value
            filled[slot] = True
            if on_tensor is not None:
                on_tensor(key, w.nbytes)
            del w, value
        if not filled.all():
            raise CheckpointError(f"parameter {name}: slices {np.flatnonzero(~filled).tolist()} never filled")
        yield name, out


def nest_params(flat: dict[str, object]) -> dict:
    """{'layers/q_proj': a, 'embed': b} -> {'layers': {'q_proj': a}, 'embed': b}: the tree of a
    checkpoint's ``params/`` (what ``assemble`` yields, nested by '/')."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# Keys a training checkpoint may carry that are not weights of the inference model.
IGNORABLE = re.compile(r"(^|\.)(optim|optimizer|lr_scheduler|scheduler|rng_state|_extra_state)(\.|$)|rotary_emb\.inv_freq$")


def is_ignorable(key: str) -> bool:
    return bool(IGNORABLE.search(key))
