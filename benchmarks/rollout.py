"""A GRPO-shaped rollout loop against a real server, through SGLang's native API.

    python -m benchmarks.rollout --quick                  # tiny fixture, 4 x 4, 32 tokens, 2 iterations (~2 min)
    python -m benchmarks.rollout                          # the bench model, 8 prompts x 8 samples, 128 tokens
    python -m benchmarks.rollout --prompts 4 --n 8 --max-new-tokens 64 --iterations 3 --mesh 8

Starts ``python -m serve --allow-weight-updates`` on ``--model`` (an HF safetensors dir; default:
the bench model of ``benchmarks.bench_model`` written to a temp dir) and drives it the way a
rollout worker and trainer of slime drive SGLang. Per iteration:

1. rollouts: P prompts, each one ``POST /generate`` with ``sampling_params.n = n``, T = 1,
   ``max_new_tokens`` G, ``return_logprob: true``, all P sent at once;
2. the trainer's turn: a perturbed checkpoint is written (the model's tensors plus small noise,
   cumulative, as training steps; not timed as serving), then slime's cycle
   ``pause_generation`` -> ``flush_cache`` until 200 -> ``update_weights_from_disk
   {model_path, weight_version}`` -> ``get_weight_version`` -> ``continue_generation``.

An untimed iteration 0 compiles the block program (one single-row request of the rollouts'
shape: the server has one batch bucket, P x n slots) and installs version "1", so iteration i
generates on ``weight_version`` str(i) (checked in every answer) and installs str(i + 1).
Prompts and seeds are the same every iteration, so "changed" counts the rollouts the new
weights changed. Columns: generation seconds (and the batch's denoising steps and the engine's
seconds in them, from /metrics), swap seconds (the update call's round trip; the
server's own load time beside it), idle/other seconds (the rest of the cycle: pause, flush,
version, continue and the client between those calls), rollouts/s and tokens/s of the
generation, and of the whole loop (generation + cycle; the benchmark's own answer checks,
/metrics reads and checkpoint writes are not counted).

Second table, group sharing: the same P x n rollouts three ways, order rotating over
``--repeats``: as P requests with ``n`` (seed s gives samples s, s+1, ...) and as P x n requests
with ``n = 1`` and those seeds, both on the server above, and as P requests with ``n`` on a second
server started with ``--no-share-forwards``. The rows of a group enter their first block with the
same canvas and share that block-start forward (docs/sampling.md, "Twins share a refresh"), so do
independent requests of one prompt admitted in the same step; the second server runs every row's
own. Tokens and logprobs must be identical in all three; the batch forwards
(``dllm_batch_forwards_total``), engine seconds and rollouts/s show what the sharing saves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import print_table
from benchmarks.serve_load import REPO, free_port, scrape, wait_ready

TINY = REPO / "tests" / "fixtures" / "llada_tiny" / "model"
PROMPT_LEN = (16, 48)  # prompt tokens, uniform; one compiled prompt bucket of 64
PROMPT_BUCKET = 64


def device() -> str:
    """The JAX device, asked in a child process (importing JAX here would take an accelerator's
    memory from the server)."""
    code = "from benchmarks.common import device_description as d; print(d())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    return out.stdout.strip() or "unknown"


def start(args, model: str, tmp: Path, extra: tuple[str, ...] = (), name: str = "server") -> tuple[subprocess.Popen, str, Path]:
    """``python -m serve`` with one batch bucket of P x n rows and one prompt bucket (and ``extra``
    arguments); its log in tmp/NAME.log."""
    rows = args.prompts * args.n
    serve_args = ["--model", model, "--allow-weight-updates", "--max-batch-size", str(rows), "--batch-buckets",
                  str(rows), "--prompt-buckets", str(PROMPT_BUCKET), "--warmup-buckets", "none", "--max-wait-ms", "20"]
    for flag in ("mesh", "dtype"):
        if getattr(args, flag):
            serve_args += [f"--{flag}", getattr(args, flag)]
    port = free_port()
    serve_args += list(extra)
    log = tmp / f"{name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--port", str(port), *serve_args], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, 1800, log=str(log))
    return proc, url, log


# ---- the trainer's side ---------------------------------------------------------------------

class Trainer:
    """Writes checkpoint k = the model's tensors + k steps of noise (sigma x each matrix's std)."""

    def __init__(self, model: Path, tmp: Path, sigma: float, seed: int = 0):
        from dllm_jax.checkpoint import SafetensorsSource

        src = SafetensorsSource(model)
        self.tensors = {k: np.array(src.read(k)) for k in src.tensors()}
        src.close()
        self.model, self.tmp, self.sigma = model, tmp, sigma
        self.rng = np.random.default_rng(seed)
        self.written: list[Path] = []

    def step(self, k: int) -> Path:
        from dllm_jax.checkpoint import save_safetensors

        for name, w in self.tensors.items():
            if w.ndim == 2 and not np.issubdtype(w.dtype, np.integer):  # (bfloat16 is no np.floating)
                w32 = w.astype(np.float32)
                noise = self.rng.standard_normal(w.shape, np.float32) * (self.sigma * float(w32.std()))
                self.tensors[name] = (w32 + noise).astype(w.dtype)
        dest = self.tmp / f"step{k}"  # a fresh directory: the server may still map an older one
        dest.mkdir()
        for f in self.model.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
                shutil.copy(f, dest / f.name)
        save_safetensors(self.tensors, dest / "model.safetensors")
        self.written.append(dest)
        while len(self.written) > 2:  # the version before the current one has been retired
            shutil.rmtree(self.written.pop(0))
        return dest


# ---- the rollout worker's side ----------------------------------------------------------------

def prompts(count: int, config: dict, seed: int) -> list[list[int]]:
    """Random byte-token prompts, the model's special ids left out."""
    rng = np.random.default_rng(seed)
    avoid = {config.get(k) for k in ("eos_token_id", "pad_token_id", "mask_token_id", "bos_token_id")}
    allowed = np.array([t for t in range(min(int(config.get("vocab_size", 256)), 256)) if t not in avoid])
    return [rng.choice(allowed, size=int(rng.integers(*PROMPT_LEN, endpoint=True))).tolist() for _ in range(count)]


