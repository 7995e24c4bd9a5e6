"""Thin routes: parse (pydantic), hand to ``Serving`` / the engine found on ``app.state``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from serve.api import responses
from serve.api.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    UpdateWeightsRequest,
)
from serve.api.request_params import aliases, algorithm_names, family_defaults
from serve.engine.errors import WeightUpdatesDisabled

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await request.app.state.serving.chat(body, request)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return await request.app.state.serving.completion(body, request)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    # tokenized and rendered to JSON off the event loop (a long prompt's id list is large)
    return await run_in_threadpool(lambda: JSONResponse(request.app.state.serving.tokenize(body)))


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    return await run_in_threadpool(lambda: JSONResponse(request.app.state.serving.detokenize(body)))


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    return request.app.state.serving.tokenizer_info()


@router.get("/v1/models")
async def models(request: Request):
    info = request.app.state.engine.info()
    extra = {"family": info.family, "max_model_len": info.max_length, "demo": info.demo,
             "source": info.source, "mesh": info.mesh, "defaults": family_defaults(info.family),
             "algorithms": algorithm_names(info.family), "algorithm_aliases": aliases(info.family)}
    extra.update(request.app.state.engine.weights().card())  # the current weights: source, version, loaded_at
    return {"object": "list", "data": [responses.model_card(name, info.created, extra) for name in info.names]}


def _weight_updates_allowed(request: Request) -> None:
    """403 before the body is looked at, on a server started without --allow-weight-updates."""
    if not request.app.state.engine.options.allow_weight_updates:
        raise WeightUpdatesDisabled()


@router.post("/update_weights_from_disk", dependencies=[Depends(_weight_updates_allowed)])
async def update_weights_from_disk(body: UpdateWeightsRequest, request: Request):
    """SGLang's endpoint: new weights of the running architecture, no restart, no recompile."""
    body.check()
    engine = request.app.state.engine
    if body.abort_all_requests:
        await engine.abort(None, "Aborted")
    out = await engine.update_weights(body.model_path, label=body.weight_version)
    # requests in flight keep running on the version they started on: none is paused
    return {**out, "num_paused_requests": 0}


@router.get("/health")
async def health(request: Request):
    ready, state = request.app.state.engine.health()
    if ready:
        return {"status": "ok"}
    err = APIError(503, f"the engine is {state.replace('_', ' ')}", code=state)
    return JSONResponse({**err.body(), "status": state}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
