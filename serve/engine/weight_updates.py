"""The engine's weights and device memory: new weights from disk (``update_weights``) or from a
trainer in this process (``update_params``), and the weights off the device and back
(``release_memory`` / ``resume_memory``, SGLang's release / resume_memory_occupation).

A mixin of ``serve.engine.engine.Engine`` (split out of it for size; it works on the engine's
own state, declared below). Every one of these is a job in the swapper's queue
(``serve.engine.weights``), run on the scheduler thread between two device calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import TYPE_CHECKING, Callable

import jax

from serve.engine.errors import EngineBusy, WeightUpdateFailed, WeightUpdatesDisabled
from serve.engine.metrics import live_array_bytes
from serve.engine.weight_reading import IN_PROCESS
from serve.engine.weights import MemoryJob, UpdateJob

if TYPE_CHECKING:
    from serve.engine.compiler import Compiler
    from serve.engine.engine_types import EngineOptions, ModelInfo
    from serve.engine.executor import Device
    from serve.engine.scheduler import Scheduler
    from serve.engine.weights import Swapper

log = logging.getLogger("serve.engine")


class WeightUpdates:
    """Weight updates and device memory (``Engine`` inherits these methods)."""

    # the engine's state these methods read (set by ``Engine.__init__`` and its thread)
    options: EngineOptions
    swapper: Swapper | None
    executor: Device | None
    compiler: Compiler | None
    scheduler: Scheduler | None
    _thread: threading.Thread | None
    info: Callable[[], ModelInfo]  # (a method of Engine: raises EngineNotReady unless ready)

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
