"""Log probabilities in OpenAI's shapes: token strings, their exact bytes, top alternatives.

Each token is decoded on its own (``decode([id])``), so a token that is part of a multi-byte
UTF-8 character reads "\ufffd"; its ``bytes`` are nevertheless exact: for byte-level BPE
tokenizers (GPT-2 / Qwen / the fixtures) they come from the byte-level vocabulary
(``convert_ids_to_tokens`` through the inverse of GPT-2's ``bytes_to_unicode``), for
SentencePiece byte-fallback tokens (``<0xE6>``) from the hex, else from the decoded string.
The ``bytes`` of a reply's tokens therefore concatenate to the UTF-8 of its text (special
tokens aside: they are dropped from the text by ``skip_special_tokens``).

What the numbers mean is the sampler's (docs/api.md "Log probabilities"), at the step the
token was committed: with ``logprobs_mode`` 'raw' (the default) the log-softmax of the
unfiltered logits before temperature; 'processed' (T > 0) the distribution the token was drawn
from (tempered, filtered, renormalised; tokens outside it read -inf, sent as -9999). Top lists
exclude the mask.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Sequence

import numpy as np
from openai.types.chat import ChatCompletionTokenLogprob
from openai.types.chat.chat_completion import ChoiceLogprobs
from openai.types.chat.chat_completion_token_logprob import TopLogprob

_HEX_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in str(decoder)


class TokenText:
    """Per-token strings and bytes of one tokenizer (cached by id)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        self.added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(
            getattr(tokenizer, "all_special_ids", []) or [])
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        token_id = int(token_id)
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def text(self, token_id: int) -> str:
        return self(token_id)[0]

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        text = self.tok.decode([token_id], skip_special_tokens=False)
        raw = None
        if token_id not in self.added:
            piece = self.tok.convert_ids_to_tokens(token_id)
            if isinstance(piece, str):
                m = _HEX_BYTE.match(piece)
                if m:
                    raw = [int(m.group(1), 16)]
                elif self.byte_level:
                    dec = _byte_decoder()
                    if all(ch in dec for ch in piece):
                        raw = [dec[ch] for ch in piece]
        if raw is None:
            raw = list(text.encode("utf-8"))
        return text, raw


def _f(x) -> float:
    x = float(x)
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf (OpenAI also clamps to -9999)


def chat_content(tt: TokenText, tokens: Sequence[int], logprobs: np.ndarray, top_ids: np.ndarray,
                 top_logprobs: np.ndarray, k: int, *, as_ids: bool = False) -> list[ChatCompletionTokenLogprob]:
    """``choices[i].logprobs.content`` entries for these tokens (k alternatives each).

    ``as_ids``: vLLM's ``return_tokens_as_token_ids``: each ``token`` reads ``"token_id:<id>"`` (its
    ``bytes`` stay the token's own)."""
    out = []
    for j, t in enumerate(tokens):
        text, raw = tt(t)
        tops = []
        for a in range(k):
            atext, araw = tt(top_ids[j, a])
            tops.append(TopLogprob(token=f"token_id:{int(top_ids[j, a])}" if as_ids else atext, bytes=araw,
                                   logprob=_f(top_logprobs[j, a])))
        out.append(ChatCompletionTokenLogprob(token=f"token_id:{int(t)}" if as_ids else text, bytes=raw,
                                              logprob=_f(logprobs[j]), top_logprobs=tops))
    return out


def chat_logprobs(content: list[ChatCompletionTokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=content, refusal=None)


def top_dict(tt: TokenText, chosen: int, chosen_lp, ids: np.ndarray, lps: np.ndarray, k: int) -> dict[str, float]:
    """A legacy completions ``top_logprobs`` entry (vLLM): the k most probable + the chosen token."""
    out: dict[str, float] = {}
    for a in range(k):
        out.setdefault(tt.text(ids[a]), _f(lps[a]))
    out.setdefault(tt.text(chosen), _f(chosen_lp))
    return out


class CompletionLogprobs:
    """The four parallel lists of a legacy completions ``logprobs`` object, built incrementally."""

    def __init__(self, offset: int = 0):
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.offset = offset

    def add(self, text: str, logprob: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(None if logprob is None else _f(logprob))
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def add_generated(self, tt: TokenText, tokens: Sequence[int], logprobs: np.ndarray, top_ids: np.ndarray,
                      top_logprobs: np.ndarray, k: int) -> None:
        for j, t in enumerate(tokens):
            self.add(tt.text(t), logprobs[j], top_dict(tt, t, logprobs[j], top_ids[j], top_logprobs[j], k))

    def body(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}

    def since(self, start: int) -> dict:
        """The entries from ``start`` on (a streamed chunk's own tokens)."""
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}
