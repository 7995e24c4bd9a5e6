"""Load test of the OpenAI server: N concurrent clients, a realistic prompt-length mix.

    python -m benchmarks.serve_load                       # starts the demo server itself
    python -m benchmarks.serve_load --model DIR --clients 1 8 32
    python -m benchmarks.serve_load --url http://host:8000 --model DIR   # a running server
    python -m benchmarks.serve_load --model demo          # the demo model on its own tasks

Each client sends streamed /v1/completions requests (token-id prompts, so prompt lengths are
exact) one after another from a shared list (closed loop). Per concurrency level it prints
requests/s, output tokens/s, p50/p99 latency, p50 time to first chunk, mean batch fill and
rows per block program and the fraction of wall time the engine spent in block programs
("engine busy"), programs compiled during the timed pass (should be 0; from /metrics), and
the ratio to calling ``Model.generate`` directly
in this process on the same requests in batches of min(clients, max batch) - the server's
overhead (queueing, HTTP, SSE, detokenisation, scheduling). Each level first runs untimed
until the server compiles no new programs (and none is compiling), so compiles are not measured (server and direct
alike).

Prompt lengths: 50% short (16-64 tokens), 35% medium (64-192), 15% long (192-384), capped
so prompt + max_tokens fits the context.

``--model demo``: the trained demo model (``dllm_jax.DEMO_MODEL``) on real chat prompts, half
held-out additions and half counts (``max_tokens`` 128 by default): replies of 2-93 tokens,
and threshold decoding takes 2 to 30+ steps per block, as on a real model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]


def prompt_lengths(n: int, rng: np.random.Generator, cap: int) -> list[int]:
    kind = rng.choice(3, size=n, p=[0.5, 0.35, 0.15])
    lo, hi = np.array([16, 64, 192])[kind], np.array([64, 192, 384])[kind]
    return [int(min(cap, rng.integers(a, b + 1))) for a, b in zip(lo, hi)]


def demo_prompts(n: int, seed: int, tokenizer) -> list[list[int]]:
    """Chat-templated token ids of n demo tasks: held-out additions and counts, alternating."""
    from dllm_jax.demo import evaluate, tasks

    adds = tasks.held_out_additions((n + 1) // 2, seed=seed)
    counts = tasks.counts(held_out=False) + tasks.counts(held_out=True)
    rng = np.random.default_rng(seed)
    counts = [counts[i] for i in rng.choice(len(counts), size=n // 2, replace=False)]
    mixed = [ex for pair in zip(adds, counts + [None]) for ex in pair if ex is not None][:n]
    return [evaluate.chat_ids(tokenizer, ex.prompt) for ex in mixed]


def make_prompts(n: int, seed: int, vocab: int, avoid: set[int], cap: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    allowed = np.array([t for t in range(min(vocab, 256)) if t not in avoid])  # plain byte tokens
    return [rng.choice(allowed, size=k).tolist() for k in prompt_lengths(n, rng, cap)]


# ---- the server side ------------------------------------------------------------------------

async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {"latency": time.perf_counter() - t0, "ttfc": first, "tokens": usage["completion_tokens"]}


async def run_load(url: str, model: str, prompts: list[list[int]], clients: int, max_tokens: int,
                   headers: dict) -> tuple[float, list[dict]]:
    queue = list(enumerate(prompts))
    results: list[dict] = [None] * len(prompts)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=3600,
                                 limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker():
            while queue:
                i, p = queue.pop(0)
                results[i] = await one_request(client, model, p, max_tokens)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - t0, results


def scrape(url: str, headers: dict) -> dict[str, float]:
    """/metrics as sample name -> value, summed over label sets (histogram buckets left out)."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_bucket"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(serve_args: list[str], timeout: float = 600, repo: Path = REPO,
           env: dict[str, str] | None = None, cpus: set[int] | None = None) -> tuple[subprocess.Popen, str]:
    """``python -m serve --port P *serve_args`` (from ``repo``'s source, this checkout by default;
    ``env`` on top of this process's environment; pinned to ``cpus`` if given) on a free port;
    returns once /health says 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "serve", "--port", str(port), *serve_args]
    env = dict(os.environ, **(env or {}), PYTHONPATH=str(repo))
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=pin)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, timeout)
    return proc, url


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, name: str = "server", log: str = "") -> None:
    """Until ``url``/health says 200; SystemExit (``proc`` killed) if it exits or the time runs out."""
    see = f"; see {log}" if log else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}{see}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{name} did not become ready{see}")


def start_server(args) -> tuple[subprocess.Popen, str]:
    serve_args = ["--max-batch-size", str(args.max_batch_size), "--warmup-buckets", "none",
                  "--max-wait-ms", str(args.max_wait_ms)]
    if args.model:
        serve_args += ["--model", args.model]
    if args.mesh:
        serve_args += ["--mesh", args.mesh]
    return launch(serve_args + args.serve_args.split())


# ---- direct Model.generate on the same requests ----------------------------------------------

def direct(model, prompts: list[list[int]], batch: int, max_tokens: int) -> tuple[float, int]:
    """Seconds and output tokens of Model.generate over the requests in batches, with the
    server's default LLaDA settings (dual cache, threshold 0.9, early stop)."""
    from serve.api.request_params import gen_length_for
    from serve.engine.defaults import default_params

    p = default_params(model.family, gen_length_for(max_tokens, 32))
    kwargs = dict(gen_length=p.gen_length, block_length=p.block_length, algorithm=p.algorithm,
                  threshold=p.threshold, factor=p.factor, early_stop=p.early_stop)
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    for chunk in chunks:  # compile every shape first
        model.generate(chunk, **kwargs)
    t0 = time.perf_counter()
    tokens = 0
    for chunk in chunks:
        out = model.generate(chunk, **kwargs)
        tokens += int(np.minimum(out.lengths, max_tokens).sum())
    return time.perf_counter() - t0, tokens


