"""Prometheus metrics of one server, on ``prometheus_client`` (names prefixed ``dllm_``).

Each ``Metrics`` has its own ``CollectorRegistry`` (never the process-global default one: a
test process builds several servers), and every series carries the served model's name as
the label ``model``. ``render`` writes the text exposition format without the ``*_created``
series prometheus_client adds to counters and histograms: they are filtered here, per
registry, because ``prometheus_client.disable_created_metrics()`` would switch them off for
the whole process. Updated from the scheduler thread and the event loop (prometheus_client
is thread-safe); ``batch`` and ``render`` share a lock so a scrape never sees half a step.

``xla_compiles_total`` counts every XLA compilation of the process (any program, from
``jax.monitoring``'s backend-compile event, and executables loaded from JAX's persistent
compilation cache when one is configured: a load stands for a compile), so a change that
made the serving programs retrace (a weight update with another tree structure, say) shows
even where our own ``compiles_total`` would not.
"""

from __future__ import annotations

import threading
from typing import Iterator

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from dllm_jax.sampling import BATCH_BUCKETS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

GAUGES = {
    "queue_depth": "Sequences waiting for a batch slot.",
    "running_rows": "Sequences in running batches (the running batch size).",
    "sessions": "Open decode sessions (compiled batches in flight).",
    "engine_ready": "1 when the engine serves requests.",
    "compiles_in_flight": "Programs compiling in the background right now.",
    "programs_cached": "Compiled programs in the model's cache (block and scoring; at most --max-programs).",
    "weights_resident": "Weights versions in memory (2 while an update loads or old requests finish).",
    "live_array_bytes": "Bytes of the process's live JAX arrays (logical sizes; params, decode state ...), at scrape.",
}
COUNTERS = {  # prometheus_client renders a Counter named x as x_total
    "prompt_tokens_total": "Prompt tokens of admitted requests (no padding).",
    "generation_tokens_total": "Completion tokens returned.",
    "nfe_total": "Model forward passes summed over finished sequences.",
    "batch_steps_total": "Denoising steps run (one step advances every row of a batch by one step).",
    "decode_calls_total": "Decode calls (device round trips, each a few denoising steps) run.",
    "batch_rows_total": "Occupied slots summed over denoising steps.",
    "batch_forwards_total": "Model forward passes batches ran (a block-start refresh chunk or a cached call; rows "
                            "entering a block with identical inputs, such as the n samples of a prompt, share one).",
    "batch_slots_total": "Compiled slots summed over denoising steps (fill = rows / slots).",
    "rebuckets_total": "Sessions moved to another prompt bucket (their long prompts left, or a longer one joined).",
    "requests_cancelled_total": "Sequences dropped because the client went away.",
    "requests_aborted_total": "Running sequences ended by /abort_request or /pause_generation (mode abort).",
    "compiles_total": "Block programs compiled (warm-up and background).",
    "programs_built_total": "Programs built into the cache (block and scoring, including rebuilds after eviction).",
    "programs_evicted_total": "Compiled programs dropped from the cache (LRU over --max-programs).",
    "scored_tokens_total": "Prompt positions scored for echo + logprobs (Model.score).",
    "weights_loaded_total": "Weight updates installed (POST /update_weights_from_disk).",
    "weight_update_failures_total": "Weight updates refused or failed (the old weights kept serving).",
    "xla_compiles_total": "XLA compilations in this process (any program, jax.monitoring backend-compile events; "
                          "loads from JAX's persistent compilation cache count too).",
}
HISTOGRAMS = {
    "batch_size": ("Occupied slots per decode call.", BATCH_BUCKETS),
    "queue_time_seconds": ("Time from arrival to admission into a batch.", LATENCY_BUCKETS),
    "request_latency_seconds": ("Time from arrival to the last token of a request.", LATENCY_BUCKETS),
    "time_to_first_chunk_seconds": ("Time from arrival to the first streamed text.", LATENCY_BUCKETS),
    "block_step_seconds": ("Wall time of one decode call (device + host round trip).", LATENCY_BUCKETS),
    "score_seconds": ("Wall time of one scoring job (Model.score of a request's prompts).", LATENCY_BUCKETS),
    "weight_update_seconds": ("Time from the start of a weight load to the new version serving.", LATENCY_BUCKETS),
}
FINISH_REASONS = ("stop", "length")  # shown (at 0) before any request finishes

_XLA_EVENTS = ("/jax/core/compile/backend_compile_duration",   # compiled
               "/jax/compilation_cache/cache_retrieval_time_sec")  # or loaded from the persistent cache
