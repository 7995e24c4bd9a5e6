"""Request models of the OpenAI-compatible endpoints, and the error body every endpoint answers with.

Every field a client may send is either honoured, accepted because its value cannot change
the result (``user``, ``metadata``, ``presence_penalty=0`` ...), or rejected with a 400 that names it.
Unknown fields are rejected too, with OpenAI's own wording ("Unrecognized request argument
supplied"), so nothing that changes results is silently ignored. The diffusion fields
(``steps``, ``block_length``, ``algorithm`` ...) arrive top-level, which is where the
``openai`` client puts ``extra_body``. The checks of each field are in ``serve/api/field_policy.py``;
the table lives in docs/api.md.
"""

from __future__ import annotations

import contextvars
import itertools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The X-Request-Id of the request being handled (set by serve.api.app.RequestContext); 5xx bodies
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
    # NeMo-Gym: an earlier assistant turn with the ids it was generated from (serve.api.chat_tokens)
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
    entropy_bound: float | None = None  # the EB-Sampler's gamma (docs/sampling.md, "Transfer rules")
    block_add_threshold: float | None = None  # multi-block decoding (docs/sampling.md, "Multi-block decoding")
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
    # RL clients (vLLM / NeMo-RL's chat server, NeMo-Gym): see serve.api.chat_tokens and docs/api.md
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
