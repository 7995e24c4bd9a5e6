"""Token-exact multi-turn chat for RL clients: NeMo-Gym's token fields on /v1/chat/completions.

RL frameworks train on token ids, but a chat client sends text back. Re-templating an earlier
assistant reply may tokenize it differently from what the model generated, which makes the next
turn's prompt (and its logprobs) differ from the trajectory being trained. NeMo-Gym therefore sends
each earlier assistant message with the ids it came from (``prompt_token_ids``,
``generation_token_ids``, ``generation_log_probs``: what this server returned for that turn), or a
top-level ``required_prefix_token_ids``; the server builds the new prompt as those ids followed by
the template's continuation. This module ports NeMo-RL's rule (``replace_prefix_tokens`` in
nemo_rl/models/generation/openai_server_utils.py, used by vllm/vllm_worker_async.py and
dynamo/token_wrapper.py):

- the required prefix is ``required_prefix_token_ids`` if sent, else ``prompt_token_ids +
  generation_token_ids`` of the last message that carries them (an assistant message);
- the *template prefix* is the chat template's ids of the messages up to that assistant message
  (no generation prompt); with an explicit ``required_prefix_token_ids``, up to the last assistant
  message (all messages if there is none);
- N = the number of end tokens in the template prefix; the new prompt is the required prefix,
  less a final end token, followed by the full template's ids from its N-th end token on.

Counting end tokens rather than taking a position keeps the boundary right when a template
re-renders history differently (Qwen3 templates drop earlier reasoning blocks). "End tokens" here
are the model's stop tokens (EOS plus the template's end-of-turn token, ``Model.stop_token_ids``),
where NeMo-RL uses ``tokenizer.eos_token_id`` alone: LLaDA's EOS (``<|endoftext|>``) never occurs in
its template, whose turns end with ``<|eot_id|>``; for Qwen-style templates (EOS ``<|im_end|>``)
the two agree. When the token-carrying message is not the last assistant message, the template
prefix ends at the token-carrying one (NeMo-RL's Dynamo wrapper; its vLLM server would drop the
messages in between).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from serve.api.protocol import APIError, ChatMessage, bad_request, excerpt
from serve.engine.engine_types import ModelInfo

TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")


@dataclasses.dataclass(frozen=True)
class TokenPrefix:
    """The ids a chat prompt must start with, and where they end in the conversation.

    Attributes:
      ids: the earlier turn's prompt + generation ids (or ``required_prefix_token_ids``).
      upto: index of the last message the template prefix covers (None: all messages).
      param: the request field the ids came from (named in errors).
    """

    ids: list[int]
    upto: int | None
    param: str


def check_ids(info: ModelInfo, ids: Sequence[int], param: str) -> None:
    """Token ids sent by a client: fewer than the context, each in [0, vocab) and not the mask."""
    if len(ids) >= info.max_length:
        raise APIError(413, f"{param} has {len(ids)} tokens; the model's context is {info.max_length} tokens",
                       param=param, code="context_length_exceeded")
    if ids and (min(ids) < 0 or max(ids) >= info.vocab or info.mask_token_id in ids):
        bad = next(t for t in ids if not 0 <= t < info.vocab or t == info.mask_token_id)
        raise bad_request(f"token id {excerpt(bad)} is out of range [0, {info.vocab}) or is the mask token "
                          f"{info.mask_token_id}", param)


def check_messages(info: ModelInfo, messages: Sequence[ChatMessage]) -> None:
    """The token fields of each message: on assistant messages only, prompt and generation ids together,
    log probabilities (optional) one finite number per generated token."""
    for i, msg in enumerate(messages):
        given = [f for f in TOKEN_FIELDS if getattr(msg, f) is not None]
        if not given:
            continue
        where = f"messages[{i}]"
        if msg.role != "assistant":
            raise bad_request(f"{given[0]} may only be given on assistant messages (the turn the ids were "
                              f"generated in), not on a {msg.role!r} message", f"{where}.{given[0]}")
        for name in ("prompt_token_ids", "generation_token_ids"):
            if getattr(msg, name) is None:
                other = "generation_token_ids" if name == "prompt_token_ids" else "prompt_token_ids"
                raise bad_request(f"{name} is missing: an assistant message with {other} needs both "
                                  "(the prompt and generation ids of that turn)", f"{where}.{name}")
            check_ids(info, getattr(msg, name), f"{where}.{name}")
        lps = msg.generation_log_probs
        if lps is not None:
            if len(lps) != len(msg.generation_token_ids):
                raise bad_request(f"generation_log_probs has {len(lps)} values for {len(msg.generation_token_ids)} "
                                  "generation_token_ids (one per generated token)", f"{where}.generation_log_probs")
            if not all(math.isfinite(x) for x in lps):
                raise bad_request("generation_log_probs must be finite numbers", f"{where}.generation_log_probs")


def token_prefix(info: ModelInfo, messages: Sequence[ChatMessage], required: list[int] | None) -> TokenPrefix | None:
    """Validates the token fields and returns the prefix the prompt must start with (None: no token
    fields, the template's ids are the prompt)."""
    check_messages(info, messages)
    if required is not None:
        check_ids(info, required, "required_prefix_token_ids")
        last = next((i for i in reversed(range(len(messages))) if messages[i].role == "assistant"), None)
        return TokenPrefix(list(required), last, "required_prefix_token_ids")
    for i in reversed(range(len(messages))):
        msg = messages[i]
        if msg.prompt_token_ids is not None:
            ids = list(msg.prompt_token_ids) + list(msg.generation_token_ids)
            param = f"messages[{i}].prompt_token_ids"
            check_ids(info, ids, param)
            return TokenPrefix(ids, i, param)
    return None


def replace_prefix_tokens(model_prefix: list[int], template_prefix: list[int], template: list[int],
                          end_ids: frozenset[int], param: str) -> list[int]:
    """``model_prefix`` (less a final end token) + ``template`` from its N-th end token on, N being the
    end tokens in ``template_prefix`` (NeMo-RL's ``replace_prefix_tokens``; see the module docstring).
    A template prefix without end tokens, or a template with fewer, is a 400 naming ``param``."""
    if not model_prefix:
        return template
    cut_end = len(model_prefix) - (model_prefix[-1] in end_ids)
    need = sum(t in end_ids for t in template_prefix)
    seen = 0
    for pos, t in enumerate(template):
        if t in end_ids:
            seen += 1
            if seen == need:
                return model_prefix[:cut_end] + template[pos:]
    raise bad_request(f"cannot place the earlier turn's token ids: the chat template's rendering of the messages "
                      f"up to that assistant turn has {need} end-of-turn tokens and the whole conversation {seen} "
                      "(the ids are joined at the end-of-turn token that closes that turn)", param)
