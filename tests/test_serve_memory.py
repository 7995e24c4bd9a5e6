"""Bounded memory: the compiled-program cache is an LRU of at most ``--max-programs`` entries.

Unit tests of ``Programs`` (LRU order, in-use entries dropped last, scoring keys counted,
a dropped entry's executable really freed, the compiler forgetting evicted keys), and a
server with ``--max-programs 2`` serving requests of four program keys: evictions are
counted, outputs equal ``Model.generate``, no 5xx, never more than 2 programs cached.
"""

from __future__ import annotations

import concurrent.futures
import gc
import threading
import time
import types
import weakref

import httpx
import pytest

from dllm_jax.sampling.programs import Programs
from serve.engine.compiler import Compiler
from serve_helpers import LLADA_MODEL, Server, read_metrics, reference


class User:  # stands in for a DecodeSession (anything weak-referenceable)
    pass


def test_programs_lru_evicts_least_recently_used_unused_first_and_counts_scoring_keys(monkeypatch):
    programs = Programs(types.SimpleNamespace(), max_programs=2)
    monkeypatch.setattr(programs, "_build", lambda key: ("program", key))
    dropped = []
    programs.on_evict.append(dropped.append)
    programs.get("a")
    programs.get("b")
    programs.get("a")                    # a is now the most recent
    programs.get("c")                    # drops b
    assert programs.keys() == ["a", "c"] and dropped == ["b"]
    programs.get_or_build(("score", 64), lambda: "scorer")   # a scoring program counts too: drops a
    assert programs.keys() == ["c", ("score", 64)] and dropped == ["b", "a"]
    assert programs.get_or_build(("score", 64), lambda: 1 / 0) == "scorer"  # cached: not rebuilt
    user = User()
    programs.get("d", user=user)         # c and the scorer are unused; the oldest (c) goes
    programs.get_or_build(("score", 64), lambda: 1 / 0)      # the scorer is now newer than d
    programs.get("e")                    # d is in use: the scorer goes although d is older
    assert programs.keys() == ["d", "e"] and dropped[2:] == ["c", ("score", 64)]
    del user                             # the session is gone: d is an ordinary LRU entry again
    programs.get("f")
    assert programs.keys() == ["e", "f"]
    busy = [User(), User()]
    programs.get("e", user=busy[0])
    programs.get("f", user=busy[1])
    programs.get("g")                    # all in use: the cap still holds (the session keeps its own ref)
    assert len(programs) == 2 and "g" in programs
    assert (programs.builds, programs.evictions) == (8, 6) and len(dropped) == 6
    programs.set_limit(1)
    assert len(programs) == 1 and programs.evictions == 7
    programs.set_limit(None)             # unbounded
    for k in "hijk":
        programs.get(k)
    assert len(programs) == 5


def test_an_evicted_program_and_its_executable_are_freed():
    import jax
    import numpy as np
    from jax._src.interpreters import pxla

    programs = Programs(types.SimpleNamespace(), max_programs=1)
    gc.collect()  # the cache is process-wide: collect earlier tests' garbage before the baseline
    before = pxla._cached_compilation.cache_info().currsize

    def build():
        return jax.jit(lambda x: x * 2 + 1)

    fn = programs.get_or_build(("score", 1), build)
    assert int(fn(np.int32(3))) == 7
    ref = weakref.ref(fn)
    assert pxla._cached_compilation.cache_info().currsize == before + 1
    del fn
    programs.get_or_build(("score", 2), build)   # evicts ("score", 1)
    gc.collect()
    assert ref() is None, "something still holds the evicted jitted function"
    assert pxla._cached_compilation.cache_info().currsize == before, "the evicted executable is still cached"


def test_compiler_forgets_evicted_keys_and_stale_failures(monkeypatch):
    import serve.engine.compiler as compiler_mod

    compiler = Compiler(lambda key: None, background=False, on_done=lambda: None)
    compiler.add("k")
    compiler.evicted("k")
    compiler.evicted("never-compiled")
    assert compiler.compiled == set()
    compiler._failed["old"] = (RuntimeError("x"), 0.0)
    monkeypatch.setattr(compiler_mod.time, "monotonic", lambda: compiler_mod.FAILURE_TTL_S + 1.0)
    assert compiler.take_failure("other") is None and compiler._failed == {}


