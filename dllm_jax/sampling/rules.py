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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dllm_jax.models.transformer import log_softmax, softmax

FIXED, THRESHOLD, FACTOR, HIERARCHY, CREDIT, NEMOTRON = range(6)

NEG_INF = -jnp.inf

# dInfer defaults (as the PyTorch server configured its decoders)
HIERARCHY_LOW_THRESHOLD = 0.4
CREDIT_ALPHA = 0.7
CREDIT_DECAY = 0.8
CREDIT_BOOST = 0.2
# NeMo-RL static-block acceptance constants
NEMOTRON_HIGH = 0.95
NEMOTRON_FLOOR = 0.5


def filter_mask(logits, temperature, top_k, top_p, min_p, mask_id: int):
    """[B, Lb, V] bool: the tokens a T > 0 draw may pick under the row's sampling filters.

    All three act on q = softmax(logits / T) without the mask token: top_k keeps the k most
    probable; top_p keeps the smallest most-probable set whose mass (renormalised over the
    top_k set) reaches top_p; min_p keeps q >= min_p * max(q). A token must pass all three;
    the most probable token always does. Rows with no filter (0 / 1 / 0) keep everything.
    """
    v = logits.shape[-1]
    t = jnp.maximum(temperature, 1e-6)[:, None, None]
    scaled = (logits / t).at[..., mask_id].set(NEG_INF)
    ordered = -jnp.sort(-scaled, axis=-1)  # [B, Lb, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)[:, None, None]
    rank = jnp.arange(v)[None, None, :]
    in_k = rank < k
    probs = softmax(jnp.where(in_k, ordered, NEG_INF), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more probable tokens
    keep_sorted = in_k & ((before < top_p[:, None, None]) | (rank == 0))
    # threshold value = the least probable kept token (ties with it are kept too)
    count = jnp.sum(keep_sorted, axis=-1, keepdims=True)
    cut = jnp.take_along_axis(ordered, count - 1, axis=-1)
    keep = scaled >= cut
    log_top = ordered[..., :1]
    floor = jnp.where(min_p > 0, jnp.log(jnp.maximum(min_p, 1e-38)), NEG_INF)[:, None, None]
    keep &= scaled >= log_top + floor
    off = (top_k <= 0) & (top_p >= 1.0) & (min_p <= 0.0)
    return keep | off[:, None, None]


def propose(logits, temperature, keys, mask_id: int, random_remask=None, filters=None):
    """Candidate token and its confidence at every block position.

    Args:
      logits: [B, Lb, V] float32.
      temperature: [B]; 0 = greedy. At T > 0 the candidate is a Gumbel-max draw from
        softmax(logits / T) (upstream's exp(l) / (-log u)^T has the same argmax; we draw the
        Gumbel noise in float32, see docs/sampling.md).
      keys: [B] PRNG keys (one per row, so a row's draw never depends on its batch-mates).
      mask_id: never proposed as a token (a committed mask would stay masked).
      random_remask: [B] bool; True = confidence is uniform noise ('random' remasking).
      filters: (top_k [B] int, top_p [B], min_p [B]) restricting the T > 0 draw
        (``filter_mask``); None = no filters.

    Returns:
      x0 [B, Lb] int32, conf [B, Lb] float32 = softmax(logits)[x0] (or uniform noise). The
      confidence is of the unfiltered logits, as upstream's, so filters change the draw only.
    """
    b, lb, v = logits.shape
    logits = logits.astype(jnp.float32)
    noise_keys = jax.vmap(lambda k: jax.random.split(k, 2))(keys)  # [B, 2]
    t = temperature[:, None, None]

    def noisy(logits):
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (lb, v), jnp.float32))(noise_keys[:, 0])
        scores = jnp.where(t > 0, logits + t * gumbel, logits)
        if filters is None:
            return scores
        top_k, top_p, min_p = filters
        active = (temperature > 0) & ((top_k > 0) | (top_p < 1.0) | (min_p > 0.0))
        # the sort behind the filters runs only when some sampling row has a filter
        return jax.lax.cond(
            jnp.any(active),
            lambda s: jnp.where(filter_mask(logits, temperature, top_k, top_p, min_p, mask_id) | ~active[:, None, None],
                                s, NEG_INF),
            lambda s: s, scores)

    # Drawing [B, Lb, V] Gumbel noise is the costliest part of a greedy step: skip it when no
    # row samples (the rows' draws do not depend on whether a batch-mate samples).
    scores = jax.lax.cond(jnp.any(temperature > 0), noisy, lambda logits: logits, logits)
    scores = scores.at[..., mask_id].set(NEG_INF)
    x0 = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    probs = softmax(logits, axis=-1)  # fixed-order normaliser: batch-invariant confidence
    conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    if random_remask is not None:
        uniform = jax.vmap(lambda k: jax.random.uniform(k, (lb,), jnp.float32))(noise_keys[:, 1])
        conf = jnp.where(random_remask[:, None], uniform, conf)
    return x0, conf


