"""How fast does the demo model's architecture learn the additions, and what makes it faster?

    python -m benchmarks.demo_adds                                   # canvas 8, batch 128, lr 2e-3
    python -m benchmarks.demo_adds --canvas 32 --batch 64            # the shipped recipe's short steps
    python -m benchmarks.demo_adds --lr 1e-3 --steps 3000 --stop 250 --eval-every 50 --objective whole

With the shipped tokenizer a sum is written a digit per token and "the reply's first token" below
is its first digit; the table in docs/performance.md ("What stalls the additions") was
measured at commit 0e07c0c, whose tokenizer makes every number 0-198 one token, so there the first
token is the whole sum.

Issue 25's first open question in isolation. Every training row is a training-split addition
(``dllm_jax.demo.tasks``) on a ``--canvas``-position response, with the demo trainer's optimiser
(AdamW, warm-up, cosine to 5 %, clip 1.0), tokenizer (``--vocab-size``) and architecture
(``--d-model``, ``--layers``, ``--heads``, ``--mlp``). Nothing else is trained. ``--objective``:

- ``sft``: LLaDA's SFT loss (``dllm_jax.demo.objective.sft_loss``): every response position
  masked with p = t ~ U(0, 1], cross-entropy weighted 1/p, normalised by the response length;
- ``mean``: the same masks, the plain mean cross-entropy of the masked positions (no 1/p);
- ``reply-scored``: the same masks, only the reply's first position scored (when masked);
- ``reply-masked``: the reply's first position always masked, the rest i.i.d.; every masked
  position scored (summed per row);
- ``reply-masked-scored``: as ``reply-masked``, only the reply's first position scored;
- ``whole``: the whole response masked, only the reply's first position scored;
- ``whole-all``: the whole response masked, every position of it scored (summed per row): the
  state decoding starts from, for a reply of several tokens (a digit per token).

Every ``--eval-every`` steps it prints the training loss, the cross-entropy of the reply's first
token (the sum, with one token per number) with the whole response masked, on 256 training
additions, and the exact-match accuracy of 192
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
from dllm_jax.demo.train import TrainConfig, make_optimizer, model_config
from dllm_jax.models.transformer import Transformer

ARCH = ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size")  # TrainConfig fields taken as options
OBJECTIVES = ("sft", "mean", "reply-scored", "reply-masked", "reply-masked-scored", "whole", "whole-all")


def loss_fn(model, tokens, prompt_len, key, objective: str):
    """The training loss of one ``--objective`` (module docstring) on [B, L] rows."""
    if objective == "sft":
        return sft_loss(model, tokens, prompt_len, key)[0]
    b, n = tokens.shape
    pos = jnp.arange(n)[None]
    response, first = pos >= prompt_len[:, None], pos == prompt_len[:, None]
    p = 0.999 * jax.random.uniform(key, (b, 1)) + 0.001
    masked = response & (jax.random.uniform(jax.random.fold_in(key, 1), (b, n)) < p)
    if objective in ("reply-masked", "reply-masked-scored"):
        masked |= first
    elif objective in ("whole", "whole-all"):
        masked = response
    noisy = jnp.where(masked, MASK, tokens)
    logits = model(noisy, jnp.broadcast_to(pos, (b, n)), jnp.ones((b, n, n), bool))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    if objective == "mean":
        return jnp.sum(jnp.where(masked, ce, 0.0)) / jnp.maximum(jnp.sum(masked), 1)
    scored = masked if objective in ("reply-masked", "whole-all") else masked & first
    return jnp.sum(jnp.where(scored, ce, 0.0)) / b


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


def first_token_ce(model, pairs, length: int) -> float:
    """Mean cross-entropy of the reply's first token, the whole response masked."""
    tokens, plen = rows(pairs, length)
    noisy = np.where(np.arange(length)[None] >= plen[:, None], MASK, tokens)
    logp = np.asarray(jax.nn.log_softmax(forward(model, jnp.asarray(noisy)), -1))
    return float(-np.mean([logp[r, plen[r], tokens[r, plen[r]]] for r in range(len(pairs))]))


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
    ap.add_argument("--objective", choices=OBJECTIVES, default="sft")
    ap.add_argument("--stop", type=int, default=None, help="stop after this many steps (the schedule spans --steps)")
    for name in ARCH:
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(TrainConfig, name))
    args = ap.parse_args(argv)
    cfg = dataclasses.replace(TrainConfig(), **{k: getattr(args, k) for k in ARCH})
    tokenizer = train_tokenizer(cfg.vocab_size, polite=False)
    model = Transformer(model_config(cfg, len(tokenizer)).spec(), dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    train = encode(tokenizer, tasks.additions(False))
    held = encode(tokenizer, tasks.held_out_additions(192, seed=0))
    seen = encode(tokenizer, random.Random(0).sample(tasks.additions(False), 96))
    probe = train[:256]
    length = max(len(p) for p, _ in train + held) + args.canvas
    _, optimizer = make_optimizer(model, args.lr, args.warmup, args.steps, args.weight_decay)

    @nnx.jit
    def step(model, optimizer, tokens, plen, key):
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, plen, key, args.objective)
        optimizer.update(model, grads)
        return loss

    rng, key = np.random.default_rng(args.seed), jax.random.key(args.seed)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"# {vars(args)}; {n_params} parameters; {len(train)} training additions, row length {length}")
    print("| step | train loss | first-token CE | held-out adds | training adds | s |")
    print("|---:|---:|---:|---:|---:|---:|")
    t0, window = time.perf_counter(), []
    for i in range(args.stop or args.steps):
        tokens, plen = rows([train[j] for j in rng.integers(len(train), size=args.batch)], length)
        window.append(float(step(model, optimizer, jnp.asarray(tokens), jnp.asarray(plen), jax.random.fold_in(key, i))))
        if (i + 1) % args.eval_every == 0 or i + 1 == (args.stop or args.steps):
            held_acc, seen_acc = accuracy(model, held, length), accuracy(model, seen, length)
            ce = first_token_ce(model, probe, length)
            print(f"| {i + 1} | {np.mean(window):.4f} | {ce:.3f} | {held_acc:.1%} | {seen_acc:.1%} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)
            window = []


if __name__ == "__main__":
    main()
