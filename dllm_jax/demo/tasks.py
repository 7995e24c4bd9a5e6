"""The demo model's synthetic instruction set: tasks, the held-out split, exact-match scoring.

Every task is a (user message, assistant reply) pair generated from integers and templates,
so the whole data set is known, the held-out split is a rule, and accuracy is exact match of
the reply.

- ``What is {a}+{b}?`` -> ``{a+b}`` for 0 <= a, b <= 99. 948 pairs are held out from training
  by crc32 of the unordered pair (a+b and b+a on the same side; every units-digit and tens-digit
  pair is on both sides, so a held-out pair asks for digit sums the model has seen, in a new
  combination). The model before issue 25 held out (a + 2b) % 10 == 3, which holds out whole
  units-digit pairs (7+3, 1+1, ...): a carry it never saw.
- ``Count from {a} to {b}.`` -> ``{a}, {a+1}, ..., {b}`` for 0 <= a < b <= 99, b - a <= 30 (with
  one token per number and per ", ", replies of 3-61 tokens and the <|eot_id|>). Pairs with (3a + b) % 10 == 7
  are held out.
- A few fixed chat turns (greetings, "what can you do?") so the first reply a newcomer gets
  tells them what to ask.
- Everything else gets one fixed polite answer, ``SORRY`` (task "help"): additions or counts
  outside those ranges ("What is 100+250?", "Count from 5 to 80.", "Count from 9 to 3."),
  other operators ("What is 7*8?") and assorted requests generated from
  templates ("Tell me a joke"). Prompts with crc32 % 10 == 0 are held out, and so are the
  examples issue 25 was filed with.
"""

from __future__ import annotations

import dataclasses
import random
import re
import zlib
from typing import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class Example:
    task: str        # "add" | "count" | "chat" | "help"
    prompt: str      # the user message
    reply: str       # the exact expected assistant reply


def add_prompt(a: int, b: int) -> str:
    return f"What is {a}+{b}?"


def count_prompt(a: int, b: int) -> str:
    return f"Count from {a} to {b}."


def count_bounds(prompt: str) -> tuple[int, int]:
    """(a, b) of a ``count_prompt``."""
    a, b = (int(x) for x in prompt.rstrip(".").split()[2::2])
    return a, b


def count_reply(a: int, b: int) -> str:
    return ", ".join(str(i) for i in range(a, b + 1))


def add_held_out(a: int, b: int) -> bool:
    """948 pairs, a+b and b+a on the same side, every units-digit pair on both sides."""
    return zlib.crc32(f"{min(a, b)}+{max(a, b)}".encode()) % 10 == 3


def count_held_out(a: int, b: int) -> bool:
    return (3 * a + b) % 10 == 7


def count_in_range(a: int, b: int) -> bool:
    return 0 <= a < b <= 99 and b - a <= 30


def additions(held_out: bool) -> list[Example]:
    """Every addition pair on one side of the split."""
    return [Example("add", add_prompt(a, b), str(a + b))
            for a in range(100) for b in range(100) if add_held_out(a, b) == held_out]


def counts(held_out: bool) -> list[Example]:
    return [Example("count", count_prompt(a, b), count_reply(a, b))
            for a in range(100) for b in range(a + 1, min(a + 31, 100)) if count_held_out(a, b) == held_out]


HELP = ("I am a tiny diffusion language model trained on two tasks. Ask me to add two numbers up to 99, "
        "like: What is 12+34? Or ask me to count up to 99, at most 30 steps, like: Count from 5 to 20.")
SORRY = "Sorry, I can't do that. " + HELP  # the one answer to everything outside the tasks
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


# ---- the polite answer ("help") ---------------------------------------------------------

ISSUE_PROBES = ("What is 100+250?", "Tell me a joke")  # issue 25's examples: always held out
_VERBS = ("Tell me", "Write", "Give me", "Show me", "Make", "Find", "Describe", "Explain", "Draw", "Sing")
_OBJECTS = ("a joke", "a story", "a poem", "a song", "a riddle", "a recipe", "a fact", "the news", "a haiku",
            "a letter", "an essay", "a list", "a summary", "some code", "a plan", "a secret", "the rules",
            "the weather", "the answer", "a word")
_WHAT = ("love", "the time", "your name", "the date", "life", "AI", "a cat", "the sun", "Paris", "music",
         "math", "the moon", "a prime", "pi", "water", "the best", "happiness", "a number", "today", "that")
