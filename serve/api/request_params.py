"""OpenAI request fields -> ``dllm_jax.sampling.SamplingParams``, with per-family defaults.

(The request side of sampling; the sampler's own parameters are ``dllm_jax.sampling``.)

``max_tokens`` becomes the canvas length: ``gen_length = ceil(max_tokens / block_length) *
block_length`` (the sampler needs whole blocks); ``steps`` defaults to ``gen_length`` (one
token per step for the fixed schedule); the returned tokens are cut at ``max_tokens``
(finish_reason "length" when that cut something).

Bounds (400 naming the field and its range): ``max_tokens`` and ``block_length`` in
[1, max_gen_length] (the server's canvas cap, ``--max-gen-length``, default the context), the
canvas ``gen_length`` <= that cap, ``steps`` in [1, gen_length] (more steps than canvas tokens
commit nothing: every extra step is an empty forward pass), ``stop_token_ids`` < vocab;
``top_k`` >= vocab is off (0).
"""

from __future__ import annotations

import dataclasses
import math
import random

from dllm_jax import FAMILY_CONFIGS
from dllm_jax.sampling import ALGORITHMS, ALIASES, SamplingError, SamplingParams, SlidingDecoder, check_stop_count
from serve.api.field_policy import top_logprobs
from serve.api.protocol import DiffusionFields, bad_request, excerpt
from serve.engine.defaults import FAMILY_DEFAULTS

DEFAULT_MAX_TOKENS = 128


def family_defaults(family: str) -> dict:
    """Defaults shown by /v1/models."""
    d = FAMILY_DEFAULTS[family]
    return {"max_tokens": DEFAULT_MAX_TOKENS, "temperature": 0.0, "remasking": "low_confidence", "logprobs_mode": "raw",
            "cfg_scale": 0.0, "steps": "gen_length (= ceil(max_tokens / block_length) * block_length)",
            "shift_logits": FAMILY_CONFIGS[family].shift_logits, **d}


def algorithm_names(family: str) -> dict:
    """Algorithms usable with this family: name -> description (aliases listed separately)."""
    out = {}
    for name, algo in ALGORITHMS.items():
        if isinstance(algo.decoder, SlidingDecoder) and not FAMILY_CONFIGS[family].sliding_decoder:
            continue
        out[name] = algo.description
    return out


def aliases(family: str) -> dict:
    usable = algorithm_names(family)
    return {a: c for a, c in ALIASES.items() if c in usable}


def gen_length_for(max_tokens: int, block_length: int) -> int:
    return math.ceil(max_tokens / block_length) * block_length


# /reconfigure_dllm's selection_policy (NeMo-RL's name) -> our remasking
SELECTION_POLICIES = {"confidence": "low_confidence", "low_confidence": "low_confidence", "random": "random",
                      "leftmost": "leftmost"}


def apply_overrides(req: DiffusionFields, overrides: dict) -> tuple[DiffusionFields, dict]:
    """``/reconfigure_dllm``'s decoder defaults applied to the fields ``req`` left out: the
    request, and the fixed-schedule override (``tokens_per_step`` / ``max_steps`` per block, for
    ``request_params``' ``schedule``) when it did not give ``steps``."""
    fields, schedule = {}, {}
    for key, value in overrides.items():
        if key in ("tokens_per_step", "max_steps"):
            if "steps" not in req.model_fields_set:
                schedule[key] = value
            continue
        if key == "selection_policy":
            key, value = "remasking", SELECTION_POLICIES.get(value, value)
        if key not in req.model_fields_set:
            fields[key] = value
    return (req.model_copy(update=fields) if fields else req), schedule


def stop_ids_for(req: DiffusionFields, model_stops: tuple[int, ...], vocab: int | None = None
                 ) -> tuple[int, ...] | None:
    """The row's stop tokens (vLLM semantics): the model's EOS / end-of-turn ids plus the request's
    ``stop_token_ids``; with ``ignore_eos`` only the request's own. None = the model's (no change)."""
    own = list(req.stop_token_ids or [])
    bad = [t for t in own if not 0 <= t < (vocab if vocab is not None else 2**31)]
    if bad:
        raise bad_request(f"stop_token_ids: token id {excerpt(bad[0])} is out of range [0, "
                          f"{vocab if vocab is not None else 2**31})", "stop_token_ids")
    if req.ignore_eos:
        stops = tuple(dict.fromkeys(own))
    elif own:
        stops = tuple(dict.fromkeys([*model_stops, *own]))
    else:
        return None
    what = "" if req.ignore_eos else f" (the model's {len(model_stops)} end-of-text ids included)"
    check_stop_count(stops, f"{len(stops)} stop tokens{what}", bad_request)
    return stops


