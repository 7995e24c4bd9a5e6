"""Score a demo-model candidate the way docs/performance.md's demo-model runs are scored.

    python -m dllm_jax.demo.score PATH [PATH ...]

At the server's defaults (dual cache, threshold 0.9, canvas 128, block 32, T=0, early stop),
batch 16: every held-out addition, count and polite-answer prompt (``tasks.held_out_*``) and
96 training additions (seed 0), exact match; counts also "to b" (right up to b, stopped or not);
the polite answer also by the prompt's kind (``tasks.help_kind``: an out-of-range sum, a count
with a number past 99, another count out of range, backwards or too long, another operator,
anything else).
"EOT at b" probes the model directly on 32 held-out counts (seed 0): the reply shown up to b,
every later position of the 128-position canvas masked (the state in which block decoding
decides where a count stops), and how often the argmax right after b is ``<|eot_id|>``; and how often it is
``<|eot_id|>`` after b - 1 and after b - 3 (a stop too early).
"""

from __future__ import annotations

import argparse
import random

import jax
import numpy as np

from dllm_jax.checkpoint import load
from dllm_jax.demo import evaluate, tasks
from dllm_jax.demo.tokenizer import EOT, MASK, reply_ids


def eot_at_b(model, examples, canvas: int = 128, before: int = 0) -> tuple[int, list[float]]:
    """(how many argmaxes are <|eot_id|> right after b, p(<|eot_id|>) there per example); with
    ``before`` = k > 0 the reply is shown up to b - k instead (where it must go on)."""
    tok = model.tokenizer
    hits, probs = 0, []
    for e in examples:
        a, b = tasks.count_bounds(e.prompt)
        if b - before < a:
            continue
        reply = tasks.count_reply(a, b - before) if before else e.reply
        prompt, reply = evaluate.chat_ids(tok, e.prompt), reply_ids(tok, reply)
        ids = prompt + reply[:-1] + [MASK] * (canvas - len(reply) + 1)
        p = np.asarray(jax.nn.softmax(model.logits(np.asarray([ids]))[0, len(prompt) + len(reply) - 1]))
        hits += int(p.argmax() == EOT)
        probs.append(float(p[EOT]))
    return hits, probs


def subkind(prompt: str) -> str:
    """``tasks.help_kind``, a count out of range within 0-99 split: backwards or too long."""
    kind = tasks.help_kind(prompt)
    if kind != "count":
        return kind
    a, b = tasks.count_bounds(prompt)
    return "count_back" if b <= a else "count_long"


def score(path) -> str:
    model = load(path)
    adds, counts, helps = tasks.held_out_additions(), tasks.held_out_counts(), tasks.held_out_helps()
    train_adds = random.Random(0).sample(tasks.additions(False), 96)
    ra, rc, rh, rt = (evaluate.run(model, s, batch=16) for s in (adds, counts, helps, train_adds))
    probe = tasks.held_out_counts(32, seed=0)
    hits, probs = eot_at_b(model, probe)
    early = [f"{n}/{len(p)}" for n, p in (eot_at_b(model, probe, before=k) for k in (1, 3))]
    kinds = [subkind(e.prompt) for e in helps]
    by_kind = ", ".join(f"{k} {sum(c for c, j in zip(rh.correct, kinds) if j == k)}/{kinds.count(k)}"
                        for k in ("sum", "count_big", "count_back", "count_long", "op", "other"))
    return (f"{path}: held-out adds {ra.accuracy:.1%}  training adds {rt.accuracy:.1%}  held-out counts exact "
            f"{rc.accuracy:.1%} (to b {rc.prefix_accuracy:.1%})  polite answer {rh.accuracy:.1%} ({by_kind})  "
            f"EOT at b {hits}/32 "
            f"(p(EOT) {min(probs):.3f}-{max(probs):.3f}), at b-1 {early[0]}, at b-3 {early[1]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+")
    for path in ap.parse_args(argv).paths:
        print(score(path), flush=True)


if __name__ == "__main__":
    main()
