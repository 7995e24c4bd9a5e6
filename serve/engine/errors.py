"""What the engine and the scheduler raise: domain errors, no HTTP in sight.

They carry the facts (how full the queue is, what did not fit, which state the engine is
in); ``serve.api.app.api_error`` is the one place that turns them into HTTP statuses and
OpenAI error bodies, so the engine can be driven (and tested) without the web layer.
"""

from __future__ import annotations

from dllm_jax.sampling import ContextOverflow


class ServeError(Exception):
    """Base of the engine's errors."""


class QueueFull(ServeError):
    """More sequences than ``max_queue`` would be waiting for a slot."""

    def __init__(self, waiting: int, limit: int):
        super().__init__(f"the queue is full ({waiting} sequences waiting, limit {limit})")
        self.waiting, self.limit = waiting, limit


class EngineNotReady(ServeError):
    """The engine does not take requests in this state ('loading', 'warming_up', 'dead')."""

    def __init__(self, state: str, detail: str | None = None):
        super().__init__(f"the engine is {state.replace('_', ' ')}" + (f": {detail}" if detail else ""))
        self.state, self.detail = state, detail


class ContextLengthExceeded(ServeError, ContextOverflow):
    """A prompt plus its canvas does not fit the context: the library's ``ContextOverflow`` (its
    facts and message), raised by the engine as one of its own errors.

    ``gen_length`` is max_tokens rounded up to whole blocks; ``extra`` the decoder's own room
    (``2 * block_length`` for the Nemotron static-block decoder, else 0).
    """


class EngineFailed(ServeError):
    """Running the batch that held a sequence failed (only that batch's sequences get it)."""

    def __init__(self, what: str, cause: BaseException):
        super().__init__(f"generation failed while {what}: {type(cause).__name__}: {cause}")
        self.what, self.cause = what, cause


class EngineDead(ServeError):
    """The scheduler thread died; every sequence it held or would receive gets this."""

    def __init__(self, detail: str):
        super().__init__(f"the engine died: {detail}")
        self.detail = detail


class ClientDisconnected(ServeError):
    """The client of a request went away (posted by the front end to wake its waiter)."""

    def __init__(self):
        super().__init__("client disconnected")


class WeightUpdatesDisabled(ServeError):
    """``POST /update_weights_from_disk`` on a server started without ``--allow-weight-updates``."""

    def __init__(self):
        super().__init__("weight updates are off on this server (start it with --allow-weight-updates)")


class WeightUpdateFailed(ServeError):
    """New weights were not installed; the old ones keep serving.

    ``bad_checkpoint``: the checkpoint is missing, unreadable, truncated or of another
    architecture (the client's to fix), rather than the server failing to load a good one.
    """

    def __init__(self, path: str, reason: str, *, bad_checkpoint: bool = True):
        super().__init__(f"could not load weights from {path}: {reason}; the previous weights keep serving")
        self.path, self.reason, self.bad_checkpoint = path, reason, bad_checkpoint


class IncompatibleWeights(WeightUpdateFailed):
    """The checkpoint's config differs from the running model's in ``field`` (shapes, ids ...)."""

    def __init__(self, path: str, field: str, running, found):
        super().__init__(path, f"its config differs from the running model's in {field}: {found!r} (running: "
                               f"{running!r}); new weights must have the running architecture")
        self.field, self.running, self.found = field, running, found


class EngineBusy(ServeError):
    """An operation that needs an idle engine (releasing its device memory) found ``rows``
    sequences in running batches: let them finish or abort them, then retry."""

    def __init__(self, rows: int, what: str):
        super().__init__(f"{rows} sequence(s) are in running batches: let them finish or abort them "
                         f"(pause_generation with mode 'abort') before {what}")
        self.rows, self.what = rows, what


class MemoryReleased(ServeError):
    """The weights are off the device (``Engine.release_memory``, SGLang's
    ``/release_memory_occupation``) until ``resume_memory``; ``what`` needs them there."""

    def __init__(self, what: str):
        super().__init__(f"the engine's device memory is released: resume it (resume_memory_occupation) before {what}")
        self.what = what