def body(ids: list[int], n: int, seed: int, max_new_tokens: int) -> dict:
    return {"input_ids": ids, "return_logprob": True, "logprob_start_len": -1,
            "sampling_params": {"temperature": 1.0, "max_new_tokens": max_new_tokens, "n": n, "sampling_seed": seed}}


async def send(url: str, bodies: list[dict]) -> tuple[float, list[dict]]:
    """All bodies at once; (seconds until the last answer, the answers flattened in body order)."""
    async with httpx.AsyncClient(base_url=url, timeout=3600,
                                 limits=httpx.Limits(max_connections=len(bodies) + 4)) as client:
        async def one(b):
            r = await client.post("/generate", json=b)
            if r.status_code != 200:
                raise SystemExit(f"/generate answered {r.status_code}: {r.text[:500]}")
            out = r.json()
            return out if isinstance(out, list) else [out]

        t0 = time.perf_counter()
        answers = await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t0, [a for group in answers for a in group]


def measured(url: str, bodies: list[dict]) -> dict:
    """``send`` with the engine's own count of what it did meanwhile (from /metrics, outside the
    timed window): the batch's denoising steps ("steps", ``dllm_batch_steps_total``; a batch has
    P x n slots whatever its occupancy, so this is the work) and the seconds the engine spent in
    its decode calls. The steps are nearly deterministic, where the wall time is not on a shared
    host."""
    before = scrape(url, {})
    wall, answers = asyncio.run(send(url, bodies))
    after = scrape(url, {})
    delta = {k: after.get(k, 0) - before.get(k, 0)
             for k in ("dllm_batch_steps_total", "dllm_batch_forwards_total", "dllm_block_step_seconds_sum")}
    return {"wall": wall, "answers": answers, "steps": int(delta["dllm_batch_steps_total"]),
            "forwards": int(delta["dllm_batch_forwards_total"]), "engine": delta["dllm_block_step_seconds_sum"]}


def check_finished(answers: list[dict]) -> None:
    for a in answers:
        reason = a["meta_info"]["finish_reason"]["type"]
        if reason not in ("stop", "length"):
            raise SystemExit(f"a rollout ended with finish_reason {reason}: {a['meta_info']}")
        if len(a["meta_info"]["output_token_logprobs"]) != len(a["output_ids"]):
            raise SystemExit("output_token_logprobs and output_ids differ in length")


