"""``POST /update_weights_from_disk``: new weights without a restart, no recompile.

Against a real ``python -m serve`` process on the LLaDA tiny fixture (A): swaps to a perturbed
copy B (an HF dir and a NeMo-RL DCP dir) while clients keep sending requests; every request
must be entirely A's answer (this server before any swap) or entirely B's (a fresh server on
B), both of its choices, at T=0; requests sent after the update returned get B's, and nothing
compiles (``dllm_xla_compiles_total`` counts every XLA compile of the process). Broken and
incompatible checkpoints are refused with the old weights still answering.

In process: the engine's swap semantics (running sessions finish on the old version, new ones
open on the new, old versions retired, never three copies) step by step on the scheduler's
fake executor; a failure part way through a load; the multi-host command replayed by a
follower executor.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import shutil
import threading
import time
import warnings
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest

import dllm_jax
from dllm_jax.checkpoint import CheckpointError, SafetensorsSource, load_tokenizer, save_safetensors
from serve.api.app import create_app
from serve.engine.engine import Engine, EngineOptions
from serve.engine.errors import WeightUpdateFailed
from serve.engine.executor import Executor
from serve.engine.weight_reading import Staged
from serve_helpers import LLADA_MODEL, Server, read_metrics, server_env, sse_events
from helpers import LLADA_DIR
from test_serve_units import TIMEOUT, FakeExecutor, collect, fake_model, seq, until, wait_for

KEY = "weights-test-key"
NAME = "llada-tiny"
TEXTS = ["The cat", "Once upon a time", "Hello there, how are you today?", "1 2 3 4", "A", "Why is the sky"]
MAX_TOKENS = 32
LLADA_DCP = LLADA_DIR / "dcp/policy"  # NeMo-RL v1 layout of A's own weights ("model." prefix)
pytestmark = pytest.mark.slow


# ---- checkpoints -----------------------------------------------------------------------------

def _tensors(directory: Path) -> dict[str, np.ndarray]:
    src = SafetensorsSource(directory)
    out = {k: np.array(src.read(k)) for k in src.tensors()}
    src.close()
    return out


def _hf_copy(dest: Path, tensors: dict[str, np.ndarray] | None = None, **config) -> Path:
    """A copy of the fixture's HF dir, with other tensors and/or config fields."""
    shutil.copytree(LLADA_MODEL, dest)
    if tensors is not None:
        save_safetensors(tensors, dest / "model.safetensors")
    if config:
        cfg = json.loads((dest / "config.json").read_text())
        cfg.update(config)
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def _dcp(dest: Path, tensors: dict[str, np.ndarray]) -> Path:
    """NeMo-RL's v1 layout: step_N/policy/weights is a DCP of {"model": state_dict}, no config."""
    import torch
    import torch.distributed.checkpoint as dcp

    sd = {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": sd}, checkpoint_id=str(dest / "step_5/policy/weights"), no_dist=True)
    return dest / "step_5"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("weights")
    a = _tensors(LLADA_MODEL)
    rng = np.random.default_rng(7)
    b = {k: (v + 0.5 * v.std() * rng.standard_normal(v.shape)).astype(v.dtype) if v.ndim == 2 else v
         for k, v in a.items()}
    out = {"a": LLADA_MODEL, "b_hf": _hf_copy(tmp / "b_hf", b), "b_dcp": _dcp(tmp / "b_dcp", b),
           "layers": _hf_copy(tmp / "layers", n_layers=3), "mask": _hf_copy(tmp / "mask", mask_token_id=335),
           "truncated": _hf_copy(tmp / "truncated", b)}
    path = out["truncated"] / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    torn = tmp / "torn_dcp"
    shutil.copytree(out["b_dcp"], torn)
    distcp = next((torn / "policy/weights").glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[: distcp.stat().st_size - 100])
    out["torn_dcp"] = torn
    from convert.hf_to_orbax import convert

    convert(out["b_hf"], tmp / "b_orbax", dtype="float32", progress=False)
    out["b_orbax"] = tmp / "b_orbax"
    return out


# one compiled block program (batch 8, prompt bucket 64, 32 tokens): every request uses it
SERVER_ARGS = ("--served-model-name", NAME, "--mesh", "1", "--max-batch-size", "8", "--batch-buckets", "8",
               "--prompt-buckets", "64", "--max-wait-ms", "20", "--warmup-buckets", "8x64x32")


@pytest.fixture(scope="module")
def server():
    s = Server("--model", str(LLADA_MODEL), *SERVER_ARGS, "--allow-weight-updates",
               env=server_env(devices=1, DLLM_API_KEY=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def refs(http, ckpts):
    """T=0 texts (both choices) of every prompt on A (this server before any swap) and on B (a
    fresh server started on B's HF dir)."""
    tok = load_tokenizer(LLADA_MODEL)
    out = {"ids": [tok.encode(t) for t in TEXTS]}
    ensure(http, ckpts["a"])
    out["a"] = [ask(http, i, out["ids"])[0] for i in range(len(TEXTS))]
    fresh = Server("--model", str(ckpts["b_hf"]), *SERVER_ARGS, env=server_env(devices=1))
    try:
        with httpx.Client(base_url=fresh.url, timeout=120) as other:
            out["b_hf"] = [ask(other, i, out["ids"])[0] for i in range(len(TEXTS))]
    finally:
        fresh.stop()
    assert sum(x != y for x, y in zip(out["a"], out["b_hf"])) >= len(TEXTS) - 1, "B must answer differently"
    return out


# ---- helpers -----------------------------------------------------------------------------------

def counters(http) -> dict[str, float]:
    m = read_metrics(http.get("/metrics").text, NAME)
    return {k: m[f"dllm_{k}"] for k in ("compiles_total", "programs_built_total", "xla_compiles_total",
                                         "weights_loaded_total", "weight_update_failures_total",
                                         "weights_resident")}


def update(http, path, **extra) -> httpx.Response:
    return http.post("/update_weights_from_disk", json={"model_path": str(path), **extra})


def ask(http, i: int, ids, *, stream: bool = False) -> list[str]:
    """The texts of both choices (n=2) of prompt i, at T=0."""
    body = {"model": NAME, "prompt": ids[i], "max_tokens": MAX_TOKENS, "n": 2, "temperature": 0}
    if not stream:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    texts = ["", ""]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for ev in sse_events(r.iter_lines()):
            if ev != "[DONE]":
                assert "error" not in ev, ev
                for c in ev["choices"]:
                    texts[c["index"]] += c["text"]
    return texts


def answers(http, refs, name: str) -> None:
    for i in range(len(TEXTS)):
        assert ask(http, i, refs["ids"]) == [refs[name][i]] * 2, (name, i)


def swap_under_load(http, path, refs, before: str, after: str) -> dict:
    """Update to ``path`` while 4 clients (one streaming) keep asking; check every answer."""
    log, errors, stop = [], [], threading.Event()

    def client(k: int):
        i = k
        while not stop.is_set():
            i = (i + 1) % len(TEXTS)
            sent = time.monotonic()
            try:
                texts = ask(http, i, refs["ids"], stream=k == 0)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))
                return
            log.append((i, texts, sent, time.monotonic()))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(log) < 4 and not errors and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.monotonic()
        r = update(http, path)
        t1 = time.monotonic()
        while sum(sent > t1 for _, _, sent, _ in log) < 4 and not errors and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert r.status_code == 200, r.text
    for i, texts, sent, done in log:
        assert texts[0] == texts[1], f"prompt {i}: the choices of one request disagree: {texts}"
        which = [name for name in (before, after) if texts[0] == refs[name][i]]
        assert which, f"prompt {i}: {texts[0]!r} is neither {before}'s nor {after}'s answer"
        if done < t0:
            assert before in which, (i, texts)
        if sent > t1:
            assert after in which, (i, texts)
    assert sum(sent > t1 for _, _, sent, _ in log) >= 4 and sum(done < t0 for *_, done in log) >= 4
    return r.json()


def warm(http, refs) -> None:
    """Admit 1..8 rows at once: each count compiles its seed-key helper once (not the programs)."""
    for k in range(1, 9):
        r = http.post("/v1/completions", json={"model": NAME, "prompt": [refs["ids"][i % len(TEXTS)] for i in range(k)],
                                               "max_tokens": MAX_TOKENS})
        assert r.status_code == 200, r.text


def current(http) -> dict:
    return http.get("/v1/models").json()["data"][0]


def ensure(http, path) -> None:
    if current(http)["source"] != str(path):
        r = update(http, path)
        assert r.status_code == 200, r.text


# ---- against the server ------------------------------------------------------------------------

def test_swap_to_hf_copy_under_load_no_compile(server, http, ckpts, refs):
    ensure(http, ckpts["a"])
    answers(http, refs, "a")
    warm(http, refs)
    before = counters(http)
    assert before["xla_compiles_total"] > 0 and before["weights_resident"] == 1
    t0 = time.time()
    body = swap_under_load(http, ckpts["b_hf"], refs, "a", "b_hf")
    assert body["success"] is True and body["layout"] == "hf" and body["model_path"] == str(ckpts["b_hf"])
    assert body["weights_version"] >= 1 and body["load_seconds"] > 0 and body["params_bytes"] > 0
    memory = body["memory"]  # (on CPU: live arrays and RSS; both copies are live at the swap)
    assert memory["before"]["live_array_bytes"] >= body["params_bytes"] and "process_rss_bytes" in memory["before"]
    assert memory["both_resident"]["live_array_bytes"] >= 2 * body["params_bytes"]
    answers(http, refs, "b_hf")
    card = current(http)
    assert card["source"] == str(ckpts["b_hf"]) and card["weights_version"] == body["weights_version"]
    assert card["weights_loaded_at"] >= int(t0) and card["weights_layout"] == "hf"
    after = counters(http)
    for name in ("compiles_total", "programs_built_total", "xla_compiles_total"):
        assert after[name] == before[name], (name, before, after)
    assert after["weights_loaded_total"] == before["weights_loaded_total"] + 1
    deadline = time.monotonic() + 30  # A is freed once its last request ended
    while counters(http)["weights_resident"] != 1:
        assert time.monotonic() < deadline, counters(http)
        time.sleep(0.05)


def test_swap_to_dcp_under_load(server, http, ckpts, refs):
    ensure(http, ckpts["a"])
    r = update(http, LLADA_DCP, weight_version="step_0")  # A's own weights, as NeMo-RL saved them
    assert r.status_code == 200 and r.json()["layout"] == "dcp:policy/weights", r.text
    answers(http, refs, "a")
    warm(http, refs)
    before = counters(http)
    body = swap_under_load(http, ckpts["b_dcp"], refs, "a", "b_hf")
    assert body["layout"] == "dcp:step_N/policy/weights"
    assert body["weight_version"] == "step_0" == current(http)["weight_version"]  # (no label: the last one stays)
    answers(http, refs, "b_hf")  # = the fresh server on B
    after = counters(http)
    for name in ("compiles_total", "programs_built_total", "xla_compiles_total"):
        assert after[name] == before[name], (name, before, after)
    # an Orbax dir from convert: its first read compiles the small programs that slice the stacked
    # layers (the server started from an HF dir); no serving program compiles, and later reads none
    seen = []
    for _ in range(2):
        ensure(http, ckpts["a"])
        r = update(http, ckpts["b_orbax"])
        assert r.status_code == 200 and r.json()["layout"] == "orbax", r.text
        answers(http, refs, "b_hf")
        seen.append(counters(http))
        for name in ("compiles_total", "programs_built_total"):
            assert seen[-1][name] == before[name], (name, before, seen[-1])
    assert seen[1]["xla_compiles_total"] == seen[0]["xla_compiles_total"], seen


def test_broken_or_incompatible_checkpoints_are_refused(server, http, ckpts, refs):
    ensure(http, ckpts["b_hf"])
    version = current(http)["weights_version"]
    before = counters(http)
    cases = {
        "layers": (400, "incompatible_weights", "n_layers: 3 (running: 2)"),
        "mask": (400, "incompatible_weights", "mask_token_id: 335 (running: 336)"),
        "truncated": (400, "invalid_checkpoint", "truncated safetensors file"),
        "torn_dcp": (400, "invalid_checkpoint", "truncated DCP file"),
        "missing": (400, "invalid_checkpoint", "no such directory"),
    }
    for name, (status, code, words) in cases.items():
        path = ckpts.get(name, Path("/nonexistent/checkpoint"))
        r = update(http, path)
        assert r.status_code == status, (name, r.text)
        body = r.json()
        assert body["error"]["code"] == code and body["error"]["param"] == "model_path", (name, body)
        assert words in body["error"]["message"] and "previous weights keep serving" in body["message"], body
        assert body["success"] is False
    answers(http, refs, "b_hf")  # the old weights, as before
    assert current(http)["weights_version"] == version
    after = counters(http)
    assert after["weights_loaded_total"] == before["weights_loaded_total"]
    assert after["weight_update_failures_total"] == before["weight_update_failures_total"] + len(cases)
    assert after["weights_resident"] == 1
    # bad bodies, and the API key
    assert http.post("/update_weights_from_disk", json={}).json()["error"]["param"] == "model_path"
    r = update(http, ckpts["a"], load_format="pt")
    assert r.status_code == 400 and r.json()["error"]["param"] == "load_format"
    r = update(http, ckpts["a"], lora_name="adapter")  # a field SGLang has and this server does not
    assert r.status_code == 400 and r.json()["error"]["code"] == "unrecognized_argument"
    assert r.json()["error"]["param"] == "lora_name"
    r = httpx.post(server.url + "/update_weights_from_disk", json={"model_path": str(ckpts["a"])})
    assert r.status_code == 401
    assert current(http)["weights_version"] == version


# ---- in process ----------------------------------------------------------------------------------

def test_off_without_the_flag_is_403_before_the_body_is_read():
    engine = Engine(fake_model, names=["fake"], make_executor=FakeExecutor)
    engine.start()

    async def main():
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await until(lambda: engine.health()[0], "ready")
            for body in ({"model_path": "/x"}, {"nonsense": 1}):
                r = await client.post("/update_weights_from_disk", json=body)
                assert r.status_code == 403 and r.json()["error"]["code"] == "weight_updates_disabled", r.text
                assert r.json()["success"] is False and "--allow-weight-updates" in r.json()["message"]

    try:
        asyncio.run(main())
    finally:
        engine.stop()


class SwapExecutor(FakeExecutor):
    """FakeExecutor that also 'reads' (gated), installs and retires weights versions."""

    def __init__(self, model):
        super().__init__(model)
        self.read_gate = threading.Event()
        self.read_gate.set()

    def open(self, key, version=0):
        sid = super().open(key, version)
        self.log.append(("version", sid, version))
        return sid

    def score(self, sequences, top_k, version=0):
        self.log.append(("score on", version))
        return super().score(sequences, top_k, version)

    def read_weights(self, path):
        self.log.append(("read", path))
        assert self.read_gate.wait(TIMEOUT)
        if "bad" in path:
            raise CheckpointError(f"truncated safetensors file {path}/model.safetensors")
        return Staged(path, "hf", object(), 0.0, 1)

    def install(self, version, staged):
        self.log.append(("install", version))

    def retire(self, version):
        self.log.append(("retire", version))


def test_running_requests_finish_on_old_weights_new_ones_never_join_them():
    engine = Engine(fake_model, names=["fake"], make_executor=SwapExecutor,
                    options=EngineOptions(max_batch_size=4, batch_buckets=(4,), max_wait_ms=0,
                                          allow_weight_updates=True))
    engine.start()
    ex = None

    async def main():
        nonlocal ex
        await until(lambda: engine.health()[0], "ready")
        ex = engine.executor
        ex.gate = threading.Semaphore(0)
        w0 = engine.weights()
        old = engine.submit([seq(gen=96)])           # 3 blocks in a batch of 4 slots (3 free)
        await wait_for(ex.stepping)
        update = asyncio.create_task(engine.update_weights("/ckpt/new"))
        await until(engine.swapper.busy, "the update queued")
        ex.gate.release(1)                           # block 1 of 3; the update starts reading after it
        await until(lambda: ("read", "/ckpt/new") in ex.log, "the read")
        ex.gate.release(1)                           # block 2; the install happens at the next boundary
        result = await asyncio.wait_for(update, TIMEOUT)
        assert result["success"] and result["weights_version"] == 1 and engine.weights().version == 1
        new = engine.submit([seq(gen=96)])           # must not take a free slot of the old batch
        newer = asyncio.create_task(engine.update_weights("/ckpt/newer"))  # waits until version 0 is gone
        bad = asyncio.create_task(engine.update_weights("/ckpt/bad"))
        scores = asyncio.create_task(engine.score([[1, 2, 3]], 0, weights=w0))  # an old lease: on version 0
        del w0
        ex.gate.release(1000)
        a, b = await collect(old), await collect(new)
        assert len(await scores) == 1
        del scores
        assert (await asyncio.wait_for(newer, TIMEOUT))["weights_version"] == 2
        with pytest.raises(WeightUpdateFailed) as e:
            await asyncio.wait_for(bad, TIMEOUT)
        assert e.value.bad_checkpoint and "truncated" in str(e.value) and engine.weights().version == 2
        return a, b

    try:
        a, b = asyncio.run(main())
    finally:
        engine.stop()
    assert len(a[0].tokens) == 96 and len(b[0].tokens) == 96
    log = ex.log
    assert ("version", 0, 0) in log and ("version", 1, 1) in log  # old batch on v0, the new request's on v1
    assert [e for e in log if e[0] == "admit" and e[1] == 0] == [("admit", 0, [0], [10])]  # nobody joined sid 0
    assert ("score on", 0) in log
    assert log.index(("install", 1)) < log.index(("version", 1, 1))
    # version 0 goes when its batch closes and the lease is dropped; only then is the next one read
    assert log.index(("close", 0)) < log.index(("retire", 0)) < log.index(("read", "/ckpt/newer"))
    assert log.index(("install", 2)) < log.index(("read", "/ckpt/bad"))
    m = read_metrics(engine.metrics.render(), "fake")
    assert m["dllm_weights_loaded_total"] == 2 and m["dllm_weight_update_failures_total"] == 1


@pytest.mark.parametrize("background", [True, False], ids=["loader thread", "inline (multi-host)"])
def test_a_failure_part_way_through_a_load_installs_nothing(ckpts, monkeypatch, background):
    model = dllm_jax.load(LLADA_MODEL)
    engine = Engine(lambda: model, names=["x"], options=EngineOptions(allow_weight_updates=True, warmup=(),
                                                                     background_compile=background))
    engine.start()
    original = SafetensorsSource.read
    calls = []

    def flaky(self, key):
        calls.append(key)
        if len(calls) == 8:
            raise OSError("Input/output error (the disk went away)")
        return original(self, key)

    async def main():
        await until(lambda: engine.health()[0], "ready")
        leaves = jax.tree.leaves(engine.executor.versions[0].params)
        assert all(x is y for x, y in zip(leaves, jax.tree.leaves(model.params)))
        monkeypatch.setattr(SafetensorsSource, "read", flaky)
        with pytest.raises(WeightUpdateFailed) as e:
            await engine.update_weights(str(ckpts["b_hf"]))
        assert not e.value.bad_checkpoint and "Input/output error" in str(e.value) and len(calls) == 8
        assert engine.weights().version == 0 and list(engine.executor.versions) == [0]
        for now in (engine.executor.versions[0].params, model.params):
            assert all(x is y and not x.is_deleted() for x, y in zip(jax.tree.leaves(now), leaves))
        monkeypatch.setattr(SafetensorsSource, "read", original)
        result = await engine.update_weights(str(ckpts["b_hf"]))
        assert result["weights_version"] == 1
        await until(lambda: list(engine.executor.versions) == [1], "version 0 retired")
        assert all(x.is_deleted() for x in leaves)  # its device buffers were freed at once
        b = _tensors(ckpts["b_hf"])["model.transformer.wte.weight"]
        np.testing.assert_array_equal(np.asarray(model.params["embed"].get_value()), b)

    try:
        asyncio.run(main())
    finally:
        engine.stop()


def test_weights_root_confines_update_paths_end_to_end(ckpts):
    """--weights-root: an update whose model_path resolves outside the root is a 400 naming the
    root (nothing read); one inside it loads."""
    root = ckpts["b_hf"].parent
    model = dllm_jax.load(LLADA_MODEL)  # (its own: the update retires and frees these params)
    engine = Engine(lambda: model, names=["x"],
                    options=EngineOptions(allow_weight_updates=True, warmup=(), weights_root=str(root)))
    engine.start()

    async def main():
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await until(lambda: engine.health()[0], "ready")
            for outside in (LLADA_MODEL, root / ".." / root.name / ".." / "elsewhere"):
                r = await client.post("/update_weights_from_disk", json={"model_path": str(outside)})
                assert r.status_code == 400 and "--weights-root" in r.json()["error"]["message"], r.text
            r = await client.post("/update_weights_from_disk", json={"model_path": str(ckpts["b_hf"])})
            assert r.status_code == 200 and r.json()["success"], r.text

    try:
        asyncio.run(main())
    finally:
        engine.stop()


def test_multi_host_update_is_one_broadcast_command_every_process_replays(ckpts):
    """Process 0's executor broadcasts load_weights / retire; a follower replaying them holds the
    same versions (the real two-process run: see the note in docs/api.md)."""
    sent = []
    leader = Executor(dllm_jax.load(LLADA_MODEL), broadcast=lambda cmd: sent.append(pickle.loads(pickle.dumps(cmd))))
    follower = Executor(dllm_jax.load(LLADA_MODEL))
    old = [jax.tree.leaves(e.versions[0].params) for e in (leader, follower)]
    staged = leader.load_weights(str(ckpts["b_hf"]), 1)
    assert staged.layout == "hf" and [(c.op, c.version, c.path) for c in sent] == [
        ("load_weights", 1, str(ckpts["b_hf"]))]
    follower.apply(sent[-1])
    with pytest.raises(CheckpointError, match="truncated"):
        leader.load_weights(str(ckpts["truncated"]), 2)
    with pytest.raises(CheckpointError, match="truncated"):
        follower.apply(sent[-1])
    leader.retire(0)
    follower.apply(sent[-1])
    b = _tensors(ckpts["b_hf"])["model.transformer.wte.weight"]
    for e, leaves in zip((leader, follower), old):
        assert list(e.versions) == [1] and e.version == 1 and all(x.is_deleted() for x in leaves)
        np.testing.assert_array_equal(np.asarray(e.versions[1].params["embed"].get_value()), b)
        assert e.model.params["embed"].get_value() is e.versions[1].params["embed"].get_value()
