"""In process, the JAX way: ``Engine.update_params(pytree)`` and the device-memory release / resume
behind SGLang's ``release_memory_occupation`` / ``resume_memory_occupation``.

A real engine on its own param arrays of the LLaDA tiny fixture, sharing the shared model's
compiled programs (one program: batch 1, one prompt bucket, 16 tokens): a pytree update changes
the T=0 output to what the shared model gives on those params, with no program built and no XLA
compile; the caller's arrays are served as they are and never deleted by the engine; a host tree
(a pure dict) is converted (a copy); a tree that does not fit fails naming the parameter while the
old weights keep serving. Release moves the params to host memory (live array bytes drop by at
least one copy) and is refused while a row runs; resume brings them back bitwise, and the outputs
and the compile counters do not change. The executor's offload on a 2x2 mesh (sharded and
replicated parameters) keeps one host copy per distinct shard. ``Model.with_params(convert=True)``
casts and moves bfloat16 leaves from another mesh.
"""

from __future__ import annotations

import asyncio
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dllm_jax
from dllm_jax.sampling import SamplingParams
from serve.engine.engine import Engine, EngineOptions
from serve.engine.errors import EngineBusy, MemoryReleased, WeightUpdateFailed
from serve.engine.executor import Executor
from serve.engine.metrics import live_array_bytes, xla_compiles
from serve.engine.requests import SeqRequest
from serve.engine.weight_reading import IN_PROCESS
from serve_helpers import LLADA_MODEL
from test_serve_units import TIMEOUT, collect, until

PROMPTS = [[5, 49, 146, 244], [7, 8, 9, 10, 11]]
SAMPLING = dict(gen_length=16, block_length=8, algorithm="basic")  # (the cheapest program to compile)


class GatedExecutor(Executor):
    """The real executor; ``open_gate`` cleared holds the next ``step`` (a row stays running)."""

    def __init__(self, model):
        super().__init__(model)
        self.open_gate, self.stepping = threading.Event(), threading.Event()
        self.open_gate.set()

    def step(self, sid, steps=None):
        self.stepping.set()
        assert self.open_gate.wait(TIMEOUT), "the test never opened the gate"
        return super().step(sid, steps)


@pytest.fixture(scope="module")
def engine(llada_model):
    """An engine on a copy of the shared tiny model: its own param arrays (updates retire and free
    the ones it starts with), the shared compiled programs (no compile of its own)."""
    shared = llada_model.programs
    limit, listeners = shared.max_programs, list(shared.on_evict)
    model = llada_model.with_params(jax.tree.map(lambda x: jax.device_put(np.array(x), x.sharding), llada_model.params))
    e = Engine(lambda: model, names=["x"], make_executor=GatedExecutor,
               options=EngineOptions(max_batch_size=1, warmup=(), background_compile=False))
    e.start()
    asyncio.run(until(lambda: e.health()[0], "ready"))
    yield e
    e.stop()
    shared.on_evict[:] = listeners  # (the engine's changes to the shared program cache undone)
    shared.set_limit(limit)


def run(coro, timeout: float = TIMEOUT):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def greedy(engine, prompt) -> list[int]:
    async def main():
        params = SamplingParams(**SAMPLING).resolve("llada")
        return (await collect(engine.submit([SeqRequest(prompt, params, SAMPLING["gen_length"])])))[0].tokens.tolist()
    return run(main())


def reference(model, prompt) -> list[int]:
    out = model.generate([prompt], **SAMPLING)
    return out.tokens[0, :out.lengths[0]].tolist()


