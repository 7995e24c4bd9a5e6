"""The engine: no HTTP in sight (it never imports ``serve.api``; tests/test_imports.py checks).

``engine`` the interface the front end sees (load, health, submit, score, control), with its
weights and device memory in ``weight_updates``; ``engine_types`` its plain data (options,
model info, states); ``defaults`` what a request naming no decoder runs (warmed up at start);
``errors`` its domain errors (``serve.api.app.api_error`` maps them to HTTP); ``requests`` what
crosses between the event loop and the scheduler thread (SeqRequest, Event, Handle, Inbox);
``scheduler`` the thread that batches into decode sessions, applying ``policy`` (pure batching
decisions), with ``row_events`` what it posts to each row's request and how rows leave;
``compiler`` background compiles; ``executor`` the device-facing command sequence
(``host_copy`` host copies of released weights); ``weights`` versions and the swapper,
``weight_reading`` reading / staging / confining new weights; ``multihost`` jax.distributed and
the follower loop; ``metrics`` Prometheus metrics; ``demo`` the demo model ``python -m serve``
loads without ``--model``.
"""
