"""The choices of one OpenAI call in flight: engine events in, text (stop strings, UTF-8 safe),
logprobs, traces and finish reasons out; read by the non-streamed answer and by
``serve.api.streaming``."""

from __future__ import annotations

import math
from typing import Sequence

from serve.api import responses
from serve.api.detok import TextStream
from serve.api.logprobs import CompletionLogprobs, TokenText, chat_content
from serve.engine.metrics import Metrics
from serve.engine.requests import Event, Handle
class Choices:
    """Text, finish reason, token count (and logprobs) of every choice of one request."""

    def __init__(self, handle: Handle, tokenizer, stops: Sequence[str], count: int, metrics: Metrics, *,
                 skip_special_tokens: bool = True, include_stop: bool = False, kind: str = "chat",
                 logprobs: int | None = None, prefixes: Sequence[str] | None = None,
                 prefix_logprobs: Sequence[CompletionLogprobs] | None = None,
                 eos_ids: frozenset[int] = frozenset(), trace: tuple[int, int] | None = None,
                 as_ids: bool = False, keep_ids: bool = False):
        self.handle, self.metrics, self.kind, self.k = handle, metrics, kind, logprobs
        # RL clients (chat): logprobs tokens as "token_id:<id>" with the stop token's own entry; each
        # choice's generated ids (a stop token that ended it included), kept when it finishes
        self.as_ids = as_ids
        self.ids: list[list[int]] | None = [[] for _ in range(count)] if keep_ids else None
        self.streams = [TextStream(tokenizer, stops, skip_special_tokens=skip_special_tokens,
                                   include_stop=include_stop) for _ in range(count)]
        self.reasons: list[str | None] = [None] * count
        self.tokens = [0] * count
        self.prefixes = list(prefixes) if prefixes is not None else [""] * count   # echo
        self.eos_ids = eos_ids  # a last token that ends the reply though the device did not stop on it
        self.tt = TokenText(tokenizer) if logprobs is not None else None
        self.lp_sent = [0] * count
        self.chat_lp: list[list] = [[] for _ in range(count)]
        self.comp_lp = list(prefix_logprobs) if prefix_logprobs is not None else \
            [CompletionLogprobs() for _ in range(count)]
        # stream_trace: (gen_length, block_length) of the canvas; per choice the latest event,
        # how many of its tokens are covered by what was sent, and how many traced so far
        self.layout = trace
        self.nfe = [0] * count
        self._last: list[Event | None] = [None] * count
        self._end = [0] * count
        self._traced = [0] * count
        if trace is not None and self.tt is None:
            self.tt = TokenText(tokenizer)

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def apply(self, ev: Event) -> tuple[str, str | None, object] | None:
        """(new text, finish_reason if this event finished the choice, the new tokens' logprobs
        (chat: content entries, completions: the parallel lists; None without logprobs)), or None
        if the choice is over."""
        i = ev.index
        if self.reasons[i] is not None:
            return None
        ts = self.streams[i]
        delta = ts.update(ev.tokens, ev.done)
        reason = "stop" if ts.stopped else (ev.finish_reason if ev.done else None)
        if reason == "length" and self.eos_ids and len(ev.tokens) and int(ev.tokens[-1]) in self.eos_ids:
            reason = "stop"
        if ts.stopped and not ev.done:
            self.handle.cancel(i)  # a stop string ended it: free the slot at the next block
        stop = None
        if reason is not None:
            self.reasons[i] = reason
            self.tokens[i] = ts.n_tokens
            self.metrics.finished(reason, ts.n_tokens)
            # the stop token that ended the row (not in ev.tokens) unless a stop string cut the text before it
            if ev.stop_id is not None and not ts.stopped and ts.n_tokens == len(ev.tokens):
                stop = int(ev.stop_id)
            if self.ids is not None:
                self.ids[i] = [int(t) for t in ev.tokens[:ts.n_tokens]] + ([stop] if stop is not None else [])
        end = ts.n_tokens if reason is not None else ts.tokens_covering()
        if self.layout is not None:
            self._last[i], self._end[i], self.nfe[i] = ev, min(end, len(ev.tokens)), ev.nfe
        return delta, reason, self._logprobs(i, ev, end, stop)

    def trace(self, i: int) -> dict | None:
        """stream_trace: choice ``i``'s tokens covered by the text sent so far and not traced yet,
        with each one's commit step and confidence (None without stream_trace)."""
        if self.layout is None:
            return None
        ev, start = self._last[i], self._traced[i]
        end = max(start, self._end[i])
        self._traced[i] = end
        ids = [] if ev is None else [int(t) for t in ev.tokens[start:end]]
        steps = conf = ()
        if ev is not None and ev.commit_step is not None:
            steps, conf = ev.commit_step[start:end], ev.commit_conf[start:end]
        gen_length, block_length = self.layout
        return {"index": i, "start": start, "token_ids": ids, "tokens": [self.tt.text(t) for t in ids],
                "commit_step": [int(x) for x in steps],
                "confidence": [round(float(c), 4) if math.isfinite(c) else 0.0 for c in conf],
                "nfe": self.nfe[i], "gen_length": gen_length, "block_length": block_length}

    def _logprobs(self, i: int, ev: Event, end: int, stop: int | None = None):
        if self.k is None:
            return None
        start = self.lp_sent[i]
        end = min(end, len(ev.tokens))
        new_tokens = ev.logprobs is not None and end > start
        if self.kind == "chat":
            new = []
            if new_tokens:
                self.lp_sent[i] = end
                sl = slice(start, end)
                new = chat_content(self.tt, ev.tokens[sl], ev.logprobs[sl], ev.top_ids[sl], ev.top_logprobs[sl],
                                   self.k, as_ids=self.as_ids)
            if stop is not None and self.as_ids and ev.stop_logprob is not None:
                # vLLM lists the stop token too (its alternatives are not kept: an empty list)
                new += chat_content(self.tt, [stop], [ev.stop_logprob], None, None, 0, as_ids=True)
            self.chat_lp[i].extend(new)
            return new
        lp = self.comp_lp[i]
        before = len(lp.tokens)
        if new_tokens:
            self.lp_sent[i] = end
            sl = slice(start, end)
            lp.add_generated(self.tt, ev.tokens[sl], ev.logprobs[sl], ev.top_ids[sl], ev.top_logprobs[sl], self.k)
        return lp.since(before)

    def chat_tokens(self, prompt_ids: list[int] | None, choice_ids: bool) -> responses.ChatTokens | None:
        """The token fields of a finished chat answer (None unless the client asked for ids): NeMo-RL's
        message fields with return_tokens_as_token_ids + logprobs, vLLM's token_ids with return_token_ids."""
        if prompt_ids is None or self.ids is None:
            return None
        log_probs = None
        if self.as_ids and self.k is not None:
            log_probs = [[e.logprob for e in lp] for lp in self.chat_lp]
        return responses.ChatTokens(prompt_ids, self.ids, log_probs, choice_ids)

    def results(self) -> list[tuple[str, str]]:
        return [(p + ts.text, r) for p, ts, r in zip(self.prefixes, self.streams, self.reasons)]

    def logprobs(self) -> list | None:
        if self.k is None:
            return None
        return self.chat_lp if self.kind == "chat" else [lp.body() for lp in self.comp_lp]
