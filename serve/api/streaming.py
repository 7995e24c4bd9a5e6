"""Server-sent events: text is streamed as diffusion blocks become final.

Chunk order (per OpenAI): a role chunk per choice (chat only), one text delta per choice and
finished block whose text grew (incremental, UTF-8-safe detokenisation in ``serve.api.detok``;
with the logprobs of its own new tokens when asked for), a final chunk per choice with its ``finish_reason``, a usage chunk with empty ``choices``
when ``stream_options.include_usage``, then ``data: [DONE]``. An error after the stream has
started is sent as one ``data: {"error": ...}`` event before ``[DONE]`` (an engine error
mapped by ``Call.errors``, the app's mapping).

With ``stream_trace`` (the playground's opt-in extension) the same chunks are sent, and each
text / finish chunk also carries a top-level ``dllm_trace`` (``Choices.trace``: the tokens its
text covers, with their commit steps and confidences), the usage chunk ``{"nfe": total}``.
Without it the stream is byte for byte what it was.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, AsyncIterator

from starlette.responses import StreamingResponse

from serve.api import responses
from serve.api.protocol import APIError
from serve.engine.errors import ServeError

if TYPE_CHECKING:
    from serve.api.serving import Call

log = logging.getLogger("serve")


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


def sse_stream(call: Call) -> StreamingResponse:
    return StreamingResponse(_events(call), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(call: Call) -> AsyncIterator[str]:
    kind, rid, created, model = call.kind, call.id, call.created, call.model
    handle, choices, metrics, include_usage = call.handle, call.choices, call.metrics, call.include_usage
    if kind == "chat":
        def chunk(i, text=None, reason=None, role=None, logprobs=None):
            return responses.chat_chunk(rid, created, model, i, role=role, content=text, finish_reason=reason,
                                        with_usage=include_usage, logprobs=logprobs)
    else:
        def chunk(i, text=None, reason=None, role=None, logprobs=None):
            return responses.completion_chunk(rid, created, model, i, text or "", reason, with_usage=include_usage,
                                              logprobs=logprobs)

    def traced(body: dict, trace: dict | None) -> dict:
        if trace is not None:
            body["dllm_trace"] = trace
        return body

    first = True
    try:
        if kind == "chat":
            for i in range(len(choices.reasons)):
                yield sse(chunk(i, "", role="assistant"))
        while not choices.done:
            event = await handle.next()
            out = choices.apply(event)
            if out is None:
                continue
            text, reason, logprobs = out
            new_logprobs = bool(logprobs) and (kind == "chat" or bool(logprobs["tokens"]))
            if text or new_logprobs:
                if first:
                    metrics.observe("time_to_first_chunk_seconds", time.monotonic() - handle.arrival)
                    first = False
                yield sse(traced(chunk(event.index, text, logprobs=logprobs if new_logprobs else None),
                                 choices.trace(event.index)))
            if reason is not None:
                yield sse(traced(chunk(event.index, reason=reason), choices.trace(event.index)))
        metrics.observe("request_latency_seconds", time.monotonic() - handle.arrival)
        if include_usage:
            use = responses.usage(call.prompt_tokens, sum(choices.tokens))
            usage_chunk = responses.chat_usage_chunk if kind == "chat" else responses.completion_usage_chunk
            yield sse(traced(usage_chunk(rid, created, model, use),
                             None if choices.layout is None else {"nfe": sum(choices.nfe)}))
        yield DONE
    except (APIError, ServeError) as e:
        yield sse(call.errors(e).body())
        yield DONE
    except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band
        log.exception("stream %s failed", rid)
        yield sse(call.errors(e).body())  # a 500 internal_error
        yield DONE
    finally:
        if not choices.done:
            handle.cancel()  # the client went away (or an error): free the slots
