"""Where our server's CPU-seconds go: a profile of ``python -m serve`` on the peers workload (issue 23).

    python -m pip install py-spy                      # the profiler (not a project dependency); perf optional
    python -m benchmarks.profile_server               # tiny fixture, 1 and 8 clients, 32 prompts each
    python -m benchmarks.profile_server --models bench --prompts 8 --clients 1 8 --warm-rounds 3
    python -m benchmarks.profile_server -v            # also CPU per thread and unclassified stack leaves

The server runs as ``python -m serve`` in a child process of this script (the arguments
``benchmarks.peers`` gives it: float32, max batch 8, no warm-up buckets), with two recording
hooks on ``DecodeSession`` (``child``): every call of a session's step program records its
ProgramKey (batch bucket, prompt bucket, canvas) and the real prompt lengths of the rows still
decoding; calls of its merge program (admissions, releases) are counted. The requests are
``benchmarks.peers``'s (its chat prompts and request bodies: ``algorithm: basic``,
``ignore_eos``, no early stop, greedy; gen 64 / block 32 / 64 steps on the tiny fixture, gen 32
/ block 32 / 16 steps on the bench model; its closed-loop client, its warm-up). Each client
count first runs untimed until the server compiles no new program (at most ``--warm-rounds``
passes); then one pass is measured, with the CPU time of every thread of the server from
``/proc/PID/task/TID/stat`` before and after, under two samplers at ``--rate`` Hz:

- ``py-spy record --nonblocking --threads --format raw`` (every Python thread, idle samples
  left out; ``--native`` makes it pause the server per sample, which slowed a pass tenfold on
  this 2-core host): a Python thread's CPU-seconds are split over the categories in proportion
  to its samples, each sample put in a category by its stack (``classify``: compilation if any
  frame compiles or lowers; else the innermost frame that names a category: the jit call of a
  step or merge program (argument flattening, dispatch), ``fetch`` (device -> host),
  ``dllm_jax.sampling`` (session host work: ``step``, ``_update``, row layout), ``serve/engine``
  (scheduler), uvicorn/starlette/fastapi/h11/anyio/asyncio (HTTP/SSE, event loop),
  json/pydantic, tokenizers/transformers/jinja2/``serve/api/detok``, prometheus).
- ``perf record`` (when ``perf`` is on the PATH) for the threads py-spy never sees: XLA's
  native worker threads (the step programs run there; the scheduler thread waits in ``fetch``).
  Their CPU-seconds are split by the leaf symbol of each sample: kernels (XLA's JIT-compiled
  code, ynn dot kernels, libm) vs runtime (thunk executor, Eigen pool stealing, futex, page
  faults of fresh buffers).

``unaccounted``: the process's utime+stime from ``/proc/PID/stat`` (as ``benchmarks.peers``
measures it) minus the threads' (threads that exited during the pass). Padding: the share of
the step programs' work on positions that carry nothing - over the pass's step calls,
1 - (sum over decoding rows of real prompt + canvas tail) / (batch bucket x (prompt bucket +
canvas tail)) in token positions, and the same weighted by model FLOPs
(``benchmarks.common.forward_flops``: full-canvas forward, head on every position); it is a share
*of* the XLA row, not a row of its own. Sampling costs the server a little CPU; read the
shares, and compare the total with ``benchmarks.peers``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

from benchmarks.peers import SETTINGS, TICKS, Peer, body, chat_prompts, closed_loop, prepare_model, warm
from benchmarks.serve_load import REPO, free_port, scrape, wait_ready

# ---- the server child: python -m serve with recording hooks -----------------------------------

RECORDS: list = []


def child(records_path: str, serve_argv: list[str]) -> None:
    """``python -m serve SERVE_ARGV`` with hooks on DecodeSession; SIGUSR1 writes what they
    recorded to ``records_path`` (json: model spec, step calls, merge calls)."""
    from dllm_jax.sampling import session as session_mod

    counts = Counter()
    spec_box: dict = {}
    init, run, rebucket = (session_mod.DecodeSession.__init__, session_mod.DecodeSession._run,
                           session_mod.DecodeSession.rebucket)

    def hooked_init(self, model, key, *a, **kw):
        init(self, model, key, *a, **kw)
        if not spec_box:
            s = model.spec
            spec_box.update({f: int(getattr(s, f)) for f in ("d_model", "n_heads", "n_kv_heads", "head_dim",
                                                             "mlp_dim", "n_layers", "vocab")})
        self.merge = counted(self.merge)

    def counted(merge):
        def counted_merge(*args):
            counts["merge"] += 1
            return merge(*args)
        return counted_merge

    def recorded_run(self, steps, exit_on_done):  # (on the method: ``rebucket`` swaps the program)
        key = self.key
        live = [len(r.prompt) for slot, r in self.slots.items() if slot not in self._finished]
        RECORDS.append((key.batch, key.prompt_len, key.canvas_len - key.prompt_len, live, id(self)))
        return run(self, steps, exit_on_done)

    def hooked_rebucket(self, prompt_len):
        rebucket(self, prompt_len)
        self.merge = counted(self.merge)

    session_mod.DecodeSession.__init__ = hooked_init
    session_mod.DecodeSession._run = recorded_run
    session_mod.DecodeSession.rebucket = hooked_rebucket

    def dump(*_):
        tmp = records_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"spec": spec_box, "steps": RECORDS, "merges": counts["merge"]}, f)
        os.replace(tmp, records_path)

    signal.signal(signal.SIGUSR1, dump)
    from serve.__main__ import main as serve_main

    serve_main(serve_argv)


class Server(Peer):
    """Our server as a child of this script (``child``), with its step records on demand."""

    def __init__(self, model_dir: Path, max_batch: int, workdir: Path):
        self.records_path = workdir / "records.json"
        port = free_port()
        argv = ["--model", str(model_dir), "--dtype", "float32", "--max-batch-size", str(max_batch),
                "--warmup-buckets", "none", "--port", str(port), "--log-level", "warning"]
        code = "import sys; from benchmarks.profile_server import child; child(sys.argv[1], sys.argv[2:])"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.log = open(workdir / "server.log", "w")
        proc = subprocess.Popen([sys.executable, "-c", code, str(self.records_path), *argv], cwd=REPO, env=env,
                                stdout=self.log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, 900, "server", self.log.name)
        super().__init__("ours", proc, url)

    def records(self) -> dict:
        self.records_path.unlink(missing_ok=True)
        os.kill(self.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not self.records_path.exists():
            if time.monotonic() > deadline:
                raise SystemExit("the server did not write its step records")
            time.sleep(0.05)
        return json.loads(self.records_path.read_text())

    def threads(self) -> dict[int, tuple[str, float]]:
        """tid -> (thread name, utime+stime seconds) of every thread of the server process."""
        out = {}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
                name = (task / "comm").read_text().strip()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / TICKS)
        return out


# ---- classifying samples ------------------------------------------------------------------------

XLA = "XLA execution (native threads)"
NATIVE_KERNELS = "of which kernels (XLA JIT code, ynn dot, libm)"
NATIVE_RUNTIME = "of which runtime (thunk executor, Eigen pool, page faults, futex)"
PADDING = "of which padding (token positions / FLOPs)"

# (category, frame test) in the order a frame is tested; a sample's category is its innermost
# frame that passes one (after the compilation check, which wins anywhere in the stack)
COMPILE = re.compile(r"(^|[_.])(compile|lower|lowering|backend_compile|trace_to_jaxpr|_cached_lowering)"
                     r"|jit_trace|XlaBuilder|mlir::|llvm::|xla::cpu::CpuCompiler|HloPass|RunHloPasses")
XLA_EXEC = re.compile(r"xla::cpu::.*(Thunk|Execute|Kernel)|Eigen::|xla::TfrtCpu.*Execute|ExecuteHelper|"
                      r"__xla_cpu_runtime|dnnl|mkl|onednn|xnnpack|libxsmm|cpu_function_runtime")
CATEGORIES = [
    (XLA, lambda fn, path: bool(XLA_EXEC.search(fn))),
    ("fetch (device -> host)", lambda fn, path: path.endswith("dllm_jax/sampling/session.py") and fn == "fetch"),
    ("jit call (args, dispatch)", lambda fn, path: fn.rsplit(".", 1)[-1] in ("recorded_run", "counted_merge")
     or path.endswith("dllm_jax/sampling/session.py") and fn.endswith("._run")),
    ("tokenise / detokenise", lambda fn, path: any(m in path for m in (
        "/tokenizers/", "/transformers/", "/jinja2/", "serve/api/detok.py", "serve/api/chat_tokens.py",
        "serve/api/prompts.py")) or "tokenizers" in path),
    ("JSON / validation", lambda fn, path: any(m in path for m in ("/json/", "/pydantic/", "/pydantic_core/",
                                                                   "serve/api/protocol.py", "orjson"))),
    ("metrics", lambda fn, path: "/prometheus_client/" in path or path.endswith("serve/engine/metrics.py")),
    ("session host work (dllm_jax.sampling)", lambda fn, path: "dllm_jax/sampling/" in path),
    ("scheduler (serve/engine)", lambda fn, path: "serve/engine/" in path),
    ("API handlers (serve/api)", lambda fn, path: "serve/api/" in path),
    ("HTTP / SSE / event loop", lambda fn, path: any(m in path for m in (
        "/uvicorn/", "/starlette/", "/fastapi/", "/h11/", "/httptools/", "/anyio/", "/asyncio/", "selectors.py",
        "/sse_starlette/", "uvloop")) or "_asyncio" in path or "uvloop" in path),
]
ORDER = [XLA, NATIVE_KERNELS, NATIVE_RUNTIME, PADDING, "compilation",
         "jit call (args, dispatch)", "fetch (device -> host)", "session host work (dllm_jax.sampling)",
         "scheduler (serve/engine)", "HTTP / SSE / event loop", "API handlers (serve/api)", "JSON / validation",
         "tokenise / detokenise", "metrics", "other Python (jax internals, GC, threading, ...)",
         "unaccounted (exited threads)"]
OTHER = "other Python (jax internals, GC, threading, ...)"
# a native frame that waits (py-spy --native reports some waiting threads as active): not CPU
WAIT = re.compile(r"FutexWaiter|PerThreadSemWait|Mutex::Block|pthread_cond_(timed)?wait|PyThread_acquire_lock_timed|"
                  r"epoll_p?wait|sem_(timed|clock)?wait|uv__io_poll|WaitForNotification|take_gil")
FRAME = re.compile(r"^(?P<fn>.*?) \((?P<where>[^()]*)\)$")


def parse_frame(frame: str) -> tuple[str, str]:
    m = FRAME.match(frame)
    if not m:
        return frame, ""
    return m["fn"], m["where"].rsplit(":", 1)[0]


def classify(frames: list[str]) -> str:
    parsed = [parse_frame(f) for f in frames]
    for fn, path in parsed:
        if COMPILE.search(fn) and ("/jax/" in path or "jaxlib" in path or "xla" in path or ".so" in path
                                   or "dllm_jax/" in path or "serve/" in path):
            return "compilation"
    for fn, path in reversed(parsed):  # innermost first
        for name, test in CATEGORIES:
            if test(fn, path):
                return name
    return OTHER


def read_raw(path: Path) -> dict[int, tuple[str, Counter]]:
    """py-spy raw output -> tid -> (thread label, Counter category -> samples), plus leaves of OTHER."""
    out: dict[int, tuple[str, Counter]] = {}
    others = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        m = re.match(r"thread \((0x[0-9a-fA-F]+|\d+)\)(?:: (.*))?", frames[0])
        if not m:
            continue
        tid = int(m[1], 0)
        if any(WAIT.search(f) for f in frames[-8:]):
            cat = "(waiting)"
        else:
            cat = classify(frames[1:])
        label, counter = out.setdefault(tid, (m[2] or "", Counter()))
        counter[cat] += int(n)
        if cat == OTHER:
            others[frames[-1]] += int(n)
    out[-1] = ("other leaves", others)
    return out


# native threads (no Python frames): ``perf record`` samples, each put in a class by its leaf symbol
KERNELS = re.compile(r"^\[JIT\]|ynn::|xnn_|Eigen::internal::(gebp|gemm|general_matrix|TensorContraction)|"
                     r"__mem(move|cpy|set)|^(exp|log|tanh|erf)f?|dnnl|mkl|libxsmm|xla::cpu::.*Kernel")


def read_perf(path: Path) -> dict[int, Counter]:
    """``perf script`` of a ``perf record`` -> tid -> Counter(NATIVE_KERNELS | NATIVE_RUNTIME -> samples)."""
    text = subprocess.run(["perf", "script", "-i", str(path), "-F", "tid,ip,sym,dso"], capture_output=True,
                          text=True).stdout
    out: dict[int, Counter] = defaultdict(Counter)
    tid = None
    for line in text.splitlines():
        head = re.match(r"^\s*(\d+)\s*(.*)$", line) if not line.startswith("\t") else None
        rest = line
        if head:
            tid, rest = int(head[1]), head[2]
        m = re.match(r"^\s*[0-9a-f]+\s+(.*?)\s*\((.*)\)\s*$", rest)
        if tid is None or not m:
            continue
        sym, dso = m[1], m[2]
        kernel = (KERNELS.search(sym) or dso.startswith(("[JIT]", "/tmp/perf-")) or "libm.so" in dso
                  or (sym == "[unknown]" and dso == "[unknown]"))
        out[tid][NATIVE_KERNELS if kernel else NATIVE_RUNTIME] += 1
        tid = None  # the leaf only
    return out


# ---- one measured pass ---------------------------------------------------------------------------

def padding(records: list, spec: dict) -> tuple[float, float]:
    """(token-position share, FLOP share) of the step programs' work on positions that carry nothing."""
    from benchmarks.common import forward_flops

    s = SimpleNamespace(**spec)
    pos_all = pos_real = fl_all = fl_real = 0.0
    for batch, prompt_bucket, tail, live, _ in records:
        canvas = prompt_bucket + tail
        pos_all += batch * canvas
        pos_real += sum(p + tail for p in live)
        fl_all += forward_flops(s, batch=batch, q_tokens=canvas, kv_len=canvas, head_positions=canvas)
        fl_real += sum(forward_flops(s, batch=1, q_tokens=p + tail, kv_len=p + tail, head_positions=p + tail)
                       for p in live)
    return 1 - pos_real / max(pos_all, 1), 1 - fl_real / max(fl_all, 1)


