"""Host side of sampling: compiled programs per key, a slot-based session, ``generate``.

A ``DecodeSession`` owns one compiled step program and a device state of B slots. ``admit``
puts requests into free slots, ``step`` runs the program for a few denoising steps (one host
round trip: ``steps_per_call`` steps, or fewer once a row finishes) and reports, per slot, the
tokens that became final and whether the row is done. Every row advances through its own
blocks, so a freed slot takes a waiting request at the next call whatever step the other rows
are at. ``generate`` is a session that admits everything at once and runs until all rows are
done (one call); the server drives sessions directly to stream tokens and refill slots.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import weakref
from typing import Callable, Sequence

import jax
import numpy as np

from dllm_jax.sampling.params import (
    ALGORITHMS,
    BATCH_BUCKETS,
    MAX_TOP_LOGPROBS,
    ContextOverflow,
    PROMPT_BUCKETS,
    ProgramKey,
    SamplingError,
    SamplingParams,
    batch_bucket,
    bucket,
)
from dllm_jax.sampling.state import (
    DecodeState,
    Row,
    empty_state_fn,
    merge_rows,
    row_arrays,
    state_shardings,
    to_device,
)


@dataclasses.dataclass
class SlotUpdate:
    """What one ``step`` changed for one slot.

    Attributes:
      slot: slot index.
      tokens: the row's generated tokens that are final so far (prefix of the canvas up to the
        first still-masked position, cut at the first stop token).
      done: the row needs no more steps.
      finish_reason: 'stop' (a stop token ended it) or 'length', when done.
      nfe: forward passes this row took part in.
      logprobs: with a logprobs program: [len(tokens)] log-probability of each final token at
        its commit step; top_ids / top_logprobs: [len(tokens), K] that step's K most probable.
      commit_step, commit_conf: for a row with ``params.trace``: [len(tokens)] the row's forward
        pass (1-based) that committed each final token, and that commit's confidence (only
        traced rows' arrays leave the device).
    """

    slot: int
    tokens: np.ndarray
    done: bool
    finish_reason: str | None
    nfe: int
    logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    commit_step: np.ndarray | None = None
    commit_conf: np.ndarray | None = None
    # finish_reason 'stop': the stop token that ended the row (it is not in ``tokens``), with
    # its logprob (logprobs programs) and commit step (traced rows) when recorded
    stop_id: int | None = None
    stop_logprob: float | None = None
    stop_commit_step: int | None = None


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
        ``blocks.REFRESH_TOKENS`` and the canvas); programs built after a change use it.
    """

    def __init__(self, model, max_programs: int | None = None, refresh_rows: int | None = None):
        self.model = model
        self.max_programs = max_programs
        self.refresh_rows = refresh_rows
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
                               refresh_rows=self.refresh_rows)
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
                batch_buckets: Sequence[int] = BATCH_BUCKETS) -> ProgramKey:
    """The bucketed program key for a request (``params`` must be resolved)."""
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
                      logprobs=MAX_TOP_LOGPROBS if params.logprobs is not None else 0)


# Denoising steps per host round trip of ``DecodeSession.step`` (a call also returns as soon as
# a row finishes, so its slot can be refilled). Chosen by measurement: docs/performance.md,
# "Step-level scheduling".
STEPS_PER_CALL = 1
# ``generate``'s budget: everything in one call.
UNBOUNDED = 2**30
# Errors computed from one row's own values while laying it out on the host (a value that does
# not fit its array, a prompt that does not fit the bucket): ``DecodeSession.admit(isolate=True)``
# fails that row alone. Anything else (out of memory, a device error) is not one row's fault and
# fails the whole admission, as it may not happen the same way on every process.
ROW_ERRORS = (ValueError, TypeError, ArithmeticError, LookupError)


