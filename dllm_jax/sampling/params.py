"""Sampling parameters, the algorithm registry and validation.

Names follow the upstream reference implementations (``gen_length``, ``steps``,
``block_length``, ``temperature``, ``cfg_scale``, ``remasking``, ``threshold``, ``factor``)
and the algorithm names of the PyTorch server this project replaces.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from dllm_jax.configs import FAMILY_CONFIGS
from dllm_jax.sampling import head_filters, proposal, rules
from dllm_jax.sampling.decoders import BlockDecoder, Decoder, SlidingDecoder
from dllm_jax.sampling.errors import SamplingError

# Stop tokens a row can hold on the device (early stop compares against all of them).
MAX_STOP_IDS = 8
# Width of the top-logprobs record of a program that tracks logprobs (a request asks for <= this).
MAX_TOP_LOGPROBS = 20
# Which distribution a committed token's logprob is of (``SamplingParams.logprobs_mode``).
LOGPROBS_MODES = ("raw", "processed")


class ContextOverflow(SamplingError):
    """Prompt + canvas (+ the static-block decoder's room) does not fit the model's context."""

    def __init__(self, prompt_tokens: int, gen_length: int, extra: int, context: int):
        self.prompt_tokens, self.gen_length, self.extra, self.context = prompt_tokens, gen_length, extra, context
        super().__init__(f"prompt ({prompt_tokens} tokens) + gen_length ({gen_length}){self.room} exceeds the model's "
                         f"context of {context} tokens", "gen_length")

    @property
    def room(self) -> str:
        """The decoder's own room in a message (`` + 2*block_length (64)``; empty when none)."""
        return f" + 2*block_length ({self.extra})" if self.extra else ""


def check_stop_count(stops: Sequence[int], subject: str, error=SamplingError) -> None:
    """Refuse more stop tokens than a row holds (``MAX_STOP_IDS``): raises ``error(message,
    "stop_token_ids")``; ``subject`` begins the message ("stop_token_ids has 9 tokens")."""
    if len(stops) > MAX_STOP_IDS:
        raise error(f"{subject}; at most {MAX_STOP_IDS} are supported", "stop_token_ids")


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A named decoder.

    Attributes:
      name: canonical name.
      decoder: the program kind that runs it, with its cache and rule
        (``dllm_jax.sampling.decoders``).
      description: one line for /v1/models and docs.
    """

    name: str
    decoder: Decoder
    description: str = ""

    @property
    def cache(self) -> str:
        return self.decoder.cache

    @property
    def rule(self) -> int | None:
        """The rule code the algorithm fixes (None: each row picks by its knobs)."""
        return self.decoder.rule

    @property
    def run_empty_steps(self) -> bool:
        return isinstance(self.decoder, BlockDecoder) and self.decoder.run_empty_steps


def _dinfer(rule: int) -> BlockDecoder:
    return BlockDecoder(cache="dual", rule=rule, default_threshold=0.9)


ALGORITHMS = {a.name: a for a in [
    Algorithm("basic", BlockDecoder(cache="none", run_empty_steps=True),
              "LLaDA reference generate(): full canvas every step, static schedule"),
    Algorithm("no_cache", BlockDecoder(cache="none"),
              "Fast-dLLM generate(): full canvas every step, leaves a block once filled"),
    Algorithm("prefix_cache", BlockDecoder(cache="prefix"), "Fast-dLLM prefix KV cache, refreshed per block"),
    Algorithm("dual_cache", BlockDecoder(cache="dual"), "Fast-dLLM dual (prefix+suffix) KV cache, refreshed per block"),
    Algorithm("dinfer_blockwise", _dinfer(rules.THRESHOLD), "dInfer threshold decoder on the dual cache"),
    Algorithm("dinfer_hierarchy", _dinfer(rules.HIERARCHY),
              "dInfer hierarchy decoder (run-wise best + threshold) on the dual cache"),
    Algorithm("dinfer_credit", _dinfer(rules.CREDIT), "dInfer credit-fused threshold decoder on the dual cache"),
    Algorithm("static_block", SlidingDecoder(),
              "NeMo-RL dllm_eval static-block sliding decoder (Nemotron-Diffusion)"),
]}

ALIASES = {
    "simple": "basic", "llada": "basic", "fast_dllm": "no_cache",
    "prefix": "prefix_cache", "cache": "prefix_cache",
    "dual": "dual_cache", "double_cache": "dual_cache",
    "dinfer": "dinfer_blockwise", "dinfer_block": "dinfer_blockwise", "blockwise": "dinfer_blockwise",
    "dinfer_hierarchical": "dinfer_hierarchy", "dinfer_credit_threshold": "dinfer_credit",
    "dllm_eval": "static_block", "nemotron": "static_block", "nemotron_native": "static_block",
    "nemotron_diffusion": "static_block",
}

# What a plain call (no algorithm given) runs, per family (the configs' ``default_algorithm``).
DEFAULT_ALGORITHM = {family: config.default_algorithm for family, config in FAMILY_CONFIGS.items()}


def resolve_algorithm(name: str | None, family: str) -> Algorithm:
    if name is None:
        name = DEFAULT_ALGORITHM[family]
    canonical = ALIASES.get(name, name)
    if canonical not in ALGORITHMS:
        valid = sorted(ALGORITHMS) + sorted(ALIASES)
        raise SamplingError(f"unknown algorithm {name!r}; valid: {', '.join(valid)}", "algorithm")
    algo = ALGORITHMS[canonical]
    if isinstance(algo.decoder, SlidingDecoder) and not FAMILY_CONFIGS[family].sliding_decoder:
        raise SamplingError(f"algorithm {name!r} is the Nemotron-Diffusion decoder; this is a {family} model",
                            "algorithm")
    return algo


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """One request's sampling settings.

    Attributes:
      gen_length: canvas length (tokens generated).
      steps: total denoising steps over the canvas (default gen_length); must be a multiple of
        the number of blocks. Unused by threshold/factor rules except for that check.
      block_length: semi-autoregressive block size; must divide gen_length.
      temperature: 0 = greedy; > 0 Gumbel-max sampling.
      cfg_scale: classifier-free guidance (full-canvas algorithms only).
      remasking: the selection policy, how a step ranks the block's masked positions:
        'low_confidence' (by the model's confidence), 'random' (by uniform noise) or 'leftmost'
        (by position: each step commits a left-to-right prefix of the block's masks; the
        threshold/factor/dInfer rules keep testing the model's confidence, docs/sampling.md).
      threshold: Fast-dLLM confidence threshold in (0, 1] (top-1 always + all >= threshold).
      factor: Fast-dLLM factor rule (> 0) or the Nemotron acceptance factor (>= 0).
      entropy_bound: the EB-Sampler's gamma (>= 0): each step commits, in the row's ranking
        order, the longest run of masked positions whose summed entropy minus its largest stays
        <= gamma (at least one). None = off.
      block_add_threshold: multi-block decoding (d3LLM's name): once this fraction (0, 1] of the
        row's block is committed, the next block decodes too, committing only what its rule
        accepts without a forced token (docs/sampling.md, "Multi-block decoding"). None = off;
        needs a threshold, factor or entropy_bound rule and low_confidence remasking.
      algorithm: name or alias (None = the family default).
      seed: per-request RNG seed (T > 0 and random remasking).
      early_stop: stop a row once a finished block contains a stop token (the text before
        the first stop token is unchanged by this; the canvas after it becomes EOS).
      shift_logits: read the prediction for position j from output j-1 (next-token
        predictors such as the released Nemotron checkpoint). None = family default.
      stop_token_ids: tokens that end a reply (None = the model's EOS / end-of-turn ids).
      top_k: at T > 0, draw only among the k most probable tokens (0 = off).
      top_p: at T > 0, draw only from the nucleus: the most probable tokens whose mass (of
        the top_k-renormalised softmax(logits / T)) reaches top_p (1 = off).
      min_p: at T > 0, draw only tokens with p >= min_p * p_max (0 = off). The filters never
        change which positions are committed (confidence is the unfiltered softmax) and do
        nothing at T = 0 (the greedy token is inside every filter).
      logprobs: record, for each committed token, its log-probability and the ``logprobs``
        most probable tokens (<= MAX_TOP_LOGPROBS) at the step it was committed (None = off).
      logprobs_mode: which distribution those log-probabilities are of: 'raw' (the model's
        softmax, untempered and unfiltered) or 'processed' (at T > 0 the distribution the token
        was drawn from: softmax(logits / T) over the top_k/top_p/min_p set, renormalised; at
        T = 0 the same as 'raw').
      trace: a ``DecodeSession`` reports, for this row, each final token's commit step and
        confidence (``SlotUpdate.commit_step`` / ``commit_conf``; the server's
        ``stream_trace``). Changes nothing else: not the tokens, not the compiled program.
    """

    gen_length: int = 128
    steps: int | None = None
    block_length: int = 32
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    factor: float | None = None
    entropy_bound: float | None = None
    block_add_threshold: float | None = None
    algorithm: str | None = None
    seed: int = 0
    early_stop: bool = False
    shift_logits: bool | None = None
    stop_token_ids: tuple[int, ...] | None = None
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    logprobs: int | None = None
    logprobs_mode: str = "raw"
    trace: bool = False

    def resolve(self, family: str) -> "SamplingParams":
        """Validate and fill defaults; raises SamplingError naming the offending argument."""
        algo = resolve_algorithm(self.algorithm, family)
        g, lb = self.gen_length, self.block_length
        _int_at_least(g, 1, "gen_length")
        _int_at_least(lb, 1, "block_length")
        if g % lb:
            raise SamplingError(f"block_length={lb} must divide gen_length={g}", "block_length")
        steps = g if self.steps is None else self.steps
        _int_at_least(steps, 1, "steps")
        self._check_knobs()
        resolved = algo.decoder.check(dataclasses.replace(self, algorithm=algo.name, steps=steps), family)
        shift = self.shift_logits
        if shift is None:
            shift = FAMILY_CONFIGS[family].shift_logits
        self._check_filters()
        self._check_outputs()
        stops = None if self.stop_token_ids is None else tuple(int(t) for t in self.stop_token_ids)
        if stops is not None:
            check_stop_count(stops, f"stop_token_ids has {len(stops)} tokens")
        if stops is not None and any(t < 0 for t in stops):
            raise SamplingError(f"stop_token_ids={list(stops)} must be non-negative token ids", "stop_token_ids")
        return dataclasses.replace(self, algorithm=algo.name, steps=steps, threshold=resolved["threshold"],
                                   factor=resolved["factor"], shift_logits=bool(shift), stop_token_ids=stops,
                                   temperature=float(self.temperature), cfg_scale=float(self.cfg_scale),
                                   entropy_bound=None if self.entropy_bound is None else float(self.entropy_bound),
                                   block_add_threshold=None if self.block_add_threshold is None
                                   else float(self.block_add_threshold),
                                   top_p=float(self.top_p), min_p=float(self.min_p), trace=bool(self.trace))

    def _check_knobs(self) -> None:
        """The decoding knobs' ranges (what an algorithm allows is its decoder's ``check``)."""
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < float("inf")):
            raise SamplingError(f"temperature={self.temperature!r} must be a finite number >= 0", "temperature")
        if not isinstance(self.remasking, str) or self.remasking not in rules.REMASKING:
            raise SamplingError(f"remasking={self.remasking!r} must be one of "
                                f"{', '.join(map(repr, rules.REMASKING))}", "remasking")
        if not (isinstance(self.cfg_scale, (int, float)) and 0 <= self.cfg_scale < float("inf")):
            raise SamplingError(f"cfg_scale={self.cfg_scale!r} must be a finite number >= 0", "cfg_scale")
        threshold, factor = self.threshold, self.factor
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
            raise SamplingError(f"threshold={threshold!r} must be in (0, 1]", "threshold")
        if factor is not None and not (isinstance(factor, (int, float)) and 0 <= factor < float("inf")):
            raise SamplingError(f"factor={factor!r} must be a finite number >= 0", "factor")
        bound = self.entropy_bound
        if bound is not None and not (isinstance(bound, (int, float)) and not isinstance(bound, bool)
                                      and 0 <= bound < float("inf")):
            raise SamplingError(f"entropy_bound={bound!r} must be a finite number >= 0", "entropy_bound")
        add = self.block_add_threshold
        if add is not None and not (isinstance(add, (int, float)) and not isinstance(add, bool) and 0 < add <= 1):
            raise SamplingError(f"block_add_threshold={add!r} must be in (0, 1]", "block_add_threshold")

    def _check_filters(self) -> None:
        _int_at_least(self.top_k, 0, "top_k")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise SamplingError(f"top_p={self.top_p!r} must be in (0, 1]", "top_p")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            raise SamplingError(f"min_p={self.min_p!r} must be in [0, 1]", "min_p")

    def _check_outputs(self) -> None:
        """logprobs, logprobs_mode and the seed."""
        if self.logprobs is not None:
            _int_at_least(self.logprobs, 0, "logprobs")
            if self.logprobs > MAX_TOP_LOGPROBS:
                raise SamplingError(f"logprobs={self.logprobs} must be <= {MAX_TOP_LOGPROBS}", "logprobs")
        if not isinstance(self.logprobs_mode, str) or self.logprobs_mode not in LOGPROBS_MODES:
            raise SamplingError(f"logprobs_mode={self.logprobs_mode!r} must be one of "
                                f"{', '.join(map(repr, LOGPROBS_MODES))}", "logprobs_mode")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise SamplingError(f"seed={self.seed!r} must be a non-negative integer", "seed")

    @property
    def rule(self) -> int:
        """Per-row rule code for algorithms that let the row choose (``rules.row_rule``)."""
        return rules.row_rule(self.threshold, self.factor, self.entropy_bound)


def _int_at_least(value, low: int, name: str):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SamplingError(f"{name}={value!r} must be an integer >= {low}", name)


@dataclasses.dataclass(frozen=True)
class ProgramKey:
    """Everything that fixes a compiled program's shapes and control flow.

    Requests with equal keys can share a batch (their other settings are per-row arrays).
    """

    algorithm: str
    batch: int
    prompt_len: int   # bucketed, left-padded prompt region
    gen_length: int
    block_length: int
    steps_per_block: int
    cfg: bool
    shift: bool
    logprobs: int = 0  # top-logprobs width recorded per committed token (0: no logprobs tracked)
    # the lean head (docs/sampling.md): the program holds no [B, Lb, V] logits, so it admits only
    # rows that need none (``lean_head_ok``: no top_p or top_k > 64 at T > 0, no credit fusion)
    lean_head: bool = False
    # multi-block decoding (``lookahead``): every forward covers the row's block and the next one
    lookahead: bool = False

    @property
    def decoder(self) -> Decoder:
        return ALGORITHMS[self.algorithm].decoder

    @property
    def canvas_len(self) -> int:
        return self.prompt_len + self.gen_length + self.decoder.extra_length(self.block_length)

    def group(self) -> ProgramKey:
        """This key up to batch size and prompt bucket (both 0): the requests of one group can share
        a compiled program (a shorter prompt is left-padded into a longer bucket)."""
        return dataclasses.replace(self, batch=0, prompt_len=0)


def lean_head_ok(params: SamplingParams) -> bool:
    """The request can run on a lean-head program (no [B, Lb, V] logits; ``params`` resolved): a
    block decoder without dInfer's credit fusion (the credit is itself [B, Lb, V]), and at T > 0 no
    top_p filter (it needs the whole sorted distribution), top_k at most ``head_filters.FILTER_K``
    (the largest logits the head tracks; any min_p) and a PRNG whose Gumbel noise the head can draw
    chunk by chunk (``proposal.chunked_gumbel_exact``: JAX's default threefry). At T = 0 the filters
    do nothing and 'processed' logprobs are the raw ones; at T > 0 they are log-softmax(logits / T)
    over the filter set, online sums of the head's (``head.HeadStats``, ``head_filters``)."""
    decoder = ALGORITHMS[params.algorithm].decoder
    if not isinstance(decoder, BlockDecoder) or decoder.fuses_credit:
        return False
    if params.temperature == 0:
        return True
    return params.top_p >= 1.0 and params.top_k <= head_filters.FILTER_K and proposal.chunked_gumbel_exact()


def bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n (or n itself when it exceeds every bucket)."""
    for b in sorted(buckets):
        if b >= n:
            return b
    return n


# Each at most 1.5x the one before from 32 on (a prompt pads by at most half its bucket; measured:
# docs/performance.md "Prompt buckets"), multiples of 16.
PROMPT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_bucket(rows: int, data: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int:
    """The compiled batch size that holds ``rows``: its bucket, rounded up to a multiple of the
    mesh's ``data`` axis (every data shard gets the same number of rows)."""
    b = bucket(rows, buckets)
    return -(-b // data) * data
