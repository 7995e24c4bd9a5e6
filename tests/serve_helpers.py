"""Helpers for the server tests (importable as ``serve_helpers``: pytest's ``pythonpath`` puts
``tests/`` on the path): a real ``python -m serve`` subprocess, OpenAI schema validation, SSE
and ``/metrics`` parsing, and the ``Model.generate`` reference a server's text must equal.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from helpers import FIXTURES, LLADA_DIR, NEMOTRON_DIR

REPO = Path(__file__).resolve().parents[1]
LLADA_MODEL = LLADA_DIR / "model"
NEMOTRON_MODEL = NEMOTRON_DIR / "model"
SCHEMAS = FIXTURES / "openai" / "openai_schemas.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(devices: int = 8, **extra) -> dict:
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # the test process runs matmuls at full f32 precision (conftest); so does the server
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    })
    env.pop("DLLM_API_KEY", None)
    env.update(extra)
    return env


# Run as ``python -c _DIE_WITH_PARENT PID CMD...``: asks the kernel to kill this process when its parent
# (the pytest process) dies, then becomes CMD. A test process that crashes (a segfault in a worker) would
# otherwise leave its server running for the rest of the suite, holding memory.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
                    "os.getppid() == int(sys.argv[1]) or sys.exit(1); os.execv(sys.argv[2], sys.argv[2:])")


class Server:
    """``python -m serve ARGS`` on a free localhost port; ready when /health says 200."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 300.0, port: int | None = None,
                 wait: bool = True):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()),
               sys.executable, "-m", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env or server_env(), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)  # poll interval; readiness itself is decided by /health
        output = self.output()  # before stop(), which closes and removes the log
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{output}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


# ---- OpenAI schemas ----------------------------------------------------------------------

_VALIDATORS: dict[str, object] = {}


def validate(body: dict, schema_name: str) -> None:
    """Validate raw JSON against components.schemas[schema_name] (Draft 2020-12, $refs resolved)."""
    if schema_name not in _VALIDATORS:
        import jsonschema
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        doc = json.loads(SCHEMAS.read_text())
        registry = Registry().with_resource("urn:openai", Resource.from_contents(doc, default_specification=DRAFT202012))
        schema = {"$ref": f"urn:openai#/components/schemas/{schema_name}"}
        _VALIDATORS[schema_name] = jsonschema.Draft202012Validator(schema, registry=registry)
    _VALIDATORS[schema_name].validate(body)


def sse_events(lines) -> list:
    """Parse SSE 'data:' lines into JSON objects ('[DONE]' kept as the string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def read_metrics(text: str | bytes, model: str | None = None) -> dict[str, float]:
    """``/metrics`` text (parsed by prometheus_client) -> ``{'name': v, 'name{label="x"}': v}``.

    Every ``dllm_`` sample must carry the label ``model`` (equal to ``model`` when given); it
    is dropped from the keys, the other labels are kept in sorted order.
    """
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            if s.name.startswith("dllm_"):
                served = labels.pop("model")
                assert model is None or served == model, (s.name, served, model)
            inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            out[f"{s.name}{{{inner}}}" if inner else s.name] = s.value
    return out


# ---- reference: Model.generate in this process -------------------------------------------

def chat_ids(model, content: str) -> list[int]:
    """The prompt the server must build: the public Model.chat_prompt."""
    return model.chat_prompt([{"role": "user", "content": content}])


def reference(model, prompts, max_tokens, *, stop=(), block_length=32, algorithm=None, **rows):
    """Texts the server must return (server defaults for LLaDA: dual_cache, threshold 0.9)."""
    gen = math.ceil(max(max_tokens) / block_length) * block_length
    if algorithm is None:
        algorithm = "dual_cache"
        rows.setdefault("threshold", 0.9)
    out = model.generate(prompts, gen_length=gen, block_length=block_length, algorithm=algorithm,
                         early_stop=True, **rows)
    texts = []
    for i, limit in enumerate(max_tokens):
        text = model.tokenizer.decode(out.tokens[i][:min(int(out.lengths[i]), limit)].tolist(),
                                      skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s in text]
        texts.append(text[:min(cuts)] if cuts else text)
    return texts
