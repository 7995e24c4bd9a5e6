"""PyTorch eager baseline of the upstream LLaDA sampling loops, for side-by-side benchmarks.

Our own code, written after the semantics of the upstream references (see
``tests/fixtures/llada_tiny/README.md``) and deliberately in their eager, wasteful style, so the
numbers measure "what the upstream loops cost", not an optimised PyTorch sampler:

- ``generate_basic`` = ML-GSAI/LLaDA ``generate()`` (Oct-2025 version): the full canvas runs
  through the model at every step (k = 0 steps included), logits and a float32 softmax over
  the whole canvas, a python ``topk`` loop per row, CFG by doubling the batch, optional
  ``attention_mask`` for left-padded batches.
- ``generate_dual_cache`` = NVlabs/Fast-dLLM ``generate_with_dual_cache``: one full forward
  per block caches K/V of every position, then cached calls feed only the block and overwrite
  its cache entries in place (stale prefix and suffix); fixed-step schedule or confidence
  threshold; float64 softmax; NFE = 1 full call + at least one cached call per block.
- ``generate_prefix_cache`` = Fast-dLLM ``generate_with_prefix_cache`` (cached calls feed the
  block plus everything right of it against the prefix K/V of the block start).

All return ``(x, nfe)`` with ``x`` the full canvas ``[B, P + gen_length]`` (prompt included).
Temperature > 0 uses float64 Gumbel-max noise as upstream; pass ``generator`` for
reproducibility (upstream draws from the global RNG with ``rand_like``; the distribution is
the same). ``trace`` (a list) receives one dict per model call with what was unmasked.

The model is ``TorchLLaDA`` (``benchmarks/torch_llada_model.py``); the JAX side can read the
same weights through ``write_hf_dir``.

    python -m benchmarks.torch_llada     # timing demo on a random mid-size model (2 threads)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.torch_llada_model import (  # noqa: F401  (re-exported API)
    MID_SIZE,
    TorchLLaDA,
    export_state_dict_numpy,
    llada_config,
    load_config,
    load_fixture_state_dict,
    random_state_dict,
    state_dict_shapes,
    write_hf_dir,
)


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """exp(logits) / (-ln u)^T in float64 (argmax = a draw from softmax(logits / T)); T=0: identity."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
    return logits.exp() / (-torch.log(noise)) ** temperature


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """Per row: n masks spread over ``steps``; the first n % steps steps get one more. [B, steps] int64."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num[i, : remainder[i]] += 1
    return num


def _record(trace, call, block, transfer_index, x, cached, span):
    if trace is None:
        return
    rows = [torch.nonzero(transfer_index[j]).flatten() for j in range(transfer_index.shape[0])]
    trace.append({
        "call": call, "block": block, "cached_call": cached, "input_span": list(span),
        "unmasked_positions": [r.tolist() for r in rows],
        "unmasked_tokens": [x[j, r].tolist() for j, r in enumerate(rows)],
    })


# ---- ML-GSAI/LLaDA generate() ----------------------------------------------------------------

@torch.no_grad()
def generate_basic(model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   steps: int = 128, gen_length: int = 128, block_length: int = 128,
                   temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
                   mask_id: int | None = None, generator=None, trace: list | None = None):
    """The original LLaDA sampler. ``prompt_ids`` [B, P] (left-padded when ragged, with
    ``attention_mask`` [B, P], 1 = real token). Returns ``(x, nfe)``."""
    if mask_id is None:
        mask_id = model.mask_token_id
    B, P = prompt_ids.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt_ids.clone()
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask, torch.ones((B, gen_length), dtype=attention_mask.dtype)], dim=-1)
    prompt_index = x != mask_id

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks

    nfe = 0
    for num_block in range(num_blocks):
        block_start = P + num_block * block_length
        block_mask_index = x[:, block_start:block_start + block_length] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                mask_ = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
                logits = model(x_, attention_mask=mask_)
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask=attention_mask)
            nfe += 1

            logits_with_noise = add_gumbel_noise(logits, temperature, generator)
            x0 = torch.argmax(logits_with_noise, dim=-1)  # [B, L]

            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)  # float32, whole canvas, as upstream
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), generator=generator)
            else:
                raise NotImplementedError(remasking)

            x0_p[:, P + (num_block + 1) * block_length:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)

            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
            _record(trace, nfe - 1, num_block, transfer_index, x, False, (0, x.shape[1]))
    return x, nfe


# ---- Fast-dLLM ------------------------------------------------------------------------------

def get_transfer_index(logits, temperature, remasking, mask_index, x, num_transfer_tokens,
                       threshold=None, generator=None):
    """Fast-dLLM's selection: fixed k per row, or threshold mode (top-1 always, plus every other
    masked position with confidence >= threshold). Confidence = float64 softmax at the argmax."""
    logits_with_noise = add_gumbel_noise(logits, temperature, generator)
    x0 = torch.argmax(logits_with_noise, dim=-1)
    if remasking == "low_confidence":
        p = F.softmax(logits.to(torch.float64), dim=-1)
        x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    elif remasking == "random":
        x0_p = torch.rand((x0.shape[0], x0.shape[1]), generator=generator)
    else:
        raise NotImplementedError(remasking)

    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -np.inf)

    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    if threshold is not None:
        num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        k = int(num_transfer_tokens[j])
        _, select_index = torch.topk(confidence[j], k=k)
        transfer_index[j, select_index] = True
        if threshold is not None:
            for r in range(1, k):
                if confidence[j, select_index[r]] < threshold:
                    transfer_index[j, select_index[r]] = False
    return x0, transfer_index


def _canvas(prompt_ids, attention_mask, gen_length, mask_id):
    B, P = prompt_ids.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt_ids.clone()
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask, torch.ones((B, gen_length), dtype=attention_mask.dtype)], dim=-1)
    return x, attention_mask


@torch.no_grad()
def generate_dual_cache(model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                        steps: int = 128, gen_length: int = 128, block_length: int = 128,
                        temperature: float = 0.0, remasking: str = "low_confidence",
                        mask_id: int | None = None, threshold: float | None = None,
                        generator=None, trace: list | None = None):
    """Fast-dLLM ``generate_with_dual_cache``. Returns ``(x, nfe)``.

    Batching: upstream is batch-1 only (its canvas bug / ignored attention mask); here the rows
    of a left-padded batch share the canvas and the loop runs until every row's block is done,
    with the key-padding mask honoured in both the full and the cached calls. For batch 1
    without a mask this is exactly the upstream loop. As upstream, fixed steps with one step
    per block raise IndexError (the extra cached call indexes past the schedule)."""
    if mask_id is None:
        mask_id = model.mask_token_id
    P = prompt_ids.shape[1]
    x, attention_mask = _canvas(prompt_ids, attention_mask, gen_length, mask_id)

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks

    nfe = 0
    for num_block in range(num_blocks):
        start = P + num_block * block_length
        end = start + block_length
        block_mask_index = x[:, start:end] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps_per_block)

        # cache init + first update (full canvas)
        logits, cache, _ = model(x, attention_mask=attention_mask, use_cache=True)
        mask_index = x == mask_id
        mask_index[:, end:] = 0
        x0, transfer_index = get_transfer_index(
            logits, temperature, remasking, mask_index, x,
            num_transfer_tokens[:, 0] if threshold is None else None, threshold, generator)
        x[transfer_index] = x0[transfer_index]
        nfe += 1
        _record(trace, nfe - 1, num_block, transfer_index, x, False, (0, x.shape[1]))

        # As upstream (HEAD): the cached call comes first and the exit test after it, so every
        # block costs at least one cached call, even when the full call already finished it.
        i = 1
        while True:
            nfe += 1
            mask_index = x[:, start:end] == mask_id
            logits = model.forward_cached(x[:, start:end], cache, start, mode="dual",
                                          attention_mask=attention_mask)
            x0, transfer_index = get_transfer_index(
                logits, temperature, remasking, mask_index, x[:, start:end],
                num_transfer_tokens[:, i] if threshold is None else None, threshold, generator)
            x[:, start:end][transfer_index] = x0[transfer_index]
            if trace is not None:
                full = torch.zeros_like(x, dtype=torch.bool)
                full[:, start:end] = transfer_index
                _record(trace, nfe - 1, num_block, full, x, True, (start, end))
            i += 1
            if (x[:, start:end] == mask_id).sum() == 0:
                break
    return x, nfe


@torch.no_grad()
def generate_prefix_cache(model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                          steps: int = 128, gen_length: int = 128, block_length: int = 128,
                          temperature: float = 0.0, remasking: str = "low_confidence",
                          mask_id: int | None = None, threshold: float | None = None,
                          generator=None, trace: list | None = None):
    """Fast-dLLM ``generate_with_prefix_cache`` (batched like ``generate_dual_cache``)."""
    if mask_id is None:
        mask_id = model.mask_token_id
    P = prompt_ids.shape[1]
    x, attention_mask = _canvas(prompt_ids, attention_mask, gen_length, mask_id)

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks

    nfe = 0
    for num_block in range(num_blocks):
        start = P + num_block * block_length
        end = start + block_length
        num_transfer_tokens = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)

        logits, cache, _ = model(x, attention_mask=attention_mask, use_cache=True)
        mask_index = x == mask_id
        mask_index[:, end:] = 0
        x0, transfer_index = get_transfer_index(
            logits, temperature, remasking, mask_index, x,
            num_transfer_tokens[:, 0] if threshold is None else None, threshold, generator)
        x[transfer_index] = x0[transfer_index]
        nfe += 1
        _record(trace, nfe - 1, num_block, transfer_index, x, False, (0, x.shape[1]))
        cache = [(k[:, :, :start], v[:, :, :start]) for k, v in cache]  # keep only the prefix

        i = 1
        while True:  # cached call first, exit test after it (see generate_dual_cache)
            nfe += 1
            mask_index = x[:, start:] == mask_id
            mask_index[:, block_length:] = 0
            logits = model.forward_cached(x[:, start:], cache, start, mode="prefix",
                                          attention_mask=attention_mask)
            if temperature > 0:  # upstream draws (and discards) one extra noise tensor here
                add_gumbel_noise(logits, temperature, generator)
            x0, transfer_index = get_transfer_index(
                logits, temperature, remasking, mask_index, x[:, start:],
                num_transfer_tokens[:, i] if threshold is None else None, threshold, generator)
            x[:, start:][transfer_index] = x0[transfer_index]
            if trace is not None:
                full = torch.zeros_like(x, dtype=torch.bool)
                full[:, start:] = transfer_index
                _record(trace, nfe - 1, num_block, full, x, True, (start, x.shape[1]))
            i += 1
            if (x[:, start:end] == mask_id).sum() == 0:
                break
    return x, nfe


# ---- timing demo ----------------------------------------------------------------------------

def _demo():
    import argparse
    import time

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--skip-basic", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = llada_config(**MID_SIZE)
    sd = random_state_dict(**MID_SIZE, seed=0)
    model = TorchLLaDA.from_state_dict(sd, cfg)
    n_params = sum(v.numel() for v in sd.values())
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg["mask_token_id"], (args.batch, args.prompt), generator=gen)
    print(f"random LLaDA {MID_SIZE} ({n_params / 1e6:.1f}M params), float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch {args.batch}, prompt {args.prompt}, gen {args.gen}, "
          f"block {args.block}, steps {args.steps}")
    model(prompt)  # warm-up

    runs = [("dual_cache fixed", generate_dual_cache, {}),
            (f"dual_cache thr={args.threshold}", generate_dual_cache, {"threshold": args.threshold})]
    if not args.skip_basic:
        runs.insert(0, ("basic", generate_basic, {}))
    for name, fn, kw in runs:
        t0 = time.perf_counter()
        _, nfe = fn(model, prompt, steps=args.steps, gen_length=args.gen, block_length=args.block, **kw)
        dt = time.perf_counter() - t0
        print(f"{name:>22}: {dt:7.2f} s  nfe {nfe:4d}  {dt / nfe * 1e3:7.1f} ms/call  "
              f"{args.batch * args.gen / dt:7.1f} tokens/s")


if __name__ == "__main__":
    _demo()
