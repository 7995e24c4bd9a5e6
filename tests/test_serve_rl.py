"""SGLang's native API (``serve/api/rl.py``) against a real ``python -m serve`` process, driven the way
the RL frameworks drive SGLang: the request sequences below are those of NeMo-RL's SGLang worker
(PR #3167: nemo_rl/models/generation/sglang/sglang_worker.py, grpo.py), slime
(slime/backends/sglang_utils/sglang_engine.py, server_control.py, ray/actor_group.py) and AReaL
(areal/core/remote_inf_engine.py ``agenerate``, SGLangBackend.build_generation_request).

One server (LLaDA tiny fixture, bf16, mesh 1, one compiled block program) serves the whole file.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from serve_helpers import LLADA_MODEL, Server, server_env
from test_serve_weights import _hf_copy, _tensors

ARGS = ("--mesh", "1", "--dtype", "bfloat16", "--max-batch-size", "8", "--batch-buckets", "8",
        "--prompt-buckets", "64", "--max-wait-ms", "20", "--warmup-buckets", "8x64x32", "--allow-weight-updates")
PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28], [31, 32, 33]]


@pytest.fixture(scope="module")
def server():
    s = Server("--model", str(LLADA_MODEL), *ARGS, env=server_env(devices=1))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
    """The fixture's HF dir with every matrix perturbed (other greedy outputs)."""
    a = _tensors(LLADA_MODEL)
    rng = np.random.default_rng(3)
    b = {k: (v + 0.5 * v.std() * rng.standard_normal(v.shape)).astype(v.dtype) if v.ndim == 2 else v
         for k, v in a.items()}
    return _hf_copy(tmp_path_factory.mktemp("rl") / "b", b)


def gen(http, ids, **sp):
    """NeMo-RL's /generate body (sglang_worker._generate_single_sample)."""
    body = {"sampling_params": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 32, **sp},
            "return_logprob": True, "logprob_start_len": -1, "input_ids": ids}
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def nemo_rl_parse(out):
    """NeMo-RL's _extract_generated_tokens_and_logprobs: tokens and logprobs from output_token_logprobs."""
    lps = out["meta_info"]["output_token_logprobs"]
    return [x[1] for x in lps], [x[0] for x in lps]


def flush_until_idle(http, attempts=60):
    """NeMo-RL's / slime's flush_cache loop: GET until 200."""
    for _ in range(attempts):
        if http.get("/flush_cache").status_code == 200:
            return True
        time.sleep(0.2)
    return False


def test_generate_equals_completions_tokens_and_logprobs(http):
    for ids in PROMPTS:
        out = gen(http, ids)
        comp = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 32, "temperature": 0,
                                                  "logprobs": 0}).json()["choices"][0]
        tokens, lps = nemo_rl_parse(out)
        meta = out["meta_info"]
        assert tokens == out["output_ids"] and meta["completion_tokens"] == len(tokens)
        assert meta["prompt_tokens"] == len(ids) and meta["cached_tokens"] == 0
        assert meta["weight_version"] == "default" and meta["e2e_latency"] >= 0
        assert out["text"] == comp["text"]
        n_text = len(comp["logprobs"]["token_logprobs"])
        # the completion stops before a stop token; /generate keeps it, with its own logprob
        assert lps[:n_text] == pytest.approx(comp["logprobs"]["token_logprobs"], abs=0)
        if meta["finish_reason"]["type"] == "stop":
            assert len(tokens) == n_text + 1 and meta["finish_reason"]["matched"] == tokens[-1]
        else:
            assert meta["finish_reason"] == {"type": "length", "length": 32} and len(tokens) == n_text
        assert len(meta["commit_steps"]) == len(tokens) and all(s >= 1 for s in meta["commit_steps"])


