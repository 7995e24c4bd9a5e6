"""The chunked output head (``dllm_jax.sampling.head``, issue 26): its statistics against the full
[B, Lb, V] path of ``proposal`` (x0 exactly, confidence / entropy / logprobs to float32 rounding),
its chunked Gumbel noise against ``jax.random.gumbel`` (bitwise), and lean-head programs (no
[B, Lb, V] logits) against full ones end to end: the same tokens, NFE, commit confidences and
logprobs for every block decoder that runs greedy and unfiltered T > 0 rows on them, float32 and
bf16; a server with the lean head on serves what ``Model.generate`` gives."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dllm_jax.sampling import generation, head, head_filters, proposal
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


GUMBEL_SHAPES = [(4, 384, 100), (3, 37, 8), (1, 5, 5), (2, 1000, 128), (8, 126464, 7904), (32, 126464, 8192)]


@pytest.mark.parametrize("lb,v,width", GUMBEL_SHAPES)
def test_gumbel_columns_are_jax_random_gumbel(lb, v, width):
    """``proposal.gumbel_columns`` (JAX internals: the threefry primitive on flat indices) against
    ``jax.random.gumbel`` on the full shape, bit for bit, for every chunk the head takes (the last
    one clamped to end at V where the width does not divide it, at LLaDA's vocabulary with and
    without a whole-chunk width), under ``vmap`` over step keys made as the programs make them
    and for one key alone. A JAX upgrade that changes either stream fails here."""
    assert proposal.chunked_gumbel_exact()  # the default configuration the lean head relies on
    seeds = jax.random.split(jax.random.key(3), 3)
    keys = proposal.noise_keys(jax.vmap(jax.random.fold_in)(seeds, jnp.arange(3) + 5))[:, 0]
    full = np.asarray(jax.vmap(lambda k: jax.random.gumbel(k, (lb, v), jnp.float32))(keys))  # [3, lb, v]
    np.testing.assert_array_equal(np.asarray(jax.random.gumbel(keys[1], (lb, v), jnp.float32)), full[1])
    cols = jax.jit(jax.vmap(lambda k, start: proposal.gumbel_columns(k, lb, v, start, width), in_axes=(0, None)))
    starts = sorted({min(i * width, v - width) for i in range(-(-v // width))})
    for start in starts:
        np.testing.assert_array_equal(np.asarray(cols(keys, start)), full[:, :, start:start + width],
                                      err_msg=f"columns {start}..{start + width - 1}")
    one = np.asarray(jax.jit(lambda k: proposal.gumbel_columns(k, lb, v, 0, v))(keys[2]))  # the whole row at once
    np.testing.assert_array_equal(one, full[2])


@pytest.mark.parametrize("v,chunk,mask_id", [(1000, 128, 5), (1000, 1000, 999), (37, 8, 36), (384, 100, 0)])
def test_chunked_draw_matches_the_full_draw(v, chunk, mask_id):
    """The lean head's T > 0 draw (``head.scan`` with noise keys) is ``proposal.draw``'s token for
    token (mask token never drawn; rows at T = 0 keep the argmax), its logit and confidence those of
    the drawn token; unfiltered 'processed' logprobs from the statistics against
    ``proposal.processed_logprobs`` (to float32 rounding, the same top ids)."""
    logits = _logits(v, mask_id)
    t = jnp.asarray([0.7, 0.0, 1.6])
    keys = jax.vmap(jax.random.fold_in)(jax.random.split(jax.random.key(5), 3), jnp.arange(3))
    noise = proposal.noise_keys(keys)[:, 0]
    stats, _ = head.scan(lambda s, w: jax.lax.dynamic_slice_in_dim(logits, s, w, axis=-1), logits.shape[:2], v, mask_id,
                         top_k=K, chunk=chunk, temperature=t, noise=noise, scaled=t > 0)
    want, _ = proposal.draw(logits, t, keys, mask_id)
    x0, logit = stats.proposal(t)
    np.testing.assert_array_equal(x0, want)
    assert not np.any(np.asarray(x0) == mask_id)
    np.testing.assert_array_equal(x0[1], stats.argmax[1])
    assert not np.array_equal(x0[::2], stats.argmax[::2])  # (not vacuous: the draw is not the argmax)
    np.testing.assert_array_equal(logit, jnp.take_along_axis(logits, want[..., None], -1)[..., 0])
    floor = jnp.full(want.shape, -jnp.inf)
    got = stats.processed_logprobs(logit, t, floor)
    ref = proposal.processed_logprobs(logits, want, K, mask_id, t, floor)
    for i in (0, 2):
        np.testing.assert_allclose(got[0][i], ref[0][i], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got[1][i], ref[1][i])
        np.testing.assert_allclose(got[2][i], ref[2][i], rtol=0, atol=1e-5)


FILTERS = [(1, 0.0), (5, 0.0), (head_filters.FILTER_K, 0.0), (0, 0.05), (0, 0.5), (5, 0.05), (1, 0.5),
           (head_filters.FILTER_K, 0.5)]


def _filtered_head(logits, mask_id, chunk):
    """(lean, full) of rows at T = 0.7, 1e-7 (T' = 1e-6) and 1.6 under (top_k, min_p) with top_p = 1:
    the statistics' floor, the chunked draw (first pass, floor, second pass) and its 'processed'
    logprobs vs ``proposal.filter_floor`` / ``draw`` / ``processed_logprobs`` (one jit per shape)."""
    v = logits.shape[-1]
    t = jnp.asarray([0.7, 1e-7, 1.6])
    keys = jax.vmap(jax.random.fold_in)(jax.random.split(jax.random.key(5), 3), jnp.arange(3))
    noise = proposal.noise_keys(keys)[:, 0]

    @jax.jit
    def run(logits, t, top_k, min_p):  # (arguments: no constant folding of the sort, or of 1 / T)
        def chunk_logits(s, w):
            return jax.lax.dynamic_slice_in_dim(logits, s, w, axis=-1)

        knobs = SimpleNamespace(temperature=t, top_k=jnp.full(3, top_k), top_p=jnp.ones(3), min_p=jnp.full(3, min_p),
                                processed_logprobs=jnp.ones(3, bool))
        stats, _ = head.scan(chunk_logits, logits.shape[:2], v, mask_id, top_k=K, chunk=chunk, temperature=t,
                             noise=noise, tops=jnp.ones(3, bool))
        floor = head_filters.floor(stats.best, stats.filter_vals, knobs)
        stats = head_filters.rescan(chunk_logits, stats, floor, v, head.chunk_width(v, chunk), mask_id, t, noise=noise,
                                    draw=jnp.ones(3, bool), lse=jnp.ones(3, bool))
        x0, logit = stats.proposal(t)
        filters = (knobs.top_k, knobs.top_p, knobs.min_p)
        ref_floor = proposal.filter_floor(logits, t, *filters, mask_id)
        ref_x0, draw_floor = proposal.draw(logits, t, keys, mask_id, filters)
        lean = (floor, x0, stats.processed_logprobs(logit, t, floor))
        return lean, (ref_floor, ref_x0, proposal.processed_logprobs(logits, ref_x0, K, mask_id, t, draw_floor)), logit

    return lambda top_k, min_p: run(logits, t, top_k, min_p)


@pytest.mark.parametrize("v,chunk,mask_id", [(1000, 128, 5), (1000, 1000, 999), (37, 8, 36), (384, 100, 0),
                                             (384, 64, 200)])
def test_filters_from_statistics_match_the_full_path(v, chunk, mask_id):
    """top_k (1, 5, ``FILTER_K``) and min_p (0.05, 0.5), alone and together, with top_p off: the
    floor from the statistics (the running top-K, the maximum) is ``proposal.filter_floor``'s bit
    for bit, the second pass's draw ``proposal.draw``'s token for token (in the filter set, the mask
    token never), and the 'processed' logprobs over the filter set ``proposal.processed_logprobs``'
    (to float32 rounding; the same top ids, -inf and the same filler ids beyond the set). Random
    logits with ties, the mask token as a maximum, several chunks, V not divisible by the chunk."""
    logits = _logits(v, mask_id)
    run = _filtered_head(logits, mask_id, chunk)
    sizes = set()
    for top_k, min_p in FILTERS:
        (floor, x0, got), (ref_floor, ref_x0, ref), logit = run(top_k, min_p)
        what = f"top_k={top_k} min_p={min_p}"
        np.testing.assert_array_equal(floor, ref_floor, err_msg=what)
        assert np.all(np.isfinite(floor)) == (top_k < v - 1 or min_p > 0), what  # (-inf: top_k keeps every token)
        np.testing.assert_array_equal(x0, ref_x0, err_msg=what)
        assert not np.any(np.asarray(x0) == mask_id)
        # row 1, T' = 1e-6: the reference rounds l / T' ~ 1e7 to whole numbers (float32), the
        # statistics shift first ((l - max) / T'): they agree to that rounding
        for i, atol in ((0, 2e-5), (1, 1.0), (2, 2e-5)):
            np.testing.assert_allclose(got[0][i], ref[0][i], rtol=0, atol=atol, err_msg=what)
            np.testing.assert_allclose(got[2][i], ref[2][i], rtol=0, atol=atol, err_msg=what)
        np.testing.assert_array_equal(got[1], ref[1], err_msg=what)
        sizes.update(np.isfinite(np.asarray(got[2])).sum(-1).ravel().tolist())
    assert {1, K} <= sizes and len(sizes) > 2, sizes  # (not vacuous: sets smaller than the top k, and not)


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
    assert lean_head_ok(SamplingParams(**base, temperature=0.5, seed=3, logprobs=2,
                                       logprobs_mode="processed").resolve("llada"))
    assert lean_head_ok(SamplingParams(**base, temperature=0.5, remasking="random").resolve("llada"))
    assert lean_head_ok(SamplingParams(**base, top_k=5, top_p=0.5).resolve("llada"))  # (T = 0: no-ops)
    for f in (dict(top_k=5), dict(min_p=0.1), dict(top_k=head_filters.FILTER_K, min_p=0.5)):  # from the statistics
        assert lean_head_ok(SamplingParams(**base, temperature=0.5, **f).resolve("llada")), f
    for f in (dict(top_p=0.9), dict(top_k=head_filters.FILTER_K + 1), dict(top_k=5, top_p=0.99)):  # the full sort
        assert not lean_head_ok(SamplingParams(**base, temperature=0.5, **f).resolve("llada")), f
    assert not lean_head_ok(SamplingParams(**base, algorithm="dinfer_credit").resolve("llada"))
    assert not lean_head_ok(SamplingParams(**base, algorithm="static_block").resolve("nemotron"))


def test_program_key_selects_the_lean_head(llada_model):
    greedy = SamplingParams(gen_length=16, block_length=8).resolve("llada")
    sampled = dataclasses.replace(greedy, temperature=0.7)
    assert not program_key(llada_model, 5, greedy, 1).lean_head  # opt-in: the default admits every row
    assert program_key(llada_model, 5, greedy, 1, lean_head=True).lean_head
    assert program_key(llada_model, 5, sampled, 1, lean_head=True).lean_head
    assert program_key(llada_model, 5, dataclasses.replace(sampled, top_k=5, min_p=0.1), 1, lean_head=True).lean_head
    assert not program_key(llada_model, 5, dataclasses.replace(sampled, top_p=0.9), 1, lean_head=True).lean_head


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
    """``model.generate`` on a lean (or, with ``lean`` False, a full) program: checked on the key it ran."""
    keys = []
    with monkeypatch.context() as mp:
        if not lean:
            mp.setattr(generation, "lean_head_ok", lambda p: False)
        session = generation.DecodeSession
        mp.setattr(generation, "DecodeSession", lambda m, key: (keys.append(key), session(m, key))[1])
        out = model.generate(prompts, return_trace=True, **kw)
    assert [k.lean_head for k in keys] == [lean], keys
    return out


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


def _sampled_kwargs(algorithm):
    """Four rows, three at T > 0 (seeded): the rules of ``_rows_kwargs``, raw and processed
    logprobs at T > 0 and processed at T = 0, random remasking at T > 0 (its noise is the step
    key's other half)."""
    kw = _rows_kwargs(algorithm)
    kw.update(temperature=[0.8, 1.3, 0.0, 0.5], logprobs_mode=["processed", "raw", "processed", "processed"],
              remasking=["low_confidence", "random", "low_confidence", "leftmost"], seed=[11, 12, 13, 14])
    return kw


@pytest.fixture(scope="module")
def bf16_model():
    import dllm_jax
    from helpers import LLADA_DIR

    return dllm_jax.load(LLADA_DIR / "model", dtype="bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("algorithm", ["basic", "prefix_cache", "dual_cache"])
def test_lean_program_equals_full_program_sampled(request, algorithm, dtype, monkeypatch):
    """T > 0 seeded rows beside a greedy one: the lean program's chunked draw gives the full
    program's tokens, NFE, commit steps and confidences, raw and processed logprobs, bit for bit,
    in float32 and bf16."""
    model = request.getfixturevalue("llada_model" if dtype == "float32" else "bf16_model")
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (5, 12, 3, 9)]
    kw = _sampled_kwargs(algorithm)
    lean = _generate(model, prompts, True, monkeypatch, **kw)
    full = _generate(model, prompts, False, monkeypatch, **kw)
    _assert_same(lean, full, f"{algorithm} {dtype}")
    greedy = _generate(model, prompts, True, monkeypatch, **dict(kw, temperature=0.0))
    assert not np.array_equal(lean.tokens[[0, 1, 3]], greedy.tokens[[0, 1, 3]])  # the rows did sample


@pytest.fixture(scope="module")
def fresh_models():
    """dtype -> a model of its own (its own compiled programs: the test below runs them with small
    head chunks)."""
    import dllm_jax
    from helpers import LLADA_DIR

    return {dtype: dllm_jax.load(LLADA_DIR / "model", dtype=dtype) for dtype in ("float32", "bfloat16")}


def _filtered_kwargs(algorithm):
    """Five rows: top_k (5), min_p (0.1), both (3, 0.05) at T > 0 beside a greedy row and an
    unfiltered T > 0 one; every per-row rule and remasking policy, raw and processed logprobs."""
    return dict(algorithm=algorithm, gen_length=16, block_length=8, steps=16, logprobs=K,
                threshold=[None, 0.7, None, None, 0.8], factor=[None, None, 1.0, None, None],
                entropy_bound=[None, None, None, 0.3, None], temperature=[0.8, 1.3, 0.0, 0.5, 0.9],
                top_k=[5, 0, 0, 3, 0], min_p=[0.0, 0.1, 0.0, 0.05, 0.0], seed=[11, 12, 13, 14, 15],
                logprobs_mode=["processed", "raw", "processed", "processed", "processed"],
                remasking=["low_confidence", "random", "low_confidence", "leftmost", "low_confidence"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("algorithm", ["basic", "prefix_cache", "dual_cache"])
def test_lean_program_equals_full_program_filtered(fresh_models, algorithm, dtype, monkeypatch):
    """top_k / min_p rows (top_p off) run lean: the statistics' floor and the second chunk pass give
    the full program's tokens, NFE, commit steps and confidences, raw and processed logprobs, bit
    for bit, in float32 and bf16, over four head chunks (V = 384 in chunks of 96)."""
    model = fresh_models[dtype]
    monkeypatch.setattr(head, "HEAD_CHUNK", 100)
    rng = np.random.default_rng(10)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (5, 12, 3, 9, 7)]
    kw = _filtered_kwargs(algorithm)
    lean = _generate(model, prompts, True, monkeypatch, **kw)
    full = _generate(model, prompts, False, monkeypatch, **kw)
    _assert_same(lean, full, f"{algorithm} {dtype}")
    plain = _generate(model, prompts, True, monkeypatch, **dict(kw, top_k=0, min_p=0.0))
    np.testing.assert_array_equal(lean.tokens[[2, 4]], plain.tokens[[2, 4]])  # (rows without filters)
    # (not vacuous: the filters changed what the rows drew, and the processed rows' distribution)
    assert any(not np.array_equal(lean.tokens[i], plain.tokens[i]) for i in (0, 1, 3))
    for i in (0, 3):
        assert not np.array_equal(lean.logprobs["token_logprobs"][i], plain.logprobs["token_logprobs"][i]), i


def test_chunk_width():
    assert head.chunk_width(126464) == 7904 and head.chunk_width(384) == 384
    assert head.chunk_width(384, 100) == 96 and head.chunk_width(384, 90) == 90  # no divisor in [68, 90]


@pytest.mark.parametrize("chunk", [100, 90])
def test_lean_program_equals_full_program_cfg_and_chunks(monkeypatch, chunk):
    """A fresh model (its own programs) with small chunks (V = 384: four whole chunks of 96, or
    five of 90, the last overlapping the fourth), CFG rows beside unguided ones, and the dual cache;
    T > 0 seeded rows beside greedy ones in both (the draw's noise chunk by chunk)."""
    import dllm_jax
    from helpers import LLADA_DIR

    model = dllm_jax.load(LLADA_DIR / "model")
    monkeypatch.setattr(head, "HEAD_CHUNK", chunk)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (5, 12, 3)]
    cases = {"basic": dict(algorithm="basic", gen_length=16, block_length=8, steps=16, cfg_scale=[0.0, 1.0, 0.5],
                           temperature=[0.0, 0.9, 1.2], seed=[1, 2, 3]),
             "dual_cache": dict(algorithm="dual_cache", gen_length=16, block_length=8, steps=16, threshold=0.7,
                                logprobs=K, temperature=[0.7, 0.0, 1.0], seed=[4, 5, 6],
                                logprobs_mode=["processed", "processed", "raw"])}
    for name, kw in cases.items():
        lean = _generate(model, prompts, True, monkeypatch, **kw)
        full = _generate(model, prompts, False, monkeypatch, **kw)
        _assert_same(lean, full, name)
        plain = dllm_jax.load(LLADA_DIR / "model")  # one chunk (the default width)
        monkeypatch.setattr(head, "HEAD_CHUNK", 8192)
        ref = plain.generate(prompts, **kw)
        monkeypatch.setattr(head, "HEAD_CHUNK", chunk)
        np.testing.assert_array_equal(lean.tokens, ref.tokens, err_msg=name)


def test_lean_session_refuses_filtered_rows(llada_model):
    """A lean program has no logits to sort: admitting a T > 0 row with top_p (or a credit row) is
    an error, with ``isolate`` that row's alone; an unfiltered T > 0 row and a top_k one are admitted."""
    from dllm_jax.sampling import DecodeSession, Row

    greedy = SamplingParams(gen_length=16, block_length=8, steps=16).resolve("llada")
    sampled = dataclasses.replace(greedy, temperature=0.7)
    filtered = dataclasses.replace(sampled, top_p=0.9)
    session = DecodeSession(llada_model, program_key(llada_model, 5, greedy, 4, lean_head=True))
    assert session.key.lean_head
    with pytest.raises(ValueError, match="need the full logits"):
        session.admit({0: Row([1, 2, 3], filtered)})
    top_k = dataclasses.replace(sampled, top_k=5)
    failed = session.admit({0: Row([1, 2, 3], greedy), 1: Row([4, 5], filtered), 2: Row([6], sampled),
                            3: Row([7, 8], top_k)}, isolate=True)
    assert list(failed) == [1] and sorted(session.slots) == [0, 2, 3]


def test_lean_head_option():
    from serve.__main__ import parse_args
    from serve.engine.engine_types import lean_head_on

    assert parse_args([]).lean_head == "auto" and parse_args(["--lean-head", "off"]).lean_head == "off"
    assert lean_head_on("auto", 126464) and not lean_head_on("auto", 384) and lean_head_on("auto", 32768)
    assert lean_head_on("on", 384) and not lean_head_on("off", 126464)
    with pytest.raises(ValueError):
        lean_head_on("yes", 384)


def test_server_with_the_lean_head_serves_what_generate_gives():
    """An in-process engine with ``lean_head='on'`` (a fresh model: its own program cache): a
    greedy, a T > 0 seeded and a top_k request run on lean keys, a top_p one on a full key (a
    separate session); each one's tokens are ``Model.generate``'s for that request alone."""
    import asyncio
    import time

    import dllm_jax
    from helpers import LLADA_DIR
    from serve.engine.engine import Engine, EngineOptions
    from serve.engine.requests import SeqRequest

    model = dllm_jax.load(LLADA_DIR / "model")
    engine = Engine(lambda: model, names=["x"], options=EngineOptions(max_batch_size=4, warmup=(), lean_head="on"))
    base = dict(algorithm="dual_cache", gen_length=16, block_length=8, steps=16, threshold=0.8)
    rows = [([5, 49, 146, 244], dict(base)), ([7, 8, 9], dict(base, temperature=0.9, seed=21)),
            ([11, 12, 13, 14, 15], dict(base, temperature=1.1, seed=22, top_p=0.8)),
            ([3, 4, 5], dict(base, temperature=1.2, seed=23, top_k=5, min_p=0.05))]

    async def main():
        deadline = time.monotonic() + 120
        while not engine.health()[0]:
            assert engine.health()[1] != "dead" and time.monotonic() < deadline, engine.error
            await asyncio.sleep(0.05)  # polling the engine thread's start-up, not a hope
        handles = [engine.submit([SeqRequest(p, SamplingParams(**kw).resolve("llada"), 16)]) for p, kw in rows]
        out = []
        for h in handles:
            while not (ev := await h.next()).done:
                pass
            out.append(ev)
        return out

    engine.start()
    try:
        events = asyncio.run(main())
    finally:
        engine.stop()
    assert model.programs.lean_head
    served = {(k.lean_head, k.algorithm) for k in model.programs.keys() if hasattr(k, "lean_head")}
    assert served == {(True, "dual_cache"), (False, "dual_cache")}, served
    for (prompt, kw), ev in zip(rows, events):
        assert ev.error is None, ev.error
        want = model.generate([prompt], **kw)
        assert ev.tokens.tolist() == want.tokens[0, :want.lengths[0]].tolist(), kw
