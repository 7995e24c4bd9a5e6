"""Fine-tune a demo-model candidate with the SFT loss on the reply only (issue 25 diagnostic).

    python -m benchmarks.demo_reply_loss SRC OUT [STEPS] [LR] [PADS]

LLaDA's SFT loss normalises a row by its whole response (reply, ``<|eot_id|>`` and the padding up
to the canvas), so most of a long row's weight is on padding. This fine-tune scores only the reply,
its ``<|eot_id|>`` and the first PADS pads (default 1), from SRC for STEPS steps (AdamW, warm-up
50, cosine, lr LR), with the demo trainer's batches; then prints training and held-out additions,
``<|eot_id|>`` right after b (and after b - 1, a stop too early) on 34 training counts, and
held-out counts (exact, "to b").
"""

from __future__ import annotations

import random
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dllm_jax
from dllm_jax.demo import evaluate, score, tasks
from dllm_jax.demo.batches import Batches
from dllm_jax.demo.tokenizer import MASK
from dllm_jax.demo.train import TrainConfig, model_config, write


def reply_loss(model, tokens, plen, rlen, key, pads, eps=1e-3):
    b, seq_len = tokens.shape
    k_t, k_m = jax.random.split(key)
    p = (1 - eps) * jax.random.uniform(k_t, (b, 1)) + eps
    pos = jnp.arange(seq_len)[None, :]
    response = pos >= plen[:, None]
    scored = response & (pos < (plen + rlen + pads)[:, None])
    masked = response & (jax.random.uniform(k_m, (b, seq_len)) < p)
    logits = model(jnp.where(masked, MASK, tokens), jnp.broadcast_to(pos, (b, seq_len)),
                   jnp.ones((b, seq_len, seq_len), bool))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    n = jnp.sum(scored, -1, keepdims=True)
    return jnp.sum(jnp.where(masked & scored, ce / p / n, 0.0)) / b


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    src, out = argv[0], argv[1]
    steps, lr, pads = (int(argv[2]) if len(argv) > 2 else 400), (float(argv[3]) if len(argv) > 3 else 1e-3), \
        (int(argv[4]) if len(argv) > 4 else 1)
    m = dllm_jax.load(src)
    model, cfg = m.module(), TrainConfig(seed=7)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, 50, steps, end_value=lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.01))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tokens, plen, rlen, key):
        loss, grads = nnx.value_and_grad(reply_loss)(model, tokens, plen, rlen, key, pads)
        opt.update(model, grads)
        return loss

    batches, key, t0, window = Batches(m.tokenizer, cfg), jax.random.key(7), time.time(), []
    for i in range(steps):
        _, tokens, plen, rlen = batches.next()
        window.append(float(step(model, opt, jnp.asarray(tokens), jnp.asarray(plen), jnp.asarray(rlen),
                                 jax.random.fold_in(key, i))))
        if (i + 1) % 100 == 0:
            print(f"step {i + 1}  loss {np.mean(window):.4f}  {time.time() - t0:.0f} s", flush=True)
            window = []
    write(out, model_config(cfg, len(m.tokenizer)), model, m.tokenizer, {"reply_loss": argv})
    tuned = dllm_jax.load(out)
    train_adds = random.Random(0).sample(tasks.additions(False), 64)
    print("training additions", evaluate.run(tuned, train_adds, batch=16).accuracy)
    print("held-out additions", evaluate.run(tuned, tasks.held_out_additions(64, seed=0), batch=16).accuracy)
    counts = tasks.counts(False)[:2000:60]
    print("training counts: EOT after b", score.eot_at_b(tuned, counts)[0], "of", len(counts),
          "after b-1", score.eot_at_b(tuned, counts, before=1)[0])
    r = evaluate.run(tuned, tasks.held_out_counts(48, seed=0), batch=16)
    print("held-out counts exact", r.accuracy, "to b", r.prefix_accuracy)


if __name__ == "__main__":
    main()
