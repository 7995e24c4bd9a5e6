"""Per-step proposals on one block: the candidate token at every position (greedy or a T > 0
Gumbel-max draw under the row's sampling filters), its confidence, and the log-probabilities a
committed token records. Which candidates are committed is ``rules``'.

Shapes: logits [B, Lb, V] (the active block), per-row knobs [B].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.models.transformer import log_softmax, row_sum, softmax
from dllm_jax.sampling.rules import NEG_INF, RANDOM


def inv_temperature(temperature):
    """[B] 1 / T' (T' = max(T, 1e-6)): logits are scaled as l * (1 / T') everywhere. XLA rewrites
    l / T' over a broadcast T' into that product in some fusions and not in others (an ulp apart);
    one product everywhere keeps the filters' floors and their comparisons consistent bit for bit."""
    return 1.0 / jnp.maximum(temperature, 1e-6)


def _scaled(logits, temperature, mask_id: int):
    """logits / T (T floored at 1e-6; ``inv_temperature``), the mask token at -inf: what the
    filters and the draw's distribution are defined on."""
    return (logits * inv_temperature(temperature)[:, None, None]).at[..., mask_id].set(NEG_INF)


def filter_floor(logits, temperature, top_k, top_p, min_p, mask_id: int):
    """[B, Lb]: the least ``logits / T`` a T > 0 draw may pick under the row's sampling filters
    (the kept tokens are exactly those, the mask token aside, at or above it); -inf for rows
    with no filter (0 / 1 / 0).

    All three filters act on q = softmax(logits / T) without the mask token: top_k keeps the k
    most probable; top_p keeps the smallest most-probable set whose mass (renormalised over the
    top_k set) reaches top_p; min_p keeps q >= min_p * max(q). A token must pass all three; the
    most probable token always does, and ties with the least probable kept one are kept too.
    """
    v = logits.shape[-1]
    inv = inv_temperature(temperature)[:, None, None]
    ordered = -jnp.sort(-logits.at[..., mask_id].set(NEG_INF), axis=-1)  # [B, Lb, V] raw, descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)[:, None, None]
    rank = jnp.arange(v)[None, None, :]
    in_k = rank < k
    probs = softmax(jnp.where(in_k, ordered * inv, NEG_INF), axis=-1)  # (l / T' keeps l's order)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more probable tokens
    # top_p >= 1 is off: the float32 cumsum can reach 1.0 before rank k (a dominant token over a
    # tiny tail), and ``before < 1`` would then drop tokens of the top k
    nucleus = (before < top_p[:, None, None]) | (top_p >= 1.0)[:, None, None]
    keep_sorted = in_k & (nucleus | (rank == 0))
    # top_k / top_p: the least probable kept token's logit
    count = jnp.sum(keep_sorted, axis=-1, keepdims=True)
    cut = jnp.take_along_axis(ordered, count - 1, axis=-1)[..., 0]  # [B, Lb]
    off = (top_k <= 0) & (top_p >= 1.0) & (min_p <= 0.0)
    return jnp.where(off[:, None], NEG_INF, floor_of(cut, ordered[..., 0], temperature, min_p))


def floor_of(cut, best, temperature, min_p):
    """[B, Lb] max(cut / T', best / T' + log min_p) (T' = max(T, 1e-6); the min_p term only where it
    is on) from raw logits: cut the least kept by top_k / top_p (-inf: none), best the largest.
    The one expression both ``filter_floor`` and the lean head's statistics (``head_filters.floor``)
    evaluate, so they agree bit for bit (XLA:CPU may fuse l * (1 / T') + c into one fma)."""
    inv = inv_temperature(temperature)[:, None]
    return jnp.maximum(cut * inv, best * inv + min_p_offset(min_p)[:, None])


def min_p_offset(min_p):
    """[B] log(min_p), -inf where min_p is off: min_p keeps the tokens with l / T >= max(l / T) + this."""
    return jnp.where(min_p > 0, jnp.log(jnp.maximum(min_p, 1e-38)), NEG_INF)


def restrict(scores, logits, temperature, filters, mask_id: int):
    """``scores`` [B, Lb, V] set to -inf outside each sampling row's filter set (``filter_floor``
    of ``logits``), and that floor [B, Lb] (-inf for rows at T = 0 or without a filter, whose
    scores are unchanged). The sort behind the filters runs only when some sampling row has a
    filter on."""
    top_k, top_p, min_p = filters
    active = (temperature > 0) & ((top_k > 0) | (top_p < 1.0) | (min_p > 0.0))  # [B]

    def apply(s):
        floor = jnp.where(active[:, None], filter_floor(logits, temperature, top_k, top_p, min_p, mask_id), NEG_INF)
        return jnp.where(_scaled(logits, temperature, mask_id) >= floor[..., None], s, NEG_INF), floor

    return jax.lax.cond(jnp.any(active), apply, lambda s: (s, jnp.full(s.shape[:2], NEG_INF, s.dtype)), scores)


def noise_keys(keys):
    """[B, 2] per-row keys of one step: [:, 0] the Gumbel draw, [:, 1] random remasking's noise."""
    return jax.vmap(lambda k: jax.random.split(k, 2))(keys)


def chunked_gumbel_exact() -> bool:
    """Whether ``gumbel_columns`` draws exactly ``jax.random.gumbel``'s numbers under the current JAX
    configuration: the default PRNG is threefry2x32 with partitionable bits
    (``jax_threefry_partitionable``) and Gumbel noise in the default 'low' mode. Otherwise a T > 0
    row needs the full head (``params.lean_head_ok``)."""
    return (jax.config.jax_default_prng_impl == "threefry2x32" and bool(jax.config.jax_threefry_partitionable)
            and not jax.config.jax_high_dynamic_range_gumbel)


def gumbel_columns(key, lb: int, v: int, start, width: int):
    """Columns ``start .. start + width - 1`` of ``jax.random.gumbel(key, (lb, v), jnp.float32)``,
    bit for bit, [lb, width] float32, without drawing the other columns: the lean head's T > 0 draw
    one vocabulary chunk at a time (``head.scan``).

    Under JAX's partitionable threefry (``chunked_gumbel_exact``) element (l, j) of a draw of shape
    (lb, v) depends only on the key and its flat index n = l * v + j: the threefry2x32 hash of the
    counter pair (n >> 32, n & 0xffffffff) under the key's two words, the two output words XORed
    (jax/_src/random/threefry2x32.py ``_threefry_random_bits_partitionable``, counters from
    prng.py ``iota_2x32_shape``). ``uniform`` puts the top 23 bits into the mantissa of a float in
    [1, 2), subtracts 1 and maps into [tiny, 1) (jax/_src/random/core.py ``_uniform``); 'low'-mode
    ``gumbel`` is -log(-log(u)) (``_gumbel``). This repeats those steps for the chunk's flat
    indices with the threefry primitive itself (``jax.extend.random.threefry2x32_p``). It follows
    JAX internals, so tests/test_lean_head.py pins it to ``jax.random.gumbel`` on several shapes
    (a JAX upgrade that changes the stream fails there, not silently).

    Args:
      key: one typed threefry2x32 PRNG key (vmap for a batch of keys).
      lb, v: the full draw's static shape (lb * v < 2**32: the counters' high word is 0).
      start: first column (int, may be traced); width: static number of columns.
    """
    from jax.extend.random import threefry2x32_p

    if lb * v >= 2 ** 32:
        raise NotImplementedError(f"a Gumbel draw of {lb} x {v} >= 2**32 elements")
    words = jax.random.key_data(key)  # [2] uint32
    col = jnp.asarray(start).astype(jnp.uint32) + jnp.arange(width, dtype=jnp.uint32)  # [width]
    lo = jnp.arange(lb, dtype=jnp.uint32)[:, None] * jnp.uint32(v) + col[None, :]  # [lb, width] flat indices
    bits1, bits2 = threefry2x32_p.bind(words[0], words[1], jnp.zeros_like(lo), lo)
    bits = bits1 ^ bits2
    one = np.array(1.0, np.float32).view(np.uint32)
    floats = jax.lax.bitcast_convert_type(jax.lax.shift_right_logical(bits, jnp.uint32(32 - 23)) | one,
                                          jnp.float32) - jnp.float32(1.0)
    minval, maxval = jnp.float32(np.finfo(np.float32).tiny), jnp.float32(1.0)
    uniform = jnp.maximum(minval, floats * (maxval - minval) + minval)
    return -jnp.log(-jnp.log(uniform))


def draw(logits, temperature, keys, mask_id: int, filters=None):
    """The candidate token at every block position: argmax (mask token excluded) at T = 0, a
    Gumbel-max draw under the row's filters at T > 0 (see ``propose``). Returns (x0 [B, Lb]
    int32, the filters' floor [B, Lb])."""
    b, lb, v = logits.shape
    logits = logits.astype(jnp.float32)
    t = temperature[:, None, None]
    no_floor = jnp.full((b, lb), NEG_INF, jnp.float32)  # [B, Lb]: no filter

    def noisy(logits):
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (lb, v), jnp.float32))(noise_keys(keys)[:, 0])
        scores = jnp.where(t > 0, logits + t * gumbel, logits)
        return (scores, no_floor) if filters is None else restrict(scores, logits, temperature, filters, mask_id)

    # Drawing [B, Lb, V] Gumbel noise is the costliest part of a greedy step: skip it when no
    # row samples (the rows' draws do not depend on whether a batch-mate samples).
    scores, floor = jax.lax.cond(jnp.any(temperature > 0), noisy, lambda logits: (logits, no_floor), logits)
    scores = scores.at[..., mask_id].set(NEG_INF)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32), floor