def test_batch_n_and_prompt_logprobs_shapes(http):
    body = {"input_ids": PROMPTS[:2], "sampling_params": {"max_new_tokens": 16, "n": 2, "temperature": 1.0,
                                                          "sampling_seed": 5},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2}
    out = http.post("/generate", json=body).json()
    assert isinstance(out, list) and len(out) == 4  # prompt-major: p0s0, p0s1, p1s0, p1s1
    for k, o in enumerate(out):
        meta = o["meta_info"]
        p = PROMPTS[k // 2]
        assert meta["prompt_tokens"] == len(p)
        inp = meta["input_token_logprobs"]
        assert [x[1] for x in inp] == p and inp[0][0] is None and all(x[0] <= 0 for x in inp[1:])
        assert len(meta["output_top_logprobs"]) == len(o["output_ids"])
        assert all(len(t) == 2 for t in meta["output_top_logprobs"][: len(o["output_ids"]) - 1])
    single = http.post("/generate", json={**body, "input_ids": PROMPTS[0],
                                          "sampling_params": {**body["sampling_params"], "n": 1}}).json()
    assert isinstance(single, dict)
    assert single["output_ids"] == out[0]["output_ids"]  # seed s: the first of n uses s (then s + 1, ...)


def test_stop_token_stays_in_output_ids_and_stop_string_trims_text(http):
    base = gen(http, PROMPTS[1])
    ids = base["output_ids"]
    pos = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    out = gen(http, PROMPTS[1], stop_token_ids=[ids[pos]])
    assert out["output_ids"] == ids[: pos + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[pos]}
    lps = [x[0] for x in out["meta_info"]["output_token_logprobs"]]
    assert len(lps) == pos + 1 and all(isinstance(x, float) and x <= 0 for x in lps)
    text = base["text"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        cut = gen(http, PROMPTS[1], stop=[stop])
        assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert cut["text"] == text[: text.find(stop)]
        kept = gen(http, PROMPTS[1], stop=[stop], no_stop_trim=True)
        assert kept["text"] == text[: text.find(stop) + len(stop)]


def test_sampling_seed_reproducible_and_independent_of_batch_mates(http):
    sp = {"temperature": 1.0, "max_new_tokens": 32, "sampling_seed": 1234}
    alone = http.post("/generate", json={"input_ids": PROMPTS[0], "sampling_params": sp}).json()
    again = http.post("/generate", json={"input_ids": PROMPTS[0], "sampling_params": sp}).json()
    mates = http.post("/generate", json={"input_ids": [PROMPTS[2], PROMPTS[0], PROMPTS[1]],
                                         "sampling_params": [{**sp, "sampling_seed": 7}, sp,
                                                             {**sp, "temperature": 0.0}]}).json()
    assert alone["output_ids"] == again["output_ids"] == mates[1]["output_ids"]
    other = http.post("/generate", json={"input_ids": PROMPTS[0],
                                         "sampling_params": {**sp, "sampling_seed": 99}}).json()
    assert other["output_ids"] != alone["output_ids"]


def test_nemo_rl_worker_sequence_reconfigure_and_restore(http):
    """grpo.validate: prev = reconfigure_dllm(overrides); rollouts; reconfigure_dllm(prev)."""
    assert http.get("/health_generate").status_code == 200
    before = gen(http, PROMPTS[0])
    r = http.post("/reconfigure_dllm", json={"overrides": {"selection_policy": "confidence", "tokens_per_step": 1}})
    assert r.status_code == 200 and r.json()["success"] is True
    prev = r.json()["previous"]
    assert prev == {"selection_policy": None, "tokens_per_step": None}
    # one token per step of the fixed schedule: the completions endpoint with that setting agrees
    fixed = gen(http, PROMPTS[0])
    ref = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 32, "temperature": 0,
                                             "algorithm": "dual_cache", "threshold": None, "steps": 32}).json()
    assert fixed["text"] == ref["choices"][0]["text"]
    info = http.get("/get_server_info").json()
    assert info["decoder_overrides"] == {"selection_policy": "confidence", "tokens_per_step": 1}
    assert info["max_running_requests"] == 8  # --max-batch-size
    assert http.post("/reconfigure_dllm", json={"overrides": prev}).json()["success"] is True
    assert http.get("/get_server_info").json()["decoder_overrides"] == {}
    assert gen(http, PROMPTS[0])["output_ids"] == before["output_ids"]
    bad = http.post("/reconfigure_dllm", json={"overrides": {"block_size": 8}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "overrides.block_size"
    bad = http.post("/reconfigure_dllm", json={"overrides": {"threshold": "high"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "overrides.threshold"
    assert flush_until_idle(http)


def _stream_until(http, body, min_tokens, box):
    """A streamed /generate: the chunks, stopping to read once ``min_tokens`` ids arrived (box['ready'])."""
    chunks = []
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            chunks.append(chunk)
            if len(chunk["output_ids"]) >= min_tokens:
                box["ready"].set()
    box["chunks"] = chunks


LONG = {"max_new_tokens": 128, "temperature": 0.0, "steps": 128, "block_length": 32}


def test_abort_request_returns_committed_tokens_then_areal_resend_loop(http):
    full = gen(http, PROMPTS[1], **LONG)
    box = {"ready": threading.Event()}
    body = {"input_ids": PROMPTS[1], "sampling_params": LONG, "return_logprob": True, "rid": "areal-1"}
    t = threading.Thread(target=_stream_until, args=(http, body, 32, box))
    t.start()
    assert box["ready"].wait(120)
    assert http.post("/abort_request", json={"rid": "areal-1"}).status_code == 200
    t.join(120)
    last = box["chunks"][-1]
    reason = last["meta_info"]["finish_reason"]
    if reason["type"] == "abort":  # (it may have finished first on a fast machine)
        n = len(last["output_ids"])
        assert 32 <= n < 128 and last["output_ids"] == full["output_ids"][:n]
        assert reason["message"] == "Aborted"
        assert len(last["meta_info"]["output_token_logprobs"]) == n
    # AReaL's agenerate: resend prompt + partial output with max_new_tokens decremented until stop/length
    acc, stop_reason, ids, budget = [], None, list(PROMPTS[1]), 128
    while stop_reason not in ("stop", "tool_calls", "length") and len(acc) < 128:
        out = http.post("/generate", json={"input_ids": ids, "image_data": None, "return_logprob": True,
                                           "stream": False, "sampling_params": {
                                               "top_p": 1.0, "top_k": -1, "max_new_tokens": budget,
                                               "temperature": 0.0, "stop_token_ids": [], "ignore_eos": False,
                                               "skip_special_tokens": True, "frequency_penalty": 0.0}}).json()
        stop_reason = out["meta_info"]["finish_reason"]["type"]
        toks = [x[1] for x in out["meta_info"]["output_token_logprobs"]]
        acc += toks
        ids += toks
        budget -= len(toks)
        assert budget >= 0
    assert stop_reason in ("stop", "length") and len(acc) <= 128


def test_pause_in_place_holds_arrivals_then_continue(http):
    ref = gen(http, PROMPTS[2])
    assert http.post("/pause_generation", json={"mode": "in_place"}).json()["status"] == "ok"
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("out", gen(http, PROMPTS[2])))
    t.start()
    time.sleep(1.0)
    assert "out" not in box  # arrivals wait while paused
    assert http.get("/health_generate").status_code == 200
    loads = http.get("/v1/loads", params={"include": "core"}).json()["loads"][0]
    assert loads["num_waiting_reqs"] == 1
    assert http.get("/flush_cache").status_code == 400  # in_place with a request in the engine: clients retry
    assert http.post("/continue_generation", json={}).json()["status"] == "ok"
    t.join(120)
    assert box["out"]["output_ids"] == ref["output_ids"]


def test_slime_disk_update_cycle_and_abort_all(http, perturbed):
    before = gen(http, PROMPTS[0])
    # a request waiting while paused (mode abort) is ended by abort_request {abort_all}
    assert http.post("/pause_generation", json={}).status_code == 200
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("out", gen(http, PROMPTS[0])))
    t.start()
    deadline = time.monotonic() + 30
    while http.get("/v1/loads").json()["loads"][0]["num_total_reqs"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http.post("/abort_request", json={"abort_all": True}).status_code == 200
    t.join(60)
    assert box["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert box["out"]["output_ids"] == [] and box["out"]["meta_info"]["output_token_logprobs"] == []
    assert http.get("/v1/loads").json()["loads"][0]["num_total_reqs"] == 0
    # slime: pause -> flush loop -> update (weight_version) -> get_weight_version -> continue
    assert flush_until_idle(http)
    r = http.post("/update_weights_from_disk", json={"model_path": str(perturbed), "weight_version": "12"})
    assert r.status_code == 200 and r.json()["success"] is True and r.json()["num_paused_requests"] == 0
    assert http.get("/get_weight_version").json() == {"weight_version": "12"}
    assert http.post("/continue_generation", json={}).status_code == 200
    after = gen(http, PROMPTS[0])
    assert after["meta_info"]["weight_version"] == "12"
    assert after["output_ids"] != before["output_ids"]
    assert http.get("/get_model_info").json()["weight_version"] == "12"
    # AReaL's update: {model_path, abort_all_requests: true}; back to the original weights
    r = http.post("/update_weights_from_disk", json={"model_path": str(LLADA_MODEL), "abort_all_requests": True})
    assert r.status_code == 200 and r.json()["success"] is True
    assert gen(http, PROMPTS[0])["output_ids"] == before["output_ids"]


def test_fields_are_checked_at_the_edge_and_named_as_sglang_names_them(http):
    def err(body):
        r = http.post("/generate", json=body)
        assert r.status_code == 400, r.text
        return r.json()["error"]["param"]

    assert err({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10**6}}) == "sampling_params.max_new_tokens"
    assert err({"input_ids": [1, 2], "sampling_params": {"sampling_seed": -1}}) == "sampling_params.sampling_seed"
    assert err({"input_ids": [1, 2], "sampling_params": {"bogus": 1}}) == "sampling_params.bogus"
    assert err({"input_ids": [1, 2], "sampling_params": {"regex": "a+"}}) == "sampling_params.regex"
    assert err({"input_ids": [1, 2], "sampling_params": {"steps": 0}}) == "sampling_params.steps"
    assert err({"input_ids": [1, 2], "sampling_params": {"block_add_threshold": 2}}) == \
        "sampling_params.block_add_threshold"
    assert err({"input_ids": [1, 2], "lora_path": "x"}) == "lora_path"
    assert err({"input_ids": [1, 2], "text": "hi"}) in ("text", "input_ids")
    assert err({"input_ids": [10**9]}) == "input_ids"
    assert err({"input_ids": [[1, 2], [3]], "sampling_params": [{}]}) == "sampling_params"
    assert err({"input_ids": [1, 2], "top_logprobs_num": 99}) == "top_logprobs_num"
    # neutral values of what cannot be honoured are accepted (slime, AReaL send them)
    ok = http.post("/generate", json={"input_ids": [1, 2], "image_data": None, "sampling_params": {
        "max_new_tokens": 4, "stop": None, "stop_token_ids": None, "frequency_penalty": 0.0, "top_k": -1,
        "spaces_between_special_tokens": False, "no_stop_trim": True, "skip_special_tokens": False}})
    assert ok.status_code == 200, ok.text
    # multi-block decoding as a sampling param: the same tokens as the OpenAI route
    sp = {"max_new_tokens": 64, "temperature": 0.0, "block_length": 16, "threshold": 0.5, "block_add_threshold": 0.25}
    out = http.post("/generate", json={"input_ids": PROMPTS[0], "sampling_params": sp}).json()
    comp = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 64, "temperature": 0,
                                              "block_length": 16, "threshold": 0.5, "block_add_threshold": 0.25}).json()
    assert out["text"] == comp["choices"][0]["text"]
    r = http.post("/update_weights_from_tensor", json={"serialized_named_tensors": ["x"], "flush_cache": False})
    assert r.status_code == 400 and "update_weights_from_disk" in r.json()["error"]["message"]


def test_slime_release_and_resume_memory_occupation(http):
    """slime: flush_cache loop, POST /release_memory_occupation {}; later resume with tags."""
    ref = gen(http, PROMPTS[0])
    assert flush_until_idle(http)
    r = http.post("/release_memory_occupation", json={})
    assert r.status_code == 200, r.text
    assert r.json()["live_array_bytes"]["after"] < r.json()["live_array_bytes"]["before"]
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("out", gen(http, PROMPTS[0])))
    t.start()
    time.sleep(1.0)
    assert "out" not in box  # waits for the weights
    assert http.post("/resume_memory_occupation", json={"tags": ["kv_cache", "cuda_graph"]}).status_code == 200
    assert http.post("/resume_memory_occupation", json={"tags": ["weights"]}).status_code == 200
    t.join(120)
    assert box["out"]["output_ids"] == ref["output_ids"]
    assert http.post("/release_memory_occupation", json={"tags": ["gpu"]}).status_code == 400


def test_logprobs_are_of_the_distribution_drawn_from(http):
    """At T = 0.7 with top_k: /generate's logprobs are the processed ones (softmax(logits / T) on
    the top-k set), equal to /v1/completions with logprobs_mode 'processed', not the raw ones."""
    sp = {"temperature": 0.7, "top_k": 5, "max_new_tokens": 32, "sampling_seed": 11}
    out = http.post("/generate", json={"input_ids": PROMPTS[0], "sampling_params": sp, "return_logprob": True}).json()
    lps = [x[0] for x in out["meta_info"]["output_token_logprobs"]]
    body = {"prompt": PROMPTS[0], "max_tokens": 32, "temperature": 0.7, "top_k": 5, "seed": 11, "logprobs": 0}
    processed = http.post("/v1/completions", json={**body, "logprobs_mode": "processed"}).json()["choices"][0]
    raw = http.post("/v1/completions", json=body).json()["choices"][0]
    n = len(processed["logprobs"]["token_logprobs"])
    assert processed["text"] == raw["text"] == out["text"]
    assert lps[:n] == pytest.approx(processed["logprobs"]["token_logprobs"], abs=0)
    assert lps[:n] != pytest.approx(raw["logprobs"]["token_logprobs"], abs=1e-3)
    # NeMo-RL's selection_policy leftmost is the remasking policy of that name
    prev = http.post("/reconfigure_dllm", json={"overrides": {"selection_policy": "leftmost"}}).json()["previous"]
    left = gen(http, PROMPTS[0])
    ref = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 32, "temperature": 0,
                                             "remasking": "leftmost"}).json()["choices"][0]
    http.post("/reconfigure_dllm", json={"overrides": prev})
    assert left["text"] == ref["text"]
