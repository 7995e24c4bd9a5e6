"""Nemotron-Diffusion's architecture config (NVRDiff: Qwen3 blocks as a bidirectional encoder +
diffusion_head)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from dllm_jax.configs.base import TransformerSpec, UnsupportedConfigError, check_field, reject_unknown


DLM_PARADIGMS = ("bidirectional", "efficient_block_diff", "prefix_bidirectional", "block_diff", "autoregressive")

_NEMOTRON_IGNORED = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "initializer_range", "use_cache", "attention_dropout", "seq_length", "prefix_ratio",
    "random_length_prob", "tok_mask_half_life_ratio", "max_window_layers", "layer_types",
    "tie_word_embeddings",  # never tied: DiffEncoderModel has no get_output_embeddings
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "dlm_type",  # training loss only
    "diffusion_lm", "attn_implementation", "_attn_implementation", "use_return_dict",
    "commit_mask_max_batch", "commit_mask_max_block", "commit_mask_max_total_len",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class NemotronDiffusionConfig:
    """Nemotron-Diffusion (NVRDiff) architecture; field names follow its Qwen3-style config.json.

    Attributes:
      hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
      num_key_value_heads, head_dim, vocab_size, rope_theta, rms_norm_eps,
      max_position_embeddings: the Qwen3 shape.
      dlm_paradigm: attention layout the checkpoint was configured with; inference uses
        ``bidirectional`` (what both NeMo-RL inference paths run).
      block_size: training/decoding block length (32 for the released model).
      mask_token_id: id of the mask token (``<|fim_pad|>``, 151662 in the real vocabulary).
      bos_token_id, eos_token_id, pad_token_id: special ids (eos = ``<|im_end|>``).
    """

    family: ClassVar[str] = "nemotron"
    # Family traits (see LLaDAConfig).
    default_algorithm: ClassVar[str] = "static_block"
    shift_logits: ClassVar[bool] = True
    sliding_decoder: ClassVar[bool] = True

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    dlm_paradigm: str = "bidirectional"
    block_size: int = 32
    mask_token_id: int = 151662
    bos_token_id: int | None = 151643
    eos_token_id: int = 151645
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.dlm_paradigm not in DLM_PARADIGMS:
            raise UnsupportedConfigError(f"dlm_paradigm={self.dlm_paradigm!r} is not one of {DLM_PARADIGMS}")

    def spec(self) -> TransformerSpec:
        return TransformerSpec(
            vocab=self.vocab_size, d_model=self.hidden_size, n_layers=self.num_hidden_layers,
            n_heads=self.num_attention_heads, n_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim, mlp_dim=self.intermediate_size, rope_theta=self.rope_theta,
            norm_eps=self.rms_norm_eps, qk_norm=True,
        )

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "NemotronDiffusionConfig":
        if cfg.get("model_type", "nvrdiff") not in ("nvrdiff", "nemotron_diffusion"):
            raise UnsupportedConfigError(f"model_type={cfg.get('model_type')!r} is not a Nemotron-Diffusion type")
        known = _NEMOTRON_IGNORED | {f.name for f in dataclasses.fields(cls)} | {
            "hidden_act", "attention_bias", "mlp_bias", "rope_scaling", "rope_parameters",
            "use_sliding_window", "sliding_window", "disable_qk_norm",
        }
        reject_unknown(cfg, known, "Nemotron-Diffusion")
        fam = "Nemotron-Diffusion"
        check_field(cfg, "hidden_act", ("silu",), default="silu", family=fam)
        check_field(cfg, "attention_bias", (False,), default=False, family=fam)
        check_field(cfg, "mlp_bias", (False,), default=False, family=fam)
        check_field(cfg, "disable_qk_norm", (False,), default=False, family=fam)
        rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
            raise UnsupportedConfigError(f"{fam} config field rope_scaling={rope_scaling!r} is not supported")
        if cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None:
            raise UnsupportedConfigError(
                f"{fam} config field use_sliding_window=True (sliding_window={cfg['sliding_window']}) is not supported")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        theta = cfg.get("rope_theta") or (rope_scaling or {}).get("rope_theta", 1000000.0)
        return cls(
            hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
            vocab_size=cfg["vocab_size"], max_position_embeddings=cfg.get("max_position_embeddings", 40960),
            rope_theta=float(theta), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            dlm_paradigm=cfg.get("dlm_paradigm", "bidirectional"), block_size=cfg.get("block_size", 32),
            mask_token_id=cfg.get("mask_token_id", 151662), bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id", 151645), pad_token_id=cfg.get("pad_token_id"),
        )

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "model_type": "nvrdiff", "architectures": ["DiffEncoderModel"], "hidden_act": "silu",
            "attention_bias": False, "rope_scaling": None, "use_sliding_window": False,
            "sliding_window": None, "disable_qk_norm": False, "tie_word_embeddings": False,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
            "dlm_paradigm": self.dlm_paradigm, "block_size": self.block_size,
            "mask_token_id": self.mask_token_id, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
        }

    # ---- presets ---------------------------------------------------------------------
    @classmethod
    def nemotron_4b(cls) -> "NemotronDiffusionConfig":
        """nvidia/Nemotron-Diffusion-Research-4B-v0 (Qwen3-4B shape, see fixtures ARCHITECTURE.md)."""
        return cls(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                   max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                   block_size=32, mask_token_id=151662, bos_token_id=151643, eos_token_id=151645)

    @classmethod
    def tiny(cls, *, num_key_value_heads: int = 2) -> "NemotronDiffusionConfig":
        """The shape of the nemotron_tiny fixture."""
        return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=num_key_value_heads, head_dim=16, vocab_size=384,
                   max_position_embeddings=4096, block_size=32, mask_token_id=336,
                   bos_token_id=317, eos_token_id=319, pad_token_id=None)
