"""The plain data the engine is configured with and reports: its options (``EngineOptions``),
its lifecycle ``State``, what the HTTP layer may know of the model (``ModelInfo``), and queued
work tagged with the weights version it runs on."""

from __future__ import annotations

import dataclasses
import enum

from dllm_jax.sampling import STEPS_PER_CALL
from serve.engine.executor import ServedModel
from serve.engine.requests import ScoreJob, Seq
from serve.engine.weights import Weights


# ``EngineOptions.lean_head`` 'auto': lean-head programs from this vocabulary size on (LLaDA:
# 126,464), where a block's [B, Lb, V] float32 logits are what a step's memory is made of
LEAN_HEAD_MIN_VOCAB = 32768


def lean_head_on(mode: str, vocab: int) -> bool:
    """``EngineOptions.lean_head`` ('auto', 'on' or 'off') for a model of ``vocab`` tokens: whether
    its ``programs.lean_head`` is set (docs/sampling.md, "The lean head")."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"lean_head={mode!r} must be 'auto', 'on' or 'off'")
    return vocab >= LEAN_HEAD_MIN_VOCAB if mode == "auto" else mode == "on"


def prompt_chars_bound(model: ServedModel) -> int:
    """The default character bound of a prompt: the context times the longest vocabulary entry
    (a token never covers more characters than its own string, so no prompt that fits the
    context in tokens is refused; byte-level entries count bytes, at least their characters)."""
    tok = model.tokenizer
    vocab = tok.get_vocab() if tok is not None and hasattr(tok, "get_vocab") else None
    longest = max((len(t) for t in vocab), default=1) if vocab else 64  # (64: no vocabulary to read)
    return model.max_length * max(longest, 1)


class State(enum.Enum):
    LOADING = "loading"
    WARMING_UP = "warming_up"
    READY = "ready"
    DEAD = "dead"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the HTTP layer may know about the served model."""

    names: tuple[str, ...]
    family: str
    tokenizer: object
    max_length: int
    vocab: int
    mask_token_id: int
    stop_token_ids: tuple[int, ...]
    source: str
    demo: bool
    mesh: dict
    created: int
    max_prompt_chars: int = 2**62   # a longer prompt is refused before it is tokenized (413)
    max_gen_length: int = 2**62     # the canvas cap (max_tokens, block_length, gen_length)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Batching knobs (see ``serve.engine.policy``, which decides with them, and ``serve.engine.scheduler``)."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_sessions: int = 4
    batch_buckets: tuple[int, ...] | None = None    # default: powers of two up to max_batch_size
    demand_window_s: float = 2.0                    # new batches are sized for the recent peak demand
    prompt_buckets: tuple[int, ...] | None = None   # default: the sampler's
    warmup: tuple[tuple[int, int, int], ...] = ()   # (batch, prompt_len, gen_length), family defaults
    max_score_tokens: int = 4096                    # scored positions (L - 1 per prompt) per request
    heartbeat_s: float | None = None                # multi-host: a noop command when idle this long
    background_compile: bool = True                 # single host; multi-host compiles inline (in order)
    max_programs: int | None = 64                   # compiled programs kept (LRU); None: unbounded
    share_forwards: bool = True                     # twins share a block-start forward (Programs.share_forwards)
    lean_head: str = "auto"                         # lean-head programs (no [B, Lb, V] logits) for the
                                                    # requests that allow them: 'on', 'off', 'auto' (on
                                                    # from LEAN_HEAD_MIN_VOCAB tokens); ``lean_head_on``
    allow_weight_updates: bool = False              # POST /update_weights_from_disk
    steps_per_call: int = STEPS_PER_CALL            # denoising steps per device call (fewer once a row finishes)
    refill_wait_ms: float = 20.0                    # after rows leave, wait this long for returning clients
    call_budget_ms: float = 0.0                     # a call runs several steps, up to this long, when no request
                                                    # waits or is expected back (0: steps_per_call always)
    max_steps_per_call: int = 32                    # ... and at most this many
    # request limits (docs/api.md "Limits"): bounded before any expensive work
    max_body_bytes: int = 4 * 2**20                 # request body (413; Content-Length or as read)
    max_prompt_chars: int | None = None             # characters of a prompt / messages before tokenizing
                                                    # (413); None: context x the longest vocabulary entry
    max_gen_length: int | None = None               # canvas cap: max_tokens, block_length, gen_length (400)
    max_stop_chars: int = 256                       # characters of one stop string (400)
    weights_root: str | None = None                 # update_weights_from_disk paths must lie inside it (400)

    def batch_bucket_list(self) -> tuple[int, ...]:
        if self.batch_buckets:
            return tuple(sorted(self.batch_buckets))
        out, b = [], 1
        while b < self.max_batch_size:
            out.append(b)
            b *= 2
        return tuple(out + [self.max_batch_size])


@dataclasses.dataclass(eq=False)
class WeightedSeq(Seq):
    """A sequence with the weights version it runs on (its request's lease on them)."""

    weights: Weights | None = None


@dataclasses.dataclass(eq=False)
class WeightedScoreJob(ScoreJob):
    """A scoring job with the weights version it runs on."""

    weights: Weights | None = None
