"""Hand-computed cases for every transfer rule (no model involved)."""

import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax.sampling import rules


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
    x0, conf = rules.propose(logits, jnp.zeros(1), keys, mask_id=2)
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
    x0, _ = rules.propose(jnp.broadcast_to(logits, (n, 1, 5)), jnp.full(n, t), keys, mask_id=99)
    freq = np.bincount(np.asarray(x0[:, 0]), minlength=5) / n
    want = np.asarray(jax.nn.softmax(logits / t))
    # 4 standard errors per category
    assert np.all(np.abs(freq - want) <= 4 * np.sqrt(want * (1 - want) / n) + 1e-3), (freq, want)
