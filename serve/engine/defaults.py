"""What a request that names no decoder runs, per model family.

Both halves read this table: the engine compiles these programs at warm-up (``default_params``),
and the front end fills them into requests that leave the fields out
(``serve.api.request_params``). It lives on the engine side so the engine needs nothing from
the HTTP front end.
"""

from __future__ import annotations

from dllm_jax.sampling import SamplingParams

# What a plain OpenAI request (only `messages`) runs, per family. LLaDA: Fast-dLLM dual cache
# with the 0.9 confidence threshold (the fastest exact-upstream mode); Nemotron: its own
# NeMo-RL static-block decoder. early_stop ends a row at the first block holding EOS.
FAMILY_DEFAULTS = {
    "llada": {"algorithm": "dual_cache", "block_length": 32, "threshold": 0.9, "factor": None, "early_stop": True},
    "nemotron": {"algorithm": "static_block", "block_length": 32, "threshold": None, "factor": 1.0,
                 "early_stop": True},
}


def default_params(family: str, gen_length: int) -> SamplingParams:
    """The family's default settings for a canvas of gen_length (used for warm-up)."""
    d = FAMILY_DEFAULTS[family]
    return SamplingParams(gen_length=gen_length, block_length=d["block_length"], algorithm=d["algorithm"],
                          threshold=d["threshold"], factor=d["factor"], early_stop=d["early_stop"]).resolve(family)
