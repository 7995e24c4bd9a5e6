"""Reading and writing checkpoints: HF safetensors in, Orbax out, abstract-first restore."""

from dllm_jax.checkpoint.load import (
    ORBAX_PARAMS_DIR,
    TOKENIZER_DIR,
    abstract_params,
    family_key_map,
    load,
    load_tokenizer,
    read_hf_config,
    resolve_source,
)
from dllm_jax.checkpoint.safetensors_io import SafetensorsSource, save_safetensors
from dllm_jax.models.keymap import CheckpointError

__all__ = [
    "CheckpointError", "ORBAX_PARAMS_DIR", "SafetensorsSource", "TOKENIZER_DIR", "abstract_params",
    "family_key_map", "load", "load_tokenizer", "read_hf_config", "resolve_source", "save_safetensors",
]
