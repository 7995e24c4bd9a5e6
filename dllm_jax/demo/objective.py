"""The demo trainer's objective: LLaDA's SFT loss and the opt-in mask states (``dllm_jax.demo.train``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dllm_jax.demo.tokenizer import DIGITS, MASK
from dllm_jax.models.transformer import Transformer


def sft_loss(model: Transformer, tokens, prompt_len, key, reply_len=None, cut_ok=None, *, block_fraction: float = 0.0,
             block_length: int = 32, cut_fraction: float = 0.0, cut_rate: float = 0.5, cut_power: float = 2.0,
             cut_window: int = 0, cut_at_numbers: bool = False, tail_fraction: float = 0.0, tail_window: int = 0,
             tail_block: int = 0, eps: float = 1e-3):
    """LLaDA's SFT loss on a batch: [B, L] tokens, [B] prompt and reply lengths (for cut_fraction > 0).

    Every response position is masked with probability p = (1 - eps) t + eps, t ~ U(0, 1) per
    row, and the cross-entropy of the masked positions is weighted 1/p and normalised by the
    response length. With ``block_fraction`` > 0 that share of the rows gets a
    semi-autoregressive mask instead, the state block decoding puts the canvas in: a random
    response block k is masked with probability p, the blocks before it are clean and the
    blocks after it fully masked (probability 1, weight 1) — without such rows the model
    rarely sees a fully masked tail and cannot tell where a long reply ends. ``cut_fraction``
    of the rows get a suffix cut instead: c - prompt_len = floor((1 - u^cut_power) reply_len),
    u ~ U(0, 1); positions >= c masked (probability 1), those before with p' = cut_rate * p; only
    rows with ``cut_ok`` ([B] bool, default all) are drawn for it. ``cut_window`` > 0 scores only
    the first ``cut_window`` positions from c in a cut row (the rest stay masked, unscored).
    ``cut_at_numbers`` puts c right after a number of the reply instead (digits are tokens
    ``DIGITS``): after its last number (c at ``<|eot_id|>``: the stop) half the time, else after
    one drawn uniformly (c at the ``, `` that goes on) — the decision block decoding faces.
    ``tail_fraction`` of the ``cut_ok`` rows (drawn after the cut rows, overriding them) keep
    i.i.d. masks on the reply and its ``<|eot_id|>`` but have every ``<|endoftext|>`` pad masked
    (probability 1), so where the reply ends is decided from its content, never read off a
    visible pad; only the first ``tail_window`` pads are scored. With ``tail_block`` > 0 a tail
    row is instead the state block decoding is in when it reaches block k of the reply (k uniform
    over the blocks holding the reply and its ``<|eot_id|>``): blocks before k clean, block k's
    reply positions masked i.i.d., its pads and everything after it masked; only block k scored.
    """
    b, seq_len = tokens.shape
    scored = True
    k_t, k_m = jax.random.split(key)
    t = jax.random.uniform(k_t, (b, 1))
    p = (1 - eps) * t + eps                                            # [B, 1]
    pos = jnp.arange(seq_len)[None, :]                                 # [1, L]
    response = pos >= prompt_len[:, None]                              # [B, L]
    p_mask = jnp.broadcast_to(p, (b, seq_len))                         # [B, L]
    if block_fraction > 0:
        p_mask = _semi_autoregressive(key, pos, prompt_len, p, p_mask, block_fraction, block_length)
    if cut_fraction > 0:
        k_row, k_cut = jax.random.split(jax.random.fold_in(key, 2))
        cut = _cut(k_cut, tokens, pos, prompt_len, reply_len, cut_power, cut_at_numbers)
        p_mask, scored = _suffix_cut(k_row, pos, cut, cut_ok, p, p_mask, scored, cut_fraction, cut_rate, cut_window,
                                     eps)
    if tail_fraction > 0:
        p_mask, scored = _masked_tail(key, pos, prompt_len, reply_len, cut_ok, p, p_mask, scored, tail_fraction,
                                      tail_window, tail_block)
    masked = response & (jax.random.uniform(k_m, (b, seq_len)) < p_mask)
    noisy = jnp.where(masked, MASK, tokens)
    positions = jnp.broadcast_to(pos, (b, seq_len))
    attend = jnp.ones((b, seq_len, seq_len), bool)                     # bidirectional, no padding
    logits = model(noisy, positions, attend)                           # [B, L, V] float32
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)  # [B, L]
    answer_len = jnp.sum(response, axis=-1, keepdims=True)             # [B, 1]
    p_safe = jnp.maximum(p_mask, eps)  # p >= eps already; 0 only at clean positions (never masked)
    loss = jnp.sum(jnp.where(masked & scored, ce / p_safe / answer_len, 0.0)) / b
    acc = jnp.sum(jnp.where(masked, jnp.argmax(logits, -1) == tokens, False)) / jnp.maximum(jnp.sum(masked), 1)
    return loss, acc


def _rows(key, b, fraction, cut_ok):
    use = jax.random.uniform(key, (b, 1)) < fraction                  # [B, 1]
    return use if cut_ok is None else use & cut_ok[:, None]


def _semi_autoregressive(key, pos, prompt_len, p, p_mask, block_fraction, block_length):
    b, seq_len = p_mask.shape
    blk = (pos - prompt_len[:, None]) // block_length                  # [B, L] response block index
    n_blocks = (seq_len - prompt_len[:, None] + block_length - 1) // block_length  # [B, 1]
    k_row, k_blk = jax.random.split(jax.random.fold_in(key, 1))
    k = jnp.floor(jax.random.uniform(k_blk, (b, 1)) * n_blocks).astype(jnp.int32)  # [B, 1]
    semi = jnp.where(blk < k, 0.0, jnp.where(blk == k, p, 1.0))        # [B, L]
    return jnp.where(_rows(k_row, b, block_fraction, None), semi, p_mask)


def _cut(k_cut, tokens, pos, prompt_len, reply_len, cut_power, cut_at_numbers):
    """[B, 1] the first position of each row's masked suffix."""
    b = tokens.shape[0]
    u = jax.random.uniform(k_cut, (b, 1))
    if not cut_at_numbers:
        return prompt_len[:, None] + jnp.floor((1 - u ** cut_power) * reply_len[:, None]).astype(jnp.int32)
    digit = (tokens >= DIGITS[0]) & (tokens <= DIGITS[-1]) & (pos >= prompt_len[:, None])
    ends = digit & ~jnp.pad(digit[:, 1:], ((0, 0), (0, 1)))            # [B, L] a number's last digit
    noise = jax.random.uniform(jax.random.fold_in(k_cut, 1), tokens.shape)
    after_one = jnp.argmax(jnp.where(ends, noise, -1.0), axis=-1)[:, None] + 1
    return jnp.where(u < 0.5, prompt_len[:, None] + reply_len[:, None] - 1, after_one)


