"""Sampling filters (top_k / top_p / min_p), logprobs of generated tokens, and chain-rule scoring."""

import numpy as np
import pytest

import dllm_jax
from dllm_jax.sampling import SamplingError, SamplingParams
from reference_sampler import Forward, filter_set, log_softmax, reference_generate

G, LB, STEPS = 32, 8, 16
PROMPT = [5, 49, 146, 244, 265, 144, 183, 264]
LLADA_ALGOS = ["basic", "no_cache", "prefix_cache", "dual_cache", "dinfer_blockwise", "dinfer_hierarchy", "dinfer_credit"]


def _kw(algorithm):
    return dict(algorithm=algorithm, gen_length=G, block_length=LB, steps=STEPS)


def _filtered(p, top_k=0, top_p=1.0, min_p=0.0):
    """Reference filter on a probability vector (numpy, float64): the documented semantics."""
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), bool)
    k = top_k if top_k > 0 else len(p)
    in_k = order[:k]
    q = p[in_k] / p[in_k].sum()
    before = np.cumsum(q) - q
    nucleus = in_k[(before < top_p) | (np.arange(len(in_k)) == 0)]
    keep[nucleus] = True
    keep &= p >= min_p * p.max()
    out = np.where(keep, p, 0.0)
    return out / out.sum()


@pytest.mark.parametrize("filters", [dict(top_k=4), dict(top_p=0.6), dict(min_p=0.2), dict(top_k=6, top_p=0.8)])
def test_filtered_draw_matches_the_filtered_softmax(llada_model, filters):
    """One-position canvas at T: the committed token's frequency vs the filtered softmax(logits / T)."""
    t, n = 1.5, 400
    out = llada_model.generate([PROMPT] * n, algorithm="basic", gen_length=1, block_length=1, steps=1,
                               temperature=t, seed=list(range(n)), **filters)
    logits = llada_model.logits([PROMPT + [llada_model.mask_token_id]])[0, -1].astype(np.float64)
    logits[llada_model.mask_token_id] = -np.inf
    p = np.exp((logits - logits.max()) / t)
    p = _filtered(p / p.sum(), **filters)
    counts = np.bincount(out.tokens[:, 0], minlength=len(p))
    assert counts[p == 0].sum() == 0, "drew a token outside the filter"
    support = np.flatnonzero(p)
    top = support[np.argsort(-p[support])][:10]
    observed, expected = counts[top], n * p[top]
    if len(support) > len(top):
        observed = np.append(observed, n - observed.sum())
        expected = np.append(expected, n - expected.sum())
    chi2 = float((((observed - expected) ** 2) / expected).sum())
    # df <= 10: critical value 29.59 at significance 0.001
    assert chi2 < 29.59, (chi2, observed, expected.round(1))


@pytest.mark.parametrize("algorithm", LLADA_ALGOS)
def test_top_k_1_and_tiny_top_p_are_greedy(llada_model, algorithm):
    prompts = [PROMPT, [7, 8, 9, 10]]
    greedy = llada_model.generate(prompts, **_kw(algorithm)).tokens
    for filters in (dict(top_k=1), dict(top_p=1e-9), dict(min_p=1.0)):
        sampled = llada_model.generate(prompts, temperature=1.0, seed=[3, 4], **filters, **_kw(algorithm)).tokens
        np.testing.assert_array_equal(sampled, greedy, err_msg=str(filters))
    unfiltered = llada_model.generate(prompts, temperature=1.0, seed=[3, 4], **_kw(algorithm)).tokens
    assert not np.array_equal(unfiltered, greedy)  # the identity above is not vacuous


def test_filters_do_nothing_at_temperature_zero(llada_model):
    kw = _kw("dual_cache")
    greedy = llada_model.generate([PROMPT], **kw).tokens
    for filters in (dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3), dict(top_k=2, top_p=0.9, min_p=0.1)):
        np.testing.assert_array_equal(llada_model.generate([PROMPT], **filters, **kw).tokens, greedy)


