"""Write the benchmark model: a mid-size random LLaDA with the demo tokenizer, as an HF dir.

    python -m benchmarks.bench_model /tmp/bench-model      # then: python -m serve --model /tmp/bench-model

d_model 512, 8 layers, 8 heads, MLP 1408 (25.6M block params) with the 384-token byte-level
tokenizer that ships in ``dllm_jax/assets/demo_tokenizer`` (same special ids as the tiny
fixture: mask 336, eos 257, pad 258), so the server can tokenize and detokenize everything
it generates. Random weights: the text is meaningless, the timings are not.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

import dllm_jax
from dllm_jax.checkpoint import save_safetensors

ASSETS = Path(dllm_jax.__file__).parent / "assets" / "demo_tokenizer"


def bench_config() -> dllm_jax.LLaDAConfig:
    return dllm_jax.LLaDAConfig(d_model=512, n_heads=8, n_kv_heads=8, n_layers=8, mlp_hidden_size=1408,
                                vocab_size=384, embedding_size=384, max_sequence_length=2048,
                                mask_token_id=336, eos_token_id=257, pad_token_id=258)


def write(path: str | Path, seed: int = 0) -> Path:
    cfg = bench_config()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    d, f, v = cfg.d_model, cfg.mlp_hidden_size, cfg.embedding_size
    tensors = {"model.transformer.wte.weight": rng.standard_normal((v, d), np.float32),
               "model.transformer.ln_f.weight": np.ones(d, np.float32),
               "model.transformer.ff_out.weight": rng.standard_normal((v, d), np.float32) * (5 / d ** 0.5)}
    for i in range(cfg.n_layers):
        p = f"model.transformer.blocks.{i}."
        for name, shape in [("q_proj", (d, d)), ("k_proj", (d, d)), ("v_proj", (d, d)), ("attn_out", (d, d)),
                            ("ff_proj", (f, d)), ("up_proj", (f, d)), ("ff_out", (d, f))]:
            scale = (2.0 if name in ("q_proj", "k_proj") else 1.0) / shape[1] ** 0.5
            tensors[p + name + ".weight"] = (rng.standard_normal(shape, np.float32) * scale).astype(np.float32)
        tensors[p + "attn_norm.weight"] = np.ones(d, np.float32)
        tensors[p + "ff_norm.weight"] = np.ones(d, np.float32)
    save_safetensors(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
    for f_ in ASSETS.iterdir():
        shutil.copy(f_, path / f_.name)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dest")
    print(write(ap.parse_args().dest))
