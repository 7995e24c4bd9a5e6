"""Multi-host serving: ``jax.distributed`` set-up, command broadcast, the follower loop.

Every process loads the model onto the global mesh. Process 0 runs the HTTP server and the
scheduler; each device-facing command of its ``Executor`` is broadcast with
``jax.experimental.multihost_utils.broadcast_one_to_all`` before it runs, and the other
processes (followers) receive and replay it, so every process enters the same jitted
programs and collectives in the same order. A command is pickled (it holds ProgramKeys and
SamplingParams); it only ever comes from process 0 of the same job.

A weight update is one such command too (``load_weights``: every process reads the same path
and they install it together, or none does; ``retire`` frees an old version everywhere).

Each broadcast is two collectives (length, then the payload padded to a power of two so
the broadcast programs compile once per size class). While idle, process 0 sends a no-op
every ``heartbeat_s`` seconds so followers never sit in a collective long enough to time out.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from typing import Callable

import numpy as np

from serve.engine.executor import Command, Executor

log = logging.getLogger("serve.engine.multihost")


def slurm_multi_task() -> bool:
    return "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ \
        and int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1"))) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, bind_address: str | None = None) -> bool:
    """``jax.distributed.initialize`` when asked (flags) or under a multi-task SLURM job.

    Process 0's coordination service listens on ``bind_address``, by default the
    ``coordinator_address`` it is given (jax's own default is every interface, ``[::]:port``);
    under SLURM auto-detection jax picks the address, and ``bind_address`` (or the env var
    ``JAX_COORDINATOR_BIND_ADDRESS``) narrows it. Returns True when running multi-process. Must
    run before any other JAX call.
    """
    import jax

    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise SystemExit("--coordinator-address needs --num-processes and --process-id")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id,
                                   coordinator_bind_address=bind_address or coordinator_address)
    elif slurm_multi_task():
        jax.distributed.initialize(coordinator_bind_address=bind_address)  # SLURM cluster auto-detection
    else:
        return False
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def _size_class(n: int) -> int:
    return max(256, 1 << (max(n, 1) - 1).bit_length())


def _broadcast(array: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(array))


def send(cmd: Command) -> None:
    """Process 0: broadcast one command."""
    payload = np.frombuffer(pickle.dumps(cmd), np.uint8)
    _broadcast(np.array([payload.size], np.int32))
    buf = np.zeros(_size_class(payload.size), np.uint8)
    buf[:payload.size] = payload
    _broadcast(buf)


def receive() -> Command:
    """Followers: the next command from process 0."""
    n = int(_broadcast(np.zeros(1, np.int32))[0])
    buf = _broadcast(np.zeros(_size_class(n), np.uint8))
    return pickle.loads(buf[:n].tobytes())


def leader_executor(model) -> Executor:
    return Executor(model, broadcast=send)


def follow(model, weights_root: str | None = None) -> None:
    """Followers: replay process 0's commands until it shuts down."""
    import jax

    executor = Executor(model)
    executor.weights_root = weights_root  # (the same --weights-root as process 0's)
    log.info("process %d following process 0", jax.process_index())
    while True:
        cmd = receive()
        if cmd.op == "shutdown":
            log.info("process 0 shut down; follower exits")
            return
        try:
            executor.apply(cmd)
        except Exception:  # noqa: BLE001 - process 0 hits the same error and fails those requests
            log.exception("command %s failed", cmd.op)


# ---- liveness ----------------------------------------------------------------------------------

HEARTBEAT_S = 1.0
EXIT_PEER_LOST = 3  # the exit status of a process whose peer stopped answering


class Liveness:
    """Each process bumps a counter of its own in the coordination service's key-value store
    every ``HEARTBEAT_S``; a watcher thread reads the counters of the processes this one depends
    on (process 0: every follower; a follower: process 0) and calls ``on_lost(process, why)`` once
    one has not moved for ``timeout_s`` by this process's own clock (no clock is compared across
    hosts), or the store cannot be reached (process 0, which hosts it, is gone).

    Both threads run beside whatever the main threads do: a process stuck in a collective with a
    dead peer (which would otherwise hang until jax's own heartbeat timeout, and leave /health at
    200) still notices.
    """

    def __init__(self, timeout_s: float, on_lost: Callable[[int, str], None]):
        import jax
        from jax._src import distributed

        self.client = distributed.global_state.client
        self.me, self.count = jax.process_index(), jax.process_count()
        self.timeout_s, self.on_lost = timeout_s, on_lost
        self.watched = [p for p in range(self.count) if p != self.me] if self.me == 0 else [0]
        self._stop = threading.Event()

    @staticmethod
    def key(process: int) -> str:
        return f"dllm_jax/alive/{process}"

    def start(self) -> "Liveness":
        threading.Thread(target=self._beat, name="dllm-heartbeat", daemon=True).start()
        threading.Thread(target=self._watch, name="dllm-liveness", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                self.client.key_value_set(self.key(self.me), str(n), allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the watcher reports an unreachable store
                pass
            self._stop.wait(HEARTBEAT_S)

    def _watch(self) -> None:
        seen = {p: (None, time.monotonic()) for p in self.watched}
        while not self._stop.wait(HEARTBEAT_S):
            for p in self.watched:
                try:
                    value = self.client.key_value_try_get(self.key(p))
                except Exception as e:  # noqa: BLE001 - not written yet, or the store is gone
                    value, error = None, e
                else:
                    error = None
                last, since = seen[p]
                if value is not None and value != last:
                    seen[p] = (value, time.monotonic())
                elif time.monotonic() - since > self.timeout_s:
                    why = (f"process {p} sent no heartbeat for {self.timeout_s:.0f}s"
                           + (f" ({type(error).__name__})" if error is not None and last is not None else ""))
                    self._stop.set()
                    self.on_lost(p, why)
                    return


def exit_on_peer_lost(before_exit: Callable[[str], None] | None = None, grace_s: float = 2.0):
    """An ``on_lost`` for ``Liveness``: log, run ``before_exit`` (process 0: /health turns 503), and
    after ``grace_s`` end the process with EXIT_PEER_LOST. A clean shutdown is not possible: the
    main or scheduler thread may sit in a collective that never completes."""

    def on_lost(process: int, why: str) -> None:
        log.error("%s: the job cannot continue; exiting with status %d", why, EXIT_PEER_LOST)
        if before_exit is not None:
            before_exit(why)
        time.sleep(grace_s)
        logging.shutdown()
        os._exit(EXIT_PEER_LOST)

    return on_lost
