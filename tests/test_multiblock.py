"""Multi-block decoding (``block_add_threshold``, docs/sampling.md "Multi-block decoding"): the
jitted, batched programs against the Python-loop reference (tests/reference_multiblock.py)."""

import zlib

import numpy as np
import pytest

from dllm_jax.sampling import SamplingError, SamplingParams
from reference_multiblock import reference_multi_block
from reference_sampler import Forward

G, LB = 32, 8
ALGOS = ["basic", "no_cache", "prefix_cache", "dual_cache"]


@pytest.fixture(scope="module")
def fwd(llada_model):
    return Forward(llada_model)


def _prompts(rng, lengths, vocab=256):
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


# every rule a look-ahead row may use, several block_add_thresholds, greedy and sampled, early stop
ROWS = [dict(threshold=0.3, block_add_threshold=0.25), dict(threshold=0.6, block_add_threshold=0.5),
        dict(factor=2.0, block_add_threshold=0.25), dict(entropy_bound=1.0, block_add_threshold=0.125),
        dict(threshold=0.4, block_add_threshold=0.25, temperature=0.8, seed=7),
        dict(threshold=0.2, block_add_threshold=0.125, early_stop=True),
        dict(threshold=0.5, block_add_threshold=1.0)]
ROWS = [dict(r, stop_token_ids=(125, 106)) for r in ROWS]
KNOBS = (("threshold", None), ("factor", None), ("entropy_bound", None), ("block_add_threshold", None),
         ("temperature", 0.0), ("seed", 0), ("early_stop", False))


@pytest.mark.parametrize("algorithm", ALGOS)
def test_multi_block_matches_python_loop_reference(llada_model, fwd, algorithm):
    """A ragged batch of look-ahead rows (table ROWS) vs one-by-one reference: tokens, forwards per
    row and every position's commit step."""
    rng = np.random.default_rng(zlib.crc32(b"multi-block " + algorithm.encode()))
    prompts = _prompts(rng, [9, 9, 4, 13, 9, 9, 6])
    kwargs = {k: [r.get(k, d) for r in ROWS] for k, d in KNOBS}
    out = llada_model.generate(prompts, algorithm=algorithm, gen_length=G, block_length=LB, return_trace=True,
                               stop_token_ids=(125, 106), **kwargs)
    ahead = 0
    for i, row in enumerate(ROWS):
        params = SamplingParams(algorithm=algorithm, gen_length=G, block_length=LB, **row)
        tokens, nfe, commit = reference_multi_block(llada_model, prompts[i], params, fwd)
        np.testing.assert_array_equal(out.tokens[i], tokens, err_msg=f"row {i} {row}")
        assert out.nfe_per_row[i] == nfe, (i, row)
        np.testing.assert_array_equal(out.trace["commit_step"][i], commit, err_msg=f"row {i} {row}")
        # a position committed before its block's first forward was committed ahead
        blocks = commit.reshape(-1, LB)
        ahead += sum(int(np.sum((b >= 0) & (b < blocks[k].max(initial=0)))) for k, b in enumerate(blocks[1:]))
    assert ahead > 0  # the look-ahead did commit tokens


@pytest.mark.parametrize("algorithm", ALGOS)
def test_block_add_threshold_1_is_single_block(llada_model, algorithm):
    """At block_add_threshold 1 no look-ahead block ever activates: tokens and forwards are those
    of single-block decoding (the wider window changes nothing the block reads)."""
    rng = np.random.default_rng(3)
    prompts = _prompts(rng, [5, 12, 9])
    rules_ = dict(threshold=[0.5, None, None], factor=[None, 2.0, None], entropy_bound=[None, None, 0.5])
    single = llada_model.generate(prompts, algorithm=algorithm, gen_length=G, block_length=LB, **rules_)
    multi = llada_model.generate(prompts, algorithm=algorithm, gen_length=G, block_length=LB,
                                 block_add_threshold=1.0, **rules_)
    np.testing.assert_array_equal(multi.tokens, single.tokens)
    np.testing.assert_array_equal(multi.nfe_per_row, single.nfe_per_row)


def test_shifted_predictions_and_full_logits_match_reference(llada_model, fwd):
    """Shifted predictions, and a top_p row at T > 0: its program keeps the [B, W, V] logits
    (not the lean head) for the whole batch."""
    prompts = _prompts(np.random.default_rng(11), [7, 10])
    rows = [dict(threshold=0.3), dict(threshold=0.4, temperature=0.7, top_p=0.9, seed=9)]
    rows = [dict(r, block_add_threshold=0.25, shift_logits=True) for r in rows]
    kwargs = {k: [r.get(k, d) for r in rows] for k, d in (("threshold", None), ("temperature", 0.0), ("top_p", 1.0),
                                                           ("seed", 0))}
    out = llada_model.generate(prompts, algorithm="dual_cache", gen_length=G, block_length=LB, block_add_threshold=0.25,
                               shift_logits=True, **kwargs)
    for i, p in enumerate(prompts):
        tokens, nfe, _ = reference_multi_block(llada_model, p, SamplingParams(algorithm="dual_cache", gen_length=G,
                                                                              block_length=LB, **rows[i]), fwd)
        np.testing.assert_array_equal(out.tokens[i], tokens, err_msg=f"row {i} {rows[i]}")
        assert out.nfe_per_row[i] == nfe


@pytest.mark.parametrize("kwargs", [
    dict(block_add_threshold=0.0, threshold=0.5), dict(block_add_threshold=1.5, threshold=0.5),
    dict(block_add_threshold=True, threshold=0.5), dict(block_add_threshold="0.5", threshold=0.5),
    dict(block_add_threshold=0.5),  # the static schedule
    dict(block_add_threshold=0.5, threshold=0.5, remasking="random"),
    dict(block_add_threshold=0.5, threshold=0.5, algorithm="dinfer_blockwise")])
def test_bad_block_add_threshold(llada_model, kwargs):
    kwargs = {"algorithm": "dual_cache", **kwargs}
    with pytest.raises(SamplingError) as e:
        SamplingParams(gen_length=G, block_length=LB, **kwargs).resolve(llada_model.family)
    assert e.value.param == "block_add_threshold"
