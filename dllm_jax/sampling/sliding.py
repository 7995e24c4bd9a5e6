"""Nemotron-Diffusion's static-block sliding decoder (NeMo-RL dllm_eval ``generate_static_block_size``).

Per row (batched here; upstream is batch 1): a window of ``Lb`` positions slides over the
canvas. Each decode forward feeds the window against a KV cache (every forward writes the
window's keys/values), predicts position j of the window from output j-1 (position 0 from a
saved *context* hidden state), and commits by NeMo-RL's confidence rule. Once the window
starts with a run of ``first`` decoded tokens, the next forward is a *commit forward*: its
first ``c = first - 1`` rows may not see keys at or after ``s + c``; afterwards the context
becomes that forward's output at ``c`` and the window slides by ``c + 1``. The run stops
when a window start with a decoded run reaches ``s + Lb >= P + G`` or holds a stop token
with no mask before it. The prompt prefill (bidirectional within the prompt) is not counted
in NFE, as upstream.

One call of the program advances every running row by at least ``Lb`` positions (or to its
end), so the host sees progress once per block's worth of tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dllm_jax.sampling import rules
from dllm_jax.sampling.blocks import contains_stop, put, take
from dllm_jax.sampling.params import ProgramKey
from dllm_jax.sampling.state import DecodeState


def make_sliding_program(key: ProgramKey, graphdef, *, mask_id: int):
    lp, g, lb, length = key.prompt_len, key.gen_length, key.block_length, key.canvas_len
    max_iters = 2 * lb + 2
    q_idx = jnp.arange(lb)
    k_idx = jnp.arange(length)

    def run(params, st: DecodeState) -> DecodeState:
        model = nnx.merge(graphdef, params)
        running = st.active & ~st.done
        cache, ctx = st.cache, st.ctx

        # Prefill rows that just entered: the prompt region, bidirectional within the prompt.
        prefill = running & (st.nfe == 0) & (st.block == lp)

        def do_prefill(operands):
            cache, ctx = operands
            mask = st.valid[:, None, :] & (k_idx < lp)[None, None, :]
            h, new_cache = model.hidden(st.canvas[:, :lp], st.positions[:, :lp], mask, cache=cache,
                                        write_start=jnp.zeros_like(st.block),
                                        write_mask=jnp.broadcast_to(prefill[:, None], (prefill.shape[0], lp)),
                                        return_kv=True)
            ctx = jnp.where(prefill[:, None], h[:, lp - 1].astype(ctx.dtype), ctx)
            return new_cache, ctx

        cache, ctx = jax.lax.cond(jnp.any(prefill), do_prefill, lambda ops: ops, (cache, ctx))
        s0 = st.block

        def live_rows(c):
            _, _, s, _, _, _, _, done, _, _, it, _ = c
            return running & ~done & (s - s0 < lb) & (it < max_iters)

        def cond(c):
            return jnp.any(live_rows(c))

        def body(c):
            canvas, cache, s, pre, mblock, ctx, nfe, done, commit_step, commit_conf, it, record = c
            live = live_rows(c)
            tokens, positions = take(canvas, s, lb), take(st.positions, s, lb)
            visible = st.valid[:, None, :] & (k_idx[None, None, :] < (s + lb)[:, None, None])
            hidden_tail = (q_idx[None, :, None] < pre[:, None, None]) & (k_idx[None, None, :] >= (s + pre)[:, None, None])
            h, cache = model.hidden(tokens, positions, visible & ~hidden_tail, cache=cache, write_start=s,
                                    write_mask=jnp.broadcast_to(live[:, None], tokens.shape), return_kv=True)
            predictors = jnp.concatenate([ctx[:, None, :].astype(h.dtype), h[:, :-1]], axis=1)
            logits = model.head(predictors)
            x0, conf = rules.propose(logits, jnp.zeros_like(st.temperature), jax.vmap(jax.random.fold_in)(st.rng, nfe),
                                     mask_id)
            transfer = rules.transfer_nemotron(conf, mblock & live[:, None], st.factor)
            canvas = put(canvas, s, jnp.where(transfer, x0, tokens))
            mblock = mblock & ~transfer
            nfe = nfe + live
            gen_idx = jnp.where(transfer, s[:, None] - lp + q_idx[None, :], g)  # g = out of range: dropped
            rows = jnp.arange(gen_idx.shape[0])[:, None]
            commit_step = commit_step.at[rows, gen_idx].set(jnp.broadcast_to(nfe[:, None], gen_idx.shape), mode="drop")
            commit_conf = commit_conf.at[rows, gen_idx].set(conf, mode="drop")
            if key.logprobs:
                new = rules.token_logprobs(logits, x0, key.logprobs, mask_id)
                record = tuple(old.at[rows, gen_idx].set(value, mode="drop") for old, value in zip(record, new))
            # A commit forward slides the window past its committed prefix.
            slide = live & (pre > 0)
            ctx = jnp.where(slide[:, None], take(h, pre, 1)[:, 0].astype(ctx.dtype), ctx)
            s = jnp.where(slide, s + pre + 1, s)
            pre = jnp.where(slide, 0, pre)
            block = take(canvas, s, lb)
            mblock = jnp.where(slide[:, None], block == mask_id, mblock)
            # Stop / commit checks on the (new) window.
            is_mask = block == mask_id
            first = jnp.where(jnp.any(is_mask, -1), jnp.argmax(is_mask, -1), lb)
            advance = live & (first > 0)
            pre = jnp.where(advance, first - 1, pre)
            at_end = advance & (s + lb >= lp + g)
            stop = contains_stop(block, st.stop_ids)
            first_stop = jnp.argmax(stop, -1)
            masked_before = jnp.any(mblock & (q_idx[None, :] < first_stop[:, None]), -1)
            eos = advance & jnp.any(stop, -1) & ~masked_before
            done = done | at_end | eos
            return canvas, cache, s, pre, mblock, ctx, nfe, done, commit_step, commit_conf, it + 1, record

        init = (st.canvas, cache, st.block, st.prefix, st.mblock, ctx, st.nfe, st.done, st.commit_step,
                st.commit_conf, jnp.int32(0), (st.commit_logprob, st.top_ids, st.top_logprobs))
        (canvas, cache, s, pre, mblock, ctx, nfe, done, commit_step, commit_conf, iters,
         (commit_logprob, top_ids, top_logprobs)) = jax.lax.while_loop(cond, body, init)
        return st.replace(canvas=canvas, cache=cache, block=s, prefix=pre, mblock=mblock, ctx=ctx, nfe=nfe, done=done,
                          commit_step=commit_step, commit_conf=commit_conf, commit_logprob=commit_logprob,
                          top_ids=top_ids, top_logprobs=top_logprobs, batch_nfe=st.batch_nfe + iters)

    return run
