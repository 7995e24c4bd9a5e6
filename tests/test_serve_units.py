"""Server pieces without a server: text streaming, request mapping, the scheduler on a fake
executor (no compiles), error mapping, metrics.

The scheduler tests synchronise on what the fake executor or the compiler report (events set
from the scheduler thread, waited for with a timeout), never on sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import types

import numpy as np
import pytest

from dllm_jax.sampling import BATCH_BUCKETS, SlotUpdate
from serve.api.app import api_error, validation_param
from serve.api.detok import TextStream
from serve.engine.engine import Engine, EngineOptions
from serve.engine.errors import (
    ClientDisconnected,
    ContextLengthExceeded,
    EngineDead,
    EngineFailed,
    EngineNotReady,
    QueueFull,
)
from serve.engine.metrics import Metrics
from serve.api.field_policy import check_fields
from serve.api.protocol import APIError, ChatCompletionRequest, CompletionRequest
from serve.api.request_params import request_params
from serve.engine.defaults import default_params
from serve.engine.requests import SeqRequest
from serve_helpers import LLADA_MODEL, read_metrics

TIMEOUT = 30.0  # seconds any wait on the scheduler may take before the test fails


@pytest.fixture(scope="module")
def tok():
    from dllm_jax.checkpoint import load_tokenizer

    return load_tokenizer(LLADA_MODEL)


# ---- TextStream -------------------------------------------------------------------------------

def test_text_stream_never_splits_utf8(tok):
    text = "héllo 日本 🎉 ok"
    ids = tok.encode(text, add_special_tokens=False)
    ts, out = TextStream(tok), []
    for k in range(1, len(ids) + 1):
        delta = ts.update(ids[:k], done=k == len(ids))
        assert "\ufffd" not in delta
        out.append(delta)
    assert "".join(out) == text == ts.text
    assert ts.n_tokens == len(ids)


def test_text_stream_stop_strings_across_blocks(tok):
    text = "abc STOP def"
    ids = tok.encode(text, add_special_tokens=False)
    ts = TextStream(tok, stop=["STOP", "zz"])
    sent = ""
    for k in range(1, len(ids) + 1):
        sent += ts.update(ids[:k], done=False)
        assert "ST" not in sent  # the held-back tail never leaks a stop string's start
        if ts.stopped:
            break
    assert ts.stopped and sent == ts.text == "abc "
    assert 0 < ts.n_tokens < len(ids)
    assert tok.decode(ids[:ts.n_tokens]).startswith("abc ")
    assert ts.update(ids, done=True) == ""  # nothing after the stop


def test_text_stream_flushes_invalid_bytes_at_the_end(tok):
    ids = tok.encode("日", add_special_tokens=False)[:2]  # an incomplete character
    ts = TextStream(tok)
    assert ts.update(ids, done=False) == ""
    assert ts.update(ids, done=True) == "\ufffd"


# ---- request -> sampling params -----------------------------------------------------------------

def chat(**kw):
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


def test_max_tokens_maps_to_whole_blocks_and_family_defaults():
    params, max_tokens = request_params(chat(max_tokens=40), "llada", 512)
    p = params[0]
    assert max_tokens == 40 and p.gen_length == 64 and p.steps == 64 and p.block_length == 32
    assert p.algorithm == "dual_cache" and p.threshold == 0.9 and p.early_stop and p.temperature == 0
    params, max_tokens = request_params(chat(), "nemotron", 4096)
    p = params[0]
    assert max_tokens == 128 and p.gen_length == 128 and p.algorithm == "static_block" and p.factor == 1.0
    assert p.shift_logits
    # an explicit algorithm runs its own semantics: no implicit threshold
    p = request_params(chat(algorithm="basic", steps=16, max_tokens=20), "llada", 512)[0][0]
    assert p.threshold is None and p.steps == 16 and p.gen_length == 32
    # explicit null threshold = the fixed schedule with the default algorithm
    p = request_params(chat(threshold=None), "llada", 512)[0][0]
    assert p.algorithm == "dual_cache" and p.threshold is None
    assert request_params(chat(factor=2.0), "llada", 512)[0][0].factor == 2.0
    params = request_params(chat(n=3, seed=5, temperature=0.7), "llada", 512)[0]
    assert [p.seed for p in params] == [5, 6, 7] and params[0].temperature == 0.7
    assert request_params(chat(generation_algorithm="dual"), "llada", 512)[0][0].algorithm == "dual_cache"
    assert default_params("llada", 128).gen_length == 128
    # the selection policy and the logprobs distribution reach the sampler (default: low_confidence, raw)
    assert (p.remasking, p.logprobs_mode) == ("low_confidence", "raw")
    p = request_params(chat(remasking="leftmost", logprobs_mode="processed", logprobs=True), "llada", 512)[0][0]
    assert (p.remasking, p.logprobs_mode) == ("leftmost", "processed")
    # the EB-Sampler's gamma replaces the default algorithm's threshold
    p = request_params(chat(entropy_bound=0.15), "llada", 512)[0][0]
    assert (p.algorithm, p.threshold, p.entropy_bound) == ("dual_cache", None, 0.15)
    # ... and a dInfer threshold decoder's (its credit fusion, if any, stays)
    p = request_params(chat(entropy_bound=0.15, algorithm="dinfer_credit"), "llada", 512)[0][0]
    assert (p.algorithm, p.threshold, p.entropy_bound) == ("dinfer_credit", None, 0.15)
    # multi-block decoding keeps the default algorithm's threshold
    p = request_params(chat(block_add_threshold=0.25), "llada", 512)[0][0]
    assert (p.algorithm, p.threshold, p.block_add_threshold) == ("dual_cache", 0.9, 0.25)


@pytest.mark.parametrize("kw,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"algorithm": "nope"}, "algorithm"), ({"generation_algorithm": "nope"}, "generation_algorithm"),
    ({"steps": 3, "max_tokens": 64}, "steps"), ({"threshold": 0}, "threshold"), ({"remasking": "x"}, "remasking"),
    ({"temperature": 0.5, "algorithm": "static_block"}, "temperature"),
    ({"remasking": "leftmost", "algorithm": "static_block"}, "remasking"),
    ({"logprobs_mode": "sampled"}, "logprobs_mode"), ({"logprobs_mode": ""}, "logprobs_mode"),
    ({"entropy_bound": -0.1}, "entropy_bound"), ({"entropy_bound": 0.2, "threshold": 0.5}, "entropy_bound"),
    ({"entropy_bound": 0.2, "algorithm": "dinfer_hierarchy"}, "entropy_bound"),
    ({"entropy_bound": 0.2, "algorithm": "static_block"}, "entropy_bound"),
    ({"block_add_threshold": 0}, "block_add_threshold"), ({"block_add_threshold": 1.01}, "block_add_threshold"),
    ({"block_add_threshold": float("nan")}, "block_add_threshold"),
    ({"block_add_threshold": 0.5, "threshold": None}, "block_add_threshold"),
    ({"block_add_threshold": 0.5, "algorithm": "dinfer_blockwise"}, "block_add_threshold"),
    ({"block_add_threshold": 0.5, "algorithm": "static_block"}, "block_add_threshold"),
])
def test_request_params_errors_name_the_field(kw, param):
    family = "nemotron" if kw.get("algorithm") == "static_block" else "llada"
    with pytest.raises(APIError) as e:
        request_params(chat(**kw), family, 512)
    assert e.value.status == 400 and e.value.param == param


def completion(**kw):
    return CompletionRequest.model_validate({"prompt": "hi", **kw})


@pytest.mark.parametrize("kw,param", [
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 1}, "presence_penalty"), ({"repetition_penalty": 1.1}, "repetition_penalty"),
    ({"logit_bias": {"5": 1}}, "logit_bias"), ({"min_tokens": 3}, "min_tokens"),
    ({"spaces_between_special_tokens": True}, "spaces_between_special_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"tools": [{}]}, "tools"), ({"bogus": 1}, "bogus"),
    ({"n": 0}, "n"), ({"stop": ["a"] * 20}, "stop"),
    ({"algorithm": "a", "generation_algorithm": "b"}, "generation_algorithm"),
])
def test_unsupported_fields_rejected(kw, param):
    with pytest.raises(APIError) as e:
        check_fields(chat(**kw))
    assert e.value.param == param and e.value.status == 400


@pytest.mark.parametrize("kw,param", [
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"echo": True, "stream": True}, "echo"),
    ({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of"),
])
def test_completion_fields_rejected(kw, param):
    with pytest.raises(APIError) as e:
        check_fields(completion(**kw))
    assert e.value.param == param and e.value.status == 400


def test_neutral_values_and_ignored_fields_accepted():
    check_fields(chat(top_p=1, logprobs=False, presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                      user="u", metadata={"a": "b"}, store=False, tool_choice="none", top_k=-1,
                      response_format={"type": "text"}, stream_options={"include_usage": True},
                      repetition_penalty=1.0, min_tokens=0, spaces_between_special_tokens=False))
    check_fields(completion(echo=False, best_of=1, logprobs=None, logit_bias=None))


# NeMo-Skills' default request bodies (nemo_skills/inference/model/vllm.py)
NEMO_CHAT = {"max_tokens": None, "temperature": 0.0, "top_p": 0.95, "seed": 0, "stop": None, "logprobs": False,
             "top_logprobs": None, "n": 1, "frequency_penalty": 0.0, "presence_penalty": 0.0, "stream": False,
             "min_p": 0.0, "repetition_penalty": 1.0, "spaces_between_special_tokens": False}
NEMO_COMPLETION = {**{k: v for k, v in NEMO_CHAT.items() if k != "top_logprobs"}, "echo": False, "logit_bias": None,
                   "logprobs": None}


def test_nemo_skills_bodies_map_to_the_plain_request_plus_filters():
    import dataclasses as dc

    for req, plain in ((chat(**NEMO_CHAT, top_k=20), chat(seed=0)),
                       (completion(**NEMO_COMPLETION), completion(seed=0))):
        check_fields(req)
        got = request_params(req, "llada", 512, model_stops=(257,))[0][0]
        want = request_params(plain, "llada", 512, model_stops=(257,))[0][0]
        assert got.top_p == 0.95 and got.min_p == 0 and got.logprobs is None
        assert dc.replace(got, top_p=1.0, top_k=0) == want  # (and at T=0 the filters change nothing)


def test_sampling_filters_logprobs_and_stop_ids_map_to_params():
    p = request_params(chat(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05), "llada", 512)[0][0]
    assert (p.top_k, p.top_p, p.min_p, p.logprobs, p.stop_token_ids) == (5, 0.9, 0.05, None, None)
    assert request_params(chat(top_k=-1), "llada", 512)[0][0].top_k == 0
    assert request_params(chat(logprobs=True), "llada", 512)[0][0].logprobs == 0
    assert request_params(chat(logprobs=True, top_logprobs=5), "llada", 512)[0][0].logprobs == 5
    assert request_params(completion(logprobs=3), "llada", 512)[0][0].logprobs == 3
    # stop_token_ids: besides the model's; ignore_eos: only the request's own
    stops = lambda **kw: request_params(chat(**kw), "llada", 512, model_stops=(257, 258))[0][0].stop_token_ids
    assert stops(stop_token_ids=[5, 257]) == (257, 258, 5)
    assert stops(ignore_eos=True) == () and stops(ignore_eos=True, stop_token_ids=[9]) == (9,)
    with pytest.raises(APIError) as e:
        stops(stop_token_ids=list(range(10, 17)))  # 2 + 7 > 8
    assert e.value.param == "stop_token_ids"
    # max_tokens 0: only with echo; null = the default
    assert request_params(completion(max_tokens=0, echo=True), "llada", 512, allow_zero=True)[1] == 0
    with pytest.raises(APIError) as e:
        request_params(completion(max_tokens=0), "llada", 512)
    assert e.value.param == "max_tokens"
    assert request_params(chat(max_tokens=None), "llada", 512)[1] == 128


def test_text_stream_include_stop_str_and_keep_special_tokens(tok):
    ids = tok.encode("abc STOP def", add_special_tokens=False)
    ts = TextStream(tok, stop=["STOP"], include_stop=True)
    ts.update(ids, done=False)
    assert ts.stopped and ts.text == "abc STOP"
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    assert TextStream(tok).update(ids[:2] + [eos], True) == tok.decode(ids[:2])
    assert TextStream(tok, skip_special_tokens=False).update(ids[:2] + [eos], True) == \
        tok.decode(ids[:2]) + tok.eos_token


def test_token_bytes_concatenate_to_the_text(tok):
    from serve.api.logprobs import TokenText

    text = "héllo 日本 🎉 ok"
    ids = tok.encode(text, add_special_tokens=False)
    tt = TokenText(tok)
    assert b"".join(bytes(tt(t)[1]) for t in ids) == text.encode()
    assert tt(ids[1])[0] == "\ufffd"  # half of "é": the string is a replacement char, the bytes exact
    assert "".join(tt.text(t) for t in ids[:1]) == "h"


def test_validation_param_names():
    assert validation_param(("body", "messages", 0, "content", "str")) == "messages[0].content"
    assert validation_param(("body", "max_tokens")) == "max_tokens"
    assert validation_param(("body", 12)) is None


# ---- the scheduler on a fake executor ------------------------------------------------------------

class FakeExecutor:
    """Each step commits one block of token 7 in every occupied slot; rows finish at gen_length.
    (A ``serve.engine.executor.Device``.)"""

    def __init__(self, model):
        self.steps_per_call: int | None = None
        self.weights_root: str | None = None
        self.sessions: dict[int, dict] = {}
        self.log: list[tuple] = []
        self.opened: list = []
        self.next = 0
        self.fail_step = False
        self.gate = threading.Semaphore(1000)
        self.stepping = threading.Event()  # set when a step starts (before it waits for the gate)
        self.warm_gate = threading.Event()
        self.warm_gate.set()

    def open(self, key, version=0):
        sid, self.next = self.next, self.next + 1
        self.sessions[sid] = {"key": key, "rows": {}, "version": version}
        self.log.append(("open", sid, key.batch))
        self.opened.append(key)
        return sid

    def admit(self, sid, rows):
        for slot, (prompt, params) in rows.items():
            self.sessions[sid]["rows"][slot] = [params, 0]
        self.log.append(("admit", sid, sorted(rows), [len(p) for p, _ in rows.values()]))
        return {}  # (no row fails alone)

    def step(self, sid, steps=None):
        self.stepping.set()
        assert self.gate.acquire(timeout=TIMEOUT), "the test never opened the gate"
        if self.fail_step:
            raise RuntimeError("device fell over")
        s = self.sessions[sid]
        out = []
        for slot, row in sorted(s["rows"].items()):
            params = row[0]
            row[1] = min(row[1] + params.block_length, params.gen_length)
            done = row[1] == params.gen_length
            out.append(SlotUpdate(slot, np.full(row[1], 7, np.int32), done, "length" if done else None, row[1]))
        self.log.append(("step", sid, len(out)))
        return out

    def release(self, sid, slot):
        self.sessions[sid]["rows"].pop(slot)
        self.log.append(("release", sid, slot))

    def rebucket(self, sid, key):
        self.sessions[sid]["key"] = key
        self.log.append(("rebucket", sid, key.prompt_len))

    def last_work(self, sid):
        return 1, 1

    def close(self, sid):
        self.sessions.pop(sid)
        self.log.append(("close", sid))

    def warmup(self, key):
        self.warm_gate.wait(TIMEOUT)
        self.log.append(("compiled", key))

    def score(self, sequences, top_k, version=0):
        from dllm_jax.sampling import ScoreOutput

        self.log.append(("score", [len(q) for q in sequences], top_k))
        return [ScoreOutput(np.arange(len(q), dtype=np.float32) * -1, np.zeros((len(q), top_k), np.int32),
                            np.zeros((len(q), top_k), np.float32)) for q in sequences]

    def noop(self):
        pass

    def shutdown(self):
        pass


def fake_model():
    """A ``serve.engine.executor.ServedModel`` without weights, tokenizer or program cache."""
    return types.SimpleNamespace(max_length=512, mesh=types.SimpleNamespace(shape={"data": 1, "model": 1}),
                                 family="llada", tokenizer=None, spec=types.SimpleNamespace(vocab=384),
                                 mask_token_id=336, stop_token_ids=(257,), source="fake", programs=None)


@pytest.fixture
def make_engine():
    """Start engines on the fake executor (ready when returned); all are stopped after the test."""
    engines = []

    def make(**opts):
        engine = Engine(fake_model, names=["fake"], options=EngineOptions(**opts), make_executor=FakeExecutor)
        engines.append(engine)
        engine.start()
        deadline = time.monotonic() + TIMEOUT
        while not engine.health()[0]:  # loading a SimpleNamespace: a few ms
            assert engine.state.value != "dead", engine.error
            assert time.monotonic() < deadline, "the engine did not get ready"
            threading.Event().wait(0.01)
        return engine

    yield make
    for engine in engines:
        engine.stop()


async def wait_for(event: threading.Event) -> None:
    """Wait (off the event loop) for an event the scheduler thread sets."""
    assert await asyncio.to_thread(event.wait, TIMEOUT), "timed out waiting for the scheduler"


async def until(condition, what: str) -> None:
    """Poll a condition the scheduler thread makes true, with a deadline."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def cancelled(engine) -> float:
    return read_metrics(engine.metrics.render(), "fake")["dllm_requests_cancelled_total"]


