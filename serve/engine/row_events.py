"""The scheduler's side that faces each row's request: what it posts (a row's tokens so far, its
end: finished, aborted, failed) and how a row leaves its slot.

A mixin of ``serve.engine.scheduler.Scheduler`` (split out of it for size; it works on the
scheduler's own state, declared below). A failure reaches the requests involved as
``EngineFailed`` (the engine dying: ``EngineDead``, ``fail_all``), never as an HTTP error. What
it fails:

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
from typing import TYPE_CHECKING, Callable

import numpy as np

from serve.engine.errors import EngineFailed, ServeError
from serve.engine.requests import Event

if TYPE_CHECKING:
    from serve.engine.compiler import Compiler
    from serve.engine.engine_types import WeightedScoreJob, WeightedSeq
    from serve.engine.executor import Device
    from serve.engine.metrics import Metrics
    from serve.engine.policy import Policy, SessionView
    from serve.engine.requests import Inbox
    from serve.engine.scheduler import Session

log = logging.getLogger("serve.engine")


class RowEvents:
    """Rows leaving the scheduler (``Scheduler`` inherits these methods)."""

    # the scheduler's state these methods read and change (set by ``Scheduler.__init__``)
    waiting: list[WeightedSeq]
    scoring: list[WeightedScoreJob]
    sessions: list[Session]
    inbox: Inbox
    executor: Device
    compiler: Compiler
    policy: Policy
    metrics: Metrics
    _demand: dict
    _views: Callable[[], list[SessionView]]  # (a method of Scheduler)

    def _report(self, seq: WeightedSeq, u) -> bool:
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
            if reason == "stop" and u.stop_id is not None:
                event.stop_id, event.stop_logprob, event.stop_commit_step = u.stop_id, u.stop_logprob, u.stop_commit_step
            if u.logprobs is not None:
                n = len(tokens)
                event.logprobs, event.top_ids, event.top_logprobs = u.logprobs[:n], u.top_ids[:n], u.top_logprobs[:n]
            if u.commit_step is not None:
                n = len(tokens)
                event.commit_step, event.commit_conf = u.commit_step[:n], u.commit_conf[:n]
            seq.last = event
            if done:  # counted before the client can see the end (a scrape after it includes this row)
                self.metrics.inc("nfe_total", u.nfe)
            seq.handle.post(event)
        return done

    def _release(self, session: Session, slot: int) -> bool:
        """Free a slot (the session closes when empty, unless ``Policy.keep_empty``); False if it
        closed or failed."""
        del session.slots[slot]
        try:
            if session.slots or self.policy.keep_empty(session.view(), self._views(), self._demand,
                                                       time.monotonic(), self.compiler.ready):
                self.executor.release(session.sid, slot)
                return True
            self.executor.close(session.sid)
        except Exception as e:  # noqa: BLE001
            self._fail(session, list(session.slots.values()), e, "freeing a slot")
            return False
        self._drop(session)
        return False

    def _drop(self, session: Session) -> None:
        self.sessions.remove(session)
        log.debug("closed session %d (batch %d), %d sessions", session.sid, session.key.batch, len(self.sessions))

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

    def abort(self, seq_ids: set[int] | None = None, message: str = "aborted") -> int:
        """End sequences now (all when ``seq_ids`` is None), waiting or running: each request gets a
        final event with finish_reason 'abort' and the tokens already final (its last report). Returns
        how many sequences were aborted."""
        hit = (lambda seq: True) if seq_ids is None else (lambda seq: seq.id in seq_ids)
        aborted = 0
        kept = []
        for seq in self.waiting:
            if hit(seq):
                self.inbox.dequeued(1)
                seq.handle.post(_aborted(seq, "Abort in waiting queue"))  # (SGLang's message)
                aborted += 1
            else:
                kept.append(seq)
        self.waiting = kept
        for session in list(self.sessions):
            for slot, seq in list(session.slots.items()):
                if hit(seq) and session in self.sessions:
                    seq.handle.post(_aborted(seq, message))
                    aborted += 1
                    self.metrics.inc("requests_aborted_total")
                    self._release(session, slot)
        return aborted

    def _fail(self, session: Session | None, seqs: list[WeightedSeq], exc: Exception, what: str) -> None:
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
        for control in self.inbox.take_controls():
            control.run_failed(err)


def _aborted(seq, message: str) -> Event:
    """The final event of an aborted sequence: its tokens final so far (none if it never ran)."""
    last = seq.last
    if last is None:
        event = Event(seq.index, np.zeros(0, np.int32), True, "abort", 0)
    else:
        event = dataclasses.replace(last, done=True, finish_reason="abort", stop_id=None, stop_logprob=None,
                                    stop_commit_step=None)
    event.message = message
    return event
