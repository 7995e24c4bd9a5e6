"""Quality vs speed of every sampling algorithm on the demo model (Fast-dLLM / dInfer layout).

For each algorithm the server offers and each transfer schedule — the fixed schedule (one
token per step: steps = gen_length), confidence threshold 0.7 / 0.8 / 0.9 / 0.95 and the
factor rule 1-4, the EB-Sampler's entropy bound 0.05 / 0.15 / 0.5 / 1 / 2 (the dInfer decoders
take thresholds, and dinfer_blockwise / dinfer_credit the entropy bound too), multi-block decoding
(threshold 0.9 with block_add_threshold 0.1 / 0.25 / 0.5 / 0.75, threshold 0.95 and entropy bound
0.15 with 0.25; not on the dInfer decoders) — at batch 1 and
batch 16, on the
held-out additions and the held-out counts: exact-match accuracy ("count to b": the reply starts
with the right count, whether or not it stopped after b), mean NFE per request,
tokens per forward, wall time and tokens/s. T=0, canvas 128, block 32, early stop (the
server's defaults).

    python -m benchmarks.quality                       # the full table (~25 min on 2 cores)
    python -m benchmarks.quality --quick               # thresholds 0.9 + fixed only, fewer examples
    python -m benchmarks.quality --algorithms dual_cache --batch 16 --json out.json
    python -m benchmarks.quality --algorithms dual_cache --batch 16 --schedules "threshold 0.9" "entropy bound"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

CACHE_ALGORITHMS = ("basic", "no_cache", "prefix_cache", "dual_cache")
DINFER = ("dinfer_blockwise", "dinfer_hierarchy", "dinfer_credit")
EB_DINFER = ("dinfer_blockwise", "dinfer_credit")  # the dInfer decoders that take an entropy bound
THRESHOLDS = (0.7, 0.8, 0.9, 0.95)
FACTORS = (1.0, 2.0, 3.0, 4.0)
ENTROPY_BOUNDS = (0.05, 0.15, 0.5, 1.0, 2.0)  # the EB-Sampler's gamma (SGLang's default: 0.15)
BLOCK_ADDS = (0.1, 0.25, 0.5, 0.75)  # multi-block decoding's block_add_threshold (d3LLM's LLaDA runs: 0.1)


def schedules(algorithm: str, quick: bool):
    """(label, sampling kwargs) of every schedule the algorithm takes."""
    thresholds = (0.9,) if quick else THRESHOLDS
    out = [] if algorithm in DINFER else [("fixed", {"threshold": None})]
    out += [(f"threshold {t}", {"threshold": t}) for t in thresholds]
    if algorithm not in DINFER and not quick:
        out += [(f"factor {f:g}", {"threshold": None, "factor": f}) for f in FACTORS]
    if algorithm not in DINFER or algorithm in EB_DINFER:
        bounds = (0.15,) if quick else ENTROPY_BOUNDS
        out += [(f"entropy bound {g:g}", {"threshold": None, "entropy_bound": g}) for g in bounds]
    if algorithm not in DINFER:  # multi-block decoding: the next block starts at a share of this one
        out += [(f"multi-block thr 0.9 add {a:g}", {"threshold": 0.9, "block_add_threshold": a})
                for a in ((0.25,) if quick else BLOCK_ADDS)]
        if not quick:
            out += [("multi-block thr 0.95 add 0.25", {"threshold": 0.95, "block_add_threshold": 0.25}),
                    ("multi-block eb 0.15 add 0.25", {"threshold": None, "entropy_bound": 0.15,
                                                      "block_add_threshold": 0.25})]
    return out


@dataclasses.dataclass
class Row:
    algorithm: str
    schedule: str
    batch: int
    task: str
    n: int
    accuracy: float
    prefix_accuracy: float
    nfe: float
    tokens_per_forward: float
    wall_s: float
    tokens_per_s: float


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: dllm_jax.DEMO_MODEL)")
    ap.add_argument("--algorithms", nargs="+", default=list(CACHE_ALGORITHMS + DINFER))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--add", type=int, default=96, help="held-out additions at batch >= 16 (of 948)")
    ap.add_argument("--count", type=int, default=32, help="held-out counts at batch >= 16 (of 255)")
    ap.add_argument("--small", type=int, default=4, help="at batch 1 use 1/small as many examples")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--schedules", nargs="+", default=None,
                    help="only schedules whose label starts with one of these (e.g. 'fixed' 'entropy bound')")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax

    import dllm_jax
    from benchmarks.common import device_description
    from dllm_jax.demo import evaluate, tasks

    model = dllm_jax.load(args.model or dllm_jax.DEMO_MODEL)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
    if args.quick:
        args.add, args.count = min(args.add, 48), min(args.count, 16)
    sets = {"add": tasks.held_out_additions(args.add, seed=1), "count": tasks.held_out_counts(args.count, seed=1)}
    d = evaluate.SERVER_DEFAULTS
    print(f"# model: {args.model or 'dllm_jax.DEMO_MODEL'} ({n_params / 1e6:.2f}M params, {model.dtype}); "
          f"device: {device_description()}")
    print(f"# gen_length {d['gen_length']}, block {d['block_length']}, T=0, early stop; prompts "
          f"{min(len(evaluate.chat_ids(model.tokenizer, e.prompt)) for s in sets.values() for e in s)}-"
          f"{max(len(evaluate.chat_ids(model.tokenizer, e.prompt)) for s in sets.values() for e in s)} tokens; "
          f"held-out additions n={len(sets['add'])}, counts n={len(sets['count'])} at batch>1 "
          f"(1/{args.small} of them at batch 1); wall = all requests of the set, after a warm-up call")
    print()
    print("| algorithm | schedule | batch | add acc | count acc | count to b | add NFE | count NFE | add tok/fwd "
          "| count tok/fwd | wall s | tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for algorithm in args.algorithms:
        for label, kwargs in schedules(algorithm, args.quick):
            if args.schedules and not any(label.startswith(s) for s in args.schedules):
                continue
            for batch in args.batch:
                res = {}
                for task, examples in sets.items():
                    if batch == 1:
                        examples = examples[: max(len(examples) // args.small, 1)]
                    r = evaluate.run(model, examples, batch=batch, algorithm=algorithm, **kwargs)
                    res[task] = r
                    rows.append(Row(algorithm, label, batch, task, r.n, r.accuracy, r.prefix_accuracy, r.nfe, r.tokens_per_forward,
                                    r.wall_s, r.tokens_per_s))
                a, c = res["add"], res["count"]
                wall = a.wall_s + c.wall_s
                toks = a.tokens_per_s * a.wall_s + c.tokens_per_s * c.wall_s
                print(f"| {algorithm} | {label} | {batch} | {a.accuracy:.1%} | {c.accuracy:.1%} | {c.prefix_accuracy:.1%} | "
                      f"{a.nfe:.1f} | "
                      f"{c.nfe:.1f} | {a.tokens_per_forward:.2f} | {c.tokens_per_forward:.2f} | {wall:.2f} | "
                      f"{toks / wall:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model or "demo", "params": n_params, "device": device_description(),
                       "rows": [dataclasses.asdict(r) for r in rows], "time": time.time()}, f, indent=1)


if __name__ == "__main__":
    main()
