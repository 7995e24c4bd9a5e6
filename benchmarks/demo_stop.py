"""Can the demo model's architecture learn where a count stops, trained on that decision alone?

    python -m benchmarks.demo_stop                                # fresh model, 600 steps
    python -m benchmarks.demo_stop --init dllm_jax/assets/demo_model --near 4
    python -m benchmarks.demo_stop --layers 8 --steps 1500
    python -m benchmarks.demo_stop --d-model 256 --heads 16 --mlp 512 --near 4

Issue 25's open problem in isolation. Every training row is a training-split count
(``dllm_jax.demo.tasks``) shown up to right after one of its numbers, every later position of the
128-position canvas masked: the state block decoding is in when it decides whether the count
stops. The loss is the cross-entropy of that one next position only: ``<|eot_id|>`` when the
number shown is b (half the rows), ``, `` otherwise. ``--near K``: the other half is cut after one
of the K numbers before b (the hard negatives: b - 1 .. b - K; 0: after any number but b). No
other objective, so nothing competes with it.

Every 100 steps it prints the training loss and accuracy (on that decision; 0.5 is a coin when
``--near`` > 0) and the argmax accuracy on every held-out count shown up to b (want
``<|eot_id|>``), b - 1 and b - 3 (want ``, ``) and its middle number. AdamW, warm-up 50 steps, cosine
from ``--lr``; batch ``--batch`` rows; the demo trainer's architecture (``TrainConfig``) with
``--layers`` blocks (``--d-model``, ``--heads``, ``--mlp``: its width); deterministic from
``--seed``. Results: docs/performance.md, "Demo model".
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dllm_jax.checkpoint import load
from dllm_jax.demo import evaluate, tasks
from dllm_jax.demo.tokenizer import MASK, reply_ids, train_tokenizer
from dllm_jax.demo.train import TrainConfig, model_config
from dllm_jax.models.transformer import Transformer

CANVAS = 128


def number_ends(tokenizer, reply: list[int]) -> list[int]:
    """Indices just past each number of a tokenised reply (its last is b's): after a token whose
    text ends in a digit when the next one's does not start with one (a digit per token, or a
    whole number per token)."""
    text = [tokenizer.decode([t]) for t in reply] + [""]
    return [i + 1 for i in range(len(reply)) if text[i][-1:].isdigit() and not text[i + 1][:1].isdigit()]


def encode(tokenizer, examples) -> list[tuple[list[int], list[int], list[int]]]:
    out = []
    for e in examples:
        reply = reply_ids(tokenizer, e.reply)
        out.append((evaluate.chat_ids(tokenizer, e.prompt), reply, number_ends(tokenizer, reply)))
    return out


def state(prompt, reply, cut: int, length: int) -> tuple[np.ndarray, int, int]:
    """(tokens: the prompt, the reply up to ``cut``, masks; the decided position; its target)."""
    ids = np.full(length, MASK, np.int32)
    ids[:len(prompt)] = prompt
    ids[len(prompt):len(prompt) + cut] = reply[:cut]
    return ids, len(prompt) + cut, reply[cut]


def decide(model, tokens, where):
    """[B, V] logits at each row's decided position (bidirectional attention, no padding)."""
    b, n = tokens.shape
    logits = model(tokens, jnp.broadcast_to(jnp.arange(n)[None], (b, n)), jnp.ones((b, n, n), bool))
    return logits[jnp.arange(b), where]


def loss_fn(model, tokens, where, target):
    logits = decide(model, tokens, where)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
    return loss, (logits.argmax(-1) == target).mean()


@nnx.jit
def train_step(model, optimizer, tokens, where, target):
    (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens, where, target)
    optimizer.update(model, grads)
    return loss, acc


@nnx.jit
def predict(model, tokens, where):
    return decide(model, tokens, where).argmax(-1)


def held_out_accuracy(model, held, length: int) -> dict[str, float]:
    picks = {"b": lambda e: e[-1], "b-1": lambda e: e[-2], "b-3": lambda e: e[-4], "middle": lambda e: e[len(e) // 2]}
    out = {}
    for name, pick in picks.items():
        tokens, where, target = zip(*[state(p, r, pick(ends), length) for p, r, ends in held])
        pred = np.asarray(predict(model, np.stack(tokens), np.asarray(where)))
        out[name] = float(np.mean(pred == np.asarray(target)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", default=None, help="start from this demo-model dir (default: a fresh model)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--layers", type=int, default=TrainConfig.n_layers)
    ap.add_argument("--d-model", type=int, default=TrainConfig.d_model)
    ap.add_argument("--heads", type=int, default=TrainConfig.n_heads)
    ap.add_argument("--mlp", type=int, default=TrainConfig.mlp_hidden_size)
    ap.add_argument("--near", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = TrainConfig(n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, mlp_hidden_size=args.mlp)
    tokenizer = train_tokenizer(cfg.vocab_size)
    if args.init:
        model = load(args.init).module()
    else:
        model = Transformer(model_config(cfg, len(tokenizer)).spec(), dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    train, held = encode(tokenizer, tasks.counts(False)), encode(tokenizer, tasks.counts(True))
    held = [h for h in held if len(h[2]) >= 4]  # the b - 3 column needs four numbers
    length = max(len(p) for p, _, _ in train + held) + CANVAS
    warmup = min(50, args.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1),
                                                  end_value=args.lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.01))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    print(f"# {args}; {sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))} parameters; "
          f"{len(train)} training counts, {len(held)} held out")
    print("| step | train loss | train acc | held-out b | b-1 | b-3 | middle | s |")
    print("|---|---|---|---|---|---|---|---|")
    acc = held_out_accuracy(model, held, length)
    print(f"| 0 | - | - | {acc['b']:.2f} | {acc['b-1']:.2f} | {acc['b-3']:.2f} | {acc['middle']:.2f} | 0 |", flush=True)
    t0, window = time.perf_counter(), []
    for i in range(args.steps):
        rows = []
        for _ in range(args.batch):
            p, r, ends = train[rng.integers(len(train))]
            if rng.random() < 0.5:
                cut = ends[-1]
            elif args.near:
                cut = ends[-2 - rng.integers(min(args.near, len(ends) - 1))]
            else:
                cut = ends[rng.integers(len(ends) - 1)]
            rows.append(state(p, r, cut, length))
        tokens, where, target = (np.asarray(x) for x in zip(*rows))
        window.append([float(x) for x in train_step(model, optimizer, np.stack(tokens), where, target)])
        if (i + 1) % 100 == 0 or i + 1 == args.steps:
            loss, tacc = np.mean(window, axis=0)
            acc, window = held_out_accuracy(model, held, length), []
            print(f"| {i + 1} | {loss:.3f} | {tacc:.3f} | {acc['b']:.2f} | {acc['b-1']:.2f} | {acc['b-3']:.2f} | "
                  f"{acc['middle']:.2f} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
