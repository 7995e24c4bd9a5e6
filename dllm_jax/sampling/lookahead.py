"""Multi-block decoding: a row denoises its block and, once that block is far enough along, the
next one too (docs/sampling.md, "Multi-block decoding").

A look-ahead program (``ProgramKey.lookahead``) runs every forward over a *window* of two blocks,
the row's current block k and block k + 1. Block k decodes exactly as in single-block decoding
(its rule, at least one token per call). Block k + 1 is *active* while at least
``block_add_threshold`` of block k is committed (d3LLM's ``block_add_threshold``, evaluated before
each forward); an active look-ahead block commits only the positions its row's rule accepts on
their own merit: no forced first token (``select``). The row leaves block k when it has no masks,
as before; a block k + 1 the look-ahead already filled is never entered (``BlockProgram.advance``),
and entering a block refreshes the cache as before. At most two blocks are in flight.

Geometry: the window starts at the current block, except in the last block, where it starts one
block earlier so it stays inside the canvas (``window_start``); the current block then sits at
offset ``block_length`` in it and there is no look-ahead. Arrays here are [B, W] over the window
(W = 2 * Lb) or [B, Lb] over one of its halves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dllm_jax.sampling import rules


def window_start(bs, prompt_len: int, gen_length: int, window: int):
    """[B] the window's first canvas position: the block start ``bs``, kept inside the canvas."""
    return jnp.minimum(bs, prompt_len + gen_length - window)


def active(lookahead_on: bool, block, num_blocks: int, block_masks_now, block_length: int, add_threshold):
    """[B] bool: the row's look-ahead block is active: there is a next block and at least
    ``add_threshold`` [B] of the current block is committed (``block_masks_now`` [B] masks left)."""
    if not lookahead_on:
        return jnp.zeros(block.shape, bool)
    committed = (block_length - block_masks_now).astype(jnp.float32)
    return (block + 1 < num_blocks) & (committed >= add_threshold * block_length)


def current(x, offset, block_length: int):
    """[B, Lb, ...] the current block's part of window-shaped ``x`` [B, W, ...] (``offset`` [B]: 0 or Lb)."""
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, block_length, axis=0))(x, offset)


def combine(cur, ahead, offset, block_length: int):
    """[B, W] bool: ``cur`` [B, Lb] at the current block's offset, ``ahead`` [B, Lb] in the second
    half where the current block is the first (offset 0)."""
    window = jnp.concatenate([jnp.zeros_like(cur), ahead & (offset == 0)[:, None]], axis=1)
    return jax.vmap(lambda w, c, s: jax.lax.dynamic_update_slice_in_dim(
        w, c | jax.lax.dynamic_slice_in_dim(w, s, block_length, axis=0), s, axis=0))(window, cur, offset)


def select(rule, conf, masked, threshold, factor, entropy, entropy_bound):
    """[B, Lb] bool: what an active look-ahead block commits: its row's rule [B] without the forced
    first token. THRESHOLD: conf >= threshold; FACTOR: ranks 0..n-1 while c_r >= 1 - f/(r + 2),
    from rank 0; ENTROPY_BOUND: ranks 0..n-1 while the summed entropy <= gamma, rank 0's
    included; FIXED rows commit nothing ahead (their schedule is per block). Ranks are by
    confidence among the block's masked positions (``rules.ranks``)."""
    lb = conf.shape[-1]
    rank = rules.ranks(conf, masked)  # [B, Lb]
    r = jnp.arange(lb)
    by_rank = rules.by_rank(conf, masked, rank)  # [B, Lb]
    ok = (by_rank >= 1.0 - factor[:, None] / (r + 2.0)) & jnp.isfinite(by_rank)
    factor_sel = masked & (rank < jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1)[:, None])
    sel = jnp.where((rule == rules.THRESHOLD)[:, None], masked & (conf >= threshold[:, None]),
                    jnp.where((rule == rules.FACTOR)[:, None], factor_sel, False))
    if entropy is None:
        return sel
    h = jnp.zeros(conf.shape, jnp.float32).at[jnp.arange(conf.shape[0])[:, None], rank].set(
        jnp.where(masked, entropy, 0.0).astype(jnp.float32), mode="drop")  # [B, Lb] by rank
    spent = jax.lax.associative_scan(jnp.add, h, axis=1)  # (fixed order: batch-invariant sums)
    count = jnp.sum((spent <= entropy_bound[:, None]) & (r[None, :] < jnp.sum(masked, -1)[:, None]), -1)
    return jnp.where((rule == rules.ENTROPY_BOUND)[:, None], masked & (rank < count[:, None]), sel)
