"""Every deterministic golden case of both fixture sets: tokens, NFE and per-step commits."""

import json

import numpy as np
import pytest

from helpers import LLADA_DIR, NEMOTRON_DIR

LLADA_CASES = json.loads((LLADA_DIR / "golden_generate.json").read_text())["cases"]
FAST_CASES = json.loads((LLADA_DIR / "golden_fastdllm.json").read_text())["cases"]
NEMO_CASES = json.loads((NEMOTRON_DIR / "golden_generate.json").read_text())["cases"]
FAST_ALGO = {"generate": "no_cache", "generate_with_prefix_cache": "prefix_cache",
             "generate_with_dual_cache": "dual_cache"}


def _committed_at(trace_row, call):
    return np.flatnonzero(trace_row == call + 1).tolist()


@pytest.mark.parametrize("case", LLADA_CASES, ids=[c["name"] for c in LLADA_CASES])
def test_llada_generate(llada_model, case):
    args = dict(case["args"])
    assert args.pop("mask_id") == llada_model.mask_token_id
    prompts = case["prompt_ids"]
    if case["attention_mask"] is not None:  # left-padded rows: give the library the real tokens
        prompts = [[t for t, keep in zip(p, m) if keep] for p, m in zip(prompts, case["attention_mask"])]
    out = llada_model.generate(prompts, algorithm="basic", return_trace=True, **args)
    np.testing.assert_array_equal(out.tokens, np.array(case["generated_ids"]))
    assert out.nfe == case["num_model_calls"]
    plen = case["prompt_length"]
    for step in case["steps"]:
        for row, positions in enumerate(step["unmasked_positions"]):
            assert _committed_at(out.trace["commit_step"][row], step["step"]) == [p - plen for p in positions]


@pytest.mark.parametrize("case", FAST_CASES, ids=[c["name"] for c in FAST_CASES])
def test_fastdllm(llada_model, case):
    args = dict(case["args"])
    args.pop("mask_id")
    out = llada_model.generate(case["prompt_ids"], algorithm=FAST_ALGO[case["function"]], return_trace=True, **args)
    np.testing.assert_array_equal(out.tokens, np.array(case["generated_ids"]))
    assert out.nfe == case["nfe"]
    plen = case["prompt_length"]
    for step in case["steps"]:
        assert _committed_at(out.trace["commit_step"][0], step["call"]) == [p - plen for p in step["unmasked_positions"]]


@pytest.mark.parametrize("case", NEMO_CASES, ids=[c["name"] for c in NEMO_CASES])
def test_nemotron_static_block(nemotron_model, case):
    a = case["args"]
    out = nemotron_model.generate([case["prompt_ids"]], algorithm="static_block", gen_length=a["gen_length"],
                                  block_length=a["block_length"], factor=a["factor"],
                                  eos_token_id=a["eos_token_id"], return_trace=True)
    np.testing.assert_array_equal(out.tokens[0], case["generated_ids"])
    assert out.nfe == case["nfe"]
    plen, g = len(case["prompt_ids"]), a["gen_length"]
    for i, step in enumerate(case["steps"]):
        want = sorted(p - plen for p in step["unmasked_positions"] if p < plen + g)
        assert _committed_at(out.trace["commit_step"][0], i) == want
    # trailing masks stay masked, as upstream (g2 / g7 stop with masks left)
    assert int((out.tokens[0] == nemotron_model.mask_token_id).sum()) == case["masks_left_in_output"]


def test_nemotron_dllm_eval_alias(nemotron_model):
    case = NEMO_CASES[1]
    a = case["args"]
    out = nemotron_model.generate([case["prompt_ids"]], algorithm="dllm_eval", gen_length=a["gen_length"],
                                  block_length=a["block_length"], factor=a["factor"], eos_token_id=a["eos_token_id"])
    np.testing.assert_array_equal(out.tokens[0], case["generated_ids"])
