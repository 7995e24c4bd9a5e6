"""One block of the LLaDA-style algorithms (basic, no_cache, prefix_cache, dual_cache, dInfer).

``run_block`` is a pure function of (params, state): every active row denoises its current
block to completion (a ``lax.while_loop`` over model calls, each row stepping only while it
still needs to), then advances to its next block. The host calls it once per block, so
finished blocks can be streamed and new requests admitted between calls.

Model calls per algorithm (upstream semantics, per row):

* basic: a full-canvas forward per scheduled step, ``steps_per_block`` of them even when the
  schedule commits nothing (the original LLaDA generate).
* no_cache: the same but leaves the block once it has no masks (Fast-dLLM generate).
* prefix_cache / dual_cache: a full forward at the block start (it builds the KV cache and
  commits the first step), then cached calls: at least one, and more while masks remain.
  prefix: the queries are the whole generated region (only positions >= block start take
  fresh keys/values; the earlier ones read the cache); dual: only the block is fed, its
  fresh keys/values overwrite the cache while the rest stays as of the block start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dllm_jax.sampling import rules
from dllm_jax.sampling.params import ALGORITHMS, ProgramKey
from dllm_jax.sampling.state import DecodeState


def take(x, start, size):
    """Per-row window x[b, start[b] : start[b] + size]."""
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, size, axis=0))(x, start)


def put(x, start, values):
    return jax.vmap(lambda r, v, s: jax.lax.dynamic_update_slice_in_dim(r, v, s, axis=0))(x, values, start)


def contains_stop(tokens, stop_ids):
    """tokens [B, T], stop_ids [B, S] (-1 unused) -> [B, T] bool."""
    return jnp.any((tokens[:, :, None] == stop_ids[:, None, :]) & (stop_ids[:, None, :] >= 0), axis=-1)


def make_block_program(key: ProgramKey, graphdef, *, mask_id: int, fill_id: int):
    """Build ``run_block(params, state) -> state`` for one program key (jit it outside)."""
    algo = ALGORITHMS[key.algorithm]
    cache_mode, rule_static = algo.cache, algo.rule
    lp, g, lb, spb = key.prompt_len, key.gen_length, key.block_length, key.steps_per_block
    num_blocks = g // lb
    shift = 1 if key.shift else 0
    length = key.canvas_len
    max_calls = max(spb, lb) + 1  # every threshold/factor step commits >= 1 token

    def run_block(params, st: DecodeState) -> DecodeState:
        model = nnx.merge(graphdef, params)
        running = st.active & ~st.done
        bs = lp + jnp.minimum(st.block, num_blocks - 1) * lb  # [B] block start in the canvas
        key_mask = st.valid[:, None, :]  # [B, 1, L]

        def block_logits(h, start):
            """Logits predicting the block's positions from hidden states h (indexed from start)."""
            return model.head(take(h, bs - shift - start, lb))

        def full_call(canvas, want_kv):
            tokens, positions, mask = canvas, st.positions, key_mask
            if key.cfg:
                uncond = jnp.where(st.prompt, mask_id, canvas)
                tokens = jnp.concatenate([canvas, uncond])
                positions = jnp.concatenate([positions, positions])
                mask = jnp.concatenate([mask, mask])
            h, kv = model.hidden(tokens, positions, mask, return_kv=want_kv)
            if key.cfg:
                b = canvas.shape[0]
                cond, unc = model.head(take(h[:b], bs - shift, lb)), model.head(take(h[b:], bs - shift, lb))
                w = st.cfg_scale[:, None, None]
                return jnp.where(w > 0, unc + (w + 1.0) * (cond - unc), cond), kv
            return block_logits(h, 0), kv

        def cached_call(canvas, cache):
            if cache_mode == "dual":
                start, size = bs - shift, lb + shift
            else:  # prefix: the whole generated region (static size), fresh from the block on
                start, size = jnp.full_like(bs, lp + g) - g - shift, g + shift
            tokens, positions = take(canvas, start, size), take(st.positions, start, size)
            write = (start[:, None] + jnp.arange(size)[None, :]) >= bs[:, None]
            h, new_cache = model.hidden(tokens, positions, key_mask, cache=cache, write_start=start,
                                        write_mask=write, return_kv=cache_mode == "dual")
            return block_logits(h, start), (new_cache if cache_mode == "dual" else cache)

        def commit(carry, logits, live):
            """Propose, select and write tokens for rows in ``live``; count their forward pass."""
            canvas, nfe, call, commit_step, commit_conf, credit, record = carry
            block_tokens = take(canvas, bs, lb)
            masked = (block_tokens == mask_id) & live[:, None]
            raw_logits = logits
            if rule_static == rules.CREDIT:
                logits, new_credit = rules.credit_fuse(logits, credit, masked, call[:, None, None] == 0)
                credit = jnp.where(live[:, None, None], new_credit, credit)
            x0, conf = rules.propose(logits, st.temperature, jax.vmap(jax.random.fold_in)(st.rng, nfe),
                                     mask_id, st.random_remask, filters=(st.top_k, st.top_p, st.min_p))
            k = jnp.take_along_axis(sched, jnp.minimum(call, spb - 1)[:, None], axis=1)[:, 0]
            transfer = rules.select(rule_static, st.rule, conf, masked, k, st.threshold, st.factor)
            canvas = put(canvas, bs, jnp.where(transfer, x0, block_tokens))
            nfe = nfe + live
            gen_idx = bs - lp

            def keep_new(old, new):
                sel = transfer.reshape(transfer.shape + (1,) * (new.ndim - 2))
                return put(old, gen_idx, jnp.where(sel, new, take(old, gen_idx, lb)))

            commit_step = keep_new(commit_step, jnp.broadcast_to(nfe[:, None], transfer.shape))
            commit_conf = keep_new(commit_conf, conf)
            if key.logprobs:  # of the model's own distribution (before credit fusion / filters)
                chosen, top_ids, top_lp = rules.token_logprobs(raw_logits, x0, key.logprobs, mask_id)
                record = tuple(keep_new(old, new) for old, new in zip(record, (chosen, top_ids, top_lp)))
            return canvas, nfe, call + live, commit_step, commit_conf, credit, record

        def needs_call(canvas, call):
            has_mask = jnp.any(take(canvas, bs, lb) == mask_id, axis=-1)
            if algo.run_empty_steps:
                need = jnp.where(st.rule == rules.FIXED, call < spb, has_mask)
            elif cache_mode == "none":
                need = has_mask
            else:
                need = (call == 1) | has_mask  # at least one cached call after the full one
            return running & need & (call < max_calls)

        sched = rules.schedule(jnp.sum(take(st.canvas, bs, lb) == mask_id, axis=-1), spb)
        credit = jnp.zeros((st.canvas.shape[0], lb, model.spec.vocab) if rule_static == rules.CREDIT else (), jnp.float32)
        record = (st.commit_logprob, st.top_ids, st.top_logprobs)
        carry = (st.canvas, st.nfe, jnp.zeros_like(st.nfe), st.commit_step, st.commit_conf, credit, record)
        cache, batch_nfe = st.cache, st.batch_nfe

        if cache_mode != "none":  # block-start full forward: builds the cache, commits step 0
            logits, kv = full_call(carry[0], want_kv=True)
            cache = kv.astype(cache.k[0].dtype)
            carry = commit(carry, logits, running)
            batch_nfe = batch_nfe + jnp.any(running)

        def cond(loop):
            carry, _, _ = loop
            return jnp.any(needs_call(carry[0], carry[2]))

        def body(loop):
            carry, cache, batch_nfe = loop
            live = needs_call(carry[0], carry[2])
            if cache_mode == "none":
                logits, _ = full_call(carry[0], want_kv=False)
            else:
                logits, cache = cached_call(carry[0], cache)
            return commit(carry, logits, live), cache, batch_nfe + 1

        carry, cache, batch_nfe = jax.lax.while_loop(cond, body, (carry, cache, batch_nfe))
        canvas, nfe, _, commit_step, commit_conf, _, (commit_logprob, top_ids, top_logprobs) = carry

        # Block finished: advance, stop rows whose block holds a stop token (early_stop).
        stop_here = st.early_stop & jnp.any(contains_stop(take(canvas, bs, lb), st.stop_ids), axis=-1)
        next_block = st.block + running
        done = st.done | (running & ((next_block >= num_blocks) | stop_here))
        after = jnp.arange(length)[None, :] >= (bs + lb)[:, None]
        canvas = jnp.where((running & stop_here)[:, None] & after, fill_id, canvas)
        return st.replace(canvas=canvas, nfe=nfe, block=jnp.where(running, next_block, st.block), done=done,
                          commit_step=commit_step, commit_conf=commit_conf, commit_logprob=commit_logprob,
                          top_ids=top_ids, top_logprobs=top_logprobs, cache=cache, batch_nfe=batch_nfe)

    return run_block
