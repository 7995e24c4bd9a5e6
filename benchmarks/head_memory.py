"""Peak memory and step time of one step program at LLaDA's real vocabulary: today's full head
([B, Lb, V] float32 logits) vs the lean chunked head (issue 26; docs/performance.md "The lean head").

Random weights of a small-depth LLaDA shape with V = 126,464 (``mid-vocab``: d_model 512; ``--d-model``
and ``--layers`` change it), dual cache, threshold 0.9, greedy rows (the evaluation workload), prompt
bucket 64, gen 256, block 32. Per batch (a fresh subprocess) and head:

* XLA's memory analysis of the compiled step program (``jit(...).lower(...).compile()
  .memory_analysis()``): temp + argument + output bytes, and temp alone (the buffers the program
  itself allocates: the logits and what the head and the proposal build from them);
* measured RSS: the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs
  once the program is compiled and the rows admitted) during its first two steps (the block-start
  refresh and a cached step) above its RSS before them, in a process where no other head has run
  a step (a second process per batch: the allocator keeps freed pages);
* step time: median of ``--repeats`` one-step calls, the heads' calls interleaved (cached steps:
  the first, refreshing, step is the warm-up).

    python -m benchmarks.head_memory                     # batch 1 / 16 / 64, full vs lean
    python -m benchmarks.head_memory --batches 1 16 --repeats 2
    python -m benchmarks.head_memory --temperature 0.8   # seeded T > 0 rows (no filters: lean-ok)
    python -m benchmarks.head_memory --batches 1 16 --repeats 2 --temperature 0.8 --top-k 50   # filtered rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HEADS = ("full", "lean")


def _vm(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def measure(args) -> list[dict]:
    """One batch size in this process, every head: memory analysis, RSS high-water, step time
    (the heads' timed steps interleaved, so a busy host slows them alike)."""
    import dataclasses
    import statistics
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    import dllm_jax
    from dllm_jax.sampling import DecodeSession, Row, SamplingParams, program_key

    config = dataclasses.replace(dllm_jax.LLaDAConfig.llada_8b(), d_model=args.d_model, n_layers=args.layers,
                                 n_heads=args.d_model // 128, n_kv_heads=args.d_model // 128,
                                 mlp_hidden_size=args.d_model * 11 // 4, max_sequence_length=1024)
    model = dllm_jax.Model.random(config, seed=0, dtype=getattr(jnp, args.dtype))
    params = SamplingParams(algorithm="dual_cache", gen_length=args.gen, block_length=args.block, threshold=0.9,
                            steps=args.gen, temperature=args.temperature, seed=1, top_k=args.top_k,
                            min_p=args.min_p).resolve("llada")
    prompts = np.random.default_rng(0).integers(0, 100000, (args.batch, args.prompt)).tolist()
    sessions, out = {}, {}
    for head in args.heads:
        key = program_key(model, args.prompt, params, args.batch)
        if "lean_head" in {f.name for f in dataclasses.fields(key)}:  # (absent before the lean head: --heads full)
            key = dataclasses.replace(key, lean_head=head == "lean")
        session = sessions[head] = DecodeSession(model, key)
        mem = session.program.lower(model.params, session.state, jnp.int32(1), jnp.bool_(False)).compile() \
            .memory_analysis()
        session.step(1, exit_on_done=False)  # no rows yet: compiles, runs no model call
        jax.block_until_ready(session.state)
        session.admit({i: Row(prompts[i], params) for i in range(args.batch)})
        first = head == args.heads[0]  # RSS: before any step with rows has run in this process
        if first:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := the current RSS
            before = _vm("VmRSS")
        for _ in range(2 if first else 1):  # the block-start refresh of every row, then a cached step
            session.step(1, exit_on_done=False)
            jax.block_until_ready(session.state)
        out[head] = {"head": head, "batch": args.batch, "xla_temp_mb": mem.temp_size_in_bytes / 2**20,
                     "xla_peak_mb": (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                     + mem.output_size_in_bytes) / 2**20}
        if first:
            out[head]["rss_mb"] = (_vm("VmHWM") - before) / 2**20
    times = {head: [] for head in sessions}
    for _ in range(args.repeats):
        for head, session in sessions.items():
            t0 = time.perf_counter()
            session.step(1, exit_on_done=False)
            jax.block_until_ready(session.state)
            times[head].append(time.perf_counter() - t0)
    for head in sessions:
        if times[head]:
            out[head]["step_s"] = statistics.median(times[head])
    return list(out.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.0, help="the rows' temperature (seeded)")
    p.add_argument("--top-k", type=int, default=0, help="the rows' top_k filter (0: off; <= 64 runs lean)")
    p.add_argument("--min-p", type=float, default=0.0, help="the rows' min_p filter (0: off)")
    p.add_argument("--one", action="store_true", help="(internal) measure one case, print JSON")
    p.add_argument("--batch", type=int, help="(internal) with --one")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args)))
        return

    from benchmarks.common import device_description, print_table

    rows = []
    for batch in args.batches:
        measured = []
        for i in range(len(args.heads)):  # each head's RSS from a process where it steps first
            heads = args.heads[i:] + args.heads[:i]
            cmd = [sys.executable, "-m", "benchmarks.head_memory", "--one", "--batch", str(batch), "--heads", *heads,
                   "--d-model", str(args.d_model), "--layers", str(args.layers), "--dtype", args.dtype,
                   "--prompt", str(args.prompt), "--gen", str(args.gen), "--block", str(args.block),
                   "--temperature", str(args.temperature), "--top-k", str(args.top_k), "--min-p", str(args.min_p),
                   "--repeats", str(args.repeats if i == 0 else 0)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
            measured.append({r["head"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])})
        for head in args.heads:
            row = measured[0][head]
            row["rss_mb"] = next(m[head]["rss_mb"] for m in measured if "rss_mb" in m[head])
            rows.append(row)
    for r in rows:
        full = next((q for q in rows if q["batch"] == r["batch"] and q["head"] == "full"), None)
        if full is not None and r["head"] == "lean":
            r["peak vs full"] = f"{r['xla_peak_mb'] / full['xla_peak_mb']:.2f}x"
            r["time vs full"] = f"{r['step_s'] / full['step_s']:.2f}x"
    print(f"# {device_description()}; LLaDA shape d_model {args.d_model}, {args.layers} layers, vocab 126464, "
          f"{args.dtype}, random weights; dual_cache threshold 0.9, T = {args.temperature:g}, "
          f"top_k {args.top_k}, min_p {args.min_p:g}; prompt {args.prompt}, gen {args.gen}, "
          f"block {args.block}; step time: median of {args.repeats} cached steps")
    print_table(rows, ["batch", "head", "xla_peak_mb", "xla_temp_mb", "peak vs full", "rss_mb", "step_s",
                       "time vs full"])


if __name__ == "__main__":
    main()
