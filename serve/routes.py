"""Thin routes: parse (pydantic), hand to ``Serving`` / the engine found on ``app.state``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from serve import responses
from serve.request_params import aliases, algorithm_names, family_defaults
from serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await request.app.state.serving.chat(body, request)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return await request.app.state.serving.completion(body, request)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    return await run_in_threadpool(request.app.state.serving.tokenize, body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    return await run_in_threadpool(request.app.state.serving.detokenize, body)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    return request.app.state.serving.tokenizer_info()


@router.get("/v1/models")
async def models(request: Request):
    info = request.app.state.engine.info()
    extra = {"family": info.family, "max_model_len": info.max_length, "demo": info.demo,
             "source": info.source, "mesh": info.mesh, "defaults": family_defaults(info.family),
             "algorithms": algorithm_names(info.family), "algorithm_aliases": aliases(info.family)}
    return {"object": "list", "data": [responses.model_card(name, info.created, extra) for name in info.names]}


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