def _suffix_cut(k_row, pos, cut, cut_ok, p, p_mask, scored, cut_fraction, cut_rate, cut_window, eps):
    b = p_mask.shape[0]
    suffix = jnp.where(pos >= cut, 1.0, jnp.maximum(cut_rate * p, eps))  # [B, L]
    use = _rows(k_row, b, cut_fraction, cut_ok)
    if cut_window > 0:
        scored = jnp.where(use, pos < cut + cut_window, True)           # [B, L]
    return jnp.where(use, suffix, p_mask), scored


def _masked_tail(key, pos, prompt_len, reply_len, cut_ok, p, p_mask, scored, tail_fraction, tail_window,
                 tail_block):
    b = p_mask.shape[0]
    pads = pos - (prompt_len + reply_len)[:, None]                      # [B, L] >= 0 on the pads
    use = _rows(jax.random.fold_in(key, 3), b, tail_fraction, cut_ok)
    tail, keep = jnp.where(pads >= 0, 1.0, p), pads < tail_window
    if tail_block > 0:
        blk = (pos - prompt_len[:, None]) // tail_block                 # [B, L] response block index
        n = (reply_len[:, None] + tail_block - 1) // tail_block         # [B, 1] blocks up to <|eot_id|>
        k = jnp.floor(jax.random.uniform(jax.random.fold_in(key, 4), (b, 1)) * n).astype(jnp.int32)
        tail, keep = jnp.where(blk < k, 0.0, jnp.where(blk == k, tail, 1.0)), blk == k
    return jnp.where(use, tail, p_mask), jnp.where(use, keep, scored)
