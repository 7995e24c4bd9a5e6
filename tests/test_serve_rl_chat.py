"""NeMo-Gym's token fields on /v1/chat/completions, against a real server (LLaDA tiny fixture).

NeMo-RL serves NeMo-Gym through vLLM's OpenAI server with its own additions
(nemo_rl/models/generation/vllm/vllm_worker_async.py, vllm/utils.py
``attach_token_information_to_chat_response_choices``, openai_server_utils.py
``replace_prefix_tokens``); NeMo-Gym's vLLM model server (responses_api_models/vllm_model/app.py)
builds the request bodies replayed here. One server for the module; one compiled program (every
generating request asks for logprobs, 24 tokens, one prompt bucket, batch 1).
"""

from __future__ import annotations

import httpx
import pytest

from serve.api.chat_tokens import replace_prefix_tokens
from serve.api.protocol import APIError
from serve_helpers import LLADA_MODEL, Server, server_env, sse_events, validate

NAME = "llada-tiny"
CHAT = "/v1/chat/completions"
pytestmark = pytest.mark.slow

# NeMo-Gym's request to the engine when its model server has return_token_id_information: true
# (responses_api_models/vllm_model/app.py: the converted Responses body, model = the served name,
# then logprobs / top_logprobs=0 / return_tokens_as_token_ids), with NeMo-RL's default sampling
# (temperature 1.0, top_p 1.0: its chat server asserts the request matches the trainer's config).
GYM_TOKENS = {"logprobs": True, "top_logprobs": 0, "return_tokens_as_token_ids": True}
GYM = {"model": NAME, "temperature": 1.0, "top_p": 1.0, "max_tokens": 24, **GYM_TOKENS}
USER1 = {"role": "user", "content": "What is 2 + 2?"}
USER2 = {"role": "user", "content": "And 3 + 3?"}
FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")


@pytest.fixture(scope="module")
def server():
    s = Server("--model", str(LLADA_MODEL), "--served-model-name", NAME, "--mesh", "1",
               "--max-batch-size", "1", "--batch-buckets", "1", "--prompt-buckets", "128",
               "--max-wait-ms", "1", "--warmup-buckets", "none", env=server_env(devices=1))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def ids(http):
    """Token ids of the fixture's tokenizer the checks need: the stop tokens and the end of a turn."""
    info = http.get("/tokenizer_info").json()
    eot = post(http, "/tokenize", {"prompt": "<|eot_id|>", "add_special_tokens": False})["tokens"]
    assert len(eot) == 1 and eot[0] in info["stop_token_ids"]
    return {"stops": set(info["stop_token_ids"]), "eot": eot[0], "eos": info["eos_token_id"]}


def post(http, path, body, status=200):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def gym_assistant(message: dict) -> dict:
    """The assistant turn NeMo-Gym sends back (nemo_gym/responses_converter.py flush_assistant:
    content, role, then the token fields of NeMoGymChatCompletionAssistantMessageForTrainingParam)."""
    return {"content": message["content"], "role": "assistant", **{f: message[f] for f in FIELDS}}


def check_token_fields(choice: dict) -> None:
    """NeMo-RL's message fields agree with the chat logprobs rendered as token ids."""
    message, content = choice["message"], choice["logprobs"]["content"]
    gen = message["generation_token_ids"]
    assert [e["token"] for e in content] == [f"token_id:{t}" for t in gen]
    assert message["generation_log_probs"] == [e["logprob"] for e in content]
    assert all(e["top_logprobs"] == [] and e["logprob"] <= 0 for e in content)


def test_nemo_gym_two_turn_chat(http, ids):
    out1 = post(http, CHAT, {"messages": [USER1], **GYM})
    validate(out1, "CreateChatCompletionResponse")
    choice1 = out1["choices"][0]
    m1 = choice1["message"]
    check_token_fields(choice1)
    # the prompt is the chat template's (what NeMo-Gym's /tokenize fallback would read)
    assert m1["prompt_token_ids"] == post(http, "/tokenize", {"model": NAME, "messages": [USER1]})["tokens"]
    gen1 = m1["generation_token_ids"]
    assert 1 <= len(gen1) <= 24 and out1["usage"]["prompt_tokens"] == len(m1["prompt_token_ids"])
    if choice1["finish_reason"] == "stop":  # ended by a stop token: it is listed last, with its logprob
        assert gen1[-1] in ids["stops"] and len(gen1) == out1["usage"]["completion_tokens"] + 1

    # turn 2: the earlier assistant message carries its ids; the new prompt starts with them
    turn2 = [USER1, gym_assistant(m1), USER2]
    out2 = post(http, CHAT, {"messages": turn2, **GYM})
    m2 = out2["choices"][0]["message"]
    check_token_fields(out2["choices"][0])
    before, now = m1["prompt_token_ids"] + gen1, m2["prompt_token_ids"]
    if before[-1] == ids["eos"]:  # NeMo-RL's rule: a final EOS gives way to the template's end of turn
        before = before[:-1] + [ids["eot"]]
    assert now[:len(before)] == before
    assert out2["usage"]["prompt_tokens"] == len(now)
    # the template's continuation follows: the end of the assistant turn, then the new user turn
    tail = post(http, "/tokenize", {"messages": [USER2], "add_special_tokens": False})["tokens"]
    assert now[-len(tail) + 1:] == tail[1:]  # (the template puts BOS before the first message only)
    # NeMo-Gym's /tokenize fallback body (model, messages, required_prefix_token_ids) gives the same ids
    assert post(http, "/tokenize", {"model": NAME, "messages": turn2})["tokens"] == now
    assert post(http, "/tokenize", {"model": NAME, "messages": turn2[:1] + [{"role": "assistant", "content": m1[
        "content"]}] + turn2[2:], "required_prefix_token_ids": m1["prompt_token_ids"] + gen1})["tokens"] == now