def seq(prompt_len=10, gen=64, max_tokens=None):
    p = dataclasses.replace(default_params("llada", gen))
    return SeqRequest(list(range(1, prompt_len + 1)), p, max_tokens or gen)


async def collect(handle, n=1):
    done, last = set(), {}
    while len(done) < n:
        ev = await handle.next()
        last[ev.index] = ev
        if ev.done:
            done.add(ev.index)
    return last


def test_scheduler_batches_admits_at_block_boundaries_and_cuts_max_tokens(make_engine):
    engine = make_engine(max_batch_size=4, max_wait_ms=50)
    ex = engine.executor

    async def main():
        ex.gate = threading.Semaphore(0)  # hold the device until everything is queued
        with engine.inbox.cv:  # the scheduler takes both requests in one go
            first = engine.submit([seq(gen=96)] * 2)      # one request, n=2
            second = engine.submit([seq(prompt_len=40, gen=96, max_tokens=40)])
        await wait_for(ex.stepping)  # the batch is open and its first block waits for the gate
        ex.gate.release(1000)
        a = await collect(first, 2)
        b = await collect(second)
        third = engine.submit([seq(gen=96)])           # joins later: new session or free slot
        c = await collect(third)
        await until(lambda: ("release", 0, 0) in ex.log, "the first request's release")  # (after its last event)
        return a, b, c

    a, b, c = asyncio.run(main())
    assert all(len(ev.tokens) == 96 and ev.finish_reason == "length" for ev in a.values())
    # max_tokens=40 of a 96 canvas: cut at 40 and released after the 2nd block, not the 3rd
    assert len(b[0].tokens) == 40 and b[0].finish_reason == "length"
    opens = [e for e in ex.log if e[0] == "open"]
    assert opens[0] == ("open", 0, 4)  # 3 rows waiting -> one batch of bucket 4
    admit0 = next(e for e in ex.log if e[0] == "admit")
    assert admit0[2] == [0, 1, 2] and admit0[3] == [10, 10, 40]
    assert ("release", 0, 2) in ex.log and ex.log.index(("release", 0, 2)) < ex.log.index(("release", 0, 0))
    assert len(c[0].tokens) == 96


