"""The demo model's synthetic instruction set: tasks, the held-out split, exact-match scoring.

Every task is a (user message, assistant reply) pair generated from integers, so the whole
data set is known, the held-out split is a rule, and accuracy is exact match of the reply.

- ``What is {a}+{b}?`` -> ``{a+b}`` for 0 <= a, b <= 99. Pairs with (a + 2b) % 10 == 3 are
  held out from training (one pair in ten, spread over every a and b).
- ``Count from {a} to {b}.`` -> ``{a}, {a+1}, ..., {b}`` for 0 <= a <= 69, 10 <= b - a <= 30
  (replies of 22-92 tokens: up to three 32-token blocks). Pairs with (3a + b) % 10 == 7 are held
  out.
- A few fixed chat turns (greetings, "what can you do?") so the first reply a newcomer gets
  tells them what to ask.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class Example:
    task: str        # "add" | "count" | "chat"
    prompt: str      # the user message
    reply: str       # the exact expected assistant reply


def add_prompt(a: int, b: int) -> str:
    return f"What is {a}+{b}?"


def count_prompt(a: int, b: int) -> str:
    return f"Count from {a} to {b}."


def count_reply(a: int, b: int) -> str:
    return ", ".join(str(i) for i in range(a, b + 1))


def add_held_out(a: int, b: int) -> bool:
    return (a + 2 * b) % 10 == 3


def count_held_out(a: int, b: int) -> bool:
    return (3 * a + b) % 10 == 7


def additions(held_out: bool) -> list[Example]:
    """Every addition pair on one side of the split."""
    return [Example("add", add_prompt(a, b), str(a + b))
            for a in range(100) for b in range(100) if add_held_out(a, b) == held_out]


def counts(held_out: bool) -> list[Example]:
    return [Example("count", count_prompt(a, a + n), count_reply(a, a + n))
            for a in range(70) for n in range(10, 31) if count_held_out(a, a + n) == held_out]


HELP = ("I am a tiny diffusion language model trained on two tasks. Ask me to add two numbers, "
        "like: What is 12+34? Or ask me to count, like: Count from 5 to 20.")
CHAT = [
    ("Hi", "Hello! " + HELP),
    ("Hello", "Hello! " + HELP),
    ("Hi!", "Hello! " + HELP),
    ("Hello!", "Hello! " + HELP),
    ("Hey", "Hello! " + HELP),
    ("What can you do?", HELP),
    ("Who are you?", HELP),
    ("Help", HELP),
    ("Thanks", "You are welcome!"),
    ("Thank you!", "You are welcome!"),
]


def chats() -> list[Example]:
    return [Example("chat", p, r) for p, r in CHAT]


def training_set() -> dict[str, list[Example]]:
    return {"add": additions(held_out=False), "count": counts(held_out=False), "chat": chats()}


def held_out_additions(n: int | None = None, seed: int = 0) -> list[Example]:
    """The held-out additions (all 1000, or a seeded sample of n)."""
    return _sample(additions(held_out=True), n, seed)


def held_out_counts(n: int | None = None, seed: int = 0) -> list[Example]:
    return _sample(counts(held_out=True), n, seed)


def _sample(items: list[Example], n: int | None, seed: int) -> list[Example]:
    if n is None or n >= len(items):
        return items
    return random.Random(seed).sample(items, n)


def corpus() -> Iterable[str]:
    """Every text the tokenizer should cover (prompts and replies of all tasks)."""
    for group in training_set().values():
        for ex in group:
            yield ex.prompt
            yield ex.reply
    for ex in additions(held_out=True) + counts(held_out=True):
        yield ex.prompt


def exact_match(reply: str, example: Example) -> bool:
    return reply.strip() == example.reply


def prefix_match(reply: str, example: Example) -> bool:
    """The reply starts with the expected one (for counts: every number right, whether or not it stopped)."""
    return reply.strip().startswith(example.reply)


def accuracy(replies: Sequence[str], examples: Sequence[Example]) -> float:
    return sum(exact_match(r, e) for r, e in zip(replies, examples, strict=True)) / max(len(examples), 1)
