"""OpenAI-compatible HTTP server for dllm-jax (``python -m serve``).

Two halves, as vLLM separates ``entrypoints/`` from ``engine/``; imports point one way (the
engine never imports the front end, ``tests/test_imports.py`` checks it):

- ``serve.api``: the HTTP front end (FastAPI app, routes, request models and field checks,
  request -> SamplingParams, responses, streaming, the playground, SGLang's native API for RL).
- ``serve.engine``: the engine (``Engine``, the scheduler thread, the batching policy,
  compiles, the device-facing executor, weights versions, multi-host, metrics, its domain errors).

``__main__`` is the CLI that builds both. See docs/architecture.md and docs/api.md.
"""
