"""Response bodies built from the official ``openai.types`` models, so the wire format is not
hand-written. Dumped with ``exclude_unset``: fields set to None on purpose (``logprobs``,
``refusal``, a chunk's ``finish_reason``) stay on the wire as null, as OpenAI sends them.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion import ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.completion_choice import Logprobs as CompletionLogprobs


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def dump(obj) -> dict:
    return obj.model_dump(mode="json", exclude_unset=True)


def usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


def chat_completion(rid: str, created: int, model: str, choices: list[tuple[str, str]], use: CompletionUsage,
                    logprobs: list | None = None, tokens: ChatTokens | None = None) -> dict:
    """choices: (text, finish_reason) per index; logprobs: each choice's ``content`` entries (or None);
    tokens: the RL clients' token fields (see ``ChatTokens``)."""
    logprobs = logprobs or [None] * len(choices)
    extra = tokens.choice_fields() if tokens is not None else [({}, {})] * len(choices)
    body = ChatCompletion(
        id=rid, object="chat.completion", created=created, model=model, usage=use,
        choices=[ChatChoice(index=i, finish_reason=reason,
                            logprobs=None if lp is None else ChoiceLogprobs(content=lp, refusal=None),
                            message=ChatCompletionMessage(role="assistant", content=text, refusal=None, **msg),
                            **choice)
                 for i, ((text, reason), lp, (msg, choice)) in enumerate(zip(choices, logprobs, extra))],
        **({"prompt_token_ids": tokens.prompt_ids} if tokens is not None and tokens.choice_ids else {}))
    return dump(body)


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    """Token ids an RL client asked for with a chat completion.

    Attributes:
      prompt_ids: the prompt's ids (after ``serve.api.chat_tokens`` joined an earlier turn's ids).
      generated: each choice's generated ids (a stop token that ended it included, as vLLM returns them).
      log_probs: each choice's logprob per generated id, or None: then the message fields are not sent.
      choice_ids: vLLM's ``return_token_ids``: the response's ``prompt_token_ids`` and each choice's
        ``token_ids``.
    """

    prompt_ids: list[int]
    generated: list[list[int]]
    log_probs: list[list[float]] | None
    choice_ids: bool = False

    def choice_fields(self) -> list[tuple[dict, dict]]:
        """Per choice: the fields of its message (NeMo-RL's server: ``prompt_token_ids``,
        ``generation_token_ids``, ``generation_log_probs``), and of the choice itself (``token_ids``)."""
        out = []
        for i, ids in enumerate(self.generated):
            msg = {} if self.log_probs is None else {
                "prompt_token_ids": self.prompt_ids, "generation_token_ids": ids,
                "generation_log_probs": self.log_probs[i]}
            out.append((msg, {"token_ids": ids} if self.choice_ids else {}))
        return out


def chat_chunk(rid: str, created: int, model: str, index: int, *, role: str | None = None,
               content: str | None = None, finish_reason: str | None = None, with_usage: bool = False,
               logprobs: list | None = None) -> dict:
    delta = ChoiceDelta(role=role, content=content) if role else (
        ChoiceDelta(content=content) if content is not None else ChoiceDelta())
    chunk = ChatCompletionChunk(id=rid, object="chat.completion.chunk", created=created, model=model,
                                choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish_reason,
                                                     logprobs=None if logprobs is None else
                                                     ChunkLogprobs(content=logprobs, refusal=None))])
    if with_usage:
        chunk.usage = None
    return dump(chunk)


def chat_usage_chunk(rid: str, created: int, model: str, use: CompletionUsage) -> dict:
    return dump(ChatCompletionChunk(id=rid, object="chat.completion.chunk", created=created, model=model,
                                    choices=[], usage=use))


def completion(rid: str, created: int, model: str, choices: list[tuple[str, str]], use: CompletionUsage,
               logprobs: list[dict | None] | None = None) -> dict:
    """logprobs: each choice's {tokens, token_logprobs, top_logprobs, text_offset} (or None)."""
    logprobs = logprobs or [None] * len(choices)
    return dump(Completion(
        id=rid, object="text_completion", created=created, model=model, usage=use,
        choices=[CompletionChoice(index=i, text=text, finish_reason=reason,
                                  logprobs=None if lp is None else _completion_logprobs(lp))
                 for i, ((text, reason), lp) in enumerate(zip(choices, logprobs))]))


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish_reason: str | None,
                     with_usage: bool = False, logprobs: dict | None = None) -> dict:
    # The one body written by hand: openai's Completion type has a non-null finish_reason,
    # but streamed chunks carry null until the end (as OpenAI sends them).
    lp = None if logprobs is None else dump(_completion_logprobs(logprobs))
    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": lp}]}
    if with_usage:
        out["usage"] = None
    return out


def _completion_logprobs(lp: dict) -> CompletionLogprobs:
    # model_construct: with echo the first prompt token has token_logprobs/top_logprobs null (as
    # OpenAI and vLLM send it), which openai's type annotations do not allow.
    if lp["token_logprobs"][:1] == [None]:
        return CompletionLogprobs.model_construct(**lp)
    return CompletionLogprobs(**lp)


def completion_usage_chunk(rid: str, created: int, model: str, use: CompletionUsage) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
            "usage": dump(use)}


def model_card(name: str, created: int, extra: dict) -> dict:
    return dump(Model(id=name, object="model", created=created, owned_by="dllm-jax", **extra))