class DecodeSession:
    """B slots sharing one compiled step program (see module docstring).

    Attributes:
      steps_per_call: the step budget of one ``step`` call.
      last_steps: denoising steps the last ``step`` call ran.
    """

    def __init__(self, model, key: ProgramKey, steps_per_call: int = STEPS_PER_CALL):
        self.model, self.key = model, key
        self.program, self.merge, self.shardings, empty = model.programs.get(key, user=self)
        self.state: DecodeState = empty()
        self.slots: dict[int, Row] = {}
        self.steps_per_call = steps_per_call
        self.last_steps = 0  # denoising steps the last ``step`` call ran
        self._steps = 0
        self._finished: set[int] = set()  # slots whose row is done on the device

    def admit(self, rows: dict[int, Row], *, isolate: bool = False) -> dict[int, Exception]:
        """Put requests into free slots; they start at the next ``step``.

        With ``isolate``, a row whose own values cannot be laid out (``ROW_ERRORS``: e.g. a
        ``top_k`` or stop token id that does not fit the int32 device arrays) is left out and
        returned as {slot: error}; the other rows are admitted and the failed row's slot stays
        free. The session's state changes only once every row is laid out (one merge of the
        good rows), so a failure never leaves it half-updated. Without ``isolate`` any failure raises, as a whole.
        """
        for slot in rows:
            if slot in self.slots:
                raise ValueError(f"slot {slot} is busy")
        try:
            arrays, failed = self._row_arrays(self.key, rows), {}
        except ROW_ERRORS:
            if not isolate:
                raise
            # Which rows? Each alone, in a batch-1 layout (host arrays of one row, its seed's key
            # data from a local program: no collective): a pure function of the row's prompt and
            # params, so under multi-host every process (which replays the same 'admit' command)
            # leaves out the same rows and merges the same rest. (Only on this failure path: the
            # common one lays the rows out once.)
            one = dataclasses.replace(self.key, batch=1)
            failed = {}
            for slot, row in rows.items():
                try:
                    self._row_arrays(one, {0: row})
                except ROW_ERRORS as e:
                    failed[slot] = e
            rows = {slot: row for slot, row in rows.items() if slot not in failed}
            if not failed:  # (only together: not one row's fault)
                raise
            arrays = self._row_arrays(self.key, rows) if rows else None
        if arrays is not None:
            self.state = self.merge(self.state, self._to_device(arrays))
        self.slots.update(rows)
        self._finished.difference_update(rows)
        return failed

    def _row_arrays(self, key: ProgramKey, rows: dict[int, Row]) -> dict[str, np.ndarray]:
        m = self.model
        return row_arrays(key, rows, mask_id=m.mask_token_id, default_stops=m.stop_token_ids, d_model=m.spec.d_model)

    def release(self, slot: int) -> None:
        """Forget a slot (finished or cancelled); its row is frozen until reused.

        A row the device already finished is frozen as it is (no device call); a cancelled
        row is cleared so it stops taking part in steps.
        """
        self.slots.pop(slot, None)
        if slot in self._finished:
            return
        self._finished.add(slot)
        arrays = row_arrays(self.key, {}, mask_id=self.model.mask_token_id, default_stops=(),
                            d_model=self.model.spec.d_model)
        arrays["replace"][slot] = True
        self.state = self.merge(self.state, self._to_device(arrays))

    def _to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        sharding = {f: getattr(self.shardings, f) for f in arrays if f != "replace"}
        sharding["replace"] = self.shardings.active
        return {name: to_device(name, value, sharding[name]) for name, value in arrays.items()}

    def warmup(self) -> None:
        """Compile this key's programs (runs one step and one admission on empty slots)."""
        self._finished.discard(0)
        self.release(0)
        self.state = self._run(1, True)
        jax.block_until_ready(self.state.done)

    def _run(self, steps: int, exit_on_done: bool) -> DecodeState:
        return self.program(self.model.params, self.state, np.int32(steps), np.bool_(exit_on_done))

    def step(self, steps: int | None = None, exit_on_done: bool = True) -> list[SlotUpdate]:
        """Run up to ``steps`` (default ``steps_per_call``) denoising steps in one host round trip
        (fewer once a row finishes, with ``exit_on_done``) and report every occupied slot."""
        self.state = self._run(self.steps_per_call if steps is None else steps, exit_on_done)
        wanted = {"canvas": self.state.canvas, "done": self.state.done, "nfe": self.state.nfe,
                  "batch_steps": self.state.batch_steps}
        if self.key.logprobs:
            wanted.update(commit_logprob=self.state.commit_logprob, top_ids=self.state.top_ids,
                          top_logprobs=self.state.top_logprobs)
        traced = [slot for slot in sorted(self.slots) if self.slots[slot].params.trace]
        if traced:  # only the rows that asked (a gather on the device, then their rows)
            rows = np.asarray(traced, np.int32)
            wanted.update(trace_step=self.state.commit_step[rows], trace_conf=self.state.commit_conf[rows])
        host = fetch(wanted)
        trace_row = {slot: j for j, slot in enumerate(traced)}
        updates = [self._update(slot, host, trace_row.get(slot)) for slot in sorted(self.slots)]
        self._finished.update(u.slot for u in updates if u.done)
        steps = int(host["batch_steps"])
        self.last_steps, self._steps = steps - self._steps, steps
        return updates

    def _update(self, slot: int, host, trace_row: int | None = None) -> SlotUpdate:
        lp, g = self.key.prompt_len, self.key.gen_length
        gen = host["canvas"][slot, lp:lp + g]
        row = self.slots[slot]
        stops = row.params.stop_token_ids if row.params.stop_token_ids is not None else self.model.stop_token_ids
        final, reason = final_prefix(gen, self.model.mask_token_id, stops)
        done = bool(host["done"][slot])
        if done and reason is None:
            reason = "length"
        update = SlotUpdate(slot, final, done, reason if done else None, int(host["nfe"][slot]))
        n = len(final)
        stopped = reason == "stop" and n < len(gen)
        if stopped:
            update.stop_id = int(gen[n])
        if self.key.logprobs:
            update.logprobs = host["commit_logprob"][slot, :n]
            update.top_ids, update.top_logprobs = host["top_ids"][slot, :n], host["top_logprobs"][slot, :n]
            if stopped:
                update.stop_logprob = float(host["commit_logprob"][slot, n])
        if trace_row is not None:  # its row in the traced rows' arrays
            update.commit_step = host["trace_step"][trace_row, :n]
            update.commit_conf = host["trace_conf"][trace_row, :n]
            if stopped:
                update.stop_commit_step = int(host["trace_step"][trace_row, n])
        return update

    @property
    def busy(self) -> bool:
        return bool(self.slots)


