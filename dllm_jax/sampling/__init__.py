"""Diffusion sampling: jitted block programs with static schedules, driven block by block."""

from dllm_jax.sampling import rules
from dllm_jax.sampling.params import (
    ALGORITHMS,
    ALIASES,
    BATCH_BUCKETS,
    DEFAULT_ALGORITHM,
    MAX_STOP_IDS,
    MAX_TOP_LOGPROBS,
    PROMPT_BUCKETS,
    Algorithm,
    ContextOverflow,
    ProgramKey,
    SamplingError,
    SamplingParams,
    resolve_algorithm,
)
from dllm_jax.sampling.score import ScoreOutput, score
from dllm_jax.sampling.session import (
    DecodeSession,
    GenerateOutput,
    SlotUpdate,
    final_prefix,
    generate,
    program_key,
)
from dllm_jax.sampling.state import DecodeState, Row

__all__ = [
    "ALGORITHMS", "ALIASES", "Algorithm", "BATCH_BUCKETS", "ContextOverflow", "DEFAULT_ALGORITHM",
    "DecodeSession", "DecodeState", "GenerateOutput", "MAX_STOP_IDS", "MAX_TOP_LOGPROBS", "PROMPT_BUCKETS",
    "ProgramKey", "Row", "SamplingError", "SamplingParams", "ScoreOutput", "SlotUpdate", "final_prefix",
    "generate", "program_key", "resolve_algorithm", "rules", "score",
]