_xla_lock = threading.Lock()
_xla = {"compiles": 0, "listening": False}


def _on_compile(event: str, duration: float, **kwargs) -> None:
    if event in _XLA_EVENTS:
        with _xla_lock:
            _xla["compiles"] += 1


def xla_compiles() -> int:
    """XLA compilations in this process since the first call (which starts listening)."""
    with _xla_lock:
        if not _xla["listening"]:
            jax.monitoring.register_event_duration_secs_listener(_on_compile)
            _xla["listening"] = True
        return _xla["compiles"]


def live_array_bytes() -> int:
    """Bytes of every live JAX array of this process (logical sizes: params, decode state ...)."""
    return sum(x.nbytes for x in jax.live_arrays())


def memory_in_use() -> dict:
    """Live array bytes, and the first local device's allocator (GPU/TPU) or this process's RSS (CPU)."""
    out = {"live_array_bytes": live_array_bytes()}
    stats = jax.local_devices()[0].memory_stats()
    if stats:
        out.update(device_bytes_in_use=stats.get("bytes_in_use"),
                   device_peak_bytes_in_use=stats.get("peak_bytes_in_use"))
        return out
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["process_rss_bytes"] = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    out["process_peak_rss_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class Metrics:
    """All server metrics; methods take the names above (without ``dllm_``)."""

    def __init__(self, model_name: str = ""):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        label = {"model": model_name}

        def child(metric):
            return metric.labels(**label)

        reg = dict(labelnames=["model"], registry=self.registry)
        self._gauges = {n: child(Gauge(f"dllm_{n}", doc, **reg)) for n, doc in GAUGES.items()}
        self._counters = {n: child(Counter(f"dllm_{n}", doc, **reg)) for n, doc in COUNTERS.items()}
        self._hist = {n: child(Histogram(f"dllm_{n}", doc, buckets=buckets, **reg))
                      for n, (doc, buckets) in HISTOGRAMS.items()}
        self._finish = Counter("dllm_requests_total", "Finished sequences by finish reason.",
                               ["model", "finish_reason"], registry=self.registry)
        for reason in FINISH_REASONS:
            self._finish.labels(model=model_name, finish_reason=reason)
        self._status = Counter("dllm_http_requests_total", "HTTP responses by status code.", ["model", "status"],
                               registry=self.registry)
        self._xla_base = xla_compiles()  # (registers the listener)
        self._xla_counted = 0
        self.on_scrape: list = []  # callables run before each render (gauges measured at scrape time)

    def set(self, name: str, value: float) -> None:
        self._gauges[name].set(value)

    def inc(self, name: str, value: float = 1) -> None:
        self._counters[name].inc(value)

    def observe(self, name: str, value: float) -> None:
        self._hist[name].observe(value)

    def batch(self, rows: int, slots: int, seconds: float, steps: int = 1, forwards: int = 0) -> None:
        """One decode call ran ``steps`` denoising steps (``forwards`` model forward passes) with
        ``rows`` of its ``slots`` occupied."""
        with self._lock:
            self._counters["decode_calls_total"].inc()
            self._counters["batch_steps_total"].inc(steps)
            self._counters["batch_forwards_total"].inc(forwards)
            self._counters["batch_rows_total"].inc(rows * steps)
            self._counters["batch_slots_total"].inc(slots * steps)
            self._hist["batch_size"].observe(rows)
            self._hist["block_step_seconds"].observe(seconds)

    def finished(self, reason: str, tokens: int) -> None:
        """One choice finished with ``tokens`` completion tokens."""
        self._finish.labels(model=self.model_name, finish_reason=reason).inc()
        self._counters["generation_tokens_total"].inc(tokens)

    def http_status(self, status: int) -> None:
        self._status.labels(model=self.model_name, status=str(status)).inc()

    def collect(self) -> Iterator[Metric]:
        """The registry's metrics without ``*_created`` samples (a collector for ``generate_latest``)."""
        for update in list(self.on_scrape):
            update()
        with self._lock:
            compiles = xla_compiles() - self._xla_base
            if compiles > self._xla_counted:
                self._counters["xla_compiles_total"].inc(compiles - self._xla_counted)
                self._xla_counted = compiles
            metrics = list(self.registry.collect())
        for metric in metrics:
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric

    def render(self) -> bytes:
        """The text exposition format (serve it as ``prometheus_client.CONTENT_TYPE_LATEST``)."""
        return generate_latest(self)
