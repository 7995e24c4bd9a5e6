"""Batch invariance in bf16: a request's tokens do not depend on its batch-mates.

Solo generation (batch 1 on a one-device mesh, the smallest prompt bucket) must give the same
tokens as the same request inside a batch (any batch size, any slot, a bigger prompt bucket
because of a longer companion, mixed seeded temperatures, a reused slot, an 8-device mesh).
The op that broke it on XLA:CPU was the RMSNorm / softmax reduction (its accumulation order
followed the array's shape); ``test_row_ops_bitwise_per_row`` pins the fixed op. Then the softmax
shift (``max`` + ``exp`` went to a YNNPACK fusion at some batch sizes only):
``test_softmax_shape_independent`` and the per-rule tests at the end, which also compare commit
confidences bitwise.
See docs/sampling.md, "Batch invariance in bf16".
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import LLADA_DIR, NEMOTRON_DIR

import dllm_jax
from dllm_jax.models import transformer as T
from dllm_jax.sampling import ALGORITHMS, DecodeSession, Row, SamplingParams, program_key
from dllm_jax.sampling.session import UNBOUNDED

G, LB = 16, 8
LLADA_ALGOS = ["basic", "no_cache", "prefix_cache", "dual_cache", "dinfer_blockwise", "dinfer_hierarchy",
               "dinfer_credit"]


@functools.cache
def _model(family: str, mesh: str):
    path = (LLADA_DIR if family == "llada" else NEMOTRON_DIR) / "model"
    return dllm_jax.load(path, dtype="bfloat16", mesh=dllm_jax.make_mesh(mesh))


def _prompts(n, seed=0):
    """Mixed lengths: 10, 40, 5, then random 3..40 (solo buckets 16 and 64)."""
    rng = np.random.default_rng(seed)
    lengths = [10, 40, 5] + list(rng.integers(3, 41, max(n - 3, 0)))
    return [rng.integers(0, 256, int(k)).tolist() for k in lengths[:n]]


def _kwargs(algorithm, n):
    kw = dict(algorithm=algorithm, gen_length=G, block_length=LB)
    if algorithm != "static_block":  # (static_block is greedy only)
        kw["steps"] = G
        # mixed T: greedy rows and seeded sampling rows
        kw["temperature"] = [0.0 if i % 2 == 0 else 0.7 for i in range(n)]
        kw["seed"] = [100 + i for i in range(n)]
    return kw


def _per_row(kw, i):
    return {k: (v[i] if isinstance(v, list) else v) for k, v in kw.items()}


def _check(algorithm, n, **extra):
    """Rows 0 (10 tokens, T = 0) and 2 (5 tokens, seeded T = 0.7; greedy for static_block) of an
    n-row batch on the 8-device mesh -- bucket 64 because row 1 has 40 tokens -- against each
    alone: batch 1, one device, bucket 16 (one compiled program for both solos). ``extra``:
    more (per-row) sampling arguments."""
    family = "nemotron" if algorithm == "static_block" else "llada"
    solo_model, batch_model = _model(family, "1"), _model(family, "8")
    prompts = _prompts(n)
    kw = dict(_kwargs(algorithm, n), **extra)
    batch = batch_model.generate(prompts, **kw).tokens
    for i in (0, 2):
        want = solo_model.generate([prompts[i]], **_per_row(kw, i)).tokens[0]
        np.testing.assert_array_equal(batch[i], want, err_msg=f"{algorithm} row {i} in a batch of {n}")


@pytest.mark.parametrize("algorithm", LLADA_ALGOS + ["static_block"])
def test_batch_invariant_generate(algorithm):
    _check(algorithm, 5)


@pytest.mark.parametrize("algorithm", ["basic", "dual_cache", "dinfer_hierarchy"])
def test_leftmost_rows_batch_invariant(algorithm):
    """'leftmost' rows (0: greedy, 2: sampled; with a threshold where the algorithm takes one per
    row) beside low_confidence and random rows of the same batch."""
    extra = dict(remasking=["leftmost", "low_confidence", "leftmost", "random", "low_confidence"])
    if algorithm != "dinfer_hierarchy":
        extra["threshold"] = [None, 0.5, 0.6, None, None]
    _check(algorithm, 5, **extra)


@pytest.mark.parametrize("algorithm", ["dual_cache", "static_block"])
def test_batch_invariant_batch32(algorithm):
    _check(algorithm, 32)


def test_slot_reuse_invariant():
    """A row admitted into a released slot, beside a running row, matches solo."""
    model = _model("llada", "1")
    prompts = _prompts(4, seed=3)
    base = SamplingParams(algorithm="dual_cache", gen_length=G, block_length=LB, steps=G, early_stop=True)
    first = model.generate([prompts[0]], **dataclasses.asdict(base)).tokens[0]
    params = [dataclasses.replace(base, stop_token_ids=(int(first[0]),)),  # stops after one block
              base, dataclasses.replace(base, temperature=0.8, seed=7), base]
    params = [p.resolve("llada") for p in params]
    session = DecodeSession(model, program_key(model, 40, params[0], 2))
    session.admit({0: Row(prompts[0], params[0]), 1: Row(prompts[1], params[1])})
    owner, waiting, results = {0: 0, 1: 1}, [3, 2], {}
    while session.busy:
        for u in session.step():
            if u.done:
                results[owner.pop(u.slot)] = u.tokens
                session.release(u.slot)
                if waiting:
                    owner[u.slot] = waiting.pop()
                    session.admit({u.slot: Row(prompts[owner[u.slot]], params[owner[u.slot]])})
    assert sorted(results) == [0, 1, 2, 3]
    for i in range(4):
        want = model.generate([prompts[i]], **dataclasses.asdict(params[i]))
        np.testing.assert_array_equal(results[i], want.tokens[0][: want.lengths[0]], err_msg=f"row {i}")


def _canvas(prompts, lp, mask_id):
    b, length = len(prompts), lp + G
    tok = np.full((b, length), mask_id, np.int32)
    valid = np.zeros((b, length), bool)
    pos = np.zeros((b, length), np.int32)
    for r, p in enumerate(prompts):
        pad = lp - len(p)
        tok[r, pad:lp], valid[r, pad:] = p, True
        pos[r, pad:] = np.arange(length - pad)
    return tok, pos, valid[:, None, :]


def test_row_ops_bitwise_per_row():
    """The bisecting test: each op's output for row 0 is bitwise equal at batch 1 / bucket 16
    and at batch N / bucket 64 (more left padding, more masked keys)."""
    model = _model("llada", "1")
    mod = nnx.merge(model.graphdef, model.params)
    spec = mod.spec

    def trace(tokens, positions, mask):
        out = []
        x = jnp.take(mod.embed[...], tokens, axis=0)
        cos, sin = T.rope_tables(positions, spec.head_dim, spec.rope_theta)
        for layer in mod.layers:
            p = layer.arrays()
            h = T.rms_norm(x, p["attn_norm"], spec.norm_eps)
            q, k, v = T._linear(h, p["q_proj"]), T._linear(h, p["k_proj"]), T._linear(h, p["v_proj"])
            q, k = T.apply_rope(q, cos, sin), T.apply_rope(k, cos, sin)
            a = T.attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
            x = x + T._linear(a, p["o_proj"], in_dims=2)
            h2 = T.rms_norm(x, p["mlp_norm"], spec.norm_eps)
            x = x + T._linear(jax.nn.silu(T._linear(h2, p["gate_proj"])) * T._linear(h2, p["up_proj"]),
                              p["down_proj"])
            out += [h, a, h2, x]
        logits = mod.head(x)
        return out + [logits, T.softmax(logits)]

    f = jax.jit(trace)
    prompts = _prompts(8, seed=5)  # lengths 10, 40, 5, ...
    mask_id = model.mask_token_id

    def row0(batch, lp):
        outs = f(*_canvas(batch, lp, mask_id))
        pad = lp - len(batch[0])
        return [np.asarray(o[0, pad:].astype(jnp.float32)) for o in outs]

    want = row0(prompts[:1], 16)
    for batch, lp in (([prompts[0], prompts[2]], 16), (prompts[:8], 64), (prompts[:1], 64)):
        got = row0(batch, lp)
        for j, (a, b) in enumerate(zip(want, got)):
            np.testing.assert_array_equal(a, b, err_msg=f"op {j} differs (batch {len(batch)}, bucket {lp})")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_row_sum_shape_independent(dtype):
    """rms_norm and row_sum of a row do not depend on the number of rows; row_sum also not on
    left zero padding (softmax: ``test_softmax_shape_independent``)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 48, 64)), dtype)
    w = jnp.asarray(1 + 0.1 * rng.normal(size=64), dtype)
    norm = jax.jit(lambda x: T.rms_norm(x, w, 1e-5))
    total = jax.jit(lambda x: T.row_sum(x.astype(jnp.float32) ** 2))
    one_n, one_s = np.asarray(norm(x[:1])), np.asarray(total(x[:1]))
    for b in (2, 3, 8):
        np.testing.assert_array_equal(np.asarray(norm(x[:b]))[0], one_n[0])
        np.testing.assert_array_equal(np.asarray(total(x[:b]))[0], one_s[0])
    padded = jnp.concatenate([jnp.zeros((1, 48, 37), dtype), x[:1]], axis=-1)
    np.testing.assert_array_equal(np.asarray(total(padded))[0], one_s[0])


