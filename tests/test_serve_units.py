"""Server pieces without a server: text streaming, request mapping, the scheduler on a fake
executor (no compiles), metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import types

import numpy as np
import pytest

from dllm_jax.sampling import SlotUpdate
from serve.app import validation_param
from serve.detok import TextStream
from serve.engine import Engine, EngineOptions, SeqRequest
from serve.metrics import Metrics, parse
from serve.params import default_params, request_params
from serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, check_fields
from test_serve_utils import LLADA_MODEL


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


@pytest.mark.parametrize("kw,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"algorithm": "nope"}, "algorithm"), ({"generation_algorithm": "nope"}, "generation_algorithm"),
    ({"steps": 3, "max_tokens": 64}, "steps"), ({"threshold": 0}, "threshold"), ({"remasking": "x"}, "remasking"),
    ({"temperature": 0.5, "algorithm": "static_block"}, "temperature"),
])
def test_request_params_errors_name_the_field(kw, param):
    family = "nemotron" if kw.get("algorithm") == "static_block" else "llada"
    with pytest.raises(APIError) as e:
        request_params(chat(**kw), family, 512)
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize("kw,param", [
    ({"top_p": 0.5}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 1}, "presence_penalty"), ({"tools": [{}]}, "tools"), ({"bogus": 1}, "bogus"),
    ({"n": 0}, "n"), ({"stop": ["a"] * 20}, "stop"), ({"top_k": 5}, "top_k"),
    ({"algorithm": "a", "generation_algorithm": "b"}, "generation_algorithm"),
])
def test_unsupported_fields_rejected(kw, param):
    with pytest.raises(APIError) as e:
        check_fields(chat(**kw))
    assert e.value.param == param


def test_neutral_values_and_ignored_fields_accepted():
    check_fields(chat(top_p=1, logprobs=False, presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                      user="u", metadata={"a": "b"}, store=False, tool_choice="none", top_k=-1,
                      response_format={"type": "text"}, stream_options={"include_usage": True}))
    check_fields(CompletionRequest.model_validate({"prompt": "x", "echo": False, "best_of": 1, "logprobs": None}))


def test_validation_param_names():
    assert validation_param(("body", "messages", 0, "content", "str")) == "messages[0].content"
    assert validation_param(("body", "max_tokens")) == "max_tokens"
    assert validation_param(("body", 12)) is None


# ---- the scheduler on a fake executor ------------------------------------------------------------

class FakeExecutor:
    """Each step commits one block of token 7 in every occupied slot; rows finish at gen_length."""

    def __init__(self, model):
        self.sessions: dict[int, dict] = {}
        self.log: list[tuple] = []
        self.opened: list = []
        self.next = 0
        self.fail_step = False
        self.gate = threading.Semaphore(1000)
        self.warm_gate = threading.Event()
        self.warm_gate.set()

    def open(self, key):
        sid, self.next = self.next, self.next + 1
        self.sessions[sid] = {"key": key, "rows": {}}
        self.log.append(("open", sid, key.batch))
        self.opened.append(key)
        return sid

    def admit(self, sid, rows):
        for slot, (prompt, params) in rows.items():
            self.sessions[sid]["rows"][slot] = [params, 0]
        self.log.append(("admit", sid, sorted(rows), [len(p) for p, _ in rows.values()]))

    def step(self, sid):
        self.gate.acquire()
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

    def close(self, sid):
        self.sessions.pop(sid)
        self.log.append(("close", sid))

    def warmup(self, key):
        self.warm_gate.wait(30)
        self.log.append(("compiled", key))

    def noop(self):
        pass

    def shutdown(self):
        pass


def fake_model():
    return types.SimpleNamespace(max_length=512, mesh=types.SimpleNamespace(shape={"data": 1, "model": 1}),
                                 family="llada", tokenizer=None, spec=types.SimpleNamespace(vocab=384),
                                 mask_token_id=336, stop_token_ids=(257,), source="fake")


def make_engine(**opts):
    engine = Engine(fake_model, names=["fake"], options=EngineOptions(**opts), make_executor=FakeExecutor)
    engine.start()
    while not engine.health()[0]:
        assert engine.state.value != "dead", engine.error
        threading.Event().wait(0.01)
    return engine


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


def test_scheduler_batches_admits_at_block_boundaries_and_cuts_max_tokens():
    engine = make_engine(max_batch_size=4, max_wait_ms=50)
    ex = engine.executor

    async def main():
        ex.gate = threading.Semaphore(0)  # hold the device until everything is queued
        first = engine.submit([seq(gen=96)] * 2)      # one request, n=2
        second = engine.submit([seq(prompt_len=40, gen=96, max_tokens=40)])
        await asyncio.sleep(0.2)
        for _ in range(1000):
            ex.gate.release()
        a = await collect(first, 2)
        b = await collect(second)
        third = engine.submit([seq(gen=96)])           # joins later: new session or free slot
        c = await collect(third)
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
    engine.stop()


def test_cancelled_before_admission_is_never_admitted_and_queue_limit():
    engine = make_engine(max_batch_size=2, max_wait_ms=0, max_queue=3, max_sessions=1)
    ex = engine.executor

    async def main():
        ex.gate = threading.Semaphore(0)
        running = engine.submit([seq(gen=64)] * 2)    # fills the only session
        await asyncio.sleep(0.1)
        waiting = engine.submit([seq(prompt_len=11, gen=64)])
        with pytest.raises(APIError) as e:
            engine.submit([seq()] * 3)                  # 1 waiting + 3 > max_queue
        assert e.value.status == 429 and e.value.headers["Retry-After"]
        waiting.cancel()
        await asyncio.sleep(0.1)
        for _ in range(1000):
            ex.gate.release()
        await collect(running, 2)
        after = engine.submit([seq(prompt_len=12, gen=64)])
        await collect(after)

    asyncio.run(main())
    admitted = [n for e in ex.log if e[0] == "admit" for n in e[3]]
    assert 11 not in admitted and 12 in admitted
    assert engine.metrics.counters["requests_cancelled_total"] == 1
    engine.stop()


def test_engine_error_fails_only_that_batch_and_dead_engine_is_503():
    engine = make_engine(max_batch_size=2, max_wait_ms=0)

    async def main():
        engine.executor.fail_step = True
        h = engine.submit([seq()])
        with pytest.raises(APIError) as e:
            await collect(h)
        assert e.value.status == 500
        engine.executor.fail_step = False
        await collect(engine.submit([seq()]))  # the engine still serves

    asyncio.run(main())
    assert engine.health() == (True, "ready")
    engine.stop()
    assert engine.health() == (False, "dead")
    with pytest.raises(APIError) as e:
        engine.info()
    assert e.value.status == 503

    broken = Engine(lambda: 1 / 0, names=["x"])
    broken.start()
    broken._thread.join(10)
    assert broken.health() == (False, "dead") and "ZeroDivisionError" in broken.error


def test_new_programs_compile_in_background_meanwhile_a_bigger_one_is_borrowed():
    from dllm_jax.sampling import program_key

    engine = make_engine(max_batch_size=8, max_wait_ms=0)
    ex = engine.executor
    ex.warm_gate.clear()  # compiles hang until released
    # 4 slots x (32 + 64) = 384 <= 8 x the exact 1 x (16 + 64): affordable to borrow
    big = program_key(engine.model, 30, default_params("llada", 64), 4, batch_buckets=(1, 2, 4, 8))
    engine.compiler.add(big)

    async def main():
        borrowed = await collect(engine.submit([seq(prompt_len=10, gen=64)]))  # B1/P16 not compiled yet
        stuck = engine.submit([seq(prompt_len=10, gen=128)])  # nothing to borrow: waits for its compile
        await asyncio.sleep(0.2)
        assert all(k.gen_length == 64 for k in ex.opened)
        ex.warm_gate.set()
        await collect(stuck)
        while not any(k.batch == 1 and k.gen_length == 64 for k in engine.compiler.compiled):
            await asyncio.sleep(0.01)
        exact = await collect(engine.submit([seq(prompt_len=10, gen=64)]))
        return borrowed, exact

    borrowed, exact = asyncio.run(main())
    assert len(borrowed[0].tokens) == 64 and len(exact[0].tokens) == 64
    assert ex.opened[0] == big
    assert [(k.batch, k.prompt_len, k.gen_length) for k in ex.opened[1:]] == [(1, 16, 128), (1, 16, 64)]
    assert engine.metrics.counters["compiles_total"] == 2
    engine.stop()


# ---- metrics -------------------------------------------------------------------------------------

def test_metrics_render_parse():
    m = Metrics()
    m.batch(3, 8, 0.02)
    m.finished("stop", 5)
    m.http_status(200)
    m.observe("queue_time_seconds", 0.003)
    values = parse(m.render())
    assert values["dllm_batch_rows_total"] == 3 and values["dllm_batch_slots_total"] == 8
    assert values['dllm_requests_total{finish_reason="stop"}'] == 1
    assert values['dllm_http_requests_total{status="200"}'] == 1
    assert values['dllm_batch_size_bucket{le="4"}'] == 1 and values['dllm_batch_size_bucket{le="2"}'] == 0
    assert values["dllm_queue_time_seconds_count"] == 1
