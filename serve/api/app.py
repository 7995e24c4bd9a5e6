"""FastAPI app factory: routes, OpenAI-shaped errors for everything, API key, X-Request-Id.

No client input may produce FastAPI's ``{"detail": ...}`` body, a 422 or a 500: validation
errors (malformed JSON, wrong types) answer 400 naming the field, unknown routes 404, and a
catch-all handler turns any bug into a 500 in OpenAI's shape without touching the engine.

``api_error`` is the only place where the engine's domain errors (``serve.engine.errors``) become
HTTP statuses and OpenAI error bodies: for the exception handlers here, and for errors a
stream meets after its status line (``serve.api.streaming`` sends the body in-band).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import uuid

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from dllm_jax.sampling import SamplingError
from serve.api.limits import BodyLimit
from serve.api.playground import is_open as playground_path
from serve.api.playground import router as playground_router
from serve.api.protocol import REQUEST_ID, APIError, clip, request_id
from serve.api.rl import router as rl_router
from serve.api.rl_control import router as rl_control_router
from serve.api.routes import router
from serve.api.security import HostCheck
from serve.api.serving import Serving
from serve.engine.engine import Engine
from serve.engine.errors import (
    ClientDisconnected,
    ContextLengthExceeded,
    EngineBusy,
    EngineDead,
    EngineFailed,
    EngineNotReady,
    IncompatibleWeights,
    MemoryReleased,
    QueueFull,
    ServeError,
    WeightUpdateFailed,
    WeightUpdatesDisabled,
)
from serve.engine.metrics import Metrics

log = logging.getLogger("serve")

OPEN_PATHS = ("/health", "/metrics")


def api_error(exc: Exception) -> APIError:
    """The HTTP error for an engine error (an APIError is returned as is; anything else is a 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError(429, f"the queue is full ({exc.waiting} sequences waiting, limit {exc.limit}); retry later",
                        code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, ContextLengthExceeded):
        return APIError(413, f"prompt ({exc.prompt_tokens} tokens) + max_tokens rounded up to whole blocks "
                             f"({exc.gen_length}){exc.room} exceeds the model's context of {exc.context} tokens",
                        param="max_tokens", code="context_length_exceeded")
    # 5xx: the message names the request id, the log keeps the exception text
    if isinstance(exc, EngineNotReady):
        if exc.detail:
            log.error("request %s: %s", request_id(), exc)
            return APIError(503, f"the engine is {exc.state.replace('_', ' ')} ({_see_log()})", code=exc.state)
        return APIError(503, str(exc), code=exc.state)
    if isinstance(exc, EngineDead):
        log.error("request %s: %s", request_id(), exc)
        return APIError(503, f"the engine died ({_see_log()})", code="engine_dead")
    if isinstance(exc, EngineFailed):
        log.error("request %s: %s", request_id(), exc)
        return APIError(500, f"generation failed while {exc.what} ({_see_log()})", code="engine_error")
    if isinstance(exc, ClientDisconnected):
        return APIError(499, str(exc), code="client_disconnected")
    if isinstance(exc, SamplingError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, WeightUpdatesDisabled):
        return APIError(403, str(exc), code="weight_updates_disabled")
    if isinstance(exc, EngineBusy):
        return APIError(400, str(exc), code="engine_busy")
    if isinstance(exc, MemoryReleased):
        return APIError(400, str(exc), code="memory_released")
    if isinstance(exc, IncompatibleWeights):
        return APIError(400, str(exc), param="model_path", code="incompatible_weights")
    if isinstance(exc, WeightUpdateFailed):
        if exc.bad_checkpoint:
            return APIError(400, str(exc), param="model_path", code="invalid_checkpoint")
        log.error("request %s: %s", request_id(), exc)
        return APIError(500, f"could not load weights from {clip(exc.path, 200)} ({_see_log()}); the previous "
                             "weights keep serving", code="weight_update_failed")
    return APIError(500, f"internal error ({_see_log()})", code="internal_error")


def _see_log() -> str:
    return f"request id {clip(request_id())}; the server log has the details"


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def validation_param(loc) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            if not out:
                break  # a position in the raw body, not a field
            out += f"[{p}]"
        elif isinstance(p, str) and p.isidentifier() and p not in ("str", "int", "float", "bool", "list", "dict"):
            out += f".{p}" if out else p
        else:
            break  # pydantic's union / type tags
    return out or None


class RequestContext:
    """Pure ASGI middleware: X-Request-Id echo, API key check, status counting.

    (Not BaseHTTPMiddleware: that one interferes with streaming and disconnect detection.)
    """

    def __init__(self, app, *, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id") or uuid.uuid4().hex
        REQUEST_ID.set(rid)
        status_seen = {}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode("latin-1"))]
                status_seen["status"] = message["status"]
                self.metrics.http_status(message["status"])
            await send(message)

        if self.api_key and scope["path"] not in OPEN_PATHS and not playground_path(scope["path"]):
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                err = APIError(401, "Incorrect API key provided" if token else
                               "Missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
                return await error_response(err)(scope, receive, send_with_id)
        await self.app(scope, receive, send_with_id)


def create_app(engine: Engine, *, api_key: str | None = None, metrics: Metrics | None = None,
               on_shutdown=None, allowed_hosts: frozenset[str] | None = None) -> FastAPI:
    """The app; ``on_shutdown`` runs after the engine stopped (multi-host: jax.distributed.shutdown);
    ``allowed_hosts``: the Host names answered (None: any; ``serve.api.security.allowed_hosts``)."""
    metrics = metrics or engine.metrics
    app = FastAPI(title="dllm-jax", description="OpenAI-compatible server for masked-diffusion LMs",
                  version="0.1.0", lifespan=_lifespan(engine, on_shutdown))
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.serving = Serving(engine, metrics, api_error)
    app.include_router(router)
    app.include_router(rl_router)  # SGLang's native API: /generate
    app.include_router(rl_control_router)  # and the RL control endpoints
    app.include_router(playground_router)  # GET / (the page asks for the key itself)
    _add_error_handlers(app)
    app.add_middleware(HostCheck, allowed=allowed_hosts)  # (inside RequestContext: a 403 has a request id)
    app.add_middleware(BodyLimit, max_bytes=engine.options.max_body_bytes)  # 413 before a large body is read
    app.add_middleware(RequestContext, api_key=api_key, metrics=metrics)
    return app


def _lifespan(engine: Engine, on_shutdown):
    """The app's lifespan: nothing at start (the engine starts itself); the engine stopped at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # Graceful shutdown (SIGTERM/SIGINT): stop the scheduler here, inside uvicorn's
        # shutdown, so multi-host followers get their 'shutdown' command before this process
        # exits (uvicorn re-raises the signal after the lifespan ends).
        await run_in_threadpool(engine.stop)
        if on_shutdown is not None:
            await run_in_threadpool(on_shutdown)

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers in OpenAI's shape (``api_error``), never FastAPI's ``{"detail": ...}``."""

    @app.exception_handler(APIError)
    @app.exception_handler(ServeError)
    @app.exception_handler(SamplingError)
    async def _api_error(request: Request, exc: Exception):
        return error_response(api_error(exc))

    @app.exception_handler(WeightUpdateFailed)
    @app.exception_handler(WeightUpdatesDisabled)
    async def _weights_error(request: Request, exc: Exception):
        # SGLang's clients read {"success", "message"}: sent next to the OpenAI error body
        err = api_error(exc)
        return JSONResponse({**err.body(), "success": False, "message": err.message}, status_code=err.status,
                            headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                           code="invalid_json"))
        param = validation_param(first.get("loc", ()))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid request"))
        if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
            message = ("the request body must be a JSON object (send it with Content-Type: application/json): "
                       + message)
        if first.get("type") == "missing":
            message = f"missing required parameter: {param}" if param else "the request body is empty"
        return error_response(APIError(400, message, param=param, code="invalid_type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(status, str(exc.detail))
        return error_response(APIError(status, message, code={404: "not_found"}.get(status)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s (request id %s)", request.method, request.url.path, request_id())
        return error_response(api_error(exc))  # a 500 internal_error

    # json.JSONDecodeError of a body FastAPI did not parse itself (defensive).
    app.add_exception_handler(json.JSONDecodeError, lambda r, e: error_response(
        APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json")))
