"""SGLang's ``POST /generate`` body, checked and translated into the OpenAI requests it runs as.

The body's ``sampling_params`` become the OpenAI/diffusion fields of a ``CompletionRequest``
(``max_new_tokens`` -> ``max_tokens``, ``sampling_seed`` -> ``seed``, ``no_stop_trim`` -> keep the
stop string in ``text``), validated by the same field policy as ``/v1/completions``; a 400 names the
SGLang field (``sampling_params.max_new_tokens``). Everything here is checked before any prompt is
tokenized or any work is queued (``serve/api/rl.py`` runs what ``parse`` returns).
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from pydantic import ValidationError

from dllm_jax.sampling import MAX_TOP_LOGPROBS
from serve.api.prompts import check_chars
from serve.api.protocol import APIError, CompletionRequest, _Strict, bad_request, clip, excerpt
from serve.api.serving import MAX_ROWS_PER_REQUEST

RENAMED = {"max_new_tokens": "max_tokens", "sampling_seed": "seed", "min_new_tokens": "min_tokens"}
BACK = {v: k for k, v in RENAMED.items()}
# SGLang sampling_params we take (OpenAI/vLLM names, then the diffusion knobs)
SAMPLING = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos",
            "no_stop_trim", "skip_special_tokens", "spaces_between_special_tokens", "sampling_seed", "n",
            "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "logit_bias",
            "steps", "block_length", "algorithm", "generation_algorithm", "remasking", "threshold", "factor", "entropy_bound",
            "block_add_threshold", "cfg_scale", "early_stop", "shift_logits", "logprobs_mode"}
# accepted at their neutral value only (constrained decoding and custom processors do not exist here)
NEUTRAL = {"json_schema": "structured output (json_schema) is not supported",
           "regex": "constrained decoding (regex) is not supported",
           "ebnf": "constrained decoding (ebnf) is not supported",
           "structural_tag": "structural_tag is not supported",
           "custom_params": "custom_params (custom logit processors) are not supported",
           "stop_regex": "stop_regex is not supported; use stop strings"}
IGNORED = {"stream_interval"}  # streaming goes by finished diffusion blocks
SGLANG_TEMPERATURE = 1.0       # SGLang's default when sampling_params has no temperature


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


def per_item(value, i: int, n: int, name: str, default):
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



@dataclasses.dataclass
class Parsed:
    """A checked /generate body: its prompts (ids or text, with their param names), one item and
    one OpenAI job per prompt, and whether the answer is a list."""

    raw: list[tuple[list[int] | str, str]]
    items: list[Item]
    jobs: list
    no_trim: list[bool]   # per item: keep the stop string in text (SGLang's no_stop_trim)
    batch: bool


def parse(body: GenerateRequest, serving, info, overrides: dict, max_queue: int) -> Parsed:
    """Every field of the body checked (a 400 naming it); no prompt is tokenized yet."""
    _check_top(body)
    raw = _items(body)
    batch = bool(isinstance(body.input_ids, list) and body.input_ids and isinstance(body.input_ids[0], list)
                 or isinstance(body.text, list))
    n_items = len(raw)
    if n_items == 0:
        raise bad_request("no prompt given", "input_ids" if body.input_ids is not None else "text")
    if n_items > MAX_ROWS_PER_REQUEST:
        raise bad_request(f"{n_items} prompts exceed {MAX_ROWS_PER_REQUEST} per request",
                          "input_ids" if body.input_ids is not None else "text")
    if isinstance(body.rid, list) and len(body.rid) != n_items:
        raise bad_request(f"rid has {len(body.rid)} entries for {n_items} prompts", "rid")
    out = Parsed(raw, [], [], [], batch)
    for i, (prompt, param) in enumerate(raw):
        item, job, no_trim = _item(body, i, n_items, prompt, param, serving, info, overrides)
        out.items.append(item)
        out.jobs.append(job)
        out.no_trim.append(no_trim)
    rows = sum(len(j.params) for j in out.jobs)
    limit = min(MAX_ROWS_PER_REQUEST, max_queue)
    if rows > limit:
        raise bad_request(f"{n_items} prompts x n are {rows} sequences; one request may have at most {limit} "
                          "(this server's queue or per-request limit)", "sampling_params.n", "too_many_sequences")
    return out


def _item(body: GenerateRequest, i: int, n_items: int, prompt, param: str, serving, info, overrides: dict):
    """Prompt ``i``'s Item (its prompt ids filled in later), OpenAI job and no_stop_trim."""
    sps = body.sampling_params
    sp = per_item(sps, i, n_items, "sampling_params", {})
    if not isinstance(sp, dict):
        raise bad_request("sampling_params must be an object", "sampling_params")
    sparam = "sampling_params" if not isinstance(sps, list) else f"sampling_params[{i}]"
    fields, no_trim = _request_fields(sp, overrides, sparam)
    want_lp = bool(per_item(body.return_logprob, i, n_items, "return_logprob", False))
    k = int(per_item(body.top_logprobs_num, i, n_items, "top_logprobs_num", 0))
    start = int(per_item(body.logprob_start_len, i, n_items, "logprob_start_len", -1))
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise bad_request(f"top_logprobs_num={excerpt(k)} must be between 0 and {MAX_TOP_LOGPROBS}",
                          "top_logprobs_num")
    if start < -1:
        raise bad_request(f"logprob_start_len={excerpt(start)} must be -1 (no prompt logprobs) or >= 0",
                          "logprob_start_len")
    if want_lp:
        fields["logprobs"] = k
    if isinstance(prompt, str):
        check_chars(info, len(prompt), param)
    try:
        req = CompletionRequest.model_validate({"prompt": prompt, **fields})
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if isinstance(x, str)]
        name = loc[0] if loc else "sampling_params"
        name = "input_ids" if name == "prompt" else f"{sparam}.{BACK.get(name, name)}"
        raise bad_request(f"{name}: {first.get('msg')}", name, "invalid_type") from None
    try:
        job = serving._job("completion", req)
    except APIError as e:
        raise _rename(e, sparam) from None
    rids = body.rid
    rid = rids[i] if isinstance(rids, list) else (rids if isinstance(rids, str) and n_items == 1 else None)
    if rid is None:
        rid = uuid.uuid4().hex if not isinstance(rids, str) else f"{rids}-{i}"
    return Item(i, [], sp, want_lp, start, k, rid), job, no_trim