def test_a_repeated_workload_that_fits_the_cache_builds_nothing_after_its_first_round(monkeypatch):
    programs = Programs(types.SimpleNamespace(), max_programs=4)
    monkeypatch.setattr(programs, "_build", lambda key: ("program", key))
    work = ["a", "b", "a", "c", "d", "b", "d"] * 3
    for key in work:
        programs.get(key)
    assert (programs.builds, programs.evictions) == (4, 0)
    for _ in range(3):                  # the same rounds again: nothing built, nothing dropped
        for key in work:
            programs.get(key)
    assert (programs.builds, programs.evictions) == (4, 0)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_trim_heap_gives_freed_heap_pages_back(monkeypatch):
    """Freed malloc chunks below a live one stay in RSS until ``malloc_trim`` (what an XLA compile
    leaves behind, here made with libc's malloc directly)."""
    import ctypes

    import serve.engine.compiler as compiler_mod

    if compiler_mod._trim is None:   # not glibc: nothing to trim, never an error
        assert not compiler_mod.trim_heap(force=True)
        return
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    compiler_mod.trim_heap(force=True)
    chunks = [libc.malloc(4000) for _ in range(20_000)]      # 80 MB in small chunks (the main heap)
    for c in chunks:
        ctypes.memset(c, 1, 4000)
    keep = libc.malloc(4000)                                  # a live chunk above them: no automatic trim
    for c in chunks:
        libc.free(c)
    before = _rss_kib()
    assert compiler_mod.trim_heap(force=True)
    freed_mb = (before - _rss_kib()) / 1024
    libc.free(keep)
    assert freed_mb > 40, f"malloc_trim gave back only {freed_mb:.0f} MB of 80"
    monkeypatch.setattr(compiler_mod.time, "monotonic", lambda: 1e9)
    assert compiler_mod.trim_heap() and not compiler_mod.trim_heap()   # at most once per TRIM_INTERVAL_S


def test_compiler_trims_the_heap_after_each_compile_and_eviction(monkeypatch):
    import serve.engine.compiler as compiler_mod

    trims = []
    monkeypatch.setattr(compiler_mod, "trim_heap", lambda force=False: trims.append(force))
    done = threading.Event()
    compiler = Compiler(lambda key: None, background=True, on_done=done.set)
    try:
        assert not compiler.ready("k")
        assert done.wait(30)
        deadline = time.monotonic() + 30
        while not trims and time.monotonic() < deadline:   # (trimmed after on_done)
            time.sleep(0.01)
        assert trims == [False] and compiler.ready("k")
        compiler.evicted("k")
        assert trims == [False, False]
    finally:
        compiler.shutdown()


# ---- a server with --max-programs 2 and four program keys -----------------------------------

PROMPT = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
KEYS = [(8, 8), (16, 8), (16, 16), (24, 8)]  # (max_tokens, block_length): four canvases/blocks


@pytest.mark.slow
def test_server_with_two_programs_evicts_and_stays_correct(llada_model):
    # The references first, in this thread: computing them in a pool thread while the server starts (as
    # this test once did) crashed a CI worker twice inside JAX's persistent-cache write of a program
    # compiled in that thread (a segfault in executable.serialize); never reproduced here.
    expected = {k: reference(llada_model, [PROMPT], [k[0]], block_length=k[1])[0] for k in KEYS}
    server = Server("--model", str(LLADA_MODEL), "--mesh", "1", "--max-programs", "2",
                    "--max-batch-size", "2", "--batch-buckets", "2", "--prompt-buckets", "64",
                    "--max-wait-ms", "0", "--warmup-buckets", "none")
    try:
        peak, stop = [0.0], threading.Event()

        def watch():
            with httpx.Client(base_url=server.url, timeout=30) as c:
                while not stop.is_set():
                    m = read_metrics(c.get("/metrics").text)
                    peak[0] = max(peak[0], m["dllm_programs_cached"])
                    stop.wait(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with httpx.Client(base_url=server.url, timeout=300) as http:
            errors_before = server_errors(read_metrics(http.get("/metrics").text))  # (503s while loading)

            def ask(key):
                body = {"model": "model", "prompt": PROMPT, "max_tokens": key[0], "block_length": key[1],
                        "temperature": 0}
                r = http.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return key, r.json()["choices"][0]["text"]

            answers = [ask(k) for k in KEYS]                        # each new key evicts the oldest
            with concurrent.futures.ThreadPoolExecutor(2) as clients:  # evicted keys again, at once
                answers += list(clients.map(ask, [KEYS[0], KEYS[1]]))
            metrics = read_metrics(http.get("/metrics").text)
        stop.set()
        watcher.join(10)
    finally:
        server.stop()
    for key, text in answers:
        assert text == expected[key], key
    assert metrics["dllm_programs_evicted_total"] >= 4
    assert metrics["dllm_programs_built_total"] >= 6
    assert metrics["dllm_programs_evicted_total"] == metrics["dllm_programs_built_total"] - metrics["dllm_programs_cached"]
    assert metrics["dllm_programs_cached"] <= 2 and peak[0] <= 2
    assert server_errors(metrics) == errors_before, metrics


def server_errors(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith('dllm_http_requests_total{status="5'))
