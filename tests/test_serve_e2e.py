"""End to end: a real ``python -m serve`` process on the LLaDA tiny fixture, the official
``openai`` client and raw HTTP. One server for the whole module (compiles are the cost).

Texts at temperature 0 are compared with ``Model.generate`` in this process on the same
prompt, with the gen_length/steps/algorithm the server derives (docs/api.md), decoded with
the same tokenizer and cut the same way (first stop token, max_tokens, stop strings).
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import openai
import pytest

from serve_helpers import LLADA_MODEL, Server, chat_ids, read_metrics, reference, server_env, sse_events, validate

KEY = "test-key-not-secret"
NAME = "llada-tiny"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    s = Server("--model", str(LLADA_MODEL), "--served-model-name", NAME, "--mesh", "1",
               "--max-batch-size", "8", "--batch-buckets", "1,8", "--prompt-buckets", "64,128,512",
               "--max-wait-ms", "30", "--warmup-buckets", "none",
               env=server_env(DLLM_API_KEY=KEY))  # the key comes from the environment
    yield s
    s.stop()


def scrape(server) -> dict[str, float]:
    return read_metrics(httpx.get(server.url + "/metrics").text, NAME)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
        yield c


# ---- basics ---------------------------------------------------------------------------------

def test_models_health_metrics_and_auth(server, http):
    body = http.get("/v1/models").json()
    validate(body, "ListModelsResponse")
    card = body["data"][0]
    assert card["id"] == NAME and card["family"] == "llada" and card["max_model_len"] == 512
    assert card["defaults"]["algorithm"] == "dual_cache" and card["defaults"]["threshold"] == 0.9
    assert "dual_cache" in card["algorithms"] and "static_block" not in card["algorithms"]
    # /health and /metrics are open; the API needs the key
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/metrics").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401
        validate(r.json(), "ErrorResponse")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    r = http.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


def test_chat_equals_generate_alone(client, http, llada_model):
    content = "Hello there!"
    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": content}],
                                                 "max_tokens": 24})
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    prompt = chat_ids(llada_model, content)
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["choices"][0]["message"]["content"] == reference(llada_model, [prompt], [24])[0]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 24
    # a plain request (only messages) through the official client
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], max_tokens=24)
    assert out.choices[0].message.content == body["choices"][0]["message"]["content"]
    assert out.model == NAME and out.object == "chat.completion"


def test_completions_all_prompt_forms(client, http, llada_model):
    tok = llada_model.tokenizer
    texts = ["The cat", "Once upon a time"]
    ids = [tok.encode(t) for t in texts]
    ref = reference(llada_model, ids, [16, 16])
    forms = [(texts[0], [ref[0]]), (texts, ref), (ids[0], [ref[0]]), (ids, ref)]
    for prompt, expected in forms:
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=16)
        assert [c.text for c in out.choices] == expected
        assert [c.index for c in out.choices] == list(range(len(expected)))
        assert out.usage.prompt_tokens == sum(len(i) for i in (ids if len(expected) == 2 else ids[:1]))
    r = http.post("/v1/completions", json={"model": NAME, "prompt": ids, "max_tokens": 16})
    validate(r.json(), "CreateCompletionResponse")


def test_chat_text_parts_n_and_stop(client, llada_model):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there!"}]
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": parts}],
                                         max_tokens=16, n=3)
    prompt = chat_ids(llada_model, "Hello\nthere!")
    expected = reference(llada_model, [prompt], [16])[0]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.message.content == expected for c in out.choices)  # T=0: every canvas agrees
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == 48
    # a stop string taken from the text itself: output cut before it, finish_reason "stop"
    stop = expected[5:8]
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": parts}],
                                         max_tokens=16, stop=[stop, "zzzz"])
    assert out.choices[0].message.content == expected[:expected.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    assert 0 < out.usage.completion_tokens <= 16
    # n > 1 at T > 0: independent canvases (seeds seed, seed+1, ...)
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
                                         n=2, temperature=1.5, seed=7, extra_body={"threshold": 0.5})
    again = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
                                           n=2, temperature=1.5, seed=7, extra_body={"threshold": 0.5})
    assert [c.message.content for c in out.choices] == [c.message.content for c in again.choices]
    assert out.choices[0].message.content != out.choices[1].message.content


def test_extra_body_fields_are_honoured(client, llada_model):
    content = "What is 2+2?"
    prompt = chat_ids(llada_model, content)
    extra = {"algorithm": "basic", "steps": 16, "block_length": 32, "remasking": "low_confidence",
             "early_stop": True}
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                         max_tokens=20, extra_body=extra)
    expected = reference(llada_model, [prompt], [20], algorithm="basic", steps=16)[0]
    assert out.choices[0].message.content == expected
    # the alias name and generation_algorithm spelling give the same program
    out2 = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                          max_tokens=20, extra_body={**extra, "algorithm": None,
                                                                     "generation_algorithm": "llada"})
    assert out2.choices[0].message.content == expected


# ---- streaming ------------------------------------------------------------------------------

def test_streaming_chunks_usage_and_equality(client, http):
    messages = [{"role": "user", "content": "Tell me a story about a dragon."}]
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=40)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == plain.choices[0].message.content
    assert len({c.id for c in chunks}) == 1
    # raw SSE: schema of every chunk, [DONE] last
    with http.stream("POST", "/v1/chat/completions", json={"model": NAME, "messages": messages, "max_tokens": 40,
                                                            "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        validate(e, "CreateChatCompletionStreamResponse")
    # completions stream: same text as the non-streamed completion
    prompt = "Once upon a time"
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=40)
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_multi_block_streams_its_final_text(client, llada_model):
    """Multi-block decoding through the server: the streamed text is the plain reply, which is
    ``generate``'s with the same settings (committed tokens are final; the stream sends each
    token once every position before it is committed)."""
    content = "Tell me a story about a dragon."
    messages = [{"role": "user", "content": content}]
    extra = {"block_length": 16, "threshold": 0.5, "block_add_threshold": 0.25}
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=96, extra_body=extra)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=96, stream=True,
                                                 extra_body=extra))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    out = llada_model.generate([chat_ids(llada_model, content)], gen_length=96, block_length=16, threshold=0.5,
                               block_add_threshold=0.25, early_stop=True, algorithm="dual_cache")
    expected = llada_model.tokenizer.decode(out.tokens[0][:int(out.lengths[0])].tolist(), skip_special_tokens=True)
    assert plain.choices[0].message.content == expected
    assert len(chunks) > 3  # it did stream in pieces


# a long generation: 8 blocks of 32 with 32 full-canvas steps each, no early stop
LONG = {"model": NAME, "messages": [{"role": "user", "content": "Hello there!"}], "max_tokens": 256,
        "stream": True, "early_stop": False, "algorithm": "basic", "steps": 256}


def test_streaming_is_real_and_health_answers_during_a_batch(server, http):
    """gen 256 in blocks of 32: the first text arrives well before the end; /health answers meanwhile."""
    body = dict(LONG)
    assert http.post("/v1/chat/completions", json={**body, "stream": False}).status_code == 200  # compile first
    health_times = []

    def poll_health():
        with httpx.Client(timeout=30) as c:
            t0 = time.monotonic()
            assert c.get(server.url + "/health").status_code == 200
            health_times.append(time.monotonic() - t0)

    t0 = time.monotonic()
    arrivals = []
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                arrivals.append(time.monotonic() - t0)
                if len(arrivals) == 1:
                    thread = threading.Thread(target=poll_health)
                    thread.start()
    total = time.monotonic() - t0
    thread.join()
    assert len(arrivals) >= 4, arrivals
    assert arrivals[0] < 0.5 * total, (arrivals, total)
    assert health_times[0] < max(1.0, 0.5 * total), health_times


def test_client_disconnect_frees_the_slot(server, http):
    before = scrape(server)["dllm_requests_cancelled_total"]
    body = dict(LONG)
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # leave after the first block
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = scrape(server)
        if m["dllm_requests_cancelled_total"] > before and m["dllm_running_rows"] == 0:
            break
        time.sleep(0.05)
    assert m["dllm_requests_cancelled_total"] > before
    assert httpx.get(server.url + "/health").status_code == 200


# ---- batch invariance through the whole stack --------------------------------------------

def _mixed_requests():
    reqs = []
    for i in range(32):
        content = f"Question {i}: " + "why " * (i % 5)
        r = {"content": content, "max_tokens": [8, 16, 24, 32][i % 4], "extra": {}, "n": 1, "completion": i % 6 == 5}
        if i % 4 == 3:
            r["extra"] = {"algorithm": "basic", "steps": 16}
        elif i % 3 == 1:
            r["extra"] = {"threshold": 0.7}
        elif i % 3 == 2:
            r["extra"] = {"threshold": 0.5}
        if i % 8 == 5:
            r["extra"] = {"entropy_bound": 0.4}
        if i % 5 == 4:
            r["temperature"], r["seed"] = 0.8, 1000 + i
        if i == 6:
            r["n"] = 2
        if i == 10:
            r["stop"] = ["y "]
        reqs.append(r)
    return reqs


def _send(client, r):
    kwargs = dict(model=NAME, max_tokens=r["max_tokens"], n=r["n"], extra_body=r["extra"],
                  temperature=r.get("temperature", 0.0), seed=r.get("seed"), stop=r.get("stop"))
    if r["completion"]:
        out = client.completions.create(prompt=r["content"], **kwargs)
        return [c.text for c in out.choices]
    out = client.chat.completions.create(messages=[{"role": "user", "content": r["content"]}], **kwargs)
    return [c.message.content for c in out.choices]


def test_32_concurrent_mixed_requests_equal_generate(server, client, llada_model):
    reqs = _mixed_requests()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        # a warm-up pass: on a cold server (this test alone, or re-run after a worker crash) the
        # first programs compile while rows go through the bucket that is ready, one at a time
        list(pool.map(lambda r: _send(client, r), reqs))
        deadline = time.monotonic() + 120  # and the programs it started compiling are ready
        while scrape(server).get("dllm_compiles_in_flight", 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        before = scrape(server)
        got = list(pool.map(lambda r: _send(client, r), reqs))
        after = scrape(server)
    tok = llada_model.tokenizer
    # reference: one generate call per program (per-row knobs as lists), rows in any order
    rows = []
    for k, r in enumerate(reqs):
        prompt = tok.encode(r["content"]) if r["completion"] else chat_ids(llada_model, r["content"])
        for j in range(r["n"]):
            rows.append((k, j, prompt, r))
    expected: dict[tuple[int, int], str] = {}
    for basic in (False, True):
        group = [row for row in rows if (row[3]["extra"].get("algorithm") == "basic") == basic]
        kwargs = dict(temperature=[g[3].get("temperature", 0.0) for g in group],
                      seed=[g[3].get("seed", 0) + g[1] for g in group])
        if basic:
            kwargs.update(algorithm="basic", steps=16)
        else:
            extras = [g[3]["extra"] for g in group]
            kwargs["threshold"] = [e.get("threshold", None if "entropy_bound" in e else 0.9) for e in extras]
            kwargs["entropy_bound"] = [e.get("entropy_bound") for e in extras]
        out = reference_rows(llada_model, [g[2] for g in group], [g[3]["max_tokens"] for g in group],
                             [g[3].get("stop", ()) for g in group], **kwargs)
        for g, text in zip(group, out):
            expected[(g[0], g[1])] = text
    for k, r in enumerate(reqs):
        assert got[k] == [expected[(k, j)] for j in range(r["n"])], (k, r)
    # they were batched: more than one row per block program on average
    steps = after["dllm_batch_steps_total"] - before["dllm_batch_steps_total"]
    rows_run = after["dllm_batch_rows_total"] - before["dllm_batch_rows_total"]
    assert rows_run / steps > 2, (rows_run, steps)


def reference_rows(model, prompts, max_tokens, stops, *, algorithm=None, **rows):
    gen = 32
    if algorithm is None:
        algorithm = "dual_cache"
    out = model.generate(prompts, gen_length=gen, block_length=32, algorithm=algorithm, early_stop=True, **rows)
    texts = []
    for i, limit in enumerate(max_tokens):
        text = model.tokenizer.decode(out.tokens[i][:min(int(out.lengths[i]), limit)].tolist(),
                                      skip_special_tokens=True)
        cuts = [text.find(s) for s in stops[i] if s in text]
        texts.append(text[:min(cuts)] if cuts else text)
    return texts


# ---- bad input --------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]

BAD = [
    # (case, path, body (str = raw), status, param)
    ("malformed json", CHAT, '{"messages": [', 400, None),
    ("body not an object", CHAT, "[1, 2]", 400, None),
    ("empty body", CHAT, "", 400, None),
    ("deeply nested json", CHAT, '{"messages": ' * 3000 + "1" + "}" * 3000, 400, None),
    ("messages wrong type", CHAT, {"messages": "hi"}, 400, "messages"),
    ("missing messages", CHAT, {"model": NAME}, 400, "messages"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("bad role", CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("image part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages[0].content[0]"),
    ("max_tokens string", CHAT, {"messages": MSG, "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens bool", CHAT, {"messages": MSG, "max_tokens": True}, 400, "max_tokens"),
    ("temperature string", CHAT, {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("negative max_tokens", CHAT, {"messages": MSG, "max_tokens": -1}, 400, "max_tokens"),
    ("zero max_completion_tokens", CHAT, {"messages": MSG, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("huge max_tokens", CHAT, {"messages": MSG, "max_tokens": 10**9}, 400, "max_tokens"),
    ("max_tokens disagree", CHAT, {"messages": MSG, "max_tokens": 8, "max_completion_tokens": 16}, 400,
     "max_completion_tokens"),
    ("prompt longer than context", COMP, {"prompt": "a" * 600}, 413, "prompt"),
    ("prompt + max_tokens over context", COMP, {"prompt": "a" * 400, "max_tokens": 200}, 413, "max_tokens"),
    ("unknown model", CHAT, {"model": "gpt-4", "messages": MSG}, 404, "model"),
    ("unknown algorithm", CHAT, {"messages": MSG, "algorithm": "beam"}, 400, "algorithm"),
    ("unknown generation_algorithm", CHAT, {"messages": MSG, "generation_algorithm": "beam"}, 400,
     "generation_algorithm"),
    ("nemotron decoder on llada", CHAT, {"messages": MSG, "algorithm": "static_block"}, 400, "algorithm"),
    ("steps not dividing the blocks", CHAT, {"messages": MSG, "max_tokens": 64, "block_length": 32, "steps": 3},
     400, "steps"),
    ("block_length zero", CHAT, {"messages": MSG, "block_length": 0}, 400, "block_length"),
    ("threshold out of range", CHAT, {"messages": MSG, "threshold": 1.5}, 400, "threshold"),
    ("remasking unknown", CHAT, {"messages": MSG, "remasking": "best"}, 400, "remasking"),
    ("logprobs_mode unknown", CHAT, {"messages": MSG, "logprobs_mode": "sampled"}, 400, "logprobs_mode"),
    ("logprobs_mode not a string", CHAT, {"messages": MSG, "logprobs_mode": 1}, 400, "logprobs_mode"),
    ("cfg with a cache", CHAT, {"messages": MSG, "cfg_scale": 1.0}, 400, "cfg_scale"),
    ("negative temperature", CHAT, {"messages": MSG, "temperature": -1}, 400, "temperature"),
    ("negative seed", CHAT, {"messages": MSG, "seed": -1}, 400, "seed"),
    ("n zero", CHAT, {"messages": MSG, "n": 0}, 400, "n"),
    ("n huge", CHAT, {"messages": MSG, "n": 1000}, 400, "n"),
    ("top_p 0", CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p"),
    ("top_logprobs > 20", CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("top_logprobs", CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ("logit_bias", CHAT, {"messages": MSG, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("presence_penalty", CHAT, {"messages": MSG, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("frequency_penalty", CHAT, {"messages": MSG, "frequency_penalty": -0.5}, 400, "frequency_penalty"),
    ("tools", CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("response_format json", CHAT, {"messages": MSG, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("unknown field", CHAT, {"messages": MSG, "foo": 1}, 400, "foo"),
    ("empty stop string", CHAT, {"messages": MSG, "stop": [""]}, 400, "stop"),
    ("completion echo streamed", COMP, {"prompt": "hi", "echo": True, "stream": True}, 400, "echo"),
    ("completion best_of", COMP, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("completion logprobs > 20", COMP, {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("completion empty prompt", COMP, {"prompt": ""}, 400, "prompt"),
    ("completion empty prompt list", COMP, {"prompt": []}, 400, "prompt"),
    ("completion token out of range", COMP, {"prompt": [1, 2, 99999]}, 400, "prompt"),
    ("completion mask token", COMP, {"prompt": [1, 336]}, 400, "prompt"),
    ("completion mixed prompt types", COMP, {"prompt": [1, "a"]}, 400, "prompt"),
    ("lone surrogate in prompt", COMP, '{"prompt": "a\\ud800b"}', 400, "prompt"),
    ("NaN temperature", CHAT, '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "temperature"),
    ("stop not strings", CHAT, {"messages": MSG, "stop": [1, 2]}, 400, "stop"),
    ("too many sequences", COMP, {"prompt": ["a"] * 10, "n": 64}, 400, "n"),
    ("unknown route", "/v1/embeddings", {"input": "hi"}, 404, None),
]


def test_bad_inputs_answer_openai_errors(server, http):
    for case, path, body, status, param in BAD:
        if isinstance(body, str):
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = http.post(path, json=body)
        assert r.status_code == status, (case, r.status_code, r.text)
        payload = r.json()
        validate(payload, "ErrorResponse")
        assert set(payload) == {"error"}, case
        assert payload["error"]["param"] == param, (case, payload)
        assert payload["error"]["message"], case
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    # still serving
    r = http.post(CHAT, json={"messages": MSG, "max_tokens": 8})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics_exposition(server, http):
    text = httpx.get(server.url + "/metrics").text
    m = read_metrics(text, NAME)
    assert m['dllm_requests_total{finish_reason="length"}'] > 0
    assert m["dllm_prompt_tokens_total"] > 0 and m["dllm_generation_tokens_total"] > 0
    assert m["dllm_nfe_total"] > 0 and m["dllm_batch_steps_total"] > 0
    assert m['dllm_http_requests_total{status="200"}'] > 0 and m['dllm_http_requests_total{status="400"}'] > 0
    assert m["dllm_request_latency_seconds_count"] > 0
    assert m['dllm_batch_size_bucket{le="+Inf"}'] == m["dllm_batch_size_count"]
    assert "# TYPE dllm_queue_depth gauge" in text and m["dllm_engine_ready"] == 1
    json.dumps(m)
