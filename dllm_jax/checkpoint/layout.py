"""Finding the weights in a checkpoint directory, and opening the reader for them.

NeMo-RL saves a policy as ``<ckpt>/step_N/policy/{weights,tokenizer,optimizer}``. ``weights`` is
a DCP (``.metadata`` + ``__R_0.distcp`` files) of ``{"model": state_dict}``, so every key carries
a ``model.`` prefix in front of the Hugging Face name. The newer DTensor-v2 / automodel path
saves a flat state dict (HF names, no prefix) under ``weights/model/``, as DCP or as safetensors
(optionally with a ``consolidated/`` HF copy). A user may point at any level of that tree;
:func:`detect_layout` walks down to the weights and says which layout it found, so the log and
the manifest record what was actually converted, and :func:`open_weights` opens the reader for
that layout with the key prefix its names carry. ``convert`` and the server's weight updates
both go through these two functions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Mapping

from dllm_jax.checkpoint.dcp import DCP_METADATA, DcpSource
from dllm_jax.checkpoint.safetensors_io import OneMapAtATime, SafetensorsSource
from dllm_jax.checkpoint.tensors import CheckpointError, TensorSource
from dllm_jax.configs import ModelConfig
from dllm_jax.models import key_map

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


def open_weights(layout: Layout, config: ModelConfig, *,
                 one_map_at_a_time: bool = False) -> tuple[TensorSource, str]:
    """The reader for ``layout``'s weights, and the prefix its keys carry before the HF names.

    DCP: a :class:`DcpSource` and ``"model."`` or ``""`` (:func:`choose_key_prefix` against
    ``config``'s key map); safetensors: a ``SafetensorsSource`` and ``""``.
    ``one_map_at_a_time``: drop each file's memory map before the next read (``convert`` does,
    so that its RSS stays near the output size; see ``OneMapAtATime``). The caller closes the
    source.
    """
    if layout.format == "dcp":
        source = DcpSource(layout.weights)
        return source, choose_key_prefix(source.tensors(), key_map(config))
    safetensors = SafetensorsSource(layout.weights)
    return (OneMapAtATime(safetensors) if one_map_at_a_time else safetensors), ""