def by_session(records: list) -> list[tuple[int, int, float]]:
    """Per session of the pass, in order of its first call: (batch slots, step calls, mean rows decoding)."""
    batch, calls, rows = {}, Counter(), Counter()  # (a session keeps its batch size: rebucket moves the prompt bucket)
    for b, _, _, live, sid in records:
        batch.setdefault(sid, b)
        calls[sid] += 1
        rows[sid] += len(live)
    return [(batch[sid], calls[sid], rows[sid] / calls[sid]) for sid in batch]


def profile_pass(server: Server, bodies: list[dict], clients: int, rate: int, workdir: Path,
                 native: bool = False) -> dict:
    raw = workdir / f"pyspy-{clients}.raw"
    rec0 = server.records()
    compiles0 = scrape(server.url, {}).get("dllm_compiles_total", 0)
    spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record",
                            "-p", str(server.proc.pid), "--threads", "--full-filenames", "--format", "raw",
                            "-r", str(rate), "-o", str(raw), *(["--native"] if native else ["--nonblocking"])],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    perf_data = workdir / f"perf-{clients}.data"
    perf = subprocess.Popen(["perf", "record", "-q", "-F", str(rate), "-p", str(server.proc.pid), "-o", str(perf_data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if shutil.which("perf") else None
    time.sleep(1.5)  # py-spy and perf attached
    th0, cpu0 = server.threads(), server.cpu_seconds()
    wall, _, _ = asyncio.run(closed_loop(server.url, bodies, clients))
    th1, cpu1 = server.threads(), server.cpu_seconds()
    spy.send_signal(signal.SIGINT)
    err = spy.communicate(timeout=120)[1].decode()
    native_samples: dict[int, Counter] = {}
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        perf.wait(120)
        native_samples = read_perf(perf_data)
    rec1 = server.records()
    compiles = scrape(server.url, {}).get("dllm_compiles_total", 0) - compiles0
    samples = read_raw(raw)
    n = len(bodies)
    cats: dict[str, float] = defaultdict(float)
    threads_seen = set(samples)
    per_thread = []
    for tid, (name, c1) in th1.items():
        d = c1 - th0.get(tid, (name, 0.0))[1]
        if tid in threads_seen and sum(samples[tid][1].values()):
            label, counter = samples[tid]
            counter = Counter({k: v for k, v in counter.items() if k != "(waiting)"})
            total = sum(counter.values()) or 1
            for cat, k in counter.items():
                cats[cat] += d * k / total
            per_thread.append((f"{label or name} (Python)", d, total))
        elif d > 0:  # a native thread: XLA's (the server runs no other native code during a pass)
            counter = native_samples.get(tid) or Counter({NATIVE_RUNTIME if native_samples else XLA: 1})
            total = sum(counter.values())
            for cat, k in counter.items():
                cats[cat] += d * k / total
            per_thread.append((f"{name} (native; perf {dict(counter)})", d, 0))
    cats["unaccounted (exited threads)"] = (cpu1 - cpu0) - sum(cats.values())
    cats[XLA] = cats.get(XLA, 0.0) + cats.get(NATIVE_KERNELS, 0.0) + cats.get(NATIVE_RUNTIME, 0.0)
    steps = rec1["steps"][len(rec0["steps"]):]
    merges = rec1["merges"] - rec0["merges"]
    pad_pos, pad_flops = padding(steps, rec1["spec"])
    return {"clients": clients, "n": n, "wall": wall, "cpu": cpu1 - cpu0, "cats": dict(cats),
            "pad": (pad_pos, pad_flops), "step_calls": len(steps), "merge_calls": merges, "compiles": compiles,
            "rows": sum(len(r[3]) for r in steps) / max(len(steps), 1), "threads": per_thread,
            "sessions": by_session(steps),
            "other_leaves": samples[-1][1].most_common(8), "pyspy": err.strip().splitlines()[-2:]}


# ---- the run -----------------------------------------------------------------------------------------

def run_model(name: str, args) -> list[dict]:
    model_dir = prepare_model(name, args.models_root)
    gen, block, steps = SETTINGS[name]
    workdir = args.workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    server = Server(model_dir, args.max_batch_size, workdir)
    out = []
    try:
        bodies = [body(server, p, "basic", gen, block, steps) for p in chat_prompts(args.prompts)]
        cpu0 = server.cpu_seconds()
        c0 = scrape(server.url, {}).get("dllm_compiles_total", 0)
        warm(server, bodies, args.clients, rounds=args.warm_rounds)
        warm_cpu, warm_compiles = server.cpu_seconds() - cpu0, scrape(server.url, {}).get("dllm_compiles_total", 0) - c0
        print(f"{name}: started and warmed in {time.monotonic() - t0:.0f} s ({warm_compiles:.0f} programs compiled, "
              f"{warm_cpu:.1f} CPU-s in the warm-up passes)", flush=True)
        for c in args.clients:
            r = profile_pass(server, bodies, c, args.rate, workdir, args.native)
            r.update(model=name, settings=f"gen {gen} / block {block} / {steps} steps", warm_compiles=warm_compiles,
                     warm_cpu=warm_cpu)
            print(f"  {name} {c} clients: {r['n'] / r['wall']:.2f} req/s, {r['cpu'] / r['n']:.3f} CPU-s/req, "
                  f"{r['step_calls']} step calls, {r['compiles']:.0f} compiles; py-spy: {' '.join(r['pyspy'])}",
                  flush=True)
            print("    step calls by session (batch, calls, mean rows decoding): "
                  + ", ".join(f"{b} x {n} calls x {rows:.2f}" for b, n, rows in r["sessions"]), flush=True)
            if args.verbose:
                for label, d, k in sorted(r["threads"], key=lambda t: -t[1]):
                    print(f"    thread {label}: {d:.2f} CPU-s, {k} samples")
                for leaf, k in r["other_leaves"]:
                    print(f"    other leaf {k:5d} {leaf}")
            out.append(r)
    finally:
        server.close()
    return out


def table(results: list[dict]) -> None:
    cols = [f"{r['model']}, {r['clients']} client{'s' if r['clients'] > 1 else ''}" for r in results]
    print("\n| CPU-s per request (share) | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for cat in ORDER:
        cells = []
        for r in results:
            n, total = r["n"], r["cpu"]
            if cat == PADDING:
                pos, fl = r["pad"]
                x = r["cats"].get(XLA, 0.0)
                cells.append(f"{pos:.0%} / {fl:.0%} of it ({x * fl / n:.3f} by FLOPs)")
                continue
            v = r["cats"].get(cat, 0.0)
            cells.append(f"{v / n:.4f} ({v / total:.1%})")
        print(f"| {cat} | " + " | ".join(cells) + " |")
    extra = [
        ("**total (/proc/PID/stat)**", lambda r: f"**{r['cpu'] / r['n']:.3f}**"),
        ("req/s (under the profiler)", lambda r: f"{r['n'] / r['wall']:.2f}"),
        ("step-program calls per request", lambda r: f"{r['step_calls'] / r['n']:.1f}"),
        ("merge-program calls per request", lambda r: f"{r['merge_calls'] / r['n']:.1f}"),
        ("rows decoding per step call", lambda r: f"{r['rows']:.2f}"),
        ("host CPU-s per step call (total - XLA execution)",
         lambda r: f"{(r['cpu'] - r['cats'].get(XLA, 0)) / max(r['step_calls'], 1) * 1e3:.2f} ms"),
        ("of which session + scheduler + jit call + fetch", lambda r: "%.2f ms" % (sum(
            r["cats"].get(k, 0.0) for k in ("session host work (dllm_jax.sampling)", "scheduler (serve/engine)",
                                            "jit call (args, dispatch)", "fetch (device -> host)"))
            / max(r["step_calls"], 1) * 1e3)),
        ("programs compiled in the pass / in the warm-up", lambda r: f"{r['compiles']:.0f} / {r['warm_compiles']:.0f}"),
    ]
    for label, f in extra:
        print(f"| {label} | " + " | ".join(f(r) for r in results) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(SETTINGS), default=["tiny"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompts", type=int, default=32, help="requests per measured pass (peers' prompt set)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--native", action="store_true", help="py-spy --native (blocking: pauses the server per "
                   "sample; on this 2-core host it slowed a pass tenfold) instead of --nonblocking")
    p.add_argument("--warm-rounds", type=int, default=6, help="untimed passes per client count at most "
                   "(until one compiles nothing)")
    p.add_argument("--models-root", type=Path, default=REPO / ".peers-venv" / "models",
                   help="where benchmarks.peers prepares its model dirs (shared)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/profile_server"))
    p.add_argument("-v", "--verbose", action="store_true", help="CPU per thread and the unclassified leaves")
    args = p.parse_args(argv)
    if not (shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy").exists()):
        raise SystemExit("needs py-spy: python -m pip install py-spy")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load0 = os.getloadavg()
    results = []
    for name in args.models:
        results += run_model(name, args)
    load1 = os.getloadavg()
    import jax

    print(f"\nsettings: benchmarks.peers' chat prompts ({args.prompts} per pass, one pass per client count after "
          f"warm-up), algorithm basic, ignore_eos, early_stop false, greedy, float32, max batch "
          f"{args.max_batch_size}; {'; '.join(f'{m}: gen/block/steps {SETTINGS[m]}' for m in args.models)}; "
          f"py-spy {args.rate} Hz {'--native' if args.native else '--nonblocking'}; jax {jax.__version__}; {os.cpu_count()} CPUs; load average "
          f"{load0[0]:.2f} at the start, {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} at the end")
    table(results)


if __name__ == "__main__":
    main()
