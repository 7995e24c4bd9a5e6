"""Shared benchmark helpers: timing medians, FLOP counts, matmul peak, table printing.

Only numpy and jax here (the GPU script must run with what a CUDA JAX install has).
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Sequence


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Median wall time of ``repeats`` calls (the caller warms up first)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def forward_flops(spec, *, batch: int, q_tokens: int, kv_len: int, head_positions: int) -> float:
    """Model FLOPs of one forward: matmuls of the blocks for ``q_tokens`` queries per row,
    attention scores/values against ``kv_len`` keys, and the output head at ``head_positions``
    positions per row (multiply-add = 2 FLOPs)."""
    d, n, k, h, f = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.mlp_dim
    per_token_layer = 2 * (d * n * h * 2 + d * k * h * 2 + 3 * d * f)
    attention = 2 * 2 * n * h * q_tokens * kv_len
    blocks = spec.n_layers * (per_token_layer * q_tokens + attention)
    head = 2 * d * spec.vocab * head_positions
    return float(batch * (blocks + head))


def matmul_peak(dtype_name: str = "float32", n: int = 2048, repeats: int = 20) -> float:
    """Attainable FLOP/s of one large square matmul on the default JAX device (best of ``repeats``)."""
    import jax
    import jax.numpy as jnp

    dtype = getattr(jnp, dtype_name)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: (a @ b).sum())
    f(a, b).block_until_ready()
    _, times = median_time(lambda: f(a, b).block_until_ready(), repeats)
    return 2.0 * n ** 3 / min(times)  # attainable: the best run


def device_description() -> str:
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        import os

        return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), jax {jax.__version__}"
    return f"{dev.device_kind} x{jax.device_count()}, jax {jax.__version__}"


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> str:
    """Markdown table (printed and returned)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = []
    if title:
        lines.append(f"\n{title}\n")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text
