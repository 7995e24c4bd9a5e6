"""Incremental detokenisation of a growing final-token prefix, with stop strings.

A diffusion block commits many tokens at once; the server sees, after each block, the
row's tokens that are final so far. ``TextStream.update(tokens, done)`` returns the new text
that is safe to send:

- text ending in U+FFFD is held back while more tokens may come (a multi-byte UTF-8
  character split across tokens decodes to "\ufffd" until its last byte arrives; TGI
  ``Model.decode_token`` does the same);
- the last ``len(longest stop) - 1`` characters are held back while they could be the start
  of a stop string;
- a stop string ends the text just before it (finish_reason "stop"), or just after it with
  ``include_stop`` (vLLM's ``include_stop_str_in_output``).

The streamed deltas concatenate to exactly the non-streamed text, because the non-streamed
response is built by the same object.
"""

from __future__ import annotations

from typing import Sequence


class TextStream:
    """Text of one choice, built from successive final-token prefixes.

    Attributes:
      text: everything emitted so far.
      stopped: a stop string was found (the text ends before it).
      n_tokens: tokens that produced ``text`` (for usage when a stop string cut the output).
      matched: the stop string found (None until one is).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), *, skip_special_tokens: bool = True,
                 include_stop: bool = False):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.skip = skip_special_tokens
        self.include_stop = include_stop  # vLLM's include_stop_str_in_output
        self.text = ""
        self.stopped = False
        self.matched: str | None = None
        self.n_tokens = 0
        self._tokens: list[int] = []

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=self.skip)

    def update(self, tokens: Sequence[int], done: bool) -> str:
        """New text for the final prefix ``tokens`` (which only grows); '' if nothing is safe yet."""
        if self.stopped:
            return ""
        tokens = [int(t) for t in tokens]
        self._tokens = tokens
        full = self.decode(tokens)
        if not full.startswith(self.text):
            # A tokenizer whose decode is not prefix-stable: keep what was sent (it cannot be
            # taken back) and continue from the longest common prefix.
            full = self.text + full[_common_prefix(self.text, full):]
        found = self._find_stop(full)
        if found is not None:
            cut, stop = found
            full, done = full[:cut + (len(stop) if self.include_stop else 0)], True
            self.stopped, self.matched = True, stop
        end = len(full)
        if not done:
            while end > len(self.text) and full[end - 1] == "\ufffd":
                end -= 1
            end = max(len(self.text), min(end, len(full) - self.hold))
        delta = full[len(self.text):end]
        self.text += delta
        self.n_tokens = self._count_tokens() if self.stopped else len(tokens)
        return delta

    def _find_stop(self, full: str) -> tuple[int, str] | None:
        """(where the first stop string starts, which one), or None."""
        # A stop string may straddle what was already sent only within the held-back tail.
        start = max(0, len(self.text) - self.hold)
        hits = [(i, -len(s), s) for s in self.stop if (i := full.find(s, start)) >= 0]
        if not hits:
            return None
        i, _, s = min(hits)
        return i, s

    def tokens_covering(self) -> int:
        """Fewest leading tokens whose text covers what was emitted (the tokens sent so far)."""
        if not self.stopped and self.text == self.decode(self._tokens):
            return len(self._tokens)
        return self._count_tokens()

    def _count_tokens(self) -> int:
        """Fewest leading tokens whose text covers what was returned (binary search)."""
        lo, hi = 0, len(self._tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.decode(self._tokens[:mid])) >= len(self.text):
                hi = mid
            else:
                lo = mid + 1
        return lo


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
