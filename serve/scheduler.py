"""The scheduler thread: admission at any denoising step, batching, streaming events back.

A session's device call runs a few denoising steps (``steps_per_call``) and returns early as
soon as one of its rows finishes; every row is at its own block and step. Between two calls
(``Scheduler._schedule``):

1. waiting sequences (FIFO) are admitted into free slots of running sessions of their
   *group* (requests whose ProgramKeys are equal up to batch size and prompt bucket share a
   compiled program; a shorter prompt may join a session of a longer prompt bucket: it is
   left-padded, which does not change its output);
2. a group with no room opens a new session once it is *full* (``max_batch_size``, or the
   group's recent peak demand, so a lone request on a quiet server starts at once) or its
   oldest request has waited ``max_wait_ms``, as long as fewer than ``max_sessions``
   sessions run; the session is sized for that demand. A program key not compiled yet is
   compiled in the background (``serve.compiler``) while the group borrows a compiled one or
   waits. When the session limit blocks the oldest waiting sequence, later arrivals stop
   joining running sessions, so those drain and the blocked group gets its turn (FIFO
   fairness, no starvation). A session smaller than another of its group, or (at the session
   limit) smaller than its group's recent peak demand, admits no more rows either
   (``_draining``): rows join at every step, so without this a batch-1 session opened on a
   quiet server would be refilled forever beside the bigger batch its group needs;
3. a pending scoring job (echo + logprobs: ``Model.score`` of prompts) runs, at most one
   per boundary, so long prompts to score and running batches take turns;
4. one session (round robin) runs one call of its step program; each occupied slot reports
   its final tokens, which are posted to the request's handle; finished or cancelled rows
   free their slot for step 1, so a waiting request joins at the next step. When rows left
   and the group's recent demand says their clients will be back, the next call waits until as
   many requests arrived, for at most ``refill_wait_ms`` (``_expect_refill``, ``_take_refill``).

Weights versions (``serve.weights``): a session runs on the version it was opened with and
admits only sequences of that version (each sequence carries its request's), so a weight
update never mixes versions within a request; the ``Swapper`` installs new versions and
retires old ones at the top of each iteration, between device calls.

Every device-facing call goes through ``serve.executor.Executor`` (process 0 of a
multi-host server broadcasts it); the asyncio side talks to this thread only through the
``Inbox`` (new sequences, cancellations) and each request's ``Handle`` (events back), both
in ``serve.requests``. A failure reaches the requests involved as ``serve.errors.EngineFailed``
(the engine dying: ``EngineDead``), never as an HTTP error. What it fails:

- one row: a row whose own values cannot be laid out at admission (``executor.admit`` returns
  it; the other rows of the round are admitted, its slot stays free), and a row whose update
  cannot be reported (``_report``: cutting and posting its tokens/logprobs; its slot is freed);
- the rows of one admission: an admit failure that is not one row's (the device merge, memory);
- one session: a failed ``step`` (one device program for all its rows: nothing to attribute)
  or a failed release; opening a batch fails the rows it was opened for.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from dllm_jax.sampling import ProgramKey, bucket, program_key
from serve.compiler import Compiler
from serve.errors import EngineDead, EngineFailed, ServeError
from serve.executor import Executor
from serve.metrics import Metrics
from serve.requests import Event, Inbox, ScoreJob, Seq

log = logging.getLogger("serve.engine")


@dataclasses.dataclass(eq=False)
class Session:
    """A running decode session (one compiled program) and which sequence holds each slot."""

    sid: int
    key: ProgramKey
    group: ProgramKey
    slots: dict[int, Seq]
    weights: object = None  # the serve.weights.Weights it runs on (a lease on them while it runs)

    def free(self) -> list[int]:
        return [i for i in range(self.key.batch) if i not in self.slots]


class Scheduler:
    """Owns the sessions; ``loop`` runs on the scheduler thread until the inbox says stop."""

    def __init__(self, model, executor: Executor, compiler: Compiler, options, metrics: Metrics, inbox: Inbox,
                 prompt_buckets, weights=None):
        self.model, self.executor, self.compiler = model, executor, compiler
        self.weights = weights  # the serve.weights.Swapper (None: weights never change)
        self.options, self.metrics, self.inbox = options, metrics, inbox
        self.prompt_buckets = prompt_buckets
        self.waiting: list[Seq] = []
        self.scoring: list[ScoreJob] = []  # run one per iteration, between device calls
        self.sessions: list[Session] = []
        self._rr = 0
        self._last_command = time.monotonic()
        self._blocked: set[ProgramKey] = set()  # groups waiting for a compile
        self._demand: dict[ProgramKey, tuple[int, float]] = {}  # group -> (peak sequences, since)
        self._programs = getattr(model, "programs", None)  # the model's compiled-program cache
        self._builds = 0  # its builds already counted in programs_built_total
        self._refill_by = 0.0  # (monotonic) wait for returning clients until then: slots just freed
        self._refill_want = 0  # ... or until this many new sequences arrived

    def loop(self) -> None:
        while True:
            refill_by, want = self._refill_by, self._refill_want
            self._refill_by, self._refill_want = 0.0, 0
            if refill_by > time.monotonic() and not self.waiting and not self.scoring:
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
                return
            self.waiting.extend(new)
            self.scoring.extend(self.inbox.take_scores())
            if self.weights is not None:
                self.weights.tick()
            if self.scoring:
                self._score(self.scoring.pop(0))
            if cancels:
                self._apply_cancels(cancels)
            self._schedule(time.monotonic())
            busy = self._busy()
            if busy:
                self._rr = (self._rr + 1) % len(busy)
                self._step(busy[self._rr])
            elif self.options.heartbeat_s and time.monotonic() - self._last_command > self.options.heartbeat_s:
                self.executor.noop()
                self._last_command = time.monotonic()
            self._publish()

    def _take_refill(self, deadline: float, want: int) -> tuple[list[Seq], set[int], bool]:
        """Wait until ``want`` new sequences arrived (the clients of the rows that just left), a
        cancellation or stop, or ``deadline``. Returning at the first arrival would refill one of
        the freed slots and leave the others empty for a whole call."""
        new: list[Seq] = []
        while True:
            got, cancels, stopping = self.inbox.take(idle=True, timeout=max(deadline - time.monotonic(), 0.0))
            new.extend(got)
            if stopping or cancels or len(new) >= want or time.monotonic() >= deadline:
                return new, cancels, stopping

    def _busy(self) -> list[Session]:
        """Sessions with rows (an empty one kept open for returning clients is not stepped)."""
        return [s for s in self.sessions if s.slots]

    def _wanted(self, session: Session) -> bool:
        """Keep ``session`` open while it is empty: it has the batch size its group's recent demand
        asks for, that demand exceeds the rows the group runs (closed-loop clients are about to
        send their next requests) and it is not draining.
        Closing it would make the next arrival open a fresh batch, and at every lull the group
        would thrash between sessions instead of refilling one."""
        peak = self._recent_peak(session.group)
        if not peak or session.sid in self._draining():
            return False
        if session.key.batch != self._batch_for(min(self.options.max_batch_size, peak)):
            return False  # (a borrowed or outgrown program: the next arrival opens the right one)
        return peak > self._running(session.group)

    def _recent_peak(self, group: ProgramKey) -> int:
        """The group's peak demand (``_track_demand``), 0 once it is older than ``demand_window_s``."""
        peak, since = self._demand.get(group, (0, 0.0))
        return 0 if time.monotonic() - since > self.options.demand_window_s else peak

    def _running(self, group: ProgramKey) -> int:
        return sum(len(s.slots) for s in self.sessions if s.group == group)

    def _close_idle(self) -> None:
        """Close empty sessions no longer wanted, or all of them when the session limit keeps
        another group's requests waiting."""
        at_cap = len(self.sessions) >= self.options.max_sessions
        for session in [s for s in self.sessions if not s.slots]:
            others = at_cap and any(q.group != session.group for q in self.waiting)
            if others or not self._wanted(session):
                self._close(session)

    def _close(self, session: Session) -> None:
        try:
            self.executor.close(session.sid)
        except Exception:  # noqa: BLE001 - an empty session: nothing to fail
            log.exception("closing a session")
        self.sessions.remove(session)
        log.debug("closed session %d (batch %d), %d sessions", session.sid, session.key.batch, len(self.sessions))

    def _idle_timeout(self) -> float | None:
        timeouts = []
        if any(not s.slots for s in self.sessions):  # wake up to close empty sessions once unwanted
            timeouts.append(self.options.demand_window_s)
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
                self.inbox.dequeued(1)
                self.metrics.inc("requests_cancelled_total")
            else:
                kept.append(seq)
        self.waiting = kept
        for session in list(self.sessions):
            for slot, seq in list(session.slots.items()):
                if seq.id in ids and session in self.sessions:
                    self.metrics.inc("requests_cancelled_total")
                    self._release(session, slot)

    def _draining(self) -> set[int]:
        """Sessions that admit no more rows, so they empty and close: a session smaller than another
        of its group (the round robin would give its few rows as many steps as the bigger batch),
        or smaller than its group's recent peak demand when a program of that size is compiled and
        the group runs several sessions or ``max_sessions`` are running (a session refilled at
        every step would otherwise never end, and its group never get one batch of its size)."""
        opts = self.options
        groups: dict[tuple[ProgramKey, object], list[Session]] = {}
        for s in self.sessions:
            groups.setdefault((s.group, s.weights), []).append(s)
        at_cap = len(self.sessions) >= opts.max_sessions
        out = set()
        for (group, _), sessions in groups.items():
            biggest = max(s.key.batch for s in sessions)
            want = min(opts.max_batch_size, self._demand.get(group, (0, 0.0))[0])
            for s in sessions:
                if s.key.batch < biggest:
                    out.add(s.sid)
                elif (at_cap or len(sessions) > 1) and s.key.batch < want:
                    bigger = dataclasses.replace(s.key, batch=self._batch_for(want))
                    if bigger.batch > s.key.batch and self.compiler.ready(bigger):
                        out.add(s.sid)
        return out

    def _batch_for(self, rows: int) -> int:
        """The compiled batch size that holds ``rows`` (as ``program_key`` rounds it)."""
        b = bucket(rows, self.options.batch_bucket_list())
        data = self.model.mesh.shape["data"] if hasattr(self.model, "mesh") else 1
        return -(-b // data) * data

    def _schedule(self, now: float) -> None:
        opts = self.options
        self._close_idle()
        draining = self._draining() if self.sessions else set()
        free = {s.sid: ([] if s.sid in draining else s.free()) for s in self.sessions}
        admits: dict[int, dict[int, Seq]] = {}
        rest: list[Seq] = []
        barrier = False
        for seq in self.waiting:
            target = None
            if not barrier:
                target = next((s for s in self.sessions if s.group == seq.group and s.key.prompt_len >= seq.need
                               and free[s.sid] and s.weights is _weights(seq)), None)
            if target is None:
                rest.append(seq)
                barrier = barrier or len(self.sessions) >= opts.max_sessions
                continue
            admits.setdefault(target.sid, {})[free[target.sid].pop(0)] = seq
        # New sessions for groups that are ready (one weights version per session).
        groups: dict[tuple[ProgramKey, object], list[Seq]] = {}
        for seq in rest:
            groups.setdefault((seq.group, _weights(seq)), []).append(seq)
        self._track_demand(now)
        self._blocked = set()
        for (group, weights), seqs in groups.items():
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
                                    rows, prompt_buckets=self.prompt_buckets,
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
                session = Session(self.executor.open(key, _version(weights)), key, group, {}, weights)
                self.compiler.add(key)  # (multi-host: compiled inline at its first step)
            except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
                failed = {s.id for s in chosen}
                self.waiting = [s for s in self.waiting if s.id not in failed]
                self.inbox.dequeued(len(chosen))
                self._fail(None, chosen, e, "opening a batch")
                continue
            self.sessions.append(session)
            log.debug("opened session %d: batch %d (%d rows), %d sessions", session.sid, key.batch, len(chosen),
                      len(self.sessions))
            admits[session.sid] = dict(enumerate(chosen))
        if not admits:
            return
        taken = {seq.id for rows in admits.values() for seq in rows.values()}
        self.waiting = [s for s in self.waiting if s.id not in taken]
        by_sid = {s.sid: s for s in self.sessions}
        for sid, rows in admits.items():
            session = by_sid[sid]
            self.inbox.dequeued(len(rows))
            try:
                failed = self.executor.admit(sid, {slot: (seq.req.prompt, seq.req.params)
                                                   for slot, seq in rows.items()}) or {}
            except Exception as e:  # noqa: BLE001 - not one row's fault: the rows of this admission
                self._fail(session if not session.slots else None, list(rows.values()), e, "admitting rows")
                continue
            for slot, error in failed.items():  # a row that failed alone: that request only, its slot stays free
                self._fail(None, [rows.pop(slot)], error, "admitting a row")
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

    def _step(self, session: Session) -> None:
        t0 = time.monotonic()
        try:
            updates = self.executor.step(session.sid)
        except Exception as e:  # noqa: BLE001 - fail this batch only
            self._fail(session, list(session.slots.values()), e, "running a decode step")
            return
        self._last_command = time.monotonic()
        self.metrics.batch(len(session.slots), session.key.batch, self._last_command - t0,
                           self.executor.last_steps(session.sid))
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
                self.metrics.inc("nfe_total", u.nfe)
                if not self._release(session, u.slot):
                    return
                freed += 1
        if freed:
            self._expect_refill(session, freed, self._last_command - t0)

    def _report(self, seq: Seq, u) -> bool:
        """Post one row's update to its request (cut at ``max_tokens``); True when the row is done."""
        limit = seq.req.max_tokens
        tokens, done, reason = u.tokens[:limit], u.done, u.finish_reason
        if done and len(u.tokens) > limit:
            reason = "length"
        elif not done and len(u.tokens) >= limit:
            done, reason = True, "length"
        if done or len(tokens) != seq.sent:
            seq.sent = len(tokens)
            event = Event(seq.index, tokens, done, reason, u.nfe)
            if u.logprobs is not None:
                n = len(tokens)
                event.logprobs, event.top_ids, event.top_logprobs = u.logprobs[:n], u.top_ids[:n], u.top_logprobs[:n]
            if u.commit_step is not None:
                n = len(tokens)
                event.commit_step, event.commit_conf = u.commit_step[:n], u.commit_conf[:n]
            seq.handle.post(event)
        return done

    def _expect_refill(self, session: Session, freed: int, call_s: float) -> None:
        """``freed`` rows just left ``session``: if its group's recent demand says their clients come
        back (closed-loop harnesses send the next request as soon as a reply ends), hold the next
        device call for up to ``refill_wait_ms`` (and a quarter of a call) so those requests join at
        the next step instead of one call later. The wait ends once as many sequences arrived as
        the demand says are coming back."""
        wait_s = min(self.options.refill_wait_ms / 1e3, 0.25 * call_s)
        if wait_s <= 0 or any(seq.group == session.group for seq in self.waiting):
            return
        coming = min(freed, self._recent_peak(session.group) - self._running(session.group))
        if coming > 0:
            self._refill_by, self._refill_want = time.monotonic() + wait_s, coming

    def _score(self, job: ScoreJob) -> None:
        """One scoring job (``Model.score`` through the executor), between two device calls."""
        self.inbox.dequeued(len(job.sequences))
        t0 = time.monotonic()
        try:
            result = self.executor.score(job.sequences, job.top_k, _version(getattr(job, "weights", None)))
        except Exception as e:  # noqa: BLE001 - fail this job only
            log.error("scoring failed: %s: %s", type(e).__name__, e, exc_info=e)
            job.resolve(error=EngineFailed("scoring the prompt", e))
            return
        finally:
            self._last_command = time.monotonic()
        self.metrics.inc("scored_tokens_total", sum(max(len(q) - 1, 0) for q in job.sequences))
        self.metrics.observe("score_seconds", self._last_command - t0)
        job.resolve(result)

    def _fail(self, session: Session | None, seqs: list[Seq], exc: Exception, what: str) -> None:
        """An engine error fails only the requests involved (EngineFailed); the session is dropped."""
        log.error("%s failed: %s: %s", what, type(exc).__name__, exc, exc_info=exc)
        err = EngineFailed(what, exc)
        for seq in seqs:
            seq.handle.post(Event.failure(seq.index, err))
        if session is not None:
            for seq in session.slots.values():
                if seq not in seqs:
                    seq.handle.post(Event.failure(seq.index, err))
            if session in self.sessions:
                self.sessions.remove(session)
            try:
                self.executor.close(session.sid)
            except Exception:  # noqa: BLE001
                log.exception("closing a failed session")

    def _release(self, session: Session, slot: int) -> bool:
        """Free a slot (the session closes when empty, unless ``_wanted``); False if it closed or failed."""
        del session.slots[slot]
        try:
            if session.slots or self._wanted(session):
                self.executor.release(session.sid, slot)
                return True
            self.executor.close(session.sid)
        except Exception as e:  # noqa: BLE001
            self._fail(session, list(session.slots.values()), e, "freeing a slot")
            return False
        self.sessions.remove(session)
        log.debug("closed session %d (batch %d), %d sessions", session.sid, session.key.batch, len(self.sessions))
        return False

    def _publish(self) -> None:
        self.metrics.set("queue_depth", self.inbox.queued)
        self.metrics.set("running_rows", sum(len(s.slots) for s in self.sessions))
        self.metrics.set("sessions", len(self.sessions))
        in_flight = getattr(self.compiler, "in_flight", None)
        self.metrics.set("compiles_in_flight", in_flight() if in_flight is not None else 0)
        if self._programs is not None:
            self.metrics.set("programs_cached", len(self._programs))
            builds = self._programs.builds
            if builds > self._builds:
                self.metrics.inc("programs_built_total", builds - self._builds)
                self._builds = builds

    def fail_all(self, err: ServeError) -> None:
        """The engine died: every sequence it holds or will receive gets ``err``."""
        new, _, _ = self.inbox.take(idle=False, timeout=0)
        pending = new + self.waiting + [q for s in self.sessions for q in s.slots.values()]
        self.waiting, self.sessions = [], []
        for seq in pending:
            seq.handle.post(Event.failure(seq.index, err))
        for job in self.scoring + self.inbox.take_scores():
            job.resolve(error=err)
        self.scoring = []


def _weights(seq: Seq):
    """The weights version a sequence runs on (None: the only one there is)."""
    return getattr(seq, "weights", None)


def _version(weights) -> int:
    return 0 if weights is None else weights.version
