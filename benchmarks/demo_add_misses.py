"""Where a demo-model candidate's held-out additions go wrong.

    python -m benchmarks.demo_add_misses PATH [PATH ...]

On every held-out addition of ``dllm_jax.demo.tasks`` (the split of the commit it runs at), T=0:
exact match at the server's defaults (dual cache, threshold 0.9, canvas 128, block 32, batch 16),
the misses split by the operands' digits, by whether the units digits carry and by whether the sum
has three digits; the same pairs with the fixed schedule (one token per step); and one forward
with the whole reply masked, every position's argmax at once (what the model knows, whatever the
decoding order).
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

from dllm_jax.checkpoint import load
from dllm_jax.demo import evaluate, tasks
from dllm_jax.demo.tokenizer import MASK, reply_ids


def kinds(a: int, b: int) -> tuple[str, str, str]:
    digits = {0: "1-digit + 1-digit", 1: "1-digit + 2-digit", 2: "2-digit + 2-digit"}[(a >= 10) + (b >= 10)]
    carry = "units carry" if a % 10 + b % 10 >= 10 else "no units carry"
    return digits, carry, "sum >= 100" if a + b >= 100 else "sum < 100"


def one_shot(model, examples) -> float:
    tok, ok = model.tokenizer, 0
    for e in examples:
        prompt, want = evaluate.chat_ids(tok, e.prompt), reply_ids(tok, e.reply)
        arg = np.asarray(model.logits(np.asarray([prompt + [MASK] * 128]))[0, len(prompt):len(prompt) + len(want)])
        ok += arg.argmax(-1).tolist() == want
    return ok / len(examples)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+")
    args = ap.parse_args(argv)
    examples = tasks.held_out_additions()
    for path in args.paths:
        model = load(path)
        r = evaluate.run(model, examples, batch=16, warmup=False)
        fixed = evaluate.run(model, examples, batch=16, warmup=False, threshold=None)
        total, missed = collections.Counter(), collections.Counter()
        for e, ok in zip(examples, r.correct, strict=True):
            for k in kinds(*(int(x) for x in e.prompt[len("What is "):-1].split("+"))):
                total[k] += 1
                missed[k] += not ok
        print(f"# {path}: {len(examples)} held-out additions, T=0")
        print(f"server defaults {r.accuracy:.1%}  fixed schedule {fixed.accuracy:.1%}  "
              f"one forward, all masked {one_shot(model, examples):.1%}")
        print("| misses at the defaults | " + " | ".join(f"{k} ({total[k]})" for k in sorted(total)) + " |")
        print("|---|" + "---:|" * len(total))
        print("| " + path + " | " + " | ".join(str(missed[k]) for k in sorted(total)) + " |")
        print("first misses:", [(e.prompt, rep) for e, rep, ok in zip(examples, r.replies, r.correct) if not ok][:8])


if __name__ == "__main__":
    main()
