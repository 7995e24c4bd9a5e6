"""Exact-match accuracy and decoding cost of a model on demo task examples.

``run(model, examples, batch=16, algorithm="dual_cache", threshold=0.9)`` generates every
example's reply with ``Model.generate`` (the server's settings unless overridden: canvas 128,
block 32, T=0, early stop at the model's stop tokens) and returns accuracy with the cost
figures of Fast-dLLM's / dInfer's tables: mean NFE per request, tokens per forward, wall
time and tokens/s.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from dllm_jax.demo import tasks

# The server's defaults for a LLaDA-family model at max_tokens=128 (serve/engine/defaults.py).
SERVER_DEFAULTS = {"gen_length": 128, "block_length": 32, "algorithm": "dual_cache", "threshold": 0.9,
                   "temperature": 0.0, "early_stop": True}


@dataclasses.dataclass
class Result:
    accuracy: float
    n: int
    nfe: float              # mean forward passes per request
    tokens_per_forward: float  # mean over requests of reply tokens / NFE
    wall_s: float
    tokens_per_s: float     # reply tokens (up to the stop token) per wall second
    prefix_accuracy: float  # replies that start with the expected reply (a count right up to b)
    replies: list[str]
    correct: list[bool]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def run(model, examples: Sequence[tasks.Example], *, batch: int = 16, warmup: bool = True, **sampling) -> Result:
    """Generate every example's reply in batches of ``batch`` and score exact match."""
    settings = dict(SERVER_DEFAULTS, stop_token_ids=tuple(model.stop_token_ids))
    settings.update(sampling)
    tok = model.tokenizer
    prompts = [chat_ids(tok, e.prompt) for e in examples]
    # Pad the last batch with repeats so every call has the same shape (one program).
    chunks = [list(range(i, min(i + batch, len(prompts)))) for i in range(0, len(prompts), batch)]
    if warmup and chunks:
        model.generate([prompts[i] for i in chunks[0]] + [prompts[0]] * (batch - len(chunks[0])), **settings)
    replies, nfe, tpf, n_tokens = [None] * len(prompts), [], [], 0
    t0 = time.perf_counter()
    for idx in chunks:
        rows = [prompts[i] for i in idx] + [prompts[idx[0]]] * (batch - len(idx))
        out = model.generate(rows, **settings)
        for j, i in enumerate(idx):
            length = int(out.lengths[j])
            replies[i] = tok.decode(out.tokens[j][:length].tolist(), skip_special_tokens=True)
            nfe.append(int(out.nfe_per_row[j]))
            tpf.append(length / max(int(out.nfe_per_row[j]), 1))
            n_tokens += length
    wall = time.perf_counter() - t0
    correct = [tasks.exact_match(r, e) for r, e in zip(replies, examples)]
    prefix = [tasks.prefix_match(r, e) for r, e in zip(replies, examples)]
    return Result(accuracy=float(np.mean(correct)) if correct else 0.0, n=len(examples), nfe=float(np.mean(nfe)),
                  prefix_accuracy=float(np.mean(prefix)) if prefix else 0.0,
                  tokens_per_forward=float(np.mean(tpf)), wall_s=wall, tokens_per_s=n_tokens / wall,
                  replies=replies, correct=correct)