def test_greedy_reply_is_not_retokenized(http, ids):
    """At T=0 the fixture's reply contains bytes that do not survive a decode + encode round trip (its text
    shows U+FFFD): re-templating the reply gives other ids, the token fields keep the generated ones.
    vLLM's return_token_ids (NeMo-Gym's request_prompt_and_generation_token_ids) agree with them."""
    body = {**GYM, "temperature": 0.0, "return_token_ids": True}
    out1 = post(http, CHAT, {"messages": [USER1], **body})
    m1 = out1["choices"][0]["message"]
    assert out1["prompt_token_ids"] == m1["prompt_token_ids"]
    assert out1["choices"][0]["token_ids"] == m1["generation_token_ids"]
    plain = [USER1, {"role": "assistant", "content": m1["content"]}, USER2]
    retemplated = post(http, "/tokenize", {"messages": plain})["tokens"]
    exact = m1["prompt_token_ids"] + m1["generation_token_ids"]
    assert retemplated[:len(exact)] != exact
    out2 = post(http, CHAT, {"messages": [USER1, gym_assistant(m1), USER2], **body})
    m2 = out2["choices"][0]["message"]
    end = retemplated.index(ids["eot"], len(m1["prompt_token_ids"]))  # the end of the re-templated reply
    kept = exact[:-1] if exact[-1] in ids["stops"] else exact
    assert m2["prompt_token_ids"] == kept + retemplated[end:]
    assert out2["prompt_token_ids"] == m2["prompt_token_ids"]
    # the same messages without token fields: the re-templated ids are the prompt
    out3 = post(http, CHAT, {"messages": plain, **body})
    assert out3["prompt_token_ids"] == retemplated


