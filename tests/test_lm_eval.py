"""lm-eval (EleutherAI lm-evaluation-harness) against a real ``python -m serve`` process.

lm-eval's ``local-completions`` model drives ``POST /v1/completions`` (and, with
``tokenizer_backend=remote``, ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``
at the server root). Two tiny local tasks live in ``tests/lm_eval/`` (6 docs each):

* ``tiny_count_gen`` (generate_until): lm-eval's strings must equal what the same server answers
  the ``openai`` client for the same prompt / stop / max_tokens (this checks lm-eval's plumbing:
  prompt as text or as token ids, stop strings, max_tokens; not the sampler);
* ``tiny_mc`` (multiple_choice, i.e. loglikelihood requests: ``echo=true, logprobs=1,
  max_tokens=1``): every per-choice loglikelihood lm-eval reports must equal the sum of
  ``Model.score`` token logprobs over the continuation's positions, and acc / acc_norm must be
  the ones those direct numbers give.

What lm-eval reads back (lm_eval 0.4.13, ``lm_eval/models/openai_completions.py``): for
generation ``choices[i].index`` and ``choices[i].text`` (it does NOT cut at the stop strings
itself); for loglikelihood ``choices[i].logprobs.token_logprobs[ctxlen:-1]`` (summed) and
``choices[i].logprobs.top_logprobs[ctxlen:-1]`` (is_greedy: token logprob == max of the dict's
values), where ``ctxlen`` is the context length in lm-eval's own tokens and the trailing ``-1``
drops the one generated token (``max_tokens=1``). So an echo response must hold exactly
``len(prompt tokens) + 1`` entries, prompt first.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval[api]')")
# local-completions needs lm-eval's `api` extra (tenacity, aiohttp, requests, tqdm)
pytest.importorskip("tenacity", reason="lm-eval's api extra is not installed (pip install 'lm-eval[api]')")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import openai  # noqa: E402
import yaml  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from serve_helpers import LLADA_MODEL, Server, server_env  # noqa: E402

pytestmark = pytest.mark.slow

TASKS_SRC = Path(__file__).parent / "lm_eval"
GEN_TASK = "tiny_count_gen"
MC_TASK = "tiny_mc"
TOKENIZER = str(LLADA_MODEL)  # the fixture checkpoint dir holds the HF tokenizer files
MAX_LENGTH = 512  # the fixture's max_model_len
LL_TOL = 1e-3

# (tokenizer_backend, tokenized_requests) -> model_args; backend None sends text, no tokenizer
BACKENDS = {
    "hf-ids": dict(tokenizer_backend="huggingface", tokenizer=TOKENIZER, tokenized_requests=True),
    "hf-text": dict(tokenizer_backend="huggingface", tokenizer=TOKENIZER, tokenized_requests=False),
    "remote-ids": dict(tokenizer_backend="remote", tokenized_requests=True),
    "remote-text": dict(tokenizer_backend="remote", tokenized_requests=False),
    "none": dict(tokenizer_backend="None"),
}


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    s = Server("--model", str(LLADA_MODEL), "--mesh", "1", "--warmup-buckets", "none", env=server_env())
    yield s
    s.stop()


@pytest.fixture(scope="module")
def served_name(server) -> str:
    return httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    """The YAMLs of tests/lm_eval with absolute data_files (lm-eval / datasets resolve a relative
    data_files path against the cwd, not the YAML's dir)."""
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for src in TASKS_SRC.glob("*.yaml"):
        cfg = yaml.safe_load(src.read_text())
        files = cfg["dataset_kwargs"]["data_files"]
        cfg["dataset_kwargs"]["data_files"] = {k: str((TASKS_SRC / v).resolve()) for k, v in files.items()}
        (out / src.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return TaskManager(include_path=str(out))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def run_lm_eval(server, served_name, task_manager, task: str, **model_args) -> dict:
    """One lm-eval run of ``task`` through local-completions; returns lm-eval's results dict."""
    args = dict(model=served_name, base_url=server.url + "/v1/completions", max_retries=1,
                max_length=MAX_LENGTH, num_concurrent=1, timeout=300)
    args.update(model_args)
    results = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[task],
                                      task_manager=task_manager, log_samples=True, bootstrap_iters=0)
    assert results is not None and task in results["results"], results
    return results


# ---- direct library numbers ---------------------------------------------------------------------

def direct_loglikelihoods(model, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """log p(continuation | context) per (context_ids, continuation_ids), from ``Model.score``.

    Contract: ``model.score(sequences, top_k=0) -> list[ScoreOutput]``; ``token_logprobs[i]`` is
    ``log p(x_i | x_<i, x_i.. masked)`` for i >= 1 (NaN / None at 0), so a continuation's
    loglikelihood is the sum over its positions.
    """
    outs = model.score([list(c) + list(x) for c, x in pairs])
    assert len(outs) == len(pairs)
    lls = []
    for (ctx, cont), out in zip(pairs, outs):
        lp = np.asarray([np.nan if v is None else v for v in out.token_logprobs], dtype=np.float64)
        assert lp.shape == (len(ctx) + len(cont),)
        lls.append(float(lp[len(ctx):].sum()))
    return lls


def direct_loglikelihood(model, context_ids, continuation_ids) -> float:
    return direct_loglikelihoods(model, [(context_ids, continuation_ids)])[0]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair (causal): trailing context spaces move to the
    continuation; continuation ids = ids(context + continuation)[len(ids(context)):]."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


# ---- generate_until -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,num_concurrent", [
    ("hf-ids", 1), ("hf-text", 1), ("none", 1), ("hf-ids", 3), ("remote-ids", 1),
], ids=["hf-ids", "hf-text", "none", "hf-ids-concurrent", "remote-ids"])
def test_generate_until_matches_openai_client(server, served_name, task_manager, client, backend,
                                              num_concurrent):
    results = run_lm_eval(server, served_name, task_manager, GEN_TASK, num_concurrent=num_concurrent,
                          **BACKENDS[backend])
    samples = results["samples"][GEN_TASK]
    assert len(samples) == 6
    for s in samples:
        context, gen_kwargs = s["arguments"][0]
        # lm-eval appends the EOS string to `until` on its synchronous path when it has a tokenizer
        # (api_models.py model_call passes eos=; amodel_call does not)
        stop = list(gen_kwargs["until"])
        if BACKENDS[backend]["tokenizer_backend"] != "None" and num_concurrent <= 1:
            stop.append("<|endoftext|>")
        ref = client.completions.create(model=served_name, prompt=context, max_tokens=gen_kwargs["max_gen_toks"],
                                        temperature=0, stop=stop, seed=1234)
        got = s["resps"][0][0]
        assert got == ref.choices[0].text, (backend, context)
        assert s["filtered_resps"][0] == got
    em = float(np.mean([s["exact_match"] for s in samples]))
    assert results["results"][GEN_TASK]["exact_match,none"] == pytest.approx(em)


