"""The step program of the LLaDA-style algorithms (basic, no_cache, prefix_cache, dual_cache, dInfer).

``BlockProgram.run(params, state, budget, exit_on_done)`` is a pure function: a ``lax.while_loop`` whose
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

Multi-block decoding (``key.lookahead``, ``lookahead.py``): every forward reads out a window of two
blocks, the row's block and the next, which commits on its own merit once the block is far enough
along (``transfer``); a next block filled that way is passed over (``advance``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dllm_jax.models.transformer import rows as take  # per-row window x[b, start[b] : start[b] + size]
from dllm_jax.sampling import head, lookahead, proposal, rules
from dllm_jax.sampling.loops import step_loop, when
from dllm_jax.sampling.twins import chunk_rows, gathered
from dllm_jax.sampling.state import DecodeState

# (annotations only: ``ProgramKey`` is dllm_jax.sampling.params' and ``BlockDecoder`` decoders';
# those modules import this one)


def put(x, start, values):
    return jax.vmap(lambda r, v, s: jax.lax.dynamic_update_slice_in_dim(r, v, s, axis=0))(x, values, start)


def contains_stop(tokens, stop_ids):
    """tokens [B, T], stop_ids [B, S] (-1 unused) -> [B, T] bool."""
    return jnp.any((tokens[:, :, None] == stop_ids[:, None, :]) & (stop_ids[:, None, :] >= 0), axis=-1)


@dataclasses.dataclass(frozen=True)
class BlockProgram:
    """The step program of one program key (see the module docstring); jit ``run`` outside.

    Attributes:
      key: the program key (shapes and static settings).
      decoder: the key's ``BlockDecoder`` (cache mode, fixed rule, empty steps).
      graphdef: the model's graph definition (``nnx.split``); ``run`` merges it with the params.
      mask_id, fill_id: the mask token and what fills a canvas after an early stop.
      chunk: rows per refresh forward (``chunk_rows``; the batch size = every row in one
        forward, no gather).
      share: entering rows with identical forward inputs run one refresh forward
        (``twins.same_forward``; only where refreshes are gathered in chunks).
    """

    key: ProgramKey
    decoder: BlockDecoder
    graphdef: object
    mask_id: int
    fill_id: int
    chunk: int
    share: bool = True

    @property
    def num_blocks(self) -> int:
        return self.key.gen_length // self.key.block_length

    @property
    def shift(self) -> int:
        """1: position j's prediction is read from output j - 1."""
        return 1 if self.key.shift else 0

    @property
    def max_calls(self) -> int:
        """Model calls a row may make in one block: every threshold/factor step commits >= 1 token."""
        return max(self.key.steps_per_block, self.key.block_length) + 1

    def run(self, params, st: DecodeState, budget, exit_on_done) -> DecodeState:
        """``budget`` denoising steps of every live row (fewer: see ``step_loop``)."""
        model = nnx.merge(self.graphdef, params)
        return step_loop(lambda s: self.step(model, s), st, budget, exit_on_done)

    def step(self, model, st: DecodeState) -> DecodeState:
        running = st.progress.active & ~st.progress.done  # [B]
        entering = running & (st.progress.call == 0)  # [B] rows at a block start
        masks_now = jnp.sum(self.block_tokens(st) == self.mask_id, axis=-1)  # [B]
        st = st.update(block_masks=jnp.where(entering, masks_now, st.progress.block_masks))
        if self.decoder.fuses_credit:
            st = st.update(credit=jnp.where(entering[:, None, None], 0.0, st.credit))
        if not self.decoder.uses_cache:
            live = running & self.needs_full_call(st)
            st = when(jnp.any(live), lambda s: self.full_step(model, s, live), st)
        else:
            st = when(jnp.any(entering), lambda s: self.refresh_step(model, s, entering), st)
            live = running & self.needs_cached_call(st)
            st = when(jnp.any(live), lambda s: self.cached_step(model, s, live), st)
        return self.advance(st, running)

    @property
    def window(self) -> int:
        """Positions a forward reads out: the block, or with look-ahead two blocks (``lookahead``)."""
        return 2 * self.key.block_length if self.key.lookahead else self.key.block_length

    def window_start(self, st: DecodeState):
        """[B] the first canvas position of the row's window (its block start without look-ahead)."""
        key = self.key
        bs = self.block_start(st)
        return lookahead.window_start(bs, key.prompt_len, key.gen_length, self.window) if key.lookahead else bs

    def ahead(self, st: DecodeState):
        """[B] the row's look-ahead block is active (``lookahead.active``; never without look-ahead)."""
        masks_now = jnp.sum(self.block_tokens(st) == self.mask_id, axis=-1)
        return lookahead.active(self.key.lookahead, st.progress.block, self.num_blocks, masks_now,
                                self.key.block_length, st.knobs.block_add_threshold)

    def block_start(self, st: DecodeState):
        """[B] the row's block start in the canvas."""
        key = self.key
        return key.prompt_len + jnp.minimum(st.progress.block, self.num_blocks - 1) * key.block_length

    def block_tokens(self, st: DecodeState):
        """[B, Lb] the row's block."""
        return take(st.tokens.canvas, self.block_start(st), self.key.block_length)

    def needs_full_call(self, st: DecodeState):
        """Full-canvas algorithms: [B] the row calls the model this step."""
        mask_left = jnp.any(self.block_tokens(st) == self.mask_id, axis=-1)
        call = st.progress.call
        if self.decoder.run_empty_steps:
            need = jnp.where(st.knobs.rule == rules.FIXED, call < self.key.steps_per_block, mask_left)
        else:
            need = mask_left
        return need & (call < self.max_calls)  # [B]

    def needs_cached_call(self, st: DecodeState):
        """Cached algorithms, past the refresh: [B] at least one cached call, more while masks remain."""
        call = st.progress.call
        mask_left = jnp.any(self.block_tokens(st) == self.mask_id, axis=-1)
        return (call >= 1) & ((call == 1) | mask_left) & (call < self.max_calls)  # [B]

    def forward(self, model, rows, ws, want_kv: bool, trim: bool = False):
        """Hidden states of the rows' windows from a full-canvas forward (and its K/V): [n, W, D],
        with CFG [n, 2, W, D] (cond, uncond; ``head.block_head`` guides their logits).

        ``rows``: (canvas, positions, valid, prompt, cfg_scale) of the n rows; ``ws``: [n] their
        window starts (``window_start``). ``trim``: the last block runs on the window alone
        (``Transformer.hidden``'s ``out``). Only the plain full step trims: inside the refresh's
        gathered loop a trimmed last block is not bitwise batch-invariant in bf16 (an MLP over
        chunk x window rows in a while loop against one row's outside it; measured with
        tests/test_batch_invariance.py), so the refresh keeps the whole-canvas last block."""
        canvas, positions, valid, prompt, _ = rows
        lb, shift = self.window, self.shift
        tokens, mask = canvas, valid[:, None, :]  # [n, L], [n, 1, L]
        if self.key.cfg:
            uncond = jnp.where(prompt, self.mask_id, canvas)  # [n, L]
            tokens = jnp.concatenate([canvas, uncond])  # [2n, L]
            positions = jnp.concatenate([positions, positions])
            mask = jnp.concatenate([mask, mask])
            ws = jnp.concatenate([ws, ws])
        if trim:
            h, kv = model.hidden(tokens, positions, mask, return_kv=want_kv, out=(ws - shift, lb))  # [n or 2n, W, D]
        else:
            h, kv = model.hidden(tokens, positions, mask, return_kv=want_kv)  # [n or 2n, L, D]
            h = take(h, ws - shift, lb)
        if self.key.cfg:
            n = canvas.shape[0]
            return jnp.stack([h[:n], h[n:]], axis=1), kv
        return h, kv

    @staticmethod
    def forward_rows(st: DecodeState, rows=slice(None)):
        """What ``forward`` reads of the selected rows."""
        t = st.tokens
        return t.canvas[rows], t.positions[rows], t.valid[rows], t.prompt[rows], st.knobs.cfg_scale[rows]

    def full_step(self, model, st: DecodeState, live) -> DecodeState:
        hb, _ = self.forward(model, self.forward_rows(st), self.window_start(st), want_kv=False, trim=True)
        return self.commit(model, st, hb, live)

    def refresh_step(self, model, st: DecodeState, entering) -> DecodeState:
        """Block-start forwards of the entering rows, ``chunk`` at a time: rebuild their cache, commit their step 0."""
        bs, ws, b = self.block_start(st), self.window_start(st), self.key.batch
        if self.chunk == b:  # every row in one forward: no gather
            hb, kv = self.forward(model, self.forward_rows(st), ws, True)
            sel = entering[:, None, None, None]
            cache = jax.tree.map(lambda old, new: jnp.where(sel, new.astype(old.dtype), old), st.cache, kv)
            return self.commit(model, st.replace(cache=cache), hb, entering)

        def scatter(cache, dest, kv):
            return jax.tree.map(lambda old, new: old.at[dest].set(new.astype(old.dtype), mode="drop"), cache, kv)

        hidden0 = jnp.zeros((b, self.window, model.spec.d_model), model.embed[...].dtype)  # [B, W, D]
        cache, hidden, forwards = gathered(
            lambda rows: self.forward(model, self.forward_rows(st, rows), ws[rows], True), scatter, st, entering, bs,
            hidden0, self.chunk, self.share)
        st = self.commit(model, st.replace(cache=cache), hidden, entering)
        return st.replace(batch_nfe=st.batch_nfe + forwards - 1)  # commit counted one

    def cached_step(self, model, st: DecodeState, live) -> DecodeState:
        key, shift = self.key, self.shift
        bs, ws, dual = self.block_start(st), self.window_start(st), self.decoder.cache == "dual"
        if dual:  # the window; a look-ahead block takes fresh keys/values only while active
            start, size = ws - shift, self.window + shift
        else:  # prefix: the whole generated region (static size), fresh from the block on
            start, size = jnp.full_like(bs, key.prompt_len - shift), key.gen_length + shift
        tokens, positions = take(st.tokens.canvas, start, size), take(st.tokens.positions, start, size)  # [B, S]
        pos = start[:, None] + jnp.arange(size)[None, :]  # [B, S]
        write = (pos >= bs[:, None]) & live[:, None]
        if dual and key.lookahead:
            write &= (pos < (bs + key.block_length)[:, None]) | self.ahead(st)[:, None]
        h, new_cache = model.hidden(tokens, positions, st.tokens.valid[:, None, :], cache=st.cache,
                                    write_start=start, write_mask=write, return_kv=dual)  # [B, S, D]
        hb = take(h, ws - shift - start, self.window)  # [B, W, D]
        if dual:
            st = st.replace(cache=new_cache)
        return self.commit(model, st, hb, live)

    def commit(self, model, st: DecodeState, hb, live) -> DecodeState:
        """Head, propose, select and write tokens for rows in ``live`` [B] from their window hidden
        states ``hb`` (``forward``); count their forward pass. The head runs in vocabulary chunks
        (``head.block_head``; a lean key's program never holds [B, W, V] logits: its T > 0 draw is
        the head's)."""
        key, k_, p = self.key, st.knobs, st.progress
        ws = self.window_start(st)  # [B]
        tokens = take(st.tokens.canvas, ws, self.window)  # [B, W]
        masked = (tokens == self.mask_id) & live[:, None]  # [B, W]
        keys = jax.vmap(jax.random.fold_in)(k_.rng, p.nfe)
        stats, logits = head.block_head(model, hb, k_.cfg_scale if key.cfg else None, self.mask_id,
                                        top_k=key.logprobs, keep_logits=not key.lean_head, knobs=k_, keys=keys,
                                        fuses_credit=self.decoder.fuses_credit)
        fused, credit = None, st.credit  # [B, Lb, V]
        if self.decoder.fuses_credit:
            fused, new_credit = rules.credit_fuse(logits, credit, masked, (p.call == 0)[:, None, None])
            credit = jnp.where(live[:, None, None], new_credit, credit)
        x0, conf, floor, logit = head.propose(stats, logits, k_, keys, self.mask_id, fused)  # [B, W] each
        entropy = None
        if self.decoder.rows_pick_rule:  # rows may pick the EB-Sampler: the entropy of what x0 is drawn from
            entropy = stats.entropy() if fused is None else jax.lax.cond(
                jnp.any(k_.rule == rules.ENTROPY_BOUND), lambda f: proposal.entropy(f, self.mask_id),
                lambda f: jnp.zeros(f.shape[:2], jnp.float32), fused)
        transfer = self.transfer(st, conf, masked, entropy)  # [B, W]
        canvas = put(st.tokens.canvas, ws, jnp.where(transfer, x0, tokens))  # [B, L]
        nfe = p.nfe + live
        gen_idx = ws - key.prompt_len  # [B] window start in the generated region

        def keep_new(old, new):  # old [B, G, ...], new [B, W, ...]: write committed positions
            sel = transfer.reshape(transfer.shape + (1,) * (new.ndim - 2))
            return put(old, gen_idx, jnp.where(sel, new, take(old, gen_idx, self.window)))

        r = st.records
        record = {}
        if key.logprobs:  # raw: the model's own distribution; processed: the one x0 was drawn from
            chosen, top_ids, top_lp = head.logprobs(stats, logits, x0, logit, k_, self.mask_id, floor, fused)
            record = dict(commit_logprob=keep_new(r.commit_logprob, chosen), top_ids=keep_new(r.top_ids, top_ids),
                          top_logprobs=keep_new(r.top_logprobs, top_lp))
        return st.update(canvas=canvas, nfe=nfe, call=p.call + live, credit=credit,
                         commit_step=keep_new(r.commit_step, jnp.broadcast_to(nfe[:, None], transfer.shape)),
                         commit_conf=keep_new(r.commit_conf, conf), batch_nfe=st.batch_nfe + 1, **record)

    def transfer(self, st: DecodeState, conf, masked, entropy):
        """[B, W] the positions this call commits: the block's by the rule (``rules.select``), and
        with look-ahead the active next block's by ``lookahead.select`` (conf, masked, entropy [B, W])."""
        key, k_, p, lb = self.key, st.knobs, st.progress, self.key.block_length
        # the static schedule's share of this call: LLaDA's get_num_transfer_tokens(n)[call]
        spb = key.steps_per_block
        n0, idx = p.block_masks, jnp.minimum(p.call, spb - 1)  # [B]
        k = n0 // spb + (idx < n0 % spb)  # [B]
        offset = self.block_start(st) - self.window_start(st)  # [B] the block in the window: 0 or Lb

        def cur(x):
            return x if x is None or not key.lookahead else lookahead.current(x, offset, lb)

        sel = rules.select(None if self.decoder.rows_pick_rule else self.decoder.rule, k_.rule, cur(conf), cur(masked),
                           k, k_.threshold, k_.factor, k_.remasking, cur(entropy), k_.entropy_bound)  # [B, Lb]
        if not key.lookahead:
            return sel
        ahead = lookahead.select(k_.rule, conf[:, lb:], masked[:, lb:] & self.ahead(st)[:, None], k_.threshold,
                                 k_.factor, None if entropy is None else entropy[:, lb:], k_.entropy_bound)
        return lookahead.combine(sel, ahead, offset, lb)

    def advance(self, st: DecodeState, running) -> DecodeState:
        """Rows whose block is resolved move to their next block (or finish: last block, early stop).
        With look-ahead, a next block it filled completely is passed over (its stop tokens count)."""
        p, k_, lb = st.progress, st.knobs, self.key.block_length
        if not self.decoder.uses_cache:
            resolved = running & ~self.needs_full_call(st)
        else:
            resolved = running & (p.call >= 1) & ~self.needs_cached_call(st)  # [B]
        bs = self.block_start(st)
        stop_here = k_.early_stop & jnp.any(contains_stop(self.block_tokens(st), k_.stop_ids), axis=-1)
        skip = jnp.zeros_like(resolved)
        if self.key.lookahead:
            nxt = take(st.tokens.canvas, bs + lb, lb)  # [B, Lb] (clamped in the last block: unused there)
            skip = resolved & ~stop_here & (p.block + 1 < self.num_blocks) & ~jnp.any(nxt == self.mask_id, axis=-1)
            stop_here |= skip & k_.early_stop & jnp.any(contains_stop(nxt, k_.stop_ids), axis=-1)
        next_block = p.block + resolved + skip
        done = p.done | (resolved & ((next_block >= self.num_blocks) | stop_here))
        after = jnp.arange(self.key.canvas_len)[None, :] >= (bs + lb * (1 + skip))[:, None]  # [B, L]
        canvas = jnp.where((resolved & stop_here)[:, None] & after, self.fill_id, st.tokens.canvas)
        return st.update(canvas=canvas, block=next_block, done=done, call=jnp.where(resolved, 0, p.call))


def make_step_program(key: "ProgramKey", decoder: "BlockDecoder", graphdef, *, mask_id: int, fill_id: int,
                      refresh_rows: int | None = None, share: bool = True):
    """``run(params, state, budget, exit_on_done) -> state`` of one program key (jit it outside);
    ``refresh_rows``: rows per refresh chunk (default from REFRESH_TOKENS); ``share``: twins
    share a refresh forward (``twins.same_forward``)."""
    program = BlockProgram(key, decoder, graphdef, mask_id, fill_id, chunk_rows(key.batch, key.canvas_len, refresh_rows),
                           share)
    return program.run
