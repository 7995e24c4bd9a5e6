"""Test-wide setup: 8 simulated CPU devices, float32 matmuls at full precision, offline hub,
and one JAX persistent compilation cache for the whole run.

Compilation is most of the suite's time, and many files, server subprocesses and notebook kernels
build the same programs of the same tiny fixtures. The cache directory is made by the first
process that imports this file (the controller under pytest-xdist; workers, servers and kernels
inherit the variables) and removed when that process ends, so every run starts cold: the suite's
time is a fresh machine's. A cached executable is the compiled one, so results are bitwise those
of a compile. Set ``JAX_COMPILATION_CACHE_DIR`` yourself to keep a cache between runs.
"""

import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="dllm-jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny models compile in well under 1 s
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import LLADA_DIR, NEMOTRON_DIR  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def llada_model():
    import dllm_jax

    return dllm_jax.load(LLADA_DIR / "model")


@pytest.fixture(scope="session")
def nemotron_model():
    import dllm_jax

    return dllm_jax.load(NEMOTRON_DIR / "model")


_NOTEBOOK_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Collect ``notebook_seconds`` (tests/test_notebooks.py); reports reach the controlling
    process under pytest-xdist too, with their user properties."""
    for name, value in getattr(report, "user_properties", ()):
        if name == "notebook_seconds" and report.when == "call":
            _NOTEBOOK_SECONDS[report.nodeid.rsplit("[", 1)[-1].rstrip("]")] = value


def pytest_terminal_summary(terminalreporter):
    if _NOTEBOOK_SECONDS:
        terminalreporter.write_sep("-", "notebook execution times")
        for name, secs in sorted(_NOTEBOOK_SECONDS.items()):
            terminalreporter.write_line(f"{name}: {secs:.1f} s")
