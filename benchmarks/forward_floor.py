"""What the exact ``basic`` loop must cost per request, at best, against dlmserve's forward (issue 23).

    python -m benchmarks.forward_floor                       # tiny fixture and bench model, one core
    python -m benchmarks.forward_floor --models bench --prompts 16 --repeats 7

``basic`` (LLaDA's reference loop) runs the whole canvas through the model at every step: no
position's hidden states can be reused, since every token attends to every other and the
canvas changes at each step. So the CPU a request costs is at least the model forwards of
its steps. This measures those forwards alone, on the peers benchmark's requests
(``benchmarks.peers``: its chat prompts, gen / block / steps, float32, batch 1 = the 1-client
case), for:

- **dlmserve**: the PyTorch forward it serves (``benchmarks/torch_llada_model.py``, the
  remote code ``benchmarks.peers`` gives it) over prompt + gen tokens exactly, logits at every
  position, one torch thread;
- **ours, as served**: our jitted forward at the prompt's bucket (``PROMPT_BUCKETS``) + gen,
  the last block on the block's positions only (``Transformer.hidden(out=...)``, as
  ``BlockProgram.full_step`` runs it) and the head on them;
- **ours, exact length**: the same at prompt + gen tokens exactly (what no prompt-bucket
  rounding would leave: the floor of the exact loop on our kernels);
- **ours, untrimmed, exact length**: every layer and the head on every position, the same
  work as dlmserve's forward (so its ratio is CPU per FLOP, ours against torch's).

Each is the median process CPU-seconds of ``--repeats`` forwards (after a compile / warm call)
times the request's steps, summed over the prompts. The process is pinned to one core
(``--cores``; XLA sizes its thread pool from the affinity, so this is one XLA thread, like
dlmserve's one torch thread) before jax or torch is imported. FLOPs per request come from
``benchmarks.common.forward_flops``. The server adds its host work to these (sampling,
scheduling, HTTP: ~2 % on these models, docs/performance.md "Where the CPU goes"), dlmserve its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

CPUS_HELP = "CPUs to pin to before jax / torch start (default: 0, one core; 'all': no pinning)"


def pin(cores: str) -> None:
    if cores != "all":
        os.sched_setaffinity(0, {int(c) for c in cores.split(",")})


def cpu_median(fn, repeats: int) -> float:
    fn()  # (compile / warm)
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    times.sort()
    return times[len(times) // 2]


def measure_model(name: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import dllm_jax
    from benchmarks.common import forward_flops
    from benchmarks.peers import SETTINGS, chat_prompts, prepare_model
    from benchmarks.torch_llada_model import (
        TorchLLaDA,
        load_config,
        load_fixture_state_dict,
    )
    from dllm_jax.sampling.params import PROMPT_BUCKETS, bucket

    torch.set_num_threads(1)
    model_dir = prepare_model(name, args.models_root)
    gen, block, steps = SETTINGS[name]
    model = dllm_jax.load(str(model_dir), dtype=jnp.float32)
    spec = model.spec
    graphdef = model.graphdef
    theirs = TorchLLaDA.from_state_dict(load_fixture_state_dict(model_dir), load_config(model_dir))

    @jax.jit
    def ours_fn(params, tokens, start):  # the last block and the head on the block's positions
        module = nnx.merge(graphdef, params)
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        x, _ = module.hidden(tokens, positions, jnp.ones((b, 1, t), bool), out=(start, block))
        return module.head(x)

    @jax.jit
    def full_fn(params, tokens):  # every position, like the torch forward
        module = nnx.merge(graphdef, params)
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        return module(tokens, positions, jnp.ones((b, 1, t), bool))

    def ours(length: int, prompt: int) -> float:
        tokens = jnp.full((1, length), model.mask_token_id, jnp.int32)
        start = jnp.asarray([prompt], jnp.int32)
        return cpu_median(lambda: jax.block_until_ready(ours_fn(model.params, tokens, start)), args.repeats)

    def untrimmed(length: int) -> float:
        tokens = jnp.full((1, length), model.mask_token_id, jnp.int32)
        return cpu_median(lambda: jax.block_until_ready(full_fn(model.params, tokens)), args.repeats)

    def torch_cpu(length: int) -> float:
        ids = torch.full((1, length), theirs.mask_token_id, dtype=torch.long)
        with torch.inference_mode():
            return cpu_median(lambda: theirs(ids), args.repeats)

    last, rest = dataclasses.replace(spec, n_layers=1), dataclasses.replace(spec, n_layers=spec.n_layers - 1)

    def trimmed_flops(length: int) -> float:
        return (forward_flops(rest, batch=1, q_tokens=length, kv_len=length, head_positions=0)
                + forward_flops(last, batch=1, q_tokens=block, kv_len=length, head_positions=block))

    cache: dict = {}

    def once(fn, *args):  # (one measurement per distinct shape)
        if (fn, args) not in cache:
            cache[fn, args] = fn(*args)
        return cache[fn, args]

    totals = dict.fromkeys(("dlmserve", "served", "exact", "untrimmed"), 0.0)
    flops = dict.fromkeys(("dlmserve", "served", "exact", "untrimmed"), 0.0)
    lengths = []
    for prompt in chat_prompts(args.prompts):
        n = len(model.chat_prompt([{"role": "user", "content": prompt}]))
        b = bucket(n, PROMPT_BUCKETS)
        lengths.append(n)
        totals["dlmserve"] += steps * once(torch_cpu, n + gen)
        totals["served"] += steps * once(ours, b + gen, b)
        totals["exact"] += steps * once(ours, n + gen, n)
        totals["untrimmed"] += steps * once(untrimmed, n + gen)
        full = forward_flops(spec, batch=1, q_tokens=n + gen, kv_len=n + gen, head_positions=n + gen)
        flops["dlmserve"] += steps * full
        flops["untrimmed"] += steps * full
        flops["served"] += steps * trimmed_flops(b + gen)
        flops["exact"] += steps * trimmed_flops(n + gen)
    k = args.prompts
    return {"model": name, "settings": f"gen {gen} / block {block} / {steps} steps", "prompts": k,
            "lengths": (min(lengths), max(lengths), sum(lengths) / k),
            "cpu": {w: v / k for w, v in totals.items()}, "flops": {w: v / k for w, v in flops.items()},
            "layers": spec.n_layers, "d_model": spec.d_model}


ROWS = [("dlmserve", "dlmserve: torch forward, prompt + gen exactly, logits everywhere"),
        ("served", "ours as served: prompt bucket, last block + head on the block"),
        ("exact", "ours at the exact length (no bucket rounding)"),
        ("untrimmed", "ours, every position, exact length (dlmserve's work)")]


def table(results: list[dict], cores: str) -> None:
    import jax

    print(f"\n# forwards of one `basic` request at batch 1 (the 1-client case); CPU-seconds = median of the "
          f"process CPU time of one forward x steps; cores: {cores}; jax {jax.__version__}")
    for r in results:
        lo, hi, mean = r["lengths"]
        print(f"\n{r['model']} ({r['layers']} layers, d_model {r['d_model']}; {r['settings']}; {r['prompts']} "
              f"prompts of {lo}-{hi} tokens, mean {mean:.0f})\n")
        print("| forwards of one request | CPU-s | vs dlmserve | GFLOP | vs dlmserve | GFLOP per CPU-s |")
        print("|---|---|---|---|---|---|")
        base_cpu, base_flops = r["cpu"]["dlmserve"], r["flops"]["dlmserve"]
        for key, label in ROWS:
            c, f = r["cpu"][key], r["flops"][key]
            print(f"| {label} | {c:.3f} | {c / base_cpu:.2f}x | {f / 1e9:.2f} | {f / base_flops:.2f}x | "
                  f"{f / c / 1e9:.1f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "bench"], choices=["tiny", "bench"])
    p.add_argument("--prompts", type=int, default=None, help="default: 32 (tiny), 16 (bench), as benchmarks.peers")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cores", default="0", help=CPUS_HELP)
    p.add_argument("--models-root", type=Path, default=Path(__file__).resolve().parent.parent / ".peers-venv" / "models")
    args = p.parse_args(argv)
    pin(args.cores)
    results = []
    for name in args.models:
        one = argparse.Namespace(**vars(args))
        one.prompts = args.prompts or (32 if name == "tiny" else 16)
        t = time.monotonic()
        results.append(measure_model(name, one))
        print(f"{name}: measured in {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
    table(results, args.cores)


if __name__ == "__main__":
    main()
