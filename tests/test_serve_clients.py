"""Real clients against a real server (LLaDA tiny fixture): NeMo-Skills' default request
bodies, logprobs (chat and completions, streamed and not), lm-eval's loglikelihood requests
(echo + logprobs, compared with ``Model.score``), the tokenizer endpoints (vLLM's shapes, read
by lm-eval's remote tokenizer) and what they reject. One server for the module.
"""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from serve_helpers import LLADA_MODEL, Server, chat_ids, server_env, sse_events, validate

KEY = "clients-key-not-secret"
NAME = "llada-tiny"
MSG = [{"role": "user", "content": "Hello there!"}]
pytestmark = pytest.mark.slow

# NeMo-Skills' default bodies (nemo_skills/inference/model/vllm.py), minus model/messages/prompt
NEMO_CHAT = {"max_tokens": None, "temperature": 0.0, "top_p": 0.95, "seed": 0, "stop": None, "logprobs": False,
             "top_logprobs": None, "n": 1, "frequency_penalty": 0.0, "presence_penalty": 0.0, "stream": False,
             "min_p": 0.0, "repetition_penalty": 1.0, "spaces_between_special_tokens": False}
NEMO_COMPLETION = {**{k: v for k, v in NEMO_CHAT.items() if k != "top_logprobs"}, "echo": False,
                   "logit_bias": None, "logprobs": None}