def test_a_session_runs_at_its_rows_prompt_bucket(make_engine):
    """Once its long prompt leaves, a session moves down to its other rows' prompt bucket (that
    program compiled)."""
    from dllm_jax.sampling import program_key

    engine = make_engine(max_batch_size=4, max_wait_ms=50)
    ex = engine.executor
    p = default_params("llada", 96)
    for n in (10, 40):
        engine.compiler.add(program_key(engine.model, n, p, 2, batch_buckets=(1, 2, 4, 8)))

    async def main():
        ex.gate = threading.Semaphore(0)
        with engine.inbox.cv:
            long = engine.submit([seq(prompt_len=40, gen=96, max_tokens=32)])  # leaves after one block
            short = engine.submit([seq(gen=96)])
        ex.gate.release(1000)
        await collect(long)
        out = await collect(short)
        # (the scheduler thread releases a slot after sending the row's last event)
        await until(lambda: ("release", 0, 1) in ex.log, "the short row's release")
        return out

    short = asyncio.run(main())
    assert len(short[0].tokens) == 96
    down = ex.log.index(("rebucket", 0, 16))
    admit = next(i for i, e in enumerate(ex.log) if e[0] == "admit")
    assert ex.log[admit][3] == [40, 10] and admit < down
    assert ex.log.index(("release", 0, 0)) < down < ex.log.index(("release", 0, 1))
    assert read_metrics(engine.metrics.render(), "fake")["dllm_rebuckets_total"] == 1


