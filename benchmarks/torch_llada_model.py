"""A compact eager PyTorch LLaDA model: the baseline side of the sampler benchmarks.

Our own re-implementation of the upstream LLaDA forward pass (ML-GSAI/LLaDA's Oct-2025
``modeling_llada.py``, plus the KV cache interface of NVlabs/Fast-dLLM's copy), following
the architecture facts in ``tests/fixtures/llada_tiny/README.md``:

- token embedding ``wte`` (no scaling, no position table), fully bidirectional attention;
- RMSNorm computed in float32, cast back, then multiplied by the gain;
- RoPE, rotate-half convention, in float32, applied to q and to the *whole* key sequence on
  every call (the cache holds keys before RoPE, as Fast-dLLM's does);
- MHA / GQA (KV heads expanded with ``repeat_interleave``) through
  ``F.scaled_dot_product_attention``; an optional key-padding ``attention_mask`` becomes an
  additive ``float32 min`` bias over the key axis (an all-ones mask is the same as none);
- SwiGLU MLP where ``ff_proj`` is the SiLU-gated branch and ``up_proj`` the linear one;
- final ``ln_f`` and the untied LM head ``transformer.ff_out``.

Module names mirror the upstream ``LLaDAModelLM.state_dict()`` exactly
(``model.transformer.blocks.N.q_proj.weight`` ...), so an upstream state dict loads with
``load_state_dict(strict=True)``.

KV cache (for Fast-dLLM's samplers): ``forward(..., use_cache=True)`` also returns, per
layer, ``(k, v)`` of shape ``[B, n_kv_heads, T, head_dim]`` with k before RoPE.
``forward_cached(ids, cache, start, mode="dual")`` feeds positions ``[start, start + n)``
only, writes their fresh K/V into the full-length cache in place and attends over the whole
cache (stale prefix and suffix included); ``mode="prefix"`` treats the cache as the K/V of
positions ``[0, start)`` and appends the fresh ones without modifying it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


class Rotary:
    """sin/cos tables ``[1, 1, T, head_dim]`` in float32, grown on demand."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta
        self.sin = self.cos = torch.empty(1, 1, 0, head_dim)

    def tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sin.shape[-2] < length:
            n = max(length, 2 * self.sin.shape[-2])
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
            angle = torch.einsum("i,j->ij", torch.arange(n, dtype=torch.float), inv_freq)
            table = torch.cat((angle, angle), dim=-1)
            self.sin, self.cos = table.sin()[None, None], table.cos()[None, None]
        return self.sin[:, :, :length], self.cos[:, :, :length]

    def apply(self, t: torch.Tensor, start: int) -> torch.Tensor:
        """RoPE for ``t`` [B, h, n, hd] sitting at absolute positions ``[start, start + n)``."""
        n = t.shape[-2]
        sin, cos = self.tables(start + n)
        sin, cos = sin[:, :, start:], cos[:, :, start:]
        t32 = t.float()
        return (t32 * cos + rotate_half(t32) * sin).type_as(t)


