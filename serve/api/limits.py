"""The request-body limit: a pure ASGI middleware that answers 413 before a large body is parsed.

A body announced larger than the limit (``Content-Length``) is refused before a byte of it is
read; any other body (chunked, or a lying ``Content-Length``) is read up to the limit and
refused as soon as it goes over, so at most ``max_bytes`` of it are ever held. A body within
the limit is handed to the app unchanged (buffered, then replayed as one message); the
connection's later messages (``http.disconnect``) still reach the app.

The 413 carries ``Connection: close`` (the rest of the body is not read). The other bounds
(prompt characters and tokens, canvas, stops ...) are checked by ``serve.api.serving`` and
``serve.api.request_params`` once the body is parsed.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from serve.api.protocol import APIError

BODY_METHODS = (b"POST", b"PUT", b"PATCH")


def too_large(limit: int, seen: int | None = None) -> APIError:
    what = f" ({seen} bytes)" if seen is not None else ""
    return APIError(413, f"the request body{what} is larger than this server's limit of {limit} bytes "
                         "(--max-body-bytes)", code="request_too_large")


class BodyLimit:
    def __init__(self, app, *, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"].encode() not in BODY_METHODS:
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
                if length is not None and length > limit:
                    return await self._refuse(too_large(limit, length), scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: let the app see it
                return await self.app(scope, _replay([message], receive), send)
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return await self._refuse(too_large(limit), scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    @staticmethod
    async def _refuse(err: APIError, scope, receive, send):
        response = JSONResponse(err.body(), status_code=err.status, headers={"Connection": "close"})
        await response(scope, receive, send)


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replay():
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
