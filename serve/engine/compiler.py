"""Which programs are compiled, and compiling new ones without stalling running batches.

A new ProgramKey (a batch size / prompt bucket / canvas the server has not run yet) costs a
compile: seconds on CPU, tens of seconds for an 8B model on a GPU. Compiling inline would
stop every running batch for that long. On a single host the key is compiled in a
background thread instead (a warm-up run of the block program on empty slots); until it is
ready the scheduler may *borrow* an already compiled program of the same group with a
prompt bucket at least as long, if it costs at most ``borrow_factor`` times as much
(slots x canvas), or the requests wait while the other batches keep running.

The compiled programs live in the model's LRU cache (``Programs``, ``--max-programs``); when
it drops a key, ``evicted`` forgets it here too (so it is compiled again before it runs, and
is no longer lent). A failed compile is reported to the next request of that key; failures
nobody asks for again are forgotten after ``FAILURE_TTL_S`` (the table stays bounded).

Multi-host: every process must enter programs and collectives in the same order, so a new
key compiles inline at its first step (``background=False``); configure ``--warmup-buckets``.

Memory: an XLA compile allocates and frees a lot of C++ heap; under glibc malloc the freed
pages mostly stay in the process (RSS), so a server that keeps rebuilding evicted programs
grew by 1-3.5 MB per rebuild though nothing leaked (docs/performance.md, "Memory under a repeated
workload"). ``trim_heap`` (glibc ``malloc_trim(0)``; a no-op elsewhere) returns them after
every background compile and every eviction, at most once per ``TRIM_INTERVAL_S``.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import logging
import sys
import threading
import time
from typing import Callable

from dllm_jax.sampling import ProgramKey

log = logging.getLogger("serve.engine")


FAILURE_TTL_S = 600.0
TRIM_INTERVAL_S = 1.0


def _malloc_trim():
    """glibc's ``malloc_trim`` (None on other platforms or C libraries)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_trim = _malloc_trim()
_trim_lock = threading.Lock()
_last_trim = [float("-inf")]


def trim_heap(force: bool = False) -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``), at most once per
    ``TRIM_INTERVAL_S`` unless ``force``; True when it ran. Thread-safe; a no-op without glibc."""
    if _trim is None:
        return False
    now = time.monotonic()
    with _trim_lock:
        if not force and now - _last_trim[0] < TRIM_INTERVAL_S:
            return False
        _last_trim[0] = now
    _trim(0)
    return True


def cost(key: ProgramKey) -> int:
    return key.batch * key.canvas_len


class Compiler:
    def __init__(self, warm: Callable[[ProgramKey], None], *, background: bool, on_done: Callable[[], None],
                 metrics=None, borrow_factor: float = 8.0, cached: Callable[[ProgramKey], bool] | None = None):
        self._warm, self.background, self._on_done = warm, background, on_done
        self._cached = cached  # is the key still in the program cache (None: always)
        self.metrics, self.borrow_factor = metrics, borrow_factor
        self.compiled: set[ProgramKey] = set()
        self._compiling: set[ProgramKey] = set()
        self._failed: dict[ProgramKey, tuple[Exception, float]] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dllm-compile") \
            if background else None

    def add(self, key: ProgramKey) -> None:
        with self._lock:
            self.compiled.add(key)

    def evicted(self, key) -> None:
        """The program cache dropped ``key`` (any thread): it is not compiled any more."""
        with self._lock:
            self.compiled.discard(key)
        trim_heap()  # (its executable is freed once no session holds it; the next trim gets the rest)

    def ready(self, key: ProgramKey, *, only_if_idle: bool = False) -> bool:
        """True when ``key`` can run now; otherwise its compile is started (background mode) -
        with ``only_if_idle``, only when none runs or waits (for programs that are only an
        improvement, a tighter prompt bucket, which must not delay the compiles waiting requests need)."""
        if not self.background:
            return True
        with self._lock:
            if key in self.compiled:
                return True
            if only_if_idle and self._compiling:
                return False
            if key not in self._compiling:
                self._compiling.add(key)
                self._pool.submit(self._compile, key)
            return False

    def is_compiled(self, key: ProgramKey) -> bool:
        """Whether ``key`` is compiled now (never starts a compile)."""
        with self._lock:
            return key in self.compiled

    def in_flight(self) -> int:
        """Background compiles running or queued."""
        with self._lock:
            return len(self._compiling)

    def take_failure(self, key: ProgramKey) -> Exception | None:
        """The error of a failed background compile of ``key`` (reported once; a later request retries)."""
        with self._lock:
            now = time.monotonic()
            for k in [k for k, (_, t) in self._failed.items() if now - t > FAILURE_TTL_S]:
                del self._failed[k]
            failure = self._failed.pop(key, None)
        return failure[0] if failure is not None else None

    def borrow(self, key: ProgramKey, rows: int) -> ProgramKey | None:
        """A compiled key of the same group that holds ``key``'s prompts, if affordable: the one
        that takes the most of ``rows`` waiting sequences, then the cheapest."""
        with self._lock:
            group = key.group()
            options = [k for k in self.compiled if k.group() == group and k.prompt_len >= key.prompt_len
                       and cost(k) <= self.borrow_factor * cost(key)]
        return min(options, key=lambda k: (-min(k.batch, rows), cost(k)), default=None)

    def _compile(self, key: ProgramKey) -> None:
        t0 = time.monotonic()
        try:
            self._warm(key)
        except Exception as e:  # noqa: BLE001 - reported to the requests that wanted it
            log.exception("compiling %s failed", key)
            with self._lock:
                self._failed[key] = (e, time.monotonic())
        else:
            log.info("compiled %s in %.1fs (background)", key, time.monotonic() - t0)
            with self._lock:
                # (evicted again already, under a small cache and many compiles: not ready)
                if self._cached is None or self._cached(key):
                    self.compiled.add(key)
            if self.metrics is not None:
                self.metrics.inc("compiles_total")
        finally:
            with self._lock:
                self._compiling.discard(key)
            self._on_done()
            trim_heap()  # the compiler's freed scratch memory back to the OS

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
