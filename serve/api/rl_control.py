"""SGLang's control endpoints for RL: pause / continue / abort, decoder defaults, weight version,
health, loads, server and model info, memory release (``serve/api/rl.py`` has ``/generate``).

Pause / continue / abort run on the scheduler thread (``Engine.pause``, ``resume``, ``abort``);
``/reconfigure_dllm`` changes the decoder defaults requests get when they leave a field out
(``Engine.overrides``); the state-changing endpoints need ``--allow-weight-updates``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, PlainTextResponse

from serve.api.protocol import APIError, CompletionRequest, _Strict, bad_request, clip, excerpt
from serve.api.request_params import SELECTION_POLICIES
from serve.api.rl import service
from serve.engine.errors import WeightUpdatesDisabled
from serve.engine.requests import SeqRequest

log = logging.getLogger("serve")
router = APIRouter()

# /reconfigure_dllm: the decoder defaults a request gets when it leaves the field out. Our field
# names, and NeMo-RL's (PR #3167: selection_policy, threshold, tokens_per_step, max_steps).
RECONFIGURABLE = {"algorithm", "threshold", "factor", "remasking", "temperature", "top_k", "top_p", "min_p",
                  "cfg_scale", "early_stop", "selection_policy", "tokens_per_step", "max_steps"}



# ---- control bodies -------------------------------------------------------------------------

class PauseRequest(_Strict):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class AbortRequest(_Strict):
    rid: str | None = ""
    abort_all: bool | None = False


class ReconfigureRequest(_Strict):
    overrides: dict[str, Any]


def _control_allowed(request: Request) -> None:
    """The endpoints that change what other clients get (pause, abort, reconfigure, memory)
    answer 403 on a server started without --allow-weight-updates."""
    if not request.app.state.engine.options.allow_weight_updates:
        raise WeightUpdatesDisabled()


@router.get("/health_generate")
async def health_generate(request: Request):
    """200 once a one-token generation succeeds (while paused: 200 without generating)."""
    engine = request.app.state.engine
    ready, state = engine.health()
    if not ready:
        err = APIError(503, f"the engine is {state.replace('_', ' ')}", code=state)
        return JSONResponse(err.body(), status_code=503)
    if engine.pause_mode is not None or engine.released:
        return PlainTextResponse("")
    info = engine.info()
    job = request.app.state.serving._job("completion", CompletionRequest.model_validate(
        {"prompt": [0], "max_tokens": 1, "temperature": 0.0}))
    prompt = [int(info.stop_token_ids[0]) if info.stop_token_ids else 0]
    handle = engine.submit([SeqRequest(prompt, job.params[0], 1)])
    try:
        while not (await asyncio.wait_for(handle.next(), timeout=60)).done:
            pass
    except Exception:  # noqa: BLE001 - unhealthy: 503 (the log has the detail)
        handle.cancel()
        log.exception("health_generate failed")
        err = APIError(503, "the health generation failed", code="unhealthy")
        return JSONResponse(err.body(), status_code=503)
    return PlainTextResponse("")


@router.get("/get_weight_version")
async def get_weight_version(request: Request):
    return {"weight_version": request.app.state.engine.weights().label or "default"}


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request):
    """No cache outlives a request here: 200 when no sequence runs or waits (or, paused with
    mode retract/abort, none runs in place), else 400 (SGLang's answer: clients retry)."""
    engine = request.app.state.engine
    counts = await engine.counts()
    busy = counts["waiting"] + counts["running"] if engine.pause_mode in (None, "in_place") else 0
    if busy:
        return PlainTextResponse(f"Cache not flushed: {counts['running']} running and {counts['waiting']} waiting "
                                 "requests. Retry when idle.\n", status_code=400)
    return PlainTextResponse("Cache flushed.\n")


@router.post("/pause_generation", dependencies=[Depends(_control_allowed)])
async def pause_generation(body: PauseRequest, request: Request):
    n = await request.app.state.engine.pause(body.mode)
    return {"message": "Generation paused successfully.", "status": "ok",
            ("num_aborted_requests" if body.mode == "abort" else "num_paused_requests"): n}


@router.post("/continue_generation", dependencies=[Depends(_control_allowed)])
async def continue_generation(request: Request):
    await request.app.state.engine.resume()
    return {"message": "Generation continued successfully.", "status": "ok"}


@router.post("/abort_request", dependencies=[Depends(_control_allowed)])
async def abort_request(body: AbortRequest, request: Request):
    n = await service(request).abort(body.rid, bool(body.abort_all))
    return {"success": True, "num_aborted": n}


@router.post("/reconfigure_dllm", dependencies=[Depends(_control_allowed)])
async def reconfigure_dllm(body: ReconfigureRequest, request: Request):
    """Set decoder defaults (``overrides``: field -> value; null removes one). ``previous`` holds
    each given field's value before (null: it was not set), so sending it back restores them."""
    engine = request.app.state.engine
    current = dict(engine.overrides)
    new = dict(current)
    for key, value in body.overrides.items():
        if key not in RECONFIGURABLE:
            raise bad_request(f"{clip(key)} cannot be reconfigured (allowed: {', '.join(sorted(RECONFIGURABLE))})",
                              f"overrides.{clip(key)}")
        if value is None:
            new.pop(key, None)
        else:
            new[key] = value
    _check_overrides(request.app.state.serving, new)
    engine.overrides = new
    previous = {key: current.get(key) for key in body.overrides}
    return {"success": True, "message": f"decoder defaults: {json.dumps(new, sort_keys=True)}",
            "previous": previous}


def _check_overrides(serving, overrides: dict) -> None:
    """A request with these defaults must validate (a bad value: 400 naming overrides.<field>)."""
    for key in ("tokens_per_step", "max_steps"):
        value = overrides.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 2**20):
            raise bad_request(f"{key}={excerpt(value)} must be an integer >= 1", f"overrides.{key}")
    policy = overrides.get("selection_policy")
    if policy is not None and policy not in SELECTION_POLICIES:
        raise bad_request(f"selection_policy={excerpt(policy)} must be one of {', '.join(SELECTION_POLICIES)}",
                          "overrides.selection_policy")
    fields = {k: v for k, v in overrides.items() if k not in ("tokens_per_step", "max_steps", "selection_policy")}
    try:
        req = CompletionRequest.model_validate({"prompt": [0], **fields})
    except ValidationError as e:
        first = e.errors()[0]
        name = next((str(x) for x in first.get("loc", ()) if isinstance(x, str)), "overrides")
        raise bad_request(f"overrides.{name}: {first.get('msg')}", f"overrides.{name}", "invalid_type") from None
    saved = serving.engine.overrides
    try:
        serving.engine.overrides = overrides
        serving._job("completion", req)
    except APIError as e:
        e.param = f"overrides.{e.param}" if e.param else "overrides"
        raise
    finally:
        serving.engine.overrides = saved


