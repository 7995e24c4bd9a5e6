"""SGLang's native API for RL rollouts: ``POST /generate`` and the control endpoints.

NeMo-RL's SGLang worker, slime and AReaL drive SGLang through these shapes (``http_server.py``,
``io_struct.py``); this module speaks them over the same engine the OpenAI endpoints use.

``/generate``: the body's ``sampling_params`` become the OpenAI/diffusion fields of a
``CompletionRequest`` (``max_new_tokens`` -> ``max_tokens``, ``sampling_seed`` -> ``seed``,
``no_stop_trim`` -> keep the stop string in ``text``), validated by the same field policy (a
400 names the SGLang field), then run as one engine submission. Each answer is SGLang's
``{"text", "output_ids", "meta_info"}``: a matched stop token stays in ``output_ids`` with its
logprob; logprobs are taken at the step a token is committed, under the distribution it was
drawn from (``logprobs_mode='processed'``: docs/api.md "SGLang's /generate").

Control: pause / continue / abort run on the scheduler thread (``Engine.pause``, ``resume``,
``abort``); ``/reconfigure_dllm`` changes the decoder defaults requests get when they leave a
field out (``Engine.overrides``); the state-changing endpoints need ``--allow-weight-updates``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse

from serve.detok import TextStream
from serve.errors import WeightUpdatesDisabled
from serve.protocol import (
    MAX_TOP_LOGPROBS,
    APIError,
    CompletionRequest,
    _Strict,
    bad_request,
    clip,
    excerpt,
    stop_list,
)
from serve.request_params import SELECTION_POLICIES
from serve.requests import Event, SeqRequest
from serve.serving import MAX_ROWS_PER_REQUEST, _cancel_on_disconnect, _check_chars

log = logging.getLogger("serve")
router = APIRouter()

# SGLang sampling_params -> our request field (the others keep their name)
RENAMED = {"max_new_tokens": "max_tokens", "sampling_seed": "seed", "min_new_tokens": "min_tokens"}
BACK = {v: k for k, v in RENAMED.items()}
# SGLang sampling_params we take (OpenAI/vLLM names, then the diffusion knobs)
SAMPLING = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos",
            "no_stop_trim", "skip_special_tokens", "spaces_between_special_tokens", "sampling_seed", "n",
            "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "logit_bias",
            "steps", "block_length", "algorithm", "generation_algorithm", "remasking", "threshold", "factor",
            "cfg_scale", "early_stop", "shift_logits", "logprobs_mode"}
# accepted at their neutral value only (constrained decoding and custom processors do not exist here)
NEUTRAL = {"json_schema": "structured output (json_schema) is not supported",
           "regex": "constrained decoding (regex) is not supported",
           "ebnf": "constrained decoding (ebnf) is not supported",
           "structural_tag": "structural_tag is not supported",
           "custom_params": "custom_params (custom logit processors) are not supported",
           "stop_regex": "stop_regex is not supported; use stop strings"}
IGNORED = {"stream_interval"}  # streaming goes by finished diffusion blocks
SGLANG_TEMPERATURE = 1.0       # SGLang's default when sampling_params has no temperature

# /reconfigure_dllm: the decoder defaults a request gets when it leaves the field out. Our field
# names, and NeMo-RL's (PR #3167: selection_policy, threshold, tokens_per_step, max_steps).
RECONFIGURABLE = {"algorithm", "threshold", "factor", "remasking", "temperature", "top_k", "top_p", "min_p",
                  "cfg_scale", "early_stop", "selection_policy", "tokens_per_step", "max_steps"}


class GenerateRequest(_Strict):
    """SGLang's ``GenerateReqInput`` (the fields that apply to a text-only diffusion model)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool | None = None
    rid: str | list[str] | None = None
    stream: bool | None = None
    return_commit_steps: bool | None = None


# Accepted at these values only (multimodal inputs, LoRA, hidden states, ... do not exist here).
_NEUTRAL_TOP = ("image_data", "video_data", "audio_data", "lora_path", "lora_id", "custom_logit_processor",
                "return_hidden_states", "input_embeds", "session_params", "token_ids_logprob")
_IGNORED_TOP = {"log_metrics", "modalities", "data_parallel_rank", "bootstrap_host", "bootstrap_port",
                "bootstrap_room", "priority", "routed_dp_rank", "external_trace_header", "return_bytes",
                "return_routed_experts", "routing_key", "extra_key"}


