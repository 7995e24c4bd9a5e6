"""The field policy of the OpenAI endpoints: what each field of a chat / completion request may be.

Every field a client may send is either honoured, accepted because its value cannot change the
result (``IGNORED``; ``presence_penalty=0`` and the others of ``NEUTRAL_ONLY`` at their neutral
value), or rejected with a 400 that names it and its allowed range (``check_fields``,
``check_logprobs``). The request models are in ``serve/api/protocol.py``; the table in docs/api.md.
"""

from __future__ import annotations

import math
from typing import Any

from dllm_jax.sampling import MAX_TOP_LOGPROBS, check_stop_count
from serve.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DiffusionFields,
    bad_request,
    clip,
    excerpt,
)

# Accepted whatever their value: they cannot change the generated text.
IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
           "parallel_tool_calls", "stream_options"}


def _neutral(value) -> bool:
    return value is None or value is False or value == 0 or value == [] or value == {} or value == ""


# Fields we cannot honour: accepted only at their neutral value (what OpenAI does by default).
NEUTRAL_ONLY: dict[str, tuple[Any, str]] = {
    "logit_bias": (_neutral, "logit_bias is not supported"),
    "presence_penalty": (_neutral, "presence_penalty is not supported (diffusion models decode all positions "
                                   "in parallel; only 0 is accepted)"),
    "frequency_penalty": (_neutral, "frequency_penalty is not supported (only 0 is accepted)"),
    "suffix": (_neutral, "suffix (insertion) is not supported"),
    "best_of": (lambda v: v in (None, 1), "best_of is not supported (only 1); use n for several samples"),
    "tools": (_neutral, "tool calling is not supported"),
    "tool_choice": (lambda v: v in (None, "none"), "tool calling is not supported"),
    "functions": (_neutral, "function calling is not supported"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported"),
    "response_format": (lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
                        "response_format other than {'type': 'text'} is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only the text modality is supported"),
    "audio": (_neutral, "audio output is not supported"),
    "prediction": (_neutral, "predicted outputs are not supported"),
    "web_search_options": (_neutral, "web search is not supported"),
    "reasoning_effort": (_neutral, "reasoning_effort is not supported"),
    "verbosity": (_neutral, "verbosity is not supported"),
    "repetition_penalty": (lambda v: v in (None, 1, 1.0), "repetition_penalty is not supported (diffusion models "
                                                          "decode all positions in parallel; only 1.0 is accepted)"),
    "min_tokens": (_neutral, "min_tokens > 0 is not supported (a diffusion row commits its end-of-text tokens "
                             "in parallel with the rest; EOS cannot be held back until min_tokens; only 0 is "
                             "accepted)"),
    # The tokenizer's decode (a fast tokenizer) never puts spaces around special tokens.
    "spaces_between_special_tokens": (lambda v: v in (None, False), "spaces_between_special_tokens=true is not "
                                      "supported by this tokenizer's decoder (special tokens are joined without "
                                      "spaces); only false is accepted"),
}


MAX_N = 64
MAX_STOP = 16
MAX_STOP_CHARS = 256   # default of --max-stop-chars: streaming holds back len(longest stop) - 1 characters
INT32_MAX = 2**31 - 1  # ints that reach an int32 device array (top_k, stop token ids)
MAX_SEED = 2**62       # seeds are 64-bit; choice i of n uses seed + i


def check_fields(req: DiffusionFields, *, max_stop_chars: int = MAX_STOP_CHARS) -> None:
    """Reject what we cannot honour (400 naming the field and its allowed range).

    The ranges that need the model (``stop_token_ids`` < vocab, ``steps`` <= the canvas, the
    canvas cap) are checked by ``serve.api.request_params.request_params``.
    """
    _check_names(req)
    if req.top_p is not None and not (math.isfinite(req.top_p) and 0 < req.top_p <= 1):
        raise bad_request(f"top_p={req.top_p} must be in (0, 1]", "top_p")
    if req.top_k is not None and not -1 <= req.top_k <= INT32_MAX:
        raise bad_request(f"top_k={excerpt(req.top_k)} must be -1 or 0 (off) or a positive integer <= {INT32_MAX} "
                          "(a top_k of at least the vocabulary size is off)", "top_k")
    if req.min_p is not None and not (math.isfinite(req.min_p) and 0 <= req.min_p <= 1):
        raise bad_request(f"min_p={req.min_p} must be in [0, 1]", "min_p")
    if req.stop_token_ids is not None:
        ids = req.stop_token_ids
        check_stop_count(ids, f"stop_token_ids has {len(ids)} tokens", bad_request)
        if any(not 0 <= t <= INT32_MAX for t in ids):
            raise bad_request(f"stop_token_ids={excerpt(ids)} must be token ids in [0, vocabulary size)",
                              "stop_token_ids")
    check_logprobs(req)
    if req.n is not None and not 1 <= req.n <= MAX_N:
        raise bad_request(f"n={excerpt(req.n)} must be between 1 and {MAX_N}", "n")
    if req.temperature is not None and not (math.isfinite(req.temperature) and req.temperature >= 0):
        raise bad_request(f"temperature={req.temperature} must be a finite number >= 0", "temperature")
    for name in ("threshold", "factor", "entropy_bound", "block_add_threshold", "cfg_scale"):
        value = getattr(req, name)
        if value is not None and not math.isfinite(value):
            raise bad_request(f"{name}={value} must be a finite number", name)
    if req.seed is not None and not 0 <= req.seed < MAX_SEED:
        raise bad_request(f"seed={excerpt(req.seed)} must be an integer in [0, 2^62)", "seed")
    for name in ("max_tokens", "max_completion_tokens", "steps", "block_length"):
        value = getattr(req, name, None)
        if value is not None and not 0 <= value <= INT32_MAX:  # the exact ranges: request_params
            raise bad_request(f"{name}={excerpt(value)} must be an integer in [1, {INT32_MAX}]", name)
    _check_stop_strings(req, max_stop_chars)
    if req.stream_trace and not req.stream:
        raise bad_request("stream_trace needs stream: true (it adds a trace to each streamed chunk)",
                          "stream_trace", "unsupported_parameter")
    if req.algorithm is not None and req.generation_algorithm is not None \
            and req.algorithm != req.generation_algorithm:
        raise bad_request("algorithm and generation_algorithm disagree; give one of them", "generation_algorithm")


def _check_names(req: DiffusionFields) -> None:
    """Fields other than ours: ignored (``IGNORED``), accepted at their neutral value only
    (``NEUTRAL_ONLY``), or refused as unrecognized."""
    fields = dict(req.model_extra or {})
    for name in ("logit_bias", "presence_penalty", "frequency_penalty", "repetition_penalty", "suffix",
                 "best_of", "min_tokens", "spaces_between_special_tokens"):
        if name in type(req).model_fields:
            fields[name] = getattr(req, name)
    for name, value in fields.items():
        if name in IGNORED:
            continue
        if name in NEUTRAL_ONLY:
            ok, why = NEUTRAL_ONLY[name]
            if not ok(value):
                raise bad_request(f"{why} (got {name}={excerpt(value)})", name, "unsupported_parameter")
            continue
        if name not in type(req).model_fields:
            raise bad_request(f"Unrecognized request argument supplied: {clip(name)}", clip(name),
                              "unrecognized_argument")


def _check_stop_strings(req: DiffusionFields, max_stop_chars: int) -> None:
    """At most ``MAX_STOP`` non-empty stop strings of at most ``max_stop_chars`` characters."""
    stops = stop_list(req.stop)
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings",
                          "stop")
    long = [s for s in stops if len(s) > max_stop_chars]
    if long:
        raise bad_request(f"stop strings may have at most {max_stop_chars} characters (got one of {len(long[0])}: "
                          f"{excerpt(long[0], 40)})", "stop")


