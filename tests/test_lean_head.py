"""The chunked output head (``dllm_jax.sampling.head``, issue 26): its statistics against the full
[B, Lb, V] path of ``proposal`` (x0 exactly, confidence / entropy / logprobs to float32 rounding),
and lean-head programs (no [B, Lb, V] logits) against full ones end to end: the same tokens, NFE,
commit confidences and logprobs for every block decoder that runs greedy rows on them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dllm_jax.sampling import generation, head, proposal
from dllm_jax.sampling.params import SamplingParams, lean_head_ok
from dllm_jax.sampling.programs import program_key

K = 5


def _logits(v, mask_id, seed=0):
    """[3, 4, v] random logits with the hard cases: the mask token the largest logit of a
    position, three-way ties for the maximum, a tie at the top-k boundary."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(3, 4, v)) * 3).astype(np.float32)
    x[0, 0, mask_id] = 25.0  # the mask is the max (never proposed, but in the normaliser)
    x[1, 1, [3, v // 2, v - 1]] = 15.0  # ties for the max: the lowest index wins
    x[2, 3, [1, 2]] = 19.0  # below id 3, tied with each other  # ties
    x[2, 3, 3] = 20.0
    return jnp.asarray(x)


def _stats(logits, mask_id, chunk, keep=False):
    v = logits.shape[-1]
    return head.scan(lambda s, w: jax.lax.dynamic_slice_in_dim(logits, s, w, axis=-1), logits.shape[:2], v, mask_id,
                     top_k=K, keep_logits=keep, chunk=chunk)


@pytest.mark.parametrize("v,chunk,mask_id", [(1000, 128, 5), (1000, 1000, 999), (37, 8, 36), (384, 100, 0),
                                             (384, 64, 200)])
def test_chunked_statistics_match_the_full_path(v, chunk, mask_id):
    """Vocabularies divisible and not by the chunk (the last chunk overlaps the one before)."""
    logits = _logits(v, mask_id)
    stats, kept = _stats(logits, mask_id, chunk, keep=True)
    np.testing.assert_array_equal(kept, logits)
    keys = jax.random.split(jax.random.key(0), 3)
    x0, conf = proposal.propose(logits, jnp.zeros(3), keys, mask_id)
    np.testing.assert_array_equal(stats.argmax, x0)  # exactly jnp.argmax (mask excluded, ties: lowest)
    assert int(stats.argmax[1, 1]) == 3 and int(stats.argmax[0, 0]) != mask_id
    np.testing.assert_array_equal(stats.best, jnp.take_along_axis(logits, x0[..., None], -1)[..., 0])
    np.testing.assert_allclose(stats.prob(stats.best), conf, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(stats.entropy(), proposal.entropy(logits, mask_id), rtol=2e-6, atol=2e-6)
    chosen, top_ids, top_lp = proposal.token_logprobs(logits, x0, K, mask_id)
    got = stats.raw_logprobs(stats.best)
    np.testing.assert_allclose(got[0], chosen, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(got[1], top_ids)
    np.testing.assert_allclose(got[2], top_lp, rtol=0, atol=2e-6)
    assert got[1][2, 3].tolist()[:3] == [3, 1, 2]  # ties in the top k: the lowest id first


def test_block_head_matches_model_head(llada_model):
    """Random hidden states through the fixture's head: chunked (a chunk that does not divide
    V = 384) vs ``model.head`` and the full-path proposal, with and without CFG."""
    m = llada_model
    model = nnx.merge(m.graphdef, m.params)
    mask_id, d = m.mask_token_id, m.spec.d_model
    h = jax.random.normal(jax.random.key(1), (3, 2, 8, d), jnp.float32)
    w = jnp.asarray([0.0, 1.5, 0.7])
    for cfg in (None, w):
        hb = h[:, 0] if cfg is None else h
        stats, logits = head.block_head(model, hb, cfg, mask_id, top_k=K, keep_logits=True, chunk=100)
        if cfg is None:
            want = model.head(hb)
        else:
            cond, unc = model.head(h[:, 0]), model.head(h[:, 1])
            want = jnp.where(w[:, None, None] > 0, unc + (w[:, None, None] + 1.0) * (cond - unc), cond)
        np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-5)
        x0, conf = proposal.propose(logits, jnp.zeros(3), jax.random.split(jax.random.key(0), 3), mask_id)
        np.testing.assert_array_equal(stats.argmax, x0)
        np.testing.assert_allclose(stats.prob(stats.best), conf, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(stats.entropy(), proposal.entropy(logits, mask_id), rtol=2e-6, atol=2e-6)


def test_lean_head_ok():
    base = dict(gen_length=16, block_length=8)
    assert lean_head_ok(SamplingParams(**base).resolve("llada"))
    assert lean_head_ok(SamplingParams(**base, algorithm="dinfer_hierarchy", logprobs=3,
                                       logprobs_mode="processed").resolve("llada"))
    assert not lean_head_ok(SamplingParams(**base, temperature=0.5).resolve("llada"))
    assert not lean_head_ok(SamplingParams(**base, algorithm="dinfer_credit").resolve("llada"))
    assert not lean_head_ok(SamplingParams(**base, algorithm="static_block").resolve("nemotron"))


def test_program_key_selects_the_lean_head(llada_model):
    greedy = SamplingParams(gen_length=16, block_length=8).resolve("llada")
    sampled = dataclasses.replace(greedy, temperature=0.7)
    assert not program_key(llada_model, 5, greedy, 1).lean_head  # opt-in: the default admits every row
    assert program_key(llada_model, 5, greedy, 1, lean_head=True).lean_head
    assert not program_key(llada_model, 5, sampled, 1, lean_head=True).lean_head


ALGOS = ["basic", "no_cache", "prefix_cache", "dual_cache", "dinfer_blockwise", "dinfer_hierarchy"]


def _rows_kwargs(algorithm):
    """Four greedy rows: every per-row rule (or the dInfer rule at per-row thresholds) and every
    remasking policy, logprobs tracked (raw and processed: equal at T = 0)."""
    if algorithm.startswith("dinfer"):
        rule = dict(threshold=[0.9, 0.5, 0.7, 0.95])
    else:
        rule = dict(threshold=[None, 0.7, None, None], factor=[None, None, 1.0, None],
                    entropy_bound=[None, None, None, 0.3])
    return dict(algorithm=algorithm, gen_length=16, block_length=8, steps=16, logprobs=K,
                logprobs_mode=["raw", "processed", "raw", "raw"],
                remasking=["low_confidence", "random", "leftmost", "low_confidence"], seed=[1, 2, 3, 4], **rule)


def _generate(model, prompts, lean: bool, monkeypatch, **kw):
    with monkeypatch.context() as mp:
        if not lean:
            mp.setattr(generation, "lean_head_ok", lambda p: False)
        return model.generate(prompts, return_trace=True, **kw)


def _assert_same(a, b, what):
    np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=what)
    assert a.nfe == b.nfe and np.array_equal(a.nfe_per_row, b.nfe_per_row), what
    for name in ("commit_step", "commit_conf"):
        np.testing.assert_array_equal(a.trace[name], b.trace[name], err_msg=f"{what}: {name}")
    if a.logprobs is not None:
        for name in a.logprobs:
            np.testing.assert_array_equal(a.logprobs[name], b.logprobs[name], err_msg=f"{what}: {name}")


@pytest.mark.parametrize("algorithm", ALGOS)
def test_lean_program_equals_full_program(llada_model, algorithm, monkeypatch):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (5, 12, 3, 9)]
    kw = _rows_kwargs(algorithm)
    lean = _generate(llada_model, prompts, True, monkeypatch, **kw)
    full = _generate(llada_model, prompts, False, monkeypatch, **kw)
    _assert_same(lean, full, algorithm)


def test_chunk_width():
    assert head.chunk_width(126464) == 7904 and head.chunk_width(384) == 384
    assert head.chunk_width(384, 100) == 96 and head.chunk_width(384, 90) == 90  # no divisor in [68, 90]


@pytest.mark.parametrize("chunk", [100, 90])
def test_lean_program_equals_full_program_cfg_and_chunks(monkeypatch, chunk):
    """A fresh model (its own programs) with small chunks (V = 384: four whole chunks of 96, or
    five of 90, the last overlapping the fourth), CFG rows beside unguided ones, and the dual cache."""
    import dllm_jax
    from helpers import LLADA_DIR

    model = dllm_jax.load(LLADA_DIR / "model")
    monkeypatch.setattr(head, "HEAD_CHUNK", chunk)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (5, 12, 3)]
    cases = {"basic": dict(algorithm="basic", gen_length=16, block_length=8, steps=16, cfg_scale=[0.0, 1.0, 0.5]),
             "dual_cache": dict(algorithm="dual_cache", gen_length=16, block_length=8, steps=16, threshold=0.7,
                                logprobs=K)}
    for name, kw in cases.items():
        lean = _generate(model, prompts, True, monkeypatch, **kw)
        full = _generate(model, prompts, False, monkeypatch, **kw)
        _assert_same(lean, full, name)
        plain = dllm_jax.load(LLADA_DIR / "model")  # one chunk (the default width)
        monkeypatch.setattr(head, "HEAD_CHUNK", 8192)
        ref = plain.generate(prompts, **kw)
        monkeypatch.setattr(head, "HEAD_CHUNK", chunk)
        np.testing.assert_array_equal(lean.tokens, ref.tokens, err_msg=name)


def test_lean_session_refuses_sampled_rows(llada_model):
    """A lean program has no logits to draw from: admitting a T > 0 (or credit) row is an error,
    with ``isolate`` that row's alone."""
    from dllm_jax.sampling import DecodeSession, Row

    greedy = SamplingParams(gen_length=16, block_length=8, steps=16).resolve("llada")
    sampled = dataclasses.replace(greedy, temperature=0.7)
    session = DecodeSession(llada_model, program_key(llada_model, 5, greedy, 2, lean_head=True))
    assert session.key.lean_head
    with pytest.raises(ValueError, match="greedy rows only"):
        session.admit({0: Row([1, 2, 3], sampled)})
    failed = session.admit({0: Row([1, 2, 3], greedy), 1: Row([4, 5], sampled)}, isolate=True)
    assert list(failed) == [1] and list(session.slots) == [0]
