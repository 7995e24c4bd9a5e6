"""dllm-jax: masked-diffusion language models (LLaDA, Nemotron-Diffusion) in JAX/Flax."""

# ---- configs ---------------------------------------------------------------------------
from dllm_jax.configs import (
    LLaDAConfig,
    NemotronDiffusionConfig,
    TransformerSpec,
    UnsupportedConfigError,
    config_from_hf,
)

# ---- checkpoints -> model ----------------------------------------------------------------
from dllm_jax.checkpoint import CheckpointError, load
from dllm_jax.model import Model

# ---- meshes ------------------------------------------------------------------------------
from dllm_jax.sharding import make_mesh
from dllm_jax import viz  # notebook plots (matplotlib is imported lazily, inside viz functions)

__all__ = [
    "CheckpointError", "LLaDAConfig", "Model", "NemotronDiffusionConfig", "TransformerSpec",
    "UnsupportedConfigError", "config_from_hf", "load", "make_mesh",
]
