"""Side by side with a peer server on this machine: ``python -m serve`` vs dlmserve 0.1.1.

    python -m benchmarks.peers --quick          # smoke run: tiny fixture, 1 pass, 1 and 8 clients (~5-10 min)
    python -m benchmarks.peers                  # tiny fixture and bench model, 6 passes
    python -m benchmarks.peers --models bench --passes 3 --clients 8
    python -m benchmarks.peers --baseline HEAD~3  # also an older revision of ours, same passes

dlmserve (PyPI; FastAPI, step-level batching over HF remote-code LLaDA) is installed into its
own virtualenv (``--venv``, default ``.peers-venv/`` in the repo root, gitignored; torch pinned
to the CPU build on this machine's disk), idempotently. Its model dirs are prepared under
``VENV/models/``: the checkpoint's safetensors, config.json (with an ``auto_map``) and
tokenizer, plus remote code written by this project: ``torch_llada_model.py`` (our own eager
PyTorch LLaDA, copied from this folder), ``modeling_llada.py`` (an HF ``PreTrainedModel``
around it that also takes dlmserve's ``position_ids``, so left-padded rows get their own RoPE
positions) and ``configuration_llada.py``. Both servers serve that same dir. dlmserve runs
through ``benchmarks/peers_dlmserve.py``, which patches it in memory (mask id from
config.json instead of LLaDA-8B's, float32) - see there.

Workload: 32 chat prompts (demo tasks, half with a context of 1-60 numbers in front, so prompt
lengths differ and batches pad), greedy, the LLaDA reference algorithm on both sides (ours
``algorithm: basic``: low-confidence remasking on the fixed schedule, full canvas:
``ignore_eos``, no early stop; dlmserve's only algorithm), gen 64 / block 32 / 64 steps on the
tiny fixture and gen 32 / block 32 / 16 steps on the bench model, float32, max batch 8 on both
(dlmserve's default), dlmserve on ``--dlmserve-threads`` torch threads (1), ours as it comes
(XLA's CPU threads). Also our default decoder (dual cache + threshold 0.9, early stop) at the
largest client count.

Both servers are started and warmed once per model (ours until no program compiles); while one
is measured the other is stopped (SIGSTOP: its idle loop costs nothing). Each pass measures both,
order alternating, at each client count (closed loop: every client sends its next request when
the previous answer arrived, from one shared list of the 32 prompts). Per server and setting:
req/s, latency p50/p90, server CPU-seconds per request (utime+stime of the server's process
tree from /proc/PID/stat, before/after the pass), rows per denoising step (ours:
``dllm_batch_rows_total / dllm_batch_steps_total``; dlmserve: its ``dlmserve_step_batch_size``
histogram's sum / count), medians over the passes; and identical texts (ours vs dlmserve, same
prompt, same pass; summed over passes). Timings on a shared host move a lot: read the load
printed with the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.serve_load import REPO, free_port, launch, pct, scrape, wait_ready

HERE = Path(__file__).resolve().parent
DLMSERVE = "dlmserve==0.1.1"
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk; pip would take a CUDA one otherwise
TICKS = os.sysconf("SC_CLK_TCK")

# model name -> (gen_length, block_length, steps)
SETTINGS = {"tiny": (64, 32, 64), "bench": (32, 32, 16)}

# ---- remote code written beside the checkpoint ------------------------------------------------

CONFIGURATION_LLADA = '''"""LLaDA config for HF remote code (written by dllm-jax benchmarks/peers.py)."""
from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
'''

MODELING_LLADA = '''"""HF remote-code LLaDA (written by dllm-jax benchmarks/peers.py): our eager PyTorch LLaDA
(torch_llada_model.py, beside this file) as a PreTrainedModel. ``forward(input_ids,
attention_mask, position_ids)``: pad keys masked out, RoPE at each row's ``position_ids``."""
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_llada import LLaDAConfig
from .torch_llada_model import Rotary, TorchLLaDA, rotate_half


