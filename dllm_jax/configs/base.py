"""What every family config shares: the transformer spec, the refusal error, the field checks.

The families (``llada.py``, ``nemotron.py``) and the dispatch (``__init__.py``) build on these.

Each family config mirrors the fields of its checkpoint's ``config.json``; ``from_hf_config``
refuses any field whose value would change the math in a way this port does not implement
(bias, weight tying, a different norm, activation or RoPE, sliding windows ...), so a
checkpoint is never converted silently wrong. ``spec()`` reduces a family config to the
shared :class:`TransformerSpec` that the model blocks are built from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class UnsupportedConfigError(ValueError):
    """A config.json field has a value this port does not implement."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerSpec:
    """Shape and numerics of the shared bidirectional transformer stack.

    Attributes:
      vocab: rows of the embedding table and columns of the output head (V).
      d_model: residual width (D).
      n_layers: number of blocks.
      n_heads: query heads (N).
      n_kv_heads: key/value heads (K); N must be a multiple of K (GQA).
      head_dim: per-head width (H).
      mlp_dim: SwiGLU hidden width (F).
      rope_theta: RoPE base.
      norm_eps: RMSNorm epsilon.
      qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3 style).
    """

    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float
    norm_eps: float
    qk_norm: bool

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads=} must be a multiple of {self.n_kv_heads=}")

    def param_count(self) -> int:
        d, n, k, h, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.mlp_dim
        per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f + 2 * d + (2 * h if self.qk_norm else 0)
        return self.n_layers * per_layer + 2 * self.vocab * d + d


def check_field(cfg: Mapping[str, Any], key: str, allowed, *, default=None, family: str) -> None:
    value = cfg.get(key, default)
    allowed = allowed if isinstance(allowed, (tuple, list, set)) else (allowed,)
    if value not in allowed:
        raise UnsupportedConfigError(
            f"{family} config field {key}={value!r} is not supported (supported: "
            f"{', '.join(repr(a) for a in allowed)}); converting it would silently change the math"
        )


def reject_unknown(cfg: Mapping[str, Any], known: set[str], family: str) -> None:
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UnsupportedConfigError(
            f"{family} config has fields this port does not know: {unknown}. They may change the "
            "architecture; refusing rather than converting silently wrong."
        )