def group_bodies(ps: list[list[int]], seeds: list[int], args) -> list[dict]:
    return [body(p, args.n, s, args.max_new_tokens) for p, s in zip(ps, seeds)]


def single_bodies(ps: list[list[int]], seeds: list[int], args) -> list[dict]:
    return [body(p, 1, s + j, args.max_new_tokens) for p, s in zip(ps, seeds) for j in range(args.n)]


def warm(url: str, bodies: list[dict]) -> int:
    """Send ``bodies`` until a pass compiles no new program (and none is compiling); passes. One
    row of the rollouts' shape is enough: the single batch bucket makes every batch P x n slots."""
    for passes in range(1, 7):
        before = scrape(url, {}).get("dllm_compiles_total", 0)
        asyncio.run(send(url, bodies))
        while scrape(url, {}).get("dllm_compiles_in_flight", 0):
            time.sleep(0.2)
        if scrape(url, {}).get("dllm_compiles_total", 0) == before:
            return passes
    return passes


# ---- slime's weight-update cycle ----------------------------------------------------------------

def update_cycle(http: httpx.Client, path: Path, version: str) -> dict:
    """pause -> flush loop -> update_weights_from_disk -> get_weight_version -> continue."""
    t0 = time.perf_counter()
    ok(http.post("/pause_generation", json={}))
    flushes = 1
    while http.get("/flush_cache").status_code != 200:
        flushes += 1
        time.sleep(0.05)
    t1 = time.perf_counter()
    out = ok(http.post("/update_weights_from_disk", json={"model_path": str(path), "weight_version": version}))
    t2 = time.perf_counter()
    seen = ok(http.get("/get_weight_version"))["weight_version"]
    ok(http.post("/continue_generation", json={}))
    t3 = time.perf_counter()
    if not out.get("success") or seen != version:
        raise SystemExit(f"update to {version} failed: {out}, get_weight_version {seen!r}")
    return {"swap": t2 - t1, "load": out["load_seconds"], "cycle": t3 - t0, "flushes": flushes, "version": seen}


def ok(r: httpx.Response) -> dict:
    if r.status_code != 200:
        raise SystemExit(f"{r.request.method} {r.request.url.path} answered {r.status_code}: {r.text[:500]}")
    return r.json()


# ---- the two tables ------------------------------------------------------------------------------

def loop(url: str, trainer: Trainer, ps: list[list[int]], seeds: list[int], args) -> list[dict]:
    rows, previous = [], None
    with httpx.Client(base_url=url, timeout=3600) as http:
        for it in range(1, args.iterations + 1):
            m = measured(url, group_bodies(ps, seeds, args))
            gen, answers = m["wall"], m["answers"]
            check_finished(answers)
            versions = sorted({a["meta_info"]["weight_version"] for a in answers})
            tokens = [a["output_ids"] for a in answers]
            t1 = time.perf_counter()
            path = trainer.step(it + 1)
            write = time.perf_counter() - t1
            cyc = update_cycle(http, path, str(it + 1))
            serving = gen + cyc["cycle"]  # (the benchmark's own checks, /metrics reads and writes left out)
            n_tok = sum(a["meta_info"]["completion_tokens"] for a in answers)
            rows.append({
                "iter": it, "weight_version in answers": ",".join(versions),
                "ok": "yes" if versions == [str(it)] else "NO",
                "gen s": gen, "steps": m["steps"], "engine s": m["engine"], "swap s": cyc["swap"],
                "server load s": cyc["load"],
                "idle/other s": cyc["cycle"] - cyc["swap"], "flush tries": cyc["flushes"],
                "rollouts/s": len(answers) / gen, "tokens": n_tok, "tokens/s": n_tok / gen,
                "loop rollouts/s": len(answers) / serving,
                "changed": "-" if previous is None else f"{sum(map(list.__ne__, tokens, previous))}/{len(tokens)}",
                "ckpt write s (not serving)": write, "version after": cyc["version"]})
            previous = tokens
            if rows[-1]["ok"] != "yes":
                raise SystemExit(f"iteration {it}: answers carry weight_version {versions}, expected {it}")
    return rows


ARMS = ("group", "independent", "group, not shared")


