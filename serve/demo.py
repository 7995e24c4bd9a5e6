"""The demo model ``python -m serve`` serves when no ``--model`` is given.

Random weights in the LLaDA tiny shape (``LLaDAConfig.tiny()``) with the tiny fixture's
byte-level tokenizer (package data in ``dllm_jax/assets/demo_tokenizer``): it needs no
download, starts in seconds, and its output is meaningless text. It exists so that the
README's run command works on a fresh machine and clients can be tried against it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dllm_jax
from dllm_jax.checkpoint import dtypes, load_tokenizer

DEMO_NAME = "dllm-jax-demo-random"
TOKENIZER_DIR = Path(dllm_jax.__file__).parent / "assets" / "demo_tokenizer"

log = logging.getLogger("serve")


def demo_model(mesh=None, seed: int = 0, dtype=None):
    """A random-weight LLaDA-tiny Model with the demo tokenizer."""
    log.warning("no --model given: serving %r, a tiny LLaDA with RANDOM weights (demo only; its text is "
                "meaningless)", DEMO_NAME)
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    config = dllm_jax.LLaDAConfig.tiny()
    dtype = dtypes.param_dtype(dtype) if dtype is not None else dtypes.param_dtype("float32")
    return dllm_jax.Model.random(config, seed=seed, tokenizer=tokenizer, mesh=mesh, dtype=dtype)
