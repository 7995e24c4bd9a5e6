"""Finding the weights in a checkpoint directory, and reading PyTorch Distributed Checkpoints.

NeMo-RL saves a policy as ``<ckpt>/step_N/policy/{weights,tokenizer,optimizer}``. ``weights`` is
a DCP (``.metadata`` + ``__R_0.distcp`` files) of ``{"model": state_dict}``, so every key carries
a ``model.`` prefix in front of the Hugging Face name. The newer DTensor-v2 / automodel path
saves a flat state dict (HF names, no prefix) under ``weights/model/``, as DCP or as safetensors
(optionally with a ``consolidated/`` HF copy). A user may point at any level of that tree;
:func:`detect_layout` walks down to the weights and says which layout it found, so the log and
the manifest record what was actually converted.

Torch is imported lazily, only by :class:`DcpSource`: ``dllm_jax`` itself never imports it.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from dllm_jax.checkpoint import CheckpointError, TensorInfo, dtypes

DCP_METADATA = ".metadata"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.txt",
)
DCP_HINT = ("expected an HF dir (config.json + model.safetensors), or a NeMo-RL checkpoint: step_N/, "
            "step_N/policy/, a DCP weights/ dir (.metadata + *.distcp) or weights/model/")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a checkpoint's pieces are.

    Attributes:
      kind: short name recorded in the manifest, e.g. ``hf``, ``dcp:step_N/policy/weights``,
        ``dcp:weights/model``, ``safetensors:policy/weights/model/consolidated``.
      format: ``"safetensors"`` or ``"dcp"``: which reader opens ``weights``.
      weights: the directory holding the tensors.
      config_dir: a directory with the checkpoint's own config.json, or None (DCP has none).
      tokenizer_dir: the checkpoint's own tokenizer directory, or None.
    """

    kind: str
    format: str
    weights: Path
    config_dir: Path | None
    tokenizer_dir: Path | None


def has_tokenizer(directory: Path | None) -> bool:
    return directory is not None and any((directory / f).is_file() for f in TOKENIZER_FILES)


def _has_safetensors(directory: Path) -> bool:
    return (directory / "model.safetensors.index.json").is_file() or any(directory.glob("*.safetensors"))