class Block(nn.Module):
    """One ``block_type: llama`` LLaDA block (upstream parameter names)."""

    def __init__(self, d: int, n_heads: int, n_kv_heads: int, mlp: int, eps: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d // n_heads
        kv = n_kv_heads * self.head_dim
        # registration order = upstream state_dict order
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_out = nn.Linear(mlp, d, bias=False)  # down projection
        self.attn_norm = RMSNorm(d, eps)
        self.ff_norm = RMSNorm(d, eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.ff_proj = nn.Linear(d, mlp, bias=False)  # gated branch (SiLU)
        self.up_proj = nn.Linear(d, mlp, bias=False)  # linear branch

    def forward(self, x, rope: Rotary, bias, *, past=None, start: int = 0, mode: str = "none"):
        """``x`` [B, n, D] at positions [start, start + n); returns (y, (k_pre_rope, v) of the key sequence)."""
        B, n, D = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if mode == "dual":  # overwrite the block's entries in place, attend over the whole cache
            past_k, past_v = past
            past_k[:, :, start:start + n] = k
            past_v[:, :, start:start + n] = v
            k, v = past_k, past_v
        elif mode == "prefix":  # cache = positions [0, start); append the fresh entries
            k = torch.cat((past[0], k), dim=-2)
            v = torch.cat((past[1], v), dim=-2)
        present = (k, v)
        q_rot = rope.apply(q, start)
        k_rot = rope.apply(k, 0)  # RoPE re-applied to the full key sequence on every call
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k_rot = k_rot.repeat_interleave(rep, dim=1, output_size=self.n_heads)
            v = v.repeat_interleave(rep, dim=1, output_size=self.n_heads)
        att = F.scaled_dot_product_attention(q_rot, k_rot, v, attn_mask=bias, dropout_p=0.0, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).contiguous().view(B, n, D))
        h = self.ff_norm(x)
        x = x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        return x, present


class TorchLLaDA(nn.Module):
    """Eager LLaDA (``LLaDAModelLM`` semantics) built from an upstream-named state dict."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        c = dict(config)
        self.config = c
        d, n_heads = c["d_model"], c["n_heads"]
        n_kv = c.get("n_kv_heads") or n_heads
        mlp = c.get("mlp_hidden_size") or c["mlp_ratio"] * d
        vocab = c.get("embedding_size") or c["vocab_size"]
        eps = float(c.get("rms_norm_eps", 1e-5))
        self.weight_tying = bool(c.get("weight_tying", False))
        self.mask_token_id = c.get("mask_token_id", 126336)
        self.model = nn.Module()
        t = self.model.transformer = nn.Module()
        t.wte = nn.Embedding(vocab, d)
        t.ln_f = RMSNorm(d, eps)
        t.blocks = nn.ModuleList(Block(d, n_heads, n_kv, mlp, eps) for _ in range(c["n_layers"]))
        if not self.weight_tying:
            t.ff_out = nn.Linear(d, vocab, bias=False)
        self.rope = Rotary(d // n_heads, float(c.get("rope_theta", 10000.0)))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                        dtype: torch.dtype = torch.float32) -> "TorchLLaDA":
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
        return model.to(dtype).eval().requires_grad_(False)

    # ---- helpers ---------------------------------------------------------------------------
    @staticmethod
    def key_bias(attention_mask: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor | None:
        """[B, T] 1 keep / 0 pad -> additive bias [B, 1, 1, T]; None when absent or all ones."""
        if attention_mask is None or bool((attention_mask != 0).all()):
            return None
        m = attention_mask.to(dtype)[:, None, None, :]
        return (1.0 - m) * torch.finfo(dtype).min

    def head(self, x: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        x = t.ln_f(x)
        w = t.wte.weight if self.weight_tying else t.ff_out.weight
        return F.linear(x, w).float()

    # ---- forward passes --------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False, output_hidden_states: bool = False):
        """Full forward. Returns logits [B, T, V] float32, or a tuple
        ``(logits, cache, hidden_states)`` with the cache / hidden states requested (else None).
        Hidden states follow upstream: embeddings, output of blocks 0..n-2, ln_f(last block)."""
        t = self.model.transformer
        bias = self.key_bias(attention_mask)
        x = t.wte(input_ids)
        cache: KVCache = []
        hidden = [x]
        for blk in t.blocks:
            x, kv = blk(x, self.rope, bias)
            cache.append(kv)
            hidden.append(x)
        logits = self.head(x)
        if not (use_cache or output_hidden_states):
            return logits
        if output_hidden_states:
            hidden[-1] = t.ln_f(x)
        return logits, (cache if use_cache else None), (hidden if output_hidden_states else None)

    def forward_cached(self, input_ids: torch.Tensor, cache: KVCache, start: int, *,
                       mode: str = "dual", attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed only positions [start, start + n) with a KV cache; returns their logits [B, n, V].

        mode="dual": ``cache`` holds every position; the block's entries are replaced in place
        (Fast-dLLM's ``replace_position``) and the queries attend over the whole cache.
        mode="prefix": ``cache`` holds positions [0, start); it is left unchanged.
        ``attention_mask`` is over the full key sequence ([B, T_total])."""
        assert mode in ("dual", "prefix"), mode
        bias = self.key_bias(attention_mask)
        x = self.model.transformer.wte(input_ids)
        for blk, past in zip(self.model.transformer.blocks, cache):
            x, _ = blk(x, self.rope, bias, past=past, start=start, mode=mode)
        return self.head(x)


# ---- state dicts ------------------------------------------------------------------------------

def state_dict_shapes(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, mlp_hidden: int,
                      vocab: int) -> dict[str, tuple[int, ...]]:
    """Upstream ``LLaDAModelLM.state_dict()`` names and PyTorch shapes ([out, in] for Linear)."""
    kv = n_kv_heads * (d_model // n_heads)
    shapes = {"model.transformer.wte.weight": (vocab, d_model), "model.transformer.ln_f.weight": (d_model,)}
    for i in range(n_layers):
        p = f"model.transformer.blocks.{i}."
        shapes.update({
            p + "attn_out.weight": (d_model, d_model), p + "ff_out.weight": (d_model, mlp_hidden),
            p + "attn_norm.weight": (d_model,), p + "ff_norm.weight": (d_model,),
            p + "q_proj.weight": (d_model, d_model), p + "k_proj.weight": (kv, d_model),
            p + "v_proj.weight": (kv, d_model), p + "ff_proj.weight": (mlp_hidden, d_model),
            p + "up_proj.weight": (mlp_hidden, d_model),
        })
    shapes["model.transformer.ff_out.weight"] = (vocab, d_model)
    return shapes


def random_state_dict(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, mlp_hidden: int,
                      vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights with upstream names, initialised like the llada_tiny fixture
    (one generator consumed in sorted-key order): norm gains U(0.8, 1.2), embedding N(0, 1),
    q/k N(0, (2/sqrt(fan_in))^2) (sharp attention), LM head N(0, (5/sqrt(d))^2) (peaky
    softmax), every other matrix N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = state_dict_shapes(d_model, n_layers, n_heads, n_kv_heads, mlp_hidden, vocab)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if len(shape) == 1:
            w = 0.8 + 0.4 * torch.rand(shape, generator=gen)
        else:
            if key.endswith("wte.weight"):
                std = 1.0
            elif key.endswith(("q_proj.weight", "k_proj.weight")):
                std = 2.0 / math.sqrt(shape[1])
            elif key == "model.transformer.ff_out.weight":
                std = 5.0 / math.sqrt(d_model)
            else:
                std = 1.0 / math.sqrt(shape[1])
            w = torch.randn(shape, generator=gen) * std
        out[key] = w.float()
    return {k: out[k] for k in shapes}  # module order


def load_fixture_state_dict(model_dir) -> dict[str, torch.Tensor]:
    """``model.safetensors`` of an HF LLaDA dir (e.g. tests/fixtures/llada_tiny/model)."""
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def load_config(model_dir) -> dict[str, Any]:
    import json
    from pathlib import Path

    return json.loads((Path(model_dir) / "config.json").read_text())


def export_state_dict_numpy(sd: Mapping[str, torch.Tensor]) -> dict:
    """name -> numpy array (same names and PyTorch layouts), for feeding the JAX side."""
    return {k: v.detach().cpu().contiguous().numpy() for k, v in sd.items()}


# The LLaDA-8B-Instruct config.json field set (as in tests/fixtures/llada_tiny/model/config.json);
# llada_config() fills in the sizes and special ids.
_LLADA_CONFIG_TEMPLATE: dict[str, Any] = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": None,
    "embedding_dropout": 0.0, "embedding_size": None, "eos_token_id": None, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": None, "max_sequence_length": None,
    "mlp_hidden_size": None, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
    "n_heads": None, "n_kv_heads": None, "n_layers": None, "pad_token_id": None, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.49.0", "use_cache": False,
    "vocab_size": None, "weight_tying": False,
}

# A mid-size LLaDA shape that runs in seconds on 2 CPU cores (= dllm_jax LLaDAConfig.llada_1b()).
MID_SIZE = dict(d_model=1024, n_layers=8, n_heads=16, n_kv_heads=16, mlp_hidden=2816, vocab=4096)


def llada_config(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, mlp_hidden: int, vocab: int, *,
                 mask_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, max_sequence_length: int = 1024,
                 rope_theta: float = 500000.0) -> dict[str, Any]:
    """A LLaDA config.json dict of the given shape. Special ids default to vocab-96/-95/-94
    (4000/4001/4002 for vocab 4096, as ``LLaDAConfig.llada_1b``)."""
    c = dict(_LLADA_CONFIG_TEMPLATE)
    c.update(d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
             mlp_hidden_size=mlp_hidden, vocab_size=vocab,
             embedding_size=vocab, max_sequence_length=max_sequence_length, rope_theta=rope_theta,
             mask_token_id=vocab - 96 if mask_token_id is None else mask_token_id,
             eos_token_id=vocab - 95 if eos_token_id is None else eos_token_id,
             pad_token_id=vocab - 94 if pad_token_id is None else pad_token_id)
    assert c["mask_token_id"] != c["pad_token_id"] and 0 <= c["mask_token_id"] < vocab
    return c


def write_hf_dir(sd: Mapping[str, torch.Tensor], config_dict: Mapping[str, Any], path) -> "Path":  # noqa: F821
    """Write ``config.json`` + ``model.safetensors`` (upstream names) so ``dllm_jax.load(path)``
    reads the very same weights."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(dict(config_dict), indent=2, sort_keys=True) + "\n")
    return path
