"""Cost of a weight update (``POST /update_weights_from_disk``) on a real server.

    python -m benchmarks.weights_swap                       # the bench model (benchmarks.bench_model)
    python -m benchmarks.weights_swap --model A --new B --dtype bfloat16 --mesh 8

Starts ``python -m serve --allow-weight-updates`` on A (default: the bench model, seed 0), then
swaps to B (default: the bench model, seed 1; HF dir, and with ``--dcp`` also as a NeMo-RL
DCP) and back, first idle, then while ``--clients`` closed-loop clients send requests. Per
swap it prints: the server's load time (read + transfer + install, ``load_seconds``) and the
client's round trip; one parameter copy's size; memory before, while both copies are resident,
and after the old copy was retired (its last request ended); how many requests ran across the
swap (none may fail); and the compile counters before/after.

Memory: the server's live JAX arrays (``dllm_live_array_bytes``), and the process: a GPU's
``bytes_in_use`` / peak (from the update's answer), or on CPU the server's RSS from ``/proc``
with its peak (VmHWM, reset through ``clear_refs`` before each swap, so it is the swap's own).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.serve_load import launch, scrape



def rss(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def metrics(url: str) -> dict[str, float]:
    return scrape(url, {})


def start(args, model: str) -> tuple[subprocess.Popen, str]:
    b = args.max_batch_size
    serve_args = ["--model", model, "--allow-weight-updates", "--max-batch-size", str(b), "--batch-buckets", str(b),
                  "--prompt-buckets", "64", "--warmup-buckets", f"{b}x64x{args.max_tokens}"]
    for flag in ("mesh", "dtype"):
        if getattr(args, flag):
            serve_args += [f"--{flag}", getattr(args, flag)]
    return launch(serve_args, timeout=1800)


def prepare(args, tmp: Path) -> tuple[str, list[tuple[str, str]]]:
    """A, and the (label, path) of each swap target."""
    if args.model:
        return args.model, [("B", args.new), ("A", args.model)]
    from benchmarks import bench_model

    a, b = bench_model.write(tmp / "a", seed=0), bench_model.write(tmp / "b", seed=1)
    targets = [("B (hf)", str(b)), ("A (hf)", str(a))]
    if args.dcp:
        import torch
        import torch.distributed.checkpoint as dcp

        from dllm_jax.checkpoint import SafetensorsSource

        src = SafetensorsSource(b)
        sd = {k: torch.from_numpy(np.array(src.read(k))) for k in src.tensors()}
        src.close()
        dcp.save({"model": sd}, checkpoint_id=str(tmp / "b_dcp/policy/weights"), no_dist=True)
        targets.insert(1, ("B (dcp)", str(tmp / "b_dcp/policy")))
    return str(a), targets


class Load:
    """Closed-loop clients; records (sent, done) of every request."""

    def __init__(self, url: str, clients: int, max_tokens: int, vocab_cap: int = 256):
        self.url, self.max_tokens, self.done, self.errors = url, max_tokens, [], []
        self.stop = threading.Event()
        rng = np.random.default_rng(0)
        self.prompts = [rng.integers(0, vocab_cap, int(rng.integers(16, 64))).tolist() for _ in range(64)]
        self.threads = [threading.Thread(target=self.client, args=(k,), daemon=True) for k in range(clients)]

    def client(self, k: int) -> None:
        with httpx.Client(base_url=self.url, timeout=600) as http:
            i = k
            while not self.stop.is_set():
                i = (i + 7) % len(self.prompts)
                sent = time.monotonic()
                r = http.post("/v1/completions", json={"prompt": self.prompts[i], "max_tokens": self.max_tokens})
                if r.status_code != 200:
                    self.errors.append(r.text)
                self.done.append((sent, time.monotonic()))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(600)


def swap(url: str, pid: int, path: str) -> dict:
    reset_peak(pid)
    before = rss(pid)
    live_before = metrics(url)["dllm_live_array_bytes"]
    t0 = time.monotonic()
    r = httpx.post(url + "/update_weights_from_disk", json={"model_path": path}, timeout=1800)
    trip = time.monotonic() - t0
    body = r.json()
    if r.status_code != 200:
        raise SystemExit(f"update failed: {body}")
    peak = rss(pid)
    deadline = time.monotonic() + 600
    while (m := metrics(url))["dllm_weights_resident"] > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    both = body["memory"]["both_resident"]
    mb = 2 ** 20
    out = {"load_s": body["load_seconds"], "trip_s": trip, "params_mb": body["params_bytes"] / mb,
           "t0": t0, "t1": t0 + trip, "live": (live_before / mb, both["live_array_bytes"] / mb,
                                                 m["dllm_live_array_bytes"] / mb)}
    if "device_bytes_in_use" in both:  # an accelerator: its allocator
        out["mem"] = (body["memory"]["before"]["device_bytes_in_use"] / mb, both["device_bytes_in_use"] / mb,
                      both["device_peak_bytes_in_use"] / mb)
    else:  # CPU: the server's RSS (peak since the reset just before this swap)
        out["mem"] = (before["VmRSS"] / mb, peak["VmHWM"] / mb, rss(pid)["VmRSS"] / mb)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint A (default: write the bench model)")
    p.add_argument("--new", help="checkpoint B of the same architecture (with --model)")
    p.add_argument("--dcp", action="store_true", help="also swap to B written as a NeMo-RL DCP (needs torch)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--mesh", default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--load-seconds", type=float, default=6.0, help="load before and after each loaded swap")
    args = p.parse_args(argv)
    if bool(args.model) != bool(args.new):
        p.error("--model and --new go together")
    with tempfile.TemporaryDirectory() as tmp:
        a, targets = prepare(args, Path(tmp))
        proc, url = start(args, a)
        try:
            rows, counts = [], {}
            httpx.post(url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": args.max_tokens}, timeout=600)
            m0 = metrics(url)  # (after one request: the scheduler has published its counters)
            for label, path in targets:
                rows.append(("idle", label, swap(url, proc.pid, path), None))
            counts["idle swaps"] = (m0, metrics(url))
            with Load(url, args.clients, args.max_tokens):  # (warm the loaded path once:
                time.sleep(args.load_seconds)               # not timed)
            m0 = metrics(url)
            for label, path in targets:
                with Load(url, args.clients, args.max_tokens) as load:
                    time.sleep(args.load_seconds)
                    row = swap(url, proc.pid, path)
                    time.sleep(args.load_seconds)
                if load.errors:
                    raise SystemExit(f"{len(load.errors)} requests failed: {load.errors[0]}")
                overlap = sum(1 for s, d in load.done if s < row["t1"] and d > row["t0"])
                rows.append((f"{args.clients} clients", label, row, overlap))
            counts["swaps under load"] = (m0, metrics(url))
        finally:
            proc.terminate()
            proc.wait(60)
    print("live arrays: the server's live JAX arrays (dllm_live_array_bytes) before the swap, with both copies "
          "resident, after the old copy was retired; process: device bytes_in_use (before, both, peak) on an "
          "accelerator, else the server's RSS (before, peak during the swap, after)")
    print("| when | to | load s (server) | round trip s | one copy MB | live arrays MB before / both / after | "
          "process MB before / peak / after | requests overlapping the swap |")
    print("|---|---|---|---|---|---|---|---|")
    for when, label, r, overlap in rows:
        live = " / ".join(f"{x:.0f}" for x in r["live"])
        mem = " / ".join(f"{x:.0f}" for x in r["mem"])
        print(f"| {when} | {label} | {r['load_s']:.3f} | {r['trip_s']:.3f} | {r['params_mb']:.1f} | {live} | {mem} | "
              f"{'-' if overlap is None else overlap} |")
    keys = ("dllm_compiles_total", "dllm_programs_built_total", "dllm_xla_compiles_total", "dllm_weights_loaded_total")
    for phase, (before, after) in counts.items():
        print(f"{phase}: " + json.dumps({k[5:]: [before.get(k), after.get(k)] for k in keys}) + "  ([before, after])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
