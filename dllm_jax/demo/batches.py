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


def number_ends(tokenizer, reply: list[int]) -> list[int]:
    """Indices just past each number of a tokenised reply (its last is b's): after a token whose
    text ends in a digit when the next one's does not start with one."""
    text = [tokenizer.decode([t]) for t in reply] + [""]
    return [i + 1 for i in range(len(reply)) if text[i][-1:].isdigit() and not text[i + 1][:1].isdigit()]


def normalised(mix: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each lane's shares scaled to sum to 1."""
    return {k: {n: v / sum(m.values()) for n, v in m.items()} for k, m in mix.items()}


class Batches:
    """Deterministic training batches: [B, L] tokens, [B] prompt and reply (with ``<|eot_id|>``) lengths.

    Every row is ``prompt + reply + <|eot_id|> + <|endoftext|>...`` up to L = the lane's longest
    prompt + its canvas. Three lanes: "long" (canvas ``cfg.long_canvas``, the server's default
    ``max_tokens``) draws from every task; "short" (``cfg.short_canvas``, which holds every count)
    from every task but the additions (a share ``short_adds`` of additions in the second phase); "add" (``cfg.add_canvas``) only additions, whose reply is
    one to three digits, so that many of them fit a cheap step; every "add" row has its whole response
    masked (cut at 0, ``objective.sft_loss``): with i.i.d. masks a one-token reply is visible in
    about half the rows and the sums are not learnt in 1000 steps (docs/performance.md). A step is "add" with probability
    ``cfg.add_fraction``, else "short" with ``cfg.short_fraction``, else "long". ``add_cut0``: the
    share of the long and short lanes' addition rows also cut at 0 (the second phase).
    ``help_cut0``: per kind of polite-answer prompt (``tasks.help_kind``), the share of those rows
    in the long and short lanes cut at 0. ``add_help``: the share of the "add" lane's rows that are
    out-of-range sums, their reply the polite answer's first tokens, as many as the canvas holds
    (the second phase: the first state of a prompt that looks like a sum, where the sums are learnt).
    ``count_help``: the share of the "add" lane's rows that are counts out of range within 0-99
    (backwards or too long, ``help_kind`` "count"), their reply the polite answer's first tokens;
    ``count_in``: the share that are training counts whose whole reply fits the canvas (the first
    state of both, told apart by comparing the prompt's numbers). ``extra_from``: the step from
    which ``help_cut0``, ``add_help``, ``count_help`` and ``count_in`` apply (before it, nothing of
    theirs is drawn; the first phase's ``count_help`` and ``count_cut0``).
    """

    def __init__(self, tokenizer, cfg, add_cut0: float = 0.0, short_adds: float = 0.0,
                 help_cut0: dict[str, float] | None = None, add_help: float = 0.0, count_help: float = 0.0,
                 count_in: float = 0.0, extra_from: int = 0):
        self.cfg, self.add_cut0, self.help_cut0, self.extra_from = cfg, add_cut0, help_cut0 or {}, extra_from
        h = cfg.help_share
        training = tasks.training_set(h > 0)
        self.sets = {name: encode(tokenizer, group) for name, group in training.items()}
        self.help_kind = [tasks.help_kind(e.prompt) for e in training.get("help", [])]
        # the "add" lane's rows besides the additions: polite rows of one kind, and training counts
        extra = {"sum_help": ("sum", add_help), "count_help": ("count", count_help), "count": (None, count_in)}
        for name, (help_kind, share) in extra.items():
            if share and help_kind:
                rows = [e for e, k in zip(training["help"], self.help_kind, strict=True) if k == help_kind]
                self.sets[name] = encode(tokenizer, rows)
        self.rng = np.random.default_rng(cfg.seed)
        self.ends = [number_ends(tokenizer, r) for r in self.sets["count"].replies]
        mix = {"long": {"add": 0.25, "count": 0.60, "chat": 0.15}, "short": {"count": 0.85, "chat": 0.15}}
        if short_adds:  # (the second phase) additions in the short lane too
            mix["short"] = {"add": short_adds, **{n: v * (1 - short_adds) for n, v in mix["short"].items()}}
        mix = {k: {**{n: v * (1 - h) for n, v in m.items()}, **({"help": h} if h else {})} for k, m in mix.items()}
        self.base_mix = normalised({**mix, "add": {"add": 1.0}})
        mix["add"] = {"add": 1.0 - add_help - count_help - count_in,
                      **{name: share for name, (_, share) in extra.items() if share}}
        self.mix = normalised(mix)
        self.max_prompt = {k: max(max(map(len, self.sets[n].prompts)) for n in m) for k, m in self.mix.items()}
        self.canvas = {"long": cfg.long_canvas, "short": cfg.short_canvas, "add": cfg.add_canvas}
        self.rows = {"long": cfg.batch, "short": cfg.short_batch, "add": cfg.add_batch}
        self.step = 0  # batches drawn so far

    def length(self, kind: str) -> int:
        return self.max_prompt[kind] + self.canvas[kind]

    def cut(self, name: str, i: int) -> int:
        """-1, or (a count row with probability ``cfg.cut_share``) where the row is cut. From step
        ``cfg.global_start`` on, a share ``cfg.global_cut`` of them is the state decoding starts
        from or passes through: cut at 0
        (the whole reply masked, the first-step guess of the count's length) or after any of its
        numbers, half each. The rest decide the stop: cut right after b (half of them) or after an
        earlier number: one of the ``cfg.cut_near`` before b (three quarters of the rest), else any."""
        if name != "count" or self.rng.random() >= self.cfg.cut_share:
            return -1
        ends = self.ends[i]
        share = self.cfg.global_cut if self.step >= self.cfg.global_start else 0.0
        if self.rng.random() < share:
            return 0 if self.rng.random() < 0.5 else int(self.rng.choice(ends))
        if self.rng.random() < 0.5 or len(ends) < 2:
            return ends[-1]
        near = min(self.cfg.cut_near, len(ends) - 1) if self.rng.random() < 0.75 else len(ends) - 1
        return ends[-2 - int(self.rng.integers(near))]

    def next(self) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        cfg, rng = self.cfg, self.rng
        u = rng.random()
        kind = "add" if u < cfg.add_fraction else "short" if u < cfg.add_fraction + cfg.short_fraction else "long"
        seq_len = self.length(kind)
        extra = self.step >= self.extra_from
        mix = (self.mix if extra else self.base_mix)[kind]
        names = list(mix)
        probs = np.array([mix[n] for n in names])
        rows = self.rows[kind]
        tokens = np.full((rows, seq_len), EOS, np.int32)
        plen = np.zeros(rows, np.int32)
        rlen = np.zeros(rows, np.int32)
        cut = np.full(rows, -1, np.int32)
        for r in range(rows):
            while True:
                name = names[rng.choice(len(names), p=probs)]
                data = self.sets[name]
                i = rng.integers(len(data.prompts))
                p, a = data.prompts[i], data.replies[i]
                if name in ("sum_help", "count_help"):  # as much of the polite answer as the canvas holds, no end
                    a = a[:seq_len - len(p)]
                    break
                if len(p) + len(a) < seq_len:  # room for at least one <|endoftext|>
                    break
            tokens[r, :len(p)] = p
            tokens[r, len(p):len(p) + len(a)] = a
            # an "add" row is cut at 0: the whole response masked, the sum's cross-entropy weighted 1;
            # another lane's addition row is cut at 0 too with probability add_cut0 (its first state
            # in a long canvas; the rest keep i.i.d. masks, where the pads come first). With add_cut0 = 0
            # nothing is drawn, so the first phase's random stream is unchanged
            add0 = kind == "add" or (name == "add" and self.add_cut0 > 0 and rng.random() < self.add_cut0)
            share = self.help_cut0.get(self.help_kind[i], 0.0) if name == "help" and extra else 0.0
            if share > 0:  # (the second phase) a polite-answer row's first state, by the prompt's kind
                add0 = rng.random() < share
            plen[r], rlen[r], cut[r] = len(p), len(a), 0 if add0 else self.cut(name, i)
        self.step += 1
        return kind, tokens, plen, rlen, cut
