"""The demo trainer's objective: LLaDA's SFT loss (``dllm_jax.demo.train``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dllm_jax.demo.tokenizer import MASK
from dllm_jax.models.transformer import Transformer


def sft_loss(model: Transformer, tokens, prompt_len, key, eps: float = 1e-3):
    """LLaDA's SFT loss on a batch: [B, L] tokens, [B] prompt lengths; returns (loss, masked-token accuracy).

    Every response position (the reply, its ``<|eot_id|>`` and the ``<|endoftext|>`` padding) is
    masked with probability p = (1 - eps) t + eps, t ~ U(0, 1) per row; the prompt never is. The
    cross-entropy of the masked positions is weighted 1/p and normalised by the response length.
    """
    b, seq_len = tokens.shape
    k_t, k_m = jax.random.split(key)
    p = (1 - eps) * jax.random.uniform(k_t, (b, 1)) + eps             # [B, 1]
    pos = jnp.arange(seq_len)[None, :]                                 # [1, L]
    response = pos >= prompt_len[:, None]                              # [B, L]
    masked = response & (jax.random.uniform(k_m, (b, seq_len)) < p)
    noisy = jnp.where(masked, MASK, tokens)
    positions = jnp.broadcast_to(pos, (b, seq_len))
    attend = jnp.ones((b, seq_len, seq_len), bool)                     # bidirectional, no padding
    logits = model(noisy, positions, attend)                           # [B, L, V] float32
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)  # [B, L]
    answer_len = jnp.sum(response, axis=-1, keepdims=True)             # [B, 1]
    loss = jnp.sum(jnp.where(masked, ce / p / answer_len, 0.0)) / b
    acc = jnp.sum(jnp.where(masked, jnp.argmax(logits, -1) == tokens, False)) / jnp.maximum(jnp.sum(masked), 1)
    return loss, acc