@dataclasses.dataclass
class Item:
    """One prompt of a /generate body, with its own fields."""

    index: int
    prompt: list[int]
    sampling: dict
    return_logprob: bool
    logprob_start_len: int
    top_logprobs_num: int
    rid: str


def _per_item(value, i: int, n: int, name: str, default):
    if isinstance(value, list):
        if len(value) != n:
            raise bad_request(f"{name} has {len(value)} entries for {n} prompts", name)
        value = value[i]
    return default if value is None else value


def _check_top(body: GenerateRequest) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in _IGNORED_TOP:
            continue
        if name in _NEUTRAL_TOP:
            if value not in (None, False, [], {}, ""):
                raise bad_request(f"{name} is not supported by this server (text-only diffusion models)", name,
                                  "unsupported_parameter")
            continue
        raise bad_request(f"Unrecognized request argument supplied: {clip(name)}", clip(name), "unrecognized_argument")
    if (body.text is None) == (body.input_ids is None):
        raise bad_request("give exactly one of text and input_ids", "input_ids" if body.input_ids else "text")


def _request_fields(sp: dict, overrides: dict, param: str) -> tuple[dict, bool]:
    """SGLang sampling_params -> CompletionRequest fields, and no_stop_trim."""
    fields: dict = {}
    no_stop_trim = False
    for key, value in sp.items():
        name = f"{param}.{key}"
        if key in IGNORED:
            continue
        if key in NEUTRAL:
            if value not in (None, "", {}, []):
                raise bad_request(f"{NEUTRAL[key]} (got {key}={excerpt(value)})", name, "unsupported_parameter")
            continue
        if key not in SAMPLING:
            raise bad_request(f"Unrecognized sampling parameter: {clip(key)}", f"{param}.{clip(key)}",
                              "unrecognized_argument")
        if key == "no_stop_trim":
            if value is not None and not isinstance(value, bool):
                raise bad_request("no_stop_trim must be a boolean", name)
            no_stop_trim = bool(value)
            continue
        if key == "logit_bias" and value in (None, {}):
            continue
        if value is None:
            continue
        fields[RENAMED.get(key, key)] = value
    if "temperature" not in fields and "temperature" not in overrides:
        fields["temperature"] = SGLANG_TEMPERATURE
    if "logprobs_mode" in CompletionRequest.model_fields:  # RL: the distribution the token was drawn from
        fields.setdefault("logprobs_mode", "processed")
    return fields, no_stop_trim


def _rename(err: APIError, param: str) -> APIError:
    """An error about one of our field names, told in SGLang's (``sampling_params.max_new_tokens``)."""
    name = err.param
    if name is None or name.startswith(("input_ids", "text", "prompt")):
        return err
    sg = BACK.get(name, name)
    err.param = f"{param}.{sg}"
    if sg != name:
        err.message = err.message.replace(name, sg)
    return err


