"""Fine-tune a demo candidate with the trainer's lanes and batches (seed 1), to test a change to the
count rows' objective without a full run (issue 25; runs at the experiment commit that has it).

    python -m benchmarks.demo_finetune INIT OUT --steps 800                    # control: more of the same
    python -m benchmarks.demo_finetune INIT OUT --steps 800 --smooth 0.25      # soft ends
    python -m benchmarks.demo_finetune INIT OUT --steps 800 --global-cuts 0.5 --cut-share 0.6

lr 5e-4, warm-up 50, cosine over --steps. ``--smooth s``: in count rows, the ``<|eot_id|>`` and the
``--near`` pads after it, wherever the position before is masked, get a label-smoothed target
(1 - s on the token, s spread evenly), so the model is never sure of the end before it sees the
last number. ``--global-cuts g``: that share of the cut count rows is instead cut at 0 (the
whole reply masked, every position scored: the state decoding starts from) or after any of the
count's numbers, half each. Score the result with ``python -m dllm_jax.demo.score OUT``.
"""
import argparse
import dataclasses
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dllm_jax.checkpoint import load, save_safetensors
from dllm_jax.demo import train as T
from dllm_jax.demo.batches import Batches
from dllm_jax.demo.tokenizer import MASK

ap = argparse.ArgumentParser()
ap.add_argument("init"); ap.add_argument("out")
ap.add_argument("--steps", type=int, default=800); ap.add_argument("--lr", type=float, default=5e-4)
ap.add_argument("--smooth", type=float, default=0.0); ap.add_argument("--near", type=int, default=3)
ap.add_argument("--count-boost", type=float, default=1.0)
ap.add_argument("--global-cuts", type=float, default=0.0, help="share of cut count rows cut at 0 (half) or after any number (half)")
ap.add_argument("--cut-share", type=float, default=0.5)
args = ap.parse_args()
m = load(args.init); tok = m.tokenizer; model = m.module()
cfg = dataclasses.replace(T.TrainConfig(), seed=1, cut_share=args.cut_share)

class B(Batches):
    def cut(self, name, i):
        self.is_count.append(name == "count")
        c = super().cut(name, i)
        if c >= 0 and self.rng.random() < args.global_cuts:
            return 0 if self.rng.random() < 0.5 else int(self.rng.choice(self.ends[i]))
        return c
    def next(self):
        self.is_count = []
        kind, tokens, plen, rlen, cut = super().next()
        isc = np.array(self.is_count if kind != "add" else [False] * len(plen))
        return kind, tokens, plen, rlen, cut, isc

def loss_fn(model, tokens, prompt_len, reply_len, cut, is_count, key, eps=1e-3):
    b, n = tokens.shape
    k_t, k_m = jax.random.split(key)
    p = (1 - eps) * jax.random.uniform(k_t, (b, 1)) + eps
    pos = jnp.arange(n)[None, :]
    response = pos >= prompt_len[:, None]
    is_cut = (cut >= 0)[:, None]
    decided = prompt_len[:, None] + cut[:, None]
    masked = jnp.where(is_cut, pos >= decided, response & (jax.random.uniform(k_m, (b, n)) < p))
    p = jnp.where(is_cut, 1.0, p)
    noisy = jnp.where(masked, MASK, tokens)
    logits = model(noisy, jnp.broadcast_to(pos, (b, n)), jnp.ones((b, n, n), bool))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    end = (prompt_len + reply_len - 1)[:, None]            # the <|eot_id|>
    prev_masked = jnp.concatenate([jnp.zeros((b, 1), bool), masked[:, :-1]], axis=1)
    near_end = (pos >= end) & (pos <= end + args.near) & prev_masked & is_count[:, None]
    uniform = -jnp.mean(jax.nn.log_softmax(logits, -1), -1)
    ce = jnp.where(near_end, (1 - args.smooth) * ce + args.smooth * uniform, ce)
    weight = jnp.where(is_count[:, None], args.count_boost, 1.0)
    answer_len = jnp.sum(response, axis=-1, keepdims=True)
    decision = jnp.sum(jnp.where(is_cut & (pos == decided), ce, 0.0))
    return (jnp.sum(jnp.where(masked, weight * ce / p / answer_len, 0.0)) + decision) / b

schedule, opt = T.make_optimizer(model, args.lr, 50, args.steps, cfg.weight_decay)

@nnx.jit
def step(model, opt, tokens, plen, rlen, cut, isc, key):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, plen, rlen, cut, isc, key)
    opt.update(model, grads)
    return loss

batches = B(tok, cfg); key = jax.random.key(7); t0 = time.time(); w = []
for i in range(args.steps):
    kind, tokens, plen, rlen, cut, isc = batches.next()
    w.append(float(step(model, opt, *(jnp.asarray(x) for x in (tokens, plen, rlen, cut, isc)), jax.random.fold_in(key, i))))
    if (i + 1) % 100 == 0:
        print(f"step {i + 1} loss {np.mean(w):.4f} {time.time() - t0:.0f} s", flush=True); w = []
shutil.copytree(args.init, args.out, dirs_exist_ok=True)
config = T.model_config(cfg, len(tok))
save_safetensors(T.hf_tensors(config, model), f"{args.out}/model.safetensors")
print("wrote", args.out)
