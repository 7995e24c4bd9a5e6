"""Serving logic of /v1/chat/completions and /v1/completions (between the thin routes and the engine).

request -> field policy -> sampling params -> prompt token ids -> ``engine.submit`` -> events
-> text (``TextStream``: stop strings, UTF-8-safe) -> an OpenAI response body or an SSE stream.

A validated request is a ``Job``; once its sequences are queued it is a ``Call``, which both
the non-streamed answer and ``serve.streaming`` read. Engine errors arrive as
``serve.errors`` exceptions: raised to the app's handlers, or (streaming) turned into an
in-band error body by the ``errors`` mapping the app passes in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Callable, Sequence

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from dllm_jax.sampling import SamplingParams
from serve import responses
from serve.detok import TextStream
from serve.engine import Engine, ModelInfo
from serve.errors import ClientDisconnected
from serve.metrics import Metrics
from serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DiffusionFields,
    bad_request,
    check_fields,
    message_text,
    stop_list,
)
from serve.request_params import request_params
from serve.requests import Event, Handle, SeqRequest
from serve.streaming import sse_stream

log = logging.getLogger("serve")

MAX_ROWS_PER_REQUEST = 256


class Choices:
    """Text, finish reason and token count of every choice of one request."""

    def __init__(self, handle: Handle, tokenizer, stops: Sequence[str], count: int, metrics: Metrics):
        self.handle, self.metrics = handle, metrics
        self.streams = [TextStream(tokenizer, stops) for _ in range(count)]
        self.reasons: list[str | None] = [None] * count
        self.tokens = [0] * count

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def apply(self, ev: Event) -> tuple[str, str | None] | None:
        """(new text, finish_reason if this event finished the choice), or None if it is over."""
        i = ev.index
        if self.reasons[i] is not None:
            return None
        ts = self.streams[i]
        delta = ts.update(ev.tokens, ev.done)
        reason = "stop" if ts.stopped else (ev.finish_reason if ev.done else None)
        if ts.stopped and not ev.done:
            self.handle.cancel(i)  # a stop string ended it: free the slot at the next block
        if reason is not None:
            self.reasons[i] = reason
            self.tokens[i] = ts.n_tokens
            self.metrics.finished(reason, ts.n_tokens)
        return delta, reason

    def results(self) -> list[tuple[str, str]]:
        return [(ts.text, r) for ts, r in zip(self.streams, self.reasons)]


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated request: what to generate (before its prompts are tokenised)."""

    kind: str                      # 'chat' | 'completion'
    req: DiffusionFields
    info: ModelInfo
    model: str                     # the served name the client asked for
    params: list[SamplingParams]   # one per choice (n)
    max_tokens: int


@dataclasses.dataclass(frozen=True)
class Call:
    """A request whose sequences are queued, as the response writers see it."""

    kind: str                      # 'chat' | 'completion'
    id: str
    created: int
    model: str
    handle: Handle
    choices: Choices
    prompt_tokens: int
    include_usage: bool
    metrics: Metrics
    errors: Callable[[Exception], APIError]   # engine error -> its HTTP error (serve.app.api_error)