class Rollout:
    """The sequences of one /generate body in flight: events in, SGLang answers out."""

    def __init__(self, serving, info, items: list[Item], jobs: list, handle, no_trim: list[bool],
                 commit_steps: bool, weights_label: str, text_logprobs: bool):
        self.serving, self.info, self.items, self.jobs, self.handle = serving, info, items, jobs, handle
        self.no_trim, self.commit_steps, self.label = no_trim, commit_steps, weights_label
        self.text_logprobs = text_logprobs
        self.rows = [(item, job, j) for item, job in zip(items, jobs) for j in range(len(job.params))]
        self.streams = [TextStream(info.tokenizer, stop_list(job.req.stop),
                                   skip_special_tokens=job.req.skip_special_tokens is not False, include_stop=True)
                        if info.tokenizer is not None else None for item, job, _ in self.rows]
        self.last: list[Event | None] = [None] * len(self.rows)
        self.finished: list[bool] = [False] * len(self.rows)
        self.prompt_lp: dict[int, tuple[list, list | None]] = {}
        self.t0 = time.monotonic()

    @property
    def done(self) -> bool:
        return all(self.finished)

    def apply(self, ev: Event) -> int:
        """Take one event; returns its row."""
        i = ev.index
        if self.finished[i]:
            return i
        self.last[i] = ev
        ts = self.streams[i]
        if ts is not None:
            ts.update(ev.tokens, ev.done)
            if ts.stopped and not ev.done:
                self.handle.cancel(i)  # a stop string ended it: free the slot at the next block
        self.finished[i] = ev.done or bool(ts is not None and ts.stopped)
        return i

    def answer(self, i: int) -> dict:
        item, job, j = self.rows[i]
        ev, ts = self.last[i], self.streams[i]
        tokens = [] if ev is None else [int(t) for t in ev.tokens]
        lps = None if ev is None or ev.logprobs is None else [float(x) for x in ev.logprobs]
        steps = None if ev is None or ev.commit_step is None else [int(x) for x in ev.commit_step]
        tops = None
        if ev is not None and ev.top_ids is not None and item.top_logprobs_num:
            k = item.top_logprobs_num
            tops = [[[float(lp), int(t), None] for lp, t in zip(ev.top_logprobs[p][:k], ev.top_ids[p][:k])]
                    for p in range(len(tokens))]
        text = ""
        if ts is not None and ts.stopped:  # a stop string: the ids up to the token completing it
            n = ts.n_tokens
            tokens = tokens[:n]
            lps, steps = (None if lps is None else lps[:n]), (None if steps is None else steps[:n])
            tops = None if tops is None else tops[:n]
            text = ts.text if self.no_trim[i] else ts.text[:len(ts.text) - len(ts.matched or "")]
            finish = {"type": "stop", "matched": ts.matched}
        elif ev is not None and ev.finish_reason == "abort":
            text = ts.decode(tokens) if ts is not None else ""
            finish = {"type": "abort", "message": ev.message or "aborted"}
        elif ev is not None and ev.finish_reason == "stop" and ev.stop_id is not None \
                and len(tokens) < job.max_tokens:
            text = ts.decode(tokens + [ev.stop_id] if self.no_trim[i] else tokens) if ts is not None else ""
            tokens.append(ev.stop_id)  # SGLang keeps the matched stop token, with its logprob
            if lps is not None:
                lps.append(float(ev.stop_logprob) if ev.stop_logprob is not None else None)
            if steps is not None:
                steps.append(ev.stop_commit_step)
            if tops is not None:
                tops.append([])
            finish = {"type": "stop", "matched": ev.stop_id}
        else:
            text = ts.decode(tokens) if ts is not None else ""
            finish = {"type": "length", "length": job.max_tokens}
        meta = {"id": item.rid if len(job.params) == 1 else f"{item.rid}-{j}", "finish_reason": finish,
                "prompt_tokens": len(item.prompt), "completion_tokens": len(tokens), "cached_tokens": 0,
                "weight_version": self.label, "e2e_latency": round(time.monotonic() - self.t0, 6),
                "num_retractions": 0, "nfe": 0 if ev is None else ev.nfe}
        if item.return_logprob:
            tt = self._token_text if self.text_logprobs else (lambda t: None)
            meta["output_token_logprobs"] = [[lp, t, tt(t)] for lp, t in zip(lps or [None] * len(tokens), tokens)]
            if item.top_logprobs_num:
                meta["output_top_logprobs"] = tops or [[] for _ in tokens]
            if item.index in self.prompt_lp:
                inp, inp_top = self.prompt_lp[item.index]
                meta["input_token_logprobs"] = [[lp, t, tt(t)] for lp, t in inp]
                if inp_top is not None:
                    meta["input_top_logprobs"] = inp_top
        if self.commit_steps:
            meta["commit_steps"] = steps if steps is not None else []
        return {"text": text, "output_ids": tokens, "meta_info": meta}

    def _token_text(self, t: int) -> str:
        return self.info.tokenizer.decode([t], skip_special_tokens=False) if self.info.tokenizer is not None else ""


def _items(body: GenerateRequest) -> list[tuple[list[int] | str, str]]:
    """(prompt ids or text, its param name) per prompt of the body."""
    if body.input_ids is not None:
        ids = body.input_ids
        if ids and isinstance(ids[0], list):
            return [(p, f"input_ids[{i}]") for i, p in enumerate(ids)]
        return [(ids, "input_ids")]
    text = body.text
    if isinstance(text, list):
        return [(t, f"text[{i}]") for i, t in enumerate(text)]
    return [(text, "text")]


