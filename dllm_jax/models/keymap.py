"""Checkpoint tensor -> model parameter mapping, shared by both families.

A family's key map is a table ``source key -> Target(param, layer, kind)``; ``kind`` names
the one function that turns a PyTorch tensor of that kind into our layout. The bookkeeping
that walks a checkpoint with such a map (``check_source`` / ``assemble``) lives in
``dllm_jax.checkpoint.tensors``: this module only knows the architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from dllm_jax.configs import TransformerSpec
from dllm_jax.models.transformer import layer_shapes


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a source tensor goes. param: top-level name or 'layers/<name>'; layer: index or None."""

    param: str
    layer: int | None
    kind: str


# ---- per-kind layout transforms (PyTorch Linear stores [out, in]) -----------------------


def source_shape(kind: str, spec: TransformerSpec) -> tuple[int, ...]:
    d, n, k, h, f, v = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.mlp_dim, spec.vocab
    return {
        "embed": (v, d), "head": (v, d), "norm": (d,), "head_norm": (h,),
        "q": (n * h, d), "kv": (k * h, d), "o": (d, n * h), "mlp_in": (f, d), "mlp_out": (d, f),
    }[kind]


def to_param(kind: str, w: np.ndarray, spec: TransformerSpec) -> np.ndarray:
    """Source tensor (already shape-checked) -> our layout."""
    d, n, k, h = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim
    if kind in ("embed", "norm", "head_norm"):
        return w
    if kind in ("head", "mlp_in", "mlp_out"):
        return w.T  # [V, D] -> [D, V]; [F, D] -> [D, F]; [D, F] -> [F, D]
    if kind == "q":
        return w.T.reshape(d, n, h)  # y = x @ W.T, output index = head * H + h
    if kind == "kv":
        return w.T.reshape(d, k, h)
    if kind == "o":
        return w.T.reshape(n, h, d)
    raise KeyError(kind)


def from_param(kind: str, w: np.ndarray, spec: TransformerSpec) -> np.ndarray:
    """Our layout -> the source (PyTorch) layout: the inverse of ``to_param``."""
    d, n, k, h = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim
    if kind in ("embed", "norm", "head_norm"):
        return w
    if kind in ("head", "mlp_in", "mlp_out"):
        return w.T
    if kind == "q":
        return w.reshape(d, n * h).T
    if kind == "kv":
        return w.reshape(d, k * h).T
    if kind == "o":
        return w.reshape(n * h, d).T
    raise KeyError(kind)


def param_shapes(spec: TransformerSpec) -> dict[str, tuple[int, ...]]:
    shapes = {"embed": (spec.vocab, spec.d_model), "final_norm": (spec.d_model,),
              "lm_head": (spec.d_model, spec.vocab)}
    shapes.update({f"layers/{k}": s for k, s in layer_shapes(spec).items()})
    return shapes


def layer_key_map(n_layers: int, fmt: str, names: Mapping[str, tuple[str, str]]) -> dict[str, Target]:
    """Expand a per-layer name table: names[source suffix] = (param, kind)."""
    out = {}
    for i in range(n_layers):
        for suffix, (param, kind) in names.items():
            out[fmt.format(i=i, suffix=suffix)] = Target(f"layers/{param}", i, kind)
    return out
