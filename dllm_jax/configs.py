"""Architecture configs: one frozen dataclass per model family.

Each family config mirrors the fields of its checkpoint's ``config.json``; ``from_hf_config``
refuses any field whose value would change the math in a way this port does not implement
(bias, weight tying, a different norm, activation or RoPE, sliding windows ...), so a
checkpoint is never converted silently wrong. ``spec()`` reduces a family config to the
shared :class:`TransformerSpec` that the model blocks are built from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping


class UnsupportedConfigError(ValueError):
    """A config.json field has a value this port does not implement."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerSpec:
    """Shape and numerics of the shared bidirectional transformer stack.

    Attributes:
      vocab: rows of the embedding table and columns of the output head (V).
      d_model: residual width (D).
      n_layers: number of blocks.
      n_heads: query heads (N).
      n_kv_heads: key/value heads (K); N must be a multiple of K (GQA).
      head_dim: per-head width (H).
      mlp_dim: SwiGLU hidden width (F).
      rope_theta: RoPE base.
      norm_eps: RMSNorm epsilon.
      qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3 style).
    """

    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float
    norm_eps: float
    qk_norm: bool

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads=} must be a multiple of {self.n_kv_heads=}")

    def param_count(self) -> int:
        d, n, k, h, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.mlp_dim
        per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f + 2 * d + (2 * h if self.qk_norm else 0)
        return self.n_layers * per_layer + 2 * self.vocab * d + d


def _check(cfg: Mapping[str, Any], key: str, allowed, *, default=None, family: str) -> None:
    value = cfg.get(key, default)
    allowed = allowed if isinstance(allowed, (tuple, list, set)) else (allowed,)
    if value not in allowed:
        raise UnsupportedConfigError(
            f"{family} config field {key}={value!r} is not supported (supported: "
            f"{', '.join(repr(a) for a in allowed)}); converting it would silently change the math"
        )


def _reject_unknown(cfg: Mapping[str, Any], known: set[str], family: str) -> None:
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UnsupportedConfigError(
            f"{family} config has fields this port does not know: {unknown}. They may change the "
            "architecture; refusing rather than converting silently wrong."
        )


# --------------------------------------------------------------------------------------
# LLaDA
# --------------------------------------------------------------------------------------

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
        _reject_unknown(cfg, _LLADA_IGNORED | set(_LLADA_CHECKED) | {f.name for f in dataclasses.fields(cls)}, "LLaDA")
        for key, allowed in _LLADA_CHECKED.items():
            if allowed is not None and key in cfg:
                _check(cfg, key, allowed, family="LLaDA")
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


# --------------------------------------------------------------------------------------
# Nemotron-Diffusion (NVRDiff: Qwen3 blocks as a bidirectional encoder + diffusion_head)
# --------------------------------------------------------------------------------------

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
        _reject_unknown(cfg, known, "Nemotron-Diffusion")
        fam = "Nemotron-Diffusion"
        _check(cfg, "hidden_act", ("silu",), default="silu", family=fam)
        _check(cfg, "attention_bias", (False,), default=False, family=fam)
        _check(cfg, "mlp_bias", (False,), default=False, family=fam)
        _check(cfg, "disable_qk_norm", (False,), default=False, family=fam)
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


ModelConfig = LLaDAConfig | NemotronDiffusionConfig

# Family name (``config.family``, ``Model.family``) -> its config class (and so its traits).
FAMILY_CONFIGS: dict[str, type[ModelConfig]] = {c.family: c for c in (LLaDAConfig, NemotronDiffusionConfig)}

_FAMILIES = {"llada": LLaDAConfig, "nvrdiff": NemotronDiffusionConfig,
             "nemotron_diffusion": NemotronDiffusionConfig}


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    """Pick the family from ``model_type`` (or the architecture name) and parse the config."""
    model_type = cfg.get("model_type")
    if model_type is None:
        arch = (cfg.get("architectures") or [""])[0]
        model_type = {"LLaDAModelLM": "llada", "DiffEncoderModel": "nvrdiff"}.get(arch)
    if model_type not in _FAMILIES:
        raise UnsupportedConfigError(
            f"unknown model_type {model_type!r}; supported: {sorted(_FAMILIES)} (LLaDA, Nemotron-Diffusion)")
    return _FAMILIES[model_type].from_hf_config(cfg)