def random_conf(conf, keys, remasking):
    """``conf`` [B, Lb] with RANDOM rows' replaced by uniform noise (``remasking`` None: unchanged)."""
    if remasking is None:
        return conf
    lb = conf.shape[-1]
    uniform = jax.vmap(lambda k: jax.random.uniform(k, (lb,), jnp.float32))(noise_keys(keys)[:, 1])
    return jnp.where((remasking == RANDOM)[:, None], uniform, conf)


def propose(logits, temperature, keys, mask_id: int, remasking=None, filters=None, with_floor: bool = False):
    """Candidate token and its confidence at every block position.

    Args:
      logits: [B, Lb, V] float32.
      temperature: [B]; 0 = greedy. At T > 0 the candidate is a Gumbel-max draw from
        softmax(logits / T) (upstream's exp(l) / (-log u)^T has the same argmax; we draw the
        Gumbel noise in float32, see docs/sampling.md).
      keys: [B] PRNG keys (one per row, so a row's draw never depends on its batch-mates).
      mask_id: never proposed as a token (a committed mask would stay masked).
      remasking: [B] int32 policy codes; RANDOM rows get uniform noise for a confidence
        (LOW_CONFIDENCE and LEFTMOST rows keep the model's; LEFTMOST ranks in ``select``).
      filters: (top_k [B] int, top_p [B], min_p [B]) restricting the T > 0 draw
        (``filter_floor``); None = no filters.
      with_floor: also return the filters' floor (for ``token_logprobs``).

    Returns:
      x0 [B, Lb] int32, conf [B, Lb] float32 = softmax(logits)[x0] (or uniform noise). The
      confidence is of the unfiltered logits, as upstream's, so filters change the draw only.
      With ``with_floor``, also floor [B, Lb]: the draw's support is the tokens (the mask
      token aside) with logits / T >= floor (-inf: rows without a filter or at T = 0).
    """
    x0, floor = draw(logits, temperature, keys, mask_id, filters)
    probs = softmax(logits.astype(jnp.float32), axis=-1)  # fixed-order normaliser: batch-invariant confidence
    conf = random_conf(jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0], keys, remasking)
    return (x0, conf, floor) if with_floor else (x0, conf)


