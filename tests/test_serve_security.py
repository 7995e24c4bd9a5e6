"""Transport guards of a real ``python -m serve`` (docs/security.md): the Host allow-list
(DNS rebinding), the playground's security headers, and the header-read timeout that closes
connections whose request never completes."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from serve.security import allowed_hosts, host_name
from serve_helpers import LLADA_MODEL, Server


@pytest.fixture(scope="module")
def server():
    s = Server("--model", str(LLADA_MODEL), "--warmup-buckets", "none", "--header-timeout", "1")
    yield s
    s.stop()


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
    """True when the server closes ``sock`` (recv returns b'' or the connection resets) in time."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
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
