"""dllm-jax: masked-diffusion language models (LLaDA, Nemotron-Diffusion) in JAX/Flax."""

from pathlib import Path as _Path

# The demo model trained in this repo (``python -m dllm_jax.demo.train``), shipped as an HF dir:
# ``dllm_jax.load(dllm_jax.DEMO_MODEL)``.
DEMO_MODEL = str(_Path(__file__).parent / "assets" / "demo_model")

# ---- configs ---------------------------------------------------------------------------
from dllm_jax.configs import (
    FAMILY_CONFIGS,
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

# ---- sampling (Model.generate; DecodeSession for servers) --------------------------------
from dllm_jax import sampling
from dllm_jax.sampling import ALGORITHMS, GenerateOutput, SamplingError, SamplingParams, ScoreOutput

# ---- notebook plots (matplotlib is imported lazily, inside the functions) ----------------
from dllm_jax import viz

__all__ = [
    "ALGORITHMS", "CheckpointError", "DEMO_MODEL", "FAMILY_CONFIGS", "GenerateOutput", "LLaDAConfig", "Model", "NemotronDiffusionConfig",
    "SamplingError", "SamplingParams", "ScoreOutput", "TransformerSpec", "UnsupportedConfigError", "config_from_hf", "load",
    "make_mesh", "sampling", "viz",
]
