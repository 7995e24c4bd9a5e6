"""Serving logic of /v1/chat/completions and /v1/completions (between the thin routes and the engine).

request -> field policy -> sampling params -> prompt token ids -> ``engine.submit`` -> events
-> text (``TextStream``: stop strings, UTF-8-safe) -> an OpenAI response body or an SSE stream.

A validated request is a ``Job``; once its sequences are queued it is a ``Call`` (its
``serve.api.choices.Choices``), which both the non-streamed answer and ``serve.api.streaming`` read.
Prompt ids come from ``serve.api.prompts`` (chat template, completion prompts, their bounds). Engine errors arrive as
``serve.engine.errors`` exceptions: raised to the app's handlers, or (streaming) turned into an
in-band error body by the ``errors`` mapping the app passes in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from dllm_jax.sampling import SamplingParams
from serve.api import chat_tokens, responses
from serve.api.choices import Choices
from serve.api.field_policy import check_fields, message_text, stop_list, top_logprobs
from serve.api.logprobs import CompletionLogprobs, TokenText, top_dict
from serve.api.prompts import chat_ids, chat_prompt, check_chars, completion_prompts, encode
from serve.api.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DiffusionFields,
    TokenizeRequest,
    bad_request,
    check_known,
    clip,
    excerpt,
)
from serve.api.request_params import apply_overrides, request_params
from serve.api.streaming import sse_stream
from serve.engine.engine import Engine
from serve.engine.engine_types import ModelInfo
from serve.engine.errors import ClientDisconnected
from serve.engine.metrics import Metrics
from serve.engine.requests import Event, Handle, SeqRequest

log = logging.getLogger("serve")

MAX_ROWS_PER_REQUEST = 256


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated request: what to generate (before its prompts are tokenised)."""

    kind: str                      # 'chat' | 'completion'
    req: DiffusionFields
    info: ModelInfo
    model: str                     # the served name the client asked for
    params: list[SamplingParams]   # one per choice (n)
    max_tokens: int                # 0: echo only (no generation)
    logprobs: int | None = None    # top alternatives per returned token (None: no logprobs)
    echo: bool = False             # completions: the prompt text (and logprobs) come first
    eos_ids: frozenset[int] = frozenset()  # echo + logprobs + max_tokens 1: stop ids the device ignores
    as_token_ids: bool = False     # chat: return_tokens_as_token_ids (with logprobs: the message's token fields)
    return_token_ids: bool = False  # chat: vLLM's return_token_ids


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
    errors: Callable[[Exception], APIError]   # engine error -> its HTTP error (serve.api.app.api_error)
    prompt_ids: list[int] | None = None        # chat, when the client asked for token ids
    return_token_ids: bool = False


