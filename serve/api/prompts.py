"""Prompt token ids from a request: chat templates (with an earlier turn's ids kept, for RL
clients), completion prompts (text or ids), and the bounds checked on the way: characters
before tokenizing (``check_chars``), the context after (``check_fits``), token ids in range.

Tokenizing is the expensive part; the routes call these in a worker thread.
"""

from __future__ import annotations

from serve.api import chat_tokens
from serve.api.protocol import APIError, bad_request, clip, excerpt
from serve.engine.engine_types import ModelInfo


def encode(tok, text: str, param: str, **kw) -> list[int]:
    try:
        return tok.encode(text, **kw)
    except Exception as e:  # noqa: BLE001 - e.g. lone surrogates the tokenizer cannot encode
        raise bad_request(f"the text could not be tokenized: {type(e).__name__}: {clip(str(e), 200)}", param) from None


def check_chars(info: ModelInfo, chars: int, param: str) -> None:
    """The first bound on a prompt, before it is tokenized: its characters."""
    if chars > info.max_prompt_chars:
        raise APIError(413, f"the prompt has {chars} characters; this server tokenizes at most {info.max_prompt_chars} "
                            f"(--max-prompt-chars; by default the context of {info.max_length} tokens x the longest "
                            "vocabulary entry)", param=param, code="prompt_too_long")


def check_fits(info: ModelInfo, ids: list[int], param: str) -> None:
    if len(ids) >= info.max_length:
        raise APIError(413, f"the prompt has {len(ids)} tokens; the model's context is {info.max_length} tokens "
                            "(prompt + max_tokens must fit)", param=param, code="context_length_exceeded")


def template_ids(info: ModelInfo, messages: list[dict], add_generation_prompt: bool = True,
                  add_special_tokens: bool = False) -> list[int]:
    tok = info.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja raises for conversations it does not accept
        raise bad_request(f"the chat template rejected the messages: {clip(str(e), 200)}", "messages") from None
    return encode(tok, text, "messages", add_special_tokens=add_special_tokens)

def chat_ids(info: ModelInfo, messages: list[dict], prefix: chat_tokens.TokenPrefix | None,
              add_generation_prompt: bool = True, add_special_tokens: bool = False) -> list[int]:
    """The template's ids; with ``prefix`` (an earlier turn's ids), those ids + the template's
    continuation (``serve.api.chat_tokens``)."""
    ids = template_ids(info, messages, add_generation_prompt, add_special_tokens)
    if prefix is None:
        return ids
    upto = len(messages) if prefix.upto is None else prefix.upto + 1
    head = template_ids(info, messages[:upto], False, add_special_tokens)
    return chat_tokens.replace_prefix_tokens(prefix.ids, head, ids, frozenset(info.stop_token_ids), prefix.param)

def chat_prompt(info: ModelInfo, messages: list[dict], prefix: chat_tokens.TokenPrefix | None = None) -> list[int]:
    ids = chat_ids(info, messages, prefix)
    check_fits(info, ids, "messages")
    return ids

def completion_prompts(info: ModelInfo, prompt) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt, and its text (for echo: the string, or the ids decoded)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    out, texts = [], []
    for i, p in enumerate(prompt):
        param = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            if info.tokenizer is None:
                raise bad_request("this model has no tokenizer; send token ids", param)
            ids = encode(info.tokenizer, p, param)
        else:
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < info.vocab or t == info.mask_token_id]
            if bad:
                raise bad_request(f"token id {excerpt(bad[0])} is out of range [0, {info.vocab}) or is the mask "
                                  f"token {info.mask_token_id}", param)
        if not ids:
            raise bad_request("prompt must not be empty", param)
        check_fits(info, ids, param)
        out.append(ids)
        texts.append(p if isinstance(p, str) else
                     info.tokenizer.decode(ids, skip_special_tokens=False) if info.tokenizer is not None else "")
    return out, texts
