"""The engine the routes see: ``info``, ``health``, ``warmup`` (at start), ``submit`` and ``score``.

It loads the model and runs the scheduler (``serve.engine.scheduler``) on its own thread, so the
asyncio front end only queues sequences and reads events back: ``/health`` and ``/metrics``
answer while a block program runs. Health: loading -> warming_up -> ready, or dead when the
thread failed (every pending request then gets ``EngineDead``). Refusals are the domain
errors of ``serve.engine.errors`` (``EngineNotReady``, ``ContextLengthExceeded``, ``QueueFull``);
``serve.api.app`` maps them to HTTP.

Weights can be replaced while serving (``update_weights``, off unless ``allow_weight_updates``):
each queued sequence and scoring job carries the ``serve.engine.weights.Weights`` that were current
when its request was queued, and runs on them to the end (see ``serve.engine.weights``). In process, a
trainer hands over a pytree instead (``update_params``, single process): same queue, same swap
point, no disk, no recompile. ``release_memory`` / ``resume_memory`` move the weights off the
device and back (SGLang's release / resume_memory_occupation); ``released`` says which.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from typing import Callable, Sequence

import jax

from dllm_jax.sampling import PROMPT_BUCKETS, ContextOverflow, program_key
from serve.engine.compiler import Compiler
from serve.engine.defaults import default_params
from serve.engine.errors import (
    ContextLengthExceeded,
    EngineBusy,
    EngineDead,
    EngineNotReady,
    WeightUpdateFailed,
    WeightUpdatesDisabled,
)
from serve.engine.engine_types import (
    EngineOptions,
    ModelInfo,
    State,
    WeightedScoreJob,
    WeightedSeq,
    prompt_chars_bound,
)
from serve.engine.executor import Device, Executor, ServedModel
from serve.engine.metrics import Metrics, live_array_bytes
from serve.engine.requests import ControlJob, Event, Handle, Inbox, SeqRequest
from serve.engine.scheduler import Scheduler
from serve.engine.weight_reading import IN_PROCESS
from serve.engine.weights import MemoryJob, Swapper, UpdateJob, Weights

log = logging.getLogger("serve.engine")

__all__ = ["Engine", "EngineOptions", "Event", "Handle", "ModelInfo", "SeqRequest", "State", "Weights"]


class Engine:
    """Owns the model and the scheduler thread."""

    def __init__(self, load: Callable[[], object], *, names: Sequence[str], options: EngineOptions = EngineOptions(),
                 metrics: Metrics | None = None, demo: bool = False,
                 make_executor: Callable[[ServedModel], Device] | None = None):
        self._load, self.names, self.options, self.demo = load, tuple(names), options, demo
        self.metrics = metrics or Metrics(self.names[0] if self.names else "")
        self.metrics.on_scrape.append(lambda: self.metrics.set("live_array_bytes", live_array_bytes()))
        self._make_executor = make_executor or Executor
        self.state = State.LOADING
        self.error: str | None = None
        self.model = None
        self.executor: Device | None = None
        self.compiler: Compiler | None = None
        self.scheduler: Scheduler | None = None
        self.swapper: Swapper | None = None
        self._info: ModelInfo | None = None
        self.inbox = Inbox(options.max_queue)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.pause_mode: str | None = None  # /pause_generation's mode while paused
        # /reconfigure_dllm: decoder defaults (field -> value) a request gets when it leaves the field out
        self.overrides: dict = {}

    # ---- interface for the HTTP layer ----------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="dllm-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.inbox.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def health(self) -> tuple[bool, str]:
        if self.state is State.READY and not (self._thread and self._thread.is_alive()):
            self.state, self.error = State.DEAD, self.error or "scheduler thread exited"
        return self.state is State.READY, self.state.value

    def fail(self, reason: str) -> None:
        """Declare the engine dead from outside its thread (multi-host: a peer process was lost):
        /health answers 503 and new requests are refused from now on."""
        self.error, self.state = reason, State.DEAD
        self.metrics.set("engine_ready", 0)

    def info(self) -> ModelInfo:
        """The served model; raises EngineNotReady unless ready."""
        ready, state = self.health()
        if not ready:
            raise EngineNotReady(state, self.error)
        return self._info

    def submit(self, seqs: Sequence[SeqRequest], weights: Weights | None = None) -> Handle:
        """Queue sequences; raises EngineNotReady, ContextLengthExceeded or QueueFull (nothing queued then).

        They run on ``weights`` (default: the current version, see ``weights``).
        """
        self.info()
        weights = weights or self.swapper.current
        handle = Handle(self.inbox, asyncio.get_running_loop())
        items = []
        for index, req in enumerate(seqs):
            try:
                key = program_key(self.model, len(req.prompt), req.params, 1,
                                  prompt_buckets=self.prompt_buckets(), batch_buckets=(1,))
            except ContextOverflow as e:  # the library's rule, reported in the server's terms
                raise ContextLengthExceeded(e.prompt_tokens, e.gen_length, e.extra, e.context) from None
            items.append(WeightedSeq(next(self._ids), index, req, handle, key.group(), key.prompt_len, handle.arrival,
                                     weights=weights))
        self.inbox.put(items)
        handle.seq_ids = [s.id for s in items]
        return handle

    async def score(self, sequences: Sequence[Sequence[int]], top_k: int = 0, weights: Weights | None = None) -> list:
        """``Model.score`` of the sequences (on ``weights``, default the current version), run on
        the scheduler thread between block steps.

        Raises EngineNotReady, QueueFull, or (from the thread) EngineFailed / EngineDead.
        """
        self.info()
        loop = asyncio.get_running_loop()
        job = WeightedScoreJob([list(map(int, q)) for q in sequences], int(top_k), loop, loop.create_future(),
                               weights=weights or self.swapper.current)
        self.inbox.put_score(job)
        return await job.future

    def weights(self) -> Weights:
        """The weights version new requests get: hold it to run several calls on one version
        (``submit(..., weights=)``, ``score(..., weights=)``)."""
        self.info()
        return self.swapper.current

    async def update_weights(self, path: str, label: str | None = None) -> dict:
        """Load the checkpoint at ``path`` and make it the version new requests get (no recompile).

        Returns what was loaded (``success``, ``message``, version, timing, memory). Raises
        WeightUpdatesDisabled, EngineNotReady, or WeightUpdateFailed / IncompatibleWeights (the
        old weights keep serving).
        """
        if not self.options.allow_weight_updates:
            raise WeightUpdatesDisabled()
        self.info()
        loop = asyncio.get_running_loop()
        job = UpdateJob(str(path), label, loop, loop.create_future())
        self.swapper.request(job)
        return await job.future

    # ---- in process: a trainer's weights, device memory (RL) --------------------------------

    async def update_params(self, params, label: str | None = None) -> dict:
        """Make ``params`` the weights version new requests get: a pytree of the served model's
        parameters (an ``nnx.State`` like ``model.params``, or its pure dict), e.g. from a JAX
        trainer in this process. No disk, no recompile; requests running finish on the version
        they started on (as with ``update_weights``, through the same queue and install).

        Leaves already of the running dtype and sharding are served as they are (no copy: they
        stay the caller's, who must not delete or donate them while requests may run on this
        version); others are cast (``astype``) and/or put onto the running sharding
        (``device_put``), which copies them (``copied_bytes`` in the answer). Works without
        ``allow_weight_updates`` (that flag guards the HTTP endpoint). ``label``: SGLang's
        ``weight_version`` (None keeps the previous label).

        Returns the ``update_weights`` answer (``layout`` 'pytree', ``model_path``
        'in-process params'). Raises EngineNotReady, MemoryReleased, or WeightUpdateFailed
        naming the first parameter that is missing, extra or of another shape (the old weights
        keep serving), or on a multi-process engine (refused: one pytree cannot feed every
        process; write a checkpoint and use ``update_weights``).
        """
        return await asyncio.wrap_future(self._queue_params(params, label))

    def update_params_sync(self, params, label: str | None = None, timeout: float | None = None) -> dict:
        """``update_params`` from a plain thread (a trainer loop, a notebook cell): blocks until the
        version is installed (or ``timeout`` seconds: ``TimeoutError``, the update still runs)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("update_params_sync called on the scheduler thread would wait for itself")
        return self._queue_params(params, label).result(timeout)

    def _queue_params(self, params, label: str | None) -> concurrent.futures.Future:
        self.info()
        if jax.process_count() > 1:
            raise WeightUpdateFailed(IN_PROCESS, f"update_params needs a single-process engine (this one spans "
                                                 f"{jax.process_count()} processes); save a checkpoint every host "
                                                 "can read and use update_weights", bad_checkpoint=False)
        job = UpdateJob(IN_PROCESS, label, None, concurrent.futures.Future(), params=params)
        self.swapper.request(job)
        return job.future

    @property
    def released(self) -> bool:
        """True from ``release_memory`` until ``resume_memory``: the weights are off the device and
        nothing may be admitted or scored (the scheduler holds while it is set)."""
        return self.swapper is not None and self.swapper.released

    async def release_memory(self) -> dict:
        """SGLang's ``release_memory_occupation``: every weights version's params to host memory
        and their device buffers freed (``Executor.offload``), and the empty batches kept open for
        returning clients closed (their decode state is device memory too). Runs on the scheduler
        thread in order with the weight updates, after any compile in flight. A no-op when
        already released.

        Returns {'success', 'message', 'params_bytes' (host copy), 'versions', 'live_array_bytes':
        {'before', 'after'}}. Raises EngineNotReady, or EngineBusy when sequences are in running
        batches (let them finish or abort them first: nothing is released then).
        """
        return await self._memory_job(True)

    async def resume_memory(self) -> dict:
        """SGLang's ``resume_memory_occupation``: the released params back onto their shardings,
        bitwise as they were (``Executor.reload``; no recompile). A no-op unless released."""
        return await self._memory_job(False)

    async def _memory_job(self, release: bool) -> dict:
        self.info()
        job = MemoryJob(release, self._release if release else self._resume, None, concurrent.futures.Future(),
                        wait=(lambda: self.compiler.in_flight() > 0) if release else (lambda: False))
        self.swapper.request(job)
        return await asyncio.wrap_future(job.future)

    def _release(self) -> dict:  # the scheduler thread
        running = sum(len(s.slots) for s in self.scheduler.sessions)
        if running:
            raise EngineBusy(running, "releasing the device memory")
        before = live_array_bytes()
        for session in [s for s in self.scheduler.sessions if not s.slots]:  # kept open for returning clients
            self.executor.close(session.sid)
            self.scheduler.sessions.remove(session)
        moved = self.executor.offload()
        after = live_array_bytes()
        log.info("device memory released: %d weights version(s), %.3f GB to host; live arrays %.3f -> %.3f GB",
                 moved["versions"], moved["params_bytes"] / 1e9, before / 1e9, after / 1e9)
        return {"success": True, "message": f"released {moved['params_bytes']} bytes of weights to host memory",
                **moved, "live_array_bytes": {"before": before, "after": after}}

    def _resume(self) -> dict:  # the scheduler thread
        before = live_array_bytes()
        moved = self.executor.reload()
        after = live_array_bytes()
        log.info("device memory resumed: %d weights version(s), %.3f GB back; live arrays %.3f -> %.3f GB",
                 moved["versions"], moved["params_bytes"] / 1e9, before / 1e9, after / 1e9)
        return {"success": True, "message": f"resumed {moved['params_bytes']} bytes of weights onto the devices",
                **moved, "live_array_bytes": {"before": before, "after": after}}

    # ---- control (SGLang's pause / continue / abort; run on the scheduler thread) -----------

    async def control(self, fn: Callable[[Scheduler], object]):
        """Run ``fn(scheduler)`` on the scheduler thread between two device calls; its result."""
        self.info()
        loop = asyncio.get_running_loop()
        job = ControlJob(lambda: fn(self.scheduler), loop, loop.create_future())
        self.inbox.put_control(job)
        return await job.future

    async def pause(self, mode: str) -> int:
        """Stop generating until ``resume``: 'abort' ends every running and waiting sequence now
        (finish_reason 'abort', with the tokens already final) and holds new ones; 'retract' and
        'in_place' keep running rows in their slots (they continue at ``resume``, on the weights
        version they started on). Arrivals wait either way. Returns the sequences aborted
        ('abort') or held in their slots."""
        def pause(s: Scheduler) -> int:
            if mode == "abort":
                s.hold("paused")
                return s.abort(None, "Aborted")
            self.pause_mode = mode
            return s.hold("paused")
        n = await self.control(pause)
        self.pause_mode = mode
        return n

    async def resume(self) -> None:
        await self.control(lambda s: s.unhold("paused"))
        self.pause_mode = None

    async def abort(self, seq_ids: Sequence[int] | None = None, message: str = "aborted") -> int:
        """End these sequences (all with None) now: finish_reason 'abort' (see ``Scheduler.abort``)."""
        ids = None if seq_ids is None else set(seq_ids)
        return await self.control(lambda s: s.abort(ids, message))

    async def counts(self) -> dict:
        """{'running', 'waiting', 'held'}: rows in slots, rows queued, the scheduler's holds."""
        return await self.control(lambda s: s.counts())

    def prompt_buckets(self) -> tuple[int, ...]:
        return self.options.prompt_buckets or PROMPT_BUCKETS

    # ---- the engine thread -----------------------------------------------------------------

    def _main(self) -> None:
        try:
            t0 = time.monotonic()
            model = self._load()
            self.model = model
            self.executor = self._make_executor(model)
            self.executor.steps_per_call = self.options.steps_per_call
            self.executor.weights_root = self.options.weights_root
            programs = model.programs  # (None: a model without a program cache)
            self.compiler = Compiler(self.executor.warmup, background=self.options.background_compile,
                                     on_done=self.inbox.wake, metrics=self.metrics,
                                     cached=(lambda key: key in programs) if programs is not None else None)
            if programs is not None:
                programs.set_limit(self.options.max_programs)
                programs.on_evict.append(self._evicted)
            self.swapper = Swapper(self.executor, self.inbox, self.metrics, background=self.options.background_compile,
                                   initial=Weights(0, str(model.source), time.time()))
            self.scheduler = Scheduler(model, self.executor, self.compiler, self.options, self.metrics, self.inbox,
                                       self.prompt_buckets(), weights=self.swapper)
            self._info = ModelInfo(
                names=self.names, family=model.family, tokenizer=model.tokenizer, max_length=model.max_length,
                vocab=model.spec.vocab, mask_token_id=model.mask_token_id,
                stop_token_ids=tuple(model.stop_token_ids), source=str(model.source), demo=self.demo,
                mesh=dict(model.mesh.shape), created=int(time.time()),
                max_prompt_chars=self.options.max_prompt_chars or prompt_chars_bound(model),
                max_gen_length=min(self.options.max_gen_length or model.max_length, model.max_length))
            log.info("loaded %r in %.1fs", model, time.monotonic() - t0)
            self.state = State.WARMING_UP
            self._warmup()
            self.state = State.READY
            self.metrics.set("engine_ready", 1)
            log.info("ready: serving %s", ", ".join(self.names))
            self.scheduler.loop()
        except BaseException as e:  # noqa: BLE001 - the engine must report, not vanish
            log.exception("engine failed")
            self.error = f"{type(e).__name__}: {e}"
            self.state = State.DEAD
            self.metrics.set("engine_ready", 0)
            if self.scheduler is not None:
                self.scheduler.fail_all(EngineDead(self.error))
            if self.swapper is not None:
                self.swapper.fail_all(EngineDead(self.error))

    def _evicted(self, key) -> None:
        """The model's program cache dropped ``key`` (LRU, ``max_programs``)."""
        if self.compiler is not None:
            self.compiler.evicted(key)
        self.metrics.inc("programs_evicted_total")
        log.debug("evicted %s", key)

    def _warmup(self) -> None:
        buckets = self.options.warmup
        for i, (batch, prompt_len, gen_length) in enumerate(buckets, 1):
            params = default_params(self.model.family, gen_length)
            key = program_key(self.model, prompt_len, params, batch, prompt_buckets=self.prompt_buckets(),
                              batch_buckets=self.options.batch_bucket_list())
            t0 = time.monotonic()
            self.executor.warmup(key)
            self.compiler.add(key)
            self.metrics.inc("compiles_total")
            log.info("warmup %d/%d: compiled %s in %.1fs", i, len(buckets), key, time.monotonic() - t0)