def test_per_row_filters_in_one_batch_equal_solo(llada_model):
    rows = [dict(temperature=1.0, seed=1, top_k=3, top_p=1.0, min_p=0.0),
            dict(temperature=1.0, seed=2, top_k=0, top_p=0.7, min_p=0.0),
            dict(temperature=0.0, seed=3, top_k=0, top_p=1.0, min_p=0.0),
            dict(temperature=0.8, seed=4, top_k=0, top_p=1.0, min_p=0.1),
            dict(temperature=1.2, seed=5, top_k=0, top_p=1.0, min_p=0.0)]
    prompts = [PROMPT, [7, 8, 9], PROMPT[:5], [11, 12, 13, 14], PROMPT[2:]]
    kw = _kw("dual_cache")
    batch = llada_model.generate(prompts, **{k: [r[k] for r in rows] for k in rows[0]}, **kw).tokens
    for i, (p, r) in enumerate(zip(prompts, rows)):
        np.testing.assert_array_equal(batch[i], llada_model.generate([p], **r, **kw).tokens[0], err_msg=str(r))


def test_top_k_keeps_k_tokens_when_the_cumulative_mass_saturates():
    """top_p = 1 is off: with one dominant token over a tail of mass ~1e-13, the float32 cumsum of
    the top-k probabilities is 1.0 from rank 1 on, so a ``before < top_p`` test would keep the
    dominant token alone; the floor is the k-th largest scaled logit (ties at it kept)."""
    import jax
    import jax.numpy as jnp

    from dllm_jax.models.transformer import softmax
    from dllm_jax.sampling import proposal

    v, mask_id = 12, 11
    logits = np.full((2, 1, v), -40.0, np.float32)
    logits[:, 0, :6] = [0.0, -30.0, -30.5, -31.0, -31.5, -31.5]  # a tie at rank 5 / 6
    logits = jnp.asarray(logits)
    head = -jnp.sort(-logits[0, 0, :5])
    before = jnp.cumsum(softmax(head)) - softmax(head)
    assert float(before[1]) == 1.0  # saturated: every token after the first has "mass before" 1.0
    t, top_k = jnp.asarray([1.0, 0.5]), jnp.asarray([5, 3])
    floor = proposal.filter_floor(logits, t, top_k, jnp.ones(2), jnp.zeros(2), mask_id)
    np.testing.assert_array_equal(floor[:, 0], [-31.5, -30.5 / 0.5])
    keys = jax.random.split(jax.random.key(0), 2)
    draw = jax.jit(lambda i: proposal.draw(logits, jnp.asarray([60.0, 60.0]), jax.vmap(jax.random.fold_in)(
        keys, jnp.full(2, i)), mask_id, (top_k, jnp.ones(2), jnp.zeros(2)))[0][0, 0])  # one compile, 200 draws
    drawn = {int(draw(i)) for i in range(200)}
    assert drawn == {0, 1, 2, 3, 4, 5}  # at T = 60 the six kept tokens (a tie at the 5th) are all drawn


@pytest.mark.parametrize("kwargs,param", [
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=2.0), "min_p"), (dict(logprobs=21), "logprobs"),
])
def test_bad_filter_arguments(llada_model, kwargs, param):
    with pytest.raises(SamplingError) as e:
        llada_model.generate([[1, 2, 3]], **kwargs)
    assert e.value.param == param


# ---- logprobs of generated tokens ---------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["basic", "dual_cache", "dinfer_credit"])
def test_logprobs_of_generated_tokens(llada_model, algorithm):
    prompts = [PROMPT, [7, 8, 9, 10]]
    plain = llada_model.generate(prompts, return_trace=True, **_kw(algorithm))
    out = llada_model.generate(prompts, logprobs=5, return_trace=True, **_kw(algorithm))
    np.testing.assert_array_equal(out.tokens, plain.tokens)  # tracking logprobs changes nothing
    lp = out.logprobs
    assert lp["top_ids"].shape == (2, G, 5) and lp["top_logprobs"].shape == (2, G, 5)
    committed = out.trace["commit_step"] >= 0
    # at T = 0 every committed token is its own top-1, and top lists are sorted
    np.testing.assert_array_equal(lp["top_ids"][..., 0][committed], out.tokens[committed])
    np.testing.assert_allclose(lp["top_logprobs"][..., 0][committed], lp["token_logprobs"][committed], atol=1e-6)
    assert np.all(np.diff(lp["top_logprobs"], axis=-1) <= 1e-6)
    assert np.all(lp["token_logprobs"][committed] <= 0)
    if algorithm != "dinfer_credit":  # credit fuses logits for the confidence; logprobs are the model's own
        np.testing.assert_allclose(np.exp(lp["token_logprobs"][committed]), out.trace["commit_conf"][committed],
                                   rtol=1e-4, atol=1e-6)


