"""The playground (``GET /``) in a real headless Chromium, and the ``stream_trace`` extension it reads.

- the library: a ``DecodeSession`` reports commit steps / confidences for the rows whose params
  ask (equal to ``generate(return_trace=True)``'s), and for no other row;
- the API: without ``stream_trace`` (or with false) a stream is byte for byte the same; with it
  every chunk but the role chunk gains ``dllm_trace`` and nothing else changes; the traced
  tokens are the completion tokens, steps within [1, NFE], confidences in [0, 1], blocks in
  order, and the NFE it reports is the server's (``dllm_nfe_total``);
- the page, in Chromium: it asks for the API key, shows the model and its defaults, runs a
  prompt and shows the same text as the ``openai`` client for the same request, as many filled
  cells as completion tokens, the server's NFE; an invalid setting shows the server's message;
  the key survives a reload; a narrow window and the keyboard work. Its screenshot goes to the
  test's tmp dir (and is copied to ``$PLAYGROUND_SCREENSHOT`` when that is set).

One ``python -m serve`` process with the default model (no ``--model``) and an API key, one
compiled program (every request here has the same canvas: max_tokens 40 in blocks of 16,
batch 1), one browser. The browser is Debian's ``chromium`` + ``chromium-driver`` driven by
``selenium`` (``.ci/run`` installs them when missing); nothing is downloaded. A missing
browser fails these tests, it does not skip them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time

import httpx
import openai
import pytest

from serve_helpers import Server, read_metrics, server_env, sse_events, validate

pytestmark = pytest.mark.slow

KEY = "playground-key-not-secret"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MAX_TOKENS, BLOCK = 40, 16   # a canvas of 48 in 3 blocks, cut at 40
CANVAS = -(-MAX_TOKENS // BLOCK) * BLOCK
PROMPT = "Count from 1 to 12."
# PLAYGROUND_TEST_MODEL=<checkpoint>: serve that instead of the default model (local debugging)
MODEL_ARGS = ["--model", os.environ["PLAYGROUND_TEST_MODEL"]] if os.environ.get("PLAYGROUND_TEST_MODEL") else []


@pytest.fixture(scope="module")
def server():
    s = Server(*MODEL_ARGS, "--mesh", "1", "--max-batch-size", "1", "--prompt-buckets", "128",
               "--warmup-buckets", "none", env=server_env(devices=1, DLLM_API_KEY=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def name(http):
    return http.get("/v1/models").json()["data"][0]["id"]


def nfe_total(http) -> float:
    return read_metrics(http.get("/metrics").text)["dllm_nfe_total"]


def stream(http, body: dict) -> str:
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        return r.read().decode()


def compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def normalized(raw: str) -> str:
    """A raw SSE body with the per-request id and timestamp blanked."""
    raw = re.sub(r'"id":"chatcmpl-[0-9a-f]+"', '"id":"X"', raw)
    return re.sub(r'"created":\d+', '"created":0', raw)


# ---- the library side: only rows that ask are traced -----------------------------------------

@pytest.mark.parametrize("family", ["llada", "nemotron"])
def test_session_traces_only_the_rows_that_ask(request, family):
    import dataclasses

    import numpy as np

    from dllm_jax.sampling import DecodeSession, Row, SamplingParams, program_key

    model = request.getfixturevalue(f"{family}_model")
    prompts = [model.tokenizer.encode("Hello there"), model.tokenizer.encode("The sea is")]
    settings = dict(gen_length=32, block_length=16, early_stop=False)
    ref = model.generate(prompts, return_trace=True, **settings)
    params = SamplingParams(**settings).resolve(family)
    session = DecodeSession(model, program_key(model, max(map(len, prompts)), params, len(prompts)))
    session.admit({0: Row(prompts[0], dataclasses.replace(params, trace=True)), 1: Row(prompts[1], params)})
    seen = 0
    while True:
        updates = {u.slot: u for u in session.step()}
        assert updates[1].commit_step is None and updates[1].commit_conf is None
        u = updates[0]
        n = len(u.tokens)
        np.testing.assert_array_equal(u.tokens, ref.tokens[0][:n])
        np.testing.assert_array_equal(u.commit_step, ref.trace["commit_step"][0][:n])
        np.testing.assert_allclose(u.commit_conf, ref.trace["commit_conf"][0][:n])
        assert np.all((u.commit_step >= 1) & (u.commit_step <= u.nfe))
        seen = max(seen, n)
        if all(x.done for x in updates.values()):
            break
    assert seen > 0


# ---- the extension, through the API ---------------------------------------------------------

def test_stream_trace_is_opt_in_and_shaped(http, name):
    body = {"model": name, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "block_length": BLOCK, "seed": 0, "stream": True, "stream_options": {"include_usage": True}}
    plain = stream(http, body)
    assert normalized(stream(http, {**body, "stream_trace": False})) == normalized(plain)  # byte for byte
    assert "dllm_trace" not in plain
    before = nfe_total(http)
    traced = stream(http, {**body, "stream_trace": True})
    server_nfe = nfe_total(http) - before

    off, on = sse_events(plain.splitlines()), sse_events(traced.splitlines())
    assert len(on) == len(off) and on[-1] == "[DONE]"
    traces = []
    for a, b in zip(off[:-1], on[:-1]):
        validate(b, "CreateChatCompletionStreamResponse")
        b = copy.deepcopy(b)
        trace = b.pop("dllm_trace", None)
        assert normalized(compact(b)) == normalized(compact(a))  # the extension adds one field, nothing else
        role_chunk = bool(a["choices"]) and a["choices"][0]["delta"].get("role") == "assistant"
        assert (trace is None) == role_chunk, a  # every chunk but the role chunk carries one
        if a["choices"] and not role_chunk:
            traces.append(trace)
    usage = on[-2]
    assert usage["choices"] == [] and usage["dllm_trace"] == {"nfe": server_nfe}
    assert traces[-1]["nfe"] == server_nfe > 0  # the finish chunk's trace: the choice's final NFE

    ids, steps, conf, pos = [], [], [], 0
    for t in traces:
        assert t["index"] == 0 and t["start"] == pos and t["gen_length"] == CANVAS and t["block_length"] == BLOCK
        n = len(t["token_ids"])
        assert len(t["tokens"]) == len(t["commit_step"]) == len(t["confidence"]) == n
        ids += t["token_ids"]
        steps += t["commit_step"]
        conf += t["confidence"]
        pos += n
    assert len(ids) == usage["usage"]["completion_tokens"] <= MAX_TOKENS
    assert all(1 <= s <= server_nfe for s in steps) and all(0.0 <= c <= 1.0 for c in conf)
    by_block = [steps[i:i + BLOCK] for i in range(0, len(steps), BLOCK)]
    for earlier, later in zip(by_block, by_block[1:]):
        assert max(earlier) < min(later)  # a block is finished before the next one starts

    # completions carry it too; without stream it is a 400 naming the field
    with http.stream("POST", "/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                       "block_length": BLOCK, "stream": True, "stream_trace": True,
                                                       "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r.read().decode().splitlines())
    n = sum(len(e["dllm_trace"]["token_ids"]) for e in events[:-2])
    assert n == events[-2]["usage"]["completion_tokens"] and "nfe" in events[-2]["dllm_trace"]
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream_trace": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_trace"


# ---- the page, in Chromium ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    assert not missing, f"{missing} missing: apt-get install chromium chromium-driver (.ci/run does it)"
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not try to download a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800",
                "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def js(driver, expr: str):
    return driver.execute_script(f"return {expr};")


def set_field(driver, field_id: str, value: str) -> None:
    el = driver.find_element("id", field_id)
    el.clear()
    if value:
        el.send_keys(value)


def page_state(driver) -> str:
    return js(driver, "document.getElementById('status').dataset.state")


def run_and_wait(driver) -> str:
    """Click Run; the page's final state ('done' or 'error')."""
    driver.find_element("id", "run").click()
    return wait_for(lambda: (state := page_state(driver)) in ("done", "error") and state, what="the run to finish")


