"""Continuous batching through one ``DecodeSession``: the engine's scheduling without HTTP.

    python -m benchmarks.continuous                      # demo model, demo tasks, batch 16
    python -m benchmarks.continuous --batch 16 --requests 256 --threshold 0.9 --out /tmp/a.json
    python -m benchmarks.continuous --compare /tmp/a.json /tmp/b.json   # identical outputs?

A fixed list of requests (the demo workload of ``benchmarks.serve_load --model demo``: held-out
additions and counts, alternating; server defaults: dual cache, threshold 0.9, canvas 128,
block 32, T=0, early stop) flows through B slots: whenever a row is done its slot is released
and the next request is admitted before the next ``step``, which is exactly what the server's
scheduler does. With block-level programs that is at a block boundary; with step-level
programs at any denoising step. Prints tokens/s, requests/s, device calls, batch forwards,
mean batch fill per forward (rows that took part / B) and host time per device call (the
wall time not spent inside ``step``'s device work, measured as wall - device per call), the
median of ``--repeats`` timed passes after one untimed pass.

``--out`` saves every request's tokens so two runs (e.g. before/after a change) can be compared
with ``--compare``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def run_pass(model, prompts, params, batch: int, steps_per_call: int | None = None):
    """All prompts through one session of ``batch`` slots; per-request tokens and counters."""
    from dllm_jax.sampling import DecodeSession, Row, program_key

    key = program_key(model, max(map(len, prompts)), params, batch)
    session = DecodeSession(model, key, **({"steps_per_call": steps_per_call} if steps_per_call else {}))
    waiting = list(range(len(prompts)))
    slot_of: dict[int, int] = {}  # slot -> request
    out: dict[int, list[int]] = {}
    calls, step_s = 0, 0.0
    t0 = time.perf_counter()
    while waiting or slot_of:
        free = [s for s in range(key.batch) if s not in slot_of]
        rows = {}
        for s in free[:len(waiting)]:
            i = waiting.pop(0)
            slot_of[s] = i
            rows[s] = Row(prompts[i], params)
        if rows:
            session.admit(rows)
        t1 = time.perf_counter()
        updates = session.step()
        step_s += time.perf_counter() - t1
        calls += 1
        for u in updates:
            if u.done:
                out[slot_of.pop(u.slot)] = [int(t) for t in u.tokens]
                session.release(u.slot)
    wall = time.perf_counter() - t0
    batch_nfe = int(np.asarray(session.state.batch_nfe))
    steps = int(np.asarray(session.state.batch_steps)) if hasattr(session.state, "batch_steps") else None
    # a call with every slot empty: dispatch, loop exit and the host fetch, no model work
    empty = []
    for _ in range(20):
        t1 = time.perf_counter()
        session.step()
        empty.append(time.perf_counter() - t1)
    return out, {"wall_s": wall, "calls": calls, "batch_nfe": batch_nfe, "steps": steps, "step_s": step_s,
                 "empty_call_ms": 1e3 * statistics.median(empty)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir (default: the demo model)")
    p.add_argument("--workload", choices=("demo", "ragged"), default="demo",
                   help="demo: the demo tasks; ragged: random-token prompts of 16-384 tokens (serve_load's "
                   "bench-model workload)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--algorithm", default="dual_cache")
    p.add_argument("--gen-length", type=int, default=128)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-share-forwards", action="store_true", help="twins run their own block-start forwards")
    p.add_argument("--group", type=int, default=1,
                   help="each prompt repeated this many times in a row (the n samples of one prompt)")
    p.add_argument("--steps-per-call", type=int, default=None, help="step programs: steps per device call")
    p.add_argument("--refresh-rows", type=int, default=None, help="step programs: rows per refresh chunk")
    p.add_argument("--out", help="save per-request tokens (JSON)")
    p.add_argument("--label", default="", help="a name for this run in the table")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two --out files and exit")
    args = p.parse_args(argv)

    if args.compare:
        a, b = (json.load(open(path)) for path in args.compare)
        ta, tb = a["tokens"], b["tokens"]
        same = sum(ta[k] == tb.get(k) for k in ta)
        print(f"identical outputs: {same}/{len(ta)} requests")
        for name, run in (("A", a), ("B", b)):
            print(f"{name}: {run['label']}: {run['tokens_per_s']:.1f} tokens/s")
        print(f"B/A tokens/s: {b['tokens_per_s'] / a['tokens_per_s']:.2f}x")
        raise SystemExit(0 if same == len(ta) else 1)

    import dllm_jax
    from benchmarks.common import device_description
    from benchmarks.serve_load import demo_prompts, make_prompts
    from dllm_jax.sampling import SamplingParams

    model = dllm_jax.load(args.model or dllm_jax.DEMO_MODEL)
    if args.refresh_rows is not None:
        model.programs.refresh_rows = args.refresh_rows
    model.programs.share_forwards = not args.no_share_forwards
    if args.workload == "demo":
        prompts = demo_prompts(args.requests, args.seed, model.tokenizer)
    else:
        avoid = set(model.stop_token_ids) | {model.mask_token_id}
        prompts = make_prompts(args.requests, args.seed, model.spec.vocab, avoid, 384)
    prompts = [q for q in prompts[:-(-args.requests // args.group)] for _ in range(args.group)][:args.requests]
    threshold = None if args.algorithm == "static_block" else args.threshold  # (its own acceptance rule)
    params = SamplingParams(gen_length=args.gen_length, block_length=args.block_length, algorithm=args.algorithm,
                            threshold=threshold, early_stop=True,
                            stop_token_ids=tuple(model.stop_token_ids)).resolve(model.family)
    run_pass(model, prompts[:2 * args.batch], params, args.batch, args.steps_per_call)  # compile + warm up
    passes = []
    for _ in range(args.repeats):
        out, stats = run_pass(model, prompts, params, args.batch, args.steps_per_call)
        passes.append(stats)
    tokens = sum(len(t) for t in out.values())
    wall = statistics.median(s["wall_s"] for s in passes)
    stats = passes[0]
    print(f"# continuous batching: {device_description()}; model {args.model or 'demo'} "
          f"({model.spec.n_layers} layers, d_model {model.spec.d_model}), {np.dtype(model.dtype).name}")
    print(f"# {args.requests} requests ({args.workload} workload, prompts {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"tokens, groups of {args.group}), batch {args.batch}, gen_length {args.gen_length}, block {args.block_length}, "
          f"{args.algorithm}, threshold {threshold}, T=0, early stop; median of {args.repeats} passes")
    print("| run | tokens/s | req/s | wall s | device calls | denoising steps | batch forwards | tokens/forward "
          "| ms/call | empty call ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.label or '-'} | {tokens / wall:.1f} | {args.requests / wall:.2f} | {wall:.2f} | {stats['calls']} | "
          f"{stats['steps'] if stats['steps'] is not None else '-'} | {stats['batch_nfe']} | "
          f"{tokens / max(stats['batch_nfe'], 1):.2f} | {1e3 * stats['step_s'] / stats['calls']:.2f} | "
          f"{stats['empty_call_ms']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"label": args.label, "tokens_per_s": tokens / wall, "wall_s": wall, **stats,
                       "tokens": {str(k): v for k, v in sorted(out.items())}}, f)


if __name__ == "__main__":
    main()
