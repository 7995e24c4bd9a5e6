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

import numpy as np

from serve.executor import Command, Executor

log = logging.getLogger("serve.multihost")


def slurm_multi_task() -> bool:
    return "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ \
        and int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1"))) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """``jax.distributed.initialize`` when asked (flags) or under a multi-task SLURM job.

    Returns True when running multi-process. Must run before any other JAX call.
    """
    import jax

    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise SystemExit("--coordinator-address needs --num-processes and --process-id")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif slurm_multi_task():
        jax.distributed.initialize()  # SLURM cluster auto-detection
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


def follow(model) -> None:
    """Followers: replay process 0's commands until it shuts down."""
    import jax

    executor = Executor(model)
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
