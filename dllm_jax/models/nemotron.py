"""Nemotron-Diffusion (NVRDiff): Qwen3 blocks as a bidirectional encoder + untied diffusion_head.

Besides the checkpoint names, this module knows the attention layouts of the family's
``dlm_paradigm`` values that can run at inference (see fixtures' ARCHITECTURE.md):

* ``bidirectional``: every query sees every (non-pad) key;
* ``efficient_block_diff``: block-causal, ``(q // bs) >= (kv // bs)``;
* ``prefix_bidirectional``: ``(kv <= split) | (q >= split)`` (note the inclusive ``<=``).
"""

from __future__ import annotations

import jax.numpy as jnp

from dllm_jax.configs import NemotronDiffusionConfig
from dllm_jax.models.keymap import Target, layer_key_map

_BLOCK = {
    "input_layernorm.weight": ("attn_norm", "norm"),
    "self_attn.q_proj.weight": ("q_proj", "q"),
    "self_attn.k_proj.weight": ("k_proj", "kv"),
    "self_attn.v_proj.weight": ("v_proj", "kv"),
    "self_attn.o_proj.weight": ("o_proj", "o"),
    "self_attn.q_norm.weight": ("q_norm", "head_norm"),
    "self_attn.k_norm.weight": ("k_norm", "head_norm"),
    "post_attention_layernorm.weight": ("mlp_norm", "norm"),
    "mlp.gate_proj.weight": ("gate_proj", "mlp_in"),
    "mlp.up_proj.weight": ("up_proj", "mlp_in"),
    "mlp.down_proj.weight": ("down_proj", "mlp_out"),
}

LAYOUTS = ("bidirectional", "efficient_block_diff", "prefix_bidirectional")


def hf_key_map(config: NemotronDiffusionConfig) -> dict[str, Target]:
    """HF state-dict key -> parameter (``DiffEncoderModel.state_dict()`` names)."""
    key_map = {
        "encoder.embed_tokens.weight": Target("embed", None, "embed"),
        "encoder.norm.weight": Target("final_norm", None, "norm"),
        "diffusion_head.weight": Target("lm_head", None, "head"),
    }
    key_map.update(layer_key_map(config.num_hidden_layers, "encoder.layers.{i}.{suffix}", _BLOCK))
    return key_map


def layout_mask(layout: str, length: int, *, block_size: int | None = None, split_len: int | None = None):
    """[L, L] bool attention pattern of an inference layout (True = may attend)."""
    q = jnp.arange(length)[:, None]
    kv = jnp.arange(length)[None, :]
    if layout == "bidirectional":
        return jnp.ones((length, length), bool)
    if layout == "efficient_block_diff":
        if not block_size:
            raise ValueError("layout 'efficient_block_diff' needs block_size")
        return (q // block_size) >= (kv // block_size)
    if layout == "prefix_bidirectional":
        if split_len is None:
            raise ValueError("layout 'prefix_bidirectional' needs split_len")
        return (kv <= split_len) | (q >= split_len)
    raise ValueError(f"unknown attention layout {layout!r}; supported: {LAYOUTS}")
