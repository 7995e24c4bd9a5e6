"""Compiled programs of one model: the thread-safe LRU cache, and the bucketed key of a request."""

from __future__ import annotations

import collections
import logging
import threading
import weakref
from typing import Callable, Sequence

import jax

from dllm_jax.sampling.params import (
    ALGORITHMS,
    BATCH_BUCKETS,
    MAX_TOP_LOGPROBS,
    PROMPT_BUCKETS,
    ContextOverflow,
    ProgramKey,
    SamplingParams,
    batch_bucket,
    bucket,
    lean_head_ok,
)
from dllm_jax.sampling.slots import empty_state_fn, merge_rows, state_shardings


class Programs:
    """Compiled programs of one model (thread-safe LRU cache).

    Block programs are cached per ``ProgramKey`` (``get``), other programs (scoring: keys
    are tuples starting with "score") per their own key (``get_or_build``). With
    ``max_programs`` set, the least recently used entries are dropped once more are cached
    (entries no live ``DecodeSession`` uses go first). Dropping an entry is safe for a
    session that still runs it: the session holds its own reference to the jitted functions,
    which (with their compiled executables) are freed when the last user goes. ``on_evict``
    callbacks get each dropped key (called outside the lock, on the thread that built the
    entry that made room). Each ``Model`` owns one as ``model.programs``; sessions of that
    model share it.

    Attributes:
      max_programs: the cap (None: unbounded).
      builds / evictions: entries built / dropped so far.
      refresh_rows: rows per refresh chunk of the block decoders (None: from
        ``twins.REFRESH_TOKENS`` and the canvas); programs built after a change use it.
      lean_head: ``program_key`` gives requests that allow it lean-head keys (no [B, Lb, V]
        logits; docs/sampling.md "The lean head"); off by default: a key then admits any row.
      share_forwards: rows entering a block with identical inputs (the n samples of one prompt,
        repeated prompts) run one block-start forward (``blocks.same_forward``; on by default,
        tokens unchanged); programs built after a change use it.
    """

    def __init__(self, model, max_programs: int | None = None, refresh_rows: int | None = None):
        self.model = model
        self.max_programs = max_programs
        self.refresh_rows = refresh_rows
        self.lean_head = False
        self.share_forwards = True
        self._cache: collections.OrderedDict = collections.OrderedDict()  # oldest use first
        self._users: dict = {}  # key -> WeakSet of the sessions using it
        self._lock = threading.RLock()
        self.builds = 0
        self.evictions = 0
        self.on_evict: list[Callable[[object], None]] = []

    def set_limit(self, max_programs: int | None) -> None:
        """Change the cap (None or 0: unbounded); evicts at once if needed."""
        with self._lock:
            self.max_programs = max_programs or None
            dropped = self._shrink(keep=None)
        self._notify(dropped)

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._cache

    def keys(self) -> list:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._cache)

    def get_or_build(self, key, build):
        """Any other compiled program of this model (e.g. scoring), built once per ``key``."""
        return self._lookup(key, build)

    def get(self, key: ProgramKey, user=None):
        """The block program of ``key``: (program, merge, shardings, empty); ``user`` (a session)
        marks it in use while that object lives."""
        return self._lookup(key, lambda: self._build(key), user)

    def _lookup(self, key, build, user=None):
        dropped = []
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                entry = self._cache[key] = build()
                self.builds += 1
            self._cache.move_to_end(key)
            if user is not None:
                self._users.setdefault(key, weakref.WeakSet()).add(user)
            dropped = self._shrink(keep=key)
        self._notify(dropped)
        return entry

    def _shrink(self, keep) -> list:
        """Drop LRU entries over the cap (unused ones first, never ``keep``); the dropped keys."""
        if self.max_programs is None:
            return []
        dropped = []
        for busy_too in (False, True):
            for key in list(self._cache):
                if len(self._cache) <= self.max_programs:
                    return dropped
                if key == keep or (not busy_too and self._users.get(key)):
                    continue
                del self._cache[key]
                self._users.pop(key, None)
                self.evictions += 1
                dropped.append(key)
        return dropped

    def _notify(self, dropped) -> None:
        for key in dropped:
            for callback in list(self.on_evict):
                try:
                    callback(key)
                except Exception:  # noqa: BLE001 - a listener must not break sampling
                    logging.getLogger(__name__).exception("on_evict callback failed")

    def _build(self, key: ProgramKey):
        m = self.model
        shardings = state_shardings(key, m.mesh, m.spec)
        param_shardings = jax.tree.map(lambda x: x.sharding, m.params)
        fn = key.decoder.build(key, m.graphdef, mask_id=m.mask_token_id, fill_id=m.config.eos_token_id,
                               refresh_rows=self.refresh_rows, share=self.share_forwards)
        scalar = shardings.batch_nfe  # (budget, exit_on_done): replicated scalars
        program = jax.jit(fn, in_shardings=(param_shardings, shardings, scalar, scalar), out_shardings=shardings,
                          donate_argnums=(1,))
        # a fresh function per entry: jax caches traces and executables weakly by function, so
        # jitting the shared merge_rows would keep every evicted key's merge executable alive
        merge = jax.jit(lambda state, new: merge_rows(state, new), out_shardings=shardings, donate_argnums=(0,))
        empty = empty_state_fn(key, m.spec, m.dtype, shardings, mask_id=m.mask_token_id)
        return program, merge, shardings, empty


def program_key(model, prompt_len: int, params: SamplingParams, batch: int, *,
                prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
                batch_buckets: Sequence[int] = BATCH_BUCKETS, lean_head: bool | None = None) -> ProgramKey:
    """The bucketed program key for a request (``params`` must be resolved). ``lean_head``: a
    lean-head key when ``params`` allow one (``lean_head_ok``); such a key admits only rows that do
    (None: the model's ``programs.lean_head``)."""
    if lean_head is None:
        lean_head = getattr(getattr(model, "programs", None), "lean_head", False)
    decoder = ALGORITHMS[params.algorithm].decoder
    extra = decoder.extra_length(params.block_length)
    limit = model.max_length - params.gen_length - extra
    if prompt_len + params.gen_length + extra > model.max_length:
        raise ContextOverflow(prompt_len, params.gen_length, extra, model.max_length)
    lp = min(bucket(prompt_len, prompt_buckets), limit)
    b = batch_bucket(batch, model.mesh.shape["data"], batch_buckets)
    num_blocks = params.gen_length // params.block_length
    spb = decoder.steps_per_block(params.steps, num_blocks)
    return ProgramKey(algorithm=params.algorithm, batch=b, prompt_len=lp, gen_length=params.gen_length,
                      block_length=params.block_length, steps_per_block=spb, cfg=params.cfg_scale > 0,
                      shift=bool(params.shift_logits),
                      logprobs=MAX_TOP_LOGPROBS if params.logprobs is not None else 0,
                      lean_head=lean_head and lean_head_ok(params),
                      lookahead=params.block_add_threshold is not None and num_blocks >= 2)
