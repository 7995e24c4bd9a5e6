"""Reading new weights for the running model, installing nothing: a checkpoint directory
(``read``: Orbax, HF or NeMo-RL DCP, confined to ``--weights-root``) or an in-process pytree
(``stage``). The result is a ``Staged`` tree on the running dtype and shardings; ``serve/engine/weights.py``
queues and installs it. Every reader is ``dllm_jax.checkpoint``'s (no pickle is ever loaded).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax

from dllm_jax import UnsupportedConfigError
from dllm_jax.checkpoint import (
    ORBAX_PARAMS_DIR,
    CheckpointError,
    detect_layout,
    open_weights,
    read_hf_config,
    read_params,
)
from serve.engine.errors import IncompatibleWeights, WeightUpdateFailed

IN_PROCESS = "in-process params"  # the source of a version installed by update_params (no path)


@dataclasses.dataclass
class Staged:
    """A checkpoint read (or an in-process pytree staged) for the running model, not installed yet.

    Attributes:
      path / layout: where it came from (``IN_PROCESS`` / ``pytree`` for ``update_params``).
      params: the tree, on the running dtype and shardings.
      seconds: reading / staging time; nbytes: the tree's bytes.
      copied_bytes: device bytes this update allocated (a checkpoint: all of them; a pytree:
        the leaves it had to cast or move, 0 when everything matched).
      borrowed: ids of leaves that are the caller's own arrays (served as they are; the engine
        drops its references but never deletes them).
    """

    path: str
    layout: str
    params: Any
    seconds: float
    nbytes: int
    copied_bytes: int = -1  # (-1: nbytes)
    borrowed: frozenset = frozenset()

    def __post_init__(self):
        if self.copied_bytes < 0:
            self.copied_bytes = self.nbytes


def config_difference(running, found) -> tuple[str, Any, Any] | None:
    """The first config field in which ``found`` differs from ``running``: (name, running, found).

    Every field counts: the compiled programs were built for the running config (shapes,
    vocab, mask and EOS ids, RoPE base, norm epsilon, attention layout), so any difference
    would run the new weights with the old model's math.
    """
    if type(found) is not type(running):
        return "family", running.family, found.family
    for field in dataclasses.fields(running):
        a, b = getattr(running, field.name), getattr(found, field.name)
        if a != b:
            return field.name, a, b
    return None


def read(model, path: str, *, root: str | None = None) -> Staged:
    """Read the checkpoint at ``path`` for ``model`` (same dtype and shardings); install nothing.

    ``path``: a local Orbax dir (``convert``), an HF dir, or a NeMo-RL checkpoint (any level:
    ``step_N/``, ``policy/``, the DCP ``weights/`` dir). A DCP dir has no config.json: the
    running model's config applies (the tensor shapes are still checked against it). ``root``:
    the directory ``path`` must lie inside (``confine``), if any.

    Raises:
      WeightUpdateFailed (IncompatibleWeights): the path or the checkpoint is unusable.
      CheckpointError / UnsupportedConfigError: from the readers (a bad checkpoint).
    """
    t0 = time.monotonic()
    directory = confine(path, root)
    if not directory.exists():
        raise WeightUpdateFailed(path, "no such directory (model_path must be a local directory on the server: "
                                       "an Orbax dir, an HF dir or a NeMo-RL checkpoint)")
    if not directory.is_dir():
        raise WeightUpdateFailed(path, "not a directory")
    running = model.config
    if (directory / ORBAX_PARAMS_DIR).is_dir():
        layout = "orbax"
        confine(str(directory / ORBAX_PARAMS_DIR), root)
        _check_config(path, running, read_hf_config(directory))
        params = read_params(directory, running, dtype=model.dtype, mesh=model.mesh)
    else:
        found = detect_layout(directory)
        layout = found.kind
        for inner in (found.weights, found.config_dir):  # (the layout's subdirectories: inside the root too)
            if inner is not None:
                confine(str(inner), root)
        if found.config_dir is not None:
            _check_config(path, running, read_hf_config(found.config_dir))
        source, prefix = open_weights(found, running)
        try:
            params = read_params(None, running, dtype=model.dtype, mesh=model.mesh, source=source,
                                 key_prefix=prefix)
        finally:
            source.close()
    jax.block_until_ready(params)  # (transfers are asynchronous: time them, and meet their errors, here)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return Staged(path, layout, params, time.monotonic() - t0, nbytes)


def stage(model, params) -> Staged:
    """A pytree of ``model``'s parameters (an ``nnx.State`` like ``model.params`` or its pure
    dict) made ready to install; install nothing.

    Leaves of another dtype are cast and leaves on another sharding (or host arrays) are put onto
    the running sharding (``Model.with_params(convert=True)``): those are copies, counted in
    ``copied_bytes``. Leaves that match are used as they are (``borrowed``: the caller's arrays).

    Raises:
      WeightUpdateFailed: naming the first parameter that is missing, extra or of another shape.
    """
    t0 = time.monotonic()
    given = {id(x) for x in jax.tree.leaves(params)}
    try:
        staged = model.with_params(params, convert=True).params
    except ValueError as e:
        raise WeightUpdateFailed(IN_PROCESS, str(e)) from None
    jax.block_until_ready(staged)  # (casts and transfers are asynchronous: meet their errors here)
    leaves = jax.tree.leaves(staged)
    borrowed = frozenset(id(x) for x in leaves if id(x) in given)
    return Staged(IN_PROCESS, "pytree", staged, time.monotonic() - t0, sum(x.nbytes for x in leaves),
                  copied_bytes=sum(x.nbytes for x in leaves if id(x) not in borrowed), borrowed=borrowed)


def confine(path: str, root: str | None) -> Path:
    """``model_path`` as a directory, resolved; with a weights root (``--weights-root``), it must
    lie inside that root once symlinks are resolved (else ``WeightUpdateFailed``, a 400).

    ``read`` applies it to the directories the layout names as well (``policy/weights`` ...), and
    the readers keep every file inside its directory (``dllm_jax.checkpoint.file_in``), so
    nothing outside the root is read.
    """
    directory = Path(path).expanduser()
    if root is None:
        return directory
    real, real_root = directory.resolve(), Path(root).expanduser().resolve()
    if real != real_root and real_root not in real.parents:
        raise WeightUpdateFailed(path, f"model_path must be a directory inside the server's weights root "
                                       f"{real_root} (--weights-root); it resolves to {real}")
    return real


def _check_config(path: str, running, found) -> None:
    diff = config_difference(running, found)
    if diff is not None:
        raise IncompatibleWeights(path, *diff)


def failure(path: str, exc: BaseException) -> WeightUpdateFailed:
    """The domain error for whatever a load raised (a bad checkpoint, or the server failing)."""
    if isinstance(exc, WeightUpdateFailed):
        return exc
    if isinstance(exc, (CheckpointError, UnsupportedConfigError, FileNotFoundError, NotADirectoryError,
                        PermissionError, IsADirectoryError)):
        return WeightUpdateFailed(path, " ".join(str(exc).split()), bad_checkpoint=True)
    return WeightUpdateFailed(path, f"{type(exc).__name__}: {' '.join(str(exc).split())}", bad_checkpoint=False)