class Serving:
    def __init__(self, engine: Engine, metrics: Metrics, errors: Callable[[Exception], APIError]):
        self.engine, self.metrics, self.errors = engine, metrics, errors

    # ---- endpoints ---------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request: Request):
        job = self._job("chat", req)
        self._check_rows(job, 1)
        if req.return_token_ids and req.stream:
            raise bad_request("return_token_ids is supported without stream (the ids come with the whole answer)",
                              "return_token_ids", "unsupported_parameter")
        messages = message_text(req.messages)
        check_chars(job.info, sum(len(m["content"]) for m in messages), "messages")
        prefix = chat_tokens.token_prefix(job.info, req.messages, req.required_prefix_token_ids)
        prompt = await run_in_threadpool(chat_prompt, job.info, messages, prefix)
        job = dataclasses.replace(job, as_token_ids=bool(req.return_tokens_as_token_ids),
                                  return_token_ids=bool(req.return_token_ids))
        return await self._run(job, [prompt], request)

    async def completion(self, req: CompletionRequest, request: Request):
        job = self._job("completion", req)
        prompt = req.prompt
        many = not (isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)))
        if many:  # bounded before any of them is tokenized
            self._check_rows(job, len(prompt))
            for i, p in enumerate(prompt):
                if isinstance(p, str):
                    check_chars(job.info, len(p), f"prompt[{i}]" if len(prompt) > 1 else "prompt")
        else:
            self._check_rows(job, 1)
            if isinstance(prompt, str):
                check_chars(job.info, len(prompt), "prompt")
        prompts, texts = await run_in_threadpool(completion_prompts, job.info, req.prompt)
        return await self._run(job, prompts, request, texts)

    # ---- tokenizer endpoints (vLLM's shapes; lm-eval's tokenizer_backend=remote) ---------------

    def _model_info(self, model: str | None) -> ModelInfo:
        info = self.engine.info()
        if model is not None and model not in info.names:
            raise APIError(404, f"The model `{clip(model)}` does not exist (this server serves "
                                f"{', '.join(info.names)})", param="model", code="model_not_found")
        if info.tokenizer is None:
            raise bad_request("this model has no tokenizer", "model")
        return info

    def tokenize(self, req: TokenizeRequest) -> dict:
        check_known(req)
        info = self._model_info(req.model)
        tok = info.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if req.prompt is not None:
            for name in ("add_generation_prompt", "required_prefix_token_ids"):
                if getattr(req, name) is not None:
                    raise bad_request(f"{name} needs messages", name)
            add = True if req.add_special_tokens is None else req.add_special_tokens
            check_chars(info, len(req.prompt), "prompt")
            ids = encode(tok, req.prompt, "prompt", add_special_tokens=add)
        else:
            if not req.messages:
                raise bad_request("messages must not be empty", "messages")
            messages = message_text(req.messages)
            check_chars(info, sum(len(m["content"]) for m in messages), "messages")
            prefix = chat_tokens.token_prefix(info, req.messages, req.required_prefix_token_ids)
            ids = chat_ids(info, messages, prefix, req.add_generation_prompt is not False,
                                 bool(req.add_special_tokens))
        out = {"count": len(ids), "max_model_len": info.max_length, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = tok.convert_ids_to_tokens(ids)
        return out

    def detokenize(self, req: DetokenizeRequest) -> dict:
        check_known(req)
        info = self._model_info(req.model)
        if len(req.tokens) > info.max_prompt_chars:
            raise APIError(413, f"{len(req.tokens)} tokens; this server detokenizes at most {info.max_prompt_chars} "
                                "per request (--max-prompt-chars)", param="tokens", code="too_many_tokens")
        bad = [t for t in req.tokens if not 0 <= t < info.vocab]
        if bad:
            raise bad_request(f"token id {excerpt(bad[0])} is out of range [0, {info.vocab})", "tokens")
        return {"prompt": info.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    def tokenizer_info(self) -> dict:
        """vLLM's ``GET /tokenizer_info``: the tokenizer's config (special tokens as strings),
        its class, the chat template and the context. lm-eval reads eos_token / bos_token /
        pad_token / chat_template."""
        info = self._model_info(None)
        tok = info.tokenizer
        out: dict = {}
        for key, value in (getattr(tok, "init_kwargs", None) or {}).items():
            if key in ("added_tokens_decoder", "backend", "name_or_path", "vocab_file", "merges_file",
                       "tokenizer_file", "is_local", "local_files_only"):
                continue
            value = getattr(value, "content", value)  # AddedToken -> its string
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                continue
            out[key] = value
        for key in ("eos_token", "bos_token", "pad_token", "unk_token"):
            value = getattr(tok, key, None)
            out[key] = None if value is None else str(value)
        out.update(tokenizer_class=type(tok).__name__, chat_template=getattr(tok, "chat_template", None),
                   model_max_length=info.max_length, eos_token_id=getattr(tok, "eos_token_id", None),
                   bos_token_id=getattr(tok, "bos_token_id", None), pad_token_id=getattr(tok, "pad_token_id", None),
                   vocab_size=info.vocab, stop_token_ids=list(info.stop_token_ids))
        return out

    # ---- steps -------------------------------------------------------------------------------

    def _job(self, kind: str, req: DiffusionFields) -> Job:
        check_fields(req, max_stop_chars=self.engine.options.max_stop_chars)
        # /reconfigure_dllm's decoder defaults, for the fields the request left out
        req, schedule = apply_overrides(req, self.engine.overrides)
        info = self.engine.info()
        if req.model is not None and req.model not in info.names:
            raise APIError(404, f"The model `{clip(req.model)}` does not exist (this server serves "
                                f"{', '.join(info.names)})", param="model", code="model_not_found")
        echo = kind == "completion" and bool(req.echo)
        params, max_tokens = request_params(req, info.family, info.max_length, model_stops=info.stop_token_ids,
                                            allow_zero=echo, vocab=info.vocab, max_gen_length=info.max_gen_length,
                                            schedule=schedule)
        k = top_logprobs(req)
        eos_ids: frozenset[int] = frozenset()
        if echo and k is not None and max_tokens == 1:
            # lm-eval reads the last token as the generated one: it must be there even when it is
            # EOS (as vLLM returns it), so the device does not stop on it; Choices marks it "stop".
            stops = params[0].stop_token_ids
            eos_ids = frozenset(info.stop_token_ids if stops is None else stops)
            params = [dataclasses.replace(p, stop_token_ids=()) for p in params]
        return Job(kind, req, info, req.model or info.names[0], params, max_tokens, k, echo, eos_ids)

    def _check_rows(self, job: Job, prompts: int) -> None:
        """A request of more sequences than one request may have, or than the queue can ever hold,
        is a 400 (not a 429 to retry), before its prompts are tokenized."""
        n = len(job.params)
        rows, what = prompts * n, f"{prompts} prompts x n={n}" if prompts > 1 else f"n={n}"
        param = "n" if n > 1 or prompts == 1 else "prompt"
        if rows > MAX_ROWS_PER_REQUEST:
            raise bad_request(f"{what} exceeds {MAX_ROWS_PER_REQUEST} sequences per request", param)
        limit = self.engine.options.max_queue
        if rows > limit:
            raise bad_request(f"{what} is {rows} sequences; this server's queue holds at most {limit} (--max-queue), "
                              "so this request can never be queued", param, "too_many_sequences")

    async def _run(self, job: Job, prompts: list[list[int]], request: Request, texts: list[str] | None = None):
        n, req = len(job.params), job.req
        if len(prompts) * n > MAX_ROWS_PER_REQUEST:
            raise bad_request(f"{len(prompts)} prompts x n={n} exceeds {MAX_ROWS_PER_REQUEST} sequences per request",
                              "n")
        tok = job.info.tokenizer
        prefixes = prefix_lp = None
        weights = self.engine.weights()  # one weights version for all of it (prompt scores and completion)
        if job.echo:
            prefixes = [texts[i] for i in range(len(prompts)) for _ in range(n)]
            if job.logprobs is not None:
                prefix_lp = await self._prompt_logprobs(job, prompts, weights)
        prompt_tokens = sum(len(p) for p in prompts)
        self.metrics.inc("prompt_tokens_total", prompt_tokens)
        rid = responses.new_id("chatcmpl" if job.kind == "chat" else "cmpl")
        if job.max_tokens == 0:  # echo only: the prompt (and its scores), nothing generated
            lps = None if prefix_lp is None else [lp.body() for lp in prefix_lp]
            return responses.completion(rid, responses.now(), job.model, [(t, "length") for t in prefixes],
                                        responses.usage(prompt_tokens, 0), lps)
        seqs = [SeqRequest(p, job.params[j], job.max_tokens) for p in prompts for j in range(n)]
        handle = self.engine.submit(seqs, weights=weights)
        choices = Choices(handle, tok, stop_list(req.stop), len(seqs), self.metrics,
                          skip_special_tokens=req.skip_special_tokens is not False,
                          include_stop=bool(req.include_stop_str_in_output), kind=job.kind, logprobs=job.logprobs,
                          prefixes=prefixes, prefix_logprobs=prefix_lp, eos_ids=job.eos_ids,
                          trace=(job.params[0].gen_length, job.params[0].block_length) if req.stream_trace else None,
                          as_ids=job.as_token_ids, keep_ids=job.as_token_ids or job.return_token_ids)
        call = Call(kind=job.kind, id=rid, created=responses.now(), model=job.model, handle=handle, choices=choices,
                    prompt_tokens=prompt_tokens,
                    include_usage=bool(req.stream_options and req.stream_options.include_usage),
                    metrics=self.metrics, errors=self.errors,
                    prompt_ids=prompts[0] if job.as_token_ids or job.return_token_ids else None,
                    return_token_ids=job.return_token_ids)
        if req.stream:
            return sse_stream(call)
        return await self._complete(call, request)

    async def _prompt_logprobs(self, job: Job, prompts: list[list[int]], weights=None) -> list[CompletionLogprobs]:
        """echo + logprobs: every prompt token with log p(x_i | x_<i) (``Model.score``), per choice."""
        cost = sum(len(p) - 1 for p in prompts)
        limit = self.engine.options.max_score_tokens
        if cost > limit:
            raise APIError(413, f"scoring these prompts costs {cost} positions (a prompt of L tokens costs L - 1 "
                                f"forward passes); this server scores at most {limit} per request "
                                "(--max-score-tokens)", param="prompt", code="too_many_score_tokens")
        k = job.logprobs
        scores = await self.engine.score(prompts, top_k=k, weights=weights)
        tt = TokenText(job.info.tokenizer)
        out = []
        for p, sc in zip(prompts, scores):
            for _ in range(len(job.params)):
                lp = CompletionLogprobs()
                lp.add(tt.text(p[0]), None, None)
                for i in range(1, len(p)):
                    lp.add(tt.text(p[i]), sc.token_logprobs[i],
                           top_dict(tt, p[i], sc.token_logprobs[i], sc.top_ids[i], sc.top_logprobs[i], k))
                out.append(lp)
        return out

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
        if call.kind == "chat":
            return responses.chat_completion(call.id, call.created, call.model, choices.results(), use,
                                             choices.logprobs(), choices.chat_tokens(call.prompt_ids,
                                                                                     call.return_token_ids))
        return responses.completion(call.id, call.created, call.model, choices.results(), use, choices.logprobs())


async def _cancel_on_disconnect(request: Request, handle: Handle) -> None:
    """Drop a non-streamed request whose client went away (before or during its batch)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            handle.queue.put_nowait(Event.failure(0, ClientDisconnected()))
            return
