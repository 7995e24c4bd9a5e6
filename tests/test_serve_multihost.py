"""Multi-host serving on one machine: 2 processes x 4 CPU devices under jax.distributed.

Process 0 serves HTTP and broadcasts every session (and scoring) command; process 1 replays
them. The answers must equal ``Model.generate`` (``Model.score``) on one device, and stopping process 0 must stop the
follower.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import openai
import pytest

from helpers import LLADA_DIR
from serve_helpers import LLADA_MODEL, REPO, Server, chat_ids, free_port, reference, server_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    coord = f"127.0.0.1:{free_port()}"
    common = ["--model", str(LLADA_MODEL), "--mesh", "8", "--max-batch-size", "8", "--warmup-buckets", "none",
              "--max-wait-ms", "50", "--coordinator-address", coord, "--num-processes", "2", "--allow-weight-updates"]
    env = server_env(devices=4)
    log = tmp_path_factory.mktemp("multihost") / "follower.log"
    with open(log, "w") as f:
        follower = subprocess.Popen([sys.executable, "-m", "serve", *common, "--process-id", "1"], cwd=REPO,
                                    env=env, stdout=f, stderr=subprocess.STDOUT)
    leader = None
    try:
        leader = Server(*common, "--process-id", "0", env=env, timeout=300)
        yield leader, follower, log
    finally:
        if leader is not None:
            leader.stop()
        try:
            follower.wait(60)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.wait()


def test_scoring_runs_on_both_processes(cluster, llada_model):
    """echo + logprobs, max_tokens 0: the executor's 'score' command is broadcast and replayed."""
    leader, follower, log = cluster
    client = openai.OpenAI(base_url=leader.url + "/v1", api_key="none", max_retries=0, timeout=300)
    tok = llada_model.tokenizer
    ids = [tok.encode(t) for t in ["The cat", "Once upon a time"]]
    try:
        scored = client.completions.create(model=client.models.list().data[0].id, prompt=ids, max_tokens=0,
                                           echo=True, logprobs=1)
    finally:
        assert follower.poll() is None, log.read_text()[-3000:]  # a failed score leaves both in step
    for c, sc in zip(scored.choices, llada_model.score(ids)):
        assert c.logprobs.token_logprobs[0] is None
        assert max(abs(a - b) for a, b in zip(c.logprobs.token_logprobs[1:], sc.token_logprobs[1:])) <= 1e-4


def test_weight_update_reaches_every_process(cluster, llada_model, tmp_path):
    """POST /update_weights_from_disk: both processes read it and swap at the same command (a
    follower left on the old weights would answer its rows of the data-parallel batch with them)."""
    import httpx
    import numpy as np

    import dllm_jax
    from dllm_jax.checkpoint import SafetensorsSource, save_safetensors

    leader, follower, log = cluster
    src = SafetensorsSource(LLADA_MODEL)
    rng = np.random.default_rng(3)
    tensors = {k: np.array(src.read(k)) for k in src.tensors()}
    tensors = {k: (v + 0.5 * v.std() * rng.standard_normal(v.shape)).astype(v.dtype) if v.ndim == 2 else v
               for k, v in tensors.items()}
    shutil.copytree(LLADA_MODEL, tmp_path / "b")
    save_safetensors(tensors, tmp_path / "b" / "model.safetensors")
    b_model = dllm_jax.load(tmp_path / "b")
    tok = llada_model.tokenizer
    ids = [tok.encode(t) for t in ["The cat", "Once upon a time"]]
    client = openai.OpenAI(base_url=leader.url + "/v1", api_key="none", max_retries=0, timeout=300)
    name = client.models.list().data[0].id
    try:
        for path, model in ((tmp_path / "b", b_model), (LLADA_DIR / "dcp/policy", llada_model)):
            r = httpx.post(leader.url + "/update_weights_from_disk", json={"model_path": str(path)}, timeout=300)
            assert r.status_code == 200 and r.json()["success"], r.text
            # 2 prompts x n=4: slots 0-7 of a batch of 8 over 8 devices, rows 4-7 on process 1's
            out = client.completions.create(model=name, prompt=ids, max_tokens=24, n=4)
            assert [c.text for c in out.choices] == [t for t in reference(model, ids, [24, 24]) for _ in range(4)], path
        r = httpx.post(leader.url + "/update_weights_from_disk", json={"model_path": str(tmp_path / "nope")})
        assert r.status_code == 400 and "no such directory" in r.json()["error"]["message"]
    finally:
        assert follower.poll() is None, log.read_text()[-3000:]


def test_two_processes_answer_like_one_device(cluster, llada_model):
    leader, follower, log = cluster
    client = openai.OpenAI(base_url=leader.url + "/v1", api_key="none", max_retries=0, timeout=300)
    model = client.models.list().data[0]
    assert model.mesh == {"data": 8, "model": 1}
    tok = llada_model.tokenizer
    texts = ["The cat", "Once upon a time"]
    out = client.completions.create(model=model.id, prompt=texts, max_tokens=24)
    assert [c.text for c in out.choices] == reference(llada_model, [tok.encode(t) for t in texts], [24, 24])
    chat = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Hello there!"}],
                                          max_tokens=24, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    assert text == reference(llada_model, [chat_ids(llada_model, "Hello there!")], [24])[0]
    assert follower.poll() is None, log.read_text()[-3000:]
    leader.stop()
    assert follower.wait(60) == 0, log.read_text()[-3000:]


def test_lost_follower_turns_health_503_then_process_0_exits(tmp_path):
    """A follower killed mid-job: process 0 (which would wait in the next collective forever, with
    /health at 200) notices the missing heartbeats, answers /health 503, and exits with status 3
    and a message; its coordination service listened only on the address it was given."""
    import signal
    import time

    import httpx

    port = free_port()
    common = ["--model", str(LLADA_MODEL), "--mesh", "8", "--warmup-buckets", "none", "--peer-timeout", "3",
              "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
    env = server_env(devices=4)
    with open(tmp_path / "follower.log", "w") as f:
        follower = subprocess.Popen([sys.executable, "-m", "serve", *common, "--process-id", "1"], cwd=REPO,
                                    env=env, stdout=f, stderr=subprocess.STDOUT)
    leader = None
    try:
        leader = Server(*common, "--process-id", "0", env=env, timeout=300)
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        # (jax's default was every interface, "[::]:port"; "[::ffff:127.0.0.1]" is the IPv4 loopback)
        assert listening.split() and all("127.0.0.1" in line.split()[3] for line in listening.splitlines()), \
            listening
        follower.send_signal(signal.SIGKILL)
        follower.wait()
        statuses = []
        deadline = time.monotonic() + 60
        while leader.proc.poll() is None and time.monotonic() < deadline:
            try:
                statuses.append(httpx.get(leader.url + "/health", timeout=2).status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert leader.proc.wait(30) == 3, leader.output()[-3000:]
        assert 503 in statuses and statuses[0] == 200, statuses
        assert "process 1 sent no heartbeat" in leader.output()
    finally:
        if follower.poll() is None:
            follower.kill()
        if leader is not None:
            leader.stop()