def test_stop_token_is_the_last_generated_id(http):
    """A reply ended by a stop token lists it last in generation_token_ids and in the logprobs (as vLLM
    does), streamed or not; the text and usage leave it out."""
    greedy = post(http, CHAT, {"messages": [USER1], **GYM, "temperature": 0.0})["choices"][0]["message"]
    gen = greedy["generation_token_ids"]
    j = next(j for j in range(1, len(gen)) if gen[j] not in gen[:j])
    body = {"messages": [USER1], **GYM, "temperature": 0.0, "stop_token_ids": [gen[j]]}
    out = post(http, CHAT, body)
    choice = out["choices"][0]
    check_token_fields(choice)
    assert choice["finish_reason"] == "stop" and choice["message"]["generation_token_ids"] == gen[:j + 1]
    assert out["usage"]["completion_tokens"] == j
    with http.stream("POST", CHAT, json={**body, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    streamed = [e for c in events[:-1] if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == choice["logprobs"]["content"]
    assert all(FIELDS[0] not in c["choices"][0]["delta"] for c in events[:-1] if c["choices"])
    # without return_tokens_as_token_ids: token strings, no stop entry, no message fields
    plain = post(http, CHAT, {**body, "return_tokens_as_token_ids": False})["choices"][0]
    assert not set(FIELDS) & set(plain["message"]) and plain["message"]["content"] == choice["message"]["content"]
    assert [(e["logprob"], e["bytes"]) for e in plain["logprobs"]["content"]] == \
        [(e["logprob"], e["bytes"]) for e in choice["logprobs"]["content"][:-1]]


def test_required_prefix_joins_at_the_end_of_turn(http, ids):
    """The explicit required_prefix_token_ids (NeMo-RL's request field) through /tokenize (no generation):
    a prefix ending in a stop token gives way to the template's end of turn; the messages after the
    last assistant turn follow."""
    messages = [USER1, {"role": "assistant", "content": "Four."}, USER2]
    plain = post(http, "/tokenize", {"messages": messages})["tokens"]
    head = post(http, "/tokenize", {"messages": [USER1]})["tokens"]
    end = plain.index(ids["eot"], len(head))
    for last in (ids["eot"], ids["eos"], None):
        model = head + [300, 301, 302] + ([last] if last is not None else [])
        got = post(http, "/tokenize", {"messages": messages, "required_prefix_token_ids": model})["tokens"]
        kept = model[:-1] if last is not None else model
        assert got == kept + plain[end:]
    # an empty prefix is no prefix (as NeMo-RL)
    assert post(http, "/tokenize", {"messages": messages, "required_prefix_token_ids": []})["tokens"] == plain


BAD_TOKENS = [  # (body fields, status, param)
    ({"messages": [{**USER1, "prompt_token_ids": [1], "generation_token_ids": [2]}]}, 400,
     "messages[0].prompt_token_ids"),
    ({"messages": [USER1, {"role": "assistant", "content": "x", "prompt_token_ids": [1]}, USER2]}, 400,
     "messages[1].generation_token_ids"),
    ({"messages": [USER1, {"role": "assistant", "content": "x", "generation_log_probs": [-1.0]}, USER2]}, 400,
     "messages[1].prompt_token_ids"),
    ({"messages": [USER1, {"role": "assistant", "content": "x", "prompt_token_ids": [1],
                           "generation_token_ids": [2, 3], "generation_log_probs": [-1.0]}, USER2]}, 400,
     "messages[1].generation_log_probs"),
    ({"messages": [USER1, {"role": "assistant", "content": "x", "prompt_token_ids": [1, 384],
                           "generation_token_ids": [2]}, USER2]}, 400, "messages[1].prompt_token_ids"),
    ({"messages": [USER1, {"role": "assistant", "content": "x", "prompt_token_ids": [1],
                           "generation_token_ids": [336]}, USER2]}, 400, "messages[1].generation_token_ids"),
    ({"messages": [USER1, {"role": "assistant", "content": "x", "prompt_token_ids": ["1"],
                           "generation_token_ids": [2]}, USER2]}, 400, "messages[1].prompt_token_ids[0]"),
    ({"messages": [USER1, {"role": "assistant", "content": "x", "prompt_token_ids": [1] * 400,
                           "generation_token_ids": [2] * 200}, USER2]}, 413, "messages[1].prompt_token_ids"),
    ({"messages": [USER1], "required_prefix_token_ids": [-1]}, 400, "required_prefix_token_ids"),
    ({"messages": [USER1], "required_prefix_token_ids": [1] * 512}, 413, "required_prefix_token_ids"),
    ({"messages": [USER1], "return_tokens_as_token_ids": 1}, 400, "return_tokens_as_token_ids"),
    ({"messages": [USER1], "return_token_ids": True, "stream": True}, 400, "return_token_ids"),
]


@pytest.mark.parametrize("fields,status,param", BAD_TOKENS)
def test_token_fields_are_validated(http, fields, status, param):
    r = http.post(CHAT, json={"model": NAME, "max_tokens": 24, **fields})
    assert r.status_code == status, r.text
    validate(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param
    if "stream" not in fields:  # /tokenize takes the same fields (but not the sampling ones)
        body = {k: v for k, v in fields.items() if k in ("messages", "required_prefix_token_ids")}
        if body != fields:
            return
        r = http.post("/tokenize", json=body)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), r.text


def test_tokenize_prefix_needs_messages(http):
    r = http.post("/tokenize", json={"prompt": "x", "required_prefix_token_ids": [1]})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "required_prefix_token_ids")


def test_replace_prefix_tokens_is_nemo_rl_rule():
    """NeMo-RL's own examples (openai_server_utils.py replace_prefix_tokens), EOS = 2."""
    end = frozenset({2})
    model = [11, 12, 13, 40, 41, 220, 17, 2]          # turn-1 prompt + generation (" 4" + EOS)
    head = [11, 12, 13, 40, 41, 1001, 2]               # the template re-tokenized " 4" as 1001
    full = [11, 12, 13, 40, 41, 1001, 2, 21, 22, 40, 41]
    assert replace_prefix_tokens(model, head, full, end, "p") == [11, 12, 13, 40, 41, 220, 17, 2, 21, 22, 40, 41]
    assert replace_prefix_tokens(model[:-1], head, full, end, "p") == model + [21, 22, 40, 41]  # stopped on length
    # the boundary is the N-th end token, not a position: a template that drops earlier reasoning
    # (Qwen3) renders history shorter when a user turn follows
    head = [11, 90, 91, 92, 2]                          # prompt, <think>...</think> answer, EOS
    full = [11, 92, 2, 21, 2, 40]                       # reasoning dropped from history
    assert replace_prefix_tokens([11, 90, 91, 92, 2], head, full, end, "p") == [11, 90, 91, 92, 2, 21, 2, 40]
    assert replace_prefix_tokens([], head, full, end, "p") == full
    for head, full in (([11, 12], [11, 12, 2]), ([11, 2, 12, 2], [11, 2, 12])):
        with pytest.raises(APIError) as e:
            replace_prefix_tokens([11, 2], head, full, end, "messages[1].prompt_token_ids")
        assert (e.value.status, e.value.param) == (400, "messages[1].prompt_token_ids")
