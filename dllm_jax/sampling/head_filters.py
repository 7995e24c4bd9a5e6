"""The chunk folds of the lean head's T > 0 draw and tempered normaliser, and the top_k / min_p
filters without [B, Lb, V] logits (issue 26; docs/sampling.md "The lean head").

With top_p off (1), a row's filter set is every token but the mask token with l / T' >= floor,
floor = max(k-th largest l / T', max l / T' + log min_p) (T' = max(T, 1e-6); a term only where its
filter is on): ``proposal.filter_floor``'s value bit for bit, since scaling by 1 / T' > 0 keeps the
order, so the k-th largest of l / T' is the k-th largest l scaled (every scaling is the product
``l * proposal.inv_temperature(T)``, and both paths take the floor from ``proposal.floor_of``). The
head's first pass over the chunks tracks the largest ``FILTER_K`` logits (``update_top``); a second
pass (``rescan``) redraws the filtered rows' Gumbel-max restricted to the floor
(``update_draw``: the same noise and scores, so ``proposal.draw``'s token) and sums their
'processed' normaliser over it (``update_scaled``). top_p needs the whole sorted distribution:
its rows (and those with top_k > ``FILTER_K``) keep the full path.

Shapes: c [B, Lb, C] a chunk's logits (columns start .. start + C - 1, those below ``first``
already folded), per-row knobs [B].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dllm_jax.models.transformer import row_max, row_sum
from dllm_jax.sampling import proposal
from dllm_jax.sampling.rules import NEG_INF

# The largest top_k a lean program serves: the running top-k its first pass keeps per position
# (docs/performance.md "The lean head"; larger top_k rows run the full program).
FILTER_K = 64


def lean_filtered(knobs):
    """[B] rows at T > 0 with a filter the head's statistics serve: top_k in 1 .. ``FILTER_K`` and /
    or min_p, top_p off."""
    on = (knobs.top_k > 0) | (knobs.min_p > 0.0)
    return (knobs.temperature > 0) & (knobs.top_p >= 1.0) & on & (knobs.top_k <= FILTER_K)


def candidates(c, start, first, mask_id: int, temperature=None, floor=None):
    """The chunk's columns not folded yet, the mask token aside ([C] bool); with ``floor`` [B, Lb]
    only those with l / T' >= floor ([B, Lb, C]: the filter set)."""
    col = start + jnp.arange(c.shape[-1])
    ok = (col >= first) & (col != mask_id)
    if floor is None:
        return ok
    return ok & (c * proposal.inv_temperature(temperature)[:, None, None] >= floor[..., None])


def update_top(vals, cm):
    """The running largest logits vals [B, Lb, K] (descending) with a chunk's cm [B, Lb, C] (the
    columns that are no candidates at -inf) folded in."""
    chunk_vals, _ = jax.lax.top_k(cm, min(vals.shape[-1], cm.shape[-1]))
    return jax.lax.top_k(jnp.concatenate([vals, chunk_vals], axis=-1), vals.shape[-1])[0]


def floor(best, top_vals, knobs):
    """[B, Lb] the least l / T' a ``lean_filtered`` row may draw (``proposal.filter_floor``'s value),
    -inf for other rows: best [B, Lb] the largest logit, top_vals [B, Lb, K] the K largest (the mask
    token left out of both)."""
    at = jnp.clip(knobs.top_k - 1, 0, top_vals.shape[-1] - 1)[:, None, None]
    kth = jnp.take_along_axis(top_vals, at, axis=-1)[..., 0]  # -inf where V - 1 < top_k
    cut = jnp.where((knobs.top_k > 0)[:, None], kth, NEG_INF)
    value = proposal.floor_of(cut, best, knobs.temperature, knobs.min_p)
    return jnp.where(lean_filtered(knobs)[:, None], value, NEG_INF)


def update_draw(s, c, g, start, first, mask_id: int, temperature, floor=None):
    """Fold one chunk into the Gumbel-max draw of ``HeadStats`` s: g [B, Lb, C] the Gumbel noise of
    the chunk's columns, temperature [B]. The scores are ``proposal.draw``'s, l + T g at T > 0 and
    l at T = 0, the mask token (and with ``floor``, the tokens outside the filter set) at -inf; a
    strictly larger chunk maximum takes over, so ties keep the lowest index, as ``jnp.argmax``."""
    t = temperature[:, None, None]
    ok = candidates(c, start, first, mask_id, temperature, floor)
    scores = jnp.where(ok, jnp.where(t > 0, c + t * g, c), NEG_INF)
    chunk_best = row_max(scores)[..., 0]  # [B, Lb]
    at = jnp.argmax(scores, axis=-1)
    logit = jnp.take_along_axis(c, at[..., None], axis=-1)[..., 0]
    won = chunk_best > s.drawn_score
    return s.replace(drawn=jnp.where(won, (start + at).astype(jnp.int32), s.drawn),
                     drawn_score=jnp.where(won, chunk_best, s.drawn_score),
                     drawn_logit=jnp.where(won, logit, s.drawn_logit))


