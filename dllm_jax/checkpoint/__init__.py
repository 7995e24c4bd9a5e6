"""Reading and writing checkpoints: HF safetensors in, Orbax out, abstract-first restore.

This package is also the toolkit ``convert`` builds on (tensor sources, the key-map
bookkeeping, the Orbax directory layout, the dtype table): everything it needs is exported
here, so nothing outside ``dllm_jax`` imports a private module.
"""

from dllm_jax.checkpoint import dtypes
from dllm_jax.checkpoint.load import (
    MANIFEST,
    ORBAX_PARAMS_DIR,
    TOKENIZER_DIR,
    load,
    load_tokenizer,
    read_hf_config,
    read_params,
    resolve_source,
)
from dllm_jax.checkpoint.safetensors_io import SafetensorsSource, save_safetensors
from dllm_jax.checkpoint.tensors import (
    CheckpointError,
    TensorInfo,
    TensorSource,
    assemble,
    check_source,
    excerpt,
    file_in,
    inside,
    is_ignorable,
    nest_params,
    read_json,
    regular_file,
)
from dllm_jax.models import key_map

__all__ = [
    "CheckpointError", "MANIFEST", "ORBAX_PARAMS_DIR", "SafetensorsSource", "TOKENIZER_DIR", "TensorInfo",
    "TensorSource", "assemble", "check_source", "dtypes", "excerpt", "file_in", "inside", "is_ignorable", "key_map",
    "load", "load_tokenizer", "nest_params", "read_hf_config", "read_json", "read_params", "regular_file",
    "resolve_source", "save_safetensors",
]
