"""Transport-level guards of the HTTP server: the Host allow-list, the playground's security
headers, and an HTTP protocol that closes connections whose request headers never complete.

- **Host allow-list** (DNS rebinding): a page in the operator's browser can make the browser send
  requests to ``127.0.0.1:8000`` under the page's own host name (``evil.example`` resolving to
  127.0.0.1); without an API key nothing else stops it from driving the API, weight updates
  included. So when no API key is set and the server listens on a loopback address (the
  default), only loopback Host names are answered, plus ``--allowed-hosts``. A server bound to
  a cluster address keeps answering every Host name its clients use (they reach it by IP or by
  any of its names; a rebinding page would have to run on a machine of the cluster's network,
  where ``--api-key`` is the protection to use). ``--allowed-hosts`` given explicitly always
  applies, and ``'*'`` turns the check off.
- **Header-read timeout**: uvicorn closes idle keep-alive connections but waits forever for the
  headers of a request that trickles in a byte at a time, before any authentication. The
  protocol here gives every request ``header_timeout`` seconds from its first byte (or from
  the connection's opening) to complete its headers, then closes the connection.
"""

from __future__ import annotations

import ipaddress
import logging

import h11
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from serve.api.protocol import APIError

log = logging.getLogger("serve")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

# The playground page: its own scripts and styles only, no framing, no sniffing, no referrer.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def is_loopback(host: str) -> bool:
    """A loopback bind address or name (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, api_key: str | None, extra: list[str] | None) -> frozenset[str] | None:
    """The Host names to answer, lower case (None: any). See the module docstring."""
    extra = [h.strip().lower() for h in (extra or []) if h.strip()]
    if "*" in extra:
        return None
    if not extra and (api_key or not is_loopback(bind_host)):
        return None
    return frozenset({*LOOPBACK_NAMES, *extra})


def host_name(value: str) -> str:
    """``Host`` header -> the name without the port: ``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostCheck:
    """Pure ASGI middleware: a 403 for requests whose Host is not allowed (None: all are)."""

    def __init__(self, app, *, allowed: frozenset[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allowed is None:
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
        # (no Host at all: an HTTP/1.0 client, not a browser; a browser always sends one)
        if host is None or host_name(host) in self.allowed:
            return await self.app(scope, receive, send)
        err = APIError(403, "this server answers only requests addressed to a loopback host name (DNS rebinding "
                            "protection); start it with --allowed-hosts NAME or --api-key to allow others",
                       code="host_not_allowed")
        await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header-read timeout (``header_timeout`` seconds)."""

    header_timeout: float = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # bytes of a new request: its headers have a deadline
            self._arm_header_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in (or the connection failed)
            self._cancel_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self.header_timeout:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closing a connection whose request headers did not arrive within %.0fs", self.header_timeout)
            self.transport.close()


def guarded_protocol(header_timeout: float) -> type[GuardedH11Protocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with this header timeout (0: none)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": float(header_timeout)})
