"""The shared bidirectional transformer: RMSNorm, RoPE, GQA attention, SwiGLU, a block stack.

LLaDA and Nemotron-Diffusion are both this stack (``llada.py`` / ``nemotron.py`` only map
checkpoint names and pick ``qk_norm``). At run time each block owns its weights and the
blocks run in a Python loop (unrolled in the compiled program): on XLA:CPU a ``lax.scan``
over stacked weights copies every layer's weights out of the stack on each call and measured
~25% slower. Checkpoints store the layers stacked along a leading ``layers`` axis;
``dllm_jax.checkpoint.load`` splits them per layer while placing them on the mesh.

One forward covers every way the samplers call the model:

* a full forward over the canvas (``cache=None``), optionally returning each layer's
  post-RoPE keys/values so a cache can be built from it;
* a *window* forward: queries for ``T`` consecutive positions starting at a per-row
  ``write_start``; their fresh keys/values are written into a copy of ``cache`` (only the
  rows selected by ``write_mask``) and the queries attend over the whole cache under
  ``mask``. The prefix cache, the dual cache and the Nemotron sliding block are all this.

Shape letters: B batch, T query positions, S key positions, D model, F mlp, N query heads,
K kv heads, G = N // K, H head dim, V vocab, NL layers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax.configs import TransformerSpec

# Masked attention scores: large and finite, so a row with every key masked gives a
# uniform (ignored) distribution instead of NaN.
MASKED_SCORE = -1e30


class KVCache(NamedTuple):
    """Post-RoPE keys and values, one array per layer: k[i], v[i]: [B, K, S, H] (head-major, so
    attention reads them without a transpose)."""

    k: tuple
    v: tuple

    def astype(self, dtype) -> "KVCache":
        return KVCache(tuple(a.astype(dtype) for a in self.k), tuple(a.astype(dtype) for a in self.v))


# ---- numerics ------------------------------------------------------------------------


def row_sum(x):
    """Sum over the last axis in a fixed, shape-independent order (keepdims).

    XLA's reductions pick their accumulation order from the whole array's shape (on XLA:CPU a
    row's sum changes with the number of rows), so a row's norm or softmax would depend on its
    batch-mates. This is an explicit binary tree of elementwise adds instead: the axis is
    zero-padded on the *left* to a power of two and adjacent pairs are added level by level, so
    an element's place in the tree depends only on its distance from the *end* of the axis.
    Adding exact zeros is exact, hence a right-aligned row (left padding / masked keys that are
    exactly 0) gets the same bits whatever the axis length: batch-invariant across prompt
    buckets too. See docs/sampling.md, "Batch invariance in bf16".
    """
    n = x.shape[-1]
    p = 1 << max(n - 1, 0).bit_length()
    if p != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(p - n, 0)])
    while x.shape[-1] > 1:
        x = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
        x = x[..., 0] + x[..., 1]
    return x


def row_max(x):
    """Maximum over the last axis (keepdims) as a tree of elementwise ``maximum``, like ``row_sum``.

    A maximum is exact in any order; the point is to leave no ``reduce`` op in a softmax. XLA:CPU
    hands a reduce together with the ops that consume it (``exp(x - max)``) to a YNNPACK fusion
    for some shapes and not for others (not at batch 1), and YNNPACK's float32 ``exp`` differs
    from XLA's by 1 ulp on ~2% of inputs: a row's softmax then changed with its batch size. With
    elementwise ops only, every shape takes XLA's own ``exp``.
    """
    n = x.shape[-1]
    p = 1 << max(n - 1, 0).bit_length()
    if p != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(p - n, 0)], constant_values=-jnp.inf)
    while x.shape[-1] > 1:
        x = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
        x = jnp.maximum(x[..., 0], x[..., 1])
    return x


def softmax(x, axis: int = -1):
    """float32 softmax with a ``row_max`` shift and a ``row_sum`` normaliser (bitwise batch-invariant per row)."""
    x = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
    e = jnp.exp(x - jax.lax.stop_gradient(row_max(x)))
    return jnp.moveaxis(e / row_sum(e), -1, axis)


def log_softmax(x):
    """float32 log-softmax over the last axis with the ``row_max`` shift and ``row_sum`` normaliser."""
    x = x.astype(jnp.float32)
    shifted = x - jax.lax.stop_gradient(row_max(x))
    return shifted - jnp.log(row_sum(jnp.exp(shifted)))


def rms_norm(x, weight, eps: float):
    """RMSNorm as upstream: normalise in float32, cast back, then scale by the gain.

    The mean square is a ``row_sum`` (fixed order), so a row's norm does not depend on the batch.
    """
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(row_sum(x32 * x32) / np.float32(x.shape[-1]) + eps)
    return weight * y.astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float):
    """cos/sin tables [B, T, H] in float32 (rotate-half layout: the angles repeated twice)."""
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, H]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x: [B, T, n, H]; rotate-half RoPE computed in float32 and cast back."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention(q, k, v, mask):
    """Grouped-query attention. q: [B, T, N, H]; k, v: [B, K, S, H]; mask: [B, T or 1, S] bool.

    Query head i uses kv head i // G (G = N / K). The queries of one kv head are laid out as
    one [G*T, H] matrix so both products are plain batched matmuls over (B, K): on XLA:CPU
    the 5-D form with a separate G axis measured ~30% slower (extra transposes of the scores).
    """
    b, t, n, h = q.shape
    kh, s_len = k.shape[1], k.shape[2]
    g = n // kh
    q = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)  # [B, K, G*T, H]
    scores = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kh, g, t, s_len) * (1.0 / math.sqrt(h))
    scores = jnp.where(mask[:, None, None, :, :], scores, MASKED_SCORE)
    probs = softmax(scores, axis=-1).reshape(b, kh, g * t, s_len)
    out = jnp.einsum("bkqs,bksh->bkqh", probs.astype(v.dtype), v)  # [B, K, G*T, H]
    return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _linear(x, w, in_dims: int = 1):
    """x [B, T, *in] @ w [*in, *out] as one 2-D matmul (XLA:CPU runs the flattened form
    faster than the multi-dimensional dot_general, and it is a free reshape on every backend)."""
    b, t = x.shape[:2]
    k = math.prod(w.shape[:in_dims])
    out = w.shape[in_dims:]
    y = x.reshape(b * t, k) @ w.reshape(k, math.prod(out))
    return y.reshape((b, t) + out)


def rows(x, start, size):
    """Per-row window x[b, start[b] : start[b] + size] along axis 1 (x [B, T, ...], start [B])."""
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, size, axis=0))(x, start)


def write_window(cache, fresh, start, write_mask=None):
    """Write fresh [B, K, T, H] into cache [B, K, S, H] at per-row offsets start [B].

    Positions of the window where ``write_mask`` [B, T] is False keep the cached value.
    """
    t = fresh.shape[2]
    if write_mask is not None:
        old = jax.vmap(lambda c, s: jax.lax.dynamic_slice_in_dim(c, s, t, axis=1))(cache, start)
        fresh = jnp.where(write_mask[:, None, :, None], fresh, old)
    return jax.vmap(lambda c, f, s: jax.lax.dynamic_update_slice_in_dim(c, f, s, axis=1))(cache, fresh, start)


# ---- parameters ----------------------------------------------------------------------

# Logical axis names of every block parameter; dllm_jax.sharding maps them onto mesh axes.
BLOCK_AXES = {
    "attn_norm": ("embed",),
    "q_proj": ("embed", "heads", "head_dim"),
    "k_proj": ("embed", "kv_heads", "head_dim"),
    "v_proj": ("embed", "kv_heads", "head_dim"),
    "o_proj": ("heads", "head_dim", "embed"),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "mlp_norm": ("embed",),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}
CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")


def block_shapes(spec: TransformerSpec) -> dict[str, tuple[int, ...]]:
    d, n, k, h, f = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.mlp_dim
    shapes = {
        "attn_norm": (d,), "q_proj": (d, n, h), "k_proj": (d, k, h), "v_proj": (d, k, h),
        "o_proj": (n, h, d), "mlp_norm": (d,), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }
    if spec.qk_norm:
        shapes["q_norm"] = (h,)
        shapes["k_norm"] = (h,)
    return shapes


def layer_shapes(spec: TransformerSpec) -> dict[str, tuple[int, ...]]:
    """Checkpoint (stacked) shapes: a leading layer axis on every block parameter."""
    return {name: (spec.n_layers,) + shape for name, shape in block_shapes(spec).items()}


def _init(key, shape, dtype, kind: str, fan_in: int):
    if kind == "norm":
        return jnp.ones(shape, dtype)
    std = 1.0 if kind == "embed" else 1.0 / math.sqrt(fan_in)
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


class Block(nnx.Module):
    """One block's weights (names shared by both families; see the key maps)."""

    def __init__(self, spec: TransformerSpec, *, dtype, rngs: nnx.Rngs):
        for name, shape in block_shapes(spec).items():
            kind = "norm" if name.endswith("norm") else "linear"
            fan_in = shape[0] if name != "o_proj" else shape[0] * shape[1]
            setattr(self, name, nnx.Param(_init(rngs.params(), shape, dtype, kind, fan_in), axes=BLOCK_AXES[name]))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in BLOCK_AXES if hasattr(self, name)}


