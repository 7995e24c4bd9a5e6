"""JAX sampler vs the PyTorch eager upstream loops, side by side in one process (CPU).

Both sides get the same random weights of a mid-size LLaDA shape (written once as an HF dir
that ``dllm_jax.load`` reads), the same prompts and the same settings; every case checks
that the tokens are identical and prints tokens/s, NFE, the JAX/PyTorch ratio and the
fraction of this machine's float32 matmul peak that the JAX sampler achieves.

    python -m benchmarks.sampler_bench                 # default: mid shape, 3 repeats
    python -m benchmarks.sampler_bench --quick         # 1 repeat, fewer cases
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

SHAPES = {
    # ~29M params: a full-canvas forward takes tens of milliseconds on 2 cores.
    "mid": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_hidden=1408, vocab=4096),
    # the same with LLaDA's real 126464-token vocabulary: upstream's logits and softmax over the
    # whole canvas x vocabulary then cost more than the blocks (as in small LLaDA-style models).
    "mid-vocab": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_hidden=1408, vocab=126464),
    # ~111M params (dllm_jax LLaDAConfig.llada_1b()).
    "large": dict(d_model=1024, n_layers=8, n_heads=16, n_kv_heads=16, mlp_hidden=2816, vocab=4096),
}

# (name, torch loop, jax algorithm, extra kwargs, batch, prompt, gen)
CASES = [
    ("basic fixed", "basic", "basic", {}, 1, 64, 128),
    ("basic fixed", "basic", "basic", {}, 8, 64, 128),
    ("dual_cache fixed", "dual", "dual_cache", {}, 1, 64, 128),
    ("dual_cache fixed", "dual", "dual_cache", {}, 8, 64, 128),
    ("dual_cache thr 0.9", "dual", "dual_cache", {"threshold": 0.9}, 1, 64, 128),
    ("dual_cache thr 0.9", "dual", "dual_cache", {"threshold": 0.9}, 8, 64, 128),
    ("basic fixed", "basic", "basic", {}, 1, 128, 256),
    ("dual_cache fixed", "dual", "dual_cache", {}, 1, 128, 256),
    ("dual_cache thr 0.9", "dual", "dual_cache", {"threshold": 0.9}, 1, 128, 256),
]
QUICK = [0, 2, 4, 6, 7]
BLOCK = 32


def model_flops(spec, algorithm: str, batch: int, prompt: int, gen: int, nfe: int) -> float:
    """Necessary model FLOPs of a run (head only where logits are used: the block)."""
    from benchmarks.common import forward_flops

    length = prompt + gen
    full = forward_flops(spec, batch=batch, q_tokens=length, kv_len=length, head_positions=BLOCK)
    if algorithm == "basic":
        return nfe * full
    blocks = gen // BLOCK
    cached = forward_flops(spec, batch=batch, q_tokens=BLOCK, kv_len=length, head_positions=BLOCK)
    return blocks * full + (nfe - blocks) * cached


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 5 cases")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats

    import jax
    import torch

    import dllm_jax
    from benchmarks.common import device_description, matmul_peak, median_time, print_table
    from benchmarks.torch_llada import (
        TorchLLaDA,
        generate_basic,
        generate_dual_cache,
        llada_config,
        random_state_dict,
        write_hf_dir,
    )

    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    cfg = llada_config(**shape)
    sd = random_state_dict(**shape, seed=0)
    tmodel = TorchLLaDA.from_state_dict(sd, cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_dir(sd, cfg, tmp)
        jmodel = dllm_jax.load(tmp)
    spec = jmodel.spec
    peak = matmul_peak("float32")
    print(f"model: random LLaDA {shape} = {spec.param_count() / 1e6:.1f}M params, float32")
    print(f"device: {device_description()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"float32 matmul peak (2048^3, jax): {peak / 1e9:.0f} GFLOP/s; repeats: {repeats} (median)")

    rng = np.random.default_rng(0)
    rows = []
    torch_basic = {}
    for idx in (QUICK if args.quick else range(len(CASES))):
        name, tloop, algo, extra, batch, plen, gen = CASES[idx]
        prompts = rng.integers(0, cfg["mask_token_id"], size=(batch, plen))
        kw = dict(gen_length=gen, block_length=BLOCK, steps=gen, **extra)

        def run_torch():
            fn = generate_basic if tloop == "basic" else generate_dual_cache
            with torch.no_grad():
                x, nfe = fn(tmodel, torch.tensor(prompts), mask_id=cfg["mask_token_id"], **kw)
            return x[:, plen:].numpy(), nfe

        def run_jax():
            out = jmodel.generate(prompts, algorithm=algo, **kw)
            return out.tokens, out.nfe

        run_jax()  # compile
        t_jax, _ = median_time(run_jax, repeats)
        j_tokens, j_nfe = run_jax()
        t_torch, _ = median_time(run_torch, repeats)
        t_tokens, t_nfe = run_torch()
        same = bool(np.array_equal(j_tokens, t_tokens))
        if tloop == "basic":
            torch_basic[(batch, plen, gen)] = t_torch
        flops = model_flops(spec, "basic" if algo == "basic" else "dual", batch, plen, gen, j_nfe)
        rows.append({
            "algorithm": name, "batch": batch, "prompt": plen, "gen": gen, "steps": gen, "block": BLOCK,
            "torch s": t_torch, "jax s": t_jax, "torch tok/s": batch * gen / t_torch,
            "jax tok/s": batch * gen / t_jax, "jax/torch": t_torch / t_jax,
            "vs torch basic": (torch_basic.get((batch, plen, gen), float("nan")) / t_jax),
            "NFE torch/jax": f"{t_nfe}/{j_nfe}", "identical": "yes" if same else "NO",
            "jax % of peak": 100 * flops / t_jax / peak,
        })
        print(f"  done: {name} b{batch} p{plen} g{gen}: torch {t_torch:.2f}s jax {t_jax:.2f}s same={same}", flush=True)
    print_table(rows, ["algorithm", "batch", "prompt", "gen", "steps", "block", "torch s", "jax s", "torch tok/s",
                       "jax tok/s", "jax/torch", "vs torch basic", "NFE torch/jax", "identical", "jax % of peak"],
                title=f"Sampler benchmark ({args.shape} shape, {spec.param_count() / 1e6:.0f}M params, "
                      f"{device_description()})")
    return rows


if __name__ == "__main__":
    main()
