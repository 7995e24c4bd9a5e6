"""OpenAI-compatible HTTP server for dllm-jax (``python -m serve``).

Layout (one concern per file): ``__main__`` CLI; ``app`` FastAPI factory, auth, and the
mapping of every error to HTTP; ``routes`` thin endpoints; ``protocol`` request models and
the field policy; ``request_params`` request -> SamplingParams with per-family defaults;
``serving`` request -> engine -> response; ``streaming`` SSE; ``detok`` incremental
UTF-8-safe text with stop strings; ``responses`` bodies from ``openai.types``; ``engine``
the interface the routes see (load, health, submit); ``errors`` the engine's domain errors
(no HTTP); ``requests`` what crosses between the event loop and the scheduler thread
(SeqRequest, Event, Handle, Inbox); ``scheduler`` the thread that batches into decode
sessions; ``compiler`` background compiles; ``executor`` the device-facing command
sequence; ``multihost`` jax.distributed and the follower loop; ``metrics`` Prometheus
metrics (prometheus_client); ``demo`` the random demo model. See docs/api.md.
"""
