"""Step-level scheduling: rows join and leave a batch at any denoising step, outputs unchanged.

A ``DecodeSession`` stepped one denoising step per call, with requests admitted into freed
slots whenever one is free (so rows join while their batch-mates are mid-block, in other
blocks, or refreshing), gives every request the tokens of its solo ``Model.generate`` - in
bf16, the dtype real checkpoints are served in.
"""

import dataclasses
import functools

import numpy as np
import pytest
from helpers import LLADA_DIR, NEMOTRON_DIR

import dllm_jax
from dllm_jax.sampling import DecodeSession, Row, SamplingParams, program_key

G, LB = 16, 8


@functools.cache
def _model(family: str, refresh_rows: int = 2):
    """The fixture model in bf16; block decoders refresh ``refresh_rows`` rows per forward
    (fewer than the batch, so a step's refreshes run in several gathered chunks)."""
    path = (LLADA_DIR if family == "llada" else NEMOTRON_DIR) / "model"
    model = dllm_jax.load(path, dtype="bfloat16", mesh=dllm_jax.make_mesh("1"))
    model.programs.refresh_rows = refresh_rows
    return model


def _params(algorithm: str, n: int) -> list[SamplingParams]:
    family = "nemotron" if algorithm == "static_block" else "llada"
    out = []
    for i in range(n):
        if algorithm == "static_block":
            p = SamplingParams(algorithm=algorithm, gen_length=G, block_length=LB, factor=[1.0, 2.0][i % 2])
        else:
            # variable steps per block (threshold / factor rows) beside fixed-schedule rows, seeded T > 0
            rule = [dict(threshold=0.3), dict(), dict(factor=1.5), dict(threshold=0.6)][i % 4]
            if algorithm.startswith("dinfer"):
                rule = dict(threshold=[0.3, 0.6][i % 2])
            p = SamplingParams(algorithm=algorithm, gen_length=G, block_length=LB, steps=G, early_stop=i % 3 == 0,
                               temperature=0.7 if i % 2 else 0.0, seed=40 + i, **rule)
        out.append(p.resolve(family))
    return out


def _step_and_collect(session, owner: dict, results: dict) -> None:
    """One call; finished rows' tokens go to ``results`` under their request and free their slot."""
    for u in session.step():
        if u.done:
            results[owner.pop(u.slot)] = u.tokens
            session.release(u.slot)


def _assert_solo(model, algorithm, prompts, params, results) -> None:
    """Every request in ``results`` got the tokens of its solo ``Model.generate``."""
    for i in results:
        want = model.generate([prompts[i]], **dataclasses.asdict(params[i]))
        np.testing.assert_array_equal(results[i], want.tokens[0][: want.lengths[0]],
                                      err_msg=f"{algorithm} request {i}")


# (no_cache runs basic's full-forward path with another stop rule; the golden tests cover it)
@pytest.mark.parametrize("algorithm", ["basic", "prefix_cache", "dual_cache", "dinfer_credit", "static_block"])
def test_rows_join_at_any_step(algorithm):
    family = "nemotron" if algorithm == "static_block" else "llada"
    model = _model(family)
    rng = np.random.default_rng(5)
    n = 6
    prompts = [rng.integers(0, 256, int(k)).tolist() for k in rng.integers(3, 17, n)]  # one prompt bucket
    params = _params(algorithm, n)
    # 4 slots, refresh chunks of 2: more rows enter a block at once than one chunk takes
    session = DecodeSession(model, program_key(model, 16, params[0], 4), steps_per_call=1)
    start = session.key.decoder.initial_position(session.key.prompt_len)
    waiting = list(range(n))
    owner, results, joined_mid_block = {}, {}, 0
    arrivals = {0: 2, 1: 1, 3: 1}  # step -> how many requests arrive (the rest: whenever a slot frees)
    step = 0
    while waiting or owner:
        arriving = arrivals.get(step, 0) if step in arrivals else (len(waiting) if step > 3 else 0)
        free = [s for s in range(session.key.batch) if s not in owner]
        rows = {}
        for slot in free[:min(arriving, len(waiting))]:
            owner[slot] = waiting.pop(0)
            rows[slot] = Row(prompts[owner[slot]], params[owner[slot]])
        if rows:
            call, block = np.asarray(session.state.progress.call), np.asarray(session.state.progress.block)
            # a batch-mate is mid-block (cached algorithms: past its refresh) or past its first block
            joined_mid_block += any(call[s] > 0 or block[s] > start for s in owner if s not in rows)
            session.admit(rows)
        _step_and_collect(session, owner, results)
        step += 1
        assert step < 500
    assert joined_mid_block >= 2
    assert sorted(results) == list(range(n))
    _assert_solo(model, algorithm, prompts, params, results)