class Serving:
    def __init__(self, engine: Engine, metrics: Metrics, errors: Callable[[Exception], APIError]):
        self.engine, self.metrics, self.errors = engine, metrics, errors

    # ---- endpoints ---------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request: Request):
        job = self._job("chat", req)
        messages = message_text(req.messages)
        prompt = await run_in_threadpool(self._chat_prompt, job.info, messages)
        return await self._run(job, [prompt], request)

    async def completion(self, req: CompletionRequest, request: Request):
        job = self._job("completion", req)
        prompts = await run_in_threadpool(self._completion_prompts, job.info, req.prompt)
        return await self._run(job, prompts, request)

    # ---- steps -------------------------------------------------------------------------------

    def _job(self, kind: str, req: DiffusionFields) -> Job:
        check_fields(req)
        info = self.engine.info()
        if req.model is not None and req.model not in info.names:
            raise APIError(404, f"The model `{req.model}` does not exist (this server serves "
                                f"{', '.join(info.names)})", param="model", code="model_not_found")
        params, max_tokens = request_params(req, info.family, info.max_length)
        return Job(kind, req, info, req.model or info.names[0], params, max_tokens)

    @staticmethod
    def _chat_prompt(info: ModelInfo, messages: list[dict]) -> list[int]:
        tok = info.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions", "messages")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja raises for conversations it does not accept
            raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None
        ids = _encode(tok, text, "messages", add_special_tokens=False)
        _check_fits(info, ids, "messages")
        return ids

    @staticmethod
    def _completion_prompts(info: ModelInfo, prompt) -> list[list[int]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        out = []
        for i, p in enumerate(prompt):
            param = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                if info.tokenizer is None:
                    raise bad_request("this model has no tokenizer; send token ids", param)
                ids = _encode(info.tokenizer, p, param)
            else:
                ids = list(p)
                bad = [t for t in ids if not 0 <= t < info.vocab or t == info.mask_token_id]
                if bad:
                    raise bad_request(f"token id {bad[0]} is out of range [0, {info.vocab}) or is the mask "
                                      f"token {info.mask_token_id}", param)
            if not ids:
                raise bad_request("prompt must not be empty", param)
            _check_fits(info, ids, param)
            out.append(ids)
        return out

    async def _run(self, job: Job, prompts: list[list[int]], request: Request):
        n, req = len(job.params), job.req
        if len(prompts) * n > MAX_ROWS_PER_REQUEST:
            raise bad_request(f"{len(prompts)} prompts x n={n} exceeds {MAX_ROWS_PER_REQUEST} sequences per request",
                              "n")
        seqs = [SeqRequest(p, job.params[j], job.max_tokens) for p in prompts for j in range(n)]
        handle = self.engine.submit(seqs)
        prompt_tokens = sum(len(p) for p in prompts)
        self.metrics.inc("prompt_tokens_total", prompt_tokens)
        call = Call(kind=job.kind, id=responses.new_id("chatcmpl" if job.kind == "chat" else "cmpl"),
                    created=responses.now(), model=job.model, handle=handle,
                    choices=Choices(handle, job.info.tokenizer, stop_list(req.stop), len(seqs), self.metrics),
                    prompt_tokens=prompt_tokens,
                    include_usage=bool(req.stream_options and req.stream_options.include_usage),
                    metrics=self.metrics, errors=self.errors)
        if req.stream:
            return sse_stream(call)
        return await self._complete(call, request)

    async def _complete(self, call: Call, request: Request) -> dict:
        """The non-streamed answer: wait for every choice (dropping them if the client leaves)."""
        handle, choices = call.handle, call.choices
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        try:
            while not choices.done:
                choices.apply(await handle.next())
        except BaseException:
            handle.cancel()
            raise
        finally:
            watcher.cancel()
        self.metrics.observe("request_latency_seconds", time.monotonic() - handle.arrival)
        use = responses.usage(call.prompt_tokens, sum(choices.tokens))
        build = responses.chat_completion if call.kind == "chat" else responses.completion
        return build(call.id, call.created, call.model, choices.results(), use)


def _encode(tok, text: str, param: str, **kw) -> list[int]:
    try:
        return tok.encode(text, **kw)
    except Exception as e:  # noqa: BLE001 - e.g. lone surrogates the tokenizer cannot encode
        raise bad_request(f"the text could not be tokenized: {type(e).__name__}: {e}", param) from None


def _check_fits(info: ModelInfo, ids: list[int], param: str) -> None:
    if len(ids) >= info.max_length:
        raise APIError(413, f"the prompt has {len(ids)} tokens; the model's context is {info.max_length} tokens "
                            "(prompt + max_tokens must fit)", param=param, code="context_length_exceeded")


async def _cancel_on_disconnect(request: Request, handle: Handle) -> None:
    """Drop a non-streamed request whose client went away (before or during its batch)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            handle.queue.put_nowait(Event.failure(0, ClientDisconnected()))
            return
