"""Checkpoint tensors: the reader protocol, errors, and the bookkeeping shared by ``load``
and ``convert``.

``check_source`` checks names and shapes of every tensor against a family's key map
(``dllm_jax.models.key_map``) before any data is read; ``assemble`` then yields one stacked
parameter at a time with full bookkeeping: every parameter slice filled exactly once, every
source key used or explicitly ignored.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator, Mapping, Protocol

import numpy as np

from dllm_jax.configs import TransformerSpec
from dllm_jax.models.keymap import Target, param_shapes, source_shape, to_param


class CheckpointError(ValueError):
    """A checkpoint does not match the architecture (names the key, shapes and file)."""


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