def test_sampled_logprobs_are_of_the_commit_step_distribution(llada_model):
    """At T > 0 the token is drawn, not the argmax: its logprob is still the model's (unfiltered)."""
    out = llada_model.generate([PROMPT], algorithm="basic", gen_length=1, block_length=1, steps=1,
                               temperature=2.0, seed=11, logprobs=3)
    logits = llada_model.logits([PROMPT + [llada_model.mask_token_id]])[0, -1].astype(np.float64)
    ref = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    tok = out.tokens[0, 0]
    np.testing.assert_allclose(out.logprobs["token_logprobs"][0, 0], ref[tok], atol=1e-4)
    ref[llada_model.mask_token_id] = -np.inf
    np.testing.assert_array_equal(out.logprobs["top_ids"][0, 0], np.argsort(-ref)[:3])


PROCESSED_FILTERS = [{}, dict(top_k=5), dict(top_p=0.7), dict(min_p=0.1), dict(top_k=8, top_p=0.9, min_p=0.05)]


@pytest.mark.parametrize("t", [0.7, 1.0, 1.3])
def test_processed_logprobs_are_of_the_drawn_distribution(llada_model, t):
    """logprobs_mode='processed' at T > 0: log-softmax(logits / T) over the filter set, mask token
    excluded (NumPy, float64, from the same logits); the top alternatives rank that distribution,
    tokens outside it read -inf. One batch: rows with different filters, a raw row, a T = 0 row."""
    rows = [dict(f, temperature=t, logprobs_mode="processed") for f in PROCESSED_FILTERS]
    rows += [dict(temperature=t, top_k=5, logprobs_mode="raw"), dict(temperature=0.0, logprobs_mode="processed")]
    names = ("temperature", "top_k", "top_p", "min_p", "logprobs_mode")
    defaults = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, logprobs_mode="raw")
    kwargs = {k: [r.get(k, defaults[k]) for r in rows] for k in names}
    out = llada_model.generate([PROMPT] * len(rows), algorithm="basic", gen_length=1, block_length=1, steps=1,
                               seed=list(range(len(rows))), logprobs=5, **kwargs)
    mask = llada_model.mask_token_id
    logits = llada_model.logits([PROMPT + [mask]])[0, -1].astype(np.float64)
    raw = log_softmax(logits)
    for i, row in enumerate(rows):
        if row["logprobs_mode"] == "processed" and row["temperature"] > 0:
            f = {k: row[k] for k in ("top_k", "top_p", "min_p") if k in row}
            want = log_softmax(np.where(filter_set(logits, t, mask_id=mask, **f), logits / t, -np.inf))
        else:
            want = raw
        tok = out.tokens[i, 0]
        assert np.isfinite(want[tok]), "drew a token outside the filter"
        np.testing.assert_allclose(out.logprobs["token_logprobs"][i, 0], want[tok], atol=1e-5, err_msg=str(row))
        top = np.where(np.arange(len(want)) == mask, -np.inf, want)
        order = np.argsort(-top, kind="stable")[:5]
        finite = np.isfinite(top[order])
        np.testing.assert_array_equal(out.logprobs["top_ids"][i, 0][finite], order[finite], err_msg=str(row))
        np.testing.assert_allclose(out.logprobs["top_logprobs"][i, 0][finite], top[order][finite], atol=1e-5)
        assert np.all(out.logprobs["top_logprobs"][i, 0][~finite] == -np.inf)


def test_processed_logprobs_match_the_python_loop_reference(llada_model):
    """dinfer_credit (the draw is from credit-fused logits) with filters, over every commit step:
    processed logprobs as the reference loop computes them; a raw row beside it unchanged."""
    prompts = [PROMPT, [7, 8, 9, 10]]
    rows = [dict(temperature=0.9, seed=5, top_k=6, top_p=0.9, logprobs_mode="processed"),
            dict(temperature=0.9, seed=6, min_p=0.05, logprobs_mode="raw")]
    kwargs = {k: [r.get(k, d) for r in rows] for k, d in
              dict(temperature=0.0, seed=0, top_k=0, top_p=1.0, min_p=0.0, logprobs_mode="raw").items()}
    out = llada_model.generate(prompts, logprobs=5, return_trace=True, **kwargs, **_kw("dinfer_credit"))
    fwd = Forward(llada_model)
    for i, row in enumerate(rows):
        ref = {}
        tokens, _, commit = reference_generate(llada_model, prompts[i], SamplingParams(**row, **_kw("dinfer_credit")),
                                               fwd, logprobs=ref)
        np.testing.assert_array_equal(out.tokens[i], tokens)
        np.testing.assert_array_equal(out.trace["commit_step"][i], commit)
        np.testing.assert_allclose(out.logprobs["token_logprobs"][i], ref[row["logprobs_mode"]], atol=1e-5)
    assert np.all(np.abs(ref["raw"] - ref["processed"]) > 1e-3)  # the two modes differ: the check is not vacuous