@router.get("/model_info")
@router.get("/get_model_info")
async def get_model_info(request: Request):
    engine = request.app.state.engine
    info = engine.info()
    return {"model_path": info.source, "tokenizer_path": info.source, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": engine.weights().label or "default",
            "has_image_understanding": False, "has_audio_understanding": False, "model_type": info.family,
            "architectures": None, "served_model_names": list(info.names)}


@router.get("/server_info")
@router.get("/get_server_info")
async def get_server_info(request: Request):
    engine = request.app.state.engine
    info = engine.info()
    o = engine.options
    return {"model_path": info.source, "served_model_name": info.names[0], "context_length": info.max_length,
            "max_running_requests": o.max_batch_size,
            "max_queued_requests": o.max_queue, "mesh": info.mesh, "family": info.family,
            "weight_version": engine.weights().label or "default", "paused": engine.pause_mode,
            "decoder_overrides": dict(engine.overrides), "allow_weight_updates": o.allow_weight_updates,
            "version": request.app.version}


@router.get("/v1/loads")
async def loads(request: Request):
    """SGLang's load report (slime polls it after ``abort_request {abort_all}`` until idle)."""
    counts = await request.app.state.engine.counts()
    return {"timestamp": time.time(), "version": request.app.version,
            "loads": [{"dp_rank": 0, "num_running_reqs": counts["running"], "num_waiting_reqs": counts["waiting"],
                       "num_total_reqs": counts["running"] + counts["waiting"]}]}


@router.post("/update_weights_from_tensor")
@router.post("/update_weights_from_distributed")
async def update_weights_unsupported(request: Request):
    """SGLang's tensor / NCCL refits carry pickled torch tensors (CUDA IPC handles) or need a torch
    process group: not something a JAX server can (or, for pickles, may) take."""
    raise APIError(400, f"{request.url.path} is not supported: this server never unpickles request data and has no "
                        "torch process group; write the weights to disk (POST /update_weights_from_disk) or, in "
                        "the same process, call Engine.update_params", code="unsupported_endpoint")


class MemoryRequest(_Strict):
    """SGLang's ``ReleaseMemoryOccupationReqInput`` / ``ResumeMemoryOccupationReqInput``."""

    tags: list[str] | None = None


MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


async def _memory_body(request: Request) -> MemoryRequest:
    raw = await request.body()
    try:
        body = MemoryRequest.model_validate(json.loads(raw) if raw.strip() else {})
    except (ValueError, ValidationError):
        raise bad_request("the body must be {} or {\"tags\": [...]}", "tags") from None
    bad = [t for t in body.tags or () if t not in MEMORY_TAGS]
    if bad:
        raise bad_request(f"unknown memory tag {excerpt(bad[0])} (known: {', '.join(MEMORY_TAGS)})", "tags")
    return body


@router.api_route("/release_memory_occupation", methods=["GET", "POST"], dependencies=[Depends(_control_allowed)])
async def release_memory_occupation(request: Request):
    """Weights to host memory, device buffers freed (``Engine.release_memory``); new requests wait
    until resume. Tags: 'weights' (and none: all) release the weights; 'kv_cache' / 'cuda_graph'
    name nothing that outlives a request here. 400 while rows run (pause first)."""
    body = await _memory_body(request)
    if body.tags is not None and "weights" not in body.tags:
        return {"success": True, "message": "nothing to release for these tags (no cache outlives a request)"}
    return await request.app.state.engine.release_memory()


@router.api_route("/resume_memory_occupation", methods=["GET", "POST"], dependencies=[Depends(_control_allowed)])
async def resume_memory_occupation(request: Request):
    body = await _memory_body(request)
    if body.tags is not None and "weights" not in body.tags:
        return {"success": True, "message": "nothing to resume for these tags (no cache outlives a request)"}
    return await request.app.state.engine.resume_memory()
