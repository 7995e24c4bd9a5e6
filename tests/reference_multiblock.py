"""A plain Python-loop reference of multi-block decoding (``block_add_threshold``), written from
docs/sampling.md, "Multi-block decoding", the way the upstream loops are: one prompt, Python
loops over blocks and calls, explicit sorting. It shares only the model forward, the proposal
draw and the per-block rules (``reference_sampler``) with the other references.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dllm_jax.sampling import rules
from dllm_jax.sampling.params import ALGORITHMS, SamplingParams
from reference_sampler import Forward, choose, entropy, propose


def choose_ahead(rule, conf, masked, *, threshold, factor, ent, bound):
    """What an active look-ahead block commits: the rule without its forced first token."""
    cand = [i for i in np.argsort(-np.where(masked, conf, -np.inf), kind="stable") if masked[i]]
    if rule == rules.THRESHOLD:
        return [i for i in cand if conf[i] >= threshold]
    out = []
    if rule == rules.FACTOR:
        for r, i in enumerate(cand):
            if conf[i] < 1 - factor / (r + 2):
                break
            out.append(i)
    elif rule == rules.ENTROPY_BOUND:
        total = np.float32(0)
        for i in cand:
            total = np.float32(total + np.float32(ent[i]))
            if total > bound:
                break
            out.append(i)
    return out


def reference_multi_block(model, prompt, params: SamplingParams, fwd: Forward | None = None):
    """Returns (generated tokens [gen_length], nfe, commit_step [gen_length])."""
    p = params.resolve(model.family)
    fwd = fwd or Forward(model)
    algo, mask_id, rule = ALGORITHMS[p.algorithm], model.mask_token_id, p.rule
    plen, g, lb = len(prompt), p.gen_length, p.block_length
    nb = g // lb
    width = 2 * lb if nb >= 2 else lb  # the window: the block and the next
    x = np.array(list(prompt) + [mask_id] * g)
    key = jnp.array([p.seed >> 32, p.seed & 0xFFFFFFFF], jnp.uint32)
    shift = 1 if p.shift_logits else 0
    stops = p.stop_token_ids if p.stop_token_ids is not None else model.stop_token_ids
    nfe, commit, b = 0, np.full(g, -1), 0
    while b < nb:
        s, e = plen + b * lb, plen + (b + 1) * lb
        ws = min(s, plen + g - width)  # the last block: the window ends with the canvas
        off = s - ws
        cache, i = None, 0
        while True:
            masked = x[s:e] == mask_id
            if (algo.cache == "none" or i > 1) and not masked.any():
                break
            committed = np.float32(lb - masked.sum())
            active = width > lb and b + 1 < nb and committed >= np.float32(p.block_add_threshold) * np.float32(lb)
            if algo.cache == "none" or i == 0:
                h, cache_new = fwd.full(x)
                cache = cache_new if algo.cache != "none" else None
                hw = h[ws - shift:ws - shift + width]
            elif algo.cache == "dual":
                h, cache = fwd.window(x[ws - shift:ws + width], ws - shift, cache, write_from=s,
                                      write_to=e + (lb if active else 0))
                hw = h[:width]
            else:  # prefix: the whole generated region, fresh from the block on
                start = plen - shift
                h, _ = fwd.window(x[start:], start, cache, write_from=s)
                hw = h[ws - shift - start:ws - shift - start + width]
            logits = fwd.logits(hw)  # [W, V]
            x0, conf, _ = propose(logits, p.temperature, key, nfe, mask_id, p.remasking, p.top_k, p.top_p, p.min_p)
            ent = entropy(logits, mask_id)
            knobs = dict(threshold=p.threshold or 1.0, factor=p.factor or 1.0)
            chosen = [off + j for j in choose(rule, conf[off:off + lb], masked, entropy=ent[off:off + lb],
                                              bound=p.entropy_bound or 0.0, **knobs)]
            if active:
                chosen += [lb + j for j in choose_ahead(rule, conf[lb:], x[e:e + lb] == mask_id, ent=ent[lb:],
                                                        bound=np.float32(p.entropy_bound or 0.0), **knobs)]
            nfe += 1
            for j in chosen:
                x[ws + j] = x0[j]
                commit[ws + j - plen] = nfe
            i += 1
        if p.early_stop and np.isin(x[s:e], stops).any():
            x[e:] = model.config.eos_token_id
            break
        b += 1
        if width > lb and b < nb and not (x[e:e + lb] == mask_id).any():  # filled ahead: never entered
            if p.early_stop and np.isin(x[e:e + lb], stops).any():
                x[e + lb:] = model.config.eos_token_id
                break
            b += 1
    return x[plen:], nfe, commit