@pytest.mark.parametrize("compiled", [True, False])
def test_a_longer_prompt_joins_a_session_that_moves_up_to_a_compiled_bucket(make_engine, compiled):
    """A request whose prompt bucket is longer than a running session's joins its free slot by
    moving the session up, when that program is compiled; otherwise it opens its own batch (no
    compile is started for the move)."""
    from dllm_jax.sampling import program_key

    engine = make_engine(max_batch_size=2, max_wait_ms=50)
    ex = engine.executor
    p = default_params("llada", 96)
    keys = {(n, b): program_key(engine.model, n, p, b, batch_buckets=(1, 2)) for n, b in ((10, 2), (40, 2), (40, 1))}
    for n, b in ((10, 2), (40, 1)) + (((40, 2),) if compiled else ()):
        engine.compiler.add(keys[n, b])

    async def main():
        ex.gate = threading.Semaphore(0)
        with engine.inbox.cv:
            a = engine.submit([seq(gen=96)])
            b = engine.submit([seq(gen=96, max_tokens=32)])  # leaves after the first step
        ex.gate.release(1)
        for _ in range(500):
            if ("release", 0, 1) in ex.log:
                break
            await asyncio.sleep(0.01)
        long = engine.submit([seq(prompt_len=40, gen=96)])  # (seen after the step that waits now)
        ex.gate.release(1000)
        return [await collect(h) for h in (a, b, long)]

    a, b, long = asyncio.run(main())
    assert len(long[0].tokens) == 96 and len(a[0].tokens) == 96
    opens = [e for e in ex.log if e[0] == "open"]
    if compiled:
        assert opens == [("open", 0, 2)]
        up = ex.log.index(("rebucket", 0, keys[40, 2].prompt_len))
        assert ex.log[up + 1][:2] == ("admit", 0) and ex.log[up + 1][3] == [40]
    else:
        assert len(opens) == 2 and not any(e[0] == "rebucket" and e[2] > 16 for e in ex.log)
        assert engine.compiler.in_flight() == 0 or keys[40, 2] not in engine.compiler.compiled