def test_step_budget_and_early_return():
    """One call runs at most ``steps`` denoising steps and returns at the step a row finishes;
    every row entering a block is refreshed in that step, one chunk after another."""
    model = _model("llada", refresh_rows=1)
    fixed = SamplingParams(algorithm="dual_cache", gen_length=G, block_length=LB, steps=G).resolve("llada")
    fast = dataclasses.replace(fixed, threshold=0.01)  # commits its whole block at the refresh
    session = DecodeSession(model, program_key(model, 16, fixed, 2))  # batch 2: refresh chunks of 1
    session.admit({0: Row([5, 6, 7], fixed), 1: Row([8, 9], fast)})
    counted = lambda: int(np.asarray(session.state.batch_steps))  # noqa: E731
    forwards = lambda: int(np.asarray(session.state.batch_nfe))  # noqa: E731
    # step 1: both rows refresh (two one-row forwards) and make their first cached call (one forward)
    updates = {u.slot: u for u in session.step(steps=1)}
    assert counted() == 1 and forwards() == 3 and (updates[0].nfe, updates[1].nfe) == (2, 2)
    # step 2: the fast row resolved its first block in step 1 (refresh + the cached call every block
    # takes) and does its second now; the call returns at the step it finishes
    updates = {u.slot: u for u in session.step(steps=100)}
    assert counted() == 2 and forwards() == 5 and updates[1].done and updates[1].nfe == 4
    assert not updates[0].done
    # fixed schedule, 8 calls per block: a refresh step (full + cached call), then 6 cached steps
    updates = {u.slot: u for u in session.step(steps=100)}
    assert counted() == 14 and updates[0].done and updates[0].nfe == G


# (one decoder per state layout: full canvas, prefix cache, dual cache, dual cache + credit, sliding window)
@pytest.mark.parametrize("algorithm", ["basic", "prefix_cache", "dual_cache", "dinfer_credit", "static_block"])
def test_rebucket_mid_generation(algorithm):
    """A session moved to another prompt bucket while its rows are mid-block (down once its long
    prompt left, up and down again) gives every request the tokens of its solo generate (bf16)."""
    model = _model("nemotron" if algorithm == "static_block" else "llada")
    rng = np.random.default_rng(11)
    n = 6
    prompts = [rng.integers(0, 256, 50).tolist()] + [rng.integers(0, 256, int(k)).tolist()
                                                      for k in rng.integers(3, 30, n - 1)]
    params = _params(algorithm, n)
    session = DecodeSession(model, program_key(model, 50, params[0], 4), steps_per_call=1)
    assert session.key.prompt_len == 64
    owner = {slot: slot for slot in range(4)}
    session.admit({slot: Row(prompts[i], params[i]) for slot, i in owner.items()})
    waiting, results, step, cancelled = [4, 5], {}, 0, set()
    with pytest.raises(ValueError, match="longer than the prompt bucket"):
        session.rebucket(32)  # the long prompt is still there
    moves = {3: 32, 5: 64, 6: 32}  # step -> prompt bucket (the long row is cancelled at step 3)
    while waiting or owner:
        if step == 3 and 0 in owner:
            cancelled.add(owner.pop(0))
            session.release(0)
        if step in moves:
            session.rebucket(moves[step])
            assert session.key.prompt_len == moves[step]
        free = [s for s in range(session.key.batch) if s not in owner]
        if step > 6 and free and waiting:
            owner[free[0]] = waiting.pop(0)
            session.admit({free[0]: Row(prompts[owner[free[0]]], params[owner[free[0]]])})
        _step_and_collect(session, owner, results)
        step += 1
        assert step < 500
    assert sorted(set(results) | cancelled) == list(range(n))
    _assert_solo(model, algorithm, prompts, params, results)



