"""Where a demo-model candidate's counts go wrong when it decodes them.

    python -m benchmarks.demo_counts PATH                       # 255 held-out + 255 training counts
    python -m benchmarks.demo_counts PATH --trace "Count from 20 to 35."

Three views, all at T=0:

- **Outcomes** at the server's defaults (dual cache, threshold 0.9, canvas 128, block 32, early
  stop, batch 16; ``dllm_jax.demo.evaluate``), on the held-out counts and as many training counts
  (seed 0): exact, *late* (every number right up to b, then more), *early* (right as far as it
  goes, stops before b) or *content* (a wrong number), split by whether a starts with one digit
  and whether the reply fits one 32-token block; and how many are exact per length b - a + 1.
- **The length at the first step**: with the whole reply masked (the state block decoding
  starts from), the first position whose argmax is ``<|eot_id|>`` or ``<|endoftext|>`` against
  the reply's true length, in tokens (how well the model knows where the count ends before any
  of it is written).
- ``--trace``: a plain threshold-0.9 loop (no cache, block 32) that prints, step by step, which
  positions it unmasks and with what confidence.
"""

from __future__ import annotations

import argparse
import collections
import random

import jax
import numpy as np

from dllm_jax.checkpoint import load
from dllm_jax.demo import evaluate, tasks
from dllm_jax.demo.tokenizer import EOS, EOT, MASK, reply_ids


def outcome(reply: str, a: int, b: int) -> str:
    got = [x.strip() for x in reply.strip().split(",")]
    want = [str(i) for i in range(a, b + 1)]
    n = 0
    while n < min(len(got), len(want)) and got[n] == want[n]:
        n += 1
    return "exact" if got == want else "late" if n == len(want) else "early" if n == len(got) else "content"


def outcomes(model, examples) -> tuple[collections.Counter, collections.Counter]:
    """((group, outcome) counts, (length b - a + 1, exact) counts)."""
    replies = evaluate.run(model, examples, batch=16).replies
    out, by_length = collections.Counter(), collections.Counter()
    for e, rep in zip(examples, replies, strict=True):
        a, b = tasks.count_bounds(e.prompt)
        blocks = "one block" if len(reply_ids(model.tokenizer, e.reply)) <= 32 else "two blocks"
        kind = outcome(rep, a, b)
        out[(f"a {'<' if a < 10 else '>='} 10, {blocks}", kind)] += 1
        by_length[(b - a + 1, kind == "exact")] += 1
    return out, by_length


def first_step_length(model, examples) -> collections.Counter:
    """argmax length - true length (tokens, the reply's <|eot_id|> excluded), the whole reply masked."""
    tok, out = model.tokenizer, collections.Counter()
    for e in examples:
        prompt, reply = evaluate.chat_ids(tok, e.prompt), reply_ids(tok, e.reply)
        arg = np.asarray(model.logits(np.asarray([prompt + [MASK] * 128]))[0, len(prompt):]).argmax(-1)
        end = next((j for j, t in enumerate(arg) if t in (EOT, EOS)), 128)
        out[end - (len(reply) - 1)] += 1
    return out


def trace(model, question: str, threshold: float = 0.9, block: int = 32) -> None:
    tok = model.tokenizer
    prompt = evaluate.chat_ids(tok, question)
    ids, start = np.array(prompt + [MASK] * 128), len(prompt)
    print(f"== {question}")
    for k in range(128 // block):
        lo, hi = start + block * k, start + block * (k + 1)
        while (ids[lo:hi] == MASK).any():
            p = np.asarray(jax.nn.softmax(model.logits(ids[None])[0], -1))
            conf, arg = p.max(-1), p.argmax(-1)
            masked = [i for i in range(lo, hi) if ids[i] == MASK]
            pick = [i for i in masked if conf[i] > threshold] or [max(masked, key=lambda i: conf[i])]
            ids[pick] = arg[pick]
            shown = " ".join(f"{i - start}:{tok.decode([int(arg[i])])!r}({conf[i]:.2f})" for i in pick if arg[i] != EOS)
            print(f"  step: {shown} +{sum(int(arg[i] == EOS) for i in pick)} pads")
        if (ids[lo:hi] == EOT).any():
            break
    print("  =>", repr(tok.decode([int(t) for t in ids[start:] if t not in (EOS, MASK)])))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path")
    ap.add_argument("--n", type=int, default=255, help="counts per set")
    ap.add_argument("--trace", nargs="+", default=None, help="questions to trace instead")
    args = ap.parse_args(argv)
    model = load(args.path)
    if args.trace:
        for q in args.trace:
            trace(model, q)
        return
    sets = {"held-out": tasks.held_out_counts(args.n, seed=0),
            "training": random.Random(0).sample(tasks.counts(False), args.n)}
    for name, examples in sets.items():
        out, by_length = outcomes(model, examples)
        total = collections.Counter()
        for (_, kind), n in out.items():
            total[kind] += n
        print(f"# {args.path}: {name} counts (n={len(examples)}), server defaults")
        print("| group | exact | late | early | content |\n|---|---:|---:|---:|---:|")
        for group in sorted({g for g, _ in out}) + ["all"]:
            row = total if group == "all" else {k: out[(group, k)] for k in ("exact", "late", "early", "content")}
            print(f"| {group} | " + " | ".join(str(row.get(k, 0)) for k in ("exact", "late", "early", "content")) + " |")
        print("exact by length (numbers in the count): " + ", ".join(
            f"{n}: {by_length[(n, True)]}/{by_length[(n, True)] + by_length[(n, False)]}"
            for n in sorted({n for n, _ in by_length})))
        probed = examples[:128]
        lengths = first_step_length(model, probed)
        exact, near = lengths[0], sum(n for d, n in lengths.items() if abs(d) <= 2)
        print(f"first-step length ({len(probed)} of them): exact {exact}, within 2 tokens {near}, "
              f"median error {np.median([d for d, n in lengths.items() for _ in range(n)]):+.0f} tokens\n", flush=True)


if __name__ == "__main__":
    main()