class RowRotary(Rotary):
    """RoPE at per-row positions ``position_ids`` [B, T], for full forwards (start 0): the same
    sin/cos table entries and arithmetic as ``Rotary.apply``, gathered per row."""

    def __init__(self, base, position_ids):
        super().__init__(base.head_dim, base.theta)
        sin, cos = base.tables(int(position_ids.max()) + 1)
        self.row_sin = sin[0, 0][position_ids][:, None]  # [B, 1, T, hd]
        self.row_cos = cos[0, 0][position_ids][:, None]

    def apply(self, t, start):
        assert start == 0 and t.shape[-2] == self.row_sin.shape[-2], (start, t.shape)
        t32 = t.float()
        return (t32 * self.row_cos + rotate_half(t32) * self.row_sin).type_as(t)


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        core = TorchLLaDA(config.to_dict())
        self.model = core.model  # upstream parameter names: model.transformer.*
        self.rope = core.rope
        self.weight_tying = core.weight_tying
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from the checkpoint

    key_bias = staticmethod(TorchLLaDA.key_bias)
    head = TorchLLaDA.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        rope = self.rope
        if position_ids is not None:
            self.rope = RowRotary(rope, position_ids)
        try:
            logits = TorchLLaDA.forward(self, input_ids, attention_mask)
        finally:
            self.rope = rope
        return CausalLMOutput(logits=logits)