# (dual and prefix cache share the refresh code; dInfer credit adds per-block credit state)
@pytest.mark.parametrize("algorithm", ["dual_cache", "dinfer_credit"])
def test_twins_share_block_start_forwards(algorithm):
    """Rows entering a block with identical inputs (the n samples of one prompt, a repeated
    prompt) run one refresh forward between them: fewer batch forwards than with sharing off, and
    every row still gets the tokens of its solo generate (bf16; T > 0 rows diverge after their
    first step, greedy twins stay twins to the end)."""
    model = _model("llada", refresh_rows=1)
    rng = np.random.default_rng(3)
    a, b, c = (rng.integers(0, 256, int(k)).tolist() for k in (9, 14, 5))
    prompts = [a, a, a, a, b, b, c, a]
    params = _params(algorithm, len(prompts))
    for i in (1, 2):  # seeded T > 0 samples of prompt a (one more at 3 is greedy, as 0 is)
        params[i] = dataclasses.replace(params[0], temperature=0.8, seed=100 + i)
    params[3] = params[0]  # a greedy twin of row 0, the same request twice
    params[5] = dataclasses.replace(params[4], seed=params[4].seed + 1)
    forwards, got = {}, {}
    for share in (True, False) if algorithm == "dual_cache" else (True,):
        m = model if share else dllm_jax.load(LLADA_DIR / "model", dtype="bfloat16", mesh=dllm_jax.make_mesh("1"))
        m.programs.refresh_rows, m.programs.share_forwards = 1, share
        session = DecodeSession(m, program_key(m, 16, params[0], 8), steps_per_call=1)
        owner = {slot: slot for slot in range(7)}  # request 7 (prompt a again) joins later, alone
        session.admit({slot: Row(prompts[i], params[i]) for slot, i in owner.items()})
        results, step = {}, 0
        while owner or 7 not in results:
            if step == 3:
                owner[7] = 7
                session.admit({7: Row(prompts[7], params[7])})
            _step_and_collect(session, owner, results)
            step += 1
            assert step < 500
        forwards[share], got[share] = int(np.asarray(session.state.batch_nfe)), results
        assert sorted(results) == list(range(len(prompts)))
    _assert_solo(model, algorithm, prompts, params, got[True])
    np.testing.assert_array_equal(got[True][3], got[True][0])
    if False in got:
        for i in got[True]:
            np.testing.assert_array_equal(got[True][i], got[False][i], err_msg=f"request {i}")
        # the first step alone saves 3 of a's 4 refreshes and 1 of b's 2; greedy twins 0 and 3 share every block's
        assert forwards[True] <= forwards[False] - 4 - (G // LB - 1), forwards


def test_twins_share_the_prompt_prefill():
    """static_block (Nemotron's block-causal sliding decoder): entering rows with the same prompt
    run one prompt prefill between them, and its keys/values serve the whole generation (bf16).
    The prefill alone: 2 forwards for the prompts a, a, b, a instead of 4, every row's cache
    prompt region and context bitwise those of its own forward; end to end (two more rows join
    later, one of them a again), every request gets its solo tokens, sharing on and off."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dllm_jax.sampling import sliding

    rng = np.random.default_rng(11)
    a, b, c = (rng.integers(0, 256, int(k)).tolist() for k in (9, 14, 5))
    prompts, params = [a, a, b, a, c, a], _params("static_block", 6)
    params[1] = params[3] = params[5] = params[0]  # the same request (greedy: twins to the end)
    got = {}
    for share in (True, False):
        model = dllm_jax.load(NEMOTRON_DIR / "model", dtype="bfloat16", mesh=dllm_jax.make_mesh("1"))
        model.programs.refresh_rows, model.programs.share_forwards = 1, share
        session = DecodeSession(model, program_key(model, 16, params[0], 8), steps_per_call=1)
        owner = {slot: slot for slot in range(4)}  # rows 4 and 5 join later
        session.admit({slot: Row(prompts[i], params[i]) for slot, i in owner.items()})
        program = sliding.SlidingProgram(session.key, model.graphdef, model.mask_token_id, chunk=1, share=share)
        entering = jnp.arange(session.key.batch) < 4

        @jax.jit
        def prefill(params, st):
            st, forwards = program.prefill(nnx.merge(model.graphdef, params), st, entering)
            return st.cache, st.window.ctx, forwards

        cache, ctx, forwards = prefill(model.params, session.state)
        got[share] = (jax.tree.map(lambda x: np.asarray(x[:4, :, :16].astype(jnp.float32)), cache),
                      np.asarray(ctx[:4].astype(jnp.float32)), int(forwards))
        results, step = {}, 0
        while owner or len(results) < 6:
            if step == 2:
                owner.update({4: 4, 5: 5})
                session.admit({4: Row(prompts[4], params[4]), 5: Row(prompts[5], params[5])})
            _step_and_collect(session, owner, results)
            step += 1
            assert step < 500
        _assert_solo(model, "static_block", prompts, params, results)
        np.testing.assert_array_equal(results[3], results[0])
    assert (got[True][2], got[False][2]) == (2, 4)
    jax.tree.map(np.testing.assert_array_equal, got[True][0], got[False][0])
    np.testing.assert_array_equal(got[True][1], got[False][1])
