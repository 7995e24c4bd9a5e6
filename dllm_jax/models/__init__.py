"""The networks: one shared transformer (``transformer.py``) and, per family, its checkpoint
names (``llada.py``, ``nemotron.py``) in the key-map form of ``keymap.py``."""

from __future__ import annotations

from dllm_jax.configs import LLaDAConfig, ModelConfig
from dllm_jax.models import llada, nemotron
from dllm_jax.models.keymap import Target


def key_map(config: ModelConfig) -> dict[str, Target]:
    """The family's HF state-dict key -> parameter table."""
    return llada.hf_key_map(config) if isinstance(config, LLaDAConfig) else nemotron.hf_key_map(config)
