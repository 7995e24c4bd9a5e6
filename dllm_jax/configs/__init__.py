"""Architecture configs: one frozen dataclass per model family.

Each family config mirrors the fields of its checkpoint's ``config.json``; ``from_hf_config``
refuses any field whose value would change the math in a way this port does not implement
(bias, weight tying, a different norm, activation or RoPE, sliding windows ...), so a
checkpoint is never converted silently wrong. ``spec()`` reduces a family config to the
shared :class:`TransformerSpec` that the model blocks are built from. One module per family
(``llada.py``, ``nemotron.py``); the shared parts in ``base.py``.
"""

from __future__ import annotations

from typing import Any, Mapping

from dllm_jax.configs.base import TransformerSpec, UnsupportedConfigError
from dllm_jax.configs.llada import LLaDAConfig
from dllm_jax.configs.nemotron import DLM_PARADIGMS, NemotronDiffusionConfig

__all__ = ["DLM_PARADIGMS", "FAMILY_CONFIGS", "LLaDAConfig", "ModelConfig", "NemotronDiffusionConfig",
           "TransformerSpec", "UnsupportedConfigError", "config_from_hf"]

ModelConfig = LLaDAConfig | NemotronDiffusionConfig

# Family name (``config.family``, ``Model.family``) -> its config class (and so its traits).
FAMILY_CONFIGS: dict[str, type[ModelConfig]] = {c.family: c for c in (LLaDAConfig, NemotronDiffusionConfig)}

_FAMILIES = {"llada": LLaDAConfig, "nvrdiff": NemotronDiffusionConfig,
             "nemotron_diffusion": NemotronDiffusionConfig}


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    """Pick the family from ``model_type`` (or the architecture name) and parse the config."""
    model_type = cfg.get("model_type")
    if model_type is None:
        arch = (cfg.get("architectures") or [""])[0]
        model_type = {"LLaDAModelLM": "llada", "DiffEncoderModel": "nvrdiff"}.get(arch)
    if model_type not in _FAMILIES:
        raise UnsupportedConfigError(
            f"unknown model_type {model_type!r}; supported: {sorted(_FAMILIES)} (LLaDA, Nemotron-Diffusion)")
    return _FAMILIES[model_type].from_hf_config(cfg)