def request_params(req: DiffusionFields, family: str, max_length: int, *, model_stops: tuple[int, ...] = (),
                   allow_zero: bool = False, vocab: int | None = None, max_gen_length: int | None = None,
                   schedule: dict | None = None) -> tuple[list[SamplingParams], int]:
    """Resolved params of each of the request's n choices, and max_tokens.

    ``schedule``: ``/reconfigure_dllm``'s ``tokens_per_step`` / ``max_steps`` (per block) giving
    ``steps`` when the request did not. ``allow_zero``: max_tokens 0 is valid (echo: score the prompt only; the params are then those
    of a 1-token canvas and unused). ``max_gen_length``: the server's canvas cap (default: the
    context ``max_length``). ``vocab``: token ids must be below it. Raises APIError 400 naming
    the offending field.
    """
    d = FAMILY_DEFAULTS[family]
    cap = min(max_gen_length or max_length, max_length)
    max_tokens, param_name = _max_tokens(req, cap, max_length, allow_zero)
    algorithm = req.algorithm if req.algorithm is not None else req.generation_algorithm
    algo_param = "algorithm" if req.algorithm is not None else "generation_algorithm"
    block_length = req.block_length if req.block_length is not None else d["block_length"]
    gen_length = _gen_length(max_tokens, block_length, cap, max_length, param_name)
    steps = _steps(req, gen_length, block_length, param_name, schedule)
    explicit = req.model_fields_set
    if algorithm is None and not {"threshold", "factor", "entropy_bound"} & explicit:
        # the family default algorithm comes with its default transfer rule
        threshold, factor = d["threshold"], d["factor"]
    else:
        threshold, factor = req.threshold, req.factor
    seed = req.seed if req.seed is not None else random.randrange(2**31)
    base = dict(
        gen_length=gen_length, steps=steps, block_length=block_length,
        temperature=0.0 if req.temperature is None else float(req.temperature),
        cfg_scale=0.0 if req.cfg_scale is None else float(req.cfg_scale),
        remasking=req.remasking or "low_confidence", threshold=threshold, factor=factor,
        entropy_bound=req.entropy_bound, block_add_threshold=req.block_add_threshold,
        algorithm=algorithm if algorithm is not None else d["algorithm"],
        early_stop=d["early_stop"] if req.early_stop is None else req.early_stop,
        shift_logits=req.shift_logits,
        top_k=0 if req.top_k in (None, -1) or (vocab is not None and req.top_k >= vocab) else req.top_k,
        top_p=1.0 if req.top_p is None else float(req.top_p),
        min_p=0.0 if req.min_p is None else float(req.min_p),
        logprobs=top_logprobs(req), logprobs_mode="raw" if req.logprobs_mode is None else req.logprobs_mode,
        stop_token_ids=stop_ids_for(req, tuple(model_stops), vocab),
        trace=bool(req.stream_trace))
    try:
        first = SamplingParams(seed=seed, **base).resolve(family)
    except SamplingError as e:
        param = {"gen_length": param_name, "algorithm": algo_param}.get(e.param, e.param)
        raise bad_request(str(e), param) from None
    except (TypeError, ValueError) as e:  # defensive: anything else the sampler rejects
        raise bad_request(str(e)) from None  # (APIError cuts a long message)
    n = req.n or 1
    return [dataclasses.replace(first, seed=seed + i) for i in range(n)], max_tokens


def _max_tokens(req: DiffusionFields, cap: int, max_length: int, allow_zero: bool) -> tuple[int, str]:
    """The request's max_tokens (default ``DEFAULT_MAX_TOKENS``), checked against the canvas cap,
    and the name the client gave it (``max_tokens`` or ``max_completion_tokens``)."""
    max_tokens = req.max_new_tokens()
    param_name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if max_tokens < (0 if allow_zero else 1):
        why = " (0 only with echo: true)" if max_tokens == 0 and hasattr(req, "echo") else ""
        raise bad_request(f"{param_name}={excerpt(max_tokens)} must be >= 1{why}", param_name)
    if max_tokens > cap:
        where = (f"the model's context of {max_length} tokens" if cap == max_length else
                 f"this server's canvas cap of {cap} tokens (--max-gen-length)")
        raise bad_request(f"{param_name}={excerpt(max_tokens)} exceeds {where}; allowed: 1..{cap}", param_name)
    return max_tokens, param_name


def _gen_length(max_tokens: int, block_length: int, cap: int, max_length: int, param_name: str) -> int:
    """The canvas: max_tokens rounded up to whole blocks, within the cap."""
    if not 1 <= block_length <= cap:
        raise bad_request(f"block_length={excerpt(block_length)} must be between 1 and {cap} (the canvas cap)",
                          "block_length")
    gen_length = gen_length_for(max(max_tokens, 1), block_length)
    if gen_length > cap and cap < max_length:  # (at the context itself: a 413 from the engine, with the prompt)
        raise bad_request(f"{param_name}={max_tokens} rounded up to whole blocks of block_length={block_length} is "
                          f"a canvas of {gen_length} tokens; this server's canvas cap is {cap} (--max-gen-length)",
                          param_name)
    return gen_length


def _steps(req: DiffusionFields, gen_length: int, block_length: int, param_name: str,
           schedule: dict | None) -> int | None:
    """The request's steps (1..gen_length), else ``schedule``'s over the canvas's blocks, else None
    (the sampler's default: gen_length)."""
    if req.steps is not None and not 1 <= req.steps <= gen_length:
        raise bad_request(f"steps={excerpt(req.steps)} must be between 1 and gen_length={gen_length} (the canvas: "
                          f"{param_name} rounded up to whole blocks of {block_length}; more steps than canvas tokens "
                          "commit nothing)", "steps")
    steps = req.steps
    if steps is None and schedule:  # the fixed schedule's steps per block, over the canvas's blocks
        per_block = block_length
        if schedule.get("tokens_per_step"):
            per_block = math.ceil(block_length / schedule["tokens_per_step"])
        if schedule.get("max_steps"):
            per_block = min(per_block, schedule["max_steps"])
        steps = min(gen_length, max(1, per_block) * (gen_length // block_length))
    return steps
