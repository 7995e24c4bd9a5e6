"""The device-facing half of the scheduler: every ``DecodeSession`` call goes through here.

The scheduler decides *what* runs; this class is the only code that touches sessions, as a
sequence of small commands (open, admit, step, release, close, warmup, score). That makes
multi-host serving a matter of replaying the same sequence: on process 0 each command is
broadcast to the other processes before it runs (``serve.engine.multihost``), and followers call
``apply`` with what they receive, so all processes enter the same jitted programs and
collectives in the same order.

Weights (``serve.engine.weights``): the executor keeps every resident weights *version* as a Model
sharing the compiled programs (``Model.with_params``); a session runs on the version it was
opened with until it closes, a score on the one it names. Installing a new version (single
host: ``install`` of what ``read_weights`` read off the scheduler thread; multi-host: the
broadcast ``load_weights``, which every process reads and which they install only if all
read it) changes what new sessions get; ``retire`` frees a version nobody uses any more.
An in-process pytree (``stage_params``, single host) installs through the same ``install``.

Device memory (SGLang's release / resume_memory_occupation): ``offload`` copies every resident
version's parameters to host memory (numpy: each distinct shard this process holds, once) and
frees their device buffers; the versions' models hold abstract arrays (shape, dtype, sharding)
meanwhile, so anything that would run on them fails loudly. ``reload`` puts the same bytes back
onto the same shardings: the compiled programs run on them without a recompile. Both are
broadcast commands (every process moves its own shards).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np

from dllm_jax.sampling import DecodeSession, ProgramKey, Row, SamplingParams, SlotUpdate
from serve.engine import weight_reading
from serve.engine.errors import WeightUpdateFailed
from serve.engine.host_copy import HostCopy


@dataclasses.dataclass(frozen=True)
class Command:
    """One device-facing action.

    Attributes:
      op: 'open' | 'admit' | 'step' | 'release' | 'rebucket' | 'close' | 'warmup' | 'score' | 'load_weights' |
        'retire' | 'offload' | 'reload' | 'noop' | 'shutdown'.
      sid: session id (assigned by process 0).
      key: the session's ProgramKey ('open', 'warmup'; 'rebucket': the one it moves to).
      rows: {slot: (prompt ids, resolved SamplingParams)} ('admit').
      slot: the slot ('release').
      sequences, top_k: what to score ('score': ``Model.score(sequences, top_k=top_k)``).
      version: the weights version to run on ('open', 'score'), to load ('load_weights') or to
        free ('retire').
      path: the checkpoint directory ('load_weights').
      steps: the session's denoising steps per call ('open'; None: the library default), or this
        call's ('step'; None: the session's).
    """

    op: str
    sid: int = -1
    key: ProgramKey | None = None
    rows: dict[int, tuple[list[int], SamplingParams]] | None = None
    slot: int = -1
    sequences: list[list[int]] | None = None
    top_k: int = 0
    version: int = 0
    path: str | None = None
    steps: int | None = None


class ServedModel(Protocol):
    """What the engine and the scheduler read from the model (a ``dllm_jax.Model``; the
    ``Executor`` needs all of it). Test doubles declare these fields."""

    family: str
    tokenizer: Any
    max_length: int
    spec: Any                    # its ModelSpec (``vocab``)
    mask_token_id: int
    stop_token_ids: Sequence[int]
    source: Any
    mesh: Any                    # a jax Mesh; ``shape["data"]`` rounds batch sizes
    programs: Any                # its compiled-program cache (``Programs``); None: none to manage


class Device(Protocol):
    """What the engine and the scheduler call on an executor (``Executor``; a test double
    declares the same)."""

    steps_per_call: int | None
    weights_root: str | None

    def open(self, key: ProgramKey, version: int = 0) -> int: ...
    def admit(self, sid: int, rows: dict[int, tuple[list[int], SamplingParams]]) -> dict[int, Exception]: ...
    def step(self, sid: int, steps: int | None = None) -> list[SlotUpdate]: ...
    def release(self, sid: int, slot: int) -> None: ...
    def rebucket(self, sid: int, key: ProgramKey) -> None: ...
    def last_work(self, sid: int) -> tuple[int, int]: ...
    def close(self, sid: int) -> None: ...
    def warmup(self, key: ProgramKey) -> None: ...
    def score(self, sequences: list[list[int]], top_k: int, version: int = 0) -> list: ...
    def noop(self) -> None: ...
    def shutdown(self) -> None: ...


class Executor:
    """Runs Commands against the model's sessions (one thread only, like the sessions)."""

    def __init__(self, model, broadcast: Callable[[Command], None] | None = None):
        self.model = model
        self.broadcast = broadcast
        self.sessions: dict[int, DecodeSession] = {}
        self._next_sid = 0
        # weights version -> the model on it (never ``model`` itself, whose params follow the newest)
        self.versions: dict[int, Any] = {0: model.with_params(model.params)}
        self.version = 0
        self._borrowed: dict[int, frozenset] = {}  # version -> ids of its leaves the caller owns (update_params)
        self._host: dict[int, tuple[Any, list[HostCopy]]] | None = None  # offloaded: version -> (treedef, leaves)
        self.steps_per_call: int | None = None  # sessions' step budget per call (None: the library default)
        self.weights_root: str | None = None  # update paths must lie inside it (--weights-root; None: anywhere)

    # ---- the scheduler's verbs (process 0) ------------------------------------------------

    def open(self, key: ProgramKey, version: int = 0) -> int:
        sid = self._next_sid
        self._next_sid += 1
        self.run(Command("open", sid, key=key, version=version, steps=self.steps_per_call))
        return sid

    def admit(self, sid: int, rows: dict[int, tuple[list[int], SamplingParams]]) -> dict[int, Exception]:
        """Admit rows; returns {slot: error} for the rows left out (their slots stay free).

        A row fails alone when its own values cannot be laid out (``DecodeSession.admit`` with
        ``isolate``); anything else raises for the whole command. Multi-host: the rule is a pure
        function of the broadcast command (host-side layout of each row, no collective), so
        every process leaves out the same rows and runs the same merge; process 0's answer
        is what the scheduler acts on.
        """
        return self.run(Command("admit", sid, rows=rows))

    def step(self, sid: int, steps: int | None = None) -> list[SlotUpdate]:
        """One decode call of a session: ``steps`` denoising steps (None: its ``steps_per_call``;
        fewer once a row finishes)."""
        return self.run(Command("step", sid, steps=steps))

    def release(self, sid: int, slot: int) -> None:
        self.run(Command("release", sid, slot=slot))

    def rebucket(self, sid: int, key: ProgramKey) -> None:
        """Move a session's rows to ``key``: its key at another prompt bucket (``DecodeSession.rebucket``)."""
        self.run(Command("rebucket", sid, key=key))

    def last_work(self, sid: int) -> tuple[int, int]:
        """(denoising steps, batch forward passes) the session's last ``step`` ran (process 0's
        copy; (1, 0) when unknown)."""
        session = self.sessions.get(sid)
        return (session.last_steps, session.last_forwards) if session is not None else (1, 0)

    def close(self, sid: int) -> None:
        self.run(Command("close", sid))

    def warmup(self, key: ProgramKey) -> None:
        self.run(Command("warmup", key=key))

    def score(self, sequences: list[list[int]], top_k: int, version: int = 0) -> list:
        """Chain-rule scores (``Model.score``) on a weights version: one ScoreOutput per sequence."""
        return self.run(Command("score", sequences=[list(map(int, q)) for q in sequences], top_k=top_k,
                                version=version))

    def read_weights(self, path: str) -> "weight_reading.Staged":
        """Single host, any thread: read a checkpoint for this model (nothing is installed)."""
        return weight_reading.read(self.model, path, root=self.weights_root)

    def stage_params(self, params) -> "weight_reading.Staged":
        """Single host, any thread: a pytree of this model's parameters made ready to install
        (``weight_reading.stage``: cast / placed onto the running dtype and shardings where it differs)."""
        return weight_reading.stage(self.model, params)

    def install(self, version: int, staged: "weight_reading.Staged") -> None:
        """Single host, the scheduler thread: sessions opened from now on run on ``staged``."""
        assert self.broadcast is None, "multi-host servers load with load_weights (every process)"
        self._install(version, staged.params)
        if staged.borrowed:
            self._borrowed[version] = staged.borrowed

    def load_weights(self, path: str, version: int) -> "weight_reading.Staged":
        """Every process reads ``path``; all install it as ``version``, or (any failed) none does."""
        return self.run(Command("load_weights", version=version, path=path))

    def retire(self, version: int) -> None:
        """Free a weights version no session, queued sequence or request refers to any more."""
        self.run(Command("retire", version=version))

    def offload(self) -> dict:
        """Every resident weights version's parameters to host memory, their device buffers freed
        (those the engine owns; a caller's own arrays from update_params are only let go). Nothing
        may run until ``reload``. Returns {'params_bytes' (host copy), 'versions'}; a no-op when
        already offloaded."""
        return self.run(Command("offload"))

    def reload(self) -> dict:
        """The offloaded parameters back onto their shardings, bitwise as they were (the compiled
        programs are reused). Returns {'params_bytes', 'versions'}; a no-op unless offloaded."""
        return self.run(Command("reload"))

    @property
    def offloaded(self) -> bool:
        return self._host is not None

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
            self.sessions[cmd.sid] = DecodeSession(self.versions[cmd.version], cmd.key,
                                                   **({"steps_per_call": cmd.steps} if cmd.steps else {}))
        elif op == "admit":
            return self.sessions[cmd.sid].admit({slot: Row(list(prompt), params)
                                                 for slot, (prompt, params) in cmd.rows.items()}, isolate=True)
        elif op == "step":
            return self.sessions[cmd.sid].step(cmd.steps)
        elif op == "release":
            self.sessions[cmd.sid].release(cmd.slot)
        elif op == "rebucket":
            self.sessions[cmd.sid].rebucket(cmd.key.prompt_len)
        elif op == "close":
            self.sessions.pop(cmd.sid, None)
        elif op == "warmup":
            DecodeSession(self.model, cmd.key).warmup()
        elif op == "score":
            return self.versions[cmd.version].score(cmd.sequences, top_k=cmd.top_k)
        elif op == "load_weights":
            return self._load_everywhere(cmd.path, cmd.version)
        elif op == "retire":
            self._retire(cmd.version)
        elif op == "offload":
            return self._offload()
        elif op == "reload":
            return self._reload()
        elif op in ("noop", "shutdown"):
            pass
        else:
            raise ValueError(f"unknown command {op!r}")
        return None

    # ---- weights versions -----------------------------------------------------------------

    def _install(self, version: int, params) -> None:
        model = self.model.with_params(params)  # (raises, naming the parameter, if it does not fit)
        self.versions[version] = model
        self.model.params = model.params  # warm-up compiles and new program builds see the newest
        self.version = version

    def _retire(self, version: int) -> None:
        if version == self.version:  # (the newest is never retired)
            return
        old = self.versions.pop(version, None)
        borrowed = self._borrowed.pop(version, frozenset())
        if self._host is not None:
            self._host.pop(version, None)
        if old is None:
            return
        keep = {id(x) for m in self.versions.values() for x in jax.tree.leaves(m.params)} | borrowed
        for x in jax.tree.leaves(old.params):  # free the device memory now, not at some later GC
            if id(x) not in keep and isinstance(x, jax.Array) and not x.is_deleted():
                x.delete()

    def _offload(self) -> dict:
        if self._host is not None:
            return {"params_bytes": 0, "versions": 0}
        copies: dict[int, HostCopy] = {}  # id(device array) -> its host copy (versions share leaves)
        host = {}
        for version, model in self.versions.items():
            leaves, treedef = jax.tree.flatten(model.params)
            for x in leaves:
                if id(x) not in copies:
                    copies[id(x)] = HostCopy.of(x)
            host[version] = (treedef, [copies[id(x)] for x in leaves])
        # every copy made: only now let the device arrays go
        borrowed = frozenset().union(*self._borrowed.values())
        old = [x for m in self.versions.values() for x in jax.tree.leaves(m.params)]
        for version, (treedef, leaves) in host.items():
            self.versions[version].params = jax.tree.unflatten(treedef, [h.abstract() for h in leaves])
        self.model.params = self.versions[self.version].params
        self._host, self._borrowed = host, {}
        for x in old:
            if id(x) not in borrowed and not x.is_deleted():
                x.delete()
        return {"params_bytes": sum(h.nbytes for h in copies.values()), "versions": len(host)}

    def _reload(self) -> dict:
        if self._host is None:
            return {"params_bytes": 0, "versions": 0}
        unique = {id(h): h for _, leaves in self._host.values() for h in leaves}  # (versions share leaves)
        arrays = {i: h.to_device() for i, h in unique.items()}  # shared leaves stay shared
        jax.block_until_ready(list(arrays.values()))
        for version, (treedef, leaves) in self._host.items():
            self.versions[version].params = jax.tree.unflatten(treedef, [arrays[id(h)] for h in leaves])
        self.model.params = self.versions[self.version].params
        versions, self._host = len(self._host), None
        return {"params_bytes": sum(h.nbytes for h in unique.values()), "versions": versions}

    def _load_everywhere(self, path: str, version: int) -> "weight_reading.Staged":
        staged, error = None, None
        try:
            staged = weight_reading.read(self.model, path, root=self.weights_root)
        except Exception as e:  # noqa: BLE001 - every process must reach the agreement below
            error = e
        ok = _all_processes(error is None)
        if error is not None:
            raise error
        if not all(ok):
            failed = [i for i, good in enumerate(ok) if not good]
            raise WeightUpdateFailed(path, f"process(es) {failed} could not read it (see their logs; is the path "
                                           "visible on every host?); no process installed it", bad_checkpoint=False)
        self._install(version, staged.params)
        return staged


def _all_processes(ok: bool) -> list[bool]:
    """Every process's ``ok`` (a collective: all processes call it in the same command)."""
    if jax.process_count() == 1:
        return [ok]
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([int(ok)], np.int32))
    return [bool(f) for f in np.asarray(flags).reshape(-1)]