class GenerateService:
    """``POST /generate`` over the engine (the OpenAI ``Serving`` does the field policy)."""

    def __init__(self, serving):
        self.serving = serving
        self.engine = serving.engine
        self.live: dict[str, tuple[Any, list[int]]] = {}  # rid -> (handle, its row indices)

    async def generate(self, body: GenerateRequest, request: Request):
        _check_top(body)
        info = self.engine.info()
        raw = _items(body)
        batch = isinstance(body.input_ids, list) and body.input_ids and isinstance(body.input_ids[0], list) \
            or isinstance(body.text, list)
        n_items = len(raw)
        if n_items == 0:
            raise bad_request("no prompt given", "input_ids" if body.input_ids is not None else "text")
        if n_items > MAX_ROWS_PER_REQUEST:
            raise bad_request(f"{n_items} prompts exceed {MAX_ROWS_PER_REQUEST} per request",
                              "input_ids" if body.input_ids is not None else "text")
        sps = body.sampling_params
        rids = body.rid
        if isinstance(rids, list) and len(rids) != n_items:
            raise bad_request(f"rid has {len(rids)} entries for {n_items} prompts", "rid")
        overrides = self.engine.overrides
        jobs, items, no_trim_items = [], [], []
        for i, (prompt, param) in enumerate(raw):
            sp = _per_item(sps, i, n_items, "sampling_params", {})
            if not isinstance(sp, dict):
                raise bad_request("sampling_params must be an object", "sampling_params")
            sparam = "sampling_params" if not isinstance(sps, list) else f"sampling_params[{i}]"
            fields, no_trim = _request_fields(sp, overrides, sparam)
            want_lp = bool(_per_item(body.return_logprob, i, n_items, "return_logprob", False))
            k = int(_per_item(body.top_logprobs_num, i, n_items, "top_logprobs_num", 0))
            start = int(_per_item(body.logprob_start_len, i, n_items, "logprob_start_len", -1))
            if not 0 <= k <= MAX_TOP_LOGPROBS:
                raise bad_request(f"top_logprobs_num={excerpt(k)} must be between 0 and {MAX_TOP_LOGPROBS}",
                                  "top_logprobs_num")
            if start < -1:
                raise bad_request(f"logprob_start_len={excerpt(start)} must be -1 (no prompt logprobs) or >= 0",
                                  "logprob_start_len")
            if want_lp:
                fields["logprobs"] = k
            if isinstance(prompt, str):
                _check_chars(info, len(prompt), param)
            try:
                req = CompletionRequest.model_validate({"prompt": prompt, **fields})
            except ValidationError as e:
                first = e.errors()[0]
                loc = [str(x) for x in first.get("loc", ()) if isinstance(x, str)]
                name = loc[0] if loc else "sampling_params"
                name = "input_ids" if name == "prompt" else f"{sparam}.{BACK.get(name, name)}"
                raise bad_request(f"{name}: {first.get('msg')}", name, "invalid_type") from None
            try:
                job = self.serving._job("completion", req)
            except APIError as e:
                raise _rename(e, sparam) from None
            rid = rids[i] if isinstance(rids, list) else (rids if isinstance(rids, str) and n_items == 1 else None)
            if rid is None:
                rid = uuid.uuid4().hex if not isinstance(rids, str) else f"{rids}-{i}"
            items.append(Item(i, [], sp, want_lp, start, k, rid))
            jobs.append(job)
            no_trim_items.append(no_trim)
        rows = sum(len(j.params) for j in jobs)
        limit = min(MAX_ROWS_PER_REQUEST, self.engine.options.max_queue)
        if rows > limit:
            raise bad_request(f"{n_items} prompts x n are {rows} sequences; one request may have at most {limit} "
                              "(this server's queue or per-request limit)", "sampling_params.n", "too_many_sequences")
        prompts = []
        for (prompt, param) in raw:
            try:
                ids, _ = await run_in_threadpool(self.serving._completion_prompts, info, prompt)
            except APIError as e:
                e.param = param
                raise
            prompts.append(ids[0])
        for item, ids in zip(items, prompts):
            item.prompt = ids
        for item in items:
            if item.rid in self.live:
                raise bad_request(f"rid {excerpt(item.rid)} is already running", "rid", "duplicate_rid")
        weights = self.engine.weights()
        label = weights.label or "default"
        want_steps = bool(body.return_commit_steps) or any(it.return_logprob for it in items)
        seqs = []
        for item, job in zip(items, jobs):
            for p in job.params:
                if want_steps:
                    p = dataclasses.replace(p, trace=True)
                seqs.append(SeqRequest(item.prompt, p, job.max_tokens))
        prompt_lp = {}
        for item in items:  # prompt logprobs (SGLang: logprob_start_len >= 0), on the same weights
            if item.return_logprob and item.logprob_start_len >= 0:
                prompt_lp[item.index] = await self._prompt_logprobs(item, weights)
        handle = self.engine.submit(seqs, weights=weights)
        self.serving.metrics.inc("prompt_tokens_total", sum(len(it.prompt) for it in items))
        no_trim = [no_trim_items[i] for i, job in enumerate(jobs) for _ in job.params]
        roll = Rollout(self.serving, info, items, jobs, handle, no_trim, want_steps, label,
                       bool(body.return_text_in_logprobs))
        roll.prompt_lp = prompt_lp
        row_ids = {}
        for r, (item, _, _) in enumerate(roll.rows):
            row_ids.setdefault(item.rid, []).append(r)
        for rid, rs in row_ids.items():
            self.live[rid] = (handle, rs)
        multiple = batch or len(roll.rows) > 1
        if body.stream:
            return StreamingResponse(self._stream(roll, row_ids, multiple), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        try:
            while not roll.done:
                roll.apply(await handle.next())
        except BaseException:
            handle.cancel()
            raise
        finally:
            watcher.cancel()
            self._forget(row_ids)
        out = [roll.answer(i) for i in range(len(roll.rows))]
        for o in out:
            self.serving.metrics.finished(o["meta_info"]["finish_reason"]["type"], o["meta_info"]["completion_tokens"])
        return out if multiple else out[0]

    async def _stream(self, roll: Rollout, row_ids: dict, multiple: bool) -> AsyncIterator[str]:
        """SSE: ``data: {answer so far}`` (cumulative text and ids, SGLang's default) per change, then [DONE]."""
        try:
            while not roll.done:
                try:
                    ev = await roll.handle.next()
                except Exception as e:  # noqa: BLE001 - an engine error: in-band, then [DONE]
                    err = self.serving.errors(e)
                    yield "data: " + json.dumps(err.body(), separators=(",", ":")) + "\n\n"
                    break
                i = roll.apply(ev)
                body = roll.answer(i)
                body["index"] = i
                if roll.finished[i]:
                    meta = body["meta_info"]
                    self.serving.metrics.finished(meta["finish_reason"]["type"], meta["completion_tokens"])
                else:
                    body["meta_info"]["finish_reason"] = None
                yield "data: " + json.dumps(body, separators=(",", ":")) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not roll.done:
                roll.handle.cancel()
            self._forget(row_ids)

    def _forget(self, row_ids: dict) -> None:
        for rid in row_ids:
            self.live.pop(rid, None)

    async def _prompt_logprobs(self, item: Item, weights) -> tuple[list, list | None]:
        """SGLang's input_token_logprobs from ``logprob_start_len``: [logprob, id, None], the
        first prompt token's logprob None (nothing precedes it)."""
        p = item.prompt
        limit = self.engine.options.max_score_tokens
        if len(p) - 1 > limit:
            raise APIError(413, f"scoring this prompt costs {len(p) - 1} positions; this server scores at most "
                                f"{limit} per request (--max-score-tokens)", param="logprob_start_len",
                           code="too_many_score_tokens")
        sc = (await self.engine.score([p], top_k=item.top_logprobs_num, weights=weights))[0]
        start = min(item.logprob_start_len, len(p))
        out = [[None if i == 0 else float(sc.token_logprobs[i]), int(p[i])] for i in range(start, len(p))]
        tops = None
        if item.top_logprobs_num:
            k = item.top_logprobs_num
            tops = [None if i == 0 else [[float(lp), int(t), None] for lp, t in zip(sc.top_logprobs[i][:k],
                                                                                   sc.top_ids[i][:k])]
                    for i in range(start, len(p))]
        return out, tops

    async def abort(self, rid: str | None, abort_all: bool) -> int:
        if abort_all:
            return await self.engine.abort(None, "Aborted")
        entry = self.live.get(rid) if rid else None
        if entry is None:
            return 0
        handle, rows = entry
        return await self.engine.abort([handle.seq_ids[r] for r in rows], "Aborted")


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


def _service(request: Request) -> GenerateService:
    app = request.app
    if getattr(app.state, "rl", None) is None:
        app.state.rl = GenerateService(app.state.serving)
    return app.state.rl


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    return await _service(request).generate(body, request)


@router.get("/health_generate")
async def health_generate(request: Request):
    """200 once a one-token generation succeeds (while paused: 200 without generating)."""
    engine = request.app.state.engine
    ready, state = engine.health()
    if not ready:
        err = APIError(503, f"the engine is {state.replace('_', ' ')}", code=state)
        return JSONResponse(err.body(), status_code=503)
    if engine.pause_mode is not None or getattr(engine, "released", False):
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
    n = await _service(request).abort(body.rid, bool(body.abort_all))
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
            "max_running_requests": o.max_batch if hasattr(o, "max_batch") else None,
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
