"""LLaDA: the shared transformer with LLaDA's checkpoint names.

Block naming upstream: ``ff_proj`` is the gated (SiLU) branch, ``up_proj`` the linear branch,
``blocks.N.ff_out`` the MLP down projection and ``transformer.ff_out`` the untied LM head.
"""

from __future__ import annotations

from dllm_jax.configs import LLaDAConfig
from dllm_jax.models.keymap import Target, layer_key_map

_BLOCK = {
    "attn_norm.weight": ("attn_norm", "norm"),
    "q_proj.weight": ("q_proj", "q"),
    "k_proj.weight": ("k_proj", "kv"),
    "v_proj.weight": ("v_proj", "kv"),
    "attn_out.weight": ("o_proj", "o"),
    "ff_norm.weight": ("mlp_norm", "norm"),
    "ff_proj.weight": ("gate_proj", "mlp_in"),
    "up_proj.weight": ("up_proj", "mlp_in"),
    "ff_out.weight": ("down_proj", "mlp_out"),
}


def hf_key_map(config: LLaDAConfig) -> dict[str, Target]:
    """HF state-dict key -> parameter (``LLaDAModelLM.state_dict()`` names)."""
    key_map = {
        "model.transformer.wte.weight": Target("embed", None, "embed"),
        "model.transformer.ln_f.weight": Target("final_norm", None, "norm"),
        "model.transformer.ff_out.weight": Target("lm_head", None, "head"),
    }
    key_map.update(layer_key_map(config.n_layers, "model.transformer.blocks.{i}.{suffix}", _BLOCK))
    return key_map