'''

AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}


def prepare_model(name: str, root: Path) -> Path:
    """VENV/models/NAME: the checkpoint (tiny: the tests' fixture; bench: benchmarks.bench_model)
    with an auto_map in config.json and the remote-code files. Idempotent."""
    dest = root / name
    if name == "tiny":
        src = REPO / "tests" / "fixtures" / "llada_tiny" / "model"
        dest.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file():
                shutil.copyfile(f, dest / f.name)
    elif name == "bench":
        from benchmarks import bench_model

        if not (dest / "model.safetensors").exists():
            bench_model.write(dest)
    else:
        raise SystemExit(f"unknown model {name!r} (tiny | bench)")
    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(auto_map=AUTO_MAP, architectures=["LLaDAModelLM"], model_type="llada")
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (dest / "configuration_llada.py").write_text(CONFIGURATION_LLADA)
    (dest / "modeling_llada.py").write_text(MODELING_LLADA)
    shutil.copyfile(HERE / "torch_llada_model.py", dest / "torch_llada_model.py")
    return dest


# ---- the peer's virtualenv -------------------------------------------------------------------

def ensure_venv(venv: Path) -> Path:
    """``venv`` with dlmserve 0.1.1 and the CPU torch; installs only what is missing."""
    python = venv / "bin" / "python"
    probe = ("import importlib.metadata as m; "
             "print(m.version('dlmserve'), m.version('torch').split('+')[0])")
    if python.exists():
        r = subprocess.run([python, "-c", probe], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.split() == ["0.1.1", "2.13.0"]:
            return python
    else:
        base = Path(sys.base_prefix) / "bin" / "python3"
        subprocess.run([str(base if base.exists() else "python3"), "-m", "venv", str(venv)], check=True)
    print(f"installing {DLMSERVE} and {TORCH} into {venv} ...", flush=True)
    subprocess.run([python, "-m", "pip", "install", "-q", DLMSERVE, TORCH], check=True)
    return python


# ---- servers ---------------------------------------------------------------------------------

class Peer:
    """A started server: its process, URL, model name and how to pause it."""

    def __init__(self, label: str, proc: subprocess.Popen, url: str):
        self.label, self.proc, self.url = label, proc, url
        self.model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]

    def tree(self) -> list[int]:
        """The server's pid and all its descendants'."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.tree():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
        return total / TICKS

    def pause(self, stop: bool) -> None:
        for pid in self.tree():
            try:
                os.kill(pid, signal.SIGSTOP if stop else signal.SIGCONT)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.pause(False)
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_ours(model_dir: Path, max_batch: int, repo: Path = REPO, label: str = "ours", extra: str = "") -> Peer:
    """``extra``: more server arguments, ``NAME=value`` words for its environment, and ``cpus=0,1``
    for the CPUs it is pinned to (``sched_setaffinity``)."""
    env, args = {}, []
    for w in shlex.split(extra):
        if "=" in w and not w.startswith("-"):
            env.update([w.split("=", 1)])
        else:
            args.append(w)
    cpus = {int(c) for c in env.pop("cpus").split(",")} if "cpus" in env else None
    proc, url = launch(["--model", str(model_dir), "--dtype", "float32", "--max-batch-size", str(max_batch),
                        "--warmup-buckets", "none", *args], repo=repo, env=env, cpus=cpus)
    return Peer(label, proc, url)


def export_revision(rev: str, root: Path) -> Path:
    """This repository's ``rev`` as a plain source tree under ``root`` (``git archive``; reused)."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    out = root / f"baseline-{sha}"
    if not (out / "serve").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def start_dlmserve(python: Path, model_dir: Path, threads: int, timeout: float = 600) -> Peer:
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), HF_MODULES_CACHE=str(model_dir.parent / ".hf_modules"))
    env.pop("PYTHONPATH", None)
    log = open(model_dir.parent / f"dlmserve-{model_dir.name}.log", "w")
    proc = subprocess.Popen([str(python), str(HERE / "peers_dlmserve.py"), "--model", str(model_dir),
                             "--port", str(port), "--dtype", "float32", "--threads", str(threads)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, timeout, "dlmserve", log.name)
    return Peer("dlmserve", proc, url)


# ---- requests --------------------------------------------------------------------------------

def chat_prompts(n: int, seed: int = 0) -> list[str]:
    """n demo-task prompts (additions and counts, alternating); every other one has a context of
    1-60 random numbers in front, so the prompt lengths spread."""
    from dllm_jax.demo import tasks

    rng = np.random.default_rng(seed)
    adds = tasks.held_out_additions((n + 1) // 2, seed=seed)
    counts = tasks.counts(held_out=False)
    counts = [counts[i] for i in rng.choice(len(counts), size=n // 2, replace=False)]
    mixed = [ex.prompt for pair in zip(adds, counts + [None]) for ex in pair if ex is not None][:n]
    out = []
    for i, p in enumerate(mixed):
        if i % 4 >= 2:
            k = int(rng.integers(1, 61))
            p = "Numbers: " + " ".join(str(int(x)) for x in rng.integers(0, 100, size=k)) + ". " + p
        out.append(p)
    return out


def body(peer: Peer, prompt: str, decoder: str, gen: int, block: int, steps: int) -> dict:
    b = {"model": peer.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": gen,
         "temperature": 0.0, "seed": 0}
    if peer.label == "dlmserve":
        b.update(block_length=block, num_denoising_steps=steps)
    elif decoder == "basic":  # the reference loop over the full canvas, as dlmserve runs it
        b.update(algorithm="basic", block_length=block, steps=steps, ignore_eos=True, early_stop=False)
    # decoder "default": our server's LLaDA default (dual cache, threshold 0.9, early stop)
    return b


async def closed_loop(url: str, bodies: list[dict], clients: int) -> tuple[float, list[float], list[str]]:
    queue = list(range(len(bodies)))
    lat: list[float] = [0.0] * len(bodies)
    texts: list[str] = [""] * len(bodies)
    async with httpx.AsyncClient(base_url=url, timeout=3600,
                                 limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker():
            while queue:
                i = queue.pop(0)
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=bodies[i])
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
                lat[i] = time.perf_counter() - t0
                texts[i] = r.json()["choices"][0]["message"]["content"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - t0, lat, texts


def rows_counters(peer: Peer) -> tuple[float, float]:
    m = scrape(peer.url, {})
    if peer.label == "dlmserve":
        return m.get("dlmserve_step_batch_size_sum", 0.0), m.get("dlmserve_step_batch_size_count", 0.0)
    return m.get("dllm_batch_rows_total", 0.0), m.get("dllm_batch_steps_total", 0.0)


def measure(peer: Peer, bodies: list[dict], clients: int) -> dict:
    rows0, steps0 = rows_counters(peer)
    cpu0 = peer.cpu_seconds()
    wall, lat, texts = asyncio.run(closed_loop(peer.url, bodies, clients))
    cpu1 = peer.cpu_seconds()
    rows1, steps1 = rows_counters(peer)
    n = len(bodies)
    return {"rps": n / wall, "p50": pct(lat, 50), "p90": pct(lat, 90), "cpu": (cpu1 - cpu0) / n,
            "rows": (rows1 - rows0) / max(steps1 - steps0, 1), "texts": texts}


def warm(peer: Peer, bodies: list[dict], clients: list[int], rounds: int = 6) -> None:
    """Untimed passes; ours until a pass compiles no new program (at most ``rounds`` per client count)."""
    for c in clients:
        for _ in range(1 if peer.label == "dlmserve" else rounds):
            before = scrape(peer.url, {}).get("dllm_compiles_total", 0)
            asyncio.run(closed_loop(peer.url, bodies, c))
            if peer.label == "dlmserve":
                break
            while scrape(peer.url, {}).get("dllm_compiles_in_flight", 0):
                time.sleep(0.2)
            if scrape(peer.url, {}).get("dllm_compiles_total", 0) == before:
                break


# ---- the run ---------------------------------------------------------------------------------

def run_model(name: str, args, python: Path) -> list[dict]:
    model_dir = prepare_model(name, args.venv / "models")
    gen, block, steps = SETTINGS[name]
    prompts = chat_prompts(args.prompts)
    top = max(args.clients)
    ours = theirs = base = None
    busy: list[subprocess.Popen] = []
    try:
        ours = start_ours(model_dir, args.max_batch_size,
                          export_revision(args.revision, args.venv) if args.revision else REPO,
                          f"ours @ {args.revision}" if args.revision else "ours", args.ours_args)
        ours.pause(True)
        if args.baseline:
            base = start_ours(model_dir, args.max_batch_size, export_revision(args.baseline, args.venv),
                              f"ours @ {args.baseline}" + (f" ({args.baseline_args})" if args.baseline_args else ""),
                              args.baseline_args)
            base.pause(True)
        theirs = start_dlmserve(python, model_dir, args.dlmserve_threads)
        theirs.pause(True)
        mine = [q for q in (ours, base) if q is not None]
        servers = mine + [theirs]
        # (server, decoder, clients) settings measured in each pass
        settings = [(p, "basic", c) for p in servers for c in args.clients] + [(q, "default", top) for q in mine]
        bodies = {(p.label, d): [body(p, x, d, gen, block, steps) for x in prompts] for p, d, _ in settings}
        for p in servers:
            p.pause(False)
            for d in ("basic", "default") if p in mine else ("basic",):
                warm(p, bodies[(p.label, d)], [c for q, dd, c in settings if q is p and dd == d],
                     rounds=1 if args.quick else 6)
            p.pause(True)
        results: dict[tuple, list[dict]] = {}
        # another job on the host during the measured passes: busy loops, one core each
        busy += [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        for i in range(args.passes):
            order = servers if i % 2 == 0 else servers[::-1]
            for p in order:
                p.pause(False)
                for q, d, c in settings:
                    if q is p:
                        r = measure(p, bodies[(p.label, d)], c)
                        results.setdefault((p.label, d, c), []).append(r)
                        print(f"  pass {i + 1} {name} {p.label} {d} {c} clients: {r['rps']:.2f} req/s, "
                              f"{r['cpu']:.3f} CPU-s/req, rows/step {r['rows']:.2f}", flush=True)
                p.pause(True)
    finally:
        for p in (ours, base, theirs):
            if p is not None:
                p.close()
        for loop in busy:
            loop.kill()

    def med(key, field):
        return statistics.median(r[field] for r in results[key])

    rows = []
    for label, d, c in [(q.label, "basic", c) for c in args.clients for q in mine] + [(q.label, "default", top)
                                                                                    for q in mine]:
        a, b = (label, d, c), ("dlmserve", "basic", c)
        same = sum(x == y for ra, rb in zip(results[a], results[b]) for x, y in zip(ra["texts"], rb["texts"]))
        total = sum(len(r["texts"]) for r in results[a])
        ratio = lambda f: med(a, f) / med(b, f)  # noqa: E731
        rows.append({
            "model": f"{name} ({'gen %d / block %d / %d steps' % (gen, block, steps)})",
            "clients": c, "server": label,
            "ours": "basic" if d == "basic" else "default (dual cache, threshold 0.9)",
            "req/s ours / dlmserve": f"{med(a, 'rps'):.2f} / {med(b, 'rps'):.2f} ({ratio('rps'):.2f}x)",
            "p50 s": f"{med(a, 'p50'):.3f} / {med(b, 'p50'):.3f}",
            "p90 s": f"{med(a, 'p90'):.3f} / {med(b, 'p90'):.3f}",
            "CPU-s/req": f"{med(a, 'cpu'):.3f} / {med(b, 'cpu'):.3f} ({ratio('cpu'):.2f}x)",
            "rows/step": f"{med(a, 'rows'):.2f} / {med(b, 'rows'):.2f}",
            "identical texts": f"{same}/{total}",
        })
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 pass (the tiny fixture unless --models), "
                   "one warm-up pass per setting (a program may still compile in the measured pass)")
    p.add_argument("--models", nargs="+", choices=sorted(SETTINGS), help="default: tiny bench (--quick: tiny)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--passes", type=int, default=6)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=8, help="ours (dlmserve's is 8)")
    p.add_argument("--dlmserve-threads", type=int, default=1)
    p.add_argument("--venv", type=Path, default=REPO / ".peers-venv")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="also serve this git revision of ours (exported under --venv), side by side in the same "
                        "passes: the before/after of a change")
    p.add_argument("--revision", default=None, metavar="REV",
                   help="serve ours from this git revision (exported under --venv) instead of the working tree")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="N busy loops (one core each) run beside the measured passes: a host with another job")
    p.add_argument("--ours-args", default="", metavar="ARGS",
                   help="more arguments for our server, and NAME=value words for its environment, e.g. "
                        "'--batch-buckets 1,2,4,6,8', 'XLA_FLAGS=--xla_force_host_platform_device_count=2 --mesh 2', "
                        "or 'cpus=0' (pinned to CPU 0)")
    p.add_argument("--baseline-args", default="", metavar="ARGS", help="the same for --baseline's server (with "
                   "--baseline equal to --revision: one revision, two settings)")
    args = p.parse_args(argv)
    if args.quick:
        args.passes = 1
    args.models = args.models or (["tiny"] if args.quick else ["tiny", "bench"])
    args.venv = args.venv.resolve()
    # a SIGTERM (e.g. from `timeout`) unwinds through the finally blocks that stop both servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    python = ensure_venv(args.venv)
    versions = subprocess.run([python, "-c", "import importlib.metadata as m; print(' '.join("
                               "f'{p} {m.version(p)}' for p in ('dlmserve', 'torch', 'transformers')))"],
                              capture_output=True, text=True, check=True).stdout.strip()
    import jax

    rows = []
    for name in args.models:
        rows += run_model(name, args, python)
    load = os.getloadavg()
    print(f"\nsettings: {args.prompts} chat prompts, greedy, float32, clients {args.clients} (closed loop), "
          f"{args.passes} passes (medians; order alternating), max batch {args.max_batch_size} / dlmserve 8; "
          f"dlmserve {args.dlmserve_threads} torch thread(s), {versions}; ours jax {jax.__version__}; "
          f"{os.cpu_count()} CPUs, {args.busy} busy loop(s) beside the passes, load average at the end "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    from benchmarks.common import print_table

    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