def test_softmax_shape_independent():
    """softmax / log_softmax of a row do not depend on the number of rows, nor (softmax) on
    masked keys padded on the left as in a longer prompt bucket. Before row_max, XLA:CPU fused
    ``max`` + ``exp(x - max)`` into a YNNPACK op at batch >= 2 but not at batch 1, and YNNPACK's
    exp differs from XLA's by 1 ulp: 59 of row 0's 3072 probabilities changed."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(3 * rng.normal(size=(8, 8, 384)), jnp.float32)

    @jax.jit
    def ops(x):
        padded = jnp.concatenate([jnp.full(x.shape[:-1] + (48,), T.MASKED_SCORE), x], axis=-1)
        return T.softmax(x), T.log_softmax(x), T.softmax(padded)[..., 48:]

    one = [np.asarray(a)[0] for a in ops(x[:1])]
    for b in (2, 8):
        for name, a, want in zip(("softmax", "log_softmax", "softmax with masked keys"), ops(x[:b]), one):
            np.testing.assert_array_equal(np.asarray(a)[0], want, err_msg=f"{name} at batch {b}")
    np.testing.assert_array_equal(one[2], one[0], err_msg="softmax with masked keys")


_FRESH = r"""
import numpy as np, dllm_jax, sys
m = dllm_jax.load(sys.argv[2], dtype="bfloat16")
rng = np.random.default_rng(0)
[rng.integers(0, 256, int(n)) for n in rng.integers(3, 41, 8)]
short, long_ = rng.integers(0, 256, 10).tolist(), rng.integers(0, 256, 40).tolist()
kw = dict(algorithm="dual_cache", gen_length=32, block_length=8, steps=32)
alone, beside = m.generate([short], **kw).tokens[0], m.generate([short, long_], **kw).tokens[0]
assert np.array_equal(alone, beside), (alone, beside)
print("ok")
"""


def test_bucket_invariant_default_xla_flags():
    """The reported case in a fresh process with XLA's default CPU threading (no 8-device
    flag, default matmul precision): a 10-token prompt alone (bucket 16) vs beside a 40-token
    one (bucket 64), dual_cache, bf16. Before row_sum these differed; under this file's
    conftest (8 host devices) they happened not to."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", _FRESH, str(Path(__file__).parent), str(LLADA_DIR / "model")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_server_under_concurrent_load_equals_alone():
    """bf16 server: the same requests sent 8 at a time (batched, mixed prompt buckets, mixed T)
    and then one by one give identical texts."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from serve_helpers import LLADA_MODEL, Server, server_env

    server = Server("--model", str(LLADA_MODEL), "--dtype", "bfloat16", "--mesh", "1", "--warmup-buckets", "none",
                    "--max-batch-size", "8", "--max-wait-ms", "200", env=server_env(devices=1))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        name = client.models.list().data[0].id
        words = "the cat sat on a mat and looked at the quiet garden while rain fell".split()
        requests = [dict(prompt="Item 42 is", temperature=0.0),
                    dict(prompt=" ".join(words * 3), temperature=0.0),
                    dict(prompt="Once upon a time", temperature=0.8, seed=7),
                    dict(prompt=" ".join(words[:6]), temperature=0.0),
                    dict(prompt="Hello", temperature=1.0, seed=3),
                    dict(prompt=" ".join(words * 2), temperature=0.5, seed=11),
                    dict(prompt="1 2 3 4", temperature=0.0),
                    dict(prompt="A B C", temperature=0.0)]

        def run(r):
            return client.completions.create(model=name, max_tokens=32, **r).choices[0].text

        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(run, requests))
        alone = [run(r) for r in requests]
    finally:
        server.stop()
    assert together == alone


# ---- every algorithm x transfer rule x prompt bucket x admission step (issue 21) ----------
#
# One batch of 8 rows per (model, algorithm): per-row FIXED / THRESHOLD / FACTOR rules (dInfer:
# its own rule with per-row thresholds), greedy and seeded T > 0, prompts of 3-16 tokens (bucket
# 16 alone) beside 33-64-token ones (bucket 64), admitted at different denoising steps of one
# DecodeSession (some together). Each checked row is compared with its result alone, computed
# once: a short row at batch 1 / bucket 16 on one device, a long row alone in the batch's own
# program (same bucket, another slot).
# Compile budget: the MHA fixture runs on programs test_batch_invariant_generate already compiled
# in this file (batch 8 / bucket 64 on 8 devices: a row per device; batch 1 / bucket 16 on one),
# so it compiles nothing; the GQA model compiles two programs (batch 1 / bucket 16 and batch 8 /
# bucket 64 on one device, where the 8 rows share every matmul and reduction).

XLENGTHS = [5, 16, 11, 3, 40, 64, 33, 57]  # rows 0-3: bucket 16 alone; rows 4-7: bucket 64
XADMIT_AT = [0, 3, 0, 6, 1, 9, 4, 0]  # denoising step at which each row enters its slot


def _xparams(algorithm, multi_block=False):
    """Per-row SamplingParams of the 8 rows (resolved; traced: a session reports each final
    token's commit confidence, which changes neither the tokens nor the program). ``multi_block``:
    look-ahead rows (per-row block_add_threshold; every rule that takes one)."""
    if multi_block:
        rule = [dict(threshold=0.5), dict(threshold=0.7), dict(factor=1.0), dict(entropy_bound=0.3),
                dict(threshold=0.9), dict(factor=2.0), dict(entropy_bound=1.0), dict(threshold=0.6)]
        rule = [dict(r, block_add_threshold=a) for r, a in zip(rule, (0.25, 0.5, 0.125, 0.25, 0.75, 0.25, 0.5, 1.0))]
    elif ALGORITHMS[algorithm].rule is None:  # the row picks FIXED / THRESHOLD / FACTOR / ENTROPY_BOUND
        rule = [{}, dict(threshold=0.7), dict(factor=1.0), dict(entropy_bound=0.3), dict(threshold=0.9),
                dict(factor=2.0), dict(entropy_bound=1.0), dict(threshold=0.6)]
    else:  # dInfer: the algorithm's rule, per-row thresholds (the EB-Sampler where it takes the threshold's place)
        eb = ALGORITHMS[algorithm].decoder.rows_pick_rule
        rule = [{}, dict(threshold=0.7), dict(threshold=0.5), dict(entropy_bound=0.3) if eb else dict(threshold=0.6),
                dict(threshold=0.9), dict(threshold=0.8), dict(entropy_bound=1.0) if eb else {}, dict(threshold=0.6)]
    sampled = {3: 0.8, 6: 0.7}  # seeded T > 0 rows
    return [SamplingParams(algorithm=algorithm, gen_length=G, block_length=LB, steps=G, trace=True,
                           temperature=sampled.get(i, 0.0), seed=50 + i, **rule[i]).resolve("llada")
            for i in range(len(rule))]


def _session_rows(model, key, rows, admit_at, slots):
    """(final tokens, their commit confidences) of each row run through one DecodeSession of
    ``key``: row i enters slot ``slots[i]`` once the batch has run ``admit_at[i]`` denoising steps."""
    session = DecodeSession(model, key)
    ran = 0
    for at in sorted(set(admit_at)):
        if at > ran:
            session.step(at - ran, exit_on_done=False)
            ran = at
        session.admit({slots[i]: rows[i] for i in range(len(rows)) if admit_at[i] == at})
    while True:
        updates = {u.slot: u for u in session.step(UNBOUNDED, exit_on_done=False)}
        if all(u.done for u in updates.values()):
            return [(updates[s].tokens, updates[s].commit_conf) for s in slots]


def _check_rules_buckets_admission(solo_model, batch_model, algorithm, seed, checked, together, multi_block=False):
    """Rows ``checked`` of the staggered batch (and, with ``together``, of the batch admitted at
    once) against each alone: the same tokens, and bitwise the same commit confidences (a 1-ulp
    difference there is what flips a near-tied commit elsewhere)."""
    rng = np.random.default_rng(seed)
    params = _xparams(algorithm, multi_block)
    rows = [Row(rng.integers(0, 256, n).tolist(), q) for n, q in zip(XLENGTHS, params)]
    key = program_key(batch_model, max(XLENGTHS), params[0], len(rows))
    assert (key.batch, key.prompt_len) == (8, 64)
    slots = list(range(len(rows)))
    runs = {f"admitted at steps {XADMIT_AT}": _session_rows(batch_model, key, rows, XADMIT_AT, slots)}
    if together:
        runs["admitted together"] = _session_rows(batch_model, key, rows, [0] * len(rows), slots)
    for i in checked:
        row = rows[i]
        if len(row.prompt) <= 16:  # batch 1, bucket 16, one device
            kw = dataclasses.asdict(row.params)
            kw.pop("trace")
            out = solo_model.generate([row.prompt], return_trace=True, **kw)
            n = out.lengths[0]
            alone = (out.tokens[0][:n], out.trace["commit_conf"][0][:n])
        else:  # alone in the batch's program, in another slot
            alone = _session_rows(batch_model, key, [row], [0], [7 - i])[0]
        for how, result in runs.items():
            p = row.params
            what = (f"{algorithm} row {i} ({len(row.prompt)} tokens, threshold={p.threshold}, factor={p.factor}, "
                    f"T={p.temperature}) {how} vs alone")
            np.testing.assert_array_equal(result[i][0], alone[0], err_msg=f"tokens: {what}")
            np.testing.assert_array_equal(result[i][1], alone[1], err_msg=f"commit confidences: {what}")


@pytest.mark.parametrize("algorithm", LLADA_ALGOS)
def test_rules_buckets_admission_mha(algorithm):
    """MHA fixture, bf16: the 8-device batch program vs batch 1 on one device (rows 0-4)."""
    _check_rules_buckets_admission(_model("llada", "1"), _model("llada", "8"), algorithm, seed=11,
                                   checked=range(5), together=False)


@pytest.mark.parametrize("algorithm", ["no_cache", "prefix_cache", "dual_cache"])
def test_multi_block_rules_buckets_admission_mha(algorithm):
    """Multi-block decoding (look-ahead rows), MHA fixture, bf16: the 8-device batch program vs
    batch 1 on one device (rows 0-4)."""
    _check_rules_buckets_admission(_model("llada", "1"), _model("llada", "8"), algorithm, seed=13,
                                   checked=range(5), together=False, multi_block=True)


@functools.cache
def _gqa_model():
    """The fixture's weights as a GQA model (kv heads 0 and 2 of its 4; 4 query heads), bf16, one
    device: the shape of issue 21's report. Built from host arrays (an abstract model's
    ``with_params(convert=True)``): no init program to compile, unlike ``Model.random``."""
    from dllm_jax.model import Model, abstract_params

    mha = _model("llada", "1")
    config = dataclasses.replace(mha.config, n_kv_heads=2)
    graphdef, abstract = abstract_params(config, jnp.bfloat16, mha.mesh)
    params = jax.tree.map(np.asarray, mha.params.to_pure_dict())
    for layer in params["layers"].values():
        for name in ("k_proj", "v_proj"):  # [D, K, H]
            layer[name] = layer[name][:, ::2, :]
    return Model(config, graphdef, abstract, tokenizer=mha.tokenizer, mesh=mha.mesh).with_params(params, convert=True)


def test_rules_buckets_admission_gqa_prefix_cache():
    """GQA, bf16, one device, prefix_cache (issue 21's report): all 8 rows, together and staggered."""
    model = _gqa_model()
    _check_rules_buckets_admission(model, model, "prefix_cache", seed=12, checked=range(8), together=True)


@pytest.mark.parametrize("family", ["llada", "nemotron"])
def test_score_does_not_depend_on_the_other_sequences(family):
    """``Model.score`` in bf16 (its head in vocabulary chunks: fixed-order sums): a sequence's
    log-probabilities and top k are bitwise the same scored alone and beside sequences of other
    lengths (other row buckets, other rows in its call)."""
    model = _model(family, "1")
    rng = np.random.default_rng(8)
    target = rng.integers(0, 256, 9).tolist()
    alone = model.score([target], top_k=3)[0]
    for mates in ([rng.integers(0, 256, 4).tolist()], [rng.integers(0, 256, int(k)).tolist() for k in (12, 7, 15)]):
        got = model.score(mates[:1] + [target] + mates[1:], top_k=3)[1]
        np.testing.assert_array_equal(got.token_logprobs, alone.token_logprobs)
        np.testing.assert_array_equal(got.top_ids, alone.top_ids)
        np.testing.assert_array_equal(got.top_logprobs, alone.top_logprobs)
