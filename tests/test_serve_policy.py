"""The batching policy (``serve.engine.policy``) on plain data: no scheduler thread, no executor, no clock.

The scheduler's mechanics on a fake executor are test_serve_units'; here each decision is
called directly with the sessions, waiting sequences, demand table and ``now`` it decides on.
"""

from __future__ import annotations

import dataclasses

import pytest

from dllm_jax.sampling import program_key
from serve.engine.engine import EngineOptions
from serve.engine.policy import Policy, SessionView, Waiting
from serve.engine.defaults import default_params
from test_serve_units import fake_model

KEY = program_key(fake_model(), 10, default_params("llada", 64), 1)  # batch 1, prompt bucket 16
GROUP = dataclasses.replace(KEY, batch=0, prompt_len=0)
OTHER = dataclasses.replace(GROUP, gen_length=128)  # another group


def policy(**options) -> Policy:
    return Policy.of(EngineOptions(**options))


def session(sid, batch, rows=0, group=GROUP, weights=None, prompt_len=16) -> SessionView:
    return SessionView(sid, dataclasses.replace(KEY, batch=batch, prompt_len=prompt_len), group, rows, weights)


def always(key) -> bool:
    return True


def test_small_sessions_drain_so_their_group_gets_a_bigger_batch():
    """Rows join at every step, so a session is refilled forever unless told to drain: one smaller
    than another of its group drains; at the session limit, so does one smaller than the group's
    recent demand - once a program of the demanded size is compiled (else it keeps serving).
    (Was test_serve_units' assertions on ``Scheduler._draining``.)"""
    p = policy(max_batch_size=8, max_sessions=2)
    ready = {"yes": True}
    asked = []

    def compiled(key):
        asked.append(key.batch)
        return ready["yes"]

    demand = {}
    assert p.draining([session(0, 1), session(1, 8)], demand, compiled) == {0}  # beside a batch of 8
    demand = {GROUP: (8, 100.0)}  # at the limit of 2 sessions, demand 8
    assert p.draining([session(0, 1), session(1, 1)], demand, compiled) == {0, 1}
    assert asked == [8, 8]  # (asking starts the batch-8 compile)
    ready["yes"] = False  # the batch-8 program is not compiled yet: keep serving meanwhile
    assert p.draining([session(0, 1), session(1, 1)], demand, compiled) == set()
    ready["yes"] = True
    assert p.draining([session(0, 1)], demand, compiled) == set()  # below the limit: a batch of 8 opens instead
    p = policy(max_batch_size=16, max_sessions=4)
    demand = {GROUP: (16, 100.0)}  # two batches of 8 for 16 clients: one of 16 instead
    assert p.draining([session(0, 8), session(1, 8)], demand, compiled) == {0, 1}
    # a different weights version is a group of its own
    assert p.draining([session(0, 1, weights="old"), session(1, 8)], {}, compiled) == set()


def test_joining_is_fifo_and_stops_at_the_session_limit():
    """Waiting sequences take free slots of their group's sessions (same weights, a prompt
    bucket that holds theirs, not draining); once one finds no room while max_sessions run,
    later arrivals join none, so the running sessions drain for the blocked group."""
    p = policy(max_batch_size=8, max_sessions=2)
    a = session(0, 2, rows=1)           # one free slot
    b = session(1, 4, rows=0, weights="new")
    w = Waiting(GROUP, 16)
    assert p.join_running([w, Waiting(GROUP, 16, "new"), w], [a, b], set()) == [0, 1, None]  # a is full now
    assert p.join_running([Waiting(GROUP, 32), w], [a, b], set()) == [None, None]  # blocked at 2 sessions
    assert p.join_running([Waiting(GROUP, 32), w], [a], set()) == [None, 0]         # below the limit: joins
    assert p.join_running([w], [a], {0}) == [None]                                     # draining: no joins
    assert p.join_running([Waiting(OTHER, 16)], [a], set()) == [None]


