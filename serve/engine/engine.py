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
import itertools
import logging
import threading
import time
from typing import Callable, Sequence

from dllm_jax.sampling import PROMPT_BUCKETS, ContextOverflow, program_key
from serve.engine.compiler import Compiler
from serve.engine.defaults import default_params
from serve.engine.engine_types import (
    EngineOptions,
    ModelInfo,
    State,
    WeightedScoreJob,
    WeightedSeq,
    lean_head_on,
    prompt_chars_bound,
)
from serve.engine.errors import ContextLengthExceeded, EngineDead, EngineNotReady
from serve.engine.executor import Device, Executor, ServedModel
from serve.engine.metrics import Metrics, live_array_bytes
from serve.engine.requests import ControlJob, Event, Handle, Inbox, SeqRequest
from serve.engine.scheduler import Scheduler
from serve.engine.weight_updates import WeightUpdates
from serve.engine.weights import Swapper, Weights

log = logging.getLogger("serve.engine")

__all__ = ["Engine", "EngineOptions", "Event", "Handle", "ModelInfo", "SeqRequest", "State", "Weights"]


class Engine(WeightUpdates):
    """Owns the model and the scheduler thread.

    (Weight updates and device memory: ``WeightUpdates``, ``serve.engine.weight_updates``.)"""

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

    # (update_weights, update_params, release_memory, resume_memory: ``WeightUpdates``)

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
                programs.share_forwards = self.options.share_forwards
                # (before any key is made: requests that allow it get lean-head keys, the others full ones)
                programs.lean_head = lean_head_on(self.options.lean_head, model.spec.vocab)
                log.info("lean head %s (--lean-head %s, vocabulary %d)", "on" if programs.lean_head else "off",
                         self.options.lean_head, model.spec.vocab)
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
