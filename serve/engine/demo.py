"""The demo model ``python -m serve`` serves when no ``--model`` is given.

``dllm_jax.DEMO_MODEL``: a 2.0M-parameter LLaDA trained in this repo (``python -m
dllm_jax.demo.train``) on additions (``What is 12+34?``), counting (``Count from 5 to 20.``)
and a few chat turns, shipped as package data (an HF dir, ~8 MB). It needs no download,
starts in seconds and answers its two tasks correctly, so the samplers' speed levers
(threshold / factor decoding) behave as on a real model.
"""

from __future__ import annotations

import logging

import dllm_jax
from dllm_jax.checkpoint import dtypes

DEMO_NAME = "dllm-jax-demo"

log = logging.getLogger("serve")


def demo_model(mesh=None, dtype=None):
    """The trained demo Model (``dllm_jax.DEMO_MODEL``)."""
    log.warning("no --model given: serving %r, the tiny trained demo model (additions and counting only)",
                DEMO_NAME)
    return dllm_jax.load(dllm_jax.DEMO_MODEL, mesh=mesh, dtype=dtypes.param_dtype(dtype) if dtype else None)
