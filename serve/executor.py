"""The device-facing half of the scheduler: every ``DecodeSession`` call goes through here.

The scheduler decides *what* runs; this class is the only code that touches sessions, as a
sequence of small commands (open, admit, step, release, close, warmup, score). That makes
multi-host serving a matter of replaying the same sequence: on process 0 each command is
broadcast to the other processes before it runs (``serve.multihost``), and followers call
``apply`` with what they receive, so all processes enter the same jitted programs and
collectives in the same order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from dllm_jax.sampling import DecodeSession, ProgramKey, Row, SamplingParams, SlotUpdate


@dataclasses.dataclass(frozen=True)
class Command:
    """One device-facing action.

    Attributes:
      op: 'open' | 'admit' | 'step' | 'release' | 'close' | 'warmup' | 'score' | 'noop' | 'shutdown'.
      sid: session id (assigned by process 0).
      key: the session's ProgramKey ('open', 'warmup').
      rows: {slot: (prompt ids, resolved SamplingParams)} ('admit').
      slot: the slot ('release').
      sequences, top_k: what to score ('score': ``Model.score(sequences, top_k=top_k)``).
    """

    op: str
    sid: int = -1
    key: ProgramKey | None = None
    rows: dict[int, tuple[list[int], SamplingParams]] | None = None
    slot: int = -1
    sequences: list[list[int]] | None = None
    top_k: int = 0


class Executor:
    """Runs Commands against the model's sessions (one thread only, like the sessions)."""

    def __init__(self, model, broadcast: Callable[[Command], None] | None = None):
        self.model = model
        self.broadcast = broadcast
        self.sessions: dict[int, DecodeSession] = {}
        self._next_sid = 0

    # ---- the scheduler's verbs (process 0) ------------------------------------------------

    def open(self, key: ProgramKey) -> int:
        sid = self._next_sid
        self._next_sid += 1
        self.run(Command("open", sid, key=key))
        return sid

    def admit(self, sid: int, rows: dict[int, tuple[list[int], SamplingParams]]) -> None:
        self.run(Command("admit", sid, rows=rows))

    def step(self, sid: int) -> list[SlotUpdate]:
        return self.run(Command("step", sid))

    def release(self, sid: int, slot: int) -> None:
        self.run(Command("release", sid, slot=slot))

    def close(self, sid: int) -> None:
        self.run(Command("close", sid))

    def warmup(self, key: ProgramKey) -> None:
        self.run(Command("warmup", key=key))

    def score(self, sequences: list[list[int]], top_k: int) -> list:
        """Chain-rule scores (``Model.score``): one ScoreOutput per sequence."""
        return self.run(Command("score", sequences=[list(map(int, q)) for q in sequences], top_k=top_k))

    def noop(self) -> None:
        self.run(Command("noop"))

    def shutdown(self) -> None:
        self.run(Command("shutdown"))

    def run(self, cmd: Command) -> Any:
        if self.broadcast is not None:
            self.broadcast(cmd)
        return self.apply(cmd)

    # ---- every process --------------------------------------------------------------------

    def apply(self, cmd: Command) -> Any:
        op = cmd.op
        if op == "open":
            self.sessions[cmd.sid] = DecodeSession(self.model, cmd.key)
        elif op == "admit":
            self.sessions[cmd.sid].admit({slot: Row(list(prompt), params)
                                          for slot, (prompt, params) in cmd.rows.items()})
        elif op == "step":
            return self.sessions[cmd.sid].step()
        elif op == "release":
            self.sessions[cmd.sid].release(cmd.slot)
        elif op == "close":
            self.sessions.pop(cmd.sid, None)
        elif op == "warmup":
            DecodeSession(self.model, cmd.key).warmup()
        elif op == "score":
            return self.model.score(cmd.sequences, top_k=cmd.top_k)
        elif op in ("noop", "shutdown"):
            pass
        else:
            raise ValueError(f"unknown command {op!r}")
        return None