_QUESTIONS = ("How are you?", "Who made you?", "Why is the sky blue?", "Where am I?", "What time is it?",
              "Can you help me?", "Are you alive?", "Do you like cats?", "What day is it?", "How old are you?",
              "Is it going to rain?", "What should I eat?", "Can you code?", "Do you dream?", "Bye",
              "Good night", "Tell me more", "ok", "yes", "no", "?", "asdf", "hmm", "test", "Add numbers",
              "Count", "Count to ten.", "What is?", "Count from a to b.", "What is a+b?", "Translate hello",
              "Speak French", "Play a game", "Sum 3 and 4", "How do I count?", "What is one plus two?")


def help_kind(prompt: str) -> str:
    """What a polite-answer prompt looks like: "sum" (an addition with a number past 99), "count"
    (a count out of range), "count_big" (one with a number past 99), "op" (another operator on
    numbers) or "other"."""
    if re.fullmatch(r"What is \d+\+\d+\?", prompt):
        return "sum"
    m = re.fullmatch(r"Count from (\d+) to (\d+)\.", prompt)
    if m:
        return "count_big" if max(int(m[1]), int(m[2])) > 99 else "count"
    return "op" if re.fullmatch(r"What is \d+[-*/x]\d+\?", prompt) else "other"


def help_held_out(prompt: str) -> bool:
    return prompt in ISSUE_PROBES or zlib.crc32(prompt.encode()) % 10 == 0


def help_prompts() -> list[str]:
    """Every prompt the fixed polite answer is trained or evaluated on (deterministic)."""
    rng = random.Random(25)
    prompts = [f"{v} {o}" for v in _VERBS for o in _OBJECTS]
    prompts += [f"{v} {o}." for v in _VERBS[:5] for o in _OBJECTS]
    prompts += [f"What is {w}?" for w in _WHAT] + list(_QUESTIONS)
    big = lambda: rng.choice((rng.randint(100, 999), rng.randint(100, 999), rng.randint(1000, 99999)))  # noqa: E731
    small = lambda: rng.randint(0, 99)  # noqa: E731
    for _ in range(1500):  # additions out of range: at least one number >= 100
        a, b = (big(), big()) if rng.random() < 0.3 else (big(), small()) if rng.random() < 0.5 else (small(), big())
        prompts.append(add_prompt(a, b))
    for _ in range(800):  # other operators on in-range numbers
        prompts.append(f"What is {small()}{rng.choice('-*/x')}{small()}?")
    for _ in range(1500):  # counts out of range: too long, backwards / empty, or past 99
        r = rng.random()
        if r < 0.4:
            a = rng.randint(0, 68)
            b = rng.randint(a + 31, 99)
        elif r < 0.7:
            b = rng.randint(0, 99)
            a = rng.randint(b, 99)
        else:
            a = rng.randint(0, 999)
            b = rng.randint(max(a + 1, 100), max(a + 1, 100) + rng.choice((5, 20, 100, 1000)))
        if not count_in_range(a, b):
            prompts.append(count_prompt(a, b))
    prompts += ISSUE_PROBES
    seen, out = set(), []
    for p in prompts:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def helps(held_out: bool) -> list[Example]:
    return [Example("help", p, SORRY) for p in help_prompts() if help_held_out(p) == held_out]


def training_set(polite: bool = True) -> dict[str, list[Example]]:
    """The training examples per task (``polite``: the fixed answer's prompts too)."""
    out = {"add": additions(held_out=False), "count": counts(held_out=False), "chat": chats()}
    if polite:
        out["help"] = helps(held_out=False)
    return out


def held_out_additions(n: int | None = None, seed: int = 0) -> list[Example]:
    """The held-out additions (all 1000, or a seeded sample of n)."""
    return _sample(additions(held_out=True), n, seed)


def held_out_counts(n: int | None = None, seed: int = 0) -> list[Example]:
    return _sample(counts(held_out=True), n, seed)


def held_out_helps(n: int | None = None, seed: int = 0) -> list[Example]:
    return _sample(helps(held_out=True), n, seed)


def _sample(items: list[Example], n: int | None, seed: int) -> list[Example]:
    if n is None or n >= len(items):
        return items
    return random.Random(seed).sample(items, n)


def corpus(polite: bool = True) -> Iterable[str]:
    """Every text the tokenizer should cover (prompts and replies of all tasks)."""
    for group in training_set(polite).values():
        for ex in group:
            yield ex.prompt
            yield ex.reply
    for ex in additions(held_out=True) + counts(held_out=True) + (helps(held_out=True) if polite else []):
        yield ex.prompt


def exact_match(reply: str, example: Example) -> bool:
    return reply.strip() == example.reply


def prefix_match(reply: str, example: Example) -> bool:
    """The reply starts with the expected one (for counts: every number right, whether or not it stopped)."""
    return reply.strip().startswith(example.reply)


def accuracy(replies: Sequence[str], examples: Sequence[Example]) -> float:
    return sum(exact_match(r, e) for r, e in zip(replies, examples, strict=True)) / max(len(examples), 1)