def test_cancelled_before_admission_is_never_admitted_and_queue_limit(make_engine):
    engine = make_engine(max_batch_size=2, max_wait_ms=0, max_queue=3, max_sessions=1)
    ex = engine.executor

    async def main():
        ex.gate = threading.Semaphore(0)
        running = engine.submit([seq(gen=64)] * 2)    # fills the only session
        await wait_for(ex.stepping)                     # ... which now waits in its first block
        waiting = engine.submit([seq(prompt_len=11, gen=64)])
        with pytest.raises(QueueFull) as e:
            engine.submit([seq()] * 3)                  # 1 waiting + 3 > max_queue
        assert (e.value.waiting, e.value.limit) == (1, 3)
        err = api_error(e.value)
        assert err.status == 429 and err.headers["Retry-After"] and err.code == "queue_full"
        waiting.cancel()  # reaches the scheduler with `waiting` itself, at the block boundary
        ex.gate.release(1000)
        await collect(running, 2)
        after = engine.submit([seq(prompt_len=12, gen=64)])
        await collect(after)

    asyncio.run(main())
    admitted = [n for e in ex.log if e[0] == "admit" for n in e[3]]
    assert 11 not in admitted and 12 in admitted
    assert cancelled(engine) == 1


def test_engine_error_fails_only_that_batch_and_dead_engine_is_503(make_engine):
    engine = make_engine(max_batch_size=2, max_wait_ms=0)

    async def main():
        engine.executor.fail_step = True
        h = engine.submit([seq()])
        with pytest.raises(EngineFailed) as e:
            await collect(h)
        assert api_error(e.value).status == 500 and api_error(e.value).code == "engine_error"
        engine.executor.fail_step = False
        await collect(engine.submit([seq()]))  # the engine still serves

    asyncio.run(main())
    assert engine.health() == (True, "ready")
    engine.stop()
    assert engine.health() == (False, "dead")
    with pytest.raises(EngineNotReady) as e:
        engine.info()
    assert api_error(e.value).status == 503 and api_error(e.value).code == "dead"

    broken = Engine(lambda: 1 / 0, names=["x"])
    broken.start()
    broken._thread.join(10)
    assert broken.health() == (False, "dead") and "ZeroDivisionError" in broken.error