def sharing(urls: dict[str, str], ps: list[list[int]], seeds: list[int], args) -> list[dict]:
    """The three arms (``ARMS``) once per repeat, the order rotating; ``urls``: the sharing server
    ("shared") and the one started with ``--no-share-forwards`` ("not shared")."""
    rows = []
    lp = lambda xs: [[x[0] for x in a["meta_info"]["output_token_logprobs"]] for a in xs]  # noqa: E731
    for r in range(args.repeats):
        k = (r + args.first_arm) % 3
        order = ARMS[k:] + ARMS[:k]
        got = {}
        for arm in order:
            url = urls["not shared" if arm.endswith("not shared") else "shared"]
            bodies = single_bodies(ps, seeds, args) if arm == "independent" else group_bodies(ps, seeds, args)
            got[arm] = measured(url, bodies)
            check_finished(got[arm]["answers"])
        g, i, u = (got[a] for a in ARMS)
        tokens = [[a["output_ids"] for a in m["answers"]] for m in (g, i, u)]
        logprobs = [lp(m["answers"]) for m in (g, i, u)]
        row = {"repeat": r + 1, "first": order[0]}
        for name, m in zip(ARMS, (g, i, u)):
            row[f"{name}: rollouts/s"] = len(m["answers"]) / m["wall"]
            row[f"{name}: forwards"] = m["forwards"]
            row[f"{name}: engine s"] = m["engine"]
        row.update({"steps g / i / u": f"{g['steps']} / {i['steps']} / {u['steps']}",
                    "forwards not shared / group": u["forwards"] / max(g["forwards"], 1),
                    "engine s not shared / group": u["engine"] / g["engine"],
                    "tokens identical": "yes" if tokens[0] == tokens[1] == tokens[2] else "NO",
                    "logprobs identical": "yes" if logprobs[0] == logprobs[1] == logprobs[2] else "NO"})
        rows.append(row)
    return rows