def perturbed(model, seed: float, scale: float = 0.5):
    """The model's params plus noise, as device arrays on its own shardings (host arithmetic)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x) + scale * np.asarray(x).std()
                                                 * rng.standard_normal(x.shape).astype(x.dtype), x.sharding),
                        model.params)


def counters(engine) -> tuple[int, int]:
    return engine.model.programs.builds, xla_compiles()


def test_update_params_serves_the_new_tree_without_a_compile(engine, llada_model):
    before = [reference(llada_model, p) for p in PROMPTS]  # (compiles the one program, if not yet)
    assert [greedy(engine, p) for p in PROMPTS] == before
    params = perturbed(engine.model, 7)
    expected = [reference(llada_model.with_params(params), p) for p in PROMPTS]
    assert expected != before, "the perturbation must change the answers"
    counts = counters(engine)
    result = run(engine.update_params(params, label="step_1"))
    assert result["success"] and result["layout"] == "pytree" and result["model_path"] == IN_PROCESS
    assert result["weight_version"] == "step_1" and result["copied_bytes"] == 0 and result["params_bytes"] > 0
    w = engine.weights()
    assert (w.version, w.label, w.source, w.layout) == (result["weights_version"], "step_1", IN_PROCESS, "pytree")
    assert [greedy(engine, p) for p in PROMPTS] == expected
    assert counters(engine) == counts  # no program built, nothing compiled (not even a transfer program)
    leaves = jax.tree.leaves(params)
    served = jax.tree.leaves(engine.executor.versions[w.version].params)
    assert all(x is y for x, y in zip(served, leaves))  # the caller's arrays, no copy

    # from a trainer thread: a pure dict of host arrays (converted: copies), no label (kept)
    host = jax.tree.map(np.asarray, params.to_pure_dict())
    out = {}
    t = threading.Thread(target=lambda: out.update(engine.update_params_sync(host, timeout=TIMEOUT)))
    t.start()
    t.join(TIMEOUT)
    assert out["copied_bytes"] == out["params_bytes"] and out["weight_version"] == "step_1"
    assert engine.weights().label == "step_1" and engine.weights().version == w.version + 1
    del w
    asyncio.run(until(lambda: list(engine.executor.versions) == [out["weights_version"]], "the old version retired"))
    assert not any(x.is_deleted() for x in leaves)  # retired, but the caller's arrays are left alone
    assert [greedy(engine, p) for p in PROMPTS] == expected
    assert counters(engine)[0] == counts[0]


def test_a_tree_that_does_not_fit_is_refused_naming_the_parameter(engine, monkeypatch):
    version, answer = engine.weights().version, greedy(engine, PROMPTS[0])
    params = engine.model.params.to_pure_dict()
    wrong = {**params, "layers": {**params["layers"], 0: {**params["layers"][0], "q_proj": jnp.zeros((3, 4))}}}
    missing = {k: v for k, v in params.items() if k != "lm_head"}
    extra = {**params, "value_head": jnp.zeros(4)}
    for tree, words in ((wrong, "parameter layers/0/q_proj: shape (3, 4) where this model has"),
                        (missing, "parameter lm_head is missing"),
                        (extra, "parameter value_head is not part of this model")):
        with pytest.raises(WeightUpdateFailed) as e:
            run(engine.update_params(tree))
        assert words in str(e.value) and "previous weights keep serving" in str(e.value) and e.value.bad_checkpoint
    assert engine.weights().version == version and greedy(engine, PROMPTS[0]) == answer
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(WeightUpdateFailed, match="single-process engine"):
        engine.update_params_sync(params)


def test_release_and_resume_round_trip_bitwise(engine):
    answers = [greedy(engine, p) for p in PROMPTS]
    model = engine.executor.versions[engine.weights().version]
    shardings = [x.sharding for x in jax.tree.leaves(model.params)]
    saved = [np.array(x) for x in jax.tree.leaves(model.params)]
    counts = counters(engine)

    # a row in a running batch: refused, nothing released
    engine.executor.open_gate.clear()
    engine.executor.stepping.clear()

    async def busy():
        handle = engine.submit([SeqRequest(PROMPTS[0], SamplingParams(**SAMPLING).resolve("llada"), 16)])
        await asyncio.to_thread(engine.executor.stepping.wait, TIMEOUT)
        release = asyncio.ensure_future(engine.release_memory())
        engine.executor.open_gate.set()
        with pytest.raises(EngineBusy, match="1 sequence"):
            await release
        return (await collect(handle))[0].tokens.tolist()

    assert run(busy()) == answers[0] and not engine.released

    result = run(engine.release_memory())
    nbytes = sum(a.nbytes for a in saved)
    assert result["success"] and result["versions"] == 1 and result["params_bytes"] == nbytes
    assert result["live_array_bytes"]["before"] - result["live_array_bytes"]["after"] >= nbytes
    assert engine.released and all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(model.params))
    assert run(engine.release_memory())["params_bytes"] == 0  # (already released: a no-op)
    with pytest.raises(MemoryReleased):
        run(engine.update_params(engine.model.params))
    assert live_array_bytes() <= result["live_array_bytes"]["after"]

    result = run(engine.resume_memory())
    assert result["params_bytes"] == nbytes and not engine.released
    leaves = jax.tree.leaves(model.params)
    assert [x.sharding for x in leaves] == shardings
    for a, x in zip(saved, leaves):
        assert a.dtype == x.dtype and np.array_equal(a, np.asarray(x))
    assert [greedy(engine, p) for p in PROMPTS] == answers
    assert counters(engine) == counts  # the same programs ran on the reloaded buffers


def test_offload_keeps_one_host_copy_per_distinct_shard_on_a_mesh():
    model = dllm_jax.load(LLADA_MODEL, mesh=dllm_jax.make_mesh("2x2"))
    ex = Executor(model)
    leaves = jax.tree.leaves(model.params)
    assert any(not x.sharding.is_fully_replicated for x in leaves) and any(x.sharding.is_fully_replicated
                                                                           for x in leaves)
    saved = [(np.array(x), x.sharding) for x in leaves]
    moved = ex.offload()
    assert moved["params_bytes"] == sum(x.nbytes for x in leaves)  # not one copy per device
    assert all(x.is_deleted() for x in leaves) and ex.offloaded
    assert model.with_params(model.params).params is not None  # (abstract leaves still carry the shardings)
    ex.reload()
    for (a, sharding), x in zip(saved, jax.tree.leaves(ex.versions[0].params)):
        assert x.sharding == sharding and np.array_equal(a, np.asarray(x))
    assert all(x is y for x, y in zip(jax.tree.leaves(model.params), jax.tree.leaves(ex.versions[0].params)))


def test_with_params_casts_and_moves_only_with_convert(llada_model):
    """The library call under update_params: bfloat16 leaves on another mesh are refused as they
    are (naming the parameter) and cast + moved onto the running dtype and shardings with
    ``convert=True``; an nnx.State and its pure dict are matched by name alike."""
    other = jax.sharding.NamedSharding(dllm_jax.make_mesh("2"), jax.sharding.PartitionSpec())
    half = jax.tree.map(lambda x: jax.device_put(np.asarray(x).astype(jnp.bfloat16), other), llada_model.params)
    with pytest.raises(ValueError, match="parameter .*: dtype bfloat16 where this model has float32"):
        llada_model.with_params(half)
    for tree in (half, half.to_pure_dict()):
        converted = llada_model.with_params(tree, convert=True)
        for x, y, like in zip(jax.tree.leaves(converted.params), jax.tree.leaves(half),
                              jax.tree.leaves(llada_model.params)):
            assert x.dtype == like.dtype and x.sharding == like.sharding
            assert np.array_equal(np.asarray(x), np.asarray(y).astype(np.float32))