def test_new_programs_compile_in_background_meanwhile_a_bigger_one_is_borrowed(make_engine, monkeypatch):
    from dllm_jax.sampling import program_key

    engine = make_engine(max_batch_size=8, max_wait_ms=0)
    ex = engine.executor
    ex.warm_gate.clear()  # compiles hang until released
    # 4 slots x (32 + 64) = 384 <= 8 x the exact 1 x (16 + 64): affordable to borrow
    big = program_key(engine.model, 30, default_params("llada", 64), 4, batch_buckets=(1, 2, 4, 8))
    engine.compiler.add(big)
    declined = threading.Event()  # the scheduler found nothing to borrow for the gen-128 request
    borrow = engine.compiler.borrow

    def watched_borrow(key, rows):
        out = borrow(key, rows)
        if key.gen_length == 128 and out is None:
            declined.set()
        return out

    monkeypatch.setattr(engine.compiler, "borrow", watched_borrow)

    async def main():
        borrowed = await collect(engine.submit([seq(prompt_len=10, gen=64)]))  # B1/P16 not compiled yet
        stuck = engine.submit([seq(prompt_len=10, gen=128)])  # nothing to borrow: waits for its compile
        await wait_for(declined)
        assert all(k.gen_length == 64 for k in ex.opened)
        ex.warm_gate.set()
        await collect(stuck)
        await until(lambda: any(k.batch == 1 and k.gen_length == 64 for k in engine.compiler.compiled),
                    "the B1/P16/gen-64 compile")
        exact = await collect(engine.submit([seq(prompt_len=10, gen=64)]))
        return borrowed, exact

    borrowed, exact = asyncio.run(main())
    assert len(borrowed[0].tokens) == 64 and len(exact[0].tokens) == 64
    assert ex.opened[0] == big
    assert [(k.batch, k.prompt_len, k.gen_length) for k in ex.opened[1:]] == [(1, 16, 128), (1, 16, 64)]
    # (not the borrowed session's own prompt bucket at its batch, B4/P16: a move to a tighter bucket
    # starts a compile only when none runs or waits: Compiler.ready(only_if_idle=True))
    assert read_metrics(engine.metrics.render(), "fake")["dllm_compiles_total"] == 2


def test_submit_refuses_what_does_not_fit_as_a_413_about_max_tokens(make_engine):
    engine = make_engine()

    async def main():
        with pytest.raises(ContextLengthExceeded) as e:
            engine.submit([seq(prompt_len=400, gen=128)])  # 400 + 128 > 512
        return e.value

    err = asyncio.run(main())
    assert (err.prompt_tokens, err.gen_length, err.extra, err.context) == (400, 128, 0, 512)
    http = api_error(err)
    assert (http.status, http.param, http.code) == (413, "max_tokens", "context_length_exceeded")
    assert http.message == ("prompt (400 tokens) + max_tokens rounded up to whole blocks (128) exceeds the "
                            "model's context of 512 tokens")
    assert engine.inbox.queued == 0


@pytest.mark.parametrize("exc,status,code", [
    (EngineNotReady("warming_up"), 503, "warming_up"), (EngineDead("RuntimeError: x"), 503, "engine_dead"),
    (EngineFailed("running a block", RuntimeError("x")), 500, "engine_error"),
    (ClientDisconnected(), 499, "client_disconnected"), (KeyError("bug"), 500, "internal_error"),
])
def test_api_error_maps_engine_errors(exc, status, code):
    err = api_error(exc)
    assert (err.status, err.code) == (status, code) and err.body()["error"]["message"]
    assert api_error(err) is err


def test_app_answers_engine_errors_in_openai_shape(make_engine):
    """Through the app on the fake engine: a failed batch is a 500 engine_error, in-band when streamed."""
    import httpx

    from serve.api.app import create_app
    from serve_helpers import sse_events

    engine = make_engine(max_batch_size=2, max_wait_ms=0)
    engine.executor.fail_step = True
    body = {"prompt": [1, 2, 3], "max_tokens": 8}

    async def main():
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            plain = await client.post("/v1/completions", json=body)
            streamed = await client.post("/v1/completions", json={**body, "stream": True})
            scraped = await client.get("/metrics")
        return plain, streamed, scraped

    plain, streamed, scraped = asyncio.run(main())
    assert plain.status_code == 500 and plain.json()["error"]["code"] == "engine_error"
    events = sse_events(streamed.text.splitlines())
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_error" and events[-2]["error"]["type"] == "server_error"
    assert scraped.headers["content-type"].startswith("text/plain; version=")
    assert read_metrics(scraped.text, "fake")['dllm_http_requests_total{status="500"}'] == 1