def test_longer_prompts_join_by_growing_a_session_and_sessions_fit_their_rows():
    """A sequence whose prompt bucket exceeds a session's joins it when the session's program at
    that bucket is compiled (a session that already fits is preferred; the grown bucket counts
    for the next joins); a session moves to its rows' longest bucket once compiled."""
    p = policy(max_batch_size=8, max_sessions=2)
    small, big = session(0, 4, rows=1), session(1, 4, rows=1, prompt_len=64)
    compiled = {dataclasses.replace(KEY, batch=4, prompt_len=64)}
    ready = compiled.__contains__
    long, short = Waiting(GROUP, 64), Waiting(GROUP, 16)
    assert p.join_running([long], [small], set()) == [None]               # (no ``ready``: fits only)
    assert p.join_running([long], [small], set(), ready) == [0]           # grows to 64
    assert p.join_running([long, long], [small], set(), ready) == [0, 0]
    assert p.join_running([long], [small], set(), lambda key: False) == [None]
    assert p.join_running([long, short], [small, big], set(), ready) == [1, 0]  # one that fits first
    key64 = dataclasses.replace(KEY, batch=4, prompt_len=64)
    assert Policy.fit(key64, [16, 32], always) == dataclasses.replace(key64, prompt_len=32)
    assert Policy.fit(key64, [16, 32], lambda key: False) is None        # not compiled: stays (compile starts)
    assert Policy.fit(key64, [16, 64], always) is None and Policy.fit(key64, [], always) is None
    assert Policy.fit(dataclasses.replace(key64, prompt_len=16), [16, 64], ready) == key64


def test_several_steps_per_call_only_when_nobody_can_join():
    """A call runs as many steps as fit in call_budget_ms when its session alone has rows, nothing
    waits, no burst of arrivals is on and the group's recent demand is all running; else
    steps_per_call (None)."""
    p = policy(call_budget_ms=20.0, max_steps_per_call=8)
    a = session(0, 4, rows=2)
    running = {GROUP: (2, 100.0)}

    def steps(step_s=0.004, waiting=0, demand=running, sessions=(a,), arrivals=(100.0,), now=100.5, of=p):
        return of.call_steps(a, list(sessions), demand, waiting, step_s, arrivals, now)

    assert steps() == 5                                   # 20 ms at 4 ms per step
    assert steps(step_s=0.001) == 8                       # capped
    assert steps(step_s=0.015) is None                    # one step fits: the default
    assert steps(step_s=None) is None                     # no measurement yet
    assert steps(waiting=1) is None                       # a sequence waits
    assert steps(arrivals=(100.47,)) is None              # one arrived 30 ms ago: a burst may be on
    assert steps(arrivals=[99.6 + 0.06 * i for i in range(12)]) == 5   # 12 in the last second: 0.24 per budget
    assert steps(arrivals=[99.6 + 0.06 * i for i in range(13)]) is None  # 13: a burst, spread out
    assert steps(demand={GROUP: (3, 100.0)}) is None      # a client is coming back
    assert steps(demand={GROUP: (3, 100.0)}, now=103.0) == 5  # ... not any more (2 s window)
    assert steps(sessions=(a, session(1, 4, rows=1, group=OTHER)), demand={}) is None  # round robin
    assert steps(of=policy(call_budget_ms=0)) is None


def test_a_group_opens_when_full_or_after_max_wait_sized_for_its_demand():
    p = policy(max_batch_size=8, max_wait_ms=5)
    now = 50.0
    assert p.open_rows({}, GROUP, 1, now, now) == 1  # quiet: a lone request starts at once
    demand = {GROUP: (4, now)}
    assert p.open_rows(demand, GROUP, 2, now - 0.001, now) is None  # 2 of 4 within max_wait: wait
    assert p.open_rows(demand, GROUP, 2, now - 0.006, now) == 4     # waited: sized for the demand
    assert p.open_rows(demand, GROUP, 4, now, now) == 4              # full
    assert p.open_rows({GROUP: (30, now)}, GROUP, 20, now, now) == 8    # full at max_batch_size
    assert p.open_rows({GROUP: (30, now)}, GROUP, 5, now, now) is None
    assert p.open_rows({GROUP: (30, now)}, GROUP, 5, now - 1, now) == 8
    # one opening per (group, weights), by first arrival; those that joined are left out
    waiting = [Waiting(OTHER, 16, None, now), Waiting(GROUP, 16, None, now), Waiting(GROUP, 16, "v1", now),
               Waiting(OTHER, 16, None, now)]
    assert p.openings(waiting, [None, None, None, 3], {}, now) == \
        [(OTHER, None, [0], 1), (GROUP, None, [1], 1), (GROUP, "v1", [2], 1)]
    assert p.openings([Waiting(GROUP, 16, None, now)] * 10, [None] * 10, {GROUP: (2, now)}, now) == \
        [(GROUP, None, list(range(8)), 8)]


