"""Per-step decisions on one block: propose tokens, score them, choose which to commit.

Everything here works on the active block only: logits [B, Lb, V], a mask of still-masked
positions [B, Lb], and per-row knobs [B]. No Python loop runs over rows or positions;
"commit the k best of each row" is sort -> rank -> compare.

Transfer rules (``rule`` codes, per row):

* FIXED: the static schedule; the ``k`` most confident masked positions (LLaDA, Fast-dLLM).
* THRESHOLD: the most confident masked position, plus every masked position whose
  confidence is >= ``threshold`` (Fast-dLLM ``get_transfer_index``).
* FACTOR: sort by confidence; rank r (0-based) is accepted while its confidence is
  >= 1 - factor / (r + 2); at least one (Fast-dLLM ``get_transfer_index_dynamic``).
* HIERARCHY (dInfer): per contiguous run of masked positions, its most confident one when
  above ``low_threshold``; plus every position above ``threshold``; plus the global top-1.
* CREDIT (dInfer): THRESHOLD on logits fused with a per-block credit (see ``credit_fuse``).
* NEMOTRON: NeMo-RL's ``get_transfer_index_optimized``: rank 0 always, rank r >= 1 iff
  conf >= 0.95 or (conf >= 1 - factor / (r + 2) and conf >= 0.5).

Selection policies (``remasking`` codes, per row): how the masked positions are *ranked*.

* LOW_CONFIDENCE: by the model's confidence (LLaDA's default).
* RANDOM: by uniform noise (the noise also stands in for the confidence the rules compare).
* LEFTMOST: by position, leftmost first; the rules' tests keep the model's real confidence, and
  the committed set is cut to its leading run in that order (``leading_run``), so a row commits
  a left-to-right prefix of its block's masks every step (docs/sampling.md, "Selection policies").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dllm_jax.models.transformer import log_softmax, softmax

FIXED, THRESHOLD, FACTOR, HIERARCHY, CREDIT, NEMOTRON = range(6)
LOW_CONFIDENCE, RANDOM, LEFTMOST = range(3)
# ``remasking`` names (LLaDA upstream's parameter) -> per-row policy codes
REMASKING = {"low_confidence": LOW_CONFIDENCE, "random": RANDOM, "leftmost": LEFTMOST}

NEG_INF = -jnp.inf

# dInfer defaults (as the PyTorch server configured its decoders)
HIERARCHY_LOW_THRESHOLD = 0.4
CREDIT_ALPHA = 0.7
CREDIT_DECAY = 0.8
CREDIT_BOOST = 0.2
# NeMo-RL static-block acceptance constants
NEMOTRON_HIGH = 0.95
NEMOTRON_FLOOR = 0.5


def _scaled(logits, temperature, mask_id: int):
    """logits / T (T floored at 1e-6), the mask token at -inf: what the filters and the draw's
    distribution are defined on."""
    return (logits / jnp.maximum(temperature, 1e-6)[:, None, None]).at[..., mask_id].set(NEG_INF)


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
    scaled = _scaled(logits, temperature, mask_id)
    ordered = -jnp.sort(-scaled, axis=-1)  # [B, Lb, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)[:, None, None]
    rank = jnp.arange(v)[None, None, :]
    in_k = rank < k
    probs = softmax(jnp.where(in_k, ordered, NEG_INF), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more probable tokens
    keep_sorted = in_k & ((before < top_p[:, None, None]) | (rank == 0))
    # top_k / top_p: the least probable kept token's value
    count = jnp.sum(keep_sorted, axis=-1, keepdims=True)
    cut = jnp.take_along_axis(ordered, count - 1, axis=-1)[..., 0]  # [B, Lb]
    min_p_floor = jnp.where(min_p > 0, jnp.log(jnp.maximum(min_p, 1e-38)), NEG_INF)[:, None]
    off = (top_k <= 0) & (top_p >= 1.0) & (min_p <= 0.0)
    return jnp.where(off[:, None], NEG_INF, jnp.maximum(cut, ordered[..., 0] + min_p_floor))


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
    b, lb, v = logits.shape
    logits = logits.astype(jnp.float32)
    noise_keys = jax.vmap(lambda k: jax.random.split(k, 2))(keys)  # [B, 2]
    t = temperature[:, None, None]
    no_floor = jnp.full((b, lb), NEG_INF, jnp.float32)  # [B, Lb]: no filter

    def noisy(logits):
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (lb, v), jnp.float32))(noise_keys[:, 0])
        scores = jnp.where(t > 0, logits + t * gumbel, logits)
        return (scores, no_floor) if filters is None else restrict(scores, logits, temperature, filters, mask_id)

    # Drawing [B, Lb, V] Gumbel noise is the costliest part of a greedy step: skip it when no
    # row samples (the rows' draws do not depend on whether a batch-mate samples).
    scores, floor = jax.lax.cond(jnp.any(temperature > 0), noisy, lambda logits: (logits, no_floor), logits)
    scores = scores.at[..., mask_id].set(NEG_INF)
    x0 = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    probs = softmax(logits, axis=-1)  # fixed-order normaliser: batch-invariant confidence
    conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    if remasking is not None:
        uniform = jax.vmap(lambda k: jax.random.uniform(k, (lb,), jnp.float32))(noise_keys[:, 1])
        conf = jnp.where((remasking == RANDOM)[:, None], uniform, conf)
    return (x0, conf, floor) if with_floor else (x0, conf)


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


def ranks(score, masked):
    """Rank of each masked position by ``score`` (0 = highest; ties: the leftmost first); unmasked -> Lb."""
    lb = score.shape[-1]
    score = jnp.where(masked, score, NEG_INF)
    order = jnp.argsort(-score, axis=-1, stable=True)  # positions by descending score
    rank = jnp.argsort(order, axis=-1, stable=True)
    return jnp.where(masked, rank, lb)


def ranking_score(conf, remasking):
    """What ``ranks`` orders by: the confidence, or -position for LEFTMOST rows (leftmost first)."""
    position = jnp.arange(conf.shape[-1], dtype=conf.dtype)
    return jnp.where((remasking == LEFTMOST)[:, None], -position[None, :], conf)


def leading_run(sel, masked, rank):
    """``sel`` cut to its leading run in rank order: the positions ranked before the first masked
    position ``sel`` leaves out (a LEFTMOST row's commits are a left-to-right prefix of its masks)."""
    lb = sel.shape[-1]
    first_out = jnp.min(jnp.where(masked & ~sel, rank, lb), axis=-1)  # [B]
    return sel & (rank < first_out[:, None])


def _by_rank(conf, masked, rank):
    """[B, Lb]: at r, the confidence of the masked position of rank r (-inf past the masked count)."""
    b, lb = conf.shape
    out = jnp.full((b, lb), NEG_INF, conf.dtype)
    return out.at[jnp.arange(b)[:, None], rank].set(jnp.where(masked, conf, NEG_INF), mode="drop")


# Every rule below takes ``rank`` (``ranks`` of the row's ranking score; default: of ``conf``) for
# its order and compares the confidence ``conf`` in its tests.

def transfer_fixed(conf, masked, k, rank=None):
    """The k[b] best-ranked (most confident) masked positions of each row."""
    rank = ranks(conf, masked) if rank is None else rank
    return masked & (rank < k[:, None])


def transfer_threshold(conf, masked, threshold, rank=None):
    rank = ranks(conf, masked) if rank is None else rank
    return masked & ((rank == 0) | (conf >= threshold[:, None]))


def transfer_factor(conf, masked, factor, rank=None):
    """Accept ranks 0..n-1 where n = 1 + the leading run of ranks r >= 1 with c_r >= 1 - f/(r+2)."""
    lb = conf.shape[-1]
    rank = ranks(conf, masked) if rank is None else rank
    c = _by_rank(conf, masked, rank)  # [B, Lb] by rank (descending under confidence ranking)
    r = jnp.arange(lb)
    ok = (c >= 1.0 - factor[:, None] / (r + 2.0)) & jnp.isfinite(c)
    ok = ok.at[:, 0].set(True)
    count = jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1)
    return masked & (rank < count[:, None])