# ---- metrics -------------------------------------------------------------------------------------

def test_metrics_render_parse():
    m = Metrics("tiny")
    before = read_metrics(m.render(), "tiny")
    assert before['dllm_requests_total{finish_reason="stop"}'] == 0
    assert before['dllm_requests_total{finish_reason="length"}'] == 0
    m.batch(3, 8, 0.02)
    m.finished("stop", 5)
    m.http_status(200)
    m.observe("queue_time_seconds", 0.003)
    text = m.render().decode()
    values = read_metrics(text, "tiny")
    assert values["dllm_batch_rows_total"] == 3 and values["dllm_batch_slots_total"] == 8
    assert values['dllm_requests_total{finish_reason="stop"}'] == 1
    assert values['dllm_http_requests_total{status="200"}'] == 1
    assert values['dllm_batch_size_bucket{le="4.0"}'] == 1 and values['dllm_batch_size_bucket{le="2.0"}'] == 0
    assert values["dllm_queue_time_seconds_count"] == 1
    # the batch-size buckets are the sampler's, and no *_created series is exposed
    assert [k for k in values if k.startswith("dllm_batch_size_bucket")] == \
        [f'dllm_batch_size_bucket{{le="{float(b)}"}}' for b in BATCH_BUCKETS] + ['dllm_batch_size_bucket{le="+Inf"}']
    assert "_created" not in text


def test_scoring_runs_on_the_scheduler_between_block_steps(make_engine):
    engine = make_engine(max_batch_size=2, max_wait_ms=0)
    ex = engine.executor

    async def main():
        ex.gate = threading.Semaphore(0)
        running = engine.submit([seq(gen=96)])
        await wait_for(ex.stepping)  # a batch is in its first block
        scored = asyncio.ensure_future(engine.score([[1, 2, 3], [4, 5]], top_k=2))
        await asyncio.sleep(0)
        ex.gate.release(1000)
        out = await scored
        await collect(running)
        return out

    out = asyncio.run(main())
    assert [len(o.token_logprobs) for o in out] == [3, 2] and out[0].top_ids.shape == (3, 2)
    ops = [e[0] for e in ex.log]
    i = ops.index("score")
    assert ex.log[i] == ("score", [3, 2], 2)
    assert "step" in ops[:i] and "step" in ops[i:]  # between two block steps of the running batch
    assert engine.inbox.queued == 0


def test_refill_wait_holds_for_every_returning_client_not_just_the_first():
    """Rows that finish in one call free several slots; the next call waits (up to its deadline)
    until as many requests came back, so all of them join at the next step, and no longer."""
    from serve.engine.requests import Inbox
    from serve.engine.scheduler import Scheduler

    inbox = Inbox(max_queue=100)
    sched = Scheduler(fake_model(), None, None, EngineOptions(), Metrics("fake"), inbox, None)

    def arrive(delays):
        def run():
            for d in delays:
                time.sleep(d)
                inbox.put([object()])
        threading.Thread(target=run, daemon=True).start()

    arrive([0.02, 0.02, 0.02])  # three clients come back one after another
    t0 = time.monotonic()
    new, cancels, stopping = sched._take_refill(t0 + 5.0, want=3)
    assert len(new) == 3 and not cancels and not stopping
    assert time.monotonic() - t0 < 4.0  # returned at the third arrival, not at the deadline

    arrive([0.01])  # only one of two comes back: the wait ends at the deadline
    t0 = time.monotonic()
    new, _, _ = sched._take_refill(t0 + 0.3, want=2)
    assert len(new) == 1 and time.monotonic() - t0 >= 0.29

    inbox.cancel([7])  # a cancellation ends the wait at once
    t0 = time.monotonic()
    new, cancels, _ = sched._take_refill(t0 + 5.0, want=2)
    assert cancels == {7} and new == [] and time.monotonic() - t0 < 4.0


