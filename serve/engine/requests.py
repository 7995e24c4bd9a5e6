"""What crosses between the asyncio front end and the scheduler thread.

``SeqRequest`` (one canvas to generate) goes in as a ``Seq`` through the ``Inbox`` (one lock);
``Event``s (final tokens so far, or an error) come back through the request's ``Handle``,
which also carries cancellations back to the inbox. A ``ScoreJob`` (prompt scoring, echo +
logprobs) goes in through the same inbox and its result comes back in its own future. Errors are the domain errors of
``serve.engine.errors``; the HTTP layer maps them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from dllm_jax.sampling import ProgramKey, SamplingParams
from serve.engine.errors import QueueFull


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
    error: Exception | None = None
    # with a logprobs program ([len(tokens)] and [len(tokens), 20]; see SlotUpdate)
    logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    # with params.trace ([len(tokens)]; see SlotUpdate): each token's commit step and confidence
    commit_step: np.ndarray | None = None
    commit_conf: np.ndarray | None = None
    # finish_reason 'stop' by a stop token: that token (not in ``tokens``), its logprob and commit step
    stop_id: int | None = None
    stop_logprob: float | None = None
    stop_commit_step: int | None = None
    message: str | None = None  # finish_reason 'abort': why

    @classmethod
    def failure(cls, index: int, error: Exception) -> "Event":
        """Sequence ``index`` ends with ``error`` (raised by ``Handle.next``)."""
        return cls(index, np.zeros(0, np.int32), True, None, 0, error=error)


class Handle:
    """The asyncio side of one request: events from the scheduler, cancellation to it."""

    def __init__(self, inbox: "Inbox", loop: asyncio.AbstractEventLoop):
        self.inbox, self.loop = inbox, loop
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
        self.inbox.cancel(ids)


def resolve_future(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result=None,
                   error: Exception | None = None) -> None:
    """Set ``future`` (owned by ``loop``) from another thread: to ``error`` if given, else ``result``."""
    def put():
        if not future.done():  # (the waiter may have gone: client disconnected)
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
    try:
        loop.call_soon_threadsafe(put)
    except RuntimeError:  # event loop closed (shutdown)
        pass


@dataclasses.dataclass(eq=False)
class ScoreJob:
    """Sequences to score (``Model.score``) on the scheduler thread; the result goes to ``future``."""

    sequences: list[list[int]]
    top_k: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def resolve(self, result=None, error: Exception | None = None) -> None:  # scheduler thread
        resolve_future(self.loop, self.future, result, error)


@dataclasses.dataclass(eq=False)
class ControlJob:
    """A function run on the scheduler thread between two device calls (pause, abort, ...);
    its result (or exception) goes to ``future``."""

    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def run(self) -> None:  # scheduler thread
        try:
            result = self.fn()
        except Exception as e:  # noqa: BLE001 - the caller gets it
            resolve_future(self.loop, self.future, error=e)
        else:
            resolve_future(self.loop, self.future, result)

    def run_failed(self, error: Exception) -> None:  # (the engine stops: the function never runs)
        resolve_future(self.loop, self.future, error=error)


@dataclasses.dataclass(eq=False)
class Seq:
    """A queued or running sequence, as the scheduler tracks it."""

    id: int
    index: int          # its choice index in the request
    req: SeqRequest
    handle: Handle
    group: ProgramKey   # the ProgramKey with batch and prompt_len zeroed
    need: int           # its own prompt bucket
    arrival: float
    sent: int = -1
    last: Event | None = None  # the last event posted (what an abort returns)


class Inbox:
    """The hand-over between the event loop and the scheduler thread (one lock)."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.cv = threading.Condition()
        self.items: list[Seq] = []
        self.scores: list[ScoreJob] = []
        self.controls: list[ControlJob] = []
        self.cancels: set[int] = set()
        self.queued = 0          # sequences not admitted yet (the QueueFull limit)
        self.stopping = False
        self.woken = False

    def put(self, seqs: Sequence[Seq]) -> None:
        """Queue sequences; raises QueueFull when they would exceed ``max_queue``."""
        with self.cv:
            if self.queued + len(seqs) > self.max_queue:
                raise QueueFull(self.queued, self.max_queue)
            self.queued += len(seqs)
            self.items.extend(seqs)
            self.cv.notify()

    def put_score(self, job: ScoreJob) -> None:
        """Queue a scoring job (its sequences count towards ``max_queue`` until it runs)."""
        with self.cv:
            if self.queued + len(job.sequences) > self.max_queue:
                raise QueueFull(self.queued, self.max_queue)
            self.queued += len(job.sequences)
            self.scores.append(job)
            self.cv.notify()

    def put_control(self, job: ControlJob) -> None:
        with self.cv:
            self.controls.append(job)
            self.cv.notify()

    def take_controls(self) -> list[ControlJob]:
        with self.cv:
            jobs, self.controls = self.controls, []
            return jobs

    def take_scores(self) -> list[ScoreJob]:
        with self.cv:
            jobs, self.scores = self.scores, []
            return jobs

    def cancel(self, seq_ids: Sequence[int]) -> None:
        with self.cv:
            self.cancels.update(seq_ids)
            self.cv.notify()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()

    def wake(self) -> None:
        """Something changed besides the queue (a compile finished): run the scheduler."""
        with self.cv:
            self.woken = True  # not lost if the scheduler is not waiting right now
            self.cv.notify()

    def dequeued(self, n: int) -> None:
        with self.cv:
            self.queued -= n

    def take(self, idle: bool, timeout) -> tuple[list[Seq], set[int], bool]:
        """New sequences, cancellations, stopping; waits up to ``timeout`` first when ``idle``."""
        with self.cv:
            if idle and not (self.items or self.scores or self.controls or self.cancels or self.stopping or self.woken):
                self.cv.wait(timeout)
            self.woken = False
            new, self.items = self.items, []
            cancels, self.cancels = self.cancels, set()
            return new, cancels, self.stopping
