"""A plain Python-loop reference of every sampling algorithm (one prompt at a time).

Written the way the upstream PyTorch loops are: Python loops over blocks and steps, per-step
sorting with NumPy, no padding, no batching, no jit of the loop. It shares only the model
forward (``Transformer.hidden`` / ``head``) and the per-row RNG derivation with the library,
so tests can check the jitted, batched, bucketed programs against it on random settings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax.sampling import rules
from dllm_jax.sampling.params import ALGORITHMS, SamplingParams


class Forward:
    """Batch-1 forwards of a model: full canvas, or a window against a KV cache.

    Each forward is one jitted model call (compiled per shape); the sampling loop around
    it stays plain Python.
    """

    def __init__(self, model):
        graphdef, self.params = model.graphdef, model.params

        @jax.jit
        def full(params, tokens):
            module = nnx.merge(graphdef, params)
            n = tokens.shape[1]
            return module.hidden(tokens, jnp.arange(n)[None], jnp.ones((1, n, n), bool), return_kv=True)

        @jax.jit
        def window(params, tokens, pos, mask, cache, start, write):
            module = nnx.merge(graphdef, params)
            return module.hidden(tokens, pos, mask, cache=cache, write_start=start, write_mask=write, return_kv=True)

        self._full, self._window = full, window
        self._head = jax.jit(lambda params, h: nnx.merge(graphdef, params).head(h))

    def full(self, tokens):
        h, kv = self._full(self.params, jnp.asarray(tokens, jnp.int32)[None])
        return h[0], kv

    def window(self, tokens, start, cache, write_from, key_limit=None, hide_prefix=0, write_to=None):
        t = jnp.asarray(tokens, jnp.int32)[None]
        n, s = t.shape[1], cache.k[0].shape[2]
        pos = np.arange(start, start + n)
        mask = np.ones((n, s), bool)
        if key_limit is not None:
            mask &= np.arange(s)[None, :] < key_limit
        if hide_prefix:
            mask &= ~((np.arange(n)[:, None] < hide_prefix) & (np.arange(s)[None, :] >= start + hide_prefix))
        h, kv = self._window(self.params, t, jnp.asarray(pos)[None], jnp.asarray(mask)[None], cache,
                             jnp.array([start]), jnp.asarray((pos >= write_from) & (pos < (write_to or pos[-1] + 1)))[None])
        return h[0], kv

    def logits(self, h):
        return np.asarray(self._head(self.params, h), np.float64)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def propose(logits, temperature, rng_key, nfe, mask_id, remasking, top_k=0, top_p=1.0, min_p=0.0):
    """x0, confidence and the drawn-from log-distribution for one row: same draws as the library
    (fold_in(key, nfe)). ``drawn_logp`` [Lb, V] is log-softmax(logits / T) over the filter set
    without the mask token (the 'processed' logprobs at T > 0); None at T = 0."""
    lb, v = logits.shape
    k_gumbel, k_uniform = jax.random.split(jax.random.fold_in(rng_key, nfe), 2)
    scores, drawn_logp = logits.copy(), None
    if temperature > 0:
        keep = np.stack([filter_set(row, temperature, top_k, top_p, min_p, mask_id) for row in logits])
        scores = logits + temperature * np.asarray(jax.random.gumbel(k_gumbel, (lb, v), jnp.float32), np.float64)
        scores[~keep] = -np.inf
        drawn_logp = log_softmax(np.where(keep, logits / temperature, -np.inf))
    scores[:, mask_id] = -np.inf
    x0 = scores.argmax(-1)
    conf = _softmax(logits)[np.arange(lb), x0]
    if remasking == "random":
        conf = np.asarray(jax.random.uniform(k_uniform, (lb,), jnp.float32), np.float64)
    return x0, conf, drawn_logp


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def filter_set(logits, temperature, top_k=0, top_p=1.0, min_p=0.0, mask_id=None):
    """[V] bool: the tokens a T > 0 draw may pick (docs/sampling.md "Sampling filters"): the top_k
    most probable of q = softmax(logits / T) without the mask token, the smallest most-probable
    set whose mass (renormalised over the top_k set) reaches top_p, and q >= min_p * max q."""
    x = np.asarray(logits, np.float64) / temperature
    if mask_id is not None:
        x = np.where(np.arange(len(x)) == mask_id, -np.inf, x)
    q = np.exp(x - x.max())
    q /= q.sum()
    order = np.argsort(-q, kind="stable")
    in_k = order[:top_k if top_k > 0 else len(q)]
    mass = q[in_k] / q[in_k].sum()
    before = np.cumsum(mass) - mass
    keep = np.zeros(len(q), bool)
    keep[in_k[(before < top_p) | (np.arange(len(in_k)) == 0)]] = True
    keep &= q >= min_p * q.max()
    keep[q == 0] = False
    return keep


def entropy(logits, mask_id):
    """Entropy of softmax(logits) without the mask token, per position (float64)."""
    logits = np.array(logits, np.float64)
    logits[..., mask_id] = -np.inf
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    p = np.exp(logp)
    return -(p * np.where(p > 0, logp, 0.0)).sum(-1)


def _entropy_bounded(cand, entropy, bound):
    """EB-Sampler as its paper states it: the longest prefix of ``cand`` (in rank order) whose
    summed entropy minus its largest entropy is <= bound; the first always."""
    out, total, largest = [], 0.0, 0.0
    for i in cand:
        if out and (total + entropy[i]) - max(largest, entropy[i]) > bound:
            break
        out.append(i)
        total, largest = total + entropy[i], max(largest, entropy[i])
    return out


def choose(rule, conf, masked, *, k=0, threshold=1.0, factor=1.0, low=rules.HIERARCHY_LOW_THRESHOLD,
           leftmost=False, entropy=None, bound=0.0):
    """Upstream-style selection with explicit sorting (indices of positions to commit)."""
    if leftmost and rule == rules.ENTROPY_BOUND:  # positions left to right
        return _entropy_bounded([i for i in range(len(masked)) if masked[i]], entropy, bound)
    if leftmost:
        return _choose_leftmost(rule, conf, masked, k=k, threshold=threshold, factor=factor, low=low)
    cand = [i for i in np.argsort(-np.where(masked, conf, -np.inf), kind="stable") if masked[i]]
    if not cand:
        return []
    if rule == rules.ENTROPY_BOUND:
        return _entropy_bounded(cand, entropy, bound)
    if rule == rules.FIXED:
        return cand[:k]
    if rule in (rules.THRESHOLD, rules.CREDIT):
        return [cand[0]] + [i for i in cand[1:] if conf[i] >= threshold]
    if rule == rules.FACTOR:
        n = 1
        while n < len(cand) and conf[cand[n]] >= 1 - factor / (n + 2):
            n += 1
        return cand[:n]
    if rule == rules.NEMOTRON:
        return [cand[0]] + [i for r, i in enumerate(cand) if r >= 1 and (
            conf[i] >= rules.NEMOTRON_HIGH or (conf[i] >= 1 - factor / (r + 2) and conf[i] >= rules.NEMOTRON_FLOOR))]
    if rule == rules.HIERARCHY:
        chosen = {cand[0]} | {i for i in cand if conf[i] >= threshold}
        i = 0
        while i < len(masked):
            if masked[i]:
                j = i
                while j < len(masked) and masked[j]:
                    j += 1
                best = max(range(i, j), key=lambda p: (conf[p], -p))
                if conf[best] >= low:
                    chosen.add(best)
                i = j
            else:
                i += 1
        return sorted(chosen)
    raise ValueError(rule)


def _choose_leftmost(rule, conf, masked, *, k, threshold, factor, low):
    """The 'leftmost' policy as documented (docs/sampling.md, "Selection policies"): walk the
    masked positions left to right and commit while the rule accepts the position at that rank
    (the first always, except for the fixed schedule), stopping at the first it refuses."""
    cand = [i for i in range(len(masked)) if masked[i]]
    if rule == rules.FIXED:
        return cand[:k]

    def run_best(i):  # hierarchy: i is the (first) most confident position of its run of masks
        lo, hi = i, i
        while lo > 0 and masked[lo - 1]:
            lo -= 1
        while hi + 1 < len(masked) and masked[hi + 1]:
            hi += 1
        return max(range(lo, hi + 1), key=lambda p: (conf[p], -p)) == i

    def accepts(r, i):
        c = conf[i]
        if rule in (rules.THRESHOLD, rules.CREDIT):
            return c >= threshold
        if rule == rules.FACTOR:
            return c >= 1 - factor / (r + 2)
        if rule == rules.NEMOTRON:
            return c >= rules.NEMOTRON_HIGH or (c >= 1 - factor / (r + 2) and c >= rules.NEMOTRON_FLOOR)
        if rule == rules.HIERARCHY:
            return c >= threshold or (run_best(i) and c >= low)
        raise ValueError(rule)

    out = cand[:1]
    for r, i in enumerate(cand[1:], start=1):
        if not accepts(r, i):
            break
        out.append(i)
    return out


def reference_generate(model, prompt, params: SamplingParams, fwd: Forward | None = None,
                       logprobs: dict | None = None):
    """Returns (generated tokens [gen_length], nfe, commit_step [gen_length]).

    ``logprobs``: a dict to fill (block algorithms) with each committed token's log-probability
    at its commit step, 'raw' and 'processed' [gen_length] (0 where never committed)."""
    p = params.resolve(model.family)
    fwd = fwd or Forward(model)
    if ALGORITHMS[p.algorithm].cache == "sliding":
        return _reference_sliding(model, prompt, p, fwd, logprobs)
    algo = ALGORITHMS[p.algorithm]
    mask_id = model.mask_token_id
    rule = algo.rule if algo.rule is not None and p.entropy_bound is None else p.rule
    plen, g, lb = len(prompt), p.gen_length, p.block_length
    x = np.array(list(prompt) + [mask_id] * g)
    spb = p.steps // (g // lb)
    key = jnp.array([p.seed >> 32, p.seed & 0xFFFFFFFF], jnp.uint32)
    shift = 1 if p.shift_logits else 0
    stops = p.stop_token_ids if p.stop_token_ids is not None else model.stop_token_ids
    nfe, commit = 0, np.full(g, -1)
    if logprobs is not None:
        logprobs.update(raw=np.zeros(g), processed=np.zeros(g))
    for b in range(g // lb):
        s, e = plen + b * lb, plen + (b + 1) * lb
        n = int((x[s:e] == mask_id).sum())
        sched = [n // spb + (i < n % spb) for i in range(spb)]
        credit = np.zeros((lb, model.spec.vocab))
        cache, i = None, 0
        while True:
            masked = x[s:e] == mask_id
            if algo.cache == "none":
                if algo.run_empty_steps and rule == rules.FIXED:
                    if i >= spb:
                        break
                elif not masked.any():
                    break
                h, _ = fwd.full(x)
                hb = h[s - shift:e - shift]
                if p.cfg_scale > 0:
                    un = x.copy()
                    un[:plen] = mask_id
                    hu, _ = fwd.full(un)
                    cond, unc = fwd.logits(hb), fwd.logits(hu[s - shift:e - shift])
                    logits = unc + (p.cfg_scale + 1) * (cond - unc)
                else:
                    logits = fwd.logits(hb)
            elif i == 0:
                h, cache = fwd.full(x)
                logits = fwd.logits(h[s - shift:e - shift])
            else:
                if i > 1 and not masked.any():
                    break
                if algo.cache == "dual":
                    h, cache = fwd.window(x[s - shift:e], s - shift, cache, write_from=s)
                    logits = fwd.logits(h[:lb])
                else:
                    start = plen - shift
                    h, _ = fwd.window(x[start:], start, cache, write_from=s)
                    logits = fwd.logits(h[s - shift - start:e - shift - start])
            raw_logp = log_softmax(logits)  # the model's own (before credit fusion)
            if algo.rule == rules.CREDIT:
                if i > 0:
                    credit *= rules.CREDIT_DECAY
                probs = _softmax(logits)
                top = probs.argmax(-1)
                credit[np.arange(lb), top] += probs.max(-1) ** rules.CREDIT_BOOST * masked
                logits = logits + rules.CREDIT_ALPHA * np.log1p(credit)
            x0, conf, drawn_logp = propose(logits, p.temperature, key, nfe, mask_id, p.remasking,
                                           p.top_k, p.top_p, p.min_p)
            chosen = choose(rule, conf, masked, k=sched[min(i, spb - 1)], threshold=p.threshold or 1.0,
                            factor=p.factor or 1.0, leftmost=p.remasking == "leftmost",
                            entropy=entropy(logits, mask_id), bound=p.entropy_bound or 0.0)
            nfe += 1
            for j in chosen:
                x[s + j] = x0[j]
                commit[s + j - plen] = nfe
                if logprobs is not None:
                    logprobs["raw"][s + j - plen] = raw_logp[j, x0[j]]
                    logprobs["processed"][s + j - plen] = (raw_logp if drawn_logp is None else drawn_logp)[j, x0[j]]
            i += 1
        if p.early_stop and np.isin(x[s:e], stops).any():
            x[e:] = model.config.eos_token_id
            break
    return x[plen:], nfe, commit


def _reference_sliding(model, prompt, p, fwd, logprobs=None):
    """NeMo-RL generate_static_block_size, one prompt, written as its upstream loop (``logprobs``:
    filled as ``reference_generate``'s; greedy, so 'processed' is 'raw')."""
    mask_id, plen, g, lb = model.mask_token_id, len(prompt), p.gen_length, p.block_length
    stops = p.stop_token_ids if p.stop_token_ids is not None else (model.config.eos_token_id,)
    x = np.array(list(prompt) + [mask_id] * (g + 2 * lb))
    total = len(x)
    h, kv = fwd.full(x[:plen])
    cache = type(kv)(*(tuple(jnp.zeros(a.shape[:2] + (total,) + a.shape[3:], a.dtype).at[:, :, :plen].set(a)
                             for a in layers) for layers in kv))
    ctx = h[plen - 1]
    s, prefix, nfe = plen, 0, 0
    mblock = np.ones(lb, bool)
    commit = np.full(g, -1)
    if logprobs is not None:
        logprobs.update(raw=np.zeros(g), processed=np.zeros(g))
    while True:
        h, cache = fwd.window(x[s:s + lb], s, cache, write_from=s, key_limit=s + lb, hide_prefix=prefix)
        logits = fwd.logits(jnp.concatenate([ctx[None], h[:-1]]))
        x0, conf = _greedy(logits, mask_id)
        chosen = choose(rules.NEMOTRON, conf, mblock, factor=p.factor)
        nfe += 1
        for j in chosen:
            x[s + j] = x0[j]
            mblock[j] = False
            if s + j - plen < g:
                commit[s + j - plen] = nfe
                if logprobs is not None:
                    logprobs["raw"][s + j - plen] = logprobs["processed"][s + j - plen] = log_softmax(logits[j])[x0[j]]
        if prefix > 0:
            ctx = h[prefix]
            s += prefix + 1
            prefix = 0
            mblock = x[s:s + lb] == mask_id
        block = x[s:s + lb]
        first = int(np.argmax(block == mask_id)) if (block == mask_id).any() else lb
        if first > 0:
            prefix = first - 1
            if s + lb >= plen + g:
                break
            hits = np.flatnonzero(np.isin(block, stops))
            if hits.size and not mblock[:hits[0]].any():
                break
    return x[plen:plen + g], nfe, commit


def _greedy(logits, mask_id):
    scores = logits.copy()
    scores[:, mask_id] = -np.inf
    x0 = scores.argmax(-1)
    return x0, _softmax(logits)[np.arange(len(x0)), x0]
