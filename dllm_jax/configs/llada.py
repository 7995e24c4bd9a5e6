"""LLaDA's architecture config (``config.json`` of GSAI-ML/LLaDA-8B-Instruct and its fine-tunes)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from dllm_jax.configs.base import TransformerSpec, UnsupportedConfigError, check_field, reject_unknown


# Fields of LLaDA's config.json that never change inference math (init, dropout, bookkeeping).
_LLADA_IGNORED = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "init_cutoff_factor", "init_device", "init_fn", "init_std", "precision", "use_cache",
    "attention_dropout", "embedding_dropout", "residual_dropout", "flash_attention",
    "mlp_ratio",  # ignored whenever mlp_hidden_size is set (as upstream)
    "bos_token_id", "output_attentions", "output_hidden_states", "return_dict", "id2label",
    "label2id", "tie_word_embeddings", "max_position_embeddings",
}
# Fields whose value is checked: anything else changes the math.
_LLADA_CHECKED = {
    "block_type": ("llama",), "activation_type": ("silu",), "layer_norm_type": ("rms",),
    "include_bias": (False,), "include_qkv_bias": (False, None), "bias_for_layer_norm": (False, None),
    "weight_tying": (False,), "rope": (True,), "rope_full_precision": (True,), "alibi": (False,),
    "scale_logits": (False,), "input_emb_norm": (False,), "attention_layer_norm": (False,),
    "layer_norm_with_affine": (True,), "attention_layer_norm_with_affine": (True, False),
    "multi_query_attention": (None, False), "block_group_size": (1,), "clip_qkv": (None,),
    "alibi_bias_max": None,  # only read when alibi is on
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LLaDAConfig:
    """LLaDA (GSAI-ML/LLaDA-8B-Instruct) architecture; field names follow its config.json.

    Attributes:
      d_model: residual width.
      n_heads: query heads.
      n_kv_heads: key/value heads (== n_heads for the released 8B model).
      n_layers: number of blocks.
      mlp_hidden_size: SwiGLU hidden width (the gated ``ff_proj`` and linear ``up_proj``).
      vocab_size: tokenizer vocabulary size.
      embedding_size: rows of ``wte`` / columns of the LM head ``ff_out`` (>= vocab_size).
      max_sequence_length: context length (prompt + canvas).
      rope_theta: RoPE base.
      rms_norm_eps: RMSNorm epsilon.
      mask_token_id: id of ``<|mdm_mask|>``.
      eos_token_id: id of ``<|endoftext|>``.
      pad_token_id: padding id (must differ from mask_token_id).
    """

    family: ClassVar[str] = "llada"
    # Family traits the sampler reads: what a plain call runs, whether position i's prediction
    # is read from output i - 1, whether the Nemotron static-block (sliding) decoder applies.
    default_algorithm: ClassVar[str] = "basic"
    shift_logits: ClassVar[bool] = False
    sliding_decoder: ClassVar[bool] = False

    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    max_sequence_length: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"{self.d_model=} must be divisible by {self.n_heads=}")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"{self.embedding_size=} must be >= {self.vocab_size=}")
        if self.mask_token_id == self.pad_token_id:
            raise ValueError(f"{self.mask_token_id=} must differ from {self.pad_token_id=}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def spec(self) -> TransformerSpec:
        return TransformerSpec(
            vocab=self.embedding_size, d_model=self.d_model, n_layers=self.n_layers,
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
            mlp_dim=self.mlp_hidden_size, rope_theta=self.rope_theta, norm_eps=self.rms_norm_eps,
            qk_norm=False,
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "LLaDAConfig":
        if cfg.get("model_type", "llada") != "llada":
            raise UnsupportedConfigError(f"model_type={cfg.get('model_type')!r} is not 'llada'")
        reject_unknown(cfg, _LLADA_IGNORED | set(_LLADA_CHECKED) | {f.name for f in dataclasses.fields(cls)}, "LLaDA")
        for key, allowed in _LLADA_CHECKED.items():
            if allowed is not None and key in cfg:
                check_field(cfg, key, allowed, family="LLaDA")
        n_heads = cfg["n_heads"]
        n_kv = cfg.get("n_kv_heads") or n_heads
        mlp = cfg.get("mlp_hidden_size") or cfg["mlp_ratio"] * cfg["d_model"]
        return cls(
            d_model=cfg["d_model"], n_heads=n_heads, n_kv_heads=n_kv, n_layers=cfg["n_layers"],
            mlp_hidden_size=mlp, vocab_size=cfg["vocab_size"],
            embedding_size=cfg.get("embedding_size") or cfg["vocab_size"],
            max_sequence_length=cfg.get("max_sequence_length", 4096),
            rope_theta=float(cfg.get("rope_theta", 10000.0)), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            mask_token_id=cfg.get("mask_token_id", 126336), eos_token_id=cfg.get("eos_token_id", 126081),
            pad_token_id=cfg.get("pad_token_id", 126081),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json in LLaDA's own field set (what ``from_hf_config`` reads back)."""
        return {
            "model_type": "llada", "architectures": ["LLaDAModelLM"], "block_type": "llama",
            "activation_type": "silu", "layer_norm_type": "rms", "include_bias": False,
            "include_qkv_bias": False, "weight_tying": False, "rope": True, "rope_full_precision": True,
            "alibi": False, "scale_logits": False, "input_emb_norm": False,
            "d_model": self.d_model, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers, "mlp_hidden_size": self.mlp_hidden_size,
            "vocab_size": self.vocab_size, "embedding_size": self.embedding_size,
            "max_sequence_length": self.max_sequence_length, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "mask_token_id": self.mask_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
        }

    # ---- presets ---------------------------------------------------------------------
    @classmethod
    def llada_8b(cls) -> "LLaDAConfig":
        """GSAI-ML/LLaDA-8B-Instruct."""
        return cls(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                   vocab_size=126464, embedding_size=126464, max_sequence_length=4096,
                   rope_theta=500000.0, rms_norm_eps=1e-5, mask_token_id=126336,
                   eos_token_id=126081, pad_token_id=126081)

    @classmethod
    def llada_1b(cls) -> "LLaDAConfig":
        """A mid-size LLaDA shape for CPU benchmarks (not a released checkpoint)."""
        return cls(d_model=1024, n_heads=16, n_kv_heads=16, n_layers=8, mlp_hidden_size=2816,
                   vocab_size=4096, embedding_size=4096, max_sequence_length=1024,
                   mask_token_id=4000, eos_token_id=4001, pad_token_id=4002)

    @classmethod
    def tiny(cls, *, n_kv_heads: int = 4, vocab_size: int = 384) -> "LLaDAConfig":
        """The shape of the llada_tiny fixture (MHA by default; pass n_kv_heads=2 for GQA)."""
        return cls(d_model=64, n_heads=4, n_kv_heads=n_kv_heads, n_layers=2, mlp_hidden_size=128,
                   vocab_size=vocab_size, embedding_size=vocab_size, max_sequence_length=512,
                   mask_token_id=336, eos_token_id=257, pad_token_id=258)
