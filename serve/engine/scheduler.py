"""The scheduler thread: it applies the batching policy's decisions (``serve.engine.policy``) through
the executor and streams each row's tokens back to its request.

Each iteration, between two device calls: weight updates install (``serve.engine.weights``; a session
runs on the version it was opened with and admits only sequences of it), at most one scoring
job (``Model.score``) runs, cancelled rows leave; empty sessions close, waiting sequences join
free slots and new sessions open as the policy decides (a program not compiled yet compiles in
the background, ``serve.engine.compiler``, while its group borrows one or waits). Then one session
(round robin) runs one call of its step program (a few denoising steps, fewer once a row
finishes): each row's tokens go to its request's ``Handle``, finished rows free their slot for
the next step, and the next call may wait for returning clients (``Policy.refill``).

Every device-facing call goes through the executor (``serve.engine.executor.Device``); the asyncio
side talks to this thread only through the ``Inbox`` and the handles (``serve.engine.requests``).
What the scheduler posts to each row's request, how rows leave their slots, and which failure
fails which requests (``EngineFailed``, never an HTTP error): ``serve.engine.row_events``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from dllm_jax.sampling import ProgramKey, program_key
from serve.engine.compiler import Compiler
from serve.engine.errors import EngineDead, EngineFailed
from serve.engine.executor import Device, ServedModel
from serve.engine.metrics import Metrics
from serve.engine.policy import Policy, SessionView, Waiting
from serve.engine.requests import Inbox
from serve.engine.row_events import RowEvents

if TYPE_CHECKING:  # (what the engine queues: sequences and scoring jobs with their weights version)
    from serve.engine.engine_types import WeightedScoreJob, WeightedSeq
    from serve.engine.weights import Weights

log = logging.getLogger("serve.engine")


@dataclasses.dataclass(eq=False)
class Session:
    """A running decode session (one compiled program) and which sequence holds each slot."""

    sid: int
    key: ProgramKey
    group: ProgramKey
    slots: dict[int, WeightedSeq]
    weights: Weights | None = None  # the version it runs on (a lease on them while it runs)
    step_s: float | None = None  # seconds per denoising step of its last call (``Policy.call_steps``)

    def free(self) -> list[int]:
        return [i for i in range(self.key.batch) if i not in self.slots]

    def view(self) -> SessionView:
        return SessionView(self.sid, self.key, self.group, len(self.slots), self.weights)


class Scheduler(RowEvents):
    """Owns the sessions; ``loop`` runs on the scheduler thread until the inbox says stop.

    (Rows leaving, and what their requests are told: ``RowEvents``.)"""

    def __init__(self, model: ServedModel, executor: Device, compiler: Compiler, options, metrics: Metrics,
                 inbox: Inbox, prompt_buckets, weights=None):
        self.model, self.executor, self.compiler = model, executor, compiler
        self.weights = weights  # the serve.engine.weights.Swapper (None: weights never change)
        self.options, self.metrics, self.inbox = options, metrics, inbox
        self.policy = Policy.of(options, data=model.mesh.shape["data"])
        self.prompt_buckets = prompt_buckets
        self.waiting: list[WeightedSeq] = []
        self.scoring: list[WeightedScoreJob] = []  # run one per iteration, between device calls
        self.sessions: list[Session] = []
        self._rr = 0
        self._last_command = time.monotonic()
        self._blocked: set[ProgramKey] = set()  # groups waiting for a compile
        self._demand: dict[ProgramKey, tuple[int, float]] = {}  # group -> (peak sequences, since)
        self._programs = model.programs  # the model's compiled-program cache (None: none)
        self._builds = 0  # its builds already counted in programs_built_total
        self._refill_by = 0.0  # (monotonic) wait for returning clients until then: slots just freed
        self._refill_want = 0  # ... or until this many new sequences arrived
        self._arrivals: collections.deque = collections.deque(maxlen=256)  # (monotonic) sequences' arrivals
        # Holds stop admissions and steps (rows stay in their slots, arrivals wait): 'paused'
        # (/pause_generation), 'released' (weights off the device). Weight updates still install.
        self.holds: set[str] = set()

    def loop(self) -> None:
        while True:
            refill_by, want = self._refill_by, self._refill_want
            self._refill_by, self._refill_want = 0.0, 0
            self._sync_released()
            if self.holds:  # nothing runs: wait for a control (continue), a cancellation or stop
                new, cancels, stopping = self.inbox.take(idle=True, timeout=self.options.heartbeat_s or None)
            elif refill_by > time.monotonic() and not self.waiting and not self.scoring:
                new, cancels, stopping = self._take_refill(refill_by, want)  # returning clients
            else:
                new, cancels, stopping = self.inbox.take(idle=not (self._busy() or self.scoring),
                                                         timeout=self._idle_timeout())
            if stopping:
                if self.weights is not None:
                    self.weights.shutdown()
                self.compiler.shutdown()
                self.executor.shutdown()
                for job in self.scoring + self.inbox.take_scores():
                    job.resolve(error=EngineDead("the server is shutting down"))
                for control in self.inbox.take_controls():
                    control.run_failed(EngineDead("the server is shutting down"))
                return
            self.waiting.extend(new)
            if new:
                self._arrivals.extend([time.monotonic()] * len(new))  # (Policy.call_steps: a burst?)
            self.scoring.extend(self.inbox.take_scores())
            for control in self.inbox.take_controls():  # pause, continue, abort, ...
                control.run()
            if self.weights is not None:
                self.weights.tick()
            if cancels:
                self._apply_cancels(cancels)
            self._sync_released()
            if self.holds:
                if self.options.heartbeat_s and time.monotonic() - self._last_command > self.options.heartbeat_s:
                    self.executor.noop()
                    self._last_command = time.monotonic()
                self._publish()
                continue
            if self.scoring:
                self._score(self.scoring.pop(0))
            self._schedule(time.monotonic())
            busy = self._busy()
            if busy:
                self._rr = (self._rr + 1) % len(busy)
                self._step(busy[self._rr])
            elif self.options.heartbeat_s and time.monotonic() - self._last_command > self.options.heartbeat_s:
                self.executor.noop()
                self._last_command = time.monotonic()
            self._publish()

    def _sync_released(self) -> None:
        """Hold while the weights are off the device (``Engine.release_memory``)."""
        if self.weights is not None and self.weights.released:
            self.holds.add("released")
        else:
            self.holds.discard("released")

    def _take_refill(self, deadline: float, want: int) -> tuple[list[WeightedSeq], set[int], bool]:
        """Wait until ``want`` new sequences arrived (the clients of the rows that just left), a
        cancellation or stop, or ``deadline``. Returning at the first arrival would refill one of
        the freed slots and leave the others empty for a whole call."""
        new: list[WeightedSeq] = []
        while True:
            got, cancels, stopping = self.inbox.take(idle=True, timeout=max(deadline - time.monotonic(), 0.0))
            new.extend(got)
            if stopping or cancels or len(new) >= want or time.monotonic() >= deadline:
                return new, cancels, stopping

    def _busy(self) -> list[Session]:
        """Sessions with rows (an empty one kept open for returning clients is not stepped)."""
        return [s for s in self.sessions if s.slots]

    def _views(self) -> list[SessionView]:
        return [s.view() for s in self.sessions]

    def _close_idle(self) -> None:
        """Close empty sessions no longer wanted (``Policy.close_idle``)."""
        by_sid = {s.sid: s for s in self.sessions}
        for sid in self.policy.close_idle(self._views(), [q.group for q in self.waiting], self._demand,
                                          time.monotonic(), self.compiler.ready):
            try:
                self.executor.close(sid)
            except Exception:  # noqa: BLE001 - an empty session: nothing to fail
                log.exception("closing a session")
            self._drop(by_sid[sid])

    def _idle_timeout(self) -> float | None:
        oldest = min((s.arrival for s in self.waiting if s.group not in self._blocked), default=None)
        return self.policy.wake_after(any(not s.slots for s in self.sessions), oldest, time.monotonic(),
                                      self.options.heartbeat_s)  # (blocked: woken by their compile)

    def _schedule(self, now: float) -> None:
        """Close, join, open (``serve.engine.policy``), then admit what joined or opened."""
        self._close_idle()
        views, queued = self._views(), self.waiting  # (a failed opening replaces self.waiting)
        waiting = [Waiting(q.group, q.need, q.weights, q.arrival) for q in queued]
        draining = self.policy.draining(views, self._demand, self.compiler.ready) if self.sessions else set()
        free = {s.sid: ([] if s.sid in draining else s.free()) for s in self.sessions}
        admits: dict[int, dict[int, WeightedSeq]] = {}
        # (a longer prompt moves a session up only to a compiled program: see Policy.join_running)
        joins = self.policy.join_running(waiting, views, draining, self.compiler.is_compiled)
        for seq, sid in zip(queued, joins):
            if sid is not None:
                admits.setdefault(sid, {})[free[sid].pop(0)] = seq
        self._demand = self.policy.track_demand(self._demand, views, [w.group for w in waiting], now)
        self._blocked = set()
        for group, weights, picks, rows in self.policy.openings(waiting, joins, self._demand, now):
            if len(self.sessions) >= self.policy.max_sessions:
                break
            opened = self._open(group, weights, [queued[i] for i in picks], rows)
            if opened is not None:
                admits[opened[0].sid] = dict(enumerate(opened[1]))
        if admits:
            self._admit(admits, now)

    def _open(self, group: ProgramKey, weights: Weights | None, chosen: list[WeightedSeq],
              rows: int) -> tuple[Session, list[WeightedSeq]] | None:
        """Open a session for ``rows`` rows of ``group`` (``chosen``: the sequences it is opened
        for; those it holds are returned with it). None: it waits for a compile, or it failed
        (``chosen`` fail)."""
        try:
            exact = program_key(self.model, max(len(s.req.prompt) for s in chosen), chosen[0].req.params, rows,
                                prompt_buckets=self.prompt_buckets, batch_buckets=self.policy.batch_buckets)
            error = self.compiler.take_failure(exact)
            if error is not None:
                raise error
            # the exact program if compiled, else (while it compiles) a borrowed bigger one
            key = exact if self.compiler.ready(exact) else self.compiler.borrow(exact, len(chosen))
            if key is None:
                self._blocked.add(group)
                return None
            chosen = chosen[:key.batch]
            session = Session(self.executor.open(key, _version(weights)), key, group, {}, weights)
            self.compiler.add(key)  # (multi-host: compiled inline at its first step)
        except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
            failed = {s.id for s in chosen}
            self.waiting = [s for s in self.waiting if s.id not in failed]
            self.inbox.dequeued(len(chosen))
            self._fail(None, chosen, e, "opening a batch")
            return None
        self.sessions.append(session)
        log.debug("opened session %d: batch %d (%d rows), %d sessions", session.sid, key.batch, len(chosen),
                  len(self.sessions))
        return session, chosen

    def _admit(self, admits: dict[int, dict[int, WeightedSeq]], now: float) -> None:
        taken = {seq.id for rows in admits.values() for seq in rows.values()}
        self.waiting = [s for s in self.waiting if s.id not in taken]
        by_sid = {s.sid: s for s in self.sessions}
        for sid, rows in admits.items():
            session = by_sid[sid]
            self.inbox.dequeued(len(rows))
            try:
                self._fit(session, [seq.need for seq in rows.values()])  # (an empty session: to its new rows' bucket)
                failed = self.executor.admit(sid, {slot: (seq.req.prompt, seq.req.params)
                                                   for slot, seq in rows.items()})
            except Exception as e:  # noqa: BLE001 - not one row's fault: the rows of this admission
                self._fail(session if not session.slots else None, list(rows.values()), e, "admitting rows")
                continue
            for slot, error in failed.items():  # a row that failed alone: that request only, its slot stays free
                self._fail(None, [rows.pop(slot)], error, "admitting a row")
            session.slots.update(rows)
            for seq in rows.values():
                self.metrics.observe("queue_time_seconds", now - seq.arrival)
        self._last_command = time.monotonic()

    def _fit(self, session: Session, joining=()) -> None:
        """Move ``session`` to its rows' (and ``joining`` prompt buckets') longest prompt bucket
        when that program is compiled (``Policy.fit``; a compile starts only when none runs or
        waits): its long prompts left. Raises what the move raised (the caller fails the rows)."""
        fitted = self.policy.fit(session.key, [seq.need for seq in session.slots.values()] + list(joining),
                                 lambda key: self.compiler.ready(key, only_if_idle=True))
        if fitted is not None:
            self.executor.rebucket(session.sid, fitted)
            session.key = fitted
            self.metrics.inc("rebuckets_total")

    def _step(self, session: Session) -> None:
        t0 = time.monotonic()
        try:
            self._fit(session)
            steps = self.policy.call_steps(session.view(), self._views(), self._demand, len(self.waiting),
                                           session.step_s, self._arrivals, t0)
            updates = self.executor.step(session.sid, steps)
        except Exception as e:  # noqa: BLE001 - fail this batch only
            self._fail(session, list(session.slots.values()), e, "running a decode step")
            return
        self._last_command = time.monotonic()
        ran, forwards = self.executor.last_work(session.sid)
        self.metrics.batch(len(session.slots), session.key.batch, self._last_command - t0, ran, forwards)
        session.step_s = (self._last_command - t0) / max(ran, 1)
        freed = 0
        for u in updates:
            seq = session.slots.get(u.slot)
            if seq is None:
                continue
            try:
                done = self._report(seq, u)
            except Exception as e:  # noqa: BLE001 - this row's host-side report: that request alone
                self._fail(None, [seq], e, "reporting a row's tokens")
                if not self._release(session, u.slot):
                    return
                continue
            if done:
                if not self._release(session, u.slot):
                    return
                freed += 1
        if freed:  # hold the next call for the clients of the rows that left (``Policy.refill``)
            wait_s, coming = self.policy.refill(session.view(), self._views(), self._demand,
                                                [q.group for q in self.waiting], freed, self._last_command - t0,
                                                time.monotonic())
            if coming:
                self._refill_by, self._refill_want = time.monotonic() + wait_s, coming

    def _score(self, job: WeightedScoreJob) -> None:
        """One scoring job (``Model.score`` through the executor), between two device calls."""
        self.inbox.dequeued(len(job.sequences))
        t0 = time.monotonic()
        try:
            result = self.executor.score(job.sequences, job.top_k, _version(job.weights))
        except Exception as e:  # noqa: BLE001 - fail this job only
            log.error("scoring failed: %s: %s", type(e).__name__, e, exc_info=e)
            job.resolve(error=EngineFailed("scoring the prompt", e))
            return
        finally:
            self._last_command = time.monotonic()
        self.metrics.inc("scored_tokens_total", sum(max(len(q) - 1, 0) for q in job.sequences))
        self.metrics.observe("score_seconds", self._last_command - t0)
        job.resolve(result)

    def _publish(self) -> None:
        self.metrics.set("queue_depth", self.inbox.queued)
        self.metrics.set("running_rows", sum(len(s.slots) for s in self.sessions))
        self.metrics.set("sessions", len(self.sessions))
        self.metrics.set("compiles_in_flight", self.compiler.in_flight())
        if self._programs is not None:
            self.metrics.set("programs_cached", len(self._programs))
            builds = self._programs.builds
            if builds > self._builds:
                self.metrics.inc("programs_built_total", builds - self._builds)
                self._builds = builds

    # ---- control (scheduler thread, through ``Inbox.put_control``) ---------------------------
    # (and ``abort``: ``RowEvents.abort``)

    def counts(self) -> dict:
        """Rows running (in slots) and waiting (queued, not admitted)."""
        return {"running": sum(len(s.slots) for s in self.sessions), "waiting": len(self.waiting),
                "held": sorted(self.holds)}

    def hold(self, reason: str) -> int:
        """Stop admitting and stepping until ``unhold(reason)``; returns the rows held in their slots."""
        self.holds.add(reason)
        return sum(len(s.slots) for s in self.sessions)

    def unhold(self, reason: str) -> None:
        self.holds.discard(reason)


def _version(weights: Weights | None) -> int:
    return 0 if weights is None else weights.version