# ---- multiple_choice (loglikelihood) --------------------------------------------------------------

@pytest.mark.parametrize("backend", ["hf-ids", "hf-text", "remote-ids", "remote-text"])
def test_multiple_choice_matches_model_score(server, served_name, task_manager, llada_model, backend):
    results = run_lm_eval(server, served_name, task_manager, MC_TASK, **BACKENDS[backend])
    samples = sorted(results["samples"][MC_TASK], key=lambda s: s["doc_id"])
    assert len(samples) == 6

    tok = llada_model.tokenizer
    pairs, where = [], []
    for i, s in enumerate(samples):
        for j, (context, continuation) in enumerate(s["arguments"]):
            pairs.append(encode_pair(tok, context, continuation))
            where.append((i, j))
    direct = direct_loglikelihoods(llada_model, pairs)

    acc, acc_norm = [], []
    for i, s in enumerate(samples):
        n = len(s["arguments"])
        got = np.array([float(s["resps"][j][0][0]) for j in range(n)])
        want = np.array([direct[k] for k, (d, _) in enumerate(where) if d == i])
        np.testing.assert_allclose(got, want, rtol=0, atol=LL_TOL, err_msg=f"{backend} doc {i}")
        gold = s["doc"]["label"]
        lengths = np.array([float(len(c)) for c in s["doc"]["choices"]])
        for scores, out in ((want, acc), (want / lengths, acc_norm)):
            top = np.sort(scores)[-2:]
            assert top[1] - top[0] > 2 * LL_TOL, f"near tie in doc {i}: the comparison is ill-posed"
            out.append(1.0 if int(np.argmax(scores)) == gold else 0.0)
        assert s["acc"] == acc[-1] and s["acc_norm"] == acc_norm[-1]
    res = results["results"][MC_TASK]
    assert res["acc,none"] == pytest.approx(np.mean(acc))
    assert res["acc_norm,none"] == pytest.approx(np.mean(acc_norm))


def test_multiple_choice_needs_a_tokenizer(server, served_name, task_manager):
    """lm-eval itself refuses loglikelihood without a tokenizer (it needs ctxlen in tokens)."""
    with pytest.raises(AssertionError, match="Tokenizer is required"):
        run_lm_eval(server, served_name, task_manager, MC_TASK, **BACKENDS["none"])


# ---- the raw contracts lm-eval relies on ------------------------------------------------------------

def test_echo_logprobs_response_shape(server, served_name, llada_model):
    """The request lm-eval sends for one loglikelihood, answered as lm-eval parses it."""
    ctx, cont = encode_pair(llada_model.tokenizer, "Question: What is the capital of France?\nAnswer:", " Paris")
    ids = ctx + cont
    r = httpx.post(server.url + "/v1/completions", timeout=300, json={
        "model": served_name, "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1,
        "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the one generated token
    assert len(lp["top_logprobs"]) == len(ids) + 1 and len(lp["tokens"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(v, float) and math.isfinite(v) for v in lp["token_logprobs"][1:])
    for v, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert isinstance(top, dict) and top and max(top.values()) >= v - 1e-6
    ll = sum(lp["token_logprobs"][len(ctx):-1])  # exactly lm-eval's parse_logprobs
    assert ll == pytest.approx(direct_loglikelihood(llada_model, ctx, cont), abs=LL_TOL)


def test_remote_tokenizer_endpoints(server, llada_model):
    """What lm_eval.utils.RemoteTokenizer calls, at the server root (it strips /v1/completions)."""
    tok = llada_model.tokenizer
    with httpx.Client(base_url=server.url, timeout=60) as http:
        info = http.get("/tokenizer_info")
        assert info.status_code == 200, info.text
        info = info.json()
        assert info["eos_token"] == tok.eos_token  # required key (check_remote_tokenizer_support)
        assert info.get("bos_token") == tok.bos_token and info.get("pad_token") == tok.pad_token
        text = "Question: What is 2 plus 3?\nAnswer: five"
        r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
        assert r.status_code == 200, r.text
        ids = r.json()["tokens"]
        assert ids == tok(text, add_special_tokens=False).input_ids
        # lm-eval's eos_token_id / bos_token_id are tokenize(<special string>)[0]
        eos = http.post("/tokenize", json={"prompt": tok.eos_token, "add_special_tokens": False}).json()["tokens"]
        assert eos == [tok.eos_token_id]
        r = http.post("/detokenize", json={"tokens": ids})
        assert r.status_code == 200, r.text
        assert r.json()["prompt"] == text
