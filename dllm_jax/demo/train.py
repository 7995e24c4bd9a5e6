"""Train the demo model: a small LLaDA on the synthetic tasks of ``dllm_jax.demo.tasks``.

    python -m dllm_jax.demo.train                      # writes dllm_jax/assets/demo_model
    python -m dllm_jax.demo.train --out /tmp/demo --steps 50 --finetune-steps 10  # a quick smoke run
    python -m dllm_jax.demo.train --init PATH --out /tmp/demo  # the second phase alone, on PATH
    python -m dllm_jax.demo.train --first-out /tmp/first      # also keep the first phase (for --init)

Deterministic from ``--seed`` (same machine, same JAX version): a byte-level BPE tokenizer is
trained on the task texts (a digit per token, but a count's numbers one token each,
``dllm_jax.demo.tokenizer``), then the model is trained with LLaDA's SFT objective — the prompt
is never masked; every response position (the reply, its ``<|eot_id|>`` and the
``<|endoftext|>`` padding up to the canvas) is masked with probability t ~ U(0, 1];
cross-entropy on the masked positions weighted by 1/t, normalised by the response length — in
JAX with optax (AdamW, warm-up + cosine). Three lanes (``batches.Batches``): canvas 128 (the
server's default ``max_tokens``) and 64 with every task, and 8 with additions only, their whole
response masked. Some count rows are cut (``Batches.cut``, ``objective.sft_loss``), everything
after a point masked: right after b or one of the numbers before it (where block decoding
decides to go on or stop) and, from step ``global_start`` on, also at 0 (the state decoding
starts from) or after any of its numbers (the global cuts). Then a second phase of
``finetune_steps`` with a fresh schedule: the global cuts at once, 10 % of the short lane's rows
additions, and half the long and short lanes' addition rows cut at 0 (the first state of a sum in
those canvases); and the first state of the polite answer to an out-of-range sum: 10 % of the
addition lane's rows are such sums (their reply the polite answer's first tokens), and half of
their polite rows in the long and short lanes are cut at 0, and so are half the polite rows of
counts past 99, other operators and other requests (``finetune_big_cut0``,
``finetune_other_cut0``: at 1500 steps these cost the counts' target, at 2000 they do not,
docs/performance.md). Trained from the start, the cuts at 0 keep the counts from learning where
to stop. Tasks, the fixed polite answer for everything else, and the held-out splits:
``dllm_jax.demo.tasks``. The recipes tried and not kept are in docs/performance.md, "Demo
model", with the commits that ran them.

The output is an HF-format directory (``config.json``, ``model.safetensors`` with LLaDA's
key names, tokenizer files with a LLaDA chat template) that ``dllm_jax.load`` and
``python -m serve --model`` read like any other checkpoint. It is written to a temporary
sibling directory and renamed into place, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dllm_jax.checkpoint import load, save_safetensors
from dllm_jax.configs import LLaDAConfig
from dllm_jax.demo.batches import Batches
from dllm_jax.demo.objective import sft_loss
from dllm_jax.demo.tokenizer import EOS, MASK, train_tokenizer
from dllm_jax.models.keymap import from_param
from dllm_jax.models.llada import hf_key_map
from dllm_jax.models.transformer import Transformer

log = logging.getLogger("dllm_jax.demo")

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "demo_model"

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 4600
    batch: int = 32              # rows per step on the long canvas
    short_batch: int = 48        # rows per step on the short canvas
    add_batch: int = 128         # rows per step of additions
    lr: float = 1e-3
    warmup: int = 150
    weight_decay: float = 0.01
    long_canvas: int = 128       # the server's default max_tokens
    short_canvas: int = 64       # holds every count
    add_canvas: int = 8
    add_fraction: float = 0.35   # share of steps that are additions only (batches.Batches)
    short_fraction: float = 0.45  # share of steps on the short canvas (counts, chats, the polite answer)
    help_share: float = 0.15     # share of the long and short rows that are the fixed polite answer
    cut_share: float = 0.6       # share of the count rows cut (batches.Batches.cut, objective.sft_loss)
    global_cut: float = 0.5      # share of the cut count rows cut at 0 or after any number ...
    global_start: int = 2400     # ... from this step on (the sums are learnt first)
    cut_near: int = 4            # most "go on" cuts are after one of the cut_near numbers before b
    count_help: float = 0.0      # from global_start, this share of the addition lane's rows counts out of
    count_cut0: float = 0.0      # range within 0-99, and this share of their polite rows cut at 0 (off: docs)
    finetune_steps: int = 2000   # a second phase on the first one's model: a fresh AdamW schedule ...
    finetune_lr: float = 3e-4
    finetune_warmup: int = 50
    finetune_seed: int = 1       # ... its own batches and masks, the global cuts from its first step ...
    finetune_add_cut0: float = 0.5  # ... and this share of the other lanes' addition rows cut at 0
    finetune_short_adds: float = 0.1  # ... and this share of the short lane's rows additions (canvas 64) ...
    finetune_add_help: float = 0.1  # ... and this share of the addition lane's rows out-of-range sums ...
    finetune_sum_cut0: float = 0.5  # ... and these shares of the polite rows cut at 0: out-of-range sums,
    finetune_big_cut0: float = 0.5  # counts with a number past 99 (at 1500 steps these two cost the
    finetune_other_cut0: float = 0.5  # counts' target, at 2000 they do not: docs), other operators and requests,
    finetune_count_cut0: float = 0.0  # counts out of range within 0-99 (backwards or too long) ...
    finetune_count_help: float = 0.0  # ... and these shares of the addition lane's rows: those counts,
    finetune_count_in: float = 0.0  # training counts that fit its canvas (off: every setting tried costs the counts)
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 6
    mlp_hidden_size: int = 512
    vocab_size: int = 512


def model_config(cfg: TrainConfig, vocab: int) -> LLaDAConfig:
    embedding = int(math.ceil(vocab / 64) * 64)
    return LLaDAConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, n_layers=cfg.n_layers,
                       mlp_hidden_size=cfg.mlp_hidden_size, vocab_size=vocab, embedding_size=embedding,
                       max_sequence_length=512, rope_theta=10000.0, mask_token_id=MASK, eos_token_id=EOS,
                       pad_token_id=EOS)


def make_optimizer(model: Transformer, lr: float, warmup: int, steps: int, weight_decay: float):
    """(schedule, optimizer): AdamW (clip 1.0) with linear warm-up and cosine decay to 5 % over ``steps``."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(steps // 2, 1)), max(steps, 2),
                                                  end_value=lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=weight_decay))
    return schedule, nnx.Optimizer(model, tx, wrt=nnx.Param)


