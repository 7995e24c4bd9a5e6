"""Launcher for the peer server dlmserve (run by ``benchmarks/peers.py`` with the peers
virtualenv's Python, never imported by this project's code).

    .peers-venv/bin/python benchmarks/peers_dlmserve.py --model DIR --port 8001 --dtype float32 --threads 1

dlmserve 0.1.1 serves only the LLaDA-8B family as published. This launcher imports it
unchanged and patches it in memory (its installed files are never edited):

- ``dlmserve.engine.load_llada`` is replaced by ``load`` below: the mask id comes from the
  checkpoint's ``config.json`` (``mask_token_id``) instead of dlmserve's hard-coded
  LLaDA-8B id 126336 (and its check that ``<|mdm_mask|>`` has that id), and ``float32`` is
  accepted besides dlmserve's ``int4`` / ``bf16`` (so its tokens can be compared with ours);
  everything else is dlmserve's loader: left padding, ``AutoModel`` with the checkpoint's
  remote code (written by ``peers.py`` beside the weights), ``eval()``;
- torch runs with ``--threads`` intra-op threads (and one inter-op thread);
- uvicorn listens on 127.0.0.1 (dlmserve's ``main`` binds 0.0.0.0).

The server, its scheduler, denoising loop and sampler are dlmserve's own.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def load(model_id: str, dtype: str = "float32", device="cpu"):
    """dlmserve's ``load_llada`` with the mask id read from config.json and float32 allowed."""
    import torch
    from dlmserve.models import llada
    from transformers import AutoModel, AutoTokenizer

    if dtype not in ("float32", "bf16"):
        return ORIGINAL_LOAD(model_id=model_id, dtype=dtype, device=device)
    mask_id = int(json.loads((Path(model_id) / "config.json").read_text())["mask_token_id"])
    tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id == mask_id:
        raise RuntimeError(f"pad_token_id ({tokenizer.pad_token_id}) equals the mask id")
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    model = AutoModel.from_pretrained(model_id, torch_dtype=torch_dtype, trust_remote_code=True).to(device)
    model.eval()
    return llada.LoadedLLaDA(model=model, tokenizer=tokenizer, device=next(model.parameters()).device,
                             dtype=dtype, mask_id=mask_id)


ORIGINAL_LOAD = None


def main() -> None:
    global ORIGINAL_LOAD
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF LLaDA dir with remote code (peers.py prepares it)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dtype", default="float32", help="float32 | bf16 | int4 (dlmserve's own loader)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()

    # dlmserve reads these at import time
    os.environ["DLMSERVE_MODEL"] = args.model
    os.environ["DLMSERVE_DTYPE"] = args.dtype
    os.environ["DLMSERVE_DEVICE"] = "cpu"
    os.environ.setdefault("DLMSERVE_LOG_LEVEL", "warning")

    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    import uvicorn
    from dlmserve import engine
    from dlmserve.api import server

    ORIGINAL_LOAD = engine.load_llada
    engine.load_llada = load  # engine.load_model looks the name up in its module
    uvicorn.run(server.app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
