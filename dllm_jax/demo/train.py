"""Train the demo model: a small LLaDA on the synthetic tasks of ``dllm_jax.demo.tasks``.

    python -m dllm_jax.demo.train                      # writes dllm_jax/assets/demo_model
    python -m dllm_jax.demo.train --out /tmp/demo --steps 50   # a quick smoke run

Deterministic from ``--seed`` (same machine, same JAX version): a byte-level BPE tokenizer
with every digit its own token is trained on the task texts, then the model is trained with
LLaDA's SFT objective — the prompt is never masked; every response position (the reply, its
``<|eot_id|>`` and the ``<|endoftext|>`` padding up to the canvas) is masked with probability
t ~ U(0, 1]; cross-entropy on the masked positions weighted by 1/t, normalised by the
response length — in JAX with optax (AdamW, warm-up + cosine). Two canvas lengths are
trained (128 positions like the server's default ``max_tokens``, and 32 for short replies),
so the model learns where to stop whichever canvas it is given.

Opt-in, off by default (the shipped model was trained without them; docs/performance.md, "Demo
model", has what each run did): the fixed polite answer (``--help-share``), and suffix-cut
rows (``--cut-fraction``; ``--cut-tasks count`` cuts only count rows, ``--cut-window N`` scores
only the N positions from the cut, ``--cut-at-numbers true`` cuts right after a number): a cut
c in the reply, every response position >= c masked (probability 1, weight 1), those before it
i.i.d. — the state semi-autoregressive decoding visits when it decides where a count stops,
which i.i.d. masks almost never show (any visible ``<|endoftext|>`` pad after the last number
makes the stop trivial); and masked-tail rows (``--tail-fraction``, ``--tail-block``), whose
pads are all masked. ``dllm_jax.demo.objective`` has what each option masks and scores.

The output is an HF-format directory (``config.json``, ``model.safetensors`` with LLaDA's
key names, tokenizer files with a LLaDA chat template) that ``dllm_jax.load`` and
``python -m serve --model`` read like any other checkpoint. It is written to a temporary
sibling directory and renamed into place, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
    steps: int = 2600
    batch: int = 32              # rows per step on the long canvas
    short_batch: int = 64        # rows per step on the short canvas (4x shorter rows)
    lr: float = 2e-3
    warmup: int = 150
    weight_decay: float = 0.01
    long_canvas: int = 128       # the server's default max_tokens
    short_canvas: int = 32
    short_fraction: float = 0.5  # share of steps on the short canvas (additions and short chats)
    cut_fraction: float = 0.0    # share of rows with a suffix cut (see the module docstring)
    cut_tasks: str = "all"       # "all", or the one task whose rows may be cut ("count")
    cut_rate: float = 0.5        # the mask rate before the cut is cut_rate * t
    cut_power: float = 2.0       # 1: cut uniform in the reply; > 1: more cuts near its end
    cut_window: int = 0          # > 0: a cut row's loss counts only positions c .. c + cut_window - 1 after the cut
    cut_at_numbers: bool = False  # cuts right after a number of the reply: its last one (the stop) half the time
    tail_fraction: float = 0.0   # share of (cut_tasks) rows whose pads are all masked (see sft_loss)
    tail_window: int = 0         # tail rows: how many pads after <|eot_id|> are scored (0: none)
    tail_block: int = 0          # > 0: tail rows are block states of this length (see sft_loss)
    help_share: float = 0.0      # > 0: that share of the rows is the fixed polite answer (task "help")
    # Optional stage 2 (off by default; see docs/performance.md "Demo model" for what it did):
    # the same objective with semi-autoregressive masks on block_fraction of the rows.
    stage2_steps: int = 0
    stage2_lr: float = 1e-3
    stage2_warmup: int = 50
    block_fraction: float = 0.5
    stage2_short_fraction: float | None = None  # None: stage 1's mix
    stage2_count_share: float | None = None     # of the long rows (the rest additions and chat, 4:1)
    stage2_help_share: float | None = None      # None: stage 1's help_share (the tokenizer is stage 1's)
    stage2_cut_fraction: float | None = None    # None: stage 1's cut_fraction
    block_length: int = 32       # the server's default block length
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 6
    mlp_hidden_size: int = 512
    vocab_size: int = 320


def model_config(cfg: TrainConfig, vocab: int) -> LLaDAConfig:
    embedding = int(math.ceil(vocab / 64) * 64)
    return LLaDAConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, n_layers=cfg.n_layers,
                       mlp_hidden_size=cfg.mlp_hidden_size, vocab_size=vocab, embedding_size=embedding,
                       max_sequence_length=512, rope_theta=10000.0, mask_token_id=MASK, eos_token_id=EOS,
                       pad_token_id=EOS)


def train(cfg: TrainConfig, tokenizer, *, init: Transformer | None = None, log_every: int = 100):
    """Both stages (or stage 2 only from ``init``, a stage-1 model).

    Returns (LLaDAConfig, trained Transformer, history of (stage, step, loss, masked-token acc)).
    """
    config = model_config(cfg, len(tokenizer))
    history = []
    if init is None:
        model = Transformer(config.spec(), dtype=jnp.float32, rngs=nnx.Rngs(cfg.seed))
        history += run_stage(model, cfg, tokenizer, stage=1, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                             block_fraction=0.0, log_every=log_every)
    else:
        model = init
    history += run_stage(model, cfg, tokenizer, stage=2, steps=cfg.stage2_steps, lr=cfg.stage2_lr,
                         warmup=cfg.stage2_warmup, block_fraction=cfg.block_fraction, log_every=log_every)
    return config, model, history


def _in_stage(cfg: TrainConfig, stage: int, name: str):
    """``cfg.<name>``, or in stage 2 ``cfg.stage2_<name>`` where that is set."""
    override = getattr(cfg, "stage2_" + name) if stage == 2 else None
    return getattr(cfg, name) if override is None else override


def run_stage(model, cfg: TrainConfig, tokenizer, *, stage: int, steps: int, lr: float, warmup: int,
              block_fraction: float, log_every: int):
    """AdamW (fresh state) with warm-up + cosine decay for ``steps`` steps; updates ``model``."""
    if steps <= 0:
        return []
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(steps // 2, 1)), max(steps, 2),
                                                  end_value=lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    loss_fn = functools.partial(sft_loss, block_fraction=block_fraction, block_length=cfg.block_length,
                                cut_fraction=_in_stage(cfg, stage, "cut_fraction"), cut_rate=cfg.cut_rate,
                                cut_power=cfg.cut_power, cut_window=cfg.cut_window, cut_at_numbers=cfg.cut_at_numbers,
                                tail_fraction=cfg.tail_fraction, tail_window=cfg.tail_window, tail_block=cfg.tail_block)

    @nnx.jit
    def step(model, optimizer, tokens, prompt_len, reply_len, cut_ok, key):
        (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens, prompt_len, key, reply_len,
                                                                        cut_ok)
        optimizer.update(model, grads)
        return loss, acc

    seed = cfg.seed + 1000 * (stage - 1)
    batches = Batches(tokenizer, dataclasses.replace(cfg, seed=seed, help_share=_in_stage(cfg, stage, "help_share"),
                                                     short_fraction=_in_stage(cfg, stage, "short_fraction")))
    if stage == 2 and cfg.stage2_count_share is not None:  # where stage 1 leaves the most to learn
        rest = 1.0 - cfg.stage2_count_share
        batches.mix["long"] = {"add": rest * 0.8, "count": cfg.stage2_count_share, "chat": rest * 0.2}
    key = jax.random.key(seed)
    history, t0, window, times = [], time.perf_counter(), [], {"long": [], "short": []}
    for i in range(steps):
        t_step = time.perf_counter()
        kind, tokens, plen, rlen, cut_ok = batches.next()
        loss, acc = step(model, optimizer, jnp.asarray(tokens), jnp.asarray(plen), jnp.asarray(rlen),
                         jnp.asarray(cut_ok), jax.random.fold_in(key, i))
        window.append((float(loss), float(acc)))
        times[kind].append(time.perf_counter() - t_step)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            l, a = np.mean(window, axis=0)
            history.append((stage, i + 1, float(l), float(a)))
            med = [float(np.median(times[k])) if times[k] else 0.0 for k in ("long", "short")]
            log.info("stage %d step %d/%d  loss %.4f  masked-token acc %.3f  lr %.2e  %.1f s  (median step: long "
                     "%.2f s, short %.2f s)", stage, i + 1, steps, l, a, float(schedule(i)),
                     time.perf_counter() - t0, *med)
            window, times = [], {"long": [], "short": []}
    return history


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


def _flag(value: str) -> bool:
    if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"{value!r}: expected true or false")
    return value.lower() in ("1", "true", "yes")


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--init", type=Path, default=None,
                    help="a stage-1 output dir (same config and seed): run stage 2 only, from it")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        kind = float if default is None else _flag if isinstance(default, bool) else type(default)
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(cfg.vocab_size, polite=cfg.help_share > 0)
    init = None
    if args.init is not None:
        stage1 = load(args.init)
        if stage1.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise SystemExit(f"{args.init} was not written by stage 1 of this config: its tokenizer differs")
        init = stage1.module()
        log.info("stage 2 from %s", args.init)
    config, model, history = train(cfg, tokenizer, init=init)
    seconds = time.perf_counter() - t0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    meta = {"train_config": dataclasses.asdict(cfg), "parameters": n_params, "train_seconds": round(seconds, 1),
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "jax": jax.__version__,
            "history": history}
    path = write(args.out, config, model, tokenizer, meta)
    log.info("wrote %s (%d parameters, %.1f min)", path, n_params, seconds / 60)
    return path


if __name__ == "__main__":
    main()