def update_scaled(s, c, start, first, mask_id: int, temperature, floor=None):
    """Fold one chunk into the online log-sum-exp of l / T' (``HeadStats.t_best`` / ``t_total``)
    over the tokens but the mask (with ``floor``: over the filter set)."""
    ok = candidates(c, start, first, mask_id, temperature, floor)
    x = jnp.where(ok, c * proposal.inv_temperature(temperature)[:, None, None], NEG_INF)
    best = jnp.maximum(s.t_best, row_max(x)[..., 0])
    scale = jnp.where(s.t_best == best, 1.0, jnp.exp(s.t_best - best))  # (-inf == -inf: nothing yet)
    e = jnp.exp(jnp.where(x == NEG_INF, NEG_INF, x - best[..., None]))
    return s.replace(t_best=best, t_total=s.t_total * scale + row_sum(e)[..., 0])


def free_ids(top_ids, count):
    """[B, Lb, k]: position p >= count holds the (p - count)-th smallest id not among the first
    ``count`` [B, Lb] of top_ids [B, Lb, k] (positions below count: 0). These are the ids
    ``jax.lax.top_k`` puts after a row's finite values when the rest of the row is -inf (equal
    values: the lower index first); ids below 2k suffice (at most k are taken)."""
    k = top_ids.shape[-1]
    cand = jnp.arange(2 * k, dtype=top_ids.dtype)  # [2k]
    taken = (top_ids[..., None, :] == cand[:, None]) & (jnp.arange(k) < count[..., None])[..., None, :]
    free = ~jnp.any(taken, axis=-1)  # [B, Lb, 2k]
    rank = jnp.cumsum(free, axis=-1) - 1
    want = jnp.arange(k) - count[..., None]  # [B, Lb, k]
    hit = free[..., None, :] & (rank[..., None, :] == want[..., None])  # [B, Lb, k, 2k]
    return jnp.sum(jnp.where(hit, cand, 0), axis=-1).astype(top_ids.dtype)


def support_top(top_ids, top_lp, inside):
    """(top_ids, top_logprobs) [B, Lb, k] of the k most probable tokens under log-softmax(l / T')
    over a filter set, from the k largest logits' ids and logprobs top_lp and whether they are in the
    set (``inside`` [B, Lb, k]: a prefix, as l / T' keeps l's order): beyond the set, -inf and the
    ids ``jax.lax.top_k`` gives a row that is -inf outside it (``free_ids``)."""
    ids = jnp.where(inside, top_ids, free_ids(top_ids, jnp.sum(inside, axis=-1)))
    return ids, jnp.where(inside, top_lp, NEG_INF)


def chunks(vocab: int, width: int, fold, init):
    """``fold(carry, start, first)`` over the chunks in order: chunk i covers columns start ..
    start + width - 1, start = min(i * width, V - width) (the last chunk ends at V; its columns
    below first = i * width were already folded)."""
    def body(i, carry):
        first = i * width
        return fold(carry, jnp.minimum(first, vocab - width), first)

    return jax.lax.fori_loop(0, -(-vocab // width), body, init)


def chunk_noise(noise, lb: int, vocab: int, start, width: int):
    """[B, Lb, C] the Gumbel noise of the chunk's columns (``proposal.gumbel_columns``)."""
    return jax.vmap(lambda key: proposal.gumbel_columns(key, lb, vocab, start, width))(noise)


def rescan(chunk_logits, stats, floor, vocab: int, width: int, mask_id: int, temperature, *, noise=None, draw=None,
           lse=None):
    """The filtered rows' second pass over the chunks of ``width`` columns (``chunk_logits(start,
    width)``, as ``head.scan``'s), given their ``floor`` [B, Lb]: with ``noise`` the Gumbel-max
    draw of the ``draw`` [B] rows restricted to l / T' >= floor (the first pass's noise and scores:
    ``proposal.draw`` under ``filter_floor``, token for token); with ``lse`` [B] those rows'
    log-sum-exp of l / T' over the same set. The other rows keep the ``HeadStats`` stats' values."""
    lb = stats.best.shape[1]

    def fold(s, start, first):
        c = chunk_logits(start, width)
        if noise is not None:
            g = chunk_noise(noise, lb, vocab, start, width)
            s = update_draw(s, c, g, start, first, mask_id, temperature, floor)
        if lse is not None:
            s = update_scaled(s, c, start, first, mask_id, temperature, floor)
        return s

    neg = jnp.full_like(stats.best, NEG_INF)
    zero = jnp.zeros_like(stats.best)
    fresh = stats.replace(drawn=jnp.zeros_like(stats.drawn), drawn_score=neg, drawn_logit=zero, t_best=neg,
                          t_total=zero)
    new = chunks(vocab, width, fold, fresh)
    names = (("drawn", "drawn_score", "drawn_logit") if noise is not None else ()) + (
        ("t_best", "t_total") if lse is not None else ())
    rows = {n: (draw if n.startswith("drawn") else lse)[:, None] for n in names}
    return stats.replace(**{n: jnp.where(rows[n], getattr(new, n), getattr(stats, n)) for n in names})
