"""A test whose xdist worker died of a native crash runs once more, alone, in a fresh process.

XLA:CPU's compiler (jaxlib 0.10.2) now and then kills a worker with SIGSEGV / SIGABRT, always in a
compile on a thread other than the main one (an in-process engine's step thread, a pool thread):
about one full run in two hit it (docs/performance.md, "Test suite"). xdist then reports the test
that was running as failed ("worker crashed while running") and, under ``--dist loadfile``, may
also stop handing out work: the controller and both workers wait on each other for good
(pytest-dev/pytest-xdist#784; seen here twice). pytest-rerunfailures' crash recovery needs
``mark_test_pending``, which loadfile scheduling lacks.

So, on the controller, after a worker crash:

* the run ends normally: when every failure of the run is such a crash report, the crashed tests
  run again, together, in one fresh ``python -m pytest`` process, and the run's exit status is
  that process's;
* the run stalls (no test report for ``STALL_S`` seconds): the tests that never reported, and the
  crashed ones, run in one fresh process; the run exits with its status (non-zero anyway when
  another test failed).

A test that crashes every time, or fails, fails in the fresh process too. Both the crash and the
rerun's result are printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

STALL_S = float(os.environ.get("DLLM_TEST_CRASH_STALL_S", 600))  # (the longest test takes ~2 min)

_crashed: list[str] = []        # nodeids whose worker died while running them
_other_failures: set[str] = set()  # nodeids with a failed report that is not a crash report
_reported: set[str] = set()     # nodeids with a final report
_state = {"last": time.monotonic(), "sched": None, "watchdog": None, "stalled": False}
_lock = threading.Lock()


def handlecrashitem(crashitem: str, sched) -> None:
    with _lock:
        if crashitem not in _crashed:  # (a test that crashes each time may be sent to a new worker again)
            _crashed.append(crashitem)
        _state["sched"] = sched
        if _state["watchdog"] is None:
            _state["watchdog"] = threading.Thread(target=_watch, name="crash-rerun-watchdog", daemon=True)
            _state["watchdog"].start()


def logreport(report) -> None:
    with _lock:
        _state["last"] = time.monotonic()
        crash = report.when == "???"  # xdist's report for a crashed worker's test
        if report.failed and not crash:
            _other_failures.add(report.nodeid)
        if report.when == "call" or (report.when == "setup" and not report.passed):
            _reported.add(report.nodeid)


def _rerun(nodeids: list[str], cwd) -> int:
    print(f"\n[crash rerun] a worker crashed (native) while running {', '.join(_crashed)}; running "
          f"{len(nodeids)} test(s) again in a fresh process", file=sys.__stderr__, flush=True)
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodeids],
                        cwd=cwd).returncode
    print(f"[crash rerun] {'passed' if rc == 0 else f'FAILED (exit status {rc})'}", file=sys.__stderr__, flush=True)
    return rc


def _watch() -> None:
    while True:
        time.sleep(min(15.0, STALL_S / 4))
        with _lock:
            stalled = _state["stalled"] = time.monotonic() - _state["last"] > STALL_S
            sched = _state["sched"]
        if not stalled:
            continue
        collection = list(getattr(sched, "collection", None) or [])
        left = [n for n in collection if n not in _reported]
        left += [n for n in _crashed if n not in left and n not in _other_failures]
        print(f"\n[crash rerun] no test report for {STALL_S:.0f} s after a worker crash: the run is stuck "
              f"(pytest-xdist#784)", file=sys.__stderr__, flush=True)
        rc = _rerun(left, sched.config.rootpath) if left else 0
        os._exit(rc or (1 if _other_failures else 0))


def sessionfinish(session) -> None:
    if _state["stalled"]:  # the watchdog is rerunning what is left and ends the process
        _state["watchdog"].join()
    if not _crashed or _other_failures or hasattr(session.config, "workerinput"):
        return
    session.exitstatus = _rerun(list(_crashed), session.config.rootpath)