def test_logprobs_mode_is_checked(llada_model):
    with pytest.raises(SamplingError) as e:
        llada_model.generate([PROMPT], logprobs=1, logprobs_mode="sampled")
    assert e.value.param == "logprobs_mode"


def test_nemotron_logprobs(nemotron_model):
    """static_block (its head in vocabulary chunks, no [B, Lb, V] logits): the tokens of a run
    without logprobs, each committed token its own top-1, and its log-probability at the forward
    that committed it equal to the upstream-shaped loop's log-softmax of the full logits."""
    plain = nemotron_model.generate([PROMPT], gen_length=G, block_length=LB)
    out = nemotron_model.generate([PROMPT], gen_length=G, block_length=LB, logprobs=2, return_trace=True)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    n = out.lengths[0]
    np.testing.assert_array_equal(out.logprobs["top_ids"][0, :n, 0], out.tokens[0, :n])
    ref = {}
    tokens, _, commit = reference_generate(nemotron_model, PROMPT, SamplingParams(gen_length=G, block_length=LB),
                                           logprobs=ref)
    np.testing.assert_array_equal(out.tokens[0], tokens)
    np.testing.assert_array_equal(out.trace["commit_step"][0], commit)
    np.testing.assert_allclose(out.logprobs["token_logprobs"][0, :n], ref["raw"][:n], atol=1e-5)
    np.testing.assert_array_equal(out.logprobs["top_logprobs"][0, :n, 0], out.logprobs["token_logprobs"][0, :n])
    assert np.all(ref["raw"][:n] < 0) and np.ptp(ref["raw"][:n]) > 1e-3  # real values: the check is not vacuous


# ---- scoring ----------------------------------------------------------------------------------

def _reference_scores(model, seq, shift):
    """Plain loop: one masked canvas per position, log-softmax at it (float64)."""
    mask, out = model.mask_token_id, [np.nan]
    for i in range(1, len(seq)):
        logits = model.logits([seq[:i] + [mask] * (len(seq) - i)])[0, i - 1 if shift else i].astype(np.float64)
        out.append(logits[seq[i]] - logits.max() - np.log(np.exp(logits - logits.max()).sum()))
    return np.array(out)


@pytest.mark.parametrize("family", ["llada", "nemotron"])
def test_score_matches_the_plain_loop(llada_model, nemotron_model, family):
    model = llada_model if family == "llada" else nemotron_model
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, 300, size=n).tolist() for n in (1, 2, 7, 19)]
    outs = model.score(seqs, top_k=4)
    for seq, o in zip(seqs, outs):
        ref = _reference_scores(model, seq, shift=family == "nemotron")
        assert np.isnan(o.token_logprobs[0])
        np.testing.assert_allclose(o.token_logprobs[1:], ref[1:], atol=1e-4)
        np.testing.assert_allclose(o.top_logprobs[1:, 0], np.maximum(o.top_logprobs[1:, 0], o.token_logprobs[1:]))
        assert o.top_ids.shape == (len(seq), 4)
    # batch composition does not matter (float32) and a shorter top_k is a prefix
    alone = model.score([seqs[2]], top_k=2)[0]
    np.testing.assert_allclose(alone.token_logprobs[1:], outs[2].token_logprobs[1:], atol=1e-5)
    np.testing.assert_array_equal(alone.top_ids[1:], outs[2].top_ids[1:, :2])


def test_score_on_a_mesh_equals_one_device(llada_model):
    meshed = dllm_jax.load(llada_model.source, mesh=dllm_jax.make_mesh("4x2"))
    seqs = [[5, 49, 146, 244, 265], [7, 8, 9]]
    for a, b in zip(llada_model.score(seqs, top_k=3), meshed.score(seqs, top_k=3)):
        np.testing.assert_allclose(a.token_logprobs[1:], b.token_logprobs[1:], atol=1e-5)


def test_score_errors(llada_model):
    with pytest.raises(SamplingError):
        llada_model.score([[]])
    with pytest.raises(SamplingError):
        llada_model.score([[1, llada_model.mask_token_id]])
    with pytest.raises(SamplingError):
        llada_model.score([[1, 2]], top_k=21)
