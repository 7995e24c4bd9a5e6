"""The engine the routes see (``info``, ``health``, ``warmup``, ``submit``) and its scheduler.

One scheduler thread owns the model's decode sessions; the asyncio front end only puts
sequences into a bounded queue and reads events back, so ``/health`` and ``/metrics`` answer
while a block program runs.

Scheduling (``Engine._schedule``), at every block boundary:

1. waiting sequences (FIFO) are admitted into free slots of running sessions of their
   *group* (requests whose ProgramKeys are equal up to batch size and prompt bucket share a
   compiled program; a shorter prompt may join a session of a longer prompt bucket: it is
   left-padded, which does not change its output);
2. a group with no room opens a new session once it has ``max_batch_size`` sequences
   waiting or its oldest has waited ``max_wait_ms``, as long as fewer than ``max_sessions``
   sessions run. When the session limit blocks the oldest waiting sequence, later arrivals
   stop joining running sessions, so those drain and the blocked group gets its turn (FIFO
   fairness, no starvation);
3. one session (round robin) runs one block program; each occupied slot reports its final
   tokens, which are posted to the request's handle; finished or cancelled rows free their
   slot for step 1.

The sequence of session calls goes through ``serve.executor.Executor`` so process 0 can
broadcast it to the other hosts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np

from dllm_jax.sampling import ProgramKey, SamplingError, SamplingParams, program_key
from serve.compiler import Compiler
from serve.executor import Executor
from serve.metrics import Metrics
from serve.protocol import APIError

log = logging.getLogger("serve.engine")


class State(enum.Enum):
    LOADING = "loading"
    WARMING_UP = "warming_up"
    READY = "ready"
    DEAD = "dead"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the HTTP layer may know about the served model."""

    names: tuple[str, ...]
    family: str
    tokenizer: object
    max_length: int
    vocab: int
    mask_token_id: int
    stop_token_ids: tuple[int, ...]
    source: str
    demo: bool
    mesh: dict
    created: int


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Batching knobs (see the module docstring)."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_sessions: int = 4
    batch_buckets: tuple[int, ...] | None = None    # default: powers of two up to max_batch_size
    demand_window_s: float = 2.0                    # new batches are sized for the recent peak demand
    prompt_buckets: tuple[int, ...] | None = None   # default: the sampler's
    warmup: tuple[tuple[int, int, int], ...] = ()   # (batch, prompt_len, gen_length), family defaults
    heartbeat_s: float | None = None                # multi-host: a noop command when idle this long
    background_compile: bool = True                 # single host; multi-host compiles inline (in order)

    def batch_bucket_list(self) -> tuple[int, ...]:
        if self.batch_buckets:
            return tuple(sorted(self.batch_buckets))
        out, b = [], 1
        while b < self.max_batch_size:
            out.append(b)
            b *= 2
        return tuple(out + [self.max_batch_size])


@dataclasses.dataclass
class SeqRequest:
    """One canvas to generate (a request with n choices is n of these)."""

    prompt: list[int]
    params: SamplingParams  # resolved
    max_tokens: int


@dataclasses.dataclass
class Event:
    """Progress of one sequence: its final tokens so far (already cut at max_tokens)."""

    index: int
    tokens: np.ndarray
    done: bool
    finish_reason: str | None
    nfe: int
    error: APIError | None = None


class Handle:
    """The asyncio side of one request: events from the scheduler, cancellation to it."""

    def __init__(self, engine: "Engine", loop: asyncio.AbstractEventLoop):
        self.engine, self.loop = engine, loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.seq_ids: list[int] = []
        self.arrival = time.monotonic()

    def post(self, event: Event) -> None:  # scheduler thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # event loop closed (shutdown)
            pass

    async def next(self) -> Event:
        event = await self.queue.get()
        if event.error is not None:
            raise event.error
        return event

    def cancel(self, index: int | None = None) -> None:
        """Drop one sequence (or all): removed from the queue, or its slot freed at the next block."""
        ids = self.seq_ids if index is None else [self.seq_ids[index]]
        self.engine.cancel(ids)


@dataclasses.dataclass(eq=False)
class _Seq:
    id: int
    index: int
    req: SeqRequest
    handle: Handle
    group: ProgramKey   # the ProgramKey with batch and prompt_len zeroed
    need: int           # its own prompt bucket
    arrival: float
    sent: int = -1


@dataclasses.dataclass(eq=False)
class _Session:
    sid: int
    key: ProgramKey
    group: ProgramKey
    slots: dict[int, _Seq]

    def free(self) -> list[int]:
        return [i for i in range(self.key.batch) if i not in self.slots]