def token_logprobs(logits, x0, k: int, mask_id: int):
    """log-softmax of the (unfiltered, untempered) logits at x0, and its top k tokens.

    The mask token is never a candidate, so it is left out of the top k (the normalisation
    is the model's full softmax): at T = 0 a committed token is its own top-1.

    Returns (logprob [B, Lb], top_ids [B, Lb, k] int32, top_logprobs [B, Lb, k]).
    """
    logp = log_softmax(logits)
    chosen = jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(logp.at[..., mask_id].set(NEG_INF), k)
    return chosen, top_ids.astype(jnp.int32), top_lp


def ranks(conf, masked):
    """Rank of each masked position by confidence (0 = most confident); unmasked -> Lb."""
    lb = conf.shape[-1]
    score = jnp.where(masked, conf, NEG_INF)
    order = jnp.argsort(-score, axis=-1, stable=True)  # positions by descending confidence
    rank = jnp.argsort(order, axis=-1, stable=True)
    return jnp.where(masked, rank, lb)


def _sorted_conf(conf, masked):
    return -jnp.sort(-jnp.where(masked, conf, NEG_INF), axis=-1)  # [B, Lb] descending


def transfer_fixed(conf, masked, k):
    """The k[b] most confident masked positions of each row."""
    return masked & (ranks(conf, masked) < k[:, None])


def transfer_threshold(conf, masked, threshold):
    rank = ranks(conf, masked)
    return masked & ((rank == 0) | (conf >= threshold[:, None]))


def transfer_factor(conf, masked, factor):
    """Accept ranks 0..n-1 where n = 1 + the leading run of ranks r >= 1 with c_r >= 1 - f/(r+2)."""
    lb = conf.shape[-1]
    c = _sorted_conf(conf, masked)
    r = jnp.arange(lb)
    ok = (c >= 1.0 - factor[:, None] / (r + 2.0)) & jnp.isfinite(c)
    ok = ok.at[:, 0].set(True)
    count = jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1)
    return masked & (ranks(conf, masked) < count[:, None])


def transfer_nemotron(conf, masked, factor):
    rank = ranks(conf, masked)
    above = (conf >= 1.0 - factor[:, None] / (rank + 2.0)) & (conf >= NEMOTRON_FLOOR)
    return masked & ((rank == 0) | (conf >= NEMOTRON_HIGH) | above)


def transfer_hierarchy(conf, masked, threshold, low_threshold=HIERARCHY_LOW_THRESHOLD):
    """dInfer's hierarchy decoder on one block (see module docstring)."""
    lb = conf.shape[-1]
    start = masked & ~jnp.pad(masked, ((0, 0), (1, 0)))[:, :lb]  # first position of each run
    run = jnp.cumsum(start, axis=-1)  # run id (valid where masked)
    same = masked[:, :, None] & masked[:, None, :] & (run[:, :, None] == run[:, None, :])  # [B, Lb, Lb]
    score = jnp.where(masked, conf, NEG_INF)
    run_max = jnp.max(jnp.where(same, score[:, None, :], NEG_INF), axis=-1)
    # the first position attaining its run's maximum
    idx = jnp.arange(lb)
    first_best = jnp.min(jnp.where(same & (score[:, None, :] == run_max[:, :, None]), idx[None, None, :], lb), axis=-1)
    run_best = masked & (first_best == idx[None, :]) & (conf >= low_threshold)
    return masked & ((ranks(conf, masked) == 0) | (conf >= threshold[:, None]) | run_best)


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


def select(rule_static, rule, conf, masked, k, threshold, factor):
    """Dispatch: ``rule_static`` fixes the family (HIERARCHY/CREDIT/NEMOTRON); otherwise the
    per-row ``rule`` array picks FIXED, THRESHOLD or FACTOR for each row."""
    if rule_static == HIERARCHY:
        return transfer_hierarchy(conf, masked, threshold)
    if rule_static in (CREDIT, THRESHOLD):
        return transfer_threshold(conf, masked, threshold)
    if rule_static == NEMOTRON:
        return transfer_nemotron(conf, masked, factor)
    fixed = transfer_fixed(conf, masked, k)
    thresh = transfer_threshold(conf, masked, threshold)
    fact = transfer_factor(conf, masked, factor)
    r = rule[:, None]
    return jnp.where(r == FIXED, fixed, jnp.where(r == THRESHOLD, thresh, fact))


def schedule(n_masked, steps: int):
    """LLaDA's get_num_transfer_tokens: n masks over ``steps`` steps, the first n % steps
    steps take one more. n_masked: [B] -> [B, steps] int32."""
    base = n_masked // steps
    rem = n_masked % steps
    return (base[:, None] + (jnp.arange(steps)[None, :] < rem[:, None])).astype(jnp.int32)
