"""Request models of the OpenAI-compatible endpoints, and the field policy.

Every field a client may send is either honoured, accepted because its value cannot change
the result (``user``, ``metadata``, ``presence_penalty=0`` ...), or rejected with a 400 that names it.
Unknown fields are rejected too, with OpenAI's own wording ("Unrecognized request argument
supplied"), so nothing that changes results is silently ignored. The diffusion fields
(``steps``, ``block_length``, ``algorithm`` ...) arrive top-level, which is where the
``openai`` client puts ``extra_body``. The table lives in docs/api.md.
"""

from __future__ import annotations

import contextvars
import itertools
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dllm_jax.sampling import MAX_TOP_LOGPROBS, check_stop_count

# The X-Request-Id of the request being handled (set by serve.app.RequestContext); 5xx bodies
# carry it instead of the exception text, which stays in the log.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

EXCERPT_CHARS = 80     # a client value quoted in an error message: at most this many characters
MAX_MESSAGE_CHARS = 1000  # an error message as a whole (a backstop behind excerpt)


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """A short ``repr(value)``: at most ``limit`` characters of it (the first items of a container,
    the start of a string), so a 5 MB field is never echoed back, nor repr'd whole."""
    text = _short(value, limit, 2)
    return text if len(text) <= limit else text[:limit] + "..."


def _short(value, limit: int, depth: int) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."
    if isinstance(value, (dict, list, tuple)):
        if depth == 0:
            return "{...}" if isinstance(value, dict) else "[...]"
        if isinstance(value, dict):
            parts = [f"{_short(k, limit, 0)}: {_short(v, limit, depth - 1)}"
                     for k, v in itertools.islice(value.items(), 8)]
            brackets = "{}"
        else:
            parts = [_short(v, limit, depth - 1) for v in itertools.islice(value, 8)]
            brackets = "()" if isinstance(value, tuple) else "[]"
        more = ", ..." if len(value) > 8 else ""
        return brackets[0] + ", ".join(parts) + more + brackets[1]
    return repr(value)


