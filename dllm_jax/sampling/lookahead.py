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
    """[B, Lb] the current block's half of window-shaped ``x`` [B, W] (``offset`` [B]: 0 or Lb)."""
    return jnp.where((offset == 0)[:, None], x[:, :block_length], x[:, block_length:])


def combine(cur, ahead, offset, block_length: int):
    """[B, W] bool: ``cur`` [B, Lb] at the current block's offset and, where that is the first half,
    ``ahead`` [B, Lb] in the second."""
    return jnp.where((offset == 0)[:, None], jnp.concatenate([cur, ahead], axis=1),
                     jnp.concatenate([jnp.zeros_like(cur), cur], axis=1))


def select(rule, conf, masked, threshold, factor, entropy, entropy_bound):
    """[B, Lb] bool: what an active look-ahead block commits: its row's rule [B] without the forced
    first token (``forced=False``). THRESHOLD: conf >= threshold; FACTOR: ranks 0..n-1 while
    c_r >= 1 - f/(r + 2), from rank 0; ENTROPY_BOUND: ranks 0..n-1 while the summed entropy <= gamma,
    rank 0's included; FIXED rows commit nothing ahead (their schedule is per block). Ranks are by
    confidence among the block's masked positions (``rules.ranks``)."""
    rank = rules.ranks(conf, masked)  # [B, Lb]
    sel = jnp.where((rule == rules.THRESHOLD)[:, None], masked & (conf >= threshold[:, None]),
                    jnp.where((rule == rules.FACTOR)[:, None],
                              rules.transfer_factor(conf, masked, factor, rank, forced=False), False))
    if entropy is None:
        return sel
    return jnp.where((rule == rules.ENTROPY_BOUND)[:, None],
                     rules.transfer_entropy_bound(entropy, masked, entropy_bound, rank, forced=False), sel)
