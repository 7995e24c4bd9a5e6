"""Meshes a user builds (``jax.make_mesh`` with Explicit or Auto axes, ``Mesh(...)``) through
``load``, ``logits`` and ``generate``; the logical-axis rules' loud failures."""

import warnings

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

import dllm_jax
from dllm_jax import sharding
from helpers import LLADA_DIR, NEMOTRON_DIR


def _meshes():
    devices = jax.devices()
    return {
        "make_mesh explicit (default)": lambda: jax.make_mesh((8, 1), ("data", "model")),
        "make_mesh auto 4x2": lambda: jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2),
        "Mesh(...) 2x2": lambda: Mesh(np.array(devices[:4]).reshape(2, 2), ("data", "model")),
        "Mesh(...) data only": lambda: Mesh(np.array(devices[:4]), ("data",)),
        "make_mesh explicit, axes swapped": lambda: jax.make_mesh((2, 4), ("model", "data")),
    }


@pytest.fixture(scope="module")
def single():
    return dllm_jax.load(LLADA_DIR / "model"), dllm_jax.load(NEMOTRON_DIR / "model")


# the two shapes the server offers (--mesh 8, --mesh 4x2) run every program kind; the other ways
# of building a mesh (which normalise to these shapes or a 4-device one) run the cached decoder
FULL_MESHES = ("make_mesh explicit (default)", "make_mesh auto 4x2")


@pytest.mark.parametrize("kind", list(_meshes()))
def test_any_user_mesh_loads_and_generates(single, kind):
    """Sharded outputs equal one device's: logits, and generation token for token with the same
    per-row NFE (a cached threshold decoder, sampling at T>0, Nemotron's static blocks)."""
    mesh = _meshes()[kind]()
    ids = np.arange(30).reshape(3, 10) % 300
    prompts = [[5, 49, 146, 244], [7, 8, 9], [11, 12, 13, 14, 15], [3, 1, 4, 1, 5, 9, 2, 6], [42]]
    runs = [(single[0], LLADA_DIR, dict(algorithm="dual_cache", threshold=0.8, steps=16)),
            (single[0], LLADA_DIR, dict(algorithm="basic", temperature=0.7, seed=3, steps=16)),
            (single[1], NEMOTRON_DIR, dict(algorithm="static_block"))]
    for one, path, kw in runs if kind in FULL_MESHES else runs[:1]:
        m = dllm_jax.load(path / "model", mesh=mesh)
        assert m.mesh.axis_names == ("data", "model")
        assert all(t == AxisType.Auto for t in m.mesh.axis_types)
        assert m.mesh.devices.size == mesh.devices.size
        np.testing.assert_allclose(m.logits(ids), one.logits(ids), atol=1e-4)
        a = one.generate(prompts, gen_length=32, block_length=8, **kw)
        b = m.generate(prompts, gen_length=32, block_length=8, **kw)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.nfe_per_row, b.nfe_per_row)
    r = dllm_jax.Model.random(dllm_jax.LLaDAConfig.tiny(), mesh=mesh)
    assert r.mesh.axis_names == ("data", "model")


def test_as_mesh_keeps_device_order_and_refuses_foreign_axes():
    mesh = jax.make_mesh((2, 4), ("model", "data"))
    out = sharding.as_mesh(mesh)
    assert dict(out.shape) == {"data": 4, "model": 2}
    np.testing.assert_array_equal(np.vectorize(lambda d: d.id)(out.devices),
                                  np.vectorize(lambda d: d.id)(mesh.devices).T)
    auto = dllm_jax.make_mesh("4x2")
    assert sharding.as_mesh(auto) is auto
    with pytest.raises(ValueError, match="'fsdp'"):
        sharding.as_mesh(jax.make_mesh((4, 2), ("data", "fsdp")))
    with pytest.raises(TypeError):
        sharding.as_mesh("8")


def test_make_mesh_is_auto_typed_from_jax_make_mesh():
    mesh = dllm_jax.make_mesh("4x2")
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 4, "model": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_logical_spec_refuses_two_axes_on_one_mesh_axis(monkeypatch):
    mesh = dllm_jax.make_mesh("4x2")
    monkeypatch.setitem(sharding.LOGICAL_RULES, "seq", "model")
    with pytest.raises(ValueError, match=r"'heads' and 'seq'.*\(8, 16\).*'model'"):
        sharding.logical_spec(("heads", "seq"), (8, 16), mesh)


def test_logical_spec_warns_once_when_replicating(monkeypatch):
    mesh = dllm_jax.make_mesh("4x2")
    monkeypatch.setattr(sharding, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert tuple(sharding.logical_spec(("embed", "vocab"), (16, 301), mesh)) == (None, None)
        assert tuple(sharding.logical_spec(("embed", "vocab"), (16, 300), mesh)) == (None, "model")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "'vocab' of size 301" in messages[0] and "'model' of size 2" in messages[0]


@pytest.mark.parametrize("kind", ["make_mesh explicit (default)", "Mesh(...) 2x2"])
def test_server_on_a_user_mesh(single, kind):
    """The real engine and app (in-process) serving a model loaded onto a user-built mesh."""
    import asyncio
    import time

    import httpx

    from serve.api.app import create_app
    from serve.engine.engine import Engine, EngineOptions

    mesh = _meshes()[kind]()
    engine = Engine(lambda: dllm_jax.load(LLADA_DIR / "model", mesh=mesh), names=["tiny"],
                    options=EngineOptions(max_batch_size=4, max_wait_ms=20))
    engine.start()
    try:
        deadline = time.monotonic() + 120
        while not engine.health()[0]:
            assert engine.health()[1] != "dead" and time.monotonic() < deadline, engine.error
            time.sleep(0.05)  # polling the engine thread's start-up (load + no warm-up), not a hope
        prompts = [[5, 49, 146, 244], [7, 8, 9]]
        body = dict(max_tokens=16, temperature=0, algorithm="dual_cache", threshold=0.9, block_length=8,
                    early_stop=False)

        async def main():
            transport = httpx.ASGITransport(app=create_app(engine))
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
                return await asyncio.gather(*(client.post("/v1/completions", json={**body, "prompt": p})
                                              for p in prompts))

        answers = asyncio.run(main())
    finally:
        engine.stop()
    tok = single[0].tokenizer
    for p, r in zip(prompts, answers):
        assert r.status_code == 200, r.text
        out = single[0].generate([p], gen_length=16, block_length=8, algorithm="dual_cache", threshold=0.9)
        assert r.json()["choices"][0]["text"] == tok.decode(out.tokens[0][: out.lengths[0]])