def load_model(args):
    import dllm_jax

    mesh = dllm_jax.make_mesh(args.mesh)
    if args.model:
        return dllm_jax.load(args.model, mesh=mesh)
    from serve.engine.demo import demo_model

    return demo_model(mesh=mesh)


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (else one is started)")
    p.add_argument("--model", help="checkpoint the server serves (default: the demo model, random-token "
                   "prompts); 'demo': the demo model on its own tasks (additions and counts)")
    p.add_argument("--mesh", default=None)
    p.add_argument("--api-key", default=os.environ.get("DLLM_API_KEY"))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=None, help="default 64 (128 with --model demo)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--no-direct", action="store_true", help="skip the Model.generate comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="", help="more arguments of the server, e.g. '--steps-per-call 1'")
    args = p.parse_args(argv)
    demo_workload = args.model == "demo"
    if demo_workload:
        args.model = None
    if args.max_tokens is None:
        args.max_tokens = 128 if demo_workload else 64

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url = start_server(args)
    try:
        card = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]
        model_name, context = card["id"], card["max_model_len"]
        model = None if args.no_direct else load_model(args)
        vocab = model.spec.vocab if model is not None else 256
        # without the model here: keep off the low ids, where the demo tokenizer keeps its specials
        avoid = set(model.stop_token_ids) | {model.mask_token_id} if model is not None else set(range(8))
        if demo_workload:
            import dllm_jax
            from dllm_jax.checkpoint import load_tokenizer

            prompts = demo_prompts(args.requests, args.seed, load_tokenizer(dllm_jax.DEMO_MODEL))
        else:
            prompts = make_prompts(args.requests, args.seed, vocab, avoid, context - args.max_tokens - 64)
        print(f"model {model_name} ({card.get('family')}, mesh {card.get('mesh')}), {args.requests} requests, "
              f"max_tokens {args.max_tokens}, prompt tokens mean {statistics.mean(map(len, prompts)):.0f} "
              f"(min {min(map(len, prompts))}, max {max(map(len, prompts))}), max batch {args.max_batch_size}")
        header = ("| clients | req/s | out tok/s | p50 latency s | p99 latency s | p50 TTFC s | batch fill | "
                  "rows/step | engine busy | compiles | direct tok/s | server/direct |")
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for clients in args.clients:
            for _ in range(6):  # warm until no new programs compile (steady state)
                compiles = scrape(url, headers).get("dllm_compiles_total", 0)
                asyncio.run(run_load(url, model_name, prompts, clients, args.max_tokens, headers))
                while scrape(url, headers).get("dllm_compiles_in_flight", 0):  # one started late in the pass
                    time.sleep(0.2)
                if scrape(url, headers).get("dllm_compiles_total", 0) == compiles:
                    break
            before = scrape(url, headers)
            wall, results = asyncio.run(run_load(url, model_name, prompts, clients, args.max_tokens, headers))
            after = scrape(url, headers)
            tokens = sum(r["tokens"] for r in results)
            lat = [r["latency"] for r in results]
            ttfc = [r["ttfc"] for r in results if r["ttfc"] is not None]
            d = {k: after[k] - before.get(k, 0) for k in ("dllm_batch_rows_total", "dllm_batch_slots_total",
                                                          "dllm_batch_steps_total", "dllm_block_step_seconds_sum",
                                                          "dllm_compiles_total")}
            busy = d["dllm_block_step_seconds_sum"] / wall
            fill = d["dllm_batch_rows_total"] / max(d["dllm_batch_slots_total"], 1)
            rows = d["dllm_batch_rows_total"] / max(d["dllm_batch_steps_total"], 1)
            tps = tokens / wall
            if model is not None:
                dwall, dtokens = direct(model, prompts, min(clients, args.max_batch_size), args.max_tokens)
                dtps = dtokens / dwall
                ratio = f"{tps / dtps:.2f}"
                dcol = f"{dtps:.0f}"
            else:
                ratio = dcol = "-"
            print(f"| {clients} | {len(results) / wall:.2f} | {tps:.0f} | {pct(lat, 50):.3f} | {pct(lat, 99):.3f} | "
                  f"{pct(ttfc, 50):.3f} | {fill:.2f} | {rows:.1f} | {busy:.0%} | {d['dllm_compiles_total']:.0f} | {dcol} | {ratio} |", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
