"""New weights without a restart: ``POST /update_weights_from_disk`` (SGLang's endpoint).

Terms: a weights *version* is one set of parameters the server has held (0: the one it
started with). The compiled programs take the parameters as an argument, so a version of the
same architecture (same config, vocab, mask id; same dtype and shardings, which the reader
guarantees) runs on them without a recompile (``Model.with_params``).

**The swap point.** A request runs entirely on the version that was current when it was
queued (``Engine.submit``; an echo + logprobs request when its prompts were sent to scoring,
so its prompt scores and its completion agree). A ``Weights`` object is the lease: queued
sequences, running sessions and scoring jobs hold theirs; a session is opened on one version
and admits only sequences of that version. So requests running when the new weights arrive
finish on the old ones, requests queued after the swap get the new ones, and no request ever
sees both. When the last reference to an old version goes, it is retired
(``Executor.retire`` frees its device buffers).

**Memory.** Two copies are resident from the start of a load until the old version's last
request ends; a further update waits until then (never three copies).

**Where the load runs.** Single host: on a loader thread while the batches keep running; the
scheduler installs the result at its next block boundary. Multi-host: every process reads
the same path inline at the broadcast ``load_weights`` command (they must enter the same
collectives in the same order), they check that all succeeded, and all install it at that
command, or none does. A bad path, a truncated file or a failure part way leaves the old
weights serving: the new tree is installed only once every parameter was read.

**In process** (``Engine.update_params``: a trainer in the same process hands over a pytree):
the same queue, the same install and the same swap point; the "read" is ``stage`` (the tree
matched to the running parameters by name, cast / placed onto their dtype and sharding where it
differs), on the loader thread. Nothing is written to disk and nothing recompiles. Leaves that
already match are served as they are, shared with the caller (never deleted by the engine).
Single process only.

**Device memory** (``Engine.release_memory`` / ``resume_memory``, SGLang's
``release_memory_occupation``): ``MemoryJob``s run in the same queue, in order with the
updates, at a block boundary; ``released`` is set in between and updates are refused then.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import time
import weakref
from typing import Any, Callable

from serve.engine.errors import EngineDead, MemoryReleased, ServeError
from serve.engine.metrics import memory_in_use
from serve.engine.requests import resolve_future
from serve.engine.weight_reading import Staged, failure

log = logging.getLogger("serve.engine.weights")



@dataclasses.dataclass(frozen=True, eq=False)
class Weights:
    """One weights version (and the lease on it: it stays resident while this object lives).

    Attributes:
      version: 0 for the weights the server started with, then 1, 2, ...
      source: where they came from (``--model``, or the update's ``model_path``).
      loaded_at: when they started serving (unix seconds).
      label: SGLang's ``weight_version``: the last label an update set (an update without one
        keeps the previous label; None until one is set).
      layout: the checkpoint layout read (``orbax``, ``hf``, ``dcp:policy/weights`` ...).
    """

    version: int
    source: str
    loaded_at: float
    label: str | None = None
    layout: str = "startup"

    def card(self) -> dict:
        return {"source": self.source, "weights_version": self.version, "weight_version": self.label,
                "weights_loaded_at": int(self.loaded_at), "weights_layout": self.layout}


# ---- the update queue, run by the scheduler thread ----------------------------------------

def _settle(loop: asyncio.AbstractEventLoop | None, future, result, error: Exception | None) -> None:
    """Answer a job: an asyncio future on ``loop``, or (``loop`` None) a concurrent.futures one."""
    if loop is not None:
        resolve_future(loop, future, result, error)
        return
    try:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)
    except concurrent.futures.InvalidStateError:  # (cancelled meanwhile: nobody waits)
        pass


@dataclasses.dataclass(eq=False)
class UpdateJob:
    """One weight update: ``update_weights_from_disk`` (``path``) or ``update_params`` (``params``,
    a pytree; ``path`` is ``IN_PROCESS``). The answer goes to ``future``: an asyncio future on
    ``loop``, or a ``concurrent.futures.Future`` when ``loop`` is None (any thread may wait)."""

    path: str
    label: str | None
    loop: asyncio.AbstractEventLoop | None
    future: Any
    params: Any = None

    def resolve(self, result=None, error: Exception | None = None) -> None:  # scheduler thread
        _settle(self.loop, self.future, result, error)


@dataclasses.dataclass(eq=False)
class MemoryJob:
    """Release (``release``) or resume the device memory: ``run`` on the scheduler thread, in
    order with the weight updates, once ``wait()`` is False (it stays queued meanwhile); the
    answer goes to ``future`` as for ``UpdateJob``."""

    release: bool
    run: Callable[[], dict]
    loop: asyncio.AbstractEventLoop | None
    future: Any
    wait: Callable[[], bool] = lambda: False

    def resolve(self, result=None, error: Exception | None = None) -> None:
        _settle(self.loop, self.future, result, error)


@dataclasses.dataclass
class _Loading:
    job: UpdateJob
    version: int
    future: concurrent.futures.Future
    before: dict
    t0: float


class Swapper:
    """Weight updates (and memory release / resume) in order, one at a time; ``tick`` runs at
    every scheduler iteration.

    Attributes:
      released: the device memory is released (``MemoryJob``): weights updates are refused.
    """

    def __init__(self, executor, inbox, metrics, *, background: bool, initial: Weights):
        self.executor, self.inbox, self.metrics, self.background = executor, inbox, metrics, background
        self._current = initial
        self._resident = {initial.version}
        self._next = initial.version + 1
        self._jobs: collections.deque[UpdateJob | MemoryJob] = collections.deque()
        self._retired: collections.deque[int] = collections.deque()
        self._loading: _Loading | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dllm-weights") \
            if background else None
        self.released = False
        self._watch(initial)
        metrics.set("weights_resident", 1)

    @property
    def current(self) -> Weights:
        """The version new requests get (any thread; replaced, never mutated)."""
        return self._current

    def request(self, job: UpdateJob | MemoryJob) -> None:
        """Queue an update or a memory job (any thread)."""
        self._jobs.append(job)
        self.inbox.wake()

    def busy(self) -> bool:
        return bool(self._jobs) or self._loading is not None

    # ---- the scheduler thread --------------------------------------------------------------

    def tick(self) -> None:
        self._retire()
        if self._loading is not None and self._loading.future.done():
            loading, self._loading = self._loading, None
            try:
                staged = loading.future.result()
                self.executor.install(loading.version, staged)
            except Exception as e:  # noqa: BLE001 - the old weights keep serving
                self._failed(loading.job, e)
            else:
                self._installed(loading.job, loading.version, staged, loading.before, loading.t0)
        while self._loading is None and self._jobs:
            job = self._jobs[0]
            if isinstance(job, MemoryJob):
                if job.wait():
                    break
                self._jobs.popleft()
                self._memory(job)
            elif len(self._resident) > 1:  # a new load only once the older version is gone: never three copies
                break
            else:
                self._jobs.popleft()
                self._start(job)

    def _start(self, job: UpdateJob) -> None:
        if self.released:
            self.metrics.inc("weight_update_failures_total")
            job.resolve(error=MemoryReleased("loading new weights"))
            return
        version = self._next  # (taken only if it installs: versions count the weights that served)
        before, t0 = memory_in_use(), time.monotonic()
        in_process = job.params is not None
        log.info("loading weights version %d from %s (%s)", version, job.path,
                 "in the background" if self.background else "inline" if in_process else "inline, on every process")
        if in_process:  # (the job holds no reference to the tree once it is staged)
            read = functools.partial(self.executor.stage_params, job.params)
            job.params = None
        else:
            read = functools.partial(self.executor.read_weights, job.path)
        if self.background:
            future = self._pool.submit(read)
            future.add_done_callback(lambda _: self.inbox.wake())
            self._loading = _Loading(job, version, future, before, t0)
            return
        try:
            if in_process:  # (single process: update_params refuses multi-host engines)
                staged = read()
                self.executor.install(version, staged)
            else:
                staged = self.executor.load_weights(job.path, version)
        except Exception as e:  # noqa: BLE001 - the old weights keep serving
            self._failed(job, e)
        else:
            self._installed(job, version, staged, before, t0)

    def _memory(self, job: MemoryJob) -> None:
        try:
            result = job.run()
        except Exception as e:  # noqa: BLE001 - the caller gets it; nothing changed
            job.resolve(error=e)
            return
        self.released = job.release
        job.resolve(result)

    def _retire(self) -> None:
        while self._retired:
            version = self._retired.popleft()
            try:
                self.executor.retire(version)
            except Exception:  # noqa: BLE001 - keep serving; the memory may stay allocated
                log.exception("retiring weights version %d failed", version)
            self._resident.discard(version)
            self.metrics.set("weights_resident", len(self._resident))
            log.info("weights version %d retired (its last request ended)", version)

    def _installed(self, job: UpdateJob, version: int, staged: Staged, before: dict, t0: float) -> None:
        seconds = time.monotonic() - t0
        self._next = version + 1
        both = memory_in_use()  # both copies resident: the old one is still current until the next line
        label = job.label if job.label is not None else self._current.label  # (SGLang keeps the last one)
        self._current = Weights(version, job.path, time.time(), label, staged.layout)
        self._watch(self._current)
        self._resident.add(version)
        self.metrics.inc("weights_loaded_total")
        self.metrics.observe("weight_update_seconds", seconds)
        self.metrics.set("weights_resident", len(self._resident))
        log.info("weights version %d (%s, %s, %.2f GB) serving new requests after %.2fs", version, job.path,
                 staged.layout, staged.nbytes / 1e9, seconds)
        job.resolve({
            "success": True,
            "message": f"loaded {job.path} ({staged.layout}) in {seconds:.2f}s; requests queued from now on run "
                       "on it, running ones finish on the previous weights",
            "model_path": job.path, "weights_version": version, "weight_version": label,
            "layout": staged.layout, "load_seconds": round(seconds, 3), "read_seconds": round(staged.seconds, 3),
            "params_bytes": staged.nbytes, "copied_bytes": staged.copied_bytes,
            "memory": {"before": before, "both_resident": both},
        })
        staged.params = None

    def _failed(self, job: UpdateJob, exc: BaseException) -> None:
        err = failure(job.path, exc)
        self.metrics.inc("weight_update_failures_total")
        log.error("weight update from %s failed: %s", job.path, err)
        job.resolve(error=err)

    def _watch(self, weights: Weights) -> None:
        finalizer = weakref.finalize(weights, self._gone, weights.version)
        finalizer.atexit = False

    def _gone(self, version: int) -> None:  # any thread: the last reference to a version went
        self._retired.append(version)
        self.inbox.wake()

    def fail_all(self, err: ServeError) -> None:
        """Shutdown or a dead engine: every pending update (and memory job) gets ``err``."""
        if self._loading is not None:
            self._loading.future.cancel()
            self._loading.job.resolve(error=err)
            self._loading = None
        while self._jobs:
            self._jobs.popleft().resolve(error=err)

    def shutdown(self) -> None:
        self.fail_all(EngineDead("the server is shutting down"))
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


