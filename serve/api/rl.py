"""SGLang's native API for RL rollouts: ``POST /generate`` (this module) and the control
endpoints (``serve/api/rl_control.py``).

NeMo-RL's SGLang worker, slime and AReaL drive SGLang through these shapes (``http_server.py``,
``io_struct.py``); these modules speak them over the same engine the OpenAI endpoints use.

``/generate``: the body is checked and translated by ``serve/api/rl_request.py``, then run as one
engine submission. Each answer is SGLang's ``{"text", "output_ids", "meta_info"}``: a matched stop
token stays in ``output_ids`` with its logprob; logprobs are taken at the step a token is
committed, under the distribution it was drawn from (``logprobs_mode='processed'``: docs/api.md
"SGLang's /generate").
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from serve.api.detok import TextStream
from serve.api.field_policy import stop_list
from serve.api.prompts import completion_prompts
from serve.api.protocol import APIError, bad_request, excerpt
from serve.api.rl_request import GenerateRequest, Item, parse
from serve.api.serving import _cancel_on_disconnect
from serve.engine.requests import Event, SeqRequest

router = APIRouter()


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



class GenerateService:
    """``POST /generate`` over the engine (the OpenAI ``Serving`` does the field policy)."""

    def __init__(self, serving):
        self.serving = serving
        self.engine = serving.engine
        self.live: dict[str, tuple[Any, list[int]]] = {}  # rid -> (handle, its row indices)

    async def generate(self, body: GenerateRequest, request: Request):
        info = self.engine.info()
        parsed = parse(body, self.serving, info, self.engine.overrides, self.engine.options.max_queue)
        raw, items, jobs, batch = parsed.raw, parsed.items, parsed.jobs, parsed.batch
        prompts = []
        for (prompt, param) in raw:
            try:
                ids, _ = await run_in_threadpool(completion_prompts, info, prompt)
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
        no_trim = [parsed.no_trim[i] for i, job in enumerate(jobs) for _ in job.params]
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


def service(request: Request) -> GenerateService:
    """The app's GenerateService (made on first use)."""
    app = request.app
    if getattr(app.state, "rl", None) is None:
        app.state.rl = GenerateService(app.state.serving)
    return app.state.rl


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    return await service(request).generate(body, request)
