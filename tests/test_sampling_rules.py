"""Hand-computed cases for every transfer rule (no model involved)."""

import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax.sampling import proposal, rules


def _row(x, dtype=jnp.float32):
    return jnp.asarray([x], dtype)


def _sel(mask):
    return np.flatnonzero(np.asarray(mask)[0]).tolist()


def test_schedule_matches_upstream_examples():
    # get_num_transfer_tokens: 8 masks over 3 steps -> [3, 3, 2]; 2 masks over 5 steps -> [1, 1, 0, 0, 0]
    np.testing.assert_array_equal(rules.schedule(jnp.array([8, 2]), 3)[0], [3, 3, 2])
    np.testing.assert_array_equal(rules.schedule(jnp.array([2]), 5)[0], [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(rules.schedule(jnp.array([0]), 2)[0], [0, 0])


CONF = [0.30, 0.95, 0.10, 0.70, 0.86, 0.50]
MASKED = [True, True, True, True, False, True]


def test_fixed_top_k_among_masked():
    # masked confidences: 0:.30 1:.95 2:.10 3:.70 5:.50 (4 is not masked)
    sel = rules.transfer_fixed(_row(CONF), _row(MASKED, bool), jnp.array([2]))
    assert _sel(sel) == [1, 3]
    assert _sel(rules.transfer_fixed(_row(CONF), _row(MASKED, bool), jnp.array([0]))) == []


def test_threshold_top1_always_plus_above():
    sel = rules.transfer_threshold(_row(CONF), _row(MASKED, bool), jnp.array([0.6]))
    assert _sel(sel) == [1, 3]
    # nothing above the threshold: the top-1 still goes
    sel = rules.transfer_threshold(_row([0.2, 0.4, 0.3]), _row([True] * 3, bool), jnp.array([0.9]))
    assert _sel(sel) == [1]
    # threshold 1.0 accepts exactly-1.0 confidences only
    sel = rules.transfer_threshold(_row([1.0, 1.0, 0.99]), _row([True] * 3, bool), jnp.array([1.0]))
    assert _sel(sel) == [0, 1]


def test_entropy_bound_rule():
    """EB-Sampler: in rank order, the longest prefix with sum(H) - max(H) <= gamma; rank 0 always."""
    # ranked by confidence: 1 (.95), 3 (.70), 5 (.50), 0 (.30), 2 (.10); position 4 is not masked
    conf, masked = _row(CONF), _row(MASKED, bool)
    h = _row([0.875, 0.125, 1.5, 0.5, 0.0, 0.25])  # (binary fractions: the sums are exact in float32)
    rank = rules.ranks(conf, masked)
    pick = lambda gamma: _sel(rules.transfer_entropy_bound(h, masked, jnp.array([gamma]), rank))  # noqa: E731
    # prefixes: {1}: 0; {1,3}: .625 - .5 = .125; {1,3,5}: .875 - .5 = .375; +0: 1.75 - .875 = .875; +2: 1.75
    assert pick(0.0) == [1]
    assert pick(0.125) == [1, 3]
    assert pick(0.375) == [1, 3, 5]
    assert pick(0.87) == [1, 3, 5]
    assert pick(0.875) == [0, 1, 3, 5]
    assert pick(100.0) == [0, 1, 2, 3, 5]
    # ranked by entropy (ascending) it is SGLang's form: rank r is taken iff cumsum(H)[r - 1] <= gamma
    by_entropy = rules.ranks(-h, masked)  # 1 (.125), 5 (.25), 3 (.5), 0 (.875), 2 (1.5)
    for gamma in (0.0, 0.125, 0.3, 0.375, 0.875, 1.5, 3.0):
        n = 1 + sum(np.cumsum([0.125, 0.25, 0.5, 0.875, 1.5])[:-1] <= gamma)
        want = sorted([1, 5, 3, 0, 2][:n])
        assert _sel(rules.transfer_entropy_bound(h, masked, jnp.array([gamma]), by_entropy)) == want, gamma
    # per-row dispatch: an ENTROPY_BOUND row beside a THRESHOLD row
    sel = rules.select(None, jnp.array([rules.ENTROPY_BOUND, rules.THRESHOLD]), jnp.concatenate([conf, conf]),
                       jnp.concatenate([masked, masked]), jnp.array([0, 0]), jnp.array([1.0, 0.6]),
                       jnp.array([1.0, 1.0]), entropy=jnp.concatenate([h, h]), entropy_bound=jnp.array([0.375, 0.0]))
    assert [np.flatnonzero(np.asarray(r)).tolist() for r in sel] == [[1, 3, 5], [1, 3]]


def test_entropy_excludes_the_mask_token():
    logits = jnp.log(jnp.array([[[0.25, 0.25, 0.5]]]))  # token 2 is the mask
    np.testing.assert_allclose(proposal.entropy(logits, mask_id=2), [[np.log(2.0)]], rtol=1e-6)


def test_factor_rule():
    # sorted: .95 (rank0, always) .70 (rank1 needs >= 1 - f/3) .50 (rank2: 1 - f/4) .30 .10
    conf, masked = _row(CONF), _row(MASKED, bool)
    # f = 1: rank1 needs .667 -> ok; rank2 needs .75 -> stop => 2 tokens
    assert _sel(rules.transfer_factor(conf, masked, jnp.array([1.0]))) == [1, 3]
    # f = 2: rank1 .333 ok, rank2 .5 ok (.50 >= .5), rank3 needs .6 (.30) stop => 3
    assert _sel(rules.transfer_factor(conf, masked, jnp.array([2.0]))) == [1, 3, 5]
    # f = 0.1: rank1 needs .967 -> only the top-1
    assert _sel(rules.transfer_factor(conf, masked, jnp.array([0.1]))) == [1]
    # f = 10: everything masked
    assert _sel(rules.transfer_factor(conf, masked, jnp.array([10.0]))) == [0, 1, 2, 3, 5]
    # rank1 needs 1 - 1.2/3 = .6 (ok), rank2 needs 1 - 1.2/4 = .7 (.69 fails)
    assert _sel(rules.transfer_factor(_row([0.9, 0.7, 0.69]), _row([True] * 3, bool), jnp.array([1.2]))) == [0, 1]


def test_nemotron_rule():
    conf, masked = _row(CONF), _row(MASKED, bool)
    # factor 1: rank0 .95; rank1 .70 >= max(1-1/3, .5) ok; rank2 .50 needs .75 -> no; .30/.10 no
    assert _sel(rules.transfer_nemotron(conf, masked, jnp.array([1.0]))) == [1, 3]
    # factor 0: only >= .95 besides rank 0
    assert _sel(rules.transfer_nemotron(_row([0.96, 0.97, 0.2]), _row([True] * 3, bool), jnp.array([0.0]))) == [0, 1]
    # factor 4: 1 - 4/(r+2) is low but the 0.5 floor holds
    assert _sel(rules.transfer_nemotron(conf, masked, jnp.array([4.0]))) == [1, 3, 5]


def test_hierarchy_rule():
    # runs of masked positions: [0,1,2] and [5,6]; position 3,4 committed
    conf = _row([0.45, 0.50, 0.20, 0.99, 0.99, 0.35, 0.30, 0.92])
    masked = _row([True, True, True, False, False, True, True, True], bool)
    # run [0..2]: best 1 (.50 >= .4) ; run [5..7]: best 7 (.92) ; above .9: 7 ; global top-1: 7
    assert _sel(rules.transfer_hierarchy(conf, masked, jnp.array([0.9]))) == [1, 7]
    # run [5,6,7] best .92 also above threshold; lower the low threshold effect: run [0..2] best .50
    conf2 = _row([0.30, 0.35, 0.20, 0.99, 0.99, 0.39, 0.30, 0.60])
    # run [0..2] best .35 < .4 -> no; run [5..7] best .60 -> yes (also global top-1)
    assert _sel(rules.transfer_hierarchy(conf2, masked, jnp.array([0.9]))) == [7]


def test_credit_fusion_accumulates_for_stable_top1():
    logits = jnp.log(jnp.array([[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]]))  # [1, 2, 3]
    masked = jnp.array([[True, False]])
    credit = jnp.zeros((1, 2, 3))
    fused, credit = rules.credit_fuse(logits, credit, masked, jnp.array(True))
    np.testing.assert_allclose(credit[0, 0], [0.6 ** 0.2, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(credit[0, 1], [0, 0, 0])  # unmasked positions get no credit
    np.testing.assert_allclose(fused[0, 0, 0], np.log(0.6) + 0.7 * np.log1p(0.6 ** 0.2), atol=1e-6)
    fused, credit = rules.credit_fuse(logits, credit, masked, jnp.array(False))
    np.testing.assert_allclose(credit[0, 0, 0], 0.8 * 0.6 ** 0.2 + 0.6 ** 0.2, rtol=1e-6)


def test_propose_greedy_never_returns_mask_and_uses_full_softmax():
    logits = jnp.array([[[0.0, 3.0, 1.0], [0.0, 1.0, 5.0]]])
    keys = jnp.zeros((1, 2), jnp.uint32)
    x0, conf = proposal.propose(logits, jnp.zeros(1), keys, mask_id=2)
    assert x0.tolist() == [[1, 1]]  # position 1's argmax is the mask id (2): the next best is taken
    p = np.exp([0.0, 1.0, 5.0]) / np.exp([0.0, 1.0, 5.0]).sum()
    np.testing.assert_allclose(conf[0, 1], p[1], rtol=1e-6)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_gumbel_draws_follow_softmax_over_temperature(t):
    """Empirical frequency of the proposed token vs softmax(logits / T) (chi-square-ish bound)."""
    import jax

    logits = jnp.array([1.0, 0.5, -0.5, 2.0, 0.0])
    n = 4000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    x0, _ = proposal.propose(jnp.broadcast_to(logits, (n, 1, 5)), jnp.full(n, t), keys, mask_id=99)
    freq = np.bincount(np.asarray(x0[:, 0]), minlength=5) / n
    want = np.asarray(jax.nn.softmax(logits / t))
    # 4 standard errors per category
    assert np.all(np.abs(freq - want) <= 4 * np.sqrt(want * (1 - want) / n) + 1e-3), (freq, want)


# ---- selection policy 'leftmost' (rules.select with per-row remasking codes) ---------------------

def _select(conf, masked, *, rule=rules.FIXED, rule_static=None, k=0, threshold=1.0, factor=1.0,
            policy=rules.LEFTMOST):
    return _sel(rules.select(rule_static, jnp.array([rule]), _row(conf), _row(masked, bool), jnp.array([k]),
                             jnp.array([threshold]), jnp.array([factor]), jnp.array([policy])))


def test_leftmost_fixed_commits_the_k_leftmost_masks():
    # masked positions left to right: 0 (.30) 1 (.95) 2 (.10) 3 (.70) 5 (.50)
    assert _select(CONF, MASKED, k=2) == [0, 1]
    assert _select(CONF, MASKED, k=4) == [0, 1, 2, 3]
    assert _select(CONF, MASKED, k=5) == [0, 1, 2, 3, 5]
    assert _select(CONF, MASKED, k=0) == []
    assert _select(CONF, MASKED, k=2, policy=rules.LOW_CONFIDENCE) == [1, 3]  # the same call by confidence


def test_leftmost_threshold_and_factor_cut_at_the_first_refusal():
    # threshold .6: 0 always, 1 (.95) passes, 2 (.10) fails: 3 (.70) is not reached
    assert _select(CONF, MASKED, rule=rules.THRESHOLD, threshold=0.6) == [0, 1]
    assert _select(CONF, MASKED, rule=rules.THRESHOLD, threshold=0.05) == [0, 1, 2, 3, 5]
    assert _select(CONF, MASKED, rule=rules.THRESHOLD, threshold=0.6, policy=rules.LOW_CONFIDENCE) == [1, 3]
    # the leftmost is committed whatever its confidence
    assert _select([0.01, 0.99, 0.99], [True] * 3, rule=rules.THRESHOLD, threshold=0.9) == [0, 1, 2]
    # factor 1 on ranks by position: r1 .9 >= .667, r2 .8 >= .75, r3 .3 < .8
    conf = [0.2, 0.9, 0.8, 0.3]
    assert _select(conf, [True] * 4, rule=rules.FACTOR, factor=1.0) == [0, 1, 2]
    assert _select(conf, [True] * 4, rule=rules.FACTOR, factor=0.1) == [0]
    assert _select(conf, [True] * 4, rule=rules.NEMOTRON, rule_static=rules.NEMOTRON, factor=1.0) == [0, 1, 2]


def test_leftmost_dinfer_rules():
    conf = [0.45, 0.50, 0.20, 0.99, 0.99, 0.35, 0.30, 0.92]
    masked = [True, True, True, False, False, True, True, True]
    # hierarchy: 0 always; 1 is its run's best (.50 >= .4); 2 neither best nor >= .9 -> stop
    assert _select(conf, masked, rule_static=rules.HIERARCHY, threshold=0.9) == [0, 1]
    assert _select(conf, masked, rule_static=rules.HIERARCHY, threshold=0.9, policy=rules.LOW_CONFIDENCE) == [1, 7]
    # the walk crosses committed positions: 1 (.95) and 5 (.93) pass, 6 (.30) stops it
    conf = [0.10, 0.95, 0.5, 0.5, 0.5, 0.93, 0.30, 0.20]
    masked = [True, True, False, False, False, True, True, True]
    assert _select(conf, masked, rule_static=rules.HIERARCHY, threshold=0.9) == [0, 1, 5]
    assert _select(conf, masked, rule_static=rules.CREDIT, threshold=0.9) == [0, 1, 5]


def test_policies_are_per_row():
    """Rows with different policies in one call select what each selects alone."""
    rng = np.random.default_rng(0)
    b, lb = 6, 8
    conf = rng.uniform(0, 1, (b, lb)).astype(np.float32)
    masked = rng.uniform(0, 1, (b, lb)) < 0.7
    rule = np.array([rules.FIXED, rules.THRESHOLD, rules.FACTOR] * 2)
    policy = np.array([rules.LOW_CONFIDENCE, rules.LEFTMOST, rules.RANDOM, rules.LEFTMOST, rules.LEFTMOST,
                       rules.LOW_CONFIDENCE])
    k, threshold, factor = np.full(b, 2), np.full(b, 0.5, np.float32), np.full(b, 1.5, np.float32)
    together = np.asarray(rules.select(None, jnp.asarray(rule), jnp.asarray(conf), jnp.asarray(masked), jnp.asarray(k),
                                       jnp.asarray(threshold), jnp.asarray(factor), jnp.asarray(policy)))
    for i in range(b):
        alone = rules.select(None, jnp.asarray(rule[i:i + 1]), jnp.asarray(conf[i:i + 1]),
                             jnp.asarray(masked[i:i + 1]), jnp.asarray(k[i:i + 1]), jnp.asarray(threshold[i:i + 1]),
                             jnp.asarray(factor[i:i + 1]), jnp.asarray(policy[i:i + 1]))
        np.testing.assert_array_equal(together[i], np.asarray(alone)[0], err_msg=f"row {i}")
        if policy[i] == rules.LEFTMOST and masked[i].any():  # a prefix of the row's masks, never empty
            picked = np.flatnonzero(together[i])
            assert picked.tolist() == np.flatnonzero(masked[i])[:len(picked)].tolist() and len(picked) >= 1
