"""The jitted, batched sampler against the Python-loop reference, and its behaviour."""

import dataclasses
import os
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest

import dllm_jax
from dllm_jax.sampling import SamplingError, SamplingParams
from helpers import LLADA_DIR
from reference_sampler import Forward, reference_generate

G, LB, STEPS = 32, 8, 16


def _prompts(rng, n, lo=3, hi=14, vocab=256):
    return [rng.integers(0, vocab, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


LLADA_ALGOS = ["basic", "no_cache", "prefix_cache", "dual_cache", "dinfer_blockwise", "dinfer_hierarchy", "dinfer_credit"]


@pytest.mark.parametrize("algorithm", LLADA_ALGOS)
def test_llada_matches_python_loop_reference(llada_model, algorithm):
    """Ragged batch, per-row knobs (temperature, threshold/factor, seed, remasking) vs one-by-one reference."""
    rng = np.random.default_rng(zlib.crc32(algorithm.encode()))  # stable across processes
    n = 4
    prompts = _prompts(rng, n)
    rows = []
    for i in range(n):
        row = {"temperature": float(rng.choice([0.0, 0.0, 0.8])), "seed": int(rng.integers(0, 2**31)),
               "remasking": str(rng.choice(["low_confidence", "low_confidence", "random"]))}
        if algorithm in ("no_cache", "prefix_cache", "dual_cache", "basic"):
            kind = ["fixed", "threshold", "factor", "fixed"][i]
            if kind == "threshold":
                row["threshold"] = float(rng.uniform(0.3, 0.95))
            elif kind == "factor":
                row["factor"] = float(rng.uniform(0.5, 3.0))
        else:
            row["threshold"] = float(rng.uniform(0.5, 0.95))
        rows.append(row)
    kwargs = {k: [r.get(k) for r in rows] for k in ("temperature", "seed", "remasking", "threshold", "factor")}
    out = llada_model.generate(prompts, algorithm=algorithm, gen_length=G, block_length=LB, steps=STEPS,
                               return_trace=True, **kwargs)
    fwd = Forward(llada_model)
    for i in range(n):
        params = SamplingParams(algorithm=algorithm, gen_length=G, block_length=LB, steps=STEPS, **rows[i])
        tokens, nfe, commit = reference_generate(llada_model, prompts[i], params, fwd)
        np.testing.assert_array_equal(out.tokens[i], tokens, err_msg=f"row {i} {rows[i]}")
        assert out.nfe_per_row[i] == nfe
        np.testing.assert_array_equal(out.trace["commit_step"][i], commit)


@pytest.fixture(scope="module")
def llada_forward(llada_model):
    """One reference ``Forward`` for the tests below (its forwards compile once per shape)."""
    return Forward(llada_model)


@pytest.mark.parametrize("algorithm", ["basic", "prefix_cache", "dual_cache", "dinfer_hierarchy", "dinfer_credit"])
def test_leftmost_matches_python_loop_reference(llada_model, llada_forward, algorithm):
    """'leftmost' rows (every transfer rule the algorithm allows, greedy and sampled) beside a
    low_confidence row, vs the reference's left-to-right walk (reference_sampler._choose_leftmost).
    (no_cache and dinfer_blockwise run the same selection code as basic and dinfer_credit; prompts
    of one length keep the reference's compilations to one per cache mode.)"""
    rng = np.random.default_rng(zlib.crc32(b"leftmost " + algorithm.encode()))
    prompts = _prompts(rng, 4, lo=9, hi=10)
    if algorithm in ("no_cache", "prefix_cache", "dual_cache", "basic"):
        rules_ = [{}, {"threshold": 0.3}, {"factor": 2.0}, {"threshold": 0.5}]
    else:
        rules_ = [{"threshold": t} for t in (0.3, 0.6, 0.05, 0.5)]
    rows = [dict(r, temperature=t, seed=int(rng.integers(0, 2**31)), remasking=m)
            for r, t, m in zip(rules_, (0.0, 0.8, 0.0, 0.0), ("leftmost", "leftmost", "leftmost", "low_confidence"))]
    kwargs = {k: [r.get(k) for r in rows] for k in ("temperature", "seed", "remasking", "threshold", "factor")}
    out = llada_model.generate(prompts, algorithm=algorithm, gen_length=G, block_length=LB, steps=STEPS,
                               return_trace=True, **kwargs)
    for i, row in enumerate(rows):
        params = SamplingParams(algorithm=algorithm, gen_length=G, block_length=LB, steps=STEPS, **row)
        tokens, nfe, commit = reference_generate(llada_model, prompts[i], params, llada_forward)
        np.testing.assert_array_equal(out.tokens[i], tokens, err_msg=f"row {i} {row}")
        assert out.nfe_per_row[i] == nfe
        np.testing.assert_array_equal(out.trace["commit_step"][i], commit)
        if row["remasking"] == "leftmost":  # every step commits a left-to-right prefix of each block's masks
            steps = commit.reshape(-1, LB)
            assert all(np.all(np.diff(block) >= 0) for block in steps), steps


@pytest.mark.parametrize("algorithm", ["basic", "no_cache", "prefix_cache", "dual_cache", "dinfer_blockwise",
                                       "dinfer_credit"])
def test_entropy_bound_matches_python_loop_reference(llada_model, llada_forward, algorithm):
    """EB-Sampler rows (several gammas, greedy and sampled, every selection policy) beside a
    threshold row and a fixed-schedule row (on the dInfer decoders: their default threshold),
    vs the reference's walk (reference_sampler._entropy_bounded; with dInfer's credit, the
    entropy of the credit-fused distribution the tokens are drawn from)."""
    rng = np.random.default_rng(zlib.crc32(b"entropy_bound " + algorithm.encode()))
    prompts = _prompts(rng, 6, lo=9, hi=10)
    rows = [dict(entropy_bound=0.0), dict(entropy_bound=0.5, temperature=0.8, seed=3),
            dict(entropy_bound=2.0, remasking="random", seed=4), dict(entropy_bound=1.0, remasking="leftmost"),
            dict(threshold=0.5), {}]
    kwargs = {k: [r.get(k, d) for r in rows] for k, d in (("entropy_bound", None), ("threshold", None),
                                                           ("temperature", 0.0), ("seed", 0),
                                                           ("remasking", "low_confidence"))}
    out = llada_model.generate(prompts, algorithm=algorithm, gen_length=G, block_length=LB, steps=STEPS,
                               return_trace=True, **kwargs)
    for i, row in enumerate(rows):
        params = SamplingParams(algorithm=algorithm, gen_length=G, block_length=LB, steps=STEPS, **row)
        tokens, nfe, commit = reference_generate(llada_model, prompts[i], params, llada_forward)
        np.testing.assert_array_equal(out.tokens[i], tokens, err_msg=f"row {i} {row}")
        assert out.nfe_per_row[i] == nfe, (i, row)
        np.testing.assert_array_equal(out.trace["commit_step"][i], commit)
    # gamma 0: one token per forward (every entropy is > 0 on this model)
    assert out.nfe_per_row[0] == G


def test_llada_cfg_and_shift_match_reference(llada_model):
    prompts = _prompts(np.random.default_rng(1), 2)
    for kwargs in ({"algorithm": "basic", "cfg_scale": 1.5}, {"algorithm": "dual_cache", "shift_logits": True},
                   {"algorithm": "prefix_cache", "shift_logits": True, "threshold": 0.6}):
        out = llada_model.generate(prompts, gen_length=16, block_length=8, steps=8, **kwargs)
        for i, p in enumerate(prompts):
            ref, nfe, _ = reference_generate(llada_model, p, SamplingParams(gen_length=16, block_length=8, steps=8, **kwargs))
            np.testing.assert_array_equal(out.tokens[i], ref, err_msg=str(kwargs))
            assert out.nfe_per_row[i] == nfe


@pytest.mark.parametrize("algorithm", ["static_block", "dual_cache", "basic"])
def test_nemotron_matches_python_loop_reference(nemotron_model, algorithm):
    rng = np.random.default_rng(7)
    prompts = _prompts(rng, 3, vocab=300)
    factors = [0.5, 1.0, 3.0]
    if algorithm == "static_block":
        out = nemotron_model.generate(prompts, algorithm=algorithm, gen_length=G, block_length=LB, factor=factors)
    else:  # block algorithms on Nemotron read shifted predictions by default
        out = nemotron_model.generate(prompts, algorithm=algorithm, gen_length=G, block_length=LB, steps=STEPS)
    for i, p in enumerate(prompts):
        params = SamplingParams(algorithm=algorithm, gen_length=G, block_length=LB,
                                **({"factor": factors[i]} if algorithm == "static_block" else {"steps": STEPS}))
        tokens, nfe, _ = reference_generate(nemotron_model, p, params)
        np.testing.assert_array_equal(out.tokens[i], tokens)
        assert out.nfe_per_row[i] == nfe


def test_batch_invariance(llada_model):
    """A prompt's output at temperature 0 does not depend on its batch-mates (or their number)."""
    rng = np.random.default_rng(3)
    target = rng.integers(0, 256, size=9).tolist()
    kw = dict(algorithm="dual_cache", gen_length=G, block_length=LB, steps=STEPS, threshold=0.7)
    alone = llada_model.generate([target], **kw).tokens[0]
    for mates in (_prompts(rng, 2), _prompts(rng, 5, 10, 16), _prompts(rng, 3, 20, 40)):
        batch = mates[:1] + [target] + mates[1:]
        out = llada_model.generate(batch, **kw)
        np.testing.assert_array_equal(out.tokens[1], alone)


def test_temperature_seeds(llada_model):
    p = [[5, 49, 146, 244, 265, 144]]
    kw = dict(algorithm="dual_cache", gen_length=G, block_length=LB, steps=STEPS, temperature=1.0)
    a = llada_model.generate(p, seed=1, **kw).tokens
    b = llada_model.generate(p, seed=1, **kw).tokens
    c = llada_model.generate(p, seed=2, **kw).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # the same seed gives the same row inside a batch
    d = llada_model.generate(p * 3, seed=[1, 2, 3], **kw).tokens
    np.testing.assert_array_equal(d[0], a[0])
    np.testing.assert_array_equal(d[1], c[0])


def test_64_bit_seeds_are_not_truncated(llada_model):
    """jax.random.key keeps only the low 32 bits of a seed without x64; our seeding keeps all 64."""
    p = [[5, 49, 146, 244, 265, 144]]
    kw = dict(algorithm="dual_cache", gen_length=G, block_length=LB, steps=STEPS, temperature=1.0)
    low = llada_model.generate(p, seed=7, **kw).tokens
    high = llada_model.generate(p, seed=2**40 + 7, **kw).tokens
    again = llada_model.generate(p, seed=2**40 + 7, **kw).tokens
    np.testing.assert_array_equal(high, again)
    assert not np.array_equal(low, high)


def test_seeding_under_another_prng_implementation(tmp_path):
    """With JAX's 'rbg' PRNG (4-word keys) seeds still work: reproducible and distinct.

    (Not batch-invariant at T > 0: JAX's rbg bits under vmap depend on the batch size, e.g. a
    vmapped gumbel draw; batch invariance of seeded sampling holds for the default threefry.)"""
    script = tmp_path / "rbg.py"
    script.write_text(f"""
import jax, numpy as np, dllm_jax
assert jax.config.jax_default_prng_impl == "rbg"
m = dllm_jax.load({str(LLADA_DIR / "model")!r})
kw = dict(algorithm="dual_cache", gen_length={G}, block_length={LB}, steps={STEPS}, temperature=1.0)
p = [5, 49, 146, 244, 265, 144]
a, b, c = (m.generate([p], seed=s, **kw).tokens[0] for s in (1, 1, 2))
d, e = (m.generate([p, p, [7, 8]], seed=[2, 1, 3], **kw).tokens for _ in range(2))
assert (a == b).all() and not (a == c).all(), (a, b, c)
assert (d == e).all() and not (d[0] == d[1]).all()
print("ok")
""")
    env = dict(os.environ, JAX_DEFAULT_PRNG_IMPL="rbg", XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_masked_position_distribution_matches_softmax(llada_model):
    """One-position canvas at T: the committed token's frequency vs softmax(logits / T)."""
    prompt = [5, 49, 146, 244, 265, 144, 183, 264]
    t, n = 1.5, 400
    out = llada_model.generate([prompt] * n, algorithm="basic", gen_length=1, block_length=1, steps=1,
                               temperature=t, seed=list(range(n)))
    logits = llada_model.logits([prompt + [llada_model.mask_token_id]])[0, -1].astype(np.float64)
    logits[llada_model.mask_token_id] = -np.inf  # never proposed
    p = np.exp((logits - logits.max()) / t)
    p /= p.sum()
    counts = np.bincount(out.tokens[:, 0], minlength=len(p))
    # Pearson chi-square over the 10 likeliest tokens + "all others" (df = 10); the critical
    # value at significance 0.001 is 29.59, so a correct sampler fails this 1 time in 1000.
    top = np.argsort(-p)[:10]
    observed = np.append(counts[top], n - counts[top].sum())
    expected = n * np.append(p[top], 1 - p[top].sum())
    chi2 = float((((observed - expected) ** 2) / expected).sum())
    assert chi2 < 29.59, (chi2, observed, expected.round(1))


def test_early_stop_keeps_text_and_fills_eos(llada_model):
    rng = np.random.default_rng(11)
    prompts = _prompts(rng, 6)
    eos = llada_model.config.eos_token_id
    # pick stop tokens that occur in the plain output so early stop triggers
    plain = llada_model.generate(prompts, algorithm="dual_cache", gen_length=G, block_length=LB, steps=STEPS)
    stops = [int(plain.tokens[0][3])]
    kw = dict(algorithm="dual_cache", gen_length=G, block_length=LB, steps=STEPS, stop_token_ids=stops)
    full = llada_model.generate(prompts, **kw)
    early = llada_model.generate(prompts, early_stop=True, **kw)
    for i in range(len(prompts)):
        n = int(full.lengths[i])
        np.testing.assert_array_equal(early.tokens[i][:n], full.tokens[i][:n])
        assert early.lengths[i] == n and early.finish_reasons[i] == full.finish_reasons[i]
        if full.finish_reasons[i] == "stop":
            block_end = (n // LB + 1) * LB
            assert (early.tokens[i][block_end:] == eos).all()
            assert early.nfe_per_row[i] <= full.nfe_per_row[i]
    assert early.finish_reasons[0] == "stop" and early.nfe_per_row[0] < full.nfe_per_row[0]


@pytest.mark.parametrize("kwargs,param", [
    (dict(gen_length=30, block_length=8), "block_length"),
    (dict(gen_length=32, block_length=8, steps=10), "steps"),
    (dict(algorithm="warp_drive"), "algorithm"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=1.5), "threshold"),
    (dict(gen_length=512, block_length=32, steps=512), "gen_length"),
    (dict(temperature=-1.0), "temperature"),
    (dict(remasking="sometimes"), "remasking"),
    (dict(algorithm="dual_cache", cfg_scale=1.0), "cfg_scale"),
    (dict(algorithm="dual_cache", gen_length=32, block_length=8, steps=4), "steps"),
    (dict(algorithm="static_block"), "algorithm"),
    (dict(threshold=0.5, factor=1.0), "factor"),
    (dict(seed=-3), "seed"),
    (dict(stop_token_ids=list(range(1, 10))), "stop_token_ids"),  # more than the device holds (8)
    (dict(stop_token_ids=[-1]), "stop_token_ids"),                # would read as an unused entry
])
def test_bad_arguments(llada_model, kwargs, param):
    with pytest.raises(SamplingError) as e:
        llada_model.generate([[1, 2, 3]], **kwargs)
    assert e.value.param == param
    assert str(e.value)


def test_bad_prompts(llada_model):
    for prompts in ([], [[]], [[1, 2, 384]], [[1, llada_model.mask_token_id]]):
        with pytest.raises(SamplingError):
            llada_model.generate(prompts, gen_length=8, block_length=8, steps=8)


def test_static_block_rejects_unused_knobs(nemotron_model):
    for kw in ({"threshold": 0.9}, {"temperature": 0.5}, {"shift_logits": False}):
        with pytest.raises(SamplingError):
            nemotron_model.generate([[1, 2, 3]], algorithm="static_block", **kw)


def test_zero_recompiles_after_warmup(llada_model):
    """50 calls with new prompts, lengths inside a bucket, temperatures, thresholds, seeds: no compile."""
    compiles = []

    def listener(name, *args, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(0)
        kw = dict(algorithm="dual_cache", gen_length=G, block_length=LB, steps=STEPS)
        for n in (1, 2, 4):  # warm-up: the batch buckets used below (prompt bucket 16)
            llada_model.generate([[1, 2, 3]] * n, **kw)  # greedy: the lean-head program
            llada_model.generate([[1, 2, 3]] * n, temperature=1.0, **kw)  # T > 0 without filters: lean too
        compiles.clear()
        for i in range(50):
            n = int(rng.integers(1, 5))
            llada_model.generate(_prompts(rng, n, 1, 17), temperature=[float(rng.uniform(0, 1.5)) for _ in range(n)],
                                 threshold=[float(rng.uniform(0.1, 1.0)) for _ in range(n)],
                                 seed=[int(rng.integers(0, 10**6)) for _ in range(n)], **kw)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_session_admits_at_the_step_a_slot_frees(llada_model):
    """A slot freed by a row that stopped early takes a waiting request at the very next
    denoising step (the call that finished the row returns at that step, while its batch-mate
    is still mid-canvas); every result equals standalone generation."""
    from dllm_jax.sampling import DecodeSession, Row, program_key

    rng = np.random.default_rng(9)
    base = SamplingParams(algorithm="dual_cache", gen_length=G, block_length=LB, steps=STEPS, early_stop=True)
    prompts = _prompts(rng, 4)
    plain = llada_model.generate(prompts, **dataclasses.asdict(base))
    # row 0 stops at its first token (its own first token is a stop token), the others run to the end
    params = [dataclasses.replace(base, stop_token_ids=(int(plain.tokens[0][0]),))] + [base] * 3
    params = [p.resolve("llada") for p in params]
    key = program_key(llada_model, 16, params[0], 2)
    session = DecodeSession(llada_model, key, steps_per_call=100)  # calls end when a row finishes
    session.admit({0: Row(prompts[0], params[0]), 1: Row(prompts[1], params[1])})
    owner, waiting, results, joined = {0: 0, 1: 1}, [3, 2], {}, {}
    steps = lambda: int(np.asarray(session.state.batch_steps))  # noqa: E731
    while session.busy:
        for u in session.step():
            if u.done:
                results[owner.pop(u.slot)] = (u.tokens, steps())
                session.release(u.slot)
                if waiting:
                    owner[u.slot] = waiting.pop()
                    other = 1 - u.slot
                    joined[owner[u.slot]] = (steps(), int(np.asarray(session.state.progress.block)[other]),
                                             int(np.asarray(session.state.progress.call)[other]))
                    session.admit({u.slot: Row(prompts[owner[u.slot]], params[owner[u.slot]])})
    assert sorted(results) == [0, 1, 2, 3]
    # row 0 finished after its first block (STEPS / (G / LB) = 4 calls: refresh + 3 cached calls in 3 steps)
    assert len(results[0][0]) == 0 and results[0][1] == 3
    # joined at the step row 0 left, the step row 1 resolved its first block (both refreshed at
    # step 1); the two then enter their blocks together
    assert joined[2] == (3, 1, 0)
    for i in range(4):
        want = llada_model.generate([prompts[i]], **dataclasses.asdict(params[i]))
        np.testing.assert_array_equal(results[i][0], want.tokens[0][: want.lengths[0]])