def fetch(tree):
    """Device -> host; under multi-process JAX every process gets the full arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.device_get(tree)


def final_prefix(gen: np.ndarray, mask_id: int, stop_ids: Sequence[int]) -> tuple[np.ndarray, str | None]:
    """Tokens before the first still-masked position, cut at the first stop token."""
    masked = np.flatnonzero(gen == mask_id)
    end = int(masked[0]) if masked.size else len(gen)
    stop = np.flatnonzero(np.isin(gen[:end], np.asarray(stop_ids, np.int64)))
    if stop.size:
        return gen[: int(stop[0])], "stop"
    return gen[:end], None


@dataclasses.dataclass
class GenerateOutput:
    """Result of ``Model.generate``.

    Attributes:
      tokens: [B, gen_length] int32, the generated canvas (prompt excluded).
      nfe: forward passes of the batch program (the batch's model calls).
      nfe_per_row: [B] forward passes each row took part in (equals upstream's NFE for it).
      lengths: [B] tokens generated before the first stop token (or still-masked position).
      finish_reasons: per row 'stop' or 'length'.
      trace: with return_trace: {'commit_step': [B, G] (1-based forward pass that committed
        each position, -1 = never), 'commit_conf': [B, G] its confidence}.
      settings: the batch-wide settings the run used (algorithm, gen_length, block_length,
        steps, shift_logits), e.g. to lay out a trace by blocks.
      logprobs: with ``logprobs=k``: {'token_logprobs': [B, G] log-probability of each canvas
        token at the step it was committed (``logprobs_mode`` 'raw': log-softmax of the
        unfiltered logits, before temperature; 'processed': of the distribution it was drawn
        from), 'top_ids': [B, G, k], 'top_logprobs': [B, G, k] that step's k most probable
        tokens of the same distribution}.
    """

    tokens: np.ndarray
    nfe: int
    nfe_per_row: np.ndarray
    lengths: np.ndarray
    finish_reasons: list[str]
    trace: dict | None = None
    settings: dict | None = None
    logprobs: dict | None = None


_PER_ROW = ("temperature", "threshold", "factor", "seed", "remasking", "cfg_scale", "early_stop", "stop_token_ids",
            "top_k", "top_p", "min_p", "logprobs_mode")


def generate(model, prompts: Sequence[Sequence[int]], *, return_trace: bool = False, **sampling) -> GenerateOutput:
    """Generate for a batch of (ragged) prompts.

    Args:
      prompts: list of token-id lists.
      return_trace: include per-position commit step and confidence.
      **sampling: ``SamplingParams`` fields. ``temperature``, ``threshold``, ``factor``,
        ``seed``, ``remasking``, ``cfg_scale``, ``early_stop``, ``stop_token_ids``, ``top_k``,
        ``top_p``, ``min_p`` and ``logprobs_mode`` may also be given per row as a list of len(prompts);
        ``logprobs=k`` (batch-wide) returns each token's log-probability and top k. ``eos_token_id`` (int) is accepted as
        upstream's name for a single stop token.

    Returns:
      GenerateOutput.
    """
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SamplingError("prompts must be a non-empty list of non-empty token lists", "prompts")
    if "eos_token_id" in sampling:
        eos = sampling.pop("eos_token_id")
        sampling.setdefault("stop_token_ids", None if eos is None else (eos,))
    unknown = set(sampling) - {f.name for f in dataclasses.fields(SamplingParams)}
    if unknown:
        raise SamplingError(f"unknown sampling arguments {sorted(unknown)}", sorted(unknown)[0])
    n = len(prompts)
    per_row = []
    for i in range(n):
        kwargs = {}
        for name, value in sampling.items():
            if name in _PER_ROW and isinstance(value, (list, tuple, np.ndarray)) and not (
                    name == "stop_token_ids" and (len(value) == 0 or not isinstance(value[0], (list, tuple)))):
                if len(value) != n:
                    raise SamplingError(f"{name} has {len(value)} entries for {n} prompts", name)
                value = value[i]
            kwargs[name] = value
        per_row.append(SamplingParams(**kwargs).resolve(model.family))
    vocab = model.spec.vocab
    for p in prompts:
        if min(p) < 0 or max(p) >= vocab:
            raise SamplingError(f"prompt token ids must be in [0, {vocab})", "prompts")
        if model.mask_token_id in p:
            raise SamplingError(f"prompt contains the mask token id {model.mask_token_id}", "prompts")
    key = program_key(model, max(map(len, prompts)), per_row[0], n)
    key = dataclasses.replace(key, cfg=any(p.cfg_scale > 0 for p in per_row))
    session = DecodeSession(model, key)
    session.admit({i: Row(prompts[i], per_row[i]) for i in range(n)})
    while True:
        updates = session.step(UNBOUNDED, exit_on_done=False)
        if all(u.done for u in updates):
            break
    st = session.state
    wanted = {"canvas": st.canvas, "batch_nfe": st.batch_nfe, "nfe": st.nfe}
    if return_trace:
        wanted.update(commit_step=st.commit_step, commit_conf=st.commit_conf)
    if key.logprobs:
        wanted.update(commit_logprob=st.commit_logprob, top_ids=st.top_ids, top_logprobs=st.top_logprobs)
    st = fetch(wanted)
    lp, g = key.prompt_len, key.gen_length
    tokens = np.asarray(st["canvas"][:n, lp:lp + g], np.int32)
    lengths = np.array([len(u.tokens) for u in updates])
    trace = None
    if return_trace:
        trace = {"commit_step": np.asarray(st["commit_step"][:n]), "commit_conf": np.asarray(st["commit_conf"][:n])}
    logprobs = None
    if per_row[0].logprobs is not None:
        k = per_row[0].logprobs
        logprobs = {"token_logprobs": np.asarray(st["commit_logprob"][:n]),
                    "top_ids": np.asarray(st["top_ids"][:n, :, :k]), "top_logprobs": np.asarray(st["top_logprobs"][:n, :, :k])}
    return GenerateOutput(tokens=tokens, nfe=int(st["batch_nfe"]), nfe_per_row=np.asarray(st["nfe"][:n]),
                          lengths=lengths, finish_reasons=[u.finish_reason for u in updates], trace=trace,
                          logprobs=logprobs,
                          settings={name: getattr(per_row[0], name) for name in
                                    ("algorithm", "gen_length", "block_length", "steps", "shift_logits")})
