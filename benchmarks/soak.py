"""Soak test of the OpenAI server: is memory bounded under a repeated mixed workload?

    python -m benchmarks.soak --model tests/fixtures/llada_tiny/model --rounds 5 --requests 300 \\
        --concurrency 32 --max-programs 8
    python -m benchmarks.soak                      # the random-weight demo model

Starts ``python -m serve`` as a subprocess on a free localhost port (nothing else is
contacted) and runs ``--rounds`` rounds of ``--requests`` requests from ``--concurrency``
concurrent clients (closed loop); with ``--repeat`` every round sends the same requests. The workload mixes chat and completions, streamed and not,
temperature 0 and > 0 (with seeds), different ``max_tokens`` / ``block_length`` /
algorithms / prompt lengths / logprobs, so many program keys are hit and, with a small
``--max-programs``, programs are evicted and rebuilt; some streams are dropped after their
first chunk (abandoned). A fixed set of temperature-0 requests is sent under load in every
round and again alone after it: the invariance rate is the fraction whose texts are equal.

Per round it prints: requests, 5xx (must be 0), other errors, abandoned streams, server RSS
(VmRSS of the server process after the round), programs built (in all and this round) /
evicted / cached, block-program compiles (``dllm_compiles_total``) and XLA compilations this
round (``dllm_xla_compiles_total``, any program) from /metrics, the invariance rate, the
round's seconds and requests per second (load, probes under load and probes alone). Every round and request is bounded in time
(``--round-timeout``, ``--request-timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.serve_load import scrape

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = (8, 16, 24, 40, 64)
BLOCKS = (8, 16, 32)
WORDS = "the a diffusion model of masked tokens writes blocks in parallel and stops at the end".split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir for the server (default: the demo model)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=300, help="requests per round")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-programs", type=int, default=8, help="the server's --max-programs")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--prompt-buckets", default="64,128,256")
    p.add_argument("--mesh", default="1")
    p.add_argument("--invariance", type=int, default=8, help="fixed T=0 requests checked per round")
    p.add_argument("--cancel-rate", type=float, default=0.1, help="fraction of streams dropped early")
    p.add_argument("--round-timeout", type=float, default=1800.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--algorithms", default="default,basic,prefix_cache,dinfer_blockwise",
                   help="algorithms to mix ('default': the server's)")
    p.add_argument("--max-tokens", default=",".join(map(str, MAX_TOKENS)), help="max_tokens values to mix")
    p.add_argument("--block-lengths", default=",".join(map(str, BLOCKS)), help="block_length values to mix")
    p.add_argument("--prompt-words", default="3,10,40,90", help="prompt lengths (words) to mix")
    p.add_argument("--logprobs-rate", type=float, default=0.15, help="fraction of requests with logprobs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", action="store_true",
                   help="every round sends round 1's requests again (same prompts, settings and seeds): after "
                        "round 1 nothing new should be built or compiled")
    p.add_argument("--server-arg", action="append", default=[], help="extra server argument (repeatable)")
    return p.parse_args(argv)


# ---- the server ------------------------------------------------------------------------------

class ServerProc:
    def __init__(self, args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--warmup-buckets", "none", "--max-programs", str(args.max_programs),
               "--max-batch-size", str(args.max_batch_size), "--prompt-buckets", args.prompt_buckets,
               "--mesh", args.mesh, "--max-queue", str(max(1024, 4 * args.concurrency)), *args.server_arg]
        if args.model:
            cmd += ["--model", args.model]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.pop("DLLM_API_KEY", None)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="soak-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"server not ready after {timeout}s:\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def device(self) -> str:
        m = re.search(r"mesh (\{.*?\}) over (\d+) devices \((\w+)\)", Path(self.log.name).read_text())
        return f"{m.group(3)} x{m.group(2)} mesh {m.group(1)}" if m else "?"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metrics(self) -> dict[str, float]:
        return scrape(self.url, {})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


# ---- the workload ----------------------------------------------------------------------------

def make_request(rng: random.Random, model: str, args, *, greedy: bool | None = None, stream: bool | None = None,
                 cancel_rate: float = 0.0) -> dict:
    """One random request: {'path', 'body', 'cancel'} (cancel: drop the stream after a chunk)."""
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5 if stream is None else stream
    greedy = rng.random() < 0.5 if greedy is None else greedy
    body = {"model": model, "max_tokens": rng.choice(_ints(args.max_tokens)), "stream": stream,
            "block_length": rng.choice(_ints(args.block_lengths)), "temperature": 0.0 if greedy else 0.8}
    if not greedy:
        body["seed"] = rng.randrange(1 << 30)
    algorithm = rng.choice(args.algorithms.split(","))
    if algorithm != "default":
        body["algorithm"] = algorithm
    n_words = rng.choice(_ints(args.prompt_words))
    text = " ".join(rng.choice(WORDS) for _ in range(n_words))
    if chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < args.logprobs_rate and not stream:
            body["logprobs"], body["top_logprobs"] = True, 2
    else:
        path = "/v1/completions"
        body["prompt"] = text
        if rng.random() < args.logprobs_rate:
            body["logprobs"] = 2
    return {"path": path, "body": body, "cancel": stream and rng.random() < cancel_rate}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def text_of(path: str, body: dict) -> str:
    choice = body["choices"][0]
    return choice["message"]["content"] if path.endswith("chat/completions") else choice["text"]


async def send(client: httpx.AsyncClient, req: dict) -> dict:
    """{'status', 'text', 'abandoned', 'error'} of one request."""
    path, body = req["path"], req["body"]
    try:
        if not body["stream"]:
            r = await client.post(path, json=body)
            if r.status_code != 200:
                return {"status": r.status_code, "error": r.text[:200]}
            return {"status": 200, "text": text_of(path, r.json())}
        parts = []
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return {"status": r.status_code, "error": (await r.aread())[:200]}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"status": 200, "error": chunk["error"]}
                for c in chunk.get("choices", []):
                    parts.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
                if req["cancel"] and parts:
                    return {"status": 200, "abandoned": True}  # leaves the stream: the server cancels
        return {"status": 200, "text": "".join(parts)}
    except (httpx.HTTPError, asyncio.TimeoutError) as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"}


async def run_round(url: str, work: list[dict], probes: list[dict], concurrency: int, request_timeout: float,
                    round_timeout: float) -> tuple[list[dict], list[dict]]:
    """The load (with the probes mixed in) -> (load results, probe results)."""
    jobs = list(enumerate(work))
    step = max(1, len(work) // (len(probes) + 1))
    for j, p in enumerate(probes):  # spread over the round, while the load runs
        jobs.insert(min(len(jobs), (j + 1) * step + j), (-1 - j, p))
    results: dict[int, dict] = {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=request_timeout, limits=limits) as client:
        async def worker():
            while jobs:
                i, req = jobs.pop(0)
                results[i] = await send(client, req)

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=round_timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    missing = {"status": None, "error": "round timeout"}
    return ([results.get(i, missing) for i in range(len(work))],
            [results.get(-1 - j, missing) for j in range(len(probes))])


async def alone(url: str, probes: list[dict], request_timeout: float) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=request_timeout) as client:
        return [await send(client, p) for p in probes]


# ---- main ------------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv)
    server = ServerProc(args)
    try:
        t0 = time.monotonic()
        server.wait_ready()
        model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        print(f"model={args.model or 'demo'} ({model}) rounds={args.rounds} requests/round={args.requests} "
              f"concurrency={args.concurrency} max-programs={args.max_programs} "
              f"max-batch-size={args.max_batch_size} prompt-buckets={args.prompt_buckets} "
              f"algorithms={args.algorithms} max-tokens={args.max_tokens} block-lengths={args.block_lengths} "
              f"logprobs-rate={args.logprobs_rate} cancel-rate={args.cancel_rate} repeat={args.repeat} "
              f"server-args={' '.join(args.server_arg) or '-'} "
              f"device={server.device()} (ready in {time.monotonic() - t0:.0f}s, RSS {server.rss_mb():.0f} MB)",
              flush=True)
        prng = random.Random(args.seed + 10_000)
        probes = [make_request(prng, model, args, greedy=True, stream=(i % 2 == 1)) for i in range(args.invariance)]
        header = (f"{'round':>5} {'requests':>8} {'5xx':>4} {'errors':>6} {'abandoned':>9} {'rss_MB':>7} "
                  f"{'built':>6} {'+built':>6} {'evicted':>7} {'cached':>6} {'compiles':>8} {'+xla':>6} "
                  f"{'invariant':>9} {'seconds':>7} {'req/s':>6}")
        last = server.metrics()
        rows = [header]
        print(header, flush=True)
        for r in range(1, args.rounds + 1):
            rng = random.Random(args.seed * 1000 + (1 if args.repeat else r))
            work = [make_request(rng, model, args, cancel_rate=args.cancel_rate) for _ in range(args.requests)]
            t = time.monotonic()
            results, under_load = asyncio.run(run_round(server.url, work, probes, args.concurrency,
                                                        args.request_timeout, args.round_timeout))
            quiet = asyncio.run(alone(server.url, probes, args.request_timeout))
            seconds = time.monotonic() - t
            everything = results + under_load + quiet
            n5xx = sum(1 for x in everything if x["status"] is not None and x["status"] >= 500)
            errors = sum(1 for x in everything if "error" in x)
            abandoned = sum(1 for x in results if x.get("abandoned"))
            same = sum(1 for a, b in zip(under_load, quiet) if "text" in a and "text" in b and a["text"] == b["text"])
            m = server.metrics()
            nan = float("nan")

            def delta(name):
                return m.get(name, nan) - last.get(name, nan)

            row = (f"{r:>5} {len(results):>8} {n5xx:>4} {errors:>6} {abandoned:>9} {server.rss_mb():>7.0f} "
                   f"{m.get('dllm_programs_built_total', nan):>6.0f} {delta('dllm_programs_built_total'):>6.0f} "
                   f"{m.get('dllm_programs_evicted_total', nan):>7.0f} "
                   f"{m.get('dllm_programs_cached', nan):>6.0f} "
                   f"{m.get('dllm_compiles_total', nan):>8.0f} {delta('dllm_xla_compiles_total'):>6.0f} "
                   f"{same}/{len(probes):<7} {seconds:>7.0f} {len(everything) / seconds:>6.2f}")
            last = m
            rows.append(row)
            print(row, flush=True)
            for x in everything:
                if "error" in x:
                    print("   error:", x["status"], str(x["error"])[:160], flush=True)
                    break
        if server.proc.poll() is not None:
            print("server died:\n" + server.tail())
    finally:
        server.stop()


if __name__ == "__main__":
    main()
