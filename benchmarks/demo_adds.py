"""How fast does the demo model's architecture learn the additions, and what makes it faster?

    python -m benchmarks.demo_adds                                   # canvas 8, batch 128, lr 2e-3
    python -m benchmarks.demo_adds --canvas 32 --batch 64            # the shipped recipe's short steps
    python -m benchmarks.demo_adds --lr 5e-3 --steps 1500

Issue 25's first open question in isolation. Every training row is a training-split addition
(``dllm_jax.demo.tasks``, the shipped split) on a ``--canvas``-position response, trained with
the demo trainer's objective (``dllm_jax.demo.objective.sft_loss``: LLaDA's SFT loss, i.i.d.
masks) and optimiser (AdamW, warm-up, cosine to 5 %, clip 1.0), the demo trainer's tokenizer
(``--vocab-size``, a digit per token) and architecture (``--d-model``, ``--layers``, ``--heads``,
``--mlp``). Nothing else is trained.

Every ``--eval-every`` steps it prints the training loss and the exact-match accuracy of 192
held-out and 96 training additions (seed 0), decoded on the same canvas as the server's
default decoder does without a cache: every masked position whose top probability is at least
0.9 is unmasked at once (at least one per forward), T=0, until the canvas is full. The
wall-clock column is the run's own time. Results: docs/performance.md, "Demo model".
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dllm_jax.demo import evaluate, tasks
from dllm_jax.demo.objective import sft_loss
from dllm_jax.demo.tokenizer import EOS, EOT, MASK, reply_ids, train_tokenizer
from dllm_jax.demo.train import TrainConfig, model_config
from dllm_jax.models.transformer import Transformer


def encode(tokenizer, examples):
    return [(evaluate.chat_ids(tokenizer, e.prompt), reply_ids(tokenizer, e.reply)) for e in examples]


def rows(pairs, length: int):
    """[B, length] tokens (prompt, reply, <|endoftext|> padding) and [B] prompt lengths."""
    tokens = np.full((len(pairs), length), EOS, np.int32)
    plen = np.zeros(len(pairs), np.int32)
    for r, (p, a) in enumerate(pairs):
        tokens[r, :len(p)] = p
        tokens[r, len(p):len(p) + len(a)] = a
        plen[r] = len(p)
    return tokens, plen


@nnx.jit
def forward(model, tokens):
    b, n = tokens.shape
    return model(tokens, jnp.broadcast_to(jnp.arange(n)[None], (b, n)), jnp.ones((b, n, n), bool))


def decode(model, tokens, plen, threshold: float = 0.9) -> np.ndarray:
    """Threshold decoding of every masked position, no cache; returns the filled tokens."""
    tokens = tokens.copy()
    pos = np.arange(tokens.shape[1])[None]
    tokens[pos >= plen[:, None]] = MASK
    while (tokens == MASK).any():
        probs = np.asarray(jax.nn.softmax(forward(model, jnp.asarray(tokens)), -1))
        top, conf = probs.argmax(-1), probs.max(-1)
        masked = tokens == MASK
        conf = np.where(masked, conf, -1.0)
        pick = masked & (conf >= threshold)
        best = conf.argmax(-1)
        pick[np.arange(len(tokens)), best] |= masked[np.arange(len(tokens)), best]
        tokens = np.where(pick, top, tokens)
    return tokens


def accuracy(model, pairs, length: int) -> float:
    tokens, plen = rows(pairs, length)
    out = decode(model, tokens, plen)
    right = 0
    for r, (p, a) in enumerate(pairs):
        reply = list(out[r, len(p):])
        reply = reply[:reply.index(EOT) + 1] if EOT in reply else reply
        right += reply == a
    return right / len(pairs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--canvas", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    for name in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(TrainConfig, name))
    args = ap.parse_args(argv)
    cfg = dataclasses.replace(TrainConfig(), **{k: getattr(args, k) for k in
                                                ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size")})
    tokenizer = train_tokenizer(cfg.vocab_size)
    model = Transformer(model_config(cfg, len(tokenizer)).spec(), dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    train = encode(tokenizer, tasks.additions(False))
    held = encode(tokenizer, tasks.held_out_additions(192, seed=0))
    seen = encode(tokenizer, random.Random(0).sample(tasks.additions(False), 96))
    length = max(len(p) for p, _ in train + held) + args.canvas
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(args.warmup, args.steps // 2),
                                                  max(args.steps, 2), end_value=args.lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=args.weight_decay))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens, plen, key):
        cut = jnp.full(plen.shape, -1, jnp.int32)  # no cut rows
        (loss, acc), grads = nnx.value_and_grad(sft_loss, has_aux=True)(model, tokens, plen, cut, key)
        optimizer.update(model, grads)
        return loss

    rng, key = np.random.default_rng(args.seed), jax.random.key(args.seed)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"# {vars(args)}; {n_params} parameters; {len(train)} training additions, row length {length}")
    print("| step | train loss | held-out adds | training adds | s |")
    print("|---:|---:|---:|---:|---:|")
    t0, window = time.perf_counter(), []
    for i in range(args.steps):
        tokens, plen = rows([train[j] for j in rng.integers(len(train), size=args.batch)], length)
        window.append(float(step(model, optimizer, jnp.asarray(tokens), jnp.asarray(plen), jax.random.fold_in(key, i))))
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            held_acc, seen_acc = accuracy(model, held, length), accuracy(model, seen, length)
            print(f"| {i + 1} | {np.mean(window):.4f} | {held_acc:.1%} | {seen_acc:.1%} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)
            window = []


if __name__ == "__main__":
    main()
