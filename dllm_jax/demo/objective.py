"""The demo trainer's objective: LLaDA's SFT loss (``dllm_jax.demo.train``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dllm_jax.demo.tokenizer import MASK
from dllm_jax.models.transformer import Transformer


def sft_loss(model: Transformer, tokens, prompt_len, cut, key, eps: float = 1e-3):
    """LLaDA's SFT loss on a batch: [B, L] tokens, [B] prompt lengths; returns (loss, masked-token accuracy).

    Every response position (the reply, its ``<|eot_id|>`` and the ``<|endoftext|>`` padding) is
    masked with probability p = (1 - eps) t + eps, t ~ U(0, 1) per row; the prompt never is. The
    cross-entropy of the masked positions is weighted 1/p and normalised by the response length.

    A row with ``cut`` >= 0 (a count cut right after one of its numbers) is the state block
    decoding decides its stop in: the reply shown up to ``cut``, every later position masked
    (p = 1); the first masked position's cross-entropy (``<|eot_id|>`` or the next number) is
    added with weight 1, as much as a whole row's SFT loss.
    """
    b, seq_len = tokens.shape
    k_t, k_m = jax.random.split(key)
    p = (1 - eps) * jax.random.uniform(k_t, (b, 1)) + eps             # [B, 1]
    pos = jnp.arange(seq_len)[None, :]                                 # [1, L]
    response = pos >= prompt_len[:, None]                              # [B, L]
    is_cut = (cut >= 0)[:, None]                                       # [B, 1]
    decided = prompt_len[:, None] + cut[:, None]                       # [B, 1]
    masked = jnp.where(is_cut, pos >= decided, response & (jax.random.uniform(k_m, (b, seq_len)) < p))
    p = jnp.where(is_cut, 1.0, p)
    noisy = jnp.where(masked, MASK, tokens)
    positions = jnp.broadcast_to(pos, (b, seq_len))
    attend = jnp.ones((b, seq_len, seq_len), bool)                     # bidirectional, no padding
    logits = model(noisy, positions, attend)                           # [B, L, V] float32
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)  # [B, L]
    answer_len = jnp.sum(response, axis=-1, keepdims=True)             # [B, 1]
    decision = jnp.sum(jnp.where(is_cut & (pos == decided), ce, 0.0))
    loss = (jnp.sum(jnp.where(masked, ce / p / answer_len, 0.0)) + decision) / b
    acc = jnp.sum(jnp.where(masked, jnp.argmax(logits, -1) == tokens, False)) / jnp.maximum(jnp.sum(masked), 1)
    return loss, acc