def detect_layout(path: Path) -> Layout:
    """Classify ``path`` (an HF dir or any level of a NeMo-RL checkpoint) and find its weights.

    Raises:
      CheckpointError: the directory is neither, or a DCP directory lacks its ``.metadata``.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; {DCP_HINT}")
    in_weights = path.name == "model" and path.parent.name == "weights"
    if _has_safetensors(path) and not (path / DCP_METADATA).exists() and not in_weights:
        sharded = (path / "model.safetensors.index.json").is_file()
        return Layout("hf-sharded" if sharded else "hf", "safetensors", path,
                      path if (path / "config.json").is_file() else None, path if has_tokenizer(path) else None)
    parts, d = [], path
    if (d / "policy").is_dir():  # step_N/
        parts.append("step_N")
        d = d / "policy"
    if (d / "weights").is_dir():  # policy/
        parts.append("policy")
        d = d / "weights"
    parts.append("weights")
    flat = False
    if (d / "model").is_dir() and not (d / DCP_METADATA).exists():  # weights/model/ (DTensor v2)
        d, flat = d / "model", True
    elif in_weights:  # pointed straight at weights/model
        flat = True
    if flat:
        parts.append("model")
    weights_root = d.parent if flat else d
    tokenizer = weights_root.parent / "tokenizer" if weights_root.name == "weights" else None
    tokenizer = tokenizer if has_tokenizer(tokenizer) else None
    shape = "/".join(parts)
    if (d / DCP_METADATA).is_file():
        return Layout(f"dcp:{shape}", "dcp", d, None, tokenizer)
    if (d / "consolidated").is_dir() and _has_safetensors(d / "consolidated"):
        c = d / "consolidated"
        return Layout(f"safetensors:{shape}/consolidated", "safetensors", c,
                      c if (c / "config.json").is_file() else None, c if has_tokenizer(c) else tokenizer)
    if _has_safetensors(d) and flat:
        return Layout(f"safetensors:{shape}", "safetensors", d, None, tokenizer)
    if any(d.glob("*.distcp")):
        raise CheckpointError(f"DCP directory {d} has *.distcp files but no {DCP_METADATA} (an interrupted "
                              f"or partial copy?); cannot read it without the metadata")
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise CheckpointError(f"{d} holds PyTorch pickle weights (*.bin / *.pt), which are not read (unsafe to "
                              f"unpickle); save them as safetensors first; {DCP_HINT}")
    raise CheckpointError(f"{path} holds no checkpoint: no config.json + *.safetensors and no DCP "
                          f"{DCP_METADATA}; {DCP_HINT}")


def choose_key_prefix(keys: Iterable[str], wanted: Mapping[str, object]) -> str:
    """``"model."`` or ``""``: whichever makes more checkpoint keys hit the key map.

    NeMo-RL's v1 DCP nests the state dict under ``model`` (keys ``model.<hf name>``); the flat
    v2 layout does not. Counting hits (rather than testing ``startswith("model.")``) matters for
    LLaDA, whose HF names themselves begin with ``model.``.
    """
    keys = list(keys)
    hits = {p: sum(k.startswith(p) and k[len(p):] in wanted for k in keys) for p in ("model.", "")}
    return "model." if hits["model."] > hits[""] else ""


# ---- DCP reader ---------------------------------------------------------------------------

def _torch():
    try:
        import torch
        import torch.distributed.checkpoint as dcp
    except ImportError:
        raise CheckpointError("reading a DCP checkpoint needs PyTorch (a CPU build is enough): "
                              "pip install 'dllm-jax[dcp]'") from None
    return torch, dcp


class DcpSource:
    """TensorSource over a DCP directory, reading one tensor per ``read`` call.

    ``tensors()`` comes from ``.metadata`` alone (names, shapes, dtypes, and the ``.distcp``
    files each tensor lives in, whose sizes are checked up front so a truncated copy fails
    before any conversion work). ``read`` asks ``torch.distributed.checkpoint.load`` for that
    single key (it assembles FSDP shards from several files if needed), so peak memory is one
    tensor plus DCP's own staging copy of it. Non-tensor entries (bytes) are listed with
    shape ``()`` and dtype ``"bytes"`` so the bookkeeping sees them too.
    """

    def __init__(self, directory: str | Path):
        torch, dcp = _torch()
        self._torch, self._dcp = torch, dcp
        self.directory = Path(directory)
        meta_path = self.directory / DCP_METADATA
        if not meta_path.is_file():
            raise CheckpointError(f"no {DCP_METADATA} in {self.directory}: not a complete DCP checkpoint")
        self._reader = dcp.FileSystemReader(str(self.directory))
        try:
            metadata = self._reader.read_metadata()
        except Exception as e:  # unpickling a damaged file raises anything
            raise CheckpointError(f"could not read DCP metadata {meta_path}: {type(e).__name__}: {e}") from None
        files: dict[str, set[str]] = {}
        sizes: dict[str, int] = {}
        for index, info in metadata.storage_data.items():
            file = self.directory / info.relative_path
            if file.name not in sizes:
                if not file.is_file():
                    raise CheckpointError(f"DCP file {file} (listed in {meta_path}) is missing")
                sizes[file.name] = file.stat().st_size
            end = info.offset + info.length
            if end > sizes[file.name]:
                raise CheckpointError(f"truncated DCP file {file}: tensor {index.fqn!r} needs bytes up to {end}, "
                                      f"the file has {sizes[file.name]}")
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
                self._dcp.load({key: target}, storage_reader=self._reader, no_dist=True)
            except Exception as e:  # torch raises CheckpointException / RuntimeError / pickle errors
                msg = " ".join(str(e).split())[:500]
                raise CheckpointError(f"could not read tensor {key!r} from {info.file}: {type(e).__name__}: {msg}") from None
        if target.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits, no copy
            return target.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return target.numpy()

    def close(self):
        pass