def test_playground_in_headless_chromium(server, http, name, browser, tmp_path):
    # the page and its assets are served without the key (they hold no secret); the API is not
    assert httpx.get(server.url + "/").status_code == 200
    assert httpx.get(server.url + "/").headers["content-type"].startswith("text/html")
    for asset in ("playground.js", "playground.css"):
        assert httpx.get(f"{server.url}/static/{asset}").status_code == 200
    assert http.get("/static/nope.js").status_code == 404
    assert httpx.get(server.url + "/v1/models").status_code == 401

    d = browser
    d.set_window_size(1280, 800)
    d.get(server.url + "/")
    # the key is on: the page says so and asks for it
    wait_for(lambda: js(d, "document.getElementById('key-box').dataset.needed") == "true", 30, "the key prompt")
    assert "401" in d.find_element("id", "error").text
    d.find_element("id", "api-key").send_keys(KEY)
    d.find_element("id", "save-key").click()
    wait_for(lambda: d.find_element("id", "model-name").text == name, 30, "the model name")
    assert js(d, "document.getElementById('error').hidden")
    defaults = http.get("/v1/models").json()["data"][0]["defaults"]
    assert d.find_element("id", "algorithm").get_attribute("value") == defaults["algorithm"]
    assert d.find_element("id", "block_length").get_attribute("value") == str(defaults["block_length"])
    # every control is labelled
    assert js(d, "[...document.querySelectorAll('input, select, textarea')].every(e => e.labels.length > 0)")

    set_field(d, "prompt", PROMPT)
    set_field(d, "max_tokens", str(MAX_TOKENS))
    set_field(d, "block_length", str(BLOCK))
    set_field(d, "seed", "0")
    before = nfe_total(http)
    assert run_and_wait(d) == "done", d.find_element("id", "error").text
    server_nfe = nfe_total(http) - before
    page_text = js(d, "document.getElementById('output').textContent")
    sent = json.loads(js(d, "document.getElementById('request-json').textContent"))
    assert sent["stream_trace"] is True and sent["model"] == name

    # the same request through the openai client
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    knobs = {k: v for k, v in sent.items() if k not in ("model", "messages", "max_tokens", "stream", "stream_options",
                                                         "stream_trace")}
    ref = client.chat.completions.create(model=name, messages=sent["messages"], max_tokens=sent["max_tokens"],
                                         extra_body=knobs)
    assert page_text == ref.choices[0].message.content
    tokens = ref.usage.completion_tokens
    assert js(d, "document.querySelectorAll('#canvas .cell.filled').length") == tokens
    assert js(d, "document.querySelectorAll('#canvas .cell').length") == CANVAS
    assert js(d, "document.querySelectorAll('#canvas .block').length") == 3
    assert d.find_element("id", "stat-tokens").text == str(tokens)
    assert d.find_element("id", "stat-nfe").text == str(int(server_nfe))
    steps = js(d, "[...document.querySelectorAll('#canvas .cell.filled')].map(c => c.title)")
    assert all("committed at forward" in t for t in steps)
    shot = tmp_path / "playground.png"
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("PLAYGROUND_SCREENSHOT"):  # (how docs/playground.png is made)
        shutil.copy(shot, os.environ["PLAYGROUND_SCREENSHOT"])

    # an invalid setting: the server's own message, readable on the page
    set_field(d, "threshold", "1.5")
    assert run_and_wait(d) == "error"
    bad = {**sent, "threshold": 1.5, "stream": False}
    bad.pop("stream_options"), bad.pop("stream_trace")
    expected = http.post("/v1/chat/completions", json=bad).json()["error"]["message"]
    shown = d.find_element("id", "error").text
    assert "400" in shown and expected in shown and "threshold" in shown
    assert d.find_element("id", "threshold").get_attribute("aria-invalid") == "true"

    # the key stays in the tab; a narrow window; the keyboard alone runs it
    d.refresh()
    wait_for(lambda: d.find_element("id", "model-name").text == name, 30, "the model name after a reload")
    d.set_window_size(420, 800)
    assert js(d, "document.documentElement.scrollWidth <= window.innerWidth + 1")
    set_field(d, "max_tokens", str(MAX_TOKENS))
    set_field(d, "block_length", str(BLOCK))
    set_field(d, "seed", "0")
    from selenium.webdriver.common.keys import Keys

    prompt = d.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT, Keys.CONTROL, Keys.ENTER)
    wait_for(lambda: page_state(d) == "done", 120, "the keyboard run")
    assert js(d, "document.getElementById('output').textContent") == page_text
    d.set_window_size(1280, 800)