@pytest.fixture(scope="module")
def server():
    s = Server("--model", str(LLADA_MODEL), "--served-model-name", NAME, "--mesh", "1",
               "--max-batch-size", "4", "--batch-buckets", "1,4", "--prompt-buckets", "64,512",
               "--max-wait-ms", "5", "--warmup-buckets", "none", "--max-score-tokens", "200",
               env=server_env(DLLM_API_KEY=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
        yield c


def post(http, path, body, status=200):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def test_nemo_skills_default_bodies_return_the_plain_text(http):
    plain = post(http, "/v1/chat/completions", {"model": NAME, "messages": MSG, "max_tokens": 24})
    text = plain["choices"][0]["message"]["content"]
    for extra in ({}, {"top_k": 20}):
        body = {"model": NAME, "messages": MSG, **NEMO_CHAT, "max_tokens": 24, **extra}
        assert post(http, "/v1/chat/completions", body)["choices"][0]["message"]["content"] == text
    with http.stream("POST", "/v1/chat/completions",
                     json={"model": NAME, "messages": MSG, **NEMO_CHAT, "max_tokens": 24, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]) == text
    plain = post(http, "/v1/completions", {"model": NAME, "prompt": "Once upon a time", "max_tokens": 24})
    body = {"model": NAME, "prompt": "Once upon a time", **NEMO_COMPLETION, "max_tokens": 24}
    assert post(http, "/v1/completions", body)["choices"][0]["text"] == plain["choices"][0]["text"]
    # max_tokens null = the default length (128)
    out = post(http, "/v1/chat/completions", {"model": NAME, "messages": MSG, **NEMO_CHAT})
    assert out["usage"]["completion_tokens"] <= 128


def test_chat_logprobs_shapes_bytes_top1_and_streaming(client, http):
    plain = post(http, "/v1/chat/completions", {"model": NAME, "messages": MSG, "max_tokens": 24})
    body = {"model": NAME, "messages": MSG, "max_tokens": 24, "logprobs": True, "top_logprobs": 3}
    out = post(http, "/v1/chat/completions", body)
    validate(out, "CreateChatCompletionResponse")
    choice = out["choices"][0]
    text = choice["message"]["content"]
    assert text == plain["choices"][0]["message"]["content"]  # logprobs change nothing
    content = choice["logprobs"]["content"]
    assert choice["logprobs"]["refusal"] is None and len(content) == out["usage"]["completion_tokens"]
    # the exact bytes: (the tiny model also emits invalid UTF-8, which the text shows as U+FFFD)
    assert b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", errors="replace") == text
    for e in content:
        assert len(e["top_logprobs"]) == 3 and e["logprob"] <= 0
        top = e["top_logprobs"][0]
        assert (e["token"], e["logprob"]) == (top["token"], top["logprob"])  # T=0: the token is its top-1
        assert [t["logprob"] for t in e["top_logprobs"]] == sorted((t["logprob"] for t in e["top_logprobs"]),
                                                                  reverse=True)
    # the official client parses it; streamed logprobs concatenate to the non-streamed ones
    parsed = client.chat.completions.create(**body)
    assert [t.token for t in parsed.choices[0].logprobs.content] == [e["token"] for e in content]
    chunks = list(client.chat.completions.create(**body, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == content
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    # logprobs: true alone -> entries with empty top lists
    out = post(http, "/v1/chat/completions", {**body, "top_logprobs": None})
    assert all(e["top_logprobs"] == [] for e in out["choices"][0]["logprobs"]["content"])


def test_logprobs_mode_and_leftmost_reach_the_sampler(http, llada_model):
    """remasking 'leftmost' and logprobs_mode 'processed' (T = 1, top_k 5): the tokens and logprobs
    Model.generate gives for the same row; raw and processed differ only in the numbers (at T = 1
    processed = raw renormalised over the 5 kept tokens, so never below it); a bad mode is a 400."""
    body = {"model": NAME, "messages": MSG, "max_tokens": 24, "logprobs": True, "top_logprobs": 2,
            "temperature": 1.0, "seed": 3, "top_k": 5, "remasking": "leftmost"}
    raw = post(http, "/v1/chat/completions", body)["choices"][0]
    processed = post(http, "/v1/chat/completions", {**body, "logprobs_mode": "processed"})["choices"][0]
    assert processed["message"]["content"] == raw["message"]["content"]
    lp_raw = np.array([e["logprob"] for e in raw["logprobs"]["content"]])
    lp = np.array([e["logprob"] for e in processed["logprobs"]["content"]])
    assert len(lp) == len(lp_raw) > 0 and np.all(lp >= lp_raw - 1e-6) and np.any(lp > lp_raw + 1e-3)
    out = llada_model.generate([chat_ids(llada_model, MSG[0]["content"])], gen_length=32, block_length=32,
                               algorithm="dual_cache", threshold=0.9, early_stop=True, temperature=1.0, seed=3,
                               top_k=5, remasking="leftmost", logprobs=2, logprobs_mode="processed")
    # The server runs the row in its own program (its batch slot and prompt bucket), Model.generate at
    # batch 1 and the exact length: float32 sums in another order. On an AVX-512 host the two differ
    # by up to 4.8e-6 (bit-equal on the AVX2 hosts before); the float32 parity bound is 1e-4 for logits.
    np.testing.assert_allclose(lp, out.logprobs["token_logprobs"][0, :len(lp)], rtol=1e-5, atol=1e-5)
    assert llada_model.tokenizer.decode(out.tokens[0, :len(lp)].tolist(), skip_special_tokens=True) == \
        processed["message"]["content"]
    r = http.post("/v1/chat/completions", json={**body, "logprobs_mode": "sampled"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs_mode"


def test_completion_logprobs(http):
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 16, "logprobs": 2}
    out = post(http, "/v1/completions", body)
    validate(out, "CreateCompletionResponse")
    lp = out["choices"][0]["logprobs"]
    n = out["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["text_offset"][0] == 0
    for tok, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        # (up to k + 1 entries: the top 2 and the chosen token; fewer when token strings collide, e.g. "\ufffd")
        assert 1 <= len(top) <= 3 and max(top.values()) == logprob  # T=0: greedy
    with httpx.stream("POST", http.base_url.join("/v1/completions"), json={**body, "stream": True},
                      headers=http.headers, timeout=300) as r:
        events = sse_events(r.iter_lines())
    streamed = [e["choices"][0]["logprobs"] for e in events[:-1] if e["choices"] and e["choices"][0]["logprobs"]]
    assert sum((s["tokens"] for s in streamed), []) == lp["tokens"]
    assert sum((s["token_logprobs"] for s in streamed), []) == lp["token_logprobs"]
    assert sum((s["text_offset"] for s in streamed), []) == lp["text_offset"]


def test_echo_logprobs_equal_model_score(http, llada_model):
    tok = llada_model.tokenizer
    texts = ["The cat sat on the mat", "Once upon a time"]
    ids = [tok.encode(t) for t in texts]
    ref = llada_model.score(ids, top_k=1)
    # lm-eval's loglikelihood body (tokenized_requests=True): echo, logprobs 1, max_tokens 1
    out = post(http, "/v1/completions", {"model": NAME, "prompt": ids, "temperature": 0, "max_tokens": 1,
                                         "logprobs": 1, "seed": 1234, "echo": True})
    # (the first prompt token has null logprobs, as OpenAI and vLLM send it; the schema says number)
    copy = {**out, "choices": [{**c, "logprobs": {**c["logprobs"], "token_logprobs": [0.0] + c["logprobs"][
        "token_logprobs"][1:], "top_logprobs": [{}] + c["logprobs"]["top_logprobs"][1:]}} for c in out["choices"]]}
    validate(copy, "CreateCompletionResponse")
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for c, seq, sc in zip(out["choices"], ids, ref):
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(seq) + 1  # every prompt token + the generated one
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:len(seq)], sc.token_logprobs[1:], atol=1e-4, rtol=0)
        for i in range(1, len(seq)):
            top = lp["top_logprobs"][i]
            assert abs(max(top.values()) - float(sc.top_logprobs[i, 0])) <= 1e-4
        assert c["text"].startswith(tok.decode(seq, skip_special_tokens=False))
        assert lp["text_offset"] == list(np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]))
    # strings, max_tokens 0, logprobs 0 (the chosen token only)
    out = post(http, "/v1/completions", {"model": NAME, "prompt": texts, "max_tokens": 0, "logprobs": 0,
                                         "echo": True})
    assert [c["text"] for c in out["choices"]] == texts and out["usage"]["completion_tokens"] == 0
    for c, seq, sc in zip(out["choices"], ids, ref):
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(seq)
        np.testing.assert_allclose(lp["token_logprobs"][1:], sc.token_logprobs[1:], atol=1e-4, rtol=0)
        assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
    # echo without logprobs: prompt + completion
    plain = post(http, "/v1/completions", {"model": NAME, "prompt": texts[1], "max_tokens": 8})
    echoed = post(http, "/v1/completions", {"model": NAME, "prompt": texts[1], "max_tokens": 8, "echo": True})
    assert echoed["choices"][0]["text"] == texts[1] + plain["choices"][0]["text"]


def test_tokenizer_endpoints_and_lm_eval_remote_tokenizer(server, http, llada_model):
    tok = llada_model.tokenizer
    out = post(http, "/tokenize", {"model": NAME, "prompt": "héllo world"})
    assert out == {"count": len(tok.encode("héllo world")), "max_model_len": 512, "tokens": tok.encode("héllo world")}
    assert post(http, "/tokenize", {"prompt": "hi", "add_special_tokens": False})["tokens"] == \
        tok.encode("hi", add_special_tokens=False)
    chat = post(http, "/tokenize", {"messages": MSG})
    assert chat["tokens"] == llada_model.chat_prompt(MSG)
    assert post(http, "/detokenize", {"tokens": chat["tokens"]}) == \
        {"prompt": tok.decode(chat["tokens"], skip_special_tokens=False)}
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == 512
    assert info["tokenizer_class"]
    for path, body, status, param in [
        ("/tokenize", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("/tokenize", {}, 400, "prompt"), ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "bogus": 1}, 400, "bogus"),
        ("/detokenize", {"tokens": [10**6]}, 400, "tokens"), ("/detokenize", {}, 400, "tokens"),
    ]:
        r = http.post(path, json=body)
        assert r.status_code == status, (path, body, r.text)
        validate(r.json(), "ErrorResponse")
        assert r.json()["error"]["param"] == param
    assert httpx.get(server.url + "/tokenizer_info").status_code == 401  # the API key is required
    # lm-eval's own remote tokenizer
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    base = server.url + "/v1/completions"
    assert check_remote_tokenizer_support(base, auth_token=KEY)
    remote = RemoteTokenizer(base, auth_token=KEY)
    assert remote.encode("héllo") == tok.encode("héllo", add_special_tokens=False)
    assert remote.decode(tok.encode("héllo", add_special_tokens=False)) == "héllo"
    assert remote.eos_token_id == tok.eos_token_id
    assert remote.tokenizer_info["chat_template"] == tok.chat_template  # (lm-eval renders it without bos_token)


BAD = [
    ("/v1/chat/completions", {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1, "stream": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "a " * 300, "echo": True, "logprobs": 1, "max_tokens": 0}, 413, "prompt"),
    ("/v1/chat/completions", {"messages": MSG, "repetition_penalty": 1.2}, 400, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": MSG, "min_tokens": 4}, 400, "min_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "spaces_between_special_tokens": True}, 400,
     "spaces_between_special_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "stop_token_ids": list(range(10, 20))}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": MSG, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": MSG, "frobnicate": 1}, 400, "frobnicate"),
]


def test_bad_client_inputs(http):
    for path, body, status, param in BAD:
        r = http.post(path, json=body)
        assert r.status_code == status, (body, r.text)
        validate(r.json(), "ErrorResponse")
        assert r.json()["error"]["param"] == param, (body, r.json())


def test_vllm_extras_are_honoured(http, llada_model):
    tok = llada_model.tokenizer
    plain = post(http, "/v1/chat/completions", {"messages": MSG, "max_tokens": 24})["choices"][0]["message"]["content"]
    stop = plain[4:7]
    out = post(http, "/v1/chat/completions", {"messages": MSG, "max_tokens": 24, "stop": [stop],
                                              "include_stop_str_in_output": True})
    assert out["choices"][0]["message"]["content"] == plain[:plain.find(stop) + len(stop)]
    # a request stop token (the 4th generated token): the reply ends before it
    from serve.api.logprobs import _byte_decoder

    encoder = {b: ch for ch, b in _byte_decoder().items()}
    content = post(http, "/v1/chat/completions", {"messages": MSG, "max_tokens": 24,
                                                  "logprobs": True})["choices"][0]["logprobs"]["content"]
    fourth = tok.convert_tokens_to_ids("".join(encoder[b] for b in content[3]["bytes"]))
    first = next(i for i, e in enumerate(content) if tok.convert_tokens_to_ids(
        "".join(encoder[b] for b in e["bytes"])) == fourth)
    out = post(http, "/v1/chat/completions", {"messages": MSG, "max_tokens": 24, "stop_token_ids": [fourth]})
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == first
    out = post(http, "/v1/chat/completions", {"messages": MSG, "max_tokens": 24, "ignore_eos": True,
                                              "skip_special_tokens": False})
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 24
