"""GPU benchmark: full-size random LLaDA-8B (bf16), dual cache, throughput and % of matmul peak.

Needs only what a CUDA JAX install has (jax, flax, orbax-checkpoint, numpy; transformers is
not used). Runs unattended; ``benchmarks/gpu.sh`` wraps it. Steps:

1. a float32 parity check of the sampler on the tiny golden fixture (highest precision),
2. the bf16 matmul peak of this device (8192^3),
3. per batch size: generation with the chosen algorithm, median wall time, tokens/s,
   requests/s, model FLOPs and the fraction of the measured peak.

    python -m benchmarks.gpu_bench --batches 1,8,32,64 --gen 256 --block 32 --prompt 128
    python -m benchmarks.gpu_bench --shape tiny --batches 1,2 --gen 64   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def parity_check() -> str:
    """Golden LLaDA cases on this device in float32 (matmul precision 'highest')."""
    import jax

    import dllm_jax

    fixture = ROOT / "tests" / "fixtures" / "llada_tiny"
    if not fixture.exists():
        return "parity: fixture not found, skipped"
    with jax.default_matmul_precision("highest"):
        m = dllm_jax.load(fixture / "model", dtype="float32")
        cases = json.loads((fixture / "golden_generate.json").read_text())["cases"]
        passed = 0
        for c in cases:
            args = {k: v for k, v in c["args"].items() if k != "mask_id"}
            prompts = c["prompt_ids"]
            if c["attention_mask"] is not None:
                prompts = [[t for t, k in zip(p, a) if k] for p, a in zip(prompts, c["attention_mask"])]
            out = m.generate(prompts, algorithm="basic", **args)
            passed += bool(np.array_equal(out.tokens, np.array(c["generated_ids"]))) and out.nfe == c["num_model_calls"]
    return f"parity (float32, highest precision): {passed}/{len(cases)} golden LLaDA cases token- and NFE-identical"


def row_flops(spec, nfe_per_row, *, algorithm: str, prompt: int, gen: int, block: int, window: int | None = None) -> float:
    """Model FLOPs of a generation, summed over rows from each row's own forward count.

    Not from the batch's forward count: a cached decoder refreshes its rows in gathered chunks, each
    one a batch forward, so that count exceeds any row's. ``basic``/``no_cache`` forward the whole
    canvas every time; the cached decoders forward the whole canvas once per block (the refresh) and
    the block's positions otherwise (``window``: the positions a forward reads out, two blocks with
    multi-block decoding; default ``block``).
    """
    from benchmarks.common import forward_flops

    length, blocks, window = prompt + gen, gen // block, window or block
    full = forward_flops(spec, batch=1, q_tokens=length, kv_len=length, head_positions=window)
    if algorithm in ("basic", "no_cache"):
        return float(sum(int(n) * full for n in nfe_per_row))
    q = window if algorithm == "dual_cache" else block  # (prefix_cache: an estimate of the block's share)
    cached = forward_flops(spec, batch=1, q_tokens=q, kv_len=length, head_positions=window)
    return float(sum(min(int(n), blocks) * full + max(int(n) - blocks, 0) * cached for n in nfe_per_row))


def quick_random_model(config, dtype):
    """Random weights made leaf by leaf: one small program per distinct (shape, dtype, sharding).

    ``Model.random`` initialises the whole module in one program; on a GPU its compile for the
    full 8B shape alone outlasted the benchmark's time limit. Timing needs only the shapes: N(0, 0.02)
    matrices and unit norm scales.
    """
    import jax

    import dllm_jax
    from dllm_jax.model import abstract_params
    from dllm_jax.sharding import mesh_or_default

    mesh = mesh_or_default(None)
    graphdef, abstract = abstract_params(config, dtype, mesh)
    programs = {}

    def make(key, sds):
        sig = (sds.shape, sds.dtype, sds.sharding)
        if sig not in programs:
            init = (lambda k: jax.numpy.ones(sds.shape, sds.dtype)) if sds.ndim == 1 else \
                (lambda k: (0.02 * jax.random.normal(k, sds.shape, jax.numpy.float32)).astype(sds.dtype))
            programs[sig] = jax.jit(init, out_shardings=sds.sharding)
        return programs[sig](key)

    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = jax.tree.unflatten(treedef, [make(k, sds) for k, sds in zip(keys, leaves)])
    return dllm_jax.Model(config, graphdef, params, mesh=mesh, source="random(leaf by leaf)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["llada_8b", "nemotron_4b", "tiny"], default="llada_8b")
    ap.add_argument("--algorithm", default="dual_cache")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="default: gen (one token per step)")
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--entropy-bound", type=float, default=None, help="the EB-Sampler's gamma (instead of a threshold)")
    ap.add_argument("--block-add-threshold", type=float, default=None,
                    help="multi-block decoding: the next block starts at this share of the current one")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--skip-parity", action="store_true")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    import dllm_jax
    from benchmarks.common import device_description, matmul_peak, median_time, print_table

    t_start = time.perf_counter()
    print(f"device: {device_description()}", flush=True)
    if not args.skip_parity:
        print(parity_check(), flush=True)
    peak_n = 8192 if jax.devices()[0].platform == "gpu" else 1024
    peak = matmul_peak(args.dtype, n=peak_n)
    print(f"{args.dtype} matmul peak ({peak_n}^3): {peak / 1e12:.1f} TFLOP/s", flush=True)

    config = {"llada_8b": dllm_jax.LLaDAConfig.llada_8b, "nemotron_4b": dllm_jax.NemotronDiffusionConfig.nemotron_4b,
              "tiny": dllm_jax.LLaDAConfig.tiny}[args.shape]()
    t0 = time.perf_counter()
    model = quick_random_model(config, getattr(jnp, args.dtype))
    jax.block_until_ready(model.params)
    spec = model.spec
    print(f"model: random {args.shape} {spec.param_count() / 1e9:.2f}B params {args.dtype} "
          f"(init {time.perf_counter() - t0:.1f}s)", flush=True)

    steps = args.steps or args.gen
    kw = dict(algorithm=args.algorithm, gen_length=args.gen, block_length=args.block, steps=steps)
    if args.threshold is not None:
        kw["threshold"] = args.threshold
    if args.entropy_bound is not None:
        kw["entropy_bound"] = args.entropy_bound
    if args.block_add_threshold is not None:
        kw["block_add_threshold"] = args.block_add_threshold
    if args.algorithm == "static_block":
        kw.pop("steps")
    rng = np.random.default_rng(0)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = rng.integers(0, min(config.mask_token_id, 30000), size=(batch, args.prompt))
        try:
            t0 = time.perf_counter()
            out = model.generate(prompts, **kw)  # compile + first run
            first = time.perf_counter() - t0
            t, _ = median_time(lambda: model.generate(prompts, **kw), args.repeats)  # (same tokens and counts as out)
        except Exception as e:  # e.g. out of memory at the largest batch: report and go on
            print(f"batch {batch}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=1)
            continue
        window = 2 * args.block if args.block_add_threshold is not None and args.gen > args.block else args.block
        flops = row_flops(spec, out.nfe_per_row, algorithm=args.algorithm, prompt=args.prompt, gen=args.gen,
                          block=args.block, window=window)
        stats = jax.devices()[0].memory_stats() or {}  # (None on CPU)
        peak_gb = stats.get("peak_bytes_in_use", float("nan")) / 2 ** 30
        rule = f"EB {args.entropy_bound:g}" if args.entropy_bound is not None else \
            (f"threshold {args.threshold:g}" if args.threshold is not None else "fixed")
        if args.block_add_threshold is not None:
            rule += f", next block at {args.block_add_threshold:g}"
        rows.append({"model": args.shape, "dtype": args.dtype, "algorithm": args.algorithm, "rule": rule, "batch": batch,
                     "prompt": args.prompt, "gen": args.gen, "block": args.block, "steps": steps,
                     "NFE": out.nfe, "first call s": first, "median s": t, "tokens/s": batch * args.gen / t,
                     "requests/s": batch / t, "ms/NFE": 1e3 * t / out.nfe, "TFLOP/s": flops / t / 1e12,
                     "% of peak": 100 * flops / t / peak, "peak GiB (process)": peak_gb})
        print(f"batch {batch}: first call {first:.1f}s, {t:.2f}s median, {batch * args.gen / t:.0f} tokens/s, "
              f"{100 * flops / t / peak:.1f}% of peak, batch forwards {out.nfe}", flush=True)
    print_table(rows, ["model", "dtype", "algorithm", "rule", "batch", "prompt", "gen", "block", "steps", "NFE",
                       "first call s", "median s", "tokens/s", "requests/s", "ms/NFE", "TFLOP/s", "% of peak",
                       "peak GiB (process)"],
                title=f"GPU benchmark on {device_description()}, peak {peak / 1e12:.0f} TFLOP/s ({args.dtype})")
    print(f"total wall time {time.perf_counter() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
