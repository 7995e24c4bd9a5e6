"""The server on other models and meshes: LLaDA tiny on an 8-device mesh (same answers as one
device), Nemotron tiny with a plain request, and the no-``--model`` demo."""

from __future__ import annotations

import httpx
import openai
import pytest

from serve_helpers import LLADA_MODEL, NEMOTRON_MODEL, Server, chat_ids, reference, validate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers():
    """Start all three at once (their start-ups overlap), then wait for each."""
    common = ("--warmup-buckets", "none", "--max-wait-ms", "50")
    started = {
        "mesh8": Server("--model", str(LLADA_MODEL), "--mesh", "8", "--max-batch-size", "8", *common, wait=False),
        "nemotron": Server("--model", str(NEMOTRON_MODEL), "--mesh", "1", "--max-batch-size", "1", *common,
                           wait=False),
        "demo": Server("--max-batch-size", "1", "--mesh", "1", *common, wait=False),
    }
    try:
        for s in started.values():
            s.wait_ready(300)
        yield started
    finally:
        for s in started.values():
            s.stop()


def test_mesh8_answers_like_one_device(servers, llada_model):
    url = servers["mesh8"].url
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    model = client.models.list().data[0]
    assert model.id == "model" and model.mesh == {"data": 8, "model": 1}  # default name: the checkpoint dir
    tok = llada_model.tokenizer
    texts = ["The cat", "Once upon a time", "Hello"]
    out = client.completions.create(model="model", prompt=texts, max_tokens=24)
    expected = reference(llada_model, [tok.encode(t) for t in texts], [24] * 3)
    assert [c.text for c in out.choices] == expected
    chat = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "Hello there!"}],
                                          max_tokens=24, n=2)
    expected = reference(llada_model, [chat_ids(llada_model, "Hello there!")], [24])[0]
    assert [c.message.content for c in chat.choices] == [expected, expected]


def test_nemotron_plain_request(servers, nemotron_model):
    url = servers["nemotron"].url
    messages = [{"role": "user", "content": "Hello there!"}]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": messages}, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    tok = nemotron_model.tokenizer
    prompt = nemotron_model.chat_prompt(messages)
    out = nemotron_model.generate([prompt], gen_length=128, block_length=32, algorithm="static_block", factor=1.0,
                                  early_stop=True)
    expected = tok.decode(out.tokens[0][:int(out.lengths[0])].tolist(), skip_special_tokens=True)
    assert body["choices"][0]["message"]["content"] == expected
    assert body["choices"][0]["finish_reason"] == out.finish_reasons[0]
    assert body["usage"]["prompt_tokens"] == len(prompt)
    card = httpx.get(url + "/v1/models").json()["data"][0]
    assert card["family"] == "nemotron" and card["defaults"]["algorithm"] == "static_block"
    assert "static_block" in card["algorithms"]
    # the Nemotron decoder is greedy: temperature > 0 is refused, naming the field
    r = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "temperature": 0.7}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_demo_model_without_model_flag(servers):
    url = servers["demo"].url
    card = httpx.get(url + "/v1/models").json()["data"][0]
    assert card["id"] == "dllm-jax-demo" and card["demo"] is True
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    out = client.chat.completions.create(model="dllm-jax-demo",
                                         messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens <= 8
    # the trained demo model answers its tasks with the server's defaults (a held-out pair)
    out = client.chat.completions.create(model="dllm-jax-demo",
                                         messages=[{"role": "user", "content": "What is 47+38?"}])
    assert out.choices[0].message.content == "85" and out.choices[0].finish_reason == "stop"
    out = client.chat.completions.create(model="dllm-jax-demo",
                                         messages=[{"role": "user", "content": "Count from 7 to 21."}])
    assert out.choices[0].message.content == ", ".join(map(str, range(7, 22)))  # and stops at b