def test_a_row_that_cannot_be_admitted_fails_alone_its_batch_mates_match_their_solo_runs(llada_model):
    """Defence in depth behind the HTTP validation: rows whose params overflow the int32 device
    arrays (top_k >= 2**63, a stop token id >= 2**31; built directly, bypassing ``resolve``) are
    admitted in the same round as good rows into one session of the real engine on the tiny
    fixture. Only they fail (EngineFailed); every batch-mate's tokens equal those of its solo run
    (alone in a session of the same compiled program: no second compile; the batch invariance of
    the programs is test_step_scheduling's and test_batch_invariance's); the failed slots stay free."""
    from dllm_jax.sampling import DecodeSession, Row, SamplingParams
    from serve.engine.executor import Executor

    model = llada_model  # (shared: the engine's changes to its program cache are undone below)
    limit, listeners = model.programs.max_programs, list(model.programs.on_evict)
    admits, keys, sent = [], [], []

    class Recording(Executor):  # (and a multi-host leader: its commands go to ``sent``)
        def __init__(self, model):
            super().__init__(model, broadcast=sent.append)

        def open(self, key, version=0):
            keys.append(key)
            return super().open(key, version)

        def admit(self, sid, rows):
            failed = super().admit(sid, rows)
            admits.append((sorted(rows), sorted(failed), sorted(self.sessions[sid].slots)))
            return failed

    engine = Engine(lambda: model, names=["x"], options=EngineOptions(max_batch_size=8, warmup=()),
                    make_executor=Recording)
    engine.start()
    base = SamplingParams(gen_length=16, block_length=8, algorithm="dual_cache", threshold=0.9).resolve("llada")
    prompts = [[5, 49, 146, 244], [7, 8, 9], [11, 12, 13, 14, 15], [20, 21], [30, 31, 32], [40]]
    params = [base, dataclasses.replace(base, top_k=2**63), dataclasses.replace(base, temperature=0.7, seed=3),
              dataclasses.replace(base, stop_token_ids=(2**31,)), dataclasses.replace(base, top_k=5, seed=9,
                                                                                    temperature=1.0), base]
    bad = {1, 3}

    async def main():
        await until(lambda: engine.health()[0], "ready")
        with engine.inbox.cv:  # the scheduler takes all of them in one go: one session, one admission
            handles = [engine.submit([SeqRequest(p, q, 16)]) for p, q in zip(prompts, params)]
        return await asyncio.gather(*(collect(h) for h in handles), return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        engine.stop()
        model.programs.on_evict[:] = listeners
        model.programs.set_limit(limit)
    for i, (prompt, p, result) in enumerate(zip(prompts, params, results)):
        if i in bad:
            assert isinstance(result, EngineFailed) and isinstance(result.cause, OverflowError), result
            continue
        assert not isinstance(result, BaseException), (i, result)  # (before: EngineFailed, as the bad rows)
        solo = DecodeSession(model, keys[0])
        solo.admit({0: Row(prompt, p)})
        while not (update := solo.step(8)[0]).done:
            pass
        assert result[0].tokens.tolist() == update.tokens.tolist() and len(update.tokens), i
    # one session, one admission of all six; the two bad rows left out, their slots free
    assert len(keys) == 1 and admits == [([0, 1, 2, 3, 4, 5], [1, 3], [0, 2, 4, 5])]
    # a multi-host follower replaying the same commands leaves out the same rows
    follower = Executor(model)
    open_, admit_ = (next(c for c in sent if c.op == op) for op in ("open", "admit"))
    follower.apply(open_)
    assert sorted(follower.apply(admit_)) == [1, 3] and sorted(follower.sessions[admit_.sid].slots) == [0, 2, 4, 5]
    # the session itself: the failed row's slot stays free and untouched; without isolate the
    # whole admission raises and nothing is merged
    session = DecodeSession(model, keys[0])
    before = np.asarray(session.state.tokens.canvas).copy()
    with pytest.raises(OverflowError):
        session.admit({0: Row(prompts[0], base), 1: Row(prompts[1], params[1])})
    assert not session.slots and (np.asarray(session.state.tokens.canvas) == before).all()
    failed = session.admit({0: Row(prompts[0], base), 1: Row(prompts[1], params[1])}, isolate=True)
    assert list(failed) == [1] and list(session.slots) == [0]
    assert np.asarray(session.state.progress.active).tolist()[:2] == [True, False]


def test_a_row_whose_update_cannot_be_reported_fails_alone(make_engine):
    """Per-row host work after a step (cutting and posting one row's tokens and logprobs) that
    fails for one row fails that request alone: its slot is freed and reused, its batch-mate
    finishes, the engine keeps serving (before: the exception left the scheduler loop and the
    engine died, every request getting EngineDead)."""
    engine = make_engine(max_batch_size=2, max_wait_ms=50)
    ex = engine.executor
    admit, step, bad = ex.admit, ex.step, set()

    def admit_marking_the_bad_row(sid, rows):
        bad.update((sid, slot) for slot, (prompt, _) in rows.items() if len(prompt) == 11)
        return admit(sid, rows)

    def step_with_a_broken_row(sid, steps=None):
        out = step(sid, steps)
        for u in out:
            if (sid, u.slot) in bad:  # logprobs without their top ids: the row's report cannot be cut
                u.logprobs = np.zeros(len(u.tokens), np.float32)
        return out

    ex.admit, ex.step = admit_marking_the_bad_row, step_with_a_broken_row

    async def main():
        with engine.inbox.cv:  # one batch
            good = engine.submit([seq(gen=64)])
            broken = engine.submit([seq(prompt_len=11, gen=64)])
        with pytest.raises(EngineFailed) as e:
            await collect(broken)
        assert "reporting" in str(e.value)
        return await collect(good), await collect(engine.submit([seq(prompt_len=12, gen=64)]))

    a, later = asyncio.run(main())
    assert len(a[0].tokens) == 64 and a[0].finish_reason == "length" and len(later[0].tokens) == 64
    (sid, slot), = bad
    admits = [e for e in ex.log if e[0] == "admit"]
    assert admits[0][2] == [0, 1] and ("release", sid, slot) in ex.log
    assert engine.health() == (True, "ready")
