"""Diffusion sampling: jitted step programs with static block schedules, every row at its own step."""

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
    batch_bucket,
    bucket,
    check_stop_count,
    resolve_algorithm,
)
from dllm_jax.sampling.score import ScoreOutput, score
from dllm_jax.sampling.decoders import BlockDecoder, Decoder, SlidingDecoder
from dllm_jax.sampling.generation import GenerateOutput, generate
from dllm_jax.sampling.programs import Programs, program_key
from dllm_jax.sampling.session import STEPS_PER_CALL, DecodeSession, SlotUpdate, final_prefix
from dllm_jax.sampling.slots import Row
from dllm_jax.sampling.state import DecodeState

__all__ = [
    "ALGORITHMS", "ALIASES", "Algorithm", "BATCH_BUCKETS", "BlockDecoder", "Decoder", "SlidingDecoder", "STEPS_PER_CALL", "batch_bucket", "bucket", "check_stop_count", "ContextOverflow", "DEFAULT_ALGORITHM",
    "DecodeSession", "DecodeState", "GenerateOutput", "MAX_STOP_IDS", "MAX_TOP_LOGPROBS", "PROMPT_BUCKETS",
    "ProgramKey", "Programs", "Row", "SamplingError", "SamplingParams", "ScoreOutput", "SlotUpdate", "final_prefix",
    "generate", "program_key", "resolve_algorithm", "rules", "score",
]
