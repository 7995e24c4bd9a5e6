"""Reading and writing checkpoints: HF safetensors or NeMo-RL DCP in, Orbax out, abstract-first restore.

This package is also the toolkit ``convert`` and the server's weight updates build on (tensor
sources, checkpoint layout detection and the DCP reader, the key-map bookkeeping, the Orbax
directory layout, the dtype table): everything they need is exported here, so nothing outside
``dllm_jax`` imports a private module, and neither imports the other.
"""

from dllm_jax.checkpoint import dtypes
from dllm_jax.checkpoint.dcp import DcpSource, read_dcp_metadata
from dllm_jax.checkpoint.layout import (
    TOKENIZER_FILES,
    Layout,
    choose_key_prefix,
    detect_layout,
    has_tokenizer,
    open_weights,
)
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
    "CheckpointError", "DcpSource", "Layout", "MANIFEST", "ORBAX_PARAMS_DIR", "SafetensorsSource", "TOKENIZER_DIR",
    "TOKENIZER_FILES", "TensorInfo", "TensorSource", "assemble", "check_source", "choose_key_prefix", "detect_layout",
    "dtypes", "excerpt", "file_in", "has_tokenizer", "inside", "is_ignorable", "key_map", "load", "load_tokenizer",
    "nest_params", "open_weights", "read_dcp_metadata", "read_hf_config", "read_json", "read_params", "regular_file",
    "resolve_source", "save_safetensors",
]
