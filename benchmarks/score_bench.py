"""Scoring cost: chain-rule positions per second of ``Model.score`` (lm-eval loglikelihood).

    python -m benchmarks.score_bench [--model DIR] [--lengths 32 64 128] [--sequences 4] [--dtype float32]
    python -m benchmarks.score_bench --mid-vocab --lengths 32 128 --sequences 2   # LLaDA's 126,464-token vocabulary

Default model: the benchmark model (``benchmarks.bench_model``, random LLaDA d512 x 8 layers),
written to a temporary dir. Each sequence of length L costs L - 1 forwards of length L (one
per scored position); the table gives scored positions/s and the forward tokens/s behind them
(median of 3 timed runs after a warm-up, same process, same inputs), and the memory XLA's analysis
gives the compiled scoring program of one call (temp: the buffers it allocates itself, e.g. the
head's logits; peak: temp + arguments + outputs). ``--mid-vocab``: random weights of a small-depth
LLaDA shape with V = 126,464 (d_model 512, 2 layers, as ``benchmarks.head_memory``), where the
head's [rows, V] float32 logits are what a call's memory is made of.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from benchmarks.common import device_description, median_time, print_table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mid-vocab", action="store_true", help="random d512 x 2-layer LLaDA at V = 126,464")
    args = ap.parse_args(argv)

    import dataclasses

    import jax.numpy as jnp

    import dllm_jax
    from benchmarks import bench_model

    if args.mid_vocab:
        config = dataclasses.replace(dllm_jax.LLaDAConfig.llada_8b(), d_model=512, n_layers=2, n_heads=4, n_kv_heads=4,
                                     mlp_hidden_size=1408, max_sequence_length=1024)
        m = dllm_jax.Model.random(config, seed=0, dtype=getattr(jnp, args.dtype))
    else:
        m = dllm_jax.load(args.model or bench_model.write(tempfile.mkdtemp(prefix="score-bench-")), dtype=args.dtype)
    rng = np.random.default_rng(0)
    rows = []
    for length in args.lengths:
        seqs = [rng.integers(0, 256, size=length).tolist() for _ in range(args.sequences)]
        m.score(seqs, top_k=args.top_k)  # compile
        t, _ = median_time(lambda: m.score(seqs, top_k=args.top_k), args.repeats)
        positions = args.sequences * (length - 1)
        temp, peak = program_memory(m, length, args.sequences * (length - 1), args.top_k)
        rows.append({"model": f"{m.spec.param_count() / 1e6:.1f}M {m.family}, V {m.spec.vocab}", "dtype": args.dtype,
                     "sequences": args.sequences, "length": length, "top_k": args.top_k,
                     "scored positions": positions, "median s": t, "positions/s": positions / t,
                     "forward tokens/s": positions * length / t, "program temp MB": temp, "program peak MB": peak,
                     "device": device_description()})
    print_table(rows, ["model", "dtype", "sequences", "length", "top_k", "scored positions", "median s",
                       "positions/s", "forward tokens/s", "program temp MB", "program peak MB", "device"],
                title="Model.score (chain rule)")


def program_memory(m, length: int, positions: int, top_k: int) -> tuple[float, float]:
    """(temp MB, temp + arguments + outputs MB) of the scoring program of one call at this length:
    as many rows as ``score`` puts in a call (``TOKENS_PER_CALL``), bucketed."""
    import jax
    import jax.numpy as jnp

    import importlib

    score_mod = importlib.import_module("dllm_jax.sampling.score")  # (the package exports the function)
    from dllm_jax.sampling.params import MAX_TOP_LOGPROBS, PROMPT_BUCKETS, batch_bucket, bucket

    lp = min(bucket(length, PROMPT_BUCKETS), m.max_length)
    rows = batch_bucket(min(positions, max(1, score_mod.TOKENS_PER_CALL // lp)), m.mesh.shape["data"])
    run, _, _ = score_mod._program(m, lp, rows, MAX_TOP_LOGPROBS if top_k else 0, m.config.shift_logits)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    mem = run.lower(m.params, spec((rows, lp), jnp.int32), spec((rows, lp), jnp.bool_), spec((rows,), jnp.int32),
                    spec((rows,), jnp.int32)).compile().memory_analysis()
    return (mem.temp_size_in_bytes / 2**20,
            (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20)


if __name__ == "__main__":
    main()