def shared_table(args, model: str, tmp: Path, url: str, ps, seeds, latest: Path) -> list[dict]:
    """The group-sharing table: a second server (``--no-share-forwards``, updated to ``latest``, the
    first server's weights) beside the first; prints the table and its summary line."""
    proc, url2, log = start(args, model, tmp, ("--no-share-forwards",), name="server-not-shared")
    try:
        warm(url2, [body(ps[0], 1, 0, args.max_new_tokens)])
        with httpx.Client(base_url=url2, timeout=3600) as http:  # the first server's weights now
            update_cycle(http, latest, str(args.iterations + 1))
        share = sharing({"shared": url, "not shared": url2}, ps, seeds, args)
    except BaseException:
        print(f"server log: the last lines of {log}:\n" + "".join(open(log).readlines()[-30:]), file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(60)
    print_table(share, list(share[0]), f"group sharing: {args.prompts} requests with n={args.n} (group), "
                f"{args.prompts * args.n} requests with n=1 and the same seeds (independent), and the group on a "
                "server with --no-share-forwards")
    med = lambda k: statistics.median(r[k] for r in share)  # noqa: E731
    print(f"\nmedians: forwards not shared / group {med('forwards not shared / group'):.3f}, engine seconds not "
          f"shared / group {med('engine s not shared / group'):.3f}, rollouts/s group / not shared "
          f"{med('group: rollouts/s') / med('group, not shared: rollouts/s'):.3f}; tokens identical in every "
          f"repeat: {'yes' if all(r['tokens identical'] == 'yes' for r in share) else 'NO'}; logprobs identical: "
          f"{'yes' if all(r['logprobs identical'] == 'yes' for r in share) else 'NO'}")
    return share


def loop_tables(rows: list[dict], args, url: str, compiles: float) -> None:
    """The GRPO loop's tables: per iteration and the summary; programs compiled while timed."""
    cols = ["iter", "weight_version in answers", "ok", "gen s", "steps", "engine s", "swap s", "server load s",
            "idle/other s", "flush tries", "rollouts/s", "tokens", "tokens/s", "loop rollouts/s", "changed",
            "ckpt write s (not serving)"]
    print_table(rows, cols, "GRPO loop (per iteration)")
    mean = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
    total = sum(r["gen s"] + r["swap s"] + r["idle/other s"] for r in rows)
    summary = {"iterations": len(rows), "gen s": mean("gen s"), "swap s": mean("swap s"),
               "idle/other s": mean("idle/other s"),
               "gen share": f"{sum(r['gen s'] for r in rows) / total:.0%}",
               "rollouts/s": mean("rollouts/s"), "tokens/s": mean("tokens/s"),
               "loop rollouts/s": sum(args.prompts * args.n for _ in rows) / total,
               "versions ok": "yes" if all(r["ok"] == "yes" for r in rows) else "NO"}
    print_table([summary], list(summary), "summary (means over iterations; loop = gen + swap + idle)")
    after = scrape(url, {}).get("dllm_compiles_total", 0)
    print(f"programs compiled during the timed part: {after - compiles:.0f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF safetensors dir (default: the bench model, written to a temp dir; "
                   "with --quick: the tiny test fixture)")
    p.add_argument("--prompts", type=int, default=None, help="P prompts per iteration (default 8; --quick 4)")
    p.add_argument("--n", type=int, default=None, help="samples per prompt (default 8; --quick 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="G (default 128; --quick 32)")
    p.add_argument("--iterations", type=int, default=None, help="timed iterations (default 3; --quick 2; 0: only the group-sharing table)")
    p.add_argument("--repeats", type=int, default=None, help="group-sharing repeats (default 3; --quick 6)")
    p.add_argument("--first-arm", type=int, default=0, choices=(0, 1, 2),
                   help="group-sharing table: the arm the first repeat starts with (0 group, 1 independent, 2 not shared)")
    p.add_argument("--mesh", default=None)
    p.add_argument("--dtype", default=None, help="the server's --dtype (default: the checkpoint's)")
    p.add_argument("--noise", type=float, default=0.01, help="per-step noise, x each matrix's std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny settings: tiny fixture, 4 x 4, 32 tokens, 2 iterations")
    args = p.parse_args(argv)
    quick = dict(prompts=4, n=4, max_new_tokens=32, iterations=2, repeats=6)
    full = dict(prompts=8, n=8, max_new_tokens=128, iterations=3, repeats=3)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    with tempfile.TemporaryDirectory(prefix="rollout-") as tmp_:
        tmp = Path(tmp_)
        if args.model:
            model, label = Path(args.model), args.model
        elif args.quick:
            model, label = TINY, "tiny fixture (tests/fixtures/llada_tiny/model)"
        else:
            from benchmarks import bench_model

            model, label = bench_model.write(tmp / "bench"), "bench model (benchmarks/bench_model.py, random, 25.6M)"
        config = json.loads((model / "config.json").read_text())
        dev = device()
        trainer = Trainer(model, tmp, args.noise, seed=args.seed)
        proc, url, log = start(args, str(model), tmp)
        try:
            card = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]
            ps = prompts(args.prompts, config, args.seed)
            seeds = [1000 * (i + 1) for i in range(args.prompts)]  # group i: seeds 1000(i+1) ... + n - 1
            print(f"model: {label} ({card['family']}, mesh {card['mesh']}, server dtype {args.dtype or 'checkpoint'})")
            print(f"device: {dev}")
            print(f"P {args.prompts} prompts x n {args.n} samples = {args.prompts * args.n} rollouts per iteration, "
                  f"G max_new_tokens {args.max_new_tokens}, T 1.0, return_logprob, prompt tokens "
                  f"{min(map(len, ps))}-{max(map(len, ps))}, iterations {args.iterations}, repeats {args.repeats}, "
                  f"noise {args.noise} x std per step")
            d = card["defaults"]
            print("algorithm defaults: " + ", ".join(f"{k} {d[k]}" for k in ("algorithm", "block_length", "threshold",
                                                                            "factor", "remasking", "early_stop")))
            t0 = time.perf_counter()
            passes = warm(url, [body(ps[0], 1, 0, args.max_new_tokens)])
            with httpx.Client(base_url=url, timeout=3600) as http:  # iteration 0: installs version "1"
                update_cycle(http, trainer.step(1), "1")
            compiles = scrape(url, {}).get("dllm_compiles_total", 0)
            print(f"warm-up (iteration 0, untimed): {time.perf_counter() - t0:.1f} s, {passes} pass(es), "
                  f"{compiles:.0f} programs compiled")
            rows = loop(url, trainer, ps, seeds, args)
            if rows:
                loop_tables(rows, args, url, compiles)
            shared_table(args, str(model), tmp, url, ps, seeds, trainer.written[-1])
        except BaseException:
            print(f"server log: the last lines of {log}:\n" + "".join(open(log).readlines()[-30:]), file=sys.stderr)
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
