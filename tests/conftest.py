"""Test-wide setup: 8 simulated CPU devices, float32 matmuls at full precision, offline hub; no
JAX persistent compilation cache unless asked for.

The suite used one persistent cache for the whole run (many files, server subprocesses and
notebook kernels build the same programs of the same tiny fixtures). Its write crashed the
process now and then on this JAX (0.10.2, XLA:CPU): a SIGSEGV or SIGABRT inside
``executable.serialize()`` (``compilation_cache.put_executable_and_time``), always for a compile on
a thread other than the main one (an in-process server's compile pool, a reference computed in a
pool thread) — four times in about seven full runs, each time in another test; a crashed xdist
worker then also hangs the run (docs/performance.md, "Test suite"). So the cache is off by
default; ``DLLM_TEST_COMPILE_CACHE=1`` turns it on again (a fresh directory, removed at exit), and
a ``JAX_COMPILATION_CACHE_DIR`` set by the caller is used as given.
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
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and os.environ.get("DLLM_TEST_COMPILE_CACHE") == "1":
    _cache = tempfile.mkdtemp(prefix="dllm-jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny models compile in well under 1 s
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import crash_rerun  # noqa: E402
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


def _collect_notebook_seconds(report):
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


# ---- a native crash of an xdist worker: the crashed tests run once more (tests/crash_rerun.py) ----

@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    crash_rerun.handlecrashitem(crashitem, sched)


def pytest_runtest_logreport(report):
    _collect_notebook_seconds(report)
    crash_rerun.logreport(report)


def pytest_sessionfinish(session, exitstatus):
    crash_rerun.sessionfinish(session)