def test_demand_is_the_recent_peak_of_running_plus_waiting():
    p = policy(demand_window_s=2.0)
    running = [session(0, 4, rows=3), session(1, 2, rows=1, group=OTHER)]
    before = {}
    demand = p.track_demand(before, running, [GROUP], 10.0)
    assert demand == {GROUP: (4, 10.0), OTHER: (1, 10.0)} and before == {}  # (a new table)
    demand = p.track_demand(demand, [session(0, 4, rows=1)], [], 11.0)
    assert demand[GROUP] == (4, 10.0)  # the peak holds within the window...
    assert p.recent_peak(demand, GROUP, 11.5) == 4 and p.recent_peak(demand, GROUP, 12.5) == 0
    demand = p.track_demand(demand, [session(0, 4, rows=1)], [], 12.5)
    assert demand[GROUP] == (1, 12.5) and demand[OTHER] == (1, 10.0)  # ...then falls to what runs
    assert OTHER not in p.track_demand(demand, [], [], 30.1)  # forgotten after ten windows
    assert p.running(running, GROUP) == 3


def test_an_empty_session_stays_open_while_its_clients_are_coming_back():
    p = policy(max_batch_size=8, max_sessions=4)
    now = 20.0
    empty = session(0, 4)
    assert p.keep_empty(empty, [empty], {GROUP: (4, now)}, now, always)
    assert not p.keep_empty(empty, [empty], {GROUP: (4, now - 3)}, now, always)    # stale demand
    assert not p.keep_empty(empty, [empty], {GROUP: (8, now)}, now, always)        # outgrown: 8 wanted
    busy = session(1, 4, rows=4)
    assert not p.keep_empty(empty, [empty, busy], {GROUP: (4, now)}, now, always)  # the demand runs
    # at the session limit, another group's waiting request closes every empty session
    full = [empty] + [session(i, 4, rows=1, group=OTHER) for i in (1, 2, 3)]
    assert p.close_idle(full, [GROUP], {GROUP: (4, now)}, now, always) == []
    assert p.close_idle(full, [OTHER], {GROUP: (4, now)}, now, always) == [0]
    # two empty sessions for a demand of 4: one is draining (smaller), the other kept
    two = [session(0, 2), session(1, 4)]
    assert p.close_idle(two, [], {GROUP: (4, now)}, now, always) == [0]


def test_refill_waits_for_as_many_clients_as_the_demand_says_come_back():
    p = policy(refill_wait_ms=20)
    now = 5.0
    s = session(0, 4, rows=1)
    assert p.refill(s, [s], {GROUP: (4, now)}, [], 2, 1.0, now) == (0.02, 2)        # 2 of 3 missing left
    assert p.refill(s, [s], {GROUP: (4, now)}, [], 3, 0.04, now) == (0.01, 3)       # a quarter of a call
    assert p.refill(s, [s], {GROUP: (4, now)}, [GROUP], 2, 1.0, now) == (0.0, 0)    # some already wait
    assert p.refill(s, [s], {GROUP: (1, now)}, [], 2, 1.0, now) == (0.0, 0)         # nobody is coming
    assert policy(refill_wait_ms=0).refill(s, [s], {GROUP: (4, now)}, [], 2, 1.0, now) == (0.0, 0)


def test_batch_sizes_and_wake_ups():
    p = policy(max_batch_size=8)
    assert [p.batch_for(n) for n in (1, 3, 5, 8)] == [1, 4, 8, 8]
    assert [dataclasses.replace(p, data=2).batch_for(n) for n in (1, 3)] == [2, 4]  # multiples of the data axis
    assert p.wake_after(False, None, 0.0) is None
    assert p.wake_after(True, None, 0.0) == 2.0                       # close an unwanted empty session
    assert p.wake_after(True, 9.999, 10.0) == pytest.approx(0.004)    # the oldest's max_wait_ms
    assert p.wake_after(False, 1.0, 10.0, heartbeat_s=30.0) == 0.0
    assert p.wake_after(False, None, 0.0, heartbeat_s=30.0) == 30.0
