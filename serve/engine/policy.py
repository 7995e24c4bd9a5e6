"""The batching policy: pure decisions over plain data, applied by ``serve.engine.scheduler``.

Between two device calls the scheduler asks, and this module answers:

1. *joining* (``Policy.join_running``): waiting sequences (FIFO) are admitted into free slots
   of running sessions of their *group* (requests whose ProgramKeys are equal up to batch size
   and prompt bucket share a compiled program; a shorter prompt may join a session of a longer
   prompt bucket: it is left-padded, which does not change its output) and weights version
   (given ``ready``, also a longer one, into a session whose program at its bucket is compiled,
   which moves up first; the scheduler asks only whether it is compiled already, never starting
   a compile for it: waiting on one split batches on a loaded host, docs/performance.md). A
   session runs at its rows' own longest bucket: once its
   long prompts leave, it moves down (``Policy.fit``; ``DecodeSession.rebucket``).
   When the session limit blocks the oldest waiting sequence, later arrivals stop joining
   running sessions, so those drain and the blocked group gets its turn (FIFO fairness, no
   starvation);
2. *opening* (``Policy.open_rows``): a group with no room opens a new session once it is
   *full* (``max_batch_size``, or the group's recent peak demand, so a lone request on a quiet
   server starts at once) or its oldest request has waited ``max_wait_ms``, as long as fewer
   than ``max_sessions`` sessions run; the session is sized for that demand (``batch_for``);
3. *draining* (``Policy.draining``): a session smaller than another of its group, or (at the
   session limit) smaller than its group's recent peak demand, admits no more rows: rows join
   at every step, so without this a batch-1 session opened on a quiet server would be refilled
   forever beside the bigger batch its group needs;
4. *keeping an empty session* (``Policy.keep_empty``, ``Policy.close_idle``) open while its
   group's recent demand says the clients are coming back;
5. *the refill wait* (``Policy.refill``): when rows left and the group's recent demand says
   their clients will be back, the next call waits until as many requests arrived, for at
   most ``refill_wait_ms``;
6. *steps per call* (``Policy.call_steps``): ``steps_per_call``, or (``call_budget_ms`` > 0, off
   by default), when nothing waits and no client is expected back, as many steps as fit in it (a call still ends at the
   step a row finishes, so nothing that could join is held back by it).

The demand (``track_demand``) is the peak number of sequences per group (running + waiting)
over the last ``demand_window_s``: clients in a closed loop send their next request right after
a batch ends, and a batch sized for the first arrival alone would leave the others for yet
another batch.

The inputs are plain: ``SessionView`` (a running session), ``Waiting`` (a queued sequence), the
demand table and ``now`` (monotonic seconds, passed in: nothing here reads a clock). The one
question asked outside is ``ready(key)``: is a program of that size compiled
(``serve.engine.compiler.Compiler.ready``, which starts its compile when it is not).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

from dllm_jax.sampling import ProgramKey, batch_bucket

Demand = dict[ProgramKey, tuple[int, float]]  # group -> (peak sequences, since when)
Ready = Callable[[ProgramKey], bool]  # is this program compiled (else its compile starts)


@dataclasses.dataclass(frozen=True)
class SessionView:
    """A running session as the policy sees it."""

    sid: int
    key: ProgramKey      # its compiled program (``key.batch`` slots)
    group: ProgramKey    # the key with batch and prompt_len zeroed
    rows: int            # occupied slots
    weights: object = None  # its weights version (compared by identity; None: the only one)

    @property
    def batch(self) -> int:
        return self.key.batch


@dataclasses.dataclass(frozen=True)
class Waiting:
    """A queued sequence as the policy sees it."""

    group: ProgramKey
    need: int            # its own prompt bucket
    weights: object = None
    arrival: float = 0.0  # when it was queued (monotonic)


@dataclasses.dataclass(frozen=True)
class Policy:
    """The batching knobs (``serve.engine.engine_types.EngineOptions``) and the decisions made with them."""

    max_batch_size: int
    max_sessions: int
    max_wait_s: float
    demand_window_s: float
    refill_wait_s: float
    batch_buckets: tuple[int, ...]
    data: int = 1  # the mesh's data axis: a batch is a multiple of it
    steps_per_call: int | None = None  # None: the library's default (1)
    call_budget_s: float = 0.0
    max_steps_per_call: int = 1

    @classmethod
    def of(cls, options, data: int = 1) -> Policy:
        """From ``EngineOptions`` (and the model's data axis)."""
        return cls(options.max_batch_size, options.max_sessions, options.max_wait_ms / 1e3,
                   options.demand_window_s, options.refill_wait_ms / 1e3, options.batch_bucket_list(), data,
                   options.steps_per_call, options.call_budget_ms / 1e3, options.max_steps_per_call)

    def batch_for(self, rows: int) -> int:
        """The compiled batch size that holds ``rows`` (as ``program_key`` rounds it)."""
        return batch_bucket(rows, self.data, self.batch_buckets)

    # ---- demand -------------------------------------------------------------------------------

    def track_demand(self, demand: Demand, sessions: Iterable[SessionView], waiting: Iterable[ProgramKey],
                     now: float) -> Demand:
        """The demand table updated with the sequences running and waiting (their groups) now:
        a group's peak rises at once, falls once it is older than the window, and is forgotten
        after ten windows."""
        current: dict[ProgramKey, int] = {}
        for s in sessions:
            current[s.group] = current.get(s.group, 0) + s.rows
        for group in waiting:
            current[group] = current.get(group, 0) + 1
        out = dict(demand)
        window = self.demand_window_s
        for group, n in current.items():
            peak, since = out.get(group, (0, 0.0))
            if n >= peak or now - since > window:
                out[group] = (n, now)
        for group in [g for g, (_, since) in out.items() if now - since > 10 * window]:
            del out[group]
        return out

    def recent_peak(self, demand: Demand, group: ProgramKey, now: float) -> int:
        """The group's peak demand, 0 once it is older than ``demand_window_s``."""
        peak, since = demand.get(group, (0, 0.0))
        return 0 if now - since > self.demand_window_s else peak

    @staticmethod
    def running(sessions: Iterable[SessionView], group: ProgramKey) -> int:
        """Rows the group runs."""
        return sum(s.rows for s in sessions if s.group == group)

    # ---- the decisions ------------------------------------------------------------------------

    def join_running(self, waiting: Sequence[Waiting], sessions: Sequence[SessionView],
                     draining: set[int], ready: Ready | None = None) -> list[int | None]:
        """For each waiting sequence (FIFO), the session it joins (a free slot of the first
        session of its group and weights version with a long enough prompt bucket; else of the
        first whose program at the sequence's bucket is compiled, ``ready``: that session grows
        to it), or None. Once one finds no room while ``max_sessions`` run, later ones join none
        (they would keep the sessions the blocked one waits for busy)."""
        free = {s.sid: 0 if s.sid in draining else s.batch - s.rows for s in sessions}
        bucket = {s.sid: s.key.prompt_len for s in sessions}  # (grown by the joins so far)
        barrier, out = False, []
        for w in waiting:
            target = None
            if not barrier:
                mine = [s for s in sessions if s.group == w.group and free[s.sid] and s.weights is w.weights]
                target = next((s.sid for s in mine if bucket[s.sid] >= w.need), None)
                if target is None and ready is not None:
                    target = next((s.sid for s in mine
                                   if ready(dataclasses.replace(s.key, prompt_len=w.need))), None)
            if target is None:
                barrier = barrier or len(sessions) >= self.max_sessions
            else:
                free[target] -= 1
                bucket[target] = max(bucket[target], w.need)
            out.append(target)
        return out

    @staticmethod
    def fit(key: ProgramKey, needs: Iterable[int], ready: Ready) -> ProgramKey | None:
        """The key a session of ``key`` should move to before its next call: the longest prompt
        bucket of its rows (``needs``), when that differs and its program is compiled (else its
        compile starts and the rows run at ``key`` meanwhile); None: stay."""
        need = max(needs, default=key.prompt_len)
        if need == key.prompt_len:
            return None
        fitted = dataclasses.replace(key, prompt_len=need)
        return fitted if ready(fitted) else None

    def open_rows(self, demand: Demand, group: ProgramKey, waiting: int, oldest: float, now: float) -> int | None:
        """Rows to size a new session of ``group`` for (``waiting`` sequences, the oldest arrived
        at ``oldest``), or None: wait for more. It opens once the group is *full* (its recent
        peak demand, 1 when quiet, at most ``max_batch_size``) or the oldest waited ``max_wait_ms``."""
        full = min(self.max_batch_size, max(1, demand.get(group, (0, 0.0))[0]))
        if waiting < full and now - oldest < self.max_wait_s:
            return None
        return max(min(waiting, self.max_batch_size), full)

    def openings(self, waiting: Sequence[Waiting], joins: Sequence[int | None], demand: Demand,
                 now: float) -> list[tuple[ProgramKey, object, list[int], int]]:
        """The new sessions to open for the waiting sequences that join none (``joins``, as
        ``join_running`` answered): one per group and weights version, in the order of their
        first arrivals, each as (group, weights, the indices into ``waiting`` of its at most
        ``max_batch_size`` sequences, the rows to size it for: ``open_rows``); groups not ready
        yet are left out. The caller opens them in order while fewer than ``max_sessions`` run."""
        groups: dict[tuple[ProgramKey, object], list[int]] = {}
        for i, (w, joined) in enumerate(zip(waiting, joins)):
            if joined is None:
                groups.setdefault((w.group, w.weights), []).append(i)
        out = []
        for (group, weights), picks in groups.items():
            rows = self.open_rows(demand, group, len(picks), waiting[picks[0]].arrival, now)
            if rows is not None:
                out.append((group, weights, picks[:self.max_batch_size], rows))
        return out

    def draining(self, sessions: Sequence[SessionView], demand: Demand, ready: Ready) -> set[int]:
        """Sessions that admit no more rows, so they empty and close: a session smaller than another
        of its group (the round robin would give its few rows as many steps as the bigger batch),
        or smaller than its group's recent peak demand when a program of that size is compiled and
        the group runs several sessions or ``max_sessions`` are running (a session refilled at
        every step would otherwise never end, and its group never get one batch of its size)."""
        groups: dict[tuple[ProgramKey, object], list[SessionView]] = {}
        for s in sessions:
            groups.setdefault((s.group, s.weights), []).append(s)
        at_cap = len(sessions) >= self.max_sessions
        out = set()
        for (group, _), members in groups.items():
            biggest = max(s.batch for s in members)
            want = min(self.max_batch_size, demand.get(group, (0, 0.0))[0])
            for s in members:
                if s.batch < biggest:
                    out.add(s.sid)
                elif (at_cap or len(members) > 1) and s.batch < want:
                    bigger = dataclasses.replace(s.key, batch=self.batch_for(want))
                    if bigger.batch > s.batch and ready(bigger):
                        out.add(s.sid)
        return out

    def keep_empty(self, session: SessionView, sessions: Sequence[SessionView], demand: Demand, now: float,
                   ready: Ready) -> bool:
        """Keep ``session`` open while it is empty: it has the batch size its group's recent demand
        asks for, that demand exceeds the rows the group runs (closed-loop clients are about to
        send their next requests) and it is not draining.
        Closing it would make the next arrival open a fresh batch, and at every lull the group
        would thrash between sessions instead of refilling one."""
        peak = self.recent_peak(demand, session.group, now)
        if not peak or session.sid in self.draining(sessions, demand, ready):
            return False
        if session.batch != self.batch_for(min(self.max_batch_size, peak)):
            return False  # (a borrowed or outgrown program: the next arrival opens the right one)
        return peak > self.running(sessions, session.group)

    def close_idle(self, sessions: Sequence[SessionView], waiting: Iterable[ProgramKey], demand: Demand,
                   now: float, ready: Ready) -> list[int]:
        """The empty sessions to close, in order: those no longer wanted (``keep_empty``; one
        closed no longer counts for the next), or all of them when the session limit keeps
        another group's requests (``waiting``: their groups) waiting."""
        at_cap, groups = len(sessions) >= self.max_sessions, set(waiting)
        left, out = list(sessions), []
        for s in [s for s in sessions if not s.rows]:
            others = at_cap and any(group != s.group for group in groups)
            if others or not self.keep_empty(s, left, demand, now, ready):
                out.append(s.sid)
                left = [x for x in left if x.sid != s.sid]
        return out

    def wake_after(self, any_empty: bool, oldest: float | None, now: float,
                   heartbeat_s: float | None = None) -> float | None:
        """How long the idle loop may sleep (None: until something arrives): until the oldest
        waiting sequence (``oldest``: its arrival; not those waiting for a compile) waited
        ``max_wait_ms``, a demand window when an empty session is kept open (to close it once
        unwanted), a heartbeat."""
        timeouts = []
        if any_empty:
            timeouts.append(self.demand_window_s)
        if oldest is not None:
            timeouts.append(max(0.0, oldest + self.max_wait_s - now))
        if heartbeat_s:
            timeouts.append(heartbeat_s)
        return min(timeouts) if timeouts else None

    def refill(self, session: SessionView, sessions: Sequence[SessionView], demand: Demand,
               waiting: Iterable[ProgramKey], freed: int, call_s: float, now: float) -> tuple[float, int]:
        """``freed`` rows just left ``session`` (its call took ``call_s``): how long to hold the
        next device call and for how many returning requests, ``(0.0, 0)`` for not at all.

        If the group's recent demand says their clients come back (closed-loop harnesses send
        the next request as soon as a reply ends), wait up to ``refill_wait_ms`` (and a quarter
        of a call) so those requests join at the next step instead of one call later; the wait
        ends once as many sequences arrived as the demand says are coming back. Not when some
        of the group already wait (``waiting``: the groups of the waiting sequences)."""
        wait_s = min(self.refill_wait_s, 0.25 * call_s)
        if wait_s <= 0 or any(group == session.group for group in waiting):
            return 0.0, 0
        coming = min(freed, self.recent_peak(demand, session.group, now) - self.running(sessions, session.group))
        return (wait_s, coming) if coming > 0 else (0.0, 0)

    def call_steps(self, session: SessionView, sessions: Sequence[SessionView], demand: Demand, waiting: int,
                   step_s: float | None, arrivals: Sequence[float], now: float) -> int | None:
        """Denoising steps for ``session``'s next call (None: ``steps_per_call``, the executor's
        default). Several, as many as fit in ``call_budget_ms`` at ``step_s`` seconds per step
        (its recent calls), only when it alone has rows, nothing waits (``waiting`` sequences,
        any group), no burst of arrivals is on (``arrivals``: the recent arrival times; none in
        the last two budgets, and at the last second's rate fewer than a quarter of an arrival
        per budget) and its group's recent demand is all running (no client is about to come
        back): then no request is expected to join before a row finishes, which ends the call
        anyway; one that arrives all the same waits at most the budget. Fewer host round
        trips; the tokens are the same (a row's steps do not depend on where calls end)."""
        base = self.steps_per_call or 1
        if waiting or not step_s or self.call_budget_s <= 0 or sum(1 for s in sessions if s.rows) > 1:
            return None
        last_second = [t for t in arrivals if now - t < 1.0]
        if any(now - t < 2 * self.call_budget_s for t in last_second) or len(last_second) * self.call_budget_s > 0.25:
            return None
        if self.recent_peak(demand, session.group, now) > self.running(sessions, session.group):
            return None
        steps = min(self.max_steps_per_call, int(self.call_budget_s / step_s))
        return steps if steps > base else None