def transfer_nemotron(conf, masked, factor, rank=None):
    rank = ranks(conf, masked) if rank is None else rank
    above = (conf >= 1.0 - factor[:, None] / (rank + 2.0)) & (conf >= NEMOTRON_FLOOR)
    return masked & ((rank == 0) | (conf >= NEMOTRON_HIGH) | above)


def transfer_hierarchy(conf, masked, threshold, low_threshold=HIERARCHY_LOW_THRESHOLD, rank=None):
    """dInfer's hierarchy decoder on one block (see module docstring)."""
    lb = conf.shape[-1]
    rank = ranks(conf, masked) if rank is None else rank
    start = masked & ~jnp.pad(masked, ((0, 0), (1, 0)))[:, :lb]  # first position of each run
    run = jnp.cumsum(start, axis=-1)  # run id (valid where masked)
    same = masked[:, :, None] & masked[:, None, :] & (run[:, :, None] == run[:, None, :])  # [B, Lb, Lb]
    score = jnp.where(masked, conf, NEG_INF)
    run_max = jnp.max(jnp.where(same, score[:, None, :], NEG_INF), axis=-1)
    # the first position attaining its run's maximum
    idx = jnp.arange(lb)
    first_best = jnp.min(jnp.where(same & (score[:, None, :] == run_max[:, :, None]), idx[None, None, :], lb), axis=-1)
    run_best = masked & (first_best == idx[None, :]) & (conf >= low_threshold)
    return masked & ((rank == 0) | (conf >= threshold[:, None]) | run_best)


