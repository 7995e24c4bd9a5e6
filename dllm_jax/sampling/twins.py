"""Gathered refresh forwards (``chunk_rows`` rows at a time, ``RefreshLoop``) and twins: rows that
enter a block in the same step with identical forward inputs share one block-start refresh
forward (docs/sampling.md, "Twins share a refresh").

The ``n`` samples of one prompt enter their first block with the same prompt + all-mask canvas,
as do repeated prompts; greedy twins (the same request twice) stay twins to the end. A row's
forward does not depend on its batch-mates (batch invariance), so a twin may copy the first
row's cache rows and block hidden states instead of running its own forward.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dllm_jax.sampling.state import DecodeState


@struct.dataclass
class RefreshLoop:
    """Carry of the refresh loop (block-start forwards, ``chunk_rows`` rows at a time).

    Attributes:
      cache: the KV cache, the refreshed rows rebuilt.
      hidden: [B, W, D] window hidden states of the refreshed rows (zeros elsewhere; the head
        runs once, in ``commit``).
      pending: [B] bool rows still to refresh.
      forwards: [] int32 refresh forwards run.
    """

    cache: object
    hidden: jax.Array
    pending: jax.Array
    forwards: jax.Array


# Canvas tokens one refresh chunk aims at (docs/performance.md, "Step-level scheduling"): a
# chunk is ceil(REFRESH_TOKENS / canvas) rows, so short canvases refresh a few rows per forward
# and long ones one, and a step pays for about the rows that enter a block, not a fixed batch.
REFRESH_TOKENS = 256


def chunk_rows(batch: int, canvas_len: int, rows: int | None = None) -> int:
    """Rows of one refresh forward: ``rows`` if given, else ceil(REFRESH_TOKENS / canvas_len); within [1, batch]."""
    if rows is None:
        rows = math.ceil(REFRESH_TOKENS / canvas_len)
    return min(batch, max(1, rows))


def _hash_weights(length: int, salt: int):
    """[length] odd uint32 constants of ``row_hash`` (fixed: the same for every program)."""
    return jnp.asarray(np.random.default_rng(salt).integers(0, 2 ** 31, length, dtype=np.uint32) * 2 + 1)


def row_hash(*fields):
    """[B] uint32: a weighted sum (mod 2**32, so exact and order-free) of each [B, L] integer or bool field."""
    h = jnp.zeros(fields[0].shape[:1], jnp.uint32)
    for salt, x in enumerate(fields):
        h = h + jnp.sum(x.astype(jnp.uint32) * _hash_weights(x.shape[1], salt)[None, :], axis=1, dtype=jnp.uint32)
    return h


def same_forward(st: DecodeState, entering, bs):
    """[B] int32: for each row entering a block, the first entering row whose block-start forward
    reads exactly the same inputs (canvas, positions, valid, prompt, block start ``bs``): itself
    when no earlier row does; other rows: themselves. Candidates are matched by ``row_hash``, then
    compared field by field, so a hash collision only loses a share."""
    t = st.tokens
    fields = (t.canvas, t.positions, t.valid, t.prompt)
    h = row_hash(*fields)  # [B]
    b = h.shape[0]
    match = (h[:, None] == h[None, :]) & (bs[:, None] == bs[None, :]) & entering[None, :]  # [B, B]
    first = jnp.argmax(match, axis=1)  # the first match (itself, if entering and no earlier one)
    exact = jnp.ones((b,), bool)
    for x in fields:
        exact &= jnp.all(x == x[first], axis=1)
    return jnp.where(entering & exact, first, jnp.arange(b)).astype(jnp.int32)


def copy_twins(cache, hidden, twin, lead, chunk: int):
    """``cache`` rows and ``hidden`` [B, Lb, D] of each ``twin`` row [B] set to its ``lead`` row's,
    ``chunk`` rows per iteration of a while loop (rows with nothing to copy cost nothing)."""
    b = twin.shape[0]

    def body(carry):
        cache, hidden, pending = carry
        rows = jnp.argsort(~pending, stable=True)[:chunk]  # [R] the first twins left
        dest, src = jnp.where(pending[rows], rows, b), lead[rows]  # padding rows: out of range, dropped
        cache = jax.tree.map(lambda x: x.at[dest].set(x[src], mode="drop"), cache)
        return cache, hidden.at[dest].set(hidden[src], mode="drop"), pending.at[dest].set(False, mode="drop")

    cache, hidden, _ = jax.lax.while_loop(lambda c: jnp.any(c[2]), body, (cache, hidden, twin))
    return cache, hidden


def gathered(forward, scatter, st: DecodeState, entering, match_start, hidden, chunk: int, share: bool):
    """The forwards of the ``entering`` rows [B], ``chunk`` rows per forward (a while loop over the
    chunks: a step pays for the rows that enter, not the batch); with ``share``, rows whose inputs
    equal an earlier entering row's (``same_forward`` at ``match_start`` [B]) copy its results.

    ``forward(rows [R]) -> (h [R, ...], kv)``; ``scatter(cache, dest [R], kv) -> cache`` writes the
    rows' keys/values (``dest`` out of range for padding rows: dropped). ``hidden`` [B, ...] is what
    non-entering rows keep. Returns (cache, hidden, forwards run)."""
    b = entering.shape[0]
    lead = same_forward(st, entering, match_start) if share else jnp.arange(b)  # [B]
    twin = entering & (lead != jnp.arange(b))  # [B] rows that copy an earlier row's forward

    def body(c: RefreshLoop) -> RefreshLoop:
        rows = jnp.argsort(~c.pending, stable=True)[:chunk]  # [R] the first pending rows
        h, kv = forward(rows)
        dest = jnp.where(c.pending[rows], rows, b)  # padding rows: out of range, dropped
        return RefreshLoop(scatter(c.cache, dest, kv), c.hidden.at[dest].set(h.astype(c.hidden.dtype), mode="drop"),
                           c.pending.at[dest].set(False, mode="drop"), c.forwards + 1)

    loop = jax.lax.while_loop(lambda c: jnp.any(c.pending), body,
                              RefreshLoop(st.cache, hidden, entering & ~twin, jnp.int32(0)))
    cache, hidden = copy_twins(loop.cache, loop.hidden, twin, lead, chunk) if share else (loop.cache, loop.hidden)
    return cache, hidden, loop.forwards

