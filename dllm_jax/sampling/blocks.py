"""The step program of the LLaDA-style algorithms (basic, no_cache, prefix_cache, dual_cache, dInfer).

``run(params, state, budget, exit_on_done)`` is a pure function: a ``lax.while_loop`` whose
every iteration advances each live row by one denoising step of *its own* block. A row whose
block is resolved moves to its next block at the next step, so rows in one batch may be in
different blocks and phases, and a slot freed by a finished row takes a waiting request at
the next host call, whatever step the others are at.

Model calls per algorithm (upstream semantics, per row):

* basic: a full-canvas forward per scheduled step, ``steps_per_block`` of them even when the
  schedule commits nothing (the original LLaDA generate).
* no_cache: the same but leaves the block once it has no masks (Fast-dLLM generate).
* prefix_cache / dual_cache: a full forward at the block start (it builds the row's KV cache
  and commits the first step), then cached calls: at least one, and more while masks remain.
  prefix: the queries are the whole generated region (only positions >= block start take
  fresh keys/values; the earlier ones read the cache); dual: only the block is fed, its fresh
  keys/values overwrite the cache while the rest stays as of the block start.

One step of a cached algorithm: the rows that have just entered a block (``call == 0``) run
their block-start *refresh* forward, in gathered chunks of a static ``chunk_rows`` rows (a
``while_loop`` over the chunks, so a step refreshes every entering row and pays for
ceil(entering / chunk_rows) chunks, not a fixed batch), then every row past its refresh
(including the ones just refreshed) runs one cached call. Both forwards run only when
some row needs them (``when``), so a step without refreshes costs one cached call.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dllm_jax.sampling import rules

# (annotations only: ``ProgramKey`` is dllm_jax.sampling.params', ``DecodeState`` state's, and
# ``BlockDecoder`` decoders'; those modules import this one)


def take(x, start, size):
    """Per-row window x[b, start[b] : start[b] + size]."""
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, size, axis=0))(x, start)


def put(x, start, values):
    return jax.vmap(lambda r, v, s: jax.lax.dynamic_update_slice_in_dim(r, v, s, axis=0))(x, values, start)


def contains_stop(tokens, stop_ids):
    """tokens [B, T], stop_ids [B, S] (-1 unused) -> [B, T] bool."""
    return jnp.any((tokens[:, :, None] == stop_ids[:, None, :]) & (stop_ids[:, None, :] >= 0), axis=-1)


@struct.dataclass
class StepLoop:
    """Carry of a step program's loop.

    Attributes:
      state: the decode state.
      steps: [] int32 steps run in this call.
      finished: [] bool some row finished in this call.
    """

    state: DecodeState
    steps: jax.Array
    finished: jax.Array


@struct.dataclass
class RefreshLoop:
    """Carry of the refresh loop (block-start forwards, ``chunk_rows`` rows at a time).

    Attributes:
      cache: the KV cache, the refreshed rows rebuilt.
      logits: [B, Lb, V] float32 block logits of the refreshed rows (zeros elsewhere).
      pending: [B] bool rows still to refresh.
      forwards: [] int32 refresh forwards run.
    """

    cache: object
    logits: jax.Array
    pending: jax.Array
    forwards: jax.Array


def step_loop(step, st: DecodeState, budget, exit_on_done) -> DecodeState:
    """Run ``step`` up to ``budget`` times, while some row runs (and, with ``exit_on_done``, until one finishes)."""
    done_before = st.done  # [B]

    def cond(loop: StepLoop):
        running = loop.state.active & ~loop.state.done  # [B]
        return (loop.steps < budget) & jnp.any(running) & ~(exit_on_done & loop.finished)

    def body(loop: StepLoop) -> StepLoop:
        new = step(loop.state)
        new = new.replace(batch_steps=new.batch_steps + 1)
        return StepLoop(new, loop.steps + 1, jnp.any(new.done & ~done_before))

    return jax.lax.while_loop(cond, body, StepLoop(st, jnp.int32(0), jnp.bool_(False))).state


def when(pred, fn, st):
    """``fn(st)`` if ``pred`` else ``st``, as a while loop of zero or one iteration: XLA:CPU keeps a
    while loop's carry (the KV cache) in place, where a ``lax.cond`` returning the state copied
    it on every step (measured: docs/performance.md, "Step-level scheduling")."""
    def body(carry):
        _, st = carry
        return jnp.bool_(False), fn(st)

    return jax.lax.while_loop(lambda carry: carry[0], body, (pred, st))[1]


# Canvas tokens one refresh chunk aims at (docs/performance.md, "Step-level scheduling"): a
# chunk is ceil(REFRESH_TOKENS / canvas) rows, so short canvases refresh a few rows per forward
# and long ones one, and a step pays for about the rows that enter a block, not a fixed batch.
REFRESH_TOKENS = 256


def chunk_rows(batch: int, canvas_len: int, rows: int | None = None) -> int:
    """Rows of one refresh forward: ``rows`` if given, else ceil(REFRESH_TOKENS / canvas_len); within [1, batch]."""
    if rows is None:
        rows = math.ceil(REFRESH_TOKENS / canvas_len)
    return min(batch, max(1, rows))


def make_step_program(key: "ProgramKey", decoder: "BlockDecoder", graphdef, *, mask_id: int, fill_id: int,
                      refresh_rows: int | None = None):
    """Build ``run(params, state, budget, exit_on_done) -> state`` for one program key (jit it outside).

    ``decoder`` is the key's ``BlockDecoder`` (cache mode, fixed rule, empty steps);
    ``refresh_rows``: rows per refresh chunk (default from REFRESH_TOKENS; the batch
    size = every row in one forward, no gather)."""
    cache_mode, rule_static = decoder.cache, decoder.rule
    lp, g, lb, spb = key.prompt_len, key.gen_length, key.block_length, key.steps_per_block
    num_blocks = g // lb
    shift = 1 if key.shift else 0
    b, length = key.batch, key.canvas_len
    r = chunk_rows(b, length, refresh_rows)
    max_calls = max(spb, lb) + 1  # every threshold/factor step commits >= 1 token

    def run(params, st: DecodeState, budget, exit_on_done) -> DecodeState:
        model = nnx.merge(graphdef, params)

        def block_start(st):
            return lp + jnp.minimum(st.block, num_blocks - 1) * lb  # [B] in the canvas

        def has_mask(st):
            return jnp.any(take(st.canvas, block_start(st), lb) == mask_id, axis=-1)  # [B]

        def full_forward(canvas, positions, valid, prompt, cfg_scale, bs, want_kv):
            """Logits [n, Lb, V] of the rows' blocks from a full-canvas forward (and its K/V)."""
            tokens, mask = canvas, valid[:, None, :]  # [n, L], [n, 1, L]
            if key.cfg:
                uncond = jnp.where(prompt, mask_id, canvas)  # [n, L]
                tokens = jnp.concatenate([canvas, uncond])  # [2n, L]
                positions = jnp.concatenate([positions, positions])
                mask = jnp.concatenate([mask, mask])
            h, kv = model.hidden(tokens, positions, mask, return_kv=want_kv)  # [n or 2n, L, D]
            if key.cfg:
                n = canvas.shape[0]
                cond = model.head(take(h[:n], bs - shift, lb))  # [n, Lb, V]
                unc = model.head(take(h[n:], bs - shift, lb))
                w = cfg_scale[:, None, None]
                return jnp.where(w > 0, unc + (w + 1.0) * (cond - unc), cond), kv
            return model.head(take(h, bs - shift, lb)), kv

        def commit(st: DecodeState, logits, live) -> DecodeState:
            """Propose, select and write tokens for rows in ``live`` [B]; count their forward pass."""
            bs = block_start(st)  # [B]
            block_tokens = take(st.canvas, bs, lb)  # [B, Lb]
            masked = (block_tokens == mask_id) & live[:, None]  # [B, Lb]
            raw_logits, credit = logits, st.credit  # [B, Lb, V]
            if rule_static == rules.CREDIT:
                logits, new_credit = rules.credit_fuse(logits, credit, masked, (st.call == 0)[:, None, None])
                credit = jnp.where(live[:, None, None], new_credit, credit)
            x0, conf, floor = rules.propose(logits, st.temperature, jax.vmap(jax.random.fold_in)(st.rng, st.nfe),
                                            mask_id, st.remasking, filters=(st.top_k, st.top_p, st.min_p),
                                            with_floor=True)  # [B, Lb] each
            # the static schedule's share of this call: LLaDA's get_num_transfer_tokens(n)[call]
            n0, idx = st.block_masks, jnp.minimum(st.call, spb - 1)  # [B]
            k = n0 // spb + (idx < n0 % spb)  # [B]
            transfer = rules.select(rule_static, st.rule, conf, masked, k, st.threshold, st.factor,
                                    st.remasking)  # [B, Lb]
            canvas = put(st.canvas, bs, jnp.where(transfer, x0, block_tokens))  # [B, L]
            nfe = st.nfe + live
            gen_idx = bs - lp  # [B] block start in the generated region

            def keep_new(old, new):  # old [B, G, ...], new [B, Lb, ...]: write committed positions
                sel = transfer.reshape(transfer.shape + (1,) * (new.ndim - 2))
                return put(old, gen_idx, jnp.where(sel, new, take(old, gen_idx, lb)))

            record = {}
            if key.logprobs:  # raw: the model's own distribution; processed: the one x0 was drawn from
                chosen, top_ids, top_lp = rules.token_logprobs(
                    raw_logits, x0, key.logprobs, mask_id, processed=st.processed_logprobs, drawn=logits,
                    temperature=st.temperature, floor=floor)
                record = dict(commit_logprob=keep_new(st.commit_logprob, chosen), top_ids=keep_new(st.top_ids, top_ids),
                              top_logprobs=keep_new(st.top_logprobs, top_lp))
            return st.replace(canvas=canvas, nfe=nfe, call=st.call + live, credit=credit,
                              commit_step=keep_new(st.commit_step, jnp.broadcast_to(nfe[:, None], transfer.shape)),
                              commit_conf=keep_new(st.commit_conf, conf), batch_nfe=st.batch_nfe + 1, **record)

        def needs_full_call(st):
            """Full-canvas algorithms: the row calls the model this step."""
            mask_left = has_mask(st)
            if decoder.run_empty_steps:
                need = jnp.where(st.rule == rules.FIXED, st.call < spb, mask_left)
            else:
                need = mask_left
            return need & (st.call < max_calls)  # [B]

        def needs_cached_call(st):
            """Cached algorithms, past the refresh: at least one cached call, more while masks remain."""
            return (st.call >= 1) & ((st.call == 1) | has_mask(st)) & (st.call < max_calls)  # [B]

        def full_step(st, live):
            logits, _ = full_forward(st.canvas, st.positions, st.valid, st.prompt, st.cfg_scale, block_start(st),
                                     want_kv=False)
            return commit(st, logits, live)

        def refresh_step(st, entering):
            """Block-start forwards of the entering rows, ``r`` at a time: rebuild their cache, commit their step 0."""
            bs = block_start(st)
            if r == b:  # every row in one forward: no gather
                logits, kv = full_forward(st.canvas, st.positions, st.valid, st.prompt, st.cfg_scale, bs, True)
                sel = entering[:, None, None, None]
                cache = jax.tree.map(lambda old, new: jnp.where(sel, new.astype(old.dtype), old), st.cache, kv)
                return commit(st.replace(cache=cache), logits, entering)

            def chunk(c: RefreshLoop) -> RefreshLoop:
                rows = jnp.argsort(~c.pending, stable=True)[:r]  # [R] the first pending rows
                taken = c.pending[rows]  # [R]
                logits_r, kv = full_forward(st.canvas[rows], st.positions[rows], st.valid[rows], st.prompt[rows],
                                            st.cfg_scale[rows], bs[rows], True)  # [R, Lb, V]
                dest = jnp.where(taken, rows, b)  # padding rows: out of range, dropped
                cache = jax.tree.map(lambda old, new: old.at[dest].set(new.astype(old.dtype), mode="drop"),
                                     c.cache, kv)
                return RefreshLoop(cache, c.logits.at[dest].set(logits_r, mode="drop"),
                                   c.pending.at[dest].set(False, mode="drop"), c.forwards + 1)

            logits0 = jnp.zeros((b, lb, model.spec.vocab), jnp.float32)  # [B, Lb, V]
            loop = jax.lax.while_loop(lambda c: jnp.any(c.pending), chunk,
                                      RefreshLoop(st.cache, logits0, entering, jnp.int32(0)))
            st = commit(st.replace(cache=loop.cache), loop.logits, entering)
            return st.replace(batch_nfe=st.batch_nfe + loop.forwards - 1)  # commit counted one

        def cached_step(st, live):
            bs = block_start(st)
            if cache_mode == "dual":
                start, size = bs - shift, lb + shift
            else:  # prefix: the whole generated region (static size), fresh from the block on
                start, size = jnp.full_like(bs, lp - shift), g + shift
            tokens, positions = take(st.canvas, start, size), take(st.positions, start, size)  # [B, S]
            write = ((start[:, None] + jnp.arange(size)[None, :]) >= bs[:, None]) & live[:, None]  # [B, S]
            h, new_cache = model.hidden(tokens, positions, st.valid[:, None, :], cache=st.cache, write_start=start,
                                        write_mask=write, return_kv=cache_mode == "dual")  # [B, S, D]
            logits = model.head(take(h, bs - shift - start, lb))  # [B, Lb, V]
            if cache_mode == "dual":
                st = st.replace(cache=new_cache)
            return commit(st, logits, live)

        def advance(st, running):
            """Rows whose block is resolved move to their next block (or finish: last block, early stop)."""
            if cache_mode == "none":
                resolved = running & ~needs_full_call(st)
            else:
                resolved = running & (st.call >= 1) & ~needs_cached_call(st)  # [B]
            bs = block_start(st)
            stop_here = st.early_stop & jnp.any(contains_stop(take(st.canvas, bs, lb), st.stop_ids), axis=-1)
            next_block = st.block + resolved
            done = st.done | (resolved & ((next_block >= num_blocks) | stop_here))
            after = jnp.arange(length)[None, :] >= (bs + lb)[:, None]  # [B, L]
            canvas = jnp.where((resolved & stop_here)[:, None] & after, fill_id, st.canvas)
            return st.replace(canvas=canvas, block=next_block, done=done, call=jnp.where(resolved, 0, st.call))

        def step(st: DecodeState) -> DecodeState:
            running = st.active & ~st.done  # [B]
            entering = running & (st.call == 0)  # [B] rows at a block start
            masks_now = jnp.sum(take(st.canvas, block_start(st), lb) == mask_id, axis=-1)  # [B]
            st = st.replace(block_masks=jnp.where(entering, masks_now, st.block_masks))
            if rule_static == rules.CREDIT:
                st = st.replace(credit=jnp.where(entering[:, None, None], 0.0, st.credit))
            if cache_mode == "none":
                live = running & needs_full_call(st)
                st = when(jnp.any(live), lambda s: full_step(s, live), st)
            else:
                st = when(jnp.any(entering), lambda s: refresh_step(s, entering), st)
                live = running & needs_cached_call(st)
                st = when(jnp.any(live), lambda s: cached_step(s, live), st)
            return advance(st, running)

        return step_loop(step, st, budget, exit_on_done)

    return run