def credit_fuse(logits, credit, masked, first_iter):
    """dInfer credit decoding: decay, accumulate p_top1^gamma at each masked position's top-1,
    fuse ``logits + alpha * log(1 + credit)``. credit: [B, Lb, V] float32 (reset per block).
    """
    credit = jnp.where(first_iter, credit, credit * CREDIT_DECAY)
    probs = softmax(logits)
    top = jnp.argmax(probs, axis=-1)
    boost = jnp.max(probs, axis=-1) ** CREDIT_BOOST * masked
    credit = credit + jax.nn.one_hot(top, logits.shape[-1], dtype=jnp.float32) * boost[..., None]
    return logits + CREDIT_ALPHA * jnp.log1p(credit), credit


def select(rule_static, rule, conf, masked, k, threshold, factor, remasking=None):
    """Dispatch: ``rule_static`` fixes the family (HIERARCHY/CREDIT/NEMOTRON); otherwise the
    per-row ``rule`` array picks FIXED, THRESHOLD or FACTOR for each row. ``remasking`` [B]
    (policy codes; None = by confidence): LEFTMOST rows rank by position and keep only the
    leading run of what their rule accepts (see the module docstring)."""
    score = conf if remasking is None else ranking_score(conf, remasking)
    rank = ranks(score, masked)  # [B, Lb]
    if rule_static == HIERARCHY:
        sel = transfer_hierarchy(conf, masked, threshold, rank=rank)
    elif rule_static in (CREDIT, THRESHOLD):
        sel = transfer_threshold(conf, masked, threshold, rank=rank)
    elif rule_static == NEMOTRON:
        sel = transfer_nemotron(conf, masked, factor, rank=rank)
    else:
        fixed = transfer_fixed(conf, masked, k, rank=rank)
        thresh = transfer_threshold(conf, masked, threshold, rank=rank)
        fact = transfer_factor(conf, masked, factor, rank=rank)
        r = rule[:, None]
        sel = jnp.where(r == FIXED, fixed, jnp.where(r == THRESHOLD, thresh, fact))
    if remasking is None:
        return sel
    return jnp.where((remasking == LEFTMOST)[:, None], leading_run(sel, masked, rank), sel)


def schedule(n_masked, steps: int):
    """LLaDA's get_num_transfer_tokens: n masks over ``steps`` steps, the first n % steps
    steps take one more. n_masked: [B] -> [B, steps] int32."""
    base = n_masked // steps
    rem = n_masked % steps
    return (base[:, None] + (jnp.arange(steps)[None, :] < rem[:, None])).astype(jnp.int32)
