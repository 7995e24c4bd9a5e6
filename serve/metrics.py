"""Prometheus metrics in the text exposition format, written by hand (no extra dependency).

Updated from the scheduler thread and the event loop, so every change takes one lock.
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float):
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """All server metrics (names prefixed ``dllm_``)."""

    def __init__(self, model_name: str = ""):
        self.model_name = model_name
        self._lock = threading.Lock()
        self.gauges = {"queue_depth": 0, "running_rows": 0, "sessions": 0, "engine_ready": 0}
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "nfe_total": 0,
                         "batch_steps_total": 0, "batch_rows_total": 0, "batch_slots_total": 0,
                         "requests_cancelled_total": 0, "compiles_total": 0}
        self.finish: dict[str, int] = {}
        self.status: dict[str, int] = {}
        self.hist = {"batch_size": Histogram(BATCH_BUCKETS),
                     "queue_time_seconds": Histogram(LATENCY_BUCKETS),
                     "request_latency_seconds": Histogram(LATENCY_BUCKETS),
                     "time_to_first_chunk_seconds": Histogram(LATENCY_BUCKETS),
                     "block_step_seconds": Histogram(LATENCY_BUCKETS)}

    HELP = {
        "queue_depth": ("gauge", "Sequences waiting for a batch slot."),
        "running_rows": ("gauge", "Sequences in running batches (the running batch size)."),
        "sessions": ("gauge", "Open decode sessions (compiled batches in flight)."),
        "engine_ready": ("gauge", "1 when the engine serves requests."),
        "prompt_tokens_total": ("counter", "Prompt tokens of admitted requests (no padding)."),
        "generation_tokens_total": ("counter", "Completion tokens returned."),
        "nfe_total": ("counter", "Model forward passes summed over finished sequences."),
        "batch_steps_total": ("counter", "Block programs run."),
        "batch_rows_total": ("counter", "Occupied slots summed over block programs."),
        "batch_slots_total": ("counter", "Compiled slots summed over block programs (fill = rows / slots)."),
        "requests_cancelled_total": ("counter", "Sequences dropped because the client went away."),
        "compiles_total": ("counter", "Block programs compiled (warm-up and background)."),
        "batch_size": ("histogram", "Occupied slots per block program."),
        "queue_time_seconds": ("histogram", "Time from arrival to admission into a batch."),
        "request_latency_seconds": ("histogram", "Time from arrival to the last token of a request."),
        "time_to_first_chunk_seconds": ("histogram", "Time from arrival to the first streamed text."),
        "block_step_seconds": ("histogram", "Wall time of one block program (device + host round trip)."),
    }

    def set(self, name: str, value):
        with self._lock:
            self.gauges[name] = value

    def inc(self, name: str, value=1):
        with self._lock:
            self.counters[name] += value

    def observe(self, name: str, value: float):
        with self._lock:
            self.hist[name].observe(value)

    def batch(self, rows: int, slots: int, seconds: float):
        with self._lock:
            self.counters["batch_steps_total"] += 1
            self.counters["batch_rows_total"] += rows
            self.counters["batch_slots_total"] += slots
            self.hist["batch_size"].observe(rows)
            self.hist["block_step_seconds"].observe(seconds)

    def finished(self, reason: str, tokens: int):
        """One choice finished with ``tokens`` completion tokens."""
        with self._lock:
            self.finish[reason] = self.finish.get(reason, 0) + 1
            self.counters["generation_tokens_total"] += tokens

    def http_status(self, status: int):
        with self._lock:
            key = str(status)
            self.status[key] = self.status.get(key, 0) + 1

    def render(self) -> str:
        with self._lock:
            lines: list[str] = []
            for name, value in {**self.gauges, **self.counters}.items():
                kind, doc = self.HELP[name]
                lines += [f"# HELP dllm_{name} {doc}", f"# TYPE dllm_{name} {kind}", f"dllm_{name} {value}"]
            lines += ["# HELP dllm_requests_total Finished sequences by finish reason.",
                      "# TYPE dllm_requests_total counter"]
            for reason in sorted(set(self.finish) | {"stop", "length"}):
                lines.append(f'dllm_requests_total{{finish_reason="{reason}"}} {self.finish.get(reason, 0)}')
            lines += ["# HELP dllm_http_requests_total HTTP responses by status code.",
                      "# TYPE dllm_http_requests_total counter"]
            for status in sorted(self.status):
                lines.append(f'dllm_http_requests_total{{status="{status}"}} {self.status[status]}')
            for name, h in self.hist.items():
                kind, doc = self.HELP[name]
                lines += [f"# HELP dllm_{name} {doc}", f"# TYPE dllm_{name} histogram"]
                cumulative = 0
                for bound, count in zip(self.buckets_of(h), h.counts):
                    cumulative += count
                    lines.append(f'dllm_{name}_bucket{{le="{bound}"}} {cumulative}')
                lines += [f"dllm_{name}_sum {h.sum}", f"dllm_{name}_count {h.count}"]
            return "\n".join(lines) + "\n"

    @staticmethod
    def buckets_of(h: Histogram):
        return [_fmt(b) for b in h.buckets] + ["+Inf"]


def _fmt(x) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def parse(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value; for tests and the load benchmark."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