def train(cfg: TrainConfig, tokenizer, *, log_every: int = 100, init: Transformer | None = None,
          after_first=None):
    """Two phases: AdamW with warm-up + cosine decay for ``cfg.steps`` steps from a fresh model
    (or ``init``, which skips this phase), then ``cfg.finetune_steps`` more with a fresh schedule
    (``cfg.finetune_lr``), where the global cuts start at once, a share ``cfg.finetune_short_adds``
    of the short lane's rows are additions and a share ``cfg.finetune_add_cut0`` of the long and
    short lanes' addition rows is cut at 0; a share ``cfg.finetune_add_help`` of the addition
    lane's rows are out-of-range sums (``finetune_count_help``: counts out of range within 0-99;
    ``finetune_count_in``: training counts), and the polite rows are cut at 0 by the prompt's kind
    (``cfg.finetune_sum_cut0``, ``finetune_big_cut0``, ``finetune_count_cut0``, ``finetune_other_cut0``).
    The first phase's ``cfg.count_help`` and ``cfg.count_cut0`` (off by default) do the same for
    counts out of range within 0-99 from step ``cfg.global_start`` on.

    ``after_first(config, model, history)``, if given, is called between the phases (not when
    ``init`` skips the first). Returns (LLaDAConfig, trained Transformer, history of (step, loss,
    masked-token acc)).
    """
    config = model_config(cfg, len(tokenizer))
    history: list[tuple[int, float, float]] = []
    model = init
    if model is None:
        model = Transformer(config.spec(), dtype=jnp.float32, rngs=nnx.Rngs(cfg.seed))
        batches = Batches(tokenizer, cfg, help_cut0={"count": cfg.count_cut0}, count_help=cfg.count_help,
                          extra_from=cfg.global_start)
        fit(model, batches, cfg.steps, cfg.lr, cfg.warmup, cfg, history, log_every)
        if after_first is not None:
            after_first(config, model, history)
    if cfg.finetune_steps > 0:
        fine = dataclasses.replace(cfg, seed=cfg.finetune_seed, global_start=0)
        help_cut0 = {"sum": cfg.finetune_sum_cut0, "count_big": cfg.finetune_big_cut0,
                     "count": cfg.finetune_count_cut0, "op": cfg.finetune_other_cut0, "other": cfg.finetune_other_cut0}
        batches = Batches(tokenizer, fine, add_cut0=cfg.finetune_add_cut0, short_adds=cfg.finetune_short_adds,
                          help_cut0=help_cut0, add_help=cfg.finetune_add_help, count_help=cfg.finetune_count_help,
                          count_in=cfg.finetune_count_in)
        fit(model, batches, cfg.finetune_steps, cfg.finetune_lr, cfg.finetune_warmup, fine, history, log_every)
    return config, model, history