def processed_logprobs(drawn, x0, k: int, mask_id: int, temperature, floor):
    """'processed' logprobs at T > 0: of x0 and the top k under the distribution the Gumbel-max
    draw sampled from, log-softmax of ``drawn / T`` over the row's filter set (``floor``), the mask
    token excluded. Returns (logprob [B, Lb], top_ids [B, Lb, k] int32, top_logprobs [B, Lb, k])."""
    scaled = _scaled(drawn.astype(jnp.float32), temperature, mask_id)
    logp = log_softmax(jnp.where(scaled >= floor[..., None], scaled, NEG_INF))  # over the support
    top_lp, top_ids = jax.lax.top_k(logp, k)
    return jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0], top_ids.astype(jnp.int32), top_lp


def token_logprobs(logits, x0, k: int, mask_id: int, *, processed=None, drawn=None, temperature=None,
                   floor=None):
    """The log-probability of x0 and the k most probable tokens of the same distribution.

    'raw' rows (every row when ``processed`` is None): log-softmax of the model's own logits
    (unfiltered, untempered; the normalisation is the model's full softmax). 'processed' rows
    at T > 0: the distribution the Gumbel-max draw sampled x0 from, i.e. log-softmax of
    ``drawn / T`` over the tokens the row's filters keep, the mask token excluded (``propose``
    never draws it). At T = 0 a processed row is raw. The mask token is never a candidate, so
    it is left out of the top k: at T = 0 a committed token is its own top-1.

    Args:
      logits: [B, Lb, V] the model's logits (after CFG).
      processed: [B] bool rows in 'processed' mode (None: every row raw). The tempered pass
        over the vocabulary runs only in steps where such a row samples.
      drawn: [B, Lb, V] the logits ``propose`` drew from (``logits`` but for dInfer credit
        fusion); temperature: [B]; floor: [B, Lb] ``propose``'s filter floor (``with_floor``):
        the support is rebuilt from it, without running the filters' sort again.

    Returns (logprob [B, Lb], top_ids [B, Lb, k] int32, top_logprobs [B, Lb, k]).
    """
    logp = log_softmax(logits)
    if processed is not None:
        use = processed & (temperature > 0)  # [B]

        def of_draw(logp):
            scaled = _scaled(drawn.astype(jnp.float32), temperature, mask_id)
            drawn_logp = log_softmax(jnp.where(scaled >= floor[..., None], scaled, NEG_INF))  # over the support
            return jnp.where(use[:, None, None], drawn_logp, logp)

        logp = jax.lax.cond(jnp.any(use), of_draw, lambda logp: logp, logp)
    chosen = jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(logp.at[..., mask_id].set(NEG_INF), k)
    return chosen, top_ids.astype(jnp.int32), top_lp


def entropy(logits, mask_id: int):
    """[B, Lb] entropy (nats) of each position's predictive distribution: softmax of the model's
    logits, untempered and unfiltered, the mask token excluded (it is never proposed). The
    EB-Sampler's error proxy; a fixed-order sum, so a row's value does not depend on its batch."""
    logp = log_softmax(logits.astype(jnp.float32).at[..., mask_id].set(NEG_INF))
    p = jnp.exp(logp)
    return -row_sum(jnp.where(p > 0, p * logp, 0.0))[..., 0]