def check_logprobs(req: DiffusionFields) -> None:
    """chat: logprobs (bool) + top_logprobs (0..20, needs logprobs); completions: logprobs 0..20, echo."""
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
                raise bad_request(f"top_logprobs={req.top_logprobs} must be between 0 and {MAX_TOP_LOGPROBS}",
                                  "top_logprobs")
    elif isinstance(req, CompletionRequest):
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise bad_request(f"logprobs={req.logprobs} must be between 0 and {MAX_TOP_LOGPROBS}", "logprobs")
        if req.echo and req.stream:
            raise bad_request("echo is not supported with stream: true", "echo", "unsupported_parameter")


def top_logprobs(req: DiffusionFields) -> int | None:
    """How many top alternatives each returned token carries (None: no logprobs)."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return getattr(req, "logprobs", None)


def stop_list(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def message_text(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages for the chat template: string content; text parts joined with newlines."""
    out = []
    for i, msg in enumerate(messages):
        content = msg.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type")
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"content part of type {excerpt(kind)} is not supported (text only)",
                                      f"messages[{i}].content[{j}]", "unsupported_content")
                texts.append(part["text"])
            content = "\n".join(texts)
        if content is None:
            raise bad_request("message content must be a string or a list of text parts",
                              f"messages[{i}].content")
        if msg.role in ("tool", "function") or (msg.model_extra or {}).get("tool_calls"):
            raise bad_request("tool messages are not supported", f"messages[{i}].role", "unsupported_parameter")
        role = "system" if msg.role == "developer" else msg.role
        out.append({"role": role, "content": content})
    return out