class Engine:
    """Owns the model and the scheduler thread."""

    def __init__(self, load: Callable[[], object], *, names: Sequence[str], options: EngineOptions = EngineOptions(),
                 metrics: Metrics | None = None, demo: bool = False,
                 make_executor: Callable[[object], Executor] | None = None):
        self._load, self.names, self.options, self.demo = load, tuple(names), options, demo
        self.metrics = metrics or Metrics()
        self._make_executor = make_executor or Executor
        self.state = State.LOADING
        self.error: str | None = None
        self.model = None
        self.executor: Executor | None = None
        self._info: ModelInfo | None = None
        self._cv = threading.Condition()
        self._inbox: list[_Seq] = []
        self._cancel: set[int] = set()
        self._queued = 0
        self._stopping = False
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.waiting: list[_Seq] = []
        self.sessions: list[_Session] = []
        self._rr = 0
        self._last_command = time.monotonic()
        self.compiler: Compiler | None = None
        self._blocked: set[ProgramKey] = set()  # groups waiting for a compile
        self._demand: dict[ProgramKey, tuple[int, float]] = {}  # group -> (peak sequences, since)

    # ---- interface for the HTTP layer ----------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="dllm-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def health(self) -> tuple[bool, str]:
        if self.state is State.READY and not (self._thread and self._thread.is_alive()):
            self.state, self.error = State.DEAD, self.error or "scheduler thread exited"
        return self.state is State.READY, self.state.value

    def info(self) -> ModelInfo:
        ready, state = self.health()
        if not ready:
            detail = f": {self.error}" if self.error else ""
            raise APIError(503, f"the engine is {state.replace('_', ' ')}{detail}", code=state)
        return self._info

    def submit(self, seqs: Sequence[SeqRequest]) -> Handle:
        """Queue sequences; raises APIError 413 (does not fit), 429 (queue full), 503 (not ready)."""
        self.info()
        handle = Handle(self, asyncio.get_running_loop())
        items = []
        for index, req in enumerate(seqs):
            try:
                key = program_key(self.model, len(req.prompt), req.params, 1,
                                  prompt_buckets=self._prompt_buckets(), batch_buckets=(1,))
            except SamplingError as e:
                message = str(e).replace("gen_length (", "max_tokens rounded up to whole blocks (")
                raise APIError(413, message, param="max_tokens", code="context_length_exceeded") from None
            group = dataclasses.replace(key, batch=0, prompt_len=0)
            items.append(_Seq(next(self._ids), index, req, handle, group, key.prompt_len, handle.arrival))
        with self._cv:
            if self._queued + len(items) > self.options.max_queue:
                raise APIError(429, f"the queue is full ({self._queued} sequences waiting, limit "
                                    f"{self.options.max_queue}); retry later", code="queue_full",
                               headers={"Retry-After": "1"})
            self._queued += len(items)
            self._inbox.extend(items)
            self._cv.notify()
        handle.seq_ids = [s.id for s in items]
        return handle

    def cancel(self, seq_ids: Sequence[int]) -> None:
        with self._cv:
            self._cancel.update(seq_ids)
            self._cv.notify()

    def _prompt_buckets(self):
        from dllm_jax.sampling.params import PROMPT_BUCKETS

        return self.options.prompt_buckets or PROMPT_BUCKETS

    # ---- scheduler thread ----------------------------------------------------------------

    def _main(self) -> None:
        try:
            t0 = time.monotonic()
            model = self._load()
            self.model = model
            self.executor = self._make_executor(model)
            self.compiler = Compiler(self.executor.warmup, background=self.options.background_compile,
                                     on_done=self._wake, metrics=self.metrics)
            self._info = ModelInfo(
                names=self.names, family=model.family, tokenizer=model.tokenizer, max_length=model.max_length,
                vocab=model.spec.vocab, mask_token_id=model.mask_token_id,
                stop_token_ids=tuple(model.stop_token_ids), source=str(model.source), demo=self.demo,
                mesh=dict(model.mesh.shape), created=int(time.time()))
            log.info("loaded %r in %.1fs", model, time.monotonic() - t0)
            self.state = State.WARMING_UP
            self._warmup()
            self.state = State.READY
            self.metrics.set("engine_ready", 1)
            log.info("ready: serving %s", ", ".join(self.names))
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the engine must report, not vanish
            log.exception("engine failed")
            self.error = f"{type(e).__name__}: {e}"
            self.state = State.DEAD
            self.metrics.set("engine_ready", 0)
            self._fail_all(APIError(503, f"the engine died: {self.error}", code="engine_dead"))

    def _warmup(self) -> None:
        from serve.params import default_params

        buckets = self.options.warmup
        for i, (batch, prompt_len, gen_length) in enumerate(buckets, 1):
            params = default_params(self.model.family, gen_length)
            key = program_key(self.model, prompt_len, params, batch, prompt_buckets=self._prompt_buckets(),
                              batch_buckets=self.options.batch_bucket_list())
            t0 = time.monotonic()
            self.executor.warmup(key)
            self.compiler.add(key)
            self.metrics.inc("compiles_total")
            log.info("warmup %d/%d: compiled %s in %.1fs", i, len(buckets), key, time.monotonic() - t0)

    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self.sessions and not self._inbox and not self._cancel and not self._stopping:
                    self._cv.wait(self._idle_timeout())
                new, self._inbox = self._inbox, []
                cancels, self._cancel = self._cancel, set()
                stopping = self._stopping
            if stopping:
                self.compiler.shutdown()
                self.executor.shutdown()
                return
            self.waiting.extend(new)
            if cancels:
                self._apply_cancels(cancels)
            self._schedule(time.monotonic())
            if self.sessions:
                self._rr = (self._rr + 1) % len(self.sessions)
                self._step(self.sessions[self._rr])
            elif self.options.heartbeat_s and time.monotonic() - self._last_command > self.options.heartbeat_s:
                self.executor.noop()
                self._last_command = time.monotonic()
            self._publish()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _idle_timeout(self) -> float | None:
        timeouts = []
        waiting = [s for s in self.waiting if s.group not in self._blocked]  # blocked: woken by the compile
        if waiting:
            oldest = min(s.arrival for s in waiting)
            timeouts.append(max(0.0, oldest + self.options.max_wait_ms / 1e3 - time.monotonic()))
        if self.options.heartbeat_s:
            timeouts.append(self.options.heartbeat_s)
        return min(timeouts) if timeouts else None

    def _apply_cancels(self, ids: set[int]) -> None:
        kept = []
        for seq in self.waiting:
            if seq.id in ids:
                self._dequeued(1)
                self.metrics.inc("requests_cancelled_total")
            else:
                kept.append(seq)
        self.waiting = kept
        for session in list(self.sessions):
            for slot, seq in list(session.slots.items()):
                if seq.id in ids and session in self.sessions:
                    self.metrics.inc("requests_cancelled_total")
                    self._release(session, slot)

    def _schedule(self, now: float) -> None:
        opts = self.options
        free = {s.sid: s.free() for s in self.sessions}
        admits: dict[int, dict[int, _Seq]] = {}
        rest: list[_Seq] = []
        barrier = False
        for seq in self.waiting:
            target = None
            if not barrier:
                target = next((s for s in self.sessions if s.group == seq.group and s.key.prompt_len >= seq.need
                               and free[s.sid]), None)
            if target is None:
                rest.append(seq)
                barrier = barrier or len(self.sessions) >= opts.max_sessions
                continue
            admits.setdefault(target.sid, {})[free[target.sid].pop(0)] = seq
        # New sessions for groups that are ready.
        groups: dict[ProgramKey, list[_Seq]] = {}
        for seq in rest:
            groups.setdefault(seq.group, []).append(seq)
        self._track_demand(now)
        self._blocked = set()
        for group, seqs in groups.items():
            if len(self.sessions) >= opts.max_sessions:
                break
            # full = the recent peak demand of this group (1 when it is quiet), or max_batch_size
            target = min(opts.max_batch_size, max(1, self._demand.get(group, (0, 0.0))[0]))
            if len(seqs) < target and now - seqs[0].arrival < opts.max_wait_ms / 1e3:
                continue
            chosen = seqs[:opts.max_batch_size]
            try:
                rows = max(len(chosen), target)
                exact = program_key(self.model, max(len(s.req.prompt) for s in chosen), chosen[0].req.params,
                                    rows, prompt_buckets=self._prompt_buckets(),
                                    batch_buckets=opts.batch_bucket_list())
                error = self.compiler.take_failure(exact)
                if error is not None:
                    raise error
                # the exact program if compiled, else (while it compiles) a borrowed bigger one
                key = exact if self.compiler.ready(exact) else self.compiler.borrow(exact, len(chosen))
                if key is None:
                    self._blocked.add(group)
                    continue
                chosen = chosen[:key.batch]
                session = _Session(self.executor.open(key), key, group, {})
                self.compiler.add(key)  # (multi-host: compiled inline at its first step)
            except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
                failed = {s.id for s in chosen}
                self.waiting = [s for s in self.waiting if s.id not in failed]
                self._dequeued(len(chosen))
                self._fail(None, chosen, e, "opening a batch")
                continue
            self.sessions.append(session)
            admits[session.sid] = dict(enumerate(chosen))
        if not admits:
            return
        taken = {seq.id for rows in admits.values() for seq in rows.values()}
        self.waiting = [s for s in self.waiting if s.id not in taken]
        by_sid = {s.sid: s for s in self.sessions}
        for sid, rows in admits.items():
            session = by_sid[sid]
            self._dequeued(len(rows))
            try:
                self.executor.admit(sid, {slot: (seq.req.prompt, seq.req.params) for slot, seq in rows.items()})
            except Exception as e:  # noqa: BLE001
                self._fail(session if not session.slots else None, list(rows.values()), e, "admitting rows")
                continue
            session.slots.update(rows)
            for seq in rows.values():
                self.metrics.observe("queue_time_seconds", now - seq.arrival)
        self._last_command = time.monotonic()

    def _track_demand(self, now: float) -> None:
        """Peak sequences per group (running + waiting) over the last demand_window_s.

        A new batch is sized for it, not just for who is waiting now: clients in a closed loop
        send their next request right after a batch ends, and a batch sized for the first
        arrival alone would leave the others for yet another batch.
        """
        current: dict[ProgramKey, int] = {}
        for s in self.sessions:
            current[s.group] = current.get(s.group, 0) + len(s.slots)
        for seq in self.waiting:  # (still includes those admitted in this round)
            current[seq.group] = current.get(seq.group, 0) + 1
        window = self.options.demand_window_s
        for group, n in current.items():
            peak, since = self._demand.get(group, (0, 0.0))
            if n >= peak or now - since > window:
                self._demand[group] = (n, now)
        for group in [g for g, (_, since) in self._demand.items() if now - since > 10 * window]:
            del self._demand[group]

    def _step(self, session: _Session) -> None:
        t0 = time.monotonic()
        try:
            updates = self.executor.step(session.sid)
        except Exception as e:  # noqa: BLE001 - fail this batch only
            self._fail(session, list(session.slots.values()), e, "running a block")
            return
        self._last_command = time.monotonic()
        self.metrics.batch(len(session.slots), session.key.batch, self._last_command - t0)
        for u in updates:
            seq = session.slots.get(u.slot)
            if seq is None:
                continue
            limit = seq.req.max_tokens
            tokens, done, reason = u.tokens[:limit], u.done, u.finish_reason
            if done and len(u.tokens) > limit:
                reason = "length"
            elif not done and len(u.tokens) >= limit:
                done, reason = True, "length"
            if done or len(tokens) != seq.sent:
                seq.sent = len(tokens)
                seq.handle.post(Event(seq.index, tokens, done, reason, u.nfe))
            if done:
                self.metrics.inc("nfe_total", u.nfe)
                if not self._release(session, u.slot):
                    return

    def _fail(self, session: _Session | None, seqs: list[_Seq], exc: Exception, what: str) -> None:
        """An engine error fails only the requests involved (500); the session is dropped."""
        log.error("%s failed: %s: %s", what, type(exc).__name__, exc, exc_info=exc)
        err = APIError(500, f"generation failed while {what}: {type(exc).__name__}: {exc}", code="engine_error")
        for seq in seqs:
            seq.handle.post(Event(seq.index, np.zeros(0, np.int32), True, None, 0, error=err))
        if session is not None:
            for seq in session.slots.values():
                if seq not in seqs:
                    seq.handle.post(Event(seq.index, np.zeros(0, np.int32), True, None, 0, error=err))
            if session in self.sessions:
                self.sessions.remove(session)
            try:
                self.executor.close(session.sid)
            except Exception:  # noqa: BLE001
                log.exception("closing a failed session")

    def _release(self, session: _Session, slot: int) -> bool:
        """Free a slot (the session closes when empty); False if that failed the session."""
        del session.slots[slot]
        try:
            if session.slots:
                self.executor.release(session.sid, slot)
                return True
            self.executor.close(session.sid)
        except Exception as e:  # noqa: BLE001
            self._fail(session, list(session.slots.values()), e, "freeing a slot")
            return False
        self.sessions.remove(session)
        return False

    def _dequeued(self, n: int) -> None:
        with self._cv:
            self._queued -= n

    def _publish(self) -> None:
        self.metrics.set("queue_depth", self._queued)
        self.metrics.set("running_rows", sum(len(s.slots) for s in self.sessions))
        self.metrics.set("sessions", len(self.sessions))

    def _fail_all(self, err: APIError) -> None:
        with self._cv:
            pending = self._inbox + self.waiting + [q for s in self.sessions for q in s.slots.values()]
            self._inbox, self.waiting, self.sessions = [], [], []
        for seq in pending:
            seq.handle.post(Event(seq.index, np.zeros(0, np.int32), True, None, 0, error=err))
