"""Scoring cost: chain-rule positions per second of ``Model.score`` (lm-eval loglikelihood).

    python -m benchmarks.score_bench [--model DIR] [--lengths 32 64 128] [--sequences 4] [--dtype float32]

Default model: the benchmark model (``benchmarks.bench_model``, random LLaDA d512 x 8 layers),
written to a temporary dir. Each sequence of length L costs L - 1 forwards of length L (one
per scored position); the table gives scored positions/s and the forward tokens/s behind them
(median of 3 timed runs after a warm-up, same process, same inputs).
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
    args = ap.parse_args(argv)

    import dllm_jax
    from benchmarks import bench_model

    path = args.model or bench_model.write(tempfile.mkdtemp(prefix="score-bench-"))
    m = dllm_jax.load(path, dtype=args.dtype)
    rng = np.random.default_rng(0)
    rows = []
    for length in args.lengths:
        seqs = [rng.integers(0, 256, size=length).tolist() for _ in range(args.sequences)]
        m.score(seqs, top_k=args.top_k)  # compile
        t, _ = median_time(lambda: m.score(seqs, top_k=args.top_k), args.repeats)
        positions = args.sequences * (length - 1)
        rows.append({"model": f"{m.spec.param_count() / 1e6:.1f}M {m.family}", "dtype": args.dtype,
                     "sequences": args.sequences, "length": length, "top_k": args.top_k,
                     "scored positions": positions, "median s": t, "positions/s": positions / t,
                     "forward tokens/s": positions * length / t, "device": device_description()})
    print_table(rows, ["model", "dtype", "sequences", "length", "top_k", "scored positions", "median s",
                       "positions/s", "forward tokens/s", "device"], title="Model.score (chain rule)")


if __name__ == "__main__":
    main()
