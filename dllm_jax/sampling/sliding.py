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

The program is a step program (``blocks.step_loop``): one step is one decode forward of every
live row's window, preceded (in the step a row starts) by its prompt prefill, so rows of one
batch slide independently and a freed slot takes a new request at the next host call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dllm_jax.sampling import rules
from dllm_jax.sampling.blocks import contains_stop, put, step_loop, take, when

# (annotations only: ``ProgramKey`` / ``DecodeState`` are dllm_jax.sampling.params' / state's)


def make_step_program(key: "ProgramKey", graphdef, *, mask_id: int):
    """Build ``run(params, state, budget, exit_on_done) -> state`` (see the module docstring)."""
    lp, g, lb, length = key.prompt_len, key.gen_length, key.block_length, key.canvas_len
    q_idx = jnp.arange(lb)
    k_idx = jnp.arange(length)

    def run(params, st: DecodeState, budget, exit_on_done) -> DecodeState:
        model = nnx.merge(graphdef, params)

        def prefill(st: DecodeState, rows) -> DecodeState:
            """The prompt region of rows that just entered, bidirectional within the prompt."""
            mask = st.valid[:, None, :] & (k_idx < lp)[None, None, :]  # [B, 1, L]
            h, cache = model.hidden(st.canvas[:, :lp], st.positions[:, :lp], mask, cache=st.cache,
                                    write_start=jnp.zeros_like(st.block),
                                    write_mask=jnp.broadcast_to(rows[:, None], (rows.shape[0], lp)),
                                    return_kv=True)  # [B, Lp, D]
            ctx = jnp.where(rows[:, None], h[:, lp - 1].astype(st.ctx.dtype), st.ctx)  # [B, D]
            return st.replace(cache=cache, ctx=ctx)

        def step(st: DecodeState) -> DecodeState:
            running = st.active & ~st.done  # [B]
            entering = running & (st.nfe == 0) & (st.block == lp)
            st = when(jnp.any(entering), lambda s: prefill(s, entering), st)
            live = running
            s, pre, mblock, ctx = st.block, st.prefix, st.mblock, st.ctx  # [B], [B], [B, Lb], [B, D]
            tokens, positions = take(st.canvas, s, lb), take(st.positions, s, lb)  # [B, Lb]
            visible = st.valid[:, None, :] & (k_idx[None, None, :] < (s + lb)[:, None, None])  # [B, 1, L]
            hidden_tail = (q_idx[None, :, None] < pre[:, None, None]) & (k_idx[None, None, :] >= (s + pre)[:, None, None])
            h, cache = model.hidden(tokens, positions, visible & ~hidden_tail, cache=st.cache, write_start=s,
                                    write_mask=jnp.broadcast_to(live[:, None], tokens.shape), return_kv=True)
            predictors = jnp.concatenate([ctx[:, None, :].astype(h.dtype), h[:, :-1]], axis=1)  # [B, Lb, D]
            logits = model.head(predictors)  # [B, Lb, V]
            x0, conf = rules.propose(logits, jnp.zeros_like(st.temperature),
                                     jax.vmap(jax.random.fold_in)(st.rng, st.nfe), mask_id)  # [B, Lb]
            transfer = rules.transfer_nemotron(conf, mblock & live[:, None], st.factor)  # [B, Lb]
            canvas = put(st.canvas, s, jnp.where(transfer, x0, tokens))  # [B, L]
            mblock = mblock & ~transfer
            nfe = st.nfe + live
            gen_idx = jnp.where(transfer, s[:, None] - lp + q_idx[None, :], g)  # [B, Lb]; g: out of range, dropped
            rows = jnp.arange(gen_idx.shape[0])[:, None]
            record = {}
            if key.logprobs:
                chosen, top_ids, top_lp = rules.token_logprobs(logits, x0, key.logprobs, mask_id)
                record = dict(commit_logprob=st.commit_logprob.at[rows, gen_idx].set(chosen, mode="drop"),
                              top_ids=st.top_ids.at[rows, gen_idx].set(top_ids, mode="drop"),
                              top_logprobs=st.top_logprobs.at[rows, gen_idx].set(top_lp, mode="drop"))
            commit_step = st.commit_step.at[rows, gen_idx].set(jnp.broadcast_to(nfe[:, None], gen_idx.shape),
                                                               mode="drop")
            commit_conf = st.commit_conf.at[rows, gen_idx].set(conf, mode="drop")
            # A commit forward slides the window past its committed prefix.
            slide = live & (pre > 0)
            ctx = jnp.where(slide[:, None], take(h, pre, 1)[:, 0].astype(ctx.dtype), ctx)
            s = jnp.where(slide, s + pre + 1, s)
            pre = jnp.where(slide, 0, pre)
            block = take(canvas, s, lb)  # [B, Lb] the (new) window
            mblock = jnp.where(slide[:, None], block == mask_id, mblock)
            # Stop / commit checks on the (new) window.
            is_mask = block == mask_id
            first = jnp.where(jnp.any(is_mask, -1), jnp.argmax(is_mask, -1), lb)  # [B] decoded run at its start
            advance = live & (first > 0)
            pre = jnp.where(advance, first - 1, pre)
            at_end = advance & (s + lb >= lp + g)
            stop = contains_stop(block, st.stop_ids)  # [B, Lb]
            first_stop = jnp.argmax(stop, -1)
            masked_before = jnp.any(mblock & (q_idx[None, :] < first_stop[:, None]), -1)
            eos = advance & jnp.any(stop, -1) & ~masked_before
            return st.replace(canvas=canvas, cache=cache, block=s, prefix=pre, mblock=mblock, ctx=ctx, nfe=nfe,
                              done=st.done | at_end | eos, commit_step=commit_step, commit_conf=commit_conf,
                              batch_nfe=st.batch_nfe + 1, **record)

        return step_loop(step, st, budget, exit_on_done)

    return run
