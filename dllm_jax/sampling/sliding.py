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

``SlidingProgram.run`` is a step program (``loops.step_loop``): one step is one decode forward of every
live row's window, preceded (in the step a row starts) by its prompt prefill, so rows of one
batch slide independently and a freed slot takes a new request at the next host call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dllm_jax.sampling import head, rules
from dllm_jax.sampling.blocks import contains_stop, put, take
from dllm_jax.sampling.loops import step_loop, when
from dllm_jax.sampling.state import DecodeState
from dllm_jax.sampling.twins import chunk_rows, gathered

# (annotations only: ``ProgramKey`` is dllm_jax.sampling.params', which imports this module)


@dataclasses.dataclass(frozen=True)
class SlidingProgram:
    """The sliding decoder's step program for one program key (see the module docstring).

    Attributes:
      key: the program key.
      graphdef: the model's graph definition; ``run`` merges it with the params.
      mask_id: the mask token.
      chunk: rows per prompt-prefill forward (``twins.chunk_rows``).
      share: entering rows with identical inputs run one prefill (``twins.same_forward``).
    """

    key: ProgramKey
    graphdef: object
    mask_id: int
    chunk: int = 1
    share: bool = True

    def run(self, params, st: DecodeState, budget, exit_on_done) -> DecodeState:
        model = nnx.merge(self.graphdef, params)
        return step_loop(lambda s: self.step(model, s), st, budget, exit_on_done)

    def prompt_forward(self, model, st: DecodeState, rows):
        """The prompt region of ``rows`` [R] alone (bidirectional within the prompt, no cache): its
        hidden state at the last prompt position [R, D] and its keys/values (per layer [R, K, Lp, H])."""
        lp, t = self.key.prompt_len, st.tokens
        h, kv = model.hidden(t.canvas[rows, :lp], t.positions[rows, :lp], t.valid[rows, None, :lp], return_kv=True)
        return h[:, lp - 1], kv

    def prefill(self, model, st: DecodeState, entering):
        """The prompt prefill of the rows that just entered [B], ``chunk`` rows per forward (a while
        loop over the chunks: a step pays for the entering rows, not the batch); rows whose prompt
        region equals an earlier entering row's (the ``n`` samples of one prompt, a repeated prompt)
        copy its keys/values and context instead of running their own (``twins``). Block-causal: the
        prompt's keys/values never change afterwards, so one prefill serves the whole generation.
        Returns (state, prefill forwards run)."""
        lp = self.key.prompt_len

        def scatter(cache, dest, kv):
            return jax.tree.map(lambda old, new: old.at[dest, :, :lp].set(new.astype(old.dtype), mode="drop"),
                                cache, kv)

        cache, ctx, forwards = gathered(lambda rows: self.prompt_forward(model, st, rows), scatter, st, entering,
                                        st.progress.block, st.window.ctx, self.chunk, self.share)
        return st.replace(cache=cache).update(ctx=ctx), forwards

    def step(self, model, st: DecodeState) -> DecodeState:
        """One decode forward of every live row's window, then its commit and slide."""
        lp, lb = self.key.prompt_len, self.key.block_length
        q_idx, k_idx = jnp.arange(lb), jnp.arange(self.key.canvas_len)
        running = st.progress.active & ~st.progress.done  # [B]
        entering = running & (st.progress.nfe == 0) & (st.progress.block == lp)
        st = when(jnp.any(entering), lambda s: self.prefill(model, s, entering)[0], st)
        live = running
        s, pre, ctx = st.progress.block, st.window.prefix, st.window.ctx  # [B], [B], [B, D]
        tokens, positions = take(st.tokens.canvas, s, lb), take(st.tokens.positions, s, lb)  # [B, Lb]
        visible = st.tokens.valid[:, None, :] & (k_idx[None, None, :] < (s + lb)[:, None, None])  # [B, 1, L]
        hidden_tail = (q_idx[None, :, None] < pre[:, None, None]) & (k_idx[None, None, :] >= (s + pre)[:, None, None])
        h, cache = model.hidden(tokens, positions, visible & ~hidden_tail, cache=st.cache, write_start=s,
                                write_mask=jnp.broadcast_to(live[:, None], tokens.shape), return_kv=True)
        predictors = jnp.concatenate([ctx[:, None, :].astype(h.dtype), h[:, :-1]], axis=1)  # [B, Lb, D]
        # greedy: the argmax and its confidence from the head's vocabulary chunks (no [B, Lb, V] logits)
        stats, _ = head.block_head(model, predictors, None, self.mask_id, top_k=self.key.logprobs)
        x0, conf = stats.argmax, stats.prob(stats.best)  # [B, Lb]
        transfer = rules.transfer_nemotron(conf, st.window.mblock & live[:, None], st.knobs.factor)  # [B, Lb]
        nfe = st.progress.nfe + live
        st = st.replace(cache=cache, batch_nfe=st.batch_nfe + 1).update(
            canvas=put(st.tokens.canvas, s, jnp.where(transfer, x0, tokens)), mblock=st.window.mblock & ~transfer,
            nfe=nfe, **self.records(st, stats, x0, conf, transfer, nfe))
        return self.slide(st, h, live)

    def records(self, st: DecodeState, stats, x0, conf, transfer, nfe) -> dict:
        """The records of the committed window positions (``transfer`` [B, Lb]; ``stats`` the head's
        ``HeadStats``: raw logprobs, as greedy rows' 'processed' ones are)."""
        key, r = self.key, st.records
        q_idx = jnp.arange(key.block_length)
        s = st.progress.block
        # [B, Lb] generated-region index of each committed position; gen_length: out of range, dropped
        gen_idx = jnp.where(transfer, s[:, None] - key.prompt_len + q_idx[None, :], key.gen_length)
        rows = jnp.arange(gen_idx.shape[0])[:, None]
        out = dict(commit_step=r.commit_step.at[rows, gen_idx].set(jnp.broadcast_to(nfe[:, None], gen_idx.shape),
                                                                    mode="drop"),
                   commit_conf=r.commit_conf.at[rows, gen_idx].set(conf, mode="drop"))
        if key.logprobs:
            chosen, top_ids, top_lp = stats.raw_logprobs(stats.best)
            out.update(commit_logprob=r.commit_logprob.at[rows, gen_idx].set(chosen, mode="drop"),
                       top_ids=r.top_ids.at[rows, gen_idx].set(top_ids, mode="drop"),
                       top_logprobs=r.top_logprobs.at[rows, gen_idx].set(top_lp, mode="drop"))
        return out

    def slide(self, st: DecodeState, h, live) -> DecodeState:
        """A commit forward slides the window past its committed prefix; then the stop / commit
        checks on the (new) window. ``h``: [B, Lb, D] the forward's output."""
        lp, g, lb = self.key.prompt_len, self.key.gen_length, self.key.block_length
        s, pre, mblock, ctx = st.progress.block, st.window.prefix, st.window.mblock, st.window.ctx
        slide = live & (pre > 0)
        ctx = jnp.where(slide[:, None], take(h, pre, 1)[:, 0].astype(ctx.dtype), ctx)
        s = jnp.where(slide, s + pre + 1, s)
        pre = jnp.where(slide, 0, pre)
        block = take(st.tokens.canvas, s, lb)  # [B, Lb] the (new) window
        mblock = jnp.where(slide[:, None], block == self.mask_id, mblock)
        is_mask = block == self.mask_id
        first = jnp.where(jnp.any(is_mask, -1), jnp.argmax(is_mask, -1), lb)  # [B] decoded run at its start
        advance = live & (first > 0)
        pre = jnp.where(advance, first - 1, pre)
        at_end = advance & (s + lb >= lp + g)
        stop = contains_stop(block, st.knobs.stop_ids)  # [B, Lb]
        first_stop = jnp.argmax(stop, -1)
        masked_before = jnp.any(mblock & (jnp.arange(lb)[None, :] < first_stop[:, None]), -1)
        eos = advance & jnp.any(stop, -1) & ~masked_before
        return st.update(block=s, prefix=pre, mblock=mblock, ctx=ctx, done=st.progress.done | at_end | eos)


def make_step_program(key: "ProgramKey", graphdef, *, mask_id: int, refresh_rows: int | None = None,
                      share: bool = True):
    """``run(params, state, budget, exit_on_done) -> state`` (see the module docstring); ``refresh_rows``:
    rows per prefill forward (default from ``twins.REFRESH_TOKENS``); ``share``: twins share a prefill."""
    return SlidingProgram(key, graphdef, mask_id, chunk_rows(key.batch, key.canvas_len, refresh_rows), share).run