def clip(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` itself, cut to ``limit`` characters (with the full length) when longer."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def request_id() -> str:
    return REQUEST_ID.get() or "none"


class APIError(Exception):
    """An error answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} characters)"
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


class _Strict(BaseModel):
    # strict: "5" is not an int and true is not 1 (OpenAI rejects both); ints are fine for floats.
    model_config = ConfigDict(strict=True, extra="allow")


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # NeMo-Gym: an earlier assistant turn with the ids it was generated from (serve.chat_tokens)
    prompt_token_ids: list[int] | None = None
    generation_token_ids: list[int] | None = None
    generation_log_probs: list[float] | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = False


class DiffusionFields(_Strict):
    """Sampling fields shared by both endpoints (OpenAI's and the diffusion ones)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    # sampling filters (vLLM / extra_body); honoured at temperature > 0
    top_k: int | None = None
    min_p: float | None = None
    # vLLM extras
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    # diffusion (extra_body)
    steps: int | None = None
    block_length: int | None = None
    algorithm: str | None = None
    generation_algorithm: str | None = None
    remasking: str | None = None  # low_confidence | random | leftmost (checked by the sampler: 400 naming it)
    threshold: float | None = None
    factor: float | None = None
    cfg_scale: float | None = None
    early_stop: bool | None = None
    shift_logits: bool | None = None
    # which distribution returned logprobs are of: raw (default) | processed (docs/api.md "Log probabilities")
    logprobs_mode: str | None = None
    # playground extension (extra_body): each streamed chunk carries "dllm_trace"
    stream_trace: bool | None = None

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(DiffusionFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # RL clients (vLLM / NeMo-RL's chat server, NeMo-Gym): see serve.chat_tokens and docs/api.md
    return_tokens_as_token_ids: bool | None = None  # logprobs tokens as "token_id:<id>" + the message's ids
    return_token_ids: bool | None = None            # vLLM: response prompt_token_ids, each choice's token_ids
    required_prefix_token_ids: list[int] | None = None  # the prompt starts with these ids

    def max_new_tokens(self) -> int | None:
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise bad_request(f"max_tokens={excerpt(a)} and max_completion_tokens={excerpt(b)} disagree; give one of them",
                              "max_completion_tokens")
        return b if b is not None else a


class CompletionRequest(DiffusionFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TokenizeRequest(_Strict):
    """vLLM's ``POST /tokenize``: a prompt, or chat messages through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    return_token_strs: bool | None = None
    required_prefix_token_ids: list[int] | None = None  # as in chat (NeMo-RL's tokenize request)


class DetokenizeRequest(_Strict):
    """vLLM's ``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


class UpdateWeightsRequest(_Strict):
    """SGLang's ``POST /update_weights_from_disk`` body (the fields that apply here)."""

    model_path: str
    load_format: str | None = None      # "auto" or null: the format is detected
    weight_version: str | None = None   # a label shown in /v1/models (e.g. "step_300")
    flush_cache: bool | None = None     # accepted: no cache outlives a request here
    # SGLang's other fields (UpdateWeightFromDiskReqInput); see docs/api.md for what each does here
    abort_all_requests: bool | None = None  # honoured: running and waiting requests end as aborted first
    is_async: bool | None = None            # accepted: an update never blocks running requests here
    torch_empty_cache: bool | None = None   # accepted: no torch allocator here
    keep_pause: bool | None = None          # accepted: an update never changes the pause state
    recapture_cuda_graph: bool | None = None  # accepted: programs take the weights as an argument
    token_step: int | None = None           # accepted (the trainer's step id; label with weight_version)

    def check(self) -> None:
        check_known(self)
        if self.load_format not in (None, "auto"):
            raise bad_request(f"load_format {self.load_format!r} is not supported: the format (Orbax, HF "
                              "safetensors, NeMo-RL DCP) is detected from the directory; send \"auto\" or omit it",
                              "load_format")
        if not self.model_path.strip():
            raise bad_request("model_path must name a directory", "model_path")


def check_known(req: _Strict) -> None:
    """Unknown fields of the tokenizer endpoints: a 400 naming the first."""
    for name in (req.model_extra or {}):
        raise bad_request(f"Unrecognized request argument supplied: {clip(name)}", clip(name), "unrecognized_argument")


# ---- field policy ------------------------------------------------------------------------

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
    canvas cap) are checked by ``serve.request_params.request_params``.
    """
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
    for name in ("threshold", "factor", "cfg_scale"):
        value = getattr(req, name)
        if value is not None and not math.isfinite(value):
            raise bad_request(f"{name}={value} must be a finite number", name)
    if req.seed is not None and not 0 <= req.seed < MAX_SEED:
        raise bad_request(f"seed={excerpt(req.seed)} must be an integer in [0, 2^62)", "seed")
    for name in ("max_tokens", "max_completion_tokens", "steps", "block_length"):
        value = getattr(req, name, None)
        if value is not None and not 0 <= value <= INT32_MAX:  # the exact ranges: request_params
            raise bad_request(f"{name}={excerpt(value)} must be an integer in [1, {INT32_MAX}]", name)
    stops = stop_list(req.stop)
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings",
                          "stop")
    long = [s for s in stops if len(s) > max_stop_chars]
    if long:
        raise bad_request(f"stop strings may have at most {max_stop_chars} characters (got one of {len(long[0])}: "
                          f"{excerpt(long[0], 40)})", "stop")
    if req.stream_trace and not req.stream:
        raise bad_request("stream_trace needs stream: true (it adds a trace to each streamed chunk)",
                          "stream_trace", "unsupported_parameter")
    if req.algorithm is not None and req.generation_algorithm is not None \
            and req.algorithm != req.generation_algorithm:
        raise bad_request("algorithm and generation_algorithm disagree; give one of them", "generation_algorithm")


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
