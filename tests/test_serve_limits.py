"""Every request bounded at the edge: field ranges (400 naming the field and its range), the body
(413 before it is parsed), prompt characters (413 before tokenizing), /tokenize and /detokenize,
error bodies that quote only an excerpt of a value, requests that can never fit the queue (400,
not 429), and 5xx bodies with a request id instead of exception text; the transport guards
(docs/security.md): the Host allow-list (DNS rebinding), the playground's security headers, and the
header-read timeout that closes connections whose request never completes.

One ``python -m serve`` process with small limits; no request here reaches the device, so
nothing compiles. The 5xx test runs the app in-process on the fake engine of test_serve_units.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import time

import httpx
import pytest

from serve.api.security import allowed_hosts, host_name
from serve_helpers import LLADA_MODEL, Server, sse_events, validate

BODY_LIMIT = 256 * 1024
QUEUE = 4
CANVAS = 256
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    s = Server("--model", str(LLADA_MODEL), "--mesh", "1", "--max-batch-size", "2", "--warmup-buckets", "none",
               "--max-queue", str(QUEUE), "--max-body-bytes", str(BODY_LIMIT), "--max-gen-length", str(CANVAS),
               "--header-timeout", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def error(r, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text[:500]
    body = r.json()
    validate(body, "ErrorResponse")
    assert body["error"]["param"] == param, body
    return body["error"]


def test_every_field_is_checked_to_its_range(http):
    """Values that used to pass validation and fail later (inside the device admit, a 500 for the
    whole batch) or run unbounded work are a 400 naming the field and the allowed range."""
    cases = [
        ({"steps": 2_000_000_000}, "steps", "between 1 and gen_length=32"),   # was accepted: 2e9 steps
        ({"steps": 2**63}, "steps", "[1, 2147483647]"),
        ({"top_k": 2**63, "temperature": 1.0}, "top_k", "2147483647"),        # was a 500 in admit
        ({"stop_token_ids": [2**31]}, "stop_token_ids", "[0, "),              # was a 500 in admit
        ({"stop_token_ids": [384]}, "stop_token_ids", "[0, 384)"),            # the fixture's vocabulary
        ({"stop_token_ids": list(range(9))}, "stop_token_ids", "at most 8"),
        ({"stop": "x" * 100_000}, "stop", "at most 256 characters"),          # was accepted
        ({"block_length": 2**40}, "block_length", "[1, 2147483647]"),     # was a 413 about max_tokens
        ({"block_length": CANVAS + 1}, "block_length", f"between 1 and {CANVAS}"),
        ({"max_tokens": CANVAS + 1}, "max_tokens", "--max-gen-length"),
        ({"max_tokens": 200, "block_length": 96}, "max_tokens", "canvas of 288 tokens"),
        ({"seed": 2**62}, "seed", "[0, 2^62)"),
        ({"threshold": float("inf")}, "threshold", "finite"),
    ]
    for extra, param, words in cases:
        body = json.dumps({"messages": MSG, "max_tokens": 32, **extra})  # (json.dumps writes Infinity)
        err = error(http.post(CHAT, content=body, headers={"Content-Type": "application/json"}), 400, param)
        assert words in err["message"], (extra, err)
        assert len(err["message"]) < 400, err


def test_bodies_over_the_limit_are_413_before_parsing(http):
    big = {"messages": MSG, "max_tokens": 4, "user": "x" * (BODY_LIMIT + 1)}  # a valid request, too big
    err = error(http.post(CHAT, json=big), 413, None)
    assert err["code"] == "request_too_large" and "--max-body-bytes" in err["message"]
    # chunked (no Content-Length): refused once the bytes read pass the limit
    data = json.dumps(big).encode()
    chunks = (data[i:i + 16384] for i in range(0, len(data), 16384))
    r = http.post(CHAT, content=chunks, headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert error(r, 413, None)["code"] == "request_too_large"
    # a body within the limit is parsed as before (a 400 from the field policy, not a 413)
    assert error(http.post(CHAT, json={**big, "user": "x", "foo": 1}), 400, "foo")


def test_prompts_are_bounded_before_tokenizing(server, http):
    """Characters are the first bound (the context x the longest vocabulary entry: 512 x 19 on the
    fixture), before any tokenizer work; then tokens. The tokenizer endpoints too."""
    chars = 512 * 19
    huge = "hello world " * 20_000  # 240k characters: 100k tokens, below the body limit
    for path, body, param in [(COMP, {"prompt": huge}, "prompt"), (COMP, {"prompt": ["hi", huge]}, "prompt[1]"),
                              (CHAT, {"messages": [{"role": "user", "content": huge}]}, "messages"),
                              ("/tokenize", {"prompt": huge}, "prompt"),
                              ("/tokenize", {"messages": [{"role": "user", "content": huge}]}, "messages")]:
        err = error(http.post(path, json=body), 413, param)
        assert err["code"] == "prompt_too_long" and f"at most {chars}" in err["message"], (path, err)
    err = error(http.post("/detokenize", json={"tokens": [5] * (chars + 1)}), 413, "tokens")
    assert err["code"] == "too_many_tokens"
    # at the bound: tokenized (off the event loop), and /health answers meanwhile
    ok = {"prompt": "ab " * (chars // 3), "return_token_strs": True}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(http.post, "/tokenize", json=ok) for _ in range(4)]
        assert httpx.get(server.url + "/health", timeout=60).status_code == 200
        results = [f.result() for f in pending]
    assert all(r.status_code == 200 and r.json()["count"] > 512 for r in results)
    # over the context in tokens but within the characters: the 413 about tokens, as before
    assert error(http.post(COMP, json={"prompt": "ab " * 600}), 413, "prompt")["code"] == "context_length_exceeded"


def test_error_bodies_quote_only_an_excerpt(http):
    bias = {str(i): 1 for i in range(15_000)}  # ~170 KB; was echoed whole in the message
    for body, status, param in [({"messages": MSG, "logit_bias": bias}, 400, "logit_bias"),
                                ({"messages": MSG, "model": "m" * 200_000}, 404, "model"),
                                ({"messages": MSG, "k" * 200_000: 1}, 400, "k" * 80 + "... (200000 characters)")]:
        r = http.post(CHAT, json=body)
        error(r, status, param)
        assert len(r.content) < 2048, (param[:20], len(r.content))


def test_a_request_that_can_never_be_queued_is_400_not_429(http):
    err = error(http.post(CHAT, json={"messages": MSG, "n": QUEUE + 1, "max_tokens": 4}), 400, "n")
    assert err["code"] == "too_many_sequences" and "--max-queue" in err["message"]
    err = error(http.post(COMP, json={"prompt": ["a"] * (QUEUE + 1), "max_tokens": 4}), 400, "prompt")
    assert err["code"] == "too_many_sequences"


def test_top_k_of_the_vocabulary_or_more_is_off():
    from serve.api.protocol import ChatCompletionRequest
    from serve.api.request_params import request_params

    def params(**kw):
        req = ChatCompletionRequest(messages=MSG, temperature=0.7, seed=1, **kw)
        return request_params(req, "llada", 512, vocab=384)[0][0]

    assert params(top_k=384) == params(top_k=2**31 - 1) == params(top_k=0) == params()
    assert params(top_k=383).top_k == 383


def test_5xx_bodies_carry_the_request_id_not_the_exception_text(caplog):
    """An engine failure (the fake executor raises in its step): the body names the request id,
    the log keeps 'device fell over'."""
    from serve.api.app import create_app
    from serve.engine.engine import Engine, EngineOptions
    from test_serve_units import FakeExecutor, fake_model

    engine = Engine(fake_model, names=["fake"], options=EngineOptions(max_batch_size=2, max_wait_ms=0),
                    make_executor=FakeExecutor)
    engine.start()
    try:
        async def main():
            while not engine.health()[0]:
                assert engine.state.value != "dead", engine.error
                await asyncio.sleep(0.01)
            engine.executor.fail_step = True
            transport = httpx.ASGITransport(app=create_app(engine))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                body = {"prompt": [1, 2, 3], "max_tokens": 8}
                plain = await client.post(COMP, json=body, headers={"X-Request-Id": "req-plain-1"})
                streamed = await client.post(COMP, json={**body, "stream": True},
                                             headers={"X-Request-Id": "req-stream-2"})
            return plain, streamed

        plain, streamed = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.stop()
    err = error(plain, 500, None)
    assert err["code"] == "engine_error" and "req-plain-1" in err["message"], err
    assert "device fell over" not in plain.text and "RuntimeError" not in plain.text
    event = sse_events(streamed.text.splitlines())[-2]["error"]
    assert event["code"] == "engine_error" and "req-stream-2" in event["message"], event
    assert "device fell over" not in streamed.text
    assert "device fell over" in caplog.text and "req-plain-1" in caplog.text


# ---- transport guards -------------------------------------------------------------------


def test_rebinding_host_names_are_refused(server):
    """No API key, loopback bind (the default): a page served as evil.example that resolved to
    127.0.0.1 reaches the port, but its requests carry Host: evil.example."""
    for host in ("evil.example", "evil.example:%d" % server.port, "10.1.2.3"):
        r = httpx.get(server.url + "/v1/models", headers={"Host": host})
        assert r.status_code == 403, (host, r.text)
        err = r.json()["error"]
        assert err["code"] == "host_not_allowed" and "--allowed-hosts" in err["message"]
        assert r.headers["x-request-id"]
        r = httpx.post(server.url + "/update_weights_from_disk", headers={"Host": host}, json={"model_path": "/x"})
        assert r.status_code == 403
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost", "[::1]:80"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_policy():
    loop = frozenset({"localhost", "127.0.0.1", "::1"})
    assert allowed_hosts("127.0.0.1", None, None) == loop
    assert allowed_hosts("localhost", None, None) == loop
    assert allowed_hosts("::1", None, ["Box.Lan"]) == loop | {"box.lan"}
    assert allowed_hosts("127.0.0.1", "key", None) is None  # a rebinding page cannot know the key
    assert allowed_hosts("0.0.0.0", None, None) is None  # cluster clients use any name of the host
    assert allowed_hosts("10.0.0.5", None, ["node7"]) == loop | {"node7"}  # an explicit list always applies
    assert allowed_hosts("127.0.0.1", None, ["*"]) is None
    assert [host_name(h) for h in ("[::1]:8000", "LOCALHOST:80", "a.b", "[::1]")] == ["::1", "localhost", "a.b", "::1"]


def test_playground_security_headers(server):
    for path in ("/", "/static/playground.js"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "default-src 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes ``sock`` (recv returns b'' or the connection resets) in time;
    bytes still arriving (the rest of an earlier response) are read and skipped."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(4096) == b"":
                return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
    return False


def test_slow_and_silent_connections_are_closed(server):
    """--header-timeout 1: a connection that sends nothing, or trickles a request's headers, is
    closed; one that completes its request in time is answered as usual."""
    silent = socket.create_connection(("127.0.0.1", server.port))
    trickle = socket.create_connection(("127.0.0.1", server.port))
    t0 = time.monotonic()
    trickle.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
    time.sleep(0.5)
    trickle.sendall(b"X-Slow: 1\r\n")  # still no blank line: the headers never end
    assert _closed_within(silent, 10) and _closed_within(trickle, 10)
    assert time.monotonic() - t0 < 10
    # a complete request on a kept-alive connection, then a second one trickled: closed too
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    sock.settimeout(10)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /health HTTP/1.1\r\n")
    assert _closed_within(sock, 10)
    for s in (silent, trickle, sock):
        s.close()
    assert httpx.get(server.url + "/health").status_code == 200
