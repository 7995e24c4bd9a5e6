"""The output head over vocabulary chunks: what the transfer rules need of each block position
without a [B, Lb, V] float32 logits array (issue 26, docs/sampling.md "The lean head").

``scan`` runs the head matmul one chunk of ``HEAD_CHUNK`` vocabulary columns at a time and keeps,
per position, online statistics of the logits (``HeadStats``): the greedy proposal (argmax, the
mask token excluded, the lowest index on ties, exactly ``jnp.argmax``), the running maximum and
exp-sums that give the softmax normaliser over the full vocabulary, the entropy without the mask
token, a running top-k; in a lean program the T > 0 Gumbel-max draw (the noise of each chunk's
columns drawn on the spot, ``proposal.gumbel_columns``: the same numbers as the full draw's); for
rows that ask for 'processed' logprobs at T > 0 without filters, an online log-sum-exp of
logits / T; and for top_k / min_p rows (top_p off, top_k <= ``head_filters.FILTER_K``) the
largest logits, whose floor a second pass over the chunks (``head_filters.rescan``) restricts the
draw and the 'processed' normaliser to. A *lean* program (``ProgramKey.lean_head``: rows without top_p and
without credit fusion, ``params.lean_head_ok``) keeps only these; a *full* one also writes the
chunks into the [B, Lb, V] logits the top_p draw, its 'processed' logprobs and dInfer's credit need
(and draws every T > 0 row from them, ``proposal.draw``). Both derive confidence, entropy, raw
logprobs and the 'processed' ones of rows without top_p from the same statistics, so a row gets the
same bits in either program.

Every sum is a fixed-order ``row_sum`` inside a chunk and a sequential combination across chunks,
so a row's values do not depend on its batch-mates (docs/sampling.md, "Batch invariance in bf16").

Shapes: h [B, Lb, D] (or [B, 2, Lb, D] with CFG: cond, uncond), W [D, V], C the chunk width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dllm_jax.models.transformer import rms_norm, row_max, row_sum
from dllm_jax.sampling import head_filters as hf
from dllm_jax.sampling import proposal
from dllm_jax.sampling.rules import NEG_INF

# Vocabulary columns per head chunk at most (``chunk_width``; docs/performance.md, "The lean head"):
# at LLaDA's 126,464 tokens 16 chunks of 7904, each [B, Lb, 7904] float32 (32 MB at batch 32, block 32).
HEAD_CHUNK = 8192


@struct.dataclass
class HeadStats:
    """Per-position statistics of the logits l [B, Lb, V] (each field [B, Lb]; tops [B, Lb, k]).

    Attributes:
      argmax: int32 the greedy proposal: argmax of l without the mask token (lowest index on ties).
      best: its logit, max of l without the mask token.
      total: sum over tokens but the mask of exp(l - best).
      moment: sum over tokens but the mask of exp(l - best) * (l - best) (the entropy's numerator).
      mask_logit: the mask token's logit.
      top_vals, top_ids: the k largest logits without the mask token (descending, lowest index first
        on ties) and their ids.
      drawn: int32 the T > 0 Gumbel-max draw, argmax of l + T g without the mask token (g the step's
        Gumbel noise, ``proposal.draw``'s numbers; lowest index on ties); computed only by a lean
        program in a step where some row samples (``proposal`` picks it for T > 0 rows only).
      drawn_score: its score l + T g; drawn_logit: its logit l.
      t_best: max of l / T' without the mask token (T' = max(T, 1e-6), ``proposal._scaled``).
      t_total: sum over tokens but the mask of exp(l / T' - t_best): with t_best the normaliser of
        'processed' logprobs at T > 0 (computed only in steps where a row wants them; for filtered
        rows, over their filter set).
      filter_vals: [B, Lb, K] the K = ``head_filters.FILTER_K`` largest logits without the mask token
        (a lean program's, in steps where a row at T > 0 has a top_k; else K = 0).
      floor: a lean program's filter floor (``head_filters.floor``; -inf for rows without filters).
    """

    argmax: jax.Array
    best: jax.Array
    total: jax.Array
    moment: jax.Array
    mask_logit: jax.Array
    top_vals: jax.Array
    top_ids: jax.Array
    drawn: jax.Array
    drawn_score: jax.Array
    drawn_logit: jax.Array
    t_best: jax.Array
    t_total: jax.Array
    filter_vals: jax.Array
    floor: jax.Array

    def log_z(self):
        """log of the full softmax normaliser (the mask token included): log sum_v exp(l_v)."""
        m = jnp.maximum(self.best, self.mask_logit)
        return m + jnp.log(self.total * jnp.exp(self.best - m) + jnp.exp(self.mask_logit - m))

    def prob(self, logit):
        """softmax(l)[x] from x's logit: the confidence of a proposal."""
        return jnp.exp(logit - self.log_z())

    def entropy(self):
        """Entropy (nats) of softmax(l) without the mask token (``proposal.entropy``)."""
        return jnp.log(self.total) - self.moment / self.total

    def raw_logprobs(self, logit):
        """(log softmax(l)[x] of x's logit, the top-k raw logprobs [B, Lb, k], their ids)."""
        log_z = self.log_z()
        return logit - log_z, self.top_ids, self.top_vals - log_z[..., None]

    def proposal(self, temperature):
        """(x0 [B, Lb] int32, its logit [B, Lb]) of a lean program: the Gumbel-max draw for rows at
        T > 0 (``temperature`` [B]), the argmax for greedy rows."""
        sampled = (temperature > 0)[:, None]
        return jnp.where(sampled, self.drawn, self.argmax), jnp.where(sampled, self.drawn_logit, self.best)

    def processed_logprobs(self, logit, temperature, floor):
        """'processed' logprobs at T > 0 without top_p: log-softmax of l / T' over the tokens but the
        mask with l / T' >= ``floor`` [B, Lb] (-inf: all; ``proposal.processed_logprobs``) of x's
        logit, and of the top k (the raw top k: dividing by T' > 0 keeps their order; beyond the
        filter set as ``head_filters.support_top``). Returns (logprob [B, Lb], top_ids,
        top_logprobs [B, Lb, k])."""
        inv = proposal.inv_temperature(temperature)[:, None]  # [B, 1]
        # t_best = best / T' (the largest logit is in every filter set): x - t_best as (l - best) / T',
        # no cancellation of l / T' ~ 1e7 at T' = 1e-6 (XLA:CPU fuses l * (1 / T') - t_best into an fma)
        lse = jnp.log(self.t_total)
        shifted = (logit - self.best) * inv - lse
        top = (self.top_vals - self.best[..., None]) * inv[..., None] - lse[..., None]
        return (shifted,) + hf.support_top(self.top_ids, top, self.top_vals * inv[..., None] >= floor[..., None])


def _init(shape, k: int, filter_k: int = 0) -> HeadStats:
    neg = jnp.full(shape, NEG_INF, jnp.float32)
    zero = jnp.zeros(shape, jnp.float32)
    ids = jnp.zeros(shape, jnp.int32)
    return HeadStats(ids, neg, zero, zero, neg, jnp.full(shape + (k,), NEG_INF, jnp.float32),
                     jnp.zeros(shape + (k,), jnp.int32), ids, neg, zero, neg, zero,
                     jnp.full(shape + (filter_k,), NEG_INF, jnp.float32), neg)


def update(s: HeadStats, c, start, first, mask_id: int) -> HeadStats:
    """Fold one chunk in: c [B, Lb, C] the logits of columns start .. start + C - 1, of which
    those below ``first`` were already folded (the last chunk is clamped to end at V)."""
    width = c.shape[-1]
    col = start + jnp.arange(width)  # [C] vocabulary ids
    valid = col >= first
    cm = jnp.where(valid & (col != mask_id), c, NEG_INF)  # the mask token is never a candidate
    chunk_best = row_max(cm)[..., 0]  # [B, Lb]
    chunk_arg = (start + jnp.argmax(cm, axis=-1)).astype(jnp.int32)
    best = jnp.maximum(s.best, chunk_best)
    scale = jnp.where(s.best == best, 1.0, jnp.exp(s.best - best))  # (-inf == -inf: nothing yet)
    delta = jnp.where(s.best == best, 0.0, s.best - best)
    delta = jnp.where(s.total > 0, delta, 0.0)
    shifted = jnp.where(cm == NEG_INF, NEG_INF, cm - best[..., None])
    e = jnp.exp(shifted)
    total = s.total * scale + row_sum(e)[..., 0]
    moment = scale * (s.moment + delta * s.total) + row_sum(jnp.where(e > 0, e * shifted, 0.0))[..., 0]
    argmax = jnp.where(chunk_best > s.best, chunk_arg, s.argmax)  # strict: an earlier chunk wins ties
    at = jnp.clip(mask_id - start, 0, width - 1)
    here = (mask_id >= jnp.maximum(start, first)) & (mask_id < start + width)
    mask_logit = jnp.where(here, jax.lax.dynamic_index_in_dim(c, at, axis=-1, keepdims=False), s.mask_logit)
    top_vals, top_ids = s.top_vals, s.top_ids
    k = top_vals.shape[-1]
    if k:
        vals, idx = jax.lax.top_k(cm, k)
        merged = jnp.concatenate([top_vals, vals], axis=-1)  # the earlier ids first: they win ties
        ids = jnp.concatenate([top_ids, (start + idx).astype(jnp.int32)], axis=-1)
        top_vals, at_k = jax.lax.top_k(merged, k)
        top_ids = jnp.take_along_axis(ids, at_k, axis=-1)
    return s.replace(argmax=argmax, best=best, total=total, moment=moment, mask_logit=mask_logit, top_vals=top_vals,
                     top_ids=top_ids)


def chunk_width(vocab: int, chunk: int | None = None) -> int:
    """Columns per chunk: V when it fits one, else the largest divisor of V in [3/4, 1] of the chunk
    (LLaDA: 7904 = V / 16; whole chunks index a free [D, n, C] view of the head), else the chunk (the
    last one overlaps)."""
    limit = HEAD_CHUNK if chunk is None else chunk
    if vocab <= limit:
        return vocab
    return next((c for c in range(limit, -(-3 * limit // 4) - 1, -1) if vocab % c == 0), limit)


def scan(chunk_logits, shape, vocab: int, mask_id: int, *, top_k: int = 0, keep_logits: bool = False,
         chunk: int | None = None, temperature=None, noise=None, scaled=None, tops=None):
    """``HeadStats`` of the logits whose columns ``chunk_logits(start, width)`` [B, Lb, width]
    computes, one chunk after another; with ``keep_logits`` also the logits [B, Lb, V] float32.

    ``temperature`` [B] with ``noise`` [B] (the rows' typed keys of the step's Gumbel draw,
    ``proposal.noise_keys(keys)[:, 0]``): also the Gumbel-max draw (``head_filters.update_draw``),
    in chunks where some row samples; with ``scaled`` [B] bool: the log-sum-exp of logits / T, in
    chunks where some such row is (``update_scaled``); with ``tops`` [B] bool: the ``FILTER_K``
    largest logits, in chunks where some such row is (``update_top``; ``head_filters``)."""
    width = chunk_width(vocab, chunk)
    lb = shape[1]

    def fold(carry, start, first):
        stats, logits = carry
        c = chunk_logits(start, width)
        if logits is not None:
            logits = jax.lax.dynamic_update_slice_in_dim(logits, c, start, axis=-1)
        stats = update(stats, c, start, first, mask_id)
        if noise is not None:
            def sample(s):
                return hf.update_draw(s, c, hf.chunk_noise(noise, lb, vocab, start, width), start, first, mask_id,
                                      temperature)

            stats = jax.lax.cond(jnp.any(temperature > 0), sample, lambda s: s, stats)
        if scaled is not None:
            stats = jax.lax.cond(jnp.any(scaled), lambda s: hf.update_scaled(s, c, start, first, mask_id, temperature),
                                 lambda s: s, stats)
        if tops is not None:
            def top(s):
                cm = jnp.where(hf.candidates(c, start, first, mask_id), c, NEG_INF)
                return s.replace(filter_vals=hf.update_top(s.filter_vals, cm))

            stats = jax.lax.cond(jnp.any(tops), top, lambda s: s, stats)
        return stats, logits

    logits0 = jnp.zeros(shape + (vocab,), jnp.float32) if keep_logits else None
    init = _init(shape, top_k, hf.FILTER_K if tops is not None else 0)
    return hf.chunks(vocab, width, fold, (init, logits0))


def stats_processed(knobs):
    """[B] rows whose 'processed' normaliser the first pass sums (``HeadStats.processed_logprobs``):
    'processed' at T > 0 without a top_k / top_p / min_p filter (filtered rows renormalise over
    their filter set: ``filter_processed`` rows in a second pass, top_p rows on the full path,
    ``proposal.processed_logprobs``)."""
    filtered = (knobs.top_k > 0) | (knobs.top_p < 1.0) | (knobs.min_p > 0.0)
    return knobs.processed_logprobs & (knobs.temperature > 0) & ~filtered


def filter_processed(knobs):
    """[B] 'processed' rows with filters the statistics serve (``head_filters.lean_filtered``): their
    normaliser over the filter set is summed in a second pass (``head_filters.rescan``), in either
    program."""
    return knobs.processed_logprobs & hf.lean_filtered(knobs)


def block_head(model, hb, cfg_scale, mask_id: int, *, top_k: int = 0, keep_logits: bool = False,
               chunk: int | None = None, knobs=None, keys=None, fuses_credit: bool = False):
    """The head of a block's hidden states (before the final norm): hb [B, Lb, D], or with
    ``cfg_scale`` [B] given, [B, 2, Lb, D] (cond, uncond; guided logits
    ``unc + (w + 1) * (cond - unc)`` where w > 0, as ``BlockProgram.forward`` combined them).

    With the rows' ``knobs`` and step ``keys`` [B]: a lean program (no ``keep_logits``) also draws
    the T > 0 proposals in the chunks, and in steps where a row has top_k / min_p filters
    (``head_filters.lean_filtered``) their floor (``HeadStats.floor``) and, in a second pass,
    their draw restricted to it (``head_filters.rescan``); with ``top_k`` (logprobs tracked) and
    no credit fusion (``fuses_credit``: processed logprobs are then of the fused logits) the
    statistics also hold the log-sum-exp of logits / T for ``stats_processed`` rows (and a lean
    program's for ``filter_processed`` rows, over their filter set). Returns (``HeadStats``,
    logits [B, Lb, V] float32 or None)."""
    w_head, vocab = model.lm_head[...], model.spec.vocab
    hn = rms_norm(hb, model.final_norm[...], model.spec.norm_eps)
    shape = hb.shape[:1] + hb.shape[-2:-1]
    whole = vocab % chunk_width(vocab, chunk) == 0
    # whole chunks: index a [D, n, C] view (measured ~2.5x faster on XLA:CPU at batch 1 than a
    # dynamic slice of [D, V] columns, which is copied out first; docs/performance.md)
    w3 = w_head.reshape(w_head.shape[0], vocab // chunk_width(vocab, chunk), -1) if whole else None

    def chunk_logits(start, width):
        if whole:
            w = jax.lax.dynamic_index_in_dim(w3, start // width, axis=1, keepdims=False)
        else:
            w = jax.lax.dynamic_slice_in_dim(w_head, start, width, axis=1)
        out = jnp.einsum("...d,dv->...v", hn, w, preferred_element_type=jnp.float32)
        if cfg_scale is None:
            return out
        cond, unc = out[:, 0], out[:, 1]
        wt = cfg_scale[:, None, None]
        return jnp.where(wt > 0, unc + (wt + 1.0) * (cond - unc), cond)

    sampling = {}
    if knobs is not None:
        sampling["temperature"] = knobs.temperature
        if not keep_logits:
            sampling["noise"] = proposal.noise_keys(keys)[:, 0]
            sampling["tops"] = hf.lean_filtered(knobs) & (knobs.top_k > 0)
        if top_k and not fuses_credit:
            sampling["scaled"] = stats_processed(knobs)
    stats, logits = scan(chunk_logits, shape, vocab, mask_id, top_k=top_k, keep_logits=keep_logits, chunk=chunk,
                         **sampling)
    if knobs is None or keep_logits:
        return stats, logits
    stats = stats.replace(floor=hf.floor(stats.best, stats.filter_vals, knobs))
    rows = hf.lean_filtered(knobs)

    def second(s):
        lse = filter_processed(knobs) if "scaled" in sampling else None
        return hf.rescan(chunk_logits, s, s.floor, vocab, chunk_width(vocab, chunk), mask_id, knobs.temperature,
                         noise=sampling["noise"], draw=rows, lse=lse)

    return jax.lax.cond(jnp.any(rows), second, lambda s: s, stats), None


def propose(stats: HeadStats, logits, knobs, keys, mask_id: int, fused=None):
    """The step's candidates from the head: (x0 [B, Lb] int32, conf [B, Lb], the filters' floor
    [B, Lb], x0's raw logit [B, Lb]).

    Lean (``logits`` None: no row has top_p): x0 is the statistics' argmax at T = 0 and their
    chunked Gumbel-max draw at T > 0 (``HeadStats.proposal``; under top_k / min_p restricted to
    ``HeadStats.floor``). Full: x0 is ``proposal.draw``'s (the argmax at T = 0, equal bits; the
    Gumbel-max draw under the filters at T > 0, the same draw as the lean one without top_p: the
    same noise, the same scores, the same floor). Either way conf =
    softmax(logits)[x0] from the statistics' normaliser, so a row's confidence does not depend on
    which program ran it. ``fused``: dInfer's credit-fused logits, which the draw and the
    confidence use instead (``proposal.propose``, as before)."""
    if logits is None:
        x0, logit = stats.proposal(knobs.temperature)
        return x0, proposal.random_conf(stats.prob(logit), keys, knobs.remasking), stats.floor, logit
    filters = (knobs.top_k, knobs.top_p, knobs.min_p)
    if fused is not None:
        x0, conf, floor = proposal.propose(fused, knobs.temperature, keys, mask_id, knobs.remasking, filters,
                                           with_floor=True)
        return x0, conf, floor, jnp.take_along_axis(logits, x0[..., None], axis=-1)[..., 0]
    x0, floor = proposal.draw(logits, knobs.temperature, keys, mask_id, filters)
    logit = jnp.take_along_axis(logits, x0[..., None], axis=-1)[..., 0]
    return x0, proposal.random_conf(stats.prob(logit), keys, knobs.remasking), floor, logit


def logprobs(stats: HeadStats, logits, x0, logit, knobs, mask_id: int, floor, drawn=None, chunk: int | None = None):
    """(logprob [B, Lb], top_ids [B, Lb, k], top_logprobs [B, Lb, k]) of the committed candidates:
    'raw' from the statistics (log-softmax of the model's logits; the mask token left out of the
    top k); 'processed' rows at T > 0 without top_p (``stats_processed``, ``filter_processed``)
    from the statistics too (``HeadStats.processed_logprobs``; a full program sums the filtered
    rows' normaliser over the kept logits' chunks, ``head_filters.rescan``, as a lean one does over
    the head's), other 'processed' rows at T > 0 (full programs only: top_p, top_k > ``FILTER_K``,
    or ``drawn`` the credit-fused logits the draw used) from ``proposal.processed_logprobs``,
    computed only in steps where such a row samples. ``chunk``: ``block_head``'s."""
    raw = stats.raw_logprobs(logit)
    use = knobs.processed_logprobs & (knobs.temperature > 0)  # [B]
    if drawn is None:  # (credit fusion: processed logprobs are of the fused logits, below)
        online = stats_processed(knobs) | filter_processed(knobs)  # [B]
        if logits is not None:
            def second(s):
                v = logits.shape[-1]
                return hf.rescan(lambda start, w: jax.lax.dynamic_slice_in_dim(logits, start, w, axis=-1), s, floor,
                                 v, chunk_width(v, chunk), mask_id, knobs.temperature, lse=filter_processed(knobs))

            stats = jax.lax.cond(jnp.any(filter_processed(knobs)), second, lambda s: s, stats)
        got = stats.processed_logprobs(logit, knobs.temperature, floor)
        raw = tuple(jnp.where(online.reshape((-1,) + (1,) * (r.ndim - 1)), g, r) for g, r in zip(got, raw))
        use = use & ~online
    if logits is None:  # (a lean program has no top_p rows)
        return raw
    k = stats.top_vals.shape[-1]

    def of_draw(_):
        return proposal.processed_logprobs(logits if drawn is None else drawn, x0, k, mask_id, knobs.temperature,
                                           floor)

    got = jax.lax.cond(jnp.any(use), of_draw, lambda _: raw, None)
    return tuple(jnp.where(use.reshape((-1,) + (1,) * (r.ndim - 1)), g, r) for g, r in zip(got, raw))