def fit(model: Transformer, batches: Batches, steps: int, lr: float, warmup: int, cfg: TrainConfig,
        history: list, log_every: int) -> None:
    """One phase: ``steps`` AdamW updates of ``model`` in place on ``batches``, masks keyed by ``cfg.seed``."""
    schedule, optimizer = make_optimizer(model, lr, warmup, steps, cfg.weight_decay)

    @nnx.jit
    def step(model, optimizer, tokens, prompt_len, cut, key):
        (loss, acc), grads = nnx.value_and_grad(sft_loss, has_aux=True)(model, tokens, prompt_len, cut, key)
        optimizer.update(model, grads)
        return loss, acc

    key, first = jax.random.key(cfg.seed), len(history) and history[-1][0]
    t0, window, times = time.perf_counter(), [], {"long": [], "short": [], "add": []}
    for i in range(steps):
        t_step = time.perf_counter()
        kind, tokens, plen, _, cut = batches.next()
        loss, acc = step(model, optimizer, jnp.asarray(tokens), jnp.asarray(plen), jnp.asarray(cut),
                         jax.random.fold_in(key, i))
        window.append((float(loss), float(acc)))
        times[kind].append(time.perf_counter() - t_step)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            l, a = np.mean(window, axis=0)
            history.append((first + i + 1, float(l), float(a)))
            med = [float(np.median(times[k])) if times[k] else 0.0 for k in ("long", "short", "add")]
            log.info("step %d/%d  loss %.4f  masked-token acc %.3f  lr %.2e  %.1f s  (median step: long %.2f s, "
                     "short %.2f s, add %.2f s)", i + 1, steps, l, a, float(schedule(i)), time.perf_counter() - t0, *med)
            window, times = [], {"long": [], "short": [], "add": []}


# ---- writing ---------------------------------------------------------------------------


def hf_tensors(config: LLaDAConfig, model: Transformer, dtype=np.float32) -> dict[str, np.ndarray]:
    """The model's parameters under LLaDA's HF state-dict names and layouts."""
    spec = config.spec()
    params = nnx.state(model, nnx.Param).to_pure_dict()
    out = {}
    for key, target in hf_key_map(config).items():
        if target.layer is None:
            w = params[target.param]
        else:
            w = params["layers"][target.layer][target.param.split("/", 1)[1]]
        out[key] = np.asarray(from_param(target.kind, np.asarray(w, np.float32), spec)).astype(dtype)
    return out


def write(out: Path, config: LLaDAConfig, model: Transformer, tokenizer, meta: dict) -> Path:
    """Write the HF dir atomically (temp sibling, then rename over ``out``)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_safetensors(hf_tensors(config, model), tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep what is freed (one arena, no mmap, no trimming). XLA:CPU's
    matmul kernels allocate and free their packing buffers on every call; by default glibc hands
    them back to the kernel, and each training step page-faults up to 0.8 GB back in (a quarter
    of its time on 2 cores, docs/performance.md). The arithmetic is the same either way. Returns
    False where the C library has no ``mallopt`` (not glibc)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1), (M_TOP_PAD, 256 << 20))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--init", type=Path, help="skip the first phase: start the second from this written model")
    ap.add_argument("--first-out", type=Path, help="also write the first phase's model here (for --init)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=default)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    t0 = time.perf_counter()
    init = load(args.init) if args.init else None
    tokenizer = init.tokenizer if init else train_tokenizer(cfg.vocab_size, polite=cfg.help_share > 0)
    after_first = None
    if args.first_out:
        def after_first(config, model, history):
            first = dataclasses.replace(cfg, finetune_steps=0)
            write(args.first_out, config, model, tokenizer, {"train_config": dataclasses.asdict(first),
                                                             "history": history})
    config, model, history = train(cfg, tokenizer, init=init.module() if init else None, after_first=after_first)
    seconds = time.perf_counter() - t0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    meta = {"train_config": dataclasses.asdict(cfg), "init": str(args.init) if args.init else None,
            "parameters": n_params, "train_seconds": round(seconds, 1),
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "jax": jax.__version__,
            "history": history}
    path = write(args.out, config, model, tokenizer, meta)
    log.info("wrote %s (%d parameters, %.1f min)", path, n_params, seconds / 60)
    return path


if __name__ == "__main__":
    # the command line only: a process that imports this module keeps its own allocator settings
    if not keep_freed_memory():
        print("no glibc mallopt: training runs with the C library's default allocator")
    main()
