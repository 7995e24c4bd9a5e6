"""Helpers for the server tests: a real ``python -m serve`` subprocess, schema validation.

(Also a test module: it checks the helpers' own small pieces.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
LLADA_MODEL = FIXTURES / "llada_tiny" / "model"
NEMOTRON_MODEL = FIXTURES / "nemotron_tiny" / "model"
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


class Server:
    """``python -m serve ARGS`` on a free localhost port; ready when /health says 200."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 300.0, port: int | None = None,
                 wait: bool = True):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "serve", "--port", str(self.port), *args]
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
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")

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


def test_validate_rejects_missing_fields():
    import jsonschema
    import pytest

    validate({"error": {"message": "m", "type": "t", "param": None, "code": None}}, "ErrorResponse")
    with pytest.raises(jsonschema.ValidationError):
        validate({"error": {"message": "m", "type": "t"}}, "ErrorResponse")
