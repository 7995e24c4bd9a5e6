"""The demo trainer's deterministic batches (``dllm_jax.demo.train``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from dllm_jax.demo import tasks
from dllm_jax.demo.evaluate import chat_ids
from dllm_jax.demo.tokenizer import EOS, reply_ids


@dataclasses.dataclass
class Encoded:
    prompts: list[list[int]]
    replies: list[list[int]]


def encode(tokenizer, examples) -> Encoded:
    return Encoded([chat_ids(tokenizer, e.prompt) for e in examples],
                   [reply_ids(tokenizer, e.reply) for e in examples])


class Batches:
    """Deterministic training batches: [B, L] tokens, [B] prompt and reply (with ``<|eot_id|>``) lengths.

    Every row is ``prompt + reply + <|eot_id|> + <|endoftext|>...`` up to L = max prompt
    length + canvas; long steps draw from every task, short steps (canvas ``cfg.short_canvas``)
    from the replies that fit (and, with ``help_share``, prompts no longer than an addition's).
    """

    def __init__(self, tokenizer, cfg):
        self.cfg = cfg
        h = cfg.help_share  # 0: the shipped model's batches, exactly
        self.sets = {name: encode(tokenizer, group) for name, group in tasks.training_set(h > 0).items()}
        self.rng = np.random.default_rng(cfg.seed)
        self.mix = {"long": {"add": 0.35, "count": 0.55, "chat": 0.10}, "short": {"add": 0.9, "chat": 0.1}}
        every = tasks.additions(True) + tasks.counts(True) + tasks.chats() + tasks.additions(False)[:1]
        self.max_prompt = dict.fromkeys(("long", "short"), max(len(chat_ids(tokenizer, e.prompt)) for e in every))
        if h > 0:
            self.mix = {kind: {**{n: v * (1 - h) for n, v in mix.items()}, "help": h} for kind, mix in self.mix.items()}
            longest = {name: max(map(len, data.prompts)) for name, data in self.sets.items()}
            self.max_prompt = {"long": max(longest.values()), "short": max(longest["add"], longest["chat"])}

    def length(self, kind: str) -> int:
        return self.max_prompt[kind] + (self.cfg.long_canvas if kind == "long" else self.cfg.short_canvas)

    def next(self) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        cfg, rng = self.cfg, self.rng
        kind = "short" if rng.random() < cfg.short_fraction else "long"
        seq_len = self.length(kind)
        names = list(self.mix[kind])
        probs = np.array([self.mix[kind][n] for n in names])
        rows = cfg.batch if kind == "long" else cfg.short_batch
        tokens = np.full((rows, seq_len), EOS, np.int32)
        plen = np.zeros(rows, np.int32)
        rlen = np.zeros(rows, np.int32)
        for r in range(rows):
            while True:
                name = names[rng.choice(len(names), p=probs)]
                data = self.sets[name]
                i = rng.integers(len(data.prompts))
                p, a = data.prompts[i], data.replies[i]
                fits = len(p) <= self.max_prompt[kind] or not self.cfg.help_share
                if fits and len(p) + len(a) < seq_len:  # room for at least one <|endoftext|>
                    break
            tokens[r, :len(p)] = p
            tokens[r, len(p):len(p) + len(a)] = a
            plen[r], rlen[r] = len(p), len(a)
        return kind, tokens, plen, rlen