class Transformer(nnx.Module):
    """Embedding, a stack of bidirectional blocks, final norm and an untied output head."""

    def __init__(self, spec: TransformerSpec, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.spec = spec
        v, d = spec.vocab, spec.d_model
        self.embed = nnx.Param(_init(rngs.params(), (v, d), dtype, "embed", d), axes=("vocab_in", "embed"))
        self.layers = nnx.List([Block(spec, dtype=dtype, rngs=rngs) for _ in range(spec.n_layers)])
        self.final_norm = nnx.Param(jnp.ones((d,), dtype), axes=("embed",))
        self.lm_head = nnx.Param(_init(rngs.params(), (d, v), dtype, "linear", d), axes=("embed", "vocab"))

    # -- forward pieces ----------------------------------------------------------------

    def hidden(self, tokens, positions, mask, *, cache: KVCache | None = None, write_start=None,
               write_mask=None, return_kv: bool = False, out=None):
        """Residual stream after the last block (before the final norm).

        Args:
          tokens: [B, T] int token ids of the query positions.
          positions: [B, T] int RoPE positions.
          mask: [B, T, S] bool, True where query t may attend key s. Without a cache S == T.
          cache: keys/values (per layer [B, K, S, H]) to attend over; the fresh keys/values of
            the window are written into (a copy of) it at ``write_start`` first.
          write_start: [B] int, cache index of the window's first position.
          write_mask: [B, T] bool, window positions whose fresh K/V enter the cache
            (default: all).
          return_kv: also return the keys/values (the updated cache, or the fresh ones).
          out: (start [B], size): return only the query positions start .. start + size of each
            row. The last block then runs its queries, attention, output projection and MLP on
            those positions alone (its keys/values still cover all T): the same numbers per
            position, for a fraction of the last block's work when size << T.

        Returns:
          (x [B, T or size, D], KVCache or None)
        """
        spec = self.spec
        x = jnp.take(self.embed[...], tokens, axis=0)
        cos, sin = rope_tables(positions, spec.head_dim, spec.rope_theta)
        eps = spec.norm_eps

        def block(x, p, cache_kv, last):
            h = rms_norm(x, p["attn_norm"], eps)
            k, v = _linear(h, p["k_proj"]), _linear(h, p["v_proj"])
            q_cos, q_sin, q_mask = cos, sin, mask
            if last and out is not None:  # the output window's queries only (and its residual rows)
                x, h, q_cos, q_sin = (rows(a, *out) for a in (x, h, cos, sin))
                q_mask = mask if mask.shape[1] == 1 else rows(mask, *out)
            q = _linear(h, p["q_proj"])
            if spec.qk_norm:
                q = rms_norm(q, p["q_norm"], eps)
                k = rms_norm(k, p["k_norm"], eps)
            q, k = apply_rope(q, q_cos, q_sin), apply_rope(k, cos, sin)
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
            if cache_kv is not None:
                k = write_window(cache_kv[0], k, write_start, write_mask)
                v = write_window(cache_kv[1], v, write_start, write_mask)
            a = attention(q, k, v, q_mask)
            x = x + _linear(a, p["o_proj"], in_dims=2)
            h = rms_norm(x, p["mlp_norm"], eps)
            gate, up = _linear(h, p["gate_proj"]), _linear(h, p["up_proj"])
            x = x + _linear(jax.nn.silu(gate) * up, p["down_proj"])
            return x, (k, v)

        kvs = []
        for i, layer in enumerate(self.layers):
            x, kv = block(x, layer.arrays(), None if cache is None else (cache.k[i], cache.v[i]),
                          i == len(self.layers) - 1)
            kvs.append(kv)
        if not return_kv:
            return x, None
        return x, KVCache(tuple(k for k, _ in kvs), tuple(v for _, v in kvs))

    def head(self, x):
        """Final norm and output head: [..., D] -> [..., V] float32 logits."""
        h = rms_norm(x, self.final_norm[...], self.spec.norm_eps)
        return jnp.einsum("...d,dv->...v", h, self.lm_head[...], preferred_element_type=jnp.float32)

    def __call__(self, tokens, positions, mask):
        x, _ = self.hidden(tokens, positions, mask)
        return self.head(x)
